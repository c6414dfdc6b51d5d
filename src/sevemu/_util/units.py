"""Sizes and alignment helpers every layer uses (one definition each).

x86 pages (APM vol. 2, 24593, section 5.3: 4 KiB, 2 MiB and 1 GiB translations) and the 64-byte
cache line of every EPYC generation, which is also the memory controller's transfer unit.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "LINE",
    "PAGE",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_MASK",
    "PAGE_SHIFT",
    "GiB",
    "KiB",
    "MiB",
    "align_down",
    "align_up",
    "is_aligned",
]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

PAGE_SHIFT: Final = 12
PAGE: Final = 1 << PAGE_SHIFT
"""A 4 KiB page."""
PAGE_MASK: Final = PAGE - 1
PAGE_2M: Final = 2 * MiB
PAGE_1G: Final = GiB
LINE: Final = 64
"""A cache line (and the memory controller's transfer unit)."""


def align_down(value: int, alignment: int) -> int:
    """``value`` rounded down to a multiple of ``alignment`` (a power of two)."""
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def is_aligned(value: int, alignment: int) -> bool:
    """Whether ``value`` is a multiple of ``alignment`` (a power of two)."""
    return not value & (alignment - 1)
