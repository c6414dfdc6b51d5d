"""The chipsets QEMU's x86 machines have: Q35 (MCH + ICH9) and i440FX (+ PIIX3/PIIX4).

OVMF picks its board from the host bridge's device ID at 00:00.0 (OvmfPkg/PlatformPei
``InitializePlatform`` -> ``PlatformInfoHob->HostBridgeDevId``; OvmfPkg/Include/OvmfPlatforms.h):
0x29C0 is Q35, 0x1237 is i440FX, and an all-ones read (no host bridge) is taken for ``microvm``.  Its
PlatformPei then places the ACPI PM I/O block (``PlatformMiscInitialization``) and, on Q35, the
root complex register block and MMCONFIG (``PciExBarInitialization``); its PM timer library reads
the host bridge ID and the PM base from configuration space on every tick
(OvmfPkg/Library/AcpiTimerLib/BaseRomAcpiTimerLib.c).

Q35 (QEMU hw/pci-host/q35.c, include/hw/pci-host/q35.h; hw/isa/lpc_ich9.c, include/hw/southbridge/ich9.h):

* MCH 8086:29C0 at 00:00.0, class 0600: PCIEXBAR at 0x60 (64 bits; bit 0 PCIEXBAREN, bits 2:1 the
  length 256/128/64 MiB, base from bit 28/27/26; reset value 0xB0000000, not enabled) decodes MMCONFIG;
  PAM0..6 at 0x90..0x96, SMRAM 0x9D, ESMRAMC 0x9E writable; EXT_TSEG_MBS at 0x50 answers a write of
  0xFFFF with the extended TSEG size (QEMU's default 16 MiB).
* ICH9 LPC 8086:2918 at 00:1F.0, class 0601, multi-function: PMBASE at 0x40 (bits 15:7, bit 0 reads
  1), ACPI_CNTL at 0x44 (bit 7 ACPI_EN decodes the 128-byte PM block at PMBASE), PIRQ routing
  0x60..0x63 / 0x68..0x6B, RCBA at 0xF0 (bits 31:14, bit 0 enables the 16 KiB root complex register
  block, modelled as plain registers); the reset control register RST_CNT at port 0xCF9.

i440FX (QEMU hw/pci-host/i440fx.c; hw/isa/piix.c; hw/acpi/piix4.c):

* i440FX 8086:1237 rev 2 at 00:00.0, class 0600: PAM 0x59..0x5F and SMRAM 0x72 writable.
* PIIX3 ISA bridge 8086:7000 at 00:01.0, class 0601, multi-function; its reset control register
  RCR at port 0xCF9.
* PIIX4 PM 8086:7113 rev 3 at 00:01.3, class 0680: PMBA at 0x40 (bits 15:6, bit 0 reads 1),
  PMREGMISC at 0x80 (bit 0 PMIOSE decodes the 64-byte PM block at PMBA).  As in QEMU, the command
  register's I/O enable does not gate the PM block.

The reset control register (both): a write with bit 2 (RST_CPU) set is a reset request; bits 1
(SYS_RST) and 3 (FULL_RST, ICH9) are kept.
"""

from __future__ import annotations

from typing import Final

from sevemu.hypervisor.devices.acpi_pm import PmIoBlock
from sevemu.hypervisor.devices.bus import Device, DeviceBus
from sevemu.hypervisor.devices.pci import MmConfig, PciFunction

__all__ = [
    "I440FX_DEVICE_ID",
    "ICH9_LPC_DEVICE_ID",
    "PIIX4_PM_DEVICE_ID",
    "Q35_MCH_DEVICE_ID",
    "I440fxHost",
    "Ich9Lpc",
    "Piix3Isa",
    "Piix4Pm",
    "Q35Mch",
    "ResetControl",
]

Q35_MCH_DEVICE_ID: Final = 0x29C0
ICH9_LPC_DEVICE_ID: Final = 0x2918
I440FX_DEVICE_ID: Final = 0x1237
PIIX3_ISA_DEVICE_ID: Final = 0x7000
PIIX4_PM_DEVICE_ID: Final = 0x7113
_INTEL: Final = 0x8086
_CLASS_HOST: Final = 0x060000
_CLASS_ISA: Final = 0x060100
_CLASS_BRIDGE_OTHER: Final = 0x068000
_MULTIFUNCTION: Final = 0x80

