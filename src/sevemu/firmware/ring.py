"""Ring-buffer mode of the mailbox: many commands per doorbell (AMD's firmware source AMD-ASPFW
``sev_ring_buffer.c``, ``sev_ring_buffer.h``, ``main.c``; the RING_BUFFER command that enables it is
:mod:`sevemu.firmware.sev.ring_buffer`).

After RING_BUFFER, x86 no longer writes one command id to CMDRESP per command.  It fills queue
entries (:class:`~sevemu.abi.sev.RingCmdEntry`: command id, flags, the command buffer's address) in
a low-priority queue page -- and an optional high-priority one -- moves its tail index in RBTail
and writes RBCtl to CMDRESP, the doorbell (register meanings: :mod:`sevemu.abi.mailbox`).  For each
doorbell the PSP:

1. reads RBCtl; without both ``X86_CONTROL`` and ``RB_MODE_ACTIVE`` x86 has written an ordinary
   command: the PSP leaves ring-buffer mode and answers CMDRESP with ``RESP | RING_BUFFER_EXIT``
   (0x1F) *without* running that command (AF ``main.c``: "return an error and exit without
   processing"); x86 issues it again in mailbox mode;
2. ``CLEAR_INT_BITS`` clears RBHead's interrupt-status bits; a paused queue whose ``RESUME_*`` bit
   is set runs again (AF ``sev_rb_pre_cmd_error_handling``);
3. takes entries, the high-priority queue first, while a running queue's head differs from its
   tail: each command runs through the dispatcher exactly as a mailbox command would (same state
   tables, same checks, same statuses, the same command log), its status goes into the status
   entry of the same index (``error_stack`` 0), the head advances (wrapping at 256).  A run of
   entries queuing one command with the same flags goes to the command's batch runner where it
   has one (SEND_UPDATE_DATA, RECEIVE_UPDATE_DATA: :mod:`sevemu.firmware.sev.migrate`), which runs
   the longest prefix that succeeds with the effects of running it one by one -- the PSP keeping
   its AES and SHA engines busy across commands -- and the first command it does not take runs on
   its own; with both queues configured, the whole high-priority queue and the run that starts the
   low-priority one go to the runner as one batch when they all queue one command with the same
   flags (:meth:`RingBuffer._run_both`: that is the order they run in one by one);
4. a command that fails without ``CONT_ON_ERROR`` pauses its queue (``Q_PAUSED_INT_STAT``); one with
   ``INT_COMPLETE`` sets ``CMD_DONE_INT_STAT``; a queue whose depth fell below its threshold sets
   ``Q_FREE_INT_STAT`` (if RBCtl enables that queue's near-empty interrupt); both queues empty sets
   ``ALL_QUEUE_EMPTY_INT_STAT`` when RING_BUFFER asked for it; RBHead is written after every
   command and the interrupt (INTSTS bit 1) raised when any status bit was newly earned;
5. a command that took the platform to UNINIT (SHUTDOWN) ends ring-buffer mode (AF
   ``sev_plat.c``: "Ring Buffer - Disable when both are UNINIT").

While the mode is on, no command may point into the queue or status pages (AF ``x86_copy.c``
``validate_address_range``): INVALID_ADDRESS, as for the SEV-ES TMR
(:func:`sevemu.firmware.checks.check_range`, the dispatcher's command-buffer read).

Model choices where AF says nothing or does what the model cannot: the model runs the queues
synchronously inside the doorbell write (AF yields between commands); an entry with reserved
``cmd_flags`` bits set is answered INVALID_PARAM without running (AF ignores them); ``error_stack``
is always 0 (the model keeps no firmware call stack).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from sevemu._util.units import PAGE
from sevemu.abi.mailbox import RB_QUEUE_ENTRIES, MailboxReg, RbCtl, RbHead, encode_response
from sevemu.abi.sev import RingCmdFlags
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.hw import columns

if TYPE_CHECKING:
    from sevemu.firmware.core import Firmware

__all__ = ["RingBuffer", "RingQueue"]

_ENTRY: Final = struct.Struct("<HHIQ")  # RingCmdEntry, unpacked in one call (a test holds them equal)
_STATUS: Final = struct.Struct("<H6xQ")  # RingStatusEntry
_KNOWN_FLAGS: Final = int(RingCmdFlags.INT_COMPLETE | RingCmdFlags.CONT_ON_ERROR)
_CONT_ON_ERROR: Final = int(RingCmdFlags.CONT_ON_ERROR)
_INT_COMPLETE: Final = int(RingCmdFlags.INT_COMPLETE)
_CMD_DONE: Final = int(RbHead.CMD_DONE_INT_STAT)
_NO_ERRORS: Final = memoryview(bytes(_STATUS.size * RB_QUEUE_ENTRIES))  # the status entries of commands that succeeded
_RUNNING_BIT: Final = (int(RbHead.LO_QUEUE_RUNNING), int(RbHead.HI_QUEUE_RUNNING))  # (low, high queue)
_RESUME_BIT: Final = (int(RbCtl.RESUME_LO_QUEUE), int(RbCtl.RESUME_HI_QUEUE))
_X86_CONTROL, _RB_MODE_ACTIVE, _CLEAR_INT_BITS = int(RbCtl.X86_CONTROL), int(RbCtl.RB_MODE_ACTIVE), int(RbCtl.CLEAR_INT_BITS)
_PAUSED: Final = int(RbHead.Q_PAUSED_INT_STAT)
_INT_STATUS: Final = int(RbHead.ALL_QUEUE_EMPTY_INT_STAT | RbHead.CMD_DONE_INT_STAT | RbHead.Q_PAUSED_INT_STAT
                         | RbHead.Q_FREE_INT_STAT)


@dataclass(frozen=True, slots=True)
class RingQueue:
    """One queue: its command and status pages (SPAs, one page each) and its depth threshold."""

    cmd_spa: int
    status_spa: int
    threshold: int
    high: bool

    @property
    def shift(self) -> int:
        return 16 if self.high else 0

    @property
    def running_bit(self) -> int:
        return _RUNNING_BIT[self.high]

    @property
    def resume_bit(self) -> int:
        return _RESUME_BIT[self.high]

    @property
    def empty_int_bit(self) -> int:
        return int(RbCtl.HI_QUEUE_EMPTY_INT if self.high else RbCtl.LO_QUEUE_EMPTY_INT)


class RingBuffer:
    """The firmware's ring-buffer state (AF ``sev_rb_config_t``) and its doorbell (module docstring)."""

    def __init__(self, low: RingQueue, high: RingQueue | None, int_on_empty: bool) -> None:
        self.queues = (low,) if high is None else (high, low)  # the high-priority queue first
        self.int_on_empty = int_on_empty
        self.head = low.running_bit | (high.running_bit if high is not None else 0)
        self._pages = tuple(page for q in self.queues for page in (q.cmd_spa, q.status_spa))
        self._lo = min(self._pages)
        self._hi = max(self._pages) + PAGE

    @property
    def pages(self) -> tuple[int, ...]:
        """SPAs of the queue and status pages (one page each)."""
        return self._pages

    def overlaps(self, spa: int, length: int) -> bool:
        """Whether ``[spa, spa+length)`` touches a queue or status page."""
        end = spa + max(length, 1)
        if end <= self._lo or spa >= self._hi:  # (every command's buffers: the common answer)
            return False
        return any(spa < page + PAGE and page < end for page in self._pages)

    # ---- the doorbell -------------------------------------------------------------------------
    def doorbell(self, fw: Firmware) -> None:
        """Answer one CMDRESP write in ring-buffer mode (module docstring, steps 1-5)."""
        port = fw.mailbox
        ctl = port.read(MailboxReg.CMDRESP)
        if not (ctl & _X86_CONTROL and ctl & _RB_MODE_ACTIVE):
            self.leave(fw)
            port.write(MailboxReg.CMDRESP, encode_response(Status.RING_BUFFER_EXIT))
            port.interrupt()
            return
        raised = False
        if ctl & _CLEAR_INT_BITS:
            self.head &= ~_INT_STATUS
        for q in self.queues:
            if not self.head & q.running_bit and ctl & q.resume_bit:
                self.head |= q.running_bit  # recovery: x86 clears RESUME before the queue runs again
        port.write(MailboxReg.CMDBUFF_ADDR_LO, self.head)
        while True:
            ctl = port.read(MailboxReg.CMDRESP)
            tail = port.read(MailboxReg.CMDBUFF_ADDR_HI)
            picked = self._next_queue(ctl, tail)
            if picked is None:
                if self.int_on_empty:
                    self.head |= int(RbHead.ALL_QUEUE_EMPTY_INT_STAT)
                    raised = True
                port.write(MailboxReg.CMDBUFF_ADDR_LO, self.head)
                break
            q, index, near_empty = picked
            raised |= near_empty
            merged = self._run_both(fw, ctl, tail) if q.high else None
            raised |= self._run_some(fw, q, index, (tail >> q.shift) & 0xFF) if merged is None else merged
            port.write(MailboxReg.CMDBUFF_ADDR_LO, self.head)
            if fw.state is PlatformState.UNINIT:  # SHUTDOWN ran: the mode ends with it
                self.leave(fw)
                break
        if raised:
            port.interrupt()

    def _next_queue(self, ctl: int, tail: int) -> tuple[RingQueue, int, bool] | None:
        """The queue to take a command from, its head index, and whether it is near empty."""
        for q in self.queues:
            if not self.head & q.running_bit or ctl & q.resume_bit:
                continue  # paused, or resumed but RESUME not yet cleared by x86 (AF)
            head = (self.head >> q.shift) & 0xFF
            end = (tail >> q.shift) & 0xFF
            near = bool(q.threshold) and (end - head) % RB_QUEUE_ENTRIES < q.threshold \
                and bool(ctl & q.empty_int_bit)
            if near:
                self.head |= int(RbHead.Q_FREE_INT_STAT)
            if head != end:
                return q, head, near
        return None

    def _run_some(self, fw: Firmware, q: RingQueue, index: int, end: int) -> bool:
        """Run the entry at ``index`` of ``q`` -- with the entries after it up to ``end`` that queue
        the same command with the same flags, when the command has a batch runner
        (:meth:`~sevemu.firmware.core.Firmware.handle_batch`: the same effects and statuses as one
        by one) -- post the statuses, advance the head; whether an interrupt was earned."""
        raw = self._entries(fw, q, index, (end - index) % RB_QUEUE_ENTRIES)
        cmd_id, flags, _, buffer_ptr = _ENTRY.unpack_from(raw)
        if flags & ~_KNOWN_FLAGS:
            return self._post(fw, q, index, [int(Status.INVALID_PARAM)], flags)
        done = 0
        if len(raw) > _ENTRY.size:  # the entries after it that queue the same command, same flags
            same = columns.key_run(raw, 0xFFFF_FFFF)
            done = fw.handle_batch(cmd_id, np.frombuffer(raw, dtype="<u8", count=2 * same)[1::2]) if same > 1 else 0
        if done:
            return self._post(fw, q, index, done, flags)
        return self._post(fw, q, index, [fw.handle(cmd_id, buffer_ptr)], flags)

    @staticmethod
    def _entries(fw: Firmware, q: RingQueue, index: int, count: int) -> bytes:
        """The ``count`` queue entries of ``q`` from ``index`` on, in queue order (wrapping)."""
        dma = fw.ports.dma
        stop = min(index + count, RB_QUEUE_ENTRIES)  # up to the page's end, then the wrapped rest
        raw = dma.read(q.cmd_spa + index * _ENTRY.size, (stop - index) * _ENTRY.size)
        if index + count > RB_QUEUE_ENTRIES:  # the entries wrap: one run in queue order
            raw += dma.read(q.cmd_spa, (index + count - RB_QUEUE_ENTRIES) * _ENTRY.size)
        return raw

    def _run_both(self, fw: Firmware, ctl: int, tail: int) -> bool | None:
        """Every entry of the high-priority queue and the run that starts the low-priority one,
        when all of them queue one command with the same flags that has a batch runner, as one
        batch: the order the PSP runs them in (the high queue until empty, then the low one), so
        the same effects and statuses as :meth:`_run_some` of one queue after the other.  Posts the
        statuses of both queues' commands that ran; None (nothing ran) when it does not apply:
        a single queue, the low queue empty, paused or waiting for RESUME to clear, a near-empty
        threshold set (its interrupt is judged between the queues), the commands differ, or the
        batch runner took none."""
        if len(self.queues) != 2:
            return None
        hi, lo = self.queues
        if hi.threshold or lo.threshold or not self.head & lo.running_bit or ctl & lo.resume_bit:
            return None
        hi_index, lo_index = (self.head >> hi.shift) & 0xFF, (self.head >> lo.shift) & 0xFF
        n_hi = (((tail >> hi.shift) & 0xFF) - hi_index) % RB_QUEUE_ENTRIES
        n_lo = (((tail >> lo.shift) & 0xFF) - lo_index) % RB_QUEUE_ENTRIES
        if not n_hi or not n_lo:
            return None
        raw = self._entries(fw, hi, hi_index, n_hi) + self._entries(fw, lo, lo_index, n_lo)
        same = columns.key_run(raw, 0xFFFF_FFFF)  # the entries queuing the first one's command id and flags
        key = int.from_bytes(raw[:4], "little")
        flags = key >> 16
        if same <= n_hi or flags & ~_KNOWN_FLAGS:
            return None
        done = fw.handle_batch(key & 0xFFFF, np.frombuffer(raw, dtype="<u8", count=2 * same)[1::2])
        if not done:
            return None
        raised = self._post(fw, hi, hi_index, min(done, n_hi), flags)
        if done > n_hi:
            raised |= self._post(fw, lo, lo_index, done - n_hi, flags)
        return raised

    def _post(self, fw: Firmware, q: RingQueue, index: int, statuses: list[int] | int, flags: int) -> bool:
        """Write the status entries of the commands from ``index`` on (wrapping at the page's end
        as the queue does), advance the head; whether an interrupt was earned.  ``statuses``: each
        command's status, or the number of commands that all succeeded."""
        if isinstance(statuses, int):  # (all SUCCESS: zero entries)
            entries: bytes | memoryview = _NO_ERRORS[: _STATUS.size * statuses]
            statuses = [int(Status.SUCCESS)] if statuses else []
            count = len(entries) // _STATUS.size
        else:
            entries = bytes(_STATUS.size * len(statuses)) if not any(statuses) else \
                b"".join([_STATUS.pack(st, 0) for st in statuses])
            count = len(statuses)
        room = (RB_QUEUE_ENTRIES - index) * _STATUS.size
        fw.ports.dma.write(q.status_spa + index * _STATUS.size, entries[:room])
        if len(entries) > room:
            fw.ports.dma.write(q.status_spa, entries[room:])
        self.head = (self.head & ~(0xFF << q.shift)) | (((index + count) % RB_QUEUE_ENTRIES) << q.shift)
        raised = False
        if statuses and statuses[-1] and not flags & _CONT_ON_ERROR:  # (SUCCESS is 0; only the last may fail)
            self.head = (self.head & ~q.running_bit) | _PAUSED
            raised = True
        if flags & _INT_COMPLETE:
            self.head |= _CMD_DONE
            raised = True
        return raised

    def leave(self, fw: Firmware) -> None:
        """End ring-buffer mode: CMDRESP writes are commands again."""
        fw.ring = None
        fw.mailbox.ring_mode(False)
