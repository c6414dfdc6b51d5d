"""DRAM: a sparse page store holding exactly the bytes the memory controller wrote.

Nothing in the SoC reads or writes DRAM except the memory controller (:mod:`sevemu.hw.memctl`), so
for an encrypted page DRAM holds ciphertext and nothing else.  Pages are allocated on first write;
a page never written reads as zeros.  A 64 GiB guest that touches 64 MiB costs 64 MiB plus a
dictionary entry per page.

The bulk paths (:meth:`Dram.read_into`, :meth:`Dram.write`, :meth:`Dram.write_lines`) move whole
ranges through the optional C helpers of ``csrc/mem_accel.c`` where they were built, or through the
Python loops beside them otherwise: the same pages, the same bytes.

A "cold boot" image (:meth:`Dram.dump`) is a raw file whose byte at offset ``o`` is the DRAM byte at
``base + o``; pages never written are left as holes, so the file is sparse on disk.
:class:`ColdBootImage` reads one back for inspection.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

from sevemu._util.units import LINE, PAGE
from sevemu.errors import AddressError, AlignmentError, FileFormatError, InputError
from sevemu.hw import memaccel

__all__ = ["LINE", "PAGE", "ColdBootImage", "Dram"]  # LINE and PAGE re-exported for callers of old
_ZERO_LINE = bytes(LINE)
_ZERO_PAGE = bytes(PAGE)
_Q = struct.Struct("<Q")


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
        if memaccel.ENABLED:
            memaccel.helpers.dram_scatter(self._pages, spa, data, False)
            return
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
            memoryview(page)[off : off + n] = view[pos : pos + n]
            pos += n

    def read(self, spa: int, length: int) -> bytes:
        """``length`` bytes from ``spa`` (any alignment, may span pages)."""
        self.check_range(spa, length)
        if not (spa | length) & 0xFFF:  # whole pages: one join, one copy
            get = self._pages.get
            return b"".join([get(pfn, _ZERO_PAGE) for pfn in range(spa >> 12, (spa + length) >> 12)])
        out = bytearray(length)
        if memaccel.ENABLED:  # (the C gather: the same bytes as the loop of _gather)
            memaccel.helpers.dram_gather(out, self._pages, spa)
        else:
            self._gather(spa, memoryview(out))
        return bytes(out)

    def read_into(self, spa: int, out: bytearray | memoryview) -> None:
        """:meth:`read` of ``len(out)`` bytes from ``spa`` into the caller's buffer (a bulk transfer
        that reuses its buffers instead of allocating a new one each time)."""
        view = memoryview(out).cast("B")
        if view.readonly:
            raise InputError("read_into needs a writable buffer")
        self.check_range(spa, len(view))
        if memaccel.ENABLED:
            memaccel.helpers.dram_gather(view, self._pages, spa)
        else:
            self._gather(spa, view)

    def read_u64(self, spa: int) -> int:
        """The little-endian quadword at the 8-byte aligned ``spa`` (the caller checked that it is
        inside DRAM): what ``int.from_bytes(read(spa, 8), "little")`` gives, in one step (the
        VMSA checksum VMRUN compares)."""
        page = self._pages.get(spa >> 12)
        if page is None:
            return 0
        return int(_Q.unpack_from(page, spa & 0xFFF)[0])

    def _gather(self, spa: int, view: memoryview) -> None:
        length = len(view)
        pos = 0
        while pos < length:
            addr = spa + pos
            off = addr & 0xFFF
            n = min(PAGE - off, length - pos)
            page = self._pages.get(addr >> 12)
            if page is None:
                view[pos : pos + n] = _ZERO_PAGE[:n]
            else:
                view[pos : pos + n] = memoryview(page)[off : off + n]
            pos += n

    def write(self, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``spa`` (any alignment, may span pages); a page never written stays
        absent when written with zeros."""
        view = memoryview(data).cast("B")
        length = len(view)
        self.check_range(spa, length)
        if memaccel.ENABLED:
            memaccel.helpers.dram_scatter(self._pages, spa, view, True)
            return
        pos = 0
        pages = self._pages
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
            memoryview(page)[off : off + n] = view[pos : pos + n]
            pos += n

    def zero_pages(self, spa: int, length: int) -> None:
        """Store zeros in every page of the page-aligned range ``[spa, spa+length)``, an absent page
        getting its 4 KiB (it read as zeros before too): what the host's clearing of pages it hands
        out leaves in DRAM, every page stored rather than left to be created by its first write."""
        self.check_range(spa, length)
        if (spa | length) & 0xFFF:
            raise AlignmentError(f"zero_pages needs whole pages, got {spa:#x}+{length:#x}")
        pages = self._pages
        for pfn in range(spa >> 12, (spa + length) >> 12):
            page = pages.get(pfn)
            if page is None:
                pages[pfn] = bytearray(PAGE)
            else:
                page[:] = _ZERO_PAGE

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

    def extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the runs of the file that hold data, in order: what the file system
        stored (``SEEK_DATA`` / ``SEEK_HOLE``); everything else reads as zeros.  Where the file
        system cannot tell, the whole file is one run."""
        runs: list[tuple[int, int]] = []
        seek_data = getattr(os, "SEEK_DATA", None)
        seek_hole = getattr(os, "SEEK_HOLE", None)
        if seek_data is None or seek_hole is None:
            return [(0, self.size)] if self.size else []
        with open(self.path, "rb") as f:
            fd = f.fileno()
            pos = 0
            try:
                while pos < self.size:
                    try:
                        start = os.lseek(fd, pos, seek_data)
                    except OSError as exc:
                        if exc.errno == errno.ENXIO:  # no data after pos
                            break
                        raise
                    end = min(os.lseek(fd, start, seek_hole), self.size)
                    runs.append((start, end - start))
                    pos = end
            except OSError:
                return [(0, self.size)] if self.size else []
        return runs

    def find(self, needle: bytes, chunk: int = 1 << 24) -> list[int]:
        """Every SPA at which ``needle`` occurs in the image."""
        return self.find_many([needle], chunk)[bytes(needle)]

    def find_many(self, needles: Iterable[bytes], chunk: int = 1 << 24) -> dict[bytes, list[int]]:
        """Every SPA of each needle (sorted, overlapping occurrences included), in one pass over the
        image's data runs (:meth:`extents`); holes are zeros, so only a needle of zeros alone needs
        them read as well."""
        wanted = list(dict.fromkeys(bytes(n) for n in needles))
        hits: dict[bytes, set[int]] = {n: set() for n in wanted}
        if not wanted:
            return {}
        if chunk <= 0:
            raise InputError(f"chunk must be positive, got {chunk}")
        longest = max(len(n) for n in wanted)
        runs = [(0, self.size)] if any(not n.strip(b"\0") for n in wanted) else self.extents()
        with open(self.path, "rb") as f:
            for start, length in runs:
                # a needle may straddle a run's ends into the zeros around it: read a margin
                lo = max(start - longest + 1, 0)
                end = min(start + length + longest - 1, self.size)
                pos = lo
                tail = b""
                f.seek(lo)
                while pos < end:
                    block = f.read(min(chunk, end - pos))
                    if not block:
                        break
                    data = tail + block
                    base = self.base + pos - len(tail)
                    for n in wanted:
                        at = data.find(n)
                        while at >= 0:
                            hits[n].add(base + at)
                            at = data.find(n, at + 1)
                    pos += len(block)
                    tail = data[-(longest - 1):] if longest > 1 else b""
        return {n: sorted(found) for n, found in hits.items()}

    def nonzero_pages(self) -> Iterator[int]:
        """SPAs of the pages of the image that hold anything other than zeros."""
        with open(self.path, "rb") as f:
            for start, length in self.extents():
                first = start - start % PAGE
                f.seek(first)
                for off in range(first, start + length, PAGE):
                    if f.read(PAGE) != _ZERO_PAGE:
                        yield self.base + off
