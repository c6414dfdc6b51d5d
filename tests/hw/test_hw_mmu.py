"""Page walks: guest 4-level walk with the C-bit, nested walk, #PF error codes, #NPF EXITINFO."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hwkit import GUEST_SPA, NX, PS, RW, US, A, D, P, PageTables, make_soc

from sevemu.abi.paging import NpfExitInfo1 as N
from sevemu.abi.paging import PfErrorCode as E
from sevemu.hw.cache import Cache, key_domain
from sevemu.hw.faults import NestedPageFault, PageFault
from sevemu.hw.profiles import MILAN, NAPLES
from sevemu.hw.soc import Soc

MiB = 1 << 20
GVA = 0x7F12_3456_7000  # uses all four table levels with distinct indices


@contextmanager
def recorded_domains(cache: Cache) -> Iterator[list[tuple[int, bool, int]]]:
    """Record (asid, c, spa) of every cache lookup made inside the block."""
    seen: list[tuple[int, bool, int]] = []
    orig = cache.line

    def line(key: int) -> bytearray:
        seen.append(key_domain(key))
        return orig(key)

    cache.line = line  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del cache.line


def _plain(soc: Soc) -> PageTables:
    pt = PageTables(soc, MILAN.max_asid + 1, False)
    pt.identity()
    return pt


# ---- successful walks ----------------------------------------------------------------------------


def test_four_level_walk_of_a_4k_page(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    t = pt.translate(GVA + 0x123)
    assert (t.gpa, t.spa) == (0x5123, GUEST_SPA + 0x5000)
    assert (t.data_asid, t.data_c, t.fetch_asid, t.fetch_c) == (200, True, 200, True)
    assert t.writable and t.executable


def test_2mib_guest_page(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(0x4000_0000, 0x200000, large=True)
    t = pt.translate(0x4000_0000 + 0x12345)
    assert t.gpa == 0x212345
    assert t.spa == GUEST_SPA + 0x212000


def test_2mib_nested_page(soc: Soc) -> None:
    soc.psp.take_ports().keys.load(200, bytes(16))
    pt = PageTables(soc, 200, True)
    pt.npt_map(0, 0x2000000, large=True)  # GPA [0, 2 MiB) -> SPA 32 MiB, one PDE
    pt.guest_map(0x1000, 0x1ab000)
    t = pt.translate(0x1008)
    assert t.gpa == 0x1ab008
    assert t.spa == 0x2000000 + 0x1ab000


def test_accessed_and_dirty_bits_are_set_in_guest_entries(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.translate(GVA)
    leaf = int.from_bytes(pt.gread(pt.guest_entry_gpa(GVA, 12), 8), "little")
    assert leaf & A and not leaf & D
    pt.translate(GVA, write=True)
    for shift in (39, 30, 21):
        assert int.from_bytes(pt.gread(pt.guest_entry_gpa(GVA, shift), 8), "little") & A
    assert int.from_bytes(pt.gread(pt.guest_entry_gpa(GVA, 12), 8), "little") & D


# ---- guest #PF ---------------------------------------------------------------------------------------


def _pf(pt: PageTables, gva: int, **kw: bool) -> int:
    with pytest.raises(PageFault) as ei:
        pt.translate(gva, **kw)
    assert ei.value.address == gva
    return ei.value.error_code


def test_pf_not_present(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    other = GVA + 0x1000  # same tables, leaf empty
    assert _pf(pt, other) == 0
    assert _pf(pt, other, write=True) == E.W
    assert _pf(pt, other, fetch=True) == E.FETCH
    assert _pf(pt, 0x1234_0000_0000) == 0  # missing at PML4 level


def test_pf_write_to_read_only(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, flags=P)
    pt.translate(GVA)  # reads are fine
    assert _pf(pt, GVA, write=True) == E.P | E.W
    leaf = int.from_bytes(pt.gread(pt.guest_entry_gpa(GVA, 12), 8), "little")
    assert not leaf & D  # a faulting write sets no Dirty bit


def test_pf_nx_fetch(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, flags=P | RW | NX)
    t = pt.translate(GVA)
    assert not t.executable
    assert _pf(pt, GVA, fetch=True) == E.P | E.FETCH


def test_pf_reserved_bit(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000 | (1 << 49))  # above MAXPHYADDR (48 on Milan), not the C-bit
    assert _pf(pt, GVA) == E.P | E.RSVD
    assert _pf(pt, GVA, write=True) == E.P | E.W | E.RSVD


def test_c_bit_is_a_reserved_bit_for_a_plain_guest(soc: Soc) -> None:
    pt = _plain(soc)
    pt.guest_map(GVA, 0x5000, c=True)
    assert _pf(pt, GVA) == E.P | E.RSVD
    pt.guest_map(GVA, 0x5000, c=False)
    assert pt.translate(GVA).gpa == 0x5000


def test_reduced_physical_address_bits_are_reserved(sev_tables: PageTables) -> None:
    """Reference 4.1: with memory encryption on, EBX[11:6] address bits are lost and become reserved."""
    pt = sev_tables
    reduced = MILAN.phys_addr_bits - MILAN.pa_reduction  # bit 43 on Milan
    pt.guest_map(GVA, 0x5000 | (1 << reduced))
    assert _pf(pt, GVA) == E.P | E.RSVD


# ---- #NPF --------------------------------------------------------------------------------------------


def _npf(pt: PageTables, gva: int, **kw: bool) -> NestedPageFault:
    with pytest.raises(NestedPageFault) as ei:
        pt.translate(gva, **kw)
    return ei.value


def test_npf_on_the_final_access(soc: Soc) -> None:
    soc.psp.take_ports().keys.load(200, bytes(16))
    pt = PageTables(soc, 200, True)
    pt.npt_map(0x80000, GUEST_SPA + 0x80000)  # the guest-table pool only
    for g in range(0x80000, 0x90000, 0x1000):
        pt.npt_map(g, GUEST_SPA + g)
    pt.guest_map(GVA, 0x5000)  # private data page, not backed
    pt.guest_map(GVA + 0x1000, 0x6000, c=False)  # shared data page, not backed
    f = _npf(pt, GVA + 0x10)
    assert f.gpa == 0x5010
    assert f.exit_info1 == N.U | N.GUEST_FINAL | N.ENC
    assert _npf(pt, GVA, write=True).exit_info1 == N.U | N.W | N.GUEST_FINAL | N.ENC
    assert _npf(pt, GVA, fetch=True).exit_info1 == N.U | N.FETCH | N.GUEST_FINAL | N.ENC
    shared = _npf(pt, GVA + 0x1000, write=True)
    assert shared.exit_info1 == N.U | N.W | N.GUEST_FINAL  # effective C-bit 0: no ENC
    assert shared.gpa == 0x6000
    # an instruction fetch is private whatever the PTE says
    assert _npf(pt, GVA + 0x1000, fetch=True).exit_info1 & N.ENC


def test_npf_during_the_guest_walk(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pd_entry = pt.guest_entry_gpa(GVA, 12)  # the page table's GPA
    pt.cache.write(0, False, pt.npt_leaf_spa(pd_entry), bytes(8))  # hypervisor unmaps it
    f = _npf(pt, GVA, write=True)
    assert f.gpa == pd_entry
    # a table walk: GUEST_PAGE, private (ENC) for SEV, a read (no W)
    assert f.exit_info1 == N.U | N.GUEST_PAGE | N.ENC


def test_npf_protection_faults(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000)
    pt.npt_map(0x5000, GUEST_SPA + 0x5000, flags=P | US)  # read-only for the guest
    assert pt.translate(GVA).gpa == 0x5000
    f = _npf(pt, GVA, write=True)
    assert f.exit_info1 == N.P | N.W | N.U | N.GUEST_FINAL | N.ENC
    assert f.gpa == 0x5000
    pt.npt_map(0x5000, GUEST_SPA + 0x5000, flags=P | RW | US | NX)
    assert _npf(pt, GVA, fetch=True).exit_info1 == N.P | N.U | N.FETCH | N.GUEST_FINAL | N.ENC
    pt.npt_map(0x5000, GUEST_SPA + 0x5000 | (1 << 49))
    assert _npf(pt, GVA).exit_info1 == N.P | N.RSVD | N.U | N.GUEST_FINAL | N.ENC


def test_plain_guest_npf_has_no_enc_bit(soc: Soc) -> None:
    pt = PageTables(soc, MILAN.max_asid + 1, False)
    for g in range(0x80000, 0x90000, 0x1000):
        pt.npt_map(g, GUEST_SPA + g)
    pt.guest_map(GVA, 0x5000, c=False)
    assert _npf(pt, GVA).exit_info1 == N.U | N.GUEST_FINAL
    assert _npf(pt, GVA, fetch=True).exit_info1 == N.U | N.FETCH | N.GUEST_FINAL


# ---- encryption domains ------------------------------------------------------------------------------


def test_sev_guest_table_walks_are_always_private(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, table_c=False)  # table pointers without the C-bit
    gpt = {pt.spa(g) & ~0xFFF for g in range(0x80000, 0x90000, 0x1000)}
    with recorded_domains(pt.cache) as seen:
        t = pt.translate(GVA)
    assert t.gpa == 0x5000
    table_reads = [(a, c) for a, c, spa in seen if spa & ~0xFFF in gpt]
    assert len(table_reads) >= 4
    assert set(table_reads) == {(200, True)}
    npt_reads = {(a, c) for a, c, spa in seen if spa & ~0xFFF not in gpt}
    assert npt_reads == {(0, False)}  # NPT tables: host memory, host domain


@pytest.mark.parametrize("leaf_c,npt_c,expected", [
    (True, False, (200, True)),
    (True, True, (200, True)),
    (False, True, (0, True)),
    (False, False, (0, False)),
])
def test_data_domain_follows_the_pte_c_bit_and_table_15_31(
        sev_tables: PageTables, leaf_c: bool, npt_c: bool, expected: tuple[int, bool]) -> None:
    pt = sev_tables
    pt.npt_map(0x5000, GUEST_SPA + 0x5000, c=npt_c)
    pt.guest_map(GVA, 0x5000, c=leaf_c)
    t = pt.translate(GVA)
    assert (t.data_asid, t.data_c) == expected
    assert (t.fetch_asid, t.fetch_c) == (200, True)  # instruction fetches: always private


def test_paging_off_sev_accesses_are_private(sev_tables: PageTables) -> None:
    t = sev_tables.translate(0x5008, paging=False)
    assert (t.gpa, t.spa) == (0x5008, GUEST_SPA + 0x5000)
    assert (t.data_asid, t.data_c, t.fetch_asid, t.fetch_c) == (200, True, 200, True)


def test_plain_guest_domains_follow_the_npt_only(soc: Soc) -> None:
    pt = _plain(soc)
    pt.guest_map(GVA, 0x5000, c=False)
    t = pt.translate(GVA)
    assert (t.data_asid, t.data_c, t.fetch_asid, t.fetch_c) == (0, False, 0, False)
    pt.npt_map(0x5000, GUEST_SPA + 0x5000, c=True)
    t = pt.translate(GVA)
    assert (t.data_asid, t.data_c) == (0, True)  # host (SME) key


def test_naples_c_bit_position(soc: Soc) -> None:
    """The C-bit position comes from the profile (47 on Naples): the same walk with bit 47."""
    s = make_soc(NAPLES)
    s.psp.take_ports().keys.load(3, bytes(16))
    pt = PageTables(s, 3, True)
    pt.identity(1 * MiB)
    pt.guest_map(GVA, 0x5000)
    assert pt.cbit == 1 << 47
    t = pt.translate(GVA)
    assert (t.gpa, t.data_asid, t.data_c) == (0x5000, 3, True)


def test_npt_and_guest_bits_never_leak_into_addresses(sev_tables: PageTables) -> None:
    pt = sev_tables
    pt.guest_map(GVA, 0x5000, flags=P | RW | US | A | D)
    t = pt.translate(GVA + 0xFFF)
    assert t.gpa == 0x5FFF and t.spa == GUEST_SPA + 0x5000
    assert not t.spa & PS
