"""SVM state the hypervisor hands to VMRUN: the VMCB (control and save areas) and the exit record.

The VMCB is a 4 KiB page of host memory (:attr:`Vmcb.pa`, allocated by the hypervisor; APM2 Appendix B,
Linux arch/x86/include/asm/svm.h ``struct vmcb``: control area at 0, save area at 0x400).
:func:`encode_vmcb` / :func:`decode_vmcb` give the page's bytes for the fields the model has (offsets
:class:`~sevemu.abi.vmcb.VmcbControl` / :class:`~sevemu.abi.vmcb.VmcbSave`; every other byte zero).
:class:`Vmcb` is the decoded view: the hypervisor's mapping of the page and the CPU's copy of it
(the processor caches VMCB state between VMRUNs, APM2 15.15 "VMCB clean bits").  :class:`VmcbCache`
keeps the view coherent with memory as a private write-back level does: any host read of the page (a
core's load, the PSP's or a device's DMA) gets the view's bytes written back first; any host write or
flush of it drops the view, and the next VMRUN decodes the page from memory -- so the bytes in memory
are what VMRUN runs and what #VMEXIT left, while an unchanged page costs VMRUN no read and no decode.
Model choices: GPRs other than RAX and RSP are not in the VMCB (KVM loads them into the CPU around
VMRUN, ``__svm_vcpu_run``): the view keeps them in ``regs``; SEV_FEATURES is kept at GUEST_SEV_FEATURES
(0x140); a segment whose 16 bytes are zero is "absent" (the flat segment of the mode).

:func:`vmrun_checks` is the one place VMRUN's checks live (consistency, the VMCB page, the SNP VMSA);
both engines' VMRUN (:meth:`sevemu.hw.cpu.Core.vmrun`) go through it.

For an SEV-ES guest
(``sev_es_enable``) the save fields below are the hypervisor's and unused: VMRUN loads the guest's
registers from the VMSA page at ``vmsa_pa`` and #VMEXIT stores them there (:mod:`sevemu.hw.vmsa`).

The engines read and write a guest's registers through :class:`SaveState`, not through the VMCB
itself: for a plain or SEV guest the save state *is* the VMCB's save area (:class:`Vmcb`
implements it); SEV-ES moves it into the encrypted VMSA page, which VMRUN decrypts inside the SoC
and #VMEXIT encrypts back (APM2 15.35.8): the engines get a :class:`~sevemu.hw.vmsa.VmsaState` made
from the VMSA while the control area stays in the VMCB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from sevemu._util.units import PAGE
from sevemu.abi.paging import ExitCode
from sevemu.abi.vmcb import VMCB_SAVE_AREA_OFFSET, MiscCtl, VmcbControl, VmcbSave
from sevemu.hw.cache import Cache
from sevemu.hw.faults import GeneralProtection

if TYPE_CHECKING:
    from sevemu.hw.profiles import CpuProfile
    from sevemu.hw.rmp import Rmp

__all__ = ["GPRS", "SEGMENT_NAMES", "SaveState", "Segment", "TlbControl", "VmExit", "Vmcb", "VmcbCache",
           "decode_vmcb", "encode_vmcb", "vmrun_checks"]

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
"""The segment registers of the save area, in its order (Linux ``struct vmcb_save_area``)."""


class TlbControl:
    """VMCB TLB_CONTROL values (APM2 15.16.1)."""

    DO_NOTHING = 0
    FLUSH_ALL = 1
    FLUSH_ASID = 3


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register as the save area holds it (``struct vmcb_seg``): selector, attributes
    (descriptor bits 47:40 in 7:0 and 55:52 in 11:8), limit and base -- the hidden part included,
    which is how a vCPU starts in real mode with CS base 0xFFFF0000 (APM2 14.1.3)."""

    selector: int
    attrib: int
    limit: int
    base: int


class SaveState(Protocol):
    """The guest register state an engine loads at VMRUN and stores at #VMEXIT."""

    regs: dict[str, int]
    rip: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    sev_features: int
    segments: dict[str, Segment]
    msrs: dict[int, int]


