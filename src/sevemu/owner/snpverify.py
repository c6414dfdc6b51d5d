"""Verification of an SEV-SNP attestation report: certificate chain, signer binding, signature, CRL,
validity dates and the relying party's policy.

Sources: SNP ABI 56860 (ATTESTATION_REPORT, SIGNER_INFO, guest policy, PLATFORM_INFO), AMD VCEK
spec 57230 (the chain ARK -> ASK -> VCEK and ARK -> ASVK -> VLEK, RSASSA-PSS SHA-384, the VCEK
extensions a verifier compares with the report), go-sev-guest ``verify/verify.go`` and virtee
snpguest ``verify`` (the order of checks real verifiers use).

Checks, in order; the first that fails raises :class:`SnpCheckError` whose :attr:`~SnpCheckError.check`
names it and whose message is one line ``<check>: <reason>``:

``format``     0x4A0 bytes, version 2..5, every reserved byte and bit zero (SNP ABI), SIGNATURE_ALGO 1
               (ECDSA P-384 / SHA-384), SIGNER_INFO names a VCEK or VLEK (an unsigned report, signing
               key 7, fails here).
``ark``        the ARK is one of the trusted fingerprints (SHA-256 of its DER): AMD's real ARKs
               (:data:`AMD_SNP_ARK_FINGERPRINTS`, pinned, never shipped) or an emulated root the user
               names.
``chain``      ARK self-signed, ASK (for a VCEK) or ASVK (for a VLEK) signed by the ARK, the signer
               certificate signed by that intermediate (RSASSA-PSS SHA-384, salt 48; names chain).
``product``    ARK, intermediate and signer name one product; a v3+ report's CPUID family is that
               product's (0x19 Milan/Genoa, 0x1A Turin).
``signer``     the certificate is the kind SIGNER_INFO names (VCEK: hwID extension, VLEK: CSP-ID).
``validity``   every certificate valid at ``now``.
``crl``        when a CRL is given: signed by the ARK, current at ``now``, the intermediate not
               revoked.  ``require_crl`` makes a missing CRL a failure.
``binding``    VCEK: hwID equals CHIP_ID (Turin: CHIP_ID[0:8], bytes 8..63 zero; a masked, all-zero
               CHIP_ID cannot be bound); VCEK and VLEK: the SPL extensions equal REPORTED_TCB in the
               product's TCB layout.
``signature``  the report's signature by the certificate's P-384 key over bytes [0, 0x2A0).
``policy.*``   the relying party's :class:`SnpPolicy`: ``measurement``, ``report_data``,
               ``host_data``, ``id_key_digest``, ``author_key_digest``, ``family_id``, ``image_id``,
               ``vmpl``, ``debug``, ``migrate_ma``, ``smt``, ``guest_svn``, ``tcb`` (minimum reported
               TCB, component by component), ``committed_tcb`` (reported TCB not above committed, the
               rollback check), ``firmware`` (minimum current firmware version), ``signing_key``.

Trust is only by fingerprint: a chain whose ARK is not pinned never verifies, whatever its names.
The signature checks of a chain (and of a CRL) are remembered by the SHA-256 fingerprints of the
certificates, so verifying many reports against one chain checks its RSA signatures once; the checks
that depend on the time or on the report run every time.  Per :class:`Chain` *object* the verifier
also keeps what every report would recompute -- the ARK fingerprint, the chain's verdict, the signer's
public key and TCB, the CRL's signature and revocation verdicts -- so a relying party that verifies a
stream of reports against one chain pays little more than the report's ECDSA verification (the pins,
validity dates, CRL freshness, binding, signature and policy still run per report).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

from sevemu.abi.report import REPORT_SIZE, AttestationReport, PlatformInfo, SigningKey
from sevemu.certs.errors import CertSignatureError
from sevemu.certs.snp import PSS, AmdExtensions, amd_extensions, verify_signed_by
from sevemu.crypto.vcek import HWID_SIZE, PRODUCTS, tcb_components, verify_report_signature
from sevemu.errors import InputError, LayoutError, VerificationError

__all__ = [
    "AMD_SNP_ARK_FINGERPRINTS",
    "CHECKS",
    "Chain",
    "SnpCheckError",
    "SnpPolicy",
    "Verified",
    "fingerprint",
    "verify_report",
]

AMD_SNP_ARK_FINGERPRINTS: Final = {
    bytes.fromhex("69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"): "milan",
    bytes.fromhex("4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1"): "genoa",
    bytes.fromhex("1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a"): "turin",
}
"""SHA-256 of the DER of AMD's real SNP ARKs (ARK-Milan, ARK-Genoa, ARK-Turin as the KDS serves them;
computed from the copies in virtee/sev ``src/certs/snp/builtin``).  The certificates are not shipped."""

CHECKS: Final = ("format", "ark", "chain", "product", "signer", "validity", "crl", "binding", "signature",
                 "policy")
_CPUID_FAMILY: Final = {"milan": 0x19, "genoa": 0x19, "turin": 0x1A}


class SnpCheckError(VerificationError):
    """Raised when a report fails verification; :attr:`check` names the check that failed."""

    def __init__(self, check: str, reason: str) -> None:
        self.check = check
        self.reason = reason
        super().__init__(f"{check}: {reason}")


def fingerprint(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER (what ARK pins are)."""
    return cert.fingerprint(hashes.SHA256())


