"""The ASID-tagged write-back cache: LRU, write-back, tag isolation, (non-)coherency, flushes."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hwkit import MEM_ACCEL_MODES, mem_accel
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto.memenc import EncryptionMode, MemoryCipher, TweakConstants
from sevemu.errors import AlignmentError, InputError, KeySlotError
from sevemu.hw import memaccel
from sevemu.hw.cache import ASID_SHIFT, C_SHIFT, SPA_MASK, Cache, key_domain, tag_key
from sevemu.hw.dram import LINE, Dram
from sevemu.hw.faults import GeneralProtection
from sevemu.hw.memctl import KeySlotPort, MemoryController
from sevemu.hw.profiles import GENOA, MILAN, PROFILES
from sevemu.hw.soc import Soc

MiB = 1 << 20
X = 0x40000  # an SPA used by several tests


def _cache(size: int = 64 << 10, ways: int = 16, coherent: bool = False) -> tuple[Cache, KeySlotPort]:
    r = random.Random(11)
    mc = MemoryController(Dram(4 * MiB), EncryptionMode.XEX, TweakConstants.random_zen2(48, r), 15,
                          rng=r.randbytes)
    port = mc.secure_port()
    port.load(1, r.randbytes(16))
    port.load(2, r.randbytes(16))
    return Cache(mc, size, ways, coherent), port


def _data(tag: int, n: int = LINE) -> bytes:
    return random.Random(tag).randbytes(n)


def _resident(cache: Cache) -> set[tuple[int, bool, int]]:
    return {(a, c, s) for a, c, s, _ in cache.resident()}


def test_tag_key_round_trip_and_c0_domain_has_no_asid() -> None:
    assert key_domain(tag_key(7, True, 0x12345)) == (7, True, 0x12340)
    assert tag_key(7, False, 0x1000) == tag_key(0, False, 0x1000) == 0x1000
    assert tag_key(1, True, X) != tag_key(2, True, X) != tag_key(0, True, X)


_MAX_ASID = max(p.max_asid for p in PROFILES.values())
_TOP_LINE = SPA_MASK & ~(LINE - 1)  # the last line of the 52-bit physical address space


@pytest.mark.parametrize("asid", [0, 1, _MAX_ASID])
@pytest.mark.parametrize("spa", [0, LINE - 1, LINE, X + 0x3F, _TOP_LINE, SPA_MASK])
def test_tag_key_encodes_the_domain_and_line_reversibly_at_the_edges(asid: int, spa: int) -> None:
    """(issues 8 and 10) The key is the whole (ASID, C, line SPA) triple: key_domain undoes tag_key
    for ASID 0 and the largest ASID of any profile, at SPA 0 and at the top of the 52-bit physical
    address space; C=0 folds every ASID into domain (0, C=0), whose key is the line's SPA; every key
    fits the C paths' uint64 (csrc/mem_accel.c, csrc/uc_accel.c)."""
    line = spa & ~(LINE - 1)
    enc = tag_key(asid, True, spa)
    assert key_domain(enc) == (asid, True, line)
    assert enc >> ASID_SHIFT == asid and enc >> C_SHIFT & 1 and enc & SPA_MASK == line
    assert tag_key(asid, True, line) == enc  # the offset inside the line is not part of the key
    plain = tag_key(asid, False, spa)
    assert plain == line == tag_key(0, False, spa) and key_domain(plain) == (0, False, line)
    assert 0 <= plain < enc < 1 << 64
    # a domain's keys are one contiguous ascending range below the next domain's
    assert tag_key(asid, True, _TOP_LINE) < tag_key(asid + 1, True, 0)
    assert tag_key(0, False, _TOP_LINE) < tag_key(0, True, 0)


def test_tag_key_is_injective_over_edge_domains_and_lines() -> None:
    domains = [(0, False), (0, True), (1, True), (_MAX_ASID - 1, True), (_MAX_ASID, True)]
    lines = [0, LINE, X, _TOP_LINE - LINE, _TOP_LINE]
    keys = {tag_key(a, c, s) for a, c in domains for s in lines}
    assert len(keys) == len(domains) * len(lines)
    assert {key_domain(k) for k in keys} == {(a, c, s) for a, c in domains for s in lines}


@pytest.mark.parametrize("size,ways", [(0, 16), (3 * 64 * 16, 16), (1000, 16), (64 << 10, 0), (64 << 10, -4),
                                       (-(64 << 10), 16)])
def test_geometry_must_give_a_power_of_two_set_count(size: int, ways: int) -> None:
    with pytest.raises(InputError):
        Cache(_cache()[0].mc, size, ways)


@pytest.mark.parametrize("size,ways", [(64, 1), (1024, 1), (4096, 64), (3 * 4096, 3)])
def test_any_power_of_two_set_count_is_a_cache(size: int, ways: int) -> None:
    cache = Cache(_cache()[0].mc, size, ways)
    assert len(cache.sets) * ways * LINE == size


