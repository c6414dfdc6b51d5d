"""The watchdog (:mod:`sevemu.hw.uc.watchdog`): it looks when a time slice can end, not every tick,
and still ends an over-long slice promptly."""

from __future__ import annotations

import time

from sevemu.hw.uc.watchdog import MAX_WAIT_S, TICK_S, Watchdog


class _Engine:
    """A watched engine whose slices the test starts and ends."""

    def __init__(self, slice_s: float) -> None:
        self.slice_s = slice_s
        self.started = 0.0
        self.looks = 0
        self.stopped_at = 0.0

    def timer_expired(self, now: float) -> bool:
        self.looks += 1
        return bool(self.started) and now - self.started > self.slice_s

    def request_stop(self) -> None:
        if not self.stopped_at:
            self.stopped_at = time.monotonic()

    def slice_deadline(self) -> float:
        return self.started + self.slice_s if self.started else 0.0


def test_the_watchdog_does_not_look_every_tick_while_no_slice_can_end() -> None:
    """Engines between slices (or in slices far from their end): a look at most every MAX_WAIT_S,
    not every TICK_S -- each look takes the GIL from the thread running the guest."""
    dog = Watchdog()
    idle, running = _Engine(0.2), _Engine(5.0)
    running.started = time.monotonic()
    dog.watch(idle)
    dog.watch(running)
    try:
        time.sleep(0.3)
        looks = idle.looks
    finally:
        dog.unwatch(idle)
        dog.unwatch(running)
    # every TICK_S would be about 60 looks; every MAX_WAIT_S about 7 (and a loaded machine only fewer)
    assert 1 <= looks <= 0.3 / MAX_WAIT_S + 3, looks
    assert running.looks == looks and not running.stopped_at and not idle.stopped_at


def test_the_watchdog_ends_a_slice_soon_after_its_end() -> None:
    """A slice that runs over is stopped TICK_S or so after its end (not at the next MAX_WAIT_S), also
    when it started while the watchdog was waiting, and in an engine registered while it waited."""
    dog = Watchdog()
    first, late = _Engine(10.0), _Engine(0.03)
    dog.watch(first)
    try:
        time.sleep(0.02)  # the watchdog waits (nothing can end within MAX_WAIT_S)
        dog.watch(late)
        late.started = time.monotonic()
        deadline = late.started + late.slice_s
        while not late.stopped_at and time.monotonic() < deadline + 2.0:
            time.sleep(0.001)
        assert late.stopped_at, "the over-long slice was never stopped"
        assert late.stopped_at > deadline
        # (the bound leaves room for a loaded machine's scheduling; a missed slice end is MAX_WAIT_S late)
        assert late.stopped_at - deadline < TICK_S + 0.5, late.stopped_at - deadline
        assert not first.stopped_at
        # a later slice of the same engine, started while the watchdog waited
        late.stopped_at = 0.0
        late.started = time.monotonic()
        while not late.stopped_at and time.monotonic() < late.started + 2.0:
            time.sleep(0.001)
        assert late.stopped_at > late.started + late.slice_s
    finally:
        dog.unwatch(first)
        dog.unwatch(late)
