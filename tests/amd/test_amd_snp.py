"""The emulated AMD's SNP certificates against the real ones AMD's KDS issues, field by field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import AmdSnpRoot, CspAccount
from sevemu.certs.errors import CertSignatureError
from sevemu.certs.snp import (
    OID_HWID,
    PSS,
    add_years,
    amd_extensions,
    load_certificate,
    load_certificates,
    verify_signed_by,
)
from sevemu.crypto import vcek
from sevemu.errors import InputError

Root = Callable[[str], AmdSnpRoot]
GENS = ("milan", "genoa", "turin")


def _real_vceks(vectors: Path) -> list[tuple[str, x509.Certificate]]:
    folder = vectors / "snp-real-reports"
    entries = json.loads((folder / "expected.json").read_text())
    out = []
    for e in entries:
        name = e.get("signer_cert_file")
        if not name or not (folder / name).is_file():
            continue
        out.append((name, load_certificates((folder / name).read_bytes())[0]))
    return out


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _real_roots(vectors: Path, generation: str, kind: str = "vcek") -> tuple[x509.Certificate, x509.Certificate]:
    name = {"vcek": {"milan": "milan", "genoa": "genoa", "turin": "turin_vcek"},
            "vlek": {"milan": "milan_vlek", "genoa": "genoa_vlek", "turin": "turin_vlek"}}[kind][generation]
    ask, ark = load_certificates((vectors / "snp-amd-roots" / f"gosevguest_ask_ark_{name}.pem").read_bytes())
    return ask, ark


def _assert_same_profile(ours: x509.Certificate, real: x509.Certificate, what: str) -> None:
    assert ours.version == real.version, what
    assert ours.serial_number == real.serial_number, what
    assert ours.signature_algorithm_oid == real.signature_algorithm_oid, what
    assert isinstance(ours.signature_hash_algorithm, hashes.SHA384), what
    params, real_params = ours.signature_algorithm_parameters, real.signature_algorithm_parameters
    assert type(params) is type(real_params), what
    assert params._salt_length == real_params._salt_length == 48, what  # type: ignore[union-attr]
    assert ours.issuer == real.issuer, what  # same attributes, order and string types
    assert ours.subject == real.subject, what
    assert [a.oid for a in ours.subject] == [a.oid for a in real.subject], what
    assert [a._type for a in ours.subject] == [a._type for a in real.subject], what
    years = real.not_valid_after_utc.year - real.not_valid_before_utc.year
    assert add_years(real.not_valid_before_utc, years) == real.not_valid_after_utc, what
    assert add_years(ours.not_valid_before_utc, years) == ours.not_valid_after_utc, what
    assert [(e.oid, e.critical) for e in ours.extensions] == [(e.oid, e.critical) for e in real.extensions], what
    assert len(ours.signature) == len(real.signature), what
    assert type(ours.public_key()) is type(real.public_key()) or (
        isinstance(ours.public_key(), rsa.RSAPublicKey) and isinstance(real.public_key(), rsa.RSAPublicKey)) or (
        isinstance(ours.public_key(), ec.EllipticCurvePublicKey)
        and isinstance(real.public_key(), ec.EllipticCurvePublicKey)), what


def test_vcek_certificates_match_real_kds_certificates(vectors: Path, snp_root: Root) -> None:
    """Every real VCEK: our certificate for the same hwid and TCB has the same profile and the same
    AMD extension bytes (only key, signature and dates differ)."""
    seen = set()
    for name, real in _real_vceks(vectors):
        ext = amd_extensions(real)
        if ext.hwid is None or name.startswith("trustee_test-vcek-invalid"):
            continue
        gen = ext.generation
        seen.add(gen)
        tcb = ext.tcb(gen)
        ours = snp_root(gen).certify("vcek", ec.generate_private_key(ec.SECP384R1()).public_key(), tcb,
                                     hw_id=ext.hwid, not_before=real.not_valid_before_utc)
        _assert_same_profile(ours, real, name)
        assert ours.not_valid_before_utc == real.not_valid_before_utc
        assert ours.not_valid_after_utc == real.not_valid_after_utc, name
        for a, b in zip(ours.extensions, real.extensions, strict=True):
            assert a.value.value == b.value.value, f"{name}: {a.oid.dotted_string}"  # type: ignore[attr-defined]
        assert isinstance(ours.public_key(), ec.EllipticCurvePublicKey)
        assert isinstance(ours.public_key().curve, ec.SECP384R1)
        assert amd_extensions(ours) == ext
        verify_signed_by(ours, snp_root(gen).ask, "VCEK <- ASK")
    assert seen == set(GENS)


def test_vlek_certificate_matches_the_real_vlek(vectors: Path, snp_root: Root) -> None:
    real = load_certificate((vectors / "snp-real-reports" / "trustee_test-vlek.der").read_bytes())
    ext = amd_extensions(real)
    assert ext.csp_id is not None and ext.hwid is None
    ours = snp_root("milan").certify("vlek", ec.generate_private_key(ec.SECP384R1()).public_key(),
                                     ext.tcb("milan"), csp_id=ext.csp_id, not_before=real.not_valid_before_utc)
    _assert_same_profile(ours, real, "VLEK")
    for a, b in zip(ours.extensions, real.extensions, strict=True):
        assert a.value.value == b.value.value, a.oid.dotted_string  # type: ignore[attr-defined]
    verify_signed_by(ours, snp_root("milan").asvk, "VLEK <- ASVK")
    with pytest.raises(CertSignatureError):
        verify_signed_by(ours, snp_root("milan").ask, "VLEK <- ASK")


@pytest.mark.parametrize("generation", GENS)
def test_roots_match_real_roots(vectors: Path, snp_root: Root, generation: str) -> None:
    root = snp_root(generation)
    real_ask, real_ark = _real_roots(vectors, generation)
    real_asvk, _ = _real_roots(vectors, generation, "vlek")
    for ours, real, what in ((root.ark, real_ark, "ARK"), (root.ask, real_ask, "ASK"), (root.asvk, real_asvk, "ASVK")):
        _assert_same_profile(ours, real, what)
        pub = ours.public_key()
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 4096
        for oid in (x509.KeyUsage.oid, x509.BasicConstraints.oid, x509.CRLDistributionPoints.oid):
            assert ours.extensions.get_extension_for_oid(oid).value == \
                real.extensions.get_extension_for_oid(oid).value, f"{what} {oid._name}"
        ski = ours.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        assert ski.startswith(b"EMULATED")
    aki = root.ask.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == root.ark.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # emulated, never AMD's: nothing chains to the real ARK
    for cert in (root.ask, root.asvk, root.ark):
        with pytest.raises(CertSignatureError):
            verify_signed_by(cert, real_ark, "emulated <- real ARK")
    assert _der(root.ark) != _der(real_ark)


def test_real_chains_verify_with_the_same_rules(vectors: Path) -> None:
    for gen in GENS:
        ask, ark = _real_roots(vectors, gen)
        verify_signed_by(ark, ark, "ARK")
        verify_signed_by(ask, ark, "ASK")
        with pytest.raises(CertSignatureError):
            verify_signed_by(ark, ask, "ARK <- ASK")  # roles swapped


def test_issue_vcek_is_the_firmware_key_and_stable(snp_root: Root) -> None:
    root = snp_root("turin")
    chip = FusedChip("turin", bytes(range(64)))
    tcb = 0x5100000004010101
    cert = root.issue_vcek(chip, tcb)
    assert root.issue_vcek(chip, tcb) is cert  # same bytes on every request
    assert cert.public_key() == vcek.derive_vcek(chip.secret, "turin", tcb).public_key()
    ext = amd_extensions(cert)
    assert ext.hwid == vcek.snp_chip_id(chip.secret, "turin")[:8]
    assert ext.tcb("turin") == tcb and ext.struct_version == 1 and ext.product_name == "Turin"
    raw = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_HWID)).value
    assert raw.value == ext.hwid  # type: ignore[attr-defined]  # raw bytes, no OCTET STRING
    other = root.issue_vcek(chip, tcb + 1)
    assert other.public_key() != cert.public_key()


def test_issue_vlek(snp_root: Root) -> None:
    csp = CspAccount("CN=cloud.example", bytes(48))
    cert = snp_root("genoa").issue_vlek(csp, 0x541700000000000A)
    assert cert.public_key() == vcek.derive_vlek(csp.secret, "genoa", 0x541700000000000A).public_key()
    assert amd_extensions(cert).csp_id == "CN=cloud.example"
    assert cert.not_valid_after_utc.year - cert.not_valid_before_utc.year == 1


def test_crl_signed_by_ark_lists_revoked(snp_root: Root, tmp_path: Path) -> None:
    root = AmdSnpRoot.load(snp_root("milan").save(tmp_path / "m"), _legacy("milan"))
    crl = root.crl()
    ark_key = root.ark.public_key()
    assert isinstance(ark_key, rsa.RSAPublicKey)
    ark_key.verify(crl.signature, crl.tbs_certlist_bytes, PSS, hashes.SHA384())
    assert crl.issuer == root.ark.subject and len(crl) == 0
    serial = root.revoke("vcek")
    crl = root.crl()
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    again = AmdSnpRoot.load(root.save(tmp_path / "m"), _legacy("milan"))
    assert again.revoked == {serial}


def _legacy(generation: str):  # type: ignore[no-untyped-def]
    from sevemu.scenario import default_amd_root
    return default_amd_root(generation)


def test_bad_requests_are_refused(snp_root: Root) -> None:
    root = snp_root("milan")
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(InputError, match="64 bytes"):
        root.certify("vcek", key, 0, hw_id=bytes(8))
    with pytest.raises(InputError, match="P-384"):
        root.certify("vcek", ec.generate_private_key(ec.SECP256R1()).public_key(), 0, hw_id=bytes(64))
    with pytest.raises(InputError, match="turin chip"):
        root.issue_vcek(FusedChip("turin", bytes(64)), 0)
    with pytest.raises(InputError, match="has no SEV-SNP"):
        AmdSnpRoot.create("rome")
