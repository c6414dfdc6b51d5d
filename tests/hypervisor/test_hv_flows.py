"""Every host-side SEV flow through both interfaces: the Python API (``Hypervisor`` and its SEV flows,
``hv.sev``) and the ioctls (``KVM_MEMORY_ENCRYPT_OP`` on a ``KvmSev``, ``SEV_ISSUE_CMD`` on ``/dev/sev``).

Each scenario runs once per interface on a freshly built machine of the same seed and asserts the same
firmware outcome -- the exact commands and statuses in the firmware log (PLATFORM_STATUS left out: the
ioctls ask for the platform state where Linux keeps it cached) -- and the same effect on guest memory.
The ioctl interface also checks that every row it runs issues only the firmware commands its row of the
command table declares.  Refusals are compared as (errno, firmware status): the Python API raises the
``SevError`` family, the ioctls return ``-errno`` with ``error``.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Generator
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import PAGE, MiB
from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.pycode import CODE_GPA, code_table
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.certs.chain import SevCertChain
from sevemu.certs.sev import SevCert
from sevemu.guest.kernel import boot, print_
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor.errors import Errno, SevError
from sevemu.hypervisor.ioctl import COMMANDS, Api
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevAttestationReport,
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
)
from sevemu.hypervisor.sev import es
from sevemu.hypervisor.sevdev import (
    SevDevice,
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
)
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.report import verify_attestation_report
from sevemu.owner.secret import parse_secret_table
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

MEM = 16 * MiB
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
SCRATCH_GPA = 0x300000
IMAGE = random.Random(7).randbytes(3 * PAGE + 512)
GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")
_OCA_KEY = ec.derive_private_key(0x0CA0CA, ec.SECP384R1())


def machine(seed: str, es_platform: bool = False) -> Machine:
    return build_machine("milan", seed=seed, dram_size=1 << 30, cache_size=256 << 10, es=es_platform)


def trace(m: Machine, since: int) -> list[tuple[str, int]]:
    return [(n, s) for n, s in m.firmware.log[since:] if n != "PLATFORM_STATUS"]


def refusal(fn: Callable[[], object]) -> tuple[Errno, int]:
    """(errno, firmware status) of a refused operation."""
    with pytest.raises(SevError) as ei:
        fn()
    return ei.value.errno, ei.value.status


def _reads(ranges: list[tuple[int, int]]) -> Generator[Op, Any, None]:
    yield from boot(MEM)
    for gpa, n in ranges:
        data = yield op.read(gpa, n)
        yield from print_(data.hex() + "\n")
    yield op.hlt()


def _scratch_writer(mark: bytes) -> Generator[Op, Any, None]:
    yield from boot(MEM)
    yield op.write(SCRATCH_GPA + PAGE - 8, mark)  # across a page boundary
    yield op.hlt()


# The guests' Python code: its program table is measured after the image (both interfaces; the
# SEV-ES launches of these tests run no Python code and measure the image alone).
CODE = code_table([_reads, _scratch_writer])


def guest_reads(m: Machine, vm: Vm, ranges: list[tuple[int, int]]) -> list[bytes]:
    """What the guest itself sees at ``ranges`` (a fresh vCPU boots, reads, prints, halts)."""
    before = len(vm.console)
    assert m.hv.run(vm, vm.add_vcpu(PyEngine(_reads(ranges)))).reason == "hlt", vm.crash_reason
    return [bytes.fromhex(line) for line in vm.console[before:].decode().split()]


def owner_session(m: Machine, policy: int) -> LaunchSession:
    key = m.firmware.identity.pdh_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return LaunchSession.create(key, policy, tek=bytes(range(16)), tik=bytes(range(16, 32)),
                                godh_private=ec.derive_private_key(0x60D4, ec.SECP384R1()),
                                nonce=bytes(16), wrap_iv=bytes(16))


# ---- the two interfaces ---------------------------------------------------------------------------------------
class Interface(Protocol):
    m: Machine

    def new_vm(self, name: str, *, es_guest: bool = False) -> Vm: ...
    def launch(self, vm: Vm, policy: int, session: LaunchSession | None = None) -> bytes: ...
    def update_vmsa(self, vm: Vm) -> None: ...
    def secret(self, vm: Vm, hdr: bytes, trans: bytes, gpa: int, guest_len: int) -> None: ...
    def finish(self, vm: Vm) -> None: ...
    def status(self, vm: Vm) -> tuple[int, int, int]: ...
    def attestation(self, vm: Vm, mnonce: bytes) -> bytes: ...
    def dbg_decrypt(self, vm: Vm, gpa: int, n: int) -> bytes: ...
    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None: ...
    def pdh_export(self) -> tuple[bytes, bytes]: ...
    def pek_csr(self) -> bytes: ...
    def pek_import(self, pek: bytes, oca: bytes) -> None: ...
    def pdh_gen(self) -> None: ...
    def factory_reset(self) -> None: ...
    def get_id(self) -> bytes: ...
    def send(self, vm: Vm, dst: Interface, pdh: bytes) -> Vm: ...
    def receive_start(self, vm: Vm, policy: int, pdh: bytes, session: bytes) -> None: ...
    def receive_page(self, vm: Vm, gpa: int, hdr: bytes, trans: bytes) -> None: ...
    def receive_finish(self, vm: Vm) -> None: ...


class PythonApi:
    """The Hypervisor's methods, and its SEV flows (``hv.sev``) where it has no method of its own."""

    def __init__(self, m: Machine) -> None:
        self.m, self.hv, self.sev = m, m.hv, m.hv.sev

    def new_vm(self, name: str, *, es_guest: bool = False) -> Vm:
        vm = self.hv.create_vm(name, MEM)
        if es_guest:
            self.sev.guest_init(vm, es=True)
        return vm

    def launch(self, vm: Vm, policy: int, session: LaunchSession | None = None) -> bytes:
        if vm.es:  # the Hypervisor's launch has no VMSA step: the flows, in KVM's order
            self.sev.launch_start(vm, policy)
            self.sev.launch_update_data(vm, IMAGE_GPA, len(IMAGE))
            return b""
        return self.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], policy,
                                      godh_cert=session.godh_cert_blob if session else None,
                                      session=session.session_blob if session else None,
                                      programs=[_reads, _scratch_writer])

    def update_vmsa(self, vm: Vm) -> None:
        es.launch_update_vmsa(self.sev, vm)
        vm.measurement = self.sev.launch_measure(vm, 0x30).blobs[0]

    def secret(self, vm: Vm, hdr: bytes, trans: bytes, gpa: int, guest_len: int) -> None:
        self.hv.launch_secret(vm, hdr, trans, gpa, guest_len)

    def finish(self, vm: Vm) -> None:
        self.hv.launch_finish(vm)

    def status(self, vm: Vm) -> tuple[int, int, int]:
        st = self.hv.guest_status(vm)
        return st.handle, st.policy, st.state

    def attestation(self, vm: Vm, mnonce: bytes) -> bytes:
        return self.hv.attestation_report(vm, mnonce)

    def dbg_decrypt(self, vm: Vm, gpa: int, n: int) -> bytes:
        return self.hv.dbg_decrypt(vm, gpa, n)

    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None:
        self.hv.dbg_encrypt(vm, gpa, data)

    def pdh_export(self) -> tuple[bytes, bytes]:
        reply = self.sev.fetch(self.sev.pdh_cert_export, 2)
        return reply.blobs[0], reply.blobs[1]

    def pek_csr(self) -> bytes:
        return bytes(self.sev.fetch(self.sev.pek_csr).blobs[0])

    def pek_import(self, pek: bytes, oca: bytes) -> None:
        self.sev.pek_cert_import(pek, oca)

    def pdh_gen(self) -> None:
        self.sev.pdh_gen()

    def factory_reset(self) -> None:
        self.sev.factory_reset()

    def get_id(self) -> bytes:
        return bytes(self.sev.fetch(self.sev.get_id).blobs[0])

    def send(self, vm: Vm, dst: Interface, pdh: bytes) -> Vm:
        ident = dst.m.firmware.identity
        sev = self.sev
        self.m.soc.wbinvd_all()
        start = sev.send_start(vm, pdh, ident.cert_chain.encode(), ident.amd_chain.encode(), sev.session_length(vm))
        moved = dst.new_vm("incoming")
        own_pdh, _ = self.pdh_export()
        dst.receive_start(moved, int(start.fields["policy"]), own_pdh, start.blobs[0])
        hdr_len, _ = sev.packet_lengths(vm)
        for gpa in sorted(g << 12 for g in vm.npt.mappings):
            hdr, trans = sev.send_update_data(vm, gpa, PAGE, hdr_len, PAGE).blobs
            dst.receive_page(moved, gpa, hdr, trans)
        sev.send_finish(vm)
        dst.receive_finish(moved)
        return moved

    def receive_start(self, vm: Vm, policy: int, pdh: bytes, session: bytes) -> None:
        self.sev.context(vm)
        self.sev.receive_start(vm, policy, pdh, session)

    def receive_page(self, vm: Vm, gpa: int, hdr: bytes, trans: bytes) -> None:
        self.sev.receive_update_data(vm, gpa, len(trans), hdr, trans)

    def receive_finish(self, vm: Vm) -> None:
        self.sev.receive_finish(vm)


