"""The local APIC page (devices/lapic.py) and the legacy ports (devices/legacy.py): what SEC and PEI
write -- SVR, LVT timer, initial count, INIT-SIPI-SIPI, PIC masks -- and what they read back."""

from __future__ import annotations

import pytest

from sevemu._util.units import MiB
from sevemu.errors import InputError
from sevemu.hypervisor.devices import LAPIC_BASE, DeviceBus, Ipi, install_pc


def pc() -> DeviceBus:
    b = DeviceBus()
    install_pc(b, ram=64 * MiB)
    return b


def lapic_r(b: DeviceBus, reg: int) -> int:
    return b.mmio_read(LAPIC_BASE + reg, 4)


def lapic_w(b: DeviceBus, reg: int, v: int) -> None:
    b.mmio_write(LAPIC_BASE + reg, 4, v)


def test_reset_values() -> None:
    b = pc()
    assert lapic_r(b, 0x20) == 0 and lapic_r(b, 0x30) == 0x0005_0014
    assert lapic_r(b, 0xF0) == 0xFF and lapic_r(b, 0xE0) == 0xFFFF_FFFF
    assert all(lapic_r(b, r) == 0x10000 for r in (0x320, 0x350, 0x360, 0x370))
    assert lapic_r(b, 0x390) == 0


def test_sec_initialize_apic_timer_then_count_down() -> None:
    b = pc()
    lapic_w(b, 0xF0, 0x1FF)  # SVR: software enable, spurious vector 0xFF
    lapic_w(b, 0x3E0, 0x0B)  # divide by 1
    lapic_w(b, 0x320, 0x10000 | 0x20)  # one-shot, masked (SEC leaves it masked)
    lapic_w(b, 0x380, 1_000_000)
    c0 = lapic_r(b, 0x390)
    b.clock.advance(10_000)  # 10 µs at the 1 GHz bus: 10,000 counts, plus the read's own access step
    c1 = lapic_r(b, 0x390)
    assert c0 - c1 == 10_000 + b.clock.access_ns
    b.clock.advance(10_000_000)
    assert lapic_r(b, 0x390) == 0 and b.devices["lapic"].timer_expiries == 1  # type: ignore[attr-defined]


def test_divide_and_periodic() -> None:
    b = pc()
    lapic_w(b, 0xF0, 0x100)
    lapic_w(b, 0x3E0, 0x03)  # divide by 16
    lapic_w(b, 0x320, 1 << 17 | 0x30)  # periodic
    lapic_w(b, 0x380, 100)
    start = b.clock.ns
    b.clock.advance(16 * 250 - (b.clock.ns - start))
    assert 0 < lapic_r(b, 0x390) <= 100  # reloaded, not stuck at 0
    assert b.devices["lapic"].timer_expiries >= 2  # type: ignore[attr-defined]


def test_lvt_masked_while_software_disabled() -> None:
    b = pc()
    lapic_w(b, 0x320, 0x20)  # SVR.APIC_EN is clear: the mask bit stays set
    assert lapic_r(b, 0x320) == 0x10020
    lapic_w(b, 0x20, 0x12345678)  # the ID register is read-only here
    assert lapic_r(b, 0x20) == 0


def test_init_sipi_sipi_is_recorded() -> None:
    b = pc()
    lapic_w(b, 0x310, 0)
    lapic_w(b, 0x300, 0x000C4500)  # INIT, all excluding self, assert
    lapic_w(b, 0x300, 0x000C4600 | 0x9F)  # STARTUP, vector 0x9F (AP start at 0x9F000)
    lapic_w(b, 0x300, 0x000C4600 | 0x9F)
    ipis = b.devices["lapic"].ipis  # type: ignore[attr-defined]
    assert ipis == [Ipi(0, 0, 5, 3, True), Ipi(0, 0x9F, 6, 3, True), Ipi(0, 0x9F, 6, 3, True)]
    assert not lapic_r(b, 0x300) & 1 << 12  # delivery status: idle


