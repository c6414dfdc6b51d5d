"""Owner sessions, LAUNCH_SECRET, ATTESTATION and DBG_* through the real mailbox path.

Every refusal names its status and checks that neither the firmware's state nor guest memory (DRAM)
changed.  Status choices follow AMD's firmware source (amd/AMD-ASPFW, see the module docstrings of
``sevemu.firmware.sev.session`` / ``launch`` / ``attest`` / ``debug``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fwkit import call, init, ok, put
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.abi.certs import SEV_CERT_SIZE, EcCurve, KeyUsage, SevCertLayout, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy, compose_policy
from sevemu.abi.sev import (
    ActivateCmd,
    AttestationCmd,
    DbgCmd,
    GuestStatusCmd,
    HandleCmd,
    HdrBuf,
    InitCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    LegacyAttestationReport,
    MeasureBuf,
    SessionBuf,
    TransportCmd,
)
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.crypto import ecc
from sevemu.crypto.transport import TransportKeys, measure_mac, seal_session
from sevemu.errors import InputError
from sevemu.firmware.identity import PlatformIdentity
from sevemu.hw.profiles import NAPLES, CpuProfile
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.report import ReportSignatureError, verify_attestation_report
from sevemu.owner.session import LaunchSession, MeasuredLaunch, godh_certificate
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20
GiB = 1 << 30
CERT_SPA = 0x3000_0000
SESSION_SPA = 0x3000_1000
HDR_SPA = 0x3000_2000
TRANS_SPA = 0x3000_3000  # up to 0x5000 bytes
MEASURE_SPA = 0x3001_0000
REPORT_SPA = 0x3001_1000
HOST_SPA = 0x3002_0000  # DBG bounce
IMAGE_BASE = 0x4000_0000  # guest n's image at IMAGE_BASE + n MiB
IMAGE = bytes((i * 7 + 3) & 0xFF for i in range(4096))
SECRET = b"the owner's disk key: 0123456789abcdef".ljust(48, b"\0")
OUTSIDE = 1 << 40


# ---- platform -----------------------------------------------------------------------
def provision(m: Machine) -> PlatformIdentity:
    """The firmware's identity (the scenario manufactures and provisions every machine)."""
    return m.firmware.identity


def machine(generation: str | CpuProfile = "milan", seed: str = "fw-session") -> Machine:
    m = build_machine(generation, seed=seed, dram_size=8 * GiB, init=False)
    init(m, InitCmd())
    provision(m)
    return m


@pytest.fixture
def m() -> Machine:
    return machine()


# ---- mailbox helpers -------------------------------------------------------------------------






def cbit(m: Machine) -> int:
    return m.profile.cbit_mask


def snapshot(m: Machine) -> object:
    fw = m.firmware
    return (fw.state, fw.next_handle, dict(fw.asid_owner),
            {h: (g.state, g.asid, g.policy, g.vek, g.tek, g.tik, g.measure, g.measured_ld, g.ld.digest())
             for h, g in fw.guests.items()})


def refused(m: Machine, cmd: CommandId, buf: Any, want: Status, *, dram: tuple[int, int] | None = None) -> None:
    """``cmd`` answers ``want`` and changes neither the firmware state nor DRAM at ``dram``."""
    before = snapshot(m)
    mem = m.soc.dram.read(*dram) if dram else b""
    status, _ = call(m, cmd, buf)
    assert Status(status) == want, f"{cmd.name}: {Status(status).name}, expected {want.name}"
    assert snapshot(m) == before
    if dram:
        assert m.soc.dram.read(*dram) == mem
    assert not m.firmware.internal_errors


def guest_memory(m: Machine, handle: int, spa: int, length: int) -> bytes:
    """Test-only look at guest memory as the guest's key decrypts DRAM (no firmware involved)."""
    g = m.firmware.guests[handle]
    lo = spa & ~63
    hi = (spa + length + 63) & ~63
    return m.soc.mc.read(lo, hi - lo, g.asid, True)[spa - lo : spa - lo + length]


