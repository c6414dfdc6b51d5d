"""The fused bulk path's vector levels (``_memenc_accel.vector_isa``: AVX-512, AVX2, portable C): every
level the CPU runs gives the same bytes as the portable one -- and the portable one the same as the
numpy path -- on random data, every granule offset in a page, both directions, in place and into
another buffer, into a page store, across the non-temporal-store threshold with output buffers at
every 16-byte alignment modulo 64 (and an unaligned one), for XE, XEX and XTS.  The portable level is
forced here, so it stays tested on machines that would otherwise always take the vector code.  XTS runs
on the OpenSSL engine here (the passes under test; tests/crypto/test_memenc_vaes.py covers the VAES one)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from sevemu.crypto import memenc
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants
from tests.crypto.conftest import runnable

pytestmark = [pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built"),
              pytest.mark.usefixtures("openssl_engine")]

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
CODE = {XE: 0, XEX: 1, XTS: 2}
TC = TweakConstants.random_zen2(48, random.Random(8))
LEVELS = ("portable", "avx2", "avx512")


def _runnable() -> list[str]:
    return runnable(memenc._memenc_accel.vector_isa, LEVELS)


@pytest.fixture
def restore_level() -> Iterator[None]:
    ax = memenc._memenc_accel
    previous = ax.vector_isa()
    yield
    ax.vector_isa(previous)


def _into(level: str, mode: EncryptionMode, key: bytes, spa: int, src: bytes | bytearray | memoryview,
          dst: bytearray | memoryview, encrypt: bool) -> None:
    ax = memenc._memenc_accel
    ax.vector_isa(level)
    assert ax.crypt_into(dst, spa, src, TC._tables.consts_bytes, key, CODE[mode], encrypt) is True


def test_levels_reported_and_refused(restore_level: None) -> None:
    ax = memenc._memenc_accel
    runnable = _runnable()
    assert runnable[0] == "portable"
    default = "avx2" if "avx2" in runnable else "portable"  # AVX-512 only when asked for (measured)
    assert ax.vector_isa() == default
    with pytest.raises(ValueError, match="level must be"):
        ax.vector_isa("sse9")
    for level in LEVELS:
        if level not in runnable:
            with pytest.raises(ValueError, match="does not run"):
                ax.vector_isa(level)
    assert ax.vector_isa("portable") == default
    assert ax.vector_isa(None) == "portable"


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_every_level_same_bytes_at_every_offset(mode: EncryptionMode, restore_level: None) -> None:
    rng = random.Random(CODE[mode])
    key = rng.randbytes(mode.key_size)
    ref = MemoryCipher(mode, key, TC, accel=False)
    g = mode.granule
    levels = _runnable()
    for offset in range(0, 4096, g):
        spa = rng.randrange(1 << 24, 1 << 40) & ~0xFFF | offset
        n = rng.choice((g, 4096 - offset, 4096 - offset + 4096 + g, 3 * 4096)) if offset else 2 * 4096 + g
        plain = rng.randbytes(n)
        expect = ref.encrypt_bulk(spa, plain)
        for level in levels:
            ct = bytearray(n)
            _into(level, mode, key, spa, plain, ct, True)
            assert ct == expect, (level, offset, n)
            back = bytearray(n)
            _into(level, mode, key, spa, ct, back, False)
            assert back == plain, (level, offset, n)
            _into(level, mode, key, spa, ct, ct, False)  # in place
            assert ct == plain, (level, offset, n)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_every_level_same_bytes_streaming(mode: EncryptionMode, restore_level: None) -> None:
    """Above the 4 MiB non-temporal-store threshold, the output at 16, 32, 48 and 0 bytes past a
    64-byte boundary (the vector stores' head and tail blocks) and at an odd address (no streaming)."""
    rng = random.Random(10 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    n = (4 << 20) + 3 * 4096 + 192
    spa = 0x1_2345_6000 + 0x40 + (64 if mode is XTS else 16)
    plain = rng.randbytes(n)
    expect = MemoryCipher(mode, key, TC, accel=False).encrypt_bulk(spa, plain)
    for level in _runnable():
        for shift in (16, 32, 48, 64, 1):
            raw = bytearray(n + 128)
            base = memoryview(raw)
            # the address of raw's buffer is not ours to choose: align from it
            addr_mod = _address(raw) % 64
            start = (64 - addr_mod) % 64 + shift
            out = base[start : start + n]
            _into(level, mode, key, spa, plain, out, True)
            assert out == expect, (level, shift)
            _into(level, mode, key, spa, bytes(out), out, False)
            assert out == plain, (level, shift)


def _address(buf: bytearray) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_every_level_same_pages(mode: EncryptionMode, restore_level: None) -> None:
    """crypt_pages (into a page store) and crypt_pages_in_place take the same passes."""
    ax = memenc._memenc_accel
    rng = random.Random(20 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    consts = TC._tables.consts_bytes
    spa = 0x7_0000_0000 + 3 * mode.granule
    plain = rng.randbytes(5 * 4096)
    results = []
    for level in _runnable():
        ax.vector_isa(level)
        pages: dict[int, bytearray] = {}
        assert ax.crypt_pages(pages, spa, plain, consts, key, CODE[mode], True) is True
        snapshot = {pfn: bytes(p) for pfn, p in pages.items()}
        before = ax.crypt_pages_in_place(pages, spa, len(plain), consts, key, CODE[mode], False)
        assert before is not None and bytes(before) == b"".join(
            snapshot[pfn] for pfn in sorted(snapshot))[spa & 0xFFF : (spa & 0xFFF) + len(plain)]
        results.append(snapshot)
        assert b"".join(bytes(pages[pfn]) for pfn in sorted(pages))[spa & 0xFFF : (spa & 0xFFF) + len(plain)] == plain
    assert all(r == results[0] for r in results)
    ref = MemoryCipher(mode, key, TC, accel=False).encrypt_bulk(spa, plain)
    got = b"".join(results[0][pfn] for pfn in sorted(results[0]))[spa & 0xFFF : (spa & 0xFFF) + len(plain)]
    assert got == ref