@dataclass(slots=True)
class Vmcb:
    """One virtual CPU's VMCB: what the hypervisor sets before VMRUN and reads after #VMEXIT."""

    # control area
    asid: int = 0
    np_enable: bool = True
    sev_enable: bool = False
    sev_es_enable: bool = False
    ncr3: int = 0
    tlb_control: int = TlbControl.DO_NOTHING
    exit_code: int = 0
    exit_info1: int = 0
    exit_info2: int = 0
    next_rip: int = 0
    ghcb_gpa: int = 0
    """GHCB_GPA (0xA0): the guest's GHCB MSR, saved at #VMEXIT and loaded at VMRUN (SEV-ES)."""
    vmsa_pa: int = 0
    """VMSA pointer (0x108): system-physical address of an SEV-ES guest's VMSA page, which holds its
    save state instead of this VMCB's save area (:mod:`sevemu.hw.vmsa`)."""
    # save area
    cr0: int = 0x10  # ET; PG clear: the vCPU starts with paging off
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    rip: int = 0
    rflags: int = 0x2
    regs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPRS, 0))
    segments: dict[str, Segment] = field(default_factory=dict)
    """Segment registers by name (:data:`SEGMENT_NAMES`); those absent are the flat segments of
    the mode CR0/EFER describe (what the bundled guests start with)."""
    sev_features: int = 0
    """SEV_FEATURES (VMSA 0x3B0; bit 0 = SNP active): meaningful for SEV-ES guests only."""
    msrs: dict[int, int] = field(default_factory=dict)
    """Save-area MSRs the hypervisor passes through (STAR, LSTAR, PAT, ...) as the Python engine
    keeps them; the Unicorn engine keeps them in its own CPU state."""
    pa: int = 0
    """System-physical address of the VMCB page (VMRUN's RAX); 0: a view not placed in memory (engine
    unit tests), which VMRUN refuses with #GP once SEV-SNP is enabled."""

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & (1 << 31))


@dataclass(frozen=True, slots=True)
class VmExit:
    """What #VMEXIT reported: exit code and the two exit-information words."""

    code: int
    info1: int = 0
    info2: int = 0

    @property
    def name(self) -> str:
        name = _EXIT_NAMES.get(self.code)
        return name if name is not None else f"0x{self.code:x}"


_EXIT_NAMES: dict[int, str] = {int(c): c.name for c in ExitCode}


# ---- the page ------------------------------------------------------------------------------------------
_S = VMCB_SAVE_AREA_OFFSET
_SEG: Final = struct.Struct("<HHIQ")
_U64: Final = struct.Struct("<Q")
_MSR_SLOTS: Final = (
    (0xC000_0081, VmcbSave.STAR), (0xC000_0082, VmcbSave.LSTAR), (0xC000_0083, VmcbSave.CSTAR),
    (0xC000_0084, VmcbSave.SFMASK), (0xC000_0102, VmcbSave.KERNEL_GS_BASE), (0x174, VmcbSave.SYSENTER_CS),
    (0x175, VmcbSave.SYSENTER_ESP), (0x176, VmcbSave.SYSENTER_EIP), (0x277, VmcbSave.G_PAT),
)
"""MSRs with a save-area slot (MSR number, offset)."""
_M64: Final = (1 << 64) - 1
_U64_FIELDS: Final = (
    (VmcbControl.EXITINFO1, "exit_info1"), (VmcbControl.EXITINFO2, "exit_info2"), (VmcbControl.GHCB_GPA, "ghcb_gpa"),
    (VmcbControl.NESTED_CR3, "ncr3"), (VmcbControl.NEXT_RIP, "next_rip"), (VmcbControl.VMSA_PA, "vmsa_pa"),
    (VmcbControl.GUEST_SEV_FEATURES, "sev_features"), (_S + VmcbSave.EFER, "efer"), (_S + VmcbSave.CR4, "cr4"),
    (_S + VmcbSave.CR3, "cr3"), (_S + VmcbSave.CR0, "cr0"), (_S + VmcbSave.RFLAGS, "rflags"),
    (_S + VmcbSave.RIP, "rip"),
)


