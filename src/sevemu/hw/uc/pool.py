"""The Unicorn engine's plaintext page pool: a private cache level above the SoC's shared cache.

Unicorn runs guest code from host memory it maps as physical pages.  The engine gives it *slots*:
4 KiB pages of one contiguous host buffer (mapped once into Unicorn's physical address space),
each holding the plaintext of one page in one encryption domain, keyed like a cache line
(:func:`~sevemu.hw.cache.tag_key` of the page's first line) and filled through the shared cache
(:meth:`~sevemu.hw.cache.Cache.read`), i.e. through the memory controller which decrypts it with
the key of that domain.  Plaintext therefore stays inside the SoC: in the pool and in the cache.

The pool is kept coherent the way a real hierarchy keeps a private level coherent: it attaches to
the cache as a :class:`~sevemu.hw.cache.CacheAgent` and the cache snoops it.

* Slots Unicorn may write (:attr:`PagePool.writable`: it was given write permission) are compared
  with their snapshot at every #VMEXIT, before every page-table walk and on eviction, and the
  modified 64-byte lines go into the shared cache (marked dirty, so the memory controller encrypts
  them on their way to DRAM).
* Before someone else reads lines of a page the pool holds, the snoop writes the modifications
  back; before someone else writes, CLFLUSHes, VMPAGE_FLUSHes, WBINVDs or INVDs them, it writes
  back and marks the slot stale (:attr:`PagePool.stale`) -- the lines it named, or the whole page
  for a large range or WBINVD; the engine re-reads them (:meth:`PagePool.refresh_stale`) before
  the guest runs again (a host's write to a few fields of a shared page costs a few lines).  On coherent profiles a fill in
  another domain of the same SPA makes the slot stale too.
* The pool is bounded: when it runs low, it asks the engine to stop at the next block boundary and
  the oldest quarter is written back and dropped (:meth:`PagePool.evict`).

:meth:`PagePool.close` writes back, detaches from the cache and zeroes every slot: a closed engine
keeps no plaintext.
"""

from __future__ import annotations

import ctypes
import mmap
from collections import deque
from collections.abc import Callable

from sevemu._util.units import LINE, PAGE
from sevemu.hw import memaccel
from sevemu.hw.cache import ASID_SHIFT, C_SHIFT, SPA_MASK, Cache, key_domain
from sevemu.hw.uc.stats import UcStats

__all__ = ["PagePool", "line_runs"]

_LOW_WATER = 16  # free slots left when the pool asks for an eviction at the next block boundary
_BLOCK = 512  # sync_slot compares blocks of 8 lines before single lines
_PARTIAL_LINES = 16  # a snoop naming more lines of a page (or more runs) makes the whole slot stale
_ABSENT: list[tuple[int, int]] = []  # (stale.get's default: a slot not stale yet)


