"""The firmware's check of the CPUID page (SNP_LAUNCH_UPDATE type CPUID; Linux ``snp_cpuid_table``;
AMD-ASPFW ``cpuid_lookup.c`` ``sanitize_cpuid_list``).

AMD's firmware holds a per-part table of rules (exact, mask, less-than) for every architectural leaf
and requires all-zero outputs for a leaf it does not list; leaves outside the standard
(0000_0000..0000_FFFF) and extended (8000_0000..8000_FFFF) ranges are not checked.  Model choice
(``docs/snp.md``): the rules come from the part's own CPUID (:meth:`~sevemu.hw.profiles.CpuProfile.cpuid`):
Fn0000_0001 EAX (the family/model/stepping signature) must be exact, every other output register may
only carry bits the part reports for that leaf (a mask rule; a leaf the part reports as zeros must be
zero).  A bad entry is corrected in place (exact value / masked) and the whole table is handed back.
"""

from __future__ import annotations

from sevemu.abi.snp import CPUID_COUNT_MAX, SnpCpuidFunction
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError, LayoutError
from sevemu.hw.profiles import CpuProfile

__all__ = ["sanitize_cpuid_page"]

_ENTRY = SnpCpuidFunction.SIZE
_TABLE_HEAD = 0x10


def _checked(leaf: int) -> bool:
    return leaf <= 0xFFFF or 0x8000_0000 <= leaf <= 0x8000_FFFF


def sanitize_cpuid_page(profile: CpuProfile, page: bytes) -> bytes | None:
    """None when the CPUID page passes; else the page with corrected entries.  INVALID_PARAM (raised)
    for a malformed table (count above 64, reserved header fields)."""
    count = int.from_bytes(page[0:4], "little")
    if page[4:_TABLE_HEAD] != bytes(_TABLE_HEAD - 4):
        raise FirmwareError(Status.INVALID_PARAM, "CPUID page: reserved header fields are not zero")
    if count > CPUID_COUNT_MAX:
        raise FirmwareError(Status.INVALID_PARAM, f"CPUID page: {count} entries, at most {CPUID_COUNT_MAX}")
    out = bytearray(page)
    failed = False
    for i in range(count):
        off = _TABLE_HEAD + i * _ENTRY
        raw = bytes(page[off : off + _ENTRY])
        reserved = raw[0x28:0x30] != bytes(8)
        try:
            fn = SnpCpuidFunction.decode(raw[:0x28] + bytes(8))
        except LayoutError:  # pragma: no cover - every byte of an entry is a field
            raise FirmwareError(Status.INVALID_PARAM, f"CPUID page entry {i} is malformed") from None
        if not _checked(fn.eax_in):
            continue
        failed |= reserved
        allowed = profile.cpuid(fn.eax_in, fn.ecx_in)
        got = (fn.eax, fn.ebx, fn.ecx, fn.edx)
        want = tuple(g & a for g, a in zip(got, allowed, strict=True))
        if fn.eax_in == 1:
            want = (allowed[0], *want[1:])
        if want != got or reserved:
            failed = True
            fixed = SnpCpuidFunction(eax_in=fn.eax_in, ecx_in=fn.ecx_in, xcr0_in=fn.xcr0_in, xss_in=fn.xss_in,
                                     eax=want[0], ebx=want[1], ecx=want[2], edx=want[3])
            out[off : off + _ENTRY] = fixed.encode() + bytes(_ENTRY - SnpCpuidFunction.SIZE)
    return bytes(out) if failed else None
