"""Cores: VMRUN consistency checks, the ASID-tagged TLB, TLB_CONTROL, the guest memory port."""

from __future__ import annotations

import dataclasses

import pytest
from hwkit import GUEST_SPA, MEM_ACCEL_MODES, US, FnEngine, P, PageTables, es_vmsa, make_soc, mem_accel

from sevemu._util.units import PAGE
from sevemu.abi.paging import ExitCode
from sevemu.abi.paging import NpfExitInfo1 as N
from sevemu.errors import AddressError
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import PageFault
from sevemu.hw.profiles import MILAN
from sevemu.hw.soc import Soc
from sevemu.hw.svm import TlbControl, Vmcb

GVA = 0x40_0000_0000


def _halt(cpu: GuestCpu) -> None:
    return None


@pytest.mark.parametrize("change", [
    {"asid": 0},
    {"np_enable": False},
    {"asid": MILAN.max_asid + 1},
    {"sev_es_enable": True},  # ASID 200 is not an SEV-ES ASID on Milan (ES: 1..99)
    {"asid": 50},  # an ES ASID used by a non-ES SEV guest
    {"asid": 201},  # no key loaded for it
])
def test_vmrun_consistency_checks(soc: Soc, change: dict[str, object]) -> None:
    soc.psp.take_ports().keys.load(200, bytes(16))
    vmcb = dataclasses.replace(Vmcb(asid=200, np_enable=True, sev_enable=True), **change)
    eng = FnEngine(_halt)
    ex = soc.boot_cpu.vmrun(vmcb, eng)
    assert ex.code == ExitCode.INVALID
    assert vmcb.exit_code == ExitCode.INVALID
    assert eng.cpu is None  # the guest never ran


def test_vmrun_accepts_valid_guests(soc: Soc) -> None:
    keys = soc.psp.take_ports().keys
    keys.load(200, bytes(16))
    keys.load(5, bytes(16))
    es = Vmcb(asid=5, sev_enable=True, sev_es_enable=True)
    es_vmsa(soc, es)
    for vmcb in (Vmcb(asid=200, sev_enable=True),
                 es,
                 Vmcb(asid=MILAN.max_asid + 7),  # plain guest: no key needed
                 Vmcb(asid=3, np_enable=False)):  # plain guest without nested paging
        eng = FnEngine(_halt)
        assert soc.boot_cpu.vmrun(vmcb, eng).code == ExitCode.HLT
        assert eng.cpu is not None and vmcb.exit_code == ExitCode.HLT


