"""Helpers shared by the firmware tests: issue commands through the real mailbox path."""

from __future__ import annotations

from typing import Any

from sevemu.abi.commands import CommandId
from sevemu.abi.status import Status
from sevemu.scenario import Machine


def call(m: Machine, cmd: CommandId, buf: Any = None) -> tuple[int, bytes]:
    """Issue ``cmd`` with the layout ``buf`` (or no buffer); (status, buffer as written back)."""
    return m.hv.psp.raw(cmd, None if buf is None else buf.encode())


def ok(m: Machine, cmd: CommandId, buf: Any = None) -> bytes:
    """Issue ``cmd`` and require SUCCESS; the buffer as the firmware left it."""
    status, out = call(m, cmd, buf)
    assert status == Status.SUCCESS, Status(status).name
    return out


def put(m: Machine, spa: int, data: bytes) -> None:
    """Host write, then CLFLUSH (what KVM does before handing memory to the firmware)."""
    m.hv.core.host_write(spa, data)
    m.hv.core.clflush_range(spa, len(data))
