"""How the Unicorn engine's guest leaves: the private VMCB, intercepts, exceptions.

**Unicorn runs as an SVM guest.**  At its first VMRUN the engine executes a real ``VMRUN`` inside
Unicorn (a 4-byte stub at :data:`STUB_PA`) with a private VMCB in Unicorn's physical memory, never
mapped into the guest (:func:`private_vmcb`): intercepts of HLT, CPUID, MSR, VMRUN, VMMCALL,
WBINVD and the SVM instructions a guest may not run, an MSR permission map that passes the
save-area MSRs through (:func:`msr_permission_map`, from the shared
:data:`~sevemu.hw.x86.insn.SAVE_AREA_MSRS`), and the guest's save area.  QEMU's
``cpu_svm_check_intercept_param`` turns an intercepted instruction into a *precise* #VMEXIT (the
instruction not executed, RIP on it), which Unicorn reports through its interrupt hook as
"interrupt" :data:`VMEXIT_BASE` + exit code (it never runs QEMU's ``do_vmexit``, so Unicorn stays in
guest mode).

:func:`intercept` turns such a stop -- and #UD, which is where the SEV-SNP instructions QEMU 5
does not know arrive -- into a call of the shared instruction semantics
(:mod:`sevemu.hw.x86.insn`) and applies the outcome: registers and RIP for a retired instruction,
the :class:`~sevemu.hw.svm.VmExit` for the hypervisor, or a guest exception, which
:func:`deliver` delivers through the guest's IDT (:mod:`sevemu.hw.x86.exc`: the #VC of an SEV-ES
guest's non-automatic exit, #GP, #UD, #PF with CR2 ...); when that fails even as #DF the guest is
dead: a triple fault, :class:`Crash`.  The functions take the engine as an
:class:`EnginePort` and keep no state.
"""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Final, Protocol

from sevemu._util.units import PAGE
from sevemu.abi.paging import ExitCode
from sevemu.errors import InputError
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import NestedPageFault, PageFault, PageNotValidated, VmmCommunication
from sevemu.hw.mmu import Mmu
from sevemu.hw.svm import SEGMENT_NAMES, SaveState, Segment, VmExit
from sevemu.hw.uc.binding import (
    I_CR0,
    I_CR3,
    I_RFLAGS,
    I_RIP,
    REG,
    REG_RFLAGS,
    UC_ERR_EXCEPTION,
    UC_ERR_INSN_INVALID,
    library,
)
from sevemu.hw.uc.stats import UcStats
from sevemu.hw.uc.walk import NestedCachingMmu
from sevemu.hw.x86 import insn
from sevemu.hw.x86.arch import (
    ATTR_CODE32,
    ATTR_CODE64,
    ATTR_DATA,
    CR0_PG,
    EFER_LMA,
    EFER_SVME,
    RFLAGS_CF,
    Vector,
    exception_name,
)
from sevemu.hw.x86.decode import GuestInsn, decode_guest_insn, skip_prefixes
from sevemu.hw.x86.exc import ERROR_CODE_VECTORS, CpuView, Delivered, escalate

__all__ = [
    "EXIT_CPUID", "EXIT_HLT", "EXIT_MSR", "EXIT_VMMCALL", "EXIT_VMRUN", "EXIT_WBINVD", "HSAVE_PA", "IOPM_PA", "MSRPM_PA",
    "POOL_PA", "STUB_PA", "SVM_AREA_END", "VMCB_PA", "VMEXIT_BASE", "VMRUN_STUB", "Crash", "EnginePort",
    "apply", "deliver", "error", "exception", "intercept", "msr_permission_map", "msrpm_bit", "private_vmcb",
    "pvalidate_in_place",
]

