"""Fixtures for the manufacturer tests: emulated roots (made once per session) and chains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.amd.chip import FusedChip
from sevemu.amd.roots import AmdRoot
from sevemu.certs.chain import PlatformChain
from sevemu.certs.sev import SevCert
from sevemu.crypto import ecc


@pytest.fixture(scope="session")
def milan_root() -> AmdRoot:
    """An emulated Milan root: two RSA-4096 keys, about a second or two to make."""
    return AmdRoot.create("milan")


@pytest.fixture(scope="session")
def naples_root() -> AmdRoot:
    """An emulated Naples root (RSA-2048, like the real Naples ARK/ASK)."""
    return AmdRoot.create("naples")


@dataclass(frozen=True)
class Platform:
    """What a platform's firmware and its owner would hold, built here the way they build it."""

    chain: PlatformChain
    oca_key: ec.EllipticCurvePrivateKey
    pek_key: ec.EllipticCurvePrivateKey
    pdh_key: ec.EllipticCurvePrivateKey


def build_platform(root: AmdRoot, chip: FusedChip, cek: SevCert | None = None) -> Platform:
    """CEK certified by ``root`` (unless given), a self-signed OCA, PEK (OCA + CEK), PDH (PEK)."""
    cek = root.certify_chip(chip) if cek is None else cek
    oca_key, pek_key, pdh_key = (ecc.generate_private_key() for _ in range(3))
    alg = SigAlgo.ECDSA_SHA256
    oca = SevCert.new(KeyUsage.OCA, alg, oca_key.public_key()).sign_with(oca_key, KeyUsage.OCA, alg)
    pek = SevCert.new(KeyUsage.PEK, alg, pek_key.public_key(), api_major=1, api_minor=55)
    pek = pek.sign_with(oca_key, KeyUsage.OCA, alg, slot=1).sign_with(
        chip.cek_private(), KeyUsage.CEK, alg, slot=2
    )
    pdh = SevCert.new(KeyUsage.PDH, SigAlgo.ECDH_SHA256, pdh_key.public_key(), api_major=1, api_minor=55)
    pdh = pdh.sign_with(pek_key, KeyUsage.PEK, alg)
    chain = PlatformChain(pdh=pdh, pek=pek, oca=oca, cek=cek, ask=root.ask, ark=root.ark)
    return Platform(chain, oca_key, pek_key, pdh_key)


BuildPlatform = Callable[..., Platform]


@pytest.fixture(scope="session")
def make_platform() -> BuildPlatform:
    """:func:`build_platform`, as a fixture (conftest modules are not imported by tests)."""
    return build_platform