# ---- launches --------------------------------------------------------------------------------
def pdh_public(m: Machine) -> ec.EllipticCurvePublicKey:
    key = provision(m).pdh_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def pek_public(m: Machine) -> ec.EllipticCurvePublicKey:
    key = provision(m).pek_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def start_cmd(m: Machine, sess: LaunchSession | None, policy: int, *, cert: bytes | None = None,
              blob: bytes | None = None, handle: int = 0) -> LaunchStartCmd:
    if sess is None and cert is None:
        return LaunchStartCmd(handle=handle, policy=policy)
    cert = sess.godh_cert_blob if cert is None and sess is not None else cert
    blob = sess.session_blob if blob is None and sess is not None else blob
    assert cert is not None and blob is not None
    put(m, CERT_SPA, cert)
    put(m, SESSION_SPA, blob)
    return LaunchStartCmd(handle=handle, policy=policy, dh_cert_paddr=CERT_SPA, dh_cert_len=len(cert),
                          session_paddr=SESSION_SPA, session_len=len(blob))


@dataclass
class Launched:
    handle: int
    asid: int
    image_spa: int
    session: LaunchSession | None
    measured: MeasuredLaunch | None
    blob: bytes


def launch(m: Machine, n: int = 0, policy: int = 0, *, sess: LaunchSession | None = None,
           owner: bool = True, activate: bool = True, image: bytes = IMAGE) -> Launched:
    """LAUNCH_START (with an owner session unless ``owner`` is False) .. LAUNCH_MEASURE of guest ``n``."""
    if owner and sess is None:
        sess = LaunchSession.create(pdh_public(m), policy)
    handle = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, start_cmd(m, sess, policy))).handle
    asid = m.profile.min_sev_asid + n
    spa = IMAGE_BASE + n * MiB
    if activate:
        ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=asid))
        put(m, spa, image)
        ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=spa, len=len(image)))
    ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=MEASURE_SPA, len=MeasureBuf.SIZE))
    blob = m.hv.core.host_read(MEASURE_SPA, MeasureBuf.SIZE)
    measured = None
    if sess is not None:
        p = m.profile
        ld = expected_launch_digest([image] if activate else [])
        measured = sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                           expected_ld=ld)
    return Launched(handle, asid if activate else 0, spa, sess, measured, blob)


def secret_cmd(m: Machine, g: Launched, header: bytes, trans: bytes, *, offset: int = 0x100,
               guest_len: int | None = None, paddr: int | None = None) -> TransportCmd:
    put(m, HDR_SPA, header)
    put(m, TRANS_SPA, trans)
    return TransportCmd(handle=g.handle, hdr_paddr=HDR_SPA, hdr_len=len(header),
                        guest_paddr=(g.image_spa + offset) | cbit(m) if paddr is None else paddr,
                        guest_len=len(trans) if guest_len is None else guest_len,
                        trans_paddr=TRANS_SPA, trans_len=len(trans))


# ==== LAUNCH_START with an owner session ==========================================================
def test_session_delivers_owner_transport_keys(m: Machine) -> None:
    g = launch(m)
    ctx = m.firmware.guests[g.handle]
    assert g.session is not None and g.measured is not None
    assert (ctx.tek, ctx.tik) == (g.session.keys.tek, g.session.keys.tik)
    assert ctx.session and ctx.state == GuestState.LSECRET
    # the owner checked MEASURE against the image it expects; the firmware fixed the same digest
    assert ctx.measured_ld == hashlib.sha256(IMAGE).digest() == g.measured.launch_digest


def test_launch_without_session_has_zero_transport_keys(m: Machine) -> None:
    """AMD firmware zeroes a new guest's channel and only a session fills it: anyone can compute
    (and forge) the MEASURE of a launch without a session."""
    g = launch(m, owner=False)
    ctx = m.firmware.guests[g.handle]
    assert ctx.tek == ctx.tik == bytes(16) and not ctx.session
    out = MeasureBuf.decode(g.blob)
    p = m.profile
    assert out.measure == measure_mac(bytes(16), api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                      policy=0, launch_digest=hashlib.sha256(IMAGE).digest(), mnonce=out.mnonce)


def test_godh_certificate_layout() -> None:
    key = ecc.derive_private_key(b"g" * 32, b"godh")
    raw = godh_certificate(key.public_key()).encode()
    body = SevCertLayout.decode(raw)
    assert len(raw) == SEV_CERT_SIZE
    assert (body.version, body.pub_key_usage, body.pub_key_algo) == (1, KeyUsage.PDH, SigAlgo.ECDH_SHA256)
    assert (body.sig1_usage, body.sig1_algo, body.sig2_usage, body.sig2_algo) == (0x1000, 0, 0x1000, 0)
    assert int.from_bytes(body.pub_key[:4], "little") == EcCurve.P384
    with pytest.raises(InputError):  # a GODH key is P-384
        godh_certificate(ec.generate_private_key(ec.SECP256R1()).public_key())


