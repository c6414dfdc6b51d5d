"""The one-call C paths of an SEV-ES round trip's host accesses against their Python paths
(``csrc/mem_accel.c``: ``HostPort`` -- the host's whole-line writes, run reads and the GHCB exchange
--, ``PoolSnoop`` -- the page pool's snoop --, ``pool_sync_all`` -- the pool's write-back at #VMEXIT):
the same guest gives the same console, the same bytes in the cache (in LRU order) and in DRAM, the
same dirty lines, counters and exits either way; and the fallbacks the C paths hand to are taken."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from guestkit import assert_same_states, guest_state

from sevemu._util.units import PAGE
from sevemu.cli.run import GuestRun, launch_guest, load_image
from sevemu.hw import memaccel
from sevemu.hypervisor import ghcb as ghcb_mod
from sevemu.hypervisor.devices.bus import DeviceBus

needs_c = pytest.mark.skipif(not memaccel.HOST_PORT or not memaccel.POOL_SYNC, reason="csrc/mem_accel.c not built")


def _flags(on: bool) -> tuple[bool, bool, bool]:
    return memaccel.ENABLED and on, memaccel.HOST_PORT and on, memaccel.POOL_SYNC and on


@pytest.fixture
def accel_flags() -> Iterator[None]:
    saved = memaccel.ENABLED, memaccel.HOST_PORT, memaccel.POOL_SYNC
    yield
    memaccel.ENABLED, memaccel.HOST_PORT, memaccel.POOL_SYNC = saved


def _launch(on: bool, exits: int = 400) -> GuestRun:
    memaccel.HOST_PORT, memaccel.POOL_SYNC = _flags(on)[1:]
    image = load_image("bench").patched("bench_iterations", 1).patched("bench_exits", exits)
    return launch_guest(image, mode="sev-es", generation="milan", seed="es-fastpath")


def _until_hlt(run: GuestRun) -> None:
    hv, vm = run.machine.hv, run.vm
    for _ in range(100_000):
        if hv.run(vm, 0, max_exits=1).reason == "hlt":
            return
    raise AssertionError("the guest never halted")


def _state(run: GuestRun) -> dict[str, Any]:
    cache, pool = run.machine.soc.cache, run.engines[0].pool
    return {
        **guest_state(run),
        "dirty": sorted(cache.dirty),
        "counters": (cache.hits, cache.misses, cache.writebacks),
        "pool": sorted(pool.slot_of.items()),
        "snaps": {s: bytes(v) for s, v in pool._snap.items()},
        "slots": bytes(pool.mm or b""),
    }


def _both_ways(body: Callable[[GuestRun, bool], None]) -> dict[str, Any]:
    """``body(run, on)`` on a launched guest with the C paths (on) and without; the two end states
    must be equal in every part: the C paths' one is returned."""
    states = []
    for on in (True, False):
        run = _launch(on)
        try:
            body(run, on)
            states.append(_state(run))
        finally:
            run.close()
    assert_same_states(*states)
    return states[0]


@needs_c
def test_vmgexit_round_trips_give_the_same_state_with_and_without_the_c_paths(accel_flags: None) -> None:
    def body(run: GuestRun, on: bool) -> None:
        hv, vm = run.machine.hv, run.vm
        fast = type(hv.core.host_write).__name__ == "builtin_function_or_method"
        assert fast is on  # the C paths where asked for, the Python ones otherwise
        assert (type(run.engines[0].pool.snoop).__name__ == "PoolSnoop") is on
        _until_hlt(run)
        assert (type(run.engines[0].pool.sync).__name__ == "PoolSync") is on  # (bound when the pool attached)
        r = hv.run(vm, 0, max_exits=300)
        assert r.exits == 300 and not vm.crash_reason
        assert hv.ghcb._known[1] is not None  # the known answer was used (the exchange path)

    fast_state = _both_ways(body)
    assert fast_state["stats"]["slot_updates"] > 250 and fast_state["stats"]["lines_written_back"] > 250


@needs_c
def test_the_bound_write_back_follows_the_pool_through_drops_and_evictions(accel_flags: None) -> None:
    """``PoolSync`` holds the pool's slot map, snapshots, counters and writable set, read once when the
    pool attaches: they must stay the pool's own through WBINVD's drop of every slot and an eviction
    (a rebound set would leave the bound write-back comparing slots the pool no longer has), and the
    guest goes on exactly as with the Python write-back."""
    def body(run: GuestRun, on: bool) -> None:
        hv, vm = run.machine.hv, run.vm
        engine = run.engines[0]
        pool = engine.pool
        parts = (pool.slot_key, pool._snap, pool.stats, pool.writable)
        _until_hlt(run)
        for step in ("run", "drop", "run", "evict", "run"):
            if step == "drop":
                engine.invalidate_pool()  # (the guest's WBINVD)
            elif step == "evict":
                pool.evict_requested = True  # (done at the next VMRUN)
            else:
                r = hv.run(vm, 0, max_exits=60)
                assert r.exits == 60 and not vm.crash_reason
        assert all(a is b for a, b in zip(parts, (pool.slot_key, pool._snap, pool.stats, pool.writable)))
        assert (type(pool.sync).__name__ == "PoolSync") is on

    fast_state = _both_ways(body)
    assert fast_state["stats"]["evictions"] > 0 and fast_state["stats"]["lines_written_back"] > 100


