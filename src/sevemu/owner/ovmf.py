"""The OVMF GUIDed footer table, as far as a guest owner needs it to predict a launch (QEMU
``hw/i386/pc_sysfw_ovmf.c``, ``target/i386/sev.c``; OVMF's ``ResetVector`` GUIDed table).

OVMF images built for SEV end with a table of GUID-tagged entries just below the 32-byte reset
vector area at the top of the image.  The layout, read backwards from the end of the image::

    image[-32:]      reset vector area (not part of the table)
    image[-48:-32]   footer GUID 96b582de-1fb2-45f7-baea-a366c55a082d (little-endian GUID bytes)
    image[-50:-48]   u16 total length of the table, including this 18-byte footer entry
    below that       entries, each laid out as data || u16 length (= len(data) + 18) || GUID,
                     walked from the top down

The entry a VMSA builder needs is the SEV-ES reset block (GUID
``00f771de-1a7e-4fcb-890e-68c77e2fb44e``): its first four bytes are the 32-bit EIP at which
application processors start; QEMU splits it into CS base (``eip & 0xffff0000``) and RIP
(``eip & 0xffff``).

The SEV secret block (GUID ``4c2eb361-7d9b-4cc3-8081-127c90d3d294``; OVMF ``ResetVector``,
QEMU ``target/i386/sev.c`` ``struct sev_secret_area``) is ``u32 base || u32 size``: the guest RAM
area where the hypervisor injects the LAUNCH_SECRET payload; QEMU's ``sev-inject-launch-secret``
uses ``base`` when no ``gpa`` is given.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sevemu.abi.snp import OvmfSectionType
from sevemu.errors import LayoutError

__all__ = [
    "OVMF_SEV_METADATA_GUID",
    "OVMF_TABLE_FOOTER_GUID",
    "SEV_ES_RESET_BLOCK_GUID",
    "SEV_HASH_TABLE_RV_GUID",
    "SEV_SECRET_BLOCK_GUID",
    "MetadataSection",
    "SectionType",
    "footer_table",
    "sev_es_reset_eip",
    "sev_hashes_table_gpa",
    "sev_metadata",
    "sev_secret_area",
]

OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
"""Entry giving the guest-physical address (u32) and size of the kernel-hashes page."""
SEV_SECRET_BLOCK_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
"""Entry giving the guest-physical base (u32) and size (u32) of the LAUNCH_SECRET area."""

OVMF_SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
"""Entry giving the offset from the image's end (u32) of the SEV metadata ("ASEV") header."""

_RESET_AREA = 32
_ENTRY_TRAILER = 16 + 2  # GUID + u16 length


def footer_table(image: bytes) -> dict[uuid.UUID, bytes]:
    """The entries of an OVMF image's footer table, GUID -> data.

    Raises :class:`~sevemu.errors.LayoutError` when the image has no footer table or an entry's
    length runs outside the table.
    """
    size = len(image)
    top = size - _RESET_AREA
    if top - _ENTRY_TRAILER < 0:
        raise LayoutError(f"image of {size} bytes is too small for an OVMF footer table")
    if bytes(image[top - 16 : top]) != OVMF_TABLE_FOOTER_GUID.bytes_le:
        raise LayoutError("no OVMF footer table GUID below the reset vector")
    total = int.from_bytes(image[top - 18 : top - 16], "little")
    if total < _ENTRY_TRAILER or total > top:
        raise LayoutError(f"OVMF footer table length {total} is out of range")
    start = top - total
    cursor = top - _ENTRY_TRAILER  # entries end where the footer entry's trailer begins
    entries: dict[uuid.UUID, bytes] = {}
    while cursor > start:
        if cursor - _ENTRY_TRAILER < start:
            raise LayoutError("truncated entry in the OVMF footer table")
        guid = uuid.UUID(bytes_le=bytes(image[cursor - 16 : cursor]))
        length = int.from_bytes(image[cursor - 18 : cursor - 16], "little")
        if length < _ENTRY_TRAILER or cursor - length < start:
            raise LayoutError(f"OVMF footer entry {guid} has a bad length {length}")
        entries[guid] = bytes(image[cursor - length : cursor - _ENTRY_TRAILER])
        cursor -= length
    return entries


