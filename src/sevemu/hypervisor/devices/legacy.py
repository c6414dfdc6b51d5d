"""Legacy PC ports a firmware touches early: the 8259 PICs, POST/debug ports, System Control Port A.

* 8259A PICs (Intel 8259A data sheet; QEMU hw/intc/i8259.c): master at 0x20/0x21, slave at
  0xA0/0xA1, edge/level control (ELCR) at 0x4D0/0x4D1.  A command write with bit 4 set is ICW1 and
  starts the initialisation sequence (ICW2, ICW3, and ICW4 when ICW1 bit 0 asks for it, on the data
  port); afterwards the data port reads and writes the interrupt mask (OCW1); OCW2/OCW3 are
  accepted.  IRR and ISR read 0: no interrupt is ever raised.  SEC and PEI only mask both PICs.
* Port 0x80: POST codes (QEMU's ``ioport80``: writes dropped, reads all ones); every byte written is
  recorded.
* Port 0x402: QEMU's ISA debug console (``-debugcon``; hw/char/debugcon.c) as OVMF's debug builds
  use it (OvmfPkg/Library/PlatformDebugLibIoPort: present when a read returns 0xE9); the bytes are
  recorded.  Model choice: the debug console is present.
* Port 0x92, System Control Port A (QEMU hw/i386/pc.c ``port92``): bit 1 is the A20 gate, a 0 -> 1
  change of bit 0 requests a reset; reads return the last value written.
"""

from __future__ import annotations

from typing import Final

from sevemu.hypervisor.devices.bus import Device, ones

__all__ = ["DEBUGCON_PORT", "POST_PORT", "DebugPort", "Elcr", "Pic8259", "Port92", "debugcon"]

POST_PORT: Final = 0x80
DEBUGCON_PORT: Final = 0x402
_DEBUGCON_READBACK: Final = 0xE9


class Pic8259(Device):
    """One 8259A (module docstring); ``elcr`` is its ELCR byte."""

    io_sizes = frozenset({1})

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.imr = 0
        self.icw: list[int] = []
        self._init_step = 0  # ICWs still expected on the data port
        self._icw4 = False
        self.elcr = 0
        self.ocw: list[int] = []

    def reset(self) -> None:
        self.imr = 0
        self.icw = []
        self._init_step = 0
        self.elcr = 0

    def io_read(self, offset: int, size: int) -> int:
        if offset == 1:
            return self.imr
        return 0  # IRR / ISR

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            if value & 0x10:  # ICW1
                self.icw = [value]
                self.imr = 0
                self._icw4 = bool(value & 1)
                self._init_step = 3 if self._icw4 else 2
            else:
                self.ocw.append(value)
            return
        if self._init_step:
            self.icw.append(value)
            self._init_step -= 1
            return
        self.imr = value


class Elcr(Device):
    """The two ELCR bytes at 0x4D0/0x4D1 (one per PIC)."""

    io_sizes = frozenset({1})

    def __init__(self, master: Pic8259, slave: Pic8259, name: str = "elcr") -> None:
        super().__init__(name)
        self.pics = (master, slave)

    def io_read(self, offset: int, size: int) -> int:
        return self.pics[offset].elcr

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.pics[offset].elcr = value & (0xF8 if offset == 0 else 0xDE)  # IRQ 0-2, 8, 13 are edge only


class DebugPort(Device):
    """A port whose written bytes are recorded (port 0x80, the 0x402 debug console)."""

    io_sizes = frozenset({1})

    def __init__(self, name: str, readback: int | None = None) -> None:
        super().__init__(name)
        self.data = bytearray()
        self.readback = readback

    def io_read(self, offset: int, size: int) -> int:
        return ones(size) if self.readback is None else self.readback

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.data.append(value)


def debugcon() -> DebugPort:
    """QEMU's ISA debug console at 0x402 (reads 0xE9)."""
    return DebugPort("debugcon", _DEBUGCON_READBACK)


class Port92(Device):
    """System Control Port A (module docstring)."""

    io_sizes = frozenset({1})

    def __init__(self, name: str = "port92") -> None:
        super().__init__(name)
        self.value = 0

    def reset(self) -> None:
        self.value = 0

    @property
    def a20(self) -> bool:
        return bool(self.value & 2)

    def io_read(self, offset: int, size: int) -> int:
        return self.value

    def io_write(self, offset: int, size: int, value: int) -> None:
        old = self.value
        self.value = value
        if value & 1 and not old & 1 and self.bus is not None:
            self.bus.requests.append(f"reset: port 0x92 <- {value:#04x}")
