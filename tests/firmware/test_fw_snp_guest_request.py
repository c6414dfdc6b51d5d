"""SNP_GUEST_REQUEST through the mailbox: reports from a launched guest that the owner's verifier accepts
against the emulated AMD chain, derived keys, and the host's attacks (replay, reorder, forgery, pages
in the wrong RMP state), each refused with its status and nothing changed."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fwkit import call
from snpkit import SCRATCH, SnpLaunch, firmware_page, reclaim, snp_machine

from sevemu.abi.commands import CommandId
from sevemu.abi.report import AttestationReport, KeyRsp, MsgType, ReportRsp, SigningKey
from sevemu.abi.snp import SnpConfigCmd, SnpConfigFlags, SnpGuestRequestCmd, SnpPageType
from sevemu.abi.status import Status
from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import AmdSnpRoot
from sevemu.firmware.snp import snp_state
from sevemu.owner.snpverify import Chain, SnpCheckError, SnpPolicy, verify_report
from sevemu.scenario import Machine

REQ = SCRATCH + 0x10000
RSP = SCRATCH + 0x20000


def _seal(key: bytes, seq: int, mtype: int, payload: bytes, vmpck: int = 0, version: int = 1) -> bytes:
    """A guest message as Linux's driver builds it (written here independently of the firmware)."""
    hdr = bytearray(0x60)
    struct.pack_into("<Q", hdr, 0x20, seq)
    struct.pack_into("<BBHBBH", hdr, 0x30, 1, 1, 0x60, mtype, version, len(payload))
    hdr[0x3C] = vmpck
    ct = AESGCM(key).encrypt(seq.to_bytes(8, "little") + bytes(4), payload, bytes(hdr[0x30:]))
    hdr[:16] = ct[-16:]
    return bytes(hdr) + ct[:-16]


def _unseal(key: bytes, page: bytes) -> tuple[int, int, bytes]:
    seq, = struct.unpack_from("<Q", page, 0x20)
    mtype, size = page[0x34], struct.unpack_from("<H", page, 0x36)[0]
    plain = AESGCM(key).decrypt(seq.to_bytes(8, "little") + bytes(4), page[0x60:0x60 + size] + page[:16],
                                page[0x30:0x60])
    return seq, mtype, plain


def _send(m: Machine, gctx: int, msg: bytes) -> tuple[int, bytes]:
    core = m.hv.core
    core.host_write(REQ, msg.ljust(0x1000, b"\0"))
    core.clflush_range(REQ, 0x1000)
    core.host_write(RSP, bytes(0x1000))  # so that "nothing written" shows
    core.clflush_range(RSP, 0x1000)
    firmware_page(m, RSP)
    status, _ = call(m, CommandId.SNP_GUEST_REQUEST, SnpGuestRequestCmd(gctx_paddr=gctx, req_paddr=REQ, res_paddr=RSP))
    reclaim(m, RSP)
    return status, core.host_read(RSP, 0x1000)


def _launched(generation: str = "milan") -> tuple[Machine, SnpLaunch]:
    m = snp_machine(generation, seed=f"guest-request-{generation}")
    lg = SnpLaunch(m)
    assert lg.start() == Status.SUCCESS
    lg.update(0, SnpPageType.NORMAL, b"guest code")
    lg.update(0x1000, SnpPageType.SECRETS)
    assert lg.finish(host_data=b"\x77" * 32) == Status.SUCCESS
    return m, lg


@pytest.fixture(scope="module")
def milan() -> tuple[Machine, SnpLaunch]:
    return _launched("milan")


def _report_req(data: bytes = b"\x42" * 64, vmpl: int = 0) -> bytes:
    return data + struct.pack("<II", vmpl, 0) + bytes(0x18)


def _root(m: Machine) -> tuple[AmdSnpRoot, FusedChip]:
    assert m.amd_root is not None
    return AmdSnpRoot.for_root(m.amd_root, None), FusedChip(m.firmware.profile.name, m.firmware.identity.chip_secret)


@pytest.mark.parametrize("generation", ["milan", "genoa", "turin"])
def test_report_verifies_against_the_emulated_chain(generation: str) -> None:
    m, lg = _launched(generation)
    g = snp_state(m.firmware).guests[lg.gctx]
    status, page = _send(m, lg.gctx, _seal(g.vmpck[0], 1, MsgType.REPORT_REQ, _report_req()))
    assert status == Status.SUCCESS
    seq, mtype, plain = _unseal(g.vmpck[0], page)
    assert (seq, mtype) == (2, MsgType.REPORT_RSP) and g.msg_count[0] == 2
    rsp = ReportRsp.decode(plain)
    assert rsp.status == 0 and rsp.report_size == 0x4A0
    report = rsp.report.encode()
    root, chip = _root(m)
    st = snp_state(m.firmware)
    chain = Chain(root.issue_vcek(chip, st.reported_tcb), root.ask, root.ark, root.crl())
    got = verify_report(report, chain, trusted=[root.ark_fingerprint()], policy=SnpPolicy(
        measurement=g.ld, report_data=b"\x42" * 64, host_data=b"\x77" * 32))
    assert got.report.measurement == g.ld != bytes(48)
    assert got.report.version == {"milan": 3, "genoa": 3, "turin": 5}[generation]
    assert got.report.report_id == g.report_id and got.report.launch_tcb == g.launch_tcb
    # the verifier is not a rubber stamp: another guest's measurement is refused
    with pytest.raises(SnpCheckError) as exc:
        verify_report(report, chain, trusted=[root.ark_fingerprint()], policy=SnpPolicy(measurement=bytes(48)))
    assert exc.value.check == "policy.measurement"


