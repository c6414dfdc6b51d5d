"""The instruction encodings a vCPU engine must recognise itself (Intel SDM vol. 2 / APM3 opcode maps).

Only what the exits need: the prefix run, port I/O (IN/OUT/INS/OUTS, their operand size and port),
the SVM IOIO EXITINFO1 word built from them (APM2 15.10.2), and the guest instructions of SEV-ES
and SEV-SNP that an x86 emulator may not know (APM3; APM2 15.35.6, 15.36.7-15.36.8; Linux
arch/x86/include/asm/sev.h ``pvalidate``, ``rmpadjust``, arch/x86/include/asm/svm.h ``VMGEXIT``):

| instruction | bytes | operands |
|---|---|---|
| VMMCALL | 0F 01 D9 | |
| VMGEXIT | F3 0F 01 D9 (``rep; vmmcall``) | the GHCB MSR |
| PVALIDATE | F2 0F 01 FF | RAX = guest VA, ECX = size (0 4 KiB, 1 2 MiB), EDX = validate (1) / rescind (0) |
| RMPADJUST | F3 0F 01 FE | RAX = guest VA, RCX = size, RDX = target VMPL, permissions, VMSA bit |
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "IO_OPCODE", "LEGACY_PREFIXES", "REX", "GuestInsn", "PortIo", "decode_guest_insn", "decode_io",
    "ioio_info1", "skip_prefixes",
]

LEGACY_PREFIXES: Final = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3")
REX: Final = frozenset(range(0x40, 0x50))
_IN_OPCODES: Final = frozenset((0xE4, 0xE5, 0xEC, 0xED, 0x6C, 0x6D))
_BYTE_OPCODES: Final = frozenset((0xE4, 0xE6, 0xEC, 0xEE, 0x6C, 0x6E))
_IMM_PORT: Final = frozenset((0xE4, 0xE5, 0xE6, 0xE7))
_STRING: Final = frozenset((0x6C, 0x6D, 0x6E, 0x6F))
_IO_OPCODES: Final = frozenset(range(0xE4, 0xE8)) | frozenset(range(0xEC, 0xF0)) | _STRING
IO_OPCODE: Final = re.compile(rb"[\x6c-\x6f\xe4-\xe7\xec-\xef]")
"""Any byte that is an IN/OUT/INS/OUTS opcode."""

# IOIO EXITINFO1 (APM2 15.10.2)
_IOIO_IN: Final = 1 << 0
_IOIO_STR: Final = 1 << 2
_IOIO_REP: Final = 1 << 3
_IOIO_SIZE: Final = {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}
_IOIO_ADDR: Final = {16: 1 << 7, 32: 1 << 8, 64: 1 << 9}


def skip_prefixes(code: bytes, long_mode: bool) -> int:
    """Length of the legacy-prefix run (at most 14) and, in 64-bit mode, a REX byte after it."""
    i = 0
    while i < len(code) and i < 14 and code[i] in LEGACY_PREFIXES:
        i += 1
    if long_mode and i < len(code) and code[i] in REX:
        i += 1
    return i


@dataclass(frozen=True, slots=True)
class PortIo:
    """A decoded IN/OUT/INS/OUTS: port (DX or the immediate), operand size, direction, length."""

    port: int
    size: int
    is_in: bool
    string: bool
    rep: bool
    length: int
    imm_port: bool


def decode_io(code: bytes, long_mode: bool, rdx: int) -> PortIo | None:
    """The port I/O instruction at the start of ``code`` (None when it is not one)."""
    i = skip_prefixes(code, long_mode)
    if i >= len(code) or code[i] not in _IO_OPCODES:
        return None
    prefixes = code[:i]
    op = code[i]
    size = 1 if op in _BYTE_OPCODES else (2 if 0x66 in prefixes else 4)
    is_in = op in _IN_OPCODES
    if op in _IMM_PORT:
        if i + 1 >= len(code):
            return None
        return PortIo(code[i + 1], size, is_in, False, False, i + 2, True)
    string = op in _STRING
    rep = string and (0xF3 in prefixes or 0xF2 in prefixes)
    return PortIo(rdx & 0xFFFF, size, is_in, string, rep, i + 1, False)


def ioio_info1(port: int, size: int, is_in: bool, string: bool = False, rep: bool = False,
               addr_bits: int | None = None) -> int | None:
    """SVM IOIO EXITINFO1: TYPE (IN), STR, REP, SZ8/16/32, A16/32/64, port in 31:16.

    None when no IN/OUT encodes that operand size or port (the guest gets #GP).  ``addr_bits``
    None leaves the address-size field empty (an engine without instruction encodings).
    """
    sz = _IOIO_SIZE.get(size)
    if sz is None or not 0 <= port <= 0xFFFF:
        return None
    info = (port << 16) | sz | (_IOIO_IN if is_in else 0) | (_IOIO_STR if string else 0) | (_IOIO_REP if rep else 0)
    if addr_bits is not None:
        info |= _IOIO_ADDR[addr_bits]
    return info


class GuestInsn(enum.Enum):
    """Guest instructions of SVM, SEV-ES and SEV-SNP an engine routes to the shared semantics."""

    VMMCALL = "VMMCALL"
    VMGEXIT = "VMGEXIT"
    PVALIDATE = "PVALIDATE"
    RMPADJUST = "RMPADJUST"


_OPCODE_0F01: Final = {
    (None, 0xD9): GuestInsn.VMMCALL,
    (0xF3, 0xD9): GuestInsn.VMGEXIT,
    (0xF2, 0xFF): GuestInsn.PVALIDATE,
    (0xF3, 0xFE): GuestInsn.RMPADJUST,
}


def decode_guest_insn(code: bytes, long_mode: bool) -> tuple[GuestInsn, int] | None:
    """``(instruction, length)`` when ``code`` starts with one of :class:`GuestInsn`, else None.

    The mandatory prefix (F2/F3) is the last legacy prefix before the opcode, as the opcode maps
    define it; a REX byte before ``0F`` is allowed in 64-bit mode and changes nothing.
    """
    i = skip_prefixes(code, long_mode)
    if code[i : i + 2] != b"\x0f\x01" or i + 2 >= len(code):
        return None
    last_legacy = None
    for b in code[:i]:
        if b in (0xF2, 0xF3):
            last_legacy = b
    insn = _OPCODE_0F01.get((last_legacy, code[i + 2]))
    if insn is None and code[i + 2] == 0xD9:
        insn = GuestInsn.VMMCALL  # other prefixes (66, segment) do not change VMMCALL
    return None if insn is None else (insn, i + 3)
