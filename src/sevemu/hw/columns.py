"""Summaries of u64 columns in one step each: what the firmware's ring buffer
(:mod:`sevemu.firmware.ring`), its dispatcher's batch path (:meth:`Firmware.handle_batch
<sevemu.firmware.core.Firmware.handle_batch>`) and its whole-page migration batches
(:mod:`sevemu.firmware.sev.migrate`) read off a doorbell's command columns -- where the values lie,
whether they go up evenly, the runs of consecutive pages, a record's words.

Each function is a numpy expression (given in its doc string) with a C twin in ``csrc/mem_accel.c``
(:data:`sevemu.hw.memaccel.COLUMNS`): a doorbell runs right after megabytes of cryptography have
pushed the interpreter's and numpy's code and data out of the CPU's caches, where a numpy call on
510 values costs 10-30 us and one pass in C about a microsecond.  Like the other helpers of
:mod:`sevemu.hw.memaccel` they decide nothing: the callers decide from the values, which are the
same either way (tested both ways).
"""

from __future__ import annotations

import itertools
from itertools import pairwise
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from sevemu.hw import memaccel

__all__ = ["ColumnStats", "key_run", "lookup", "record_words", "runs", "stats", "strided_rows"]

_U64 = npt.NDArray[np.uint64]


class ColumnStats(NamedTuple):
    """One column's summary (:func:`stats`)."""

    lo: int
    """The smallest value."""
    hi: int
    """The largest value."""
    bits: int
    """Every value ORed together (e.g. ``bits % PAGE == 0``: every value page-aligned)."""
    stride: int
    """The common step of a column of two or more values going up evenly (``c[1] >= c[0]`` and
    every ``c[i+1] - c[i]`` the same), else 0."""
    apart: bool
    """Whether each value is at least the column's length above the one before it
    (``(c[1:] >= c[:-1] + length).all()``, u64 arithmetic): ranges of that length starting at the
    values go upward without overlapping."""


def _contiguous(cols: _U64) -> _U64:
    return cols if cols.flags.c_contiguous and cols.dtype == np.dtype("<u8") else np.ascontiguousarray(cols, dtype="<u8")


def stats(cols: _U64, lengths: tuple[int, ...]) -> list[ColumnStats]:
    """The :class:`ColumnStats` of each row of ``cols`` (a 2-D u64 array: ``len(lengths)`` columns
    of at least one value each; a 1-D array is one column) with its length."""
    cols = _contiguous(cols.reshape(len(lengths), -1))
    if memaccel.COLUMNS:
        return [ColumnStats(*s) for s in memaccel.helpers.u64_columns(cols.data, lengths)]
    out = []
    for c, length in zip(cols, lengths, strict=True):
        step = int(c[1]) - int(c[0]) if len(c) > 1 else -1
        even = step >= 0 and bool((c[1:] - c[:-1] == np.uint64(step)).all())
        out.append(ColumnStats(int(c.min()), int(c.max()), int(np.bitwise_or.reduce(c)), step if even else 0,
                               bool((c[1:] >= c[:-1] + np.uint64(length)).all())))
    return out


def runs(col: _U64, step: int) -> list[tuple[int, int, int]]:
    """(first index, value, count * ``step``) of each run of ``col`` whose values go up by ``step``
    (u64 arithmetic), in order."""
    col = _contiguous(col)
    if memaccel.COLUMNS:
        return memaccel.helpers.u64_runs(col.data, step)
    n = len(col)
    if not n:
        return []
    breaks = np.flatnonzero(col[1:] != col[:-1] + np.uint64(step)) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(a, int(col[a]), (b - a) * step) for a, b in pairwise(bounds)]


def record_words(raw: bytes | bytearray | memoryview, size: int, mask: _U64, picks: tuple[int, ...],
                 ands: tuple[int, ...]) -> _U64 | None:
    """The u64 words ``picks`` (indexes) of each ``size``-byte record of ``raw``, each record
    zero-padded to ``len(mask)`` words, ANDed with ``ands`` -- a ``(len(picks), n)`` array; None
    when a record has a bit of ``mask`` (per word) set."""
    words = len(mask)
    if memaccel.COLUMNS:
        out = memaccel.helpers.record_words(raw, size, _contiguous(mask).data, picks, ands)
        return None if out is None else np.frombuffer(out, dtype="<u8").reshape(len(picks), -1)
    n = len(raw) // size
    rows = np.zeros((n, 8 * words), dtype=np.uint8)
    rows[:, :size] = np.frombuffer(raw, dtype=np.uint8).reshape(n, size)
    w: _U64 = rows.view("<u8").astype(np.uint64, copy=False)
    if (w & mask).any():
        return None
    return np.stack([w[:, p] & np.uint64(a) for p, a in zip(picks, ands, strict=True)])


def strided_rows(span: bytes | bytearray | memoryview, offset: int, stride: int, n: int, size: int) -> bytes:
    """``span[offset + i * stride : offset + i * stride + size]`` for i in ``range(n)``, joined."""
    if memaccel.COLUMNS:
        return memaccel.helpers.strided_rows(span, offset, stride, n, size)
    return b"".join(bytes(span[offset + i * stride : offset + i * stride + size]) for i in range(n))


def key_run(raw: bytes | bytearray | memoryview, mask: int) -> int:
    """How many 16-byte entries of ``raw`` (two little-endian u64 words each, at least one), from
    the first on, have ``word0 & mask`` equal to the first entry's."""
    if memaccel.COLUMNS:
        return memaccel.helpers.key_run(raw, mask)
    key = np.frombuffer(raw, dtype="<u8")[::2] & np.uint64(mask)
    differ = np.flatnonzero(key != key[0])
    return int(differ[0]) if len(differ) else len(key)


def lookup(mapping: dict[int, int], col: _U64, shift: int = 0) -> npt.NDArray[np.int64]:
    """``mapping.get(k >> shift, -1)`` of each value ``k`` of ``col``, as an int64 column (a dict
    lookup per value, as ``np.fromiter(map(mapping.get, ...))`` makes them)."""
    col = _contiguous(col)
    if memaccel.COLUMNS:
        return np.frombuffer(memaccel.helpers.u64_dict_get(mapping, col.data, shift), dtype="<i8").astype(np.int64, copy=False)
    return np.fromiter(map(mapping.get, (col >> np.uint64(shift)).tolist(), itertools.repeat(-1)), dtype=np.int64,
                       count=len(col))
