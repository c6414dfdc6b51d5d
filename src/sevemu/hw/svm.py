"""SVM state the hypervisor hands to VMRUN: the VMCB (control and save areas) and the exit record.

The VMCB is modelled field by field with the names of Linux ``struct vmcb_control_area`` /
``vmcb_save_area`` (reference 2.1), not yet as bytes in memory: a plain SEV guest's register state is
visible to the hypervisor anyway.  SEV-ES moves the save area into the encrypted VMSA page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sevemu.abi.paging import ExitCode

__all__ = ["GPRS", "TlbControl", "VmExit", "Vmcb"]

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class TlbControl:
    """VMCB TLB_CONTROL values (APM 15.16.1)."""

    DO_NOTHING = 0
    FLUSH_ALL = 1
    FLUSH_ASID = 3


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
    # save area
    cr0: int = 0x10  # ET; PG clear: the vCPU starts with paging off
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    rip: int = 0
    rflags: int = 0x2
    regs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GPRS, 0))

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
