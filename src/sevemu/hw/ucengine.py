"""A real x86-64 instruction engine for the vCPU: Unicorn (QEMU's TCG) behind :class:`~sevemu.hw.cpu.Engine`.

The public entry point of the engine, whose parts live in :mod:`sevemu.hw.uc` one per concept
(binding, page pool, port I/O, exits, watchdog, engine, bare baseline; ``docs/cpu-engine.md``).
The instruction semantics it shares with the Python engine are in :mod:`sevemu.hw.x86.insn`.
"""

from __future__ import annotations

from sevemu.hw.uc.bare import BareRunner
from sevemu.hw.uc.bare_ovmf import BareFirmware
from sevemu.hw.uc.binding import unicorn_version
from sevemu.hw.uc.engine import EngineClosedError, UcEngine, check_vmcb_state
from sevemu.hw.uc.ports import scan_io_candidates
from sevemu.hw.uc.stats import UcStats
from sevemu.hw.x86.arch import MSR_SEV_STATUS as SEV_STATUS_MSR
from sevemu.hw.x86.state import InitialState

__all__ = ["SEV_STATUS_MSR", "BareFirmware", "BareRunner", "EngineClosedError", "InitialState", "UcEngine", "UcStats",
           "check_vmcb_state", "scan_io_candidates", "unicorn_version"]
