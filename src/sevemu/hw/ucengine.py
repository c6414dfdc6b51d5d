"""A real x86-64 instruction engine for the vCPU: Unicorn (QEMU's TCG) behind :class:`~sevemu.hw.cpu.Engine`.

Guests are real machine code (built from C by :mod:`sevemu.guest.build`).  Unicorn translates it to
host code; the engine keeps it inside the SoC model's memory semantics without calling back into
Python on every access.  The design, in short (``docs/cpu-engine.md`` has the long version):

* **Unicorn runs as an SVM guest.**  At the first VMRUN the engine executes a real ``VMRUN``
  inside Unicorn, with a private VMCB whose intercepts are HLT, CPUID, MSR, VMMCALL, WBINVD; QEMU's
  SVM emulation then turns each of those instructions into a *precise* #VMEXIT (the instruction
  not executed, RIP on it), which reaches the engine as an interrupt hook.  Port I/O is not
  intercepted by Unicorn, so the engine makes every IN/OUT stop precisely another way: when a code
  page is mapped executable, every place an IN/OUT instruction could start gets an address-bound
  code hook, which Unicorn calls *before* the instruction and then leaves the block.  Exceptions
  (#UD, #GP, #PF...) are never delivered to a guest IDT: the engine's guests have none, so each one
  is a triple fault (#VMEXIT(SHUTDOWN)).
* **Paging is the model's.**  Unicorn's virtual TLB asks the engine for every translation it
  misses; the engine walks the guest's page tables and the hypervisor's NPT with
  :meth:`~sevemu.hw.mmu.Mmu.translate` (C-bit, nested walk, A/D bits, #PF, #NPF) and answers with a
  *slot*: a 4 KiB plaintext page of the engine's own page pool, filled from the shared cache in the
  access's encryption domain -- the fetch domain (always private for SEV) for instruction fetches,
  the data domain (the guest PTE's C-bit) for data.  A page whose two domains differ (a shared page
  that is also executed) gets two slots, mapped one role at a time.
* **The pool is a private cache level** (a :class:`~sevemu.hw.cache.CacheAgent`): it holds
  plaintext inside the SoC only; modified slots are written back into the shared cache (lines
  marked dirty, so they are encrypted on their way to DRAM) on every #VMEXIT, before any page-table
  walk, and on eviction; the cache snoops it, so a host write, a flush or another vCPU's write-back
  refreshes the copy before the guest runs again.  DRAM never holds guest plaintext, and the
  hypervisor sees ciphertext wherever it looks.
* A watchdog thread ends a time slice with #VMEXIT(INTR), so a runaway guest never hangs the host.

The register state the hypervisor sees for a plain (non-ES) SEV guest -- GPRs, RIP, RFLAGS, CR0,
CR3, CR4, EFER -- is synchronised into the :class:`~sevemu.hw.svm.Vmcb` on every exit and read back
(only what changed) on every entry.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import mmap
import os
import re
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sevemu.abi.paging import ExitCode
from sevemu.errors import HardwareError, InputError
from sevemu.hw.cache import SPA_MASK, Cache, key_domain, tag_key
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import NestedPageFault, PageFault
from sevemu.hw.svm import GPRS, Vmcb, VmExit

__all__ = ["SEV_STATUS_MSR", "BareRunner", "InitialState", "UcEngine", "UcStats", "unicorn_version"]

PAGE: Final = 4096
SEV_STATUS_MSR: Final = 0xC0010131
_EFER_MSR: Final = 0xC0000080

# ---- architectural bits -------------------------------------------------------------------------
CR0_PE: Final = 1 << 0
CR0_ET: Final = 1 << 4
CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5
EFER_SCE: Final = 1 << 0
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10
EFER_NXE: Final = 1 << 11
EFER_SVME: Final = 1 << 12
_EFER_WRITABLE: Final = EFER_SCE | EFER_LME | EFER_NXE | EFER_SVME | (1 << 14) | (1 << 15)
RFLAGS_FIXED: Final = 1 << 1

# ---- Unicorn constants (unicorn.h / x86.h; the Python constant modules agree) ----------------------
_UC_ARCH_X86: Final = 4
_UC_MODE_64: Final = 8
_UC_ERR_OK: Final = 0
_UC_ERR_INSN_INVALID: Final = 10
_UC_ERR_EXCEPTION: Final = 21
_UC_HOOK_INTR: Final = 1
_UC_HOOK_INSN: Final = 2
_UC_HOOK_CODE: Final = 4
_UC_HOOK_TLB_FILL: Final = 1 << 17
_UC_MEM_WRITE: Final = 17
_UC_MEM_FETCH: Final = 18
_UC_PROT_READ: Final = 1
_UC_PROT_WRITE: Final = 2
_UC_PROT_EXEC: Final = 4
_UC_PROT_ALL: Final = 7
_UC_TLB_VIRTUAL: Final = 1
_UC_CTL_UC_USE_EXITS: Final = 4
_UC_CTL_UC_EXITS: Final = 6
_UC_CTL_CPU_MODEL: Final = 7
_UC_CTL_TB_FLUSH: Final = 10
_UC_CTL_TLB_FLUSH: Final = 11
_UC_CTL_TLB_TYPE: Final = 12
_UC_CTL_TCG_BUFFER_SIZE: Final = 13
_UC_CPU_X86_EPYC_ROME: Final = 37
_UC_X86_INS_IN: Final = 218
_UC_X86_INS_OUT: Final = 500
_R = {"rax": 35, "rbx": 37, "rcx": 38, "rdx": 40, "rsi": 43, "rdi": 39, "rbp": 36, "rsp": 44,
      "r8": 106, "r9": 107, "r10": 108, "r11": 109, "r12": 110, "r13": 111, "r14": 112, "r15": 113}
_REG_RIP: Final = 41
_REG_RFLAGS: Final = 253
_REG_CR0: Final = 50
_REG_CR3: Final = 53
_REG_CR4: Final = 54
_REG_MSR: Final = 248
# batch order: the 16 GPRs in Vmcb order, then RIP, RFLAGS, CR0, CR3, CR4
_SYNC_IDS: Final = [_R[n] for n in GPRS] + [_REG_RIP, _REG_RFLAGS, _REG_CR0, _REG_CR3, _REG_CR4]
_I_RIP, _I_RFLAGS, _I_CR0, _I_CR3, _I_CR4 = 16, 17, 18, 19, 20


def _ctl(op: int, nargs: int, ctl: int) -> int:
    """UC_CTL_WRITE/READ encoding (unicorn.h): I/O direction in bits 31:30, argument count in 29:26."""
    return (op << 30) | (nargs << 26) | ctl


# ---- SVM: the private VMCB Unicorn runs its guest from (APM Vol. 2 Appendix B) ---------------------
_STUB_PA: Final = 0x1000
_VMCB_PA: Final = 0x2000
_HSAVE_PA: Final = 0x3000
_IOPM_PA: Final = 0x4000  # 12 KiB
_MSRPM_PA: Final = 0x8000  # 8 KiB
_SVM_AREA_END: Final = 0xA000
_POOL_PA: Final = 1 << 32
_VMRUN: Final = b"\x0f\x01\xd8"

# intercept vector bits (bit n = exit code 0x60 + n) -- what Unicorn must stop on precisely
_EXIT_CPUID: Final = 0x72
_EXIT_HLT: Final = 0x78
_EXIT_MSR: Final = 0x7C
_EXIT_VMRUN: Final = 0x80
_EXIT_VMMCALL: Final = 0x81
_EXIT_WBINVD: Final = 0x89
# SVM instructions a guest of a non-nesting hypervisor may not run (KVM injects #UD for them):
# INVD, INVLPGA, VMLOAD, VMSAVE, STGI, CLGI, SKINIT.  Intercepting them also keeps VMLOAD/VMSAVE
# from touching the engine's own physical memory through Unicorn.
_UD_INTERCEPTS: Final = {0x76: "INVD", 0x7A: "INVLPGA", 0x82: "VMLOAD", 0x83: "VMSAVE", 0x84: "STGI",
                         0x85: "CLGI", 0x86: "SKINIT"}
_INTERCEPTS: Final = sum(1 << (c - 0x60) for c in (_EXIT_CPUID, _EXIT_HLT, _EXIT_MSR, _EXIT_VMRUN,
                                                     _EXIT_VMMCALL, _EXIT_WBINVD, *_UD_INTERCEPTS))
_VMEXIT_BASE: Final = 0x100  # QEMU's EXCP_VMEXIT: an intercept arrives as "interrupt" 0x100 + code

# MSRs the CPU keeps in the VMCB save area: executed by Unicorn itself, never intercepted.  EFER is
# intercepted and kept by the engine (it hides EFER.SVME, which Unicorn needs for VMMCALL); since
# Unicorn applies the intercept check to the engine's own MSR writes too, the engine clears the
# EFER bits of the permission map around its own write (QEMU reads the map from memory each time).
_PASSTHROUGH_MSRS: Final = (0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
                            0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103)

# segment attributes in VMCB form: descriptor bits 47:40 in 7:0, bits 55:52 in 11:8
_CS64: Final = 0xA9B
_CS32: Final = 0xC9B
_DATA: Final = 0xC93

# ---- instruction decoding (only what the exits need) ------------------------------------------------
_LEGACY_PREFIXES: Final = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3")
_REX: Final = frozenset(range(0x40, 0x50))
_IO_OPCODES: Final = frozenset(range(0xE4, 0xE8)) | frozenset(range(0xEC, 0xF0)) | frozenset(range(0x6C, 0x70))
_IO_BYTE = re.compile(rb"[\x6c-\x6f\xe4-\xe7\xec-\xef]")
_SCAN_PREFIXES: Final = _LEGACY_PREFIXES | _REX

_EXCEPTIONS: Final = {0: "#DE (divide error)", 1: "#DB (debug)", 2: "NMI", 3: "#BP (breakpoint)",
                      4: "#OF (overflow)", 5: "#BR (bound range)", 6: "#UD (invalid opcode)",
                      7: "#NM (device not available)", 8: "#DF (double fault)", 10: "#TS (invalid TSS)",
                      11: "#NP (segment not present)", 12: "#SS (stack fault)",
                      13: "#GP (general protection)", 14: "#PF (page fault)", 16: "#MF (x87 error)",
                      17: "#AC (alignment check)", 18: "#MC (machine check)", 19: "#XM (SIMD error)"}


# ---- the library -------------------------------------------------------------------------------------
_LIB: ctypes.CDLL | None = None
_LIB_LOCK = threading.Lock()
_u64 = ctypes.c_uint64


def _load_library() -> ctypes.CDLL:
    """libunicorn with the prototypes this engine uses (loaded once; the same handle the binding uses)."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is not None:
            return _LIB
        try:
            import unicorn
        except ImportError as exc:  # pragma: no cover - unicorn is a declared dependency
            raise HardwareError("the Unicorn engine needs the 'unicorn' package (pip install unicorn)") from exc
        libdir = Path(unicorn.__file__).parent / "lib"
        candidates = sorted(libdir.glob("libunicorn.so*")) + sorted(libdir.glob("libunicorn*.dylib")) + \
            sorted(libdir.glob("unicorn.dll"))
        if not candidates:  # pragma: no cover
            raise HardwareError(f"no Unicorn shared library under {libdir}")
        lib = ctypes.CDLL(str(candidates[0]))
        eng = ctypes.c_void_p
        for name, res, args in (
            ("uc_open", ctypes.c_int, [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(eng)]),
            ("uc_close", ctypes.c_int, [eng]),
            ("uc_emu_start", ctypes.c_int, [eng, _u64, _u64, _u64, ctypes.c_size_t]),
            ("uc_emu_stop", ctypes.c_int, [eng]),
            ("uc_mem_map", ctypes.c_int, [eng, _u64, ctypes.c_size_t, ctypes.c_uint32]),
            ("uc_mem_map_ptr", ctypes.c_int, [eng, _u64, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_void_p]),
            ("uc_mem_write", ctypes.c_int, [eng, _u64, ctypes.c_void_p, ctypes.c_size_t]),
            ("uc_vmem_read", ctypes.c_int, [eng, _u64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
            ("uc_reg_read", ctypes.c_int, [eng, ctypes.c_int, ctypes.c_void_p]),
            ("uc_reg_write", ctypes.c_int, [eng, ctypes.c_int, ctypes.c_void_p]),
            ("uc_reg_read_batch", ctypes.c_int, [eng, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
            ("uc_hook_add", ctypes.c_int, [eng, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_void_p, _u64, _u64]),
            ("uc_hook_del", ctypes.c_int, [eng, ctypes.c_size_t]),
            ("uc_strerror", ctypes.c_char_p, [ctypes.c_int]),
            ("uc_version", ctypes.c_uint, [ctypes.c_void_p, ctypes.c_void_p]),
        ):
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        # uc_ctl is variadic: callers pass fully typed ctypes arguments
        lib.uc_ctl.restype = ctypes.c_int
        _LIB = lib
        return lib


def unicorn_version() -> str:
    """Version of the Unicorn library in use (``major.minor.patch``)."""
    v = int(_load_library().uc_version(None, None))
    return f"{v >> 24}.{(v >> 16) & 0xFF}.{(v >> 8) & 0xFF}"


def _hook_insn(h: ctypes.c_void_p, handle: ctypes.c_size_t, cb: Any, insn: int) -> None:
    """uc_hook_add for UC_HOOK_INSN, whose instruction id is a variadic argument."""
    fn = _load_library()["uc_hook_add"]  # a fresh function object: no fixed prototype
    fn.restype = ctypes.c_int
    _check(fn(h, ctypes.byref(handle), ctypes.c_int(_UC_HOOK_INSN), ctypes.cast(cb, ctypes.c_void_p),
              ctypes.c_void_p(None), ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn)),
           "port I/O hook")


def _check(err: int, what: str) -> None:
    if err != _UC_ERR_OK:
        msg = _load_library().uc_strerror(err)
        raise HardwareError(f"Unicorn {what} failed: {msg.decode() if msg else err}")


# callback types (uc_engine handle first, user data last)
_TLB_FILL_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_void_p)
_INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
_IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
_OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                           ctypes.c_void_p)


class _Msr(ctypes.Structure):
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


# ---- the initial state ---------------------------------------------------------------------------
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
        for name in GPRS:
            vmcb.regs[name] = 0
        vmcb.regs["rsp"] = self.rsp
        for name, value in self.regs:
            vmcb.regs[name] = value


def check_vmcb_state(vmcb: Vmcb) -> str | None:
    """Why the VMCB's save area cannot be run by this engine (None when it can)."""
    cr0, cr4, efer = vmcb.cr0, vmcb.cr4, vmcb.efer
    if vmcb.sev_es_enable:
        return "SEV-ES guests exit through the GHCB (VMGEXIT), which this engine does not implement"
    if not cr0 & CR0_PE:
        return f"CR0 {cr0:#x}: real mode is not supported, the guest must start in protected mode"
    if cr0 & CR0_PG:
        if not efer & EFER_LME or not cr4 & CR4_PAE:
            return f"CR0.PG needs long mode here (EFER.LME and CR4.PAE): CR0 {cr0:#x} CR4 {cr4:#x} EFER {efer:#x}"
        if not vmcb.cr3 or vmcb.cr3 & 0xFFF:
            return f"paging is on but CR3 {vmcb.cr3:#x} is not a page-aligned table address"
    elif efer & EFER_LMA:
        return f"EFER.LMA without CR0.PG (CR0 {cr0:#x}, EFER {efer:#x})"
    if efer & ~(_EFER_WRITABLE | EFER_LMA):
        return f"EFER {efer:#x} has reserved bits set"
    if not vmcb.rflags & RFLAGS_FIXED or vmcb.rflags >> 22:
        return f"RFLAGS {vmcb.rflags:#x}: bit 1 must be set and bits 63:22 clear"
    limit = 1 << 47 if cr0 & CR0_PG else 1 << 32
    if not 0 <= vmcb.rip < limit:
        return f"RIP {vmcb.rip:#x} is outside the {'long' if cr0 & CR0_PG else '32-bit'} mode address space"
    return None


# ---- statistics -----------------------------------------------------------------------------------
_EXIT_NAMES: Final = {int(c): c.name for c in ExitCode}


@dataclass
class UcStats:
    """What the engine did (cumulative)."""

    runs: int = 0
    exits: int = 0
    internal_exits: int = 0
    tlb_fills: int = 0
    slot_fills: int = 0
    slot_refreshes: int = 0
    evictions: int = 0
    lines_written_back: int = 0
    tlb_flushes: int = 0
    io_exits: int = 0
    spurious_stops: int = 0
    by_code: dict[int, int] = field(default_factory=dict)

    @property
    def by_reason(self) -> dict[str, int]:
        """Exits by name (NPF, IOIO, HLT, ...)."""
        return {_EXIT_NAMES.get(c, f"{c:#x}"): n for c, n in self.by_code.items()}


# ---- the watchdog -------------------------------------------------------------------------------------
class _Watchdog:
    """One daemon thread ending over-long time slices of every engine with Unicorn's emu_stop."""

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[UcEngine] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, engine: UcEngine) -> None:
        with self._lock:
            self._engines.add(engine)
            if self._thread is None or self._pid != os.getpid():  # none yet, or we are a forked child
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="sevemu-uc-watchdog", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(0.005)
            now = time.monotonic()
            with self._lock:
                engines = list(self._engines)
            for e in engines:
                start = e._run_started
                if start and now - start > e.slice_s:
                    e._timer_fired = True
                    lib = _LIB
                    if lib is not None and e._h.value:
                        lib.uc_emu_stop(e._h)