_ROWS = {(row.api, row.sub): row for row in COMMANDS}
_IMPLICIT = {"INIT", "DF_FLUSH", "SHUTDOWN"}  # sev-dev.c's INIT around a command


class Ioctls:
    """``KVM_MEMORY_ENCRYPT_OP`` and ``/dev/sev``, as QEMU and sevctl drive them."""

    def __init__(self, m: Machine) -> None:
        self.m, self.hv = m, m.hv
        self.dev = SevDevice(m.hv)
        self.kvms: dict[int, KvmSev] = {}

    def _declared(self, api: Api, sub: int, since: int) -> None:
        """The firmware commands the row ran are among those its row declares."""
        row = _ROWS[api, sub]
        ran = {n for n, _ in self.m.firmware.log[since:]} - {"PLATFORM_STATUS"}
        allowed = {c.name for c in row.firmware} | ({"DECOMMISSION"} if CommandId.ACTIVATE in row.firmware else set())
        assert ran <= allowed | _IMPLICIT, (row.sub, ran - allowed)

    def kvm(self, vm: Vm, sub: KvmSevCmdId, data: Any = None, *, fd: bool = False) -> Any:
        since = len(self.m.firmware.log)
        try:
            return self.kvms[id(vm)].op(sub, data, sev_fd=self.dev if fd else None)
        finally:
            self._declared(Api.KVM, sub, since)

    def issue(self, cmd: SevUserCmd, data: Any = None) -> Any:
        since = len(self.m.firmware.log)
        try:
            return self.dev.issue(cmd, data).data
        finally:
            self._declared(Api.SEV_DEV, cmd, since)

    @staticmethod
    def query(fn: Callable[[], object]) -> None:
        """A length query: -EIO with INVALID_LENGTH (the lengths are written back)."""
        assert refusal(fn) == (Errno.EIO, Status.INVALID_LENGTH)

    def fetch(self, cmd: SevUserCmd, struct: type[SevUserDataPekCsr | SevUserDataGetId2]) -> bytes:
        """A one-buffer /dev/sev command: the length query, then the buffer."""
        q = struct()
        self.query(lambda: self.issue(cmd, q))
        out = struct(bytearray(q.length), q.length)
        self.issue(cmd, out)
        return bytes(out.address or b"")

    def new_vm(self, name: str, *, es_guest: bool = False) -> Vm:
        vm = self.hv.create_vm(name, MEM)
        self.kvms[id(vm)] = KvmSev(self.hv, vm)
        self.kvm(vm, KvmSevCmdId.ES_INIT if es_guest else KvmSevCmdId.INIT, fd=True)
        return vm

    def hva(self, vm: Vm, gpa: int) -> int:
        return self.kvms[id(vm)].hva(gpa)

    def launch(self, vm: Vm, policy: int, session: LaunchSession | None = None) -> bytes:
        start = KvmSevLaunchStart(policy=policy)
        if session is not None:
            godh, blob = session.godh_cert_blob, session.session_blob
            start = KvmSevLaunchStart(policy=policy, dh_uaddr=godh, dh_len=len(godh), session_uaddr=blob,
                                      session_len=len(blob))
        vm.back_range(IMAGE_GPA, len(IMAGE))
        vm.host_write(IMAGE_GPA, IMAGE)
        self.kvm(vm, KvmSevCmdId.LAUNCH_START, start, fd=True)
        self.kvm(vm, KvmSevCmdId.LAUNCH_UPDATE_DATA, KvmSevLaunchUpdateData(self.hva(vm, IMAGE_GPA), len(IMAGE)))
        if vm.es:
            return b""
        vm.back_range(CODE_GPA, len(CODE))
        vm.host_write(CODE_GPA, CODE)
        self.kvm(vm, KvmSevCmdId.LAUNCH_UPDATE_DATA, KvmSevLaunchUpdateData(self.hva(vm, CODE_GPA), len(CODE)))
        blob = bytearray(0x30)
        self.kvm(vm, KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(blob, len(blob)))
        return bytes(blob)

    def update_vmsa(self, vm: Vm) -> None:
        self.kvm(vm, KvmSevCmdId.LAUNCH_UPDATE_VMSA)
        self.kvm(vm, KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(bytearray(0x30), 0x30))

    def secret(self, vm: Vm, hdr: bytes, trans: bytes, gpa: int, guest_len: int) -> None:
        self.kvm(vm, KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(hdr, len(hdr), self.hva(vm, gpa), guest_len,
                                                                   trans, len(trans)))

    def finish(self, vm: Vm) -> None:
        self.kvm(vm, KvmSevCmdId.LAUNCH_FINISH)

    def status(self, vm: Vm) -> tuple[int, int, int]:
        st = self.kvm(vm, KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus())
        return st.handle, st.policy, st.state

    def attestation(self, vm: Vm, mnonce: bytes) -> bytes:
        q = KvmSevAttestationReport(mnonce=mnonce)
        self.query(lambda: self.kvm(vm, KvmSevCmdId.GET_ATTESTATION_REPORT, q))
        report = bytearray(q.len)
        self.kvm(vm, KvmSevCmdId.GET_ATTESTATION_REPORT, KvmSevAttestationReport(mnonce, report, len(report)))
        return bytes(report)

    def dbg_decrypt(self, vm: Vm, gpa: int, n: int) -> bytes:
        out = bytearray(n)
        self.kvm(vm, KvmSevCmdId.DBG_DECRYPT, KvmSevDbg(self.hva(vm, gpa), out, n))
        return bytes(out)

    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None:
        self.kvm(vm, KvmSevCmdId.DBG_ENCRYPT, KvmSevDbg(data, self.hva(vm, gpa), len(data)))

    def pdh_export(self) -> tuple[bytes, bytes]:
        q = SevUserDataPdhCertExport()
        self.query(lambda: self.issue(SevUserCmd.PDH_CERT_EXPORT, q))
        e = SevUserDataPdhCertExport(bytearray(q.pdh_cert_len), q.pdh_cert_len, bytearray(q.cert_chain_len),
                                     q.cert_chain_len)
        self.issue(SevUserCmd.PDH_CERT_EXPORT, e)
        return bytes(e.pdh_cert_address or b""), bytes(e.cert_chain_address or b"")

    def pek_csr(self) -> bytes:
        return self.fetch(SevUserCmd.PEK_CSR, SevUserDataPekCsr)

    def pek_import(self, pek: bytes, oca: bytes) -> None:
        self.issue(SevUserCmd.PEK_CERT_IMPORT, SevUserDataPekCertImport(pek, len(pek), oca, len(oca)))

    def pdh_gen(self) -> None:
        self.issue(SevUserCmd.PDH_GEN)

    def factory_reset(self) -> None:
        self.issue(SevUserCmd.FACTORY_RESET)

    def get_id(self) -> bytes:
        return self.fetch(SevUserCmd.GET_ID2, SevUserDataGetId2)

    def send(self, vm: Vm, dst: Interface, pdh: bytes) -> Vm:
        ident = dst.m.firmware.identity
        self.m.soc.wbinvd_all()
        q = KvmSevSendStart()
        self.query(lambda: self.kvm(vm, KvmSevCmdId.SEND_START, q))
        session = bytearray(q.session_len)
        plat, amd = ident.cert_chain.encode(), ident.amd_chain.encode()
        start = self.kvm(vm, KvmSevCmdId.SEND_START, KvmSevSendStart(
            pdh_cert_uaddr=pdh, pdh_cert_len=len(pdh), plat_certs_uaddr=plat, plat_certs_len=len(plat),
            amd_certs_uaddr=amd, amd_certs_len=len(amd), session_uaddr=session, session_len=len(session)))
        moved = dst.new_vm("incoming")
        own_pdh, _ = self.pdh_export()
        dst.receive_start(moved, start.policy, own_pdh, bytes(session))
        lq = KvmSevSendUpdateData()
        self.query(lambda: self.kvm(vm, KvmSevCmdId.SEND_UPDATE_DATA, lq))
        for gpa in sorted(g << 12 for g in vm.npt.mappings):
            hdr, trans = bytearray(lq.hdr_len), bytearray(PAGE)
            self.kvm(vm, KvmSevCmdId.SEND_UPDATE_DATA, KvmSevSendUpdateData(
                hdr, len(hdr), self.hva(vm, gpa), PAGE, trans, PAGE))
            dst.receive_page(moved, gpa, bytes(hdr), bytes(trans))
        self.kvm(vm, KvmSevCmdId.SEND_FINISH)
        dst.receive_finish(moved)
        return moved

    def receive_start(self, vm: Vm, policy: int, pdh: bytes, session: bytes) -> None:
        self.kvm(vm, KvmSevCmdId.RECEIVE_START, KvmSevReceiveStart(
            policy=policy, pdh_uaddr=pdh, pdh_len=len(pdh), session_uaddr=session, session_len=len(session)), fd=True)

    def receive_page(self, vm: Vm, gpa: int, hdr: bytes, trans: bytes) -> None:
        self.kvm(vm, KvmSevCmdId.RECEIVE_UPDATE_DATA, KvmSevReceiveUpdateData(
            hdr, len(hdr), self.hva(vm, gpa), len(trans), trans, len(trans)))

    def receive_finish(self, vm: Vm) -> None:
        self.kvm(vm, KvmSevCmdId.RECEIVE_FINISH)


