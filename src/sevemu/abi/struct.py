"""A small declarative framework for the specifications' byte layouts.

Layouts in the AMD specifications are tables of (offset, size, field).  Each one is declared here
exactly once, with one decorator over a :class:`Struct` subclass; the decorator makes it a frozen
slotted dataclass whose fields carry their offset and size::

    @layout(size=0x14)
    class InitCmd(Struct):
        options: int = u32(0x00)
        tmr_paddr: int = u64(0x08)
        tmr_len: int = u32(0x10)

Field kinds:

* ``u8`` / ``u16`` / ``u32`` / ``u64`` (offset): an unsigned little-endian integer;
* ``raw(offset, size)``: a byte string of exactly ``size`` bytes;
* ``nested(offset, Layout)``: another layout at ``offset``, decoded to an instance of it;
* ``array(offset, count, elem)``: ``count`` consecutive elements, where ``elem`` is one of the
  integer kinds (``u8`` ... ``u64``, the functions themselves) or a layout class; decoded to a tuple;
* ``bits(hi, lo)`` / ``bit(n)``: a bit range of a *bit layout*, a layout whose fields are all bit
  ranges of its little-endian value (e.g. a 64-bit policy).  A bit layout is used inside a byte
  layout with ``nested``; it also converts from and to a plain integer (:meth:`Struct.from_int`,
  :meth:`Struct.to_int`).  ``bits`` takes the range as the specifications write it, ``hi:lo``;
  ``bit(n)`` decodes to a ``bool``.

Version-dependent fields: ``@layout(..., version="version")`` names an integer field of the same
layout; a field declared with ``since=N`` exists only when that field is >= N.  Below N its bytes are
reserved (must be zero on decode, written as zeros on encode) unless the field says
``absent="ignored"``, and the decoded value is ``None``; encoding refuses a value for an absent
field and ``None`` for a present one.  A versioned field's annotation is ``T | None``.

Rules, enforced when the class is declared (``TypeError`` naming layout and field): every field has
an explicit offset (or bit range), fields do not overlap and fit the layout, bit ranges lie inside
the bit layout, arrays fit, ``ignored`` ranges do not cover a field, a layout holds either byte
fields or bit fields, versioned fields name an existing version field.

Every byte (bit, in a bit layout) that no field covers is reserved: ``decode`` refuses a buffer where
it is non-zero (the specifications' "must be zero"), ``encode`` writes zeros there.  A range the
specification marks as ignored rather than must-be-zero is declared with ``ignored=((offset, size),
...)`` (bytes) or ``ignored_bits=((hi, lo), ...)`` (bits); it is accepted with any value on decode and
written as zeros.

``decode`` takes exactly ``SIZE`` bytes, ``decode_prefix`` the start of a longer buffer; both raise
:class:`~sevemu.errors.LayoutError` naming the layout, the field and the offset for every bad input
(wrong length, non-zero reserved bytes or bits, a field of a version the buffer does not have).
``encode`` raises it for a value that does not fit its field, its bit range or its array.

Speed: each layout is compiled once into :mod:`struct` formats; decoding is one ``unpack``, one
comparison of the reserved bytes and the dataclass constructor, plus per-field work only for nested,
array and version-dependent fields; encoding is one ``pack``.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import struct as _struct
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final, Literal, Self, TypeVar, dataclass_transform

from sevemu.errors import LayoutError

__all__ = [
    "FieldInfo",
    "Struct",
    "array",
    "bit",
    "bit_span",
    "bits",
    "field_span",
    "layout",
    "layout_fields",
    "nested",
    "raw",
    "u8",
    "u16",
    "u32",
    "u64",
]

_META: Final = "sevemu_abi"

Absent = Literal["mbz", "ignored"]

# Field kinds.
INT: Final = "int"
BYTES: Final = "bytes"
NESTED: Final = "nested"
INTS: Final = "ints"
STRUCTS: Final = "structs"
BITS: Final = "bits"

_INT_CODES: Final = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclasses.dataclass(frozen=True, slots=True)
class FieldInfo:
    """A declared field, as the field functions record it and :func:`layout_fields` lists it."""

    kind: str
    """One of ``int``, ``bytes``, ``nested``, ``ints``, ``structs``, ``bits``."""
    offset: int = 0
    """Byte offset (bit fields: the byte holding bit ``lo``)."""
    size: int = 0
    """Bytes covered (bit fields: 0)."""
    layout: type[Struct] | None = None
    """The nested layout, or the element layout of an array of layouts."""
    count: int = 0
    """Array elements."""
    elem_size: int = 0
    """Bytes per array element."""
    hi: int = 0
    lo: int = 0
    is_bool: bool = False
    since: int | None = None
    absent: Absent = "mbz"
    name: str = ""
    """Filled in when the layout is declared."""


def _field(spec: FieldInfo, default: Any) -> Any:
    if spec.since is not None:
        default = None
    return dataclasses.field(default=default, metadata={_META: spec})


def _check_absent(absent: str) -> None:
    if absent not in ("mbz", "ignored"):
        raise TypeError(f"absent must be 'mbz' or 'ignored', not {absent!r}")


def u8(offset: int, default: int = 0, *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """An unsigned 8-bit field at ``offset``."""
    _check_absent(absent)
    return _field(FieldInfo(INT, offset, 1, since=since, absent=absent), default)


def u16(offset: int, default: int = 0, *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """An unsigned little-endian 16-bit field at ``offset``."""
    _check_absent(absent)
    return _field(FieldInfo(INT, offset, 2, since=since, absent=absent), default)


def u32(offset: int, default: int = 0, *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """An unsigned little-endian 32-bit field at ``offset``."""
    _check_absent(absent)
    return _field(FieldInfo(INT, offset, 4, since=since, absent=absent), default)


def u64(offset: int, default: int = 0, *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """An unsigned little-endian 64-bit field at ``offset``."""
    _check_absent(absent)
    return _field(FieldInfo(INT, offset, 8, since=since, absent=absent), default)


_INT_ELEMS: Final[dict[Callable[..., Any], int]] = {u8: 1, u16: 2, u32: 4, u64: 8}


def raw(offset: int, size: int, *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """A fixed-size byte string field at ``offset`` (default: all zeros)."""
    _check_absent(absent)
    if size <= 0:
        raise TypeError(f"raw field at {offset:#x}: size {size} is not positive")
    return _field(FieldInfo(BYTES, offset, size, since=since, absent=absent), bytes(size))


def _need_layout(what: object, where: str) -> type[Struct]:
    if not (isinstance(what, type) and issubclass(what, Struct) and "_PLAN" in what.__dict__):
        raise TypeError(f"{where}: {what!r} is not a declared @layout class")
    return what


def nested(offset: int, cls: type[Struct], *, since: int | None = None, absent: Absent = "mbz") -> Any:
    """Layout ``cls`` at ``offset``, decoded to a ``cls`` instance (default: ``cls()``)."""
    _check_absent(absent)
    cls = _need_layout(cls, f"nested field at {offset:#x}")
    return _field(FieldInfo(NESTED, offset, cls.SIZE, layout=cls, since=since, absent=absent), cls())


def array(
    offset: int,
    count: int,
    elem: Callable[..., Any] | type[Struct],
    *,
    since: int | None = None,
    absent: Absent = "mbz",
) -> Any:
    """``count`` elements at ``offset``: ``elem`` is ``u8``/``u16``/``u32``/``u64`` or a layout class.

    Decoded to a tuple of ints or of layout instances; encoding needs exactly ``count`` elements.
    """
    _check_absent(absent)
    if count <= 0:
        raise TypeError(f"array at {offset:#x}: count {count} is not positive")
    if isinstance(elem, type):
        cls = _need_layout(elem, f"array at {offset:#x}")
        spec = FieldInfo(STRUCTS, offset, count * cls.SIZE, layout=cls, count=count, elem_size=cls.SIZE,
                     since=since, absent=absent)
        return _field(spec, tuple(cls() for _ in range(count)))
    width = _INT_ELEMS.get(elem)
    if width is None:
        raise TypeError(f"array at {offset:#x}: element must be u8/u16/u32/u64 or a layout, not {elem!r}")
    spec = FieldInfo(INTS, offset, count * width, count=count, elem_size=width, since=since, absent=absent)
    return _field(spec, (0,) * count)


def bits(hi: int, lo: int, default: int = 0) -> Any:
    """Bits ``hi:lo`` (inclusive, as the specifications write them) of a bit layout."""
    if not 0 <= lo <= hi:
        raise TypeError(f"bit range {hi}:{lo} is not hi:lo with hi >= lo >= 0")
    return _field(FieldInfo(BITS, hi=hi, lo=lo), default)


def bit(n: int, default: bool = False) -> Any:
    """Bit ``n`` of a bit layout, decoded to a ``bool``."""
    if n < 0:
        raise TypeError(f"bit {n} is negative")
    return _field(FieldInfo(BITS, hi=n, lo=n, is_bool=True), default)


# --- the compiled form of a layout ---------------------------------------------------------------


class _Field:
    """A declared field with everything decode/encode needs (built once per layout)."""

    __slots__ = ("absent", "count", "elem", "elem_size", "hi", "index", "info", "is_bool", "kind", "layout",
                 "lo", "mask", "name", "offset", "since", "size")

    def __init__(self, name: str, spec: FieldInfo) -> None:
        if spec.kind == BITS:
            spec = dataclasses.replace(spec, offset=spec.lo // 8)
        self.info = dataclasses.replace(spec, name=name)
        self.name = name
        self.kind = spec.kind
        self.offset = spec.offset
        self.size = spec.size
        self.layout = spec.layout
        self.count = spec.count
        self.elem_size = spec.elem_size
        self.hi = spec.hi
        self.lo = spec.lo
        self.is_bool = spec.is_bool
        self.since = spec.since
        self.absent = spec.absent
        self.mask = (1 << (spec.hi - spec.lo + 1)) - 1
        self.index = -1  # position in the unpacked tuple
        self.elem: _struct.Struct | None = None
        if spec.kind == INTS or (spec.kind == STRUCTS and spec.layout is not None
                                 and spec.layout._PLAN.bit_layout and spec.elem_size in _INT_CODES):
            self.elem = _struct.Struct(f"<{spec.count}{_INT_CODES[spec.elem_size]}")

    def where(self, owner: str) -> str:
        if self.kind == BITS:
            return f"{owner}.{self.name} (bits {self.hi}:{self.lo})"
        return f"{owner}.{self.name} at {self.offset:#x}"


def _tuple_getter(indexes: Sequence[int]) -> Callable[[Any], tuple[Any, ...]]:
    """A C-speed getter returning a tuple even for zero or one index."""
    if not indexes:
        return lambda _v: ()
    if len(indexes) == 1:
        i = indexes[0]
        return lambda v: (v[i],)
    return operator.itemgetter(*indexes)


def _attr_getter(names: Sequence[str]) -> Callable[[Any], tuple[Any, ...]]:
    if not names:
        return lambda _o: ()
    if len(names) == 1:
        n = names[0]
        return lambda o: (getattr(o, n),)
    return operator.attrgetter(*names)


_MEMO_MAX: Final = 4096
"""Decoded instances a bit layout keeps (:meth:`_Plan.from_value`); the memo starts over when full."""


class _Plan:
    """How one layout decodes and encodes; see the module docstring for the rules."""

    __slots__ = (
        "args",
        "attrs",
        "bit_fields",
        "bit_layout",
        "by_name",
        "dunpack",
        "epack",
        "fields",
        "ignored_mask",
        "mbz_mask",
        "memo",
        "name",
        "nested_bits",
        "raw_checks",
        "reserved",
        "reserved_get",
        "reserved_zero",
        "size",
        "special",
        "special_pack",
        "version",
    )

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.fields: tuple[_Field, ...] = ()  # offset (bit) order
        self.by_name: dict[str, _Field] = {}
        self.bit_layout = False
        self.version: _Field | None = None
        self.dunpack: Callable[[Any], tuple[Any, ...]] = _struct.Struct("<").unpack
        self.epack: Callable[..., bytes] = _struct.Struct("<").pack
        self.reserved: tuple[tuple[int, int, int], ...] = ()  # (tuple index, offset, length)
        self.reserved_get: Callable[[Any], tuple[Any, ...]] = _tuple_getter(())
        self.reserved_zero: tuple[bytes, ...] = ()
        self.args: Callable[[Any], tuple[Any, ...]] = _tuple_getter(())  # unpacked -> ctor order
        self.attrs: Callable[[Any], tuple[Any, ...]] = _attr_getter(())  # object -> pack order
        self.raw_checks: tuple[tuple[int, int, str], ...] = ()  # (pack index, size, where)
        self.special: tuple[tuple[int, _Field], ...] = ()  # (ctor position, field) needing conversion
        self.special_pack: tuple[tuple[int, _Field], ...] = ()  # (pack position, field)
        self.mbz_mask = 0
        self.ignored_mask = 0
        self.bit_fields: tuple[tuple[str, int, int, bool], ...] = ()  # bit layouts: (name, lo, mask, bool)
        self.memo: dict[int, Any] = {}  # bit layouts: value -> the (frozen, so shareable) instance
        # When every special field is a nested bit layout present in every version: (ctor position,
        # its plan, its class) of each -- Struct.decode takes their memoised instances directly.
        self.nested_bits: tuple[tuple[int, _Plan, type[Struct]], ...] | None = None

    # ---- errors --------------------------------------------------------------------------------

    def reserved_error(self, vals: tuple[Any, ...]) -> LayoutError:
        for index, off, n in self.reserved:
            if any(vals[index]):
                return LayoutError(f"{self.name}: reserved bytes {off:#x}..{off + n - 1:#x} are not zero")
        return LayoutError(f"{self.name}: reserved bytes are not zero")  # pragma: no cover

    def bits_error(self, value: int) -> LayoutError:
        bad = value & self.mbz_mask
        ranges = ", ".join(f"{hi}:{lo}" if hi != lo else f"{lo}" for lo, hi in _bit_runs(bad))
        return LayoutError(f"{self.name}: reserved bits {ranges} are not zero (value {value:#x})")

    def field_error(self, obj: Struct) -> LayoutError:
        """The first field of ``obj`` whose value does not encode (after struct.pack refused)."""
        for f in self.fields:
            try:
                self.encode_field(f, getattr(obj, f.name), obj)
            except LayoutError as exc:
                return exc
        return LayoutError(f"{self.name}: a value does not encode")  # pragma: no cover

    # ---- decode --------------------------------------------------------------------------------

    def decode_bits(self, cls: type[Struct], buf: bytes | bytearray | memoryview) -> Any:
        return self.from_value(cls, int.from_bytes(buf, "little"))

    def from_value(self, cls: type[Struct], value: int) -> Any:
        """A bit layout's instance from its integer value."""
        memo = self.memo
        hit = memo.get(value)
        if hit is not None and type(hit) is cls:  # (instances are frozen: one per value is enough)
            return hit
        if value & self.mbz_mask:
            raise self.bits_error(value)
        args = [bool(value >> lo & mask) if is_bool else value >> lo & mask
                for _, lo, mask, is_bool in self.bit_fields]
        obj = cls(*self.args(args))
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[value] = obj
        return obj

    def to_value(self, obj: Struct) -> int:
        """A bit layout instance's integer value (LayoutError for a field that does not fit)."""
        value = 0
        for name, lo, mask, _ in self.bit_fields:
            v = getattr(obj, name)
            if not isinstance(v, int) or not 0 <= v <= mask:
                return self._to_value_checked(obj)
            value |= v << lo
        return value

    def _to_value_checked(self, obj: Struct) -> int:
        value = 0
        for f in self.fields:
            value |= self.encode_field(f, getattr(obj, f.name), obj) << f.lo
        return value

    def decode_special(self, vals: tuple[Any, ...]) -> list[Any]:
        """Constructor arguments when some fields are nested, arrays or version-dependent."""
        args = list(self.args(vals))
        version = vals[self.version.index] if self.version is not None else 0
        for pos, f in self.special:
            v = args[pos]
            if f.since is not None and version < f.since:
                if f.absent == "mbz" and (v if f.kind == INT else any(v)):
                    raise LayoutError(f"{f.where(self.name)}: field exists from version {f.since}; "
                                      f"version {version} requires zero bytes")
                args[pos] = None
            elif f.kind == NESTED:
                assert f.layout is not None
                nested = f.layout._PLAN
                if nested.bit_layout:  # a flags word: its memoised instance when there is one
                    hit = nested.memo.get(int.from_bytes(v, "little"))
                    if hit is not None and type(hit) is f.layout:
                        args[pos] = hit
                        continue
                try:
                    args[pos] = f.layout.decode(v)
                except LayoutError as exc:  # (the field's name built only for the error)
                    raise LayoutError(f"{f.where(self.name)}: {exc}") from None
            elif f.kind == INTS:
                assert f.elem is not None
                args[pos] = f.elem.unpack(v)
            elif f.kind == STRUCTS and f.elem is not None:  # an array of bit layouts: unpack as ints
                assert f.layout is not None
                plan, where = f.layout._PLAN, f.where(self.name)
                items = []
                for k, value in enumerate(f.elem.unpack(v)):
                    try:
                        items.append(plan.from_value(f.layout, value))
                    except LayoutError as exc:
                        raise LayoutError(f"{where} [{k}]: {exc}") from None
                args[pos] = tuple(items)
            elif f.kind == STRUCTS:
                assert f.layout is not None
                n = f.elem_size
                decode = f.layout.decode
                try:
                    args[pos] = tuple(decode(v[k * n : (k + 1) * n]) for k in range(f.count))
                except LayoutError:  # the first element that does not decode, named
                    for k in range(f.count):
                        _decode_inner(f.layout, v[k * n : (k + 1) * n], f"{f.where(self.name)} [{k}]")
                    raise  # pragma: no cover - an element failed above
        return args

    # ---- encode --------------------------------------------------------------------------------

    def encode_field(self, f: _Field, v: Any, obj: Struct) -> Any:
        """The packable value of field ``f`` (raises LayoutError naming the field)."""
        where = f.where(self.name)
        if f.since is not None:
            version = getattr(obj, self.version.name) if self.version is not None else 0
            present = isinstance(version, int) and version >= f.since
            if not present:
                if v is not None:
                    raise LayoutError(f"{where}: field exists from version {f.since}; "
                                      f"version {version!r} needs None, got {v!r}")
                return 0 if f.kind == INT else bytes(f.size)
            if v is None:
                raise LayoutError(f"{where}: version {version} has this field; it is None")
        if f.kind == INT:
            if not isinstance(v, int) or v < 0 or v >> (8 * f.size):
                raise LayoutError(f"{where}: {v!r} does not fit {f.size} bytes")
            return v
        if f.kind == BYTES:
            if not isinstance(v, (bytes, bytearray)) or len(v) != f.size:
                raise LayoutError(f"{where}: expected {f.size} bytes, got {_describe(v)}")
            return bytes(v)
        if f.kind == NESTED:
            assert f.layout is not None
            if not isinstance(v, f.layout):
                raise LayoutError(f"{where}: expected a {f.layout.__name__}, got {type(v).__name__}")
            return _encode_inner(v, where)
        if f.kind == INTS:
            assert f.elem is not None
            if not isinstance(v, (tuple, list)) or len(v) != f.count:
                raise LayoutError(f"{where}: expected {f.count} elements, got {_describe(v)}")
            for k, e in enumerate(v):
                if not isinstance(e, int) or e < 0 or e >> (8 * f.elem_size):
                    raise LayoutError(f"{where} [{k}]: {e!r} does not fit {f.elem_size} bytes")
            return f.elem.pack(*v)
        if f.kind == STRUCTS:
            assert f.layout is not None
            if not isinstance(v, (tuple, list)) or len(v) != f.count:
                raise LayoutError(f"{where}: expected {f.count} elements, got {_describe(v)}")
            if f.elem is not None and all(type(e) is f.layout for e in v):  # bit layouts: pack ints
                plan = f.layout._PLAN
                try:
                    return f.elem.pack(*[plan.to_value(e) for e in v])
                except LayoutError:
                    pass  # name the element below
            parts = []
            for k, e in enumerate(v):
                if not isinstance(e, f.layout):
                    raise LayoutError(f"{where} [{k}]: expected a {f.layout.__name__}, got {type(e).__name__}")
                parts.append(_encode_inner(e, f"{where} [{k}]"))
            return b"".join(parts)
        # BITS
        if not isinstance(v, int) or v < 0 or v > f.mask:
            raise LayoutError(f"{where}: {v!r} does not fit {f.hi - f.lo + 1} bit(s)")
        return int(v)

    def encode_bits(self, obj: Struct) -> bytes:
        return self.to_value(obj).to_bytes(self.size, "little")

    def encode_special(self, obj: Struct, vals: Sequence[Any]) -> list[Any]:
        """Packable values when some fields are nested, arrays or version-dependent."""
        out = list(vals)
        for pos, f in self.special_pack:
            out[pos] = self.encode_field(f, out[pos], obj)
        return out


