"""The guest kernel's page tables: an identity map with the C-bit (APM2 15.34:
the C-bit in a guest page-table entry selects private or shared).

An SEV guest decides page by page what is private: its page-table entries carry the C-bit (position
from CPUID Fn8000_001F EBX[5:0]).  :class:`PageTableBuilder` computes the entries of an identity map
of ``[0, size)``: 2 MiB pages with the C-bit set, except the 2 MiB regions that hold shared pages,
which get a 4 KiB page table where the shared pages have the C-bit clear.  The tables themselves
are written by the guest (with paging still off, so the writes are private) -- the hypervisor never
sees them in the clear.
"""

from __future__ import annotations

from collections.abc import Iterable

from sevemu._util.units import PAGE, PAGE_2M, GiB
from sevemu.abi.paging import Pte
from sevemu.errors import AddressError, AlignmentError

__all__ = ["PageTableBuilder"]

LARGE = PAGE_2M
GIB = GiB
_TABLE = int(Pte.P | Pte.RW)
_LEAF_2M = int(Pte.P | Pte.RW | Pte.PS)
_LEAF_4K = int(Pte.P | Pte.RW)


class PageTableBuilder:
    """Identity-map page tables placed from ``base`` (GPA) upwards."""

    def __init__(self, base: int, size: int, cbit: int, shared: Iterable[int] = ()) -> None:
        if base % PAGE:
            raise AlignmentError(f"page tables must start on a page, got {base:#x}")
        if size <= 0 or size % LARGE:
            raise AlignmentError(f"the identity map covers whole 2 MiB pages, got {size:#x}")
        self.base = base
        self.size = size
        self.cmask = cbit
        self.shared = sorted({s & ~0xFFF for s in shared})
        for s in self.shared:
            if not 0 <= s < size:
                raise AddressError(f"shared page {s:#x} is outside the mapped {size:#x} bytes")
        self._next = base
        self.entries: list[tuple[int, int]] = []  # (GPA of the entry, value)
        self.root = self._build()

    def _page(self) -> int:
        gpa = self._next
        self._next += PAGE
        return gpa

    @property
    def end(self) -> int:
        """First GPA after the tables."""
        return self._next

    def _build(self) -> int:
        c = self.cmask
        pml4 = self._page()
        split = {s & ~(LARGE - 1) for s in self.shared}
        shared = set(self.shared)
        for g in range(0, self.size, GIB):
            pdpt_index = (g >> 30) & 0x1FF
            pml4_index = g >> 39
            if pdpt_index == 0:
                pdpt = self._page()
                self.entries.append((pml4 + pml4_index * 8, pdpt | c | _TABLE))
            pd = self._page()
            self.entries.append((pdpt + pdpt_index * 8, pd | c | _TABLE))
            for m in range(g, min(g + GIB, self.size), LARGE):
                slot = pd + ((m >> 21) & 0x1FF) * 8
                if m in split:
                    pt = self._page()
                    self.entries.append((slot, pt | c | _TABLE))
                    for p in range(m, m + LARGE, PAGE):
                        leaf_c = 0 if p in shared else c
                        self.entries.append((pt + ((p >> 12) & 0x1FF) * 8, p | leaf_c | _LEAF_4K))
                else:
                    self.entries.append((slot, m | c | _LEAF_2M))
        return pml4 | c
