"""SNP AP creation (hypervisor/ap_creation.py, NAE 0x8000_0013): the guest makes an AP's VMSA in its own
private memory, gives it the VMSA bit with RMPADJUST and asks KVM to run the AP from it; KVM's checks
(APIC ID, SEV_FEATURES, GPA alignment, 2 MiB-aligned VMSA, request) refuse with GHCB_ERR_INVALID_INPUT and
change nothing; DESTROY stops the AP; CREATE_ON_INIT waits for INIT.  The host's attack -- pointing the
AP's VMCB at a page of its choosing -- fails VMRUN (VMEXIT_INVALID): the RMP decides what is a VMSA."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hvkit import launch_snp, snp_machine

from sevemu.abi.ghcb import Ghcb, GhcbError, MsrPscReq, PscOp, SwExitCode, valid_bitmap
from sevemu.abi.paging import ExitCode
from sevemu.abi.vmsa import SevEsSaveArea
from sevemu.hw.faults import VmmCommunication
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor import ap_creation
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.scenario import Machine

PAGE = 0x1000
GHCB_GPA = 0x30000
VMSA_GPA = 0x41000  # a page the launch did not touch: the guest takes it (on demand) and validates it
OTHER_GPA = 0x42000
FEATURES = 1  # SNP_ACTIVE: the VM's vmsa_features (KVM_SEV_INIT2 defaults)
CREATE, CREATE_ON_INIT, DESTROY = 1, 0, 2


@pytest.fixture(scope="module")
def m() -> Machine:
    return snp_machine("hv-snp-ap-creation")


def _vmsa(rip: int = 0x10_0000) -> bytes:
    """An AP's VMSA as a guest writes it: 32-bit protected mode, flat segments, SNP active."""
    seg = {f"{n}_{f}": v for n in ("es", "ss", "ds", "fs", "gs") for f, v in
           (("selector", 0x10), ("attrib", 0xC93), ("limit", 0xFFFFFFFF))}
    return SevEsSaveArea(cs_selector=0x08, cs_attrib=0xC9B, cs_limit=0xFFFFFFFF, cr0=0x11, rflags=2, rip=rip,
                         efer=0x1000, g_pat=0x0007040600070406, xcr0=1, sev_features=FEATURES, **seg).encode()