PCIEXBAR: Final = 0x60
PCIEXBAR_DEFAULT: Final = 0xB000_0000
_EXT_TSEG_MBS: Final = 0x50
_EXT_TSEG_MBS_QUERY: Final = 0xFFFF
ICH9_PMBASE: Final = 0x40
ICH9_ACPI_CNTL: Final = 0x44
ICH9_ACPI_EN: Final = 0x80
ICH9_RCBA: Final = 0xF0
RCRB_SIZE: Final = 16 * 1024
PIIX4_PMBA: Final = 0x40
PIIX4_PMREGMISC: Final = 0x80
PIIX4_PMIOSE: Final = 0x01
RESET_CONTROL_PORT: Final = 0xCF9


class _PmFunction(PciFunction):
    """A PCI function that places a PM I/O block on the bus (ICH9 LPC, PIIX4 PM)."""

    def __init__(self, name: str, vendor: int, device: int, class_code: int, bus: DeviceBus, pm: PmIoBlock, *,
                 revision: int = 0, header_type: int = 0) -> None:
        super().__init__(name, vendor, device, class_code, revision=revision, header_type=header_type)
        self.bus = bus
        self.pm = pm
        self.pm_base: int | None = None
        """Where the PM block decodes now (None: not decoded)."""

    def _place_pm(self, base: int, enabled: bool) -> None:
        want = base if enabled and base else None
        if want == self.pm_base:
            return
        if self.pm_base is not None:
            self.bus.unmap_ports(self.pm)
        if want is not None:
            self.bus.map_ports(self.pm, want, self.pm.size)
        self.pm_base = want


class Ich9Lpc(_PmFunction):
    """ICH9's LPC bridge at 00:1F.0 (module docstring); owns the PM block and the RCRB."""

    def __init__(self, bus: DeviceBus, pm: PmIoBlock, rcrb: Device) -> None:
        super().__init__("ich9-lpc", _INTEL, ICH9_LPC_DEVICE_ID, _CLASS_ISA, bus, pm, revision=2,
                         header_type=_MULTIFUNCTION)
        self.rcrb = rcrb
        self.rcrb_base: int | None = None
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.put(ICH9_PMBASE, 4, 1)  # RTE: I/O space indicator, read-only 1
        self.writable(ICH9_PMBASE, 4, 0xFF80)
        self.put(ICH9_ACPI_CNTL, 1, 0)
        self.writable(ICH9_ACPI_CNTL, 1, 0x87)  # ACPI_EN, SCI_IRQ_SEL
        for off in (*range(0x60, 0x64), *range(0x68, 0x6C)):
            self.put(off, 1, 0x80)  # PIRQx routing disabled
            self.writable(off, 1, 0x8F)
        self.put(ICH9_RCBA, 4, 0)
        self.writable(ICH9_RCBA, 4, 0xFFFFC001)
        self.writable(0xA0, 4, 0xFFFFFFFF)  # GEN_PMCON_1..3: kept, no effect
        self._place_pm(0, False)
        self._place_rcrb(0)

    def written(self, offset: int, size: int) -> None:
        if offset < ICH9_ACPI_CNTL + 1 and ICH9_PMBASE < offset + size:
            self._place_pm(self.get(ICH9_PMBASE, 4) & 0xFF80, bool(self.get(ICH9_ACPI_CNTL, 1) & ICH9_ACPI_EN))
        if offset < ICH9_RCBA + 4 and ICH9_RCBA < offset + size:
            rcba = self.get(ICH9_RCBA, 4)
            self._place_rcrb(rcba & 0xFFFFC000 if rcba & 1 else 0)

    def _place_rcrb(self, base: int) -> None:
        want = base or None
        if want == self.rcrb_base:
            return
        if self.rcrb_base is not None:
            self.bus.unmap_mmio(self.rcrb)
        if want is not None:
            self.bus.map_mmio(self.rcrb, want, RCRB_SIZE)
        self.rcrb_base = want


class Piix4Pm(_PmFunction):
    """PIIX4's power-management function at 00:01.3 (module docstring); owns the PM block."""

    def __init__(self, bus: DeviceBus, pm: PmIoBlock) -> None:
        super().__init__("piix4-pm", _INTEL, PIIX4_PM_DEVICE_ID, _CLASS_BRIDGE_OTHER, bus, pm, revision=3)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.put(PIIX4_PMBA, 4, 1)
        self.writable(PIIX4_PMBA, 4, 0xFFC0)
        self.put(PIIX4_PMREGMISC, 1, 0)
        self.writable(PIIX4_PMREGMISC, 1, PIIX4_PMIOSE)
        self._place_pm(0, False)

    def written(self, offset: int, size: int) -> None:
        if (offset < PIIX4_PMBA + 4 and PIIX4_PMBA < offset + size) or offset <= PIIX4_PMREGMISC < offset + size:
            self._place_pm(self.get(PIIX4_PMBA, 4) & 0xFFC0, bool(self.get(PIIX4_PMREGMISC, 1) & PIIX4_PMIOSE))


