"""The device bus behind the hypervisor's two ways in: a plain guest's IOIO exits and an SEV-ES
guest's GHCB IOIO (string I/O through the scratch area) and MMIO events (hypervisor/kvm.py, ghcb.py)."""

from __future__ import annotations

import struct

import pytest

from sevemu._util.units import GiB, MiB
from sevemu.abi.ghcb import GHCB_VALID_BITS, SwExitCode
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor.devices import LAPIC_BASE, install_pc
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine


@pytest.fixture(scope="module")
def m() -> Machine:
    return build_machine("milan", seed="hv-devices", dram_size=1 * GiB, cache_size=256 << 10)


def test_plain_guest_port_io_reaches_the_pc_devices(m: Machine) -> None:
    got: dict[str, object] = {}

    def work() -> Workload:
        yield op.out(0xCF8, 0x8000_0000, 4)
        got["did"] = yield op.inp(0xCFE, 2)
        yield op.out(0x510, 0, 2)
        sig = bytearray()
        for _ in range(4):
            sig.append((yield op.inp(0x511)))
        got["sig"] = bytes(sig)
        yield op.out(0x70, 0x34)
        got["cmos34"] = yield op.inp(0x71)
        got["nothing"] = yield op.inp(0x1234, 2)
        yield op.out(0x3F8, ord("k"))
        yield op.hlt()

    vm = m.hv.create_vm("plain-devices", 16 * MiB, VmKind.PLAIN)
    pc = install_pc(vm.devices, ram=256 * MiB, chipset="q35")
    m.hv.launch(vm, [])
    vm.add_vcpu(PyEngine(work()))
    r = m.hv.run(vm)
    assert r.reason == "hlt" and vm.state is VmState.RUNNING
    assert got == {"did": 0x29C0, "sig": b"QEMU", "cmos34": 0x00, "nothing": 0xFFFF}  # 240 MiB: 0x0F00
    assert vm.console == b"k"
    touched = vm.devices.touched()
    assert touched["pci-host"] == 2 and touched["fw_cfg"] == 5 and touched["cmos"] == 2
    assert touched["unassigned"] == 1 and touched["com1"] == 1
    assert pc.fw_cfg.selects == [0]


def test_in_of_a_byte_keeps_the_rest_of_rax(m: Machine) -> None:
    from sevemu.abi.paging import ExitCode
    from sevemu.hw.svm import VmExit

    vm = m.hv.create_vm("merge", 16 * MiB, VmKind.PLAIN)
    v = vm.add_vcpu()
    install_pc(vm.devices, ram=64 * MiB)
    vm.devices.io_write(0x70, 1, 0x34)
    v.vmcb.regs["rax"] = 0x1122_3344_5566_7788
    v.vmcb.next_rip = v.vmcb.rip + 2
    m.hv._handle_exit(vm, v, VmExit(ExitCode.IOIO, 0x71 << 16 | 1 << 4 | 1, 0))  # in %dx,%al
    assert v.vmcb.regs["rax"] == 0x1122_3344_5566_7700 | 0x00  # AL replaced (CMOS 0x34 of 64 MiB is 0x00)
    v.vmcb.regs["rax"] = 0x1122_3344_5566_7788
    m.hv._handle_exit(vm, v, VmExit(ExitCode.IOIO, 0x1234 << 16 | 1 << 6 | 1, 0))  # in %dx,%eax
    assert v.vmcb.regs["rax"] == 0xFFFF_FFFF  # a 32-bit IN zero-extends


# ---- SEV-ES: the GHCB ------------------------------------------------------------------------------
GHCB = 0x5000
SCRATCH = GHCB + 0x800


def _es_vm(m: Machine, name: str) -> tuple[Vm, Vcpu]:
    vm = m.hv.create_vm(name, 16 * MiB, VmKind.SEV, vm_type=KvmVmType.SEV_ES_VM)
    m.hv.sev_init(vm)
    v = vm.add_vcpu()
    vm.back(GHCB)
    return vm, v


