"""The hypervisor's side of the GHCB: VMGEXIT of an SEV-ES guest, one table of NAE events (GHCB
56421 sections 2.3.1 "GHCB MSR protocol" and 4 "Non-automatic exits"; Linux arch/x86/kvm/svm/sev.c
``sev_handle_vmgexit``, ``sev_handle_vmgexit_msr_protocol``, ``sev_es_validate_vmgexit``,
``sev_es_sync_from_ghcb`` / ``sev_es_sync_to_ghcb``, ``setup_vmgexit_scratch``).

An SEV-ES guest's registers are encrypted in its VMSA; what it wants from the host it writes into
its GHCB -- a page it shares (C-bit clear) -- and then executes VMGEXIT, an automatic exit.  The
hypervisor finds the GHCB through the GHCB MSR the VMCB carries (``ghcb_gpa``, control area 0xA0):

* **MSR protocol** (GHCBInfo, bits 11:0, non-zero): the request and the answer are the MSR itself --
  SEV information (protocol range, C-bit), CPUID one register at a time, AP reset hold, GHCB GPA
  registration, hypervisor features, termination request (reason set 3:0 at bits 15:12, reason code
  at 23:16).  Other requests are added to :attr:`GhcbHandler.msr_table`.
* **GHCB page** (GHCBInfo 0: the MSR is the GHCB's GPA): checked as KVM checks it -- a GPA inside
  the guest and backed (else the VM is terminated: KVM cannot map it either), ``ghcb_usage`` 0
  (``INVALID_USAGE``), SW_EXITCODE/SW_EXITINFO1/SW_EXITINFO2 and the fields the event needs marked in
  the valid bitmap (``MISSING_INPUT``), an event of :attr:`GhcbHandler.nae_table` (``INVALID_EVENT``),
  a scratch area inside the guest (``INVALID_SCRATCH_AREA``).  A refused GHCB is answered as current
  KVM answers it: SW_EXITINFO1 = 2 and the :class:`~sevemu.abi.ghcb.GhcbError` in SW_EXITINFO2, after
  which a Linux guest (and the bundled runtime) asks to be terminated with reason set 0, code 0
  (``GHCB_SEV_ES_GEN_REQ``).  Valid-bitmap bits of no field are ignored, as KVM ignores them.
  After an event the valid bitmap marks only what the hypervisor wrote back (KVM clears it first).

NAE events (:attr:`GhcbHandler.nae_table`): CPUID, IOIO (IN/OUT and string I/O through the scratch
area), MSR, VMMCALL, MMIO read/write (the NPF of a reserved-bit NPT entry that the CPU turned into
#VC 0x400 in the guest; the guest's #VC handler asks with MMIO_READ/MMIO_WRITE), AP HLT loop, AP
jump table (SET/GET), NMI complete, hypervisor features, termination request; UNSUPPORTED_EVENT (the
guest could not handle a #VC) terminates the VM.  More events (SNP's page-state change, guest
requests, AP creation) are registered by the code that implements them: ``nae_table[code] = fn``,
``fn(exit)`` filling :attr:`NaeExit.out` and returning None or a reason to stop the run loop.

AP bring-up (model choice: the model has no local APIC and no INIT-SIPI): an AP parks in AP reset
hold (MSR protocol or AP_HLT_LOOP); the BSP's AP_JUMP_TABLE SET releases every parked AP -- its GHCB
MSR gets AP_RESET_HOLD_RESP with a non-zero result, as KVM gives it when a SIPI arrives -- and the
AP then reads the jump table (AP_JUMP_TABLE GET).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from sevemu._util.units import PAGE
from sevemu.abi.ghcb import (
    GHCB_DEFAULT_USAGE,
    GHCB_MSR_INFO_MASK,
    GHCB_VALID_BITS,
    ApJumpTableOp,
    GhcbError,
    GhcbMsrInfo,
    SwExitCode,
    SwExitInfo1Result,
    TermReasonGeneral,
    TermReasonSet,
)
from sevemu.errors import UnmappedError
from sevemu.hypervisor.uapi import GHCB_VERSION_MIN
from sevemu.hypervisor.vm import HostPage, Vcpu, Vm, VmState

__all__ = ["GhcbHandler", "NaeExit", "NaeHost", "StopRun", "ghcb_msr_term", "term_reason"]

_M32: Final = 0xFFFFFFFF
_M64: Final = (1 << 64) - 1
_SAVE_LO: Final = 0x0C8  # the GHCB save-area bytes read at each exit: cpl (0xCB) .. the valid bitmap
_SAVE_HI: Final = 0x400
_TAIL: Final = 0xFF8  # protocol_version (0xFFA), ghcb_usage (0xFFC)
_TAIL_LINE: Final = 0xFC0  # the line of ghcb_usage
_HEAD: Final = 0x380  # the line of SW_EXITCODE .. SW_SCRATCH, then XCR0 and the valid bitmap
_GPRS: Final = 0x1C0  # from the line of RSP and RAX on, the GHCB is read in one piece
_HEAD_RUNS: Final = ((_GPRS, _SAVE_HI - _GPRS), (_TAIL_LINE, 64))
"""What every GHCB exit reads, in one host access: 0x1C0..0x400 and the line of ``ghcb_usage``."""
_KNOWN_RUNS: Final = ((_GPRS, 64), (_HEAD, _SAVE_HI - _HEAD), (_TAIL_LINE, 64))
"""What decides the answer to an OUT (``GhcbHandler._known``): the line of RAX, SW_EXITCODE .. the
valid bitmap (the lines the answer is written into), the line of ``ghcb_usage``."""
_SHARED_BUF: Final = 0x800
_SHARED_END: Final = 0xFF0
_OFF: Final = {name: bit * 8 for name, bit in GHCB_VALID_BITS.items()}
_FIELD_OF_BIT: Final = {bit: name for name, bit in GHCB_VALID_BITS.items()}
_LOW_FIELDS: Final = sum(1 << bit for name, bit in GHCB_VALID_BITS.items() if _OFF[name] < _GPRS)
"""Valid-bitmap bits of fields below the GPRs' line (CPL, XSS, DR7, RIP, RFLAGS ...): read only if marked."""
_Q: Final = struct.Struct("<Q")
_BITMAP: Final = 0x3F0
_AP_RESET_HOLD_RELEASED: Final = 1 << 12
_IOIO_CODE: Final = int(SwExitCode.IOIO)
_IOIO_IN: Final = 1 << 0
_IOIO_STR: Final = 1 << 2
_IOIO_REP: Final = 1 << 3
_IOIO_SIZES: Final = {1 << 4: 1, 1 << 5: 2, 1 << 6: 4}
_IOIO_SIZE_OF: Final = {bits: next((n for bit, n in _IOIO_SIZES.items() if bits & bit), 0) for bits in range(0, 0x80, 0x10)}
"""SZ8/SZ16/SZ32 bits of IOIO's exit information -> the operand size (the lowest set bit wins)."""
_LOW_ZEROS: Final = bytes(_GPRS - _SAVE_LO)


