"""One time slice of the Unicorn engine in one call: ``uc_emu_start`` from a RIP, then the register
batch of the stop (``csrc/uc_accel.c``, built by ``setup.py`` as ``sevemu.hw.uc._uc_accel``).

:func:`runner` gives the C helper when it was built, else :class:`PyRunner`: the same two calls of
libunicorn through ctypes, the same results (``tests/hw/test_hw_uc_accel.py`` runs a guest with each
and compares every stop).  The C helper decides nothing; it only saves the two foreign calls' argument
conversions and GIL hand-offs -- about a tenth of a plain exit's round trip.

Both release the GIL while Unicorn runs (the watchdog thread must be able to stop it, the hooks'
Python callbacks take it back) and keep :attr:`started`, the monotonic time (``time.monotonic``) the
current run began, 0.0 between runs: the watchdog compares it with the engine's time slice.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any, Protocol

from sevemu.hw.uc import binding as uc

__all__ = ["ENABLED", "PyRunner", "Runner", "runner"]

ENABLED: bool
"""Whether :func:`runner` gives the C helper; false when it was not built (then ``setup.py build_ext``)."""
try:
    from sevemu.hw.uc import _uc_accel as _c  # type: ignore[attr-defined]
except ImportError:  # installed without a C compiler: ctypes
    _c = None
    ENABLED = False
else:
    ENABLED = hasattr(_c, "Runner")


class Runner(Protocol):
    """What the engine runs a time slice with."""

    @property
    def started(self) -> float:
        """The monotonic time the current run began; 0.0 when none runs."""
        ...

    def run(self, rip: int) -> int:
        """``uc_emu_start`` from ``rip`` until a stop, then the register batch into the engine's
        array: Unicorn's error, or -1 when the batch read failed."""
        ...


class PyRunner:
    """:class:`Runner` through ctypes (the path without the C helper)."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p, ids: Any, ptrs: Any) -> None:
        self._start = lib.uc_emu_start
        self._batch = lib.uc_reg_read_batch
        self._h = handle
        self._ids = ids
        self._ptrs = ptrs
        self._n = len(ids)
        self.started = 0.0

    def run(self, rip: int) -> int:
        self.started = time.monotonic()
        err: int = self._start(self._h, rip, 0, 0, 0)
        self.started = 0.0
        if self._batch(self._h, self._ids, self._ptrs, self._n):
            return -1
        return err


def runner(lib: ctypes.CDLL, handle: ctypes.c_void_p, ids: Sequence[int], vals: Any, ptrs: Any,
           *, use_c: bool | None = None) -> Runner:
    """A :class:`Runner` for the open Unicorn instance ``handle``: the batch reads registers ``ids``
    into the uint64 array ``vals`` (``ptrs``: the addresses of its elements, for ctypes).  ``use_c``
    picks the implementation (default: the C helper where it was built)."""
    if use_c is None:
        use_c = ENABLED
    if use_c and _c is not None:
        c_runner: Runner = _c.Runner(int(handle.value or 0), uc.fn_address(lib.uc_emu_start),
                                     uc.fn_address(lib.uc_reg_read_batch), list(ids), vals)
        return c_runner
    c_ids = ids if isinstance(ids, ctypes.Array) else (ctypes.c_int * len(ids))(*ids)
    return PyRunner(lib, handle, c_ids, ptrs)
