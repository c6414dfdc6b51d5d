"""``sevemu report`` / ``key`` / ``certificates``: snpguest's guest-side verbs, run inside an emulated
SNP guest (:mod:`sevemu.cli.snp_guest`) on the platform of ``--platform-dir`` / ``--generation``
(the same chip every time, so a report and the certificates of two invocations belong together).

* ``report REPORT REQUEST_FILE [--random] [--vmpl N] [--extended CERTS_DIR]``: REQUEST_FILE holds the
  64 bytes of REPORT_DATA (raw); with ``--random`` they are made and written there.  The report is
  written raw (0x4A0 bytes), as snpguest writes it.
* ``certificates pem|der DIR``: an extended report's certificate table written as ``vcek``, ``ask``,
  ``ark`` files (snpguest's names), for ``sevemu verify attestation DIR REPORT``.
* ``key KEY_PATH vcek|vmrk [--vmpl N] [--guest-field-select BITS] [--guest-svn N] [--tcb-version TCB]``:
  a 32-byte derived key.
* ``vlek-load FILE``: the host's SNP_VLEK_LOAD of a wrapped VLEK hashstick (``/dev/sev``, as snphost
  ``vlek-load``); ``report ... --vlek FILE`` loads it before the report, which the VLEK then signs.
  With ``--vlek-cert CERT`` the host's certificate table is the one a cloud provider installs beside
  a VLEK (snphost ``import``): the VLEK certificate, the ASVK (under the ASK's GUID: the GHCB
  specification has no ASVK GUID) and the ARK, written as ``vlek``, ``asvk``, ``ark``; an extended
  report of a VLEK-signing host without that certificate is refused up front (the host has no table
  to give, and the VCEK's would not verify the report).

The guest is launched afresh for each command (policy 0x30000, one measured code page, the secrets
page, one vCPU); its MEASUREMENT is printed so a verifier can pin it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.report import (
    CERT_GUID_ARK,
    CERT_GUID_ASK,
    CERT_GUID_VCEK,
    CERT_GUID_VLEK,
    GuestFieldSelect,
    KeyReq,
    KeyRsp,
    ReportReq,
    ReportRsp,
    RootKeySelect,
    decode_cert_table,
)
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE
from sevemu.certs.snp import load_certificate
from sevemu.cli.common import add_platform_args, emit, parse_int, read_file, resolve_platform, write_file
from sevemu.crypto.vcek import verify_report_signature
from sevemu.errors import InputError, VerificationError
from sevemu.guest.sev_guest import SevGuestError, SnpExtReportReq

__all__ = ["register"]

SNP_GENERATIONS = ("milan", "genoa", "turin")
_NAMES = {CERT_GUID_VCEK: "vcek", CERT_GUID_VLEK: "vlek", CERT_GUID_ASK: "ask", CERT_GUID_ARK: "ark"}


def _guest(args: argparse.Namespace) -> Any:
    from sevemu.cli.snp_guest import launch

    generation, directory = resolve_platform(args)
    if generation not in SNP_GENERATIONS:
        raise InputError(f"a {generation} platform has no SEV-SNP (use --generation milan, genoa or turin)")
    vlek_file: Path | None = getattr(args, "vlek", None)
    vlek = None
    if vlek_file is not None:
        vlek = read_file(vlek_file, what="wrapped VLEK hashstick")
        if len(vlek) != SNP_VLEK_HASHSTICK_SIZE:
            raise InputError(f"{vlek_file}: a wrapped VLEK hashstick is {SNP_VLEK_HASHSTICK_SIZE} bytes, "
                             f"the file has {len(vlek)}")
    vlek_cert = None
    cert_file: Path | None = getattr(args, "vlek_cert", None)
    if cert_file is not None:
        if vlek is None:
            raise InputError("--vlek-cert: the certificate of a VLEK the host loads; give --vlek FILE too")
        vlek_cert = load_certificate(read_file(cert_file, what="VLEK certificate"), what=str(cert_file))
    return launch(generation, platform_dir=directory, vmpck=args.vmpck, vlek=vlek, vlek_cert=vlek_cert)


def _check(status: int, what: str) -> None:
    if status:
        raise InputError(f"the firmware refused the {what}: status {status:#x}")


def _ioctl_error(exc: SevGuestError) -> InputError:
    return InputError(f"/dev/sev-guest: {exc} (fw_error {exc.fw_error:#x}, vmm_error {exc.vmm_error:#x})")


def run_report(args: argparse.Namespace) -> int:
    path: Path = args.request_file
    if args.random:
        data = os.urandom(64)
    else:
        data = read_file(path, what="request data")
        if len(data) != 64:
            raise InputError(f"{path}: REPORT_DATA is 64 bytes, the file has {len(data)} (or use --random)")
    if args.extended is not None and args.vlek is not None and args.vlek_cert is None:
        raise InputError("--extended with --vlek: the host's certificate table then holds the VLEK's certificate; "
                         "give it with --vlek-cert FILE (sevemu fetch vlek)")
    g = _guest(args)
    try:
        if args.extended is not None:
            req = SnpExtReportReq(data=ReportReq(report_data=data, vmpl=args.vmpl), certs_address=1,
                                  certs_len=0x4000)
            raw, certs, _ = g.device.get_ext_report(req)
        else:
            raw, certs = g.device.get_report(ReportReq(report_data=data, vmpl=args.vmpl)), b""
    except SevGuestError as exc:
        raise _ioctl_error(exc) from None
    rsp = ReportRsp.decode(raw[: ReportRsp.SIZE])
    _check(rsp.status, "report request")
    report = rsp.report.encode()
    if g.vlek_cert is not None:
        _check_vlek_cert(g.vlek_cert, report, args.vlek_cert)
    if args.random:
        write_file(path, data)
    write_file(args.report, report)
    written = _write_certs(certs, args.extended, "pem") if args.extended is not None else []
    result = {"report": str(args.report), "request_file": str(path), "measurement": g.measurement.hex(),
              "report_data": data.hex(), "vmpl": args.vmpl, "certificates": written}
    signer = {0: "VCEK", 1: "VLEK", 7: "none"}.get(rsp.report.signer_info.signing_key, "?")
    result["signing_key"] = signer
    lines = [f"report written to {args.report} (report data from {path})", f"measurement {g.measurement.hex()}",
             f"signed by the {signer}"]
    lines += [f"certificate written to {p}" for p in written]
    emit(args, result, lines)
    return 0


def _check_vlek_cert(cert: x509.Certificate, report: bytes, path: Path) -> None:
    """The report a loaded VLEK signed must verify with ``cert``'s key, or the certificate is another VLEK's."""
    key = cert.public_key()
    try:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise VerificationError("not an EC key")
        verify_report_signature(key, report)
    except VerificationError:
        raise InputError(f"{path}: this certificate is not the loaded VLEK's (the report it signed does not "
                         "verify with the certificate's key)") from None


def _write_certs(certs: bytes, directory: Path, encoding: str) -> list[str]:
    out = []
    table = decode_cert_table(certs)
    vlek = any(guid == CERT_GUID_VLEK for guid, _ in table)
    for guid, der in table:
        name = "asvk" if vlek and guid == CERT_GUID_ASK else _NAMES.get(guid, guid.hex())
        cert = x509.load_der_x509_certificate(der)
        data = cert.public_bytes(serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER)
        path = directory / f"{name}.{encoding}"
        write_file(path, data)
        out.append(str(path))
    if not out:
        raise InputError("the host supplied no certificates with the extended report")
    return out


def run_certificates(args: argparse.Namespace) -> int:
    g = _guest(args)
    try:
        raw, certs, _ = g.device.get_ext_report(SnpExtReportReq(data=ReportReq(), certs_address=1,
                                                                certs_len=0x4000))
    except SevGuestError as exc:
        raise _ioctl_error(exc) from None
    _check(ReportRsp.decode(raw[: ReportRsp.SIZE]).status, "extended report request")
    written = _write_certs(certs, args.dir, args.encoding)
    emit(args, {"certificates": written}, [f"certificate written to {p}" for p in written])
    return 0


def run_key(args: argparse.Namespace) -> int:
    g = _guest(args)
    try:
        fields = GuestFieldSelect.decode(args.guest_field_select.to_bytes(8, "little"))
    except (InputError, OverflowError):
        raise InputError(f"--guest-field-select {args.guest_field_select:#x}: bits above 6 are reserved") from None
    req = KeyReq(root_key_select=RootKeySelect(vmrk=args.root_key_select == "vmrk"), guest_field_select=fields,
                 vmpl=args.vmpl, guest_svn=args.guest_svn, tcb_version=args.tcb_version)
    try:
        rsp = KeyRsp.decode(g.device.get_derived_key(req))
    except SevGuestError as exc:
        raise _ioctl_error(exc) from None
    _check(rsp.status, "key request")
    write_file(args.key_path, rsp.derived_key, secret=True)
    emit(args, {"key": str(args.key_path), "measurement": g.measurement.hex()},
         [f"derived key written to {args.key_path}"])
    return 0


def run_vlek_load(args: argparse.Namespace) -> int:
    _guest(args)  # the launch loads it first, and refuses with the firmware's status
    emit(args, {"ok": True, "vlek_en": True, "file": str(args.vlek)},
         [f"VLEK loaded from {args.vlek} (SNP_PLATFORM_STATUS VLEK_EN); it lasts until SNP_SHUTDOWN"])
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_platform_args(p)
    p.add_argument("--vmpck", type=lambda t: parse_int(t, "--vmpck", 2), default=0,
                   help="the VMPCK the driver uses (0..3; Linux's vmpck_id, default 0)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(sub: Any) -> None:
    r = sub.add_parser("report", help="an attestation report from an emulated SNP guest (snpguest report)",
                       epilog="examples:\n  sevemu report report.bin request-data.bin --random\n"
                              "  sevemu report report.bin request-data.bin --random --extended certs/\n"
                              "  sevemu verify attestation certs/ report.bin --trust-ark certs/ark.pem")
    r.add_argument("report", type=Path, help="where to write the report (raw, 0x4A0 bytes)")
    r.add_argument("request_file", type=Path, help="64 bytes of REPORT_DATA (written with --random)")
    r.add_argument("--random", action="store_true", help="make random REPORT_DATA and write it to REQUEST_FILE")
    r.add_argument("--vmpl", type=lambda t: parse_int(t, "--vmpl", 2), default=0, help="VMPL to report (default 0)")
    r.add_argument("--extended", type=Path, metavar="CERTS_DIR",
                   help="an extended report: also write the host's certificates (PEM) into CERTS_DIR")
    r.add_argument("--vlek", type=Path, metavar="FILE",
                   help="the host loads this wrapped VLEK hashstick first (SNP_VLEK_LOAD): the VLEK signs")
    r.add_argument("--vlek-cert", type=Path, metavar="FILE",
                   help="with --vlek: the VLEK's certificate (PEM or DER, sevemu fetch vlek), which the host serves "
                        "with ASVK and ARK in an extended report's certificate table")
    _common(r)
    r.set_defaults(func=run_report)

    c = sub.add_parser("certificates", help="the host's certificates from an extended report (snpguest certificates)",
                       epilog="example:\n  sevemu certificates pem certs/")
    c.add_argument("encoding", choices=("pem", "der"), help="file format")
    c.add_argument("dir", type=Path, help="directory for vcek/ask/ark files")
    _common(c)
    c.set_defaults(func=run_certificates)

    k = sub.add_parser("key", help="a key derived by the firmware for an emulated SNP guest (snpguest key)",
                       epilog="examples:\n  sevemu key sealing.key vcek --guest-field-select 0x8\n"
                              "  sevemu key vm.key vmrk")
    k.add_argument("key_path", type=Path, help="where to write the 32-byte key (mode 0600)")
    k.add_argument("root_key_select", choices=("vcek", "vmrk"), help="root key")
    k.add_argument("--vmpl", type=lambda t: parse_int(t, "--vmpl", 2), default=0)
    k.add_argument("--guest-field-select", type=lambda t: parse_int(t, "--guest-field-select", 64), default=0,
                   metavar="BITS", help="bit 0 policy, 1 image id, 2 family id, 3 measurement, 4 guest svn, 5 tcb")
    k.add_argument("--guest-svn", type=lambda t: parse_int(t, "--guest-svn"), default=0)
    k.add_argument("--tcb-version", type=lambda t: parse_int(t, "--tcb-version", 64), default=0, metavar="TCB")
    _common(k)
    k.set_defaults(func=run_key)

    v = sub.add_parser("vlek-load", help="SNP_VLEK_LOAD of a wrapped VLEK hashstick on the platform (snphost vlek-load)",
                       epilog="examples:\n  sevemu fetch hashstick certs/ report.bin --csp acme --url http://127.0.0.1:8080\n"
                              "  sevemu vlek-load certs/vlek_hashstick.bin\n"
                              "  sevemu report r.bin q.bin --random --vlek certs/vlek_hashstick.bin")
    v.add_argument("vlek", type=Path, metavar="FILE", help="the 432-byte wrapped VLEK hashstick")
    _common(v)
    v.set_defaults(func=run_vlek_load)
