"""Host attacks on the firmware's checks, written with host interfaces only.

Each test plays the hypervisor as an attacker: it drives the PSP mailbox (``hv.psp``), the host's
own cores and caches (``hv.soc``: loads, stores, CLFLUSH, WBINVD, VMRUN through the run loop) and
its guests, and asserts what the hardware answers.  Internal state is looked at only to check a
test's precondition (e.g. that the victim's plaintext really sits dirty in the caches).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fwkit import call, ok

from sevemu._util.units import PAGE, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.paging import ExitCode
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import (
    ActivateCmd,
    DbgCmd,
    GuestStatusCmd,
    InitCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    MeasureBuf,
    PdhCertExportCmd,
    PlatformStatus,
    SendStartCmd,
    TransportCmd,
)
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.amd.roots import AmdRoot
from sevemu.crypto.ecc import ecdh
from sevemu.crypto.transport import TransportKeys, open_session
from sevemu.firmware.core import LOG_SIZE
from sevemu.firmware.nvstore import FACTORY_DIR, FactoryDataError
from sevemu.guest.kernel import boot
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.owner.secret import package_secret
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

MEM = 4 * MiB
SECRET_GPA = 0x20_0000
IMAGE_GPA = 0x10_0000


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="fw-attacks", dram_size=1 << 30, cache_size=1 << 20)


def _writer(gpa: int, data: bytes) -> Generator[Op, Any, None]:
    yield from boot(MEM)
    yield op.write(gpa, data)
    yield op.hlt()


def _victim(m: Machine, secret: bytes, policy: int = GuestPolicy.NODBG) -> Vm:
    """A NODBG guest that booted and wrote ``secret`` (still dirty in the caches)."""
    vm = m.hv.create_vm("victim", MEM)
    m.hv.launch(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], policy=policy, programs=[_writer])
    vm.add_vcpu(PyEngine(_writer(SECRET_GPA, secret)))
    assert m.hv.run(vm).reason == "hlt"
    return vm


def _dirty_lines(m: Machine, asid: int) -> int:
    """Precondition check only (not a host interface): dirty lines of ``asid`` in the caches."""
    return sum(1 for key in m.soc.cache.dirty if key >> 52 == (asid << 1) | 1)


def _start(m: Machine, policy: int = 0) -> int:
    return LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))).handle


def _dbg_decrypt(m: Machine, handle: int, spa: int, length: int) -> bytes:
    dst = m.hv.psp.put_data(bytes(length))
    ok(m, CommandId.DBG_DECRYPT, DbgCmd(handle=handle, src_paddr=spa | m.profile.cbit_mask, dst_paddr=dst,
                                        len=length))
    return m.hv.psp.get_data(length)


def _leaks(secret: bytes, seen: bytes) -> bool:
    """Whether any 16-byte block of ``secret`` shows up in ``seen``."""
    return any(secret[i : i + 16] in seen for i in range(0, len(secret), 16))


# ---- issue 8 item 1: ASIDs across SHUTDOWN -> INIT -----------------------------------------------
def test_asid_reuse_after_shutdown_and_init_needs_wbinvd_and_df_flush(m: Machine) -> None:
    secret = os.urandom(PAGE)
    victim = _victim(m, secret)
    asid, spa = victim.asid, victim.spa_of(SECRET_GPA)
    assert _dirty_lines(m, asid) >= PAGE // 64  # the victim's plaintext is dirty in the caches

    # the host tears the platform down and up again and gives the victim's ASID to a debuggable guest
    ok(m, CommandId.SHUTDOWN)
    ok(m, CommandId.INIT, InitCmd())
    spy = _start(m, policy=0)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))[0] == Status.WBINVD_REQUIRED
    assert call(m, CommandId.DF_FLUSH)[0] == Status.WBINVD_REQUIRED  # INIT cleared the WBINVD record
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid + 1))[0] == Status.WBINVD_REQUIRED
    m.hv.soc.wbinvd_all()  # the victim's lines go back to DRAM under the victim's key (still in its slot)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))[0] == Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.DF_FLUSH)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))
    # with the correct flushes the debuggable guest's key decrypts the victim's page to noise
    assert not _leaks(secret, _dbg_decrypt(m, spy, spa, PAGE))


def test_every_asid_is_dirty_after_init_until_wbinvd_and_df_flush(m: Machine) -> None:
    ok(m, CommandId.SHUTDOWN)
    ok(m, CommandId.INIT, InitCmd())
    g = _start(m)
    for asid in (m.profile.min_sev_asid, m.profile.max_asid):
        assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=asid))[0] == Status.WBINVD_REQUIRED
    m.hv.soc.wbinvd_all()
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=m.profile.max_asid))[0] == \
        Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.DF_FLUSH)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=m.profile.max_asid))


def test_a_wbinvd_before_init_does_not_count(m: Machine) -> None:
    ok(m, CommandId.SHUTDOWN)
    m.hv.soc.wbinvd_all()  # AF clears WBINVD_DONE at INIT: only a WBINVD after INIT counts
    ok(m, CommandId.INIT, InitCmd())
    assert call(m, CommandId.DF_FLUSH)[0] == Status.WBINVD_REQUIRED


# ---- issue 8 item 2, the firmware's side: SHUTDOWN invalidates every ASID for VMRUN -------------
def test_no_zombie_guest_runs_after_shutdown(m: Machine) -> None:
    secret = os.urandom(PAGE)
    victim = _victim(m, secret, policy=0)
    ok(m, CommandId.SHUTDOWN)
    out: list[bytes] = []

    def reader() -> Generator[Op, Any, None]:
        data = yield op.read(SECRET_GPA, 64)
        out.append(data)
        yield op.hlt()

    r = m.hv.run(victim, engine=PyEngine(reader()))
    assert r.exit.code == ExitCode.INVALID and victim.state is VmState.CRASHED and not out


# ---- issue 8 item 8a: LAUNCH_MEASURE only in LUPDATE --------------------------------------------
def test_a_running_guest_cannot_be_sent_back_to_lsecret(m: Machine) -> None:
    """Without LAUNCH_MEASURE's guest-state check a RUNNING guest (channel closed: TEK = TIK = 0)
    would return to LSECRET and take a LAUNCH_SECRET the host sealed with the all-zero keys."""
    sess = LaunchSession.create(m.firmware.identity.pdh_cert.public_key(), 0)  # type: ignore[arg-type]
    vm = m.hv.create_vm("g", MEM)
    m.hv.launch(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], godh_cert=sess.godh_cert_blob, session=sess.session_blob)
    measure_spa = m.hv.psp.put_data(bytes(MeasureBuf.SIZE))
    measure = LaunchUpdateDataCmd(handle=vm.handle, paddr=measure_spa, len=MeasureBuf.SIZE)
    assert call(m, CommandId.LAUNCH_MEASURE, measure)[0] == Status.INVALID_GUEST_STATE
    assert m.hv.psp.get_data(MeasureBuf.SIZE) == bytes(MeasureBuf.SIZE)  # nothing written
    st = GuestStatusCmd.decode(ok(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle)))
    assert st.state == GuestState.RUNNING
    # the host's forged packet under the all-zero channel keys is refused too
    zero = TransportKeys(bytes(16), bytes(16))
    p = m.profile
    packet = package_secret(zero, b"host-chosen secret, 32 bytes...!", measure=bytes(32), api_major=p.api_major,
                            api_minor=p.api_minor)
    hdr = m.hv.psp.put_data(packet.header_bytes, 0x1000)
    trans = m.hv.psp.put_data(packet.trans, 0x2000)
    spa = vm.back(SECRET_GPA)
    cmd = TransportCmd(handle=vm.handle, hdr_paddr=hdr, hdr_len=0x34, guest_paddr=spa | p.cbit_mask,
                       guest_len=packet.guest_len, trans_paddr=trans, trans_len=packet.guest_len)
    assert call(m, CommandId.LAUNCH_SECRET, cmd)[0] == Status.INVALID_GUEST_STATE


# ---- issue 8 item 8b: LAUNCH_MEASURE writes only within what the host said it has ----------------
@pytest.mark.parametrize("length", [0, 1, 0x10, 0x2F])
def test_launch_measure_with_a_short_buffer_writes_nothing_but_the_length(m: Machine, length: int) -> None:
    vm = m.hv.create_vm("g", MEM)
    handle = _start(m)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=vm.asid))
    canary = os.urandom(0x100)
    out = m.hv.psp.put_data(canary)
    status, back = call(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=out, len=length))
    assert status == Status.INVALID_LENGTH
    assert LaunchUpdateDataCmd.decode(back) == LaunchUpdateDataCmd(handle=handle, paddr=out, len=MeasureBuf.SIZE)
    assert m.hv.psp.get_data(0x100) == canary  # not one byte of the host's buffer was written
    # the guest is still in LUPDATE and measures normally with a long-enough buffer
    status, back = call(m, CommandId.LAUNCH_MEASURE,
                        LaunchUpdateDataCmd(handle=handle, paddr=out, len=MeasureBuf.SIZE + 0x10))
    assert status == Status.SUCCESS
    written = m.hv.psp.get_data(0x100)
    assert written[MeasureBuf.SIZE :] == canary[MeasureBuf.SIZE :]  # exactly 0x30 bytes written


def test_launch_measure_length_query_at_address_zero(m: Machine) -> None:
    handle = _start(m)
    status, back = call(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=0, len=0x100))
    assert status == Status.INVALID_LENGTH and LaunchUpdateDataCmd.decode(back).len == MeasureBuf.SIZE


# ---- issue 8 item 7: the command log is bounded --------------------------------------------------
def test_the_command_log_is_a_ring(m: Machine) -> None:
    for _ in range(LOG_SIZE + 10):
        call(m, CommandId.PLATFORM_STATUS, PlatformStatus())
    log = m.firmware.log
    assert len(log) == LOG_SIZE
    assert log[-1] == ("PLATFORM_STATUS", int(Status.SUCCESS))
    call(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=77))
    assert len(log) == LOG_SIZE and log[-1][0] == "GUEST_STATUS"
    assert list(log) == log[:] and log == list(log)


# ---- issue 8 item 3: the platform directory holds no key the host could use ---------------------
_P384_PKCS8_PREFIX = bytes.fromhex("3081b6020100301006072a8648ce3d020106052b81040022")
"""The DER header every unencrypted PKCS#8 P-384 private key starts with."""


