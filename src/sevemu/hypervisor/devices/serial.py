"""The serial console: a 16550A UART at COM1 (0x3F8), as far as a guest writing text needs.

Registers per the NS16550A data sheet (and QEMU hw/char/serial.c): THR/RBR at +0 (the divisor
latch low byte while LCR.DLAB is set), IER at +1 (divisor high byte under DLAB), IIR/FCR at +2,
LCR at +3, MCR at +4, LSR at +5, MSR at +6, SCR at +7.  What the guest writes to THR is appended
to the console buffer (the VM's ``console``).  Model choice: the line status reads 0x20 (THR
empty) -- the value sevemu's console always answered -- so a guest polling it writes at once; there
is no receive path (RBR reads 0, data-ready never set), no interrupts, no FIFO timing.
"""

from __future__ import annotations

from typing import Final

from sevemu.hypervisor.devices.bus import Device

__all__ = ["COM1", "Uart16550"]

COM1: Final = 0x3F8
_LSR_THRE: Final = 0x20
_LCR_DLAB: Final = 0x80
_IIR_NO_INT: Final = 0x01


class Uart16550(Device):
    """A 16550A whose transmitter appends to ``out``."""

    io_sizes = frozenset({1})

    def __init__(self, out: bytearray, name: str = "com1") -> None:
        super().__init__(name)
        self.out = out
        self.regs = bytearray(8)  # IER, (IIR), LCR, MCR, (LSR), MSR, SCR by offset
        self.divisor = 12  # 9600 baud after reset, as a BIOS leaves it

    def reset(self) -> None:
        self.regs = bytearray(8)

    def io_read(self, offset: int, size: int) -> int:
        dlab = self.regs[3] & _LCR_DLAB
        if offset == 0:
            return self.divisor & 0xFF if dlab else 0
        if offset == 1:
            return self.divisor >> 8 if dlab else self.regs[1]
        if offset == 2:
            return _IIR_NO_INT
        if offset == 5:
            return _LSR_THRE
        return self.regs[offset]

    def io_write(self, offset: int, size: int, value: int) -> None:
        dlab = self.regs[3] & _LCR_DLAB
        if offset == 0:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self.out.append(value)
        elif offset == 1 and dlab:
            self.divisor = (self.divisor & 0xFF) | value << 8
        elif offset in (1, 3, 4, 7):
            self.regs[offset] = value
