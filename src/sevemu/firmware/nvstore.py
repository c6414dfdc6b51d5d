"""What the Secure Processor keeps across a restart: the fuses, the factory-provisioned data and the
non-volatile (NV) store -- all under one *platform directory*.

On hardware the chip-unique secret and the digest of the root key the firmware trusts are burnt
into fuses at manufacturing, AMD certifies the chip's CEK, and the firmware keeps its owner keys and
certificates in a region of the SPI flash, encrypted and MACed with chip-unique keys (AMD-ASPFW
``sev_persistent.c``, ``sev_wrap.c``; with INIT_EX the host hands it a 32 KiB buffer instead, see
:mod:`sevemu.firmware.sev.platform`).  The model keeps them in a directory::

    <platform_dir>/
      factory/                written once by the factory (sevemu.scenario), read-only afterwards
        fuses.bin             the fuses: the chip-unique secret and the digests of the trusted ARKs
        manifest.json         format, generation, sockets, the trusted-ARK file names
        cek.cert              the CEK certificate (0x824 bytes) signed by the emulated ASK
        ask_ark.cert          ASK || ARK of the chip's manufacturer (AMD format)
        trusted_ark_<n>.cert  the ARKs whose digests are fused (the manufacturer's first)
      nv.sqlite3              the NV store (the SPI flash): a real SQLite database, every record sealed

``factory/fuses.bin`` stands for silicon: nothing on the host side reads it (the host-attacker model
of ``docs/threat-model.md``).  Every other file is the host's to read and write; the
firmware trusts none of them beyond what the fuses vouch for:

* the ARKs it trusts are the ones whose SHA-256 is fused (format below); the ARK files and the
  manifest only carry the certificates, and a file whose digest is not fused, or a fused digest
  without its file, makes the part refuse to boot (:class:`FactoryDataError`, naming the file);
* every NV record is sealed (:func:`seal_record`): a host reading ``nv.sqlite3`` learns no key, and
  a record altered outside the firmware does not authenticate -- the part refuses to boot with
  :class:`NvTamperedError`, naming the store and the record and saying how to recover.

Fuses (``factory/fuses.bin``, model choice)::

    magic "SEVFUSE2" | u16 secret length | u16 n | secret | n x SHA-256 of a trusted ARK certificate

little-endian; the first digest is the manufacturer's own ARK (the ARK of ``ask_ark.cert``).

Sealed NV record (:func:`seal_record`, model choice -- AMD does not publish its format)::

    magic "SVNR" | version u8 = 1 | nonce[12] | AES-256-GCM(key, nonce, value, aad = header || name)

The key is chip-unique, derived from the CEK scalar (itself derived from the fused secret) with
HKDF-SHA-256 (:meth:`sevemu.firmware.identity.PlatformIdentity.spi_seal_key`); the record's name is
authenticated with it, so records cannot be swapped.  What sealing does not stop is a host that
restores an older copy of the whole store (as it could reflash an SPI chip): the firmware then
boots with that older owner.

NV store (:class:`NvStore`): one table of named records (``name TEXT PRIMARY KEY, value BLOB``), a
``meta`` table counting commits, ``PRAGMA user_version`` for the schema.  Every change is ONE
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rollback-journal mode, ``synchronous=FULL``):
killing the process in the middle of a command leaves the store in its old state (SQLite rolls the
hot journal back at the next open) or, once COMMIT returned, the new one -- never a mix.  The
records the firmware keeps are documented where they are written (:mod:`sevemu.firmware.identity`);
:class:`SealedNv` seals them on the way in and unseals them on the way out.

Manufacturing (:func:`write_factory`) is atomic: ``factory/`` is written into a staging directory
and renamed into place after the (empty, formatted) NV store exists, so a platform directory is
either manufactured completely or not at all, and of two processes manufacturing the same directory
at once exactly one wins (the other gets :class:`PlatformExistsError` and boots the winner's chip).
A directory is only manufactured into when it is new: absent, empty, or holding nothing but an
unused NV store and staging leftovers (:func:`inspect_platform_dir`); a directory with an NV store
that was used but no ``factory/`` is refused (:class:`FactoryMissingError`), and so is any other
non-empty directory (:class:`NotAPlatformError`).

What is *not* here is volatile, as on hardware where it dies with a reset: the platform state (a
restarted firmware is UNINIT), the SEV-ES enable bit and TMR, guest contexts and their keys, ASID
bindings, the DF_FLUSH bookkeeping.

INIT_EX host copy (:func:`seal_host_nv`, model choice): the 32 KiB buffer holds ``magic "SEVEMUNV" |
version u32 = 1 | length u32 | nonce[12] | AES-256-GCM ciphertext||tag`` (the 28-byte header is the
associated data), then 0xFF up to 32 KiB.  The plaintext is the records, sorted by name, each ``u16
name length | name (UTF-8) | u32 value length | value`` (little-endian).  A buffer of all 0xFF or all
0x00 is an erased area (no records).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    "FACTORY_FORMAT",
    "FUSES_MAGIC",
    "HOST_NV_MAGIC",
    "NV_FILENAME",
    "RECORD_MAGIC",
    "FactoryData",
    "FactoryDataError",
    "FactoryMissingError",
    "NotAPlatformError",
    "NvStore",
    "NvStoreError",
    "NvTamperedError",
    "PlatformDirError",
    "PlatformDirState",
    "PlatformExistsError",
    "PlatformReadOnlyError",
    "SealedNv",
    "check_writable",
    "inspect_platform_dir",
    "is_manufactured",
    "pack_fuses",
    "read_factory",
    "seal_host_nv",
    "seal_record",
    "unpack_fuses",
    "unseal_host_nv",
    "unseal_record",
    "write_factory",
]

FACTORY_DIR: Final = "factory"
NV_FILENAME: Final = "nv.sqlite3"
SCHEMA_VERSION: Final = 1
FACTORY_FORMAT: Final = 2

_MANIFEST: Final = "manifest.json"
_FUSES: Final = "fuses.bin"
_CEK: Final = "cek.cert"
_AMD_CHAIN: Final = "ask_ark.cert"
_STAGING_PREFIX: Final = ".factory-"


# ---- errors -------------------------------------------------------------------------------------
class NvStoreError(HardwareError):
    """Raised when the platform directory is missing, malformed or inconsistent (fuses, factory
    data, NV records), or when the NV store cannot be read or written."""


class PlatformDirError(NvStoreError):
    """Raised when a platform directory cannot be used as it is; the message names the file and
    says what to do."""


class NotAPlatformError(PlatformDirError):
    """Raised when a platform would be manufactured into a non-empty directory that holds none."""


class FactoryMissingError(PlatformDirError):
    """Raised when a platform directory has a used NV store but lost its ``factory/`` data."""


class FactoryDataError(PlatformDirError):
    """Raised when a file of ``factory/`` is missing, malformed, or not what the fuses vouch for."""


class PlatformReadOnlyError(PlatformDirError):
    """Raised when the firmware cannot write its NV store in the platform directory."""


class NvTamperedError(PlatformDirError):
    """Raised when an NV record does not authenticate under this chip's key: it was altered outside
    the firmware, or comes from another chip."""


class PlatformExistsError(InputError):
    """Raised when a platform would be manufactured into a directory that already holds one (also
    the loser of two processes manufacturing the same directory at once)."""


def _recover_factory(root: Path) -> str:
    return (f"restore {root / FACTORY_DIR} from a backup; it cannot be made again (the fuses are "
            f"unique to the chip) -- or remove {root} to have a new chip manufactured (a new identity)")


# ---- fuses --------------------------------------------------------------------------------------
FUSES_MAGIC: Final = b"SEVFUSE2"
_FUSES_HEADER: Final = struct.Struct("<8sHH")
_DIGEST: Final = 32


def pack_fuses(chip_secret: bytes, fused_arks: Iterable[bytes]) -> bytes:
    """The contents of ``factory/fuses.bin`` (module docstring)."""
    digests = list(fused_arks)
    if any(len(d) != _DIGEST for d in digests):
        raise InputError("fused ARK digests are SHA-256 digests (32 bytes)")
    return _FUSES_HEADER.pack(FUSES_MAGIC, len(chip_secret), len(digests)) + chip_secret + b"".join(digests)


def unpack_fuses(raw: bytes, where: str = _FUSES) -> tuple[bytes, tuple[bytes, ...]]:
    """(chip secret, fused ARK digests) of ``factory/fuses.bin``; :class:`FactoryDataError` naming
    ``where`` if the bytes are not fuses of this format."""
    if len(raw) < _FUSES_HEADER.size:
        raise FactoryDataError(f"{where}: {len(raw)} bytes, not fuses of format {FACTORY_FORMAT}")
    magic, n_secret, n_arks = _FUSES_HEADER.unpack_from(raw)
    end = _FUSES_HEADER.size + n_secret
    if magic != FUSES_MAGIC or len(raw) != end + _DIGEST * n_arks:
        raise FactoryDataError(f"{where}: not fuses of format {FACTORY_FORMAT} (magic or length wrong)")
    digests = tuple(raw[end + _DIGEST * i : end + _DIGEST * (i + 1)] for i in range(n_arks))
    return raw[_FUSES_HEADER.size : end], digests


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
    """(generation, ARK certificate) the firmware trusts when verifying another platform's chain;
    the manufacturer's own ARK first."""
    sockets: int = 1
    fused_arks: tuple[bytes, ...] = ()
    """SHA-256 of each trusted ARK as the fuses hold it; empty when made: the factory fuses the
    digests of :attr:`trusted_arks`."""
    folder: Path | None = field(default=None, compare=False)
    """Where the data was read from (for error messages)."""

    def __post_init__(self) -> None:
        if not self.fused_arks:
            object.__setattr__(self, "fused_arks",
                               tuple(hashlib.sha256(ark).digest() for _, ark in self.trusted_arks))

    def where(self, name: str) -> str:
        """The path of the factory file ``name`` (relative when the data was not read from disk)."""
        return str(self.folder / name) if self.folder is not None else f"{FACTORY_DIR}/{name}"

    @property
    def trusted_ark_files(self) -> tuple[str, ...]:
        return tuple(f"trusted_ark_{n}.cert" for n in range(len(self.trusted_arks)))


