"""PCI configuration and the chipsets (devices/pci.py, devices/chipset.py, devices/pc.py): what OVMF's
PlatformPei and AcpiTimerLib read and program, through 0xCF8/0xCFC and MMCONFIG."""

from __future__ import annotations

import pytest

from sevemu._util.units import GiB, MiB
from sevemu.errors import InputError
from sevemu.hypervisor.devices import DeviceBus, install_pc, split_ram
from sevemu.hypervisor.devices.pci import PciFunction, PciHost


def cfg_addr(bus: int, dev: int, fn: int, reg: int) -> int:
    return 1 << 31 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC)


def pci_read(b: DeviceBus, dev: int, fn: int, reg: int, size: int) -> int:
    b.io_write(0xCF8, 4, cfg_addr(0, dev, fn, reg))
    return b.io_read(0xCFC + (reg & 3), size)


def pci_write(b: DeviceBus, dev: int, fn: int, reg: int, size: int, value: int) -> None:
    b.io_write(0xCF8, 4, cfg_addr(0, dev, fn, reg))
    b.io_write(0xCFC + (reg & 3), size, value)


@pytest.fixture
def q35() -> DeviceBus:
    b = DeviceBus()
    install_pc(b, ram=256 * MiB)
    return b


def test_host_bridge_ids_pick_the_board() -> None:
    for chipset, did in (("q35", 0x29C0), ("i440fx", 0x1237)):
        b = DeviceBus()
        install_pc(b, ram=256 * MiB, chipset=chipset)  # type: ignore[arg-type]
        assert pci_read(b, 0, 0, 0, 2) == 0x8086
        assert pci_read(b, 0, 0, 2, 2) == did  # OVMF_HOSTBRIDGE_DID: PciRead16 (0, 0, 0, 2)
        assert pci_read(b, 0, 0, 0x0A, 2) == 0x0600  # host bridge class
        assert pci_read(b, 0, 0, 0x2C, 4) == 0x1100_1AF4  # QEMU's subsystem IDs


def test_absent_functions_and_disabled_cycles_read_all_ones(q35: DeviceBus) -> None:
    assert pci_read(q35, 5, 0, 0, 2) == 0xFFFF
    assert pci_read(q35, 0, 3, 0, 4) == 0xFFFFFFFF
    q35.io_write(0xCF8, 4, 0x0000_0000)  # enable bit clear
    assert q35.io_read(0xCFC, 4) == 0xFFFFFFFF
    pci_write(q35, 5, 0, 0x10, 4, 0x1234)  # dropped, no error


def test_config_address_register(q35: DeviceBus) -> None:
    q35.io_write(0xCF8, 4, 0x8000_F840)
    assert q35.io_read(0xCF8, 4) == 0x8000_F840
    q35.io_write(0xCF8, 2, 0x1234)  # only dword writes change CONFIG_ADDRESS (QEMU pci_host_config_write)
    assert q35.io_read(0xCF8, 4) == 0x8000_F840


def test_read_only_header_and_write_mask(q35: DeviceBus) -> None:
    pci_write(q35, 0, 0, 0, 4, 0x12345678)
    assert pci_read(q35, 0, 0, 0, 4) == 0x29C0_8086
    pci_write(q35, 0x1F, 0, 4, 2, 0xFFFF)  # command: only I/O, memory, master, INTx-disable stick
    assert pci_read(q35, 0x1F, 0, 4, 2) == 0x0407


def test_ovmf_platform_misc_initialization_q35(q35: DeviceBus) -> None:
    """PlatformMiscInitialization: PMBASE, PCICMD.IOSE, ACPI_CNTL.ACPI_EN; then RCBA and PCIEXBAR."""
    assert q35.io_read(0x608, 4) == 0xFFFFFFFF  # no PM block before it is enabled
    assert pci_read(q35, 0x1F, 0, 0x44, 1) & 0x80 == 0
    assert pci_read(q35, 0x1F, 0, 0x40, 4) == 1  # RTE reads 1
    pmba = pci_read(q35, 0x1F, 0, 0x40, 4)
    pci_write(q35, 0x1F, 0, 0x40, 4, (pmba & ~0xFF80) | 0x600)  # PciAndThenOr32
    pci_write(q35, 0x1F, 0, 4, 1, pci_read(q35, 0x1F, 0, 4, 1) | 1)  # PciOr8 IOSE
    assert q35.io_read(0x608, 4) == 0xFFFFFFFF  # still off until ACPI_EN
    pci_write(q35, 0x1F, 0, 0x44, 1, pci_read(q35, 0x1F, 0, 0x44, 1) | 0x80)
    assert pci_read(q35, 0x1F, 0, 0x40, 4) == 0x601
    a, b = q35.io_read(0x608, 4), q35.io_read(0x608, 4)
    assert a != 0xFFFFFFFF and a < b < 1 << 24
    # the root complex register block at 0xFED1C000 (ICH9_ROOT_COMPLEX_BASE | ICH9_RCBA_EN)
    pci_write(q35, 0x1F, 0, 0xF0, 4, 0xFED1C001)
    q35.mmio_write(0xFED1C000 + 0x3410, 4, 0x21)
    assert q35.mmio_read(0xFED1C000 + 0x3410, 4) == 0x21
    # PciExBarInitialization: clear EN, write high, then low with length 256 MiB and EN
    assert not q35.decodes(0xB000_0000)
    pci_write(q35, 0, 0, 0x60, 4, 0)
    pci_write(q35, 0, 0, 0x64, 4, 0)
    pci_write(q35, 0, 0, 0x60, 4, 0xB000_0000 | 1)
    assert q35.decodes(0xB000_0000) and q35.decodes(0xBFFF_FFFF) and not q35.decodes(0xC000_0000)
    assert q35.mmio_read(0xB000_0000, 4) == 0x29C0_8086
    assert q35.mmio_read(0xB000_0000 + (0x1F << 15) + 0x40, 4) == 0x601  # LPC's PMBASE via MMCONFIG
    assert q35.mmio_read(0xB000_0000 + (7 << 15), 2) == 0xFFFF
    # moving the window away and disabling it
    pci_write(q35, 0, 0, 0x60, 4, 0xE000_0000 | 2 << 1 | 1)  # 64 MiB at 0xE0000000
    assert q35.decodes(0xE3FF_FFFF) and not q35.decodes(0xE400_0000) and not q35.decodes(0xB000_0000)
    pci_write(q35, 0, 0, 0x60, 4, 0xE000_0000)
    assert not q35.decodes(0xE000_0000)