class Bsp:
    """The BSP's requests, written into its GHCB (a shared page: the test writes the guest's plaintext
    stores through the VMM's mapping, which holds the same bytes)."""

    def __init__(self) -> None:
        self.vm: Vm | None = None
        self.answers: list[tuple[int, int]] = []

    def ap_creation(self, request: int, apic_id: int, gpa: int, rax: int | None = FEATURES) -> Workload:
        assert self.vm is not None
        names = ["sw_exit_code", "sw_exit_info_1", "sw_exit_info_2"] + (["rax"] if rax is not None else [])
        self.vm.host_write(GHCB_GPA, Ghcb(sw_exit_code=int(SwExitCode.AP_CREATION), sw_exit_info_1=apic_id << 32
                                          | request, sw_exit_info_2=gpa, rax=rax or 0, protocol_version=2,
                                          valid_bitmap=valid_bitmap(*names)).encode())
        yield op.wrmsr(0xC001_0130, GHCB_GPA)
        yield op.vmgexit()
        back = Ghcb.decode(self.vm.host_read(GHCB_GPA, PAGE))
        self.answers.append((back.sw_exit_info_1, back.sw_exit_info_2))

    def prologue(self, vmsa_bit: bool = True) -> Workload:
        """The GHCB page shared (MSR protocol), the VMSA page taken, validated, written, VMSA bit."""
        yield op.wrmsr(0xC001_0130, MsrPscReq(gfn=GHCB_GPA // PAGE, op=int(PscOp.SHARED)).to_int())
        yield op.vmgexit()
        for gpa in (VMSA_GPA, OTHER_GPA):
            with contextlib.suppress(VmmCommunication):
                yield op.load(gpa, 8)  # KVM assigns it on this first private access: #VC 0x404
            yield op.pvalidate(gpa, 0, True)
        data = _vmsa()
        for off in range(0, len(data), 8):
            yield op.store(VMSA_GPA + off, 8, int.from_bytes(data[off : off + 8], "little"))
        if vmsa_bit:
            assert (yield op.rmpadjust(VMSA_GPA, 0, 1 | 1 << 16)) == (0, False)  # target VMPL1, no perms, VMSA


def _machine_vm(m: Machine, bsp: Workload, ap: Workload) -> Vm:
    vm = launch_snp(m, PyEngine(bsp), name="ap-creation", aps=[PyEngine(ap)])
    vm.vcpus[1].reset_hold = True  # the VMM: no INIT-SIPI reaches the AP; the guest creates it
    return vm


def test_the_guest_starts_and_stops_an_ap_from_a_vmsa_it_made(m: Machine) -> None:
    b = Bsp()
    ran: list[str] = []

    def bsp() -> Workload:
        yield from b.prologue()
        yield from b.ap_creation(CREATE, 1, VMSA_GPA)
        yield op.hlt()
        yield from b.ap_creation(DESTROY, 1, 0, rax=None)
        yield op.hlt()

    def ap() -> Workload:
        ran.append("AP runs")
        yield op.hlt()

    vm = b.vm = _machine_vm(m, bsp(), ap())
    try:
        assert m.hv.run(vm, 1).reason == "hold" and not ran  # waiting for its VMSA
        assert m.hv.run(vm, 0).reason == "hlt", vm.crash_reason
        assert b.answers == [(0, 0)]
        ap_vcpu = vm.vcpus[1]
        assert ap_vcpu.vmcb.vmsa_pa == vm.spa_of(VMSA_GPA) and not ap_vcpu.reset_hold and ap_vcpu.snp_vmsas == 1
        assert m.hv.run(vm, 1).reason == "hlt", vm.crash_reason
        assert ran == ["AP runs"]
        assert m.hv.run(vm, 0).reason == "hlt", vm.crash_reason
        assert b.answers[1] == (0, 0)
        assert ap_vcpu.reset_hold and ap_vcpu.vmcb.vmsa_pa == ap_creation.NO_VMSA
        assert m.hv.run(vm, 1).reason == "hold"
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize(("request_", "apic_id", "gpa", "rax", "error"), [
    (CREATE, 7, VMSA_GPA, FEATURES, GhcbError.INVALID_INPUT),  # no such vCPU
    (CREATE, 1, VMSA_GPA, FEATURES | 1 << 2, GhcbError.INVALID_INPUT),  # not the VM's SEV_FEATURES
    (CREATE, 1, VMSA_GPA + 8, FEATURES, GhcbError.INVALID_INPUT),  # not a page
    (CREATE, 1, 0x4000_0000, FEATURES, GhcbError.INVALID_INPUT),  # outside the guest
    (CREATE, 1, 0x20_0000, FEATURES, GhcbError.INVALID_INPUT),  # 2 MiB aligned: KVM refuses it
    (3, 1, VMSA_GPA, FEATURES, GhcbError.INVALID_INPUT),  # no such request
    (CREATE, 1, VMSA_GPA, None, GhcbError.MISSING_INPUT),  # RAX not marked valid
])
def test_kvm_refuses_a_bad_request_and_changes_nothing(m: Machine, request_: int, apic_id: int, gpa: int,
                                                       rax: int | None, error: GhcbError) -> None:
    b = Bsp()

    def bsp() -> Workload:
        yield from b.prologue()
        yield from b.ap_creation(request_, apic_id, gpa, rax)
        yield op.hlt()

    def ap() -> Workload:
        yield op.hlt()

    vm = b.vm = _machine_vm(m, bsp(), ap())
    try:
        before = vm.vcpus[1].vmcb.vmsa_pa
        assert m.hv.run(vm, 0).reason == "hlt", vm.crash_reason
        assert b.answers == [(2, int(error))]
        assert vm.vcpus[1].reset_hold and vm.vcpus[1].vmcb.vmsa_pa == before
    finally:
        m.hv.destroy(vm)


def test_create_on_init_waits_for_init(m: Machine) -> None:
    b = Bsp()

    def bsp() -> Workload:
        yield from b.prologue()
        yield from b.ap_creation(CREATE_ON_INIT, 1, VMSA_GPA)
        yield op.hlt()

    def ap() -> Workload:
        yield op.hlt()

    vm = b.vm = _machine_vm(m, bsp(), ap())
    try:
        assert m.hv.run(vm, 0).reason == "hlt", vm.crash_reason
        assert b.answers == [(0, 0)] and vm.vcpus[1].reset_hold
        assert ap_creation.deliver_init(vm, vm.vcpus[1])
        assert not vm.vcpus[1].reset_hold and vm.vcpus[1].vmcb.vmsa_pa == vm.spa_of(VMSA_GPA)
        assert not ap_creation.deliver_init(vm, vm.vcpus[1])  # nothing pending any more
        assert m.hv.run(vm, 1).reason == "hlt", vm.crash_reason
    finally:
        m.hv.destroy(vm)


def _crashed_ap(m: Machine, attack: str) -> tuple[Vm, Any]:
    b = Bsp()

    def bsp() -> Workload:
        yield from b.prologue(vmsa_bit=attack != "no rmpadjust")
        yield from b.ap_creation(CREATE, 1, VMSA_GPA)
        yield op.hlt()

    def ap() -> Workload:
        yield op.hlt()

    vm = b.vm = _machine_vm(m, bsp(), ap())
    assert m.hv.run(vm, 0).reason == "hlt", vm.crash_reason
    assert b.answers == [(0, 0)]  # KVM cannot see the RMP bit it does not check
    v = vm.vcpus[1]
    if attack == "other guest page":  # the host points the AP at another private page of the guest
        v.vmcb.vmsa_pa = vm.spa_of(OTHER_GPA)
    elif attack == "host page":  # ... or at a page of its own holding the registers it wants
        spa = m.hv.pages.alloc()
        m.hv.core.host_write(spa, _vmsa(rip=0xDEAD000))
        v.vmcb.vmsa_pa = spa
    return vm, m.hv.run(vm, 1)


@pytest.mark.parametrize("attack", ["no rmpadjust", "other guest page", "host page"])
def test_vmrun_refuses_an_ap_vmsa_the_rmp_does_not_mark(m: Machine, attack: str) -> None:
    """The hardware's answer: VMEXIT_INVALID, whatever page the VMCB names, unless the guest gave that
    page the VMSA bit; the VM stops (the AP never runs the host's registers)."""
    vm, r = _crashed_ap(m, attack)
    try:
        assert r.exit.code == ExitCode.INVALID
        assert vm.state is VmState.CRASHED
        assert "INVALID" in (vm.crash_reason or ""), vm.crash_reason
    finally:
        m.hv.destroy(vm)
