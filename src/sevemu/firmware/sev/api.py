"""The legacy SEV API's command table (SEV API 55766; SEV-ES commands included).

Every command module of this package registers its handlers here; :mod:`sevemu.firmware.sev`
imports them all, and :mod:`sevemu.firmware.apis` hands the table to the firmware.
"""

from __future__ import annotations

from typing import Final

from sevemu.firmware.core import CommandTable

__all__ = ["SEV_API"]

SEV_API: Final = CommandTable("SEV")
