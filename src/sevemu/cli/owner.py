"""The guest owner's commands, as virtee/sevctl has them: ``session``, ``measurement build`` (and our
``measurement verify``), ``secret build`` and ``validate``.

None of them touches a platform: they work on files the platform owner or the hypervisor hands over
(the PDH certificate or chain, the LAUNCH_MEASURE blob, an attestation report) and produce files for
them (GODH certificate, session buffer, LAUNCH_SECRET header and payload), so the owner can run
them anywhere.  File formats and option names are sevctl's (virtee/sevctl ``src/session.rs``,
``src/measurement.rs``, ``src/secret.rs``, ``src/validate.rs``):

* ``session [--name NAME] PDH POLICY``: ``NAME_godh.b64`` and ``NAME_session.b64`` (the 0x824-byte
  GODH certificate and the 0x80-byte session buffer, base64, what QEMU's ``sev-guest`` object reads
  from ``dh-cert-file`` and ``session-file``), ``NAME_tek.bin`` and ``NAME_tik.bin`` (the 16-byte
  transport keys, raw, mode 0600 -- keep them).  NAME defaults to ``vm``.  PDH may be the PDH
  certificate or a chain file (``export``), whose first certificate is the PDH.
* ``measurement build``: the LAUNCH_MEASURE blob (MEASURE || MNONCE, 0x30 bytes) a firmware with
  the given version, policy and launch digest returns, printed in base64 or written raw with
  ``--outfile``; ``measurement verify`` checks a blob the host relayed against the same inputs.
* ``secret build``: an OVMF secret table of ``--secret GUID:FILE`` entries, encrypted with the TEK and
  MACed with the TIK over that launch's MEASURE, written as the 0x34-byte packet header and the
  payload (both raw).
* ``validate CHAIN REPORT``: the PEK of a chain file signed a legacy ATTESTATION report.

Values sevctl takes as "path or base64" (``--tik``, ``--tek``, ``--nonce``, ``--launch-measure-blob``)
are a file (raw, hex or base64 inside) or the value inline in base64 (or hex);
``--launch-digest`` is inline base64 (or hex).

The launch digest of ``--firmware FILE`` follows the one padding rule of the project
(:func:`sevemu.owner.measurement.padded_image`): an image is loaded into whole 4 KiB pages and
measured with its zero padding -- as ``sevemu launch`` and ``sevemu vmm`` load it.  Firmware volumes
are whole pages already, so for them this is the file's own hash, as sevctl computes it.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.policy import check_policy
from sevemu.abi.sev import LegacyAttestationReport, MeasureBuf
from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.cli.common import (
    Outputs,
    add_force,
    emit,
    names_a_file,
    parse_guid,
    parse_int,
    pdh_public_key,
    read_blob,
    read_file,
    read_value,
)
from sevemu.cli.vmsa import (
    MAX_VCPUS,
    add_vcpu_args,
    cpu_signature_of,
    features_of,
    vcpu_given,
    vm_options_given,
    vm_type_of,
)
from sevemu.crypto.transport import KEY_SIZE, MeasureMacError, TransportKeys, measure_mac
from sevemu.errors import FileFormatError, InputError, LayoutError, VerificationError
from sevemu.owner.measurement import LaunchDigest, kernel_hashes_table, padded_image, verify_measurement
from sevemu.owner.report import verify_attestation_report
from sevemu.owner.secret import MAX_SECRET_SIZE, package_secret, secret_table
from sevemu.owner.session import LaunchSession
from sevemu.owner.vmsa import ovmf_vmsa_pages

__all__ = ["expected_digest", "parse_secrets", "register"]

DIGEST_SIZE = 32
NONCE_SIZE = 16
POLICY_ES = 0x4
"""Guest policy bit 2: SEV-ES required (SEV API 55766, guest policy)."""
_SECRET_API_DEFAULT = (0, 17)
"""When ``secret build`` is given no API version: the packet form of API >= 0.17 (MEASURE bound into
the MAC), the only one sevctl builds."""


_SESSION_EPILOG = """\
examples:
  sevemu export pdh.cert && sevemu session pdh.cert 0x1      vm_godh.b64 vm_session.b64 vm_tek.bin vm_tik.bin
  sevemu session --name guest1 --out owner/ chain.cert 0x3"""
_BUILD_EPILOG = """\
examples:
  sevemu measurement build --api-major 1 --api-minor 51 --build-id 3 --policy 0x1 \\
      --firmware OVMF.fd --tik vm_tik.bin --launch-measure-blob measure.b64
  sevemu measurement build ... --launch-digest BASE64 --nonce BASE64 --outfile expected.bin
  sevemu measurement build --api-major 1 --api-minor 51 --build-id 3 --policy 0x1 --firmware OVMF.fd
      (no --tik: prints the launch digest only)
  sevemu measurement build --api-major 1 --api-minor 51 --build-id 3 --policy 0x5 --firmware OVMF.fd \
      --num-cpus 4 --vcpu-type EPYC-Milan          (SEV-ES: QEMU -cpu EPYC-Milan -smp 4)
  sevemu measurement build ... --policy 0x5 --num-cpus 4 --vmsa-cpu0 vmsa0.bin --vmsa-cpu1 vmsa1.bin"""
_VERIFY_EPILOG = """\
example:
  sevemu measurement verify --launch-measure-blob measure.b64 --tik vm_tik.bin --firmware OVMF.fd \\
      --api-major 1 --api-minor 51 --build-id 3 --policy 0x1
  sevemu measurement verify ... --policy 0x5 --num-cpus 2 --vcpu-type EPYC-Genoa --vm-type legacy"""
_SECRET_EPILOG = """\
example:
  sevemu secret build --tek vm_tek.bin --tik vm_tik.bin --launch-measure-blob measure.b64 \\
      --secret 736869e5-84f0-4973-92ec-06879ce3da0b:passphrase.txt secret_header.bin secret_payload.bin"""
_VALIDATE_EPILOG = """\
example:
  sevemu validate chain.cert report.bin      (chain from sevemu export, report from the VMM)"""


def register(sub: Any) -> None:
    s = sub.add_parser("session", help="a launch session for a platform's PDH (owner)",
                       description="Build a launch session for the platform whose PDH is given, as "
                                   "sevctl session: NAME_godh.b64, NAME_session.b64 for the host, "
                                   "NAME_tek.bin, NAME_tik.bin for the owner.", epilog=_SESSION_EPILOG)
    s.add_argument("pdh_pos", nargs="?", type=Path, metavar="PDH", help="the PDH certificate, or a chain file")
    s.add_argument("policy_pos", nargs="?", metavar="POLICY", help="guest policy (e.g. 0x1 = NODBG)")
    s.add_argument("-n", "--name", default="vm", help="prefix of the files written (default vm)")
    s.add_argument("--pdh", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    s.add_argument("--policy", help=argparse.SUPPRESS)
    s.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="directory (default .)")
    add_force(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_session)

    m = sub.add_parser("measurement", help="predict or check a LAUNCH_MEASURE (owner)")
    msub = m.add_subparsers(dest="measurement_command", required=True, metavar="ACTION")
    b = msub.add_parser("build", help="the LAUNCH_MEASURE blob the expected launch gives (sevctl)",
                        epilog=_BUILD_EPILOG)
    v = msub.add_parser("verify", help="check a LAUNCH_MEASURE blob against the expected launch",
                        epilog=_VERIFY_EPILOG)
    for p in (b, v):
        _launch_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--tik", metavar="PATH|BASE64", help="the session's TIK (without it: the launch digest only)")
    nonce = b.add_mutually_exclusive_group()
    nonce.add_argument("--nonce", "--mnonce", dest="nonce", metavar="PATH|BASE64",
                       help="the firmware's MNONCE (16 bytes)")
    nonce.add_argument("--launch-measure-blob", metavar="PATH|BASE64",
                       help="take the MNONCE from this LAUNCH_MEASURE blob")
    b.add_argument("--outfile", type=Path, metavar="FILE", help="write the blob (raw) to FILE instead of base64")
    b.set_defaults(func=run_measurement_build)
    v.add_argument("--launch-measure-blob", "--measurement", dest="launch_measure_blob", required=True,
                   metavar="PATH|BASE64", help="the 0x30-byte LAUNCH_MEASURE blob the host relayed")
    v.add_argument("--tik", required=True, metavar="PATH|BASE64", help="the session's TIK")
    v.set_defaults(func=run_measurement_verify)

    c = sub.add_parser("secret", help="package secrets for LAUNCH_SECRET (owner)")
    csub = c.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    sb = csub.add_parser("build", help="an OVMF secret table sealed for one measured launch",
                         epilog=_SECRET_EPILOG)
    sb.add_argument("--secret", action="append", required=True, metavar="GUID:FILE",
                    help="a secret entry (repeatable, in table order)")
    sb.add_argument("--tek", required=True, metavar="PATH|BASE64", help="the session's TEK")
    sb.add_argument("--tik", required=True, metavar="PATH|BASE64", help="the session's TIK")
    sb.add_argument("--launch-measure-blob", "--measurement", dest="launch_measure_blob", required=True,
                    metavar="PATH|BASE64", help="the LAUNCH_MEASURE blob the secret is bound to")
    sb.add_argument("--api-major", help="firmware API major (default: a firmware of API >= 0.17, as sevctl)")
    sb.add_argument("--api-minor", help="firmware API minor")
    sb.add_argument("--iv", metavar="BASE64", help=argparse.SUPPRESS)
    sb.add_argument("header", type=Path, help="where to write the 0x34-byte packet header")
    sb.add_argument("payload", type=Path, help="where to write the encrypted secret table")
    sb.add_argument("--json", action="store_true", help="machine-readable output")
    sb.set_defaults(func=run_secret_build)

    va = sub.add_parser("validate", help="check that a chain's PEK signed a legacy ATTESTATION report",
                        epilog=_VALIDATE_EPILOG)
    va.add_argument("chain", type=Path, help="the SEV chain file (sevemu export)")
    va.add_argument("report", type=Path, help="the 0xD0-byte attestation report (raw or base64)")
    va.add_argument("--mnonce", metavar="PATH|BASE64", help="also check the report's MNONCE")
    va.add_argument("--launch-digest", metavar="BASE64", help="also check the report's launch digest")
    va.add_argument("--policy", help="also check the report's policy")
    va.add_argument("--json", action="store_true", help="machine-readable output")
    va.set_defaults(func=run_validate)


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-major", required=True, help="firmware API major (int or hex; sevemu show version)")
    p.add_argument("--api-minor", required=True, help="firmware API minor")
    p.add_argument("--build-id", "--build", dest="build_id", required=True, help="firmware build")
    p.add_argument("--policy", required=True, help="the guest policy")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--firmware", "--image", dest="firmware", type=Path, action="append", metavar="FILE",
                      help="the firmware (and further regions, repeatable) given to LAUNCH_UPDATE_DATA, in order")
    what.add_argument("--launch-digest", "--digest", dest="launch_digest", metavar="BASE64",
                      help="the expected launch digest itself (32 bytes, base64 or hex)")
    p.add_argument("--kernel", type=Path, metavar="FILE", help="append QEMU's kernel-hashes table")
    p.add_argument("--initrd", type=Path, metavar="FILE", help="(with --kernel)")
    p.add_argument("--cmdline", help="(with --kernel)")
    es = p.add_argument_group("SEV-ES (policy bit 0x4): the vCPUs, one VMSA page each after the images",
                              "--num-cpus N with the vCPU model (QEMU's -cpu), or with sevctl's VMSA files")
    es.add_argument("--num-cpus", "--vcpus", dest="num_cpus", type=_num_cpus, metavar="N", help="number of vCPUs")
    add_vcpu_args(es)
    es.add_argument("--vmsa-cpu0", type=Path, metavar="FILE", help="the boot vCPU's VMSA page (sevemu vmsa build)")
    es.add_argument("--vmsa-cpu1", type=Path, metavar="FILE", help="the other vCPUs' VMSA page")


# ---- shared ----------------------------------------------------------------------------------
def _policy(text: str) -> int:
    value = parse_int(text, "--policy")
    try:
        return check_policy(value)
    except InputError as exc:
        raise InputError(f"--policy: {exc}") from None


def _key(text: str, option: str) -> bytes:
    return read_value(text, "a " + option.lstrip("-").upper(), KEY_SIZE, option)


def _digest_arg(text: str) -> bytes:
    """A 32-byte launch digest given inline, in base64 (sevctl) or hex."""
    for decode in (lambda t: base64.b64decode(t, validate=True), bytes.fromhex):
        try:
            value = decode(text.strip())
        except ValueError:
            continue
        if len(value) == DIGEST_SIZE:
            return value
    raise InputError(f"--launch-digest: {text[:48]!r} is not {DIGEST_SIZE} bytes in base64 or hex")


def _num_cpus(text: str) -> int:
    """argparse type: a number of vCPUs a KVM VM can have."""
    try:
        value = int(text, 0)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of vCPUs (1..{MAX_VCPUS})")
    return value


def _es_given(args: argparse.Namespace) -> list[str]:
    """The SEV-ES options given, by name."""
    names = {"num_cpus": "--num-cpus", "vmsa_cpu0": "--vmsa-cpu0", "vmsa_cpu1": "--vmsa-cpu1",
             "vcpu_type": "--vcpu-type", "vcpu_sig": "--vcpu-sig", "family": "--family", "model": "--model",
             "stepping": "--stepping", "vm_type": "--vm-type", "vmsa_features": "--vmsa-features"}
    return [opt for key, opt in names.items() if getattr(args, key) is not None]


_ES_NEEDS = ("give the vCPUs: --num-cpus N --vcpu-type T (QEMU's -cpu model, e.g. EPYC-Milan), or --num-cpus N "
             "--vmsa-cpu0 FILE --vmsa-cpu1 FILE (as sevctl)")


def _vmsas(args: argparse.Namespace, policy: int, image: bytes | None) -> tuple[list[bytes], dict[str, Any]]:
    """The VMSA pages of an SEV-ES launch in LAUNCH_UPDATE_VMSA order, and what they are (for --json).

    ``image`` is the first ``--firmware`` file (its SEV-ES reset block gives the APs' EIP), ``None``
    with ``--launch-digest`` (which already covers the VMSAs: no vCPU options then)."""
    given = _es_given(args)
    if not policy & POLICY_ES:
        if given:
            raise InputError(f"{'/'.join(given)} describe an SEV-ES launch; the policy has no ES bit (0x4)")
        return [], {}
    if image is None:
        if given:
            raise InputError(f"{'/'.join(given)}: --launch-digest already covers the VMSAs; give the vCPUs with "
                             "--firmware instead")
        return [], {}
    if args.num_cpus is None:
        raise InputError(f"the policy {policy:#x} requires SEV-ES (0x4), whose launch digest covers every vCPU's "
                         f"VMSA: {_ES_NEEDS}")
    if args.vmsa_cpu0 is not None or args.vmsa_cpu1 is not None:
        return _vmsa_files(args)
    signature = cpu_signature_of(args)
    if signature is None:
        raise InputError(f"--num-cpus {args.num_cpus}: {_ES_NEEDS}")
    vm_type = vm_type_of(args)
    features = features_of(args)
    try:
        pages = ovmf_vmsa_pages(image, args.num_cpus, cpu_signature=signature, sev_features=features, vm_type=vm_type)
    except LayoutError as exc:
        raise FileFormatError(f"{args.firmware[0]}: {exc}; an SEV-ES guest needs OVMF with the SEV-ES reset "
                              "block") from None
    return pages, {"num_cpus": args.num_cpus, "vcpu_type": args.vcpu_type, "cpu_signature": signature,
                   "vm_type": args.vm_type or "init2", "vmsa_features": features}


def _vmsa_files(args: argparse.Namespace) -> tuple[list[bytes], dict[str, Any]]:
    """sevctl's way: ``--vmsa-cpu0`` for vCPU 0, ``--vmsa-cpu1`` for each other vCPU."""
    if vcpu_given(args) or vm_options_given(args):
        raise InputError("the VMSA files are the vCPUs already: give --vmsa-cpu0/--vmsa-cpu1 or the vCPU model "
                         "options, not both")
    n = args.num_cpus
    if args.vmsa_cpu0 is None or (args.vmsa_cpu1 is None and n > 1):
        raise InputError(f"--num-cpus {n} needs --vmsa-cpu0" + (" and --vmsa-cpu1" if n > 1 else ""))
    files = [args.vmsa_cpu0] + ([args.vmsa_cpu1] if n > 1 else [])
    cpu0, *cpu1 = (read_file(f, size=VMSA_PAGE_SIZE, what="a VMSA page") for f in files)
    return [cpu0] + cpu1 * (n - 1), {"num_cpus": n, "vmsa_files": [str(f) for f in files]}


def _expected(args: argparse.Namespace, policy: int) -> tuple[bytes, dict[str, Any]]:
    kernel_opts = args.kernel is not None or args.initrd is not None or args.cmdline is not None
    if args.launch_digest is not None:
        if kernel_opts:
            raise InputError("--kernel/--initrd/--cmdline go with --firmware, not with --launch-digest")
        _vmsas(args, policy, None)  # the options are checked all the same
        return _digest_arg(args.launch_digest), {}
    if args.kernel is None and kernel_opts:
        raise InputError("--initrd and --cmdline need --kernel")
    images = [read_file(path) for path in args.firmware]
    vmsas, es = _vmsas(args, policy, images[0])
    regions = [padded_image(image) for image in images]
    if args.kernel is not None:
        initrd = read_file(args.initrd) if args.initrd is not None else b""
        regions.append(kernel_hashes_table(read_file(args.kernel), initrd, args.cmdline))
    ld = LaunchDigest()
    for region in regions:
        ld.update_data(region)
    for page in vmsas:
        ld.update_vmsa(page)
    return ld.digest(), es


def expected_digest(args: argparse.Namespace, policy: int) -> bytes:
    """The launch digest the owner expects: ``--launch-digest``, or the ``--firmware`` regions (each
    padded to whole pages), QEMU's kernel-hashes table with ``--kernel``, and the VMSAs of an
    SEV-ES launch (from the vCPU model, or sevctl's VMSA files)."""
    return _expected(args, policy)[0]


def _versions(args: argparse.Namespace) -> tuple[int, int, int]:
    return (parse_int(args.api_major, "--api-major", 8), parse_int(args.api_minor, "--api-minor", 8),
            parse_int(args.build_id, "--build-id", 8))


def parse_secrets(items: list[str]) -> list[tuple[str, bytes]]:
    """``GUID:FILE`` pairs -> (GUID, file contents), in order; a GUID given twice is refused."""
    out: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for item in items:
        guid, sep, path = item.partition(":")
        if not sep or not path:
            raise InputError(f"--secret {item!r}: expected GUID:FILE")
        key = str(parse_guid(guid, f"--secret {item!r}"))
        if key in seen:
            raise InputError(f"--secret: GUID {key} given twice")
        seen.add(key)
        out.append((key, read_file(path)))
    return out


def _measure_blob(text: str) -> bytes:
    return read_value(text, "LAUNCH_MEASURE blob", MeasureBuf.SIZE, "--launch-measure-blob")


# ---- commands ------------------------------------------------------------------------------
def run_session(args: argparse.Namespace) -> int:
    if args.pdh_pos is not None and args.pdh is not None:
        raise InputError("give the PDH once: PDH or --pdh FILE")
    if args.policy_pos is not None and args.policy is not None:
        raise InputError("give the policy once: POLICY or --policy P")
    pdh_path = args.pdh_pos or args.pdh
    policy_text = args.policy_pos or args.policy
    if pdh_path is None or policy_text is None:
        raise InputError("session needs the platform's PDH and a policy: sevemu session PDH POLICY")
    if not args.name or "/" in args.name:
        raise InputError(f"--name {args.name!r}: a file-name prefix without '/' (use --out DIR for the directory)")
    policy = _policy(policy_text)
    pdh = pdh_public_key(pdh_path)
    outputs = Outputs(force=args.force, inputs=(pdh_path,))
    names = {"godh": f"{args.name}_godh.b64", "session": f"{args.name}_session.b64",
             "tek": f"{args.name}_tek.bin", "tik": f"{args.name}_tik.bin"}
    paths = {k: outputs.add(args.out / n, f"the {k.upper()} file", secret=k in ("tek", "tik"), protect=True)
             for k, n in names.items()}
    sess = LaunchSession.create(pdh, policy)
    outputs.write(paths["godh"], base64.b64encode(sess.godh_cert_blob))
    outputs.write(paths["session"], base64.b64encode(sess.session_blob))
    outputs.write(paths["tek"], sess.keys.tek)
    outputs.write(paths["tik"], sess.keys.tik)
    emit(args, {"policy": policy, "files": {k: str(v) for k, v in paths.items()}},
         [f"session for {pdh_path}, policy {policy:#x}:"]
         + [f"  {what:<8} {path}" for what, path in paths.items()]
         + [(f"give {names['godh']} and {names['session']} to the host (LAUNCH_START); "
             f"keep {names['tek']} and {names['tik']}")])
    return 0


def run_measurement_verify(args: argparse.Namespace) -> int:
    major, minor, build = _versions(args)
    policy = _policy(args.policy)
    blob = _measure_blob(args.launch_measure_blob)
    tik = _key(args.tik, "--tik")
    digest, es = _expected(args, policy)
    out = MeasureBuf.decode(blob)
    result: dict[str, Any] = {"expected_launch_digest": digest.hex(), "measure": out.measure.hex(),
                              "mnonce": out.mnonce.hex(), "api": f"{major}.{minor}", "build": build,
                              "policy": policy}
    if es:
        result["sev_es"] = es
    try:
        verify_measurement(blob, tik, major, minor, build, policy, digest)
    except MeasureMacError:
        result["ok"] = False
        emit(args, result, [
            "measurement does NOT match: a different image, policy, firmware version or TIK",
            f"  expected launch digest {digest.hex()}",
            f"  MEASURE                {out.measure.hex()}",
        ])
        return 1
    result["ok"] = True
    emit(args, result, [
        f"measurement OK: launch digest {digest.hex()}",
        f"  firmware API {major}.{minor} build {build}, policy {policy:#x}, MNONCE {out.mnonce.hex()}",
    ])
    return 0


def run_measurement_build(args: argparse.Namespace) -> int:
    major, minor, build = _versions(args)
    policy = _policy(args.policy)
    nonce_given = args.nonce is not None or args.launch_measure_blob is not None
    if args.tik is None and (nonce_given or args.outfile is not None):
        raise InputError("--nonce, --launch-measure-blob and --outfile need --tik (the MEASURE is a MAC under it)")
    if args.tik is not None and not nonce_given:
        raise InputError("one of --nonce or --launch-measure-blob must be given with --tik")
    tik = _key(args.tik, "--tik") if args.tik is not None else None
    if args.nonce is not None:
        mnonce = read_value(args.nonce, "MNONCE", NONCE_SIZE, "--nonce")
    elif args.launch_measure_blob is not None:
        mnonce = MeasureBuf.decode(_measure_blob(args.launch_measure_blob)).mnonce
    outputs = Outputs(inputs=tuple(args.firmware or ()))
    if args.outfile is not None:
        outputs.add(args.outfile, "--outfile")
    digest, es = _expected(args, policy)
    result: dict[str, Any] = {"launch_digest": digest.hex(), "launch_digest_b64": base64.b64encode(digest).decode()}
    if es:
        result["sev_es"] = es
    if tik is None:
        emit(args, result, [f"launch digest {digest.hex()} ({result['launch_digest_b64']})"])
        return 0
    measure = measure_mac(tik, api_major=major, api_minor=minor, build=build, policy=policy,
                          launch_digest=digest, mnonce=mnonce)
    blob = measure + mnonce
    result.update(measure=measure.hex(), blob=blob.hex(), blob_b64=base64.b64encode(blob).decode())
    if args.outfile is not None:
        outputs.write(args.outfile, blob)
        result["outfile"] = str(args.outfile)
        emit(args, result, [f"Wrote outfile: {args.outfile}"])
    else:
        emit(args, result, [result["blob_b64"]])
    return 0


def run_secret_build(args: argparse.Namespace) -> int:
    if (args.api_major is None) != (args.api_minor is None):
        raise InputError("--api-major and --api-minor go together")
    major, minor = ((parse_int(args.api_major, "--api-major", 8), parse_int(args.api_minor, "--api-minor", 8))
                    if args.api_major is not None else _SECRET_API_DEFAULT)
    secret_files = [Path(item.partition(":")[2]) for item in args.secret]
    key_files = [Path(v) for v in (args.tek, args.tik, args.launch_measure_blob) if names_a_file(v)]
    outputs = Outputs(inputs=tuple(secret_files + key_files))
    outputs.add(args.header, "the packet header")
    outputs.add(args.payload, "the payload")
    secrets = parse_secrets(args.secret)
    keys = TransportKeys(tek=_key(args.tek, "--tek"), tik=_key(args.tik, "--tik"))
    measure = MeasureBuf.decode(_measure_blob(args.launch_measure_blob)).measure
    iv = None
    if args.iv is not None:
        iv = read_value(args.iv, "IV", 16, "--iv")
    table = secret_table(secrets)
    if len(table) > MAX_SECRET_SIZE:
        raise InputError(f"--secret: the secret table is {len(table)} bytes; LAUNCH_SECRET through KVM takes at "
                         f"most {MAX_SECRET_SIZE} (and OVMF's secret area is one 4 KiB page)")
    packet = package_secret(keys, table, measure=measure, api_major=major, api_minor=minor, iv=iv)
    outputs.write(args.header, packet.header_bytes)
    outputs.write(args.payload, packet.trans)
    entries = f"{len(secrets)} entr{'y' if len(secrets) == 1 else 'ies'}"
    emit(args, {"entries": [g for g, _ in secrets], "guest_len": packet.guest_len,
                "header": str(args.header), "payload": str(args.payload)},
         [f"secret table with {entries}, {packet.guest_len} bytes, sealed for MEASURE {measure.hex()[:16]}...",
          f"Wrote header to: {args.header}", f"Wrote payload to: {args.payload}"])
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from sevemu.cli.platform import read_chain_file

    chain = read_chain_file(args.chain)
    raw = read_file(args.report)
    if len(raw) != LegacyAttestationReport.SIZE:
        raw = read_blob(args.report, LegacyAttestationReport.SIZE, "a legacy attestation report")
    pek = chain.pek.public_key()
    mnonce = read_value(args.mnonce, "MNONCE", NONCE_SIZE, "--mnonce") if args.mnonce is not None else None
    digest = _digest_arg(args.launch_digest) if args.launch_digest is not None else None
    policy = parse_int(args.policy, "--policy") if args.policy is not None else None
    if not isinstance(pek, ec.EllipticCurvePublicKey):
        raise FileFormatError(f"{args.chain}: the PEK is not an EC key")
    try:
        rep = verify_attestation_report(raw, pek, mnonce=mnonce, launch_digest=digest, policy=policy)
    except LayoutError as exc:
        raise FileFormatError(f"{args.report}: not a legacy attestation report: {exc}") from None
    except VerificationError as exc:
        emit(args, {"ok": False, "reason": str(exc)}, [f"report NOT valid: {exc}"])
        return 1
    emit(args, {"ok": True, "mnonce": rep.mnonce.hex(), "launch_digest": rep.launch_digest.hex(),
                "policy": rep.policy},
         [f"report OK: signed by the PEK of {args.chain}",
          f"  MNONCE {rep.mnonce.hex()}, launch digest {rep.launch_digest.hex()}, policy {rep.policy:#x}"])
    return 0

