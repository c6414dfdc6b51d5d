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

A fault is never cached (a page the hypervisor backs after an #NPF, or the guest validates after
#VC 0x404, is walked again), and an access kind not walked before (a write after reads: the D bit) is
always walked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from sevemu.hw.cache import Cache
from sevemu.hw.mmu import Mmu, Translation
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
        self.flush_translations()

    def flush_translations(self) -> None:
        """Forget every cached whole translation (the guest's page tables may have changed)."""
        self._tlb.clear()
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
        self.table_pages.update(tables)
        return t

    def nested(self, ncr3: int, gpa: int, write: bool, fetch: bool, final: bool,
               enc: bool) -> tuple[int, bool, bool, bool, bool]:
        key = (ncr3, gpa >> 12, write | fetch << 1 | final << 2 | enc << 3)
        hit = self._nested.get(key)
        if hit is not None:
            self.hits += 1
            spa, c, w, x, huge = hit
            out = spa | (gpa & 0xFFF), c, w, x, huge
        else:
            out = super().nested(ncr3, gpa, write, fetch, final, enc)
            if len(self._nested) >= _LIMIT:
                self._nested.clear()
            self._nested[key] = (out[0] & ~0xFFF, out[1], out[2], out[3], out[4])
        if not final and self._walk_tables is not None:  # a guest page-table read of the walk
            self._walk_tables.append(out[0] & ~0xFFF)
        return out
