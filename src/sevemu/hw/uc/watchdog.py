"""The watchdog: one daemon thread per process ending over-long time slices.

A slice ends at the next block boundary (the engine's ``request_stop``), never by an asynchronous
``uc_emu_stop`` in the middle of an instruction, which Unicorn 2.1.4 would run again on resume
although its store was done (``tests/hw/test_hw_unicorn_stop.py``).

It holds engines by weak reference only, and only while they can run: an engine registers when it
boots and deregisters when it is closed (or collected), so the list it walks every tick is the
live engines, and a long-lived process that creates and closes engines does not accumulate them.
The thread exits when no engine is watched and starts again with the next one.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["TICK_S", "WATCHDOG", "Watchdog", "Watched"]

TICK_S = 0.005


class Watched(Protocol):
    """What the watchdog reads of an engine."""

    slice_s: float

    def timer_expired(self, now: float) -> bool:
        """Whether the current time slice (if one runs) ended before ``now``; marks it fired."""
        ...

    def request_stop(self) -> None:
        """End the running slice at the next block boundary."""
        ...


class Watchdog:
    """Ends time slices of registered engines (see the module docstring)."""

    def __init__(self) -> None:
        self._engines: dict[int, weakref.ref[Watched]] = {}
        self._lock = threading.RLock()  # weakref callbacks may run inside it (GC)
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, engine: Watched) -> None:
        key = id(engine)

        def gone(_ref: weakref.ref[Watched]) -> None:
            self._drop(key)

        with self._lock:
            self._engines[key] = weakref.ref(engine, gone)
            if self._thread is None or self._pid != os.getpid():  # none running, or we are a forked child
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="sevemu-uc-watchdog", daemon=True)
                self._thread.start()

    def unwatch(self, engine: Watched) -> None:
        self._drop(id(engine))

    def _drop(self, key: int) -> None:
        with self._lock:
            self._engines.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._engines)

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            # Stops happen under the lock: once unwatch() returned, the engine's handle is never used.
            with self._lock:
                if not self._engines:
                    self._thread = None  # the next watch() starts a new thread
                    return
                now = time.monotonic()
                for ref in list(self._engines.values()):
                    e = ref()
                    if e is not None and e.timer_expired(now):
                        e.request_stop()
                    e = None  # no engine stays referenced from here while the thread sleeps


WATCHDOG = Watchdog()
"""The process's watchdog."""
