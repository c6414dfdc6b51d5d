"""SEND_* / RECEIVE_* through the real mailbox path, between two platforms of one process.

Every refusal names its status and checks that neither firmware's state nor the guest's memory
changed.  Statuses follow AMD's firmware source (see ``sevemu.firmware.sev.migrate``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fwkit import call, init, ok, put

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg, RbCtl, decode_status, encode_cmdresp, rb_head_index, rb_tail
from sevemu.abi.policy import GuestPolicy, compose_policy
from sevemu.abi.sev import (
    ActivateCmd,
    GuestStatusCmd,
    HandleCmd,
    HdrBuf,
    HdrFlags,
    InitCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    MeasureBuf,
    PdhCertExportCmd,
    PekCertImportCmd,
    PekCsrCmd,
    ReceiveStartCmd,
    RingBufferCmd,
    RingCmdFlags,
    SendStartCmd,
    SessionBuf,
    TransportCmd,
)
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.abi.struct import field_span
from sevemu.amd.roots import AmdRoot
from sevemu.certs.sev import SevCert
from sevemu.crypto import ecc
from sevemu.errors import LayoutError
from sevemu.firmware.core import Firmware
from sevemu.firmware.gctx import CLOSED_KEY
from sevemu.firmware.sev.migrate import AMD_CERTS_LENGTHS, DATA_CONTEXT
from sevemu.hw.profiles import CpuProfile, profile
from sevemu.scenario import Machine, build_machine, default_amd_root

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
# host scratch buffers (below the guest images)
PDH_SPA = 0x3000_0000
CHAIN_SPA = 0x3000_1000
AMD_SPA = 0x3000_3000
SESSION_SPA = 0x3000_4000
HDR_SPA = 0x3000_5000
TRANS_SPA = 0x3000_6000
MEASURE_SPA = 0x3000_8000
IMAGE_BASE = 0x4000_0000  # the source guest's pages
TARGET_BASE = 0x5000_0000  # where the destination puts them
OUTSIDE = 1 << 40
IMAGE = os.urandom(4 * PAGE)


# ---- platforms ----------------------------------------------------------------------------------
def machine(seed: str, generation: str | CpuProfile = "milan", root: AmdRoot | None = None) -> Machine:
    m = build_machine(generation, seed=seed, dram_size=8 * GiB, init=False,
                      amd_root=root or default_amd_root("milan"))
    init(m, InitCmd())
    return m


@pytest.fixture
def src() -> Machine:
    return machine("mig-src")


@pytest.fixture
def dst() -> Machine:
    return machine("mig-dst")








def get(m: Machine, spa: int, length: int) -> bytes:
    return m.hv.core.host_read(spa, length)


def snapshot(m: Machine) -> object:
    fw = m.firmware
    return (fw.state, fw.next_handle, dict(fw.asid_owner),
            {h: (g.state, g.asid, g.policy, g.vek, g.tek, g.tik) for h, g in fw.guests.items()})


def refused(m: Machine, cmd: CommandId, buf: Any, want: Status, *, dram: tuple[int, int] | None = None) -> bytes:
    """``cmd`` answers ``want`` and changes neither the firmware state nor DRAM at ``dram``."""
    before = snapshot(m)
    mem = m.soc.dram.read(*dram) if dram else b""
    status, out = call(m, cmd, buf)
    assert Status(status) == want, f"{cmd.name}: {Status(status).name}, expected {want.name}"
    assert snapshot(m) == before
    if dram:
        assert m.soc.dram.read(*dram) == mem
    assert not m.firmware.internal_errors
    return out


def guest_memory(m: Machine, handle: int, spa: int, length: int) -> bytes:
    """Test-only look at guest memory through the guest's key slot."""
    g = m.firmware.guests[handle]
    return m.soc.mc.read(spa, length, g.asid, True)


@dataclass(frozen=True)
class Certs:
    pdh: bytes
    chain: bytes
    amd: bytes


def export(m: Machine) -> Certs:
    """PDH_CERT_EXPORT, plus the ASK || ARK the host got from the manufacturer."""
    ok(m, CommandId.PDH_CERT_EXPORT, PdhCertExportCmd(pdh_cert_paddr=PDH_SPA, pdh_cert_len=SEV_CERT_SIZE,
                                                      certs_paddr=CHAIN_SPA, certs_len=SEV_CERT_CHAIN_SIZE))
    assert m.amd_root is not None
    return Certs(get(m, PDH_SPA, SEV_CERT_SIZE), get(m, CHAIN_SPA, SEV_CERT_CHAIN_SIZE),
                 m.amd_root.amd_certs.encode())


def launch(m: Machine, policy: int = 0, image: bytes = IMAGE, asid: int | None = None) -> int:
    """A RUNNING guest whose memory at IMAGE_BASE is ``image``; returns its handle."""
    handle = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))).handle
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=asid or m.profile.min_sev_asid))
    put(m, IMAGE_BASE, image)
    ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=IMAGE_BASE, len=len(image)))
    ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=MEASURE_SPA, len=MeasureBuf.SIZE))
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=handle))
    return handle


def send_start_cmd(m: Machine, h: int, target: Certs, **over: int) -> SendStartCmd:
    put(m, PDH_SPA, target.pdh)
    put(m, CHAIN_SPA, target.chain)
    put(m, AMD_SPA, target.amd)
    cmd = SendStartCmd(handle=h, pdh_cert_paddr=PDH_SPA, pdh_cert_len=len(target.pdh),
                       plat_certs_paddr=CHAIN_SPA, plat_certs_len=len(target.chain),
                       amd_certs_paddr=AMD_SPA, amd_certs_len=len(target.amd),
                       session_paddr=SESSION_SPA, session_len=SessionBuf.SIZE)
    return dataclasses.replace(cmd, **over)


def send_start(m: Machine, handle: int, target: Certs) -> tuple[int, bytes]:
    """SEND_START; returns (policy, session)."""
    out = SendStartCmd.decode(ok(m, CommandId.SEND_START, send_start_cmd(m, handle, target)))
    return out.policy, get(m, SESSION_SPA, SessionBuf.SIZE)


def update_cmd(m: Machine, h: int, spa: int, length: int = PAGE, **over: int) -> TransportCmd:
    cmd = TransportCmd(handle=h, hdr_paddr=HDR_SPA, hdr_len=HdrBuf.SIZE, guest_paddr=spa | m.profile.cbit_mask,
                       guest_len=length, trans_paddr=TRANS_SPA, trans_len=length)
    return dataclasses.replace(cmd, **over)


def send_page(m: Machine, handle: int, spa: int, length: int = PAGE) -> tuple[bytes, bytes]:
    """SEND_UPDATE_DATA of one region; returns (header, TRANS)."""
    ok(m, CommandId.SEND_UPDATE_DATA, update_cmd(m, handle, spa, length))
    return get(m, HDR_SPA, HdrBuf.SIZE), get(m, TRANS_SPA, length)


def receive_start_cmd(m: Machine, source: Certs, policy: int, session: bytes, **over: int) -> ReceiveStartCmd:
    put(m, PDH_SPA, source.pdh)
    put(m, SESSION_SPA, session)
    cmd = ReceiveStartCmd(policy=policy, pdh_cert_paddr=PDH_SPA, pdh_cert_len=len(source.pdh),
                          session_paddr=SESSION_SPA, session_len=len(session))
    return dataclasses.replace(cmd, **over)


def receive_update_cmd(m: Machine, h: int, spa: int, hdr: bytes, trans: bytes, **over: int) -> TransportCmd:
    put(m, HDR_SPA, hdr)
    put(m, TRANS_SPA, trans)
    cmd = TransportCmd(handle=h, hdr_paddr=HDR_SPA, hdr_len=len(hdr), guest_paddr=spa | m.profile.cbit_mask,
                       guest_len=len(trans), trans_paddr=TRANS_SPA, trans_len=len(trans))
    return dataclasses.replace(cmd, **over)


@dataclass
class Channel:
    """A guest sent from ``src`` (handle ``sh``) and received on ``dst`` (handle ``dh``, ACTIVE)."""

    sh: int
    dh: int
    policy: int


