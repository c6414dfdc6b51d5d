"""The device bus (hypervisor/devices/bus.py): dispatch, splitting, priorities, counters, the clock."""

from __future__ import annotations

import functools

import pytest

from sevemu.errors import InputError
from sevemu.hypervisor.devices import COM1, Device, DeviceBus, console_bus


class Recorder(Device):
    """A device that records its accesses and answers offset-derived values."""

    def __init__(self, name: str, io_sizes: frozenset[int] = frozenset({1, 2, 4})) -> None:
        super().__init__(name)
        self.io_sizes = io_sizes
        self.log: list[tuple[str, int, int, int]] = []

    def io_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, 0))
        return 0x11223344 + offset

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))

    def mmio_read(self, offset: int, size: int) -> int:
        self.log.append(("mr", offset, size, 0))
        return 0xA0 + offset

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("mw", offset, size, value))


def test_unknown_ports_read_all_ones_and_are_counted() -> None:
    bus = DeviceBus()
    assert bus.io_read(0x1234, 1) == 0xFF and bus.io_read(0x1234, 2) == 0xFFFF
    assert bus.io_read(0x60, 4) == 0xFFFFFFFF
    bus.io_write(0x1234, 1, 5)
    assert bus.unassigned == {0x1234: 3, 0x60: 1}
    assert bus.touched() == {"unassigned": 4}
    assert bus.mmio_read(0xFED00000, 4) == 0xFFFFFFFF and bus.unassigned[0xFED00000] == 1


def test_dispatch_offsets_sizes_and_counters() -> None:
    bus = DeviceBus()
    d = bus.add(Recorder("dev"))
    bus.map_ports(d, 0x500, 4)
    assert bus.io_read(0x502, 2) == (0x11223344 + 2) & 0xFFFF
    bus.io_write(0x501, 4, 0x1_DEADBEEF)  # the value is cut to the access size
    assert d.log == [("r", 2, 2, 0), ("w", 1, 4, 0xDEADBEEF)]
    assert (d.reads, d.writes) == (1, 1) and bus.touched() == {"dev": 2}


def test_sizes_a_device_does_not_implement_are_split_into_bytes() -> None:
    bus = DeviceBus()
    d = bus.add(Recorder("bytes", frozenset({1})))
    bus.map_ports(d, 0x70, 2)
    assert bus.io_read(0x70, 2) == (0x44 + 0) | (0x45 << 8)  # each byte decoded at its own port
    bus.io_write(0x70, 2, 0xBBAA)
    assert d.log[-2:] == [("w", 0, 1, 0xAA), ("w", 1, 1, 0xBB)]
    # a split access that runs past the device reads all ones for the undecoded byte
    assert bus.io_read(0x71, 2) == 0x45 | 0xFF << 8
    dw = bus.add(Recorder("dwords", frozenset({4})))
    bus.map_ports(dw, 0x600, 8)
    assert bus.io_read(0x605, 1) == ((0x11223344 + 4) >> 8) & 0xFF  # narrower: the dword around it
    bus.io_write(0x606, 2, 0xBEEF)
    assert dw.log[-2:] == [("r", 4, 4, 0), ("w", 4, 4, 0xBEEF << 16)]


def test_priority_overlay_and_overlap_refusal() -> None:
    bus = DeviceBus()
    wide, narrow = bus.add(Recorder("wide")), bus.add(Recorder("narrow", frozenset({1})))
    bus.map_ports(wide, 0xCF8, 8)
    with pytest.raises(InputError, match="overlap"):
        bus.map_ports(narrow, 0xCF9, 1)
    bus.map_ports(narrow, 0xCF9, 1, priority=1)
    bus.io_write(0xCF9, 1, 6)
    bus.io_write(0xCF8, 4, 0x80000000)  # the dword write still reaches the wide device at 0xCF8
    assert narrow.log == [("w", 0, 1, 6)] and wide.log == [("w", 0, 4, 0x80000000)]
    bus.unmap_ports(narrow)
    bus.io_write(0xCF9, 1, 7)
    assert wide.log[-1] == ("w", 1, 1, 7)


def test_map_checks() -> None:
    bus = DeviceBus()
    d = Recorder("off-bus")
    with pytest.raises(InputError, match="not on this bus"):
        bus.map_ports(d, 0x10, 1)
    bus.add(d)
    with pytest.raises(InputError, match="already on the bus"):
        bus.add(Recorder("off-bus"))
    with pytest.raises(InputError, match="outside the 0x10000-byte space"):
        bus.map_ports(d, 0xFFFF, 2)
    for bad in ((0x10, 3), (0x10000, 1), (-1, 1)):
        with pytest.raises(InputError):
            bus.io_read(*bad)
    with pytest.raises(InputError):
        bus.mmio_read(0, 9)


