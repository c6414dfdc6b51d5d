"""The PSP's SHA engine beside its AES engine (firmware/sha_engine.py): the same digests as one thread,
whichever thread hashes which chunk, the caller's work run exactly once, its failure propagated only
after the engine is done, and the ``auto`` mode's load gate."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sevemu.crypto.pagehash import sha384_pages
from sevemu.firmware import sha_engine

PAGE = 0x1000


def _data(pages: int) -> bytes:
    return b"".join(hashlib.sha512(i.to_bytes(4, "little")).digest() * (PAGE // 64) for i in range(pages))


def _want(data: bytes) -> bytes:
    return b"".join(hashlib.sha384(data[i : i + PAGE]).digest() for i in range(0, len(data), PAGE))


@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("pages", [1, 15, 16, 17, 512])
def test_digests_equal_one_thread(monkeypatch: pytest.MonkeyPatch, mode: str, pages: int) -> None:
    monkeypatch.setattr(sha_engine, "mode", mode)
    data = _data(pages)
    ran: list[int] = []
    assert sha_engine.hash_pages_beside(data, lambda: ran.append(1)) == _want(data) == sha384_pages(data)
    assert ran == [1]


def test_the_engine_hashes_while_the_caller_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha_engine, "mode", "on")
    data = _data(512)
    seen: list[str] = []
    real = sha384_pages

    def spy(view: memoryview, size: int) -> bytes:
        import threading
        seen.append(threading.current_thread().name)
        return real(view, size)

    monkeypatch.setattr(sha_engine, "sha384_pages", spy)
    got = sha_engine.hash_pages_beside(data, lambda: None)
    assert got == _want(data)
    assert len(seen) == sha_engine.CHUNKS  # every chunk hashed once, by whichever thread claimed it


def test_work_failure_propagates_after_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha_engine, "mode", "on")
    data = bytearray(_data(64))

    def boom() -> None:
        raise RuntimeError("AES engine fault")

    with pytest.raises(RuntimeError, match="AES engine fault"):
        sha_engine.hash_pages_beside(data, boom)
    # the engine is idle again and answers the next request correctly
    assert sha_engine.hash_pages_beside(data, lambda: None) == _want(bytes(data))


def test_auto_engages_only_with_a_core_spare_now(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``auto`` reads the tasks runnable at this instant (the caller among them) against the CPUs it may
    use, not the minute-long load average: an idle host right after a busy minute engages the engine."""
    monkeypatch.setattr(sha_engine, "mode", "auto")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 2.0, 1.0))  # a busy minute behind
    loadavg = tmp_path / "loadavg"
    monkeypatch.setattr(sha_engine, "LOADAVG", str(loadavg))
    for line, want in [("3.50 2.00 1.00 1/180 4242\n", True), ("3.50 2.00 1.00 2/180 4242\n", False),
                       ("0.10 0.10 0.10 3/180 4242\n", False)]:
        loadavg.write_text(line)
        assert sha_engine.runnable_tasks() == int(line.split()[3].split("/")[0])
        assert sha_engine.engaged() is want
    loadavg.write_text("garbled\n")  # unreadable: the load average decides
    assert sha_engine.runnable_tasks() is None
    assert not sha_engine.engaged()


def test_auto_falls_back_to_the_load_average(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sha_engine, "mode", "auto")
    monkeypatch.setattr(sha_engine, "LOADAVG", str(tmp_path / "absent"))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert sha_engine.engaged()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.5, 0.5, 0.5))
    assert not sha_engine.engaged()
    monkeypatch.setattr(sha_engine, "mode", "on")
    assert sha_engine.engaged()
    monkeypatch.setattr(sha_engine, "mode", "off")
    assert not sha_engine.engaged()


def test_start_returns_once_the_engine_runs_the_job_while_the_caller_holds_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``start`` hands the GIL to the engine's thread at once: the job has begun when it returns, even
    though the caller goes on running Python (a plain ``submit`` would leave the job waiting for the
    caller's switch interval, 5 ms); its result is the function's.  The bound on the wait is raised so
    that a loaded machine, whose scheduler may start the engine's thread late, cannot fail the test:
    what it checks is the handoff, not the machine's latency."""
    import time

    monkeypatch.setattr(sha_engine, "START_WAIT_S", 5.0)
    began: list[float] = []

    def job() -> bytes:
        began.append(time.perf_counter())
        return sha384_pages(_data(64), PAGE)

    for _ in range(5):
        began.clear()
        done = sha_engine.start(job)
        returned = time.perf_counter()
        while time.perf_counter() - returned < 0.003:  # Python work that never gives up the GIL by itself
            pass
        assert done.result() == _want(_data(64))
        assert began and began[0] <= returned


def test_start_behind_a_busy_engine_does_not_wait_and_cancelled_jobs_free_it() -> None:
    """Behind a running job ``start`` returns at once (the engine is busy; waiting would only stall the
    caller); a job cancelled before it ran still counts as finished, so the engine is idle again."""
    import threading
    import time

    release = threading.Event()
    first = sha_engine.start(lambda: release.wait(5))
    t0 = time.perf_counter()
    second = sha_engine.start(lambda: b"second")
    waited = time.perf_counter() - t0
    assert second.cancel()  # (still queued behind the first)
    release.set()
    assert first.result() is True
    assert waited < sha_engine.START_WAIT_S
    assert sha_engine._OUTSTANDING[0] == 0