# ---- Unicorn's physical memory: the SVM area, then the page pool -----------------------------------
STUB_PA: Final = 0x1000
VMCB_PA: Final = 0x2000
HSAVE_PA: Final = 0x3000
IOPM_PA: Final = 0x4000  # 12 KiB
MSRPM_PA: Final = 0x8000  # 8 KiB
SVM_AREA_END: Final = 0xA000
POOL_PA: Final = 1 << 32
VMRUN_STUB: Final = b"\x0f\x01\xd8\xf4"  # VMRUN; HLT

# intercept vector bits (bit n = exit code 0x60 + n) -- what Unicorn must stop on precisely
EXIT_CPUID: Final = 0x72
EXIT_HLT: Final = 0x78
EXIT_MSR: Final = 0x7C
EXIT_VMRUN: Final = 0x80
EXIT_VMMCALL: Final = 0x81
EXIT_WBINVD: Final = 0x89
# SVM instructions a guest of a non-nesting hypervisor may not run (KVM injects #UD for them):
# INVD, INVLPGA, VMLOAD, VMSAVE, STGI, CLGI, SKINIT.  Intercepting them also keeps VMLOAD/VMSAVE
# from touching the engine's own physical memory through Unicorn.
_UD_INTERCEPTS: Final = {0x76: "INVD", 0x7A: "INVLPGA", 0x82: "VMLOAD", 0x83: "VMSAVE", 0x84: "STGI",
                         0x85: "CLGI", 0x86: "SKINIT"}
_INTERCEPTS: Final = sum(1 << (c - 0x60) for c in (EXIT_CPUID, EXIT_HLT, EXIT_MSR, EXIT_VMRUN, EXIT_VMMCALL,
                                                     EXIT_WBINVD, *_UD_INTERCEPTS))
VMEXIT_BASE: Final = 0x100  # QEMU's EXCP_VMEXIT: an intercept arrives as "interrupt" 0x100 + code

_FLAT_LIMIT: Final = 0xFFFFFFFF
_SEG_OFFSET: Final = {name: 0x400 + 16 * i for i, name in enumerate(SEGMENT_NAMES)}


class Crash(Exception):
    """Internal: the guest is dead (triple fault); carries the reason."""


def msrpm_bit(msr: int) -> tuple[int, int]:
    """(byte offset, bit) of an MSR's read bit in the SVM MSR permission map (APM2 15.11)."""
    if msr < 0x2000:
        base, index = 0, msr
    elif 0xC0000000 <= msr < 0xC0002000:
        base, index = 0x800, msr - 0xC0000000
    elif 0xC0010000 <= msr < 0xC0012000:
        base, index = 0x1000, msr - 0xC0010000
    else:
        raise InputError(f"MSR {msr:#x} is outside the permission map")
    return base + index // 4, 2 * (index % 4)


def msr_permission_map() -> bytes:
    """Every MSR intercepted (so the engine sees the ones the CPU answers and the ones the
    hypervisor does), except the save-area MSRs, which Unicorn executes itself."""
    msrpm = bytearray(b"\xff" * 0x2000)
    for msr in insn.SAVE_AREA_MSRS:
        off, shift = msrpm_bit(msr)
        msrpm[off] &= ~(3 << shift)
    return bytes(msrpm)


def _flat_segments(long_mode: bool) -> dict[str, Segment]:
    code = Segment(0x08, ATTR_CODE64 if long_mode else ATTR_CODE32, _FLAT_LIMIT, 0)
    data = Segment(0x10, ATTR_DATA, _FLAT_LIMIT, 0)
    return {"cs": code, "es": data, "ss": data, "ds": data, "fs": data, "gs": data}


