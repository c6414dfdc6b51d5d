"""The guest kernel model: identity-map page tables with the C-bit, boot, and the guest programs."""

from __future__ import annotations

import pytest

from sevemu.abi.paging import Pte
from sevemu.errors import AddressError, AlignmentError
from sevemu.guest.kernel import boot
from sevemu.guest.paging import PageTableBuilder
from sevemu.guest.workloads import demo_guest, keep_secret, read_back, shared_exchange
from sevemu.hw.faults import PageFault
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor.vm import VmKind
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20
GiB = 1 << 30
C = 1 << 51
P, RW, PS = int(Pte.P), int(Pte.RW), int(Pte.PS)
ADDR = ((1 << 52) - 1) & ~0xFFF & ~C


def _walk(builder: PageTableBuilder, gva: int) -> tuple[int, bool]:
    """Resolve ``gva`` through the builder's entries as the MMU would: (gpa, C-bit of the leaf)."""
    mem = dict(builder.entries)
    table = builder.root & ADDR
    for shift in (39, 30, 21, 12):
        entry = mem.get(table + ((gva >> shift) & 0x1FF) * 8, 0)
        assert entry & P, f"{gva:#x} not mapped at level {shift}"
        if shift == 21 and entry & PS:
            return (entry & ADDR & ~0x1FFFFF) | (gva & 0x1FFFFF), bool(entry & C)
        if shift == 12:
            return (entry & ADDR) | (gva & 0xFFF), bool(entry & C)
        assert entry & C or not builder.cmask  # table pointers carry the C-bit too
        table = entry & ADDR
    raise AssertionError


def test_identity_map_with_2mib_private_pages() -> None:
    b = PageTableBuilder(0x10000, 4 * MiB, C)
    assert b.root == 0x10000 | C
    assert b.end == 0x10000 + 3 * 4096  # PML4, PDPT, PD
    leaves = [v for _, v in b.entries if v & PS]
    assert leaves == [0 | C | P | RW | PS, 2 * MiB | C | P | RW | PS]
    for gva in (0, 0x1234, 3 * MiB + 5, 4 * MiB - 1):
        assert _walk(b, gva) == (gva, True)


def test_shared_pages_get_4k_entries_without_the_c_bit() -> None:
    b = PageTableBuilder(0x10000, 4 * MiB, C, shared=[0x300000, 0x301234])
    assert b.shared == [0x300000, 0x301000]
    assert b.end == 0x10000 + 4 * 4096  # + one page table for the split 2 MiB region
    assert _walk(b, 0x300010) == (0x300010, False)
    assert _walk(b, 0x301FFF) == (0x301FFF, False)
    assert _walk(b, 0x302000) == (0x302000, True)
    assert _walk(b, 0x2FFFFF) == (0x2FFFFF, True)
    assert _walk(b, 0x100000) == (0x100000, True)


def test_plain_guest_tables_have_no_c_bit() -> None:
    b = PageTableBuilder(0, 2 * MiB, 0, shared=[0x1000])
    assert all(not v & C for _, v in b.entries)
    assert _walk(b, 0x1000) == (0x1000, False)
    assert _walk(b, 0x2000) == (0x2000, False)


def test_large_maps_span_several_directories() -> None:
    b = PageTableBuilder(0x10000, 3 * GiB, C)
    assert _walk(b, 2 * GiB + 0x12345) == (2 * GiB + 0x12345, True)
    assert b.end == 0x10000 + (2 + 3) * 4096  # PML4, PDPT, three PDs
    big = PageTableBuilder(0x10000, 513 * GiB, C)
    assert _walk(big, 512 * GiB + 7) == (512 * GiB + 7, True)


