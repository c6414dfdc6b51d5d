"""The Python workload engine: restartable operations, #PF delivery, triple faults, exit registers."""

from __future__ import annotations

from typing import Any

import pytest
from hwkit import GUEST_SPA, PageTables, es_vmsa

from sevemu.abi.paging import ExitCode
from sevemu.hw.faults import GeneralProtection, PageFault
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hw.soc import Soc
from sevemu.hw.svm import Vmcb, VmExit


def _resume(v: Vmcb) -> None:
    v.rip = v.next_rip


def _run(pt: PageTables, eng: PyEngine, vmcb: Vmcb) -> VmExit:
    if pt.sev:
        pt.bind(eng.identity)  # the workload is the guest's measured code
    return pt.soc.boot_cpu.vmrun(vmcb, eng)


def test_operation_restarts_after_npf(soc: Soc) -> None:
    soc.psp.take_ports().keys.load(200, bytes(16))
    pt = PageTables(soc, 200, True)
    got: list[Any] = []

    def work() -> Workload:
        yield op.store(0x3008, 8, 0xFEEDFACE)
        got.append((yield op.load(0x3008, 8)))
        yield op.hlt()

    eng = PyEngine(work())
    vmcb = pt.vmcb(paging=False)
    ex = _run(pt, eng, vmcb)
    assert (ex.code, ex.info2) == (ExitCode.NPF, 0x3008)
    assert (eng.ops, vmcb.rip) == (0, 0)
    ex = _run(pt, eng, vmcb)  # nothing fixed yet: the same fault again
    assert (ex.code, ex.info2) == (ExitCode.NPF, 0x3008)
    pt.npt_map(0x3000, GUEST_SPA + 0x3000)
    assert _run(pt, eng, vmcb).code == ExitCode.HLT
    assert got == [0xFEEDFACE]
    assert eng.ops == 2 and vmcb.rip == 2 and vmcb.next_rip == 3
    assert pt.gread(0x3008, 8) == (0xFEEDFACE).to_bytes(8, "little")


def test_page_fault_is_thrown_into_the_workload(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(0x10000, 0x5000, flags=1)  # read-only
    seen: list[tuple[int, int]] = []

    def work() -> Workload:
        try:
            yield op.store(0x10010, 4, 1)
        except PageFault as pf:
            seen.append((pf.error_code, pf.address))
        try:
            yield op.write_cr(8, 0)
        except GeneralProtection:
            seen.append((-1, -1))
        yield op.hlt()

    eng = PyEngine(work())
    assert _run(pt, eng, pt.vmcb()).code == ExitCode.HLT
    assert seen == [(0x3, 0x10010), (-1, -1)]
    assert eng.crash is None


def test_unhandled_exception_is_a_triple_fault(sev_tables: PageTables) -> None:
    pt = sev_tables

    def work() -> Workload:
        yield op.load(0x7000_0000, 8)  # not mapped in the guest's (empty) tables
        yield op.hlt()

    pt.guest_map(0x1000, 0x1000)
    eng = PyEngine(work())
    vmcb = pt.vmcb()
    assert _run(pt, eng, vmcb).code == ExitCode.SHUTDOWN
    assert eng.crash is not None and eng.crash.startswith("PageFault")
    assert _run(pt, eng, vmcb).code == ExitCode.SHUTDOWN  # stays dead

    def buggy() -> Workload:
        yield op.hlt()
        raise RuntimeError("guest kernel bug")

    eng = PyEngine(buggy())
    assert _run(pt, eng, vmcb).code == ExitCode.HLT
    assert _run(pt, eng, vmcb).code == ExitCode.SHUTDOWN
    assert eng.crash == "RuntimeError: guest kernel bug"


def test_finished_workload_halts(sev_tables: PageTables) -> None:
    def work() -> Workload:
        yield op.store(0x100, 1, 1)

    eng = PyEngine(work())
    vmcb = sev_tables.vmcb(paging=False)
    for _ in range(2):
        assert _run(sev_tables, eng, vmcb).code == ExitCode.HLT
        assert eng.finished and eng.crash is None and eng.ops == 1


def test_intercepted_operations_and_their_registers(sev_tables: PageTables) -> None:
    pt = sev_tables
    got: dict[str, Any] = {}

    def work() -> Workload:
        yield op.out(0x3F8, 0x141, 1)
        got["in"] = yield op.inp(0x3FD, 2)
        got["cpuid"] = yield op.cpuid(0x8000001F, 3)
        got["rdmsr"] = yield op.rdmsr(0xC0010010)
        yield op.wrmsr(0xC0010130, 0x1234_5678_9ABC_DEF0)
        got["vmmcall"] = yield op.vmmcall(rax=12, rbx=0x5000, rcx=1, rdx=0)
        got["out32"] = yield op.out(0x80, 0xDEADBEEF, 4)
        yield op.hlt()

    eng = PyEngine(work())
    vmcb = pt.vmcb(paging=False)
    r = vmcb.regs

    ex = _run(pt, eng, vmcb)  # OUT: RAX = value, EXITINFO1 = port << 16 | SZ8 | OUT
    assert (ex.code, ex.info1, r["rax"]) == (ExitCode.IOIO, 0x3F8 << 16 | 1 << 4, 0x41)
    assert vmcb.next_rip == vmcb.rip + 1
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)  # IN: type bit set, SZ16
    assert (ex.code, ex.info1) == (ExitCode.IOIO, 0x3FD << 16 | 1 << 5 | 1)
    r["rax"] = 0xFFFF_0060
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)  # CPUID: leaf in RAX, subleaf in RCX
    assert got["in"] == 0x0060
    assert (ex.code, r["rax"], r["rcx"]) == (ExitCode.CPUID, 0x8000001F, 3)
    r.update(rax=1 << 40 | 0xA, rbx=0xB, rcx=0xC, rdx=0xD)
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)  # RDMSR: EXITINFO1 0, MSR in RCX
    assert got["cpuid"] == (0xA, 0xB, 0xC, 0xD)
    assert (ex.code, ex.info1, r["rcx"]) == (ExitCode.MSR, 0, 0xC0010010)
    r.update(rax=0x1111_2222, rdx=0x3333_4444)
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)  # WRMSR: EXITINFO1 1, value split EDX:EAX
    assert got["rdmsr"] == 0x3333_4444_1111_2222
    assert (ex.code, ex.info1, r["rcx"], r["rdx"], r["rax"]) == (
        ExitCode.MSR, 1, 0xC0010130, 0x1234_5678, 0x9ABC_DEF0)
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)  # VMMCALL: registers as given, result in RAX
    assert ex.code == ExitCode.VMMCALL
    assert (r["rax"], r["rbx"], r["rcx"], r["rdx"]) == (12, 0x5000, 1, 0)
    r["rax"] = 0
    _resume(vmcb)
    ex = _run(pt, eng, vmcb)
    assert got["vmmcall"] == 0
    assert (ex.info1, r["rax"]) == (0x80 << 16 | 1 << 6, 0xDEADBEEF)
    _resume(vmcb)
    assert _run(pt, eng, vmcb).code == ExitCode.HLT
    assert got["out32"] is None


