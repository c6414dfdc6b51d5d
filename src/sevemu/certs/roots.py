"""Pins of AMD's real ARKs (AMD format: SEV API 55766 appendix, AMD root/signing key), one per EPYC generation.

Facts only: each pin is the ARK's ``key_id`` (sev-tool ``src/amdcert.h``) and the
SHA-256 of the ARK certificate as AMD distributes it (:meth:`AmdCert.fingerprint`), computed once
from the certificates published in virtee/sev ``src/certs/sev/builtin/<product>/ark.cert`` (the
ARK half of AMD's ``ask_ark_<product>.cert``, whose hashes match third-party pins; see the
vectors' PROVENANCE.md).  AMD's certificate files themselves are not shipped.

Naples has two accepted encodings of the same key: the certificate with its signature, and the
576-byte signature-less form that AMD's ``ask_ark_naples.cert`` actually contains
(AMDESE/AMDSEV issue 17).  Either is trusted by pin; a present signature must still verify.

Emulated roots (:mod:`sevemu.amd.roots`) make their own :class:`PinnedArk` with ``emulated=True``;
they never match these pins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from sevemu.certs.amd import AmdCert

__all__ = ["AMD_ARKS", "AMD_ARK_PINS", "GENERATIONS", "PinnedArk"]

GENERATIONS: Final = ("naples", "rome", "milan", "genoa", "turin")
"""EPYC generations with a legacy-SEV ARK, oldest first (names as in ``hw.profiles``)."""


@dataclass(frozen=True, slots=True)
class PinnedArk:
    """A trusted ARK: its generation, key id, accepted fingerprints and RSA size."""

    generation: str
    key_id: bytes
    fingerprints: frozenset[bytes]
    """SHA-256 digests of the accepted encodings (:meth:`AmdCert.fingerprint`)."""
    modulus_size: int
    emulated: bool = False

    @classmethod
    def from_cert(cls, generation: str, ark: AmdCert, *, emulated: bool) -> PinnedArk:
        """Pin exactly this ARK certificate."""
        return cls(generation, ark.key_id, frozenset({ark.fingerprint()}), ark.modulus_size, emulated)

    def accepts(self, ark: AmdCert) -> bool:
        """``ark`` is byte-for-byte one of the pinned encodings and carries the pinned key id."""
        return ark.fingerprint() in self.fingerprints and ark.key_id == self.key_id


def _pin(generation: str, key_id: str, bits: int, *fingerprints: str) -> PinnedArk:
    return PinnedArk(
        generation=generation,
        key_id=bytes.fromhex(key_id),
        fingerprints=frozenset(bytes.fromhex(f) for f in fingerprints),
        modulus_size=bits,
    )


AMD_ARK_PINS: Final[Mapping[str, PinnedArk]] = MappingProxyType(
    {
        "naples": _pin(
            "naples",
            "1bb987c359494606b174945601c9ea5b",
            2048,
            "dedabca561e1dece8cc00b7bda864cf5f20b95017864408cfe18eaee0dce24b9",  # signed, 832 bytes
            "8efddcaaf84990cf6354d93637be270220cf15797332b3d918c3b8cc77349f31",  # as AMD ships it, 576
        ),
        "rome": _pin(
            "rome",
            "e6002122fb58419399d15fee7b131351",
            4096,
            "865977b268c16d5b27772b00aaefb4e737ba9499e818ed8e9f65b0cecefbc529",
        ),
        "milan": _pin(
            "milan",
            "94c38e4177d0479292a7ae671d083fb6",
            4096,
            "1246469862b78a7a8625579b0378d1f8e975eb8b82a1623b579d7968a5969888",
        ),
        "genoa": _pin(
            "genoa",
            "9f9d4a8fe761456599f6946c4c010f3a",
            4096,
            "8f4e3fd36589c23f1fe0c8338465bac7e2e066d97fc92f228bbee4fd356fb674",
        ),
        "turin": _pin(
            "turin",
            "d05c3a8bde484904b49552422ceb3942",
            4096,
            "f6405e5096a6eee1eb7d5df75c49f9b9f7c8357a31c7fff150149d68588a7bf7",
        ),
    }
)
"""AMD's real ARKs by generation."""

AMD_ARKS: Final = tuple(AMD_ARK_PINS.values())
"""All real ARK pins, for :meth:`sevemu.certs.chain.PlatformChain.verify`."""
