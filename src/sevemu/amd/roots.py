"""The emulated manufacturer's root keys: an ARK and an ASK per generation, in AMD's format.

An :class:`AmdRoot` plays AMD for one EPYC generation: it holds an emulated ARK (self-signed) and
ASK (signed by the ARK) as AMD-format certificates (SEV API 55766 appendix, AMD root/signing key format) with their RSA private keys,
and certifies chip endorsement keys (:meth:`AmdRoot.certify_cek`) as AMD's ASK does (SEV API 55766 appendix, certificate format; sev-tool ``src/sevcert.cpp``:
CEK usage 0x1004, P-384 key, algorithm ECDSA_SHA256, API 0.14 as on the real Naples and Rome
CEKs in the vectors; slot 1 = ASK with RSA_SHA256 or RSA_SHA384 by the ASK's size).

Key sizes follow the real roots of the generation (:data:`sevemu.certs.roots.AMD_ARK_PINS`):
RSA-2048 with SHA-256 for Naples (832-byte certificates), RSA-4096 with SHA-384 for Rome and later
(1600 bytes).  ``key_bits`` overrides it.

Marked as emulated: every ``key_id`` is :data:`~sevemu.certs.amd.EMULATED_KEY_ID_PREFIX` (ASCII
``EMULATED``) followed by 8 random bytes -- the only free-form field of the format; the
``reserved`` bytes must stay zero for verifiers.  An emulated chain verifies only against
:meth:`AmdRoot.pin`, never against AMD's real pins (different keys, different fingerprints).

On disk (:meth:`AmdRoot.save` / :meth:`AmdRoot.load`) a root is a directory holding
``root.json`` (generation and a format number), ``ark.cert`` and ``ask.cert`` (AMD format) and
``ark.key.pem`` and ``ask.key.pem`` (unencrypted PKCS#8 PEM, mode 0600).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.amd.chip import FusedChip
from sevemu.certs.amd import EMULATED_KEY_ID_PREFIX, KEY_ID_SIZE, AmdCert
from sevemu.certs.chain import AmdCertChain
from sevemu.certs.roots import AMD_ARK_PINS, GENERATIONS, PinnedArk
from sevemu.certs.sev import SevCert
from sevemu.crypto import rsa
from sevemu.errors import FileFormatError, InputError

__all__ = ["CEK_API_MAJOR", "CEK_API_MINOR", "AmdRoot", "new_key_id"]

CEK_API_MAJOR: Final = 0
CEK_API_MINOR: Final = 14
"""API version field of CEK certificates (both real CEKs in the vectors carry 0.14)."""

_FORMAT: Final = 1
_MANIFEST: Final = "root.json"
_FILES: Final = {"ark": ("ark.cert", "ark.key.pem"), "ask": ("ask.cert", "ask.key.pem")}


def new_key_id() -> bytes:
    """A fresh emulated key id: ``EMULATED`` followed by 8 random bytes."""
    return EMULATED_KEY_ID_PREFIX + os.urandom(KEY_ID_SIZE - len(EMULATED_KEY_ID_PREFIX))


def _check_generation(generation: str) -> None:
    if generation not in GENERATIONS:
        raise InputError(f"unknown generation {generation!r}; expected one of {', '.join(GENERATIONS)}")


@dataclass(frozen=True, slots=True)
class AmdRoot:
    """The emulated AMD ARK and ASK of one generation, with their private keys."""

    generation: str
    ark: AmdCert
    ask: AmdCert
    ark_key: crypto_rsa.RSAPrivateKey = field(repr=False)
    ask_key: crypto_rsa.RSAPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        _check_generation(self.generation)
        for name, cert, key in (("ARK", self.ark, self.ark_key), ("ASK", self.ask, self.ask_key)):
            if cert.public_key().public_numbers() != key.public_key().public_numbers():
                raise InputError(f"{name} certificate does not certify the {name} private key")
        if self.ark.key_usage != KeyUsage.ARK or self.ask.key_usage != KeyUsage.ASK:
            raise InputError("AmdRoot: certificates must be an ARK and an ASK")
        if not (self.ark.is_emulated and self.ask.is_emulated):
            raise InputError("AmdRoot: emulated key ids must start with the EMULATED prefix")
        self.ark.verify(self.ark)
        self.ask.verify(self.ark)

    @classmethod
    def create(cls, generation: str, *, key_bits: int | None = None) -> AmdRoot:
        """Fresh emulated ARK and ASK; RSA-4096 key generation takes a second or two per key."""
        _check_generation(generation)
        bits = AMD_ARK_PINS[generation].modulus_size if key_bits is None else key_bits
        ark_key = rsa.generate_private_key(bits)
        ask_key = rsa.generate_private_key(bits)
        ark_id, ask_id = new_key_id(), new_key_id()
        ark = AmdCert.create(
            key_id=ark_id, certifying_id=ark_id, key_usage=KeyUsage.ARK, public_key=ark_key.public_key()
        ).signed_by(ark_key)
        ask = AmdCert.create(
            key_id=ask_id, certifying_id=ark_id, key_usage=KeyUsage.ASK, public_key=ask_key.public_key()
        ).signed_by(ark_key)
        return cls(generation, ark, ask, ark_key, ask_key)

    # ---- what relying parties get ----------------------------------------------------------
    def pin(self) -> PinnedArk:
        """The pin a relying party uses to trust this emulated root (``emulated=True``)."""
        return PinnedArk.from_cert(self.generation, self.ark, emulated=True)

    @property
    def amd_certs(self) -> AmdCertChain:
        """ASK || ARK, as in SEND_START's ``amd_certs`` and AMD's ``ask_ark_<product>.cert``."""
        return AmdCertChain(self.ask, self.ark)

    def certify_cek(self, cek_public: ec.EllipticCurvePublicKey) -> SevCert:
        """The CEK certificate for ``cek_public`` (a P-384 key), signed in slot 1 by the ASK."""
        if cek_public.curve.name != "secp384r1":
            raise InputError(f"CEKs are P-384 keys, not {cek_public.curve.name}")
        cert = SevCert.new(
            KeyUsage.CEK, SigAlgo.ECDSA_SHA256, cek_public, api_major=CEK_API_MAJOR, api_minor=CEK_API_MINOR
        )
        return cert.sign_with(self.ask_key, KeyUsage.ASK, self.ask.sig_algo, slot=1)

    def certify_chip(self, chip: FusedChip) -> SevCert:
        """The CEK certificate of a chip of this root's generation."""
        if chip.generation != self.generation:
            raise InputError(f"a {chip.generation} chip cannot be certified by the {self.generation} root")
        return self.certify_cek(chip.cek_public())

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the root into ``directory`` (created if needed); returns its path."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for name, cert, key in (("ark", self.ark, self.ark_key), ("ask", self.ask, self.ask_key)):
            cert_file, key_file = _FILES[name]
            (path / cert_file).write_bytes(cert.encode())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path / key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
        manifest = {"format": _FORMAT, "generation": self.generation, "emulated": True}
        (path / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> AmdRoot:
        """Read a root written by :meth:`save`; checks keys against certificates and signatures.

        Raises :class:`~sevemu.errors.FileFormatError` for malformed or mismatched files and
        :class:`~sevemu.certs.errors.CertSignatureError` if the certificates do not verify.
        """
        path = Path(directory)
        try:
            manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path / _MANIFEST}: not JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise FileFormatError(f"{path / _MANIFEST}: not an sevemu root (format {_FORMAT})")
        generation = manifest.get("generation")
        if not isinstance(generation, str) or generation not in GENERATIONS:
            raise FileFormatError(f"{path / _MANIFEST}: unknown generation {generation!r}")
        certs: dict[str, AmdCert] = {}
        keys: dict[str, crypto_rsa.RSAPrivateKey] = {}
        for name, (cert_file, key_file) in _FILES.items():
            try:
                certs[name] = AmdCert.decode((path / cert_file).read_bytes())
                # OpenSSL's RSA consistency check costs ~0.8 s per 4096-bit key; the vault holds only
                # what save() wrote, and __post_init__ matches each key with its certificate
                key = serialization.load_pem_private_key((path / key_file).read_bytes(), password=None,
                                                         unsafe_skip_rsa_key_validation=True)
            except (InputError, ValueError, TypeError) as exc:
                raise FileFormatError(f"{path}: {name} files: {exc}") from exc
            if not isinstance(key, crypto_rsa.RSAPrivateKey):
                raise FileFormatError(f"{path / key_file}: not an RSA private key")
            keys[name] = key
        try:
            return cls(generation, certs["ark"], certs["ask"], keys["ark"], keys["ask"])
        except InputError as exc:
            raise FileFormatError(f"{path}: {exc}") from exc
