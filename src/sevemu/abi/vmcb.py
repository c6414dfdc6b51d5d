"""The VMCB control-area fields SEV, SEV-ES and SEV-SNP use, the SVM #VMEXIT codes and the SEV-ES
automatic exits (APM2 15.35 and 15.36, Appendix B Table B-1 and Appendix C; Linux
``arch/x86/include/asm/svm.h`` ``struct vmcb_control_area`` and ``arch/x86/include/uapi/asm/svm.h``).

Constants only: :mod:`sevemu.hw.svm` lays the VMCB page out with these offsets (``encode_vmcb`` /
``decode_vmcb``; :class:`VmcbSave` for the save area from 0x400).  :class:`sevemu.abi.paging.ExitCode` is the subset of
exit codes the basic VMEXIT model produces; :class:`SvmExit` here is the full list.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu.abi.struct import Struct, bit, bits, layout

__all__ = [
    "ALLOWED_SEV_FEATURES_VALID",
    "AUTOMATIC_EXITS",
    "VMCB_CONTROL_AREA_SIZE",
    "VMCB_SAVE_AREA_OFFSET",
    "IoioExitInfo",
    "MiscCtl",
    "MiscCtl2",
    "SvmExit",
    "VmcbControl",
    "VmcbSave",
    "is_automatic_exit",
]

VMCB_CONTROL_AREA_SIZE: Final = 0x400
VMCB_SAVE_AREA_OFFSET: Final = 0x400
"""Where the (host) save area starts in the VMCB page; SEV-ES guest state lives in the VMSA instead."""


class VmcbControl(IntEnum):
    """Byte offsets in the VMCB control area (Linux ``vmcb_control_area``; APM2 Table B-1)."""

    INTERCEPT_CR = 0x000
    INTERCEPT_DR = 0x004
    INTERCEPT_EXCEPTION = 0x008
    INTERCEPT_WORD3 = 0x00C
    INTERCEPT_WORD4 = 0x010
    INTERCEPT_WORD5 = 0x014
    PAUSE_FILTER_THRESH = 0x03C
    PAUSE_FILTER_COUNT = 0x03E
    IOPM_BASE_PA = 0x040
    MSRPM_BASE_PA = 0x048
    TSC_OFFSET = 0x050
    ASID = 0x058
    TLB_CTL = 0x05C
    INT_CTL = 0x060
    INT_VECTOR = 0x064
    INT_STATE = 0x068
    EXITCODE = 0x070
    EXITINFO1 = 0x078
    EXITINFO2 = 0x080
    EXITINTINFO = 0x088
    MISC_CTL = 0x090
    """:class:`MiscCtl`: nested paging, SEV, SEV-ES enables."""
    AVIC_VAPIC_BAR = 0x098
    GHCB_GPA = 0x0A0
    """The guest's GHCB MSR, saved and restored by hardware for an SEV-ES guest."""
    EVENTINJ = 0x0A8
    NESTED_CR3 = 0x0B0
    MISC_CTL2 = 0x0B8
    """:class:`MiscCtl2`: LBR virtualization (required for SEV-ES)."""
    VMCB_CLEAN = 0x0C0
    NEXT_RIP = 0x0C8
    INSN_LEN = 0x0D0
    INSN_BYTES = 0x0D1
    """15 bytes; never filled for an SEV-ES guest."""
    AVIC_BACKING_PAGE = 0x0E0
    AVIC_LOGICAL_ID = 0x0F0
    AVIC_PHYSICAL_ID = 0x0F8
    VMSA_PA = 0x108
    """System-physical address of the SEV-ES / SNP guest's VMSA."""
    VMGEXIT_RAX = 0x110
    """VmgexitParameter feature: RAX at VMGEXIT (APM2 15.35)."""
    VMGEXIT_CPL = 0x118
    BUS_LOCK_COUNTER = 0x120
    ALLOWED_SEV_FEATURES = 0x138
    """Bit 63 (:data:`ALLOWED_SEV_FEATURES_VALID`) enables the check of the VMSA's SEV_FEATURES."""
    GUEST_SEV_FEATURES = 0x140
    """The guest's SEV_FEATURES, written on #VMEXIT."""
    RESERVED_SW = 0x3E0
    """32 bytes for the hypervisor's own use."""


class VmcbSave(IntEnum):
    """Byte offsets in the VMCB save area, from :data:`VMCB_SAVE_AREA_OFFSET` (Linux ``vmcb_save_area``;
    APM2 Table B-2).  Segments are ``vmcb_seg``: selector u16, attrib u16, limit u32, base u64."""

    ES = 0x000
    CS = 0x010
    SS = 0x020
    DS = 0x030
    FS = 0x040
    GS = 0x050
    GDTR = 0x060
    LDTR = 0x070
    IDTR = 0x080
    TR = 0x090
    VMPL = 0x0CA
    CPL = 0x0CB
    EFER = 0x0D0
    CR4 = 0x148
    CR3 = 0x150
    CR0 = 0x158
    DR7 = 0x160
    DR6 = 0x168
    RFLAGS = 0x170
    RIP = 0x178
    RSP = 0x1D8
    RAX = 0x1F8
    STAR = 0x200
    LSTAR = 0x208
    CSTAR = 0x210
    SFMASK = 0x218
    KERNEL_GS_BASE = 0x220
    SYSENTER_CS = 0x228
    SYSENTER_ESP = 0x230
    SYSENTER_EIP = 0x238
    CR2 = 0x240
    G_PAT = 0x268


