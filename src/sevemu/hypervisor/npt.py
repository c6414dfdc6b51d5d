"""Nested page tables built by the hypervisor (AMD NPT: the x86-64 4-level format, APM2 15.25 and 5.3).

The tables are real bytes in host memory, written with the host's ordinary (C=0) stores; the SoC's
nested walker reads them through the cache.  Leaves map one 4 KiB guest-physical page to a system
page.  The NPT C-bit of a leaf (host SME key for guest C=0 accesses, APM Table 15-31) is left clear:
the model's host does not run with SME.

The hypervisor also keeps its own index (GFN -> PFN), as KVM keeps memslots: it never needs to read
its tables back, and changing a mapping costs one entry write plus a TLB flush of the ASID.

2 MiB leaves (:meth:`NestedPageTable.map_huge`): a PDE with PS mapping a 2 MiB-aligned guest region to a
2 MiB-aligned contiguous host run (a huge page).  Any later change of one 4 KiB page of such a region
(:meth:`~NestedPageTable.map`, :meth:`~NestedPageTable.unmap`, or :meth:`~NestedPageTable.split` itself, which
KVM does when the RMP has 4 KiB entries under a 2 MiB mapping -- an #NPF with SIZEM) first splits the leaf:
a page table of 512 entries mapping the same pages replaces it (KVM's huge-page split).
:meth:`NestedPageTable.release` gives every table page back to the host allocator when the VM goes.
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

from sevemu._util.units import PAGE, PAGE_2M, PAGE_MASK, PAGE_SHIFT, is_aligned
from sevemu.abi.paging import Pte
from sevemu.errors import AddressError, AlignmentError, HardwareError
from sevemu.hw.host import HostCore
from sevemu.hypervisor.memory import PageAllocator

__all__ = ["NestedPageTable"]

_TABLE = int(Pte.P | Pte.RW | Pte.US)
_LEAF = int(Pte.P | Pte.US)
_RW = int(Pte.RW)
SMALL_BATCH = 64
"""Batches of :meth:`NestedPageTable.map_many` (and :meth:`~sevemu.hypervisor.vm.Vm.back_pages`) up to
this many pages take the loop without arrays (the same checks, tables and entries)."""
_PS = int(Pte.PS)
_SUBPAGES = PAGE_2M // PAGE


class NestedPageTable:
    """One VM's NPT."""

    def __init__(self, core: HostCore, alloc: PageAllocator, gpa_limit: int) -> None:
        self._core = core
        self._alloc = alloc
        self.gpa_limit = gpa_limit
        self.root = alloc.alloc()
        self._tables: dict[tuple[int, int], int] = {(4, 0): self.root}  # (level, gpa prefix) -> SPA
        self.mappings: dict[int, int] = {}  # GFN -> SPA of the backing page
        self._columns: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None = None
        """:meth:`columns` since the last change of ``mappings`` (every change below drops it)."""
        self.table_pages = 1
        self.huge: set[int] = set()
        """2 MiB regions (GPA >> 21) mapped by one PDE with PS (:meth:`map_huge`)."""

    def _table(self, level: int, gpa: int) -> int:
        """SPA of the level-``level`` table covering ``gpa`` (level 4 = PML4 ... 1 = PT); a page table
        under a 2 MiB leaf is made by splitting the leaf."""
        key = (level, gpa >> (PAGE_SHIFT + 9 * level))
        spa = self._tables.get(key)
        if spa is None and level == 1 and gpa >> 21 in self.huge:
            self.split(gpa)
            spa = self._tables[key]
        if spa is None:
            parent = self._table(level + 1, gpa)
            spa = self._alloc.alloc()
            self.table_pages += 1
            index = (gpa >> (PAGE_SHIFT + 9 * level)) & 0x1FF
            self._core.host_write(parent + index * 8, (spa | _TABLE).to_bytes(8, "little"))
            self._tables[key] = spa
        return spa

    def map(self, gpa: int, spa: int, writable: bool = True) -> None:
        """Map the 4 KiB guest page at ``gpa`` to the system page ``spa``."""
        if not (is_aligned(gpa, PAGE) and is_aligned(spa, PAGE)):
            raise AlignmentError(f"NPT mappings are 4 KiB pages: GPA {gpa:#x}, SPA {spa:#x}")
        if not 0 <= gpa < self.gpa_limit:
            raise AddressError(f"GPA {gpa:#x} is beyond the VM's {self.gpa_limit:#x} bytes")
        if not self._tables:
            raise HardwareError("the nested page table was released (its VM was destroyed)")
        pt = self._table(1, gpa)
        entry = spa | _LEAF | (_RW if writable else 0)
        self._core.host_write(pt + ((gpa >> PAGE_SHIFT) & 0x1FF) * 8, entry.to_bytes(8, "little"))
        self.mappings[gpa >> PAGE_SHIFT] = spa
        self._columns = None

    def map_huge(self, gpa: int, spa: int, writable: bool = True) -> None:
        """Map the 2 MiB guest region at ``gpa`` to the 2 MiB host run at ``spa`` with one PDE (PS).
        The region must not be mapped already (not a page of it)."""
        if not (is_aligned(gpa, PAGE_2M) and is_aligned(spa, PAGE_2M)):
            raise AlignmentError(f"a 2 MiB NPT leaf maps 2 MiB-aligned regions: GPA {gpa:#x}, SPA {spa:#x}")
        if not 0 <= gpa or gpa + PAGE_2M > self.gpa_limit:
            raise AddressError(f"GPA {gpa:#x}+2 MiB is beyond the VM's {self.gpa_limit:#x} bytes")
        if not self._tables:
            raise HardwareError("the nested page table was released (its VM was destroyed)")
        first = gpa >> PAGE_SHIFT
        if (1, gpa >> 21) in self._tables or not self.mappings.keys().isdisjoint(range(first, first + _SUBPAGES)):
            raise AddressError(f"GPA {gpa:#x}: the 2 MiB region is already (partly) mapped")
        pd = self._table(2, gpa)
        entry = spa | _LEAF | _PS | (_RW if writable else 0)
        self._core.host_write(pd + ((gpa >> 21) & 0x1FF) * 8, entry.to_bytes(8, "little"))
        self.huge.add(gpa >> 21)
        self.mappings.update(zip(range(first, first + _SUBPAGES), range(spa, spa + PAGE_2M, PAGE)))
        self._columns = None

    def split(self, gpa: int) -> bool:
        """Split the 2 MiB leaf mapping ``gpa`` (if any) into a page table of 512 4 KiB leaves mapping
        the same pages, with the same permissions; whether there was one.  The ASID's TLB must be
        flushed after, as for any change of a mapping."""
        region = gpa >> 21
        if region not in self.huge:
            return False
        pd = self._tables[(2, gpa >> 30)]
        slot = pd + (region & 0x1FF) * 8
        pde = int.from_bytes(self._core.host_read(slot, 8), "little")
        pt = self._alloc.alloc()
        self.table_pages += 1
        spa0 = pde & ~(PAGE_2M - 1) & ((1 << 52) - 1)
        flags = _LEAF | (pde & _RW)
        entries = np.arange(spa0, spa0 + PAGE_2M, PAGE, dtype=np.uint64) | np.uint64(flags)
        self._core.host_write(pt, entries.astype("<u8").tobytes())
        self._tables[(1, region)] = pt
        self.huge.discard(region)
        self._core.host_write(slot, (pt | _TABLE).to_bytes(8, "little"))
        return True

    def map_many(self, pairs: list[tuple[int, int]]) -> None:
        """:meth:`map` of each (GPA, SPA) in order (writable), the entries of neighbouring GPAs in one
        page table written with one store (the same tables and entries).  Every pair is checked
        before any is mapped."""
        if not pairs:
            return
        if len(pairs) <= SMALL_BATCH:
            self._map_few(pairs)
            return
        try:
            cols = np.array(pairs, dtype=np.int64).reshape(len(pairs), 2)
        except (OverflowError, ValueError):  # beyond 63 bits (or not pairs): the checks below name it
            cols = None
        if cols is None or ((cols[:, 0] | cols[:, 1]) & PAGE_MASK).any() or (cols < 0).any() \
                or (cols[:, 0] >= self.gpa_limit).any():
            for gpa, spa in pairs:
                if (gpa | spa) & PAGE_MASK:
                    raise AlignmentError(f"NPT mappings are 4 KiB pages: GPA {gpa:#x}, SPA {spa:#x}")
                if not 0 <= gpa < self.gpa_limit:
                    raise AddressError(f"GPA {gpa:#x} is beyond the VM's {self.gpa_limit:#x} bytes")
            raise AddressError(f"SPA of an NPT mapping outside 0..2^63: {pairs!r:.200}")
        if not self._tables:
            raise HardwareError("the nested page table was released (its VM was destroyed)")
        gpas = cols[:, 0]
        # a run ends where the next GPA is not the next page or starts another page table
        cuts = np.flatnonzero((np.diff(gpas) != PAGE) | ((gpas[1:] & 0x1F_FFFF) == 0)) + 1
        entries = (cols[:, 1] | (_LEAF | _RW)).astype("<u8")
        gfns = (gpas >> PAGE_SHIFT).tolist()
        spas = cols[:, 1].tolist()
        bounds = [0, *cuts.tolist(), len(pairs)]
        for i, j in itertools.pairwise(bounds):
            first = pairs[i][0]
            pt = self._table(1, first)
            self._core.host_write(pt + ((first >> PAGE_SHIFT) & 0x1FF) * 8, entries[i:j].tobytes())
            self.mappings.update(zip(gfns[i:j], spas[i:j]))
            self._columns = None

    def _map_few(self, pairs: list[tuple[int, int]]) -> None:
        """:meth:`map_many` of a short batch without the array set-up (which costs more than it saves
        for a few pages): the same checks first, the same runs, tables and entries."""
        limit = self.gpa_limit
        for gpa, spa in pairs:
            if (gpa | spa) & PAGE_MASK:
                raise AlignmentError(f"NPT mappings are 4 KiB pages: GPA {gpa:#x}, SPA {spa:#x}")
            if not 0 <= gpa < limit:
                raise AddressError(f"GPA {gpa:#x} is beyond the VM's {limit:#x} bytes")
        if not all(0 <= spa < 1 << 63 for _, spa in pairs):
            raise AddressError(f"SPA of an NPT mapping outside 0..2^63: {pairs!r:.200}")
        if not self._tables:
            raise HardwareError("the nested page table was released (its VM was destroyed)")
        n = len(pairs)
        i = 0
        flags = _LEAF | _RW
        mappings = self.mappings
        while i < n:
            first = prev = pairs[i][0]
            j = i + 1
            while j < n and (nxt := pairs[j][0]) == prev + PAGE and nxt & 0x1F_FFFF:
                prev = nxt
                j += 1
            run = pairs[i:j]
            pt = self._table(1, first)
            self._core.host_write(pt + ((first >> PAGE_SHIFT) & 0x1FF) * 8,
                                  b"".join((spa | flags).to_bytes(8, "little") for _, spa in run))
            mappings.update((gpa >> PAGE_SHIFT, spa) for gpa, spa in run)
            self._columns = None
            i = j

    def unmap(self, gpa: int) -> int | None:
        """Remove the mapping of ``gpa``; returns the SPA it pointed to."""
        spa = self.mappings.pop(gpa >> PAGE_SHIFT, None)
        self._columns = None
        if spa is not None:
            self.split(gpa)
            pt = self._tables[(1, gpa >> 21)]
            self._core.host_write(pt + ((gpa >> PAGE_SHIFT) & 0x1FF) * 8, bytes(8))
        return spa

    def release(self) -> None:
        """Give every table page (root included) back to the allocator; the table is unusable after."""
        for spa in self._tables.values():
            self._alloc.free(spa)
        self._tables.clear()
        self.mappings.clear()
        self._columns = None
        self.huge.clear()
        self.table_pages = 0

    def columns(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Every mapping as two read-only columns, ascending by GFN: the GFNs and the SPAs of their
        pages -- what ``sorted(mappings.items())`` lists, read in one pass over the index (its keys
        and values in the same order) instead of a lookup per page, sorted only when the index is
        not in GFN order already (pages backed in ascending runs), and kept until a mapping changes."""
        cached = self._columns
        if cached is not None and len(cached[0]) == len(self.mappings):
            return cached
        n = len(self.mappings)
        gfns = np.fromiter(self.mappings.keys(), dtype=np.int64, count=n)
        spas = np.fromiter(self.mappings.values(), dtype=np.int64, count=n)
        if n > 1 and not bool((gfns[1:] > gfns[:-1]).all()):
            order = np.argsort(gfns, kind="stable")
            gfns, spas = gfns[order], spas[order]
        gfns.flags.writeable = spas.flags.writeable = False
        self._columns = (gfns, spas)
        return gfns, spas

    def lookup_many(self, gfns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The SPA of the page of each GFN of a column, -1 where none is mapped: ``mappings.get(gfn,
        -1)`` of each, looked up in :meth:`columns` (indexed directly when the mapped GFNs are one
        run, else one binary search per GFN)."""
        keys, spas = self.columns()
        n = len(keys)
        if not n:
            return np.full(len(gfns), -1, dtype=np.int64)
        first = int(keys[0])
        if int(keys[-1]) - first == n - 1:  # one run of GFNs: each one's index is its distance from the first
            at = gfns - np.int64(first)
            if not len(at) or (int(at.min()) >= 0 and int(at.max()) < n):
                found: npt.NDArray[np.int64] = spas[at]  # (every GFN inside the run: a gather)
                return found
            inside = (at >= 0) & (at < n)
            return np.where(inside, spas[np.where(inside, at, 0)], np.int64(-1))
        at = np.minimum(np.searchsorted(keys, gfns), n - 1)
        return np.where(keys[at] == gfns, spas[at], np.int64(-1))

    def lookup(self, gpa: int) -> int | None:
        """SPA backing ``gpa`` (with the page offset), or None if unmapped."""
        spa = self.mappings.get(gpa >> PAGE_SHIFT)
        return None if spa is None else spa | (gpa & PAGE_MASK)
