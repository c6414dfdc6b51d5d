"""Firmware status codes of the SEV API (SEV API spec 55766, "Status Codes"; Linux
``include/uapi/linux/psp-sev.h`` ``enum sev_ret_code``).

One code space serves the legacy SEV, SEV-ES and SEV-SNP commands (SNP ABI 56860 reuses it).  The
codes are 16 bits wide: the firmware returns them in bits 15:0 of the mailbox CMDRESP register
(:mod:`sevemu.abi.mailbox`).  Names follow the SEV API table; 0x1E is unassigned.

Sources: AMDESE/sev-tool ``SEV_ERROR_CODE`` (0x00..0x17) and Linux ``include/uapi/linux/psp-sev.h``
``sev_ret_code`` (0x18..0x27, which spells 0x1F ``EXIT_RING_BUFFER``).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = ["NO_FW_CALL", "STATUS_BITS", "Status", "status_name"]

STATUS_BITS: Final = 16

# Linux's SEV_RET_NO_FW_CALL: a driver-side marker meaning "the firmware was never called".  It is
# not a firmware status and never appears in CMDRESP, hence not a Status member.
NO_FW_CALL: Final = -1


class Status(IntEnum):
    """A firmware status code (16-bit)."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DF_FLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    # SEV-SNP additions (same code space).
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    RING_BUFFER_EXIT = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27


def status_name(code: int) -> str:
    """The name of a status code, or ``UNKNOWN_0xNNNN`` for a value outside the table."""
    try:
        return Status(code).name
    except ValueError:
        return f"UNKNOWN_{code & 0xFFFF:#06x}"
