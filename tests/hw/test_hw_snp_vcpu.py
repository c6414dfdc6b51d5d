"""An SEV-SNP guest on the vCPU (hw/cpu.py, hw/mmu.py with hw/rmp.py): VMRUN's RMP checks of the VMSA
page and its in-use marking (APM2 15.36.12), and the RMP checks of the guest's own accesses on the TLB
fill path -- #VC PAGE_NOT_VALIDATED for a private access to a page it has not validated, #VMEXIT(NPF)
with the RMP bit for a page that is not the guest's at that GPA or is mapped larger than its entry
(APM2 15.36.10, Table 15-39) -- with cached verdicts dropped when the RMP changes.  The host's attacks
use host interfaces only (RMPUPDATE, the VMCB's VMSA pointer)."""

from __future__ import annotations

from types import GeneratorType
from typing import Any

import pytest
from hwkit import GPT_POOL, GUEST_SPA, PageTables, es_vmsa, make_soc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.paging import ExitCode, NpfExitInfo1
from sevemu.abi.pycode import CODE_GPA
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.hw.faults import VmmCommunication
from sevemu.hw.host import HostSoc
from sevemu.hw.mmu import VC_PAGE_NOT_VALIDATED
from sevemu.hw.pyengine import Workload, op
from sevemu.hw.rmp import Rmp, RmpFirmwarePort
from sevemu.hw.soc import Soc
from sevemu.hw.svm import Vmcb

ASID = 5
OTHER = 6
PAGE = 0x1000
MiB = 1 << 20
DATA = 0x5000  # a private page the tests assign (identity-backed: SPA GUEST_SPA + DATA)
HUGE_GPA = 0x400000  # beyond the identity map: a 2 MiB page the tests map


class Guest:
    """A Milan SoC with SNP enabled and one SNP-active SEV-ES guest (ASID 5, 4 MiB identity-backed)."""

    def __init__(self, paging: bool = False, validate_all: bool = False) -> None:
        self.soc: Soc = make_soc()
        self.host: HostSoc = self.soc.host_view()
        self.host.wrmsr(Msr.SYSCFG, self.host.rdmsr(Msr.SYSCFG) | int(SysCfg.SNP_EN))
        assert self.soc.rmp is not None
        self.rmp: Rmp = self.soc.rmp
        self.port = RmpFirmwarePort(self.rmp)
        self.port.initialize()
        keys = self.soc.psp.take_ports().keys
        keys.load(ASID, bytes(16))
        keys.load(OTHER, bytes(range(16)))
        self.pt = PageTables(self.soc, ASID, True)
        self.pt.identity()
        self.own(CODE_GPA, validated=True)  # the page of the guest's program table (launched)
        if paging:
            self.pt.guest_map(0x10_0000, DATA)
            for gpa in range(GPT_POOL, GPT_POOL + 8 * PAGE, PAGE):  # the guest's own tables: private, validated
                self.own(gpa, validated=True)
        if validate_all:
            self.own(DATA, validated=True)
        self.vmcb: Vmcb = self.pt.vmcb(paging=paging)
        if paging:
            self.vmcb.cr4 |= 1 << 5
            self.vmcb.efer |= 1 << 8 | 1 << 10
        self.vmcb.sev_es_enable = True
        self.vmcb.sev_features = 1  # SNP active
        es_vmsa(self.soc, self.vmcb)
        self.port.set(self.vmcb.vmsa_pa, assigned=True, immutable=False, asid=ASID, gpa=0xFFFF_F000,
                      validated=True, vmsa=True)

    def own(self, gpa: int, *, validated: bool = False, asid: int = ASID, at: int | None = None) -> int:
        """Assign the page backing ``gpa`` to ``asid`` at GPA ``at`` (default ``gpa``)."""
        spa = GUEST_SPA + gpa
        self.port.set(spa, assigned=True, immutable=False, asid=asid, gpa=gpa if at is None else at,
                      validated=validated)
        return spa

    def run(self, work: Any) -> Any:
        """VMRUN with ``work`` (a workload, or a list of ops) bound to the guest as its launch would
        (the program table at its GPA, a private validated page)."""
        if not isinstance(work, GeneratorType):
            work = _ops(list(work))
        return self.soc.boot_cpu.vmrun(self.vmcb, self.pt.engine(work))


def _ops(ops: list[Any]) -> Workload:
    for o in ops:  # noqa: UP028 - the engine sends results, a list iterator cannot take them
        yield o


