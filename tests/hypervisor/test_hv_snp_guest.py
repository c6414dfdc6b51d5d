"""An SNP guest running under the KVM model (hypervisor/psc.py, the run loop's RMP faults, VMRUN's
checks): launched with KVM_SEV_SNP_LAUNCH_*, it reads its launched memory, validates memory KVM
assigns on its first private access (#VC 0x404 until PVALIDATE), changes page states through the GHCB
MSR protocol, the GHCB PSC event and KVM_HC_MAP_GPA_RANGE -- each applied with RMPUPDATE -- and the
host's attacks on it (VMSA pointer, remapping, aliasing, replay) fail where they work on SEV-ES."""

from __future__ import annotations

from typing import Any

import pytest
from hvkit import launch_snp, snp_machine

from sevemu._util.units import MiB
from sevemu.abi.cpuid import Msr
from sevemu.abi.ghcb import GhcbMsrInfo, MsrPscReq, MsrPscResp, PscEntry, PscHeader, PscOp, SwExitCode
from sevemu.abi.rmp import RmpPageState
from sevemu.hw.faults import VmmCommunication
from sevemu.hw.mmu import VC_PAGE_NOT_VALIDATED
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor import psc
from sevemu.hypervisor.kvm_ops import KvmVmType
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine

PAGE = 0x1000
POLICY = 0x30000
LAUNCHED = 16 * PAGE  # the launched page (type NORMAL)
FRESH = 0x20000  # memory the launch did not touch
GHCB_GPA = 0x30000
KVM_HC_MAP_GPA_RANGE = 12


@pytest.fixture(scope="module")
def m() -> Machine:
    return snp_machine("hv-snp-guest")


def _guest(m: Machine, work: Workload) -> Vm:
    return launch_snp(m, PyEngine(work), [(LAUNCHED, b"launched" * 512)], name="snp-guest")


def _run(m: Machine, vm: Vm) -> Any:
    return m.hv.run(vm, max_exits=1000)


def test_the_guest_reads_launched_memory_and_validates_what_kvm_assigns(m: Machine) -> None:
    got: list[Any] = []

    def work() -> Workload:
        got.append((yield op.load(LAUNCHED, 8)))
        try:  # KVM assigns the page at this first private access; the guest has not validated it
            yield op.load(FRESH, 8)
        except VmmCommunication as vc:
            got.append(vc.error_code)
        got.append((yield op.pvalidate(FRESH, 0, True)))
        yield op.store(FRESH, 8, 0xABCD)
        got.append((yield op.load(FRESH, 8)))
        yield op.hlt()

    vm = _guest(m, work())
    try:
        r = _run(m, vm)
        assert r.reason == "hlt", vm.crash_reason
        assert got == [int.from_bytes(b"launched", "little"), VC_PAGE_NOT_VALIDATED, (0, False), 0xABCD]
        entry = m.hv.soc.rmp_entry(vm.spa_of(FRESH))
        assert entry.state == RmpPageState.GUEST_VALID and entry.asid == vm.asid and entry.gpa == FRESH
    finally:
        m.hv.destroy(vm)


