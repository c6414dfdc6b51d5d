"""The cache's whole-line calls (``read_lines`` / ``write_lines`` / ``read_runs``) against ``read`` /
``write``: the same bytes, lines, LRU order, counters, DRAM contents and snoops, for any sequence of
accesses, with and without the C path for runs of resident lines."""

from __future__ import annotations

import random

import pytest
from hwkit import mem_accel
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto.memenc import EncryptionMode, TweakConstants
from sevemu.errors import AlignmentError, KeySlotError
from sevemu.hw import memaccel
from sevemu.hw.cache import Cache, tag_key
from sevemu.hw.dram import LINE, Dram
from sevemu.hw.memctl import MemoryController

MiB = 1 << 20
_DOMAINS = [(0, False), (0, True), (1, True), (2, True)]
_BASE = 0x10000


class _Agent:
    """A private level that records the snoops it gets."""

    def __init__(self) -> None:
        self.snoops: list[tuple[int, int, bool]] = []

    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        self.snoops.append((lo, hi, invalidate))

    def snoop_fill(self, key: int) -> None:
        self.snoops.append((key, key, False))


def _twin(coherent: bool) -> tuple[Cache, _Agent]:
    r = random.Random(5)
    mc = MemoryController(Dram(4 * MiB), EncryptionMode.XEX, TweakConstants.random_zen2(48, r), 15,
                          rng=r.randbytes)
    port = mc.secure_port()
    port.load(1, r.randbytes(16))
    port.load(2, r.randbytes(16))
    cache = Cache(mc, 4096, 4, coherent)  # 64 lines in 16 sets: runs evict each other
    agent = _Agent()
    cache.attach(agent)
    return cache, agent


def _state(cache: Cache) -> tuple[object, ...]:
    return (list(cache.mc.dram.pages()), [list(s.items()) for s in cache.sets], sorted(cache.dirty),
            cache.hits, cache.misses, cache.writebacks, cache.mc.lines_encrypted)


_op = st.tuples(st.sampled_from(["write", "read"]), st.integers(0, len(_DOMAINS) - 1), st.integers(0, 80),
                st.integers(1, 24), st.integers(0, 255))


@settings(max_examples=80, deadline=None)
@given(coherent=st.booleans(), ops=st.lists(_op, max_size=30))
def test_whole_line_calls_equal_read_and_write(coherent: bool, ops: list[tuple[str, int, int, int, int]]) -> None:
    fast, fagent = _twin(coherent)
    ref, ragent = _twin(coherent)
    for kind, d, line, n, seed in ops:
        asid, c = _DOMAINS[d]
        spa = _BASE + line * LINE
        if kind == "write":
            data = random.Random(seed).randbytes(n * LINE)
            fast.write_lines(asid, c, spa, data)
            ref.write(asid, c, spa, data)
        else:
            assert fast.read_lines(asid, c, spa, n * LINE) == ref.read(asid, c, spa, n * LINE)
        assert _state(fast) == _state(ref)
    assert fagent.snoops == ragent.snoops
    assert fast.wbinvd() == ref.wbinvd()
    assert _state(fast) == _state(ref)


@settings(max_examples=60, deadline=None)
@given(coherent=st.booleans(), attached=st.booleans(), ops=st.lists(_op, max_size=20),
       d=st.integers(0, len(_DOMAINS) - 1), line=st.integers(0, 80), n=st.integers(64, 300),
       seed=st.integers(0, 255))
