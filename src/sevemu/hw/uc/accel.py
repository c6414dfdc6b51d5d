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

import array
import ctypes
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from sevemu._util.units import PAGE
from sevemu.hw.uc import binding as uc

__all__ = ["ENABLED", "PV_ENABLED", "PvHook", "PyRunner", "Runner", "StopWord", "block_stop_hook", "pvalidate_hook", "runner"]

_M64 = (1 << 64) - 1
_CR0_PG = 1 << 31
_EFER_LME = 1 << 8
_EFER_LMA = 1 << 10

ENABLED: bool
"""Whether :func:`runner` gives the C helper; false when it was not built (then ``setup.py build_ext``)."""
_METHODS = ("run", "enter", "leave", "ctl", "set_ctl", "forget", "bind_io", "run_known")
try:
    from sevemu.hw.uc import _uc_accel as _c
except ImportError:  # installed without a C compiler: ctypes
    _c = None  # type: ignore[assignment]
    ENABLED = False
else:  # (a build older than csrc/uc_accel.c lacks some: the ctypes path then; rebuild with setup.py build_ext)
    ENABLED = all(hasattr(_c.Runner, name) for name in _METHODS)
PV_ENABLED: Final[bool] = _c is not None and hasattr(_c, "PvHook")
"""Whether :func:`pvalidate_hook` gives the C hook (``csrc/uc_accel.c`` ``PvHook``)."""


class StopWord(ctypes.Structure):
    """The request word of :func:`block_stop_hook`'s callback (``StopWord`` in ``csrc/uc_accel.c``):
    a stop requested by setting ``request`` happens at the start of the next translated block."""

    _fields_ = [("request", ctypes.c_int), ("reserved", ctypes.c_int), ("stop", ctypes.c_void_p)]


_BLOCK_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)


def block_stop_hook(lib: Any) -> tuple[int, Any]:
    """(address of a UC_HOOK_BLOCK callback that stops when its :class:`StopWord` (the hook's user
    data) has ``request`` set, an object to keep alive while the hook exists).

    Unicorn 2.1.4 honours a pending ``uc_emu_stop`` after any guest load or store and resumes at the
    start of that instruction although its store is done, so a read-modify-write on memory runs
    twice (``tests/hw/test_hw_unicorn_stop.py``); a stop at a block start executes nothing twice.
    The C callback (``csrc/uc_accel.c``) or, without the extension, a ctypes one (correct, slower:
    Python at every block)."""
    if _c is not None and hasattr(_c, "block_stop_address"):
        return _c.block_stop_address(), None
    stop = lib.uc_emu_stop

    def cb(h: Any, address: int, size: int, user: Any) -> None:
        word = ctypes.cast(user, ctypes.POINTER(StopWord)).contents
        if word.request:
            word.request = 0
            stop(h)

    keep = _BLOCK_CB(cb)
    return uc.fn_address(keep), keep


class Runner(Protocol):
    """What the engine runs a time slice with, and exchanges the GPRs with the save state through."""

    @property
    def started(self) -> float:
        """The monotonic time the current run began; 0.0 when none runs."""
        ...

    def run(self, rip: int) -> int:
        """``uc_emu_start`` from ``rip`` until a stop, then the register batch into the engine's
        array: Unicorn's error, or -1 when the batch read failed."""
        ...

    def enter(self, state: Any) -> int:
        """VMRUN: write the GPRs of ``state.regs`` that differ from Unicorn's last known values (every
        one after :meth:`forget`) into Unicorn; how many were written -- or -1 when ``state``'s
        RFLAGS, CR0, CR3, CR4, EFER are not :meth:`ctl` (the engine loads those, then calls
        :meth:`set_ctl`)."""
        ...

    def leave(self, state: Any, efer: int) -> None:
        """#VMEXIT: ``state.regs`` (the GPRs) and ``state.rip``, ``rflags``, ``cr0``, ``cr3``, ``cr4``
        from the last register batch; ``state.efer`` = ``efer`` (the engine's copy, LMA clear) with
        LMA when LME and CR0.PG.  These become :meth:`ctl`."""
        ...

    def ctl(self) -> tuple[int, ...]:
        """(RFLAGS, CR0, CR3, CR4, EFER) as last exchanged; () after :meth:`forget`."""
        ...

    def set_ctl(self, values: tuple[int, ...]) -> None:
        """The engine loaded these control registers into Unicorn."""
        ...

    def forget(self) -> None:
        """The next :meth:`enter` writes every GPR and answers -1."""
        ...

    def bind_io(self, offsets: dict[int, set[int]], exits: dict[int, Any], xgva: dict[int, int],
                pool_address: int, pool_size: int) -> None:
        """The engine's port-I/O tables (:class:`~sevemu.hw.uc.ports.IoHooks` ``offsets``, ``exits``,
        ``xgva``: mutated, never rebound) and its page pool's memory, for :meth:`run_known`."""
        ...

    def run_known(self, engine: Any, rip: int) -> Any:
        """:meth:`run`, then the engine's known-port-I/O test at the stop: when Unicorn stopped
        without an error, the hooks saw nothing (``engine._event`` and ``_internal`` None, no TB
        flush pending), RIP is a hooked offset of its page, an exit is remembered for that RIP with
        the same long mode and DX (or an immediate port) and the slot the page executes from holds
        the same 16 instruction bytes: that exit.  Otherwise :meth:`run`'s int, nothing changed."""
        ...