def _tamper_session(field: str) -> Callable[[bytes], bytes]:
    off = SessionBuf.offset_of(field)

    def f(blob: bytes) -> bytes:
        b = bytearray(blob)
        b[off] ^= 0x01
        return bytes(b)

    return f


def _cert_body(mutate: Callable[[dict[str, Any]], None]) -> Callable[[LaunchSession], bytes]:
    def f(sess: LaunchSession) -> bytes:
        fields = {f.name: getattr(SevCertLayout.decode(sess.godh_cert_blob), f.name)
                  for f in dataclasses.fields(SevCertLayout)}
        mutate(fields)
        return SevCertLayout(**fields).encode()

    return f


def _set(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(kw)


def _p256_key(d: dict[str, Any]) -> None:
    q = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    d["pub_key"] = (int(EcCurve.P256).to_bytes(4, "little") + ecc.int_to_le(q.x) + ecc.int_to_le(q.y)).ljust(0x404, b"\0")


def _off_curve(d: dict[str, Any]) -> None:
    pk = bytearray(d["pub_key"])
    pk[4] ^= 1  # qx changes, qy stays: not a point of P-384
    d["pub_key"] = bytes(pk)


def _key_rmbz(d: dict[str, Any]) -> None:
    pk = bytearray(d["pub_key"])
    pk[0x100] = 1
    d["pub_key"] = bytes(pk)


def _reserved(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[6] = 1
    return bytes(b)


CERT_CASES: dict[str, Callable[[LaunchSession], bytes]] = {
    "usage PEK": _cert_body(_set(pub_key_usage=int(KeyUsage.PEK))),
    "usage OCA": _cert_body(_set(pub_key_usage=int(KeyUsage.OCA))),
    "algo ECDH_SHA384": _cert_body(_set(pub_key_algo=int(SigAlgo.ECDH_SHA384))),
    "algo ECDSA_SHA256": _cert_body(_set(pub_key_algo=int(SigAlgo.ECDSA_SHA256))),
    "version 2": _cert_body(_set(version=2)),
    "P-256 key": _cert_body(_p256_key),
    "point off the curve": _cert_body(_off_curve),
    "non-zero key padding": _cert_body(_key_rmbz),
    "reserved bytes": lambda s: _reserved(s.godh_cert_blob),
    "all zeros": lambda s: bytes(SEV_CERT_SIZE),
}


@pytest.mark.parametrize("case", sorted(CERT_CASES))
def test_bad_godh_certificate_is_invalid_certificate(m: Machine, case: str) -> None:
    sess = LaunchSession.create(pdh_public(m), 0)
    refused(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0, cert=CERT_CASES[case](sess)), Status.INVALID_CERTIFICATE)


def test_godh_signature_slots_are_not_checked(m: Machine) -> None:
    """sev-tool self-signs the GODH (slot 1 usage PEK), virtee/sev leaves it empty; AMD firmware reads
    neither, nor garbage there."""
    godh = ecc.derive_private_key(b"o" * 32, b"godh")
    sess = LaunchSession.create(pdh_public(m), 0, godh_private=godh)
    selfsigned = sess.godh_cert().sign_with(godh, KeyUsage.PEK, SigAlgo.ECDSA_SHA256).encode()
    garbage = bytearray(sess.godh_cert_blob)
    garbage[0x414:] = bytes((i * 13 + 1) & 0xFF for i in range(SEV_CERT_SIZE - 0x414))
    for cert in (selfsigned, bytes(garbage)):
        out = ok(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0, cert=cert))
        ctx = m.firmware.guests[LaunchStartCmd.decode(out).handle]
        assert ctx.tik == sess.keys.tik


@pytest.mark.parametrize("field", ["nonce", "wrap_tk", "wrap_iv", "wrap_mac", "policy_mac"])
def test_tampered_session_is_bad_measurement(m: Machine, field: str) -> None:
    sess = LaunchSession.create(pdh_public(m), 0)
    blob = _tamper_session(field)(sess.session_blob)
    refused(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0, blob=blob), Status.BAD_MEASUREMENT)