class Q35Mch(PciFunction):
    """Q35's memory controller hub at 00:00.0 (module docstring); places MMCONFIG."""

    def __init__(self, bus: DeviceBus, mmconfig: MmConfig, ext_tseg_mbytes: int = 16) -> None:
        super().__init__("q35-mch", _INTEL, Q35_MCH_DEVICE_ID, _CLASS_HOST, express=True)
        self.bus = bus
        self.mmconfig = mmconfig
        self.ext_tseg_mbytes = ext_tseg_mbytes
        self.mmconfig_window: tuple[int, int] | None = None
        """(base, size) where MMCONFIG decodes now, or None."""
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.put(PCIEXBAR, 8, PCIEXBAR_DEFAULT)
        self.writable(PCIEXBAR, 8, 0x0000_000F_FC00_0007)
        for off in range(0x90, 0x97):  # PAM0..PAM6
            self.put(off, 1, 0)
            self.writable(off, 1, 0x33 if off > 0x90 else 0x30)
        self.put(0x9D, 1, 0x02)  # SMRAM: C_BASE_SEG = 010b
        self.writable(0x9D, 1, 0x78)
        self.put(0x9E, 1, 0x38)  # ESMRAMC
        self.writable(0x9E, 1, 0x07)
        self.put(_EXT_TSEG_MBS, 2, 0)
        self.writable(_EXT_TSEG_MBS, 2, 0xFFFF)
        self._place_mmconfig(None)

    def written(self, offset: int, size: int) -> None:
        if offset < _EXT_TSEG_MBS + 2 and _EXT_TSEG_MBS < offset + size and \
                self.get(_EXT_TSEG_MBS, 2) == _EXT_TSEG_MBS_QUERY:
            self.put(_EXT_TSEG_MBS, 2, self.ext_tseg_mbytes)
        if offset < PCIEXBAR + 8 and PCIEXBAR < offset + size:
            bar = self.get(PCIEXBAR, 8)
            length = (bar >> 1) & 3
            if not bar & 1 or length == 3:
                self._place_mmconfig(None)
            else:
                size_ = (256 << 20) >> length
                self._place_mmconfig((bar & 0xF_FFFF_FFFF & ~(size_ - 1), size_))

    def _place_mmconfig(self, window: tuple[int, int] | None) -> None:
        if window == self.mmconfig_window:
            return
        if self.mmconfig_window is not None:
            self.bus.unmap_mmio(self.mmconfig)
        if window is not None:
            self.bus.map_mmio(self.mmconfig, *window)
        self.mmconfig_window = window


class I440fxHost(PciFunction):
    """The i440FX host bridge at 00:00.0 (module docstring)."""

    def __init__(self) -> None:
        super().__init__("i440fx", _INTEL, I440FX_DEVICE_ID, _CLASS_HOST, revision=2)
        self.reset()

    def reset(self) -> None:
        super().reset()
        for off in range(0x59, 0x60):
            self.writable(off, 1, 0x33 if off > 0x59 else 0x30)
        self.put(0x72, 1, 0x02)
        self.writable(0x72, 1, 0x78)


class Piix3Isa(PciFunction):
    """PIIX3's PCI-to-ISA bridge at 00:01.0 (function 0 of the multi-function PIIX)."""

    def __init__(self) -> None:
        super().__init__("piix3-isa", _INTEL, PIIX3_ISA_DEVICE_ID, _CLASS_ISA, header_type=_MULTIFUNCTION)
        self.reset()

    def reset(self) -> None:
        super().reset()
        for off in range(0x60, 0x64):
            self.put(off, 1, 0x80)
            self.writable(off, 1, 0x8F)


class ResetControl(Device):
    """The reset control register at port 0xCF9 (ICH9 RST_CNT, PIIX3 RCR): bit 2 requests a reset."""

    io_sizes = frozenset({1})

    def __init__(self, ich9: bool = True, name: str = "reset-control") -> None:
        super().__init__(name)
        self.keep = 0x0A if ich9 else 0x02
        self.value = 0

    def reset(self) -> None:
        self.value = 0

    def io_read(self, offset: int, size: int) -> int:
        return self.value

    def io_write(self, offset: int, size: int, value: int) -> None:
        if value & 0x04:
            if self.bus is not None:
                self.bus.requests.append(f"reset: port 0xCF9 <- {value:#04x}")
            return
        self.value = value & self.keep