def encode_vmcb(v: Vmcb) -> bytearray:
    """The 4 KiB page holding ``v`` (module docstring for what is where)."""
    page = bytearray(PAGE)
    pack = _U64.pack_into
    page[VmcbControl.ASID : VmcbControl.ASID + 4] = (v.asid & 0xFFFF_FFFF).to_bytes(4, "little")
    page[VmcbControl.TLB_CTL] = v.tlb_control & 0xFF
    pack(page, VmcbControl.EXITCODE, v.exit_code & _M64)
    misc = ((MiscCtl.NP_ENABLE if v.np_enable else 0) | (MiscCtl.SEV_ENABLE if v.sev_enable else 0)
            | (MiscCtl.SEV_ES_ENABLE if v.sev_es_enable else 0))
    pack(page, VmcbControl.MISC_CTL, int(misc))
    for off, name in _U64_FIELDS:
        pack(page, off, getattr(v, name) & _M64)
    pack(page, _S + VmcbSave.RSP, v.regs.get("rsp", 0) & _M64)
    pack(page, _S + VmcbSave.RAX, v.regs.get("rax", 0) & _M64)
    for msr, off in _MSR_SLOTS:
        pack(page, _S + off, v.msrs.get(msr, 0) & _M64)
    for i, name in enumerate(SEGMENT_NAMES):
        seg = v.segments.get(name)
        if seg is not None:
            _SEG.pack_into(page, _S + 16 * i, seg.selector & 0xFFFF, seg.attrib & 0xFFFF, seg.limit & 0xFFFF_FFFF,
                           seg.base & _M64)
    return page


def decode_vmcb(page: bytes | bytearray, v: Vmcb) -> None:
    """Load ``v`` from the VMCB ``page`` (the inverse of :func:`encode_vmcb` for every field it writes;
    GPRs other than RAX / RSP and MSRs without a slot are left as they are)."""
    unpack = _U64.unpack_from
    v.asid = int.from_bytes(page[VmcbControl.ASID : VmcbControl.ASID + 4], "little")
    v.tlb_control = page[VmcbControl.TLB_CTL]
    code = unpack(page, VmcbControl.EXITCODE)[0]
    v.exit_code = code - (1 << 64) if code >> 63 else code
    misc = unpack(page, VmcbControl.MISC_CTL)[0]
    v.np_enable = bool(misc & MiscCtl.NP_ENABLE)
    v.sev_enable = bool(misc & MiscCtl.SEV_ENABLE)
    v.sev_es_enable = bool(misc & MiscCtl.SEV_ES_ENABLE)
    for off, name in _U64_FIELDS:
        setattr(v, name, unpack(page, off)[0])
    v.regs["rsp"] = unpack(page, _S + VmcbSave.RSP)[0]
    v.regs["rax"] = unpack(page, _S + VmcbSave.RAX)[0]
    for msr, off in _MSR_SLOTS:
        value = unpack(page, _S + off)[0]
        if value or msr in v.msrs:
            v.msrs[msr] = value
    for i, name in enumerate(SEGMENT_NAMES):
        raw = _SEG.unpack_from(page, _S + 16 * i)
        if any(raw):
            v.segments[name] = Segment(*raw)
        else:
            v.segments.pop(name, None)


