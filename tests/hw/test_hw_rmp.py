"""The Reverse Map Table in the SoC (hw/rmp.py): where it lives, SYSCFG.SNP_EN, RMPUPDATE and PSMASH
with their register conventions and return codes, PVALIDATE / RMPADJUST through the GuestRmp
protocol and the real PyEngine, the guest-access checks the vCPU path calls, and the host's attacks
(writes and DMA into guest and firmware pages, writes into the table itself)."""

from __future__ import annotations

from typing import Any

import pytest
from hwkit import GUEST_SPA, PageTables, es_vmsa, make_soc, mem_accel
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.paging import ExitCode, NpfExitInfo1
from sevemu.abi.rmp import RmpPageState, RmpResult, RmpUpdateState, rmp_covered_bytes
from sevemu.errors import AddressError, HardwareError
from sevemu.hw import memaccel
from sevemu.hw.faults import GeneralProtection, NestedPageFault
from sevemu.hw.host import HostSoc
from sevemu.hw.profiles import MILAN, ROME
from sevemu.hw.pyengine import Workload, op
from sevemu.hw.rmp import PF_RMP, DmaFault, HostRmpFault, Rmp, RmpFirmwarePort
from sevemu.hw.soc import Soc
from sevemu.hw.svm import Vmcb

MiB = 1 << 20
ASID = 5
PAGE = 0x1000
SNP_EN = int(SysCfg.SNP_EN)


def _snp(soc: Soc | None = None) -> tuple[Soc, HostSoc, Rmp, RmpFirmwarePort]:
    soc = soc or make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)
    assert soc.rmp is not None
    port = RmpFirmwarePort(soc.rmp)
    port.initialize()
    return soc, host, soc.rmp, port


def _private(host: HostSoc, spa: int, gpa: int, asid: int = ASID, *, immutable: bool = False,
             huge: bool = False) -> int:
    return host.boot_cpu.rmpupdate_state(spa, RmpUpdateState(gpa=gpa, assigned=1, pagesize=int(huge),
                                                             immutable=int(immutable), asid=asid))


def _vmsa_page(soc: Soc, vmcb: Vmcb, asid: int = ASID) -> None:
    """Make ``vmcb``'s VMSA page what SNP_LAUNCH_UPDATE leaves: assigned, validated, VMSA."""
    assert soc.rmp is not None
    RmpFirmwarePort(soc.rmp).set(vmcb.vmsa_pa, assigned=True, immutable=False, asid=asid,
                                 gpa=0xFFFF_F000, validated=True, vmsa=True)


def _shared(host: HostSoc, spa: int, huge: bool = False) -> int:
    return host.boot_cpu.rmpupdate_state(spa, RmpUpdateState(pagesize=int(huge)))


# ---- where the table lives, SNP_EN ---------------------------------------------------------------
def test_the_bios_names_a_region_at_the_top_of_dram_that_covers_all_of_it() -> None:
    soc = make_soc()
    host = soc.host_view()
    base, end = host.rdmsr(Msr.RMP_BASE), host.rdmsr(Msr.RMP_END)
    assert base % MiB == 0 and (end + 1) % MiB == 0 and end == soc.dram.size - 1
    assert rmp_covered_bytes(base, end) >= soc.dram.size
    assert host.rdmsr(Msr.SYSCFG) & SNP_EN == 0
    assert make_soc(ROME).rmp is None  # no SNP on Zen 2


def test_snp_en_is_set_once_and_locks_the_region() -> None:
    soc = make_soc()
    host = soc.host_view()
    syscfg = host.rdmsr(Msr.SYSCFG)
    with pytest.raises(GeneralProtection):
        host.wrmsr(Msr.SYSCFG, syscfg & ~int(SysCfg.MEM_ENCRYPTION_MOD_EN))  # only SNP_EN may change
    with pytest.raises(GeneralProtection):
        host.wrmsr(Msr.RMP_BASE, soc.rmp.base + 0x1000 if soc.rmp else 0)  # not 8 KiB aligned
    host.wrmsr(Msr.SYSCFG, syscfg | SNP_EN)
    assert host.rdmsr(Msr.SYSCFG) & SNP_EN and all(c.rmp is soc.rmp for c in soc.cores)
    host.wrmsr(Msr.SYSCFG, syscfg)  # ignored once SNP_EN is set
    assert host.rdmsr(Msr.SYSCFG) & SNP_EN
    with pytest.raises(GeneralProtection):
        host.wrmsr(Msr.RMP_BASE, 0)
    rome = make_soc(ROME).host_view()
    with pytest.raises(GeneralProtection):
        rome.wrmsr(Msr.SYSCFG, rome.rdmsr(Msr.SYSCFG) | SNP_EN)


def test_snp_en_needs_a_valid_region() -> None:
    soc = make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.RMP_END, soc.rmp.base + 0x1FFF if soc.rmp else 0)  # 8 KiB: too small, not 1 MiB
    with pytest.raises(GeneralProtection):
        host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)


def test_without_snp_en_the_rmp_instructions_are_undefined_and_writes_unchecked() -> None:
    soc = make_soc()
    host = soc.host_view()
    with pytest.raises(HardwareError):
        _private(host, 0x200000, 0)
    with pytest.raises(HardwareError):
        host.boot_cpu.psmash(0x200000)
    host.boot_cpu.host_write(soc.rmp.base if soc.rmp else 0, b"\x01" * 16)  # software may write the table


def test_the_firmware_sees_whether_software_zeroed_the_table() -> None:
    soc = make_soc()
    assert soc.rmp is not None
    port = RmpFirmwarePort(soc.rmp)
    assert port.zeroed()
    soc.host_view().boot_cpu.host_write(soc.rmp.base + 0x4000 + 0x10 * 3, b"\x01")
    assert not port.zeroed()


