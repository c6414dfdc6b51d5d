"""The SoC's cache: set-associative, write-back, LRU, lines tagged by encryption domain.

Inside the SoC data is plaintext (APM2 15.34).  Each 64-byte line is tagged with the
domain of the access that brought it in, ``(ASID, C-bit)``, and its SPA; a lookup matches all three,
so a line of one ASID never serves another.  Lines reach DRAM only through the memory controller,
which encrypts them with the key of their own tag on eviction, CLFLUSH, VMPAGE_FLUSH or WBINVD.

Unencrypted accesses (C=0) carry no key, so they all share one domain ``(0, 0)`` whoever makes them:
that is why a shared (C=0) page works as a bounce buffer between a guest and the host without
flushes.  Encrypted lines of different ASIDs (or the same SPA seen with and without the C-bit) are
*not* coherent unless the profile has hardware-enforced coherency (CPUID Fn8000_001F EAX[10]):
two lines for one SPA may coexist, and whichever is written back last wins in DRAM — the reason the
hypervisor must flush before changing a page's key or C-bit (APM2 15.34).  With the coherency
feature, a fill evicts (writing back) every other-domain line of the same SPA first.

The whole cache hierarchy is modelled as one shared level: private L1/L2 levels would change timing,
which this model does not claim, but not which bytes reach DRAM.  The one exception is a private
level that holds whole pages for an instruction engine that cannot go through :meth:`Cache.line`
on every access (the Unicorn engine, :mod:`sevemu.hw.ucengine`): such a level attaches itself as a
:class:`CacheAgent` and the cache keeps it coherent by snooping, as a real hierarchy does -- before
anyone else reads lines of a page it holds, it writes its modifications back; before anyone else
writes, flushes or invalidates them, it writes back and drops (or refreshes) its copy.
"""

from __future__ import annotations

import mmap
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any, Protocol

import numpy as np

from sevemu._util.units import LINE, PAGE
from sevemu.errors import AlignmentError, InputError, KeySlotError
from sevemu.hw import memaccel
from sevemu.hw.memctl import MemoryController

__all__ = ["ASID_SHIFT", "C_SHIFT", "ENCRYPTED_ONLY", "SPA_MASK", "Cache", "CacheAgent", "key_domain", "tag_key"]

C_SHIFT = 52
ASID_SHIFT = 53
SPA_MASK = (1 << C_SHIFT) - 1
_LINE_MASK = ~(LINE - 1)
_BULK_MIN_LINES = 16  # shorter runs of dirty lines are written back one by one (the bulk call costs more)
_PAGE_FILL_MIN = 2 * LINE  # from this length on, a run inside a page fills its missing lines by one bulk read
_VISIT_MIN_LINES = 256  # from this many lines on, a range may visit its sets' lines instead of every address
# Equivalent mutants (mutation testing of this module, tools/mutate.py): another _BULK_MIN_LINES,
# removing the ``if not self.agents`` shortcut of _snoop or the ``if not clashes`` one of
# _drop_overwritten, and ``<`` for ``<=`` in flush_range's choice of path change only how fast the
# same lines reach DRAM, never which bytes; so do another _VISIT_MIN_LINES and ``<=`` for ``<`` in
# _resident_keys' choice between its two ways of finding the same keys.  The C paths of read_lines,
# read_runs and write_runs serve only lines resident under the key they are given and decline
# otherwise, so removing or negating their guards (``memaccel.ENABLED ...``), and ``1 >> C_SHIFT`` in
# write_runs' key (a key of no domain: nothing resident, the C path declines), run the Python path to
# the same bytes; so do the guards of _read_runs_rest's C calls and ``or`` for ``and`` in write_runs'
# choice of the C call (the helpers are there whenever the module is built).  Also equivalent: the
# ``if not victims`` and ``if not keys`` shortcuts (empty lists), the span _run_span caches for no runs
# (read_runs returns before using it), and negating ``not distinct`` in _write_victims: a page run's
# victims never share an SPA (each line of the run has its own set, and a coherent cache holds one
# domain's line per SPA), so bulk or one by one, in any order, they leave DRAM alike; removing
# _compact_dirty's trigger (the set rebuilt only for speed) or negating _resident_keys' choice between
# its two ways (as another _VISIT_MIN_LINES above); ``>=`` for ``>`` and ``or`` for the inner ``and`` in
# _write_lines_rest's choice of streaming (a path to the same state, taken more or less often); in
# _read_run's choice of a page run, ``PAGE - 2`` for ``PAGE - 1`` on a line address (always even) and
# ``mask - 1`` for ``mask + 1`` (fewer page runs: the same bytes line by line).  Also: removing
# _resident_keys' C call (the Python way finds the same keys), ``<=`` for ``<`` in the bound of the
# run-span memo, no C port from port() (the view's Python load/store: the same lookups), ``or`` for
# ``and`` in read_lines' choice of the C hit read (it serves a zero-length read as nothing too), and
# ``j + i`` for ``j - i`` in _write_runs' choice between bulk and line-by-line write-back.  Sampled runs
# (2026-12-06): a first sample of every tenth of the 798 mutants, 67 of 80 killed, the other 13
# equivalents named here; every tenth from #5 (#5, #15, ...), 66 of 80 killed, of the 14 left two real (an odd run offset
# read_runs did not refuse in any test; the slice of the wrapped sets in _resident_keys' visit),
# killed since by tests, and 12 equivalents named here.


