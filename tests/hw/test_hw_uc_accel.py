"""The Unicorn engine's exit path in C (``csrc/uc_accel.c``, :mod:`sevemu.hw.uc.accel`) against its
ctypes fallback: a guest run with each gives the same exits, registers and port traffic; the
register exchange and the known-port-I/O test answer alike on a bare Unicorn, including every case
in which the test must decline (the engine then decides as before)."""

from __future__ import annotations

import array
import ctypes
import types
from typing import Any

import pytest

from sevemu.hw.svm import GPRS, Vmcb
from sevemu.hw.uc import accel
from sevemu.hw.uc import binding as uc
from sevemu.hw.uc.bare import BareRunner
from sevemu.hw.ucengine import InitialState, UcEngine
from sevemu.hw.vmsa import VmsaState
from sevemu.hypervisor.vm import VmKind
from sevemu.scenario import build_machine

pytest.importorskip("unicorn")

MiB = 1 << 20
BASE = 0x100000
# 32-bit, paging off:  1: inc %ebx; mov %ebx,%eax; out %al,$0x80; mov %ebx,%edx; and $1,%edx;
# add $0x510,%edx; out %ax,%dx; in $0x71,%al; add %eax,%esi; jmp 1b   (DX alternates 0x510 / 0x511)
LOOP_IO = bytes.fromhex("4389d8e68089da83e20181c21005000066efe47101c6ebe8")
IMPLS = [False, True] if accel.ENABLED else [False]


def _trace(use_c: bool, kind: VmKind, exits: int = 240) -> tuple[list[Any], Any]:
    m = build_machine("milan", seed="uc-accel", dram_size=1 << 30, cache_size=256 << 10)
    vm = m.hv.create_vm("t", 16 * MiB, kind)
    m.hv.launch(vm, [(BASE, LOOP_IO.ljust(4096, b"\0"))])
    state = InitialState(rip=BASE)
    eng = UcEngine(pool_pages=64, initial=state)
    eng.use_c_runner = use_c
    v = vm.add_vcpu(eng)
    state.apply(v.vmcb)
    seen = []
    for i in range(exits):
        if i % 7 == 3:
            v.vmcb.regs["rsi"] = i << 20  # the hypervisor changes a register: the next VMRUN loads it
        if i % 11 == 5:
            v.vmcb.regs["rbx"] = -i  # (a negative value: Unicorn gets it mod 2**64)
        if i % 13 == 6:
            v.vmcb.rflags |= 1 << 11  # OF: a control register the hypervisor changed (the guest's ADD rewrites it)
        r = m.hv.run(vm, 0, max_exits=1)
        c = v.vmcb
        seen.append((r.reason, r.exit, c.exit_code, c.exit_info1, c.exit_info2, c.next_rip, c.rip, c.rflags, c.cr0,
                     c.cr3, c.cr4, c.efer, dict(c.regs)))
    runner = eng._runner
    assert isinstance(runner, accel.PyRunner) is not use_c
    return seen, (eng.stats.io_exits, eng.stats.exits, eng.stats.spurious_stops, bytes(vm.console))


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_a_guest_runs_the_same_with_either_runner(kind: VmKind) -> None:
    py_trace, py_stats = _trace(False, kind)
    assert py_stats[0] == 240  # every exit is a port-I/O exit, and the guest made progress
    assert len({t[12]["rsi"] for t in py_trace}) > 100
    if not accel.ENABLED:
        pytest.skip("the C helper is not built")
    c_trace, c_stats = _trace(True, kind)
    assert c_trace == py_trace
    assert c_stats == py_stats


# ---- the runner on a bare Unicorn --------------------------------------------------------------
OUT_LOOP = bytes.fromhex("e680ebfc")  # 1: out %al,$0x80; jmp 1b
CODE_OFF = 0x120