_WATCHDOG = _Watchdog()


# ---- decoding ----------------------------------------------------------------------------------------
def _skip_prefixes(code: bytes, long_mode: bool) -> int:
    i = 0
    while i < len(code) and i < 14 and code[i] in _LEGACY_PREFIXES:
        i += 1
    if long_mode and i < len(code) and code[i] in _REX:
        i += 1
    return i


def scan_io_candidates(page: bytes) -> tuple[tuple[int, int], ...]:
    """Offset ranges ``(first, last)`` of a code page where an IN/OUT/INS/OUTS could start.

    One range per I/O opcode byte: the byte itself and the run of prefix bytes right before it.
    An instruction that starts anywhere in such a range *is* that I/O instruction; bytes that are
    not instruction starts are harmless, since a code hook fires only on instructions executed.
    """
    out = []
    for m in _IO_BYTE.finditer(page):
        i = m.start()
        j = i
        while j > 0 and i - j < 14 and page[j - 1] in _SCAN_PREFIXES:
            j -= 1
        out.append((j, i))
    return tuple(out)


@dataclass(frozen=True)
class _PortIo:
    port: int
    size: int
    is_in: bool
    string: bool
    rep: bool
    length: int


def _decode_io(code: bytes, long_mode: bool, rdx: int) -> _PortIo | None:
    i = _skip_prefixes(code, long_mode)
    if i >= len(code) or code[i] not in _IO_OPCODES:
        return None
    prefixes = code[:i]
    op = code[i]
    size = 1 if op in (0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E) else (2 if 0x66 in prefixes else 4)
    is_in = op in (0xE4, 0xE5, 0xEC, 0xED, 0x6C, 0x6D)
    if op in (0xE4, 0xE5, 0xE6, 0xE7):
        if i + 1 >= len(code):
            return None
        return _PortIo(code[i + 1], size, is_in, False, False, i + 2)
    string = op in (0x6C, 0x6D, 0x6E, 0x6F)
    return _PortIo(rdx & 0xFFFF, size, is_in, string, string and (0xF3 in prefixes or 0xF2 in prefixes), i + 1)


