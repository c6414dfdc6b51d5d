"""``sevemu bench snp``: runs, its launch digest agrees with the baseline's (the command refuses to
report otherwise), and it reports the rates it promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import fails, run


def test_bench_snp_small(capsys: pytest.CaptureFixture[str]) -> None:
    if not any(Path(p).is_file() for p in ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")):
        pytest.skip("Debian's OVMF is not installed (apt-get install ovmf)")
    rc, out, _ = run(capsys, "bench", "snp", "--vcpus", "2", "--pvalidate-size", "8", "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["launch_s"] > 0 and r["launch_4k_s"] > 0 and r["digest_only_s"] > 0 and len(r["digest"]) == 96
    assert r["pvalidate_4k_per_s"] > 0 and r["pvalidate_2m_per_s"] > 0 and r["pvalidate_bytes"] == 8 << 20


def test_bench_snp_without_an_image(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, "bench", "snp", "--ovmf", str(tmp_path / "missing.fd"))
