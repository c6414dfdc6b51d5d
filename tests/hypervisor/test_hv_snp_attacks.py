"""What SEV-SNP blocks, shown against the same attacks on an SEV-ES guest (host interfaces only: the
NPT, RMPUPDATE, the kernel's writes to physical memory, the VMCB's VMSA pointer).

Each attack runs twice: on an SNP guest the RMP check or validation stops it and the guest (or KVM,
which cannot make the access succeed) sees it -- #VC PAGE_NOT_VALIDATED, an RMP #NPF KVM cannot
resolve, VMEXIT_INVALID, #PF(RMP) in the host; on an SEV-ES guest the same steps succeed silently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hvkit import launch_snp, snp_machine

from sevemu._util.units import MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.rmp import RmpUpdateState
from sevemu.abi.snp import SnpAddrCmd
from sevemu.abi.status import Status
from sevemu.hw.faults import VmmCommunication
from sevemu.hw.mmu import VC_PAGE_NOT_VALIDATED
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hw.rmp import HostRmpFault
from sevemu.hw.svm import TlbControl
from sevemu.hypervisor.errors import IoctlError
from sevemu.hypervisor.kvm_ops import KvmVmType
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine

PAGE = 0x1000
A = 0x40000
B = 0x41000
V1 = 0x1111_1111
V2 = 0x2222_2222


@pytest.fixture(scope="module")
def m() -> Machine:
    return snp_machine("hv-snp-attacks")


def _guest(m: Machine, snp: bool, work: Callable[[bool], Workload]) -> Vm:
    if snp:
        vm = launch_snp(m, PyEngine(work(True)))
    else:
        vm = m.hv.create_vm("es", 16 * MiB, vm_type=KvmVmType.SEV_ES_VM)
        m.hv.sev_init(vm)
        gen = work(False)
        vm.add_vcpu(PyEngine(gen))
        m.hv.launch(vm, [], policy=0x4, programs=[gen])  # the program table is the launched page
    return vm


def _writer_then_reader(got: list[Any], at: int = A) -> Callable[[bool], Workload]:
    """Stage 1: (SNP: validate A and B, KVM assigning them on the way) write V1 at A and V2 at B,
    HLT.  Stage 2: read ``at``, HLT."""
    def work(snp: bool) -> Workload:
        if snp:
            for gpa in (A, B):
                yield op.pvalidate(gpa, 0, True)
        yield op.store(A, 8, V1)
        yield op.store(B, 8, V2)
        yield op.hlt()
        try:
            got.append((yield op.load(at, 8)))
        except VmmCommunication as vc:
            got.append(f"#VC {vc.error_code:#x}")
        yield op.hlt()
    return work


def _stage(m: Machine, vm: Vm) -> str:
    r = m.hv.run(vm, max_exits=1000)
    return r.reason


def _remap(m: Machine, vm: Vm, gpa: int, spa: int) -> None:
    """The host edits the NPT and flushes the guest's TLB, as it may."""
    vm.npt.map(gpa, spa)
    vm.vcpus[0].vmcb.tlb_control = TlbControl.FLUSH_ASID


@pytest.mark.parametrize("snp", [True, False], ids=["snp", "sev-es"])
def test_remapping_a_private_page_to_another_gpa(m: Machine, snp: bool) -> None:
    got: list[Any] = []
    vm = _guest(m, snp, _writer_then_reader(got))
    try:
        assert _stage(m, vm) == "hlt", vm.crash_reason
        spa_a, spa_b = vm.spa_of(A), vm.spa_of(B)
        _remap(m, vm, A, spa_b)  # swap the two pages
        _remap(m, vm, B, spa_a)
        reason = _stage(m, vm)
        if snp:  # B's page is the guest's at GPA B only: the RMP refuses it at A, KVM cannot fix that
            assert got == [] and "cannot resolve" in reason and f"GPA {B:#x}" in reason
        else:  # the guest reads B's value at A and never knows
            assert reason == "hlt" and got == [V2]
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize("snp", [True, False], ids=["snp", "sev-es"])
def test_aliasing_two_gpas_to_one_page(m: Machine, snp: bool) -> None:
    got: list[Any] = []
    vm = _guest(m, snp, _writer_then_reader(got, at=B))
    try:
        assert _stage(m, vm) == "hlt", vm.crash_reason
        _remap(m, vm, B, vm.spa_of(A))  # B now shows A's page
        reason = _stage(m, vm)
        if snp:
            assert got == [] and "cannot resolve" in reason
        else:
            assert reason == "hlt" and got == [V1]
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize("snp", [True, False], ids=["snp", "sev-es"])
def test_replaying_an_old_page(m: Machine, snp: bool) -> None:
    got: list[Any] = []
    old_value: list[int] = []

    def work(is_snp: bool) -> Workload:
        if is_snp:
            yield op.pvalidate(A, 0, True)
        yield op.store(A, 8, V1)
        yield op.hlt()
        yield op.store(A, 8, V2)
        yield op.hlt()
        try:
            got.append((yield op.load(A, 8)))
        except VmmCommunication as vc:
            got.append(f"#VC {vc.error_code:#x}")
        yield op.hlt()

    vm = _guest(m, snp, work)
    core = m.hv.core
    try:
        assert _stage(m, vm) == "hlt", vm.crash_reason
        spa = vm.spa_of(A)
        core.wbinvd()
        old = core.host_read(spa, PAGE)  # the ciphertext of V1
        old_value.append(V1)
        assert _stage(m, vm) == "hlt", vm.crash_reason
        core.wbinvd()
        if snp:
            with pytest.raises(HostRmpFault):  # the kernel's write to a guest page: #PF(RMP)
                core.host_write(spa, old)
            # the stronger host: take the page back, write the old ciphertext, give it back
            assert core.rmpupdate_state(spa, RmpUpdateState()) == 0
            core.host_write(spa, old)
            core.clflush_range(spa, PAGE)
            assert core.rmpupdate_state(spa, RmpUpdateState(gpa=A, assigned=1, asid=vm.asid)) == 0
            assert _stage(m, vm) == "hlt", vm.crash_reason
            assert got == [f"#VC {VC_PAGE_NOT_VALIDATED:#x}"]  # the guest never validated this page
        else:
            core.host_write(spa, old)
            core.clflush_range(spa, PAGE)
            assert _stage(m, vm) == "hlt", vm.crash_reason
            assert got == old_value  # V1 is back, the guest's V2 is gone
    finally:
        m.hv.destroy(vm)


