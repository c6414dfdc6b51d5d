"""AMD SEV-SNP X.509 certificates: ARK, ASK, ASVK, VCEK and VLEK as the KDS issues them.

Sources: AMD VCEK spec 57230 (certificate profile and the KDS), the real certificates AMD's KDS
serves (as go-sev-guest ``verify/trust``, virtee/sev ``src/certs/snp/builtin`` and the reports' VCEKs
carry them), go-sev-guest ``kds/kds.go`` (extension OIDs and their decoding).

Profile (every field compared with real KDS certificates in ``tests/certs/test_snp_certs.py``):

* Names: ``OU=Engineering, C=US, L=Santa Clara, ST=CA, O=Advanced Micro Devices, CN=<name>`` in that
  order, UTF8String except the PrintableString country.  CNs: ``ARK-<Product>``, ``SEV-<Product>``
  (ASK), ``SEV-VLEK-<Product>`` (ASVK), ``SEV-VCEK``, ``SEV-VLEK``.
* Signatures: RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48 (the AlgorithmIdentifier with NULL
  hash parameters and no trailer field, as current KDS certificates have it).  ARK/ASK/ASVK keys are
  RSA-4096, VCEK/VLEK keys P-384.
* ARK: self-signed; KeyUsage(critical: keyCertSign, cRLSign), SubjectKeyIdentifier,
  BasicConstraints(critical: CA), CRLDistributionPoints(``https://kdsintf.amd.com/vcek/v1/<P>/crl``).
  ASK / ASVK: SKI, AKI, BasicConstraints(critical: CA, pathlen 0), KeyUsage(critical: keyCertSign),
  CRLDistributionPoints (``/vlek/v1/`` for the ASVK).  25-year validity.
* VCEK / VLEK: **serial number 0**, 7-year validity (VLEK: 1 year), no standard extensions; AMD's
  non-critical extensions under 1.3.6.1.4.1.3704.1 in AMD's order -- ``.1`` structVersion INTEGER
  (0; Turin 1), ``.2`` productName IA5String (``Milan-B0``, ``Genoa``, ``Turin``; VLEKs carry
  ``Milan``), the SPLs as INTEGERs (Milan/Genoa: ``.3.1`` bl, ``.3.2`` tee, ``.3.4``-``.3.7``
  spl_4..7, ``.3.3`` snp, ``.3.8`` ucode; Turin: ``.3.9`` fmc, ``.3.1``, ``.3.2``, ``.3.3``,
  ``.3.5``-``.3.7``, ``.3.8``), then ``.4`` hwID (VCEK: the raw hwid bytes, no OCTET STRING tag) or
  ``.5`` the CSP id IA5String (VLEK).

``cryptography``'s certificate builder refuses serial 0, so :func:`build_certificate` builds with a
placeholder serial of the same encoded length, patches the serial into the TBS bytes and signs the
patched TBS (the result is checked by reloading it).  Reading the serial of a serial-0 certificate
makes ``cryptography`` 48 warn (RFC 5280 wants positive serials); every real VCEK has serial 0, so
importing this module filters that one warning message.

Validity periods are calendar years from the issuing instant, as on AMD's certificates (a VCEK
issued 2025-01-24 02:21:48 expires 2032-01-24 02:21:48): :func:`add_years`.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from cryptography.x509.oid import NameOID

from sevemu.certs.errors import CertSignatureError
from sevemu.crypto.vcek import PRODUCTS, SNP_GENERATIONS, tcb_components
from sevemu.errors import FileFormatError, InputError

warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive")

__all__ = [
    "AMD_OID",
    "KDS_URL",
    "OID_BL_SPL",
    "OID_CSP_ID",
    "OID_FMC_SPL",
    "OID_HWID",
    "OID_PRODUCT_NAME",
    "OID_SNP_SPL",
    "OID_STRUCT_VERSION",
    "OID_TEE_SPL",
    "OID_UCODE_SPL",
    "PSS",
    "AmdExtensions",
    "add_years",
    "amd_extensions",
    "amd_name",
    "build_certificate",
    "generation_of_product",
    "load_certificate",
    "load_certificates",
    "signing_key_extensions",
    "verify_signed_by",
]

AMD_OID: Final = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION: Final = AMD_OID + ".1"
OID_PRODUCT_NAME: Final = AMD_OID + ".2"
OID_BL_SPL: Final = AMD_OID + ".3.1"
OID_TEE_SPL: Final = AMD_OID + ".3.2"
OID_SNP_SPL: Final = AMD_OID + ".3.3"
OID_UCODE_SPL: Final = AMD_OID + ".3.8"
OID_FMC_SPL: Final = AMD_OID + ".3.9"
OID_HWID: Final = AMD_OID + ".4"
OID_CSP_ID: Final = AMD_OID + ".5"
KDS_URL: Final = "https://kdsintf.amd.com"

PSS: Final = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
"""RSASSA-PSS as AMD signs SNP certificates: SHA-384, MGF1-SHA-384, salt 48."""

_SPL_OIDS: Final = {
    "boot_loader": OID_BL_SPL, "tee": OID_TEE_SPL, "snp": OID_SNP_SPL, "microcode": OID_UCODE_SPL,
    "fmc": OID_FMC_SPL,
}
_ORDER: Final = {
    "milan": ("1", "2", "3.1", "3.2", "3.4", "3.5", "3.6", "3.7", "3.3", "3.8"),
    "genoa": ("1", "2", "3.1", "3.2", "3.4", "3.5", "3.6", "3.7", "3.3", "3.8"),
    "turin": ("1", "2", "3.9", "3.1", "3.2", "3.3", "3.5", "3.6", "3.7", "3.8"),
}
_VCEK_PRODUCT_NAME: Final = {"milan": "Milan-B0", "genoa": "Genoa", "turin": "Turin"}
_VLEK_PRODUCT_NAME: Final = {"milan": "Milan", "genoa": "Genoa", "turin": "Turin"}
_STRUCT_VERSION: Final = {"milan": 0, "genoa": 0, "turin": 1}


def generation_of_product(product: str) -> str:
    """The generation (``milan``...) of a KDS product name or certificate productName.

    Accepts ``Milan``, ``Milan-B0``, ``Genoa``, ``Turin`` (and stepping suffixes), any case.
    """
    name = product.strip().lower().split("-", 1)[0] if isinstance(product, str) else ""
    if name not in SNP_GENERATIONS:
        raise InputError(f"unknown SEV-SNP product {product!r}; expected one of {', '.join(PRODUCTS.values())}")
    return name


def add_years(when: dt.datetime, years: int) -> dt.datetime:
    """``when`` plus ``years`` calendar years (29 February becomes 28 February)."""
    try:
        return when.replace(year=when.year + years)
    except ValueError:
        return when.replace(year=when.year + years, day=28)


def amd_name(common_name: str) -> x509.Name:
    """AMD's distinguished name with ``common_name`` (module docstring)."""
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