def test_lru_replacement_order() -> None:
    cache, _ = _cache(size=2 * LINE, ways=2)  # one set of two ways
    a, b, c = 0x0, 0x40, 0x80
    cache.read(0, False, a, 1)
    cache.read(0, False, b, 1)
    cache.read(0, False, a, 1)  # a becomes most recent
    cache.read(0, False, c, 1)  # evicts b
    assert _resident(cache) == {(0, False, a), (0, False, c)}
    cache.read(0, False, b, 1)  # evicts a (least recent now)
    assert _resident(cache) == {(0, False, c), (0, False, b)}


def test_hit_and_miss_counters() -> None:
    cache, _ = _cache()
    cache.read(0, False, 0x1000, 8)
    cache.read(0, False, 0x1008, 8)
    cache.read(0, False, 0x1000, 128)  # two lines: one hit, one miss
    assert (cache.hits, cache.misses) == (2, 2)
    assert cache.peek(0, False, 0x1040) is not None
    assert (cache.hits, cache.misses) == (2, 2)  # peek neither fills nor counts
    assert cache.peek(0, False, 0x9000) is None


def test_write_back_on_eviction_only_when_dirty() -> None:
    cache, _ = _cache(size=2 * LINE, ways=2)
    dram = cache.mc.dram
    dram.write(0x0, b"\x5a" * LINE)
    cache.read(0, False, 0x0, 1)  # clean line
    cache.write(0, False, 0x40, b"dirty!")
    assert dram.read(0x40, 6) == bytes(6)  # write-back cache: DRAM untouched
    assert [d for *_, d in cache.resident()] == [False, True]
    cache.read(0, False, 0x80, 1)  # evicts the clean line: nothing written
    cache.read(0, False, 0xC0, 1)  # evicts the dirty one
    assert cache.writebacks == 1
    assert dram.read(0x40, 6) == b"dirty!"
    assert dram.read(0x0, LINE) == b"\x5a" * LINE
    assert dram.populated_pages == 1


def test_a_line_of_one_asid_never_serves_another() -> None:
    cache, _ = _cache()
    secret = _data(1)
    cache.write(1, True, X, secret)
    seen_by_2 = cache.read(2, True, X, LINE)  # same SPA, other key: a separate miss
    assert seen_by_2 != secret
    assert cache.misses == 2
    assert cache.peek(1, True, X) == secret
    assert cache.peek(2, True, X) == seen_by_2
    assert cache.read(0, False, X, LINE) != secret  # the host's view is another line too
    assert cache.read(0, True, X, LINE) != secret  # and so is the host-key (SME) view
    assert {(a, c) for a, c, s, _ in cache.resident() if s == X} == {(1, True), (2, True), (0, False), (0, True)}


def test_c0_lines_are_shared_by_every_asid() -> None:
    cache, _ = _cache()
    cache.write(1, False, X, b"shared bounce buffer")
    assert cache.read(2, False, X, 20) == b"shared bounce buffer"
    assert cache.read(0, False, X, 20) == b"shared bounce buffer"
    assert (cache.hits, cache.misses) == (2, 1)
    assert _resident(cache) == {(0, False, X)}


def test_non_coherent_last_write_back_wins() -> None:
    """Milan (no EAX[10]): host C=0 and guest C=1 lines of one SPA coexist; the later flush wins."""
    for host_first in (True, False):
        cache, _ = _cache(coherent=False)
        guest, host = _data(2), _data(3)
        cache.write(1, True, X, guest)
        cache.write(0, False, X, host)  # does not disturb the guest's dirty line
        assert cache.peek(1, True, X) == guest and cache.peek(0, False, X) == host
        order = [(0, False), (1, True)] if host_first else [(1, True), (0, False)]
        for asid, c in order:
            assert cache.clflush(asid, c, X)
        raw = cache.mc.dram.read(X, LINE)
        if host_first:  # the guest's line was written back last
            assert raw != guest and raw != host
            assert cache.read(1, True, X, LINE) == guest
        else:  # the host's plaintext overwrote the guest's ciphertext
            assert raw == host
            assert cache.read(1, True, X, LINE) not in (guest, host)


def test_coherent_fill_evicts_other_domain_lines_of_the_same_spa() -> None:
    """Genoa (EAX[10]): a fill writes back and drops every other-domain line of that SPA first."""
    cache, _ = _cache(coherent=True)
    guest = _data(4)
    cache.write(1, True, X, guest)
    host_view = cache.read(0, False, X, LINE)  # evicts the guest's line, writing it back
    assert _resident(cache) == {(0, False, X)}
    assert host_view == cache.mc.dram.read(X, LINE) != guest  # ciphertext
    host = _data(5)
    cache.write(0, False, X, host)
    assert cache.read(1, True, X, LINE) not in (guest, host)  # host's write reached DRAM first
    assert cache.mc.dram.read(X, LINE) == host
    # unrelated SPAs are not touched
    cache.write(2, True, X + LINE, guest)
    cache.read(0, False, X, 1)
    assert cache.peek(2, True, X + LINE) == guest


