"""The x86 reset state on the Unicorn engine: real mode with the reset segment state.

Firmware such as OVMF starts where a real x86 CPU starts after RESET/INIT (APM2 14.1.3): real mode,
CR0 = ET (PE and PG clear), CS selector 0xF000 with the hidden base 0xFFFF0000 and limit 0xFFFF, RIP
0xFFF0 -- the first instruction is at linear 0xFFFF_FFF0, the top of the flash.  The engine runs
Unicorn in ``UC_MODE_64``, whose segment-register writes set only the selector, never the hidden
base; so the engine does not write segments at all: its first VMRUN is a real ``VMRUN`` inside
Unicorn, and QEMU's ``helper_vmrun`` loads ES, CS, SS and DS *with their hidden parts* (base, limit,
attributes) from the private VMCB's save area, then CR0 (PE clear: real mode), EFER, RFLAGS and RIP --
exactly how an SVM hypervisor starts a vCPU in its reset state.  This module holds the two facts
the engine needs for that:

* :func:`real_mode_reason` -- whether a real-mode save state is one the engine can start (the code
  segment given with its hidden part, no paging, no long mode);
* :func:`entry_linear` -- the linear address of the first instruction (CS base + RIP): Unicorn
  compares its exit addresses and code hooks with linear addresses, not with RIP.

(The alternative a feasibility probe used -- a ``UC_MODE_16`` instance whose CPU context is copied
into the 64-bit one -- gives CS base 0xF0000 instead of 0xFFFF0000, i.e. the legacy alias of the
reset vector; the VMRUN path is the faithful one and costs nothing extra.)

Limits, chosen for firmware reset code (OVMF's ``ResetVector`` runs 18 instructions in real mode
and then enters 32-bit protected mode with a far jump): an intercept, port I/O or exception *in real
mode* is not supported (there is no real-mode IVT delivery, and the engine decodes instructions at
RIP, which in real mode is an offset from CS base); the guest is stopped with the reason if it
happens.  Protected and long mode follow as for every other guest.
"""

from __future__ import annotations

from sevemu.hw.svm import SaveState
from sevemu.hw.x86.arch import CR0_PE, CR0_PG, EFER_LMA, EFER_LME

__all__ = ["entry_linear", "is_real_mode", "real_mode_reason"]


def is_real_mode(state: SaveState) -> bool:
    """Whether the save state is in real mode (CR0.PE clear)."""
    return not state.cr0 & CR0_PE


def real_mode_reason(state: SaveState) -> str | None:
    """Why a real-mode save state cannot be started (None when it can)."""
    if state.cr0 & CR0_PG:
        return f"CR0 {state.cr0:#x}: paging without protection (PG without PE) is invalid"
    if state.efer & (EFER_LME | EFER_LMA):
        return f"EFER {state.efer:#x}: long mode cannot be enabled in real mode"
    cs = state.segments.get("cs")
    if cs is None:
        return "real mode needs the code segment with its hidden base (the reset state: CS base 0xffff0000)"
    if not 0 <= state.rip <= 0xFFFF:
        return f"RIP {state.rip:#x} is beyond a real-mode segment's 64 KiB"
    if cs.base + state.rip >= 1 << 32:
        return f"CS base {cs.base:#x} + RIP {state.rip:#x} is beyond 4 GiB"
    return None


def entry_linear(state: SaveState) -> int:
    """The linear address of the first instruction: CS base + RIP outside long mode, RIP in it."""
    if state.efer & EFER_LMA:
        return state.rip
    cs = state.segments.get("cs")
    return (cs.base if cs is not None else 0) + state.rip
