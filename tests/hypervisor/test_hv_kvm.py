"""The KVM-like hypervisor with SEV and plain guests: launch, demand paging, exits, what the host sees,
what host tampering does, VM teardown and ASID reuse (and the firmware's ASID-reuse rules)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
from hvkit import small_machine

from sevemu._util.units import MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.paging import ExitCode
from sevemu.abi.sev import ActivateCmd, GuestStatusCmd, HandleCmd, LaunchStartCmd
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.errors import (
    AddressError,
    AlignmentError,
    AsidError,
    InputError,
    MailboxError,
    UnmappedError,
    VmError,
)
from sevemu.guest.kernel import KVM_HC_MAP_GPA_RANGE, boot, print_
from sevemu.guest.workloads import keep_secret, touch_pages
from sevemu.hw.profiles import MILAN
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor import npt
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine

MEM = 4 * MiB
IMAGE = 0x100000
SECRET = 0x200000
SHARED = 0x300000


def _blocks(seed: int, n: int) -> bytes:
    """High-entropy data: no 16-byte block of it can appear anywhere by accident."""
    return random.Random(seed).randbytes(n)


def _sev_vm(m: Machine, name: str = "vm", regions: list[tuple[int, bytes]] | None = None,
            programs: tuple[Any, ...] = ()) -> Vm:
    """An SEV guest launched with ``regions`` whose code is the shared programs of these tests and
    ``programs``."""
    vm = m.hv.create_vm(name, MEM)
    m.hv.launch(vm, regions or [], programs=(_reader, keep_secret, touch_pages, *programs))
    return vm


def _last_line(vm: Vm) -> str:
    return vm.console.decode().splitlines()[-1]


def _reader(gpa: int, length: int, **boot_kw: Any) -> Workload:
    """Boot, then on every resume print the hex of ``length`` bytes at ``gpa`` and halt."""
    yield from boot(MEM, **boot_kw)
    yield op.hlt()
    while True:
        data = yield op.read(gpa, length)
        yield from print_(data.hex() + "\n")
        yield op.hlt()


def _guest_read(m: Machine, vm: Vm) -> bytes:
    assert m.hv.run(vm).reason == "hlt", vm.crash_reason
    return bytes.fromhex(_last_line(vm))


def _dram_holds(m: Machine, data: bytes) -> bool:
    m.soc.wbinvd_all()
    return any(m.soc.dram.find(data[i : i + 16]) for i in range(0, len(data) - 15, 16))


# ---- launch and run ------------------------------------------------------------------------------------


def test_plain_vm_runs_unencrypted(machine: Machine) -> None:
    m, hv = machine, machine.hv
    image = _blocks(1, 8192)
    log_before = list(m.firmware.log)
    vm = hv.create_vm("plain", MEM, VmKind.PLAIN)
    assert vm.asid > m.profile.max_asid
    assert hv.launch(vm, [(IMAGE, image)]) == b""
    assert m.firmware.log == log_before  # no firmware involved
    vm.add_vcpu(PyEngine(_reader(IMAGE, 64)))
    hv.run(vm)
    assert _guest_read(m, vm) == image[:64]
    assert vm.host_read(IMAGE, 8192) == image
    assert _dram_holds(m, image)  # a plain guest's memory is plaintext in DRAM


@pytest.mark.parametrize("generation", ["naples", "milan", "genoa"])
def test_sev_launch_encrypts_the_image_in_place(generation: str) -> None:
    m = small_machine(generation)
    hv = m.hv
    image = _blocks(2, 3 * 4096 + 64)
    vm = hv.create_vm("sev", MEM)
    assert vm.asid in m.profile.sev_asids()
    measure = hv.launch(vm, [(IMAGE, image)], programs=[_reader])
    assert len(measure) == 0x30 and vm.measurement == measure
    cmds = [name for name, _ in m.firmware.log]
    launch = cmds[cmds.index("LAUNCH_START"):]
    assert launch[:2] == ["LAUNCH_START", "ACTIVATE"]
    assert launch[-2:] == ["LAUNCH_MEASURE", "LAUNCH_FINISH"]
    assert set(launch[2:-2]) == {"LAUNCH_UPDATE_DATA"}
    assert all(status == 0 for _, status in m.firmware.log)
    st = hv.guest_status(vm)
    assert (st.state, st.asid, st.handle) == (GuestState.RUNNING, vm.asid, vm.handle)
    vm.add_vcpu(PyEngine(_reader(IMAGE + 4096, 128)))
    hv.run(vm)
    assert _guest_read(m, vm) == image[4096 : 4096 + 128]
    assert not _dram_holds(m, image)
    host = vm.host_read(IMAGE, len(image))
    assert host != image and image[:16] not in host


def test_guest_learns_its_c_bit_and_sev_status(machine: Machine) -> None:
    m, hv = machine, machine.hv
    infos: list[Any] = []

    def work() -> Workload:
        infos.append((yield from boot(MEM)))
        yield op.hlt()

    for kind in (VmKind.SEV, VmKind.PLAIN):
        vm = hv.create_vm(kind.value, MEM, kind)
        hv.launch(vm, [], programs=[work])
        vm.add_vcpu(PyEngine(work()))
        assert hv.run(vm).reason == "hlt"
    sev, plain = infos
    assert (sev.sev, sev.cbit) == (True, m.profile.cbit)
    assert (plain.sev, plain.cbit) == (False, 0)


def test_demand_paging_backs_pages_on_npf(machine: Machine) -> None:
    hv = machine.hv
    vm = _sev_vm(machine)
    before = hv.pages.allocated
    vm.add_vcpu(PyEngine(touch_pages(MEM, SECRET, 16 * 4096)))
    r = hv.run(vm)
    assert r.reason == "hlt"
    v = vm.vcpus[0]
    assert v.exits["NPF"] >= 16
    assert hv.pages.allocated - before == v.exits["NPF"]  # one page per fault, none more
    for i in range(16):
        vm.spa_of(SECRET + i * 4096)
    with pytest.raises(UnmappedError):
        vm.spa_of(SECRET + 16 * 4096)


def test_console_output(machine: Machine) -> None:
    def work() -> Workload:
        yield from boot(MEM)
        yield from print_("hello from an SEV guest\n")
        yield op.hlt()

    vm = _sev_vm(machine, programs=(work,))

    vm.add_vcpu(PyEngine(work()))
    machine.hv.run(vm)
    assert vm.console == b"hello from an SEV guest\n"
    assert vm.vcpus[0].exits["IOIO"] == len(vm.console)


def test_map_gpa_range_hypercall(machine: Machine) -> None:
    results: list[int] = []

    def work() -> Workload:
        yield from boot(MEM, shared=[SHARED, SHARED + 0x1000])
        yield op.hlt()
        results.append((yield op.vmmcall(rax=KVM_HC_MAP_GPA_RANGE, rbx=SHARED, rcx=2, rdx=1 << 4)))
        results.append((yield op.vmmcall(rax=999)))
        yield op.hlt()

    vm = _sev_vm(machine, programs=(work,))
    vm.add_vcpu(PyEngine(work()))
    machine.hv.run(vm)
    assert vm.shared_gpas == {SHARED, SHARED + 0x1000}
    machine.hv.run(vm)
    assert vm.shared_gpas == set()
    assert results == [0, (1 << 64) - 1000]  # -KVM_ENOSYS for an unknown hypercall


# ---- what the hypervisor sees and what its writes do -----------------------------------------------------


@pytest.mark.parametrize("generation", ["milan", "genoa"])
def test_host_reads_ciphertext_of_private_pages_and_plaintext_of_shared_ones(generation: str) -> None:
    m = small_machine(generation)
    secret = _blocks(3, 64)
    message = _blocks(4, 64)

    def work() -> Workload:
        yield from boot(MEM, shared=[SHARED])
        yield op.write(SECRET, secret)
        yield op.write(SHARED, message)
        yield op.hlt()

    vm = _sev_vm(m, programs=(work,))
    vm.add_vcpu(PyEngine(work()))
    m.hv.run(vm)
    assert vm.host_read(SHARED, 64) == message  # C=0 lines are shared: no flush needed
    m.soc.wbinvd_all()
    ct = vm.host_read(SECRET, 64)
    assert ct == m.soc.dram.read(vm.spa_of(SECRET), 64)
    assert all(secret[i : i + 16] not in ct for i in range(0, 64, 16))
    assert not _dram_holds(m, secret)
    assert m.soc.dram.find(message[:16]) == [vm.spa_of(SHARED)]


def test_host_writes_corrupt_private_pages_and_reach_shared_ones(machine: Machine) -> None:
    m = machine
    vm = _sev_vm(m)
    secret = _blocks(5, 64)
    vm.add_vcpu(PyEngine(keep_secret(MEM, SECRET, secret, shared=SHARED)))
    m.hv.run(vm)
    assert b"read back ok" in vm.console
    m.soc.wbinvd_all()
    forged = _blocks(6, 64)
    vm.host_write(SECRET, forged)
    m.soc.wbinvd_all()
    m.hv.run(vm)
    seen = bytes.fromhex(_last_line(vm))
    assert seen != secret and seen != forged  # garbage: the forged bytes were decrypted with the VEK
    # a shared page is a plain bounce buffer both ways
    vm2 = _sev_vm(m, "vm2")
    vm2.add_vcpu(PyEngine(_reader(SHARED, 32, shared=[SHARED])))
    m.hv.run(vm2)
    vm2.back(SHARED)  # the host backs the page itself; the guest never touched it
    vm2.host_write(SHARED, b"reply from the host, 32 bytes.!!")
    assert _guest_read(m, vm2) == b"reply from the host, 32 bytes.!!"


def test_replaying_ciphertext_restores_old_plaintext(machine: Machine) -> None:
    """No integrity or freshness before SNP: the host can put old ciphertext back."""
    m = machine
    old, new = _blocks(7, 64), _blocks(8, 64)

    def work() -> Workload:
        yield from boot(MEM)
        yield op.write(SECRET, old)
        yield op.hlt()
        yield op.write(SECRET, new)
        yield op.hlt()
        while True:
            data = yield op.read(SECRET, 64)
            yield from print_(data.hex() + "\n")
            yield op.hlt()

    vm = _sev_vm(m, programs=(work,))
    vm.add_vcpu(PyEngine(work()))
    m.hv.run(vm)
    m.soc.wbinvd_all()
    saved = vm.host_read(SECRET, 64)
    m.hv.run(vm)
    m.soc.wbinvd_all()
    vm.host_write(SECRET, saved)
    m.soc.wbinvd_all()
    m.hv.run(vm)
    assert bytes.fromhex(_last_line(vm)) == old


def test_remapping_another_vms_page_gives_garbage(machine: Machine) -> None:
    m, hv = machine, machine.hv
    a, b = _sev_vm(m, "a"), _sev_vm(m, "b")
    secret = _blocks(9, 32)
    a.add_vcpu(PyEngine(keep_secret(MEM, SECRET, secret)))
    hv.run(a)
    b.add_vcpu(PyEngine(_reader(SECRET + MiB, 32)))
    hv.run(b)
    m.soc.wbinvd_all()
    hv.map_foreign(b, SECRET + MiB, a, SECRET)
    seen = _guest_read(m, b)
    assert seen != secret and secret[:16] not in seen


# ---- teardown, ASID reuse and the firmware's rules -------------------------------------------------------


def _two_asid_machine() -> Machine:
    """A Milan whose BIOS leaves two SEV ASIDs (100, 101): reuse comes quickly."""
    return small_machine(dataclasses.replace(MILAN, max_asid=101))  # type: ignore[arg-type]


def test_destroy_then_asid_reuse_does_wbinvd_and_df_flush() -> None:
    m = _two_asid_machine()
    hv = m.hv
    a, b = _sev_vm(m, "a"), _sev_vm(m, "b")
    assert (a.asid, b.asid) == (100, 101)
    with pytest.raises(AsidError):
        hv.create_vm("c", MEM)
    hv.destroy(a)
    assert a.state is VmState.DESTROYED and a not in hv.vms
    assert [n for n, _ in m.firmware.log[-2:]] == ["DEACTIVATE", "DECOMMISSION"]
    flushes = m.soc.boot_cpu.wbinvd_count
    c = _sev_vm(m, "c")
    assert c.asid == 100 and hv.asid_flushes == 1
    assert m.soc.boot_cpu.wbinvd_count == flushes + 1
    names = [n for n, _ in m.firmware.log]
    assert names.index("DF_FLUSH") < len(names) - 1 - names[::-1].index("ACTIVATE")
    assert all(status == 0 for _, status in m.firmware.log)
    hv.destroy(c)
    hv.destroy(c)  # idempotent


def test_firmware_refuses_activate_when_wbinvd_or_df_flush_is_skipped() -> None:
    m = _two_asid_machine()
    hv = m.hv
    a = _sev_vm(m, "a")
    hv.destroy(a)
    start = hv.psp.call(CommandId.LAUNCH_START, LaunchStartCmd(policy=0))

    def activate(asid: int) -> None:
        hv.psp.call(CommandId.ACTIVATE, ActivateCmd(handle=start.handle, asid=asid))

    with pytest.raises(MailboxError) as ei:
        activate(a.asid)
    assert ei.value.status == Status.WBINVD_REQUIRED
    with pytest.raises(MailboxError) as ei:
        hv.psp.call_nobuf(CommandId.DF_FLUSH)
    assert ei.value.status == Status.WBINVD_REQUIRED
    m.soc.wbinvd_all()
    with pytest.raises(MailboxError) as ei:
        activate(a.asid)
    assert ei.value.status == Status.DF_FLUSH_REQUIRED
    hv.psp.call_nobuf(CommandId.DF_FLUSH)
    activate(a.asid)
    assert hv.psp.call(CommandId.GUEST_STATUS, GuestStatusCmd(handle=start.handle)).asid == a.asid


def test_firmware_asid_ownership_and_range_checks(machine: Machine) -> None:
    hv = machine.hv
    a = _sev_vm(machine, "a")
    start = hv.psp.call(CommandId.LAUNCH_START, LaunchStartCmd(policy=0))
    for asid, status in ((a.asid, Status.ASID_OWNED), (5, Status.INVALID_ASID),
                         (MILAN.max_asid + 1, Status.INVALID_ASID)):
        with pytest.raises(MailboxError) as ei:
            hv.psp.call(CommandId.ACTIVATE, ActivateCmd(handle=start.handle, asid=asid))
        assert ei.value.status == status
    with pytest.raises(MailboxError) as ei:
        hv.psp.call(CommandId.DECOMMISSION, HandleCmd(handle=a.handle))
    assert ei.value.status == Status.ACTIVE


def test_asid_reuse_does_not_inherit_stale_translations() -> None:
    """A new VM on a reused ASID must not see the old VM's TLB entries (its stores would land in the
    old VM's freed pages)."""
    m = _two_asid_machine()
    hv = m.hv
    def old_guest() -> Workload:
        yield from boot(MEM, tables_at=0x300000)
        yield op.write(0x10000, b"A" * 16)  # a TLB entry for GVA 0x10000 -> a's page
        yield op.hlt()

    a = _sev_vm(m, "a", programs=(old_guest,))

    a.add_vcpu(PyEngine(old_guest()))
    hv.run(a)
    _sev_vm(m, "b")
    hv.destroy(a)
    c = _sev_vm(m, "c")
    assert c.asid == a.asid
    c.add_vcpu(PyEngine(_reader(0x10000, 8)))  # builds its page tables at GPA 0x10000
    assert hv.run(c).reason == "hlt"
    assert hv.run(c).reason == "hlt", c.crash_reason
    c.spa_of(0x10000)  # the page was backed by demand paging, not reached through a stale entry


