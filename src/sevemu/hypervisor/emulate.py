"""What KVM emulates for a guest whose memory and registers it can read: string port I/O.

Sources: APM2 15.10.2 (IOIO EXITINFO1: type, STR, REP, operand size, address size, segment),
Linux ``arch/x86/kvm/x86.c`` (``kvm_fast_pio`` / ``emulator_pio_in_out``: INS/OUTS go through the
instruction emulator, which reads or writes guest memory at ES:rDI / seg:rSI, steps rDI/rSI by the
operand size in the direction of RFLAGS.DF, counts rCX down for REP) and ``arch/x86/kvm/mmu``
(``kvm_mmu_gva_to_gpa_*``: the guest's page tables walked in software).

The guest's page tables are read through the host's view of guest memory (plaintext for a plain VM).
An SEV guest's memory is encrypted, so KVM cannot emulate its string I/O (and OVMF's IoLib unrolls
string I/O into single IN/OUT when SEV is active); :func:`string_io` refuses it with the reason.
Model choices: the segment is taken as flat (base 0: 32-bit flat and long mode, what firmware and
kernels run), and a REP instruction is completed in one exit.
"""

from __future__ import annotations

from collections.abc import Callable

from sevemu._util.units import PAGE
from sevemu.errors import UnmappedError
from sevemu.hw.svm import VmExit
from sevemu.hypervisor.vm import Vcpu, Vm

__all__ = ["string_io", "translate_gva"]

_CR0_PG = 1 << 31
_CR4_PAE = 1 << 5
_EFER_LMA = 1 << 10
_DF = 1 << 10
_ADDR = 0x000F_FFFF_FFFF_F000
_REP_LIMIT = 1 << 16

PortIn = Callable[[Vm, int, int], int]
PortOut = Callable[[Vm, int, int, int], None]


def translate_gva(vm: Vm, cr0: int, cr3: int, cr4: int, efer: int, gva: int) -> int | None:
    """The GPA of ``gva`` through the guest's page tables (None: not mapped), as KVM walks them:
    paging off, 4-level long mode, or 32-bit PAE / non-PAE paging."""
    if not cr0 & _CR0_PG:
        return gva & 0xFFFF_FFFF
    try:
        if efer & _EFER_LMA or cr4 & _CR4_PAE:
            levels: tuple[int, ...]
            if efer & _EFER_LMA:
                levels, table = (39, 30, 21, 12), cr3 & _ADDR
            else:
                pdpte = int.from_bytes(vm.host_read((cr3 & 0xFFFF_FFE0) + ((gva >> 30) & 3) * 8, 8), "little")
                if not pdpte & 1:
                    return None
                levels, table = (21, 12), pdpte & _ADDR
            for shift in levels:
                pte = int.from_bytes(vm.host_read(table + ((gva >> shift) & 0x1FF) * 8, 8), "little")
                if not pte & 1:
                    return None
                if shift in (30, 21) and pte & 0x80:
                    return (pte & _ADDR & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
                table = pte & _ADDR
            return table | (gva & 0xFFF)
        pde = int.from_bytes(vm.host_read((cr3 & 0xFFFF_F000) + ((gva >> 22) & 0x3FF) * 4, 4), "little")
        if not pde & 1:
            return None
        if pde & 0x80 and cr4 & 0x10:  # 4 MiB page (PSE)
            return (pde & 0xFFC0_0000) | (gva & 0x3F_FFFF)
        pte = int.from_bytes(vm.host_read((pde & 0xFFFF_F000) + ((gva >> 12) & 0x3FF) * 4, 4), "little")
        return (pte & 0xFFFF_F000) | (gva & 0xFFF) if pte & 1 else None
    except UnmappedError:
        return None


def string_io(vm: Vm, v: Vcpu, ex: VmExit, port_in: PortIn, port_out: PortOut) -> str | None:
    """Emulate the INS/OUTS of ``ex`` (an IOIO exit with STR) for ``v``: None when done (RIP past
    it), or why it cannot be (the caller crashes the VM with that reason)."""
    if vm.sev:
        return "string port I/O of an SEV guest cannot be emulated: its memory is encrypted"
    vmcb = v.vmcb
    regs = vmcb.regs
    info = ex.info1
    is_in = bool(info & 1)
    size = 4 if info & 0x40 else 2 if info & 0x20 else 1
    abits = 64 if info & 0x200 else 32 if info & 0x100 else 16
    amask = (1 << abits) - 1
    port = info >> 16
    rep = bool(info & 8)
    count = (regs["rcx"] & amask) if rep else 1
    if count > _REP_LIMIT:
        return f"REP string I/O of {count} elements at port {port:#x} is beyond the emulator's limit"
    step = -size if vmcb.rflags & _DF else size
    reg = "rdi" if is_in else "rsi"
    addr = regs[reg] & amask
    for _ in range(count):
        gpa = translate_gva(vm, vmcb.cr0, vmcb.cr3, vmcb.cr4, vmcb.efer, addr)
        if gpa is None or (gpa & (PAGE - 1)) + size > PAGE or gpa + size > vm.memory:
            return f"string port I/O at port {port:#x}: guest address {addr:#x} is not mapped (or crosses a page)"
        if is_in:
            vm.host_write(gpa, port_in(vm, port, size).to_bytes(size, "little"))
        else:
            port_out(vm, port, size, int.from_bytes(vm.host_read(gpa, size), "little"))
        addr = (addr + step) & amask
    regs[reg] = (regs[reg] & ~amask) | addr
    if rep:
        regs["rcx"] &= ~amask
    vmcb.rip = vmcb.next_rip
    return None
