"""OVMF secret table and LAUNCH_SECRET packets (SEV API 55766, LAUNCH_SECRET; sevctl src/secret.rs)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevemu.abi.sev import HdrBuf
from sevemu.crypto.transport import PacketMacError, TransportKeys, aes128_ctr
from sevemu.errors import InputError, LayoutError
from sevemu.owner.secret import (
    SECRET_TABLE_GUID,
    LaunchSecret,
    package_secret,
    parse_secret_table,
    secret_table,
    unpack_secret,
)

KEYS = TransportKeys(tek=b"T" * 16, tik=b"I" * 16)
MEASURE = b"M" * 32
G1 = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
G2 = uuid.UUID("736869e5-aaaa-4973-92ec-06879ce3da0b")


def test_table_layout() -> None:
    table = secret_table([(G1, b"abc"), (str(G2), b"")])
    body = G1.bytes_le + (23).to_bytes(4, "little") + b"abc" + G2.bytes_le + (20).to_bytes(4, "little")
    header = SECRET_TABLE_GUID.bytes_le + (20 + len(body)).to_bytes(4, "little")
    assert table == header + body + bytes(-(len(header) + len(body)) % 16)
    assert len(table) % 16 == 0


@given(st.lists(st.binary(max_size=40), max_size=5))
def test_table_round_trip(datas: list[bytes]) -> None:
    secrets = {uuid.UUID(int=i + 1): d for i, d in enumerate(datas)}
    assert parse_secret_table(secret_table(secrets.items())) == secrets


def test_table_input_errors() -> None:
    with pytest.raises(InputError):
        secret_table([(G1, b"a"), (G1, b"b")])
    with pytest.raises(InputError):
        secret_table([("not-a-guid", b"a")])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: bytes(16) + t[16:],  # table GUID
        lambda t: t[:16] + (10).to_bytes(4, "little") + t[20:],  # total length below the header
        lambda t: t[:16] + (len(t) + 1).to_bytes(4, "little") + t[20:],  # total length past the buffer
        lambda t: t[:36] + (999).to_bytes(4, "little") + t[40:],  # entry length past the table
        lambda t: t[:36] + (3).to_bytes(4, "little") + t[40:],  # entry length below its header
    ],
)
def test_table_parse_errors(mutate: Callable[[bytes], bytes]) -> None:
    table = secret_table([(G1, b"abcdef")])
    with pytest.raises(LayoutError):
        parse_secret_table(mutate(table))


def test_packet_contents() -> None:
    table = secret_table([(G1, b"s3cret")])
    packet = package_secret(KEYS, table, measure=MEASURE, api_major=1, api_minor=40, iv=b"v" * 16)
    assert packet.trans == aes128_ctr(KEYS.tek, b"v" * 16, table)
    assert packet.guest_len == len(table) and len(packet.header_bytes) == 0x34
    assert packet.header_bytes[:4] == bytes(4) and packet.header_bytes[4:20] == b"v" * 16


def test_random_iv() -> None:
    a = package_secret(KEYS, b"x" * 16, measure=MEASURE, api_major=1, api_minor=40)
    b = package_secret(KEYS, b"x" * 16, measure=MEASURE, api_major=1, api_minor=40)
    assert a.header.iv != b.header.iv and a.trans != b.trans


@pytest.mark.parametrize("what", ["iv", "trans", "mac", "flags", "measure"])
def test_flipped_bit_is_refused(what: str) -> None:
    packet = package_secret(KEYS, b"0123456789abcdef", measure=MEASURE, api_major=1, api_minor=40, iv=b"v" * 16)
    hdr, trans, measure = packet.header, packet.trans, MEASURE
    if what == "iv":
        hdr = HdrBuf(flags=hdr.flags, iv=bytes([hdr.iv[0] ^ 1]) + hdr.iv[1:], mac=hdr.mac)
    elif what == "mac":
        hdr = HdrBuf(flags=hdr.flags, iv=hdr.iv, mac=hdr.mac[:-1] + bytes([hdr.mac[-1] ^ 0x80]))
    elif what == "flags":
        hdr = HdrBuf(flags=1, iv=hdr.iv, mac=hdr.mac)
    elif what == "trans":
        trans = bytes([trans[0] ^ 4]) + trans[1:]
    else:
        measure = bytes([measure[0] ^ 1]) + measure[1:]
    with pytest.raises(PacketMacError):
        unpack_secret(KEYS, LaunchSecret(hdr, trans), measure=measure, api_major=1, api_minor=40)


def test_measure_must_be_32_bytes() -> None:
    with pytest.raises(LayoutError):
        package_secret(KEYS, b"x", measure=MEASURE + bytes(16), api_major=1, api_minor=40)
