"""SEV platform certificates (SEV API 55766 appendix): byte-exact round trip, signing and slot rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.certs import SEV_CERT_SIZE, EcCurve, KeyUsage, SigAlgo
from sevemu.certs.amd import AmdCert
from sevemu.certs.errors import CertSignatureError
from sevemu.certs.sev import (
    EMPTY_SLOT,
    EcdsaSignature,
    RsaSignature,
    SevCert,
    SevEcKey,
    SevRsaKey,
    SigSlot,
)
from sevemu.crypto import ecc, rsa
from sevemu.errors import InputError, LayoutError

Legacy = Callable[[str], bytes]

SEV_FILES = [f"virtee_{p}_{c}.cert" for p in ("naples", "rome") for c in ("cek", "oca", "pek", "pdh")]

# (usage, algo, sig1 usage/algo, sig2 usage/algo) of the real chains in the vectors.
EXPECTED = {
    "cek": (KeyUsage.CEK, SigAlgo.ECDSA_SHA256, KeyUsage.ASK, None, KeyUsage.INVALID, SigAlgo.INVALID),
    "oca": (
        KeyUsage.OCA,
        SigAlgo.ECDSA_SHA256,
        KeyUsage.OCA,
        SigAlgo.ECDSA_SHA256,
        KeyUsage.INVALID,
        SigAlgo.INVALID,
    ),
    "pek": (
        KeyUsage.PEK,
        SigAlgo.ECDSA_SHA256,
        KeyUsage.OCA,
        SigAlgo.ECDSA_SHA256,
        KeyUsage.CEK,
        SigAlgo.ECDSA_SHA256,
    ),
    "pdh": (
        KeyUsage.PDH,
        SigAlgo.ECDH_SHA256,
        KeyUsage.PEK,
        SigAlgo.ECDSA_SHA256,
        KeyUsage.INVALID,
        SigAlgo.INVALID,
    ),
}
API = {("naples", "cek"): (0, 14), ("rome", "cek"): (0, 14), "naples": (0, 16), "rome": (0, 22)}


@pytest.fixture(scope="module")
def rsa2048() -> crypto_rsa.RSAPrivateKey:
    return rsa.generate_private_key(2048)


def _cert(legacy: Legacy, product: str, name: str) -> SevCert:
    return SevCert.decode(legacy(f"virtee_{product}_{name}.cert"))


# ---- real certificates ----------------------------------------------------------------------
@pytest.mark.parametrize("name", SEV_FILES)
def test_decode_encode_identity(legacy: Legacy, name: str) -> None:
    data = legacy(name)
    assert len(data) == SEV_CERT_SIZE
    assert SevCert.decode(data).encode() == data


@pytest.mark.parametrize("product", ["naples", "rome"])
@pytest.mark.parametrize("name", ["cek", "oca", "pek", "pdh"])
def test_real_fields(legacy: Legacy, product: str, name: str) -> None:
    cert = _cert(legacy, product, name)
    usage, algo, s1u, s1a, s2u, s2a = EXPECTED[name]
    if name == "cek":
        s1a = SigAlgo.RSA_SHA256 if product == "naples" else SigAlgo.RSA_SHA384
    assert (cert.version, cert.usage, cert.algo) == (1, usage, algo)
    assert (cert.api_major, cert.api_minor) == API.get((product, name), API[product])
    assert (cert.sig1.usage, cert.sig1.algo, cert.sig2.usage, cert.sig2.algo) == (s1u, s1a, s2u, s2a)
    assert isinstance(cert.key, SevEcKey) and cert.key.curve == EcCurve.P384
    assert cert.key.to_crypto().curve.name == "secp384r1"
    assert cert.sig2.is_empty == (name != "pek")


@pytest.mark.parametrize("product", ["naples", "rome"])
def test_real_links_and_slots(legacy: Legacy, product: str) -> None:
    cek, oca, pek, pdh = (_cert(legacy, product, n) for n in ("cek", "oca", "pek", "pdh"))
    ask = AmdCert.decode(legacy(f"virtee_{product}_ask.cert"))
    assert cek.verify(ask) == 1
    assert oca.verify(oca) == 1
    assert pek.verify(oca) == 1
    assert pek.verify(cek) == 2
    assert pdh.verify(pek) == 1


def test_either_slot_may_hold_the_signer(legacy: Legacy) -> None:
    pek = _cert(legacy, "rome", "pek")
    swapped = dataclasses.replace(pek, sig1=pek.sig2, sig2=pek.sig1)
    assert swapped.signed_bytes() == pek.signed_bytes()
    assert swapped.verify(_cert(legacy, "rome", "oca")) == 2
    assert swapped.verify(_cert(legacy, "rome", "cek")) == 1
    assert SevCert.decode(swapped.encode()) == swapped


def test_wrong_signers_rejected(legacy: Legacy) -> None:
    cek, oca, pek, pdh = (_cert(legacy, "rome", n) for n in ("cek", "oca", "pek", "pdh"))
    with pytest.raises(CertSignatureError, match="no signature slot"):
        pdh.verify(oca)  # no OCA slot in the PDH
    with pytest.raises(CertSignatureError, match="cannot sign"):
        pek.verify(pdh)  # ECDH keys never sign
    naples_oca = _cert(legacy, "naples", "oca")
    with pytest.raises(CertSignatureError):
        pek.verify(naples_oca)  # right usage and algorithm, wrong key
    naples_ask = AmdCert.decode(legacy("virtee_naples_ask.cert"))
    with pytest.raises(CertSignatureError, match="no signature slot"):
        cek.verify(naples_ask)  # a 2048-bit ASK signs RSA_SHA256; the Rome CEK slot says RSA_SHA384
    sha384_oca = dataclasses.replace(oca, algo=SigAlgo.ECDSA_SHA384)
    with pytest.raises(CertSignatureError, match="no signature slot"):
        pek.verify(sha384_oca)


def test_invalid_signer_key(legacy: Legacy) -> None:
    oca = _cert(legacy, "rome", "oca")
    assert isinstance(oca.key, SevEcKey)
    broken = dataclasses.replace(oca, key=dataclasses.replace(oca.key, qy=oca.key.qy ^ 1))
    with pytest.raises(InputError):
        broken.public_key()
    with pytest.raises(CertSignatureError, match="invalid"):
        _cert(legacy, "rome", "pek").verify(broken)


# ---- strict decoding ------------------------------------------------------------------------
def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value", "what"),
    [
        (0x000, b"\x02", "version"),
        (0x006, b"\x01", "reserved"),
        (0x008, b"\x05\x10", "pub_key_usage"),
        (0x008, b"\x00\x10", "pub_key_usage INVALID"),
        (0x00C, b"\x04", "pub_key_algo"),
        (0x00C, b"\x00", "pub_key_algo INVALID"),
        (0x010 + 0x94, b"\x01", "pub_key reserved"),
        (0x010, b"\x07", "curve"),
        (0x010, b"\x00", "curve 0"),
        (0x41C + 0x90, b"\x01", "ECDSA sig reserved"),
        (0x418, b"\x03", "ECDH in a signature slot"),
        (0x418, b"\x00", "sig1 algo INVALID with a used usage"),
        (0x624, b"\x01", "bytes in an empty slot"),
        (0x61C, b"\x01\x10", "empty slot with a usage"),
        (0x620, b"\x02", "empty usage with an algorithm"),
    ],
)
def test_layout_errors(legacy: Legacy, offset: int, value: bytes, what: str) -> None:
    data = legacy("virtee_rome_pdh.cert")
    SevCert.decode(data)
    with pytest.raises(LayoutError):
        SevCert.decode(_patched(data, offset, value))


def test_wrong_length(legacy: Legacy) -> None:
    data = legacy("virtee_rome_pdh.cert")
    for bad in (data[:-1], data + b"\x00", b""):
        with pytest.raises(LayoutError):
            SevCert.decode(bad)


def test_empty_slot_encoding() -> None:
    cert = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, ecc.generate_private_key().public_key())
    data = cert.encode()
    assert data[0x414:0x41C] == b"\x00\x10\x00\x00\x00\x00\x00\x00"
    assert not any(data[0x41C:0x61C])
    assert cert.sig1 == cert.sig2 == EMPTY_SLOT


def test_slot_consistency() -> None:
    with pytest.raises(LayoutError):
        SigSlot(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, RsaSignature(1))
    with pytest.raises(LayoutError):
        SigSlot(KeyUsage.ASK, SigAlgo.RSA_SHA256, EcdsaSignature(1, 2))
    with pytest.raises(LayoutError):
        SigSlot(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, None)
    with pytest.raises(LayoutError):
        SigSlot(KeyUsage.INVALID, SigAlgo.INVALID, EcdsaSignature(1, 2))
    with pytest.raises(LayoutError):
        EcdsaSignature(1 << 576, 1)


def test_key_algo_consistency() -> None:
    ec_key = SevEcKey.from_crypto(ecc.generate_private_key().public_key())
    with pytest.raises(LayoutError):
        SevCert(1, 0, 0, KeyUsage.OCA, SigAlgo.RSA_SHA256, ec_key)
    with pytest.raises(LayoutError):
        SevCert(1, 0, 0, KeyUsage.OCA, SigAlgo.ECDSA_SHA256, SevRsaKey(2048, 65537, 1 << 2047))


# ---- building -------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", [SigAlgo.ECDSA_SHA256, SigAlgo.ECDSA_SHA384])
@pytest.mark.parametrize("curve", [ecc.P384, ecc.P256], ids=["P-384", "P-256"])
def test_ecdsa_sign_with_round_trip(algo: SigAlgo, curve: ec.EllipticCurve) -> None:
    oca_key = ecc.generate_private_key(curve)
    oca = SevCert.new(KeyUsage.OCA, algo, oca_key.public_key()).sign_with(oca_key, KeyUsage.OCA, algo)
    assert oca.verify(oca) == 1
    pek_key = ecc.generate_private_key()
    pek = SevCert.new(KeyUsage.PEK, SigAlgo.ECDSA_SHA256, pek_key.public_key(), api_major=1, api_minor=55)
    pek = pek.sign_with(oca_key, KeyUsage.OCA, algo, slot=2)
    assert pek.sig1.is_empty and pek.verify(oca) == 2
    again = SevCert.decode(pek.encode())
    assert again == pek and again.encode() == pek.encode()
    assert again.verify(oca) == 2


def test_rsa_signer_and_rsa_key(rsa2048: crypto_rsa.RSAPrivateKey) -> None:
    oca = SevCert.new(KeyUsage.OCA, SigAlgo.RSA_SHA256, rsa2048.public_key())
    oca = oca.sign_with(rsa2048, KeyUsage.OCA, SigAlgo.RSA_SHA256)
    assert isinstance(oca.key, SevRsaKey) and oca.key.modulus_size == 2048
    decoded = SevCert.decode(oca.encode())
    assert decoded == oca
    assert decoded.verify(decoded) == 1
    assert decoded.public_key().public_numbers() == rsa2048.public_key().public_numbers()
    # A signature wider than the signer's modulus is refused, not truncated.
    sig = oca.sig1.signature
    assert isinstance(sig, RsaSignature)
    wide = dataclasses.replace(
        oca, sig1=dataclasses.replace(oca.sig1, signature=RsaSignature(sig.s | 1 << 3000))
    )
    with pytest.raises(CertSignatureError):
        wide.verify(oca)


def test_sign_with_errors(rsa2048: crypto_rsa.RSAPrivateKey) -> None:
    key = ecc.generate_private_key()
    cert = SevCert.new(KeyUsage.PEK, SigAlgo.ECDSA_SHA256, key.public_key())
    with pytest.raises(InputError):
        cert.sign_with(key, KeyUsage.OCA, SigAlgo.RSA_SHA256)
    with pytest.raises(InputError):
        cert.sign_with(rsa2048, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    with pytest.raises(InputError):
        cert.sign_with(key, KeyUsage.OCA, SigAlgo.ECDH_SHA256)
    with pytest.raises(InputError):
        cert.sign_with(key, KeyUsage.INVALID, SigAlgo.ECDSA_SHA256)
    with pytest.raises(InputError):
        cert.sign_with(key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256, slot=3)


def test_signature_covers_only_the_body() -> None:
    key = ecc.generate_private_key()
    cert = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, key.public_key())
    signed = cert.sign_with(key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    assert signed.signed_bytes() == cert.signed_bytes() == cert.encode()[:0x414]
    changed = dataclasses.replace(signed, api_minor=1)
    with pytest.raises(CertSignatureError):
        changed.verify(signed)
