"""The emulated KDS over HTTP: a real client (requests) against a server on an ephemeral port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sevemu.amd.chip import FusedChip
from sevemu.amd.kds import KeyDistributionService, RateLimiter, create_app, loopback_server
from sevemu.amd.snp import AmdSnpRoot
from sevemu.amd.vault import AmdRegistry
from sevemu.certs.snp import amd_extensions, load_certificate, load_certificates, verify_signed_by
from sevemu.crypto import vcek
from sevemu.errors import InputError

Root = Callable[[str], AmdSnpRoot]
MILAN = FusedChip("milan", bytes(range(1, 65)))
TURIN = FusedChip("turin", bytes(range(2, 66)))


@pytest.fixture(scope="module")
def kds(snp_root: Root, tmp_path_factory: pytest.TempPathFactory) -> KeyDistributionService:
    registry = AmdRegistry(tmp_path_factory.mktemp("vault"))
    registry.record(MILAN)
    registry.record(TURIN)
    registry.csp("cc-example", create=True)
    return KeyDistributionService({g: snp_root(g) for g in ("milan", "turin")}, AmdRegistry(registry.directory))


def _serve(app: object) -> Iterator[str]:
    server = loopback_server(app)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture(scope="module")
def url(kds: KeyDistributionService) -> Iterator[str]:
    yield from _serve(create_app(kds))


def _hwid(chip: FusedChip) -> str:
    return AmdRegistry.hwid_of(chip).hex()


def test_vcek_milan(url: str, snp_root: Root) -> None:
    r = requests.get(f"{url}/vcek/v1/Milan/{_hwid(MILAN)}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/pkix-cert"
    cert = load_certificate(r.content)
    assert r.content == cert.public_bytes(serialization.Encoding.DER)  # DER, as AMD answers
    ext = amd_extensions(cert)
    assert ext.hwid == bytes.fromhex(_hwid(MILAN)) and ext.tcb("milan") == 0x7308000000000003
    assert cert.public_key() == vcek.derive_vcek(MILAN.secret, "milan", 0x7308000000000003).public_key()
    verify_signed_by(cert, snp_root("milan").ask, "VCEK <- ASK")
    again = requests.get(f"{url}/vcek/v1/Milan/{_hwid(MILAN)}?blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115", timeout=10)
    assert again.content == r.content


def test_vcek_turin_fmc_and_short_hwid(url: str) -> None:
    hw = _hwid(TURIN)
    assert len(hw) == 16
    r = requests.get(f"{url}/vcek/v1/Turin/{hw}?fmcSPL=1&blSPL=1&teeSPL=1&snpSPL=4&ucodeSPL=81", timeout=10)
    assert r.status_code == 200, r.text
    assert amd_extensions(load_certificate(r.content)).tcb("turin") == 0x5100000004010101
    missing = requests.get(f"{url}/vcek/v1/Turin/{hw}?blSPL=1", timeout=10)  # the rest count 0
    assert amd_extensions(load_certificate(missing.content)).tcb("turin") == 0x0100


@pytest.mark.parametrize("kind", ["vcek", "vlek"])
def test_cert_chain_and_crl(url: str, snp_root: Root, kind: str) -> None:
    r = requests.get(f"{url}/{kind}/v1/Milan/cert_chain", timeout=10)
    assert r.status_code == 200 and r.text.startswith("-----BEGIN CERTIFICATE-----")
    first, ark = load_certificates(r.content)
    root = snp_root("milan")
    assert first == (root.ask if kind == "vcek" else root.asvk) and ark == root.ark
    c = requests.get(f"{url}/{kind}/v1/Milan/crl", timeout=10)
    assert c.status_code == 200 and c.headers["Content-Type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(c.content)
    assert crl.issuer == root.ark.subject


def test_vlek(url: str, kds: KeyDistributionService) -> None:
    r = requests.get(f"{url}/vlek/v1/Milan/cert?cspID=cc-example&blSPL=4&snpSPL=24&ucodeSPL=217", timeout=10)
    assert r.status_code == 200, r.text
    cert = load_certificate(r.content)
    assert amd_extensions(cert).csp_id == "cc-example"
    assert requests.get(f"{url}/vlek/v1/Milan/cert?cspID=nobody", timeout=10).status_code == 404


@pytest.mark.parametrize(("path", "status", "words"), [
    ("/vcek/v1/Naples/cert_chain", 404, "unknown product"),
    ("/vcek/v1/milan/cert_chain", 404, "unknown product"),  # AMD's names are case-sensitive
    ("/vcek/v1/Genoa/cert_chain", 404, "serves Milan, Turin"),
    ("/vcek/v1/Milan/" + "zz" * 64, 400, "128 hex digits"),
    ("/vcek/v1/Milan/" + "00" * 8, 400, "128 hex digits"),
    ("/vcek/v1/Turin/" + "00" * 64, 400, "16 hex digits"),
    ("/vcek/v1/Milan/" + "ab" * 64, 404, "no Milan chip"),
    ("/vcek/v1/Milan/HWID?blSPL=256", 400, "hex digits"),
    ("/vcek/v1/Milan/{milan}?blSPL=256", 400, "blSPL='256'"),
    ("/vcek/v1/Milan/{milan}?blSPL=-1", 400, "blSPL='-1'"),
    ("/vcek/v1/Milan/{milan}?blSPL=x", 400, "not a decimal"),
    ("/vcek/v1/Milan/{milan}?fmcSPL=1", 400, "Milan has no fmcSPL"),
    ("/vcek/v1/Milan/{milan}?colour=red", 400, "unknown parameter"),
    ("/vcek/v1/Milan/{milan}?blSPL=1&blSPL=2", 400, "2 times"),
    ("/vcek/v2/Milan/cert_chain", 404, "no such resource"),
    ("/", 404, "no such resource"),
])
def test_errors_are_amd_codes_with_one_line(url: str, path: str, status: int, words: str) -> None:
    r = requests.get(url + path.replace("{milan}", _hwid(MILAN)), timeout=10)
    assert r.status_code == status
    assert words in r.text and r.text.count("\n") == 1 and "Traceback" not in r.text


def test_post_is_refused(url: str) -> None:
    r = requests.post(f"{url}/vcek/v1/Milan/cert_chain", timeout=10)
    assert r.status_code == 405 and r.text.count("\n") == 1


def test_rate_limit_answers_429(kds: KeyDistributionService) -> None:
    for base in _serve(create_app(kds, rate_limit=RateLimiter(rate=0.5, burst=2))):
        codes = [requests.get(f"{base}/vcek/v1/Milan/cert_chain", timeout=10) for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[2].headers["Retry-After"]) >= 1


def test_rate_limiter_refills() -> None:
    rl = RateLimiter(rate=2.0, burst=1)
    assert rl.retry_after("a", now=0.0) == 0.0
    assert rl.retry_after("a", now=0.1) == pytest.approx(0.4)
    assert rl.retry_after("b", now=0.1) == 0.0  # per client
    assert rl.retry_after("a", now=0.6) == 0.0
    with pytest.raises(InputError):
        RateLimiter(0)


def test_server_is_loopback_only(kds: KeyDistributionService) -> None:
    with pytest.raises(InputError, match="loopback"):
        loopback_server(create_app(kds), host="0.0.0.0")
    with pytest.raises(InputError, match="port"):
        loopback_server(create_app(kds), port=70000)


def test_registry_ignores_a_file_that_is_not_the_chip(tmp_path: object) -> None:
    from pathlib import Path
    d = Path(str(tmp_path))
    reg = AmdRegistry(d)
    hw = reg.record(MILAN)
    (d / "chips" / "milan" / hw.hex()).write_bytes(bytes(64))  # someone else's secret
    assert AmdRegistry(d).chip("milan", hw) is None
    assert AmdRegistry(d).chip("milan", hw[:8]) is None


def test_the_factory_records_snp_chips_for_the_kds(snp_root: Root, tmp_path: object,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from sevemu.scenario import default_amd_root, manufacture

    legacy = default_amd_root("milan")  # before the vault moves: the session's root
    vault = Path(str(tmp_path)) / "vault"
    monkeypatch.setenv("SEVEMU_AMD_VAULT", str(vault))
    chip = manufacture(Path(str(tmp_path)) / "platform", "milan", legacy)
    hw = AmdRegistry.hwid_of(chip)
    assert (vault / "chips" / "milan" / hw.hex()).stat().st_mode & 0o077 == 0
    kds = KeyDistributionService({"milan": snp_root("milan")}, AmdRegistry(vault))
    cert = load_certificate(kds.vcek("Milan", hw.hex(), {"blSPL": ["3"], "snpSPL": ["8"]}))
    assert cert.public_key() == vcek.derive_vcek(chip.secret, "milan", 0x0008000000000003).public_key()
    rome = manufacture(Path(str(tmp_path)) / "rome", "rome", default_amd_root("rome"))
    assert rome.generation == "rome" and not (vault / "chips" / "rome").exists()  # no SNP on Rome
