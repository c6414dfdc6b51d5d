"""The host's page allocator: alloc_many against alloc one page at a time."""

from __future__ import annotations

import pytest

from sevemu._util.units import PAGE
from sevemu.errors import HardwareError
from sevemu.hypervisor.memory import PageAllocator
from sevemu.scenario import build_machine


def _pair() -> tuple[PageAllocator, PageAllocator]:
    hv = build_machine("milan", seed=b"alloc").hv
    start = hv.pages.alloc() + PAGE  # a range nothing else uses, twice
    return PageAllocator(hv.core, start, start + 64 * PAGE), PageAllocator(hv.core, start, start + 64 * PAGE)


def test_alloc_many_hands_out_what_alloc_one_at_a_time_does() -> None:
    """Recycled pages first (in the free list's order, zeroed), then fresh ones from the bump range;
    the same count of pages in use."""
    one, many = _pair()
    for a in (one, many):
        spas = [a.alloc() for _ in range(10)]
        for spa in spas[2:7]:
            a.free(spa)
    assert [one.alloc() for _ in range(9)] == many.alloc_many(9)
    assert one.allocated == many.allocated == 14
    assert many.alloc_many(0) == []


def test_alloc_many_refuses_before_handing_out_any_when_short() -> None:
    _, a = _pair()
    a.free(a.alloc())
    with pytest.raises(HardwareError, match="out of physical memory"):
        a.alloc_many(65)
    assert a.allocated == 0
    assert len(a.alloc_many(64)) == 64



def test_free_many_gives_back_what_free_one_at_a_time_does() -> None:
    """The same pages back in the same order (the next allocations hand them out alike) and the
    same count in use."""
    one, many = _pair()
    for a in (one, many):
        spas = [a.alloc() for _ in range(10)]
        a.free(spas[0])
    back = [spas[i] for i in (7, 3, 5)]  # (both allocators handed out the same SPAs)
    for spa in back:
        one.free(spa)
    many.free_many(iter(back))
    assert one.allocated == many.allocated == 6
    assert [one.alloc() for _ in range(6)] == many.alloc_many(6)
