"""RING_BUFFER and the mailbox's ring-buffer mode, driven as a host drives them: command buffers and
queue entries in host memory, RBTail and RBCtl written to the mailbox registers, RBHead and the
status entries read back (AMD-ASPFW sev_mcmd.c, sev_ring_buffer.c, main.c)."""

from __future__ import annotations

import struct

import pytest
from fwkit import call, init, ok

from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import (
    MailboxReg,
    RbCtl,
    RbHead,
    decode_status,
    encode_cmdresp,
    is_response,
    rb_head_index,
    rb_tail,
)
from sevemu.abi.sev import (
    GuestStatusCmd,
    InitCmd,
    InitOptions,
    PlatformStatus,
    RingBufferCmd,
    RingCmdFlags,
)
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.scenario import Machine, build_machine

PAGE = 4096
CMD_Q = 0x2000_0000  # host pages the host gives the firmware
STATUS_Q = CMD_Q + PAGE
SLOTS = CMD_Q + 4 * PAGE  # the command buffers, 64 bytes apart
RUN = RbCtl.X86_CONTROL | RbCtl.RB_MODE_ACTIVE


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="fw-ring", dram_size=4 << 30, init=False)


def ring_cmd(**kw: int) -> RingBufferCmd:
    fields = {"low_priority_cmd_ptr": CMD_Q, "low_priority_status_ptr": STATUS_Q, "low_priority_queue_size": 1}
    fields.update(kw)
    return RingBufferCmd(**fields)


class Host:
    """The host's side of ring-buffer mode, with nothing but host memory and the mailbox."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.core = m.hv.core
        self.mbox = m.hv.psp.mailbox
        self.tail = 0
        self.slot = 0

    def queue(self, cmd: int, buf: bytes = b"", flags: int = 0, *, paddr: int | None = None) -> int:
        """Put a command buffer in the next slot and an entry at the tail; returns the entry's index."""
        if paddr is None:
            paddr = SLOTS + (self.slot % 64) * 64
            self.core.host_write(paddr, buf)
            self.slot += 1
        index = self.tail
        self.core.host_write(CMD_Q + 16 * index, struct.pack("<HHIQ", cmd, flags, 0xABCD, paddr))
        self.tail = (self.tail + 1) % 256
        return index

    def ring(self, ctl: int = RUN) -> int:
        """Move RBTail, write RBCtl (the doorbell); returns RBHead."""
        self.mbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, rb_tail(self.tail))
        self.mbox.mmio_write(MailboxReg.CMDRESP, int(ctl))
        return self.mbox.mmio_read(MailboxReg.CMDBUFF_ADDR_LO)

    def status(self, index: int) -> int:
        status, stack = struct.unpack("<H6xQ", self.core.host_read(STATUS_Q + 16 * index, 16))
        assert stack == 0
        return int(status)


def enter(m: Machine, **kw: int) -> Host:
    init(m)
    ok(m, CommandId.RING_BUFFER, ring_cmd(**kw))
    return Host(m)


PS = bytes(PlatformStatus.SIZE)


