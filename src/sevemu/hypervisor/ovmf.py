"""Launching an OVMF flash image the way QEMU/KVM do: plain, SEV, SEV-ES and SEV-SNP.

Sources: QEMU ``hw/i386/pc_sysfw.c`` / ``pc_sysfw_ovmf.c`` (the flash mapped so that it ends at 4 GiB;
the GUIDed table read backwards from the image's end; the SEV-ES reset block; the SEV metadata
"ASEV" sections) and ``target/i386/sev.c`` (``sev_launch_update_data`` of the whole flash,
``sev_snp_launch_update`` of the metadata sections: SNP_SEC_MEM as ZERO pages, SNP_SECRETS as the
SECRETS page, CPUID as the CPUID page, the rest ZERO; the VMSAs last); Linux
``arch/x86/kvm/svm/sev.c`` for what KVM does with each.

This is the VMM's side, written independently of the guest owner's calculator
(:mod:`sevemu.owner.ovmf`, :mod:`sevemu.owner.snp_measurement`); ``sevemu run --firmware`` holds the
two together by checking the launch digest.

* :func:`parse_ovmf` reads the image: its size and place (``4 GiB - size``), the GUIDed table, the
  SEV-ES reset block (the EIP application processors start at) and the SEV metadata sections.
  An image without SEV metadata (Debian's ``OVMF_CODE_4M.fd``) can run as a plain or SEV guest only:
  :meth:`OvmfImage.check_mode` refuses SEV-ES/SNP for it with the reason.
* :func:`launch_ovmf` creates the VM (4 GiB of guest-physical space, backed on demand: the flash at
  its top, RAM below), its vCPUs in the x86 reset state (the BSP at 0xFFFF_FFF0, APs at the reset
  block's EIP), and launches it: a plain VM gets the flash copied in; an SEV/SEV-ES guest goes through
  LAUNCH_START, LAUNCH_UPDATE_DATA of the flash, (SEV-ES) LAUNCH_UPDATE_VMSA of every vCPU,
  LAUNCH_MEASURE, LAUNCH_FINISH (:meth:`Hypervisor.launch_measure`); an SNP guest through
  KVM_SEV_INIT2, SNP_LAUNCH_START, SNP_LAUNCH_UPDATE of the flash (NORMAL) and of the metadata
  sections (the CPUID page filled with the host's CPUID answers, which the firmware checks), and
  SNP_LAUNCH_FINISH (the VMSAs).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sevemu._util.units import PAGE, GiB, MiB
from sevemu.abi.ghcb import GhcbMsrInfo
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.snp import CPUID_COUNT_MAX, OvmfSectionType, SnpCpuidFunction, SnpCpuidTable, SnpPageType
from sevemu.errors import InputError, LayoutError
from sevemu.hw.cpu import Engine
from sevemu.hw.svm import Segment as HwSegment
from sevemu.hypervisor.devices import LAPIC_BASE, Pc, install_pc
from sevemu.hypervisor.devices.pc import Chipset
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import KvmSevSnpLaunchFinish, KvmSevSnpLaunchStart, KvmSevSnpLaunchUpdate
from sevemu.hypervisor.vcpu import BSP_RESET_EIP, KvmVmType
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind

__all__ = [
    "DEFAULT_RAM",
    "FOUR_GIB",
    "MAX_RAM",
    "MODES",
    "SNP_POLICY",
    "OvmfImage",
    "OvmfLaunch",
    "OvmfSection",
    "OvmfSectionType",
    "launch_ovmf",
    "parse_ovmf",
    "snp_cpuid_table",
]

FOUR_GIB = 4 * GiB
DEFAULT_RAM = 256 * MiB
MAX_RAM = 2 * GiB
MODES = ("plain", "sev", "sev-es", "snp")
SNP_POLICY = 0x30000
"""The SNP guest policy of the launch: SMT allowed, bit 17 (reserved, one) -- QEMU's default."""

_FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
_RESET_BLOCK = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
_METADATA = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")


