"""Host-side device models of a VM (what QEMU's device models are to a KVM guest).

One :class:`~sevemu.hypervisor.devices.bus.DeviceBus` per VM (``Vm.devices``) dispatches the
guest's port I/O and MMIO -- from the plain IOIO/NPF exits and from the GHCB's IOIO/MMIO events
alike -- to the devices on it and counts every access; the devices share the VM's
:class:`~sevemu.hypervisor.devices.clock.VirtualClock`.  Every VM has the COM1 console;
:func:`~sevemu.hypervisor.devices.pc.install_pc` adds a QEMU PC's devices (Q35 or i440FX chipset,
ACPI PM timer, CMOS/RTC, fw_cfg, LAPIC, PICs, debug ports) that OVMF's early boot needs.
See docs/devices.md.
"""

from __future__ import annotations

from sevemu.hypervisor.devices.acpi_pm import PM_TIMER_HZ, PmIoBlock, pm_timer_ticks
from sevemu.hypervisor.devices.bus import Device, DeviceBus, MmioRegion, ones
from sevemu.hypervisor.devices.clock import VirtualClock
from sevemu.hypervisor.devices.cmos import Cmos, cmos_memory_bytes
from sevemu.hypervisor.devices.fw_cfg import DmaMemory, FwCfg, FwCfgItem, e820_table, qemu_files
from sevemu.hypervisor.devices.lapic import LAPIC_BASE, Ipi, Lapic
from sevemu.hypervisor.devices.pc import Pc, install_pc, split_ram
from sevemu.hypervisor.devices.serial import COM1, Uart16550

__all__ = [
    "COM1",
    "LAPIC_BASE",
    "PM_TIMER_HZ",
    "Cmos",
    "Device",
    "DeviceBus",
    "DmaMemory",
    "FwCfg",
    "FwCfgItem",
    "Ipi",
    "Lapic",
    "MmioRegion",
    "Pc",
    "PmIoBlock",
    "Uart16550",
    "VirtualClock",
    "cmos_memory_bytes",
    "console_bus",
    "e820_table",
    "install_pc",
    "ones",
    "pm_timer_ticks",
    "qemu_files",
    "split_ram",
]


def console_bus(console: bytearray) -> DeviceBus:
    """A bus with only the COM1 console writing to ``console`` (every VM starts with this)."""
    bus = DeviceBus()
    uart = Uart16550(console)
    bus.add(uart)
    bus.map_ports(uart, COM1, 8)
    return bus
