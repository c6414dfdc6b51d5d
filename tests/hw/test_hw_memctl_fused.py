"""The memory controller's large encrypted writes (``MemoryController.write`` with C=1): the fused
page write (``MemoryCipher.encrypt_to_pages``) leaves DRAM exactly as the chunked bulk path does,
on every mode; below its threshold the bulk path runs as before."""

from __future__ import annotations

import hashlib
import random

import pytest

from sevemu._util.units import PAGE, KiB, MiB
from sevemu.crypto.memenc import ACCELERATED, EncryptionMode, MemoryCipher, TweakConstants
from sevemu.errors import AlignmentError
from sevemu.hw import memctl
from sevemu.hw.dram import Dram
from sevemu.hw.memctl import MemoryController


def _mc(mode: EncryptionMode) -> MemoryController:
    r = random.Random(3)
    tweaks = TweakConstants.random_zen2(48, r)
    mc = MemoryController(Dram(8 * MiB), mode, tweaks, 15, rng=r.randbytes)
    mc.secure_port().load(5, r.randbytes(mode.key_size))
    return mc


def _write_all(mc: MemoryController, data: bytes) -> dict[int, bytes]:
    mc.write(0x1000, data[: 3 * MiB], 5, True)
    mc.write(0x40_0040, data[3 * MiB : 3 * MiB + 96 * KiB], 5, True)  # (not page-aligned, partial pages)
    mc.write(0x60_0000, data[: 64 * KiB - 64], 5, True)  # below the threshold
    return {k: bytes(v) for k, v in mc.dram.pages_dict().items()}


@pytest.mark.parametrize("mode", list(EncryptionMode))
def test_fused_write_leaves_dram_as_the_bulk_path(mode: EncryptionMode, monkeypatch: pytest.MonkeyPatch) -> None:
    data = random.Random(4).randbytes(4 * MiB)
    calls: list[int] = []
    real = MemoryCipher.encrypt_to_pages

    def counted(self: MemoryCipher, spa: int, src: object, pages: dict[int, bytearray]) -> bool:
        taken = real(self, spa, src, pages)  # type: ignore[arg-type]
        calls.append(int(taken))
        return taken

    monkeypatch.setattr(MemoryCipher, "encrypt_to_pages", counted)
    fused = _write_all(_mc(mode), data)
    assert len(calls) == 2  # the two large writes asked; the small one did not
    assert calls == ([1, 1] if ACCELERATED else [0, 0])
    monkeypatch.setattr(memctl, "_FUSED_MIN", 1 << 62)  # the chunked bulk path everywhere
    assert _write_all(_mc(mode), data) == fused
    mc = _mc(mode)
    _write_all(mc, data)
    assert mc.read(0x1000, 3 * MiB, 5, True) == data[: 3 * MiB]


