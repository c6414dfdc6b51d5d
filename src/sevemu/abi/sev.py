"""Legacy SEV API command buffers and the data structures they point to (SEV API spec 55766
chapters 5-7, one section per command; Linux ``include/linux/psp-sev.h`` ``struct sev_data_*``).

Every layout is little-endian and packed.  Offsets follow the SEV API section of each command, cross-checked
with AMDESE/sev-tool ``sevapi.h``, Linux ``include/linux/psp-sev.h`` and AMD's firmware source
(amd/AMD-ASPFW ``sev_mcmd.h``, "AF" below).  Field names are the spec's in snake_case; where the
sources disagree on a name the one AF uses is kept (e.g. LAUNCH_START ``dh_cert_paddr``, the GODH
certificate).  Bytes a buffer does not name are reserved and must be zero.

Decisions:

* PLATFORM_STATUS (output only) is byte 03 ``owner`` (:class:`PlatformOwner`), u16 ``config`` at
  04 (:class:`PlatformConfig`), byte 06 reserved, byte 07 ``build``, as sev-tool and AF declare it.
  Linux's uapi reads bytes 03..06 as one u32 ``flags`` (owner = bit 0, CONFIG_ES = bit 8): the same
  bytes, see :data:`LINUX_STATUS_FLAGS_OWNER` / :data:`LINUX_STATUS_FLAGS_CONFIG_ES`.
* INIT / INIT_EX ``options`` is a u32 as in sev-tool and Linux (AF declares a u16 followed by
  reserved bytes; identical encoding for every defined option).
* SEND_UPDATE_VMSA uses the common transport layout with the reserved word at 04; Linux's
  ``sev_data_send_update_vmsa`` omits it, which sev-tool, AF and every other *_UPDATE buffer
  contradict.
* COPY and ACTIVATE_EX (sev-tool/AF only, not in the SEV API tables) are declared from AF.
  SWAP_OUT and SWAP_IN have no layout here; :data:`COMMAND_BUFFERS` leaves them out and
  :data:`COMMANDS_WITHOUT_BUFFER` lists the commands that take no buffer at all.
* RING_BUFFER (0x0F) and its queue entries are declared from AF (``sev_mcmd.h``
  ``sev_mcmd_ring_buffer_t``, ``sev_ring_buffer.h``): :class:`RingBufferCmd`,
  :class:`RingCmdEntry`, :class:`RingStatusEntry`; the mailbox registers in ring-buffer mode are in
  :mod:`sevemu.abi.mailbox`.
* GET_ID writes one 64-byte ID per socket (:class:`GetIdEntry`); Linux's ``sev_user_data_get_id``
  is two of them (socket1, socket2).
"""

from __future__ import annotations

import struct
from enum import IntFlag
from typing import Final

from sevemu._util.units import KiB, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.states import PlatformOwner
from sevemu.abi.struct import Struct, layout, raw, u8, u16, u32, u64

__all__ = [
    "ACTIVATE_EX_LENGTH",
    "COMMANDS_WITHOUT_BUFFER",
    "COMMAND_BUFFERS",
    "GET_ID_ENTRY_LEN",
    "INIT_EX_LENGTH",
    "INIT_EX_NV_LEN",
    "LINUX_STATUS_FLAGS_CONFIG_ES",
    "LINUX_STATUS_FLAGS_OWNER",
    "SEV_TMR_LEN",
    "SNP_TMR_LEN",
    "TRANSPORT_PACK",
    "ActivateCmd",
    "ActivateExCmd",
    "AttestationCmd",
    "CopyCmd",
    "DbgCmd",
    "DeactivateCmd",
    "DecommissionCmd",
    "DownloadFirmwareCmd",
    "GetIdCmd",
    "GetIdEntry",
    "GuestStatusCmd",
    "HandleCmd",
    "HdrBuf",
    "HdrFlags",
    "InitCmd",
    "InitExCmd",
    "InitOptions",
    "LaunchFinishCmd",
    "LaunchMeasureCmd",
    "LaunchSecretCmd",
    "LaunchStartCmd",
    "LaunchUpdateDataCmd",
    "LaunchUpdateVmsaCmd",
    "LegacyAttestationReport",
    "MeasureBuf",
    "PdhCertExportCmd",
    "PekCertImportCmd",
    "PekCsrCmd",
    "PlatformConfig",
    "PlatformOwner",
    "PlatformStatus",
    "ReceiveFinishCmd",
    "ReceiveStartCmd",
    "ReceiveUpdateDataCmd",
    "ReceiveUpdateVmsaCmd",
    "RingBufferCmd",
    "RingCmdEntry",
    "RingCmdFlags",
    "RingStatusEntry",
    "SendCancelCmd",
    "SendFinishCmd",
    "SendStartCmd",
    "SendUpdateDataCmd",
    "SendUpdateVmsaCmd",
    "SessionBuf",
    "TransportCmd",
]