def open_channel(src: Machine, dst: Machine, policy: int = 0, *, activate: bool = True) -> Channel:
    sh = launch(src, policy)
    got, session = send_start(src, sh, export(dst))
    assert got == policy
    dh = ReceiveStartCmd.decode(ok(dst, CommandId.RECEIVE_START,
                                   receive_start_cmd(dst, export(src), policy, session))).handle
    if activate:
        ok(dst, CommandId.ACTIVATE, ActivateCmd(handle=dh, asid=dst.profile.min_sev_asid + 1))
    return Channel(sh, dh, policy)


def ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


# ---- the whole exchange -------------------------------------------------------------------------
def test_migration_moves_pages_between_platforms(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    assert src.firmware.guests[ch.sh].state == GuestState.SUPDATE
    assert dst.firmware.guests[ch.dh].state == GuestState.RUPDATE
    assert dst.firmware.state == PlatformState.WORKING
    assert dst.firmware.guests[ch.dh].vek != src.firmware.guests[ch.sh].vek
    for i in range(len(IMAGE) // PAGE):
        hdr, trans = send_page(src, ch.sh, IMAGE_BASE + i * PAGE)
        assert trans != IMAGE[i * PAGE : (i + 1) * PAGE]
        ok(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE + i * PAGE, hdr, trans))
    ok(src, CommandId.SEND_FINISH, HandleCmd(handle=ch.sh))
    ok(dst, CommandId.RECEIVE_FINISH, HandleCmd(handle=ch.dh))
    assert src.firmware.guests[ch.sh].state == GuestState.SENT
    assert dst.firmware.guests[ch.dh].state == GuestState.RUNNING
    assert guest_memory(dst, ch.dh, TARGET_BASE, len(IMAGE)) == IMAGE
    # DRAM holds ciphertext under the new key, not the plaintext
    assert dst.soc.dram.read(TARGET_BASE, len(IMAGE)) != IMAGE
    for m, h in ((src, ch.sh), (dst, ch.dh)):  # channels closed
        assert (m.firmware.guests[h].tek, m.firmware.guests[h].tik) == (CLOSED_KEY, CLOSED_KEY)
    st = GuestStatusCmd.decode(ok(dst, CommandId.GUEST_STATUS, GuestStatusCmd(handle=ch.dh)))
    assert (st.state, st.policy) == (GuestState.RUNNING, ch.policy)
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors


def test_packet_format_is_ctr_then_hmac_with_data_context(src: Machine, dst: Machine) -> None:
    """TRANS = AES-128-CTR(TEK, IV)(plaintext); MAC = HMAC-SHA256(TIK, 0x02 || flags || IV || lengths || TRANS)."""
    ch = open_channel(src, dst)
    g = src.firmware.guests[ch.sh]
    for offset, length in ((0, PAGE), (0x100, 0x40), (0xFF0, 0x10)):
        hdr_raw, trans = send_page(src, ch.sh, IMAGE_BASE + offset, length)
        hdr = HdrBuf.decode(hdr_raw)
        plain = IMAGE[offset : offset + length]
        assert hdr.flags == 0
        assert trans == ctr(g.tek, hdr.iv, plain)
        aad = (bytes([DATA_CONTEXT]) + (0).to_bytes(4, "little") + hdr.iv + length.to_bytes(4, "little")
               + length.to_bytes(4, "little"))
        assert hdr.mac == hmac.new(g.tik, aad + trans, hashlib.sha256).digest()
    assert DATA_CONTEXT == 0x02


def test_session_is_the_launch_construction(src: Machine, dst: Machine) -> None:
    """The target opens SEND_START's session with Z = ECDH(its PDH, the source PDH)."""
    from sevemu.crypto.transport import open_session

    sh = launch(src, 0)
    _, session = send_start(src, sh, export(dst))
    z = ecc.ecdh(dst.firmware.identity.pdh_key, src.firmware.identity.pdh_cert.public_key())  # type: ignore[arg-type]
    keys = open_session(z, session, 0)
    assert (keys.tek, keys.tik) == (src.firmware.guests[sh].tek, src.firmware.guests[sh].tik)


# ---- SEND_START ---------------------------------------------------------------------------------
def test_send_start_length_query(src: Machine, dst: Machine) -> None:
    sh = launch(src)
    for length in (0, 0x40, 0x100):
        out = refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst), session_len=length),
                      Status.INVALID_LENGTH)
        assert SendStartCmd.decode(out).session_len == SessionBuf.SIZE


def test_send_start_guest_and_state(src: Machine, dst: Machine) -> None:
    target = export(dst)
    refused(src, CommandId.SEND_START, send_start_cmd(src, 7, target), Status.INVALID_GUEST)
    h = LaunchStartCmd.decode(ok(src, CommandId.LAUNCH_START, LaunchStartCmd())).handle
    refused(src, CommandId.SEND_START, send_start_cmd(src, h, target), Status.INVALID_GUEST_STATE)
    sh = launch(src, asid=src.profile.min_sev_asid + 1)
    send_start(src, sh, target)
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, target), Status.INVALID_GUEST_STATE)


def test_send_start_nosend(src: Machine, dst: Machine) -> None:
    sh = launch(src, int(GuestPolicy.NOSEND))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst)), Status.POLICY_FAILURE)


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _chain_case(name: str) -> Callable[[Certs], Certs]:
    pek, oca, cek = 0, SEV_CERT_SIZE, 2 * SEV_CERT_SIZE
    sig1 = 0x41C
    cases: dict[str, Callable[[Certs], Certs]] = {
        # a signature byte: the link does not verify
        "PEK signature": lambda c: dataclasses.replace(c, chain=_flip(c.chain, pek + sig1 + 5)),
        "CEK signature": lambda c: dataclasses.replace(c, chain=_flip(c.chain, cek + sig1 + 5)),
        "PDH signature": lambda c: dataclasses.replace(c, pdh=_flip(c.pdh, sig1 + 5)),
        "PDH key": lambda c: dataclasses.replace(c, pdh=_flip(c.pdh, 0x14)),
        "OCA key": lambda c: dataclasses.replace(c, chain=_flip(c.chain, oca + 0x14)),
        "ASK signature": lambda c: dataclasses.replace(c, amd=_flip(c.amd, len(c.amd) // 2 - 3)),
    }
    return cases[name]


@pytest.mark.parametrize("case", ["PEK signature", "CEK signature", "PDH signature", "PDH key", "OCA key",
                                  "ASK signature"])
def test_send_start_sev_policy_bad_chain(src: Machine, dst: Machine, case: str) -> None:
    sh = launch(src, int(GuestPolicy.SEV))
    target = _chain_case(case)(export(dst))
    status, _ = call(src, CommandId.SEND_START, send_start_cmd(src, sh, target))
    assert Status(status) in (Status.BAD_SIGNATURE, Status.INVALID_CERTIFICATE), Status(status).name
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, target), Status(status))


def test_send_start_sev_policy_signature_status(src: Machine, dst: Machine) -> None:
    sh = launch(src, int(GuestPolicy.SEV))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, _chain_case("PEK signature")(export(dst))),
            Status.BAD_SIGNATURE)
    # a certificate with a reserved byte set does not decode
    bad = export(dst)
    bad = dataclasses.replace(bad, chain=_flip(bad.chain, 0x06))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, bad), Status.INVALID_CERTIFICATE)


def test_send_start_sev_policy_untrusted_root(src: Machine) -> None:
    """A target whose chain ends at another (emulated) ARK is refused under policy SEV."""
    stranger = machine("mig-stranger", root=AmdRoot.create("milan", key_bits=2048))
    sh = launch(src, int(GuestPolicy.SEV))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(stranger)), Status.INVALID_CERTIFICATE)
    # without SEV in the policy the chain is not looked at (AF): the guest may go there
    sh2 = launch(src, 0, asid=src.profile.min_sev_asid + 1)
    send_start(src, sh2, export(stranger))


@pytest.mark.parametrize("field,value", [("pdh_cert_len", SEV_CERT_SIZE - 1), ("plat_certs_len", SEV_CERT_SIZE),
                                         ("amd_certs_len", 0x100), ("amd_certs_len", 0)])
