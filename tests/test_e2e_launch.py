"""End to end: a guest owner launches a measured SEV guest on a remote host and gives it a secret.

owner builds a session for the platform's PDH -> the hypervisor launches the guest image with it ->
the owner checks LAUNCH_MEASURE against the launch digest it computes itself -> the owner seals an
OVMF secret table to that launch -> LAUNCH_SECRET -> LAUNCH_FINISH -> the guest reads the secret in
plaintext at its GPA, while the hypervisor (after a WBINVD) reads ciphertext.  Then what goes wrong
when somebody cheats, each case naming the status or exception, with guest memory unchanged.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import MiB
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.pycode import code_table
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.certs.chain import PlatformChain
from sevemu.certs.sev import SevCert
from sevemu.crypto.transport import MeasureMacError
from sevemu.errors import MailboxError, VmError
from sevemu.guest.kernel import boot, print_
from sevemu.guest.workloads import read_back
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.report import verify_attestation_report
from sevemu.owner.secret import parse_secret_table
from sevemu.owner.session import LaunchSession, MeasuredLaunch
from sevemu.scenario import Machine, build_machine

MEM = 16 * MiB
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
IMAGE = b"".join(f"sevemu e2e firmware volume, line {i:05d}\n".encode().ljust(64, b".") for i in range(128))
DISK_KEY_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")  # sevctl's disk-passphrase GUID
DISK_KEY = b"correct horse battery staple: the LUKS passphrase"


# ---- the platform and what its owner learns from it ---------------------------------------------
def platform_certs(m: Machine) -> tuple[SevCert, SevCert]:
    """(PDH, PEK) as the owner gets them: PDH_CERT_EXPORT through the host, ASK || ARK from AMD, the
    whole chain verified up to the pinned (emulated) ARK."""
    pdh, chain_blob = m.hv.sev.platform_certs()
    assert m.amd_root is not None
    chain = PlatformChain.from_buffers(pdh, chain_blob, m.amd_root.amd_certs.encode())
    chain.verify([m.amd_root.pin()])
    return chain.pdh, chain.pek


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="e2e-launch", dram_size=1 << 30, cache_size=256 << 10)


def _public(cert: SevCert) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


@dataclass
class Owner:
    """The guest owner: holds the platform's PDH and PEK, verified up to AMD's ARK."""

    pdh: SevCert
    pek: SevCert
    policy: int

    @classmethod
    def of(cls, m: Machine, policy: int = int(GuestPolicy.NOKS)) -> Owner:
        pdh, pek = platform_certs(m)
        return cls(pdh, pek, policy)

    def session(self) -> LaunchSession:
        return LaunchSession.create(_public(self.pdh), self.policy)

    def check(self, m: Machine, sess: LaunchSession, blob: bytes, image: bytes = IMAGE) -> MeasuredLaunch:
        st = m.hv.platform_status()  # the version the MAC binds; a lie would fail the check
        return sess.verify_measurement(blob, api_major=st.api_major, api_minor=st.api_minor, build=st.build,
                                       expected_ld=expected_launch_digest([image, CODE]))


def _debug_guest() -> Workload:
    yield from boot(MEM)
    yield op.write(SECRET_GPA + 0x100, b"guest wrote this, still in the cache")
    yield op.hlt()
    data = yield op.read(SECRET_GPA + 0x200, 16)
    yield from print_(data.hex() + "\n")
    yield op.hlt()


# The guest's Python code, measured after the image: the owner's digest covers it.
PROGRAMS = (read_back, _debug_guest)
CODE = code_table(PROGRAMS)


def measured_vm(m: Machine, owner: Owner, name: str = "guest", image: bytes = IMAGE,
                sess: LaunchSession | None = None) -> tuple[Vm, LaunchSession, bytes]:
    sess = sess or owner.session()
    vm = m.hv.create_vm(name, MEM)
    blob = m.hv.launch_measure(vm, [(IMAGE_GPA, image)], owner.policy, godh_cert=sess.godh_cert_blob,
                               session=sess.session_blob, programs=PROGRAMS)
    return vm, sess, blob


def console_hex(vm: Vm) -> bytes:
    return bytes.fromhex(vm.console.decode().strip().splitlines()[-1])


# ---- the happy path ----------------------------------------------------------------------------
def test_owner_launch_secret_attestation_end_to_end(m: Machine) -> None:
    owner = Owner.of(m)
    vm, sess, blob = measured_vm(m, owner)
    assert vm.state is VmState.LAUNCHING and m.hv.guest_status(vm).state == GuestState.LSECRET
    measured = owner.check(m, sess, blob)
    packet = measured.launch_secret([(DISK_KEY_GUID, DISK_KEY)])
    m.hv.launch_secret(vm, packet.header_bytes, packet.trans, SECRET_GPA)
    m.hv.launch_finish(vm)
    assert vm.state is VmState.RUNNING and m.hv.guest_status(vm).state == GuestState.RUNNING

    # attestation: PEK-signed, the owner's MNONCE, the digest it expects, its policy
    mnonce = bytes.fromhex("00112233445566778899aabbccddeeff")
    report = m.hv.attestation_report(vm, mnonce)
    verify_attestation_report(report, _public(owner.pek), mnonce=mnonce,
                              launch_digest=expected_launch_digest([IMAGE, CODE]), policy=owner.policy)

    # the guest reads its secret table in plaintext
    table_len = packet.guest_len
    vm.add_vcpu(PyEngine(read_back(MEM, SECRET_GPA, table_len)))
    assert m.hv.run(vm).reason == "hlt"
    table = console_hex(vm)
    assert parse_secret_table(table) == {DISK_KEY_GUID: DISK_KEY}

    # the hypervisor, even after writing every cache line back, sees ciphertext only
    m.soc.wbinvd_all()
    host_view = vm.host_read(SECRET_GPA, table_len)
    assert host_view != table and DISK_KEY not in host_view
    assert DISK_KEY not in m.soc.dram.read(vm.spa_of(SECRET_GPA) & ~0xFFF, 4096)
    # ... and so is the measured image, which the guest sees in the clear
    assert vm.host_read(IMAGE_GPA, 64) != IMAGE[:64]
    assert not m.firmware.internal_errors


def test_debuggable_guest_is_readable_by_the_host(m: Machine) -> None:
    """Policy NODBG = 0 lets the hypervisor read and write the guest through the firmware -- the secret
    included; the hypervisor flushes the guest's cached lines first (the firmware sees DRAM)."""
    owner = Owner.of(m, policy=int(GuestPolicy.NOKS))
    vm, sess, blob = measured_vm(m, owner)
    packet = owner.check(m, sess, blob).launch_secret_raw(DISK_KEY.ljust(64, b"\0"))
    m.hv.launch_secret(vm, packet.header_bytes, packet.trans, SECRET_GPA)
    m.hv.launch_finish(vm)
    assert m.hv.dbg_decrypt(vm, SECRET_GPA, len(DISK_KEY)) == DISK_KEY

    vm.add_vcpu(PyEngine(_debug_guest()))
    assert m.hv.run(vm).reason == "hlt"
    # the store is a dirty guest line; dbg_decrypt flushes it to DRAM before asking the firmware
    assert m.hv.dbg_decrypt(vm, SECRET_GPA + 0x100, 36) == b"guest wrote this, still in the cache"
    head = m.hv.dbg_decrypt(vm, SECRET_GPA + 0x200, 3)  # what the guest sees there (never written)
    m.hv.dbg_encrypt(vm, SECRET_GPA + 0x203, b"host-injected")  # unaligned: read-modify-write
    assert m.hv.run(vm).reason == "hlt"
    assert console_hex(vm) == head + b"host-injected"


