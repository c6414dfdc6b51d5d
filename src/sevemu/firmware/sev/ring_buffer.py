"""RING_BUFFER (0x0F): put the mailbox in ring-buffer mode (AMD's firmware source AMD-ASPFW
``sev_mcmd.c`` ``sev_mcmd_ring_buffer``; the mode itself: :mod:`sevemu.firmware.ring`).

Allowed in the platform states INIT and WORKING (INVALID_PLATFORM_STATE otherwise).  Checks, in AF's
order, each refusal leaving the mailbox in mailbox mode and nothing changed:

===========================================================================  ==================
the mode is already on (a RING_BUFFER queued in the ring itself)               INVALID_PARAM
``low_priority_queue_size`` not 1, ``high_priority_queue_size`` not 0 or 1     INVALID_PARAM
a queue or status page of a configured queue not 4 KiB aligned                 INVALID_ADDRESS
a page outside DRAM, in the SEV-ES TMR                                          INVALID_ADDRESS
===========================================================================  ==================

Model choices: the C-bit is stripped from the four addresses (AF converts them with
``convert_x86_address``); a queue's command page and status page may not overlap each other or the
other queue's pages (INVALID_ADDRESS: AF does not check it, but two queues in one page would make
the firmware overwrite commands with statuses).  The addresses of an unused high-priority queue
are ignored, as in AF.  On success RBTail and RBHead are zeroed with the configured queues marked
running, and every later CMDRESP write is a doorbell.
"""

from __future__ import annotations

from sevemu._util.units import PAGE
from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg
from sevemu.abi.sev import RingBufferCmd
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError
from sevemu.firmware.checks import check_range
from sevemu.firmware.core import READY, Firmware
from sevemu.firmware.ring import RingBuffer, RingQueue
from sevemu.firmware.sev.api import SEV_API

__all__: list[str] = []


def _pages(fw: Firmware, cmd: RingBufferCmd) -> list[int]:
    """The SPAs of the configured queues' pages: low cmd, low status[, high cmd, high status]."""
    addrs = [cmd.low_priority_cmd_ptr, cmd.low_priority_status_ptr]
    if cmd.high_priority_queue_size:
        addrs += [cmd.high_priority_cmd_ptr, cmd.high_priority_status_ptr]
    spas = [fw.ports.dma.strip(a)[0] for a in addrs]
    for spa in spas:
        if spa % PAGE:
            raise FirmwareError(Status.INVALID_ADDRESS, f"ring-buffer page {spa:#x} is not 4 KiB aligned")
    for spa in spas:
        check_range(fw, spa, PAGE)
    if len(set(spas)) != len(spas):
        raise FirmwareError(Status.INVALID_ADDRESS, "ring-buffer queue and status pages must be distinct")
    return spas


@SEV_API.platform(CommandId.RING_BUFFER, RingBufferCmd, READY)
def ring_buffer(fw: Firmware, cmd: RingBufferCmd) -> None:
    if fw.ring is not None:
        raise FirmwareError(Status.INVALID_PARAM, "ring-buffer mode is already on")
    if cmd.low_priority_queue_size != 1 or cmd.high_priority_queue_size not in (0, 1):
        raise FirmwareError(Status.INVALID_PARAM, f"queue sizes {cmd.low_priority_queue_size}/"
                                                  f"{cmd.high_priority_queue_size}: one page (low), 0 or 1 (high)")
    spas = _pages(fw, cmd)
    port = fw.mailbox
    low = RingQueue(spas[0], spas[1], cmd.low_q_threshold, high=False)
    high = RingQueue(spas[2], spas[3], cmd.high_q_threshold, high=True) if len(spas) == 4 else None
    ring = RingBuffer(low, high, bool(cmd.int_on_empty & 1))
    port.write(MailboxReg.CMDBUFF_ADDR_HI, 0)
    port.write(MailboxReg.CMDBUFF_ADDR_LO, ring.head)
    fw.ring = ring
    port.ring_mode(True)  # from the next CMDRESP write on (AF: "active only on the next command")
