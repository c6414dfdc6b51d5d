"""The SEV-ES Guest-Hypervisor Communication Block: the GHCB page and its valid bitmap, the GHCB MSR
protocol, the VMGEXIT (NAE) exit codes, the page-state-change descriptor, GHCB error codes and
termination reasons (GHCB 56421; Linux ``arch/x86/include/asm/svm.h`` ``struct ghcb``,
``arch/x86/include/asm/sev-common.h`` ``GHCB_MSR_*``, ``arch/x86/include/uapi/asm/svm.h``
``SVM_VMGEXIT_*``, ``arch/x86/include/asm/sev.h``, ``include/uapi/linux/sev-guest.h``).

Decisions where the sources are silent (change them here):

* Reserved bytes of the GHCB page are *ignored*, not must-be-zero: the hypervisor reads only the
  fields the valid bitmap marks (Linux KVM copies those and looks at nothing else).
* The GHCB MSR values are bit layouts (:class:`MsrCpuidReq`, ...): bits a request or response does
  not define must be zero.  The AP_RESET_HOLD data field and the REG_GPA_RESP failure encoding are
  taken as "data [63:12]" (unconfirmed); hypervisor feature bits above 1 are not named.
* The page-state-change operations PSMASH (3) and UNSMASH (4) come from a third-party GHCB header
  and KVM's comments only.
* The valid bitmap covers the save-area quadwords at 0x000..0x3FF (bit n = quadword at 8n);
  ``x87_state_gpa`` (0x400) has no valid bit.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu._util.units import PAGE
from sevemu.abi.struct import Struct, array, bits, layout, nested, raw, u8, u16, u32, u64
from sevemu.errors import LayoutError

__all__ = [
    "GHCB_DEFAULT_USAGE",
    "GHCB_MSR_INFO_MASK",
    "GHCB_MSR_LAYOUTS",
    "GHCB_PROTOCOL_MAX",
    "GHCB_PROTOCOL_MIN",
    "GHCB_SHARED_BUF_SIZE",
    "GHCB_VALID_BITS",
    "GUEST_VMM_ERR_SHIFT",
    "INSN_VMGEXIT",
    "PSC_MAX_ENTRY",
    "VC_PAGE_NOT_VALIDATED",
    "VC_VECTOR",
    "ApCreationInfo",
    "ApCreationOp",
    "ApJumpTableOp",
    "Ghcb",
    "GhcbError",
    "GhcbMsrInfo",
    "GuestRequestVmmError",
    "HvFeature",
    "LinuxTermReason",
    "MsrApResetHoldReq",
    "MsrApResetHoldResp",
    "MsrCpuidReq",
    "MsrCpuidResp",
    "MsrHvFtReq",
    "MsrHvFtResp",
    "MsrPscReq",
    "MsrPscResp",
    "MsrRegGpaReq",
    "MsrRegGpaResp",
    "MsrSevInfoReq",
    "MsrSevInfoResp",
    "MsrTermReq",
    "MsrVmplReq",
    "MsrVmplResp",
    "PscDesc",
    "PscEntry",
    "PscHeader",
    "PscOp",
    "SwExitCode",
    "SwExitInfo1Result",
    "TermReasonGeneral",
    "TermReasonSet",
    "TermRequestInfo",
    "decode_ghcb_msr",
    "valid_bitmap",
    "valid_fields",
]

GHCB_PROTOCOL_MIN: Final = 1
GHCB_PROTOCOL_MAX: Final = 2
GHCB_DEFAULT_USAGE: Final = 0
GHCB_SHARED_BUF_SIZE: Final = 2032
INSN_VMGEXIT: Final = bytes.fromhex("f30f01d9")
"""VMGEXIT is ``rep; vmmcall``; outside an SEV-ES guest it behaves as VMMCALL."""
VC_VECTOR: Final = 29
"""#VC, the VMM communication exception; its error code is the exit code (:class:`SwExitCode`)."""
VC_PAGE_NOT_VALIDATED: Final = 0x404
"""#VC error code of an SNP guest access to a page whose RMP entry is not validated."""
GUEST_VMM_ERR_SHIFT: Final = 32
"""Guest requests: SW_EXITINFO2[31:0] is the firmware status, [63:32] a :class:`GuestRequestVmmError`."""


