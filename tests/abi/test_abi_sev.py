"""Legacy SEV command buffers and data structures against SEV API 55766 (each command's section) and Linux ``struct sev_data_*``.

The expected tables below are written from those sources, independently of the declarations in
:mod:`sevemu.abi.sev`; reserved bytes are whatever the table does not name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevemu.abi import sev
from sevemu.abi.commands import LEGACY_COMMANDS, CommandId
from sevemu.abi.struct import Struct, field_span
from sevemu.errors import LayoutError

# layout -> (size, {field: (offset, size)})
EXPECTED: dict[type[Struct], tuple[int, dict[str, tuple[int, int]]]] = {
    sev.InitCmd: (0x14, {"options": (0x00, 4), "tmr_paddr": (0x08, 8), "tmr_len": (0x10, 4)}),
    sev.InitExCmd: (
        0x24,
        {
            "length": (0x00, 4),
            "options": (0x04, 4),
            "tmr_paddr": (0x08, 8),
            "tmr_len": (0x10, 4),
            "nv_paddr": (0x18, 8),
            "nv_len": (0x20, 4),
        },
    ),
    sev.PlatformStatus: (
        0x0C,
        {
            "api_major": (0x00, 1),
            "api_minor": (0x01, 1),
            "state": (0x02, 1),
            "owner": (0x03, 1),
            "config": (0x04, 2),
            "build": (0x07, 1),
            "guest_count": (0x08, 4),
        },
    ),
    sev.PekCsrCmd: (0x0C, {"csr_paddr": (0x00, 8), "csr_len": (0x08, 4)}),
    sev.PekCertImportCmd: (
        0x1C,
        {
            "pek_cert_paddr": (0x00, 8),
            "pek_cert_len": (0x08, 4),
            "oca_cert_paddr": (0x10, 8),
            "oca_cert_len": (0x18, 4),
        },
    ),
    sev.PdhCertExportCmd: (
        0x1C,
        {
            "pdh_cert_paddr": (0x00, 8),
            "pdh_cert_len": (0x08, 4),
            "certs_paddr": (0x10, 8),
            "certs_len": (0x18, 4),
        },
    ),
    sev.DownloadFirmwareCmd: (0x0C, {"fw_paddr": (0x00, 8), "fw_len": (0x08, 4)}),
    sev.GetIdCmd: (0x0C, {"id_paddr": (0x00, 8), "id_len": (0x08, 4)}),
    sev.HandleCmd: (0x04, {"handle": (0x00, 4)}),
    sev.ActivateCmd: (0x08, {"handle": (0x00, 4), "asid": (0x04, 4)}),
    sev.GuestStatusCmd: (
        0x0D,
        {"handle": (0x00, 4), "policy": (0x04, 4), "asid": (0x08, 4), "state": (0x0C, 1)},
    ),
    sev.CopyCmd: (
        0x18,
        {"handle": (0x00, 4), "len": (0x04, 4), "src_paddr": (0x08, 8), "dst_paddr": (0x10, 8)},
    ),
    sev.ActivateExCmd: (
        0x18,
        {
            "ex_len": (0x00, 4),
            "handle": (0x04, 4),
            "asid": (0x08, 4),
            "num_ids": (0x0C, 4),
            "ids_paddr": (0x10, 8),
        },
    ),
    sev.LaunchStartCmd: (
        0x24,
        {
            "handle": (0x00, 4),
            "policy": (0x04, 4),
            "dh_cert_paddr": (0x08, 8),
            "dh_cert_len": (0x10, 4),
            "session_paddr": (0x18, 8),
            "session_len": (0x20, 4),
        },
    ),
    sev.LaunchUpdateDataCmd: (0x14, {"handle": (0x00, 4), "paddr": (0x08, 8), "len": (0x10, 4)}),
    sev.TransportCmd: (
        0x34,
        {
            "handle": (0x00, 4),
            "hdr_paddr": (0x08, 8),
            "hdr_len": (0x10, 4),
            "guest_paddr": (0x18, 8),
            "guest_len": (0x20, 4),
            "trans_paddr": (0x28, 8),
            "trans_len": (0x30, 4),
        },
    ),
    sev.AttestationCmd: (
        0x24,
        {"handle": (0x00, 4), "paddr": (0x08, 8), "mnonce": (0x10, 16), "len": (0x20, 4)},
    ),
    sev.SendStartCmd: (
        0x44,
        {
            "handle": (0x00, 4),
            "policy": (0x04, 4),
            "pdh_cert_paddr": (0x08, 8),
            "pdh_cert_len": (0x10, 4),
            "plat_certs_paddr": (0x18, 8),
            "plat_certs_len": (0x20, 4),
            "amd_certs_paddr": (0x28, 8),
            "amd_certs_len": (0x30, 4),
            "session_paddr": (0x38, 8),
            "session_len": (0x40, 4),
        },
    ),
    sev.ReceiveStartCmd: (
        0x24,
        {
            "handle": (0x00, 4),
            "policy": (0x04, 4),
            "pdh_cert_paddr": (0x08, 8),
            "pdh_cert_len": (0x10, 4),
            "session_paddr": (0x18, 8),
            "session_len": (0x20, 4),
        },
    ),
    sev.DbgCmd: (
        0x1C,
        {"handle": (0x00, 4), "src_paddr": (0x08, 8), "dst_paddr": (0x10, 8), "len": (0x18, 4)},
    ),
    sev.SessionBuf: (
        0x80,
        {
            "nonce": (0x00, 16),
            "wrap_tk": (0x10, 32),
            "wrap_iv": (0x30, 16),
            "wrap_mac": (0x40, 32),
            "policy_mac": (0x60, 32),
        },
    ),
    sev.MeasureBuf: (0x30, {"measure": (0x00, 32), "mnonce": (0x20, 16)}),
    sev.HdrBuf: (0x34, {"flags": (0x00, 4), "iv": (0x04, 16), "mac": (0x14, 32)}),
    sev.LegacyAttestationReport: (
        0xD0,
        {
            "mnonce": (0x00, 16),
            "launch_digest": (0x10, 32),
            "policy": (0x30, 4),
            "sig_usage": (0x34, 4),
            "sig_algo": (0x38, 4),
            "sig1": (0x40, 144),
        },
    ),
    sev.GetIdEntry: (0x40, {"id": (0x00, 64)}),
}

LAYOUTS = list(EXPECTED)
IDS = [cls.__name__ for cls in LAYOUTS]


def _reserved_bytes(cls: type[Struct]) -> list[int]:
    size, fields = EXPECTED[cls]
    covered = {off + i for off, n in fields.values() for i in range(n)}
    return [i for i in range(size) if i not in covered]


def _sample(cls: type[Struct]) -> bytes:
    """Deterministic non-trivial bytes for every field, zero in every reserved byte."""
    size = EXPECTED[cls][0]
    stream = hashlib.sha512(cls.__name__.encode()).digest() * (size // 64 + 1)
    buf = bytearray(stream[:size])
    for i in _reserved_bytes(cls):
        buf[i] = 0
    return bytes(buf)


@pytest.mark.parametrize("cls", LAYOUTS, ids=IDS)
def test_size_and_offsets_match_reference(cls: type[Struct]) -> None:
    size, fields = EXPECTED[cls]
    assert cls.SIZE == size
    declared = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    assert declared == set(fields)
    for name, span in fields.items():
        assert field_span(cls, name) == span, name
        assert cls.offset_of(name) == span[0]


@pytest.mark.parametrize("cls", LAYOUTS, ids=IDS)
def test_decode_encode_identity(cls: type[Struct]) -> None:
    data = _sample(cls)
    obj = cls.decode(data)
    assert obj.encode() == data
    for name, (off, n) in EXPECTED[cls][1].items():
        value = getattr(obj, name)
        chunk = data[off : off + n]
        assert value == (chunk if isinstance(value, bytes) else int.from_bytes(chunk, "little"))


@pytest.mark.parametrize("cls", LAYOUTS, ids=IDS)
def test_nonzero_reserved_byte_rejected(cls: type[Struct]) -> None:
    data = _sample(cls)
    for i in _reserved_bytes(cls):
        bad = bytearray(data)
        bad[i] = 0x01
        with pytest.raises(LayoutError, match="reserved"):
            cls.decode(bytes(bad))


@pytest.mark.parametrize("cls", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_size_rejected(cls: type[Struct], delta: int) -> None:
    with pytest.raises(LayoutError, match="expected"):
        cls.decode(bytes(cls.SIZE + delta))


@pytest.mark.parametrize("cls", LAYOUTS, ids=IDS)
def test_value_too_large_rejected(cls: type[Struct]) -> None:
    obj = cls.decode(_sample(cls))
    for name, (_off, n) in EXPECTED[cls][1].items():
        if isinstance(getattr(obj, name), bytes):
            too_long = dataclasses.replace(obj, **{name: bytes(n + 1)})  # type: ignore[type-var]
            with pytest.raises(LayoutError, match=name):
                too_long.encode()
        else:
            for bad in (1 << (8 * n), -1):
                with pytest.raises(LayoutError, match=name):
                    dataclasses.replace(obj, **{name: bad}).encode()  # type: ignore[type-var]


def test_defaults_encode_to_zero_except_length_fields() -> None:
    assert sev.InitCmd().encode() == bytes(0x14)
    assert sev.InitExCmd().length == sev.INIT_EX_LENGTH == sev.InitExCmd.SIZE
    assert sev.ActivateExCmd().ex_len == sev.ACTIVATE_EX_LENGTH == sev.ActivateExCmd.SIZE


def test_aliases_share_one_layout() -> None:
    for alias in (
        sev.DecommissionCmd,
        sev.DeactivateCmd,
        sev.LaunchFinishCmd,
        sev.SendFinishCmd,
        sev.SendCancelCmd,
        sev.ReceiveFinishCmd,
    ):
        assert alias is sev.HandleCmd
    assert sev.LaunchUpdateVmsaCmd is sev.LaunchMeasureCmd is sev.LaunchUpdateDataCmd
    for transport in (
        sev.LaunchSecretCmd,
        sev.SendUpdateDataCmd,
        sev.SendUpdateVmsaCmd,
        sev.ReceiveUpdateDataCmd,
        sev.ReceiveUpdateVmsaCmd,
    ):
        assert transport is sev.TransportCmd


# Buffer size per command from the SEV API (COPY / ACTIVATE_EX from AMD's firmware source).
COMMAND_SIZES = {
    CommandId.INIT: 0x14,
    CommandId.INIT_EX: 0x24,
    CommandId.PLATFORM_STATUS: 0x0C,
    CommandId.PEK_CSR: 0x0C,
    CommandId.PEK_CERT_IMPORT: 0x1C,
    CommandId.PDH_CERT_EXPORT: 0x1C,
    CommandId.DOWNLOAD_FIRMWARE: 0x0C,
    CommandId.GET_ID: 0x0C,
    CommandId.DECOMMISSION: 0x04,
    CommandId.DEACTIVATE: 0x04,
    CommandId.LAUNCH_FINISH: 0x04,
    CommandId.SEND_FINISH: 0x04,
    CommandId.SEND_CANCEL: 0x04,
    CommandId.RECEIVE_FINISH: 0x04,
    CommandId.ACTIVATE: 0x08,
    CommandId.GUEST_STATUS: 0x0D,
    CommandId.COPY: 0x18,
    CommandId.ACTIVATE_EX: 0x18,
    CommandId.LAUNCH_START: 0x24,
    CommandId.LAUNCH_UPDATE_DATA: 0x14,
    CommandId.LAUNCH_UPDATE_VMSA: 0x14,
    CommandId.LAUNCH_MEASURE: 0x14,
    CommandId.LAUNCH_SECRET: 0x34,
    CommandId.SEND_UPDATE_DATA: 0x34,
    CommandId.SEND_UPDATE_VMSA: 0x34,
    CommandId.RECEIVE_UPDATE_DATA: 0x34,
    CommandId.RECEIVE_UPDATE_VMSA: 0x34,
    CommandId.ATTESTATION: 0x24,
    CommandId.SEND_START: 0x44,
    CommandId.RECEIVE_START: 0x24,
    CommandId.DBG_DECRYPT: 0x1C,
    CommandId.DBG_ENCRYPT: 0x1C,
    CommandId.RING_BUFFER: 0x28,  # AF sev_mcmd_ring_buffer_t (COMMON_COMPILE_TIME_ASSERT 0x28)
}


def test_command_buffers_table() -> None:
    assert {cmd: cls.SIZE for cmd, cls in sev.COMMAND_BUFFERS.items()} == COMMAND_SIZES
    without = {
        CommandId.SHUTDOWN,
        CommandId.PLATFORM_RESET,
        CommandId.PEK_GEN,
        CommandId.PDH_GEN,
        CommandId.DF_FLUSH,
        CommandId.NOP,
    }
    assert sev.COMMANDS_WITHOUT_BUFFER == without
    assert not without & set(sev.COMMAND_BUFFERS)
    unmodelled = {CommandId.SWAP_OUT, CommandId.SWAP_IN}
    assert set(sev.COMMAND_BUFFERS) | without | unmodelled == LEGACY_COMMANDS


def test_platform_status_linux_flags_view() -> None:
    # Linux reads bytes 03..06 as one u32 "flags": owner is its bit 0, CONFIG_ES its bit 8.
    status = sev.PlatformStatus(
        api_major=1, api_minor=55, state=2, owner=sev.PlatformOwner.EXTERNAL,
        config=sev.PlatformConfig.ES, build=21, guest_count=3,
    )  # fmt: skip
    data = status.encode()
    assert data == bytes([1, 55, 2, 1, 1, 0, 0, 21, 3, 0, 0, 0])
    flags = int.from_bytes(data[3:7], "little")
    assert flags == sev.LINUX_STATUS_FLAGS_OWNER | sev.LINUX_STATUS_FLAGS_CONFIG_ES


def test_session_buffer_virtee_vector() -> None:
    # virtee/sev session test (src/session/mod.rs): Z = 0, nonce = 0, IV = 0, TEK = TIK = 0, policy 0.
    wrap_tk = bytes.fromhex("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
    wrap_mac = bytes.fromhex("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
    policy_mac = bytes.fromhex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
    blob = bytes(16) + wrap_tk + bytes(16) + wrap_mac + policy_mac
    session = sev.SessionBuf.decode(blob)
    assert (session.wrap_tk, session.wrap_mac, session.policy_mac) == (wrap_tk, wrap_mac, policy_mac)
    assert session.encode() == blob


@given(
    handle=st.integers(0, 2**32 - 1),
    hdr=st.integers(0, 2**64 - 1),
    guest=st.integers(0, 2**64 - 1),
    length=st.integers(0, 2**32 - 1),
)
def test_transport_round_trip(handle: int, hdr: int, guest: int, length: int) -> None:
    cmd = sev.TransportCmd(
        handle=handle, hdr_paddr=hdr, hdr_len=sev.HdrBuf.SIZE, guest_paddr=guest,
        guest_len=length, trans_paddr=hdr ^ guest, trans_len=length,
    )  # fmt: skip
    assert sev.TransportCmd.decode(cmd.encode()) == cmd


@given(mnonce=st.binary(min_size=16, max_size=16), digest=st.binary(min_size=32, max_size=32))
def test_report_round_trip(mnonce: bytes, digest: bytes) -> None:
    report = sev.LegacyAttestationReport(
        mnonce=mnonce, launch_digest=digest, policy=0x37, sig_usage=0x1002, sig_algo=2,
        sig1=bytes(range(144)),
    )  # fmt: skip
    assert sev.LegacyAttestationReport.decode(report.encode()) == report


def test_ring_buffer_layouts_match_amd_firmware_and_the_packed_forms() -> None:
    """AF sev_mcmd.h / sev_ring_buffer.h: the RING_BUFFER buffer, the 16-byte queue and status
    entries (4 KiB / 16 = 256 per page); the one-call packers the ring's users use equal them."""
    cmd = sev.RingBufferCmd(low_priority_cmd_ptr=0x1000, low_priority_status_ptr=0x2000,
                            high_priority_cmd_ptr=0x3000, high_priority_status_ptr=0x4000,
                            low_priority_queue_size=1, high_priority_queue_size=1, low_q_threshold=0x10,
                            high_q_threshold=0x20, int_on_empty=1)
    raw = cmd.encode()
    assert len(raw) == 0x28 and raw[0x20:0x22] == b"\x01\x01" and raw[0x22:0x28] == bytes.fromhex("100020000100")
    entry = sev.RingCmdEntry(cmd_id=0x41, cmd_flags=int(sev.RingCmdFlags.CONT_ON_ERROR), software_data=7,
                             cmd_buffer_ptr=0x1234_5000)
    assert entry.encode() == struct.pack("<HHIQ", 0x41, 2, 7, 0x1234_5000)
    assert sev.RingStatusEntry(status=0x11, error_stack=5).encode() == struct.pack("<H6xQ", 0x11, 5)
    with pytest.raises(LayoutError):
        sev.RingStatusEntry.decode(struct.pack("<HHIQ", 0, 1, 0, 0))  # reserved bytes must be zero
    t = sev.TransportCmd(handle=3, hdr_paddr=0x1000, hdr_len=0x34, guest_paddr=0x8000_0000_2000, guest_len=4096,
                         trans_paddr=0x3000, trans_len=4096)
    assert sev.TRANSPORT_PACK.pack(3, 0x1000, 0x34, 0x8000_0000_2000, 4096, 0x3000, 4096) == t.encode()
