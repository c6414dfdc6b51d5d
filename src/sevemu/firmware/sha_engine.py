"""The PSP's SHA engine beside its AES engine: hashing that runs while the firmware encrypts.

The Secure Processor hashes and encrypts with separate engines (its cryptographic co-processor has
several queues), so a large update's SHA-384 and its encryption proceed together.  The model's engine is
a pool of :data:`QUEUES` worker threads (made on first use, shared by every firmware of the process):
OpenSSL's SHA-384 (``hashlib`` and ``csrc/sha384_accel.c``) drops the GIL while it hashes, so a queue
hashes while the calling thread encrypts and writes back.  Used by SEV's LAUNCH_UPDATE_DATA
(:mod:`sevemu.firmware.sev.launch`, one chunk at a time, in order) and SNP_LAUNCH_UPDATE of a 2 MiB page
(:meth:`sevemu.firmware.snp.state.SnpGuest.measure`: the page's whole measurement, hashes and PAGE_INFO
chain, as one job; :func:`hash_pages_later` gives a page's hashes alone, in chunks the caller shares);
both follow :data:`mode` (:func:`engaged`).

The results are the bytes a single thread computes (the pieces are independent; the tests compare);
only the wall-clock time changes.  CPU time is unchanged: every queue's work is the process's.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

from sevemu._util.units import PAGE
from sevemu.crypto.pagehash import sha384_pages

__all__ = ["CHUNKS", "LOADAVG", "MODES", "QUEUES", "PendingHashes", "engaged", "hash_pages_beside", "hash_pages_later",
           "mode", "runnable_tasks", "sha_engine", "start"]

QUEUES: Final = 1
"""Worker threads of the engine (model choice: the machines sevemu runs on have few cores)."""

CHUNKS: Final = 8
"""Pieces of work a large hash is cut in (:func:`hash_pages_beside`)."""

_ENGINE: list[ThreadPoolExecutor] = []

MODES: Final = ("auto", "on", "off")
mode = "auto"
"""Whether :func:`hash_pages_beside` and SEV's streamed LAUNCH_UPDATE_DATA hand work to the engine's
thread: ``on``, ``off`` (the calling thread hashes everything), or ``auto`` (default): only while the
host has a core to spare now -- the tasks runnable at this instant (the caller among them; Linux's
``/proc/loadavg``, fourth field) at least one fewer than the CPUs this process may run on, or where
that count is unavailable the one-minute load average at least one below them.  (The load average
alone lags a minute behind: right after a test run or another benchmark it kept the engine off on
an idle host.)  A thread that waits for a core only adds scheduling delays and cache misses
(measured: a 2 MiB page took longer with the engine on a saturated 2-core host; a 64 MiB
LAUNCH_UPDATE_DATA cost 124-128 ms of CPU with the thread and 110-123 ms without, at load 6 on 2
cores)."""


def engaged() -> bool:
    """Whether the engine's thread is used now (:data:`mode`)."""
    if mode == "auto":
        cpus = _usable_cpus()
        runnable = runnable_tasks()
        if runnable is not None:
            return runnable + 1 <= cpus
        try:
            return os.getloadavg()[0] + 1 <= cpus
        except OSError:  # pragma: no cover - no load average on this platform
            return cpus > 1
    return mode == "on"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


LOADAVG: Final = "/proc/loadavg"


