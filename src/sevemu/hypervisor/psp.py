"""The host's PSP driver: issues firmware commands through the mailbox registers only.

Modelled on Linux ``__sev_do_cmd_locked`` (drivers/crypto/ccp/sev-dev.c): the command buffer is
copied into a host page the driver owns, its physical address goes to CMDBUFF_ADDR_LO/HI, the
command id to CMDRESP; after the PSP answers, the buffer is copied back (firmware outputs) and the
status in CMDRESP[15:0] is checked.  The hypervisor never sees firmware state, only what the
firmware writes back.

The data commands point to (certificates, session blobs, measurements, transport packets, debug
bounce pages) live in the driver's *bounce area*, a physically contiguous range of host memory --
what the kernel's ``kzalloc`` / ``kfree`` around each command are in Linux.  :class:`BounceArea` is
its only allocator: a flow opens a :meth:`BounceArea.stage` for the command(s) it issues, takes
zeroed buffers or copies of user blobs from it, and everything is released when the stage closes
(stack order, so flows nest).  Copies in and out are streaming (non-temporal) host accesses: DMA
buffers are not data the host works on.  A request larger than what is left is ``-ENOMEM``, as a
failed ``kzalloc``.

Ring-buffer mode (:class:`RingSession`, the RING_BUFFER command; AMD-ASPFW ``sev_ring_buffer.h``):
for runs of many commands -- migration's one page per SEND/RECEIVE_UPDATE_DATA -- the driver puts
the mailbox in ring-buffer mode and queues up to 255 commands per doorbell: the command buffers of a
batch go into one run of slots and the queue entries into the queue page with one streaming write
each, RBTail moves, one RBCtl write rings the doorbell, and the statuses come back with one
streaming read.  A session opened with ``high=True`` (:meth:`PspDriver.ring`) configures the
high-priority queue too and carries up to twice as many commands per doorbell
(:data:`DUAL_RING_BATCH`): the first :data:`RING_BATCH` of a batch go into the high-priority queue,
the rest into the low-priority one, which the PSP runs after it -- the batch's order.  (AMD's
firmware takes one page per queue, 255 commands between head and tail: AMD-ASPFW ``sev_mcmd.c``
refuses a ``queue_size`` other than 1 and ``sev_ring_buffer.h`` keeps 8-bit indexes; Hygon's CSV
driver, Linux ``drivers/crypto/ccp/hygon/csv-dev.c``, configures both queues and queues its
command batches in the high-priority one.)  Closing the session leaves the mode (a mailbox-mode CMDRESP write, answered
RING_BUFFER_EXIT), so the driver's other commands work as before.
"""

from __future__ import annotations

import struct
from types import TracebackType
from typing import Self, TypeVar

import numpy as np

from sevemu._util.units import LINE, PAGE, align_up
from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import (
    RB_QUEUE_ENTRIES,
    MailboxReg,
    RbCtl,
    RbHead,
    decode_status,
    encode_cmdresp,
    is_response,
    rb_head_index,
    rb_tail,
)
from sevemu.abi.sev import RingBufferCmd
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.errors import HardwareError
from sevemu.hw.host import HostCore, PspMailbox
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError

__all__ = ["DUAL_RING_BATCH", "RING_BATCH", "RING_SLOT", "BounceArea", "PspDriver", "RingSession", "Stage"]