def test_a_write_larger_than_the_cache_equals_line_by_line_writes(
        coherent: bool, attached: bool, ops: list[tuple[str, int, int, int, int]], d: int, line: int, n: int,
        seed: int) -> None:
    """write_lines of more than the cache holds streams the part that cannot stay resident
    (``Cache._stream_rest``): the same DRAM bytes, sets in the same LRU order, dirty lines and
    counters as one write per line, whatever was resident (lines of the range, other domains'
    lines of its SPAs, dirty or clean) -- then after a WBINVD too."""
    fast, fagent = _twin(coherent)
    ref, _ = _twin(coherent)
    if not attached:
        fast.detach(fagent)
    for kind, od, oline, on, oseed in ops:  # something resident first
        asid, c = _DOMAINS[od]
        data = random.Random(oseed).randbytes(on * LINE)
        for cache in (fast, ref):
            if kind == "write":
                cache.write(asid, c, _BASE + oline * LINE, data)
            else:
                cache.read(asid, c, _BASE + oline * LINE, on * LINE)
    asid, c = _DOMAINS[d]
    spa = _BASE + line * LINE
    data = random.Random(seed).randbytes(n * LINE)
    fast.write_lines(asid, c, spa, data)
    for pos in range(0, len(data), LINE):
        ref.write(asid, c, spa + pos, data[pos : pos + LINE])
    assert _state(fast) == _state(ref)
    assert fast.read_lines(asid, c, spa, n * LINE) == ref.read(asid, c, spa, n * LINE) == data
    assert fast.wbinvd() == ref.wbinvd()
    assert _state(fast) == _state(ref)


def test_whole_line_calls_do_not_snoop_their_origin() -> None:
    cache, agent = _twin(False)
    cache.write_lines(0, False, _BASE, bytes(2 * LINE), origin=agent)
    cache.read_lines(0, False, _BASE, 2 * LINE, origin=agent)
    assert agent.snoops == []
    cache.read_lines(0, False, _BASE, 2 * LINE)
    assert agent.snoops == [(_BASE, _BASE + 2 * LINE, False)]


@pytest.mark.parametrize(("spa", "length"), [(_BASE + 8, LINE), (_BASE, LINE + 8), (_BASE, 8)])
def test_whole_line_calls_refuse_parts_of_lines(spa: int, length: int) -> None:
    cache, agent = _twin(False)
    with pytest.raises(AlignmentError, match="whole lines"):
        cache.read_lines(1, True, spa, length)
    with pytest.raises(AlignmentError, match="whole lines"):
        cache.write_lines(1, True, spa, bytes(length))
    assert _state(cache) == _state(_twin(False)[0]) and agent.snoops == []


_run = st.tuples(st.integers(0, 63), st.integers(1, 8))


@settings(max_examples=90, deadline=None)
@given(coherent=st.booleans(), d=st.integers(0, len(_DOMAINS) - 1), page=st.integers(0, 1),
       runs=st.lists(_run, min_size=1, max_size=4), seed=st.integers(0, 255), resident=st.booleans(),
       accel=st.booleans())
def test_read_runs_equal_one_read_lines_per_run(coherent: bool, d: int, page: int, runs: list[tuple[int, int]],
                                                seed: int, resident: bool, accel: bool) -> None:
    """The same bytes, state (hits and misses counted once) and snoops as read_lines run by run,
    whether some lines miss or every one is resident, with the C helpers and with the Python loops."""
    with mem_accel(accel):
        _read_runs_case(coherent, d, page, runs, seed, resident)


def _read_runs_case(coherent: bool, d: int, page: int, runs: list[tuple[int, int]], seed: int,
                    resident: bool) -> None:
    fast, fagent = _twin(coherent)
    ref, ragent = _twin(coherent)
    asid, c = _DOMAINS[d]
    base = _BASE + page * 4096
    first = seed % 32
    for cache in (fast, ref):  # some lines resident (dirty), others not
        cache.write_lines(asid, c, base + first * LINE, random.Random(seed).randbytes(8 * LINE))
    if resident:  # every run inside the eight resident lines
        runs = [(first + line % 8, 1 + (n - 1) % (8 - line % 8)) for line, n in runs]
    spans = tuple((line * LINE, min(n, 64 - line) * LINE) for line, n in runs)
    fagent.snoops.clear()
    ragent.snoops.clear()
    got = fast.read_runs(asid, c, base, spans)
    assert got == b"".join(ref.read_lines(asid, c, base + off, length) for off, length in spans)
    assert _state(fast) == _state(ref)
    lo, hi = min(o for o, _ in spans), max(o + n for o, n in spans)
    assert [s for s in fagent.snoops if s[0] != s[1]] == [(tag_key(asid, c, base + lo), tag_key(asid, c, base + hi),
                                                           False)]  # one snoop of the span
    assert [s for s in fagent.snoops if s[0] == s[1]] == [s for s in ragent.snoops if s[0] == s[1]]  # the fills


