"""Helpers shared by the firmware tests: issue commands through the real mailbox path."""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import InitCmd
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.scenario import Machine


def call(m: Machine, cmd: CommandId, buf: Struct | None = None) -> tuple[int, bytes]:
    """Issue ``cmd`` with the layout ``buf`` (or no buffer); (status, buffer as written back)."""
    return m.hv.psp.raw(cmd, None if buf is None else buf.encode())


def ok(m: Machine, cmd: CommandId, buf: Struct | None = None) -> bytes:
    """Issue ``cmd`` and require SUCCESS; the buffer as the firmware left it."""
    status, out = call(m, cmd, buf)
    assert status == Status.SUCCESS, Status(status).name
    return out


def init(m: Machine, cmd: InitCmd | None = None) -> None:
    """INIT, then WBINVD on every CPU and DF_FLUSH, as Linux does (``__sev_platform_init_locked``):
    INIT leaves every ASID dirty."""
    ok(m, CommandId.INIT, InitCmd() if cmd is None else cmd)
    m.soc.wbinvd_all()
    ok(m, CommandId.DF_FLUSH)


def put(m: Machine, spa: int, data: bytes) -> None:
    """Host write, then CLFLUSH (what KVM does before handing memory to the firmware)."""
    m.hv.core.host_write(spa, data)
    m.hv.core.clflush_range(spa, len(data))