def private_vmcb(state: SaveState) -> bytes:
    """The private VMCB of the first VMRUN: intercepts, permission maps, the guest's save area
    (segments from ``state.segments``, flat ones of the mode where it names none)."""
    b = bytearray(PAGE)

    def q(off: int, v: int) -> None:
        b[off : off + 8] = v.to_bytes(8, "little")

    q(0x00C, _INTERCEPTS)  # intercept vectors 3 and 4 (QEMU reads them as one quadword)
    q(0x040, IOPM_PA)
    q(0x048, MSRPM_PA)
    long_mode = bool(state.cr0 & CR0_PG)
    segments = _flat_segments(long_mode) | state.segments
    for name, seg in segments.items():
        off = _SEG_OFFSET[name]
        b[off : off + 2] = seg.selector.to_bytes(2, "little")
        b[off + 2 : off + 4] = seg.attrib.to_bytes(2, "little")
        b[off + 4 : off + 8] = seg.limit.to_bytes(4, "little")
        q(off + 8, seg.base)
    q(0x4D0, state.efer | EFER_SVME | (EFER_LMA if long_mode else 0))
    q(0x548, state.cr4)
    q(0x550, state.cr3)
    q(0x558, state.cr0)
    q(0x570, state.rflags)
    q(0x578, state.rip)
    q(0x5D8, state.regs["rsp"])
    q(0x5F8, state.regs["rax"])
    return bytes(b)


class EnginePort(Protocol):
    """What the exit functions need of the engine."""

    @property
    def vals(self) -> array.array[int]:
        """The register batch of the last stop (:data:`~sevemu.hw.uc.binding.SYNC_IDS` order)."""
        ...

    def read_code(self, rip: int, n: int = 16) -> bytes: ...

    def write_reg(self, reg: int, value: int) -> None: ...

    def retire(self, rax: int, rflags: int, rip: int) -> None:
        """RAX, RFLAGS, RIP in one write: an instruction retired inside a hook (Unicorn resumes at RIP)."""
        ...

    def guest_efer(self, cr0: int) -> int: ...

    def set_efer(self, guest_efer: int, cr0: int) -> None: ...

    def refresh(self) -> None:
        """Re-read pool slots someone else changed (the guest continues without a VMRUN)."""
        ...

    def read_virt(self, gva: int, n: int) -> bytes | None: ...

    def write_virt(self, gva: int, data: bytes) -> bool: ...

    def cpu_view(self, rip: int) -> CpuView:
        """The interrupted CPU as exception delivery sees it, returning to ``rip``."""
        ...

    def enter_handler(self, d: Delivered) -> None:
        """Continue at the handler: RIP, RSP, RFLAGS as delivery left them."""
        ...

    def write_cr2(self, address: int) -> None: ...

    def flush_tlb(self) -> None:
        """Drop every translation the engine holds (the RMP changed under an SNP guest)."""
        ...

    def invalidate_pool(self) -> None:
        """The guest's WBINVD: write back and forget every page-pool slot (Unicorn's TLB flushed,
        translated code of the slots dropped before the guest goes on)."""
        ...

    @property
    def stats(self) -> UcStats: ...