def test_read_runs_refuses_runs_outside_the_page_or_parts_of_lines() -> None:
    cache, agent = _twin(False)
    before = _state(cache)
    for spa, runs in [(_BASE + LINE, ((0, LINE),)), (_BASE, ((8, LINE),)), (_BASE, ((0, LINE), (4032, 2 * LINE))),
                      (_BASE, ((0, 0),)), (_BASE, ((1, LINE),)), (_BASE, ((0, LINE + 1),))]:  # (odd: bit 0 too)
        with pytest.raises(AlignmentError):
            cache.read_runs(1, True, spa, runs)
    assert cache.read_runs(1, True, _BASE, ()) == b""  # nothing read, nobody snooped
    assert _state(cache) == before and agent.snoops == []


def test_write_runs_refuses_an_address_inside_a_page() -> None:
    cache, agent = _twin(False)
    before = _state(cache)
    with pytest.raises(AlignmentError, match="page address"):
        cache.write_runs(1, True, _BASE + LINE, bytes(4096), 0, [(0, LINE)])
    assert _state(cache) == before and agent.snoops == []


@pytest.mark.parametrize("asid", [1, 2])
def test_write_runs_write_their_own_domain_beside_another_domains_resident_lines(asid: int) -> None:
    """The host's SME domain (ASID 0, C=1) and the guest's hold lines of the same page, all resident:
    the runs land in the guest's lines only, as one write_lines per run puts them."""
    fast, fagent = _twin(False)
    ref, ragent = _twin(False)
    buf = random.Random(asid).randbytes(4096)
    for cache in (fast, ref):
        cache.write_lines(0, True, _BASE, b"\1" * (4 * LINE))
        cache.write_lines(asid, True, _BASE, b"\2" * (4 * LINE))
    fast.write_runs(asid, True, _BASE, buf, 0, [(0, 2 * LINE), (3 * LINE, 4 * LINE)], origin=fagent)  # (C path)
    for lo, hi in [(0, 2 * LINE), (3 * LINE, 4 * LINE)]:
        ref.write_lines(asid, True, _BASE + lo, buf[lo:hi], origin=ragent)
    assert _state(fast) == _state(ref)
    assert fast.peek(0, True, _BASE) == b"\1" * LINE and fast.peek(asid, True, _BASE) == buf[:LINE]


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
@settings(max_examples=60, deadline=None)
@given(coherent=st.booleans(), ops=st.lists(_op, max_size=30))
def test_the_resident_lines_path_in_c_equals_the_python_path(coherent: bool,
                                                            ops: list[tuple[str, int, int, int, int]]) -> None:
    fast, fagent = _twin(coherent)
    ref, ragent = _twin(coherent)
    for kind, d, line, n, seed in ops:
        asid, c = _DOMAINS[d]
        spa = _BASE + line * LINE
        data = random.Random(seed).randbytes(n * LINE)
        for cache, accel in ((fast, True), (ref, False)):
            memaccel.ENABLED = accel
            try:
                if kind == "write":
                    cache.write_lines(asid, c, spa, data)
                else:
                    data = cache.read_lines(asid, c, spa, n * LINE)
            finally:
                memaccel.ENABLED = True
        assert _state(fast) == _state(ref)
    assert fagent.snoops == ragent.snoops


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_the_c_helpers_serve_only_runs_of_resident_lines() -> None:
    cache, _ = _twin(False)
    cache.write_lines(1, True, _BASE, bytes(range(64)) * 2)
    key = tag_key(1, True, _BASE)
    before = _state(cache)
    read, write = memaccel.helpers.cache_hit_read, memaccel.helpers.cache_hit_write
    assert read(cache.sets, cache.set_mask, key, 3, cache.__dict__) is None  # the third line is absent
    assert write(cache.sets, cache.set_mask, key, bytes(3 * LINE), cache.dirty, cache.__dict__) is False
    assert _state(cache) == before
    assert read(cache.sets, cache.set_mask, key, 2, cache.__dict__) == bytes(range(64)) * 2
    assert cache.hits == before[3] + 2
    cache.dirty.clear()
    assert write(cache.sets, cache.set_mask, key + LINE, b"\1" * LINE, cache.dirty, cache.__dict__) is True
    assert cache.peek(1, True, _BASE + LINE) == b"\1" * LINE and cache.dirty == {key + LINE}
    s = cache.sets[(key >> 6) & cache.set_mask]
    assert list(s)[-1] == key  # read: the most recently used of its set
    cache.sets[(key >> 6) & cache.set_mask] = type("Set", (dict,), {})(s)  # not exactly a dict: the Python path
    assert read(cache.sets, cache.set_mask, key, 1, cache.__dict__) is None
    with pytest.raises(ValueError, match="whole lines"):
        write(cache.sets, cache.set_mask, key, bytes(10), cache.dirty, cache.__dict__)
    with pytest.raises(ValueError, match="multiple of 64"):
        read(cache.sets, cache.set_mask, key + 8, 1, cache.__dict__)


