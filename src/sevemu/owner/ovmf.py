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

from sevemu.errors import LayoutError

__all__ = [
    "OVMF_TABLE_FOOTER_GUID",
    "SEV_ES_RESET_BLOCK_GUID",
    "SEV_HASH_TABLE_RV_GUID",
    "SEV_SECRET_BLOCK_GUID",
    "footer_table",
    "sev_es_reset_eip",
    "sev_secret_area",
]

OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
"""Entry giving the guest-physical address (u32) and size of the kernel-hashes page."""
SEV_SECRET_BLOCK_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")
"""Entry giving the guest-physical base (u32) and size (u32) of the LAUNCH_SECRET area."""

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