def test_vcpus_of_one_asid_do_not_share_translations(machine: Machine) -> None:
    """Two vCPUs, one ASID, different page tables: switching VMCBs flushes the ASID's TLB."""
    m = machine
    page = SHARED

    def vcpu0() -> Workload:
        yield from boot(MEM, shared=[page])  # the page is shared (C=0) in vCPU 0's tables
        yield op.write(page, b"C=0 view")
        yield op.hlt()
        while True:
            data = yield op.read(page, 8)
            yield from print_(data.decode(errors="replace") + "\n")
            yield op.hlt()

    def vcpu1() -> Workload:
        yield from boot(MEM, tables_at=0x40000)  # private (C=1) in vCPU 1's tables
        yield op.write(page, b"C=1 view")
        yield op.hlt()

    vm = _sev_vm(m, programs=(vcpu0, vcpu1))
    vm.add_vcpu(PyEngine(vcpu0()))
    vm.add_vcpu(PyEngine(vcpu1()))
    m.hv.run(vm, 0)
    m.hv.run(vm, 1)
    m.hv.run(vm, 0)
    assert _last_line(vm) == "C=0 view"


def test_destroy_flushes_guest_lines_before_freeing_pages() -> None:
    """Dirty lines of a destroyed guest must not later overwrite the pages' next owner."""
    m = small_machine(cache_size=4 * MiB)  # nothing gets evicted by accident
    hv = m.hv
    a = _sev_vm(m, "a")
    a.add_vcpu(PyEngine(touch_pages(MEM, SECRET, 8 * 4096, stride=64)))
    hv.run(a)
    freed = set(a._owned)
    hv.destroy(a)
    image = _blocks(10, 12 * 4096)
    b = _sev_vm(m, "b", [(IMAGE, image)])
    assert freed & {b.spa_of(IMAGE + i) for i in range(0, len(image), 4096)}
    m.soc.wbinvd_all()
    b.add_vcpu(PyEngine(_reader(IMAGE, len(image))))
    hv.run(b)
    assert _guest_read(m, b) == image


