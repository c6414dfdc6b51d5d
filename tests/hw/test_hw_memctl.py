"""Memory controller: C=0 passthrough, per-ASID keys, the Secure Processor's key-slot port."""

from __future__ import annotations

import random

import pytest

from sevemu.crypto.memenc import EncryptionMode, TweakConstants
from sevemu.errors import AddressError, AlignmentError, AsidError, KeySizeError, KeySlotError
from sevemu.hw.dram import Dram
from sevemu.hw.memctl import KeySlotPort, MemoryController, domain_for

MiB = 1 << 20
MODES = [EncryptionMode.XE, EncryptionMode.XEX, EncryptionMode.XTS256]


def _mc(mode: EncryptionMode = EncryptionMode.XEX, max_asid: int = 15) -> tuple[MemoryController, KeySlotPort]:
    r = random.Random(7)
    tweaks = TweakConstants.random_zen2(48, r)
    mc = MemoryController(Dram(4 * MiB), mode, tweaks, max_asid, rng=r.randbytes)
    return mc, mc.secure_port()


def _line(tag: int) -> bytes:
    return random.Random(tag).randbytes(64)


def test_c0_is_a_passthrough_whatever_the_asid() -> None:
    mc, _ = _mc()
    data = _line(1)
    mc.write_line(0x1000, 5, False, data)  # ASID 5 has no key: irrelevant with C=0
    assert mc.dram.read_line(0x1000) == data
    assert mc.read_line(0x1000, 9, False) == data
    assert mc.lines_encrypted == 0


@pytest.mark.parametrize("mode", MODES)
def test_c1_stores_ciphertext_that_decrypts_back(mode: EncryptionMode) -> None:
    mc, port = _mc(mode)
    port.load(3, bytes(range(mode.key_size)))
    data = _line(2)
    mc.write_line(0x2040, 3, True, data)
    raw = mc.dram.read_line(0x2040)
    assert raw != data
    for i in range(0, 64, 16):
        assert data[i : i + 16] not in raw
    assert mc.read_line(0x2040, 3, True) == data
    assert mc.lines_encrypted == 1
    # the host key (slot 0) and other guests' keys give garbage
    assert mc.read_line(0x2040, 0, True) != data
    port.load(4, bytes(reversed(range(mode.key_size))))
    assert mc.read_line(0x2040, 4, True) != data
    # the same plaintext at another address gives another ciphertext (address tweak)
    mc.write_line(0x3040, 3, True, data)
    assert mc.dram.read_line(0x3040) != raw


def test_slot_zero_holds_the_host_key_from_boot() -> None:
    mc, port = _mc()
    assert mc.has_key(0) and port.loaded(0)
    data = _line(3)
    mc.write_line(0, 0, True, data)
    assert mc.dram.read_line(0) != data
    assert mc.read_line(0, 0, True) == data
    with pytest.raises(AsidError):
        port.clear(0)
    with pytest.raises(AsidError):
        port.load(0, bytes(16))
    assert mc.read_line(0, 0, True) == data


def test_asid_valid_state_is_apart_from_the_key_slot() -> None:
    """ACTIVATE makes an ASID valid; DEACTIVATE (invalidate) ends that while the key stays for the
    lines still cached; clearing the slot ends both."""
    mc, port = _mc()
    assert not port.valid(3) and not mc.asid_valid(3)
    port.load(3, bytes(16))
    assert port.valid(3) is True and mc.asid_valid(3) and port.loaded(3)
    port.invalidate(3)
    assert port.valid(3) is False and port.loaded(3) and mc.has_key(3)
    mc.write_line(0x1000, 3, True, _line(5))  # the key still writes back
    assert mc.read_line(0x1000, 3, True) == _line(5)
    port.load(3, bytes(16))
    assert port.valid(3)
    port.clear(3)
    assert not port.valid(3) and not port.loaded(3)


def test_the_key_port_is_issued_once() -> None:
    mc, _ = _mc()
    with pytest.raises(KeySlotError):
        mc.secure_port()


@pytest.mark.parametrize("mode", MODES)
def test_wrong_key_size_is_refused(mode: EncryptionMode) -> None:
    _, port = _mc(mode)
    for size in (0, mode.key_size - 1, mode.key_size + 1, 32):
        with pytest.raises(KeySizeError):
            port.load(1, bytes(size))
    assert not port.loaded(1)


