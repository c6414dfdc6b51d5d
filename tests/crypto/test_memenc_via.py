"""The bulk path's AES through `cryptography`'s AES-XTS (``crypt_into_via``, taken by
``MemoryCipher.encrypt_bulk_into`` / ``decrypt_bulk_into`` from 32-64 KiB on): a zero-mask XTS context
is AES-ECB, reused chunk after chunk; the same bytes as the numpy path and the per-unit XTS reference on
random addresses and lengths (page- and chunk-crossing, in place and into another buffer, every vector
level); the self-test that guards the path, and the fallback to ``crypt_into`` when it fails.  XTS runs on
the OpenSSL engine here: where the CPU has VAES the bulk path takes the accelerator's own engine instead
(tests/crypto/test_memenc_vaes.py)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto import memenc
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants, xts_encrypt_units

pytestmark = [pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built"),
              pytest.mark.usefixtures("openssl_engine")]

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
CODE = {XE: 0, XEX: 1, XTS: 2}
ZEN1 = TweakConstants.published_zen1(48, random.Random(31))
ZEN2 = TweakConstants.random_zen2(48, random.Random(32))


def _tc(mode: EncryptionMode) -> TweakConstants:
    return ZEN1 if mode is XE else ZEN2


@pytest.fixture
def via_state() -> Iterator[None]:
    """Restore the process-wide self-test result after a test that forces it."""
    saved = memenc._via_ok
    yield
    memenc._via_ok = saved


def _via(mode: EncryptionMode, key: bytes, spa: int, src: bytes | bytearray | memoryview,
         dst: bytearray | memoryview, encrypt: bool, chunk: int, tweaks_through_xts: bool = True) -> None:
    enc, dec, tweak = memenc._via_contexts(key, CODE[mode])
    consts = _tc(mode)._tables.consts_bytes
    ok = memenc._memenc_accel.crypt_into_via(dst, spa, src, consts, key, CODE[mode], encrypt, enc if encrypt else dec,
                                             tweak if tweaks_through_xts else None, chunk)
    if mode is XE and not encrypt and dst is src:
        # XE decryption in place: its AES reads the input, and `cryptography` after 48 refuses an output
        # that overlaps the input -- declined, and MemoryCipher takes crypt_into
        assert ok is False
        assert memenc._memenc_accel.crypt_into(dst, spa, src, consts, key, CODE[mode], encrypt)
        return
    assert ok is True


def test_self_test_passes_here() -> None:
    assert memenc._via_self_test(ZEN2._tables.consts_bytes)
    assert memenc._via_usable(ZEN2._tables.consts_bytes)


@pytest.mark.parametrize("size", [16, 32])
def test_zero_mask_context_is_reusable_ecb(size: int) -> None:
    """Every update call of one context is AES-ECB of its data (a fresh data unit from the same zero
    tweak), both directions; keys equal to the fixed second half take the other one."""
    rng = random.Random(size)
    for key in (rng.randbytes(size), memenc._ZERO_MASK_KEYS[0][:size]):
        xts, ecb = memenc._zero_mask_xts(key), Cipher(algorithms.AES(key), modes.ECB())
        for ctx, ref in ((xts.encryptor(), ecb.encryptor()), (xts.decryptor(), ecb.decryptor())):
            for n in (16, 4096, 65536, 48):
                buf = rng.randbytes(n)
                out = bytearray(n)  # (another buffer: cryptography after 48 refuses an overlapping output)
                ctx.update_into(buf, out)
                assert out == ref.update(buf)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_same_bytes_as_numpy_path(mode: EncryptionMode, data: st.DataObject) -> None:
    """Random addresses and lengths around small chunks (page-crossing, chunk-crossing, partial last
    chunk), both tweak sources, into another buffer and in place."""
    g = mode.granule
    spa = data.draw(st.integers(0, (1 << 40) // g)) * g
    n = data.draw(st.integers(1, 5 * 8192 // g)) * g
    seed = data.draw(st.integers(0, 1 << 30))
    chunk = data.draw(st.sampled_from([4096, 8192]))
    through_xts = data.draw(st.booleans())
    rng = random.Random(seed)
    key = rng.randbytes(mode.key_size)
    plain = rng.randbytes(n)
    expect = MemoryCipher(mode, key, _tc(mode), accel=False).encrypt_bulk(spa, plain)
    ct = bytearray(n)
    _via(mode, key, spa, plain, ct, True, chunk, through_xts)
    assert ct == expect
    back = bytearray(n)
    _via(mode, key, spa, ct, back, False, chunk, through_xts)
    assert back == plain
    _via(mode, key, spa, ct, ct, False, chunk, through_xts)  # in place
    assert ct == plain


def test_xts_matches_per_unit_reference() -> None:
    """XTS through the path against IEEE 1619 XTS-AES-256 computed unit by unit on AES-ECB
    (``xts_encrypt_units``: 64-byte data units, sequence number SPA >> 6)."""
    rng = random.Random(5)
    key = rng.randbytes(64)
    spa = 0x3_2100_0fc0  # a unit before a page boundary
    plain = rng.randbytes(3 * 4096 + 128)
    ct = bytearray(len(plain))
    _via(XTS, key, spa, plain, ct, True, 4096)
    assert ct == xts_encrypt_units(key, spa >> 6, plain, 64)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_every_level_same_bytes(mode: EncryptionMode) -> None:
    """The passes at every vector level the CPU runs (the XTS masks made on the fly included)."""
    ax = memenc._memenc_accel
    rng = random.Random(40 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    spa = 0x1_2345_6000 + (64 if mode is XTS else 48)
    plain = rng.randbytes(5 * 4096 + 192)
    expect = MemoryCipher(mode, key, _tc(mode), accel=False).encrypt_bulk(spa, plain)
    previous = ax.vector_isa()
    try:
        for level in ("portable", "avx2", "avx512"):
            try:
                ax.vector_isa(level)
            except ValueError:
                continue
            ct = bytearray(len(plain))
            _via(mode, key, spa, plain, ct, True, 8192)
            assert ct == expect, level
            _via(mode, key, spa, ct, ct, False, 8192)
            assert ct == plain, level
    finally:
        ax.vector_isa(previous)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_cipher_takes_the_path_and_gives_the_same_bytes(mode: EncryptionMode, via_state: None) -> None:
    """A large transfer through MemoryCipher goes through crypt_into_via (its contexts are made) and
    gives the numpy path's bytes; with the path refused (``_via_ok`` False, as after a failed
    self-test) crypt_into gives them, and no context is made."""
    rng = random.Random(50 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    spa = 0x2_0000_0000 + 4096 - (64 if mode is XTS else 16)
    plain = rng.randbytes((1 << 20) + 3 * 4096 + 128)
    expect = MemoryCipher(mode, key, _tc(mode), accel=False).encrypt_bulk(spa, plain)
    for usable in (True, False):
        memenc._via_ok = usable
        cipher = MemoryCipher(mode, key, _tc(mode))
        ct = bytearray(len(plain))
        cipher.encrypt_bulk_into(spa, plain, ct)
        assert ct == expect
        assert cipher.bulk_aes_via_xts is usable
        cipher.decrypt_bulk_into(spa, ct, ct)
        assert ct == plain
    memenc._via_ok = True
    small = MemoryCipher(mode, key, _tc(mode))
    small.encrypt_bulk(spa, plain[: memenc._VIA_MIN[CODE[mode]] - 4096])
    assert small._via is None  # below the threshold: crypt_into


def test_self_test_failure_means_fallback(monkeypatch: pytest.MonkeyPatch, via_state: None) -> None:
    """A library whose XTS context is not ECB with this tweak (here: a tweak that does not encrypt to
    zero, so every mask is nonzero) fails the self-test, and the bulk path keeps its bytes."""
    real = memenc._zero_mask_xts

    def nonzero_mask(key: bytes) -> Cipher[modes.XTS]:
        cipher = real(key)
        return Cipher(cipher.algorithm, modes.XTS(bytes(16)))

    monkeypatch.setattr(memenc, "_zero_mask_xts", nonzero_mask)
    assert not memenc._via_self_test(ZEN2._tables.consts_bytes)
    memenc._via_ok = None
    assert not memenc._via_usable(ZEN2._tables.consts_bytes)
    key = random.Random(9).randbytes(64)
    cipher = MemoryCipher(XTS, key, ZEN2)
    plain = random.Random(9).randbytes(256 << 10)
    assert cipher.encrypt_bulk(0x4000_0000, plain) == MemoryCipher(XTS, key, ZEN2, accel=False).encrypt_bulk(
        0x4000_0000, plain)
    assert cipher._via is None


def test_self_test_exception_means_fallback(monkeypatch: pytest.MonkeyPatch, via_state: None) -> None:
    def broken(key: bytes) -> Any:
        raise ValueError("no XTS here")

    monkeypatch.setattr(memenc, "_zero_mask_xts", broken)
    memenc._via_ok = None
    assert not memenc._via_usable(ZEN2._tables.consts_bytes)


def test_refusals() -> None:
    """Overlap other than exact: declined, nothing written; a bad chunk or callable: refused; an
    exception from the update call propagates."""
    ax = memenc._memenc_accel
    key = bytes(range(16))
    consts = ZEN2._tables.consts_bytes
    enc = memenc._via_contexts(key, 1)[0]
    buf = bytearray(3 * 4096)
    before = bytes(buf)
    assert ax.crypt_into_via(memoryview(buf)[16:], 0, memoryview(buf)[: len(buf) - 16], consts, key, 1, True, enc,
                             None, 4096) is False
    assert buf == before
    for chunk in (0, 1000, 2 << 20):
        with pytest.raises(ValueError, match="chunk"):
            ax.crypt_into_via(bytearray(4096), 0, bytes(4096), consts, key, 1, True, enc, None, chunk)
    with pytest.raises(TypeError, match="callable"):
        ax.crypt_into_via(bytearray(4096), 0, bytes(4096), consts, key, 1, True, 5, None, 4096)

    def failing(src: Any, dst: Any) -> int:
        raise RuntimeError("update failed")

    fail: Callable[[Any, Any], int] = failing
    with pytest.raises(RuntimeError, match="update failed"):
        ax.crypt_into_via(bytearray(3 * 4096), 0, bytes(3 * 4096), consts, key, 1, True, fail, None, 4096)
    xts_key = bytes(range(64))
    tweak_enc = memenc._via_contexts(xts_key, 2)
    with pytest.raises(RuntimeError, match="update failed"):
        ax.crypt_into_via(bytearray(3 * 4096), 0, bytes(3 * 4096), consts, xts_key, 2, True, tweak_enc[0], fail,
                          4096)


def test_kept_views_are_released() -> None:
    """A callable that keeps the memoryviews it was given finds them released afterwards (they point
    into the C code's scratch buffer)."""
    key = bytes(range(16))
    kept: list[memoryview] = []
    enc = memenc._via_contexts(key, 1)[0]

    def keeping(src: memoryview, dst: memoryview) -> int:
        kept.extend((src, dst))
        return int(enc(src, dst))

    out = bytearray(2 * 4096)
    assert memenc._memenc_accel.crypt_into_via(out, 0, bytes(2 * 4096), ZEN2._tables.consts_bytes, key, 1, True,
                                               keeping, None, 4096)
    assert kept
    for view in kept:
        with pytest.raises(ValueError, match="released"):
            len(view)
    assert out == MemoryCipher(XEX, key, ZEN2, accel=False).encrypt_bulk(0, bytes(2 * 4096))


def test_threads_sharing_a_cipher(via_state: None) -> None:
    """One cipher's contexts serve several threads at once (the C code drops the GIL around its passes;
    the update calls hold it): every thread gets the numpy path's bytes."""
    import threading

    memenc._via_ok = True
    key = random.Random(77).randbytes(64)
    cipher = MemoryCipher(XTS, key, ZEN2)
    data = random.Random(78).randbytes(512 << 10)
    want = MemoryCipher(XTS, key, ZEN2, accel=False).encrypt_bulk(0x1000_0000, data)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(6):
                out = cipher.encrypt_bulk(0x1000_0000, data)
                assert out == want
                assert cipher.decrypt_bulk(0x1000_0000, out) == data
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cipher.bulk_aes_via_xts