def test_send_start_sev_policy_lengths(src: Machine, dst: Machine, field: str, value: int) -> None:
    sh = launch(src, int(GuestPolicy.SEV))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst), **{field: value}),
            Status.INVALID_LENGTH)


def test_send_start_addresses(src: Machine, dst: Machine) -> None:
    sh = launch(src, int(GuestPolicy.SEV))
    for field in ("pdh_cert_paddr", "plat_certs_paddr", "amd_certs_paddr", "session_paddr"):
        refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst), **{field: OUTSIDE}),
                Status.INVALID_ADDRESS)


def test_amd_certs_lengths() -> None:
    assert {0x680, 0xC80, 0x580} <= AMD_CERTS_LENGTHS  # 2048/2048, 4096/4096, Naples' unsigned ARK
    assert 0x640 not in AMD_CERTS_LENGTHS


def test_send_start_api_minimum_against_target_pek(src: Machine) -> None:
    """Policy SEV: the target PEK's API version must meet the policy's minimum."""
    old = dataclasses.replace(profile("milan"), api_minor=10)
    target = machine("mig-old", generation=old)
    assert SevCert.decode(export(target).chain[:SEV_CERT_SIZE]).api_minor == 10
    major, minor = src.profile.api_major, src.profile.api_minor
    sh = launch(src, compose_policy(int(GuestPolicy.SEV), api_major=major, api_minor=minor))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(target)), Status.POLICY_FAILURE)
    sh2 = launch(src, compose_policy(int(GuestPolicy.SEV), api_major=1, api_minor=10),
                 asid=src.profile.min_sev_asid + 1)
    send_start(src, sh2, export(target))


def test_send_start_domain_policy(src: Machine, dst: Machine) -> None:
    """DOMAIN: only to a platform with this platform's OCA -- the same platform here."""
    sh = launch(src, int(GuestPolicy.DOMAIN))
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst)), Status.POLICY_FAILURE)
    send_start(src, sh, export(src))
    bad = dataclasses.replace(export(src), pdh=_flip(export(src).pdh, 0x41C + 5))
    sh2 = launch(src, int(GuestPolicy.DOMAIN), asid=src.profile.min_sev_asid + 1)
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh2, bad), Status.BAD_SIGNATURE)


def _import_owner(m: Machine, oca_key: Any, oca: SevCert) -> None:
    ok(m, CommandId.PEK_CSR, PekCsrCmd(csr_paddr=PDH_SPA, csr_len=SEV_CERT_SIZE))
    csr = SevCert.decode(get(m, PDH_SPA, SEV_CERT_SIZE))
    pek = csr.sign_with(oca_key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256, slot=1)
    put(m, PDH_SPA, pek.encode())
    put(m, CHAIN_SPA, oca.encode())
    ok(m, CommandId.PEK_CERT_IMPORT, PekCertImportCmd(pek_cert_paddr=PDH_SPA, pek_cert_len=SEV_CERT_SIZE,
                                                      oca_cert_paddr=CHAIN_SPA, oca_cert_len=SEV_CERT_SIZE))


def test_domain_policy_between_platforms_of_one_owner(src: Machine, dst: Machine) -> None:
    key = ecc.generate_private_key()
    alg = SigAlgo.ECDSA_SHA256
    oca = SevCert.new(KeyUsage.OCA, alg, key.public_key()).sign_with(key, KeyUsage.OCA, alg)
    for m in (src, dst):
        _import_owner(m, key, oca)
    ch = open_channel(src, dst, int(GuestPolicy.DOMAIN | GuestPolicy.SEV))
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    ok(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans))
    assert guest_memory(dst, ch.dh, TARGET_BASE, PAGE) == IMAGE[:PAGE]


def test_send_start_target_pdh(src: Machine, dst: Machine) -> None:
    sh = launch(src, 0)
    target = export(dst)
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, target, pdh_cert_len=0), Status.INVALID_LENGTH)
    not_pdh = dataclasses.replace(target, pdh=target.chain[:SEV_CERT_SIZE])  # the PEK
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, not_pdh), Status.INVALID_CERTIFICATE)


# ---- SEND_UPDATE_DATA ---------------------------------------------------------------------------
def test_send_update_length_query(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    out = refused(src, CommandId.SEND_UPDATE_DATA, TransportCmd(handle=ch.sh), Status.INVALID_LENGTH)
    assert TransportCmd.decode(out).hdr_len == HdrBuf.SIZE
    # checked before the handle, as AF does
    out = refused(src, CommandId.SEND_UPDATE_DATA, TransportCmd(handle=99, hdr_len=8), Status.INVALID_LENGTH)
    assert TransportCmd.decode(out).hdr_len == HdrBuf.SIZE


@pytest.mark.parametrize("over,want", [
    ({"guest_len": 0}, Status.INVALID_LENGTH),
    ({"guest_len": PAGE + 16, "trans_len": PAGE + 16}, Status.INVALID_LENGTH),
    ({"guest_len": 24, "trans_len": 24}, Status.INVALID_LENGTH),  # not a multiple of 16
    ({"trans_len": PAGE - 16}, Status.INVALID_LENGTH),  # TRANS smaller than the region
    ({"trans_len": 0}, Status.INVALID_LENGTH),
    ({"guest_paddr": IMAGE_BASE + 8}, Status.INVALID_ADDRESS),
    ({"guest_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"trans_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"hdr_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"handle": 99}, Status.INVALID_GUEST),
])
def test_send_update_refusals(src: Machine, dst: Machine, over: dict[str, int], want: Status) -> None:
    ch = open_channel(src, dst)
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, ch.sh, IMAGE_BASE, **over), want,
            dram=(TRANS_SPA, PAGE))


def test_send_update_page_crossing(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, ch.sh, IMAGE_BASE + 0x800), Status.INVALID_LENGTH,
            dram=(TRANS_SPA, PAGE))
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, ch.sh, IMAGE_BASE + PAGE - 16, 32),
            Status.INVALID_LENGTH)
    send_page(src, ch.sh, IMAGE_BASE + PAGE - 16, 16)


def test_send_update_needs_supdate_and_active(src: Machine, dst: Machine) -> None:
    sh = launch(src)
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, sh, IMAGE_BASE), Status.INVALID_GUEST_STATE)
    send_start(src, sh, export(dst))
    ok(src, CommandId.DEACTIVATE, HandleCmd(handle=sh))
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, sh, IMAGE_BASE), Status.INACTIVE)


def test_update_vmsa_needs_an_es_guest(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    refused(src, CommandId.SEND_UPDATE_VMSA, update_cmd(src, ch.sh, IMAGE_BASE), Status.UNSUPPORTED)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    refused(dst, CommandId.RECEIVE_UPDATE_VMSA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans),
            Status.UNSUPPORTED)


# ---- SEND_FINISH / SEND_CANCEL ------------------------------------------------------------------
def test_send_cancel_returns_to_running(src: Machine, dst: Machine) -> None:
    sh = launch(src)
    refused(src, CommandId.SEND_CANCEL, HandleCmd(handle=sh), Status.INVALID_GUEST_STATE)
    refused(src, CommandId.SEND_FINISH, HandleCmd(handle=sh), Status.INVALID_GUEST_STATE)
    send_start(src, sh, export(dst))
    send_page(src, sh, IMAGE_BASE)
    ok(src, CommandId.SEND_CANCEL, HandleCmd(handle=sh))
    g = src.firmware.guests[sh]
    assert g.state == GuestState.RUNNING and g.tek == CLOSED_KEY
    refused(src, CommandId.SEND_UPDATE_DATA, update_cmd(src, sh, IMAGE_BASE), Status.INVALID_GUEST_STATE)
    assert guest_memory(src, sh, IMAGE_BASE, len(IMAGE)) == IMAGE
    # and it can be sent again, with a fresh channel
    send_start(src, sh, export(dst))
    ok(src, CommandId.SEND_FINISH, HandleCmd(handle=sh))
    assert src.firmware.guests[sh].state == GuestState.SENT
    refused(src, CommandId.SEND_START, send_start_cmd(src, sh, export(dst)), Status.INVALID_GUEST_STATE)
    refused(src, CommandId.SEND_FINISH, HandleCmd(handle=99), Status.INVALID_GUEST)


