"""Architectural states a vCPU starts in (what the launcher writes into the VMCB before VMRUN)."""

from __future__ import annotations

from dataclasses import dataclass

from sevemu.errors import InputError
from sevemu.hw.svm import GPRS, Segment, Vmcb
from sevemu.hw.x86.arch import (
    ATTR_CODE32,
    ATTR_CODE64,
    ATTR_DATA,
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    RFLAGS_FIXED,
)

__all__ = ["InitialState"]


@dataclass(frozen=True)
class InitialState:
    """The architectural state a vCPU starts in, written into its VMCB by :meth:`apply`.

    Two modes (``docs/cpu-engine.md``):

    * ``protected32`` -- what the bundled boot stub expects: 32-bit protected mode, flat 4 GiB code
      and data segments, paging off (so every access of an SEV guest is private), CR0 = PE|ET,
      CR3 = CR4 = EFER = 0, RFLAGS = 0x2 (interrupts off), no IDT; EIP = ``rip``, ESP = ``rsp``.
    * ``long64`` -- 64-bit long mode with the guest's own page tables at ``cr3``: CR0 = PE|ET|PG,
      CR4 = PAE, EFER = LME|LMA (+NXE when ``nxe``), flat 64-bit code segment.

    ``regs`` sets further general-purpose registers (names as in :data:`~sevemu.hw.svm.GPRS`).
    """

    rip: int
    mode: str = "protected32"
    rsp: int = 0
    cr3: int = 0
    nxe: bool = False
    regs: tuple[tuple[str, int], ...] = ()

    def validate(self) -> None:
        """Raise :class:`~sevemu.errors.InputError` with the reason when this state cannot run."""
        if self.mode not in ("protected32", "long64"):
            raise InputError(f"unknown initial mode {self.mode!r}: protected32 or long64")
        limit = 1 << 32 if self.mode == "protected32" else 1 << 47
        for name, value in (("rip", self.rip), ("rsp", self.rsp)):
            if not 0 <= value < limit:
                raise InputError(f"initial {name} {value:#x} is not a valid {self.mode} address")
        if self.mode == "long64":
            if self.cr3 <= 0 or self.cr3 & 0xFFF or self.cr3 >= 1 << 52:
                raise InputError(f"long64 needs a page-aligned CR3 for the guest's page tables, got {self.cr3:#x}")
        elif self.cr3:
            raise InputError("protected32 starts with paging off: CR3 must be 0")
        for name, value in self.regs:
            if name not in GPRS or name == "rsp":
                raise InputError(f"unknown general-purpose register {name!r}")
            if not 0 <= value < 1 << 64:
                raise InputError(f"initial {name} {value:#x} does not fit 64 bits")

    def segments(self) -> dict[str, Segment]:
        """The segment registers of the mode: flat code (0x08) and data (0x10) segments, a GDT and
        IDT of limit 0 (none yet), an empty LDT and a busy TSS -- what an SEV-ES vCPU's VMSA holds."""
        code = Segment(0x08, ATTR_CODE32 if self.mode == "protected32" else ATTR_CODE64, 0xFFFFFFFF, 0)
        data = Segment(0x10, ATTR_DATA, 0xFFFFFFFF, 0)
        none = Segment(0, 0, 0, 0)
        return {"es": data, "cs": code, "ss": data, "ds": data, "fs": data, "gs": data, "gdtr": none,
                "ldtr": Segment(0, 0x82, 0xFFFF, 0), "idtr": none, "tr": Segment(0, 0x8B, 0xFFFF, 0)}

    def apply(self, vmcb: Vmcb) -> None:
        """Validate, then write the state into ``vmcb`` (before the first VMRUN)."""
        self.validate()
        if self.mode == "protected32":
            vmcb.cr0, vmcb.cr3, vmcb.cr4, vmcb.efer = CR0_PE | CR0_ET, 0, 0, 0
        else:
            vmcb.cr0, vmcb.cr3, vmcb.cr4 = CR0_PE | CR0_ET | CR0_PG, self.cr3, CR4_PAE
            vmcb.efer = EFER_LME | EFER_LMA | (EFER_NXE if self.nxe else 0)
        vmcb.rip = self.rip
        vmcb.rflags = RFLAGS_FIXED
        vmcb.segments = self.segments()
        for name in GPRS:
            vmcb.regs[name] = 0
        vmcb.regs["rsp"] = self.rsp
        for name, value in self.regs:
            vmcb.regs[name] = value
