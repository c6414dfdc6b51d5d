"""The ACPI PM timer on the virtual clock (devices/acpi_pm.py, devices/clock.py): its rate, that
every read moves it, and that OVMF's MicroSecondDelay loop ends after bounded guest work."""

from __future__ import annotations

import itertools

import pytest

from sevemu.errors import InputError
from sevemu.hypervisor.devices import PM_TIMER_HZ, DeviceBus, VirtualClock, install_pc, pm_timer_ticks

PMBASE = 0x600  # OVMF's ICH9_PMBASE_VALUE
BIT22, BIT23 = 1 << 22, 1 << 23


def _pc(chipset: str = "q35") -> tuple[DeviceBus, int]:
    bus = DeviceBus()
    install_pc(bus, ram=256 << 20, chipset=chipset)  # type: ignore[arg-type]
    if chipset == "q35":
        cfg, base, ctl, en = 0x8000F800, PMBASE, 0x44, 0x80
    else:
        cfg, base, ctl, en = 0x80000B00, 0xB000, 0x80, 0x01
    bus.io_write(0xCF8, 4, cfg | 0x40)
    bus.io_write(0xCFC, 4, base)
    bus.io_write(0xCF8, 4, cfg | ctl)
    bus.io_write(0xCFC, 1, en)
    return bus, base


def _tick(bus: DeviceBus, chipset_cfg: int = 0x8000F800) -> int:
    """InternalAcpiGetTimerTick of BaseRomAcpiTimerLib: the host bridge ID and PMBA from config
    space, then the 32-bit timer read -- every tick."""
    bus.io_write(0xCF8, 4, 0x80000000)
    assert bus.io_read(0xCFE, 2) == 0x29C0
    bus.io_write(0xCF8, 4, chipset_cfg | 0x40)
    pmba = bus.io_read(0xCFC, 4) & ~1
    return bus.io_read(pmba + 8, 4)


def _micro_second_delay(bus: DeviceBus, us: int) -> int:
    """OvmfPkg AcpiTimerLib InternalAcpiDelay for ``us`` microseconds; returns the timer reads."""
    delay = us * PM_TIMER_HZ // 1_000_000
    times = delay >> 22
    delay &= BIT22 - 1
    reads = 0
    while True:
        ticks = (_tick(bus) + delay) & 0xFFFFFFFF
        reads += 1
        delay = BIT22
        while True:
            reads += 1
            if (ticks - _tick(bus)) & BIT23:
                break
            assert reads < 10_000, "the delay loop does not end"
        if times == 0:
            break
        times -= 1
    return reads


def test_rate_is_3_579545_mhz_of_virtual_time_24_bits() -> None:
    assert pm_timer_ticks(1_000_000_000) == PM_TIMER_HZ
    assert pm_timer_ticks(10 * 1_000_000_000) == (10 * PM_TIMER_HZ) & 0xFFFFFF  # wraps at 24 bits
    bus, base = _pc()
    t0, ns0 = bus.io_read(base + 8, 4), bus.clock.ns
    bus.clock.advance(1_000_000)  # 1 ms of guest work
    t1, ns1 = bus.io_read(base + 8, 4), bus.clock.ns
    assert (t1 - t0) & 0xFFFFFF == pm_timer_ticks(ns1) - pm_timer_ticks(ns0)
    assert abs((t1 - t0) - 3580) <= 8 and t1 < 1 << 24


def test_every_read_sees_the_timer_move() -> None:
    bus, base = _pc()
    values = [bus.io_read(base + 8, 4) for _ in range(200)]
    steps = [(b - a) & 0xFFFFFF for a, b in itertools.pairwise(values)]  # modulo the 24 bits
    assert min(steps) > 0
    assert max(steps) <= (bus.clock.max_poll_ns + bus.clock.access_ns) * PM_TIMER_HZ // 10**9 + 1
    assert max(steps) < BIT23 // 8  # far below half a period: a delay loop never misreads a wrap


def test_other_device_activity_ends_a_polling_streak() -> None:
    bus, base = _pc()
    for _ in range(20):
        bus.io_read(base + 8, 4)
    fast = (bus.io_read(base + 8, 4) - bus.io_read(base + 8, 4)) & 0xFFFFFF
    fast = 0x1000000 - fast
    bus.io_read(0x71, 1)  # the guest did something else: polling starts over at small steps
    a = bus.io_read(base + 8, 4)
    b = bus.io_read(base + 8, 4)
    assert 0 < (b - a) & 0xFFFFFF < fast


@pytest.mark.parametrize("us", [1, 200, 10_000, 1_000_000, 3_000_000])
def test_micro_second_delay_ends_in_bounded_guest_work(us: int) -> None:
    bus, _ = _pc()
    before = bus.clock.ns
    reads = _micro_second_delay(bus, us)
    assert bus.clock.ns - before >= us * 1000  # at least the delay passed in virtual time
    # bounded: a logarithmic ramp, then at most one read per max_poll_ns (BaseRomAcpiTimerLib adds
    # two config cycles per read), not one read per access step
    ramp = (bus.clock.max_poll_ns // bus.clock.access_ns).bit_length()
    assert reads <= 2 * ramp + us * 1000 // bus.clock.max_poll_ns + 4
    chunks = (us * PM_TIMER_HZ // 1_000_000 >> 22) + 1  # InternalAcpiDelay waits in 2^22-tick chunks
    assert bus.clock.ns - before < us * 1000 + chunks * 2 * bus.clock.max_poll_ns


def test_same_guest_work_same_times() -> None:
    a, b = _pc()[0], _pc()[0]
    assert [_tick(a) for _ in range(30)] == [_tick(b) for _ in range(30)]


def test_i440fx_pm_timer_through_piix4() -> None:
    bus, base = _pc("i440fx")
    assert base == 0xB000
    v = [bus.io_read(0xB008, 4) for _ in range(3)]
    assert v[0] < v[1] < v[2]


def test_pm1_registers() -> None:
    bus, base = _pc()
    bus.io_write(base + 2, 2, 0x0121)  # PM1_EN
    assert bus.io_read(base, 4) >> 16 == 0x0121
    bus.io_write(base + 4, 2, 0x0001)  # SCI_EN
    assert bus.io_read(base + 4, 2) == 1
    bus.io_write(base + 4, 2, 5 << 10 | 1 << 13)  # SLP_TYP 5, SLP_EN: a sleep request
    assert bus.requests == ["sleep: PM1_CNT SLP_TYP 5"] and not bus.io_read(base + 4, 2) & 1 << 13
    bus.io_write(base + 0x28, 1, 0xFF)  # ICH9 GPE0_EN
    assert bus.io_read(base + 0x28, 1) == 0xFF


def test_clock_refuses_nonsense() -> None:
    with pytest.raises(InputError):
        VirtualClock(access_ns=0)
    c = VirtualClock()
    with pytest.raises(InputError):
        c.advance(-1)
    c.retire(1000)  # 1000 instructions at 1 GIPS
    assert c.ns == 1000