_CACHE_MAX: Final = 256
_chain_cache: dict[tuple[bytes, bytes, bytes, str], tuple[str, AmdExtensions]] = {}
_crl_cache: dict[tuple[bytes, bytes], bool] = {}
"""Verdicts on signatures over immutable bytes (a chain, a CRL): a verifier checking many reports
against one chain checks its RSA signatures once.  Keys are SHA-256 fingerprints; only successes are
kept, and the time-dependent checks (validity, CRL freshness, revocation) run on every report."""


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value


@dataclass(frozen=True, slots=True)
class Chain:
    """The certificates a report is verified against: its signer (VCEK or VLEK), the ASK or ASVK,
    the ARK, and optionally the ARK's CRL."""

    signer: x509.Certificate
    intermediate: x509.Certificate
    ark: x509.Certificate
    crl: x509.CertificateRevocationList | None = None


@dataclass(frozen=True, slots=True)
class SnpPolicy:
    """What the relying party accepts; ``None`` fields are not checked."""

    measurement: bytes | None = None
    report_data: bytes | None = None
    host_data: bytes | None = None
    id_key_digest: bytes | None = None
    author_key_digest: bytes | None = None
    family_id: bytes | None = None
    image_id: bytes | None = None
    vmpl: int | None = None
    """The exact VMPL the report must state."""
    allow_debug: bool = False
    allow_migrate_ma: bool = True
    allow_smt: bool = True
    min_guest_svn: int | None = None
    min_tcb: int | None = None
    """Minimum REPORTED_TCB (a TCB_VERSION in the product's layout), compared per component."""
    check_committed_tcb: bool = True
    """REPORTED_TCB must not be above COMMITTED_TCB in any component."""
    min_firmware: tuple[int, int, int] | None = None
    """Minimum current firmware (major, minor, build)."""
    signing_key: Literal["vcek", "vlek"] | None = None
    require_crl: bool = False


@dataclass(frozen=True, slots=True)
class Verified:
    """A report that passed: its fields, product, signer kind and whether its root is emulated."""

    report: AttestationReport
    generation: str
    signing_key: Literal["vcek", "vlek"]
    emulated_root: bool
    crl_checked: bool
    checks: tuple[str, ...] = field(default=())


def _fail(check: str, reason: str) -> SnpCheckError:
    return SnpCheckError(check, reason)


def _decode(report: bytes) -> AttestationReport:
    if not isinstance(report, (bytes, bytearray, memoryview)):
        raise _fail("format", f"a report is bytes, not {type(report).__name__}")
    if len(report) != REPORT_SIZE:
        raise _fail("format", f"a report is {REPORT_SIZE:#x} bytes, got {len(report):#x}")
    version = int.from_bytes(bytes(report[:4]), "little")
    if not 2 <= version <= 5:
        raise _fail("format", f"report version {version} is not 2..5")
    try:
        rep = AttestationReport.decode(report)
        PlatformInfo.from_int(rep.platform_info)
    except LayoutError as exc:
        raise _fail("format", str(exc)) from None
    if rep.signature_algo != 1:
        raise _fail("format", f"SIGNATURE_ALGO {rep.signature_algo} is not ECDSA P-384 with SHA-384 (1)")
    if rep.signer_info.signing_key not in (SigningKey.VCEK, SigningKey.VLEK):
        what = "unsigned (signing key 7)" if rep.signer_info.signing_key == SigningKey.NONE else \
            f"signed by reserved signing key {rep.signer_info.signing_key}"
        raise _fail("format", f"the report is {what}")
    return rep


