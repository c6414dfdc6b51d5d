"""Smoke tests of ``sevemu bench memory``: the figures exist and measure what they claim."""

from __future__ import annotations

from sevemu.cli import bench


def test_guest_load_benchmark_hits_and_misses() -> None:
    r = bench._guest_loads("milan", 4000)
    for via in ("port", "engine"):
        assert r[f"load_hit_{via}_hit_rate"] == 1.0  # the working set stays in the cache
        assert r[f"load_miss_{via}_hit_rate"] == 0.0  # every load of the sweep fills from DRAM
        assert r[f"load_hit_{via}_per_s"] > 0 and r[f"load_miss_{via}_per_s"] > 0


def test_bulk_benchmark_reports_every_mode() -> None:
    from sevemu.crypto.membench import bench_modes

    rows = bench_modes(1 << 20)
    assert {row["mode"] for row in rows} == {"xe", "xex", "aes-256-xts"}
    assert all(row["ratio"] > 0 for row in rows)