def runnable_tasks() -> int | None:
    """The tasks runnable on the host at this instant, the calling thread among them (the numerator
    of ``/proc/loadavg``'s fourth field, proc(5)); None where the file is absent or unreadable."""
    try:
        with open(LOADAVG, "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def sha_engine() -> ThreadPoolExecutor:
    """The engine's worker threads (made on first use)."""
    if not _ENGINE:
        _ENGINE.append(ThreadPoolExecutor(max_workers=QUEUES, thread_name_prefix="psp-sha"))
    return _ENGINE[0]


_T = TypeVar("_T")

_OUTSTANDING = [0]
"""Jobs :func:`start` submitted that have not finished (the engine is idle at 0)."""
_OUTSTANDING_LOCK = threading.Lock()

START_WAIT_S: Final = 0.002
"""How long :func:`start` waits at most for the engine's thread to begin a job."""


def start(fn: Callable[[], _T]) -> Future[_T]:
    """Submit ``fn`` (whose work drops the GIL: OpenSSL's hashing) to the engine and return once the
    engine's thread has begun it (or after :data:`START_WAIT_S`).  A plain ``submit`` leaves the worker
    waiting for the GIL until the caller's thread gives it up, which a thread running Python does only
    every ``sys.getswitchinterval()`` (5 ms): measured on SNP_LAUNCH_UPDATE of a 2 MiB page, the job
    began 4.9 ms after its submission, when the firmware had finished every other command, and the
    hashing never overlapped them.  Waiting here (the GIL released) hands the GIL over at once; only when
    the engine is idle (behind another job it is busy, and the caller would only stall)."""
    begun = threading.Event()

    def job() -> _T:
        begun.set()
        return fn()

    def finished(_: Future[_T]) -> None:  # (run or cancelled)
        with _OUTSTANDING_LOCK:
            _OUTSTANDING[0] -= 1

    done = sha_engine().submit(job)
    with _OUTSTANDING_LOCK:
        idle = _OUTSTANDING[0] == 0
        _OUTSTANDING[0] += 1
    done.add_done_callback(finished)
    if idle:  # (behind another job the engine is busy: waiting would only stall the caller)
        begun.wait(START_WAIT_S)
    return done


class _Shared:
    """One hash of ``chunks`` pieces of work shared between the engine's queue and the caller: whoever is
    free claims the next chunk (``next`` of an :func:`itertools.count` is atomic under the GIL)."""

    __slots__ = ("chunk", "claims", "count", "done", "out", "size", "view")

    def __init__(self, view: memoryview, size: int, chunk: int) -> None:
        self.view, self.size, self.chunk = view, size, chunk
        self.count = -(-len(view) // chunk)
        self.claims = itertools.count()
        self.out: list[bytes | None] = [None] * self.count
        self.done = [threading.Event() for _ in range(self.count)]

    def drain(self) -> None:
        """Hash chunks until none is left to claim."""
        while (i := next(self.claims)) < self.count:
            try:
                off = i * self.chunk
                self.out[i] = sha384_pages(self.view[off : off + self.chunk], self.size)
            finally:
                self.done[i].set()


def hash_pages_beside(data: bytes | bytearray | memoryview, work: Callable[[], None], size: int = PAGE) -> bytes:
    """SHA-384 of each ``size``-byte piece of ``data`` (as :func:`~sevemu.crypto.pagehash.sha384_pages`),
    hashed by the engine while the calling thread runs ``work`` (which must not change ``data``).

    The pieces are cut in :data:`CHUNKS` chunks; the engine's queue claims them one by one, and the
    caller, its ``work`` done, claims the ones left: on a machine with no free core the caller hashes
    (nearly) all of them itself and never sleeps waiting for a thread to be scheduled.  The engine's
    chunks are always waited for, also when ``work`` raises (then its exception propagates)."""
    view = memoryview(data).cast("B")
    pieces = len(view) // size
    if pieces < 2 * CHUNKS or not engaged():  # too small to share out, or no core to run the engine on
        work()
        return sha384_pages(view, size)
    job = _Shared(view, size, -(-pieces // CHUNKS) * size)
    sha_engine().submit(job.drain)
    try:
        work()
    finally:
        job.drain()
        for i, ev in enumerate(job.done):
            ev.wait()
            if job.out[i] is None:  # (the engine failed on it: hashed here)
                off = i * job.chunk
                job.out[i] = sha384_pages(view[off : off + job.chunk], size)
    return b"".join(d for d in job.out if d is not None)


class PendingHashes:
    """Page hashes the engine is computing (:func:`hash_pages_later`); :meth:`result` gives them."""

    __slots__ = ("_job", "_out")

    def __init__(self, job: _Shared) -> None:
        self._job = job
        self._out: bytes | None = None

    def result(self) -> bytes:
        """The hashes, as :func:`~sevemu.crypto.pagehash.sha384_pages` gives them: the caller hashes the
        chunks the engine has not claimed yet, then waits for the engine's (never for a thread that has
        not started: an unclaimed chunk is the caller's)."""
        if self._out is None:
            job = self._job
            job.drain()
            for i, ev in enumerate(job.done):
                ev.wait()
                if job.out[i] is None:  # (the engine failed on it: hashed here)
                    off = i * job.chunk
                    job.out[i] = sha384_pages(job.view[off : off + job.chunk], job.size)
            self._out = b"".join(d for d in job.out if d is not None)
        return self._out


def hash_pages_later(data: bytes, size: int = PAGE) -> bytes | PendingHashes:
    """SHA-384 of each ``size``-byte piece of ``data`` (immutable bytes: the engine reads them after the
    call returns), handed to the engine to run beside whatever the caller does next: a
    :class:`PendingHashes` -- or the hashes themselves when :func:`hash_pages_beside` would hash on the
    calling thread (too little to share out, or no core for the engine)."""
    view = memoryview(data).cast("B")
    pieces = len(view) // size
    if pieces < 2 * CHUNKS or not engaged():
        return sha384_pages(view, size)
    job = _Shared(view, size, -(-pieces // CHUNKS) * size)
    sha_engine().submit(job.drain)
    return PendingHashes(job)