# ---- the table protects itself after SNP_INIT ------------------------------------------------------
def test_after_init_the_table_is_firmware_memory_the_host_cannot_write() -> None:
    _soc, host, rmp, _ = _snp()
    assert rmp.state(rmp.base) == RmpPageState.FIRMWARE
    assert rmp.state(rmp.end & ~0xFFF) == RmpPageState.FIRMWARE
    entry_spa = rmp.base + 0x4000 + (0x300000 >> 12) * 16
    before = host.boot_cpu.host_read(entry_spa, 16)
    with pytest.raises(HostRmpFault) as exc:
        host.boot_cpu.host_write(entry_spa, bytes(16))  # the attack: forge an entry
    assert exc.value.error_code & PF_RMP and exc.value.state == RmpPageState.FIRMWARE
    with pytest.raises(HostRmpFault):
        host.boot_cpu.host_write_stream(entry_spa & ~0xFFF, bytes(PAGE))
    with pytest.raises(DmaFault):
        host.device_dma_write(entry_spa, bytes(16))
    assert host.boot_cpu.host_read(entry_spa, 16) == before  # readable, unchanged
    assert _shared(host, rmp.base) == RmpResult.FAIL_PERMISSION  # immutable to RMPUPDATE too


def test_initialisation_clears_what_software_left_in_the_table() -> None:
    soc = make_soc()
    assert soc.rmp is not None
    host = soc.host_view()
    forged = (1 | 5 << 51).to_bytes(8, "little") + bytes(8)  # "page 0x300000 belongs to ASID 5"
    host.boot_cpu.host_write(soc.rmp.base + 0x4000 + (0x300000 >> 12) * 16, forged)
    _snp(soc)
    assert soc.rmp.state(0x300000) == RmpPageState.HYPERVISOR


# ---- RMPUPDATE ---------------------------------------------------------------------------------------
def test_rmpupdate_register_convention_reads_the_state_from_host_memory() -> None:
    _soc, host, _rmp, _ = _snp()
    state_va = 0x10000
    host.boot_cpu.host_write(state_va, RmpUpdateState(gpa=0x7000, assigned=1, asid=ASID).encode())
    assert host.boot_cpu.rmpupdate(0x300000, state_va) == RmpResult.SUCCESS
    e = host.rmp_entry(0x300000)
    assert (e.assigned, e.asid, e.gpa, e.page_size, e.immutable, e.validated) == (True, ASID, 0x7000, 0, False, False)
    assert e.perms == (0x1F, 0, 0, 0)  # VMPL0 everything, the others nothing
    assert e.state == RmpPageState.GUEST_INVALID


@pytest.mark.parametrize("spa,state", [
    (0x300010, RmpUpdateState(assigned=1, asid=ASID)),  # not page aligned
    (0x301000, RmpUpdateState(assigned=1, asid=ASID, pagesize=1)),  # 2 MiB, not 2 MiB aligned
    (0x300000, RmpUpdateState(assigned=1, asid=MILAN.max_asid + 1)),  # no such ASID
    (0x300000, RmpUpdateState(assigned=0, asid=ASID)),  # shared with an ASID
    (0x300000, RmpUpdateState(assigned=1, asid=ASID, gpa=0x123)),  # GPA not aligned
    (0x300000, RmpUpdateState(assigned=2, asid=ASID)),
    (64 * MiB, RmpUpdateState(assigned=1, asid=ASID)),  # beyond the memory the RMP covers
])
def test_rmpupdate_fail_input_changes_nothing(spa: int, state: RmpUpdateState) -> None:
    _, host, rmp, _ = _snp()
    before = rmp.raw_entry(0x300000)
    assert host.boot_cpu.rmpupdate_state(spa, state) == RmpResult.FAIL_INPUT
    assert rmp.raw_entry(0x300000) == before


def test_rmpupdate_immutable_and_in_use_pages() -> None:
    _, host, rmp, port = _snp()
    assert _private(host, 0x300000, 0x1000, immutable=True) == RmpResult.SUCCESS
    assert rmp.state(0x300000) == RmpPageState.PRE_GUEST
    assert _shared(host, 0x300000) == RmpResult.FAIL_PERMISSION  # only the firmware can reclaim it
    port.update(0x300000, port.entry(0x300000), immutable=False, asid=0, gpa=0)  # SNP_PAGE_RECLAIM
    assert rmp.state(0x300000) == RmpPageState.RECLAIM
    assert _shared(host, 0x300000) == RmpResult.SUCCESS
    rmp.mark_in_use([0x301000])  # VMRUN uses it as a VMSA
    assert _private(host, 0x301000, 0x2000) == RmpResult.FAIL_INUSE
    assert host.boot_cpu.psmash(0x200000) == RmpResult.FAIL_INPUT  # not a 2 MiB entry
    rmp.release([0x301000])
    assert _private(host, 0x301000, 0x2000) == RmpResult.SUCCESS


