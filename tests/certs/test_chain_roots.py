"""Root checks of a chain whose ARK the user supplies (``--emulated-ark FILE``), and certificate buffers
with bytes after the certificate -- on emulated chains made here, no vectors needed."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.amd.roots import AmdRoot, new_key_id
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain, PlatformChain, SevCertChain
from sevemu.certs.errors import ChainError, UntrustedRootError
from sevemu.certs.roots import PinnedArk
from sevemu.certs.sev import SevCert
from sevemu.crypto import rsa
from sevemu.errors import LayoutError

ECDSA = SigAlgo.ECDSA_SHA256


@pytest.fixture(scope="module")
def root() -> AmdRoot:
    return AmdRoot.create("milan", key_bits=2048)


@pytest.fixture(scope="module")
def chain(root: AmdRoot) -> PlatformChain:
    """A whole emulated platform chain: CEK by the ASK, OCA self-signed, PEK by both, PDH by the PEK."""
    cek_key, oca_key, pek_key, pdh_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(4))
    cek = root.certify_cek(cek_key.public_key())
    oca = SevCert.new(KeyUsage.OCA, ECDSA, oca_key.public_key()).sign_with(oca_key, KeyUsage.OCA, ECDSA, slot=1)
    pek = (SevCert.new(KeyUsage.PEK, ECDSA, pek_key.public_key())
           .sign_with(oca_key, KeyUsage.OCA, ECDSA, slot=1).sign_with(cek_key, KeyUsage.CEK, ECDSA, slot=2))
    pdh = SevCert.new(KeyUsage.PDH, SigAlgo.ECDH_SHA256, pdh_key.public_key()).sign_with(
        pek_key, KeyUsage.PEK, ECDSA, slot=1)
    return PlatformChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=root.ask, ark=root.ark)


def _pin(ark: AmdCert) -> PinnedArk:
    return PinnedArk.from_cert("milan", ark, emulated=True)


def _fails(chain: PlatformChain, pin: PinnedArk, link: str) -> None:
    with pytest.raises(ChainError) as info:
        chain.verify([pin])
    assert info.value.link == link


def test_the_emulated_chain_verifies_against_its_pin(chain: PlatformChain, root: AmdRoot) -> None:
    assert chain.verify([root.pin()]) == root.pin()


def test_a_pin_needs_both_fingerprint_and_key_id(chain: PlatformChain, root: AmdRoot) -> None:
    wrong_id = dataclasses.replace(root.pin(), key_id=new_key_id())
    with pytest.raises(UntrustedRootError):
        chain.verify([wrong_id])
    wrong_print = dataclasses.replace(root.pin(), fingerprints=frozenset({bytes(32)}))
    with pytest.raises(UntrustedRootError):
        chain.verify([wrong_print])


def test_a_supplied_ark_with_another_usage_is_no_root(chain: PlatformChain, root: AmdRoot) -> None:
    # self-certified and validly self-signed, but its usage is ASK: pinning it makes it no ARK
    ark = dataclasses.replace(root.ark, key_usage=KeyUsage.ASK)
    ark = ark.signed_by(root.ark_key)
    _fails(dataclasses.replace(chain, ark=ark), _pin(ark), "ARK")


def test_a_supplied_ark_that_is_not_self_certified_is_no_root(chain: PlatformChain, root: AmdRoot) -> None:
    ark = dataclasses.replace(root.ark, certifying_id=new_key_id()).signed_by(root.ark_key)
    _fails(dataclasses.replace(chain, ark=ark), _pin(ark), "ARK")


def test_a_supplied_ark_with_a_bad_self_signature_is_refused(chain: PlatformChain, root: AmdRoot) -> None:
    other = rsa.generate_private_key(2048)
    ark = root.ark.signed_by(other)  # the same body, signed by another key
    _fails(dataclasses.replace(chain, ark=ark), _pin(ark), "ARK <- ARK")
    sig = bytearray(root.ark.signature or b"")
    sig[0] ^= 1
    flipped = root.ark.with_signature(bytes(sig))
    _fails(dataclasses.replace(chain, ark=flipped), _pin(flipped), "ARK <- ARK")


def test_a_supplied_ark_without_signature_is_accepted_by_pin(chain: PlatformChain, root: AmdRoot) -> None:
    """AMD's Naples ARK file carries no signature: trusted by pin alone; the rest of the chain is
    checked as always."""
    bare = dataclasses.replace(root.ark, signature=None)
    assert dataclasses.replace(chain, ark=bare).verify([_pin(bare)]) == _pin(bare)
    _fails(dataclasses.replace(chain, ark=bare, ask=dataclasses.replace(root.ask, key_usage=KeyUsage.ARK)),
           _pin(bare), "ASK")


def test_the_ask_must_be_an_ask_signed_by_the_ark(chain: PlatformChain, root: AmdRoot) -> None:
    _fails(dataclasses.replace(chain, ask=dataclasses.replace(root.ask, key_usage=KeyUsage.ARK)),
           root.pin(), "ASK")
    stranger = rsa.generate_private_key(2048)
    _fails(dataclasses.replace(chain, ask=root.ask.signed_by(stranger)), root.pin(), "ASK <- ARK")


def test_every_link_below_the_ask_is_checked(chain: PlatformChain, root: AmdRoot) -> None:
    other = ec.generate_private_key(ec.SECP384R1())
    resigned = {
        "CEK <- ASK": dataclasses.replace(chain, cek=root.certify_cek(other.public_key()).with_slot(
            1, chain.pek.slots[0])),
        "OCA <- OCA": dataclasses.replace(chain, oca=chain.oca.sign_with(other, KeyUsage.OCA, ECDSA, slot=1)),
        "PEK <- CEK": dataclasses.replace(chain, pek=chain.pek.sign_with(other, KeyUsage.CEK, ECDSA, slot=2)),
        "PEK <- OCA": dataclasses.replace(chain, pek=chain.pek.sign_with(other, KeyUsage.OCA, ECDSA, slot=1)),
        "PDH <- PEK": dataclasses.replace(chain, pdh=chain.pdh.sign_with(other, KeyUsage.PEK, ECDSA, slot=1)),
    }
    for link, bad in resigned.items():
        _fails(bad, root.pin(), link)


# ---- trailing bytes after a certificate -----------------------------------------------------------
def test_trailing_bytes_after_a_sev_certificate_are_refused(chain: PlatformChain) -> None:
    raw = chain.pdh.encode()
    assert len(raw) == SEV_CERT_SIZE and SevCert.decode(raw) == chain.pdh
    for extra in (b"\x00", b"\x00" * 16, b"x"):
        with pytest.raises(LayoutError):
            SevCert.decode(raw + extra)


def test_trailing_bytes_after_an_amd_certificate_are_refused(root: AmdRoot) -> None:
    for cert in (root.ark, root.ask):
        raw = cert.encode()
        assert AmdCert.decode(raw) == cert
        with pytest.raises(LayoutError):
            AmdCert.decode(raw + b"\x00")
        with pytest.raises(LayoutError):
            AmdCert.decode(raw + b"\x00", allow_unsigned=True)
    bare = dataclasses.replace(root.ark, signature=None).encode()
    assert AmdCert.decode(bare, allow_unsigned=True).signature is None
    with pytest.raises(LayoutError):
        AmdCert.decode(bare)  # unsigned, and not allowed
    with pytest.raises(LayoutError):
        AmdCert.decode(bare + b"\x00", allow_unsigned=True)  # neither the signed nor the bare size


def test_trailing_bytes_after_the_chain_buffers_are_refused(chain: PlatformChain) -> None:
    pdh, certs, amd = chain.pdh.encode(), chain.cert_chain.encode(), chain.amd_certs.encode()
    assert PlatformChain.from_buffers(pdh, certs, amd) == chain
    assert SevCertChain.decode(certs) == chain.cert_chain and AmdCertChain.decode(amd) == chain.amd_certs
    for bad in ((pdh + b"\x00", certs, amd), (pdh, certs + b"\x00", amd), (pdh, certs, amd + b"\x00"),
                (pdh, certs[:-1], amd), (pdh, certs, amd[:-1])):
        with pytest.raises(LayoutError):
            PlatformChain.from_buffers(*bad)
    with pytest.raises(LayoutError):
        SevCertChain.decode(certs + b"\x00")
    with pytest.raises(LayoutError):
        AmdCertChain.decode(amd + b"\x00")
    with pytest.raises(LayoutError):
        AmdCertChain.decode(chain.ask.encode())  # an ASK without its ARK


def test_decoded_chains_are_frozen_and_slotted(chain: PlatformChain) -> None:
    """Decoded structures are immutable values (house convention): a check cannot be undone by
    assigning a certificate after verification."""
    for value in (chain, chain.cert_chain, chain.amd_certs):
        assert not hasattr(value, "__dict__")
        first = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, first, getattr(value, first))