# ---- intercepts -------------------------------------------------------------------------------------
def intercept(e: EnginePort, cpu: GuestCpu, code: int, rip: int) -> VmExit | None:
    """An SVM intercept at ``rip``: the exit for the hypervisor, or None when the CPU handled it
    (RIP in the register batch is then past the instruction)."""
    vals = e.vals
    long_mode = bool(vals[I_CR0] & CR0_PG)
    code_bytes = e.read_code(rip, 15)
    plen = skip_prefixes(code_bytes, long_mode)
    if code == EXIT_HLT:
        return apply(e, cpu, insn.hlt(cpu), rip, plen + 1)
    if code == EXIT_CPUID:
        return apply(e, cpu, insn.cpuid(cpu), rip, plen + 2)
    if code == EXIT_VMMCALL:
        guest = decode_guest_insn(code_bytes, long_mode)
        if guest is not None and guest[0] is GuestInsn.VMGEXIT:
            return apply(e, cpu, insn.vmgexit(cpu), rip, guest[1])
        return apply(e, cpu, insn.vmmcall(cpu), rip, plen + 3)
    if code == EXIT_MSR:
        msr = vals[2] & 0xFFFFFFFF
        state = cpu.state
        cr0 = state.cr0 = vals[I_CR0]  # what the CPU-handled MSRs depend on, as of now
        state.efer = e.guest_efer(cr0)
        if code_bytes[plen : plen + 2] == b"\x0f\x30":
            value = ((vals[3] & 0xFFFFFFFF) << 32) | (vals[0] & 0xFFFFFFFF)
            out = insn.wrmsr(cpu, msr, value)
            info1 = 1
        else:
            out = insn.rdmsr(cpu, msr)
            info1 = 0
        if isinstance(out, insn.Exit) and out.exit.info1 != info1:  # pragma: no cover - invariant
            raise Crash(f"engine error: MSR exit direction at RIP {rip:#x}")
        return apply(e, cpu, out, rip, plen + 2)
    if code == EXIT_WBINVD:
        # The vCPU's private cache level (the page pool) is written back and emptied first, so the
        # guest continues from DRAM's view, reloading pages as it touches them (firmware WBINVDs
        # with thousands of pages resident that it never touches again: re-reading every slot at
        # once cost SNP's PEI ~1 s per WBINVD).
        e.invalidate_pool()
        out = insn.wbinvd(cpu)
        e.refresh()  # (nothing should be stale; as after any snoop)
        return apply(e, cpu, out, rip, plen + 2)
    name = _UD_INTERCEPTS.get(code)
    if name is not None:
        deliver(e, insn.undefined(name), rip)
        return None
    cpu.vmcb.next_rip = 0
    return VmExit(code)


def apply(e: EnginePort, cpu: GuestCpu, out: insn.Outcome, rip: int, length: int) -> VmExit | None:
    """Apply the outcome of the instruction of ``length`` bytes at ``rip``."""
    if isinstance(out, insn.Exit):
        cpu.vmcb.next_rip = rip + length
        return out.exit
    if isinstance(out, insn.Fault):
        deliver(e, out, rip)
        return None
    for name, value in out.regs:
        e.write_reg(REG[name], value)
    if out.cf is not None:
        rflags = e.vals[I_RFLAGS]
        e.write_reg(REG_RFLAGS, (rflags | RFLAGS_CF) if out.cf else (rflags & ~RFLAGS_CF))
    if "efer" in out.changed:
        e.set_efer(cpu.state.efer, e.vals[I_CR0])
    e.vals[I_RIP] = rip + length
    return None


# ---- exceptions ---------------------------------------------------------------------------------
def deliver(e: EnginePort, fault: insn.Fault, rip: int, return_rip: int | None = None) -> None:
    """Deliver a guest exception through its IDT (:mod:`sevemu.hw.x86.exc`): the handler runs next
    (RIP in the register batch).  A fault is delivered with RIP on the faulting instruction; a
    software interrupt with ``return_rip`` after it.  When delivery fails even as #DF: a triple
    fault (:class:`Crash`)."""
    vector = fault.vector
    error_code = (fault.error_code or 0) if vector in ERROR_CODE_VECTORS else None
    out = escalate(e, e.cpu_view(rip if return_rip is None else return_rip), vector, error_code)
    if isinstance(out, str):
        detail = f": {fault.reason}" if fault.reason else ""
        code = f", error code {fault.error_code:#x}" if fault.error_code else ""
        raise Crash(f"{exception_name(vector)} at RIP {rip:#x}{detail}{code}, not delivered ({out}): triple fault")
    if vector == Vector.VC:
        by = e.stats.vc_by_code
        by[error_code or 0] = by.get(error_code or 0, 0) + 1
    e.enter_handler(out)


