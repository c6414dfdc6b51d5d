"""Chip fusing: the chip-unique secret and the chip endorsement key (CEK) derived from it.

At manufacture every chip gets a random secret fused into it.  The firmware derives its CEK from
that secret; AMD, which knows the secret too, derives the same CEK public key and certifies it with
the ASK (:meth:`sevemu.amd.roots.AmdRoot.certify_cek`).  Both sides call the one derivation,
:func:`sevemu.crypto.ecc.derive_cek` (HKDF-SHA-384 then FIPS 186-5 A.2.1 reduction; the
construction is a model choice documented there, AMD's is unpublished).

The secret reaches the firmware through the scenario ("the factory"), never through an import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.certs.roots import GENERATIONS
from sevemu.crypto import ecc
from sevemu.errors import InputError, KeySizeError

__all__ = ["CHIP_SECRET_SIZE", "FusedChip", "derive_cek", "fuse_chip_secret"]

CHIP_SECRET_SIZE: Final = 64
"""Bytes of a freshly fused chip secret (derivations accept any secret of 32 bytes or more)."""


def fuse_chip_secret() -> bytes:
    """A fresh random chip secret (64 bytes from the OS CSPRNG)."""
    return os.urandom(CHIP_SECRET_SIZE)


def derive_cek(chip_secret: bytes) -> ec.EllipticCurvePrivateKey:
    """The chip's CEK (P-384), deterministic in ``chip_secret`` (see :func:`ecc.derive_cek`)."""
    return ecc.derive_cek(chip_secret)


@dataclass(frozen=True, slots=True)
class FusedChip:
    """One manufactured chip as AMD records it: its generation and fused secret."""

    generation: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.generation not in GENERATIONS:
            raise InputError(f"unknown generation {self.generation!r}")
        if len(self.secret) < ecc.MIN_SECRET_SIZE:
            raise KeySizeError(f"chip secret must be at least {ecc.MIN_SECRET_SIZE} bytes")

    @classmethod
    def fuse(cls, generation: str) -> FusedChip:
        """Manufacture a chip of ``generation`` with a fresh secret."""
        return cls(generation, fuse_chip_secret())

    def cek_private(self) -> ec.EllipticCurvePrivateKey:
        return derive_cek(self.secret)

    def cek_public(self) -> ec.EllipticCurvePublicKey:
        return self.cek_private().public_key()
