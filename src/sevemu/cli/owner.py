"""The guest owner's commands, in the manner of virtee/sevctl: ``session``, ``measurement verify`` /
``measurement build`` and ``secret build`` (reference 1.9-1.11).

None of them touches a platform: they work on files the platform owner or the hypervisor hands over
(the PDH certificate, the LAUNCH_MEASURE blob) and produce files for them (GODH certificate, session
buffer, LAUNCH_SECRET header and payload), so the owner can run them anywhere.

Files:

* ``session``: ``[NAME_]godh.cert`` (0x824-byte GODH certificate for LAUNCH_START),
  ``[NAME_]session.bin`` (0x80-byte session buffer), ``[NAME_]tek.bin`` and ``[NAME_]tik.bin`` (the
  16-byte transport keys; mode 0600, keep them: the measurement check needs the TIK, the secret the
  TEK and the TIK);
* ``measurement``: the LAUNCH_MEASURE blob is 0x30 bytes (MEASURE || MNONCE), raw, hex or base64;
* ``secret build``: an OVMF secret table of ``--secret GUID:FILE`` entries sealed for that
  measurement, written as the 0x34-byte packet header and the encrypted payload.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sevemu.abi.policy import check_policy
from sevemu.abi.sev import MeasureBuf
from sevemu.cli.common import emit, parse_guid, parse_int, pdh_public_key, read_blob, read_file, write_file
from sevemu.crypto.transport import KEY_SIZE, MeasureMacError, TransportKeys, measure_mac
from sevemu.errors import InputError
from sevemu.owner.measurement import expected_launch_digest, kernel_hashes_table, verify_measurement
from sevemu.owner.secret import package_secret, secret_table
from sevemu.owner.session import LaunchSession

__all__ = ["expected_digest", "parse_secrets", "register"]

DIGEST_SIZE = 32


def register(sub: Any) -> None:
    s = sub.add_parser("session", help="build a launch session for a platform's PDH (owner)")
    s.add_argument("--pdh", type=Path, required=True, metavar="FILE", help="the platform's PDH certificate")
    s.add_argument("--policy", required=True, help="guest policy (e.g. 0x1 = NODBG)")
    s.add_argument("--name", default="", help="prefix of the files written (NAME_godh.cert ...)")
    s.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="directory (default .)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_session)

    m = sub.add_parser("measurement", help="check or predict a LAUNCH_MEASURE (owner)")
    msub = m.add_subparsers(dest="measurement_command", required=True, metavar="ACTION")
    v = msub.add_parser("verify", help="check a LAUNCH_MEASURE blob against the expected launch")
    b = msub.add_parser("build", help="the expected launch digest (and MEASURE, given TIK and MNONCE)")
    for p in (v, b):
        _launch_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    v.add_argument("--measurement", type=Path, required=True, metavar="FILE",
                   help="the 0x30-byte LAUNCH_MEASURE blob (raw, hex or base64)")
    v.add_argument("--tik", type=Path, required=True, metavar="FILE", help="the session's TIK")
    v.set_defaults(func=run_measurement_verify)
    b.add_argument("--tik", type=Path, metavar="FILE", help="the session's TIK (to compute MEASURE)")
    b.add_argument("--mnonce", metavar="HEX", help="the firmware's MNONCE (to compute MEASURE)")
    b.set_defaults(func=run_measurement_build)

    c = sub.add_parser("secret", help="package secrets for LAUNCH_SECRET (owner)")
    csub = c.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    sb = csub.add_parser("build", help="an OVMF secret table sealed for one measured launch")
    sb.add_argument("--secret", action="append", required=True, metavar="GUID:FILE",
                    help="a secret entry (repeatable)")
    sb.add_argument("--tek", type=Path, required=True, metavar="FILE")
    sb.add_argument("--tik", type=Path, required=True, metavar="FILE")
    sb.add_argument("--measurement", type=Path, required=True, metavar="FILE",
                    help="the LAUNCH_MEASURE blob the secret is bound to")
    sb.add_argument("--api-major", required=True, help="firmware API version (sevemu platform status)")
    sb.add_argument("--api-minor", required=True)
    sb.add_argument("header", type=Path, help="where to write the 0x34-byte packet header")
    sb.add_argument("payload", type=Path, help="where to write the encrypted secret table")
    sb.add_argument("--json", action="store_true", help="machine-readable output")
    sb.set_defaults(func=run_secret_build)


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-major", required=True, help="firmware API major (sevemu platform status)")
    p.add_argument("--api-minor", required=True)
    p.add_argument("--build", required=True, dest="build_id", help="firmware build")
    p.add_argument("--policy", required=True, help="the guest policy")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", type=Path, action="append", metavar="FILE",
                      help="a region given to LAUNCH_UPDATE_DATA, in launch order (repeatable)")
    what.add_argument("--digest", metavar="HEX", help="the expected launch digest itself (32 bytes)")
    p.add_argument("--kernel", type=Path, metavar="FILE", help="append QEMU's kernel-hashes table")
    p.add_argument("--initrd", type=Path, metavar="FILE", help="(with --kernel)")
    p.add_argument("--cmdline", help="(with --kernel)")


# ---- shared ----------------------------------------------------------------------------------
def _policy(text: str) -> int:
    value = parse_int(text, "--policy")
    try:
        return check_policy(value)
    except InputError as exc:
        raise InputError(f"--policy: {exc}") from None


def _key(path: Path, what: str) -> bytes:
    return read_file(path, size=KEY_SIZE, what=what)


def expected_digest(args: argparse.Namespace) -> bytes:
    """The launch digest the owner expects: ``--digest``, or the ``--image`` regions (plus the
    kernel-hashes table with ``--kernel``)."""
    if args.digest is not None:
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            raise InputError(f"--digest: {args.digest!r} is not hex") from None
        if len(digest) != DIGEST_SIZE:
            raise InputError(f"--digest: expected {DIGEST_SIZE} bytes, got {len(digest)}")
        if args.kernel is not None:
            raise InputError("--kernel goes with --image, not with --digest")
        return digest
    regions = [read_file(path) for path in args.image]
    if args.kernel is not None:
        initrd = read_file(args.initrd) if args.initrd is not None else b""
        regions.append(kernel_hashes_table(read_file(args.kernel), initrd, args.cmdline))
    elif args.initrd is not None or args.cmdline is not None:
        raise InputError("--initrd and --cmdline need --kernel")
    return expected_launch_digest(regions)


def _versions(args: argparse.Namespace) -> tuple[int, int, int]:
    return (parse_int(args.api_major, "--api-major", 8), parse_int(args.api_minor, "--api-minor", 8),
            parse_int(args.build_id, "--build", 8))


def parse_secrets(items: list[str]) -> list[tuple[str, bytes]]:
    """``GUID:FILE`` pairs -> (GUID, file contents)."""
    out: list[tuple[str, bytes]] = []
    for item in items:
        guid, sep, path = item.partition(":")
        if not sep or not path:
            raise InputError(f"--secret {item!r}: expected GUID:FILE")
        out.append((str(parse_guid(guid, f"--secret {item!r}")), read_file(path)))
    return out


# ---- commands ------------------------------------------------------------------------------
def run_session(args: argparse.Namespace) -> int:
    pdh = pdh_public_key(args.pdh)
    policy = _policy(args.policy)
    sess = LaunchSession.create(pdh, policy)
    prefix = f"{args.name}_" if args.name else ""
    files = {
        "godh": write_file(args.out / f"{prefix}godh.cert", sess.godh_cert_blob),
        "session": write_file(args.out / f"{prefix}session.bin", sess.session_blob),
        "tek": write_file(args.out / f"{prefix}tek.bin", sess.keys.tek, secret=True),
        "tik": write_file(args.out / f"{prefix}tik.bin", sess.keys.tik, secret=True),
    }
    emit(args, {"policy": policy, "files": {k: str(v) for k, v in files.items()}},
         [f"session for {args.pdh}, policy {policy:#x}:"]
         + [f"  {what:<8} {path}" for what, path in files.items()]
         + ["give godh.cert and session.bin to the hypervisor (LAUNCH_START); keep tek.bin and tik.bin"])
    return 0


def run_measurement_verify(args: argparse.Namespace) -> int:
    blob = read_blob(args.measurement, MeasureBuf.SIZE, "LAUNCH_MEASURE blob")
    tik = _key(args.tik, "a TIK")
    major, minor, build = _versions(args)
    policy = _policy(args.policy)
    digest = expected_digest(args)
    out = MeasureBuf.decode(blob)
    result: dict[str, Any] = {"expected_launch_digest": digest.hex(), "measure": out.measure.hex(),
                              "mnonce": out.mnonce.hex(), "api": f"{major}.{minor}", "build": build,
                              "policy": policy}
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
    digest = expected_digest(args)
    result: dict[str, Any] = {"launch_digest": digest.hex()}
    lines = [f"launch digest {digest.hex()}"]
    if (args.tik is None) != (args.mnonce is None):
        raise InputError("--tik and --mnonce go together")
    if args.tik is not None:
        try:
            mnonce = bytes.fromhex(args.mnonce)
        except ValueError:
            raise InputError(f"--mnonce: {args.mnonce!r} is not hex") from None
        if len(mnonce) != 16:
            raise InputError(f"--mnonce: expected 16 bytes, got {len(mnonce)}")
        measure = measure_mac(_key(args.tik, "a TIK"), api_major=major, api_minor=minor, build=build,
                              policy=policy, launch_digest=digest, mnonce=mnonce)
        result["measure"] = measure.hex()
        result["blob"] = (measure + mnonce).hex()
        lines.append(f"MEASURE       {measure.hex()}")
    emit(args, result, lines)
    return 0


def run_secret_build(args: argparse.Namespace) -> int:
    secrets = parse_secrets(args.secret)
    keys = TransportKeys(tek=_key(args.tek, "a TEK"), tik=_key(args.tik, "a TIK"))
    blob = read_blob(args.measurement, MeasureBuf.SIZE, "LAUNCH_MEASURE blob")
    major = parse_int(args.api_major, "--api-major", 8)
    minor = parse_int(args.api_minor, "--api-minor", 8)
    table = secret_table(secrets)
    packet = package_secret(keys, table, measure=MeasureBuf.decode(blob).measure, api_major=major,
                            api_minor=minor)
    write_file(args.header, packet.header_bytes)
    write_file(args.payload, packet.trans)
    entries = f"{len(secrets)} entr{'y' if len(secrets) == 1 else 'ies'}"
    measure = MeasureBuf.decode(blob).measure.hex()
    emit(args, {"entries": [g for g, _ in secrets], "guest_len": packet.guest_len,
                "header": str(args.header), "payload": str(args.payload)},
         [f"secret table with {entries}, {packet.guest_len} bytes, sealed for MEASURE {measure[:16]}...",
          f"  header  {args.header}", f"  payload {args.payload}"])
    return 0
