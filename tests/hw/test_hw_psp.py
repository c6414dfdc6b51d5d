"""The PSP as a device: mailbox register protocol, its private ports, its DMA view of memory."""

from __future__ import annotations

import random

import pytest
from hwkit import MEM_ACCEL_MODES, make_soc, mem_accel

from sevemu.abi.mailbox import (
    CMDRESP_RESP,
    INTSTS_CMD_COMPLETE,
    MailboxReg,
    PspCapability,
    decode_status,
    encode_cmdresp,
    is_response,
)
from sevemu.abi.status import Status
from sevemu.errors import AddressError, AlignmentError, KeySlotError
from sevemu.hw.soc import Soc


class Recorder:
    def __init__(self, status: int = 0) -> None:
        self.calls: list[tuple[int, int]] = []
        self.status = status

    def handle(self, command: int, buffer_paddr: int) -> int:
        self.calls.append((command, buffer_paddr))
        return self.status


def test_mailbox_protocol(soc: Soc) -> None:
    psp = soc.psp
    fw = Recorder(status=int(Status.INVALID_GUEST))
    psp.install(fw)
    assert psp.mmio_read(MailboxReg.FEATURE) == PspCapability.SEV
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, 0x8_1234_5000 & 0xFFFFFFFF)
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, 0x8)
    assert fw.calls == []  # address registers alone do nothing
    psp.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(0x21))
    assert fw.calls == [(0x21, 0x8_1234_5000)]
    reg = psp.mmio_read(MailboxReg.CMDRESP)
    assert is_response(reg) and decode_status(reg) == Status.INVALID_GUEST
    assert reg == CMDRESP_RESP | Status.INVALID_GUEST
    assert psp.mmio_read(MailboxReg.INTSTS) & INTSTS_CMD_COMPLETE
    assert psp.commands == 1
    # software acknowledging (RESP set) is not a new command
    psp.mmio_write(MailboxReg.CMDRESP, reg)
    assert psp.commands == 1 and len(fw.calls) == 1
    # registers are 32 bits wide
    psp.mmio_write(MailboxReg.INTEN, 0x1_FFFF_FFFF)
    assert psp.mmio_read(MailboxReg.INTEN) == 0xFFFF_FFFF


def test_no_firmware_answers_invalid_command(soc: Soc) -> None:
    psp = soc.psp
    psp.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(0x01))
    assert decode_status(psp.mmio_read(MailboxReg.CMDRESP)) == Status.INVALID_COMMAND


@pytest.mark.parametrize("offset", [0, 0x10984, 0x109E8, 0x10580, -4])
def test_unknown_register_offsets(soc: Soc, offset: int) -> None:
    with pytest.raises(AddressError):
        soc.psp.mmio_read(offset)
    with pytest.raises(AddressError):
        soc.psp.mmio_write(offset, 1)


def test_ports_are_handed_out_once_and_the_key_port_only_to_the_psp(soc: Soc) -> None:
    ports = soc.psp.take_ports()
    assert ports.profile is soc.profile
    with pytest.raises(AddressError):
        soc.psp.take_ports()
    with pytest.raises(KeySlotError):
        soc.mc.secure_port()
    assert ports.flush_epoch() == 0
    soc.wbinvd_all()
    assert ports.flush_epoch() == len(soc.cores)
    assert len(ports.trng(32)) == 32


def test_encrypted_reads_into_a_buffer_are_encrypted_reads() -> None:
    """``read_encrypted_into``: the bytes of ``read_encrypted`` (DRAM decrypted with the ASID's key,
    the caches not looked at) in the caller's buffer; no key, unaligned or outside DRAM: refused."""
    soc = make_soc()
    ports = soc.psp.take_ports()
    dma = ports.dma
    ports.keys.load(200, bytes(range(16)))
    image = bytes((i * 7 + 3) & 0xFF for i in range(3 * 4096))
    dma.write_encrypted(0x5000, image, 200)
    soc.cache.write(200, True, 0x6000, b"a newer line the PSP must not see" + bytes(31))
    out = bytearray(3 * 4096)
    dma.read_encrypted_into(0x5000, memoryview(out), 200)
    assert out == dma.read_encrypted(0x5000, 3 * 4096, 200) == image
    with pytest.raises(KeySlotError):
        dma.read_encrypted_into(0x5000, bytearray(64), 201)
    with pytest.raises(AlignmentError):
        dma.read_encrypted_into(0x5010, bytearray(64), 200)
    with pytest.raises(AddressError):
        dma.read_encrypted_into(soc.dram.size - 64, bytearray(128), 200)


