"""The SEV-ES VMSA checksum: what the firmware stores in the TMR and the CPU checks at VMRUN.

Sources: APM2 15.35 (VMRUN checks the integrity of an SEV-ES guest's saved state, #VMEXIT saves
it); AMD's firmware source, AMD-ASPFW ``crc.c`` (``crc64_vmsa``) and ``sev_es.c``
(``sev_es_setup_vmsa``: ``VMSA_CRC_SIZE`` "must match uCode").  Both sides of the checksum live
here -- the firmware (:mod:`sevemu.firmware.tmr`) sets a page up, the CPU (:mod:`sevemu.hw.vmsa`)
checks it at VMRUN and stores a new one at #VMEXIT -- because neither may import the other.

The checksum is three CRC-32Cs over interleaved 8-byte lanes of the first 0xFC0 bytes, then a
CRC-32C over the three results (:func:`crc64_vmsa`).  CRC-32C is affine over GF(2): the CRC of a
fixed-length message is a constant XOR one table entry per byte position.  :class:`VmsaCrc` keeps
those tables, so the CPU computes a page's checksum with one gather and, at #VMEXIT, updates it
from the bytes that changed only -- the same value as :func:`crc64_vmsa`, held to it by tests.
"""

from __future__ import annotations

import struct
from typing import Final

import numpy as np

__all__ = [
    "VMSA_CRC_PADDR",
    "VMSA_CRC_SIZE",
    "VMSA_CRC_ZEROS",
    "VmsaCrc",
    "crc32c",
    "crc64_vmsa",
    "seal_vmsa",
    "vmsa_crc_paddr",
]

VMSA_CRC_ZEROS: Final = 0x380
"""VMSA offset the firmware zeroes (8 bytes) when it sets a page up (AF ``vmcb_save_area_t.zeros``)."""
VMSA_CRC_PADDR: Final = 0x388
"""VMSA offset of the checksum block's SPA (AF ``vmcb_save_area_t.crc_paddr``)."""
VMSA_CRC_SIZE: Final = 0xFC0
"""Bytes of the VMSA the checksum covers (AF ``VMSA_CRC_SIZE``: "must match uCode")."""