INTERFACES: dict[str, Callable[[Machine], Interface]] = {"python": PythonApi, "ioctl": Ioctls}


@pytest.fixture(params=sorted(INTERFACES))
def iface_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _ok(names: list[str]) -> list[tuple[str, int]]:
    return [(n, 0) for n in names]


# ---- launch ---------------------------------------------------------------------------------------------------
def test_owner_launch_secret_and_finish(iface_kind: str) -> None:
    m = machine("flows-launch")
    api = INTERFACES[iface_kind](m)
    policy = int(GuestPolicy.NOKS | GuestPolicy.NODBG)
    sess = owner_session(m, policy)
    vm = api.new_vm("guest")
    since = len(m.firmware.log)
    blob = api.launch(vm, policy, sess)
    p = m.profile
    measured = sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                       expected_ld=expected_launch_digest([IMAGE, CODE]))
    packet = measured.launch_secret([(GUID, b"the disk key")], iv=bytes(16))
    api.secret(vm, packet.header_bytes, packet.trans, SECRET_GPA, packet.guest_len)
    api.finish(vm)
    assert api.status(vm) == (vm.handle, policy, GuestState.RUNNING) and vm.state is VmState.RUNNING
    assert trace(m, since) == _ok(["LAUNCH_START", "ACTIVATE", "LAUNCH_UPDATE_DATA", "LAUNCH_UPDATE_DATA",
                                   "LAUNCH_MEASURE",
                                   "LAUNCH_SECRET", "LAUNCH_FINISH", "GUEST_STATUS"])
    assert vm.measurement == blob
    table, image = guest_reads(m, vm, [(SECRET_GPA, packet.guest_len), (IMAGE_GPA, len(IMAGE))])
    assert parse_secret_table(table) == {GUID: b"the disk key"} and image == IMAGE
    m.soc.wbinvd_all()
    assert IMAGE[:32] not in vm.host_read(IMAGE_GPA, len(IMAGE))  # encrypted in place


