"""RMPUPDATE of a run of 4 KiB pages in one operation (``Rmp.rmpupdate_run``, the host port's
``rmpupdate_run``) against one RMPUPDATE per page in order: the same result, the same pages done, and
the same table, per-ASID counts, epoch and cached verdicts, on random tables with failing pages
(Immutable, in use, inside an assigned 2 MiB page, beyond the covered memory, a GPA above bit 50)."""

from __future__ import annotations

import pytest
from hwkit import make_soc
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.errors import HardwareError
from sevemu.hw.faults import NestedPageFault
from sevemu.hw.rmp import Rmp, RmpFirmwarePort
from sevemu.hw.soc import Soc

PAGE = 0x1000
ASID = 5
_BASE = 0x0200_0000  # 2 MiB aligned: three 2 MiB regions from here
_SPAN = 3 * 512


def _snp() -> tuple[Soc, Rmp, RmpFirmwarePort]:
    soc = make_soc()
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | int(SysCfg.SNP_EN))
    assert soc.rmp is not None
    port = RmpFirmwarePort(soc.rmp)
    port.initialize()
    return soc, soc.rmp, port


_A = _snp()
_B = _snp()

_KINDS = st.sampled_from(["assigned", "other-asid", "immutable", "shared-imm", "huge", "shared-huge", "in-use",
                          "cached", "validated"])


def _setup(rmp: Rmp, port: RmpFirmwarePort, marks: list[tuple[int, str]], base: int) -> None:
    port.initialize()
    rmp._in_use.clear()
    rmp._cached.clear()
    rmp.epoch = 0  # (the two tables' histories differ: their epochs are compared from here)
    for i, kind in marks:
        spa = base + i * PAGE
        if kind in ("huge", "shared-huge"):
            spa &= ~(0x20_0000 - 1)
            port.set(spa, assigned=kind == "huge", immutable=False, asid=ASID if kind == "huge" else 0,
                     gpa=spa - base if kind == "huge" else 0, huge=True)
        elif kind == "in-use":
            rmp.mark_in_use([spa])
        elif kind == "cached":
            rmp._cached.add(spa >> 12)
        elif kind == "shared-imm":
            port.set(spa, assigned=False, immutable=True)
        else:
            port.set(spa, assigned=True, immutable=kind == "immutable", asid=7 if kind == "other-asid" else ASID,
                     gpa=i * PAGE, validated=kind == "validated")


def _state(rmp: Rmp, base: int) -> tuple[object, ...]:
    entries = tuple(rmp._raw((base >> 12) + i) for i in range(-512, _SPAN + 512) if (base >> 12) + i >= 0)
    return entries, dict(rmp._asid_pages), rmp.epoch, frozenset(rmp._cached)


def _per_page(rmp: Rmp, spa: int, pages: int, new: RmpUpdateState) -> tuple[int, RmpResult]:
    for i in range(pages):
        step = RmpUpdateState(gpa=new.gpa + i * PAGE, assigned=1, asid=new.asid,
                              immutable=new.immutable) if new.assigned else new
        rc = rmp.rmpupdate(spa + i * PAGE, step)
        if rc != RmpResult.SUCCESS:
            return i, rc
    return pages, RmpResult.SUCCESS


@settings(max_examples=150, deadline=None)
@given(marks=st.lists(st.tuples(st.integers(0, _SPAN - 1), _KINDS), max_size=6),
       start=st.integers(0, _SPAN - 1), pages=st.integers(0, 700), assign=st.booleans(),
       asid=st.sampled_from([ASID, 7]), gpa=st.sampled_from([0, 0x10_0000, (1 << 51) - 3 * PAGE]),
       immutable=st.booleans())
def test_a_run_answers_and_writes_as_rmpupdate_page_by_page(marks: list[tuple[int, str]], start: int, pages: int,
                                                            assign: bool, asid: int, gpa: int,
                                                            immutable: bool) -> None:
    new = RmpUpdateState(gpa=gpa, assigned=1, asid=asid, immutable=int(immutable)) if assign else RmpUpdateState()
    spa = _BASE + start * PAGE
    (_, a, pa), (_, b, pb) = _A, _B
    _setup(a, pa, marks, _BASE)
    _setup(b, pb, marks, _BASE)
    assert _state(a, _BASE) == _state(b, _BASE)
    expected = _per_page(a, spa, pages, new)
    got = b.rmpupdate_run(spa, pages, new)
    assert got == expected
    assert _state(a, _BASE) == _state(b, _BASE)


