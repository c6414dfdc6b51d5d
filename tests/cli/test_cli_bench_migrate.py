"""``sevemu bench migrate`` at its smallest size: the whole two-process path runs and verifies."""

from __future__ import annotations

import argparse
import json

import pytest

from sevemu.cli.bench_migrate import register_migrate, run_migrate


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sevemu bench")
    register_migrate(parser.add_subparsers(dest="bench"))
    return parser.parse_args(["migrate", *argv])


def test_options() -> None:
    args = parse()
    assert (args.size, args.generation, args.json, args.func) == (1024, "milan", False, run_migrate)
    assert parse("--size", "64", "--json").size == 64
    assert args.prealloc and not parse("--no-prealloc").prealloc


def test_smallest_run_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_migrate(parse("--size", "8", "--json", "--timeout", "30")) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verified"] and r["pages"] == 8 * 256 and r["shared_pages"] == 0
    assert r["wire_bytes"] > r["pages"] * 4096  # headers and framing on top of the TRANS bytes
    assert r["migrate_mbps"] > 0 and r["raw_tcp_mbps"] > r["wire_mbps"]
    assert 0 < r["ratio"] < 1
    assert r["destination_prealloc"] is True
    # the source's CPU over the migration's span, the sent VM's teardown after it apart
    assert r["source_cpu_us_per_page"] > 0 and r["source_teardown_cpu_us_per_page"] > 0
    assert r["cpu_bound_mbps"] == pytest.approx(
        4096 / max(r["source_cpu_us_per_page"], r["destination_cpu_us_per_page"]))


def test_smallest_run_verifies_without_a_preallocated_destination(capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-prealloc``: the destination VM is made when START arrives, its pages backed as received."""
    assert run_migrate(parse("--size", "8", "--json", "--timeout", "30", "--no-prealloc")) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verified"] and r["pages"] == 8 * 256 and r["destination_prealloc"] is False


def test_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    from sevemu.cli.main import main

    for argv in (["--size", "0"], ["--size", "7"], ["--timeout", "inf"]):
        assert main(["bench", "migrate", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sevemu: error: ") and err.count("\n") == 1 and "Traceback" not in err
