"""Type stub of the optional C helper of :mod:`sevemu.crypto.transport` (``csrc/transport_accel.c``).

Every function raises ValueError on inconsistent lengths and take C-contiguous buffers.
"""

from _typeshed import ReadableBuffer, WriteableBuffer

def seal(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
         src: ReadableBuffer, dst: WriteableBuffer, macs: WriteableBuffer, size: int, /) -> None:
    """dst_i = AES-128-CTR(tek, iv_i)(src_i); mac_i = HMAC-SHA256(tik, aad_i || dst_i)."""

def open(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
         macs: ReadableBuffer, src: ReadableBuffer, dst: WriteableBuffer, size: int, /) -> int:
    """Verify each mac_i = HMAC-SHA256(tik, aad_i || src_i) in order, decrypting the packets that do;
    returns how many did before the first that did not."""

def seal_to_pages(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
                  src: ReadableBuffer, pages: dict[int, bytearray], pfns: ReadableBuffer,
                  macs: WriteableBuffer, /) -> None:
    """seal of 4 KiB packets, packet i's TRANS written into pages[pfns[i]] (a u64 PFN per packet;
    absent pages stored; TypeError, nothing stored, for a page not a 4096-byte bytearray)."""

def open_from_pages(tek: ReadableBuffer, tik: ReadableBuffer, ivs: ReadableBuffer, aads: ReadableBuffer,
                    macs: ReadableBuffer, pages: dict[int, bytearray], pfns: ReadableBuffer,
                    dst: WriteableBuffer, /) -> int:
    """open of 4 KiB packets, packet i's TRANS read from pages[pfns[i]] (absent: zeros); returns how
    many verified before the first that did not."""
