"""Nested layouts, bit layouts, arrays and version-dependent fields of :mod:`sevemu.abi.struct`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevemu.abi.struct import (
    Struct,
    array,
    bit,
    bit_span,
    bits,
    field_span,
    layout,
    layout_fields,
    nested,
    raw,
    u8,
    u16,
    u32,
)
from sevemu.errors import LayoutError


@layout(size=8, ignored_bits=((7, 6),))
class Flags(Struct):
    """A 64-bit bit layout: bits 63:13 and 5:4 reserved, 7:6 ignored."""

    enable: bool = bit(0)
    mode: int = bits(3, 1)
    level: int = bits(12, 8)


@layout(size=8)
class Pair(Struct):
    a: int = u16(0)
    b: int = u32(4)  # bytes 2..3 reserved


@layout(size=0x40, version="version")
class Versioned(Struct):
    version: int = u32(0x00)
    flags: Flags = nested(0x08, Flags)
    pairs: tuple[Pair, ...] = array(0x10, 2, Pair)
    perms: tuple[int, ...] = array(0x20, 4, u8)
    fam: int | None = u8(0x24, since=3)
    tag: bytes | None = raw(0x28, 8, since=5)
    hint: int | None = u32(0x30, since=4, absent="ignored")
    tail: Pair | None = nested(0x38, Pair, since=5)


def sample(version: int = 5) -> Versioned:
    return Versioned(
        version=version,
        flags=Flags(enable=True, mode=5, level=0x1F),
        pairs=(Pair(1, 2), Pair(3, 0xFFFF_FFFF)),
        perms=(0x1F, 0x0F, 3, 0),
        fam=0x19 if version >= 3 else None,
        tag=b"12345678" if version >= 5 else None,
        hint=7 if version >= 4 else None,
        tail=Pair(9, 10) if version >= 5 else None,
    )


# --- bit layouts --------------------------------------------------------------------------------


def test_bit_layout_decodes_named_ranges() -> None:
    value = 1 | 5 << 1 | 0x1F << 8
    flags = Flags.from_int(value)
    assert flags == Flags(enable=True, mode=5, level=0x1F)
    assert flags.enable is True and flags.to_int() == value
    assert Flags.decode(value.to_bytes(8, "little")) == flags
    assert bit_span(Flags, "mode") == (3, 1)


@pytest.mark.parametrize(("value", "where"), [(1 << 4, "4"), (3 << 4, "5:4"), (1 << 13, "13"), (1 << 63, "63")])
def test_bit_layout_refuses_reserved_bits(value: int, where: str) -> None:
    with pytest.raises(LayoutError, match=rf"Flags: reserved bits {where} are not zero"):
        Flags.from_int(value)


def test_bit_layout_ignored_bits_accepted_and_encoded_as_zero() -> None:
    flags = Flags.from_int(0xC0 | 1)
    assert flags == Flags(enable=True)
    assert flags.to_int() == 1


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": 8}, r"Flags.mode \(bits 3:1\): 8 does not fit 3 bit"),
    ({"level": -1}, r"Flags.level \(bits 12:8\): -1 does not fit"),
    ({"enable": 2}, r"Flags.enable \(bits 0:0\): 2 does not fit 1 bit"),
    ({"mode": "1"}, r"Flags.mode"),
])
def test_bit_layout_encode_refuses_values_outside_the_range(change: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        dataclasses.replace(Flags(), **change).encode()


def test_from_int_range() -> None:
    with pytest.raises(LayoutError, match="does not fit 8 bytes"):
        Flags.from_int(1 << 64)
    with pytest.raises(LayoutError, match="does not fit 8 bytes"):
        Flags.from_int(-1)


# --- nested layouts and arrays ------------------------------------------------------------------


def test_nested_and_arrays_round_trip() -> None:
    obj = sample()
    data = obj.encode()
    assert len(data) == Versioned.SIZE
    assert data[0x08:0x10] == obj.flags.encode()
    assert data[0x10:0x18] == Pair(1, 2).encode() and data[0x18:0x20] == Pair(3, 0xFFFF_FFFF).encode()
    assert data[0x20:0x24] == bytes([0x1F, 0x0F, 3, 0])
    back = Versioned.decode(data)
    assert back == obj
    assert isinstance(back.flags, Flags) and isinstance(back.pairs, tuple) and back.perms == (0x1F, 0x0F, 3, 0)


def test_nested_reserved_bytes_named_with_the_path() -> None:
    data = bytearray(sample().encode())
    data[0x18 + 2] = 1  # Pair.pairs[1]: reserved byte 2
    with pytest.raises(LayoutError, match=r"Versioned.pairs at 0x10 \[1\]: Pair: reserved bytes 0x2..0x3"):
        Versioned.decode(bytes(data))
    data = bytearray(sample().encode())
    data[0x08 + 1] |= 0x20  # Flags bit 13
    with pytest.raises(LayoutError, match=r"Versioned.flags at 0x8: Flags: reserved bits 13 are not zero"):
        Versioned.decode(bytes(data))
    data = bytearray(sample().encode())
    data[0x3A] = 1  # tail (a nested Pair present from v5): its reserved byte 2
    with pytest.raises(LayoutError, match=r"Versioned.tail at 0x38: Pair: reserved bytes"):
        Versioned.decode(bytes(data))


def test_outer_reserved_bytes() -> None:
    data = bytearray(sample().encode())
    data[0x05] = 1
    with pytest.raises(LayoutError, match=r"Versioned: reserved bytes 0x4..0x7 are not zero"):
        Versioned.decode(bytes(data))


@pytest.mark.parametrize(("change", "message"), [
    ({"pairs": (Pair(),)}, r"Versioned.pairs at 0x10: expected 2 elements, got tuple of length 1"),
    ({"pairs": (Pair(), Pair(), Pair())}, r"expected 2 elements, got tuple of length 3"),
    ({"pairs": (Pair(), Flags())}, r"Versioned.pairs at 0x10 \[1\]: expected a Pair, got Flags"),
    ({"pairs": (Pair(), Pair(b=1 << 32))}, r"Versioned.pairs at 0x10 \[1\]: Pair.b at 0x4: 4294967296 does not fit"),
    ({"perms": (1, 2, 3, 4, 5)}, r"Versioned.perms at 0x20: expected 4 elements"),
    ({"perms": (1, 2, 256, 4)}, r"Versioned.perms at 0x20 \[2\]: 256 does not fit 1 bytes"),
    ({"perms": 7}, r"Versioned.perms at 0x20: expected 4 elements, got int"),
    ({"flags": Pair()}, r"Versioned.flags at 0x8: expected a Flags, got Pair"),
    ({"flags": Flags(mode=9)}, r"Versioned.flags at 0x8: Flags.mode \(bits 3:1\): 9 does not fit"),
])
def test_encode_refuses_bad_nested_and_array_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        dataclasses.replace(sample(), **change).encode()


# --- version-dependent fields -------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3, 4, 5, 6])
def test_versions_round_trip(version: int) -> None:
    obj = sample(version)
    back = Versioned.decode(obj.encode())
    assert back == obj
    assert (back.fam is None) == (version < 3)
    assert (back.tag is None) == (back.tail is None) == (version < 5)


@pytest.mark.parametrize(("version", "offset", "field"), [(2, 0x24, "fam"), (4, 0x2F, "tag"), (3, 0x3C, "tail")])
def test_decode_refuses_bytes_of_a_field_the_version_lacks(version: int, offset: int, field: str) -> None:
    data = bytearray(sample(version).encode())
    data[offset] = 1
    with pytest.raises(LayoutError, match=rf"Versioned.{field} at 0x[0-9a-f]+: field exists from version \d; "
                                          rf"version {version} requires zero bytes"):
        Versioned.decode(bytes(data))


def test_absent_ignored_field_accepts_anything_and_encodes_zero() -> None:
    data = bytearray(sample(3).encode())
    data[0x30:0x34] = b"\xff\xff\xff\xff"
    obj = Versioned.decode(bytes(data))
    assert obj.hint is None
    assert obj.encode()[0x30:0x34] == bytes(4)


def test_encode_gates_versions_both_ways() -> None:
    with pytest.raises(LayoutError, match=r"Versioned.fam at 0x24: field exists from version 3; version 2 needs None"):
        dataclasses.replace(sample(2), fam=0x19).encode()
    with pytest.raises(LayoutError, match=r"Versioned.tag at 0x28: version 5 has this field; it is None"):
        dataclasses.replace(sample(5), tag=None).encode()
    with pytest.raises(LayoutError, match=r"Versioned.tail at 0x38: version 6 has this field"):
        dataclasses.replace(sample(6), tail=None).encode()


def test_defaults_of_versioned_fields_are_none() -> None:
    assert Versioned().fam is None and Versioned().tail is None
    assert Versioned(version=1).encode() == (1).to_bytes(4, "little") + bytes(0x3C)


def test_wrong_lengths_and_prefix() -> None:
    data = sample().encode()
    with pytest.raises(LayoutError, match=r"Versioned: expected 0x40 bytes, got 0x3f"):
        Versioned.decode(data[:-1])
    with pytest.raises(LayoutError, match=r"Flags: expected 0x8 bytes, got 0x9"):
        Flags.decode(bytes(9))
    assert Versioned.decode_prefix(memoryview(data + b"more")) == sample()
    for layout_cls in (Versioned, Flags, Pair):
        with pytest.raises(LayoutError, match="expected a bytes-like buffer, got str"):
            layout_cls.decode("x" * layout_cls.SIZE)  # type: ignore[arg-type]


# --- introspection ------------------------------------------------------------------------------


def test_layout_fields_and_spans() -> None:
    names = [(f.name, f.kind, f.offset, f.size) for f in layout_fields(Versioned)]
    assert names == [("version", "int", 0, 4), ("flags", "nested", 8, 8), ("pairs", "structs", 0x10, 16),
                     ("perms", "ints", 0x20, 4), ("fam", "int", 0x24, 1), ("tag", "bytes", 0x28, 8),
                     ("hint", "int", 0x30, 4), ("tail", "nested", 0x38, 8)]
    assert field_span(Versioned, "pairs") == (0x10, 16)
    assert [f.since for f in layout_fields(Versioned)][-4:] == [3, 5, 4, 5]
    assert [(f.name, f.hi, f.lo) for f in layout_fields(Flags)] == [("enable", 0, 0), ("mode", 3, 1),
                                                                     ("level", 12, 8)]
    with pytest.raises(LayoutError, match="bit field"):
        field_span(Flags, "mode")
    with pytest.raises(LayoutError, match="not a bit field"):
        bit_span(Versioned, "flags")
    with pytest.raises(LayoutError, match="no field"):
        bit_span(Flags, "nope")


# --- declaration-time checks --------------------------------------------------------------------


def _declare(size: int, /, **fields: object) -> None:
    layout(size=size)(type("Bad", (Struct,), {"__annotations__": dict.fromkeys(fields, "int"), **fields}))


@pytest.mark.parametrize(("size", "make", "message"), [
    (8, lambda: {"x": bits(2, 3)}, "hi:lo with hi >= lo"),
    (1, lambda: {"x": bits(8, 1)}, r"Bad.x: bits 8:1 outside the 8-bit layout"),
    (2, lambda: {"x": bits(7, 0), "y": bit(7)}, r"Bad.y: bits 7:7 overlaps another field"),
    (8, lambda: {"x": bits(3, 0), "y": u8(1)}, "byte fields or bit fields, not both"),
    (8, lambda: {"x": array(0, 3, u32)}, r"Bad.x: 0xc bytes at 0x0 outside the 0x8-byte layout"),
    (8, lambda: {"x": array(0, 0, u8)}, "count 0 is not positive"),
    (8, lambda: {"x": array(0, 2, int)}, "is not a declared @layout class"),
    (8, lambda: {"x": array(0, 2, bits)}, "element must be u8/u16/u32/u64 or a layout"),
    (8, lambda: {"x": nested(4, Pair)}, r"Bad.x: 0x8 bytes at 0x4 outside"),
    (16, lambda: {"x": nested(0, Pair), "y": u8(7)}, "overlaps another field"),
    (8, lambda: {"x": nested(0, int)}, "is not a declared @layout class"),  # type: ignore[arg-type]
    (8, lambda: {"x": u8(0, since=2)}, r"since=2 needs @layout\(version="),
    (8, lambda: {"x": raw(0, 0)}, "size 0 is not positive"),
    (8, lambda: {"x": u8(0, absent="maybe")}, "absent must be"),  # type: ignore[arg-type]
])
def test_declaration_errors(size: int, make: Callable[[], dict[str, object]], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        _declare(size, **make())


def test_declaration_errors_of_layout_options() -> None:
    with pytest.raises(TypeError, match=r"ignored range \(0x0, 0x2\) covers a field"):

        @layout(size=4, ignored=((0, 2),))
        class IgnoredField(Struct):
            x: int = u8(1)

    with pytest.raises(TypeError, match=r"ignored bits 3:2 overlap a field"):

        @layout(size=1, ignored_bits=((3, 2),))
        class IgnoredBit(Struct):
            x: int = bits(2, 0)

    with pytest.raises(TypeError, match="version field 'v' is not an unversioned integer field"):

        @layout(size=8, version="v")
        class NoVersionField(Struct):
            x: int | None = u8(0, since=1)

    with pytest.raises(TypeError, match="version field 'v' is not an unversioned integer field"):

        @layout(size=16, version="v")
        class BytesVersion(Struct):
            v: bytes = raw(0, 4)

    with pytest.raises(TypeError, match="must subclass Struct"):

        @layout(size=4)
        class NotAStruct:  # type: ignore[type-var]
            x: int = u32(0)

    with pytest.raises(TypeError, match="ignored_bits= is for bit layouts"):

        @layout(size=4, ignored_bits=((1, 0),))
        class BitsOnBytes(Struct):
            x: int = u16(0)


# --- properties ---------------------------------------------------------------------------------


@given(st.binary(min_size=Versioned.SIZE, max_size=Versioned.SIZE))
def test_decode_encode_identity_or_refusal(data: bytes) -> None:
    """Any buffer either decodes and re-encodes to itself (ignored bytes aside) or is refused."""
    try:
        obj = Versioned.decode(data)
    except LayoutError:
        return
    out = obj.encode()
    mask = bytearray(data)
    mask[0x08] &= ~0xC0  # Flags: ignored bits 7:6
    if obj.version < 4:
        mask[0x30:0x34] = bytes(4)  # hint: ignored below version 4
    assert out == bytes(mask)


@given(st.integers(0, 1), st.integers(0, 7), st.integers(0, 31), st.integers(0, 3))
def test_bit_layout_identity(enable: int, mode: int, level: int, ignored: int) -> None:
    value = enable | mode << 1 | ignored << 6 | level << 8
    flags = Flags.from_int(value)
    assert (flags.enable, flags.mode, flags.level) == (bool(enable), mode, level)
    assert flags.to_int() == value & ~0xC0


def test_flat_layout_int_fields_still_checked() -> None:
    with pytest.raises(LayoutError, match=r"Pair.b at 0x4: -1 does not fit 4 bytes"):
        Pair(b=-1).encode()
    with pytest.raises(LayoutError, match=r"Pair.a at 0x0: 'x' does not fit 2 bytes"):
        Pair(a="x").encode()  # type: ignore[arg-type]