class PvHook(Protocol):
    """PVALIDATE retired in C in Unicorn's invalid-instruction hook (``csrc/uc_accel.c``, ``PvHook``):
    the hook runs the armed case itself -- exactly what :func:`sevemu.hw.uc.exits.pvalidate_in_place`
    would do for it -- and hands every other call, with nothing changed, to the engine's Python hook."""

    @property
    def armed(self) -> bool:
        """Whether a case is armed."""
        ...

    def address(self) -> int:
        """The C callback's address (its user data: this object, which the engine keeps alive)."""
        ...

    def bind(self, xgva: dict[int, int], pool_address: int, pool_size: int) -> None:
        """The engine's executed-page slots (:class:`~sevemu.hw.uc.ports.IoHooks` ``xgva``: mutated,
        never rebound) and its page pool's memory: where the instruction's bytes are compared."""
        ...

    def arm(self, code: bytes, paging: bool, length: int, engine: Any, cpu: Any, rmp: Any, epochs: dict[int, Any],
            asid: int, sev: bool, ncr3: int, walker: Any, cache: Any, pages: dict[int, bytearray], first: int,
            pool: Any, stats: Any) -> None:
        """Retire in C a validate of a 4 KiB page by the PVALIDATE whose 15 bytes (from its first) are
        ``code`` in this paging mode (``length``: its length), for this vCPU (``asid``, ``sev``,
        ``ncr3`` at VMPL0, RMP epochs ``epochs``) with the engine's caching walker, the RMP's DRAM
        pages and its entry area at SPA ``first`` read through ``cache``."""
        ...

    def disarm(self) -> None:
        """Every call goes to the Python hook from now on."""
        ...


def pvalidate_hook(lib: ctypes.CDLL, handle: ctypes.c_void_p, fallback: Callable[[Any, Any], bool]) -> PvHook | None:
    """The C invalid-instruction hook for the open Unicorn ``handle`` whose every declined call goes
    to ``fallback`` (the engine's Python hook, called with (None, None)); None without the extension."""
    if not PV_ENABLED:
        return None
    ids = [uc.REG[n] for n in ("rax", "rcx", "rdx")] + [uc.REG_RIP, uc.REG_RFLAGS, uc.REG_CR0, uc.REG_CR3]
    hook: PvHook = _c.PvHook(int(handle.value or 0), uc.fn_address(lib.uc_reg_read_batch),
                             uc.fn_address(lib.uc_reg_write_batch), ids, fallback)
    return hook