class _Bare:
    """A bare 64-bit Unicorn with a stop hook on the OUT of OUT_LOOP at BASE + CODE_OFF."""

    def __init__(self) -> None:
        image = bytes(CODE_OFF) + OUT_LOOP
        self.bare = BareRunner(image, BASE, extra=1 << 16)
        lib, h = self.bare._lib, self.bare._h
        hh = ctypes.c_size_t()
        uc.check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_CODE, uc.fn_address(lib.uc_emu_stop), None,
                                 BASE + CODE_OFF, BASE + CODE_OFF), "hook")
        n = len(uc.SYNC_IDS)
        self.vals = array.array("Q", bytes(8 * n))
        base = self.vals.buffer_info()[0]
        self.ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self.ids = (ctypes.c_int * n)(*uc.SYNC_IDS)
        self.pool = ctypes.create_string_buffer(4 * 4096)
        self.pool[2 * 4096 + CODE_OFF : 2 * 4096 + CODE_OFF + 16] = (OUT_LOOP + bytes(12))[:16]

    def runner(self, use_c: bool) -> accel.Runner:
        return accel.runner(self.bare._lib, self.bare._h, self.ids, self.vals, self.ptrs, GPRS, use_c=use_c)

    def reg(self, name: str) -> int:
        v = ctypes.c_uint64()
        uc.check(self.bare._lib.uc_reg_read(self.bare._h, uc.REG[name], ctypes.byref(v)), "read")
        return int(v.value)

    def close(self) -> None:
        self.bare.close()


def _engine(**kw: Any) -> Any:
    return types.SimpleNamespace(**({"_event": None, "_internal": None, "_tb_flush_pending": False} | kw))


def _state(regs: dict[str, Any], **ctl: int) -> Any:
    return types.SimpleNamespace(regs=regs, **({"rip": 0, "rflags": 2, "cr0": 0x11, "cr3": 0, "cr4": 0, "efer": 0} | ctl))


@pytest.mark.parametrize("use_c", IMPLS)
def test_enter_writes_changed_registers_and_leave_stores_the_batch(use_c: bool) -> None:
    b = _Bare()
    try:
        r = b.runner(use_c)
        regs = {n: 0x1000 + i for i, n in enumerate(GPRS)}
        assert r.ctl() == ()
        assert r.enter(_state(regs)) == -1  # every GPR written; the control registers are the engine's to load
        assert [b.reg(n) for n in GPRS] == [0x1000 + i for i in range(16)]
        r.set_ctl((2, 0x11, 0, 0, 0))
        assert r.ctl() == (2, 0x11, 0, 0, 0)
        assert r.enter(_state(regs)) == 0
        assert r.enter(_state(regs, cr3=0x5000)) == -1  # a control register the hypervisor changed
        regs["r9"] = -1
        regs["rcx"] = 1 << 64 | 7  # mod 2**64
        assert r.enter(_state(regs)) == 2
        assert b.reg("r9") == (1 << 64) - 1 and b.reg("rcx") == 7
        for bad, exc in (({**regs, "rbx": 99, "rax": "x"}, TypeError), ({n: 99 for n in GPRS[1:]}, KeyError)):
            with pytest.raises(exc):
                r.enter(_state(bad))
        assert b.reg("rbx") == 0x1001  # nothing was written by a refused load
        r.set_ctl((2, 0x11, 0, 0, -1))  # not a register value: the engine is asked again
        assert r.enter(_state(regs, efer=-1)) == -1
        r.forget()
        assert r.ctl() == () and r.enter(_state(regs)) == -1
        assert r.run(BASE + CODE_OFF + 2) == 0  # jmp back to the OUT: the hook stops there
        assert b.vals[uc.I_RIP] == BASE + CODE_OFF
        for efer, cr0_pg in ((0x500, False), (0x100, False)):
            state = _state({"rax": regs["rax"], "rbx": 5})
            r.leave(state, efer)
            assert state.regs == {n: b.reg(n) for n in GPRS}
            assert (state.rip, state.rflags, state.cr0, state.cr3, state.cr4) == tuple(b.vals[16:21])
            assert state.efer == efer | (0x400 if efer & 0x100 and cr0_pg else 0)
            assert r.ctl() == (state.rflags, state.cr0, state.cr3, state.cr4, state.efer)
            assert r.enter(state) == 0  # what leave stored is what Unicorn holds
        b.vals[uc.I_CR0] |= 1 << 31  # (a batch with CR0.PG: EFER.LMA follows LME)
        state = _state({})
        r.leave(state, 0x100)
        assert state.efer == 0x500
        r.leave(state, 0x1)
        assert state.efer == 0x1
        # A save state's dict in another order, with equal but not identical keys, or with another key
        # (the C runner reads the usual dict in one walk): the same loads and stores, by name.
        for make in (lambda d: dict(reversed(d.items())), lambda d: {"".join(list(k)): v for k, v in d.items()},
                     lambda d: {**d, "extra": 1}):
            r.forget()
            odd = make({n: 0x2000 + i for i, n in enumerate(GPRS)})
            assert r.enter(_state(odd)) == -1
            assert [b.reg(n) for n in GPRS] == [0x2000 + i for i in range(16)]
            odd_state = _state(odd)
            r.leave(odd_state, 0)
            assert [odd_state.regs[n] for n in GPRS] == list(b.vals[:16])
            assert odd_state.regs.get("extra", 1) == 1 and list(odd_state.regs) == list(odd)  # (no key added or moved)
    finally:
        b.close()