# ---- VMRUN -----------------------------------------------------------------------------------------
def test_vmrun_needs_a_validated_vmsa_page_of_the_guest_in_the_rmp() -> None:
    g = Guest()
    assert g.run(iter([op.hlt()])).code == ExitCode.HLT
    real = g.vmcb.vmsa_pa
    # the host's attack: point the VMCB at a page that is the guest's, validated, but not a VMSA
    g.vmcb.vmsa_pa = g.own(DATA, validated=True)
    assert g.run(iter([op.hlt()])).code == ExitCode.INVALID
    assert "VMSA=0" in g.soc.boot_cpu.vmsa_failure
    # ... at a hypervisor page, at another guest's VMSA page
    g.vmcb.vmsa_pa = GUEST_SPA + 0x9000
    assert g.run(iter([op.hlt()])).code == ExitCode.INVALID
    assert "not assigned to ASID 5" in g.soc.boot_cpu.vmsa_failure
    g.port.set(GUEST_SPA + 0x9000, assigned=True, immutable=False, asid=OTHER, gpa=0x9000, validated=True,
               vmsa=True)
    assert g.run(iter([op.hlt()])).code == ExitCode.INVALID
    # a VMSA page the guest has not validated
    g.vmcb.vmsa_pa = real
    g.port.update(real, g.rmp.entry(real), validated=False)
    assert g.run(iter([op.hlt()])).code == ExitCode.INVALID
    g.port.update(real, g.rmp.entry(real), validated=True)
    assert g.run(iter([op.hlt()])).code == ExitCode.HLT


def test_every_vmrun_checks_even_a_vmsa_the_core_still_holds() -> None:
    g = Guest()
    assert g.run(iter([op.hlt()])).code == ExitCode.HLT
    # between runs the host makes the VMSA page shared (RMPUPDATE clears the VMSA bit)
    assert g.host.boot_cpu.rmpupdate_state(g.vmcb.vmsa_pa, RmpUpdateState()) == RmpResult.SUCCESS
    assert g.run(iter([op.hlt()])).code == ExitCode.INVALID
    assert "not assigned" in g.soc.boot_cpu.vmsa_failure


def test_the_vmsa_page_is_in_use_while_the_guest_runs() -> None:
    g = Guest()
    vmsa = g.vmcb.vmsa_pa
    seen: list[int] = []

    def work() -> Workload:
        # another core's RMPUPDATE while this one runs the guest
        seen.append(g.host.boot_cpu.rmpupdate_state(vmsa, RmpUpdateState()))
        yield op.hlt()

    assert g.run(work()).code == ExitCode.HLT
    assert seen == [RmpResult.FAIL_INUSE]
    assert g.rmp.entry(vmsa).vmsa  # nothing changed
    assert g.host.boot_cpu.rmpupdate_state(vmsa, RmpUpdateState()) == RmpResult.SUCCESS  # released at #VMEXIT


# ---- the guest's accesses --------------------------------------------------------------------------
def test_a_private_access_to_an_unvalidated_page_is_vc_404_until_pvalidate() -> None:
    g = Guest()
    g.own(DATA)
    got: list[Any] = []

    def work() -> Workload:
        try:
            yield op.load(DATA, 8)
        except VmmCommunication as vc:
            got.append(vc.error_code)
        got.append((yield op.pvalidate(DATA, 0, True)))
        yield op.store(DATA, 8, 0x1122)
        got.append((yield op.load(DATA, 8)))
        got.append((yield op.pvalidate(DATA, 0, False)))  # rescind: the cached translation must go
        try:
            yield op.load(DATA, 8)
        except VmmCommunication as vc:
            got.append(vc.error_code)
        yield op.hlt()

    assert g.run(work()).code == ExitCode.HLT
    assert got == [VC_PAGE_NOT_VALIDATED, (0, False), 0x1122, (0, False), VC_PAGE_NOT_VALIDATED]


@pytest.mark.parametrize("attack", ["hypervisor page", "other asid", "other gpa"])
def test_pages_that_are_not_the_guests_at_that_gpa_are_npf_with_the_rmp_bit(attack: str) -> None:
    g = Guest()
    if attack == "other asid":
        g.own(DATA, validated=True, asid=OTHER)
    elif attack == "other gpa":  # the host remapped a page the guest validated at another GPA
        g.own(DATA, validated=True, at=0x7000)
    ex = g.run(_ops([op.load(DATA, 8), op.hlt()]))
    assert ex.code == ExitCode.NPF and ex.info2 == DATA
    assert ex.info1 & NpfExitInfo1.RMP and ex.info1 & NpfExitInfo1.ENC and not ex.info1 & NpfExitInfo1.SIZEM


def test_a_2m_mapping_of_a_4k_rmp_page_is_npf_sizem() -> None:
    g = Guest(paging=True)
    g.pt.npt_map(HUGE_GPA, GUEST_SPA + HUGE_GPA, large=True)
    g.pt.guest_map(0x4000_0000, HUGE_GPA, large=True)
    g.own(HUGE_GPA, validated=True)  # a 4 KiB entry
    ex = g.run(_ops([op.load(0x4000_0000, 8), op.hlt()]))
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.SIZEM and ex.info1 & NpfExitInfo1.RMP


def test_the_guests_page_tables_are_checked_too() -> None:
    g = Guest(paging=True, validate_all=True)
    assert g.run(_ops([op.load(0x10_0000, 8), op.hlt()])).code == ExitCode.HLT
    # the host takes a page of the guest's tables back (RMPUPDATE to shared): the walk faults
    assert g.host.boot_cpu.rmpupdate_state(GUEST_SPA + GPT_POOL, RmpUpdateState()) == RmpResult.SUCCESS
    g.soc.boot_cpu.tlb.flush_all()
    ex = g.run(_ops([op.load(0x10_0000, 8), op.hlt()]))
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP and ex.info2 == GPT_POOL


