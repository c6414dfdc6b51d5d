"""The platform owner's commands, as virtee/sevctl has them: ``show``, ``export``, ``reset``,
``rotate``, ``provision``, ``generate``, ``verify`` -- at the top level as in sevctl, and under
``sevemu platform ...`` as before (the same implementation behind both spellings).

Each command boots the platform from its directory (fuses, factory data, NV store;
:func:`sevemu.cli.common.open_platform`) and talks to the firmware through ``/dev/sev``
(:class:`~sevemu.hypervisor.sevdev.SevDevice`) as sevctl does on Linux: PLATFORM_STATUS, GET_ID2,
PDH_CERT_EXPORT, FACTORY_RESET, PDH_GEN, PEK_CSR + PEK_CERT_IMPORT.  Changes persist in the platform
directory.

Chain files (sevctl ``export``; virtee/sev ``certs::sev::Chain`` and ``sev::Chain``): the SEV chain
PDH || PEK || OCA || CEK (4 x 0x824 bytes), with ``--full`` followed by the manufacturer's
ASK || ARK (AMD format).  ``export DEST`` writes that one file; when DEST is a directory the
certificates are written one per file instead (``pdh.cert pek.cert oca.cert cek.cert`` and with
``--full`` ``ask.cert ark.cert``), the form ``verify CERT_DIR`` reads.

``verify`` checks ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH
(:meth:`sevemu.certs.chain.PlatformChain.verify`) from files (sevctl's ``--sev``, ``--oca``,
``--ca``, or a directory / chain file) or straight from the platform.  The ARK must be one of AMD's
real ARKs (pinned) unless an emulated ARK is trusted explicitly: ``--emulated-ark FILE`` or
``--emulated`` (the ARK of the platform directory's manufacturer).  The emulated CEK is signed by
the emulated ASK and exported with the chain (on hardware sevctl fetches it from AMD's key server).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.abi.sev import LINUX_STATUS_FLAGS_CONFIG_ES, LINUX_STATUS_FLAGS_OWNER
from sevemu.abi.states import PlatformState
from sevemu.certs.chain import AmdCertChain, PlatformChain, SevCertChain
from sevemu.certs.errors import ChainError, UntrustedRootError
from sevemu.certs.roots import AMD_ARKS, PinnedArk
from sevemu.certs.sev import ECDSA_ALGOS, SevCert
from sevemu.cli.common import (
    Outputs,
    Platform,
    add_force,
    add_platform_args,
    decode_sev_cert,
    emit,
    open_platform,
    platform_amd_chain,
    read_amd_cert,
    read_file,
    read_sev_cert,
    resolve_platform,
)
from sevemu.errors import FileFormatError, InputError, SevemuError
from sevemu.hypervisor.sevdev import (
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
    SevUserDataStatus,
)

__all__ = ["CERT_FILES", "ChainFile", "chip_id", "export_pdh", "platform_status", "read_chain_file", "register"]

CERT_FILES = ("pdh.cert", "pek.cert", "oca.cert", "cek.cert", "ask.cert", "ark.cert")
"""File names of ``export --full DIR`` and of a ``verify`` certificate directory."""

SHOW_WHAT = ("flags", "guests", "identifier", "version", "all")


# ---- chain files ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChainFile:
    """A sevctl chain file: PDH || PEK || OCA || CEK, then optionally ASK || ARK (module docstring)."""

    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    amd: AmdCertChain | None = None

    def encode(self) -> bytes:
        sev = self.pdh.encode() + self.pek.encode() + self.oca.encode() + self.cek.encode()
        return sev + (self.amd.encode() if self.amd is not None else b"")


def read_chain_file(path: Path) -> ChainFile:
    """Decode a chain file, each certificate checked for its usage; errors name the file."""
    data = read_file(path)
    sev_size = 4 * SEV_CERT_SIZE
    if len(data) < sev_size:
        raise FileFormatError(f"{path}: expected a chain of at least {sev_size} bytes (PDH, PEK, OCA, CEK), "
                              f"got {len(data)}")
    names = ("PDH", "PEK", "OCA", "CEK")
    certs = [decode_sev_cert(data[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE], f"{path} ({name})",
                             KeyUsage[name]) for i, name in enumerate(names)]
    rest = data[sev_size:]
    amd = None
    if rest:
        try:
            amd = AmdCertChain.decode(rest)
        except SevemuError as exc:
            raise FileFormatError(f"{path}: after the SEV chain, not ASK || ARK ({len(rest)} bytes): {exc}") from None
    pdh, pek, oca, cek = certs
    return ChainFile(pdh, pek, oca, cek, amd)


def read_ca_file(path: Path) -> AmdCertChain:
    data = read_file(path)
    try:
        return AmdCertChain.decode(data)
    except SevemuError as exc:
        raise FileFormatError(f"{path}: not an ASK || ARK chain ({len(data)} bytes): {exc}") from None


# ---- registration --------------------------------------------------------------------------------
_EXAMPLES = {
    "show": "examples:\n  sevemu show version\n  sevemu show identifier\n  sevemu show --json",
    "export": "examples:\n  sevemu export chain.cert             PDH PEK OCA CEK, one file (sevctl's format)\n"
              "  sevemu export --full chain.cert      ... followed by ASK ARK\n"
              "  sevemu export --full certs/          one file per certificate",
    "reset": "example:\n  sevemu reset",
    "rotate": "example:\n  sevemu rotate && sevemu export pdh.cert",
    "provision": "example:\n  sevemu generate oca.cert oca.key && sevemu provision oca.cert oca.key",
    "generate": "example:\n  sevemu generate oca.cert oca.key",
    "verify": "examples:\n  sevemu verify --emulated                       the platform's own chain\n"
              "  sevemu verify --sev chain.cert --emulated       a chain file (export --full)\n"
              "  sevemu verify --sev chain.cert --ca ask_ark.cert --emulated-ark ark.cert\n"
              "  sevemu verify certs/ --emulated                 a directory (export --full DIR)",
}


def register(sub: Any) -> None:
    p = sub.add_parser("platform", help="the platform owner's commands (also at the top level, as in sevctl)",
                       description="The platform owner's commands; each is also a top-level command "
                                   "(sevemu show, sevemu export, ...).")
    psub = p.add_subparsers(dest="platform_command", required=True, metavar="ACTION")
    s = psub.add_parser("status", help="firmware version, state, owner, guests, chip ID (= show all)",
                        epilog="example:\n  sevemu platform status --json")
    _show_args(s, positional=False)
    _add_commands(sub, under_platform=False)
    _add_commands(psub, under_platform=True)


def _add_commands(sub: Any, *, under_platform: bool) -> None:
    s = sub.add_parser("show", help="flags, guests, identifier or version of the platform",
                       epilog=_EXAMPLES["show"])
    _show_args(s, positional=True)

    e = sub.add_parser("export", help="the platform's certificate chain, as sevctl exports it",
                       epilog=_EXAMPLES["export"] if not under_platform else
                       "example:\n  sevemu platform export --full certs/     one file per certificate "
                       "(sevemu export writes sevctl's chain file)")
    add_platform_args(e)
    e.add_argument("dest", nargs="?", default=".",
                   help="chain file, or a directory for one file per certificate (default .)")
    e.add_argument("-f", "--full", action="store_true", help="also the manufacturer's ASK and ARK")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    # `platform export DEST` always wrote a directory of files; the sevctl form writes one file
    e.set_defaults(func=run_export, dest_is_dir=under_platform)

    r = sub.add_parser("reset", help="FACTORY_RESET: new self-owned OCA, PEK and PDH", epilog=_EXAMPLES["reset"])
    add_platform_args(r)
    r.set_defaults(func=run_reset)

    o = sub.add_parser("rotate", help="PDH_GEN: a new PDH (the PEK stays)", epilog=_EXAMPLES["rotate"])
    add_platform_args(o)
    o.set_defaults(func=run_rotate)

    v = sub.add_parser("provision", help="take ownership: PEK_CSR, sign with the OCA key, PEK_CERT_IMPORT",
                       epilog=_EXAMPLES["provision"])
    add_platform_args(v)
    v.add_argument("cert", type=Path, nargs="?", help="the owner's OCA certificate")
    v.add_argument("key", type=Path, nargs="?", help="its P-384 private key (DER as sevctl writes it, or PEM)")
    v.add_argument("--oca-cert", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    v.add_argument("--oca-key", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    v.set_defaults(func=run_provision)

    g = sub.add_parser("generate", help="a new self-signed OCA certificate and its key (no platform)",
                       epilog=_EXAMPLES["generate"])
    g.add_argument("cert", type=Path, help="where to write the OCA certificate")
    g.add_argument("key", type=Path, help="where to write the private key (DER as sevctl writes it, mode 0600)")
    add_force(g)
    g.set_defaults(func=run_generate)

    f = sub.add_parser("verify", help="verify a platform's certificate chain up to a trusted ARK",
                       epilog=_EXAMPLES["verify"])
    add_platform_args(f)
    f.add_argument("certs", type=Path, nargs="?", metavar="CERTS",
                   help=f"a chain file, or a directory with {', '.join(CERT_FILES)} (default: the platform's)")
    f.add_argument("--sev", type=Path, metavar="FILE", help="the SEV chain (PDH PEK OCA CEK [ASK ARK]) from FILE")
    f.add_argument("--oca", type=Path, metavar="FILE", help="the OCA certificate from FILE")
    f.add_argument("--ca", type=Path, metavar="FILE", help="the CA chain (ASK ARK) from FILE")
    trust = f.add_mutually_exclusive_group()
    trust.add_argument("--emulated-ark", type=Path, metavar="FILE", help="trust this (emulated) ARK")
    trust.add_argument("--emulated", action="store_true",
                       help="trust the ARK of the platform directory's (emulated) manufacturer")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=run_verify)


def _show_args(s: argparse.ArgumentParser, *, positional: bool) -> None:
    add_platform_args(s)
    if positional:
        s.add_argument("what", nargs="?", choices=SHOW_WHAT, default="all",
                       help="flags (owned, es), guests, identifier, version, or all (default)")
    else:
        s.set_defaults(what="all")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_show)


# ---- /dev/sev helpers ----------------------------------------------------------------------
def export_pdh(plat: Platform) -> tuple[SevCert, SevCertChain]:
    """PDH and PEK || OCA || CEK through /dev/sev (length query first, as sevctl does)."""
    query = SevUserDataPdhCertExport()
    plat.dev.ioctl_raw(SevUserCmd.PDH_CERT_EXPORT, query)
    data = SevUserDataPdhCertExport(bytearray(query.pdh_cert_len or SEV_CERT_SIZE),
                                    query.pdh_cert_len or SEV_CERT_SIZE,
                                    bytearray(query.cert_chain_len or SEV_CERT_CHAIN_SIZE),
                                    query.cert_chain_len or SEV_CERT_CHAIN_SIZE)
    plat.dev.issue(SevUserCmd.PDH_CERT_EXPORT, data)
    if not isinstance(data.pdh_cert_address, bytearray) or not isinstance(data.cert_chain_address, bytearray):
        raise FileFormatError("PDH_CERT_EXPORT returned no certificates")
    pdh = SevCert.decode(bytes(data.pdh_cert_address[: data.pdh_cert_len]))
    chain = SevCertChain.decode(bytes(data.cert_chain_address[: data.cert_chain_len]))
    return pdh, chain


def chip_id(plat: Platform) -> bytes:
    query = SevUserDataGetId2()
    plat.dev.ioctl_raw(SevUserCmd.GET_ID2, query)
    data = SevUserDataGetId2(bytearray(query.length), query.length)
    plat.dev.issue(SevUserCmd.GET_ID2, data)
    if not isinstance(data.address, bytearray):
        raise FileFormatError("GET_ID2 returned no identifier")
    return bytes(data.address[: data.length])


def platform_status(plat: Platform) -> SevUserDataStatus:
    st = SevUserDataStatus()
    plat.dev.issue(SevUserCmd.PLATFORM_STATUS, st)
    return st


# ---- commands ------------------------------------------------------------------------------
def run_show(args: argparse.Namespace) -> int:
    with open_platform(args) as plat:
        # as the PSP driver does at probe (Linux before 6.15: psp_init_on_probe): INIT, so that the
        # firmware reports its owner and ES configuration
        plat.dev.check("INIT", plat.dev.platform_init(), 0)
        st = platform_status(plat)
        ident = chip_id(plat)
    owner = "external" if st.flags & LINUX_STATUS_FLAGS_OWNER else "self"
    es = bool(st.flags & LINUX_STATUS_FLAGS_CONFIG_ES)
    flags = [name for name, on in (("owned", owner == "external"), ("es", es)) if on]
    result: dict[str, Any] = {
        "generation": plat.generation,
        "platform_dir": str(plat.directory),
        "api_major": st.api_major,
        "api_minor": st.api_minor,
        "build": st.build,
        "version": f"{st.api_major}.{st.api_minor}.{st.build}",
        "state": PlatformState(st.state).name,
        "owner": owner,
        "config_es": es,
        "flags": flags,
        "guests": st.guest_count,
        "chip_id": ident.hex(),
    }
    what = args.what
    # sevctl show: flags one per line, guests a number, the identifier in upper-case hex, the
    # version as major.minor.build
    lines = {
        "flags": flags,
        "guests": [str(st.guest_count)],
        "identifier": [ident.hex().upper()],
        "version": [result["version"]],
        "all": [
            f"platform     {plat.generation} at {plat.directory}",
            f"firmware     API {st.api_major}.{st.api_minor}, build {st.build}",
            f"state        {result['state']}",
            f"owner        {'externally owned' if owner == 'external' else 'self-owned'}",
            f"SEV-ES       {'enabled' if es else 'not enabled'} by INIT",
            f"guests       {st.guest_count}",
            f"chip ID      {ident.hex()}",
        ],
    }[what]
    if what != "all":
        keys = {"flags": ("flags",), "guests": ("guests",), "identifier": ("chip_id",),
                "version": ("api_major", "api_minor", "build", "version")}[what]
        result = {k: result[k] for k in keys}
    emit(args, result, lines)
    return 0


def run_export(args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    as_dir = args.dest_is_dir or dest.is_dir() or args.dest.endswith("/")
    outputs = Outputs()
    names = CERT_FILES if args.full else CERT_FILES[:4]
    if as_dir:
        for name in names:
            outputs.add(dest / name, name)
    else:
        outputs.add(dest, "the chain file")
    with open_platform(args) as plat:
        pdh, chain = export_pdh(plat)
    amd = platform_amd_chain(plat.directory) if args.full else None
    if as_dir:
        blobs = [pdh.encode(), chain.pek.encode(), chain.oca.encode(), chain.cek.encode()]
        if amd is not None:
            blobs += [amd.ask.encode(), amd.ark.encode()]
        written = [str(outputs.write(dest / name, blob)) for name, blob in zip(names, blobs, strict=True)]
    else:
        written = [str(outputs.write(dest, ChainFile(pdh, chain.pek, chain.oca, chain.cek, amd).encode()))]
    content = "PDH PEK OCA CEK" + (" ASK ARK" if amd is not None else "")
    emit(args, {"generation": plat.generation, "full": bool(args.full), "files": written},
         [f"wrote {path}" for path in written] + ([f"  ({content})"] if not as_dir else []))
    return 0


def run_reset(args: argparse.Namespace) -> int:
    with open_platform(args) as plat:
        plat.dev.issue(SevUserCmd.FACTORY_RESET)
    print(f"{plat.directory}: platform reset (new self-owned OCA, PEK and PDH)")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    with open_platform(args) as plat:
        plat.dev.issue(SevUserCmd.PDH_GEN)
    print(f"{plat.directory}: new PDH generated (export it again for new sessions)")
    return 0


def _load_oca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The OCA private key: DER (what sevctl generate writes; SEC1 or PKCS#8) or PEM, unencrypted."""
    data = read_file(path)
    load = serialization.load_pem_private_key if data.lstrip().startswith(b"-----") else \
        serialization.load_der_private_key
    try:
        key = load(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(f"{path}: not an unencrypted private key (DER or PEM): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FileFormatError(f"{path}: the OCA key must be an EC P-384 private key")
    return key


def _pair(args: argparse.Namespace) -> tuple[Path, Path]:
    cert = args.cert or args.oca_cert
    key = args.key or args.oca_key
    if (args.cert and args.oca_cert) or (args.key and args.oca_key):
        raise InputError("give the OCA certificate and key once (CERT KEY, or --oca-cert/--oca-key)")
    if cert is None or key is None:
        raise InputError("provision needs the OCA certificate and its key: sevemu provision CERT KEY")
    return cert, key


def run_provision(args: argparse.Namespace) -> int:
    cert_path, key_path = _pair(args)
    oca = read_sev_cert(cert_path, KeyUsage.OCA)
    key = _load_oca_key(key_path)
    if oca.algo not in ECDSA_ALGOS:
        raise FileFormatError(f"{cert_path}: an OCA with algorithm {oca.algo.name}, expected ECDSA")
    public = oca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            public.public_numbers() != key.public_key().public_numbers():
        raise InputError(f"{key_path} is not the key of {cert_path}")
    with open_platform(args) as plat:
        csr_buf = SevUserDataPekCsr(bytearray(SEV_CERT_SIZE), SEV_CERT_SIZE)
        plat.dev.issue(SevUserCmd.PEK_CSR, csr_buf)
        if not isinstance(csr_buf.address, bytearray):
            raise FileFormatError("PEK_CSR returned no certificate")
        csr = SevCert.decode(bytes(csr_buf.address))
        pek = csr.sign_with(key, KeyUsage.OCA, oca.algo, slot=1)
        pek_blob, oca_blob = pek.encode(), oca.encode()
        plat.dev.issue(SevUserCmd.PEK_CERT_IMPORT,
                       SevUserDataPekCertImport(pek_blob, len(pek_blob), oca_blob, len(oca_blob)))
    print(f"{plat.directory}: platform now owned by the OCA of {cert_path} "
          "(PEK signed by it and by the CEK)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    outputs = Outputs(force=args.force)
    outputs.add(args.cert, "the OCA certificate", protect=True)
    outputs.add(args.key, "the OCA private key", secret=True)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, key.public_key()).sign_with(
        key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256, slot=1)
    # the key as sevctl writes it (OpenSSL's i2d_PrivateKey of an EC key: SEC1 DER)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    outputs.write(args.cert, cert.encode())
    outputs.write(args.key, der)
    print(f"wrote {args.cert} (self-signed OCA, P-384) and {args.key}")
    return 0


# ---- verify ----------------------------------------------------------------------------------
# the checks of PlatformChain.verify, in its order; a ChainError names one of them
_STEPS = ("ARK", "ARK <- ARK", "ASK", "ASK <- ARK", "CEK", "CEK <- ASK", "OCA", "OCA <- OCA", "PEK",
          "PEK <- CEK", "PEK <- OCA", "PDH", "PDH <- PEK")
_LINKS = ("ARK", "ASK <- ARK", "CEK <- ASK", "OCA <- OCA", "PEK <- CEK", "PEK <- OCA", "PDH <- PEK")


def _chain_from_dir(directory: Path) -> tuple[ChainFile, AmdCertChain | None]:
    certs = {name: directory / name for name in CERT_FILES}
    missing = [name for name, path in certs.items() if not path.exists()]
    if missing:
        raise FileFormatError(f"{directory}: missing {', '.join(missing)} "
                              "(sevemu export --full DIR writes them)")
    sev = ChainFile(
        pdh=read_sev_cert(certs["pdh.cert"], KeyUsage.PDH),
        pek=read_sev_cert(certs["pek.cert"], KeyUsage.PEK),
        oca=read_sev_cert(certs["oca.cert"], KeyUsage.OCA),
        cek=read_sev_cert(certs["cek.cert"], KeyUsage.CEK),
    )
    return sev, AmdCertChain(read_amd_cert(certs["ask.cert"]), read_amd_cert(certs["ark.cert"], allow_unsigned=True))


def _chain_to_verify(args: argparse.Namespace) -> tuple[PlatformChain, str]:
    if args.certs is not None and args.sev is not None:
        raise InputError("give the SEV chain once: CERTS or --sev FILE")
    source_path: Path | None = args.sev or args.certs
    amd: AmdCertChain | None
    if source_path is None:
        with open_platform(args) as plat:
            pdh, sev = export_pdh(plat)
        chain = ChainFile(pdh, sev.pek, sev.oca, sev.cek)
        amd = None
        source = f"platform at {plat.directory}"
    elif source_path.is_dir():
        chain, amd = _chain_from_dir(source_path)
        source = str(source_path)
    else:
        chain = read_chain_file(source_path)
        amd = chain.amd
        source = str(source_path)
    if args.oca is not None:
        chain = ChainFile(chain.pdh, chain.pek, read_sev_cert(args.oca, KeyUsage.OCA), chain.cek, chain.amd)
    if args.ca is not None:
        amd = read_ca_file(args.ca)
    if amd is None:
        if source_path is not None and not args.emulated:
            raise InputError(f"{source_path} holds no ASK || ARK: give --ca FILE, a chain exported with "
                             "--full, or --emulated (the platform directory's manufacturer)")
        amd = platform_amd_chain(resolve_platform(args)[1])
    return PlatformChain(chain.pdh, chain.pek, chain.oca, chain.cek, amd.ask, amd.ark), source


def run_verify(args: argparse.Namespace) -> int:
    chain, source = _chain_to_verify(args)
    pins: tuple[PinnedArk, ...]
    if args.emulated_ark is not None:
        ark = read_amd_cert(args.emulated_ark, allow_unsigned=True)
        pins = (PinnedArk.from_cert(args.generation or "emulated", ark, emulated=True),)
        trust = f"emulated ARK {args.emulated_ark}"
    elif args.emulated:
        generation, directory = resolve_platform(args)
        pins = (PinnedArk.from_cert(generation, platform_amd_chain(directory).ark, emulated=True),)
        trust = f"the emulated {generation} ARK of {directory}"
    else:
        pins = AMD_ARKS
        trust = "AMD's real ARKs (pinned)"
    try:
        pin = chain.verify(pins)
    except ChainError as exc:
        hint = ""
        if isinstance(exc, UntrustedRootError) and not (args.emulated or args.emulated_ark):
            hint = " (an emulated platform's chain: pass --emulated or --emulated-ark FILE)"
        failed = exc.link
        done = _STEPS[: _STEPS.index(failed)] if failed in _STEPS else ()
        lines = [f"verifying the chain of {source} against {trust}:"]
        lines += [f"  ok     {link}" for link in _LINKS if link in done]
        lines.append(f"  FAILED {failed}: {exc.reason}{hint}")
        emit(args, {"ok": False, "source": source, "trust": trust, "link": failed, "reason": exc.reason}, lines)
        return 1
    kind = "emulated" if pin.emulated else "AMD"
    lines = [f"verifying the chain of {source} against {trust}:"]
    lines += [f"  ok     {link}" for link in _LINKS]
    lines.append(f"chain OK: {kind} {pin.generation} ARK {pin.key_id.hex()}")
    emit(args, {"ok": True, "source": source, "trust": trust, "ark_generation": pin.generation,
                "ark_key_id": pin.key_id.hex(), "emulated": pin.emulated}, lines)
    return 0
