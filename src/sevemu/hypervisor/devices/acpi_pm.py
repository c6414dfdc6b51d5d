"""The ACPI PM I/O block: PM1 event and control registers and the PM timer.

ACPI 6.5 section 4.8.3 (PM1 event grouping: PM1_STS, PM1_EN; PM1 control: SCI_EN, SLP_TYP, SLP_EN)
and 4.8.3.3 (the power management timer: 3.579545 MHz, 24 bits unless the FADT sets TMR_VAL_EXT).
QEMU (hw/acpi/core.c ``acpi_pm_tmr_get``) computes the timer from its virtual clock as
``ns * 3579545 / 10^9`` truncated to 24 bits, and its FADT (hw/i386/acpi-build.c
``init_common_fadt_data``) does not set TMR_VAL_EXT: the timer is 24 bits wide, as OVMF's
AcpiTimerLib also assumes (``ACPI_TIMER_COUNT_SIZE = BIT24``).  Here it runs on the VM's
:class:`~sevemu.hypervisor.devices.clock.VirtualClock`; each read is a timer poll
(:meth:`~sevemu.hypervisor.devices.clock.VirtualClock.poll_step`), so a guest spinning on it sees it
move on every read and leaves ``MicroSecondDelay`` after bounded work.

Layouts, relative to the block's base (PMBASE / PMBA, placed by the chipset function):

* both chipsets: PM1_STS +0 (16 bits, write 1 to clear), PM1_EN +2, PM1_CNT +4, PM_TMR +8;
* ICH9 (Q35; Intel I/O Controller Hub 9 datasheet, 12.8.3; QEMU hw/acpi/ich9.c, 128 bytes):
  GPE0_STS +0x20 and GPE0_EN +0x28 (8 bytes each), SMI_EN +0x30, SMI_STS +0x34;
* PIIX4 (82371AB datasheet, 7.2; QEMU hw/acpi/piix4.c, 64 bytes): nothing else decoded.

A write of SLP_EN with a sleep type is recorded as a request (:attr:`~sevemu.hypervisor.devices.bus.
DeviceBus.requests`); no SCI is raised (no interrupt delivery), TMR_STS is not set on wrap.
"""

from __future__ import annotations

from typing import Final

from sevemu.hypervisor.devices.bus import Device, ones
from sevemu.hypervisor.devices.clock import NS_PER_S

__all__ = ["PM_TIMER_HZ", "PmIoBlock", "pm_timer_ticks"]

PM_TIMER_HZ: Final = 3_579_545
_TMR_MASK: Final = (1 << 24) - 1
_SLP_EN: Final = 1 << 13
_SCI_EN: Final = 1 << 0


def pm_timer_ticks(ns: int) -> int:
    """The 24-bit PM timer value at virtual time ``ns`` (QEMU ``acpi_pm_tmr_get``)."""
    return ns * PM_TIMER_HZ // NS_PER_S & _TMR_MASK


class PmIoBlock(Device):
    """The PM I/O block of an ICH9 (``ich9=True``, 128 bytes) or a PIIX4 (64 bytes)."""

    quiet = True  # timer reads are polls; other registers end a polling streak themselves

    def __init__(self, name: str = "acpi-pm", *, ich9: bool = True) -> None:
        super().__init__(name)
        self.ich9 = ich9
        self.size = 0x80 if ich9 else 0x40
        self.pm1_sts = 0
        self.pm1_en = 0
        self.pm1_cnt = 0
        self.regs = bytearray(self.size)  # GPE0 / SMI registers (ICH9)
        self.timer_reads = 0

    def reset(self) -> None:
        self.pm1_sts = self.pm1_en = self.pm1_cnt = 0
        self.regs = bytearray(self.size)

    def timer(self) -> int:
        """The PM timer now (without a poll step)."""
        return pm_timer_ticks(self.clock.ns)

    def io_read(self, offset: int, size: int) -> int:
        if 8 <= offset < 12:
            self.timer_reads += 1
            self.clock.poll_step()
            return pm_timer_ticks(self.clock.ns) >> (8 * (offset - 8))
        self.clock.touch()
        if offset < 8:
            word = self.pm1_sts | self.pm1_en << 16 if offset < 4 else self.pm1_cnt
            return word >> (8 * (offset & 3))
        if self.ich9 and 0x20 <= offset < 0x38:
            return int.from_bytes(self.regs[offset : offset + size], "little")
        return ones(size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.clock.touch()
        data = value.to_bytes(size, "little")
        for i, b in enumerate(data):
            self._write_byte(offset + i, b)
        if offset <= 5 < offset + size and self.pm1_cnt & _SLP_EN:
            self.pm1_cnt &= ~_SLP_EN  # SLP_EN reads as 0
            if self.bus is not None:
                self.bus.requests.append(f"sleep: PM1_CNT SLP_TYP {(self.pm1_cnt >> 10) & 7}")

    def _write_byte(self, off: int, b: int) -> None:
        if off < 2:  # PM1_STS: write 1 to clear
            self.pm1_sts &= ~(b << (8 * off))
        elif off < 4:
            sh = 8 * (off - 2)
            self.pm1_en = (self.pm1_en & ~(0xFF << sh)) | b << sh
        elif off < 8:
            sh = 8 * (off - 4)
            self.pm1_cnt = (self.pm1_cnt & ~(0xFF << sh)) | b << sh
        elif self.ich9 and 0x20 <= off < 0x38:
            if off < 0x28 or 0x34 <= off:  # GPE0_STS, SMI_STS: write 1 to clear
                self.regs[off] &= ~b & 0xFF
            else:
                self.regs[off] = b
