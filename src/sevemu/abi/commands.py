"""Firmware command identifiers (SEV API spec 55766 "Command Identifiers"; SNP ABI 56860;
Linux ``include/linux/psp-sev.h`` ``enum sev_cmd``).

Legacy ids carry the SEV API names (AMDESE/sev-tool ``SEV_API_COMMAND``; AMD's own firmware source
amd/AMD-ASPFW ``sev_mcmd.h`` agrees), not Linux's aliases (Linux: ``FACTORY_RESET`` for
PLATFORM_RESET, ``LAUNCH_UPDATE_SECRET`` for LAUNCH_SECRET, ``ATTESTATION_REPORT`` for ATTESTATION).
SEV-SNP ids are prefixed ``SNP_`` and SEV-TIO ids ``TIO_`` as in Linux ``include/linux/psp-sev.h``,
so the dispatcher can name every id a driver may send.  Ids are 16-bit in the API; the mailbox
carries them in CMDRESP bits 26:16 (:mod:`sevemu.abi.mailbox`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = ["LEGACY_COMMANDS", "SNP_COMMANDS", "CommandId"]


class CommandId(IntEnum):
    """A firmware command id."""

    # Legacy SEV platform commands.
    INIT = 0x01
    SHUTDOWN = 0x02
    PLATFORM_RESET = 0x03
    PLATFORM_STATUS = 0x04
    PEK_GEN = 0x05
    PEK_CSR = 0x06
    PEK_CERT_IMPORT = 0x07
    PDH_CERT_EXPORT = 0x08
    PDH_GEN = 0x09
    DF_FLUSH = 0x0A
    DOWNLOAD_FIRMWARE = 0x0B
    GET_ID = 0x0C
    INIT_EX = 0x0D
    NOP = 0x0E
    RING_BUFFER = 0x0F
    # Legacy guest management.
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    DEACTIVATE = 0x22
    GUEST_STATUS = 0x23
    COPY = 0x24
    ACTIVATE_EX = 0x25
    # Legacy launch.
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    ATTESTATION = 0x36
    # Legacy migration, outgoing then incoming.
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53
    # Legacy debug and page swap.
    DBG_DECRYPT = 0x60
    DBG_ENCRYPT = 0x61
    SWAP_OUT = 0x70
    SWAP_IN = 0x71
    # SEV-SNP (SNP ABI 56860, command id table).
    SNP_INIT = 0x81
    SNP_SHUTDOWN = 0x82
    SNP_PLATFORM_STATUS = 0x83
    SNP_DF_FLUSH = 0x84
    SNP_INIT_EX = 0x85
    SNP_SHUTDOWN_EX = 0x86
    SNP_DECOMMISSION = 0x90
    SNP_ACTIVATE = 0x91
    SNP_GUEST_STATUS = 0x92
    SNP_GCTX_CREATE = 0x93
    SNP_GUEST_REQUEST = 0x94
    SNP_ACTIVATE_EX = 0x95
    SNP_LAUNCH_START = 0xA0
    SNP_LAUNCH_UPDATE = 0xA1
    SNP_LAUNCH_FINISH = 0xA2
    SNP_DBG_DECRYPT = 0xB0
    SNP_DBG_ENCRYPT = 0xB1
    SNP_PAGE_SWAP_OUT = 0xC0
    SNP_PAGE_SWAP_IN = 0xC1
    SNP_PAGE_MOVE = 0xC2
    SNP_PAGE_MD_INIT = 0xC3
    SNP_PAGE_SET_STATE = 0xC6
    SNP_PAGE_RECLAIM = 0xC7
    SNP_PAGE_UNSMASH = 0xC8
    SNP_CONFIG = 0xC9
    SNP_DOWNLOAD_FIRMWARE_EX = 0xCA
    SNP_COMMIT = 0xCB
    SNP_VLEK_LOAD = 0xCD
    SNP_FEATURE_INFO = 0xCE
    # SEV-TIO (Linux include/linux/psp-sev.h only).
    TIO_STATUS = 0xD0
    TIO_INIT = 0xD1
    TIO_DEV_CREATE = 0xD2
    TIO_DEV_RECLAIM = 0xD3
    TIO_DEV_CONNECT = 0xD4
    TIO_DEV_DISCONNECT = 0xD5


# Legacy ids all lie below 0x80; the SNP ABI starts at 0x81 (AMD-ASPFW sev_mcmd.h, SEV_MCMD_ID_END).
LEGACY_COMMANDS: Final = frozenset(c for c in CommandId if c < 0x80)
SNP_COMMANDS: Final = frozenset(c for c in CommandId if c.name.startswith("SNP_"))