# ---- DER primitives for AMD's extension values ----------------------------------------------
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_int(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_len(len(body)) + body


def _der_ia5(text: str) -> bytes:
    body = text.encode("ascii")
    return b"\x16" + _der_len(len(body)) + body


def _der_body(value: bytes, tag: int) -> bytes | None:
    """The content of a single DER TLV with ``tag`` filling all of ``value``, else None."""
    if len(value) < 2 or value[0] != tag:
        return None
    n, pos = value[1], 2
    if n & 0x80:
        count = n & 0x7F
        if count == 0 or count > 4 or len(value) < 2 + count:
            return None
        n, pos = int.from_bytes(value[2:2 + count], "big"), 2 + count
    return value[pos:] if len(value) - pos == n else None


def signing_key_extensions(generation: str, tcb: int, *, hwid: bytes | None = None,
                           csp_id: str | None = None) -> list[x509.Extension[x509.ExtensionType]]:
    """AMD's VCEK (``hwid``) or VLEK (``csp_id``) extensions for ``tcb``, in AMD's order."""
    if (hwid is None) == (csp_id is None):
        raise InputError("a VCEK names a hwid, a VLEK a CSP id: give exactly one")
    svns = dict(tcb_components(generation, tcb))
    gen = generation.strip().lower()
    values: dict[str, bytes] = {
        "1": _der_int(_STRUCT_VERSION[gen]),
        "2": _der_ia5((_VCEK_PRODUCT_NAME if hwid is not None else _VLEK_PRODUCT_NAME)[gen]),
    }
    for name, svn in svns.items():
        values[_SPL_OIDS[name][len(AMD_OID) + 1:]] = _der_int(svn)
    exts = []
    for arc in _ORDER[gen]:
        value = values.get(arc, _der_int(0))  # spl_4..7: reserved, zero
        exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(f"{AMD_OID}.{arc}"), value))
    if hwid is not None:
        exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_HWID), bytes(hwid)))
    else:
        assert csp_id is not None
        exts.append(x509.UnrecognizedExtension(x509.ObjectIdentifier(OID_CSP_ID), _der_ia5(csp_id)))
    return [x509.Extension(e.oid, False, e) for e in exts]


