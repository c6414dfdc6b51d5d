"""The host's lifecycle duties, each written as the host hits it: WBINVD + DF_FLUSH after INIT, teardown
that leaves nothing behind (engines closed, every page returned), SEV_GET_ID2 sized as Linux allows,
ASID accounting; and (slow) soaks of a long-running host."""

from __future__ import annotations

import dataclasses
import gc
import resource
import tracemalloc
from collections import deque
from collections.abc import Generator
from typing import Any

import pytest
from hvkit import small_machine

from sevemu._util.units import MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import ActivateCmd, LaunchStartCmd
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.errors import AsidError, MailboxError
from sevemu.guest.kernel import boot
from sevemu.hw.profiles import MILAN
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor.errors import Errno
from sevemu.hypervisor.ioctl import GET_ID2_MAX
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId
from sevemu.hypervisor.sevdev import SevDevice, SevUserCmd, SevUserDataGetId2
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine

MEM = 4 * MiB


def _names(m: Machine) -> list[str]:
    return [name for name, _ in m.firmware.log]


def _wbinvds(m: Machine) -> list[int]:
    return [c.wbinvd_count for c in m.soc.cores]


# ---- issue 8.1: WBINVD on every CPU + DF_FLUSH right after INIT ----------------------------------------------
@pytest.mark.parametrize("path", ["hypervisor", "/dev/sev", "KVM_SEV_INIT", "implicit"])
def test_every_init_is_followed_by_wbinvd_and_df_flush(path: str) -> None:
    """Linux (sev-dev.c ``__sev_platform_init_locked``) flushes right after INIT: the firmware marks
    every ASID dirty there, and the next ACTIVATE would otherwise find stale lines of its ASID."""
    m = build_machine("milan", seed="init-flush", dram_size=512 * MiB, cache_size=256 << 10, init=False)
    hv = m.hv
    before = _wbinvds(m)
    if path == "hypervisor":
        hv.platform_init(es=True)
    elif path == "/dev/sev":
        assert SevDevice(hv).platform_init() == 0
    elif path == "KVM_SEV_INIT":
        assert KvmSev(hv, hv.create_vm("g", MEM)).memory_encrypt_op(KvmSevCmdId.INIT) == 0
    else:  # sev-dev.c's implicit INIT around a command
        assert SevDevice(hv).ioctl_raw(SevUserCmd.PDH_GEN).ret == 0
    names = _names(m)
    i = names.index("INIT")
    assert names[i : i + 2] == ["INIT", "DF_FLUSH"] and all(s == 0 for _, s in m.firmware.log)
    assert all(after == b + 1 for after, b in zip(_wbinvds(m), before, strict=True))  # every core
    if path != "implicit":
        vm = hv.create_vm("after-init", MEM)  # the first ACTIVATE after INIT is accepted
        hv.launch(vm, [(0x100000, bytes(4096))])
        assert hv.guest_status(vm).asid == vm.asid