# ---- RECEIVE_START ------------------------------------------------------------------------------
def _session(src: Machine, dst: Machine, policy: int = 0) -> bytes:
    sh = launch(src, policy)
    return send_start(src, sh, export(dst))[1]


@pytest.mark.parametrize("field", ["nonce", "wrap_tk", "wrap_iv", "wrap_mac", "policy_mac"])
def test_receive_start_tampered_session(src: Machine, dst: Machine, field: str) -> None:
    session = SessionBuf.decode(_session(src, dst))
    raw = bytearray(getattr(session, field))
    raw[0] ^= 0x80
    bad = dataclasses.replace(session, **{field: bytes(raw)}).encode()
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), 0, bad), Status.BAD_MEASUREMENT)


def test_receive_start_policy_is_bound(src: Machine, dst: Machine) -> None:
    session = _session(src, dst, int(GuestPolicy.NODBG))
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), 0, session), Status.BAD_MEASUREMENT)
    ok(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), int(GuestPolicy.NODBG), session))


def test_receive_start_wrong_source_pdh(src: Machine, dst: Machine) -> None:
    session = _session(src, dst)
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(dst), 0, session), Status.BAD_MEASUREMENT)
    not_pdh = dataclasses.replace(export(src), pdh=export(src).chain[:SEV_CERT_SIZE])
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, not_pdh, 0, session), Status.INVALID_CERTIFICATE)


@pytest.mark.parametrize("over,want", [
    ({"session_len": 0x7F}, Status.INVALID_LENGTH),
    ({"pdh_cert_len": 0x800}, Status.INVALID_LENGTH),
    ({"session_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"pdh_cert_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"handle": 42}, Status.INVALID_GUEST),
])
def test_receive_start_refusals(src: Machine, dst: Machine, over: dict[str, int], want: Status) -> None:
    session = _session(src, dst)
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), 0, session, **over), want)


def test_receive_start_es_needs_es_platform(src: Machine, dst: Machine) -> None:
    """The source never gets an ES guest here; the policy MAC is made for the ES policy directly."""
    from sevemu.crypto.transport import TransportKeys, seal_session

    es = int(GuestPolicy.ES)
    z = ecc.ecdh(src.firmware.identity.pdh_key, dst.firmware.identity.pdh_cert.public_key())  # type: ignore[arg-type]
    session = seal_session(z, os.urandom(16), os.urandom(16), TransportKeys(os.urandom(16), os.urandom(16)), es)
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), es, session.encode()),
            Status.UNSUPPORTED)


def test_receive_start_key_sharing(src: Machine, dst: Machine) -> None:
    first = ReceiveStartCmd.decode(ok(dst, CommandId.RECEIVE_START,
                                      receive_start_cmd(dst, export(src), 0, _session(src, dst)))).handle
    session = send_start(src, launch(src, 0, asid=src.profile.min_sev_asid + 1), export(dst))[1]
    shared = ReceiveStartCmd.decode(ok(dst, CommandId.RECEIVE_START,
                                       receive_start_cmd(dst, export(src), 0, session, handle=first))).handle
    assert dst.firmware.guests[shared].vek == dst.firmware.guests[first].vek
    noks = int(GuestPolicy.NOKS)
    sh = launch(src, noks, asid=src.profile.min_sev_asid + 2)
    session = send_start(src, sh, export(dst))[1]
    h3 = ReceiveStartCmd.decode(ok(dst, CommandId.RECEIVE_START,
                                   receive_start_cmd(dst, export(src), noks, session))).handle
    sh4 = launch(src, noks, asid=src.profile.min_sev_asid + 3)
    session = send_start(src, sh4, export(dst))[1]
    refused(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), noks, session, handle=h3),
            Status.POLICY_FAILURE)


# ---- RECEIVE_UPDATE_DATA ------------------------------------------------------------------------
def test_receive_update_needs_activate(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst, activate=False)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans),
            Status.INACTIVE, dram=(TARGET_BASE, PAGE))


def _tamper(what: str) -> Callable[[bytes, bytes], tuple[bytes, bytes]]:
    cases: dict[str, Callable[[bytes, bytes], tuple[bytes, bytes]]] = {
        "trans first byte": lambda h, t: (h, _flip(t, 0)),
        "trans last byte": lambda h, t: (h, _flip(t, len(t) - 1)),
        "iv": lambda h, t: (_flip(h, 0x04), t),
        "mac": lambda h, t: (_flip(h, 0x14 + 31), t),
        "flags": lambda h, t: (_flip(h, 0x01), t),
    }
    return cases[what]


@pytest.mark.parametrize("what", ["trans first byte", "trans last byte", "iv", "mac", "flags"])
def test_receive_update_tampered_packet(src: Machine, dst: Machine, what: str) -> None:
    ch = open_channel(src, dst)
    hdr, trans = _tamper(what)(*send_page(src, ch.sh, IMAGE_BASE))
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans),
            Status.BAD_MEASUREMENT, dram=(TARGET_BASE, PAGE))


def test_receive_update_packet_of_another_channel(src: Machine, dst: Machine) -> None:
    """A packet sealed for one guest's channel does not open on another's."""
    a = open_channel(src, dst)
    sh = launch(src, 0, asid=src.profile.min_sev_asid + 1)
    send_start(src, sh, export(dst))
    hdr, trans = send_page(src, sh, IMAGE_BASE)
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, a.dh, TARGET_BASE, hdr, trans),
            Status.BAD_MEASUREMENT)


def test_receive_update_compressed_flag(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    flagged = dataclasses.replace(HdrBuf.decode(hdr), flags=int(HdrFlags.COMPRESSED)).encode()
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, flagged, trans),
            Status.UNSUPPORTED)


@pytest.mark.parametrize("over,want", [
    ({"guest_len": PAGE - 16}, Status.INVALID_LENGTH),  # not equal to trans_len
    ({"trans_len": 0, "guest_len": 0}, Status.INVALID_LENGTH),
    ({"hdr_len": 0x30}, Status.INVALID_LENGTH),
    ({"guest_paddr": TARGET_BASE + 0x800}, Status.INVALID_LENGTH),  # crosses a page
    ({"guest_paddr": TARGET_BASE + 4}, Status.INVALID_ADDRESS),
    ({"guest_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"trans_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"hdr_paddr": OUTSIDE}, Status.INVALID_ADDRESS),
    ({"handle": 77}, Status.INVALID_GUEST),
])
def test_receive_update_refusals(src: Machine, dst: Machine, over: dict[str, int], want: Status) -> None:
    ch = open_channel(src, dst)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans, **over),
            want, dram=(TARGET_BASE, PAGE))


def test_receive_update_needs_rupdate(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    ok(dst, CommandId.RECEIVE_FINISH, HandleCmd(handle=ch.dh))
    refused(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans),
            Status.INVALID_GUEST_STATE)
    refused(dst, CommandId.RECEIVE_FINISH, HandleCmd(handle=ch.dh), Status.INVALID_GUEST_STATE)
    refused(dst, CommandId.RECEIVE_FINISH, HandleCmd(handle=55), Status.INVALID_GUEST)


def test_receive_update_evicts_dirty_host_lines(src: Machine, dst: Machine) -> None:
    """A dirty host line over the target page cannot overwrite the received data later."""
    ch = open_channel(src, dst)
    hdr, trans = send_page(src, ch.sh, IMAGE_BASE)
    dst.hv.core.host_write(TARGET_BASE, b"\xAA" * 64)  # dirty, host-tagged, not flushed
    ok(dst, CommandId.RECEIVE_UPDATE_DATA, receive_update_cmd(dst, ch.dh, TARGET_BASE, hdr, trans))
    dst.soc.wbinvd_all()
    assert guest_memory(dst, ch.dh, TARGET_BASE, PAGE) == IMAGE[:PAGE]


def test_received_guest_decommission_returns_platform_to_init(src: Machine, dst: Machine) -> None:
    ch = open_channel(src, dst)
    ok(dst, CommandId.DEACTIVATE, HandleCmd(handle=ch.dh))
    ok(dst, CommandId.DECOMMISSION, HandleCmd(handle=ch.dh))
    assert dst.firmware.state == PlatformState.INIT and not dst.firmware.guests


