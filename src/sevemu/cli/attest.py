"""SEV-SNP attestation commands in the manner of virtee's ``snpguest``, and the emulated KDS.

* ``sevemu kds serve``: the emulated AMD Key Distribution Service on loopback
  (:mod:`sevemu.amd.kds`), with the emulated AMD's roots and the chips it manufactured (its vault).
* ``sevemu fetch ca DIR``, ``fetch vcek DIR REPORT``, ``fetch crl DIR``: certificates from a KDS --
  ours (``--url http://127.0.0.1:PORT``) or AMD's (the default URL) -- into snpguest's certificate
  directory layout: ``ark.pem``, ``ask.pem`` (``asvk.pem`` with ``--endorser vlek``), ``vcek.pem``
  (``vlek.pem``), ``crl.der`` (``--encoding der``: ``.der`` certificates).
* ``sevemu verify certs DIR`` and ``sevemu verify attestation DIR REPORT``: the chain in DIR, and a
  report against it and a policy (:mod:`sevemu.owner.snpverify`).  ``verify`` with any other
  arguments stays sevctl's chain verify (:mod:`sevemu.cli.platform`): :func:`route` sends only these
  two three-word forms here.
* ``sevemu display report FILE``: an SNP attestation report, human readable or ``--json`` (the
  ``snp-report`` kind of ``sevemu display``).

Trust: AMD's real ARKs (pinned by fingerprint) unless ``--trust-ark FILE`` or ``--ark-fingerprint HEX``
names an emulated root (``sevemu fetch ca`` from our KDS writes the ARK to pin).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sevemu.abi.report import REPORT_SIZE, AttestationReport, PlatformInfo
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE
from sevemu.certs.snp import KDS_URL, generation_of_product, load_certificate, load_certificates
from sevemu.cli.common import Outputs, emit, parse_int, read_file
from sevemu.cli.display import Artefact, register_artefact
from sevemu.crypto.vcek import PRODUCTS, hwid, tcb_components
from sevemu.errors import FileFormatError, InputError
from sevemu.owner.snpverify import (
    AMD_SNP_ARK_FINGERPRINTS,
    Chain,
    SnpCheckError,
    SnpPolicy,
    fingerprint,
    verify_report,
)

__all__ = ["register", "report_fields", "route"]

_CPUID_PRODUCT = {(0x19, 0x01): "milan", (0x19, 0x11): "genoa", (0x19, 0xA0): "genoa", (0x1A, 0x02): "turin"}


def route(argv: list[str]) -> list[str]:
    """Send ``verify certs|attestation X ...`` to ``snp-verify`` and ``display report X`` to
    ``display X --type snp-report`` (module docstring); every other command line is unchanged."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    rest = argv[i:]
    if len(rest) >= 3 and rest[0] == "verify" and rest[1] in ("certs", "attestation") \
            and not rest[2].startswith("-"):
        return argv[:i] + ["snp-verify"] + rest[1:]
    if len(rest) >= 3 and rest[0] == "display" and rest[1] == "report" and not rest[2].startswith("-"):
        return argv[:i] + ["display", rest[2], "--type", "snp-report"] + rest[3:]
    return argv


# ---- display ----------------------------------------------------------------------------------------
def _product_of(rep: AttestationReport) -> str | None:
    if rep.cpuid_fam_id is None:
        return None
    return _CPUID_PRODUCT.get((rep.cpuid_fam_id, rep.cpuid_mod_id or 0))


def _tcb(product: str | None, value: int) -> str:
    if product is None:
        return f"{value:#018x}"
    try:
        return f"{value:#018x} (" + " ".join(f"{n}={v}" for n, v in tcb_components(product, value)) + ")"
    except (InputError, ValueError):
        return f"{value:#018x}"


