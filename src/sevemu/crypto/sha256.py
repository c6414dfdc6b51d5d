"""SHA-256 whose running state the memory-encryption accelerator can extend in place: the SEV launch
digest (SEV API 55766 §6.2 LAUNCH_UPDATE_DATA: GCTX.LD = SHA-256 over every measured byte, in order).

:class:`Sha256` answers like ``hashlib.sha256()`` (``update``, ``digest``, ``hexdigest``, ``copy``),
the same digests.  Where the C accelerator of :mod:`sevemu.crypto.memenc` was built
(``csrc/memenc_accel.c``), its state is an OpenSSL SHA-256 context held there, so that
:meth:`~sevemu.crypto.memenc.MemoryCipher.measure_pages_in_place` can hash DRAM's pages where they
lie, then encrypt them in place, in one pass and without a plaintext copy; otherwise it is a
``hashlib`` object and that fused path declines (its callers read and write as two steps).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

try:
    from sevemu.crypto import _memenc_accel
except ImportError:  # installed without a C compiler: hashlib only
    _ACCEL = False
else:
    _ACCEL = hasattr(_memenc_accel, "sha256_new")  # (False for an accelerator built before it existed)

__all__ = ["Sha256"]


class Sha256:
    """A running SHA-256 (module docstring).  ``accel``: hold the state in the C accelerator (None:
    where it was built; False: in ``hashlib``)."""

    __slots__ = ("_ctx", "_hash")

    name = "sha256"
    digest_size = 32
    block_size = 64

    def __init__(self, data: ReadableBuffer = b"", *, accel: bool | None = None) -> None:
        use = _ACCEL and accel is not False
        self._ctx: object | None = _memenc_accel.sha256_new() if use else None
        self._hash = None if use else hashlib.sha256()
        if len(memoryview(data)):
            self.update(data)

    @property
    def context(self) -> object | None:
        """The accelerator's context (None: a ``hashlib`` state), for the fused page paths."""
        return self._ctx

    def update(self, data: ReadableBuffer) -> None:
        """Extend the digest with ``data`` (from 4 KiB on, with the GIL released: the SHA engine's thread)."""
        if self._ctx is not None:
            _memenc_accel.sha256_update(self._ctx, data)
        else:
            assert self._hash is not None
            self._hash.update(data)

    def digest(self) -> bytes:
        if self._ctx is not None:
            return _memenc_accel.sha256_digest(self._ctx)
        assert self._hash is not None
        return self._hash.digest()

    def hexdigest(self) -> str:
        return self.digest().hex()

    def __copy__(self) -> Sha256:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, object]) -> Sha256:
        return self.copy()

    def copy(self) -> Sha256:
        dup = Sha256.__new__(Sha256)
        dup._ctx = _memenc_accel.sha256_copy(self._ctx) if self._ctx is not None else None
        dup._hash = self._hash.copy() if self._hash is not None else None
        return dup
