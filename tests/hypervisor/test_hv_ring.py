"""The host's ring-buffer session: batches queued with submit_many across the 256-entry queue's
wrap, their statuses in order, a failure pausing the queue and the next doorbell resuming it."""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import ActivateCmd, PlatformStatus
from sevemu.abi.status import Status
from sevemu.scenario import build_machine


def test_batches_across_the_queue_wrap_report_each_commands_status_in_order() -> None:
    hv = build_machine("milan", seed=b"ring").hv
    status = PlatformStatus().encode().ljust(64, b"\0")
    with hv.psp.ring() as ring:
        for sizes in ([100], [128], [60, 40], [3]):  # the third doorbell wraps past entry 255
            for k in sizes:
                ring.submit_many(CommandId.PLATFORM_STATUS, status * k)
            assert ring.run() == [Status.SUCCESS] * sum(sizes)
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 3)
        ring.submit(CommandId.ACTIVATE, ActivateCmd(handle=999, asid=1).encode())
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 2)
        assert ring.run() == [0, 0, 0, Status.INVALID_GUEST, None, None]
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 2)
        assert ring.run() == [0, 0]
        assert ring.doorbells == 6