# --- the GHCB page -------------------------------------------------------------------------------

# Reserved ranges of struct ghcb (Linux names them reserved_0x..): ignored, see the module docstring.
_GHCB_IGNORED: Final = (
    (0x000, 0xCB), (0x0CC, 0x74), (0x148, 0x18), (0x168, 0x10), (0x180, 0x58), (0x1E0, 0x18),
    (0x200, 0x108), (0x320, 0x08), (0x380, 0x10), (0x3B0, 0x38), (0x408, 0x3F8), (0xFF0, 0x0A),
)


@layout(size=PAGE, ignored=_GHCB_IGNORED)
class Ghcb(Struct):
    """The GHCB page the guest shares with the hypervisor (Linux ``struct ghcb``).

    The register fields sit at their VMSA offsets; a field is meaningful only when its bit is set in
    ``valid_bitmap`` (:meth:`is_valid`, :func:`valid_bitmap`).
    """

    cpl: int = u8(0x0CB)
    xss: int = u64(0x140)
    dr7: int = u64(0x160)
    rip: int = u64(0x178)
    rsp: int = u64(0x1D8)
    rax: int = u64(0x1F8)
    rcx: int = u64(0x308)
    rdx: int = u64(0x310)
    rbx: int = u64(0x318)
    rbp: int = u64(0x328)
    rsi: int = u64(0x330)
    rdi: int = u64(0x338)
    r8: int = u64(0x340)
    r9: int = u64(0x348)
    r10: int = u64(0x350)
    r11: int = u64(0x358)
    r12: int = u64(0x360)
    r13: int = u64(0x368)
    r14: int = u64(0x370)
    r15: int = u64(0x378)
    sw_exit_code: int = u64(0x390)
    sw_exit_info_1: int = u64(0x398)
    sw_exit_info_2: int = u64(0x3A0)
    sw_scratch: int = u64(0x3A8)
    xcr0: int = u64(0x3E8)
    valid_bitmap: bytes = raw(0x3F0, 16)
    x87_state_gpa: int = u64(0x400)
    shared_buffer: bytes = raw(0x800, GHCB_SHARED_BUF_SIZE)
    protocol_version: int = u16(0xFFA)
    ghcb_usage: int = u32(0xFFC)

    def is_valid(self, name: str) -> bool:
        """Whether the valid bitmap marks field ``name``."""
        return name in valid_fields(self.valid_bitmap)


GHCB_VALID_BITS: Final = {
    n: Ghcb.offset_of(n) // 8
    for n in ("cpl", "xss", "dr7", "rip", "rsp", "rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "sw_exit_code", "sw_exit_info_1",
              "sw_exit_info_2", "sw_scratch", "xcr0")
}
"""Valid-bitmap bit of each GHCB save-area field: offset / 8 (Linux ``GHCB_BITMAP_IDX``)."""


def valid_bitmap(*names: str) -> bytes:
    """The 16-byte valid bitmap marking fields ``names``."""
    value = 0
    for n in names:
        if n not in GHCB_VALID_BITS:
            raise LayoutError(f"Ghcb has no field {n!r} with a valid bit")
        value |= 1 << GHCB_VALID_BITS[n]
    return value.to_bytes(16, "little")


def valid_fields(bitmap: bytes) -> frozenset[str]:
    """The fields a 16-byte valid bitmap marks; bits of no known field are an error."""
    if len(bitmap) != 16:
        raise LayoutError(f"Ghcb valid bitmap: expected 16 bytes, got {len(bitmap)}")
    value = int.from_bytes(bitmap, "little")
    names = frozenset(n for n, b in GHCB_VALID_BITS.items() if value >> b & 1)
    unknown = value & ~sum(1 << GHCB_VALID_BITS[n] for n in names)
    if unknown:
        raise LayoutError(f"Ghcb valid bitmap {value:#034x} marks quadwords of no field ({unknown:#x})")
    return names


