"""The same Unicorn, bare: flat memory, no paging, no SoC model -- the CPU benchmark's baseline."""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

from sevemu._util.units import PAGE, align_up
from sevemu.hw.svm import GPRS
from sevemu.hw.uc import binding as uc
from sevemu.hw.uc.binding import REG, check

__all__ = ["BareRunner"]


class BareRunner:
    """Maps ``image`` at ``base`` (plus ``extra`` bytes of zeroed memory after it) and runs code from
    ``start`` until ``stop`` in 64-bit mode; port output is collected, HLT ends the run.
    """

    def __init__(self, image: bytes, base: int, extra: int = 1 << 20) -> None:
        self._lib = uc.library()
        self._h = ctypes.c_void_p(0)
        lib = self._lib
        uc.open_x86(self._h)
        size = align_up(len(image) + extra, PAGE)
        check(lib.uc_mem_map(self._h, base, size, uc.UC_PROT_ALL), "map")
        buf = ctypes.create_string_buffer(image, len(image))
        check(lib.uc_mem_write(self._h, base, buf, len(image)), "write")
        self.base = base
        self.size = size
        self.output = bytearray()
        self._cbs: list[Any] = []
        out = uc.OUT_CB(self._out)
        inp = uc.IN_CB(lambda h, port, size, user: 0x20)
        self._cbs += [out, inp]
        hh = ctypes.c_size_t()
        for cb, insn in ((out, uc.UC_X86_INS_OUT), (inp, uc.UC_X86_INS_IN)):
            uc.hook_insn(self._h, hh, cb, insn)

    def _out(self, h: Any, port: int, size: int, value: int, user: Any) -> None:
        self.output.append(value & 0xFF)

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` into the flat memory."""
        buf = ctypes.create_string_buffer(data, len(data))
        check(self._lib.uc_mem_write(self._h, address, buf, len(data)), "write")

    def call(self, start: int, stop: int, regs: dict[str, int] | None = None) -> dict[str, int]:
        """Run from ``start`` until the instruction at ``stop``; returns the GPRs afterwards."""
        lib = self._lib
        scratch = ctypes.c_uint64()
        for name, value in (regs or {}).items():
            scratch.value = value
            check(lib.uc_reg_write(self._h, REG[name], ctypes.byref(scratch)), "register write")
        check(lib.uc_emu_start(self._h, start, stop, 0, 0), "emulation")
        out = {}
        for name in GPRS:
            check(lib.uc_reg_read(self._h, REG[name], ctypes.byref(scratch)), "register read")
            out[name] = int(scratch.value)
        return out

    def close(self) -> None:
        h, self._h = self._h, ctypes.c_void_p(0)
        if h.value:
            self._lib.uc_close(h)
        self._cbs.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
