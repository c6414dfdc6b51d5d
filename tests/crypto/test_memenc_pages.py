"""The fused write straight into a page store (``MemoryCipher.encrypt_to_pages``, the C
``crypt_pages``): the same DRAM pages as the bulk path (numpy, no accelerator) followed by
``Dram.write``, on every mode and every alignment the bulk path takes; its refusals change nothing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto import memenc
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants
from sevemu.errors import AddressError, AlignmentError, InputError
from sevemu.hw.dram import Dram

pytestmark = pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
ZEN1 = TweakConstants.published_zen1(48, random.Random(1))
ZEN2 = TweakConstants.random_zen2(48, random.Random(2))
DRAM = 1 << 26


def _key(mode: EncryptionMode, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(mode.key_size)


def _dram_with(pages: dict[int, bytes]) -> Dram:
    d = Dram(DRAM)
    for pfn, data in pages.items():
        d.pages_dict()[pfn] = bytearray(data)
    return d


def own_page(d: Dram) -> memoryview:
    return memoryview(d.pages_dict()[0x10])


def _reference(mode: EncryptionMode, key: bytes, tc: TweakConstants, before: dict[int, bytes], spa: int,
               data: bytes) -> dict[int, bytearray]:
    """The bulk path without the accelerator, then DRAM's own write."""
    d = _dram_with(before)
    d.write(spa, MemoryCipher(mode, key, tc, accel=False).encrypt_bulk(spa, data))
    return d.pages_dict()


CODE = {XE: 0, XEX: 1, XTS: 2}