class GhcbError(IntEnum):
    """GHCB error codes, in SW_EXITINFO2 when SW_EXITINFO1[31:0] = 2 (Linux ``GHCB_ERR_*``)."""

    NOT_REGISTERED = 1
    INVALID_USAGE = 2
    INVALID_SCRATCH_AREA = 3
    MISSING_INPUT = 4
    INVALID_INPUT = 5
    INVALID_EVENT = 6


class SwExitInfo1Result(IntEnum):
    """SW_EXITINFO1[31:0] the hypervisor returns (GHCB 56421; Linux KVM ``ghcb_set_sw_exit_info_1``)."""

    OK = 0
    EVENT = 1
    """SW_EXITINFO2 holds an event for the guest to take (EVENTINJ format)."""
    ERROR = 2
    """SW_EXITINFO2 holds a :class:`GhcbError`."""


class SwExitCode(IntEnum):
    """VMGEXIT (NAE) exit codes in SW_EXITCODE: architectural ones reused, software-defined ones above
    0x8000_0000 (GHCB 56421; Linux ``SVM_EXIT_*`` and ``SVM_VMGEXIT_*``)."""

    READ_DR7 = 0x027
    WRITE_DR7 = 0x037
    RDTSC = 0x06E
    RDPMC = 0x06F
    CPUID = 0x072
    INVD = 0x076
    IOIO = 0x07B
    MSR = 0x07C
    VMMCALL = 0x081
    RDTSCP = 0x087
    WBINVD = 0x089
    MONITOR = 0x08A
    MWAIT = 0x08B
    NPF = 0x400
    MMIO_READ = 0x8000_0001
    MMIO_WRITE = 0x8000_0002
    NMI_COMPLETE = 0x8000_0003
    AP_HLT_LOOP = 0x8000_0004
    AP_JUMP_TABLE = 0x8000_0005
    PSC = 0x8000_0010
    GUEST_REQUEST = 0x8000_0011
    EXT_GUEST_REQUEST = 0x8000_0012
    AP_CREATION = 0x8000_0013
    SNP_RUN_VMPL = 0x8000_0018
    SAVIC = 0x8000_001A
    HV_FEATURES = 0x8000_FFFD
    TERM_REQUEST = 0x8000_FFFE
    UNSUPPORTED_EVENT = 0x8000_FFFF


class ApJumpTableOp(IntEnum):
    """SW_EXITINFO1 of AP_JUMP_TABLE (Linux ``SVM_VMGEXIT_SET/GET_AP_JUMP_TABLE``)."""

    SET = 0
    GET = 1


class ApCreationOp(IntEnum):
    """SW_EXITINFO1[31:0] of AP_CREATION."""

    CREATE_ON_INIT = 0
    CREATE = 1
    DESTROY = 2


@layout(size=8)
class ApCreationInfo(Struct):
    """SW_EXITINFO1 of AP_CREATION: the :class:`ApCreationOp` and the APIC id (SW_EXITINFO2: VMSA GPA)."""

    op: int = bits(31, 0)
    apic_id: int = bits(63, 32)


@layout(size=8)
class TermRequestInfo(Struct):
    """SW_EXITINFO1 of TERM_REQUEST."""

    reason_set: int = bits(3, 0)
    reason_code: int = bits(11, 4)


class GuestRequestVmmError(IntEnum):
    """SW_EXITINFO2[63:32] of a (extended) guest request (Linux ``SNP_GUEST_VMM_ERR_*``)."""

    INVALID_LEN = 1
    """The certificate buffer is too small; RBX holds the pages needed."""
    BUSY = 2


class TermReasonSet(IntEnum):
    """Termination reason sets (Linux ``SEV_TERM_SET_*``)."""

    GENERAL = 0
    LINUX = 1


class TermReasonGeneral(IntEnum):
    """Reason codes of set 0 (Linux ``GHCB_SEV_ES_GEN_REQ`` ...)."""

    GENERAL_REQUEST = 0
    PROTOCOL_UNSUPPORTED = 1
    SNP_UNSUPPORTED = 2