def _host_readable(platform_dir: Path) -> bytes:
    """Every file of the platform directory the host can read: all but the fuses (silicon)."""
    return b"".join(p.read_bytes() for p in sorted(platform_dir.rglob("*"))
                    if p.is_file() and p != platform_dir / FACTORY_DIR / "fuses.bin")


def _key_forms(key: ec.EllipticCurvePrivateKey) -> list[bytes]:
    scalar = key.private_numbers().private_value.to_bytes(48, "big")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return [der, scalar, scalar[::-1]]


def test_the_platform_directory_leaks_no_key_and_no_session(tmp_path: Path) -> None:
    m = build_machine("milan", seed="leak", dram_size=1 << 30, platform_dir=tmp_path / "p")
    ident = m.firmware.identity  # the oracle: what the host must not find
    pdh_public = ident.pdh_cert.public_key()
    assert isinstance(pdh_public, ec.EllipticCurvePublicKey)
    policy = 0
    owner = LaunchSession.create(pdh_public, policy)
    vm = m.hv.create_vm("g", MEM)
    m.hv.launch_measure(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], policy, godh_cert=owner.godh_cert_blob,
                        session=owner.session_blob)  # the host relays the owner's blobs
    ok(m, CommandId.PDH_GEN)  # and makes the firmware write NV once more
    m.firmware.close()
    assert m.platform_dir is not None
    seen = _host_readable(m.platform_dir)
    assert len(seen) > 10_000  # the NV store and the factory certificates are there
    keys = [ident.oca_key, ident.pek_key, ident.pdh_key, ident.cek_key, m.firmware.identity.pdh_key]
    for key in keys:
        assert key is not None
        for form in _key_forms(key):
            assert form not in seen
    # the host's best attack on the relayed session would be the PDH private key from the directory:
    # no key in any encoding (above), no PKCS#8 structure at all
    assert _P384_PKCS8_PREFIX not in seen
    godh = owner.godh_public
    # control: the PDH private key -- which only the firmware holds -- does open the session
    assert ident.pdh_key is not None
    assert open_session(ecdh(ident.pdh_key, godh), owner.session_blob, policy) == owner.keys