def test_host_clflush_does_not_evict_guest_lines() -> None:
    soc = Soc(MILAN, dram_size=64 * MiB, cache_size=64 << 10)
    keys = soc.psp.take_ports().keys
    keys.load(200, bytes(16))
    soc.cache.write(200, True, X, _data(6))
    soc.boot_cpu.clflush(X)
    soc.boot_cpu.clflush(X, c=True)
    assert soc.cache.peek(200, True, X) == _data(6)
    assert soc.mc.dram.populated_pages == 0


def test_vmpage_flush_flushes_one_asids_private_lines_of_one_page() -> None:
    soc = Soc(MILAN, dram_size=64 * MiB, cache_size=64 << 10)
    keys = soc.psp.take_ports().keys
    keys.load(200, bytes(16))
    keys.load(201, bytes(range(16)))
    for off in (0, 0x40, 0xFC0):
        soc.cache.write(200, True, X + off, _data(off))
    soc.cache.write(201, True, X, _data(7))
    soc.cache.write(200, True, X + 0x1000, _data(8))  # next page
    soc.cache.write(0, False, X + 0x80, _data(9))
    assert soc.boot_cpu.vmpage_flush(X + 0x123, 200) == 3
    assert {(a, c, s) for a, c, s, _ in soc.cache.resident()} == {
        (201, True, X), (200, True, X + 0x1000), (0, False, X + 0x80)}
    assert soc.cache.read(200, True, X + 0x40, LINE) == _data(0x40)  # written back, decrypts
    for bad in (0, MILAN.max_asid + 1):
        with pytest.raises(GeneralProtection):
            soc.boot_cpu.vmpage_flush(X, bad)
    with pytest.raises(AlignmentError):
        soc.cache.vmpage_flush(200, X + 0x40)


def test_wbinvd_writes_back_everything_and_counts_epochs() -> None:
    cache, _ = _cache()
    assert cache.flush_epoch == 0
    cache.write(1, True, X, _data(10))
    cache.write(2, True, X + 0x1000, _data(11))
    cache.read(0, False, X + 0x2000, 8)  # clean
    assert cache.wbinvd() == 2
    assert cache.flush_epoch == 1
    assert list(cache.resident()) == []
    assert cache.read(1, True, X, LINE) == _data(10)
    assert cache.wbinvd() == 0
    assert cache.flush_epoch == 2


def test_invd_drops_dirty_lines() -> None:
    cache, _ = _cache()
    cache.write(0, False, X, b"lost")
    cache.invalidate_all()
    assert cache.read(0, False, X, 4) == bytes(4)
    assert cache.wbinvd() == 0


def test_default_geometry() -> None:
    cache = Cache(_cache()[0].mc)
    assert (cache.size, cache.ways, len(cache.sets), cache.coherent) == (4 * MiB, 16, 4096, False)


def test_profiles_choose_coherency() -> None:
    assert not Soc(MILAN, dram_size=64 * MiB).cache.coherent
    assert Soc(GENOA, dram_size=64 * MiB).cache.coherent


def test_multi_line_write_and_read_through_the_cache() -> None:
    cache, _ = _cache()
    data = _data(12, 300)
    cache.write(1, True, X + 5, data)
    assert cache.read(1, True, X + 5, 300) == data
    cache.wbinvd()
    assert cache.read(1, True, X + 5, 300) == data
    assert data[16:32] not in cache.mc.dram.read(X, 512)


@pytest.mark.parametrize("flush", ["wbinvd", "clflush", "flush_range", "vmpage_flush"])
def test_flushing_lines_of_a_cleared_key_slot_never_raises_and_destroys_the_data(flush: str) -> None:
    """SHUTDOWN / DECOMMISSION clear a slot while its lines may be dirty: the next flush writes them
    back under a key nobody knows (docs/memory-model.md) -- no exception, no plaintext, no lost line."""
    cache, port = _cache()
    key = bytes(range(16))
    port.load(1, key)
    secret = _data(20)
    cache.write(1, True, X, secret)
    cache.write(1, True, X + 0x1000, secret)  # another page, for the flushes that name one line
    before = cache.mc.dram.read(X, LINE)
    port.clear(1)
    assert not cache.mc.has_key(1) and not cache.mc.asid_valid(1)
    if flush == "wbinvd":
        assert cache.wbinvd() == 2
    elif flush == "clflush":
        assert cache.clflush(1, True, X)
    elif flush == "flush_range":
        cache.flush_range(1, True, X, 0x2000)
    else:
        assert cache.vmpage_flush(1, X) == 1
    assert cache.peek(1, True, X) is None
    raw = cache.mc.dram.read(X, LINE)
    assert raw not in (before, secret)  # written back, encrypted, but not with the guest's key
    port.load(1, key)  # even the same key again cannot read it
    assert cache.read(1, True, X, LINE) != secret
    assert cache.wbinvd() >= 0 and cache.wbinvd() == 0  # WBINVD keeps working
    assert not cache.dirty


