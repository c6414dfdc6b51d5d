"""The Python workload engine: guest programs written as generators of restartable operations.

A workload is a generator that *yields* one operation at a time and receives its result::

    def workload():
        yield op.store(0x1000, 8, 0x1122334455667788)
        value = yield op.load(0x1000, 8)
        yield op.out(0x3F8, ord("A"))
        yield op.hlt()

Each operation is one "instruction": it either completes, raises #PF into the workload (which may
catch it, as a guest's exception handler would), or takes a #VMEXIT.  On #NPF the operation stays
pending and is restarted on the next VMRUN, after the hypervisor fixed its NPT -- exactly the
restartable-instruction contract of real hardware.  What an operation does beyond memory is decided
by the semantics both engines share (:mod:`sevemu.hw.x86.insn`): intercepted operations (HLT,
IN/OUT, CPUID, RDMSR/WRMSR, VMMCALL) exit with the registers the hypervisor expects (RAX, RCX,
RDX...) and pick their result up from the registers when the guest is resumed; what the CPU
answers itself (SEV_STATUS, EFER, the GHCB MSR of an SEV-ES guest, save-area MSRs) is the
operation's result at once; guest exceptions (#GP, #UD, #VC) are thrown into the workload.  The
guest RIP counts operations.

An exception escaping the workload (an unhandled #PF, a bug) is a triple fault: #VMEXIT(SHUTDOWN).
"""

from __future__ import annotations

from collections.abc import Generator
from types import GeneratorType
from typing import Any

from sevemu.abi.paging import ExitCode
from sevemu.abi.pycode import CODE_GPA, program_identity
from sevemu.hw.codefetch import CodeCheck, cpu_engine
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import GuestFault, NestedPageFault, PageFault
from sevemu.hw.svm import VmExit
from sevemu.hw.x86 import insn
from sevemu.hw.x86.arch import Vector

__all__ = ["Op", "PyEngine", "Workload", "op"]

Op = tuple[Any, ...]
Workload = Generator[Op, Any, Any]

# operation codes (small ints: compared on every step)
(LD, ST, RD, WR, FETCH, HLT, OUT, IN, CPUID, RDMSR, WRMSR, VMMCALL, WRCR, INVLPG, WBINVD, CLFLUSH, VMGEXIT,
 PVALIDATE, RMPADJUST) = range(19)


class op:
    """Constructors of workload operations."""

    @staticmethod
    def load(gva: int, size: int = 8) -> Op:
        return (LD, gva, size)

    @staticmethod
    def store(gva: int, size: int, value: int) -> Op:
        return (ST, gva, size, value)

    @staticmethod
    def read(gva: int, length: int) -> Op:
        return (RD, gva, length)

    @staticmethod
    def write(gva: int, data: bytes) -> Op:
        return (WR, gva, bytes(data))

    @staticmethod
    def fetch(gva: int, length: int) -> Op:
        return (FETCH, gva, length)

    @staticmethod
    def hlt() -> Op:
        return (HLT,)

    @staticmethod
    def out(port: int, value: int, size: int = 1) -> Op:
        return (OUT, port, value, size)

    @staticmethod
    def inp(port: int, size: int = 1) -> Op:
        return (IN, port, size)

    @staticmethod
    def cpuid(leaf: int, subleaf: int = 0) -> Op:
        return (CPUID, leaf, subleaf)

    @staticmethod
    def rdmsr(msr: int) -> Op:
        return (RDMSR, msr)

    @staticmethod
    def wrmsr(msr: int, value: int) -> Op:
        return (WRMSR, msr, value)

    @staticmethod
    def vmmcall(**regs: int) -> Op:
        """VMMCALL with the given registers (rax, rbx, rcx, rdx...); returns RAX after the call."""
        return (VMMCALL, regs)

    @staticmethod
    def write_cr(n: int, value: int) -> Op:
        return (WRCR, n, value)

    @staticmethod
    def invlpg(gva: int) -> Op:
        return (INVLPG, gva)

    @staticmethod
    def wbinvd() -> Op:
        return (WBINVD,)

    @staticmethod
    def clflush(gva: int) -> Op:
        return (CLFLUSH, gva)

    @staticmethod
    def vmgexit() -> Op:
        """VMGEXIT: the SEV-ES guest's exit through the GHCB (VMMCALL in any other guest)."""
        return (VMGEXIT,)

    @staticmethod
    def pvalidate(gva: int, size: int = 0, validate: bool = True) -> Op:
        """PVALIDATE; returns (EAX, CF)."""
        return (PVALIDATE, gva, size, validate)

    @staticmethod
    def rmpadjust(gva: int, size: int, rdx: int) -> Op:
        """RMPADJUST; returns (EAX, CF)."""
        return (RMPADJUST, gva, size, rdx)


