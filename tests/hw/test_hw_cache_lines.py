"""The cache's whole-line calls (``read_lines`` / ``write_lines``) against ``read`` / ``write``: the
same bytes, lines, LRU order, counters, DRAM contents and snoops, for any sequence of accesses."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto.memenc import EncryptionMode, TweakConstants
from sevemu.errors import AlignmentError
from sevemu.hw.cache import Cache
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