def exception(e: EnginePort, cpu: GuestCpu, vector: int, rip: int) -> VmExit | None:
    """Unicorn raised exception ``vector`` (its interrupt hook).  #UD may be an instruction QEMU
    does not know (PVALIDATE, RMPADJUST): those go to the shared semantics."""
    if vector == Vector.UD:
        return _unknown_to_qemu(e, cpu, rip)
    code = e.read_code(rip, 2)
    if vector >= 32 or (code[:1] == b"\xcd" and code[1:2] == bytes([vector])) or (vector == Vector.BP and code[:1] == b"\xcc"):
        # INT n / INT3: a software interrupt, which returns past the instruction
        deliver(e, insn.Fault(vector, None, "software interrupt"), rip, return_rip=rip + (1 if code[:1] == b"\xcc" else 2))
        return None
    deliver(e, insn.Fault(vector, 0 if vector in ERROR_CODE_VECTORS else None, ""), rip)
    return None


def error(e: EnginePort, cpu: GuestCpu, err: int, pending: PageFault | NestedPageFault | VmmCommunication | None,
          rip: int) -> VmExit | None:
    """``uc_emu_start`` failed with ``err``: a nested page fault (raised for the hypervisor),
    a guest fault, or an instruction QEMU does not know (PVALIDATE, RMPADJUST...), which goes
    to the shared semantics.  Returns what :meth:`apply` returns for those."""
    if err == UC_ERR_EXCEPTION:
        if isinstance(pending, NestedPageFault):
            # an SEV-ES guest's NPF on a reserved-bit (MMIO) entry is #VC 0x400 in the guest
            out = insn.exit_for(cpu, ExitCode.NPF, pending.exit_info1, pending.gpa)
            if isinstance(out, insn.Fault):
                deliver(e, out, rip)
                return None
            raise pending
        if isinstance(pending, VmmCommunication):  # an SNP guest's access to a page it did not validate
            if isinstance(pending, PageNotValidated):
                e.write_cr2(pending.address)
            deliver(e, insn.Fault(Vector.VC, pending.error_code, pending.reason), rip)
            return None
        if isinstance(pending, PageFault):
            e.write_cr2(pending.address)
            deliver(e, insn.Fault(Vector.PF, pending.error_code, f"address {pending.address:#x}"), rip)
            return None
        deliver(e, insn.Fault(Vector.GP, 0, "non-canonical or inaccessible address"), rip)
        return None
    if err == UC_ERR_INSN_INVALID:
        return _unknown_to_qemu(e, cpu, rip)
    msg = library().uc_strerror(err)
    raise Crash(f"emulation failed at RIP {rip:#x}: {msg.decode() if msg else err}")


def _unknown_to_qemu(e: EnginePort, cpu: GuestCpu, rip: int) -> VmExit | None:
    vals = e.vals
    code = e.read_code(rip, 15)
    guest = decode_guest_insn(code, bool(vals[I_CR0] & CR0_PG))
    if guest is None:
        deliver(e, insn.Fault(Vector.UD, None, ""), rip)
        return None
    kind, length = guest
    state = cpu.state  # the operands' translation uses the paging state as of now
    state.cr0, state.cr3 = vals[I_CR0], vals[I_CR3]
    tlb = cpu.core.tlb
    epoch = tlb.rmp_epoch.get(cpu.asid)
    if kind is GuestInsn.PVALIDATE:
        e.stats.pvalidates += 1
        out = insn.pvalidate(cpu, vals[0], vals[2] & 0xFFFFFFFF, bool(vals[3] & 1))
    elif kind is GuestInsn.RMPADJUST:
        out = insn.rmpadjust(cpu, vals[0], vals[2], vals[3])
    else:  # VMMCALL / VMGEXIT arrive as intercepts, never as #UD
        deliver(e, insn.Fault(Vector.UD, None, kind.value), rip)
        return None
    if tlb.rmp_epoch.get(cpu.asid) != epoch:  # the RMP took an access away: Unicorn's TLB too
        e.flush_tlb()
    return apply(e, cpu, out, rip, length)


_UNDECODED: Final = ("undecoded", 0)
_IN_PLACE_DECODED: dict[tuple[bytes, bool], tuple[GuestInsn, int] | tuple[str, int] | None] = {}
""":func:`decode_guest_insn` of the instruction bytes :func:`pvalidate_in_place` read, by (bytes, paging):
a loop over a range validates with the same few bytes at the same RIP every time."""
_IN_PLACE_DECODED_MAX: Final = 1024