@pytest.mark.parametrize("asid", [-1, 0, 16, 1 << 20])
def test_asid_out_of_range_is_refused(asid: int) -> None:
    mc, port = _mc(max_asid=15)
    with pytest.raises(AsidError):
        port.load(asid, bytes(16))
    assert sorted(mc._slots) == [0]


def test_an_empty_slot_cannot_encrypt_or_decrypt() -> None:
    mc, port = _mc()
    with pytest.raises(KeySlotError):
        mc.write_line(0x1000, 2, True, _line(4))
    with pytest.raises(KeySlotError):
        mc.read_line(0x1000, 2, True)
    with pytest.raises(KeySlotError):
        mc.read(0x1000, 64, 2, True)
    assert mc.dram.populated_pages == 0
    port.load(2, bytes(16))
    port.clear(2)
    assert not mc.has_key(2)
    with pytest.raises(KeySlotError):
        mc.read_line(0x1000, 2, True)
    port.clear(2)  # clearing an empty slot is harmless


@pytest.mark.parametrize("mode", MODES)
def test_bulk_and_line_paths_agree(mode: EncryptionMode) -> None:
    mc, port = _mc(mode)
    port.load(1, random.Random(5).randbytes(mode.key_size))
    data = random.Random(6).randbytes(3 * 4096)
    base = 0x7000
    mc.write(base, data, 1, True)
    bulk_ct = mc.dram.read(base, len(data))
    for off in range(0, len(data), 64):
        line = data[off : off + 64]
        mc.write_line(0x100000 + off, 1, True, line)  # same key elsewhere ...
        mc.write_line(base + off, 1, True, line)  # ... and at the same SPA
    assert mc.dram.read(base, len(data)) == bulk_ct
    assert b"".join(mc.read_line(base + o, 1, True) for o in range(0, len(data), 64)) == data
    assert mc.read(base, len(data), 1, True) == data
    assert mc.read(base, len(data), 1, False) == bulk_ct


@pytest.mark.parametrize("mode", MODES)
def test_lines_never_written_read_as_zeros_in_every_domain(mode: EncryptionMode) -> None:
    mc, port = _mc(mode)
    port.load(1, bytes(mode.key_size))
    assert mc.read_line(0x5000, 0, False) == bytes(64)
    assert mc.readers[0](0x5040) == bytearray(64)
    zero_pt = mc.read_line(0x5000, 1, True)  # DRAM zeros, decrypted with the key
    assert zero_pt != bytes(64) and mc.readers[3](0x5000) == zero_pt
    mc.write_line(0x5000, 1, True, zero_pt)
    assert mc.dram.read_line(0x5000) == bytes(64)
    assert mc.dram.populated_pages == 1


