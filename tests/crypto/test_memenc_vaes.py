"""The accelerator's VAES engine (``_memenc_accel.aes_engine``): the whole transform of a page in one pass
in AVX-512 registers -- XTS eight 64-byte units per step, XE/XEX eight registers of four 16-byte blocks.
It must give, byte for byte, what the standard gives through `cryptography` (IEEE 1619 XTS-AES-256 with
64-byte data units, one context per unit, tweak SPA >> 6; XE/XEX as AES-128-ECB of the block XORed with
its address tweak), and what the OpenSSL engine and the numpy path give, through every entry point
(contiguous buffers, page stores with absent pages, in place, hashed then encrypted), on every length a
step can end with, at every offset in a page, into aligned and unaligned outputs; the bulk path takes
it instead of crypt_into_via.  Skipped where the CPU (or the build) has no VAES with AVX-512."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto import memenc
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants
from sevemu.crypto.sha256 import Sha256
from tests.crypto.conftest import runnable_engines

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
CODE = {XE: 0, XEX: 1, XTS: 2}
TC = TweakConstants.random_zen2(48, random.Random(71))
CONSTS = TC._tables.consts_bytes

pytestmark = [pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built"),
              pytest.mark.usefixtures("restore_engine")]
needs_vaes = pytest.mark.skipif("vaes" not in runnable_engines(),
                                reason="this CPU (or build) has no VAES with AVX-512: the OpenSSL engine runs")


def _reference(mode: EncryptionMode, key: bytes, spa: int, data: bytes, encrypt: bool) -> bytes:
    """The standard through `cryptography` alone: XTS-AES-256 with one context per 64-byte unit (IEEE 1619
    tweak = SPA >> 6); XE (E(P ^ T)) and XEX (E(P ^ T) ^ T) with AES-128-ECB and T = TC.tweak(address)."""
    out = bytearray()
    if mode is XTS:
        for at in range(0, len(data), 64):
            cipher = Cipher(algorithms.AES(key), modes.XTS(((spa + at) >> 6).to_bytes(16, "little")))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            out += ctx.update(data[at : at + 64]) + ctx.finalize()
        return bytes(out)
    ecb = Cipher(algorithms.AES(key), modes.ECB())
    aes = ecb.encryptor() if encrypt else ecb.decryptor()
    for at in range(0, len(data), 16):
        t = int.from_bytes(TC.tweak(spa + at), "little")
        block = int.from_bytes(data[at : at + 16], "little")
        pre = t if (encrypt or mode is XEX) else 0
        post = t if (not encrypt or mode is XEX) else 0
        y = int.from_bytes(aes.update((block ^ pre).to_bytes(16, "little")), "little") ^ post
        out += y.to_bytes(16, "little")
    return bytes(out)


def _into(engine: str, mode: EncryptionMode, key: bytes, spa: int, src: bytes | bytearray | memoryview,
          dst: bytearray | memoryview, encrypt: bool) -> None:
    ax = memenc._memenc_accel
    ax.aes_engine(engine)
    assert ax.crypt_into(dst, spa, src, CONSTS, key, CODE[mode], encrypt) is True


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_engine_reported_forced_and_refused() -> None:
    ax = memenc._memenc_accel
    engines = runnable_engines()
    assert engines[0] == "openssl"
    flags = _cpu_flags()
    if flags is not None and {"avx512f", "vaes", "aes"} <= flags:
        assert "vaes" in engines  # the CPU has it, so the known-answer tests passed
    if flags is not None and not {"avx512f", "vaes"} <= flags:
        assert engines == ["openssl"]
    default = ax.aes_engine()
    assert default == engines[-1]  # the best one by default
    with pytest.raises(ValueError, match="name must be"):
        ax.aes_engine("aesni")
    with pytest.raises(TypeError):
        ax.aes_engine("vaes", "openssl")
    if "vaes" not in engines:
        with pytest.raises(ValueError, match="does not run"):
            ax.aes_engine("vaes")
    assert ax.aes_engine("openssl") == default
    assert ax.aes_engine(None) == "openssl"


def test_reference_is_the_numpy_path() -> None:
    """The test's own reference agrees with the model's numpy path (so both engines are held to it)."""
    rng = random.Random(2)
    for mode in (XE, XEX, XTS):
        key = rng.randbytes(mode.key_size)
        spa, plain = 0x5_0000_0fc0, rng.randbytes(256)
        assert _reference(mode, key, spa, plain, True) == MemoryCipher(mode, key, TC, accel=False).encrypt_bulk(
            spa, plain)


@needs_vaes
@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_every_step_length_and_offset_matches_the_standard(mode: EncryptionMode) -> None:
    """1..17 units (XTS) or 1..41 blocks (XE/XEX: every way a step of eight registers of four can end, the
    masked last register included) at offsets across a page, crossing into the next page where they run
    past it; both directions; the OpenSSL engine agrees."""
    rng = random.Random(5 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    g = mode.granule
    for count in range(1, 18 if mode is XTS else 42):
        n = g * count
        for offset in (0, g, (4096 - n) % 4096, 4096 - g, 2048 + g * (count % 5)):
            spa = 0x3_4560_0000 + offset
            plain = rng.randbytes(n)
            want = _reference(mode, key, spa, plain, True)
            for engine in runnable_engines():
                ct = bytearray(n)
                _into(engine, mode, key, spa, plain, ct, True)
                assert ct == want, (engine, count, offset)
                back = bytearray(n)
                _into(engine, mode, key, spa, ct, back, False)
                assert back == plain, (engine, count, offset)


@needs_vaes
@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_same_bytes_as_openssl_engine(mode: EncryptionMode, data: st.DataObject) -> None:
    """Random SPAs (up to the top of a 48-bit space) and lengths up to five pages, into another buffer
    at any byte alignment and in place; the masked tail of XE/XEX leaves the bytes past it alone."""
    seed = data.draw(st.integers(0, 1 << 30))
    rng = random.Random(seed)
    key = rng.randbytes(mode.key_size)
    g = mode.granule
    n = data.draw(st.integers(0, 5 * 4096 // g)) * g
    spa = data.draw(st.integers(0, ((1 << 48) - n) // g)) * g
    shift = data.draw(st.integers(0, 63))
    plain = rng.randbytes(n)
    got = {}
    for engine in ("openssl", "vaes"):
        raw = bytearray(b"\xa5" * (n + 128))
        out = memoryview(raw)[shift : shift + n]
        _into(engine, mode, key, spa, plain, out, True)
        assert raw[:shift] == b"\xa5" * shift and raw[shift + n :] == b"\xa5" * (128 - shift), engine
        ct = bytes(out)
        _into(engine, mode, key, spa, out, out, False)  # in place
        assert out == plain, engine
        got[engine] = ct
    assert got["vaes"] == got["openssl"]


@needs_vaes
@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_page_store_entry_points_agree(mode: EncryptionMode) -> None:
    """crypt_pages, crypt_from_pages (absent pages read as zeros), crypt_pages_in_place and
    measure_pages_in_place: the same pages, bytes and digests on both engines."""
    ax = memenc._memenc_accel
    rng = random.Random(9 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    g = mode.granule
    spa = 0x9_0000_0000 + 5 * g
    plain = rng.randbytes(6 * 4096 - 5 * g - 3 * g)
    other_page = rng.randbytes(4096)
    results = {}
    for engine in ("openssl", "vaes"):
        ax.aes_engine(engine)
        pages: dict[int, bytearray] = {}
        assert ax.crypt_pages(pages, spa, plain, CONSTS, key, CODE[mode], True) is True
        stored = {pfn: bytes(p) for pfn, p in pages.items()}
        back = bytearray(len(plain))
        assert ax.crypt_from_pages(pages, spa, back, CONSTS, key, CODE[mode], False) is True
        assert back == plain
        sparse: dict[int, bytearray] = {(spa >> 12) + 1: bytearray(other_page)}
        gathered = bytearray(len(plain))
        assert ax.crypt_from_pages(sparse, spa, gathered, CONSTS, key, CODE[mode], False) is True
        before = ax.crypt_pages_in_place(pages, spa, len(plain), CONSTS, key, CODE[mode], False)
        assert before is not None
        in_place = {pfn: bytes(p) for pfn, p in pages.items()}
        sha = Sha256()
        assert MemoryCipher(mode, key, TC).measure_pages_in_place(spa, len(plain), pages, sha)
        results[engine] = (stored, bytes(gathered), bytes(before), in_place,
                           {pfn: bytes(p) for pfn, p in pages.items()}, sha.digest())
    assert results["vaes"] == results["openssl"]
    stored = results["vaes"][0]
    lo = spa & 0xFFF
    assert b"".join(stored[pfn] for pfn in sorted(stored))[lo : lo + len(plain)] == _reference(
        mode, key, spa, plain, True)


@needs_vaes
@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_bulk_path_takes_the_engine_not_crypt_into_via(mode: EncryptionMode) -> None:
    """A large transfer runs on the VAES engine (no zero-mask contexts made) and gives the numpy path's
    bytes; with the OpenSSL engine forced it goes through crypt_into_via again, same bytes."""
    rng = random.Random(12 + CODE[mode])
    key = rng.randbytes(mode.key_size)
    spa = 0x2_0000_0000 + 4096 - mode.granule
    plain = rng.randbytes((1 << 20) + 3 * 4096 + 128)
    expect = MemoryCipher(mode, key, TC, accel=False).encrypt_bulk(spa, plain)
    ax = memenc._memenc_accel
    ax.aes_engine("vaes")
    cipher = MemoryCipher(mode, key, TC)
    assert cipher.bulk_aes_engine == "vaes"
    assert cipher.encrypt_bulk(spa, plain) == expect
    assert cipher._via is None and not cipher.bulk_aes_via_xts
    assert cipher.decrypt_bulk(spa, expect) == plain
    ax.aes_engine("openssl")
    other = MemoryCipher(mode, key, TC)
    assert other.encrypt_bulk(spa, plain) == expect
    assert other.bulk_aes_engine == ("cryptography-xts" if other.bulk_aes_via_xts else "openssl")
    assert MemoryCipher(mode, key, TC, accel=False).bulk_aes_engine == "cryptography-ecb"
