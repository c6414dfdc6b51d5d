"""Expected SEV-SNP launch digest, computed from what the guest owner knows (SNP ABI 56860,
SNP_LAUNCH_UPDATE, the PAGE_INFO structure; sev-snp-measure ``gctx.py`` / ``guest.py``; QEMU
``target/i386/sev.c`` for the order a QEMU/KVM host launches OVMF in).

Written independently of the firmware model (its own PAGE_INFO packing): the firmware's GCTX.LD after
the launch must equal :attr:`SnpLaunchDigest.digest`.

The chain: LD starts as 48 zero bytes (or a seed: a precomputed OVMF digest); every 4 KiB page updated
replaces it with SHA-384 of PAGE_INFO (0x70 bytes: LD, CONTENTS, u16 0x70, page type, IMI flag, VMPL3,
VMPL2, VMPL1 permissions, a reserved byte, the GPA as u64).  CONTENTS is SHA-384 of the page for NORMAL
and VMSA pages, 48 zero bytes for ZERO, UNMEASURED, SECRETS and CPUID pages.  A VMSA page's GPA is
0xFFFFFFFFF000.

The QEMU order for OVMF (:func:`ovmf_launch_digest`): the flash image (NORMAL, ending at 4 GiB); the
SEV metadata sections in table order -- SEC_MEM as ZERO, SECRETS, CPUID, KERNEL_HASHES as the NORMAL page holding the hashes table (ZERO without a
kernel), SVSM_CAA as ZERO; then one VMSA per vCPU, BSP first (:mod:`sevemu.owner.vmsa`, with
``sev_features`` = the guest features, SNP_ACTIVE included).  sev-snp-measure's other VMM types
(``guest.py`` ``snp_update_section`` / ``snp_update_metadata_pages``): **ec2** measures the CPUID
sections after every other section; **gce** launches SEC_MEM as UNMEASURED pages; both start their
vCPUs in their own reset states (:func:`sevemu.owner.vmsa.vmm_reset_state`).

:attr:`SnpLaunchDigest.steps` records each PAGE_INFO (type, GPA, CONTENTS, digest after) so a user can
find where two digests part (``sevemu measure --explain``).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from sevemu._util.units import PAGE
from sevemu.abi.snp import SnpPageType
from sevemu.errors import InputError, LayoutError
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.measurement import kernel_hashes_table
from sevemu.owner.ovmf import SectionType, sev_hashes_table_gpa, sev_metadata

__all__ = [
    "FOUR_GIB",
    "LD_SIZE",
    "VMSA_GPA",
    "PageType",
    "SnpLaunchDigest",
    "Step",
    "VmmType",
    "ovmf_launch_digest",
]

LD_SIZE = 48
VMSA_GPA = 0xFFFF_FFFF_F000
FOUR_GIB = 1 << 32
_ZEROS = bytes(LD_SIZE)


PageType = SnpPageType
"""SNP_LAUNCH_UPDATE page types (the ABI's)."""


VmmType = owner_vmsa.VmmType
"""The VMMs whose OVMF launch order sev-snp-measure knows (``--vmm-type``)."""


@dataclass(frozen=True, slots=True)
class Step:
    """One PAGE_INFO of the chain: what was hashed and the launch digest after it."""

    page_type: PageType
    gpa: int
    contents: bytes
    digest: bytes


def _page_info(ld: bytes, contents: bytes, page_type: int, gpa: int, perms: tuple[int, int, int]) -> bytes:
    # 00 LD[48] | 30 CONTENTS[48] | 60 u16 length | 62 type | 63 IMI | 64 VMPL3 | 65 VMPL2 | 66 VMPL1 | 67 rsvd | 68 GPA
    return ld + contents + struct.pack("<HBBBBBBQ", 0x70, page_type, 0, perms[2], perms[1], perms[0], 0, gpa)


@dataclass
class SnpLaunchDigest:
    """A running SNP launch digest (module docstring)."""

    digest: bytes = _ZEROS
    steps: list[Step] = field(default_factory=list)
    record: bool = True

    def _update(self, page_type: PageType, gpa: int, contents: bytes, perms: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.digest = hashlib.sha384(_page_info(self.digest, contents, int(page_type), gpa, perms)).digest()
        if self.record:
            self.steps.append(Step(page_type, gpa, contents, self.digest))

    @staticmethod
    def _pages(gpa: int, length: int) -> range:
        if gpa % PAGE or length % PAGE or length <= 0:
            raise InputError(f"SNP launch updates are whole 4 KiB pages: {gpa:#x}+{length:#x}")
        return range(gpa, gpa + length, PAGE)

    def normal(self, gpa: int, data: bytes) -> None:
        for i, page in enumerate(self._pages(gpa, len(data))):
            self._update(PageType.NORMAL, page, hashlib.sha384(data[i * PAGE : (i + 1) * PAGE]).digest())

    def zero(self, gpa: int, length: int) -> None:
        for page in self._pages(gpa, length):
            self._update(PageType.ZERO, page, _ZEROS)

    def unmeasured(self, gpa: int, length: int) -> None:
        for page in self._pages(gpa, length):
            self._update(PageType.UNMEASURED, page, _ZEROS)

    def secrets(self, gpa: int) -> None:
        self._update(PageType.SECRETS, gpa, _ZEROS)

    def cpuid(self, gpa: int) -> None:
        self._update(PageType.CPUID, gpa, _ZEROS)

    def vmsa(self, page: bytes) -> None:
        if len(page) != PAGE:
            raise InputError(f"a VMSA page is 4096 bytes, got {len(page)}")
        self._update(PageType.VMSA, VMSA_GPA, hashlib.sha384(page).digest())


def _hashes_page(image: bytes, kernel: bytes, initrd: bytes, cmdline: str | bytes | None) -> bytes:
    table_gpa = sev_hashes_table_gpa(image)
    if table_gpa is None:
        raise InputError("a kernel is given, but the OVMF image has no kernel-hashes table entry")
    table = kernel_hashes_table(kernel, initrd, cmdline)
    offset = table_gpa % PAGE
    if offset + len(table) > PAGE:
        raise InputError("the kernel-hashes table does not fit its page")
    return bytes(offset) + table + bytes(PAGE - offset - len(table))


def ovmf_launch_digest(image: bytes, vcpus: int, cpu_signature: int, *, guest_features: int = 0x1,
                       kernel: bytes | None = None, initrd: bytes = b"", cmdline: str | bytes | None = None,
                       vmm: VmmType = VmmType.QEMU, ovmf_hash: bytes | None = None) -> SnpLaunchDigest:
    """The launch digest of OVMF ``image`` launched by ``vmm`` with ``vcpus`` vCPUs of ``cpu_signature``
    (module docstring); ``ovmf_hash``: the digest after the image's pages, instead of hashing them.

    Raises :class:`~sevemu.errors.InputError` for what the VMM could not launch (no vCPU, a kernel
    without a kernel-hashes section, an image without an SEV-ES reset block) and
    :class:`~sevemu.errors.LayoutError` for malformed OVMF tables.
    """
    if vcpus < 1:
        raise InputError(f"a guest needs at least one vCPU, got {vcpus}")
    if len(image) % PAGE:
        raise InputError(f"an OVMF image is whole 4 KiB pages, got {len(image):#x} bytes")
    ld = SnpLaunchDigest()
    if ovmf_hash is not None:
        if len(ovmf_hash) != LD_SIZE:
            raise InputError(f"an OVMF hash is {LD_SIZE} bytes, got {len(ovmf_hash)}")
        ld.digest = bytes(ovmf_hash)
    else:
        ld.normal(FOUR_GIB - len(image), image)
    sections = sev_metadata(image)
    if kernel is not None and not any(s.type == SectionType.SNP_KERNEL_HASHES for s in sections):
        raise InputError("a kernel is given, but the OVMF metadata has no SNP_KERNEL_HASHES section")
    for sec in sections:
        if sec.type == SectionType.SNP_SEC_MEM:
            if vmm is VmmType.GCE:
                ld.unmeasured(sec.gpa, sec.size)
            else:
                ld.zero(sec.gpa, sec.size)
        elif sec.type == SectionType.SNP_SECRETS:
            ld.secrets(sec.gpa)
        elif sec.type == SectionType.CPUID:
            if vmm is not VmmType.EC2:  # EC2: after every other section (below)
                ld.cpuid(sec.gpa)
        elif sec.type == SectionType.SNP_KERNEL_HASHES:
            if kernel is None:
                ld.zero(sec.gpa, sec.size)
            else:
                ld.normal(sec.gpa, _hashes_page(image, kernel, initrd, cmdline))
        else:  # SVSM_CAA
            ld.zero(sec.gpa, sec.size)
    if vmm is VmmType.EC2:
        for sec in sections:
            if sec.type == SectionType.CPUID:
                ld.cpuid(sec.gpa)
    try:
        pages = owner_vmsa.ovmf_vmsa_pages(image, vcpus, cpu_signature=cpu_signature, sev_features=guest_features,
                                           vm_type=owner_vmsa.KvmVmType.SNP_VM, vmm=vmm)
    except LayoutError as exc:
        raise InputError(f"OVMF image: {exc}") from None
    for page in pages:
        ld.vmsa(page)
    return ld

