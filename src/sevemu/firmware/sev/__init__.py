"""The legacy SEV API (SEV API 55766, SEV-ES included): one module per group of commands.

Importing the package imports every command module, which registers its handlers in
:data:`SEV_API`; the composition root hands that table to the firmware (:mod:`sevemu.firmware.apis`).

===============  ===========================================================================
``platform``     INIT, INIT_EX, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH
``pki``          PLATFORM_RESET, PEK_GEN, PEK_CSR, PEK_CERT_IMPORT, PDH_GEN, PDH_CERT_EXPORT, GET_ID
``guest``        ACTIVATE, DEACTIVATE, DECOMMISSION, GUEST_STATUS; guest creation
``launch``       LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_SECRET, LAUNCH_FINISH
``es``           LAUNCH_UPDATE_VMSA; the VMSA set-up and check of SEND/RECEIVE_UPDATE_VMSA
``session``      the trusted channel (owner session, LAUNCH_SECRET packets)
``attest``       ATTESTATION
``debug``        DBG_DECRYPT, DBG_ENCRYPT
``migrate``      SEND_*, RECEIVE_*
``ring_buffer``  RING_BUFFER (ring-buffer mode of the mailbox: :mod:`sevemu.firmware.ring`)
===============  ===========================================================================
"""

from __future__ import annotations

from sevemu.firmware.sev import (  # noqa: F401 - registers
    attest,
    debug,
    es,
    guest,
    launch,
    migrate,
    pki,
    platform,
    ring_buffer,
)
from sevemu.firmware.sev.api import SEV_API

__all__ = ["SEV_API"]