# --- flags and constants -------------------------------------------------------------------------


class InitOptions(IntFlag):
    """INIT / INIT_EX ``options``."""

    SEV_ES = 1 << 0


class PlatformConfig(IntFlag):
    """PLATFORM_STATUS ``config`` (sev-tool ``SEV_CONFIG``)."""

    ES = 1 << 0  # SEV-ES initialised (INIT with options.SEV_ES)


class HdrFlags(IntFlag):
    """Packet header ``flags`` (SEV API 55766, LAUNCH_SECRET and SEND_UPDATE_DATA)."""

    COMPRESSED = 1 << 0


LINUX_STATUS_FLAGS_OWNER: Final = 0x0001
LINUX_STATUS_FLAGS_CONFIG_ES: Final = 0x0100  # Linux SEV_STATUS_FLAGS_CONFIG_ES

SEV_TMR_LEN: Final = MiB  # INIT.tmr_len for SEV-ES (1 MiB, 1 MiB aligned)
SNP_TMR_LEN: Final = 2 * MiB  # once SNP is initialised
INIT_EX_LENGTH: Final = 0x24
INIT_EX_NV_LEN: Final = 32 * KiB
ACTIVATE_EX_LENGTH: Final = 0x18  # API 0.17
GET_ID_ENTRY_LEN: Final = 0x40


# --- platform command buffers --------------------------------------------------------------------


@layout(size=0x14)
class InitCmd(Struct):
    """INIT (0x01)."""

    options: int = u32(0x00)
    tmr_paddr: int = u64(0x08)
    tmr_len: int = u32(0x10)


@layout(size=0x24)
class InitExCmd(Struct):
    """INIT_EX (0x0D); ``length`` must be 0x24."""

    length: int = u32(0x00, INIT_EX_LENGTH)
    options: int = u32(0x04)
    tmr_paddr: int = u64(0x08)
    tmr_len: int = u32(0x10)
    nv_paddr: int = u64(0x18)
    nv_len: int = u32(0x20)


@layout(size=0x0C)
class PlatformStatus(Struct):
    """PLATFORM_STATUS (0x04) output; see the module docstring for owner/config/build."""

    api_major: int = u8(0x00)
    api_minor: int = u8(0x01)
    state: int = u8(0x02)
    owner: int = u8(0x03)
    config: int = u16(0x04)
    build: int = u8(0x07)
    guest_count: int = u32(0x08)


@layout(size=0x0C)
class PekCsrCmd(Struct):
    """PEK_CSR (0x06); ``csr_len`` is written back (0x824) on INVALID_LENGTH."""

    csr_paddr: int = u64(0x00)
    csr_len: int = u32(0x08)


@layout(size=0x1C)
class PekCertImportCmd(Struct):
    """PEK_CERT_IMPORT (0x07)."""

    pek_cert_paddr: int = u64(0x00)
    pek_cert_len: int = u32(0x08)
    oca_cert_paddr: int = u64(0x10)
    oca_cert_len: int = u32(0x18)


@layout(size=0x1C)
class PdhCertExportCmd(Struct):
    """PDH_CERT_EXPORT (0x08); certs = PEK || OCA || CEK (3 x 0x824)."""

    pdh_cert_paddr: int = u64(0x00)
    pdh_cert_len: int = u32(0x08)
    certs_paddr: int = u64(0x10)
    certs_len: int = u32(0x18)


@layout(size=0x0C)
class DownloadFirmwareCmd(Struct):
    """DOWNLOAD_FIRMWARE (0x0B)."""

    fw_paddr: int = u64(0x00)
    fw_len: int = u32(0x08)


@layout(size=0x0C)
class GetIdCmd(Struct):
    """GET_ID (0x0C); the output is one :class:`GetIdEntry` per socket."""

    id_paddr: int = u64(0x00)
    id_len: int = u32(0x08)


