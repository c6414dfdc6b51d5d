"""Type stub of the optional C helpers of the memory model's bulk paths (``csrc/mem_accel.c``).

Each does what the Python path beside its caller does (:mod:`sevemu.hw.dram`, :mod:`sevemu.hw.cache`).
"""

import weakref
from collections.abc import Callable
from typing import Any

from _typeshed import ReadableBuffer, WriteableBuffer

def dram_gather(dst: WriteableBuffer, pages: dict[int, bytearray], spa: int, /) -> None:
    """dst = the len(dst) bytes at ``spa`` of the page store (absent pages read as zeros)."""

def dram_scatter(pages: dict[int, bytearray], spa: int, src: ReadableBuffer, skip_zero: bool, /) -> None:
    """Store ``src`` at ``spa``; an absent page is created unless ``skip_zero`` and its part is all zeros."""

def cache_take(sets: list[dict[int, bytearray]], lo: int, hi: int, dirty: set[int], /) -> tuple[list[int], bytearray, bytes]:
    """Remove the lines with keys in ``[lo, hi)``; the dirty ones leave ``dirty`` and come back
    sorted: (keys, their lines joined, the keys as little-endian uint64)."""

def rmp_governing(pages: dict[int, bytearray], dirty: set[int], first: int, pfn: int, /) -> tuple[int, int, int] | None:
    """``Rmp._authoritative(pfn)``: (pfn of the governing entry, its low and high quadwords) read from the
    page store (entries of 16 bytes from SPA ``first``); None, nothing read, when an entry's line is in
    ``dirty`` (the caller reads through the cache) or ``pages`` / ``dirty`` are not an exact dict / set."""

def line_runs(cur: ReadableBuffer, snap: ReadableBuffer, /) -> list[tuple[int, int]]:
    """The runs of 64-byte lines where ``cur`` and ``snap`` differ: ``[(lo, hi), ...]`` byte offsets."""

def cache_page_plan(sets: list[dict[int, bytearray]], mask: int, key: int, n: int, ways: int, dirty: set[int],
                    others: tuple[int, ...], /) -> tuple[list[bytearray | None], list[int], list[bytearray], int,
                                                         int, int, bool] | None:
    """The lookups and evictions of a page run's fill in line order (lines, dropped dirty keys and their
    lines in order, hits, first and last missing index, whether another domain's line was dropped);
    None, nothing changed, where a set is not exactly a dict."""

def cache_page_install(sets: list[dict[int, bytearray]], mask: int, key: int, lines: list[bytearray | None],
                       plain: ReadableBuffer, first: int, /) -> bytes:
    """Each missing line (None) made from ``plain`` at ``(i - first) * 64``, put in its set; the lines joined."""

def cache_hit_read(sets: list[dict[int, bytearray]], mask: int, key: int, n: int, counters: dict[str, Any],
                   /) -> bytes | None:
    """The ``n`` lines of keys ``key, key + 64, ...`` joined, when all are resident (each made the most
    recently used of its set, ``counters['hits'] += n``); None, nothing changed, otherwise."""

def cache_hit_write(sets: list[dict[int, bytearray]], mask: int, key: int, data: ReadableBuffer,
                    dirty: set[int], counters: dict[str, Any], /) -> bool:
    """Overwrite the ``len(data) // 64`` lines from ``key`` with ``data`` when all are resident (most
    recently used, dirty, ``counters['hits']`` grows); False, nothing changed, otherwise."""

def cache_hit_runs(sets: list[dict[int, bytearray]], mask: int, key: int, runs: tuple[tuple[int, int], ...],
                   counters: dict[str, Any], /) -> bytes | None:
    """``cache_hit_read`` of each ``(offset, length)`` run from ``key + offset``, in the order given,
    joined, when every line is resident; None, nothing changed, otherwise."""

def cache_hit_write_runs(sets: list[dict[int, bytearray]], mask: int, key: int, buf: ReadableBuffer, base: int,
                         runs: list[tuple[int, int]], dirty: set[int], counters: dict[str, Any], /) -> bool:
    """``cache_hit_write`` of ``buf[base + lo : base + hi]`` at ``key + lo`` for each ``(lo, hi)`` run
    (line_runs' form), in order, when every line of every run is resident; False, nothing changed,
    otherwise."""

def slot_sync(buf: ReadableBuffer, off: int, snap: bytearray, /) -> list[tuple[int, int]]:
    """``line_runs(buf[off : off + len(snap)], snap)``, those lines copied into ``snap``."""

def copy_changed(dst: WriteableBuffer, off: int, src: ReadableBuffer, /) -> bool:
    """``dst[off : off + len(src)] = src`` unless equal already; whether it changed."""

def resident_keys(sets: list[dict[int, bytearray]] | list[set[int]], mask: int, lo: int, hi: int,
                  /) -> list[int] | None:
    """The keys ``lo, lo+64, ...`` below ``hi`` held by ``sets[(key >> 6) & mask]``, ascending (a lookup
    per address or a visit of the mapped sets, whichever is shorter); None unless every container is
    exactly a dict or a set (then the caller's Python path runs)."""

class Port:
    """A guest view of a core's memory port in C: ``load`` / ``store`` of 1..8 bytes within a line
    through the TLB dict and the cache's sets, with :class:`~sevemu.hw.cache.Cache`'s fill and
    eviction; everything else goes to the view's ``_load`` / ``_store`` / ``_walk`` or ``fill``."""

    def __init__(self, view: weakref.ref[Any], tlb: dict[int, tuple[int, int, int]], sets: list[dict[int, bytearray]],
                 mask: int, counters: dict[str, Any], dirty: set[int], readers: dict[int, Callable[[int], bytearray]],
                 ways: int, coherent: bool, fill: Callable[[int, dict[int, bytearray]], bytearray],
                 write_line: Callable[[int, int, bool, bytearray], None], /) -> None: ...
    def load(self, gva: int, size: int, /) -> int: ...
    def store(self, gva: int, size: int, value: int, /) -> None: ...

