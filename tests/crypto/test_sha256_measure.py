"""The SEV launch digest whose state the accelerator holds (:class:`sevemu.crypto.sha256.Sha256`), and the
fused measurement of a page store (``MemoryCipher.measure_pages_in_place``, the C
``measure_pages_in_place``): the digest of the gathered bytes and the pages the bulk path leaves, on
every mode and alignment, without a plaintext copy; its refusals change nothing."""

from __future__ import annotations

import copy
import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants
from sevemu.crypto.sha256 import Sha256
from sevemu.errors import AddressError, AlignmentError
from sevemu.hw.dram import Dram

XE, XEX, XTS = EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256
ZEN1 = TweakConstants.published_zen1(48, random.Random(1))
ZEN2 = TweakConstants.random_zen2(48, random.Random(2))
DRAM = 1 << 26
ACCEL = [pytest.param(True, marks=pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")),
         False]


@pytest.mark.parametrize("accel", ACCEL)
@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.binary(max_size=9000), max_size=8))
def test_sha256_gives_hashlib_digests_for_any_split(accel: bool, pieces: list[bytes]) -> None:
    h = Sha256(accel=accel)
    assert (h.context is not None) == accel
    for i, piece in enumerate(pieces):
        h.update(piece if i % 2 else memoryview(bytearray(piece)))
    assert h.digest() == hashlib.sha256(b"".join(pieces)).digest()
    assert h.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert h.digest() == h.digest()  # (reading the digest leaves the state as it was)


@pytest.mark.parametrize("accel", ACCEL)
def test_a_copy_of_the_digest_goes_its_own_way(accel: bool) -> None:
    h = Sha256(b"launch", accel=accel)
    for dup in (h.copy(), copy.copy(h), copy.deepcopy(h)):
        dup.update(b" more")
        assert dup.digest() == hashlib.sha256(b"launch more").digest()
    assert h.digest() == hashlib.sha256(b"launch").digest()
    assert h.name == "sha256" and h.digest_size == 32 and h.block_size == 64


def _dram_with(pages: dict[int, bytes]) -> Dram:
    d = Dram(DRAM)
    for pfn, data in pages.items():
        d.pages_dict()[pfn] = bytearray(data)
    return d


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from([XE, XEX, XTS]), data=st.data())
def test_measuring_in_place_equals_gather_hash_then_encrypt(mode: EncryptionMode, data: st.DataObject) -> None:
    """The digest of the gathered range, extending what was hashed before, and the pages the bulk
    path (no accelerator) followed by ``Dram.write`` leaves -- absent pages read as zeros and are
    stored; pages around the range untouched."""
    tc = ZEN1 if mode is XE else ZEN2
    g = mode.granule
    spa = data.draw(st.integers(0, (DRAM - 41 * 4096) // g)) * g  # (room for n and the page after it)
    n = data.draw(st.integers(0, 40 * 4096 // g)) * g
    r = random.Random(data.draw(st.integers(0, 1 << 30)))
    key = r.randbytes(mode.key_size)
    first, last = (spa >> 12) - 1, (spa + n) >> 12
    before = {pfn: r.randbytes(4096) for pfn in range(first, last + 2) if r.random() < 0.6}
    prefix = r.randbytes(r.randrange(100))

    ref = _dram_with(before)
    plain = ref.read(spa, n)
    ref.write(spa, MemoryCipher(mode, key, tc, accel=False).encrypt_bulk(spa, plain))
    want = hashlib.sha256(prefix + plain).digest()

    got = _dram_with(before)
    sha = Sha256(prefix)
    assert MemoryCipher(mode, key, tc).measure_pages_in_place(spa, n, got.pages_dict(), sha)
    assert sha.digest() == want
    assert {pfn: bytes(p) for pfn, p in got.pages_dict().items()} == \
        {pfn: bytes(p) for pfn, p in ref.pages_dict().items()}
    stored = got.read(spa, n)  # DRAM holds only ciphertext where the plaintext was
    assert all(stored[o : o + 16] != plain[o : o + 16] for o in range(0, n, 16))


@pytest.mark.parametrize("accel_cipher,accel_sha", [(False, True), (True, False), (False, False)])
def test_measuring_in_place_declines_without_the_accelerator_on_both_sides(accel_cipher: bool,
                                                                           accel_sha: bool) -> None:
    """Either side without the accelerator: False, nothing hashed, nothing written."""
    if (accel_cipher or accel_sha) and not ACCELERATED:
        pytest.skip("the C accelerator was not built")
    d = _dram_with({0x10: bytes(range(256)) * 16})
    sha = Sha256(b"x", accel=accel_sha)
    assert not MemoryCipher(XEX, bytes(16), ZEN2, accel=accel_cipher).measure_pages_in_place(
        0x10000, 4096, d.pages_dict(), sha)
    assert sha.digest() == hashlib.sha256(b"x").digest()
    assert bytes(d.pages_dict()[0x10]) == bytes(range(256)) * 16


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
@pytest.mark.parametrize("spa,n,error", [(0x10008, 64, AlignmentError), (0x10000, 8, AlignmentError),
                                         ((1 << 48) - 4096, 8192, AddressError)])
def test_measuring_in_place_refuses_a_bad_range_before_anything(spa: int, n: int, error: type[Exception]) -> None:
    d = _dram_with({0x10: bytes(4096)})
    sha = Sha256()
    with pytest.raises(error):
        MemoryCipher(XEX, bytes(16), ZEN2).measure_pages_in_place(spa, n, d.pages_dict(), sha)
    assert sha.digest() == hashlib.sha256().digest() and set(d.pages_dict()) == {0x10}