# ---- ring-buffer batches (RING_BUFFER; the batch runners of SEND/RECEIVE_UPDATE_DATA) -------------
RING_Q, RING_STATUS, RING_SLOTS = 0x3100_0000, 0x3100_1000, 0x3100_2000
RING_HQ, RING_HSTATUS = 0x3100_8000, 0x3100_9000  # the high-priority queue, when configured
BATCH_HDRS, BATCH_TRANS = 0x3200_0000, 0x3210_0000


def ring_run(m: Machine, cmds: list[tuple[CommandId, TransportCmd]], per_doorbell: bool, start: int = 0,
             high: int = 0) -> list[int]:
    """Queue ``cmds`` (buffers in 64-byte slots, every entry CONT_ON_ERROR) and run them with one
    doorbell each or one for all -- as a host does it, through host memory and the mailbox.
    ``start``: the queue index of the first (``start`` PLATFORM_STATUS commands run before, with a
    doorbell of their own), so that the queue wraps at its 256th entry among ``cmds``.  ``high``:
    both queues configured, the first ``high`` commands in the high-priority queue (which the PSP
    runs first), the rest in the low one, one doorbell for all."""
    both = {"high_priority_cmd_ptr": RING_HQ, "high_priority_status_ptr": RING_HSTATUS,
            "high_priority_queue_size": 1} if high else {}
    assert not high or not (per_doorbell or start)
    ok(m, CommandId.RING_BUFFER, RingBufferCmd(low_priority_cmd_ptr=RING_Q, low_priority_status_ptr=RING_STATUS,
                                               low_priority_queue_size=1, **both))
    core, mbox = m.hv.core, m.hv.psp.mailbox
    ctl = RbCtl.X86_CONTROL | RbCtl.RB_MODE_ACTIVE
    if start:
        out = RING_SLOTS + 64 * 255  # PLATFORM_STATUS's output, away from the slots of ``cmds``
        core.host_write_stream(RING_Q, b"".join(struct.pack("<HHIQ", CommandId.PLATFORM_STATUS, 0, 0, out)
                                                for _ in range(start)))
        mbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, rb_tail(start))
        mbox.mmio_write(MailboxReg.CMDRESP, int(ctl))
        assert rb_head_index(mbox.mmio_read(MailboxReg.CMDBUFF_ADDR_LO)) == start
    for i, (cid, buf) in enumerate(cmds):
        core.host_write_stream(RING_SLOTS + 64 * i, buf.encode())
        entry = RING_HQ + 16 * i if i < high else RING_Q + 16 * ((start + i - high) % 256)
        core.host_write_stream(entry, struct.pack("<HHIQ", cid, RingCmdFlags.CONT_ON_ERROR, 0, RING_SLOTS + 64 * i))
    for tail in range(1, len(cmds) + 1) if per_doorbell else [len(cmds)]:
        mbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, rb_tail((start + tail - high) % 256, high))
        mbox.mmio_write(MailboxReg.CMDRESP, int(ctl))
    head = mbox.mmio_read(MailboxReg.CMDBUFF_ADDR_LO)
    assert rb_head_index(head) == (start + len(cmds) - high) % 256 and rb_head_index(head, True) == high
    mbox.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.NOP)))  # leave the mode
    assert decode_status(mbox.mmio_read(MailboxReg.CMDRESP)) == Status.RING_BUFFER_EXIT
    statuses, hi_statuses = core.host_read_stream(RING_STATUS, 16 * 256), core.host_read_stream(RING_HSTATUS, 16 * 256)
    return [struct.unpack_from("<H", hi_statuses, 16 * i)[0] if i < high else
            struct.unpack_from("<H", statuses, 16 * ((start + i - high) % 256))[0] for i in range(len(cmds))]


def _batch_cmd(m: Machine, cid: CommandId, handle: int, base: int, i: int, page: int,
               **over: int) -> tuple[CommandId, TransportCmd]:
    fields = {"handle": handle, "hdr_paddr": BATCH_HDRS + 64 * i, "hdr_len": HdrBuf.SIZE,
              "guest_paddr": (base + page * PAGE) | m.profile.cbit_mask, "guest_len": PAGE,
              "trans_paddr": BATCH_TRANS + PAGE * i, "trans_len": PAGE, **over}
    return cid, TransportCmd(**fields)


def test_ring_batches_have_the_effects_of_one_command_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same queue run with a doorbell per command and with one doorbell for all (the batch
    runners) on two identical pairs of platforms: the same statuses, the same bytes everywhere --
    including a refused command in the middle, a header length written back, a TRANS written over
    the next commands' buffers, a tampered MAC and a TRANS read from a page received before it."""
    worlds = []
    batches = _counting_batches(monkeypatch)
    for batched in (False, True):
        src, dst = machine("ring-src"), machine("ring-dst")
        ch = open_channel(src, dst)
        sends = [_batch_cmd(src, CommandId.SEND_UPDATE_DATA, ch.sh, IMAGE_BASE, i, page, **over)
                 for i, (page, over) in enumerate([(0, {}), (1, {}), (2, {"guest_len": 0}), (2, {"hdr_len": 0x40}),
                                                   (3, {}), (2, {"trans_paddr": RING_SLOTS + 64 * 6}), (1, {}),
                                                   (0, {})])]
        s_status = ring_run(src, sends, per_doorbell=not batched)
        out = src.soc.dram.read(BATCH_HDRS, 64 * 8) + src.soc.dram.read(BATCH_TRANS, PAGE * 8)
        hdrs = [get(src, BATCH_HDRS + 64 * i, HdrBuf.SIZE) for i in range(8)]
        transes = [get(src, BATCH_TRANS + PAGE * i, PAGE) for i in range(8)]
        tampered = bytearray(transes[1])
        tampered[9] ^= 1
        # (guest page, header, TRANS, overrides) of packet i in slot i: a bad MAC, then a TRANS read
        # from a page an earlier command of the queue received (its ciphertext: BAD_MEASUREMENT)
        packets = [(0, hdrs[0], transes[0], {}), (1, hdrs[1], bytes(tampered), {}), (1, hdrs[1], transes[1], {}),
                   (2, hdrs[3], transes[3], {}), (3, hdrs[4], transes[4], {}),
                   (4, hdrs[4], transes[4], {"trans_paddr": TARGET_BASE + 3 * PAGE})]
        recvs = []
        for i, (page, h, t, over) in enumerate(packets):
            put(dst, BATCH_HDRS + 64 * i, h)
            put(dst, BATCH_TRANS + PAGE * i, t)
            recvs.append(_batch_cmd(dst, CommandId.RECEIVE_UPDATE_DATA, ch.dh, TARGET_BASE, i, page, **over))
        d_status = ring_run(dst, recvs, per_doorbell=not batched)
        g = dst.firmware.guests[ch.dh]
        worlds.append((s_status, out, d_status, dst.soc.mc.read(TARGET_BASE, 5 * PAGE, g.asid, True),
                       src.firmware.log[-8:], dst.firmware.log[-6:]))
        assert not src.firmware.internal_errors and not dst.firmware.internal_errors
    one, batch = worlds
    assert one == batch
    assert batches == [2, 2, 1, 3]  # batched: sends 0-1 and 4-5, receives 0 and 2-4 (the rest one by one)
    s_status, _, d_status, memory, _, _ = one
    assert s_status == [0, 0, Status.INVALID_LENGTH, 0, 0, 0, Status.INVALID_PARAM, Status.INVALID_PARAM]
    assert d_status == [0, Status.BAD_MEASUREMENT, 0, 0, 0, Status.BAD_MEASUREMENT]
    assert memory[:2 * PAGE] == IMAGE[:2 * PAGE] and memory[2 * PAGE : 4 * PAGE] == IMAGE[2 * PAGE :]