def test_page_state_changes_through_the_msr_protocol(m: Machine) -> None:
    got: list[Any] = []

    def psc_msr(gpa: int, o: PscOp) -> Workload:
        yield op.wrmsr(Msr.GHCB, MsrPscReq(gfn=gpa // PAGE, op=int(o)).to_int())
        yield op.vmgexit()
        resp = MsrPscResp.from_int((yield op.rdmsr(Msr.GHCB)))
        got.append((resp.info, resp.error))

    def work() -> Workload:
        yield op.load(LAUNCHED, 8)
        got.append((yield op.pvalidate(LAUNCHED, 0, False)))  # rescind, then share
        yield from psc_msr(LAUNCHED, PscOp.SHARED)
        yield op.hlt()
        yield from psc_msr(LAUNCHED, PscOp.PRIVATE)  # back: assigned, not validated
        try:
            yield op.load(LAUNCHED, 8)
        except VmmCommunication as vc:
            got.append(vc.error_code)
        yield op.hlt()

    vm = _guest(m, work())
    try:
        assert _run(m, vm).reason == "hlt", vm.crash_reason
        assert got == [(0, False), (int(GhcbMsrInfo.PSC_RESP), 0)]
        spa = vm.spa_of(LAUNCHED)
        assert m.hv.soc.rmp_entry(spa).state == RmpPageState.HYPERVISOR
        vm.host_write(LAUNCHED, b"shared now")  # the VMM may write it: it is shared
        m.hv.core.host_write(spa, b"shared now")
        assert _run(m, vm).reason == "hlt", vm.crash_reason
        assert got[2:] == [(int(GhcbMsrInfo.PSC_RESP), 0), VC_PAGE_NOT_VALIDATED]
        assert m.hv.soc.rmp_entry(spa).state == RmpPageState.GUEST_INVALID
    finally:
        m.hv.destroy(vm)


def _psc_desc(entries: list[tuple[int, PscOp, bool]], cur: int = 0) -> bytes:
    out = PscHeader(cur_entry=cur, end_entry=len(entries) - 1).encode()
    for gpa, o, huge in entries:
        out += PscEntry(gfn=gpa // PAGE, operation=int(o), pagesize=int(huge)).to_int().to_bytes(8, "little")
    return out


def test_page_state_changes_through_the_ghcb_psc_event_and_map_gpa_range(m: Machine) -> None:
    """The guest's shared stores into its GHCB are plaintext on a shared page: the test writes them
    through the VMM's mapping, which holds the same bytes."""
    vm: Vm
    got: list[Any] = []
    scratch = GHCB_GPA + 0x800

    def ghcb_psc(entries: list[tuple[int, PscOp, bool]], cur: int = 0) -> Workload:
        from sevemu.abi.ghcb import Ghcb, valid_bitmap

        page = Ghcb(sw_exit_code=int(SwExitCode.PSC), sw_scratch=scratch, protocol_version=2,
                    valid_bitmap=valid_bitmap("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2", "sw_scratch"),
                    shared_buffer=_psc_desc(entries, cur).ljust(2032, b"\0")).encode()
        vm.host_write(GHCB_GPA, page)
        yield op.wrmsr(Msr.GHCB, GHCB_GPA)
        yield op.vmgexit()
        back = Ghcb.decode(vm.host_read(GHCB_GPA, PAGE))
        hdr = PscHeader.decode(back.shared_buffer[:8])
        got.append((back.sw_exit_info_2, hdr.cur_entry))

    def work() -> Workload:
        # the GHCB page itself: shared through the MSR protocol first, as Linux does
        yield op.wrmsr(Msr.GHCB, MsrPscReq(gfn=GHCB_GPA // PAGE, op=int(PscOp.SHARED)).to_int())
        yield op.vmgexit()
        yield from ghcb_psc([(0x40000, PscOp.PRIVATE, False), (0x41000, PscOp.PRIVATE, False)])
        for gpa in (0x40000, 0x41000):
            got.append((yield op.pvalidate(gpa, 0, True)))
        yield from ghcb_psc([(0x200000, PscOp.PRIVATE, True)])  # a 2 MiB entry: 512 pages
        yield from ghcb_psc([(0x40000, PscOp.PRIVATE, False)], cur=1)  # cur_entry > end_entry
        yield from ghcb_psc([(0x40000, PscOp.UNSMASH, False)])  # an operation the model does not do
        got.append((yield op.pvalidate(0x41000, 0, False)))
        # KVM_HC_MAP_GPA_RANGE through the GHCB's VMMCALL event: 0x41000 to shared
        from sevemu.abi.ghcb import Ghcb, valid_bitmap

        vm.host_write(GHCB_GPA, Ghcb(sw_exit_code=int(SwExitCode.VMMCALL), rax=KVM_HC_MAP_GPA_RANGE, rbx=0x41000,
                                     rcx=1, rdx=0, cpl=0, protocol_version=2, valid_bitmap=valid_bitmap(
                                         "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2", "rax", "rbx", "rcx",
                                         "rdx", "cpl")).encode())
        yield op.wrmsr(Msr.GHCB, GHCB_GPA)
        yield op.vmgexit()
        got.append(Ghcb.decode(vm.host_read(GHCB_GPA, PAGE)).rax)
        yield op.hlt()

    vm = _guest(m, work())
    try:
        assert _run(m, vm).reason == "hlt", vm.crash_reason
        assert got == [(0, 2), (0, False), (0, False), (0, 1), (psc.PSC_INVALID_HDR, 1),
                       (psc.PSC_INVALID_ENTRY, 0), (0, False), 0]
        entry = m.hv.soc.rmp_entry
        assert entry(vm.spa_of(0x40000)).state == RmpPageState.GUEST_VALID
        assert entry(vm.spa_of(0x41000)).state == RmpPageState.HYPERVISOR and 0x41000 in vm.shared_gpas
        assert all(entry(vm.spa_of(0x200000 + i * PAGE)).state == RmpPageState.GUEST_INVALID for i in range(0, 512, 51))
        assert entry(vm.spa_of(GHCB_GPA)).state == RmpPageState.HYPERVISOR
    finally:
        m.hv.destroy(vm)


def test_an_sev_es_guest_asking_for_a_page_state_change_is_refused(m: Machine) -> None:
    got: list[Any] = []

    def work() -> Workload:
        yield op.wrmsr(Msr.GHCB, MsrPscReq(gfn=0x40, op=int(PscOp.SHARED)).to_int())
        yield op.vmgexit()
        got.append(MsrPscResp.from_int((yield op.rdmsr(Msr.GHCB))).error)
        yield op.hlt()

    vm = m.hv.create_vm("es", 16 * MiB, vm_type=KvmVmType.SEV_ES_VM)
    m.hv.sev_init(vm)
    gen = work()
    vm.add_vcpu(PyEngine(gen))
    try:
        m.hv.launch(vm, [], policy=0x4, programs=[gen])  # the program table is the launched page
        assert _run(m, vm).reason == "hlt", vm.crash_reason
        assert got and got[0] != 0
    finally:
        m.hv.destroy(vm)


def test_the_hypervisor_reports_snp_in_its_ghcb_features(m: Machine) -> None:
    from sevemu.abi.ghcb import HvFeature

    assert m.hv.ghcb.hv_features & HvFeature.SNP


def test_a_psc_header_with_a_nonzero_reserved_dword_is_processed_as_kvm_does(m: Machine) -> None:
    """KVM reads only cur_entry/end_entry; edk2 2025.02's SEC leaves stale bytes in the reserved dword
    (seen: b"syst").  The request is applied and the reserved bytes are left as the guest wrote them."""
    vm: Vm
    got: list[Any] = []

    def work() -> Workload:
        from sevemu.abi.ghcb import Ghcb, valid_bitmap

        yield op.wrmsr(Msr.GHCB, MsrPscReq(gfn=GHCB_GPA // PAGE, op=int(PscOp.SHARED)).to_int())
        yield op.vmgexit()
        desc = bytearray(_psc_desc([(0x50000, PscOp.PRIVATE, False)]))
        desc[4:8] = b"syst"
        vm.host_write(GHCB_GPA, Ghcb(sw_exit_code=int(SwExitCode.PSC), sw_scratch=GHCB_GPA + 0x800,
                                     protocol_version=2, valid_bitmap=valid_bitmap(
                                         "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2", "sw_scratch"),
                                     shared_buffer=bytes(desc).ljust(2032, b"\0")).encode())
        yield op.wrmsr(Msr.GHCB, GHCB_GPA)
        yield op.vmgexit()
        back = Ghcb.decode(vm.host_read(GHCB_GPA, PAGE))
        got.append((back.sw_exit_info_2, back.shared_buffer[0:8]))
        got.append((yield op.pvalidate(0x50000, 0, True)))
        yield op.hlt()

    vm = _guest(m, work())
    try:
        assert _run(m, vm).reason == "hlt", vm.crash_reason
        assert got == [(0, b"\x01\x00\x00\x00syst"), (0, False)]
        assert m.hv.soc.rmp_entry(vm.spa_of(0x50000)).state == RmpPageState.GUEST_VALID
    finally:
        m.hv.destroy(vm)
