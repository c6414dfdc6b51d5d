"""AMD root and signing key certificates (ARK, ASK) in AMD's own format.

Sources: SEV API 55766 appendix "AMD Root/Signing Key certificate"; sev-tool ``src/amdcert.cpp``;
virtee ``sev`` ``src/certs/sev/ca/cert/v1.rs``; layout in :mod:`sevemu.abi.certs`.

An :class:`AmdCert` is the 0x40-byte header, then ``pub_exp``, ``modulus`` and ``sig`` (widths
from the header; all little-endian).  The signature is RSASSA-PSS by the ARK over everything
before ``sig`` -- SHA-256 with a 2048-bit ARK (Naples), SHA-384 with a 4096-bit ARK (Rome and
later).  The ARK is self-signed (``certifying_id == key_id``); the ASK's ``certifying_id`` is the
ARK's ``key_id``.

Naples quirk: the ARK in AMD's downloadable ``ask_ark_naples.cert`` has no signature (576 bytes
instead of 832; AMDESE/AMDSEV issue 17, see the vectors' PROVENANCE.md).  ``decode(...,
allow_unsigned=True)`` accepts that form (``signature is None``; ``encode`` reproduces it) and
:meth:`AmdCert.with_signature` restores the signature AMD published later.

:meth:`AmdCert.fingerprint` is the SHA-256 of the encoded certificate, exactly the bytes AMD
distributes; roots are pinned by it (:mod:`sevemu.certs.roots`).

Emulated certificates (made by :mod:`sevemu.amd`) carry ``key_id`` values starting with
:data:`EMULATED_KEY_ID_PREFIX` (ASCII ``EMULATED``); real AMD key ids are random UUIDs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.certs import AMD_CERT_HEADER_SIZE, AMD_CERT_VERSION, AmdCertHeader, KeyUsage, SigAlgo
from sevemu.certs.errors import CertSignatureError
from sevemu.crypto import rsa
from sevemu.errors import InputError, LayoutError, VerificationError

__all__ = [
    "EMULATED_KEY_ID_PREFIX",
    "KEY_ID_SIZE",
    "MODULUS_SIZES",
    "AmdCert",
    "hash_for_modulus",
    "sig_algo_for_modulus",
]

KEY_ID_SIZE: Final = 16
MODULUS_SIZES: Final = (2048, 4096)
EMULATED_KEY_ID_PREFIX: Final = b"EMULATED"
"""First 8 bytes of every emulated ARK/ASK ``key_id``; the other 8 are random."""

_AMD_USAGES: Final = (KeyUsage.ARK, KeyUsage.ASK)


def _key_usage(value: int) -> KeyUsage:
    try:
        return KeyUsage(value)
    except ValueError:
        raise LayoutError(f"AmdCert: unknown key_usage {value:#x}") from None


def hash_for_modulus(bits: int) -> hashes.HashAlgorithm:
    """Hash an AMD key of ``bits`` signs with: SHA-256 for 2048 bits, SHA-384 for 4096 (SEV API 55766 appendix)."""
    if bits == 2048:
        return hashes.SHA256()
    if bits == 4096:
        return hashes.SHA384()
    raise InputError(f"AMD keys are 2048 or 4096 bits, not {bits}")


def sig_algo_for_modulus(bits: int) -> SigAlgo:
    """SEV certificate algorithm code of an AMD key of ``bits`` (the ASK signing a CEK; sev-tool ``src/amdcert.cpp``)."""
    if bits == 2048:
        return SigAlgo.RSA_SHA256
    if bits == 4096:
        return SigAlgo.RSA_SHA384
    raise InputError(f"AMD keys are 2048 or 4096 bits, not {bits}")


@dataclass(frozen=True, slots=True)
class AmdCert:
    """An ARK or ASK certificate (SEV API 55766 appendix, AMD root/signing key format); integers are held as numbers, sizes in bits."""

    version: int
    key_id: bytes
    certifying_id: bytes
    key_usage: KeyUsage
    pub_exp_size: int
    modulus_size: int
    pub_exp: int
    modulus: int
    signature: bytes | None
    """Little-endian RSA-PSS signature, ``modulus_size / 8`` bytes; ``None``: unsigned form."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.version != AMD_CERT_VERSION:
            raise LayoutError(f"{name}: version {self.version} (only {AMD_CERT_VERSION} is defined)")
        if len(self.key_id) != KEY_ID_SIZE or len(self.certifying_id) != KEY_ID_SIZE:
            raise LayoutError(f"{name}: key_id and certifying_id are {KEY_ID_SIZE} bytes")
        object.__setattr__(self, "key_usage", _key_usage(self.key_usage))
        if self.key_usage not in _AMD_USAGES:
            raise LayoutError(f"{name}: key_usage {int(self.key_usage):#x} is neither ARK nor ASK")
        if self.modulus_size not in MODULUS_SIZES:
            raise LayoutError(f"{name}: modulus_size {self.modulus_size} is not one of {MODULUS_SIZES}")
        if self.pub_exp_size not in MODULUS_SIZES:
            raise LayoutError(f"{name}: pub_exp_size {self.pub_exp_size} is not one of {MODULUS_SIZES}")
        if self.pub_exp < 0 or self.pub_exp >> self.pub_exp_size:
            raise LayoutError(f"{name}: pub_exp does not fit {self.pub_exp_size} bits")
        if self.modulus < 0 or self.modulus >> self.modulus_size:
            raise LayoutError(f"{name}: modulus does not fit {self.modulus_size} bits")
        if self.signature is not None and len(self.signature) != self.modulus_size // 8:
            raise LayoutError(f"{name}: signature must be {self.modulus_size // 8} bytes")

    # ---- encoding --------------------------------------------------------------------------
    @staticmethod
    def _sizes(header: AmdCertHeader) -> tuple[int, int]:
        """(unsigned size, signed size) in bytes of a certificate with this header."""
        if header.pub_exp_size % 8 or header.modulus_size % 8:
            raise LayoutError("AmdCert: key sizes must be whole bytes")
        unsigned = AMD_CERT_HEADER_SIZE + (header.pub_exp_size + header.modulus_size) // 8
        return unsigned, unsigned + header.modulus_size // 8

    @classmethod
    def decode(cls, data: bytes, *, allow_unsigned: bool = False) -> AmdCert:
        """Decode one whole certificate; ``allow_unsigned`` accepts the signature-less form."""
        data = bytes(data)
        header = AmdCertHeader.decode_prefix(data)
        unsigned, signed = cls._sizes(header)
        if len(data) == signed:
            signature: bytes | None = data[unsigned:]
        elif len(data) == unsigned and allow_unsigned:
            signature = None
        else:
            raise LayoutError(f"AmdCert: expected {signed:#x} bytes for this header, got {len(data):#x}")
        exp_end = AMD_CERT_HEADER_SIZE + header.pub_exp_size // 8
        return cls(
            version=header.version,
            key_id=header.key_id,
            certifying_id=header.certifying_id,
            key_usage=_key_usage(header.key_usage),
            pub_exp_size=header.pub_exp_size,
            modulus_size=header.modulus_size,
            pub_exp=int.from_bytes(data[AMD_CERT_HEADER_SIZE:exp_end], "little"),
            modulus=int.from_bytes(data[exp_end:unsigned], "little"),
            signature=signature,
        )

    @classmethod
    def decode_prefix(cls, data: bytes) -> tuple[AmdCert, bytes]:
        """Decode a signed certificate from the start of ``data``; returns it and the rest."""
        header = AmdCertHeader.decode_prefix(data)
        _, signed = cls._sizes(header)
        if len(data) < signed:
            raise LayoutError(f"AmdCert: expected {signed:#x} bytes for this header, got {len(data):#x}")
        return cls.decode(bytes(data[:signed])), bytes(data[signed:])

    def signed_bytes(self) -> bytes:
        """The region the signature covers: header, public exponent, modulus."""
        header = AmdCertHeader(
            version=self.version,
            key_id=self.key_id,
            certifying_id=self.certifying_id,
            key_usage=int(self.key_usage),
            pub_exp_size=self.pub_exp_size,
            modulus_size=self.modulus_size,
        )
        return (
            header.encode()
            + self.pub_exp.to_bytes(self.pub_exp_size // 8, "little")
            + self.modulus.to_bytes(self.modulus_size // 8, "little")
        )

    def encode(self) -> bytes:
        """AMD's byte form (without the signature when :attr:`signature` is ``None``)."""
        return self.signed_bytes() + (self.signature or b"")

    # ---- properties ------------------------------------------------------------------------
    @property
    def is_self_certified(self) -> bool:
        """``certifying_id == key_id`` (the ARK)."""
        return self.key_id == self.certifying_id

    @property
    def is_emulated(self) -> bool:
        """The key id carries the emulated prefix (made by :mod:`sevemu.amd`, not by AMD)."""
        return self.key_id.startswith(EMULATED_KEY_ID_PREFIX)

    @property
    def hash_alg(self) -> hashes.HashAlgorithm:
        """Hash this key signs with (SHA-256 for 2048 bits, SHA-384 for 4096)."""
        return hash_for_modulus(self.modulus_size)

    @property
    def sig_algo(self) -> SigAlgo:
        """SEV algorithm code of this key when it signs a SEV certificate (the CEK)."""
        return sig_algo_for_modulus(self.modulus_size)

    def fingerprint(self) -> bytes:
        """SHA-256 of :meth:`encode` -- of the file as distributed; what roots are pinned by."""
        return hashlib.sha256(self.encode()).digest()

    def public_key(self) -> crypto_rsa.RSAPublicKey:
        """The certified RSA public key."""
        return rsa.public_key_from_ints(self.modulus, self.pub_exp)

    # ---- building and verifying ------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        key_id: bytes,
        certifying_id: bytes,
        key_usage: KeyUsage,
        public_key: crypto_rsa.RSAPublicKey,
    ) -> AmdCert:
        """An unsigned certificate for ``public_key`` (exponent field as wide as the modulus)."""
        numbers = public_key.public_numbers()
        return cls(
            version=AMD_CERT_VERSION,
            key_id=key_id,
            certifying_id=certifying_id,
            key_usage=key_usage,
            pub_exp_size=public_key.key_size,
            modulus_size=public_key.key_size,
            pub_exp=numbers.e,
            modulus=numbers.n,
            signature=None,
        )

    def with_signature(self, signature: bytes) -> AmdCert:
        """This certificate with ``signature`` (little-endian) in place of its own."""
        return replace(self, signature=bytes(signature))

    def signed_by(self, signer_private: crypto_rsa.RSAPrivateKey) -> AmdCert:
        """This certificate signed with ``signer_private`` (the ARK's key; the hash by its size)."""
        if signer_private.key_size not in MODULUS_SIZES:
            raise InputError(f"AMD signing keys are {MODULUS_SIZES} bits")
        message = self.signed_bytes()
        return self.with_signature(
            rsa.pss_sign(signer_private, message, hash_for_modulus(signer_private.key_size))
        )

    def verify(self, signer: AmdCert) -> None:
        """Check that ``signer`` (an ARK; ``self`` for the ARK itself) signed this certificate.

        Raises :class:`~sevemu.certs.errors.CertSignatureError`.
        """
        if self.signature is None:
            raise CertSignatureError("AMD certificate carries no signature")
        if signer.key_usage != KeyUsage.ARK:
            raise CertSignatureError(
                f"only the ARK signs AMD certificates, not the {KeyUsage(signer.key_usage).name}"
            )
        if self.certifying_id != signer.key_id:
            raise CertSignatureError(
                f"certifying_id {self.certifying_id.hex()} is not the signer's key_id {signer.key_id.hex()}"
            )
        try:
            rsa.pss_verify(signer.public_key(), self.signed_bytes(), self.signature, signer.hash_alg)
        except (VerificationError, InputError) as exc:
            raise CertSignatureError(f"{self.key_usage.name} signature: {exc}") from exc
