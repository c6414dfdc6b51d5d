"""Helpers shared by the sevctl-style commands: platform directories, file reading with clear
errors, number and GUID parsing, output.

Every problem with what the user gave raises :class:`~sevemu.errors.FileFormatError` (or another
:class:`~sevemu.errors.InputError`) with a message naming the file and what is wrong
("pdh.cert: expected 2084 bytes, got 17"); :func:`sevemu.cli.main.main` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import SEV_CERT_SIZE, KeyUsage
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain
from sevemu.certs.roots import GENERATIONS
from sevemu.certs.sev import ECDH_ALGOS, SevCert
from sevemu.errors import FileFormatError, InputError, SevemuError
from sevemu.firmware.nvstore import is_manufactured, read_factory
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.scenario import Machine, build_machine

__all__ = [
    "DEFAULT_GENERATION",
    "Platform",
    "add_platform_args",
    "default_platform_dir",
    "emit",
    "open_platform",
    "parse_guid",
    "parse_int",
    "pdh_public_key",
    "platform_amd_chain",
    "read_amd_cert",
    "read_blob",
    "read_file",
    "read_sev_cert",
    "resolve_platform",
    "write_file",
]

DEFAULT_GENERATION = "milan"


# ---- platform directories --------------------------------------------------------------------
def default_platform_dir(generation: str) -> Path:
    """``$SEVEMU_HOME/<generation>``, else ``$XDG_DATA_HOME/sevemu/<generation>`` (default
    ``~/.local/share/sevemu/<generation>``)."""
    home = os.environ.get("SEVEMU_HOME")
    if home:
        return Path(home) / generation
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "sevemu" / generation


def add_platform_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform-dir", type=Path, metavar="DIR",
                   help="the platform's directory (default $SEVEMU_HOME/<generation> or "
                        "~/.local/share/sevemu/<generation>; made on first use)")
    p.add_argument("--generation", choices=GENERATIONS, default=None,
                   help=f"CPU generation (default: the platform directory's, else {DEFAULT_GENERATION})")


def resolve_platform(args: argparse.Namespace) -> tuple[str, Path]:
    """(generation, platform directory) from ``--generation`` / ``--platform-dir``."""
    given: str | None = getattr(args, "generation", None)
    directory: Path | None = getattr(args, "platform_dir", None)
    if directory is None:
        generation = given or DEFAULT_GENERATION
        return generation, default_platform_dir(generation)
    if directory.exists() and not directory.is_dir():
        raise FileFormatError(f"{directory}: not a directory")
    if is_manufactured(directory):
        made = read_factory(directory).generation
        if given is not None and given != made:
            raise InputError(f"{directory} holds a {made} platform, not {given}")
        return made, directory
    return given or DEFAULT_GENERATION, directory


@dataclass
class Platform:
    """An open platform: the machine booted from its directory and ``/dev/sev`` on its host."""

    generation: str
    directory: Path
    machine: Machine
    dev: SevDevice


@contextmanager
def open_platform(args: argparse.Namespace, *, writable: bool = True) -> Iterator[Platform]:
    """Boot the platform of ``args`` (manufacturing it on first use); the SEV firmware starts UNINIT
    as after a power-on, and ``/dev/sev`` INITs it on demand.  Closes the NV store afterwards."""
    generation, directory = resolve_platform(args)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"{directory}: cannot create the platform directory: {exc.strerror}") from None
    machine = build_machine(generation, platform_dir=directory, init=False, dram_size=1 << 32)
    try:
        yield Platform(generation, directory, machine, SevDevice(machine.hv, writable=writable))
    finally:
        machine.firmware.close()


def platform_amd_chain(directory: Path) -> AmdCertChain:
    """ASK || ARK of the manufacturer that made the platform in ``directory`` (its factory data)."""
    if not is_manufactured(directory):
        raise FileFormatError(f"{directory}: no platform has been made there yet")
    return AmdCertChain.decode(read_factory(directory).amd_chain)


# ---- files ---------------------------------------------------------------------------------
def read_file(path: Path | str, *, size: int | None = None, what: str = "") -> bytes:
    """The bytes of ``path``; :class:`FileFormatError` naming the file if it cannot be read or its
    size is not ``size``."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileFormatError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise FileFormatError(f"{p}: is a directory, expected a file") from None
    except OSError as exc:
        raise FileFormatError(f"{p}: cannot read: {exc.strerror}") from None
    if size is not None and len(data) != size:
        kind = f" ({what})" if what else ""
        raise FileFormatError(f"{p}: expected {size} bytes{kind}, got {len(data)}")
    return data


def read_blob(path: Path | str, size: int, what: str) -> bytes:
    """A fixed-size binary value from a file holding it raw, as hex or as base64 text."""
    data = read_file(path)
    if len(data) == size:
        return data
    text = data.strip()
    candidates: list[bytes] = []
    try:
        candidates.append(bytes.fromhex(text.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        candidates.append(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error):
        pass
    for value in candidates:
        if len(value) == size:
            return value
    raise FileFormatError(f"{path}: expected {size} bytes of {what} (raw, hex or base64), got {len(data)} bytes")


def write_file(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Write ``data`` (mode 0600 for ``secret`` files); :class:`FileFormatError` on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if secret:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        else:
            path.write_bytes(data)
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write: {exc.strerror}") from None
    return path


def read_sev_cert(path: Path | str, usage: KeyUsage | None = None) -> SevCert:
    """A 0x824-byte SEV certificate file, optionally of one usage."""
    data = read_file(path, size=SEV_CERT_SIZE, what="an SEV certificate")
    try:
        cert = SevCert.decode(data)
    except SevemuError as exc:
        raise FileFormatError(f"{path}: not an SEV certificate: {exc}") from None
    if usage is not None and cert.usage != usage:
        raise FileFormatError(f"{path}: a {cert.usage.name} certificate, expected {usage.name}")
    return cert


def pdh_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    """The P-384 ECDH key of a PDH certificate file."""
    cert = read_sev_cert(path, KeyUsage.PDH)
    if cert.algo not in ECDH_ALGOS:
        raise FileFormatError(f"{path}: a PDH with algorithm {cert.algo.name}, expected ECDH")
    try:
        key = cert.public_key()
    except InputError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise FileFormatError(f"{path}: the PDH key is not on P-384")
    return key


def read_amd_cert(path: Path | str, *, allow_unsigned: bool = False) -> AmdCert:
    """An AMD-format ARK or ASK certificate file (0x340 or 0x640 bytes)."""
    data = read_file(path)
    try:
        return AmdCert.decode(data, allow_unsigned=allow_unsigned)
    except SevemuError as exc:
        raise FileFormatError(f"{path}: not an AMD ARK/ASK certificate ({len(data)} bytes): {exc}") from None


# ---- values --------------------------------------------------------------------------------
def parse_int(text: str, what: str, bits: int = 32) -> int:
    """An integer in decimal or 0x-hex that fits ``bits``."""
    try:
        value = int(text, 0)
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a number (decimal or 0x-hex)") from None
    if not 0 <= value < 1 << bits:
        raise InputError(f"{what}: {text} does not fit {bits} bits")
    return value


def parse_guid(text: str, what: str = "GUID") -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InputError(f"{what}: {text!r} is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)") from None


def emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """Print ``result`` as JSON with ``--json``, else the human ``lines``."""
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)
