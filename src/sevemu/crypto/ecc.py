"""Elliptic-curve helpers (P-384, P-256) with AMD's little-endian encodings.

Sources: SEV API 55766 appendix, certificate format (qx, qy, r, s are 72-byte little-endian,
zero-padded; sev-tool src/sevcert.cpp), LAUNCH_START key agreement (ECDH shared secret Z = the *big-endian* x-coordinate, as OpenSSL's ``EVP_PKEY_derive`` gives
it and as the session KDF consumes it), ATTESTATION (legacy attestation report signed by the PEK:
ECDSA-P384 over SHA-256, r and s little-endian).  Everything runs on ``cryptography``; this module
only converts between AMD's byte order and the library's integers.

Verification raises :class:`~sevemu.errors.VerificationError`; a coordinate pair that is not a
point of the curve raises :class:`~sevemu.errors.InputError`.

Key derivation from a secret (:func:`derive_private_key`, :func:`derive_cek`)
-----------------------------------------------------------------------------
AMD does not publish how the firmware turns its fused chip secret into the CEK (sev-tool
src/sevcert.cpp names only the label ``"sev-chip-endorsement-key"``).  The model's construction, used by both the
manufacturer (:mod:`sevemu.amd.chip`) and the firmware so that they agree on the CEK:

1. ``okm = HKDF-SHA-384(ikm=secret, salt=b"sevemu ecc private key v1", info=label || 0x00 ||
   context, L)`` (RFC 5869), with ``L = ceil((bitlen(n) + 64) / 8)`` bytes (56 for P-384);
2. ``d = (int_be(okm) mod (n - 1)) + 1``.

Step 2 is FIPS 186-5 A.2.1 / FIPS 186-4 B.4.1 ("key pair generation using extra random bits"):
the 64 extra bits make the bias of the reduction negligible (< 2^-64) and the ``+ 1`` makes
``d = 0`` impossible, so no rejection loop is needed.  The secret must be at least 32 bytes.

Chip ID (:func:`derive_chip_id`): AMD's firmware answers GET_ID with the public point ``Q = CUK * G``
of its 32-byte chip-unique key (CUK) on **secp256k1**, x and y each 32 bytes big-endian (AMD-ASPFW
``sev_plat.c: sev_get_id``).  The model has no separate CUK fuse: ``CUK`` is derived from the chip
secret with the construction above (label :data:`CUK_LABEL`, curve secp256k1), so the firmware and
the manufacturer (whose key distribution service indexes CEKs by this ID) compute the same 64 bytes.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu.abi.certs import SEV_ECC_COORD_SIZE
from sevemu.errors import InputError, KeySizeError, VerificationError

__all__ = [
    "CEK_LABEL",
    "CHIP_ID_SIZE",
    "COORD_SIZE",
    "CUK_LABEL",
    "MIN_SECRET_SIZE",
    "P256",
    "P384",
    "SECP256K1",
    "SIGNATURE_SIZE",
    "curve_order",
    "derive_cek",
    "derive_chip_id",
    "derive_private_key",
    "ecdh",
    "generate_private_key",
    "int_to_le",
    "le_to_int",
    "public_key_from_ints",
    "public_key_from_le",
    "public_key_to_le",
    "sign",
    "sign_le",
    "signature_from_le",
    "signature_to_le",
    "verify",
    "verify_le",
]

P256: Final[ec.EllipticCurve] = ec.SECP256R1()
P384: Final[ec.EllipticCurve] = ec.SECP384R1()
SECP256K1: Final[ec.EllipticCurve] = ec.SECP256K1()
"""Curve of the chip-unique key whose public point is the GET_ID chip ID."""

COORD_SIZE: Final = SEV_ECC_COORD_SIZE
"""Bytes of every coordinate / scalar field in AMD structures (72, little-endian)."""
SIGNATURE_SIZE: Final = 2 * COORD_SIZE
"""``r || s`` as AMD lays it out (SEV API 55766 certificate ``sig`` union, ATTESTATION report ``sig1``): 144 bytes."""

CEK_LABEL: Final = b"sev-chip-endorsement-key"
"""Label of the CEK derivation (the string AMD sev-tool ``crypto.h`` names for the CEK)."""
MIN_SECRET_SIZE: Final = 32
CUK_LABEL: Final = b"sevemu chip-unique-key"
"""Label deriving the model's chip-unique key (CUK) from the chip secret (model choice)."""
CHIP_ID_SIZE: Final = 64
"""Bytes of one socket's chip ID: x || y of CUK * G on secp256k1, 32 bytes each, big-endian."""

_HKDF_SALT: Final = b"sevemu ecc private key v1"

# Group orders n (SEC 2 v2 / FIPS 186-5 D.1.2): public constants of the curves.
_ORDERS: Final[dict[str, int]] = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973,
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
}


def curve_order(curve: ec.EllipticCurve) -> int:
    """Order n of the base point of ``curve`` (P-256, P-384, or secp256k1 for the chip ID)."""
    try:
        return _ORDERS[curve.name]
    except KeyError:
        raise InputError(f"unsupported curve {curve.name}") from None


def int_to_le(value: int, size: int = COORD_SIZE) -> bytes:
    """``value`` as ``size`` little-endian bytes; :class:`InputError` if it does not fit."""
    if value < 0 or value >> (8 * size):
        raise InputError(f"integer does not fit {size} bytes")
    return value.to_bytes(size, "little")


def le_to_int(data: bytes) -> int:
    """The unsigned integer whose little-endian encoding is ``data``."""
    return int.from_bytes(data, "little")


