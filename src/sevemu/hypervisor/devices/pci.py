"""PCI configuration space: functions, configuration mechanism #1 at 0xCF8/0xCFC, and PCI Express
enhanced configuration (MMCONFIG).

* Configuration mechanism #1 (PCI Local Bus Specification 3.0, section 3.2.2.3.2; QEMU
  hw/pci/pci_host.c ``pci_host_config_write`` / ``pci_data_read``): CONFIG_ADDRESS at 0xCF8 takes
  only 32-bit writes (enable bit 31, bus 23:16, device 15:11, function 10:8, register 7:2) and reads
  back what was written; CONFIG_DATA at 0xCFC..0xCFF reads and writes the addressed function's
  register at ``register | (port & 3)``.  With the enable bit clear, or no function at the address,
  data reads are all ones (an absent device's vendor ID reads 0xFFFF) and writes are dropped.
* MMCONFIG (PCI Express Base Specification 4.0, section 7.2.2 "PCI Express Enhanced Configuration
  Access Mechanism"): 4 KiB of configuration space per function at
  ``base + (bus << 20 | device << 15 | function << 12)``; on Q35 the host bridge's PCIEXBAR decides
  where it is and whether it decodes (:mod:`sevemu.hypervisor.devices.chipset`).

A function's registers are bytes with a write mask, as QEMU keeps them (``PCIDevice.config`` and
``wmask``): a write changes only writable bits, then the function's :meth:`PciFunction.written`
hook applies side effects (a base address moving, an I/O block being enabled).  The standard header
(vendor, device, class, header type, QEMU's subsystem IDs 1AF4:1100) is read-only; the command
register's I/O, memory, bus-master and INTx-disable bits are writable.
"""

from __future__ import annotations

from typing import Final

from sevemu.errors import InputError
from sevemu.hypervisor.devices.bus import Device, ones

__all__ = [
    "CONFIG_ADDRESS",
    "MmConfig",
    "PciFunction",
    "PciHost",
    "bdf",
]

CONFIG_ADDRESS: Final = 0xCF8
_ENABLE: Final = 1 << 31
_SUBVENDOR_QEMU: Final = 0x1AF4  # PCI_SUBVENDOR_ID_REDHAT_QUMRANET (QEMU include/hw/pci/pci.h)
_SUBDEVICE_QEMU: Final = 0x1100  # PCI_SUBDEVICE_ID_QEMU
_COMMAND_WMASK: Final = 0x0407  # I/O space, memory space, bus master, INTx disable


def bdf(bus: int, device: int, function: int) -> int:
    """The 16-bit bus/device/function number of a function."""
    if not (0 <= bus < 256 and 0 <= device < 32 and 0 <= function < 8):
        raise InputError(f"no PCI function {bus:02x}:{device:02x}.{function}")
    return bus << 8 | device << 3 | function


class PciFunction:
    """One PCI function's configuration space (256 bytes; 4 KiB for PCI Express functions)."""

    def __init__(self, name: str, vendor: int, device: int, class_code: int, *, revision: int = 0,
                 header_type: int = 0, express: bool = False) -> None:
        self.name = name
        self.config = bytearray(4096 if express else 256)
        self.wmask = bytearray(len(self.config))
        self.put(0x00, 2, vendor)
        self.put(0x02, 2, device)
        self.put(0x08, 1, revision)
        self.put(0x09, 3, class_code)  # programming interface, subclass, base class
        self.put(0x0E, 1, header_type)
        if header_type & 0x7F == 0:
            self.put(0x2C, 2, _SUBVENDOR_QEMU)
            self.put(0x2E, 2, _SUBDEVICE_QEMU)
        self.writable(0x04, 2, _COMMAND_WMASK)
        self.host: PciHost | None = None
        self._initial = bytes(self.config)

    # ---- helpers for the models ----------------------------------------------------------------------
    def put(self, offset: int, size: int, value: int) -> None:
        """Set a register regardless of the write mask (reset values)."""
        self.config[offset : offset + size] = value.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        """A register's value."""
        return int.from_bytes(self.config[offset : offset + size], "little")

    def writable(self, offset: int, size: int, mask: int) -> None:
        """Bits ``mask`` of the ``size``-byte register at ``offset`` are writable by the guest."""
        self.wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def reset(self) -> None:
        """Back to the header's reset values; subclasses then set their own registers again."""
        self.config[:] = self._initial

    # ---- the guest's accesses ---------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        size = max(0, min(size, len(self.config) - offset))
        return int.from_bytes(self.config[offset : offset + size], "little") if size else 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        size = max(0, min(size, len(self.config) - offset))
        if not size:
            return
        for i in range(size):
            m = self.wmask[offset + i]
            b = (value >> (8 * i)) & 0xFF
            self.config[offset + i] = (self.config[offset + i] & ~m) | (b & m)
        self.written(offset, size)

    def written(self, offset: int, size: int) -> None:
        """The guest wrote [offset, offset+size): apply side effects."""


class PciHost(Device):
    """The PCI host's configuration ports 0xCF8..0xCFF and the functions on bus 0."""

    quiet = True  # config cycles are part of every OVMF PM timer read (BaseRomAcpiTimerLib)

    def __init__(self, name: str = "pci-host") -> None:
        super().__init__(name)
        self.address = 0
        self.functions: dict[int, PciFunction] = {}

    def attach(self, bus: int, device: int, function: int, fn: PciFunction) -> PciFunction:
        """Plug ``fn`` in at bus:device.function."""
        key = bdf(bus, device, function)
        if key in self.functions:
            raise InputError(f"PCI {bus:02x}:{device:02x}.{function} is taken by {self.functions[key].name}")
        self.functions[key] = fn
        fn.host = self
        return fn

    def function(self, bus: int, device: int, function: int) -> PciFunction | None:
        """The function at bus:device.function, if any."""
        return self.functions.get(bdf(bus, device, function))

    def reset(self) -> None:
        self.address = 0
        for fn in self.functions.values():
            fn.reset()

    def io_read(self, offset: int, size: int) -> int:
        if offset < 4:
            return (self.address >> (8 * offset)) & ones(size)
        if not self.address & _ENABLE:
            return ones(size)
        fn = self.functions.get((self.address >> 8) & 0xFFFF)
        if fn is None:
            return ones(size)
        return fn.config_read((self.address & 0xFC) | (offset & 3), size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = value
            return
        if not self.address & _ENABLE:
            return
        fn = self.functions.get((self.address >> 8) & 0xFFFF)
        if fn is not None:
            fn.config_write((self.address & 0xFC) | (offset & 3), size, value)


class MmConfig(Device):
    """The PCI Express enhanced configuration window of ``host``'s functions (mapped by the chipset)."""

    mmio_sizes = frozenset({1, 2, 4})
    quiet = True

    def __init__(self, host: PciHost, name: str = "mmconfig") -> None:
        super().__init__(name)
        self.host = host

    def mmio_read(self, offset: int, size: int) -> int:
        fn = self.host.functions.get(offset >> 12 & 0xFFFF)
        return ones(size) if fn is None else fn.config_read(offset & 0xFFF, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        fn = self.host.functions.get(offset >> 12 & 0xFFFF)
        if fn is not None:
            fn.config_write(offset & 0xFFF, size, value)