def test_a_verdict_cached_in_the_tlb_goes_when_the_host_changes_the_rmp() -> None:
    g = Guest(validate_all=True)
    assert g.run(_ops([op.load(DATA, 8), op.hlt()])).code == ExitCode.HLT  # the translation is cached
    assert g.host.boot_cpu.rmpupdate_state(GUEST_SPA + DATA, RmpUpdateState(
        gpa=DATA, assigned=1, asid=OTHER)) == RmpResult.SUCCESS
    ex = g.run(_ops([op.load(DATA, 8), op.hlt()]))  # no TLB_CONTROL flush asked by the host
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP


def test_a_change_to_a_page_no_core_cached_keeps_the_cached_translations() -> None:
    g = Guest(validate_all=True)
    tlb = g.soc.boot_cpu.tlb
    assert g.run(_ops([op.load(DATA, 8), op.hlt()])).code == ExitCode.HLT
    cached = dict(tlb.for_asid(ASID))
    epoch = g.rmp.epoch
    # on-demand memory: the host assigns a page the guest never reached (KVM on an RMP fault)
    assert g.host.boot_cpu.rmpupdate_state(GUEST_SPA + 0x9000, RmpUpdateState(
        gpa=0x9000, assigned=1, asid=ASID)) == RmpResult.SUCCESS
    assert g.rmp.epoch == epoch
    misses = tlb.misses
    assert g.run(_ops([op.load(DATA, 8), op.hlt()])).code == ExitCode.HLT
    assert tlb.misses == misses and tlb.for_asid(ASID) == cached  # the verdicts stayed
    # ... but a change to the page the guest reached drops them
    assert g.host.boot_cpu.rmpupdate_state(GUEST_SPA + DATA, RmpUpdateState()) == RmpResult.SUCCESS
    assert g.rmp.epoch == epoch + 1
    ex = g.run(_ops([op.load(DATA, 8), op.hlt()]))
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP


def test_a_2m_assignment_takes_away_a_cached_shared_write_inside_its_region() -> None:
    g = Guest(paging=True, validate_all=True)
    g.pt.npt_map(HUGE_GPA, GUEST_SPA + HUGE_GPA, large=True)
    g.pt.guest_map(0x4000_0000, HUGE_GPA + 0x3000, c=False)  # a shared page: the guest PTE without C
    base = GUEST_SPA + HUGE_GPA
    assert g.run(_ops([op.store(0x4000_0000, 8, 1), op.hlt()])).code == ExitCode.HLT
    # the host assigns the whole 2 MiB region (whose entry is at its first frame, not the one cached)
    assert g.host.boot_cpu.rmpupdate_state(base, RmpUpdateState(
        gpa=HUGE_GPA, assigned=1, asid=OTHER, pagesize=1)) == RmpResult.SUCCESS
    ex = g.run(_ops([op.store(0x4000_0000, 8, 2), op.hlt()]))
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP and not ex.info1 & NpfExitInfo1.ENC


_PAGES = (0x5000, 0x6000, 0x7000)
_host_change = st.tuples(st.sampled_from(_PAGES), st.sampled_from(["shared", "mine", "other-asid", "other-gpa"]),
                         st.booleans())
_access = st.tuples(st.sampled_from(_PAGES), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(_host_change, max_size=3), st.lists(_access, min_size=1, max_size=3)),
                min_size=1, max_size=6))
@example([([], [(0x5000, False)]), ([(0x5000, "shared", False)], [(0x5000, False)])])
@example([([], [(0x6000, True)]), ([(0x6000, "mine", False)], [(0x6000, False)])])
def test_cached_verdicts_always_equal_a_fresh_walk(steps: list[Any]) -> None:
    """Whatever the host does to the RMP between runs, an access through the TLB's cached verdicts has
    the outcome of the same access after a full flush (the hardware answer)."""
    g = Guest()
    for gpa in _PAGES:
        g.own(gpa, validated=True)

    def outcome(accesses: list[tuple[int, bool]]) -> list[Any]:
        got: list[Any] = []

        def work() -> Workload:
            for gpa, write in accesses:
                try:
                    if write:
                        yield op.store(gpa, 8, gpa)
                        got.append("stored")
                    else:
                        yield op.load(gpa, 8)
                        got.append("loaded")  # (the value: the first run's stores may change it)
                except VmmCommunication as vc:
                    got.append(vc.error_code)
            yield op.hlt()

        ex = g.run(work())
        return got + ([] if ex.code == ExitCode.HLT else [(int(ex.code), ex.info1, ex.info2)])

    for changes, accesses in steps:
        for gpa, how, validated in changes:
            spa = GUEST_SPA + gpa
            if how == "shared":
                assert g.host.boot_cpu.rmpupdate_state(spa, RmpUpdateState()) == RmpResult.SUCCESS
            else:
                g.own(gpa, validated=validated, asid=OTHER if how == "other-asid" else ASID,
                      at=gpa + 0x10000 if how == "other-gpa" else gpa)
        cached = outcome(accesses)
        g.soc.boot_cpu.tlb.flush_all()
        assert outcome(accesses) == cached