def _cn(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _check_validity(certs: Iterable[tuple[str, x509.Certificate]], now: dt.datetime) -> None:
    for name, cert in certs:
        if now < cert.not_valid_before_utc:
            raise _fail("validity", f"{name} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z")
        if now > cert.not_valid_after_utc:
            raise _fail("validity", f"{name} expired {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")


def _check_crl(crl: x509.CertificateRevocationList, ark: x509.Certificate, inter: x509.Certificate,
               inter_name: str, now: dt.datetime) -> None:
    _check_crl_signature(crl, ark)
    _check_crl_time(crl, now)
    _check_crl_revoked(crl, inter, inter_name)


def _check_crl_signature(crl: x509.CertificateRevocationList, ark: x509.Certificate) -> None:
    key = ark.public_key()
    if crl.issuer != ark.subject:
        raise _fail("crl", f"CRL issuer {crl.issuer.rfc4514_string()} is not the ARK")
    if not isinstance(key, crypto_rsa.RSAPublicKey):
        raise _fail("crl", "the ARK key is not RSA")
    cache_key = (hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).digest(), fingerprint(ark))
    if cache_key not in _crl_cache:
        try:
            key.verify(crl.signature, crl.tbs_certlist_bytes, PSS, hashes.SHA384())
        except InvalidSignature:
            raise _fail("crl", "CRL signature does not verify with the ARK") from None
        _remember(_crl_cache, cache_key, True)


def _check_crl_time(crl: x509.CertificateRevocationList, now: dt.datetime) -> None:
    if crl.next_update_utc is not None and now > crl.next_update_utc:
        raise _fail("crl", f"CRL expired {crl.next_update_utc:%Y-%m-%d %H:%M:%S}Z")