def test_session_policy_binding(m: Machine) -> None:
    """The hypervisor cannot launch with a weaker policy than the owner sealed (policy_mac)."""
    sess = LaunchSession.create(pdh_public(m), int(GuestPolicy.NODBG | GuestPolicy.NOKS))
    for policy in (0, int(GuestPolicy.NOKS), int(GuestPolicy.NODBG)):
        refused(m, CommandId.LAUNCH_START, start_cmd(m, sess, policy), Status.BAD_MEASUREMENT)
    ok(m, CommandId.LAUNCH_START, start_cmd(m, sess, sess.policy))


def test_session_for_another_platform_is_bad_measurement(m: Machine) -> None:
    other = ecc.derive_private_key(b"another platform's pdh key 00000", b"pdh")
    sess = LaunchSession.create(other.public_key(), 0)
    refused(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0), Status.BAD_MEASUREMENT)


def test_session_lengths_and_addresses(m: Machine) -> None:
    sess = LaunchSession.create(pdh_public(m), 0)
    good = start_cmd(m, sess, 0)
    for bad, want in [
        (dataclasses.replace(good, session_len=0x7F), Status.INVALID_LENGTH),
        (dataclasses.replace(good, session_len=0x81), Status.INVALID_LENGTH),
        (dataclasses.replace(good, session_len=0), Status.INVALID_LENGTH),
        (dataclasses.replace(good, dh_cert_len=0x823), Status.INVALID_LENGTH),
        (dataclasses.replace(good, dh_cert_len=0), Status.INVALID_LENGTH),
        (dataclasses.replace(good, session_paddr=OUTSIDE), Status.INVALID_ADDRESS),
        (dataclasses.replace(good, dh_cert_paddr=OUTSIDE), Status.INVALID_ADDRESS),
    ]:
        refused(m, CommandId.LAUNCH_START, bad, want)
    ok(m, CommandId.LAUNCH_START, good)


def test_session_policy_checks_after_the_mac(m: Machine) -> None:
    """A correctly sealed policy the platform cannot honour: POLICY_FAILURE (API, reserved bits);
    SEV-ES without SEV-ES INIT: UNSUPPORTED (AMD sev_guest_verify_policy / launch_start)."""
    godh = ecc.derive_private_key(b"k" * 32, b"godh")
    cert = godh_certificate(godh.public_key()).encode()
    keys = TransportKeys(tek=b"T" * 16, tik=b"I" * 16)
    for policy, want in [(compose_policy(0, api_major=9), Status.POLICY_FAILURE),
                         (0x100, Status.POLICY_FAILURE),  # reserved bit 8 (the owner API refuses it)
                         (int(GuestPolicy.ES), Status.UNSUPPORTED)]:
        blob = seal_session(ecc.ecdh(godh, pdh_public(m)), bytes(16), bytes(16), keys, policy).encode()
        refused(m, CommandId.LAUNCH_START, start_cmd(m, None, policy, cert=cert, blob=blob), want)


def test_key_sharing_needs_identical_policies(m: Machine) -> None:
    a = launch(m, 0, policy=0, owner=False, activate=False)
    refused(m, CommandId.LAUNCH_START, LaunchStartCmd(handle=a.handle, policy=int(GuestPolicy.NODBG)),
            Status.POLICY_FAILURE)
    out = ok(m, CommandId.LAUNCH_START, LaunchStartCmd(handle=a.handle, policy=0))
    assert m.firmware.guests[LaunchStartCmd.decode(out).handle].vek == m.firmware.guests[a.handle].vek


# ==== LAUNCH_SECRET ===============================================================================
def test_launch_secret_lands_encrypted_for_the_guest_only(m: Machine) -> None:
    g = launch(m)
    assert g.measured is not None
    pkt = g.measured.launch_secret_raw(SECRET)
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans, offset=0x100))
    spa = g.image_spa + 0x100
    assert guest_memory(m, g.handle, spa, len(SECRET)) == SECRET
    assert m.soc.dram.read(spa, len(SECRET)) != SECRET
    assert m.hv.core.host_read(spa, len(SECRET)) != SECRET  # the host sees ciphertext
    # the rest of the measured image is intact
    assert guest_memory(m, g.handle, g.image_spa, 0x100) == IMAGE[:0x100]
    assert guest_memory(m, g.handle, spa + len(SECRET), 64) == IMAGE[0x100 + len(SECRET) : 0x100 + len(SECRET) + 64]
    # several secrets may be injected while LSECRET, then LAUNCH_FINISH closes the channel
    pkt2 = g.measured.launch_secret_raw(SECRET[::-1])
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt2.header_bytes, pkt2.trans, offset=0x800))
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=g.handle))
    ctx = m.firmware.guests[g.handle]
    assert ctx.tek == ctx.tik == bytes(16) and ctx.measure == b""
    refused(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans), Status.INVALID_GUEST_STATE)