# ---- issue 8 item 4: the trust anchors are fused, AMD's keys are not the host's -----------------
def _export(m: Machine) -> tuple[bytes, bytes]:
    """The target's PDH and PEK || OCA || CEK as PDH_CERT_EXPORT gives them to its host."""
    psp = m.hv.psp
    pdh_spa, chain_spa = psp.put_data(bytes(0x824)), psp.put_data(bytes(0x186C), 0x1000)
    ok(m, CommandId.PDH_CERT_EXPORT, PdhCertExportCmd(pdh_cert_paddr=pdh_spa, pdh_cert_len=0x824,
                                                      certs_paddr=chain_spa, certs_len=0x186C))
    return psp.get_data(0x824), psp.get_data(0x186C, 0x1000)


def _send_start(src: Machine, handle: int, pdh: bytes, chain: bytes, amd: bytes) -> int:
    psp = src.hv.psp
    cmd = SendStartCmd(handle=handle, pdh_cert_paddr=psp.put_data(pdh, 0x0000), pdh_cert_len=len(pdh),
                       plat_certs_paddr=psp.put_data(chain, 0x1000), plat_certs_len=len(chain),
                       amd_certs_paddr=psp.put_data(amd, 0x3000), amd_certs_len=len(amd),
                       session_paddr=psp.put_data(bytes(0x80), 0x5000), session_len=0x80)
    return call(src, CommandId.SEND_START, cmd)[0]


