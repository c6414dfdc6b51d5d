"""What the Secure Processor keeps across a restart: the fuses, the factory-provisioned data and the
non-volatile (NV) store -- all under one *platform directory*.

On hardware the chip-unique secret is burnt into fuses at manufacturing, AMD certifies the chip's
CEK, and the firmware keeps its owner keys and certificates in a region of the SPI flash (AMD-ASPFW
``sev_persistent.c``; with INIT_EX the host hands it a 32 KiB buffer instead, see
:mod:`sevemu.firmware.sev.platform`).  The model keeps them in a directory::

    <platform_dir>/
      factory/                written once by the factory (sevemu.scenario), read-only afterwards
        manifest.json         format, generation, sockets, the trusted-ARK file names
        fuses.bin             the chip-unique secret: this file plays the role of the fuses
        cek.cert              the CEK certificate (0x824 bytes) signed by the emulated ASK
        ask_ark.cert          ASK || ARK of the chip's manufacturer (AMD format)
        trusted_ark_<n>.cert  ARKs the firmware trusts when it checks another platform's chain
      nv.sqlite3              the NV store (the SPI flash): a real SQLite database

The factory writes ``factory/`` into a temporary directory and renames it into place, so a platform
directory is either manufactured completely or not at all.

NV store (:class:`NvStore`): one table of named records (``name TEXT PRIMARY KEY, value BLOB``), a
``meta`` table counting commits, ``PRAGMA user_version`` for the schema.  Every change is ONE
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rollback-journal mode, ``synchronous=FULL``):
killing the process in the middle of a command leaves the store in its old state (SQLite rolls the
hot journal back at the next open) or, once COMMIT returned, the new one -- never a mix.  The
records the firmware keeps are documented where they are written (:mod:`sevemu.firmware.identity`).

What is *not* here is volatile, as on hardware where it dies with a reset: the platform state (a
restarted firmware is UNINIT), the SEV-ES enable bit and TMR, guest contexts and their keys, ASID
bindings, the DF_FLUSH bookkeeping.

Integrity: the directory is the chip's own storage; the model does not encrypt the SQLite store (the
emulated host never reaches it -- only the person running the emulator does, who can read the fuses
file anyway).  The copy handed to the host by INIT_EX *is* sealed.

INIT_EX host copy (:func:`seal_host_nv`, model choice -- AMD does not publish its format): the
32 KiB buffer holds ``magic "SEVEMUNV" | version u32 = 1 | length u32 | nonce[12] | AES-256-GCM
ciphertext||tag`` (the 28-byte header is the associated data), then 0xFF up to 32 KiB.  The
plaintext is the records, sorted by name, each ``u16 name length | name (UTF-8) | u32 value length |
value`` (little-endian).  A buffer of all 0xFF or all 0x00 is an erased area (no records).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevemu.abi.sev import INIT_EX_NV_LEN
from sevemu.errors import HardwareError, InputError

__all__ = [
    "FACTORY_DIR",
    "HOST_NV_MAGIC",
    "NV_FILENAME",
    "FactoryData",
    "NvStore",
    "NvStoreError",
    "is_manufactured",
    "read_factory",
    "seal_host_nv",
    "unseal_host_nv",
    "write_factory",
]

FACTORY_DIR: Final = "factory"
NV_FILENAME: Final = "nv.sqlite3"
SCHEMA_VERSION: Final = 1
FACTORY_FORMAT: Final = 1

_MANIFEST: Final = "manifest.json"
_FUSES: Final = "fuses.bin"
_CEK: Final = "cek.cert"
_AMD_CHAIN: Final = "ask_ark.cert"


class NvStoreError(HardwareError):
    """Raised when the platform directory is missing, malformed or inconsistent (fuses, factory
    data, NV records), or when the NV store cannot be read or written."""


# ---- factory data (read-only after manufacturing) ----------------------------------------------
@dataclass(frozen=True, slots=True)
class FactoryData:
    """What the factory provisions, as bytes: the firmware decodes and checks it when it boots."""

    generation: str
    chip_secret: bytes = field(repr=False)
    """The fused chip-unique secret."""
    cek_cert: bytes
    """The CEK certificate (0x824 bytes) signed by the manufacturer's ASK."""
    amd_chain: bytes
    """ASK || ARK of the manufacturer, AMD format."""
    trusted_arks: tuple[tuple[str, bytes], ...]
    """(generation, ARK certificate) the firmware trusts when verifying another platform's chain."""
    sockets: int = 1