def test_every_clear_of_a_slot_gets_its_own_unknown_key() -> None:
    """Two guests' lines left behind on one ASID must not be comparable in DRAM (equal plaintext ->
    equal ciphertext would leak that, as CipherLeaks shows for one key)."""
    cache, port = _cache()
    seen = []
    for _ in range(2):
        cache.write(1, True, X, _data(22))
        port.clear(1)
        cache.wbinvd()
        seen.append(cache.mc.dram.read(X, LINE))
        port.load(1, bytes(16))
    assert seen[0] != seen[1]


def test_a_cleared_slot_holds_a_fresh_key_from_the_socs_random_source() -> None:
    """What "a key nobody knows" means exactly: the next key the SoC's random source gives (here a
    source the test controls), used for both directions, line by line and in bulk."""
    r = random.Random(3)
    drawn: list[bytes] = []

    def rng(n: int) -> bytes:
        drawn.append(r.randbytes(n))
        return drawn[-1]

    mc = MemoryController(Dram(4 * MiB), EncryptionMode.XEX, TweakConstants.random_zen2(48, r), 15, rng=rng)
    port = mc.secure_port()
    cache = Cache(mc, 64 << 10, 16)
    port.load(1, bytes(16))
    mc.dram.write(X, _data(30, 2 * LINE))  # DRAM bytes the guest never wrote through this key
    cache.write(1, True, X + 0x1000, _data(31, 32 * LINE))  # enough lines for the bulk path
    cache.write(1, True, X + 0x3000, _data(32))  # and one on its own
    port.clear(1)
    assert len(drawn) == 1  # the host key; the unknown key is drawn when first needed
    line = cache.read(1, True, X + LINE, LINE)
    unknown = MemoryCipher(EncryptionMode.XEX, drawn[1], mc.tweaks)
    assert line == unknown.decrypt_line(X + LINE, _data(30, 2 * LINE)[LINE:])
    assert cache.read(1, True, X + 0x10000, LINE) == unknown.decrypt_line(X + 0x10000, bytes(LINE))
    cache.wbinvd()
    assert mc.dram.read(X + 0x1000, 32 * LINE) == bytes(unknown.encrypt_bulk(X + 0x1000, _data(31, 32 * LINE)))
    assert mc.dram.read(X + 0x3000, LINE) == unknown.encrypt_line(X + 0x3000, _data(32))
    assert len(drawn) == 2
    port.clear(2)  # a slot that never had a key stays refused
    with pytest.raises(KeySlotError):
        cache.read(2, True, X, LINE)
    with pytest.raises(KeySlotError):
        mc.write_line(X, 2, True, _data(33))


def test_a_fill_in_a_cleared_domain_reads_garbage_instead_of_raising() -> None:
    cache, port = _cache()
    secret = _data(21)
    cache.write(2, True, X, secret)
    cache.wbinvd()
    port.clear(2)
    line = cache.read(2, True, X, LINE)  # e.g. a private cache level writing back after the clear
    assert line != secret
    cache.write(2, True, X + 8, b"late write")
    assert cache.wbinvd() == 1
    with pytest.raises(KeySlotError, match="ASID 9"):  # an ASID that never had a key is still refused
        cache.read(9, True, X, LINE)


# ---- the bulk write-back path against one write-back per line ---------------------------------------
_DOMAINS = [(0, False), (0, True), (1, True), (2, True)]


def _twin(mode: EncryptionMode, coherent: bool) -> tuple[Cache, KeySlotPort]:
    r = random.Random(5)
    mc = MemoryController(Dram(4 * MiB), mode, TweakConstants.random_zen2(48, r), 15, rng=r.randbytes)
    port = mc.secure_port()
    port.load(1, r.randbytes(mode.key_size))
    port.load(2, r.randbytes(mode.key_size))
    return Cache(mc, 4096, 4, coherent), port  # 64 lines in 16 sets: large flushes take the set walk


def _line_by_line_flush_range(cache: Cache, asid: int, c: bool, spa: int, length: int) -> None:
    for addr in range(spa & ~(LINE - 1), spa + length, LINE):
        cache.clflush(asid, c, addr)


