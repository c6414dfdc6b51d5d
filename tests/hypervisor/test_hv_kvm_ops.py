"""KVM_MEMORY_ENCRYPT_OP (hypervisor/kvm_ops.py): sub-commands, KVM's errno/error semantics, length
queries, a whole owner launch, debug, attestation and a SEND/RECEIVE migration through the ioctl."""

from __future__ import annotations

import os
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import MiB
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.pycode import CODE_GPA, code_table
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.certs.sev import SevCert
from sevemu.guest.workloads import read_back
from sevemu.hw.pyengine import PyEngine
from sevemu.hypervisor.kvm_ops import (
    KVM_MEMORY_ENCRYPT_OP,
    KvmSev,
    KvmSevAttestationReport,
    KvmSevCertExport,
    KvmSevCmd,
    KvmSevCmdId,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    KvmSevReceiveStart,
    KvmSevReceiveUpdateData,
    KvmSevSendStart,
    KvmSevSendUpdateData,
    load_image,
)
from sevemu.hypervisor.sevdev import Errno, IoctlError, SevDevice, SevUserCmd, SevUserDataPdhCertExport
from sevemu.hypervisor.vm import VmState
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.report import verify_attestation_report
from sevemu.owner.secret import parse_secret_table
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

MEM = 16 * MiB
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
IMAGE = os.urandom(3 * 4096 + 512)
EIO, EINVAL, ENOTTY = -int(Errno.EIO), -int(Errno.EINVAL), -int(Errno.ENOTTY)


def machine(generation: str = "milan", seed: str = "kvm-ops") -> Machine:
    return build_machine(generation, seed=seed, dram_size=1 << 30, cache_size=256 << 10, init=False)


def pdh_of(m: Machine) -> tuple[SevCert, ec.EllipticCurvePublicKey]:
    """The platform's PDH as the owner receives it (PDH_CERT_EXPORT through /dev/sev)."""
    data = SevUserDataPdhCertExport(bytearray(0x824), 0x824, bytearray(3 * 0x824), 3 * 0x824)
    SevDevice(m.hv).issue(SevUserCmd.PDH_CERT_EXPORT, data)
    assert isinstance(data.pdh_cert_address, bytearray)
    pdh = SevCert.decode(bytes(data.pdh_cert_address))
    key = pdh.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return pdh, key


class Launch:
    """A guest launched through the ioctl, with an owner session."""

    def __init__(self, m: Machine, policy: int = 0, image: bytes = IMAGE, page_by_page: bool = True,
                 programs: tuple[object, ...] = ()) -> None:
        self.m = m
        self.dev = SevDevice(m.hv)
        self.vm = m.hv.create_vm("guest", MEM)
        self.kvm = KvmSev(m.hv, self.vm)
        assert self.kvm.memory_encrypt_op(KvmSevCmdId.INIT, sev_fd=self.dev) == 0
        _, pdh = pdh_of(m)
        self.sess = LaunchSession.create(pdh, policy)
        godh, session = self.sess.godh_cert_blob, self.sess.session_blob
        start = self.kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(
            policy=policy, dh_uaddr=godh, dh_len=len(godh), session_uaddr=session, session_len=len(session)),
            sev_fd=self.dev)
        assert start.handle == self.vm.handle != 0
        assert load_image(self.kvm, image, IMAGE_GPA, page_by_page=page_by_page) == 0
        if programs:  # the guest's Python code: its program table, measured last (as Hypervisor.launch does)
            assert load_image(self.kvm, code_table(programs), CODE_GPA) == 0
        self.image = image

    def measure(self) -> bytes:
        q = KvmSevLaunchMeasure()
        assert self.kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_MEASURE, q) == EIO  # the length query
        assert self.kvm.last_error == Status.INVALID_LENGTH and q.len == 0x30
        blob = bytearray(q.len)
        self.kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(uaddr=blob, len=len(blob)))
        return bytes(blob)


def test_ioctl_number() -> None:
    assert KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA  # _IOWR(0xAE, 0xBA, unsigned long)


