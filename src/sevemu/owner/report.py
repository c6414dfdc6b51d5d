"""Verification of a legacy SEV ATTESTATION report (command 0x36; SEV API 55766,
ATTESTATION; sev-tool ``src/sevapi.h``).

The report (0xD0 bytes, :class:`sevemu.abi.sev.LegacyAttestationReport`) carries the MNONCE the
requester chose, the guest's launch digest and policy, and an ECDSA P-384 signature by the
platform's PEK over SHA-256 of bytes [0x00, 0x34) -- everything before ``sig_usage``.  The
signature fields say who signed it: ``sig_usage`` must be PEK (0x1002) and ``sig_algo``
ECDSA-SHA256 (2).  ``sig1`` is r[72] || s[72], little-endian.

Trusting the PEK itself (PEK <- OCA, PEK <- CEK <- ASK <- ARK) is the certificate chain's business
(:mod:`sevemu.certs`); this module starts from a PEK public key the caller already trusts.
"""

from __future__ import annotations

import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.sev import LegacyAttestationReport
from sevemu.crypto.ecc import verify_le
from sevemu.errors import InputError, LayoutError, VerificationError

__all__ = [
    "REPORT_SIGNED_SIZE",
    "ReportMismatchError",
    "ReportSignatureError",
    "verify_attestation_report",
]

REPORT_SIGNED_SIZE = 0x34
"""The PEK signs bytes [0x00, 0x34): mnonce, launch_digest, policy."""


class ReportSignatureError(VerificationError):
    """Raised when a report is not signed by the given PEK (wrong key, altered signed bytes or
    signature, or sig_usage / sig_algo other than PEK / ECDSA-SHA256)."""


class ReportMismatchError(VerificationError):
    """Raised when a correctly signed report states an MNONCE, launch digest or policy other than
    the one the verifier expects."""


def _field_check(name: str, got: bytes, expected: bytes | None) -> None:
    if expected is not None and not hmac.compare_digest(bytes(got), bytes(expected)):
        raise ReportMismatchError(f"report {name} {bytes(got).hex()} is not the expected {bytes(expected).hex()}")


def verify_attestation_report(
    report: bytes | LegacyAttestationReport,
    pek_public: ec.EllipticCurvePublicKey,
    *,
    mnonce: bytes | None = None,
    launch_digest: bytes | None = None,
    policy: int | None = None,
) -> LegacyAttestationReport:
    """Check the PEK signature, then the expected values given; return the decoded report.

    Raises :class:`ReportSignatureError` when the signature or its usage/algorithm fields are
    wrong, :class:`ReportMismatchError` when a given expectation differs, and
    :class:`~sevemu.errors.LayoutError` for a buffer that is not a report.
    """
    if not isinstance(pek_public.curve, ec.SECP384R1):
        raise InputError(f"a PEK is a P-384 key, got {pek_public.curve.name}")
    if isinstance(report, LegacyAttestationReport):
        rep, raw_report = report, report.encode()
    else:
        raw_report = bytes(report)
        rep = LegacyAttestationReport.decode(raw_report)
    if rep.sig_usage != KeyUsage.PEK:
        raise ReportSignatureError(f"report sig_usage {rep.sig_usage:#x} is not PEK ({KeyUsage.PEK:#x})")
    if rep.sig_algo != SigAlgo.ECDSA_SHA256:
        raise ReportSignatureError(f"report sig_algo {rep.sig_algo:#x} is not ECDSA-SHA256")
    try:
        verify_le(pek_public, raw_report[:REPORT_SIGNED_SIZE], rep.sig1, hashes.SHA256())
    except VerificationError as exc:
        raise ReportSignatureError(f"report signature does not verify with this PEK: {exc}") from exc
    _field_check("mnonce", rep.mnonce, mnonce)
    _field_check("launch digest", rep.launch_digest, launch_digest)
    if policy is not None:
        if not 0 <= policy < 2**32:
            raise LayoutError(f"policy {policy:#x} does not fit 32 bits")
        if rep.policy != policy:
            raise ReportMismatchError(f"report policy {rep.policy:#x} is not the expected {policy:#x}")
    return rep