def test_a_host_minted_platform_is_not_a_trusted_migration_target(tmp_path: Path) -> None:
    src = build_machine("milan", seed="src", dram_size=1 << 30, platform_dir=tmp_path / "src")
    vm = src.hv.create_vm("g", MEM)
    src.hv.launch(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], policy=int(GuestPolicy.SEV))
    # The host holds nothing of the emulated AMD: no private key in the platform directory or the
    # host's cache, so it mints its own manufacturer and a whole platform from it.
    for where in (tmp_path / "src", Path(os.environ.get("SEVEMU_CACHE_DIR") or tmp_path / "none")):
        for f in (p for p in where.rglob("*") if p.is_file()):
            assert b"PRIVATE KEY" not in f.read_bytes(), f
    fake_root = AmdRoot.create("milan", key_bits=2048)
    fake = build_machine("milan", dram_size=1 << 30, platform_dir=tmp_path / "fake", amd_root=fake_root)
    pdh, chain = _export(fake)
    amd = fake_root.amd_certs.encode()
    assert _send_start(src, vm.handle, pdh, chain, amd) == Status.INVALID_CERTIFICATE
    # editing the source's factory data to trust the fake ARK does not help: the part refuses to boot
    src.firmware.close()
    folder = tmp_path / "src" / FACTORY_DIR
    ark0 = folder / "trusted_ark_0.cert"
    ark0.chmod(0o644)
    ark0.write_bytes(fake_root.ark.encode())
    with pytest.raises(FactoryDataError, match="not fused"):
        build_machine("milan", dram_size=1 << 30, platform_dir=tmp_path / "src")
    # control: a platform the same (emulated) AMD made is a valid target
    src2 = build_machine("milan", seed="src2", dram_size=1 << 30)
    vm2 = src2.hv.create_vm("g", MEM)
    src2.hv.launch(vm2, [(IMAGE_GPA, b"\xf4" * PAGE)], policy=int(GuestPolicy.SEV))
    real = build_machine("milan", seed="dst", dram_size=1 << 30)
    pdh, chain = _export(real)
    assert _send_start(src2, vm2.handle, pdh, chain, real.firmware.identity.amd_chain.encode()) == Status.SUCCESS
