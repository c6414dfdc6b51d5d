"""Properties every layout declared in :mod:`sevemu.abi` must have."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sevemu.abi
from sevemu.abi import snp
from sevemu.abi.struct import Struct, layout_fields
from sevemu.errors import LayoutError


def _layouts() -> list[type[Struct]]:
    found: dict[str, type[Struct]] = {}
    for mod in pkgutil.iter_modules(sevemu.abi.__path__):
        module = importlib.import_module(f"sevemu.abi.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Struct) and "_PLAN" in obj.__dict__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


LAYOUTS = _layouts()


def test_every_module_declares_layouts() -> None:
    modules = {cls.__module__.rsplit(".", 1)[1] for cls in LAYOUTS}
    assert {"sev", "certs", "vmsa", "ghcb", "vmcb", "snp", "rmp", "report"} <= modules
    assert len(LAYOUTS) > 90


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.__name__)
def test_default_instance_round_trips(cls: type[Struct]) -> None:
    obj = cls()
    raw = obj.encode()
    assert len(raw) == cls.SIZE
    assert cls.decode(raw) == obj
    assert cls.decode_prefix(raw + b"\xff") == obj
    with pytest.raises(LayoutError, match=cls.__name__):
        cls.decode(raw[:-1])


@pytest.mark.parametrize("cls", LAYOUTS, ids=lambda c: c.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_random_field_bytes_decode_to_themselves_or_are_refused(cls: type[Struct], data: st.DataObject) -> None:
    """Random bytes in the declared fields, zeros elsewhere: the buffer either decodes and re-encodes
    to itself, or is refused with a LayoutError (reserved bits of a nested layout, version gating)."""
    buf = bytearray(cls.SIZE)
    for f in layout_fields(cls):
        if f.kind == "bits":
            width = f.hi - f.lo + 1
            value = data.draw(st.integers(0, (1 << width) - 1))
            whole = int.from_bytes(buf, "little") | value << f.lo
            buf[:] = whole.to_bytes(cls.SIZE, "little")
        else:
            buf[f.offset : f.offset + f.size] = data.draw(st.binary(min_size=f.size, max_size=f.size))
    try:
        obj = cls.decode(bytes(buf))
    except LayoutError:
        return
    again = obj.encode()
    assert cls.decode(again) == obj
    if cls not in NESTS_IGNORED_BYTES:
        assert again == bytes(buf)


# Layouts whose fields nest a layout with ignored bytes (re-encoded as zeros).
NESTS_IGNORED_BYTES = {snp.SecretsPage}
