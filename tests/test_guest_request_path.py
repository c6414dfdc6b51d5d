"""The guest request path end to end: the guest driver (/dev/sev-guest) -> the hypervisor's shared
pages and NAE events -> SNP_GUEST_REQUEST -> back; reports verify against the emulated AMD chain,
extended reports carry the host's certificate table, and the host's attacks on the path (tampering,
replaying, forging an error) cost the guest its key -- never an IV, never a wrong answer accepted."""

from __future__ import annotations

import errno

import pytest
from cryptography.hazmat.primitives import serialization

from sevemu.abi.ghcb import SwExitCode
from sevemu.abi.report import (
    CERT_GUID_VCEK,
    GuestFieldSelect,
    KeyReq,
    KeyRsp,
    ReportReq,
    ReportRsp,
    decode_cert_table,
)
from sevemu.abi.status import Status
from sevemu.cli.snp_guest import CHANNEL_GPA, SnpGuestVm, launch
from sevemu.firmware.snp import snp_state
from sevemu.guest.sev_guest import (
    GuestSecrets,
    SevGuestDevice,
    SevGuestError,
    SnpExtReportReq,
)
from sevemu.hypervisor.ghcb import NaeExit
from sevemu.hypervisor.guest_request import SNP_GUEST_VMM_ERR_GENERIC, VmGuestChannel
from sevemu.owner.snpverify import Chain, SnpPolicy, verify_report

PAGE = 0x1000


@pytest.fixture(scope="module")
def gvm() -> SnpGuestVm:
    return launch("milan", seed="guest-request-path", host_data=b"\x5a" * 32)


def _fresh_device(g: SnpGuestVm, channel: VmGuestChannel | None = None) -> SevGuestDevice:
    """Another driver on the same secrets page state (the guest's counters continue)."""
    return SevGuestDevice(channel or g.device.channel, GuestSecrets(bytes(g.device.secrets.page)))  # type: ignore[arg-type]


def _report(dev: SevGuestDevice, data: bytes = b"\x01" * 64) -> ReportRsp:
    return ReportRsp.decode(dev.get_report(ReportReq(report_data=data))[:ReportRsp.SIZE])


def test_report_from_the_driver_verifies(gvm: SnpGuestVm) -> None:
    rsp = _report(gvm.device, b"\x33" * 64)
    assert rsp.status == 0
    chain = Chain(gvm.vcek, gvm.root.ask, gvm.root.ark, gvm.root.crl())
    got = verify_report(rsp.report.encode(), chain, trusted=[gvm.root.ark_fingerprint()], policy=SnpPolicy(
        measurement=gvm.measurement, report_data=b"\x33" * 64, host_data=b"\x5a" * 32))
    assert got.report.measurement == gvm.measurement != bytes(48)


def test_extended_report_carries_the_hosts_certificates(gvm: SnpGuestVm) -> None:
    dev = gvm.device
    before = dev.secrets.seqno(0)
    with pytest.raises(SevGuestError) as exc:
        dev.get_ext_report(SnpExtReportReq(data=ReportReq(), certs_address=1, certs_len=PAGE))
    assert exc.value.errno == -errno.EIO and exc.value.vmm_error == 1 and exc.value.certs_len == 2 * PAGE
    assert not dev.disabled and dev.secrets.seqno(0) == before + 2  # the plain retry used the number
    rsp, certs, _ = dev.get_ext_report(SnpExtReportReq(data=ReportReq(), certs_address=1,
                                                       certs_len=4 * PAGE))
    table = dict(decode_cert_table(certs))
    assert table[CERT_GUID_VCEK] == gvm.vcek.public_bytes(serialization.Encoding.DER)
    assert ReportRsp.decode(rsp[:ReportRsp.SIZE]).status == 0
    with pytest.raises(SevGuestError) as exc:
        dev.get_ext_report(SnpExtReportReq(certs_address=1, certs_len=PAGE + 1))
    assert exc.value.errno == -errno.EINVAL


def test_derived_key_is_stable_and_selective(gvm: SnpGuestVm) -> None:
    a = KeyRsp.decode(gvm.device.get_derived_key(KeyReq()))
    b = KeyRsp.decode(gvm.device.get_derived_key(KeyReq()))
    c = KeyRsp.decode(gvm.device.get_derived_key(KeyReq(guest_field_select=GuestFieldSelect(measurement=True))))
    assert a.status == b.status == c.status == 0
    assert a.derived_key == b.derived_key != c.derived_key


