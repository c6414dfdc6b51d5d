"""The SNP API's command table (the registry entries of :mod:`sevemu.firmware.snp`'s modules)."""

from __future__ import annotations

from typing import Final

from sevemu.firmware.core import CommandTable

__all__ = ["SNP_API"]

SNP_API: Final = CommandTable("SNP")
