"""Legacy SEV guest policy, 32 bits (SEV API spec 55766 "Guest Policy"; Linux
``include/linux/psp-sev.h`` ``SEV_POLICY_*``).

Bits 5:0 are flags, bits 15:6 reserved, bits 23:16 the minimum firmware API_MAJOR and bits 31:24 the
minimum API_MINOR the guest may be sent to (Linux ``SEV_POLICY_MASK_*``, sev-tool ``SEV_POLICY``).
virtee/sev reads the API field as two nibbles of the upper half; that disagrees with both sources
and is not followed.  The SNP policy (64-bit, SNP ABI 56860) is a different layout: :class:`sevemu.abi.snp.SnpPolicy`.
"""

from __future__ import annotations

from enum import IntFlag
from typing import Final

from sevemu.errors import LayoutError

__all__ = [
    "POLICY_API_MAJOR_SHIFT",
    "POLICY_API_MINOR_SHIFT",
    "POLICY_DEBUG",
    "POLICY_MAX",
    "POLICY_MIN",
    "POLICY_NORM",
    "POLICY_RESERVED_MASK",
    "GuestPolicy",
    "api_major",
    "api_minor",
    "check_policy",
    "compose_policy",
]


class GuestPolicy(IntFlag):
    """The flag bits of a legacy guest policy."""

    NODBG = 1 << 0  # DBG_DECRYPT / DBG_ENCRYPT forbidden
    NOKS = 1 << 1  # key sharing (LAUNCH_START with an existing handle) forbidden
    ES = 1 << 2  # SEV-ES required
    NOSEND = 1 << 3  # SEND_* forbidden
    DOMAIN = 1 << 4  # send only to a platform with the same OCA
    SEV = 1 << 5  # send only to an AMD-certified SEV platform


POLICY_RESERVED_MASK: Final = 0x0000_FFC0  # bits 15:6
POLICY_API_MAJOR_SHIFT: Final = 16
POLICY_API_MINOR_SHIFT: Final = 24

# sev-tool's named policies: maximally / minimally restrictive, and the recommended ones.
POLICY_MAX: Final = GuestPolicy.NODBG | GuestPolicy.NOKS | GuestPolicy.ES | GuestPolicy.NOSEND
POLICY_MIN: Final = GuestPolicy(0)
POLICY_NORM: Final = (
    GuestPolicy.NODBG | GuestPolicy.NOKS | GuestPolicy.ES | GuestPolicy.DOMAIN | GuestPolicy.SEV
)
POLICY_DEBUG: Final = GuestPolicy.NOKS | GuestPolicy.DOMAIN | GuestPolicy.SEV


def api_major(policy: int) -> int:
    """The minimum API major version (bits 23:16)."""
    return (policy >> POLICY_API_MAJOR_SHIFT) & 0xFF


def api_minor(policy: int) -> int:
    """The minimum API minor version (bits 31:24)."""
    return (policy >> POLICY_API_MINOR_SHIFT) & 0xFF


def compose_policy(flags: int = 0, api_major: int = 0, api_minor: int = 0) -> int:
    """A 32-bit policy from flag bits and a minimum API version; rejects what does not fit."""
    if not 0 <= api_major <= 0xFF or not 0 <= api_minor <= 0xFF:
        raise LayoutError(f"policy API version {api_major}.{api_minor} does not fit 8+8 bits")
    if flags < 0 or flags & ~0x3F:
        raise LayoutError(f"policy flags {flags:#x} use bits outside 5:0")
    return int(flags) | api_major << POLICY_API_MAJOR_SHIFT | api_minor << POLICY_API_MINOR_SHIFT


def check_policy(policy: int) -> int:
    """Return ``policy`` if it is a valid 32-bit policy; reserved bits 15:6 set raise LayoutError."""
    if not 0 <= policy <= 0xFFFF_FFFF:
        raise LayoutError(f"policy {policy:#x} does not fit 32 bits")
    if policy & POLICY_RESERVED_MASK:
        raise LayoutError(f"policy {policy:#010x} sets reserved bits 15:6")
    return policy
