"""ASID lifecycle invariants over random interleavings (Hypothesis), issue 8.

A host with two SEV ASIDs (reuse comes at once) and a small cache launches NODBG guests that keep
high-entropy secrets in private memory, and interleaves, in any order: guest writes, host reads of
any page a guest ever had, WBINVD, DEACTIVATE and DECOMMISSION behind the hypervisor's back,
``Hypervisor.destroy`` (engine teardown included), SHUTDOWN followed by INIT with or without the
WBINVD + DF_FLUSH Linux runs after INIT, ACTIVATE of a debuggable guest of the host's own on either
ASID with or without WBINVD + DF_FLUSH, DBG_DECRYPT through that guest of a page a victim had, and
"zombie" VMRUNs of VMCBs and engines the host kept.  Invariants, after every step:

(a) no 16-byte block of guest plaintext is in DRAM (after any WBINVD) or in anything the host
    reads (host reads, DBG_DECRYPT of its own debuggable guest, zombie runs);
(b) a command the firmware refuses changes nothing the host can observe (PLATFORM_STATUS and the
    GUEST_STATUS of every handle);
(c) a zombie VMRUN (its ASID deactivated, decommissioned or shut down) ends in VMEXIT_INVALID and
    runs nothing.

The default run is small and fast; ``-m slow`` adds a deeper profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevemu._util.units import PAGE, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.paging import ExitCode
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import ActivateCmd, GuestStatusCmd, HandleCmd, InitCmd, LaunchStartCmd
from sevemu.errors import AsidError, MailboxError
from sevemu.hw.profiles import MILAN
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hw.svm import Vmcb
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine

MEM = 1 * MiB
SECRET_GPAS = (0x20000, 0x21000, 0x40000)
PROFILE = dataclasses.replace(MILAN, max_asid=MILAN.min_sev_asid + 1)  # two SEV ASIDs


def _store(gpa: int, value: bytes) -> Generator[Op, Any, None]:
    """The victims' one program: paging off (every access private), store, halt."""
    yield op.write(gpa, value)
    yield op.hlt()


@dataclass
class World:
    m: Machine
    live: list[Vm] = field(default_factory=list)
    zombies: list[tuple[Vmcb, int, bytes]] = field(default_factory=list)  # VMCBs the host kept
    victim_pages: set[int] = field(default_factory=set)  # SPAs that held a victim's secret
    private: set[bytes] = field(default_factory=set)
    counter: int = 0
    attacker: Vm | None = None  # the host's debuggable guest, ACTIVATEd by hand

    def fresh(self) -> bytes:
        self.counter += 1
        return hashlib.sha256(b"lifecycle" + self.counter.to_bytes(8, "little")).digest()


def _observable(w: World) -> tuple[Any, ...]:
    """What the host can observe of the firmware's state (property (b))."""
    hv = w.m.hv
    ps = hv.platform_status()
    guests: list[tuple[Any, ...]] = []
    for vm in [*w.live, *([w.attacker] if w.attacker else [])]:
        if vm.handle:
            try:
                st_ = hv.psp.call(CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle))
                guests.append((vm.handle, st_.state, st_.asid, st_.policy))
            except MailboxError as e:
                guests.append((vm.handle, "refused", int(e.status)))
    return ps.state, ps.owner, ps.config, ps.guest_count, tuple(guests)


def _blocks(value: bytes) -> set[bytes]:
    return {value[i : i + 16] for i in range(len(value) - 15)}


def _refusal_changes_nothing(w: World, fn: Any) -> bool:
    """Run ``fn``; if the firmware refuses, nothing observable changed (b).  True if it succeeded."""
    before = _observable(w)
    try:
        fn()
    except MailboxError:
        assert _observable(w) == before, "a refused command changed the firmware's state"
        return False
    return True


def _scan(w: World, data: bytes, what: str) -> None:
    for block in w.private:
        assert block not in data, f"guest plaintext in {what}"


def _scan_dram(w: World) -> None:
    for _, page in w.m.soc.dram.pages():
        _scan(w, bytes(page), "DRAM")