def _es_launch(kind: str) -> tuple[list[tuple[str, int]], tuple[Errno, int] | None, Vm, Machine]:
    m = machine("flows-es", es_platform=True)
    api = INTERFACES[kind](m)
    vm = api.new_vm("es", es_guest=True)
    assert vm.asid in m.profile.es_asids() and vm.es
    for _ in range(2):
        vm.add_vcpu()
    since = len(m.firmware.log)
    api.launch(vm, int(GuestPolicy.ES))
    try:
        api.update_vmsa(vm)
    except SevError as e:
        return trace(m, since), (e.errno, e.status), vm, m
    return trace(m, since), None, vm, m


def test_es_launch_updates_the_vmsas_alike() -> None:
    """KVM_SEV_ES_INIT + LAUNCH_UPDATE_VMSA and their flows give the same firmware outcome (the
    firmware of issue 10 measures the VMSAs; before it, both see the same refusal)."""
    (t_py, err_py, vm_py, m_py), (t_io, err_io, vm_io, _) = _es_launch("python"), _es_launch("ioctl")
    assert t_py == t_io and err_py == err_io
    assert t_py[:3] == _ok(["LAUNCH_START", "ACTIVATE", "LAUNCH_UPDATE_DATA"]) and t_py[3][0] == "LAUNCH_UPDATE_VMSA"
    if err_py is None:
        assert t_py[3:] == _ok(["LAUNCH_UPDATE_VMSA", "LAUNCH_UPDATE_VMSA", "LAUNCH_MEASURE"])
        assert all(v.vmcb.sev_es_enable for v in vm_py.vcpus) and len(vm_py.vmsa_pages) == 2
        m_py.soc.wbinvd_all()
        assert m_py.soc.dram.read(vm_py.vmsa_pages[0], 16) != bytes(16)  # the VMSA is ciphertext now
    else:
        assert err_py[0] == Errno.EIO and not any(v.vmcb.sev_es_enable for v in (*vm_py.vcpus, *vm_io.vcpus))


