"""The VMCB as a page of host memory (hw/svm.py): its bytes as Linux ``struct vmcb`` lays them out
(control area at 0, save area at 0x400), the bytes in memory as what VMRUN runs and #VMEXIT leaves,
and VMRUN's RMP checks of the VMCB and VMSA pages with SEV-SNP enabled (APM2 Table 15-41): the host's
attacks use host interfaces only (host stores, RMPUPDATE, the VMCB's pointers)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hwkit import VMCB_SPA, PageTables, make_soc
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hw_snp_vcpu import ASID, DATA, Guest

from sevemu.abi.paging import ExitCode
from sevemu.abi.pycode import CODE_GPA
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.hw.faults import GeneralProtection
from sevemu.hw.pyengine import Workload, op
from sevemu.hw.svm import Segment, Vmcb, decode_vmcb, encode_vmcb

PAGE = 0x1000
u64 = st.integers(0, (1 << 64) - 1)


def _q(page: bytes | bytearray, off: int) -> int:
    return int(struct.unpack_from("<Q", page, off)[0])


# ---- the bytes ----------------------------------------------------------------------------------------
def test_fields_sit_where_linux_struct_vmcb_has_them() -> None:
    v = Vmcb(asid=0x1234, np_enable=True, sev_enable=True, sev_es_enable=True, ncr3=0xA000, tlb_control=3,
             exit_code=-1, exit_info1=0x11, exit_info2=0x22, next_rip=0x33, ghcb_gpa=0x44, vmsa_pa=0x55000,
             cr0=0x8000_0011, cr3=0x6000, cr4=0x20, efer=0x500, rip=0xFFF0, rflags=0x202, sev_features=1)
    v.regs["rax"], v.regs["rsp"], v.regs["rbx"] = 0xAA, 0xBB, 0xCC
    v.segments["cs"] = Segment(0xF000, 0x9B, 0xFFFF, 0xFFFF_0000)
    v.msrs[0xC000_0082] = 0x1234_5678  # LSTAR
    page = encode_vmcb(v)
    assert len(page) == PAGE
    assert struct.unpack_from("<I", page, 0x58)[0] == 0x1234 and page[0x5C] == 3  # ASID, TLB_CTL
    assert _q(page, 0x70) == (1 << 64) - 1 and _q(page, 0x78) == 0x11 and _q(page, 0x80) == 0x22
    assert _q(page, 0x90) == 0b111  # NP, SEV, SEV-ES enables
    assert _q(page, 0xA0) == 0x44 and _q(page, 0xB0) == 0xA000 and _q(page, 0xC8) == 0x33
    assert _q(page, 0x108) == 0x55000 and _q(page, 0x140) == 1
    assert struct.unpack_from("<HHIQ", page, 0x410) == (0xF000, 0x9B, 0xFFFF, 0xFFFF_0000)  # CS
    assert _q(page, 0x4D0) == 0x500 and _q(page, 0x548) == 0x20 and _q(page, 0x550) == 0x6000
    assert _q(page, 0x558) == 0x8000_0011 and _q(page, 0x570) == 0x202 and _q(page, 0x578) == 0xFFF0
    assert _q(page, 0x5D8) == 0xBB and _q(page, 0x5F8) == 0xAA and _q(page, 0x608) == 0x1234_5678
    assert 0xCC.to_bytes(8, "little") not in page  # RBX is not in the VMCB (KVM keeps it)


@settings(max_examples=60, deadline=None)
@given(asid=st.integers(0, (1 << 32) - 1), rip=u64, rax=u64, rsp=u64, cr3=u64, info1=u64,
       code=st.integers(-4, 0x403), flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       seg=st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                                          st.integers(0, (1 << 32) - 1), u64)))
def test_decode_is_the_inverse_of_encode(asid: int, rip: int, rax: int, rsp: int, cr3: int, info1: int, code: int,
                                         flags: tuple[bool, bool, bool], seg: Any) -> None:
    v = Vmcb(asid=asid, rip=rip, cr3=cr3, exit_info1=info1, exit_code=code, np_enable=flags[0],
             sev_enable=flags[1], sev_es_enable=flags[2])
    v.regs["rax"], v.regs["rsp"] = rax, rsp
    if seg is not None and any(seg):
        v.segments["ds"] = Segment(*seg)
    w = Vmcb(cr0=0, rflags=0)
    w.segments["es"] = Segment(1, 2, 3, 4)  # not in the page: decoding drops it
    decode_vmcb(encode_vmcb(v), w)
    assert encode_vmcb(w) == encode_vmcb(v)
    assert (w.asid, w.rip, w.regs["rax"], w.regs["rsp"], w.exit_code) == (asid, rip, rax, rsp, code)
    assert w.segments == v.segments


# ---- memory is what VMRUN runs ------------------------------------------------------------------------
def _plain() -> tuple[Any, PageTables, Vmcb]:
    soc = make_soc()
    pt = PageTables(soc, 1, False)
    pt.identity()
    return soc, pt, pt.vmcb(paging=False)


def _hlt() -> Workload:
    yield op.hlt()


def test_vmrun_runs_the_bytes_in_memory_and_vmexit_leaves_them_there() -> None:
    soc, pt, vmcb = _plain()
    host = soc.host_view().boot_cpu
    assert vmcb.pa == VMCB_SPA + PAGE
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_hlt())).code == ExitCode.HLT
    assert soc.vmcbs.decodes == 0  # nobody wrote the page: the view was current
    page = host.host_read(vmcb.pa, PAGE)  # #VMEXIT's state, in memory
    assert _q(page, 0x70) == ExitCode.HLT and _q(page, 0x578) == vmcb.rip
    # the host stores a new RAX into the page itself; VMRUN runs it
    host.host_write(vmcb.pa + 0x400 + 0x1F8, (0x5A5A).to_bytes(8, "little"))
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_hlt())).code == ExitCode.HLT
    assert soc.vmcbs.decodes == 1 and vmcb.regs["rax"] == 0x5A5A
    # an ASID the host wrote into the page is what VMRUN checks
    host.host_write(vmcb.pa + 0x58, (0).to_bytes(4, "little"))
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_hlt())).code == ExitCode.INVALID
    assert "ASID 0" in soc.boot_cpu.vmrun_failure
    assert _q(host.host_read(vmcb.pa, PAGE), 0x70) == (1 << 64) - 1  # VMEXIT_INVALID, in memory


# ---- SNP: the VMCB page must be the hypervisor's --------------------------------------------------------
def test_vmrun_refuses_a_vmcb_in_a_guest_private_page() -> None:
    g = Guest()
    cpu, host = g.soc.boot_cpu, g.host.boot_cpu
    assert g.run([op.hlt()]).code == ExitCode.HLT  # positive: a hypervisor page
    runs = cpu.vmruns
    exit_before = host.host_read(g.vmcb.pa + 0x70, 8)
    # the host's attack: hand the guest the VMCB page (assigned to its ASID, validated as if launched)
    g.port.set(g.vmcb.pa, assigned=True, immutable=False, asid=ASID, gpa=DATA, validated=True)
    ran: list[int] = []

    def work() -> Workload:
        ran.append(1)
        yield op.hlt()

    with pytest.raises(GeneralProtection, match="VMCB page"):
        g.run(work())
    assert ran == [] and cpu.vmruns == runs + 1
    # a Firmware page (assigned, immutable, ASID 0) is refused the same way
    g.port.set(g.vmcb.pa, assigned=True, immutable=True)
    with pytest.raises(GeneralProtection, match="FIRMWARE"):
        g.run(work())
    assert ran == []
    # given back to the hypervisor, the same VMCB runs again, nothing changed by the refusals
    g.port.set(g.vmcb.pa, assigned=False, immutable=False)
    assert host.host_read(g.vmcb.pa + 0x70, 8) == exit_before
    assert g.run(work()).code == ExitCode.HLT and ran == [1]


def test_snp_vmrun_needs_a_vmcb_page() -> None:
    g = Guest()
    g.vmcb.pa = 0  # a VMCB that is not in memory
    with pytest.raises(GeneralProtection, match="not a page"):
        g.run([op.hlt()])


def test_the_vmcb_page_is_in_use_while_the_guest_runs() -> None:
    g = Guest()
    pa = g.vmcb.pa
    seen: list[int] = []

    def work() -> Workload:
        seen.append(g.host.boot_cpu.rmpupdate_state(pa, RmpUpdateState(gpa=0, assigned=1, asid=ASID)))
        yield op.hlt()

    assert g.run(work()).code == ExitCode.HLT
    assert seen == [RmpResult.FAIL_INUSE]
    assert g.rmp.entry(pa).assigned is False  # RMPUPDATE changed nothing
    assert g.host.boot_cpu.rmpupdate_state(pa, RmpUpdateState()) == RmpResult.SUCCESS  # free after #VMEXIT


# ---- SNP: the VMSA page ---------------------------------------------------------------------------------
def test_vmrun_refuses_a_vmsa_page_another_vmrun_uses() -> None:
    g = Guest()
    vmsa = g.vmcb.vmsa_pa
    g.rmp.mark_in_use([vmsa])  # another core is running a vCPU on this VMSA
    assert g.run([op.hlt()]).code == ExitCode.INVALID
    assert "in use" in g.soc.boot_cpu.vmsa_failure
    g.rmp.release([vmsa])
    assert g.run([op.hlt()]).code == ExitCode.HLT


def test_vmrun_refuses_a_vmsa_page_of_another_asid_or_without_the_vmsa_bit() -> None:
    g = Guest()
    vmsa = g.vmcb.vmsa_pa
    entry = g.rmp.entry(vmsa)
    g.port.update(vmsa, entry, vmsa=False)
    assert g.run([op.hlt()]).code == ExitCode.INVALID and "VMSA=0" in g.soc.boot_cpu.vmsa_failure
    g.port.update(vmsa, entry, asid=ASID + 1)
    assert g.run([op.hlt()]).code == ExitCode.INVALID and "not assigned to ASID" in g.soc.boot_cpu.vmsa_failure
    g.port.update(vmsa, entry)
    assert g.run([op.hlt()]).code == ExitCode.HLT


def test_an_sev_es_guests_vmsa_must_be_the_hypervisors_page_under_snp() -> None:
    """Not SNP-active (SEV_FEATURES bit 0 clear): its VMSA page must be Hypervisor-owned (Table 15-41)."""
    from hwkit import es_vmsa

    g = Guest()
    g.vmcb.sev_features = 0
    es_vmsa(g.soc, g.vmcb)
    g.port.set(g.vmcb.vmsa_pa, assigned=False, immutable=False)  # the hypervisor's page: runs
    assert g.run([op.hlt()]).code == ExitCode.HLT
    g.port.set(g.vmcb.vmsa_pa, assigned=True, immutable=False, asid=ASID, gpa=CODE_GPA, validated=True)
    assert g.run([op.hlt()]).code == ExitCode.INVALID
    assert "not SNP-active" in g.soc.boot_cpu.vmsa_failure