def test_dma_view_is_coherent_with_host_c0_lines_only() -> None:
    soc = make_soc()
    ports = soc.psp.take_ports()
    dma = ports.dma
    ports.keys.load(200, bytes(16))
    soc.boot_cpu.host_write(0x2000, b"command buffer in the host's cache")
    assert soc.dram.read(0x2000, 8) == bytes(8)
    assert dma.read(0x2000, 34) == b"command buffer in the host's cache"  # snooped
    # a DMA write invalidates the host's copy (after writing it back)
    dma.write(0x2008, b"FIRMWARE")
    assert soc.cache.peek(0, False, 0x2000) is None
    assert soc.boot_cpu.host_read(0x2000, 16) == b"command FIRMWARE"
    # encrypted accesses bypass the caches
    soc.cache.write(200, True, 0x3000, b"guest line still in the cache!!!" * 2)
    assert dma.cached_lines(200, True, 0x3000, 4096) == 1
    assert dma.read_encrypted(0x3000, 64, 200) != b"guest line still in the cache!!!" * 2
    dma.write_encrypted(0x4000, b"x" * 64, 200)
    assert soc.dram.read(0x4000, 64) != b"x" * 64
    assert soc.cache.read(200, True, 0x4000, 64) == b"x" * 64
    # the C-bit is stripped from addresses software hands the firmware
    assert dma.strip(0x4000 | soc.profile.cbit_mask) == (0x4000, True)
    assert dma.strip(0x4000) == (0x4000, False)
    with pytest.raises(AddressError):
        dma.read(soc.dram.size - 8, 16)
    with pytest.raises(AddressError):
        dma.check(soc.dram.size, 1)


@pytest.mark.parametrize("accel", MEM_ACCEL_MODES)
@pytest.mark.parametrize("dirty_lines", [3, 2000])
def test_dma_reads_merge_every_dirty_host_line_of_the_range(dirty_lines: int, accel: bool) -> None:
    """The PSP's coherent read sees each of the host's dirty lines of its range (found by looking up
    each address or by visiting the dirty lines, in Python or in C) and nothing outside it."""
    soc = make_soc()
    dma = soc.psp.take_ports().dma
    rng = random.Random(dirty_lines)
    model = bytearray(1 << 20)
    with mem_accel(accel):
        for _ in range(dirty_lines):
            spa = rng.randrange(0, len(model) - 64, 8)
            data = rng.randbytes(8)
            soc.boot_cpu.host_write(spa, data)
            model[spa : spa + 8] = data
        for _ in range(40):
            spa = rng.randrange(0, len(model) - 1)
            length = min(rng.choice([1, 100, 4096, 300_000]), len(model) - spa)
            assert dma.read(spa, length) == bytes(model[spa : spa + length])
            out = bytearray(length)
            dma.read_into(spa, out)
            assert out == model[spa : spa + length]


@pytest.mark.parametrize("length", [4096, 2 * 4096])
def test_zero_encrypted_is_evict_then_encrypted_zeros(length: int) -> None:
    """``zero_encrypted`` (the firmware's ZERO page): the same DRAM and the same cache as ``evict`` of
    the range followed by ``write_encrypted`` of zeros -- the host's dirty lines written back and
    dropped first; a range outside DRAM changes nothing, an ASID without a key writes no zeros (the
    host's line is at most written back, as by ``evict``)."""
    worlds = []
    for lean in (True, False):
        soc = make_soc()
        ports = soc.psp.take_ports()
        dma = ports.dma
        ports.keys.load(200, bytes(range(16)))
        soc.boot_cpu.host_write(0x5000, b"stale host plaintext" * 3)
        soc.boot_cpu.host_write(0x5000 + length - 64, b"last line" * 7)
        if lean:
            dma.zero_encrypted(0x5000, length, 200)
        else:
            dma.evict(0x5000, length)
            dma.write_encrypted(0x5000, bytes(length), 200)
        assert dma.read_encrypted(0x5000, length, 200) == bytes(length)
        worlds.append((soc.dram.read(0x4000, length + 2 * 4096), dma.cached_lines(0, False, 0x5000, length)))
    assert worlds[0] == worlds[1] and worlds[0][1] == 0
    soc = make_soc()
    ports = soc.psp.take_ports()
    ports.keys.load(200, bytes(range(16)))
    soc.boot_cpu.host_write(0x5000, b"kept")
    before = soc.dram.read(0x5000, 4096)
    with pytest.raises(AddressError):
        ports.dma.zero_encrypted(soc.dram.size - 4096, 2 * 4096, 200)
    assert soc.boot_cpu.host_read(0x5000, 4) == b"kept"
    assert soc.dram.read(0x5000, 4096) == before
    with pytest.raises(KeySlotError):
        ports.dma.zero_encrypted(0x5000, 4096, 201)
    assert soc.boot_cpu.host_read(0x5000, 4) == soc.dram.read(0x5000, 4) == b"kept"


