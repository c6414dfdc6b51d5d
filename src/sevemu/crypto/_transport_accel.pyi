"""Type stub of the optional C helper of :mod:`sevemu.crypto.transport` (``csrc/transport_accel.c``).

Both functions raise ValueError on inconsistent lengths and take C-contiguous buffers.
"""

from _typeshed import ReadableBuffer, WriteableBuffer

def seal(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
         src: ReadableBuffer, dst: WriteableBuffer, macs: WriteableBuffer, size: int, /) -> None:
    """dst_i = AES-128-CTR(tek, iv_i)(src_i); mac_i = HMAC-SHA256(tik, aad_i || dst_i)."""

def open(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
         macs: ReadableBuffer, src: ReadableBuffer, dst: WriteableBuffer, size: int, /) -> int:
    """Verify each mac_i = HMAC-SHA256(tik, aad_i || src_i) in order, decrypting the packets that do;
    returns how many did before the first that did not."""
