"""Owner launch sessions (GODH certificate + session blob at LAUNCH_START, reference 1.9).

Not wired yet: the certificate codec and the PDH key are part of the SEV API completion.  Until
then a LAUNCH_START that carries a session is refused with UNSUPPORTED rather than silently
ignoring the owner's keys.
"""

from __future__ import annotations

from sevemu.abi.sev import LaunchStartCmd
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError
from sevemu.firmware.dispatcher import Firmware


def open_launch_session(fw: Firmware, cmd: LaunchStartCmd) -> tuple[bytes, bytes]:
    """(TEK, TIK) from the owner's session; refused until owner sessions are supported."""
    raise FirmwareError(Status.UNSUPPORTED, "owner launch sessions are not supported yet")