def test_refused_launch_start_changes_nothing(iface_kind: str) -> None:
    m = machine("flows-refused")
    api = INTERFACES[iface_kind](m)
    vm = api.new_vm("guest")
    guests = dict(m.firmware.guests)
    since = len(m.firmware.log)
    assert refusal(lambda: api.launch(vm, 0xFFC0)) == (Errno.EIO, Status.POLICY_FAILURE)
    assert trace(m, since) == [("LAUNCH_START", Status.POLICY_FAILURE)]
    assert vm.handle == 0 and m.firmware.guests == guests


def test_refused_secrets(iface_kind: str) -> None:
    m = machine("flows-secret")
    api = INTERFACES[iface_kind](m)
    sess = owner_session(m, 0)
    vm = api.new_vm("guest")
    blob = api.launch(vm, 0, sess)
    p = m.profile
    packet = sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                     expected_ld=expected_launch_digest([IMAGE, CODE])).launch_secret_raw(bytes(512))
    vm.back(SCRATCH_GPA + PAGE)  # the second page first: the two are not physically contiguous
    vm.back(SCRATCH_GPA)
    since = len(m.firmware.log)
    assert refusal(lambda: api.secret(vm, packet.header_bytes, packet.trans, SCRATCH_GPA + PAGE - 256, 512)) \
        == (Errno.EINVAL, 0)  # KVM refuses before the firmware is asked
    assert refusal(lambda: api.secret(vm, packet.header_bytes[:-1], packet.trans, SECRET_GPA, 512)) \
        == (Errno.EIO, Status.INVALID_LENGTH)
    assert trace(m, since) == [("LAUNCH_SECRET", Status.INVALID_LENGTH)]
    assert api.status(vm)[2] == GuestState.LSECRET


