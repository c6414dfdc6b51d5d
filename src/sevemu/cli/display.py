"""``sevemu display FILE``: what is in any artefact the project writes or reads.

A registry (:data:`ARTEFACTS`) of the kinds of files, each with how to recognise it, the fields it
shows and, for certificates, its public key (``--encoding pem|der``).  The kind is recognised from
the bytes -- raw, or hex / base64 text as ``session`` and the VMM write them -- unless ``--type``
names it.  SEV-SNP artefacts (reports, VCEK, ID blocks) join the registry with their
issues: :func:`register_artefact`.  The VMSA comes last: any page whose reserved bytes are zero
decodes as one, so every other kind is tried first.

======================  =======================================================================
type                    what
======================  =======================================================================
sev-cert                an SEV certificate, 0x824 bytes (PDH, PEK, OCA, CEK, a GODH) (SEV API
                        55766, certificate appendix)
chain                   a chain file: PDH PEK OCA CEK [ASK ARK] (``export``; sevctl's format)
amd-cert                an ARK or ASK in AMD's format (0x240 / 0x340 / 0x440 / 0x640 bytes)
amd-chain               ASK || ARK, the CA chain (``sevctl verify --ca``)
session                 the 0x80-byte LAUNCH_START session buffer (``NAME_session.b64``)
measure                 the 0x30-byte LAUNCH_MEASURE blob, MEASURE || MNONCE
secret-header           the 0x34-byte LAUNCH_SECRET packet header: flags, IV, MAC
report                  the 0xD0-byte legacy ATTESTATION report
transport-key           a 16-byte TEK or TIK (recognised raw only; its value is not printed)
vmsa                    an SEV-ES VMSA page, 4096 bytes (``vmsa build``, sevctl's VMSA files): its
                        non-zero fields by Linux's names (``struct sev_es_save_area``)
======================  =======================================================================
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from sevemu.abi.certs import SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.abi.sev import HdrBuf, LegacyAttestationReport, MeasureBuf, SessionBuf
from sevemu.abi.vmsa import VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain
from sevemu.certs.sev import SevCert, SevEcKey
from sevemu.cli.common import Outputs, emit, read_file
from sevemu.cli.vmsa import vmsa_fields
from sevemu.crypto.transport import KEY_SIZE
from sevemu.errors import FileFormatError, InputError, SevemuError

__all__ = ["ARTEFACTS", "Artefact", "identify", "register", "register_artefact"]

Fields = list[tuple[str, Any]]


@dataclass(frozen=True)
class Artefact:
    """One kind of file: ``decode`` returns its fields or raises (it is not of this kind)."""

    name: str
    description: str
    decode: Callable[[bytes], Fields]
    public_key: Callable[[bytes], Any] | None = None


ARTEFACTS: dict[str, Artefact] = {}


def register_artefact(artefact: Artefact) -> Artefact:
    """Add a kind of file to ``display`` (tried in registration order)."""
    ARTEFACTS[artefact.name] = artefact
    return artefact


def _name(value: int, enum: Any) -> str:
    try:
        return f"{enum(value).name} ({value:#x})"
    except ValueError:
        return f"{value:#x}"


def _sev_cert_fields(cert: SevCert) -> Fields:
    key = cert.key
    if isinstance(key, SevEcKey):
        key_text = f"{key.curve.name} x={key.qx:096x}"[:80] + "..."
    else:
        key_text = f"RSA-{key.modulus_size} e={key.pub_exp}"
    slots = [f"{_name(int(s.usage), KeyUsage)} {_name(int(s.algo), SigAlgo)}" if not s.is_empty else "empty"
             for s in cert.slots]
    return [("version", cert.version), ("api", f"{cert.api_major}.{cert.api_minor}"),
            ("usage", _name(int(cert.usage), KeyUsage)), ("algorithm", _name(int(cert.algo), SigAlgo)),
            ("public key", key_text), ("signature 1", slots[0]), ("signature 2", slots[1])]


def _decode_sev_cert(data: bytes) -> Fields:
    if len(data) != SEV_CERT_SIZE:
        raise InputError("not 0x824 bytes")
    return _sev_cert_fields(SevCert.decode(data))


def _amd_cert_fields(cert: AmdCert) -> Fields:
    return [("usage", _name(int(cert.key_usage), KeyUsage)), ("key id", cert.key_id.hex()),
            ("certifying id", cert.certifying_id.hex()), ("modulus", f"{cert.modulus_size} bits"),
            ("public exponent", cert.pub_exp),
            ("self-certified", cert.is_self_certified), ("signed", cert.signature is not None),
            ("emulated", cert.is_emulated), ("fingerprint", cert.fingerprint().hex())]


def _decode_amd_cert(data: bytes) -> Fields:
    return _amd_cert_fields(AmdCert.decode(data, allow_unsigned=True))


def _decode_chain(data: bytes) -> Fields:
    from sevemu.cli.platform import ChainFile  # noqa: F401 - the format, documented there

    if len(data) < 4 * SEV_CERT_SIZE:
        raise InputError("shorter than PDH PEK OCA CEK")
    out: Fields = []
    for i, name in enumerate(("PDH", "PEK", "OCA", "CEK")):
        cert = SevCert.decode(data[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE])
        if cert.usage != KeyUsage[name]:
            raise InputError(f"certificate {i} is not the {name}")
        out += [(f"{name} {k}", v) for k, v in _sev_cert_fields(cert)]
    rest = data[4 * SEV_CERT_SIZE :]
    if rest:
        amd = AmdCertChain.decode(rest)
        for name, c in (("ASK", amd.ask), ("ARK", amd.ark)):
            out += [(f"{name} {k}", v) for k, v in _amd_cert_fields(c)]
    return out


def _decode_amd_chain(data: bytes) -> Fields:
    amd = AmdCertChain.decode(data)
    return [(f"{name} {k}", v) for name, c in (("ASK", amd.ask), ("ARK", amd.ark)) for k, v in _amd_cert_fields(c)]


def _decode_key(data: bytes) -> Fields:
    if len(data) != KEY_SIZE:
        raise InputError(f"not {KEY_SIZE} bytes")
    return [("key", f"{KEY_SIZE} bytes (a TEK or TIK; not shown)")]


def _fixed(cls: Any) -> Callable[[bytes], Fields]:
    def decode(data: bytes) -> Fields:
        if len(data) != cls.SIZE:
            raise InputError(f"not {cls.SIZE:#x} bytes")
        value = cls.decode(data)
        return [(k, (v.hex() if isinstance(v, bytes) else v)) for k, v in vars_of(value).items()]

    return decode


def vars_of(value: Any) -> dict[str, Any]:
    return {name: getattr(value, name) for name in value.__dataclass_fields__}


def _decode_report(data: bytes) -> Fields:
    fields = _fixed(LegacyAttestationReport)(data)
    rep = LegacyAttestationReport.decode(data)
    return [(k, v) for k, v in fields if k not in ("sig_usage", "sig_algo", "policy")] + [
        ("policy", f"{rep.policy:#x}"), ("sig_usage", _name(rep.sig_usage, KeyUsage)),
        ("sig_algo", _name(rep.sig_algo, SigAlgo))]


def _decode_vmsa(data: bytes) -> Fields:
    if len(data) != VMSA_PAGE_SIZE:
        raise InputError(f"not {VMSA_PAGE_SIZE} bytes")
    return list(vmsa_fields(SevEsSaveArea.decode(data)))


def _sev_cert_key(data: bytes) -> Any:
    return SevCert.decode(data).public_key()


def _amd_cert_key(data: bytes) -> Any:
    return AmdCert.decode(data, allow_unsigned=True).public_key()


for _a in (
    Artefact("sev-cert", "an SEV certificate (PDH, PEK, OCA, CEK or a GODH)", _decode_sev_cert, _sev_cert_key),
    Artefact("chain", "an SEV chain file: PDH PEK OCA CEK [ASK ARK]", _decode_chain),
    Artefact("amd-cert", "an ARK or ASK in AMD's format", _decode_amd_cert, _amd_cert_key),
    Artefact("amd-chain", "the manufacturer's ASK || ARK (sevctl verify --ca)", _decode_amd_chain),
    Artefact("session", "the LAUNCH_START session buffer", _fixed(SessionBuf)),
    Artefact("measure", "the LAUNCH_MEASURE blob (MEASURE || MNONCE)", _fixed(MeasureBuf)),
    Artefact("secret-header", "the LAUNCH_SECRET packet header", _fixed(HdrBuf)),
    Artefact("report", "a legacy ATTESTATION report", _decode_report),
    Artefact("transport-key", "a transport key (TEK or TIK) of a session", _decode_key),
    Artefact("vmsa", "an SEV-ES VMSA page (a vCPU's initial save area)", _decode_vmsa),
):
    register_artefact(_a)


def _candidates(data: bytes) -> list[bytes]:
    from sevemu.cli.common import decode_text

    out = [data]
    if data and all(32 <= b < 127 or b in b"\r\n\t" for b in data):
        out += decode_text(data)
    return out


def identify(data: bytes, kind: str | None = None) -> tuple[Artefact, bytes, Fields]:
    """The artefact ``data`` is (raw, hex or base64), its bytes and fields; ``kind`` forces the type."""
    kinds = [ARTEFACTS[kind]] if kind is not None else list(ARTEFACTS.values())
    errors: list[str] = []
    for art in kinds:
        for value in _candidates(data):
            try:
                return art, value, art.decode(value)
            except (SevemuError, ValueError, KeyError) as exc:
                errors.append(f"{art.name}: {exc}")
    if kind is not None:
        raise FileFormatError(f"not {ARTEFACTS[kind].description}: {errors[0].split(': ', 1)[1]}")
    raise FileFormatError(f"{len(data)} bytes: not a kind of file sevemu knows "
                          f"({', '.join(ARTEFACTS)}); --type forces one")


_EPILOG = """\
examples:
  sevemu display vm_godh.b64
  sevemu display chain.cert --json
  sevemu display measure.b64
  sevemu display vmsa0.bin                          an SEV-ES VMSA (sevemu vmsa build)
  sevemu display pdh.cert --encoding pem           the certificate's public key
  sevemu display ark.cert --encoding der --outfile ark.der"""


def register(sub: Any) -> None:
    p = sub.add_parser("display", help="show what an artefact holds (certificates, chains, session, measure, "
                                       "secret header, report, VMSA)",
                       description="Decode and show a file sevemu writes or reads; the kind is recognised "
                                   "from its bytes (raw, hex or base64).", epilog=_EPILOG)
    p.add_argument("file", type=Path, help="the file")
    p.add_argument("--type", choices=tuple(ARTEFACTS), help="the kind of file (default: recognised)")
    p.add_argument("--encoding", choices=("pem", "der"),
                   help="print a certificate's public key in PEM, or write it in DER (SubjectPublicKeyInfo)")
    p.add_argument("--outfile", type=Path, metavar="FILE", help="write the --encoding output to FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_display)


def run_display(args: argparse.Namespace) -> int:
    outputs = Outputs(inputs=(args.file,))
    if args.outfile is not None:
        if args.encoding is None:
            raise InputError("--outfile goes with --encoding pem|der")
        outputs.add(args.outfile, "the encoded key")
    data = read_file(args.file)
    try:
        art, value, fields = identify(data, args.type)
    except FileFormatError as exc:
        raise FileFormatError(f"{args.file}: {exc}") from None
    if args.encoding is not None:
        if art.public_key is None:
            raise InputError(f"{args.file}: --encoding applies to a single certificate, not to {art.description}")
        key = art.public_key(value)
        enc = serialization.Encoding.PEM if args.encoding == "pem" else serialization.Encoding.DER
        out = key.public_bytes(enc, serialization.PublicFormat.SubjectPublicKeyInfo)
        if args.outfile is not None:
            outputs.write(args.outfile, out)
            print(f"wrote {args.outfile} ({args.encoding.upper()} public key of {art.description})")
        elif args.encoding == "der":
            if sys.stdout.isatty():
                raise InputError("--encoding der is binary: give --outfile FILE or redirect stdout")
            sys.stdout.flush()
            sys.stdout.buffer.write(out)
        else:
            sys.stdout.write(out.decode())
        return 0
    emit(args, {"file": str(args.file), "type": art.name, "fields": dict(fields)},
         [f"{args.file}: {art.description} ({art.name}, {len(value)} bytes)"]
         + [f"  {k:<18} {v}" for k, v in fields])
    return 0
