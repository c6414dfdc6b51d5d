"""Legacy SEV platform and guest states (SEV API spec 55766 "Platform State Machine" and "GSTATE";
AMD sev-tool ``src/sevapi.h``).

Values are the bytes the firmware reports in PLATFORM_STATUS.state and GUEST_STATUS.state.  The
allowed-command tables and transitions belong to the firmware (``sevemu.firmware``), not here.
SENT (6) is the state after SEND_FINISH; AMDESE/sev-tool's enum stops at RUPDATE (5), the SEV API's
guest state table lists SENT.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = ["GuestState", "PlatformOwner", "PlatformState"]


class PlatformState(IntEnum):
    """Platform state (PLATFORM_STATUS byte 02)."""

    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(IntEnum):
    """Guest state (GUEST_STATUS byte 0C)."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


class PlatformOwner(IntFlag):
    """PLATFORM_STATUS ``owner`` byte (sev-tool ``SEV_PLATFORM_STATUS_OWNER``).

    Bit 0 clear means self-owned (PLATFORM_RESET / PEK_GEN made the OCA), set means externally owned
    (PEK_CERT_IMPORT installed an OCA-signed PEK).  Bits 7:1 are reserved.
    """

    SELF_OWNED = 0
    EXTERNAL = 1 << 0
