"""x86-64 architectural constants the vCPU engines and the shared instruction semantics use.

Control registers and EFER (APM2 3.1.1, 3.1.3, 3.1.7), RFLAGS (APM2 3.1.6), exception vectors
(APM2 8.2, plus #VC from 15.35.5), the MSRs the CPU itself answers for a guest (APM2 15.34.10,
15.35.7: SEV_STATUS and the GHCB MSR), segment attributes in the VMCB's form (APM2 Appendix B).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from sevemu.abi.cpuid import Msr

__all__ = [
    "ATTR_CODE32", "ATTR_CODE64", "ATTR_DATA", "CR0_ET", "CR0_PE", "CR0_PG", "CR4_PAE", "EFER_LMA",
    "EFER_LME", "EFER_NXE", "EFER_SCE", "EFER_SVME", "EFER_WRITABLE", "MSR_EFER", "MSR_GHCB",
    "MSR_SEV_STATUS", "RFLAGS_CF", "RFLAGS_FIXED", "Vector", "exception_name",
]

CR0_PE: Final = 1 << 0
CR0_ET: Final = 1 << 4
CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5

EFER_SCE: Final = 1 << 0
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
EFER_NXE: Final = 1 << 11
EFER_SVME: Final = 1 << 12
EFER_WRITABLE: Final = EFER_SCE | EFER_LME | EFER_NXE | EFER_SVME | (1 << 14) | (1 << 15)
"""EFER bits software may set (SCE, LME, NXE, SVME, FFXSR, TCE); LMA is read-only, the rest reserved."""

RFLAGS_CF: Final = 1 << 0
RFLAGS_FIXED: Final = 1 << 1
"""RFLAGS bit 1 always reads as one."""

MSR_EFER: Final = 0xC000_0080
MSR_SEV_STATUS: Final = int(Msr.SEV_STATUS)
MSR_GHCB: Final = int(Msr.GHCB)

# segment attributes as the VMCB holds them: descriptor bits 47:40 in 7:0, bits 55:52 in 11:8
ATTR_CODE64: Final = 0xA9B  # present, DPL 0, code execute/read accessed, L=1, G=1
ATTR_CODE32: Final = 0xC9B  # same with D=1 instead of L
ATTR_DATA: Final = 0xC93  # present, DPL 0, data read/write accessed, D/B=1, G=1


class Vector(IntEnum):
    """Exception vectors (APM2 8.2; #VC: 15.35.5)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    CP = 21
    HV = 28
    VC = 29
    SX = 30


_NAMES: Final = {
    Vector.DE: "divide error", Vector.DB: "debug", Vector.BP: "breakpoint", Vector.OF: "overflow",
    Vector.BR: "bound range", Vector.UD: "invalid opcode", Vector.NM: "device not available",
    Vector.DF: "double fault", Vector.TS: "invalid TSS", Vector.NP: "segment not present",
    Vector.SS: "stack fault", Vector.GP: "general protection", Vector.PF: "page fault",
    Vector.MF: "x87 error", Vector.AC: "alignment check", Vector.MC: "machine check",
    Vector.XM: "SIMD error", Vector.CP: "control protection", Vector.HV: "hypervisor injection",
    Vector.VC: "VMM communication", Vector.SX: "security exception",
}


def exception_name(vector: int) -> str:
    """``"#UD (invalid opcode)"`` for a known vector, ``"NMI"`` for 2, ``"INT 0x..."`` otherwise."""
    if vector == Vector.NMI:
        return "NMI"
    try:
        v = Vector(vector)
    except ValueError:
        return f"INT {vector:#x}"
    return f"#{v.name} ({_NAMES[v]})"