def is_manufactured(platform_dir: str | os.PathLike[str]) -> bool:
    """``platform_dir`` holds factory data (the chip was made)."""
    return (Path(platform_dir) / FACTORY_DIR / _MANIFEST).is_file()


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, mode)


def write_factory(platform_dir: str | os.PathLike[str], data: FactoryData) -> Path:
    """Manufacture: write ``data`` under ``platform_dir/factory`` (all or nothing); returns the dir.

    Raises :class:`~sevemu.errors.InputError` if the directory already holds a manufactured chip.
    """
    root = Path(platform_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / FACTORY_DIR
    if final.exists():
        raise InputError(f"{root} already holds a manufactured platform")
    staging = Path(tempfile.mkdtemp(prefix=".factory-", dir=root))
    try:
        _write_private(staging / _FUSES, data.chip_secret, 0o400)
        _write_private(staging / _CEK, data.cek_cert, 0o444)
        _write_private(staging / _AMD_CHAIN, data.amd_chain, 0o444)
        arks = []
        for n, (generation, ark) in enumerate(data.trusted_arks):
            name = f"trusted_ark_{n}.cert"
            _write_private(staging / name, ark, 0o444)
            arks.append({"generation": generation, "file": name})
        manifest = {
            "format": FACTORY_FORMAT,
            "generation": data.generation,
            "sockets": data.sockets,
            "trusted_arks": arks,
        }
        _write_private(staging / _MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o444)
        os.chmod(staging, 0o755)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_factory(platform_dir: str | os.PathLike[str]) -> FactoryData:
    """The factory data of ``platform_dir``; :class:`NvStoreError` if absent or malformed."""
    folder = Path(platform_dir) / FACTORY_DIR
    try:
        manifest: Any = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FACTORY_FORMAT:
            raise NvStoreError(f"{folder / _MANIFEST}: not factory data of format {FACTORY_FORMAT}")
        generation = manifest.get("generation")
        sockets = manifest.get("sockets")
        arks_meta = manifest.get("trusted_arks")
        if not isinstance(generation, str) or not isinstance(sockets, int) or not isinstance(arks_meta, list):
            raise NvStoreError(f"{folder / _MANIFEST}: malformed manifest")
        arks: list[tuple[str, bytes]] = []
        for entry in arks_meta:
            if not (isinstance(entry, dict) and isinstance(entry.get("generation"), str)
                    and isinstance(entry.get("file"), str) and "/" not in entry["file"]):
                raise NvStoreError(f"{folder / _MANIFEST}: malformed trusted_arks entry {entry!r}")
            arks.append((entry["generation"], (folder / entry["file"]).read_bytes()))
        return FactoryData(
            generation=generation,
            chip_secret=(folder / _FUSES).read_bytes(),
            cek_cert=(folder / _CEK).read_bytes(),
            amd_chain=(folder / _AMD_CHAIN).read_bytes(),
            trusted_arks=tuple(arks),
            sockets=sockets,
        )
    except FileNotFoundError as exc:
        raise NvStoreError(f"{Path(platform_dir)} is not a manufactured platform: {exc.filename} missing") from exc
    except (OSError, ValueError) as exc:
        raise NvStoreError(f"{folder}: unreadable factory data: {exc}") from exc


# ---- the NV store -------------------------------------------------------------------------------
class NvStore:
    """The firmware's non-volatile store: named records in a SQLite database (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise NvStoreError(f"cannot open the NV store {self.path}: {exc}") from exc
        try:
            self._conn.execute("PRAGMA journal_mode=DELETE")
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._transaction() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    c.execute("CREATE TABLE nv (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
                    c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
                    c.execute("INSERT INTO meta (key, value) VALUES ('commits', 0)")
                    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise NvStoreError(f"{self.path}: NV schema {version}, this firmware reads {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._conn.close()
            raise NvStoreError(f"{self.path}: not an NV store: {exc}") from exc
        except NvStoreError:
            self._conn.close()
            raise

    @classmethod
    def open(cls, platform_dir: str | os.PathLike[str]) -> NvStore:
        """The NV store of ``platform_dir`` (created empty if it does not exist yet)."""
        return cls(Path(platform_dir) / NV_FILENAME)

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying connection (for inspection and fault-injection tests)."""
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def read(self) -> dict[str, bytes]:
        """Every record (one SELECT: a consistent snapshot)."""
        try:
            rows = self._conn.execute("SELECT name, value FROM nv ORDER BY name").fetchall()
        except sqlite3.Error as exc:
            raise NvStoreError(f"{self.path}: cannot read: {exc}") from exc
        return {str(name): bytes(value) for name, value in rows}

    @property
    def commits(self) -> int:
        """How many transactions changed the store since it was created."""
        try:
            return int(self._conn.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()[0])
        except sqlite3.Error as exc:
            raise NvStoreError(f"{self.path}: cannot read: {exc}") from exc

    def commit(self, put: Mapping[str, bytes], delete: Iterable[str] = (), *, reset: bool = False) -> int:
        """In ONE transaction: drop every record if ``reset``, delete ``delete``, write ``put``.

        Returns the new commit count.  Raises :class:`NvStoreError` (nothing changed) on failure.
        """
        try:
            with self._transaction() as c:
                if reset:
                    c.execute("DELETE FROM nv")
                for name in sorted(set(delete) - set(put)):
                    c.execute("DELETE FROM nv WHERE name = ?", (name,))
                for name in sorted(put):
                    c.execute("INSERT OR REPLACE INTO nv (name, value) VALUES (?, ?)", (name, bytes(put[name])))
                c.execute("UPDATE meta SET value = value + 1 WHERE key = 'commits'")
                count = int(c.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()[0])
        except sqlite3.Error as exc:
            raise NvStoreError(f"{self.path}: commit failed, nothing changed: {exc}") from exc
        return count

    def close(self) -> None:
        self._conn.close()


# ---- the INIT_EX host copy ----------------------------------------------------------------------
HOST_NV_MAGIC: Final = b"SEVEMUNV"
_HOST_NV_VERSION: Final = 1
_HOST_HEADER: Final = struct.Struct("<8sII12s")


def _pack_records(records: Mapping[str, bytes]) -> bytes:
    out = bytearray()
    for name in sorted(records):
        raw = name.encode()
        out += struct.pack("<H", len(raw)) + raw + struct.pack("<I", len(records[name])) + records[name]
    return bytes(out)


def _unpack_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    try:
        while pos < len(data):
            (name_len,) = struct.unpack_from("<H", data, pos)
            name = data[pos + 2 : pos + 2 + name_len].decode()
            pos += 2 + name_len
            (value_len,) = struct.unpack_from("<I", data, pos)
            value = data[pos + 4 : pos + 4 + value_len]
            pos += 4 + value_len
            if len(value) != value_len or name in records:
                raise ValueError("truncated or repeated record")
            records[name] = value
    except (struct.error, ValueError) as exc:
        raise NvStoreError(f"sealed NV image: malformed records: {exc}") from exc
    return records


def seal_host_nv(key: bytes, records: Mapping[str, bytes], nonce: bytes) -> bytes:
    """The 32 KiB INIT_EX buffer holding ``records`` sealed with ``key`` (32 bytes; module docstring)."""
    plaintext = _pack_records(records)
    length = len(plaintext) + 16
    header = _HOST_HEADER.pack(HOST_NV_MAGIC, _HOST_NV_VERSION, length, nonce)
    body = header + AESGCM(key).encrypt(nonce, plaintext, header)
    if len(body) > INIT_EX_NV_LEN:
        raise NvStoreError(f"NV records need {len(body)} bytes, the INIT_EX area holds {INIT_EX_NV_LEN}")
    return body + b"\xff" * (INIT_EX_NV_LEN - len(body))


def unseal_host_nv(key: bytes, image: bytes) -> dict[str, bytes]:
    """The records of an INIT_EX buffer (empty for an erased area).

    Raises :class:`NvStoreError` if the buffer is neither erased nor sealed with ``key``.
    """
    if image.count(0xFF) == len(image) or not any(image):
        return {}
    if len(image) < _HOST_HEADER.size:
        raise NvStoreError("sealed NV image: truncated")
    header = image[: _HOST_HEADER.size]
    magic, version, length, nonce = _HOST_HEADER.unpack(header)
    if magic != HOST_NV_MAGIC or version != _HOST_NV_VERSION or length > len(image) - _HOST_HEADER.size:
        raise NvStoreError("sealed NV image: bad header")
    try:
        plaintext = AESGCM(key).decrypt(nonce, image[_HOST_HEADER.size : _HOST_HEADER.size + length], header)
    except InvalidTag:
        raise NvStoreError("sealed NV image: does not authenticate (another chip's, or altered)") from None
    return _unpack_records(plaintext)
