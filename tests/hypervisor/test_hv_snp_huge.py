"""2 MiB pages end to end: the NPT's 2 MiB leaves (hypervisor/npt.py) walked by the SoC's nested walker,
KVM's launch of a 2 MiB-aligned stretch as one 2 MiB folio (one RMPUPDATE, one 2 MiB SNP_LAUNCH_UPDATE:
the same launch digest as 512 4 KiB pages), and KVM's answers to the size mismatches that follow
(Linux ``sev_handle_rmp_fault``): PSMASH for a 4 KiB request on a 2 MiB RMP page, an NPT split for a
2 MiB mapping over 4 KiB RMP entries, PSMASH + split before a 4 KiB page-state change inside a 2 MiB page."""

from __future__ import annotations

from typing import Any

import pytest
from hvkit import launch_snp, snp_machine

from sevemu._util.units import MiB
from sevemu.abi.paging import NpfExitInfo1
from sevemu.abi.rmp import RmpResult
from sevemu.firmware import sha_engine
from sevemu.firmware.snp import snp_state
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor import psc
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine

PAGE = 0x1000
HUGE = 0x20_0000
REGION = 0x40_0000  # a 2 MiB-aligned guest region the tests launch whole
PS = 1 << 7


@pytest.fixture(scope="module")
def m() -> Machine:
    return snp_machine("hv-snp-huge")


