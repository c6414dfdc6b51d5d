"""The Unicorn vCPU engine: real x86-64 guest code behind :class:`~sevemu.hw.cpu.Engine`.

Guests are real machine code (built from C by :mod:`sevemu.guest.build`).  Unicorn (QEMU's TCG as a
library) translates it to host code; the engine keeps it inside the SoC model's memory semantics
without calling back into Python on every access (``docs/cpu-engine.md`` has the long version):

* **Unicorn runs as an SVM guest** (:mod:`~sevemu.hw.uc.exits`): intercepted instructions stop
  precisely, with RIP on them; port I/O stops precisely through code hooks
  (:mod:`~sevemu.hw.uc.ports`).  What each instruction then does is the shared semantics of
  :mod:`sevemu.hw.x86.insn`, the same the Python engine uses.
* **Paging is the model's.**  Unicorn's virtual TLB asks the engine for every translation it
  misses (:meth:`UcEngine._fill`); the engine walks the guest's page tables and the hypervisor's
  NPT with :meth:`~sevemu.hw.mmu.Mmu.translate` (C-bit, nested walk, A/D bits, #PF, #NPF) and
  answers with a *slot* of its page pool (:mod:`~sevemu.hw.uc.pool`) filled in the access's
  encryption domain -- the fetch domain (always private for SEV) for instruction fetches, the data
  domain (the guest PTE's C-bit) for data.  A page whose two domains differ (a shared page that is
  also executed) gets two slots, mapped one role at a time.
* **The pool is a private cache level**, snooped by the shared cache: plaintext stays inside the
  SoC, and DRAM holds ciphertext at every exit.
* A watchdog thread (:mod:`~sevemu.hw.uc.watchdog`) ends a time slice with #VMEXIT(INTR).

The guest's registers -- GPRs, RIP, RFLAGS, CR0, CR3, CR4, EFER -- are read from Unicorn into the
save state (:attr:`GuestCpu.state <sevemu.hw.cpu.GuestCpu>`, the VMCB for a plain or SEV guest) on
every exit and written back (only what changed) on every entry.  :meth:`UcEngine.close` ends the
engine for good: Unicorn released, the pool written back, detached and zeroed.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import weakref
from collections.abc import Callable
from typing import Any, Final

from sevemu._util.units import PAGE
from sevemu.abi.paging import ExitCode
from sevemu.errors import HardwareError, InputError
from sevemu.hw.cache import tag_key
from sevemu.hw.codefetch import cpu_engine
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import NestedPageFault, PageFault, VmmCommunication
from sevemu.hw.svm import GPRS, SaveState, VmExit
from sevemu.hw.uc import accel, exits, reset
from sevemu.hw.uc import binding as uc
from sevemu.hw.uc.binding import I_CR0, I_CR3, I_RIP, REG, SYNC_IDS, check, ctl
from sevemu.hw.uc.exits import (
    EXIT_HLT,
    HSAVE_PA,
    IOPM_PA,
    MSRPM_PA,
    POOL_PA,
    STUB_PA,
    SVM_AREA_END,
    VMCB_PA,
    VMEXIT_BASE,
    VMRUN_STUB,
    Crash,
    msr_permission_map,
    msrpm_bit,
    private_vmcb,
)
from sevemu.hw.uc.pool import PagePool
from sevemu.hw.uc.ports import IoHooks
from sevemu.hw.uc.stats import UcStats
from sevemu.hw.uc.walk import NestedCachingMmu
from sevemu.hw.uc.watchdog import WATCHDOG
from sevemu.hw.x86 import insn
from sevemu.hw.x86.arch import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_SVME,
    EFER_WRITABLE,
    MSR_EFER,
    RFLAGS_FIXED,
)
from sevemu.hw.x86.decode import GuestInsn, decode_guest_insn
from sevemu.hw.x86.exc import CpuView, Delivered
from sevemu.hw.x86.state import InitialState

__all__ = ["EngineClosedError", "UcEngine", "check_vmcb_state"]

_VM_HSAVE_PA_MSR: Final = 0xC001_0117
_CLEAN_SYNCS_BEFORE_DEMOTE: Final = 256
_SPURIOUS_LIMIT: Final = 1000
_HOOK_LIMIT: Final = 16384
_VMGEXIT_CODE: Final = int(ExitCode.VMGEXIT)
_I_RSP: Final = GPRS.index("rsp")
_CR0_WP: Final = 1 << 16
_CR0_TLB_BITS: Final = CR0_PG | CR0_PE | _CR0_WP
"""CR0 bits whose change flushes QEMU's TLB (PG, PE, WP: ``cpu_x86_update_cr0``)."""


def _weakly(method: Callable[[], None]) -> Callable[[], None]:
    """``method`` of the engine, called only while the engine lives: what the pool and the port
    hooks hold, so that the cache (which holds the pool) does not keep a dropped engine alive."""
    ref = weakref.WeakMethod(method)

    def call() -> None:
        m = ref()
        if m is not None:
            m()

    return call


class EngineClosedError(HardwareError):
    """Raised when a closed Unicorn engine is asked to run again."""


def check_vmcb_state(vmcb: SaveState) -> str | None:
    """Why a save state (the VMCB's save area, or an SEV-ES guest's VMSA) cannot be run by this
    engine (None when it can)."""
    cr0, cr4, efer = vmcb.cr0, vmcb.cr4, vmcb.efer
    if not cr0 & CR0_PE:  # the x86 reset state (hw/uc/reset.py)
        return reset.real_mode_reason(vmcb)
    if cr0 & CR0_PG:
        if not efer & EFER_LME or not cr4 & CR4_PAE:
            return f"CR0.PG needs long mode here (EFER.LME and CR4.PAE): CR0 {cr0:#x} CR4 {cr4:#x} EFER {efer:#x}"
        if not vmcb.cr3 or vmcb.cr3 & 0xFFF:
            return f"paging is on but CR3 {vmcb.cr3:#x} is not a page-aligned table address"
    elif efer & EFER_LMA:
        return f"EFER.LMA without CR0.PG (CR0 {cr0:#x}, EFER {efer:#x})"
    if efer & ~(EFER_WRITABLE | EFER_LMA):
        return f"EFER {efer:#x} has reserved bits set"
    if not vmcb.rflags & RFLAGS_FIXED or vmcb.rflags >> 22:
        return f"RFLAGS {vmcb.rflags:#x}: bit 1 must be set and bits 63:22 clear"
    limit = 1 << 47 if cr0 & CR0_PG else 1 << 32
    if not 0 <= vmcb.rip < limit:
        return f"RIP {vmcb.rip:#x} is outside the {'long' if cr0 & CR0_PG else '32-bit'} mode address space"
    return None