def _counting_readers(cache: Cache) -> list[int]:
    """Make every line fill of ``cache`` (the memory controller's per-line readers) record its SPA."""
    calls: list[int] = []
    readers = cache.mc.readers
    for domain, reader in list(readers.items()):
        readers[domain] = lambda spa, reader=reader: (calls.append(spa), reader(spa))[1]
    return calls


@pytest.mark.parametrize("coherent", [False, True])
@pytest.mark.parametrize(("asid", "c"), _DOMAINS)
def test_a_whole_line_write_does_not_read_the_line_from_dram(coherent: bool, asid: int, c: bool) -> None:
    fast, fagent = _twin(coherent)
    ref, ragent = _twin(coherent)
    rnd = random.Random(7)
    for cache in (fast, ref):  # dirty lines of every domain: the writes below evict some of them
        for a, cc in _DOMAINS:
            cache.write(a, cc, _BASE, random.Random(a * 2 + cc).randbytes(20 * LINE))
    calls = _counting_readers(fast)
    for _ in range(6):
        spa, data = _BASE + rnd.randrange(40) * LINE, rnd.randbytes(rnd.randrange(1, 24) * LINE)
        fast.write_lines(asid, c, spa, data)
        ref.write(asid, c, spa, data)  # the fill-then-write path
        assert _state(fast) == _state(ref)
    assert calls == [] and fast.misses > 40  # misses, each without a fill from DRAM
    assert fagent.snoops == ragent.snoops
    assert fast.wbinvd() == ref.wbinvd() and _state(fast) == _state(ref)


def test_a_whole_line_write_without_a_key_is_refused_like_a_fill() -> None:
    fast, _ = _twin(False)
    ref, _ = _twin(False)
    for cache, call in ((fast, fast.write_lines), (ref, ref.write)):
        with pytest.raises(KeySlotError, match="ASID 3"):
            call(3, True, _BASE, bytes(2 * LINE))
    assert _state(fast) == _state(ref)


@settings(max_examples=60, deadline=None)
@given(coherent=st.booleans(), d=st.integers(0, len(_DOMAINS) - 1), resident=st.booleans(),
       lines=st.sets(st.integers(0, 63), min_size=1, max_size=12), seed=st.integers(0, 255), agents=st.booleans())
