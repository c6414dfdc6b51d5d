"""The local APIC's MMIO page at 0xFEE00000, as far as OVMF's SEC and PEI use it.

Register offsets per the AMD64 Architecture Programmer's Manual vol. 2 (24593), section 16.3
"Local APIC", table 16-2, and QEMU hw/intc/apic.c: ID 0x20 (APIC ID in bits 31:24), version 0x30
(0x14 with 5 in bits 23:16, the LVT count minus one: QEMU's ``APIC_LVT_NB`` and KVM's in-kernel APIC
without CMCI both have 6 entries), TPR 0x80, PPR 0xA0, EOI 0xB0, LDR 0xD0,
DFR 0xE0 (reset 0xFFFFFFFF), SVR 0xF0 (reset 0xFF), ISR/TMR/IRR 0x100..0x270 (always 0: nothing is
ever delivered), ESR 0x280, ICR 0x300/0x310, the LVT entries 0x320..0x370 (reset: masked,
0x10000), the timer's initial count 0x380, current count 0x390 and divide configuration 0x3E0.

* The timer (APM2 16.4.1) counts down from the initial count at the APIC bus rate divided by the
  divide configuration; the bus rate is KVM's 1 GHz (``APIC_BUS_CYCLE_NS``), on the VM's virtual
  clock.  One-shot stops at 0; periodic (LVT timer bit 17) reloads.  OVMF's SEC programs SVR, the LVT
  timer and the initial count (``InitializeApicTimer``) and its timer library reads the current count.
  Expiry raises no interrupt (no interrupt delivery is modelled); :attr:`Lapic.timer_expiries`
  counts them.
* The ICR: a write of the low half sends an IPI, which is recorded
  (:attr:`Lapic.ipis`: destination, vector, delivery mode -- INIT 5 and STARTUP 6 are how CpuMpPei
  wakes the APs, INIT-SIPI-SIPI); the delivery status always reads idle.  Starting APs is the VMM's
  business (it reads the record).
* IA32_APIC_BASE (MSR 0x1B; APM2 16.3.1): base 0xFEE00000, bit 11 APIC enable, bit 8 BSP, as KVM
  sets it at reset (``kvm_lapic_reset``).  OVMF needs the BSP bit: its PEI MpInitLib
  (``GetCpuMpData``) takes a vCPU without it for an AP and reads its data pointer from below the IDT
  -- a #GP on the temporary-RAM fill pattern 0x5AA55AA5... in a run without it.  A write moves or
  disables the MMIO page; the x2APIC enable bit (10) is kept but x2APIC is not modelled.  The model
  has one LAPIC, the BSP's: every vCPU sees it (per-vCPU APICs are not modelled).
* Only 32-bit accesses to 16-byte-aligned registers are meaningful; other accesses read 0 and are
  dropped, as the APM says they are undefined.  x2APIC (MSR access) is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sevemu.hypervisor.devices.bus import Device

__all__ = ["IA32_APIC_BASE", "LAPIC_BASE", "Ipi", "Lapic"]

LAPIC_BASE: Final = 0xFEE0_0000
LAPIC_SIZE: Final = 0x1000
IA32_APIC_BASE: Final = 0x1B
_APIC_BASE_BSP: Final = 1 << 8
_APIC_BASE_EXTD: Final = 1 << 10
_APIC_BASE_ENABLE: Final = 1 << 11
_BUS_HZ_NS: Final = 1  # KVM: one APIC bus cycle per nanosecond
_MASKED: Final = 1 << 16
_PERIODIC: Final = 1 << 17
_LVTS: Final = (0x320, 0x330, 0x340, 0x350, 0x360, 0x370)
_WRITABLE: Final = {0x80: 0xFF, 0xD0: 0xFF000000, 0xE0: 0xF0000000, 0xF0: 0x13FF, 0x310: 0xFF000000,
                    0x3E0: 0x0B, 0x280: 0}
_LVT_WMASK: Final = {0x320: 0x310FF, 0x330: 0x117FF, 0x340: 0x117FF, 0x350: 0x1B7FF,
                     0x360: 0x1B7FF, 0x370: 0x110FF}


@dataclass(frozen=True, slots=True)
class Ipi:
    """One interprocessor interrupt the guest sent through the ICR."""

    destination: int
    vector: int
    delivery_mode: int
    shorthand: int
    level: bool


class Lapic(Device):
    """One vCPU's local APIC registers (module docstring)."""

    mmio_sizes = frozenset({4})

    def __init__(self, apic_id: int = 0, name: str = "lapic") -> None:
        super().__init__(name)
        self.apic_id = apic_id
        self.apic_base = LAPIC_BASE | _APIC_BASE_ENABLE | (_APIC_BASE_BSP if apic_id == 0 else 0)
        """IA32_APIC_BASE (module docstring)."""
        self.regs: dict[int, int] = {}
        self.ipis: list[Ipi] = []
        self.timer_expiries = 0
        self._load_ns = 0
        self._counted = 0
        self.reset()

    def reset(self) -> None:
        self.regs = {0x20: self.apic_id << 24, 0x30: 0x0005_0014, 0xE0: 0xFFFF_FFFF, 0xF0: 0xFF,
                     0x380: 0, 0x3E0: 0, **{lvt: _MASKED for lvt in _LVTS}}
        self._load_ns = 0
        self._counted = 0

    def msr_read(self, msr: int) -> int:
        return self.apic_base

    def msr_write(self, msr: int, value: int) -> None:
        new = (value & 0xF_FFFF_F000) | (value & (_APIC_BASE_ENABLE | _APIC_BASE_EXTD)) | (self.apic_base & _APIC_BASE_BSP)
        if new == self.apic_base:
            return
        self.apic_base = new
        if self.bus is not None:  # the page follows the base (and goes away while disabled)
            self.bus.unmap_mmio(self)
            if new & _APIC_BASE_ENABLE:
                self.bus.map_mmio(self, new & ~0xFFF, LAPIC_SIZE)

    @property
    def divisor(self) -> int:
        """The timer's divide value (APM2 16.4.1: DCR bits 3 and 1:0)."""
        dcr = self.regs.get(0x3E0, 0)
        v = (dcr & 3) | (dcr & 8) >> 1
        return 1 if v == 7 else 2 << v

    def current_count(self) -> int:
        """The timer's current count on the virtual clock."""
        initial = self.regs.get(0x380, 0)
        if not initial:
            return 0
        ticks = (self.clock.ns - self._load_ns) // (_BUS_HZ_NS * self.divisor)
        if self.regs[0x320] & _PERIODIC:
            periods = ticks // initial
            self._expired(periods)
            return initial - ticks % initial
        if ticks >= initial:
            self._expired(1)
            return 0
        return initial - ticks

    def _expired(self, n: int) -> None:
        if n > self._counted:
            self.timer_expiries += n - self._counted
            self._counted = n

    def mmio_read(self, offset: int, size: int) -> int:
        if offset & 0xF:
            return 0
        if offset == 0x390:
            return self.current_count()
        if offset == 0x300:
            return self.regs.get(0x300, 0) & ~(1 << 12)  # delivery status: idle
        return self.regs.get(offset, 0)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if offset & 0xF:
            return
        if offset == 0xB0:
            return  # EOI: nothing is in service
        if offset == 0x380:
            self.regs[0x380] = value
            self._load_ns = self.clock.ns
            self._counted = 0
            return
        if offset == 0x300:
            self.regs[0x300] = value & 0x000C_DFFF
            self.ipis.append(Ipi(self.regs.get(0x310, 0) >> 24, value & 0xFF, (value >> 8) & 7,
                                 (value >> 18) & 3, bool(value & 1 << 14)))
            return
        mask = _LVT_WMASK.get(offset, _WRITABLE.get(offset))
        if mask is None:
            return  # read-only or reserved
        if offset in _LVT_WMASK and not self.regs.get(0xF0, 0) & 0x100:
            value |= _MASKED  # software-disabled APIC: LVT entries stay masked
        self.regs[offset] = (self.regs.get(offset, 0) & ~mask) | (value & mask)