RING_BATCH = RB_QUEUE_ENTRIES - 1
"""Most commands one queue carries per doorbell (a full queue would look empty: head == tail)."""
DUAL_RING_BATCH = 2 * RING_BATCH
"""Most commands one doorbell carries with both queues configured (``PspDriver.ring(high=True)``)."""
_SLOT = 64  # a command buffer slot (the largest queued buffer, TransportCmd, is 0x34 bytes)
RING_SLOT = _SLOT
"""Bytes of a queued command buffer's slot (:meth:`RingSession.submit_many`)."""
_ENTRY = struct.Struct("<HHIQ")  # abi.sev.RingCmdEntry, packed in one call (a test holds them equal)
_STATUS = struct.Struct("<H6xQ")  # abi.sev.RingStatusEntry
_STATUSES: dict[int, Status] = {int(s): s for s in Status}  # (Status(n) for a known n, without the enum call)
_ADDR_LO, _ADDR_HI, _CMDRESP = int(MailboxReg.CMDBUFF_ADDR_LO), int(MailboxReg.CMDBUFF_ADDR_HI), int(MailboxReg.CMDRESP)
_DOORBELL = int(RbCtl.X86_CONTROL | RbCtl.RB_MODE_ACTIVE | RbCtl.CLEAR_INT_BITS)  # RBCtl of a doorbell
_RESUME_LO, _RESUME_HI = int(RbCtl.RESUME_LO_QUEUE), int(RbCtl.RESUME_HI_QUEUE)
_ISSUE: dict[CommandId, int] = {}  # command -> the CMDRESP value that issues it (encode_cmdresp, once each)

S = TypeVar("S", bound=Struct)


class Stage:
    """Buffers of one command (or one flow) in the bounce area; released by closing the stage."""

    __slots__ = ("_area", "_mark", "_open")

    def __init__(self, area: BounceArea) -> None:
        self._area = area
        self._mark = area.top
        self._open = True

    def alloc(self, length: int, align: int = LINE) -> int:
        """``length`` bytes at an ``align``-aligned SPA (contents left as they are)."""
        return self._area.alloc(length, align)

    def zeroed(self, length: int) -> int:
        """A zero-filled buffer of ``length`` bytes (``kzalloc``) for the firmware to write into."""
        spa = self._area.alloc(length)
        if length:
            self._area.core.host_write_stream(spa, bytes(length))
        return spa

    def put(self, data: bytes | bytearray) -> int:
        """A buffer holding a copy of ``data``; returns its SPA."""
        spa = self._area.alloc(len(data))
        if data:
            self._area.core.host_write_stream(spa, data)
        return spa

    def put_at(self, spa: int, data: bytes | bytearray) -> None:
        """Copy ``data`` into a buffer of this stage at ``spa``."""
        self._area.core.host_write_stream(spa, data)

    def get(self, spa: int, length: int) -> bytes:
        """``length`` bytes at ``spa`` as the firmware left them."""
        return self._area.core.host_read_stream(spa, length)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._area.release(self._mark)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class BounceArea:
    """The PSP driver's DMA-able data area ``[spa, spa + length)`` (see the module docstring)."""

    def __init__(self, core: HostCore, spa: int, length: int) -> None:
        self.core = core
        self.spa = spa
        self.length = length
        self.top = 0
        """Bytes in use (allocations are stacked)."""

    def stage(self) -> Stage:
        """Open a stage; use it as a context manager."""
        return Stage(self)

    def alloc(self, length: int, align: int = LINE) -> int:
        """``length`` bytes at an ``align``-aligned SPA (a power of two, at least a line)."""
        if length < 0:
            raise SevInputError(Errno.EINVAL, f"negative buffer length {length}")
        start = align_up(self.spa + self.top, max(align, LINE)) - self.spa
        end = start + align_up(length, LINE)
        if end > self.length:
            raise SevInputError(Errno.ENOMEM, f"{length} bytes do not fit the PSP bounce area "
                                              f"({self.length - self.top} of {self.length} left)")
        self.top = end
        return self.spa + start

    def release(self, mark: int) -> None:
        self.top = min(self.top, mark)


