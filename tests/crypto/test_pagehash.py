"""sevemu.crypto.pagehash: the C accelerator and the hashlib path give hashlib's bytes, page by page,
and the PAGE_INFO chain equals SHA-384 of each PageInfo the ABI layout encodes; bad lengths are refused."""

from __future__ import annotations

import hashlib
import os

import pytest

from sevemu.abi.snp import PageInfo, SnpPageType
from sevemu.crypto import pagehash
from sevemu.errors import InputError

BOTH = [False, pytest.param(True, marks=pytest.mark.skipif(not pagehash.ACCELERATED, reason="C accelerator not built"))]


@pytest.mark.parametrize("accel", BOTH)
@pytest.mark.parametrize("size", [1, 111, 112, 113, 127, 128, 129, 4096])
def test_sha384_pages_is_hashlib_per_piece(accel: bool, size: int) -> None:
    data = os.urandom(size * 5)
    want = b"".join(hashlib.sha384(data[i : i + size]).digest() for i in range(0, len(data), size))
    assert pagehash.sha384_pages(data, size, accel=accel) == want
    assert pagehash.sha384_pages(b"", size, accel=accel) == b""


def _chain(ld: bytes, contents: list[bytes], page_type: int, gpa: int, perms: tuple[int, int, int], imi: int) -> bytes:
    for i, c in enumerate(contents):
        ld = hashlib.sha384(PageInfo(digest_cur=ld, contents=c, page_type=page_type, imi_page=imi, vmpl1_perms=perms[0],
                                     vmpl2_perms=perms[1], vmpl3_perms=perms[2], gpa=gpa + 4096 * i).encode()).digest()
    return ld


@pytest.mark.parametrize("accel", BOTH)
def test_page_info_chain_is_the_page_info_of_each_page(accel: bool) -> None:
    ld0 = os.urandom(48)
    pages = os.urandom(4096 * 6)
    contents = pagehash.sha384_pages(pages, accel=accel)
    template = PageInfo(page_type=SnpPageType.NORMAL, imi_page=1, vmpl1_perms=3, vmpl2_perms=1, vmpl3_perms=0).encode()
    got = pagehash.page_info_chain(ld0, template, 0xFFC0_0000, 6, contents, accel=accel)
    want = _chain(ld0, [contents[48 * i : 48 * i + 48] for i in range(6)], SnpPageType.NORMAL, 0xFFC0_0000, (3, 1, 0), 1)
    assert got == want
    zero = PageInfo(page_type=SnpPageType.ZERO).encode()
    assert pagehash.page_info_chain(ld0, zero, 0x80_0000, 3, accel=accel) == _chain(
        ld0, [bytes(48)] * 3, SnpPageType.ZERO, 0x80_0000, (0, 0, 0), 0)
    assert pagehash.page_info_chain(ld0, zero, 0, 0, accel=accel) == ld0


@pytest.mark.parametrize("accel", BOTH)
def test_measure_pages_is_the_chain_of_the_pages_hashes(accel: bool) -> None:
    """measure_pages (both hashes of each page in one pass) == page_info_chain of sha384_pages, and ==
    the PageInfo of each page; no pages: ld unchanged; bad lengths and GPAs refused."""
    ld0 = os.urandom(48)
    pages = os.urandom(4096 * 7)
    template = PageInfo(page_type=SnpPageType.NORMAL, imi_page=0, vmpl1_perms=7, vmpl2_perms=0, vmpl3_perms=2).encode()
    got = pagehash.measure_pages(ld0, template, 0x7FFF_9000, pages, accel=accel)
    contents = pagehash.sha384_pages(pages, accel=False)
    assert got == pagehash.page_info_chain(ld0, template, 0x7FFF_9000, 7, contents, accel=False)
    assert got == _chain(ld0, [hashlib.sha384(pages[i : i + 4096]).digest() for i in range(0, len(pages), 4096)],
                         SnpPageType.NORMAL, 0x7FFF_9000, (7, 0, 2), 0)
    assert pagehash.measure_pages(ld0, template, 0, b"", accel=accel) == ld0
    for bad in [(bytes(47), template, 0, pages), (ld0, template[:-1], 0, pages), (ld0, template, 0, pages[:-1]),
                (ld0, template, (1 << 64) - 4096, pages), (ld0, template, -4096, pages)]:
        with pytest.raises(InputError):
            pagehash.measure_pages(*bad, accel=accel)