def test_launch_secret_evicts_dirty_host_lines(m: Machine) -> None:
    """A dirty host copy of the region (the hypervisor skipped CLFLUSH) must not overwrite the secret
    later: the firmware writes it back and drops it first (AMD's CSF-698 dummy reads)."""
    g = launch(m)
    assert g.measured is not None
    spa = g.image_spa + 0x200
    m.hv.core.host_write(spa, b"\xee" * 64)  # dirty, not flushed
    pkt = g.measured.launch_secret_raw(SECRET)
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans, offset=0x200))
    m.soc.wbinvd_all()
    assert guest_memory(m, g.handle, spa, len(SECRET)) == SECRET


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x80
    return bytes(b)


def test_launch_secret_refusals(m: Machine) -> None:
    g = launch(m, 0)
    other = launch(m, 1)
    assert g.measured is not None and other.measured is not None
    pkt = g.measured.launch_secret_raw(SECRET)
    hdr, trans = pkt.header_bytes, pkt.trans
    region = (g.image_spa, 4096)
    compressed = g.measured.launch_secret_raw(SECRET, flags=1)
    for_other = other.measured.launch_secret_raw(SECRET)
    cases: list[tuple[str, Callable[[], TransportCmd], Status]] = [
        ("header flags", lambda: secret_cmd(m, g, _flip(hdr, HdrBuf.offset_of("flags")), trans), Status.BAD_MEASUREMENT),
        ("header iv", lambda: secret_cmd(m, g, _flip(hdr, HdrBuf.offset_of("iv")), trans), Status.BAD_MEASUREMENT),
        ("header mac", lambda: secret_cmd(m, g, _flip(hdr, HdrBuf.offset_of("mac")), trans), Status.BAD_MEASUREMENT),
        ("trans", lambda: secret_cmd(m, g, hdr, _flip(trans, 5)), Status.BAD_MEASUREMENT),
        ("another guest's TIK", lambda: secret_cmd(m, g, for_other.header_bytes, for_other.trans), Status.BAD_MEASUREMENT),
        ("compressed", lambda: secret_cmd(m, g, compressed.header_bytes, compressed.trans), Status.UNSUPPORTED),
        ("hdr_len 0x33", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), hdr_len=0x33), Status.INVALID_LENGTH),
        ("hdr_len 0x40", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), hdr_len=0x40), Status.INVALID_LENGTH),
        ("guest_len != trans_len", lambda: secret_cmd(m, g, hdr, trans, guest_len=len(trans) + 16), Status.INVALID_LENGTH),
        ("guest_len 0", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), guest_len=0, trans_len=0),
         Status.INVALID_LENGTH),
        ("guest_len 8", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), guest_len=8, trans_len=8),
         Status.INVALID_LENGTH),
        ("guest_len > 20 KiB", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), guest_len=0x5010, trans_len=0x5010),
         Status.INVALID_LENGTH),
        ("guest_paddr unaligned", lambda: secret_cmd(m, g, hdr, trans, offset=0x108), Status.INVALID_ADDRESS),
        ("guest_paddr outside DRAM", lambda: secret_cmd(m, g, hdr, trans, paddr=OUTSIDE), Status.INVALID_ADDRESS),
        ("hdr outside DRAM", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), hdr_paddr=OUTSIDE),
         Status.INVALID_ADDRESS),
        ("trans outside DRAM", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), trans_paddr=OUTSIDE),
         Status.INVALID_ADDRESS),
        ("unknown handle", lambda: dataclasses.replace(secret_cmd(m, g, hdr, trans), handle=77), Status.INVALID_GUEST),
    ]
    for name, make, want in cases:
        try:
            refused(m, CommandId.LAUNCH_SECRET, make(), want, dram=region)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, hdr, trans))


