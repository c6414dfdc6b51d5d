"""The platform identity: the firmware's keys and certificates (SEV API 55766 ch. 5, "Platform
Management", and its appendices on the SEV and AMD certificate formats; behaviour cross-checked with
AMD's firmware source, AMD-ASPFW ``sev_plat.c`` / ``sev_mcmd.c``, "AF" below).

::

    ARK -> ASK -> CEK --+
                        +--> PEK --> PDH
          OCA (self) ---+

* **CEK** (chip endorsement key, P-384): derived from the fused chip secret with
  :func:`sevemu.crypto.ecc.derive_cek`, never stored.  Its certificate was signed by the emulated ASK
  at manufacturing and is read from the factory data; the firmware checks at boot that it certifies
  this chip's CEK and chains to the ASK and ARK it was provisioned with.
* **OCA** (owner certificate authority): self-owned -- a P-384 key the firmware generates, with a
  self-signed certificate -- or externally owned: only the owner's certificate, imported by
  PEK_CERT_IMPORT (:attr:`PlatformIdentity.oca_key` is then ``None``).
* **PEK** (platform endorsement key, P-384 ECDSA): signed by the OCA and by the CEK (AF: OCA in slot
  1, CEK in slot 2 when self-owned; after an import the owner's OCA signature stays where the owner
  put it and the CEK signature goes in the other slot).
* **PDH** (platform Diffie-Hellman key, P-384 ECDH): signed by the PEK.

Algorithms and API fields follow the real chains (sev-tool ``src/sevcert.cpp``; virtee ``sev``
``src/certs/sev``): ECDSA_SHA256 signatures, PDH
algorithm ECDH_SHA256; OCA, PEK and PDH certificates carry the firmware's API version
(:attr:`PlatformIdentity.api_major` / ``api_minor``, from the CPU profile), the CEK the 0.14 AMD wrote.

Model choices:

* New keys come from the PSP's TRNG: 64 TRNG bytes through the FIPS 186-5 A.2.1 derivation of
  :func:`sevemu.crypto.ecc.derive_private_key` (labels ``sevemu oca|pek|pdh``), so a seeded run
  reproduces its keys.
* The chip ID (GET_ID) is :func:`sevemu.crypto.ecc.derive_chip_id` of the chip secret: AMD's
  construction (public point of the chip-unique key on secp256k1) with a derived chip-unique key.
* The identity is loaded when the firmware boots; on first boot (or after PLATFORM_RESET emptied the
  records) a fresh self-owned OCA, PEK and PDH are made and committed.  AF does the same lazily at the
  next INIT; nothing observable differs, since every command that needs them needs INIT first.
* Every NV record is sealed (:func:`sevemu.firmware.nvstore.seal_record`) with
  :meth:`PlatformIdentity.spi_seal_key`, and INIT_EX's copy of NV in host memory
  (:func:`sevemu.firmware.nvstore.seal_host_nv`) with :meth:`PlatformIdentity.nv_seal_key`: both
  HKDF-SHA-256 of the CEK's private scalar with their own labels, chip-unique and never outside the
  firmware, so another chip's records, or altered ones, do not unseal.
* Trusted ARKs (:attr:`PlatformIdentity.trusted_arks`): the ARKs whose SHA-256 the factory fused
  (:mod:`sevemu.firmware.nvstore`, "Fuses"), the manufacturer's first -- what SEND_START checks a
  target platform's chain against.  The ARK certificates come from ``factory/``; a file whose digest
  is not fused, or a fused digest without its file, stops the boot: editing the platform directory
  cannot change what the firmware trusts.

NV records (:meth:`PlatformIdentity.nv_records`, sealed and written in one transaction by
:mod:`sevemu.firmware.nvstore`): ``owner`` (one byte, 0 self-owned / 1 external), ``oca.key`` (PKCS#8
DER; absent when externally owned), ``oca.cert``, ``pek.key``, ``pek.cert``, ``pdh.key``, ``pdh.cert``
(certificates in their 0x824-byte form).  The identity is immutable: every change makes a new one,
which the command commits to NV before it replaces the old, so a refused or interrupted command
leaves both memory and NV as they were.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain, PlatformChain, SevCertChain
from sevemu.certs.roots import PinnedArk
from sevemu.certs.sev import EMPTY_SLOT, SevCert
from sevemu.crypto import ecc
from sevemu.errors import InputError, SevemuError
from sevemu.firmware.nvstore import (
    NV_FILENAME,
    FactoryData,
    FactoryDataError,
    NvStore,
    NvStoreError,
    SealedNv,
    check_writable,
    read_factory,
)

__all__ = [
    "IDENTITY_RECORDS",
    "PDH_ALGO",
    "SIG_ALGO",
    "Boot",
    "PlatformIdentity",
    "boot_identity",
]

Rng = Callable[[int], bytes]

SIG_ALGO: Final = SigAlgo.ECDSA_SHA256
"""Algorithm of the OCA, PEK and CEK keys and of every signature the firmware makes."""
PDH_ALGO: Final = SigAlgo.ECDH_SHA256

IDENTITY_RECORDS: Final = ("owner", "oca.key", "oca.cert", "pek.key", "pek.cert", "pdh.key", "pdh.cert")
"""Names of the NV records that hold the identity (see the module docstring)."""

_KEY_SEED_BYTES: Final = 64


def _seal_key(cek_key: ec.EllipticCurvePrivateKey, info: bytes) -> bytes:
    scalar = cek_key.private_numbers().private_value.to_bytes(48, "big")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"sevemu nv seal v1", info=info).derive(scalar)


def _new_key(rng: Rng, label: bytes) -> ec.EllipticCurvePrivateKey:
    return ecc.derive_private_key(rng(_KEY_SEED_BYTES), label, ecc.P384)


def _key_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_from_der(name: str, data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise NvStoreError(f"NV record {name}: not a private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != ecc.P384.name:
        raise NvStoreError(f"NV record {name}: not a P-384 key")
    return key


def _same_key(private: ec.EllipticCurvePrivateKey, cert: SevCert) -> bool:
    try:
        certified = cert.public_key()
    except InputError:
        return False
    return (isinstance(certified, ec.EllipticCurvePublicKey)
            and certified.public_numbers() == private.public_key().public_numbers())


@dataclass(frozen=True, slots=True, eq=False)
class PlatformIdentity:
    """The firmware's keys and certificates (module docstring).  Immutable; ``with_*`` make new ones."""

    chip_id: bytes
    """GET_ID output for the (single) socket: 64 bytes."""
    cek_key: ec.EllipticCurvePrivateKey = field(repr=False)
    cek_cert: SevCert
    oca_key: ec.EllipticCurvePrivateKey | None = field(repr=False)
    """The OCA private key when self-owned; ``None`` when externally owned."""
    oca_cert: SevCert
    pek_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pek_cert: SevCert
    pdh_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pdh_cert: SevCert
    owner_external: bool
    amd_chain: AmdCertChain
    """ASK || ARK of this platform's manufacturer."""
    trusted_arks: tuple[PinnedArk, ...]
    """ARKs the firmware accepts in another platform's chain (SEND_START); its own first."""
    api_major: int
    api_minor: int
    """API version written into new OCA, PEK and PDH certificates."""
    chip_secret: bytes = field(default=b"", repr=False)
    """The fused chip secret (SNP: VCEK and guest-key derivation, CHIP_ID); empty when unknown."""

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        factory: FactoryData,
        records: Mapping[str, bytes],
        *,
        api_major: int,
        api_minor: int,
        rng: Rng,
    ) -> tuple[PlatformIdentity, bool]:
        """The identity from factory data and NV ``records``; the flag says it was newly made.

        Without any identity record (first boot, after PLATFORM_RESET) a fresh self-owned OCA, PEK
        and PDH are generated: the caller must commit :meth:`nv_records`.  Raises
        :class:`~sevemu.firmware.nvstore.NvStoreError` when the factory data or the records are
        malformed or do not form a valid chain.
        """
        return _Chip.from_factory(factory).identity(records, (api_major, api_minor), rng)

    def with_records(self, records: Mapping[str, bytes], rng: Rng) -> tuple[PlatformIdentity, bool]:
        """The same chip with its owner part taken from other NV ``records`` (INIT_EX's host copy).

        Same rules and errors as :meth:`load`.
        """
        chip = _Chip(self.chip_id, self.cek_key, self.cek_cert, self.amd_chain, self.trusted_arks)
        return chip.identity(records, self._api, rng)

    def check(self) -> None:
        """Every key matches its certificate and the chain verifies up to the manufacturer's ARK.

        Raises :class:`~sevemu.firmware.nvstore.NvStoreError`.
        """
        pairs = [("PEK", self.pek_key, self.pek_cert), ("PDH", self.pdh_key, self.pdh_cert)]
        if self.oca_key is not None:
            pairs.append(("OCA", self.oca_key, self.oca_cert))
        for name, key, cert in pairs:
            if not _same_key(key, cert):
                raise NvStoreError(f"the {name} private key does not match the {name} certificate")
        try:
            self.platform_chain().verify(self.trusted_arks[:1])
        except SevemuError as exc:
            raise NvStoreError(f"the platform chain does not verify: {exc}") from exc

    # ---- changes (each returns a new identity) --------------------------------------------------
    def with_new_owner(self, rng: Rng) -> PlatformIdentity:
        """Self-owned again: new OCA (self-signed), PEK (OCA + CEK) and PDH (PLATFORM_RESET, PEK_GEN)."""
        oca_key, oca_cert, pek_key, pek_cert = _make_owner(self.cek_key, self._api, rng)
        owned = replace(self, oca_key=oca_key, oca_cert=oca_cert, pek_key=pek_key, pek_cert=pek_cert,
                        owner_external=False)
        return owned.with_new_pdh(rng)

    def with_new_pdh(self, rng: Rng) -> PlatformIdentity:
        """A new PDH signed by the current PEK (PDH_GEN; also after every PEK change)."""
        pdh_key, pdh_cert = _make_pdh(self.pek_key, self._api, rng)
        return replace(self, pdh_key=pdh_key, pdh_cert=pdh_cert)

    def with_external_owner(self, pek_cert: SevCert, oca_cert: SevCert, rng: Rng) -> PlatformIdentity:
        """Externally owned by ``oca_cert`` (PEK_CERT_IMPORT), and a new PDH.

        ``pek_cert`` is the PEK_CSR output signed by the owner's OCA (the caller has checked both
        signatures).  Its body must be the current PEK's, and its other slot empty: the firmware's
        CEK signature moves there (AF transfers the existing one -- same body, same signature).
        Raises :class:`~sevemu.errors.InputError` otherwise.
        """
        if pek_cert.signed_bytes() != self.pek_cert.signed_bytes():
            raise InputError("the imported PEK certificate does not certify this platform's PEK")
        cek_slot = next((s for s in self.pek_cert.slots if s.usage == KeyUsage.CEK), None)
        if cek_slot is None:
            raise InputError("the current PEK certificate carries no CEK signature")
        if pek_cert.sig1.is_empty:
            signed = pek_cert.with_slot(1, cek_slot)
        elif pek_cert.sig2.is_empty:
            signed = pek_cert.with_slot(2, cek_slot)
        else:
            raise InputError("the imported PEK certificate has no free slot for the CEK signature")
        owned = replace(self, oca_key=None, oca_cert=oca_cert, pek_cert=signed, owner_external=True)
        return owned.with_new_pdh(rng)

    @property
    def _api(self) -> tuple[int, int]:
        return self.api_major, self.api_minor

    # ---- views ----------------------------------------------------------------------------------
    def pek_csr(self) -> SevCert:
        """PEK_CSR output: the PEK certificate body with both signature slots empty."""
        return self.pek_cert.with_slot(1, EMPTY_SLOT).with_slot(2, EMPTY_SLOT)

    @property
    def cert_chain(self) -> SevCertChain:
        """PDH_CERT_EXPORT ``cert_chain``: PEK || OCA || CEK."""
        return SevCertChain(self.pek_cert, self.oca_cert, self.cek_cert)

    def platform_chain(self) -> PlatformChain:
        """PDH, PEK, OCA, CEK and the manufacturer's ASK and ARK."""
        return PlatformChain(pdh=self.pdh_cert, pek=self.pek_cert, oca=self.oca_cert, cek=self.cek_cert,
                             ask=self.amd_chain.ask, ark=self.amd_chain.ark)

    def nv_seal_key(self) -> bytes:
        """Key sealing INIT_EX's host copy of NV: HKDF-SHA-256 of the CEK scalar (model choice)."""
        return _seal_key(self.cek_key, b"init_ex host nv")

    def spi_seal_key(self) -> bytes:
        """Key sealing every record of the SPI store (``nv.sqlite3``; model choice)."""
        return _seal_key(self.cek_key, b"spi nv records")

    def nv_records(self) -> dict[str, bytes]:
        """The NV records of this identity (module docstring); ``oca.key`` only when self-owned."""
        out = {
            "owner": b"\x01" if self.owner_external else b"\x00",
            "oca.cert": self.oca_cert.encode(),
            "pek.key": _key_der(self.pek_key),
            "pek.cert": self.pek_cert.encode(),
            "pdh.key": _key_der(self.pdh_key),
            "pdh.cert": self.pdh_cert.encode(),
        }
        if self.oca_key is not None:
            out["oca.key"] = _key_der(self.oca_key)
        return out