def test_nodbg_guest_refuses_debugging(m: Machine) -> None:
    owner = Owner.of(m, policy=int(GuestPolicy.NOKS | GuestPolicy.NODBG))
    vm, _sess, _blob = measured_vm(m, owner)
    m.hv.launch_finish(vm)
    for attempt in (lambda: m.hv.dbg_decrypt(vm, IMAGE_GPA, 16), lambda: m.hv.dbg_encrypt(vm, IMAGE_GPA, b"x" * 16)):
        with pytest.raises(MailboxError) as exc:
            attempt()
        assert exc.value.status == Status.POLICY_FAILURE


# ---- cheating --------------------------------------------------------------------------------------
def test_hypervisor_cannot_weaken_the_policy(m: Machine) -> None:
    owner = Owner.of(m, policy=int(GuestPolicy.NOKS | GuestPolicy.NODBG))
    sess = owner.session()
    vm = m.hv.create_vm("guest", MEM)
    guests = dict(m.firmware.guests)
    with pytest.raises(MailboxError) as exc:
        m.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], int(GuestPolicy.NOKS), godh_cert=sess.godh_cert_blob,
                            session=sess.session_blob)
    assert exc.value.status == Status.BAD_MEASUREMENT
    assert vm.state is VmState.CREATED and m.firmware.guests == guests


