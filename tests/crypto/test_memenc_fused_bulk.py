"""The fused bulk path (the C ``crypt_into`` behind ``MemoryCipher.encrypt_bulk_into`` /
``decrypt_bulk_into`` with the accelerator): the same bytes as the numpy path, in both directions, on
every mode, alignment and length the bulk path takes, in place and into another buffer, across the
non-temporal-store threshold; an output that overlaps the input other than exactly is declined with
nothing written; bad arguments are refused with nothing written."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto import memenc
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants

pytestmark = pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
ZEN1 = TweakConstants.published_zen1(48, random.Random(1))
ZEN2 = TweakConstants.random_zen2(48, random.Random(2))
CODE = {XE: 0, XEX: 1, XTS: 2}


def _tc(mode: EncryptionMode) -> TweakConstants:
    return ZEN1 if mode is XE else ZEN2


def _ciphers(mode: EncryptionMode, seed: int) -> tuple[MemoryCipher, MemoryCipher]:
    key = random.Random(seed).randbytes(mode.key_size)
    return MemoryCipher(mode, key, _tc(mode)), MemoryCipher(mode, key, _tc(mode), accel=False)


def _round_trip(mode: EncryptionMode, seed: int, spa: int, n: int) -> bytearray:
    """Encrypt ``n`` random bytes at ``spa`` through the C bulk path, assert the numpy path's bytes
    and that decryption gives the plaintext back; return the ciphertext."""
    fast, slow = _ciphers(mode, seed)
    plain = random.Random(seed).randbytes(n)
    ct = bytearray(n)
    fast.encrypt_bulk_into(spa, plain, ct)
    assert ct == slow.encrypt_bulk(spa, plain)
    back = bytearray(n)
    fast.decrypt_bulk_into(spa, ct, back)
    assert back == plain
    return ct


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_same_bytes_as_numpy_path(mode: EncryptionMode, data: st.DataObject) -> None:
    g = mode.granule
    spa = data.draw(st.integers(0, (1 << 36) // g)) * g
    n = data.draw(st.integers(0, 5 * 4096 // g)) * g
    seed = data.draw(st.integers(0, 1 << 30))
    ct = _round_trip(mode, seed, spa, n)
    _ciphers(mode, seed)[0].decrypt_bulk_into(spa, ct, ct)  # in place
    assert ct == random.Random(seed).randbytes(n)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_large_span_with_streaming_stores(mode: EncryptionMode) -> None:
    """Above the C code's streaming threshold (4 MiB), at an unaligned page offset."""
    fast, slow = _ciphers(mode, 7)
    spa, plain = 0x1_2340_0040, random.Random(7).randbytes((5 << 20) + 4096 + 64)
    ct = fast.encrypt_bulk(spa, plain)
    assert ct == slow.encrypt_bulk(spa, plain)
    assert fast.decrypt_bulk(spa, ct) == plain


@pytest.mark.parametrize("mode", [XE, XEX])
@pytest.mark.parametrize(
    ("spa", "n"),
    [
        (0xF_FFFF_F800, 3 * 4096),  # a page step that flips the address bits 12..35 at once
        (0x7FFF_E000, 4 * 4096),  # bits 13..30 flip, then single-bit steps
        ((1 << 48) - 3 * 4096 - 256, 3 * 4096 + 256),  # up to the top of the 48-bit space
    ],
)
def test_page_tweak_carried_across_pages(mode: EncryptionMode, spa: int, n: int) -> None:
    """The C run derives each page's tweak from the previous page's (the constants of the address
    bits that changed): spans whose page steps carry through many bits give the numpy path's bytes."""
    _round_trip(mode, 11, spa, n)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_partial_overlap_is_declined_with_nothing_written(mode: EncryptionMode) -> None:
    """(``MemoryCipher`` then takes its chunk path, whose contract excludes such overlaps too.)"""
    ax = memenc._memenc_accel
    fast, _ = _ciphers(mode, 3)
    n = 3 * 4096
    buf = bytearray(random.Random(3).randbytes(n + 64))
    before = bytes(buf)
    for src, dst in ((memoryview(buf)[:n], memoryview(buf)[64:]), (memoryview(buf)[64:], memoryview(buf)[:n])):
        assert ax.crypt_into(dst, 0x5000, src, _tc(mode)._tables.consts_bytes, fast._key, CODE[mode], True) is False
        assert bytes(buf) == before


def test_bad_arguments_are_refused_and_nothing_is_written() -> None:
    ax = memenc._memenc_accel
    consts, key = ZEN2._tables.consts_bytes, bytes(16)
    out = bytearray(b"\xaa" * 4096)
    with pytest.raises(ValueError, match="dst has 4096 bytes for 2048"):
        ax.crypt_into(out, 0x1000, bytes(2048), consts, key, 1, True)
    with pytest.raises(ValueError, match="multiples of 16"):
        ax.crypt_into(out, 0x1008, bytes(4096), consts, key, 1, True)
    with pytest.raises(ValueError, match="16 bytes"):
        ax.crypt_into(out, 0x1000, bytes(4096), consts, bytes(32), 1, True)
    with pytest.raises(ValueError, match="code must be"):
        ax.crypt_into(out, 0x1000, bytes(4096), consts, key, 3, True)
    with pytest.raises(ValueError, match="address space"):
        ax.crypt_into(out, (1 << 48) - 2048, bytes(4096), consts, key, 1, True)
    with pytest.raises(BufferError):
        ax.crypt_into(bytes(4096), 0x1000, bytes(4096), consts, key, 1, True)  # read-only dst
    assert out == b"\xaa" * 4096