class _Tamper(VmGuestChannel):
    """A host that flips a byte of the response in the guest's shared page (a host interface)."""

    def exchange(self, message: bytes, ext_pages: int | None) -> tuple[bytes, int, int, bytes]:
        page, info2, pages, certs = super().exchange(message, ext_pages)
        self.vm.host_write(self.resp_gpa + 0x70, bytes([page[0x70] ^ 1]))
        return self.vm.host_read(self.resp_gpa, PAGE), info2, pages, certs


class _Forge(VmGuestChannel):
    """A host that claims the firmware failed without forwarding anything."""

    def exchange(self, message: bytes, ext_pages: int | None) -> tuple[bytes, int, int, bytes]:
        return bytes(PAGE), int(Status.INVALID_PARAM), 0, b""


def _channel(g: SnpGuestVm, cls: type[VmGuestChannel]) -> VmGuestChannel:
    return cls(g.machine.hv, g.vm, CHANNEL_GPA, CHANNEL_GPA + PAGE, CHANNEL_GPA + 2 * PAGE, 4)


@pytest.mark.parametrize("cls, err", [(_Tamper, errno.EBADMSG), (_Forge, errno.EIO)])
def test_a_host_that_interferes_costs_the_guest_its_key(gvm: SnpGuestVm, cls: type[VmGuestChannel],
                                                       err: int) -> None:
    dev = _fresh_device(gvm, _channel(gvm, cls))
    n = dev.secrets.seqno(0)
    with pytest.raises(SevGuestError) as exc:
        _report(dev)
    assert exc.value.errno == -err
    assert dev.disabled and dev.secrets.vmpck(0) == bytes(32) and dev.secrets.seqno(0) == n + 2
    assert dev.log and "disabling VMPCK0" in dev.log[0]
    with pytest.raises(SevGuestError) as exc:
        _report(dev)
    assert exc.value.errno == -errno.ENOTTY
    if cls is _Tamper:  # the firmware did answer: the module's guest continues after that number
        gvm.device.secrets.set_seqno(0, dev.secrets.seqno(0))


def test_the_host_cannot_replay_a_guest_message(gvm: SnpGuestVm) -> None:
    dev = _fresh_device(gvm)
    _report(dev)
    captured = gvm.vm.host_read(CHANNEL_GPA, PAGE)  # the guest's last request, in its shared page
    g = snp_state(gvm.machine.firmware).guests[gvm.vm.snp_context]
    count = list(g.msg_count)
    gvm.vm.host_write(CHANNEL_GPA, captured)
    reply = gvm.service.request(gvm.vm, CHANNEL_GPA, CHANNEL_GPA + PAGE)
    assert reply.exitinfo2 == Status.INVALID_PARAM and g.msg_count == count
    # the guest carries on: the replay consumed nothing
    dev2 = _fresh_device(gvm)
    dev2.secrets.page[0xA0:0xA4] = dev.secrets.page[0xA0:0xA4]
    assert _report(dev2).status == 0


def test_nae_events_are_registered_and_checked(gvm: SnpGuestVm) -> None:
    table = gvm.machine.hv.ghcb.nae_table
    fn = table[SwExitCode.GUEST_REQUEST]
    vcpu = gvm.vm.vcpus[0]
    ex = NaeExit(gvm.vm, vcpu, 0, SwExitCode.GUEST_REQUEST, 0x10, CHANNEL_GPA + PAGE, {})
    fn(ex)  # a private GPA / unaligned request: the hypervisor refuses, the firmware is not called
    assert ex.out["sw_exit_info_2"] == SNP_GUEST_VMM_ERR_GENERIC << 32
    ext = NaeExit(gvm.vm, vcpu, 0, SwExitCode.EXT_GUEST_REQUEST, CHANNEL_GPA, CHANNEL_GPA + PAGE,
                  {"rax": CHANNEL_GPA + 2 * PAGE, "rbx": 1})
    table[SwExitCode.EXT_GUEST_REQUEST](ext)
    assert ext.out == {"sw_exit_info_2": 1 << 32, "rbx": 2}
