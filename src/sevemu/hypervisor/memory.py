"""The host's physical-memory allocator (the hypervisor's page allocator).

DRAM below ``host_reserved`` belongs to the host itself (its own data, PSP command buffers, nested
page tables); guest memory is handed out page by page from above it, on demand, as KVM backs guest
memory lazily.  A page that comes back to the allocator is zeroed by the host before reuse (with
plain C=0 streaming writes, the contents of Linux's ``clear_page`` followed by a flush to DRAM), so a
new owner never inherits another guest's ciphertext in the clear -- nor its plaintext, which never
reached DRAM anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

from sevemu._util.units import PAGE, PAGE_2M, align_up
from sevemu.errors import AddressError, HardwareError
from sevemu.hw.host import HostCore
from sevemu.hw.rmp import HostRmpFault

__all__ = ["PageAllocator"]

_ZERO_PAGE = bytes(PAGE)
_ZERO_2M = memoryview(bytes(PAGE_2M))


def _zeros(pages: int) -> bytes | memoryview:
    """``pages`` pages of zeros (a view of one shared buffer up to 2 MiB)."""
    return _ZERO_2M[: pages * PAGE] if pages * PAGE <= PAGE_2M else bytes(pages * PAGE)


class PageAllocator:
    """Bump allocator with a free list over a range of system-physical pages."""

    def __init__(self, core: HostCore, start: int, end: int) -> None:
        self._core = core
        self._next = start
        self._end = end
        self._free: list[int] = []
        self.allocated = 0
        """Pages handed out and not freed."""

    def alloc(self) -> int:
        """A page's SPA; recycled pages are zeroed first."""
        if self._free:
            spa = self._free.pop()
            # Zeroed with streaming stores: the host's lines of the page are written back and
            # dropped, the zeros go straight to DRAM -- the contents of a zeroing followed by
            # CLFLUSH, so no dirty host line is left to be written back over what the new owner
            # stores later, without filling the cache with a page nobody reads.
            self._core.host_write_stream(spa, _ZERO_PAGE)
        elif self._next < self._end:
            spa = self._next
            self._next += PAGE
        else:
            raise HardwareError("host is out of physical memory")
        self.allocated += 1
        return spa

    def alloc_many(self, n: int) -> list[int]:
        """``n`` pages: the SPAs :meth:`alloc` would give called ``n`` times, in order (recycled
        pages zeroed first), the fresh ones counted out of the bump range in one step.  Raises
        before handing any out when fewer than ``n`` are left."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        free = self._free
        recycled = min(n, len(free))
        if n - recycled > (self._end - self._next) // PAGE:
            raise HardwareError("host is out of physical memory")
        spas: list[int] = []
        while len(spas) < recycled:  # recycled pages, zeroed a run of adjacent ones at a time
            spas += self._take_run(recycled - len(spas))
        fresh = n - recycled
        spas += range(self._next, self._next + fresh * PAGE, PAGE)
        self._next += fresh * PAGE
        self.allocated += fresh
        return spas

    def _take_run(self, most: int) -> list[int]:
        """:meth:`alloc` of up to ``most`` recycled pages (at least one) that lie next to each other
        in the order the free list hands them out (each one page below or above the one before): the
        same pages, zeroed with one streaming write of their range (the same DRAM contents and host
        lines as one per page; the write checks the whole range first and stores nothing when it
        refuses, then they are zeroed page by page as :meth:`alloc` does, up to the one refused)."""
        free = self._free
        last = len(free) - 1
        run = 1
        if most > 1 and last > 0:
            step = free[last - 1] - free[last]
            if step in (PAGE, -PAGE):
                while run < most and run <= last and free[last - run] - free[last - run + 1] == step:
                    run += 1
        if run == 1:
            return [self.alloc()]
        spas = free[last - run + 1 :][::-1]
        try:
            self._core.host_write_stream(min(spas[0], spas[-1]), _zeros(run))
        except (AddressError, HostRmpFault):  # refused before anything was written: page by page, as alloc
            return [self.alloc() for _ in range(run)]
        del free[last - run + 1 :]
        self.allocated += run
        return spas

    def alloc_huge(self) -> int | None:
        """A 2 MiB-aligned run of 512 fresh pages (a transparent huge page), its first SPA, or None when
        the bump range has no such run left.  The pages skipped to reach the alignment go to the free
        list (zeroed when handed out)."""
        start = align_up(self._next, PAGE_2M)
        if start + PAGE_2M > self._end:
            return None
        self._free.extend(range(self._next, start, PAGE))
        self._next = start + PAGE_2M
        self.allocated += PAGE_2M // PAGE
        return start

    def free(self, spa: int) -> None:
        """Give the page at ``spa`` back (it is zeroed when handed out again)."""
        self.allocated -= 1
        self._free.append(spa)

    def free_many(self, spas: Iterable[int]) -> None:
        """:meth:`free` of each page, in order."""
        before = len(self._free)
        self._free.extend(spas)
        self.allocated -= len(self._free) - before