def _known_cases(b: _Bare) -> list[tuple[str, dict[str, Any], Any]]:
    """(name, bind_io and engine overrides, whether the known exit is expected) for run_known."""
    page, off = BASE, CODE_OFF
    rip = page + off
    code = bytes(b.pool[2 * 4096 + off : 2 * 4096 + off + 16])
    ex = object()
    cr0 = ctypes.c_uint64()
    uc.check(b.bare._lib.uc_reg_read(b.bare._h, uc.REG_CR0, ctypes.byref(cr0)), "read")
    lm = bool(cr0.value >> 31 & 1)  # the engine's long mode: CR0.PG (clear in a bare 64-bit Unicorn)
    ok = {"offsets": {page: {off}}, "exits": {rip: (code, lm, -1, ex)}, "xgva": {page: 2}}
    return [
        ("known", ok, ex),
        ("known, DX compared", {**ok, "exits": {rip: (code, lm, "dx", ex)}}, ex),
        ("another DX", {**ok, "exits": {rip: (code, lm, "dx+1", ex)}}, None),
        ("not hooked", {**ok, "offsets": {page: {off + 1}}}, None),
        ("no page hooks", {**ok, "offsets": {}}, None),
        ("nothing remembered", {**ok, "exits": {}}, None),
        ("other mode", {**ok, "exits": {rip: (code, not lm, -1, ex)}}, None),
        ("changed bytes", {**ok, "exits": {rip: (b"\xe6\x81" + code[2:], lm, -1, ex)}}, None),
        ("not executable", {**ok, "xgva": {}}, None),
        ("slot outside the pool", {**ok, "xgva": {page: 4}}, None),
        ("an event", {**ok, "_event": 0x100}, None),
        ("an engine error", {**ok, "_internal": "boom"}, None),
        ("TB flush pending", {**ok, "_tb_flush_pending": True}, None),
    ]


def test_run_known_answers_alike_and_declines_what_it_must() -> None:
    results: dict[bool, list[Any]] = {}
    for use_c in IMPLS:
        b = _Bare()
        try:
            r = b.runner(use_c)
            out = []
            for name, case, want in _known_cases(b):
                r.enter(_state({n: 0 for n in GPRS} | {"rdx": 0x1234}))
                exits = {k: (v[0], v[1], {"dx": 0x1234, "dx+1": 0x1235}.get(v[2], v[2]), v[3])
                         for k, v in case["exits"].items()}
                r.bind_io(case["offsets"], exits, case["xgva"], ctypes.addressof(b.pool), 4 * 4096)
                eng = _engine(**{k: v for k, v in case.items() if k.startswith("_")})
                got = r.run_known(eng, BASE + CODE_OFF + 2)
                assert b.vals[uc.I_RIP] == BASE + CODE_OFF, name
                if want is None:
                    assert got == 0, name  # run()'s result: the engine's own test decides
                else:
                    assert got is want, name
                out.append(got if isinstance(got, int) else name)
            results[use_c] = out
        finally:
            b.close()
    if len(results) == 2:
        assert results[True] == results[False]


@pytest.mark.parametrize("use_c", IMPLS)
def test_started_is_set_only_while_unicorn_runs(use_c: bool) -> None:
    b = _Bare()
    try:
        r = b.runner(use_c)
        seen = []
        hook = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)(
            lambda h, addr, size, user: seen.append(r.started))
        hh = ctypes.c_size_t()
        uc.check(b.bare._lib.uc_hook_add(b.bare._h, ctypes.byref(hh), uc.UC_HOOK_CODE, uc.fn_address(hook), None,
                                         BASE + CODE_OFF + 2, BASE + CODE_OFF + 2), "hook")
        assert r.started == 0.0
        assert r.run(BASE + CODE_OFF + 2) == 0
        assert r.started == 0.0 and len(seen) == 1 and seen[0] > 0.0  # a hook (the watchdog) sees the run's start
    finally:
        b.close()