def test_2m_pages_overlap_psmash_and_page_sizes() -> None:
    _, host, rmp, _ = _snp()
    assert _private(host, 0x400000, 0x200000, huge=True) == RmpResult.SUCCESS
    assert rmp.entry(0x4FF000).page_size == 1 and rmp.state(0x4FF000) == RmpPageState.GUEST_INVALID
    assert _private(host, 0x401000, 0x201000) == RmpResult.FAIL_OVERLAP  # 4 KiB inside: PSMASH first
    assert _shared(host, 0x402000) == RmpResult.FAIL_OVERLAP
    rmp.pvalidate(ASID, 0x200000, 0x400000, True, True)
    assert host.boot_cpu.psmash(0x401000) == RmpResult.FAIL_INPUT
    rmp.mark_in_use([0x410000])
    assert host.boot_cpu.psmash(0x400000) == RmpResult.FAIL_INUSE
    rmp.release([0x410000])
    assert host.boot_cpu.psmash(0x400000) == RmpResult.SUCCESS
    for i in (0, 1, 511):
        e = rmp.raw_entry(0x400000 + i * PAGE)
        assert (e.page_size, e.gpa, e.asid, e.validated, e.assigned) == (0, 0x200000 + i * PAGE, ASID, True, True)
    assert _shared(host, 0x401000) == RmpResult.SUCCESS  # now 4 KiB pages
    assert _private(host, 0x601000, 0x401000) == RmpResult.SUCCESS
    assert _private(host, 0x600000, 0x400000, huge=True) == RmpResult.FAIL_OVERLAP  # over an assigned 4 KiB
    assert _shared(host, 0x800000, huge=True) == RmpResult.SUCCESS  # a shared 2 MiB page


# ---- the host's attacks ------------------------------------------------------------------------------
def test_host_write_to_a_guest_page_faults_and_changes_nothing() -> None:
    _soc, host, _rmp, _ = _snp()
    host.boot_cpu.host_write(0x300000, b"before")
    assert _private(host, 0x300000, 0x1000) == RmpResult.SUCCESS
    for attack in (lambda: host.boot_cpu.host_write(0x300800, b"evil"),
                   lambda: host.boot_cpu.host_write(0x2FFFF0, bytes(0x20)),  # straddles into it
                   lambda: host.boot_cpu.host_write_stream(0x300000, bytes(PAGE))):
        with pytest.raises(HostRmpFault) as exc:
            attack()
        assert exc.value.error_code == PF_RMP | 3 and exc.value.state == RmpPageState.GUEST_INVALID
    with pytest.raises(DmaFault):
        host.device_dma_write(0x300000, b"evil")
    assert host.boot_cpu.host_read(0x300000, 6) == b"before"  # reads are not checked
    assert host.boot_cpu.host_read(0x2FFFF0, 0x10) == bytes(0x10)  # the straddling write wrote nothing
    assert _shared(host, 0x300000) == RmpResult.SUCCESS
    host.boot_cpu.host_write(0x300800, b"mine")
    host.device_dma_write(0x300000, b"dma")
    assert host.boot_cpu.host_read(0x300000, 3) == b"dma"


def test_host_write_into_a_2m_guest_page_faults_anywhere_in_it() -> None:
    _, host, _, _ = _snp()
    assert _private(host, 0x400000, 0, huge=True) == RmpResult.SUCCESS
    with pytest.raises(HostRmpFault):
        host.boot_cpu.host_write(0x5FF000, b"x")


# ---- PVALIDATE / RMPADJUST ---------------------------------------------------------------------------
def test_pvalidate_codes_cf_and_faults() -> None:
    _, host, rmp, _ = _snp()
    assert _private(host, 0x300000, 0x5000) == RmpResult.SUCCESS
    assert rmp.pvalidate(ASID, 0x5000, 0x300000, False, True) == (0, False)
    assert rmp.state(0x300000) == RmpPageState.GUEST_VALID
    assert rmp.pvalidate(ASID, 0x5000, 0x300000, False, True) == (0, True)  # CF: already validated
    assert rmp.pvalidate(ASID, 0x5000, 0x300000, True, True) == (RmpResult.FAIL_SIZEMISMATCH, False)
    for asid, gpa in ((ASID + 1, 0x5000), (ASID, 0x6000)):  # another guest's page; a remapped GPA
        with pytest.raises(NestedPageFault) as exc:
            rmp.pvalidate(asid, gpa, 0x300000, False, False)
        assert exc.value.exit_info1 & NpfExitInfo1.RMP and exc.value.gpa == gpa
    with pytest.raises(NestedPageFault):
        rmp.pvalidate(ASID, 0x7000, 0x301000, False, True)  # a hypervisor page
    assert _private(host, 0x302000, 0x8000, immutable=True) == RmpResult.SUCCESS
    with pytest.raises(NestedPageFault):
        rmp.pvalidate(ASID, 0x8000, 0x302000, False, True)  # Pre-Guest: the firmware's until launch
    assert _private(host, 0x400000, 0x200000, huge=True) == RmpResult.SUCCESS
    with pytest.raises(NestedPageFault) as exc:
        rmp.pvalidate(ASID, 0x201000, 0x401000, False, True)  # 4 KiB on a 2 MiB entry
    assert exc.value.exit_info1 & NpfExitInfo1.SIZEM
    assert rmp.pvalidate(ASID, 0x200000, 0x400000, True, True) == (0, False)
    assert rmp.pvalidate(ASID, 0x5000, 0x300000, False, False) == (0, False)
    assert rmp.state(0x300000) == RmpPageState.GUEST_INVALID


def test_rmpadjust_sets_lower_vmpl_permissions_and_the_vmsa_bit() -> None:
    _, host, rmp, _ = _snp()
    assert _private(host, 0x300000, 0x5000) == RmpResult.SUCCESS
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, False, 0, 0x1F, False) == RmpResult.FAIL_INPUT  # own VMPL
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, False, 4, 0x1F, False) == RmpResult.FAIL_INPUT
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, False, 1, 0x20, False) == RmpResult.FAIL_INPUT  # bits 7:5
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, False, 1, 0x03, False) == RmpResult.SUCCESS
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, False, 3, 0x01, True) == RmpResult.SUCCESS
    e = rmp.entry(0x300000)
    assert e.perms == (0x1F, 0x03, 0, 0x01) and e.vmsa
    assert rmp.rmpadjust(ASID, 0x5000, 0x300000, True, 1, 0, False) == RmpResult.FAIL_SIZEMISMATCH
    with pytest.raises(NestedPageFault):
        rmp.rmpadjust(ASID + 1, 0x5000, 0x300000, False, 1, 0, False)


