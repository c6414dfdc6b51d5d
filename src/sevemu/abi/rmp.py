"""The SEV-SNP Reverse Map Table: entry formats, the RMP instructions' operands and return codes,
VMPL permission masks and the firmware's page states (APM2 15.36: RMP, Tables 15-34 to 15-36,
RMPUPDATE / PSMASH / PVALIDATE / RMPADJUST; Linux ``arch/x86/virt/svm/sev.c`` ``struct rmpentry``,
``struct rmpentry_raw`` and ``arch/x86/include/asm/sev.h`` ``struct rmp_state``; AMD sev-tool
``src/rmp.h`` for the firmware page states).

The RMP lives in DRAM from RMP_BASE: :data:`RMP_BOOKKEEPING_SIZE` bytes the processor keeps, then one
:data:`RMP_ENTRY_SIZE`-byte entry per 4 KiB of system-physical memory from address 0.

Decisions (the in-memory entry format is not architectural, so these are model choices):

* :class:`RmpEntryRaw` follows Linux's ``rmpentry_raw`` (the Milan PPR format): the low quadword holds
  the architectural fields; the high quadword is declared as one VMPL permission byte per VMPL0..3
  (sev-tool ``src/rmp.h`` models them so) followed by four reserved bytes.  Linux reads the high
  quadword only for dumps.
* RMPUPDATE / PSMASH / PVALIDATE / RMPADJUST return codes other than FAIL_INUSE (3, PSMASH),
  FAIL_OVERLAP (4, RMPUPDATE) and FAIL_SIZEMISMATCH (6, PVALIDATE) follow the APM's names and
  numbering as read, unconfirmed by Linux.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu._util.units import PAGE, PAGE_SHIFT, KiB
from sevemu.abi.struct import Struct, array, bit, bits, layout, nested, u8, u32, u64

__all__ = [
    "INSN_PSMASH",
    "INSN_PVALIDATE",
    "INSN_RMPADJUST",
    "INSN_RMPUPDATE",
    "PVALIDATE_FAIL_NOUPDATE",
    "RMP_ALIGN",
    "RMP_BOOKKEEPING_SIZE",
    "RMP_ENTRY_SIZE",
    "VMPL_COUNT",
    "VMPL_PERM_MASK",
    "RmpAdjustAttrs",
    "RmpEntryRaw",
    "RmpEntryRawLo",
    "RmpPageSize",
    "RmpPageState",
    "RmpReadAssigned",
    "RmpReadEntry",
    "RmpReadImmutable",
    "RmpReadPageSize",
    "RmpResult",
    "RmpUpdateState",
    "VmplPerm",
    "rmp_covered_bytes",
    "rmp_entry_offset",
]

RMP_BOOKKEEPING_SIZE: Final = 16 * KiB
"""Processor bookkeeping at RMP_BASE before the first entry (Linux ``RMPTABLE_CPU_BOOKKEEPING_SZ``)."""
RMP_ENTRY_SIZE: Final = 16
RMP_ALIGN: Final = 8 * KiB
"""RMP_BASE and RMP_END + 1 are 8 KiB aligned."""
VMPL_COUNT: Final = 4

INSN_RMPUPDATE: Final = bytes.fromhex("f20f01fe")
INSN_PSMASH: Final = bytes.fromhex("f30f01ff")
INSN_PVALIDATE: Final = bytes.fromhex("f20f01ff")
INSN_RMPADJUST: Final = bytes.fromhex("f30f01fe")


class RmpPageSize(IntEnum):
    """RMP Page_Size, also the RCX / ECX operand of PVALIDATE and RMPADJUST (Linux ``RMP_PG_SIZE_*``)."""

    SIZE_4K = 0
    SIZE_2M = 1


class RmpResult(IntEnum):
    """EAX after RMPUPDATE, PSMASH, PVALIDATE, RMPADJUST (APM2 15.36; Linux ``*_FAIL_*``)."""

    SUCCESS = 0
    FAIL_INPUT = 1
    FAIL_PERMISSION = 2
    FAIL_INUSE = 3
    FAIL_OVERLAP = 4
    FAIL_SIZEMISMATCH = 6


PVALIDATE_FAIL_NOUPDATE: Final = 255
"""Linux's software code for PVALIDATE returning with rFLAGS.CF = 1 (Validated already as requested)."""