# ---- VMPLs: a second VMSA of the guest at VMPL1 (an SVSM-style split) ------------------------------------
VMSA1_SPA = GUEST_SPA + 0x3F_E000  # a page of the guest's memory holding its VMPL1 VMSA
R, W, UX, SX = 1, 2, 4, 8  # the VMPL permission bits (APM2 Table 15-36)


def _vmpl1_vmsa(g: Guest) -> int:
    """The guest's VMSA at VMPL1: the same registers, ``vmpl`` 1, a validated VMSA page of the guest
    (what the VMPL0 software's RMPADJUST with the VMSA bit leaves)."""
    from sevemu.abi.vmsa import SevEsSaveArea

    area = SevEsSaveArea(efer=g.vmcb.efer, cr0=g.vmcb.cr0, cr3=g.vmcb.cr3, cr4=g.vmcb.cr4, rflags=g.vmcb.rflags,
                         rip=g.vmcb.rip, sev_features=1, vmpl=1, **g.vmcb.regs)
    g.soc.cache.write(ASID, True, VMSA1_SPA, area.encode())
    g.soc.cache.flush_range(ASID, True, VMSA1_SPA, PAGE)
    g.port.set(VMSA1_SPA, assigned=True, immutable=False, asid=ASID, gpa=0x3F_E000, validated=True, vmsa=True)
    return VMSA1_SPA


def _at(g: Guest, vmsa: int, work: Any, core: int = 0) -> Any:
    g.vmcb.vmsa_pa = vmsa
    if not isinstance(work, GeneratorType):
        work = _ops(list(work))
    return g.soc.cores[core].vmrun(g.vmcb, g.pt.engine(work))


def test_vmpl1_accesses_need_the_permissions_vmpl0_granted() -> None:
    g = Guest(validate_all=True)
    vmpl0, vmpl1 = g.vmcb.vmsa_pa, _vmpl1_vmsa(g)
    got: list[Any] = []
    # VMPL1 has nothing yet: its read of DATA is an NPF with the VMPL bit
    ex = _at(g, vmpl1, [op.load(DATA, 8), op.hlt()])
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.VMPL and ex.info2 == DATA

    def grant() -> Workload:  # VMPL0: VMPL1 may read and run its code, and read DATA
        got.append((yield op.rmpadjust(CODE_GPA, 0, 1 | (R | SX) << 8)))
        got.append((yield op.rmpadjust(DATA, 0, 1 | R << 8)))
        yield op.store(DATA, 8, 0x77)
        yield op.hlt()

    assert _at(g, vmpl0, grant()).code == ExitCode.HLT
    assert got == [(0, False), (0, False)]
    assert g.rmp.entry(GUEST_SPA + DATA).perms[1] == R
    got.clear()

    def vmpl1_reads() -> Workload:
        got.append((yield op.load(DATA, 8)))
        yield op.store(DATA, 8, 0x66)  # a VMPL1 write to a page VMPL0 did not grant: #NPF (VMPL)
        yield op.hlt()

    ex = _at(g, vmpl1, vmpl1_reads())
    assert got == [0x77]
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.VMPL and ex.info1 & NpfExitInfo1.RMP
    assert ex.info1 & NpfExitInfo1.W and ex.info2 == DATA
    assert _at(g, vmpl0, [op.load(DATA, 8), op.hlt()]).code == ExitCode.HLT  # nothing was written


def test_vmpl1_may_not_validate_and_adjusts_only_less_privileged_vmpls_within_its_own() -> None:
    g = Guest(validate_all=True)
    vmpl0, vmpl1 = g.vmcb.vmsa_pa, _vmpl1_vmsa(g)
    assert _at(g, vmpl0, [op.rmpadjust(CODE_GPA, 0, 1 | (R | SX) << 8), op.rmpadjust(DATA, 0, 1 | R << 8),
                          op.hlt()]).code == ExitCode.HLT
    got: list[Any] = []

    def at_vmpl1() -> Workload:
        try:
            yield op.pvalidate(DATA, 0, False)
        except Exception as exc:  # noqa: BLE001 - the #GP the workload is thrown
            got.append(type(exc).__name__)
        got.append((yield op.rmpadjust(DATA, 0, 1 | R << 8)))  # its own level: not less privileged
        got.append((yield op.rmpadjust(DATA, 0, 0)))  # VMPL0's
        got.append((yield op.rmpadjust(DATA, 0, 2 | (R | W) << 8)))  # more than its own (R)
        got.append((yield op.rmpadjust(DATA, 0, 2 | R << 8)))  # within its own
        yield op.hlt()

    assert _at(g, vmpl1, at_vmpl1()).code == ExitCode.HLT
    assert got == ["GeneralProtection", (RmpResult.FAIL_INPUT, False), (RmpResult.FAIL_INPUT, False),
                   (RmpResult.FAIL_PERMISSION, False), (0, False)]
    e = g.rmp.entry(GUEST_SPA + DATA)
    assert e.validated and e.perms[1:] == (R, R, 0)


