"""Instruction semantics both vCPU engines share: what the CPU does itself for a guest instruction,
and when it leaves the guest for the hypervisor instead.

An engine recognises an instruction its own way (the Python engine receives operations; the Unicorn
engine stops on an SVM intercept, a port-I/O hook or #UD with RIP on the instruction), calls the
entry point here with the instruction's operands, and applies the :data:`Outcome`:

* :class:`Retire` -- the CPU executed the instruction: write ``regs`` (and rFLAGS.CF where the
  instruction defines it), re-read the architectural state named in ``changed``, advance RIP;
* :class:`Exit` -- #VMEXIT with that exit code and information (the instruction not executed;
  ``VMCB.next_rip`` is the engine's to set);
* :class:`Fault` -- an exception in the guest.  The engines deliver it to the guest's IDT where
  they can (the Python engine throws it into the workload); the Unicorn engine's guests have no
  IDT yet, so there it is a triple fault.

The intercept decision is made once, in :func:`exit_for`: a plain or SEV guest takes the #VMEXIT;
an SEV-ES guest takes #VC (vector 29, error code = the exit code) for every *non-automatic* exit
(APM2 15.35.4-15.35.5), and the hypervisor sees the exit only when the guest's #VC handler asks
through the GHCB with VMGEXIT.

Entry points, with the register conventions of APM3 and APM2 15.34-15.36:

| entry | operands | CPU-handled part |
|---|---|---|
| :func:`rdmsr` / :func:`wrmsr` | ECX, EDX:EAX | SEV_STATUS (read-only, never intercepted), EFER, the GHCB MSR of an SEV-ES guest, the save-area MSRs (:data:`SAVE_AREA_MSRS`) |
| :func:`cpuid` | EAX, ECX | none: intercepted (answered by the hypervisor; #VC under SEV-ES) |
| :func:`ioio` | port, size, direction | none: intercepted; #GP for an impossible encoding |
| :func:`hlt`, :func:`vmmcall` | | none: intercepted |
| :func:`vmgexit` | the GHCB MSR | SEV-ES: #VMEXIT(VMGEXIT), an automatic exit; otherwise VMMCALL |
| :func:`pvalidate` | RAX GVA, ECX size, EDX validate | SEV-SNP: the RMP update through :class:`GuestRmp`; #UD outside an SNP guest |
| :func:`rmpadjust` | RAX GVA, RCX size, RDX VMPL/permissions/VMSA | likewise |
| :func:`wbinvd` | | executed by the CPU (the model's hypervisor does not intercept it) |

How PVALIDATE plugs in (the SEV-SNP work adds ``hw/rmp.py`` implementing :class:`GuestRmp` and
gives it to the cores)::

    out = insn.pvalidate(cpu, gva=rax, size=ecx, validate=edx & 1)   # both engines call this
    # -> Fault(#UD) outside SNP; Retire(regs=(("rax", rc),), cf=...) after rmp.pvalidate(...);
    #    a guest-walk #PF or #NPF (e.g. SIZEM) propagates as for any access.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Final, Protocol

from sevemu.abi.cpuid import SevStatus
from sevemu.abi.paging import ExitCode
from sevemu.hw.faults import GeneralProtection, GuestFault, InvalidOpcode, VmmCommunication
from sevemu.hw.svm import VmExit
from sevemu.hw.x86.arch import (
    CR0_PG,
    EFER_LMA,
    EFER_LME,
    EFER_WRITABLE,
    MSR_EFER,
    MSR_GHCB,
    MSR_SEV_STATUS,
    Vector,
)
from sevemu.hw.x86.decode import ioio_info1

if TYPE_CHECKING:
    from sevemu.hw.cpu import GuestCpu

__all__ = [
    "AUTOMATIC_EXITS", "SAVE_AREA_MSRS", "Exit", "Fault", "GuestRmp", "MsrKind", "Outcome", "PvalidateRc",
    "Retire", "cpuid", "exit_for", "hlt", "ioio", "is_automatic", "msr_kind", "pvalidate", "rdmsr",
    "rmpadjust", "sev_status", "snp_active", "undefined", "vmgexit", "vmmcall", "wbinvd", "wrmsr",
]

_M32: Final = 0xFFFFFFFF


# ---- outcomes -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Retire:
    """The CPU executed the instruction (see the module docstring)."""

    regs: tuple[tuple[str, int], ...] = ()
    cf: bool | None = None
    changed: frozenset[str] = field(default_factory=frozenset)
    """Architectural state the instruction changed besides ``regs`` (``"efer"``): an engine that
    mirrors it reloads it from the save area."""

    @property
    def value(self) -> int:
        """EDX:EAX as one 64-bit value (RDMSR's result), or RAX alone."""
        r = dict(self.regs)
        return ((r.get("rdx", 0) & _M32) << 32) | (r.get("rax", 0) & _M32) if "rdx" in r else r.get("rax", 0)


@dataclass(frozen=True, slots=True)
class Exit:
    """#VMEXIT to the hypervisor."""

    exit: VmExit


@dataclass(frozen=True, slots=True)
class Fault:
    """An exception in the guest: ``vector``, its error code (None for vectors without one)."""

    vector: int
    error_code: int | None
    reason: str

    def exception(self) -> GuestFault:
        """The fault as the exception an engine throws into guest code."""
        if self.vector == Vector.GP:
            return GeneralProtection(self.reason, self.error_code or 0)
        if self.vector == Vector.UD:
            return InvalidOpcode(self.reason)
        if self.vector == Vector.VC:
            return VmmCommunication(self.error_code or 0, self.reason)
        return GuestFault(self.vector, self.error_code, self.reason)


Outcome = Retire | Exit | Fault


# ---- the intercept decision -------------------------------------------------------------------------
AUTOMATIC_EXITS: Final = frozenset({
    -4, -3, -2, int(ExitCode.INVALID),  # INVALID_PMC, IDLE_REQUIRED, BUSY, INVALID
    0x52, 0x60, 0x61, 0x62, 0x63, 0x64,  # MC, INTR, NMI, SMI, INIT, VINTR
    0x77, int(ExitCode.HLT), int(ExitCode.SHUTDOWN), 0x8F,  # PAUSE, HLT, SHUTDOWN, EFER write trap
    *range(0x90, 0xA0), 0xA5, 0xA6,  # CR0-15 write traps, BUSLOCK, IDLE_HLT
    int(ExitCode.VMGEXIT),
})
"""Exits an SEV-ES guest takes as #VMEXIT (the hardware saves its state into the VMSA); every
other intercept becomes #VC in the guest (APM2 15.35.4, "automatic exits")."""

_NPF_RSVD: Final = 1 << 3


def is_automatic(code: int, info1: int = 0) -> bool:
    """Whether exit ``code`` is automatic for an SEV-ES guest (NPF only without a reserved-bit fault)."""
    if code == ExitCode.NPF:
        return not info1 & _NPF_RSVD
    return code in AUTOMATIC_EXITS


def exit_for(cpu: GuestCpu, code: int, info1: int = 0, info2: int = 0) -> Exit | Fault:
    """An intercepted event: #VMEXIT, or #VC for a non-automatic exit of an SEV-ES guest."""
    if cpu.vmcb.sev_es_enable and not is_automatic(code, info1):
        name = VmExit(code).name
        return Fault(Vector.VC, code & ((1 << 64) - 1),
                     f"#VC (exit {name} of an SEV-ES guest goes to its own #VC handler)")
    return Exit(VmExit(code, info1, info2))


# ---- MSRs ---------------------------------------------------------------------------------------
class MsrKind(IntEnum):
    """Who answers an MSR access of a guest."""

    CPU = 0
    """The CPU itself, never intercepted (SEV_STATUS, EFER, the GHCB MSR of an SEV-ES guest)."""
    SAVE_AREA = 1
    """An MSR of the VMCB save area the hypervisor passes through (executed by the engine)."""
    INTERCEPTED = 2
    """#VMEXIT(MSR) -- what KVM's MSR permission map gives every other MSR."""


SAVE_AREA_MSRS: Final = frozenset({
    0x174, 0x175, 0x176,  # SYSENTER_CS/ESP/EIP
    0x277,  # PAT
    0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103,  # FS/GS base, KERNEL_GS_BASE, TSC_AUX
})
"""MSRs held in the VMCB save area that the model's hypervisor passes through."""


def msr_kind(cpu: GuestCpu, msr: int) -> MsrKind:
    """Who answers ``msr`` for this guest (the MSR-permission-map decision)."""
    if msr == MSR_SEV_STATUS or msr == MSR_EFER:
        return MsrKind.CPU
    if msr == MSR_GHCB and cpu.vmcb.sev_es_enable:
        return MsrKind.CPU
    if msr in SAVE_AREA_MSRS:
        return MsrKind.SAVE_AREA
    return MsrKind.INTERCEPTED


def sev_status(cpu: GuestCpu) -> int:
    """SEV_STATUS as the guest reads it (APM2 15.34.10, Table 15-32): SEV, SEV-ES, then the
    guest's SEV_FEATURES from bit 2 (SNP active, vTOM, ...) for an SEV-ES guest."""
    v = cpu.vmcb
    if not cpu.sev:
        return 0
    status = int(SevStatus.SEV_ENABLED)
    if v.sev_es_enable:
        status |= int(SevStatus.SEV_ES_ENABLED) | (cpu.state.sev_features << 2)
    return status


def snp_active(cpu: GuestCpu) -> bool:
    """Whether the guest runs with SEV-SNP (SEV_FEATURES bit 0 of an SEV-ES guest)."""
    return bool(cpu.vmcb.sev_es_enable and cpu.state.sev_features & 1)


def _edx_eax(value: int) -> Retire:
    return Retire(regs=(("rax", value & _M32), ("rdx", (value >> 32) & _M32)))


def rdmsr(cpu: GuestCpu, msr: int) -> Outcome:
    """RDMSR of ``msr`` (ECX): EDX:EAX, or the intercept."""
    kind = msr_kind(cpu, msr)
    if kind is MsrKind.CPU:
        if msr == MSR_SEV_STATUS:
            return _edx_eax(sev_status(cpu))
        if msr == MSR_EFER:
            return _edx_eax(cpu.state.efer)
        return _edx_eax(cpu.vmcb.ghcb_gpa)
    if kind is MsrKind.SAVE_AREA:
        return _edx_eax(cpu.state.msrs.get(msr, 0))
    return exit_for(cpu, ExitCode.MSR, 0)


def wrmsr(cpu: GuestCpu, msr: int, value: int) -> Outcome:
    """WRMSR of EDX:EAX to ``msr`` (ECX)."""
    value &= (1 << 64) - 1
    kind = msr_kind(cpu, msr)
    if kind is MsrKind.CPU:
        if msr == MSR_SEV_STATUS:
            return Fault(Vector.GP, 0, "WRMSR to the read-only SEV_STATUS")
        if msr == MSR_EFER:
            if value & ~(EFER_WRITABLE | EFER_LMA):
                return Fault(Vector.GP, 0, f"EFER {value:#x} sets reserved bits")
            state = cpu.state
            lma = EFER_LMA if value & EFER_LME and state.cr0 & CR0_PG else 0  # LMA is read-only
            state.efer = (value & ~EFER_LMA) | lma
            return Retire(changed=frozenset({"efer"}))
        cpu.vmcb.ghcb_gpa = value  # the GHCB MSR (SEV-ES): saved in the VMCB at #VMEXIT
        return Retire()
    if kind is MsrKind.SAVE_AREA:
        cpu.state.msrs[msr] = value
        return Retire()
    return exit_for(cpu, ExitCode.MSR, 1)


# ---- intercepted instructions ---------------------------------------------------------------------
def cpuid(cpu: GuestCpu) -> Exit | Fault:
    """CPUID (leaf in EAX, subleaf in ECX): answered by the hypervisor."""
    return exit_for(cpu, ExitCode.CPUID)


def ioio(cpu: GuestCpu, port: int, size: int, is_in: bool, next_rip: int, *, string: bool = False,
         rep: bool = False, addr_bits: int | None = None) -> Exit | Fault:
    """IN/OUT/INS/OUTS: #VMEXIT(IOIO) with EXITINFO1 and EXITINFO2 = the next RIP (APM2 15.10.2)."""
    info = ioio_info1(port, size, is_in, string, rep, addr_bits)
    if info is None:  # no IN/OUT encoding does this: a guest fault, not the hypervisor's business
        return Fault(Vector.GP, 0, f"{'IN' if is_in else 'OUT'} of {size} bytes at port {port:#x}")
    return exit_for(cpu, ExitCode.IOIO, info, next_rip)


def hlt(cpu: GuestCpu) -> Exit | Fault:
    return exit_for(cpu, ExitCode.HLT)


def vmmcall(cpu: GuestCpu) -> Exit | Fault:
    return exit_for(cpu, ExitCode.VMMCALL)


def vmgexit(cpu: GuestCpu) -> Exit | Fault:
    """VMGEXIT (``rep; vmmcall``): an automatic #VMEXIT for an SEV-ES guest, which the hypervisor
    answers from the GHCB the GHCB MSR names (``vmcb.ghcb_gpa``); VMMCALL for any other guest."""
    if cpu.vmcb.sev_es_enable:
        return Exit(VmExit(ExitCode.VMGEXIT))
    return vmmcall(cpu)


def wbinvd(cpu: GuestCpu) -> Retire:
    """WBINVD: executed by the CPU (write back and invalidate every line, whatever its domain)."""
    cpu.core.wbinvd()
    return Retire()


def undefined(name: str) -> Fault:
    """#UD: an instruction a guest of this hypervisor may not run (SVM instructions without nesting)."""
    return Fault(Vector.UD, None, f"invalid opcode: {name} in a guest")


# ---- SEV-SNP guest instructions ---------------------------------------------------------------------
class PvalidateRc(IntEnum):
    """PVALIDATE / RMPADJUST return codes in EAX (APM3; Linux arch/x86/include/asm/sev.h)."""

    SUCCESS = 0
    FAIL_INPUT = 1
    FAIL_PERMISSION = 2
    FAIL_SIZEMISMATCH = 6


class GuestRmp(Protocol):
    """What the guest's RMP instructions need of the Reverse Map Table (the SEV-SNP work's
    ``hw/rmp.py``).  Both may raise :class:`~sevemu.hw.faults.NestedPageFault` (e.g. SIZEM)."""

    def pvalidate(self, asid: int, gpa: int, spa: int, huge: bool, validate: bool) -> tuple[int, bool]:
        """Set or clear Validated; returns (EAX return code, rFLAGS.CF: nothing changed)."""
        ...

    def rmpadjust(self, asid: int, gpa: int, spa: int, huge: bool, target_vmpl: int, perms: int,
                  vmsa: bool, caller_vmpl: int = 0) -> int:
        """Set the permission mask of a VMPL less privileged than ``caller_vmpl`` (and the VMSA bit);
        returns the EAX code."""
        ...


_SIZE_ALIGN: Final = {0: 1 << 12, 1: 1 << 21}
_RMP_RETIRED: dict[tuple[int, bool], Retire] = {}
"""PVALIDATE's outcomes by (EAX, CF) (frozen: shared; a loop over 256 MiB makes the same two)."""


def _rmp_target(cpu: GuestCpu, name: str, gva: int, size: int,
                translate: Callable[[int], tuple[int, int]] | None) -> tuple[GuestRmp, int, int] | Fault | Retire:
    """Common front of PVALIDATE/RMPADJUST: #UD outside SNP, FAIL_INPUT, else (rmp, gpa, spa).
    ``translate``: the walk of the operand, (GPA, SPA) (default :meth:`GuestCpu.translate`'s; an
    engine passes its cached walker, which answers as the walk does).

    RAX names the page: its offset bits 11:0 are ignored, and only a 2 MiB request whose address is
    not 2 MiB aligned (bits 20:12 set) fails with FAIL_INPUT.  edk2 relies on it: OVMF's
    ``SevSnpIsVmpl0`` (OvmfPkg ``SnpPageStateChangeInternal.c``/SEC) runs RMPADJUST on a byte array
    at whatever address the linker gave it and treats any nonzero EAX as "not at VMPL0"."""
    rmp = cpu.core.rmp
    if not snp_active(cpu) or rmp is None:
        return Fault(Vector.UD, None, f"invalid opcode: {name} outside an SEV-SNP guest")
    align = _SIZE_ALIGN.get(size)
    if align is None or gva % align & ~0xFFF:
        return Retire(regs=(("rax", int(PvalidateRc.FAIL_INPUT)),), cf=False)
    if translate is None:
        t = cpu.translate(gva)  # #PF / #NPF propagate, as for any access
        gpa, spa = t.gpa, t.spa
    else:
        gpa, spa = translate(gva)
    return rmp, gpa & ~(align - 1), spa & ~(align - 1)


def pvalidate(cpu: GuestCpu, gva: int, size: int, validate: bool,
              translate: Callable[[int], tuple[int, int]] | None = None) -> Outcome:
    """PVALIDATE: RAX = guest VA, ECX = size (0 4 KiB, 1 2 MiB), EDX = validate (1) / rescind (0);
    result in EAX, rFLAGS.CF = 1 when the page was already in the requested state."""
    target = _rmp_target(cpu, "PVALIDATE", gva, size, translate)
    if not isinstance(target, tuple):
        return target
    if cpu.vmpl:  # only VMPL0 validates (Linux: "PVALIDATE can only be performed at VMPL0"; an SVSM does it)
        return Fault(Vector.GP, 0, f"PVALIDATE at VMPL{cpu.vmpl}")
    rmp, gpa, spa = target
    rc, unchanged = rmp.pvalidate(cpu.asid, gpa, spa, bool(size), validate)
    cpu.rmp_changed()  # a rescinded page: the translations that allowed it go
    out = _RMP_RETIRED.get((rc, unchanged))
    if out is None:
        out = _RMP_RETIRED[(rc, unchanged)] = Retire(regs=(("rax", rc),), cf=unchanged)
    return out


def rmpadjust(cpu: GuestCpu, gva: int, size: int, rdx: int) -> Outcome:
    """RMPADJUST: RAX = guest VA, RCX = size, RDX[7:0] target VMPL, [15:8] permission mask,
    [16] VMSA; result in EAX."""
    target = _rmp_target(cpu, "RMPADJUST", gva, size, None)
    if not isinstance(target, tuple):
        return target
    rmp, gpa, spa = target
    rc = rmp.rmpadjust(cpu.asid, gpa, spa, bool(size), rdx & 0xFF, (rdx >> 8) & 0xFF, bool(rdx >> 16 & 1),
                       caller_vmpl=cpu.vmpl)
    cpu.rmp_changed()
    return Retire(regs=(("rax", rc),), cf=False)
