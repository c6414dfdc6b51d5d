"""The page pool's compare of a page with its snapshot: the C helper ``line_runs`` and the Python
loop beside it give the same runs of changed lines for any changes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu._util.units import LINE, PAGE
from sevemu.hw import memaccel
from sevemu.hw.uc.pool import line_runs

needs_c = pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")


def _reference(cur: bytes, snap: bytes) -> list[tuple[int, int]]:
    changed = [o for o in range(0, PAGE, LINE) if cur[o : o + LINE] != snap[o : o + LINE]]
    runs: list[tuple[int, int]] = []
    for o in changed:
        if runs and runs[-1][1] == o:
            runs[-1] = (runs[-1][0], o + LINE)
        else:
            runs.append((o, o + LINE))
    return runs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, PAGE - 1), max_size=40), st.integers(0, 2**32))
def test_line_runs_name_exactly_the_changed_lines(offsets: list[int], seed: int) -> None:
    snap = random.Random(seed).randbytes(PAGE)
    cur = bytearray(snap)
    for o in offsets:
        cur[o] ^= 0x5A
    want = _reference(bytes(cur), snap)
    assert line_runs(cur, snap) == want
    if memaccel.ENABLED:
        assert memaccel.helpers.line_runs(cur, snap) == want


@needs_c
def test_line_runs_refuses_buffers_of_other_lengths() -> None:
    with pytest.raises(ValueError, match="one length"):
        memaccel.helpers.line_runs(bytes(PAGE), bytes(PAGE - LINE))
    with pytest.raises(ValueError, match="multiple of 64"):
        memaccel.helpers.line_runs(bytes(100), bytes(100))
    assert memaccel.helpers.line_runs(bytes(PAGE), bytes(PAGE)) == []
    assert memaccel.helpers.line_runs(b"\1" * PAGE, bytes(PAGE)) == [(0, PAGE)]


@needs_c
@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, PAGE - 1), max_size=40), st.integers(0, 2**32), st.integers(0, 3))
def test_slot_sync_gives_line_runs_and_brings_the_snapshot_up_to_date(offsets: list[int], seed: int,
                                                                       slot: int) -> None:
    snap = random.Random(seed).randbytes(PAGE)
    buf = bytearray(random.Random(seed + 1).randbytes(4 * PAGE))
    cur = bytearray(snap)
    for o in offsets:
        cur[o] ^= 0x5A
    buf[slot * PAGE : (slot + 1) * PAGE] = cur
    mine = bytearray(snap)
    assert memaccel.helpers.slot_sync(buf, slot * PAGE, mine) == _reference(bytes(cur), snap)
    assert mine == cur
    assert memaccel.helpers.slot_sync(buf, slot * PAGE, mine) == []


@needs_c
def test_slot_sync_and_copy_changed_refuse_ranges_outside_their_buffers() -> None:
    with pytest.raises(ValueError, match="whole lines"):
        memaccel.helpers.slot_sync(bytes(PAGE), LINE, bytearray(PAGE))
    with pytest.raises(BufferError):
        memaccel.helpers.slot_sync(bytes(PAGE), 0, bytes(PAGE))  # the snapshot must be writable
    dst = bytearray(PAGE)
    assert memaccel.helpers.copy_changed(dst, 8, b"ab") is True and dst[8:10] == b"ab"
    assert memaccel.helpers.copy_changed(dst, 8, b"ab") is False
    with pytest.raises(ValueError):
        memaccel.helpers.copy_changed(dst, PAGE - 1, b"ab")
    with pytest.raises(BufferError):
        memaccel.helpers.copy_changed(bytes(PAGE), 0, b"ab")


@needs_c
@pytest.mark.parametrize("lines", [[7, 8], [7], [8], [0, 63], [15, 16, 17, 31, 32], list(range(64)), [63], [6, 9]])
def test_slot_sync_runs_across_the_blocks_it_skips(lines: list[int]) -> None:
    # The scan skips equal 512-byte blocks (csrc/mem_accel.c block_same): runs that end at, cross or
    # start at a block's edge are still named exactly, and the snapshot taken up to date.
    snap = random.Random(7).randbytes(PAGE)
    cur = bytearray(snap)
    for i in lines:
        cur[i * LINE + (i % LINE)] ^= 0xFF
    mine = bytearray(snap)
    buf = bytearray(PAGE) + cur
    assert memaccel.helpers.slot_sync(buf, PAGE, mine) == _reference(bytes(cur), snap)
    assert mine == cur
    assert memaccel.helpers.line_runs(cur, snap) == _reference(bytes(cur), snap)
