"""ASIDs as the host hands them out (Linux arch/x86/kvm/svm/sev.c ``sev_asid_new`` / ``sev_asid_free``).

CPUID Fn8000_001F tells the ranges (APM2 15.34; Linux ``sev_hardware_setup``): SEV guests use
[EDX, ECX] (``min_sev_asid`` .. ``max_asid``), SEV-ES guests [1, EDX-1], and plain guests any ASID
above ECX (the SVM ASID space, unmanaged by the firmware).

An SEV ASID the firmware had bound (ACTIVATE) goes to a *reclaim* set when its VM is destroyed: its
lines may still sit in the caches under the old key, so it is reused only after WBINVD on every CPU
and DF_FLUSH (``sev_flush_asids``), which the firmware enforces.  An ASID never activated goes
straight back to the free list.  This module only keeps the books; the flush itself is the SEV
flows' (:meth:`sevemu.hypervisor.sev.legacy.LegacySev.flush_asids`).
"""

from __future__ import annotations

import heapq

from sevemu.errors import AsidError
from sevemu.hw.profiles import CpuProfile

__all__ = ["AsidPool"]


class AsidPool:
    """Free, in-use and to-be-reclaimed ASIDs of one host."""

    def __init__(self, profile: CpuProfile) -> None:
        self._sev_range = profile.sev_asids()
        self._es_range = profile.es_asids()
        self._sev_free = list(self._sev_range)  # heaps: the lowest free ASID first
        self._es_free = list(self._es_range)
        self._reclaim: set[int] = set()
        self._plain_first = profile.max_asid + 1
        self._plain_free: list[int] = []
        self._plain_next = self._plain_first
        self.flushes = 0
        """How many times reclaimed ASIDs were made reusable (WBINVD + DF_FLUSH)."""

    # ---- questions ------------------------------------------------------------------------------
    def is_sev(self, asid: int) -> bool:
        return asid in self._sev_range

    def is_es(self, asid: int) -> bool:
        return asid in self._es_range

    @property
    def reclaimable(self) -> bool:
        """ASIDs wait for WBINVD + DF_FLUSH."""
        return bool(self._reclaim)

    def sev_free(self) -> int:
        """Free SEV ASIDs."""
        return len(self._sev_free)

    def es_free(self) -> int:
        """Free SEV-ES ASIDs."""
        return len(self._es_free)

    def in_use(self, es: bool = False) -> int:
        """SEV (or SEV-ES) ASIDs bound to a VM now (not free, not awaiting reclaim)."""
        rng, free = (self._es_range, self._es_free) if es else (self._sev_range, self._sev_free)
        return len(rng) - len(free) - sum(1 for a in self._reclaim if a in rng)

    # ---- allocation -----------------------------------------------------------------------------
    def alloc_sev(self, es: bool = False) -> int:
        """The lowest free SEV (or SEV-ES) ASID; :class:`AsidError` when none is free (reclaim first)."""
        free = self._es_free if es else self._sev_free
        if not free:
            rng = self._es_range if es else self._sev_range
            kind = "SEV-ES" if es else "SEV"
            waiting = sum(1 for a in self._reclaim if a in rng)
            raise AsidError(f"no free {kind} ASID: {self.in_use(es)} of the {len(rng)} in "
                            f"[{rng.start}, {rng.stop - 1}] in use"
                            + (f", {waiting} awaiting WBINVD + DF_FLUSH" if waiting else ""))
        return heapq.heappop(free)

    def alloc_plain(self) -> int:
        """An ASID above the SEV range for a guest without memory encryption."""
        if self._plain_free:
            return heapq.heappop(self._plain_free)
        asid = self._plain_next
        self._plain_next += 1
        return asid

    def exchange_for_es(self, asid: int) -> int | None:
        """Give the SEV ASID ``asid`` back (never activated) and take an SEV-ES one; None if none is free."""
        if not self._es_free:
            return None
        es = heapq.heappop(self._es_free)
        self.free(asid, activated=False)
        return es

    def free(self, asid: int, *, activated: bool) -> None:
        """``asid``'s VM is gone; an ASID the firmware had bound waits for the reclaim flush."""
        if asid >= self._plain_first:
            heapq.heappush(self._plain_free, asid)
        elif activated:
            self._reclaim.add(asid)
        else:
            heapq.heappush(self._es_free if asid in self._es_range else self._sev_free, asid)

    def reclaimed(self) -> None:
        """WBINVD on every CPU and DF_FLUSH were done: the reclaim set is free again."""
        for asid in self._reclaim:
            heapq.heappush(self._es_free if asid in self._es_range else self._sev_free, asid)
        self._reclaim.clear()
        self.flushes += 1
