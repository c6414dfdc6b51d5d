"""A minimal guest kernel, as a Python workload on the vCPU (see :mod:`sevemu.hw.pyengine`).

Boot, as an SEV guest's early code does it (Linux ``sme_enable``/``sev_enable``):

1. ``CPUID 0x8000001F`` for the C-bit position, ``RDMSR SEV_STATUS`` (never intercepted) to learn
   whether memory encryption is active -- a plain VM sees SEV_STATUS = 0 and uses no C-bit;
2. clear the page-table pages and build identity-map page tables
   (:class:`~sevemu.guest.paging.PageTableBuilder`) while paging is off -- every store is private then;
3. load CR3, set CR0.PG;
4. announce the shared (C=0) pages to the host with the KVM_HC_MAP_GPA_RANGE hypercall.

:func:`boot` is a generator to ``yield from`` at the start of a workload; it returns a
:class:`GuestInfo`.  The helpers below (:func:`print_`, ...) are small guest-library routines.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

from sevemu._util.units import PAGE
from sevemu.guest.paging import PageTableBuilder
from sevemu.hw.pyengine import Op, op

__all__ = ["COM1", "KVM_HC_MAP_GPA_RANGE", "SEV_STATUS_MSR", "GuestInfo", "boot", "print_"]

COM1 = 0x3F8
KVM_HC_MAP_GPA_RANGE = 12
SEV_STATUS_MSR = 0xC0010131
CR0_PG = 1 << 31

Gen = Generator[Op, Any, Any]


@dataclass(frozen=True)
class GuestInfo:
    """What the guest learned while booting."""

    sev: bool
    cbit: int  # position, 0 when memory encryption is off
    cr3: int
    tables_end: int


def boot(mapped: int, tables_at: int = 0x10000, shared: Iterable[int] = ()) -> Gen:
    """Enable paging with an identity map of ``[0, mapped)``; ``shared`` pages get C=0."""
    shared = list(shared)
    _, ebx, _, _ = yield op.cpuid(0x8000001F)
    status = yield op.rdmsr(SEV_STATUS_MSR)
    sev = bool(status & 1)
    cbit_pos = ebx & 0x3F if sev else 0
    builder = PageTableBuilder(tables_at, mapped, (1 << cbit_pos) if sev else 0, shared)
    # Clear the table pages first, as a kernel clears every page-table page it allocates: fresh
    # encrypted memory reads as whatever DRAM decrypts to, not zeros, and garbage entries could
    # look present.
    for page in range(builder.base, builder.end, PAGE):
        yield op.write(page, bytes(PAGE))
    for gpa, value in builder.entries:
        yield op.store(gpa, 8, value)
    yield op.write_cr(3, builder.root)
    yield op.write_cr(0, 0x10 | CR0_PG | 1)
    for page in shared:
        yield op.vmmcall(rax=KVM_HC_MAP_GPA_RANGE, rbx=page & ~0xFFF, rcx=1, rdx=0)
    return GuestInfo(sev, cbit_pos, builder.root, builder.end)


def print_(text: str) -> Gen:
    """Write ``text`` to the serial console (COM1), one OUT per byte."""
    for byte in text.encode():
        yield op.out(COM1, byte)