def _ghcb_call(m: Machine, vm: Vm, v: Vcpu, code: int, info1: int, info2: int, scratch: bytes = b"",
               **regs: int) -> dict[str, int]:
    """Write a GHCB as an SEV-ES guest's #VC handler does, VMGEXIT, read the answer back."""
    fields = {"sw_exit_code": code, "sw_exit_info_1": info1, "sw_exit_info_2": info2,
              "sw_scratch": SCRATCH, **regs}
    page = bytearray(4096)
    bitmap = 0
    for name, value in fields.items():
        struct.pack_into("<Q", page, GHCB_VALID_BITS[name] * 8, value)
        bitmap |= 1 << GHCB_VALID_BITS[name]
    page[0x3F0:0x400] = bitmap.to_bytes(16, "little")
    page[0x800 : 0x800 + len(scratch)] = scratch  # the shared buffer (the scratch area here)
    struct.pack_into("<HI", page, 0xFFA, 2, 0)  # protocol version, ghcb_usage
    vm.host_write(GHCB, bytes(page))
    v.vmcb.ghcb_gpa = GHCB
    assert m.hv.ghcb.vmgexit(vm, v) is None and vm.state is not VmState.CRASHED, vm.crash_reason
    back = vm.host_read(GHCB, 4096)
    out_bitmap = int.from_bytes(back[0x3F0:0x400], "little")
    return {n: struct.unpack_from("<Q", back, b * 8)[0] for n, b in GHCB_VALID_BITS.items() if out_bitmap >> b & 1}


def test_ghcb_ioio_and_string_io_reach_the_devices(m: Machine) -> None:
    vm, v = _es_vm(m, "es-devices")
    pc = install_pc(vm.devices, ram=512 * MiB, cpus=2)
    # out %ax,%dx to 0x510 (select NB_CPUS), then rep insb of 2 bytes from 0x511 into the scratch area
    _ghcb_call(m, vm, v, SwExitCode.IOIO, 0x510 << 16 | 1 << 5, 0, rax=0x05)
    out = _ghcb_call(m, vm, v, SwExitCode.IOIO, 0x511 << 16 | 1 << 4 | 1 << 3 | 1 << 2 | 1, 2)
    assert out["sw_exit_info_1"] == 0 and vm.host_read(SCRATCH, 2) == b"\x02\x00"
    # in %eax from the PM timer once the PM block is placed (through config cycles, as PEI does)
    for port, size, value in ((0xCF8, 4, 0x8000_F840), (0xCFC, 4, 0x600), (0xCF8, 4, 0x8000_F844),
                              (0xCFC, 1, 0x80)):
        _ghcb_call(m, vm, v, SwExitCode.IOIO, port << 16 | {1: 1 << 4, 4: 1 << 6}[size], 0, rax=value)
    t1 = _ghcb_call(m, vm, v, SwExitCode.IOIO, 0x608 << 16 | 1 << 6 | 1, 0)["rax"]
    t2 = _ghcb_call(m, vm, v, SwExitCode.IOIO, 0x608 << 16 | 1 << 6 | 1, 0)["rax"]
    assert 0 < t1 < t2 < 1 << 24
    assert pc.pm.timer_reads == 2 and vm.devices.touched()["fw_cfg"] == 3


def test_ghcb_mmio_reaches_the_lapic(m: Machine) -> None:
    vm, v = _es_vm(m, "es-lapic")
    pc = install_pc(vm.devices, ram=64 * MiB)
    _ghcb_call(m, vm, v, SwExitCode.MMIO_WRITE, LAPIC_BASE + 0xF0, 4, scratch=struct.pack("<I", 0x1FF))  # SVR
    _ghcb_call(m, vm, v, SwExitCode.MMIO_READ, LAPIC_BASE + 0x30, 4)  # version
    assert struct.unpack("<I", vm.host_read(SCRATCH, 4))[0] == 0x0005_0014
    _ghcb_call(m, vm, v, SwExitCode.MMIO_READ, LAPIC_BASE + 0xF0, 4)
    assert struct.unpack("<I", vm.host_read(SCRATCH, 4))[0] == 0x1FF
    assert pc.lapic.reads == 2 and pc.lapic.writes == 1


def test_apic_base_msr_through_both_paths(m: Machine) -> None:
    """RDMSR 0x1B: an MSR exit of a plain guest and a GHCB MSR event of an SEV-ES guest both reach the
    LAPIC; with no PC installed the hypervisor answers 0 as before."""
    got: list[int] = []

    def work() -> Workload:
        got.append((yield op.rdmsr(0x1B)))
        yield op.hlt()

    vm = m.hv.create_vm("plain-msr", 16 * MiB, VmKind.PLAIN)
    install_pc(vm.devices, ram=64 * MiB)
    m.hv.launch(vm, [])
    vm.add_vcpu(PyEngine(work()))
    assert m.hv.run(vm).reason == "hlt" and got == [0xFEE0_0900]
    es, v = _es_vm(m, "es-msr")
    assert m.hv.msr_read(es, 0x1B) == 0  # no LAPIC on the bus yet
    install_pc(es.devices, ram=64 * MiB)
    out = _ghcb_call(m, es, v, SwExitCode.MSR, 0, 0, rcx=0x1B)
    assert (out["rdx"] << 32 | out["rax"]) == 0xFEE0_0900
