"""The declarative layout framework (:mod:`sevemu.abi.struct`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sevemu.abi.struct import Struct, field_span, layout, raw, u8, u16, u32, u64
from sevemu.errors import LayoutError


@layout(size=0x18, ignored=((0x14, 2),))
class Sample(Struct):
    a: int = u8(0x00)
    b: int = u16(0x02)
    c: int = u32(0x04)
    d: int = u64(0x08)
    e: bytes = raw(0x10, 4)


def test_little_endian_encoding() -> None:
    obj = Sample(a=0x11, b=0x2233, c=0x44556677, d=0x8899AABBCCDDEEFF, e=b"wxyz")
    assert obj.encode() == bytes.fromhex("11 00 3322 77665544 ffeeddccbbaa9988") + b"wxyz" + bytes(4)
    assert Sample.decode(obj.encode()) == obj


def test_reserved_and_ignored_ranges() -> None:
    base = bytearray(Sample().encode())
    bad = bytearray(base)
    bad[0x01] = 1  # reserved gap between a and b
    with pytest.raises(LayoutError, match="reserved bytes 0x1..0x1"):
        Sample.decode(bytes(bad))
    bad = bytearray(base)
    bad[0x16] = 1  # reserved tail after the ignored range
    with pytest.raises(LayoutError, match="reserved"):
        Sample.decode(bytes(bad))
    ok = bytearray(base)
    ok[0x14:0x16] = b"\xff\xff"  # ignored, not must-be-zero
    assert Sample.decode(bytes(ok)) == Sample()
    assert Sample().encode()[0x14:0x16] == bytes(2)


def test_decode_prefix_and_lengths() -> None:
    data = Sample(a=7).encode()
    assert Sample.decode_prefix(data + b"trailing").a == 7
    with pytest.raises(LayoutError):
        Sample.decode_prefix(data[:-1])
    with pytest.raises(LayoutError):
        Sample.decode(data + b"\x00")
    assert Sample.decode(memoryview(bytearray(data))) == Sample(a=7)


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(LayoutError, match="Sample.b"):
        Sample(b=0x1_0000).encode()
    with pytest.raises(LayoutError, match="Sample.a"):
        Sample(a=-1).encode()
    with pytest.raises(LayoutError, match="Sample.e"):
        Sample(e=b"abc").encode()


def test_offsets() -> None:
    assert Sample.SIZE == 0x18
    assert Sample.offset_of("d") == 0x08
    assert field_span(Sample, "e") == (0x10, 4)
    with pytest.raises(LayoutError):
        Sample.offset_of("nope")


def test_declaration_errors() -> None:
    with pytest.raises(TypeError, match="overlaps"):

        @layout(size=8)
        class Overlap(Struct):
            x: int = u32(0)
            y: int = u32(2)

    with pytest.raises(TypeError, match="outside"):

        @layout(size=4)
        class TooBig(Struct):
            x: int = u64(0)

    with pytest.raises(TypeError, match="without offset"):

        @layout(size=4)
        class NoOffset(Struct):
            x: int = 0

    with pytest.raises(TypeError, match="alone"):

        @layout(size=4)
        @dataclass(frozen=True, slots=True)
        class TwoDecorators(Struct):
            x: int = u32(0)
