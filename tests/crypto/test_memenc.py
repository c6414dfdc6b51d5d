"""The memory-encryption engine (APM2 15.34; SEVurity, CipherLeaks, IEEE 1619): known answers against independent reference
code, the algebra the SEV research relies on, single-line vs bulk paths, the C accelerator vs the
numpy paths, and bad input."""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto import memenc
from sevemu.crypto.membench import bench_modes
from sevemu.crypto.memenc import (
    ACCELERATED,
    SEVURITY_ZEN1_TWEAKS,
    EncryptionMode,
    MemoryCipher,
    TweakConstants,
    xts_encrypt_units,
)
from sevemu.errors import AddressError, AlignmentError, InputError, KeySizeError

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
MODES = [XE, XEX, XTS]
ZEN1 = TweakConstants.published_zen1(48, random.Random(1))
ZEN2 = TweakConstants.random_zen2(48, random.Random(2))
CHUNK = 512 << 10  # the bulk path's SPA-aligned tweak window
#: The two implementations of the engine: the C accelerator (when built) and the numpy/int paths.
PATHS = [
    pytest.param(True, id="accel", marks=pytest.mark.skipif(not ACCELERATED, reason="accelerator not built")),
    pytest.param(False, id="numpy"),
]
needs_accel = pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")


def _key(mode: EncryptionMode, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(mode.key_size)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# -- independent reference (SEVurity / IEEE 1619 formulas, bit by bit) -----------------------------


def ref_tweak(tc: TweakConstants, spa: int) -> bytes:
    t = bytes(16)
    for i in range(4, tc.pa_bits):
        if spa >> i & 1:
            t = _xor(t, tc.constants[i])
    return t


def ref_crypt(
    mode: EncryptionMode, key: bytes, tc: TweakConstants, spa: int, data: bytes, enc: bool
) -> bytes:
    if mode is XTS:  # cryptography's own XTS, one 64-byte data unit per line, tweak = SPA >> 6
        out = b""
        for off in range(0, len(data), 64):
            c = Cipher(algorithms.AES(key), modes.XTS(((spa + off) >> 6).to_bytes(16, "little")))
            ctx = c.encryptor() if enc else c.decryptor()
            out += ctx.update(data[off : off + 64]) + ctx.finalize()
        return out
    ecb = Cipher(algorithms.AES(key), modes.ECB())
    out = b""
    for off in range(0, len(data), 16):
        t = ref_tweak(tc, spa + off)
        block = data[off : off + 16]
        if enc:
            y = ecb.encryptor().update(_xor(block, t))
            out += _xor(y, t) if mode is XEX else y
        else:
            x = _xor(block, t) if mode is XEX else block
            out += _xor(ecb.decryptor().update(x), t)
    return out


# -- modes ---------------------------------------------------------------------------------------


def test_mode_key_sizes_and_granules() -> None:
    assert [m.key_size for m in MODES] == [16, 16, 64]
    assert [m.granule for m in MODES] == [16, 16, 64]
    assert [MemoryCipher(m, _key(m), ZEN2).granule for m in MODES] == [16, 16, 64]
    assert EncryptionMode("aes-256-xts") is XTS


# -- tweak constants -------------------------------------------------------------------------------


def test_published_zen1_is_sevuritys_table() -> None:
    assert ZEN1.constants[4] == bytes.fromhex("82253838") * 4
    assert ZEN1.constants[8] == bytes.fromhex("77d91077") * 4
    assert ZEN1.constants[31] == bytes.fromhex("4f5ce727") * 4
    assert [ZEN1.constants[i][:4].hex() for i in range(4, 32)] == list(SEVURITY_ZEN1_TWEAKS)
    assert all(c == bytes(16) for c in ZEN1.constants[:4])
    assert ZEN1.tweak(0x10) == ZEN1.constants[4]  # byte j of the block xor= t_i[j mod 4]


def test_zen1_high_bits_are_random_per_boot_but_four_byte_periodic() -> None:
    a = TweakConstants.published_zen1(52, random.Random(5))
    b = TweakConstants.published_zen1(52, random.Random(6))
    assert a.constants[:32] == b.constants[:32]
    assert a.constants[32:] != b.constants[32:]
    assert a == TweakConstants.published_zen1(52, random.Random(5))  # reproducible boot
    for c in a.constants:
        assert c == c[:4] * 4
    assert len(TweakConstants.published_zen1(40).constants) == 40  # OS randomness


def test_zen2_constants_are_random_128_bit_per_boot() -> None:
    a = TweakConstants.random_zen2(48, random.Random(7))
    assert all(c == bytes(16) for c in a.constants[:4])
    assert len(set(a.constants[4:])) == 44
    assert not all(c == c[:4] * 4 for c in a.constants[4:])
    assert a != TweakConstants.random_zen2(48, random.Random(8))
    assert TweakConstants.random_zen2(48) != TweakConstants.random_zen2(48)


def test_tweak_constants_are_frozen_values() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ZEN2.pa_bits = 40  # type: ignore[misc]
    assert TweakConstants.zeros(40) == TweakConstants.zeros(40)
    assert "zen2-random" in repr(ZEN2)


@pytest.mark.parametrize(
    ("pa_bits", "constants"),
    [
        (11, (bytes(16),) * 11),
        (53, (bytes(16),) * 53),
        (40, (bytes(16),) * 39),
        (40, (bytes(16),) * 39 + (bytes(15),)),
        (40, (b"\x01" + bytes(15),) + (bytes(16),) * 39),  # t_0 must be zero
    ],
)
def test_bad_tweak_constants(pa_bits: int, constants: tuple[bytes, ...]) -> None:
    with pytest.raises(InputError):
        TweakConstants(pa_bits, constants)


@pytest.mark.parametrize(
    "ctor", [TweakConstants.published_zen1, TweakConstants.random_zen2, TweakConstants.zeros]
)
def test_constructors_check_pa_bits(ctor: object) -> None:
    with pytest.raises(InputError):
        ctor(60)  # type: ignore[operator]


@given(p=st.integers(0, (1 << 48) - 1), q=st.integers(0, (1 << 48) - 1))
def test_tweak_is_linear_in_the_address(p: int, q: int) -> None:
    p, q = p & ~15, q & ~15
    for tc in (ZEN1, ZEN2):
        assert tc.tweak(p ^ q) == _xor(tc.tweak(p), tc.tweak(q))
        assert tc.tweak(p) == ref_tweak(tc, p)
        assert tc.tweak(p | 7) == tc.tweak(p)  # bits 3:0 select a byte, not a tweak


def test_vectorised_tweaks_match_scalar() -> None:
    rng = np.random.default_rng(3)
    spas = rng.integers(0, 1 << 48, size=500, dtype=np.uint64)
    for tc in (ZEN1, ZEN2):
        got = tc.tweaks(spas)
        assert got.shape == (500, 16) and got.dtype == np.uint8
        assert [bytes(row) for row in got] == [tc.tweak(int(s)) for s in spas]
    assert TweakConstants.zeros(48).tweaks([0x1230, 0xFFFF0]).tobytes() == bytes(32)
    assert ZEN2.tweaks(np.array([], dtype=np.uint64)).shape == (0, 16)


def test_tweak_addresses_outside_the_table() -> None:
    with pytest.raises(AddressError):
        ZEN2.tweak(1 << 48)
    with pytest.raises(AddressError):
        ZEN2.tweak(-16)
    with pytest.raises(AddressError):
        ZEN2.tweaks([0, 1 << 48])
    with pytest.raises(InputError):
        ZEN2.tweaks([[0, 16]])


# -- known answers against the reference ----------------------------------------------------------


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tc", [ZEN1, ZEN2], ids=["zen1", "zen2"])
def test_matches_reference(mode: EncryptionMode, tc: TweakConstants, accel: bool) -> None:
    rng = random.Random(11)
    key = _key(mode, 1)
    mc = MemoryCipher(mode, key, tc, accel=accel)
    assert mc.accelerated is accel
    for _ in range(12):
        n = mode.granule * rng.randint(1, 40)
        spa = rng.randrange(0, 1 << 44) & -mode.granule
        pt = rng.randbytes(n)
        ct = ref_crypt(mode, key, tc, spa, pt, True)
        assert mc.encrypt_line(spa, pt) == ct
        assert mc.encrypt_bulk(spa, pt) == ct
        assert ref_crypt(mode, key, tc, spa, ct, False) == pt
        assert mc.decrypt_line(spa, ct) == pt
        assert mc.decrypt_bulk(spa, ct) == pt


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_encrypt_small_matches_the_reference_and_the_bulk_path(mode: EncryptionMode, accel: bool) -> None:
    """The one-pass path of a page-sized write (C tweak pass, AES, tweak pass) gives the reference's
    ciphertext, as the bulk path does; larger or empty transfers fall back to the bulk path."""
    rng = random.Random(13)
    key = _key(mode, 2)
    mc = MemoryCipher(mode, key, ZEN2, accel=accel)
    for n in (mode.granule, 64 * rng.randint(1, 63), 4096, 8192, 0):
        spa = rng.randrange(0, 1 << 44) & -4096
        pt = rng.randbytes(n)
        ct = ref_crypt(mode, key, ZEN2, spa, pt, True) if n else b""
        assert bytes(mc.encrypt_small(spa, pt)) == ct == mc.encrypt_bulk(spa, pt)
    with pytest.raises(AlignmentError):
        mc.encrypt_small(8, bytes(16))


@pytest.mark.parametrize("mode", MODES)
def test_aes_contexts_are_built_at_first_use_for_the_key(mode: EncryptionMode) -> None:
    """A new cipher holds no AES-ECB context until a path uses one (its slot unset); the first use --
    a decryption first, or an encryption -- builds those of its own key: the reference's bytes."""
    key = _key(mode, 3)
    spa = 0x1234_5000
    pt = random.Random(14).randbytes(256)
    ct = ref_crypt(mode, key, ZEN2, spa, pt, True)
    for first_decrypt in (True, False):
        mc = MemoryCipher(mode, key, ZEN2, accel=False)
        for slot in ("_enc", "_dec", "_tweak_enc"):
            with pytest.raises(AttributeError):
                getattr(MemoryCipher, slot).__get__(mc, MemoryCipher)  # (the slot itself, not __getattr__)
        if first_decrypt:
            assert mc.decrypt_line(spa, ct[:64]) == pt[:64]
        assert mc.encrypt_bulk(spa, pt) == ct
        assert mc.decrypt_bulk(spa, ct) == pt
        assert mc.encrypt_line(spa + 64, pt[64:128]) == ct[64:128]
    assert not hasattr(mc, "_nothing")  # (any other name: AttributeError, as without __getattr__)


@pytest.mark.parametrize("accel", PATHS)
def test_xts_is_cryptographys_xts_on_each_line(accel: bool) -> None:
    # Random keys and addresses, lines and multi-line spans, against cryptography's modes.XTS.
    rng = random.Random(12)
    for _ in range(20):
        key = rng.randbytes(64)
        mc = MemoryCipher(XTS, key, ZEN2, accel=accel)
        spa = rng.randrange(0, 1 << 48) & ~63
        spa = min(spa, (1 << 48) - 64 * 8)
        pt = rng.randbytes(64 * rng.randint(1, 8))
        expected = ref_crypt(XTS, key, ZEN2, spa, pt, True)
        assert mc.encrypt_line(spa, pt[:64]) == expected[:64]
        assert mc.encrypt_bulk(spa, pt) == expected
        # ... and the generic XTS primitive of test_xts_vectors with a 64-byte data unit.
        assert xts_encrypt_units(key, spa >> 6, pt, 64) == expected


@pytest.mark.parametrize("mode", [XE, XEX])
def test_zero_tweaks_degenerate_to_ecb(mode: EncryptionMode) -> None:
    key = _key(mode)
    pt = os.urandom(4096)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(pt)
    mc = MemoryCipher(mode, key, TweakConstants.zeros())
    assert mc.encrypt_line(0x5000, pt) == ecb
    assert mc.encrypt_bulk(0x123456000, pt) == ecb


# -- the algebra of SEVurity / CipherLeaks (SEVurity section III, CipherLeaks) -------------


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_per_key_address_plaintext(mode: EncryptionMode) -> None:
    mc = MemoryCipher(mode, _key(mode), ZEN2)
    other = MemoryCipher(mode, _key(mode), ZEN2)  # the same key in another slot
    line = bytes(range(64))
    assert mc.encrypt_line(0x4000, line) == mc.encrypt_line(0x4000, line) == other.encrypt_line(0x4000, line)
    assert mc.encrypt_line(0x4000, line) != mc.encrypt_line(0x4040, line)
    assert mc.encrypt_line(0x4000, line) != MemoryCipher(mode, _key(mode, 9), ZEN2).encrypt_line(0x4000, line)


@given(
    m=st.binary(min_size=16, max_size=16), p=st.integers(0, (1 << 44) - 1), q=st.integers(0, (1 << 44) - 1)
)
@settings(max_examples=50)
def test_xe_moved_block_decrypts_to_m_xor_tp_xor_tq(m: bytes, p: int, q: int) -> None:
    p, q = p & ~15, q & ~15
    for tc in (ZEN1, ZEN2):
        mc = MemoryCipher(XE, _key(XE), tc)
        moved = mc.decrypt_line(q, mc.encrypt_line(p, m))
        assert moved == _xor(m, _xor(tc.tweak(p), tc.tweak(q)))
        assert moved == _xor(m, tc.tweak(p ^ q))


@given(
    m=st.binary(min_size=16, max_size=16), p=st.integers(0, (1 << 44) - 1), q=st.integers(0, (1 << 44) - 1)
)
@settings(max_examples=50)
def test_xex_mover_must_fix_up_the_ciphertext(m: bytes, p: int, q: int) -> None:
    p, q = p & ~15, q & ~15
    delta = _xor(ZEN2.tweak(p), ZEN2.tweak(q))
    mc = MemoryCipher(XEX, _key(XEX), ZEN2)
    c = mc.encrypt_line(p, m)
    assert mc.decrypt_line(q, _xor(c, delta)) == _xor(m, delta)
    if delta != bytes(16):  # moved as is, the block decrypts to garbage
        assert mc.decrypt_line(q, c) != _xor(m, delta)


@pytest.mark.parametrize("mode", [XE, XEX])
def test_tweaks_do_not_depend_on_the_key(mode: EncryptionMode) -> None:
    # What a ciphertext move reveals (T(p) ^ T(q)) is the same under every key, the host's too.
    p, q = 0x1_2345_6780, 0x9_8765_4320
    m = os.urandom(16)
    seen = set()
    for seed in range(4):
        mc = MemoryCipher(mode, _key(mode, seed), ZEN1)
        c = mc.encrypt_line(p, m)
        if mode is XEX:
            c = _xor(c, ZEN1.tweak(p ^ q))
        seen.add(_xor(mc.decrypt_line(q, c), m))
    assert seen == {ZEN1.tweak(p ^ q)}


def test_xts_lines_are_unrelated() -> None:
    mc = MemoryCipher(XTS, _key(XTS), ZEN2)
    m = bytes(64)
    a, b = mc.encrypt_line(0x10000, m), mc.encrypt_line(0x10040, m)
    assert all(a[i : i + 16] != b[j : j + 16] for i in range(0, 64, 16) for j in range(0, 64, 16))
    assert len({a[i : i + 16] for i in range(0, 64, 16)}) == 4  # blocks within a line differ too
    # Moving a line leaks no plaintext-independent difference (unlike XE/XEX): the error depends on m.
    m2 = os.urandom(64)
    err1 = _xor(mc.decrypt_line(0x10040, a), m)
    err2 = _xor(mc.decrypt_line(0x10040, mc.encrypt_line(0x10000, m2)), m2)
    assert err1 != err2


# -- single-line vs bulk paths ---------------------------------------------------------------------


@st.composite
def spans(draw: st.DrawFn, granule: int) -> tuple[int, int]:
    # Start near a 128 KiB bulk-chunk boundary half the time, so spans cross chunks.
    near = draw(st.booleans())
    if near:
        spa = draw(st.integers(1, 1 << 20)) * CHUNK - granule * draw(st.integers(0, 600))
    else:
        spa = draw(st.integers(0, (1 << 40) // granule)) * granule
    n = granule * draw(st.integers(1, 3 * 4096 // granule))
    return spa, n


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_line_and_bulk_paths_agree(mode: EncryptionMode, accel: bool, data: st.DataObject) -> None:
    spa, n = data.draw(spans(mode.granule))
    pt = data.draw(st.binary(min_size=n, max_size=n))
    mc = MemoryCipher(mode, _key(mode), ZEN1 if mode is XE else ZEN2, accel=accel)
    ct = mc.encrypt_line(spa, pt)
    assert mc.encrypt_bulk(spa, pt) == ct
    assert mc.decrypt_line(spa, ct) == pt
    assert mc.decrypt_bulk(spa, memoryview(ct)) == pt
    # Line by line, as the cache writes back, gives the same bytes as one bulk call.
    g = 64 if n % 64 == 0 and spa % 64 == 0 else mode.granule
    assert b"".join(mc.encrypt_line(spa + o, pt[o : o + g]) for o in range(0, n, g)) == ct


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_bulk_over_many_chunks_matches_pages(mode: EncryptionMode, accel: bool) -> None:
    # Crosses chunk-index carries (0b0111 -> 0b1000) with an unaligned start and a ragged end.
    mc = MemoryCipher(mode, _key(mode), ZEN2, accel=accel)
    spa = 7 * CHUNK - 3 * 4096 - 256
    pt = os.urandom(2 * CHUNK + 5 * 4096 + 192)
    ct = mc.encrypt_bulk(spa, pt)
    pages = b"".join(mc.encrypt_line(spa + o, pt[o : o + 4096]) for o in range(0, len(pt), 4096))
    assert ct == pages
    assert mc.decrypt_bulk(spa, ct) == pt


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_bulk_into_caller_buffers(mode: EncryptionMode, accel: bool) -> None:
    mc = MemoryCipher(mode, _key(mode), ZEN2, accel=accel)
    pt = bytearray(os.urandom(CHUNK + 4096))
    expected = mc.encrypt_bulk(0x40000, pt)
    buf = bytearray(pt)
    mc.encrypt_bulk_into(0x40000, buf, buf)  # in place
    assert buf == expected
    mc.decrypt_bulk_into(0x40000, buf, buf)  # in place, both ways
    assert buf == pt
    mc.encrypt_bulk_into(0x40000, buf, buf)
    out = np.zeros(len(pt), dtype=np.uint8)
    mc.decrypt_bulk_into(0x40000, buf, out.data)  # any writable buffer
    assert out.tobytes() == pt
    with pytest.raises(InputError):
        mc.encrypt_bulk_into(0x40000, pt, bytearray(len(pt) - 64))
    with pytest.raises(InputError):
        mc.encrypt_bulk_into(0x40000, pt, memoryview(bytes(len(pt))))
    with pytest.raises(InputError):
        mc.encrypt_bulk_into(0x40000, "text", bytearray(4))  # type: ignore[arg-type]
    with pytest.raises(InputError):
        mc.encrypt_bulk(0x40000, memoryview(bytes(256))[::2])
    assert mc.encrypt_bulk(0x40000, b"") == bytearray()
    # A typed buffer is taken as its bytes.
    words = np.frombuffer(bytes(pt), dtype=np.uint64)
    assert mc.encrypt_bulk(0x40000, words.data) == expected


@pytest.mark.parametrize("accel", PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_memo_tables_stay_correct_when_they_roll_over(mode: EncryptionMode, accel: bool) -> None:
    mc = MemoryCipher(mode, _key(mode), TweakConstants.random_zen2(40, random.Random(4)), accel=accel)
    line = bytes(64)
    stride = 4096 if mode is not XTS else 64  # page memo for XE/XEX, line memo for XTS
    spas = [0x100000 + i * stride for i in range((1 << 14) + 3 if mode is not XTS else (1 << 11) + 3)]
    first = {s: mc.encrypt_line(s, line) for s in spas[:3]}
    for s in spas:
        mc.encrypt_line(s, line)
    assert all(mc.encrypt_line(s, line) == c for s, c in first.items())
    assert mc.decrypt_line(spas[-1], mc.encrypt_line(spas[-1], line)) == line


# -- the C accelerator against the numpy paths -----------------------------------------------------


def _gf_double(x: int) -> int:
    return ((x << 1) & ((1 << 128) - 1)) ^ (0x87 if x >> 127 else 0)


@st.composite
def bulk_cases(draw: st.DrawFn, granule: int) -> tuple[TweakConstants, int, int, int]:
    """(tweak constants, spa, length, data seed): spans near the numpy path's window and chunk
    boundaries and the accelerator's chunk boundaries, near the top of the address space, anywhere."""
    tc = draw(
        st.sampled_from(
            [
                ZEN1,
                ZEN2,
                TweakConstants.random_zen2(52, random.Random(9)),
                TweakConstants.random_zen2(12, random.Random(10)),
            ]
        )
    )
    n = granule * draw(st.integers(1, (1300 << 10) // granule))
    limit = tc.address_limit
    if n > limit:
        n = limit - granule * draw(st.integers(0, 3))
    where = draw(st.sampled_from(["boundary", "top", "anywhere"]))
    if where == "boundary":
        unit = draw(st.sampled_from([128 << 10, 256 << 10, CHUNK, 4096]))
        spa = draw(st.integers(0, 64)) * unit + granule * draw(st.integers(-700, 700))
    elif where == "top":
        spa = limit - n - granule * draw(st.integers(0, 100))
    else:
        spa = granule * draw(st.integers(0, limit // granule))
    spa = min(max(spa, 0), limit - n)
    return tc, spa, n, draw(st.integers(0, 1 << 32))


@needs_accel
@pytest.mark.parametrize("mode", MODES)
@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_accelerated_and_numpy_paths_give_the_same_bytes(mode: EncryptionMode, data: st.DataObject) -> None:
    tc, spa, n, seed = data.draw(bulk_cases(mode.granule))
    rng = random.Random(seed)
    key = rng.randbytes(mode.key_size)
    fast = MemoryCipher(mode, key, tc, accel=True)
    slow = MemoryCipher(mode, key, tc, accel=False)
    assert fast.accelerated and not slow.accelerated
    pt = rng.randbytes(n)
    ct = slow.encrypt_bulk(spa, pt)
    assert fast.encrypt_bulk(spa, pt) == ct
    assert fast.decrypt_bulk(spa, ct) == pt == slow.decrypt_bulk(spa, ct)
    buf = bytearray(ct)
    fast.decrypt_bulk_into(spa, buf, buf)  # in place
    assert buf == pt
    # The single-line path, on the lines of the span (and spans shorter than a page).
    for off in range(0, min(n, 1024), 64):
        if off + 64 <= n and (spa + off) % 64 == 0:
            line = pt[off : off + 64]
            c = slow.encrypt_line(spa + off, line)
            assert fast.encrypt_line(spa + off, line) == c == ct[off : off + 64]
            assert fast.decrypt_line(spa + off, c) == line == slow.decrypt_line(spa + off, c)
    short = min(n, 4096)
    assert fast.encrypt_line(spa, pt[:short]) == slow.encrypt_line(spa, pt[:short]) == ct[:short]
    assert fast.decrypt_line(spa, ct[:short]) == pt[:short]


@needs_accel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("spa", "n"),
    [
        (7 * CHUNK - 3 * 4096 - 256, 2 * CHUNK + 5 * 4096 + 192),  # window carries, ragged ends
        (0, 3 << 20),
        ((1 << 48) - (1 << 20) - 64, 1 << 20),  # the top of the address space
    ],
)
def test_accelerated_and_numpy_paths_agree_over_many_chunks(mode: EncryptionMode, spa: int, n: int) -> None:
    key = _key(mode, 7)
    fast = MemoryCipher(mode, key, ZEN2, accel=True)
    slow = MemoryCipher(mode, key, ZEN2, accel=False)
    pt = os.urandom(n)
    ct = slow.encrypt_bulk(spa, pt)
    assert fast.encrypt_bulk(spa, pt) == ct
    assert fast.decrypt_bulk(spa, ct) == pt


@needs_accel
@pytest.mark.parametrize(
    "tc", [ZEN1, ZEN2, TweakConstants.random_zen2(52, random.Random(3))], ids=["zen1", "zen2", "pa52"]
)
def test_accel_address_tweak_is_t_of_each_block(tc: TweakConstants) -> None:
    from sevemu.crypto import _memenc_accel as accel

    consts = b"".join(tc.constants)
    rng = random.Random(5)
    for _ in range(20):
        n = 16 * rng.randint(1, 700)
        spa = rng.randrange(0, tc.address_limit - n) & ~15
        src = rng.randbytes(n)
        dst = bytearray(n)
        accel.xor_addr_tweak(dst, src, spa, consts)
        tweaks = tc.tweaks(np.arange(spa, spa + n, 16, dtype=np.uint64)).tobytes()
        assert bytes(dst) == _xor(src, tweaks)
        accel.xor_addr_tweak(dst, dst, spa, consts)  # in place: back to src
        assert bytes(dst) == src
    top = tc.address_limit - 64
    accel.xor_addr_tweak(dst := bytearray(64), bytes(64), top, consts)
    assert bytes(dst) == tc.tweaks(np.arange(top, top + 64, 16, dtype=np.uint64)).tobytes()


@needs_accel
@pytest.mark.parametrize("unit_blocks", [1, 2, 3, 4, 5, 7, 8, 9, 32, 33])
def test_accel_xts_masks_are_the_alpha_multiples(unit_blocks: int) -> None:
    from sevemu.crypto import _memenc_accel as accel

    rng = random.Random(unit_blocks)
    units = 5
    # Tweaks with the top bits set take the reduction paths.
    tweaks = rng.randbytes(16 * (units - 2)) + b"\xff" * 16 + bytes(15) + b"\xe0"
    src = rng.randbytes(16 * unit_blocks * units)
    dst = bytearray(len(src))
    accel.xts_xor(dst, src, tweaks, unit_blocks)
    expected = bytearray()
    for u in range(units):
        t = int.from_bytes(tweaks[16 * u : 16 * u + 16], "little")
        for j in range(unit_blocks):
            off = 16 * (u * unit_blocks + j)
            expected += (int.from_bytes(src[off : off + 16], "little") ^ t).to_bytes(16, "little")
            t = _gf_double(t)
    assert dst == expected
    # ... and the numpy path's expansion agrees.
    s = np.frombuffer(tweaks, dtype=np.uint64).copy()
    mask = np.empty(len(src) // 8, dtype=np.uint64)
    memenc._xts_alpha_powers(s, unit_blocks, mask, np.empty((3, s.shape[0]), dtype=np.uint64))
    assert (np.frombuffer(src, dtype=np.uint64) ^ mask).tobytes() == expected


@needs_accel
def test_accel_sequence_numbers_and_xor() -> None:
    from sevemu.crypto import _memenc_accel as accel

    out = bytearray(16 * 6)
    accel.xts_sequence(out, (1 << 64) - 3)  # carries into the high word
    assert [int.from_bytes(out[i : i + 16], "little") for i in range(0, 96, 16)] == [
        (1 << 64) - 3 + i for i in range(6)
    ]
    a, b, c = os.urandom(67), os.urandom(67), os.urandom(67)
    assert accel.xor_bytes(a, b) == _xor(a, b)
    assert accel.xor_bytes(a, b, c) == _xor(_xor(a, b), c)
    assert accel.xor_bytes(a, memoryview(b), None) == _xor(a, b)
    assert accel.xor_bytes(b"", b"") == b""
    out = accel.xor_bytearray(a, b, c)  # the cache-fill form: a new, owned bytearray
    assert type(out) is bytearray and out == _xor(_xor(a, b), c)
    assert accel.xor_bytearray(a, b) == _xor(a, b)


@needs_accel
def test_accel_rejects_bad_arguments() -> None:
    from sevemu.crypto import _memenc_accel as accel

    consts = b"".join(ZEN2.constants)
    line = bytes(64)
    for call in (
        lambda: accel.xor_addr_tweak(bytearray(48), line, 0, consts),  # length mismatch
        lambda: accel.xor_addr_tweak(bytearray(24), bytes(24), 0, consts),  # not whole blocks
        lambda: accel.xor_addr_tweak(bytearray(64), line, 8, consts),  # unaligned spa
        lambda: accel.xor_addr_tweak(bytearray(64), line, 1 << 48, consts),  # out of range
        lambda: accel.xor_addr_tweak(bytearray(64), line, (1 << 48) - 48, consts),  # runs past the end
        lambda: accel.xor_addr_tweak(bytearray(64), line, -16, consts),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 1 << 64, consts),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 0, consts[:-1]),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 0, consts[: 16 * 11]),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 0, bytes(16 * 64)),
        lambda: accel.xts_xor(bytearray(64), line, bytes(32), 4),  # tweaks for two units
        lambda: accel.xts_xor(bytearray(64), line, bytes(15), 4),
        lambda: accel.xts_xor(bytearray(48), line, bytes(16), 4),
        lambda: accel.xts_xor(bytearray(64), line, bytes(16), 0),
        lambda: accel.xts_xor(bytearray(64), line, bytes(16), 1 << 30),
        lambda: accel.xts_sequence(bytearray(17), 0),
        lambda: accel.xts_sequence(bytearray(16), -1),
        lambda: accel.xor_bytes(line, bytes(63)),
        lambda: accel.xor_bytes(line, line, bytes(65)),
        lambda: accel.xor_bytearray(line, bytes(63)),
    ):
        with pytest.raises(ValueError):
            call()
    for call in (
        lambda: accel.xor_addr_tweak(bytes(64), line, 0, consts),  # read-only dst
        lambda: accel.xor_addr_tweak(bytearray(64), "x" * 64, 0, consts),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 0.0, consts),
        lambda: accel.xor_addr_tweak(bytearray(64), line, 0),
        lambda: accel.xts_xor(bytearray(64), memoryview(bytes(128))[::2], bytes(16), 4),  # strided
        lambda: accel.xor_bytes(line),
        lambda: accel.xor_bytes(line, 64),
        lambda: accel.xor_bytearray(line),
    ):
        with pytest.raises((TypeError, BufferError)):
            call()


def test_requiring_the_accelerator_when_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memenc, "ACCELERATED", False)
    with pytest.raises(InputError, match="not built"):
        MemoryCipher(XE, _key(XE), ZEN2, accel=True)
    mc = MemoryCipher(XTS, _key(XTS), ZEN2)  # the default follows what was built
    assert not mc.accelerated
    assert mc.encrypt_line(0x1000, bytes(64)) == ref_crypt(XTS, _key(XTS), ZEN2, 0x1000, bytes(64), True)


def test_falls_back_to_numpy_when_the_extension_cannot_be_imported() -> None:
    # A fresh interpreter in which importing the extension fails, as after an install without a C
    # compiler: memenc imports, reports it, and gives the reference bytes.
    spa = 0x12345000
    pt = bytes(range(256)) * 4
    expected = [ref_crypt(m, _key(m), ZEN1, spa, pt, True).hex() for m in MODES]
    code = f"""
import random, sys
sys.modules["sevemu.crypto._memenc_accel"] = None  # makes the import raise ImportError
from sevemu.crypto import memenc
from sevemu.errors import InputError
assert not memenc.ACCELERATED
tc = memenc.TweakConstants.published_zen1(48, random.Random(1))
for mode, want in zip(memenc.EncryptionMode, {expected!r}):
    mc = memenc.MemoryCipher(mode, random.Random(0).randbytes(mode.key_size), tc)
    assert not mc.accelerated
    pt = {pt!r}
    assert mc.encrypt_bulk({spa}, pt).hex() == want, mode
    assert mc.encrypt_line({spa}, pt[:64]).hex() == want[:128], mode
    assert mc.decrypt_bulk({spa}, bytes.fromhex(want)) == pt
try:
    memenc.MemoryCipher(memenc.EncryptionMode.XE, bytes(16), tc, accel=True)
except InputError:
    print("fallback ok")
"""
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "fallback ok"


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [0, 15, 17, 24, 32, 63, 65])
def test_wrong_key_size(mode: EncryptionMode, size: int) -> None:
    if size == mode.key_size:
        return
    with pytest.raises(KeySizeError):
        MemoryCipher(mode, bytes(size), ZEN2)


def test_key_must_be_bytes_and_mode_an_enum() -> None:
    with pytest.raises(KeySizeError):
        MemoryCipher(XE, "0123456789abcdef", ZEN2)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        MemoryCipher("xe", bytes(16), ZEN2)  # type: ignore[arg-type]
    assert "xex" in repr(MemoryCipher(XEX, bytearray(16), ZEN2))


@pytest.mark.parametrize(
    ("mode", "spa", "length"),
    [(XE, 8, 16), (XEX, 0x1000, 8), (XEX, 0x1004, 64), (XTS, 0x10, 64), (XTS, 0x40, 16), (XTS, 0x40, 80)],
)
@pytest.mark.parametrize("accel", PATHS)
def test_unaligned_spa_or_length(mode: EncryptionMode, spa: int, length: int, accel: bool) -> None:
    mc = MemoryCipher(mode, _key(mode), ZEN2, accel=accel)
    for fn in (mc.encrypt_line, mc.decrypt_line, mc.encrypt_bulk, mc.decrypt_bulk):
        with pytest.raises(AlignmentError, match="multiples of"):
            fn(spa, bytes(length))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("spa", "length"), [(1 << 48, 64), ((1 << 48) - 64, 128), (-64, 64), ((1 << 48) - 64, 8192)]
)
@pytest.mark.parametrize("accel", PATHS)
def test_address_outside_the_physical_address_space(
    mode: EncryptionMode, spa: int, length: int, accel: bool
) -> None:
    mc = MemoryCipher(mode, _key(mode), ZEN2, accel=accel)
    for fn in (mc.encrypt_line, mc.decrypt_line, mc.encrypt_bulk, mc.decrypt_bulk):
        with pytest.raises(AddressError) as info:
            fn(spa, bytes(length))
        assert not isinstance(info.value, AlignmentError)
    assert len(mc.encrypt_line((1 << 48) - 64, bytes(64))) == 64  # the last line is fine


# -- benchmark entry point (smoke only: benchmarks are commands, not timed tests) ------------------


@pytest.mark.parametrize("accel", PATHS)
def test_bench_modes_smoke(accel: bool) -> None:
    rows = bench_modes(1 << 20, repeats=1, lines=64, accel=accel)
    assert [r["mode"] for r in rows] == ["xe", "xex", "aes-256-xts"]
    for r in rows:
        for k in ("mode_gbps", "baseline_gbps", "ratio", "line_encrypt_us", "line_decrypt_us"):
            assert r[k] > 0
        assert r["accelerated"] is accel
    assert rows[0]["baseline"] == "aes-128-ecb"
    # XTS: the ratio is to cryptography's XTS in 1 MiB units; per-page units are extra information.
    assert rows[2]["baseline"] == "aes-256-xts/1MiB-units"
    assert rows[2]["xts_unit_baseline"] == "aes-256-xts/4096B-units"
    assert rows[2]["xts_unit_gbps"] > 0 and rows[2]["ratio_xts_unit"] > 0
    with pytest.raises(InputError):
        bench_modes(1000)


@pytest.mark.parametrize("mode", list(EncryptionMode))
@pytest.mark.parametrize("accel", [False, True])
def test_line_reader_matches_decrypt_line(mode: EncryptionMode, accel: bool) -> None:
    """The memory controller's miss path (line_reader over a page store) gives decrypt_line's bytes,
    as a new bytearray, with absent pages reading as zeros."""
    from sevemu.crypto import memenc

    if accel and not memenc.ACCELERATED:
        pytest.skip("the C accelerator is not built")
    cipher = MemoryCipher(mode, os.urandom(mode.key_size), ZEN2, accel=accel)
    pages = {5: bytearray(os.urandom(4096))}
    read = cipher.line_reader(pages)
    for spa in (5 << 12, (5 << 12) + 64 * 17, (5 << 12) + 4032, 9 << 12):
        page = pages.get(spa >> 12)
        raw = bytes(64) if page is None else bytes(page[spa & 0xFFF : (spa & 0xFFF) + 64])
        got = read(spa)
        assert type(got) is bytearray
        assert got == cipher.decrypt_line(spa, raw)
