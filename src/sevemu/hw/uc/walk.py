"""The Unicorn engine's page walker with translation caches (an option of the engine).

Every TLB miss of Unicorn's virtual TLB is a walk of the guest's page tables and, for each of the
guest's table reads and for the final address, of the hypervisor's NPT (:meth:`Mmu.translate`):
up to 5 nested walks of 4 levels per miss, each with the RMP checks of an SNP guest.  Firmware that
decompresses megabytes (OVMF's SEC) misses tens of thousands of times: Unicorn's own TLB is a small
direct-mapped table, and the decompressor's input, output and dictionary pages keep evicting each
other (about ten fills per page touched).  Real CPUs keep what they walked in a second-level TLB and
page-walk caches; so does :class:`NestedCachingMmu`:

* **Nested translations** (SPA page, the NPT's C-bit, permissions, leaf size), per (nCR3,
  guest-physical page, access kind), until the engine's TLB is flushed -- TLB_CONTROL at VMRUN, which
  the hypervisor asks for whenever it changes or removes an NPT mapping (as KVM does, and as on
  hardware: a nested translation may be cached until the hypervisor flushes the ASID).
* **Whole translations** (a second-level TLB): the :class:`~sevemu.hw.mmu.Translation` of a
  successful walk, per (guest page, access kind, CR3, paging, CR0.WP, ASID, nCR3, SEV, RMP, VMPL) -- every
  input of the walk -- so a TLB miss of Unicorn on a page walked before gives the same answer
  without a walk.  Like a hardware TLB entry it holds the walk's outcome: the guest's A/D bits were
  set by that walk (a write entry exists only after a write walk set D), and an SNP guest's RMP checks
  were made by it.  It is dropped with the nested cache (TLB_CONTROL, the RMP taking an access away:
  ``UcEngine._flush_tlb_all``), and whenever the guest could have changed a page-table entry it used:
  the guest cannot see INVLPG or a CR3 reload here, so the rule is stronger than the architecture's --
  a translation is kept only while none of the guest table pages its walk read is writable in
  Unicorn's TLB (:attr:`NestedCachingMmu.table_writable`), and the engine drops every translation
  when it grants write access to such a page (:meth:`NestedCachingMmu.table_written`).  A write by
  someone else (the host) to a guest page table is not seen -- as on hardware, where TLBs are not
  coherent with memory and the entry stays until a flush.

Two page-walk caches (as hardware's page-walk caches) make the walk of a page not walked before cheap
(OVMF's SEC streams through megabytes: most fills are of pages never walked, in 2 MiB regions walked
before):

* **Guest 2 MiB leaves**: the outcome of a guest walk that ended in a 2 MiB PDE (GPA base, C-bit,
  permissions), per (2 MiB region, access kind and every other input of the walk), so another page of
  the region needs no guest table read.  Kept and dropped exactly as whole translations (it is one
  for a whole region): made only where the translation is cached, its table pages recorded with
  theirs; the walk that made it set the A (and for a write, D) bits it implies.
* **NPT page tables** (the upper levels of a nested walk): for a 4 KiB NPT leaf, the NPT page table
  of its 2 MiB region with the permissions of the levels above, per (nCR3, 2 MiB region), so a nested
  walk of another page of the region reads one entry (from memory, as always); dropped with the nested
  translations (TLB_CONTROL, which the hypervisor asks for whenever it changes or removes a mapping).
  Anything but a present, permitted, reserved-bit-free entry is walked again by :meth:`Mmu.nested`
  (which raises the fault as always).

A fault is never cached (a page the hypervisor backs after an #NPF, or the guest validates after
#VC 0x404, is walked again), and an access kind not walked before (a write after reads: the D bit) is
always walked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from sevemu._util.units import PAGE
from sevemu.hw.cache import Cache
from sevemu.hw.mmu import PTE_NX, PTE_P, PTE_PS, PTE_RW, Mmu, Translation
from sevemu.hw.profiles import CpuProfile

if TYPE_CHECKING:
    from sevemu.hw.rmp import Rmp

__all__ = ["NestedCachingMmu"]

_LIMIT = 1 << 16


def _never(spa: int) -> bool:
    return False


class NestedCachingMmu(Mmu):
    """:class:`Mmu` whose nested walks and whole translations are cached until :meth:`flush`
    (module docstring)."""

    def __init__(self, cache: Cache, profile: CpuProfile) -> None:
        super().__init__(cache, profile)
        self._nested: dict[tuple[int, int, int], tuple[int, bool, bool, bool, bool]] = {}
        self._tlb: dict[tuple[int, ...], Translation] = {}
        self._regions: dict[tuple[int, ...], tuple[int, bool, bool, bool]] = {}
        """Guest walks that ended in a 2 MiB leaf: (GPA base, C, writable, executable) per region and inputs."""
        self._new_region: tuple[tuple[int, ...], tuple[int, bool, bool, bool]] | None = None
        self._npt_tables: dict[tuple[int, int], tuple[int, bool, bool, bool]] = {}
        """(nCR3, GPA >> 21) -> (NPT page table, its C-bit, writable, executable above it) of 4 KiB NPT leaves."""
        self._operand_tables: dict[tuple[int, int], bytes] = {}
        """(nCR3, GPA >> 21) -> the entries of an NPT page table of ``_npt_tables`` (:meth:`operand`)."""
        self._walk_tables: list[int] | None = None
        self.table_pages: set[int] = set()
        """SPA pages of the guest page tables the cached translations were walked through."""
        self.table_writable: Callable[[int], bool] = _never
        """Whether the guest may write the page at this SPA without a TLB fill (the engine's answer:
        a slot of it holds write permission in Unicorn's TLB)."""
        self.hits = 0
        """Nested walks answered from the cache."""
        self.tlb_hits = 0
        """Translations answered from the cache (walks saved)."""

    def flush(self) -> None:
        """Forget every cached nested translation and translation (a TLB flush)."""
        self._nested.clear()
        self._npt_tables.clear()
        self._operand_tables.clear()
        self.flush_translations()

    def flush_translations(self) -> None:
        """Forget every cached whole translation (the guest's page tables may have changed)."""
        self._tlb.clear()
        self._regions.clear()
        self.table_pages.clear()

    def table_written(self, spa_page: int) -> None:
        """The engine grants write access to the page at ``spa_page``: if a cached translation was
        walked through it, drop them all."""
        if spa_page in self.table_pages:
            self.flush_translations()

    def translate(self, *, asid: int, sev: bool, ncr3: int, paging: bool, cr3: int, gva: int,
                  write: bool, fetch: bool, rmp: Rmp | None = None, vmpl: int = 0, wp: bool = True) -> Translation:
        key = (gva >> 12, write | fetch << 1 | paging << 2 | sev << 3 | wp << 4, cr3 if paging else 0, asid, ncr3, vmpl,
               id(rmp) if rmp is not None else 0)
        t = self._tlb.get(key)
        if t is not None:
            self.tlb_hits += 1
            return t if not (t.gpa ^ gva) & 0xFFF else replace(t, gpa=(t.gpa & ~0xFFF) | (gva & 0xFFF))
        tables: list[int] = []
        self._walk_tables = tables
        self._new_region = None
        try:
            t = super().translate(asid=asid, sev=sev, ncr3=ncr3, paging=paging, cr3=cr3, gva=gva, write=write,
                                  fetch=fetch, rmp=rmp, vmpl=vmpl, wp=wp)
        finally:
            self._walk_tables = None
        writable = self.table_writable
        for page in tables:
            if writable(page):
                return t  # the guest may be changing this table right now: walk again next time
        if len(self._tlb) >= _LIMIT:
            self.flush_translations()
        self._tlb[key] = t
        region = self._new_region
        if region is not None:
            self._regions[region[0]] = region[1]
        self.table_pages.update(tables)
        return t

    def operand(self, asid: int, sev: bool, ncr3: int, paging: bool, cr3: int, gva: int) -> tuple[int, int]:
        """(GPA, SPA) of an instruction's memory operand read at ``gva`` (PVALIDATE's, whose every
        operand is a page not translated before): what :meth:`translate` answers for a read without
        an RMP check (:meth:`GuestCpu.translate`'s walk), but no whole or nested translation is kept
        for the page, so that a loop validating 256 MiB neither fills nor keeps flushing the caches
        the TLB fills use.  Answered from the guest 2 MiB-leaf cache and the NPT page-table cache
        where they hold the operand's regions -- the NPT page table's entries read once per region
        and kept until the hypervisor flushes (as a TLB may keep any translation the tables allow);
        a present, reserved-bit-free entry answers, anything else is :meth:`translate` (which
        walks again and raises the fault)."""
        if paging:
            region = self._regions.get((gva >> 21, sev << 2 | 8, cr3, asid, ncr3, 0, 0))
            if region is None:
                t = self.translate(asid=asid, sev=sev, ncr3=ncr3, paging=True, cr3=cr3, gva=gva, write=False,
                                   fetch=False)
                return t.gpa, t.spa
            gpa = region[0] | (gva & 0x1FFFFF)
            enc = sev and region[1]
        else:
            gpa, enc = gva, sev
        hit = self._nested.get((ncr3, gpa >> 12, 4 | enc << 3))
        if hit is not None:
            return gpa, hit[0]
        region_key = (ncr3, gpa >> 21)
        entries = self._operand_tables.get(region_key)
        if entries is None:
            up = self._npt_tables.get(region_key)
            if up is not None:  # the region's NPT page table, read once (its entries, as a TLB may hold them)
                entries = self._operand_tables[region_key] = self.cache.read(0, up[1], up[0], PAGE)
        if entries is not None:
            off = (gpa >> 9) & 0xFF8
            pte = int.from_bytes(entries[off : off + 8], "little")
            if pte & PTE_P and not pte & self.rsvd_sev:  # (a read: the W/X permissions do not matter)
                return gpa, pte & self.addr_mask
        t = self.translate(asid=asid, sev=sev, ncr3=ncr3, paging=paging, cr3=cr3, gva=gva, write=False, fetch=False)
        return t.gpa, t.spa

    def _guest_walk(self, asid: int, sev: bool, ncr3: int, cr3: int, gva: int, write: bool, fetch: bool,
                    rmp: Rmp | None = None, vmpl: int = 0, wp: bool = True) -> tuple[int, bool, bool, bool, bool]:
        key = (gva >> 21, write | fetch << 1 | sev << 2 | wp << 3, cr3, asid, ncr3, vmpl, id(rmp) if rmp is not None else 0)
        hit = self._regions.get(key)
        if hit is not None:
            base, c, w, x = hit
            return base | (gva & 0x1FFFFF), c, w, x, True
        out = super()._guest_walk(asid, sev, ncr3, cr3, gva, write, fetch, rmp, vmpl, wp)
        if out[4] and self._walk_tables is not None:  # a 2 MiB leaf: kept if translate keeps the translation
            self._new_region = key, (out[0] & ~0x1FFFFF, out[1], out[2], out[3])
        return out

    def nested(self, ncr3: int, gpa: int, write: bool, fetch: bool, final: bool,
               enc: bool) -> tuple[int, bool, bool, bool, bool]:
        key = (ncr3, gpa >> 12, write | fetch << 1 | final << 2 | enc << 3)
        hit = self._nested.get(key)
        if hit is not None:
            self.hits += 1
            spa, c, w, x, huge = hit
            out = spa | (gpa & 0xFFF), c, w, x, huge
        else:
            leaf = self._nested_leaf(ncr3, gpa, write, fetch)
            if leaf is not None:
                out = leaf
            else:
                out = super().nested(ncr3, gpa, write, fetch, final, enc)
                if not out[4]:
                    self._remember_npt_table(ncr3, gpa)
            if len(self._nested) >= _LIMIT:
                self._nested.clear()
            self._nested[key] = (out[0] & ~0xFFF, out[1], out[2], out[3], out[4])
        if not final and self._walk_tables is not None:  # a guest page-table read of the walk
            self._walk_tables.append(out[0] & ~0xFFF)
        return out

    def _nested_leaf(self, ncr3: int, gpa: int, write: bool,
                     fetch: bool) -> tuple[int, bool, bool, bool, bool] | None:
        """A nested walk through a cached NPT page table: its 4 KiB entry read (the upper levels
        cached); None unless the entry is present, free of reserved bits and allows the access
        (everything else: the full walk, which faults)."""
        up = self._npt_tables.get((ncr3, gpa >> 21))
        if up is None:
            return None
        table, table_c, w, x = up
        pte = int.from_bytes(self.cache.read(0, table_c, table + ((gpa >> 9) & 0xFF8), 8), "little")
        w = w and bool(pte & PTE_RW)
        x = x and not pte & PTE_NX
        if not pte & PTE_P or pte & self.rsvd_sev or (write and not w) or (fetch and not x):
            return None
        return (pte & self.addr_mask) | (gpa & 0xFFF), bool(pte & self.cbit), w, x, False

    def _remember_npt_table(self, ncr3: int, gpa: int) -> None:
        """After a full nested walk to a 4 KiB leaf: the NPT page table of its region and the
        permissions above it (the three upper levels read again, as the walk just read them), kept
        until the hypervisor flushes, as a page-walk cache keeps upper-level entries."""
        table, table_c = ncr3 & self.addr_mask, bool(ncr3 & self.cbit)
        w = x = True
        for shift in (39, 30, 21):
            pte = int.from_bytes(self.cache.read(0, table_c, table + ((gpa >> shift) & 0x1FF) * 8, 8), "little")
            if not pte & PTE_P or pte & self.rsvd_sev or (shift == 21 and pte & PTE_PS):
                return
            w = w and bool(pte & PTE_RW)
            x = x and not pte & PTE_NX
            table, table_c = pte & self.addr_mask, bool(pte & self.cbit)
        if len(self._npt_tables) >= _LIMIT:
            self._npt_tables.clear()
            self._operand_tables.clear()
        self._npt_tables[(ncr3, gpa >> 21)] = (table, table_c, w, x)
