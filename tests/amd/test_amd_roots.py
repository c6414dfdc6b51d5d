"""The emulated manufacturer's roots: AMD format, CEK certification, pinning, persistence."""

from __future__ import annotations

import dataclasses
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sevemu.abi.certs import EcCurve, KeyUsage, SigAlgo
from sevemu.amd.chip import FusedChip
from sevemu.amd.roots import CEK_API_MAJOR, CEK_API_MINOR, AmdRoot, new_key_id
from sevemu.certs.amd import EMULATED_KEY_ID_PREFIX, AmdCert
from sevemu.certs.errors import CertSignatureError, ChainError, UntrustedRootError
from sevemu.certs.roots import AMD_ARK_PINS, AMD_ARKS
from sevemu.certs.sev import SevCert, SevEcKey
from sevemu.crypto import ecc
from sevemu.errors import FileFormatError, InputError, KeySizeError

MakePlatform = Callable[..., Any]


# ---- the certificates -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixture", "bits", "size"), [("milan_root", 4096, 1600), ("naples_root", 2048, 832)]
)
def test_root_format(request: pytest.FixtureRequest, fixture: str, bits: int, size: int) -> None:
    root: AmdRoot = request.getfixturevalue(fixture)
    for cert, usage in ((root.ark, KeyUsage.ARK), (root.ask, KeyUsage.ASK)):
        data = cert.encode()
        assert len(data) == size
        assert AmdCert.decode(data) == cert
        assert (cert.key_usage, cert.modulus_size, cert.pub_exp_size, cert.pub_exp) == (
            usage,
            bits,
            bits,
            65537,
        )
        assert cert.key_id.startswith(EMULATED_KEY_ID_PREFIX) and cert.is_emulated
    assert root.ark.is_self_certified and root.ask.certifying_id == root.ark.key_id
    root.ark.verify(root.ark)
    root.ask.verify(root.ark)
    assert root.amd_certs.encode() == root.ask.encode() + root.ark.encode()


def test_key_ids_are_random() -> None:
    ids = {new_key_id() for _ in range(16)}
    assert len(ids) == 16
    assert all(len(i) == 16 and i.startswith(b"EMULATED") for i in ids)


def test_root_arguments() -> None:
    with pytest.raises(InputError):
        AmdRoot.create("bergamo")
    with pytest.raises(KeySizeError):
        AmdRoot.create("rome", key_bits=1024)


def test_root_refuses_unmarked_or_mismatched_certs(naples_root: AmdRoot) -> None:
    real_looking_id = bytes.fromhex("00112233445566778899aabbccddeeff")
    ark = dataclasses.replace(naples_root.ark, key_id=real_looking_id, certifying_id=real_looking_id)
    ark = ark.signed_by(naples_root.ark_key)
    ask = dataclasses.replace(naples_root.ask, certifying_id=real_looking_id).signed_by(naples_root.ark_key)
    with pytest.raises(InputError, match="EMULATED"):
        AmdRoot("naples", ark, ask, naples_root.ark_key, naples_root.ask_key)
    with pytest.raises(InputError, match="does not certify"):
        AmdRoot("naples", naples_root.ark, naples_root.ask, naples_root.ask_key, naples_root.ask_key)


# ---- CEK certification ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fixture", "algo"), [("milan_root", SigAlgo.RSA_SHA384), ("naples_root", SigAlgo.RSA_SHA256)]
)
def test_certify_cek_like_real_ceks(
    request: pytest.FixtureRequest, fixture: str, algo: SigAlgo, vectors: Path
) -> None:
    root: AmdRoot = request.getfixturevalue(fixture)
    chip = FusedChip.fuse(root.generation)
    cek = root.certify_chip(chip)
    assert (cek.version, cek.api_major, cek.api_minor) == (1, CEK_API_MAJOR, CEK_API_MINOR) == (1, 0, 14)
    assert (cek.usage, cek.algo) == (KeyUsage.CEK, SigAlgo.ECDSA_SHA256)
    assert isinstance(cek.key, SevEcKey) and cek.key.curve == EcCurve.P384
    assert cek.public_key().public_numbers() == chip.cek_public().public_numbers()
    assert (cek.sig1.usage, cek.sig1.algo) == (KeyUsage.ASK, algo) and cek.sig2.is_empty
    assert cek.verify(root.ask) == 1
    assert SevCert.decode(cek.encode()) == cek
    # Same codes as the real CEK of the same key size.
    real = SevCert.decode(
        (
            vectors
            / "sev-legacy-certs"
            / f"virtee_{'naples' if algo is SigAlgo.RSA_SHA256 else 'rome'}_cek.cert"
        ).read_bytes()
    )
    fields = ("version", "api_major", "api_minor", "usage", "algo")
    assert [getattr(cek, f) for f in fields] == [getattr(real, f) for f in fields]
    assert (real.sig1.usage, real.sig1.algo, real.sig2) == (cek.sig1.usage, cek.sig1.algo, cek.sig2)


def test_certify_cek_rejects_other_curves_and_generations(naples_root: AmdRoot) -> None:
    with pytest.raises(InputError):
        naples_root.certify_cek(ecc.generate_private_key(ecc.P256).public_key())
    with pytest.raises(InputError):
        naples_root.certify_chip(FusedChip.fuse("rome"))