@dataclass(frozen=True, slots=True)
class AmdExtensions:
    """AMD's extensions of a VCEK or VLEK certificate, decoded."""

    struct_version: int | None
    product_name: str | None
    spls: dict[str, int]
    """By OID arc after 1.3.6.1.4.1.3704.1 (``"3.1"`` bl ... ``"3.9"`` fmc)."""
    hwid: bytes | None
    csp_id: str | None

    @property
    def generation(self) -> str:
        """The generation the productName names (:class:`~sevemu.errors.InputError` if none)."""
        if self.product_name is None:
            raise InputError("certificate has no AMD productName extension")
        return generation_of_product(self.product_name)

    def tcb(self, generation: str) -> int:
        """The TCB_VERSION these SPLs encode in ``generation``'s layout (missing SPLs count 0)."""
        gen = generation_of_product(generation)
        value = 0
        positions = {"milan": {"3.1": 0, "3.2": 1, "3.3": 6, "3.8": 7},
                     "genoa": {"3.1": 0, "3.2": 1, "3.3": 6, "3.8": 7},
                     "turin": {"3.9": 0, "3.1": 1, "3.2": 2, "3.3": 3, "3.8": 7}}[gen]
        for arc, byte in positions.items():
            value |= (self.spls.get(arc, 0) & 0xFF) << (8 * byte)
        return value


def amd_extensions(cert: x509.Certificate) -> AmdExtensions:
    """Decode AMD's extensions; the hwID may be raw bytes or an OCTET STRING (both occur).

    Raises :class:`~sevemu.errors.InputError` naming an extension whose value is malformed.
    """
    struct_version: int | None = None
    product: str | None = None
    spls: dict[str, int] = {}
    hwid: bytes | None = None
    csp: str | None = None
    for ext in cert.extensions:
        oid = ext.oid.dotted_string
        if not oid.startswith(AMD_OID + "."):
            continue
        value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
        arc = oid[len(AMD_OID) + 1:]
        if arc == "1" or arc.startswith("3."):
            body = _der_body(value, 0x02)
            if body is None or not body or len(body) > 2:
                raise InputError(f"AMD extension {oid}: not a small DER INTEGER ({value.hex()})")
            number = int.from_bytes(body, "big", signed=True)
            if number < 0 or number > 255:
                raise InputError(f"AMD extension {oid}: {number} is not an SPL 0..255")
            if arc == "1":
                struct_version = number
            else:
                spls[arc] = number
        elif arc in ("2", "5"):
            body = _der_body(value, 0x16)
            if body is None:
                raise InputError(f"AMD extension {oid}: not a DER IA5String ({value.hex()[:40]})")
            try:
                text = body.decode("ascii")
            except UnicodeDecodeError:
                raise InputError(f"AMD extension {oid}: IA5String is not ASCII") from None
            if arc == "2":
                product = text
            else:
                csp = text
        elif arc == "4":
            wrapped = _der_body(value, 0x04)
            hwid = wrapped if wrapped is not None and len(wrapped) in (8, 64) else value
    return AmdExtensions(struct_version, product, spls, hwid, csp)