def tag_key(asid: int, c: bool, spa: int) -> int:
    """The cache key of the line holding ``spa`` in domain (asid, c)."""
    if not c:
        asid = 0
    return (asid << ASID_SHIFT) | (int(c) << C_SHIFT) | (spa & _LINE_MASK)


def key_domain(key: int) -> tuple[int, bool, int]:
    """(asid, c, line spa) of a cache key."""
    return key >> ASID_SHIFT, bool((key >> C_SHIFT) & 1), key & SPA_MASK


class CacheAgent(Protocol):
    """A private level above the cache holding whole pages of plaintext, kept coherent by snooping.

    Keys are cache keys (:func:`tag_key`); a range ``[lo, hi)`` stays inside one encryption domain,
    except for WBINVD/INVD which pass every key.  ``origin`` arguments of the cache's methods name
    the agent doing the access, which is not snooped about its own accesses.
    """

    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        """Lines with keys in ``[lo, hi)`` are about to be read by someone else (write modified
        copies back first) or, with ``invalidate``, written, flushed or dropped (write back, then
        drop or refresh the copies).  ``data``: the lines are being overwritten whole with these
        bytes (:meth:`Cache.write_lines`); an agent may take them into its copies (write-update)
        instead of dropping the copies and reading the lines again."""

    def snoop_fill(self, key: int) -> None:
        """Coherent profiles only: the line ``key`` is being filled, so copies of the same SPA in
        other encryption domains must go (written back first).  (An agent may also have
        ``fill_is_idle(key) -> bool``: True when this would do nothing for any line of ``key``'s page;
        a page's fill then skips the calls and reads the page's lines in bulk, ``Cache._read_page_run``.)"""


ENCRYPTED_ONLY = "encrypted_only"
"""An agent with a true ``encrypted_only`` attribute holds lines of encrypted domains (C=1) only
(the VMSA unit): :meth:`Cache` does not snoop it about an unencrypted (C=0) range -- no key of such
a range can be one of its lines -- but still about WBINVD/INVD and coherent fills."""


_RUN_SPANS: dict[tuple[tuple[int, int], ...], tuple[int, int]] = {}
"""Runs :meth:`Cache.read_runs` was given (checked) -> their span (first offset, end): callers pass
a few constant tuples."""


