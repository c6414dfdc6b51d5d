"""Fixtures for the hypervisor tests: a small host of each generation with its firmware INIT."""

from __future__ import annotations

import pytest

from sevemu._util.units import MiB
from sevemu.scenario import Machine, build_machine


def small_machine(generation: str = "milan", seed: str = "hv-tests", cache_size: int = 256 << 10,
                  dram_size: int = 512 * MiB) -> Machine:
    return build_machine(generation, seed=seed, dram_size=dram_size, cache_size=cache_size)


@pytest.fixture
def machine() -> Machine:
    return small_machine()