class PlatformDirState(enum.Enum):
    """What :func:`inspect_platform_dir` finds."""

    NEW = "new"
    """Absent, empty, or only an unused NV store and staging leftovers: may be manufactured."""
    MANUFACTURED = "manufactured"
    DAMAGED = "damaged"
    """An NV store that was used, but no ``factory/``."""
    FOREIGN = "foreign"
    """Non-empty, and not a platform."""


def _nv_used(path: Path) -> bool:
    """Whether the NV store at ``path`` was ever committed to (or cannot even be read as one)."""
    if path.stat().st_size == 0:
        return False
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()
            records = conn.execute("SELECT COUNT(*) FROM nv").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return True
    return bool(row is None or row[0] or records)


def inspect_platform_dir(platform_dir: str | os.PathLike[str]) -> PlatformDirState:
    """Classify ``platform_dir`` (see :class:`PlatformDirState`)."""
    root = Path(platform_dir)
    if is_manufactured(root):
        return PlatformDirState.MANUFACTURED
    if not root.exists():
        return PlatformDirState.NEW
    if not root.is_dir():
        return PlatformDirState.FOREIGN
    state = PlatformDirState.NEW
    for entry in root.iterdir():
        if entry.name.startswith(_STAGING_PREFIX) and entry.is_dir():
            continue
        if entry.name in (NV_FILENAME, NV_FILENAME + "-journal") and entry.is_file():
            if entry.name == NV_FILENAME and _nv_used(entry):
                state = PlatformDirState.DAMAGED
            continue
        if entry.name == FACTORY_DIR:  # a factory/ without its manifest: damaged factory data
            return PlatformDirState.DAMAGED
        return PlatformDirState.FOREIGN
    return state