class VmcbCache:
    """The SoC's copies of VMCB pages (module docstring), kept coherent with the host's accesses: the
    cores' host loads and stores, streaming and DMA (:meth:`touch`, called by them when the range meets
    a held page -- two comparisons otherwise).  Every held view counts as modified (the hypervisor
    writes it directly), so any access to its page writes it back first.  Model choice: guest accesses
    are not snooped (a VMCB page is never mapped into a guest by a correct hypervisor; on hardware the
    VMCB is the hypervisor's, cached by the CPU) -- so keeping VMCBs costs the guests' memory path nothing."""

    __slots__ = ("_cache", "_held", "decodes", "hi", "lo", "view")

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._held: dict[int, Vmcb] = {}
        self.view = self._held.get
        """view(pa): the view held for the page at ``pa`` (None: VMRUN decodes the page, :meth:`load`)."""
        self.lo = 1 << 64
        """Lowest SPA of a held page (accesses below :attr:`hi` and ending above it may touch one)."""
        self.hi = 0
        self.decodes = 0
        """VMRUNs that had to decode their VMCB page from memory (someone wrote it since)."""

    def hold(self, vmcb: Vmcb) -> None:
        """The hypervisor made ``vmcb`` the view of its page (KVM's mapping after it initialised the
        VMCB): the view is the page's newest contents from now on."""
        pa = vmcb.pa
        if pa % PAGE or pa <= 0:
            raise GeneralProtection(f"VMCB address {pa:#x} is not a page")
        prev = self._held.get(pa)
        if prev is not None and prev is not vmcb:
            self._write_back(pa, prev)
        self._held[pa] = vmcb
        self._bounds()

    def drop(self, vmcb: Vmcb) -> None:
        """The hypervisor freed the page: the view is written back and forgotten."""
        if self._held.get(vmcb.pa) is vmcb:
            self._write_back(vmcb.pa, vmcb)
            del self._held[vmcb.pa]
            self._bounds()

    def load(self, vmcb: Vmcb) -> None:
        """VMRUN of the VMCB at ``vmcb.pa``: the view is made what memory holds, unless it already is."""
        pa = vmcb.pa
        held = self._held.get(pa)
        if held is vmcb:
            return
        if held is not None:
            self._write_back(pa, held)
        self.decodes += 1
        decode_vmcb(self._cache.read_lines(0, False, pa, PAGE), vmcb)
        self.hold(vmcb)

    def held(self, pa: int) -> bool:
        """Whether the page at ``pa`` has a view (VMRUN runs it without reading memory)."""
        return pa in self._held

    def touch(self, spa: int, length: int, write: bool) -> None:
        """Someone else reads ``[spa, spa+length)`` (held views there are written back first) or writes
        or flushes it (written back, then dropped: the next VMRUN decodes the page again)."""
        end = spa + max(length, 1)
        if end <= self.lo or spa >= self.hi:
            return
        held = self._held
        for pa in [p for p in held if p < end and p + PAGE > spa]:
            self._write_back(pa, held[pa])
            if write:
                del held[pa]
        if write:
            self._bounds()

    def _bounds(self) -> None:
        held = self._held
        self.lo = min(held, default=1 << 64)
        self.hi = max(held, default=-PAGE) + PAGE

    def _write_back(self, pa: int, vmcb: Vmcb) -> None:
        self._cache.write_lines(0, False, pa, encode_vmcb(vmcb))


# ---- VMRUN's checks ------------------------------------------------------------------------------------
_SNP_ACTIVE: Final = 1


def vmrun_checks(vmcb: Vmcb, profile: CpuProfile, rmp: Rmp | None, asid_valid: bool, dram_size: int) -> str | None:
    """The checks VMRUN makes on the (loaded) VMCB (APM2 15.5.1, 15.34.3, 15.35.8, 15.36.12, Table 15-41),
    in the model's order: why VMRUN must fail with VMEXIT_INVALID, or None.  ``rmp``: the RMP once
    SYSCFG.SNP_EN is set (else None); ``asid_valid``: the memory controller has a key for the ASID that
    the PSP has not invalidated.  The VMCB page's own check comes before it is read
    (:meth:`sevemu.hw.cpu.Core.vmrun`, the entry point).  Cheap: a few comparisons, and with SNP
    one RMP entry for the VMSA."""
    snp_en = rmp is not None
    asid = vmcb.asid
    if asid == 0 or asid > (1 << 15):
        return f"ASID {asid} is not a guest ASID"
    if not vmcb.sev_enable:
        return None
    if not vmcb.np_enable or asid > profile.max_asid:
        return f"SEV needs nested paging and an ASID up to {profile.max_asid}"
    if vmcb.sev_es_enable != (asid < profile.min_sev_asid):
        return f"ASID {asid} is not in the {'SEV-ES' if vmcb.sev_es_enable else 'SEV'} range"
    if not asid_valid:
        return f"ASID {asid} has no valid key (DEACTIVATE, SHUTDOWN or never ACTIVATEd)"
    if not vmcb.sev_es_enable:
        return None
    vmsa = vmcb.vmsa_pa
    if vmsa & 0xFFF or not 0 < vmsa < dram_size:
        return f"VMSA pointer {vmsa:#x} is not a page of DRAM"
    if vmcb.sev_features & _SNP_ACTIVE:
        if not snp_en:
            return "an SNP-active guest needs SYSCFG.SNP_EN"
        assert rmp is not None
        return rmp.vmsa_check(asid, vmsa)
    if snp_en:
        assert rmp is not None
        return rmp.hv_page_check(vmsa, "the VMSA of a guest that is not SNP-active")
    return None
