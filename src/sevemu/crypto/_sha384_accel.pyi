"""Type stub of the optional C accelerator of :mod:`sevemu.crypto.pagehash` (``csrc/sha384_accel.c``).

Every function raises ValueError on inconsistent lengths, and takes C-contiguous buffers.
"""

from _typeshed import ReadableBuffer

def sha384_pages(data: ReadableBuffer, size: int, /) -> bytes:
    """SHA-384 of each ``size``-byte piece of ``data``, concatenated."""

def page_info_chain(ld: ReadableBuffer, info: ReadableBuffer, gpa: int, count: int,
                    contents: ReadableBuffer | None = None, /) -> bytes:
    """``count`` times ld = SHA-384(info) with ld, contents[i] and gpa + 4096 i filled in."""

def measure_pages(ld: ReadableBuffer, info: ReadableBuffer, gpa: int, data: ReadableBuffer, /) -> bytes:
    """``page_info_chain`` with each 4 KiB page of ``data``'s SHA-384 as its contents, in one pass."""