def test_guest_access_checks_for_the_vcpu_path() -> None:
    _, host, rmp, _ = _snp()
    assert _private(host, 0x300000, 0x5000) == RmpResult.SUCCESS
    kw: dict[str, Any] = {"write": False, "fetch": False, "c": True}
    assert rmp.check_guest_access(ASID, 0x5000, 0x300000, **kw) is False  # #VC 0x404
    rmp.pvalidate(ASID, 0x5000, 0x300000, False, True)
    assert rmp.check_guest_access(ASID, 0x5000, 0x300000, **kw) is True
    with pytest.raises(NestedPageFault) as exc:
        rmp.check_guest_access(ASID, 0x5000, 0x300000, write=True, fetch=False, c=True, vmpl=1)
    assert exc.value.exit_info1 & NpfExitInfo1.VMPL
    with pytest.raises(NestedPageFault) as exc:
        rmp.check_guest_access(ASID, 0x6000, 0x300000, **kw)  # remapped: reverse-map check
    assert exc.value.exit_info1 & NpfExitInfo1.ENC and not exc.value.exit_info1 & NpfExitInfo1.VMPL
    with pytest.raises(NestedPageFault):
        rmp.check_guest_access(ASID, 0x5000, 0x300000, write=True, fetch=False, c=False)  # shared write
    assert rmp.check_guest_access(ASID, 0x5000, 0x300000, write=False, fetch=False, c=False)  # shared read
    assert rmp.check_guest_access(ASID, 0x9000, 0x309000, write=True, fetch=False, c=False)


def test_pvalidate_and_rmpadjust_through_the_python_engine() -> None:
    soc, host, rmp, _ = _snp()
    soc.psp.take_ports().keys.load(ASID, bytes(16))
    pt = PageTables(soc, ASID, True)
    pt.identity()
    vmcb = pt.vmcb(paging=False)
    vmcb.sev_es_enable = True
    vmcb.sev_features = 1  # SNP active
    es_vmsa(soc, vmcb)  # VMRUN of an ES/SNP guest loads its registers from the VMSA
    _vmsa_page(soc, vmcb)  # ... which must be a VMSA page of the guest in the RMP
    assert _private(host, GUEST_SPA + 0x5000, 0x5000) == RmpResult.SUCCESS
    got: list[Any] = []

    def work() -> Workload:
        got.append((yield op.pvalidate(0x5000, 0, True)))
        got.append((yield op.pvalidate(0x5000, 0, True)))
        got.append((yield op.pvalidate(0x5000, 1, True)))  # 2 MiB request: not 2 MiB aligned
        got.append((yield op.rmpadjust(0x5000, 0, 1 | 0x01 << 8)))
        yield op.pvalidate(0x6000, 0, True)  # not the guest's page: #VMEXIT(NPF)

    ex = soc.boot_cpu.vmrun(vmcb, pt.engine(work()))
    assert got == [(0, False), (0, True), (1, False), (0, False)]
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP and ex.info2 == 0x6000
    assert rmp.entry(GUEST_SPA + 0x5000).perms[1] == 1 and rmp.entry(GUEST_SPA + 0x5000).validated


# ---- invariants over random instruction sequences ---------------------------------------------------

_REGION = 0x400000  # two 2 MiB regions from here
_OPS = st.lists(st.tuples(st.sampled_from(("update4k", "update2m", "shared4k", "shared2m", "psmash", "pvalidate",
                                           "pvalidate2m", "host_write")),
                          st.integers(0, 1023), st.integers(1, 3), st.booleans()), max_size=40)


@settings(max_examples=40, deadline=None)
@given(ops=_OPS)
def test_random_rmp_sequences_keep_the_tables_invariants(ops: list[tuple[str, int, int, bool]]) -> None:
    """Whatever the order: the per-ASID counters equal a recount of the table, a host write succeeds
    exactly on pages whose governing entry is unassigned (and then changes only that memory), every
    return code is one of the architecture's, and a failed instruction changes no entry."""
    _soc, host, rmp, _ = _snp()
    core = host.boot_cpu
    codes = {int(c) for c in RmpResult}
    for name, page, asid, flag in ops:
        spa = _REGION + page * PAGE
        spa2m = spa & ~(0x200000 - 1)
        before = [rmp.raw_entry(_REGION + i * PAGE) for i in range(0, 1024, 37)]
        if name == "host_write":
            assigned = rmp.entry(spa).assigned
            try:
                core.host_write(spa, b"x")
                assert not assigned
            except HostRmpFault:
                assert assigned
            continue
        if name == "update4k":
            rc = int(_private(host, spa, page * PAGE, asid, immutable=flag))
        elif name == "update2m":
            rc = int(_private(host, spa2m, spa2m - _REGION, asid, huge=True))
        elif name == "shared4k":
            rc = int(_shared(host, spa))
        elif name == "shared2m":
            rc = int(_shared(host, spa2m, huge=True))
        elif name == "psmash":
            rc = core.psmash(spa2m)
        else:
            huge = name == "pvalidate2m"
            target = spa2m if huge else spa
            try:
                rc, _cf = rmp.pvalidate(asid, target - _REGION, target, huge, flag)
            except NestedPageFault:
                rc = -1
        assert rc in codes | {-1}
        if rc != RmpResult.SUCCESS:
            assert [rmp.raw_entry(_REGION + i * PAGE) for i in range(0, 1024, 37)] == before, name
    recount: dict[int, int] = {}
    for i in range(1024):
        e = rmp.raw_entry(_REGION + i * PAGE)
        if e.assigned and e.asid:
            recount[e.asid] = recount.get(e.asid, 0) + 1
    assert {a: rmp.asid_pages(a) for a in (1, 2, 3)} == {a: recount.get(a, 0) for a in (1, 2, 3)}