def test_reinit_does_not_hand_a_victims_dirty_lines_to_the_next_guest() -> None:
    """The attack of issue 8.1 as the host runs it: a NODBG victim leaves dirty lines under its ASID,
    the platform goes through SHUTDOWN and INIT, and a debuggable guest gets the same ASID.  The host
    flushed after INIT, so DBG_DECRYPT of the new guest shows its own (never written) memory, not the
    victim's secret."""
    m = small_machine(dataclasses.replace(MILAN, max_asid=100))  # type: ignore[arg-type]  # one SEV ASID
    hv = m.hv
    secret = b"victim's secret, still a dirty line in the cache..".ljust(64, b"!")
    victim = hv.create_vm("victim", MEM)

    def write_secret() -> Generator[Op, Any, None]:
        yield from boot(MEM)
        yield op.write(0x200000, secret)
        yield op.hlt()

    hv.launch(victim, [(0x100000, bytes(4096))], int(GuestPolicy.NODBG), programs=[write_secret])

    victim.add_vcpu(PyEngine(write_secret()))
    assert hv.run(victim).reason == "hlt"
    hv.psp.call_nobuf(CommandId.SHUTDOWN)  # the host tears the platform down under the victim
    hv.platform_init()  # ... and brings it back: INIT, WBINVD, DF_FLUSH
    start = hv.psp.call(CommandId.LAUNCH_START, LaunchStartCmd(policy=0))
    hv.psp.call(CommandId.ACTIVATE, ActivateCmd(handle=start.handle, asid=victim.asid))
    debuggable = Vm("debuggable", VmKind.SEV, MEM, victim.asid, hv.core, hv.pages, hv.tables)
    debuggable.handle, debuggable.sev_active = start.handle, True
    debuggable.npt.map(0x200000, victim.spa_of(0x200000) & ~0xFFF)  # the victim's page, remapped
    seen = hv.sev.dbg_decrypt(debuggable, 0x200000, len(secret))
    assert seen != secret and secret[:16] not in seen