def test_dma_fill_pages_is_dma_write_in_place() -> None:
    """``fill_pages``: every run checked first, the host's lines of each written back and dropped
    (as ``write`` does), then the filler writes DRAM's pages in place -- the same memory as
    ``write`` of those bytes; a refused run changes nothing."""
    soc, ref = make_soc(), make_soc()
    data = random.Random(7).randbytes(3 * 4096)
    for s in (soc, ref):
        s.boot_cpu.host_write(0x5010, b"host line, dirty")  # (a dirty host line inside a run)
        s.boot_cpu.host_write(0x8000, b"next page")
    ref.psp.take_ports().dma.write(0x5000, data[:8192])
    dma = soc.psp.take_ports().dma

    def fill(pages: dict[int, bytearray]) -> None:
        for i, pfn in enumerate((5, 6)):
            page = pages.setdefault(pfn, bytearray(4096))
            page[:] = data[i * 4096 : (i + 1) * 4096]

    dma.fill_pages([(0x5000, 0x2000)], fill)
    assert soc.cache.peek(0, False, 0x5000) is None
    for s in (soc, ref):
        assert s.boot_cpu.host_read(0x5000, 8192) == data[:8192]
        assert s.boot_cpu.host_read(0x8000, 9) == b"next page"
        s.boot_cpu.wbinvd()
    assert soc.dram.read(0x4000, 5 * 4096) == ref.dram.read(0x4000, 5 * 4096)
    called: list[int] = []
    for runs in ([(0x5000, 0x2000), (0x7010, 0x1000)], [(0x5000, 0x1000), (soc.dram.size - 4096, 8192)]):
        soc.boot_cpu.host_write(0x5010, b"dirty again")
        with pytest.raises(AddressError):
            dma.fill_pages(runs, lambda pages: called.append(1))
        assert not called and soc.cache.peek(0, False, 0x5000) is not None  # nothing flushed


@pytest.mark.parametrize("in_c", [True, False])
def test_dma_write_rows_is_dma_write_of_the_span_read_back(monkeypatch: pytest.MonkeyPatch, in_c: bool) -> None:
    """``write_rows``: rows written in place at a stride, the bytes between them untouched -- the
    same memory, and the same host lines written back and dropped, as ``write`` of the span with
    those bytes read back first (across a page boundary, into an absent page, over a dirty host
    line between two rows); a row that would cross a page is declined (False) with nothing done,
    a range outside DRAM refused before anything is flushed.  The rows stored by the C helper
    (``dram_scatter_rows``) or row by row in numpy."""
    import numpy as np

    from sevemu.hw import memaccel

    if in_c and not memaccel.COLUMNS:
        pytest.skip("the C helpers were not built")
    monkeypatch.setattr(memaccel, "COLUMNS", in_c)
    soc, ref = make_soc(), make_soc()
    rng = random.Random(11)
    rows = np.frombuffer(rng.randbytes(70 * 52), dtype=np.uint8).reshape(70, 52)
    spa, stride = 0x5000 + 62 * 64, 64  # rows 0-1 in one page, the rest in the next two (absent)
    for s in (soc, ref):
        s.dram.write(0x5000, b"\x5a" * 4096)
        s.boot_cpu.host_write(spa + 52, b"between rows")  # (a dirty host line: its gap bytes kept)
        s.boot_cpu.host_write(0x8000, b"after the span")
    span = stride * 69 + 52
    ref_dma = ref.psp.take_ports().dma
    back = bytearray(ref_dma.read(spa, span) + bytes(12))
    for i in range(70):
        back[i * stride : i * stride + 52] = rows[i].tobytes()
    ref_dma.write(spa, bytes(back[:span]))
    dma = soc.psp.take_ports().dma
    assert dma.write_rows(spa, stride, rows)
    assert soc.cache.peek(0, False, spa) is None and soc.cache.peek(0, False, 0x8000) is not None
    for s in (soc, ref):
        assert s.boot_cpu.host_read(spa, span) == ref.boot_cpu.host_read(spa, span)
        s.boot_cpu.wbinvd()
    assert soc.dram.read(0x4000, 5 * 4096) == ref.dram.read(0x4000, 5 * 4096)
    before = soc.dram.read(0x4000, 5 * 4096)
    soc.boot_cpu.host_write(0x5010, b"dirty again")
    assert not dma.write_rows(0x5000 + 40, 48, rows[:3, :40])  # (48 does not divide a page)
    assert not dma.write_rows(0x5000 + 32, 64, rows[:3])  # (not a multiple of the stride)
    with pytest.raises(AddressError):
        dma.write_rows(soc.dram.size - 64, 64, rows[:3])
    assert soc.cache.peek(0, False, 0x5000) is not None and soc.dram.read(0x4000, 5 * 4096) == before


