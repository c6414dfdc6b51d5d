"""x86-64 4-level paging with the memory-encryption C-bit, #PF / #NPF error codes and the SVM exit
codes a basic VMEXIT model needs (AMD APM Vol. 2 §5.3-5.4, §8.4.2, §15.9, §15.25.6, §15.34.5,
Appendix C; Linux ``arch/x86/include/asm/kvm_host.h`` ``PFERR_*``).

The C-bit sits in the physical-address field of every entry (its position from CPUID Fn8000_001F
EBX[5:0]); :func:`address_mask` gives the bits of an entry that form the next-level address with the
C-bit stripped.  #NPF EXITINFO1 uses the #PF error-code layout in bits 31:0 plus the SNP/nested bits
above (Linux ``PFERR_*``); EXITINFO2 carries the faulting guest-physical address.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu._util.units import PAGE, PAGE_1G, PAGE_2M, PAGE_SHIFT
from sevemu.errors import InputError

__all__ = [
    "EXITCODE_MASK",
    "MAX_PA_BITS",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PAGE_SIZE_1G",
    "PAGE_SIZE_2M",
    "PT_INDEX_BITS",
    "PT_LEVELS",
    "ExitCode",
    "NpfExitInfo1",
    "PfErrorCode",
    "Pte",
    "address_mask",
    "exitcode_from_field",
    "exitcode_to_field",
]

PAGE_SIZE: Final = PAGE
PAGE_SIZE_2M: Final = PAGE_2M
PAGE_SIZE_1G: Final = PAGE_1G
PT_LEVELS: Final = 4  # PML4, PDPT, PD, PT
PT_INDEX_BITS: Final = 9
MAX_PA_BITS: Final = 52  # architectural MAXPHYADDR limit


class Pte(IntFlag):
    """Page-table entry bits, common to every level (PS only in PDPTE/PDE)."""

    P = 1 << 0
    RW = 1 << 1
    US = 1 << 2
    PWT = 1 << 3
    PCD = 1 << 4
    A = 1 << 5
    D = 1 << 6
    PS = 1 << 7
    G = 1 << 8
    NX = 1 << 63


def address_mask(c_bit: int, pa_bits: int, page_shift: int = PAGE_SHIFT) -> int:
    """Entry bits holding the physical address: [pa_bits-1 : page_shift] without the C-bit.

    ``pa_bits`` is the physical-address width in force (already reduced by Fn8000_001F EBX[11:6]
    when memory encryption is on); ``page_shift`` is 12 for a 4 KiB frame, 21 / 30 for a 2 MiB /
    1 GiB leaf.  A C-bit at or above ``pa_bits`` is simply not part of the mask.
    """
    if not page_shift < pa_bits <= MAX_PA_BITS:
        raise InputError(f"physical-address width {pa_bits} not in ({page_shift}, {MAX_PA_BITS}]")
    if not 0 <= c_bit < 64:
        raise InputError(f"C-bit position {c_bit} outside a 64-bit entry")
    mask = ((1 << pa_bits) - 1) & ~((1 << page_shift) - 1)
    return mask & ~(1 << c_bit)


class PfErrorCode(IntFlag):
    """#PF error code (APM §8.4.2); RMP is the host-side SNP RMP violation (§15.36.10)."""

    P = 1 << 0  # 0: not present, 1: protection violation
    W = 1 << 1
    U = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4  # I/D: instruction fetch
    PK = 1 << 5
    SS = 1 << 6
    RMP = 1 << 31


class NpfExitInfo1(IntFlag):
    """#VMEXIT(NPF) EXITINFO1 (APM §15.25.6, §15.36.10; Linux ``PFERR_*``)."""

    P = 1 << 0
    W = 1 << 1
    U = 1 << 2
    RSVD = 1 << 3
    FETCH = 1 << 4
    RMP = 1 << 31
    GUEST_FINAL = 1 << 32  # fault on the final guest-physical access
    GUEST_PAGE = 1 << 33  # fault during a guest page-table walk
    ENC = 1 << 34  # effective C-bit of the access was 1
    SIZEM = 1 << 35  # PVALIDATE / RMPADJUST page-size mismatch
    VMPL = 1 << 36
    SSS = 1 << 37


class ExitCode(IntEnum):
    """SVM #VMEXIT codes (APM Appendix C) for the exits the model produces.

    VMCB EXITCODE is a 64-bit field; INVALID is -1 there (all ones), see :func:`exitcode_to_field`.
    """

    INVALID = -1  # VMRUN consistency-check failure
    INTR = 0x60
    CPUID = 0x72
    HLT = 0x78
    IOIO = 0x7B
    MSR = 0x7C
    SHUTDOWN = 0x7F
    VMMCALL = 0x81
    NPF = 0x400
    VMGEXIT = 0x403  # SEV-ES / SNP guest-initiated exit


EXITCODE_MASK: Final = (1 << 64) - 1


def exitcode_to_field(code: int) -> int:
    """The unsigned 64-bit VMCB EXITCODE encoding of ``code``."""
    return code & EXITCODE_MASK


def exitcode_from_field(raw: int) -> int:
    """Inverse of :func:`exitcode_to_field`: a signed exit code (an :class:`ExitCode` if known)."""
    value = raw - (1 << 64) if raw >> 63 else raw
    try:
        return ExitCode(value)
    except ValueError:
        return value
