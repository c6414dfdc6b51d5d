"""DRAM: a sparse page store holding exactly the bytes the memory controller wrote.

Nothing in the SoC reads or writes DRAM except the memory controller (:mod:`sevemu.hw.memctl`), so
for an encrypted page DRAM holds ciphertext and nothing else.  Pages are allocated on first write;
a page never written reads as zeros.  A 64 GiB guest that touches 64 MiB costs 64 MiB plus a
dictionary entry per page.

A "cold boot" image (:meth:`Dram.dump`) is a raw file whose byte at offset ``o`` is the DRAM byte at
``base + o``; pages never written are left as holes, so the file is sparse on disk.
:class:`ColdBootImage` reads one back for inspection.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from sevemu._util.units import LINE, PAGE
from sevemu.errors import AddressError, AlignmentError, FileFormatError

__all__ = ["LINE", "PAGE", "ColdBootImage", "Dram"]  # LINE and PAGE re-exported for callers of old
_ZERO_LINE = bytes(LINE)
_ZERO_PAGE = bytes(PAGE)


class Dram:
    """Sparse byte-addressable physical memory of ``size`` bytes."""

    __slots__ = ("_pages", "size")

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise AlignmentError(f"DRAM size must be a positive multiple of {PAGE}, got {size:#x}")
        self.size = size
        self._pages: dict[int, bytearray] = {}

    # ---- the memory controller's port -------------------------------------------------------
    def pages_dict(self) -> dict[int, bytearray]:
        """The page store itself (PFN -> page), for the memory controller's line path only."""
        return self._pages

    def read_line(self, spa: int) -> bytes:
        """The 64 bytes at the line-aligned ``spa`` (the caller, the memory controller, checked it)."""
        page = self._pages.get(spa >> 12)
        if page is None:
            return _ZERO_LINE
        off = spa & 0xFFF
        return bytes(page[off : off + LINE])

    def write_line(self, spa: int, data: bytes | bytearray) -> None:
        pfn = spa >> 12
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = bytearray(PAGE)
        off = spa & 0xFFF
        page[off : off + LINE] = data

    def write_lines(self, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Consecutive lines from the line-aligned ``spa`` (the caller checked the range): the same
        result as :meth:`write_line` for each line, pages allocated as they are written."""
        view = memoryview(data).cast("B")
        pages = self._pages
        pos = 0
        length = len(view)
        while pos < length:
            addr = spa + pos
            off = addr & 0xFFF
            n = min(PAGE - off, length - pos)
            page = pages.get(addr >> 12)
            if page is None:
                page = pages[addr >> 12] = bytearray(PAGE)
            page[off : off + n] = view[pos : pos + n]
            pos += n

    def read(self, spa: int, length: int) -> bytes:
        """``length`` bytes from ``spa`` (any alignment, may span pages)."""
        self.check_range(spa, length)
        if not (spa | length) & 0xFFF:  # whole pages: one join, one copy
            get = self._pages.get
            return b"".join([get(pfn, _ZERO_PAGE) for pfn in range(spa >> 12, (spa + length) >> 12)])
        out = bytearray(length)
        pos = 0
        while pos < length:
            addr = spa + pos
            off = addr & 0xFFF
            n = min(PAGE - off, length - pos)
            page = self._pages.get(addr >> 12)
            if page is not None:
                out[pos : pos + n] = page[off : off + n]
            pos += n
        return bytes(out)

    def write(self, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``spa`` (any alignment, may span pages)."""
        length = len(data)
        self.check_range(spa, length)
        view = memoryview(data).cast("B")
        pos = 0
        pages = self._pages
        if not spa & 0xFFF:  # whole pages first: one copy each, no zero-filled page in between
            whole = length & ~0xFFF
            pfn = spa >> 12
            while pos < whole:
                chunk = view[pos : pos + PAGE]
                page = pages.get(pfn)
                if page is not None:
                    page[:] = chunk
                elif chunk != _ZERO_PAGE:  # an absent page stays absent when written with zeros
                    pages[pfn] = bytearray(chunk)
                pos += PAGE
                pfn += 1
        while pos < length:
            addr = spa + pos
            off = addr & 0xFFF
            n = min(PAGE - off, length - pos)
            pfn = addr >> 12
            page = pages.get(pfn)
            if page is None:
                if _ZERO_PAGE.startswith(view[pos : pos + n]):  # all zeros (one memcmp, not any())
                    pos += n
                    continue
                page = pages[pfn] = bytearray(PAGE)
            page[off : off + n] = view[pos : pos + n]
            pos += n

    def check_range(self, spa: int, length: int) -> None:
        if spa < 0 or length < 0 or spa + length > self.size:
            raise AddressError(
                f"physical range {spa:#x}+{length:#x} is outside DRAM (0..{self.size:#x})"
            )

    # ---- inspection --------------------------------------------------------------------------
    @property
    def populated_pages(self) -> int:
        """Pages that have been written at least once (the resident size is this times 4 KiB)."""
        return len(self._pages)

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """(spa, contents) of every populated page in address order."""
        for pfn in sorted(self._pages):
            yield pfn << 12, bytes(self._pages[pfn])

    def find(self, needle: bytes) -> list[int]:
        """Every SPA at which ``needle`` occurs (within one page) in DRAM."""
        hits: list[int] = []
        for pfn in sorted(self._pages):
            page = self._pages[pfn]
            start = page.find(needle)
            while start >= 0:
                hits.append((pfn << 12) + start)
                start = page.find(needle, start + 1)
        return hits

    def dump(self, path: str | os.PathLike[str], base: int = 0, length: int | None = None) -> int:
        """Write DRAM ``[base, base+length)`` to ``path`` as a sparse raw image; returns bytes written."""
        end = self.size if length is None else base + length
        self.check_range(base, end - base)
        if base % PAGE or end % PAGE:
            raise AlignmentError("cold-boot image bounds must be page aligned")
        written = 0
        with open(path, "wb") as f:
            for pfn in sorted(self._pages):
                spa = pfn << 12
                if base <= spa < end:
                    f.seek(spa - base)
                    f.write(self._pages[pfn])
                    written += PAGE
            f.truncate(end - base)
        return written


class ColdBootImage:
    """A DRAM image written by :meth:`Dram.dump`, opened for inspection."""

    def __init__(self, path: str | os.PathLike[str], base: int = 0) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileFormatError(f"{p}: no such cold-boot image")
        size = p.stat().st_size
        if size % PAGE:
            raise FileFormatError(f"{p}: size {size} is not a multiple of the {PAGE}-byte page")
        self.path = p
        self.base = base
        self.size = size

    def read(self, spa: int, length: int) -> bytes:
        if spa < self.base or spa + length > self.base + self.size:
            raise AddressError(f"{spa:#x}+{length:#x} is outside the image")
        with open(self.path, "rb") as f:
            f.seek(spa - self.base)
            return f.read(length)

    def find(self, needle: bytes, chunk: int = 1 << 24) -> list[int]:
        """Every SPA at which ``needle`` occurs in the image."""
        hits: list[int] = []
        overlap = max(len(needle) - 1, 0)
        with open(self.path, "rb") as f:
            pos = 0
            tail = b""
            while True:
                block = f.read(chunk)
                if not block:
                    break
                data = tail + block
                start = data.find(needle)
                while start >= 0:
                    hits.append(self.base + pos - len(tail) + start)
                    start = data.find(needle, start + 1)
                tail = data[-overlap:] if overlap else b""
                pos += len(block)
        return sorted(set(hits))

    def nonzero_pages(self) -> Iterator[int]:
        """SPAs of the pages of the image that hold anything other than zeros."""
        with open(self.path, "rb") as f:
            for i in range(self.size // PAGE):
                if f.read(PAGE) != _ZERO_PAGE:
                    yield self.base + i * PAGE
