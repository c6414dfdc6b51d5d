"""The legacy platform chain: real Naples and Rome chains, tampering, cross-generation, buffers."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SigAlgo
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain, PlatformChain, SevCertChain
from sevemu.certs.errors import ChainError, UntrustedRootError
from sevemu.certs.roots import AMD_ARK_PINS, AMD_ARKS
from sevemu.certs.sev import EMPTY_SLOT, SevCert
from sevemu.errors import LayoutError, VerificationError

Legacy = Callable[[str], bytes]
Raw = dict[str, bytes]

SEV_NAMES = ("pdh", "pek", "oca", "cek")
NAMES = (*SEV_NAMES, "ask", "ark")


def _raw(legacy: Legacy, product: str) -> Raw:
    return {name: legacy(f"virtee_{product}_{name}.cert") for name in NAMES}


def _chain(raw: Raw) -> PlatformChain:
    sev = {name: SevCert.decode(raw[name]) for name in SEV_NAMES}
    return PlatformChain(
        **sev, ask=AmdCert.decode(raw["ask"]), ark=AmdCert.decode(raw["ark"], allow_unsigned=True)
    )


@pytest.fixture(scope="module")
def naples(legacy: Legacy) -> Raw:
    return _raw(legacy, "naples")


@pytest.fixture(scope="module")
def rome(legacy: Legacy) -> Raw:
    return _raw(legacy, "rome")


# ---- the real chains ------------------------------------------------------------------------
@pytest.mark.parametrize("product", ["naples", "rome"])
def test_real_chain_verifies(legacy: Legacy, product: str) -> None:
    chain = _chain(_raw(legacy, product))
    pin = chain.verify(AMD_ARKS)
    assert pin is AMD_ARK_PINS[product]
    assert chain.verify([AMD_ARK_PINS[product]]) is pin


@pytest.mark.parametrize("product", ["naples", "rome"])
def test_real_chain_from_transport_buffers(legacy: Legacy, product: str) -> None:
    raw = _raw(legacy, product)
    cert_chain = raw["pek"] + raw["oca"] + raw["cek"]
    # AMD's own ask_ark file: for Naples the ARK there carries no signature; the pin still holds.
    chain = PlatformChain.from_buffers(raw["pdh"], cert_chain, legacy(f"amd_ask_ark_{product}.cert"))
    assert chain.verify(AMD_ARKS).generation == product
    assert chain.cert_chain.encode() == cert_chain
    assert chain.amd_certs.encode() == legacy(f"amd_ask_ark_{product}.cert")


def test_cert_chain_buffer(naples: Raw) -> None:
    buf = naples["pek"] + naples["oca"] + naples["cek"]
    assert len(buf) == SEV_CERT_CHAIN_SIZE == SevCertChain.SIZE
    chain = SevCertChain.decode(buf)
    assert chain.pek == SevCert.decode(naples["pek"]) and chain.cek == SevCert.decode(naples["cek"])
    assert chain.encode() == buf
    with pytest.raises(LayoutError):
        SevCertChain.decode(buf[:-1])


def test_amd_certs_buffer(rome: Raw) -> None:
    buf = rome["ask"] + rome["ark"]
    chain = AmdCertChain.decode(buf)
    assert chain.encode() == buf and chain.ark.signature is not None
    with pytest.raises(LayoutError):
        AmdCertChain.decode(buf + b"\x00")
    with pytest.raises(LayoutError):
        AmdCertChain.decode(rome["ask"])


# ---- pinning --------------------------------------------------------------------------------
def test_unpinned_root(naples: Raw) -> None:
    chain = _chain(naples)
    with pytest.raises(UntrustedRootError) as info:
        chain.verify([])
    assert info.value.link == "ARK"
    with pytest.raises(UntrustedRootError):
        chain.verify([AMD_ARK_PINS["rome"]])


# ---- cross-generation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "other", "swap", "link"),
    [
        ("naples", "rome", ("cek",), "CEK <- ASK"),  # Naples CEK under the Rome ASK
        ("rome", "naples", ("cek",), "CEK <- ASK"),  # Rome CEK under the Naples ASK
        ("rome", "naples", ("ask",), "ASK <- ARK"),  # Naples ASK under the Rome ARK
        ("naples", "rome", ("ark",), "ASK <- ARK"),  # Naples ASK under the Rome ARK (pinned)
        ("rome", "naples", ("ask", "ark"), "CEK <- ASK"),  # the whole Naples AMD chain
        ("rome", "naples", ("oca",), "PEK <- OCA"),
        ("rome", "naples", ("pek",), "PEK <- CEK"),
        ("rome", "naples", ("pdh",), "PDH <- PEK"),
    ],
)
def test_cross_generation_rejected(
    legacy: Legacy, base: str, other: str, swap: tuple[str, ...], link: str
) -> None:
    raw = _raw(legacy, base)
    donor = _raw(legacy, other)
    for name in swap:
        raw[name] = donor[name]
    with pytest.raises(ChainError) as info:
        _chain(raw).verify(AMD_ARKS)
    assert info.value.link == link


# ---- usage and algorithm --------------------------------------------------------------------
def test_wrong_usage_rejected(rome: Raw) -> None:
    chain = _chain(rome)
    cases = {
        "CEK": dataclasses.replace(chain, cek=chain.oca),
        "OCA": dataclasses.replace(chain, oca=chain.cek),
        "PEK": dataclasses.replace(chain, pek=chain.pdh),
        "PDH": dataclasses.replace(chain, pdh=chain.pek),
        "ASK": dataclasses.replace(chain, ask=chain.ark),
    }
    for link, bad in cases.items():
        with pytest.raises(ChainError) as info:
            bad.verify(AMD_ARKS)
        assert info.value.link == link, link


def test_wrong_algo_rejected(rome: Raw) -> None:
    chain = _chain(rome)
    cases = {
        "PDH": dataclasses.replace(chain, pdh=dataclasses.replace(chain.pdh, algo=SigAlgo.ECDSA_SHA256)),
        "CEK": dataclasses.replace(chain, cek=dataclasses.replace(chain.cek, algo=SigAlgo.ECDH_SHA256)),
        "PEK": dataclasses.replace(chain, pek=dataclasses.replace(chain.pek, algo=SigAlgo.ECDH_SHA384)),
        "OCA": dataclasses.replace(chain, oca=dataclasses.replace(chain.oca, algo=SigAlgo.ECDH_SHA256)),
    }
    for link, bad in cases.items():
        with pytest.raises(ChainError) as info:
            bad.verify(AMD_ARKS)
        assert info.value.link == link, link
    # Same usage, different hash: the certificate's own signature no longer covers it.
    sha384 = dataclasses.replace(chain, pdh=dataclasses.replace(chain.pdh, algo=SigAlgo.ECDH_SHA384))
    with pytest.raises(ChainError) as info:
        sha384.verify(AMD_ARKS)
    assert info.value.link == "PDH <- PEK"


def test_missing_signature_rejected(rome: Raw) -> None:
    chain = _chain(rome)
    for slot, link in ((1, "PEK <- OCA"), (2, "PEK <- CEK")):
        bad = dataclasses.replace(chain, pek=chain.pek.with_slot(slot, EMPTY_SLOT))
        with pytest.raises(ChainError) as info:
            bad.verify(AMD_ARKS)
        assert info.value.link == link


# ---- tampering: flipped bytes ---------------------------------------------------------------
def _flip_rejected(raw: Raw, name: str, position: int, mask: int) -> None:
    data = bytearray(raw[name])
    data[position] ^= mask
    tampered = {**raw, name: bytes(data)}
    with pytest.raises((LayoutError, VerificationError)):
        _chain(tampered).verify(AMD_ARKS)


def _signed_end(name: str, data: bytes) -> int:
    return 0x414 if name in SEV_NAMES else len(AmdCert.decode(data, allow_unsigned=True).signed_bytes())


@pytest.mark.parametrize("product", ["naples", "rome"])
@pytest.mark.parametrize("name", NAMES)
def test_flipped_bytes_rejected_sampled(legacy: Legacy, product: str, name: str) -> None:
    raw = _raw(legacy, product)
    _chain(raw).verify(AMD_ARKS)
    size = len(raw[name])
    end = _signed_end(name, raw[name])
    rng = random.Random(f"{product}/{name}")
    # Every header byte, a sample of the signed key material, a sample of the signature area.
    positions = (
        set(range(0x18)) | set(rng.sample(range(0x18, end), 16)) | set(rng.sample(range(end, size), 6))
    )
    for position in sorted(positions):
        _flip_rejected(raw, name, position, rng.randrange(1, 256))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_flipped_bytes_rejected_every_byte(legacy: Legacy, name: str) -> None:
    raw = _raw(legacy, "naples")
    rng = random.Random(name)
    for position in range(len(raw[name])):
        _flip_rejected(raw, name, position, rng.randrange(1, 256))