def test_recycled_pages_hold_no_dirty_host_lines() -> None:
    """A recycled page is zeroed by the host; those zeros must not land on the new owner's data."""
    m = small_machine(cache_size=4 * MiB)
    hv = m.hv
    a = _sev_vm(m, "a")
    a.add_vcpu(PyEngine(touch_pages(MEM, SECRET, 16 * 4096)))
    hv.run(a)
    hv.destroy(a)
    data = _blocks(11, 64)

    def work() -> Workload:
        yield from boot(MEM)
        for g in range(SECRET, SECRET + 16 * 4096, 4096):
            yield op.write(g, data)
            yield op.clflush(g)  # the guest's line reaches DRAM first
        yield op.hlt()
        ok = True
        for g in range(SECRET, SECRET + 16 * 4096, 4096):
            ok &= (yield op.read(g, 64)) == data
        yield from print_(f"{ok}\n")
        yield op.hlt()

    b = _sev_vm(m, "b", programs=(work,))
    b.add_vcpu(PyEngine(work()))
    hv.run(b)
    m.soc.wbinvd_all()
    hv.run(b)
    assert _last_line(b) == "True"


def test_destroying_an_unlaunched_sev_vm_returns_its_asid() -> None:
    m = _two_asid_machine()
    hv = m.hv
    a = hv.create_vm("a", MEM)
    hv.create_vm("b", MEM)
    hv.destroy(a)
    assert hv.create_vm("c", MEM).asid == a.asid
    assert hv.asid_flushes == 0  # never activated: nothing to flush