def _image() -> bytes:
    return b"".join(i.to_bytes(8, "little") * (PAGE // 8) for i in range(HUGE // PAGE))


def _idle() -> Workload:
    yield op.hlt()


def _pde(m: Machine, vm: Vm, gpa: int) -> int:
    pd = vm.npt._tables[(2, gpa >> 30)]
    return int.from_bytes(m.hv.soc.boot_cpu.host_read(pd + ((gpa >> 21) & 0x1FF) * 8, 8), "little")


def test_npt_2m_leaf_is_walked_and_split_keeps_every_page(m: Machine) -> None:
    vm = m.hv.create_vm("npt-huge", 16 * MiB)
    try:
        spa = vm.back_huge(REGION)
        assert spa is not None and spa % HUGE == 0
        assert _pde(m, vm, REGION) & PS and vm.npt.lookup(REGION + 0x1234) == spa + 0x1234
        mmu = m.soc.mmu
        got = mmu.nested(vm.npt.root, REGION + 0x5678, False, False, True, False)
        assert got[0] == spa + 0x5678 and got[4] is True  # a 2 MiB leaf
        assert vm.back_huge(REGION) is None  # already backed
        assert vm.npt.split(REGION + 0x3000) and not _pde(m, vm, REGION) & PS
        for off in (0, 0x5678, HUGE - 8):
            got = mmu.nested(vm.npt.root, REGION + off, False, False, True, False)
            assert got[0] == spa + off and got[4] is False
        assert not vm.npt.split(REGION)  # nothing left to split
        # changing one page of a 2 MiB leaf splits it first: the other 511 stay mapped
        spa2 = vm.back_huge(REGION + HUGE)
        assert spa2 is not None
        assert vm.npt.unmap(REGION + HUGE + PAGE) == spa2 + PAGE
        assert not _pde(m, vm, REGION + HUGE) & PS
        assert mmu.nested(vm.npt.root, REGION + HUGE + 2 * PAGE, False, False, True, False)[0] == spa2 + 2 * PAGE
        with pytest.raises(Exception, match="not present|NPF|nested|fault"):
            mmu.nested(vm.npt.root, REGION + HUGE + PAGE, False, False, True, False)
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize("engine", ["on", "off"])
def test_a_2m_folio_launch_measures_as_512_pages(m: Machine, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha_engine, "mode", engine)  # the SHA engine's thread hashing or not: same digest
    image = _image()
    digests = []
    for huge in (True, False):
        vm = launch_snp(m, PyEngine(_idle()), [(REGION, image)], name=f"huge-{huge}", huge_pages=huge)
        try:
            spa = vm.spa_of(REGION)
            entry = m.hv.soc.rmp_entry(spa + 5 * PAGE)
            assert entry.page_size == int(huge) and entry.validated and entry.asid == vm.asid
            assert bool(_pde(m, vm, REGION) & PS) == huge
            assert all(vm.spa_of(g) in vm.private_spas for g in range(REGION, REGION + HUGE, PAGE))
            # encrypted where it lay (SNP_LAUNCH_UPDATE's read + encryption in one pass): the guest's
            # key reads the image back, the host's view (C=0) is ciphertext
            mc = m.soc.mc
            for g in (REGION, REGION + 7 * PAGE, REGION + HUGE - PAGE):
                assert mc.read(vm.spa_of(g), PAGE, vm.asid, True) == image[g - REGION : g - REGION + PAGE]
                assert mc.read(vm.spa_of(g), PAGE, 0, False) != image[g - REGION : g - REGION + PAGE]
            digests.append(snp_state(m.firmware).guests[vm.snp_context].ld)
        finally:
            m.hv.destroy(vm)
    assert digests[0] == digests[1]


def test_a_4k_request_in_a_2m_page_is_psmashed_by_kvm(m: Machine) -> None:
    got: list[Any] = []

    def work() -> Workload:
        got.append((yield op.load(REGION + 7 * PAGE, 8)))
        got.append((yield op.pvalidate(REGION + 3 * PAGE, 0, False)))  # rescind one 4 KiB page
        got.append((yield op.load(REGION + 9 * PAGE, 8)))
        yield op.hlt()

    vm = launch_snp(m, PyEngine(work()), [(REGION, _image())], name="psmash")
    try:
        spa = vm.spa_of(REGION)
        assert m.hv.run(vm, max_exits=100).reason == "hlt", vm.crash_reason
        assert got == [7, (RmpResult.SUCCESS, False), 9]
        assert m.hv.soc.rmp_entry(spa).page_size == 0  # PSMASHed on the guest's SIZEM #NPF
        assert not m.hv.soc.rmp_entry(spa + 3 * PAGE).validated
        assert m.hv.soc.rmp_entry(spa + 4 * PAGE).validated  # its neighbours keep Validated
    finally:
        m.hv.destroy(vm)


def test_pvalidate_2m_over_4k_entries_is_a_size_mismatch(m: Machine) -> None:
    got: list[Any] = []

    def work() -> Workload:
        got.append((yield op.pvalidate(REGION, 1, False)))  # 2 MiB over the 4 KiB launch entries
        yield op.hlt()

    vm = launch_snp(m, PyEngine(work()), [(REGION, _image())], name="sizem-4k", huge_pages=False)
    try:
        assert m.hv.run(vm, max_exits=100).reason == "hlt", vm.crash_reason
        assert got == [(RmpResult.FAIL_SIZEMISMATCH, False)]
        assert m.hv.soc.rmp_entry(vm.spa_of(REGION)).validated  # nothing changed
    finally:
        m.hv.destroy(vm)


def test_a_2m_npt_mapping_over_4k_rmp_entries_is_split_by_kvm(m: Machine) -> None:
    """The #NPF(RMP, SIZEM) a guest's 2 MiB access takes when the NPT maps 2 MiB over 4 KiB RMP entries:
    KVM splits its leaf (and flushes the ASID) so the retry is made at 4 KiB."""
    vm = launch_snp(m, PyEngine(_idle()), [(REGION, _image())], name="split")
    try:
        spa = vm.spa_of(REGION)
        assert _pde(m, vm, REGION) & PS
        assert m.hv.soc.boot_cpu.psmash(spa) == RmpResult.SUCCESS  # 4 KiB RMP entries, the NPT still 2 MiB
        info1 = int(NpfExitInfo1.P | NpfExitInfo1.RMP | NpfExitInfo1.SIZEM | NpfExitInfo1.ENC)
        assert psc.rmp_fault(m.hv.sev, vm, REGION + 0x4321, info1) is None
        assert not _pde(m, vm, REGION) & PS and vm.spa_of(REGION + 0x4321) == spa + 0x4321
        assert all(v.vmcb.tlb_control for v in vm.vcpus)  # the ASID's stale 2 MiB translations go
    finally:
        m.hv.destroy(vm)


def test_making_one_page_of_a_2m_private_page_shared(m: Machine) -> None:
    vm = launch_snp(m, PyEngine(_idle()), [(REGION, _image())], name="psc-huge")
    try:
        spa = vm.spa_of(REGION)
        psc.set_page_state(m.hv.sev, vm, REGION + 2 * PAGE, False)
        rmp = m.hv.soc
        assert rmp.rmp_entry(spa).page_size == 0 and not rmp.rmp_entry(spa + 2 * PAGE).assigned
        assert rmp.rmp_entry(spa + PAGE).validated and rmp.rmp_entry(spa + PAGE).asid == vm.asid
        assert REGION + 2 * PAGE in vm.shared_gpas and not _pde(m, vm, REGION) & PS
        assert spa + 2 * PAGE not in vm.private_spas and spa + PAGE in vm.private_spas
    finally:
        m.hv.destroy(vm)


def _launch_fresh(engine: str, monkeypatch: pytest.MonkeyPatch, *, accel: bool = True,
                  huge: bool = True) -> tuple[bytes, list[Any], dict[int, bytes], Machine, Vm]:
    """(digest, RMP entries, raw DRAM pages of the region) of a launch of :func:`_image` on a fresh host
    (one seed: the same keys every time)."""
    from sevemu.crypto import memenc
    with monkeypatch.context() as mp:
        mp.setattr(sha_engine, "mode", engine)
        if not accel:  # the memory controller gathers, writes back encrypted, then hashes what it gathered
            mp.delattr(memenc._memenc_accel, "crypt_pages_in_place")
        fresh = snp_machine("hv-snp-huge-paths")
        vm = launch_snp(fresh, PyEngine(_idle()), [(REGION, _image())], name="paths", huge_pages=huge)
        ld = snp_state(fresh.firmware).guests[vm.snp_context].ld
    spas = [vm.spa_of(g) for g in range(REGION, REGION + HUGE, PAGE)]
    rmp = [fresh.hv.soc.rmp_entry(spa) for spa in spas]
    pages = fresh.soc.mc.dram.pages_dict()
    raw = {spa: bytes(pages[spa >> 12]) for spa in spas}
    return ld, rmp, raw, fresh, vm


@pytest.mark.parametrize("huge", [True, False])
def test_normal_pages_hashed_in_the_encrypting_pass_equal_the_copying_path(monkeypatch: pytest.MonkeyPatch,
                                                                           huge: bool) -> None:
    """SNP_LAUNCH_UPDATE of NORMAL pages without the SHA engine: each page hashed as the pass that
    encrypts it reads it (no copy of the range).  The same digest, RMP entries and DRAM bytes as the
    path that returns a copy of the bytes read and hashes that (the SHA engine's), and as the memory
    controller's path without the accelerator (gather, write encrypted, hash the gathered bytes).  A
    second update of a measured page is refused with nothing changed."""
    from sevemu.abi.commands import CommandId
    from sevemu.abi.snp import SnpLaunchUpdateCmd, SnpLaunchUpdateFlags
    from sevemu.abi.status import Status
    fast = _launch_fresh("off", monkeypatch, huge=huge)
    copying = _launch_fresh("on", monkeypatch, huge=huge)
    gathered = _launch_fresh("off", monkeypatch, accel=False, huge=huge)
    for other in (copying, gathered):
        assert fast[0] == other[0] and fast[1] == other[1] and fast[2] == other[2]
    _, _, raw, fresh, vm = fast
    g = snp_state(fresh.firmware).guests[vm.snp_context]
    ld = g.ld
    spa = vm.spa_of(REGION)
    cmd = SnpLaunchUpdateCmd(gctx_paddr=vm.snp_context, flags=SnpLaunchUpdateFlags(page_type=1, page_size=huge),
                             address=spa)
    status, _ = fresh.hv.psp.raw(CommandId.SNP_LAUNCH_UPDATE, cmd.encode(), reply=False)
    assert status == Status.INVALID_PAGE_STATE  # Guest-Valid (and the guest RUNNING): not measured again
    pages = fresh.soc.mc.dram.pages_dict()
    assert g.ld == ld and all(bytes(pages[s >> 12]) == b for s, b in raw.items())