# ---- the emulated chain ---------------------------------------------------------------------
def test_emulated_chain_verifies_with_its_own_pin(milan_root: AmdRoot, make_platform: MakePlatform) -> None:
    platform = make_platform(milan_root, FusedChip.fuse("milan"))
    pin = milan_root.pin()
    assert pin.emulated and pin.generation == "milan" and pin.accepts(milan_root.ark)
    assert platform.chain.verify([pin]) == pin
    assert platform.chain.verify([*AMD_ARKS, pin]) == pin


@pytest.mark.parametrize("fixture", ["milan_root", "naples_root"])
def test_emulated_chain_never_verifies_against_real_pins(
    request: pytest.FixtureRequest, fixture: str, make_platform: MakePlatform
) -> None:
    root: AmdRoot = request.getfixturevalue(fixture)
    platform = make_platform(root, FusedChip.fuse(root.generation))
    with pytest.raises(UntrustedRootError):
        platform.chain.verify(AMD_ARKS)
    with pytest.raises(UntrustedRootError):
        platform.chain.verify([AMD_ARK_PINS[root.generation]])


def test_other_emulated_root_is_untrusted(
    milan_root: AmdRoot, naples_root: AmdRoot, make_platform: MakePlatform
) -> None:
    platform = make_platform(naples_root, FusedChip.fuse("naples"))
    with pytest.raises(UntrustedRootError):
        platform.chain.verify([milan_root.pin()])


def test_cek_of_another_root_rejected(
    milan_root: AmdRoot, naples_root: AmdRoot, make_platform: MakePlatform
) -> None:
    chip = FusedChip.fuse("milan")
    foreign_cek = naples_root.certify_cek(chip.cek_public())
    platform = make_platform(milan_root, chip, foreign_cek)
    with pytest.raises(ChainError) as info:
        platform.chain.verify([milan_root.pin(), naples_root.pin()])
    assert info.value.link == "CEK <- ASK"


def test_pek_signed_by_another_chip_rejected(naples_root: AmdRoot, make_platform: MakePlatform) -> None:
    chip, other = FusedChip.fuse("naples"), FusedChip.fuse("naples")
    platform = make_platform(naples_root, chip, naples_root.certify_chip(other))
    with pytest.raises(ChainError) as info:
        platform.chain.verify([naples_root.pin()])
    assert info.value.link == "PEK <- CEK"


def test_real_chain_not_trusted_under_emulated_pin(milan_root: AmdRoot, vectors: Path) -> None:
    from sevemu.certs.chain import PlatformChain

    folder = vectors / "sev-legacy-certs"
    read = {
        n: (folder / f"virtee_rome_{n}.cert").read_bytes() for n in ("pdh", "pek", "oca", "cek", "ask", "ark")
    }
    chain = PlatformChain.from_buffers(
        read["pdh"], read["pek"] + read["oca"] + read["cek"], read["ask"] + read["ark"]
    )
    with pytest.raises(UntrustedRootError):
        chain.verify([milan_root.pin()])
    # A real CEK under an emulated ASK, and an emulated CEK under the real ASK, both fail.
    real_cek = SevCert.decode(read["cek"])
    with pytest.raises(CertSignatureError):
        real_cek.verify(milan_root.ask)
    fake_cek = milan_root.certify_chip(FusedChip.fuse("milan"))
    with pytest.raises(CertSignatureError):
        fake_cek.verify(AmdCert.decode(read["ask"]))


# ---- persistence ----------------------------------------------------------------------------
def test_save_load_round_trip(naples_root: AmdRoot, tmp_path: Path) -> None:
    path = naples_root.save(tmp_path / "root")
    for name in ("ark.key.pem", "ask.key.pem"):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600
    assert (path / "ark.cert").read_bytes() == naples_root.ark.encode()
    loaded = AmdRoot.load(path)
    assert (loaded.generation, loaded.ark, loaded.ask) == ("naples", naples_root.ark, naples_root.ask)
    assert loaded.pin() == naples_root.pin()
    chip = FusedChip.fuse("naples")
    assert loaded.certify_chip(chip).verify(naples_root.ask) == 1


def test_load_errors(naples_root: AmdRoot, tmp_path: Path) -> None:
    path = naples_root.save(tmp_path / "root")
    manifest = (path / "root.json").read_text()

    (path / "root.json").write_text("{not json")
    with pytest.raises(FileFormatError):
        AmdRoot.load(path)
    (path / "root.json").write_text(json.dumps({"format": 1, "generation": "bergamo"}))
    with pytest.raises(FileFormatError):
        AmdRoot.load(path)
    (path / "root.json").write_text(manifest)

    ark_pem, ask_pem = (path / "ark.key.pem").read_bytes(), (path / "ask.key.pem").read_bytes()
    (path / "ark.key.pem").write_bytes(ask_pem)
    with pytest.raises(FileFormatError, match="does not certify"):
        AmdRoot.load(path)
    (path / "ark.key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(FileFormatError):
        AmdRoot.load(path)
    (path / "ark.key.pem").write_bytes(ark_pem)

    ask = bytearray((path / "ask.cert").read_bytes())
    ask[-1] ^= 1
    (path / "ask.cert").write_bytes(bytes(ask))
    with pytest.raises(CertSignatureError):
        AmdRoot.load(path)
    (path / "ask.cert").write_bytes(b"short")
    with pytest.raises(FileFormatError):
        AmdRoot.load(path)
