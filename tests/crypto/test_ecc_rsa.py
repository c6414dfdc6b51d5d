"""ECC and RSA-PSS helpers: AMD's little-endian encodings, KATs on real AMD certificates."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu.crypto import ecc, rsa
from sevemu.errors import InputError, KeySizeError, VerificationError

SHA256 = hashes.SHA256()
SHA384 = hashes.SHA384()


@pytest.fixture(scope="module")
def rsa2048() -> crypto_rsa.RSAPrivateKey:
    return rsa.generate_private_key(2048)


# ---- little-endian integers -----------------------------------------------------------------
def test_int_le_round_trip_and_overflow() -> None:
    assert ecc.int_to_le(0x0102, 4) == b"\x02\x01\x00\x00"
    assert ecc.le_to_int(b"\x02\x01\x00\x00") == 0x0102
    assert len(ecc.int_to_le(1)) == ecc.COORD_SIZE == 72
    with pytest.raises(InputError):
        ecc.int_to_le(1 << 32, 4)
    with pytest.raises(InputError):
        ecc.int_to_le(-1, 4)


# ---- public keys ----------------------------------------------------------------------------
@pytest.mark.parametrize("curve", [ecc.P384, ecc.P256], ids=["P-384", "P-256"])
def test_public_key_le_round_trip(curve: ec.EllipticCurve) -> None:
    key = ecc.generate_private_key(curve).public_key()
    qx, qy = ecc.public_key_to_le(key)
    assert len(qx) == len(qy) == 72
    width = (curve.key_size + 7) // 8
    assert not any(qx[width:]) and not any(qy[width:])  # zero padding above the field size
    assert qx[:width] == key.public_numbers().x.to_bytes(width, "big")[::-1]
    back = ecc.public_key_from_le(qx, qy, curve)
    assert back.public_numbers() == key.public_numbers()


def test_public_key_not_on_curve() -> None:
    qx, qy = ecc.public_key_to_le(ecc.generate_private_key().public_key())
    bad_y = ecc.int_to_le(ecc.le_to_int(qy) ^ 1)
    with pytest.raises(InputError):
        ecc.public_key_from_le(qx, bad_y)


def test_unsupported_curve() -> None:
    with pytest.raises(InputError):
        ecc.generate_private_key(ec.SECP521R1())


def test_curve_orders_match_the_library() -> None:
    # (n - 1) * G = -G: same x as G, y negated mod p.
    for curve, p in (
        (ecc.P256, 2**256 - 2**224 + 2**192 + 2**96 - 1),
        (ecc.P384, 2**384 - 2**128 - 2**96 + 2**32 - 1),
    ):
        n = ecc.curve_order(curve)
        g = ec.derive_private_key(1, curve).public_key().public_numbers()
        minus_g = ec.derive_private_key(n - 1, curve).public_key().public_numbers()
        assert (minus_g.x, minus_g.y) == (g.x, p - g.y)


# ---- ECDSA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hash_alg", [SHA256, SHA384], ids=["sha256", "sha384"])
def test_ecdsa_sign_verify(hash_alg: hashes.HashAlgorithm) -> None:
    key = ecc.generate_private_key()
    r, s = ecc.sign(key, b"message", hash_alg)
    ecc.verify(key.public_key(), b"message", r, s, hash_alg)
    with pytest.raises(VerificationError):
        ecc.verify(key.public_key(), b"messagE", r, s, hash_alg)
    other = SHA384 if hash_alg is SHA256 else SHA256
    with pytest.raises(VerificationError):
        ecc.verify(key.public_key(), b"message", r, s, other)


def test_ecdsa_range_checks() -> None:
    key = ecc.generate_private_key()
    r, s = ecc.sign(key, b"m", SHA256)
    n = ecc.curve_order(ecc.P384)
    for bad in ((0, s), (r, 0), (r + n, s), (r, s + n)):
        with pytest.raises(VerificationError):
            ecc.verify(key.public_key(), b"m", *bad, SHA256)


def test_ecdsa_le_signature_form() -> None:
    key = ecc.generate_private_key()
    sig = ecc.sign_le(key, b"report", SHA256)
    assert len(sig) == ecc.SIGNATURE_SIZE == 144
    r, s = ecc.signature_from_le(sig)
    assert ecc.signature_to_le(r, s) == sig
    ecc.verify_le(key.public_key(), b"report", sig, SHA256)
    with pytest.raises(VerificationError):
        ecc.verify_le(key.public_key(), b"report", sig[:-1], SHA256)
    with pytest.raises(VerificationError):
        ecc.verify_le(key.public_key(), b"report", bytes([sig[0] ^ 1]) + sig[1:], SHA256)


# ---- ECDH -----------------------------------------------------------------------------------
def test_ecdh_is_big_endian_x() -> None:
    a, b = ecc.generate_private_key(), ecc.generate_private_key()
    z = ecc.ecdh(a, b.public_key())
    assert len(z) == 48
    assert z == ecc.ecdh(b, a.public_key())
    # d = 1: Z is the peer's own x-coordinate, big-endian.
    one = ec.derive_private_key(1, ecc.P384)
    assert ecc.ecdh(one, b.public_key()) == b.public_key().public_numbers().x.to_bytes(48, "big")


def test_ecdh_curve_mismatch() -> None:
    with pytest.raises(InputError):
        ecc.ecdh(ecc.generate_private_key(ecc.P384), ecc.generate_private_key(ecc.P256).public_key())


# ---- deterministic derivation ---------------------------------------------------------------
def test_derive_private_key_construction() -> None:
    secret = bytes(range(48))
    key = ecc.derive_private_key(secret, b"label", context=b"ctx")
    # Independent recomputation of the documented construction.
    okm = HKDF(SHA384, 56, b"sevemu ecc private key v1", b"label\x00ctx").derive(secret)
    n = ecc.curve_order(ecc.P384)
    assert key.private_numbers().private_value == int.from_bytes(okm, "big") % (n - 1) + 1
    assert ecc.derive_private_key(secret, b"label", context=b"ctx").private_numbers() == key.private_numbers()
    assert ecc.derive_private_key(secret, b"label2").private_numbers() != key.private_numbers()


def test_derive_cek_is_labelled_derivation() -> None:
    secret = b"\x5a" * 64
    expected = ecc.derive_private_key(secret, b"sev-chip-endorsement-key")
    assert ecc.derive_cek(secret).private_numbers() == expected.private_numbers()
    assert ecc.derive_cek(secret).curve.name == "secp384r1"
    p256 = ecc.derive_private_key(secret, b"x", ecc.P256)
    assert 0 < p256.private_numbers().private_value < ecc.curve_order(ecc.P256)


def test_derive_rejects_short_secret() -> None:
    with pytest.raises(KeySizeError):
        ecc.derive_cek(bytes(31))


# ---- RSA-PSS --------------------------------------------------------------------------------
def test_rsa_key_sizes() -> None:
    with pytest.raises(KeySizeError):
        rsa.generate_private_key(1024)


@pytest.mark.parametrize("hash_alg", [SHA256, SHA384], ids=["sha256", "sha384"])
def test_pss_sign_verify_little_endian(
    rsa2048: crypto_rsa.RSAPrivateKey, hash_alg: hashes.HashAlgorithm
) -> None:
    sig = rsa.pss_sign(rsa2048, b"cert body", hash_alg)
    assert len(sig) == 256
    rsa.pss_verify(rsa2048.public_key(), b"cert body", sig, hash_alg)
    # The stored form is the byte-reverse of what a big-endian library verifies.
    rsa2048.public_key().verify(sig[::-1], b"cert body", rsa.pss_padding(hash_alg), hash_alg)
    with pytest.raises(VerificationError):
        rsa.pss_verify(rsa2048.public_key(), b"cert bodY", sig, hash_alg)
    with pytest.raises(VerificationError):
        rsa.pss_verify(rsa2048.public_key(), b"cert body", sig[::-1], hash_alg)
    with pytest.raises(VerificationError):
        rsa.pss_verify(rsa2048.public_key(), b"cert body", sig + b"\x00", hash_alg)


@pytest.mark.parametrize("hash_alg", [SHA256, SHA384], ids=["sha256", "sha384"])
def test_pss_salt_is_digest_length(rsa2048: crypto_rsa.RSAPrivateKey, hash_alg: hashes.HashAlgorithm) -> None:
    sig = rsa.pss_sign(rsa2048, b"m", hash_alg)[::-1]
    pub = rsa2048.public_key()
    pub.verify(sig, b"m", padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size), hash_alg)
    with pytest.raises(InvalidSignature):
        pub.verify(sig, b"m", padding.PSS(padding.MGF1(hash_alg), hash_alg.digest_size - 1), hash_alg)


def test_rsa_public_key_le_round_trip(rsa2048: crypto_rsa.RSAPrivateKey) -> None:
    pub = rsa2048.public_key()
    modulus, exp = rsa.public_key_to_le(pub)
    assert len(modulus) == len(exp) == 256
    assert int.from_bytes(exp, "little") == 65537
    assert rsa.public_key_from_le(modulus, exp).public_numbers() == pub.public_numbers()
    modulus512, _ = rsa.public_key_to_le(pub, 512)
    assert modulus512[:256] == modulus and not any(modulus512[256:])
    with pytest.raises(InputError):
        rsa.public_key_to_le(pub, 128)
    with pytest.raises(InputError):
        rsa.public_key_from_ints(int.from_bytes(modulus, "little"), 2)


# ---- known answers on real AMD certificates (offsets from SEV API 55766 appendices) --------------
def _legacy(vectors: Path, name: str) -> bytes:
    return (vectors / "sev-legacy-certs" / name).read_bytes()


@pytest.mark.parametrize("product", ["naples", "rome", "milan", "genoa", "turin"])
def test_rsa_kat_real_ark_self_signature(vectors: Path, product: str) -> None:
    ark = _legacy(vectors, f"virtee_{product}_ark.cert")
    exp_bits, mod_bits = struct.unpack_from("<II", ark, 0x38)
    exp_end = 0x40 + exp_bits // 8
    sig_start = exp_end + mod_bits // 8
    key = rsa.public_key_from_le(ark[exp_end:sig_start], ark[0x40:exp_end])
    hash_alg = SHA256 if mod_bits == 2048 else SHA384
    rsa.pss_verify(key, ark[:sig_start], ark[sig_start:], hash_alg)


def test_ecdsa_kat_real_pek_signed_by_oca(vectors: Path) -> None:
    oca = _legacy(vectors, "virtee_rome_oca.cert")
    pek = _legacy(vectors, "virtee_rome_pek.cert")
    key = ecc.public_key_from_le(oca[0x14:0x5C], oca[0x5C:0xA4])
    ecc.verify_le(key, pek[:0x414], pek[0x41C : 0x41C + 144], SHA256)
    with pytest.raises(VerificationError):
        ecc.verify_le(key, pek[:0x413] + b"\xff", pek[0x41C : 0x41C + 144], SHA256)
