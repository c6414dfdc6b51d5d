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

**The wrapped VLEK hashstick** (SNP_VLEK_LOAD).  AMD's firmware (AMD-ASPFW ``sev_mcmd.c``
``snp_mcmd_vlek_load``, ``sev_rmp.h`` ``vlek_wrapped_t``) takes 0x1B0 bytes: IV (12), reserved (4),
eight 48-byte hashsticks encrypted with AES-256-GCM (0x180), TCB_VERSION (8), reserved (8), tag (16);
the additional data is TCB_VERSION and the reserved 8 bytes; the key is its SP 800-108 KDF
(HMAC-SHA-256, little-endian counter and length: :func:`sevemu.crypto.kdf.kdf`) of the chip's VCEK
hash with label ``vlek-wrapping-key`` and no context.  The model follows that format and KDF; what
AMD does not publish is chosen (``docs/attestation.md``):

* the VCEK hash is the 48-byte big-endian private scalar of the VCEK of the hashstick's TCB (the
  value :func:`derive_vcek` gives; the firmware refuses a TCB other than REPORTED_TCB, so that is
  the VCEK it signs with) -- :func:`vlek_wrapping_key`;
* the eight hashsticks are indexed by TCB_VERSION byte: slot *i* holds the chain value (step 2
  above, label :data:`VLEK_LABEL`) of the component at byte *i* of the layout, reserved bytes' slots
  are zero (:func:`vlek_hashsticks`); the VLEK is step 3 over the components' slots in layout
  order (:func:`vlek_from_hashsticks`), so a loaded hashstick gives exactly the key
  :func:`derive_vlek` certifies.

SNP chip ID (:func:`snp_chip_id`): Milan and Genoa report the 64-byte chip ID that GET_ID returns
(:func:`sevemu.crypto.ecc.derive_chip_id`); Turin reports an 8-byte ID in CHIP_ID[0:8] with the other
56 bytes zero (as every real Turin report does).  The model takes Turin's 8 bytes as the first 8 of
the same 64-byte ID.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu.abi.report import REPORT_SIGNED_SIZE, REPORT_SIZE
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE, TcbVersion, TcbVersionTurin, WrappedVlekHashstick
from sevemu.abi.struct import layout_fields
from sevemu.crypto import ecc, kdf
from sevemu.errors import InputError, KeySizeError, LayoutError, VerificationError

__all__ = [
    "HWID_SIZE",
    "PRODUCTS",
    "SIGNATURE_ALGO_ECDSA_P384_SHA384",
    "SIG_OFFSET",
    "SNP_GENERATIONS",
    "VCEK_LABEL",
    "VLEK_HASHSTICKS_SIZE",
    "VLEK_LABEL",
    "VLEK_WRAP_LABEL",
    "derive_vcek",
    "derive_vlek",
    "hwid",
    "product_name",
    "sign_report",
    "snp_chip_id",
    "tcb_components",
    "unwrap_vlek_hashstick",
    "verify_report_signature",
    "vlek_from_hashsticks",
    "vlek_hashsticks",
    "vlek_wrapping_key",
    "wrap_vlek_hashstick",
]

SNP_GENERATIONS: Final = ("milan", "genoa", "turin")
"""EPYC generations with SEV-SNP (names as in ``hw.profiles``)."""
PRODUCTS: Final = {"milan": "Milan", "genoa": "Genoa", "turin": "Turin"}
"""The KDS product name of each generation (AMD KDS URL grammar)."""
HWID_SIZE: Final = {"milan": 64, "genoa": 64, "turin": 8}
"""Bytes of the hwid the KDS indexes a chip by: the whole CHIP_ID, or its first 8 bytes on Turin."""

VCEK_LABEL: Final = b"sevemu versioned chip endorsement key"
VLEK_LABEL: Final = b"sevemu versioned loaded endorsement key"
VLEK_WRAP_LABEL: Final = b"vlek-wrapping-key"
"""The KDF label of the hashstick wrapping key (AMD-ASPFW ``VLEK_WK_KDF_LABEL``)."""
VLEK_HASHSTICKS_SIZE: Final = 0x180
"""Eight 48-byte hashsticks, one per TCB_VERSION byte (AMD-ASPFW ``vlek_wrapped_t.vlek_wrapped``)."""
_STICK: Final = 48
_WRAP_AAD: Final = slice(0x190, 0x1A0)
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


def _component_offsets(gen: str) -> tuple[int, ...]:
    """TCB_VERSION byte of each component of ``gen``'s layout, in :data:`_COMPONENTS` order."""
    layout_cls: type[TcbVersion | TcbVersionTurin] = TcbVersionTurin if gen == "turin" else TcbVersion
    where = {f.name: f.offset for f in layout_fields(layout_cls)}
    return tuple(where[name] for name in _COMPONENTS[gen])