def _counting_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many commands each call of the batch runners ran (the calls that ran any)."""
    batches: list[int] = []
    many = Firmware.handle_batch

    def counting(self: Firmware, command_id: int, buffer_paddrs: Sequence[int]) -> int:
        done = many(self, command_id, buffer_paddrs)
        if done:
            batches.append(done)
        return done

    monkeypatch.setattr(Firmware, "handle_batch", counting)
    return batches


def _whole_page_world(seed: str, batched: bool, alter: Callable[[bytearray, bytearray], None],
                      start: int = 0, high: int = 0,
                      cached: Callable[[Machine], None] | None = None) -> tuple[object, ...]:
    """Eight whole-page SEND_UPDATE_DATA from a fresh pair of platforms (one doorbell, or one per
    command; the queue from entry ``start``), the packets altered by ``alter(headers, TRANS)``, then
    eight RECEIVE_UPDATE_DATA of them (``cached``: what the host then writes without flushing):
    (send statuses, the sent bytes, receive statuses, the
    received memory, both firmware logs)."""
    src, dst = machine(f"{seed}-src"), machine(f"{seed}-dst")
    ch = open_channel(src, dst)
    sends = [_batch_cmd(src, CommandId.SEND_UPDATE_DATA, ch.sh, IMAGE_BASE, i, i % 4) for i in range(8)]
    s_status = ring_run(src, sends, per_doorbell=not batched, start=start, high=high)
    hdrs = bytearray(get(src, BATCH_HDRS, 64 * 8))
    trans = bytearray(get(src, BATCH_TRANS, PAGE * 8))
    alter(hdrs, trans)
    put(dst, BATCH_HDRS, bytes(hdrs))
    put(dst, BATCH_TRANS, bytes(trans))
    if cached is not None:  # (host writes left in the host's cache, dirty, before the doorbell)
        cached(dst)
    recvs = [_batch_cmd(dst, CommandId.RECEIVE_UPDATE_DATA, ch.dh, TARGET_BASE, i, i) for i in range(8)]
    d_status = ring_run(dst, recvs, per_doorbell=not batched, start=start, high=high)
    g = dst.firmware.guests[ch.dh]
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors
    return (s_status, get(src, BATCH_HDRS, 64 * 8) + get(src, BATCH_TRANS, PAGE * 8), d_status,
            dst.soc.mc.read(TARGET_BASE, 8 * PAGE, g.asid, True), src.firmware.log[-8:], dst.firmware.log[-8:])


@pytest.mark.parametrize("tamper", ["trans", "mac", "iv", "flags"])
def test_whole_page_batches_run_at_once_with_the_effects_of_one_by_one(monkeypatch: pytest.MonkeyPatch,
                                                                     tamper: str) -> None:
    """A doorbell of whole-page SEND_UPDATE_DATA commands runs all at once (the checks of every
    command made together), and so do RECEIVE_UPDATE_DATA commands up to a packet the host altered:
    that one is refused as one by one (BAD_MEASUREMENT, or UNSUPPORTED for the COMPRESSED flag), the
    rest run -- the same statuses and bytes as a doorbell per command."""
    batches = _counting_batches(monkeypatch)
    at = {"trans": 5 * PAGE + 77, "mac": 64 * 5 + 0x14 + 3, "iv": 64 * 5 + 4, "flags": 64 * 5}[tamper]

    def alter(hdrs: bytearray, trans: bytearray) -> None:
        (trans if tamper == "trans" else hdrs)[at] ^= 1

    worlds = [_whole_page_world("whole", batched, alter) for batched in (False, True)]
    one, batch = worlds
    assert one == batch
    assert batches == [8, 5, 2]  # the sends; the receives before and after the altered one
    s_status, _, d_status, memory, _, _ = one
    refused = Status.UNSUPPORTED if tamper == "flags" else Status.BAD_MEASUREMENT
    assert s_status == [0] * 8 and d_status == [0] * 5 + [refused, 0, 0]
    for i in range(8):
        page = memory[i * PAGE : (i + 1) * PAGE]
        assert (page == IMAGE[(i % 4) * PAGE : (i % 4 + 1) * PAGE]) is (i != 5)


@pytest.mark.parametrize("bad", ["mac", "handle"])
def test_the_queue_entries_column_and_a_list_of_addresses_run_the_same_batch(monkeypatch: pytest.MonkeyPatch,
                                                                             bad: str) -> None:
    """The ring buffer hands the batch runner its queue entries' buffer addresses as a column
    (:meth:`Firmware.handle_batch`, no list built per doorbell): the same statuses, bytes and logs
    as the same addresses given as a list -- with one bad command in the middle of the batch (a
    packet whose MAC the host altered: BAD_MEASUREMENT; a command naming another handle:
    INVALID_GUEST), that command refused and nothing of it written, the commands around it run."""
    many = Firmware.handle_batch
    kinds: list[str] = []

    def as_list(self: Firmware, command_id: int, buffer_paddrs: Sequence[int]) -> int:
        kinds.append(type(buffer_paddrs).__name__)
        return many(self, command_id, [int(a) for a in buffer_paddrs])

    def alter(hdrs: bytearray, trans: bytearray) -> None:
        if bad == "mac":
            hdrs[64 * 3 + 0x14] ^= 1  # packet 3: its MAC

    worlds = []
    for listed in (False, True):
        if listed:
            monkeypatch.setattr(Firmware, "handle_batch", as_list)
        if bad == "mac":
            worlds.append(_whole_page_world("column", True, alter))
            continue
        src, dst = machine("column-src"), machine("column-dst")
        ch = open_channel(src, dst)
        sends = [_batch_cmd(src, CommandId.SEND_UPDATE_DATA, ch.sh if i != 3 else ch.sh + 77, IMAGE_BASE, i, i % 4)
                 for i in range(8)]
        before = get(src, BATCH_HDRS + 64 * 3, 64) + get(src, BATCH_TRANS + 3 * PAGE, PAGE)
        status = ring_run(src, sends, per_doorbell=False)
        assert not src.firmware.internal_errors
        assert get(src, BATCH_HDRS + 64 * 3, 64) + get(src, BATCH_TRANS + 3 * PAGE, PAGE) == before  # (nothing written)
        worlds.append((status, get(src, BATCH_HDRS, 64 * 8) + get(src, BATCH_TRANS, PAGE * 8), src.firmware.log[-8:]))
    assert worlds[0] == worlds[1]
    assert kinds and set(kinds) == {"ndarray"}  # (the ring buffer's column, as the list path was given it)
    if bad == "mac":
        s_status, _, d_status, memory, _, _ = worlds[0]
        assert s_status == [0] * 8 and d_status == [0] * 3 + [Status.BAD_MEASUREMENT] + [0] * 4
        assert memory[3 * PAGE : 4 * PAGE] != IMAGE[3 * PAGE : 4 * PAGE]
        assert memory[4 * PAGE : 5 * PAGE] == IMAGE[: PAGE]
    else:
        status, _, log = worlds[0]
        assert status == [0, 0, 0, Status.INVALID_GUEST, 0, 0, 0, 0]
        assert [st for _, st in log] == status


def test_a_batch_across_the_queue_wrap_runs_at_once_with_the_effects_of_one_by_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands whose queue entries wrap from index 255 to 0 run as one batch (a doorbell of 255
    pages wraps every time but the first), their statuses posted at the wrapped indexes; a packet the
    host altered after the wrap is refused as one by one -- the same statuses and bytes as a doorbell
    per command."""
    batches = _counting_batches(monkeypatch)

    def alter(hdrs: bytearray, trans: bytearray) -> None:
        hdrs[64 * 6 + 0x14] ^= 1  # packet 6 (queue entry 1): its MAC

    worlds = [_whole_page_world("wrap", batched, alter, start=251) for batched in (False, True)]  # entries 251..2
    one, batch = worlds
    assert one == batch
    assert batches == [8, 6]  # the sends across the wrap at once; the receives before the altered one
    s_status, _, d_status, memory, _, _ = one
    assert s_status == [0] * 8 and d_status == [0] * 6 + [Status.BAD_MEASUREMENT, 0]
    for i in range(8):
        page = memory[i * PAGE : (i + 1) * PAGE]
        assert (page == IMAGE[(i % 4) * PAGE : (i % 4 + 1) * PAGE]) is (i != 6)