# ---- the range checks give the per-page answers -------------------------------------------------------
_BASE = 0x0200_0000  # 2 MiB aligned: three 2 MiB regions from here


def _per_page_host_write(rmp: Rmp, spa: int, length: int) -> tuple[int, RmpPageState] | None:
    """The architectural rule page by page: the first page (in address order) whose governing entry
    is assigned faults, at the write's first byte in it."""
    for page in range(spa & ~(PAGE - 1), spa + length, PAGE):
        entry = rmp.entry(page)
        if entry.assigned:
            return max(spa, page), entry.state
    return None


@settings(max_examples=80, deadline=None)
@given(pages=st.lists(st.tuples(st.integers(0, 3 * 512 - 1), st.sampled_from(["guest", "fw", "huge"])),
                      max_size=6),
       start=st.integers(0, 3 * 512 * PAGE - 1), length=st.integers(1, 3 * 512 * PAGE))
def test_a_host_write_over_a_range_faults_where_the_per_page_rule_says(
        pages: list[tuple[int, str]], start: int, length: int) -> None:
    _soc, host, rmp, port = _SOC
    port.initialize()
    for i, kind in pages:
        spa = _BASE + i * PAGE
        if kind == "huge":
            spa &= ~(0x20_0000 - 1)
            if rmp.entry(spa).assigned or any(rmp.raw_entry(spa + k * PAGE).assigned for k in range(512)):
                continue
            port.set(spa, assigned=True, immutable=False, asid=ASID, gpa=0, huge=True)
        elif not rmp.entry(spa).assigned:
            port.set(spa, assigned=True, immutable=kind == "fw", asid=ASID if kind == "guest" else 0, gpa=0)
    length = min(length, 3 * 512 * PAGE - start)
    expected = _per_page_host_write(rmp, _BASE + start, length)
    try:
        host.boot_cpu.host_write(_BASE + start, bytes(length))
        got = None
    except HostRmpFault as f:
        got = (f.address, f.state)
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(subs=st.lists(st.tuples(st.integers(0, 511), st.sampled_from(["assigned", "immutable", "shared-imm"])),
                     max_size=4), assign=st.booleans())
def test_a_2m_rmpupdate_answers_as_the_first_offending_4k_entry(subs: list[tuple[int, str]], assign: bool) -> None:
    _soc, _host, rmp, port = _SOC
    port.initialize()
    for i, kind in subs:
        spa = _BASE + i * PAGE
        if kind == "shared-imm":
            port.set(spa, assigned=False, immutable=True)
        else:
            port.set(spa, assigned=True, immutable=kind == "immutable", asid=ASID, gpa=i * PAGE)
    first = next((rmp.raw_entry(_BASE + i * PAGE) for i in range(1, 512)
                  if rmp.raw_entry(_BASE + i * PAGE).immutable
                  or (assign and rmp.raw_entry(_BASE + i * PAGE).assigned)), None)
    head = rmp.raw_entry(_BASE)
    if head.immutable:
        expected = RmpResult.FAIL_PERMISSION
    elif first is None:
        expected = RmpResult.SUCCESS
    else:
        expected = RmpResult.FAIL_PERMISSION if first.immutable else RmpResult.FAIL_OVERLAP
    new = RmpUpdateState(gpa=0, assigned=1, asid=ASID, pagesize=1) if assign else RmpUpdateState(pagesize=1)
    assert rmp.rmpupdate(_BASE, new) == expected
    if expected == RmpResult.SUCCESS and not assign:
        assert not any(rmp.raw_entry(_BASE + i * PAGE).assigned for i in range(512))


_SOC = _snp()


# ---- the fast lookups answer as the general ones ---------------------------------------------------
def test_the_one_quadword_lookup_reads_what_the_entry_lookup_reads() -> None:
    """``_governing_lo`` (the host-write and guest-page checks) gives the low quadword ``_authoritative``
    gives: a page's own entry, a 2 MiB entry governing its region, a smashed region, and an entry
    software left in its cache (a dirty line) before SNP_INIT."""
    from sevemu.abi.rmp import RMP_BOOKKEEPING_SIZE

    soc = make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)
    rmp = soc.rmp
    assert rmp is not None
    dirty_pfn = (_BASE >> 12) + 3
    host.boot_cpu.host_write(rmp.base + RMP_BOOKKEEPING_SIZE + 16 * dirty_pfn, (1 | 5 << 51).to_bytes(8, "little"))
    assert rmp._governing_lo(dirty_pfn) == rmp._authoritative(dirty_pfn)[1] == 1 | 5 << 51
    RmpFirmwarePort(rmp).initialize()
    assert _private(host, _BASE + 0x200000, 0x200000, huge=True) == RmpResult.SUCCESS
    assert _private(host, _BASE + 5 * PAGE, 5 * PAGE) == RmpResult.SUCCESS
    assert _private(host, _BASE + 0x400000, 0x400000, huge=True) == RmpResult.SUCCESS
    assert host.boot_cpu.psmash(_BASE + 0x400000) == RmpResult.SUCCESS
    first = _BASE >> 12
    pfns = [first + i for i in (0, 3, 4, 5, 6, 511, 512, 513, 700, 1023, 1024, 1025, 1535, 1536)]
    for pfn in pfns:
        assert rmp._governing_lo(pfn) == rmp._authoritative(pfn)[1], hex(pfn)
    assert rmp._governing_lo(first + 700) & 3 == 3  # inside the 2 MiB page: its entry governs