class NaeHost(Protocol):
    """What NAE events need of the hypervisor (the same services its plain exits use)."""

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]: ...

    def port_in(self, vm: Vm, port: int, size: int) -> int: ...

    def port_out(self, vm: Vm, port: int, size: int, value: int) -> None: ...

    def msr_read(self, vm: Vm, msr: int) -> int: ...

    def msr_write(self, vm: Vm, msr: int, value: int) -> None: ...

    def hypercall(self, vm: Vm, regs: dict[str, int]) -> int: ...

    def mmio_read(self, vm: Vm, gpa: int, size: int) -> bytes: ...

    def mmio_write(self, vm: Vm, gpa: int, data: bytes) -> None: ...

    @property
    def cbit(self) -> int: ...


class StopRun(Exception):
    """Internal: an NAE event ends the run loop with ``reason`` (hold, termination)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused(Exception):
    def __init__(self, error: GhcbError, detail: str) -> None:
        super().__init__(detail)
        self.error = error
        self.detail = detail


@dataclass(slots=True)
class NaeExit:
    """One GHCB-page VMGEXIT: its input fields (those the valid bitmap marks) and the output."""

    vm: Vm
    vcpu: Vcpu
    gpa: int
    code: int
    info1: int
    info2: int
    fields: dict[str, int]
    out: dict[str, int] = field(default_factory=dict)
    """Fields written back to the GHCB (marked valid); ``sw_exit_info_1/2`` default to 0."""

    def need(self, *names: str) -> list[int]:
        """The values of ``names``; MISSING_INPUT when the valid bitmap lacks one."""
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise _Refused(GhcbError.MISSING_INPUT, f"event {self.code:#x} needs {', '.join(missing)} marked valid")
        return [self.fields[n] for n in names]

    def refuse(self, error: GhcbError, detail: str) -> None:
        """Answer the event with a GHCB error (SW_EXITINFO1 = 2, SW_EXITINFO2 = ``error``)."""
        raise _Refused(error, detail)

    def scratch(self, length: int) -> int:
        """The GPA of a ``length``-byte scratch area (SW_SCRATCH): inside the GHCB's shared buffer or
        entirely outside the GHCB page, inside the guest (``setup_vmgexit_scratch``)."""
        (gpa,) = self.need("sw_scratch")
        ghcb = self.gpa
        inside = ghcb + _SHARED_BUF <= gpa and gpa + length <= ghcb + _SHARED_END
        outside = gpa + length <= ghcb or gpa >= ghcb + PAGE
        if length <= 0 or not (inside or outside) or gpa + length > self.vm.memory:
            self.refuse(GhcbError.INVALID_SCRATCH_AREA, f"scratch area {gpa:#x}+{length:#x}")
        return gpa


NaeFn = Callable[[NaeExit], str | None]
_Known = tuple[bytes, NaeFn | None, int, int, int, list[tuple[int, bytes]], Callable[[int], None] | None, Vm | None]


def _out_sink(host: NaeHost, vm: Vm, port: int, size: int) -> Callable[[int], None]:
    """The host's OUT of ``size`` bytes to ``port`` of ``vm`` as one callable of the value: its
    ``port_out_sink`` where it has one (the hypervisor's: its device bus's decode made once), else its
    ``port_out`` with these arguments."""
    make = getattr(host, "port_out_sink", None)
    if make is not None:
        return make(vm, port, size)  # type: ignore[no-any-return]
    return functools.partial(host.port_out, vm, port, size)
MsrFn = Callable[[Vm, Vcpu, int], str | None]


def term_reason(reason_set: int, code: int) -> str:
    """A termination reason in words."""
    names: dict[tuple[int, int], str] = {
        (TermReasonSet.GENERAL, TermReasonGeneral.GENERAL_REQUEST): "general request",
        (TermReasonSet.GENERAL, TermReasonGeneral.PROTOCOL_UNSUPPORTED): "GHCB protocol not supported",
        (TermReasonSet.GENERAL, TermReasonGeneral.SNP_UNSUPPORTED): "SNP not supported"}
    name = names.get((reason_set, code))
    return f"reason set {reason_set}, code {code}{f' ({name})' if name else ''}"


def ghcb_msr_term(reason_set: int, code: int) -> int:
    """The GHCB MSR value of a termination request."""
    return int(GhcbMsrInfo.TERM_REQ) | (reason_set & 0xF) << 12 | (code & 0xFF) << 16


class GhcbHandler:
    """VMGEXIT for the hypervisor ``host`` (module docstring)."""

    def __init__(self, host: NaeHost) -> None:
        self.host = host
        self.msr_table: dict[int, MsrFn] = {
            GhcbMsrInfo.SEV_INFO_REQ: self._sev_info, GhcbMsrInfo.CPUID_REQ: self._msr_cpuid,
            GhcbMsrInfo.AP_RESET_HOLD_REQ: self._msr_reset_hold, GhcbMsrInfo.REG_GPA_REQ: self._reg_gpa,
            GhcbMsrInfo.HV_FT_REQ: self._hv_features, GhcbMsrInfo.TERM_REQ: self._msr_term,
        }
        """GHCB MSR protocol requests by GHCBInfo: ``fn(vm, vcpu, msr)``."""
        self.nae_table: dict[int, NaeFn] = {
            SwExitCode.CPUID: self._cpuid, SwExitCode.IOIO: self._ioio, SwExitCode.MSR: self._msr,
            SwExitCode.VMMCALL: self._vmmcall, SwExitCode.MMIO_READ: self._mmio_read,
            SwExitCode.MMIO_WRITE: self._mmio_write, SwExitCode.NMI_COMPLETE: _nothing,
            SwExitCode.AP_HLT_LOOP: self._ap_hlt_loop, SwExitCode.AP_JUMP_TABLE: self._ap_jump_table,
            SwExitCode.HV_FEATURES: self._nae_hv_features, SwExitCode.TERM_REQUEST: self._nae_term,
            SwExitCode.UNSUPPORTED_EVENT: self._unsupported,
        }
        """NAE events by SW_EXITCODE: ``fn(exit)``."""
        self.hv_features = 0
        """What HV_FT_RESP / HV_FEATURES report (SNP sets its bits)."""
        self._memo: tuple[bytes, bytes, int, int, dict[str, int]] = (b"", b"", 0, 0, {})
        """The head of the last GHCB read (``_HEAD_RUNS``) that marked no field below it, and its
        save area, bitmap, usage and decode."""
        self._last_save = b""  # the GHCB bytes last decoded, and what they decoded to
        self._last_fields: dict[str, int] = {}
        self._last_out: dict[str, int] = {}  # the last answer, the GHCB it answered, and its writes
        self._last_wb_save = b""
        self._last_writes: list[tuple[int, bytes]] = []
        self._known: _Known = (b"", None, 0, 0, 0, [], None, None)
        """The last GHCB that asked for an OUT (IOIO, not string; no field below the GPRs marked) and
        got the plain answer: the lines that decide it (``_KNOWN_RUNS``: ``ghcb_usage``, SW_EXITCODE,
        SW_EXITINFO1/2, the valid bitmap, RAX -- and the bytes of the lines the answer rewrites), the
        IOIO handler that answered it, the port, size and value, the answer's writes, the OUT as one
        callable of the value (:func:`_out_sink`) and the VM it was made for -- the same lines again
        are the same event with the same answer (the guest's loop of OUTs): the answer is written and
        the OUT made without the decode and the event table (``_page``).  (The other fields the
        bitmap may mark -- RBX, RCX ... -- are no input of an OUT.)"""

    # ---- entry -----------------------------------------------------------------------------------
    def vmgexit(self, vm: Vm, vcpu: Vcpu) -> str | None:
        """Handle ``vcpu``'s VMGEXIT; None to re-enter the guest, or why the run loop stops."""
        msr = vcpu.vmcb.ghcb_gpa
        info = msr & GHCB_MSR_INFO_MASK
        try:
            if info:
                fn = self.msr_table.get(info)
                if fn is None:
                    return self._terminate(vm, f"unsupported GHCB MSR protocol request {msr:#x}")
                return fn(vm, vcpu, msr)
            known, page, registered = self._known, vcpu.ghcb_map, vcpu.ghcb_registered
            # The known OUT (_known) again?  The GHCB mapped as at the last exit (the registered GPA,
            # the same NPT entry: _page's checks), the same IOIO handler, and the lines that decide it
            # read and -- when they are its -- its answer written in one host access; then the OUT
            # (model choice: after its answer is in the GHCB; nothing sees the GHCB in between) -- the
            # OUT as the callable made when the event was decoded for this VM (the host's port_out_sink:
            # the device bus's decode made once), the host's port_out for another VM.
            # (NestedPageTable.lookup and HostPage.exchange, inlined: the GHCB's GPA is page-aligned
            # here -- no MSR-protocol bits -- and so is the mapped page's SPA)
            if (known[1] is not None and page is not None and page.gpa == msr
                    and (registered is None or msr == registered) and vm.npt.mappings.get(msr >> 12) == page.spa
                    and self.nae_table.get(_IOIO_CODE) is known[1]
                    and page._core.host_exchange(page.spa, _KNOWN_RUNS, known[0], known[5]) is None):
                if known[7] is vm:
                    known[6](known[4])  # type: ignore[misc]  # (made for this VM: a callable)
                else:
                    self.host.port_out(vm, known[2], known[3], known[4])
                return None
            return self._page(vm, vcpu, msr)
        except StopRun as stop:
            return stop.reason

    def forget(self, vm: Vm) -> None:
        """``vm`` is gone, or the host's ``port_out`` changed: the known OUT's callable made for it is
        dropped (the next OUT is decoded afresh; the callable is made when an event is decoded)."""
        if self._known[7] is vm:
            self._known = (b"", None, 0, 0, 0, [], None, None)

    @staticmethod
    def _terminate(vm: Vm, reason: str) -> str:
        vm.state = VmState.CRASHED
        vm.crash_reason = f"SEV-ES guest terminated: {reason}"
        raise StopRun("terminated")

    # ---- the MSR protocol --------------------------------------------------------------------------
    def _sev_info(self, vm: Vm, vcpu: Vcpu, msr: int) -> None:
        top = vm.ghcb_version or GHCB_VERSION_MIN
        vcpu.vmcb.ghcb_gpa = (int(GhcbMsrInfo.SEV_INFO_RESP) | (self.host.cbit & 0xFF) << 24
                              | GHCB_VERSION_MIN << 32 | top << 48)

    def _msr_cpuid(self, vm: Vm, vcpu: Vcpu, msr: int) -> None:
        reg = (msr >> 30) & 3
        value = self.host.cpuid(msr >> 32, 0)[reg]
        vcpu.vmcb.ghcb_gpa = int(GhcbMsrInfo.CPUID_RESP) | reg << 30 | (value & _M32) << 32

    def _msr_reset_hold(self, vm: Vm, vcpu: Vcpu, msr: int) -> str | None:
        if self._pending_release(vm, vcpu):
            vcpu.vmcb.ghcb_gpa = int(GhcbMsrInfo.AP_RESET_HOLD_RESP) | _AP_RESET_HOLD_RELEASED
            return None
        vcpu.vmcb.ghcb_gpa = int(GhcbMsrInfo.AP_RESET_HOLD_RESP)  # result 0 until released
        return self._hold(vcpu)

    @staticmethod
    def _pending_release(vm: Vm, vcpu: Vcpu) -> bool:
        """An AP not yet released parks after the BSP published the jump table: the "SIPI" is
        pending, so it goes on at once."""
        if vm.ap_jump_table and not vcpu.released and vcpu is not vm.vcpus[0]:
            vcpu.released = True
            return True
        return False

    @staticmethod
    def _hold(vcpu: Vcpu) -> str:
        vcpu.reset_hold = True
        vcpu.holds += 1
        return "hold"

    def _reg_gpa(self, vm: Vm, vcpu: Vcpu, msr: int) -> None:
        gfn = msr >> 12
        ok = gfn << 12 < vm.memory
        if ok:
            vcpu.ghcb_registered = gfn << 12
        vcpu.vmcb.ghcb_gpa = int(GhcbMsrInfo.REG_GPA_RESP) | ((gfn if ok else (1 << 52) - 1) << 12)

    def _hv_features(self, vm: Vm, vcpu: Vcpu, msr: int) -> None:
        vcpu.vmcb.ghcb_gpa = int(GhcbMsrInfo.HV_FT_RESP) | self.hv_features << 12

    def _msr_term(self, vm: Vm, vcpu: Vcpu, msr: int) -> str:
        reason_set, code = (msr >> 12) & 0xF, (msr >> 16) & 0xFF
        vm.termination = (reason_set, code)
        return self._terminate(vm, f"the guest asked for it ({term_reason(reason_set, code)})")

    # ---- the GHCB page -------------------------------------------------------------------------------
    def _page(self, vm: Vm, vcpu: Vcpu, gpa: int) -> str | None:
        registered = vcpu.ghcb_registered
        if registered is not None and gpa != registered:
            return self._terminate(vm, f"GHCB at GPA {gpa:#x}, not the registered {registered:#x}")
        if not 0 < gpa <= vm.memory - PAGE:
            return self._terminate(vm, f"GHCB GPA {gpa:#x} is outside the guest")
        try:
            page = vcpu.ghcb_map
            if page is None or page.gpa != gpa or vm.npt.lookup(gpa) != page.spa:
                page = vcpu.ghcb_map = vm.host_page(gpa)  # (mapped again: another GHCB, or the NPT changed)
            got = page.read_runs(_HEAD_RUNS)  # (a request other than the known OUT: vmgexit)
            memo = self._memo
            if got == memo[0]:  # the same head as the last GHCB (which marked no field below it)
                save, bitmap, usage, fields = memo[1], memo[2], memo[3], dict(memo[4])
            else:
                save, bitmap, usage = self._read_rest(page, got)
                if save == self._last_save:  # the same marked fields as the last GHCB: the same decode
                    fields = dict(self._last_fields)
                else:
                    fields = _decode(save, bitmap)
                    self._last_save, self._last_fields = save, dict(fields)
                if not bitmap & _LOW_FIELDS:  # the head is all that was read: it decides the decode
                    self._memo = (got, save, bitmap, usage, self._last_fields)
        except UnmappedError:
            return self._terminate(vm, f"the GHCB at GPA {gpa:#x} is not backed")
        ex = NaeExit(vm, vcpu, gpa, fields.get("sw_exit_code", 0), fields.get("sw_exit_info_1", 0),
                     fields.get("sw_exit_info_2", 0), fields)
        stop: str | None = None
        try:
            if usage != GHCB_DEFAULT_USAGE:
                ex.refuse(GhcbError.INVALID_USAGE, f"ghcb_usage {usage:#x}")
            if "sw_exit_info_2" not in fields or "sw_exit_info_1" not in fields or "sw_exit_code" not in fields:
                ex.need("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2")
            fn = self.nae_table.get(ex.code)
            if fn is None:
                ex.refuse(GhcbError.INVALID_EVENT, f"exit code {ex.code:#x}")
            assert fn is not None
            stop = fn(ex)
        except _Refused as r:
            ex.out = {"sw_exit_info_1": int(SwExitInfo1Result.ERROR), "sw_exit_info_2": int(r.error)}
            vcpu.ghcb_errors.append(f"{r.error.name}: {r.detail}")
        except StopRun as s:
            if vm.state is VmState.CRASHED:
                raise
            stop = s.reason
        out = ex.out
        out.setdefault("sw_exit_info_1", 0)
        out.setdefault("sw_exit_info_2", 0)
        if out == self._last_out and save == self._last_wb_save:  # the same answer to the same GHCB
            writes = self._last_writes
        else:
            writes = _write_plan(save, out)
            self._last_out, self._last_wb_save, self._last_writes = dict(out), save, writes
        for off, data in writes:
            page.write(off, data)
        if (stop is None and ex.code == SwExitCode.IOIO and not ex.info1 & (_IOIO_STR | _IOIO_IN)
                and not bitmap & _LOW_FIELDS and usage == GHCB_DEFAULT_USAGE and len(out) == 2
                and not out["sw_exit_info_1"] and not out["sw_exit_info_2"] and "rax" in fields):
            size = _IOIO_SIZE_OF[ex.info1 & 0x70]
            key = got[:64] + got[_HEAD - _GPRS :]  # (the lines of _KNOWN_RUNS, from the head read)
            port = (ex.info1 >> 16) & 0xFFFF
            self._known = (key, self.nae_table.get(_IOIO_CODE), port, size, fields["rax"] & ((1 << (8 * size)) - 1),
                           writes, _out_sink(self.host, vm, port, size), vm)
        return stop

    @staticmethod
    def _read(page: HostPage) -> tuple[bytes, int, int]:
        """The GHCB's save area as far as the valid bitmap marks fields (other bytes zero), the
        bitmap and ``ghcb_usage``: 0x1C0..0x400 (the GPRs, SW_EXITCODE .. the bitmap) and the usage
        word's line in one access, then the lines of other marked fields (CPL, RIP ...) -- a
        hypervisor reads what it needs, not the page; whole lines, through the host's mapping of
        the page (:meth:`Vm.host_page <sevemu.hypervisor.vm.Vm.host_page>`)."""
        return GhcbHandler._read_rest(page, page.read_runs(_HEAD_RUNS))

    @staticmethod
    def _read_rest(page: HostPage, got: bytes) -> tuple[bytes, int, int]:
        """:meth:`_read`, given what its first access returned (``got``: RSP, RAX, RCX..R15,
        SW_EXITCODE .. the bitmap; the usage line)."""
        head = got[: _SAVE_HI - _GPRS]
        bitmap = int.from_bytes(head[_BITMAP - _GPRS :], "little")
        usage = int.from_bytes(got[_SAVE_HI - _GPRS + _TAIL + 4 - _TAIL_LINE :], "little")
        if not bitmap & _LOW_FIELDS:
            return _LOW_ZEROS + head, bitmap, usage
        save = bytearray(_LOW_ZEROS + head)
        lines = sorted({_OFF[name] & ~63 for bit, name in _FIELD_OF_BIT.items()
                        if bitmap >> bit & 1 and _OFF[name] < _GPRS})
        i = 0
        while i < len(lines):
            j = i + 1
            while j < len(lines) and lines[j] == lines[j - 1] + 64:
                j += 1
            lo, hi = lines[i], lines[j - 1] + 64
            data = page.read(lo, hi - lo)
            skip = max(_SAVE_LO - lo, 0)  # the line of CPL starts before the save area read
            save[lo + skip - _SAVE_LO : hi - _SAVE_LO] = data[skip:]
            i = j
        return bytes(save), bitmap, usage

    @staticmethod
    def _write_back(page: HostPage, save: bytes, out: dict[str, int]) -> None:
        """The outputs (and SW_EXITINFO1/2, 0 unless set) into the GHCB, the valid bitmap marking
        exactly them; written as runs of changed quadwords (in the head, read whole, as the lines around
        them: the bytes between are written back as read)."""
        for off, data in _write_plan(save, out):
            page.write(off, data)

    # ---- NAE events -------------------------------------------------------------------------------------
    def _cpuid(self, ex: NaeExit) -> None:
        leaf, = ex.need("rax")
        sub = ex.fields.get("rcx", 0)
        if leaf & _M32 == 0xD:
            ex.need("xcr0")
        a, b, c, d = self.host.cpuid(leaf & _M32, sub & _M32)
        ex.out.update(rax=a, rbx=b, rcx=c, rdx=d)

    def _ioio(self, ex: NaeExit) -> None:
        info = ex.info1
        port = (info >> 16) & 0xFFFF
        size = _IOIO_SIZE_OF[info & 0x70]
        if not size:
            ex.refuse(GhcbError.INVALID_INPUT, f"IOIO exit information {info:#x} has no operand size")
        host, vm = self.host, ex.vm
        if info & _IOIO_STR:
            count = ex.info2 if info & _IOIO_REP else 1
            length = count * size
            gpa = ex.scratch(length)
            if info & _IOIO_IN:
                data = b"".join(host.port_in(vm, port, size).to_bytes(size, "little") for _ in range(count))
                vm.host_write(gpa, data)
            else:
                data = vm.host_read(gpa, length)
                for k in range(count):
                    host.port_out(vm, port, size, int.from_bytes(data[k * size : (k + 1) * size], "little"))
            return
        if info & _IOIO_IN:
            ex.out["rax"] = host.port_in(vm, port, size)
        else:
            rax = ex.fields.get("rax")
            if rax is None:
                (rax,) = ex.need("rax")
            host.port_out(vm, port, size, rax & ((1 << (8 * size)) - 1))
        return

    def _msr(self, ex: NaeExit) -> None:
        (rcx,) = ex.need("rcx")
        msr = rcx & _M32
        if ex.info1 == 1:
            rax, rdx = ex.need("rax", "rdx")
            self.host.msr_write(ex.vm, msr, (rdx & _M32) << 32 | (rax & _M32))
        elif ex.info1 == 0:
            value = self.host.msr_read(ex.vm, msr)
            ex.out.update(rax=value & _M32, rdx=value >> 32 & _M32)
        else:
            ex.refuse(GhcbError.INVALID_INPUT, f"MSR exit information {ex.info1:#x}")

    def _vmmcall(self, ex: NaeExit) -> None:
        rax, _cpl = ex.need("rax", "cpl")
        regs = {"rax": rax, "rbx": ex.fields.get("rbx", 0), "rcx": ex.fields.get("rcx", 0),
                "rdx": ex.fields.get("rdx", 0)}
        ex.out["rax"] = self.host.hypercall(ex.vm, regs)

    def _mmio_read(self, ex: NaeExit) -> None:
        length = ex.info2
        if not 0 < length <= 8:
            ex.refuse(GhcbError.INVALID_INPUT, f"MMIO read of {length} bytes")
        gpa = ex.scratch(length)
        ex.vm.host_write(gpa, self.host.mmio_read(ex.vm, ex.info1, length))

    def _mmio_write(self, ex: NaeExit) -> None:
        length = ex.info2
        if not 0 < length <= 8:
            ex.refuse(GhcbError.INVALID_INPUT, f"MMIO write of {length} bytes")
        gpa = ex.scratch(length)
        self.host.mmio_write(ex.vm, ex.info1, ex.vm.host_read(gpa, length))

    def _ap_hlt_loop(self, ex: NaeExit) -> str | None:
        if self._pending_release(ex.vm, ex.vcpu):
            ex.out["sw_exit_info_2"] = 1
            return None
        ex.out["sw_exit_info_2"] = 0  # not woken yet (KVM sets it to 1 when a SIPI arrives)
        return self._hold(ex.vcpu)

    def _ap_jump_table(self, ex: NaeExit) -> None:
        if ex.info1 == ApJumpTableOp.SET:
            ex.vm.ap_jump_table = ex.info2
            for other in ex.vm.vcpus:  # the stand-in for INIT-SIPI (module docstring)
                if other is not ex.vcpu and other.reset_hold and not other.released:
                    other.released = True
                    other.reset_hold = False
                    other.vmcb.ghcb_gpa = int(GhcbMsrInfo.AP_RESET_HOLD_RESP) | _AP_RESET_HOLD_RELEASED
        elif ex.info1 == ApJumpTableOp.GET:
            ex.out["sw_exit_info_2"] = ex.vm.ap_jump_table
        else:
            ex.refuse(GhcbError.INVALID_INPUT, f"AP jump table operation {ex.info1:#x}")

    def _nae_hv_features(self, ex: NaeExit) -> None:
        ex.out["sw_exit_info_2"] = self.hv_features

    def _nae_term(self, ex: NaeExit) -> str:
        reason_set, code = ex.info1 & 0xF, (ex.info1 >> 4) & 0xFF
        ex.vm.termination = (reason_set, code)
        return self._terminate(ex.vm, f"the guest asked for it ({term_reason(reason_set, code)})")

    def _unsupported(self, ex: NaeExit) -> str:
        return self._terminate(ex.vm, f"the guest reported an unsupported #VC event (SW_EXITINFO1 {ex.info1:#x}, "
                                      f"SW_EXITINFO2 {ex.info2:#x})")


def _nothing(ex: NaeExit) -> None:
    return None


def _decode(save: bytes, bitmap: int) -> dict[str, int]:
    """The fields the valid bitmap marks, from the save area :meth:`GhcbHandler._read` returned
    (bits of no field are ignored, as KVM ignores them)."""
    fields: dict[str, int] = {}
    rest = bitmap
    while rest:
        low = rest & -rest
        rest ^= low
        name = _FIELD_OF_BIT.get(low.bit_length() - 1)
        if name is not None:
            off = _OFF[name] - _SAVE_LO
            fields[name] = save[off + 3] if name == "cpl" else _Q.unpack_from(save, off)[0]
    return fields


def _write_plan(save: bytes, out: dict[str, int]) -> list[tuple[int, bytes]]:
    """The writes of :meth:`GhcbHandler._write_back`: (offset, bytes) in order (``out`` gets the
    SW_EXITINFO1/2 defaults)."""
    out.setdefault("sw_exit_info_1", 0)
    out.setdefault("sw_exit_info_2", 0)
    writes: list[tuple[int, bytes]] = []
    quads: dict[int, bytes] = {}
    bitmap = 0
    for name, value in out.items():
        bitmap |= 1 << GHCB_VALID_BITS[name]
        if name == "cpl":  # one byte of its quadword, whose other bytes may not have been read
            writes.append((_OFF[name] + 3, bytes([value & 0xFF])))
        else:
            quads[_OFF[name]] = (value & _M64).to_bytes(8, "little")
    quads[_BITMAP] = (bitmap & _M64).to_bytes(8, "little")
    quads[_BITMAP + 8] = (bitmap >> 64).to_bytes(8, "little")
    # below the head's lines only marked fields were read: outputs there are always written
    offs = [o for o in sorted(quads) if o < _GPRS or quads[o] != save[o - _SAVE_LO : o - _SAVE_LO + 8]]
    head = [o for o in offs if o >= _HEAD]
    if head:  # the head was read whole: one write of the lines from its first to its last change
        lo, hi = head[0] & ~63, (head[-1] + 8 + 63) & ~63
        block = bytearray(save[lo - _SAVE_LO : hi - _SAVE_LO])
        for o in head:
            block[o - lo : o - lo + 8] = quads[o]
        writes.append((lo, bytes(block)))
    rest = [o for o in offs if o < _HEAD]
    i = 0
    while i < len(rest):
        j = i + 1
        while j < len(rest) and rest[j] == rest[j - 1] + 8:
            j += 1
        writes.append((rest[i], b"".join(quads[o] for o in rest[i:j])))
        i = j
    return writes