@needs_c
def test_the_exchange_writes_only_when_the_page_holds_what_was_expected(accel_flags: None) -> None:
    for on in (True, False):
        run = _launch(on)
        try:
            _until_hlt(run)
            hv, vm = run.machine.hv, run.vm
            hv.run(vm, 0, max_exits=5)
            page = vm.vcpus[0].ghcb_map
            assert page is not None
            head = page.read_runs(ghcb_mod._HEAD_RUNS)
            before = page.read(0, PAGE)
            answer = [(0x380, b"\x5a" * 64)]
            wrong = bytes([head[0] ^ 1]) + head[1:]
            assert page.exchange(ghcb_mod._HEAD_RUNS, wrong, answer) == head  # not the expected head
            assert page.read(0, PAGE) == before  # nothing written
            assert page.exchange(ghcb_mod._HEAD_RUNS, head, answer) is None
            assert page.read(0x380, 64) == b"\x5a" * 64
            assert page.read(0, 0x380) == before[:0x380] and page.read(0x3C0, PAGE - 0x3C0) == before[0x3C0:]
            with pytest.raises(ValueError, match="does not fit"):
                page.exchange(ghcb_mod._HEAD_RUNS, page.read_runs(ghcb_mod._HEAD_RUNS), [(PAGE - 32, bytes(64))])
        finally:
            run.close()


@needs_c
def test_host_accesses_the_c_port_hands_on_give_what_the_core_gives(accel_flags: None) -> None:
    """C=1, unaligned and partial-line accesses, lines absent from the cache (after WBINVD) and a
    range with a VMCB view: the port hands them to the core's methods or the cache's Python rest,
    with the same results as the core's own methods."""
    memaccel.HOST_PORT = True
    run = _launch(True)
    try:
        soc, hv = run.machine.soc, run.machine.hv
        host, core = hv.core, soc.cores[0]
        spa = run.vm.back(0x200000)
        data = bytes(range(256)) * 2
        host.host_write(spa, data)  # whole lines
        assert core.host_read(spa, len(data)) == data
        host.host_write(spa + 3, b"abc")  # not whole lines: Core.host_write
        assert core.host_read(spa, 8) == data[:3] + b"abc" + data[6:8]
        host.host_write(spa + 1024, data[:64], True)  # C=1 (the host's SME key): Core.host_write
        assert core.host_read(spa + 1024, 64, True) == data[:64]
        soc.cores[0].wbinvd()  # every line absent: the cache's Python rests
        runs = ((0, 128), (256, 64))
        want = data[:3] + b"abc" + data[6:128] + data[256:320]
        assert host.host_read_runs(spa, runs) == want == core.host_read_runs(spa, runs)
        host.host_write(spa + 64, data[:64])
        assert core.host_read(spa, 128) == want[:64] + data[:64]
        vmcb = run.vm.vcpus[0].vmcb
        host.host_write(vmcb.pa + 0x400, bytes(64))  # a VMCB page: the view is written back, then dropped
        assert core.host_read(vmcb.pa + 0x400, 64) == bytes(64)
        assert not core.vmcbs.held(vmcb.pa)
    finally:
        run.close()


def _put_request(page: Any, key: bytes) -> None:
    """Write the lines of ``_KNOWN_RUNS`` back as ``key`` holds them (the request the known answer answers)."""
    pos = 0
    for off, length in ghcb_mod._KNOWN_RUNS:
        page.write(off, key[pos : pos + length])
        pos += length


@needs_c
def test_the_exchanges_fallbacks_give_the_same_state_as_the_python_path(accel_flags: None) -> None:
    """The one-pass exchange hands on what it does not serve itself -- the pool not synced (its snoop's
    Python path), lines absent from the cache (after WBINVD: the cache's Python rests), a request that
    is not the expected one, the VMCB page's range check -- with the same results as the Python path,
    and the guest goes on the same way."""
    states = []
    for on in (True, False):
        run = _launch(on)
        try:
            _until_hlt(run)
            hv, vm = run.machine.hv, run.vm
            hv.run(vm, 0, max_exits=5)
            key, writes = hv.ghcb._known[0], hv.ghcb._known[5]
            page = vm.vcpus[0].ghcb_map
            pool = run.engines[0].pool
            assert page is not None and key and writes
            answered = page.read_runs(ghcb_mod._KNOWN_RUNS)
            assert answered != key  # the last exit's answer is in the page
            assert page.exchange(ghcb_mod._KNOWN_RUNS, key, writes) == answered  # another request: nothing written
            _put_request(page, key)
            pool.synced = False  # the pool's snoop takes its Python path
            assert page.exchange(ghcb_mod._KNOWN_RUNS, key, writes) is None
            assert page.read_runs(ghcb_mod._KNOWN_RUNS) == answered
            _put_request(page, key)
            run.machine.soc.cores[0].wbinvd()  # every line absent: the cache's Python rests
            assert page.exchange(ghcb_mod._KNOWN_RUNS, key, writes) is None
            assert page.read_runs(ghcb_mod._KNOWN_RUNS) == answered
            core, vmcb = run.machine.soc.cores[0], vm.vcpus[0].vmcb
            same = core.host_read(vmcb.pa + 0x400, 64)
            assert core.vmcbs.held(vmcb.pa)
            assert hv.core.host_exchange(vmcb.pa, ((0x400, 64),), same, [(0x400, same)]) is None  # the core's path
            assert not core.vmcbs.held(vmcb.pa)  # the VMCB view was written back and dropped, as a host write does
            r = hv.run(vm, 0, max_exits=40)
            assert r.exits == 40 and not vm.crash_reason
            states.append(_state(run))
        finally:
            run.close()
    assert_same_states(*states)


