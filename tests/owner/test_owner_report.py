"""Legacy ATTESTATION report verification (SEV API 55766, ATTESTATION), with a PEK made up for the test."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.sev import LegacyAttestationReport
from sevemu.crypto.ecc import sign_le
from sevemu.errors import InputError, LayoutError
from sevemu.owner.report import ReportMismatchError, ReportSignatureError, verify_attestation_report

MNONCE = bytes(range(16))
LD = hashlib.sha256(b"guest").digest()
POLICY = 0x33


@pytest.fixture(scope="module")
def pek() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def make_report(pek: ec.EllipticCurvePrivateKey, *, sig_usage: int = 0x1002, sig_algo: int = 2) -> bytes:
    unsigned = LegacyAttestationReport(mnonce=MNONCE, launch_digest=LD, policy=POLICY, sig_usage=sig_usage,
                                       sig_algo=sig_algo)
    sig = sign_le(pek, unsigned.encode()[:0x34], hashes.SHA256())
    return LegacyAttestationReport(mnonce=MNONCE, launch_digest=LD, policy=POLICY, sig_usage=sig_usage,
                                   sig_algo=sig_algo, sig1=sig).encode()


def test_good_report(pek: ec.EllipticCurvePrivateKey) -> None:
    raw = make_report(pek)
    rep = verify_attestation_report(raw, pek.public_key(), mnonce=MNONCE, launch_digest=LD, policy=POLICY)
    assert rep.launch_digest == LD
    assert verify_attestation_report(rep, pek.public_key()) == rep


@pytest.mark.parametrize("bit", [0, 8 * 0x10 + 3, 8 * 0x30, 8 * 0x40, 8 * 0x88 + 1, 8 * 0xCF + 7])
def test_flipped_bit_in_signed_bytes_or_signature(pek: ec.EllipticCurvePrivateKey, bit: int) -> None:
    raw = bytearray(make_report(pek))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ReportSignatureError):
        verify_attestation_report(bytes(raw), pek.public_key())


def test_other_key_or_usage(pek: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ReportSignatureError):
        verify_attestation_report(make_report(pek), other.public_key())
    with pytest.raises(ReportSignatureError):
        verify_attestation_report(make_report(pek, sig_usage=0x1003), pek.public_key())  # PDH
    with pytest.raises(ReportSignatureError):
        verify_attestation_report(make_report(pek, sig_algo=0x102), pek.public_key())
    with pytest.raises(InputError):
        verify_attestation_report(make_report(pek), ec.generate_private_key(ec.SECP256R1()).public_key())


@pytest.mark.parametrize(
    "expect",
    [{"mnonce": bytes(16)}, {"launch_digest": bytes(32)}, {"policy": POLICY ^ 1}],
)
def test_expectation_mismatch(pek: ec.EllipticCurvePrivateKey, expect: dict[str, object]) -> None:
    with pytest.raises(ReportMismatchError):
        verify_attestation_report(make_report(pek), pek.public_key(), **expect)  # type: ignore[arg-type]


def test_malformed(pek: ec.EllipticCurvePrivateKey) -> None:
    raw = make_report(pek)
    with pytest.raises(LayoutError):
        verify_attestation_report(raw[:-1], pek.public_key())
    with pytest.raises(LayoutError):
        verify_attestation_report(raw[:0x3C] + b"\x01" + raw[0x3D:], pek.public_key())  # reserved