def test_replayed_reordered_forged_and_wrong_key_messages_are_refused(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    g = snp_state(m.firmware).guests[lg.gctx]
    start = list(g.msg_count)
    seq = start[0] + 1
    good = _seal(g.vmpck[0], seq, MsgType.REPORT_REQ, _report_req())
    forged = bytearray(good)
    forged[0x70] ^= 1
    for bad in (bytes(forged), _seal(g.vmpck[0], seq + 2, MsgType.REPORT_REQ, _report_req()),
                _seal(g.vmpck[1], seq, MsgType.REPORT_REQ, _report_req()),
                _seal(b"\x01" * 32, seq, MsgType.REPORT_REQ, _report_req()),
                _seal(g.vmpck[0], seq, MsgType.REPORT_REQ, _report_req(), version=2),
                _seal(g.vmpck[0], seq, MsgType.EXPORT_REQ, bytes(16)),
                _seal(g.vmpck[0], seq, MsgType.REPORT_REQ, _report_req()[:0x40])):
        status, page = _send(m, lg.gctx, bad)
        assert status == Status.INVALID_PARAM and page == bytes(0x1000)
        assert g.msg_count == start
    assert _send(m, lg.gctx, good)[0] == Status.SUCCESS
    assert _send(m, lg.gctx, good)[0] == Status.INVALID_PARAM  # replay
    assert g.msg_count[0] == start[0] + 2


def test_sequence_exhaustion_is_aead_oflow(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    g = snp_state(m.firmware).guests[lg.gctx]
    g.msg_count[3] = (1 << 64) - 2  # white box: 2^63 messages are beyond any test
    msg = _seal(g.vmpck[3], (1 << 64) - 1, MsgType.REPORT_REQ, _report_req(vmpl=3), vmpck=3)
    assert _send(m, lg.gctx, msg)[0] == Status.AEAD_OFLOW
    assert g.msg_count[3] == (1 << 64) - 2
    g.msg_count[3] = 0


def test_pages_in_the_wrong_rmp_state(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    g = snp_state(m.firmware).guests[lg.gctx]
    msg = _seal(g.vmpck[0], g.msg_count[0] + 1, MsgType.REPORT_REQ, _report_req())
    m.hv.core.host_write(REQ, msg.ljust(0x1000, b"\0"))
    m.hv.core.clflush_range(REQ, 0x1000)
    before = list(g.msg_count)
    # response page left a Hypervisor page: the firmware would be writing where the host can
    status, _ = call(m, CommandId.SNP_GUEST_REQUEST, SnpGuestRequestCmd(gctx_paddr=lg.gctx, req_paddr=REQ, res_paddr=RSP))
    assert status == Status.INVALID_PAGE_STATE
    # the response aimed at the guest's own private page: the host cannot make the firmware its deputy
    status, _ = call(m, CommandId.SNP_GUEST_REQUEST, SnpGuestRequestCmd(
        gctx_paddr=lg.gctx, req_paddr=REQ, res_paddr=lg.spa(0x1000)))
    assert status == Status.INVALID_PAGE_STATE
    # misaligned, outside DRAM, not a guest
    for cmd, want in ((SnpGuestRequestCmd(gctx_paddr=lg.gctx, req_paddr=REQ + 8, res_paddr=RSP), Status.INVALID_PARAM),
                      (SnpGuestRequestCmd(gctx_paddr=lg.gctx, req_paddr=REQ, res_paddr=1 << 45), Status.INVALID_ADDRESS),
                      (SnpGuestRequestCmd(gctx_paddr=RSP, req_paddr=REQ, res_paddr=RSP), Status.INVALID_GUEST)):
        assert call(m, CommandId.SNP_GUEST_REQUEST, cmd)[0] == want
    assert g.msg_count == before


def test_field_errors_answer_invalid_param_in_the_payload(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    g = snp_state(m.firmware).guests[lg.gctx]
    # VMPCK1 belongs to VMPL1: a VMPL0 report is not its to ask for
    seq = g.msg_count[1] + 1
    status, page = _send(m, lg.gctx, _seal(g.vmpck[1], seq, MsgType.REPORT_REQ, _report_req(vmpl=0), vmpck=1))
    assert status == Status.SUCCESS
    rsp = ReportRsp.decode(_unseal(g.vmpck[1], page)[2])
    assert rsp.status == Status.INVALID_PARAM and rsp.report.measurement == bytes(48)
    assert g.msg_count[1] == seq + 1  # answered: the number is used
    status, page = _send(m, lg.gctx, _seal(g.vmpck[1], seq + 2, MsgType.REPORT_REQ, _report_req(vmpl=2), vmpck=1))
    assert ReportRsp.decode(_unseal(g.vmpck[1], page)[2]).report.vmpl == 2


def _key_req(root: int = 0, fields: int = 0, vmpl: int = 0, svn: int = 0, tcb: int = 0) -> bytes:
    return struct.pack("<IIQIIQ", root, 0, fields, vmpl, svn, tcb)


def _key(m: Machine, gctx: int, req: bytes) -> KeyRsp:
    g = snp_state(m.firmware).guests[gctx]
    status, page = _send(m, gctx, _seal(g.vmpck[0], g.msg_count[0] + 1, MsgType.KEY_REQ, req))
    assert status == Status.SUCCESS
    _seq, mtype, plain = _unseal(g.vmpck[0], page)
    assert mtype == MsgType.KEY_RSP
    return KeyRsp.decode(plain)


def test_derived_keys_depend_on_exactly_the_selected_fields(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    st = snp_state(m.firmware)
    k0 = _key(m, lg.gctx, _key_req())
    assert k0.status == 0 and k0.derived_key != bytes(32)
    assert _key(m, lg.gctx, _key_req()).derived_key == k0.derived_key  # stable
    assert _key(m, lg.gctx, _key_req(root=1)).derived_key != k0.derived_key  # VMRK
    k_meas = _key(m, lg.gctx, _key_req(fields=1 << 3)).derived_key
    assert k_meas != k0.derived_key
    assert _key(m, lg.gctx, _key_req(vmpl=1)).derived_key != k0.derived_key
    tcb = _key(m, lg.gctx, _key_req(fields=1 << 5, tcb=st.committed_tcb))
    assert tcb.status == 0
    # refused: TCB above the committed one, GUEST_SVN above the guest's, reserved bits
    assert _key(m, lg.gctx, _key_req(fields=1 << 5, tcb=st.committed_tcb + (1 << 56))).status == Status.INVALID_PARAM
    assert _key(m, lg.gctx, _key_req(fields=1 << 4, svn=1)).status == Status.INVALID_PARAM
    assert _key(m, lg.gctx, _key_req(fields=1 << 9)).status == Status.INVALID_PARAM
    # an unselected field's value is ignored
    assert _key(m, lg.gctx, _key_req(svn=0, tcb=0)).derived_key == k0.derived_key


def test_masked_chip_id_and_key(milan: tuple[Machine, SnpLaunch]) -> None:
    m, lg = milan
    st = snp_state(m.firmware)
    assert call(m, CommandId.SNP_CONFIG, SnpConfigCmd(reported_tcb=0, flags=SnpConfigFlags(
        mask_chip_id=True, mask_chip_key=True)))[0] == Status.SUCCESS
    try:
        g = st.guests[lg.gctx]
        status, page = _send(m, lg.gctx, _seal(g.vmpck[0], g.msg_count[0] + 1, MsgType.REPORT_REQ, _report_req()))
        assert status == Status.SUCCESS
        rep = AttestationReport.decode(ReportRsp.decode(_unseal(g.vmpck[0], page)[2]).report.encode())
        assert rep.chip_id == bytes(64) and rep.signer_info.signing_key == SigningKey.NONE
        assert rep.signer_info.mask_chip_key and rep.signature.encode() == bytes(0x200)
    finally:
        call(m, CommandId.SNP_CONFIG, SnpConfigCmd())


def test_fuzzed_messages_answer_a_status_and_change_nothing(milan: tuple[Machine, SnpLaunch]) -> None:
    import random

    m, lg = milan
    g = snp_state(m.firmware).guests[lg.gctx]
    rnd = random.Random(12)
    good = _seal(g.vmpck[0], g.msg_count[0] + 1, MsgType.REPORT_REQ, _report_req())
    known = {int(s) for s in Status}
    for i in range(150):
        msg = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            pos = rnd.randrange(0x60 + 0x60) if i % 3 else rnd.randrange(0x60)
            msg[pos] = rnd.randrange(256)
        if bytes(msg) == good:
            continue
        before = list(g.msg_count)
        status, page = _send(m, lg.gctx, bytes(msg))
        assert status in known and status != Status.SUCCESS
        assert g.msg_count == before and page == bytes(0x1000)
    # header fields that decrypt but break a rule: a header with AAD changed still fails the tag
    assert _send(m, lg.gctx, good)[0] == Status.SUCCESS
