"""Port I/O on the Unicorn engine: precise stops before IN/OUT, and their IOIO exits.

Unicorn disables QEMU's I/O intercept check, so IN/OUT cannot stop through the private VMCB.
Instead, when a code page is mapped executable, :class:`IoHooks` scans it for every place an
IN/OUT/INS/OUTS could start (an I/O opcode byte plus the run of prefix bytes before it,
:func:`scan_io_candidates`) and installs an address-bound Unicorn code hook on each such range.
A code hook runs *before* its instruction and is followed by an exit-request check, so the stop is
precise; the hook's callback is ``uc_emu_stop`` itself (no Python on the way), and a stop without
another reason at a hooked address is the I/O exit.  Bytes that are not instruction starts cost
nothing (hooks fire only on executed instructions).  When a page's contents change under the
engine its hooks are rebuilt.  The instruction is decoded by :mod:`sevemu.hw.x86.decode` and its
exit decided by the shared semantics (:func:`sevemu.hw.x86.insn.ioio`); decoded exits are
remembered per RIP, so a loop's OUT costs one comparison of its bytes.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable
from typing import Final

from sevemu._util.units import PAGE
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.svm import VmExit
from sevemu.hw.uc.binding import UC_HOOK_CODE, check
from sevemu.hw.x86 import insn
from sevemu.hw.x86.decode import IO_OPCODE, LEGACY_PREFIXES, REX, PortIo, decode_io

__all__ = ["IoHooks", "scan_io_candidates", "scan_vmgexit_candidates"]

_SCAN_PREFIXES: Final = LEGACY_PREFIXES | REX
_MEMO_LIMIT: Final = 4096
_PROMOTE_LIMIT: Final = 16
"""Hooks moved to the front of Unicorn's list (:meth:`IoHooks.remember`) in an engine's lifetime."""
_PROMOTE_MAX_HOOKS: Final = 1024
"""No promotion while more hooks are installed (each one re-adds all of them)."""
_VMMCALL: Final = re.compile(rb"\x0f\x01\xd9")


def scan_io_candidates(page: bytes) -> tuple[tuple[int, int], ...]:
    """Offset ranges ``(first, last)`` of a code page where an IN/OUT/INS/OUTS could start.

    One range per I/O opcode byte: the byte itself and the run of prefix bytes right before it.
    An instruction that starts anywhere in such a range *is* that I/O instruction; bytes that are
    not instruction starts are harmless, since a code hook fires only on instructions executed.
    """
    return _with_prefixes(IO_OPCODE, page)


def scan_vmgexit_candidates(page: bytes) -> tuple[tuple[int, int], ...]:
    """Offset ranges ``(first, last)`` of a code page where a VMGEXIT (``F3 0F 01 D9``; any
    ``0F 01 D9``, VMMCALL included) could start: its ``0F`` and the run of prefix bytes before it."""
    return _with_prefixes(_VMMCALL, page)


class IoHooks:
    """The code hooks of every executable guest page, and the IOIO exits they lead to."""

    def __init__(self, lib: ctypes.CDLL, handle: ctypes.c_void_p, stop_cb: int | None,
                 page_of_slot: Callable[[int], bytes], flush_tb: Callable[[], None],
                 request_flush: Callable[[], None] | None = None) -> None:
        self._lib = lib
        self._h = handle
        self._stop_cb = stop_cb
        self._page_of_slot = page_of_slot
        self._flush_tb = flush_tb
        self._request_flush = request_flush or flush_tb
        """Asks for a TB flush before the guest runs on (the engine stops at the next block boundary)."""
        self.xgva: dict[int, int] = {}
        """Executable GVA page -> the slot Unicorn fetches it from (until the next TLB flush)."""
        self._xslots: set[int] = set()  # slots ever mapped executable (and still holding that page)
        self._translated: set[int] = set()
        """Slots Unicorn may hold translated code of (mapped executable since the last TB flush)."""
        self._scans: dict[int, tuple[tuple[int, int], ...]] = {}  # slot -> candidate ranges
        self._ranges: dict[int, tuple[tuple[int, int], ...]] = {}  # GVA page -> ranges hooked
        self._hooks: dict[int, list[int]] = {}  # GVA page -> code-hook handles
        self.offsets: dict[int, set[int]] = {}
        """GVA page -> the offsets its hooks cover (a stop there without another reason is I/O)."""
        self.exits: dict[int, tuple[bytes, bool, int, VmExit]] = {}
        """RIP -> (instruction bytes, long mode, DX or -1 for an immediate port, the exit)."""
        self._count = 0
        self._front: list[tuple[int, tuple[int, int]]] = []
        """(GVA page, range) of the hooks moved to the front of Unicorn's list, the latest first."""
        self._promotions = 0

    @property
    def exec_slots(self) -> set[int]:
        """The slots code was fetched from (the set itself, kept current): the only slots
        :meth:`code_changed` rescans."""
        return self._xslots

    def exec_page(self, page: int, slot: int) -> None:
        """``page`` (GVA) executes from ``slot``: hook every place an IN/OUT could start in it."""
        if self.xgva.get(page) == slot:
            return
        self.xgva[page] = slot
        self._xslots.add(slot)
        self._translated.add(slot)
        ranges = self._scans.get(slot)
        if ranges is None:
            code = self._page_of_slot(slot)
            ranges = self._scans[slot] = tuple(sorted(scan_io_candidates(code) + scan_vmgexit_candidates(code)))
        if self._ranges.get(page) != ranges:
            self._hook_page(page, ranges)

    def _hook_page(self, page: int, ranges: tuple[tuple[int, int], ...]) -> None:
        lib = self._lib
        old = self._hooks.pop(page, [])
        for hh in old:
            lib.uc_hook_del(self._h, hh)
        self._count -= len(old)
        handles = []
        handle = ctypes.c_size_t()
        for first, last in ranges:
            check(lib.uc_hook_add(self._h, ctypes.byref(handle), UC_HOOK_CODE, self._stop_cb, None,
                                  page + first, page + last), "port I/O code hook")
            handles.append(handle.value)
        self._hooks[page] = handles
        self._count += len(handles)
        self._ranges[page] = ranges
        offsets = {o for first, last in ranges for o in range(first, last + 1)}
        if offsets:
            self.offsets[page] = offsets
        else:
            self.offsets.pop(page, None)

    @property
    def hook_count(self) -> int:
        """Code hooks installed (Unicorn walks all of them for every instruction it translates)."""
        return self._count

    def drop_all(self) -> None:
        """Remove every code hook (the caller flushes Unicorn's TLB and translated code, so that pages
        are hooked again as they are fetched)."""
        lib = self._lib
        for handles in self._hooks.values():
            for hh in handles:
                lib.uc_hook_del(self._h, hh)
        self._hooks.clear()
        self._ranges.clear()
        self.offsets.clear()
        self.xgva.clear()
        self.exits.clear()
        self._count = 0
        self._front.clear()

    def unhook_address(self, rip: int) -> None:
        """A range hook fired on an instruction that is not I/O: drop that range and retranslate."""
        page = rip & ~(PAGE - 1)
        ranges = self._ranges.get(page, ())
        keep = tuple(r for r in ranges if not r[0] <= rip - page <= r[1])
        self._hook_page(page, keep)
        self._flush_tb()

    def slot_writable(self, slot: int) -> None:
        """The guest may write ``slot`` from now on (the engine then maps it without execute): its
        scan is redone when it is fetched again, and code translated from it is dropped.

        Unicorn checks a store for translated code only until the first store through a TLB entry
        that is not executable (``notdirty_write`` then marks the entry dirty, and only
        translating code at the entry's own virtual page marks it again), and that first store
        invalidates only the blocks overlapping the bytes it wrote.  A page that held executed code
        and is rewritten through such an entry -- a driver loaded into the pages another one left,
        code and data sharing a page -- would keep the old blocks and run them.  So translated code
        goes (a TB flush) when a slot Unicorn may have translated is granted write access -- at the
        next stop, not inside the fill hook: a TB flush in the middle of a block lets Unicorn chain
        the block it leaves into code the next translation overwrites (the host then dies of SIGILL)."""
        if slot in self._xslots:
            self._scans.pop(slot, None)
            for page in [p for p, s in self.xgva.items() if s == slot]:
                del self.xgva[page]
        if slot in self._translated:
            self._request_flush()

    def tb_flushed(self) -> None:
        """Unicorn dropped its translated code: only pages still mapped executable get new code
        without a TLB fill."""
        self._translated = set(self.xgva.values())

    def forget_slot(self, slot: int) -> None:
        """The pool forgot ``slot``: its scan is void, and so is code translated from it (its next
        page is loaded by a host write Unicorn does not see)."""
        self._scans.pop(slot, None)
        self._xslots.discard(slot)
        if slot in self._translated:
            self._request_flush()

    def tlb_flushed(self) -> None:
        """Unicorn dropped every translation: pages are re-hooked as they are fetched again."""
        self.xgva.clear()

    def code_changed(self, slots: list[int]) -> None:
        """These slots were re-read with new contents: code among them is rescanned, retranslated."""
        rescan = [s for s in slots if s in self._xslots]
        if not rescan:
            return
        for s in rescan:
            self._scans.pop(s, None)
        self._flush_tb()
        for page, slot in list(self.xgva.items()):
            if slot in rescan:
                del self.xgva[page]
                self.exec_page(page, slot)

    def port_io(self, cpu: GuestCpu, rip: int, code: bytes, long_mode: bool, dx: int) -> insn.Outcome | None:
        """A code hook stopped the guest before ``code`` at ``rip``: its exit (None: not I/O)."""
        hit = self.exits.get(rip)
        if hit is not None and hit[0] == code and hit[1] == long_mode and hit[2] in (-1, dx):
            return insn.Exit(hit[3])
        io: PortIo | None = decode_io(code, long_mode, dx)
        if io is None:  # an instruction starting inside a range that is not I/O (legacy-mode REX)
            self.unhook_address(rip)
            return None
        out = insn.ioio(cpu, io.port, io.size, io.is_in, rip + io.length, string=io.string, rep=io.rep,
                        addr_bits=64 if long_mode else 32)
        if isinstance(out, insn.Exit) and not io.string:
            self.remember(rip, code, long_mode, out.exit, -1 if io.imm_port else dx)
        return out

    def remember(self, rip: int, code: bytes, long_mode: bool, exit: VmExit, dx: int = -1) -> None:
        """The stop at ``rip`` before ``code`` (16 bytes), in ``long_mode`` (with DX = ``dx``; -1:
        any) is ``exit`` from now on (EXITINFO2 the next RIP), until the memo is cleared -- a port
        I/O exit, or an SEV-ES guest's VMGEXIT."""
        if len(self.exits) > _MEMO_LIMIT:
            self.exits.clear()
        new = rip not in self.exits
        self.exits[rip] = (code, long_mode, dx, exit)
        if new:
            self._promote(rip)

    def _promote(self, rip: int) -> None:
        """Move the hook of the exit just remembered at ``rip`` to the front of Unicorn's list of
        code hooks.  Unicorn calls an instruction's code hooks by walking that whole list in the
        order they were added (``helper_uc_tracecode`` in Unicorn 2's ``uc.c``), checking each
        hook's range, and leaves the walk once a callback asked to stop -- ours all do, with
        ``uc_emu_stop``, at a hook that covers the instruction: an exit whose hook is the 140th of
        150 walks 140 list entries per round trip; in front, one.  The ranges stay the same (the
        same instructions stop, and nothing else), so only the cost changes.  Unicorn has no call
        to insert a hook at the head, so every hook is removed and added again, the remembered ones
        first -- at most :data:`_PROMOTE_LIMIT` times per engine, and only while at most
        :data:`_PROMOTE_MAX_HOOKS` are installed."""
        page = rip & ~(PAGE - 1)
        ranges = self._ranges.get(page, ())
        hit = next((r for r in ranges if r[0] <= rip - page <= r[1]), None)
        if (hit is None or self._promotions >= _PROMOTE_LIMIT or self._count > _PROMOTE_MAX_HOOKS
                or (page, hit) in self._front[:1]):
            return
        self._promotions += 1
        front = [(page, hit)] + [f for f in self._front if f != (page, hit)]
        # (only hooks still installed: a page re-hooked since may have lost the range)
        front = [f for f in front if f[1] in self._ranges.get(f[0], ())]
        self._front = front
        lib, h = self._lib, self._h
        for handles in self._hooks.values():
            for hh in handles:
                lib.uc_hook_del(h, hh)
        hooks: dict[int, list[int]] = {p: [] for p in self._hooks}
        handle = ctypes.c_size_t()
        first = set(front)
        order = front + [(p, r) for p, rs in self._ranges.items() for r in rs if (p, r) not in first]
        for p, (lo, hi) in order:
            check(self._lib.uc_hook_add(h, ctypes.byref(handle), UC_HOOK_CODE, self._stop_cb, None, p + lo, p + hi),
                  "port I/O code hook")
            hooks.setdefault(p, []).append(handle.value)
        self._hooks = hooks

    def close(self) -> None:
        """Forget everything (the Unicorn instance is gone; its hooks with it)."""
        self.xgva.clear()
        self._xslots.clear()
        self._translated.clear()
        self._scans.clear()
        self._ranges.clear()
        self._hooks.clear()
        self.offsets.clear()
        self.exits.clear()


def _with_prefixes(pattern: re.Pattern[bytes], page: bytes) -> tuple[tuple[int, int], ...]:
    """``(first, last)`` per match of ``pattern`` in ``page``: the match's offset and the start of
    the run of prefix bytes right before it (an instruction is at most 15 bytes long)."""
    out = []
    for m in pattern.finditer(page):
        i = m.start()
        j = i
        while j > 0 and i - j < 14 and page[j - 1] in _SCAN_PREFIXES:
            j -= 1
        out.append((j, i))
    return tuple(out)
