"""sevemu.hw.columns: the C summaries of u64 columns (csrc/mem_accel.c) give what their numpy
expressions give -- on ascending, evenly spaced, shuffled, repeated, wrapping and single-value
columns -- and their arguments are checked."""

from __future__ import annotations

import numpy as np
import pytest

from sevemu.hw import columns, memaccel

pytestmark = pytest.mark.skipif(not memaccel.COLUMNS, reason="the C helpers were not built")

TOP = (1 << 64) - 1


def _cases(rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for n in (1, 2, 3, 7, 64, 510):
        base = int(rng.integers(0, 1 << 40)) & ~0xFFF
        out += [np.arange(n, dtype=np.uint64) * np.uint64(0x1000) + np.uint64(base),  # pages, evenly spaced
                np.arange(n, dtype=np.uint64) * np.uint64(0x40) + np.uint64(base),  # header slots
                np.full(n, base, dtype=np.uint64),  # one value
                rng.integers(0, 1 << 63, n, dtype=np.uint64),  # anything
                np.arange(n, dtype=np.uint64)[::-1] * np.uint64(0x1000) + np.uint64(base),  # descending
                np.arange(n, dtype=np.uint64) * np.uint64(0x1000) + np.uint64(TOP - 0x1000 * (n // 2))]  # wraps
        runs = np.arange(n, dtype=np.uint64) * np.uint64(0x1000) + np.uint64(base)
        runs[n // 3 :] += np.uint64(0x5000)  # two runs
        out.append(runs)
        if n > 2:
            shuffled = runs.copy()
            rng.shuffle(shuffled)
            out.append(shuffled)
            uneven = runs.copy()
            uneven[-1] += np.uint64(1)
            out.append(uneven)
    return out


def _both(monkeypatch: pytest.MonkeyPatch, fn, *args):  # type: ignore[no-untyped-def]
    got = fn(*args)
    monkeypatch.setattr(memaccel, "COLUMNS", False)
    try:
        want = fn(*args)
    finally:
        monkeypatch.setattr(memaccel, "COLUMNS", True)
    return got, want


def test_stats_and_runs_in_c_are_the_numpy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    for col in _cases(rng):
        for length in (0, 0x34, 0x40, 0x1000, TOP):
            got, want = _both(monkeypatch, columns.stats, col, (length,))
            assert got == want, (col[:4], length)
        got_runs, want_runs = _both(monkeypatch, columns.runs, col, 0x1000)
        assert got_runs == want_runs
        assert sum(length for _, _, length in got_runs) == 0x1000 * len(col)
    stacked = np.stack([np.arange(5, dtype=np.uint64), np.full(5, 9, dtype=np.uint64)])
    got, want = _both(monkeypatch, columns.stats, stacked, (1, 0))
    assert got == want == [columns.ColumnStats(0, 4, 7, 1, True), columns.ColumnStats(9, 9, 9, 0, True)]
    assert columns.runs(np.zeros(0, dtype=np.uint64), 0x1000) == []


def test_record_words_strided_rows_and_key_run_in_c_are_the_numpy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    size, mask = 0x34, np.array([0, 0xFFFF_FFFF_0000_0000, 0, 0, 0, 0, 0xFFFF_FFFF_0000_0000], dtype=np.uint64)
    for n in (1, 2, 17):
        raw = bytearray(rng.integers(0, 256, n * size, dtype=np.uint8).tobytes())
        for i in range(n):  # reserved bytes clear
            raw[i * size + 12 : i * size + 16] = bytes(4)
        raw[n * size - 4 : n * size] = bytes(4)  # (the last, partial word's reserved half)
        for r in range(n):
            raw[r * size + 0x34 - 4 : r * size + 0x34] = bytes(4)
        picks, ands = (0, 1, 6, 1), (TOP, TOP, TOP, 0xFFF)
        got, want = _both(monkeypatch, columns.record_words, bytes(raw), size, mask, picks, ands)
        assert got is not None and want is not None and (got == want).all() and got.shape == (4, n)
        bad = bytearray(raw)
        bad[(n - 1) * size + 13] = 1  # a reserved byte of the last record
        assert _both(monkeypatch, columns.record_words, bytes(bad), size, mask, picks, ands) == (None, None)
        span = rng.integers(0, 256, 64 * n + 8, dtype=np.uint8).tobytes()
        got_rows, want_rows = _both(monkeypatch, columns.strided_rows, span, 8, 64, n, size)
        assert got_rows == want_rows == b"".join(span[8 + 64 * i : 8 + 64 * i + size] for i in range(n))
        entries = np.zeros((n + 2, 2), dtype="<u8")
        entries[:, 0] = 0x2_0000_0011 + (np.arange(n + 2) >= n) * 1  # (the reserved half differs: ignored)
        entries[:, 0] |= (np.arange(n + 2, dtype=np.uint64) % 2) << np.uint64(40)
        assert _both(monkeypatch, columns.key_run, entries.tobytes(), 0xFFFF_FFFF) == (n, n)


def test_lookup_in_c_is_a_dict_get_per_value(monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = {3: 0x1000, 5: 0x7FFF_FFFF_FFFF_F000, 7: 0, 1 << 40: 9}
    col = np.array([3 << 12, 4 << 12, 5 << 12 | 0xFFF, 7 << 12, 1 << 52, TOP], dtype=np.uint64)
    got, want = _both(monkeypatch, columns.lookup, mapping, col, 12)
    assert got.dtype == want.dtype == np.int64
    assert got.tolist() == want.tolist() == [0x1000, -1, 0x7FFF_FFFF_FFFF_F000, 0, 9, -1]
    assert columns.lookup(mapping, np.array([3, 5], dtype=np.uint64)).tolist() == [0x1000, 0x7FFF_FFFF_FFFF_F000]
    with pytest.raises(TypeError):
        memaccel.helpers.u64_dict_get({1: "x"}, np.array([1], dtype=np.uint64).data, 0)
    with pytest.raises(OverflowError):
        memaccel.helpers.u64_dict_get({1: 1 << 64}, np.array([1], dtype=np.uint64).data, 0)
    with pytest.raises(ValueError):
        memaccel.helpers.u64_dict_get({}, bytes(8), 64)


def test_the_c_helpers_check_their_arguments() -> None:
    helpers = memaccel.helpers
    with pytest.raises(ValueError, match="columns"):
        helpers.u64_columns(bytes(24), (0, 0))
    with pytest.raises(ValueError):
        helpers.u64_runs(bytes(7), 1)
    with pytest.raises(ValueError):
        helpers.record_words(bytes(0x34 * 2), 0x34, bytes(56), (7,), (TOP,))  # no word 7
    with pytest.raises(ValueError):
        helpers.record_words(bytes(0x35), 0x34, bytes(56), (0,), (TOP,))  # not whole records
    with pytest.raises(ValueError, match="fit"):
        helpers.strided_rows(bytes(100), 40, 32, 3, 8)  # 40 + 64 + 8 > 100
    with pytest.raises(ValueError):
        helpers.key_run(b"", 0)
    with pytest.raises(TypeError):
        helpers.u64_columns(bytes(8), [0])  # type: ignore[arg-type]
    pages: dict[int, bytearray] = {}
    for spa, stride, size in ((0, 48, 40), (32, 64, 52), (0, 64, 65), (0, 64, 0)):  # rows that may cross a page
        with pytest.raises(ValueError):
            helpers.dram_scatter_rows(pages, spa, stride, bytes(size or 1), size)
    with pytest.raises(ValueError):
        helpers.dram_scatter_rows(pages, 0, 64, bytes(53), 52)  # not whole rows
    with pytest.raises(TypeError):
        helpers.dram_scatter_rows([], 0, 64, bytes(52), 52)  # type: ignore[arg-type]
    store: dict[int, bytearray] = {5: bytearray(b"\x01" * 4096)}
    assert helpers.dram_page_list(store, 4, 3, False) is None and list(store) == [5]  # (absent: nothing stored)
    listed = helpers.dram_page_list(store, 4, 3, True)
    assert listed is not None and [p is store[4 + i] for i, p in enumerate(listed)] == [True] * 3
    assert bytes(listed[0]) == bytes(listed[2]) == bytes(4096) and listed[1] == b"\x01" * 4096
    assert helpers.dram_page_list(store, 4, 3, False) == listed and helpers.dram_page_list(store, 9, 0, False) == []
    with pytest.raises(TypeError):
        helpers.dram_page_list([], 0, 1, True)  # type: ignore[arg-type]
    pages[1] = bytearray(8)  # not a page
    with pytest.raises(TypeError):
        helpers.dram_page_list(pages, 1, 1, True)
    with pytest.raises(TypeError):
        helpers.dram_scatter_rows(pages, 0x1000, 64, bytes(104), 52)