@pytest.mark.parametrize("altered", [2, 6])
def test_both_queues_of_a_doorbell_run_as_one_batch_with_the_effects_of_one_by_one(
        monkeypatch: pytest.MonkeyPatch, altered: int) -> None:
    """A doorbell with whole-page commands in both queues -- five in the high-priority queue, three
    in the low one, which the PSP runs after it -- is one batch across the two queues; a packet the
    host altered (in the high queue, or in the low one) is refused as one by one and the rest of
    both queues run: the same statuses and bytes as a doorbell per command in one queue."""
    batches = _counting_batches(monkeypatch)

    def alter(hdrs: bytearray, trans: bytearray) -> None:
        trans[altered * PAGE + 5] ^= 1

    one = _whole_page_world("both", False, alter)
    both = _whole_page_world("both", True, alter, high=5)
    assert one == both
    # the sends at once across the queues; the receives before the altered packet, then after it
    assert batches == ([8, 2, 5] if altered == 2 else [8, 6])  # (a last single command runs on its own)
    s_status, _, d_status, _, _, _ = both
    assert s_status == [0] * 8 and d_status == [0] * altered + [Status.BAD_MEASUREMENT] + [0] * (7 - altered)


def test_a_doorbell_of_sends_gives_every_page_its_own_iv_and_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    """One doorbell of eight SEND_UPDATE_DATA commands draws its IVs in one TRNG read: each page still
    gets its own 16 bytes of it -- eight distinct IVs, as many MACs, each packet valid on its own
    (CTR under TEK from its IV, HMAC under TIK over its header terms and TRANS)."""
    batches = _counting_batches(monkeypatch)
    src, dst = machine("iv-src"), machine("iv-dst")
    ch = open_channel(src, dst)
    draws: list[int] = []
    trng = src.firmware.ports.trng
    monkeypatch.setattr(src.firmware, "ports",
                        dataclasses.replace(src.firmware.ports, trng=lambda n: draws.append(n) or trng(n)))
    sends = [_batch_cmd(src, CommandId.SEND_UPDATE_DATA, ch.sh, IMAGE_BASE, i, 0) for i in range(8)]
    assert ring_run(src, sends, per_doorbell=False) == [0] * 8
    assert batches == [8] and draws == [16 * 8]
    hdrs = [HdrBuf.decode(get(src, BATCH_HDRS + 64 * i, HdrBuf.SIZE)) for i in range(8)]
    assert len({h.iv for h in hdrs}) == 8 and len({h.mac for h in hdrs}) == 8
    g = src.firmware.guests[ch.sh]
    for i, h in enumerate(hdrs):
        trans = get(src, BATCH_TRANS + PAGE * i, PAGE)
        dec = Cipher(algorithms.AES(g.tek), modes.CTR(h.iv)).decryptor()
        assert dec.update(trans) + dec.finalize() == IMAGE[:PAGE]
        aad = bytes([DATA_CONTEXT]) + struct.pack("<I", h.flags) + h.iv + struct.pack("<II", PAGE, PAGE)
        assert hmac.compare_digest(hmac.new(g.tik, aad + trans, "sha256").digest(), h.mac)


def test_whole_page_batches_read_the_command_layout_as_decode_does() -> None:
    """The batch runners read TransportCmd fields from the queued buffers' bytes (as u64 words):
    the same values as TransportCmd.decode, and a buffer with a reserved byte set -- which does not
    decode -- is seen as one (that batch then goes command by command)."""
    import numpy as np

    from sevemu.firmware.sev import migrate

    rng = np.random.default_rng(5)
    for _ in range(20):
        cmd = TransportCmd(handle=int(rng.integers(1 << 32)), hdr_paddr=int(rng.integers(1 << 63)),
                           hdr_len=int(rng.integers(1 << 32)), guest_paddr=int(rng.integers(1 << 63)),
                           guest_len=int(rng.integers(1 << 32)), trans_paddr=int(rng.integers(1 << 63)),
                           trans_len=int(rng.integers(1 << 32)))
        cols = migrate._cmd_columns(cmd.encode() * 3, 3)
        assert cols is not None
        for row in range(3):
            assert {name: int(col[row]) for name, col in zip(migrate._COLUMNS, cols, strict=True)} == {
                name: getattr(cmd, name) for name in migrate._COLUMNS}
    reserved = [i for i in range(TransportCmd.SIZE)
                if not any(lo <= i < lo + size for lo, size in (field_span(TransportCmd, f) for f in migrate._COLUMNS))]
    assert reserved  # the layout has reserved bytes: each one set makes decode refuse the buffer
    for i in reserved:
        raw = bytearray(TransportCmd.SIZE)
        raw[i] = 1
        with pytest.raises(LayoutError):
            TransportCmd.decode(bytes(raw))
        good = TransportCmd(handle=1, hdr_paddr=2, hdr_len=3, guest_paddr=4, guest_len=5, trans_paddr=6,
                            trans_len=7).encode()
        assert migrate._cmd_columns(good + bytes(raw) + good, 3) is None
        assert migrate._cmd_columns(good + good, 2) is not None


def test_whole_page_batches_find_every_overlap() -> None:
    """The batch runners' overlap test (outputs against outputs and inputs) against a plain pairwise
    check, on random layouts: the usual ordered one, shuffled ones, ones with collisions."""
    import numpy as np

    from sevemu.firmware.sev import migrate

    rng = np.random.default_rng(11)

    def plain(outs: list[tuple[list[int], int]], ins: list[tuple[list[int], int]]) -> bool:
        o = [(a, a + n) for starts, n in outs for a in starts]
        i = [(a, a + n) for starts, n in ins for a in starts]
        pairs = [(x, y) for k, x in enumerate(o) for y in o[k + 1 :]] + [(x, y) for x in o for y in i]
        return all(x[1] <= y[0] or y[1] <= x[0] for x, y in pairs)

    for trial in range(300):
        n = int(rng.integers(2, 12))
        fams = []
        for length in (0x34, PAGE, PAGE, 0x40):
            base = int(rng.integers(0, 64)) * 0x1000
            step = length if trial % 3 else int(rng.integers(1, 3)) * 0x800
            starts = [base + k * step for k in range(n)]
            if trial % 4 == 1:
                rng.shuffle(starts)
            if trial % 5 == 2:
                starts[int(rng.integers(n))] = starts[int(rng.integers(n))]
            fams.append(([int(x) for x in starts], length))
        outs, ins = fams[:2], fams[2:]
        as_np = [(np.array(s, dtype=np.uint64), np.uint64(length)) for s, length in outs]
        ins_np = [(np.array(s, dtype=np.uint64), np.uint64(length)) for s, length in ins]
        assert migrate._disjoint(as_np, ins_np) is plain(outs, ins), (outs, ins)


def test_whole_page_batches_seal_and_open_the_same_bytes_without_the_c_helper(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The firmware's packets through OpenSSL in the C helper and through the Python path (a build
    without the helper): the same headers, TRANS and received memory, byte for byte."""
    from sevemu.crypto import transport

    worlds = []
    for accel in (transport.ACCELERATED, False):
        monkeypatch.setattr(transport, "ACCELERATED", accel)
        src, dst = machine("whole-src"), machine("whole-dst")
        ch = open_channel(src, dst)
        assert src.firmware.guests[ch.sh].packets.accelerated is accel  # type: ignore[union-attr]
        ring_run(src, [_batch_cmd(src, CommandId.SEND_UPDATE_DATA, ch.sh, IMAGE_BASE, i, i % 4) for i in range(8)],
                 per_doorbell=False)
        out = get(src, BATCH_HDRS, 64 * 8) + get(src, BATCH_TRANS, PAGE * 8)
        put(dst, BATCH_HDRS, out[: 64 * 8])
        put(dst, BATCH_TRANS, out[64 * 8 :])
        status = ring_run(dst, [_batch_cmd(dst, CommandId.RECEIVE_UPDATE_DATA, ch.dh, TARGET_BASE, i, i)
                                for i in range(8)], per_doorbell=False)
        g = dst.firmware.guests[ch.dh]
        worlds.append((out, status, dst.soc.mc.read(TARGET_BASE, 8 * PAGE, g.asid, True)))
    assert worlds[0] == worlds[1]
    assert worlds[0][1] == [0] * 8
    assert worlds[0][2] == IMAGE * 2


@pytest.mark.parametrize("change", [False, True])
def test_whole_page_receives_see_the_hosts_dirty_lines_of_trans(monkeypatch: pytest.MonkeyPatch,
                                                               change: bool) -> None:
    """A batch of RECEIVE_UPDATE_DATA reads TRANS coherently: a line of a packet the host wrote
    and left dirty in its cache (not flushed) is what the PSP reads -- the packet opened where it
    lies in DRAM only when no such line is there.  The same bytes rewritten change nothing; a
    byte altered in the cache only is refused (BAD_MEASUREMENT) as one by one, the rest received."""
    batches = _counting_batches(monkeypatch)

    def cached(m: Machine) -> None:
        spa = BATCH_TRANS + 3 * PAGE + 128
        line = bytearray(get(m, spa, 64))
        line[5] ^= int(change)
        m.hv.core.host_write(spa, bytes(line))

    worlds = [_whole_page_world("dirty", batched, lambda h, t: None, cached=cached) for batched in (False, True)]
    assert worlds[0] == worlds[1]
    _, _, d_status, memory, _, _ = worlds[1]
    assert d_status == ([0] * 3 + [Status.BAD_MEASUREMENT] + [0] * 4 if change else [0] * 8)
    assert batches == ([8, 3, 4] if change else [8, 8])
    for i in range(8):
        assert (memory[i * PAGE : (i + 1) * PAGE] == IMAGE[(i % 4) * PAGE : (i % 4 + 1) * PAGE]) is (not change or i != 3)


# ---- the whole-page checks' column summaries (sevemu.hw.columns), in C and in numpy ----------------
class _Raw:
    """A queued command buffer given as its bytes (for one with a reserved byte set)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def encode(self) -> bytes:
        return self.raw


