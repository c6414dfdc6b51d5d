"""The host's page allocator: alloc_many against alloc one page at a time (recycled runs zeroed in one write)."""

from __future__ import annotations

import pytest

from sevemu._util.units import PAGE
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.errors import HardwareError
from sevemu.hw.host import HostCore
from sevemu.hw.rmp import HostRmpFault
from sevemu.hypervisor.memory import PageAllocator
from sevemu.hypervisor.sev import snp
from sevemu.scenario import Machine, build_machine


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


def _dirty_pair() -> tuple[PageAllocator, PageAllocator, Machine]:
    """Two allocators over the same 64 pages of one host (each run against the same DRAM in turn)."""
    m = build_machine("milan", seed=b"alloc")
    start = m.hv.pages.alloc() + PAGE
    return PageAllocator(m.hv.core, start, start + 64 * PAGE), PageAllocator(m.hv.core, start, start + 64 * PAGE), m


def _recycle(a: PageAllocator, core: HostCore) -> list[int]:
    """Pages handed out, written (some through the cache, some straight to DRAM), and freed in runs: up,
    down, single, then a gap."""
    spas = [a.alloc() for _ in range(20)]
    for i, spa in enumerate(spas):
        if i % 3:
            core.host_write(spa + 64 * i % PAGE, bytes([i + 1]) * 100)  # a dirty host line
        else:
            core.host_write_stream(spa, bytes([0xA0 + i]) * PAGE)
    order = spas[2:7] + spas[12:8:-1] + [spas[15]] + spas[17:19] + [spas[0]]
    a.free_many(order)
    return spas


def test_alloc_many_zeroes_runs_of_recycled_pages_as_alloc_one_at_a_time() -> None:
    """Recycled pages adjacent in the free list's order are zeroed with one write of their range: the
    same SPAs, the same count, and every page reads zeros (host view and DRAM) as after alloc one at a
    time."""
    one, many, m = _dirty_pair()
    core, dram = m.hv.core, m.soc.mc.dram
    spas = _recycle(one, core)
    got_one = [one.alloc() for _ in range(14)]
    after_one = [(core.host_read(spa, PAGE), dram.read(spa, PAGE)) for spa in spas]
    _recycle(many, core)
    got_many = many.alloc_many(14)
    assert got_many == got_one
    assert many.allocated == 14 + 20 - 13
    for spa, (host, in_dram) in zip(spas, after_one, strict=True):
        if spa in got_many:
            assert core.host_read(spa, PAGE) == host == bytes(PAGE)
            assert dram.read(spa, PAGE) == in_dram == bytes(PAGE)


def test_a_refused_run_is_zeroed_page_by_page_up_to_the_refused_page() -> None:
    """A recycled page the RMP makes a guest's (a host bug) refuses the run's one write before it
    stores anything; then the pages go one by one as alloc does: the ones before it zeroed and handed
    out, the fault raised at it, the ones after it still free."""
    m = build_machine("milan", seed=b"alloc", init=False)
    snp.platform_init(m.hv.sev)
    core = m.hv.core
    start = m.hv.pages.alloc() + PAGE
    a = PageAllocator(core, start, start + 16 * PAGE)
    spas = [a.alloc() for _ in range(6)]
    for spa in spas:
        core.host_write_stream(spa, b"\x5a" * PAGE)
    a.free_many(reversed(spas))  # handed out again in ascending order
    assert core.rmpupdate_state(spas[3], RmpUpdateState(gpa=0, assigned=1, asid=1)) == RmpResult.SUCCESS
    with pytest.raises(HostRmpFault):
        a.alloc_many(6)
    assert [core.host_read(spa, PAGE) == bytes(PAGE) for spa in spas[:3]] == [True] * 3
    assert m.soc.mc.dram.read(spas[4], PAGE) == b"\x5a" * PAGE
    assert a.alloc_many(2) == spas[4:6] and a.allocated == 3 + 2  # (the refused page is out of the list, as alloc leaves it)
