"""The composition root: manufacture -> platform -> firmware -> hypervisor -> guests.

This is the only place that holds every part at once, the way a factory and a data centre do:
it builds a :class:`~sevemu.hw.soc.Soc` for a CPU generation, takes the PSP's private ports and
loads the firmware behind the mailbox, and starts the hypervisor on the host side.  Nothing else
crosses those boundaries: the hypervisor drives the firmware only through mailbox registers, and
guests talk to the hypervisor only through exits and shared pages.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from sevemu.firmware.dispatcher import Firmware
from sevemu.hw.profiles import CpuProfile, profile
from sevemu.hw.soc import Soc
from sevemu.hypervisor.kvm import Hypervisor

__all__ = ["Machine", "build_machine", "SeededRng"]

GiB = 1 << 30


@dataclass
class Machine:
    """One SEV host: the SoC, the firmware on its PSP, and the hypervisor."""

    soc: Soc
    firmware: Firmware
    hv: Hypervisor

    @property
    def profile(self) -> CpuProfile:
        return self.soc.profile


class SeededRng:
    """A deterministic byte source (SHA-256 in counter mode) for reproducible runs and tests.

    Not a cryptographic RNG for real secrets: it stands in for the PSP's TRNG and the boot-time
    randomness of the SoC when a run must be repeatable.
    """

    def __init__(self, seed: bytes | str) -> None:
        self._key = seed.encode() if isinstance(seed, str) else bytes(seed)
        self._counter = 0
        self._pool = b""

    def __call__(self, n: int) -> bytes:
        while len(self._pool) < n:
            block = hashlib.sha256(self._key + self._counter.to_bytes(8, "little")).digest()
            self._pool += block
            self._counter += 1
        out, self._pool = self._pool[:n], self._pool[n:]
        return out


def build_machine(generation: str | CpuProfile = "milan", *, dram_size: int = 256 * GiB,
                  cores: int = 2, cache_size: int = 4 << 20, seed: bytes | str | None = None,
                  init: bool = True, es: bool = False) -> Machine:
    """Build a host of ``generation`` with its firmware loaded and (by default) INIT done."""
    prof = profile(generation) if isinstance(generation, str) else generation
    rng: Callable[[int], bytes] = SeededRng(seed) if seed is not None else os.urandom
    soc = Soc(prof, dram_size=dram_size, cores=cores, cache_size=cache_size, rng=rng)
    firmware = Firmware(soc.psp.take_ports())
    soc.psp.install(firmware)
    hv = Hypervisor(soc)
    if init:
        hv.platform_init(es=es)
    return Machine(soc, firmware, hv)