_CRC32C_REFLECTED: Final = 0x82F63B78  # the Castagnoli polynomial 0x1EDC6F41, bit-reflected
_LANES: Final = 3
_LANE: Final = 8
_STRIDE: Final = _LANES * _LANE
_LANE_BYTES: Final = VMSA_CRC_SIZE // _LANES


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (_CRC32C_REFLECTED if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_TABLE: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli; the SSE4.2 CRC32 instruction's): reflected, initial value and final
    XOR 0xFFFFFFFF.  ``crc`` continues an earlier result."""
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _combine(crcs: tuple[int, int, int] | list[int]) -> int:
    combined = crc32c(struct.pack("<3I", *crcs))
    return (crcs[0] ^ crcs[1] ^ crcs[2]) << 32 | combined


def crc64_vmsa(page: bytes | bytearray) -> int:
    """The VMSA checksum (AF ``crc64_vmsa`` over the first :data:`VMSA_CRC_SIZE` bytes).

    Three CRC-32Cs over interleaved 8-byte lanes -- bytes 0-7, 24-31, ... ; 8-15, 32-39, ... ;
    16-23, 40-47, ... (a remainder shorter than 24 bytes would go to the third; 0xFC0 has none) --
    then a CRC-32C over the three results (little-endian u32s).  The checksum is
    ``(crc0 ^ crc1 ^ crc2) << 32 | combined``.
    """
    data = bytes(page[:VMSA_CRC_SIZE])
    if len(data) != VMSA_CRC_SIZE:
        raise ValueError(f"a VMSA checksum needs {VMSA_CRC_SIZE:#x} bytes, got {len(data):#x}")
    lanes = [b"".join(data[i + k * _LANE : i + (k + 1) * _LANE] for i in range(0, len(data), _STRIDE))
             for k in range(_LANES)]
    return _combine([crc32c(lane) for lane in lanes])


def vmsa_crc_paddr(page: bytes | bytearray) -> int:
    """The checksum block's SPA a set-up VMSA names (0 for a page never set up)."""
    return int.from_bytes(page[VMSA_CRC_PADDR : VMSA_CRC_PADDR + 8], "little")


def seal_vmsa(page: bytes, crc_paddr: int) -> tuple[bytes, int]:
    """A VMSA page as the firmware sets it up for checksum block ``crc_paddr`` (AF
    ``sev_es_setup_vmsa``), and its checksum."""
    out = bytearray(page)
    out[VMSA_CRC_ZEROS : VMSA_CRC_ZEROS + 8] = bytes(8)
    out[VMSA_CRC_PADDR : VMSA_CRC_PADDR + 8] = crc_paddr.to_bytes(8, "little")
    return bytes(out), crc64_vmsa(out)


class VmsaCrc:
    """:func:`crc64_vmsa` from per-position tables: whole pages and incremental updates.

    ``T[j, b]`` is the linear part of the CRC-32C of a lane (0xFC0/3 bytes) whose byte ``j`` is
    ``b`` and every other byte zero; a lane's CRC is ``C ^ XOR_j T[j, lane[j]]`` with ``C`` the CRC
    of the all-zero lane.  Changing byte ``j`` from ``a`` to ``b`` changes it by ``T[j, a ^ b]``.
    """

    _shared: VmsaCrc | None = None

    def __init__(self) -> None:
        n = _LANE_BYTES
        table = np.array(_TABLE, dtype=np.uint32)
        basis = np.zeros((n, 8), dtype=np.uint32)
        v = table[1 << np.arange(8)]  # a byte with one bit set, processed last (from register 0)
        for j in range(n - 1, -1, -1):
            basis[j] = v
            v = table[v & 0xFF] ^ (v >> 8)  # one more zero byte after it
        full = np.zeros((n, 256), dtype=np.uint32)
        values = np.arange(256)
        for bit in range(8):
            full ^= np.where((values >> bit) & 1, basis[:, bit : bit + 1], np.uint32(0)).astype(np.uint32)
        self._np = full
        self._flat = full.reshape(-1).tolist()
        self._zero = crc32c(bytes(n))
        self._positions = np.arange(n)

    @classmethod
    def shared(cls) -> VmsaCrc:
        """The one table set (built on first use, about 1.4 MB)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def lanes(self, page: bytes | bytearray | memoryview) -> list[int]:
        """The three lane CRC-32Cs of a page."""
        a = np.frombuffer(bytes(page[:VMSA_CRC_SIZE]), dtype=np.uint8).reshape(-1, _LANES, _LANE)
        out = []
        for k in range(_LANES):
            lane = a[:, k, :].reshape(-1)
            out.append(int(np.bitwise_xor.reduce(self._np[self._positions, lane])) ^ self._zero)
        return out

    @staticmethod
    def checksum(lanes: list[int]) -> int:
        """The 64-bit checksum from the three lane CRCs (:func:`crc64_vmsa`'s last step, inlined:
        the CRC-32C of the three little-endian words)."""
        table = _TABLE
        c = 0xFFFFFFFF
        for word in lanes:
            for shift in (0, 8, 16, 24):
                c = table[(c ^ (word >> shift)) & 0xFF] ^ (c >> 8)
        return (lanes[0] ^ lanes[1] ^ lanes[2]) << 32 | (c ^ 0xFFFFFFFF)

    def update(self, lanes: list[int], offset: int, old: bytes | bytearray, new: bytes | bytearray) -> None:
        """Bytes at ``offset`` (8-byte aligned, a multiple of 8 long) changed from ``old`` to
        ``new``: update ``lanes`` in place."""
        if old == new:
            return
        flat = self._flat
        words = offset // _LANE
        for q, (a, b) in enumerate(zip(memoryview(old).cast("Q"), memoryview(new).cast("Q"), strict=True)):
            delta = a ^ b
            if not delta:
                continue
            word = words + q
            if word * _LANE >= VMSA_CRC_SIZE:
                return
            k = word % _LANES
            base = (word // _LANES) * _LANE * 256
            acc = lanes[k]
            while delta:
                b = delta & 0xFF
                if b:
                    acc ^= flat[base + b]
                delta >>= 8
                base += 256
            lanes[k] = acc