def test_the_range_checks_flag_bytes_are_each_entrys_low_byte_dirty_lines_included() -> None:
    """``_low_flags`` (the range checks of host writes and of a 2 MiB RMPUPDATE read one byte an entry:
    Assigned, Page_Size, Immutable) gives the low byte of the low quadword :meth:`Rmp._raw` reads for every
    entry of a range -- entries never written, assigned 4 KiB and 2 MiB entries, and an entry software left
    in its cache (a dirty line, before SNP_INIT) -- and the range checks answer from it: a host write
    over the dirty entry faults there, a 2 MiB RMPUPDATE over it is refused as the first offending entry."""
    from sevemu.abi.rmp import RMP_BOOKKEEPING_SIZE

    soc = make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)
    rmp = soc.rmp
    assert rmp is not None
    first = _BASE >> 12
    dirty_pfn = first + 3 * 512 + 7  # in a region of its own
    host.boot_cpu.host_write(rmp.base + RMP_BOOKKEEPING_SIZE + 16 * dirty_pfn, (1 | 4 | 5 << 51).to_bytes(8, "little"))
    assert soc.cache.dirty  # the entry's line is still the software's, in the cache
    n = 4 * 512
    flags = rmp._low_flags(first, n)
    assert list(flags) == [rmp._raw(first + i)[0] & 0xFF for i in range(n)]
    assert flags[3 * 512 + 7] == 1 | 4
    with pytest.raises(HostRmpFault) as fault:  # the first assigned entry of the range decides
        host.boot_cpu.host_write(_BASE + 3 * 0x200000, bytes(0x200000))
    assert fault.value.address == _BASE + 3 * 0x200000 + 7 * PAGE
    assert rmp.rmpupdate(_BASE + 3 * 0x200000, RmpUpdateState(pagesize=1)) == RmpResult.FAIL_PERMISSION
    RmpFirmwarePort(rmp).initialize()
    assert _private(host, _BASE + 0x200000, 0x200000, huge=True) == RmpResult.SUCCESS
    assert _private(host, _BASE + 5 * PAGE, 5 * PAGE) == RmpResult.SUCCESS
    flags = rmp._low_flags(first, n)
    assert list(flags) == [rmp._raw(first + i)[0] & 0xFF for i in range(n)]
    assert flags[512] & 3 == 3 and flags[5] == 1 and flags.count(0) == n - 2
    with pytest.raises(HostRmpFault) as fault:  # inside the 2 MiB page: from its first page on
        host.boot_cpu.host_write(_BASE + 6 * PAGE, bytes(0x300000))
    assert fault.value.address == _BASE + 0x200000
    assert rmp.rmpupdate(_BASE, RmpUpdateState(gpa=0, assigned=1, asid=ASID, pagesize=1)) == RmpResult.FAIL_OVERLAP


def test_decoded_entries_are_shared_values_equal_to_a_fresh_decoding() -> None:
    from sevemu.hw.rmp import RmpEntry

    lo, hi = 1 | 1 << 2 | 0x1234 << 12 | 7 << 51 | 1 << 62, 0x1F | 3 << 8
    a, b = RmpEntry.from_raw(lo, hi), RmpEntry.from_raw(lo, hi)
    assert a is b
    assert a == RmpEntry(True, 0, True, 0x1234 << 12, 7, False, True, (0x1F, 3, 0, 0))
    assert RmpEntry.from_raw(lo | 2, hi).page_size == 1 and a.page_size == 0
    with pytest.raises(AttributeError):
        a.asid = 1  # type: ignore[misc]


def test_in_use_pages_answer_for_aligned_and_unaligned_queries() -> None:
    _soc, _host, rmp, port = _snp()
    page = _BASE + 7 * PAGE
    rmp.mark_in_use([page + 0x10])
    assert port.in_use(page)
    assert not port.in_use(page + 0x800, PAGE)  # [page + 0x800, page + 0x1800) holds no in-use page start
    assert port.in_use(page - 0x800, PAGE)  # [page - 0x800, page + 0x800) holds the page's start
    assert not port.in_use(page + PAGE) and not port.in_use(page - PAGE)
    assert port.in_use(_BASE, 0x200000)
    rmp.release([page])
    assert not port.in_use(page) and not port.in_use(_BASE, 0x200000)


# ---- the firmware's one-read, one-write SNP_LAUNCH_UPDATE path (RmpFirmwarePort) ---------------------
@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("vmsa", [False, True])
def test_make_guest_valid_writes_what_set_writes(huge: bool, vmsa: bool) -> None:
    """The lean path (governing + make_guest_valid) leaves the entry, its raw quadwords and the ASID
    count exactly as set() with the fields the handler gave it did."""
    results = []
    for lean in (False, True):
        _, host, rmp, port = _snp()
        spa = 0x400000
        assert _private(host, spa, 0x20_0000 if huge else 0x3000, immutable=True, huge=huge) == RmpResult.SUCCESS
        own, lo, hi, state, size, asid, gpa = port.governing(spa)
        entry = port.entry(spa)
        assert (state, size, asid, gpa) == (entry.state, entry.page_size, entry.asid, entry.gpa)
        assert state == RmpPageState.PRE_GUEST and own == spa >> 12 and (lo, hi) == rmp._raw(own)
        if lean:
            port.make_guest_valid(own, lo, hi, vmsa, (1, 2, 0x1F))
        else:
            port.set(spa, assigned=True, immutable=False, asid=entry.asid, gpa=entry.gpa, validated=True,
                     vmsa=vmsa, huge=bool(entry.page_size), perms=(entry.perms[0], 1, 2, 0x1F))
        results.append((rmp._raw(spa >> 12), port.entry(spa), rmp.asid_pages(ASID)))
    assert results[0] == results[1]
    assert results[1][1].state == RmpPageState.GUEST_VALID and results[1][1].vmsa == vmsa