def generate_private_key(curve: ec.EllipticCurve = P384) -> ec.EllipticCurvePrivateKey:
    """A fresh random private key on ``curve`` (P-384 by default)."""
    curve_order(curve)
    return ec.generate_private_key(curve)


def public_key_to_le(public_key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    """(qx, qy) of ``public_key``, each 72 bytes little-endian, zero-padded."""
    numbers = public_key.public_numbers()
    return int_to_le(numbers.x), int_to_le(numbers.y)


def public_key_from_ints(x: int, y: int, curve: ec.EllipticCurve = P384) -> ec.EllipticCurvePublicKey:
    """The public key with affine coordinates (x, y); :class:`InputError` if not on ``curve``."""
    curve_order(curve)
    try:
        return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
    except ValueError as exc:
        raise InputError(f"({x:#x}, {y:#x}) is not a point of {curve.name}") from exc


def public_key_from_le(qx: bytes, qy: bytes, curve: ec.EllipticCurve = P384) -> ec.EllipticCurvePublicKey:
    """The public key whose coordinates are the little-endian ``qx`` and ``qy``."""
    return public_key_from_ints(le_to_int(qx), le_to_int(qy), curve)


def sign(
    private_key: ec.EllipticCurvePrivateKey, message: bytes, hash_alg: hashes.HashAlgorithm
) -> tuple[int, int]:
    """ECDSA signature (r, s) of ``message`` hashed with ``hash_alg``."""
    der = private_key.sign(message, ec.ECDSA(hash_alg))
    return decode_dss_signature(der)


def verify(
    public_key: ec.EllipticCurvePublicKey,
    message: bytes,
    r: int,
    s: int,
    hash_alg: hashes.HashAlgorithm,
) -> None:
    """Check the ECDSA signature (r, s) of ``message``; :class:`VerificationError` if it is wrong."""
    n = curve_order(public_key.curve)
    if not (0 < r < n and 0 < s < n):
        raise VerificationError("ECDSA signature: r or s out of range")
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hash_alg))
    except InvalidSignature:
        raise VerificationError("ECDSA signature does not verify") from None


def signature_to_le(r: int, s: int) -> bytes:
    """``r || s``, each 72 bytes little-endian (144 bytes)."""
    return int_to_le(r) + int_to_le(s)


def signature_from_le(data: bytes) -> tuple[int, int]:
    """(r, s) from ``r || s`` (144 bytes, each half little-endian)."""
    if len(data) != SIGNATURE_SIZE:
        raise InputError(f"ECDSA signature: expected {SIGNATURE_SIZE} bytes, got {len(data)}")
    return le_to_int(data[:COORD_SIZE]), le_to_int(data[COORD_SIZE:])


def sign_le(private_key: ec.EllipticCurvePrivateKey, message: bytes, hash_alg: hashes.HashAlgorithm) -> bytes:
    """ECDSA signature of ``message`` in AMD's 144-byte little-endian ``r || s`` form."""
    return signature_to_le(*sign(private_key, message, hash_alg))


def verify_le(
    public_key: ec.EllipticCurvePublicKey, message: bytes, signature: bytes, hash_alg: hashes.HashAlgorithm
) -> None:
    """Check a 144-byte little-endian ``r || s`` signature; :class:`VerificationError` if wrong."""
    try:
        r, s = signature_from_le(signature)
    except InputError as exc:
        raise VerificationError(str(exc)) from exc
    verify(public_key, message, r, s, hash_alg)


def ecdh(private_key: ec.EllipticCurvePrivateKey, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
    """ECDH shared secret Z: the x-coordinate of d * Q, **big-endian** (48 bytes for P-384).

    Reference 1.9: the session KDF takes Z exactly as OpenSSL's ``EVP_PKEY_derive`` returns it.
    """
    if private_key.curve.name != peer_public_key.curve.name:
        raise InputError("ECDH: keys are on different curves")
    return private_key.exchange(ec.ECDH(), peer_public_key)


def derive_private_key(
    secret: bytes, label: bytes, curve: ec.EllipticCurve = P384, context: bytes = b""
) -> ec.EllipticCurvePrivateKey:
    """Deterministic private key from ``secret`` (construction in the module docstring)."""
    if len(secret) < MIN_SECRET_SIZE:
        raise KeySizeError(f"key derivation secret must be at least {MIN_SECRET_SIZE} bytes")
    n = curve_order(curve)
    length = (n.bit_length() + 64 + 7) // 8
    okm = HKDF(
        algorithm=hashes.SHA384(), length=length, salt=_HKDF_SALT, info=label + b"\x00" + context
    ).derive(secret)
    d = int.from_bytes(okm, "big") % (n - 1) + 1
    return ec.derive_private_key(d, curve)


def derive_cek(chip_secret: bytes) -> ec.EllipticCurvePrivateKey:
    """The chip endorsement key (P-384) of a chip whose fused secret is ``chip_secret``.

    Shared by the manufacturer (which certifies the CEK) and the firmware (which signs the PEK
    with it): both hold the same chip secret, handed to them by the scenario.
    """
    return derive_private_key(chip_secret, CEK_LABEL, P384)


def derive_chip_id(chip_secret: bytes) -> bytes:
    """The 64-byte GET_ID chip ID of a chip whose fused secret is ``chip_secret``.

    ``x || y`` (each 32 bytes big-endian) of ``CUK * G`` on secp256k1, with the CUK derived from the
    secret (module docstring).  Public: it names the chip, it reveals nothing about the secret.
    """
    cuk = derive_private_key(chip_secret, CUK_LABEL, SECP256K1)
    numbers = cuk.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