@cpu_engine
class PyEngine:
    """Runs one workload generator as a vCPU's instruction stream.

    In an SEV guest the workload runs only if the guest's measured program table lists its
    identity (:mod:`sevemu.hw.codefetch`); otherwise the guest dies (SHUTDOWN).
    """

    def __init__(self, workload: Workload, code_gpa: int = CODE_GPA) -> None:
        # its identity: what the guest's program table must list (an iterator that is no generator
        # has none, and runs only in a plain guest)
        self.identity = program_identity(workload) if isinstance(workload, GeneratorType) else b""
        self._code = CodeCheck(self.identity, code_gpa)
        self._gen = workload
        self._pending: Op | None = None  # fetched but not completed (restart after #NPF)
        self._exited: Op | None = None  # intercepted; completes when the guest is resumed
        self._value: Any = None
        self._started = False
        self.finished = False
        self.crash: str | None = None
        self.ops = 0

    def run(self, cpu: GuestCpu) -> VmExit:
        if self.crash is not None:
            return VmExit(ExitCode.SHUTDOWN)
        if self.finished:
            return VmExit(ExitCode.HLT)
        if cpu.sev:  # the code fetch: only the guest's own measured programs run in its domain
            refused = self._code.refused(cpu.core, cpu.asid, cpu.vmcb.ncr3)
            if refused is not None:
                self.crash = refused
                return VmExit(ExitCode.SHUTDOWN)
        regs = cpu.state.regs
        if self._exited is not None:
            self._value = self._result_of_exit(self._exited, regs)
            self._exited = None
        gen = self._gen
        while True:
            o = self._pending
            if o is None:
                try:
                    o = gen.send(self._value) if self._started else next(gen)
                    self._started = True
                except StopIteration:
                    self.finished = True
                    return VmExit(ExitCode.HLT)
                except Exception as exc:  # noqa: BLE001 - the guest died: triple fault
                    return self._triple_fault(exc)
                self._pending = o
            try:
                try:
                    if o[0] <= ST:  # LD or ST: a run of loads and stores (the hot path), see _memory_run
                        done = self._memory_run(o, cpu)
                        if done is not None:
                            return done
                        continue
                    self._value = self._execute(o, cpu, regs)
                except NestedPageFault as npf:
                    # an SEV-ES guest takes the NPF of a reserved-bit (MMIO) entry as #VC 0x400
                    vc = insn.exit_for(cpu, ExitCode.NPF, npf.exit_info1, npf.gpa)
                    if isinstance(vc, insn.Fault):
                        raise vc.exception() from None
                    raise
            except (PageFault, GuestFault) as pf:
                self._pending = None
                try:
                    o = gen.throw(pf)
                except StopIteration:
                    self.finished = True
                    return VmExit(ExitCode.HLT)
                except Exception as exc:  # noqa: BLE001 - unhandled in the guest: triple fault
                    return self._triple_fault(exc)
                self._pending = o
                continue
            except _Exit as ex:
                self._pending = None
                self._exited = o
                cpu.vmcb.next_rip = cpu.state.rip + 1
                return ex.vmexit
            self._pending = None
            self.ops += 1
            cpu.state.rip += 1

    def _memory_run(self, o: Op, cpu: GuestCpu) -> VmExit | None:
        """Execute the pending load or store ``o`` and the loads and stores the workload yields
        after it, without the general loop's steps per operation: the operation count and RIP are
        added once when the run ends.  Returns None when the workload yields another kind of
        operation (left pending for the general loop), the exit when the workload ends or dies.  A
        fault leaves the faulting operation pending, the ones before it counted, and propagates."""
        load, store, send = cpu.load, cpu.store, self._gen.send
        n = 0
        pending: Op | None = o
        try:
            while True:
                kind = o[0]
                if kind == LD:
                    value = load(o[1], o[2])
                elif kind == ST:
                    store(o[1], o[2], o[3])
                    value = None
                else:
                    return None
                n += 1
                pending = None
                try:
                    o = pending = send(value)
                except StopIteration:
                    self.finished = True
                    return VmExit(ExitCode.HLT)
                except Exception as exc:  # noqa: BLE001 - the guest died: triple fault
                    return self._triple_fault(exc)
        finally:
            self._pending = pending
            self.ops += n
            cpu.state.rip += n

    def _triple_fault(self, exc: BaseException) -> VmExit:
        self.crash = f"{type(exc).__name__}: {exc}"
        return VmExit(ExitCode.SHUTDOWN)

    @staticmethod
    def _execute(o: Op, cpu: GuestCpu, regs: dict[str, int]) -> Any:
        kind = o[0]
        if kind == LD:
            return cpu.load(o[1], o[2])
        if kind == ST:
            cpu.store(o[1], o[2], o[3])
            return None
        if kind == RD:
            return cpu.read(o[1], o[2])
        if kind == WR:
            cpu.write(o[1], o[2])
            return None
        if kind == FETCH:
            return cpu.fetch(o[1], o[2])
        if kind == WRCR:
            if o[1] == 3:
                cpu.write_cr3(o[2])
            elif o[1] == 0:
                cpu.write_cr0(o[2])
            elif o[1] == 4:
                cpu.state.cr4 = o[2]
            else:
                raise insn.Fault(Vector.GP, 0, f"MOV CR{o[1]}").exception()
            return None
        if kind == INVLPG:
            cpu.invlpg(o[1])
            return None
        if kind == CLFLUSH:
            t = cpu.translate(o[1])
            cpu.core.cache.clflush(t.data_asid, t.data_c, t.spa | (o[1] & 0xFC0))
            return None
        return PyEngine._apply(o, cpu, regs, PyEngine._semantics(o, cpu))

    @staticmethod
    def _semantics(o: Op, cpu: GuestCpu) -> insn.Outcome:
        """The shared semantics of a non-memory operation (:mod:`sevemu.hw.x86.insn`)."""
        kind = o[0]
        next_rip = cpu.state.rip + 1
        if kind == HLT:
            return insn.hlt(cpu)
        if kind == OUT:
            return insn.ioio(cpu, o[1], o[3], False, next_rip)
        if kind == IN:
            return insn.ioio(cpu, o[1], o[2], True, next_rip)
        if kind == CPUID:
            return insn.cpuid(cpu)
        if kind == RDMSR:
            return insn.rdmsr(cpu, o[1])
        if kind == WRMSR:
            return insn.wrmsr(cpu, o[1], o[2])
        if kind == VMMCALL:
            return insn.vmmcall(cpu)
        if kind == VMGEXIT:
            return insn.vmgexit(cpu)
        if kind == WBINVD:
            return insn.wbinvd(cpu)
        if kind == PVALIDATE:
            return insn.pvalidate(cpu, o[1], o[2], bool(o[3]))
        if kind == RMPADJUST:
            return insn.rmpadjust(cpu, o[1], o[2], o[3])
        return insn.Fault(Vector.UD, None, f"unknown operation {o!r}")

    @staticmethod
    def _apply(o: Op, cpu: GuestCpu, regs: dict[str, int], out: insn.Outcome) -> Any:
        """Retire: the operation's result; Fault: thrown into the workload; Exit: the operands go
        into the registers the hypervisor reads, then #VMEXIT."""
        if isinstance(out, insn.Retire):
            if o[0] in (PVALIDATE, RMPADJUST):
                return out.value, bool(out.cf)
            return out.value if out.regs else None
        if isinstance(out, insn.Fault):
            raise out.exception()
        kind = o[0]
        if kind == OUT:
            regs["rax"] = o[2] & ((1 << (8 * o[3])) - 1)
        elif kind == CPUID:
            regs["rax"], regs["rcx"] = o[1], o[2]
        elif kind == RDMSR:
            regs["rcx"] = o[1]
        elif kind == WRMSR:
            regs["rcx"], regs["rax"], regs["rdx"] = o[1], o[2] & 0xFFFFFFFF, o[2] >> 32
        elif kind == VMMCALL:
            regs.update(o[1])
        raise _Exit(out.exit)

    @staticmethod
    def _result_of_exit(o: Op, regs: dict[str, int]) -> Any:
        kind = o[0]
        if kind == IN:
            return regs["rax"] & ((1 << (8 * o[2])) - 1)
        if kind == CPUID:
            return (regs["rax"] & 0xFFFFFFFF, regs["rbx"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF,
                    regs["rdx"] & 0xFFFFFFFF)
        if kind == RDMSR:
            return ((regs["rdx"] & 0xFFFFFFFF) << 32) | (regs["rax"] & 0xFFFFFFFF)
        if kind == VMMCALL:
            return regs["rax"]
        return None


class _Exit(Exception):
    def __init__(self, vmexit: VmExit) -> None:
        self.vmexit = vmexit
