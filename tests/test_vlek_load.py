"""SNP_VLEK_LOAD end to end: the emulated AMD's KDS hands a CSP a wrapped VLEK hashstick for one chip,
the host loads it through ``/dev/sev`` (SNP_VLEK_LOAD), the guest's reports are then signed by the
VLEK, and the verifier accepts them against the VLEK certificate and ASVK chain the KDS serves.  The
host's attacks -- a tampered hashstick, another chip's, one for another TCB, a malformed command --
are refused with AMD's firmware's status and change nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevemu.abi.commands import CommandId
from sevemu.abi.report import (
    AttestationReport,
    KeyReq,
    KeyRsp,
    ReportReq,
    ReportRsp,
    RootKeySelect,
    SigningKey,
)
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE, SnpConfigCmd, SnpConfigFlags, SnpVlekLoadCmd
from sevemu.abi.status import Status
from sevemu.amd.chip import FusedChip
from sevemu.amd.kds import KeyDistributionService, create_app, loopback_server
from sevemu.amd.snp import CspAccount, wrap_vlek
from sevemu.amd.vault import AmdRegistry
from sevemu.certs.snp import load_certificate, load_certificates
from sevemu.cli.snp_guest import SnpGuestVm, launch
from sevemu.crypto import kdf, vcek
from sevemu.errors import VerificationError
from sevemu.firmware.snp import snp_state
from sevemu.hypervisor.errors import Errno
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import SevUserCmd, SevUserDataSnpStatus, SevUserDataSnpVlekLoad
from sevemu.owner.snpverify import Chain, SnpCheckError, SnpPolicy, verify_report

CSP = "cc-vlek-test"


def _tcb_query(generation: str, tcb: int) -> str:
    names = {"milan": (("blSPL", 0), ("teeSPL", 1), ("snpSPL", 6), ("ucodeSPL", 7)),
             "turin": (("fmcSPL", 0), ("blSPL", 1), ("teeSPL", 2), ("snpSPL", 3), ("ucodeSPL", 7))}[generation]
    return "&".join(f"{n}={(tcb >> (8 * b)) & 0xFF}" for n, b in names)


@pytest.fixture(scope="module", params=["milan", "turin"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[SnpGuestVm, str, AmdRegistry]]:
    generation = request.param
    g = launch(generation, seed=f"vlek-{generation}")
    registry = AmdRegistry(tmp_path_factory.mktemp("vault"))
    registry.record(FusedChip(generation, g.machine.firmware.identity.chip_secret))
    registry.record(FusedChip(generation, bytes(range(7, 71))))  # another chip of the CSP's
    registry.csp(CSP, create=True)
    server = loopback_server(create_app(KeyDistributionService({generation: g.root}, registry)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield g, f"http://127.0.0.1:{server.server_port}", registry
    finally:
        server.shutdown()
        thread.join(5)


def _product(g: SnpGuestVm) -> str:
    return g.machine.soc.profile.name.capitalize()


def _hashstick(g: SnpGuestVm, url: str, hwid: bytes, tcb: int) -> bytes:
    r = requests.get(f"{url}/vlek/v1/{_product(g)}/hashstick?cspID={CSP}&hwid={hwid.hex()}&"
                     f"{_tcb_query(g.machine.soc.profile.name, tcb)}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/octet-stream" and len(r.content) == SNP_VLEK_HASHSTICK_SIZE
    return r.content


def _own_hwid(g: SnpGuestVm) -> bytes:
    return AmdRegistry.hwid_of(FusedChip(g.machine.soc.profile.name, g.machine.firmware.identity.chip_secret))


def _load(g: SnpGuestVm, blob: bytes, *, writable: bool = True, **fields: int) -> tuple[int, int]:
    dev = SevDevice(g.machine.hv, writable=writable) if not writable else SevDevice(g.machine.hv)
    arg = dev.ioctl_raw(SevUserCmd.SNP_VLEK_LOAD, SevUserDataSnpVlekLoad(vlek_wrapped_address=blob, **fields))
    return arg.ret, arg.error


def _vlek_en(g: SnpGuestVm) -> bool:
    st = SevDevice(g.machine.hv).issue(SevUserCmd.SNP_PLATFORM_STATUS, SevUserDataSnpStatus()).data
    assert isinstance(st, SevUserDataSnpStatus)
    return st.vlek_en


def _report(g: SnpGuestVm, key_sel: int = 0, data: bytes = b"\x5a" * 64) -> tuple[int, AttestationReport | None]:
    rsp = ReportRsp.decode(g.device.get_report(ReportReq(report_data=data, key_sel=key_sel))[:ReportRsp.SIZE])
    return rsp.status, (rsp.report if rsp.status == 0 else None)


def _vlek_chain(g: SnpGuestVm, url: str, tcb: int) -> Chain:
    product = _product(g)
    cert = requests.get(f"{url}/vlek/v1/{product}/cert?cspID={CSP}&{_tcb_query(g.machine.soc.profile.name, tcb)}",
                        timeout=10)
    chain = requests.get(f"{url}/vlek/v1/{product}/cert_chain", timeout=10)
    crl = requests.get(f"{url}/vlek/v1/{product}/crl", timeout=10)
    assert cert.status_code == chain.status_code == crl.status_code == 200
    asvk, ark = load_certificates(chain.content)
    from cryptography import x509

    return Chain(load_certificate(cert.content), asvk, ark, x509.load_der_x509_crl(crl.content))


def test_vlek_signed_report_verifies_through_the_kds_vlek_path(setup: tuple[SnpGuestVm, str, AmdRegistry]) -> None:
    g, url, _ = setup
    st = snp_state(g.machine.firmware)
    assert not _vlek_en(g)
    status, rep = _report(g)
    assert status == 0 and rep is not None and rep.signer_info.signing_key == SigningKey.VCEK
    assert _report(g, key_sel=2)[0] == Status.INVALID_KEY  # no VLEK yet
    assert _load(g, _hashstick(g, url, _own_hwid(g), st.reported_tcb)) == (0, 0)
    assert _vlek_en(g)
    status, rep = _report(g)
    assert status == 0 and rep is not None and rep.signer_info.signing_key == SigningKey.VLEK
    chain = _vlek_chain(g, url, st.reported_tcb)
    got = verify_report(rep.encode(), chain, trusted=[g.root.ark_fingerprint()],
                        policy=SnpPolicy(measurement=g.measurement, report_data=b"\x5a" * 64, signing_key="vlek",
                                         require_crl=True))
    assert got.signing_key == "vlek" and got.crl_checked
    # the VLEK certificate of the same CSP serves every chip the CSP loaded it on: not bound to a chip
    # (the report still names its chip in CHIP_ID)
    assert rep.chip_id != bytes(64)
    # the VCEK chain does not verify a VLEK-signed report; a VCEK-only policy refuses it
    with pytest.raises(SnpCheckError) as exc:
        verify_report(rep.encode(), chain, trusted=[g.root.ark_fingerprint()], policy=SnpPolicy(signing_key="vcek"))
    assert exc.value.check == "policy.signing_key"
    # KEY_SEL 1 still asks for the VCEK, and gets it
    status, rep1 = _report(g, key_sel=1)
    assert status == 0 and rep1 is not None and rep1.signer_info.signing_key == SigningKey.VCEK
    assert _report(g, key_sel=3)[0] == Status.INVALID_KEY


def test_derived_keys_from_the_vlek_root(setup: tuple[SnpGuestVm, str, AmdRegistry]) -> None:
    g, url, _ = setup
    st = snp_state(g.machine.firmware)
    if st.vlek is None:
        assert _load(g, _hashstick(g, url, _own_hwid(g), st.reported_tcb)) == (0, 0)

    def key(sel: int) -> KeyRsp:
        req = KeyReq(root_key_select=RootKeySelect(vmrk=False, key_sel=sel))
        return KeyRsp.decode(g.device.get_derived_key(req)[:KeyRsp.SIZE])

    k_default, k_vcek, k_vlek = key(0), key(1), key(2)
    assert k_default.status == k_vcek.status == k_vlek.status == 0
    assert k_default.derived_key == k_vlek.derived_key != k_vcek.derived_key


def test_host_attacks_on_the_hashstick_are_refused_and_change_nothing(
        setup: tuple[SnpGuestVm, str, AmdRegistry]) -> None:
    g, url, registry = setup
    gen = g.machine.soc.profile.name
    st = snp_state(g.machine.firmware)
    good = _hashstick(g, url, _own_hwid(g), st.reported_tcb)
    assert _load(g, good) == (0, 0)
    loaded = st.vlek_sticks
    assert loaded == vcek.vlek_hashsticks(registry.csp(CSP).secret, gen, st.reported_tcb)  # type: ignore[union-attr]
    # another chip's hashstick (same CSP, same TCB): it does not authenticate on this chip
    other = AmdRegistry.hwid_of(FusedChip(gen, bytes(range(7, 71))))
    refused = [_hashstick(g, url, other, st.reported_tcb)]
    # a byte changed in the IV, the wrapped hashsticks, the reserved bytes after the TCB, the tag
    for where in (0x00, 0x0B, 0x10, 0x100, 0x18F, 0x198, 0x19F, 0x1A0, 0x1AF):
        bad = bytearray(good)
        bad[where] ^= 0x01
        refused.append(bytes(bad))
    for blob in refused:
        assert _load(g, blob) == (-Errno.EIO, Status.BAD_MEASUREMENT)
        assert st.vlek_sticks == loaded and _vlek_en(g)
    # a TCB other than REPORTED_TCB (altered in the blob, or an honest hashstick of another TCB)
    bad = bytearray(good)
    bad[0x190] ^= 0x01
    assert _load(g, bytes(bad)) == (-Errno.EIO, Status.BAD_SVN)
    older = st.reported_tcb - 1 if st.reported_tcb & 0xFF else st.reported_tcb & ~(0xFF << 56)
    assert _load(g, _hashstick(g, url, _own_hwid(g), older)) == (-Errno.EIO, Status.BAD_SVN)
    assert st.vlek_sticks == loaded
    # the reserved bytes at 0x0C are not read (AMD-ASPFW): the load succeeds
    ignored = bytearray(good)
    ignored[0x0C] = 0xFF
    assert _load(g, bytes(ignored)) == (0, 0)
    # the ioctl's own checks (sev-dev.c): len, version, a short buffer, a read-only /dev/sev
    assert _load(g, good, len=0x18)[0] == -Errno.EINVAL
    assert _load(g, good, vlek_wrapped_version=1)[0] == -Errno.EINVAL
    assert _load(g, good[:100])[0] == -Errno.EFAULT
    assert _load(g, good, writable=False)[0] == -Errno.EPERM
    assert st.vlek_sticks == loaded


def test_malformed_commands_and_shutdown(setup: tuple[SnpGuestVm, str, AmdRegistry]) -> None:
    g, url, _ = setup
    m = g.machine
    st = snp_state(m.firmware)
    good = _hashstick(g, url, _own_hwid(g), st.reported_tcb)
    page = m.hv.tables.alloc()
    m.hv.core.host_write(page, good)
    m.hv.core.clflush_range(page, 0x1000)
    psp = m.hv.psp
    raw = bytearray(SnpVlekLoadCmd(vlek_wrapped_address=page).encode())
    before = st.vlek_sticks
    for patch, want in (((0, 0x18), Status.INVALID_PARAM), ((4, 1), Status.INVALID_PARAM),
                        ((5, 1), Status.INVALID_PARAM), ((7, 1), Status.INVALID_PARAM)):
        bad = bytearray(raw)
        bad[patch[0]] = patch[1]
        assert psp.raw(CommandId.SNP_VLEK_LOAD, bytes(bad))[0] == want
    far = SnpVlekLoadCmd(vlek_wrapped_address=1 << 50).encode()
    assert psp.raw(CommandId.SNP_VLEK_LOAD, far)[0] == Status.INVALID_ADDRESS
    assert st.vlek_sticks == before
    assert psp.raw(CommandId.SNP_VLEK_LOAD, bytes(raw))[0] == Status.SUCCESS and st.vlek is not None
    m.hv.tables.free(page)


def test_wrapping_is_the_documented_construction() -> None:
    """The wrapping key is the SEV KDF of the VCEK scalar, label ``vlek-wrapping-key``; the format is
    AMD-ASPFW's (IV, reserved, 0x180 ciphertext, TCB, reserved, tag; AAD = TCB + reserved)."""
    chip, csp, tcb = FusedChip("genoa", bytes(range(64))), CspAccount("acme", bytes(range(48))), 0x1800000000000007
    blob = wrap_vlek(csp, chip, tcb)
    scalar = vcek.derive_vcek(chip.secret, "genoa", tcb).private_numbers().private_value.to_bytes(48, "big")
    key = kdf.kdf(scalar, b"vlek-wrapping-key", b"", 32)
    sticks = AESGCM(key).decrypt(blob[:12], blob[0x10:0x190] + blob[0x1A0:], blob[0x190:0x1A0])
    assert int.from_bytes(blob[0x190:0x198], "little") == tcb and blob[0x198:0x1A0] == bytes(8)
    # slot i holds the chain value of the component at TCB byte i; reserved bytes' slots are zero
    assert [any(sticks[i * 48:(i + 1) * 48]) for i in range(8)] == [True, True, False, False, False, False, True, True]
    assert vcek.vlek_from_hashsticks(sticks, "genoa").private_numbers() == \
        vcek.derive_vlek(csp.secret, "genoa", tcb).private_numbers()
    with pytest.raises(VerificationError):
        vcek.unwrap_vlek_hashstick(bytes(range(1, 65)), "genoa", blob)
    assert vcek.unwrap_vlek_hashstick(chip.secret, "genoa", blob) == sticks