@cpu_engine  # fetches the guest's code from guest memory with the guest's key
class UcEngine:
    """Runs real x86 guest code on a vCPU (see the module docstring).

    ``pool_pages`` bounds the plaintext page pool (slots beyond it are evicted, written back);
    ``slice_s`` is the time slice after which the watchdog ends a VMRUN with #VMEXIT(INTR).
    ``initial`` is validated at once (a bad state is an error before anything runs); the launcher
    writes it into the VMCB with :meth:`InitialState.apply`.  After a triple fault :attr:`crash`
    holds the reason and :attr:`crash_rip` the guest RIP.
    """

    def __init__(self, *, pool_pages: int = 4096, slice_s: float = 0.2, initial: InitialState | None = None,
                 name: str = "", nested_cache: bool = False) -> None:
        if pool_pages < 32:
            raise InputError(f"the page pool needs at least 32 slots, got {pool_pages}")
        if slice_s <= 0:
            raise InputError("the time slice must be positive")
        if initial is not None:
            initial.validate()
        self.initial = initial
        self.name = name
        self.pool_pages = pool_pages
        self.slice_s = slice_s
        self.crash: str | None = None
        self.crash_rip: int | None = None
        self.stats = UcStats()
        self.nested_cache = nested_cache
        """Cache nested translations until a TLB flush (:mod:`~sevemu.hw.uc.walk`; firmware that misses often)."""
        self._walker: NestedCachingMmu | None = None
        self.fetch_observer: Callable[[int, int, int, int], None] | None = None
        """Called with (linear address, CR0, EFER, RSP) at each instruction-fetch TLB fill (a boot timeline)."""
        self._lib = uc.library()
        self._h = ctypes.c_void_p(0)
        self._booted = False
        self._booting = False
        self._closed = False
        self._keep: list[Any] = []  # ctypes callbacks Unicorn holds pointers to
        self._cpu: GuestCpu | None = None
        self._tlb_token: object = None
        self._stop_word = accel.StopWord()
        self.pool = PagePool(pool_pages, self.stats, _weakly(self._stop))
        self._ports: IoHooks | None = None
        # registers
        n = len(SYNC_IDS)
        self.vals = array.array("Q", bytes(8 * n))
        """The register batch of the last stop (Unicorn writes it straight into this array)."""
        base = self.vals.buffer_info()[0]
        self._ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self._ids = (ctypes.c_int * n)(*SYNC_IDS)
        self._runner: accel.Runner | None = None  # one time slice: uc_emu_start + the batch (hw/uc/accel.py)
        self.use_c_runner: bool | None = None
        self.use_c_pvalidate: bool | None = None
        """Whether the invalid-instruction hook is the C one that retires the armed PVALIDATE case itself
        (:func:`accel.pvalidate_hook`; None: where it was built); set before the first run."""
        self._pv: accel.PvHook | None = None
        self._pv_armed = False  # (whether _pv may be armed)
        """The runner's implementation (None: the C helper where it was built); set before the first run."""
        self._retire_vals = array.array("Q", bytes(24))
        """RAX, RFLAGS, RIP of an instruction retired inside a hook (:meth:`retire`)."""
        rbase = self._retire_vals.buffer_info()[0]
        self._retire_ptrs = (ctypes.c_void_p * 3)(rbase, rbase + 8, rbase + 16)
        self._retire_ids = (ctypes.c_int * 3)(REG["rax"], uc.REG_RFLAGS, uc.REG_RIP)
        self._scratch = ctypes.c_uint64()
        self._scratch_ref = ctypes.byref(self._scratch)
        self._fill_regs = array.array("Q", bytes(16))
        """CR0 and CR3 at a TLB fill, read in one batch."""
        fbase = self._fill_regs.buffer_info()[0]
        self._fill_ptrs = (ctypes.c_void_p * 2)(fbase, fbase + 8)
        self._fill_ids = (ctypes.c_int * 2)(uc.REG_CR0, uc.REG_CR3)
        self._efer = 0  # the guest's EFER (LMA follows CR0.PG); Unicorn's copy has SVME too
        # stop reasons
        self._event: int | None = None
        self._pending: PageFault | NestedPageFault | VmmCommunication | None = None
        self._internal: str | None = None
        self._imprecise_io: str | None = None
        self._timer_fired = False
        self._tb_flush_pending = False
        # translations granted to Unicorn
        self._w_gvas: dict[int, int] = {}  # GVA page -> CR3 it was written under (D bit set)
        self._fill_cr0 = -1
        self._fill_cr3 = -1
        self._clean_syncs = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """End the engine for good: the watchdog forgets it, Unicorn is released, the page pool is
        written back into the cache, detached from it and zeroed (no plaintext of the guest is left
        in the engine).  Running it afterwards raises :class:`EngineClosedError`."""
        self._close(write_back=True)

    def _close(self, write_back: bool) -> None:
        if self._closed:
            return
        self._closed = True
        WATCHDOG.unwatch(self)  # from here on the watchdog never touches the handle
        self._runner = None  # (it holds the handle and the register array's buffer)
        if self._pv is not None:
            self._pv.disarm()
        h, self._h = self._h, ctypes.c_void_p(0)
        if h.value:
            self._lib.uc_close(h)
        self.pool.close(write_back)
        if self._ports is not None:
            self._ports.close()
            self._ports = None
        self._keep.clear()
        self._pv = None
        self._pv_armed = False
        self._cpu = None
        self._pending = None
        for i in range(len(self.vals)):
            self.vals[i] = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        # Collected without close() -- possibly in another thread (the watchdog's): release and zero,
        # but leave the shared cache alone (the pool has nothing unsynced between two runs anyway).
        with contextlib.suppress(Exception):
            self._close(write_back=False)

    # ---- watchdog interface -------------------------------------------------------------------
    def timer_expired(self, now: float) -> bool:
        runner = self._runner
        start = runner.started if runner is not None else 0.0
        if start and now - start > self.slice_s:
            self._timer_fired = True
            return True
        return False

    def slice_deadline(self) -> float:
        runner = self._runner
        start = runner.started if runner is not None else 0.0
        return start + self.slice_s if start else 0.0

    def _stop(self) -> None:
        """Stop at the next block boundary (:func:`~sevemu.hw.uc.accel.block_stop_hook`): never from
        the middle of an instruction, which Unicorn would run again although its store was done."""
        self._stop_word.request = 1

    def request_stop(self) -> None:
        """The watchdog's stop at the end of a time slice (at the next block boundary)."""
        self._stop_word.request = 1

    # ---- Engine protocol ------------------------------------------------------------------------
    def run(self, cpu: GuestCpu) -> VmExit:
        """VMRUN: execute guest code on ``cpu`` until an intercepted event (see the module docstring)."""
        if self._closed:
            raise EngineClosedError(f"the Unicorn engine {self.name or hex(id(self))} was closed; it cannot run again")
        if self.crash is not None:
            return VmExit(ExitCode.SHUTDOWN)
        stats = self.stats
        stats.runs += 1
        if not self._booted:
            reason = check_vmcb_state(cpu.state)
            if reason is None:
                try:
                    self._boot(cpu)
                except HardwareError as exc:
                    reason = f"the engine could not start: {exc}"
            if reason is not None:
                self.crash = f"invalid initial state: {reason}"
                return VmExit(ExitCode.INVALID)
        state = cpu.state
        try:
            # VMRUN's entry (in this frame: the exit path): the pool's PVALIDATE hook, coherence with
            # the cache and TLB, the registers the hypervisor changed since the last exit
            self._cpu = cpu
            if self._pv_armed:
                self._pv_armed = False
                self._pv.disarm()  # type: ignore[union-attr]  # (armed: the hook exists; armed again by the next
                # PVALIDATE the Python hook retires)
            core = cpu.core
            pool = self.pool
            pool.synced = False
            if (core.cache is not pool.cache or core.tlb.by_asid.get(cpu.asid) is not self._tlb_token
                    or pool.stale or pool.evict_requested):
                self._enter_maintenance(cpu)
            elif pool.updated:  # only slots the host wrote whole lines of (an SEV-ES guest's GHCB answer)
                assert self._ports is not None
                self._ports.code_changed(pool.take_updated())
            try:
                if self._runner.enter(state) < 0:  # type: ignore[union-attr]  # (booted: a runner exists)
                    self._sync_control((state.rflags, state.cr0, state.cr3, state.cr4, state.efer))
            except RuntimeError as exc:
                raise HardwareError(str(exc)) from exc
            if not self._tb_flush_pending:
                # The first run and its known port-I/O exit, in this frame (the exit path; _execute's
                # first pass otherwise, which then goes on with this run's result)
                self._event = None
                self._pending = None
                self._timer_fired = False
                self._stop_word.request = 0  # (a request made while the guest was not running is void)
                first = self._runner.run_known(self, state.rip)  # type: ignore[union-attr]  # (booted: a runner exists)
                if first.__class__ is not int and (first.code != _VMGEXIT_CODE or cpu.vmcb.sev_es_enable):
                    stats.io_exits += 1
                    ex: VmExit = first
                    cpu.vmcb.next_rip = ex.info2
                else:
                    ex = self._execute(cpu, first)
            else:
                ex = self._execute(cpu, None)
            stop: NestedPageFault | Crash | None = None
        except (NestedPageFault, Crash) as exc:
            stop = exc
        # #VMEXIT (also after a nested page fault or a crash): modified slots back into the SoC, the
        # registers into the save state
        pool = self.pool
        writable = pool.writable
        if writable:
            # Slots that stay clean lose their write permission after a while (a TLB flush), so that
            # only pages the guest keeps writing are compared at each exit -- also while others (an
            # SEV-ES guest's GHCB) are written at every exit.
            if pool.sync() >= len(writable):
                self._clean_syncs = 0
            else:
                n = self._clean_syncs = self._clean_syncs + 1
                if n >= _CLEAN_SYNCS_BEFORE_DEMOTE:
                    vals = self.vals
                    self._demote_writes(vals[I_CR0], vals[I_CR3])
        pool.synced = True  # until the next VMRUN nothing in the pool changes behind the cache
        self._runner.leave(state, self._efer)  # type: ignore[union-attr]  # (booted: a runner exists)
        if stop is not None:
            if isinstance(stop, NestedPageFault):
                stats.count(ExitCode.NPF)
                raise stop
            self.crash = str(stop)
            self.crash_rip = state.rip
            stats.count(ExitCode.SHUTDOWN)
            return VmExit(ExitCode.SHUTDOWN)
        stats.exits += 1  # (UcStats.count, inlined: the exit path)
        by = stats.by_code
        code = ex.code
        by[code] = by.get(code, 0) + 1
        return ex

    # ---- boot: open Unicorn, VMRUN into the guest --------------------------------------------
    def _boot(self, cpu: GuestCpu) -> None:
        lib = self._lib
        state = cpu.state
        uc.open_x86(self._h, tcg_buffer=64 << 20)
        h = self._h
        check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 1, uc.UC_CTL_TLB_TYPE)), ctypes.c_int(uc.UC_TLB_VIRTUAL)),
              "virtual TLB")
        check(lib.uc_mem_map(h, STUB_PA, SVM_AREA_END - STUB_PA, uc.UC_PROT_ALL), "mapping the SVM area")
        address = self.pool.open()
        check(lib.uc_mem_map_ptr(h, POOL_PA, self.pool_pages * PAGE, uc.UC_PROT_ALL, address),
              "mapping the page pool")
        # The port-I/O code hooks call uc_emu_stop itself (its one argument is the hook's first):
        # no Python on the way; a stop without another reason at a hooked address is the I/O exit.
        self._ports = IoHooks(lib, h, uc.fn_address(lib.uc_emu_stop), self.pool.page, _weakly(self._flush_tb),
                              _weakly(self._request_tb_flush))
        self.pool.on_forget = self._ports.forget_slot
        self.pool.code_slots = self._ports.exec_slots  # (a write-update of another slot changes no code)
        # hooks
        fill = uc.TLB_FILL_CB(self._on_fill)
        intr = uc.INTR_CB(self._on_intr)
        hin = uc.IN_CB(self._on_in)
        hout = uc.OUT_CB(self._on_out)
        pv = accel.pvalidate_hook(lib, h, self._on_invalid) if self.use_c_pvalidate is not False else None
        inval = uc.INSN_INVALID_CB(self._on_invalid) if pv is None else None
        self._pv = pv
        self._keep += [fill, intr, hin, hout, inval, pv]
        hh = ctypes.c_size_t()
        block_stop, keep = accel.block_stop_hook(lib)
        self._stop_word.stop = uc.fn_address(lib.uc_emu_stop)
        self._keep += [keep, self._stop_word]
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_BLOCK, block_stop,
                              ctypes.cast(ctypes.pointer(self._stop_word), ctypes.c_void_p), 1, 0), "block hook")
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_TLB_FILL, uc.fn_address(fill), None, 1, 0),
              "TLB-fill hook")
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_INTR, uc.fn_address(intr), None, 1, 0),
              "interrupt hook")
        check(lib.uc_hook_add(h, ctypes.byref(hh), uc.UC_HOOK_INSN_INVALID,
                              uc.fn_address(inval) if pv is None else pv.address(),
                              None if pv is None else ctypes.c_void_p(id(pv)), 1, 0), "invalid-instruction hook")
        for cb, which in ((hin, uc.UC_X86_INS_IN), (hout, uc.UC_X86_INS_OUT)):
            uc.hook_insn(h, hh, cb, which)
        # the private VMCB, permission maps, VMRUN stub
        self._write_phys(IOPM_PA, b"\xff" * 0x3000)
        self._write_phys(MSRPM_PA, msr_permission_map())
        self._write_phys(VMCB_PA, private_vmcb(state))
        self._write_phys(STUB_PA, VMRUN_STUB)
        self._efer = state.efer & ~EFER_LMA
        self._raw_msr_write(MSR_EFER, EFER_LME | EFER_LMA | EFER_SVME)
        self._raw_msr_write(_VM_HSAVE_PA_MSR, HSAVE_PA)
        self.write_reg(uc.REG_CR4, CR4_PAE)
        self.write_reg(uc.REG_CR0, CR0_PE | CR0_ET | CR0_PG)
        self.write_reg(REG["rax"], VMCB_PA)
        # Run the stub: VMRUN, then stop at the guest's first instruction (an exit address there).
        check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 1, uc.UC_CTL_UC_USE_EXITS)), ctypes.c_int(1)), "exits")
        entry = reset.entry_linear(state)  # Unicorn's exit addresses are linear (CS base + RIP)
        stub_va = 0x1000 if (entry & ~0xFFF) != 0x1000 else 0x2000
        self._set_exits([entry])
        self._booting = True
        self._event = None
        try:
            err = lib.uc_emu_start(h, stub_va, 0, 0, 0)
        finally:
            self._booting = False
        if err != uc.UC_ERR_OK or self._event != VMEXIT_BASE + EXIT_HLT:
            raise HardwareError(f"VMRUN into the guest failed (error {err}, event {self._event})")
        self._set_exits([])  # exits stay enabled, with none: Unicorn then never stops on an address
        self._flush_tlb_all()
        self.pool.attach(cpu.core.cache)
        self._runner = accel.runner(lib, h, self._ids, self.vals, self._ptrs, GPRS, use_c=self.use_c_runner)
        self._runner.bind_io(self._ports.offsets, self._ports.exits, self._ports.xgva, address, self.pool_pages * PAGE)
        if self._pv is not None:
            self._pv.bind(self._ports.xgva, address, self.pool_pages * PAGE)
        self._booted = True
        WATCHDOG.watch(self)

    # ---- low-level helpers (also what hw/uc/exits.py sees of the engine) -------------------------
    def _write_phys(self, pa: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        check(self._lib.uc_mem_write(self._h, pa, buf, len(data)), "uc_mem_write")

    def write_reg(self, reg: int, value: int) -> None:
        self._scratch.value = value & 0xFFFFFFFFFFFFFFFF
        check(self._lib.uc_reg_write(self._h, reg, self._scratch_ref), "register write")

    @property
    def walker(self) -> NestedCachingMmu | None:
        """The caching walker of the fills (``nested_cache``; None before the first fill)."""
        return self._walker

    def retire(self, rax: int, rflags: int, rip: int) -> None:
        """Write RAX, RFLAGS and RIP in one call: an instruction retired inside a hook (Unicorn
        resumes at ``rip``)."""
        v = self._retire_vals
        v[0], v[1], v[2] = rax & 0xFFFFFFFFFFFFFFFF, rflags, rip
        check(self._lib.uc_reg_write_batch(self._h, self._retire_ids, self._retire_ptrs, 3), "register write")

    def _reg_read(self, reg: int) -> int:
        check(self._lib.uc_reg_read(self._h, reg, self._scratch_ref), "register read")
        return int(self._scratch.value)

    def _raw_msr_write(self, msr: int, value: int) -> None:
        m = uc.MsrArg(msr, value)
        check(self._lib.uc_reg_write(self._h, uc.REG_MSR, ctypes.byref(m)), f"MSR {msr:#x} write")

    def set_efer(self, guest_efer: int, cr0: int) -> None:
        """Give Unicorn the guest's EFER (plus SVME, which Unicorn needs for VMMCALL).  Unicorn applies
        the intercept check to the engine's own MSR write too, so the EFER bits of the permission map
        are cleared around it (QEMU reads the map from memory each time)."""
        self._efer = guest_efer & ~EFER_LMA
        off, shift = msrpm_bit(MSR_EFER)
        self._write_phys(MSRPM_PA + off, bytes([0xFF & ~(3 << shift)]))
        try:
            lma = EFER_LMA if (self._efer & EFER_LME and cr0 & CR0_PG) else 0
            self._raw_msr_write(MSR_EFER, self._efer | EFER_SVME | lma)
        finally:
            self._write_phys(MSRPM_PA + off, b"\xff")

    def guest_efer(self, cr0: int) -> int:
        return self._efer | (EFER_LMA if (self._efer & EFER_LME and cr0 & CR0_PG) else 0)

    # ---- exception delivery (what hw/x86/exc.py needs of the engine) ---------------------------
    def _mmr(self, reg: int) -> uc.Mmr:
        m = uc.Mmr()
        check(self._lib.uc_reg_read(self._h, reg, ctypes.byref(m)), "descriptor-table register read")
        return m

    def _access_failed(self) -> None:
        """After a failed access during delivery: an NPF is the hypervisor's (#VMEXIT; the
        instruction runs again once it is resolved, and raises its exception again)."""
        pending, self._pending = self._pending, None
        if isinstance(pending, NestedPageFault):
            raise pending

    def read_virt(self, gva: int, n: int) -> bytes | None:
        buf = ctypes.create_string_buffer(n)
        if self._lib.uc_vmem_read(self._h, gva, uc.UC_PROT_READ, buf, n) != uc.UC_ERR_OK:
            self._access_failed()
            return None
        return buf.raw[:n]

    def write_virt(self, gva: int, data: bytes) -> bool:
        # Through Unicorn's TLB, so the fill hook grants the write and the pool writes it back at
        # the next exit; each page is probed for writing first, so nothing is stored on a fault.
        for page in sorted({gva & ~(PAGE - 1), (gva + len(data) - 1) & ~(PAGE - 1)}):
            addr = max(page, gva)
            probe = ctypes.create_string_buffer(1)
            if self._lib.uc_vmem_read(self._h, addr, uc.UC_PROT_READ, probe, 1) != uc.UC_ERR_OK or \
                    self._lib.uc_vmem_write(self._h, addr, uc.UC_PROT_WRITE, probe, 1) != uc.UC_ERR_OK:
                self._access_failed()
                return False
        buf = ctypes.create_string_buffer(data, len(data))
        if self._lib.uc_vmem_write(self._h, gva, uc.UC_PROT_WRITE, buf, len(data)) != uc.UC_ERR_OK:
            self._access_failed()
            return False
        return True

    def cpu_view(self, rip: int) -> CpuView:
        vals = self.vals
        idtr = self._mmr(uc.REG_IDTR)
        long_mode = bool(vals[I_CR0] & CR0_PG) and bool(self._efer & EFER_LME)
        return CpuView(long_mode=long_mode, idtr_base=idtr.base, idtr_limit=idtr.limit,
                       cs=self._reg_read(uc.REG_CS) & 0xFFFF, ss=self._reg_read(uc.REG_SS) & 0xFFFF, rip=rip, rsp=vals[_I_RSP],
                       rflags=vals[uc.I_RFLAGS], tr_base=self._mmr(uc.REG_TR).base if long_mode else 0)

    def enter_handler(self, d: Delivered) -> None:
        self.write_reg(REG["rsp"], d.rsp)
        self.write_reg(uc.REG_RFLAGS, d.rflags)
        self.vals[_I_RSP] = d.rsp
        self.vals[uc.I_RFLAGS] = d.rflags
        self.vals[I_RIP] = d.rip
        self.stats.exceptions_delivered += 1

    def write_cr2(self, address: int) -> None:
        self.write_reg(uc.REG_CR2, address)

    def refresh(self) -> None:
        pool = self.pool
        changed = pool.refresh_stale() if pool.stale else []
        if pool.updated:
            changed += pool.take_updated()
        if changed and self._ports is not None:
            self._ports.code_changed(changed)

    def _set_exits(self, addrs: list[int]) -> None:
        arr = (ctypes.c_uint64 * max(len(addrs), 1))(*addrs)
        check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 2, uc.UC_CTL_UC_EXITS)), arr,
                               ctypes.c_size_t(len(addrs))), "exit addresses")

    def _flush_tlb_all(self) -> None:
        """Drop every Unicorn translation (and translated block); written slots are synced first."""
        self.pool.sync_all()
        check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TLB_FLUSH))), "TLB flush")
        self.stats.tlb_flushes += 1
        if self._walker is not None:
            self._walker.flush()
        self._forget_grants()

    def flush_tlb(self) -> None:
        self._flush_tlb_all()

    def _regrow_tlb(self) -> None:
        """At a time-slice end, with the translation cache on: drop Unicorn's TLB but not the
        engine's cached translations (``hw/uc/walk.py``).  QEMU sizes its TLB at each flush from how
        full it was, so this lets it grow to the guest's working set: firmware streaming through
        megabytes (OVMF's SEC) missed about ten times per page in the 256 entries it starts with,
        and every miss is a call of the fill hook.  Written slots are synced first, their write
        grants forgotten (as at any flush); refills are answered from the cached translations."""
        self.pool.sync_all()
        check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TLB_FLUSH))), "TLB flush")
        self._forget_grants()

    def _forget_grants(self) -> None:
        self.pool.writable.clear()
        self._w_gvas.clear()
        if self._ports is not None:
            self._ports.tlb_flushed()
        self._fill_cr0 = self._fill_cr3 = -1

    def _request_tb_flush(self) -> None:
        """Flush translated code before the guest runs on: stop at the next block boundary."""
        self._tb_flush_pending = True
        self._stop()

    def _flush_tb(self) -> None:
        self._tb_flush_pending = False
        check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TB_FLUSH))), "TB flush")
        self.stats.tb_flushes += 1
        if self._ports is not None:
            self._ports.tb_flushed()

    def read_code(self, rip: int, n: int = 16) -> bytes:
        """Up to ``n`` instruction bytes at ``rip``, from the slot the page was fetched from."""
        off = rip & (PAGE - 1)
        slot = self._ports.xgva.get(rip & ~(PAGE - 1)) if self._ports is not None else None
        mm = self.pool.mm
        if slot is not None and off + n <= PAGE and mm is not None:
            return mm[slot * PAGE + off : slot * PAGE + off + n]
        buf = ctypes.create_string_buffer(n)
        while n > 0:
            if self._lib.uc_vmem_read(self._h, rip, uc.UC_PROT_EXEC, buf, n) == uc.UC_ERR_OK:
                return buf.raw[:n]
            page_left = PAGE - off
            n = page_left if n > page_left else 0
        return b""

    # ---- entry and exit: registers, coherence --------------------------------------------------
    def _enter_maintenance(self, cpu: GuestCpu) -> None:
        if self.pool.attach(cpu.core.cache):
            self._flush_tlb_all()
        token = cpu.core.tlb.by_asid.get(cpu.asid)
        if token is not self._tlb_token:  # TLB_CONTROL flushed this ASID (or another core runs us)
            if self._tlb_token is not None:
                self._flush_tlb_all()
            self._tlb_token = token
        self.refresh()
        if self.pool.evict_requested:
            self._evict()

    def _sync_control(self, ctl_regs: tuple[int, int, int, int, int]) -> None:
        runner = self._runner
        assert runner is not None
        old = runner.ctl()  # what Unicorn was last given or stopped with; () after forget()
        rflags, cr0, cr3, cr4, efer = ctl_regs
        if not old or rflags != old[0]:
            self.write_reg(uc.REG_RFLAGS, rflags | RFLAGS_FIXED)
        if not old or cr4 != old[3]:
            self.write_reg(uc.REG_CR4, cr4)
        if not old or cr3 != old[2]:
            self.write_reg(uc.REG_CR3, cr3)
        if not old or cr0 != old[1]:
            self.write_reg(uc.REG_CR0, cr0)
        if efer != self.guest_efer(cr0):
            self.set_efer(efer, cr0)
        runner.set_ctl(ctl_regs)

    def _demote_writes(self, cr0: int, cr3: int) -> None:
        """Take write permission back from Unicorn (a TLB flush), so that only pages the guest
        writes again need checking at each exit; called when written pages stay clean a while."""
        self._clean_syncs = 0
        if cr0 & CR0_PG:
            self.write_reg(uc.REG_CR3, cr3)  # a CR3 reload flushes Unicorn's TLB, not its code cache
        else:
            check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TLB_FLUSH))), "TLB flush")
        self._forget_grants()

    def invalidate_pool(self) -> None:
        """The guest's WBINVD (``exits.intercept``): every slot written back and forgotten, as a cache
        level is invalidated; Unicorn's TLB is flushed (the page walker's translations stay: memory
        did not change) and translated code of the slots goes at the top of the run loop."""
        if self.pool.drop_all():
            check(self._lib.uc_ctl(self._h, ctypes.c_int(ctl(1, 0, uc.UC_CTL_TLB_FLUSH))), "TLB flush")
            self.stats.tlb_flushes += 1
            self._forget_grants()

    def _evict(self) -> None:
        """Free the oldest quarter of the pool (written back first); Unicorn's TLB is flushed."""
        self.pool.evict()
        self._flush_tlb_all()

    # ---- the run loop ----------------------------------------------------------------------------
    def _execute(self, cpu: GuestCpu, first: Any) -> VmExit:
        """The run loop; ``first``: the result of the time slice :meth:`run` already ran (not a known
        port-I/O exit), or None when it ran none (a TB flush pending)."""
        runner = self._runner
        assert runner is not None
        vals = self.vals
        ports = self._ports
        assert ports is not None
        run = runner.run_known
        io_offsets = ports.offsets
        io_exits = ports.exits
        xgva = ports.xgva
        mm = self.pool.mm
        stop_word = self._stop_word
        rip = cpu.state.rip
        spurious = 0
        while True:
            if first is not None:  # (the first run, made above)
                err, first = first, None
            else:
                if self._tb_flush_pending:
                    self._flush_tb()
                self._event = None
                self._pending = None
                self._timer_fired = False
                stop_word.request = 0  # (a request made while the guest was not running is void, as uc_emu_stop's)
                err = run(self, rip)
            if err.__class__ is not int:  # a known port-I/O exit (the test below, made by the runner)
                if err.code != _VMGEXIT_CODE or cpu.vmcb.sev_es_enable:
                    self.stats.io_exits += 1
                    cpu.vmcb.next_rip = err.info2
                    return err  # type: ignore[no-any-return]
                io_exits.clear()  # a VMGEXIT remembered in an SEV-ES run; this run is not one: decided afresh
                err = 0
            if err < 0:
                raise Crash("the engine could not read the guest's registers")
            rip = vals[I_RIP]
            if self._internal is not None:
                raise Crash(f"engine error at RIP {rip:#x}: {self._internal}")
            ev = self._event
            if err:
                pending, self._pending = self._pending, None
                ex = exits.error(self, cpu, err, pending, rip)
                if ex is not None:
                    return ex
                self.stats.internal_exits += 1
                rip = vals[I_RIP]
            elif ev is None:
                if self._tb_flush_pending:
                    continue  # (stopped for the TB flush, done at the top of the loop)
                page = rip & ~0xFFF
                off = rip & 0xFFF
                offs = io_offsets.get(page)
                if offs is not None and off in offs:  # a port-I/O code hook stopped here
                    hit = io_exits.get(rip)
                    if hit is not None and hit[3].code == _VMGEXIT_CODE and not cpu.vmcb.sev_es_enable:
                        io_exits.clear()  # (as above)
                        hit = None
                    if hit is not None and hit[2] in (-1, vals[3] & 0xFFFF) and hit[1] == bool(vals[I_CR0] & CR0_PG):
                        slot = xgva.get(page)  # (read_code, inlined: the exit path)
                        if slot is not None and off <= PAGE - 16 and mm is not None:
                            code = mm[slot * PAGE + off : slot * PAGE + off + 16]
                        else:
                            code = self.read_code(rip, 16)
                        if hit[0] == code:
                            known: VmExit = hit[3]  # the same instruction as last time: its decoded exit
                            self.stats.io_exits += 1
                            cpu.vmcb.next_rip = known.info2
                            return known
                    io_exit = self._port_io(cpu, rip)
                    if io_exit is not None:
                        return io_exit
                    rip = vals[I_RIP]  # past a spurious stop: unchanged; a delivered #VC: its handler
                    continue
                if self._imprecise_io is not None:
                    raise Crash(self._imprecise_io)
                if self._timer_fired:
                    if ports.hook_count > _HOOK_LIMIT:
                        self._drop_hooks()
                    elif self._walker is not None:
                        self._regrow_tlb()
                    return VmExit(ExitCode.INTR)
                if self.pool.evict_requested:
                    self._evict()
                    continue
                spurious += 1
                self.stats.spurious_stops += 1
                if spurious > _SPURIOUS_LIMIT:
                    raise Crash(f"emulation keeps stopping without a reason at RIP {rip:#x}")
                continue
            elif ev >= VMEXIT_BASE:
                ex = exits.intercept(self, cpu, ev - VMEXIT_BASE, rip)
                if ex is not None:
                    return ex
                self.stats.internal_exits += 1
                rip = vals[I_RIP]
            else:
                ex = exits.exception(self, cpu, ev, rip)
                if ex is not None:
                    return ex
                self.stats.internal_exits += 1
                rip = vals[I_RIP]

    def _drop_hooks(self) -> None:
        """Unicorn checks every code hook for every instruction it translates, so a guest that has
        executed thousands of pages (firmware) makes translation slow: at a time-slice end with more
        than :data:`_HOOK_LIMIT` hooks, all are removed with Unicorn's TLB and translated code, and
        pages are hooked again as they are fetched."""
        assert self._ports is not None
        self._ports.drop_all()
        self._flush_tlb_all()
        self._flush_tb()
        self.stats.hook_resets += 1

    def _port_io(self, cpu: GuestCpu, rip: int) -> VmExit | None:
        """A code hook stopped the guest before an IN/OUT: the IOIO exit (None if it was not one)."""
        vals = self.vals
        long_mode = bool(vals[I_CR0] & CR0_PG)
        assert self._ports is not None
        code = self.read_code(rip, 16)
        guest = decode_guest_insn(code, long_mode)
        if guest is not None:  # a hooked 0F 01 D9: VMGEXIT of an SEV-ES guest exits here (insn.vmgexit)
            if guest[0] is GuestInsn.VMGEXIT and cpu.vmcb.sev_es_enable:
                # Remembered with the known port-I/O exits (the same test: RIP, mode, the instruction's
                # bytes; made by the runner in C): EXITINFO2 carries the next RIP, as theirs does --
                # VMRUN of an SEV-ES guest shows the hypervisor the exit code only (Core.vmrun).
                ex = VmExit(ExitCode.VMGEXIT, 0, rip + guest[1])
                self._ports.remember(rip, code, long_mode, ex)
                cpu.vmcb.next_rip = ex.info2
                return ex
            self._ports.unhook_address(rip)  # VMMCALL, other guests: Unicorn's intercept path
            return None
        out = self._ports.port_io(cpu, rip, code, long_mode, vals[3] & 0xFFFF)
        if out is None:
            self.stats.spurious_stops += 1
            return None
        if isinstance(out, insn.Fault):  # #VC of an SEV-ES guest, #GP: the guest's handler runs next
            exits.deliver(self, out, rip)
            return None
        if not isinstance(out, insn.Exit):  # pragma: no cover - port I/O always exits
            raise Crash(f"engine error: port I/O at RIP {rip:#x} did not exit")
        self.stats.io_exits += 1
        cpu.vmcb.next_rip = out.exit.info2
        return out.exit

    # ---- hooks (called by Unicorn; never let an exception escape) ---------------------------------
    def _on_intr(self, h: Any, intno: int, user: Any) -> None:
        self._event = intno
        self._lib.uc_emu_stop(self._h)

    def _on_invalid(self, h: Any, user: Any) -> bool:
        """An instruction QEMU does not know (#UD in its translator): an SNP guest's PVALIDATE is
        retired here without leaving Unicorn where it can be (:func:`exits.pvalidate_in_place`);
        False: Unicorn stops with UC_ERR_INSN_INVALID, and the exit path handles it precisely.

        Nothing here stops Unicorn mid-instruction: the hook runs between translated blocks (QEMU's
        exception path, the instruction not started), and the RIP written by :meth:`retire` makes
        Unicorn leave its execution loop at the next block start and go on at that RIP (``uc_reg_write``'s
        quit request: no stop, no restart of ``uc_emu_start``)."""
        cpu = self._cpu
        if cpu is None or cpu.rmp is None or self._booting:
            return False
        try:
            if self._lib.uc_reg_read_batch(self._h, self._ids, self._ptrs, len(SYNC_IDS)):
                return False
            return exits.pvalidate_in_place(self, cpu, self._walker or cpu.core.mmu,
                                            self._arm_pvalidate if self._pv is not None else None)
        except Exception as exc:  # noqa: BLE001 - an engine or model bug: the guest dies, the host lives
            self._internal = f"{type(exc).__name__}: {exc}"
            return False  # (Unicorn stops with UC_ERR_INSN_INVALID, before the instruction: no uc_emu_stop)

    def _arm_pvalidate(self, code: bytes, paging: bool, length: int) -> None:
        """:func:`exits.pvalidate_in_place` retired a 4 KiB validate of ``code`` with the caching walker:
        the C hook retires the next ones of the same bytes in the same mode itself (until the next VMRUN)."""
        cpu, walker, pv = self._cpu, self._walker, self._pv
        rmp = cpu.rmp if cpu is not None else None
        if pv is None or cpu is None or walker is None or rmp is None or cpu.vmpl:
            return
        cache, pages, first = rmp.validate_state()
        pv.arm(code, paging, length, self, cpu, rmp, cpu.core.tlb.rmp_epoch, cpu.asid, cpu.sev, cpu.vmcb.ncr3,
               walker, cache, pages, first, self.pool, self.stats)
        self._pv_armed = True

    def _on_in(self, h: Any, port: int, size: int, user: Any) -> int:
        self._imprecise_io = (f"IN from port {port:#x} was not intercepted precisely (code written at run "
                              "time is not scanned for port I/O)")
        self._lib.uc_emu_stop(self._h)
        return 0xFFFFFFFF

    def _on_out(self, h: Any, port: int, size: int, value: int, user: Any) -> None:
        self._imprecise_io = (f"OUT to port {port:#x} was not intercepted precisely (code written at run "
                              "time is not scanned for port I/O)")
        self._lib.uc_emu_stop(self._h)

    def _on_fill(self, h: Any, vaddr: int, access: int, entry: int, user: Any) -> bool:
        try:
            return self._fill(vaddr, access, entry)
        except (PageFault, NestedPageFault, VmmCommunication) as f:
            self._pending = f
            return False
        except Exception as exc:  # noqa: BLE001 - an engine or model bug: the guest dies, the host lives
            self._internal = f"{type(exc).__name__}: {exc}"
            self._lib.uc_emu_stop(self._h)
            return False

    def _fill(self, vaddr: int, access: int, entry: int) -> bool:
        if self._booting:
            ctypes.c_uint64.from_address(entry).value = STUB_PA
            ctypes.c_int.from_address(entry + 8).value = uc.UC_PROT_READ | uc.UC_PROT_EXEC
            return True
        cpu = self._cpu
        if cpu is None:
            return False
        self.stats.tlb_fills += 1
        write = access == uc.UC_MEM_WRITE
        fetch = access == uc.UC_MEM_FETCH
        regs = self._fill_regs
        check(self._lib.uc_reg_read_batch(self._h, self._fill_ids, self._fill_ptrs, 2), "register read")
        cr0 = regs[0]
        paging = bool(cr0 & CR0_PG)
        cr3 = regs[1] if paging else 0
        if paging:
            if (vaddr >> 47) not in (0, (1 << 17) - 1):  # non-canonical: #GP, never a walk
                self._pending = None
                return False
        elif vaddr >> 32:
            return False
        page = vaddr & ~0xFFF
        pool = self.pool
        # (The walk reads page-table lines through the cache, which snoops the pool: a table page
        # the guest modified is written back before the walker reads it.)
        if cr0 != self._fill_cr0 or cr3 != self._fill_cr3:
            # The guest switched page tables or paging since the last fill, so Unicorn dropped its
            # translations (and with them every write permission): write back, forget the grants.
            # Only what flushes QEMU's TLB counts: a CR3 write, or CR0.PG/WP/PE changing -- not
            # CR0.CD (firmware toggles it around its MTRR programming), after which Unicorn still
            # holds the write permissions, and their pages must still be written back at exits.
            if self._fill_cr0 < 0 or cr3 != self._fill_cr3 or (cr0 ^ self._fill_cr0) & _CR0_TLB_BITS:
                pool.sync_all()
                self._forget_grants()
            self._fill_cr0, self._fill_cr3 = cr0, cr3
        mmu = cpu.core.mmu
        if self.nested_cache:
            if self._walker is None or self._walker.cache is not mmu.cache:
                self._walker = NestedCachingMmu(mmu.cache, cpu.core.profile)
                self._walker.table_writable = pool.spa_writable
            mmu = self._walker
        if fetch and self.fetch_observer is not None:
            self.fetch_observer(vaddr, cr0, self._efer, self._reg_read(uc.REG["rsp"]))
        t = mmu.translate(asid=cpu.asid, sev=cpu.sev, ncr3=cpu.vmcb.ncr3, paging=paging, cr3=cr3,
                           gva=vaddr, write=write, fetch=fetch, rmp=cpu.rmp, vmpl=cpu.vmpl, wp=bool(cr0 & _CR0_WP))
        if pool.stale:
            self.refresh()  # the walk set A/D bits in a page the guest has mapped
        same = t.data_asid == t.fetch_asid and t.data_c == t.fetch_c
        if fetch:
            key = tag_key(t.fetch_asid, t.fetch_c, t.spa)
            perms = uc.UC_PROT_EXEC | (uc.UC_PROT_READ if same else 0)
        else:
            key = tag_key(t.data_asid, t.data_c, t.spa)
            # no execute from a data fill: only pages actually fetched are scanned and hooked for
            # port I/O (firmware reads megabytes it never executes)
            perms = uc.UC_PROT_READ
        if not fetch and t.writable and (write or self._w_gvas.get(page) == cr3):
            # W^X in Unicorn's TLB: a writable page is not executable until its next fetch fill,
            # which rescans it for port I/O (code the guest writes, e.g. firmware it decompresses)
            perms = (perms | uc.UC_PROT_WRITE) & ~uc.UC_PROT_EXEC
        slot = pool.slot_of.get(key)
        if slot is None:
            slot = pool.load(key)
        if perms & uc.UC_PROT_WRITE:
            if self._walker is not None:
                self._walker.table_written(t.spa)  # (a page table the cached translations used)
            pool.writable.add(slot)
            self._w_gvas[page] = cr3
            assert self._ports is not None
            self._ports.slot_writable(slot)
        if perms & uc.UC_PROT_EXEC:
            assert self._ports is not None
            self._ports.exec_page(page, slot)
        ctypes.c_uint64.from_address(entry).value = POOL_PA + slot * PAGE
        ctypes.c_int.from_address(entry + 8).value = perms
        return True

    # ---- inspection --------------------------------------------------------------------------------
    def resident_pages(self) -> list[tuple[int, bool, int]]:
        """(asid, c, spa) of every page held in the pool (plaintext inside the SoC)."""
        return self.pool.resident_pages()