def test_governing_refuses_an_uncovered_address() -> None:
    _, _, rmp, port = _snp()
    with pytest.raises(AddressError, match="not covered"):
        port.governing(rmp.covered)


def test_is_context_answers_what_the_state_says() -> None:
    _, _, _, port = _snp()
    spa = 0x400000
    kinds = [{"assigned": False, "immutable": False}, {"assigned": True, "immutable": True},  # Hypervisor, Firmware
             {"assigned": True, "immutable": True, "vmsa": True},  # Context
             {"assigned": True, "immutable": True, "vmsa": True, "huge": True},  # Context (2 MiB entry)
             {"assigned": True, "immutable": True, "vmsa": True, "gpa": 0x1000},  # Metadata
             {"assigned": True, "immutable": True, "vmsa": True, "asid": ASID},  # Pre-Guest
             {"assigned": True, "immutable": False, "vmsa": True},  # Reclaim
             {"assigned": True, "immutable": True, "vmsa": True, "validated": True},  # Invalid
             {"assigned": True, "immutable": True, "asid": ASID, "validated": True},  # Pre-Swap
             {"assigned": True, "immutable": False, "asid": ASID, "huge": True},  # Guest-Invalid (2 MiB)
             {"assigned": False, "immutable": False, "asid": ASID}]  # Invalid (an ASID, not assigned)
    seen = set()
    for kw in kinds:
        port.set(spa, **kw)  # type: ignore[arg-type]
        state = port.state(spa)
        seen.add(state)
        assert port.is_context(spa) == (state == RmpPageState.CONTEXT), kw
        e = port.entry(spa)
        assert port.governing(spa)[3:] == (state, e.page_size, e.asid, e.gpa), kw
    assert {RmpPageState.CONTEXT, RmpPageState.PRE_GUEST, RmpPageState.PRE_SWAP} <= seen and len(seen) >= 8


# ---- KVM's per-page probes: Assigned from one quadword, RMPUPDATE from the state's fields -----------
def test_the_assigned_probe_answers_what_the_entry_says_dirty_lines_and_2m_pages_included() -> None:
    """``HostSoc.rmp_assigned`` (KVM's check of each page it populates) answers ``rmp_entry(spa).assigned``
    for entries never written, 4 KiB and 2 MiB assigned entries (every page of the 2 MiB one), Firmware
    pages, an entry software left dirty in its cache before SNP_INIT, and refuses as ``rmp_entry`` does
    (AddressError past the covered memory, HardwareError without SNP_EN)."""
    from sevemu.abi.rmp import RMP_BOOKKEEPING_SIZE

    soc = make_soc()
    host = soc.host_view()
    with pytest.raises(HardwareError):
        host.rmp_assigned(_BASE)
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)
    rmp = soc.rmp
    assert rmp is not None
    dirty_pfn = (_BASE >> 12) + 3 * 512 + 7
    host.boot_cpu.host_write(rmp.base + RMP_BOOKKEEPING_SIZE + 16 * dirty_pfn, (1 | 4 | 5 << 51).to_bytes(8, "little"))
    assert soc.cache.dirty
    spas = [_BASE + i * PAGE for i in range(4 * 512)]
    assert [host.rmp_assigned(s) for s in spas] == [host.rmp_entry(s).assigned for s in spas]
    assert host.rmp_assigned(dirty_pfn << 12)
    RmpFirmwarePort(rmp).initialize()
    assert _private(host, _BASE + 0x200000, 0x200000, huge=True) == RmpResult.SUCCESS
    assert _private(host, _BASE + 5 * PAGE, 5 * PAGE) == RmpResult.SUCCESS
    RmpFirmwarePort(rmp).set(_BASE + 9 * PAGE, assigned=True, immutable=True)  # a Firmware page
    got = [host.rmp_assigned(s) for s in spas]
    assert got == [host.rmp_entry(s).assigned for s in spas]
    assert sum(got) == 512 + 2 and host.rmp_assigned(_BASE + 0x3FF000) and host.rmp_assigned(rmp.base)
    for spa in (rmp.covered, -PAGE):
        with pytest.raises(AddressError):
            host.rmp_entry(spa)
        with pytest.raises(AddressError):
            host.rmp_assigned(spa)


@pytest.mark.parametrize("fields", [(0x5000, 1, 0, 1, ASID), (0x200000, 1, 1, 0, ASID), (0, 0, 0, 0, 0),
                                    (0, 0, 1, 0, 0), (0x5000, 0, 0, 0, ASID), (0x5000, 1, 0, 1, 1 << 20)])
