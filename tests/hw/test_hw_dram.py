"""DRAM: sparse pages, zero reads, range errors, cold-boot dumps and searching them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hwkit import MEM_ACCEL_MODES, mem_accel

from sevemu._util.units import MiB
from sevemu.errors import AddressError, AlignmentError, FileFormatError, InputError
from sevemu.hw.dram import LINE, PAGE, ColdBootImage, Dram


def test_unwritten_memory_reads_as_zeros_and_costs_nothing() -> None:
    d = Dram(64 * MiB)
    assert d.read(0x12345, 100) == bytes(100)
    assert d.read_line(0x40000) == bytes(LINE)
    assert d.populated_pages == 0
    assert list(d.pages()) == []


def test_pages_are_allocated_on_first_write_only() -> None:
    d = Dram(64 * MiB)
    d.write(0x3000 + 10, b"abc")
    assert d.populated_pages == 1
    assert d.read(0x3000 + 9, 5) == b"\0abc\0"
    # an all-zero write to an absent page allocates nothing (it reads as zeros anyway)
    d.write(0x8000, bytes(PAGE))
    assert d.populated_pages == 1
    d.write_line(0x9040, b"\x11" * LINE)
    assert d.populated_pages == 2
    assert d.read_line(0x9040) == b"\x11" * LINE
    assert [spa for spa, _ in d.pages()] == [0x3000, 0x9000]


def test_unaligned_write_and_read_span_pages() -> None:
    d = Dram(1 * MiB)
    data = bytes(range(256)) * 40  # 10 KiB: three pages touched
    d.write(0x1FF0, data)
    assert d.read(0x1FF0, len(data)) == data
    assert d.populated_pages == 4
    assert d.read(0x1FF0 - 1, 2) == b"\0\x00"


@pytest.mark.parametrize("spa,length", [(-1, 1), (MiB, 1), (MiB - 1, 2), (0, MiB + 1)])
def test_out_of_range_accesses_raise_and_change_nothing(spa: int, length: int) -> None:
    d = Dram(MiB)
    with pytest.raises(AddressError):
        d.read(spa, length)
    with pytest.raises(AddressError):
        d.write(spa, b"\x01" * max(length, 0))
    assert d.populated_pages == 0


@pytest.mark.parametrize("size", [0, -PAGE, 100, PAGE + 1])
def test_size_must_be_whole_pages(size: int) -> None:
    with pytest.raises(AlignmentError):
        Dram(size)


def test_find_reports_every_occurrence() -> None:
    d = Dram(MiB)
    d.write(0x1000, b"needle..needle")
    d.write(0x5000 + 4000, b"needle")
    assert d.find(b"needle") == [0x1000, 0x1008, 0x5000 + 4000]
    assert d.find(b"absent") == []


def test_dump_round_trip_is_sparse_and_exact(tmp_path: Path) -> None:
    d = Dram(4 * MiB)
    d.write(0x2000, b"first page")
    d.write(0x3FF000 + 5, b"last page")
    path = tmp_path / "dram.img"
    written = d.dump(path)
    assert written == 2 * PAGE
    assert path.stat().st_size == 4 * MiB
    img = ColdBootImage(path)
    assert img.size == 4 * MiB
    assert img.read(0x2000, 10) == b"first page"
    assert img.read(0x3FF005, 9) == b"last page"
    assert img.read(0x100000, 16) == bytes(16)
    assert list(img.nonzero_pages()) == [0x2000, 0x3FF000]
    # every byte equals DRAM
    with open(path, "rb") as f:
        assert f.read() == d.read(0, 4 * MiB)


def test_partial_dump_with_base(tmp_path: Path) -> None:
    d = Dram(4 * MiB)
    d.write(0x1000, b"below")
    d.write(0x201000, b"inside")
    path = tmp_path / "part.img"
    assert d.dump(path, base=0x200000, length=0x100000) == PAGE
    img = ColdBootImage(path, base=0x200000)
    assert img.find(b"inside") == [0x201000]
    assert img.find(b"below") == []
    with pytest.raises(AddressError):
        img.read(0x1000, 5)
    with pytest.raises(AlignmentError):
        d.dump(tmp_path / "bad.img", base=0x10, length=PAGE)
    with pytest.raises(AddressError):
        d.dump(tmp_path / "bad.img", base=0, length=8 * MiB)


def test_cold_boot_find_across_chunk_boundaries(tmp_path: Path) -> None:
    d = Dram(MiB)
    needle = b"0123456789abcdef"
    # straddling the 4 KiB chunk boundary at 0x3000, at a page boundary and at the start
    d.write(0x3000 - 7, needle)
    d.write(0x8000 - 16, needle)
    d.write(0, needle)
    path = tmp_path / "dram.img"
    d.dump(path)
    img = ColdBootImage(path)
    expected = [0, 0x3000 - 7, 0x8000 - 16]
    for chunk in (PAGE, 4099, 1 << 24):
        assert img.find(needle, chunk=chunk) == expected
    # Dram.find sees only within-page matches; the image sees the straddling one as well
    assert d.find(needle) == [0, 0x8000 - 16]


def test_cold_boot_image_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError):
        ColdBootImage(tmp_path / "missing.img")
    bad = tmp_path / "odd.img"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(FileFormatError):
        ColdBootImage(bad)


def test_cold_boot_find_many_scans_data_runs_once_and_sees_into_holes(tmp_path: Path) -> None:
    d = Dram(8 * MiB)
    d.write(0x1000, b"alpha..alpha")
    d.write(0x2000 - 3, b"beta")  # ends in the next page, which is populated too
    d.write(6 * MiB + 0xFF0, b"gamma")  # "gamma" + the zeros after it straddle into a hole
    path = tmp_path / "dram.img"
    d.dump(path)
    img = ColdBootImage(path)
    runs = img.extents()
    assert sum(n for _, n in runs) < 8 * MiB  # only the populated part is data
    assert all(start <= 0x1000 < start + n for start, n in runs[:1])
    tail = b"gamma" + bytes(20)  # its end lies in the hole after the populated page
    found = img.find_many([b"alpha", b"beta", tail, b"absent"])
    assert found[b"alpha"] == [0x1000, 0x1007]
    assert found[b"beta"] == [0x2000 - 3]
    assert found[tail] == [6 * MiB + 0xFF0]
    assert found[b"absent"] == []
    for needle in (b"alpha", b"beta", tail):
        assert img.find(needle) == found[needle]
        assert img.find(needle, chunk=4099) == found[needle]
    assert list(img.nonzero_pages()) == [0x1000, 0x2000, 6 * MiB]
    with pytest.raises(InputError):
        img.find_many([b"x"], chunk=0)


def test_cold_boot_find_many_searches_holes_for_a_needle_of_zeros(tmp_path: Path) -> None:
    d = Dram(16 * PAGE)
    d.write(PAGE, b"\xff" * PAGE)
    path = tmp_path / "dram.img"
    d.dump(path)
    zeros = bytes(PAGE)
    hits = ColdBootImage(path).find_many([zeros, b"\xff\x00"])
    assert hits[zeros] == [0, *range(2 * PAGE, 15 * PAGE + 1)]
    assert hits[b"\xff\x00"] == [2 * PAGE - 1]


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
def test_bulk_transfers_match_a_byte_model_with_and_without_the_c_helpers(accel: bool) -> None:
    """read_into, write and write_lines against a flat bytearray: any alignment, spans of pages,
    absent pages read as zeros; write leaves a page absent when its part is all zeros, write_lines
    (the cache's write-back) creates it whatever it holds."""
    r = random.Random(7)
    size = 64 * PAGE
    flat = bytearray(size)
    with mem_accel(accel):
        d = Dram(size)
        for step in range(300):
            spa = r.randrange(size)
            n = r.randrange(0, min(3 * PAGE, size - spa) + 1)
            data = r.randbytes(n) if step % 3 else bytes(n)
            if step % 5 == 0 and not (spa % LINE or n % LINE):
                before = {pfn for pfn in range(spa >> 12, (spa + n + PAGE - 1) >> 12)}
                d.write_lines(spa, data)
                assert before <= {s >> 12 for s, _ in d.pages()}
            else:
                absent = {pfn for pfn in range(spa >> 12, (spa + n + PAGE - 1) >> 12)} - {s >> 12 for s, _ in d.pages()}
                d.write(spa, memoryview(data))
                for pfn in absent:
                    part = data[max(pfn * PAGE - spa, 0) : (pfn + 1) * PAGE - spa]
                    assert ((pfn << 12) in dict(d.pages())) == any(part)
            flat[spa : spa + n] = data
            out = bytearray(n + 3)
            d.read_into(spa, memoryview(out)[1 : n + 1])
            assert out[1 : n + 1] == flat[spa : spa + n] and out[0] == out[n + 1] == 0
            assert d.read(spa, n) == flat[spa : spa + n]
        for s, page in d.pages():
            assert page == flat[s : s + PAGE]
        with pytest.raises(AddressError):
            d.read_into(size - 8, bytearray(16))
        with pytest.raises(InputError):
            d.read_into(0, b"read-only")


def test_zero_pages_stores_every_page_of_the_range_as_zeros() -> None:
    """zero_pages gives absent pages their 4 KiB of zeros (they read the same) and zeroes written ones;
    pages outside the range are untouched; a range that is not whole pages, or outside DRAM, is refused."""
    d = Dram(1 << 20)
    d.write(0x3000, b"\x11" * PAGE)
    d.write(0x5000, b"\x22" * PAGE)
    d.zero_pages(0x2000, 3 * PAGE)
    assert d.populated_pages == 4  # 0x2000 and 0x4000 created, 0x3000 zeroed, 0x5000 kept
    assert d.read(0x2000, 3 * PAGE) == bytes(3 * PAGE)
    assert d.read(0x5000, PAGE) == b"\x22" * PAGE
    with pytest.raises(AlignmentError):
        d.zero_pages(0x2000, 100)
    with pytest.raises(AddressError):
        d.zero_pages((1 << 20) - PAGE, 2 * PAGE)
    assert d.populated_pages == 4