def _case(mode: EncryptionMode, data: st.DataObject) -> tuple[TweakConstants, int, int, dict[int, bytes],
                                                             random.Random, bytes]:
    """(tweaks, SPA, length, the pages around the range before -- about half of them present --,
    the case's random source, key) of one drawn case on any alignment of ``mode``."""
    tc = ZEN1 if mode is XE else ZEN2
    g = mode.granule
    spa = data.draw(st.integers(0, (DRAM - (1 << 16)) // g)) * g
    n = data.draw(st.integers(0, 3 * 4096 // g)) * g
    seed = data.draw(st.integers(0, 1 << 30))
    rng = random.Random(seed)
    first, last = spa >> 12, (spa + max(n, 1) - 1) >> 12
    before = {pfn: rng.randbytes(4096) for pfn in range(first - 1, last + 2) if rng.random() < 0.5}
    return tc, spa, n, before, rng, _key(mode, seed)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_same_pages_as_bulk_path_and_dram_write(mode: EncryptionMode, data: st.DataObject) -> None:
    tc, spa, n, before, rng, key = _case(mode, data)
    plain = rng.randbytes(n)
    d = _dram_with(before)
    assert MemoryCipher(mode, key, tc).encrypt_to_pages(spa, plain, d.pages_dict()) is True
    assert d.pages_dict() == _reference(mode, key, tc, before, spa, plain)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_large_write_over_many_pages(mode: EncryptionMode) -> None:
    tc = ZEN1 if mode is XE else ZEN2
    rng = random.Random(5)
    spa, plain = 0x12_3440, rng.randbytes(3 << 20)
    before = {pfn: rng.randbytes(4096) for pfn in range(spa >> 12, (spa >> 12) + 800, 3)}
    d = _dram_with(before)
    key = _key(mode, 5)
    assert MemoryCipher(mode, key, tc).encrypt_to_pages(spa, memoryview(plain), d.pages_dict())
    assert d.pages_dict() == _reference(mode, key, tc, before, spa, plain)
    assert MemoryCipher(mode, key, tc).decrypt_bulk(spa, d.read(spa, len(plain))) == plain


def test_pages_that_end_all_zero_stay_absent_like_dram_write() -> None:
    """Dram.write creates no page for an all-zero part; the C path decrypting to zeros (the only way to
    get a zero result) drops the pages it made, and zeroes the parts of existing ones."""
    ax = memenc._memenc_accel
    key = _key(XEX)
    consts = ZEN2._tables.consts_bytes
    spa = 0x40_0800
    cipher = MemoryCipher(XEX, key, ZEN2).encrypt_bulk(spa, bytes(3 * 4096))
    pages: dict[int, bytearray] = {0x401: bytearray(b"\xff" * 4096)}
    assert ax.crypt_pages(pages, spa, cipher, consts, key, 1, False) is True
    ref = _dram_with({0x401: b"\xff" * 4096})
    ref.write(spa, bytes(3 * 4096))
    assert pages == ref.pages_dict()
    assert sorted(pages) == [0x401]  # 0x400, 0x402 and 0x403 were never made
    assert pages[0x401] == bytes(4096)  # (an existing page is written, zeros and all)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_decrypt_direction_inverts(mode: EncryptionMode) -> None:
    ax = memenc._memenc_accel
    tc = ZEN1 if mode is XE else ZEN2
    key = _key(mode, 9)
    plain = random.Random(9).randbytes(5 * 4096 + 64)
    spa = 0x7_0040
    pages: dict[int, bytearray] = {}
    ax.crypt_pages(pages, spa, plain, tc._tables.consts_bytes, key, CODE[mode], True)
    d = Dram(DRAM)
    d.pages_dict().update(pages)
    ct = d.read(spa, len(plain))
    assert ct == MemoryCipher(mode, key, tc, accel=False).encrypt_bulk(spa, plain)
    back: dict[int, bytearray] = {}
    ax.crypt_pages(back, spa, ct, tc._tables.consts_bytes, key, CODE[mode], False)
    out = Dram(DRAM)
    out.pages_dict().update(back)
    assert out.read(spa, len(plain)) == plain


def test_not_taken_without_accelerator_or_on_overlap() -> None:
    """False, with the page store untouched: the caller's bulk path then runs."""
    d = _dram_with({0x10: bytes(range(256)) * 16})
    snapshot = {k: bytes(v) for k, v in d.pages_dict().items()}
    assert not MemoryCipher(XEX, _key(XEX), ZEN2, accel=False).encrypt_to_pages(0x10000, bytes(4096), d.pages_dict())
    assert not MemoryCipher(XTS, _key(XTS), ZEN2).encrypt_to_pages(0x10800, own_page(d)[:2048], d.pages_dict())
    own = memoryview(d.pages_dict()[0x10])  # the source is the destination page itself
    assert not MemoryCipher(XEX, _key(XEX), ZEN2).encrypt_to_pages(0x10000, own[:4096], d.pages_dict())
    assert not MemoryCipher(XEX, _key(XEX), ZEN2).encrypt_to_pages(0xF800, own[:4096], d.pages_dict())
    assert {k: bytes(v) for k, v in d.pages_dict().items()} == snapshot  # (no page was made either)


def test_bad_input_is_refused_before_anything_is_written() -> None:
    mc = MemoryCipher(XEX, _key(XEX), ZEN2)
    pages: dict[int, bytearray] = {}
    with pytest.raises(AlignmentError):
        mc.encrypt_to_pages(0x1008, bytes(4096), pages)
    with pytest.raises(AlignmentError):
        mc.encrypt_to_pages(0x1000, bytes(4090), pages)
    with pytest.raises(AddressError):
        mc.encrypt_to_pages((1 << 48) - 4096, bytes(8192), pages)
    assert pages == {}
    bad: dict[int, object] = {0x2: bytearray(4096), 0x3: bytearray(100)}
    with pytest.raises(TypeError, match="4096"):
        memenc._memenc_accel.crypt_pages(bad, 0x1000, bytes(4 * 4096), ZEN2._tables.consts_bytes, _key(XEX), 1, True)
    assert sorted(bad) == [0x2, 0x3] and bad[0x2] == bytes(4096)  # nothing made, nothing written
    with pytest.raises(ValueError, match="16 bytes"):
        memenc._memenc_accel.crypt_pages({}, 0x1000, bytes(16), ZEN2._tables.consts_bytes, bytes(32), 1, True)
    with pytest.raises(ValueError, match="64 bytes"):
        memenc._memenc_accel.crypt_pages({}, 0x1000, bytes(64), ZEN2._tables.consts_bytes, bytes(16), 2, True)
    with pytest.raises(ValueError, match="multiples of 64"):
        memenc._memenc_accel.crypt_pages({}, 0x1010, bytes(64), ZEN2._tables.consts_bytes, bytes(64), 2, True)
    with pytest.raises(AlignmentError):
        MemoryCipher(XTS, _key(XTS), ZEN2).encrypt_to_pages(0x1010, bytes(64), pages)
    assert pages == {}


# ---- the reverse: decrypt_from_pages (the C crypt_from_pages) ---------------------------------------


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_decrypt_from_pages_is_gather_then_bulk_decrypt(mode: EncryptionMode, data: st.DataObject) -> None:
    """The fused read gives what DRAM's read of the range (absent pages: zeros) and the bulk path
    without the accelerator give, on every alignment; the pages are left as they were."""
    tc, spa, n, before, _, key = _case(mode, data)
    d = _dram_with(before)
    out = bytearray(n + 32)
    assert MemoryCipher(mode, key, tc).decrypt_from_pages(spa, d.pages_dict(), memoryview(out)[16 : 16 + n]) is True
    expected = MemoryCipher(mode, key, tc, accel=False).decrypt_bulk(spa, d.read(spa, n))
    assert out[16 : 16 + n] == expected and out[:16] == out[16 + n :] == bytes(16)
    assert d.pages_dict() == {pfn: bytearray(p) for pfn, p in before.items()}


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_decrypt_from_pages_over_many_pages_undoes_encrypt_to_pages(mode: EncryptionMode) -> None:
    tc = ZEN1 if mode is XE else ZEN2
    rng = random.Random(6)
    spa, plain = 0x12_3440, rng.randbytes(3 << 20)
    d = _dram_with({pfn: rng.randbytes(4096) for pfn in range(spa >> 12, (spa >> 12) + 800, 3)})
    cipher = MemoryCipher(mode, _key(mode, 6), tc)
    assert cipher.encrypt_to_pages(spa, plain, d.pages_dict())
    out = bytearray(len(plain))
    assert cipher.decrypt_from_pages(spa, d.pages_dict(), out) and out == plain


def test_decrypt_from_pages_declines_without_writing() -> None:
    """Without the accelerator, or with ``out`` inside one of the pages, nothing is written and the
    answer is False (the caller's bulk path runs); bad alignment or an address beyond the tweak's
    bits raise as the bulk path does."""
    d = _dram_with({0x10: random.Random(7).randbytes(4096), 0x11: bytes(4096)})
    out = bytearray(4096)
    assert not MemoryCipher(XEX, _key(XEX), ZEN2, accel=False).decrypt_from_pages(0x10000, d.pages_dict(), out)
    assert out == bytes(4096)
    own = own_page(d)
    snapshot = bytes(own)
    assert not MemoryCipher(XEX, _key(XEX), ZEN2).decrypt_from_pages(0xF800, d.pages_dict(), own[:4096])
    assert bytes(own) == snapshot
    mc = MemoryCipher(XTS, _key(XTS), ZEN2)
    with pytest.raises(AlignmentError):
        mc.decrypt_from_pages(0x1008, d.pages_dict(), bytearray(4096))
    with pytest.raises((AddressError, ValueError)):
        mc.decrypt_from_pages((1 << 48) - 4096, d.pages_dict(), bytearray(8192))


# ---- in place: encrypt_pages_in_place (the C crypt_pages_in_place) --------------------------------


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_in_place_is_gather_then_encrypt_to_pages(mode: EncryptionMode, data: st.DataObject) -> None:
    """The bytes the range held (absent pages: zeros) come back, and the pages end as the bulk path
    and DRAM's write of those bytes leave them (an absent page created, or left absent when its
    ciphertext is all zeros, as ``Dram.write``)."""
    tc, spa, n, before, _, key = _case(mode, data)
    d = _dram_with(before)
    plain = d.read(spa, n)
    got = MemoryCipher(mode, key, tc).encrypt_pages_in_place(spa, n, d.pages_dict())
    assert got == plain and isinstance(got, bytes)
    assert d.pages_dict() == _reference(mode, key, tc, before, spa, plain)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_in_place_decrypt_direction_inverts_over_many_pages(mode: EncryptionMode) -> None:
    tc = ZEN1 if mode is XE else ZEN2
    rng = random.Random(9)
    before = {pfn: rng.randbytes(4096) for pfn in range(0x100, 0x100 + 300) if pfn % 7}
    d = _dram_with(before)
    c = MemoryCipher(mode, _key(mode), tc)
    plain = c.encrypt_pages_in_place(0x100040, 300 * 4096 - 128, d.pages_dict())
    assert plain is not None
    back = memenc._memenc_accel.crypt_pages_in_place(d.pages_dict(), 0x100040, 300 * 4096 - 128,
                                                     tc._tables.consts_bytes, _key(mode), CODE[mode], False)
    assert d.read(0x100040, len(plain)) == plain and len(back) == len(plain)


def _hash_case_pages(rng: random.Random) -> dict[int, bytes]:
    """40 pages from PFN 0x200 (groups of 16 pages in the C pass): runs of equal pages inside a group
    and across the group boundaries (pages 15/16, 31/32), pages differing from the one before only in
    their first or last byte (also across a boundary), a page equal to the one two back, absent pages
    (zeros) beside stored zero pages."""
    ff, other = b"\xff" * 4096, rng.randbytes(4096)
    pages: dict[int, bytes] = {}
    for i in range(40):
        if i in (3, 4, 5, 14, 15, 16, 17):
            pages[0x200 + i] = ff
        elif i == 31:
            pages[0x200 + i] = other
        elif i == 32:
            pages[0x200 + i] = other[:-1] + bytes([other[-1] ^ 1])
        elif i == 33:
            pages[0x200 + i] = bytes([other[0] ^ 0x80]) + other[1:]
        elif i == 34:
            pages[0x200 + i] = other
        elif i in (20, 21, 26):
            pages[0x200 + i] = bytes(4096)
        elif i not in (22, 23, 27):
            pages[0x200 + i] = rng.randbytes(4096)
    return pages


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
@pytest.mark.parametrize(("first", "count"), [(0, 40), (15, 2), (16, 1), (1, 33)])
def test_in_place_hashes_are_the_pages_sha384_and_the_pages_the_same(mode: EncryptionMode, first: int,
                                                                     count: int) -> None:
    """``hashes=True``: the SHA-384 of each page as it was (hashlib, page by page -- the copy of an equal
    page's digest included) and the very pages the copying call leaves (created and absent alike)."""
    import hashlib
    tc = ZEN1 if mode is XE else ZEN2
    before = _hash_case_pages(random.Random(5))
    spa, n = (0x200 + first) * 4096, count * 4096
    copied, hashed = _dram_with(before), _dram_with(before)
    plain = copied.read(spa, n)
    c = MemoryCipher(mode, _key(mode), tc)
    assert c.encrypt_pages_in_place(spa, n, copied.pages_dict()) == plain
    got = c.encrypt_pages_in_place(spa, n, hashed.pages_dict(), hashes=True)
    want = b"".join(hashlib.sha384(plain[i : i + 4096]).digest() for i in range(0, n, 4096))
    assert got == want
    assert hashed.pages_dict() == copied.pages_dict()


def test_in_place_hashes_take_whole_pages_only() -> None:
    d = _dram_with({0x10: bytes(range(256)) * 16})
    snapshot = {k: bytes(v) for k, v in d.pages_dict().items()}
    c = MemoryCipher(XEX, _key(XEX), ZEN2)
    with pytest.raises(AlignmentError):
        c.encrypt_pages_in_place(0x10040, 4096, d.pages_dict(), hashes=True)
    with pytest.raises(ValueError, match="whole 4 KiB pages"):  # (the C function's own check)
        memenc._memenc_accel.crypt_pages_in_place(d.pages_dict(), 0x10000, 2048, ZEN2._tables.consts_bytes,
                                                 _key(XEX), CODE[XEX], True, True)
    assert {k: bytes(v) for k, v in d.pages_dict().items()} == snapshot


def test_in_place_declines_or_refuses_without_writing() -> None:
    d = _dram_with({0x10: bytes(range(256)) * 16})
    snapshot = {k: bytes(v) for k, v in d.pages_dict().items()}
    assert MemoryCipher(XEX, _key(XEX), ZEN2, accel=False).encrypt_pages_in_place(0x10000, 4096, d.pages_dict()) is None
    c = MemoryCipher(XEX, _key(XEX), ZEN2)
    with pytest.raises(AlignmentError):
        c.encrypt_pages_in_place(0x10008, 4096, d.pages_dict())
    with pytest.raises(AddressError):
        c.encrypt_pages_in_place((1 << 48) - 4096, 8192, d.pages_dict())
    bad: dict[int, object] = {0x10: d.pages_dict()[0x10], 0x12: bytearray(100)}
    with pytest.raises(TypeError, match="4096"):
        memenc._memenc_accel.crypt_pages_in_place(bad, 0x10000, 4 * 4096, ZEN2._tables.consts_bytes, _key(XEX), 1, True)
    assert sorted(bad) == [0x10, 0x12]  # no page made
    with pytest.raises(ValueError, match="negative"):
        memenc._memenc_accel.crypt_pages_in_place({}, 0x1000, -64, ZEN2._tables.consts_bytes, _key(XEX), 1, True)
    assert {k: bytes(v) for k, v in d.pages_dict().items()} == snapshot


def test_in_place_hashes_decline_with_an_accelerator_built_before_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """An accelerator whose ``crypt_pages_in_place`` predates the ``hashes`` argument (its docstring
    does not name it): the call declines (None), nothing written, and the memory controller's path
    gathers, encrypts and hashes instead."""
    class Old:
        __doc__ = "crypt_pages_in_place(pages, spa, length, consts, key, code, encrypt, /)"

        def __call__(self, *args: object) -> bytes:
            raise AssertionError("called with the hashes argument")

    d = _dram_with({0x10: bytes(range(256)) * 16})
    snapshot = {k: bytes(v) for k, v in d.pages_dict().items()}
    monkeypatch.setattr(memenc._memenc_accel, "crypt_pages_in_place", Old())
    assert MemoryCipher(XEX, _key(XEX), ZEN2).encrypt_pages_in_place(0x10000, 4096, d.pages_dict(), hashes=True) is None
    assert {k: bytes(v) for k, v in d.pages_dict().items()} == snapshot


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_gather_is_crypt_from_pages_of_each_page(mode: EncryptionMode) -> None:
    """``crypt_gather`` over PFNs in any order (absent pages, repeats) gives each page's
    ``crypt_from_pages``; the refusals (a PFN past the address space, a wrong output size, a list
    that is not whole 8-byte integers, an output inside one of the pages) write nothing."""
    import numpy as np

    ax = memenc._memenc_accel
    tc = ZEN1 if mode is XE else ZEN2
    consts = tc._tables.consts_bytes
    rng = random.Random(41)
    key = _key(mode, 41)
    store = {pfn: bytearray(rng.randbytes(4096)) for pfn in rng.sample(range(1 << 20), 30)}
    pfns = np.array(rng.sample(sorted(store), 20) + [12345678, 7, *sorted(store)[:3]], dtype=np.uint64)
    out = bytearray(4096 * len(pfns))
    assert ax.crypt_gather(store, pfns, out, consts, key, CODE[mode], False) is True
    for k, pfn in enumerate(pfns.tolist()):
        one = bytearray(4096)
        assert ax.crypt_from_pages(store, pfn << 12, one, consts, key, CODE[mode], False) is True
        assert out[4096 * k : 4096 * (k + 1)] == one, k
    cipher = MemoryCipher(mode, key, tc)
    again = bytearray(len(out))
    assert cipher.decrypt_pages_gather(pfns, store, again) and again == out
    assert ax.crypt_gather(store, np.zeros(0, dtype=np.uint64), bytearray(), consts, key, CODE[mode], False)
    before = bytes(out)
    for bad, size in ((np.array([1 << 36], dtype=np.uint64), 4096), (pfns, 4096), (b"\x01" * 12, 4096)):
        with pytest.raises(ValueError):
            ax.crypt_gather(store, bad, memoryview(out)[:size], consts, key, CODE[mode], False)
    assert out == before
    page = next(iter(store))
    inside = memoryview(store[page])
    assert ax.crypt_gather(store, np.array([page], dtype=np.uint64), inside, consts, key, CODE[mode], False) is False
    with pytest.raises(AddressError):
        cipher.decrypt_pages_gather(np.array([1 << 36], dtype=np.uint64), store, bytearray(4096))
    top = bytearray(4096)  # the last page of the 48-bit space is inside it
    assert cipher.decrypt_pages_gather(np.array([(1 << 36) - 1], dtype=np.uint64), store, top)
    with pytest.raises(InputError, match="writable"):
        cipher.decrypt_pages_gather(pfns, store, bytes(len(out)))
    with pytest.raises(InputError, match="for 25 pages"):
        cipher.decrypt_pages_gather(pfns, store, bytearray(4096))
    untouched = bytearray(b"\x33" * len(out))
    assert MemoryCipher(mode, key, tc, accel=False).decrypt_pages_gather(pfns, store, untouched) is False
    assert untouched == b"\x33" * len(out)


@pytest.mark.parametrize("mode", [XE, XEX, XTS])
def test_scatter_is_crypt_pages_of_each_page(mode: EncryptionMode) -> None:
    """``crypt_scatter`` into PFNs in any order (absent and present pages, an all-zero result that
    leaves its page absent) gives each page's ``crypt_pages``; a repeated PFN or a source inside one of
    the pages is declined (False) with nothing changed; the refusals write nothing."""
    import numpy as np

    ax = memenc._memenc_accel
    tc = ZEN1 if mode is XE else ZEN2
    consts = tc._tables.consts_bytes
    rng = random.Random(43)
    key = _key(mode, 43)
    base = {pfn: rng.randbytes(4096) for pfn in rng.sample(range(4000), 30)}
    pfns = np.array(rng.sample(sorted(base), 10) + rng.sample(range(4000, 8000), 10), dtype=np.uint64)
    cipher = MemoryCipher(mode, key, tc)
    src = bytearray(rng.randbytes(4096 * len(pfns)))
    zero_ct = MemoryCipher(mode, key, tc, accel=False).decrypt_bulk(int(pfns[-1]) << 12, bytes(4096))
    src[-4096:] = zero_ct  # encrypts to zeros: its (absent) page stays absent

    def store() -> dict[int, bytearray]:
        return {k: bytearray(v) for k, v in base.items()}

    lean, ref = store(), store()
    assert cipher.encrypt_pages_scatter(pfns, src, lean) is True
    for k, pfn in enumerate(pfns.tolist()):
        assert ax.crypt_pages(ref, pfn << 12, src[4096 * k : 4096 * (k + 1)], consts, key, CODE[mode], True)
    assert lean == ref and int(pfns[-1]) not in lean
    untouched = store()
    repeated = np.array([*pfns[:3].tolist(), int(pfns[1])], dtype=np.uint64)
    assert ax.crypt_scatter(untouched, repeated, bytes(4 * 4096), consts, key, CODE[mode], True) is False
    page = int(pfns[0])
    assert ax.crypt_scatter(untouched, np.array([page], dtype=np.uint64), memoryview(untouched[page]), consts, key,
                            CODE[mode], True) is False
    assert untouched == store()
    with pytest.raises(InputError, match="for 20 pages"):
        cipher.encrypt_pages_scatter(pfns, bytes(4096), untouched)
    with pytest.raises(AddressError):
        cipher.encrypt_pages_scatter(np.array([1 << 36], dtype=np.uint64), bytes(4096), untouched)
    with pytest.raises(ValueError):
        ax.crypt_scatter(untouched, b"\x01" * 12, bytes(4096), consts, key, CODE[mode], True)
    assert untouched == store()
    assert MemoryCipher(mode, key, tc, accel=False).encrypt_pages_scatter(pfns, src, untouched) is False
    assert untouched == store()