# --- guest management ----------------------------------------------------------------------------


@layout(size=0x04)
class HandleCmd(Struct):
    """The handle-only buffer of DECOMMISSION, DEACTIVATE, LAUNCH_FINISH, SEND_FINISH, SEND_CANCEL
    and RECEIVE_FINISH."""

    handle: int = u32(0x00)


DecommissionCmd = HandleCmd
DeactivateCmd = HandleCmd
LaunchFinishCmd = HandleCmd
SendFinishCmd = HandleCmd
SendCancelCmd = HandleCmd
ReceiveFinishCmd = HandleCmd


@layout(size=0x08)
class ActivateCmd(Struct):
    """ACTIVATE (0x21)."""

    handle: int = u32(0x00)
    asid: int = u32(0x04)


@layout(size=0x0D)
class GuestStatusCmd(Struct):
    """GUEST_STATUS (0x23): ``handle`` in; ``policy``, ``asid``, ``state`` out."""

    handle: int = u32(0x00)
    policy: int = u32(0x04)
    asid: int = u32(0x08)
    state: int = u8(0x0C)


@layout(size=0x18)
class CopyCmd(Struct):
    """COPY (0x24), AF ``sev_mcmd_copy``."""

    handle: int = u32(0x00)
    len: int = u32(0x04)
    src_paddr: int = u64(0x08)
    dst_paddr: int = u64(0x10)


@layout(size=0x18)
class ActivateExCmd(Struct):
    """ACTIVATE_EX (0x25), AF ``sev_mcmd_activate_ex``; ``ex_len`` is 0x18."""

    ex_len: int = u32(0x00, ACTIVATE_EX_LENGTH)
    handle: int = u32(0x04)
    asid: int = u32(0x08)
    num_ids: int = u32(0x0C)
    ids_paddr: int = u64(0x10)


# --- launch --------------------------------------------------------------------------------------


@layout(size=0x24)
class LaunchStartCmd(Struct):
    """LAUNCH_START (0x30): ``handle`` 0 = new key, else share that guest's; new handle out."""

    handle: int = u32(0x00)
    policy: int = u32(0x04)
    dh_cert_paddr: int = u64(0x08)
    dh_cert_len: int = u32(0x10)
    session_paddr: int = u64(0x18)
    session_len: int = u32(0x20)


@layout(size=0x14)
class LaunchUpdateDataCmd(Struct):
    """LAUNCH_UPDATE_DATA (0x31), also LAUNCH_UPDATE_VMSA (0x32) and LAUNCH_MEASURE (0x33)."""

    handle: int = u32(0x00)
    paddr: int = u64(0x08)
    len: int = u32(0x10)


LaunchUpdateVmsaCmd = LaunchUpdateDataCmd
LaunchMeasureCmd = LaunchUpdateDataCmd


@layout(size=0x34)
class TransportCmd(Struct):
    """LAUNCH_SECRET (0x34), SEND_UPDATE_DATA/VMSA (0x41/0x42), RECEIVE_UPDATE_DATA/VMSA
    (0x51/0x52): header (:class:`HdrBuf`), guest region and transport buffer."""

    handle: int = u32(0x00)
    hdr_paddr: int = u64(0x08)
    hdr_len: int = u32(0x10)
    guest_paddr: int = u64(0x18)
    guest_len: int = u32(0x20)
    trans_paddr: int = u64(0x28)
    trans_len: int = u32(0x30)


@layout(size=0x28)
class RingBufferCmd(Struct):
    """RING_BUFFER (0x0F): the queues the mailbox works from in ring-buffer mode (AF
    ``sev_mcmd_ring_buffer_t``).  Each queue is ``*_queue_size`` 4 KiB pages of
    :class:`RingCmdEntry` (256 per page) with as many pages of :class:`RingStatusEntry`."""

    low_priority_cmd_ptr: int = u64(0x00)
    low_priority_status_ptr: int = u64(0x08)
    high_priority_cmd_ptr: int = u64(0x10)
    high_priority_status_ptr: int = u64(0x18)
    low_priority_queue_size: int = u8(0x20)
    high_priority_queue_size: int = u8(0x21)
    low_q_threshold: int = u16(0x22)
    high_q_threshold: int = u16(0x24)
    int_on_empty: int = u16(0x26)