def report_fields(rep: AttestationReport, product: str | None = None) -> list[tuple[str, Any]]:
    """The fields of an SNP report as ``(name, value)`` for display (TCBs decoded for ``product``)."""
    product = product or _product_of(rep)
    pi = PlatformInfo.from_int(rep.platform_info)
    signer = {0: "VCEK", 1: "VLEK", 7: "none"}.get(rep.signer_info.signing_key, str(rep.signer_info.signing_key))
    out: list[tuple[str, Any]] = [
        ("version", rep.version), ("product", PRODUCTS[product] if product else "unknown (v2 report)"),
        ("guest_svn", rep.guest_svn), ("policy", (f"{rep.policy.to_int():#x} (debug={rep.policy.debug}, "
                                                 f"smt={rep.policy.smt}, migrate_ma={rep.policy.migrate_ma}, "
                                                 f"abi={rep.policy.abi_major}.{rep.policy.abi_minor})")),
        ("family_id", rep.family_id.hex()), ("image_id", rep.image_id.hex()), ("vmpl", rep.vmpl),
        ("signature_algo", rep.signature_algo), ("current_tcb", _tcb(product, rep.current_tcb)),
        ("platform_info", (f"{rep.platform_info:#x} (smt_en={pi.smt_en}, tsme_en={pi.tsme_en}, "
                          f"ecc_en={pi.ecc_en}, rapl_dis={pi.rapl_dis}, "
                          f"ciphertext_hiding_en={pi.ciphertext_hiding_en})")),
        ("signer_info", (f"signing_key={signer}, mask_chip_key={rep.signer_info.mask_chip_key}, "
                        f"author_key_en={rep.signer_info.author_key_en}")),
        ("report_data", rep.report_data.hex()), ("measurement", rep.measurement.hex()),
        ("host_data", rep.host_data.hex()), ("id_key_digest", rep.id_key_digest.hex()),
        ("author_key_digest", rep.author_key_digest.hex()), ("report_id", rep.report_id.hex()),
        ("report_id_ma", rep.report_id_ma.hex()), ("reported_tcb", _tcb(product, rep.reported_tcb)),
    ]
    if rep.cpuid_fam_id is not None:
        out.append(("cpuid", f"family {rep.cpuid_fam_id:#x} model {rep.cpuid_mod_id:#x} stepping {rep.cpuid_step}"))
    out += [
        ("chip_id", rep.chip_id.hex()), ("committed_tcb", _tcb(product, rep.committed_tcb)),
        ("current_firmware", f"{rep.current_major}.{rep.current_minor} build {rep.current_build}"),
        ("committed_firmware", f"{rep.committed_major}.{rep.committed_minor} build {rep.committed_build}"),
        ("launch_tcb", _tcb(product, rep.launch_tcb)),
    ]
    if rep.launch_mit_vector is not None:
        out += [("launch_mit_vector", f"{rep.launch_mit_vector:#x}"),
                ("current_mit_vector", f"{rep.current_mit_vector:#x}")]
    out += [("signature_r", rep.signature.r[:48][::-1].hex()), ("signature_s", rep.signature.s[:48][::-1].hex())]
    return out


def _decode_snp_report(data: bytes) -> list[tuple[str, Any]]:
    if len(data) != REPORT_SIZE:
        raise InputError(f"not {REPORT_SIZE:#x} bytes")
    version = int.from_bytes(data[:4], "little")
    if not 2 <= version <= 5:
        raise InputError(f"report version {version} is not 2..5")
    return report_fields(AttestationReport.decode(data))


register_artefact(Artefact("snp-report", "an SEV-SNP attestation report", _decode_snp_report))


# ---- HTTP ------------------------------------------------------------------------------------------------
def _get(url: str, what: str, timeout: float) -> bytes:
    import requests

    try:
        r = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise InputError(f"{what}: cannot reach {url}: {type(exc).__name__}") from None
    if r.status_code != 200:
        reason = r.text.strip().splitlines()[0][:200] if r.text.strip() else r.reason
        retry = f" (retry after {r.headers['Retry-After']} s)" if r.status_code == 429 and "Retry-After" in r.headers \
            else ""
        raise InputError(f"{what}: {url} answered {r.status_code}: {reason}{retry}")
    return bytes(r.content)