def test_launch_secret_of_the_largest_length_is_accepted(m: Machine) -> None:
    """LAUNCH_SECRET takes up to 20 KiB (kills the mutant that refuses exactly the limit)."""
    from sevemu.firmware.sev.launch import LAUNCH_SECRET_MAX_LEN

    g = launch(m, 0)
    assert g.measured is not None
    big = bytes(range(256)) * (LAUNCH_SECRET_MAX_LEN // 256)
    pkt = g.measured.launch_secret_raw(big)
    assert len(pkt.trans) == LAUNCH_SECRET_MAX_LEN
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans, offset=0))


def test_launch_secret_bound_to_the_measured_launch(m: Machine) -> None:
    """Replaying the owner's session blobs for a second launch gives the same TEK/TIK but another
    MNONCE, so another MEASURE: a secret released for the first launch is refused by the second."""
    first = launch(m, 0)
    assert first.session is not None and first.measured is not None
    second = launch(m, 1, sess=first.session)
    assert m.firmware.guests[second.handle].tik == m.firmware.guests[first.handle].tik
    stale = first.measured.launch_secret_raw(SECRET)
    refused(m, CommandId.LAUNCH_SECRET, secret_cmd(m, second, stale.header_bytes, stale.trans),
            Status.BAD_MEASUREMENT, dram=(second.image_spa, 4096))


def test_launch_secret_state_and_activation(m: Machine) -> None:
    g = launch(m, 0, activate=False)  # measured without ever being activated
    assert g.measured is not None
    pkt = g.measured.launch_secret_raw(SECRET)
    g = dataclasses.replace(g, image_spa=IMAGE_BASE)
    refused(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans), Status.INACTIVE)
    # a guest still in LUPDATE
    sess = LaunchSession.create(pdh_public(m), 0)
    h = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0))).handle
    refused(m, CommandId.LAUNCH_SECRET, dataclasses.replace(secret_cmd(m, g, pkt.header_bytes, pkt.trans), handle=h),
            Status.INVALID_GUEST_STATE)


@pytest.mark.parametrize("generation", ["naples", "rome", "milan", "genoa"])
def test_launch_secret_partial_line_keeps_neighbours(generation: str) -> None:
    """16-byte granule on every generation; on AES-XTS ones the firmware read-modify-writes the
    64-byte data unit, leaving the rest of the line (measured image bytes) intact."""
    m = machine(generation)
    g = launch(m)
    assert g.measured is not None
    secret = bytes(range(32))
    pkt = g.measured.launch_secret_raw(secret)
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans, offset=0x110))
    want = IMAGE[:0x110] + secret + IMAGE[0x130:]
    assert guest_memory(m, g.handle, g.image_spa, 4096) == want
    assert not m.firmware.internal_errors


def test_api_before_0_17_has_no_measure_terms() -> None:
    """Firmware older than API 0.17: no 0x04/API/build prefix in MEASURE, no MEASURE in packet MACs."""
    old = dataclasses.replace(NAPLES, api_minor=16)
    m = machine(old)
    g = launch(m)  # the owner verifies MEASURE for API 0.16
    assert g.measured is not None
    pkt = g.measured.launch_secret_raw(SECRET)
    ok(m, CommandId.LAUNCH_SECRET, secret_cmd(m, g, pkt.header_bytes, pkt.trans))
    assert guest_memory(m, g.handle, g.image_spa + 0x100, len(SECRET)) == SECRET


# ==== ATTESTATION =================================================================================
def attest(m: Machine, handle: int, mnonce: bytes, length: int = LegacyAttestationReport.SIZE,
           paddr: int = REPORT_SPA) -> tuple[int, AttestationCmd]:
    status, out = call(m, CommandId.ATTESTATION, AttestationCmd(handle=handle, paddr=paddr, mnonce=mnonce,
                                                                len=length))
    return status, AttestationCmd.decode(out)


def test_attestation_report_verifies_with_the_pek(m: Machine) -> None:
    g = launch(m, policy=int(GuestPolicy.NOKS))
    mnonce = bytes(range(16))
    # length query
    status, cmd = attest(m, g.handle, mnonce, length=0)
    assert status == Status.INVALID_LENGTH and cmd.len == LegacyAttestationReport.SIZE
    for state in (GuestState.LSECRET, GuestState.RUNNING):
        assert m.firmware.guests[g.handle].state == state
        status, cmd = attest(m, g.handle, mnonce)
        assert status == Status.SUCCESS, state.name
        assert cmd.len == LegacyAttestationReport.SIZE
        raw = m.hv.core.host_read(REPORT_SPA, LegacyAttestationReport.SIZE)
        rep = verify_attestation_report(raw, pek_public(m), mnonce=mnonce, launch_digest=hashlib.sha256(IMAGE).digest(),
                                        policy=int(GuestPolicy.NOKS))
        assert (rep.sig_usage, rep.sig_algo) == (KeyUsage.PEK, SigAlgo.ECDSA_SHA256)
        with pytest.raises(ReportSignatureError):
            verify_attestation_report(_flip(raw, 0x20), pek_public(m))
        if state == GuestState.LSECRET:
            ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=g.handle))
    # the digest outlives LAUNCH_FINISH (the running hash is not what is reported)
    assert m.firmware.guests[g.handle].measured_ld == hashlib.sha256(IMAGE).digest()