class PyRunner:
    """:class:`Runner` through ctypes (the path without the C helper)."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p, ids: Any, vals: array.array[int], ptrs: Any,
                 names: tuple[str, ...]) -> None:
        self._lib = lib
        self._start = lib.uc_emu_start
        self._batch = lib.uc_reg_read_batch
        self._h = handle
        self._ids = ids
        self._vals = vals
        self._ptrs = ptrs
        self._n = len(ids)
        self._names = names
        self._ngpr = len(names)
        self._shadow: list[int] = []  # the GPRs as last exchanged with Unicorn
        self._ctl: tuple[int, ...] = ()  # RFLAGS, CR0, CR3, CR4, EFER likewise
        self._scratch = ctypes.c_uint64()
        self._scratch_ref = ctypes.byref(self._scratch)
        self._io: tuple[dict[int, set[int]], dict[int, Any], dict[int, int]] | None = None
        self._pool: Any = None
        self.started = 0.0

    def run(self, rip: int) -> int:
        self.started = time.monotonic()
        err: int = self._start(self._h, rip, 0, 0, 0)
        self.started = 0.0
        if self._batch(self._h, self._ids, self._ptrs, self._n):
            return -1
        return err

    def enter(self, state: Any) -> int:
        regs = state.regs
        if not isinstance(regs, dict):
            raise TypeError("state.regs must be a dict")
        now = [regs[n] for n in self._names]
        for name, value in zip(self._names, now):
            if not isinstance(value, int):
                raise TypeError(f"register {name} must be an int")
        now = [v & _M64 for v in now]
        shadow = self._shadow
        writes = 0
        for i, value in enumerate(now):
            if not shadow or value != shadow[i]:
                self._scratch.value = value
                if self._lib.uc_reg_write(self._h, self._ids[i], self._scratch_ref):
                    self._shadow = []
                    raise RuntimeError(f"Unicorn register write failed (register {self._names[i]})")
                writes += 1
        self._shadow = now
        ctl = self._ctl
        if not ctl or (state.rflags, state.cr0, state.cr3, state.cr4, state.efer) != ctl:
            return -1
        return writes

    def leave(self, state: Any, efer: int) -> None:
        vals = self._vals.tolist()
        n = self._ngpr
        gprs = vals[:n]
        state.regs.update(zip(self._names, gprs))
        self._shadow = gprs
        state.rip, rflags, cr0, cr3, cr4 = vals[n : n + 5]
        state.rflags, state.cr0, state.cr3, state.cr4 = rflags, cr0, cr3, cr4
        if efer & _EFER_LME and cr0 & _CR0_PG:
            efer |= _EFER_LMA
        state.efer = efer
        self._ctl = (rflags, cr0, cr3, cr4, efer)

    def ctl(self) -> tuple[int, ...]:
        return self._ctl

    def set_ctl(self, values: tuple[int, ...]) -> None:
        ok = len(values) == 5 and all(type(v) is int and 0 <= v <= _M64 for v in values)
        self._ctl = values if ok else ()

    def forget(self) -> None:
        self._shadow = []
        self._ctl = ()

    def bind_io(self, offsets: dict[int, set[int]], exits: dict[int, Any], xgva: dict[int, int],
                pool_address: int, pool_size: int) -> None:
        self._io = (offsets, exits, xgva)
        self._pool = (ctypes.c_char * pool_size).from_address(pool_address)

    def run_known(self, engine: Any, rip: int) -> Any:
        err = self.run(rip)
        if err or self._io is None or engine._event is not None or engine._internal is not None \
                or engine._tb_flush_pending:
            return err
        offsets, exits, xgva = self._io
        vals = self._vals
        rip = vals[self._ngpr]
        page, off = rip & ~0xFFF, rip & 0xFFF
        offs = offsets.get(page)
        if offs is None or off not in offs:
            return err
        hit = exits.get(rip)
        if hit is None or hit[1] != bool(vals[self._ngpr + 2] & _CR0_PG) or hit[2] not in (-1, vals[3] & 0xFFFF):
            return err
        slot = xgva.get(page)
        if slot is None or off > PAGE - 16 or slot >= len(self._pool) // PAGE:
            return err
        if self._pool[slot * PAGE + off : slot * PAGE + off + 16] != hit[0]:
            return err
        return hit[3]


def runner(lib: ctypes.CDLL, handle: ctypes.c_void_p, ids: Any, vals: array.array[int], ptrs: Any,
           names: tuple[str, ...], *, use_c: bool | None = None) -> Runner:
    """A :class:`Runner` for the open Unicorn instance ``handle``: the batch reads registers ``ids``
    (a ctypes int array: the GPRs ``names``, then RIP, RFLAGS, CR0, CR3, CR4) into the uint64 array
    ``vals`` (``ptrs``: the addresses of its elements, for ctypes).  ``use_c`` picks the
    implementation (default: the C helper where it was built)."""
    if use_c is None:
        use_c = ENABLED
    if use_c and _c is not None:
        return _c.Runner(int(handle.value or 0), uc.fn_address(lib.uc_emu_start),
                         uc.fn_address(lib.uc_reg_read_batch), uc.fn_address(lib.uc_reg_write), list(ids), vals, names)
    return PyRunner(lib, handle, ids, vals, ptrs, names)
