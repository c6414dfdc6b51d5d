"""``sevemu bench snp``: runs, its launch digest agrees with the baseline's (the command refuses to
report otherwise), and it reports the rates it promises."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
from clikit import fails, run


def test_bench_snp_small(capsys: pytest.CaptureFixture[str]) -> None:
    if not any(Path(p).is_file() for p in ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")):
        pytest.skip("Debian's OVMF is not installed (apt-get install ovmf)")
    rc, out, _ = run(capsys, "bench", "snp", "--vcpus", "2", "--repeat", "1", "--pvalidate-size", "8", "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["launch_s"] > 0 and r["launch_4k_s"] > 0 and r["digest_only_s"] > 0 and len(r["digest"]) == 96
    assert r["launch_cpu_s"] > 0 and r["digest_only_cpu_s"] > 0 and r["repeat"] == 1
    assert all(isinstance(r[k], int) and r[k] >= 0 for k in ("launch_minflt", "launch_4k_minflt", "digest_only_minflt"))
    assert r["pvalidate_4k_per_s"] > 0 and r["pvalidate_2m_per_s"] > 0 and r["pvalidate_bytes"] == 8 << 20


def test_bench_snp_without_an_image(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fails(capsys, "bench", "snp", "--ovmf", str(tmp_path / "missing.fd"))


def test_best_of_warms_up_and_refuses_a_differing_digest() -> None:
    from sevemu.cli import bench_snp
    from sevemu.errors import InputError

    calls: list[int] = []

    def fn() -> tuple[bytes, bench_snp.Timing]:
        calls.append(1)
        return b"d", bench_snp.Timing(wall=[5.0, 3.0, 1.0, 2.0][(len(calls) - 1) % 4], cpu=0.5)

    ld, best = bench_snp.best_of(3, fn, b"d", "x")
    assert (ld, best.wall, len(calls)) == (b"d", 1.0, 4)  # the warm-up's 5.0 is not a candidate
    with pytest.raises(InputError, match="differs"):
        bench_snp.best_of(2, fn, b"other", "x")
    flips = iter([b"a", b"a", b"b"])
    with pytest.raises(InputError, match="differs"):
        bench_snp.best_of(2, lambda: (next(flips), bench_snp.Timing(1.0, 1.0)), None, "x")


def test_bench_snp_refuses_to_compare_different_digests(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    if not any(Path(p).is_file() for p in ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")):
        pytest.skip("Debian's OVMF is not installed (apt-get install ovmf)")
    from sevemu.cli import bench_snp

    real = bench_snp.launch

    def wrong(*a: object, **k: bool) -> tuple[bytes, bench_snp.Timing]:
        _, t = real(*a, **k)  # type: ignore[arg-type]
        return bytes(48), t

    monkeypatch.setattr(bench_snp, "launch", wrong)
    fails(capsys, "bench", "snp", "--vcpus", "1", "--repeat", "1", "--pvalidate-size", "8")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_bench_snp_sha_engine_modes_agree_and_are_reported(capsys: pytest.CaptureFixture[str], mode: str) -> None:
    if not any(Path(p).is_file() for p in ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")):
        pytest.skip("Debian's OVMF is not installed (apt-get install ovmf)")
    from sevemu.firmware import sha_engine

    before = sha_engine.mode
    rc, out, _ = run(capsys, "bench", "snp", "--vcpus", "1", "--repeat", "1", "--pvalidate-size", "8",
                     "--sha-engine", mode, "--json")
    assert rc == 0  # (the command refuses to report when a launch's digest differs from the calculator's)
    r = json.loads(out)
    assert r["sha_engine"] == mode and r["sha_engine_thread"] is (mode == "on")
    assert sha_engine.mode == before  # the bench leaves the process's mode as it found it
    rc, out, _ = run(capsys, "bench", "snp", "--vcpus", "1", "--repeat", "1", "--pvalidate-size", "8",
                     "--sha-engine", mode)
    assert "SHA engine runs beside its AES engine" in out and "CPU time counts every thread" in out


def test_timed_counts_the_minor_page_faults_of_the_timed_part() -> None:
    """``Timing.minflt`` is the page faults taken inside the timed function: touching 8 MiB of memory
    the process never had faults it in page by page; a function touching nothing new takes (almost)
    none."""
    from sevemu.cli import bench_snp

    size = 8 << 20
    held: list[mmap.mmap] = []

    def touch() -> bytes:
        buf = mmap.mmap(-1, size)  # anonymous: no page backed until its first write below
        for off in range(0, size, 4096):
            buf[off] = 1
        held.append(buf)
        return b"t"

    out, t = bench_snp._timed(touch)
    held[0].close()
    assert out == b"t" and t.minflt >= size // 4096 // 2 and t.cpu >= 0 and t.wall > 0
    _, quiet = bench_snp._timed(lambda: b"q")
    assert quiet.minflt < size // 4096 // 8
