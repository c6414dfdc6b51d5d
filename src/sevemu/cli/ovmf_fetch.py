"""``sevemu ovmf fetch``: Debian's OVMF images, downloaded and checked with the standard library.

The images ``sevemu run --firmware`` boots come from Debian's ``ovmf`` package.  The machine's own
package may be older than the firmware a user wants (Debian 12's edk2 2022.11 cannot boot as an SNP
guest: docs/ovmf.md), so this command fetches the package of another suite (default ``trixie``,
edk2 2025.02) without apt or dpkg, the way apt checks it:

1. ``dists/<suite>/Release`` from the mirror (default ``http://deb.debian.org/debian``);
2. ``main/binary-amd64/Packages.xz`` (``.gz`` when the Release lists no ``.xz``), whose size and
   SHA256 must be the ones the Release's ``SHA256:`` section gives (Debian's Release says
   ``No-Support-for-Architecture-all: Packages``: the amd64 index lists ``Architecture: all``
   packages such as ``ovmf``);
3. the ``ovmf`` stanza's ``Filename``, whose ``.deb`` must have the stanza's ``Size`` and ``SHA256``;
4. the ``.deb`` is an ``ar`` archive; its ``data.tar.xz`` (or ``.gz``) is read with :mod:`tarfile`
   and the firmware images are written to ``<dest>/<suite>/`` with a ``manifest.json`` (suite,
   version, the .deb's SHA256, each file's SHA256).

Model choice (documented in docs/ovmf.md): the Release file's OpenPGP signature is not checked (no
keyring or OpenPGP implementation in the standard library); the chain is anchored in the Release
file as served, so use an ``https://`` mirror for a transport that is authenticated.  Every later
step is checked against it, and any mismatch stops the fetch with nothing written.

The default destination is ``$SEVEMU_OVMF_DIR``, else ``$XDG_CACHE_HOME/sevemu/ovmf``
(``~/.cache/sevemu/ovmf``); ``sevemu run --firmware trixie`` then finds ``<dest>/trixie/OVMF.fd``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from sevemu._util.paths import user_cache_dir
from sevemu.errors import SevemuError, VerificationError

__all__ = ["DEFAULT_MIRROR", "DEFAULT_SUITE", "FIRMWARE_FILES", "FetchError", "FetchResult", "HashMismatchError",
           "fetch_ovmf", "ovmf_cache_dir", "register", "resolve_firmware"]

DEFAULT_MIRROR: Final = "http://deb.debian.org/debian"
DEFAULT_SUITE: Final = "trixie"
ARCH: Final = "amd64"
FIRMWARE_FILES: Final = ("usr/share/ovmf/OVMF.fd", "usr/share/OVMF/OVMF_CODE_4M.fd", "usr/share/OVMF/OVMF_VARS_4M.fd")
"""The images taken from the package: the unified CODE+VARS image (the one SNP boots, QEMU ``-bios``)
and the 4 MiB split pair; whichever of them the package holds."""
_MAX_INDEX: Final = 256 << 20
_MAX_DEB: Final = 64 << 20
_TIMEOUT: Final = 60.0

Opener = Callable[..., BinaryIO]
"""``urllib.request.urlopen``'s shape: (url, timeout=...) -> a readable response."""


class FetchError(SevemuError):
    """Raised when a firmware download cannot be done (no network, an HTTP error, an index without the package)."""


class HashMismatchError(VerificationError):
    """Raised when a downloaded file's size or SHA256 is not the one its signed-off index gives."""


@dataclass(frozen=True)
class FetchResult:
    suite: str
    version: str
    deb_url: str
    deb_sha256: str
    directory: Path
    files: dict[str, str]
    """Written file name -> its SHA256."""

    def as_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "version": self.version, "deb": self.deb_url, "deb_sha256": self.deb_sha256,
                "directory": str(self.directory), "files": self.files}


def ovmf_cache_dir() -> Path:
    """Where fetched images live: ``$SEVEMU_OVMF_DIR``, else ``$XDG_CACHE_HOME/sevemu/ovmf``."""
    return user_cache_dir("ovmf", "SEVEMU_OVMF_DIR")


def resolve_firmware(name: Path | str) -> Path:
    """``sevemu run --firmware``'s argument: a path, or the short name of a fetched suite (``trixie``:
    ``<cache>/trixie/OVMF.fd``; ``trixie/OVMF_CODE_4M.fd`` for another file of it)."""
    path = Path(name)
    if path.is_file() or path.is_absolute() or str(name).startswith("."):
        return path
    parts = path.parts
    cached = ovmf_cache_dir() / parts[0] / (Path(*parts[1:]) if len(parts) > 1 else Path("OVMF.fd"))
    return cached if cached.is_file() else path


# ---- downloading --------------------------------------------------------------------------------------
def _get(url: str, opener: Opener, limit: int) -> bytes:
    try:
        with opener(url, timeout=_TIMEOUT) as resp:
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FetchError(f"cannot download {url}: {reason} (offline? give --mirror, or copy OVMF.fd and pass "
                         "its path to --firmware)") from None
    if len(data) > limit:
        raise FetchError(f"{url}: larger than {limit >> 20} MiB, refused")
    return data


