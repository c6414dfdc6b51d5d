"""The CPU's check that a Python workload is the SEV guest's own code (the engines' code fetch).

On hardware an SEV guest's instructions are fetched from its memory with its key (APM2 15.34.5):
whatever the host writes there decrypts to garbage, so the host cannot choose the code that runs
in the guest's encryption domain.  A Python workload is not bytes in guest memory; its identity is
(:mod:`sevemu.abi.pycode`).  Before a Python workload executes in an SEV guest -- at its first VMRUN
under a guest key, and again whenever it is run under another ASID or the ASID's key changed (a
new launch) -- the CPU fetches the guest's program table from
guest-physical :data:`~sevemu.abi.pycode.CODE_GPA` (or where the engine is told the table is:
the host choosing the place gains nothing, only the guest's launch put a table under its key) with instruction-fetch semantics (always the
guest's key, whatever the C-bit) and runs the workload only if the table lists its identity.
Anything else is code the guest never had: the fetch decodes garbage and the guest dies
(#VMEXIT(SHUTDOWN), a triple fault), never a plaintext read.  A plain guest has no such check: its
memory is the host's to read anyway.

:func:`cpu_engine` marks the instruction engines that belong to the CPU model (the Python engine,
the x86 engine); :meth:`sevemu.hw.cpu.Core.vmrun` refuses to enter an SEV guest with any other object,
since an "engine" the host supplies would be host code running with the guest's key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from sevemu.abi.pycode import CODE_GPA, HEADER_SIZE, parse_code_table
from sevemu.hw.cache import tag_key

if TYPE_CHECKING:
    from sevemu.hw.cpu import Core

__all__ = ["CodeCheck", "cpu_engine", "is_cpu_engine", "program_refused"]

_T = TypeVar("_T", bound=type)
_CPU_ENGINES: set[type] = set()
_ID = 32


def cpu_engine(cls: _T) -> _T:
    """Class decorator: ``cls`` is one of the CPU model's own instruction engines."""
    _CPU_ENGINES.add(cls)
    return cls


def is_cpu_engine(engine: object) -> bool:
    """True when ``engine`` is an instance of a CPU engine class itself (not of a subclass)."""
    return type(engine) in _CPU_ENGINES


class CodeCheck:
    """An engine's code fetch for one workload: :func:`program_refused`, remembered per key.

    Once the table under a key listed the workload, the workload is that guest's code for as long
    as the key lives (only that guest's launch wrote under it); a VMRUN with another ASID, or after
    the key slot was reloaded (another launch on the ASID), fetches again.  The memory controller
    makes a new line reader at every key load: that object is the key's generation.
    """

    __slots__ = ("_ok", "gpa", "identity")

    def __init__(self, identity: bytes, gpa: int = CODE_GPA) -> None:
        self.identity = identity
        self.gpa = gpa
        self._ok: tuple[int, object] | None = None

    def refused(self, core: Core, asid: int, ncr3: int) -> str | None:
        """None when the workload may run in the SEV guest of ``asid``, else why not."""
        generation = core.mc.readers.get((asid << 1) | 1)
        ok = self._ok
        if ok is not None and ok[0] == asid and ok[1] is generation:
            return None
        reason = program_refused(core, asid, ncr3, self.identity, self.gpa)
        self._ok = (asid, generation) if reason is None else None
        return reason


def program_refused(core: Core, asid: int, ncr3: int, identity: bytes, gpa: int = CODE_GPA) -> str | None:
    """None when the SEV guest (``asid``, nested tables at ``ncr3``) lists ``identity`` in its program
    table at ``gpa``, else why the fetch fails.  A #NPF of the table page propagates (restartable)."""
    cache = core.cache
    hits, misses = cache.hits, cache.misses  # instruction fetches: not the data accesses these count
    t = core.mmu.translate(asid=asid, sev=True, ncr3=ncr3, paging=False, cr3=0, gva=gpa, write=False,
                           fetch=True)
    base = tag_key(t.fetch_asid, t.fetch_c, t.spa)
    line = cache.line
    first = bytes(line(base))
    count = parse_code_table(first)
    if not count:
        cache.hits, cache.misses = hits, misses
        return (f"code fetch: no program table at GPA {gpa:#x} in the guest's memory "
                "(the workload is not this guest's code)")
    end = HEADER_SIZE + count * _ID
    table = first + b"".join(bytes(line(base | off)) for off in range(64, end, 64))
    cache.hits, cache.misses = hits, misses
    for off in range(HEADER_SIZE, end, _ID):
        if table[off : off + _ID] == identity:
            return None
    return (f"code fetch: the workload {identity.hex()[:16]}... is not in the guest's program table "
            "(it is not this guest's measured code)")