def test_write_runs_equal_one_write_lines_per_run(coherent: bool, d: int, resident: bool, lines: set[int], seed: int,
                                                  agents: bool) -> None:
    """``Cache.write_runs`` (a private level writing back the runs of lines it changed in a page,
    taken from its buffer) against one ``write_lines`` per run: the same lines, bytes, dirty set,
    LRU order, counters and snoops -- in C when every line is resident and no agent but the origin
    is snooped, else run by run."""
    fast, fagent = _twin(coherent)
    ref, ragent = _twin(coherent)
    asid, c = _DOMAINS[d]
    order = sorted(lines)
    runs: list[tuple[int, int]] = []
    for line in order:  # ascending runs of whole lines, as line_runs gives them
        if runs and runs[-1][1] == line * LINE:
            runs[-1] = (runs[-1][0], (line + 1) * LINE)
        else:
            runs.append((line * LINE, (line + 1) * LINE))
    buf = random.Random(seed).randbytes(3 * 4096)
    for cache in (fast, ref):
        if resident:  # every line of the page resident (the pool's GHCB page)
            cache.write_lines(asid, c, _BASE, bytes(4096))
    for cache, agent, call in ((fast, fagent, True), (ref, ragent, False)):
        agent.snoops.clear()
        origin = None if agents else agent
        if call:
            cache.write_runs(asid, c, _BASE, buf, 4096, runs, origin=origin)
        else:
            for lo, hi in runs:
                cache.write_lines(asid, c, _BASE + lo, buf[4096 + lo : 4096 + hi], origin=origin)
    assert _state(fast) == _state(ref)
    assert fagent.snoops == ragent.snoops
    for lo, hi in runs:
        assert fast.peek(asid, c, _BASE + lo) == buf[4096 + lo : 4096 + lo + LINE]


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_the_run_helpers_serve_only_resident_lines_and_change_nothing_otherwise() -> None:
    cache, _ = _twin(False)
    cache.write_lines(1, True, _BASE, bytes(range(64)) * 2)
    cache.write_lines(1, True, _BASE + 4 * LINE, b"\7" * LINE)
    key = tag_key(1, True, _BASE)
    h = memaccel.helpers
    before = _state(cache)
    assert h.cache_hit_runs(cache.sets, cache.set_mask, key, ((0, LINE), (2 * LINE, LINE)), cache.__dict__) is None
    assert h.cache_hit_write_runs(cache.sets, cache.set_mask, key, bytes(4096), 0, [(0, LINE), (2 * LINE, 3 * LINE)],
                                  cache.dirty, cache.__dict__) is False
    assert _state(cache) == before  # the third line is absent: nothing changed
    got = h.cache_hit_runs(cache.sets, cache.set_mask, key, ((4 * LINE, LINE), (0, 2 * LINE)), cache.__dict__)
    assert got == b"\7" * LINE + bytes(range(64)) * 2 and cache.hits == before[3] + 3
    s = cache.sets[(key >> 6) & cache.set_mask]
    assert list(s)[-1] == key  # the runs' lines in the order given: the last run's first line is the newest
    cache.dirty.clear()
    buf = b"\1" * LINE + b"\2" * LINE + bytes(3 * LINE) + b"\3" * LINE
    assert h.cache_hit_write_runs(cache.sets, cache.set_mask, key, buf, LINE, [(0, LINE), (4 * LINE, 5 * LINE)],
                                  cache.dirty, cache.__dict__) is True
    assert cache.peek(1, True, _BASE) == b"\2" * LINE and cache.peek(1, True, _BASE + 4 * LINE) == b"\3" * LINE
    assert cache.dirty == {key, key + 4 * LINE}
    for bad in [((8, LINE),), ((0, 0),), [(0, LINE)]]:
        with pytest.raises((ValueError, TypeError)):
            h.cache_hit_runs(cache.sets, cache.set_mask, key, bad, cache.__dict__)
    for runs, base in [([(0, 8)], 0), ([(LINE, LINE)], 0), ([(0, LINE)], 4096), (((0, LINE),), 0)]:
        with pytest.raises((ValueError, TypeError)):
            h.cache_hit_write_runs(cache.sets, cache.set_mask, key, bytes(4096), base, runs, cache.dirty,
                                   cache.__dict__)


def test_an_encrypted_only_agent_is_not_snooped_about_unencrypted_ranges() -> None:
    """An agent holding encrypted lines only (the VMSA unit) is left out of the snoops of C=0
    ranges -- none of its keys can be in one -- and still gets those of encrypted ranges, WBINVD and
    coherent fills."""
    cache, plain = _twin(True)
    enc = _Agent()
    enc.encrypted_only = True  # type: ignore[attr-defined]
    cache.attach(enc)
    assert cache.plain_agents == (plain,) and cache.agents == (plain, enc)
    cache.write_lines(0, False, _BASE, bytes(LINE))
    cache.read_lines(0, False, _BASE, LINE)
    cache.read_runs(0, False, _BASE, ((0, LINE),))
    cache.write(0, False, _BASE + 8, b"x")
    assert [s for s in enc.snoops if s[0] != s[1]] == []
    assert len([s for s in plain.snoops if s[0] != s[1]]) == 4
    cache.read_lines(1, True, _BASE, LINE)  # an encrypted range; on this coherent profile, a fill too
    assert (tag_key(1, True, _BASE), tag_key(1, True, _BASE) + LINE, False) in enc.snoops
    assert (tag_key(1, True, _BASE), tag_key(1, True, _BASE), False) in enc.snoops  # snoop_fill
    cache.wbinvd()
    assert enc.snoops[-1] == (0, 1 << 64, True)
    cache.detach(enc)
    assert cache.agents == cache.plain_agents == (plain,)