def test_mmio_regions_and_listeners() -> None:
    bus = DeviceBus()
    seen: list[int] = []
    bus.listeners.append(lambda b: seen.append(len(b.mmio_regions())))
    d = bus.add(Recorder("mmio"))
    bus.map_mmio(d, 0xFEE00000, 0x1000)
    assert seen == [1] and bus.decodes(0xFEE00FFF) and not bus.decodes(0xFEE01000)
    assert bus.mmio_read(0xFEE00020, 4) == 0xA0 + 0x20
    bus.mmio_write(0xFEE00030, 8, 0x0102030405060708)
    assert d.log[-1] == ("mw", 0x30, 8, 0x0102030405060708)
    assert bus.mmio_read(0xFEE00041, 3) == (0xA0 + 0x40) >> 8  # an odd size: the dword around it
    assert d.log[-1] == ("mr", 0x40, 4, 0)
    bus.unmap_mmio(d)
    assert seen == [1, 0] and not bus.decodes(0xFEE00000)


def test_string_io_is_one_access_per_element() -> None:
    bus = DeviceBus()
    d = bus.add(Recorder("fifo", frozenset({1})))
    bus.map_ports(d, 0x511, 1)
    assert bus.ins(0x511, 1, 3) == bytes([0x44] * 3)
    bus.outs(0x511, 1, b"ab")
    assert d.reads == 3 and d.writes == 2
    with pytest.raises(InputError):
        bus.outs(0x511, 2, b"abc")


def test_every_access_advances_the_shared_clock() -> None:
    bus = DeviceBus()
    d = bus.add(Recorder("dev"))
    bus.map_ports(d, 0x500, 1)
    t0 = bus.clock.ns
    bus.io_read(0x500, 1)
    bus.io_read(0x9999, 1)  # undecoded accesses are exits too
    assert bus.clock.ns - t0 == 2 * bus.clock.access_ns


def test_com1_console_keeps_its_behaviour() -> None:
    out = bytearray()
    bus = console_bus(out)
    for b in b"hi":
        bus.io_write(COM1, 1, b)
    assert out == b"hi"
    assert bus.io_read(COM1 + 5, 1) == 0x20  # line status: transmitter ready
    bus.io_write(COM1 + 3, 1, 0x80)  # DLAB: the next two writes are the divisor, not text
    bus.io_write(COM1, 1, 0x01)
    bus.io_write(COM1 + 1, 1, 0x00)
    bus.io_write(COM1 + 3, 1, 0x03)
    bus.io_write(COM1, 1, ord("!"))
    assert out == b"hi!"
    bus.io_write(COM1 + 7, 1, 0x5A)  # scratch register
    assert bus.io_read(COM1 + 7, 1) == 0x5A


def _bus_state(bus: DeviceBus, devs: list[Recorder]) -> tuple[object, ...]:
    c = bus.clock
    return (dict(bus.unassigned), [(d.reads, d.writes, list(d.log)) for d in devs], c.ns, c._activity,
            c._poll_streak)


@pytest.mark.parametrize(("port", "size"), [(0x80, 1), (0x80, 4), (0x501, 4), (0x502, 2), (0x70, 2), (0x71, 1),
                                            (0xCF9, 1)])
def test_an_out_sink_does_what_io_write_does(port: int, size: int) -> None:
    # The bound OUT (the GHCB's known OUT) against io_write: the same device calls, counters and clock,
    # for an unassigned port, a decoded one, one split into bytes; and after the map changed.
    states = []
    for bound in (True, False):
        bus = DeviceBus()
        dev, narrow = bus.add(Recorder("dev")), bus.add(Recorder("bytes", frozenset({1})))
        quiet = bus.add(Recorder("quiet"))
        quiet.quiet = True
        bus.map_ports(dev, 0x500, 4)
        bus.map_ports(narrow, 0x70, 2)
        bus.map_ports(quiet, 0xCF8, 8)
        out = bus.out_sink(port, size) if bound else functools.partial(bus.io_write, port, size)
        for value in (0x1_DEADBEEF, 7, 0xFFFF_FFFF):
            out(value)
        bus.unmap_ports(dev)  # the map changes: the sink follows it
        bus.unmap_ports(narrow)
        mapped = bus.add(Recorder("late"))
        bus.map_ports(mapped, 0x80, 1)
        out(0x42)
        states.append(_bus_state(bus, [dev, narrow, quiet, mapped]))
    assert states[0] == states[1]


def test_an_out_sink_refuses_what_io_write_refuses() -> None:
    bus = DeviceBus()
    with pytest.raises(InputError):
        bus.out_sink(0x80, 3)
    with pytest.raises(InputError):
        bus.out_sink(0x10000, 1)
