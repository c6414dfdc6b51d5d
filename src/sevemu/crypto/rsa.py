"""RSASSA-PSS with AMD's little-endian byte order (ARK, ASK and the ASK's signature on the CEK).

Sources: SEV API 55766 appendices (RSA member of the SEV certificate unions; AMD ARK/ASK
certificate format), sev-tool src/amdcert.cpp: modulus, public exponent and signature are stored little-endian; the signature is
RSASSA-PSS with MGF1 over the same hash and a salt as long as the digest (32 bytes for SHA-256,
48 for SHA-384).  AMD sev-tool and virtee/sev reverse the bytes before handing them to a big-endian
RSA library; so does this module, over ``cryptography``.

Verification raises :class:`~sevemu.errors.VerificationError`.  Key sizes: 2048 (Naples ARK/ASK)
and 4096 bits (Rome and later).
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sevemu.errors import InputError, KeySizeError, VerificationError

__all__ = [
    "KEY_SIZES",
    "PUBLIC_EXPONENT",
    "generate_private_key",
    "pss_padding",
    "pss_sign",
    "pss_verify",
    "public_key_from_ints",
    "public_key_from_le",
    "public_key_to_le",
]

KEY_SIZES: Final = (2048, 4096)
PUBLIC_EXPONENT: Final = 65537


def generate_private_key(bits: int = 4096) -> rsa.RSAPrivateKey:
    """A fresh RSA key of ``bits`` (2048 or 4096) with e = 65537; 4096 bits takes about a second."""
    if bits not in KEY_SIZES:
        raise KeySizeError(f"RSA key size must be one of {KEY_SIZES}, got {bits}")
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits)


def pss_padding(hash_alg: hashes.HashAlgorithm) -> padding.PSS:
    """PSS parameters AMD uses: MGF1 with the message hash, salt length = digest length."""
    return padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)


def pss_sign(private_key: rsa.RSAPrivateKey, message: bytes, hash_alg: hashes.HashAlgorithm) -> bytes:
    """RSASSA-PSS signature of ``message``, little-endian, as long as the modulus."""
    big_endian = private_key.sign(message, pss_padding(hash_alg), hash_alg)
    return big_endian[::-1]


def pss_verify(
    public_key: rsa.RSAPublicKey, message: bytes, signature: bytes, hash_alg: hashes.HashAlgorithm
) -> None:
    """Check a little-endian RSASSA-PSS ``signature``; :class:`VerificationError` if it is wrong."""
    width = (public_key.key_size + 7) // 8
    if len(signature) != width:
        raise VerificationError(f"RSA signature: expected {width} bytes, got {len(signature)}")
    try:
        public_key.verify(signature[::-1], message, pss_padding(hash_alg), hash_alg)
    except InvalidSignature:
        raise VerificationError("RSA-PSS signature does not verify") from None


def public_key_to_le(public_key: rsa.RSAPublicKey, size: int | None = None) -> tuple[bytes, bytes]:
    """(modulus, public exponent), each ``size`` bytes little-endian (default: the modulus width)."""
    width = (public_key.key_size + 7) // 8 if size is None else size
    numbers = public_key.public_numbers()
    if numbers.n >> (8 * width) or numbers.e >> (8 * width):
        raise InputError(f"RSA key does not fit {width} bytes")
    return numbers.n.to_bytes(width, "little"), numbers.e.to_bytes(width, "little")


def public_key_from_ints(modulus: int, pub_exp: int) -> rsa.RSAPublicKey:
    """The RSA public key (n, e); :class:`InputError` if the numbers are not a valid key."""
    try:
        return rsa.RSAPublicNumbers(pub_exp, modulus).public_key()
    except ValueError as exc:
        raise InputError(f"not a valid RSA public key: {exc}") from exc


def public_key_from_le(modulus: bytes, pub_exp: bytes) -> rsa.RSAPublicKey:
    """The RSA public key from little-endian modulus and exponent bytes."""
    return public_key_from_ints(int.from_bytes(modulus, "little"), int.from_bytes(pub_exp, "little"))