def is_manufactured(platform_dir: str | os.PathLike[str]) -> bool:
    """``platform_dir`` holds factory data (the chip was made)."""
    return (Path(platform_dir) / FACTORY_DIR / _MANIFEST).is_file()


def _check_usable(root: Path) -> None:
    state = inspect_platform_dir(root)
    if state is PlatformDirState.MANUFACTURED:
        raise PlatformExistsError(f"{root} already holds a manufactured platform")
    if state is PlatformDirState.DAMAGED and (root / FACTORY_DIR).exists():
        raise FactoryDataError(f"{root / FACTORY_DIR / _MANIFEST}: missing from the factory data. To recover, "
                               + _recover_factory(root))
    if state is PlatformDirState.DAMAGED:
        raise FactoryMissingError(f"{root} holds a used NV store ({NV_FILENAME}) but no complete "
                                  f"{FACTORY_DIR}/: the chip's fuses and certificates are gone. To recover, "
                                  + _recover_factory(root))
    if state is PlatformDirState.FOREIGN:
        raise NotAPlatformError(f"{root} is not empty and holds no sevemu platform; choose an empty or new "
                                "directory for a platform")


def check_writable(root: Path) -> None:
    """:class:`PlatformReadOnlyError` naming the file unless the firmware can write its NV store in
    the platform directory ``root``."""
    nv = root / NV_FILENAME
    for path in (root, nv):
        if path.exists() and not os.access(path, os.W_OK):
            raise PlatformReadOnlyError(f"{path}: not writable, and the firmware keeps its NV store "
                                        f"{nv} there (with a journal beside it); make {root} and {nv} "
                                        "writable (e.g. chmod u+w) or use another platform directory")


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(path, mode)