def _line_by_line_wbinvd(cache: Cache) -> int:
    before = cache.writebacks
    for s in cache.sets:
        for key, line in list(s.items()):
            cache._writeback(key, line)
        s.clear()
    cache.flush_epoch += 1
    return cache.writebacks - before


def _state(cache: Cache) -> tuple[object, ...]:
    return (list(cache.mc.dram.pages()), sorted(cache.resident()), sorted(cache.dirty), cache.writebacks,
            cache.mc.lines_encrypted, cache.flush_epoch)


_op = st.tuples(st.sampled_from(["write", "read", "clflush"]), st.integers(0, len(_DOMAINS) - 1),
                st.integers(0, 48), st.integers(1, 40))


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(list(EncryptionMode)), coherent=st.booleans(), ops=st.lists(_op, max_size=25),
       clear=st.booleans(), flush=st.tuples(st.sampled_from(["wbinvd", "range"]), st.integers(0, len(_DOMAINS) - 1),
                                            st.integers(0, 48), st.integers(0, 120)))
def test_bulk_write_back_puts_the_same_bytes_in_dram_as_one_write_back_per_line(
        accel: bool, mode: EncryptionMode, coherent: bool, ops: list[tuple[str, int, int, int]], clear: bool,
        flush: tuple[str, int, int, int]) -> None:
    with mem_accel(accel):
        _bulk_against_line_by_line(mode, coherent, ops, clear, flush)


def _bulk_against_line_by_line(mode: EncryptionMode, coherent: bool, ops: list[tuple[str, int, int, int]],
                               clear: bool, flush: tuple[str, int, int, int]) -> None:
    bulk, bport = _twin(mode, coherent)
    ref, rport = _twin(mode, coherent)
    for cache in (bulk, ref):
        for kind, d, line, n in ops:
            asid, c = _DOMAINS[d]
            if kind == "write":
                cache.write(asid, c, 0x10000 + line * LINE, random.Random(line * 7 + d).randbytes(n * LINE))
            elif kind == "read":
                cache.read(asid, c, 0x10000 + line * LINE, n * LINE)
            else:
                cache.clflush(asid, c, 0x10000 + line * LINE)
    if clear:  # a slot cleared under its dirty lines: both paths must use the same unknown key
        bport.clear(2)
        rport.clear(2)
    assert _state(bulk) == _state(ref)
    kind, d, line, n = flush
    if kind == "wbinvd":
        assert bulk.wbinvd() == _line_by_line_wbinvd(ref)
    else:
        asid, c = _DOMAINS[d]
        bulk.flush_range(asid, c, 0x10000 + line * LINE + 5, n * LINE)
        _line_by_line_flush_range(ref, asid, c, 0x10000 + line * LINE + 5, n * LINE)
    assert _state(bulk) == _state(ref)


def _high_asid_twin() -> tuple[Cache, KeySlotPort]:
    """A cache of 64 lines whose memory controller has ASIDs up to 509: keys of ASID 256 and above
    are at or past the int hash modulus 2**61 - 1, so their hashes are not their values."""
    r = random.Random(9)
    mc = MemoryController(Dram(4 * MiB), EncryptionMode.XEX, TweakConstants.random_zen2(48, r), 509, rng=r.randbytes)
    port = mc.secure_port()
    for asid in (1, 256, 300):
        port.load(asid, r.randbytes(16))
    return Cache(mc, 4096, 4), port


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("stray", [False, True])
@pytest.mark.parametrize("domain", [(0, False), (0, True), (1, True), (256, True), (300, True)])
def test_a_flush_larger_than_the_cache_finds_the_dirty_lines_as_a_lookup_per_line_does(
        domain: tuple[int, bool], stray: bool, alone: bool) -> None:
    """The C flush of a range with more lines than the cache tells the dirty lines by one walk of the
    dirty set (keys' hashes, then their values) instead of a lookup per line: the same lines written
    back, the same dirty set left, the same DRAM as the Python path -- with keys whose hash is not
    their value (ASID >= 256) resident and dirty, clean lines in the range, dirty ones outside it,
    and (``stray``) a dirty key in the range that no set holds, which neither path may drop; or
    (``alone``) with only the flushed domain's lines, all of the dirty set in the range."""
    states = []
    for accel in (True, False) if memaccel.ENABLED else (False,):
        with mem_accel(accel):
            cache, _ = _high_asid_twin()
            r = random.Random(3)
            for asid, c in [domain] if alone else [(0, False), (0, True), (1, True), (256, True), (300, True)]:
                for i in range(12):
                    cache.write(asid, c, 0x10000 + i * 0x440, r.randbytes(LINE))
                cache.read(asid, c, 0x30000, 2 * LINE)  # clean lines
            asid, c = domain
            if stray:
                cache.dirty.add(tag_key(asid, c, 0x10000 + 0x3000))
            cache.flush_range(asid, c, 0x10000, 0x20000 + 2 * LINE)  # 2050 lines > 64
            assert not any(key_domain(k)[:2] == (asid if c else 0, c) and 0x10000 <= key_domain(k)[2] < 0x30080
                           for s in cache.sets for k in s)
            states.append(_state(cache))
    assert all(state == states[0] for state in states)
    if stray:
        assert tag_key(domain[0], domain[1], 0x13000) in states[0][2]


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("order", [((1, True), (0, False), (2, True)), ((2, True), (1, True), (0, False)),
                                   ((0, False), (1, True)), ((2, True), (0, False))])