# ---- attestation and debug -------------------------------------------------------------------------------------
def test_attestation_report(iface_kind: str) -> None:
    m = machine("flows-attest")
    api = INTERFACES[iface_kind](m)
    vm = api.new_vm("guest")
    api.launch(vm, 0)
    api.finish(vm)
    since = len(m.firmware.log)
    mnonce = bytes(range(16))
    report = api.attestation(vm, mnonce)
    assert trace(m, since) == [("ATTESTATION", Status.INVALID_LENGTH), ("ATTESTATION", 0)]
    pek = m.firmware.identity.pek_cert.public_key()
    assert isinstance(pek, ec.EllipticCurvePublicKey)
    verify_attestation_report(report, pek, mnonce=mnonce, launch_digest=expected_launch_digest([IMAGE, CODE]), policy=0)


def test_debug_window(iface_kind: str) -> None:
    """DBG_DECRYPT sees the guest's own dirty lines; DBG_ENCRYPT (unaligned: read-modify-write) is what
    the guest then reads; a NODBG guest refuses both."""
    m = machine("flows-dbg")
    api = INTERFACES[iface_kind](m)
    vm = api.new_vm("guest")
    api.launch(vm, 0)
    api.finish(vm)
    mark = b"written by the guest, still in the cache"
    assert m.hv.run(vm, vm.add_vcpu(PyEngine(_scratch_writer(mark)))).reason == "hlt"
    since = len(m.firmware.log)
    assert api.dbg_decrypt(vm, SCRATCH_GPA + PAGE - 8, len(mark)) == mark
    assert api.dbg_decrypt(vm, IMAGE_GPA + 4090, 100) == IMAGE[4090:4190]
    api.dbg_encrypt(vm, IMAGE_GPA + 5, b"hello, guest")
    assert trace(m, since) == _ok(["DBG_DECRYPT"] * 4 + ["DBG_DECRYPT", "DBG_ENCRYPT"])
    assert guest_reads(m, vm, [(IMAGE_GPA, 32)]) == [IMAGE[:5] + b"hello, guest" + IMAGE[17:32]]
    locked = api.new_vm("nodbg")
    api.launch(locked, int(GuestPolicy.NODBG))
    assert refusal(lambda: api.dbg_decrypt(locked, IMAGE_GPA, 16)) == (Errno.EIO, Status.POLICY_FAILURE)
    assert refusal(lambda: api.dbg_encrypt(locked, IMAGE_GPA, bytes(16))) == (Errno.EIO, Status.POLICY_FAILURE)


