"""The host's ring-buffer session: batches queued with submit_many across the 256-entry queue's
wrap, their statuses in order, a failure pausing the queue and the next doorbell resuming it; a
session with both queues (510 commands per doorbell)."""

from __future__ import annotations

import pytest

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import ActivateCmd, PlatformStatus
from sevemu.abi.status import Status
from sevemu.hypervisor.errors import SevInputError
from sevemu.hypervisor.psp import DUAL_RING_BATCH, RING_BATCH
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


def test_a_session_with_both_queues_carries_two_queues_per_doorbell_in_order() -> None:
    """``ring(high=True)``: the first 255 commands of a batch go into the high-priority queue, the
    rest into the low one (run after it), up to 510 per doorbell; the statuses come back in
    submission order.  A failure pauses only its own queue: the rest of the high queue is reported
    unrun (None) while the low queue still runs; the next doorbell resumes the paused queue."""
    hv = build_machine("milan", seed=b"ring2").hv
    status = PlatformStatus().encode().ljust(64, b"\0")
    with hv.psp.ring(high=True) as ring:
        assert ring.capacity == DUAL_RING_BATCH == 2 * RING_BATCH
        ring.submit_many(CommandId.PLATFORM_STATUS, status * DUAL_RING_BATCH)
        with pytest.raises(SevInputError):
            ring.submit(CommandId.PLATFORM_STATUS, status)
        assert ring.run() == [Status.SUCCESS] * DUAL_RING_BATCH
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 10)
        ring.submit(CommandId.ACTIVATE, ActivateCmd(handle=999, asid=1).encode())
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 300)  # 244 more in the high queue, 56 in the low
        assert ring.run() == [0] * 10 + [Status.INVALID_GUEST] + [None] * 244 + [0] * 56
        ring.submit_many(CommandId.PLATFORM_STATUS, status * 260)  # both queues again, across their wraps
        assert ring.run() == [0] * 260
        assert ring.doorbells == 3
