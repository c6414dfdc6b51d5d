"""Helpers for the SoC tests: a small SoC and hand-built page tables (NPT and guest tables).

:class:`PageTables` writes real table bytes the way the two owners would: the NPT with the host's
C=0 stores into host memory, the guest's tables with the guest's own stores (private, domain
(ASID, C=1), for an SEV guest; unencrypted for a plain one) into guest memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sevemu.abi.paging import Pte
from sevemu.abi.pycode import CODE_GPA, identity_table
from sevemu.hw import memaccel
from sevemu.hw.codefetch import cpu_engine
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.mmu import Translation
from sevemu.hw.profiles import MILAN, CpuProfile
from sevemu.hw.pyengine import PyEngine, Workload
from sevemu.hw.soc import Soc
from sevemu.hw.svm import Vmcb, VmExit
from sevemu.scenario import SeededRng

MiB = 1 << 20
P, RW, US, PS, NX, A, D = (int(f) for f in (Pte.P, Pte.RW, Pte.US, Pte.PS, Pte.NX, Pte.A, Pte.D))

GUEST_SPA = 0x1000000  # GPA g is backed by SPA GUEST_SPA + g unless a test says otherwise
NPT_POOL = 0x100000  # host pages for NPT tables
GPT_POOL = 0x80000  # guest-physical pages for the guest's own tables
VMCB_SPA = 0x10000  # host pages for the tests' VMCBs (8), below the VMSA page


def make_soc(profile: CpuProfile = MILAN, **kw: int) -> Soc:
    kw.setdefault("dram_size", 64 * MiB)
    kw.setdefault("cache_size", 64 << 10)
    return Soc(profile, rng=SeededRng("hw-tests"), **kw)


class PageTables:
    """An NPT plus a guest's 4-level tables for one ASID on ``soc``."""

    def __init__(self, soc: Soc, asid: int, sev: bool, npt_pool: int = NPT_POOL) -> None:
        self.soc = soc
        self.cache = soc.cache
        self.asid = asid
        self.sev = sev
        self.cbit = soc.profile.cbit_mask
        self._npt_next = npt_pool
        self._gpt_next = GPT_POOL
        self.npt_map_4k: dict[int, int] = {}
        self.ncr3 = self._host_page()
        self._npt_tables: dict[tuple[int, int], int] = {}
        self._gpt_tables: dict[tuple[int, int], int] = {}
        self.cr3 = 0

    # ---- NPT ---------------------------------------------------------------------------------
    def _host_page(self) -> int:
        spa = self._npt_next
        self._npt_next += 0x1000
        return spa

    def _npt_write(self, spa: int, value: int) -> None:
        self.cache.write(0, False, spa, value.to_bytes(8, "little"))

    def npt_map(self, gpa: int, spa: int, flags: int = P | RW | US, large: bool = False,
                c: bool = False) -> None:
        """Map ``gpa`` -> ``spa`` (4 KiB, or 2 MiB with ``large``); ``c`` sets the NPT C-bit."""
        table = self.ncr3
        last = 21 if large else 12
        for shift in (39, 30, 21, 12):
            index = (gpa >> shift) & 0x1FF
            if shift == last:
                self._npt_write(table + index * 8, spa | flags | (PS if large else 0) | (self.cbit if c else 0))
                break
            key = (shift, gpa >> shift)
            nxt = self._npt_tables.get(key)
            if nxt is None:
                nxt = self._npt_tables[key] = self._host_page()
                self._npt_write(table + index * 8, nxt | P | RW | US)
            table = nxt
        size = (2 * MiB) if large else 0x1000
        for off in range(0, size, 0x1000):
            self.npt_map_4k[(gpa + off) >> 12] = spa + off

    def npt_leaf_spa(self, gpa: int) -> int:
        """SPA of the 4 KiB NPT leaf entry of ``gpa`` (for tests that edit it)."""
        return self._npt_tables[(21, gpa >> 21)] + ((gpa >> 12) & 0x1FF) * 8

    def identity(self, size: int = 4 * MiB) -> None:
        """Back GPAs ``[0, size)`` with SPAs ``GUEST_SPA + gpa`` (4 KiB NPT leaves)."""
        for gpa in range(0, size, 0x1000):
            self.npt_map(gpa, GUEST_SPA + gpa)

    # ---- guest memory and tables ---------------------------------------------------------------
    def spa(self, gpa: int) -> int:
        return self.npt_map_4k[gpa >> 12] | (gpa & 0xFFF)

    def gwrite(self, gpa: int, data: bytes, c: bool | None = None) -> None:
        """Store into guest memory as the guest would (private for SEV unless ``c`` says otherwise)."""
        priv = self.sev if c is None else c
        self.cache.write(self.asid if priv else 0, priv, self.spa(gpa), data)

    def gread(self, gpa: int, length: int, c: bool | None = None) -> bytes:
        priv = self.sev if c is None else c
        return self.cache.read(self.asid if priv else 0, priv, self.spa(gpa), length)

    def _guest_table(self) -> int:
        gpa = self._gpt_next
        self._gpt_next += 0x1000
        self.gwrite(gpa, bytes(0x1000))
        return gpa

    def guest_map(self, gva: int, gpa: int, flags: int = P | RW, c: bool = True, large: bool = False,
                  table_c: bool = True) -> None:
        """Map ``gva`` -> ``gpa`` in the guest's tables; ``c``: leaf C-bit, ``table_c``: C-bit of the
        table pointers (ignored by hardware for SEV walks, which are always private)."""
        if not self.cr3:
            self.cr3 = self._guest_table()
        tc = self.cbit if table_c and self.sev else 0
        table = self.cr3
        last = 21 if large else 12
        for shift in (39, 30, 21, 12):
            index = (gva >> shift) & 0x1FF
            if shift == last:
                entry = gpa | flags | (PS if large else 0) | (self.cbit if c else 0)
                self.gwrite(table + index * 8, entry.to_bytes(8, "little"))
                break
            key = (shift, gva >> shift)
            nxt = self._gpt_tables.get(key)
            if nxt is None:
                nxt = self._gpt_tables[key] = self._guest_table()
                self.gwrite(table + index * 8, (nxt | tc | P | RW).to_bytes(8, "little"))
            table = nxt

    def bind(self, *identities: bytes) -> None:
        """Put a program table listing ``identities`` at its GPA (backing that page if needed), as
        the guest's launch would."""
        if CODE_GPA >> 12 not in self.npt_map_4k:
            self.npt_map(CODE_GPA, GUEST_SPA + CODE_GPA)
        self.gwrite(CODE_GPA, identity_table(identities))

    def engine(self, workload: Workload) -> PyEngine:
        """A Python engine for ``workload``, bound to this guest (an SEV guest runs only its own code)."""
        eng = PyEngine(workload)
        if self.sev:
            self.bind(eng.identity)
        return eng

    def guest_entry_gpa(self, gva: int, level_shift: int) -> int:
        """GPA of the guest entry mapping ``gva`` at the level of ``level_shift`` (39/30/21/12)."""
        table = self.cr3
        for shift in (39, 30, 21, 12):
            if shift == level_shift:
                return table + ((gva >> shift) & 0x1FF) * 8
            table = self._gpt_tables[(shift, gva >> shift)]
        raise AssertionError(level_shift)

    def translate(self, gva: int, write: bool = False, fetch: bool = False, paging: bool = True) -> Translation:
        return self.soc.mmu.translate(asid=self.asid, sev=self.sev, ncr3=self.ncr3, paging=paging,
                                      cr3=self.cr3, gva=gva, write=write, fetch=fetch)

    def vmcb(self, paging: bool = True, pa: int = 0) -> Vmcb:
        """A VMCB for this guest in the host page ``pa`` (default :data:`VMCB_SPA` + 4 KiB x ASID)."""
        v = Vmcb(asid=self.asid, np_enable=True, sev_enable=self.sev, ncr3=self.ncr3, cr3=self.cr3,
                 pa=pa or VMCB_SPA + (self.asid % 8) * 0x1000)
        if paging:
            v.cr0 |= 1 << 31 | 1
        self.soc.host_view().boot_cpu.vmcb_init(v)
        return v