class PspDriver:
    """Host-side driver of the PSP mailbox (what Linux's ccp/sev-dev is)."""

    def __init__(self, core: HostCore, psp: PspMailbox, buffer_spa: int, data_spa: int, data_len: int) -> None:
        self._core = core
        self._psp = psp
        self.buffer_spa = buffer_spa
        """One page for command buffers."""
        self.data_spa = data_spa
        self.data_len = data_len
        self.bounce = BounceArea(core, data_spa, data_len)
        """The bounce area for data the commands point to (module docstring)."""
        self.last_status = Status.SUCCESS

    @property
    def core(self) -> HostCore:
        return self._core

    @property
    def mailbox(self) -> PspMailbox:
        return self._psp

    def ring(self, high: bool = False) -> RingSession:
        """Put the mailbox in ring-buffer mode until the returned session closes (module
        docstring); its pages and slots come from the bounce area.  ``high``: configure the
        high-priority queue too (:data:`DUAL_RING_BATCH` commands per doorbell)."""
        session = RingSession(self, self.bounce.stage(), high)
        try:
            session.open()
        except BaseException:
            session._stage.close()
            raise
        return session

    def raw(self, cmd: CommandId, buf: bytes | None, *, reply: bool = True) -> tuple[int, bytes]:
        """Issue ``cmd`` with the bytes ``buf``; returns (status, buffer as the firmware left it);
        ``reply=False``: the buffer is not read back (b"": the caller does not use it)."""
        spa = 0
        if buf is not None:
            n = len(buf)
            if n > PAGE:
                raise HardwareError(f"{cmd.name} buffer of {n} bytes exceeds a page")
            spa = self.buffer_spa
            if n & (LINE - 1):  # stored as whole lines of the driver's command page (zeros after the buffer)
                buf = bytes(buf) + bytes(LINE - (n & (LINE - 1)))
            self._core.host_write(spa, buf)
        psp = self._psp
        psp.mmio_write(_ADDR_LO, spa & 0xFFFFFFFF)
        psp.mmio_write(_ADDR_HI, spa >> 32)
        issue = _ISSUE.get(cmd)
        if issue is None:
            issue = _ISSUE[cmd] = encode_cmdresp(int(cmd))
        psp.mmio_write(_CMDRESP, issue)
        reg = psp.mmio_read(_CMDRESP)
        if not is_response(reg):
            raise HardwareError(f"PSP did not answer {cmd.name}")
        status = decode_status(reg)
        self.last_status = _STATUSES.get(status, Status.SUCCESS)
        out = self._core.host_read(spa, n) if buf is not None and reply else b""
        return status, out

    def call(self, cmd: CommandId, buf: S) -> S:
        """Issue ``cmd`` with the layout ``buf``; returns the buffer the firmware wrote back.

        Raises :class:`~sevemu.hypervisor.errors.SevFirmwareError` (a
        :class:`~sevemu.errors.MailboxError`) with the firmware's status on failure.
        """
        status, out = self.raw(cmd, buf.encode())
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, status)
        return type(buf).decode(out)

    def call_nobuf(self, cmd: CommandId) -> None:
        """Issue ``cmd`` without a command buffer (SHUTDOWN, DF_FLUSH ...); raises as :meth:`call`."""
        status, _ = self.raw(cmd, None)
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, status)

    # ---- raw access to the bounce area (tests and tools; driver code allocates with ``bounce``) ---
    def put_data(self, data: bytes, offset: int = 0) -> int:
        """Copy ``data`` into the bounce area at ``offset``; returns its SPA."""
        if offset < 0 or offset + len(data) > self.data_len:
            raise HardwareError(f"{len(data)} bytes do not fit the PSP bounce area")
        self._core.host_write(self.data_spa + offset, data)
        return self.data_spa + offset

    def get_data(self, length: int, offset: int = 0) -> bytes:
        """``length`` bytes of the bounce area at ``offset``."""
        return self._core.host_read(self.data_spa + offset, length)