class LineCipher:
    """One key slot's single-line path: AES-ECB (OpenSSL) under the data key around the 64-byte line
    tweaks of a :class:`~sevemu.crypto.memenc.MemoryCipher` (``code`` 0 XE, 1 XEX, 2 XTS)."""

    def __init__(self, code: int, key: bytes, pages: dict[int, bytearray], memo: dict[int, Any],
                 fallback: Callable[[int], ReadableBuffer], lines: list[bytes] | None, /) -> None: ...
    def encrypt(self, spa: int, line: ReadableBuffer, /) -> bytes: ...
    def decrypt(self, spa: int, line: ReadableBuffer, /) -> bytes: ...
    def read(self, spa: int, /) -> bytearray: ...

class PoolSnoop:
    """:meth:`PagePool.snoop <sevemu.hw.uc.pool.PagePool.snoop>`'s usual cases in one call (a read while
    synced, a page without a slot, the write-update of whole lines of one slot while synced), reading the
    pool's attributes at each call; every other call goes to ``fallback`` unchanged."""

    def __init__(self, pool: object, fallback: Callable[..., None], /) -> None: ...
    def __call__(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None, /) -> None: ...

class HostPort:
    """A core's host accesses of whole unencrypted lines in one call each (``Core.host_write``,
    ``Core.host_read_runs`` with the cache's ``write_lines`` / ``read_runs`` behind them): the same
    checks, snoops, bytes, counters and LRU order; anything else goes to ``write`` / ``read_runs``, a
    miss to the cache's ``write_rest`` / ``runs_rest``."""

    def __init__(self, core: object, cache_dict: dict[str, Any], dram_size: int,
                 write: Callable[..., None], read_runs: Callable[..., bytes],
                 write_rest: Callable[[int, memoryview], None],
                 runs_rest: Callable[[int, tuple[tuple[int, int], ...]], bytes], /) -> None: ...
    def write(self, spa: int, data: bytes | bytearray | memoryview, c: bool = False) -> None: ...
    def read_runs(self, spa: int, runs: tuple[tuple[int, int], ...], c: bool = False) -> bytes: ...
    def exchange(self, spa: int, runs: tuple[tuple[int, int], ...], expect: bytes,
                 writes: list[tuple[int, bytes]], /) -> bytes | None: ...

def pool_sync_all(pool: object, cache_dict: dict[str, Any],
                  write_back: Callable[[int, bytearray, list[tuple[int, int]]], None], /) -> int:
    """:meth:`PagePool.sync_all <sevemu.hw.uc.pool.PagePool.sync_all>`'s loop: the changed lines of
    each writable slot into the cache (``write_back`` where another agent is snooped or a line
    misses); how many slots had changed lines."""

class PoolSync:
    """``pool_sync_all(pool, cache_dict, write_back)`` as a callable bound to one pool: its
    ``slot_key``, snapshots, ``stats`` and ``writable`` read once (a pool never rebinds them), its
    ``mm`` at each call."""

    def __init__(self, pool: object, cache_dict: dict[str, Any],
                 write_back: Callable[[int, bytearray, list[tuple[int, int]]], None], /) -> None: ...
    def __call__(self) -> int: ...

def u64_columns(buf: ReadableBuffer, lengths: tuple[int, ...], /) -> list[tuple[int, int, int, int, bool]]:
    """For each of ``len(lengths)`` columns of n u64 back to back in ``buf`` (n >= 1) and its
    length L: (min, max, OR of all values, the common step of an ascending evenly spaced column or
    0, ``(c[1:] >= c[:-1] + L).all()`` with u64 wrap-around)."""

def u64_runs(buf: ReadableBuffer, step: int, /) -> list[tuple[int, int, int]]:
    """(first index, value, count * step) of each run of a u64 column whose values go up by ``step``."""

def record_words(raw: ReadableBuffer, size: int, mask: ReadableBuffer, picks: tuple[int, ...],
                 ands: tuple[int, ...], /) -> bytes | None:
    """The u64 words ``picks`` of each ``size``-byte record of ``raw`` (zero-padded to whole words),
    ANDed with ``ands``, as columns back to back; None when a record has a bit of ``mask`` set."""

def strided_rows(span: ReadableBuffer, offset: int, stride: int, n: int, size: int, /) -> bytes:
    """The ``n`` rows of ``size`` bytes at ``offset + i * stride`` of ``span``, joined."""

def key_run(raw: ReadableBuffer, mask: int, /) -> int:
    """How many 16-byte entries of ``raw``, from the first, have ``word0 & mask`` equal to the first's."""

def dram_scatter_rows(pages: dict[int, bytearray], spa: int, stride: int, rows: ReadableBuffer, size: int, /) -> None:
    """Each ``size``-byte row of ``rows`` stored at ``spa + i * stride`` in the page store (absent
    pages created zeroed), the bytes between rows untouched; rows must not be able to cross a page."""

def dram_page_list(pages: dict[int, bytearray], pfn: int, count: int, create: bool, /) -> list[bytearray] | None:
    """The ``count`` pages from ``pfn`` on of the page store, in order (absent ones stored zeroed
    first when ``create``, else None)."""

def u64_dict_get(mapping: dict[int, int], keys: ReadableBuffer, shift: int, /) -> bytes:
    """``mapping.get(k >> shift, -1)`` of each u64 ``k`` of ``keys``, as int64 values back to back."""