# ---- loading --------------------------------------------------------------------------------
def load_certificates(data: bytes, *, what: str = "certificate") -> list[x509.Certificate]:
    """Every certificate in ``data`` (one DER certificate, or PEM with one or more).

    Raises :class:`~sevemu.errors.FileFormatError` when ``data`` holds none.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise FileFormatError(f"{what}: expected bytes")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        try:
            if bytes(data).lstrip().startswith(b"-----BEGIN"):
                certs = x509.load_pem_x509_certificates(bytes(data))
            else:
                certs = [x509.load_der_x509_certificate(bytes(data))]
        except ValueError as exc:
            raise FileFormatError(f"{what}: not an X.509 certificate in DER or PEM ({exc})") from None
        for cert in certs:  # touch the lazily parsed parts now, under the filter
            _ = cert.serial_number
    return certs


def load_certificate(data: bytes, *, what: str = "certificate") -> x509.Certificate:
    """The one certificate in ``data`` (DER or PEM)."""
    certs = load_certificates(data, what=what)
    if len(certs) != 1:
        raise FileFormatError(f"{what}: expected one certificate, found {len(certs)}")
    return certs[0]


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate, link: str) -> None:
    """Check that ``issuer``'s RSA key signed ``cert`` with RSASSA-PSS SHA-384 salt 48 and that the
    names chain; :class:`~sevemu.certs.errors.CertSignatureError` naming ``link`` otherwise."""
    key = issuer.public_key()
    if not isinstance(key, crypto_rsa.RSAPublicKey):
        raise CertSignatureError(f"{link}: issuer key is not RSA")
    if cert.signature_algorithm_oid != x509.SignatureAlgorithmOID.RSASSA_PSS:
        raise CertSignatureError(f"{link}: signature algorithm {cert.signature_algorithm_oid.dotted_string} "
                                 "is not RSASSA-PSS")
    if cert.issuer != issuer.subject:
        raise CertSignatureError(f"{link}: issuer {cert.issuer.rfc4514_string()} is not "
                                 f"{issuer.subject.rfc4514_string()}")
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, PSS, hashes.SHA384())
    except InvalidSignature:
        raise CertSignatureError(f"{link}: RSA-PSS signature does not verify") from None


# ---- building -------------------------------------------------------------------------------
def build_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: crypto_rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    signing_key: crypto_rsa.RSAPrivateKey,
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    extensions: Sequence[x509.Extension[x509.ExtensionType]] = (),
) -> x509.Certificate:
    """An X.509 v3 certificate signed with RSASSA-PSS SHA-384 salt 48 (serial 0 allowed)."""
    if serial < 0:
        raise InputError("serial numbers are not negative")
    placeholder = serial if serial > 0 else 1  # DER INTEGER 0 and 1 are both 02 01 xx
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(placeholder).not_valid_before(not_before).not_valid_after(not_after))
    for ext in extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    cert = builder.sign(signing_key, hashes.SHA384(), rsa_padding=PSS)
    if serial == placeholder:
        return cert
    der = cert.public_bytes(serialization.Encoding.DER)
    tbs = cert.tbs_certificate_bytes
    # TBS: SEQUENCE header, [0] { INTEGER 2 } (a0 03 02 01 02), then serial 02 01 01
    head = _der_header_len(tbs)
    version = tbs[head:head + 5]
    if version != b"\xa0\x03\x02\x01\x02" or tbs[head + 5:head + 8] != b"\x02\x01\x01":
        raise InputError("unexpected TBS encoding from the certificate builder")
    new_tbs = tbs[:head + 7] + b"\x00" + tbs[head + 8:]
    sig = signing_key.sign(new_tbs, PSS, hashes.SHA384())
    start = der.index(tbs)
    old_sig = cert.signature
    if len(sig) != len(old_sig) or not der.endswith(old_sig):
        raise InputError("unexpected certificate encoding from the certificate builder")
    out = der[:start] + new_tbs + der[start + len(tbs):len(der) - len(old_sig)] + sig
    return load_certificate(out)


def _der_header_len(data: bytes) -> int:
    n = data[1]
    return 2 + (n & 0x7F if n & 0x80 else 0)