def sev_es_reset_eip(image: bytes) -> int:
    """The application processors' reset EIP from the image's SEV-ES reset block.

    Raises :class:`~sevemu.errors.LayoutError` when the image has no such entry.
    """
    data = footer_table(image).get(SEV_ES_RESET_BLOCK_GUID)
    if data is None or len(data) < 4:
        raise LayoutError("OVMF image has no SEV-ES reset block")
    return int.from_bytes(data[:4], "little")


def sev_secret_area(image: bytes) -> tuple[int, int] | None:
    """(base GPA, size) of the image's SEV secret area, or ``None`` when the image has no footer
    table or no SEV secret block.

    Raises :class:`~sevemu.errors.LayoutError` when the block is too short to hold base and size.
    """
    try:
        table = footer_table(image)
    except LayoutError:
        return None
    data = table.get(SEV_SECRET_BLOCK_GUID)
    if data is None:
        return None
    if len(data) < 8:
        raise LayoutError(f"OVMF SEV secret block of {len(data)} bytes, expected base and size (8)")
    return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:8], "little")


SectionType = OvmfSectionType
"""OVMF SEV metadata section types (:class:`sevemu.abi.snp.OvmfSectionType`)."""


@dataclass(frozen=True, slots=True)
class MetadataSection:
    """One section of OVMF's SEV metadata: a guest-physical range the VMM prepares at SNP launch."""

    gpa: int
    size: int
    type: SectionType


_METADATA_HEADER = 16  # "ASEV", u32 size, u32 version (1), u32 number of sections
_METADATA_ITEM = 12  # u32 gpa, u32 size, u32 type


def sev_metadata(image: bytes) -> list[MetadataSection]:
    """The image's SEV metadata sections in table order (empty when the image has none).

    Raises :class:`~sevemu.errors.LayoutError` for a header that is not "ASEV" version 1, a table
    outside the image, or an unknown section type.
    """
    try:
        entry = footer_table(image).get(OVMF_SEV_METADATA_GUID)
    except LayoutError:
        return []
    if entry is None:
        return []
    if len(entry) < 4:
        raise LayoutError("OVMF SEV metadata entry shorter than its offset")
    start = len(image) - int.from_bytes(entry[:4], "little")
    head = bytes(image[start : start + _METADATA_HEADER]) if 0 <= start else b""
    if len(head) != _METADATA_HEADER or head[:4] != b"ASEV":
        raise LayoutError("OVMF SEV metadata: no 'ASEV' header where the footer table points")
    size, version, count = (int.from_bytes(head[i : i + 4], "little") for i in (4, 8, 12))
    if version != 1 or size != _METADATA_HEADER + count * _METADATA_ITEM or start + size > len(image):
        raise LayoutError(f"OVMF SEV metadata: version {version}, size {size}, {count} sections do not fit")
    out = []
    for i in range(count):
        off = start + _METADATA_HEADER + i * _METADATA_ITEM
        gpa, length, kind = (int.from_bytes(image[off + j : off + j + 4], "little") for j in (0, 4, 8))
        try:
            out.append(MetadataSection(gpa, length, SectionType(kind)))
        except ValueError:
            raise LayoutError(f"OVMF SEV metadata section {i}: unknown type {kind:#x}") from None
    return out


def sev_hashes_table_gpa(image: bytes) -> int | None:
    """GPA of the kernel-hashes table (the SEV_HASH_TABLE_RV entry), or None when the image has none."""
    try:
        data = footer_table(image).get(SEV_HASH_TABLE_RV_GUID)
    except LayoutError:
        return None
    return None if data is None or len(data) < 4 else int.from_bytes(data[:4], "little")