def test_ring_buffer_refusals_leave_mailbox_mode(m: Machine) -> None:
    assert call(m, CommandId.RING_BUFFER, ring_cmd())[0] == Status.INVALID_PLATFORM_STATE  # UNINIT
    init(m, InitCmd(options=InitOptions.SEV_ES, tmr_paddr=0x20_0000, tmr_len=0x10_0000))
    cases = [
        (ring_cmd(low_priority_queue_size=0), Status.INVALID_PARAM),
        (ring_cmd(low_priority_queue_size=2), Status.INVALID_PARAM),
        (ring_cmd(high_priority_queue_size=2), Status.INVALID_PARAM),
        (ring_cmd(low_priority_cmd_ptr=CMD_Q + 0x40), Status.INVALID_ADDRESS),
        (ring_cmd(low_priority_status_ptr=STATUS_Q + 8), Status.INVALID_ADDRESS),
        (ring_cmd(high_priority_queue_size=1, high_priority_cmd_ptr=CMD_Q + 2 * PAGE,
                  high_priority_status_ptr=CMD_Q + 3 * PAGE + 0x10), Status.INVALID_ADDRESS),
        (ring_cmd(low_priority_status_ptr=m.soc.dram.size), Status.INVALID_ADDRESS),  # outside DRAM
        (ring_cmd(low_priority_cmd_ptr=0x20_0000), Status.INVALID_ADDRESS),  # inside the SEV-ES TMR
        (ring_cmd(low_priority_status_ptr=CMD_Q), Status.INVALID_ADDRESS),  # one page for both
    ]
    for buf, want in cases:
        assert call(m, CommandId.RING_BUFFER, buf)[0] == want, buf
        assert m.firmware.ring is None
        ok(m, CommandId.PLATFORM_STATUS, PlatformStatus())  # still mailbox mode
    # an unused high-priority queue's addresses are ignored, as in AMD's firmware
    ok(m, CommandId.RING_BUFFER, ring_cmd(high_priority_cmd_ptr=0x123, high_priority_status_ptr=0x456))
    assert m.firmware.ring is not None


def test_queued_commands_run_with_their_statuses_and_the_queue_pauses_at_a_failure(m: Machine) -> None:
    host = enter(m)
    assert host.mbox.mmio_read(MailboxReg.CMDBUFF_ADDR_LO) == RbHead.LO_QUEUE_RUNNING
    a = host.queue(CommandId.PLATFORM_STATUS, PS)
    b = host.queue(CommandId.GUEST_STATUS, GuestStatusCmd(handle=42).encode())  # no such guest
    c = host.queue(CommandId.PLATFORM_STATUS, PS)
    head = host.ring()
    assert [host.status(i) for i in (a, b)] == [Status.SUCCESS, Status.INVALID_GUEST]
    assert rb_head_index(head) == c  # paused after the failure: c did not run
    assert not head & RbHead.LO_QUEUE_RUNNING and head & RbHead.Q_PAUSED_INT_STAT
    assert m.firmware.log[-2:] == [("PLATFORM_STATUS", 0), ("GUEST_STATUS", Status.INVALID_GUEST)]
    assert host.mbox.mmio_read(MailboxReg.INTSTS) & 2
    # the firmware wrote the platform status into a's command buffer, as in mailbox mode
    assert PlatformStatus.decode(host.core.host_read(SLOTS, PlatformStatus.SIZE)).state == PlatformState.INIT
    head = host.ring()  # still paused: nothing runs
    assert rb_head_index(head) == c and len(m.firmware.log) and m.firmware.log[-1][0] == "GUEST_STATUS"
    host.ring(RUN | RbCtl.RESUME_LO_QUEUE)  # recovery: running again once RESUME is cleared
    head = host.ring(RUN | RbCtl.CLEAR_INT_BITS)
    assert host.status(c) == Status.SUCCESS and rb_head_index(head) == c + 1
    assert head & RbHead.LO_QUEUE_RUNNING and not head & RbHead.Q_PAUSED_INT_STAT


def test_continue_on_error_interrupt_on_completion_and_reserved_flags(m: Machine) -> None:
    host = enter(m)
    a = host.queue(CommandId.GUEST_STATUS, GuestStatusCmd(handle=7).encode(), RingCmdFlags.CONT_ON_ERROR)
    b = host.queue(CommandId.PLATFORM_STATUS, PS, 0x4 | RingCmdFlags.CONT_ON_ERROR)  # reserved flag bit
    c = host.queue(0x7FF, PS, RingCmdFlags.CONT_ON_ERROR)  # no such command
    d = host.queue(CommandId.PLATFORM_STATUS, PS, RingCmdFlags.INT_COMPLETE)
    head = host.ring()
    assert [host.status(i) for i in (a, b, c, d)] == [Status.INVALID_GUEST, Status.INVALID_PARAM,
                                                      Status.INVALID_COMMAND, Status.SUCCESS]
    assert rb_head_index(head) == d + 1 and head & RbHead.LO_QUEUE_RUNNING
    assert head & RbHead.CMD_DONE_INT_STAT and not head & RbHead.Q_PAUSED_INT_STAT
    assert "PLATFORM_STATUS" not in [name for name, _ in m.firmware.log[-3:-1]]  # b never ran


