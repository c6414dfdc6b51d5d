"""The Unicorn engine's page walker with a nested-translation cache (an option of the engine).

Every TLB miss of Unicorn's virtual TLB is a walk of the guest's page tables and, for each of the
guest's table reads and for the final address, of the hypervisor's NPT (:meth:`Mmu.translate`):
up to 5 nested walks of 4 levels per miss.  Firmware that decompresses megabytes (OVMF's SEC) misses
tens of thousands of times.  Real CPUs keep the nested translations they walked in their TLBs and
page-walk caches; so does :class:`NestedCachingMmu`: a successful nested walk's result (SPA page,
the NPT's C-bit, permissions, leaf size) is remembered per (nCR3, guest-physical page, access kind),
and used until the engine's TLB is flushed -- TLB_CONTROL at VMRUN, which the hypervisor asks for
whenever it changes or removes an NPT mapping (as KVM does, and as on hardware: a nested
translation may be cached until the hypervisor flushes the ASID).  A fault is never cached, so a page
the hypervisor backs after an #NPF is walked again.  The guest's own page-table entries are read
and their A/D bits set on every walk, exactly as without the cache; the RMP checks of an SNP guest
are not cached either (:meth:`Mmu.translate` makes them after the walk).
"""

from __future__ import annotations

from sevemu.hw.cache import Cache
from sevemu.hw.mmu import Mmu
from sevemu.hw.profiles import CpuProfile

__all__ = ["NestedCachingMmu"]

_LIMIT = 1 << 16


class NestedCachingMmu(Mmu):
    """:class:`Mmu` whose nested walks are cached until :meth:`flush` (module docstring)."""

    def __init__(self, cache: Cache, profile: CpuProfile) -> None:
        super().__init__(cache, profile)
        self._nested: dict[tuple[int, int, int], tuple[int, bool, bool, bool, bool]] = {}
        self.hits = 0

    def flush(self) -> None:
        """Forget every cached nested translation (a TLB flush)."""
        self._nested.clear()

    def nested(self, ncr3: int, gpa: int, write: bool, fetch: bool, final: bool,
               enc: bool) -> tuple[int, bool, bool, bool, bool]:
        key = (ncr3, gpa >> 12, write | fetch << 1 | final << 2 | enc << 3)
        hit = self._nested.get(key)
        if hit is not None:
            self.hits += 1
            spa, c, w, x, huge = hit
            return spa | (gpa & 0xFFF), c, w, x, huge
        out = super().nested(ncr3, gpa, write, fetch, final, enc)
        if len(self._nested) >= _LIMIT:
            self._nested.clear()
        spa = out[0]
        self._nested[key] = (spa & ~0xFFF, out[1], out[2], out[3], out[4])
        return out
