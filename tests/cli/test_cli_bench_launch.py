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
