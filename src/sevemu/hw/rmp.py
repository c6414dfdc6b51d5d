"""The Reverse Map Table: SEV-SNP's page-ownership table in DRAM, its instructions and its checks
(APM2 15.36.3-15.36.10, Tables 15-34 to 15-39; APM3 RMPUPDATE, PSMASH, PVALIDATE, RMPADJUST; Linux
``arch/x86/virt/svm/sev.c`` for how the host uses them; AMD-ASPFW ``sev_rmp.c`` for how the firmware
initialises and writes the table).

Where it lives.  The BIOS names the region with the RMP_BASE / RMP_END MSRs (0xC001_0132/3, the same
on every core): :data:`~sevemu.abi.rmp.RMP_BOOKKEEPING_SIZE` bytes of processor bookkeeping, then one
16-byte entry per 4 KiB of system-physical memory from address 0 (:func:`~sevemu.abi.rmp.rmp_entry_offset`).
Software zeroes it and sets SYSCFG.SNP_EN on every core; from then on the cores consult it.  SNP_INIT
(the firmware, through :class:`RmpFirmwarePort`) initialises it and makes the table's own pages
Firmware pages, so no software write reaches it again (:meth:`Rmp.check_host_write`).

Entries are read and written by the hardware in the host's unencrypted domain (0, C=0) through the
SoC's cache, coherent with whatever software wrote there before SNP_INIT, and stored in the raw format
of :class:`~sevemu.abi.rmp.RmpEntryRaw` (low quadword as Linux's ``rmpentry_raw``; the high quadword
one permission byte per VMPL0..3, as AMD-ASPFW ``rmp_quadword2``; bit 63 of the low quadword is
AMD-ASPFW's ``lock``, set on the table's own Firmware entries).

Model choices where AMD publishes no algorithm (``docs/snp.md``):

* A 2 MiB RMP entry lives at the 2 MiB-aligned SPA; it is authoritative for the whole 2 MiB region
  (Linux ``__snp_lookup_rmpentry``); the other 511 entries of the region stay as they were.
* RMPUPDATE return codes: FAIL_INPUT for a misaligned or uncovered SPA or a malformed new state
  (reserved bytes, an ASID above the profile's, Assigned=0 with a non-zero ASID or GPA);
  FAIL_PERMISSION when the current entry (or for a 2 MiB update any 4 KiB entry of the region) is
  Immutable; FAIL_INUSE while VMRUN uses the page; FAIL_OVERLAP for a 4 KiB update inside an assigned
  2 MiB entry (PSMASH first) or a 2 MiB assignment over assigned 4 KiB entries.  RMPUPDATE clears
  Validated and VMSA and gives VMPL0 every permission and VMPL1-3 none (APM2 15.36.7).
* PSMASH: FAIL_INPUT unless the SPA is 2 MiB aligned and its entry is an assigned 2 MiB page.
* PVALIDATE runs at VMPL0 only (the instruction layer raises #GP(0) at another VMPL: Linux "x86/sev:
  Perform PVALIDATE using the SVSM when not at VMPL0").  RMPADJUST runs at the caller's VMPL (the
  running VMSA's): FAIL_INPUT for a target VMPL not less privileged than the caller's (or above 3) or
  reserved permission bits, FAIL_PERMISSION for permissions the caller's own mask lacks.  A page that
  is not the caller's (Assigned, ASID, GPA) or is Immutable is a #VMEXIT(NPF) with the RMP bit; a 4 KiB
  request on a 2 MiB entry a #VMEXIT(NPF) with SIZEM; a 2 MiB request on a 4 KiB entry
  FAIL_SIZEMISMATCH.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from sevemu._util.units import LINE, PAGE, PAGE_2M, PAGE_SHIFT, MiB
from sevemu.abi.paging import NpfExitInfo1
from sevemu.abi.rmp import (
    RMP_BOOKKEEPING_SIZE,
    RMP_ENTRY_SIZE,
    VMPL_COUNT,
    VMPL_PERM_MASK,
    RmpPageState,
    RmpResult,
    RmpUpdateState,
    rmp_covered_bytes,
)
from sevemu.errors import AddressError, ArchitecturalFault, InputError
from sevemu.hw import memaccel
from sevemu.hw.cache import Cache
from sevemu.hw.dram import Dram
from sevemu.hw.faults import NestedPageFault

__all__ = [
    "PF_RMP",
    "RMP_REGION_ALIGN",
    "DmaFault",
    "HostRmpFault",
    "Rmp",
    "RmpEntry",
    "RmpFirmwarePort",
    "rmp_region_size",
]

RMP_REGION_ALIGN: Final = MiB
"""RMP_BASE and RMP_END + 1 alignment the firmware requires at SNP_INIT (AMD-ASPFW ``get_rmp_bounds``)."""

PF_RMP: Final = 1 << 31
"""Host #PF error-code bit: the fault is an RMP violation (APM2 8.4.2; Linux ``X86_PF_RMP``)."""
_PF_P: Final = 1 << 0
_PF_W: Final = 1 << 1

_ASSIGNED: Final = 1 << 0
_PAGESIZE: Final = 1 << 1
_IMMUTABLE: Final = 1 << 2
_GPA_MASK: Final = ((1 << 39) - 1) << 12
_ASID_SHIFT: Final = 51
_ASID_MASK: Final = 0x3FF
_VMSA: Final = 1 << 61
_VALIDATED: Final = 1 << 62
_LOCK: Final = 1 << 63
_VMPL0_ALL: Final = VMPL_PERM_MASK  # high quadword after an assigning RMPUPDATE: VMPL0 all, others none
# A Context page (_state): assigned, immutable, RMP.VMSA, not validated, ASID 0, GPA 0 (any page size)
_CONTEXT_MASK: Final = _ASSIGNED | _IMMUTABLE | _VMSA | _VALIDATED | _GPA_MASK | _ASID_MASK << _ASID_SHIFT
_CONTEXT_BITS: Final = _ASSIGNED | _IMMUTABLE | _VMSA
# A Pre-Guest page (_state), its ASID non-zero besides: assigned, immutable, not validated
_PRE_GUEST_MASK: Final = _ASSIGNED | _IMMUTABLE | _VALIDATED
_PRE_GUEST_BITS: Final = _ASSIGNED | _IMMUTABLE
_SUBPAGES: Final = PAGE_2M // PAGE
_GOVERNING_C: Final = getattr(memaccel.helpers, "rmp_governing", None) if memaccel.ENABLED else None
"""The governing-entry lookup in C (``csrc/mem_accel.c`` ``rmp_governing``: :meth:`Rmp._authoritative`'s
reads and choice, None where an entry's line is dirty in the cache); used while :data:`memaccel.ENABLED`."""


def _bit_table(mask: int) -> bytes:
    """A ``bytes.translate`` table: byte value -> 1 when it has a bit of ``mask``, else 0."""
    return bytes(1 if b & mask else 0 for b in range(256))