def step(w: World, act: tuple[Any, ...]) -> None:
    m, hv = w.m, w.m.hv
    kind = act[0]
    if kind == "launch":
        try:
            vm = hv.create_vm(f"v{w.counter}", MEM)
        except AsidError:
            return  # both ASIDs held
        value = w.fresh()
        gpa = SECRET_GPAS[act[1] % len(SECRET_GPAS)]

        def launch() -> None:
            hv.launch(vm, [], int(GuestPolicy.NODBG), programs=[_store])

        if not _refusal_changes_nothing(w, launch):
            hv.destroy(vm)
            return
        w.private |= _blocks(value)
        r = hv.run(vm, engine=PyEngine(_store(gpa, value)), vcpu=vm.add_vcpu())
        assert r.reason == "hlt", r.reason
        w.victim_pages.add(vm.spa_of(gpa) & ~0xFFF)
        w.live.append(vm)
        w.zombies.append((vm.vcpus[0].vmcb, gpa, w.fresh()))
    elif kind == "write" and w.live:
        vm = w.live[act[1] % len(w.live)]
        if vm.state is not VmState.RUNNING:
            return  # crashed (its ASID was taken away behind the hypervisor's back): run refused
        value = w.fresh()
        gpa = SECRET_GPAS[act[2] % len(SECRET_GPAS)]
        w.private |= _blocks(value)
        r = hv.run(vm, engine=PyEngine(_store(gpa, value)))
        if vm.state is VmState.RUNNING:
            assert r.reason == "hlt", r.reason
            w.victim_pages.add(vm.spa_of(gpa) & ~0xFFF)
    elif kind == "host_read":
        pages = sorted(w.victim_pages)
        if pages:
            spa = pages[act[1] % len(pages)]
            _scan(w, m.soc.boot_cpu.host_read(spa, PAGE), "a host read")
    elif kind == "wbinvd":
        m.soc.wbinvd_all()
        _scan_dram(w)
    elif kind == "destroy" and w.live:
        vm = w.live.pop(act[1] % len(w.live))
        hv.destroy(vm)  # WBINVD, DEACTIVATE, DECOMMISSION, engines closed, pages back
        assert vm.vcpus[0].engine is None
    elif kind in ("deactivate", "decommission") and w.live:
        vm = w.live[act[1] % len(w.live)]
        ok = _refusal_changes_nothing(w, lambda: hv.psp.call(CommandId.DEACTIVATE, HandleCmd(handle=vm.handle)))
        if ok and kind == "decommission" and _refusal_changes_nothing(
                w, lambda: hv.psp.call(CommandId.DECOMMISSION, HandleCmd(handle=vm.handle))):
            vm.handle = 0  # the firmware forgot the guest: the host's teardown skips DEACTIVATE
    elif kind == "shutdown_init":
        _refusal_changes_nothing(w, lambda: hv.psp.call_nobuf(CommandId.SHUTDOWN))
        if act[1] % 2:
            hv.platform_init()  # INIT, then WBINVD + DF_FLUSH as Linux does
        else:
            _refusal_changes_nothing(w, lambda: hv.psp.call(CommandId.INIT, InitCmd()))
        for vm in w.live:  # the firmware forgot them: the host lets them go without DEACTIVATE
            vm.handle = 0
            hv.destroy(vm)
        w.live.clear()
        w.attacker = None
    elif kind == "flush":
        _refusal_changes_nothing(w, hv.flush_asids)
    elif kind == "attack":
        _attack(w, act)
    elif kind == "zombie" and w.zombies:
        vmcb, gpa, value = w.zombies[act[1] % len(w.zombies)]
        if any(vm.vcpus[0].vmcb is vmcb for vm in w.live):
            return  # not a zombie (yet)
        engine = PyEngine(_store(gpa, value))
        if m.soc.mc.asid_valid(vmcb.asid):  # (test oracle) the ASID serves a newer guest now
            # the host may re-enter that guest's own code with registers of its choosing (plain
            # SEV); what it stores is that guest's data under that guest's key
            w.private |= _blocks(value)
            m.soc.host_view().boot_cpu.vmrun(vmcb, engine)
        else:
            ex = m.soc.host_view().boot_cpu.vmrun(vmcb, engine)
            assert ex.code == ExitCode.INVALID and engine.ops == 0, ex  # (c)


