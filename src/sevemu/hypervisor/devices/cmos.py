"""CMOS RAM and the real-time clock (MC146818) at ports 0x70 (index) / 0x71 (data).

Registers per the MC146818A data sheet and QEMU hw/rtc/mc146818rtc.c: 0x00..0x09 the time and date
(BCD, 24-hour: register B = 0x02 after QEMU's reset), 0x0A register A (0x26: 32.768 kHz time base,
1024 Hz rate; UIP never set), 0x0B register B, 0x0C register C (flags, cleared by a read), 0x0D
register D (0x80: the RAM and time are valid), 0x32 the century (QEMU's ``RTC_CENTURY``).  Writing
the index port keeps bits 6:0 (bit 7 is the NMI mask); reading it returns 0xFF.  The clock runs on
the VM's virtual clock from ``base`` (seconds since the Unix epoch, UTC; QEMU's default ``-rtc
base=utc`` is the host's time at start, which a VMM passes; the default here is a fixed date so runs
repeat).  Writes to the time registers set the clock (while SET, register B bit 7, is clear).

Memory-size bytes as QEMU's ``pc_cmos_init`` (hw/i386/pc.c) writes them, which OVMF reads when fw_cfg
has no ``etc/e820`` (OvmfPkg/Library/PlatformInitLib/MemDetect.c ``PlatformGetSystemMemorySizeBelow4gb``
/ ``PlatformGetSystemMemorySizeAbove4gb``):

* 0x15/0x16: base memory in KiB (640 at most);
* 0x17/0x18 and 0x30/0x31: memory above 1 MiB in KiB (below 4 GiB, 65535 at most);
* 0x34/0x35: memory between 16 MiB and 4 GiB in 64 KiB units (65535 at most);
* 0x5B/0x5C/0x5D: memory above 4 GiB in 64 KiB units;
* 0x5F: the number of CPUs minus one; 0x14: the equipment byte (FPU, PS/2 mouse).

No interrupts (periodic, alarm, update-ended) are delivered; register C never shows them.
"""

from __future__ import annotations

import datetime
from typing import Final

from sevemu._util.units import KiB, MiB
from sevemu.hypervisor.devices.bus import Device
from sevemu.hypervisor.devices.clock import NS_PER_S

__all__ = ["DEFAULT_RTC_BASE", "Cmos", "cmos_memory_bytes"]

DEFAULT_RTC_BASE: Final = 1_767_225_600  # 2026-01-01 00:00:00 UTC
_REG_A: Final = 0x0A
_REG_B: Final = 0x0B
_REG_C: Final = 0x0C
_REG_D: Final = 0x0D
_CENTURY: Final = 0x32
_REG_B_SET: Final = 0x80
_REG_B_BINARY: Final = 0x04
_REG_B_24H: Final = 0x02
_TIME_REGS: Final = (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, _CENTURY)


def cmos_memory_bytes(below_4g: int, above_4g: int, cpus: int) -> dict[int, int]:
    """The CMOS bytes QEMU's ``pc_cmos_init`` derives from the RAM layout and the CPU count."""
    out: dict[int, int] = {}

    def word(lo: int, value: int, nbytes: int = 2) -> None:
        for i in range(nbytes):
            out[lo + i] = (value >> (8 * i)) & 0xFF

    word(0x15, min(below_4g // KiB, 640))
    ext = min((below_4g - MiB) // KiB if below_4g > MiB else 0, 0xFFFF)
    word(0x17, ext)
    word(0x30, ext)
    word(0x34, min((below_4g - 16 * MiB) // (64 * KiB) if below_4g > 16 * MiB else 0, 0xFFFF))
    word(0x5B, above_4g // (64 * KiB), 3)
    out[0x5F] = (cpus - 1) & 0xFF
    out[0x14] = 0x02 | 0x04  # FPU, PS/2 mouse
    return out


def _bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


class Cmos(Device):
    """The MC146818 RTC and its 128 bytes of CMOS RAM (module docstring)."""

    io_sizes = frozenset({1})

    def __init__(self, memory: dict[int, int] | None = None, *, base: int = DEFAULT_RTC_BASE,
                 name: str = "cmos") -> None:
        super().__init__(name)
        self.memory = dict(memory or {})
        self.base = base
        self._offset_s = 0  # seconds the guest moved the clock by
        self.index = 0
        self.ram = bytearray(128)
        self.reset()

    def reset(self) -> None:
        self.ram = bytearray(128)
        for k, v in self.memory.items():
            self.ram[k] = v
        self.ram[_REG_A] = 0x26
        self.ram[_REG_B] = _REG_B_24H
        self.ram[_REG_D] = 0x80
        self.index = 0

    def now(self) -> datetime.datetime:
        """The RTC's date and time now."""
        secs = self.base + self._offset_s + (self.clock.ns // NS_PER_S if self.bus is not None else 0)
        return datetime.datetime.fromtimestamp(secs, datetime.UTC)

    def _time_fields(self) -> dict[int, int]:
        t = self.now()
        return {0x00: t.second, 0x02: t.minute, 0x04: t.hour, 0x06: t.isoweekday() % 7 + 1, 0x07: t.day,
                0x08: t.month, 0x09: t.year % 100, _CENTURY: t.year // 100}

    def io_read(self, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF
        i = self.index
        if i in _TIME_REGS:
            v = self._time_fields()[i]
            return v if self.ram[_REG_B] & _REG_B_BINARY else _bcd(v)
        v = self.ram[i]
        if i == _REG_C:
            self.ram[_REG_C] = 0
        return v

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.index = value & 0x7F
            return
        i = self.index
        if i in (_REG_C, _REG_D):
            return  # read-only
        if i in _TIME_REGS and not self.ram[_REG_B] & _REG_B_SET:
            self._set_field(i, value if self.ram[_REG_B] & _REG_B_BINARY else _unbcd(value))
            return
        self.ram[i] = value

    def _set_field(self, index: int, value: int) -> None:
        f = self._time_fields()
        f[index] = value
        try:
            t = datetime.datetime(f[_CENTURY] * 100 + f[0x09], f[0x08], f[0x07], f[0x04], f[0x02], f[0x00],
                                  tzinfo=datetime.UTC)
        except ValueError:
            return  # an impossible date in between field writes: keep the clock
        self._offset_s += int(t.timestamp()) - int(self.now().timestamp())