class VmplPerm(IntFlag):
    """A VMPL permission mask (APM2 Table 15-36); bits 7:5 should be zero."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC_USER = 1 << 2
    EXEC_SUPERVISOR = 1 << 3
    SUPERVISOR_SHADOW_STACK = 1 << 4


VMPL_PERM_MASK: Final = 0x1F


class RmpPageState(IntEnum):
    """Firmware page states (sev-tool ``src/rmp.h`` ``snp_page_state``; columns in the comments are
    Assigned, Validated, ASID, Immutable, and the GPA / VMSA the state needs)."""

    INVALID = 0x0
    DEFAULT = 0x1
    HYPERVISOR = 0x2  # 0 0 0 0
    FIRMWARE = 0x3  # 1 0 0 1, GPA 0, VMSA 0
    RECLAIM = 0x4  # 1 0 0 0
    CONTEXT = 0x5  # 1 0 0 1, GPA 0, VMSA 1
    METADATA = 0x6  # 1 0 0 1, GPA > 0
    PRE_GUEST = 0x7  # 1 0 >0 1
    PRE_SWAP = 0x8  # 1 1 >0 1
    GUEST_INVALID = 0x9  # 1 0 >0 0
    GUEST_VALID = 0xA  # 1 1 >0 0


@layout(size=8)
class RmpEntryRawLo(Struct):
    """Low quadword of an in-memory RMP entry (Linux ``rmpentry_raw``): ``gpa`` is GPA >> 12."""

    assigned: bool = bit(0)
    pagesize: int = bits(1, 1)
    immutable: bool = bit(2)
    gpa: int = bits(50, 12)
    asid: int = bits(60, 51)
    vmsa: bool = bit(61)
    validated: bool = bit(62)


@layout(size=RMP_ENTRY_SIZE)
class RmpEntryRaw(Struct):
    """An RMP entry as it sits in the RMP (model choice for the high quadword, module docstring)."""

    lo: RmpEntryRawLo = nested(0x00, RmpEntryRawLo)
    vmpl_perms: tuple[int, ...] = array(0x08, VMPL_COUNT, u8)


@layout(size=1)
class RmpReadAssigned(Struct):
    assigned: bool = bit(0)


@layout(size=1)
class RmpReadPageSize(Struct):
    pagesize: int = bits(0, 0)
    hpage_region_status: bool = bit(1)


@layout(size=1)
class RmpReadImmutable(Struct):
    immutable: bool = bit(0)


@layout(size=RMP_ENTRY_SIZE)
class RmpReadEntry(Struct):
    """The 16 bytes RMPREAD returns (Zen 5; Linux ``struct rmpentry``): the architectural fields."""

    gpa: int = u64(0x00)
    assigned: RmpReadAssigned = nested(0x08, RmpReadAssigned)
    pagesize: RmpReadPageSize = nested(0x09, RmpReadPageSize)
    immutable: RmpReadImmutable = nested(0x0A, RmpReadImmutable)
    asid: int = u32(0x0C)


@layout(size=RMP_ENTRY_SIZE)
class RmpUpdateState(Struct):
    """The new state RMPUPDATE reads from [RCX] (Linux ``struct rmp_state``); ``gpa`` is a byte address."""

    gpa: int = u64(0x00)
    assigned: int = u8(0x08)
    pagesize: int = u8(0x09)
    immutable: int = u8(0x0A)
    asid: int = u32(0x0C)


@layout(size=8)
class RmpAdjustAttrs(Struct):
    """RDX operand of RMPADJUST (APM2; Linux ``RMPADJUST_VMSA_PAGE_BIT``)."""

    target_vmpl: int = bits(7, 0)
    perm_mask: int = bits(15, 8)
    vmsa: bool = bit(16)


def rmp_entry_offset(spa: int) -> int:
    """Byte offset from RMP_BASE of the entry that covers system-physical address ``spa``."""
    if spa < 0:
        raise ValueError(f"system-physical address {spa:#x} is negative")
    return RMP_BOOKKEEPING_SIZE + (spa >> PAGE_SHIFT) * RMP_ENTRY_SIZE


def rmp_covered_bytes(rmp_base: int, rmp_end: int) -> int:
    """Bytes of system-physical memory from 0 an RMP at [rmp_base, rmp_end] covers (0 if too small)."""
    entries = (rmp_end + 1 - rmp_base - RMP_BOOKKEEPING_SIZE) // RMP_ENTRY_SIZE
    return max(entries, 0) * PAGE
