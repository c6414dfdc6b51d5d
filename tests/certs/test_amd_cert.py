"""AMD ARK/ASK certificates (SEV API 55766 appendix) and the real-ARK pins."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.certs.amd import (
    EMULATED_KEY_ID_PREFIX,
    AmdCert,
    hash_for_modulus,
    sig_algo_for_modulus,
)
from sevemu.certs.chain import AmdCertChain
from sevemu.certs.errors import CertSignatureError
from sevemu.certs.roots import AMD_ARK_PINS, AMD_ARKS, GENERATIONS
from sevemu.crypto import rsa
from sevemu.errors import InputError, LayoutError

Legacy = Callable[[str], bytes]

PRODUCTS = ["naples", "rome", "milan", "genoa", "turin"]

# Reference 1.8: the ARK key ids of AMD sev-tool amdcert.h / virtee builtin certificates.
REFERENCE_ARK_IDS = {
    "naples": "1bb987c359494606b174945601c9ea5b",
    "rome": "e6002122fb58419399d15fee7b131351",
    "milan": "94c38e4177d0479292a7ae671d083fb6",
    "genoa": "9f9d4a8fe761456599f6946c4c010f3a",
    "turin": "d05c3a8bde484904b49552422ceb3942",
}

# SHA-256 of AMD's ask_ark_<product>.cert reconstructions (vectors PROVENANCE.md).
ASK_ARK_SHA256 = {
    "naples": "4629ccff0b7dbe64de42925f7d6c97afc60143b4ad027cb6c51e50bfb35ccbf9",
    "rome": "9d7e6b96377ab614e2182e0aae0dcde597019fca23716423f4b902f5dc15c0a6",
    "milan": "f3315952a077b37c3c7c58aea544a16fc62fe5a06185b33c86a518658bb2086b",
    "genoa": "54c445eb9e29381005d9ff1ea6a30bc86d8fde9f9c9e94e89914c0fbb73e8455",
    "turin": "9180034117af707f2c5ae93a43b0e24ec81b4d32d44394dc11f76b35da656de3",
}


@pytest.fixture(scope="module")
def rsa2048() -> crypto_rsa.RSAPrivateKey:
    return rsa.generate_private_key(2048)


def _pair(legacy: Legacy, product: str) -> tuple[AmdCert, AmdCert]:
    ark = AmdCert.decode(legacy(f"virtee_{product}_ark.cert"))
    ask = AmdCert.decode(legacy(f"virtee_{product}_ask.cert"))
    return ark, ask


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("which", ["ark", "ask"])
def test_decode_encode_identity(legacy: Legacy, product: str, which: str) -> None:
    data = legacy(f"virtee_{product}_{which}.cert")
    cert = AmdCert.decode(data)
    assert cert.encode() == data
    assert cert.fingerprint() == hashlib.sha256(data).digest()
    bits = 2048 if product == "naples" else 4096
    assert len(data) == (832 if bits == 2048 else 1600)
    assert (cert.version, cert.pub_exp_size, cert.modulus_size, cert.pub_exp) == (1, bits, bits, 65537)
    assert cert.key_usage == (KeyUsage.ARK if which == "ark" else KeyUsage.ASK)
    assert not cert.is_emulated


@pytest.mark.parametrize("product", PRODUCTS)
def test_ark_self_signed_and_ask_under_ark(legacy: Legacy, product: str) -> None:
    ark, ask = _pair(legacy, product)
    assert ark.is_self_certified and ark.key_id.hex() == REFERENCE_ARK_IDS[product]
    assert ask.certifying_id == ark.key_id and not ask.is_self_certified
    ark.verify(ark)
    ask.verify(ark)
    with pytest.raises(CertSignatureError):
        ark.verify(ask)  # the ASK signs no AMD certificate
    with pytest.raises(CertSignatureError):
        ask.verify(ask)


@pytest.mark.parametrize("product", PRODUCTS)
def test_ask_ark_distribution_files(legacy: Legacy, product: str) -> None:
    data = legacy(f"amd_ask_ark_{product}.cert")
    assert hashlib.sha256(data).hexdigest() == ASK_ARK_SHA256[product]
    chain = AmdCertChain.decode(data)
    assert chain.encode() == data
    ark, ask = _pair(legacy, product)
    assert chain.ask == ask
    assert chain.ark.key_id == ark.key_id
    assert (chain.ark.signature is None) == (product == "naples")


def test_naples_ark_quirk(legacy: Legacy) -> None:
    bad, sig, full = (
        legacy(n)
        for n in ("virtee_naples_ark.cert.bad", "virtee_naples_ark.cert.sig", "virtee_naples_ark.cert")
    )
    assert len(bad) == 576 and len(sig) == 256 and bad + sig == full
    with pytest.raises(LayoutError):
        AmdCert.decode(bad)
    unsigned = AmdCert.decode(bad, allow_unsigned=True)
    assert unsigned.signature is None and unsigned.encode() == bad
    assert unsigned.with_signature(sig) == AmdCert.decode(full)
    with pytest.raises(CertSignatureError, match="no signature"):
        unsigned.verify(unsigned)
    AmdCert.decode(legacy("virtee_naples_ask.cert")).verify(unsigned)  # its key still signs the ASK


def _patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (0x00, b"\x02"),  # version
        (0x24, b"\x04\x10"),  # key_usage CEK
        (0x24, b"\x77"),  # unknown key_usage
        (0x28, b"\x01"),  # reserved
        (0x30, b"\x01"),  # reserved
        (0x38, b"\x00\x0c"),  # pub_exp_size 3072
        (0x3C, b"\x00\x10"),  # modulus_size 4096 on a 2048-bit certificate
        (0x3C, b"\x01"),  # modulus_size not a whole byte count
    ],
)
def test_layout_errors(legacy: Legacy, offset: int, value: bytes) -> None:
    data = legacy("virtee_naples_ask.cert")
    with pytest.raises(LayoutError):
        AmdCert.decode(_patched(data, offset, value))


def test_length_errors(legacy: Legacy) -> None:
    data = legacy("virtee_rome_ark.cert")
    for bad in (data[:-1], data + b"\x00", data[:0x3F]):
        with pytest.raises(LayoutError):
            AmdCert.decode(bad)
    with pytest.raises(LayoutError):
        AmdCert.decode_prefix(data[:-1])
    cert, rest = AmdCert.decode_prefix(data + b"tail")
    assert rest == b"tail" and cert.encode() == data


def test_create_and_sign(rsa2048: crypto_rsa.RSAPrivateKey) -> None:
    key_id = EMULATED_KEY_ID_PREFIX + bytes(8)
    ark = AmdCert.create(
        key_id=key_id, certifying_id=key_id, key_usage=KeyUsage.ARK, public_key=rsa2048.public_key()
    )
    assert ark.signature is None and len(ark.encode()) == 576
    signed = ark.signed_by(rsa2048)
    assert len(signed.encode()) == 832 and signed.is_emulated
    signed.verify(signed)
    assert AmdCert.decode(signed.encode()) == signed
    forged = dataclasses.replace(signed, key_id=EMULATED_KEY_ID_PREFIX + b"\x01" * 8)
    with pytest.raises(CertSignatureError):
        forged.verify(signed)


def test_construction_checks() -> None:
    base: dict[str, Any] = {
        "version": 1,
        "key_id": bytes(16),
        "certifying_id": bytes(16),
        "key_usage": KeyUsage.ARK,
        "pub_exp_size": 2048,
        "modulus_size": 2048,
        "pub_exp": 65537,
        "modulus": (1 << 2047) | 1,
        "signature": None,
    }
    AmdCert(**base)
    for change in (
        {"key_id": bytes(15)},
        {"key_usage": KeyUsage.PEK},
        {"modulus": 1 << 2048},
        {"signature": bytes(255)},
        {"modulus_size": 1024},
    ):
        with pytest.raises(LayoutError):
            AmdCert(**{**base, **change})


def test_hash_and_algo_by_size() -> None:
    assert hash_for_modulus(2048).name == "sha256" and sig_algo_for_modulus(2048) is SigAlgo.RSA_SHA256
    assert hash_for_modulus(4096).name == "sha384" and sig_algo_for_modulus(4096) is SigAlgo.RSA_SHA384
    for bad in (1024, 3072):
        with pytest.raises(InputError):
            hash_for_modulus(bad)
        with pytest.raises(InputError):
            sig_algo_for_modulus(bad)


# ---- pins -----------------------------------------------------------------------------------
@pytest.mark.parametrize("product", PRODUCTS)
def test_pins_match_the_real_arks(legacy: Legacy, product: str) -> None:
    ark, _ = _pair(legacy, product)
    pin = AMD_ARK_PINS[product]
    assert pin.generation == product and not pin.emulated
    assert pin.key_id.hex() == REFERENCE_ARK_IDS[product]
    assert pin.modulus_size == ark.modulus_size
    assert pin.accepts(ark)
    assert [p.generation for p in AMD_ARKS if p.accepts(ark)] == [product]
    assert not pin.key_id.startswith(EMULATED_KEY_ID_PREFIX)


def test_naples_pin_accepts_amd_distribution_form(legacy: Legacy) -> None:
    unsigned = AmdCert.decode(legacy("virtee_naples_ark.cert.bad"), allow_unsigned=True)
    assert AMD_ARK_PINS["naples"].accepts(unsigned)
    assert len(AMD_ARK_PINS["naples"].fingerprints) == 2
    assert all(len(AMD_ARK_PINS[g].fingerprints) == 1 for g in GENERATIONS if g != "naples")


def test_pin_rejects_changed_key_id(legacy: Legacy) -> None:
    ark, _ = _pair(legacy, "rome")
    pin = AMD_ARK_PINS["rome"]
    assert not dataclasses.replace(pin, key_id=bytes(16)).accepts(ark)
    assert tuple(AMD_ARK_PINS) == GENERATIONS