# ---- the platform ----------------------------------------------------------------------------------------------
def test_platform_commands(iface_kind: str) -> None:
    m = machine("flows-platform")
    api = INTERFACES[iface_kind](m)
    ident = m.firmware.identity
    since = len(m.firmware.log)
    pdh, chain = api.pdh_export()
    assert pdh == ident.pdh_cert.encode()
    SevCert.decode(pdh).verify(SevCertChain.decode(chain).pek)
    csr = SevCert.decode(api.pek_csr())
    assert csr.usage == KeyUsage.PEK
    oca = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, _OCA_KEY.public_key()).sign_with(
        _OCA_KEY, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    api.pek_import(csr.sign_with(_OCA_KEY, KeyUsage.OCA, SigAlgo.ECDSA_SHA256).encode(), oca.encode())
    assert m.firmware.identity.owner_external
    api.pdh_gen()
    assert m.firmware.identity.pdh_cert.encode() != pdh
    assert api.get_id() == ident.chip_id
    api.factory_reset()
    assert not m.firmware.identity.owner_external
    assert trace(m, since) == [("PDH_CERT_EXPORT", Status.INVALID_LENGTH), ("PDH_CERT_EXPORT", 0),
                               ("PEK_CSR", Status.INVALID_LENGTH), ("PEK_CSR", 0), ("PEK_CERT_IMPORT", 0),
                               ("PDH_GEN", 0), ("GET_ID", Status.INVALID_LENGTH), ("GET_ID", 0),
                               ("SHUTDOWN", 0), ("PLATFORM_RESET", 0)]


def test_no_sev_context_is_enotty(iface_kind: str) -> None:
    """A VM the SEV stack never set up: the flows refuse before the firmware is asked."""
    m = machine("flows-noctx")
    vm = m.hv.create_vm("bare", MEM)
    since = len(m.firmware.log)
    if iface_kind == "python":
        outcome = refusal(lambda: m.hv.sev.launch_finish(vm))
    else:
        outcome = refusal(lambda: KvmSev(m.hv, vm).op(KvmSevCmdId.LAUNCH_FINISH))
    assert outcome == (Errno.ENOTTY, 0) and trace(m, since) == []


# ---- migration ---------------------------------------------------------------------------------------------------
def test_send_and_receive_page_by_page(iface_kind: str) -> None:
    src, dst = machine("flows-mig-src"), machine("flows-mig-dst")
    a, b = INTERFACES[iface_kind](src), INTERFACES[iface_kind](dst)
    vm = a.new_vm("guest")
    a.launch(vm, 0)
    a.finish(vm)
    pdh, _ = b.pdh_export()
    src_since, dst_since = len(src.firmware.log), len(dst.firmware.log)
    moved = a.send(vm, b, pdh)
    pages = len(vm.npt.mappings)
    assert trace(src, src_since) == [("SEND_START", Status.INVALID_LENGTH), ("SEND_START", 0),
                                     ("PDH_CERT_EXPORT", Status.INVALID_LENGTH), ("PDH_CERT_EXPORT", 0),
                                     ("SEND_UPDATE_DATA", Status.INVALID_LENGTH)] \
        + _ok(["SEND_UPDATE_DATA"] * pages + ["SEND_FINISH"])
    assert trace(dst, dst_since) == _ok(["RECEIVE_START", "ACTIVATE"] + ["RECEIVE_UPDATE_DATA"] * pages
                                        + ["RECEIVE_FINISH"])
    assert a.status(vm)[2] == GuestState.SENT and moved.state is VmState.RUNNING
    assert b.status(moved)[2] == GuestState.RUNNING
    assert guest_reads(dst, moved, [(IMAGE_GPA, len(IMAGE))]) == [IMAGE]
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors


def test_every_table_row_is_exercised_here() -> None:
    """The suite above drives each row of both interfaces at least once (a new row needs a scenario)."""
    driven = {(Api.KVM, s) for s in (KvmSevCmdId.INIT, KvmSevCmdId.ES_INIT, KvmSevCmdId.LAUNCH_START,
                                      KvmSevCmdId.LAUNCH_UPDATE_DATA, KvmSevCmdId.LAUNCH_UPDATE_VMSA,
                                      KvmSevCmdId.LAUNCH_SECRET, KvmSevCmdId.LAUNCH_MEASURE, KvmSevCmdId.LAUNCH_FINISH,
                                      KvmSevCmdId.GUEST_STATUS, KvmSevCmdId.DBG_DECRYPT, KvmSevCmdId.DBG_ENCRYPT,
                                      KvmSevCmdId.GET_ATTESTATION_REPORT, KvmSevCmdId.SEND_START,
                                      KvmSevCmdId.SEND_UPDATE_DATA, KvmSevCmdId.SEND_FINISH,
                                      KvmSevCmdId.RECEIVE_START, KvmSevCmdId.RECEIVE_UPDATE_DATA,
                                      KvmSevCmdId.RECEIVE_FINISH)}
    driven |= {(Api.SEV_DEV, s) for s in (SevUserCmd.PDH_CERT_EXPORT, SevUserCmd.PEK_CSR, SevUserCmd.PEK_CERT_IMPORT,
                                          SevUserCmd.PDH_GEN, SevUserCmd.FACTORY_RESET, SevUserCmd.GET_ID2)}
    # covered by the interface-specific suites (test_hv_kvm_ops, test_hv_sevdev, test_hv_lifecycle, test_hv_es)
    elsewhere = {(Api.KVM, KvmSevCmdId.CERT_EXPORT), (Api.KVM, KvmSevCmdId.SEND_CANCEL), (Api.KVM, KvmSevCmdId.INIT2),
                 (Api.KVM, KvmSevCmdId.SEND_UPDATE_VMSA), (Api.KVM, KvmSevCmdId.RECEIVE_UPDATE_VMSA),
                 (Api.SEV_DEV, SevUserCmd.PLATFORM_STATUS), (Api.SEV_DEV, SevUserCmd.PEK_GEN),
                 (Api.SEV_DEV, SevUserCmd.GET_ID)}
    # the SNP rows: test_hv_snp and the SNP interop launches
    elsewhere |= {(Api.KVM, KvmSevCmdId.SNP_LAUNCH_START), (Api.KVM, KvmSevCmdId.SNP_LAUNCH_UPDATE),
                  (Api.KVM, KvmSevCmdId.SNP_LAUNCH_FINISH), (Api.SEV_DEV, SevUserCmd.SNP_PLATFORM_STATUS),
                  (Api.SEV_DEV, SevUserCmd.SNP_COMMIT), (Api.SEV_DEV, SevUserCmd.SNP_SET_CONFIG)}
    elsewhere |= {(Api.SEV_DEV, SevUserCmd.SNP_VLEK_LOAD)}  # tests/test_vlek_load.py
    assert {(row.api, row.sub) for row in COMMANDS} == driven | elsewhere


@pytest.mark.parametrize("gpa,length", [(0x10_0000, 64 * PAGE), (0x10_0123, 5 * PAGE), (0x10_0800, 0), (0x10_1000, 0)])
def test_back_range_of_a_partly_backed_range_is_one_back_per_page(gpa: int, length: int) -> None:
    """``Vm.back_range`` looks the backed pages up in one pass and backs only the others: the SPAs,
    in order, that ``Vm.back`` of every page gives, the backed pages' mappings unchanged."""
    m = build_machine("milan", seed="back-range")
    vm = m.hv.create_vm("back", 2 * MiB)
    before = {p: vm.back(p) for p in range(0x10_0000, 0x10_0000 + 64 * PAGE, 3 * PAGE)}
    spas = vm.back_range(gpa, length)
    first = gpa & ~(PAGE - 1)
    pages = list(range(first, gpa + length, PAGE))
    assert len(spas) == len(pages) and all(spas)
    assert spas == [vm.back(p) for p in pages]  # (back of a backed page answers its SPA)
    assert all(vm.back(p) == spa for p, spa in before.items())
    assert len(set(spas)) == len(spas)
