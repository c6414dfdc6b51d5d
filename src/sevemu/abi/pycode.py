"""The program table of a Python-workload guest: which Python programs are that guest's code.

A real SEV guest's code lives in its encrypted memory: the CPU fetches every instruction with the
guest's key (APM2 15.34.5), so the host cannot choose what runs inside the guest's encryption
domain.  sevemu's Python workloads (:mod:`sevemu.hw.pyengine`) are generators, not bytes in guest
memory, so the model keeps their *identity* there instead: the launch loads a **program table**
at :data:`CODE_GPA` as ordinary launch data (LAUNCH_UPDATE_DATA measures and encrypts it, so the
owner's launch digest covers it), and the CPU's Python engine runs a workload in an SEV guest only
when that table -- fetched from guest memory with the guest's key, as an instruction fetch --
lists the workload's identity.  A model choice (AMD documents nothing of the kind); see
docs/threat-model.md and docs/cpu-engine.md.

Layout (little-endian, 16-byte granular, at most one page)::

    0x00  8   magic  b"SEVEMUPY"
    0x08  4   version (1)
    0x0C  4   count: number of identities (1 .. MAX_PROGRAMS)
    0x10  16  reserved, zero
    0x20  32*count  identities, each the SHA-256 of a program's canonical description

The identity of a program (:func:`program_identity`) is the SHA-256 of a canonical description of
its code: the module name, the qualified name and, recursively, the code object's bytecode,
constants, names, argument counts and flags.  File names and line numbers are left out (moving a
function does not change what it does).  What a program is *given* -- its arguments, closure
cells, the module globals it calls at run time -- is not code: it stands for the register state
and data a guest receives, which the host controls for a plain SEV guest (its VMCB save area is
readable and writable) as on hardware.
"""

from __future__ import annotations

import hashlib
import struct
import types
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from sevemu.errors import InputError

__all__ = ["CODE_GPA", "HEADER_SIZE", "MAGIC", "MAX_PROGRAMS", "VERSION", "code_table", "identity_table", "parse_code_table",
           "program_identity"]

CODE_GPA = 0x0  # the guest-physical page the table is loaded at (the first page: free in every guest model)
MAGIC = b"SEVEMUPY"
VERSION = 1
HEADER_SIZE = 0x20
_ID = 32
MAX_PROGRAMS = (4096 - HEADER_SIZE) // _ID  # 127: the table fits one page
_HEADER = struct.Struct("<8sII16s")
_DOMAIN = b"sevemu python workload identity v1\0"


def _code_bytes(code: types.CodeType) -> bytes:
    """The canonical bytes of a code object (no file name, no line numbers)."""
    parts = [code.co_qualname.encode(), code.co_code,
             struct.pack("<6I", code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                         code.co_nlocals, code.co_flags, len(code.co_consts)),
             "\0".join(code.co_names).encode(), "\0".join(code.co_varnames).encode(),
             "\0".join(code.co_freevars).encode(), "\0".join(code.co_cellvars).encode()]
    parts += [_const_bytes(const) for const in code.co_consts]
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def _const_bytes(const: object) -> bytes:
    """A constant's canonical bytes (tag, length, payload): independent of hash randomisation
    (a frozenset's members are sorted)."""
    if isinstance(const, types.CodeType):
        tag, body = b"C", hashlib.sha256(_code_bytes(const)).digest()
    elif isinstance(const, tuple):
        tag, body = b"T", b"".join(_const_bytes(c) for c in const)
    elif isinstance(const, frozenset):
        tag, body = b"F", b"".join(sorted(_const_bytes(c) for c in const))
    else:
        tag, body = b"K", type(const).__name__.encode() + b":" + repr(const).encode()
    return tag + struct.pack("<I", len(body)) + body


@lru_cache(maxsize=1024)
def _identity(module: str, qualname: str, code: types.CodeType) -> bytes:
    desc = _DOMAIN + module.encode() + b"\0" + qualname.encode() + b"\0" + _code_bytes(code)
    return hashlib.sha256(desc).digest()


def program_identity(program: Any) -> bytes:
    """The 32-byte identity of ``program``: a generator function, or a generator made by one."""
    if isinstance(program, types.GeneratorType):
        frame = program.gi_frame
        module = frame.f_globals.get("__name__", "") if frame is not None else ""
        if frame is None:
            raise InputError(f"the workload {program.__qualname__} has already finished: it has no code to bind")
        return _identity(str(module), program.__qualname__, program.gi_code)
    code = getattr(program, "__code__", None)
    if not isinstance(code, types.CodeType):
        raise InputError(f"a guest program is a Python generator function or generator, not {type(program).__name__}")
    return _identity(str(getattr(program, "__module__", "")), str(getattr(program, "__qualname__", "")), code)


def code_table(programs: Iterable[Any]) -> bytes:
    """The program table listing ``programs`` (functions or generators), in the order given."""
    return identity_table(program_identity(p) for p in programs)


def identity_table(identities: Iterable[bytes]) -> bytes:
    """The program table listing ``identities`` (32 bytes each; repeats listed once), in order."""
    ids: list[bytes] = []
    for ident in identities:
        if len(ident) != _ID:
            raise InputError(f"a program identity is {_ID} bytes, got {len(ident)}")
        if ident not in ids:
            ids.append(ident)
    if not 1 <= len(ids) <= MAX_PROGRAMS:
        raise InputError(f"a program table lists 1 to {MAX_PROGRAMS} programs, got {len(ids)}")
    return _HEADER.pack(MAGIC, VERSION, len(ids), bytes(16)) + b"".join(ids)


def parse_code_table(header: bytes) -> int:
    """The number of identities following a table header, or 0 when ``header`` is no valid header."""
    if len(header) < HEADER_SIZE:
        return 0
    magic, version, count, reserved = _HEADER.unpack_from(header)
    if magic != MAGIC or version != VERSION or reserved != bytes(16) or not 1 <= count <= MAX_PROGRAMS:
        return 0
    return int(count)