class RingSession:
    """The mailbox in ring-buffer mode for a run of commands (module docstring).

    Open it with :meth:`PspDriver.ring` as a context manager.  :meth:`submit` queues a command
    buffer (bytes of its layout) and returns its position in the batch; :meth:`run` rings the
    doorbell and returns the statuses of the batch in order.  A queue pauses at its first
    failure: the commands after it in that queue do not run and :meth:`run` reports them as
    ``None`` (with both queues, the low-priority one still runs after a high-priority failure: the
    PSP goes on to the next running queue); the next :meth:`run` resumes a paused queue (RBCtl
    ``RESUME_LO_QUEUE`` / ``RESUME_HI_QUEUE``).
    """

    def __init__(self, driver: PspDriver, stage: Stage, high: bool = False) -> None:
        self._driver = driver
        self._stage = stage
        self.cmd_spa = stage.alloc(PAGE, PAGE)
        self.status_spa = stage.alloc(PAGE, PAGE)
        self.high = high
        self.capacity = DUAL_RING_BATCH if high else RING_BATCH
        """Most commands per doorbell."""
        self.hi_cmd_spa = stage.alloc(PAGE, PAGE) if high else 0
        self.hi_status_spa = stage.alloc(PAGE, PAGE) if high else 0
        self.slots_spa = stage.alloc(self.capacity * _SLOT, PAGE)
        self._tail = 0
        self._hi_tail = 0
        self._entries = bytearray()
        self._slots = bytearray()
        self._entry_runs: dict[tuple[int, int, int], bytes] = {}  # (cmd | flags << 16, first slot, count) -> entries
        self._paused = False
        self._hi_paused = False
        self.doorbells = 0
        self.active = False

    def open(self) -> None:
        """RING_BUFFER in mailbox mode: one low-priority queue, no high-priority one."""
        core = self._driver.core
        pages = (self.cmd_spa, self.status_spa) + ((self.hi_cmd_spa, self.hi_status_spa) if self.high else ())
        for spa in pages:
            core.host_write_stream(spa, bytes(PAGE))
        self._driver.call(CommandId.RING_BUFFER, RingBufferCmd(
            low_priority_cmd_ptr=self.cmd_spa, low_priority_status_ptr=self.status_spa,
            low_priority_queue_size=1, high_priority_cmd_ptr=self.hi_cmd_spa,
            high_priority_status_ptr=self.hi_status_spa, high_priority_queue_size=int(self.high)))
        self.active = True

    @property
    def pending(self) -> int:
        return len(self._slots) // _SLOT

    def submit(self, cmd: CommandId, buf: bytes, flags: int = 0) -> int:
        """Queue ``cmd`` with the command buffer ``buf``; its index in the current batch."""
        n = self.pending
        if n >= self.capacity:
            raise SevInputError(Errno.EBUSY, f"a ring-buffer batch holds at most {self.capacity} commands")
        if len(buf) > _SLOT:
            raise SevInputError(Errno.EINVAL, f"{cmd.name} buffer of {len(buf)} bytes exceeds a ring slot")
        self._slots += buf.ljust(_SLOT, b"\0")
        self._entries += _ENTRY.pack(int(cmd), flags, 0, self.slots_spa + n * _SLOT)
        return n

    def submit_many(self, cmd: CommandId, slots: bytes, flags: int = 0) -> None:
        """Queue ``cmd`` once per 64-byte command buffer slot of ``slots`` (each buffer zero-padded
        to its slot), in order: :meth:`submit` of each."""
        n = self.pending
        count, extra = divmod(len(slots), _SLOT)
        if extra or not count:
            raise SevInputError(Errno.EINVAL, f"{len(slots)} bytes are not whole {_SLOT}-byte command slots")
        if n + count > self.capacity:
            raise SevInputError(Errno.EBUSY, f"a ring-buffer batch holds at most {self.capacity} commands")
        self._slots += slots
        key = (int(cmd) | flags << 16, n, count)
        entries = self._entry_runs.get(key)  # (a session queues the same runs doorbell after doorbell)
        if entries is None:
            words = np.empty((count, 2), dtype="<u8")  # _ENTRY of each: (cmd | flags << 16, 0), then the slot's address
            words[:, 0] = key[0]
            words[:, 1] = np.arange(count, dtype=np.uint64) * np.uint64(_SLOT) + np.uint64(self.slots_spa + n * _SLOT)
            entries = words.tobytes()
            if len(self._entry_runs) < 8:
                self._entry_runs[key] = entries
        self._entries += entries

    def run(self) -> list[int | None]:
        """Ring the doorbell for the queued batch; each command's status, None for those a
        failure left unrun (their queue paused)."""
        n = self.pending
        if not n:
            return []
        core = self._driver.core
        mailbox = self._driver.mailbox
        core.host_write_stream(self.slots_spa, self._slots)
        hi_n = min(n, RING_BATCH) if self.high else 0  # (the high-priority queue runs first)
        hi_first, lo_first = self._hi_tail, self._tail
        if hi_n:
            self._hi_tail = self._enqueue(self.hi_cmd_spa, hi_first, self._entries[: hi_n * _ENTRY.size])
        if n > hi_n:
            self._tail = self._enqueue(self.cmd_spa, lo_first, self._entries[hi_n * _ENTRY.size :])
        mailbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, rb_tail(self._tail, self._hi_tail))
        ctl = _DOORBELL
        resume = (_RESUME_LO if self._paused else 0) | (_RESUME_HI if self._hi_paused else 0)
        if resume:
            mailbox.mmio_write(_CMDRESP, ctl | resume)  # the queues run again
            self._paused = self._hi_paused = False
        mailbox.mmio_write(_CMDRESP, ctl)
        self.doorbells += 1
        head = mailbox.mmio_read(MailboxReg.CMDBUFF_ADDR_LO)
        self._slots.clear()
        self._entries.clear()
        out: list[int | None] = []
        dropped = False
        for high, first, count in ((True, hi_first, hi_n), (False, lo_first, n - hi_n)):
            if not count:
                continue
            at = rb_head_index(head, high)
            done = (at - first) % RB_QUEUE_ENTRIES
            if done < count:  # paused at a failure: the rest never ran; drop them from the queue
                dropped = True
                paused = not head & (RbHead.HI_QUEUE_RUNNING if high else RbHead.LO_QUEUE_RUNNING)
                if high:
                    self._hi_paused, self._hi_tail = paused, at
                else:
                    self._paused, self._tail = paused, at
            raw = core.host_read_stream(self.hi_status_spa if high else self.status_spa,
                                        RB_QUEUE_ENTRIES * _STATUS.size)
            end = first + done  # (the entries of the commands that ran, wrapping at the page's end)
            ran = raw[first * _STATUS.size : end * _STATUS.size] + raw[: max(end - RB_QUEUE_ENTRIES, 0) * _STATUS.size]
            if ran.count(0) == len(ran):  # (every entry zero: all SUCCESS, the usual answer)
                out += [int(Status.SUCCESS)] * done
            else:
                out += np.frombuffer(ran, dtype="<u2")[:: _STATUS.size // 2].tolist()  # _STATUS: the u16 first
            out += [None] * (count - done)
        if dropped:
            mailbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, rb_tail(self._tail, self._hi_tail))
        return out

    def _enqueue(self, cmd_spa: int, first: int, entries: bytes | bytearray) -> int:
        """Write queue entries into a queue page from index ``first`` on (wrapping at the page's
        end); the queue's new tail index."""
        core = self._driver.core
        room = (RB_QUEUE_ENTRIES - first) * _ENTRY.size
        core.host_write_stream(cmd_spa + first * _ENTRY.size, bytes(entries[:room]))
        if len(entries) > room:
            core.host_write_stream(cmd_spa, bytes(entries[room:]))
        return (first + len(entries) // _ENTRY.size) % RB_QUEUE_ENTRIES

    def close(self) -> None:
        """Leave ring-buffer mode (a mailbox-mode CMDRESP write, answered RING_BUFFER_EXIT)."""
        if not self.active:
            return
        self.active = False
        mailbox = self._driver.mailbox
        mailbox.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.NOP)))
        reg = mailbox.mmio_read(MailboxReg.CMDRESP)
        # RING_BUFFER_EXIT; or, when a queued SHUTDOWN had ended the mode, NOP's own answer: either
        # way the mailbox is in mailbox mode now
        if not is_response(reg):
            raise HardwareError(f"the PSP did not answer the write that leaves ring-buffer mode ({reg:#x})")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        finally:
            self._stage.close()

