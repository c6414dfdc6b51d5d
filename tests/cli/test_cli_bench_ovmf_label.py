"""``sevemu bench ovmf``: which image the figures are of (path, size, SHA256, the Debian version of a
fetched suite), and ``--ovmf`` taking a fetched suite's name."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from sevemu.cli.bench_ovmf import image_label, run_ovmf_bench
from sevemu.errors import InputError


def test_the_label_names_the_image_and_the_debian_version_only_when_the_manifest_lists_it(tmp_path: Path) -> None:
    image = b"\x90" * 4096
    path = tmp_path / "OVMF.fd"
    path.write_bytes(image)
    digest = hashlib.sha256(image).hexdigest()
    assert image_label(path, image) == f"{path} (4 KiB, SHA256 {digest[:16]})"
    (tmp_path / "manifest.json").write_text(json.dumps({"version": "2025.02-8+deb13u1", "files": {"OVMF.fd": digest}}))
    assert image_label(path, image).endswith(", Debian ovmf 2025.02-8+deb13u1)")
    # another image under the same name is not the manifest's: no version claimed
    assert "Debian" not in image_label(path, b"\xcc" * 4096)


def test_ovmf_takes_a_suite_name_from_the_cache_and_says_how_to_get_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEVEMU_OVMF_DIR", str(tmp_path))
    args = argparse.Namespace(ovmf="trixie", modes="snp", timeout=1.0, json=False, quiet=True)
    with pytest.raises(InputError, match="sevemu ovmf fetch"):
        run_ovmf_bench(args)
    (tmp_path / "trixie").mkdir()
    (tmp_path / "trixie" / "OVMF.fd").write_bytes(b"\x90")
    args = argparse.Namespace(ovmf="trixie", modes="nonsense", timeout=1.0, json=False, quiet=True)
    with pytest.raises(InputError, match="unknown mode"):  # (resolved to the cached image, then the modes checked)
        run_ovmf_bench(args)
    assert args.ovmf == tmp_path / "trixie" / "OVMF.fd"
