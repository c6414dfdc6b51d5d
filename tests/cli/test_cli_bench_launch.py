"""``sevemu bench launch``: a small run reports every figure, wall-clock and CPU-time ratios alike."""

from __future__ import annotations

import json

import pytest

from sevemu.cli.bench_launch import TARGET_RATIO, bench_launch
from sevemu.cli.main import main


def test_small_run_reports_wall_and_cpu_ratios() -> None:
    r = bench_launch("milan", 4 << 20, repeat=2)
    assert r["rounds"] == 2 and r["bytes"] == 4 << 20
    assert r["firmware_commands"] >= 1
    assert 0 < r["firmware_seconds"] <= r["launch_seconds"]
    assert r["floor_seconds"] == pytest.approx(r["baseline_seconds"] + r["sha256_seconds"])
    assert r["ratio"] == pytest.approx(r["floor_seconds"] / r["launch_seconds"])
    assert r["cpu_ratio"] == pytest.approx(r["floor_cpu_seconds"] / r["launch_cpu_seconds"])
    assert r["target_ratio"] == TARGET_RATIO


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "launch", "--size", "2", "--repeat", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"ratio", "cpu_ratio", "load_average", "max_seconds"} <= set(r)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_sha_engine_mode_is_used_reported_and_restored(capsys: pytest.CaptureFixture[str], mode: str) -> None:
    from sevemu.firmware import sha_engine

    before = sha_engine.mode
    r = bench_launch("milan", 2 << 20, repeat=1, engine=mode)
    assert r["sha_engine"] == mode and r["sha_engine_thread"] is (mode == "on")
    assert sha_engine.mode == before
    assert main(["bench", "launch", "--size", "2", "--repeat", "1", "--sha-engine", mode]) == 0
    out = capsys.readouterr().out
    assert ("beside the encryption" if mode == "on" else "no spare core") in out
    assert "floor: AES + SHA-256 serial" in out and "max(AES, SHA-256)" in out
    assert sha_engine.mode == before


def test_bad_sha_engine_mode_is_refused() -> None:
    from sevemu.errors import InputError

    with pytest.raises(InputError, match="SHA engine mode"):
        bench_launch("milan", 2 << 20, repeat=1, engine="fast")