def _run_span(runs: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """Check ``runs`` (whole lines inside a page) and return their span; remembered (a few callers
    pass a few constant tuples)."""
    lo, hi = PAGE, 0
    for off, length in runs:
        if (off | length) & (LINE - 1) or not 0 <= off < off + length <= PAGE:
            raise AlignmentError(f"read_runs takes runs of whole lines inside the page, got {length} bytes at "
                                 f"offset {off:#x}")
        lo, hi = min(lo, off), max(hi, off + length)
    if not runs:
        lo = hi = 0
    if len(_RUN_SPANS) < 256:
        _RUN_SPANS[runs] = (lo, hi)
    return lo, hi


class Cache:
    """Set-associative write-back cache with LRU replacement, in front of the memory controller."""

    def __init__(self, mc: MemoryController, size: int = 4 << 20, ways: int = 16,
                 coherent: bool = False) -> None:
        set_bytes = LINE * ways
        if ways < 1 or size < set_bytes or size % set_bytes or (size // set_bytes) & (size // set_bytes - 1):
            raise InputError(f"cache of {size} bytes, {ways} ways: the set count must be a power of two")
        nsets = size // set_bytes
        self.mc = mc
        self._readers = mc.readers  # per-domain fill functions, kept current by the memory controller
        self.size = size
        self.ways = ways
        self.coherent = coherent
        self.set_mask = nsets - 1
        # each set maps cache key -> the line's 64 plaintext bytes, in LRU order (oldest first)
        # (plain dicts keep insertion order: re-inserting a key makes it the most recent; they are
        # markedly cheaper than OrderedDict on this path, measured)
        self.sets: list[dict[int, bytearray]] = [{} for _ in range(nsets)]
        self.dirty: set[int] = set()
        """Keys of the lines modified since they were filled (written back on eviction)."""
        self.hits = 0
        self.misses = 0
        self.writebacks = 0
        self.flush_epoch = 0
        """Number of completed WBINVDs; the Secure Processor reads it to enforce ASID-reuse rules."""
        self.agents: tuple[CacheAgent, ...] = ()
        """Private page-holding levels above this cache (see :class:`CacheAgent`); usually none."""
        self.plain_agents: tuple[CacheAgent, ...] = ()
        """The agents snooped about an unencrypted (C=0) range: those not :data:`ENCRYPTED_ONLY`."""

    # ---- snooping -------------------------------------------------------------------------------
    def attach(self, agent: CacheAgent) -> None:
        """Keep ``agent`` coherent with this cache from now on."""
        if agent not in self.agents:
            self.agents = (*self.agents, agent)  # (a tuple: snoops iterate it without a copy)
            self._plain()

    def detach(self, agent: CacheAgent) -> None:
        if agent in self.agents:
            self.agents = tuple(a for a in self.agents if a is not agent)
            self._plain()

    def _plain(self) -> None:
        self.plain_agents = tuple(a for a in self.agents if not getattr(a, ENCRYPTED_ONLY, False))

    def _snoop(self, asid: int, c: bool, spa: int, length: int, invalidate: bool,
               origin: object | None, data: memoryview | None = None) -> None:
        if not self.agents:
            return
        domain = (asid << ASID_SHIFT | 1 << C_SHIFT) if c else 0  # (tag_key, inlined: every access)
        lo = domain | (spa & _LINE_MASK)
        hi = (domain | ((spa + max(length, 1) - 1) & _LINE_MASK)) + LINE
        for agent in self.agents if c else self.plain_agents:
            if agent is not origin:
                agent.snoop(lo, hi, invalidate, data)

    def _snoop_all(self) -> None:
        for agent in self.agents:
            agent.snoop(0, 1 << 64, True)

    # ---- the guest's memory port ----------------------------------------------------------------
    def port(self, view: weakref.ref[Any], tlb: dict[int, tuple[int, int, int]]) -> tuple[
            Callable[[int, int], int], Callable[[int, int, int], None]] | None:
        """(load, store) of a guest view of a core in C (``csrc/mem_accel.c``, ``Port``), or None
        where the C helpers are off: the same lookups, fills, evictions, write-backs, counters and
        LRU order as the view's Python ``_load`` / ``_store`` (:class:`~sevemu.hw.cpu.GuestCpu`), to
        which the C port hands every access it does not serve itself (one crossing a line, a set that
        is not exactly a dict, a coherent profile's fill, a domain without a key), as it calls the
        view's ``_walk`` on a TLB miss.  ``view`` is a weak reference to the view (which holds the
        port: no reference cycle).  The fill's decryption and the write-back's encryption stay the
        memory controller's (:attr:`MemoryController.readers`, :meth:`MemoryController.write_line`)."""
        if not memaccel.ENABLED:
            return None
        p = memaccel.helpers.Port(view, tlb, self.sets, self.set_mask, vars(self), self.dirty, self._readers,
                                  self.ways, self.coherent, self.fill, self.mc.write_line)
        return p.load, p.store

    # ---- the lookup every access goes through -------------------------------------------------
    def line(self, key: int) -> bytearray:
        """The plaintext of the line for cache key ``key`` (see :func:`tag_key`), filled on a miss.

        A caller that modifies the bytes must add ``key`` to :attr:`dirty`.
        """
        s = self.sets[(key >> 6) & self.set_mask]
        line = s.get(key)
        if line is not None:
            del s[key]  # most recently used: back to the end of the set's order
            s[key] = line
            self.hits += 1
            return line
        return self.fill(key, s)

    def fill(self, key: int, s: dict[int, bytearray], line: bytearray | None = None) -> bytearray:
        """The miss path of :meth:`line`, for a ``key`` known to be absent from its set ``s``:
        make room (the LRU victim, written back if dirty), then fill through the memory controller
        -- or, given the ``line`` of a write of all its bytes, take that without reading and
        decrypting the old contents from DRAM (the same miss, victims, key check and LRU order)."""
        self.misses += 1
        if self.coherent:
            self._evict_other_domains(key, s)
        if len(s) >= self.ways:
            for victim in s:  # the least recently used comes first
                break
            old = s.pop(victim)
            if victim in self.dirty:  # (Cache._writeback, inlined: the miss path)
                self.dirty.discard(victim)
                self.writebacks += 1
                self.mc.write_line(victim & SPA_MASK, victim >> ASID_SHIFT, bool((victim >> C_SHIFT) & 1), old)
        try:
            reader = self._readers[key >> C_SHIFT]
        except KeyError:
            raise KeySlotError(f"no key is loaded for ASID {key >> ASID_SHIFT}") from None
        if line is None:
            line = reader(key & SPA_MASK)  # a new bytearray, the cache's own
        s[key] = line
        return line

    def _evict_other_domains(self, key: int, s: dict[int, bytearray]) -> None:
        """Coherent profiles: before ``key`` is filled, every other-domain copy of its SPA goes
        (private levels snooped, lines in this cache written back and dropped)."""
        for agent in self.agents:
            agent.snoop_fill(key)
        spa = key & SPA_MASK
        for other in [k for k in s if k & SPA_MASK == spa]:
            self._writeback(other, s.pop(other))

    def _writeback(self, key: int, line: bytearray) -> None:
        if key in self.dirty:
            self.dirty.discard(key)
            self.writebacks += 1
            self.mc.write_line(key & SPA_MASK, key >> ASID_SHIFT, bool((key >> C_SHIFT) & 1), line)

    def _write_runs(self, keys: list[int], data: bytes | bytearray,
                    array: np.ndarray[tuple[int], np.dtype[np.uint64]] | None = None) -> None:
        """Write the dirty lines ``keys`` (sorted; one per SPA; ``array``: the same as a NumPy array,
        if the caller has one) back from ``data``, their 64-byte lines one after the other, each run of
        consecutive lines of one domain in one call of the memory controller's bulk path (the
        bytes :meth:`_writeback` would write line by line).  Sorting cache keys sorts by domain,
        then SPA, so a run never crosses domains."""
        if not keys:
            return
        mc = self.mc
        n = len(keys)
        if array is None:
            array = np.array(keys, dtype=np.uint64)
        breaks = np.flatnonzero(np.diff(array) != LINE) + 1
        bounds = [0, *breaks.tolist(), n]
        for i, j in pairwise(bounds):
            first = keys[i]
            asid, c = first >> ASID_SHIFT, bool((first >> C_SHIFT) & 1)
            if j - i < _BULK_MIN_LINES:
                for k in range(i, j):
                    mc.write_line(keys[k] & SPA_MASK, asid, c, data[k * LINE : (k + 1) * LINE])
            else:
                mc.write_run(first & SPA_MASK, asid, c, memoryview(data)[i * LINE : j * LINE])

    def _drop_overwritten(self, keys: list[int]) -> list[int]:
        """The sorted dirty ``keys`` without the lines another domain's line of the same SPA
        overwrites in DRAM: the one later in its set's order survives, as if each line were written
        back in set order (the sets must still hold them; the overwritten count as encrypted)."""
        clashes = [spa for spa, n in Counter(key & SPA_MASK for key in keys).items() if n > 1]
        if not clashes:
            return keys
        sets, mask = self.sets, self.set_mask
        last: dict[int, int] = {}
        for spa in clashes:
            order = list(sets[(spa >> 6) & mask])  # set order; lines of one SPA share a set
            writers = [key for key in order if key & SPA_MASK == spa and key in self.dirty]
            last[spa] = writers[-1]
            self.mc.lines_encrypted += sum(1 for key in writers[:-1] if (key >> C_SHIFT) & 1)
        return [key for key in keys if last.get(key & SPA_MASK, key) == key]

    # ---- multi-byte helpers (host accesses, page-table walks, tests) -------------------------
    def read(self, asid: int, c: bool, spa: int, length: int, origin: object | None = None) -> bytes:
        """``length`` bytes at ``spa`` in domain (asid, c), through the cache."""
        self._snoop(asid, c, spa, length, False, origin)
        out = bytearray()
        pos = spa
        end = spa + length
        while pos < end:
            off = pos & (LINE - 1)
            n = min(LINE - off, end - pos)
            out += self.line(tag_key(asid, c, pos))[off : off + n]
            pos += n
        return bytes(out)

    def write(self, asid: int, c: bool, spa: int, data: bytes | bytearray | memoryview,
              origin: object | None = None) -> None:
        """Store ``data`` at ``spa`` in domain (asid, c), through the cache (write-allocate)."""
        view = memoryview(data).cast("B")
        pos = 0
        length = len(view)
        self._snoop(asid, c, spa, length, True, origin)
        while pos < length:
            addr = spa + pos
            off = addr & (LINE - 1)
            n = min(LINE - off, length - pos)
            key = tag_key(asid, c, addr)
            self.line(key)[off : off + n] = view[pos : pos + n]
            self.dirty.add(key)
            pos += n

    # ---- whole lines in one call (private levels, the host's mapped pages) ----------------------
    def read_lines(self, asid: int, c: bool, spa: int, length: int, origin: object | None = None) -> bytes:
        """:meth:`read` of a run of whole lines (``spa`` and ``length`` multiples of :data:`LINE`):
        the same bytes, hits, misses and LRU order, with one snoop and one key per line."""
        if (spa | length) & (LINE - 1):
            raise AlignmentError(f"read_lines takes whole lines, got {length} bytes at {spa:#x}")
        key = (asid << ASID_SHIFT | 1 << C_SHIFT | spa) if c else spa  # (tag_key of a line, inlined)
        for agent in self.agents if c else self.plain_agents:  # (Cache._snoop, inlined)
            if agent is not origin:
                agent.snoop(key, key + (length or LINE), False, None)
        if memaccel.ENABLED and length:  # every line resident: the same hits and LRU order, in C
            got = memaccel.helpers.cache_hit_read(self.sets, self.set_mask, key, length >> 6, self.__dict__)
            if got is not None:
                return got
        return self._read_run(key, length)

    def read_runs(self, asid: int, c: bool, spa: int, runs: tuple[tuple[int, int], ...],
                  origin: object | None = None) -> bytes:
        """:meth:`read_lines` of several runs of whole lines inside the page at ``spa`` (``runs``:
        ``(offset, length)`` pairs, multiples of :data:`LINE`, in any order), joined in the order
        given: the same bytes, hits, misses and LRU order as one :meth:`read_lines` per run, with
        one snoop of the range from the first line to the last.  (A read snoop asks the agents to
        write back their modified lines of a page -- each agent holds and writes back whole pages
        -- so one snoop of the page's range is the snoop of every run.)"""
        if spa & (PAGE - 1):
            raise AlignmentError(f"read_runs takes a page address, got {spa:#x}")
        try:
            span = _RUN_SPANS.get(runs)
        except TypeError:  # (lists: the same runs as tuples)
            runs = tuple((off, length) for off, length in runs)
            span = None
        if span is None:
            span = _run_span(runs)
        if not runs:
            return b""
        key = (asid << ASID_SHIFT | 1 << C_SHIFT | spa) if c else spa  # (tag_key of a page, inlined)
        for agent in self.agents if c else self.plain_agents:  # (Cache._snoop, inlined)
            if agent is not origin:
                agent.snoop(key + span[0], key + span[1], False, None)
        return self._read_runs_rest(key, runs)

    def _read_runs_rest(self, key: int, runs: tuple[tuple[int, int], ...]) -> bytes:
        """:meth:`read_runs` after its snoop, from the key of the page (``runs`` checked)."""
        if memaccel.ENABLED:  # every line resident: the same bytes, hits and LRU order, in C
            got = memaccel.helpers.cache_hit_runs(self.sets, self.set_mask, key, runs, self.__dict__)
            if got is not None:
                return got
        parts = []
        for off, length in runs:
            got = None
            if memaccel.ENABLED:  # every line of the run resident, in C
                got = memaccel.helpers.cache_hit_read(self.sets, self.set_mask, key + off, length >> 6, self.__dict__)
            if got is None:
                got = self._read_run(key + off, length)
            parts.append(got)
        return b"".join(parts)

    def _read_run(self, key: int, length: int) -> bytes:
        """The lines of keys ``[key, key + length)``, each a hit or a fill, in order."""
        sets, mask = self.sets, self.set_mask
        if length >= _PAGE_FILL_MIN and (key & (PAGE - 1)) + length <= PAGE and length >> 6 <= mask + 1:
            got = self._read_page_run(key, length)
            if got is not None:
                return got
        parts = []
        for k in range(key, key + length, LINE):
            s = sets[(k >> 6) & mask]
            line = s.pop(k, None)
            if line is None:
                line = self.fill(k, s)
            else:
                s[k] = line  # most recently used (Cache.line, inlined)
                self.hits += 1
            parts.append(line)
        return b"".join(parts)

    def _read_page_run(self, key: int, length: int) -> bytes | None:
        """:meth:`_read_run` of lines inside one page, each in its own set, with the missing lines'
        plaintext read from DRAM by one bulk decryption (:meth:`MemoryController.read_run`), or None
        (nothing done) where that could differ from line-by-line fills: no key for the domain, or on a
        coherent profile an agent that would act on a fill of this page (:meth:`CacheAgent.snoop_fill`
        of another domain's copy; an agent without ``fill_is_idle`` always counts as acting).

        In line order, as :meth:`fill` does each: a hit moves to the most recent place; a miss counts,
        (coherent) drops the other domains' lines of its SPA from its set, then its set's LRU victim.
        Then the dropped dirty lines are written back (in bulk runs: each from its own set, so no two
        share an SPA -- a coherent cache holds one domain's line per SPA), then the missing lines are
        read.  The same bytes, lines, LRU order, counters and DRAM: no line's fill touches another's
        set or SPA (the lines of a page are in distinct sets), every write-back of a line's SPA still
        comes before its read, and an idle agent's ``snoop_fill`` changes nothing.  The steps around
        the bulk read run in C where built (``cache_page_plan`` / ``cache_page_install``)."""
        if key >> C_SHIFT not in self._readers:
            return None  # (the line-by-line path raises the fill's KeySlotError)
        coherent = self.coherent
        if coherent:
            for agent in self.agents:
                idle = getattr(agent, "fill_is_idle", None)
                if idle is None or not idle(key):
                    return None
        sets, mask, ways, dirty = self.sets, self.set_mask, self.ways, self.dirty
        # (coherent: the other domains a line of the SPA can be in -- a line is only ever allocated in
        # a domain with a reader, and the memory controller never drops one -- looked up directly)
        others = [d << C_SHIFT for d in self._readers if d != key >> C_SHIFT] if coherent else []
        if memaccel.ENABLED and memaccel.PAGE_FILL:  # the same steps in C
            got = memaccel.helpers.cache_page_plan(sets, mask, key, length >> 6, ways, dirty, tuple(others))
            if got is not None:
                lines_c, wb, wb_lines, hits_c, first_i, last_i, clash = got
                self.hits += hits_c
                if first_i < 0:
                    return b"".join(lines_c)  # type: ignore[arg-type]
                self.misses += (length >> 6) - hits_c
                self._write_victims(wb, wb_lines, not clash)
                first = key + first_i * LINE
                plain = self.mc.read_run(first & SPA_MASK, (last_i + 1 - first_i) * LINE, key >> ASID_SHIFT,
                                         bool((key >> C_SHIFT) & 1))
                got_bytes: bytes = memaccel.helpers.cache_page_install(sets, mask, key, lines_c, plain, first_i)
                return got_bytes
        lines: list[bytearray | None] = []
        victims: list[int] = []  # dirty LRU victims: written back after the loop, in bulk runs
        olds: list[bytearray] = []
        first = last = -1
        hits = 0
        for k in range(key, key + length, LINE):
            s = sets[(k >> 6) & mask]
            line = s.pop(k, None)
            if line is not None:
                s[k] = line  # most recently used (Cache.line, inlined)
                hits += 1
            else:
                if others:
                    spa = k & SPA_MASK
                    for o in others:
                        if o | spa in s:
                            self._evict_clashes(spa, s)
                            break
                if len(s) >= ways:
                    for victim in s:  # the least recently used comes first
                        break
                    old = s.pop(victim)
                    if victim in dirty:
                        victims.append(victim)
                        olds.append(old)
                if first < 0:
                    first = k
                last = k
            lines.append(line)
        self.hits += hits
        if first < 0:
            return b"".join(lines)  # type: ignore[arg-type]
        self.misses += (length >> 6) - hits
        self._write_victims(victims, olds, True)
        plain_view = memoryview(self.mc.read_run(first & SPA_MASK, last + LINE - first, key >> ASID_SHIFT,
                                                 bool((key >> C_SHIFT) & 1)))
        i = (first - key) >> 6
        for k in range(first, last + LINE, LINE):
            if lines[i] is None:
                pos = k - first
                line = lines[i] = bytearray(plain_view[pos : pos + LINE])
                sets[(k >> 6) & mask][k] = line
            i += 1
        return b"".join(lines)  # type: ignore[arg-type]

    def _write_victims(self, victims: list[int], olds: list[bytearray], distinct: bool) -> None:
        """Write back the dirty lines ``victims`` (keys; ``olds`` their bytes) a page run dropped, in
        that order -- or, when their SPAs are ``distinct`` (each from its own set), in bulk runs of
        consecutive lines (the same DRAM bytes: no two write one SPA)."""
        if not victims:
            return
        self.dirty.difference_update(victims)
        self.writebacks += len(victims)
        if not distinct or len(victims) < _BULK_MIN_LINES:
            write_line = self.mc.write_line
            for victim, old in zip(victims, olds):
                write_line(victim & SPA_MASK, victim >> ASID_SHIFT, bool((victim >> C_SHIFT) & 1), old)
        else:
            order = sorted(range(len(victims)), key=victims.__getitem__)
            self._write_runs([victims[j] for j in order], b"".join([olds[j] for j in order]))

    def _evict_clashes(self, spa: int, s: dict[int, bytearray]) -> None:
        """:meth:`_evict_other_domains` without the agents' snoops: every line of ``spa`` in ``s``
        (of other domains: the caller's own line is not in it) written back and dropped, in set order."""
        for other in [o for o in s if o & SPA_MASK == spa]:
            self._writeback(other, s.pop(other))

    def write_lines(self, asid: int, c: bool, spa: int, data: bytes | bytearray | memoryview,
                    origin: object | None = None) -> None:
        """:meth:`write` of a run of whole lines (``spa`` and ``len(data)`` multiples of
        :data:`LINE`): the same lines, bytes and dirty set, with one snoop and one key per line."""
        view = memoryview(data)
        if type(data) is not bytes and (view.ndim != 1 or view.format != "B"):  # (bytes: always flat bytes)
            view = view.cast("B")
        length = len(view)
        if (spa | length) & (LINE - 1):
            raise AlignmentError(f"write_lines takes whole lines, got {length} bytes at {spa:#x}")
        key = (asid << ASID_SHIFT | 1 << C_SHIFT | spa) if c else spa  # (tag_key of a line, inlined)
        for agent in self.agents if c else self.plain_agents:  # (Cache._snoop, inlined; whole lines: agents may take the bytes)
            if agent is not origin:
                agent.snoop(key, key + (length or LINE), True, view)
        self._write_lines_rest(key, view)

    def _write_lines_rest(self, key: int, view: memoryview) -> None:
        """:meth:`write_lines` after its snoop, from the key of the first line (``view``: flat bytes,
        whole lines)."""
        length = len(view)
        dirty = self.dirty
        if memaccel.ENABLED and length and memaccel.helpers.cache_hit_write(
                self.sets, self.set_mask, key, view, dirty, self.__dict__):
            return  # every line resident: the same bytes, dirty set, hits and LRU order, in C
        sets, mask = self.sets, self.set_mask
        stream = length > self.size and not (self.coherent and self.agents)
        for pos in range(0, self.size if stream else length, LINE):
            k = key + pos
            s = sets[(k >> 6) & mask]
            line = s.pop(k, None)
            if line is None:  # every byte is overwritten: allocated without a fill from DRAM
                self.fill(k, s, bytearray(view[pos : pos + LINE]))
            else:
                s[k] = line  # most recently used (Cache.line, inlined)
                self.hits += 1
                line[:] = view[pos : pos + LINE]
            dirty.add(k)
        if stream:
            self._stream_rest(key, view)

    def _stream_rest(self, key: int, view: memoryview) -> None:
        """The rest of a :meth:`write_lines` of more than the cache's size whose first
        :attr:`size` bytes went through the loop above, in bulk, with the same end state.

        The first ``size`` bytes of a contiguous run give every set exactly :attr:`ways` accesses, so
        after them each set holds only lines of this write, all dirty, and everything that was
        resident before is written back or overwritten.  From there on each line is a miss that
        evicts the least recently used line of its set -- always a line of this write -- so the
        lines before the last ``size`` bytes all reach DRAM with the bytes written, and the cache
        ends holding the last ``size`` bytes, each set's lines in address order (least recent
        first), all dirty: one bulk write-back and a refill of the sets instead of a fill and an
        eviction per line.  (Not for a coherent profile with private levels attached: each fill
        there also snoops them about other domains' copies of its line.)"""
        size, length = self.size, len(view)
        head = length - size  # the lines evicted: the first size bytes and the misses after them
        self.mc.write_run(key & SPA_MASK, key >> ASID_SHIFT, bool((key >> C_SHIFT) & 1), view[:head])
        fills = (length - size) // LINE
        self.misses += fills
        self.writebacks += fills
        sets, mask = self.sets, self.set_mask
        for s in sets:  # (every line in them is one of this write's first size bytes)
            s.clear()
        dirty = self.dirty
        dirty.difference_update(range(key, key + min(head, size), LINE))
        for pos in range(head, length, LINE):
            k = key + pos
            sets[(k >> 6) & mask][k] = bytearray(view[pos : pos + LINE])
        dirty.update(range(key + head, key + length, LINE))

    def write_runs(self, asid: int, c: bool, spa: int, buf: bytes | bytearray | mmap.mmap, base: int,
                   runs: list[tuple[int, int]], origin: object | None = None) -> None:
        """:meth:`write_lines` of each run ``(lo, hi)`` of ``runs`` (byte offsets of whole lines in
        the page at ``spa``, ascending, as :func:`~sevemu.hw.uc.pool.line_runs` gives them) with the
        bytes ``buf[base + lo : base + hi]``, in order: the same lines, bytes, dirty set, LRU order
        and snoops -- in one call when no agent but ``origin`` is snooped and every line is
        resident (a private level writing back the lines it modified in a page)."""
        if spa & (PAGE - 1):
            raise AlignmentError(f"write_runs takes a page address, got {spa:#x}")
        if memaccel.ENABLED and type(runs) is list:
            for agent in self.agents if c else self.plain_agents:
                if agent is not origin:
                    break
            else:  # nobody to snoop: every line resident, in C
                key = (asid << ASID_SHIFT | 1 << C_SHIFT | spa) if c else spa  # (tag_key of a page, inlined)
                if memaccel.helpers.cache_hit_write_runs(self.sets, self.set_mask, key, buf, base, runs, self.dirty,
                                                         self.__dict__):
                    return
        for lo, hi in runs:
            self.write_lines(asid, c, spa + lo, buf[base + lo : base + hi], origin)

    # ---- maintenance --------------------------------------------------------------------------
    def clflush(self, asid: int, c: bool, spa: int) -> bool:
        """CLFLUSH: write back and invalidate the line of ``spa`` in domain (asid, c) only.

        Returns whether a line was present.  A host CLFLUSH names the host's own domain, so it
        does not evict guest-tagged lines (APM2 15.34).
        """
        key = tag_key(asid, c, spa)
        self._snoop(asid, c, spa, 1, True, None)
        s = self.sets[(key >> 6) & self.set_mask]
        line = s.pop(key, None)
        if line is None:
            return False
        self._writeback(key, line)
        return True

    def flush_range(self, asid: int, c: bool, spa: int, length: int) -> None:
        """CLFLUSH every line of ``[spa, spa+length)`` in domain (asid, c) (Linux ``clflush_cache_range``).

        The same lines flushed and the same bytes in DRAM as one :meth:`clflush` per line; the
        dirty lines are written back in bulk (:meth:`_write_runs`), and a range with more lines
        than the cache holds is flushed by visiting the resident lines instead of every address.
        """
        lo = spa & _LINE_MASK
        hi = spa + length
        if hi <= lo:
            return
        self._snoop(asid, c, lo, hi - lo, True, None)
        klo = tag_key(asid, c, lo)
        khi = klo + (hi - lo)
        sets, mask = self.sets, self.set_mask
        if hi - lo > self.size and memaccel.ENABLED:  # visit the resident lines, in C
            before = len(self.dirty)
            try:
                keys, data, packed = memaccel.helpers.cache_take(sets, klo, khi, self.dirty)
            except TypeError:  # a line that is not a 64-byte bytearray: nothing was taken
                pass
            else:
                if len(self.dirty) < before // 4:
                    self._compact_dirty()
                self.writebacks += len(keys)
                self._write_runs(keys, data, np.frombuffer(packed, dtype="<u8").astype(np.uint64))
                return
        if hi - lo <= self.size:  # no more lines than the cache holds: look up the range's lines
            keys = self._resident_keys(klo, khi)
            lines = [sets[(key >> 6) & mask].pop(key) for key in keys]
        else:
            keys, lines = self._take_resident(klo, khi)
        if not keys:
            return
        dirty = self.dirty
        written = np.fromiter(map(dirty.__contains__, keys), dtype=bool, count=len(keys))
        count = int(np.count_nonzero(written))
        if not count:
            return
        array = np.array(keys, dtype=np.uint64)[written]
        order = np.argsort(array)
        array = array[order]
        picked = np.flatnonzero(written)[order].tolist()
        keys = [keys[i] for i in picked]
        if count == len(dirty):
            dirty.clear()  # (every dirty line was in the range: no second pass)
        else:
            dirty.difference_update(keys)
            if len(dirty) < count // 4:
                self._compact_dirty()
        self.writebacks += count
        self._write_runs(keys, b"".join([lines[i] for i in picked]), array)

    def _compact_dirty(self) -> None:
        """Give :attr:`dirty` a table sized for what is left after a bulk removal: a set keeps the
        table of its largest size, and iterating it (the PSP's coherent reads do) walks every slot."""
        rest = list(self.dirty)
        self.dirty.clear()
        self.dirty.update(rest)

    def _take_resident(self, klo: int, khi: int) -> tuple[list[int], list[bytearray]]:
        """Remove and return (keys, lines) of every resident line with a key in ``[klo, khi)`` by
        visiting the resident lines (a range with more lines than the cache holds): the keys of all
        sets are gathered in one pass and compared at once; sets entirely inside go in one call."""
        sets = self.sets
        keys: list[int] = []
        lines: list[bytearray] = []
        sizes: list[int] = []
        for s in sets:
            keys.extend(s)
            lines.extend(s.values())
            sizes.append(len(s))
        if not keys:
            return [], []
        array = np.array(keys, dtype=np.uint64)
        inside = (array >= klo) & (array < khi)
        picked = np.flatnonzero(inside)
        if len(picked) == len(keys):  # every resident line is in the range
            for s in sets:
                s.clear()
            return keys, lines
        counts = np.asarray(sizes)
        per_set = np.bincount(np.repeat(np.arange(len(sets)), counts)[picked], minlength=len(sets))
        full = np.flatnonzero((per_set == counts) & (counts > 0)).tolist()
        for i in full:
            sets[i].clear()
        mask = self.set_mask
        full_set = set(full)
        out_keys = [keys[i] for i in picked.tolist()]
        for key in out_keys:
            index = (key >> 6) & mask
            if index not in full_set:
                del sets[index][key]
        return out_keys, [lines[i] for i in picked.tolist()]

    def resident_keys(self, asid: int, c: bool, spa: int, length: int) -> list[int]:
        """Keys of the lines of ``[spa, spa+length)`` resident in domain (asid, c), in address order
        (the range at most :attr:`size` bytes)."""
        lo = spa & _LINE_MASK
        klo = tag_key(asid, c, lo)
        return self._resident_keys(klo, klo + max(spa + length - lo, 0))

    def _resident_keys(self, klo: int, khi: int) -> list[int]:
        """:meth:`resident_keys` of the key range ``[klo, khi)``: one lookup per address, or -- for a
        long range whose sets hold fewer lines than it has addresses (a DMA buffer, a page run in a
        mostly empty cache) -- a visit of the lines those sets hold.  The same keys either way."""
        sets, mask = self.sets, self.set_mask
        if memaccel.ENABLED:  # the same keys, in C (which of the two ways is its choice)
            found = memaccel.helpers.resident_keys(sets, mask, klo, khi)
            if found is not None:  # (None: a set is a dict subclass, answered in Python below)
                return found
        lines = (khi - klo) >> 6
        if lines >= _VISIT_MIN_LINES:
            first = (klo >> 6) & mask
            nsets = len(sets)
            if lines >= nsets:
                mapped = sets
            elif first + lines <= nsets:
                mapped = sets[first : first + lines]
            else:
                mapped = sets[first:] + sets[: first + lines - nsets]
            busy = list(filter(None, mapped))
            if sum(map(len, busy)) < lines:
                return sorted([key for s in busy for key in s if klo <= key < khi])
        return [key for key in range(klo, khi, LINE) if key in sets[(key >> 6) & mask]]

    def vmpage_flush(self, asid: int, spa: int) -> int:
        """VMPAGE_FLUSH MSR: write back and invalidate the encrypted lines of one 4 KiB page of ``asid``."""
        if spa & 0xFFF:
            raise AlignmentError(f"VMPAGE_FLUSH takes a page address, got {spa:#x}")
        n = 0
        for addr in range(spa, spa + 4096, LINE):
            n += self.clflush(asid, True, addr)
        return n

    def wbinvd(self) -> int:
        """WBINVD: write back every dirty line and invalidate the whole cache; returns lines written.

        Written back in bulk (:meth:`_write_runs`) with the bytes of one write-back per line in set
        order: where two domains hold the same SPA dirty (non-coherent profiles), DRAM keeps the
        line later in its set's order, which would be written last.
        """
        self._snoop_all()
        dirty = self.dirty
        sets, mask = self.sets, self.set_mask
        keys = self._drop_overwritten(sorted(dirty))
        data = b"".join([sets[(key >> 6) & mask][key] for key in keys])
        for s in sets:
            s.clear()
        written = len(dirty)
        dirty.clear()
        self.writebacks += written
        self._write_runs(keys, data)
        self.flush_epoch += 1
        return written

    def invalidate_all(self) -> None:
        """INVD: drop every line without writing anything back."""
        self._snoop_all()
        for s in self.sets:
            s.clear()
        self.dirty.clear()

    # ---- inspection ---------------------------------------------------------------------------
    def resident(self) -> Iterator[tuple[int, bool, int, bool]]:
        """(asid, c, spa, dirty) of every resident line."""
        for s in self.sets:
            for key in s:
                asid, c, spa = key_domain(key)
                yield asid, c, spa, key in self.dirty

    def peek(self, asid: int, c: bool, spa: int) -> bytes | None:
        """The cached plaintext of a line without touching LRU state or filling; None if absent."""
        key = tag_key(asid, c, spa)
        line = self.sets[(key >> 6) & self.set_mask].get(key)
        return None if line is None else bytes(line)