class _Slotted:
    """A save state whose attributes are __slots__ (as VmsaState and Vmcb): the C runner reads and
    writes them at their offsets (uc_accel.c state_slots)."""

    __slots__ = ("cr0", "cr3", "cr4", "efer", "regs", "rflags", "rip")

    def __init__(self, regs: dict[str, Any], **ctl: int) -> None:
        self.regs = regs
        for k, v in ({"rip": 0, "rflags": 2, "cr0": 0x11, "cr3": 0, "cr4": 0, "efer": 0} | ctl).items():
            setattr(self, k, v)


class _Logged(_Slotted):
    """The same slots, with a __setattr__ that records: no slot access of its own (PyObject_SetAttr)."""

    __slots__ = ("log",)

    def __setattr__(self, name: str, value: Any) -> None:
        if name != "log":
            getattr(self, "log", []).append(name)
        object.__setattr__(self, name, value)


def _exchange(r: Any, b: _Bare, make: Any) -> list[Any]:
    """enter / run / leave with a state made by ``make``: what each returned and the state after."""
    out: list[Any] = []
    r.forget()
    regs = {n: 0x3000 + i for i, n in enumerate(GPRS)}
    out.append(r.enter(make(regs)))
    r.set_ctl((2, 0x11, 0, 0, 0))
    out.append(r.enter(make(regs)))
    out.append(r.enter(make(regs, cr4=0x20)))
    out.append(r.run(BASE + CODE_OFF + 2))
    state = make({"rax": 1})
    r.leave(state, 0x500)
    out.append((dict(state.regs), state.rip, state.rflags, state.cr0, state.cr3, state.cr4, state.efer, r.ctl()))
    out.append(r.enter(state))
    return out


@pytest.mark.skipif(not accel.ENABLED, reason="csrc/uc_accel.c not built")
def test_slotted_save_states_are_exchanged_as_by_name() -> None:
    b = _Bare()
    try:
        r = b.runner(True)
        by_name = _exchange(r, b, _state)
        assert not r.slotted(_state({})) and r.slotted(_Slotted({})) and not r.slotted(_Logged({}))
        assert _exchange(r, b, _Slotted) == by_name
        logged = _exchange(r, b, _Logged)
        assert logged == by_name
        s = _Logged({})
        s.log = []
        r.leave(s, 0)
        assert "rip" in s.log  # its __setattr__ saw the stores of what changed (no slot shortcut)
        # An unset slot: the AttributeError of the lookup by name, on entry and on leaving alike.
        empty = _Slotted.__new__(_Slotted)
        with pytest.raises(AttributeError):
            r.enter(empty)
        with pytest.raises(AttributeError):
            r.leave(empty, 0)
        # The type changes after the runner learned its slots (a property over rip): its version tag
        # changes, and the runner goes through the property from then on.
        seen: list[int] = []

        class Patched(_Slotted):
            __slots__ = ()

        assert _exchange(r, b, Patched) == by_name and r.slotted(Patched({}))
        slot = _Slotted.rip
        Patched.rip = property(lambda self: slot.__get__(self), lambda self, v: (seen.append(v), slot.__set__(self, v)))  # type: ignore[assignment]
        assert _exchange(r, b, Patched) == by_name and not r.slotted(Patched({}))
        assert r.slotted(_Slotted({}))  # (the base class is unchanged)
        assert r.slotted(Vmcb()) and r.slotted(VmsaState(bytes(4096)))  # the engines' save states
        # leave() keeps a value that already is the register's (also one of 31 to 64 bits) and replaces
        # any other: negative, 2**64 or more, another value
        for i in range(16):
            b.vals[i] = (1 << 63) + 0x1234 * i if i % 2 else (1 << 40) + i
        state = _Slotted({n: b.vals[i] for i, n in enumerate(GPRS)})
        kept = {n: id(v) for n, v in state.regs.items()}
        r.leave(state, 0)
        assert {n: id(v) for n, v in state.regs.items()} == kept
        for odd in (-1, 1 << 64, -(1 << 70), 1 << 100, (1 << 63) + 1):
            state.regs["rcx"] = odd
            r.leave(state, 0)
            assert state.regs["rcx"] == b.vals[GPRS.index("rcx")]
        assert seen  # the leave's store of RIP went through the property
    finally:
        b.close()