def _describe(v: object) -> str:
    try:
        return f"{type(v).__name__} of length {len(v)}"  # type: ignore[arg-type]
    except TypeError:
        return type(v).__name__


def _decode_inner(cls: type[Struct], chunk: bytes, where: str) -> Struct:
    try:
        return cls.decode(chunk)
    except LayoutError as exc:
        raise LayoutError(f"{where}: {exc}") from None


def _encode_inner(obj: Struct, where: str) -> bytes:
    try:
        return obj.encode()
    except LayoutError as exc:
        raise LayoutError(f"{where}: {exc}") from None


def _bit_runs(mask: int) -> list[tuple[int, int]]:
    """Maximal runs of set bits of ``mask`` as (lo, hi)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while mask:
        if mask & 1:
            start = pos
            while mask & 1:
                mask >>= 1
                pos += 1
            out.append((start, pos - 1))
        else:
            mask >>= 1
            pos += 1
    return out


# --- the base class and the decorator ------------------------------------------------------------


class Struct:
    """Base of every layout class; :func:`layout` compiles the declaration into ``_PLAN``."""

    __slots__ = ()
    SIZE: ClassVar[int]
    _PLAN: ClassVar[_Plan]

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> Self:
        """Decode exactly ``SIZE`` bytes; reserved bytes (bits) must be zero."""
        p = cls._PLAN
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise LayoutError(f"{p.name}: expected a bytes-like buffer, got {type(buf).__name__}")
        if len(buf) != p.size:
            raise LayoutError(f"{p.name}: expected {p.size:#x} bytes, got {len(buf):#x}")
        if p.bit_layout:
            result: Self = p.decode_bits(cls, buf)
            return result
        vals = p.dunpack(buf)
        if p.reserved_get(vals) != p.reserved_zero:
            raise p.reserved_error(vals)
        if p.special:
            nested = p.nested_bits
            if nested is not None:  # (flags words: their memoised instances, when every one has one)
                args = list(p.args(vals))
                for pos, plan, layout in nested:
                    hit = plan.memo.get(int.from_bytes(args[pos], "little"))
                    if hit is None or type(hit) is not layout:
                        return cls(*p.decode_special(vals))
                    args[pos] = hit
                return cls(*args)
            return cls(*p.decode_special(vals))
        return cls(*p.args(vals))

    @classmethod
    def decode_prefix(cls, buf: bytes | bytearray | memoryview) -> Self:
        """Decode the first ``SIZE`` bytes of a longer buffer."""
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise LayoutError(f"{cls.__name__}: expected a bytes-like buffer, got {type(buf).__name__}")
        if len(buf) < cls.SIZE:
            raise LayoutError(f"{cls.__name__}: expected at least {cls.SIZE:#x} bytes, got {len(buf):#x}")
        return cls.decode(buf[: cls.SIZE])

    @classmethod
    def from_int(cls, value: int) -> Self:
        """Decode the little-endian integer ``value`` (bit layouts: the policy word, the flags...)."""
        if not isinstance(value, int) or value < 0 or value >> (8 * cls.SIZE):
            raise LayoutError(f"{cls.__name__}: {value!r} does not fit {cls.SIZE} bytes")
        p = cls._PLAN
        if p.bit_layout:
            result: Self = p.from_value(cls, value)
            return result
        return cls.decode(value.to_bytes(cls.SIZE, "little"))

    def to_int(self) -> int:
        """The encoding read as one little-endian integer."""
        p = self._PLAN
        if p.bit_layout:
            return p.to_value(self)
        return int.from_bytes(self.encode(), "little")

    def encode(self) -> bytes:
        """The ``SIZE``-byte encoding; reserved bytes (bits) are zero."""
        p = self._PLAN
        if p.bit_layout:
            return p.encode_bits(self)
        vals: Sequence[Any] = p.attrs(self)
        for index, size, where in p.raw_checks:
            v = vals[index]
            if not isinstance(v, (bytes, bytearray)) or len(v) != size:
                raise LayoutError(f"{where}: expected {size} bytes, got {_describe(v)}")
        if p.special_pack:
            vals = p.encode_special(self, vals)
        try:
            return p.epack(*vals)
        except _struct.error:
            raise p.field_error(self) from None

    @classmethod
    def offset_of(cls, fname: str) -> int:
        """Byte offset of field ``fname``."""
        return field_span(cls, fname)[0]


S = TypeVar("S", bound=Struct)


@dataclass_transform(frozen_default=True)
def layout(
    *,
    size: int,
    ignored: Sequence[tuple[int, int]] = (),
    ignored_bits: Sequence[tuple[int, int]] = (),
    version: str | None = None,
) -> Callable[[type[S]], type[S]]:
    """Declare a :class:`Struct` subclass as a spec layout of ``size`` bytes (module docstring).

    ``ignored``: byte ranges (offset, size) not covered by a field that decode accepts with any value;
    ``ignored_bits``: the same for bit layouts, as (hi, lo); ``version``: the integer field that
    gates fields declared with ``since=``.
    """

    def wrap(cls: type[S]) -> type[S]:
        name = cls.__name__
        if not (isinstance(cls, type) and issubclass(cls, Struct)):
            raise TypeError(f"{name}: a @layout class must subclass Struct")
        if "__dataclass_fields__" in cls.__dict__:
            raise TypeError(f"{name}: declare layouts with @layout alone (it makes the frozen slotted "
                            "dataclass); do not add @dataclass")
        if size <= 0:
            raise TypeError(f"{name}: size {size} is not positive")
        for fname, annotation in inspect.get_annotations(cls).items():
            if "ClassVar" in str(annotation):
                continue
            value = cls.__dict__.get(fname)
            if not (isinstance(value, dataclasses.Field) and _META in value.metadata):
                raise TypeError(f"{name}.{fname}: field without offset (declare it with u8/u16/u32/u64, "
                                "raw, nested, array or bits)")
        made = dataclasses.dataclass(frozen=True, slots=True)(cls)
        dc: Any = made
        specs = [(f.name, f.metadata[_META]) for f in dataclasses.fields(dc)]
        made.SIZE = size
        made._PLAN = _compile(name, size, specs, tuple(ignored), tuple(ignored_bits), version)
        return made

    return wrap


def _compile(
    name: str,
    size: int,
    specs: list[tuple[str, FieldInfo]],
    ignored: tuple[tuple[int, int], ...],
    ignored_bits: tuple[tuple[int, int], ...],
    version: str | None,
) -> _Plan:
    plan = _Plan(name, size)
    fields = [_Field(fname, spec) for fname, spec in specs]
    ctor_order = [f.name for f in fields]
    plan.by_name = {f.name: f for f in fields}
    kinds = {f.kind for f in fields}
    if BITS in kinds:
        if kinds != {BITS}:
            raise TypeError(f"{name}: a layout holds byte fields or bit fields, not both; "
                            "declare the bit fields in their own layout and nest it")
        if ignored:
            raise TypeError(f"{name}: a bit layout takes ignored_bits=, not ignored=")
        if version is not None:
            raise TypeError(f"{name}: version-dependent fields need a byte layout")
        _compile_bits(plan, fields, ctor_order, ignored_bits)
        return plan
    if ignored_bits:
        raise TypeError(f"{name}: ignored_bits= is for bit layouts; use ignored= (offset, size)")
    _compile_bytes(plan, fields, ctor_order, ignored, version)
    return plan


def _compile_bits(plan: _Plan, fields: list[_Field], ctor_order: list[str],
                  ignored_bits: tuple[tuple[int, int], ...]) -> None:
    name, width = plan.name, 8 * plan.size
    covered = 0
    for f in fields:
        if f.since is not None:
            raise TypeError(f"{name}.{f.name}: version-dependent fields need a byte layout")
        if f.hi >= width:
            raise TypeError(f"{name}.{f.name}: bits {f.hi}:{f.lo} outside the {width}-bit layout")
        span = f.mask << f.lo
        if covered & span:
            raise TypeError(f"{name}.{f.name}: bits {f.hi}:{f.lo} overlaps another field")
        covered |= span
    ignored_mask = 0
    for hi, lo in ignored_bits:
        if not 0 <= lo <= hi < width:
            raise TypeError(f"{name}: ignored bits {hi}:{lo} not inside the {width}-bit layout")
        span = ((1 << (hi - lo + 1)) - 1) << lo
        if covered & span:
            raise TypeError(f"{name}: ignored bits {hi}:{lo} overlap a field")
        ignored_mask |= span
    fields.sort(key=lambda f: f.lo)
    plan.fields = tuple(fields)
    plan.bit_layout = True
    plan.bit_fields = tuple((f.name, f.lo, f.mask, f.is_bool) for f in fields)
    plan.ignored_mask = ignored_mask
    plan.mbz_mask = ((1 << width) - 1) & ~covered & ~ignored_mask
    position = {f.name: i for i, f in enumerate(fields)}
    plan.args = _tuple_getter([position[n] for n in ctor_order])


def _compile_bytes(plan: _Plan, fields: list[_Field], ctor_order: list[str],
                   ignored: tuple[tuple[int, int], ...], version: str | None) -> None:
    name, size = plan.name, plan.size
    covered = bytearray(size)  # 0 reserved, 1 field, 2 ignored
    for f in fields:
        if f.offset < 0 or f.offset + f.size > size:
            raise TypeError(f"{name}.{f.name}: {f.size:#x} bytes at {f.offset:#x} outside the "
                            f"{size:#x}-byte layout")
        if any(covered[f.offset : f.offset + f.size]):
            raise TypeError(f"{name}.{f.name}: bytes {f.offset:#x}..{f.offset + f.size - 1:#x} "
                            "overlaps another field")
        covered[f.offset : f.offset + f.size] = b"\x01" * f.size
    for off, n in ignored:
        if n <= 0 or off < 0 or off + n > size:
            raise TypeError(f"{name}: ignored range ({off:#x}, {n:#x}) not inside the layout")
        if 1 in covered[off : off + n]:
            raise TypeError(f"{name}: ignored range ({off:#x}, {n:#x}) covers a field")
        covered[off : off + n] = b"\x02" * n
    if version is not None:
        vf = plan.by_name.get(version)
        if vf is None or vf.kind != INT or vf.since is not None:
            raise TypeError(f"{name}: version field {version!r} is not an unversioned integer field")
        plan.version = vf
    for f in fields:
        if f.since is not None and plan.version is None:
            raise TypeError(f"{name}.{f.name}: since={f.since} needs @layout(version='<field>')")

    fields.sort(key=lambda f: f.offset)
    dfmt, efmt = ["<"], ["<"]
    reserved: list[tuple[int, int, int]] = []
    raw_checks: list[tuple[int, int, str]] = []
    pack_names: list[str] = []
    index = 0
    by_offset = {f.offset: f for f in fields}
    pos = 0
    while pos < size:
        at = by_offset.get(pos)
        if at is not None:
            code = _INT_CODES[at.size] if at.kind == INT else f"{at.size}s"
            dfmt.append(code)
            efmt.append(code)
            at.index = index
            if at.kind == BYTES and at.since is None:
                raw_checks.append((len(pack_names), at.size, at.where(name)))
            pack_names.append(at.name)
            index += 1
            pos += at.size
            continue
        kind = covered[pos]
        end = pos
        while end < size and covered[end] == kind and end not in by_offset:
            end += 1
        n = end - pos
        if kind == 0:
            dfmt.append(f"{n}s")
            reserved.append((index, pos, n))
            index += 1
        else:
            dfmt.append(f"{n}x")
        efmt.append(f"{n}x")
        pos = end

    plan.fields = tuple(fields)
    plan.dunpack = _struct.Struct("".join(dfmt)).unpack
    plan.epack = _struct.Struct("".join(efmt)).pack
    plan.reserved = tuple(reserved)
    plan.reserved_get = _tuple_getter([r[0] for r in reserved])
    plan.reserved_zero = tuple(bytes(r[2]) for r in reserved)
    plan.args = _tuple_getter([plan.by_name[n].index for n in ctor_order])
    plan.attrs = _attr_getter(pack_names)
    plan.raw_checks = tuple(raw_checks)
    plan.special = tuple((ctor_order.index(f.name), f) for f in fields if _is_special(f))
    plan.special_pack = tuple((pack_names.index(f.name), f) for f in fields if _is_special(f))
    if plan.special and plan.version is None and all(
            f.kind == NESTED and f.since is None and f.layout is not None and f.layout._PLAN.bit_layout
            for _, f in plan.special):
        plan.nested_bits = tuple((pos, f.layout._PLAN, f.layout) for pos, f in plan.special
                                 if f.layout is not None)


def _is_special(f: _Field) -> bool:
    """Whether a byte-layout field needs conversion beyond what struct.unpack gives."""
    return f.kind not in (INT, BYTES) or f.since is not None


def _plan_of(cls: type[Struct]) -> _Plan:
    plan = cls.__dict__.get("_PLAN")
    if not isinstance(plan, _Plan):
        raise LayoutError(f"{getattr(cls, '__name__', cls)!r} is not a declared layout")
    return plan


def _field_of(cls: type[Struct], fname: str) -> _Field:
    f = _plan_of(cls).by_name.get(fname)
    if f is None:
        raise LayoutError(f"{cls.__name__} has no field {fname!r}")
    return f


def field_span(cls: type[Struct], fname: str) -> tuple[int, int]:
    """(offset, size) in bytes of field ``fname`` of a layout class (not for bit fields)."""
    f = _field_of(cls, fname)
    if f.kind == BITS:
        raise LayoutError(f"{cls.__name__}.{fname} is a bit field (bits {f.hi}:{f.lo}); use bit_span")
    return f.offset, f.size


def bit_span(cls: type[Struct], fname: str) -> tuple[int, int]:
    """(hi, lo) of bit field ``fname`` of a bit layout."""
    f = _field_of(cls, fname)
    if f.kind != BITS:
        raise LayoutError(f"{cls.__name__}.{fname} is not a bit field")
    return f.hi, f.lo


def layout_fields(cls: type[Struct]) -> tuple[FieldInfo, ...]:
    """The declared fields of a layout class in offset (bit) order, for tools and tests."""
    return tuple(f.info for f in _plan_of(cls).fields)