def _has_imm_port(code: bytes, long_mode: bool) -> bool:
    i = _skip_prefixes(code, long_mode)
    return i < len(code) and code[i] in (0xE4, 0xE5, 0xE6, 0xE7)


def _ioio_info1(io: _PortIo, long_mode: bool) -> int:
    """SVM IOIO EXITINFO1 (APM 15.10.2): TYPE, STR, REP, SZ8/16/32, A16/32/64, port in 31:16."""
    sz = {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}[io.size]
    asz = 1 << 9 if long_mode else 1 << 8
    return (io.port << 16) | asz | sz | (8 if io.rep else 0) | (4 if io.string else 0) | int(io.is_in)


# ---- the engine ----------------------------------------------------------------------------------------
class _Crash(Exception):
    """Internal: the guest is dead (triple fault); carries the reason."""




class UcEngine:
    """Runs real x86 guest code on a vCPU (see the module docstring).

    ``pool_pages`` bounds the plaintext page pool (slots beyond it are evicted, written back);
    ``slice_s`` is the time slice after which the watchdog ends a VMRUN with #VMEXIT(INTR).
    ``initial`` is validated at once (a bad state is an error before anything runs); the launcher
    writes it into the VMCB with :meth:`InitialState.apply`.  After a triple fault :attr:`crash`
    holds the reason and :attr:`crash_rip` the guest RIP.
    """

    def __init__(self, *, pool_pages: int = 4096, slice_s: float = 0.2, initial: InitialState | None = None,
                 name: str = "") -> None:
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
        self._lib = _load_library()
        self._h = ctypes.c_void_p(0)
        self._booted = False
        self._booting = False
        self._closed = False
        self._keep: list[Any] = []
        self._cpu: GuestCpu | None = None
        self._cache: Cache | None = None
        self._tlb_token: object = None
        # registers
        n = len(_SYNC_IDS)
        self._vals = array.array("Q", bytes(8 * n))  # Unicorn writes the batch straight into it
        base = self._vals.buffer_info()[0]
        self._ptrs = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self._regs_obj: dict[str, int] | None = None  # the VMCB's register dict, order checked
        self._ids = (ctypes.c_int * n)(*_SYNC_IDS)
        self._shadow_gprs: list[int] = []  # the GPRs as last exchanged with the VMCB
        self._shadow_ctl: tuple[int, ...] = ()  # RFLAGS, CR0, CR3, CR4, EFER likewise
        self._scratch = ctypes.c_uint64()
        self._scratch_ref = ctypes.byref(self._scratch)
        self._efer = 0  # the guest's EFER (LMA follows CR0.PG); Unicorn's copy has SVME too
        # stop reasons
        self._event: int | None = None
        self._io_size = 0
        self._pending: PageFault | NestedPageFault | None = None
        self._internal: str | None = None
        self._imprecise_io: str | None = None
        self._timer_fired = False
        self._run_started = 0.0
        self._evict_requested = False
        # the page pool (slots) and what maps them
        self._mm: mmap.mmap | None = None
        self._slot_of: dict[int, int] = {}  # cache key of the page -> slot
        self._slot_key: dict[int, int] = {}  # slot -> cache key of the page
        self._by_spa: dict[int, set[int]] = {}  # page SPA -> slots (every domain)
        self._snap: dict[int, bytes] = {}  # slot -> contents as last written back / filled
        self._free: list[int] = []
        self._order: deque[int] = deque()  # fill order (eviction is FIFO)
        self._wslots: set[int] = set()  # slots Unicorn may have written (write permission granted)
        self._stale: set[int] = set()  # slots someone else changed: refresh before the guest runs
        self._xslots: set[int] = set()  # slots mapped executable
        self._xgva: dict[int, int] = {}  # executable GVA page -> slot
        self._w_gvas: dict[int, int] = {}  # GVA page -> CR3 it was written under (D bit set)
        self._scans: dict[int, tuple[tuple[int, int], ...]] = {}  # slot -> IN/OUT candidate ranges
        self._io_ranges: dict[int, tuple[tuple[int, int], ...]] = {}  # GVA page -> ranges hooked
        self._io_hooks: dict[int, list[int]] = {}  # GVA page -> code-hook handles
        self._io_offsets: dict[int, set[int]] = {}  # GVA page -> offsets the hooks cover
        self._code_cb: Any = None
        self._fill_cr0 = -1
        self._fill_cr3 = -1
        self._io_exits: dict[int, tuple[bytes, bool, int, VmExit]] = {}  # RIP -> decoded exit
        self._clean_syncs = 0

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the Unicorn instance and the page pool (the engine cannot run afterwards)."""
        if self._closed:
            return
        self._closed = True
        if self._cache is not None:
            self._cache.detach(self)
        h, self._h = self._h, ctypes.c_void_p(0)
        if h.value:
            self._lib.uc_close(h)
        self._keep.clear()
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- Engine protocol ------------------------------------------------------------------------
    def run(self, cpu: GuestCpu) -> VmExit:
        """VMRUN: execute guest code on ``cpu`` until an intercepted event (see the module docstring)."""
        if self.crash is not None:
            return VmExit(ExitCode.SHUTDOWN)
        if self._closed:
            self.crash = "the engine was closed"
            return VmExit(ExitCode.SHUTDOWN)
        self.stats.runs += 1
        if not self._booted:
            reason = check_vmcb_state(cpu.vmcb)
            if reason is None:
                try:
                    self._boot(cpu)
                except HardwareError as exc:
                    reason = f"the engine could not start: {exc}"
            if reason is not None:
                self.crash = f"invalid initial state: {reason}"
                return VmExit(ExitCode.INVALID)
        try:
            self._enter(cpu)
            ex = self._execute(cpu)
        except NestedPageFault:
            self._leave(cpu.vmcb)
            self._count(ExitCode.NPF)
            raise
        except _Crash as c:
            self._leave(cpu.vmcb)
            self.crash = str(c)
            self.crash_rip = cpu.vmcb.rip
            self._count(ExitCode.SHUTDOWN)
            return VmExit(ExitCode.SHUTDOWN)
        self._leave(cpu.vmcb)
        stats = self.stats
        stats.exits += 1
        by = stats.by_code
        code = ex.code
        by[code] = by.get(code, 0) + 1
        return ex

    def _count(self, code: int) -> None:
        stats = self.stats
        stats.exits += 1
        by = stats.by_code
        by[code] = by.get(code, 0) + 1

    # ---- boot: open Unicorn, VMRUN into the guest --------------------------------------------
    def _boot(self, cpu: GuestCpu) -> None:
        lib = self._lib
        vmcb = cpu.vmcb
        _check(lib.uc_open(_UC_ARCH_X86, _UC_MODE_64, ctypes.byref(self._h)), "uc_open")
        h = self._h
        _check(lib.uc_ctl(h, ctypes.c_int(_ctl(1, 1, _UC_CTL_CPU_MODEL)), ctypes.c_int(_UC_CPU_X86_EPYC_ROME)),
               "CPU model")
        _check(lib.uc_ctl(h, ctypes.c_int(_ctl(1, 1, _UC_CTL_TCG_BUFFER_SIZE)), ctypes.c_uint32(64 << 20)),
               "TCG buffer size")
        _check(lib.uc_ctl(h, ctypes.c_int(_ctl(1, 1, _UC_CTL_TLB_TYPE)), ctypes.c_int(_UC_TLB_VIRTUAL)),
               "virtual TLB")
        _check(lib.uc_mem_map(h, _STUB_PA, _SVM_AREA_END - _STUB_PA, _UC_PROT_ALL), "mapping the SVM area")
        size = self.pool_pages * PAGE
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self._keep.append(anchor)
        _check(lib.uc_mem_map_ptr(h, _POOL_PA, size, _UC_PROT_ALL, ctypes.addressof(anchor)), "mapping the page pool")
        self._free = list(range(self.pool_pages - 1, -1, -1))
        # hooks
        fill = _TLB_FILL_CB(self._on_fill)
        intr = _INTR_CB(self._on_intr)
        hin = _IN_CB(self._on_in)
        hout = _OUT_CB(self._on_out)
        self._keep += [fill, intr, hin, hout]
        # The port-I/O code hooks call uc_emu_stop itself (its one argument is the hook's first):
        # no Python on the way; a stop without another reason at a hooked address is the I/O exit.
        self._code_cb = ctypes.cast(lib.uc_emu_stop, ctypes.c_void_p)
        hh = ctypes.c_size_t()
        _check(lib.uc_hook_add(h, ctypes.byref(hh), _UC_HOOK_TLB_FILL, ctypes.cast(fill, ctypes.c_void_p),
                               None, 1, 0), "TLB-fill hook")
        _check(lib.uc_hook_add(h, ctypes.byref(hh), _UC_HOOK_INTR, ctypes.cast(intr, ctypes.c_void_p),
                               None, 1, 0), "interrupt hook")
        for cb, insn in ((hin, _UC_X86_INS_IN), (hout, _UC_X86_INS_OUT)):
            _hook_insn(h, hh, cb, insn)
        # the private VMCB, permission maps, VMRUN stub
        self._write_phys(_IOPM_PA, b"\xff" * 0x3000)
        msrpm = bytearray(b"\xff" * 0x2000)
        for msr in _PASSTHROUGH_MSRS:
            off, shift = _msrpm_bit(msr)
            msrpm[off] &= ~(3 << shift)
        self._write_phys(_MSRPM_PA, bytes(msrpm))
        self._write_phys(_VMCB_PA, self._initial_vmcb(vmcb))
        self._write_phys(_STUB_PA, _VMRUN + b"\xf4")
        self._efer = vmcb.efer & ~EFER_LMA
        self._raw_msr_write(_EFER_MSR, EFER_LME | EFER_LMA | EFER_SVME)
        self._raw_msr_write(0xC0010117, _HSAVE_PA)  # VM_HSAVE_PA
        self._reg_write(_REG_CR4, CR4_PAE)
        self._reg_write(_REG_CR0, CR0_PE | CR0_ET | CR0_PG)
        self._reg_write(_R["rax"], _VMCB_PA)
        # Run the stub: VMRUN, then stop at the guest's first instruction (an exit address there).
        _check(lib.uc_ctl(h, ctypes.c_int(_ctl(1, 1, _UC_CTL_UC_USE_EXITS)), ctypes.c_int(1)), "exits")
        stub_va = 0x1000 if (vmcb.rip & ~0xFFF) != 0x1000 else 0x2000
        self._set_exits([vmcb.rip])
        self._booting = True
        self._event = None
        try:
            err = lib.uc_emu_start(h, stub_va, 0, 0, 0)
        finally:
            self._booting = False
        if err != _UC_ERR_OK or self._event != _VMEXIT_BASE + _EXIT_HLT:
            raise HardwareError(f"VMRUN into the guest failed (error {err}, event {self._event})")
        self._set_exits([])  # exits stay enabled, with none: Unicorn then never stops on an address
        self._flush_tlb_all()
        cache = cpu.core.cache
        cache.attach(self)
        self._cache = cache
        self._booted = True
        _WATCHDOG.watch(self)

    @staticmethod
    def _initial_vmcb(vmcb: Vmcb) -> bytes:
        b = bytearray(PAGE)

        def q(off: int, v: int) -> None:
            b[off : off + 8] = v.to_bytes(8, "little")

        def seg(off: int, sel: int, attrib: int) -> None:
            b[off : off + 2] = sel.to_bytes(2, "little")
            b[off + 2 : off + 4] = attrib.to_bytes(2, "little")
            b[off + 4 : off + 8] = (0xFFFFFFFF).to_bytes(4, "little")
            q(off + 8, 0)

        q(0x00C, _INTERCEPTS)  # intercept vectors 3 and 4 (QEMU reads them as one quadword)
        q(0x040, _IOPM_PA)
        q(0x048, _MSRPM_PA)
        long_mode = bool(vmcb.cr0 & CR0_PG)
        seg(0x410, 0x08, _CS64 if long_mode else _CS32)
        for off in (0x400, 0x420, 0x430, 0x440, 0x450):
            seg(off, 0x10, _DATA)
        q(0x4D0, vmcb.efer | EFER_SVME | (EFER_LMA if long_mode else 0))
        q(0x548, vmcb.cr4)
        q(0x550, vmcb.cr3)
        q(0x558, vmcb.cr0)
        q(0x570, vmcb.rflags)
        q(0x578, vmcb.rip)
        q(0x5D8, vmcb.regs["rsp"])
        q(0x5F8, vmcb.regs["rax"])
        return bytes(b)

    # ---- low-level helpers -----------------------------------------------------------------------
    def _write_phys(self, pa: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        _check(self._lib.uc_mem_write(self._h, pa, buf, len(data)), "uc_mem_write")

    def _reg_write(self, reg: int, value: int) -> None:
        self._scratch.value = value & 0xFFFFFFFFFFFFFFFF
        _check(self._lib.uc_reg_write(self._h, reg, self._scratch_ref), "register write")

    def _reg_read(self, reg: int) -> int:
        _check(self._lib.uc_reg_read(self._h, reg, self._scratch_ref), "register read")
        return int(self._scratch.value)

    def _raw_msr_write(self, msr: int, value: int) -> None:
        m = _Msr(msr, value)
        _check(self._lib.uc_reg_write(self._h, _REG_MSR, ctypes.byref(m)), f"MSR {msr:#x} write")

    def _set_efer(self, guest_efer: int, cr0: int) -> None:
        """Give Unicorn the guest's EFER (plus SVME), around the intercept of its own write."""
        self._efer = guest_efer & ~EFER_LMA
        off, shift = _msrpm_bit(_EFER_MSR)
        self._write_phys(_MSRPM_PA + off, bytes([0xFF & ~(3 << shift)]))
        try:
            lma = EFER_LMA if (self._efer & EFER_LME and cr0 & CR0_PG) else 0
            self._raw_msr_write(_EFER_MSR, self._efer | EFER_SVME | lma)
        finally:
            self._write_phys(_MSRPM_PA + off, b"\xff")

    def _guest_efer(self, cr0: int) -> int:
        return self._efer | (EFER_LMA if (self._efer & EFER_LME and cr0 & CR0_PG) else 0)

    def _set_exits(self, addrs: list[int]) -> None:
        arr = (ctypes.c_uint64 * max(len(addrs), 1))(*addrs)
        _check(self._lib.uc_ctl(self._h, ctypes.c_int(_ctl(1, 2, _UC_CTL_UC_EXITS)), arr,
                                ctypes.c_size_t(len(addrs))), "exit addresses")

    def _flush_tlb_all(self) -> None:
        """Drop every Unicorn translation (and translated block); written slots are synced first."""
        self._sync_all()
        _check(self._lib.uc_ctl(self._h, ctypes.c_int(_ctl(1, 0, _UC_CTL_TLB_FLUSH))), "TLB flush")
        self.stats.tlb_flushes += 1
        self._wslots.clear()
        self._w_gvas.clear()
        self._xgva.clear()
        self._fill_cr0 = self._fill_cr3 = -1

    def _flush_tb(self) -> None:
        _check(self._lib.uc_ctl(self._h, ctypes.c_int(_ctl(1, 0, _UC_CTL_TB_FLUSH))), "TB flush")

    def _read_code(self, rip: int, n: int = 16) -> bytes:
        """Up to ``n`` instruction bytes at ``rip``, from the slot the page was fetched from."""
        slot = self._xgva.get(rip & ~0xFFF)
        off = rip & 0xFFF
        if slot is not None and off + n <= PAGE and self._mm is not None:
            return self._mm[slot * PAGE + off : slot * PAGE + off + n]
        buf = ctypes.create_string_buffer(n)
        while n > 0:
            if self._lib.uc_vmem_read(self._h, rip, _UC_PROT_EXEC, buf, n) == _UC_ERR_OK:
                return buf.raw[:n]
            page_left = PAGE - off
            n = page_left if n > page_left else 0
        return b""

    # ---- entry and exit: registers, coherence --------------------------------------------------
    def _enter(self, cpu: GuestCpu) -> None:
        self._cpu = cpu
        core = cpu.core
        if (core.cache is not self._cache or core.tlb.by_asid.get(cpu.asid) is not self._tlb_token
                or self._stale or self._evict_requested):
            self._enter_maintenance(cpu)
        # registers the hypervisor changed since the last exit
        vmcb = cpu.vmcb
        regs = vmcb.regs
        if regs is self._regs_obj and len(regs) == 16:
            now = list(regs.values())  # in GPRS order (checked when the dict was first seen)
        else:
            now = [regs[n] for n in GPRS]
            self._regs_obj = regs if tuple(regs) == GPRS else None
        if now != self._shadow_gprs:
            shadow = self._shadow_gprs
            for i in range(16):
                if not shadow or now[i] != shadow[i]:
                    self._reg_write(_SYNC_IDS[i], now[i])
        ctl = (vmcb.rflags, vmcb.cr0, vmcb.cr3, vmcb.cr4, vmcb.efer)
        if ctl != self._shadow_ctl:
            self._sync_control(vmcb, ctl)

    def _enter_maintenance(self, cpu: GuestCpu) -> None:
        cache = cpu.core.cache
        if cache is not self._cache:
            if self._cache is not None:
                self._cache.detach(self)
            cache.attach(self)
            self._cache = cache
            self._drop_all()
        token = cpu.core.tlb.by_asid.get(cpu.asid)
        if token is not self._tlb_token:  # TLB_CONTROL flushed this ASID (or another core runs us)
            if self._tlb_token is not None:
                self._flush_tlb_all()
            self._tlb_token = token
        if self._stale:
            self._refresh_stale()
        if self._evict_requested:
            self._evict()

    def _sync_control(self, vmcb: Vmcb, ctl: tuple[int, int, int, int, int]) -> None:
        old = self._shadow_ctl
        rflags, cr0, cr3, cr4, efer = ctl
        if not old or rflags != old[0]:
            self._reg_write(_REG_RFLAGS, rflags | RFLAGS_FIXED)
        if not old or cr4 != old[3]:
            self._reg_write(_REG_CR4, cr4)
        if not old or cr3 != old[2]:
            self._reg_write(_REG_CR3, cr3)
        if not old or cr0 != old[1]:
            self._reg_write(_REG_CR0, cr0)
        if efer != self._guest_efer(cr0):
            self._set_efer(efer, cr0)
        self._shadow_ctl = ctl

    def _leave(self, vmcb: Vmcb) -> None:
        """#VMEXIT: write modified slots back into the SoC and the registers into the VMCB."""
        vals = self._vals.tolist()
        if self._wslots:
            if self._sync_all():
                self._clean_syncs = 0
            else:
                self._clean_syncs += 1
                if self._clean_syncs >= 256:
                    self._demote_writes(vals[_I_CR0], vals[_I_CR3])
        gprs = vals[:16]
        vmcb.regs.update(zip(GPRS, gprs))
        self._shadow_gprs = gprs
        vmcb.rip = vals[_I_RIP]
        vmcb.rflags = rflags = vals[_I_RFLAGS]
        vmcb.cr0 = cr0 = vals[_I_CR0]
        vmcb.cr3 = cr3 = vals[_I_CR3]
        vmcb.cr4 = cr4 = vals[_I_CR4]
        vmcb.efer = efer = self._efer | (EFER_LMA if (self._efer & EFER_LME and cr0 & CR0_PG) else 0)
        self._shadow_ctl = (rflags, cr0, cr3, cr4, efer)

    # ---- the run loop ----------------------------------------------------------------------------
    def _execute(self, cpu: GuestCpu) -> VmExit:
        lib = self._lib
        h = self._h
        vals = self._vals
        ids, ptrs = self._ids, self._ptrs
        io_offsets = self._io_offsets
        io_exits = self._io_exits
        monotonic = time.monotonic
        rip = cpu.vmcb.rip
        spurious = 0
        while True:
            self._event = None
            self._pending = None
            self._timer_fired = False
            self._run_started = monotonic()
            err = lib.uc_emu_start(h, rip, 0, 0, 0)
            self._run_started = 0.0
            if lib.uc_reg_read_batch(h, ids, ptrs, 21):
                raise _Crash("the engine could not read the guest's registers")
            rip = vals[16]
            if self._internal is not None:
                raise _Crash(f"engine error at RIP {rip:#x}: {self._internal}")
            if err:
                self._fault(err, rip)
            ev = self._event
            if ev is None:
                offs = io_offsets.get(rip & ~0xFFF)
                if offs is not None and (rip & 0xFFF) in offs:  # a port-I/O code hook stopped here
                    hit = io_exits.get(rip)
                    if hit is not None and hit[2] in (-1, vals[3] & 0xFFFF) and hit[1] == bool(vals[18] & CR0_PG) \
                            and hit[0] == self._read_code(rip, 16):
                        known: VmExit = hit[3]  # the same instruction as last time: its decoded exit
                        self.stats.io_exits += 1
                        cpu.vmcb.next_rip = known.info2
                        return known
                    io_exit = self._port_io(cpu, rip)
                    if io_exit is not None:
                        return io_exit
                    continue
                if self._imprecise_io is not None:
                    raise _Crash(self._imprecise_io)
                if self._timer_fired:
                    return VmExit(ExitCode.INTR)
                if self._evict_requested:
                    self._evict()
                    continue
                spurious += 1
                self.stats.spurious_stops += 1
                if spurious > 1000:
                    raise _Crash(f"emulation keeps stopping without a reason at RIP {rip:#x}")
                continue
            elif ev >= _VMEXIT_BASE:
                ex = self._intercept(cpu, ev - _VMEXIT_BASE, rip)
                if ex is not None:
                    return ex
                self.stats.internal_exits += 1
                rip = vals[_I_RIP]
            else:
                name = _EXCEPTIONS.get(ev, f"INT {ev:#x}")
                raise _Crash(f"{name} at RIP {rip:#x} with no IDT to deliver it: triple fault")

    def _fault(self, err: int, rip: int) -> None:
        pending, self._pending = self._pending, None
        if err == _UC_ERR_EXCEPTION and isinstance(pending, NestedPageFault):
            raise pending
        if err == _UC_ERR_EXCEPTION and isinstance(pending, PageFault):
            raise _Crash(f"#PF (page fault) at RIP {rip:#x}, address {pending.address:#x}, error code "
                         f"{pending.error_code:#x}, with no IDT to deliver it: triple fault")
        if err == _UC_ERR_EXCEPTION and pending is None:
            raise _Crash(f"#GP (general protection) at RIP {rip:#x}: non-canonical or inaccessible address, "
                         "with no IDT to deliver it: triple fault")
        if err == _UC_ERR_INSN_INVALID:
            raise _Crash(f"#UD (invalid opcode) at RIP {rip:#x} with no IDT to deliver it: triple fault")
        msg = self._lib.uc_strerror(err)
        raise _Crash(f"emulation failed at RIP {rip:#x}: {msg.decode() if msg else err}")

    def _intercept(self, cpu: GuestCpu, code: int, rip: int) -> VmExit | None:
        """An SVM intercept at ``rip``: the exit for the hypervisor, or None after handling it here."""
        vmcb = cpu.vmcb
        vals = self._vals
        long_mode = bool(vals[_I_CR0] & CR0_PG)
        insn = self._read_code(rip, 15)
        plen = _skip_prefixes(insn, long_mode)
        if code == _EXIT_HLT:
            vmcb.next_rip = rip + plen + 1
            return VmExit(ExitCode.HLT)
        if code == _EXIT_CPUID:
            vmcb.next_rip = rip + plen + 2
            return VmExit(ExitCode.CPUID)
        if code == _EXIT_VMMCALL:
            vmcb.next_rip = rip + plen + 3
            return VmExit(ExitCode.VMMCALL)
        if code == _EXIT_MSR:
            is_write = insn[plen : plen + 2] == b"\x0f\x30"
            msr = vals[2] & 0xFFFFFFFF
            nxt = rip + plen + 2
            if msr == SEV_STATUS_MSR:  # read-only, never intercepted on hardware (APM 15.34.10)
                if is_write:
                    raise _Crash(f"#GP (general protection) at RIP {rip:#x}: WRMSR to the read-only SEV_STATUS")
                self._set_edx_eax((1 if cpu.sev else 0) | (2 if vmcb.sev_es_enable else 0), nxt)
                return None
            if msr == _EFER_MSR:  # CPU state of the VMCB save area: kept here (SVME hidden)
                cr0 = vals[_I_CR0]
                if not is_write:
                    self._set_edx_eax(self._guest_efer(cr0), nxt)
                    return None
                value = ((vals[3] & 0xFFFFFFFF) << 32) | (vals[0] & 0xFFFFFFFF)
                if value & ~(_EFER_WRITABLE | EFER_LMA):
                    raise _Crash(f"#GP (general protection) at RIP {rip:#x}: EFER {value:#x} sets reserved bits")
                self._set_efer(value, cr0)
                vals[_I_RIP] = nxt
                return None
            vmcb.next_rip = nxt
            return VmExit(ExitCode.MSR, 1 if is_write else 0)
        if code == _EXIT_WBINVD:
            self._sync_all()
            cpu.core.wbinvd()
            if self._stale:
                self._refresh_stale()
            vals[_I_RIP] = rip + plen + 2
            return None
        if code in _UD_INTERCEPTS:
            raise _Crash(f"#UD (invalid opcode: {_UD_INTERCEPTS[code]} in a guest) at RIP {rip:#x} with no IDT "
                         "to deliver it: triple fault")
        vmcb.next_rip = 0
        return VmExit(code)

    def _set_edx_eax(self, value: int, next_rip: int) -> None:
        self._reg_write(_R["rax"], value & 0xFFFFFFFF)
        self._reg_write(_R["rdx"], (value >> 32) & 0xFFFFFFFF)
        self._vals[_I_RIP] = next_rip

    def _port_io(self, cpu: GuestCpu, rip: int) -> VmExit | None:
        """A code hook stopped the guest before an IN/OUT: the IOIO exit (None if it was not one)."""
        vals = self._vals
        long_mode = bool(vals[_I_CR0] & CR0_PG)
        code = self._read_code(rip, 16)
        dx = vals[3] & 0xFFFF
        hit = self._io_exits.get(rip)
        if hit is not None and hit[0] == code and hit[1] == long_mode and hit[2] in (-1, dx):
            ex = hit[3]
        else:
            io = _decode_io(code, long_mode, dx)
            if io is None:  # an instruction starting inside a range that is not I/O (legacy-mode REX)
                self.stats.spurious_stops += 1
                self._unhook_address(rip)
                return None
            if io.string:
                raise _Crash(f"string port I/O ({'INS' if io.is_in else 'OUTS'}) at RIP {rip:#x} is not "
                             "supported by this engine")
            ex = VmExit(ExitCode.IOIO, _ioio_info1(io, long_mode), rip + io.length)
            if len(self._io_exits) > 4096:
                self._io_exits.clear()
            self._io_exits[rip] = (code, long_mode, -1 if _has_imm_port(code, long_mode) else dx, ex)
        self.stats.io_exits += 1
        cpu.vmcb.next_rip = ex.info2
        return ex

    # ---- hooks (called by Unicorn; never let an exception escape) ---------------------------------
    def _on_intr(self, h: Any, intno: int, user: Any) -> None:
        self._event = intno
        self._lib.uc_emu_stop(self._h)

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
        except (PageFault, NestedPageFault) as f:
            self._pending = f
            return False
        except Exception as exc:  # noqa: BLE001 - an engine or model bug: the guest dies, the host lives
            self._internal = f"{type(exc).__name__}: {exc}"
            self._lib.uc_emu_stop(self._h)
            return False

    def _fill(self, vaddr: int, access: int, entry: int) -> bool:
        if self._booting:
            ctypes.c_uint64.from_address(entry).value = _STUB_PA
            ctypes.c_int.from_address(entry + 8).value = _UC_PROT_READ | _UC_PROT_EXEC
            return True
        cpu = self._cpu
        if cpu is None:
            return False
        self.stats.tlb_fills += 1
        write = access == _UC_MEM_WRITE
        fetch = access == _UC_MEM_FETCH
        cr0 = self._reg_read(_REG_CR0)
        paging = bool(cr0 & CR0_PG)
        cr3 = self._reg_read(_REG_CR3) if paging else 0
        if paging:
            if (vaddr >> 47) not in (0, (1 << 17) - 1):  # non-canonical: #GP, never a walk
                self._pending = None
                return False
        elif vaddr >> 32:
            return False
        page = vaddr & ~0xFFF
        # (The walk reads page-table lines through the cache, which snoops the pool: a table page
        # the guest modified is written back before the walker reads it.)
        if cr0 != self._fill_cr0 or cr3 != self._fill_cr3:
            # The guest switched page tables or paging since the last fill, so Unicorn dropped its
            # translations (and with them every write permission): write back, forget the grants.
            self._sync_all()
            self._wslots.clear()
            self._w_gvas.clear()
            self._xgva.clear()
            self._fill_cr0, self._fill_cr3 = cr0, cr3
        vmcb = cpu.vmcb
        t = cpu.core.mmu.translate(asid=cpu.asid, sev=cpu.sev, ncr3=vmcb.ncr3, paging=paging, cr3=cr3,
                                   gva=vaddr, write=write, fetch=fetch)
        if self._stale:
            self._refresh_stale()  # the walk set A/D bits in a page the guest has mapped
        same = t.data_asid == t.fetch_asid and t.data_c == t.fetch_c
        if fetch:
            key = tag_key(t.fetch_asid, t.fetch_c, t.spa)
            perms = _UC_PROT_EXEC | (_UC_PROT_READ if same else 0)
        else:
            key = tag_key(t.data_asid, t.data_c, t.spa)
            perms = _UC_PROT_READ | (_UC_PROT_EXEC if same and t.executable else 0)
        if (same or not fetch) and t.writable and (write or self._w_gvas.get(page) == cr3):
            perms |= _UC_PROT_WRITE
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._load(key)
        if perms & _UC_PROT_WRITE:
            self._wslots.add(slot)
            self._w_gvas[page] = cr3
        if perms & _UC_PROT_EXEC:
            self._exec_page(page, slot)
        ctypes.c_uint64.from_address(entry).value = _POOL_PA + slot * PAGE
        ctypes.c_int.from_address(entry + 8).value = perms
        return True

    # ---- port I/O hooks ---------------------------------------------------------------------------
    def _exec_page(self, page: int, slot: int) -> None:
        """``page`` (GVA) executes from ``slot``: hook every place an IN/OUT could start in it."""
        if self._xgva.get(page) == slot:
            return
        self._xgva[page] = slot
        self._xslots.add(slot)
        ranges = self._scans.get(slot)
        if ranges is None:
            assert self._mm is not None
            ranges = self._scans[slot] = scan_io_candidates(self._mm[slot * PAGE : (slot + 1) * PAGE])
        if self._io_ranges.get(page) != ranges:
            self._hook_page(page, ranges)

    def _hook_page(self, page: int, ranges: tuple[tuple[int, int], ...]) -> None:
        lib = self._lib
        for hh in self._io_hooks.pop(page, []):
            lib.uc_hook_del(self._h, hh)
        handles = []
        handle = ctypes.c_size_t()
        for first, last in ranges:
            _check(lib.uc_hook_add(self._h, ctypes.byref(handle), _UC_HOOK_CODE, self._code_cb, None,
                                   page + first, page + last), "port I/O code hook")
            handles.append(handle.value)
        self._io_hooks[page] = handles
        self._io_ranges[page] = ranges
        offsets = {o for first, last in ranges for o in range(first, last + 1)}
        if offsets:
            self._io_offsets[page] = offsets
        else:
            self._io_offsets.pop(page, None)

    def _unhook_address(self, rip: int) -> None:
        """A range hook fired on an instruction that is not I/O: drop that range and retranslate."""
        page = rip & ~0xFFF
        ranges = self._io_ranges.get(page, ())
        keep = tuple(r for r in ranges if not r[0] <= rip - page <= r[1])
        self._hook_page(page, keep)
        self._flush_tb()

    # ---- the page pool ------------------------------------------------------------------------------
    def _load(self, key: int) -> int:
        """A slot holding the page of ``key``, filled from the shared cache in its domain."""
        if not self._free:
            self._evict()  # inside a hook: only when a burst used up the reserve
        s = self._free.pop()
        if len(self._free) < 16 and not self._evict_requested:
            self._evict_requested = True
            self._lib.uc_emu_stop(self._h)  # evict at the next block boundary
        asid, c, spa = key_domain(key)
        assert self._cache is not None and self._mm is not None
        data = self._cache.read(asid, c, spa, PAGE, origin=self)
        off = s * PAGE
        self._mm[off : off + PAGE] = data
        self._snap[s] = data
        self._slot_of[key] = s
        self._slot_key[s] = key
        self._by_spa.setdefault(spa, set()).add(s)
        self._order.append(s)
        self.stats.slot_fills += 1
        return s

    def _sync_slot(self, s: int) -> None:
        """Write the lines of slot ``s`` the guest modified back into the shared cache."""
        mm = self._mm
        assert mm is not None and self._cache is not None
        cur = mm[s * PAGE : (s + 1) * PAGE]
        snap = self._snap[s]
        if cur == snap:
            return
        asid, c, spa = key_domain(self._slot_key[s])
        write = self._cache.write
        o = 0
        while o < PAGE:
            if cur[o : o + 64] == snap[o : o + 64]:
                o += 64
                continue
            start = o
            while o < PAGE and cur[o : o + 64] != snap[o : o + 64]:
                o += 64
            write(asid, c, spa + start, cur[start:o], origin=self)
            self.stats.lines_written_back += (o - start) // 64
        self._snap[s] = cur

    def _sync_all(self) -> int:
        """Write back every modified slot; returns how many were modified."""
        mm = self._mm
        if mm is None:
            return 0
        snap = self._snap
        dirty = 0
        for s in self._wslots:
            if mm[s * PAGE : (s + 1) * PAGE] != snap.get(s, b"") and s in self._slot_key:
                self._sync_slot(s)
                dirty += 1
        return dirty

    def _demote_writes(self, cr0: int, cr3: int) -> None:
        """Take write permission back from Unicorn (a TLB flush), so that only pages the guest
        writes again need checking at each exit; called when written pages stay clean a while."""
        self._clean_syncs = 0
        if cr0 & CR0_PG:
            self._reg_write(_REG_CR3, cr3)  # a CR3 reload flushes Unicorn's TLB, not its code cache
        else:
            _check(self._lib.uc_ctl(self._h, ctypes.c_int(_ctl(1, 0, _UC_CTL_TLB_FLUSH))), "TLB flush")
        self._wslots.clear()
        self._w_gvas.clear()
        self._xgva.clear()
        self._fill_cr0 = self._fill_cr3 = -1

    def _refresh_stale(self) -> None:
        """Re-read the slots someone else changed (after a write-back of our own changes)."""
        stale, self._stale = self._stale, set()
        mm = self._mm
        assert mm is not None and self._cache is not None
        rescan = []
        for s in stale:
            key = self._slot_key.get(s)
            if key is None:
                continue
            asid, c, spa = key_domain(key)
            new = self._cache.read(asid, c, spa, PAGE, origin=self)
            if new != mm[s * PAGE : (s + 1) * PAGE]:
                mm[s * PAGE : (s + 1) * PAGE] = new
                if s in self._xslots:
                    self._scans.pop(s, None)
                    rescan.append(s)
            self._snap[s] = new
            self.stats.slot_refreshes += 1
        if rescan:
            # code changed under Unicorn's feet: retranslate, and re-hook the pages' port I/O
            self._flush_tb()
            for page, slot in list(self._xgva.items()):
                if slot in rescan:
                    del self._xgva[page]
                    self._exec_page(page, slot)

    def _evict(self) -> None:
        """Free the oldest quarter of the pool (written back first); Unicorn's TLB is flushed."""
        self._evict_requested = False
        n = max(self.pool_pages // 4, 1)
        self._sync_all()
        victims: list[int] = []
        while self._order and len(victims) < n:
            victims.append(self._order.popleft())
        for s in victims:
            self._forget(s)
        self._flush_tlb_all()
        self.stats.evictions += len(victims)

    def _forget(self, s: int) -> None:
        key = self._slot_key.pop(s, None)
        if key is None:
            return
        self._slot_of.pop(key, None)
        spa = key & SPA_MASK
        peers = self._by_spa.get(spa)
        if peers is not None:
            peers.discard(s)
            if not peers:
                del self._by_spa[spa]
        self._snap.pop(s, None)
        self._scans.pop(s, None)
        self._wslots.discard(s)
        self._stale.discard(s)
        self._xslots.discard(s)
        self._free.append(s)

    def _drop_all(self) -> None:
        """Forget every slot (after a write-back); the guest refaults what it uses."""
        if not self._slot_key:
            return
        self._sync_all()
        for s in list(self._slot_key):
            self._forget(s)
        self._order.clear()
        self._flush_tlb_all()

    # ---- CacheAgent: the shared cache snoops the pool ------------------------------------------------
    def _slots_in(self, lo: int, hi: int) -> list[int]:
        if hi - lo <= 64 * PAGE:
            get = self._slot_of.get
            out = []
            for key in range(lo & ~0xFFF, hi, PAGE):
                s = get(key)
                if s is not None:
                    out.append(s)
            return out
        return [s for key, s in self._slot_of.items() if key < hi and key + PAGE > lo]

    def snoop(self, lo: int, hi: int, invalidate: bool) -> None:
        """Cache lines with keys in ``[lo, hi)`` are about to be read / changed by someone else."""
        if not self._slot_of:
            return
        for s in self._slots_in(lo, hi):
            if s in self._wslots:
                self._sync_slot(s)
            if invalidate:
                self._stale.add(s)

    def snoop_fill(self, key: int) -> None:
        """Coherent profile: a line of ``key``'s SPA is filled in ``key``'s domain."""
        peers = self._by_spa.get(key & SPA_MASK & ~0xFFF)
        if not peers:
            return
        page_key = key & ~0xFFF
        for s in list(peers):
            if self._slot_key.get(s) != page_key:
                if s in self._wslots:
                    self._sync_slot(s)
                self._stale.add(s)

    # ---- inspection --------------------------------------------------------------------------------
    def resident_pages(self) -> list[tuple[int, bool, int]]:
        """(asid, c, spa) of every page held in the pool (plaintext inside the SoC)."""
        return [key_domain(k) for k in self._slot_of]


def _msrpm_bit(msr: int) -> tuple[int, int]:
    """(byte offset, bit) of an MSR's read bit in the SVM MSR permission map (APM 15.11)."""
    if msr < 0x2000:
        base, index = 0, msr
    elif 0xC0000000 <= msr < 0xC0002000:
        base, index = 0x800, msr - 0xC0000000
    elif 0xC0010000 <= msr < 0xC0012000:
        base, index = 0x1000, msr - 0xC0010000
    else:
        raise InputError(f"MSR {msr:#x} is outside the permission map")
    return base + index // 4, 2 * (index % 4)


# ---- the bare emulator (benchmark baseline) ------------------------------------------------------
class BareRunner:
    """The same Unicorn, bare: flat memory, no paging, no SoC model -- the benchmark's baseline.

    Maps ``image`` at ``base`` (plus ``extra`` bytes of zeroed memory after it) and runs code from
    ``start`` until ``stop`` in 64-bit mode; port output is collected, HLT ends the run.
    """

    def __init__(self, image: bytes, base: int, extra: int = 1 << 20) -> None:
        self._lib = _load_library()
        self._h = ctypes.c_void_p(0)
        lib = self._lib
        _check(lib.uc_open(_UC_ARCH_X86, _UC_MODE_64, ctypes.byref(self._h)), "uc_open")
        _check(lib.uc_ctl(self._h, ctypes.c_int(_ctl(1, 1, _UC_CTL_CPU_MODEL)),
                          ctypes.c_int(_UC_CPU_X86_EPYC_ROME)), "CPU model")
        size = (len(image) + extra + PAGE - 1) & ~(PAGE - 1)
        _check(lib.uc_mem_map(self._h, base, size, _UC_PROT_ALL), "map")
        buf = ctypes.create_string_buffer(image, len(image))
        _check(lib.uc_mem_write(self._h, base, buf, len(image)), "write")
        self.base = base
        self.size = size
        self.output = bytearray()
        self._cbs: list[Any] = []
        out = _OUT_CB(self._out)
        inp = _IN_CB(lambda h, port, size, user: 0x20)
        self._cbs += [out, inp]
        hh = ctypes.c_size_t()
        for cb, insn in ((out, _UC_X86_INS_OUT), (inp, _UC_X86_INS_IN)):
            _hook_insn(self._h, hh, cb, insn)

    def _out(self, h: Any, port: int, size: int, value: int, user: Any) -> None:
        self.output.append(value & 0xFF)

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` into the flat memory."""
        buf = ctypes.create_string_buffer(data, len(data))
        _check(self._lib.uc_mem_write(self._h, address, buf, len(data)), "write")

    def call(self, start: int, stop: int, regs: dict[str, int] | None = None) -> dict[str, int]:
        """Run from ``start`` until the instruction at ``stop``; returns the GPRs afterwards."""
        lib = self._lib
        scratch = ctypes.c_uint64()
        for name, value in (regs or {}).items():
            scratch.value = value
            _check(lib.uc_reg_write(self._h, _R[name], ctypes.byref(scratch)), "register write")
        _check(lib.uc_emu_start(self._h, start, stop, 0, 0), "emulation")
        out = {}
        for name in GPRS:
            _check(lib.uc_reg_read(self._h, _R[name], ctypes.byref(scratch)), "register read")
            out[name] = int(scratch.value)
        return out

    def close(self) -> None:
        h, self._h = self._h, ctypes.c_void_p(0)
        if h.value:
            self._lib.uc_close(h)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