def test_whole_launch_with_secret_through_the_ioctl() -> None:
    m = machine()
    launch = Launch(m, policy=int(GuestPolicy.NODBG), programs=(read_back,))
    blob = launch.measure()
    p = m.profile
    measured = launch.sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                              expected_ld=expected_launch_digest([IMAGE, code_table([read_back])]))
    guid = uuid.uuid4()
    packet = measured.launch_secret([(guid, b"the disk key")])
    kvm = launch.kvm
    kvm.op(KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(
        hdr_uaddr=packet.header_bytes, hdr_len=0x34, guest_uaddr=kvm.hva(SECRET_GPA), guest_len=packet.guest_len,
        trans_uaddr=packet.trans, trans_len=len(packet.trans)))
    assert launch.vm.state is VmState.LAUNCHING
    kvm.op(KvmSevCmdId.LAUNCH_FINISH)
    assert launch.vm.state is VmState.RUNNING
    status = kvm.op(KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus())
    assert (status.handle, status.policy, status.state) == (launch.vm.handle, int(GuestPolicy.NODBG),
                                                            GuestState.RUNNING)
    launch.vm.add_vcpu(PyEngine(read_back(MEM, SECRET_GPA, packet.guest_len)))
    assert m.hv.run(launch.vm).reason == "hlt"
    table = bytes.fromhex(launch.vm.console.decode().strip().splitlines()[-1])
    assert parse_secret_table(table) == {guid: b"the disk key"}
    # NODBG: the firmware refuses the debug window, KVM reports -EIO with POLICY_FAILURE
    out = bytearray(16)
    assert kvm.memory_encrypt_op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(kvm.hva(SECRET_GPA), out, 16)) == EIO
    assert kvm.last_error == Status.POLICY_FAILURE
    assert not m.firmware.internal_errors


def test_page_by_page_measures_like_one_call() -> None:
    m = machine()
    digests = []
    for page_by_page in (True, False):
        launch = Launch(m, page_by_page=page_by_page)
        blob = launch.measure()
        p = m.profile
        launch.sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                       expected_ld=expected_launch_digest([IMAGE]))
        digests.append(m.firmware.guests[launch.vm.handle].measured_ld)
    assert digests[0] == digests[1] == expected_launch_digest([IMAGE])


def test_errno_semantics() -> None:
    m = machine()
    dev = SevDevice(m.hv)
    vm = m.hv.create_vm("g", MEM)
    kvm = KvmSev(m.hv, vm)
    # nothing before INIT
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(), sev_fd=dev) == ENOTTY
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_FINISH) == ENOTTY
    assert kvm.memory_encrypt_op(99) == EINVAL and kvm.memory_encrypt_op(KvmSevCmdId.INIT2) == EINVAL
    assert kvm.memory_encrypt_op(KvmSevCmdId.INIT, sev_fd=dev) == 0
    assert kvm.memory_encrypt_op(KvmSevCmdId.INIT, sev_fd=dev) == -int(Errno.EBUSY)
    # LAUNCH_START needs an open /dev/sev; unknown fields and wrong structures are refused
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart()) == -int(Errno.EBADF)
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, {"bogus": 1}, sev_fd=dev) == EINVAL
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchMeasure(), sev_fd=dev) == -int(Errno.EFAULT)
    # blobs: NULL with a length is ignored (KVM looks at the pointer), a length without data is EINVAL
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, {"dh_uaddr": b"x", "dh_len": 0}, sev_fd=dev) == EINVAL
    # the firmware's refusal: -EIO with its status
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, {"policy": 0xFFC0}, sev_fd=dev) == EIO
    assert kvm.last_error == Status.POLICY_FAILURE and vm.handle == 0
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, {"policy": 0}, sev_fd=dev) == 0
    upd = KvmSevCmdId.LAUNCH_UPDATE_DATA
    assert kvm.memory_encrypt_op(upd, KvmSevLaunchUpdateData(kvm.hva(0), 0)) == EINVAL
    assert kvm.memory_encrypt_op(upd, KvmSevLaunchUpdateData(kvm.hva(MEM - 16), 32)) == -int(Errno.ENOMEM)
    assert kvm.memory_encrypt_op(upd, KvmSevLaunchUpdateData(0x1000, 16)) == -int(Errno.ENOMEM)  # not RAM
    assert kvm.memory_encrypt_op(upd, KvmSevLaunchUpdateData(kvm.hva(0x1000), 17)) == EIO  # exact length
    assert kvm.last_error == Status.INVALID_LENGTH
    # SEV (not SEV-ES): no VMSA to measure
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_UPDATE_VMSA) == ENOTTY
    cmd = KvmSevCmd(int(KvmSevCmdId.GUEST_STATUS))
    assert kvm.memory_encrypt_op(cmd) == 0 and cmd.data.state == GuestState.LUPDATE and cmd.error == 0
    with pytest.raises(IoctlError, match="EIO.*INVALID_GUEST_STATE"):
        kvm.op(KvmSevCmdId.LAUNCH_FINISH)
    assert not m.firmware.internal_errors


