"""Legacy SEV certificate layouts: the 0x824-byte SEV certificate and the AMD ARK/ASK header.

Sources: ``sev_cert``: SEV API spec 55766 appendix "Certificates", AMD sev-tool
``sevapi.h``, virtee/sev ``certs/sev/sev/cert/v1``) and section 1.8 (``amd_cert``: the AMD root /
signing key certificate).  Layouts only: building, parsing into typed values and verifying live in
:mod:`sevemu.certs`.

The SEV certificate holds two unions, kept here as raw fields of the outer layout and given their
own layouts so that :mod:`sevemu.certs.sev` can decode them once it knows, from the algorithm code,
which member applies:

* ``pub_key`` (0x404 bytes): :class:`SevRsaPubKey` for ``RSA_*`` algorithms, :class:`SevEcPubKey`
  for ``ECDSA_*`` and ``ECDH_*``;
* ``sig1`` / ``sig2`` (0x200 bytes each): :class:`SevRsaSig` or :class:`SevEcdsaSig`.

The AMD ARK/ASK certificate is variable-length: a fixed 0x40-byte :class:`AmdCertHeader` followed by
the public exponent, the modulus and the signature, whose widths come from the header.
"""

from __future__ import annotations

from enum import IntEnum

from sevemu.abi.struct import Struct, layout, raw, u8, u32

__all__ = [
    "AMD_CERT_HEADER_SIZE",
    "AMD_CERT_VERSION",
    "SEV_CERT_CHAIN_SIZE",
    "SEV_CERT_SIGNED_SIZE",
    "SEV_CERT_SIZE",
    "SEV_CERT_VERSION",
    "SEV_ECC_COORD_SIZE",
    "SEV_PUBKEY_SIZE",
    "SEV_RSA_MAX_BYTES",
    "SEV_SIG_SIZE",
    "AmdCertHeader",
    "EcCurve",
    "KeyUsage",
    "SevCertLayout",
    "SevEcPubKey",
    "SevEcdsaSig",
    "SevRsaPubKey",
    "SevRsaSig",
    "SigAlgo",
]


class KeyUsage(IntEnum):
    """Key usage codes (u32) of SEV and AMD certificates (SEV API 55766 appendix "Certificates"; sev-tool ``SEV_USAGE``)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    """Marks an empty signature slot of a SEV certificate."""
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class SigAlgo(IntEnum):
    """Public-key / signature algorithm codes (u32) of SEV certificates (SEV API 55766 appendix
    "Certificates"; sev-tool ``src/sevcert.cpp``)."""

    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103


class EcCurve(IntEnum):
    """``curve`` field of the ECDSA/ECDH public key union (SEV API 55766 appendix "Certificates")."""

    P256 = 1
    P384 = 2


SEV_CERT_SIZE = 0x824
SEV_CERT_SIGNED_SIZE = 0x414
"""Signed region: bytes [0x000, 0x414) = version .. pub_key (sev-tool ``src/sevcert.cpp``)."""
SEV_CERT_VERSION = 1
SEV_CERT_CHAIN_SIZE = 3 * SEV_CERT_SIZE
"""PDH_CERT_EXPORT ``cert_chain`` buffer: PEK || OCA || CEK."""
SEV_PUBKEY_SIZE = 0x404
SEV_SIG_SIZE = 0x200
SEV_ECC_COORD_SIZE = 72
"""Width of every ECC scalar / coordinate field (qx, qy, r, s): 576 bits, little-endian, zero-padded."""
SEV_RSA_MAX_BYTES = 0x200
"""Width of RSA fields in the SEV certificate unions: up to 4096-bit keys."""


@layout(size=SEV_CERT_SIZE)
class SevCertLayout(Struct):
    """``sev_cert`` (0x824 bytes); bytes 0x006..0x007 are reserved."""

    version: int = u32(0x000)
    api_major: int = u8(0x004)
    api_minor: int = u8(0x005)
    pub_key_usage: int = u32(0x008)
    pub_key_algo: int = u32(0x00C)
    pub_key: bytes = raw(0x010, SEV_PUBKEY_SIZE)
    sig1_usage: int = u32(0x414)
    sig1_algo: int = u32(0x418)
    sig1: bytes = raw(0x41C, SEV_SIG_SIZE)
    sig2_usage: int = u32(0x61C)
    sig2_algo: int = u32(0x620)
    sig2: bytes = raw(0x624, SEV_SIG_SIZE)


@layout(size=SEV_PUBKEY_SIZE)
class SevRsaPubKey(Struct):
    """RSA member of the ``pub_key`` union: sizes in bits, exponent and modulus little-endian."""

    modulus_size: int = u32(0x000)
    pub_exp: bytes = raw(0x004, SEV_RSA_MAX_BYTES)
    modulus: bytes = raw(0x204, SEV_RSA_MAX_BYTES)


@layout(size=SEV_PUBKEY_SIZE)
class SevEcPubKey(Struct):
    """ECDSA/ECDH member of the ``pub_key`` union; bytes 0x94..0x403 must be zero."""

    curve: int = u32(0x000)
    qx: bytes = raw(0x004, SEV_ECC_COORD_SIZE)
    qy: bytes = raw(0x04C, SEV_ECC_COORD_SIZE)


@layout(size=SEV_SIG_SIZE)
class SevRsaSig(Struct):
    """RSA member of the signature union: the signature, little-endian, in the low bytes."""

    s: bytes = raw(0x000, SEV_RSA_MAX_BYTES)


@layout(size=SEV_SIG_SIZE)
class SevEcdsaSig(Struct):
    """ECDSA member of the signature union; bytes 0x90..0x1FF must be zero."""

    r: bytes = raw(0x000, SEV_ECC_COORD_SIZE)
    s: bytes = raw(0x048, SEV_ECC_COORD_SIZE)


AMD_CERT_HEADER_SIZE = 0x40
AMD_CERT_VERSION = 1


@layout(size=AMD_CERT_HEADER_SIZE)
class AmdCertHeader(Struct):
    """Fixed part of ``amd_cert`` (SEV API 55766 appendix, AMD root / signing key; sev-tool
    ``src/amdcert.cpp``); bytes 0x28..0x37 are reserved.

    It is followed by ``pub_exp`` (``pub_exp_size`` / 8 bytes), ``modulus`` (``modulus_size`` / 8)
    and ``sig`` (``modulus_size`` / 8), all little-endian.
    """

    version: int = u32(0x00)
    key_id: bytes = raw(0x04, 16)
    certifying_id: bytes = raw(0x14, 16)
    key_usage: int = u32(0x24)
    pub_exp_size: int = u32(0x38)
    modulus_size: int = u32(0x3C)