def _reserved_offset() -> int:
    spans = [field_span(TransportCmd, name) for name in ("handle", "hdr_paddr", "hdr_len", "guest_paddr",
                                                         "guest_len", "trans_paddr", "trans_len")]
    return next(i for i in range(TransportCmd.SIZE) if not any(lo <= i < lo + n for lo, n in spans))


# command index -> field overrides ("raw": a reserved byte set) of the eight SENDs / RECEIVEs
_SEND_FAULTS: dict[str, dict[int, dict[str, int]]] = {
    "none": {},
    "reserved byte": {3: {"raw": 1}},
    "another handle": {3: {"handle": 77}},
    "unaligned guest page": {4: {"guest_paddr": IMAGE_BASE + PAGE + 16}},
    "header length written back": {2: {"hdr_len": 0x40}},
    "short TRANS": {5: {"trans_len": 0x800}},
    "TRANS over the headers": {6: {"trans_paddr": BATCH_HDRS}},
    "two TRANS on one page": {5: {"trans_paddr": BATCH_TRANS + 4 * PAGE}},
    "two headers in one slot": {5: {"hdr_paddr": BATCH_HDRS + 64 * 4}},
    "TRANS on a ring page": {1: {"trans_paddr": RING_STATUS}},
    "guest page outside DRAM": {7: {"guest_paddr": OUTSIDE}},
    "headers in reverse order": {i: {"hdr_paddr": BATCH_HDRS + 64 * (7 - i)} for i in range(8)},
}
_RECEIVE_FAULTS: dict[str, dict[int, dict[str, int]]] = {
    "none": {},
    "reserved byte": {6: {"raw": 1}},
    "short TRANS": {2: {"trans_len": 0x800}},
    "short header length": {1: {"hdr_len": 0x30}},
    "two commands on one guest page": {4: {"guest_paddr": TARGET_BASE + 3 * PAGE}},
    "a header in a page received": {5: {"hdr_paddr": TARGET_BASE + 6 * PAGE}},
    "TRANS outside DRAM": {3: {"trans_paddr": OUTSIDE}},
    "guest pages in reverse order": {i: {"guest_paddr": TARGET_BASE + (7 - i) * PAGE} for i in range(8)},
}


def _faulty(m: Machine, cid: CommandId, handle: int, base: int, over: dict[int, dict[str, int]]) -> list[Any]:
    cmds: list[Any] = []
    for i in range(8):
        fields = dict(over.get(i, {}))
        raw = fields.pop("raw", 0)
        who = handle + fields.pop("handle", 0)
        if "guest_paddr" in fields:
            fields["guest_paddr"] |= m.profile.cbit_mask
        page = i % 4 if cid == CommandId.SEND_UPDATE_DATA else i
        cmd = _batch_cmd(m, cid, who, base, i, page, **fields)
        if raw:
            buf = bytearray(cmd[1].encode())
            buf[_reserved_offset()] = raw
            cmd = (cid, _Raw(bytes(buf)))  # type: ignore[arg-type]
        cmds.append(cmd)
    return cmds


def _faulty_world(seed: str, batched: bool, sends: dict[int, dict[str, int]],
                  receives: dict[int, dict[str, int]]) -> tuple[object, ...]:
    """Eight whole-page SENDs (``sends``: their faults), then eight RECEIVEs of the packets they left
    (``receives``: their faults), one doorbell each or one for all; the statuses, the bytes
    written, the received memory, both logs and both guests' states."""
    src, dst = machine(f"{seed}-src"), machine(f"{seed}-dst")
    ch = open_channel(src, dst)
    s_status = ring_run(src, _faulty(src, CommandId.SEND_UPDATE_DATA, ch.sh, IMAGE_BASE, sends), per_doorbell=not batched)
    sent = get(src, BATCH_HDRS, 64 * 8) + get(src, BATCH_TRANS, PAGE * 8)
    put(dst, BATCH_HDRS, get(src, BATCH_HDRS, 64 * 8))
    put(dst, BATCH_TRANS, get(src, BATCH_TRANS, PAGE * 8))
    d_status = ring_run(dst, _faulty(dst, CommandId.RECEIVE_UPDATE_DATA, ch.dh, TARGET_BASE, receives),
                        per_doorbell=not batched)
    g = dst.firmware.guests[ch.dh]
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors
    return (s_status, sent, d_status, get(dst, BATCH_HDRS, 64 * 8), dst.soc.mc.read(TARGET_BASE, 8 * PAGE, g.asid, True),
            src.firmware.log[-8:], dst.firmware.log[-8:], g.state, src.firmware.guests[ch.sh].state)


@pytest.mark.parametrize(("sends", "receives"), [(s, "none") for s in _SEND_FAULTS] +
                         [("none", r) for r in _RECEIVE_FAULTS if r != "none"])
def test_whole_page_checks_refuse_as_one_by_one_in_c_and_in_numpy(monkeypatch: pytest.MonkeyPatch,
                                                                  sends: str, receives: str) -> None:
    """A doorbell of eight SEND_UPDATE_DATA then one of eight RECEIVE_UPDATE_DATA, one command of
    them faulty -- a reserved byte set, another handle, an unaligned guest page, a header length to
    write back, a short TRANS, an output over another command's output or input, a region on a ring
    page or outside DRAM -- or all valid in an unusual order: the whole-page checks, whose column
    summaries run in C (sevemu.hw.columns) or in numpy, give the statuses, bytes, logs and guest
    states of a doorbell per command, the faulty command refused with its own status and nothing of
    it written."""
    from sevemu.hw import memaccel

    worlds = [_faulty_world("faults", False, _SEND_FAULTS[sends], _RECEIVE_FAULTS[receives])]
    for c in (memaccel.COLUMNS, False):
        monkeypatch.setattr(memaccel, "COLUMNS", c)
        worlds.append(_faulty_world("faults", True, _SEND_FAULTS[sends], _RECEIVE_FAULTS[receives]))
    assert worlds[0] == worlds[1] == worlds[2]
    s_status, d_status = worlds[0][0], worlds[0][2]
    assert isinstance(s_status, list) and isinstance(d_status, list)
    refused = {"reserved byte": 3, "another handle": 3, "unaligned guest page": 4, "short TRANS": 5,
               "TRANS on a ring page": 1, "guest page outside DRAM": 7}.get(sends)
    if refused is not None:
        assert s_status[refused] and s_status.count(0) == 7
    refused = {"reserved byte": 6, "short TRANS": 2, "short header length": 1, "a header in a page received": 5,
               "TRANS outside DRAM": 3}.get(receives)
    if refused is not None:
        assert d_status[refused] and d_status.count(0) == 7
    if (sends, receives) == ("none", "none"):
        assert s_status == d_status == [0] * 8