def _check_crl_revoked(crl: x509.CertificateRevocationList, inter: x509.Certificate, inter_name: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(inter.serial_number) is not None:
        raise _fail("crl", f"the {inter_name} (serial {inter.serial_number:#x}) is revoked")


def _tcb_text(generation: str, tcb: int) -> str:
    return " ".join(f"{n}={v}" for n, v in tcb_components(generation, tcb))


def _tcb_le(generation: str, a: int, b: int) -> list[str]:
    """Components where ``a`` is above ``b``."""
    return [n for (n, x), (_, y) in zip(tcb_components(generation, a), tcb_components(generation, b), strict=True)
            if x > y]


def _eq(check: str, got: bytes, want: bytes | None) -> None:
    if want is not None and not hmac.compare_digest(bytes(got), bytes(want)):
        raise _fail(check, f"{bytes(got).hex()} is not the expected {bytes(want).hex()}")


def _check_policy(rep: AttestationReport, gen: str, kind: str, policy: SnpPolicy) -> None:
    _eq("policy.measurement", rep.measurement, policy.measurement)
    _eq("policy.report_data", rep.report_data, policy.report_data)
    _eq("policy.host_data", rep.host_data, policy.host_data)
    _eq("policy.id_key_digest", rep.id_key_digest, policy.id_key_digest)
    _eq("policy.author_key_digest", rep.author_key_digest, policy.author_key_digest)
    _eq("policy.family_id", rep.family_id, policy.family_id)
    _eq("policy.image_id", rep.image_id, policy.image_id)
    if policy.vmpl is not None and rep.vmpl != policy.vmpl:
        raise _fail("policy.vmpl", f"report VMPL {rep.vmpl} is not {policy.vmpl}")
    if rep.policy.debug and not policy.allow_debug:
        raise _fail("policy.debug", "the guest policy allows debugging")
    if rep.policy.migrate_ma and not policy.allow_migrate_ma:
        raise _fail("policy.migrate_ma", "the guest policy allows a migration agent")
    if not policy.allow_smt and (rep.policy.smt or PlatformInfo.from_int(rep.platform_info).smt_en):
        raise _fail("policy.smt", "SMT is allowed by the guest policy or enabled on the platform")
    if policy.min_guest_svn is not None and rep.guest_svn < policy.min_guest_svn:
        raise _fail("policy.guest_svn", f"guest SVN {rep.guest_svn} is below {policy.min_guest_svn}")
    if policy.min_tcb is not None:
        try:
            low = _tcb_le(gen, policy.min_tcb, rep.reported_tcb)
        except LayoutError as exc:
            raise InputError(f"minimum TCB {policy.min_tcb:#x}: {exc}") from None
        if low:
            raise _fail("policy.tcb", f"reported TCB ({_tcb_text(gen, rep.reported_tcb)}) is below the minimum "
                        f"({_tcb_text(gen, policy.min_tcb)}) in {', '.join(low)}")
    if policy.check_committed_tcb:
        try:
            above = _tcb_le(gen, rep.reported_tcb, rep.committed_tcb)
        except LayoutError as exc:
            raise _fail("policy.committed_tcb", f"committed TCB {rep.committed_tcb:#x}: {exc}") from None
        if above:
            raise _fail("policy.committed_tcb", f"reported TCB is above the committed TCB in {', '.join(above)} "
                        f"(committed {_tcb_text(gen, rep.committed_tcb)})")
    if policy.min_firmware is not None:
        have = (rep.current_major, rep.current_minor, rep.current_build)
        if have < policy.min_firmware:
            raise _fail("policy.firmware", "firmware {}.{} build {} is below {}.{} build {}".format(
                *have, *policy.min_firmware))
    if policy.signing_key is not None and kind != policy.signing_key:
        raise _fail("policy.signing_key", f"signed by a {kind.upper()}, the policy wants a {policy.signing_key.upper()}")


def _chain_facts(chain: Chain, kind: str, inter_name: str, ark_fp: bytes) -> tuple[str, AmdExtensions]:
    """The chain checks (signatures, names, signer kind) of one chain, cached (see ``_chain_cache``)."""
    key = (fingerprint(chain.signer), fingerprint(chain.intermediate), ark_fp, kind)
    hit = _chain_cache.get(key)
    if hit is not None:
        return hit
    links = (("ARK <- ARK", chain.ark, chain.ark), (f"{inter_name} <- ARK", chain.intermediate, chain.ark),
             (f"{kind.upper()} <- {inter_name}", chain.signer, chain.intermediate))
    for link, child, parent in links:
        try:
            verify_signed_by(child, parent, link)
        except CertSignatureError as exc:
            raise _fail("chain", str(exc)) from None
    try:
        ext = amd_extensions(chain.signer)
        gen = ext.generation
    except InputError as exc:
        raise _fail("product", f"{kind.upper()} certificate: {exc}") from None
    product = PRODUCTS[gen]
    want_inter = f"SEV-{product}" if kind == "vcek" else f"SEV-VLEK-{product}"
    if _cn(chain.ark) != f"ARK-{product}" or _cn(chain.intermediate) != want_inter:
        raise _fail("product", f"{kind.upper()} is for {product} but the chain is {_cn(chain.intermediate)} <- "
                    f"{_cn(chain.ark)}")
    if kind == "vcek" and (ext.hwid is None or ext.csp_id is not None or _cn(chain.signer) != "SEV-VCEK"):
        raise _fail("signer", "SIGNER_INFO names a VCEK but the certificate is not a VCEK")
    if kind == "vlek" and (ext.csp_id is None or ext.hwid is not None or _cn(chain.signer) != "SEV-VLEK"):
        raise _fail("signer", "SIGNER_INFO names a VLEK but the certificate is not a VLEK")
    _remember(_chain_cache, key, (gen, ext))
    return gen, ext


@dataclass(slots=True)
class _Prepared:
    """What one :class:`Chain` object gives every report verified against it (the certificates and
    the CRL are immutable): fingerprints, the chain's verdict, the signer's key and TCB, validity
    bounds, the CRL's static verdict.  Built only when all of these passed; the checks that depend on
    the report, the pins or the time still run per report."""

    ark_fp: bytes
    gen: str
    ext: AmdExtensions
    key: object
    cert_tcb: int | None
    validity: tuple[tuple[str, x509.Certificate], ...]
    crl_signed: bool = False
    """The CRL's issuer and signature passed (then its revocation check, once passed, too)."""
    crl_not_revoked: bool = False


_prepared_cache: dict[tuple[int, str], tuple[Chain, _Prepared]] = {}
"""Per Chain *object* (kept alive here, so its id is not reused), the facts of :class:`_Prepared`."""


def _prepare(chain: Chain, kind: str, inter_name: str, pins: set[bytes]) -> _Prepared:
    """The per-chain checks in the order of :func:`verify_report` (ark, chain, product, signer; the
    CRL's signature and the intermediate's revocation), remembered per Chain object."""
    hit = _prepared_cache.get((id(chain), kind))
    if hit is not None and hit[0] is chain:
        if hit[1].ark_fp not in pins:
            raise _fail("ark", f"the ARK ({_cn(chain.ark)}, SHA-256 {hit[1].ark_fp.hex()[:16]}...) is not a "
                        "trusted root")
        return hit[1]
    ark_fp = fingerprint(chain.ark)
    if ark_fp not in pins:
        raise _fail("ark", f"the ARK ({_cn(chain.ark)}, SHA-256 {ark_fp.hex()[:16]}...) is not a trusted root")
    gen, ext = _chain_facts(chain, kind, inter_name, ark_fp)
    validity = ((kind.upper(), chain.signer), (inter_name, chain.intermediate), ("ARK", chain.ark))
    try:
        cert_tcb: int | None = ext.tcb(gen)
    except InputError:
        cert_tcb = None  # the binding check names it, per report
    prepared = _Prepared(ark_fp, gen, ext, chain.signer.public_key(), cert_tcb, validity)
    if len(_prepared_cache) >= _CACHE_MAX:
        _prepared_cache.clear()
    _prepared_cache[(id(chain), kind)] = (chain, prepared)
    return prepared


def verify_report(
    report: bytes,
    chain: Chain,
    *,
    trusted: Iterable[bytes] | None = None,
    policy: SnpPolicy | None = None,
    now: dt.datetime | None = None,
) -> Verified:
    """Verify ``report`` against ``chain`` and ``policy`` (module docstring); return what passed.

    ``trusted``: ARK fingerprints (SHA-256 of DER) to accept; default AMD's real ARKs.  Raises
    :class:`SnpCheckError` naming the first failed check.
    """
    pol = policy or SnpPolicy()
    at = now or dt.datetime.now(dt.UTC)
    if at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    rep = _decode(bytes(report))
    kind: Literal["vcek", "vlek"] = "vcek" if rep.signer_info.signing_key == SigningKey.VCEK else "vlek"
    inter_name = "ASK" if kind == "vcek" else "ASVK"
    pins = set(AMD_SNP_ARK_FINGERPRINTS) if trusted is None else {bytes(t) for t in trusted}
    prep = _prepare(chain, kind, inter_name, pins)
    gen, ext, ark_fp = prep.gen, prep.ext, prep.ark_fp
    product = PRODUCTS[gen]
    if rep.cpuid_fam_id and rep.cpuid_fam_id != _CPUID_FAMILY[gen]:
        raise _fail("product", f"report CPUID family {rep.cpuid_fam_id:#x} is not {product}'s "
                    f"{_CPUID_FAMILY[gen]:#x}")
    _check_validity(prep.validity, at)
    if chain.crl is not None:
        if not prep.crl_signed:
            _check_crl_signature(chain.crl, chain.ark)
            prep.crl_signed = True
        _check_crl_time(chain.crl, at)
        if not prep.crl_not_revoked:
            _check_crl_revoked(chain.crl, chain.intermediate, inter_name)
            prep.crl_not_revoked = True
    elif pol.require_crl:
        raise _fail("crl", "no CRL given and the policy requires one")
    if kind == "vcek":
        size = HWID_SIZE[gen]
        if not any(rep.chip_id):
            raise _fail("binding", "CHIP_ID is masked (all zero): a VCEK cannot be bound to this report")
        if any(rep.chip_id[size:]):
            raise _fail("binding", f"a {product} CHIP_ID has {size} significant bytes; bytes {size}..63 are not zero")
        assert ext.hwid is not None
        if not hmac.compare_digest(ext.hwid, rep.chip_id[:size]):
            raise _fail("binding", f"VCEK hwID {ext.hwid.hex()[:16]}... is not CHIP_ID {rep.chip_id.hex()[:16]}...")
    cert_tcb = ext.tcb(gen) if prep.cert_tcb is None else prep.cert_tcb
    if cert_tcb != rep.reported_tcb:
        try:
            reported = _tcb_text(gen, rep.reported_tcb)
        except LayoutError as exc:
            raise _fail("binding", f"REPORTED_TCB {rep.reported_tcb:#x}: {exc}") from None
        raise _fail("binding", f"{kind.upper()} TCB ({_tcb_text(gen, cert_tcb)}) is not REPORTED_TCB ({reported})")
    key = prep.key
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _fail("signature", f"the {kind.upper()} key is not an EC key")
    try:
        verify_report_signature(key, bytes(report))
    except VerificationError as exc:
        raise _fail("signature", f"report signature does not verify with the {kind.upper()}: {exc}") from None
    _check_policy(rep, gen, kind, pol)
    done = [c for c in CHECKS if c != "crl" or chain.crl is not None]
    return Verified(rep, gen, kind, ark_fp not in AMD_SNP_ARK_FINGERPRINTS, chain.crl is not None, tuple(done))


def chain_from(certs: Sequence[x509.Certificate]) -> Chain:
    """A :class:`Chain` from [signer, intermediate, ARK] (at least three certificates)."""
    if len(certs) < 3:
        raise InputError(f"a chain is VCEK/VLEK, ASK/ASVK and ARK: got {len(certs)} certificates")
    return Chain(certs[0], certs[1], certs[2])
