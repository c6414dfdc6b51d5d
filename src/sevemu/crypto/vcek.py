"""SEV-SNP signing keys: the VCEK and VLEK derivations, the SNP chip ID, and report signing.

Shared by the firmware (which signs attestation reports in SNP_GUEST_REQUEST / MSG_REPORT_REQ) and
the emulated AMD (which certifies the same public keys through its KDS), so both compute the same
key from the same inputs.  Facts from public sources:

* SNP ABI 56860 (ATTESTATION_REPORT): the report is signed with ECDSA P-384 over SHA-384 of bytes
  [0, 0x2A0); SIGNATURE.R at 0x2A0 and SIGNATURE.S at 0x2E8 are 72-byte little-endian integers
  (upper 24 bytes zero), bytes 0x330..0x49F reserved.  SIGNATURE_ALGO (0x34) = 1 names that
  algorithm.  Checked against real reports by go-sev-guest ``verify`` and virtee/sev ``certs``.
* AMD VCEK spec 57230: the VCEK is unique to a chip *and* its TCB (REPORTED_TCB selects it); the
  KDS certifies it for a hwid (the report's CHIP_ID, 64 bytes on Milan and Genoa, the first 8 on
  Turin) and the SPL values of that TCB.  Linux ``include/linux/psp-sev.h``
  (``sev_snp_tcb_version_genoa_milan`` / ``_turin``) gives the TCB byte layouts.
* The VLEK is a versioned signing key AMD issues to a cloud provider (CSP) instead of a
  per-chip one (SNP ABI SNP_VLEK_LOAD; signer_info SIGNING_KEY = 1).

How AMD's firmware derives these keys is not published.  The model's construction (a choice,
documented in ``docs/attestation.md``):

1. Per TCB component *c* of the generation's layout (Milan/Genoa: boot_loader, tee, snp,
   microcode; Turin: fmc, boot_loader, tee, snp, microcode) a 48-byte seed
   ``seed_c = HKDF-SHA-384(secret, salt="sevemu snp tcb seed v1", info=label || 0 || product || 0
   || c)``.
2. A hash chain per component: ``chain_c(v) = SHA-384^(255 - v)(seed_c)`` for its SVN ``v``.
   Whoever holds ``chain_c(v)`` can compute ``chain_c(v')`` for every ``v' <= v`` but nothing above:
   a firmware at TCB T can derive the key of any reported TCB at or below T component by component
   (SNP_CONFIG's REPORTED_TCB), and no older, vulnerable component can produce the key of a newer
   TCB -- the property that makes a TCB rollback visible to verifiers.
3. ``key = derive_private_key(chain_c1(v1) || ... || chain_cn(vn), label, P-384, product)`` with
   :func:`sevemu.crypto.ecc.derive_private_key` (HKDF-SHA-384, FIPS 186-5 A.2.1 reduction).

The VCEK's secret is the chip's fused secret (the one CEK and chip ID derive from), label
:data:`VCEK_LABEL`; the VLEK's is a CSP's secret AMD keeps, label :data:`VLEK_LABEL`.  Reserved TCB
bytes must be zero (an ill-formed TCB names no key).

SNP chip ID (:func:`snp_chip_id`): Milan and Genoa report the 64-byte chip ID that GET_ID returns
(:func:`sevemu.crypto.ecc.derive_chip_id`); Turin reports an 8-byte ID in CHIP_ID[0:8] with the other
56 bytes zero (as every real Turin report does).  The model takes Turin's 8 bytes as the first 8 of
the same 64-byte ID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu.abi.report import REPORT_SIGNED_SIZE, REPORT_SIZE
from sevemu.abi.snp import TcbVersion, TcbVersionTurin
from sevemu.crypto import ecc
from sevemu.errors import InputError, KeySizeError, LayoutError, VerificationError

__all__ = [
    "HWID_SIZE",
    "PRODUCTS",
    "SIGNATURE_ALGO_ECDSA_P384_SHA384",
    "SIG_OFFSET",
    "SNP_GENERATIONS",
    "VCEK_LABEL",
    "VLEK_LABEL",
    "derive_vcek",
    "derive_vlek",
    "hwid",
    "product_name",
    "sign_report",
    "snp_chip_id",
    "tcb_components",
    "verify_report_signature",
]

SNP_GENERATIONS: Final = ("milan", "genoa", "turin")
"""EPYC generations with SEV-SNP (names as in ``hw.profiles``)."""
PRODUCTS: Final = {"milan": "Milan", "genoa": "Genoa", "turin": "Turin"}
"""The KDS product name of each generation (AMD KDS URL grammar)."""
HWID_SIZE: Final = {"milan": 64, "genoa": 64, "turin": 8}
"""Bytes of the hwid the KDS indexes a chip by: the whole CHIP_ID, or its first 8 bytes on Turin."""

VCEK_LABEL: Final = b"sevemu versioned chip endorsement key"
VLEK_LABEL: Final = b"sevemu versioned loaded endorsement key"
SIGNATURE_ALGO_ECDSA_P384_SHA384: Final = 1
SIG_OFFSET: Final = 0x2A0
"""Where SIGNATURE.R starts (the end of the signed bytes); SIGNATURE.S follows at 0x2E8."""

_SEED_SALT: Final = b"sevemu snp tcb seed v1"
_SVN_MAX: Final = 255
_COMPONENTS: Final = {
    "milan": ("boot_loader", "tee", "snp", "microcode"),
    "genoa": ("boot_loader", "tee", "snp", "microcode"),
    "turin": ("fmc", "boot_loader", "tee", "snp", "microcode"),
}


def _check_generation(generation: str) -> str:
    gen = generation.strip().lower() if isinstance(generation, str) else ""
    if gen not in SNP_GENERATIONS:
        raise InputError(f"unknown SEV-SNP generation {generation!r}; expected one of {', '.join(SNP_GENERATIONS)}")
    return gen


def product_name(generation: str) -> str:
    """The KDS product name (``Milan``, ``Genoa``, ``Turin``) of ``generation``."""
    return PRODUCTS[_check_generation(generation)]


def tcb_components(generation: str, tcb: int) -> tuple[tuple[str, int], ...]:
    """(component, SVN) pairs of the TCB_VERSION ``tcb`` in ``generation``'s layout.

    Raises :class:`~sevemu.errors.LayoutError` when ``tcb`` does not fit 64 bits or sets a reserved
    byte of that layout.
    """
    gen = _check_generation(generation)
    layout_cls: type[TcbVersion | TcbVersionTurin] = TcbVersionTurin if gen == "turin" else TcbVersion
    decoded = layout_cls.from_int(tcb)
    return tuple((name, int(getattr(decoded, name))) for name in _COMPONENTS[gen])


def _chain_values(secret: bytes, label: bytes, gen: str, svns: Sequence[tuple[str, int]]) -> bytes:
    out = bytearray()
    for name, svn in svns:
        value = HKDF(
            algorithm=hashes.SHA384(), length=48, salt=_SEED_SALT,
            info=label + b"\x00" + gen.encode() + b"\x00" + name.encode(),
        ).derive(secret)
        for _ in range(_SVN_MAX - svn):
            value = hashlib.sha384(value).digest()
        out += value
    return bytes(out)


@lru_cache(maxsize=256)
def _derive(secret: bytes, label: bytes, generation: str, tcb: int) -> ec.EllipticCurvePrivateKey:
    if not isinstance(secret, bytes) or len(secret) < ecc.MIN_SECRET_SIZE:
        raise KeySizeError(f"a signing-key secret must be at least {ecc.MIN_SECRET_SIZE} bytes")
    gen = _check_generation(generation)
    svns = tcb_components(gen, tcb)
    ikm = _chain_values(secret, label, gen, svns)
    return ecc.derive_private_key(ikm, label, ecc.P384, PRODUCTS[gen].encode())


def derive_vcek(chip_secret: bytes, generation: str, tcb: int) -> ec.EllipticCurvePrivateKey:
    """The VCEK (P-384) of the chip whose fused secret is ``chip_secret``, at TCB_VERSION ``tcb``.

    Deterministic (the firmware and the emulated AMD get the same key); cached per input.
    """
    return _derive(bytes(chip_secret), VCEK_LABEL, generation, tcb)


def derive_vlek(csp_secret: bytes, generation: str, tcb: int) -> ec.EllipticCurvePrivateKey:
    """The VLEK (P-384) AMD issues to the CSP whose secret is ``csp_secret``, at ``tcb``."""
    return _derive(bytes(csp_secret), VLEK_LABEL, generation, tcb)


def snp_chip_id(chip_secret: bytes, generation: str) -> bytes:
    """The 64-byte CHIP_ID a chip of ``generation`` puts in its reports (module docstring)."""
    gen = _check_generation(generation)
    full = ecc.derive_chip_id(chip_secret)
    size = HWID_SIZE[gen]
    return full[:size] + bytes(64 - size)


def hwid(generation: str, chip_id: bytes) -> bytes:
    """The KDS hwid of a report's 64-byte CHIP_ID: all of it, or the first 8 bytes on Turin.

    Raises :class:`~sevemu.errors.InputError` if ``chip_id`` is not 64 bytes or, on Turin, bytes
    8..63 are not zero.
    """
    gen = _check_generation(generation)
    if len(chip_id) != 64:
        raise InputError(f"CHIP_ID must be 64 bytes, got {len(chip_id)}")
    size = HWID_SIZE[gen]
    if any(chip_id[size:]):
        raise InputError(f"a {PRODUCTS[gen]} CHIP_ID has only {size} significant bytes; the rest must be zero")
    return bytes(chip_id[:size])


def _check_report(report: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(report, (bytes, bytearray, memoryview)):
        raise LayoutError(f"an attestation report is bytes, not {type(report).__name__}")
    data = bytes(report)
    if len(data) != REPORT_SIZE:
        raise LayoutError(f"an attestation report is {REPORT_SIZE:#x} bytes, got {len(data):#x}")
    algo = int.from_bytes(data[0x34:0x38], "little")
    if algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise LayoutError(f"report SIGNATURE_ALGO {algo} is not ECDSA P-384 with SHA-384 (1)")
    return data


def sign_report(key: ec.EllipticCurvePrivateKey, report: bytes | bytearray | memoryview) -> bytes:
    """``report`` (0x4A0 bytes, SIGNATURE_ALGO 1) with its SIGNATURE field set by ``key``.

    ECDSA P-384 / SHA-384 over bytes [0, 0x2A0); R and S written little-endian into 72-byte fields at
    0x2A0 and 0x2E8, the rest of the signature area zeroed.  The firmware fills every other field
    (SIGNER_INFO included) before it calls this.
    """
    data = _check_report(report)
    if not isinstance(key.curve, ec.SECP384R1):
        raise InputError(f"reports are signed with a P-384 key, not {key.curve.name}")
    sig = ecc.sign_le(key, data[:REPORT_SIGNED_SIZE], hashes.SHA384())
    return data[:SIG_OFFSET] + sig + bytes(REPORT_SIZE - SIG_OFFSET - len(sig))


def verify_report_signature(public_key: ec.EllipticCurvePublicKey, report: bytes | bytearray | memoryview) -> None:
    """Check the report's ECDSA P-384 signature; :class:`~sevemu.errors.VerificationError` if wrong.

    A malformed report (size, algorithm) raises :class:`~sevemu.errors.LayoutError`.
    """
    data = _check_report(report)
    if not isinstance(public_key.curve, ec.SECP384R1):
        raise VerificationError(f"report signing keys are P-384, this one is {public_key.curve.name}")
    ecc.verify_le(public_key, data[:REPORT_SIGNED_SIZE], data[SIG_OFFSET:SIG_OFFSET + ecc.SIGNATURE_SIZE],
                  hashes.SHA384())
