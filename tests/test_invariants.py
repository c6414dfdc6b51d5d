"""The SoC's core guarantees as properties over random interleavings (Hypothesis).

Several SEV guests run on a small host (a 64 KiB cache, so lines are evicted all the time) while the
hypervisor reads and writes their pages and flushes caches.  A simple functional reference ("ideal
memory": a dict of the last value written to every 16-byte block) is held against the detailed model
(caches, memory controller, DRAM):

(a) no 16-byte block of plaintext a guest wrote to a private page ever appears in DRAM or in
    anything the hypervisor reads;
(b) a guest always reads back its own last write, unless the hypervisor wrote over that memory
    (then the whole line is "tainted": which copy reaches DRAM last is not the guest's to decide on
    a non-coherent part), and shared (C=0) pages behave as plain shared memory for both sides;
(c) no lookup made on behalf of a guest ever hits (or fills) a line tagged with another ASID, and
    no host lookup uses anything but the host's unencrypted domain.

Plaintext blocks are drawn from SHA-256 of a counter: high entropy, so no accidental match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevemu.abi.paging import ExitCode
from sevemu.guest.kernel import boot
from sevemu.hw.cache import key_domain
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.pyengine import PyEngine
from sevemu.hw.svm import VmExit
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20
MEM = 4 * MiB
PRIVATE = 0x200000  # private data pages: PRIVATE + i * 4 KiB
SHARED = 0x300000  # shared (C=0) data pages
N_PRIVATE = 10
N_SHARED = 2
N_LINES = 6  # lines used per page: the same few cache sets compete, so evictions are frequent
N_VMS = 3

Action = tuple[Any, ...]


class ActionEngine:
    """Runs one queued operation per VMRUN directly on the GuestCpu, then halts.

    An operation that takes #NPF propagates it (the hypervisor backs the page) and stays queued:
    the GuestCpu's accesses change nothing when they fault, so it simply runs again.
    """

    def __init__(self) -> None:
        self.pending: Callable[[GuestCpu], Any] | None = None
        self.result: Any = None

    def run(self, cpu: GuestCpu) -> VmExit:
        if self.pending is not None:
            self.result = self.pending(cpu)
            self.pending = None
        return VmExit(ExitCode.HLT)


@dataclass
class World:
    m: Machine
    vms: list[Vm]
    engines: list[ActionEngine]
    actor: list[int | None] = field(default_factory=lambda: [None])  # None: the host; i: guest i
    private_blocks: set[bytes] = field(default_factory=set)
    counter: int = 0
    lookups: int = 0

    def fresh(self, kind: bytes) -> bytes:
        self.counter += 1
        return hashlib.sha256(kind + self.counter.to_bytes(8, "little")).digest()[:16]


def _build(generation: str) -> World:
    m = build_machine(generation, seed=f"inv-{generation}", dram_size=512 * MiB, cache_size=64 << 10)
    world = World(m, [], [])
    _instrument(world)
    shared = [SHARED + i * 0x1000 for i in range(N_SHARED)]
    for i in range(N_VMS):
        vm = m.hv.create_vm(f"vm{i}", MEM)
        m.hv.launch(vm, [])
        vm.add_vcpu(PyEngine(boot(MEM, shared=shared)))
        world.vms.append(vm)
        world.actor[0] = i
        assert m.hv.run(vm).reason == "hlt"
        world.actor[0] = None
        eng = ActionEngine()
        vm.vcpus[0].engine = eng
        world.engines.append(eng)
    return world


def _instrument(world: World) -> None:
    """Property (c): wrap the cache lookup every access goes through."""
    cache = world.m.soc.cache
    orig = cache.line

    def line(key: int) -> bytearray:
        asid, c, _ = key_domain(key)
        who = world.actor[0]
        if who is None:
            assert (asid, c) == (0, False), f"host lookup in domain {(asid, c)}"
        else:
            mine = world.vms[who].asid
            assert (asid, c) in {(mine, True), (0, False)}, f"guest ASID {mine} looked up {(asid, c)}"
        data = orig(key)
        assert cache.sets[(key >> 6) & cache.set_mask].get(key) is data, "line served under another tag"
        world.lookups += 1
        return data

    cache.line = line  # type: ignore[method-assign]


def _guest(world: World, i: int, fn: Callable[[GuestCpu], Any]) -> Any:
    world.engines[i].pending = fn
    world.actor[0] = i
    try:
        r = world.m.hv.run(world.vms[i])
    finally:
        world.actor[0] = None
    assert r.reason == "hlt", r.reason
    return world.engines[i].result


def _guest_clflush(gva: int) -> Callable[[GuestCpu], None]:
    def fn(cpu: GuestCpu) -> None:
        t = cpu.translate(gva)
        cpu.core.cache.clflush(t.data_asid, t.data_c, t.spa | (gva & 0xFC0))

    return fn


def _no_private_plaintext(world: World, data: bytes) -> None:
    for block in world.private_blocks:
        assert block not in data, "guest plaintext seen by the hypervisor"


def _scan_dram(world: World) -> None:
    for _, page in world.m.soc.dram.pages():
        for block in world.private_blocks:
            assert block not in page, "guest plaintext in DRAM"


def _page(private: bool, page: int) -> int:
    return (PRIVATE if private else SHARED) + page * 0x1000


def run_actions(generation: str, actions: list[Action]) -> World:
    world = _build(generation)
    m = world.m
    core = m.soc.boot_cpu
    # ideal memory: (vm, gpa of a 16-byte block) -> last value; None = tainted by a host write
    ideal: dict[tuple[int, int], bytes | None] = {}
    host_pending: set[tuple[int, int]] = set()  # (vm, line gpa) written by the host, maybe still cached

    def check_line(i: int, line_gpa: int, data: bytes) -> None:
        for b in range(4):
            want = ideal.get((i, line_gpa + 16 * b))
            if want is not None:
                assert data[16 * b : 16 * b + 16] == want, f"vm{i} lost its write at {line_gpa + 16 * b:#x}"

    for act in actions:
        kind = act[0]
        if kind == "wbinvd":
            m.soc.wbinvd_all()
            host_pending.clear()
            _scan_dram(world)
            continue
        _, i, private, page, line, blk = act
        vm = world.vms[i]
        line_gpa = _page(private, page) + line * 64
        gpa = line_gpa + blk * 16
        if kind == "guest_write":
            value = world.fresh(b"guest")
            _guest(world, i, lambda cpu: cpu.write(gpa, value))
            if private:
                world.private_blocks.add(value)
            ideal[(i, gpa)] = None if private and (i, line_gpa) in host_pending else value
        elif kind == "guest_read":
            check_line(i, line_gpa, _guest(world, i, lambda cpu: cpu.read(line_gpa, 64)))
        elif kind == "guest_load":
            got = _guest(world, i, lambda cpu: cpu.load(gpa + 8, 8))
            want = ideal.get((i, gpa))
            if want is not None:
                assert got == int.from_bytes(want[8:], "little")
        elif kind == "guest_clflush":
            _guest(world, i, _guest_clflush(line_gpa))
        elif kind == "vmpage_flush":
            try:
                core.vmpage_flush(vm.spa_of(line_gpa), vm.asid)
            except Exception as e:  # an unbacked page: nothing to flush
                assert type(e).__name__ == "UnmappedError"
        elif kind == "host_read":
            vm.back(line_gpa)
            data = vm.host_read(line_gpa, 64)
            _no_private_plaintext(world, data)
            if not private:
                check_line(i, line_gpa, data)
        elif kind == "host_write":
            vm.back(line_gpa)
            value = world.fresh(b"host")
            vm.host_write(gpa, value)
            if private:
                for b in range(4):
                    ideal[(i, line_gpa + 16 * b)] = None
                host_pending.add((i, line_gpa))
            else:
                ideal[(i, gpa)] = value
        elif kind == "host_clflush":
            try:
                core.clflush(vm.spa_of(line_gpa))
            except Exception as e:
                assert type(e).__name__ == "UnmappedError"
            else:
                host_pending.discard((i, line_gpa))
        else:  # pragma: no cover
            raise AssertionError(kind)
    # the end of the run: every private line read back once more, then everything flushed
    for (i, gpa), want in sorted(ideal.items(), key=lambda kv: kv[0]):
        if want is not None:
            assert _guest(world, i, lambda cpu, g=gpa: cpu.read(g, 16)) == want
    m.soc.wbinvd_all()
    _scan_dram(world)
    _check_tags(world)
    return world


def _check_tags(world: World) -> None:
    """No private line of one ASID sits at another VM's page."""
    for i in range(len(world.vms)):  # leave some private lines of every guest in the cache
        _guest(world, i, lambda cpu: cpu.read(PRIVATE, 16))
    owner = {spa: vm.asid for vm in world.vms for spa in vm._owned}
    for asid, c, spa, _ in world.m.soc.cache.resident():
        if c:
            assert owner.get(spa & ~0xFFF) == asid