@cpu_engine  # test scaffolding: stands for guest code the test writes (not a host's engine)
class FnEngine:
    """An engine running a plain function on the GuestCpu (then HLT)."""

    def __init__(self, fn: Callable[[GuestCpu], object]) -> None:
        self.fn = fn
        self.result: object = None
        self.cpu: GuestCpu | None = None

    def run(self, cpu: GuestCpu) -> VmExit:
        from sevemu.abi.paging import ExitCode

        self.cpu = cpu
        self.result = self.fn(cpu)
        return VmExit(ExitCode.HLT)


@pytest.fixture
def soc() -> Soc:
    return make_soc()


@pytest.fixture
def sev_tables(soc: Soc) -> PageTables:
    """An SEV guest on ASID 200 (a Milan SEV ASID) with its key loaded and 4 MiB identity-backed."""
    soc.psp.take_ports().keys.load(200, bytes(range(16)))
    pt = PageTables(soc, 200, True)
    pt.identity()
    return pt


VMSA_SPA = 0x1F000  # a host page for the SEV-ES tests' VMSA, below the NPT pool
VMSA_CRC = 0x1E000  # its checksum block (a TMR block stand-in)


def es_vmsa(soc: Soc, vmcb: Vmcb, spa: int = VMSA_SPA, crc_paddr: int = VMSA_CRC) -> bytes:
    """Set up an SEV-ES VMSA for ``vmcb`` as LAUNCH_UPDATE_VMSA would: its save fields (registers,
    control registers, ``sev_features``) in a page sealed with a checksum, written encrypted with
    the guest's key, the checksum stored; the VMCB points at it.  Returns the plaintext page."""
    from sevemu.abi.vmsa import SevEsSaveArea
    from sevemu.crypto.vmsacrc import seal_vmsa

    area = SevEsSaveArea(efer=vmcb.efer, cr0=vmcb.cr0, cr3=vmcb.cr3, cr4=vmcb.cr4, rflags=vmcb.rflags,
                         rip=vmcb.rip, sev_features=vmcb.sev_features, **vmcb.regs)
    page, crc = seal_vmsa(area.encode(), crc_paddr)
    soc.cache.write(vmcb.asid, True, spa, page)
    soc.cache.flush_range(vmcb.asid, True, spa, len(page))
    soc.dram.write(crc_paddr, crc.to_bytes(8, "little"))
    vmcb.vmsa_pa = spa
    return page


