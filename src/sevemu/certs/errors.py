"""Verification errors of the certificate package (all :class:`~sevemu.errors.VerificationError`)."""

from __future__ import annotations

from sevemu.errors import VerificationError

__all__ = ["CertSignatureError", "ChainError", "UntrustedRootError"]


class CertSignatureError(VerificationError):
    """Raised when a certificate is not validly signed by the signer it is checked against.

    Covers a wrong signature, a signer whose key cannot sign, a SEV certificate with no signature
    slot for the signer's usage and algorithm, an AMD certificate whose ``certifying_id`` is not the
    signer's ``key_id``, and an AMD certificate that carries no signature at all.
    """


class ChainError(VerificationError):
    """Raised when one link of a certificate chain fails; :attr:`link` names it.

    ``link`` is a certificate name (``"CEK"``: wrong usage, algorithm or version) or a signature
    link written child first (``"PEK <- OCA"``).
    """

    def __init__(self, link: str, reason: str) -> None:
        self.link = link
        self.reason = reason
        super().__init__(f"{link}: {reason}")


class UntrustedRootError(ChainError):
    """Raised when a chain's ARK is not one of the pinned roots (fingerprint or key id)."""