def _addr() -> st.SearchStrategy[tuple[int, bool, int, int, int]]:
    return st.tuples(st.integers(0, N_VMS - 1), st.booleans(), st.integers(0, N_PRIVATE - 1),
                     st.integers(0, N_LINES - 1), st.integers(0, 3)).map(
        lambda t: (t[0], t[1], t[2] % (N_PRIVATE if t[1] else N_SHARED), t[3], t[4]))


_KINDS = ["guest_write"] * 5 + ["guest_read"] * 2 + ["guest_load", "guest_clflush", "vmpage_flush",
                                                     "host_read", "host_read", "host_write",
                                                     "host_clflush"]
ACTION = st.one_of(
    st.tuples(st.sampled_from(_KINDS), _addr()).map(lambda t: (t[0], *t[1])),
    st.just(("wbinvd",)),
)
ACTIONS = st.lists(ACTION, min_size=10, max_size=120)


@pytest.mark.parametrize("generation", ["milan", "genoa", "naples"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS)
def test_guest_memory_invariants(generation: str, actions: list[Action]) -> None:
    world = run_actions(generation, actions)
    assert world.lookups > 0


def test_evictions_happen_in_the_property_setting() -> None:
    """The small cache really is exercised: a fixed long interleaving causes write-backs and evictions."""
    acts: list[Action] = [("guest_write", i % N_VMS, True, (i // 3) % N_PRIVATE, i % N_LINES, i % 4)
                          for i in range(300)]
    acts += [("guest_read", i % N_VMS, True, (i // 3) % N_PRIVATE, i % N_LINES, 0) for i in range(300)]
    world = run_actions("milan", acts)
    cache = world.m.soc.cache
    assert cache.writebacks > 100
    assert len(world.private_blocks) == 300