def test_rmpupdate_from_fields_is_rmpupdate_of_the_state(fields: tuple[int, int, int, int, int]) -> None:
    """``rmpupdate_fields`` (KVM's per-page RMPUPDATE without a state object) gives the result, the entry
    and the ASID counts ``rmpupdate_state`` of the same :class:`RmpUpdateState` gives, from the same table
    (a page assigned 4 KiB, then the same page again, a 2 MiB region, refusals)."""
    gpa, assigned, pagesize, immutable, asid = fields
    out = []
    for by_fields in (False, True):
        _soc, host, rmp, _ = _snp()
        _private(host, _BASE + 5 * PAGE, 5 * PAGE)
        seq = []
        for spa in (_BASE + 0x200000, _BASE + 0x200000, _BASE + 5 * PAGE):
            if by_fields:
                rc = host.boot_cpu.rmpupdate_fields(spa, gpa, assigned, pagesize, immutable, asid)
            else:
                rc = host.boot_cpu.rmpupdate_state(spa, RmpUpdateState(gpa=gpa, assigned=assigned, pagesize=pagesize,
                                                                       immutable=immutable, asid=asid))
            seq.append((rc, rmp._raw(spa >> 12), rmp.asid_pages(ASID)))
        out.append(seq)
    assert out[0] == out[1]


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_the_governing_entry_in_c_is_the_python_lookup() -> None:
    """``rmp_governing`` (``csrc/mem_accel.c``: the governing entry of every RMP check) gives what the
    Python lookup gives -- the 2 MiB entry of an assigned 2 MiB region for each of its pages, a page's own
    entry otherwise, zeros where no entry page is stored, entries with both quadwords set -- and
    declines (None) an entry whose line software left dirty in the cache, which the Python path then
    reads through the cache."""
    from sevemu.abi.rmp import RMP_BOOKKEEPING_SIZE
    from sevemu.hw import _mem_accel

    soc = make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | SNP_EN)
    rmp = soc.rmp
    assert rmp is not None
    first = rmp.base + RMP_BOOKKEEPING_SIZE
    dirty_pfn = (_BASE >> 12) + 3 * 512 + 7
    host.boot_cpu.host_write(first + 16 * dirty_pfn, (1 | 4 | 5 << 51).to_bytes(8, "little"))
    pfns = [p for p in range((_BASE >> 12) - 3, (_BASE >> 12) + 4 * 512 + 3)]

    def both() -> list[tuple[int, int, int]]:
        rows = []
        for accel in (True, False):
            saved = memaccel.ENABLED
            memaccel.ENABLED = accel
            try:
                rows.append([(rmp._authoritative(p), rmp._governing_lo(p)) for p in pfns])
            finally:
                memaccel.ENABLED = saved
        assert rows[0] == rows[1]
        assert [lo for (_, lo, _), gov in rows[0]] == [gov for _, gov in rows[0]]
        return [auth for auth, _ in rows[0]]

    before = both()
    assert before[pfns.index(dirty_pfn)][1] == 1 | 4 | 5 << 51  # read through the cache
    assert _mem_accel.rmp_governing(rmp._pages, soc.cache.dirty, first, dirty_pfn) is None
    assert _mem_accel.rmp_governing(rmp._pages, set(soc.cache.dirty), first, dirty_pfn + 1) == (dirty_pfn + 1, 0, 0)
    RmpFirmwarePort(rmp).initialize()
    assert not soc.cache.dirty or all(k < first or k >= rmp.end for k in soc.cache.dirty)
    assert _private(host, _BASE + 0x200000, 0x200000, huge=True) == RmpResult.SUCCESS
    assert _private(host, _BASE + 5 * PAGE, 5 * PAGE, asid=7) == RmpResult.SUCCESS
    RmpFirmwarePort(rmp).set(_BASE + 0x400000, assigned=True, immutable=True, huge=True, perms=(0xF, 3, 2, 1))
    RmpFirmwarePort(rmp).set(_BASE + 0x400000 + 9 * PAGE, assigned=True, immutable=False, asid=3, gpa=0x9000)
    after = both()
    huge = pfns.index((_BASE + 0x200000) >> 12)
    assert {own for own, _, _ in after[huge : huge + 512]} == {(_BASE + 0x200000) >> 12}
    assert after[pfns.index((_BASE + 0x400000 >> 12) + 9)][0] == (_BASE + 0x400000 >> 12)  # 2 MiB Firmware entry governs
    assert after[pfns.index((_BASE >> 12) + 5)] == ((_BASE >> 12) + 5, 1 | 5 * PAGE | 7 << 51, 0x1F)


@pytest.mark.skipif(not memaccel.HOST_PORT, reason="csrc/mem_accel.c not built")
def test_whole_line_host_writes_on_an_snp_host_keep_the_rmp_check_in_the_c_path() -> None:
    """On an SNP host the host's whole-line writes (``HostPort.write``: the PSP driver's command buffer)
    take the C path after the RMP's check of a host write (``Rmp.check_host_write``): the same lines,
    bytes, dirty set and hit / miss counts as the Python path, and a write into a guest's page (its own
    4 KiB entry, or inside a 2 MiB one) raises the same #PF(RMP) with nothing written -- with and
    without the C helpers; a write into a VMCB view and an unaligned write still go to the Python path."""
    results = []
    for on in (True, False):
        with mem_accel(on):
            soc, host, _rmp, _ = _snp()
            core = host.boot_cpu
            python_writes: list[int] = []

            def counted(*args: Any, _seen: list[int] = python_writes, _write: Any = soc.cache.write_lines,
                        **kw: Any) -> None:
                _seen.append(args[2])
                _write(*args, **kw)

            soc.cache.write_lines = counted  # type: ignore[method-assign]  # (the Python path's call)
            assert _private(host, _BASE + 5 * PAGE, 5 * PAGE) == RmpResult.SUCCESS
            assert _private(host, _BASE + 0x200000, 0x200000, huge=True) == RmpResult.SUCCESS
            core.host_write(_BASE, bytes(range(64)))  # a miss, then hits
            core.host_write(_BASE, bytes([7]) * 64)
            core.host_write(_BASE + 64, bytes(range(128)))
            faults = []
            for spa in (_BASE + 5 * PAGE + 64, _BASE + 0x200000 + 3 * PAGE):
                with pytest.raises(HostRmpFault) as fault:
                    core.host_write(spa, bytes([9]) * 64)
                faults.append(fault.value.address)
            core.host_write(_BASE + 8, bytes(8))  # not whole lines: the Python path
            c_path = not python_writes
            results.append((faults, soc.cache.hits, soc.cache.misses, sorted(soc.cache.dirty),
                            core.host_read(_BASE, 256), core.host_read(_BASE + 5 * PAGE, 256),
                            soc.dram.read(_BASE + 5 * PAGE, PAGE)))
            assert c_path == on, python_writes
    assert results[0] == results[1]
    assert results[0][0] == [_BASE + 5 * PAGE + 64, _BASE + 0x200000 + 3 * PAGE]
