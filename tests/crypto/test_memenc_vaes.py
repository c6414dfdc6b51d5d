"""The accelerator's VAES engine for AES-256-XTS (``_memenc_accel.aes_engine``): the whole transform of a
page in one pass, eight 64-byte units per step in AVX-512 registers.  It must give, byte for byte, what
IEEE 1619 XTS-AES-256 with 64-byte data units gives through `cryptography` (one context per unit, the
sequence number SPA >> 6 as the tweak), and what the OpenSSL engine gives, through every entry point
that runs XTS (contiguous buffers, page stores with absent pages, in place, hashed then encrypted), on
every unit count a step can end with (1-3, 4, 5-7, 8, more), at every unit offset in a page, into
aligned and unaligned outputs; the bulk path takes it instead of crypt_into_via.  Skipped where the
CPU (or the build) has no VAES with AVX-512."""

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

XTS = EncryptionMode.XTS256
TC = TweakConstants.random_zen2(48, random.Random(71))
CONSTS = TC._tables.consts_bytes

pytestmark = [pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built"),
              pytest.mark.usefixtures("restore_engine")]
needs_vaes = pytest.mark.skipif("vaes" not in runnable_engines(),
                                reason="this CPU (or build) has no VAES with AVX-512: the OpenSSL engine runs")


def _reference(key: bytes, spa: int, data: bytes, encrypt: bool) -> bytes:
    """XTS-AES-256 through `cryptography`, one context per 64-byte unit (IEEE 1619 tweak = SPA >> 6)."""
    out = bytearray()
    for at in range(0, len(data), 64):
        tweak = ((spa + at) >> 6).to_bytes(16, "little")
        cipher = Cipher(algorithms.AES(key), modes.XTS(tweak))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(data[at : at + 64]) + ctx.finalize()
    return bytes(out)


def _into(engine: str, key: bytes, spa: int, src: bytes | bytearray | memoryview, dst: bytearray | memoryview,
          encrypt: bool) -> None:
    ax = memenc._memenc_accel
    ax.aes_engine(engine)
    assert ax.crypt_into(dst, spa, src, CONSTS, key, 2, encrypt) is True


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
        assert "vaes" in engines  # the CPU has it, so the known-answer test passed
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


@needs_vaes
def test_every_step_length_and_unit_offset_matches_ieee_1619() -> None:
    """1..17 units (every way a step of eight can end) at every unit offset of a page, crossing into the
    next page where they run past it; both directions; the OpenSSL engine agrees."""
    rng = random.Random(5)
    key = rng.randbytes(64)
    for units in range(1, 18):
        for offset in (0, 64, 4096 - 64 * units if units < 64 else 0, 4096 - 64, 2048 + 64 * (units % 5)):
            offset %= 4096
            spa = 0x3_4560_0000 + offset
            plain = rng.randbytes(64 * units)
            want = _reference(key, spa, plain, True)
            for engine in runnable_engines():
                ct = bytearray(len(plain))
                _into(engine, key, spa, plain, ct, True)
                assert ct == want, (engine, units, offset)
                back = bytearray(len(plain))
                _into(engine, key, spa, ct, back, False)
                assert back == plain, (engine, units, offset)


@needs_vaes
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_same_bytes_as_openssl_engine(data: st.DataObject) -> None:
    """Random SPAs (up to the top of a 48-bit space) and lengths up to five pages, into another buffer
    at any byte alignment and in place."""
    seed = data.draw(st.integers(0, 1 << 30))
    rng = random.Random(seed)
    key = rng.randbytes(64)
    n = data.draw(st.integers(0, 5 * 64)) * 64
    spa = data.draw(st.integers(0, ((1 << 48) - n) >> 6)) << 6
    shift = data.draw(st.integers(0, 63))
    plain = rng.randbytes(n)
    got = {}
    for engine in ("openssl", "vaes"):
        raw = bytearray(n + 64)
        out = memoryview(raw)[shift : shift + n]
        _into(engine, key, spa, plain, out, True)
        ct = bytes(out)
        _into(engine, key, spa, out, out, False)  # in place
        assert out == plain, engine
        got[engine] = ct
    assert got["vaes"] == got["openssl"]


@needs_vaes
def test_page_store_entry_points_agree() -> None:
    """crypt_pages, crypt_from_pages (absent pages read as zeros), crypt_pages_in_place and
    measure_pages_in_place: the same pages, bytes and digests on both engines."""
    ax = memenc._memenc_accel
    rng = random.Random(9)
    key = rng.randbytes(64)
    spa = 0x9_0000_0000 + 5 * 64
    plain = rng.randbytes(6 * 4096 - 5 * 64 - 3 * 64)
    other_page = rng.randbytes(4096)
    results = {}
    for engine in ("openssl", "vaes"):
        ax.aes_engine(engine)
        pages: dict[int, bytearray] = {}
        assert ax.crypt_pages(pages, spa, plain, CONSTS, key, 2, True) is True
        stored = {pfn: bytes(p) for pfn, p in pages.items()}
        back = bytearray(len(plain))
        assert ax.crypt_from_pages(pages, spa, back, CONSTS, key, 2, False) is True
        assert back == plain
        sparse: dict[int, bytearray] = {(spa >> 12) + 1: bytearray(other_page)}
        gathered = bytearray(len(plain))
        assert ax.crypt_from_pages(sparse, spa, gathered, CONSTS, key, 2, False) is True
        before = ax.crypt_pages_in_place(pages, spa, len(plain), CONSTS, key, 2, False)
        assert before is not None
        in_place = {pfn: bytes(p) for pfn, p in pages.items()}
        sha = Sha256()
        assert MemoryCipher(XTS, key, TC).measure_pages_in_place(spa, len(plain), pages, sha)
        results[engine] = (stored, bytes(gathered), bytes(before), in_place,
                           {pfn: bytes(p) for pfn, p in pages.items()}, sha.digest())
    assert results["vaes"] == results["openssl"]
    stored = results["vaes"][0]
    lo = spa & 0xFFF
    assert b"".join(stored[pfn] for pfn in sorted(stored))[lo : lo + len(plain)] == _reference(key, spa, plain, True)


@needs_vaes
def test_bulk_path_takes_the_engine_not_crypt_into_via() -> None:
    """A large XTS transfer runs on the VAES engine (no zero-mask contexts made) and gives the numpy
    path's bytes; with the OpenSSL engine forced it goes through crypt_into_via again, same bytes."""
    rng = random.Random(12)
    key = rng.randbytes(64)
    spa = 0x2_0000_0000 + 4096 - 64
    plain = rng.randbytes((1 << 20) + 3 * 4096 + 128)
    expect = MemoryCipher(XTS, key, TC, accel=False).encrypt_bulk(spa, plain)
    ax = memenc._memenc_accel
    ax.aes_engine("vaes")
    cipher = MemoryCipher(XTS, key, TC)
    assert cipher.bulk_aes_engine == "vaes"
    assert cipher.encrypt_bulk(spa, plain) == expect
    assert cipher._via is None and not cipher.bulk_aes_via_xts
    assert cipher.decrypt_bulk(spa, expect) == plain
    ax.aes_engine("openssl")
    other = MemoryCipher(XTS, key, TC)
    assert other.encrypt_bulk(spa, plain) == expect
    assert other.bulk_aes_engine == ("cryptography-xts" if other.bulk_aes_via_xts else "openssl")
    assert MemoryCipher(XTS, key, TC, accel=False).bulk_aes_engine == "cryptography-ecb"
    assert MemoryCipher(EncryptionMode.XEX, key[:16], TC).bulk_aes_engine != "vaes"  # XTS only