def test_dma_read_pages_only_without_dirty_host_lines() -> None:
    """``read_pages`` hands DRAM's pages to the reader only when no host line of the runs is dirty
    (what a coherent read returns is then DRAM's bytes); with one it reads nothing (None)."""
    soc = make_soc()
    dma = soc.psp.take_ports().dma
    soc.dram.write(0x5000, b"packet" * 100)
    seen: list[bytes] = []

    def use(pages: dict[int, bytearray]) -> int:
        seen.append(bytes(pages[5][:6]))
        return 7

    assert dma.read_pages([(0x5000, 0x1000), (0x9000, 0x1000)], use) == 7 and seen == [b"packet"]
    soc.boot_cpu.host_write(0x9100, b"dirty")
    assert dma.read_pages([(0x5000, 0x1000), (0x9000, 0x1000)], use) is None and len(seen) == 1
    with pytest.raises(AddressError):
        dma.read_pages([(0x5010, 0x1000)], use)


def test_dma_page_lists_are_the_per_page_transfers() -> None:
    """``evict_pages`` + ``write_encrypted_pages`` of pages in any order (runs among them, a dirty host
    line inside one, a repeated page: the last one written wins) leave the memory and the cache that
    ``evict`` + ``write_encrypted`` page by page leave; ``read_encrypted_pages_into`` reads them back;
    a misaligned SPA or a page past DRAM is refused before any line is flushed or written."""
    import numpy as np

    rng = random.Random(21)
    spas = [0x9000, 0x5000, 0x6000, 0x7000, 0x20000, 0x9000, 0x3000]
    data = rng.randbytes(4096 * len(spas))
    worlds = []
    for lean in (True, False):
        soc = make_soc()
        ports = soc.psp.take_ports()
        ports.keys.load(200, bytes(range(16)))
        soc.boot_cpu.host_write(0x6010, b"host line, dirty")
        soc.boot_cpu.host_write(0x8000, b"next page")
        dma = ports.dma
        if lean:
            column = np.array(spas, dtype=np.uint64)
            dma.evict_pages(column)
            dma.write_encrypted_pages(column, data, 200)
        else:
            for k, spa in enumerate(spas):
                dma.evict(spa, 4096)
                dma.write_encrypted(spa, data[k * 4096 : (k + 1) * 4096], 200)
        back = bytearray(len(data))
        dma.read_encrypted_pages_into(np.array(spas, dtype=np.uint64), back, 200)
        last = {spa: data[k * 4096 : (k + 1) * 4096] for k, spa in enumerate(spas)}
        assert back == b"".join(last[spa] for spa in spas)
        worlds.append((soc.dram.read(0, 0x30000), dma.cached_lines(0, False, 0x6000, 4096),
                       soc.boot_cpu.host_read(0x8000, 9)))
    assert worlds[0] == worlds[1] and worlds[0][1] == 0 and worlds[0][2] == b"next page"
    soc = make_soc()
    ports = soc.psp.take_ports()
    ports.keys.load(200, bytes(range(16)))
    soc.boot_cpu.host_write(0x5010, b"dirty")
    before = soc.dram.read(0, 0x10000)
    for bad, error in (([0x5000, 0x6040], AlignmentError), ([0x5000, soc.dram.size], AddressError)):
        with pytest.raises(error):
            ports.dma.evict_pages(np.array(bad, dtype=np.uint64))
        with pytest.raises(error):
            ports.dma.write_encrypted_pages(np.array(bad, dtype=np.uint64), bytes(8192), 200)
        assert soc.cache.peek(0, False, 0x5000) is not None and soc.dram.read(0, 0x10000) == before
