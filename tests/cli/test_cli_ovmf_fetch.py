"""`sevemu ovmf fetch` (cli/ovmf_fetch.py): Debian's ovmf package checked against the suite's Release
and Packages index, extracted without dpkg.  No network: a fake mirror behind a monkeypatched opener
(and, for the offline case, a local port nobody listens on)."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import socket
import tarfile
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sevemu.cli import ovmf_fetch
from sevemu.cli.main import main
from sevemu.cli.ovmf_fetch import FetchError, HashMismatchError, fetch_ovmf, resolve_firmware

MIRROR = "http://mirror.test/debian"
FD = b"\x5a" * 0x2000  # stand-ins for the images
CODE = b"\xc0" * 0x1000


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("./usr/share/qemu/OVMF.fd")
        link.type, link.linkname = tarfile.SYMTYPE, "../ovmf/OVMF.fd"
        tar.addfile(link)
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{644:<8}{len(data):<10}".encode() + b"`\n" + data
        out += b"\n" if len(data) & 1 else b""
    return out


def _mirror(*, deb: bytes | None = None, break_index: bool = False, deb_sha: str | None = None) -> dict[str, bytes]:
    if deb is None:
        deb = _ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x",
                   "data.tar.xz": _tar_xz({"./usr/share/ovmf/OVMF.fd": FD, "./usr/share/OVMF/OVMF_CODE_4M.fd": CODE,
                                           "./usr/share/doc/ovmf/copyright": b"BSD"})})
    stanza = (f"Package: ovmf\nSource: edk2\nVersion: 2025.02-8\nArchitecture: all\n"
              f"Filename: pool/main/e/edk2/ovmf_2025.02-8_all.deb\nSize: {len(deb)}\n"
              f"SHA256: {deb_sha or hashlib.sha256(deb).hexdigest()}\n")
    packages = f"Package: other\nVersion: 1\n\n{stanza}\nPackage: zzz\nVersion: 2\n".encode()
    xz = lzma.compress(packages)
    listed = hashlib.sha256(xz).hexdigest()
    if break_index:
        listed = hashlib.sha256(b"another index").hexdigest()
    release = (f"Origin: Debian\nCodename: trixie\nSHA256:\n {'0' * 64} 12 main/binary-all/Packages.xz\n"
               f" {listed} {len(xz)} main/binary-amd64/Packages.xz\n").encode()
    return {f"{MIRROR}/dists/trixie/Release": release, f"{MIRROR}/dists/trixie/main/binary-amd64/Packages.xz": xz,
            f"{MIRROR}/pool/main/e/edk2/ovmf_2025.02-8_all.deb": deb}


def _opener(files: dict[str, bytes], seen: list[str] | None = None) -> Callable[..., Any]:
    def open_(url: str, timeout: float = 0) -> io.BytesIO:
        if seen is not None:
            seen.append(url)
        if url not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore[arg-type]
        return io.BytesIO(files[url])
    return open_


def test_fetch_checks_the_chain_and_extracts_the_images(tmp_path: Path) -> None:
    seen: list[str] = []
    r = fetch_ovmf("trixie", tmp_path, mirror=MIRROR, opener=_opener(_mirror(), seen))
    assert seen == [f"{MIRROR}/dists/trixie/Release", f"{MIRROR}/dists/trixie/main/binary-amd64/Packages.xz",
                    f"{MIRROR}/pool/main/e/edk2/ovmf_2025.02-8_all.deb"]
    assert r.version == "2025.02-8" and r.directory == tmp_path / "trixie"
    assert (tmp_path / "trixie" / "OVMF.fd").read_bytes() == FD
    assert (tmp_path / "trixie" / "OVMF_CODE_4M.fd").read_bytes() == CODE
    assert sorted(p.name for p in (tmp_path / "trixie").iterdir()) == ["OVMF.fd", "OVMF_CODE_4M.fd", "manifest.json"]
    manifest = json.loads((tmp_path / "trixie" / "manifest.json").read_text())
    assert manifest["files"]["OVMF.fd"] == hashlib.sha256(FD).hexdigest() and manifest["version"] == "2025.02-8"


@pytest.mark.parametrize("attack", ["index", "deb"])
def test_a_tampered_index_or_package_is_refused_and_nothing_is_written(tmp_path: Path, attack: str) -> None:
    """The host-side attacker here is the network: a Packages index that is not the one the Release
    names, a .deb that is not the one the index names."""
    files = _mirror(break_index=attack == "index")
    if attack == "deb":
        url = f"{MIRROR}/pool/main/e/edk2/ovmf_2025.02-8_all.deb"
        files[url] = files[url][:-1] + bytes([files[url][-1] ^ 1])
    with pytest.raises(HashMismatchError, match="SHA256") as exc:
        fetch_ovmf("trixie", tmp_path, mirror=MIRROR, opener=_opener(files))
    assert ("Packages.xz" if attack == "index" else "ovmf_2025.02-8_all.deb") in str(exc.value)
    assert not any(tmp_path.iterdir())


def test_errors_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_ovmf("sid", tmp_path, mirror=MIRROR, opener=_opener(_mirror()))
    no_ovmf = _mirror(deb=_ar({"debian-binary": b"2.0\n", "data.tar.xz": _tar_xz({"./usr/share/doc/x": b"x"})}))
    with pytest.raises(FetchError, match="holds none of"):
        fetch_ovmf("trixie", tmp_path, mirror=MIRROR, opener=_opener(no_ovmf))
    with pytest.raises(FetchError, match="not a Debian suite"):
        fetch_ovmf("../etc", tmp_path, mirror=MIRROR, opener=_opener(_mirror()))
    # offline: a local port nobody listens on, through the real opener and the command line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["ovmf", "fetch", "--mirror", f"http://127.0.0.1:{port}/debian", "--dest", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot download" in err[0] and "offline?" in err[0], err
    monkeypatch.setattr(ovmf_fetch.urllib.request, "urlopen", _opener(_mirror(deb_sha="0" * 64)))
    rc = main(["ovmf", "fetch", "--mirror", MIRROR, "--dest", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "expected" in err[0] and "SHA256" in err[0], err
    assert not any(tmp_path.iterdir())


def test_run_finds_a_fetched_suite_by_its_short_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEVEMU_OVMF_DIR", str(tmp_path))
    fetch_ovmf("trixie", None, mirror=MIRROR, opener=_opener(_mirror()))
    assert resolve_firmware("trixie") == tmp_path / "trixie" / "OVMF.fd"
    assert resolve_firmware("trixie/OVMF_CODE_4M.fd") == tmp_path / "trixie" / "OVMF_CODE_4M.fd"
    assert resolve_firmware("bookworm") == Path("bookworm")  # not fetched: left as given (the run says so)
    assert resolve_firmware("/usr/share/ovmf/OVMF.fd") == Path("/usr/share/ovmf/OVMF.fd")