class _IdleAgent(_Agent):
    """An agent that declares every fill idle (holds no other domain's copy), as the page pool does
    for a page it holds in no other domain."""

    def __init__(self, idle: bool) -> None:
        super().__init__()
        self.idle = idle

    def fill_is_idle(self, key: int) -> bool:
        return self.idle

    def snoop_fill(self, key: int) -> None:  # (the idle agent's snoop_fill does nothing)
        pass


def _page_twins(coherent: bool, idle: bool) -> tuple[Cache, Cache, _IdleAgent, _IdleAgent]:
    caches = []
    agents = []
    for _ in range(2):
        small, agent = _twin(coherent)
        small.detach(agent)
        cache = Cache(small.mc, 64 * 2 * LINE, 2, coherent)  # 64 sets of 2 ways: a page's lines each in its set
        agent = _IdleAgent(idle)
        cache.attach(agent)
        caches.append(cache)
        agents.append(agent)
    return caches[0], caches[1], agents[0], agents[1]


@settings(max_examples=120, deadline=None)
@given(coherent=st.booleans(), idle=st.booleans(), accel=st.booleans(), ops=st.lists(_op, max_size=25),
       reads=st.lists(st.tuples(st.integers(0, len(_DOMAINS) - 1), st.integers(0, 3), st.integers(0, 62),
                                st.integers(2, 64)), min_size=1, max_size=6))
def test_a_page_run_fill_equals_line_by_line_fills(
        coherent: bool, idle: bool, accel: bool, ops: list[tuple[str, int, int, int, int]],
        reads: list[tuple[int, int, int, int]]) -> None:
    enabled = memaccel.ENABLED
    memaccel.ENABLED = enabled and accel  # the C steps (cache_page_plan / _install) and the Python loop
    try:
        _page_run_case(coherent, idle, ops, reads)
    finally:
        memaccel.ENABLED = enabled


def _page_run_case(coherent: bool, idle: bool, ops: list[tuple[str, int, int, int, int]],
                   reads: list[tuple[int, int, int, int]]) -> None:
    """A run of lines inside a page read through ``read_lines`` (its missing lines read from DRAM by
    one bulk decryption, ``Cache._read_page_run``) against ``read`` (line by line): the same bytes,
    sets in the same LRU order, dirty lines, counters and DRAM, whatever was resident first (lines of
    the page in its domain and in others, dirty or clean, victims to write back), on coherent
    profiles too -- where an agent that is not idle makes the page go line by line."""
    fast, ref, fagent, ragent = _page_twins(coherent, idle)
    for kind, od, oline, on, oseed in ops:  # partly resident pages, other domains' lines, dirty lines
        asid, c = _DOMAINS[od]
        data = random.Random(oseed).randbytes(on * LINE)
        for cache in (fast, ref):
            if kind == "write":
                cache.write(asid, c, _BASE + oline * LINE * 3, data)
            else:
                cache.read(asid, c, _BASE + oline * LINE * 3, on * LINE)
    assert _state(fast) == _state(ref)
    runs: list[tuple[int, int]] = []
    read_run = fast.mc.read_run
    fast.mc.read_run = lambda spa, n, a, cc: (runs.append((spa, n)), read_run(spa, n, a, cc))[1]  # type: ignore[method-assign]
    misses = 0
    for d, page, line, n in reads:
        asid, c = _DOMAINS[d]
        spa = _BASE + page * 0x1000 + line * LINE
        n = min(n, 64 - line)
        before = fast.misses
        assert fast.read_lines(asid, c, spa, n * LINE) == ref.read(asid, c, spa, n * LINE)
        misses += n >= 2 and fast.misses > before
        assert _state(fast) == _state(ref)
    assert fagent.snoops == ragent.snoops
    if coherent and not idle:
        assert runs == []
    else:
        assert len(runs) == misses
    assert fast.wbinvd() == ref.wbinvd()
    assert _state(fast) == _state(ref)