def test_wbinvd_of_one_spa_dirty_in_several_domains_keeps_the_last_in_set_order(
        many: bool, order: tuple[tuple[int, bool], ...]) -> None:
    """Non-coherent profile: the bulk WBINVD writes back what one write-back per line in set
    order would leave in DRAM (the line later in its set wins), and counts what it encrypted."""
    bulk, _ = _twin(EncryptionMode.XEX, False)
    ref, _ = _twin(EncryptionMode.XEX, False)
    for cache in (bulk, ref):
        if many:  # enough other dirty lines for the bulk path
            cache.write(0, False, 0x20000, bytes(range(256)) * 4)
        for asid, c in order:
            cache.write(asid, c, X, _data(asid * 2 + c))
    assert bulk.wbinvd() == _line_by_line_wbinvd(ref)
    assert _state(bulk) == _state(ref)
    assert bulk.mc.dram.read(X, LINE) == ref.mc.dram.read(X, LINE)


# ---- flushes of ranges larger than the cache, and the snoops of private levels ----------------------
class RecordingAgent:
    """A private level that records how the cache snoops it."""

    def __init__(self) -> None:
        self.snoops: list[tuple[int, int, bool]] = []
        self.fills: list[int] = []

    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        self.snoops.append((lo, hi, invalidate))

    def snoop_fill(self, key: int) -> None:
        self.fills.append(key)

    def covers(self, key: int, invalidate: bool) -> bool:
        return any(lo <= key < hi and inv == invalidate for lo, hi, inv in self.snoops)


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
@pytest.mark.parametrize("asid,c", [(0, False), (1, True)])
def test_flush_range_larger_than_the_cache_flushes_every_line_of_the_range(asid: int, c: bool, accel: bool) -> None:
    """The path KVM's flush of a large image takes on non-coherent CPUs (more lines than the cache)."""
    with mem_accel(accel):
        _flush_larger_than_the_cache(asid, c)


def _flush_larger_than_the_cache(asid: int, c: bool) -> None:
    cache, _ = _cache()  # 64 KiB: 1024 lines
    agent = RecordingAgent()
    cache.attach(agent)
    inside = [X + i * 0x1000 for i in range(8)]
    for spa in inside:
        cache.write(asid, c, spa, _data(spa))
    cache.write(asid, c, X - LINE, _data(1))  # just below the range
    cache.write(asid, c, X + 0x40000, _data(2))  # just past it
    cache.write(2 if c else 0, not c, X, _data(3))  # same SPA, other domain
    agent.snoops.clear()
    cache.flush_range(asid, c, X, 0x40000)  # 4096 lines > 1024
    for spa in inside:
        assert cache.peek(asid, c, spa) is None
        assert cache.read(asid, c, spa, LINE) == _data(spa)  # written back, read again from DRAM
    assert cache.mc.dram.read(inside[0], LINE) != (_data(inside[0]) if c else b"")
    assert cache.peek(asid, c, X - LINE) == _data(1) and cache.peek(asid, c, X + 0x40000) == _data(2)
    assert cache.peek(2 if c else 0, not c, X) == _data(3)
    assert {tag_key(asid, c, X - LINE), tag_key(asid, c, X + 0x40000)} <= cache.dirty
    assert agent.covers(tag_key(asid, c, X), True) and agent.covers(tag_key(asid, c, X + 0x3FFC0), True)
    assert not agent.covers(tag_key(asid, c, X + 0x40000), True)


def test_an_empty_range_flushes_nothing() -> None:
    cache, _ = _cache()
    agent = RecordingAgent()
    cache.attach(agent)
    cache.write(1, True, X, _data(60))
    agent.snoops.clear()
    cache.flush_range(1, True, X, 0)
    cache.flush_range(1, True, X + LINE, -LINE)
    assert not agent.snoops and cache.peek(1, True, X) == _data(60) and cache.writebacks == 0