def test_init_after_vcpus_and_es_init() -> None:
    m = machine()
    vm = m.hv.create_vm("g", MEM)
    vm.add_vcpu()
    assert KvmSev(m.hv, vm).memory_encrypt_op(KvmSevCmdId.INIT) == EINVAL
    naples = machine("naples")
    assert KvmSev(naples.hv, naples.hv.create_vm("g", MEM)).memory_encrypt_op(KvmSevCmdId.ES_INIT) == ENOTTY
    es_vm = m.hv.create_vm("es", MEM)
    kvm = KvmSev(m.hv, es_vm)
    assert kvm.memory_encrypt_op(KvmSevCmdId.ES_INIT, sev_fd=SevDevice(m.hv)) == 0
    assert es_vm.asid in m.profile.es_asids() and kvm.es_active


def test_launch_secret_needs_contiguous_memory() -> None:
    m = machine()
    launch = Launch(m)
    launch.measure()
    kvm, vm = launch.kvm, launch.vm
    vm.back(SECRET_GPA + 4096)  # back the second page first: the two pages are not contiguous
    vm.back(SECRET_GPA)
    rc = kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(
        hdr_uaddr=bytes(0x34), hdr_len=0x34, guest_uaddr=kvm.hva(SECRET_GPA + 4096 - 32), guest_len=64,
        trans_uaddr=bytes(64), trans_len=64))
    assert rc == EINVAL and kvm.last_error == 0  # KVM refused before the firmware was called


def test_debug_window_unaligned() -> None:
    m = machine()
    launch = Launch(m, policy=0)
    kvm = launch.kvm
    out = bytearray(100)
    kvm.op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(kvm.hva(IMAGE_GPA + 4090), out, 100))  # crosses a page
    assert bytes(out) == IMAGE[4090:4190]
    kvm.op(KvmSevCmdId.DBG_ENCRYPT, KvmSevDbg(b"hello, guest", kvm.hva(IMAGE_GPA + 5), 12))
    out = bytearray(32)
    kvm.op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(kvm.hva(IMAGE_GPA), out, 32))
    assert bytes(out) == IMAGE[:5] + b"hello, guest" + IMAGE[17:32]
    assert kvm.memory_encrypt_op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(kvm.hva(IMAGE_GPA), None, 16)) == EINVAL
    assert kvm.memory_encrypt_op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(kvm.hva(IMAGE_GPA), bytearray(4), 16)) \
        == -int(Errno.EFAULT)


def test_attestation_report_through_the_ioctl() -> None:
    m = machine()
    launch = Launch(m)
    launch.measure()
    kvm = launch.kvm
    launch.kvm.op(KvmSevCmdId.LAUNCH_FINISH)
    q = KvmSevAttestationReport(mnonce=bytes(range(16)))
    assert kvm.memory_encrypt_op(KvmSevCmdId.GET_ATTESTATION_REPORT, q) == EIO and q.len == 0xD0
    report = bytearray(q.len)
    kvm.op(KvmSevCmdId.GET_ATTESTATION_REPORT, KvmSevAttestationReport(bytes(range(16)), report, len(report)))
    pek = m.firmware.identity.pek_cert.public_key()
    assert isinstance(pek, ec.EllipticCurvePublicKey)
    verify_attestation_report(bytes(report), pek, mnonce=bytes(range(16)),
                              launch_digest=expected_launch_digest([IMAGE]), policy=0)