# ---- the memory model's C helpers (csrc/mem_accel.c) on and off -------------------------------------
MEM_ACCEL_MODES = [pytest.param(True, id="c-helpers",
                                marks=pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")),
                   pytest.param(False, id="python")]
"""Parametrize a test over the bulk paths of DRAM and the cache: the C helpers, then the Python loops."""


@contextmanager
def mem_accel(on: bool) -> Iterator[None]:
    """Run the block with the memory model's C helpers used (if built) or not."""
    saved = memaccel.ENABLED, memaccel.HOST_PORT, memaccel.POOL_SYNC, memaccel.COLUMNS
    memaccel.ENABLED, memaccel.HOST_PORT, memaccel.POOL_SYNC, memaccel.COLUMNS = (on and flag for flag in saved)
    try:
        yield
    finally:
        memaccel.ENABLED, memaccel.HOST_PORT, memaccel.POOL_SYNC, memaccel.COLUMNS = saved


def identity_tables(img: bytearray, base: int, cbit: int | None, shared: tuple[int, ...] = ()) -> None:
    """Identity page tables for the first 2 MiB (4 KiB pages, P RW A D) into the flat image ``img``
    loaded at GPA ``base``: PML4 at 0x110000, then PDPT, PD, PT; the C-bit (``cbit``: its position, None
    for a plain guest) in every entry except the leaves of the pages in ``shared``."""
    c = 0 if cbit is None else 1 << cbit
    flags = 0x63
    pml4, pdpt, pd, pt = 0x110000, 0x111000, 0x112000, 0x113000

    def put(gpa: int, value: int) -> None:
        img[gpa - base : gpa - base + 8] = value.to_bytes(8, "little")

    put(pml4, pdpt | c | flags)
    put(pdpt, pd | c | flags)
    put(pd, pt | c | flags)
    for i in range(512):
        page = i << 12
        put(pt + 8 * i, page | flags | (0 if page in shared else c))