def test_every_access_snoops_the_private_levels_but_their_own() -> None:
    cache, _ = _cache()
    agent, other = RecordingAgent(), RecordingAgent()
    cache.attach(agent)
    cache.attach(other)
    cache.attach(agent)  # once only
    assert cache.agents == (agent, other)
    key = tag_key(1, True, X)
    cache.read(1, True, X, 8)
    assert agent.covers(key, False)
    agent.snoops.clear()
    other.snoops.clear()
    cache.write(1, True, X, b"x", origin=other)
    assert agent.covers(key, True) and not other.snoops  # the writer is not snooped about itself
    for op_ in (lambda: cache.clflush(1, True, X), lambda: cache.vmpage_flush(1, X & ~0xFFF),
                lambda: cache.flush_range(1, True, X, LINE)):
        agent.snoops.clear()
        op_()
        assert agent.covers(key, True)
    for op_ in (cache.wbinvd, cache.invalidate_all):
        agent.snoops.clear()
        op_()
        assert agent.snoops == [(0, 1 << 64, True)]
    agent.snoops.clear()
    cache.clflush(1, True, X + 63)  # the last byte of a line: that line only
    cache.read(1, True, X + 62, 2)
    assert agent.snoops == [(key, key + LINE, True), (key, key + LINE, False)]
    cache.detach(agent)
    cache.detach(agent)  # detaching twice is harmless
    agent.snoops.clear()
    cache.read(1, True, X, 8)
    assert not agent.snoops
    assert not agent.fills  # a non-coherent cache never asks for other-domain copies


def test_coherent_fills_ask_private_levels_for_other_domain_copies() -> None:
    cache, _ = _cache(coherent=True)
    agent = RecordingAgent()
    cache.attach(agent)
    cache.read(1, True, X, 8)
    assert agent.fills == [tag_key(1, True, X)]


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
@pytest.mark.parametrize("mode", list(EncryptionMode))
@pytest.mark.parametrize("d", range(len(_DOMAINS)))
def test_bulk_flush_range_small_and_large_against_one_clflush_per_line(mode: EncryptionMode, d: int,
                                                                        accel: bool) -> None:
    with mem_accel(accel):
        _small_and_large_flushes(mode, d)


def _small_and_large_flushes(mode: EncryptionMode, d: int) -> None:
    bulk, _ = _twin(mode, False)
    ref, _ = _twin(mode, False)
    asid, c = _DOMAINS[d]
    other = _DOMAINS[(d + 1) % len(_DOMAINS)]
    for cache in (bulk, ref):
        cache.write(asid, c, 0x10000, _data(40 + d, 40 * LINE))  # 40 dirty lines: bulk runs
        cache.write(*other, 0x10000 + 8 * LINE, _data(50, 4 * LINE))  # same SPAs, another domain
        cache.read(asid, c, 0x10000 + 50 * LINE, 2 * LINE)  # clean lines in range
    for start, lines in ((0x10000 + 3 * LINE + 5, 30), (0x10000 - LINE, 100)):  # address walk, set walk
        bulk.flush_range(asid, c, start, lines * LINE)
        _line_by_line_flush_range(ref, asid, c, start, lines * LINE)
        assert _state(bulk) == _state(ref)
    assert bulk.writebacks >= 40 and not any(k for k in bulk.dirty if k >> C_SHIFT == (asid << 1 | c))


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
@pytest.mark.parametrize("fill", [0, 40, 3000])
def test_resident_keys_are_the_lines_a_lookup_per_address_finds(fill: int, accel: bool) -> None:
    """Cache.resident_keys (flush_range's choice of lines: one lookup per address, or a visit of
    the lines in the range's sets when they hold fewer -- in Python or in the C helper): the same
    keys as looking up every line, in address order, whatever the occupancy, domain and range
    (wrapping the sets included)."""
    with mem_accel(accel):
        _resident_keys_match_lookups(fill)


