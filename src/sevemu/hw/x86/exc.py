"""Exception delivery through the guest's IDT, written once for the vCPU engines (APM2 8.2 "Vectors",
8.7 "Legacy Protected-Mode Interrupt Control Transfers", 8.9 "Long-Mode Interrupt Control Transfers",
8.9.4 "Interrupt-Stack Table"; #VC: APM2 15.35.5).

An engine that must deliver exception ``vector`` (a fault with or without an error code, or a
software interrupt) describes the CPU with a :class:`CpuView` and gives memory access through an
:class:`IdtPort`; :func:`deliver` reads the gate, builds the stack frame and returns the state the
handler starts in (:class:`Delivered`), or why delivery failed.  The engine escalates a failure as
the CPU does: a fault while delivering a fault is #DF (error code 0), a fault while delivering #DF
is a triple fault (shutdown) -- :func:`escalate`.

What is modelled:

* long mode: 16-byte gates (64-bit interrupt and trap gates), the new RSP aligned down to 16 bytes,
  the interrupt-stack table (IST 1-7 from the 64-bit TSS at TR base + 0x24), frame SS, RSP, RFLAGS,
  CS, RIP [, error code];
* 32-bit protected mode: 8-byte 32-bit interrupt and trap gates, frame EFLAGS, CS, EIP [, error code]
  on the current stack;
* RFLAGS: TF, NT, RF (and VM) cleared; IF cleared by an interrupt gate, kept by a trap gate.

Deliberate limits (the guests -- the bundled runtime, OVMF's SEC and PEI, a Linux kernel before
user space -- run at CPL 0 with one code segment): the handler's code selector must be the current
CS (an engine cannot reload a descriptor), privilege changes, task gates, 16-bit gates and real-mode
IVT delivery are refused with a reason (which becomes a triple fault).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from sevemu.hw.x86.arch import Vector

__all__ = ["ERROR_CODE_VECTORS", "CpuView", "Delivered", "IdtPort", "deliver", "escalate"]

ERROR_CODE_VECTORS: Final = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                                        Vector.AC, Vector.CP, Vector.VC, Vector.SX})
"""Vectors whose exceptions push an error code (APM2 Table 8-1)."""

_RFLAGS_TF: Final = 1 << 8
_RFLAGS_IF: Final = 1 << 9
_RFLAGS_NT: Final = 1 << 14
_RFLAGS_RF: Final = 1 << 16
_RFLAGS_VM: Final = 1 << 17
_INTERRUPT_GATE: Final = 0xE
_TRAP_GATE: Final = 0xF
_TSS_IST: Final = 0x24  # IST1 in the 64-bit TSS; ISTn at 0x24 + 8 (n - 1)


class IdtPort(Protocol):
    """Guest-virtual memory access for delivery (supervisor accesses in the current paging mode)."""

    def read_virt(self, gva: int, n: int) -> bytes | None:
        """``n`` bytes at ``gva``, or None when the access faults."""
        ...

    def write_virt(self, gva: int, data: bytes) -> bool:
        """Store ``data`` at ``gva``; False when the access faults (nothing stored)."""
        ...


@dataclass(frozen=True, slots=True)
class CpuView:
    """What delivery needs of the interrupted CPU."""

    long_mode: bool
    idtr_base: int
    idtr_limit: int
    cs: int
    ss: int
    rip: int
    rsp: int
    rflags: int
    tr_base: int = 0


@dataclass(frozen=True, slots=True)
class Delivered:
    """The state the handler starts in."""

    rip: int
    rsp: int
    rflags: int


def deliver(port: IdtPort, cpu: CpuView, vector: int, error_code: int | None) -> Delivered | str:
    """Deliver ``vector`` (pushing ``error_code`` unless None) through the IDT; the handler's state,
    or the reason delivery failed (the caller escalates, :func:`escalate`)."""
    size = 16 if cpu.long_mode else 8
    if vector * size + size - 1 > cpu.idtr_limit:
        return f"vector {vector} is beyond the IDT limit {cpu.idtr_limit:#x}"
    raw = port.read_virt(cpu.idtr_base + vector * size, size)
    if raw is None:
        return f"the IDT entry of vector {vector} at {cpu.idtr_base + vector * size:#x} is not readable"
    attr = raw[5]
    gate_type = attr & 0xF
    if not attr & 0x80:
        return f"the IDT entry of vector {vector} is not present"
    if gate_type not in (_INTERRUPT_GATE, _TRAP_GATE):
        return f"the IDT entry of vector {vector} has gate type {gate_type:#x} (only interrupt and trap gates)"
    selector = int.from_bytes(raw[2:4], "little")
    if selector & ~3 != cpu.cs & ~3:
        return (f"the handler of vector {vector} is in code segment {selector:#x}, not the current {cpu.cs:#x} "
                "(segment reloads are not modelled)")
    target = int.from_bytes(raw[0:2], "little") | int.from_bytes(raw[6:8], "little") << 16
    if cpu.long_mode:
        target |= int.from_bytes(raw[8:12], "little") << 32
        ist = raw[4] & 7
        rsp = cpu.rsp
        if ist:
            slot = port.read_virt(cpu.tr_base + _TSS_IST + 8 * (ist - 1), 8)
            if slot is None:
                return f"IST{ist} of vector {vector} is not readable in the TSS at {cpu.tr_base:#x}"
            rsp = int.from_bytes(slot, "little")
        rsp &= ~0xF
        words = [cpu.ss, cpu.rsp, cpu.rflags, cpu.cs, cpu.rip]
        width = 8
    else:
        rsp = cpu.rsp & 0xFFFFFFFF
        words = [cpu.rflags & 0xFFFFFFFF, cpu.cs, cpu.rip & 0xFFFFFFFF]
        width = 4
    if error_code is not None:
        words.append(error_code)
    frame = b"".join((w & ((1 << (8 * width)) - 1)).to_bytes(width, "little") for w in reversed(words))
    new_rsp = (rsp - len(frame)) & ((1 << 64) - 1 if cpu.long_mode else 0xFFFFFFFF)
    if not port.write_virt(new_rsp, frame):
        return f"the stack at {new_rsp:#x} is not writable for the frame of vector {vector}"
    rflags = cpu.rflags & ~(_RFLAGS_TF | _RFLAGS_NT | _RFLAGS_RF | _RFLAGS_VM)
    if gate_type == _INTERRUPT_GATE:
        rflags &= ~_RFLAGS_IF
    return Delivered(target, new_rsp, rflags)


def escalate(port: IdtPort, cpu: CpuView, vector: int, error_code: int | None) -> Delivered | str:
    """:func:`deliver`, then #DF when that fails, then shutdown (the returned reason) when #DF
    fails too (APM2 8.2.9: a contributory fault or #PF during delivery of #PF is #DF)."""
    first = deliver(port, cpu, vector, error_code)
    if isinstance(first, Delivered) or vector == Vector.DF:
        return first
    second = deliver(port, cpu, Vector.DF, 0)
    if isinstance(second, Delivered):
        return second
    return f"{first}; then #DF: {second}"
