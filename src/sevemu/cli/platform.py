"""``sevemu platform ...`` and ``sevemu verify``: the platform owner's commands, in the manner of
virtee/sevctl (``show``, ``export``, ``reset``, ``rotate``, ``provision``, ``generate``, ``verify``).

Each command boots the platform from its directory (fuses, factory data, NV store;
:func:`sevemu.cli.common.open_platform`) and talks to the firmware through ``/dev/sev``
(:class:`~sevemu.hypervisor.sevdev.SevDevice`) exactly as sevctl does on Linux: PLATFORM_STATUS,
GET_ID2, PDH_CERT_EXPORT, FACTORY_RESET, PDH_GEN, PEK_CSR + PEK_CERT_IMPORT.  Changes persist in the
platform directory.

``verify`` checks a platform's chain ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH
(:meth:`sevemu.certs.chain.PlatformChain.verify`) from a directory of certificate files or straight
from the platform.  The ARK must be one of AMD's real ARKs (pinned) unless an emulated ARK is trusted
explicitly: ``--emulated-ark FILE`` or ``--emulated`` (the ARK of the platform directory's
manufacturer).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.abi.sev import LINUX_STATUS_FLAGS_CONFIG_ES, LINUX_STATUS_FLAGS_OWNER
from sevemu.abi.states import PlatformState
from sevemu.certs.chain import PlatformChain, SevCertChain
from sevemu.certs.errors import ChainError, UntrustedRootError
from sevemu.certs.roots import AMD_ARKS, PinnedArk
from sevemu.certs.sev import ECDSA_ALGOS, SevCert
from sevemu.cli.common import (
    Platform,
    add_platform_args,
    emit,
    open_platform,
    platform_amd_chain,
    read_amd_cert,
    read_file,
    read_sev_cert,
    resolve_platform,
    write_file,
)
from sevemu.errors import FileFormatError, InputError
from sevemu.hypervisor.sevdev import (
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
    SevUserDataStatus,
)

__all__ = ["CERT_FILES", "register"]

CERT_FILES = ("pdh.cert", "pek.cert", "oca.cert", "cek.cert", "ask.cert", "ark.cert")
"""File names of ``export --full`` and of a ``verify`` certificate directory."""


def register(sub: Any) -> None:
    p = sub.add_parser("platform", help="the SEV platform: status, export, reset, rotate, provision")
    psub = p.add_subparsers(dest="platform_command", required=True, metavar="ACTION")

    s = psub.add_parser("status", help="firmware version, state, owner, guests, chip ID")
    add_platform_args(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_status)

    e = psub.add_parser("export", help="write the PDH certificate (and with --full the whole chain)")
    add_platform_args(e)
    e.add_argument("dest", type=Path, nargs="?", default=Path("."), help="directory (default .)")
    e.add_argument("--full", action="store_true", help="also PEK, OCA, CEK, ASK and ARK")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=run_export)

    r = psub.add_parser("reset", help="FACTORY_RESET: new self-owned OCA, PEK and PDH")
    add_platform_args(r)
    r.set_defaults(func=run_reset)

    o = psub.add_parser("rotate", help="PDH_GEN: a new PDH (the PEK stays)")
    add_platform_args(o)
    o.set_defaults(func=run_rotate)

    v = psub.add_parser("provision", help="take ownership: PEK_CSR, sign with the OCA key, PEK_CERT_IMPORT")
    add_platform_args(v)
    v.add_argument("--oca-cert", type=Path, required=True, metavar="FILE", help="the owner's OCA certificate")
    v.add_argument("--oca-key", type=Path, required=True, metavar="FILE", help="its P-384 private key (PEM)")
    v.set_defaults(func=run_provision)

    g = psub.add_parser("generate", help="a new self-signed OCA certificate and its key (no platform)")
    g.add_argument("cert", type=Path, help="where to write the OCA certificate")
    g.add_argument("key", type=Path, help="where to write the private key (PEM, mode 0600)")
    g.set_defaults(func=run_generate)

    f = sub.add_parser("verify", help="verify a platform's certificate chain up to a trusted ARK")
    add_platform_args(f)
    f.add_argument("certs", type=Path, nargs="?", metavar="CERT_DIR",
                   help=f"directory with {', '.join(CERT_FILES)} (default: export from the platform)")
    trust = f.add_mutually_exclusive_group()
    trust.add_argument("--emulated-ark", type=Path, metavar="FILE", help="trust this (emulated) ARK")
    trust.add_argument("--emulated", action="store_true",
                       help="trust the ARK of the platform directory's (emulated) manufacturer")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=run_verify)


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
    assert isinstance(data.pdh_cert_address, bytearray) and isinstance(data.cert_chain_address, bytearray)
    pdh = SevCert.decode(bytes(data.pdh_cert_address[: data.pdh_cert_len]))
    chain = SevCertChain.decode(bytes(data.cert_chain_address[: data.cert_chain_len]))
    return pdh, chain


def chip_id(plat: Platform) -> bytes:
    query = SevUserDataGetId2()
    plat.dev.ioctl_raw(SevUserCmd.GET_ID2, query)
    data = SevUserDataGetId2(bytearray(query.length), query.length)
    plat.dev.issue(SevUserCmd.GET_ID2, data)
    assert isinstance(data.address, bytearray)
    return bytes(data.address[: data.length])


def platform_status(plat: Platform) -> SevUserDataStatus:
    st = SevUserDataStatus()
    plat.dev.issue(SevUserCmd.PLATFORM_STATUS, st)
    return st


# ---- commands ------------------------------------------------------------------------------
def run_status(args: argparse.Namespace) -> int:
    with open_platform(args) as plat:
        # as the PSP driver does at probe (Linux before 6.15: psp_init_on_probe): INIT, so that the
        # firmware reports its owner and ES configuration
        plat.dev.check("INIT", plat.dev.platform_init(), 0)
        st = platform_status(plat)
        ident = chip_id(plat)
    owner = "external" if st.flags & LINUX_STATUS_FLAGS_OWNER else "self"
    result = {
        "generation": plat.generation,
        "platform_dir": str(plat.directory),
        "api_major": st.api_major,
        "api_minor": st.api_minor,
        "build": st.build,
        "state": PlatformState(st.state).name,
        "owner": owner,
        "config_es": bool(st.flags & LINUX_STATUS_FLAGS_CONFIG_ES),
        "guests": st.guest_count,
        "chip_id": ident.hex(),
    }
    emit(args, result, [
        f"platform     {plat.generation} at {plat.directory}",
        f"firmware     API {st.api_major}.{st.api_minor}, build {st.build}",
        f"state        {result['state']}",
        f"owner        {'externally owned' if owner == 'external' else 'self-owned'}",
        f"SEV-ES       {'enabled' if result['config_es'] else 'not enabled'} by INIT",
        f"guests       {st.guest_count}",
        f"chip ID      {ident.hex()}",
    ])
    return 0


def run_export(args: argparse.Namespace) -> int:
    with open_platform(args) as plat:
        pdh, chain = export_pdh(plat)
    files = {"pdh.cert": pdh.encode()}
    if args.full:
        amd = platform_amd_chain(plat.directory)
        files.update({"pek.cert": chain.pek.encode(), "oca.cert": chain.oca.encode(),
                      "cek.cert": chain.cek.encode(), "ask.cert": amd.ask.encode(), "ark.cert": amd.ark.encode()})
    written = [str(write_file(args.dest / name, data)) for name, data in files.items()]
    emit(args, {"generation": plat.generation, "files": written},
         [f"wrote {path}" for path in written])
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
    data = read_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FileFormatError(f"{path}: the OCA key must be an EC P-384 private key")
    return key


def run_provision(args: argparse.Namespace) -> int:
    oca = read_sev_cert(args.oca_cert, KeyUsage.OCA)
    key = _load_oca_key(args.oca_key)
    if oca.algo not in ECDSA_ALGOS:
        raise FileFormatError(f"{args.oca_cert}: an OCA with algorithm {oca.algo.name}, expected ECDSA")
    public = oca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            public.public_numbers() != key.public_key().public_numbers():
        raise InputError(f"{args.oca_key} is not the key of {args.oca_cert}")
    with open_platform(args) as plat:
        csr_buf = SevUserDataPekCsr(bytearray(SEV_CERT_SIZE), SEV_CERT_SIZE)
        plat.dev.issue(SevUserCmd.PEK_CSR, csr_buf)
        assert isinstance(csr_buf.address, bytearray)
        csr = SevCert.decode(bytes(csr_buf.address))
        pek = csr.sign_with(key, KeyUsage.OCA, oca.algo, slot=1)
        pek_blob, oca_blob = pek.encode(), oca.encode()
        plat.dev.issue(SevUserCmd.PEK_CERT_IMPORT,
                       SevUserDataPekCertImport(pek_blob, len(pek_blob), oca_blob, len(oca_blob)))
    print(f"{plat.directory}: platform now owned by the OCA of {args.oca_cert} "
          "(PEK signed by it and by the CEK)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, key.public_key()).sign_with(
        key, KeyUsage.OCA, SigAlgo.ECDSA_SHA256, slot=1)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_file(args.cert, cert.encode())
    write_file(args.key, pem, secret=True)
    print(f"wrote {args.cert} (self-signed OCA, P-384) and {args.key}")
    return 0


# ---- verify ----------------------------------------------------------------------------------
# the checks of PlatformChain.verify, in its order; a ChainError names one of them
_STEPS = ("ARK", "ARK <- ARK", "ASK", "ASK <- ARK", "CEK", "CEK <- ASK", "OCA", "OCA <- OCA", "PEK",
          "PEK <- CEK", "PEK <- OCA", "PDH", "PDH <- PEK")
_LINKS = ("ARK", "ASK <- ARK", "CEK <- ASK", "OCA <- OCA", "PEK <- CEK", "PEK <- OCA", "PDH <- PEK")


def _chain_from_dir(directory: Path) -> PlatformChain:
    if not directory.is_dir():
        raise FileFormatError(f"{directory}: not a directory of certificate files")
    certs = {name: directory / name for name in CERT_FILES}
    missing = [name for name, path in certs.items() if not path.exists()]
    if missing:
        raise FileFormatError(f"{directory}: missing {', '.join(missing)} (sevemu platform export --full writes them)")
    return PlatformChain(
        pdh=read_sev_cert(certs["pdh.cert"], KeyUsage.PDH),
        pek=read_sev_cert(certs["pek.cert"], KeyUsage.PEK),
        oca=read_sev_cert(certs["oca.cert"], KeyUsage.OCA),
        cek=read_sev_cert(certs["cek.cert"], KeyUsage.CEK),
        ask=read_amd_cert(certs["ask.cert"]),
        ark=read_amd_cert(certs["ark.cert"], allow_unsigned=True),
    )


def run_verify(args: argparse.Namespace) -> int:
    source: str
    if args.certs is not None:
        chain = _chain_from_dir(args.certs)
        source = str(args.certs)
    else:
        with open_platform(args) as plat:
            pdh, sev = export_pdh(plat)
        amd = platform_amd_chain(plat.directory)
        chain = PlatformChain(pdh, sev.pek, sev.oca, sev.cek, amd.ask, amd.ark)
        source = f"platform at {plat.directory}"
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