class RingCmdFlags(IntFlag):
    """``cmd_flags`` of a ring-buffer queue entry (AF ``SEV_RB_CMD_FLAG_*``)."""

    INT_COMPLETE = 1 << 0
    """Raise the interrupt when this command completes."""
    CONT_ON_ERROR = 1 << 1
    """Keep the queue running when this command fails (else the queue pauses)."""


@layout(size=0x10)
class RingCmdEntry(Struct):
    """One command in a ring-buffer queue (AF ``sev_rb_cmd_ptr_entry_t``); ``software_data`` is
    x86's own (the firmware ignores it)."""

    cmd_id: int = u16(0x00)
    cmd_flags: int = u16(0x02)
    software_data: int = u32(0x04)
    cmd_buffer_ptr: int = u64(0x08)


@layout(size=0x10)
class RingStatusEntry(Struct):
    """The firmware's answer to the queue entry of the same index (AF ``sev_rb_cmd_status_entry_t``)."""

    status: int = u16(0x00)
    error_stack: int = u64(0x08)


TRANSPORT_PACK: Final = struct.Struct("<I4xQI4xQI4xQI")
""":class:`TransportCmd` as one :class:`struct.Struct` (handle, hdr_paddr, hdr_len, guest_paddr,
guest_len, trans_paddr, trans_len): the same bytes as its ``encode()``, for hosts that queue a
command per page (a test holds the two equal)."""


LaunchSecretCmd = TransportCmd
SendUpdateDataCmd = TransportCmd
SendUpdateVmsaCmd = TransportCmd
ReceiveUpdateDataCmd = TransportCmd
ReceiveUpdateVmsaCmd = TransportCmd


@layout(size=0x24)
class AttestationCmd(Struct):
    """ATTESTATION (0x36); the report is a :class:`LegacyAttestationReport`."""

    handle: int = u32(0x00)
    paddr: int = u64(0x08)
    mnonce: bytes = raw(0x10, 16)
    len: int = u32(0x20)


# --- migration -----------------------------------------------------------------------------------


@layout(size=0x44)
class SendStartCmd(Struct):
    """SEND_START (0x40): target PDH, target PEK||OCA||CEK, ASK||ARK; policy and session out."""

    handle: int = u32(0x00)
    policy: int = u32(0x04)
    pdh_cert_paddr: int = u64(0x08)
    pdh_cert_len: int = u32(0x10)
    plat_certs_paddr: int = u64(0x18)
    plat_certs_len: int = u32(0x20)
    amd_certs_paddr: int = u64(0x28)
    amd_certs_len: int = u32(0x30)
    session_paddr: int = u64(0x38)
    session_len: int = u32(0x40)


@layout(size=0x24)
class ReceiveStartCmd(Struct):
    """RECEIVE_START (0x50): the source platform's PDH and the session; new handle out."""

    handle: int = u32(0x00)
    policy: int = u32(0x04)
    pdh_cert_paddr: int = u64(0x08)
    pdh_cert_len: int = u32(0x10)
    session_paddr: int = u64(0x18)
    session_len: int = u32(0x20)


# --- debug ---------------------------------------------------------------------------------------


@layout(size=0x1C)
class DbgCmd(Struct):
    """DBG_DECRYPT (0x60) / DBG_ENCRYPT (0x61); 16-byte granularity."""

    handle: int = u32(0x00)
    src_paddr: int = u64(0x08)
    dst_paddr: int = u64(0x10)
    len: int = u32(0x18)


# --- data structures the buffers point to --------------------------------------------------------


@layout(size=0x80)
class SessionBuf(Struct):
    """Session data of LAUNCH_START (in), SEND_START (out), RECEIVE_START (in) (SEV API 55766,
    LAUNCH_START; sev-tool ``src/commands.cpp`` ``build_session_buffer``)."""

    nonce: bytes = raw(0x00, 16)
    wrap_tk: bytes = raw(0x10, 32)  # AES-128-CTR(KEK, wrap_iv)(TEK || TIK)
    wrap_iv: bytes = raw(0x30, 16)
    wrap_mac: bytes = raw(0x40, 32)  # HMAC-SHA256(KIK, wrap_tk)
    policy_mac: bytes = raw(0x60, 32)  # HMAC-SHA256(TIK, policy)