def test_migration_through_the_ioctl() -> None:
    """SEND_* on one host, RECEIVE_* on another, page by page; the target guest reads the image."""
    src, dst = machine(seed="mig-src"), machine(seed="mig-dst")
    launch = Launch(src, programs=(read_back,))
    launch.measure()
    launch.kvm.op(KvmSevCmdId.LAUNCH_FINISH)
    skvm = launch.kvm
    dst_pdh, _ = pdh_of(dst)
    src_pdh, _ = pdh_of(src)
    chain = src.firmware.identity  # policy 0: the target chain is not checked; any well-formed one
    q = KvmSevSendStart()
    assert skvm.memory_encrypt_op(KvmSevCmdId.SEND_START, q) == EIO and q.session_len == 0x80
    session = bytearray(0x80)
    plat, amd = chain.cert_chain.encode(), chain.amd_chain.encode()
    pdh = dst_pdh.encode()
    start = skvm.op(KvmSevCmdId.SEND_START, KvmSevSendStart(
        pdh_cert_uaddr=pdh, pdh_cert_len=len(pdh), plat_certs_uaddr=plat, plat_certs_len=len(plat),
        amd_certs_uaddr=amd, amd_certs_len=len(amd), session_uaddr=session, session_len=0x80))
    assert start.policy == 0
    ddev = SevDevice(dst.hv)
    dvm = dst.hv.create_vm("incoming", MEM)
    dkvm = KvmSev(dst.hv, dvm)
    dkvm.op(KvmSevCmdId.INIT, sev_fd=ddev)
    spdh = src_pdh.encode()
    dkvm.op(KvmSevCmdId.RECEIVE_START, KvmSevReceiveStart(policy=0, pdh_uaddr=spdh, pdh_len=len(spdh),
                                                          session_uaddr=bytes(session), session_len=0x80),
            sev_fd=ddev)
    src.soc.wbinvd_all()  # the firmware reads DRAM: the guest's lines go first
    for gpa in [CODE_GPA, *range(IMAGE_GPA, IMAGE_GPA + (len(IMAGE) + 4095 & ~4095), 4096)]:
        lq = KvmSevSendUpdateData()
        assert skvm.memory_encrypt_op(KvmSevCmdId.SEND_UPDATE_DATA, lq) == EIO and lq.hdr_len == 0x34
        hdr, trans = bytearray(0x34), bytearray(4096)
        skvm.op(KvmSevCmdId.SEND_UPDATE_DATA, KvmSevSendUpdateData(
            hdr_uaddr=hdr, hdr_len=0x34, guest_uaddr=skvm.hva(gpa), guest_len=4096,
            trans_uaddr=trans, trans_len=4096))
        dkvm.op(KvmSevCmdId.RECEIVE_UPDATE_DATA, KvmSevReceiveUpdateData(
            hdr_uaddr=bytes(hdr), hdr_len=0x34, guest_uaddr=dkvm.hva(gpa), guest_len=4096,
            trans_uaddr=bytes(trans), trans_len=4096))
    skvm.op(KvmSevCmdId.SEND_FINISH)
    dkvm.op(KvmSevCmdId.RECEIVE_FINISH)
    assert skvm.op(KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus()).state == GuestState.SENT
    assert dvm.state is VmState.RUNNING
    dvm.add_vcpu(PyEngine(read_back(MEM, IMAGE_GPA, 64)))
    assert dst.hv.run(dvm).reason == "hlt"
    assert bytes.fromhex(dvm.console.decode().strip().splitlines()[-1]) == IMAGE[:64]
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors


def test_cert_export_extension() -> None:
    m = machine()
    launch = Launch(m)
    q = KvmSevCertExport()
    assert launch.kvm.memory_encrypt_op(KvmSevCmdId.CERT_EXPORT, q) == EIO
    assert (q.pdh_cert_len, q.cert_chain_len) == (0x824, 3 * 0x824)
    data = KvmSevCertExport(bytearray(0x824), 0x824, bytearray(3 * 0x824), 3 * 0x824)
    launch.kvm.op(KvmSevCmdId.CERT_EXPORT, data)
    assert bytes(data.pdh_cert_uaddr or b"") == pdh_of(m)[0].encode()


def test_large_run_digest() -> None:
    """One LAUNCH_UPDATE_DATA of more than 1 MiB (the firmware hashes beside encrypting)."""
    m = machine()
    image = os.urandom(1536 << 10)
    launch = Launch(m, image=image, page_by_page=False)
    launch.measure()
    assert m.firmware.guests[launch.vm.handle].measured_ld == expected_launch_digest([image])
    out = bytearray(64)
    launch.kvm.op(KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(launch.kvm.hva(IMAGE_GPA + (1 << 20)), out, 64))
    assert bytes(out) == image[1 << 20 : (1 << 20) + 64]