def test_a_page_run_fill_without_a_key_is_refused_like_a_fill() -> None:
    fast, ref, _, _ = _page_twins(True, True)
    for cache, call in ((fast, fast.read_lines), (ref, ref.read)):
        with pytest.raises(KeySlotError, match="ASID 3"):
            call(3, True, _BASE, 4 * LINE)
    assert _state(fast) == _state(ref)


@pytest.mark.parametrize("accel", [False, True])
@pytest.mark.parametrize("coherent", [False, True])
def test_a_page_run_fill_writes_back_many_dirty_victims_and_other_domains_lines(coherent: bool, accel: bool) -> None:
    """Every set full of dirty lines (victims: more than the bulk threshold, consecutive), and dirty
    lines of the page's own SPAs in two other domains (written back before the page is read, in set
    order): the same bytes and state as line-by-line fills."""
    enabled = memaccel.ENABLED
    memaccel.ENABLED = enabled and accel
    try:
        fast, ref, _, _ = _page_twins(coherent, True)
        page = _BASE + 0x4000
        for cache in (fast, ref):
            cache.write(2, True, page, random.Random(1).randbytes(0x1000))  # other domains' lines of the SPAs
            cache.write(0, False, page + 0x400, random.Random(2).randbytes(0x800))
            cache.write(1, True, _BASE + 0x20000, random.Random(3).randbytes(0x1000))  # dirty LRU victims
        writebacks = fast.writebacks
        assert fast.read_lines(1, True, page, 0x1000) == ref.read(1, True, page, 0x1000)
        assert _state(fast) == _state(ref) and fast.writebacks - writebacks >= 64
        assert fast.wbinvd() == ref.wbinvd() and _state(fast) == _state(ref)
    finally:
        memaccel.ENABLED = enabled


def test_the_agents_say_a_pages_fill_is_idle_only_without_another_domains_copy() -> None:
    """``fill_is_idle`` of the page pool and the VMSA unit (read on stand-ins holding the attributes it
    reads): True exactly when their ``snoop_fill`` would find no copy of the page in another domain."""
    from types import SimpleNamespace

    from sevemu.hw.uc.pool import PagePool
    from sevemu.hw.vmsa import VmsaUnit

    page = 0x40000
    mine, other = tag_key(1, True, page), tag_key(2, True, page)
    pool = SimpleNamespace(_by_spa={page: {1}}, slot_key={1: mine})
    assert PagePool.fill_is_idle(pool, mine + 0x140)  # type: ignore[arg-type]
    assert not PagePool.fill_is_idle(pool, other + 0x140)  # type: ignore[arg-type]
    assert PagePool.fill_is_idle(pool, tag_key(2, True, page + 0x1000))  # type: ignore[arg-type]
    pool.slot_key[2] = other
    pool._by_spa[page].add(2)
    assert not PagePool.fill_is_idle(pool, mine)  # type: ignore[arg-type]
    unit = SimpleNamespace(_held={mine: SimpleNamespace(spa=page)})
    assert VmsaUnit.fill_is_idle(unit, mine + 0x40)  # type: ignore[arg-type]
    assert not VmsaUnit.fill_is_idle(unit, tag_key(0, False, page))  # type: ignore[arg-type]
    assert VmsaUnit.fill_is_idle(unit, tag_key(0, False, page + 0x1000))  # type: ignore[arg-type]


@pytest.mark.parametrize("accel", [False, True])
def test_a_page_run_fill_writes_back_one_spas_lines_of_two_domains_in_eviction_order(accel: bool) -> None:
    """A page run whose victims hold one SPA under two keys (32 sets of 2 ways: the run evicts both
    ways of every set, the older domain's line first): they reach DRAM in eviction order, the last
    one evicted winning, as line-by-line fills leave it -- never in key order."""
    with mem_accel(accel):
        twins = []
        for _ in range(2):
            small, agent = _twin(False)
            small.detach(agent)
            twins.append(Cache(small.mc, 32 * 2 * LINE, 2, False))
        fast, ref = twins
        spa = _BASE + 0x8000
        for cache in (fast, ref):
            cache.write(2, True, spa, random.Random(1).randbytes(32 * LINE))  # older: evicted first
            cache.write(1, True, spa, random.Random(2).randbytes(32 * LINE))  # same SPAs, another key
        page = _BASE + 0x4000
        lines = b"".join(ref.read(0, True, page + off, LINE) for off in range(0, 0x1000, LINE))  # one by one
        assert fast.read_lines(0, True, page, 0x1000) == lines
        assert _state(fast)[:3] == _state(ref)[:3]  # (DRAM, sets, dirty lines; the counters count calls)
        assert fast.mc.read(spa, 32 * LINE, 1, True) == random.Random(2).randbytes(32 * LINE)  # the last evicted