# ---- bad input, nothing changed -----------------------------------------------------------------------------


def test_bad_launch_input_changes_nothing(machine: Machine) -> None:
    m, hv = machine, machine.hv
    vm = hv.create_vm("vm", MEM)
    pages, log = hv.pages.allocated, list(m.firmware.log)
    for regions in ([(0, bytes(MEM + 4096))], [(MEM - 16, bytes(32))], [(-4096, bytes(16))],
                    [(IMAGE, b"ok"), (MEM, b"x")]):
        with pytest.raises(InputError):
            hv.launch(vm, regions)
        assert vm.state is VmState.CREATED
        assert hv.pages.allocated == pages and m.firmware.log == log
        assert vm.npt.mappings == {}
    hv.launch(vm, [(IMAGE, b"fine")])
    with pytest.raises(VmError):
        hv.launch(vm, [])


def test_bad_guest_addresses(machine: Machine) -> None:
    m = machine
    vm = _sev_vm(m, regions=[(IMAGE, _blocks(12, 4096))])
    with pytest.raises(AddressError):
        vm.back(MEM)
    with pytest.raises(AddressError):
        vm.back(-1)
    with pytest.raises(AddressError):
        vm.npt.map(MEM, 0x20000000)
    with pytest.raises(AlignmentError):
        vm.npt.map(0x1000, 0x20000010)
    with pytest.raises(UnmappedError):
        vm.host_read(SECRET, 16)
    with pytest.raises(UnmappedError):
        vm.spa_of(SECRET)
    m.soc.wbinvd_all()
    before = vm.host_read(IMAGE, 4096)
    dram_before = m.soc.dram.read(vm.spa_of(IMAGE), 4096)
    with pytest.raises(UnmappedError):
        vm.host_write(IMAGE + 4000, b"\xff" * 200)  # runs into the unmapped next page
    assert vm.host_read(IMAGE, 4096) == before
    m.soc.wbinvd_all()
    assert m.soc.dram.read(vm.spa_of(IMAGE), 4096) == dram_before
    with pytest.raises(AddressError):
        Vm("bad", VmKind.SEV, 4095, 100, m.soc.boot_cpu, m.hv.pages, m.hv.tables)


