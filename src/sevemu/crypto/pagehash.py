"""SHA-384 of many pages in one call, and the SEV-SNP launch digest's PAGE_INFO chain (the firmware's
SNP_LAUNCH_UPDATE measurement, :mod:`sevemu.firmware.snp.launch`).

* :func:`sha384_pages`: SHA-384 of each ``size``-byte piece of a buffer, the digests concatenated.
* :func:`page_info_chain`: ``count`` times ``ld = SHA-384(info)``, a copy of the 0x70-byte PAGE_INFO
  template ``info`` holding ``ld`` at 0x00, the page's CONTENTS at 0x30 (48 bytes each from
  ``contents``, or the template's own) and its GPA (``gpa`` + 4 KiB per page, little-endian) at 0x68
  (SNP ABI, PAGE_INFO).
* :func:`measure_pages`: :func:`page_info_chain` of measured pages, CONTENTS the SHA-384 of each
  4 KiB page of ``data`` -- both hashes of each page in one pass (in C: one call that drops the GIL
  once for a 2 MiB page's whole measurement).

Both run in the optional C accelerator ``sevemu.crypto._sha384_accel`` (``csrc/sha384_accel.c``: the
same OpenSSL SHA-384, without the Python work around each of the 2 x 512 hashes of a 2 MiB page) when
it was built, else in :mod:`hashlib` with one reused buffer; the bytes are the same (the tests compare).
"""

from __future__ import annotations

import hashlib
from typing import Final

from sevemu._util.units import PAGE
from sevemu.errors import InputError

__all__ = ["ACCELERATED", "measure_pages", "page_info_chain", "sha384_pages"]

DIGEST: Final = 48
INFO_SIZE: Final = 0x70
_CONTENTS: Final = slice(0x30, 0x60)
_GPA: Final = slice(0x68, 0x70)

try:
    from sevemu.crypto import _sha384_accel
except ImportError:  # pragma: no cover - the extension is optional
    _sha384_accel = None  # type: ignore[assignment]

ACCELERATED: Final = _sha384_accel is not None
"""Whether the C accelerator was built and loaded."""


def _check(size: int, length: int) -> None:
    if size <= 0 or length % size:
        raise InputError(f"sha384_pages: {length} bytes are not whole {size}-byte pieces")


def sha384_pages(data: bytes | bytearray | memoryview, size: int = PAGE, *, accel: bool = True) -> bytes:
    """SHA-384 of each ``size``-byte piece of ``data`` (its length a multiple of ``size``), 48 bytes each;
    ``accel=False``: :mod:`hashlib` even when the accelerator is there (tests)."""
    _check(size, len(data))
    if accel and _sha384_accel is not None:
        return _sha384_accel.sha384_pages(data, size)
    view = memoryview(data).cast("B")
    sha384 = hashlib.sha384
    return b"".join(sha384(view[off : off + size]).digest() for off in range(0, len(view), size))


def page_info_chain(ld: bytes, info: bytes | bytearray, gpa: int, count: int,
                    contents: bytes | None = None, *, accel: bool = True) -> bytes:
    """The launch digest after ``count`` PAGE_INFOs from template ``info`` (module docstring)."""
    if len(ld) != DIGEST or len(info) != INFO_SIZE or count < 0 or (contents is not None and len(contents) != DIGEST * count):
        raise InputError("page_info_chain: ld is 48 bytes, info 0x70, contents 48 bytes per page")
    if not 0 <= gpa or gpa + count * PAGE > 1 << 64:
        raise InputError(f"page_info_chain: GPA {gpa:#x} + {count} pages is not a 64-bit address")
    if accel and _sha384_accel is not None:
        return _sha384_accel.page_info_chain(ld, info, gpa, count, contents)
    buf = bytearray(info)
    sha384 = hashlib.sha384
    for i in range(count):
        buf[0:DIGEST] = ld
        if contents is not None:
            buf[_CONTENTS] = contents[DIGEST * i : DIGEST * (i + 1)]
        buf[_GPA] = (gpa + i * PAGE).to_bytes(8, "little")
        ld = sha384(buf).digest()
    return ld


def measure_pages(ld: bytes, info: bytes | bytearray, gpa: int, data: bytes | bytearray | memoryview, *,
                  accel: bool = True) -> bytes:
    """``page_info_chain(ld, info, gpa, len(data) // PAGE, sha384_pages(data))``: the launch digest after
    every 4 KiB page of ``data`` is chained as a measured page (module docstring)."""
    _check(PAGE, len(data))
    if accel and _sha384_accel is not None:
        if len(ld) != DIGEST or len(info) != INFO_SIZE:
            raise InputError("measure_pages: ld is 48 bytes, info 0x70")
        if not 0 <= gpa or gpa + len(data) > 1 << 64:
            raise InputError(f"measure_pages: GPA {gpa:#x} + {len(data) // PAGE} pages is not a 64-bit address")
        return _sha384_accel.measure_pages(ld, info, gpa, data)
    return page_info_chain(ld, info, gpa, len(data) // PAGE, sha384_pages(data, PAGE, accel=False), accel=False)