@dataclass(frozen=True, slots=True)
class OvmfSection:
    """A range of guest memory OVMF's metadata asks the VMM to prepare at an SNP launch."""

    gpa: int
    size: int
    type: OvmfSectionType


@dataclass(frozen=True, slots=True)
class OvmfImage:
    """An OVMF flash image as the VMM sees it (:func:`parse_ovmf`)."""

    data: bytes
    ap_reset_eip: int | None
    """EIP of the SEV-ES reset block (where APs of an SEV-ES guest start); None without one."""
    sections: tuple[OvmfSection, ...]
    """The SEV metadata sections (empty: the image has no SEV metadata)."""

    @property
    def gpa(self) -> int:
        """Where the flash is mapped: it ends at 4 GiB."""
        return FOUR_GIB - len(self.data)

    def section(self, kind: OvmfSectionType) -> OvmfSection | None:
        return next((s for s in self.sections if s.type is kind), None)

    def check_mode(self, mode: str) -> None:
        """Raise :class:`InputError` when this image cannot boot as a guest of ``mode``."""
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: {', '.join(MODES)}")
        if mode in ("sev-es", "snp") and (not self.sections or self.ap_reset_eip is None):
            raise InputError(
                f"--mode {mode}: this OVMF image has no SEV metadata (no 'ASEV' sections or no SEV-ES reset block "
                "in its GUIDed table), so it cannot start as an SEV-ES/SNP guest -- it was not built with "
                "SEV-ES support (Debian: use /usr/share/ovmf/OVMF.fd, not OVMF_CODE_4M.fd)")
        if mode == "snp" and self.section(OvmfSectionType.CPUID) is None:
            raise InputError("--mode snp: the OVMF image's SEV metadata has no CPUID page")


def _guid_table(data: bytes) -> dict[uuid.UUID, bytes]:
    top = len(data) - 32  # the reset vector area is not part of the table
    if top < 18 or data[top - 16 : top] != _FOOTER:
        return {}
    total = int.from_bytes(data[top - 18 : top - 16], "little")
    if not 18 <= total <= top:
        raise LayoutError(f"OVMF GUIDed table: length {total} does not fit the image")
    table, end, floor = {}, top - 18, top - total
    while end > floor:
        if end - 18 < floor:
            raise LayoutError("OVMF GUIDed table: an entry runs below the table")
        guid = uuid.UUID(bytes_le=bytes(data[end - 16 : end]))
        size = int.from_bytes(data[end - 18 : end - 16], "little")
        if size < 18 or end - size < floor:
            raise LayoutError(f"OVMF GUIDed table: entry {guid} of length {size} does not fit")
        table[guid] = bytes(data[end - size : end - 18])
        end -= size
    return table


def parse_ovmf(data: bytes) -> OvmfImage:
    """Read an OVMF flash image (module docstring); :class:`~sevemu.errors.LayoutError` when it is
    malformed, :class:`~sevemu.errors.InputError` when it cannot be a flash image at all."""
    data = bytes(data)
    if not data or len(data) % PAGE or len(data) > 16 * 1024 * 1024:
        raise InputError(f"an OVMF flash image is whole 4 KiB pages and at most 16 MiB, got {len(data):#x} bytes")
    table = _guid_table(data)
    block = table.get(_RESET_BLOCK)
    ap_eip = int.from_bytes(block[:4], "little") if block is not None and len(block) >= 4 else None
    sections: list[OvmfSection] = []
    meta = table.get(_METADATA)
    if meta is not None and len(meta) >= 4:
        start = len(data) - int.from_bytes(meta[:4], "little")
        if not 0 <= start <= len(data) - 16 or data[start : start + 4] != b"ASEV":
            raise LayoutError("OVMF SEV metadata: no 'ASEV' header where the GUIDed table points")
        size, version, count = (int.from_bytes(data[start + i : start + i + 4], "little") for i in (4, 8, 12))
        if version != 1 or size != 16 + 12 * count or start + size > len(data):
            raise LayoutError(f"OVMF SEV metadata: version {version}, {count} sections in {size} bytes do not fit")
        for i in range(count):
            gpa, length, kind = (int.from_bytes(data[start + 16 + 12 * i + j : start + 20 + 12 * i + j], "little")
                                 for j in (0, 4, 8))
            try:
                sections.append(OvmfSection(gpa, length, OvmfSectionType(kind)))
            except ValueError:
                raise LayoutError(f"OVMF SEV metadata section {i}: unknown type {kind:#x}") from None
    return OvmfImage(data, ap_eip, tuple(sections))