def test_run_refusals_and_crashes(machine: Machine) -> None:
    hv = machine.hv
    vm = hv.create_vm("vm", MEM)
    with pytest.raises(VmError):
        hv.run(vm)  # not launched

    def wild() -> Workload:
        yield op.load(MEM + 0x1000, 8)  # paging off: GPA beyond the VM's memory

    hv.launch(vm, [], programs=[wild])
    vm.add_vcpu()
    with pytest.raises(VmError):
        hv.run(vm)  # nothing to run

    r = hv.run(vm, engine=PyEngine(wild()))
    assert r.exit.code == ExitCode.NPF and "unresolvable #NPF" in r.reason
    assert vm.state is VmState.CRASHED and vm.crash_reason == r.reason
    with pytest.raises(VmError):
        hv.run(vm)
    def dies() -> Workload:
        yield op.store(0x1000, 8, 1)
        raise ValueError("kernel panic")

    vm2 = _sev_vm(machine, "vm2", programs=(dies,))

    vm2.add_vcpu()
    r = hv.run(vm2, engine=PyEngine(dies()))
    assert r.exit.code == ExitCode.SHUTDOWN and "kernel panic" in r.reason
    assert vm2.state is VmState.CRASHED


def test_vmrun_invalid_crashes_the_vm(machine: Machine) -> None:
    hv = machine.hv
    vm = _sev_vm(machine)
    v = vm.add_vcpu(PyEngine(touch_pages(MEM, SECRET, 4096)))
    v.vmcb.np_enable = False  # SEV without nested paging
    r = hv.run(vm)
    assert r.exit.code == ExitCode.INVALID and vm.state is VmState.CRASHED


