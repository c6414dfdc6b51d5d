"""Helpers for tests that run one guest two ways (a fast path and the path it stands for) and compare
what each run leaves behind."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from sevemu.cli.run import GuestRun


def guest_state(run: GuestRun) -> dict[str, Any]:
    """What a guest run leaves that both ways must leave alike: the console, the cache's lines (per set,
    in LRU order), DRAM (a digest of every page with its PFN), the engine's counters and vCPU 0's exits.
    A test adds the parts of its own path."""
    soc = run.machine.soc
    dram = hashlib.sha256()
    for pfn, page in sorted(soc.dram.pages_dict().items()):
        dram.update(pfn.to_bytes(8, "little") + bytes(page))
    return {
        "console": run.vm.console,
        "lines": [[(k, bytes(v)) for k, v in s.items()] for s in soc.cache.sets],  # (set order: LRU)
        "dram": dram.hexdigest(),
        "stats": dataclasses.asdict(run.engines[0].stats),
        "exits": dict(run.vm.vcpus[0].exits),
    }


def assert_same_states(first: dict[str, Any], second: dict[str, Any]) -> None:
    """The two end states equal in every part (the first part that differs named)."""
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert value == second[key], key
