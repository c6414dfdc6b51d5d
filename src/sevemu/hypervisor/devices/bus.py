"""The device bus of one VM: port I/O and MMIO dispatch to host-side device models.

What QEMU's memory core does for a KVM guest's I/O exits (softmmu/memory.c
``memory_region_dispatch_read/write``, ``address_space_io``): an access goes to the region that
decodes its first address (the one of highest priority where regions overlap, as ICH9's reset
control register at 0xCF9 overlays the PCI configuration address register at 0xCF8,
hw/isa/lpc_ich9.c); a device that implements fewer access sizes than the guest used gets the access
split into bytes, each decoded on its own, and one narrower than the device implements becomes the
smallest implemented access around it (``access_with_adjusted_size``); an access nothing decodes
reads all ones and writes are dropped (``unassigned_io_ops``).

Both exit paths of the hypervisor end here: the plain IOIO and NPF exits
(:meth:`sevemu.hypervisor.kvm.Hypervisor.port_in` and friends) and the GHCB's IOIO / MMIO NAE events
of SEV-ES and SNP guests, which call the same services.  String I/O arrives as one call per element
(:meth:`DeviceBus.ins` / :meth:`DeviceBus.outs` do the loop), as KVM's ``emulator_pio_in_out``
splits it.

Every access counts: per device (:attr:`Device.reads`, :attr:`Device.writes`) and, for what
no device decodes, per port or page (:attr:`DeviceBus.unassigned`), which is what a run's timeline
reports as "devices touched" (:meth:`DeviceBus.touched`).  Each access is also one step of the VM's
:class:`~sevemu.hypervisor.devices.clock.VirtualClock`.
"""

from __future__ import annotations

import bisect
import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sevemu.errors import InputError
from sevemu.hypervisor.devices.clock import VirtualClock

__all__ = ["Device", "DeviceBus", "MmioRegion", "Region", "ones"]

_PORTS = 0x10000
_PHYS = 1 << 52
_IO_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


def ones(size: int) -> int:
    """All ones in ``size`` bytes: what an undecoded read returns."""
    return (1 << (8 * size)) - 1


def _widen(sizes: frozenset[int], off: int, size: int, limit: int | None = None) -> tuple[int, int] | None:
    """(offset, size) of the smallest implemented access, aligned to its size, that covers
    [off, off+size) inside the range (QEMU ``access_with_adjusted_size`` for a too-narrow access)."""
    for w in sorted(sizes):
        if w > size:
            start = off & ~(w - 1)
            if start + w >= off + size and (limit is None or start + w <= limit):
                return start, w
    return None