def test_a_vmpl0_revocation_on_another_core_drops_vmpl1s_cached_verdict() -> None:
    g = Guest(validate_all=True)
    vmpl0, vmpl1 = g.vmcb.vmsa_pa, _vmpl1_vmsa(g)
    assert _at(g, vmpl0, [op.rmpadjust(CODE_GPA, 0, 1 | (R | SX) << 8), op.rmpadjust(DATA, 0, 1 | (R | W) << 8),
                          op.hlt()]).code == ExitCode.HLT
    assert _at(g, vmpl1, [op.store(DATA, 8, 1), op.hlt()], core=0).code == ExitCode.HLT  # cached on core 0
    epoch = g.rmp.epoch
    assert _at(g, vmpl0, [op.rmpadjust(DATA, 0, 1 | R << 8), op.hlt()], core=1).code == ExitCode.HLT
    assert g.rmp.epoch == epoch + 1  # write taken away from a frame core 0 holds a verdict of
    ex = _at(g, vmpl1, [op.store(DATA, 8, 2), op.hlt()], core=0)
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.VMPL


def test_the_host_cannot_give_vmpl1_a_page_rmpupdate_leaves_it_nothing() -> None:
    """The host's attack: re-assign the page VMPL0 kept from VMPL1 (same ASID and GPA) hoping for fresh
    permissions.  RMPUPDATE gives VMPL0 everything, VMPL1-3 nothing, and clears Validated: VMPL1 still
    cannot touch it (the guest sees #VC 0x404 until VMPL0 validates it again)."""
    g = Guest(validate_all=True)
    vmpl0, vmpl1 = g.vmcb.vmsa_pa, _vmpl1_vmsa(g)
    assert _at(g, vmpl0, [op.rmpadjust(CODE_GPA, 0, 1 | (R | SX) << 8), op.hlt()]).code == ExitCode.HLT
    assert g.host.boot_cpu.rmpupdate_state(GUEST_SPA + DATA, RmpUpdateState(
        gpa=DATA, assigned=1, asid=ASID)) == RmpResult.SUCCESS
    e = g.rmp.entry(GUEST_SPA + DATA)
    assert e.perms[1:] == (0, 0, 0) and not e.validated
    got: list[Any] = []

    def at_vmpl1() -> Workload:
        try:
            yield op.store(DATA, 8, 0x66)
        except VmmCommunication as vc:
            got.append(vc.error_code)
        yield op.hlt()

    assert _at(g, vmpl1, at_vmpl1()).code == ExitCode.HLT and got == [VC_PAGE_NOT_VALIDATED]
    assert _at(g, vmpl0, [op.pvalidate(DATA, 0, True), op.hlt()]).code == ExitCode.HLT
    ex = _at(g, vmpl1, [op.store(DATA, 8, 0x66), op.hlt()])
    assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.VMPL


def test_contrast_an_sev_es_guest_on_the_same_host_is_not_checked() -> None:
    g = Guest()
    g.vmcb.sev_features = 0
    es_vmsa(g.soc, g.vmcb, spa=0x1D000)
    g.own(DATA, asid=OTHER)  # another guest's page, unvalidated: no RMP check without SNP
    assert g.run(_ops([op.load(DATA, 8), op.hlt()])).code == ExitCode.HLT


# ---- the Unicorn engine: the same checks on its TLB fill path ------------------------------------------
_CODE = 0x1000
_PVALIDATE = bytes.fromhex("f20f01ff")


def _uc_guest(pvalidate: bool, nested_cache: bool = False) -> tuple[Guest, Any]:
    from sevemu.abi.vmsa import SevEsSaveArea
    from sevemu.hw.ucengine import UcEngine
    from sevemu.hw.x86.state import InitialState

    g = Guest()
    code = (bytes.fromhex("b800500000" "31c9" "ba01000000") + (_PVALIDATE if pvalidate else b"\x90" * 4)
            + bytes.fromhex("8b1d00500000" "f4"))
    g.own(_CODE, validated=True)
    g.pt.gwrite(_CODE, code.ljust(PAGE, b"\xf4"))
    state = InitialState(rip=_CODE)
    eng = UcEngine(pool_pages=64, initial=state, nested_cache=nested_cache)
    state.apply(g.vmcb)
    values: dict[str, Any] = {}
    for name, seg in g.vmcb.segments.items():
        values.update({f"{name}_selector": seg.selector, f"{name}_attrib": seg.attrib,
                       f"{name}_limit": seg.limit, f"{name}_base": seg.base})
    values.update(efer=g.vmcb.efer, cr0=g.vmcb.cr0, cr3=0, cr4=0, rflags=g.vmcb.rflags, rip=_CODE, sev_features=1)
    g.soc.cache.write(ASID, True, g.vmcb.vmsa_pa, SevEsSaveArea(**values).encode())
    g.soc.cache.flush_range(ASID, True, g.vmcb.vmsa_pa, PAGE)
    return g, eng