def test_tampered_session_is_refused(m: Machine) -> None:
    owner = Owner.of(m)
    sess = owner.session()
    for offset in (0x00, 0x10, 0x30, 0x40, 0x60):  # nonce, wrap_tk, wrap_iv, wrap_mac, policy_mac
        blob = bytearray(sess.session_blob)
        blob[offset] ^= 1
        vm = m.hv.create_vm(f"guest-{offset:x}", MEM)
        with pytest.raises(MailboxError) as exc:
            m.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], owner.policy, godh_cert=sess.godh_cert_blob,
                                session=bytes(blob))
        assert exc.value.status == Status.BAD_MEASUREMENT
        assert vm.state is VmState.CREATED
        m.hv.destroy(vm)
    assert not m.firmware.guests


def test_owner_refuses_an_unexpected_image(m: Machine) -> None:
    """The hypervisor boots another image: the owner's check fails, no secret is released."""
    owner = Owner.of(m)
    evil = IMAGE.replace(b"line 00042", b"line EVIL!")
    _vm, sess, blob = measured_vm(m, owner, image=evil)
    with pytest.raises(MeasureMacError):
        owner.check(m, sess, blob)
    owner.check(m, sess, blob, image=evil)  # what was really measured


def _page(m: Machine, vm: Vm, gpa: int) -> bytes:
    return m.soc.dram.read(vm.spa_of(gpa) & ~0xFFF, 4096)


def test_stale_or_foreign_secret_is_refused(m: Machine) -> None:
    owner = Owner.of(m)
    first, sess, blob = measured_vm(m, owner, "first")
    stale = owner.check(m, sess, blob).launch_secret([(DISK_KEY_GUID, DISK_KEY)])
    # the hypervisor relaunches with the same owner blobs and replays the released secret
    again, _, _blob2 = measured_vm(m, owner, "again", sess=sess)
    m.hv.launch_secret(first, stale.header_bytes, stale.trans, SECRET_GPA)  # fine for its own launch
    before = _page(m, again, IMAGE_GPA)
    with pytest.raises(MailboxError) as exc:
        m.hv.launch_secret(again, stale.header_bytes, stale.trans, IMAGE_GPA)
    assert exc.value.status == Status.BAD_MEASUREMENT
    assert _page(m, again, IMAGE_GPA) == before
    # a secret sealed for another guest's session (another TIK)
    _other, other_sess, other_blob = measured_vm(m, owner, "other")
    foreign = owner.check(m, other_sess, other_blob).launch_secret([(DISK_KEY_GUID, DISK_KEY)])
    with pytest.raises(MailboxError) as exc:
        m.hv.launch_secret(again, foreign.header_bytes, foreign.trans, IMAGE_GPA)
    assert exc.value.status == Status.BAD_MEASUREMENT
    assert _page(m, again, IMAGE_GPA) == before
    # wrong lengths: the header is 0x34 bytes, guest_len must equal trans_len
    for header, trans, guest_len in ((stale.header_bytes[:-1], stale.trans, None),
                                     (stale.header_bytes, stale.trans, len(stale.trans) + 16)):
        with pytest.raises(MailboxError) as exc:
            m.hv.launch_secret(first, header, trans, SECRET_GPA, guest_len=guest_len)
        assert exc.value.status == Status.INVALID_LENGTH
    assert m.hv.guest_status(again).state == GuestState.LSECRET
    assert not m.firmware.internal_errors


def test_secret_region_must_be_physically_contiguous(m: Machine) -> None:
    owner = Owner.of(m)
    vm, sess, blob = measured_vm(m, owner)
    packet = owner.check(m, sess, blob).launch_secret_raw(bytes(range(256)) * 2)
    vm.back(0x300000 + 0x1000)  # back the second page first: the two pages are not adjacent in SPA
    vm.back(0x300000)
    with pytest.raises(VmError):
        m.hv.launch_secret(vm, packet.header_bytes, packet.trans, 0x300000 + 0x1000 - 0x100)
    m.hv.launch_secret(vm, packet.header_bytes, packet.trans, 0x300000 + 0x800)  # within one page


def test_secret_steps_need_a_measured_launch(m: Machine) -> None:
    owner = Owner.of(m)
    vm = m.hv.create_vm("guest", MEM)
    with pytest.raises(VmError):
        m.hv.launch_secret(vm, bytes(0x34), bytes(16), SECRET_GPA)
    with pytest.raises(VmError):
        m.hv.launch_finish(vm)
    sess = owner.session()
    m.hv.launch(vm, [(IMAGE_GPA, IMAGE)], owner.policy, godh_cert=sess.godh_cert_blob, session=sess.session_blob)
    assert vm.state is VmState.RUNNING
    with pytest.raises(VmError):
        m.hv.launch_secret(vm, bytes(0x34), bytes(16), SECRET_GPA)
