"""A small declarative framework for the spec's byte layouts.

Layouts in the AMD specifications are tables of (offset, size, field).  Each one is declared here
exactly once, as a frozen slotted dataclass whose fields carry their offset and size::

    @layout(size=0x14)
    @dataclass(frozen=True, slots=True)
    class InitCmd(Struct):
        options: int = u32(0x00)
        tmr_paddr: int = u64(0x08)
        tmr_len: int = u32(0x10)

Rules, enforced when the class is declared:

* every field has an explicit offset; fields may not overlap and must fit in ``size``;
* all integers are little-endian and unsigned;
* every byte not covered by a field is reserved: ``decode`` refuses a buffer where it is non-zero
  (the spec's "must be zero"), ``encode`` writes zeros there.  A range the spec marks as ignored
  (not must-be-zero) is declared with ``ignored=((offset, size), ...)``.

``decode`` raises :class:`~sevemu.errors.LayoutError` on a wrong length or non-zero reserved bytes;
``encode`` raises it for a value that does not fit its field.  ``decode_prefix`` decodes from the
start of a longer buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeVar

from sevemu.errors import LayoutError

__all__ = ["Struct", "field_span", "layout", "raw", "u8", "u16", "u32", "u64"]

_META = "sevemu_abi"


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    offset: int
    size: int
    kind: str  # "int" or "bytes"


def _int_field(offset: int, size: int, default: int) -> Any:
    return dataclasses.field(default=default, metadata={_META: _Spec(offset, size, "int")})


def u8(offset: int, default: int = 0) -> Any:
    """An unsigned 8-bit field at ``offset``."""
    return _int_field(offset, 1, default)


def u16(offset: int, default: int = 0) -> Any:
    """An unsigned little-endian 16-bit field at ``offset``."""
    return _int_field(offset, 2, default)


def u32(offset: int, default: int = 0) -> Any:
    """An unsigned little-endian 32-bit field at ``offset``."""
    return _int_field(offset, 4, default)


def u64(offset: int, default: int = 0) -> Any:
    """An unsigned little-endian 64-bit field at ``offset``."""
    return _int_field(offset, 8, default)


def raw(offset: int, size: int) -> Any:
    """A fixed-size byte string field at ``offset`` (default: all zeros)."""
    zero = bytes(size)
    return dataclasses.field(default=zero, metadata={_META: _Spec(offset, size, "bytes")})


class Struct:
    """Base of every layout class; :func:`layout` fills in the class attributes."""

    __slots__ = ()
    SIZE: ClassVar[int]
    _SPECS: ClassVar[tuple[tuple[str, _Spec], ...]]
    _RESERVED: ClassVar[tuple[tuple[int, int], ...]]

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> Self:
        """Decode exactly ``SIZE`` bytes; reserved bytes must be zero."""
        data = bytes(buf)
        name = cls.__name__
        if len(data) != cls.SIZE:
            raise LayoutError(f"{name}: expected {cls.SIZE:#x} bytes, got {len(data):#x}")
        for off, n in cls._RESERVED:
            if any(data[off : off + n]):
                raise LayoutError(f"{name}: reserved bytes {off:#x}..{off + n - 1:#x} are not zero")
        values: dict[str, Any] = {}
        for fname, spec in cls._SPECS:
            chunk = data[spec.offset : spec.offset + spec.size]
            values[fname] = int.from_bytes(chunk, "little") if spec.kind == "int" else chunk
        return cls(**values)

    @classmethod
    def decode_prefix(cls, buf: bytes | bytearray | memoryview) -> Self:
        """Decode the first ``SIZE`` bytes of a longer buffer."""
        if len(buf) < cls.SIZE:
            raise LayoutError(f"{cls.__name__}: expected at least {cls.SIZE:#x} bytes, got {len(buf):#x}")
        return cls.decode(bytes(buf[: cls.SIZE]))

    def encode(self) -> bytes:
        """The ``SIZE``-byte encoding; reserved bytes are zero."""
        out = bytearray(self.SIZE)
        name = type(self).__name__
        for fname, spec in self._SPECS:
            value = getattr(self, fname)
            if spec.kind == "int":
                if not isinstance(value, int) or value < 0 or value >> (8 * spec.size):
                    raise LayoutError(f"{name}.{fname}: {value!r} does not fit {spec.size} bytes")
                out[spec.offset : spec.offset + spec.size] = value.to_bytes(spec.size, "little")
            else:
                if not isinstance(value, (bytes, bytearray)) or len(value) != spec.size:
                    raise LayoutError(f"{name}.{fname}: expected {spec.size} bytes")
                out[spec.offset : spec.offset + spec.size] = value
        return bytes(out)

    @classmethod
    def offset_of(cls, fname: str) -> int:
        """Byte offset of field ``fname``."""
        return field_span(cls, fname)[0]


S = TypeVar("S", bound=Struct)


def layout(*, size: int, ignored: tuple[tuple[int, int], ...] = ()) -> Callable[[type[S]], type[S]]:
    """Declare a :class:`Struct` dataclass as a spec layout of ``size`` bytes (module docstring)."""

    def wrap(cls: type[S]) -> type[S]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__}: @layout goes above @dataclass")
        specs: list[tuple[str, _Spec]] = []
        covered = bytearray(size)
        for f in dataclasses.fields(cls):
            spec = f.metadata.get(_META)
            if spec is None:
                raise TypeError(f"{cls.__name__}.{f.name}: field without offset")
            if spec.offset < 0 or spec.offset + spec.size > size:
                raise TypeError(f"{cls.__name__}.{f.name}: outside the {size:#x}-byte layout")
            if any(covered[spec.offset : spec.offset + spec.size]):
                raise TypeError(f"{cls.__name__}.{f.name}: overlaps another field")
            covered[spec.offset : spec.offset + spec.size] = b"\x01" * spec.size
            specs.append((f.name, spec))
        for off, n in ignored:
            covered[off : off + n] = b"\x02" * n
        specs.sort(key=lambda item: item[1].offset)
        cls.SIZE = size
        cls._SPECS = tuple(specs)
        cls._RESERVED = tuple(_ranges(covered, 0))
        return cls

    return wrap


def field_span(cls: type[Struct], fname: str) -> tuple[int, int]:
    """(offset, size) of field ``fname`` of a layout class."""
    for n, spec in cls._SPECS:
        if n == fname:
            return spec.offset, spec.size
    raise LayoutError(f"{cls.__name__} has no field {fname!r}")


def _ranges(mask: bytearray, value: int) -> list[tuple[int, int]]:
    """Maximal runs of ``value`` in ``mask`` as (offset, length)."""
    out: list[tuple[int, int]] = []
    start = -1
    for i, b in enumerate(mask):
        if b == value and start < 0:
            start = i
        elif b != value and start >= 0:
            out.append((start, i - start))
            start = -1
    if start >= 0:
        out.append((start, len(mask) - start))
    return out
