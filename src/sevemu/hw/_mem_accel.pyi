"""Type stub of the optional C helpers of the memory model's bulk paths (``csrc/mem_accel.c``).

Each does what the Python path beside its caller does (:mod:`sevemu.hw.dram`, :mod:`sevemu.hw.cache`).
"""

from _typeshed import ReadableBuffer, WriteableBuffer

def dram_gather(dst: WriteableBuffer, pages: dict[int, bytearray], spa: int, /) -> None:
    """dst = the len(dst) bytes at ``spa`` of the page store (absent pages read as zeros)."""

def dram_scatter(pages: dict[int, bytearray], spa: int, src: ReadableBuffer, skip_zero: bool, /) -> None:
    """Store ``src`` at ``spa``; an absent page is created unless ``skip_zero`` and its part is all zeros."""

def cache_take(sets: list[dict[int, bytearray]], lo: int, hi: int, dirty: set[int], /) -> tuple[list[int], bytearray, bytes]:
    """Remove the lines with keys in ``[lo, hi)``; the dirty ones leave ``dirty`` and come back
    sorted: (keys, their lines joined, the keys as little-endian uint64)."""

def line_runs(cur: ReadableBuffer, snap: ReadableBuffer, /) -> list[tuple[int, int]]:
    """The runs of 64-byte lines where ``cur`` and ``snap`` differ: ``[(lo, hi), ...]`` byte offsets."""

def resident_keys(sets: list[dict[int, bytearray]] | list[set[int]], mask: int, lo: int, hi: int,
                  /) -> list[int] | None:
    """The keys ``lo, lo+64, ...`` below ``hi`` held by ``sets[(key >> 6) & mask]``, ascending (a lookup
    per address or a visit of the mapped sets, whichever is shorter); None unless every container is
    exactly a dict or a set (then the caller's Python path runs)."""