class Device:
    """A device model: a name, access counters and handlers for its port and MMIO ranges.

    Handlers get the offset inside the range they were mapped with and the access size in bytes;
    values are little-endian integers.  ``io_sizes`` / ``mmio_sizes`` are the access sizes the
    device implements; the bus splits other sizes into byte accesses.  ``quiet`` devices (the PCI
    configuration ports) do not end a timer-polling streak of the clock.
    """

    io_sizes: frozenset[int] = frozenset({1, 2, 4})
    mmio_sizes: frozenset[int] = frozenset({1, 2, 4, 8})
    quiet: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.reads = 0
        self.writes = 0
        self.bus: DeviceBus | None = None

    # subclasses override what they decode
    def io_read(self, offset: int, size: int) -> int:
        return ones(size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        return None

    def mmio_read(self, offset: int, size: int) -> int:
        return ones(size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        return None

    def msr_read(self, msr: int) -> int:
        return 0

    def msr_write(self, msr: int, value: int) -> None:
        return None

    def reset(self) -> None:
        """Back to the power-on state (the counters stay)."""

    @property
    def clock(self) -> VirtualClock:
        """The clock of the bus the device is on."""
        if self.bus is None:
            raise InputError(f"device {self.name} is on no bus")
        return self.bus.clock


@dataclass(frozen=True, slots=True)
class Region:
    """A port or MMIO range a device decodes."""

    base: int
    size: int
    device: Device
    priority: int = 0


MmioRegion = Region


class DeviceBus:
    """The port I/O space and MMIO regions of one VM, the devices on them and the shared clock."""

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock if clock is not None else VirtualClock()
        self.devices: dict[str, Device] = {}
        self._ranges: list[Region] = []
        self._ports: dict[int, tuple[Device, int]] = {}  # port -> (device, offset in its range)
        self._mmio: list[Region] = []
        self._msrs: dict[int, Device] = {}
        self._mmio_bases: list[int] = []
        self._unassigned: dict[int, int] = {}  # (a plain dict: a Counter's += costs a port access 0.5 us more)
        self.requests: list[str] = []
        """What the guest asked of the platform through a device (a reset through 0xCF9 or port 0x92,
        a sleep state through PM1_CNT), in order: the VMM acts on them (QEMU
        ``qemu_system_reset_request``)."""
        self.listeners: list[Callable[[DeviceBus], None]] = []
        """Called after the MMIO map changed (a BAR moved, MMCONFIG was enabled): the VMM maps the
        new regions in the nested page tables (:meth:`mmio_regions`)."""

    @property
    def unassigned(self) -> Counter[int]:
        """Accesses no device decoded, by port (I/O) or by 4 KiB page (MMIO) (a copy)."""
        return Counter(self._unassigned)

    # ---- the map ----------------------------------------------------------------------------------
    def add(self, device: Device) -> Device:
        """Put ``device`` on the bus (its name must be unique); returns it."""
        if device.name in self.devices:
            raise InputError(f"a device named {device.name!r} is already on the bus")
        self.devices[device.name] = device
        device.bus = self
        return device

    def map_ports(self, device: Device, base: int, size: int, priority: int = 0) -> None:
        """``device`` decodes ports [base, base+size) (offsets from 0); ranges of equal priority
        must not overlap."""
        self._ranges.append(self._new_region("ports", self._ranges, _PORTS, device, base, size, priority))
        self._rebuild_ports()

    def _new_region(self, what: str, regions: list[Region], limit: int, device: Device, base: int, size: int,
                    priority: int) -> Region:
        """A region for ``device``, checked: the device is on this bus, the range inside ``limit`` and
        overlapping no region of the same priority."""
        if self.devices.get(device.name) is not device:
            raise InputError(f"device {device.name!r} is not on this bus")
        if size <= 0 or base < 0 or base + size > limit:
            raise InputError(f"{what} {base:#x}+{size:#x} of {device.name} is outside the {limit:#x}-byte space")
        for r in regions:
            if r.priority == priority and r.base < base + size and base < r.base + r.size:
                raise InputError(f"{what} {base:#x}+{size:#x} of {device.name} overlap {r.device.name}'s "
                                 f"{r.base:#x}+{r.size:#x}")
        return Region(base, size, device, priority)

    def unmap_ports(self, device: Device, base: int | None = None) -> None:
        """Stop decoding ``device``'s port ranges (only the one at ``base`` when given)."""
        self._ranges = [r for r in self._ranges if not (r.device is device and base in (None, r.base))]
        self._rebuild_ports()

    def _rebuild_ports(self) -> None:
        ports: dict[int, tuple[Device, int, int]] = {}
        for r in self._ranges:
            for p in range(r.base, r.base + r.size):
                have = ports.get(p)
                if have is None or have[2] < r.priority:
                    ports[p] = (r.device, p - r.base, r.priority)
        self._ports = {p: (d, off) for p, (d, off, _) in ports.items()}

    def port_ranges(self, device: Device) -> list[tuple[int, int]]:
        """The (base, size) port ranges ``device`` has mapped."""
        return [(r.base, r.size) for r in self._ranges if r.device is device]

    def map_mmio(self, device: Device, base: int, size: int, priority: int = 0) -> None:
        """``device`` decodes [base, base+size) of the guest-physical address space."""
        self._mmio.append(self._new_region("MMIO", self._mmio, _PHYS, device, base, size, priority))
        self._mmio_changed()

    def unmap_mmio(self, device: Device, base: int | None = None) -> None:
        """Stop decoding ``device``'s MMIO regions (only the one at ``base`` when given)."""
        before = len(self._mmio)
        self._mmio = [r for r in self._mmio if not (r.device is device and base in (None, r.base))]
        if len(self._mmio) != before:
            self._mmio_changed()

    def _mmio_changed(self) -> None:
        self._mmio.sort(key=lambda r: (r.base, -r.priority))
        self._mmio_bases = [r.base for r in self._mmio]
        for fn in list(self.listeners):
            fn(self)

    def mmio_regions(self) -> list[MmioRegion]:
        """The MMIO regions decoded now, by base."""
        return list(self._mmio)

    def mmio_region(self, gpa: int) -> MmioRegion | None:
        """The region decoding ``gpa`` (the highest priority where regions overlap), or None."""
        i = bisect.bisect_right(self._mmio_bases, gpa)
        best: MmioRegion | None = None
        for r in self._mmio[:i]:  # few regions: a scan of those starting at or below gpa
            if r.base <= gpa < r.base + r.size and (best is None or r.priority > best.priority):
                best = r
        return best

    def map_msr(self, device: Device, msr: int) -> None:
        """``device`` owns MSR ``msr`` (the LAPIC's IA32_APIC_BASE): the hypervisor's intercepted
        RDMSR/WRMSR of it come here, as KVM handles it in its in-kernel LAPIC."""
        if self.devices.get(device.name) is not device:
            raise InputError(f"device {device.name!r} is not on this bus")
        if not 0 <= msr <= 0xFFFFFFFF or msr in self._msrs:
            raise InputError(f"MSR {msr:#x} is invalid or already owned")
        self._msrs[msr] = device

    def msr_read(self, msr: int) -> int | None:
        """RDMSR of a device's MSR; None when no device owns ``msr`` (the hypervisor answers)."""
        dev = self._msrs.get(msr)
        if dev is None:
            return None
        dev.reads += 1
        return dev.msr_read(msr) & (1 << 64) - 1

    def msr_write(self, msr: int, value: int) -> bool:
        """WRMSR of a device's MSR; False when no device owns ``msr``."""
        dev = self._msrs.get(msr)
        if dev is None:
            return False
        dev.writes += 1
        dev.msr_write(msr, value & (1 << 64) - 1)
        return True

    # ---- port I/O ---------------------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        """IN of ``size`` bytes (1, 2, 4) at ``port``."""
        mask = _IO_MASK.get(size)
        if mask is None or not 0 <= port < _PORTS:
            raise InputError(f"port read of {size} bytes at {port:#x}")
        hit = self._ports.get(port)
        clock = self.clock
        if hit is None:
            clock.access()
            u = self._unassigned
            u[port] = u.get(port, 0) + 1
            return mask
        dev, off = hit
        if size not in dev.io_sizes:
            wide = _widen(dev.io_sizes, off, size)
            if wide is not None:  # a narrower access than the device implements: read around it
                return (self.io_read(port - (off - wide[0]), wide[1]) >> (8 * (off - wide[0]))) & ones(size)
            if size == 1:
                return ones(1)
            return sum(self.io_read((port + i) & 0xFFFF, 1) << (8 * i) for i in range(size))
        dev.reads += 1
        clock.quiet_access() if dev.quiet else clock.access()
        return dev.io_read(off, size) & mask

    def io_write(self, port: int, size: int, value: int) -> None:
        """OUT of the low ``size`` bytes (1, 2, 4) of ``value`` to ``port``."""
        mask = _IO_MASK.get(size)
        if mask is None or not 0 <= port < _PORTS:
            raise InputError(f"port write of {size} bytes at {port:#x}")
        value &= mask
        hit = self._ports.get(port)
        clock = self.clock
        if hit is None:
            clock.access()
            u = self._unassigned
            u[port] = u.get(port, 0) + 1
            return
        dev, off = hit
        if size not in dev.io_sizes:
            wide = _widen(dev.io_sizes, off, size)
            if wide is not None:  # QEMU writes the wider access with the value shifted into place
                self.io_write(port - (off - wide[0]), wide[1], value << (8 * (off - wide[0])))
            elif size > 1:
                for i in range(size):
                    self.io_write((port + i) & 0xFFFF, 1, value >> (8 * i))
            return
        dev.writes += 1
        clock.quiet_access() if dev.quiet else clock.access()
        dev.io_write(off, size, value)

    def out_sink(self, port: int, size: int) -> Callable[[int], None]:
        """:meth:`io_write` of ``size`` bytes to ``port`` as one callable of the value, its decode made
        once (a loop's OUT, answered again and again: the GHCB's known OUT,
        :meth:`sevemu.hypervisor.kvm.Hypervisor.port_out_sink`).  The same counters, clock steps and
        device calls as :meth:`io_write`; once the port map changed (a device mapped or unmapped:
        :attr:`_ports` is then another dict) the callable is :meth:`io_write` again."""
        mask = _IO_MASK.get(size)
        if mask is None or not 0 <= port < _PORTS:
            raise InputError(f"port write of {size} bytes at {port:#x}")
        ports, clock, io_write = self._ports, self.clock, self.io_write
        hit = ports.get(port)
        if hit is None and type(clock).access is VirtualClock.access:
            u = self._unassigned

            def unassigned(value: int) -> None:
                if self._ports is not ports:
                    return io_write(port, size, value)
                clock._ns += clock.access_ns  # (VirtualClock.access, inlined)
                clock._activity += 1
                u[port] = u.get(port, 0) + 1
                return None

            return unassigned
        if hit is None or size not in hit[0].io_sizes:
            return functools.partial(io_write, port, size)  # (split or widened: io_write's own way)
        dev, off = hit

        def decoded(value: int) -> None:
            if self._ports is not ports:
                return io_write(port, size, value)
            dev.writes += 1
            clock.quiet_access() if dev.quiet else clock.access()
            dev.io_write(off, size, value & mask)
            return None

        return decoded

    def ins(self, port: int, size: int, count: int) -> bytes:
        """String IN (``rep insb/w/d``): ``count`` reads, little-endian, one after another."""
        if count < 0:
            raise InputError(f"string I/O of {count} elements")
        return b"".join(self.io_read(port, size).to_bytes(size, "little") for _ in range(count))

    def outs(self, port: int, size: int, data: bytes) -> None:
        """String OUT (``rep outsb/w/d``): ``data`` written ``size`` bytes at a time."""
        if len(data) % size:
            raise InputError(f"string OUT of {len(data)} bytes is not a multiple of {size}")
        for k in range(0, len(data), size):
            self.io_write(port, size, int.from_bytes(data[k : k + size], "little"))

    # ---- MMIO ---------------------------------------------------------------------------------------
    def decodes(self, gpa: int) -> bool:
        """Whether a device decodes ``gpa``."""
        return self.mmio_region(gpa) is not None

    def mmio_read(self, gpa: int, size: int) -> int:
        """A read of ``size`` bytes (1 to 8; other than 1, 2, 4, 8 split into bytes) at ``gpa``."""
        if not 1 <= size <= 8:
            raise InputError(f"MMIO read of {size} bytes at {gpa:#x}")
        r = self.mmio_region(gpa)
        if r is None:
            self.clock.access()
            u = self._unassigned
            u[gpa & ~0xFFF] = u.get(gpa & ~0xFFF, 0) + 1
            return ones(size)
        dev = r.device
        if size not in dev.mmio_sizes or gpa + size > r.base + r.size:
            wide = _widen(dev.mmio_sizes, gpa - r.base, size, r.size)
            if wide is not None:
                return (self.mmio_read(r.base + wide[0], wide[1]) >> (8 * (gpa - r.base - wide[0]))) & ones(size)
            if size == 1:
                return ones(1)
            return sum(self.mmio_read(gpa + i, 1) << (8 * i) for i in range(size))
        dev.reads += 1
        self.clock.quiet_access() if dev.quiet else self.clock.access()
        return dev.mmio_read(gpa - r.base, size) & ones(size)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        """A write of the low ``size`` bytes (1 to 8) of ``value`` at ``gpa``."""
        if not 1 <= size <= 8:
            raise InputError(f"MMIO write of {size} bytes at {gpa:#x}")
        value &= ones(size)
        r = self.mmio_region(gpa)
        if r is None:
            self.clock.access()
            u = self._unassigned
            u[gpa & ~0xFFF] = u.get(gpa & ~0xFFF, 0) + 1
            return
        dev = r.device
        if size not in dev.mmio_sizes or gpa + size > r.base + r.size:
            wide = _widen(dev.mmio_sizes, gpa - r.base, size, r.size)
            if wide is not None:
                self.mmio_write(r.base + wide[0], wide[1], value << (8 * (gpa - r.base - wide[0])))
            elif size > 1:
                for i in range(size):
                    self.mmio_write(gpa + i, 1, value >> (8 * i))
            return
        dev.writes += 1
        self.clock.quiet_access() if dev.quiet else self.clock.access()
        dev.mmio_write(gpa - r.base, size, value)

    # ---- what was touched ----------------------------------------------------------------------------
    def touched(self) -> dict[str, int]:
        """Accesses per device that saw any (reads + writes), and ``"unassigned"`` for the rest:
        the "devices touched" line of a run's timeline."""
        out = {name: d.reads + d.writes for name, d in self.devices.items() if d.reads + d.writes}
        if self._unassigned:
            out["unassigned"] = sum(self._unassigned.values())
        return out

    def summary(self, top: int = 8) -> dict[str, object]:
        """What a run's ``--json`` reports: reads and writes per device that saw any, the ``top`` most
        used undecoded ports/pages, platform requests and the virtual time."""
        return {
            "devices": {n: {"reads": d.reads, "writes": d.writes} for n, d in self.devices.items()
                        if d.reads + d.writes},
            "unassigned": {f"{k:#x}": v for k, v in self.unassigned.most_common(top)},
            "requests": list(self.requests),
            "virtual_ns": self.clock.ns,
        }

    def reset(self) -> None:
        """Every device back to its power-on state (a platform reset); the map follows the devices."""
        for d in self.devices.values():
            d.reset()