# The low byte of an entry's low quadword holds Assigned, Page_Size and Immutable (bits 0-2): the range
# checks read that byte of each entry and find the first one with a bit of a mask set (``translate``
# and ``find``, in C) instead of building arrays of whole quadwords.
_HAS_ASSIGNED: Final = _bit_table(_ASSIGNED)
_HAS_IMMUTABLE: Final = _bit_table(_IMMUTABLE)
_HAS_ASSIGNED_OR_IMMUTABLE: Final = _bit_table(_ASSIGNED | _IMMUTABLE)
_unpack_entry: Final = struct.Struct("<QQ").unpack_from
_pack_entry: Final = struct.Struct("<QQ").pack
_unpack_lo: Final = struct.Struct("<Q").unpack_from
_pack_lo: Final = struct.Struct("<Q").pack
_PV_SAME: Final = (int(RmpResult.SUCCESS), True)
_PV_DONE: Final = (int(RmpResult.SUCCESS), False)
_NPF_RMP: Final = int(NpfExitInfo1.P | NpfExitInfo1.W | NpfExitInfo1.RMP | NpfExitInfo1.ENC
                      | NpfExitInfo1.GUEST_FINAL)


class HostRmpFault(ArchitecturalFault):
    """Raised when a host (ASID 0) write hits a page the RMP does not give the hypervisor (#PF with
    the RMP bit in the error code)."""

    def __init__(self, spa: int, state: RmpPageState) -> None:
        self.address = spa
        self.error_code = PF_RMP | _PF_W | _PF_P
        self.state = state
        super().__init__(f"#PF (RMP) on a host write to SPA {spa:#x}: the page is {state.name}, "
                         f"not Hypervisor-owned (error code {self.error_code:#x})")


class DmaFault(ArchitecturalFault):
    """Raised when a device's DMA write (through the IOMMU) hits a page the hypervisor does not own."""

    def __init__(self, spa: int, state: RmpPageState) -> None:
        self.address = spa
        self.state = state
        super().__init__(f"IOMMU RMP fault: DMA write to SPA {spa:#x}, a {state.name} page")