def test_the_queue_wraps_and_a_plain_command_leaves_the_mode_without_running(m: Machine) -> None:
    host = enter(m)
    for _ in range(3):  # 3 x 120 entries: the indexes wrap at 256
        for _ in range(120):
            host.queue(CommandId.PLATFORM_STATUS, PS)
        head = host.ring()
        assert rb_head_index(head) == host.tail
    assert all(host.status(i) == Status.SUCCESS for i in range(256))
    before = len(m.firmware.log)
    host.mbox.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.DF_FLUSH)))
    reg = host.mbox.mmio_read(MailboxReg.CMDRESP)
    assert is_response(reg) and decode_status(reg) == Status.RING_BUFFER_EXIT
    assert len(m.firmware.log) == before and m.firmware.ring is None  # DF_FLUSH did not run
    ok(m, CommandId.DF_FLUSH)  # mailbox mode again


def test_shutdown_in_the_ring_ends_the_mode_and_a_second_ring_buffer_is_refused(m: Machine) -> None:
    host = enter(m)
    a = host.queue(CommandId.RING_BUFFER, ring_cmd().encode(), RingCmdFlags.CONT_ON_ERROR)
    b = host.queue(CommandId.SHUTDOWN, paddr=0)
    c = host.queue(CommandId.PLATFORM_STATUS, PS)
    host.ring()
    assert [host.status(a), host.status(b)] == [Status.INVALID_PARAM, Status.SUCCESS]
    assert m.firmware.state is PlatformState.UNINIT and m.firmware.ring is None
    assert m.firmware.log[-1][0] == "SHUTDOWN" and c == b + 1  # c never ran
    init(m)  # mailbox mode: INIT works


def test_no_command_may_point_into_the_ring_pages(m: Machine) -> None:
    """A host attack: make the firmware write a command's output over the queue (to forge entries)
    or read a command buffer from the status page.  Both answer INVALID_ADDRESS, as AMD's firmware
    does for every x86 range that touches the ring buffer."""
    host = enter(m)
    go_on = RingCmdFlags.CONT_ON_ERROR
    a = host.queue(CommandId.PLATFORM_STATUS, paddr=CMD_Q + 0x800, flags=go_on)  # output into the queue
    b = host.queue(CommandId.GUEST_STATUS, paddr=STATUS_Q + 0x100, flags=go_on)  # buffer in the status page
    c = host.queue(CommandId.PLATFORM_STATUS, PS, go_on)
    before = host.core.host_read(CMD_Q + 0x800, 16)
    host.ring()
    assert [host.status(i) for i in (a, b, c)] == [Status.INVALID_ADDRESS, Status.INVALID_ADDRESS, Status.SUCCESS]
    assert host.core.host_read(CMD_Q + 0x800, 16) == before


def test_the_driver_session_queues_batches_and_leaves_the_mode(m: Machine) -> None:
    init(m)
    psp = m.hv.psp
    with psp.ring() as session:
        for _ in range(3):
            session.submit(CommandId.PLATFORM_STATUS, PS)
        session.submit(CommandId.GUEST_STATUS, GuestStatusCmd(handle=9).encode())
        session.submit(CommandId.PLATFORM_STATUS, PS)
        assert session.run() == [0, 0, 0, Status.INVALID_GUEST, None]
        session.submit(CommandId.PLATFORM_STATUS, PS)
        assert session.run() == [0] and session.doorbells == 2
    assert m.firmware.ring is None
    ok(m, CommandId.PLATFORM_STATUS, PlatformStatus())


def test_a_driver_session_survives_a_queued_shutdown(m: Machine) -> None:
    init(m)
    with m.hv.psp.ring() as session:
        session.submit(CommandId.SHUTDOWN, b"")
        assert session.run() == [Status.SUCCESS]
    assert m.firmware.state is PlatformState.UNINIT and m.firmware.ring is None
    init(m)