def test_guest_port_load_store_read_write(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.guest_map(GVA + 0x1000, 0x9000)

    def body(cpu: GuestCpu) -> object:
        cpu.store(GVA + 8, 8, 0x1122334455667788)
        cpu.store(GVA + 0x3C, 8, 0xAABBCCDDEEFF0011)  # crosses a line
        cpu.store(GVA + 0xFFC, 8, 0x0102030405060708)  # crosses a page
        cpu.write(GVA + 0x100, b"hello")
        return (cpu.load(GVA + 8, 8), cpu.load(GVA + 8, 2), cpu.load(GVA + 0x3C, 8),
                cpu.load(GVA + 0xFFC, 8), cpu.read(GVA + 0x100, 5))

    vmcb = pt.vmcb()
    eng = FnEngine(body)
    assert pt.soc.boot_cpu.vmrun(vmcb, eng).code == ExitCode.HLT
    assert eng.result == (0x1122334455667788, 0x7788, 0xAABBCCDDEEFF0011, 0x0102030405060708, b"hello")
    assert pt.gread(0x5FFC, 4) + pt.gread(0x9000, 4) == (0x0102030405060708).to_bytes(8, "little")


def test_tlb_is_tagged_by_asid(soc: Soc) -> None:
    keys = soc.psp.take_ports().keys
    guests = []
    for asid, spa_base, pool in ((200, GUEST_SPA, 0x100000), (201, GUEST_SPA + 0x800000, 0x200000)):
        keys.load(asid, bytes([asid]) * 16)
        pt = PageTables(soc, asid, True, npt_pool=pool)
        for gpa in range(0, 0x100000, 0x1000):
            pt.npt_map(gpa, spa_base + gpa)
        pt.guest_map(GVA, 0x5000)
        pt.gwrite(0x5000, f"I am ASID {asid}".encode())
        guests.append(pt)
    core = soc.boot_cpu
    for _ in range(2):
        for pt in guests:
            eng = FnEngine(lambda cpu: cpu.read(GVA, 13))
            core.vmrun(pt.vmcb(), eng)
            assert eng.result == f"I am ASID {pt.asid}".encode()
    assert sorted(core.tlb.asids()) == [200, 201]
    assert core.tlb.misses == 2  # one walk per ASID; the second round hit each one's own entry


def test_tlb_control_and_stale_translations(sev_tables: PageTables) -> None:
    pt = sev_tables
    core = pt.soc.boot_cpu
    pt.guest_map(GVA, 0x5000)
    pt.gwrite(0x5000, b"old page")
    pt.gwrite(0x6000, b"new page")
    vmcb = pt.vmcb()

    def read(v: Vmcb) -> object:
        eng = FnEngine(lambda cpu: cpu.read(GVA, 8))
        core.vmrun(v, eng)
        return eng.result

    assert read(vmcb) == b"old page"
    pt.guest_map(GVA, 0x6000)  # the guest's tables change; the TLB still has the old entry
    assert read(vmcb) == b"old page"
    vmcb.tlb_control = TlbControl.FLUSH_ASID
    assert read(vmcb) == b"new page"
    assert vmcb.tlb_control == TlbControl.DO_NOTHING  # consumed by VMRUN
    # FLUSH_ALL drops every ASID's entries
    core.tlb.for_asid(999)[1] = (0, 0, 0)
    vmcb.tlb_control = TlbControl.FLUSH_ALL
    read(vmcb)
    assert core.tlb.asids() == [200]


def test_cr3_write_and_invlpg_flush_the_asids_translations(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.gwrite(0x5000, b"AAAA")
    pt.gwrite(0x6000, b"BBBB")

    def body(cpu: GuestCpu) -> object:
        first = cpu.read(GVA, 4)
        pt.guest_map(GVA, 0x6000)
        stale = cpu.read(GVA, 4)
        cpu.invlpg(GVA)
        fresh = cpu.read(GVA, 4)
        pt.guest_map(GVA, 0x5000)
        cpu.write_cr3(cpu.vmcb.cr3)
        return first, stale, fresh, cpu.read(GVA, 4)

    eng = FnEngine(body)
    pt.soc.boot_cpu.vmrun(pt.vmcb(), eng)
    assert eng.result == (b"AAAA", b"AAAA", b"BBBB", b"AAAA")


def test_a_faulting_multi_page_write_changes_nothing(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.guest_map(GVA + 0x1000, 0x6000)
    pt.guest_map(GVA + 0x2000, 0x7000, flags=P)  # read-only for the guest
    pt.gwrite(0x5000, bytes(0x2000))
    pt.npt_map(0x6000, GUEST_SPA + 0x6000, flags=P | US)  # read-only for the hypervisor
    core = pt.soc.boot_cpu
    vmcb = pt.vmcb()
    # NPF on the second page: nothing written on the first
    ex = core.vmrun(vmcb, FnEngine(lambda cpu: cpu.write(GVA + 0xF00, b"\xee" * 0x200)))
    assert ex.code == ExitCode.NPF
    assert ex.info2 == 0x6000 and ex.info1 & N.W and ex.info1 & N.P
    assert pt.gread(0x5000, 0x1000) == bytes(0x1000)

    # #PF on the third page of a write: the guest sees the fault, the first two pages are intact
    pt.npt_map(0x6000, GUEST_SPA + 0x6000)
    vmcb.tlb_control = TlbControl.FLUSH_ASID

    def body(cpu: GuestCpu) -> object:
        try:
            cpu.write(GVA + 0x1F00, b"\xdd" * 0x200)
        except PageFault as pf:
            return pf.error_code, pf.address
        return None

    eng = FnEngine(body)
    assert core.vmrun(vmcb, eng).code == ExitCode.HLT
    assert eng.result == (0x3, GVA + 0x2000)
    assert pt.gread(0x5000, 0x2000) == bytes(0x2000)


def test_fetch_is_private_even_from_a_shared_page(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, c=False)
    pt.gwrite(0x5000, b"private code", c=True)
    pt.gwrite(0x5000, b"shared data!", c=False)
    eng = FnEngine(lambda cpu: (cpu.fetch(GVA, 12), cpu.read(GVA, 12)))
    pt.soc.boot_cpu.vmrun(pt.vmcb(), eng)
    assert eng.result == (b"private code", b"shared data!")


def test_host_accesses_are_range_checked(soc: Soc) -> None:
    core = soc.boot_cpu
    with pytest.raises(AddressError):
        core.host_read(soc.dram.size - 4, 8)
    with pytest.raises(AddressError):
        core.host_write(-8, b"x" * 8)
    with pytest.raises(AddressError):
        core.check_spa(soc.dram.size)
    assert soc.mc.dram.populated_pages == 0 and list(soc.cache.resident()) == []


def test_npf_from_the_engine_becomes_a_vmexit(soc: Soc) -> None:
    soc.psp.take_ports().keys.load(200, bytes(16))
    pt = PageTables(soc, 200, True)  # an empty NPT
    vmcb = pt.vmcb(paging=False)
    ex = soc.boot_cpu.vmrun(vmcb, FnEngine(lambda cpu: cpu.store(0x3008, 8, 1)))
    assert ex.code == ExitCode.NPF
    assert (vmcb.exit_info1, vmcb.exit_info2) == (N.U | N.W | N.GUEST_FINAL | N.ENC, 0x3008)


def test_wbinvd_counts_per_core() -> None:
    s = make_soc(cores=3)
    s.cache.write(0, False, 0x1000, b"x")
    assert s.wbinvd_all() == 1
    assert [c.wbinvd_count for c in s.cores] == [1, 1, 1]
    assert s.cache.flush_epoch == 3


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
def test_host_read_stream_into_is_host_read_stream(soc: Soc, accel: bool) -> None:
    """The streaming read into a reused buffer gives host_read_stream's bytes: DRAM with the host's
    dirty cached lines in place (some cached, some only in DRAM, unaligned ends) -- the dirty lines
    found in C (resident_keys over the dirty set) or in Python."""
    with mem_accel(accel):
        _stream_reads_see_dirty_lines(soc)


def _stream_reads_see_dirty_lines(soc: Soc) -> None:
    core = soc.boot_cpu
    base = 0x20_0000
    core.host_write_stream(base, bytes(range(256)) * 64)  # 16 KiB straight to DRAM
    core.host_write(base + 0x1040, b"dirty line in the cache" + bytes(41))  # a dirty cached line
    core.host_write(base + 0x3FC0, b"\xAA" * 64)
    for spa, length in ((base, 0x4000), (base + 0x1013, 0x2FAD), (base + 0x1040, 64)):
        out = bytearray(length + 8)
        core.host_read_stream_into(spa, memoryview(out)[4 : 4 + length])
        assert bytes(out[4 : 4 + length]) == core.host_read_stream(spa, length)
        assert out[:4] == out[-4:] == bytes(4)  # nothing outside the view written
    assert b"dirty line" not in core.mc.dram.read(base + 0x1040, 64)  # (only in the cache: overlaid)
    assert b"dirty line" in core.host_read_stream(base + 0x1040, 64)


def _pages_in_c(monkeypatch: pytest.MonkeyPatch, in_c: bool) -> None:
    from sevemu.hw import memaccel

    if in_c and not memaccel.COLUMNS:
        pytest.skip("the C helpers were not built")
    monkeypatch.setattr(memaccel, "COLUMNS", in_c)


@pytest.mark.parametrize("in_c", [True, False])
def test_host_read_stream_pages_are_what_host_read_stream_returns(soc: Soc, monkeypatch: pytest.MonkeyPatch, in_c: bool) -> None:
    """DRAM's own pages of a page-aligned range (no copy) only when they hold what the streaming read
    returns: a dirty cached host line over the range, a page never written, an unaligned range or
    a VMCB view over it give None (the caller copies instead).  The pages listed in C
    (``dram_page_list``) or in Python."""
    _pages_in_c(monkeypatch, in_c)
    core = soc.boot_cpu
    base = 0x20_0000
    data = bytes(range(256)) * 48  # 3 pages
    core.host_write_stream(base, data)
    pages = core.host_read_stream_pages(base, 3 * PAGE)
    assert pages is not None and len(pages) == 3 and all(len(p) == PAGE for p in pages)
    assert b"".join(pages) == core.host_read_stream(base, 3 * PAGE) == data
    assert core.host_read_stream_pages(base + PAGE, PAGE) == [data[PAGE : 2 * PAGE]]
    core.host_write(base + 0x1040, b"dirty line in the cache" + bytes(41))  # only in the cache
    assert core.host_read_stream_pages(base, 3 * PAGE) is None
    assert core.host_read_stream_pages(base + 2 * PAGE, PAGE) is not None  # (the dirty line is not in it)
    assert core.host_read_stream_pages(base + 3 * PAGE, PAGE) is None  # never written: reads as zeros
    assert core.host_read_stream_pages(base + 0x40, PAGE) is None  # not whole pages
    assert core.host_read_stream_pages(base, 0) is None
    with pytest.raises(AddressError):
        core.host_read_stream_pages(soc.dram.size - PAGE, 2 * PAGE)


@pytest.mark.parametrize("in_c", [True, False])
def test_host_write_stream_pages_is_host_write_stream(soc: Soc, monkeypatch: pytest.MonkeyPatch, in_c: bool) -> None:
    """Bytes written in place into the pages handed over leave the memory host_write_stream of them
    leaves: a dirty host line of the range written back, then overwritten (it does not come back
    later over the new bytes), a page never written created; nothing is handed over for an unaligned
    range or one outside DRAM.  The pages stored and listed in C (``dram_page_list``) or in Python."""
    _pages_in_c(monkeypatch, in_c)
    data = bytes((i * 7 + 3) & 0xFF for i in range(3 * PAGE))  # 3 pages
    results = []
    got: list[int] = []
    for in_place in (False, True):
        s = make_soc()
        core = s.boot_cpu
        base = 0x30_0000
        core.host_write_stream(base, b"\x11" * PAGE)  # the first page stored; the others never written
        core.host_write(base + 0x80, b"dirty" + bytes(59))  # a dirty cached line over it
        if in_place:

            def fill(pages: list[bytearray]) -> None:
                got.append(len(pages))
                for i, page in enumerate(pages):
                    page[:] = data[i * PAGE : (i + 1) * PAGE]

            core.host_write_stream_pages(base, 3 * PAGE, fill)
            assert got == [3]
        else:
            core.host_write_stream(base, data)
        assert core.host_read(base, 3 * PAGE) == data
        results.append((core.mc.dram.read(base, 3 * PAGE), sorted(s.cache.dirty)))
        core.wbinvd()
        assert core.mc.dram.read(base, 3 * PAGE) == data  # (no stale line written back over it)
    assert results[0] == results[1]
    core = soc.boot_cpu
    for spa, length in ((0x40_0040, PAGE), (0x40_0000, 0), (soc.dram.size - PAGE, 2 * PAGE)):
        with pytest.raises(AddressError):
            core.host_write_stream_pages(spa, length, lambda pages: pytest.fail("handed pages over"))


def test_host_clear_pages_zeroes_memory_and_drops_the_hosts_lines(soc: Soc) -> None:
    """The host's clearing of pages it hands out: a dirty cached line of the range does not survive
    (no later write-back over the zeros), every page reads zeros and is stored in DRAM."""
    core = soc.boot_cpu
    base = 0x40_0000
    core.host_write_stream(base, b"\x5a" * (2 * PAGE))
    core.host_write(base + 0x80, b"dirty" + bytes(59))  # dirty in the cache only
    before = core.mc.dram.populated_pages
    core.host_clear_pages(base, 3 * PAGE)  # the third page was never written
    assert core.mc.dram.populated_pages == before + 1
    assert core.host_read(base, 3 * PAGE) == bytes(3 * PAGE)
    core.wbinvd()
    assert core.mc.dram.read(base, 3 * PAGE) == bytes(3 * PAGE)