def rmp_region_size(dram_size: int) -> int:
    """Bytes of an RMP covering ``dram_size`` bytes of DRAM, rounded up to :data:`RMP_REGION_ALIGN`."""
    need = RMP_BOOKKEEPING_SIZE + -(-dram_size // PAGE) * RMP_ENTRY_SIZE
    return -(-need // RMP_REGION_ALIGN) * RMP_REGION_ALIGN


@dataclass(frozen=True, slots=True)
class RmpEntry:
    """The architectural fields of one RMP entry (APM2 Table 15-34), decoded from its raw bytes."""

    assigned: bool
    page_size: int
    immutable: bool
    gpa: int
    asid: int
    vmsa: bool
    validated: bool
    perms: tuple[int, int, int, int]
    """VMPL0..3 permission masks."""

    @classmethod
    def from_raw(cls, lo: int, hi: int) -> RmpEntry:
        """The entry of the raw quadwords ``lo``, ``hi`` (decoded once per distinct pair: entries are
        immutable values, and most reads are of the few that recur -- Hypervisor pages, a context)."""
        key = (lo, hi)
        entry = _DECODED.get(key)
        if entry is None or type(entry) is not cls:
            entry = cls(bool(lo & _ASSIGNED), (lo >> 1) & 1, bool(lo & _IMMUTABLE), lo & _GPA_MASK,
                        (lo >> _ASID_SHIFT) & _ASID_MASK, bool(lo & _VMSA), bool(lo & _VALIDATED),
                        (hi & 0xFF, (hi >> 8) & 0xFF, (hi >> 16) & 0xFF, (hi >> 24) & 0xFF))
            if len(_DECODED) >= _DECODED_MAX:
                _DECODED.clear()
            _DECODED[key] = entry
        return entry

    @property
    def state(self) -> RmpPageState:
        """The firmware page state (sev-tool ``src/rmp.h``; AMD-ASPFW ``rmp_entry_get_state``)."""
        return _state(self.assigned, self.validated, self.asid, self.immutable, self.gpa, self.vmsa)


_DECODED: dict[tuple[int, int], RmpEntry] = {}
_DECODED_MAX: Final = 4096


def _state(assigned: bool, validated: bool, asid: int, immutable: bool, gpa: int, vmsa: bool) -> RmpPageState:
    if not assigned:
        return RmpPageState.HYPERVISOR if not (validated or asid or immutable) else RmpPageState.INVALID
    if asid == 0:
        if validated:
            return RmpPageState.INVALID
        if not immutable:
            return RmpPageState.RECLAIM
        if gpa:
            return RmpPageState.METADATA
        return RmpPageState.CONTEXT if vmsa else RmpPageState.FIRMWARE
    if immutable:
        return RmpPageState.PRE_SWAP if validated else RmpPageState.PRE_GUEST
    return RmpPageState.GUEST_VALID if validated else RmpPageState.GUEST_INVALID


def _state_of(lo: int) -> RmpPageState:
    return _state(bool(lo & _ASSIGNED), bool(lo & _VALIDATED), (lo >> _ASID_SHIFT) & _ASID_MASK,
                  bool(lo & _IMMUTABLE), lo & _GPA_MASK, bool(lo & _VMSA))


class Rmp:
    """The SoC's Reverse Map Table: the region RMP_BASE..RMP_END and what the cores do with it."""

    def __init__(self, cache: Cache, dram: Dram, base: int, end: int, max_asid: int) -> None:
        self._cache = cache
        self._dram = dram
        self._pages = dram.pages_dict()
        self._dram_size = dram.size
        self.max_asid = max_asid
        self.base = base
        self.end = end
        self._covered = min(rmp_covered_bytes(base, end), self._dram_size)
        self.enabled = False
        """SYSCFG.SNP_EN: the cores check the RMP (set once; cleared only by a reset)."""
        self.initialized = False
        """SNP_INIT initialised the table (its pages are Firmware pages from then on)."""
        self._asid_pages: dict[int, int] = {}
        """ASID -> assigned entries (the bookkeeping area's per-ASID counters)."""
        self._in_use: dict[int, int] = {}
        """SPA -> count of VMRUNs using the page as a VMCB / VMSA (RMPUPDATE answers FAIL_INUSE)."""
        self.epoch = 0
        """Bumped by an entry change that may take away an access some core has cached: a core's
        cached translations of SNP guests (the TLB keeps the RMP verdict with each page) are dropped
        when they were made under another epoch (:class:`~sevemu.hw.cpu.GuestCpu`)."""
        self._cached: set[int] = set()
        """Frames (of the governing entries) whose verdict a core cached since the last epoch: only a
        change to one of them bumps :attr:`epoch` (and empties the set, every cached verdict being
        dropped before its next use).  A change to any other entry cannot touch a cached verdict --
        the page the on-demand validation just faulted on, typically."""

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def covered(self) -> int:
        """Bytes of system-physical memory from 0 the table covers (beyond: always hypervisor's)."""
        return self._covered

    def set_bounds(self, base: int, end: int) -> None:
        """WRMSR RMP_BASE / RMP_END before SNP_EN (the BIOS does it); InputError when SNP_EN is set."""
        if self.enabled:
            raise InputError("RMP_BASE / RMP_END are locked once SYSCFG.SNP_EN is set")
        self.base, self.end = base, end
        self._covered = min(rmp_covered_bytes(base, end), self._dram_size)

    def bounds_valid(self) -> bool:
        """The region is 1 MiB aligned, inside DRAM and large enough for one entry."""
        size = self.end + 1 - self.base
        return (self.base % RMP_REGION_ALIGN == 0 and size % RMP_REGION_ALIGN == 0 and size > RMP_BOOKKEEPING_SIZE
                and 0 < self.end < self._dram_size)

    def in_region(self, spa: int, length: int = 1) -> bool:
        return spa <= self.end and spa + length > self.base

    def _entry_spa(self, pfn: int) -> int:
        return self.base + RMP_BOOKKEEPING_SIZE + pfn * RMP_ENTRY_SIZE

    # ---- raw access (the hardware's own, coherent, unencrypted) --------------------------------
    def _raw(self, pfn: int) -> tuple[int, int]:
        spa = self.base + RMP_BOOKKEEPING_SIZE + pfn * RMP_ENTRY_SIZE
        if (spa & ~(LINE - 1)) in self._cache.dirty:  # software's unwritten line (before SNP_INIT)
            data = self._cache.read(0, False, spa, RMP_ENTRY_SIZE)
            return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")
        page = self._pages.get(spa >> PAGE_SHIFT)
        if page is None:
            return 0, 0
        return _unpack_entry(page, spa & (PAGE - 1))

    def _entries_bytes(self, pfn: int, n: int) -> bytes:
        """The ``n`` entries from ``pfn`` in one read (what :meth:`_raw` gives each: software's
        unwritten lines of the range merged in)."""
        spa = self._entry_spa(pfn)
        length = n * RMP_ENTRY_SIZE
        dirty = self._cache.dirty
        if dirty and not dirty.isdisjoint(range(spa & ~(LINE - 1), spa + length, LINE)):
            return self._cache.read(0, False, spa, length)
        return self._dram.read(spa, length)

    def _lows(self, pfn: int, n: int) -> np.ndarray[Any, np.dtype[np.uint64]]:
        """The low quadwords of the ``n`` entries from ``pfn`` in one read."""
        return np.frombuffer(self._entries_bytes(pfn, n), dtype="<u8")[0::2]

    def _low_flags(self, pfn: int, n: int) -> bytes:
        """The low byte of the low quadword of each of the ``n`` entries from ``pfn`` (Assigned,
        Page_Size, Immutable in bits 0-2), one per entry, in one read."""
        return self._entries_bytes(pfn, n)[0::RMP_ENTRY_SIZE]

    def _put(self, pfn: int, lo: int, hi: int, old_lo: int | None = None, old_hi: int | None = None) -> None:
        """Write one entry; ``old_lo`` / ``old_hi``: its previous quadwords when the caller read them
        (the per-ASID page counts are kept from the difference)."""
        if old_lo is None or old_hi is None:
            old_lo, old_hi = self._raw(pfn)
        # Validating a page or granting a VMPL more takes no access away: cached verdicts stay.
        if self._cached and (lo != old_lo | _VALIDATED or old_hi & ~hi) and self._verdict_cached(pfn, lo | old_lo):
            self._new_epoch()
        if (old_lo | lo) & _ASSIGNED:  # (_count of each, inline; skipped when neither is assigned)
            was = (old_lo >> _ASID_SHIFT) & _ASID_MASK if old_lo & _ASSIGNED else 0
            now = (lo >> _ASID_SHIFT) & _ASID_MASK if lo & _ASSIGNED else 0
            if was != now:  # (the same ASID before and after: its count stays)
                counts = self._asid_pages
                if was:
                    n = counts.get(was, 0) - 1
                    if n:
                        counts[was] = n
                    else:
                        del counts[was]
                if now:
                    counts[now] = counts.get(now, 0) + 1
        spa = self.base + RMP_BOOKKEEPING_SIZE + pfn * RMP_ENTRY_SIZE
        cache = self._cache
        key = spa & ~(LINE - 1)  # software's copy of the line goes first (coherence): CLFLUSH, when there
        # is one or an agent to snoop (a host C=0 CLFLUSH snoops the plain agents only: without one and
        # without the line it does nothing)
        if cache.plain_agents or cache.sets[(key >> 6) & cache.set_mask].get(key) is not None:
            cache.clflush(0, False, spa)
        page = self._pages.get(spa >> PAGE_SHIFT)
        if page is None:
            page = self._pages[spa >> PAGE_SHIFT] = bytearray(PAGE)
        off = spa & (PAGE - 1)
        page[off : off + RMP_ENTRY_SIZE] = _pack_entry(lo, hi)

    def _verdict_cached(self, pfn: int, lo: int) -> bool:
        """Whether a change of entry ``pfn`` (``lo``: its old and new low quadwords or'ed) may touch a
        verdict some core cached: the frame's own, or any of its 2 MiB region when the entry is (or
        becomes) a 2 MiB one, which governs the whole region."""
        cached = self._cached
        if not cached:
            return False
        if lo & _PAGESIZE and not pfn & (_SUBPAGES - 1):
            return not cached.isdisjoint(range(pfn, pfn + _SUBPAGES))
        return pfn in cached

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._cached.clear()

    def _count(self, lo: int, delta: int) -> None:
        if lo & _ASSIGNED:
            asid = (lo >> _ASID_SHIFT) & _ASID_MASK
            if asid:
                n = self._asid_pages.get(asid, 0) + delta
                if n:
                    self._asid_pages[asid] = n
                else:
                    self._asid_pages.pop(asid, None)

    def _put_run(self, pfn: int, entries: bytes, count: bool = True) -> None:
        """Write consecutive raw entries from ``pfn`` (the host's cached lines of them go first);
        ``count`` False: no ASID-assigned entry is replaced or written (the counters stay)."""
        for i in range(0, len(entries), RMP_ENTRY_SIZE) if count else ():
            self._count(self._raw(pfn + i // RMP_ENTRY_SIZE)[0], -1)
            self._count(int.from_bytes(entries[i : i + 8], "little"), 1)
        self._new_epoch()
        spa = self._entry_spa(pfn)
        self._cache.flush_range(0, False, spa, len(entries))
        self._dram.write(spa, entries)

    def _table_pages(self) -> list[int]:
        """SPAs of the pages of the entry area that hold anything: in DRAM or as a dirty line."""
        first = (self.base + RMP_BOOKKEEPING_SIZE) >> PAGE_SHIFT
        last = self.end >> PAGE_SHIFT
        pfns = {p for p in self._pages if first <= p <= last}
        pfns.update(k >> PAGE_SHIFT for k in self._cache.dirty if first <= k >> PAGE_SHIFT <= last)
        return sorted(p << PAGE_SHIFT for p in pfns)

    def asid_pages(self, asid: int) -> int:
        """RMP entries assigned to ``asid`` (the processor's per-ASID counters in the bookkeeping
        area, AMD-ASPFW ``check_rmp_for_asid``; a 2 MiB entry counts once)."""
        return self._asid_pages.get(asid, 0)

    def _covers(self, spa: int) -> bool:
        return 0 <= spa < self.covered

    def _authoritative(self, pfn: int) -> tuple[int, int, int]:
        """(pfn of the entry that governs ``pfn``, lo, hi): the 2 MiB entry of the region if it is an
        assigned 2 MiB page, else the page's own entry (Linux ``__snp_lookup_rmpentry``).  (:meth:`_raw`
        of each entry, inlined: every RMP check goes through here; in C where it was built.)"""
        first = self.base + RMP_BOOKKEEPING_SIZE
        dirty = self._cache.dirty
        pages = self._pages
        if _GOVERNING_C is not None and memaccel.ENABLED:
            got: tuple[int, int, int] | None = _GOVERNING_C(pages, dirty, first, pfn)
            if got is not None:
                return got
        large = pfn & ~(_SUBPAGES - 1)
        for at in (large, pfn) if large != pfn else (pfn,):
            spa = first + at * RMP_ENTRY_SIZE
            if spa & ~(LINE - 1) in dirty:
                lo, hi = self._raw(at)
            else:
                page = pages.get(spa >> PAGE_SHIFT)
                lo, hi = _unpack_entry(page, spa & (PAGE - 1)) if page is not None else (0, 0)
            if lo & _ASSIGNED and lo & _PAGESIZE:
                break  # (an assigned 2 MiB entry governs its region; else the page's own, read last)
        return at, lo, hi

    def _governing_lo(self, pfn: int) -> int:
        """The low quadword of the entry that governs ``pfn`` (:meth:`_authoritative`'s ``lo``, read
        as :meth:`_raw` reads it), for the checks that need only that."""
        first = self.base + RMP_BOOKKEEPING_SIZE
        dirty = self._cache.dirty
        pages = self._pages
        if _GOVERNING_C is not None and memaccel.ENABLED:
            got: tuple[int, int, int] | None = _GOVERNING_C(pages, dirty, first, pfn)
            if got is not None:
                return got[1]
        large = pfn & ~(_SUBPAGES - 1)
        if large != pfn:
            spa = first + large * RMP_ENTRY_SIZE
            if spa & ~(LINE - 1) in dirty:
                lo = self._raw(large)[0]
            else:
                page = pages.get(spa >> PAGE_SHIFT)
                lo = _unpack_lo(page, spa & (PAGE - 1))[0] if page is not None else 0
            if lo & _ASSIGNED and lo & _PAGESIZE:
                return lo
        spa = first + pfn * RMP_ENTRY_SIZE
        if spa & ~(LINE - 1) in dirty:
            return self._raw(pfn)[0]
        page = pages.get(spa >> PAGE_SHIFT)
        return _unpack_lo(page, spa & (PAGE - 1))[0] if page is not None else 0

    def entry(self, spa: int) -> RmpEntry:
        """The entry that governs the page at ``spa`` (AddressError outside the covered memory)."""
        if not 0 <= spa < self._covered:
            raise AddressError(f"SPA {spa:#x} is not covered by the RMP ({self.covered:#x} bytes)")
        _, lo, hi = self._authoritative(spa >> PAGE_SHIFT)
        entry = _DECODED.get((lo, hi))  # (RmpEntry.from_raw's memo, looked up here: one call less)
        return entry if entry is not None and type(entry) is RmpEntry else RmpEntry.from_raw(lo, hi)

    def assigned(self, spa: int) -> bool:
        """:meth:`entry`'s ``assigned`` (AddressError outside the covered memory), from the governing low
        quadword alone."""
        if not 0 <= spa < self._covered:
            raise AddressError(f"SPA {spa:#x} is not covered by the RMP ({self.covered:#x} bytes)")
        return bool(self._governing_lo(spa >> PAGE_SHIFT) & _ASSIGNED)

    def raw_entry(self, spa: int) -> RmpEntry:
        """The entry stored for the 4 KiB page at ``spa`` itself (not the governing 2 MiB one)."""
        if not self._covers(spa):
            raise AddressError(f"SPA {spa:#x} is not covered by the RMP ({self.covered:#x} bytes)")
        return RmpEntry.from_raw(*self._raw(spa >> PAGE_SHIFT))

    def state(self, spa: int) -> RmpPageState:
        """Firmware page state of the page at ``spa`` (HYPERVISOR outside the covered memory)."""
        if not self.enabled or not self._covers(spa):
            return RmpPageState.HYPERVISOR
        return _state_of(self._authoritative(spa >> PAGE_SHIFT)[1])

    # ---- checks on host and device writes --------------------------------------------------------
    def _hv_owned_or_fault(self, spa: int, length: int, fault: type[HostRmpFault | DmaFault]) -> None:
        if length <= 0:
            return
        first = spa >> PAGE_SHIFT
        last = min(spa + length - 1, self.covered - 1) >> PAGE_SHIFT
        if last - first < 8:  # a few pages: entry by entry
            for pfn in range(first, last + 1):
                lo = self._governing_lo(pfn)
                if lo & _ASSIGNED:
                    raise fault(max(spa, pfn << PAGE_SHIFT), _state_of(lo))
            return
        # The same verdicts for a range, in one read of its entries (and of the 2 MiB entries of the
        # regions it touches): a page faults when its own entry or its region's 2 MiB entry is assigned.
        # The first such page: its own entry's low byte (translated to 1 when Assigned), or the first
        # page of the range in a region whose 2 MiB entry (the region's first) is Assigned and 2 MiB.
        head = first & ~(_SUBPAGES - 1)
        flags = self._low_flags(head, last + 1 - head)
        at = flags.translate(_HAS_ASSIGNED).find(1, first - head)
        bad = last + 1 if at < 0 else head + at
        for region in range(head, bad, _SUBPAGES):
            if flags[region - head] & (_ASSIGNED | _PAGESIZE) == _ASSIGNED | _PAGESIZE:
                bad = max(first, region)
                break
        if bad <= last:
            _, lo, _ = self._authoritative(bad)
            raise fault(max(spa, bad << PAGE_SHIFT), _state_of(lo))

    def guest_page_in(self, spa: int, length: int) -> bool:
        """Whether a page of ``[spa, spa+length)`` (within the covered memory) belongs to a guest: its
        governing entry Assigned with a non-zero ASID."""
        if not self.enabled or length <= 0:
            return False
        if (spa & (PAGE - 1)) + length <= PAGE:  # one page (a command buffer): its governing entry
            if not 0 <= spa < self._covered:
                return False
            lo = self._governing_lo(spa >> PAGE_SHIFT)
            return bool(lo & _ASSIGNED and (lo >> _ASID_SHIFT) & _ASID_MASK)
        last = min(spa + length - 1, self.covered - 1)
        for pfn in range(spa >> PAGE_SHIFT, (last >> PAGE_SHIFT) + 1):
            lo = self._governing_lo(pfn)
            if lo & _ASSIGNED and (lo >> _ASID_SHIFT) & _ASID_MASK:
                return True
        return False

    def check_host_write(self, spa: int, length: int) -> None:
        """RMP check of a host data write (APM2 Table 15-39, first row: Hypervisor-Owned, else #PF
        with the RMP bit); nothing is written when it raises."""
        if self.enabled and spa < self._covered:
            if 0 <= spa and 0 < length and (spa & (PAGE - 1)) + length <= PAGE:  # one page: its governing entry
                lo = self._governing_lo(spa >> PAGE_SHIFT)
                if lo & _ASSIGNED:
                    raise HostRmpFault(spa, _state_of(lo))
                return
            self._hv_owned_or_fault(spa, length, HostRmpFault)

    def check_dma_write(self, spa: int, length: int) -> None:
        """The IOMMU's RMP check of a device DMA write: only Hypervisor-owned pages (DmaFault)."""
        if self.enabled and spa < self.covered:
            self._hv_owned_or_fault(spa, length, DmaFault)

    # ---- VMRUN in-use tracking (for the vCPU path) ------------------------------------------------
    def mark_in_use(self, spas: Iterable[int]) -> None:
        """VMRUN took these pages (VMCB, VMSA) in use until #VMEXIT (APM2 15.36.17)."""
        for spa in spas:
            page = spa & ~(PAGE - 1)
            self._in_use[page] = self._in_use.get(page, 0) + 1

    def release(self, spas: Iterable[int]) -> None:
        """#VMEXIT: the pages :meth:`mark_in_use` took are free again."""
        for spa in spas:
            page = spa & ~(PAGE - 1)
            n = self._in_use.get(page, 0) - 1
            if n > 0:
                self._in_use[page] = n
            else:
                self._in_use.pop(page, None)

    def hv_page_check(self, spa: int, what: str) -> str | None:
        """Why the page at ``spa`` is not a Hypervisor-owned page (``what`` names it), or None."""
        if not self.enabled or spa >= self.covered:
            return None
        _, lo, _ = self._authoritative(spa >> PAGE_SHIFT)
        if lo & _ASSIGNED:
            return f"{what} at {spa:#x} is a {_state_of(lo).name} page in the RMP, not the hypervisor's"
        return None

    def vmcb_check(self, spa: int) -> str | None:
        """VMRUN with SNP_EN (APM2 Table 15-41): why the page at ``spa`` may not be a VMCB -- it must be
        a page of memory and Hypervisor-owned -- or None."""
        if spa % PAGE or spa <= 0 or spa >= self._dram_size:
            return f"the VMCB address {spa:#x} is not a page of DRAM"
        return self.hv_page_check(spa, "the VMCB page")

    def vmsa_check(self, asid: int, spa: int) -> str | None:
        """VMRUN of an SNP-active guest (APM2 15.36.12): why the page at ``spa`` may not be ``asid``'s
        VMSA, or None.  It must be a 4 KiB page assigned to the guest, validated, mutable, with the
        VMSA bit (SNP_LAUNCH_UPDATE's VMSA page, or a page the guest gave RMPADJUST's VMSA bit)."""
        if not self._covers(spa):
            return f"the VMSA page {spa:#x} is not covered by the RMP"
        _, lo, _ = self._authoritative(spa >> PAGE_SHIFT)
        entry = RmpEntry.from_raw(lo, 0)
        if not entry.assigned or entry.asid != asid:
            return (f"the VMSA page {spa:#x} is not assigned to ASID {asid} in the RMP "
                    f"({entry.state.name}, ASID {entry.asid})")
        if entry.page_size or entry.immutable or not entry.validated or not entry.vmsa:
            return (f"the VMSA page {spa:#x} is not a validated 4 KiB VMSA page in the RMP "
                    f"(VMSA={int(entry.vmsa)}, validated={int(entry.validated)}, 2M={entry.page_size}, "
                    f"immutable={int(entry.immutable)})")
        if self._in_use.get(spa & ~(PAGE - 1)):
            return f"the VMSA page {spa:#x} is in use by another VMRUN"
        return None

    def _busy(self, spa: int, size: int) -> bool:
        in_use = self._in_use
        if not in_use:
            return False
        if size == PAGE and not spa % PAGE:
            return spa in in_use
        return any(spa <= p < spa + size for p in in_use)

    # ---- host instructions ---------------------------------------------------------------------
    def rmpupdate(self, spa: int, new: RmpUpdateState) -> RmpResult:
        """RMPUPDATE: RAX = ``spa``, [RCX] = ``new``; the EAX result (module docstring for the codes)."""
        return self.rmpupdate_fields(spa, new.gpa, new.assigned, new.pagesize, new.immutable, new.asid)

    def rmpupdate_fields(self, spa: int, gpa: int, assigned: int, pagesize: int, immutable: int,
                         asid: int) -> RmpResult:
        """:meth:`rmpupdate` with the fields of the new state (:class:`~sevemu.abi.rmp.RmpUpdateState`)
        given one by one: the same checks, result and entry, without a state object per page (KVM's
        per-page loops)."""
        huge = pagesize == 1
        size = PAGE_2M if huge else PAGE
        if (not self.enabled or spa % size or not 0 <= spa or spa + size > self._covered
                or pagesize > 1 or assigned > 1 or immutable > 1 or asid > self.max_asid
                or gpa % size or gpa >> 51
                or (not assigned and (asid or gpa or immutable))):
            return RmpResult.FAIL_INPUT
        pfn = spa >> PAGE_SHIFT
        own, lo, old_hi = self._authoritative(pfn)
        if lo & _IMMUTABLE:
            return RmpResult.FAIL_PERMISSION
        if self._in_use and self._busy(spa, size):
            return RmpResult.FAIL_INUSE
        if not huge and (own != pfn or lo & _ASSIGNED and lo & _PAGESIZE):
            return RmpResult.FAIL_OVERLAP  # inside an assigned 2 MiB page: PSMASH it first
        if huge:  # the 511 other entries, in order: the first offending one decides
            subs = self._low_flags(pfn + 1, _SUBPAGES - 1)
            at = subs.translate(_HAS_ASSIGNED_OR_IMMUTABLE if assigned else _HAS_IMMUTABLE).find(1)
            if at >= 0:
                return RmpResult.FAIL_PERMISSION if subs[at] & _IMMUTABLE else RmpResult.FAIL_OVERLAP
        if assigned:
            new_lo = (_ASSIGNED | (_PAGESIZE if huge else 0) | (_IMMUTABLE if immutable else 0)
                      | (gpa & _GPA_MASK) | (asid << _ASID_SHIFT))
            self._put(pfn, new_lo, _VMPL0_ALL, lo, old_hi)
        else:
            self._put(pfn, _PAGESIZE if huge else 0, 0, lo, old_hi)
            if huge:  # a shared 2 MiB page: its 4 KiB entries are the hypervisor's too
                for i in np.flatnonzero(self._lows(pfn + 1, _SUBPAGES - 1)).tolist():
                    self._put(pfn + 1 + i, 0, 0)
        return RmpResult.SUCCESS

    def rmpupdate_run(self, spa: int, pages: int, new: RmpUpdateState) -> tuple[int, RmpResult]:
        """RMPUPDATE of ``pages`` consecutive 4 KiB pages from ``spa`` in one operation: page ``i`` gets
        ``new`` with its GPA advanced by ``i`` pages when ``new`` assigns (else ``new`` as given).  The
        same checks, results and final state as one :meth:`rmpupdate` per page in order, stopping at the
        first that fails; returns (pages done, that page's result or SUCCESS).  A 2 MiB ``new`` is
        applied page by page (it is not a 4 KiB run)."""
        if pages <= 0:
            return 0, RmpResult.SUCCESS
        if new.pagesize or not self.enabled or spa % PAGE or spa < 0 or pages == 1:
            for i in range(pages):
                step = RmpUpdateState(gpa=new.gpa + i * PAGE, assigned=new.assigned, pagesize=new.pagesize,
                                      immutable=new.immutable, asid=new.asid) if new.assigned and i else new
                rc = self.rmpupdate(spa + i * PAGE, step)
                if rc != RmpResult.SUCCESS:
                    return i, rc
            return pages, RmpResult.SUCCESS
        # the checks that do not depend on the page: every page fails them alike
        if (new.assigned > 1 or new.immutable > 1 or new.asid > self.max_asid or new.gpa % PAGE
                or (not new.assigned and (new.asid or new.gpa or new.immutable))):
            return 0, RmpResult.FAIL_INPUT
        # FAIL_INPUT from page ``limit`` on: beyond the covered memory or a GPA above bit 50
        limit = min(pages, max(0, (self.covered - spa) // PAGE))
        if new.assigned:
            limit = min(limit, max(0, ((1 << 51) - new.gpa + PAGE - 1) // PAGE))
        first = stop = limit
        result = RmpResult.FAIL_INPUT
        pfn = spa >> PAGE_SHIFT
        if limit:
            los, his = self._entries(pfn, limit)
            # the governing entry of each page: its region's 2 MiB entry when that one is assigned 2 MiB
            regions = range(pfn >> 9, ((pfn + limit - 1) >> 9) + 1)
            big = [self._raw(r << 9) for r in regions]
            big_lo = np.array([lo for lo, _ in big], dtype=np.uint64)
            idx = (np.arange(pfn, pfn + limit, dtype=np.int64) >> 9) - (pfn >> 9)
            region_lo = big_lo[idx]
            huge = (region_lo & np.uint64(_ASSIGNED | _PAGESIZE)) == np.uint64(_ASSIGNED | _PAGESIZE)
            gov_lo = np.where(huge, region_lo, los)
            # per page, in rmpupdate's order: Immutable, in use, inside an assigned 2 MiB page
            perm = (gov_lo & np.uint64(_IMMUTABLE)) != 0
            overlap = huge | ((los & np.uint64(_ASSIGNED | _PAGESIZE)) == np.uint64(_ASSIGNED | _PAGESIZE))
            bad = perm | overlap
            busy_at = limit
            if self._in_use:
                end = spa + limit * PAGE
                hits = [(p - spa) >> PAGE_SHIFT for p in self._in_use if spa <= p < end and not p % PAGE]
                busy_at = min(hits, default=limit)
            hit = np.flatnonzero(bad)
            first = int(hit[0]) if hit.size else limit
            if busy_at < first or (busy_at == first and first < limit and not perm[first]):
                first, result = busy_at, RmpResult.FAIL_INUSE
            elif first < limit:
                result = RmpResult.FAIL_PERMISSION if perm[first] else RmpResult.FAIL_OVERLAP
            stop = first
            if stop:
                self._put_4k_run(pfn, stop, new, los[:stop], his[:stop])
        if stop == pages:
            return pages, RmpResult.SUCCESS
        return stop, result

    def _entries(self, pfn: int, n: int) -> tuple[np.ndarray[Any, np.dtype[np.uint64]],
                                                  np.ndarray[Any, np.dtype[np.uint64]]]:
        """Both quadwords of the ``n`` entries from ``pfn`` (what :meth:`_raw` gives each)."""
        spa = self._entry_spa(pfn)
        length = n * RMP_ENTRY_SIZE
        dirty = self._cache.dirty
        first = spa & ~(LINE - 1)
        if dirty and any(k in dirty for k in range(first, spa + length, LINE)):
            raw = self._cache.read(0, False, spa, length)
        else:
            raw = self._dram.read(spa, length)
        words = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        return words[0::2], words[1::2]

    def _put_4k_run(self, pfn: int, n: int, new: RmpUpdateState, old_lo: np.ndarray[Any, np.dtype[np.uint64]],
                    old_hi: np.ndarray[Any, np.dtype[np.uint64]]) -> None:
        """The writes of :meth:`rmpupdate_run`'s ``n`` successful pages: what :meth:`_put` does for each."""
        if new.assigned:
            base = (_ASSIGNED | (_IMMUTABLE if new.immutable else 0) | (new.asid << _ASID_SHIFT))
            lo = (np.uint64(base) | (np.uint64(new.gpa & _GPA_MASK)
                                     + (np.arange(n, dtype=np.uint64) << np.uint64(PAGE_SHIFT))))
            hi = np.full(n, _VMPL0_ALL, dtype=np.uint64)
        else:
            lo = np.zeros(n, dtype=np.uint64)
            hi = np.zeros(n, dtype=np.uint64)
        if self._cached:  # (_put's epoch rule per page: one bump clears the set, so any page decides)
            changed = np.flatnonzero((lo != (old_lo | np.uint64(_VALIDATED))) | ((old_hi & ~hi) != 0))
            either = lo | old_lo
            for i in changed.tolist():
                if self._verdict_cached(pfn + i, int(either[i])):
                    self._new_epoch()
                    break
        counts = self._asid_pages
        for v, delta in ((old_lo, -1), (lo, 1)):
            asids = (v >> np.uint64(_ASID_SHIFT)) & np.uint64(_ASID_MASK)
            asids = asids[((v & np.uint64(_ASSIGNED)) != 0) & (asids != 0)]
            if asids.size:
                values, freq = np.unique(asids, return_counts=True)
                for asid, k in zip(values.tolist(), freq.tolist(), strict=True):
                    m = counts.get(asid, 0) + delta * k
                    if m:
                        counts[asid] = m
                    else:
                        counts.pop(asid, None)
        spa = self._entry_spa(pfn)
        length = n * RMP_ENTRY_SIZE
        self._cache.flush_range(0, False, spa, length)  # software's lines of the entries go first
        data = np.empty(2 * n, dtype="<u8")
        data[0::2] = lo
        data[1::2] = hi
        raw = data.tobytes()
        pos = 0
        while pos < length:
            addr = spa + pos
            off = addr & (PAGE - 1)
            k = min(PAGE - off, length - pos)
            page = self._pages.get(addr >> PAGE_SHIFT)
            if page is None:
                page = self._pages[addr >> PAGE_SHIFT] = bytearray(PAGE)
            page[off : off + k] = raw[pos : pos + k]
            pos += k

    def psmash(self, spa: int) -> RmpResult:
        """PSMASH: RAX = 2 MiB-aligned ``spa``; one 2 MiB entry -> 512 4 KiB entries, contiguous GPAs,
        every other field copied (Validated too)."""
        if not self.enabled or spa % PAGE_2M or not 0 <= spa or spa + PAGE_2M > self.covered:
            return RmpResult.FAIL_INPUT
        pfn = spa >> PAGE_SHIFT
        lo, hi = self._raw(pfn)
        if not (lo & _ASSIGNED and lo & _PAGESIZE):
            return RmpResult.FAIL_INPUT
        if self._busy(spa, PAGE_2M):
            return RmpResult.FAIL_INUSE
        base = lo & ~_PAGESIZE & ~_GPA_MASK
        gpa = lo & _GPA_MASK
        high = hi.to_bytes(8, "little")
        self._put_run(pfn, b"".join((base | (gpa + (i << PAGE_SHIFT))).to_bytes(8, "little") + high
                                    for i in range(_SUBPAGES)))
        return RmpResult.SUCCESS

    # ---- guest instructions (hw.x86.insn.GuestRmp) ------------------------------------------------
    def _guest_entry(self, asid: int, gpa: int, spa: int, huge: bool) -> tuple[int, int, int] | RmpResult:
        """Checks PVALIDATE and RMPADJUST share: NPF(RMP) unless the page is the caller's and mutable;
        NPF(SIZEM) for a 4 KiB request on a 2 MiB page; FAIL_SIZEMISMATCH for 2 MiB on 4 KiB."""
        if not self._covers(spa):
            raise NestedPageFault(_NPF_RMP, gpa)
        own, lo, hi = self._authoritative(spa >> PAGE_SHIFT)
        if (not lo & _ASSIGNED or (lo >> _ASID_SHIFT) & _ASID_MASK != asid or lo & _IMMUTABLE):
            raise NestedPageFault(_NPF_RMP, gpa)
        entry_huge = bool(lo & _PAGESIZE)
        if entry_huge and not huge:
            raise NestedPageFault(_NPF_RMP | int(NpfExitInfo1.SIZEM), gpa)
        if huge and not entry_huge:
            return RmpResult.FAIL_SIZEMISMATCH
        if lo & _GPA_MASK != gpa & ~((PAGE_2M if huge else PAGE) - 1):
            raise NestedPageFault(_NPF_RMP, gpa)
        return own, lo, hi

    def pvalidate(self, asid: int, gpa: int, spa: int, huge: bool, validate: bool) -> tuple[int, bool]:
        """PVALIDATE (APM3): set or clear Validated; (EAX, rFLAGS.CF = already in that state)."""
        if validate and not huge and 0 <= spa < self._covered:
            done = self._validate_4k(asid, gpa, spa)
            if done is not None:
                return done
        found = self._guest_entry(asid, gpa, spa, huge)
        if isinstance(found, RmpResult):
            return int(found), False
        own, lo, hi = found
        if bool(lo & _VALIDATED) == validate:
            return int(RmpResult.SUCCESS), True
        self._put(own, lo | _VALIDATED if validate else lo & ~_VALIDATED, hi, lo, hi)
        return int(RmpResult.SUCCESS), False

    def _validate_4k(self, asid: int, gpa: int, spa: int) -> tuple[int, bool] | None:
        """:meth:`pvalidate` of a 4 KiB page to validated when the page's own entry governs it, is the
        caller's, mutable, 4 KiB, at ``gpa`` and stored in DRAM (no software line over it, no 2 MiB entry
        assigned over its region): the same result and the same write as the general path, which
        answers every other case (None).  Setting Validated takes no access away (no epoch) and keeps
        the entry's ASID (the per-ASID counts stay): :meth:`_put` reduced to its line's CLFLUSH and the
        low quadword's store."""
        pfn = spa >> PAGE_SHIFT
        first = self.base + RMP_BOOKKEEPING_SIZE
        dirty = self._cache.dirty
        pages = self._pages
        large = pfn & ~(_SUBPAGES - 1)
        if large != pfn:
            at = first + large * RMP_ENTRY_SIZE
            if dirty and at & ~(LINE - 1) in dirty:
                return None
            page = pages.get(at >> PAGE_SHIFT)
            if page is not None and _unpack_lo(page, at & (PAGE - 1))[0] & (_ASSIGNED | _PAGESIZE) == (
                    _ASSIGNED | _PAGESIZE):
                return None
        at = first + pfn * RMP_ENTRY_SIZE
        key = at & ~(LINE - 1)
        if dirty and key in dirty:
            return None
        page = pages.get(at >> PAGE_SHIFT)
        if page is None:
            return None
        off = at & (PAGE - 1)
        lo = _unpack_lo(page, off)[0]
        if (lo & (_ASSIGNED | _PAGESIZE | _IMMUTABLE) != _ASSIGNED or (lo >> _ASID_SHIFT) & _ASID_MASK != asid
                or lo & _GPA_MASK != gpa & ~(PAGE - 1)):
            return None
        if lo & _VALIDATED:
            return _PV_SAME
        cache = self._cache
        if cache.plain_agents or cache.sets[(key >> 6) & cache.set_mask].get(key) is not None:
            cache.clflush(0, False, at)
        page[off : off + 8] = _pack_lo(lo | _VALIDATED)
        return _PV_DONE

    def validate_state(self) -> tuple[Cache, dict[int, bytearray], int]:
        """What :meth:`_validate_4k` reads and writes, for a copy of it in C (the Unicorn engine's
        invalid-instruction hook, ``csrc/uc_accel.c`` ``PvHook``): the cache the table is read through
        (its ``dirty`` set, ``sets``, ``plain_agents`` and ``clflush``), the DRAM's pages (written in
        place) and the SPA of the first entry."""
        return self._cache, self._pages, self.base + RMP_BOOKKEEPING_SIZE

    def rmpadjust(self, asid: int, gpa: int, spa: int, huge: bool, target_vmpl: int, perms: int,
                  vmsa: bool, caller_vmpl: int = 0) -> int:
        """RMPADJUST (APM3) at ``caller_vmpl``: set the permission mask of a less privileged VMPL
        ``target_vmpl`` (and the VMSA bit), never to more than the caller's own mask."""
        caller = caller_vmpl
        if not caller < target_vmpl < VMPL_COUNT or perms & ~VMPL_PERM_MASK:
            return int(RmpResult.FAIL_INPUT)
        found = self._guest_entry(asid, gpa, spa, huge)
        if isinstance(found, RmpResult):
            return int(found)
        own, lo, hi = found
        if perms & ~(hi >> (8 * caller)) & 0xFF:
            return int(RmpResult.FAIL_PERMISSION)  # never more than the caller's own
        if vmsa and self._busy(own << PAGE_SHIFT, PAGE_2M if huge else PAGE):
            return int(RmpResult.FAIL_INUSE)
        shift = 8 * target_vmpl
        self._put(own, lo | _VMSA if vmsa else lo & ~_VMSA, (hi & ~(0xFF << shift)) | (perms << shift), lo, hi)
        return int(RmpResult.SUCCESS)

    # ---- guest accesses (for the vCPU engines' nested walk) -----------------------------------------
    def check_guest_access(self, asid: int, gpa: int, spa: int, *, write: bool, fetch: bool, c: bool,
                           huge: bool = False, vmpl: int = 0, user: bool = False) -> bool:
        """The RMP checks of an SNP-active guest's access (APM2 Table 15-39), in priority order.

        Returns True when the access may proceed, False when it must take #VC PAGE_NOT_VALIDATED
        (0x404); raises :class:`NestedPageFault` (RMP, with ENC / SIZEM / VMPL bits) otherwise.
        A shared (C=0) read is not checked; a shared write needs a Hypervisor-owned page.
        """
        if not self.enabled:
            return True
        info = int(NpfExitInfo1.P | NpfExitInfo1.RMP | NpfExitInfo1.GUEST_FINAL)
        info |= int(NpfExitInfo1.W) if write else 0
        info |= int(NpfExitInfo1.FETCH) if fetch else 0
        if not (c or fetch):
            if write and spa < self.covered:  # (a shared read is never taken away: not recorded)
                own, lo, _ = self._authoritative(spa >> PAGE_SHIFT)
                if lo & _ASSIGNED:
                    raise NestedPageFault(info, gpa)
                self._cached.add(own)
            return True
        info |= int(NpfExitInfo1.ENC)
        if not self._covers(spa):
            raise NestedPageFault(info, gpa)
        own, lo, hi = self._authoritative(spa >> PAGE_SHIFT)
        entry_huge = bool(lo & _PAGESIZE)
        if (not lo & _ASSIGNED or (lo >> _ASID_SHIFT) & _ASID_MASK != asid
                or lo & _GPA_MASK != gpa & ~((PAGE_2M if entry_huge else PAGE) - 1) or lo & _IMMUTABLE):
            raise NestedPageFault(info, gpa)
        if huge != entry_huge and huge:
            raise NestedPageFault(info | int(NpfExitInfo1.SIZEM), gpa)
        if not lo & _VALIDATED:
            return False
        mask = (hi >> (8 * vmpl)) & 0xFF
        need = 2 if write else 1
        if fetch:
            need = 4 if user else 8
        if not mask & need or (write and not mask & 1):
            raise NestedPageFault(info | int(NpfExitInfo1.VMPL), gpa)
        self._cached.add(own)  # the caller caches this verdict (a TLB entry)
        return True


class RmpFirmwarePort:
    """What the Secure Processor does to the RMP directly (not through x86 instructions): initialise
    it at SNP_INIT and move pages between the firmware page states (AMD-ASPFW ``sev_rmp.c``)."""

    __slots__ = ("_rmp",)

    def __init__(self, rmp: Rmp) -> None:
        self._rmp = rmp

    @property
    def rmp(self) -> Rmp:
        return self._rmp

    def zeroed(self) -> bool:
        """Whether every entry of the table reads as zero (software cleared it before SNP_EN)."""
        r = self._rmp
        for spa in r._table_pages():
            if any(r._cache.read(0, False, spa, PAGE)):
                return False
        return True

    def initialize(self) -> None:
        """SNP_INIT with INIT_RMP: every entry Hypervisor (zero), the table's own pages Firmware pages
        (assigned, immutable, lock: AMD-ASPFW ``RMP_ENTRY_VAL_FIRMWARE``), so software writes fault."""
        r = self._rmp
        zero = bytes(PAGE)
        for spa in r._table_pages():
            r._cache.flush_range(0, False, spa, PAGE)
            r._dram.write(spa, zero)
        r._asid_pages.clear()
        own = range(r.base, min(r.end + 1, r.covered), PAGE)
        if own:
            fw = (_ASSIGNED | _IMMUTABLE | _LOCK).to_bytes(8, "little") + bytes(8)
            r._put_run(r.base >> PAGE_SHIFT, fw * len(own), count=False)
        r.initialized = True

    def shutdown(self) -> None:
        """SNP_SHUTDOWN_EX with X86_SNP_SHUTDOWN: the table is no longer the firmware's."""
        r = self._rmp
        own = range(r.base, min(r.end + 1, r.covered), PAGE)
        if own:
            r._put_run(r.base >> PAGE_SHIFT, bytes(RMP_ENTRY_SIZE * len(own)), count=False)
        r.initialized = False

    def entry(self, spa: int) -> RmpEntry:
        return self._rmp.entry(spa)

    def state(self, spa: int) -> RmpPageState:
        return self._rmp.state(spa)

    def in_use(self, spa: int, size: int = PAGE) -> bool:
        return self._rmp._busy(spa, size)

    def set(self, spa: int, *, assigned: bool, immutable: bool, asid: int = 0, gpa: int = 0,
            validated: bool = False, vmsa: bool = False, huge: bool = False,
            perms: tuple[int, int, int, int] | None = None) -> None:
        """Write the entry of the page at ``spa`` (its own entry, or the 2 MiB one when ``huge``)."""
        lo = ((_ASSIGNED if assigned else 0) | (_PAGESIZE if huge else 0) | (_IMMUTABLE if immutable else 0)
              | (gpa & _GPA_MASK) | (asid << _ASID_SHIFT) | (_VMSA if vmsa else 0)
              | (_VALIDATED if validated else 0))
        if perms is None:
            hi = _VMPL0_ALL if assigned else 0
        else:
            hi = perms[0] | perms[1] << 8 | perms[2] << 16 | perms[3] << 24
        self._rmp._put(spa >> PAGE_SHIFT, lo, hi)

    def update(self, spa: int, entry: RmpEntry, **changes: object) -> None:
        """Write ``entry`` with ``changes`` (field names of :class:`RmpEntry`) back for ``spa``."""
        fields = {
            "assigned": entry.assigned, "immutable": entry.immutable, "asid": entry.asid, "gpa": entry.gpa,
            "validated": entry.validated, "vmsa": entry.vmsa, "huge": bool(entry.page_size),
            "perms": entry.perms,
        }
        for k, v in changes.items():
            if k not in fields:
                raise InputError(f"RMP entries have no field {k!r}")
            fields[k] = v
        self.set(spa, **fields)  # type: ignore[arg-type]

    def asid_pages(self, asid: int) -> int:
        """RMP entries assigned to ``asid`` (SNP_ACTIVATE refuses an ASID that still has some)."""
        return self._rmp.asid_pages(asid)

    # ---- one read, one write: the per-page path of SNP_LAUNCH_UPDATE ---------------------------
    def governing(self, spa: int) -> tuple[int, int, int, RmpPageState, int, int, int]:
        """(pfn of the entry that governs the page at ``spa``, its raw low and high quadwords, and the
        entry's state, page size, ASID and GPA): what :meth:`entry` reads, without building the entry,
        with the raw values :meth:`make_guest_valid` takes back (AddressError outside the covered
        memory)."""
        r = self._rmp
        if not 0 <= spa < r._covered:
            raise AddressError(f"SPA {spa:#x} is not covered by the RMP ({r.covered:#x} bytes)")
        own, lo, hi = r._authoritative(spa >> PAGE_SHIFT)
        asid = (lo >> _ASID_SHIFT) & _ASID_MASK
        state = (RmpPageState.PRE_GUEST if asid and lo & _PRE_GUEST_MASK == _PRE_GUEST_BITS  # (the common case)
                 else _state_of(lo))
        return own, lo, hi, state, (lo >> 1) & 1, asid, lo & _GPA_MASK

    def make_guest_valid(self, own: int, lo: int, hi: int, vmsa: bool, perms: tuple[int, int, int]) -> None:
        """Entry ``own`` (read as ``lo``, ``hi`` by :meth:`governing` in the same command) made
        Guest-Valid: Assigned, its page size, GPA and ASID kept, Validated, Immutable cleared, RMP.VMSA
        as ``vmsa``, VMPL0's permissions kept and VMPL1-3's ``perms``: what :meth:`set` writes for
        those fields, without decoding and reading the entry again."""
        new_lo = ((lo & (_PAGESIZE | _GPA_MASK | _ASID_MASK << _ASID_SHIFT)) | _ASSIGNED | _VALIDATED
                  | (_VMSA if vmsa else 0))
        new_hi = (hi & 0xFF) | perms[0] << 8 | perms[1] << 16 | perms[2] << 24
        self._rmp._put(own, new_lo, new_hi, lo, hi)

    def is_context(self, spa: int) -> bool:
        """Whether the page at ``spa`` (inside the covered memory) is a Context page: what
        ``state(spa) == RmpPageState.CONTEXT`` answers, from the governing low quadword alone."""
        lo = self._rmp._governing_lo(spa >> PAGE_SHIFT)
        return lo & _CONTEXT_MASK == _CONTEXT_BITS
