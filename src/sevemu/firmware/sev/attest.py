"""ATTESTATION (0x36): the legacy attestation report, signed by the platform's PEK (SEV API 55766,
ATTESTATION; sev-tool ``src/sevapi.h``).

The report (:class:`~sevemu.abi.sev.LegacyAttestationReport`, 0xD0 bytes) carries the MNONCE the
caller put into the command buffer, the guest's launch digest as LAUNCH_MEASURE fixed it (all zeros
for a guest that was never measured, e.g. one received by migration), and the guest's policy.
``sig_usage`` and ``sig_algo`` are the PEK certificate's (PEK 0x1002, ECDSA_SHA256 2, as AMD's
firmware copies them), and ``sig1`` = ECDSA P-384 over SHA-256 (the algorithm's hash) of bytes
[0x00, 0x34) by the PEK (``fw.identity.pek_key``), r and s little-endian (72 bytes each).  An
unprovisioned part (no identity) answers HWERROR_PLATFORM.

Checks, as AMD's firmware makes them (AMD-ASPFW ``sev_mcmd.c: sev_mcmd_attestation``):

* unknown handle: INVALID_GUEST;
* guest state not one of LSECRET, RUNNING, SUPDATE, SENT: INVALID_GUEST_STATE (a guest in LUPDATE
  has no final launch digest; one in RUPDATE was never measured here);
* ``len`` below 0xD0 (or ``paddr`` 0, the model's length-query convention, as Linux
  ``sev_get_attestation_report`` uses it):
  INVALID_LENGTH with ``len`` = 0xD0 written back;
* report buffer outside DRAM: INVALID_ADDRESS.

On success ``len`` is set to 0xD0 in the command buffer.  The guest needs no ASID.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import AttestationCmd, LegacyAttestationReport
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.certs.sev import hash_for_algo
from sevemu.crypto.ecc import sign_le
from sevemu.firmware.checks import host_region
from sevemu.firmware.core import READY, Firmware, Reply
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.sev.api import SEV_API

__all__ = ["ATTESTATION_STATES", "REPORT_SIGNED_SIZE", "attestation"]

ATTESTATION_STATES: Final = frozenset({GuestState.LSECRET, GuestState.RUNNING, GuestState.SUPDATE,
                                       GuestState.SENT})
REPORT_SIGNED_SIZE: Final = LegacyAttestationReport.offset_of("sig_usage")
"""The PEK signs bytes [0x00, 0x34): mnonce, launch_digest, policy."""


@SEV_API.guest(CommandId.ATTESTATION, AttestationCmd, READY, ATTESTATION_STATES)
def attestation(fw: Firmware, cmd: AttestationCmd, g: GuestContext) -> AttestationCmd:
    size = LegacyAttestationReport.SIZE
    if cmd.paddr == 0 or cmd.len < size:
        raise Reply(Status.INVALID_LENGTH, replace(cmd, len=size))
    spa = host_region(fw, cmd.paddr, size)
    identity = fw.identity
    report = LegacyAttestationReport(
        mnonce=cmd.mnonce,
        launch_digest=g.measured_ld,
        policy=g.policy,
        sig_usage=int(identity.pek_cert.usage),
        sig_algo=int(identity.pek_cert.algo),
    )
    signature = sign_le(identity.pek_key, report.encode()[:REPORT_SIGNED_SIZE],
                        hash_for_algo(identity.pek_cert.algo))
    fw.ports.dma.write(spa, replace(report, sig1=signature).encode())
    return replace(cmd, len=size)