@needs_c
def test_a_host_change_of_a_deciding_line_is_never_answered_from_memory(accel_flags: None) -> None:
    """The host's attack on the remembered answer: after the request is in the page, it changes one
    byte of a line that decides the answer (the port's value in RAX, then the exit code); the exchange
    must see another request and write nothing, whichever line it was."""
    for on in (True, False):
        run = _launch(on)
        try:
            _until_hlt(run)
            hv, vm = run.machine.hv, run.vm
            hv.run(vm, 0, max_exits=5)
            key, writes = hv.ghcb._known[0], hv.ghcb._known[5]
            page = vm.vcpus[0].ghcb_map
            assert page is not None
            for off in (0x1F8, 0x390, 0x3F0, 0xFFC):  # RAX, SW_EXITCODE, the valid bitmap, ghcb_usage
                _put_request(page, key)
                b = page.read(off, 1)
                page.write(off & ~63, page.read(off & ~63, 64)[: off & 63] + bytes([b[0] ^ 0x40])
                           + page.read(off + 1, 63 - (off & 63)))
                before = page.read(0, PAGE)
                got = page.exchange(ghcb_mod._KNOWN_RUNS, key, writes)
                assert got is not None and got != key
                assert page.read(0, PAGE) == before  # nothing written
        finally:
            run.close()


def test_the_known_out_goes_to_the_bus_only_while_the_host_keeps_its_port_out() -> None:
    import functools

    from sevemu.hypervisor.kvm import Hypervisor
    from sevemu.scenario import build_machine

    class OwnPorts(Hypervisor):
        def port_out(self, vm: Any, port: int, size: int, value: int) -> None:
            super().port_out(vm, port, size, value)

    m = build_machine("milan", seed="es-fastpath-ports", dram_size=64 << 20, cache_size=64 << 10, init=False)
    hv = Hypervisor(m.soc.host_view(), host_reserved=16 << 20)
    own = OwnPorts(m.soc.host_view(), host_reserved=16 << 20)
    vm = types.SimpleNamespace(devices=DeviceBus())
    sink = hv.port_out_sink(vm, 0x80, 1)  # type: ignore[arg-type]
    assert not isinstance(sink, functools.partial)  # the bus's own callable
    sink(0x5A)
    assert vm.devices.unassigned == {0x80: 1}
    other = own.port_out_sink(vm, 0x80, 1)  # type: ignore[arg-type]
    assert isinstance(other, functools.partial) and other.func == own.port_out
    hv.port_out = lambda *a: None  # type: ignore[method-assign]  # (set on the instance: honoured too)
    assert isinstance(hv.port_out_sink(vm, 0x80, 1), functools.partial)  # type: ignore[arg-type]


@needs_c
def test_the_known_out_to_the_bus_gives_what_the_hosts_port_out_gives(accel_flags: None) -> None:
    # The known OUT through the device bus's own callable (port_out_sink) against the same OUTs through
    # the host's port_out: the same end state, and the host's port_out saw every OUT only in the second run.
    import functools

    seen: list[list[tuple[int, int, int]]] = []
    states = []
    for direct in (True, False):
        run = _launch(True)
        try:
            hv, vm = run.machine.hv, run.vm
            outs: list[tuple[int, int, int]] = []
            plain = hv.port_out

            def spy(vm_: Any, port: int, size: int, value: int, outs: list[tuple[int, int, int]] = outs,
                    plain: Any = plain) -> None:
                outs.append((port, size, value))
                plain(vm_, port, size, value)

            _until_hlt(run)
            if not direct:  # a port_out set on the instance: port_out_sink gives it, bound to the OUT
                hv.port_out = spy  # type: ignore[method-assign]
            hv.ghcb.forget(vm)  # (the callable is made when the event is decoded: decoded again from here)
            sink = hv.port_out_sink(vm, 0x80, 1)
            assert isinstance(sink, functools.partial) is not direct
            r = hv.run(vm, 0, max_exits=300)
            assert r.exits == 300 and not vm.crash_reason
            assert hv.ghcb._known[1] is not None and hv.ghcb._known[7] is vm
            seen.append(outs)
            states.append(_state(run))
        finally:
            run.close()
    assert seen[0] == []
    assert len(seen[1]) >= 300 and {p for p, _, _ in seen[1]} == {0x80}
    assert_same_states(*states)
