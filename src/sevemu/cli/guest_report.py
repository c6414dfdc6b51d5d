"""The host's check of a report an SNP guest obtained from its own code (the ``attest`` guest): the
report it printed on its console, verified with the owner's verifier against the emulated AMD's
chain -- the VCEK the KDS would issue for the chip named in CHIP_ID at REPORTED_TCB (looked up in the
emulated AMD's records, :func:`sevemu.scenario.amd_registry`, never read from the platform), the
ASK, the ARK pinned by its fingerprint, the CRL -- and REPORT_DATA the guest's.
"""

from __future__ import annotations

import re
from typing import Final

from sevemu.abi.report import REPORT_SIZE, AttestationReport
from sevemu.amd.snp import AmdSnpRoot
from sevemu.crypto.vcek import hwid
from sevemu.errors import InputError
from sevemu.owner.snpverify import Chain, SnpPolicy, Verified, verify_report
from sevemu.scenario import Machine, amd_registry, amd_vault_dir, default_amd_root

__all__ = ["ATTEST_REPORT_DATA", "guest_report", "verify_guest_report"]

ATTEST_REPORT_DATA: Final = b"sevemu attest guest: REPORT_DATA from guest code".ljust(64, b"\0")
"""The REPORT_DATA the ``attest`` guest binds into its report (``guest/images/attest.c``)."""
_LINE: Final = re.compile(r"^attest: report ([0-9a-f]+)$", re.MULTILINE)


def guest_report(console: str) -> bytes | None:
    """The report the guest printed (``attest: report <hex>``), or None."""
    found = _LINE.search(console)
    if found is None or len(found.group(1)) != 2 * REPORT_SIZE:
        return None
    return bytes.fromhex(found.group(1))


def verify_guest_report(machine: Machine, report: bytes, report_data: bytes = ATTEST_REPORT_DATA,
                        measurement: bytes | None = None) -> Verified:
    """Verify ``report`` as the relying party would (module docstring), with MEASUREMENT pinned to
    ``measurement`` (the owner's launch digest) when given; raises
    :class:`~sevemu.owner.snpverify.SnpCheckError` naming the failed check, or
    :class:`~sevemu.errors.InputError` when the emulated AMD never made the chip."""
    gen = machine.soc.profile.name
    rep = AttestationReport.decode(report)
    chip = amd_registry().chip(gen, hwid(gen, rep.chip_id))
    if chip is None:
        raise InputError(f"the emulated AMD has no {gen} chip with the report's CHIP_ID")
    vault = amd_vault_dir()
    root = AmdSnpRoot.for_root(machine.amd_root or default_amd_root(gen), None if vault is None else vault / gen / "snp")
    chain = Chain(root.issue_vcek(chip, rep.reported_tcb), root.ask, root.ark, root.crl())
    return verify_report(report, chain, trusted=[root.ark_fingerprint()],
                         policy=SnpPolicy(report_data=report_data, measurement=measurement,
                                                                 signing_key="vcek"))
