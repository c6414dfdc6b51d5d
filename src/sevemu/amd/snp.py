"""The emulated AMD for SEV-SNP: per generation an ARK, ASK and ASVK as X.509 certificates, the VCEKs
and VLEKs it issues, and its CRL (AMD VCEK spec 57230; certificate profile in
:mod:`sevemu.certs.snp`).

Like AMD, one RSA-4096 key pair serves as the ARK (and the ASK) of a generation in both formats: the
legacy AMD-format root (:class:`~sevemu.amd.roots.AmdRoot`) and the SNP X.509 root share their keys
(real Milan, Genoa and Turin ARKs/ASKs carry the same RSA public key in both formats).  The ASVK --
the key that signs VLEKs -- is SNP-only.

A VCEK certificate certifies :func:`sevemu.crypto.vcek.derive_vcek` of a chip's fused secret for
one TCB (the same derivation the chip's firmware runs), indexed by the chip's hwid; a VLEK
certificate certifies :func:`sevemu.crypto.vcek.derive_vlek` of a CSP's secret.  Certificates are
issued once per (chip, TCB) and kept, so asking twice returns the same bytes, as AMD's KDS does.

:func:`wrap_vlek` is what AMD gives a CSP for one of its chips so that the chip can sign with the
CSP's VLEK: the CSP's VLEK hashsticks at a TCB, wrapped for that chip (the 0x1B0-byte format of
AMD-ASPFW ``vlek_wrapped_t``; the wrapping key and hashstick contents are the model's choices,
:mod:`sevemu.crypto.vcek`).  The chip's firmware unwraps it in SNP_VLEK_LOAD; no other chip can.

Emulated, never AMD's: the keys are fresh; every root's SubjectKeyIdentifier starts with ASCII
``EMULATED`` (the SKI is free-form; AMD's are SHA-1 key hashes) and verifiers trust the ARK only by
the fingerprint the user names (:meth:`AmdSnpRoot.ark_fingerprint`), never by AMD's pins.

Persistence (:meth:`AmdSnpRoot.save` / :meth:`AmdSnpRoot.load`): a directory with ``ark.pem``,
``ask.pem``, ``asvk.pem``, ``asvk.key.pem`` (mode 0600) and ``revoked.json``; the ARK and ASK
private keys stay with the legacy root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.amd.chip import FusedChip
from sevemu.amd.roots import AmdRoot
from sevemu.certs.snp import (
    KDS_URL,
    PSS,
    add_years,
    amd_name,
    build_certificate,
    load_certificate,
    signing_key_extensions,
    verify_signed_by,
)
from sevemu.crypto import rsa
from sevemu.crypto.vcek import (
    HWID_SIZE,
    PRODUCTS,
    SNP_GENERATIONS,
    derive_vcek,
    derive_vlek,
    hwid,
    snp_chip_id,
    tcb_components,
    vlek_hashsticks,
    wrap_vlek_hashstick,
)
from sevemu.errors import FileFormatError, InputError

__all__ = [
    "EMULATED_SKI_PREFIX",
    "VCEK_VALIDITY",
    "VLEK_VALIDITY",
    "AmdSnpRoot",
    "CspAccount",
    "KeyKind",
    "wrap_vlek",
]

KeyKind = Literal["vcek", "vlek"]
EMULATED_SKI_PREFIX: Final = b"EMULATED"
VCEK_VALIDITY: Final = 7
"""Years, as on real VCEKs (2023-04-03 19:23:43 -> 2030-04-03 19:23:43)."""
VLEK_VALIDITY: Final = 1
ROOT_VALIDITY: Final = 25
CRL_VALIDITY: Final = dt.timedelta(days=7)
_SERIALS: Final = {"milan": (0x10000, 0x10001, 0x10101), "genoa": (0x20000, 0x20002, 0x20101),
                   "turin": (0x30000, 0x30001, 0x30101)}
"""ARK, ASK and ASVK serial numbers, as on AMD's certificates."""


def _check_generation(generation: str) -> str:
    gen = generation.strip().lower() if isinstance(generation, str) else ""
    if gen not in SNP_GENERATIONS:
        raise InputError(f"{generation!r} has no SEV-SNP; expected one of {', '.join(SNP_GENERATIONS)}")
    return gen


