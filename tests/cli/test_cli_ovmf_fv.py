"""The timeline's module map (cli/ovmf_fv.py): PEI/DXE modules of an OVMF image found through firmware
volumes, FFS files, LZMA GUID-defined sections and nested volume images, each with the code at its
entry point, and matched in a page wherever the loader put the image."""

from __future__ import annotations

import lzma
import struct
import uuid

from sevemu.cli.ovmf_fv import ModuleMap, ovmf_modules

LZMA_GUID = uuid.UUID("ee4e5898-3914-4259-9d6e-dc7bd79403cf")


def _section(kind: int, body: bytes) -> bytes:
    raw = (4 + len(body)).to_bytes(3, "little") + bytes([kind]) + body
    return raw + b"\0" * (-len(raw) % 4)


def _pe(entry_rva: int, code: bytes) -> bytes:
    """A minimal PE32+ image: DOS stub, PE header, one section whose raw data sits at file offset 0x200
    and is mapped at RVA 0x1000."""
    img = bytearray(0x200 + 0x1000)
    img[0:2] = b"MZ"
    struct.pack_into("<I", img, 0x3C, 0x80)
    img[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<HH", img, 0x84, 0x8664, 1)  # machine, one section
    struct.pack_into("<H", img, 0x94, 0xF0)  # SizeOfOptionalHeader
    struct.pack_into("<I", img, 0x98 + 16, entry_rva)  # AddressOfEntryPoint
    table = 0x98 + 0xF0
    img[table : table + 8] = b".text\0\0\0"
    struct.pack_into("<IIII", img, table + 8, 0x1000, 0x1000, 0x1000, 0x200)  # vsize, vaddr, rawsize, raw
    off = 0x200 + entry_rva - 0x1000
    img[off : off + len(code)] = code
    return bytes(img)


def _ffs(kind: int, name: str, body: bytes) -> bytes:
    size = 24 + len(body)
    head = uuid.uuid4().bytes_le + b"\0\0" + bytes([kind, 0]) + size.to_bytes(3, "little") + b"\xf8"
    raw = head + body
    return raw + b"\xff" * (-len(raw) % 8)


def _fv(files: bytes) -> bytes:
    header = bytearray(0x48)
    struct.pack_into("<Q", header, 32, 0x48 + len(files))
    header[40:44] = b"_FVH"
    struct.pack_into("<H", header, 48, 0x48)
    return bytes(header) + files


def _module(kind: int, name: str, rva: int, code: bytes) -> bytes:
    return _ffs(kind, name, _section(0x10, _pe(rva, code)) + _section(0x15, (name + "\0").encode("utf-16-le")))


def test_modules_are_found_through_a_compressed_volume_and_matched_at_their_page_offset() -> None:
    core_code, ipl_code = bytes(range(0x40, 0x70)), bytes(range(0x90, 0xC0))
    inner = _fv(_module(0x05, "DxeCore", 0x1234, core_code) + _module(0x06, "DxeIpl", 0x1F00, ipl_code))
    compressed = lzma.compress(_section(0x17, inner), format=lzma.FORMAT_ALONE)
    guided = LZMA_GUID.bytes_le + struct.pack("<HH", 4 + 20, 1) + compressed
    outer = _fv(_ffs(0x0B, "FVMAIN_COMPACT", _section(0x02, guided)) + _module(0x07, "Plain", 0x1010, b"\xcc" * 24))
    flash = b"\xff" * 0x1000 + outer + b"\xff" * 0x100
    mods = {m.name: m for m in ovmf_modules(flash)}
    assert set(mods) == {"DxeCore", "DxeIpl", "Plain"}
    assert (mods["DxeCore"].kind, mods["DxeCore"].entry_offset) == ("DXE core", 0x234)
    assert (mods["DxeIpl"].kind, mods["DxeIpl"].entry_offset) == ("PEIM", 0xF00)
    assert mods["DxeCore"].signature == core_code[:24]
    mm = ModuleMap(list(mods.values()))
    page = bytearray(0x1000)
    page[0x234 : 0x234 + 48] = core_code
    assert [m.name for m in mm.entered(bytes(page))] == ["DxeCore"]
    page[0x234] ^= 1  # other code at that offset: not the DXE core
    assert mm.entered(bytes(page)) == []


def test_modules_with_the_same_entry_code_are_left_out() -> None:
    code = bytes(range(24))
    flash = _fv(_module(0x06, "A", 0x1100, code) + _module(0x06, "B", 0x3100 - 0x2000, code)
                + _module(0x06, "C", 0x1200, code))
    mm = ModuleMap(ovmf_modules(flash))
    assert [m.name for m in mm.modules] == ["C"]  # A and B enter at the same offset with the same bytes