def _resident_keys_match_lookups(fill: int) -> None:
    cache, keys = _cache(size=256 << 10)
    keys.load(5, bytes(16))
    rng = random.Random(fill)
    for _ in range(fill):
        asid, c = rng.choice([(0, False), (5, True)])
        cache.write(asid, c, rng.randrange(0, 2 << 20, LINE), _data(rng.randrange(256)))
    for _ in range(60):
        asid, c = rng.choice([(0, False), (5, True)])
        spa = rng.randrange(0, 2 << 20)
        length = rng.choice([1, 64, 4096, 256 * LINE, 64 << 10, 256 << 10]) - rng.randrange(2)
        lo = spa & ~(LINE - 1)
        k0 = tag_key(asid, c, lo)
        want = [k0 + off for off in range(0, spa + length - lo, LINE)
                if cache.sets[((k0 + off) >> 6) & cache.set_mask].get(k0 + off) is not None]
        assert cache.resident_keys(asid, c, spa, length) == want


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_the_c_search_of_resident_keys_matches_a_lookup_per_address_and_checks_its_arguments() -> None:
    """``resident_keys`` (csrc/mem_accel.c): dicts and sets, keys near and above 2^61 (where an
    int's hash is no longer the int), ranges that visit and ranges that look up; bad arguments are
    refused with a TypeError or ValueError, and containers other than exact dicts and sets left to the
    caller's Python path (None)."""
    helper = memaccel.helpers.resident_keys
    rng = random.Random(61)
    for trial in range(400):
        n = 1 << rng.choice([0, 1, 4, 6])
        kind = rng.choice([dict, set])
        sets: list[Any] = [kind() for _ in range(n)]
        base = rng.choice([0, 1 << 40, (1 << 61) - (64 << 10), 1 << 63])
        for _ in range(rng.randrange(0, 300)):
            k = base + rng.randrange(1 << 12) * LINE
            c = sets[(k >> 6) & (n - 1)]
            if kind is dict:
                c[k] = bytearray(LINE)
            else:
                c.add(k)
        lo = base + rng.randrange(1 << 12) * LINE
        hi = lo + rng.choice([0, 1, 64, 4096, 1 << 16, 1 << 18]) - rng.randrange(2)
        want = [k for k in range(lo, hi, LINE) if k in sets[(k >> 6) & (n - 1)]]
        assert helper(sets, n - 1, lo, hi) == want, trial
    with pytest.raises(ValueError, match="multiple of 64"):
        helper([set()], 0, 1, 64)
    with pytest.raises(ValueError, match="mask"):
        helper([set(), set()], 3, 0, 64)
    with pytest.raises(TypeError, match="list of dicts or sets"):
        helper(({},), 0, 0, 64)

    # sets that held lines and were emptied again (a dict keeps its table, with dummy entries, until it
    # grows) are skipped by the visit: the same keys, also when no line is left at all
    for trial in range(100):
        n = 1 << rng.choice([4, 6, 8])
        sets = [{} for _ in range(n)]
        for _ in range(rng.randrange(50, 600)):
            k = rng.randrange(1 << 12) * LINE
            sets[(k >> 6) & (n - 1)][k] = bytearray(LINE)
        for c in sets:
            for k in [k for k in c if rng.random() < (1.0 if trial % 3 == 0 else 0.9)]:
                del c[k]
        lo = rng.randrange(1 << 12) * LINE
        hi = lo + rng.choice([4096, 1 << 16, 1 << 18])
        want = [k for k in range(lo, hi, LINE) if k in sets[(k >> 6) & (n - 1)]]
        assert helper(sets, n - 1, lo, hi) == want, trial
        if trial % 3 == 0:
            assert want == []

    class Counted(dict[int, bytearray]):
        pass

    assert helper([[]], 0, 0, 64) is None  # not a dict or set: the caller's Python path
    assert helper([Counted({0: bytearray(LINE)})], 0, 0, 64) is None  # a subclass answers its own way


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
def test_a_large_flush_takes_lines_of_any_buffer_type(accel: bool) -> None:
    """A resident line held as ``bytes`` (as a test or a private level might leave one) is flushed like
    any other: the C helper refuses it before it changes anything, and the Python pass takes over."""
    with mem_accel(accel):
        cache, _ = _cache()  # 64 KiB
        cache.write(0, False, X, _data(70, 4 * LINE))
        key = tag_key(0, False, X + LINE)
        s = cache.sets[(key >> 6) & cache.set_mask]
        s[key] = bytes(s[key])  # type: ignore[assignment]
        cache.flush_range(0, False, X, 1 << 20)  # more lines than the cache holds
        assert not cache.dirty and cache.peek(0, False, X + LINE) is None
        assert cache.mc.dram.read(X, 4 * LINE) == _data(70, 4 * LINE)


@pytest.mark.parametrize("on", MEM_ACCEL_MODES)
@pytest.mark.parametrize(("before_end", "lines"), [(100, 300), (124, 1000)])
def test_resident_keys_of_a_range_whose_sets_wrap_around(on: bool, before_end: int, lines: int) -> None:
    """A range of more lines than the visit threshold but fewer than the sets, starting near the last
    set, maps onto the last sets and then the first ones (the second shape: more lines than the sets
    before its first): visiting its sets' lines (the Python way, and C's) finds every resident line of
    the range, on both sides of the wrap, and none outside it."""
    cache, _ = _cache(size=1 << 20, ways=16)  # 1024 sets
    nsets = len(cache.sets)
    base = 0x10_0000  # set 0
    first_line = nsets - before_end  # sets first_line..1023, then 0..
    resident = [first_line + k for k in (0, 7, 50, 99, before_end, before_end + 1, before_end + 50, lines - 1)]
    outside = [first_line - 1, first_line + lines, first_line + lines + 5]
    for line in resident + outside:
        cache.line(tag_key(1, True, base + line * LINE))
    with mem_accel(on):
        got = cache.resident_keys(1, True, base + first_line * LINE, lines * LINE)
    assert got == [tag_key(1, True, base + line * LINE) for line in sorted(resident)]