def write_factory(platform_dir: str | os.PathLike[str], data: FactoryData) -> Path:
    """Manufacture: write ``data`` under ``platform_dir/factory`` (all or nothing); returns the dir.

    Raises :class:`PlatformExistsError` if the directory already holds a manufactured chip (or
    another process manufactured it meanwhile), :class:`FactoryMissingError` /
    :class:`NotAPlatformError` for a directory that may not become a platform (module docstring),
    :class:`PlatformReadOnlyError` if it is not writable.
    """
    root = Path(platform_dir)
    _check_usable(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlatformReadOnlyError(f"{root}: cannot create the platform directory: {exc.strerror}") from None
    check_writable(root)
    final = root / FACTORY_DIR
    try:
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=root))
    except OSError as exc:
        raise PlatformReadOnlyError(f"{root}: cannot write the factory data: {exc.strerror}") from None
    try:
        _write_private(staging / _FUSES, pack_fuses(data.chip_secret, data.fused_arks), 0o400)
        _write_private(staging / _CEK, data.cek_cert, 0o444)
        _write_private(staging / _AMD_CHAIN, data.amd_chain, 0o444)
        arks = []
        for (generation, ark), name in zip(data.trusted_arks, data.trusted_ark_files, strict=True):
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
        NvStore.open(root).close()  # the SPI flash leaves the factory formatted (and empty)
        try:
            os.rename(staging, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise PlatformExistsError(f"{root} was manufactured by another process meanwhile") from None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def read_factory(platform_dir: str | os.PathLike[str]) -> FactoryData:
    """The factory data of ``platform_dir``; errors name the file (:class:`FactoryDataError`),
    :class:`FactoryMissingError` for a used platform that lost ``factory/``, :class:`NvStoreError`
    for a directory where no chip was made."""
    root = Path(platform_dir)
    folder = root / FACTORY_DIR
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        if inspect_platform_dir(root) is PlatformDirState.DAMAGED:
            raise FactoryMissingError(f"{root}: {manifest_path} is missing although the NV store was used: "
                                      "the factory data is gone. To recover, " + _recover_factory(root))
        raise NvStoreError(f"{root} is not a manufactured platform: {manifest_path} missing")
    current = manifest_path
    try:
        manifest: Any = json.loads(manifest_path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FACTORY_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise FactoryDataError(f"{manifest_path}: factory data of format {found!r}, this sevemu reads "
                                   f"format {FACTORY_FORMAT} (platforms made before trust anchors were fused "
                                   "cannot be booted: move the directory away to have a new chip made)")
        generation = manifest.get("generation")
        sockets = manifest.get("sockets")
        arks_meta = manifest.get("trusted_arks")
        if not isinstance(generation, str) or not isinstance(sockets, int) or not isinstance(arks_meta, list):
            raise FactoryDataError(f"{manifest_path}: malformed manifest (generation, sockets, trusted_arks)")
        arks: list[tuple[str, bytes]] = []
        for entry in arks_meta:
            if not (isinstance(entry, dict) and isinstance(entry.get("generation"), str)
                    and isinstance(entry.get("file"), str) and "/" not in entry["file"]):
                raise FactoryDataError(f"{manifest_path}: malformed trusted_arks entry {entry!r}")
            current = folder / entry["file"]
            arks.append((entry["generation"], current.read_bytes()))
        current = folder / _FUSES
        secret, fused = unpack_fuses(current.read_bytes(), str(current))
        current = folder / _CEK
        cek = current.read_bytes()
        current = folder / _AMD_CHAIN
        amd = current.read_bytes()
    except FileNotFoundError:
        raise FactoryDataError(f"{current}: missing from the factory data. To recover, "
                               + _recover_factory(root)) from None
    except OSError as exc:
        raise FactoryDataError(f"{current}: unreadable factory data: {exc.strerror}") from None
    except ValueError as exc:
        raise FactoryDataError(f"{current}: unreadable factory data: {exc}") from None
    return FactoryData(generation=generation, chip_secret=secret, cek_cert=cek, amd_chain=amd,
                       trusted_arks=tuple(arks), sockets=sockets, fused_arks=fused, folder=folder)


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

    def commit(self, put: Mapping[str, bytes], delete: Iterable[str] = (), *, reset: bool = False,
               unless_any: Iterable[str] = ()) -> int:
        """In ONE transaction: drop every record if ``reset``, delete ``delete``, write ``put``.

        With ``unless_any``, nothing is written when the store already holds one of those records
        (the first boot of two processes racing: the second keeps what the first committed).
        Returns the new commit count.  Raises :class:`NvStoreError` (nothing changed) on failure.
        """
        guard = tuple(unless_any)
        try:
            with self._transaction() as c:
                if guard and c.execute(f"SELECT 1 FROM nv WHERE name IN ({','.join('?' * len(guard))})",
                                       guard).fetchone():
                    return int(c.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()[0])
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


# ---- sealed records -----------------------------------------------------------------------------
RECORD_MAGIC: Final = b"SVNR"
_RECORD_VERSION: Final = 1
_RECORD_HEADER: Final = struct.Struct("<4sB12s")


def seal_record(key: bytes, name: str, value: bytes, nonce: bytes) -> bytes:
    """``value`` of the NV record ``name`` sealed with ``key`` (module docstring)."""
    header = _RECORD_HEADER.pack(RECORD_MAGIC, _RECORD_VERSION, nonce)
    return header + AESGCM(key).encrypt(nonce, bytes(value), header + name.encode())


def unseal_record(key: bytes, name: str, sealed: bytes) -> bytes:
    """The value of the sealed NV record ``name``; :class:`NvTamperedError` if it does not
    authenticate (altered, another chip's, or stored under another name)."""
    if len(sealed) < _RECORD_HEADER.size + 16:
        raise NvTamperedError(f"NV record {name!r}: too short to be sealed")
    header = sealed[: _RECORD_HEADER.size]
    magic, version, nonce = _RECORD_HEADER.unpack(header)
    if magic != RECORD_MAGIC or version != _RECORD_VERSION:
        raise NvTamperedError(f"NV record {name!r}: not a sealed record")
    try:
        return AESGCM(key).decrypt(nonce, sealed[_RECORD_HEADER.size :], header + name.encode())
    except InvalidTag:
        raise NvTamperedError(f"NV record {name!r}: does not authenticate with this chip's key") from None


class SealedNv:
    """The NV store as the firmware uses it: records sealed with the chip's key on every commit and
    unsealed on every read (module docstring)."""

    def __init__(self, store: NvStore, key: bytes, rng: Callable[[int], bytes]) -> None:
        self.store = store
        self._key = key
        self._rng = rng

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def connection(self) -> sqlite3.Connection:
        return self.store.connection

    @property
    def commits(self) -> int:
        return self.store.commits

    def read(self) -> dict[str, bytes]:
        """Every record, unsealed; :class:`NvTamperedError` (naming the store, the record and the way
        to recover) if one does not authenticate."""
        out = {}
        for name, sealed in self.store.read().items():
            try:
                out[name] = unseal_record(self._key, name, sealed)
            except NvTamperedError as exc:
                raise NvTamperedError(
                    f"{self.path}: {exc}: the NV store was altered outside the firmware, and the firmware "
                    f"refuses to use it. To recover, restore {self.path.name} from a backup, or remove it: "
                    "the platform then starts self-owned with new OCA, PEK and PDH keys") from None
        return out

    def _seal(self, put: Mapping[str, bytes]) -> dict[str, bytes]:
        return {name: seal_record(self._key, name, value, self._rng(12)) for name, value in put.items()}

    def commit(self, put: Mapping[str, bytes], delete: Iterable[str] = (), *, reset: bool = False,
               unless_any: Iterable[str] = ()) -> int:
        """:meth:`NvStore.commit` of ``put`` sealed."""
        return self.store.commit(self._seal(put), delete, reset=reset, unless_any=unless_any)

    def close(self) -> None:
        self.store.close()


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