@pytest.mark.parametrize("new", [RmpUpdateState(gpa=0x1000, assigned=1, asid=ASID), RmpUpdateState(),
                                 RmpUpdateState(gpa=0x1800, assigned=1, asid=ASID),
                                 RmpUpdateState(asid=ASID), RmpUpdateState(assigned=1, asid=0x10_000)])
def test_a_run_at_the_end_of_covered_memory_and_bad_states(new: RmpUpdateState) -> None:
    """Pages beyond the covered memory fail as RMPUPDATE fails them (FAIL_INPUT, the run stopping
    there); a state RMPUPDATE refuses fails the run's first page."""
    (_, a, pa), (_, b, pb) = _A, _B
    pa.initialize()
    pb.initialize()
    covered = a.covered
    spa = _BASE + 5 * PAGE
    a._covered = b._covered = spa + 3 * PAGE  # (the table's own pages end DRAM: an ordinary end here)
    try:
        expected = _per_page(a, spa, 8, new)
        assert b.rmpupdate_run(spa, 8, new) == expected
    finally:
        a._covered = b._covered = covered
    assert expected[1] == RmpResult.FAIL_INPUT
    assert expected[0] == (3 if new in (RmpUpdateState(gpa=0x1000, assigned=1, asid=ASID), RmpUpdateState()) else 0)
    assert _state(a, _BASE) == _state(b, _BASE)


def test_the_host_port_runs_it_and_is_undefined_without_snp_en() -> None:
    soc, rmp, port = _A
    port.initialize()
    host = soc.host_view()
    done, rc = host.boot_cpu.rmpupdate_run(_BASE, 4, RmpUpdateState(gpa=0x4000, assigned=1, asid=ASID))
    assert (done, rc) == (4, RmpResult.SUCCESS)
    assert [rmp.entry(_BASE + i * PAGE).gpa for i in range(4)] == [0x4000 + i * PAGE for i in range(4)]
    assert rmp.asid_pages(ASID) == 4
    bare = make_soc().host_view()
    with pytest.raises(HardwareError):
        bare.boot_cpu.rmpupdate_run(_BASE, 4, RmpUpdateState())


def _outcome(rmp: Rmp, args: tuple[int, int, int, bool, bool]) -> object:
    try:
        return rmp.pvalidate(*args)
    except NestedPageFault as f:
        return ("npf", f.exit_info1, f.gpa)


@settings(max_examples=200, deadline=None)
@given(marks=st.lists(st.tuples(st.integers(0, _SPAN - 1), _KINDS), max_size=6), page=st.integers(0, _SPAN - 1),
       gpa_off=st.sampled_from([0, 0, PAGE, 0x800]), huge=st.booleans(), validate=st.booleans(),
       asid=st.sampled_from([ASID, ASID, 7]))
def test_the_4k_validate_path_answers_and_writes_as_the_general_one(marks: list[tuple[int, str]], page: int,
                                                                    gpa_off: int, huge: bool, validate: bool,
                                                                    asid: int) -> None:
    """``Rmp.pvalidate``'s shortcut for setting Validated on a 4 KiB page gives the general path's EAX,
    CF, #NPF and table (the reference: the same call with the shortcut turned off)."""
    (_, a, pa), (_, b, pb) = _A, _B
    _setup(a, pa, marks, _BASE)
    _setup(b, pb, marks, _BASE)
    spa = _BASE + page * PAGE
    gpa = page * PAGE + gpa_off
    if huge:
        spa, gpa = spa & ~0x1F_FFFF, gpa & ~0x1F_FFFF
    args = (asid, gpa, spa, huge, validate)
    b._validate_4k = lambda *_: None  # type: ignore[method-assign]
    try:
        expected = _outcome(b, args)
    finally:
        del b._validate_4k
    assert _outcome(a, args) == expected
    assert _state(a, _BASE) == _state(b, _BASE)


def test_the_4k_validate_path_is_taken_and_sets_validated() -> None:
    _, rmp, port = _A
    _setup(rmp, port, [(3, "assigned")], _BASE)
    assert rmp._validate_4k(ASID, 3 * PAGE, _BASE + 3 * PAGE) == (0, False)
    assert rmp.entry(_BASE + 3 * PAGE).validated
    assert rmp._validate_4k(ASID, 3 * PAGE, _BASE + 3 * PAGE) == (0, True)
    assert rmp._validate_4k(ASID, 4 * PAGE, _BASE + 3 * PAGE) is None  # another GPA: the general path faults