@pytest.mark.parametrize("mode", list(EncryptionMode))
def test_fused_read_into_gives_the_bulk_paths_bytes(mode: EncryptionMode, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_into`` of a large encrypted range decrypts straight from the pages
    (``MemoryCipher.decrypt_from_pages``, absent pages reading as zeros): the same bytes as the
    gather and chunked bulk path, which still runs below the threshold."""
    data = random.Random(5).randbytes(4 * MiB)
    mc = _mc(mode)
    _write_all(mc, data)
    calls: list[int] = []
    real = MemoryCipher.decrypt_from_pages

    def counted(self: MemoryCipher, spa: int, pages: dict[int, bytearray], out: bytearray | memoryview) -> bool:
        taken = real(self, spa, pages, out)
        calls.append(int(taken))
        return taken

    monkeypatch.setattr(MemoryCipher, "decrypt_from_pages", counted)
    ranges = [(0x1000, 3 * MiB), (0x40_0040, 96 * KiB), (0x3F_F000, 256 * KiB), (0x60_0000, 64 * KiB - 64)]
    fused = []
    for spa, n in ranges:
        out = bytearray(n)
        mc.read_into(spa, out, 5, True)
        fused.append(bytes(out))
    assert calls == ([1, 1, 1] if ACCELERATED else [0, 0, 0])  # the three large reads asked
    assert fused[0] == data[: 3 * MiB] and fused[1] == data[3 * MiB : 3 * MiB + 96 * KiB]
    monkeypatch.setattr(memctl, "_FUSED_MIN", 1 << 62)  # the gather and bulk path everywhere
    for (spa, n), got in zip(ranges, fused, strict=True):
        out = bytearray(n)
        mc.read_into(spa, out, 5, True)
        assert bytes(out) == got


def _in_place_case(mode: EncryptionMode) -> MemoryController:
    """A controller whose DRAM holds plaintext over some pages and leaves others absent."""
    mc = _mc(mode)
    r = random.Random(6)
    mc.dram.write(0x20_0000, r.randbytes(2 * MiB))
    for pfn in (0x205, 0x2F0, 0x3FF):  # (absent pages inside the range: they read as zeros)
        mc.dram.pages_dict().pop(pfn)
    mc.dram.write(0x40_0000, r.randbytes(8 * KiB))
    return mc


@pytest.mark.parametrize("mode", list(EncryptionMode))
@pytest.mark.parametrize(("spa", "length"), [(0x20_0000, 2 * MiB), (0x40_0000, 4 * KiB), (0x40_0040, 4 * KiB),
                                             (0x20_1000, 0)])
def test_encrypt_in_place_is_read_then_encrypted_write(mode: EncryptionMode, spa: int, length: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``encrypt_in_place`` returns the range's plaintext and leaves DRAM as :meth:`read` (C=0) then
    :meth:`write` (C=1) of it do -- every mode, absent pages created, a range not page aligned; the same
    with the accelerator's one pass and without it."""
    mc = _in_place_case(mode)
    want_before = mc.read(spa, length, 0, False)
    mc.write(spa, want_before, 5, True)
    want = {k: bytes(v) for k, v in mc.dram.pages_dict().items()}
    taken: list[bool] = []
    real = MemoryCipher.encrypt_pages_in_place

    def counted(self: MemoryCipher, at: int, n: int, pages: dict[int, bytearray], **kw: bool) -> bytes | None:
        got = real(self, at, n, pages, **kw)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(MemoryCipher, "encrypt_pages_in_place", counted)
    mc = _in_place_case(mode)
    before = mc.encrypt_in_place(spa, length, 5)
    assert taken == [ACCELERATED]
    assert isinstance(before, bytes) and before == want_before
    assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == want
    assert mc.read(spa, length, 5, True) == want_before
    # hashes=True (whole pages): each page's SHA-384 of those bytes, the same DRAM
    hashes = b"".join(hashlib.sha384(want_before[i : i + PAGE]).digest() for i in range(0, length, PAGE))
    aligned = not (spa | length) % PAGE
    mc = _in_place_case(mode)
    if aligned:
        assert mc.encrypt_in_place(spa, length, 5, hashes=True) == hashes
        assert taken[-1] == ACCELERATED
        assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == want
    else:
        snapshot = {k: bytes(v) for k, v in mc.dram.pages_dict().items()}
        with pytest.raises(AlignmentError):
            mc.encrypt_in_place(spa, length, 5, hashes=True)
        assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == snapshot
    monkeypatch.setattr(MemoryCipher, "encrypt_pages_in_place", lambda *a, **k: None)  # the fallback
    mc = _in_place_case(mode)
    assert mc.encrypt_in_place(spa, length, 5) == want_before
    assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == want
    if aligned:
        mc = _in_place_case(mode)
        assert mc.encrypt_in_place(spa, length, 5, hashes=True) == hashes
        assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == want


def test_encrypt_in_place_refused_changes_nothing() -> None:
    """A range not of whole lines, outside DRAM, or of an ASID without a key: refused, DRAM as it was."""
    from sevemu.errors import AddressError, KeySlotError

    mc = _in_place_case(EncryptionMode.XEX)
    was = {k: bytes(v) for k, v in mc.dram.pages_dict().items()}
    for spa, n, asid, err in [(0x20_0020, 4 * KiB, 5, AlignmentError), (0x20_0000, 4 * KiB + 8, 5, AlignmentError),
                              (8 * MiB - 4 * KiB, 8 * KiB, 5, AddressError), (0x20_0000, 4 * KiB, 7, KeySlotError)]:
        with pytest.raises(err):
            mc.encrypt_in_place(spa, n, asid)
    assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == was


def test_encrypt_in_place_hashes_refuses_part_pages_without_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hashes`` takes whole pages on the fallback path too (no accelerator: the controller reads and
    writes itself and would otherwise hash a part page): AlignmentError, DRAM as it was."""
    monkeypatch.setattr(MemoryCipher, "encrypt_pages_in_place", lambda *a, **k: None)
    mc = _in_place_case(EncryptionMode.XEX)
    was = {k: bytes(v) for k, v in mc.dram.pages_dict().items()}
    for spa, n in [(0x40_0040, 4 * KiB), (0x40_0000, 4 * KiB + 64)]:
        with pytest.raises(AlignmentError):
            mc.encrypt_in_place(spa, n, 5, hashes=True)
    assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == was


@pytest.mark.parametrize("accelerated", [True, False])
def test_measure_in_place_refused_changes_nothing(accelerated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``measure_in_place`` checks the whole range before anything (lines, DRAM, key), with or
    without the accelerator: a refused range raises, nothing is hashed and DRAM is as it was."""
    from sevemu.crypto.sha256 import Sha256
    from sevemu.errors import AddressError, KeySlotError

    if not accelerated:
        monkeypatch.setattr(MemoryCipher, "measure_pages_in_place", lambda *a, **k: False)
    mc = _in_place_case(EncryptionMode.XEX)
    was = {k: bytes(v) for k, v in mc.dram.pages_dict().items()}
    sha = Sha256()
    empty = Sha256().digest()
    for spa, n, asid, err in [(0x20_0020, 4 * KiB, 5, AlignmentError), (0x20_0000, 4 * KiB + 8, 5, AlignmentError),
                              (8 * MiB - 4 * KiB, 8 * KiB, 5, AddressError), (0x20_0000, 4 * KiB, 7, KeySlotError)]:
        with pytest.raises(err):
            mc.measure_in_place(spa, n, asid, sha)
    assert sha.digest() == empty
    assert {k: bytes(v) for k, v in mc.dram.pages_dict().items()} == was


def test_read_run_without_c_bit_returns_dram_as_it_lies() -> None:
    """``read_run`` through C=0 is the bytes DRAM holds (no key applies), absent pages as zeros;
    through C=1 the same lines decrypted with the slot's key."""
    mc = _mc(EncryptionMode.XEX)
    plain = random.Random(8).randbytes(PAGE)
    mc.write(0x30_0000, plain, 5, True)
    raw = mc.dram.read(0x30_0000, PAGE)
    assert raw != plain
    assert bytes(mc.read_run(0x30_0040, 256, 5, False)) == raw[64:320]
    assert bytes(mc.read_run(0x30_0040, 256, 0, False)) == raw[64:320]
    assert bytes(mc.read_run(0x31_0000, 128, 5, False)) == bytes(128)  # (an absent page)
    assert bytes(mc.read_run(0x30_0040, 256, 5, True)) == plain[64:320]


@pytest.mark.parametrize("mode", list(EncryptionMode))
def test_read_pages_into_gathers_what_read_into_reads_page_by_page(mode: EncryptionMode,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages at SPAs in any order (repeated, absent, consecutive runs among them): page k of the output
    is ``read_into`` of ``spas[k]`` -- through the accelerator's gather, and through the page-by-page
    path it falls back to -- on either AES engine."""
    import numpy as np

    mc = _mc(mode)
    _write_all(mc, random.Random(5).randbytes(4 * MiB))
    r = random.Random(6)
    spas = [r.randrange(0, 8 * MiB // PAGE) * PAGE for _ in range(40)]
    spas += [0x20_0000 + k * PAGE for k in range(9)] + [spas[3], 0x7F_F000]
    column = np.array(spas, dtype=np.uint64)
    want = b"".join(mc.read(spa, PAGE, 5, True) for spa in spas)
    out = bytearray(len(want))
    mc.read_pages_into(column, out, 5)
    assert out == want
    calls: list[bool] = []
    real = MemoryCipher.decrypt_pages_gather

    def declined(self: MemoryCipher, pfns: object, pages: dict[int, bytearray], o: object) -> bool:
        calls.append(real(self, pfns, pages, bytearray(len(want))))  # type: ignore[arg-type]
        return False

    monkeypatch.setattr(MemoryCipher, "decrypt_pages_gather", declined)
    out = bytearray(len(want))
    mc.read_pages_into(column, out, 5)
    assert out == want and calls == [ACCELERATED]


@pytest.mark.parametrize("gather", [True, False])
def test_read_pages_into_refuses_before_writing(gather: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An SPA that is not page-aligned (named in the error), a page past DRAM or a wrong output size:
    refused, the output untouched, with the accelerator's gather and on the page-by-page path; an
    empty list reads nothing."""
    import numpy as np

    from sevemu.errors import AddressError, InputError

    if not gather:
        monkeypatch.setattr(MemoryCipher, "decrypt_pages_gather", lambda *args: False)
    mc = _mc(EncryptionMode.XEX)
    out = bytearray(b"\x5a" * 2 * PAGE)
    for spas, error, match in (([0x1000, 0x2040], AlignmentError, "0x2040"),
                               ([0x1000, 8 * MiB], AddressError, "outside DRAM"),
                               ([0x1000], InputError, "for 1 pages")):
        with pytest.raises(error, match=match):
            mc.read_pages_into(np.array(spas, dtype=np.uint64), out, 5)
        assert out == b"\x5a" * 2 * PAGE
    mc.read_pages_into(np.zeros(0, dtype=np.uint64), bytearray(), 5)


@pytest.mark.parametrize("mode", list(EncryptionMode))
@pytest.mark.parametrize("scatter", [True, False])
def test_write_pages_is_write_page_by_page(mode: EncryptionMode, scatter: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages to SPAs in any order (consecutive runs, a repeated page whose last copy wins, absent and
    present pages, an all-zero plaintext): the DRAM pages ``write`` leaves page by page -- through the
    accelerator's scatter and through the page-by-page path it falls back to; the refusals write
    nothing."""
    import numpy as np

    from sevemu.errors import AddressError, InputError

    r = random.Random(8)
    distinct = r.sample(range(8 * MiB // PAGE - 1), 30)
    spas = [p * PAGE for p in distinct] + [0x20_0000 + k * PAGE for k in range(5) if 0x200 + k not in distinct]
    spas.append(0x7F_F000)
    ref, lean = _mc(mode), _mc(mode)
    base = random.Random(9).randbytes(4 * MiB)
    _write_all(ref, base)
    _write_all(lean, base)
    calls: list[bool] = []
    real = MemoryCipher.encrypt_pages_scatter

    def counted(self: MemoryCipher, pfns: np.ndarray, src: object, pages: dict[int, bytearray]) -> bool:
        taken = real(self, pfns, src, pages) if scatter else False  # type: ignore[arg-type]
        calls.append(taken)
        return taken

    monkeypatch.setattr(MemoryCipher, "encrypt_pages_scatter", counted)
    for written in (spas, [spas[2], spas[7], spas[2]]):  # (the second: a repeat, written in order)
        data = bytearray(r.randbytes(PAGE * len(written)))
        data[PAGE : 2 * PAGE] = bytes(PAGE)
        lean.write_pages(np.array(written, dtype=np.uint64), data, 5)
        for k, spa in enumerate(written):
            ref.write(spa, data[k * PAGE : (k + 1) * PAGE], 5, True)
        assert lean.dram.pages_dict() == ref.dram.pages_dict()
    assert calls == [scatter and ACCELERATED, False]
    lean.write_pages(np.zeros(0, dtype=np.uint64), b"", 9)  # nothing to write: not even a key needed
    before = {k: bytes(v) for k, v in lean.dram.pages_dict().items()}
    for bad, error in (([0x1000, 0x2040], AlignmentError), ([0x1000, 8 * MiB], AddressError),
                       ([0x1000], InputError)):
        with pytest.raises(error):
            lean.write_pages(np.array(bad, dtype=np.uint64), bytes(2 * PAGE), 5)
        assert {k: bytes(v) for k, v in lean.dram.pages_dict().items()} == before
