"""libunicorn through ctypes: the constants, prototypes and callback types the engine uses.

The engine calls the shared library directly (the Python binding's per-call wrappers are too slow
for the exit path); the library is the one the ``unicorn`` wheel ships, loaded once.  Constants are
those of ``unicorn.h`` / ``x86.h`` (the Python constant modules agree).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any, Final

from sevemu.errors import HardwareError
from sevemu.hw.svm import GPRS

__all__ = [
    "INSN_INVALID_CB",
    "INTR_CB",
    "IN_CB",
    "I_CR0",
    "I_CR3",
    "I_CR4",
    "I_RFLAGS",
    "I_RIP",
    "OUT_CB",
    "REG",
    "REG_CR0",
    "REG_CR2",
    "REG_CR3",
    "REG_CR4",
    "REG_CS",
    "REG_IDTR",
    "REG_MSR",
    "REG_RFLAGS",
    "REG_RIP",
    "REG_SS",
    "REG_TR",
    "SYNC_IDS",
    "TLB_FILL_CB",
    "Mmr",
    "MsrArg",
    "check",
    "ctl",
    "fn_address",
    "hook_insn",
    "library",
    "loaded_library",
    "unicorn_version",
]

UC_ARCH_X86: Final = 4
UC_MODE_64: Final = 8
UC_ERR_OK: Final = 0
UC_ERR_INSN_INVALID: Final = 10
UC_ERR_EXCEPTION: Final = 21
UC_HOOK_INTR: Final = 1
UC_HOOK_INSN: Final = 2
UC_HOOK_CODE: Final = 4
UC_HOOK_BLOCK: Final = 8
UC_HOOK_INSN_INVALID: Final = 1 << 14
UC_HOOK_TLB_FILL: Final = 1 << 17
UC_MEM_WRITE: Final = 17
UC_MEM_FETCH: Final = 18
UC_PROT_READ: Final = 1
UC_PROT_WRITE: Final = 2
UC_PROT_EXEC: Final = 4
UC_PROT_ALL: Final = 7
UC_TLB_VIRTUAL: Final = 1
UC_CTL_UC_USE_EXITS: Final = 4
UC_CTL_UC_EXITS: Final = 6
UC_CTL_CPU_MODEL: Final = 7
UC_CTL_TB_FLUSH: Final = 10
UC_CTL_TLB_FLUSH: Final = 11
UC_CTL_TLB_TYPE: Final = 12
UC_CTL_TCG_BUFFER_SIZE: Final = 13
UC_CPU_X86_EPYC_ROME: Final = 37
UC_X86_INS_IN: Final = 218
UC_X86_INS_OUT: Final = 500

REG: Final = {"rax": 35, "rbx": 37, "rcx": 38, "rdx": 40, "rsi": 43, "rdi": 39, "rbp": 36, "rsp": 44,
              "r8": 106, "r9": 107, "r10": 108, "r11": 109, "r12": 110, "r13": 111, "r14": 112, "r15": 113}
"""Unicorn's register ids of the GPRs."""
REG_RIP: Final = 41
REG_RFLAGS: Final = 253
REG_CR0: Final = 50
REG_CR3: Final = 53
REG_CR4: Final = 54
REG_MSR: Final = 248
REG_CS: Final = 11
REG_SS: Final = 49
REG_CR2: Final = 52
REG_IDTR: Final = 242
REG_TR: Final = 245
SYNC_IDS: Final = [REG[n] for n in GPRS] + [REG_RIP, REG_RFLAGS, REG_CR0, REG_CR3, REG_CR4]
"""The register batch read at every stop: the 16 GPRs in VMCB order, then RIP, RFLAGS, CR0, CR3, CR4."""
I_RIP, I_RFLAGS, I_CR0, I_CR3, I_CR4 = 16, 17, 18, 19, 20


class Mmr(ctypes.Structure):
    """``uc_x86_mmr``: a descriptor-table or task register (selector, base, limit, flags)."""

    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]