def test_unicorn_pvalidate_then_load_runs_and_an_unvalidated_load_is_vc() -> None:
    g, eng = _uc_guest(pvalidate=True)
    g.own(DATA)
    try:
        assert g.soc.boot_cpu.vmrun(g.vmcb, eng).code == ExitCode.HLT
        assert g.rmp.entry(GUEST_SPA + DATA).validated
    finally:
        eng.close()
    g, eng = _uc_guest(pvalidate=False)
    g.own(DATA)
    try:  # no IDT: the #VC the load takes becomes a triple fault
        assert g.soc.boot_cpu.vmrun(g.vmcb, eng).code == ExitCode.SHUTDOWN
        assert eng.crash is not None and "#VC" in eng.crash and "error code 0x404" in eng.crash
        assert "RIP 0x1010" in eng.crash  # the load, after the four NOPs
    finally:
        eng.close()


def test_unicorn_a_page_of_another_guest_is_npf_with_the_rmp_bit() -> None:
    g, eng = _uc_guest(pvalidate=False)
    g.own(DATA, validated=True, asid=OTHER)
    try:
        ex = g.soc.boot_cpu.vmrun(g.vmcb, eng)
        assert ex.code == ExitCode.NPF and ex.info1 & NpfExitInfo1.RMP and ex.info2 == DATA
    finally:
        eng.close()


def test_rmp_instructions_ignore_the_page_offset_and_refuse_only_a_misaligned_2m_request() -> None:
    """edk2's SevSnpIsVmpl0 runs RMPADJUST on a byte array at an address that is not page aligned and
    takes any nonzero EAX for "not at VMPL0" (OVMF 2025.02 then terminates in SEC); RAX names the
    page, its bits 11:0 are ignored.  A 2 MiB request with bits 20:12 set is FAIL_INPUT."""
    g = Guest(validate_all=True)
    got = []

    def work() -> Workload:
        got.append((yield op.rmpadjust(DATA + 0x14, 0, 1 | R << 8)))
        got.append((yield op.pvalidate(DATA + 0x7FF, 0, False)))  # rescinds DATA's page
        got.append((yield op.pvalidate(HUGE_GPA + 0x1000, 1, True)))
        got.append((yield op.rmpadjust(HUGE_GPA + 0x1000, 1, 1)))
        yield op.hlt()

    assert g.run(work()).code == ExitCode.HLT
    assert got == [(0, False), (0, False), (RmpResult.FAIL_INPUT, False), (RmpResult.FAIL_INPUT, False)]
    e = g.rmp.entry(GUEST_SPA + DATA)
    assert not e.validated and e.perms[1] == R


# ---- PVALIDATE on the Unicorn engine: the caching walker, and retired inside Unicorn ----------------------
# (hw/uc/exits.py pvalidate_in_place: validate at VMPL0 in the current RMP epoch retires inside the
# invalid-instruction hook; everything else stops and takes the precise path)
def _pv(rax: int, ecx: int, edx: int) -> bytes:
    """mov eax, RAX; mov ecx, ECX; mov edx, EDX; pvalidate (32-bit code)."""
    return (b"\xb8" + rax.to_bytes(4, "little") + b"\xb9" + ecx.to_bytes(4, "little") + b"\xba"
            + edx.to_bytes(4, "little") + _PVALIDATE)


