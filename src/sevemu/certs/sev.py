"""SEV platform certificates (CEK, OCA, PEK, PDH, and the guest owner's GODH): 0x824 bytes each.

Sources: SEV API 55766 appendix "Certificates"; sev-tool ``src/sevcert.cpp``; virtee ``sev``
``src/certs/sev/sev/cert/v1``; layouts in :mod:`sevemu.abi.certs`.

A :class:`SevCert` holds one public key (:class:`SevEcKey` for the ECDSA/ECDH algorithms,
:class:`SevRsaKey` for the RSA ones) and two signature slots (:class:`SigSlot`).  Each slot names
the signer by the signer's *own* key usage and algorithm; the signature covers bytes
[0x000, 0x414) (version .. pub_key) hashed with the hash of that algorithm:

* ECDSA: (r, s), each 72 bytes little-endian;
* RSA: RSASSA-PSS, MGF1 same hash, salt = digest length, signature little-endian in the low
  ``modulus / 8`` bytes (the ASK signing the CEK: RSA_SHA256 for a 2048-bit Naples ASK,
  RSA_SHA384 for 4096-bit ASKs).

Verification (:meth:`SevCert.verify`) follows sev-tool's ``validate_signature``: a slot counts for
a signer when its usage and algorithm equal the signer's; either slot may hold a given signer (the
PEK carries the OCA's and the CEK's signatures in either order).  Model choice, stricter than
sev-tool: ECDH keys (the PDH) never sign.

Empty slot: usage ``INVALID`` (0x1000), algorithm ``INVALID`` (0) and all-zero signature bytes,
as both AMD sev-tool and virtee/sev write it; a used slot has neither code ``INVALID``.
Decoding is strict: unknown codes and non-zero must-be-zero bytes raise
:class:`~sevemu.errors.LayoutError`, and ``decode(b).encode() == b`` for every accepted ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, TypeAlias

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.certs import (
    SEV_CERT_SIGNED_SIZE,
    SEV_CERT_VERSION,
    SEV_RSA_MAX_BYTES,
    EcCurve,
    KeyUsage,
    SevCertLayout,
    SevEcdsaSig,
    SevEcPubKey,
    SevRsaPubKey,
    SevRsaSig,
    SigAlgo,
)
from sevemu.certs.amd import AmdCert
from sevemu.certs.errors import CertSignatureError
from sevemu.crypto import ecc, rsa
from sevemu.errors import InputError, LayoutError, VerificationError

__all__ = [
    "ECDH_ALGOS",
    "ECDSA_ALGOS",
    "EMPTY_SLOT",
    "RSA_ALGOS",
    "SIGNING_ALGOS",
    "EcdsaSignature",
    "RsaSignature",
    "SevCert",
    "SevEcKey",
    "SevPublicKey",
    "SevRsaKey",
    "SigSlot",
    "hash_for_algo",
]

RSA_ALGOS: Final = frozenset({SigAlgo.RSA_SHA256, SigAlgo.RSA_SHA384})
ECDSA_ALGOS: Final = frozenset({SigAlgo.ECDSA_SHA256, SigAlgo.ECDSA_SHA384})
ECDH_ALGOS: Final = frozenset({SigAlgo.ECDH_SHA256, SigAlgo.ECDH_SHA384})
SIGNING_ALGOS: Final = RSA_ALGOS | ECDSA_ALGOS

_CURVES: Final[dict[EcCurve, ec.EllipticCurve]] = {EcCurve.P256: ecc.P256, EcCurve.P384: ecc.P384}
_MAX_RSA_BITS: Final = 8 * SEV_RSA_MAX_BYTES

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | crypto_rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | crypto_rsa.RSAPublicKey


def hash_for_algo(algo: SigAlgo) -> hashes.HashAlgorithm:
    """SHA-256 for the ``*_SHA256`` codes, SHA-384 for the ``*_SHA384`` ones."""
    if algo in (SigAlgo.RSA_SHA256, SigAlgo.ECDSA_SHA256, SigAlgo.ECDH_SHA256):
        return hashes.SHA256()
    if algo in (SigAlgo.RSA_SHA384, SigAlgo.ECDSA_SHA384, SigAlgo.ECDH_SHA384):
        return hashes.SHA384()
    raise InputError(f"algorithm {algo!r} has no hash")


def _enum(kind: type[KeyUsage | SigAlgo | EcCurve], value: int, what: str) -> int:
    try:
        return kind(value)
    except ValueError:
        raise LayoutError(f"SevCert: unknown {what} {value:#x}") from None


def _usage(value: int, what: str) -> KeyUsage:
    return KeyUsage(_enum(KeyUsage, value, what))


def _algo(value: int, what: str) -> SigAlgo:
    return SigAlgo(_enum(SigAlgo, value, what))


# ---- public keys ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SevEcKey:
    """ECDSA/ECDH public key of the ``pub_key`` union; coordinates as numbers."""

    curve: EcCurve
    qx: int
    qy: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve", EcCurve(_enum(EcCurve, self.curve, "curve")))
        for value in (self.qx, self.qy):
            if value < 0 or value >> (8 * ecc.COORD_SIZE):
                raise LayoutError(f"SevEcKey: coordinate does not fit {ecc.COORD_SIZE} bytes")

    @classmethod
    def from_crypto(cls, public_key: ec.EllipticCurvePublicKey) -> SevEcKey:
        for code, curve in _CURVES.items():
            if curve.name == public_key.curve.name:
                numbers = public_key.public_numbers()
                return cls(code, numbers.x, numbers.y)
        raise InputError(f"SEV certificates carry P-256 or P-384 keys, not {public_key.curve.name}")

    def to_crypto(self) -> ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object; :class:`InputError` if it is not a curve point."""
        return ecc.public_key_from_ints(self.qx, self.qy, _CURVES[self.curve])

    def encode(self) -> bytes:
        return SevEcPubKey(
            curve=int(self.curve), qx=ecc.int_to_le(self.qx), qy=ecc.int_to_le(self.qy)
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> SevEcKey:
        raw = SevEcPubKey.decode(data)
        return cls(EcCurve(_enum(EcCurve, raw.curve, "curve")), ecc.le_to_int(raw.qx), ecc.le_to_int(raw.qy))


@dataclass(frozen=True, slots=True)
class SevRsaKey:
    """RSA public key of the ``pub_key`` union; ``modulus_size`` in bits."""

    modulus_size: int
    pub_exp: int
    modulus: int

    def __post_init__(self) -> None:
        for value in (self.pub_exp, self.modulus):
            if value < 0 or value >> _MAX_RSA_BITS:
                raise LayoutError(f"SevRsaKey: value does not fit {SEV_RSA_MAX_BYTES} bytes")
        if not 0 <= self.modulus_size < 1 << 32:
            raise LayoutError("SevRsaKey: modulus_size does not fit a u32")

    @classmethod
    def from_crypto(cls, public_key: crypto_rsa.RSAPublicKey) -> SevRsaKey:
        if public_key.key_size > _MAX_RSA_BITS:
            raise InputError(f"SEV certificates carry RSA keys of at most {_MAX_RSA_BITS} bits")
        numbers = public_key.public_numbers()
        return cls(public_key.key_size, numbers.e, numbers.n)

    def to_crypto(self) -> crypto_rsa.RSAPublicKey:
        """The key as a ``cryptography`` object; :class:`InputError` if the numbers are invalid."""
        if not 0 < self.modulus_size <= _MAX_RSA_BITS or self.modulus.bit_length() != self.modulus_size:
            raise InputError(f"SevRsaKey: modulus_size {self.modulus_size} does not match the modulus")
        return rsa.public_key_from_ints(self.modulus, self.pub_exp)

    def encode(self) -> bytes:
        return SevRsaPubKey(
            modulus_size=self.modulus_size,
            pub_exp=self.pub_exp.to_bytes(SEV_RSA_MAX_BYTES, "little"),
            modulus=self.modulus.to_bytes(SEV_RSA_MAX_BYTES, "little"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> SevRsaKey:
        raw = SevRsaPubKey.decode(data)
        return cls(
            raw.modulus_size, int.from_bytes(raw.pub_exp, "little"), int.from_bytes(raw.modulus, "little")
        )


SevPublicKey: TypeAlias = SevEcKey | SevRsaKey


def _key_from_crypto(public_key: PublicKey) -> SevPublicKey:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return SevEcKey.from_crypto(public_key)
    return SevRsaKey.from_crypto(public_key)


# ---- signatures -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EcdsaSignature:
    """ECDSA member of the signature union."""

    r: int
    s: int

    def __post_init__(self) -> None:
        for value in (self.r, self.s):
            if value < 0 or value >> (8 * ecc.COORD_SIZE):
                raise LayoutError(f"EcdsaSignature: value does not fit {ecc.COORD_SIZE} bytes")

    def encode(self) -> bytes:
        return SevEcdsaSig(r=ecc.int_to_le(self.r), s=ecc.int_to_le(self.s)).encode()


@dataclass(frozen=True, slots=True)
class RsaSignature:
    """RSA member of the signature union: the signature as a number (stored little-endian)."""

    s: int

    def __post_init__(self) -> None:
        if self.s < 0 or self.s >> _MAX_RSA_BITS:
            raise LayoutError(f"RsaSignature: value does not fit {SEV_RSA_MAX_BYTES} bytes")

    def encode(self) -> bytes:
        return SevRsaSig(s=self.s.to_bytes(SEV_RSA_MAX_BYTES, "little")).encode()

    def to_le(self, width: int) -> bytes:
        """The signature as ``width`` little-endian bytes (the signer's modulus width)."""
        if self.s >> (8 * width):
            raise VerificationError(f"RSA signature longer than the signer's {width}-byte modulus")
        return self.s.to_bytes(width, "little")


@dataclass(frozen=True, slots=True)
class SigSlot:
    """One signature slot: the signer's usage and algorithm, and the signature (None: empty)."""

    usage: KeyUsage = KeyUsage.INVALID
    algo: SigAlgo = SigAlgo.INVALID
    signature: EcdsaSignature | RsaSignature | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "usage", _usage(self.usage, "signature usage"))
        object.__setattr__(self, "algo", _algo(self.algo, "signature algorithm"))
        if (self.algo == SigAlgo.INVALID) != (self.usage == KeyUsage.INVALID):
            raise LayoutError("SigSlot: an empty slot has usage and algorithm INVALID, a used one neither")
        if self.algo == SigAlgo.INVALID:
            ok = self.signature is None
        elif self.algo in RSA_ALGOS:
            ok = isinstance(self.signature, RsaSignature)
        elif self.algo in ECDSA_ALGOS:
            ok = isinstance(self.signature, EcdsaSignature)
        else:
            raise LayoutError(f"SigSlot: {self.algo.name} is not a signature algorithm")
        if not ok:
            raise LayoutError(
                f"SigSlot: signature {type(self.signature).__name__} does not fit {self.algo.name}"
            )

    @property
    def is_empty(self) -> bool:
        return self.signature is None

    def encode_signature(self) -> bytes:
        return SevRsaSig().encode() if self.signature is None else self.signature.encode()

    @classmethod
    def decode(cls, usage: int, algo: int, data: bytes) -> SigSlot:
        code = _algo(algo, "signature algorithm")
        signature: EcdsaSignature | RsaSignature | None
        if code == SigAlgo.INVALID:
            if any(data):
                raise LayoutError("SevCert: empty signature slot holds non-zero bytes")
            signature = None
        elif code in RSA_ALGOS:
            signature = RsaSignature(int.from_bytes(SevRsaSig.decode(data).s, "little"))
        elif code in ECDSA_ALGOS:
            raw = SevEcdsaSig.decode(data)
            signature = EcdsaSignature(ecc.le_to_int(raw.r), ecc.le_to_int(raw.s))
        else:
            raise LayoutError(f"SevCert: {code.name} is not a signature algorithm")
        return cls(_usage(usage, "signature usage"), code, signature)


EMPTY_SLOT: Final = SigSlot()


# ---- the certificate ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SevCert:
    """A SEV certificate (SEV API 55766 appendix, certificate format)."""

    version: int
    api_major: int
    api_minor: int
    usage: KeyUsage
    algo: SigAlgo
    key: SevPublicKey
    sig1: SigSlot = EMPTY_SLOT
    sig2: SigSlot = EMPTY_SLOT

    def __post_init__(self) -> None:
        if self.version != SEV_CERT_VERSION:
            raise LayoutError(f"SevCert: version {self.version} (only {SEV_CERT_VERSION} is defined)")
        object.__setattr__(self, "usage", _usage(self.usage, "pub_key_usage"))
        object.__setattr__(self, "algo", _algo(self.algo, "pub_key_algo"))
        if self.usage == KeyUsage.INVALID:
            raise LayoutError("SevCert: pub_key_usage is INVALID")
        if self.algo in RSA_ALGOS:
            ok = isinstance(self.key, SevRsaKey)
        elif self.algo in ECDSA_ALGOS | ECDH_ALGOS:
            ok = isinstance(self.key, SevEcKey)
        else:
            raise LayoutError("SevCert: pub_key_algo is INVALID")
        if not ok:
            raise LayoutError(f"SevCert: a {type(self.key).__name__} does not fit {self.algo.name}")

    # ---- encoding --------------------------------------------------------------------------
    @classmethod
    def decode(cls, data: bytes) -> SevCert:
        """Decode 0x824 bytes; :class:`LayoutError` on unknown codes or non-zero reserved bytes."""
        raw = SevCertLayout.decode(data)
        algo = _algo(raw.pub_key_algo, "pub_key_algo")
        key: SevPublicKey
        if algo in RSA_ALGOS:
            key = SevRsaKey.decode(raw.pub_key)
        elif algo in ECDSA_ALGOS | ECDH_ALGOS:
            key = SevEcKey.decode(raw.pub_key)
        else:
            raise LayoutError("SevCert: pub_key_algo is INVALID")
        return cls(
            version=raw.version,
            api_major=raw.api_major,
            api_minor=raw.api_minor,
            usage=_usage(raw.pub_key_usage, "pub_key_usage"),
            algo=algo,
            key=key,
            sig1=SigSlot.decode(raw.sig1_usage, raw.sig1_algo, raw.sig1),
            sig2=SigSlot.decode(raw.sig2_usage, raw.sig2_algo, raw.sig2),
        )

    def encode(self) -> bytes:
        return SevCertLayout(
            version=self.version,
            api_major=self.api_major,
            api_minor=self.api_minor,
            pub_key_usage=int(self.usage),
            pub_key_algo=int(self.algo),
            pub_key=self.key.encode(),
            sig1_usage=int(self.sig1.usage),
            sig1_algo=int(self.sig1.algo),
            sig1=self.sig1.encode_signature(),
            sig2_usage=int(self.sig2.usage),
            sig2_algo=int(self.sig2.algo),
            sig2=self.sig2.encode_signature(),
        ).encode()

    def signed_bytes(self) -> bytes:
        """Bytes [0x000, 0x414): what every signature slot signs."""
        return self.encode()[:SEV_CERT_SIGNED_SIZE]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def new(
        cls,
        usage: KeyUsage,
        algo: SigAlgo,
        public_key: PublicKey,
        *,
        api_major: int = 0,
        api_minor: int = 0,
    ) -> SevCert:
        """An unsigned certificate (both slots empty) for ``public_key``."""
        return cls(
            version=SEV_CERT_VERSION,
            api_major=api_major,
            api_minor=api_minor,
            usage=usage,
            algo=algo,
            key=_key_from_crypto(public_key),
        )

    @property
    def slots(self) -> tuple[SigSlot, SigSlot]:
        return (self.sig1, self.sig2)

    def public_key(self) -> PublicKey:
        """The certified key as a ``cryptography`` object (:class:`InputError` if invalid)."""
        return self.key.to_crypto()

    def with_slot(self, slot: int, value: SigSlot) -> SevCert:
        """This certificate with signature slot ``slot`` (1 or 2) replaced."""
        if slot == 1:
            return replace(self, sig1=value)
        if slot == 2:
            return replace(self, sig2=value)
        raise InputError(f"signature slot is 1 or 2, not {slot}")

    def sign_with(
        self, signer_private: PrivateKey, signer_usage: KeyUsage, algo: SigAlgo, slot: int = 1
    ) -> SevCert:
        """This certificate with slot ``slot`` signed by ``signer_private``.

        ``signer_usage`` and ``algo`` are the *signer's* usage and algorithm, as recorded in the
        slot; ``algo`` picks the hash and must suit the key (``RSA_*`` / ``ECDSA_*``).
        """
        signer_usage = _usage(signer_usage, "signer usage")
        algo = _algo(algo, "signer algorithm")
        if signer_usage == KeyUsage.INVALID:
            raise InputError("signer usage INVALID marks an empty slot")
        message = self.signed_bytes()
        hash_alg = hash_for_algo(algo)
        signature: EcdsaSignature | RsaSignature
        if algo in ECDSA_ALGOS and isinstance(signer_private, ec.EllipticCurvePrivateKey):
            signature = EcdsaSignature(*ecc.sign(signer_private, message, hash_alg))
        elif algo in RSA_ALGOS and isinstance(signer_private, crypto_rsa.RSAPrivateKey):
            if signer_private.key_size > _MAX_RSA_BITS:
                raise InputError(f"RSA signer larger than {_MAX_RSA_BITS} bits")
            signature = RsaSignature(
                int.from_bytes(rsa.pss_sign(signer_private, message, hash_alg), "little")
            )
        else:
            raise InputError(f"a {type(signer_private).__name__} cannot sign with {algo.name}")
        return self.with_slot(slot, SigSlot(signer_usage, algo, signature))

    # ---- verification ----------------------------------------------------------------------
    def verify(self, signer: SevCert | AmdCert) -> int:
        """Check that ``signer`` signed this certificate; returns the slot (1 or 2) that holds it.

        An :class:`AmdCert` signer (the ASK signing the CEK) signs with RSA_SHA256 when it is a
        2048-bit key and RSA_SHA384 when 4096-bit.  Raises
        :class:`~sevemu.certs.errors.CertSignatureError`.
        """
        if isinstance(signer, AmdCert):
            usage, algo = signer.key_usage, signer.sig_algo
        else:
            usage, algo = signer.usage, signer.algo
            if algo not in SIGNING_ALGOS:
                raise CertSignatureError(f"a {usage.name} key with {algo.name} cannot sign")
        try:
            key = signer.public_key()
        except InputError as exc:
            raise CertSignatureError(f"signer {usage.name} key is invalid: {exc}") from exc
        candidates = [n for n, s in enumerate(self.slots, 1) if s.usage == usage and s.algo == algo]
        if not candidates:
            raise CertSignatureError(
                f"{self.usage.name} has no signature slot for {usage.name} / {algo.name}"
            )
        message = self.signed_bytes()
        hash_alg = hash_for_algo(algo)
        failure = ""
        for n in candidates:
            signature = self.slots[n - 1].signature
            try:
                if isinstance(signature, EcdsaSignature) and isinstance(key, ec.EllipticCurvePublicKey):
                    ecc.verify(key, message, signature.r, signature.s, hash_alg)
                elif isinstance(signature, RsaSignature) and isinstance(key, crypto_rsa.RSAPublicKey):
                    rsa.pss_verify(key, message, signature.to_le((key.key_size + 7) // 8), hash_alg)
                else:
                    raise VerificationError(f"{algo.name} signature does not match the signer's key type")
            except VerificationError as exc:
                failure = str(exc)
                continue
            return n
        raise CertSignatureError(f"{self.usage.name} signature by {usage.name}: {failure}")
