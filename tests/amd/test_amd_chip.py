"""Chip fusing and the deterministic CEK derivation shared with the firmware."""

from __future__ import annotations

import pytest

from sevemu.amd.chip import CHIP_SECRET_SIZE, FusedChip, derive_cek, fuse_chip_secret
from sevemu.crypto import ecc
from sevemu.errors import InputError, KeySizeError

# Regression pin of the documented construction (crypto.ecc module docstring): the firmware
# derives the same CEK, so a change here changes every emulated chip's identity.
KAT_SECRET = bytes(range(64))
KAT_D = 0x96D7FEF81821D7E05BD76381361B467360033AE284851228279334C0AA6E361CF683D39EAE6A516165D574D111E9E4A7


def test_fused_secret_is_random() -> None:
    a, b = fuse_chip_secret(), fuse_chip_secret()
    assert len(a) == len(b) == CHIP_SECRET_SIZE == 64
    assert a != b


def test_derive_cek_deterministic_and_shared_with_crypto() -> None:
    secret = fuse_chip_secret()
    key = derive_cek(secret)
    assert key.curve.name == "secp384r1"
    assert key.private_numbers() == derive_cek(secret).private_numbers()
    assert key.private_numbers() == ecc.derive_cek(secret).private_numbers()
    assert key.private_numbers() != derive_cek(fuse_chip_secret()).private_numbers()


def test_derive_cek_known_answer() -> None:
    assert derive_cek(KAT_SECRET).private_numbers().private_value == KAT_D


def test_fused_chip() -> None:
    chip = FusedChip.fuse("genoa")
    assert chip.secret.hex() not in repr(chip)
    assert chip.cek_public().public_numbers() == derive_cek(chip.secret).public_key().public_numbers()
    with pytest.raises(KeySizeError):
        FusedChip("genoa", bytes(31))
    with pytest.raises(InputError):
        FusedChip("bergamo", bytes(64))