def snp_cpuid_table(cpuid: Callable[[int, int], tuple[int, int, int, int]]) -> bytes:
    """The CPUID page a VMM hands SNP_LAUNCH_UPDATE (SEV-SNP ABI, CPUID page type): the host's answers
    for every standard and extended leaf up to their maxima (subleaf 0; leaf 0xD's subleaves 0 and 1,
    leaf 0xB/0x8000_0026's... as far as the table's 64 entries go), as QEMU hands KVM's."""
    leaves: list[tuple[int, int]] = []
    for base in (0, 0x8000_0000):
        top = cpuid(base, 0)[0]
        for leaf in range(base, min(top, base + 0x40) + 1):
            leaves.append((leaf, 0))
            if leaf == 0xD:
                leaves.append((leaf, 1))
    functions = [SnpCpuidFunction(eax_in=leaf, ecx_in=sub, xcr0_in=1 if leaf == 0xD else 0, xss_in=0,
                                  **dict(zip(("eax", "ebx", "ecx", "edx"), cpuid(leaf, sub), strict=True)))
                 for leaf, sub in leaves[:CPUID_COUNT_MAX]]
    table = SnpCpuidTable(count=len(functions),
                          fn=tuple(functions) + (SnpCpuidFunction(),) * (CPUID_COUNT_MAX - len(functions)))
    return table.encode().ljust(PAGE, b"\0")


@dataclass
class OvmfLaunch:
    """A launched OVMF guest: the VM, the image, and the launch's evidence."""

    vm: Vm
    image: OvmfImage
    mode: str
    pc: Pc
    measurement: bytes = b""
    """SEV / SEV-ES: the LAUNCH_MEASURE blob (MEASURE || MNONCE)."""
    policy: int = 0