def ctl(op: int, nargs: int, which: int) -> int:
    """UC_CTL_WRITE/READ encoding (unicorn.h): I/O direction in bits 31:30, argument count in 29:26."""
    return (op << 30) | (nargs << 26) | which


_LIB: ctypes.CDLL | None = None
_LIB_LOCK = threading.Lock()
_u64 = ctypes.c_uint64


def library() -> ctypes.CDLL:
    """libunicorn with the prototypes the engine uses (loaded once; the same handle the binding uses)."""
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
            ("uc_vmem_write", ctypes.c_int, [eng, _u64, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
            ("uc_reg_read", ctypes.c_int, [eng, ctypes.c_int, ctypes.c_void_p]),
            ("uc_reg_write", ctypes.c_int, [eng, ctypes.c_int, ctypes.c_void_p]),
            ("uc_reg_read_batch", ctypes.c_int, [eng, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
            ("uc_reg_write_batch", ctypes.c_int, [eng, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]),
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


def loaded_library() -> ctypes.CDLL | None:
    """The library if it was loaded already (the watchdog never loads it)."""
    return _LIB


def unicorn_version() -> str:
    """Version of the Unicorn library in use (``major.minor.patch``)."""
    v = int(library().uc_version(None, None))
    return f"{v >> 24}.{(v >> 16) & 0xFF}.{(v >> 8) & 0xFF}"


def fn_address(cb: Any) -> int:
    """The code address of a ctypes function object (a callback or a library function).

    ``ctypes.cast`` would do, but it stores the source in its own ``_objects``: a reference cycle
    that keeps every callback -- and the engine its bound methods belong to -- alive until the
    garbage collector runs.
    """
    return int(ctypes.c_void_p.from_buffer(cb).value or 0)


def check(err: int, what: str) -> None:
    """Raise :class:`~sevemu.errors.HardwareError` naming ``what`` unless ``err`` is UC_ERR_OK."""
    if err != UC_ERR_OK:
        msg = library().uc_strerror(err)
        raise HardwareError(f"Unicorn {what} failed: {msg.decode() if msg else err}")


def open_x86(h: ctypes.c_void_p, mode: int = UC_MODE_64, *, what: str = "uc_open",
             tcg_buffer: int | None = None) -> None:
    """uc_open an x86 instance of ``mode`` into ``h`` with the EPYC-Rome CPU model (the model every
    engine of sevemu uses) and, if given, a TCG translation buffer of ``tcg_buffer`` bytes."""
    lib = library()
    check(lib.uc_open(UC_ARCH_X86, mode, ctypes.byref(h)), what)
    check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 1, UC_CTL_CPU_MODEL)), ctypes.c_int(UC_CPU_X86_EPYC_ROME)),
          "CPU model")
    if tcg_buffer is not None:
        check(lib.uc_ctl(h, ctypes.c_int(ctl(1, 1, UC_CTL_TCG_BUFFER_SIZE)), ctypes.c_uint32(tcg_buffer)),
              "TCG buffer size")


def hook_insn(h: ctypes.c_void_p, handle: ctypes.c_size_t, cb: Any, insn: int) -> None:
    """uc_hook_add for UC_HOOK_INSN, whose instruction id is a variadic argument."""
    fn = library()["uc_hook_add"]  # a fresh function object: no fixed prototype
    fn.restype = ctypes.c_int
    check(fn(h, ctypes.byref(handle), ctypes.c_int(UC_HOOK_INSN), ctypes.c_void_p(fn_address(cb)),
             ctypes.c_void_p(None), ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(insn)),
          "port I/O hook")


# callback types (uc_engine handle first, user data last)
TLB_FILL_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_void_p, ctypes.c_void_p)
INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p)
INSN_INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
"""``uc_cb_hookinsn_invalid_t``: True = handled, emulation goes on (at RIP, if the hook wrote it)."""
IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p)
OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                          ctypes.c_void_p)


class MsrArg(ctypes.Structure):
    """``uc_x86_msr``: the argument of a UC_X86_REG_MSR read or write."""

    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]
