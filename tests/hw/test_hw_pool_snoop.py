"""``PoolSnoop`` (``csrc/mem_accel.c``): the page pool's snoop in one call for the cases an exit's
host accesses make, every other call handed unchanged to the pool's Python ``snoop``; what it does
itself is what :meth:`PagePool.snoop <sevemu.hw.uc.pool.PagePool.snoop>` does (the write-update of
``_take``), checked here on a stand-in pool and, for a real engine, in
``tests/hypervisor/test_hv_es_fastpath.py``."""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from sevemu._util.units import PAGE
from sevemu.hw import memaccel

needs_c = pytest.mark.skipif(not memaccel.HOST_PORT, reason="csrc/mem_accel.c not built")

PAGE_KEY = 0x40000  # the page of slot 1


@dataclass
class _Stats:
    slot_updates: int = 0


def _pool(synced: bool = True, code_slots: set[int] | None = None) -> tuple[Any, list[tuple[Any, ...]]]:
    """A stand-in pool (the attributes PoolSnoop reads) and the list of calls handed to its fallback."""
    pool = SimpleNamespace(synced=synced, slot_of={PAGE_KEY: 1}, mm=mmap.mmap(-1, 4 * PAGE), _snap={1: bytes(PAGE)},
                           code_slots=code_slots, updated=[], stats=_Stats())
    return pool, []


def _snoop(pool: Any, calls: list[tuple[Any, ...]]) -> Any:
    return memaccel.helpers.PoolSnoop(pool, lambda *a, **kw: calls.append(a))


@needs_c
def test_reads_of_a_synced_pool_and_pages_without_a_slot_need_nothing() -> None:
    pool, calls = _pool()
    snoop = _snoop(pool, calls)
    assert snoop(PAGE_KEY, PAGE_KEY + 64, False, None) is None  # synced: the cache holds it already
    assert snoop(PAGE_KEY + PAGE, PAGE_KEY + PAGE + 64, True, memoryview(bytes(64))) is None  # no slot
    pool.slot_of = {}
    assert snoop(PAGE_KEY, PAGE_KEY + 64, True, None) is None  # no slot at all
    assert calls == [] and pool.stats.slot_updates == 0


@needs_c
@pytest.mark.parametrize("code", [None, {1}, {2}])
def test_the_write_update_of_a_synced_slot_is_the_pools(code: set[int] | None) -> None:
    pool, calls = _pool(code_slots=code)
    snoop = _snoop(pool, calls)
    data = bytes(range(128))
    snoop(PAGE_KEY + 0x380, PAGE_KEY + 0x400, True, memoryview(data))
    mm = pool.mm
    assert mm[PAGE + 0x380 : PAGE + 0x400] == data and mm[PAGE : PAGE + 0x380] == bytes(0x380)
    snap = pool._snap[1]
    assert type(snap) is bytearray and snap[0x380:0x400] == data  # (made a bytearray, as _take makes it)
    assert pool.updated == ([] if code == {2} else [1])  # noted when the slot holds code (or all do)
    assert pool.stats.slot_updates == 1 and calls == []
    snoop(PAGE_KEY + 0x380, PAGE_KEY + 0x400, True, memoryview(data))  # the same bytes: no change to note
    assert pool.updated == ([] if code == {2} else [1]) and pool.stats.slot_updates == 2


@needs_c
@pytest.mark.parametrize("case", ["not_synced", "no_data", "two_pages", "short_data", "keywords", "huge"])
def test_every_other_snoop_goes_to_the_pool(case: str) -> None:
    pool, calls = _pool(synced=case != "not_synced")
    snoop = _snoop(pool, calls)
    lo, hi = PAGE_KEY + 0x380, PAGE_KEY + 0x400
    args: tuple[Any, ...] = {"not_synced": (lo, hi, True, memoryview(bytes(128))), "no_data": (lo, hi, True),
                             "two_pages": (lo, hi + PAGE, True, memoryview(bytes(128 + PAGE))),
                             "short_data": (lo, hi, True, memoryview(bytes(64))),
                             "keywords": (lo, hi, True), "huge": (0, 1 << 64, True)}[case]
    if case == "keywords":
        snoop(*args, data=None)
    else:
        snoop(*args)
    assert len(calls) == 1 and calls[0][:3] == args[:3]  # handed on as given
    assert pool.mm[:] == bytes(4 * PAGE) and pool.stats.slot_updates == 0  # nothing done here