class LinuxTermReason(IntEnum):
    """Reason codes of set 1, Linux's own (Linux ``GHCB_TERM_*``)."""

    REGISTER = 0
    PSC = 1
    PVALIDATE = 2
    NOT_VMPL0 = 3


class HvFeature(IntFlag):
    """Hypervisor features of HV_FT_RESP / HV_FEATURES (Linux ``GHCB_HV_FT_*``)."""

    SNP = 1 << 0
    SNP_AP_CREATION = 1 << 1


# --- the GHCB MSR protocol -----------------------------------------------------------------------

GHCB_MSR_INFO_MASK: Final = 0xFFF
"""GHCBInfo, bits 11:0 of the GHCB MSR; 0 means the MSR holds the GHCB's GPA."""


class GhcbMsrInfo(IntEnum):
    """GHCBInfo codes of the MSR protocol (Linux ``GHCB_MSR_*``)."""

    SEV_INFO_RESP = 0x001
    SEV_INFO_REQ = 0x002
    CPUID_REQ = 0x004
    CPUID_RESP = 0x005
    AP_RESET_HOLD_REQ = 0x006
    AP_RESET_HOLD_RESP = 0x007
    REG_GPA_REQ = 0x012
    REG_GPA_RESP = 0x013
    PSC_REQ = 0x014
    PSC_RESP = 0x015
    VMPL_REQ = 0x016
    VMPL_RESP = 0x017
    HV_FT_REQ = 0x080
    HV_FT_RESP = 0x081
    TERM_REQ = 0x100


@layout(size=8)
class MsrSevInfoReq(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.SEV_INFO_REQ)


@layout(size=8)
class MsrSevInfoResp(Struct):
    """The hypervisor's protocol range and the C-bit position."""

    info: int = bits(11, 0, GhcbMsrInfo.SEV_INFO_RESP)
    cbit: int = bits(31, 24)
    min_protocol: int = bits(47, 32)
    max_protocol: int = bits(63, 48)


@layout(size=8)
class MsrCpuidReq(Struct):
    """``reg``: 0 EAX, 1 EBX, 2 ECX, 3 EDX of CPUID ``function`` (sub-leaf 0)."""

    info: int = bits(11, 0, GhcbMsrInfo.CPUID_REQ)
    reg: int = bits(31, 30)
    function: int = bits(63, 32)


@layout(size=8)
class MsrCpuidResp(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.CPUID_RESP)
    value: int = bits(63, 32)


@layout(size=8)
class MsrApResetHoldReq(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.AP_RESET_HOLD_REQ)


@layout(size=8)
class MsrApResetHoldResp(Struct):
    """Non-zero ``data`` when the AP is released (unconfirmed, module docstring)."""

    info: int = bits(11, 0, GhcbMsrInfo.AP_RESET_HOLD_RESP)
    data: int = bits(63, 12)


@layout(size=8)
class MsrRegGpaReq(Struct):
    """SNP: register the GHCB at guest frame ``gfn``."""

    info: int = bits(11, 0, GhcbMsrInfo.REG_GPA_REQ)
    gfn: int = bits(63, 12)


@layout(size=8)
class MsrRegGpaResp(Struct):
    """The registered frame echoed (all ones on failure: unconfirmed)."""

    info: int = bits(11, 0, GhcbMsrInfo.REG_GPA_RESP)
    gfn: int = bits(63, 12)


@layout(size=8)
class MsrPscReq(Struct):
    """Page state change of one 4 KiB frame: ``op`` is a :class:`PscOp` (PRIVATE or SHARED)."""

    info: int = bits(11, 0, GhcbMsrInfo.PSC_REQ)
    gfn: int = bits(51, 12)
    op: int = bits(55, 52)


@layout(size=8)
class MsrPscResp(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.PSC_RESP)
    error: int = bits(63, 32)


@layout(size=8)
class MsrVmplReq(Struct):
    """Run the guest at VMPL ``vmpl``."""

    info: int = bits(11, 0, GhcbMsrInfo.VMPL_REQ)
    vmpl: int = bits(39, 32)


@layout(size=8)
class MsrVmplResp(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.VMPL_RESP)
    error: int = bits(63, 32)