class PagePool:
    """``pages`` slots of plaintext, a :class:`~sevemu.hw.cache.CacheAgent` of the shared cache."""

    def __init__(self, pages: int, stats: UcStats, request_stop: Callable[[], None]) -> None:
        self.pages = pages
        self.stats = stats
        self._request_stop = request_stop
        self.on_forget: Callable[[int], None] | None = None
        """Called with a slot the pool forgets (its contents are no longer that page's)."""
        self.mm: mmap.mmap | None = None
        self._anchor: ctypes.c_char | None = None
        self.cache: Cache | None = None
        self.slot_of: dict[int, int] = {}
        """Cache key of a page -> its slot."""
        self.slot_key: dict[int, int] = {}
        """Slot -> cache key of the page it holds."""
        self._by_spa: dict[int, set[int]] = {}  # page SPA -> slots (every domain)
        self._snap: dict[int, bytes | bytearray] = {}  # slot -> contents as last written back / filled
        self._free: list[int] = []
        self._order: deque[int] = deque()  # fill order (eviction is FIFO)
        self.writable: set[int] = set()
        """Slots Unicorn may have written (write permission granted since the last TLB flush)."""
        self.stale: dict[int, list[tuple[int, int]] | None] = {}
        """Slots someone else changed: re-read before the guest runs again -- the ``[lo, hi)``
        offsets of the runs of 64-byte lines that changed (as the snoops named them), or None for
        the whole page."""
        self.updated: list[int] = []
        """Slots whose contents a write of someone else changed in place (:meth:`snoop`'s
        write-update), not yet reported to the engine (:meth:`take_updated`)."""
        self.code_slots: set[int] | None = None
        """The slots the engine translated code from (set by the engine: its port scanner's set), or
        None for every slot: only their write-updates go into :attr:`updated` -- the engine rescans
        code among those and nothing else (a GHCB answer changes no code)."""
        self.evict_requested = False
        self.synced = False
        """Every writable slot was written back and the guest has not run since (set by the engine
        at #VMEXIT, cleared at VMRUN): a snoop has nothing to write back."""
        self.sync: Callable[[], int] = self.sync_all
        """:meth:`sync_all` -- while attached, where the C helpers are built, its loop in one call with
        its arguments bound (``PoolSync``, ``pool_sync_all`` with the pool's dicts and sets read once
        -- :attr:`slot_key`, the snapshots, :attr:`stats` and :attr:`writable` are never rebound --
        and :attr:`mm` at each call: what the engine calls at every #VMEXIT)."""
        if memaccel.HOST_PORT:  # the usual snoops (an exit's host accesses) in one C call; the rest come here
            # (an attribute set as any other: asking for the pool's __dict__ would slow every attribute access)
            setattr(self, "snoop", memaccel.helpers.PoolSnoop(self, PagePool.snoop.__get__(self, PagePool)))  # noqa: B010

    # ---- the buffer -----------------------------------------------------------------------------
    def open(self) -> int:
        """Allocate the buffer; returns its host address (for ``uc_mem_map_ptr``)."""
        self.mm = mmap.mmap(-1, self.pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self._free = list(range(self.pages - 1, -1, -1))
        return ctypes.addressof(self._anchor)

    def page(self, s: int) -> bytes:
        """The current contents of slot ``s``."""
        assert self.mm is not None
        return self.mm[s * PAGE : (s + 1) * PAGE]

    def attach(self, cache: Cache) -> bool:
        """Keep coherent with ``cache`` from now on; True when that changed anything (the slots of
        another cache were written back and dropped: the engine must flush its TLB)."""
        if cache is self.cache:
            return False
        dropped = self.drop_all()
        if self.cache is not None:
            self.cache.detach(self)
        cache.attach(self)
        self.cache = cache
        if memaccel.POOL_SYNC:  # sync_all's loop in one C call, its arguments bound once (every #VMEXIT calls it)
            self.sync = memaccel.helpers.PoolSync(self, vars(cache), self._write_back)
        return dropped

    def close(self, write_back: bool = True) -> None:
        """Write back (unless told not to), detach from the cache, zero every slot, release the buffer."""
        if self.cache is not None:
            if write_back:
                self.sync_all()
            self.cache.detach(self)
            self.cache = None
            self.sync = self.sync_all
        mm = self.mm
        if mm is not None and self._anchor is not None:
            ctypes.memset(ctypes.addressof(self._anchor), 0, len(mm))
        self.slot_of.clear()
        self.slot_key.clear()
        self._by_spa.clear()
        self._snap.clear()
        self._order.clear()
        self._free.clear()
        self.writable.clear()
        self.stale.clear()
        self.updated.clear()
        self.on_forget = None
        self.code_slots = None
        self._request_stop = _nothing
        self._anchor = None  # the buffer export ends with the anchor ...
        self.mm = None
        if mm is not None:
            mm.close()  # ... so the mapping can go

    # ---- slots ---------------------------------------------------------------------------------
    def load(self, key: int) -> int:
        """A slot holding the page of ``key``, filled from the shared cache in its domain."""
        if not self._free:
            self.evict()  # inside a hook: only when a burst used up the reserve
        s = self._free.pop()
        if len(self._free) < _LOW_WATER and not self.evict_requested:
            self.evict_requested = True
            self._request_stop()  # evict at the next block boundary
        asid, c, spa = key_domain(key)
        assert self.cache is not None and self.mm is not None
        data = self.cache.read_lines(asid, c, spa, PAGE, origin=self)
        off = s * PAGE
        self.mm[off : off + PAGE] = data
        self._snap[s] = data
        self.slot_of[key] = s
        self.slot_key[s] = key
        self._by_spa.setdefault(spa, set()).add(s)
        self._order.append(s)
        self.stats.slot_fills += 1
        return s

    def sync_slot(self, s: int) -> bool:
        """Write the lines of slot ``s`` the guest modified back into the shared cache; whether
        there were any.  The snapshot takes the written lines as they go (compared and copied in
        one pass, without a copy of the page, where the C helpers are built)."""
        mm = self.mm
        assert mm is not None
        snap = self._snap[s]
        if type(snap) is not bytearray:
            snap = self._snap[s] = bytearray(snap)  # (updated in place from now on)
        base = s * PAGE
        if memaccel.ENABLED:
            runs = memaccel.helpers.slot_sync(mm, base, snap)
        else:
            cur = mm[base : base + PAGE]
            runs = line_runs(cur, snap)
            for lo, hi in runs:
                snap[lo:hi] = cur[lo:hi]
        if not runs:
            return False
        self._write_back(s, snap, runs)
        return True

    def _write_back(self, s: int, snap: bytearray, runs: list[tuple[int, int]]) -> None:
        """The runs of lines of slot ``s`` that its snapshot ``snap`` just took into the shared cache."""
        mm = self.mm
        assert mm is not None and self.cache is not None
        base = s * PAGE
        key = self.slot_key[s]  # (key_domain, inlined)
        try:
            self.cache.write_runs(key >> ASID_SHIFT, bool(key >> C_SHIFT & 1), key & SPA_MASK, mm, base, runs,
                                  origin=self)
        except BaseException:
            for lo, hi in runs:  # maybe not written back: the snapshot must differ from the slot again
                snap[lo:hi] = bytes(b ^ 0xFF for b in mm[base + lo : base + hi])
            raise
        n = 0
        for lo, hi in runs:
            n += hi - lo
        self.stats.lines_written_back += n // LINE

    def sync_all(self) -> int:
        """Write back every modified slot; returns how many were modified (where the C helpers are
        built, the loop in one call: ``pool_sync_all``, :mod:`sevemu.hw.memaccel`; :attr:`sync` has
        its arguments bound)."""
        mm = self.mm
        if mm is None:
            return 0
        if memaccel.POOL_SYNC and self.cache is not None:  # the loop below, in one C call
            return memaccel.helpers.pool_sync_all(self, vars(self.cache), self._write_back)
        keys = self.slot_key
        dirty = 0
        if not memaccel.ENABLED:
            for s in self.writable:
                if s in keys and self.sync_slot(s):
                    dirty += 1
            return dirty
        snaps = self._snap
        slot_sync = memaccel.helpers.slot_sync
        for s in self.writable:  # (sync_slot, inlined: every #VMEXIT compares these)
            if s in keys:
                snap = snaps[s]
                if type(snap) is not bytearray:
                    snap = snaps[s] = bytearray(snap)
                runs = slot_sync(mm, s * PAGE, snap)
                if runs:
                    self._write_back(s, snap, runs)
                    dirty += 1
        return dirty

    def refresh_stale(self) -> list[int]:
        """Re-read the slots someone else changed (only the lines a snoop named, where it named
        them); returns those whose contents differ now."""
        stale, self.stale = self.stale, {}
        mm = self.mm
        assert mm is not None and self.cache is not None
        read = self.cache.read_lines
        changed = []
        for s, lines in stale.items():
            key = self.slot_key.get(s)
            if key is None:
                continue
            asid, c, spa = key_domain(key)
            base = s * PAGE
            if lines is None:
                new = read(asid, c, spa, PAGE, origin=self)
                if new != mm[base : base + PAGE]:
                    mm[base : base + PAGE] = new
                    changed.append(s)
                self._snap[s] = new
            else:
                snap = self._snap[s]
                if not isinstance(snap, bytearray):
                    snap = self._snap[s] = bytearray(snap)  # (updated in place from now on)
                differs = False
                for lo, hi in lines:  # each run a snoop named, in one read
                    data = read(asid, c, spa + lo, hi - lo, origin=self)
                    if data != mm[base + lo : base + hi]:
                        mm[base + lo : base + hi] = data
                        differs = True
                    snap[lo:hi] = data
                if differs:
                    changed.append(s)
            self.stats.slot_refreshes += 1
        return changed

    def take_updated(self) -> list[int]:
        """The slots changed in place since the last call (the engine rescans code among them)."""
        out, self.updated = self.updated, []
        return out

    def evict(self) -> None:
        """Free the oldest quarter of the pool (written back first); the engine flushes its TLB."""
        self.evict_requested = False
        n = max(self.pages // 4, 1)
        self.sync_all()
        victims: list[int] = []
        while self._order and len(victims) < n:
            victims.append(self._order.popleft())
        for s in victims:
            self.forget(s)
        self.stats.evictions += len(victims)

    def forget(self, s: int) -> None:
        key = self.slot_key.pop(s, None)
        if key is None:
            return
        self.slot_of.pop(key, None)
        spa = key & SPA_MASK
        peers = self._by_spa.get(spa)
        if peers is not None:
            peers.discard(s)
            if not peers:
                del self._by_spa[spa]
        self._snap.pop(s, None)
        self.writable.discard(s)
        self.stale.pop(s, None)
        if s in self.updated:
            self.updated = [u for u in self.updated if u != s]
        if self.on_forget is not None:
            self.on_forget(s)
        self._free.append(s)

    def drop_all(self) -> bool:
        """Forget every slot (after a write-back); False when there was none."""
        if not self.slot_key:
            return False
        self.sync_all()
        for s in list(self.slot_key):
            self.forget(s)
        self._order.clear()
        return True

    def spa_writable(self, spa: int) -> bool:
        """Whether a slot of the page at ``spa`` (any domain) holds write permission in Unicorn's TLB."""
        slots = self._by_spa.get(spa)
        return slots is not None and not self.writable.isdisjoint(slots)

    # ---- CacheAgent: the shared cache snoops the pool ----------------------------------------------
    def _slots_in(self, lo: int, hi: int) -> list[int]:
        if hi - lo <= 64 * PAGE:
            get = self.slot_of.get
            out = []
            for key in range(lo & ~(PAGE - 1), hi, PAGE):
                s = get(key)
                if s is not None:
                    out.append(s)
            return out
        return [s for key, s in self.slot_of.items() if key < hi and key + PAGE > lo]

    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        """Cache lines with keys in ``[lo, hi)`` are about to be read / changed by someone else
        (``data``: overwritten whole with these bytes)."""
        synced = self.synced
        if synced and not invalidate:  # a read of what the cache already holds
            return
        slot_of = self.slot_of
        if not slot_of:
            return
        page = lo & ~(PAGE - 1)
        if hi - page <= PAGE:  # (the usual snoop: lines of one page)
            one = slot_of.get(page)
            if one is None:
                return
            slots: list[int] | tuple[int] = (one,)
        else:
            slots = self._slots_in(lo, hi)
        for s in slots:
            if not synced and s in self.writable:
                self.sync_slot(s)
            if invalidate:
                if data is not None and synced:
                    self._take(s, lo, hi, data)
                else:
                    self._mark_stale(s, lo, hi)

    def _take(self, s: int, lo: int, hi: int, data: memoryview) -> None:
        """Write-update: lines ``[lo, hi)`` (cache keys) are overwritten whole with ``data`` while
        the guest is stopped and the slot written back: slot ``s`` takes the bytes of its page
        into its copy and its snapshot, as re-reading them after the write would give."""
        page = self.slot_key[s]
        if page <= lo and hi <= page + PAGE:  # (the usual write: inside the page)
            o1, o2, chunk = lo - page, hi - page, data
        else:
            first, last = max(lo, page), min(hi, page + PAGE)
            chunk = data[first - lo : last - lo]
            o1, o2 = first - page, last - page
        mm = self.mm
        assert mm is not None
        base = s * PAGE
        if memaccel.ENABLED:
            changed = memaccel.helpers.copy_changed(mm, base + o1, chunk)
        else:
            changed = mm[base + o1 : base + o2] != chunk
            if changed:
                mm[base + o1 : base + o2] = chunk
        if changed:
            code = self.code_slots
            if code is None or s in code:
                self.updated.append(s)
        snap = self._snap[s]
        if type(snap) is not bytearray:
            snap = self._snap[s] = bytearray(snap)
        snap[o1:o2] = chunk
        self.stats.slot_updates += 1

    def _mark_stale(self, s: int, lo: int, hi: int) -> None:
        """Slot ``s`` must re-read the lines of its page inside ``[lo, hi)`` (cache keys)."""
        stale = self.stale
        runs = stale.get(s, _ABSENT)
        if runs is None:
            return  # the whole page already
        page = self.slot_key[s]
        first, last = max(lo, page), min(hi, page + PAGE)
        if last - first > _PARTIAL_LINES * LINE or (runs is not _ABSENT and len(runs) >= _PARTIAL_LINES):
            stale[s] = None
            return
        run = ((first - page) & ~(LINE - 1), (last - page + LINE - 1) & ~(LINE - 1))
        if runs is _ABSENT:
            stale[s] = [run]
        else:
            runs.append(run)

    def snoop_fill(self, key: int) -> None:
        """Coherent profile: a line of ``key``'s SPA is filled in ``key``'s domain."""
        peers = self._by_spa.get(key & SPA_MASK & ~(PAGE - 1))
        if not peers:
            return
        page_key = key & ~(PAGE - 1)
        for s in list(peers):
            if self.slot_key.get(s) != page_key:
                if s in self.writable:
                    self.sync_slot(s)
                self.stale[s] = None

    def fill_is_idle(self, key: int) -> bool:
        """Whether :meth:`snoop_fill` of every line of ``key``'s page would do nothing (no slot holds
        the page in another domain): the cache may then fill the page's lines without calling it."""
        peers = self._by_spa.get(key & SPA_MASK & ~(PAGE - 1))
        if not peers:
            return True
        page_key = key & ~(PAGE - 1)
        return all(self.slot_key.get(s) == page_key for s in peers)

    # ---- inspection --------------------------------------------------------------------------------
    def resident_pages(self) -> list[tuple[int, bool, int]]:
        """(asid, c, spa) of every page held (plaintext inside the SoC)."""
        return [key_domain(k) for k in self.slot_of]


def line_runs(cur: bytes | bytearray, snap: bytes | bytearray) -> list[tuple[int, int]]:
    """The runs of 64-byte lines where the pages ``cur`` and ``snap`` differ, ``[(lo, hi), ...]``
    byte offsets (the Python path of the C helper ``line_runs``, :mod:`sevemu.hw.memaccel`)."""
    out = []
    o = 0
    while o < PAGE:
        if not o % _BLOCK and cur[o : o + _BLOCK] == snap[o : o + _BLOCK]:
            o += _BLOCK  # (a block of lines compared at once: most of a page is unchanged)
            continue
        if cur[o : o + LINE] == snap[o : o + LINE]:
            o += LINE
            continue
        start = o
        o += LINE
        while o < PAGE and cur[o : o + LINE] != snap[o : o + LINE]:
            o += LINE
        out.append((start, o))
    return out


def _nothing() -> None:
    return None
