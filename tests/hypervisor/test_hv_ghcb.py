"""The hypervisor's GHCB handling (hypervisor/ghcb.py): the GHCB MSR protocol answered in the MSR,
and the refusals that end the guest -- unknown requests, a GHCB the host cannot map, a GHCB other
than the registered one.  The GHCB page protocol with real guest code: tests/guest/test_guest_es.py."""

from __future__ import annotations

import pytest

from sevemu._util.units import GiB, MiB
from sevemu.hypervisor.ghcb import ghcb_msr_term, term_reason
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine


@pytest.fixture(scope="module")
def m() -> Machine:
    return build_machine("milan", seed="hv-ghcb", dram_size=1 * GiB, cache_size=256 << 10)


def _vm(m: Machine) -> tuple[Vm, Vcpu]:
    vm = m.hv.create_vm("ghcb", 16 * MiB, VmKind.SEV, vm_type=KvmVmType.SEV_ES_VM)
    m.hv.sev_init(vm)
    return vm, vm.add_vcpu()


def _call(m: Machine, vm: Vm, v: Vcpu, msr: int) -> str | None:
    v.vmcb.ghcb_gpa = msr
    return m.hv.ghcb.vmgexit(vm, v)


def test_msr_protocol_answers(m: Machine) -> None:
    vm, v = _vm(m)
    assert _call(m, vm, v, 0x002) is None
    resp = v.vmcb.ghcb_gpa
    assert resp & 0xFFF == 0x001 and (resp >> 24) & 0xFF == 51  # Milan's C-bit
    assert (resp >> 32) & 0xFFFF == 1 and resp >> 48 == vm.ghcb_version == 2
    assert _call(m, vm, v, 0x8000001F << 32 | 1 << 30 | 0x004) is None  # CPUID Fn8000_001F EBX
    resp = v.vmcb.ghcb_gpa
    assert resp & 0xFFF == 0x005 and (resp >> 30) & 3 == 1 and resp >> 32 == m.hv.cpuid(0x8000001F)[1]
    assert _call(m, vm, v, 0x080) is None and v.vmcb.ghcb_gpa == 0x081  # no hypervisor features (no SNP)
    assert _call(m, vm, v, 0x5000 | 0x012) is None
    assert v.vmcb.ghcb_gpa == 0x5013 and v.ghcb_registered == 0x5000
    assert _call(m, vm, v, 0x006) == "hold" and v.reset_hold and v.vmcb.ghcb_gpa == 0x007
    assert vm.state is not VmState.CRASHED


@pytest.mark.parametrize("msr,reason", [
    (0x0FE, "unsupported GHCB MSR protocol request 0xfe"),
    (ghcb_msr_term(1, 2), "the guest asked for it (reason set 1, code 2)"),
    (ghcb_msr_term(0, 1), "(GHCB protocol not supported)"),
    (0x7FFF_F000, "outside the guest"),
    (0x00F0_0000, "not backed"),
])
def test_what_terminates_the_guest(m: Machine, msr: int, reason: str) -> None:
    vm, v = _vm(m)
    assert _call(m, vm, v, msr) == "terminated"
    assert vm.state is VmState.CRASHED and reason in (vm.crash_reason or "")
    if msr & 0xFFF == 0x100:
        assert vm.termination == ((msr >> 12) & 0xF, (msr >> 16) & 0xFF)


def test_a_ghcb_other_than_the_registered_one_terminates(m: Machine) -> None:
    vm, v = _vm(m)
    vm.back(0x5000)
    vm.back(0x6000)
    assert _call(m, vm, v, 0x5000 | 0x012) is None
    assert _call(m, vm, v, 0x6000) == "terminated"
    assert "not the registered 0x5000" in (vm.crash_reason or "")


def test_term_reason_names() -> None:
    assert term_reason(0, 0) == "reason set 0, code 0 (general request)"
    assert term_reason(3, 9) == "reason set 3, code 9"