def _ski(public_key: crypto_rsa.RSAPublicKey) -> bytes:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return EMULATED_SKI_PREFIX + hashlib.sha256(der).digest()[:12]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class CspAccount:
    """A cloud provider AMD issues VLEKs to: its id (``.5`` extension) and the secret AMD keeps."""

    csp_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.csp_id or not self.csp_id.isascii() or not self.csp_id.isprintable():
            raise InputError(f"CSP id {self.csp_id!r} must be non-empty printable ASCII")
        if len(self.secret) < 32:
            raise InputError("a CSP secret must be at least 32 bytes")

    @classmethod
    def create(cls, csp_id: str) -> CspAccount:
        return cls(csp_id, os.urandom(48))


@dataclass
class AmdSnpRoot:
    """AMD's SNP certificate authority of one generation (module docstring)."""

    generation: str
    ark: x509.Certificate
    ask: x509.Certificate
    asvk: x509.Certificate
    ark_key: crypto_rsa.RSAPrivateKey = field(repr=False)
    ask_key: crypto_rsa.RSAPrivateKey = field(repr=False)
    asvk_key: crypto_rsa.RSAPrivateKey = field(repr=False)
    revoked: set[int] = field(default_factory=set)
    """Serials of revoked ASK/ASVK certificates (what the CRL lists)."""
    _issued: dict[tuple[str, bytes, int], x509.Certificate] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.generation = _check_generation(self.generation)
        for name, cert, key in (("ARK", self.ark, self.ark_key), ("ASK", self.ask, self.ask_key),
                                ("ASVK", self.asvk, self.asvk_key)):
            if cert.public_key() != key.public_key():
                raise InputError(f"{name} certificate does not certify the {name} private key")
        verify_signed_by(self.ark, self.ark, "ARK <- ARK")
        verify_signed_by(self.ask, self.ark, "ASK <- ARK")
        verify_signed_by(self.asvk, self.ark, "ASVK <- ARK")

    @property
    def product(self) -> str:
        return PRODUCTS[self.generation]

    # ---- making a root ------------------------------------------------------------------
    @classmethod
    def create(cls, generation: str, *, legacy: AmdRoot | None = None, key_bits: int = 4096,
               not_before: dt.datetime | None = None) -> AmdSnpRoot:
        """A root for ``generation``: the ARK/ASK keys of ``legacy`` (else fresh), a fresh ASVK."""
        gen = _check_generation(generation)
        if legacy is not None:
            if legacy.generation != gen:
                raise InputError(f"a {legacy.generation} legacy root cannot be the {gen} SNP root")
            ark_key, ask_key = legacy.ark_key, legacy.ask_key
        else:
            ark_key, ask_key = rsa.generate_private_key(key_bits), rsa.generate_private_key(key_bits)
        asvk_key = rsa.generate_private_key(ark_key.key_size)
        start = not_before or _now()
        end = add_years(start, ROOT_VALIDITY)
        product = PRODUCTS[gen]
        ark_serial, ask_serial, asvk_serial = _SERIALS[gen]
        ark_name = amd_name(f"ARK-{product}")
        ark_ski = _ski(ark_key.public_key())
        ark = build_certificate(
            subject=ark_name, issuer=ark_name, public_key=ark_key.public_key(), signing_key=ark_key,
            serial=ark_serial, not_before=start, not_after=end, extensions=[
                x509.Extension(x509.KeyUsage.oid, True, x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False)),
                x509.Extension(x509.SubjectKeyIdentifier.oid, False, x509.SubjectKeyIdentifier(ark_ski)),
                x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=True, path_length=None)),
                _crl_dp("vcek", product),
            ])

        def intermediate(cn: str, key: crypto_rsa.RSAPrivateKey, serial: int, kind: KeyKind) -> x509.Certificate:
            return build_certificate(
                subject=amd_name(cn), issuer=ark_name, public_key=key.public_key(), signing_key=ark_key,
                serial=serial, not_before=start, not_after=end, extensions=[
                    x509.Extension(x509.SubjectKeyIdentifier.oid, False,
                                   x509.SubjectKeyIdentifier(_ski(key.public_key()))),
                    x509.Extension(x509.AuthorityKeyIdentifier.oid, False, x509.AuthorityKeyIdentifier(
                        key_identifier=ark_ski, authority_cert_issuer=None, authority_cert_serial_number=None)),
                    x509.Extension(x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=True, path_length=0)),
                    x509.Extension(x509.KeyUsage.oid, True, x509.KeyUsage(
                        digital_signature=False, content_commitment=False, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                        encipher_only=False, decipher_only=False)),
                    _crl_dp(kind, product),
                ])

        ask = intermediate(f"SEV-{product}", ask_key, ask_serial, "vcek")
        asvk = intermediate(f"SEV-VLEK-{product}", asvk_key, asvk_serial, "vlek")
        return cls(gen, ark, ask, asvk, ark_key, ask_key, asvk_key)

    # ---- what relying parties get --------------------------------------------------------
    def ark_fingerprint(self) -> bytes:
        """SHA-256 of the ARK's DER: the pin a relying party names to trust this emulated root."""
        return hashlib.sha256(self.ark.public_bytes(serialization.Encoding.DER)).digest()

    def intermediate(self, kind: KeyKind = "vcek") -> x509.Certificate:
        """The ASK (``vcek``) or the ASVK (``vlek``)."""
        return self.ask if kind == "vcek" else self.asvk

    def cert_chain_pem(self, kind: KeyKind = "vcek") -> bytes:
        """ASK (or ASVK) then ARK, concatenated PEM: the KDS ``cert_chain`` answer."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.intermediate(kind), self.ark))

    def crl(self, kind: KeyKind = "vcek", *, now: dt.datetime | None = None) -> x509.CertificateRevocationList:
        """The CRL the ARK signs (RSA-PSS): the revoked ASK/ASVK serials."""
        start = now or _now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.ark.subject)
                   .last_update(start).next_update(start + CRL_VALIDITY))
        for serial in sorted(self.revoked):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start).build())
        return builder.sign(self.ark_key, hashes.SHA384(), rsa_padding=PSS)

    def revoke(self, kind: KeyKind = "vcek") -> int:
        """Revoke the ASK (or ASVK): its serial joins the CRL; returns it."""
        serial = self.intermediate(kind).serial_number
        self.revoked.add(serial)
        return serial

    # ---- issuing --------------------------------------------------------------------------
    def certify(self, kind: KeyKind, public_key: ec.EllipticCurvePublicKey, tcb: int, *,
                hw_id: bytes | None = None, csp_id: str | None = None,
                not_before: dt.datetime | None = None) -> x509.Certificate:
        """A VCEK (``hw_id``) or VLEK (``csp_id``) certificate for ``public_key`` at ``tcb``."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP384R1):
            raise InputError("VCEK and VLEK keys are P-384")
        tcb_components(self.generation, tcb)
        if kind == "vcek":
            if hw_id is None or len(hw_id) != HWID_SIZE[self.generation]:
                raise InputError(f"a {self.product} hwid is {HWID_SIZE[self.generation]} bytes")
            exts = signing_key_extensions(self.generation, tcb, hwid=hw_id)
            issuer, key, cn, validity = self.ask, self.ask_key, "SEV-VCEK", VCEK_VALIDITY
        else:
            exts = signing_key_extensions(self.generation, tcb, csp_id=csp_id)
            issuer, key, cn, validity = self.asvk, self.asvk_key, "SEV-VLEK", VLEK_VALIDITY
        start = not_before or _now()
        return build_certificate(subject=amd_name(cn), issuer=issuer.subject, public_key=public_key,
                                 signing_key=key, serial=0, not_before=start, not_after=add_years(start, validity),
                                 extensions=exts)

    def issue_vcek(self, chip: FusedChip, tcb: int) -> x509.Certificate:
        """The VCEK certificate of ``chip`` at ``tcb`` (issued once, then the same bytes)."""
        if chip.generation != self.generation:
            raise InputError(f"a {chip.generation} chip gets no VCEK from the {self.generation} root")
        chip_hwid = hwid(self.generation, snp_chip_id(chip.secret, self.generation))
        with self._lock:
            cached = self._issued.get(("vcek", chip_hwid, tcb))
            if cached is None:
                cached = self.certify("vcek", derive_vcek(chip.secret, self.generation, tcb).public_key(), tcb,
                                      hw_id=chip_hwid)
                self._issued[("vcek", chip_hwid, tcb)] = cached
        return cached

    def issue_vlek(self, csp: CspAccount, tcb: int) -> x509.Certificate:
        """The VLEK certificate of ``csp`` at ``tcb`` (issued once, then the same bytes)."""
        ident = csp.csp_id.encode() + b"\x00" + hashlib.sha256(csp.secret).digest()
        with self._lock:
            cached = self._issued.get(("vlek", ident, tcb))
            if cached is None:
                cached = self.certify("vlek", derive_vlek(csp.secret, self.generation, tcb).public_key(), tcb,
                                      csp_id=csp.csp_id)
                self._issued[("vlek", ident, tcb)] = cached
        return cached

    # ---- persistence ----------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in ("ark", "ask", "asvk"):
            cert: x509.Certificate = getattr(self, name)
            (path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = self.asvk_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
        fd = os.open(path / "asvk.key.pem", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        (path / "revoked.json").write_text(json.dumps(sorted(self.revoked)) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], legacy: AmdRoot) -> AmdSnpRoot:
        """Read a root written by :meth:`save`, with the ARK/ASK keys of ``legacy``."""
        path = Path(directory)
        try:
            certs = {n: load_certificate((path / f"{n}.pem").read_bytes(), what=f"{path / n}.pem")
                     for n in ("ark", "ask", "asvk")}
            key = serialization.load_pem_private_key((path / "asvk.key.pem").read_bytes(), password=None)
            revoked = json.loads((path / "revoked.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{path}: not an SNP root: {exc}") from None
        if not isinstance(key, crypto_rsa.RSAPrivateKey):
            raise FileFormatError(f"{path / 'asvk.key.pem'}: not an RSA private key")
        if not isinstance(revoked, list) or not all(isinstance(s, int) for s in revoked):
            raise FileFormatError(f"{path / 'revoked.json'}: not a list of serials")
        try:
            return cls(legacy.generation, certs["ark"], certs["ask"], certs["asvk"], legacy.ark_key,
                       legacy.ask_key, key, set(revoked))
        except InputError as exc:
            raise FileFormatError(f"{path}: {exc}") from None

    @classmethod
    def for_root(cls, legacy: AmdRoot, directory: str | os.PathLike[str] | None) -> AmdSnpRoot:
        """The SNP root of ``legacy``'s generation kept in ``directory``: loaded, or made and saved.

        ``None``: made in the process only.  A directory that does not hold a root for these keys is
        replaced.
        """
        if directory is not None and (Path(directory) / "ark.pem").is_file():
            try:
                return cls.load(directory, legacy)
            except (FileFormatError, InputError):
                pass
        root = cls.create(legacy.generation, legacy=legacy)
        if directory is not None:
            try:
                root.save(directory)
            except OSError:
                pass
        return root


def wrap_vlek(csp: CspAccount, chip: FusedChip, tcb: int) -> bytes:
    """The wrapped VLEK hashstick (0x1B0 bytes) of ``csp`` at ``tcb`` for ``chip`` (module docstring).

    Raises :class:`~sevemu.errors.InputError` for a chip without SEV-SNP and
    :class:`~sevemu.errors.LayoutError` for a TCB that sets a reserved byte of the chip's layout.
    """
    if chip.generation not in SNP_GENERATIONS:
        raise InputError(f"{chip.generation} chips have no SEV-SNP (no VLEK)")
    sticks = vlek_hashsticks(csp.secret, chip.generation, tcb)
    return wrap_vlek_hashstick(chip.secret, chip.generation, tcb, sticks)


def _crl_dp(kind: KeyKind, product: str) -> x509.Extension[x509.ExtensionType]:
    url = f"{KDS_URL}/{kind}/v1/{product}/crl"
    dp = x509.CRLDistributionPoints([x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None, crl_issuer=None)])
    return x509.Extension(dp.oid, False, dp)