def launch_ovmf(hv: Hypervisor, image: OvmfImage, mode: str, engines: Sequence[Engine], *,
                ram: int = DEFAULT_RAM, chipset: Chipset = "q35", vcpu_type: str = "EPYC-Milan",
                name: str = "ovmf", snp_policy: int = SNP_POLICY) -> OvmfLaunch:
    """Create and launch an OVMF guest of ``mode`` with one vCPU per engine and ``ram`` bytes of RAM
    on a QEMU ``chipset`` PC's devices (module docstring).  Every input is checked before anything
    is created."""
    image.check_mode(mode)
    if not 1 <= len(engines) <= 8:
        raise InputError(f"an OVMF guest here has 1 to 8 vCPUs, got {len(engines)}")
    if ram % MiB or not 32 * MiB <= ram <= MAX_RAM:
        raise InputError(f"guest RAM must be a multiple of 1 MiB from 32 MiB to {MAX_RAM // MiB} MiB, got {ram:#x}")
    snp, es = mode == "snp", mode in ("sev-es", "snp")
    vm_type = KvmVmType.SNP_VM if snp else KvmVmType.SEV_ES_VM if es else KvmVmType.DEFAULT_VM
    kind = VmKind.PLAIN if mode == "plain" else VmKind.SEV
    vm = hv.create_vm(name, FOUR_GIB, kind, vm_type=vm_type, vcpu_type=vcpu_type)
    pc = install_pc(vm.devices, ram=ram, chipset=chipset, cpus=len(engines), dma=vm)
    if not snp:
        # KVM_SET_CPUID2 as QEMU does it: CPUID(1).ECX[31] says "running on a hypervisor" (OVMF's
        # IoLib unrolls string I/O only then, for an SEV guest, whose memory the host cannot emulate
        # it in).  An SNP guest's CPUID comes from its CPUID page, which the firmware checks against
        # the part's own CPUID (docs/snp.md): the bit is left out there.
        a, b, c, d = hv.cpuid(1, 0)
        hv.cpuid_overrides[(1, 0)] = (a, b, c | 1 << 31, d)
    # RAM backed up front (QEMU -mem-prealloc); what the guest touches above it is backed on demand
    vm.back_range(0, ram)
    if snp:
        KvmSev(hv, vm).op(KvmSevCmdId.INIT2, KvmSevInit())
    elif es:
        hv.sev_init(vm)
    for i, engine in enumerate(engines):
        eip = BSP_RESET_EIP if i == 0 or image.ap_reset_eip is None else image.ap_reset_eip
        v = vm.add_vcpu(engine, reset_eip=eip)
        # KVM's svm_set_segment: the reset segments go into the VMCB save area (the engine's VMRUN
        # loads their hidden parts: hw/uc/reset.py)
        v.vmcb.segments = {n: HwSegment(s.selector, s.attrib, s.limit, s.base) for n, s in v.arch.segments.items()}
    if es:  # an SEV-ES guest's LAPIC accesses are #VC MMIO (a reserved-bit NPT entry), answered by the bus
        hv.add_mmio(vm, LAPIC_BASE)
    out = OvmfLaunch(vm, image, mode, pc)
    if snp:
        _snp_launch(hv, vm, image, snp_policy)
        out.policy = snp_policy
    else:
        out.policy = int(GuestPolicy.ES) if es else 0
        out.measurement = hv.launch_measure(vm, [(image.gpa, image.data)], policy=out.policy)
        if vm.sev:
            hv.launch_finish(vm)
    return out


def _convert_ghcb_on_register(hv: Hypervisor, vm: Vm) -> None:
    """QEMU's implicit conversion for the GHCB page of an SNP guest: OVMF never validates that page
    and uses it with C=0 from the start; under KVM the first such access is a memory fault that QEMU
    answers by converting the page to shared (``kvm_convert_memory``).  This model has no
    memory-attribute fault, so the VMM converts the page when the guest registers it as its GHCB
    (GHCB MSR protocol REG_GPA), before any GHCB call can name it."""
    table = hv.ghcb.msr_table
    register = table[GhcbMsrInfo.REG_GPA_REQ]

    def reg_gpa(guest: Vm, vcpu: Vcpu, msr: int) -> str | None:
        out = register(guest, vcpu, msr)
        if guest is vm and vcpu.ghcb_registered is not None:
            guest.shared_gpas.add(vcpu.ghcb_registered)
        return out

    table[GhcbMsrInfo.REG_GPA_REQ] = reg_gpa


def _snp_launch(hv: Hypervisor, vm: Vm, image: OvmfImage, policy: int) -> None:
    kvm, dev = KvmSev(hv, vm), SevDevice(hv)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=policy), sev_fd=dev)
    upd = kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(
        gfn_start=image.gpa // PAGE, uaddr=image.data, len=len(image.data), type=int(SnpPageType.NORMAL)), sev_fd=dev)
    if upd.len:
        raise InputError(f"KVM left {upd.len:#x} bytes of the flash image unprocessed")
    kinds = {OvmfSectionType.SNP_SECRETS: SnpPageType.SECRETS, OvmfSectionType.CPUID: SnpPageType.CPUID}
    for sec in image.sections:
        kind = kinds.get(sec.type, SnpPageType.ZERO)
        data = snp_cpuid_table(hv.cpuid) if kind is SnpPageType.CPUID else bytes(sec.size)
        kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(
            gfn_start=sec.gpa // PAGE, uaddr=bytearray(data), len=sec.size, type=int(kind)), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish())
    _convert_ghcb_on_register(hv, vm)