def _attack(w: World, act: tuple[Any, ...]) -> None:
    """The host's own debuggable guest ACTIVATEd by hand on an ASID of its choice (optionally after
    WBINVD + DF_FLUSH), then DBG_DECRYPT of a page a victim had, through that guest."""
    m, hv = w.m, w.m.hv
    if w.attacker is not None:
        return
    asid = PROFILE.min_sev_asid + act[1] % 2
    if act[2] % 2:
        m.soc.wbinvd_all()
        _refusal_changes_nothing(w, lambda: hv.psp.call_nobuf(CommandId.DF_FLUSH))
    handle = 0

    def start() -> None:
        nonlocal handle
        handle = hv.psp.call(CommandId.LAUNCH_START, LaunchStartCmd(policy=0)).handle

    if not _refusal_changes_nothing(w, start):
        return
    dbg = Vm("attacker", VmKind.SEV, MEM, asid, hv.core, hv.pages, hv.tables)
    dbg.handle = handle
    w.attacker = dbg
    if not _refusal_changes_nothing(w, lambda: hv.psp.call(CommandId.ACTIVATE, ActivateCmd(handle=handle,
                                                                                                asid=asid))):
        hv.psp.call(CommandId.DECOMMISSION, HandleCmd(handle=handle))
        w.attacker = None
        return
    dbg.sev_active = True
    pages = sorted(w.victim_pages)
    if pages:
        dbg.npt.map(0x20000, pages[act[3] % len(pages)])
        _scan(w, hv.sev.dbg_decrypt(dbg, 0x20000, PAGE), "DBG_DECRYPT of the host's guest")
    m.soc.wbinvd_all()
    hv.psp.call(CommandId.DEACTIVATE, HandleCmd(handle=handle))
    hv.psp.call(CommandId.DECOMMISSION, HandleCmd(handle=handle))
    w.attacker = None
    _scan_dram(w)


KINDS = ["launch"] * 3 + ["write"] * 3 + ["host_read"] * 2 + ["wbinvd", "destroy", "destroy", "deactivate",
                                                                  "decommission", "shutdown_init", "flush",
                                                                  "attack", "attack", "zombie", "zombie"]
ACTION = st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 7), st.integers(0, 7))


def run_actions(actions: list[tuple[Any, ...]]) -> World:
    m = build_machine(PROFILE, seed="lifecycle-prop", dram_size=512 * MiB, cache_size=64 << 10)
    w = World(m)
    for act in actions:
        step(w, act)
    m.soc.wbinvd_all()
    _scan_dram(w)
    return w


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(ACTION, min_size=4, max_size=25))
def test_asid_lifecycle_invariants(actions: list[tuple[Any, ...]]) -> None:
    run_actions(actions)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(ACTION, min_size=10, max_size=80))
def test_asid_lifecycle_invariants_deep(actions: list[tuple[Any, ...]]) -> None:
    run_actions(actions)


def test_the_interleavings_reach_reuse_shutdown_and_the_attack() -> None:
    """A fixed interleaving: two victims, SHUTDOWN + INIT without the flush, the attack refused on
    both ASIDs, the flush, the attack accepted, DBG_DECRYPT of the victims' pages -- noise only."""
    acts: list[tuple[Any, ...]] = [("launch", 0, 0, 0), ("launch", 1, 0, 0), ("write", 0, 1, 0), ("zombie", 0, 0, 0),
                                   ("shutdown_init", 0, 0, 0), ("zombie", 0, 0, 0), ("zombie", 1, 0, 0),
                                   ("attack", 0, 0, 0), ("attack", 1, 0, 1), ("flush", 0, 0, 0),
                                   ("attack", 0, 1, 0), ("attack", 1, 1, 1), ("launch", 2, 0, 0),
                                   ("destroy", 0, 0, 0), ("zombie", 2, 0, 0), ("host_read", 0, 0, 0)]
    w = run_actions(acts)
    names = [n for n, _ in w.m.firmware.log]
    assert "SHUTDOWN" in names and names.count("ACTIVATE") >= 4
    assert any(n == "ACTIVATE" and s for n, s in w.m.firmware.log)  # refused without the flush
    assert ("DBG_DECRYPT", 0) in w.m.firmware.log  # ... and accepted after it: noise only
    assert w.attacker is None and not any(s for n, s in w.m.firmware.log if n in ("DEACTIVATE", "DECOMMISSION"))
    assert len(w.private) > 0 and len(w.victim_pages) >= 2