def _new_cert(usage: KeyUsage, algo: SigAlgo, key: ec.EllipticCurvePrivateKey, api: tuple[int, int]) -> SevCert:
    return SevCert.new(usage, algo, key.public_key(), api_major=api[0], api_minor=api[1])


def _make_owner(
    cek_key: ec.EllipticCurvePrivateKey, api: tuple[int, int], rng: Rng
) -> tuple[ec.EllipticCurvePrivateKey, SevCert, ec.EllipticCurvePrivateKey, SevCert]:
    """A fresh OCA (self-signed in slot 1) and PEK (OCA in slot 1, CEK in slot 2)."""
    oca_key = _new_key(rng, b"sevemu oca")
    oca_cert = _new_cert(KeyUsage.OCA, SIG_ALGO, oca_key, api).sign_with(oca_key, KeyUsage.OCA, SIG_ALGO, slot=1)
    pek_key = _new_key(rng, b"sevemu pek")
    pek_cert = (_new_cert(KeyUsage.PEK, SIG_ALGO, pek_key, api)
                .sign_with(oca_key, KeyUsage.OCA, SIG_ALGO, slot=1)
                .sign_with(cek_key, KeyUsage.CEK, SIG_ALGO, slot=2))
    return oca_key, oca_cert, pek_key, pek_cert


