"""The Unicorn engine's translation caches (hw/uc/walk.py): the same answers as a walk, no stale
translation after the guest changes its page tables, faults never cached."""

from __future__ import annotations

import pytest
from hwkit import GUEST_SPA, RW, P, PageTables, identity_tables

from sevemu.abi.paging import ExitCode
from sevemu.hw.faults import PageFault
from sevemu.hw.uc.walk import NestedCachingMmu
from sevemu.hw.ucengine import InitialState, UcEngine
from sevemu.hypervisor.vm import VmKind
from sevemu.scenario import build_machine

GVA = 0x7F12_3456_7000


def _walker(pt: PageTables) -> NestedCachingMmu:
    return NestedCachingMmu(pt.soc.cache, pt.soc.profile)


def _translate(mmu: NestedCachingMmu, pt: PageTables, gva: int, **kw: bool) -> object:
    return mmu.translate(asid=pt.asid, sev=pt.sev, ncr3=pt.ncr3, paging=True, cr3=pt.cr3, gva=gva,
                         write=kw.get("write", False), fetch=kw.get("fetch", False))


def test_cached_translation_equals_the_walk(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.guest_map(GVA + 0x1000, 0x6000, c=False)
    mmu = _walker(pt)
    for gva in (GVA + 0x123, GVA + 0x1FF8, GVA + 0x1008):
        for kind in ({}, {"write": True}, {"fetch": True}):
            first = _translate(mmu, pt, gva, **kind)
            hits = mmu.tlb_hits
            assert _translate(mmu, pt, gva, **kind) == first == pt.translate(gva, **kind)
            assert mmu.tlb_hits == hits + 1
    # another offset in a cached page: the same page, its own offset
    t = _translate(mmu, pt, GVA + 0x456)
    assert t == pt.translate(GVA + 0x456) and t.gpa == 0x5456  # type: ignore[attr-defined]


def test_a_fault_is_never_cached(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, flags=P)  # read-only
    mmu = _walker(pt)
    with pytest.raises(PageFault):
        _translate(mmu, pt, GVA, write=True)
    pt.guest_map(GVA, 0x5000, flags=P | RW)
    assert _translate(mmu, pt, GVA, write=True) == pt.translate(GVA, write=True)


def test_written_table_pages_drop_or_bypass_the_cache(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    mmu = _walker(pt)
    _translate(mmu, pt, GVA)
    leaf_table = pt.spa(pt.guest_entry_gpa(GVA, 12)) & ~0xFFF
    assert leaf_table in mmu.table_pages
    mmu.table_written(GUEST_SPA + 0x9000)  # not a table page: the cache stays
    hits = mmu.tlb_hits
    _translate(mmu, pt, GVA)
    assert mmu.tlb_hits == hits + 1
    mmu.table_written(leaf_table)  # the guest may now change the entry: every translation goes
    assert not mmu.table_pages
    pt.guest_map(GVA, 0x6000)
    assert _translate(mmu, pt, GVA).gpa == 0x6000  # type: ignore[attr-defined]
    # while a table page is writable, its walks are not cached at all
    mmu.table_writable = lambda spa: spa == leaf_table
    mmu.flush()
    _translate(mmu, pt, GVA)
    hits = mmu.tlb_hits
    pt.guest_map(GVA, 0x7000)
    assert _translate(mmu, pt, GVA).gpa == 0x7000 and mmu.tlb_hits == hits  # type: ignore[attr-defined]


def test_a_2m_guest_leaf_answers_every_page_of_its_region_as_the_walk(sev_tables: PageTables) -> None:
    """The guest 2 MiB-leaf cache: another page of a region walked before needs no guest table read,
    gives the walk's answer (C-bit and permissions of the leaf, the NPT's page), and goes with the
    translations when a table page it was walked through becomes writable."""
    pt = sev_tables
    region = 0x7F12_3440_0000
    pt.guest_map(region, 0x200000, large=True)
    mmu = _walker(pt)
    for kind in ({}, {"fetch": True}):  # (each access kind walks once)
        assert _translate(mmu, pt, region + 0x3123, **kind) == pt.translate(region + 0x3123, **kind)
    reads = 0
    read = pt.soc.cache.read

    def counting(*args: object, **kw: object) -> bytes:
        nonlocal reads
        reads += 1
        return read(*args, **kw)  # type: ignore[arg-type]

    pt.soc.cache.read = counting  # type: ignore[method-assign]
    try:
        for off in (0x5008, 0x1FF000, 0x42000):
            for kind in ({}, {"fetch": True}):
                reads = 0
                got = _translate(mmu, pt, region + off, **kind)
                assert reads <= 1  # the final NPT entry at most: no guest table read
                assert got == pt.translate(region + off, **kind)
    finally:
        del pt.soc.cache.read
    pde_table = pt.spa(pt.guest_entry_gpa(region, 21)) & ~0xFFF
    mmu.table_written(pde_table)  # the guest may now rewrite the 2 MiB entry
    pt.guest_map(region, 0, large=True, c=False)
    assert _translate(mmu, pt, region + 0x5008) == pt.translate(region + 0x5008)
    t = _translate(mmu, pt, region + 0x5008)
    assert t.gpa == 0x5008 and not t.data_c  # type: ignore[attr-defined]


def test_the_npt_page_table_cache_reads_the_entry_and_never_caches_a_fault(sev_tables: PageTables) -> None:
    """The NPT page-table cache keeps the upper levels of a region's nested walk: a page of the region
    mapped after the table was cached is seen, an absent one still faults, and a changed entry is seen
    once the hypervisor flushes (as with any cached nested translation)."""
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.guest_map(GVA + 0x1000, 0x3FF000)  # (the identity map covers 4 MiB: 0x3FF000 is backed)
    mmu = _walker(pt)
    assert _translate(mmu, pt, GVA) == pt.translate(GVA)
    # a page of the same NPT region the hypervisor maps only now: walked through the cached table
    gpa = 0x1F0000
    assert (pt.ncr3, gpa >> 21) in mmu._npt_tables
    pt.npt_map(gpa, GUEST_SPA + 0x7000)
    pt.guest_map(GVA + 0x2000, gpa)
    assert _translate(mmu, pt, GVA + 0x2000) == pt.translate(GVA + 0x2000)
    assert _translate(mmu, pt, GVA + 0x2000).spa == GUEST_SPA + 0x7000  # type: ignore[attr-defined]
    # an absent NPT entry: the full walk's #NPF, every time
    pt._npt_write(pt.npt_leaf_spa(0x1E0000), 0)
    pt.guest_map(GVA + 0x3000, 0x1E0000)
    from sevemu.hw.faults import NestedPageFault

    for _ in range(2):
        with pytest.raises(NestedPageFault):
            _translate(mmu, pt, GVA + 0x3000)
    # a remapped entry: seen after the flush the hypervisor asks for (TLB_CONTROL)
    pt.npt_map(0x5000, GUEST_SPA + 0x8000)
    mmu.flush()
    assert _translate(mmu, pt, GVA).spa == GUEST_SPA + 0x8000  # type: ignore[attr-defined]


def test_an_instructions_operand_walk_answers_as_the_walk_and_keeps_no_translation(sev_tables: PageTables) -> None:
    """``operand`` (PVALIDATE's operand): the GPA and SPA of a read as :meth:`translate` gives them, from
    the 2 MiB-leaf and NPT page-table caches where they hold the region, else walked (faults raised, as
    the walk's); it keeps no whole or nested translation of the page."""
    from sevemu.hw.faults import NestedPageFault

    pt = sev_tables
    region = 0x7E00_0020_0000
    pt.guest_map(region, 0x200000, large=True)  # a 2 MiB guest leaf over 4 KiB NPT leaves
    pt.guest_map(GVA, 0x5000)
    pt.guest_map(GVA + 0x1000, 0x6000, c=False)
    mmu = _walker(pt)

    def operand(gva: int, paging: bool = True) -> tuple[int, int]:
        return mmu.operand(pt.asid, pt.sev, pt.ncr3, paging, pt.cr3, gva)

    def walk(gva: int) -> tuple[int, int]:
        t = pt.translate(gva)
        return t.gpa, t.spa

    for gva in (region + 0x3123, region + 0x1FF008, GVA + 0x10, GVA + 0x1FF8):  # first: walked
        assert operand(gva) == walk(gva)
    tlb, nested = len(mmu._tlb), len(mmu._nested)
    for off in range(0x4000, 0x1F0000, 0x21000):  # the rest of the region: from the caches, nothing kept
        assert operand(region + off) == walk(region + off)
    assert (len(mmu._tlb), len(mmu._nested)) == (tlb, nested)
    # paging off: GVA = GPA, private
    assert operand(0x5123, paging=False) == (0x5123, GUEST_SPA + 0x5000)
    # the region's NPT entries are kept until the hypervisor flushes (TLB_CONTROL), as a TLB keeps them:
    # a removed entry then gives the walk's #NPF, every time; a remapped one its new page
    pt._npt_write(pt.npt_leaf_spa(0x201000), 0)
    pt.npt_map(0x202000, GUEST_SPA + 0x7000)
    mmu.flush()
    for _ in range(2):
        with pytest.raises(NestedPageFault):
            operand(region + 0x1000)
    assert operand(region + 0x2010) == walk(region + 0x2010) == (0x202010, GUEST_SPA + 0x7000)
    # an entry the hypervisor adds (no flush needed: an entry absent from the kept table is walked again)
    assert operand(region + 0x3000) == walk(region + 0x3000) and (pt.ncr3, 0x200000 >> 21) in mmu._operand_tables
    pt.npt_map(0x201000, GUEST_SPA + 0x8000)
    assert operand(region + 0x1000) == walk(region + 0x1000) == (0x201000, GUEST_SPA + 0x8000)
    # an unmapped guest address: the walk's #PF
    with pytest.raises(PageFault):
        operand(GVA + 0x200000)


# ---- on real code: a guest remaps a page, INVLPGs, and reads it again ------------------------------
# B: read 0x120000 (r8); PTE of 0x120000 += 0x1000 (a first write to the table page); invlpg; read (r9); hlt
# A: the table page is writable already: read 0x121000 (r10); its PTE += 0x1000 (no TLB fill for the
#    write); invlpg; read again (r11); hlt
REMAP = bytes.fromhex(
    "488b0425000012004989c0488b0c25003911004881c10010000048890c25003911000f013c2500001200488b042500"
    "0012004989c1f4488b0c250839110048890c2508391100488b0425001012004989c24881c10010000048890c250839"
    "11000f013c2500101200488b0425001012004989c3f4")
BASE = 0x100000


def _remap_image(cbit: int | None) -> bytes:
    img = bytearray(0x30000)
    img[0 : len(REMAP)] = REMAP
    identity_tables(img, BASE, cbit)
    for n, page in enumerate((0x120000, 0x121000, 0x122000)):
        img[page - BASE : page - BASE + 8] = bytes([0x41 + n]) * 8  # AAAAAAAA, BBBBBBBB, CCCCCCCC
    return bytes(img)


@pytest.mark.parametrize("nested_cache", [False, True])
@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_guest_page_table_changes_are_seen_after_invlpg(kind: VmKind, nested_cache: bool) -> None:
    m = build_machine("milan", seed="uc-walk", dram_size=1 << 30, cache_size=256 << 10)
    image = _remap_image(m.profile.cbit if kind is VmKind.SEV else None)
    vm = m.hv.create_vm("t", 16 << 20, kind)
    m.hv.launch(vm, [(BASE, image)])
    state = InitialState(rip=BASE, mode="long64", cr3=0x110000, rsp=0x12F000)
    eng = UcEngine(pool_pages=256, initial=state, nested_cache=nested_cache)
    state.apply(vm.add_vcpu(eng).vmcb)
    seen = []
    for _ in range(2):
        while (r := m.hv.run(vm)).reason == "intr":
            pass
        assert r.reason == "hlt", vm.crash_reason
        seen.append(vm.vcpus[0].vmcb.regs)
    regs = seen[-1]
    a, b, c = (int.from_bytes(bytes([x]) * 8, "little") for x in b"ABC")
    assert (regs["r8"], regs["r9"]) == (a, b)  # the remap after a fresh write grant of the table page
    assert (regs["r10"], regs["r11"]) == (b, c)  # the remap through a table page already writable
    assert eng.stats.by_code.get(ExitCode.HLT) == 2


# movq $0x1111,0x120000; CR0.CD = 1 (mov %cr0,%rax; bts $30,%rax; mov %rax,%cr0);
# mov 0x121000,%rbx (a TLB fill); movq $0x2222,0x120000; hlt
CD_TOGGLE = bytes.fromhex("48c7042500001200111100000f20c0480fbae81e0f22c0488b1c250010120048c704250000120022220000f4")


@pytest.mark.parametrize("nested_cache", [False, True])
def test_a_write_after_a_cr0_cd_toggle_is_written_back(nested_cache: bool) -> None:
    """CR0.CD does not flush QEMU's TLB: the page written before it keeps its write permission in
    Unicorn, so the engine must keep comparing it at exits (its second write reaches the host)."""
    m = build_machine("milan", seed="uc-walk", dram_size=1 << 30, cache_size=256 << 10)
    image = bytearray(_remap_image(None))
    image[0 : len(CD_TOGGLE)] = CD_TOGGLE
    vm = m.hv.create_vm("t", 16 << 20, VmKind.PLAIN)
    m.hv.launch(vm, [(BASE, bytes(image))])
    state = InitialState(rip=BASE, mode="long64", cr3=0x110000, rsp=0x12F000)
    eng = UcEngine(pool_pages=256, initial=state, nested_cache=nested_cache)
    state.apply(vm.add_vcpu(eng).vmcb)
    while (r := m.hv.run(vm)).reason == "intr":
        pass
    assert r.reason == "hlt", vm.crash_reason
    assert vm.vcpus[0].vmcb.cr0 & (1 << 30)
    assert vm.host_read(0x120000, 8) == (0x2222).to_bytes(8, "little")


# movq $0x3333,0x120000 (a read-only page, CR0.WP clear); CR0.WP = 1 (mov %cr0,%rax; bts $16,%rax;
# mov %rax,%cr0); hlt; movq $0x4444,0x120000; hlt
WP_WRITES = bytes.fromhex("48c704250000120033330000" "0f20c0480fbae8100f22c0" "f4" "48c704250000120044440000" "f4")


@pytest.mark.parametrize("nested_cache", [False, True])
def test_cr0_wp_clear_lets_the_guest_write_its_read_only_pages(nested_cache: bool) -> None:
    """With CR0.WP clear a supervisor write ignores a read-only guest PTE (firmware editing page
    tables it mapped read-only: edk2's CpuDxe); once WP is set the same write is a #PF."""
    m = build_machine("milan", seed="uc-walk", dram_size=1 << 30, cache_size=256 << 10)
    image = bytearray(_remap_image(None))
    image[0 : len(WP_WRITES)] = WP_WRITES
    leaf = 0x113000 + 8 * (0x120000 >> 12) - BASE  # the PTE of 0x120000 in identity_tables' PT
    image[leaf : leaf + 8] = (0x120000 | 0x61).to_bytes(8, "little")  # P A D, not RW
    vm = m.hv.create_vm("t", 16 << 20, VmKind.PLAIN)
    m.hv.launch(vm, [(BASE, bytes(image))])
    state = InitialState(rip=BASE, mode="long64", cr3=0x110000, rsp=0x12F000)
    eng = UcEngine(pool_pages=256, initial=state, nested_cache=nested_cache)
    state.apply(vm.add_vcpu(eng).vmcb)
    assert not vm.vcpus[0].vmcb.cr0 & (1 << 16)
    while (r := m.hv.run(vm)).reason == "intr":
        pass
    assert r.reason == "hlt", vm.crash_reason
    assert vm.host_read(0x120000, 8) == (0x3333).to_bytes(8, "little")
    assert vm.vcpus[0].vmcb.cr0 & (1 << 16)
    while (r := m.hv.run(vm)).reason == "intr":
        pass
    assert r.exit is not None and r.exit.code == ExitCode.SHUTDOWN
    assert "#PF" in (vm.crash_reason or "")
    assert vm.host_read(0x120000, 8) == (0x3333).to_bytes(8, "little")