def _uc_pvalidates(calls: list[tuple[int, int, int]], setup: Any, nested_cache: bool, in_place: bool,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """Run up to two PVALIDATEs (their EAX to ESI / EDI, their CF to EBP / EBX as 0 or -1) and HLT on
    the Unicorn engine, with or without its caching walker, with the in-place path on or off; what the
    guest and the RMP saw."""
    from sevemu.hw.svm import GPRS
    from sevemu.hw.uc import exits

    monkeypatch.undo()
    if not in_place:
        monkeypatch.setattr(exits, "pvalidate_in_place", lambda *args: False)
    g, eng = _uc_guest(pvalidate=False, nested_cache=nested_cache)
    code = b""
    for (rax, ecx, edx), keep in zip(calls, (b"\x89\xc6\x19\xed", b"\x89\xc7\x19\xdb"), strict=False):
        code += _pv(rax, ecx, edx) + keep  # mov esi/edi, eax; sbb ebp/ebx, ebp/ebx
    g.pt.gwrite(_CODE, (code + b"\xf4").ljust(PAGE, b"\xf4"))
    setup(g)
    try:
        ex = g.soc.boot_cpu.vmrun(g.vmcb, eng)
        regs = {n: eng.vals[GPRS.index(n)] & 0xFFFFFFFF for n in ("rsi", "rbp", "rdi", "rbx")}
        pages = {gpa: g.rmp.entry(GUEST_SPA + gpa) for gpa in (DATA, 0x200000)}
        return (ex.code, ex.info1 if ex.code == ExitCode.NPF else None, regs, pages, eng.crash, eng.stats.pvalidates,
                eng.walker is not None, eng.stats.pvalidates_in_place)
    finally:
        eng.close()
        monkeypatch.undo()


_SCENARIOS = {
    # validate, then again: EAX 0 with CF 0, then EAX 0 with CF 1 -- both retired inside Unicorn
    "validate twice": ([(DATA, 0, 1), (DATA + 0x7FF, 0, 1)], lambda g: g.own(DATA), 2),
    # 2 MiB request on a 4 KiB entry: FAIL_SIZEMISMATCH; not 2 MiB aligned: FAIL_INPUT (CF 0 both)
    "2M on a 4K entry, misaligned 2M": ([(0x200000, 1, 1), (0x201000, 1, 1)], lambda g: g.own(0x200000), 2),
    # a rescind may take an access away (TLB flushes): the stop-and-exit path
    "validate then rescind": ([(DATA, 0, 1), (DATA, 0, 0)], lambda g: g.own(DATA), 1),
    # another guest's page: #VMEXIT(NPF) with the RMP bit, from the precise path, nothing changed
    "another guest's page": ([(DATA, 0, 1)], lambda g: g.own(DATA, asid=OTHER), 0),
    # beyond the NPT: #VMEXIT(NPF) of the operand's walk, from the precise path
    "unmapped operand": ([(0x3F_0000_0000 & 0xFFFFFFFF | 0x8000_0000, 0, 1)], lambda g: g.own(DATA), 0),
}


def _check_scenario(name: str, out: tuple[Any, ...]) -> None:
    if name == "validate twice":
        assert out[0] == ExitCode.HLT and out[2] == {"rsi": 0, "rbp": 0, "rdi": 0, "rbx": 0xFFFFFFFF}
        assert out[3][DATA].validated
    elif name.startswith("2M"):
        assert out[2] == {"rsi": RmpResult.FAIL_SIZEMISMATCH, "rbp": 0, "rdi": RmpResult.FAIL_INPUT, "rbx": 0}
        assert not out[3][0x200000].validated
    elif name == "validate then rescind":
        assert out[0] == ExitCode.HLT and not out[3][DATA].validated and out[5] == 2
    else:
        assert out[0] == ExitCode.NPF and not out[3][DATA].validated
        if name == "another guest's page":
            assert out[1] & NpfExitInfo1.RMP


@pytest.mark.parametrize("name", list(_SCENARIOS))
def test_unicorn_pvalidate_answers_alike_with_the_caching_walker(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the guest sees (EAX, rFLAGS.CF, the exit) and the RMP are the same whether PVALIDATE's
    operand is walked by the engine's caching walker or by the vCPU's plain walk (both on the
    precise stop-and-exit path)."""
    calls, setup, _ = _SCENARIOS[name]
    cached = _uc_pvalidates(calls, setup, True, False, monkeypatch)
    plain = _uc_pvalidates(calls, setup, False, False, monkeypatch)
    assert cached[:6] == plain[:6] and cached[6] and not plain[6]
    _check_scenario(name, cached)


@pytest.mark.parametrize("nested_cache", [True, False])
@pytest.mark.parametrize("name", list(_SCENARIOS))
def test_unicorn_pvalidate_in_place_answers_as_the_stop_and_exit_path(name: str, nested_cache: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What the guest sees (EAX, rFLAGS.CF, the exit) and the RMP are the same whether the PVALIDATE is
    retired inside Unicorn's invalid-instruction hook or by stopping and taking the exit path; the
    unusual cases (a rescind, a faulting RMP entry, a faulting walk) are left to the latter."""
    calls, setup, in_place_count = _SCENARIOS[name]
    fast = _uc_pvalidates(calls, setup, nested_cache, True, monkeypatch)
    slow = _uc_pvalidates(calls, setup, nested_cache, False, monkeypatch)
    assert fast[:5] == slow[:5]
    assert fast[5] == slow[5] and fast[7] == in_place_count and slow[7] == 0
    _check_scenario(name, fast)


def test_unicorn_pvalidate_in_place_then_the_page_is_usable_and_a_rescinded_one_is_not() -> None:
    """After an in-place PVALIDATE the guest's load of the page runs (no stop); after the precise
    path's rescind the next load is #VC 0x404 again (the engine's TLB dropped the page)."""
    g, eng = _uc_guest(pvalidate=False)
    code = (_pv(DATA, 0, 1) + bytes.fromhex("8b1d00500000")  # load: validated
            + _pv(DATA, 0, 0) + bytes.fromhex("8b1d00500000") + b"\xf4")  # rescind; load: #VC
    g.pt.gwrite(_CODE, code.ljust(PAGE, b"\xf4"))
    g.own(DATA)
    try:
        assert g.soc.boot_cpu.vmrun(g.vmcb, eng).code == ExitCode.SHUTDOWN  # no IDT: the #VC is a triple fault
        assert eng.crash is not None and "error code 0x404" in eng.crash
        assert eng.stats.pvalidates == 2 and eng.stats.pvalidates_in_place == 1
    finally:
        eng.close()


# ---- PVALIDATE retired in C (csrc/uc_accel.c PvHook): the same as the Python hook ------------------------
_LOOP_START = 0x10_0000
_PAGE_STATES = ("new", "validated", "other guest", "wrong GPA", "hypervisor")


def _pv_loop(n: int) -> bytes:
    """32-bit code: PVALIDATE (validate, 4 KiB) of ``n`` pages from _LOOP_START in a loop, each EAX and
    CF (as 0 / -1) stored to DATA + 8i; then HLT."""
    head = (b"\xbe" + _LOOP_START.to_bytes(4, "little") + b"\xbf" + (_LOOP_START + n * PAGE).to_bytes(4, "little")
            + b"\xbb" + DATA.to_bytes(4, "little"))
    body = (bytes.fromhex("89f0" "31c9" "ba01000000") + _PVALIDATE
            + bytes.fromhex("8903" "19d2" "895304" "83c308" "81c600100000" "39fe"))
    return head + body + b"\x72" + (-(len(body) + 2) & 0xFF).to_bytes(1, "little") + b"\xf4"


class _SnoopLog:
    """A plain cache agent that holds nothing and records every snoop."""

    def __init__(self) -> None:
        self.log: list[tuple[int, int, bool, bool]] = []

    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        self.log.append((lo, hi, invalidate, data is None))

    def snoop_fill(self, key: int) -> None:
        pass

    def rmp_lines(self, rmp: Rmp) -> list[tuple[int, int, bool, bool]]:
        """The snoops about lines of the RMP's table."""
        return [s for s in self.log if rmp.base <= s[0] <= rmp.end]


def _run_pv_loop(states: list[str], use_c: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    from sevemu.hw.uc.engine import UcEngine

    calls = [0]
    python_hook = UcEngine._on_invalid

    def counted(self: Any, h: Any, user: Any) -> bool:
        calls[0] += 1
        return python_hook(self, h, user)

    monkeypatch.setattr(UcEngine, "_on_invalid", counted)
    g, eng = _uc_guest(pvalidate=False, nested_cache=True)
    eng.use_c_pvalidate = use_c
    g.pt.gwrite(_CODE, _pv_loop(len(states)).ljust(PAGE, b"\xf4"))
    g.own(DATA, validated=True)
    for i, state in enumerate(states):
        gpa = _LOOP_START + i * PAGE
        if state == "new":
            g.own(gpa)
        elif state == "validated":
            g.own(gpa, validated=True)
        elif state == "other guest":
            g.own(gpa, asid=OTHER)
        elif state == "wrong GPA":
            g.own(gpa, at=gpa + PAGE)
    snoops = _SnoopLog()
    g.soc.cache.attach(snoops)  # (a plain agent: each RMP entry write's CLFLUSH snoops it)
    try:
        ex = g.soc.boot_cpu.vmrun(g.vmcb, eng)
        results = g.pt.gread(DATA, 8 * len(states))
        entries = [g.rmp.raw_entry(GUEST_SPA + _LOOP_START + i * PAGE) for i in range(len(states))]
        table = g.soc.dram.read(g.rmp.base, g.rmp.end + 1 - g.rmp.base)
        return (ex.code, ex.info1 if ex.code == ExitCode.NPF else None, eng.crash, results, entries, table,
                sorted(g.soc.cache.dirty), g.rmp.epoch, eng.stats.pvalidates, eng.stats.pvalidates_in_place,
                snoops.rmp_lines(g.rmp), calls[0])
    finally:
        eng.close()
        monkeypatch.undo()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(states=st.lists(st.sampled_from(_PAGE_STATES), min_size=1, max_size=20))
@example(states=["new"] * 8 + ["validated"] * 3 + ["new"] * 4 + ["other guest"])
@example(states=["new", "validated", "new", "wrong GPA"])
@example(states=["new", "new", "hypervisor", "new"])
def test_unicorn_pvalidate_in_c_answers_as_the_python_hook(states: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest validating pages in a loop: the results it stores (EAX, CF), the exit (HLT, or the
    #VMEXIT(NPF) of a page that is not its own at that GPA), the RMP's entries and its whole table in
    DRAM, the cache's dirty lines, the RMP epoch, the counters and the snoops of the table's lines (the
    CLFLUSH before each entry write) are the same whether the C hook
    retires the loop's PVALIDATEs once armed or every one goes through the Python hook; and the C hook
    did retire them (the Python hook saw only the first of each VMRUN and the faults)."""
    from sevemu.hw.uc import accel

    if not accel.PV_ENABLED:
        pytest.skip("the C extension sevemu.hw.uc._uc_accel is not built with PvHook")
    fast = _run_pv_loop(states, True, monkeypatch)
    slow = _run_pv_loop(states, False, monkeypatch)
    assert fast[:11] == slow[:11]
    done = next((i for i, s in enumerate(states) if s not in ("new", "validated")), len(states))
    assert slow[11] == slow[8] == done + (done < len(states))
    assert len(fast[10]) == states[:done].count("new")  # (one CLFLUSH of its entry's line per page validated)
    if done >= 2:
        assert fast[11] < slow[11]  # (the C hook retired all but the first and the faulting one)
    assert fast[0] == (ExitCode.HLT if done == len(states) else ExitCode.NPF)
    for i in range(done):
        eax, cf = int.from_bytes(fast[3][8 * i : 8 * i + 4], "little"), fast[3][8 * i + 4 : 8 * i + 8]
        assert eax == 0 and cf == (b"\xff" * 4 if states[i] == "validated" else bytes(4))
        assert fast[4][i].validated