@pytest.mark.parametrize("small", [64, 0], ids=["loop", "arrays"])
def test_back_pages_backs_and_maps_as_back_does_page_by_page(small: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vm.back_pages (received migration batches, KVM's SNP_LAUNCH_UPDATE): the same backing pages,
    the same nested page-table entries in the same table pages, as Vm.back of each GPA in turn -- GPAs
    in runs, across a 2 MiB page-table boundary, out of order, repeated and already backed; a GPA that
    is not a page of the VM backs nothing.  Both ways of a batch: the loop (short batches) and the
    arrays (``small`` 0: every batch)."""
    monkeypatch.setattr(npt, "SMALL_BATCH", small)
    gpas = [0x1F_E000, 0x1F_F000, 0x20_0000, 0x20_1000, 0x5000, 0x3000, 0x5000, 0x30_0000]
    worlds = []
    for bulk in (False, True):
        m = small_machine()
        vm = m.hv.create_vm("b", 4 * MiB, VmKind.SEV)
        vm.back(0x3000)
        spas = vm.back_pages(gpas) if bulk else [vm.back(gpa) for gpa in gpas]
        tables = sorted(vm.npt._tables.items())
        worlds.append((spas, dict(vm.npt.mappings), tables,
                       [m.hv.core.host_read(spa, 4096) for _, spa in tables], m.hv.pages.allocated))
        before = dict(vm.npt.mappings)
        for bad in ([0x1000, 0x2001], [0x1000, 4 * MiB]):
            with pytest.raises(AddressError):
                vm.back_pages(bad)
            assert vm.npt.mappings == before
    assert worlds[0] == worlds[1]


@pytest.mark.parametrize("in_c", [True, False])
def test_backed_spas_are_back_pages_of_pages_backed_already(monkeypatch: pytest.MonkeyPatch, in_c: bool) -> None:
    """Vm.backed_spas (a prepared migration destination's batches): the SPAs back_pages gives for
    GPAs that are all backed -- a huge page's and 4 KiB ones, out of order -- as a column, with
    nothing backed or mapped; None (back them instead) for a GPA not backed, unaligned, outside the
    VM, or an empty column.  The lookups in C (sevemu.hw.columns.lookup) or one by one in Python."""
    from sevemu.hw import memaccel

    if in_c and not memaccel.COLUMNS:
        pytest.skip("the C helpers were not built")
    monkeypatch.setattr(memaccel, "COLUMNS", in_c)
    m = small_machine()
    vm = m.hv.create_vm("b", 4 * MiB, VmKind.SEV)
    vm.back_huge(0x20_0000)
    for gpa in (0x3000, 0x5000, 0x1F_F000):
        vm.back(gpa)
    gpas = [0x20_1000, 0x5000, 0x3FF_000, 0x3000, 0x1F_F000, 0x20_0000]
    before, allocated = dict(vm.npt.mappings), m.hv.pages.allocated
    column = vm.backed_spas(np.array(gpas, dtype=np.uint64))
    assert column is not None and column.dtype == np.uint64
    assert column.tolist() == vm.back_pages(gpas)
    assert vm.npt.mappings == before and m.hv.pages.allocated == allocated
    for bad in ([0x5000, 0x6000], [0x5000, 0x3001], [0x5000, 4 * MiB], []):
        assert vm.backed_spas(np.array(bad, dtype=np.uint64)) is None
    assert vm.npt.mappings == before


@pytest.mark.parametrize("small", [64, 0], ids=["loop", "arrays"])
def test_map_many_checks_every_pair_before_mapping_any(small: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """NestedPageTable.map_many refuses a batch with one bad pair -- a misaligned GPA or SPA, a GPA
    outside the VM, a negative or 64-bit SPA -- naming it, with nothing mapped; then maps a good one
    with the entries map() writes (both ways of a batch, as above)."""
    monkeypatch.setattr(npt, "SMALL_BATCH", small)
    m = small_machine()
    vm = m.hv.create_vm("m", 4 * MiB, VmKind.SEV)
    good = [(0x1000, 0x80_0000), (0x2000, 0x80_1000)]
    for bad, error, text in [((0x3000, 0x80_2008), AlignmentError, "0x802008"),
                             ((4 * MiB, 0x80_2000), AddressError, "0x400000"),
                             ((-0x1000, 0x80_2000), AddressError, "-0x1000"),
                             ((0x3000, -0x1000), AddressError, "outside"),
                             ((0x3000, 1 << 64), AddressError, "outside")]:
        with pytest.raises(error, match=text):
            vm.npt.map_many([*good, bad])
        assert vm.npt.mappings == {}
    vm.npt.map_many(good)
    assert vm.npt.mappings == {1: 0x80_0000, 2: 0x80_1000}
    pt = vm.npt._tables[(1, 0)]
    entries = m.hv.core.host_read(pt + 8, 16)
    assert [int.from_bytes(entries[i : i + 8], "little") & ~0xFFF for i in (0, 8)] == [0x80_0000, 0x80_1000]


def test_npt_columns_and_lookup_many_follow_every_change() -> None:
    """NestedPageTable.columns lists sorted(mappings.items()) and lookup_many gives mappings.get(gfn,
    -1) of each GFN -- one run of GFNs (indexed directly) and scattered ones (searched), GFNs mapped
    out of order, unmapped and outside every mapping -- after each kind of change (map, map_many in
    both of its ways, map_huge, unmap, release): the snapshot kept between lookups is never stale."""
    m = small_machine()
    vm = m.hv.create_vm("cols", 8 * MiB, VmKind.SEV)
    table = vm.npt
    rng = random.Random(7)
    probe = np.array([0, 1, 2, 3, 5, 17, 511, 512, 513, 1023, 1024, 1500, 2047, 2048, 1 << 40], dtype=np.int64)

    def agree() -> None:
        keys, spas = table.columns()
        assert list(zip(keys.tolist(), spas.tolist(), strict=True)) == sorted(table.mappings.items())
        assert not keys.flags.writeable and not spas.flags.writeable
        assert table.lookup_many(probe).tolist() == [table.mappings.get(g, -1) for g in probe.tolist()]
        assert table.lookup_many(probe).tolist() == [table.mappings.get(g, -1) for g in probe.tolist()]  # (kept)
        inside = keys[::3].copy()  # (only mapped GFNs: the gather without the masks when they are one run)
        assert table.lookup_many(inside).tolist() == spas[::3].tolist()

    agree()  # nothing mapped
    spa = 0x100_0000
    for gfn in (3, 1, 2):  # out of GFN order: one run once sorted
        table.map(gfn << 12, spa + gfn * 0x1000)
        agree()
    table.map_many([(g << 12, spa + g * 0x1000) for g in rng.sample(range(4, 40), 20)])  # scattered, array path
    agree()
    table.map_many([(5 << 12, 0x200_0000)] if 5 not in table.mappings else [(41 << 12, 0x200_0000)])  # few pairs
    agree()
    table.map_huge(2 * MiB, 0x400_0000)  # GFNs 512..1023
    agree()
    table.unmap(600 << 12)
    agree()
    table.unmap(1 << 12)
    agree()
    table.unmap(2 << 12)  # as many mappings as before, other ones: the snapshot's length alone would not tell
    table.map(1 << 12, 0x300_0000)
    agree()
    table.map(1 << 12, 0x300_1000)  # the same GFN moved to another page
    agree()
    table.release()
    agree()
