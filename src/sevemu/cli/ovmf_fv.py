"""The modules of an OVMF image, for the boot timeline: which PEI/DXE module is entered when.

A debugger's view, built from the flash image alone (PI specification volume 3: firmware volume
``_FVH`` header, FFS files, sections; edk2 ``BaseTools`` GenFv/GenFfs/GenSec): the compressed main
volume (``FVMAIN_COMPACT``, a GUID-defined section with edk2's LZMA GUID, which the standard
library's :mod:`lzma` reads in its "alone" format) holds the PEI and DXE volumes SEC decompresses;
each PEIM, the PEI core, the DXE core and each DXE driver is an FFS file with a PE32 (or TE) section
and a user-interface section (its name).

:func:`ovmf_modules` lists them with the first bytes of code at their entry point.  Images are
loaded at page-aligned addresses, so the entry lies at the same offset within its page wherever the
loader put the image: a page the vCPU starts fetching from holds a module's entry when those bytes
are at that offset (:meth:`ModuleMap.entered`).  Position-independent x64 code starts the same
after relocation; a module whose entry bytes are not unique is left out.
"""

from __future__ import annotations

import lzma
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = ["Module", "ModuleMap", "ovmf_modules"]

_LZMA_GUID: Final = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf")
_FILE_TYPES: Final = {0x04: "PEI core", 0x05: "DXE core", 0x06: "PEIM", 0x07: "DXE driver", 0x09: "application",
                      0x0A: "SMM", 0x0B: "volume"}
_SIG_LEN: Final = 24
_MAX_DEPTH: Final = 4


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    kind: str
    """``PEI core``, ``PEIM``, ``DXE core``, ``DXE driver``..."""
    entry_offset: int
    """The entry point's offset within its 4 KiB page."""
    signature: bytes
    """The first bytes of code at the entry point."""


def _sections(data: bytes, depth: int) -> Iterator[tuple[int, bytes]]:
    """(type, body) of every section of an FFS file body, GUID-defined LZMA ones opened."""
    pos = 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos : pos + 3], "little")
        kind, head = data[pos + 3], 4
        if size == 0xFFFFFF:
            size, head = int.from_bytes(data[pos + 4 : pos + 8], "little"), 8
        if size < head or pos + size > len(data):
            return
        body = data[pos + head : pos + size]
        if kind == 0x02 and len(body) >= 20:  # GUID-defined: GUID, data offset (from the section start)
            guid = uuid.UUID(bytes_le=bytes(body[0:16]))
            offset = int.from_bytes(body[16:18], "little") - head
            if guid == _LZMA_GUID and depth < _MAX_DEPTH:
                try:
                    inner = lzma.decompress(body[offset:], format=lzma.FORMAT_ALONE)
                except lzma.LZMAError:
                    inner = b""
                yield from _sections(inner, depth + 1)
        else:
            yield kind, body
        pos = (pos + size + 3) & ~3


def _volumes(data: bytes, depth: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """(file type, name, PE32/TE image) of every module in the firmware volumes within ``data``."""
    pos = 0
    while (pos := data.find(b"_FVH", pos)) >= 0:
        start = pos - 40
        pos += 4
        if start < 0:
            continue
        length = int.from_bytes(data[start + 32 : start + 40], "little")
        header = int.from_bytes(data[start + 48 : start + 50], "little")
        if not 0x48 <= header < length <= len(data) - start:
            continue
        ext = int.from_bytes(data[start + 52 : start + 54], "little")
        first = ext + int.from_bytes(data[start + ext + 16 : start + ext + 20], "little") if ext else header
        yield from _files(data[start : start + length], (first + 7) & ~7, depth)
        pos = start + length


def _files(fv: bytes, pos: int, depth: int) -> Iterator[tuple[int, str, bytes]]:
    while pos + 24 <= len(fv):
        kind, attrs = fv[pos + 18], fv[pos + 19]
        size, head = int.from_bytes(fv[pos + 20 : pos + 23], "little"), 24
        if attrs & 0x01:  # FFS_ATTRIB_LARGE_FILE
            size, head = int.from_bytes(fv[pos + 24 : pos + 32], "little"), 32
        if kind == 0xFF or size < head or pos + size > len(fv):
            return
        body = fv[pos + head : pos + size]
        name, image = "", b""
        for skind, sbody in _sections(body, depth):
            if skind == 0x15:  # user interface: UCS-2, NUL-terminated
                name = sbody.decode("utf-16-le", "replace").rstrip("\0")
            elif skind in (0x10, 0x12) and not image:
                image = sbody
            elif skind == 0x17 and depth < _MAX_DEPTH:  # a firmware volume image: its modules too
                yield from _volumes(sbody, depth + 1)
        if image and kind in _FILE_TYPES:
            yield kind, name or str(uuid.UUID(bytes_le=bytes(fv[pos : pos + 16]))), image
        pos = (pos + size + 7) & ~7


def _entry(image: bytes) -> tuple[int, bytes] | None:
    """(entry RVA, code at the entry) of a PE32+ or TE image, from its section table."""
    if image[:2] == b"VZ":  # TE: the stripped header replaces StrippedSize bytes of the PE headers
        nsec, stripped = image[5], int.from_bytes(image[6:8], "little")
        rva = int.from_bytes(image[8:12], "little")
        table, delta = 40, stripped - 40
    elif image[:2] == b"MZ":
        pe = int.from_bytes(image[0x3C:0x40], "little")
        if image[pe : pe + 4] != b"PE\0\0":
            return None
        nsec = int.from_bytes(image[pe + 6 : pe + 8], "little")
        opt = int.from_bytes(image[pe + 20 : pe + 22], "little")
        rva = int.from_bytes(image[pe + 40 : pe + 44], "little")
        table, delta = pe + 24 + opt, 0
    else:
        return None
    for i in range(nsec):
        s = table + 40 * i
        vsize, vaddr, rsize, raw = struct.unpack_from("<IIII", image, s + 8)
        if vaddr <= rva < vaddr + max(vsize, rsize):
            off = raw - delta + (rva - vaddr)
            code = image[off : off + _SIG_LEN]
            return (rva, bytes(code)) if len(code) == _SIG_LEN else None
    return None


def ovmf_modules(flash: bytes) -> list[Module]:
    """Every PEI/DXE module of an OVMF flash image with a PE32/TE entry (module docstring)."""
    out: list[Module] = []
    for kind, name, image in _volumes(bytes(flash)):
        found = _entry(image)
        if found is not None:
            out.append(Module(name, _FILE_TYPES[kind], found[0] & 0xFFF, found[1]))
    return out


class ModuleMap:
    """Entry-page matching for the timeline: ``entered(page_bytes)`` names the modules whose entry code
    this page holds (at the module's in-page offset)."""

    def __init__(self, modules: list[Module]) -> None:
        seen: dict[tuple[int, bytes], list[Module]] = {}
        for m in modules:
            seen.setdefault((m.entry_offset, m.signature), []).append(m)
        self.modules = [ms[0] for ms in seen.values() if len(ms) == 1]  # ambiguous entries are left out

    def entered(self, page: bytes) -> list[Module]:
        return [m for m in self.modules if page[m.entry_offset : m.entry_offset + _SIG_LEN] == m.signature]