def vlek_hashsticks(csp_secret: bytes, generation: str, tcb: int) -> bytes:
    """The 0x180 bytes of VLEK hashsticks of the CSP whose secret is ``csp_secret`` at ``tcb``
    (module docstring: slot *i* = the chain value of the component at TCB byte *i*)."""
    gen = _check_generation(generation)
    if not isinstance(csp_secret, bytes) or len(csp_secret) < ecc.MIN_SECRET_SIZE:
        raise KeySizeError(f"a signing-key secret must be at least {ecc.MIN_SECRET_SIZE} bytes")
    values = _chain_values(bytes(csp_secret), VLEK_LABEL, gen, tcb_components(gen, tcb))
    out = bytearray(VLEK_HASHSTICKS_SIZE)
    for i, offset in enumerate(_component_offsets(gen)):
        out[offset * _STICK:(offset + 1) * _STICK] = values[i * _STICK:(i + 1) * _STICK]
    return bytes(out)


def vlek_from_hashsticks(sticks: bytes, generation: str) -> ec.EllipticCurvePrivateKey:
    """The VLEK the hashsticks ``sticks`` (0x180 bytes) stand for: equal to :func:`derive_vlek` of
    the secret and TCB :func:`vlek_hashsticks` made them from."""
    gen = _check_generation(generation)
    if len(sticks) != VLEK_HASHSTICKS_SIZE:
        raise InputError(f"VLEK hashsticks are {VLEK_HASHSTICKS_SIZE:#x} bytes, got {len(sticks):#x}")
    ikm = b"".join(sticks[o * _STICK:(o + 1) * _STICK] for o in _component_offsets(gen))
    return ecc.derive_private_key(ikm, VLEK_LABEL, ecc.P384, PRODUCTS[gen].encode())


def vlek_wrapping_key(chip_secret: bytes, generation: str, tcb: int) -> bytes:
    """The AES-256-GCM key that wraps VLEK hashsticks for the chip at ``tcb`` (module docstring)."""
    scalar = derive_vcek(chip_secret, generation, tcb).private_numbers().private_value.to_bytes(48, "big")
    return kdf.kdf(scalar, VLEK_WRAP_LABEL, b"", 32)


def wrap_vlek_hashstick(chip_secret: bytes, generation: str, tcb: int, sticks: bytes, *,
                        iv: bytes | None = None) -> bytes:
    """The 0x1B0-byte wrapped hashstick of ``sticks`` for the chip whose secret is ``chip_secret``,
    bound to ``tcb`` (what AMD hands a CSP for one chip; module docstring)."""
    if len(sticks) != VLEK_HASHSTICKS_SIZE:
        raise InputError(f"VLEK hashsticks are {VLEK_HASHSTICKS_SIZE:#x} bytes, got {len(sticks):#x}")
    nonce = os.urandom(12) if iv is None else bytes(iv)
    if len(nonce) != 12:
        raise InputError(f"the hashstick IV is 12 bytes, got {len(nonce)}")
    aad = tcb.to_bytes(8, "little") + bytes(8)
    sealed = AESGCM(vlek_wrapping_key(chip_secret, generation, tcb)).encrypt(nonce, bytes(sticks), aad)
    out = WrappedVlekHashstick(iv=nonce, vlek_wrapped=sealed[:-16], tcb_version=tcb, auth_tag=sealed[-16:]).encode()
    assert len(out) == SNP_VLEK_HASHSTICK_SIZE
    return out


def unwrap_vlek_hashstick(chip_secret: bytes, generation: str, wrapped: bytes) -> bytes:
    """The 0x180 bytes of hashsticks in ``wrapped`` (0x1B0 bytes) for this chip.

    Raises :class:`~sevemu.errors.LayoutError` for a blob of the wrong size and
    :class:`~sevemu.errors.VerificationError` when it does not authenticate under this chip's key for
    its TCB_VERSION (another chip's, or tampered with).
    """
    if len(wrapped) != SNP_VLEK_HASHSTICK_SIZE:
        raise LayoutError(f"a wrapped VLEK hashstick is {SNP_VLEK_HASHSTICK_SIZE} bytes, got {len(wrapped)}")
    blob = WrappedVlekHashstick.decode(bytes(wrapped))
    key = vlek_wrapping_key(chip_secret, generation, blob.tcb_version)
    try:
        return AESGCM(key).decrypt(blob.iv, blob.vlek_wrapped + blob.auth_tag, bytes(wrapped[_WRAP_AAD]))
    except InvalidTag:
        raise VerificationError("the VLEK hashstick does not authenticate under this chip's wrapping key "
                                "(another chip's, or altered)") from None


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