def test_shutdown_wipes_the_vlek() -> None:
    g = launch("genoa", seed="vlek-shutdown")
    m = g.machine
    st = snp_state(m.firmware)
    blob = wrap_vlek(CspAccount("acme", bytes(range(48))), FusedChip("genoa", m.firmware.identity.chip_secret),
                     st.reported_tcb)
    assert _load(g, blob) == (0, 0) and st.vlek is not None
    # a new REPORTED_TCB does not drop it (AMD-ASPFW); SNP_SHUTDOWN does
    assert m.hv.psp.raw(CommandId.SNP_CONFIG, SnpConfigCmd(flags=SnpConfigFlags(mask_chip_key=True)).encode())[0] == 0
    status, rep = _report(g)
    assert status == 0 and rep is not None and rep.signer_info.signing_key == SigningKey.VLEK  # MASK_CHIP_KEY: VCEK only
    assert rep.signer_info.mask_chip_key
    psp = m.hv.psp
    assert psp.raw(CommandId.SHUTDOWN, b"")[0] == Status.SUCCESS
    m.soc.wbinvd_all()
    assert psp.raw(CommandId.SNP_DF_FLUSH, b"")[0] == Status.SUCCESS
    assert psp.raw(CommandId.SNP_SHUTDOWN, b"")[0] == Status.SUCCESS
    assert st.vlek is None and st.vlek_sticks == b""
