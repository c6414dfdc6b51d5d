"""The command APIs this firmware runs, chosen explicitly by the composition root.

One firmware, several APIs over the same dispatcher, NV store and identity (:mod:`sevemu.firmware.core`):
the legacy SEV API (:data:`sevemu.firmware.sev.SEV_API`, SEV-ES included) and the SEV-SNP API
(:data:`sevemu.firmware.snp.SNP_API`, SNP ABI 56860).
"""

from __future__ import annotations

import os
from typing import Final

from sevemu.firmware.core import CommandTable, Firmware
from sevemu.firmware.sev import SEV_API
from sevemu.firmware.snp import SNP_API
from sevemu.hw.psp import PspPorts

__all__ = ["APIS", "load_firmware"]

APIS: Final[tuple[CommandTable, ...]] = (SEV_API, SNP_API)


def load_firmware(ports: PspPorts, platform_dir: str | os.PathLike[str] | None = None) -> Firmware:
    """The firmware with every API of :data:`APIS`, booted from ``platform_dir`` (None: an
    unprovisioned part)."""
    return Firmware(ports, platform_dir, apis=APIS)
