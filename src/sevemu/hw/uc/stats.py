"""What the Unicorn engine did (cumulative counters, for tests and ``sevemu bench cpu``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sevemu.hw.svm import VmExit

__all__ = ["UcStats"]


@dataclass
class UcStats:
    """What the engine did (cumulative)."""

    runs: int = 0
    exits: int = 0
    internal_exits: int = 0
    tlb_fills: int = 0
    slot_fills: int = 0
    slot_refreshes: int = 0
    slot_updates: int = 0
    evictions: int = 0
    lines_written_back: int = 0
    tlb_flushes: int = 0
    tb_flushes: int = 0
    io_exits: int = 0
    """Exits answered from the known-exit memo (a port-I/O exit, an SEV-ES guest's VMGEXIT) without decoding."""
    spurious_stops: int = 0
    exceptions_delivered: int = 0
    """Exceptions delivered through the guest's IDT (#VC of an SEV-ES guest, #GP, #PF ...)."""
    by_code: dict[int, int] = field(default_factory=dict)
    vc_by_code: dict[int, int] = field(default_factory=dict)
    """#VC exceptions delivered, by error code (the exit code of the non-automatic exit)."""
    pvalidates: int = 0
    """PVALIDATE instructions executed (an SNP guest's)."""
    pvalidates_in_place: int = 0
    """Of those, retired inside Unicorn's invalid-instruction hook (no stop; ``exits.pvalidate_in_place``)."""
    hook_resets: int = 0
    """Times every port-I/O code hook was dropped to keep translation fast (``UcEngine._drop_hooks``)."""

    @property
    def by_reason(self) -> dict[str, int]:
        """Exits by name (NPF, IOIO, HLT, ...)."""
        return {VmExit(c).name: n for c, n in self.by_code.items()}

    def count(self, code: int) -> None:
        """One more exit with ``code``."""
        self.exits += 1
        by = self.by_code
        by[code] = by.get(code, 0) + 1
