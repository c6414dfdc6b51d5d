"""/dev/sev (hypervisor/sevdev.py): SEV_ISSUE_CMD user commands as Linux's sev-dev.c does them."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import LINUX_STATUS_FLAGS_CONFIG_ES, LINUX_STATUS_FLAGS_OWNER
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.certs.chain import SevCertChain
from sevemu.certs.sev import SevCert
from sevemu.hypervisor.sevdev import (
    SEV_ISSUE_CMD,
    Errno,
    IoctlError,
    SevDevice,
    SevIssueCmd,
    SevUserCmd,
    SevUserDataGetId,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
    SevUserDataStatus,
)
from sevemu.scenario import Machine, build_machine


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="sevdev", dram_size=1 << 30, cache_size=256 << 10, init=False)


def ioctl(dev: SevDevice, cmd: SevUserCmd, data: object = None) -> tuple[int, SevIssueCmd]:
    arg = SevIssueCmd(int(cmd), data)
    return dev.ioctl(SEV_ISSUE_CMD, arg), arg


def commands(m: Machine) -> list[str]:
    return [name for name, _ in m.firmware.log]


def test_ioctl_number_and_bad_requests(m: Machine) -> None:
    assert SEV_ISSUE_CMD == 0xC0105300
    dev = SevDevice(m.hv)
    assert dev.ioctl(0x1234, SevIssueCmd(1)) == -Errno.EINVAL
    assert dev.ioctl(SEV_ISSUE_CMD, SevIssueCmd(42)) == -Errno.EINVAL
    assert dev.ioctl(SEV_ISSUE_CMD, SevIssueCmd(int(SevUserCmd.SNP_PLATFORM_STATUS))) == -Errno.EINVAL
    assert ioctl(dev, SevUserCmd.PLATFORM_STATUS, {"nope": 1})[0] == -Errno.EINVAL
    assert ioctl(dev, SevUserCmd.PEK_CSR, SevUserDataStatus())[0] == -Errno.EFAULT


def test_platform_status_linux_view(m: Machine) -> None:
    dev = SevDevice(m.hv)
    st = SevUserDataStatus()
    assert ioctl(dev, SevUserCmd.PLATFORM_STATUS, st)[0] == 0
    assert (st.api_major, st.api_minor, st.build, st.state) == (1, 51, 3, PlatformState.UNINIT)
    assert dev.platform_init() == 0  # INIT with SEV-ES on Milan, then WBINVD + DF_FLUSH, as Linux does
    assert commands(m)[-2:] == ["INIT", "DF_FLUSH"]
    st = SevUserDataStatus()
    dev.issue(SevUserCmd.PLATFORM_STATUS, st)
    assert st.state == PlatformState.INIT and st.flags & LINUX_STATUS_FLAGS_CONFIG_ES
    assert not st.flags & LINUX_STATUS_FLAGS_OWNER


def test_implicit_init_and_shutdown(m: Machine) -> None:
    dev = SevDevice(m.hv)
    before = m.firmware.identity.pdh_cert
    rc, arg = ioctl(dev, SevUserCmd.PDH_GEN)
    assert rc == 0 and arg.error == 0
    assert commands(m)[-4:] == ["INIT", "DF_FLUSH", "PDH_GEN", "SHUTDOWN"]
    assert m.firmware.state == PlatformState.UNINIT
    assert m.firmware.identity.pdh_cert.encode() != before.encode()
    # an INIT platform stays INIT
    dev.platform_init()
    ioctl(dev, SevUserCmd.PEK_GEN)
    assert m.firmware.state == PlatformState.INIT and commands(m)[-1] == "PEK_GEN"


def test_write_access_is_needed(m: Machine) -> None:
    ro = SevDevice(m.hv, writable=False)
    for cmd in (SevUserCmd.FACTORY_RESET, SevUserCmd.PEK_GEN, SevUserCmd.PDH_GEN):
        assert ioctl(ro, cmd)[0] == -Errno.EPERM
    assert ioctl(ro, SevUserCmd.PEK_CSR, SevUserDataPekCsr())[0] == -Errno.EPERM
    # PDH_CERT_EXPORT needs it only when the platform has to be INITed for it
    assert ioctl(ro, SevUserCmd.PDH_CERT_EXPORT, SevUserDataPdhCertExport())[0] == -Errno.EPERM
    m.hv.platform_init()
    rc, arg = ioctl(ro, SevUserCmd.PDH_CERT_EXPORT, SevUserDataPdhCertExport())
    assert rc == -Errno.EIO and arg.error == Status.INVALID_LENGTH


def test_length_queries_and_exports(m: Machine) -> None:
    dev = SevDevice(m.hv)
    q = SevUserDataPekCsr()
    rc, arg = ioctl(dev, SevUserCmd.PEK_CSR, q)
    assert (rc, arg.error, q.length) == (-Errno.EIO, Status.INVALID_LENGTH, 0x824)
    csr = SevUserDataPekCsr(bytearray(q.length), q.length)
    dev.issue(SevUserCmd.PEK_CSR, csr)
    assert SevCert.decode(bytes(csr.address or b"")).usage == KeyUsage.PEK
    short = SevUserDataPekCsr(bytearray(16), 0x824)  # claims more than the buffer holds
    assert ioctl(dev, SevUserCmd.PEK_CSR, short)[0] == -Errno.EFAULT
    assert ioctl(dev, SevUserCmd.PEK_CSR, SevUserDataPekCsr(bytearray(0x5000), 0x5000))[0] == -Errno.EFAULT

    e = SevUserDataPdhCertExport()
    rc, arg = ioctl(dev, SevUserCmd.PDH_CERT_EXPORT, e)
    assert (rc, arg.error, e.pdh_cert_len, e.cert_chain_len) == (-Errno.EIO, Status.INVALID_LENGTH, 0x824, 0x186C)
    e = SevUserDataPdhCertExport(bytearray(0x824), 0x824, bytearray(0x186C), 0x186C)
    dev.issue(SevUserCmd.PDH_CERT_EXPORT, e)
    pdh = SevCert.decode(bytes(e.pdh_cert_address or b""))
    chain = SevCertChain.decode(bytes(e.cert_chain_address or b""))
    pdh.verify(chain.pek)
    assert m.firmware.state == PlatformState.UNINIT  # INITed for the command, SHUT down after

    g = SevUserDataGetId2()
    rc, arg = ioctl(dev, SevUserCmd.GET_ID2, g)
    assert (rc, arg.error, g.length) == (-Errno.EIO, Status.INVALID_LENGTH, 64)
    g = SevUserDataGetId2(bytearray(64), 64)
    dev.issue(SevUserCmd.GET_ID2, g)
    old = SevUserDataGetId()
    dev.issue(SevUserCmd.GET_ID, old)
    assert old.socket1 == bytes(g.address or b"") == m.firmware.identity.chip_id and old.socket2 == bytes(64)


def test_factory_reset_and_provisioning(m: Machine) -> None:
    dev = SevDevice(m.hv)
    oca_key = ec.generate_private_key(ec.SECP384R1())
    oca = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, oca_key.public_key()).sign_with(
        oca_key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    csr = SevUserDataPekCsr(bytearray(0x824), 0x824)
    dev.issue(SevUserCmd.PEK_CSR, csr)
    pek = SevCert.decode(bytes(csr.address or b"")).sign_with(oca_key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    imp = SevUserDataPekCertImport(pek.encode(), 0x824, oca.encode(), 0x824)
    dev.issue(SevUserCmd.PEK_CERT_IMPORT, imp)
    assert m.firmware.identity.owner_external
    rc, arg = ioctl(dev, SevUserCmd.PEK_CERT_IMPORT, imp)
    assert rc == -Errno.EIO and arg.error == Status.ALREADY_OWNED
    assert ioctl(dev, SevUserCmd.PEK_CERT_IMPORT, SevUserDataPekCertImport(None, 0x824, oca.encode(), 0x824))[0] \
        == -Errno.EINVAL
    # FACTORY_RESET from INIT shuts down first; from WORKING it is refused by the driver
    m.hv.platform_init()
    dev.issue(SevUserCmd.FACTORY_RESET)
    assert commands(m)[-2:] == ["SHUTDOWN", "PLATFORM_RESET"] and not m.firmware.identity.owner_external
    m.hv.platform_init()
    m.hv.launch(m.hv.create_vm("g", 16 << 20), [(0x100000, bytes(4096))])
    rc, _ = ioctl(dev, SevUserCmd.FACTORY_RESET)
    assert rc == -Errno.EBUSY and commands(m)[-1] == "PLATFORM_STATUS"
    with pytest.raises(IoctlError, match="FACTORY_RESET failed: -EBUSY"):
        dev.issue(SevUserCmd.FACTORY_RESET)
    assert CommandId.PLATFORM_RESET.name in commands(m) and not m.firmware.internal_errors
