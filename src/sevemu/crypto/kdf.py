"""NIST SP800-108 key derivation in counter mode, as the SEV API uses it (SEV API 55766, key derivation appendix;
SP 800-108).

The PRF is HMAC-SHA256 keyed with the input key (h = 256 bits) and the counter is r = 32 bits.
Block ``i`` (from 1) is::

    K(i) = HMAC-SHA256(K_in, le32(i) || label || 0x00 || context || le32(L))

where ``L`` is the requested output length in *bits*.  The blocks are concatenated and truncated
to ``L`` bits.  SP800-108 leaves the encoding of ``i`` and ``L`` to the user; the SEV API (as AMD's
sev-tool and virtee/sev implement it) writes both as **little-endian** 32-bit integers, so the
output differs from an SP800-108 KDF with the more common big-endian encoding.

The firmware uses this KDF to turn the ECDH shared secret of a session into the master secret and
then into the key-wrapping keys (see :mod:`sevemu.crypto.transport`).
"""

from __future__ import annotations

import hashlib
import hmac

from sevemu.errors import InputError

__all__ = ["MAX_OUTPUT_BYTES", "PRF_OUTPUT_BYTES", "kdf"]

PRF_OUTPUT_BYTES = 32
"""h / 8: HMAC-SHA256 produces 32 bytes per counter block."""

MAX_OUTPUT_BYTES = (2**32 - 1) // 8
"""Largest output whose bit length still fits the 32-bit ``L`` field."""


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """Derive ``length`` bytes from ``key`` with the SEV SP800-108 counter-mode KDF.

    ``label`` and ``context`` are the fixed-input fields; either may be empty.  The separator byte
    0x00 between them is always present.  Raises :class:`~sevemu.errors.InputError` for an empty
    key or a length that is not positive or does not fit the 32-bit bit-length field.
    """
    if not key:
        raise InputError("KDF input key must not be empty")
    if length <= 0 or length > MAX_OUTPUT_BYTES:
        raise InputError(f"KDF output length must be 1..{MAX_OUTPUT_BYTES} bytes, got {length}")
    fixed_input = bytes(label) + b"\x00" + bytes(context) + (8 * length).to_bytes(4, "little")
    blocks = (length + PRF_OUTPUT_BYTES - 1) // PRF_OUTPUT_BYTES
    out = bytearray()
    for i in range(1, blocks + 1):
        out += hmac.new(key, i.to_bytes(4, "little") + fixed_input, hashlib.sha256).digest()
    return bytes(out[:length])