# ---- issue 8.6: teardown leaves nothing; GET_ID2 as Linux sizes it ----------------------------------------------
def test_destroy_closes_the_unicorn_engine_and_detaches_its_page_pool() -> None:
    """A destroyed guest's engine kept private plaintext copies of its pages and stayed attached to
    the cache: destroy closes it (the pool is dropped, the cache no longer snoops it)."""
    run_mod = pytest.importorskip("sevemu.cli.run")
    m = build_machine("milan", seed="destroy-uc", dram_size=512 * MiB, cache_size=256 << 10)
    run = run_mod.launch_guest(run_mod.load_image("hello"), machine=m)
    assert run.run(timeout=60).status == "finished"
    engine = run.engines[0]
    cache = m.soc.cores[0].cache
    pool = engine.pool  # the engine's private page copies are what the cache snoops
    assert pool in cache.agents
    m.hv.destroy(run.vm)
    assert pool not in cache.agents and engine not in cache.agents and run.vm.vcpus[0].engine is None
    from sevemu.hw.ucengine import EngineClosedError
    with pytest.raises(EngineClosedError, match="was closed"):  # nothing runs on a closed engine
        engine.run(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("length", [64, 0x4000 + 1, 0x10000, GET_ID2_MAX])
def test_get_id2_takes_any_length_the_page_allocator_gives(length: int) -> None:
    """Linux's ``sev_ioctl_do_get_id2`` has no 16 KiB limit (``kzalloc`` up to 4 MiB)."""
    m = build_machine("milan", seed="get-id2", dram_size=512 * MiB, cache_size=64 << 10)
    dev = SevDevice(m.hv)
    buf = bytearray(b"\xee" * length)
    arg = dev.ioctl_raw(SevUserCmd.GET_ID2, SevUserDataGetId2(buf, length))
    assert (arg.ret, arg.error) == (0, 0)
    assert isinstance(arg.data, SevUserDataGetId2) and arg.data.length == 64
    assert bytes(buf[:64]) == m.firmware.identity.chip_id and bytes(buf[64:128]) == b"\xee" * min(64, length - 64)


def test_get_id2_above_the_allocator_limit_is_enomem_and_changes_nothing() -> None:
    m = build_machine("milan", seed="get-id2", dram_size=512 * MiB, cache_size=64 << 10)
    log = list(m.firmware.log)
    buf = bytearray(16)
    arg = SevDevice(m.hv).ioctl_raw(SevUserCmd.GET_ID2, SevUserDataGetId2(buf, GET_ID2_MAX + 1))
    assert (arg.ret, arg.error) == (-int(Errno.ENOMEM), 0)
    assert buf == bytearray(16) and [n for n, _ in m.firmware.log[len(log):]] == ["PLATFORM_STATUS"]


# ---- issue 8.7: a long-running host does not run out ------------------------------------------------------------
def _guest() -> Generator[Op, Any, None]:
    yield from boot(MEM)
    yield op.write(0x200000, b"x" * 64)
    yield op.hlt()


def _tiny() -> Generator[Op, Any, None]:
    yield op.store(0x2000, 8, 1)  # paging off: one page backed on demand
    yield op.hlt()


def _cycle(m: Machine, alive: deque[Vm], keep: int, kind: VmKind = VmKind.SEV, *, tiny: bool = False) -> None:
    """create -> launch -> run -> destroy, keeping ``keep`` guests alive."""
    hv = m.hv
    vm = hv.create_vm("churn", 1 * MiB if tiny else MEM, kind)
    hv.launch(vm, [(0x1000 if tiny else 0x100000, b"\xf4" * 64)], programs=[_tiny if tiny else _guest])
    vm.add_vcpu(PyEngine(_tiny() if tiny else _guest()))
    assert hv.run(vm).reason == "hlt"
    alive.append(vm)
    while len(alive) > keep:
        hv.destroy(alive.popleft())


def test_destroy_returns_every_page_it_took() -> None:
    """Guest pages, nested page-table pages and VMSA pages go back to the host allocators."""
    m = small_machine()
    hv = m.hv
    pages, tables = hv.pages.allocated, hv.tables.allocated
    alive: deque[Vm] = deque()
    for kind in (VmKind.SEV, VmKind.PLAIN, VmKind.SEV):
        _cycle(m, alive, 0, kind)
    es = hv.create_vm("es", MEM)
    kvm = KvmSev(hv, es)
    kvm.op(KvmSevCmdId.ES_INIT, sev_fd=SevDevice(hv))
    es.add_vcpu()
    es.vmsa_page(0)
    assert hv.tables.allocated > tables
    hv.destroy(es)
    assert (hv.pages.allocated, hv.tables.allocated) == (pages, tables)
    assert not hv.vms and hv.platform_status().guest_count == 0


def test_exhausted_asids_are_counted_right() -> None:
    """All 410 SEV ASIDs of a Milan (100..509) in use: the error says 410, not 509."""
    m = build_machine("milan", seed="asids", dram_size=512 * MiB, cache_size=64 << 10)
    hv = m.hv
    vms = [hv.create_vm(f"g{i}", 64 << 10) for i in range(len(MILAN.sev_asids()))]
    with pytest.raises(AsidError, match=r"410 of the 410 in \[100, 509\] in use"):
        hv.create_vm("one too many", 64 << 10)
    hv.destroy(vms[7])
    assert hv.create_vm("again", 64 << 10).asid == vms[7].asid
    assert hv.create_vm("plain", 64 << 10, VmKind.PLAIN).asid > MILAN.max_asid


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (resource.getpagesize() // 1024)


def _traced(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated by everything but the firmware (whose command log is its own matter)."""
    keep = snapshot.filter_traces([tracemalloc.Filter(False, "*/sevemu/firmware/*")])
    return sum(stat.size for stat in keep.statistics("filename"))


@pytest.mark.slow
def test_churn_soak_keeps_memory_flat() -> None:
    """25,000 create -> launch -> run -> destroy cycles with 50 guests alive (the old host ran out of
    physical memory after ~12,900): the allocators stay level, Python memory does not grow."""
    m = build_machine("milan", seed="soak", dram_size=512 * MiB, cache_size=64 << 10)
    hv = m.hv
    alive: deque[Vm] = deque()
    for _ in range(1_000):
        _cycle(m, alive, 50, tiny=True)
    level = (hv.pages.allocated, hv.tables.allocated)
    rss = _rss_kib()
    for _ in range(20_000):
        _cycle(m, alive, 50, tiny=True)
    assert (hv.pages.allocated, hv.tables.allocated) == level
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(500):
            _cycle(m, alive, 50, tiny=True)
        gc.collect()
        first = _traced(tracemalloc.take_snapshot())
        for _ in range(3_500):
            _cycle(m, alive, 50, tiny=True)
        gc.collect()
        grown = _traced(tracemalloc.take_snapshot()) - first
    finally:
        tracemalloc.stop()
    assert grown < 256 * 1024, f"{grown} bytes more after 3,500 cycles"
    assert (hv.pages.allocated, hv.tables.allocated) == level and len(hv.vms) == 50
    assert _rss_kib() - rss < 64 * 1024
    assert hv.platform_status().state == PlatformState.WORKING and not m.firmware.internal_errors


@pytest.mark.slow
def test_long_lived_host_launches_hundreds_of_x86_guests() -> None:
    """One process launches, runs and destroys 300 real x86 guests (Unicorn): memory and the time
    per guest stay level."""
    run_mod = pytest.importorskip("sevemu.cli.run")
    import time

    image = run_mod.load_image("hello")
    m = build_machine("milan", seed="x86-soak", dram_size=1 << 30, cache_size=256 << 10)

    def one() -> float:
        t0 = time.perf_counter()
        run = run_mod.launch_guest(image, machine=m, memory=16 * MiB)
        assert run.run(timeout=60).status == "finished"
        m.hv.destroy(run.vm)
        return time.perf_counter() - t0

    for _ in range(20):
        one()
    gc.collect()
    rss = _rss_kib()
    early = sorted(one() for _ in range(40))[20]
    for _ in range(200):
        one()
    late = sorted(one() for _ in range(40))[20]
    gc.collect()
    assert not m.hv.vms and m.hv.platform_status().guest_count == 0
    assert _rss_kib() - rss < 48 * 1024, f"RSS grew {(_rss_kib() - rss) >> 10} MiB over 280 guests"
    assert late < 2 * early + 0.05, f"a guest took {early * 1e3:.1f} ms early, {late * 1e3:.1f} ms late"


def test_nodbg_refusal_reaches_python_callers_as_a_mailbox_error() -> None:
    """One error family: the firmware's refusal is a MailboxError carrying the status and Linux's errno."""
    m = small_machine()
    vm = m.hv.create_vm("nodbg", MEM)
    m.hv.launch(vm, [(0x100000, bytes(4096))], int(GuestPolicy.NODBG))
    with pytest.raises(MailboxError) as ei:
        m.hv.dbg_decrypt(vm, 0x100000, 16)
    assert ei.value.status == Status.POLICY_FAILURE and getattr(ei.value, "errno", None) == Errno.EIO
    assert vm.state is VmState.RUNNING


def test_es_asids_are_reclaimed_before_es_init_gives_up() -> None:
    """One SEV-ES ASID: after its guest is destroyed, the next KVM_SEV_ES_INIT flushes and reuses it."""
    m = build_machine(dataclasses.replace(MILAN, min_sev_asid=2), seed="es-asids", dram_size=512 * MiB,
                      cache_size=64 << 10, es=True)
    hv, dev = m.hv, SevDevice(m.hv)
    first = hv.create_vm("es-1", MEM)
    KvmSev(hv, first).op(KvmSevCmdId.ES_INIT, sev_fd=dev)
    hv.sev.launch_start(first, int(GuestPolicy.ES))
    assert first.asid == 1
    second = hv.create_vm("es-2", MEM)
    assert KvmSev(hv, second).memory_encrypt_op(KvmSevCmdId.ES_INIT, sev_fd=dev) == -int(Errno.EBUSY)
    hv.destroy(first)
    flushes = hv.asid_flushes
    assert KvmSev(hv, second).memory_encrypt_op(KvmSevCmdId.ES_INIT, sev_fd=dev) == 0
    assert second.asid == 1 and hv.asid_flushes == flushes + 1
    hv.sev.launch_start(second, int(GuestPolicy.ES))  # the firmware accepts the flushed ASID
    assert hv.guest_status(second).asid == 1