def _check(what: str, data: bytes, size: int, sha256: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if len(data) != size or got != sha256.lower():
        raise HashMismatchError(f"{what}: expected {size} bytes with SHA256 {sha256.lower()}, got {len(data)} bytes "
                                f"with SHA256 {got} -- nothing written")


def _release_hashes(release: str) -> dict[str, tuple[int, str]]:
    """The Release file's ``SHA256:`` section: path -> (size, hash)."""
    out: dict[str, tuple[int, str]] = {}
    inside = False
    for line in release.splitlines():
        if not line.startswith(" "):
            inside = line.strip() == "SHA256:"
            continue
        if inside:
            fields = line.split()
            if len(fields) == 3 and fields[1].isdigit():
                out[fields[2]] = (int(fields[1]), fields[0])
    return out


def _stanza(packages: str, name: str) -> dict[str, str]:
    """The first stanza of package ``name`` in a Packages index (RFC 822-style paragraphs; a suite's
    index lists one version of a package)."""
    for para in packages.split("\n\n"):
        if not para.startswith(f"Package: {name}\n") and f"\nPackage: {name}\n" not in para:
            continue
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") == name:
            return fields
    return {}


def _ar_members(deb: bytes) -> dict[str, bytes]:
    """The members of a ``.deb`` (a System V ``ar`` archive: 8-byte magic, 60-byte headers)."""
    if not deb.startswith(b"!<arch>\n"):
        raise FetchError("the downloaded .deb is not an ar archive")
    out, pos = {}, 8
    while pos + 60 <= len(deb):
        head = deb[pos : pos + 60]
        if head[58:60] != b"`\n":
            raise FetchError(f"the .deb's ar header at {pos} is malformed")
        name = head[0:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(head[48:58].decode("ascii").strip() or 0)
        out[name] = deb[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def _firmware_from_deb(deb: bytes) -> dict[str, bytes]:
    members = _ar_members(deb)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise FetchError("the .deb has no data.tar member")
    if data_name not in ("data.tar.xz", "data.tar.gz", "data.tar"):
        raise FetchError(f"the .deb's {data_name} needs a decompressor the standard library lacks")
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for member in tar.getmembers():
            path = member.name.removeprefix("./")
            if path in FIRMWARE_FILES and member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    out[path] = f.read()
    if not out:
        raise FetchError(f"the package holds none of {', '.join(FIRMWARE_FILES)}")
    return out


def fetch_ovmf(suite: str = DEFAULT_SUITE, dest: Path | None = None, *, mirror: str = DEFAULT_MIRROR,
               opener: Opener | None = None) -> FetchResult:
    """Download Debian ``suite``'s ``ovmf`` package, check it (module docstring), and write its firmware
    images to ``dest/suite`` (``opener``: ``urllib.request.urlopen`` by default).  Raises :class:`FetchError` / :class:`HashMismatchError`; on any error
    nothing is written."""
    if not suite or "/" in suite or suite.startswith("."):
        raise FetchError(f"not a Debian suite name: {suite!r}")
    opener = opener or urllib.request.urlopen
    root = mirror.rstrip("/")
    release = _get(f"{root}/dists/{suite}/Release", opener, 1 << 20).decode("utf-8", "replace")
    hashes = _release_hashes(release)
    for suffix, unpack in ((".xz", lzma.decompress), (".gz", lambda b: zlib.decompress(b, 16 + zlib.MAX_WBITS))):
        rel = f"main/binary-{ARCH}/Packages{suffix}"
        if rel in hashes:
            break
    else:
        raise FetchError(f"{root}/dists/{suite}/Release lists no SHA256 for main/binary-{ARCH}/Packages.xz or .gz")
    size, sha = hashes[rel]
    index = _get(f"{root}/dists/{suite}/{rel}", opener, _MAX_INDEX)
    _check(f"{suite} {rel}", index, size, sha)
    try:
        packages = unpack(index).decode("utf-8", "replace")
    except (lzma.LZMAError, zlib.error) as exc:
        raise FetchError(f"{suite} {rel}: cannot decompress: {exc}") from None
    stanza = _stanza(packages, "ovmf")
    if not {"Filename", "Size", "SHA256"} <= stanza.keys():
        raise FetchError(f"{suite}'s {rel} has no complete 'ovmf' entry")
    url = f"{root}/{stanza['Filename']}"
    deb = _get(url, opener, _MAX_DEB)
    _check(stanza["Filename"], deb, int(stanza["Size"]), stanza["SHA256"])
    images = _firmware_from_deb(deb)
    directory = (dest if dest is not None else ovmf_cache_dir()) / suite
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for path, data in sorted(images.items()):
        target = directory / Path(path).name
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(target)
        files[target.name] = hashlib.sha256(data).hexdigest()
    result = FetchResult(suite, stanza.get("Version", "?"), url, stanza["SHA256"].lower(), directory, files)
    (directory / "manifest.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return result


# ---- the command ---------------------------------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser("ovmf", help="Debian's OVMF firmware images for `sevemu run --firmware` (docs/ovmf.md)")
    osub = p.add_subparsers(dest="ovmf_command", required=True, metavar="SUBCOMMAND")
    f = osub.add_parser("fetch", help="download Debian's ovmf package of a suite, check it against the suite's "
                                      "Release and Packages index (SHA256), and extract its firmware images",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  sevemu ovmf fetch && sevemu run --firmware trixie --mode snp")
    f.add_argument("--suite", default=DEFAULT_SUITE, help=f"Debian suite (default {DEFAULT_SUITE}: edk2 2025.02)")
    f.add_argument("--dest", type=Path, default=None,
                   help="directory (default $SEVEMU_OVMF_DIR, else ~/.cache/sevemu/ovmf); files go to DEST/SUITE/")
    f.add_argument("--mirror", default=DEFAULT_MIRROR, help=f"Debian mirror (default {DEFAULT_MIRROR})")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    f.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: Any) -> int:
    result = fetch_ovmf(args.suite, args.dest, mirror=args.mirror)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"ovmf {result.version} ({result.suite}), {result.deb_url}: SHA256 verified against the suite's "
              f"Release and Packages index")
        for name, digest in result.files.items():
            print(f"  {result.directory / name}  sha256 {digest[:16]}...")
    return 0