def _make_pdh(
    pek_key: ec.EllipticCurvePrivateKey, api: tuple[int, int], rng: Rng
) -> tuple[ec.EllipticCurvePrivateKey, SevCert]:
    """A fresh PDH signed by the PEK in slot 1."""
    pdh_key = _new_key(rng, b"sevemu pdh")
    pdh_cert = _new_cert(KeyUsage.PDH, PDH_ALGO, pdh_key, api).sign_with(pek_key, KeyUsage.PEK, SIG_ALGO, slot=1)
    return pdh_key, pdh_cert


_T = TypeVar("_T")


def _decode(where: str, decode: Callable[[], _T]) -> _T:
    try:
        return decode()
    except SevemuError as exc:
        raise FactoryDataError(f"{where}: malformed factory data: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Chip:
    """The part of the identity fixed at manufacturing, checked once when it is read."""

    chip_id: bytes
    cek_key: ec.EllipticCurvePrivateKey
    cek_cert: SevCert
    amd_chain: AmdCertChain
    trusted_arks: tuple[PinnedArk, ...]
    chip_secret: bytes = field(default=b"", repr=False)

    @classmethod
    def from_factory(cls, factory: FactoryData) -> _Chip:
        """The chip the factory data describes, checked; errors name the factory file at fault."""
        where = factory.where
        if factory.sockets != 1:
            raise FactoryDataError(f"{where('manifest.json')}: {factory.sockets} sockets; the model has one")
        cek_key = ecc.derive_cek(factory.chip_secret)
        chip_id = ecc.derive_chip_id(factory.chip_secret)
        cek_cert = _decode(where("cek.cert"), partial(SevCert.decode, factory.cek_cert))
        amd_chain = _decode(where("ask_ark.cert"), partial(AmdCertChain.decode, factory.amd_chain))
        others = [(gen, name, _decode(where(name), partial(AmdCert.decode, raw)))
                  for (gen, raw), name in zip(factory.trusted_arks, factory.trusted_ark_files, strict=True)]
        if cek_cert.usage != KeyUsage.CEK or not _same_key(cek_key, cek_cert):
            raise FactoryDataError(f"{where('cek.cert')}: the provisioned CEK certificate does not certify "
                                   f"the CEK of this chip's fuses ({where('fuses.bin')})")
        try:
            cek_cert.verify(amd_chain.ask)
            amd_chain.ask.verify(amd_chain.ark)
        except SevemuError as exc:
            raise FactoryDataError(f"{where('ask_ark.cert')}: the provisioned CEK does not chain to the AMD "
                                   f"certificates: {exc}") from exc
        fused = factory.fused_arks
        ark = amd_chain.ark
        if not fused or ark.fingerprint() != fused[0]:
            raise FactoryDataError(f"{where('ask_ark.cert')}: its ARK is not the root fused into this chip "
                                   f"({where('fuses.bin')}); the factory data was altered")
        pins = [PinnedArk.from_cert(factory.generation, ark, emulated=ark.is_emulated)]
        seen = {ark.fingerprint()}
        for gen, name, other in others:
            digest = other.fingerprint()
            if digest not in fused:
                raise FactoryDataError(f"{where(name)}: this ARK is not fused into the chip; the factory data "
                                       "was altered (the firmware trusts only the ARKs fused at manufacture)")
            if digest not in seen:
                pins.append(PinnedArk.from_cert(gen, other, emulated=other.is_emulated))
                seen.add(digest)
        missing = [d.hex()[:16] for d in fused if d not in seen]
        if missing:
            raise FactoryDataError(f"{where('manifest.json')}: no trusted_ark file for the fused root(s) "
                                   f"{', '.join(missing)}...; the factory data was altered")
        return cls(chip_id, cek_key, cek_cert, amd_chain, tuple(pins), factory.chip_secret)

    def spi_seal_key(self) -> bytes:
        """See :meth:`PlatformIdentity.spi_seal_key`."""
        return _seal_key(self.cek_key, b"spi nv records")

    def identity(
        self, records: Mapping[str, bytes], api: tuple[int, int], rng: Rng
    ) -> tuple[PlatformIdentity, bool]:
        """This chip's identity with the owner part from ``records``; fresh if there is none."""
        if not any(name in records for name in IDENTITY_RECORDS):
            oca_key, oca_cert, pek_key, pek_cert = _make_owner(self.cek_key, api, rng)
            pdh_key, pdh_cert = _make_pdh(pek_key, api, rng)
            return self._build(oca_key, oca_cert, pek_key, pek_cert, pdh_key, pdh_cert, False, api), True
        missing = [n for n in IDENTITY_RECORDS if n not in records and n != "oca.key"]
        if missing:
            raise NvStoreError(f"NV holds a partial identity: {', '.join(missing)} missing")
        owner = records["owner"]
        if owner not in (b"\x00", b"\x01"):
            raise NvStoreError(f"NV record owner: {owner!r} is neither 0 nor 1")
        external = owner == b"\x01"
        if external == ("oca.key" in records):
            raise NvStoreError("NV records: an OCA private key must be kept exactly when self-owned")
        try:
            oca, pek, pdh = (SevCert.decode(records[n]) for n in ("oca.cert", "pek.cert", "pdh.cert"))
        except SevemuError as exc:
            raise NvStoreError(f"NV holds a malformed certificate: {exc}") from exc
        kept_oca_key = None if external else _key_from_der("oca.key", records["oca.key"])
        ident = self._build(kept_oca_key, oca, _key_from_der("pek.key", records["pek.key"]), pek,
                            _key_from_der("pdh.key", records["pdh.key"]), pdh, external, api)
        ident.check()
        return ident, False

    def _build(
        self,
        oca_key: ec.EllipticCurvePrivateKey | None,
        oca_cert: SevCert,
        pek_key: ec.EllipticCurvePrivateKey,
        pek_cert: SevCert,
        pdh_key: ec.EllipticCurvePrivateKey,
        pdh_cert: SevCert,
        external: bool,
        api: tuple[int, int],
    ) -> PlatformIdentity:
        return PlatformIdentity(
            chip_id=self.chip_id, cek_key=self.cek_key, cek_cert=self.cek_cert, oca_key=oca_key,
            oca_cert=oca_cert, pek_key=pek_key, pek_cert=pek_cert, pdh_key=pdh_key, pdh_cert=pdh_cert,
            owner_external=external, amd_chain=self.amd_chain, trusted_arks=self.trusted_arks,
            api_major=api[0], api_minor=api[1], chip_secret=self.chip_secret,
        )


@dataclass(frozen=True, slots=True)
class Boot:
    """What the firmware finds when it boots from a platform directory."""

    nv: SealedNv
    identity: PlatformIdentity
    notices: tuple[str, ...] = ()
    """What the user should hear about (e.g. an emptied NV store reset the ownership)."""


def boot_identity(
    platform_dir: str | os.PathLike[str],
    *,
    generation: str,
    api_major: int,
    api_minor: int,
    rng: Rng,
) -> Boot:
    """Open the NV store of ``platform_dir`` and load (on first boot: make and commit) the identity.

    ``generation`` is the CPU's (the profile name): factory data of another generation is refused.
    An NV store that is missing or empty although the chip booted before (the factory leaves it
    formatted) gives a fresh self-owned identity and a notice.  Raises
    :class:`~sevemu.firmware.nvstore.NvStoreError` (subclasses name the file and the way out).
    """
    path = Path(platform_dir)
    factory = read_factory(path)
    if factory.generation != generation:
        raise NvStoreError(f"{path} was manufactured as a {factory.generation} chip, not {generation}")
    chip = _Chip.from_factory(factory)
    nv_path = path / NV_FILENAME
    check_writable(path)
    lost = not nv_path.exists() or nv_path.stat().st_size == 0
    nv = SealedNv(NvStore.open(path), chip.spi_seal_key(), rng)
    notices: list[str] = []
    api = (api_major, api_minor)
    try:
        records = nv.read()
        used = nv.commits > 0
        identity, fresh = chip.identity(records, api, rng)
        if fresh:
            nv.commit(identity.nv_records(), delete=IDENTITY_RECORDS, unless_any=IDENTITY_RECORDS)
            committed = nv.read()
            if committed != identity.nv_records():  # another process booted this chip first
                identity, _ = chip.identity(committed, api, rng)
            elif lost or used:
                notices.append(f"{nv_path}: the NV store was {'missing' if lost else 'emptied'}; the platform "
                               "made a new self-owned identity (OCA, PEK, PDH): any ownership "
                               "(PEK_CERT_IMPORT) is reset and earlier PDH certificates no longer work")
    except BaseException:
        nv.close()
        raise
    return Boot(nv, identity, tuple(notices))
