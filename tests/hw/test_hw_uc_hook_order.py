"""The order of the port-I/O code hooks in Unicorn's list (``IoHooks._promote``): the hook of an exit
the engine remembered is moved to the front -- all hooks removed and added again, the remembered
ones first -- which changes what Unicorn's walk of the list costs, never which instructions stop.
A guest gives the same console, cache, DRAM, exits and hooked ranges with the promotion as without."""

from __future__ import annotations

from typing import Any

import pytest
from guestkit import assert_same_states, guest_state

from sevemu.cli.run import GuestRun, launch_guest, load_image
from sevemu.hw.uc import ports as ports_mod


def _launch(mode: str) -> GuestRun:
    image = load_image("bench").patched("bench_iterations", 1).patched("bench_exits", 300)
    return launch_guest(image, mode=mode, generation="milan", seed="hook-order")


def _run(run: GuestRun, exits: int) -> None:
    hv, vm = run.machine.hv, run.vm
    left = exits
    while left > 0:
        r = hv.run(vm, 0, max_exits=left)
        assert not vm.crash_reason
        left -= r.exits
        if r.reason == "hold":
            break


def _state(run: GuestRun) -> dict[str, Any]:
    ports = run.engines[0]._ports
    assert ports is not None
    return {
        **guest_state(run),
        "ranges": dict(ports._ranges),
        "hook_count": ports.hook_count,
        "handles": {page: len(h) for page, h in ports._hooks.items()},
    }


@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_promoted_hooks_change_no_exit_and_no_byte(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    states = []
    for limit in (ports_mod._PROMOTE_LIMIT, 0):
        monkeypatch.setattr(ports_mod, "_PROMOTE_LIMIT", limit)
        run = _launch(mode)
        try:
            _run(run, 400)
            ports = run.engines[0]._ports
            assert ports is not None
            if limit:
                # every exit remembered has its hook in front (the latest first), each range still hooked once
                assert ports._promotions > 0 and ports._front
                remembered = set(ports.exits)
                for page, (lo, hi) in ports._front:
                    assert (lo, hi) in ports._ranges[page]
                    assert any(page + lo <= rip <= page + hi for rip in remembered)
            else:
                assert ports._promotions == 0 and not ports._front
            states.append(_state(run))
        finally:
            run.close()
    assert_same_states(*states)
    assert states[0]["stats"]["io_exits"] >= 300


class _Recorder:
    """The Unicorn library with its hook calls recorded (the rest passed on)."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.added: list[tuple[int, int]] = []
        self.deleted = 0

    def uc_hook_add(self, h: Any, handle: Any, kind: int, cb: Any, user: Any, begin: int, end: int) -> int:
        self.added.append((begin, end))
        return int(self._lib.uc_hook_add(h, handle, kind, cb, user, begin, end))

    def uc_hook_del(self, h: Any, hh: int) -> int:
        self.deleted += 1
        return int(self._lib.uc_hook_del(h, hh))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


def test_a_promotion_adds_every_hook_again_the_remembered_first() -> None:
    run = _launch("sev")
    try:
        _run(run, 50)
        ports = run.engines[0]._ports
        assert ports is not None
        rec = _Recorder(ports._lib)
        ports._lib = rec  # type: ignore[assignment]
        count = ports.hook_count
        ranges = dict(ports._ranges)
        # a hooked range that holds no remembered exit yet: remembering one there promotes it
        page, (lo, hi) = next((p, r) for p, rs in ranges.items() for r in rs
                              if not any(p + r[0] <= rip <= p + r[1] for rip in ports.exits))
        old_front = list(ports._front)
        exit_ = next(iter(ports.exits.values()))
        ports.remember(page + hi, b"\x90" * 16, True, exit_[3])
        assert rec.deleted == count and len(rec.added) == count
        assert rec.added[0] == (page + lo, page + hi)  # the new one first, then the earlier ones
        assert rec.added[1 : 1 + len(old_front)] == [(p + a, p + b) for p, (a, b) in old_front]
        assert sorted(rec.added) == sorted((p + a, p + b) for p, rs in ranges.items() for a, b in rs)
        assert ports.hook_count == count and dict(ports._ranges) == ranges
        assert {p: len(h) for p, h in ports._hooks.items()} == {p: len(rs) for p, rs in ranges.items()}
        # the same exit again: nothing moves
        rec.added.clear()
        ports.remember(page + hi, b"\x90" * 16, True, exit_[3])
        assert rec.added == []
        # the guest still runs to the same kind of exits after the rebuild
        ports.exits.pop(page + hi)
        ports._lib = rec._lib  # type: ignore[assignment]
        _run(run, 50)
    finally:
        run.close()


def test_no_promotion_past_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports_mod, "_PROMOTE_MAX_HOOKS", 0)
    run = _launch("sev")
    try:
        _run(run, 50)
        ports = run.engines[0]._ports
        assert ports is not None and ports.exits
        assert ports._promotions == 0 and not ports._front
    finally:
        run.close()