@pytest.mark.parametrize("args,error", [
    ((0x10010, 2 * MiB, C), AlignmentError),
    ((0x10000, 3 * MiB, C), AlignmentError),
    ((0x10000, 0, C), AlignmentError),
    ((0x10000, 2 * MiB, C, [2 * MiB]), AddressError),
    ((0x10000, 2 * MiB, C, [-4096]), AddressError),
])
def test_builder_refuses_bad_layouts(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        PageTableBuilder(*args)  # type: ignore[arg-type]


# ---- the guest programs on a real host ---------------------------------------------------------------


@pytest.fixture(scope="module")
def machine() -> Machine:
    return build_machine("milan", seed="guest-tests", dram_size=512 * MiB, cache_size=256 << 10)


def test_boot_writes_its_tables_privately(machine: Machine) -> None:
    hv = machine.hv
    vm = hv.create_vm("boot", 4 * MiB)

    def work() -> Workload:
        info = yield from boot(4 * MiB)
        yield op.store(0x200000, 8, info.cr3)
        yield op.hlt()

    hv.launch(vm, [], programs=[work])

    vm.add_vcpu(PyEngine(work()))
    assert hv.run(vm).reason == "hlt"
    v = vm.vcpus[0].vmcb
    assert v.paging and v.cr3 == 0x10000 | C
    machine.soc.wbinvd_all()
    seen = vm.host_read(0x10000, 3 * 4096)
    plain = bytearray(3 * 4096)  # the guest clears its table pages, then writes the entries
    for gpa, value in PageTableBuilder(0x10000, 4 * MiB, C).entries:
        plain[gpa - 0x10000 : gpa - 0x10000 + 8] = value.to_bytes(8, "little")
    # the hypervisor sees no 16-byte block of the tables in the clear
    assert all(seen[i : i + 16] != plain[i : i + 16] for i in range(0, len(plain), 16))


def test_addresses_outside_the_identity_map_fault_cleanly(machine: Machine) -> None:
    """Unused table slots are zero (not present) in the guest's view: a #PF, never a walk through
    whatever fresh encrypted memory decrypts to."""
    hv = machine.hv
    vm = hv.create_vm("unmapped", 4 * MiB)
    faults: list[int] = []

    def work() -> Workload:
        yield from boot(4 * MiB)
        for gva in [4 * MiB + 0x1000, 37 * MiB, *(k * GiB for k in range(1, 40)), *(k << 39 for k in range(1, 40))]:
            try:
                yield op.load(gva, 8)
            except PageFault as pf:
                faults.append(pf.error_code)
        yield op.hlt()

    hv.launch(vm, [], programs=[work])
    vm.add_vcpu(PyEngine(work()))
    r = hv.run(vm)
    assert r.reason == "hlt", r.reason
    assert faults == [0] * 80


def test_keep_secret_and_read_back(machine: Machine) -> None:
    hv = machine.hv
    vm = hv.create_vm("secret", 4 * MiB)
    hv.launch(vm, [(0x100000, b"image")], programs=[keep_secret])
    vm.add_vcpu(PyEngine(keep_secret(4 * MiB, 0x200000, b"s3cr3t" * 3)))
    hv.run(vm)
    assert vm.console.startswith(b"secret of 18 bytes stored at GPA 0x200000: read back ok\n")
    hv.run(vm)
    assert vm.console.endswith((b"s3cr3t" * 3).hex().encode() + b"\n")
    rb = hv.create_vm("read_back", 4 * MiB)
    hv.launch(rb, [(0x100000, b"launched image bytes")], programs=[read_back])
    rb.add_vcpu(PyEngine(read_back(4 * MiB, 0x100000, 20)))
    hv.run(rb)
    assert rb.console == b"launched image bytes".hex().encode() + b"\n"


@pytest.mark.parametrize("kind", [VmKind.SEV, VmKind.PLAIN])
def test_shared_exchange(machine: Machine, kind: VmKind) -> None:
    hv = machine.hv
    vm = hv.create_vm(f"exchange-{kind.value}", 4 * MiB, kind)
    hv.launch(vm, [], programs=[shared_exchange])
    vm.add_vcpu(PyEngine(shared_exchange(4 * MiB, 0x300000, b"ping")))
    hv.run(vm)
    assert vm.host_read(0x300000, 4) == b"ping"
    if kind is VmKind.SEV:
        assert vm.shared_gpas == {0x300000}
    vm.host_write(0x300040, b"pong")
    hv.run(vm)
    assert vm.console == b"host replied: pong\n"


def test_demo_guest(machine: Machine) -> None:
    hv = machine.hv
    vm = hv.create_vm("demo", 8 * MiB)
    hv.launch(vm, [], programs=[demo_guest])
    vm.add_vcpu(PyEngine(demo_guest(8 * MiB, 0x200000, b"top secret", 0x300000, b"hi host", 0x400000)))
    hv.run(vm)
    assert vm.host_read(0x300000, 7) == b"hi host"
    vm.host_write(0x300040, b"hi guest")
    hv.run(vm)
    lines = vm.console.decode().splitlines()
    assert lines[0].endswith("read back ok") and lines[1] == "reply=hi guest"
    assert lines[2] == "secret=" + b"top secret".hex()
    assert lines[3].startswith("peek=")
