"""The watchdog: one daemon thread per process ending over-long time slices.

A slice ends at the next block boundary (the engine's ``request_stop``), never by an asynchronous
``uc_emu_stop`` in the middle of an instruction, which Unicorn 2.1.4 would run again on resume
although its store was done (``tests/hw/test_hw_unicorn_stop.py``).

It holds engines by weak reference only, and only while they can run: an engine registers when it
boots and deregisters when it is closed (or collected), so the list it walks every tick is the
live engines, and a long-lived process that creates and closes engines does not accumulate them.
The thread exits when no engine is watched and starts again with the next one.

It looks again when the earliest running slice can end (:meth:`Watched.slice_deadline`; at least
:data:`TICK_S`, at most :data:`MAX_WAIT_S` later, at once when an engine registers), not every tick:
each look takes the GIL, and a thread waiting for the GIL is woken at every release by the thread
that runs the guest -- at every VMRUN of a loop of short exits, on the other core.  Looking every
5 ms made a thread that waited half the time and cost the VMEXIT loops about 2 us of CPU time per
round trip (``docs/cpu-engine.md``, the tenth round of issue 10).  A slice still ends at most
:data:`TICK_S` after its end (an engine whose ``slice_s`` changes while it runs: :data:`MAX_WAIT_S`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["MAX_WAIT_S", "TICK_S", "WATCHDOG", "Watchdog", "Watched"]

TICK_S = 0.005
"""The shortest wait between two looks: how late after its end a time slice may be stopped."""
MAX_WAIT_S = 0.05
"""The longest wait between two looks."""


class Watched(Protocol):
    """What the watchdog reads of an engine."""

    slice_s: float

    def timer_expired(self, now: float) -> bool:
        """Whether the current time slice (if one runs) ended before ``now``; marks it fired."""
        ...

    def request_stop(self) -> None:
        """End the running slice at the next block boundary."""
        ...

    def slice_deadline(self) -> float:
        """When the running time slice ends (``time.monotonic()`` seconds), 0.0 while none runs."""
        ...


class Watchdog:
    """Ends time slices of registered engines (see the module docstring)."""

    def __init__(self) -> None:
        self._engines: dict[int, weakref.ref[Watched]] = {}
        self._lock = threading.RLock()  # weakref callbacks may run inside it (GC)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._wake = threading.Event()  # set by watch(): look again now

    def watch(self, engine: Watched) -> None:
        key = id(engine)

        def gone(_ref: weakref.ref[Watched]) -> None:
            self._drop(key)

        with self._lock:
            self._engines[key] = weakref.ref(engine, gone)
            if self._thread is None or self._pid != os.getpid():  # none running, or we are a forked child
                self._pid = os.getpid()
                self._wake = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(self._wake,), name="sevemu-uc-watchdog",
                                                daemon=True)
                self._thread.start()
            else:
                self._wake.set()  # (its first slice may end before the thread would look again)

    def unwatch(self, engine: Watched) -> None:
        self._drop(id(engine))

    def _drop(self, key: int) -> None:
        with self._lock:
            self._engines.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)

    def _loop(self, wake: threading.Event) -> None:
        wait = TICK_S
        while True:
            wake.wait(wait)
            wake.clear()
            # Stops happen under the lock: once unwatch() returned, the engine's handle is never used.
            with self._lock:
                if not self._engines:
                    self._thread = None  # the next watch() starts a new thread
                    return
                now = time.monotonic()
                look = now + MAX_WAIT_S  # when to look again: the earliest end of a running slice
                for ref in list(self._engines.values()):
                    e = ref()
                    if e is not None:
                        if e.timer_expired(now):
                            e.request_stop()
                        else:
                            # (a slice that starts later ends later: at the earliest now + slice_s)
                            end = e.slice_deadline()
                            look = min(look, end if end else now + e.slice_s)
                    e = None  # no engine stays referenced from here while the thread sleeps
                wait = max(TICK_S, look - now)


WATCHDOG = Watchdog()
"""The process's watchdog."""
