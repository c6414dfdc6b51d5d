"""The same Unicorn, bare: flat memory, no paging, no SoC model -- the CPU benchmark's baseline.

Like the engine, the bare runner gives Unicorn W^X translations: its virtual TLB maps a page
read+execute on an instruction fetch and read(+write) on a data access, never writable and
executable at once.  Unicorn sends every store to a page its TLB holds writable *and* executable
down QEMU's slow path (the check for self-modifying code), which made the baseline 3-5x slower than
the engine it is compared with (measured, ``docs/cpu-engine.md``, "Performance"); the engine has
mapped W^X since it stopped granting execute on data fills.  With ``w_xor_x=False`` the memory is
one read/write/execute mapping in Unicorn's own TLB (what the baseline was before).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

from sevemu._util.units import PAGE, align_up
from sevemu.hw.svm import GPRS
from sevemu.hw.uc import binding as uc
from sevemu.hw.uc.binding import REG, check

__all__ = ["BareRunner"]


def _w_xor_x(access: int) -> int:
    """The permissions of a W^X translation for a TLB fill of ``access``: an instruction fetch gets
    read+execute, a write read+write, a read read only -- never writable and executable at once."""
    if access == uc.UC_MEM_FETCH:
        return uc.UC_PROT_READ | uc.UC_PROT_EXEC
    if access == uc.UC_MEM_WRITE:
        return uc.UC_PROT_READ | uc.UC_PROT_WRITE
    return uc.UC_PROT_READ


class BareRunner:
    """Maps ``image`` at ``base`` (plus ``extra`` bytes of zeroed memory after it) and runs code from
    ``start`` until ``stop`` in 64-bit mode; port output is collected, HLT ends the run.
    """

    def __init__(self, image: bytes, base: int, extra: int = 1 << 20, *, w_xor_x: bool = True) -> None:
        self._lib = uc.library()
        self._h = ctypes.c_void_p(0)
        lib = self._lib
        uc.open_x86(self._h)
        self._cbs: list[Any] = []
        self.tlb_fills = 0
        """Translations the W^X TLB handed out (each page once per role it changes to)."""
        if w_xor_x:
            check(lib.uc_ctl(self._h, ctypes.c_int(uc.ctl(1, 1, uc.UC_CTL_TLB_TYPE)), ctypes.c_int(uc.UC_TLB_VIRTUAL)),
                  "virtual TLB")
            fill = uc.TLB_FILL_CB(self._fill)
            self._cbs.append(fill)
            hh = ctypes.c_size_t()
            check(lib.uc_hook_add(self._h, ctypes.byref(hh), uc.UC_HOOK_TLB_FILL, uc.fn_address(fill), None, 1, 0),
                  "TLB-fill hook")
        size = align_up(len(image) + extra, PAGE)
        check(lib.uc_mem_map(self._h, base, size, uc.UC_PROT_ALL), "map")
        buf = ctypes.create_string_buffer(image, len(image))
        check(lib.uc_mem_write(self._h, base, buf, len(image)), "write")
        self.base = base
        self.size = size
        self.output = bytearray()
        out = uc.OUT_CB(self._out)
        inp = uc.IN_CB(lambda h, port, size, user: 0x20)
        self._cbs += [out, inp]
        hh = ctypes.c_size_t()
        for cb, insn in ((out, uc.UC_X86_INS_OUT), (inp, uc.UC_X86_INS_IN)):
            uc.hook_insn(self._h, hh, cb, insn)

    def _fill(self, h: Any, vaddr: int, access: int, entry: int, user: Any) -> bool:
        """Identity translation, W^X: fetch -> read+execute, write -> read+write, read -> read."""
        self.tlb_fills += 1
        ctypes.c_uint64.from_address(entry).value = vaddr & ~(PAGE - 1)
        ctypes.c_int.from_address(entry + 8).value = _w_xor_x(access)
        return True

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
