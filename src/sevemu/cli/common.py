"""Helpers shared by the commands: platform directories, reading inputs and writing outputs with
clear errors, number / GUID / duration parsing, JSON or human output.

Every problem with what the user gave raises :class:`~sevemu.errors.FileFormatError` (or another
:class:`~sevemu.errors.InputError`) with a message naming the file or option and what is wrong
("pdh.cert: expected 2084 bytes, got 17"); :func:`sevemu.cli.main.main` prints it and exits 2.

Inputs follow sevctl where sevctl takes them (virtee/sevctl ``measurement.rs``
``parse_base64_or_path``): an option value that names an existing file is that file, otherwise it
is the value itself in base64.  A fixed-size value (a key, a blob) may also be stored in its file
as hex or base64 text.

Outputs are checked before the command does anything (:class:`Outputs`): not a directory, the
parent creatable and writable, no path given twice or equal to an input, and an existing *key*
file (OCA key, TEK, TIK) never overwritten without ``--force``.  Each file is then written
atomically (a temporary file renamed over it), so a reader never sees half a file -- the VMM polls
for the owner's secret files -- and a failed command leaves the old file as it was.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import os
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import GiB
from sevemu.abi.certs import SEV_CERT_SIZE, KeyUsage
from sevemu.certs.amd import AmdCert
from sevemu.certs.chain import AmdCertChain
from sevemu.certs.roots import GENERATIONS
from sevemu.certs.sev import ECDH_ALGOS, SevCert
from sevemu.errors import FileFormatError, InputError, SevemuError
from sevemu.firmware.nvstore import is_manufactured, read_factory
from sevemu.hypervisor.sev.snp import snp_enable
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.scenario import Machine, build_machine

__all__ = [
    "DEFAULT_GENERATION",
    "Outputs",
    "Platform",
    "add_force",
    "add_platform_args",
    "decode_sev_cert",
    "decode_text",
    "default_platform_dir",
    "emit",
    "host_memory",
    "names_a_file",
    "open_platform",
    "parse_guid",
    "parse_int",
    "pdh_public_key",
    "platform_amd_chain",
    "positive_int",
    "read_amd_cert",
    "read_blob",
    "read_file",
    "read_sev_cert",
    "read_value",
    "resolve_platform",
    "seconds",
    "sev_cert_bytes",
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


def _factory(directory: Path) -> Any:
    """The factory data of ``directory``; any problem reading it is one line naming the directory."""
    try:
        return read_factory(directory)
    except SevemuError as exc:
        raise FileFormatError(f"{directory}: {exc}") from None
    except OSError as exc:
        raise FileFormatError(f"{directory}: cannot read the factory data: {exc.strerror}") from None


def resolve_platform(args: argparse.Namespace) -> tuple[str, Path]:
    """(generation, platform directory) from ``--generation`` / ``--platform-dir``."""
    given: str | None = getattr(args, "generation", None)
    directory: Path | None = getattr(args, "platform_dir", None)
    if directory is None:
        generation = given or DEFAULT_GENERATION
        directory = default_platform_dir(generation)
    else:
        generation = given or DEFAULT_GENERATION
    if directory.exists() and not directory.is_dir():
        raise FileFormatError(f"{directory}: not a directory")
    if is_manufactured(directory):
        made = str(_factory(directory).generation)
        if given is not None and given != made:
            raise InputError(f"{directory} holds a {made} platform, not {given}")
        return made, directory
    return generation, directory


@dataclass
class Platform:
    """An open platform: the machine booted from its directory and ``/dev/sev`` on its host."""

    generation: str
    directory: Path
    machine: Machine
    dev: SevDevice


@contextmanager
def open_platform(args: argparse.Namespace, *, writable: bool = True,
                  dram_size: int = 4 * GiB) -> Iterator[Platform]:
    """Boot the platform of ``args`` (manufacturing it on first use); the SEV firmware starts UNINIT
    as after a power-on, and ``/dev/sev`` INITs it on demand.  Closes the NV store afterwards.

    A directory the firmware cannot use (unwritable, corrupt, ...) is reported as one line naming
    it, whatever the error the firmware raised."""
    generation, directory = resolve_platform(args)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"{directory}: cannot create the platform directory: {exc.strerror}") from None
    try:
        machine = build_machine(generation, platform_dir=directory, init=False, dram_size=dram_size)
    except SevemuError as exc:
        text = str(exc)
        raise FileFormatError(text if str(directory) in text else f"{directory}: {text}") from None
    except OSError as exc:
        where = exc.filename or directory
        raise FileFormatError(f"{where}: cannot use the platform directory: {exc.strerror or exc}") from None
    except sqlite3.Error as exc:
        raise FileFormatError(f"{directory}: the platform's NV store cannot be used: {exc}") from None
    if machine.soc.rmp is not None:  # an SNP part: the host kernel enabled SNP at boot (snp_enable)
        snp_enable(machine.hv.soc)
    try:
        yield Platform(generation, directory, machine, SevDevice(machine.hv, writable=writable))
    finally:
        machine.firmware.close()


def platform_amd_chain(directory: Path) -> AmdCertChain:
    """ASK || ARK of the manufacturer that made the platform in ``directory`` (what a host fetches
    from the manufacturer's key server; here it comes with the factory data)."""
    if not is_manufactured(directory):
        raise FileFormatError(f"{directory}: no platform has been made there yet")
    try:
        return AmdCertChain.decode(bytes(_factory(directory).amd_chain))
    except SevemuError as exc:
        raise FileFormatError(f"{directory}: the manufacturer's ASK || ARK is unreadable: {exc}") from None


# ---- inputs --------------------------------------------------------------------------------
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


def decode_text(text: bytes | str) -> list[bytes]:
    """The values ``text`` may stand for: its hex and its base64 decodings (those that work)."""
    raw = text.strip().encode() if isinstance(text, str) else text.strip()
    out: list[bytes] = []
    try:
        out.append(bytes.fromhex(raw.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        pass
    try:
        out.append(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error):
        pass
    return out


def read_blob(path: Path | str, size: int, what: str) -> bytes:
    """A fixed-size binary value from a file holding it raw, as hex or as base64 text."""
    data = read_file(path)
    if len(data) == size:
        return data
    for value in decode_text(data):
        if len(value) == size:
            return value
    raise FileFormatError(f"{path}: expected {size} bytes of {what} (raw, hex or base64), got {len(data)} bytes")


def names_a_file(text: str) -> bool:
    """Whether an option value names an existing file (a long inline value is not a path)."""
    try:
        return bool(text) and Path(text).exists()
    except (OSError, ValueError):
        return False


def read_value(text: str, what: str, size: int, option: str) -> bytes:
    """A ``size``-byte value given as sevctl takes it: the path of a file (holding the value raw,
    as hex or as base64), else the value itself inline in base64 (or hex)."""
    if names_a_file(text):
        return read_blob(Path(text), size, what)
    for value in decode_text(text):
        if len(value) == size:
            return value
    raise FileFormatError(f"{option} {text}: no such file, nor {size} bytes of {what} in base64 or hex")


def sev_cert_bytes(path: Path | str) -> bytes:
    """The first SEV certificate of a file: the certificate alone (raw, or base64 as ``session``
    writes the GODH), or a chain file (``export``) that starts with it."""
    data = read_file(path)
    if len(data) == SEV_CERT_SIZE:
        return data
    for value in decode_text(data):
        if len(value) == SEV_CERT_SIZE:
            return value
    if len(data) > SEV_CERT_SIZE:
        return data[:SEV_CERT_SIZE]
    raise FileFormatError(f"{path}: expected {SEV_CERT_SIZE} bytes (an SEV certificate), got {len(data)}")


def read_sev_cert(path: Path | str, usage: KeyUsage | None = None) -> SevCert:
    """An SEV certificate file (:func:`sev_cert_bytes`), optionally of one usage."""
    return decode_sev_cert(sev_cert_bytes(path), str(path), usage)


def decode_sev_cert(data: bytes, name: str, usage: KeyUsage | None = None) -> SevCert:
    """:meth:`SevCert.decode` with errors naming ``name``."""
    try:
        cert = SevCert.decode(data)
    except SevemuError as exc:
        raise FileFormatError(f"{name}: not an SEV certificate: {exc}") from None
    if usage is not None and cert.usage != usage:
        raise FileFormatError(f"{name}: a {cert.usage.name} certificate, expected {usage.name}")
    return cert


def pdh_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    """The P-384 ECDH key of a PDH certificate file (the PDH alone, or a chain file starting with it)."""
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


# ---- outputs -------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_writable(path: Path, what: str, create_parents: bool = True) -> None:
    if path.is_dir():
        raise FileFormatError(f"{path}: is a directory; {what} needs a file name")
    if not create_parents and not path.parent.exists():
        raise FileFormatError(f"{path}: no such directory {path.parent}")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise FileFormatError(f"{path}: cannot write there: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileFormatError(f"{path}: cannot write there: {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise FileFormatError(f"{path}: the file exists and is not writable")


def write_file(path: Path, data: bytes, *, secret: bool = False) -> Path:
    """Write ``data`` atomically (mode 0600 for ``secret`` files); :class:`FileFormatError` on
    failure.  Special files (``/dev/stdout``, a FIFO) are written in place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            with open(path, "wb") as out:
                out.write(data)
            return path
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o600 if secret else 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write: {exc.strerror}") from None
    return path


@dataclass
class Outputs:
    """The files a command will write, checked before it does anything (module docstring)."""

    force: bool = False
    inputs: tuple[Path, ...] = ()
    planned: dict[Path, tuple[str, bool]] = field(default_factory=dict)

    def add(self, path: Path, what: str, *, secret: bool = False, protect: bool | None = None,
            create_parents: bool = True) -> Path:
        """Check that ``path`` can take ``what``; returns it.  ``secret``: a key (mode 0600, not
        overwritten without ``--force``); ``protect``: not overwritten without ``--force`` either;
        ``create_parents``: missing directories above it will be made."""
        key = Path(os.path.abspath(path))
        if key in self.planned:
            raise InputError(f"{path} is given both as {self.planned[key][0]} and as {what}")
        for given in self.inputs:
            if Path(os.path.abspath(given)) == key:
                raise InputError(f"{path} is an input of this command; {what} must go elsewhere")
        _check_writable(path, what, create_parents)
        if (secret if protect is None else protect) and path.exists() and not self.force:
            raise FileFormatError(f"{path}: exists; refusing to overwrite {what} (--force to replace it)")
        self.planned[key] = (what, secret)
        return path

    def write(self, path: Path, data: bytes) -> Path:
        """Write a planned file."""
        _, secret = self.planned[Path(os.path.abspath(path))]
        return write_file(path, data, secret=secret)


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing key files")


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


def seconds(text: str) -> float:
    """argparse type: a finite, positive number of seconds (``-1``, ``inf`` and ``nan`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number of seconds")
    return value


def positive_int(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value


def host_memory() -> int:
    """Bytes of memory this host can give a process now (MemAvailable; else the installed RAM)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 1 << 62


def emit(args: argparse.Namespace, result: dict[str, Any], lines: list[str]) -> None:
    """Print ``result`` as JSON with ``--json``, else the human ``lines``."""
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for line in lines:
            print(line)