def _csp_arg(text: str) -> str:
    if not text or not all(c.isalnum() or c in "_.=-" for c in text) or len(text) > 100:
        raise argparse.ArgumentTypeError(f"CSP name {text!r}: use 1-100 letters, digits, '_', '.', '=' or '-'")
    return text


def _product_arg(text: str) -> str:
    try:
        return generation_of_product(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _encode(cert: x509.Certificate, encoding: str) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER)


def _read_report(path: Path) -> AttestationReport:
    data = read_file(path)
    if len(data) != REPORT_SIZE:
        text = data.strip()
        try:
            data = bytes.fromhex(text.decode("ascii")) if text else data
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) != REPORT_SIZE:
        raise FileFormatError(f"{path}: an SNP report is {REPORT_SIZE:#x} bytes (raw or hex), got {len(data):#x}")
    try:
        return AttestationReport.decode(data)
    except InputError as exc:
        raise FileFormatError(f"{path}: not an SNP report: {exc}") from None


def run_fetch(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    kind = args.endorser
    directory: Path = args.dir
    outputs = Outputs(force=True)
    ext = args.encoding
    if args.what == "ca":
        product = PRODUCTS[args.product]
        names = (("asvk" if kind == "vlek" else "ask"), "ark")
        paths = [outputs.add(directory / f"{n}.{ext}", f"the {n.upper()}") for n in names]
        url = f"{base}/{kind}/v1/{product}/cert_chain"
        certs = load_certificates(_get(url, "fetch ca", args.timeout), what=url)
        if len(certs) != 2:
            raise FileFormatError(f"{url}: expected two certificates (ASK/ASVK, ARK), got {len(certs)}")
        for path, cert in zip(paths, certs, strict=True):
            outputs.write(path, _encode(cert, ext))
        lines = [f"wrote {p}" for p in paths] + [f"ARK SHA-256 {fingerprint(certs[1]).hex()}"
                                                 + (" (AMD's)" if fingerprint(certs[1]) in AMD_SNP_ARK_FINGERPRINTS
                                                    else " (not AMD's: pin it with --trust-ark)")]
        emit(args, {"ok": True, "files": [str(p) for p in paths], "ark_sha256": fingerprint(certs[1]).hex()}, lines)
        return 0
    if args.what == "crl":
        product = PRODUCTS[args.product]
        path = outputs.add(directory / "crl.der", "the CRL")
        url = f"{base}/{kind}/v1/{product}/crl"
        data = _get(url, "fetch crl", args.timeout)
        try:
            x509.load_der_x509_crl(data)
        except ValueError:
            raise FileFormatError(f"{url}: not a DER CRL") from None
        outputs.write(path, data)
        emit(args, {"ok": True, "files": [str(path)]}, [f"wrote {path}"])
        return 0
    if args.what == "vcek" and kind == "vlek":
        raise InputError("fetch vcek: a VLEK is not fetched by hwid (AMD hands VLEKs to the cloud provider: "
                         "fetch vlek DIR REPORT --csp NAME)")
    rep = _read_report(args.report)
    gen = args.product or _product_of(rep)
    if gen is None:
        raise InputError(f"{args.report}: a version {rep.version} report does not name its product: give --product")
    spls = "&".join(f"{k}={v}" for k, v in (
        ("fmcSPL" if n == "fmc" else {"boot_loader": "blSPL", "tee": "teeSPL", "snp": "snpSPL",
                                      "microcode": "ucodeSPL"}[n], v) for n, v in tcb_components(gen, rep.reported_tcb)))
    if args.what == "vlek":  # the CSP's VLEK at the report's TCB (sevemu's KDS path)
        return _fetch_cert(args, outputs.add(directory / f"vlek.{ext}", "the VLEK"), outputs,
                           f"{base}/vlek/v1/{PRODUCTS[gen]}/cert?cspID={args.csp}&{spls}")
    try:
        hw = hwid(gen, rep.chip_id)
    except InputError as exc:
        raise InputError(f"{args.report}: {exc}") from None
    if not any(hw):
        raise InputError(f"{args.report}: CHIP_ID is masked; the chip cannot be named to the KDS")
    if args.what == "hashstick":  # the CSP's wrapped VLEK hashstick for the report's chip and TCB
        path = outputs.add(directory / "vlek_hashstick.bin", "the wrapped VLEK hashstick")
        url = f"{base}/vlek/v1/{PRODUCTS[gen]}/hashstick?cspID={args.csp}&hwid={hw.hex()}&{spls}"
        blob = _get(url, "fetch hashstick", args.timeout)
        if len(blob) != SNP_VLEK_HASHSTICK_SIZE:
            raise FileFormatError(f"{url}: a wrapped VLEK hashstick is {SNP_VLEK_HASHSTICK_SIZE} bytes, "
                                  f"got {len(blob)}")
        outputs.write(path, blob)
        emit(args, {"ok": True, "files": [str(path)], "url": url}, [f"wrote {path}", f"from {url}"])
        return 0
    return _fetch_cert(args, outputs.add(directory / f"vcek.{ext}", "the VCEK"), outputs,
                       f"{base}/vcek/v1/{PRODUCTS[gen]}/{hw.hex()}?{spls}")


def _fetch_cert(args: argparse.Namespace, path: Path, outputs: Outputs, url: str) -> int:
    cert = load_certificate(_get(url, f"fetch {args.what}", args.timeout), what=url)
    outputs.write(path, _encode(cert, args.encoding))
    emit(args, {"ok": True, "files": [str(path)], "url": url}, [f"wrote {path}", f"from {url}"])
    return 0


# ---- verify ----------------------------------------------------------------------------------------------
def _find(directory: Path, stem: str, required: bool = True) -> Path | None:
    for ext in ("pem", "der", "crt", "cer"):
        p = directory / f"{stem}.{ext}"
        if p.is_file():
            return p
    if required:
        raise FileFormatError(f"{directory}: no {stem}.pem or {stem}.der (snpguest's certificate directory)")
    return None


def _load_chain(directory: Path, kind: str | None) -> Chain:
    if not directory.is_dir():
        raise FileFormatError(f"{directory}: not a directory")
    if kind is None:
        kind = "vlek" if _find(directory, "vlek", required=False) and not _find(directory, "vcek", False) else "vcek"
    signer_path = _find(directory, kind)
    inter_path = _find(directory, "ask" if kind == "vcek" else "asvk")
    ark_path = _find(directory, "ark")
    assert signer_path and inter_path and ark_path
    certs = [load_certificate(read_file(p), what=str(p)) for p in (signer_path, inter_path, ark_path)]
    crl_path = directory / "crl.der"
    crl = None
    if crl_path.is_file():
        try:
            crl = x509.load_der_x509_crl(read_file(crl_path))
        except ValueError:
            raise FileFormatError(f"{crl_path}: not a DER CRL") from None
    return Chain(certs[0], certs[1], certs[2], crl)


def _hex(size: int, option: str) -> Any:
    def parse(text: str) -> bytes:
        try:
            value = bytes.fromhex(text.removeprefix("0x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: {text!r} is not hex") from None
        if len(value) != size:
            raise argparse.ArgumentTypeError(f"{option}: {len(value)} bytes, expected {size}")
        return value
    return parse


def _firmware(text: str) -> tuple[int, int, int]:
    parts = text.split(".")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (2, 3) or not all(0 <= n <= 255 for n in nums):
        raise argparse.ArgumentTypeError(f"{text!r} is not MAJOR.MINOR[.BUILD]")
    return (nums[0], nums[1], nums[2] if len(nums) == 3 else 0)


def _trusted(args: argparse.Namespace) -> tuple[set[bytes], str]:
    pins: set[bytes] = set()
    names = []
    for path in args.trust_ark or ():
        certs = load_certificates(read_file(path), what=str(path))
        pins.add(fingerprint(certs[-1]))
        names.append(str(path))
    for fp in args.ark_fingerprint or ():
        pins.add(fp)
        names.append(fp.hex()[:16] + "...")
    if not pins:
        return set(AMD_SNP_ARK_FINGERPRINTS), "AMD's real ARKs (pinned)"
    return pins, "the ARK(s) " + ", ".join(names)


def _now(args: argparse.Namespace) -> dt.datetime | None:
    if args.at is None:
        return None
    try:
        when = dt.datetime.fromisoformat(args.at)
    except ValueError:
        raise InputError(f"--at: {args.at!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def run_verify_certs(args: argparse.Namespace) -> int:
    from sevemu.certs.errors import CertSignatureError
    from sevemu.certs.snp import verify_signed_by

    chain = _load_chain(args.dir, args.endorser)
    pins, trust = _trusted(args)
    cns = chain.signer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    kind = "VLEK" if cns and cns[0].value == "SEV-VLEK" else "VCEK"
    inter = "ASK" if kind == "VCEK" else "ASVK"
    lines = [f"verifying the certificates in {args.dir} against {trust}:"]
    try:
        if fingerprint(chain.ark) not in pins:
            raise SnpCheckError("ark", f"the ARK (SHA-256 {fingerprint(chain.ark).hex()[:16]}...) is not trusted")
        lines.append("  ok     ARK pinned")
        for link, child, parent in (("ARK <- ARK", chain.ark, chain.ark), (f"{inter} <- ARK", chain.intermediate,
                                    chain.ark), (f"{kind} <- {inter}", chain.signer, chain.intermediate)):
            try:
                verify_signed_by(child, parent, link)
            except CertSignatureError as exc:
                raise SnpCheckError("chain", str(exc)) from None
            lines.append(f"  ok     {link}")
    except SnpCheckError as exc:
        lines.append(f"  FAILED {exc}")
        emit(args, {"ok": False, "check": exc.check, "reason": exc.reason}, lines)
        return 1
    lines.append("certificates OK" + ("" if fingerprint(chain.ark) in AMD_SNP_ARK_FINGERPRINTS else
                                      " (emulated root)"))
    emit(args, {"ok": True, "emulated_root": fingerprint(chain.ark) not in AMD_SNP_ARK_FINGERPRINTS}, lines)
    return 0


def run_verify_attestation(args: argparse.Namespace) -> int:
    chain = _load_chain(args.dir, args.endorser)
    data = read_file(args.report)
    if len(data) != REPORT_SIZE and data.strip() and all(32 <= b < 127 or b in b"\r\n" for b in data):
        try:
            data = bytes.fromhex(data.strip().decode("ascii"))
        except ValueError:
            pass
    pins, trust = _trusted(args)
    policy = SnpPolicy(
        measurement=args.measurement, report_data=args.report_data, host_data=args.host_data,
        id_key_digest=args.id_key_digest, author_key_digest=args.author_key_digest, vmpl=args.vmpl,
        allow_debug=args.allow_debug, allow_smt=not args.no_smt, min_guest_svn=args.min_guest_svn,
        min_tcb=args.min_tcb, min_firmware=args.min_firmware, signing_key=args.signing_key,
        require_crl=args.require_crl)
    try:
        got = verify_report(data, chain, trusted=pins, policy=policy, now=_now(args))
    except SnpCheckError as exc:
        emit(args, {"ok": False, "check": exc.check, "reason": exc.reason},
             [f"verifying {args.report} with {args.dir} against {trust}:", f"  FAILED {exc}"])
        return 1
    lines = [f"verifying {args.report} with {args.dir} against {trust}:"]
    lines += [f"  ok     {c}" for c in got.checks]
    lines.append(f"report OK: {PRODUCTS[got.generation]}, signed by a {got.signing_key.upper()}"
                 + (", emulated root" if got.emulated_root else "") + ("" if got.crl_checked else ", no CRL given"))
    emit(args, {"ok": True, "product": PRODUCTS[got.generation], "signing_key": got.signing_key,
                "emulated_root": got.emulated_root, "crl_checked": got.crl_checked, "checks": list(got.checks),
                "measurement": got.report.measurement.hex(), "report_data": got.report.report_data.hex()}, lines)
    return 0


# ---- kds serve -------------------------------------------------------------------------------------------
def run_kds_serve(args: argparse.Namespace) -> int:
    from sevemu.amd.kds import KeyDistributionService, RateLimiter, create_app, loopback_server
    from sevemu.amd.snp import AmdSnpRoot
    from sevemu.amd.vault import AmdRegistry
    from sevemu.scenario import amd_vault_dir, default_amd_root

    limiter = RateLimiter(args.rate_limit, args.burst) if args.rate_limit is not None else None
    vault = amd_vault_dir()
    gens = args.product or ["milan", "genoa", "turin"]
    roots = {g: AmdSnpRoot.for_root(default_amd_root(g), None if vault is None else vault / g / "snp")
             for g in dict.fromkeys(gens)}
    registry = AmdRegistry(vault)
    for name in args.csp or ():
        registry.csp(name, create=True)
    app = create_app(KeyDistributionService(roots, registry), rate_limit=limiter)
    server = loopback_server(app, args.host, args.port, log=args.log)
    where = f"http://{args.host}:{server.server_port}"
    print(f"emulated AMD KDS on {where} ({', '.join(PRODUCTS[g] for g in roots)}); Ctrl-C stops it")
    for g, root in roots.items():
        print(f"  {PRODUCTS[g]:<6} ARK SHA-256 {root.ark_fingerprint().hex()}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# ---- registration ----------------------------------------------------------------------------------------
def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-ark", type=Path, action="append", metavar="FILE",
                   help="trust this (emulated) ARK, PEM or DER (repeatable; default: AMD's real ARKs)")
    p.add_argument("--ark-fingerprint", type=_hex(32, "--ark-fingerprint"), action="append", metavar="HEX",
                   help="trust the ARK whose DER has this SHA-256 (repeatable)")
    p.add_argument("--endorser", choices=("vcek", "vlek"), help="which signer's files to use (default: found)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    k = sub.add_parser("kds", help="the emulated AMD Key Distribution Service")
    ksub = k.add_subparsers(dest="kds_command", required=True, metavar="ACTION")
    s = ksub.add_parser("serve", help="serve VCEKs, chains and CRLs with AMD's URL grammar on loopback",
                        epilog="examples:\n  sevemu kds serve --port 8080\n"
                               "  sevemu kds serve --port 8080 --rate-limit 2 --product milan\n"
                               "  curl http://127.0.0.1:8080/vcek/v1/Milan/cert_chain")
    s.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=lambda t: parse_int(t, "--port", 16), default=8080,
                   help="TCP port (default 8080; 0: any free port)")
    s.add_argument("--product", type=_product_arg, action="append", metavar="PRODUCT",
                   help="serve this product only (Milan, Genoa, Turin; repeatable; default all)")
    s.add_argument("--rate-limit", type=float, metavar="PER_S", help="requests per second per client (429 beyond)")
    s.add_argument("--burst", type=int, help="requests a client may make at once (default: the rate, rounded up)")
    s.add_argument("--csp", action="append", metavar="NAME", help="a CSP account for VLEKs (made if new)")
    s.add_argument("--log", action="store_true", help="one line per request on stderr")
    s.set_defaults(func=run_kds_serve)

    f = sub.add_parser("fetch", help="certificates from a KDS into snpguest's directory layout (ark.pem ...)")
    fsub = f.add_subparsers(dest="what", required=True, metavar="WHAT")
    for what, helptext in (("ca", "the ASK (or ASVK) and ARK"), ("vcek", "the VCEK for a report"),
                           ("crl", "the ARK's CRL"), ("vlek", "a CSP's VLEK at a report's TCB (sevemu's KDS)"),
                           ("hashstick", "a CSP's wrapped VLEK hashstick for a report's chip and TCB (sevemu's KDS)")):
        p = fsub.add_parser(what, help=helptext, epilog="examples:\n"
                            "  sevemu fetch ca certs/ --product Milan --url http://127.0.0.1:8080\n"
                            "  sevemu fetch vcek certs/ report.bin --url http://127.0.0.1:8080\n"
                            "  sevemu fetch crl certs/ --product Milan --url http://127.0.0.1:8080\n"
                            "  sevemu fetch hashstick certs/ report.bin --csp acme --url http://127.0.0.1:8080\n"
                            "  sevemu fetch vlek certs/ report.bin --csp acme --url http://127.0.0.1:8080")
        p.add_argument("dir", type=Path, help="the certificate directory (created if needed)")
        if what in ("vcek", "vlek", "hashstick"):
            p.add_argument("report", type=Path, help="the attestation report (raw 0x4A0 bytes or hex)")
            p.add_argument("--product", type=_product_arg,
                           help="Milan, Genoa or Turin (default: from the report's CPUID fields)")
        if what in ("vlek", "hashstick"):
            p.add_argument("--csp", required=True, type=_csp_arg, help="the CSP account (sevemu kds serve --csp)")
        if what in ("ca", "crl"):
            p.add_argument("--product", type=_product_arg, required=True, help="Milan, Genoa or Turin")
        p.add_argument("--url", default=KDS_URL, help=f"the KDS (default {KDS_URL}; ours: sevemu kds serve)")
        if what != "crl":
            p.add_argument("--encoding", choices=("pem", "der"), default="pem", help="file format (default pem)")
        p.add_argument("--endorser", choices=("vcek", "vlek"), default="vcek",
                       help="the VCEK (ASK) or VLEK (ASVK) chain (default vcek)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=run_fetch)
        if what == "crl":
            p.set_defaults(encoding="der")

    v = sub.add_parser("snp-verify", help="(sevemu verify certs|attestation DIR ...: SEV-SNP chains and reports)")
    vsub = v.add_subparsers(dest="snp_verify", required=True, metavar="WHAT")
    c = vsub.add_parser("certs", help="ARK -> ASK -> VCEK (or ASVK -> VLEK) in a certificate directory",
                        epilog="example:\n  sevemu verify certs certs/ --trust-ark certs/ark.pem")
    c.add_argument("dir", type=Path, help="directory with ark.pem, ask.pem, vcek.pem (snpguest's layout)")
    _trust_args(c)
    c.set_defaults(func=run_verify_certs)
    a = vsub.add_parser("attestation", help="a report against the certificates in DIR and a policy",
                        epilog="examples:\n  sevemu verify attestation certs/ report.bin\n"
                               "  sevemu verify attestation certs/ report.bin --trust-ark certs/ark.pem "
                               "--measurement HEX --min-tcb 0x7308000000000003")
    a.add_argument("dir", type=Path, help="directory with ark.pem, ask.pem, vcek.pem [crl.der]")
    a.add_argument("report", type=Path, help="the attestation report (raw 0x4A0 bytes or hex)")
    _trust_args(a)
    a.add_argument("--measurement", type=_hex(48, "--measurement"), metavar="HEX")
    a.add_argument("--report-data", type=_hex(64, "--report-data"), metavar="HEX")
    a.add_argument("--host-data", type=_hex(32, "--host-data"), metavar="HEX")
    a.add_argument("--id-key-digest", type=_hex(48, "--id-key-digest"), metavar="HEX")
    a.add_argument("--author-key-digest", type=_hex(48, "--author-key-digest"), metavar="HEX")
    a.add_argument("--vmpl", type=lambda t: parse_int(t, "--vmpl", 2), help="the VMPL the report must state")
    a.add_argument("--allow-debug", action="store_true", help="accept a debuggable guest")
    a.add_argument("--no-smt", action="store_true", help="refuse SMT (guest policy or platform)")
    a.add_argument("--min-guest-svn", type=lambda t: parse_int(t, "--min-guest-svn"))
    a.add_argument("--min-tcb", type=lambda t: parse_int(t, "--min-tcb", 64), metavar="TCB",
                   help="minimum reported TCB_VERSION (u64, the product's layout)")
    a.add_argument("--min-firmware", type=_firmware, metavar="MAJ.MIN[.BUILD]")
    a.add_argument("--signing-key", choices=("vcek", "vlek"))
    a.add_argument("--require-crl", action="store_true", help="fail without DIR/crl.der")
    a.add_argument("--at", metavar="TIME", help="verify as of this ISO 8601 time (default now)")
    a.set_defaults(func=run_verify_attestation)
