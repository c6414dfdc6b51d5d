"""A QEMU x86 PC's devices on a VM's bus: ``install_pc(bus, ram=..., chipset="q35"|"i440fx")``.

What QEMU's ``pc-q35`` and ``pc-i440fx`` machines put where OVMF's SEC and PEI look (the chipset
models in :mod:`~sevemu.hypervisor.devices.chipset`, the others in their modules):

========================  ======================  ==================================================
what                      where                   module
========================  ======================  ==================================================
PCI host (config #1)      0xCF8..0xCFF            :mod:`~sevemu.hypervisor.devices.pci`
host bridge               00:00.0                 Q35 MCH 8086:29C0 / i440FX 8086:1237
PM function               00:1F.0 / 00:01.3       ICH9 LPC (PMBASE 0x40, ACPI_CNTL 0x44) / PIIX4 PM
ACPI PM block + timer     PMBASE (when enabled)   :mod:`~sevemu.hypervisor.devices.acpi_pm`
MMCONFIG (Q35)            PCIEXBAR (when enabled) 256 MiB at 0xB0000000 as OVMF programs it
reset control             0xCF9                   ICH9 RST_CNT / PIIX3 RCR
CMOS / RTC                0x70/0x71               :mod:`~sevemu.hypervisor.devices.cmos`
fw_cfg                    0x510/0x511, DMA 0x514  :mod:`~sevemu.hypervisor.devices.fw_cfg`
8259 PICs, ELCR           0x20/0x21, 0xA0/0xA1,   :mod:`~sevemu.hypervisor.devices.legacy`
                          0x4D0/0x4D1
POST / debug console      0x80 / 0x402            recorded bytes
System Control Port A     0x92                    A20, reset
local APIC                0xFEE00000 (4 KiB),     :mod:`~sevemu.hypervisor.devices.lapic` (the BSP's)
                          MSR 0x1B
========================  ======================  ==================================================

RAM is split at 4 GiB as QEMU splits it: Q35 keeps at most 2 GiB below 4 GiB when the RAM is 2.75
GiB or more (else all of it, up to 2.75 GiB; ``pc_q35_init``), i440FX keeps 3 GiB below when the
RAM is 3.5 GiB or more (``pc_init1`` with gigabyte alignment).  The split feeds the CMOS bytes, fw_cfg's
``etc/e820`` and RAM size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from sevemu._util.units import GiB, MiB
from sevemu.errors import InputError
from sevemu.hypervisor.devices.acpi_pm import PmIoBlock
from sevemu.hypervisor.devices.bus import Device, DeviceBus
from sevemu.hypervisor.devices.chipset import (
    RCRB_SIZE,
    RESET_CONTROL_PORT,
    I440fxHost,
    Ich9Lpc,
    Piix3Isa,
    Piix4Pm,
    Q35Mch,
    ResetControl,
)
from sevemu.hypervisor.devices.cmos import DEFAULT_RTC_BASE, Cmos, cmos_memory_bytes
from sevemu.hypervisor.devices.fw_cfg import FW_CFG_PORT, DmaMemory, FwCfg, qemu_files
from sevemu.hypervisor.devices.lapic import IA32_APIC_BASE, LAPIC_BASE, LAPIC_SIZE, Lapic
from sevemu.hypervisor.devices.legacy import (
    DEBUGCON_PORT,
    POST_PORT,
    DebugPort,
    Elcr,
    Pic8259,
    Port92,
    debugcon,
)
from sevemu.hypervisor.devices.pci import CONFIG_ADDRESS, MmConfig, PciFunction, PciHost

__all__ = ["Chipset", "Pc", "RamRegisters", "install_pc", "split_ram"]

Chipset = Literal["q35", "i440fx"]
_Q35_LOWMEM: Final = 0xB000_0000
_I440FX_LOWMEM: Final = 0xE000_0000


def split_ram(ram: int, chipset: Chipset) -> tuple[int, int]:
    """(below 4 GiB, above 4 GiB) for ``ram`` bytes on ``chipset``, as QEMU splits it."""
    if chipset == "q35":
        low = 2 * GiB if ram >= _Q35_LOWMEM else _Q35_LOWMEM
    else:
        low = 3 * GiB if ram >= _I440FX_LOWMEM else _I440FX_LOWMEM
    return (low, ram - low) if ram >= low else (ram, 0)


class RamRegisters(Device):
    """Plain 32-bit registers that keep what is written (ICH9's root complex register block)."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name)
        self.data = bytearray(size)

    def reset(self) -> None:
        self.data = bytearray(len(self.data))

    def mmio_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")


@dataclass(eq=False)
class Pc:
    """The devices :func:`install_pc` put on a bus (handles for the VMM and the timeline)."""

    chipset: Chipset
    bus: DeviceBus
    pci: PciHost
    host_bridge: PciFunction
    pm_function: Ich9Lpc | Piix4Pm
    pm: PmIoBlock
    cmos: Cmos
    fw_cfg: FwCfg
    lapic: Lapic
    pic_master: Pic8259
    pic_slave: Pic8259
    post: DebugPort
    debugcon: DebugPort | None
    port92: Port92
    reset_control: ResetControl
    below_4g: int
    above_4g: int


def install_pc(bus: DeviceBus, *, ram: int, chipset: Chipset = "q35", cpus: int = 1, max_cpus: int | None = None,
               files: dict[str, bytes] | None = None, dma: DmaMemory | None = None,
               rtc_base: int = DEFAULT_RTC_BASE, with_debugcon: bool = True) -> Pc:
    """Put a QEMU ``chipset`` PC's devices with ``ram`` bytes of RAM and ``cpus`` CPUs on ``bus``.

    ``files`` are extra fw_cfg files (replacing QEMU's of the same name); ``dma`` is the guest memory
    fw_cfg DMA reaches (None: no DMA interface is offered, as on a machine without it).
    """
    if chipset not in ("q35", "i440fx"):
        raise InputError(f"unknown chipset {chipset!r} (q35 or i440fx)")
    if ram < 16 * MiB or ram % MiB:
        raise InputError(f"RAM must be a multiple of 1 MiB of at least 16 MiB, got {ram:#x}")
    if not 1 <= cpus <= (max_cpus or cpus) <= 0xFFFF:
        raise InputError(f"{cpus} CPUs (max {max_cpus}) is not a valid CPU count")
    below, above = split_ram(ram, chipset)
    pci = PciHost()
    bus.add(pci)
    bus.map_ports(pci, CONFIG_ADDRESS, 8)
    ich9 = chipset == "q35"
    pm = PmIoBlock(ich9=ich9)
    bus.add(pm)
    host_bridge: PciFunction
    pm_function: Ich9Lpc | Piix4Pm
    if ich9:
        mmconfig = MmConfig(pci)
        bus.add(mmconfig)
        host_bridge = pci.attach(0, 0, 0, Q35Mch(bus, mmconfig))
        rcrb = bus.add(RamRegisters("ich9-rcrb", RCRB_SIZE))
        pm_function = Ich9Lpc(bus, pm, rcrb)
        pci.attach(0, 0x1F, 0, pm_function)
    else:
        host_bridge = pci.attach(0, 0, 0, I440fxHost())
        pci.attach(0, 1, 0, Piix3Isa())
        pm_function = Piix4Pm(bus, pm)
        pci.attach(0, 1, 3, pm_function)
    reset_control = ResetControl(ich9)
    bus.add(reset_control)
    bus.map_ports(reset_control, RESET_CONTROL_PORT, 1, priority=1)  # over CONFIG_ADDRESS's byte 1
    cmos = Cmos(cmos_memory_bytes(below, above, cpus), base=rtc_base)
    bus.add(cmos)
    bus.map_ports(cmos, 0x70, 2)
    all_files = qemu_files(below, above)
    all_files.update(files or {})
    fw_cfg = FwCfg(ram_size=ram, cpus=cpus, max_cpus=max_cpus, files=all_files, dma=dma)
    bus.add(fw_cfg)
    bus.map_ports(fw_cfg, FW_CFG_PORT, 12)
    lapic = Lapic(0)
    bus.add(lapic)
    bus.map_mmio(lapic, LAPIC_BASE, LAPIC_SIZE)
    bus.map_msr(lapic, IA32_APIC_BASE)
    master, slave = Pic8259("pic-master"), Pic8259("pic-slave")
    for pic, port in ((master, 0x20), (slave, 0xA0)):
        bus.add(pic)
        bus.map_ports(pic, port, 2)
    elcr = Elcr(master, slave)
    bus.add(elcr)
    bus.map_ports(elcr, 0x4D0, 2)
    post = DebugPort("post")
    bus.add(post)
    bus.map_ports(post, POST_PORT, 1)
    dcon = None
    if with_debugcon:
        dcon = debugcon()
        bus.add(dcon)
        bus.map_ports(dcon, DEBUGCON_PORT, 1)
    port92 = Port92()
    bus.add(port92)
    bus.map_ports(port92, 0x92, 1)
    return Pc(chipset, bus, pci, host_bridge, pm_function, pm, cmos, fw_cfg, lapic, master, slave, post, dcon,
              port92, reset_control, below, above)
