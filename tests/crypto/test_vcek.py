"""VCEK / VLEK derivation, SNP chip IDs and report signing (sevemu.crypto.vcek)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sevemu.abi.report import REPORT_SIZE, AttestationReport
from sevemu.crypto import ecc, vcek
from sevemu.errors import InputError, KeySizeError, LayoutError, VerificationError

SECRET = bytes(range(64))
MILAN_TCB = 0x7308000000000003  # bl 3, tee 0, snp 8, ucode 0x73
TURIN_TCB = 0x5100000004010101  # fmc 1, bl 1, tee 1, snp 4, ucode 0x51


def _scalar(key: ec.EllipticCurvePrivateKey) -> int:
    return key.private_numbers().private_value


def _report(**kw: object) -> bytes:
    fields: dict[str, object] = {"version": 3, "signature_algo": 1, "reported_tcb": MILAN_TCB,
                               "cpuid_fam_id": 0x19, "cpuid_mod_id": 0x01, "cpuid_step": 1}
    fields.update(kw)
    return AttestationReport(**fields).encode()  # type: ignore[arg-type]


def test_derivation_is_deterministic_and_separates_inputs() -> None:
    a = vcek.derive_vcek(SECRET, "milan", MILAN_TCB)
    assert _scalar(a) == _scalar(vcek.derive_vcek(bytes(SECRET), "Milan", MILAN_TCB))
    others = [
        vcek.derive_vcek(SECRET, "milan", MILAN_TCB + 1),  # bl 4
        vcek.derive_vcek(SECRET, "milan", MILAN_TCB ^ (1 << 56)),  # ucode
        vcek.derive_vcek(SECRET, "genoa", MILAN_TCB),
        vcek.derive_vcek(bytes(63) + b"\x01", "milan", MILAN_TCB),
        vcek.derive_vlek(SECRET, "milan", MILAN_TCB),
    ]
    scalars = {_scalar(a)} | {_scalar(k) for k in others}
    assert len(scalars) == 1 + len(others)
    assert isinstance(a.curve, ec.SECP384R1)


def test_turin_layout_and_every_component_counts() -> None:
    assert vcek.tcb_components("turin", TURIN_TCB) == (
        ("fmc", 1), ("boot_loader", 1), ("tee", 1), ("snp", 4), ("microcode", 0x51))
    base = _scalar(vcek.derive_vcek(SECRET, "turin", TURIN_TCB))
    for byte in (0, 1, 2, 3, 7):
        assert _scalar(vcek.derive_vcek(SECRET, "turin", TURIN_TCB + (1 << (8 * byte)))) != base


@pytest.mark.parametrize(("generation", "tcb"), [
    ("milan", MILAN_TCB | (1 << 16)),  # byte 2 reserved on Milan
    ("genoa", MILAN_TCB | (1 << 40)),
    ("turin", TURIN_TCB | (1 << 32)),  # byte 4 reserved on Turin
    ("milan", -1),
    ("milan", 1 << 64),
])
def test_ill_formed_tcb_names_no_key(generation: str, tcb: int) -> None:
    with pytest.raises(LayoutError):
        vcek.derive_vcek(SECRET, generation, tcb)


def test_bad_generation_and_secret() -> None:
    with pytest.raises(InputError, match="naples"):
        vcek.derive_vcek(SECRET, "naples", MILAN_TCB)
    with pytest.raises(KeySizeError):
        vcek.derive_vcek(bytes(31), "milan", MILAN_TCB)


def test_hash_chain_goes_down_only() -> None:
    # chain(v - 1) = SHA-384(chain(v)): the value of a TCB gives every older TCB, never a newer one
    hi = vcek._chain_values(SECRET, vcek.VCEK_LABEL, "milan", [("snp", 9)])
    lo = vcek._chain_values(SECRET, vcek.VCEK_LABEL, "milan", [("snp", 8)])
    assert hashlib.sha384(hi).digest() == lo
    assert hashlib.sha384(lo).digest() != hi


def test_chip_ids() -> None:
    milan = vcek.snp_chip_id(SECRET, "milan")
    assert milan == ecc.derive_chip_id(SECRET) and len(milan) == 64
    turin = vcek.snp_chip_id(SECRET, "turin")
    assert turin[:8] == milan[:8] and turin[8:] == bytes(56)
    assert vcek.hwid("milan", milan) == milan
    assert vcek.hwid("turin", turin) == milan[:8]
    with pytest.raises(InputError, match="8 significant bytes"):
        vcek.hwid("turin", milan)
    with pytest.raises(InputError, match="64 bytes"):
        vcek.hwid("genoa", milan[:8])


def test_sign_then_verify_and_layout() -> None:
    key = vcek.derive_vcek(SECRET, "milan", MILAN_TCB)
    report = _report(report_data=b"\x5a" * 64)
    signed = vcek.sign_report(key, report)
    assert len(signed) == REPORT_SIZE and signed[:0x2A0] == report[:0x2A0]
    assert signed[0x2A0 + 48:0x2A0 + 72] == bytes(24) and signed[0x2E8 + 48:0x2E8 + 72] == bytes(24)
    assert signed[0x330:] == bytes(REPORT_SIZE - 0x330)
    vcek.verify_report_signature(key.public_key(), signed)
    AttestationReport.decode(signed)  # every reserved byte zero
    # independent check: big-endian DER signature over SHA-384 of [0, 0x2A0), as go-sev-guest does it
    r = int.from_bytes(signed[0x2A0:0x2E8], "little")
    s = int.from_bytes(signed[0x2E8:0x330], "little")
    key.public_key().verify(encode_dss_signature(r, s), signed[:0x2A0], ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize("offset", [0x0, 0x50, 0x180, 0x29F, 0x2A0, 0x2E8, 0x2E7 - 30])
def test_any_change_breaks_the_signature(offset: int) -> None:
    key = vcek.derive_vcek(SECRET, "milan", MILAN_TCB)
    signed = bytearray(vcek.sign_report(key, _report()))
    signed[offset] ^= 0x01
    with pytest.raises((VerificationError, LayoutError)):
        vcek.verify_report_signature(key.public_key(), signed)


def test_wrong_key_is_refused() -> None:
    signed = vcek.sign_report(vcek.derive_vcek(SECRET, "milan", MILAN_TCB), _report())
    with pytest.raises(VerificationError):
        vcek.verify_report_signature(vcek.derive_vcek(SECRET, "milan", MILAN_TCB + 1).public_key(), signed)


def test_sign_refuses_bad_input() -> None:
    key = vcek.derive_vcek(SECRET, "milan", MILAN_TCB)
    with pytest.raises(LayoutError, match="0x4a0 bytes"):
        vcek.sign_report(key, _report()[:-1])
    with pytest.raises(LayoutError, match="SIGNATURE_ALGO 2"):
        vcek.sign_report(key, _report(signature_algo=2))
    with pytest.raises(InputError, match="P-384"):
        vcek.sign_report(ec.generate_private_key(ec.SECP256R1()), _report())


def test_real_report_verifies_with_our_signature_layout(vectors: Path) -> None:
    folder = vectors / "snp-real-reports"
    report = bytes.fromhex((folder / "virtee_report_milan.hex").read_text().strip())
    cert = x509.load_der_x509_certificate((folder / "virtee_vcek_milan.der").read_bytes())
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    vcek.verify_report_signature(pub, report)
    tampered = bytearray(report)
    tampered[21] ^= 0x80  # virtee/sev's negative test: the policy byte
    with pytest.raises(VerificationError):
        vcek.verify_report_signature(pub, tampered)