@layout(size=8)
class MsrHvFtReq(Struct):
    info: int = bits(11, 0, GhcbMsrInfo.HV_FT_REQ)


@layout(size=8)
class MsrHvFtResp(Struct):
    """``features``: :class:`HvFeature` bits."""

    info: int = bits(11, 0, GhcbMsrInfo.HV_FT_RESP)
    features: int = bits(63, 12)


@layout(size=8)
class MsrTermReq(Struct):
    """Terminate the guest: :class:`TermReasonSet` and the set's reason code."""

    info: int = bits(11, 0, GhcbMsrInfo.TERM_REQ)
    reason_set: int = bits(15, 12)
    reason_code: int = bits(23, 16)


GHCB_MSR_LAYOUTS: Final[dict[GhcbMsrInfo, type[Struct]]] = {
    GhcbMsrInfo.SEV_INFO_REQ: MsrSevInfoReq,
    GhcbMsrInfo.SEV_INFO_RESP: MsrSevInfoResp,
    GhcbMsrInfo.CPUID_REQ: MsrCpuidReq,
    GhcbMsrInfo.CPUID_RESP: MsrCpuidResp,
    GhcbMsrInfo.AP_RESET_HOLD_REQ: MsrApResetHoldReq,
    GhcbMsrInfo.AP_RESET_HOLD_RESP: MsrApResetHoldResp,
    GhcbMsrInfo.REG_GPA_REQ: MsrRegGpaReq,
    GhcbMsrInfo.REG_GPA_RESP: MsrRegGpaResp,
    GhcbMsrInfo.PSC_REQ: MsrPscReq,
    GhcbMsrInfo.PSC_RESP: MsrPscResp,
    GhcbMsrInfo.VMPL_REQ: MsrVmplReq,
    GhcbMsrInfo.VMPL_RESP: MsrVmplResp,
    GhcbMsrInfo.HV_FT_REQ: MsrHvFtReq,
    GhcbMsrInfo.HV_FT_RESP: MsrHvFtResp,
    GhcbMsrInfo.TERM_REQ: MsrTermReq,
}


def decode_ghcb_msr(value: int) -> Struct:
    """The MSR-protocol message in a GHCB MSR value, by its GHCBInfo; LayoutError for an unknown
    code (GHCBInfo 0, the GHCB GPA, is not a protocol message) or bits the message does not define."""
    if not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise LayoutError(f"GHCB MSR value {value!r} is not a 64-bit unsigned integer")
    try:
        cls = GHCB_MSR_LAYOUTS[GhcbMsrInfo(value & GHCB_MSR_INFO_MASK)]
    except ValueError:
        raise LayoutError(f"GHCB MSR value {value:#x}: unknown GHCBInfo {value & GHCB_MSR_INFO_MASK:#05x}") from None
    return cls.from_int(value)


# --- page state change ---------------------------------------------------------------------------


class PscOp(IntEnum):
    """Page state change operation (Linux ``enum psc_op``; 3 and 4 unconfirmed)."""

    PRIVATE = 1
    SHARED = 2
    PSMASH = 3
    UNSMASH = 4


PSC_MAX_ENTRY: Final = 253


@layout(size=8)
class PscHeader(Struct):
    """Linux ``struct psc_hdr``: the hypervisor advances ``cur_entry`` as it completes entries."""

    cur_entry: int = u16(0x0)
    end_entry: int = u16(0x2)


@layout(size=8)
class PscEntry(Struct):
    """Linux ``struct psc_entry``: ``pagesize`` 1 = 2 MiB; ``cur_page`` counts 4 KiB pages done."""

    cur_page: int = bits(11, 0)
    gfn: int = bits(51, 12)
    operation: int = bits(55, 52)
    pagesize: int = bits(56, 56)


@layout(size=GHCB_SHARED_BUF_SIZE)
class PscDesc(Struct):
    """The page-state-change descriptor in the GHCB shared buffer (Linux ``struct snp_psc_desc``)."""

    hdr: PscHeader = nested(0x0, PscHeader)
    entries: tuple[PscEntry, ...] = array(0x8, PSC_MAX_ENTRY, PscEntry)