class MiscCtl(IntFlag):
    """VMCB 0x090 (Linux ``SVM_MISC_ENABLE_*``; VTE from APM2 15.34)."""

    NP_ENABLE = 1 << 0
    SEV_ENABLE = 1 << 1
    SEV_ES_ENABLE = 1 << 2
    VTE = 1 << 5


class MiscCtl2(IntFlag):
    """VMCB 0x0B8 (Linux ``SVM_MISC2_ENABLE_*``)."""

    V_LBR = 1 << 0
    V_VMLOAD_VMSAVE = 1 << 1


ALLOWED_SEV_FEATURES_VALID: Final = 1 << 63


class SvmExit(IntEnum):
    """#VMEXIT codes (APM2 Appendix C; Linux ``SVM_EXIT_*``); negative ones are all-ones encodings."""

    READ_DR7 = 0x027
    WRITE_DR7 = 0x037
    EXCP_BASE = 0x040
    MC = 0x052
    INTR = 0x060
    NMI = 0x061
    SMI = 0x062
    INIT = 0x063
    VINTR = 0x064
    RDTSC = 0x06E
    RDPMC = 0x06F
    CPUID = 0x072
    INVD = 0x076
    PAUSE = 0x077
    HLT = 0x078
    IOIO = 0x07B
    MSR = 0x07C
    SHUTDOWN = 0x07F
    VMRUN = 0x080
    VMMCALL = 0x081
    RDTSCP = 0x087
    WBINVD = 0x089
    MONITOR = 0x08A
    MWAIT = 0x08B
    XSETBV = 0x08D
    EFER_WRITE_TRAP = 0x08F
    CR0_WRITE_TRAP = 0x090
    CR4_WRITE_TRAP = 0x094
    CR8_WRITE_TRAP = 0x098
    CR15_WRITE_TRAP = 0x09F
    BUSLOCK = 0x0A5
    IDLE_HLT = 0x0A6
    NPF = 0x400
    AVIC_INCOMPLETE_IPI = 0x401
    AVIC_UNACCELERATED_ACCESS = 0x402
    VMGEXIT = 0x403
    INVALID = -1
    BUSY = -2
    IDLE_REQUIRED = -3
    INVALID_PMC = -4


_AUTOMATIC: Final = {
    SvmExit.MC, SvmExit.INTR, SvmExit.NMI, SvmExit.SMI, SvmExit.INIT, SvmExit.VINTR, SvmExit.PAUSE,
    SvmExit.HLT, SvmExit.SHUTDOWN, SvmExit.EFER_WRITE_TRAP, SvmExit.BUSLOCK, SvmExit.IDLE_HLT,
    SvmExit.NPF, SvmExit.VMGEXIT, SvmExit.INVALID, SvmExit.BUSY, SvmExit.IDLE_REQUIRED, SvmExit.INVALID_PMC,
}
AUTOMATIC_EXITS: Final = frozenset(int(c) for c in _AUTOMATIC) | frozenset(range(0x090, 0x0A0))
"""Exit codes that are automatic exits (AE) for an SEV-ES guest (APM2 15.35): hardware saves the state
and the hypervisor sees only the code.  Every other intercepted event is non-automatic and raises #VC
in the guest.  NPF is automatic only without a reserved-bit fault: see :func:`is_automatic_exit`."""

_PF_RSVD: Final = 1 << 3


def is_automatic_exit(code: int, exitinfo1: int = 0) -> bool:
    """Whether exit ``code`` is an automatic exit for an SEV-ES guest; an NPF whose EXITINFO1 has the
    reserved-bit flag (MMIO marked in the nested page table) is non-automatic and becomes #VC."""
    if code == SvmExit.NPF:
        return not exitinfo1 & _PF_RSVD
    return code in AUTOMATIC_EXITS


@layout(size=8)
class IoioExitInfo(Struct):
    """EXITINFO1 of an IOIO intercept (APM2 15.10.2); also SW_EXITINFO1 of the GHCB IOIO event.

    ``type_in``: 1 for IN; ``sz8``/``sz16``/``sz32`` and ``a16``/``a32``/``a64`` are one-hot sizes.
    """

    type_in: bool = bit(0)
    str: bool = bit(2)
    rep: bool = bit(3)
    sz8: bool = bit(4)
    sz16: bool = bit(5)
    sz32: bool = bit(6)
    a16: bool = bit(7)
    a32: bool = bit(8)
    a64: bool = bit(9)
    seg: int = bits(12, 10)
    port: int = bits(31, 16)