@pytest.mark.parametrize("accel", [False, True])
def test_a_page_run_fill_from_spa_zero_in_the_host_domain(accel: bool) -> None:
    """The host's lines at SPA 0 have the cache key 0: a page run that misses there still fills every
    line (the same bytes and state as line-by-line reads)."""
    with mem_accel(accel):
        fast, ref, _, _ = _page_twins(False, True)
        for cache in (fast, ref):
            cache.mc.dram.write(0, random.Random(9).randbytes(0x1000))
            cache.write(0, False, 3 * LINE, bytes(range(64)))  # one line resident (dirty), the rest missing
        lines = b"".join(ref.read(0, False, off, LINE) for off in range(0, 8 * LINE, LINE))
        assert fast.read_lines(0, False, 0, 8 * LINE) == lines
        assert _state(fast)[:3] == _state(ref)[:3]


@pytest.mark.parametrize("accel", [False, True])
@pytest.mark.parametrize("coherent", [False, True])
def test_write_lines_below_the_cache_size_touch_only_their_lines(coherent: bool, accel: bool) -> None:
    """Two lines written (one resident, one not), a neighbour resident: the cache then holds exactly
    the bytes written and the neighbour's, and after WBINVD DRAM has them -- fixed expectations, not
    a twin run through the same code."""
    with mem_accel(accel):
        cache, _ = _twin(coherent)
        spa = _BASE + 0x2000
        old = random.Random(10).randbytes(3 * LINE)
        cache.write_lines(1, True, spa, old)
        cache.wbinvd()
        assert cache.read_lines(1, True, spa + LINE, LINE) == old[LINE : 2 * LINE]  # resident, clean
        new = random.Random(11).randbytes(2 * LINE)
        cache.write_lines(1, True, spa + 2 * LINE, new[LINE:])  # not resident
        cache.write_lines(1, True, spa, new[:LINE])  # not resident
        assert sorted(cache.dirty) == [tag_key(1, True, spa), tag_key(1, True, spa + 2 * LINE)]
        want = new[:LINE] + old[LINE : 2 * LINE] + new[LINE:]
        assert cache.read_lines(1, True, spa, 3 * LINE) == want
        assert all(len(line) == LINE for s in cache.sets for line in s.values())
        cache.wbinvd()
        assert cache.mc.read(spa, 3 * LINE, 1, True) == want


@pytest.mark.parametrize("accel", [False, True])
def test_read_lines_across_a_page_boundary_fill_every_line(accel: bool) -> None:
    """A run of missing lines across two pages (fewer lines than sets: each in its own set) reads
    the bytes written, from both pages."""
    with mem_accel(accel):
        cache, _ = _twin(False)
        spa = _BASE + 0x3F00  # four lines in one page, four in the next
        data = random.Random(12).randbytes(8 * LINE)
        cache.write_lines(1, True, spa, data)
        cache.wbinvd()
        assert not any(cache.sets)
        assert cache.read_lines(1, True, spa, 8 * LINE) == data
        assert cache.misses >= 8 and all(len(line) == LINE for s in cache.sets for line in s.values())


@pytest.mark.parametrize("accel", [False, True])
def test_read_lines_of_one_more_line_than_sets_fill_every_line(accel: bool) -> None:
    """A run inside a page of one line more than the cache has sets (two of its lines share a set:
    not a page run) reads the bytes written."""
    with mem_accel(accel):
        cache, _ = _twin(False)
        n = cache.set_mask + 2
        spa = _BASE + 0x5000
        data = random.Random(13).randbytes(n * LINE)
        cache.write_lines(1, True, spa, data)
        cache.wbinvd()
        assert cache.read_lines(1, True, spa, n * LINE) == data