def test_attestation_refusals(m: Machine) -> None:
    sess = LaunchSession.create(pdh_public(m), 0)
    h = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, start_cmd(m, sess, 0))).handle
    for handle, length, paddr, want in [
        (h, LegacyAttestationReport.SIZE, REPORT_SPA, Status.INVALID_GUEST_STATE),  # LUPDATE
        (99, LegacyAttestationReport.SIZE, REPORT_SPA, Status.INVALID_GUEST),
    ]:
        before = m.soc.dram.read(REPORT_SPA, 0x100)
        refused(m, CommandId.ATTESTATION, AttestationCmd(handle=handle, paddr=paddr, len=length), want)
        assert m.soc.dram.read(REPORT_SPA, 0x100) == before
    g = launch(m, 1)
    refused(m, CommandId.ATTESTATION, AttestationCmd(handle=g.handle, paddr=OUTSIDE, len=0xD0), Status.INVALID_ADDRESS)
    status, cmd = attest(m, g.handle, bytes(16), length=0xCF)
    assert status == Status.INVALID_LENGTH and cmd.len == 0xD0


# ==== DBG_DECRYPT / DBG_ENCRYPT ===================================================================
def dbg(m: Machine, cmd: CommandId, handle: int, src: int, dst: int, length: int) -> int:
    status, _ = call(m, cmd, DbgCmd(handle=handle, src_paddr=src, dst_paddr=dst, len=length))
    return status


def test_dbg_decrypt_and_encrypt(m: Machine) -> None:
    g = launch(m, owner=False)
    src = g.image_spa | cbit(m)
    assert dbg(m, CommandId.DBG_DECRYPT, g.handle, src, HOST_SPA, 4096) == Status.SUCCESS
    assert m.hv.core.host_read(HOST_SPA, 4096) == IMAGE  # LSECRET: no state is required
    # DBG_ENCRYPT 48 bytes at a 16-byte (not line) aligned guest address, then read back
    put(m, HOST_SPA, SECRET)
    assert dbg(m, CommandId.DBG_ENCRYPT, g.handle, HOST_SPA, src + 0x210, len(SECRET)) == Status.SUCCESS
    assert guest_memory(m, g.handle, g.image_spa, 4096) == IMAGE[:0x210] + SECRET + IMAGE[0x210 + len(SECRET):]
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=g.handle))
    assert dbg(m, CommandId.DBG_DECRYPT, g.handle, src + 0x200, HOST_SPA + 0x1000, 0x40) == Status.SUCCESS
    assert m.hv.core.host_read(HOST_SPA + 0x1000, 0x40) == (IMAGE[:0x210] + SECRET + IMAGE[0x240:])[0x200:0x240]


def test_dbg_refusals(m: Machine) -> None:
    nodbg = launch(m, 0, policy=int(GuestPolicy.NODBG), owner=False)
    g = launch(m, 1, owner=False)
    inactive = launch(m, 2, owner=False, activate=False)
    src = g.image_spa
    for cmd in (CommandId.DBG_DECRYPT, CommandId.DBG_ENCRYPT):
        for handle, s, d, n, want in [
            (nodbg.handle, nodbg.image_spa, HOST_SPA, 64, Status.POLICY_FAILURE),
            (g.handle, src + 8, HOST_SPA, 64, Status.INVALID_ADDRESS),
            (g.handle, src, HOST_SPA + 4, 64, Status.INVALID_ADDRESS),
            (g.handle, src, HOST_SPA, 24, Status.INVALID_LENGTH),
            (g.handle, src, HOST_SPA, 0, Status.INVALID_LENGTH),
            (77, src, HOST_SPA, 64, Status.INVALID_GUEST),
            (inactive.handle, IMAGE_BASE, HOST_SPA, 64, Status.INACTIVE),
            (g.handle, OUTSIDE, HOST_SPA, 64, Status.INVALID_ADDRESS),
            (g.handle, src, OUTSIDE, 64, Status.INVALID_ADDRESS),
        ]:
            if cmd is CommandId.DBG_ENCRYPT:
                s, d = d, s  # host source, guest destination
            refused(m, cmd, DbgCmd(handle=handle, src_paddr=s, dst_paddr=d, len=n), want, dram=(g.image_spa, 4096))
            refused(m, cmd, DbgCmd(handle=handle, src_paddr=s, dst_paddr=d, len=n), want, dram=(HOST_SPA, 4096))


