"""CMOS RAM and the RTC (devices/cmos.py): QEMU's memory-size bytes, which OVMF reads when fw_cfg has
no e820 table, and a clock running on virtual time."""

from __future__ import annotations

import datetime

import pytest

from sevemu._util.units import GiB, MiB
from sevemu.hypervisor.devices import DeviceBus, cmos_memory_bytes, install_pc
from sevemu.hypervisor.devices.clock import NS_PER_S


def cmos(b: DeviceBus, index: int) -> int:
    b.io_write(0x70, 1, index)
    return b.io_read(0x71, 1)


def pc(ram: int, chipset: str = "q35", cpus: int = 1, **kw: int) -> DeviceBus:
    b = DeviceBus()
    install_pc(b, ram=ram, chipset=chipset, cpus=cpus, **kw)  # type: ignore[arg-type]
    return b


def ovmf_low_memory(b: DeviceBus) -> int:
    """PlatformGetSystemMemorySizeBelow4gb's CMOS fallback."""
    return ((cmos(b, 0x35) << 8) + cmos(b, 0x34) << 16) + 16 * MiB


def ovmf_high_memory(b: DeviceBus) -> int:
    """PlatformGetSystemMemorySizeAbove4gb."""
    size = 0
    for i in (0x5D, 0x5C, 0x5B):
        size = (size << 8) + cmos(b, i)
    return size << 16


@pytest.mark.parametrize("ram,chipset,low,high", [
    (256 * MiB, "q35", 256 * MiB, 0),
    (2 * GiB, "q35", 2 * GiB, 0),
    (6 * GiB, "q35", 2 * GiB, 4 * GiB),
    (4 * GiB, "i440fx", 3 * GiB, 1 * GiB),
])
def test_ovmf_reads_the_ram_size_qemu_wrote(ram: int, chipset: str, low: int, high: int) -> None:
    b = pc(ram, chipset)
    assert ovmf_low_memory(b) == low and ovmf_high_memory(b) == high


def test_legacy_size_bytes() -> None:
    m = cmos_memory_bytes(256 * MiB, 0, 4)
    assert (m[0x15], m[0x16]) == (640 & 0xFF, 640 >> 8)  # base memory 640 KiB
    assert (m[0x17], m[0x18]) == (m[0x30], m[0x31]) == (0xFF, 0xFF)  # 255 MiB in KiB: capped at 65535
    small = cmos_memory_bytes(32 * MiB, 0, 1)
    ext = 31 * 1024  # KiB above 1 MiB
    assert (small[0x17], small[0x18]) == (small[0x30], small[0x31]) == (ext & 0xFF, ext >> 8)
    assert (m[0x34], m[0x35]) == (0x00, 0x0F)  # 240 MiB / 64 KiB = 0x0F00
    assert m[0x5F] == 3 and m[0x14] == 0x06
    big = cmos_memory_bytes(6 * GiB, 0, 1)
    assert (big[0x34], big[0x35]) == (0xFF, 0xFF)  # capped at 65535 units
    tiny = cmos_memory_bytes(8 * MiB, 0, 1)
    assert (tiny[0x34], tiny[0x35]) == (0, 0)


def test_rtc_reads_bcd_time_that_runs_on_virtual_time() -> None:
    base = int(datetime.datetime(2026, 3, 14, 15, 9, 26, tzinfo=datetime.UTC).timestamp())
    b = pc(64 * MiB, rtc_base=base)
    assert cmos(b, 0x0B) == 0x02 and cmos(b, 0x0A) == 0x26 and cmos(b, 0x0D) == 0x80
    assert [cmos(b, i) for i in (0x09, 0x08, 0x07, 0x04, 0x02, 0x00, 0x32)] == \
        [0x26, 0x03, 0x14, 0x15, 0x09, 0x26, 0x20]
    assert cmos(b, 0x06) == 7  # Saturday (Sunday is 1)
    b.clock.advance(40 * NS_PER_S)
    assert (cmos(b, 0x02), cmos(b, 0x00)) == (0x10, 0x06)


def test_rtc_set_time_and_binary_mode() -> None:
    b = pc(64 * MiB)
    b.io_write(0x70, 1, 0x04)
    b.io_write(0x71, 1, 0x23)  # hour 23 (BCD)
    assert cmos(b, 0x04) == 0x23
    b.io_write(0x70, 1, 0x0B)
    b.io_write(0x71, 1, 0x06)  # binary, 24 h
    assert cmos(b, 0x04) == 23


def test_index_port_status_registers_and_nmi_bit() -> None:
    b = pc(64 * MiB)
    assert b.io_read(0x70, 1) == 0xFF
    b.io_write(0x70, 1, 0x80 | 0x0F)  # NMI disabled, index 0x0F (shutdown status)
    b.io_write(0x71, 1, 0xFE)
    assert cmos(b, 0x0F) == 0xFE  # OVMF's S3 resume check reads it back
    b.io_write(0x70, 1, 0x0C)
    b.io_write(0x71, 1, 0xFF)  # register C is read-only
    assert cmos(b, 0x0C) == 0
    b.io_write(0x70, 1, 0x40)
    b.io_write(0x71, 1, 0x5A)
    assert cmos(b, 0x40) == 0x5A
    b.reset()
    assert cmos(b, 0x40) == 0 and cmos(b, 0x34) == cmos_memory_bytes(64 * MiB, 0, 1)[0x34]
