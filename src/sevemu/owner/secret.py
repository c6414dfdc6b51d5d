"""LAUNCH_SECRET packaging on the guest owner's side (SEV API 55766, LAUNCH_SECRET; virtee/sevctl
``src/secret.rs`` for the OVMF secret table).

Packet
    Header (0x34): ``flags u32 || iv[16] || mac[32]``; TRANS = AES-128-CTR(TEK, iv)(plaintext),
    GUEST_LEN = TRANS_LEN = len(plaintext); the MAC is
    :func:`sevemu.crypto.transport.packet_mac` under TIK, covering the launch's MEASURE from API
    0.17 on -- so a secret is bound to the one measured launch it was released for.

OVMF secret table (the convention OVMF's SEV secret area expects; virtee/sevctl builds it)
    ``GUID 1e74f542-71dd-4d66-963e-ef4287ff173b || u32 length || entries``, each entry
    ``GUID || u32 (16 + 4 + len(data)) || data``; ``length`` counts header and entries without
    padding; the whole is zero-padded to a multiple of 16 bytes.  GUIDs use ``bytes_le``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from sevemu._util.units import KiB
from sevemu.abi.sev import HdrBuf
from sevemu.crypto.transport import (
    IV_SIZE,
    MAC_SIZE,
    TransportKeys,
    open_packet,
    seal_packet,
)
from sevemu.errors import InputError, LayoutError

__all__ = [
    "MAX_SECRET_SIZE",
    "SECRET_TABLE_GUID",
    "LaunchSecret",
    "SecretEntry",
    "package_secret",
    "parse_secret_table",
    "secret_table",
    "unpack_secret",
]

SECRET_TABLE_GUID = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")

MAX_SECRET_SIZE = 16 * KiB
"""The largest TRANS a host can hand to LAUNCH_SECRET: KVM copies it with ``psp_copy_user_blob``,
which refuses more than ``SEV_FW_BLOB_MAX_SIZE`` (Linux arch/x86/kvm/svm/sev.c ``sev_launch_secret``;
include/linux/psp-sev.h).  OVMF's own secret area is one 4 KiB page."""

_HEADER = 16 + 4  # GUID + u32 length, for the table and for each entry


SecretEntry = tuple[uuid.UUID | str, bytes]
"""One secret: its GUID (object or string) and its bytes."""


def _guid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InputError(f"not a GUID: {value!r}") from exc


def _entry(guid: uuid.UUID, data: bytes) -> bytes:
    length = _HEADER + len(data)
    if length >= 2**32:
        raise InputError("secret entry too large for its u32 length field")
    return guid.bytes_le + length.to_bytes(4, "little") + bytes(data)


def secret_table(secrets: Iterable[SecretEntry]) -> bytes:
    """The padded OVMF secret table holding ``secrets`` in the order given.

    Raises :class:`~sevemu.errors.InputError` for a malformed GUID or a GUID given twice.
    """
    seen: set[uuid.UUID] = set()
    body = bytearray()
    for guid_value, data in secrets:
        guid = _guid(guid_value)
        if guid in seen:
            raise InputError(f"secret GUID {guid} given twice")
        seen.add(guid)
        body += _entry(guid, data)
    table = _entry(SECRET_TABLE_GUID, bytes(body))
    return table + bytes(-len(table) % 16)


def parse_secret_table(table: bytes) -> dict[uuid.UUID, bytes]:
    """Inverse of :func:`secret_table` (padding after the declared length is ignored).

    Raises :class:`~sevemu.errors.LayoutError` for a wrong table GUID or lengths that do not add up.
    """
    if len(table) < _HEADER or bytes(table[:16]) != SECRET_TABLE_GUID.bytes_le:
        raise LayoutError("not an OVMF secret table (table GUID missing)")
    total = int.from_bytes(table[16:20], "little")
    if total < _HEADER or total > len(table):
        raise LayoutError(f"secret table length {total} does not fit the {len(table)}-byte buffer")
    out: dict[uuid.UUID, bytes] = {}
    pos = _HEADER
    while pos < total:
        if pos + _HEADER > total:
            raise LayoutError("truncated secret entry header")
        guid = uuid.UUID(bytes_le=bytes(table[pos : pos + 16]))
        length = int.from_bytes(table[pos + 16 : pos + 20], "little")
        if length < _HEADER or pos + length > total:
            raise LayoutError(f"secret entry {guid} has a bad length {length}")
        out[guid] = bytes(table[pos + _HEADER : pos + length])
        pos += length
    return out


@dataclass(frozen=True, slots=True)
class LaunchSecret:
    """A LAUNCH_SECRET packet: the 0x34-byte header and TRANS (GUEST_LEN = len(trans))."""

    header: HdrBuf
    trans: bytes

    @property
    def header_bytes(self) -> bytes:
        """The encoded packet header (what ``sevctl secret build`` writes as the header file)."""
        return self.header.encode()

    @property
    def guest_len(self) -> int:
        """GUEST_LEN (= TRANS_LEN) for the LAUNCH_SECRET command buffer."""
        return len(self.trans)


def package_secret(
    keys: TransportKeys,
    plaintext: bytes,
    *,
    measure: bytes,
    api_major: int,
    api_minor: int,
    iv: bytes | None = None,
    flags: int = 0,
) -> LaunchSecret:
    """Seal ``plaintext`` (e.g. a :func:`secret_table`) for the launch whose MEASURE is given.

    ``measure`` is the 32-byte MEASURE (first half of the LAUNCH_MEASURE output); ``iv`` is random
    unless given (tests).
    """
    if len(measure) != MAC_SIZE:
        raise LayoutError(f"MEASURE must be {MAC_SIZE} bytes, got {len(measure)}")
    header, trans = seal_packet(
        keys,
        plaintext,
        iv=os.urandom(IV_SIZE) if iv is None else iv,
        api_major=api_major,
        api_minor=api_minor,
        measure=measure,
        flags=flags,
    )
    return LaunchSecret(header=header, trans=trans)


def unpack_secret(
    keys: TransportKeys,
    packet: LaunchSecret,
    *,
    measure: bytes,
    api_major: int,
    api_minor: int,
) -> bytes:
    """Verify and decrypt a packet as the firmware would (a check for owner tooling and tests).

    Raises :class:`~sevemu.crypto.transport.PacketMacError` when the MAC does not verify.
    """
    return open_packet(
        keys,
        packet.header,
        packet.trans,
        guest_len=packet.guest_len,
        api_major=api_major,
        api_minor=api_minor,
        measure=measure,
    )