@layout(size=0x30)
class MeasureBuf(Struct):
    """LAUNCH_MEASURE output (SEV API 55766, LAUNCH_MEASURE)."""

    measure: bytes = raw(0x00, 32)
    mnonce: bytes = raw(0x20, 16)


@layout(size=0x34)
class HdrBuf(Struct):
    """Packet header of LAUNCH_SECRET and SEND/RECEIVE_UPDATE_* (SEV API 55766, LAUNCH_SECRET;
    sev-tool ``src/sevapi.h`` ``sev_hdr_buf``)."""

    flags: int = u32(0x00)
    iv: bytes = raw(0x04, 16)
    mac: bytes = raw(0x14, 32)


@layout(size=0xD0)
class LegacyAttestationReport(Struct):
    """ATTESTATION output (SEV API 55766, ATTESTATION; sev-tool ``attestation_report``); PEK signs bytes [0x00, 0x34) with ECDSA P-384 / SHA-256.

    ``sig1`` is r[72] || s[72], each little-endian and zero-padded.
    """

    mnonce: bytes = raw(0x00, 16)
    launch_digest: bytes = raw(0x10, 32)
    policy: int = u32(0x30)
    sig_usage: int = u32(0x34)
    sig_algo: int = u32(0x38)
    sig1: bytes = raw(0x40, 144)


@layout(size=GET_ID_ENTRY_LEN)
class GetIdEntry(Struct):
    """One socket's entry of the GET_ID output (the chip ID used by AMD's KDS for the CEK)."""

    id: bytes = raw(0x00, GET_ID_ENTRY_LEN)


# --- dispatch tables -----------------------------------------------------------------------------

# The buffer each legacy command reads (and possibly writes back): the dispatcher reads SIZE bytes.
COMMAND_BUFFERS: Final[dict[CommandId, type[Struct]]] = {
    CommandId.INIT: InitCmd,
    CommandId.PLATFORM_STATUS: PlatformStatus,
    CommandId.PEK_CSR: PekCsrCmd,
    CommandId.PEK_CERT_IMPORT: PekCertImportCmd,
    CommandId.PDH_CERT_EXPORT: PdhCertExportCmd,
    CommandId.DOWNLOAD_FIRMWARE: DownloadFirmwareCmd,
    CommandId.GET_ID: GetIdCmd,
    CommandId.INIT_EX: InitExCmd,
    CommandId.DECOMMISSION: HandleCmd,
    CommandId.ACTIVATE: ActivateCmd,
    CommandId.DEACTIVATE: HandleCmd,
    CommandId.GUEST_STATUS: GuestStatusCmd,
    CommandId.COPY: CopyCmd,
    CommandId.ACTIVATE_EX: ActivateExCmd,
    CommandId.LAUNCH_START: LaunchStartCmd,
    CommandId.LAUNCH_UPDATE_DATA: LaunchUpdateDataCmd,
    CommandId.LAUNCH_UPDATE_VMSA: LaunchUpdateDataCmd,
    CommandId.LAUNCH_MEASURE: LaunchUpdateDataCmd,
    CommandId.LAUNCH_SECRET: TransportCmd,
    CommandId.LAUNCH_FINISH: HandleCmd,
    CommandId.ATTESTATION: AttestationCmd,
    CommandId.SEND_START: SendStartCmd,
    CommandId.SEND_UPDATE_DATA: TransportCmd,
    CommandId.SEND_UPDATE_VMSA: TransportCmd,
    CommandId.SEND_FINISH: HandleCmd,
    CommandId.SEND_CANCEL: HandleCmd,
    CommandId.RECEIVE_START: ReceiveStartCmd,
    CommandId.RECEIVE_UPDATE_DATA: TransportCmd,
    CommandId.RECEIVE_UPDATE_VMSA: TransportCmd,
    CommandId.RECEIVE_FINISH: HandleCmd,
    CommandId.DBG_DECRYPT: DbgCmd,
    CommandId.DBG_ENCRYPT: DbgCmd,
    CommandId.RING_BUFFER: RingBufferCmd,
}

# Legacy commands that take no buffer (Linux passes a NULL address; AF ignores the registers).
COMMANDS_WITHOUT_BUFFER: Final = frozenset(
    {
        CommandId.SHUTDOWN,
        CommandId.PLATFORM_RESET,
        CommandId.PEK_GEN,
        CommandId.PDH_GEN,
        CommandId.DF_FLUSH,
        CommandId.NOP,
    }
)