def test_impossible_port_io_is_a_guest_fault(sev_tables: PageTables) -> None:
    seen: list[str] = []

    def work() -> Workload:
        for bad in (op.out(0x3F8, 1, 3), op.inp(0x10000), op.out(-1, 0)):
            try:
                yield bad
            except GeneralProtection as gp:
                seen.append(str(gp))
        yield op.hlt()

    vmcb = sev_tables.vmcb(paging=False)
    vmcb.regs["rax"] = 0x1234
    assert _run(sev_tables, PyEngine(work()), vmcb).code == ExitCode.HLT
    assert len(seen) == 3 and vmcb.regs["rax"] == 0x1234  # nothing reached the registers


@pytest.mark.parametrize("sev,es,expected", [(True, False, 1), (True, True, 3), (False, False, 0)])
def test_sev_status_is_read_without_an_exit(soc: Soc, sev: bool, es: bool, expected: int) -> None:
    asid = 5 if es else (200 if sev else 600)
    if sev:
        soc.psp.take_ports().keys.load(asid, bytes(16))
    pt = PageTables(soc, asid, sev)
    got: list[int] = []

    def work() -> Workload:
        got.append((yield op.rdmsr(0xC0010131)))
        yield op.hlt()

    vmcb = pt.vmcb(paging=False)
    vmcb.sev_es_enable = es
    if es:
        es_vmsa(soc, vmcb)
    ex = _run(pt, PyEngine(work()), vmcb)
    assert ex.code == ExitCode.HLT
    assert got == [expected]


def test_memory_maintenance_operations(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(0x10000, 0x5000)
    dram = pt.soc.dram

    def work() -> Workload:
        yield op.write(0x10000, b"guest data, 16 B")
        yield op.clflush(0x10000)
        yield op.store(0x10040, 8, 7)
        yield op.wbinvd()
        data = yield op.fetch(0x10000, 16)
        assert data == b"guest data, 16 B"
        yield op.invlpg(0x10000)
        yield op.write_cr(4, 0x20)
        yield op.hlt()

    eng = PyEngine(work())
    vmcb = pt.vmcb()
    assert _run(pt, eng, vmcb).code == ExitCode.HLT, eng.crash
    raw = dram.read(GUEST_SPA + 0x5000, 0x80)
    assert raw[:16] != b"guest data, 16 B" and any(raw[:16]) and any(raw[0x40:0x48])
    assert pt.soc.cache.flush_epoch == 1 and vmcb.cr4 == 0x20