@pytest.mark.parametrize("mode", [EncryptionMode.XEX, EncryptionMode.XTS256])
def test_large_bulk_writes_go_in_chunks_with_the_line_paths_bytes(mode: EncryptionMode) -> None:
    mc, port = _mc(mode)
    key = random.Random(8).randbytes(mode.key_size)
    port.load(1, key)
    data = random.Random(9).randbytes(5 * MiB // 2 + 64)  # two whole chunks and a piece
    base = 0x40
    mc.write(base, data, 1, True)
    ref = MemoryController(Dram(4 * MiB), mode, mc.tweaks, 15, rng=random.Random(7).randbytes)
    ref.secure_port().load(1, key)
    for off in range(0, len(data), 64):
        ref.write_line(base + off, 1, True, data[off : off + 64])
    assert mc.dram.read(base, len(data)) == ref.dram.read(base, len(data))
    assert mc.read(base, len(data), 1, True) == data
    mc.write(base, data, 5, False)  # no key needed without the C-bit: the bytes as they are
    assert mc.dram.read(base, len(data)) == data
    mc.write(base, b"", 1, True)  # nothing to do
    assert mc.dram.read(base, 64) == data[:64]


@pytest.mark.parametrize("mode", MODES)
def test_write_small_stores_what_write_stores(mode: EncryptionMode) -> None:
    """The page-sized short path (the firmware's SNP_LAUNCH_UPDATE write) leaves DRAM as write() does;
    a refused one changes nothing."""
    mc, port = _mc(mode)
    port.load(1, random.Random(10).randbytes(mode.key_size))
    rng = random.Random(11)
    for n in (64, 4096, 0):
        data = rng.randbytes(n)
        mc.write(0x9000, data, 1, True)
        ct = mc.dram.read(0x9000, 4096)
        mc.dram.write(0x9000, rng.randbytes(4096))
        mc.write_small(0x9000, data, 1)
        assert mc.dram.read(0x9000, 4096)[:n] == ct[:n]
        assert mc.read(0x9000, n, 1, True) == data
    before = mc.dram.populated_pages
    with pytest.raises(AlignmentError):
        mc.write_small(0x10, bytes(64), 1)
    with pytest.raises(AddressError):
        mc.write_small(4 * MiB - 64, bytes(128), 1)
    with pytest.raises(KeySlotError):
        mc.write_small(0x30000, bytes(64), 2)
    assert mc.dram.populated_pages == before


def test_refused_bulk_transfers_change_nothing() -> None:
    mc, port = _mc()
    port.load(1, bytes(16))
    for spa, n in ((0x10, 64), (0, 63)):
        for c in (False, True):
            with pytest.raises(AlignmentError):
                mc.write(spa, bytes(n), 1, c)
    with pytest.raises(AddressError):  # ends past DRAM: checked before the first chunk is written
        mc.write(4 * MiB - 2 * MiB, bytes(3 * MiB), 1, True)
    with pytest.raises(AddressError):
        mc.read(4 * MiB - 64, 128, 1, True)
    assert mc.dram.populated_pages == 0
    with pytest.raises(KeySlotError):
        mc.write_run(0x1000, 2, True, bytes(128))  # an ASID that never had a key
    assert mc.dram.populated_pages == 0
    port.load(15, bytes(16))  # the highest ASID is a valid one
    assert mc.has_key(15)


def test_bulk_transfers_are_whole_lines() -> None:
    mc, _ = _mc()
    with pytest.raises(AlignmentError):
        mc.read(0x10, 64, 0, False)
    with pytest.raises(AlignmentError):
        mc.write(0, bytes(63), 0, True)


def test_domain_for_follows_apm_table_15_31() -> None:
    assert domain_for(7, True, False) == (7, True)
    assert domain_for(7, True, True) == (7, True)
    assert domain_for(7, False, True) == (0, True)
    assert domain_for(7, False, False) == (0, False)


@pytest.mark.parametrize("mode", MODES)
def test_write_page_stores_what_write_small_stores(mode: EncryptionMode) -> None:
    """write_page (one page, encrypted straight into the DRAM page where the accelerator can): the
    ciphertext write_small stores, into a page that existed or not, of zeros or not; a page at an
    unaligned address or of another size goes the write_small way; refused ones change nothing."""
    mc, port = _mc(mode)
    port.load(1, random.Random(12).randbytes(mode.key_size))
    rng = random.Random(13)
    for spa, data in [(0xA000, rng.randbytes(4096)), (0xB000, bytes(4096)), (0xC040, rng.randbytes(4096)),
                      (0xE000, rng.randbytes(128))]:
        mc.write_small(spa, data, 1)
        want = mc.dram.read(spa & ~0xFFF, 3 * 4096)
        mc.dram.write(spa & ~0xFFF, rng.randbytes(3 * 4096))
        mc.write_page(spa, data, 1)
        got = mc.dram.read(spa & ~0xFFF, 3 * 4096)
        off = spa & 0xFFF
        assert got[off : off + len(data)] == want[off : off + len(data)], hex(spa)
        assert mc.read(spa, len(data), 1, True) == data
    fresh = 0x40000
    assert mc.dram.read(fresh, 4096) == bytes(4096)
    mc.write_page(fresh, bytes(4096), 1)  # an absent page: made, holding the zeros' ciphertext
    assert mc.read(fresh, 4096, 1, True) == bytes(4096) and mc.dram.read(fresh, 4096) != bytes(4096)
    before = mc.dram.populated_pages
    with pytest.raises(AlignmentError):
        mc.write_page(0x10, bytes(4096), 1)
    with pytest.raises(AddressError):
        mc.write_page(4 * MiB - 64, bytes(4096), 1)
    with pytest.raises(KeySlotError):
        mc.write_page(0x30000, bytes(4096), 2)
    assert mc.dram.populated_pages == before
