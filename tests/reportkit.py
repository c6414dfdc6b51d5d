"""Helpers for SNP attestation tests: emulated chips and reports signed as their firmware would."""

from __future__ import annotations

import hashlib

from sevemu.abi.report import AttestationReport, SignerInfo
from sevemu.abi.snp import SnpPolicy as GuestPolicy
from sevemu.amd.chip import FusedChip
from sevemu.crypto import vcek

CHIP = {g: FusedChip(g, hashlib.sha512(g.encode()).digest()) for g in ("milan", "genoa", "turin")}
CPUID = {"milan": (0x19, 0x01, 1), "genoa": (0x19, 0x11, 1), "turin": (0x1A, 0x02, 1)}


def make_report(generation: str, tcb: int, *, key: str = "vcek", secret: bytes | None = None,
                **fields: object) -> bytes:
    """An attestation report as a firmware of ``generation`` would sign it (test helper)."""
    fam, mod, step = CPUID[generation]
    chip = CHIP[generation]
    values: dict[str, object] = {
        "version": 5 if generation == "turin" else 3, "guest_svn": 1, "policy": GuestPolicy(smt=True),
        "vmpl": 0, "signature_algo": 1, "current_tcb": tcb, "platform_info": 0x1,
        "signer_info": SignerInfo(signing_key=0 if key == "vcek" else 1),
        "report_data": b"\x11" * 64, "measurement": b"\x22" * 48, "host_data": b"\x33" * 32, "id_key_digest": b"\x44" * 48,
        "author_key_digest": bytes(48), "report_id": b"\x55" * 32, "report_id_ma": b"\xff" * 32, "reported_tcb": tcb,
        "cpuid_fam_id": fam, "cpuid_mod_id": mod, "cpuid_step": step,
        "chip_id": vcek.snp_chip_id(chip.secret, generation) if key == "vcek" else bytes(64),
        "committed_tcb": tcb, "current_build": 4, "current_minor": 55, "current_major": 1, "committed_build": 4,
        "committed_minor": 55, "committed_major": 1, "launch_tcb": tcb,
        "launch_mit_vector": 0 if generation == "turin" else None, "current_mit_vector": 0 if generation == "turin" else None,
    }
    values.update(fields)
    body = AttestationReport(**values).encode()  # type: ignore[arg-type]
    signer = vcek.derive_vcek(chip.secret, generation, tcb) if key == "vcek" else \
        vcek.derive_vlek(secret or bytes(48), generation, tcb)
    return vcek.sign_report(signer, body)
