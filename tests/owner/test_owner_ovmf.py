"""OVMF footer table parsing, on synthetic images (the real trimmed image is not shipped)."""

from __future__ import annotations

import uuid

import pytest

from sevemu.errors import LayoutError
from sevemu.owner.ovmf import (
    OVMF_TABLE_FOOTER_GUID,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_RV_GUID,
    footer_table,
    sev_es_reset_eip,
)


def entry(guid: uuid.UUID, data: bytes) -> bytes:
    return data + (len(data) + 18).to_bytes(2, "little") + guid.bytes_le


def image(entries: list[bytes], prefix: bytes = b"\xff" * 256) -> bytes:
    body = b"".join(entries)
    footer = (len(body) + 18).to_bytes(2, "little") + OVMF_TABLE_FOOTER_GUID.bytes_le
    return prefix + body + footer + b"\x90" * 32  # reset vector area


def test_parse_entries() -> None:
    img = image([entry(SEV_HASH_TABLE_RV_GUID, (0x80C000).to_bytes(4, "little") + (0x400).to_bytes(4, "little")),
                 entry(SEV_ES_RESET_BLOCK_GUID, (0x0080B004).to_bytes(4, "little"))])
    table = footer_table(img)
    assert set(table) == {SEV_HASH_TABLE_RV_GUID, SEV_ES_RESET_BLOCK_GUID}
    assert sev_es_reset_eip(img) == 0x0080B004


def test_no_reset_block() -> None:
    img = image([entry(SEV_HASH_TABLE_RV_GUID, bytes(8))])
    with pytest.raises(LayoutError):
        sev_es_reset_eip(img)


def test_malformed_images() -> None:
    with pytest.raises(LayoutError):
        footer_table(bytes(40))
    with pytest.raises(LayoutError):
        footer_table(bytes(4096))  # no footer GUID
    good = image([entry(SEV_ES_RESET_BLOCK_GUID, bytes(4))])
    top = len(good) - 32
    too_long = good[: top - 18] + (0xFFFF).to_bytes(2, "little") + good[top - 16 :]
    with pytest.raises(LayoutError):
        footer_table(too_long)
    bad_entry = bytearray(good)
    bad_entry[top - 18 - 18 : top - 18 - 16] = (500).to_bytes(2, "little")  # entry longer than the table
    with pytest.raises(LayoutError):
        footer_table(bytes(bad_entry))
