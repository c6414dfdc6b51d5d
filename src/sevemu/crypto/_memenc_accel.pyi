"""Type stub of the optional C accelerator of :mod:`sevemu.crypto.memenc` (``csrc/memenc_accel.c``).

Every function raises ValueError on inconsistent lengths, and takes C-contiguous buffers.
"""

from collections.abc import Callable

from _typeshed import ReadableBuffer, WriteableBuffer

def xor_addr_tweak(dst: WriteableBuffer, src: ReadableBuffer, spa: int, consts: ReadableBuffer, /) -> None:
    """dst = src ^ T(spa + 16k) for each 16-byte block k; ``consts`` = t_0 || ... || t_(pa_bits-1)."""

def xts_xor(dst: WriteableBuffer, src: ReadableBuffer, tweaks: ReadableBuffer, unit_blocks: int, /) -> None:
    """dst = src ^ E_K2(n_u) * alpha^j for block j of data unit u (``tweaks``: 16 bytes per unit)."""

def xts_sequence(out: WriteableBuffer, first: int, /) -> None:
    """Fill ``out`` with the 128-bit little-endian integers first, first + 1, ..."""

def xor_bytearray(a: ReadableBuffer, b: ReadableBuffer, c: ReadableBuffer | None = None, /) -> bytearray:
    """a ^ b (^ c) as a new bytearray."""

def xor_bytes(a: ReadableBuffer, b: ReadableBuffer, c: ReadableBuffer | None = None, /) -> bytes:
    """a ^ b (^ c)."""

def crypt_pages(pages: dict[int, bytearray], spa: int, src: ReadableBuffer, consts: ReadableBuffer,
                key: ReadableBuffer, code: int, encrypt: bool, /) -> bool:
    """XE (code 0) / XEX (code 1, AES-128 key) / XTS (code 2, K1 || K2) of src at spa, straight into the
    page store; False, with nothing changed, when src overlaps one of the pages."""

def crypt_from_pages(pages: dict[int, bytearray], spa: int, dst: WriteableBuffer, consts: ReadableBuffer,
                     key: ReadableBuffer, code: int, encrypt: bool, /) -> bool:
    """XE / XEX / XTS of the page store's bytes at spa (absent pages: zeros) into dst; False, with
    nothing written, when dst overlaps one of the pages."""

def crypt_into(dst: WriteableBuffer, spa: int, src: ReadableBuffer, consts: ReadableBuffer,
               key: ReadableBuffer, code: int, encrypt: bool, /) -> bool:
    """crypt_pages' fused transform into one buffer of len(src) bytes (may be src itself); False, with
    nothing written, when dst overlaps src other than exactly."""

def crypt_into_via(dst: WriteableBuffer, spa: int, src: ReadableBuffer, consts: ReadableBuffer,
                   key: ReadableBuffer, code: int, encrypt: bool, update: Callable[..., object],
                   tweak_update: Callable[..., object] | None, chunk: int, /) -> bool:
    """crypt_into's transform with the AES-ECB through ``update`` (the bound update_into of an AES-XTS
    context of `cryptography` that is AES-ECB under the data key: its tweak encrypts to zero), one call
    per ``chunk`` bytes (a multiple of 4096, at most 1 MiB); XTS's unit tweaks through
    ``tweak_update`` (the same under K2) or, None, the system libcrypto.  False, with nothing written,
    when dst overlaps src other than exactly."""

def sha256_new() -> object:
    """A fresh SHA-256 context (a capsule)."""

def sha256_copy(ctx: object, /) -> object:
    """A new context in the state of ``ctx``."""

def sha256_update(ctx: object, data: ReadableBuffer, /) -> None:
    """Extend ``ctx`` with ``data``."""

def sha256_digest(ctx: object, /) -> bytes:
    """The digest of what ``ctx`` has hashed (``ctx`` unchanged)."""

def measure_pages_in_place(pages: dict[int, bytearray], spa: int, length: int, consts: ReadableBuffer,
                           key: ReadableBuffer, code: int, ctx: object, /) -> None:
    """The page store's ``length`` bytes at spa hashed into ``ctx``, then encrypted in place (XE / XEX /
    XTS as crypt_pages_in_place), per group of pages in one pass."""

def vector_isa(level: str | None = None, /) -> str:
    """The instruction set of the fused passes ('avx512', 'avx2' or 'portable'; 'avx2' by default where
    the CPU has it); with ``level``, use that one from now on (process-wide; ValueError when the CPU
    lacks it) and return the previous."""

def aes_engine(name: str | None = None, /) -> str:
    """The AES engine of the crypt_* functions: 'vaes' (one pass on VAES / AVX-512, where the
    CPU has them and the engine passed its known-answer test) or 'openssl'; with ``name``, use that one
    from now on (process-wide; ValueError when it cannot run here) and return the previous."""