def test_moving_pmbase_moves_the_pm_block(q35: DeviceBus) -> None:
    pci_write(q35, 0x1F, 0, 0x40, 4, 0x600)
    pci_write(q35, 0x1F, 0, 0x44, 1, 0x80)
    pci_write(q35, 0x1F, 0, 0x40, 4, 0xE00)
    assert q35.io_read(0x608, 4) == 0xFFFFFFFF and q35.io_read(0xE08, 4) != 0xFFFFFFFF
    pci_write(q35, 0x1F, 0, 0x44, 1, 0)
    assert q35.io_read(0xE08, 4) == 0xFFFFFFFF


def test_q35_ext_tseg_query(q35: DeviceBus) -> None:
    pci_write(q35, 0, 0, 0x50, 2, 0xFFFF)
    assert pci_read(q35, 0, 0, 0x50, 2) == 16


def test_i440fx_piix4_pm_and_multifunction() -> None:
    b = DeviceBus()
    install_pc(b, ram=256 * MiB, chipset="i440fx")
    assert pci_read(b, 1, 0, 0x0E, 1) & 0x80  # PIIX3 function 0 is multi-function
    assert pci_read(b, 1, 3, 0, 4) == 0x7113_8086
    assert pci_read(b, 1, 3, 0x40, 4) == 1
    pci_write(b, 1, 3, 0x40, 4, 0xB000)
    assert b.io_read(0xB008, 4) == 0xFFFFFFFF
    pci_write(b, 1, 3, 0x80, 1, 1)  # PMREGMISC.PMIOSE
    assert b.io_read(0xB008, 4) != 0xFFFFFFFF
    assert pci_read(b, 0x1F, 0, 0, 2) == 0xFFFF  # no ICH9 on this board


def test_reset_control_register() -> None:
    for chipset in ("q35", "i440fx"):
        b = DeviceBus()
        install_pc(b, ram=64 * MiB, chipset=chipset)  # type: ignore[arg-type]
        b.io_write(0xCF9, 1, 0x02)
        assert b.io_read(0xCF9, 1) == 0x02 and not b.requests
        b.io_write(0xCF9, 1, 0x06)  # SYS_RST | RST_CPU: OVMF's ResetSystemLib cold reset
        assert b.requests == ["reset: port 0xCF9 <- 0x06"]
        b.io_write(0xCF8, 4, 0x8000_0000)  # CONFIG_ADDRESS still works beside it
        assert b.io_read(0xCFC, 2) == 0x8086


def test_ram_split_as_qemu() -> None:
    assert split_ram(256 * MiB, "q35") == (256 * MiB, 0)
    assert split_ram(2 * GiB + 512 * MiB, "q35") == (2 * GiB + 512 * MiB, 0)
    assert split_ram(3 * GiB, "q35") == (2 * GiB, 1 * GiB)
    assert split_ram(3 * GiB, "i440fx") == (3 * GiB, 0)
    assert split_ram(4 * GiB, "i440fx") == (3 * GiB, 1 * GiB)


def test_install_pc_checks() -> None:
    with pytest.raises(InputError, match="chipset"):
        install_pc(DeviceBus(), ram=64 * MiB, chipset="pc")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="RAM"):
        install_pc(DeviceBus(), ram=8 * MiB)
    with pytest.raises(InputError, match="CPU"):
        install_pc(DeviceBus(), ram=64 * MiB, cpus=0)
    host = PciHost()
    host.attach(0, 0, 0, PciFunction("a", 1, 2, 0))
    with pytest.raises(InputError, match="taken"):
        host.attach(0, 0, 0, PciFunction("b", 1, 2, 0))
    with pytest.raises(InputError):
        host.attach(0, 32, 0, PciFunction("c", 1, 2, 0))


def test_platform_reset_restores_power_on_state(q35: DeviceBus) -> None:
    pci_write(q35, 0x1F, 0, 0x40, 4, 0x600)
    pci_write(q35, 0x1F, 0, 0x44, 1, 0x80)
    pci_write(q35, 0, 0, 0x60, 4, 0xB000_0001)
    q35.reset()
    assert q35.io_read(0x608, 4) == 0xFFFFFFFF and not q35.decodes(0xB000_0000)
    assert pci_read(q35, 0x1F, 0, 0x40, 4) == 1 and pci_read(q35, 0, 0, 0x60, 4) == 0xB000_0000