def test_pointing_the_vmcb_at_a_guest_page_that_is_not_its_vmsa(m: Machine) -> None:
    got: list[Any] = []
    vm = _guest(m, True, _writer_then_reader(got))
    try:
        assert _stage(m, vm) == "hlt", vm.crash_reason
        vm.vcpus[0].vmcb.vmsa_pa = vm.spa_of(A)  # a validated private page of the guest, no VMSA bit
        assert "VMEXIT_INVALID" in _stage(m, vm)  # the hardware refuses the page (the reason is not shown)
        assert got == []
    finally:
        m.hv.destroy(vm)


def _reader(got: list[Any]) -> Callable[[bool], Workload]:
    """A new guest that reads GPA A, which it never wrote."""
    def work(snp: bool) -> Workload:
        try:
            got.append((yield op.load(A, 8)))
        except VmmCommunication as vc:
            got.append(f"#VC {vc.error_code:#x}")
        yield op.hlt()
    return work


def test_reusing_an_asid_whose_pages_the_host_did_not_reclaim() -> None:
    """The host tears a guest down without reclaiming its pages (they stay assigned to its ASID,
    validated), then starts a new guest on the same ASID, hoping to hand it the old, validated pages.
    The firmware refuses SNP_ACTIVATE (INVALID_CONFIG: the RMP still has pages of the ASID); once the
    pages are reclaimed, the old page mapped into the new guest is not validated: #VC 0x404."""
    m = snp_machine("hv-snp-asid-reuse")  # a machine of its own: the ASID bookkeeping is the attacker's
    hv, core = m.hv, m.hv.core
    got: list[Any] = []
    a = _guest(m, True, _writer_then_reader(got))
    assert _stage(m, a) == "hlt", a.crash_reason
    asid, spa = a.asid, a.spa_of(A)
    # the teardown without the reclaim: DECOMMISSION through the mailbox, then WBINVD + SNP_DF_FLUSH
    core.wbinvd()
    hv.sev.issue(CommandId.SNP_DECOMMISSION, SnpAddrCmd(address=a.snp_context))
    hv.sev.flush_asids()
    assert hv.soc.rmp_entry(spa).asid == asid and hv.soc.rmp_entry(spa).validated
    with pytest.raises(IoctlError) as refused:
        launch_snp(m, PyEngine(_reader(got)(True)), name="b", asid=asid)
    assert refused.value.error == Status.INVALID_CONFIG  # SNP_ACTIVATE: the ASID still owns pages
    assert hv.soc.rmp_entry(spa).validated  # nothing changed
    # the host reclaims every page of the old guest (RMPUPDATE to shared), and tries again
    for page in sorted(a.private_spas | set(a.vmsa_pages.values())):
        assert core.rmpupdate_state(page, RmpUpdateState()) == 0
    b = launch_snp(m, PyEngine(_reader(got)(True)), name="b", asid=asid)
    _remap(m, b, A, spa)  # the old guest's page, at the same GPA, on the same ASID
    assert _stage(m, b) == "hlt", b.crash_reason
    assert got == [f"#VC {VC_PAGE_NOT_VALIDATED:#x}"]  # the new guest never validated it: it knows


def test_contrast_reusing_an_asid_on_sev_es_hands_the_new_guest_an_old_page() -> None:
    m = snp_machine("hv-es-asid-reuse")
    hv = m.hv
    got: list[Any] = []
    a = _guest(m, False, _writer_then_reader(got))
    assert _stage(m, a) == "hlt", a.crash_reason
    asid, spa = a.asid, a.spa_of(A)
    hv.sev.decommission(a)  # DEACTIVATE, DECOMMISSION; the pages stay where they are
    hv.sev.flush_asids()
    b = hv.create_vm("b", 16 * MiB, vm_type=KvmVmType.SEV_ES_VM)
    b.asid = asid  # the host picks the ASID
    hv.sev_init(b)
    gen = _reader(got)(False)
    b.add_vcpu(PyEngine(gen))
    hv.launch(b, [], policy=0x4, programs=[gen])
    _remap(m, b, A, spa)
    assert _stage(m, b) == "hlt", b.crash_reason
    assert len(got) == 1 and isinstance(got[0], int)  # read without a fault: nothing tells the guest