def pvalidate_in_place(e: EnginePort, cpu: GuestCpu, mmu: Mmu,
                       armed: Callable[[bytes, bool, int], None] | None = None) -> bool:
    """Retire a PVALIDATE inside Unicorn's invalid-instruction hook, without stopping emulation
    (``e.vals`` holds the registers as of the instruction).  The semantics are
    :func:`insn.pvalidate`'s; only the operand's walk is ``mmu``'s (the engine's caching walker,
    which answers as :meth:`GuestCpu.translate` does).  True when the instruction retired (EAX,
    rFLAGS.CF and RIP written into Unicorn); False -- nothing changed -- for everything else, which
    then stops and takes the precise path (:func:`error`): another instruction, a rescind (it may
    take an access away: TLB flushes), VMPL above 0, an RMP epoch the vCPU has not caught up with,
    #UD, #GP, a #PF or #NPF of the operand's walk, an RMP entry that faults.

    ``armed``: called with (the 15 instruction bytes, paging, the length) after a 4 KiB validate
    retired with the caching walker -- the engine's C hook then retires the same case itself
    (:func:`sevemu.hw.uc.accel.pvalidate_hook`)."""
    vals = e.vals
    rmp = cpu.rmp
    if rmp is None or cpu.vmpl or not vals[3] & 1:
        return False
    tlb = cpu.core.tlb
    epoch = tlb.rmp_epoch.get(cpu.asid)
    if epoch != (rmp.epoch, 0):
        return False
    rip = vals[I_RIP]
    cr0 = vals[I_CR0]
    paging = bool(cr0 & CR0_PG)
    code = e.read_code(rip, 15)
    key = (code, paging)
    guest = _IN_PLACE_DECODED.get(key, _UNDECODED)
    if guest is _UNDECODED:  # (decode_guest_insn is a function of the bytes and the mode: kept)
        if len(_IN_PLACE_DECODED) >= _IN_PLACE_DECODED_MAX:
            _IN_PLACE_DECODED.clear()
        guest = _IN_PLACE_DECODED[key] = decode_guest_insn(code, paging)
    if guest is None or guest[0] is not GuestInsn.PVALIDATE:
        return False
    asid, sev, ncr3, cr3 = cpu.asid, cpu.sev, cpu.vmcb.ncr3, vals[I_CR3]

    def walk(gva: int) -> tuple[int, int]:
        if isinstance(mmu, NestedCachingMmu):
            return mmu.operand(asid, sev, ncr3, paging, cr3, gva)
        t = mmu.translate(asid=asid, sev=sev, ncr3=ncr3, paging=paging, cr3=cr3, gva=gva, write=False, fetch=False)
        return t.gpa, t.spa

    try:
        out = insn.pvalidate(cpu, vals[0], vals[2] & 0xFFFFFFFF, True, translate=walk)
    except (PageFault, NestedPageFault):
        return False
    finally:
        e.refresh()  # (the walk may have set A bits in a page the guest has mapped)
    if not isinstance(out, insn.Retire):
        return False
    stats = e.stats
    stats.pvalidates += 1
    stats.pvalidates_in_place += 1
    if tlb.rmp_epoch.get(cpu.asid) != epoch:  # (validating takes no access away; as in _unknown_to_qemu)
        e.flush_tlb()
    ((_, rax),) = out.regs  # (PVALIDATE writes EAX alone)
    rflags = vals[I_RFLAGS]
    e.retire(rax, (rflags | RFLAGS_CF) if out.cf else (rflags & ~RFLAGS_CF), rip + guest[1])
    if armed is not None and len(code) == 15 and not vals[2] & 0xFFFFFFFF and isinstance(mmu, NestedCachingMmu):
        armed(code, paging, guest[1])
    return True