def test_dbg_sees_dram_not_the_guests_cache(m: Machine) -> None:
    """The firmware reads DRAM: a guest store still in the cache (dirty line tagged with its ASID) is
    invisible to DBG_DECRYPT until the lines are written back (the hypervisor flushes first)."""
    g = launch(m, owner=False)
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=g.handle))
    m.soc.cache.write(g.asid, True, g.image_spa, b"\x42" * 64)  # what a guest store leaves behind
    assert dbg(m, CommandId.DBG_DECRYPT, g.handle, g.image_spa, HOST_SPA, 64) == Status.SUCCESS
    assert m.hv.core.host_read(HOST_SPA, 64) == IMAGE[:64]  # stale: DRAM
    m.soc.wbinvd_all()
    assert dbg(m, CommandId.DBG_DECRYPT, g.handle, g.image_spa, HOST_SPA, 64) == Status.SUCCESS
    assert m.hv.core.host_read(HOST_SPA, 64) == b"\x42" * 64


def test_policy_bits_recorded_for_later_commands(m: Machine) -> None:
    """NOSEND / DOMAIN / SEV are not checked at launch; they are recorded for SEND_START."""
    policy = int(GuestPolicy.NOSEND | GuestPolicy.DOMAIN | GuestPolicy.SEV)
    g = launch(m, policy=policy)
    st = GuestStatusCmd.decode(ok(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=g.handle)))
    assert (st.state, st.policy, st.asid) == (GuestState.LSECRET, policy, g.asid)
    ctx = m.firmware.guests[g.handle]
    assert ctx.nosend and ctx.domain_only and ctx.sev_only and not ctx.nodbg and not ctx.noks


# ==== property: 16-byte granular guest writes on every cipher equal an ideal memory ==============
_MACHINES: dict[str, tuple[Machine, Launched, bytearray]] = {}


def _debug_guest(generation: str) -> tuple[Machine, Launched, bytearray]:
    if generation not in _MACHINES:
        mach = machine(generation, seed=f"dbg-prop-{generation}")
        g = launch(mach, owner=False)
        _MACHINES[generation] = (mach, g, bytearray(IMAGE))
    return _MACHINES[generation]


@pytest.mark.parametrize("generation", ["naples", "milan", "genoa"])
@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_dbg_writes_match_ideal_memory(generation: str, data: st.DataObject) -> None:
    """DBG_ENCRYPT at any 16-byte granule (read-modify-write of partial lines on XTS) followed by
    DBG_DECRYPT of any range behaves like a plain byte array: neighbours never change."""
    m, g, ideal = _debug_guest(generation)
    off = data.draw(st.integers(0, 4096 // 16 - 1)) * 16
    n = data.draw(st.integers(1, (4096 - off) // 16)) * 16
    payload = data.draw(st.binary(min_size=n, max_size=n))
    put(m, HOST_SPA, payload)
    assert dbg(m, CommandId.DBG_ENCRYPT, g.handle, HOST_SPA, (g.image_spa + off) | cbit(m), n) == Status.SUCCESS
    ideal[off : off + n] = payload
    r_off = data.draw(st.integers(0, 4096 // 16 - 1)) * 16
    r_n = data.draw(st.integers(1, (4096 - r_off) // 16)) * 16
    assert dbg(m, CommandId.DBG_DECRYPT, g.handle, g.image_spa + r_off, HOST_SPA + 0x2000, r_n) == Status.SUCCESS
    assert m.hv.core.host_read(HOST_SPA + 0x2000, r_n) == bytes(ideal[r_off : r_off + r_n])
    assert guest_memory(m, g.handle, g.image_spa, 4096) == bytes(ideal)
    assert not m.firmware.internal_errors