def test_unaligned_and_narrow_lapic_accesses() -> None:
    b = pc()
    assert b.mmio_read(LAPIC_BASE + 0xF4, 4) == 0
    assert b.mmio_read(LAPIC_BASE + 0xF0, 1) == 0xFF  # a byte read is split, its dword read whole
    b.mmio_write(LAPIC_BASE + 0xF4, 4, 1)


def test_pic_init_and_masks() -> None:
    b = pc()
    for port, v in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01)):  # ICW1..ICW4, master
        b.io_write(port, 1, v)
    b.io_write(0x21, 1, 0xFF)  # OCW1: mask all
    b.io_write(0xA1, 1, 0xFF)
    assert b.io_read(0x21, 1) == 0xFF and b.io_read(0xA1, 1) == 0xFF
    master = b.devices["pic-master"]
    assert master.icw == [0x11, 0x08, 0x04, 0x01]  # type: ignore[attr-defined]
    assert b.io_read(0x20, 1) == 0  # nothing requested or in service
    b.io_write(0x4D0, 1, 0xFF)
    assert b.io_read(0x4D0, 1) == 0xF8  # IRQ 0-2 are edge-triggered only


def test_debug_ports_record_and_debugcon_is_detectable() -> None:
    b = pc()
    assert b.io_read(0x402, 1) == 0xE9  # PlatformDebugLibIoPort's detection
    for ch in b"PEI\n":
        b.io_write(0x402, 1, ch)
    b.io_write(0x80, 1, 0x10)
    b.io_write(0x80, 1, 0x20)
    assert b.devices["debugcon"].data == b"PEI\n"  # type: ignore[attr-defined]
    assert b.devices["post"].data == b"\x10\x20"  # type: ignore[attr-defined]
    assert b.io_read(0x80, 1) == 0xFF
    quiet = DeviceBus()
    install_pc(quiet, ram=64 * MiB, with_debugcon=False)
    assert quiet.io_read(0x402, 1) == 0xFF


def test_port92_a20_and_reset_request() -> None:
    b = pc()
    b.io_write(0x92, 1, b.io_read(0x92, 1) | 2)  # IoOr8 (0x92, BIT1): A20 on
    assert b.io_read(0x92, 1) == 2 and not b.requests
    b.io_write(0x92, 1, 3)
    assert b.requests == ["reset: port 0x92 <- 0x03"]


def test_touched_lists_what_the_guest_used() -> None:
    b = pc()
    b.io_write(0x70, 1, 0x34)
    b.io_read(0x71, 1)
    lapic_w(b, 0xF0, 0x1FF)
    b.io_read(0x60, 1)
    assert b.touched() == {"cmos": 2, "lapic": 1, "unassigned": 1}


def test_summary_for_the_timeline() -> None:
    b = pc()
    b.io_write(0x80, 1, 1)
    b.io_read(0x60, 1)
    b.io_read(0x60, 1)
    b.io_write(0x92, 1, 1)
    out = b.summary()
    assert out["devices"] == {"post": {"reads": 0, "writes": 1}, "port92": {"reads": 0, "writes": 1}}
    assert out["unassigned"] == {"0x60": 2} and out["requests"] == ["reset: port 0x92 <- 0x01"]
    assert out["virtual_ns"] == 4 * b.clock.access_ns


def test_apic_base_msr_says_bsp_and_moves_the_page() -> None:
    b = pc()
    assert b.msr_read(0x1B) == 0xFEE0_0900  # base, enable (bit 11), BSP (bit 8): what PeiMpLib checks
    assert b.msr_read(0x1C) is None and not b.msr_write(0x1C, 1)  # MSRs no device owns: the hypervisor's
    assert b.msr_write(0x1B, 0xFEF0_0800)  # move the page (the BSP bit is read-only)
    assert b.msr_read(0x1B) == 0xFEF0_0900
    assert not b.decodes(LAPIC_BASE) and b.mmio_read(0xFEF0_0030, 4) == 0x0005_0014
    b.msr_write(0x1B, 0xFEF0_0000)  # disabled: no page at all
    assert not b.decodes(0xFEF0_0000)
    with pytest.raises(InputError):
        b.map_msr(b.devices["lapic"], 0x1B)
