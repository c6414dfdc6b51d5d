"""Firmware on a bare Unicorn: the baseline of ``sevemu bench ovmf``.

The same flash image and the same device models as the vCPU run, on Unicorn with nothing of the SoC:
flat host memory (RAM from 0, the flash ending at 4 GiB, its top 128 KiB aliased at 0xE0000 as on a
PC), Unicorn's own page walk, port I/O through Unicorn's IN/OUT hooks straight to the device callbacks
(``io_read(port, size)``, ``io_write(port, size, value)``), any other unmapped access answered with a
fresh zero page (the LAPIC and other MMIO are plain memory here).  The instance is a ``UC_MODE_64``
one whose CPU state starts as a ``UC_MODE_16`` instance's with CS = 0xF000 (base 0xF0000; a context
copy), so the reset vector is reached at its legacy alias 0xFFFF0: in UC_MODE_64 Unicorn cannot set a
segment's hidden base, and the bare baseline has no VMRUN to load it.

:meth:`BareFirmware.run_until_range` runs until the first instruction inside an address range (an
address-bound code hook whose callback is ``uc_emu_stop`` itself: no Python per instruction), and
:meth:`BareFirmware.run_until_stack` in counted chunks until the stack pointer satisfies a predicate.
Observed on Unicorn 2.1.4: resuming after an asynchronous ``uc_emu_stop`` (a timer) in the middle of
OVMF's SEC sometimes continues at a wrong RIP (an exception at RIP 0 a few slices in); the vCPU
engine, whose watchdog stops it the same way, saw rare crashes of the same look (a #UD at a small
RIP in SEC's code segment) in about one run in five before the hook changes -- the timed runs here
therefore stop only by the range hook or by counted chunks.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from sevemu._util.units import PAGE, KiB, align_down
from sevemu.hw.uc import binding as uc
from sevemu.hw.uc.binding import check, ctl

__all__ = ["BareFirmware"]

_UC_MODE_16: Final = 2
_REG_ESP: Final = 30
_REG_EIP: Final = 41  # RIP
_HOOK_MEM_UNMAPPED: Final = 16 | 32 | 64
_ALIAS: Final = 0xE0000
_UNMAPPED_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_int64, ctypes.c_void_p)


class BareFirmware:
    """A flash image on a bare Unicorn (module docstring)."""

    def __init__(self, flash: bytes, ram: int, io_read: Callable[[int, int], int],
                 io_write: Callable[[int, int, int], None]) -> None:
        self._lib = uc.library()
        lib = self._lib
        self._h = ctypes.c_void_p(0)
        uc.open_x86(self._h, tcg_buffer=64 << 20)
        h = self._h
        self._flash = ctypes.create_string_buffer(bytes(flash), len(flash))
        base = (1 << 32) - len(flash)
        check(lib.uc_mem_map_ptr(h, base, len(flash), uc.UC_PROT_ALL, self._flash), "mapping the flash")
        alias = 128 * KiB
        check(lib.uc_mem_map_ptr(h, _ALIAS, alias, uc.UC_PROT_ALL,
                                 ctypes.c_void_p(ctypes.addressof(self._flash) + len(flash) - alias)), "the alias")
        check(lib.uc_mem_map(h, 0, _ALIAS, uc.UC_PROT_ALL), "low RAM")
        check(lib.uc_mem_map(h, _ALIAS + alias, ram - _ALIAS - alias, uc.UC_PROT_ALL), "RAM")
        self.zero_pages = 0
        self._io_read, self._io_write = io_read, io_write
        hin = uc.IN_CB(lambda _h, port, size, _u: self._io_read(port, size) & 0xFFFFFFFF)
        hout = uc.OUT_CB(lambda _h, port, size, value, _u: self._io_write(port, size, value))
        miss = _UNMAPPED_CB(self._on_unmapped)
        self._keep: list[Any] = [hin, hout, miss]
        hh = ctypes.c_size_t()
        uc.hook_insn(h, hh, hin, uc.UC_X86_INS_IN)
        uc.hook_insn(h, hh, hout, uc.UC_X86_INS_OUT)
        check(lib.uc_hook_add(h, ctypes.byref(hh), _HOOK_MEM_UNMAPPED, uc.fn_address(miss), None, 1, 0),
              "unmapped-access hook")
        self._scratch = ctypes.c_uint64(0xF000)
        self._real_mode_cs()
        self.pc = 0xFFF0  # IP 0xFFF0 with CS base 0xF0000: the reset vector's legacy alias 0xFFFF0

    def _real_mode_cs(self) -> None:
        """CS = 0xF000 with its real-mode base: loaded in a UC_MODE_16 instance, whose CPU state is then
        copied into this one (Unicorn's context save/restore copies the raw state)."""
        lib = self._lib
        h16 = ctypes.c_void_p(0)
        ctx = ctypes.c_void_p(0)
        try:
            uc.open_x86(h16, _UC_MODE_16, what="uc_open (16-bit)")
            check(lib.uc_reg_write(h16, uc.REG_CS, ctypes.byref(self._scratch)), "CS")
            check(lib.uc_context_alloc(h16, ctypes.byref(ctx)), "context")
            check(lib.uc_context_save(h16, ctx), "context save")
            check(lib.uc_context_restore(self._h, ctx), "context restore")
        finally:
            if ctx.value:
                lib.uc_context_free(ctx)
            lib.uc_close(h16)

    def _on_unmapped(self, h: Any, access: int, address: int, size: int, value: int, user: Any) -> bool:
        page = align_down(address, PAGE)
        if self._lib.uc_mem_map(self._h, page, PAGE, uc.UC_PROT_ALL) != uc.UC_ERR_OK:
            return False
        self.zero_pages += 1
        return True

    def _reg(self, reg: int) -> int:
        check(self._lib.uc_reg_read(self._h, reg, ctypes.byref(self._scratch)), "register read")
        return int(self._scratch.value)

    @property
    def esp(self) -> int:
        return self._reg(_REG_ESP) & 0xFFFF_FFFF

    def _linear_pc(self) -> int:
        return self._reg(_REG_EIP)

    def _slice(self, seconds: float) -> int:
        """Run for about ``seconds``: a timer thread calls ``uc_emu_stop``, as the engine's watchdog does
        (Unicorn's own timeout argument left RIP unreadable after the stop in this build)."""
        timer = threading.Timer(seconds, self._lib.uc_emu_stop, [self._h])
        timer.start()
        try:
            return int(self._lib.uc_emu_start(self._h, self._begin(), 0, 0, 0))
        finally:
            timer.cancel()
            timer.join()

    def _begin(self) -> int:
        return self.pc  # UC_MODE_64: uc_emu_start sets RIP (the CS base stays what the guest loaded)

    def run_until_range(self, first: int, end: int, timeout: float) -> float | None:
        """Run until the first instruction in ``[first, end)``; the seconds it took (None: not within
        ``timeout``)."""
        lib, h = self._lib, self._h
        hh = ctypes.c_size_t()
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_CODE, uc.fn_address(lib.uc_emu_stop), None,
                              first, end - 1), "range hook")
        t0 = time.perf_counter()
        try:  # one uninterrupted run: the range hook stops it (the timer only when it never gets there)
            err = self._slice(timeout)
            self.pc = self._linear_pc()
            if err != uc.UC_ERR_OK:
                raise RuntimeError(f"bare Unicorn stopped: error {err} at {self.pc:#x}")
            return time.perf_counter() - t0 if first <= self.pc < end else None
        finally:
            lib.uc_hook_del(h, hh)
            check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TB_FLUSH))), "TB flush")

    def count_until_range(self, first: int, end: int, chunk: int = 1_000_000, limit: int = 4_000_000_000) -> int | None:
        """Instructions executed until the first one in ``[first, end)``, counted by Unicorn in chunks
        of ``chunk`` (exact to within one chunk; Unicorn's counter costs speed, so this is a separate
        pass from the timed runs); None when ``limit`` instructions do not get there."""
        lib, h = self._lib, self._h
        hh = ctypes.c_size_t()
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_CODE, uc.fn_address(lib.uc_emu_stop), None,
                              first, end - 1), "range hook")
        done = 0
        try:
            while done < limit:
                err = lib.uc_emu_start(h, self._begin(), 0, 0, chunk)
                self.pc = self._linear_pc()
                if err != uc.UC_ERR_OK:
                    raise RuntimeError(f"bare Unicorn stopped: error {err} at {self.pc:#x}")
                if first <= self.pc < end:
                    return done + chunk // 2
                done += chunk
            return None
        finally:
            lib.uc_hook_del(h, hh)
            check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TB_FLUSH))), "TB flush")

    def run_until_stack(self, done: Callable[[int], bool], timeout: float, chunk: int = 100_000) -> float | None:
        """Run in chunks of ``chunk`` instructions until ``done(esp)``; the seconds it took (None: not
        within ``timeout``).  Counted chunks, not timed slices: resuming after an asynchronous
        ``uc_emu_stop`` in the middle of SEC's decompression sometimes continues at a wrong RIP in
        this Unicorn build (module docstring)."""
        lib, h = self._lib, self._h
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            err = int(lib.uc_emu_start(h, self._begin(), 0, 0, chunk))
            self.pc = self._linear_pc()
            if done(self.esp):  # (also when an exception, which bare Unicorn cannot deliver, ended the chunk)
                return time.perf_counter() - t0
            if err != uc.UC_ERR_OK:
                raise RuntimeError(f"bare Unicorn stopped: error {err} at {self.pc:#x}")
        return None

    def close(self) -> None:
        h, self._h = self._h, ctypes.c_void_p(0)
        if h.value:
            self._lib.uc_close(h)
        self._keep.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
