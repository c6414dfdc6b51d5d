"""The host's PSP driver: issues firmware commands through the mailbox registers only.

Modelled on Linux ``__sev_do_cmd_locked`` (drivers/crypto/ccp/sev-dev.c): the command buffer is
copied into a host page the driver owns, its physical address goes to CMDBUFF_ADDR_LO/HI, the
command id to CMDRESP; after the PSP answers, the buffer is copied back (firmware outputs) and the
status in CMDRESP[15:0] is checked.  The hypervisor never sees firmware state, only what the
firmware writes back.
"""

from __future__ import annotations

from typing import TypeVar

from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp, is_response
from sevemu.abi.status import Status, status_name
from sevemu.abi.struct import Struct
from sevemu.errors import HardwareError, MailboxError
from sevemu.hw.host import HostCore, PspMailbox

__all__ = ["PspDriver"]

S = TypeVar("S", bound=Struct)

PAGE = 4096


class PspDriver:
    """Host-side driver of the PSP mailbox (what Linux's ccp/sev-dev is)."""

    def __init__(self, core: HostCore, psp: PspMailbox, buffer_spa: int, data_spa: int, data_len: int) -> None:
        self._core = core
        self._psp = psp
        self.buffer_spa = buffer_spa
        """One page for command buffers."""
        self.data_spa = data_spa
        self.data_len = data_len
        """A bounce area for data the commands point to (certificates, measurements...)."""
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

        Raises :class:`~sevemu.errors.MailboxError` with the firmware's status on failure.
        """
        status, out = self.raw(cmd, buf.encode())
        if status != Status.SUCCESS:
            raise MailboxError(cmd.name, status, status_name(status))
        return type(buf).decode(out)

    def call_nobuf(self, cmd: CommandId) -> None:
        status, _ = self.raw(cmd, None)
        if status != Status.SUCCESS:
            raise MailboxError(cmd.name, status, status_name(status))

    # ---- bounce area for the data commands point to -------------------------------------------
    def put_data(self, data: bytes, offset: int = 0) -> int:
        """Copy ``data`` into the bounce area; returns its SPA."""
        if offset + len(data) > self.data_len:
            raise HardwareError(f"{len(data)} bytes do not fit the PSP bounce area")
        self._core.host_write(self.data_spa + offset, data)
        return self.data_spa + offset

    def get_data(self, length: int, offset: int = 0) -> bytes:
        return self._core.host_read(self.data_spa + offset, length)
