"""The PSP mailbox register interface through which x86 software issues SEV commands.

Modelled on how Linux's driver uses it (``drivers/crypto/ccp/sev-dev.c`` ``__sev_do_cmd_locked``;
``sev-dev.h``, ``include/linux/psp.h``), register offsets from ``drivers/crypto/ccp/sp-pci.c``:

1. write the command buffer's physical address to CMDBUFF_ADDR_LO / CMDBUFF_ADDR_HI (0 / 0 for
   commands without a buffer);
2. write CMDRESP = command id in bits 26:16 (``SEV_CMDRESP_CMD = GENMASK(26, 16)``;
   older kernels: ``cmd << PSP_CMDRESP_CMD_SHIFT`` with shift 16) | IOC (bit 0, interrupt on
   completion);
3. the PSP answers by setting CMDRESP bit 31 (``PSP_CMDRESP_RESP``) with the status code in bits
   15:0 (``PSP_CMDRESP_STS`` / ``PSP_CMDRESP_ERR_MASK`` = 0xFFFF) and, if IOC was set, raising
   INTSTS bit 1 (``SEV_CMD_COMPLETE``).

Offsets are those of Linux's ``sevv2`` (used with PCI ids 0x1486, 0x14CA, 0x156E) and, for
FEATURE/INTEN/INTSTS, ``pspv2``/``pspv4`` (``pspv5``/``pspv6`` move INTEN/INTSTS to 0x10510/0x10514).
AMD's firmware source (amd/AMD-ASPFW ``sev_mcmd.h``) names the three SEV registers MP0_C2PMSG_32/56/57.
The first-generation PSP (PCI 0x1456, ``sevv1``) has them at 0x10580 / 0x105E0 / 0x105E4.

What the PSP leaves in bits 30:16 of a response is not specified; Linux reads only bit 31 and bits
15:0.  Model choice: a response is ``RESP | status``.

Ring-buffer mode (after the RING_BUFFER command; AMD-ASPFW ``sev_ring_buffer.h``, ``main.c``): the
same three registers change meaning.  CMDRESP is RBCtl, written by x86 (:class:`RbCtl`: both
``X86_CONTROL`` and ``RB_MODE_ACTIVE`` set, or the PSP leaves ring-buffer mode); CMDBUFF_ADDR_HI is
RBTail, x86's tail index of each queue (:func:`rb_tail`); CMDBUFF_ADDR_LO is RBHead, written by the
PSP only (:class:`RbHead`: head indexes, queue-running bits, interrupt-status bits).  Every write of
CMDRESP rings the doorbell: the PSP runs queued commands until both queues are empty or paused.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu.errors import LayoutError

__all__ = [
    "CMDRESP_CMD_MASK",
    "CMDRESP_CMD_SHIFT",
    "CMDRESP_IOC",
    "CMDRESP_RESP",
    "CMDRESP_STS_MASK",
    "INTSTS_CMD_COMPLETE",
    "RB_QUEUE_ENTRIES",
    "MailboxReg",
    "PspCapability",
    "RbCtl",
    "RbHead",
    "decode_command",
    "decode_status",
    "encode_cmdresp",
    "encode_response",
    "is_response",
    "rb_head_index",
    "rb_tail",
]


class MailboxReg(IntEnum):
    """Byte offsets of the PSP mailbox registers in the PSP MMIO BAR (Linux sevv2 / pspv2)."""

    CMDRESP = 0x10980  # C2PMSG_32
    CMDBUFF_ADDR_LO = 0x109E0  # C2PMSG_56
    CMDBUFF_ADDR_HI = 0x109E4  # C2PMSG_57
    FEATURE = 0x109FC  # C2PMSG_63, capability bits
    INTEN = 0x10690  # P2CMSG_INTEN
    INTSTS = 0x10694  # P2CMSG_INTSTS


class PspCapability(IntFlag):
    """FEATURE register bits (Linux ``PSP_CAPABILITY_*``)."""

    SEV = 1 << 0
    TEE = 1 << 1


CMDRESP_IOC: Final = 1 << 0
CMDRESP_STS_MASK: Final = 0xFFFF
CMDRESP_CMD_SHIFT: Final = 16
CMDRESP_CMD_MASK: Final = 0x7FF << CMDRESP_CMD_SHIFT  # bits 26:16
CMDRESP_RESP: Final = 1 << 31
INTSTS_CMD_COMPLETE: Final = 1 << 1


def encode_cmdresp(cmd: int, *, ioc: bool = True) -> int:
    """The CMDRESP value x86 writes to issue command ``cmd``."""
    if not 0 <= cmd <= CMDRESP_CMD_MASK >> CMDRESP_CMD_SHIFT:
        raise LayoutError(f"command id {cmd:#x} does not fit CMDRESP bits 26:16")
    return cmd << CMDRESP_CMD_SHIFT | (CMDRESP_IOC if ioc else 0)


def encode_response(status: int) -> int:
    """The CMDRESP value the PSP writes on completion (model choice, module docstring)."""
    if not 0 <= status <= CMDRESP_STS_MASK:
        raise LayoutError(f"status {status:#x} does not fit CMDRESP bits 15:0")
    return CMDRESP_RESP | status


def decode_command(reg: int) -> int:
    """The command id in a CMDRESP value written by x86."""
    return (reg & CMDRESP_CMD_MASK) >> CMDRESP_CMD_SHIFT


def decode_status(reg: int) -> int:
    """The status code in a CMDRESP response."""
    return reg & CMDRESP_STS_MASK


def is_response(reg: int) -> bool:
    """Whether the PSP has answered (CMDRESP bit 31)."""
    return bool(reg & CMDRESP_RESP)


# ---- ring-buffer mode (AMD-ASPFW sev_ring_buffer.h) ------------------------------------------------

RB_QUEUE_ENTRIES: Final = 256
"""Entries of a one-page queue (``SEV_RB_CMD_BUFFER_MAX_SIZE``: 4 KiB / 16); indexes wrap at it."""


class RbCtl(IntFlag):
    """RBCtl, CMDRESP as x86 writes it in ring-buffer mode (AF ``sev_rb_control_register_bits``)."""

    LO_QUEUE_EMPTY_INT = 1 << 0
    HI_QUEUE_EMPTY_INT = 1 << 1
    RESUME_LO_QUEUE = 1 << 8
    RESUME_HI_QUEUE = 1 << 9
    CLEAR_INT_BITS = 1 << 29
    RB_MODE_ACTIVE = 1 << 30
    X86_CONTROL = 1 << 31


class RbHead(IntFlag):
    """Status bits of RBHead, CMDBUFF_ADDR_LO as the PSP writes it (AF ``sev_rb_head_bits``); the
    low queue's head index is bits 7:0, the high queue's bits 23:16 (:func:`rb_head_index`)."""

    LO_QUEUE_RUNNING = 1 << 11
    HI_QUEUE_RUNNING = 1 << 27
    ALL_QUEUE_EMPTY_INT_STAT = 1 << 28
    CMD_DONE_INT_STAT = 1 << 29
    Q_PAUSED_INT_STAT = 1 << 30
    Q_FREE_INT_STAT = 1 << 31


def rb_tail(lo: int, hi: int = 0) -> int:
    """RBTail for the queues' tail indexes (AF ``sev_rb_tail_bits``: low in 7:0, high in 23:16)."""
    if not (0 <= lo < RB_QUEUE_ENTRIES and 0 <= hi < RB_QUEUE_ENTRIES):
        raise LayoutError(f"ring-buffer tail indexes {lo}, {hi} outside 0..{RB_QUEUE_ENTRIES - 1}")
    return hi << 16 | lo


def rb_head_index(head: int, high: bool = False) -> int:
    """A queue's head index in an RBHead value."""
    return (head >> 16 if high else head) & 0xFF