def _runs_of_equal_pages() -> bytes:
    """Pages in runs (the accelerator hashes a page equal to the one before it only once): erased
    flash, a page that differs from its neighbour only in its last byte or only in its first, a run
    again after a different page, zeros, and a page equal to one two pages back (not to the one
    before)."""
    ff, other = b"\xff" * 4096, os.urandom(4096)
    last, first = ff[:-1] + b"\xfe", b"\x00" + ff[1:]
    return b"".join([ff, ff, ff, last, ff, first, first, other, ff, ff, bytes(4096), bytes(4096), other, ff, other])


@pytest.mark.parametrize("accel", BOTH)
def test_repeated_pages_hash_as_each_page(accel: bool) -> None:
    """A page equal to the one before it has the same CONTENTS as hashing it again gives: sha384_pages and
    measure_pages over runs of equal pages (and near-equal ones) are hashlib's, page by page."""
    pages = _runs_of_equal_pages()
    want = [hashlib.sha384(pages[i : i + 4096]).digest() for i in range(0, len(pages), 4096)]
    assert pagehash.sha384_pages(pages, accel=accel) == b"".join(want)
    assert pagehash.sha384_pages(pages[:4096] * 3 + pages[4096:8192], 2048, accel=accel) == b"".join(
        hashlib.sha384(h).digest() for h in [pages[:2048], pages[2048:4096]] * 3 + [pages[4096:6144], pages[6144:8192]])
    ld0 = os.urandom(48)
    template = PageInfo(page_type=SnpPageType.NORMAL).encode()
    assert pagehash.measure_pages(ld0, template, 0x10_0000, pages, accel=accel) == _chain(
        ld0, want, SnpPageType.NORMAL, 0x10_0000, (0, 0, 0), 0)


@pytest.mark.parametrize("accel", BOTH)
def test_bad_lengths_are_refused(accel: bool) -> None:
    with pytest.raises(InputError):
        pagehash.sha384_pages(bytes(4097), accel=accel)
    with pytest.raises(InputError):
        pagehash.sha384_pages(bytes(8), 0, accel=accel)
    info = bytes(0x70)
    with pytest.raises(InputError):
        pagehash.page_info_chain(bytes(47), info, 0, 1, accel=accel)
    with pytest.raises(InputError):
        pagehash.page_info_chain(bytes(48), info[:-1], 0, 1, accel=accel)
    with pytest.raises(InputError):
        pagehash.page_info_chain(bytes(48), info, 0, 2, bytes(48), accel=accel)
    with pytest.raises(InputError):
        pagehash.page_info_chain(bytes(48), info, (1 << 64) - 4096, 2, accel=accel)


@pytest.mark.skipif(not pagehash.ACCELERATED, reason="C accelerator not built")
def test_the_c_module_checks_its_own_arguments() -> None:
    from sevemu.crypto import _sha384_accel as c

    with pytest.raises(ValueError):
        c.sha384_pages(bytes(100), 0)
    with pytest.raises(ValueError):
        c.sha384_pages(bytes(100), 3)
    with pytest.raises(TypeError):
        c.sha384_pages(bytes(100))
    with pytest.raises(ValueError):
        c.page_info_chain(bytes(48), bytes(0x70), 0, 2, bytes(48))
    with pytest.raises(ValueError):
        c.page_info_chain(bytes(48), bytes(0x70), -1, 1)
    with pytest.raises(ValueError):
        c.measure_pages(bytes(48), bytes(0x70), 0, bytes(4095))
    with pytest.raises(ValueError):
        c.measure_pages(bytes(47), bytes(0x70), 0, bytes(4096))
    with pytest.raises(TypeError):
        c.measure_pages(bytes(48), bytes(0x70), 0)
