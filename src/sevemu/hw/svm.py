"""SVM state the hypervisor hands to VMRUN: the VMCB (control and save areas) and the exit record.

The VMCB is modelled field by field with the names of Linux ``struct vmcb_control_area`` /
``vmcb_save_area`` (Linux arch/x86/include/asm/svm.h; APM2 Appendix B), not yet as bytes in memory:
a plain SEV guest's register state is visible to the hypervisor anyway.  For an SEV-ES guest
(``sev_es_enable``) the save fields below are the hypervisor's and unused: VMRUN loads the guest's
registers from the VMSA page at ``vmsa_pa`` and #VMEXIT stores them there (:mod:`sevemu.hw.vmsa`).

The engines read and write a guest's registers through :class:`SaveState`, not through the VMCB
itself: for a plain or SEV guest the save state *is* the VMCB's save area (:class:`Vmcb`
implements it); SEV-ES moves it into the encrypted VMSA page, which VMRUN decrypts inside the SoC
and #VMEXIT encrypts back (APM2 15.35.8): the engines get a :class:`~sevemu.hw.vmsa.VmsaState` made
from the VMSA while the control area stays in the VMCB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sevemu.abi.paging import ExitCode

__all__ = ["GPRS", "SEGMENT_NAMES", "SaveState", "Segment", "TlbControl", "VmExit", "Vmcb"]

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
