"""A page-state change to private applied run by run (hypervisor/psc.py ``_private_range``, one
``rmpupdate_run`` per run of contiguous backing) against :func:`psc.set_page_state` page by page:
the same RMP entries, shared set, private set and error, with pages already private or shared, a page
the RMPUPDATE refuses (Immutable, in use) and a range running past the guest's memory."""

from __future__ import annotations

import pytest
from hvkit import launch_snp, snp_machine

from sevemu.abi.ghcb import PscOp
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hw.rmp import RmpFirmwarePort
from sevemu.hypervisor import psc
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine

PAGE = 0x1000
MEMORY = 4 << 20


@pytest.fixture(scope="module")
def m() -> Machine:
    return snp_machine("hv-psc-run")


def _vm(m: Machine, name: str, huge: bool) -> Vm:
    def work() -> Workload:
        yield op.hlt()

    return launch_snp(m, PyEngine(work()), name=name, memory=MEMORY, huge_pages=huge)


def _setup(m: Machine, vm: Vm, private: list[int], shared: list[int], bad: dict[int, str]) -> None:
    for gpa in private:
        psc.set_page_state(m.hv.sev, vm, gpa, True)
    for gpa in shared:
        psc.set_page_state(m.hv.sev, vm, gpa, False)
    assert m.soc.rmp is not None
    for gpa, kind in bad.items():
        spa = vm.back(gpa)
        if kind == "immutable":
            RmpFirmwarePort(m.soc.rmp).set(spa, assigned=False, immutable=True)
        else:
            m.soc.rmp.mark_in_use([spa])


def _view(m: Machine, vm: Vm, gpa: int, pages: int) -> tuple[object, ...]:
    entries = []
    for i in range(pages):
        page = gpa + i * PAGE
        if page >= vm.memory:
            break
        e = m.hv.soc.rmp_entry(vm.back(page))
        entries.append((e.assigned, e.validated, e.immutable, e.gpa, e.asid == vm.asid if e.assigned else None))
    private = sorted(g for g in range(0, vm.memory, PAGE) if vm.npt.lookup(g) in vm.private_spas)
    return tuple(entries), sorted(vm.shared_gpas), private


def _apply(m: Machine, vm: Vm, gpa: int, pages: int, batched: bool) -> tuple[int, str] | None:
    try:
        if batched:
            psc._apply_range(m.hv.sev, vm, gpa, pages, PscOp.PRIVATE)
        else:
            for i in range(pages):
                psc.set_page_state(m.hv.sev, vm, gpa + i * PAGE, True)
    except psc.PscError as e:
        return e.code, e.detail.replace(vm.name, "VM")
    return None


@pytest.mark.parametrize(("huge", "gpa", "pages", "private", "shared", "bad"), [
    (False, 0x100000, 64, [0x104000, 0x105000], [0x110000, 0x111000, 0x130000], {}),
    (False, 0x100000, 64, [0x104000], [0x110000, 0x118000, 0x120000], {0x118000: "immutable"}),
    (True, 0x200000, 600, [0x201000], [0x210000, 0x3FF000], {0x300000: "in-use"}),
    (False, MEMORY - 8 * PAGE, 16, [MEMORY - 6 * PAGE], [MEMORY - 3 * PAGE], {}),
    (True, 0x0, 512, [], [0x7000, 0x8000], {}),
])
def test_a_private_run_ends_as_page_by_page(m: Machine, huge: bool, gpa: int, pages: int, private: list[int],
                                            shared: list[int], bad: dict[int, str]) -> None:
    a = _vm(m, "psc-batched", huge)
    b = _vm(m, "psc-paged", huge)
    try:
        for vm in (a, b):
            _setup(m, vm, private, shared, bad)
        assert _view(m, a, gpa, pages) == _view(m, b, gpa, pages)
        got = _apply(m, a, gpa, pages, True)
        expected = _apply(m, b, gpa, pages, False)
        assert got == expected
        assert (expected is not None) == bool(bad or gpa + pages * PAGE > MEMORY)
        assert _view(m, a, gpa, pages) == _view(m, b, gpa, pages)
    finally:
        assert m.soc.rmp is not None
        for vm in (a, b):
            for g, kind in bad.items():
                m.soc.rmp.release([vm.back(g)])
                if kind == "immutable":
                    RmpFirmwarePort(m.soc.rmp).set(vm.back(g), assigned=False, immutable=False)
            m.hv.destroy(vm)
