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
"""

from __future__ import annotations

from types import TracebackType
from typing import Self, TypeVar

from sevemu._util.units import LINE, PAGE, align_up
from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp, is_response
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.errors import HardwareError
from sevemu.hw.host import HostCore, PspMailbox
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError

__all__ = ["BounceArea", "PspDriver", "Stage"]

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

    def raw(self, cmd: CommandId, buf: bytes | None) -> tuple[int, bytes]:
        """Issue ``cmd`` with the bytes ``buf``; returns (status, buffer as the firmware left it)."""
        spa = 0
        if buf is not None:
            if len(buf) > PAGE:
                raise HardwareError(f"{cmd.name} buffer of {len(buf)} bytes exceeds a page")
            spa = self.buffer_spa
            self._core.host_write(spa, buf)
        self._psp.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, spa & 0xFFFFFFFF)
        self._psp.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, spa >> 32)
        self._psp.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(cmd)))
        reg = self._psp.mmio_read(MailboxReg.CMDRESP)
        if not is_response(reg):
            raise HardwareError(f"PSP did not answer {cmd.name}")
        status = decode_status(reg)
        self.last_status = Status(status) if status in Status._value2member_map_ else Status.SUCCESS
        out = self._core.host_read(spa, len(buf)) if buf is not None else b""
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
