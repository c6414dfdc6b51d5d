"""The memory controller's AES engine: per-ASID encryption of DRAM at 16-byte granularity.

Models the encryption behaviour of APM2 15.34, the AES mode and tweak of each generation (SEVurity,
Du et al., IEEE 1619) and the research findings a faithful model must reproduce (SEVurity,
CipherLeaks); ``docs/memory-model.md`` lists the model choices.  The memory controller of the SoC model keeps one
:class:`MemoryCipher` per key slot and calls :meth:`MemoryCipher.encrypt_line` on every cache-line
writeback and :meth:`MemoryCipher.decrypt_line` on every line fill; whole pages and regions
(firmware LAUNCH_UPDATE_DATA, DBG commands, migration) go through the vectorised ``*_bulk`` paths.
Both paths give identical bytes.

Modes (:class:`EncryptionMode`), for a 16-byte block ``P`` at system physical address ``p``::

    XE      C = AES-128_K(P ^ T(p))              P = AES-128_K^-1(C) ^ T(p)
    XEX     C = AES-128_K(P ^ T(p)) ^ T(p)       P = AES-128_K^-1(C ^ T(p)) ^ T(p)
    XTS256  AES-256-XTS (IEEE Std 1619) with a 512-bit key K1 || K2

XE is what early Zen 1 parts do (EPYC 7251, Ryzen), XEX later Zen 1 parts and Zen 2/3; Zen 4 and
later can also run AES-256-XTS (SNP policy bit 22 MEM_AES_256_XTS; SNP ABI 56860, guest policy).

The address tweak (SEVurity, Wilke et al. 2020; Du et al.) is linear in the address bits above the block
offset::

    T(p) = XOR over i >= 4 with bit i of p set of t_i          (bits 3:0 select a byte in the block)

so ``T(p ^ q) = T(p) ^ T(q)``.  The constants are chosen at boot and are the same for every key, the
host's included (SEVurity): they live in :class:`TweakConstants`, shared by all the ciphers of a boot.
Consequences the model keeps (and the tests check): the same (key, address, plaintext) always gives
the same ciphertext (CipherLeaks); a ciphertext block moved from ``p`` to ``q`` decrypts under
XE to ``m ^ T(p) ^ T(q)``; under XEX the mover must first XOR ``T(p) ^ T(q)`` into it, and then gets
the same plaintext difference.

Model choices where AMD publishes nothing (``docs/memory-model.md``):

* **Zen 1 constants** (:meth:`TweakConstants.published_zen1`): t_4..t_31 are the table
  reverse-engineered on an EPYC 7251 by SEVurity, each a 4-byte value repeated four times
  (byte j of the tweak is XORed with byte ``j mod 4`` of the value).  Bits 32 and up were never
  published (the authors' host had 4.3 GiB of RAM): for them we draw fresh random 4-byte values at
  every boot, repeated the same way, so the whole table keeps Zen 1's 32-bit-per-constant
  structure.
* **Zen 2+ tweak function** (:meth:`TweakConstants.random_zen2`): AMD says only that Rome's tweak is
  "no longer 4-byte periodic" with "fresh randomness per boot" (SEVurity, section IX).  We keep the linear form
  above with independent uniformly random 128-bit t_i (i >= 4) drawn at boot.  Determinism across
  the life of a key (CipherLeaks on Milan) follows.
* **XTS data unit and tweak** (:attr:`EncryptionMode.XTS256`): the data unit is the 64-byte cache
  line, the unit the memory controller moves; its tweak is the data-unit sequence number
  ``SPA >> 6`` encoded as a 128-bit little-endian integer, exactly as IEEE 1619 §5.1 encodes the
  sequence number.  Block j (0..3) of a line therefore uses ``E_K2(SPA >> 6) * alpha^j`` in
  GF(2^128) (IEEE 1619 little-endian convention: x^128 = x^7 + x^2 + x + 1).  The SPA tweak
  constants are not used by XTS, but their ``pa_bits`` still bounds the address range.

Implementation notes.  The AES block operations are `cryptography`'s AES-ECB; ECB contexts keep no
state between ``update`` calls, so each cipher keeps one encryptor and one decryptor for its whole
life, made at the first use of either (the C paths that take the raw key never need them: a key
installed for a launch that only those paths use makes none).  Everything around the AES has two implementations giving the same bytes:

* **The C accelerator** ``sevemu.crypto._memenc_accel`` (``csrc/memenc_accel.c``, an optional
  extension built at install time; :data:`ACCELERATED` says whether it loaded).
  ``xor_addr_tweak`` XORs T(p) into each 16-byte block, deriving it from the constants (an in-page
  table of bits 4..11 and a per-page tweak); ``xts_xor`` expands each E_K2(n) to its four alpha
  multiples and XORs them in; ``xor_bytes`` serves the single-line path.  The bulk path is one
  call, ``crypt_into``: per 4 KiB of the span, the tweak XOR into a buffer that stays in the
  CPU's L1 cache, AES in place there (OpenSSL's libcrypto, which ``cryptography`` also uses), and
  the second tweak XOR on the way into the output (XTS: E_K2 of the page's sequence numbers
  first) -- one pass over the data instead of three passes over a 256 KiB chunk, the
  difference between XEX at 0.40-0.52x and at 0.7-0.8x of raw AES-128-ECB on the 2-core EPYC
  this was measured on.  From 32-64 KiB on the same passes run per chunk of 128-256 KiB around
  ``crypt_into_via``, whose AES is `cryptography`'s AES-XTS made AES-ECB (a tweak that encrypts to
  zero: VAES where its bundled OpenSSL has it, 1.5-1.7x the AES-NI ECB), guarded by a self-test at
  first use (``docs/memory-model.md``).  Every mode skips both where the CPU has VAES with AVX-512:
  the accelerator's own engine then does a page's whole transform in one pass (four blocks per
  register, the tweaks made in registers beside the AES rounds; two blocks per register where the
  CPU has VAES with AVX2 only; checked by FIPS 197 known-answer tests at first use,
  ``aes_engine()`` reports and forces it).  Only an output that overlaps the input other than exactly
  takes the older three-pass chunk path.  The single-line path XORs 64-byte strings:
  the memoised page tweak and the line's in-page tweak (XE/XEX), or the line's four XTS tweaks
  (memoised per line, from E_K2 of the page's 64 sequence numbers, one AES call per page).
* **The numpy and integer paths**, used when the extension is missing (no C compiler at install
  time) or with ``MemoryCipher(..., accel=False)``.  The single-line path works on 512-bit Python
  integers (one line = one ``int``), with the same memos.  The bulk path works on ``numpy``
  ``uint64`` views: AES on 128 KiB chunks through ``update_into`` with preallocated buffers (shared
  by the ciphers of a thread); XE/XEX take T from a per-boot table spanning a 512 KiB window XORed
  with the window's high-bit tweak, carried from window to window by XORing a cached row; XTS
  computes E_K2 of the chunk's sequence numbers in one AES call and the alpha multiples with shifts.

Memos are bounded and cleared when full.  A :class:`MemoryCipher` is not thread-safe (neither are the
ECB contexts it holds), except for its bulk transfers, which several threads may run at once (the C
paths hold no shared state; ``crypt_into_via``'s contexts are used under a lock of the cipher).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from sevemu._util.units import LINE, PAGE
from sevemu.errors import AddressError, AlignmentError, InputError, KeySizeError

if TYPE_CHECKING:
    from sevemu.crypto.sha256 import Sha256

#: Whether the optional C accelerator (``csrc/memenc_accel.c``) was built and loaded; without it the
#: numpy and integer paths do the same work, slower.
ACCELERATED: bool
try:
    from sevemu.crypto import _memenc_accel
except ImportError:  # installed without a C compiler
    ACCELERATED = False
else:
    ACCELERATED = True

__all__ = [
    "ACCELERATED",
    "BLOCK_SIZE",
    "LINE_SIZE",
    "MAX_PA_BITS",
    "PAGE_SIZE",
    "SEVURITY_ZEN1_TWEAKS",
    "EncryptionMode",
    "MemoryCipher",
    "TweakConstants",
    "xts_decrypt_units",
    "xts_encrypt_units",
]

BLOCK_SIZE: Final = 16
LINE_SIZE: Final = LINE
PAGE_SIZE: Final = PAGE
#: x86-64's architectural maximum physical-address width.
MAX_PA_BITS: Final = 52
#: Lowest address width accepted: the tweak tables must cover at least one page.
MIN_PA_BITS: Final = 12

#: SEVurity's EPYC 7251 tweak table (SEVurity, the PoC's ``plaintext_gpa_database.c``):
#: t_i for i = 4..31, as the 4 bytes repeated over the 16-byte block, in memory order.
# fmt: off
SEVURITY_ZEN1_TWEAKS: Final[tuple[str, ...]] = (
    "82253838", "ec09079c", "40000018", "8102a23a", "77d91077", "b010b2c0", "536d544d",  # t4..t10
    "1568ee53", "b09230c2", "9670ff8e", "361b90d5", "0400c236", "e8182985", "bd31f92a",  # t11..t17
    "a50d3744", "f431d84c", "02043181", "b37132a1", "508ac06c", "168a8020", "7f9bc007",  # t18..t24
    "00db0407", "7f000404", "70fa01be", "bb3d2890", "bd2dd526", "1c5d6ce2", "4f5ce727",  # t25..t31
)
# fmt: on

_U64 = np.uint64
_M128: Final = (1 << 128) - 1
#: Replicates a 128-bit value into the four blocks of a 512-bit line integer.
_REP4: Final = 1 | 1 << 128 | 1 << 256 | 1 << 384
#: clmul(h, 0x87) for h < 8: the reduction of the bits shifted out of a 128-bit GF element.
_GF_RED: Final = tuple(
    (h & 1) * 0x87 ^ (h >> 1 & 1) * (0x87 << 1) ^ (h >> 2 & 1) * (0x87 << 2) for h in range(8)
)
#: s * _XTS_SPREAD places s, s << 1, s << 2, s << 3 at bits 0, 128, 256, 384 of a line integer
#: (they do not overlap); the bits each shift pushes past its 128-bit block (the top 3 bits of s)
#: then select the fix-up: clear those bits and XOR in their GF(2^128) reduction.
_XTS_SPREAD: Final = 1 | 1 << 129 | 1 << 258 | 1 << 387


def _xts_fix(top: int) -> int:
    fix = 0
    for j in (1, 2, 3):
        out = top >> (3 - j)  # the j bits of s shifted out of block j
        fix ^= out << (128 * (j + 1))  # where the spread left them: clear them
        fix ^= _GF_RED[out] << (128 * j)  # their reduction, into block j
    return fix


_XTS_FIX: Final = tuple(_xts_fix(top) for top in range(8))
#: Bulk processing: AES runs on chunks of at most 128 KiB, aligned in SPA space (sized for L2);
#: XE/XEX take the address tweak from a per-boot table spanning a 512 KiB window.
_CHUNK: Final = 128 << 10
_CHUNK_WORDS: Final = _CHUNK // 8
#: The accelerated path's chunk (no SPA alignment needed there).
_ACCEL_CHUNK: Final = 256 << 10
_SCRATCH_CHUNK: Final = max(_CHUNK, _ACCEL_CHUNK)
_SMALL: Final = 4096  # MemoryCipher.encrypt_small's one-pass limit (a page)
_WINDOW_BITS: Final = 19
_WINDOW: Final = 1 << _WINDOW_BITS
#: Row length (in uint64 words) of the 16-byte patterns XORed over a chunk (64 KiB rows: long rows
#: keep numpy's broadcasting on its fast contiguous loops).
_ROW_WORDS: Final = 8192
#: Spans up to this length take the integer path in ``*_line``; longer ones the bulk path.
_LINE_PATH_MAX: Final = 4096
#: Bounds of the memo tables (entries).
_PAGE_MEMO_MAX: Final = 1 << 14
_XTS_MEMO_MAX: Final = 1 << 11
_XTS_PAGES_MAX: Final = 1 << 9
#: The 64 sequence numbers of a page's lines as one integer: (first * _SEQ_REP64 + _SEQ_IDX64),
#: 128 bits each, little-endian.
_SEQ_REP64: Final = sum(1 << (128 * i) for i in range(64))
_SEQ_IDX64: Final = sum(i << (128 * i) for i in range(64))

Buffer = bytes | bytearray | memoryview
_from_bytes: Final = int.from_bytes  # one attribute lookup less on the hot path
_U64Array = npt.NDArray[np.uint64]


class EncryptionMode(enum.Enum):
    """The memory controller's AES mode (``docs/memory-model.md``, "Ciphers")."""

    XE = "xe"
    XEX = "xex"
    XTS256 = "aes-256-xts"

    @property
    def key_size(self) -> int:
        """Key length in bytes: AES-128 for XE/XEX, two AES-256 keys (K1 || K2) for XTS."""
        return 64 if self is EncryptionMode.XTS256 else 16

    @property
    def granule(self) -> int:
        """Smallest span the engine encrypts: a 16-byte block, or the 64-byte XTS data unit."""
        return LINE_SIZE if self is EncryptionMode.XTS256 else BLOCK_SIZE


# ---------------------------------------------------------------------------------------------
# Tweak constants
# ---------------------------------------------------------------------------------------------


class _TweakTables:
    """Lookup tables derived from a :class:`TweakConstants` (key-independent, built once)."""

    def __init__(self, constants: Sequence[bytes], pa_bits: int) -> None:
        words = np.zeros((MAX_PA_BITS, 2), dtype=_U64)
        for i, t in enumerate(constants):
            words[i] = np.frombuffer(t, dtype="<u8")
        # Vectorised lookup: one 256-entry table per 8-bit slice of the block number (bits 4..).
        idx = np.arange(256, dtype=_U64)
        self.slices: list[_U64Array] = []
        for lo in range(4, pa_bits, 8):
            tab = np.zeros((256, 2), dtype=_U64)
            for b in range(8):
                if lo + b < pa_bits:
                    sel = ((idx >> _U64(b)) & _U64(1)).astype(bool)
                    tab[sel] ^= words[lo + b]
            self.slices.append(tab)
        # Zero-padded past pa_bits so the last 8-bit slice tables stay in range.
        ints = [int.from_bytes(t, "little") for t in constants] + [0] * (MAX_PA_BITS + 8 - pa_bits)
        # Single-line path: in-page tweaks of the 64 lines (bits 4..11), as 512-bit line integers,
        # and per-page tweaks (bits 12..) from 8-bit slices of the page number.
        self.line_in_page: list[int] = []
        for line in range(PAGE_SIZE // LINE_SIZE):
            acc = 0
            for j in range(LINE_SIZE // BLOCK_SIZE):
                acc |= _xor_bits(ints, (line * LINE_SIZE + j * BLOCK_SIZE) >> 4, 4) << (128 * j)
            self.line_in_page.append(acc)
        self.page_slices: list[list[int]] = [
            [_xor_bits(ints, v, lo) * _REP4 for v in range(256)] for lo in range(12, pa_bits, 8)
        ]
        self.page_memo: dict[int, int] = {}
        self.block_ints = ints
        # The accelerator's forms: the constants back to back (C derives T from them), the line
        # tweaks and memoised page tweaks as 64-byte strings.
        self.consts_bytes = b"".join(constants)
        self.line_in_page_bytes = [t.to_bytes(LINE_SIZE, "little") for t in self.line_in_page]
        self.page_memo_bytes: dict[int, bytes] = {}
        self._window_table: _U64Array | None = None
        self._carry_rows: dict[int, _U64Array] = {}

    def _page_rep(self, page: int) -> int:
        rep = 0
        rest = page
        for tab in self.page_slices:
            rep ^= tab[rest & 0xFF]
            rest >>= 8
            if not rest:
                break
        return rep

    def page_rep(self, page: int) -> int:
        """T(page << 12) replicated over the four blocks of a line (512-bit integer)."""
        memo = self.page_memo
        rep = memo.get(page)
        if rep is None:
            rep = self._page_rep(page)
            if len(memo) >= _PAGE_MEMO_MAX:
                memo.clear()
            memo[page] = rep
        return rep

    def page_rep_bytes(self, page: int) -> bytes:
        """:meth:`page_rep` as 64 little-endian bytes (the accelerated line path's form)."""
        memo = self.page_memo_bytes
        rep = memo.get(page)
        if rep is None:
            rep = self._page_rep(page).to_bytes(LINE_SIZE, "little")
            if len(memo) >= _PAGE_MEMO_MAX:
                memo.clear()
            memo[page] = rep
        return rep

    def window_table(self) -> _U64Array:
        """T of the blocks of the bulk path's window at SPA 0 (bits 4.._WINDOW_BITS-1), flat words."""
        if self._window_table is None:
            spas = np.arange(0, _WINDOW, BLOCK_SIZE, dtype=_U64)
            self._window_table = self.lookup(spas).reshape(-1)
        return self._window_table

    def carry_row(self, carries: int) -> _U64Array:
        """A 64 KiB row of T(base ^ next_base) for window bases whose increment carries ``carries``
        times (consecutive windows' tweaks differ by this row)."""
        row = self._carry_rows.get(carries)
        if row is None:
            delta = ((1 << (carries + 1)) - 1) << _WINDOW_BITS
            pair = self.lookup(np.array([delta], dtype=_U64))[0]
            row = np.empty(_ROW_WORDS, dtype=_U64)
            _fill_pattern(row, pair)
            self._carry_rows[carries] = row
        return row

    def lookup(self, spas: _U64Array) -> _U64Array:
        """T(p) for an array of addresses, as an ``(n, 2)`` little-endian uint64 array."""
        out = np.zeros((spas.shape[0], 2), dtype=_U64)
        blocks = spas >> _U64(4)
        for k, tab in enumerate(self.slices):
            out ^= tab[(blocks >> _U64(8 * k)) & _U64(0xFF)]
        return out


def _xor_bits(ints: Sequence[int], value: int, lo: int) -> int:
    """XOR of ``ints[lo + b]`` over the set bits b of ``value``."""
    acc = 0
    b = lo
    while value:
        if value & 1:
            acc ^= ints[b]
        value >>= 1
        b += 1
    return acc


def _fill_pattern(dst: _U64Array, pair: _U64Array) -> None:
    """Fill a flat uint64 array with a repeated 16-byte value (by doubling copies)."""
    n = dst.shape[0]
    dst[:2] = pair
    filled = 2
    while filled < n:
        step = min(filled, n - filled)
        dst[filled : filled + step] = dst[:step]
        filled += step


@dataclasses.dataclass(frozen=True, slots=True)
class TweakConstants:
    """The per-boot address-tweak constants t_i of the memory controller (SEVurity; Du et al.).

    ``constants[i]`` is t_i (16 bytes) for every address bit ``i < pa_bits``; t_0..t_3 are zero (the
    low four bits select a byte within the block).  The same object serves every key of a boot: the
    tweaks do not depend on the key (SEVurity).  Build one with :meth:`published_zen1`,
    :meth:`random_zen2` or :meth:`zeros`.
    """

    pa_bits: int
    constants: tuple[bytes, ...]
    origin: str = "custom"
    _tables: _TweakTables = dataclasses.field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not MIN_PA_BITS <= self.pa_bits <= MAX_PA_BITS:
            raise InputError(f"pa_bits {self.pa_bits} outside {MIN_PA_BITS}..{MAX_PA_BITS}")
        if len(self.constants) != self.pa_bits:
            raise InputError(f"{len(self.constants)} tweak constants given for {self.pa_bits} address bits")
        for i, t in enumerate(self.constants):
            if not isinstance(t, bytes) or len(t) != BLOCK_SIZE:
                raise InputError(f"tweak constant t_{i} must be {BLOCK_SIZE} bytes")
            if i < 4 and any(t):
                raise InputError(f"tweak constant t_{i} must be zero: bits 3:0 are the offset in a block")
        object.__setattr__(self, "_tables", _TweakTables(self.constants, self.pa_bits))

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def published_zen1(cls, pa_bits: int = 48, rng: random.Random | None = None) -> TweakConstants:
        """Zen 1 constants: SEVurity's table for bits 4..31, random 4-byte-periodic values above.

        ``rng`` draws the unpublished constants for bits 32 and up (a fresh boot draws new ones);
        give a seeded :class:`random.Random` for a reproducible boot, or None for the OS's CSPRNG.
        """
        _check_pa_bits(pa_bits)
        consts = [bytes(BLOCK_SIZE)] * 4
        for i in range(4, pa_bits):
            if i < 32:
                word = bytes.fromhex(SEVURITY_ZEN1_TWEAKS[i - 4])
            else:
                word = _random_bytes(rng, 4)
            consts.append(word * 4)
        return cls(pa_bits, tuple(consts), "zen1-published")

    @classmethod
    def random_zen2(cls, pa_bits: int = 48, rng: random.Random | None = None) -> TweakConstants:
        """Zen 2+ constants: independent uniformly random 128-bit t_i (i >= 4), drawn per boot."""
        _check_pa_bits(pa_bits)
        consts = [bytes(BLOCK_SIZE)] * 4 + [_random_bytes(rng, BLOCK_SIZE) for _ in range(4, pa_bits)]
        return cls(pa_bits, tuple(consts), "zen2-random")

    @classmethod
    def zeros(cls, pa_bits: int = 48) -> TweakConstants:
        """All-zero constants (no address tweak): XE and XEX degenerate to AES-ECB.  For tests."""
        _check_pa_bits(pa_bits)
        return cls(pa_bits, (bytes(BLOCK_SIZE),) * pa_bits, "zeros")

    # -- evaluation --------------------------------------------------------------------------

    @property
    def address_limit(self) -> int:
        """One past the highest SPA the constants cover (2**pa_bits)."""
        return 1 << self.pa_bits

    def tweak(self, spa: int) -> bytes:
        """T(spa) for the 16-byte block holding ``spa`` (bits 3:0 of ``spa`` are ignored)."""
        _check_range(spa, 1, self.pa_bits)
        return _xor_bits(self._tables.block_ints, spa >> 4, 4).to_bytes(BLOCK_SIZE, "little")

    def tweaks(self, spas: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """T(p) for an array of addresses, vectorised: an ``(n, 16)`` uint8 array."""
        arr = np.asarray(spas)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InputError("spas must be a one-dimensional array of integers")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.address_limit):
            raise AddressError(f"an address is outside the {self.pa_bits}-bit physical address space")
        words = self._tables.lookup(arr.astype(_U64))
        return words.view(np.uint8).reshape(-1, BLOCK_SIZE)


def _check_pa_bits(pa_bits: int) -> None:
    if not MIN_PA_BITS <= pa_bits <= MAX_PA_BITS:
        raise InputError(f"pa_bits {pa_bits} outside {MIN_PA_BITS}..{MAX_PA_BITS}")


def _random_bytes(rng: random.Random | None, n: int) -> bytes:
    if rng is None:
        return secrets.token_bytes(n)
    return rng.getrandbits(8 * n).to_bytes(n, "little")


def _check_range(spa: int, length: int, pa_bits: int) -> None:
    if spa < 0 or spa + length > 1 << pa_bits:
        raise AddressError(
            f"SPA range 0x{spa:x}+0x{length:x} is outside the {pa_bits}-bit physical address space"
        )


# ---------------------------------------------------------------------------------------------
# AES-XTS on top of AES-ECB
# ---------------------------------------------------------------------------------------------


def _ecb(key: bytes) -> tuple[CipherContext, CipherContext]:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    return cipher.encryptor(), cipher.decryptor()


def _gf_double(x: int) -> int:
    """x * alpha in GF(2^128), IEEE 1619 little-endian convention."""
    return ((x << 1) & _M128) ^ (0x87 if x >> 127 else 0)


def _xts_units(key: bytes, tweak: int, data: bytes, unit: int, encrypt: bool) -> bytes:
    if len(key) not in (32, 64):
        raise KeySizeError(f"an AES-XTS key is 32 or 64 bytes (K1 || K2), not {len(key)}")
    if unit <= 0 or unit % BLOCK_SIZE or len(data) % unit:
        raise AlignmentError(f"data of {len(data)} bytes is not a whole number of {unit}-byte data units")
    if not 0 <= tweak < 1 << 128:
        raise InputError("an XTS tweak is a 128-bit unsigned integer")
    half = len(key) // 2
    data_enc, data_dec = _ecb(key[:half])
    tweak_enc, _ = _ecb(key[half:])
    ctx = data_enc if encrypt else data_dec
    out = bytearray()
    for start in range(0, len(data), unit):
        t = int.from_bytes(
            tweak_enc.update(((tweak + start // unit) & _M128).to_bytes(16, "little")), "little"
        )
        mask = 0
        for j in range(unit // BLOCK_SIZE):
            mask |= t << (128 * j)
            t = _gf_double(t)
        x = int.from_bytes(data[start : start + unit], "little") ^ mask
        y = int.from_bytes(ctx.update(x.to_bytes(unit, "little")), "little") ^ mask
        out += y.to_bytes(unit, "little")
    return bytes(out)


def xts_encrypt_units(key: bytes, tweak: int, data: bytes, unit: int) -> bytes:
    """IEEE 1619 XTS-AES encryption of consecutive ``unit``-byte data units (no ciphertext stealing).

    ``key`` is K1 || K2 (32 bytes: XTS-AES-128, 64 bytes: XTS-AES-256); data unit k uses the
    sequence number ``tweak + k`` (128-bit little-endian, wrapping).  A plain reference
    implementation on AES-ECB, used to validate the memory engine against the standard's vectors.
    """
    return _xts_units(key, tweak, data, unit, True)


def xts_decrypt_units(key: bytes, tweak: int, data: bytes, unit: int) -> bytes:
    """Inverse of :func:`xts_encrypt_units`."""
    return _xts_units(key, tweak, data, unit, False)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

_XE: Final = 0
_XEX: Final = 1
_XTS: Final = 2
_MODE_CODE: Final = {EncryptionMode.XE: _XE, EncryptionMode.XEX: _XEX, EncryptionMode.XTS256: _XTS}


_LAZY_CONTEXTS: Final = frozenset({"_enc", "_dec", "_tweak_enc"})

# -- the bulk path's AES through `cryptography`'s AES-XTS (crypt_into_via) ----------------------
#
# The OpenSSL that `cryptography` bundles runs AES-XTS on VAES / AVX-512 where the CPU has them, its
# ECB (and the system libcrypto's, which crypt_into uses) on AES-NI only.  XTS encrypts block i of a
# data unit as E_K1(P_i ^ M_i) ^ M_i with M_i = E_K2(iv) * alpha^i (IEEE 1619-2018, 5.3.1): with
# iv = AES_K2^-1(0) every M_i is zero, and the XTS context is an AES-ECB context under K1.  OpenSSL
# takes each update call as a whole data unit from the context's iv, so one context per direction
# serves every chunk of every call.  Both facts are checked once per process (_via_usable) before
# the path is taken; otherwise crypt_into runs, the same bytes.

#: Chunk of each AES call (crypt_into_via; measured on a 2-core EPYC VM: XTS 64 KiB < 128 KiB ~
#: 256 KiB, XE/XEX 64 < 128 < 256 KiB at 256 MiB).
_VIA_CHUNK: Final = {0: 256 << 10, 1: 256 << 10, 2: 128 << 10}
#: Smallest transfer that takes crypt_into_via, per mode (below it the calls into `cryptography`
#: cost more than its faster AES saves: in cache the two paths meet near 32 KiB for XE, 64 KiB for
#: XEX and 8-16 KiB for XTS).
_VIA_MIN: Final = {0: 64 << 10, 1: 64 << 10, 2: 32 << 10}
#: Second halves of the zero-mask XTS contexts: fixed keys (OpenSSL refuses an XTS key whose halves
#: are equal, so a data key equal to the first takes the second).
_ZERO_MASK_KEYS: Final = (bytes(range(0x40, 0x60)), bytes(range(0x60, 0x80)))
_ZERO_MASK_IVS: dict[bytes, bytes] = {}
#: Whether crypt_into_via may run: None until checked (_via_usable); tests set it to force a path.
_via_ok: bool | None = None


def _zero_mask_xts(key: bytes) -> Cipher[modes.XTS]:
    """An AES-XTS cipher that is AES-ECB under ``key`` (16 or 32 bytes): its second key is a fixed
    one != ``key`` and its tweak that key's decryption of zero, so every XTS mask is zero."""
    k2 = next(k[: len(key)] for k in _ZERO_MASK_KEYS if k[: len(key)] != key)
    iv = _ZERO_MASK_IVS.get(k2)
    if iv is None:
        iv = _ZERO_MASK_IVS[k2] = Cipher(algorithms.AES(k2), modes.ECB()).decryptor().update(bytes(BLOCK_SIZE))
    return Cipher(algorithms.AES(key + k2), modes.XTS(iv))


def _via_self_test(consts: bytes) -> bool:
    """Whether the zero-mask XTS contexts behave as crypt_into_via needs, on this `cryptography`:
    each update call of one context (twice) gives AES-ECB of its data, both directions,
    both key sizes; and crypt_into_via gives crypt_into's bytes on every mode (chunks of a page,
    a run of several chunks and a partial one, at an address inside a page)."""
    rng = random.Random(0x5EF)
    for size in (16, 32):
        key = rng.randbytes(size)
        xts, ecb = _zero_mask_xts(key), Cipher(algorithms.AES(key), modes.ECB())
        for ctx, ref in ((xts.encryptor(), ecb.encryptor()), (xts.decryptor(), ecb.decryptor())):
            for length in (4096, 1024):
                buf = rng.randbytes(length)
                out = bytearray(length)  # (not in place: cryptography after 48 refuses overlapping buffers)
                ctx.update_into(buf, out)
                if out != ref.update(buf):
                    return False
    for code, size in ((_XE, 16), (_XEX, 16), (_XTS, 64)):
        key = rng.randbytes(size)
        data = rng.randbytes(2 * 4096 + 2112)
        spa = 0x1_2345_6000 + 1024
        via = _via_contexts(key, code)
        for encrypt, update in ((True, via[0]), (False, via[1])):
            want, got = bytearray(len(data)), bytearray(len(data))
            _memenc_accel.crypt_into(want, spa, data, consts, key, code, encrypt)
            if not _memenc_accel.crypt_into_via(got, spa, data, consts, key, code, encrypt, update, via[2], 4096):
                return False
            if got != want:
                return False
    return True


def _via_usable(consts: bytes) -> bool:
    """Whether the bulk path takes crypt_into_via: the accelerator has it and the self-test passed
    (run once per process, on the caller's tweak constants; a failure of any kind means no)."""
    global _via_ok
    if _via_ok is None:
        try:
            _via_ok = ACCELERATED and hasattr(_memenc_accel, "crypt_into_via") and _via_self_test(consts)
        except Exception:  # noqa: BLE001 - any surprise from the library means: do not use it
            _via_ok = False
    return _via_ok


def _via_contexts(key: bytes, code: int) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any] | None]:
    """The bound update_into of the zero-mask contexts crypt_into_via takes: data encryption and
    decryption (XTS: under K1) and, for XTS, the unit tweaks' encryption under K2."""
    data = _zero_mask_xts(key[:32] if code == _XTS else key)
    tweak = _zero_mask_xts(key[32:]).encryptor().update_into if code == _XTS else None
    return data.encryptor().update_into, data.decryptor().update_into, tweak


class MemoryCipher:
    """One key slot's encryption engine: a mode, a key and the boot's tweak constants."""

    __slots__ = (
        "_accel",
        "_code",
        "_dec",
        "_enc",
        "_key",
        "_limit",
        "_line_in_page",
        "_line_in_page_bytes",
        "_page_memo",
        "_page_memo_bytes",
        "_tables",
        "_tweak_enc",
        "_via",
        "_via_lock",
        "_xor",
        "_xts_memo",
        "_xts_memo_bytes",
        "_xts_pages",
        "granule",
        "mode",
        "tweak_constants",
    )

    def __init__(
        self,
        mode: EncryptionMode,
        key: bytes | bytearray,
        tweaks: TweakConstants,
        *,
        accel: bool | None = None,
    ) -> None:
        """``accel``: use the C accelerator (None: when it was built; True: require it; False: the
        numpy and integer paths).  Both give the same bytes."""
        if not isinstance(mode, EncryptionMode):
            raise InputError(f"unknown encryption mode {mode!r}")
        if accel and not ACCELERATED:
            raise InputError("the C accelerator sevemu.crypto._memenc_accel was not built")
        if not isinstance(key, (bytes, bytearray)) or len(key) != mode.key_size:
            size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise KeySizeError(f"{mode.value} needs a {mode.key_size}-byte key, got {size}")
        self.mode = mode
        self.granule = mode.granule
        self.tweak_constants = tweaks
        self._code = _MODE_CODE[mode]
        self._limit = tweaks.address_limit
        self._tables = tweaks._tables
        key = bytes(key)
        self._key = key  # (the fused page write's: AES-128, or K1 || K2)
        # (``_enc``, ``_dec``, ``_tweak_enc``: the AES-ECB contexts, built at their first use by
        # ``__getattr__``; the C paths take ``_key`` and never need them)
        self._xts_memo: dict[int, int] = {}
        self._xts_pages: dict[int, bytes] = {}
        self._page_memo = self._tables.page_memo
        self._line_in_page = self._tables.line_in_page
        self._accel = ACCELERATED if accel is None else accel
        self._xor: Callable[..., bytes] | None = _memenc_accel.xor_bytes if self._accel else None
        self._xts_memo_bytes: dict[int, bytearray] = {}
        self._page_memo_bytes = self._tables.page_memo_bytes
        self._line_in_page_bytes = self._tables.line_in_page_bytes
        # (the zero-mask XTS contexts of crypt_into_via, made at the first bulk transfer that takes it)
        self._via: tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any] | None] | None = None
        # (held around each crypt_into_via call: `cryptography` 51 releases the GIL inside update_into
        # and refuses a context another thread is using -- "Already borrowed" -- where 48 held it)
        self._via_lock = threading.Lock()

    def _contexts(self) -> None:
        """Build the AES-ECB contexts of the key (data encryptor and decryptor; XTS: the tweak's
        encryptor from K2, else the data encryptor) into their slots."""
        key = self._key
        if self._code == _XTS:
            self._enc, self._dec = _ecb(key[:32])
            self._tweak_enc = _ecb(key[32:])[0]
        else:
            self._enc, self._dec = _ecb(key)
            self._tweak_enc = self._enc

    if not TYPE_CHECKING:  # (hidden from mypy: every other attribute stays checked)
        def __getattr__(self, name: str) -> Any:
            # Only an unset slot comes here: the contexts are made at the first access of one of
            # them (tens of microseconds per key a launch installs and its C paths never use); then
            # they are plain slot reads, the hot paths unchanged.
            if name in _LAZY_CONTEXTS:
                self._contexts()
                return object.__getattribute__(self, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"MemoryCipher({self.mode.value}, pa_bits={self.tweak_constants.pa_bits})"

    @property
    def accelerated(self) -> bool:
        """Whether this cipher runs its tweak work in the C accelerator."""
        return self._accel

    @property
    def bulk_aes_via_xts(self) -> bool:
        """Whether a bulk transfer of this cipher has run its AES through `cryptography`'s AES-XTS
        made AES-ECB (``crypt_into_via``; see the module's notes)."""
        return self._via is not None

    @property
    def bulk_aes_engine(self) -> str:
        """Which AES a bulk transfer of this cipher runs now: ``"vaes"`` or ``"vaes256"`` (the whole
        transform in one pass on VAES with AVX-512 or AVX2, ``crypt_into``), ``"cryptography-xts"``
        (`cryptography`'s AES-XTS made AES-ECB, ``crypt_into_via``, for transfers from 32-64 KiB),
        ``"openssl"`` (libcrypto's AES-ECB between the C passes) or ``"cryptography-ecb"`` (the numpy
        path)."""
        if not self._accel:
            return "cryptography-ecb"
        engine = _memenc_accel.aes_engine()
        if engine != "openssl":
            return engine
        return "cryptography-xts" if _via_usable(self._tables.consts_bytes) else "openssl"

    def _vaes(self) -> bool:
        """Whether the accelerator runs on a VAES engine (the whole transform in one pass, faster than
        ``crypt_into_via``'s chunks: see docs/memory-model.md), so crypt_into takes every size."""
        return _memenc_accel.aes_engine() != "openssl"

    # -- checks -------------------------------------------------------------------------------

    def _check(self, spa: int, length: int) -> None:
        g = self.granule
        if spa % g or length % g:
            raise AlignmentError(
                f"{self.mode.value} works on {g}-byte units: SPA 0x{spa:x} and length {length} "
                f"must both be multiples of {g}"
            )
        _check_range(spa, length, self.tweak_constants.pa_bits)

    # -- single-line path ---------------------------------------------------------------------

    def _line_tweak(self, spa: int) -> int:
        """The 512-bit tweak integer of the 64-byte line at ``spa`` (64-aligned, in range)."""
        if self._code == _XTS:
            n = spa >> 6
            tw = self._xts_memo.get(n)
            if tw is None:
                enc_seq = self._xts_page_seq(n >> 6)
                i = (n & 63) << 4
                s = _from_bytes(enc_seq[i : i + 16], "little")
                tw = s * _XTS_SPREAD ^ _XTS_FIX[s >> 125]
                memo = self._xts_memo
                if len(memo) >= _XTS_MEMO_MAX:
                    memo.clear()
                memo[n] = tw
            return tw
        tables = self._tables
        return tables.line_in_page[(spa >> 6) & 63] ^ tables.page_rep(spa >> 12)

    def _xts_page_seq(self, page: int) -> bytes:
        """E_K2 of the 64 sequence numbers of a page, in one AES call, memoised per page."""
        enc_seq = self._xts_pages.get(page)
        if enc_seq is None:
            seq = ((page << 6) * _SEQ_REP64 + _SEQ_IDX64).to_bytes(64 * BLOCK_SIZE, "little")
            enc_seq = self._tweak_enc.update(seq)
            if len(self._xts_pages) >= _XTS_PAGES_MAX:
                self._xts_pages.clear()
            self._xts_pages[page] = enc_seq
        return enc_seq

    def _xts_line_tweak_bytes(self, spa: int) -> bytearray:
        """The accelerated path's form of :meth:`_line_tweak` for XTS: the line's four tweaks as 64
        bytes, expanded by the C code from E_K2(SPA >> 6)."""
        n = spa >> 6
        tw = self._xts_memo_bytes.get(n)
        if tw is None:
            i = (n & 63) << 4
            tw = bytearray(LINE_SIZE)
            _memenc_accel.xts_xor(tw, _ZERO_LINE, memoryview(self._xts_page_seq(n >> 6))[i : i + 16], 4)
            memo = self._xts_memo_bytes
            if len(memo) >= _XTS_MEMO_MAX:
                memo.clear()
            memo[n] = tw
        return tw

    def _span_tweak(self, spa: int, nbytes: int) -> int:
        """Tweak integer for an arbitrary granule-aligned span (XE/XEX: per 16-byte block)."""
        if self._code == _XTS:
            acc = 0
            for off in range(0, nbytes, LINE_SIZE):
                acc |= self._line_tweak(spa + off) << (8 * off)
            return acc
        ints = self._tables.block_ints
        acc = 0
        for off in range(0, nbytes, BLOCK_SIZE):
            acc |= _xor_bits(ints, (spa + off) >> 4, 4) << (8 * off)
        return acc

    def encrypt_line(self, spa: int, data: Buffer) -> bytes:
        """Encrypt a cache line (or any granule-aligned span) at SPA ``spa``; returns ciphertext.

        The hot path is a 64-byte, 64-aligned line.  Spans longer than a page go to the bulk path.
        """
        n = len(data)
        if n == LINE_SIZE and not spa & 63 and 0 <= spa < self._limit:
            code = self._code
            xor = self._xor
            if xor is not None:  # the accelerator: XORs of 64-byte strings in C
                if code == _XTS:
                    twb = self._xts_memo_bytes.get(spa >> 6)
                    if twb is None:
                        twb = self._xts_line_tweak_bytes(spa)
                    return xor(self._enc.update(xor(data, twb)), twb)
                page = self._page_memo_bytes.get(spa >> 12)
                if page is None:
                    page = self._tables.page_rep_bytes(spa >> 12)
                line = self._line_in_page_bytes[(spa >> 6) & 63]
                if code == _XE:
                    return self._enc.update(xor(data, page, line))
                return xor(self._enc.update(xor(data, page, line)), page, line)
            if code == _XTS:
                tw = self._xts_memo.get(spa >> 6)
                if tw is None:
                    tw = self._line_tweak(spa)
            else:
                tw = self._page_memo.get(spa >> 12)
                if tw is None:
                    tw = self._tables.page_rep(spa >> 12)
                tw ^= self._line_in_page[(spa >> 6) & 63]
            if code == _XE:
                return self._enc.update((_from_bytes(data, "little") ^ tw).to_bytes(64, "little"))
            return (
                _from_bytes(
                    self._enc.update((_from_bytes(data, "little") ^ tw).to_bytes(64, "little")), "little"
                )
                ^ tw
            ).to_bytes(64, "little")
        self._check(spa, n)
        if n > _LINE_PATH_MAX or self._accel:
            return bytes(self.encrypt_bulk(spa, data))
        tw = self._span_tweak(spa, n)
        x = (_from_bytes(data, "little") ^ tw).to_bytes(n, "little")
        if self._code == _XE:
            return self._enc.update(x)
        return (_from_bytes(self._enc.update(x), "little") ^ tw).to_bytes(n, "little")

    def line_reader(self, pages: Mapping[int, bytearray]) -> Callable[[int], bytearray]:
        """A function decrypting the 64-byte line at an SPA straight from a page store.

        ``pages`` maps a page frame number to its 4 KiB of ciphertext (absent pages read as zeros):
        the memory controller's view of DRAM.  Same contract and bytes as :meth:`line_functions`'
        decrypt, in a single Python frame, returned as a new bytearray the caller owns (the cache
        keeps it as the line): this is the cache-miss path.
        """
        zero = _ZERO_LINE
        xor = self._xor
        if xor is None:
            decrypt = self.decrypt_line

            def generic(spa: int) -> bytearray:
                page = pages.get(spa >> 12)
                off = spa & 0xFFF
                return bytearray(decrypt(spa, zero if page is None else page[off : off + LINE_SIZE]))

            return generic
        dec = self._dec.update
        xor_out: Callable[..., bytearray] = getattr(
            _memenc_accel, "xor_bytearray", lambda *bufs: bytearray(xor(*bufs))  # an older build
        )
        if self._code == _XTS:
            xts_memo = self._xts_memo_bytes
            xts_tweak = self._xts_line_tweak_bytes

            def xts_read(spa: int) -> bytearray:
                page = pages.get(spa >> 12)
                off = spa & 0xFFF
                tw = xts_memo.get(spa >> 6) or xts_tweak(spa)
                return xor_out(dec(xor(zero if page is None else page[off : off + LINE_SIZE], tw)), tw)

            return xts_read
        memo = self._page_memo_bytes
        rep = self._tables.page_rep_bytes
        lines = self._line_in_page_bytes
        if self._code == _XE:

            def xe_read(spa: int) -> bytearray:
                pfn = spa >> 12
                page = pages.get(pfn)
                off = spa & 0xFFF
                data = zero if page is None else page[off : off + LINE_SIZE]
                return xor_out(dec(data), memo.get(pfn) or rep(pfn), lines[off >> 6])

            return xe_read

        def xex_read(spa: int) -> bytearray:
            pfn = spa >> 12
            page = pages.get(pfn)
            off = spa & 0xFFF
            data = zero if page is None else page[off : off + LINE_SIZE]
            tp = memo.get(pfn) or rep(pfn)
            tl = lines[off >> 6]
            return xor_out(dec(xor(data, tp, tl)), tp, tl)

        return xex_read

    def line_tweak_source(self) -> tuple[int, dict[int, Any], Callable[[int], Buffer], list[bytes] | None] | None:
        """Where a single-line path outside this module (the memory controller's C line cipher,
        :mod:`sevemu.hw.memctl`) takes its 64-byte line tweaks from, to produce the bytes of
        :meth:`line_functions`: ``(code, memo, fallback, lines)`` -- ``code`` 0 XE, 1 XEX, 2 XTS;
        the tweak of the line at ``spa`` is ``memo[spa >> 12]`` (XE/XEX; XTS: ``memo[spa >> 6]``),
        or ``fallback(spa)`` when absent (which memoises it), XOR (XE/XEX) ``lines[(spa >> 6) & 63]``.
        None without the C accelerator (the memos hold these forms only there)."""
        if self._xor is None:
            return None
        if self._code == _XTS:
            return _XTS, self._xts_memo_bytes, self._xts_line_tweak_bytes, None
        rep = self._tables.page_rep_bytes
        return self._code, self._page_memo_bytes, lambda spa: rep(spa >> 12), self._line_in_page_bytes

    def line_functions(self) -> tuple[Callable[[int, Buffer], bytes], Callable[[int, Buffer], bytes]]:
        """(encrypt, decrypt) of one 64-byte line, specialised for this cipher, without checks.

        For the memory controller's line path, which only ever passes a 64-byte line at a 64-byte
        aligned SPA inside DRAM (hence inside the tweak tables): the same bytes as
        :meth:`encrypt_line` / :meth:`decrypt_line`, with one Python frame instead of several.
        """
        xor = self._xor
        if xor is None:
            return self.encrypt_line, self.decrypt_line
        enc = self._enc.update
        dec = self._dec.update
        if self._code == _XTS:
            xts_memo = self._xts_memo_bytes
            xts_tweak = self._xts_line_tweak_bytes

            def xts_enc(spa: int, data: Buffer) -> bytes:
                tw = xts_memo.get(spa >> 6) or xts_tweak(spa)
                return xor(enc(xor(data, tw)), tw)

            def xts_dec(spa: int, data: Buffer) -> bytes:
                tw = xts_memo.get(spa >> 6) or xts_tweak(spa)
                return xor(dec(xor(data, tw)), tw)

            return xts_enc, xts_dec
        memo = self._page_memo_bytes
        rep = self._tables.page_rep_bytes
        lines = self._line_in_page_bytes
        if self._code == _XE:

            def xe_enc(spa: int, data: Buffer) -> bytes:
                return enc(xor(data, memo.get(spa >> 12) or rep(spa >> 12), lines[(spa >> 6) & 63]))

            def xe_dec(spa: int, data: Buffer) -> bytes:
                return xor(dec(data), memo.get(spa >> 12) or rep(spa >> 12), lines[(spa >> 6) & 63])

            return xe_enc, xe_dec

        def xex_enc(spa: int, data: Buffer) -> bytes:
            page = memo.get(spa >> 12) or rep(spa >> 12)
            line = lines[(spa >> 6) & 63]
            return xor(enc(xor(data, page, line)), page, line)

        def xex_dec(spa: int, data: Buffer) -> bytes:
            page = memo.get(spa >> 12) or rep(spa >> 12)
            line = lines[(spa >> 6) & 63]
            return xor(dec(xor(data, page, line)), page, line)

        return xex_enc, xex_dec

    def decrypt_line(self, spa: int, data: Buffer) -> bytes:
        """Decrypt a cache line (or any granule-aligned span) at SPA ``spa``; returns plaintext."""
        n = len(data)
        if n == LINE_SIZE and not spa & 63 and 0 <= spa < self._limit:
            code = self._code
            xor = self._xor
            if xor is not None:
                if code == _XTS:
                    twb = self._xts_memo_bytes.get(spa >> 6)
                    if twb is None:
                        twb = self._xts_line_tweak_bytes(spa)
                    return xor(self._dec.update(xor(data, twb)), twb)
                page = self._page_memo_bytes.get(spa >> 12)
                if page is None:
                    page = self._tables.page_rep_bytes(spa >> 12)
                line = self._line_in_page_bytes[(spa >> 6) & 63]
                if code == _XE:
                    return xor(self._dec.update(data), page, line)
                return xor(self._dec.update(xor(data, page, line)), page, line)
            if code == _XTS:
                tw = self._xts_memo.get(spa >> 6)
                if tw is None:
                    tw = self._line_tweak(spa)
            else:
                tw = self._page_memo.get(spa >> 12)
                if tw is None:
                    tw = self._tables.page_rep(spa >> 12)
                tw ^= self._line_in_page[(spa >> 6) & 63]
            if code == _XE:
                return (_from_bytes(self._dec.update(data), "little") ^ tw).to_bytes(64, "little")
            return (
                _from_bytes(
                    self._dec.update((_from_bytes(data, "little") ^ tw).to_bytes(64, "little")), "little"
                )
                ^ tw
            ).to_bytes(64, "little")
        self._check(spa, n)
        if n > _LINE_PATH_MAX or self._accel:
            return bytes(self.decrypt_bulk(spa, data))
        tw = self._span_tweak(spa, n)
        if self._code == _XE:
            x = self._dec.update(data)
        else:
            x = self._dec.update((_from_bytes(data, "little") ^ tw).to_bytes(n, "little"))
        return (_from_bytes(x, "little") ^ tw).to_bytes(n, "little")

    # -- bulk path ----------------------------------------------------------------------------

    def encrypt_bulk(self, spa: int, data: Buffer) -> bytearray:
        """Encrypt a whole region (pages, a guest image) starting at SPA ``spa``; vectorised."""
        src = _byte_view(data, "data")
        out = bytearray(src.nbytes)
        self._bulk(spa, src, out, True)
        return out

    def decrypt_bulk(self, spa: int, data: Buffer) -> bytearray:
        """Decrypt a whole region starting at SPA ``spa``; vectorised."""
        src = _byte_view(data, "data")
        out = bytearray(src.nbytes)
        self._bulk(spa, src, out, False)
        return out

    def encrypt_bulk_into(self, spa: int, data: Buffer, out: bytearray | memoryview) -> None:
        """:meth:`encrypt_bulk` writing into ``out`` (same length; may be ``data`` itself, but must
        not otherwise overlap it)."""
        self._bulk(spa, data, out, True)

    def decrypt_bulk_into(self, spa: int, data: Buffer, out: bytearray | memoryview) -> None:
        """:meth:`decrypt_bulk` writing into ``out`` (same rules as :meth:`encrypt_bulk_into`)."""
        self._bulk(spa, data, out, False)

    def encrypt_to_pages(self, spa: int, data: Buffer, pages: dict[int, bytearray]) -> bool:
        """Encrypt ``data`` at SPA ``spa`` straight into a page store (PFN -> 4 KiB bytearray, as
        :class:`sevemu.hw.dram.Dram` keeps): the bytes :meth:`encrypt_bulk` gives, stored as
        ``Dram.write`` stores them (an absent page is created unless its part is all zeros).

        One fused pass in the C accelerator (tweak, AES, tweak per page in a buffer that stays in the
        CPU's L1 cache, written into the page): no chunk-sized intermediate, no scatter afterwards.
        Only with the accelerator; returns False, with nothing done, otherwise (and when ``data``
        overlaps one of the pages): the caller then takes the bulk path.  Checks as
        :meth:`encrypt_bulk`."""
        if not self._accel:
            return False
        src = _byte_view(data, "data")
        self._check(spa, src.nbytes)
        return bool(_memenc_accel.crypt_pages(pages, spa, src, self._tables.consts_bytes, self._key,
                                              self._code, True))

    def decrypt_from_pages(self, spa: int, pages: dict[int, bytearray], out: bytearray | memoryview) -> bool:
        """Decrypt ``len(out)`` bytes of a page store (PFN -> 4 KiB bytearray, as
        :class:`sevemu.hw.dram.Dram` keeps; an absent page reads as zeros) at SPA ``spa`` into
        ``out``: the bytes :meth:`decrypt_bulk` gives of the gathered pages, in one fused pass in the
        C accelerator (per page: tweak, AES, tweak in a buffer that stays in L1, written into
        ``out``; no gather, no passes over the whole range).  Only with the accelerator; returns
        False, with nothing done, otherwise (and when ``out`` overlaps one of the pages): the
        caller then gathers and takes the bulk path.  Checks as :meth:`decrypt_bulk_into`."""
        run = getattr(_memenc_accel, "crypt_from_pages", None) if self._accel else None
        if run is None:  # (no accelerator, or one built before crypt_from_pages existed)
            return False
        dst = _byte_view(out, "out")
        if dst.readonly:
            raise InputError("out must be a writable buffer")
        self._check(spa, dst.nbytes)
        return bool(run(pages, spa, dst, self._tables.consts_bytes, self._key, self._code, False))

    def decrypt_pages_gather(self, pfns: npt.NDArray[np.uint64], pages: dict[int, bytearray],
                             out: bytearray | memoryview) -> bool:
        """Decrypt whole pages of a page store that need not be consecutive: page k of ``out`` (4 KiB
        per PFN) from the page ``pfns[k]`` (an absent page reads as zeros) at SPA ``pfns[k] << 12``;
        the bytes :meth:`decrypt_from_pages` gives of each page, in one call into the C accelerator.
        Only with the accelerator; False, with nothing done, otherwise (and when ``out`` overlaps one
        of the pages): the caller then reads page by page."""
        run = getattr(_memenc_accel, "crypt_gather", None) if self._accel else None
        if run is None:
            return False
        dst = _byte_view(out, "out")
        if dst.readonly:
            raise InputError("out must be a writable buffer")
        column = self._pfn_column(pfns, dst.nbytes)
        return bool(run(pages, column, dst, self._tables.consts_bytes, self._key, self._code, False))

    def encrypt_pages_scatter(self, pfns: npt.NDArray[np.uint64], data: Buffer, pages: dict[int, bytearray]) -> bool:
        """Encrypt whole pages into a page store at PFNs that need not be consecutive: page k of
        ``data`` (4 KiB per PFN) into the page ``pfns[k]`` at SPA ``pfns[k] << 12`` (an absent page is
        created unless its ciphertext is all zeros), the pages :meth:`encrypt_to_pages` leaves of each
        page, in one call into the C accelerator.  Only with the accelerator; False, with nothing done,
        otherwise (and when a PFN repeats or ``data`` overlaps one of the pages): the caller then
        writes page by page, in order."""
        run = getattr(_memenc_accel, "crypt_scatter", None) if self._accel else None
        if run is None:
            return False
        src = _byte_view(data, "data")
        column = self._pfn_column(pfns, src.nbytes)
        return bool(run(pages, column, src, self._tables.consts_bytes, self._key, self._code, True))

    def _pfn_column(self, pfns: npt.NDArray[np.uint64], nbytes: int) -> npt.NDArray[np.uint64]:
        """``pfns`` as a contiguous u64 column, checked: ``nbytes`` is 4 KiB per PFN, every page is
        inside the address space."""
        column = np.ascontiguousarray(pfns, dtype=np.uint64)
        if nbytes != PAGE * len(column):
            raise InputError(f"{nbytes} bytes given for {len(column)} pages")
        if len(column) and int(column.max()) >= self.tweak_constants.address_limit >> 12:
            raise AddressError(f"PFN {int(column.max()):#x} is beyond the {self.tweak_constants.pa_bits}-bit "
                               "address space")
        return column

    def encrypt_pages_in_place(self, spa: int, length: int, pages: dict[int, bytearray], *,
                               hashes: bool = False) -> bytes | None:
        """Encrypt ``length`` bytes of a page store (PFN -> 4 KiB bytearray, as :class:`sevemu.hw.dram.Dram`
        keeps; an absent page reads as zeros) at SPA ``spa`` in place, and return the bytes the range
        held before: the pages :meth:`encrypt_to_pages` of the gathered range leaves, and the gathered
        bytes, in one pass in the C accelerator (per group of pages: copied out, then tweak, AES,
        tweak in place while they are in the CPU's cache).  Only with an accelerator that has it;
        None, with nothing done, otherwise (the caller then gathers and encrypts).  Checks as
        :meth:`encrypt_bulk`.

        ``hashes`` (``spa`` and ``length`` whole pages): the SHA-384 of each 4 KiB page as it was
        (48 bytes a page, in order) is returned instead of its bytes -- each page hashed while it is
        in the CPU's cache, just before its group is encrypted, with no copy of the range made (the
        firmware measuring a NORMAL page it encrypts: :func:`sevemu.crypto.pagehash.sha384_pages` of
        the bytes this returns without ``hashes``)."""
        run = getattr(_memenc_accel, "crypt_pages_in_place", None) if self._accel else None
        if run is None:  # (no accelerator, or one built before crypt_pages_in_place existed)
            return None
        self._check(spa, length)
        if hashes:
            if (spa | length) % PAGE:
                raise AlignmentError(f"page hashes take whole pages, got {spa:#x}+{length:#x}")
            if "hashes" not in (run.__doc__ or ""):  # (an accelerator built before the hashes argument)
                return None
            return bytes(run(pages, spa, length, self._tables.consts_bytes, self._key, self._code, True, True))
        return bytes(run(pages, spa, length, self._tables.consts_bytes, self._key, self._code, True))

    def measure_pages_in_place(self, spa: int, length: int, pages: dict[int, bytearray], sha: Sha256) -> bool:
        """Hash ``length`` bytes of a page store (PFN -> 4 KiB bytearray, as :class:`sevemu.hw.dram.Dram`
        keeps; an absent page reads as zeros) at SPA ``spa`` into ``sha``, then encrypt them in place:
        the digest of the gathered range and the pages :meth:`encrypt_pages_in_place` leaves, in one
        pass in the C accelerator without a copy of the plaintext (per group of pages: SHA-256, then
        tweak, AES, tweak while they are in the CPU's cache).  Only with the accelerator and a
        :class:`~sevemu.crypto.sha256.Sha256` whose state it holds; False, with nothing done,
        otherwise (the caller then reads, hashes and writes).  Checks as :meth:`encrypt_bulk`."""
        ctx = sha.context
        run = getattr(_memenc_accel, "measure_pages_in_place", None) if self._accel and ctx is not None else None
        if run is None:
            return False
        self._check(spa, length)
        run(pages, spa, length, self._tables.consts_bytes, self._key, self._code, ctx)
        return True

    def encrypt_small(self, spa: int, data: bytes | bytearray) -> memoryview:
        """The ciphertext of ``data`` at ``spa`` in this thread's scratch buffer (valid until the
        thread's next bulk call): :meth:`encrypt_bulk_into`'s bytes, in fewer steps for a transfer of at
        most a page (XE / XEX through the accelerator: one tweak pass, AES, one more tweak pass for
        XEX; any other case goes through :meth:`encrypt_bulk_into`)."""
        n = len(data)
        self._check(spa, n)
        sc: _Scratch | None = getattr(_SCRATCH, "buffers", None)
        if sc is None:
            sc = _SCRATCH.buffers = _Scratch()
        out = sc.out_bytes
        if not self._accel or self._code == _XTS or n > _SMALL or not n:
            self.encrypt_bulk_into(spa, data, out[:n])
            return out[:n]
        consts = self._tables.consts_bytes
        buf = sc.buf_bytes[:n]
        _memenc_accel.xor_addr_tweak(buf, data, spa, consts)
        self._enc.update_into(buf, out)
        if self._code == _XEX:
            head = out[:n]
            _memenc_accel.xor_addr_tweak(head, head, spa, consts)
            return head
        return out[:n]

    def _bulk(self, spa: int, data: Buffer, out: bytearray | memoryview, encrypt: bool) -> None:
        src = _byte_view(data, "data")
        dst = _byte_view(out, "out")
        if dst.readonly:
            raise InputError("out must be a writable buffer")
        n = src.nbytes
        if dst.nbytes != n:
            raise InputError(f"out has {dst.nbytes} bytes for {n} bytes of data")
        self._check(spa, n)
        if not n:
            return
        if self._accel:
            if n >= _VIA_MIN[self._code] and not self._vaes() and _via_usable(self._tables.consts_bytes):
                via = self._via
                if via is None:
                    via = self._via = _via_contexts(self._key, self._code)
                with self._via_lock:
                    taken = _memenc_accel.crypt_into_via(dst, spa, src, self._tables.consts_bytes, self._key,
                                                         self._code, encrypt, via[0] if encrypt else via[1], via[2],
                                                         _VIA_CHUNK[self._code])
                if taken:
                    return
            if _memenc_accel.crypt_into(dst, spa, src, self._tables.consts_bytes, self._key, self._code, encrypt):
                return
        sc: _Scratch | None = getattr(_SCRATCH, "buffers", None)
        if sc is None:
            sc = _SCRATCH.buffers = _Scratch()
        if self._accel:  # (only when dst overlaps src other than exactly)
            if self._code == _XTS:
                self._bulk_xts_accel(spa, src, dst, encrypt, sc)
            else:
                self._bulk_xex_accel(spa, src, dst, encrypt, sc)
        elif self._code == _XTS:
            self._bulk_xts(spa, src, dst, encrypt, sc)
        else:
            self._bulk_xex(spa, src, dst, encrypt, sc)

    def _bulk_xex_accel(
        self, spa: int, src: memoryview, dst: memoryview, encrypt: bool, sc: _Scratch
    ) -> None:
        """XE/XEX through the accelerator: per chunk, one C pass XORs T into the data on the way
        to a scratch buffer, AES runs from there, and (XEX, XE decryption) one C pass XORs T into
        the result in place."""
        xor_tweak = _memenc_accel.xor_addr_tweak
        consts = self._tables.consts_bytes
        ctx = self._enc if encrypt else self._dec
        pre = encrypt or self._code == _XEX
        post = not encrypt or self._code == _XEX
        alias = src.obj is dst.obj
        n = src.nbytes
        pos = 0
        while pos < n:
            end = min(pos + _ACCEL_CHUNK, n)
            m = end - pos
            room = end + 15 <= n
            target = dst[pos : end + 15] if room else sc.out_bytes
            if pre:
                buf = sc.buf_bytes[:m]
                xor_tweak(buf, src[pos:end], spa + pos, consts)
                ctx.update_into(buf, target)
            elif alias:  # in place: cryptography refuses overlapping input and output
                buf = sc.buf_bytes[:m]
                buf[:] = src[pos:end]
                ctx.update_into(buf, target)
            else:
                ctx.update_into(src[pos:end], target)
            d = dst[pos:end]
            if post:
                xor_tweak(d, d if room else sc.out_bytes[:m], spa + pos, consts)
            elif not room:
                d[:] = sc.out_bytes[:m]
            pos = end

    def _bulk_xts_accel(
        self, spa: int, src: memoryview, dst: memoryview, encrypt: bool, sc: _Scratch
    ) -> None:
        """AES-256-XTS through the accelerator: per chunk, E_K2 of the sequence numbers in one AES
        call; the C code expands each to its four alpha multiples and XORs them in, before and
        after the data AES."""
        ax = _memenc_accel
        ctx = self._enc if encrypt else self._dec
        tweak_enc = self._tweak_enc
        n = src.nbytes
        pos = 0
        while pos < n:
            end = min(pos + _ACCEL_CHUNK, n)
            m = end - pos
            tb = m >> 2  # 16 bytes of tweak per 64-byte line
            seq = sc.seq_bytes[:tb]
            ax.xts_sequence(seq, (spa + pos) >> 6)
            tweak_enc.update_into(seq, sc.s_bytes[: tb + 15])
            s = sc.s_bytes[:tb]
            buf = sc.buf_bytes[:m]
            ax.xts_xor(buf, src[pos:end], s, 4)
            room = end + 15 <= n
            ctx.update_into(buf, dst[pos : end + 15] if room else sc.out_bytes)
            d = dst[pos:end]
            ax.xts_xor(d, d if room else sc.out_bytes[:m], s, 4)
            pos = end

    def _bulk_xex(self, spa: int, src: memoryview, dst: memoryview, encrypt: bool, sc: _Scratch) -> None:
        """XE/XEX.  T(p) = table[p mod window] ^ T(window base): the table (bits 4..18) is built once
        per boot; the tweak of a window is kept in ``sc.tw`` and moved to the next window by XORing
        T(base ^ next base), one of a few cached rows.  AES runs on 128 KiB chunks."""
        tables = self._tables
        table = tables.window_table()
        xor = np.bitwise_xor
        ctx = self._enc if encrypt else self._dec
        pre = encrypt or self._code == _XEX  # XOR before AES (XE decryption: only after)
        post = not encrypt or self._code == _XEX
        alias = src.obj is dst.obj
        src_w = np.frombuffer(src, dtype=_U64)
        dst_w = np.frombuffer(dst, dtype=_U64)
        n = src.nbytes
        base = spa & ~(_WINDOW - 1)
        win_off = spa - base
        multi = spa + n > base + _WINDOW
        tw = sc.tw
        tw_rows = tw.reshape(-1, _ROW_WORDS)
        high = tables.lookup(np.array([base], dtype=_U64))[0]
        if multi:
            _fill_pattern(sc.row, high)
            xor(table.reshape(-1, _ROW_WORDS), sc.row, out=tw_rows)
        buf, buf_bytes = sc.buf[:_CHUNK_WORDS], sc.buf_bytes[:_CHUNK]
        pos = 0
        while pos < n:
            m = min(_CHUNK - (win_off & (_CHUNK - 1)), n - pos)
            w0 = win_off >> 3
            w1 = w0 + (m >> 3)
            seg_tw = tw[w0:w1]
            if not multi:
                _xor_pattern(table[w0:w1], high, seg_tw, sc.row)
            end = pos + m
            d_w = dst_w[pos >> 3 : end >> 3]
            room = end + 15 <= n
            target = dst[pos : end + 15] if room else sc.out_bytes
            if pre:
                if m == _CHUNK:
                    xor(src_w[pos >> 3 : end >> 3], seg_tw, out=buf)
                    ctx.update_into(buf_bytes, target)
                else:
                    xor(src_w[pos >> 3 : end >> 3], seg_tw, out=buf[: w1 - w0])
                    ctx.update_into(buf_bytes[:m], target)
            elif alias:  # in place: cryptography refuses overlapping input and output
                buf_bytes[:m] = src[pos:end]
                ctx.update_into(buf_bytes[:m], target)
            else:
                ctx.update_into(src[pos:end], target)
            if post:
                xor(d_w if room else sc.out[: w1 - w0], seg_tw, out=d_w)
            elif not room:
                d_w[:] = sc.out[: w1 - w0]
            pos = end
            win_off += m
            if win_off == _WINDOW and pos < n:
                index = base >> _WINDOW_BITS
                base += _WINDOW
                win_off = 0
                xor(tw_rows, tables.carry_row((index ^ (index + 1)).bit_length() - 1), out=tw_rows)

    def _bulk_xts(self, spa: int, src: memoryview, dst: memoryview, encrypt: bool, sc: _Scratch) -> None:
        """AES-256-XTS with 64-byte data units, in chunks of at most 128 KiB."""
        xor = np.bitwise_xor
        ctx = self._enc if encrypt else self._dec
        src_w = np.frombuffer(src, dtype=_U64)
        dst_w = np.frombuffer(dst, dtype=_U64)
        n = src.nbytes
        pos = 0
        while pos < n:
            m = min(_CHUNK, n - pos)
            words = m >> 3
            seg_tw = sc.tw[:words]
            _xts_tweaks(self._tweak_enc, (spa + pos) >> 6, m >> 6, seg_tw, sc)
            p0, p1 = pos >> 3, (pos + m) >> 3
            d_w = dst_w[p0:p1]
            room = pos + m + 15 <= n
            target = dst[pos : pos + m + 15] if room else sc.out_bytes
            buf = sc.buf[:words]
            xor(src_w[p0:p1], seg_tw, out=buf)
            ctx.update_into(sc.buf_bytes[:m], target)
            res = d_w if room else sc.out[:words]
            xor(res, seg_tw, out=d_w)
            pos += m


class _Scratch:
    """Preallocated buffers of the bulk path (one chunk each, +15 bytes of slack where
    ``update_into`` writes): key-independent, so shared by every cipher of a thread."""

    __slots__ = (
        "buf",
        "buf_bytes",
        "out",
        "out_bytes",
        "row",
        "s",
        "s_bytes",
        "seq",
        "seq_bytes",
        "tmp",
        "tw",
    )

    def __init__(self) -> None:
        self.tw = np.empty(max(_WINDOW, _CHUNK) // 8, dtype=_U64)
        self.row = np.empty(_ROW_WORDS, dtype=_U64)
        self.buf = np.empty(_SCRATCH_CHUNK // 8, dtype=_U64)
        self.buf_bytes = self.buf.data.cast("B")
        raw_out = bytearray(_SCRATCH_CHUNK + 16)
        self.out_bytes = memoryview(raw_out)
        self.out = np.frombuffer(raw_out, dtype=_U64, count=_SCRATCH_CHUNK // 8)
        lines = _SCRATCH_CHUNK // LINE_SIZE
        self.seq = np.zeros((lines, 2), dtype=_U64)
        self.seq_bytes = self.seq.data.cast("B")
        raw_s = bytearray(lines * BLOCK_SIZE + 16)
        self.s_bytes = memoryview(raw_s)
        self.s = np.frombuffer(raw_s, dtype=_U64, count=lines * 2)
        self.tmp = np.empty((3, lines * 2), dtype=_U64)


_SCRATCH: Final = threading.local()
_ZERO_LINE: Final = bytes(LINE_SIZE)
_LINES_PER_CHUNK: Final = _CHUNK // LINE_SIZE
_ARANGE: Final = np.arange(_LINES_PER_CHUNK, dtype=_U64)
_V16: Final = np.dtype("V16")


def _xts_tweaks(tweak_enc: CipherContext, first: int, lines: int, tw: _U64Array, sc: _Scratch) -> None:
    """Fill ``tw`` (lines * 8 words) with the XTS tweaks E_K2(n) * alpha^j of ``lines`` data units."""
    seq = sc.seq[:lines]
    np.add(_ARANGE[:lines], _U64(first), out=seq[:, 0])
    nbytes = lines * BLOCK_SIZE
    tweak_enc.update_into(sc.seq_bytes[:nbytes], sc.s_bytes[: nbytes + 15])
    w = lines * 2
    _xts_alpha_powers(sc.s[:w], LINE_SIZE // BLOCK_SIZE, tw, sc.tmp[:, :w])


def _xts_alpha_powers(s: _U64Array, unit_blocks: int, out: _U64Array, tmp: _U64Array) -> None:
    """out = s_u * alpha^j in GF(2^128) for each data unit u and block j < ``unit_blocks``: ``s``
    holds one encrypted tweak per unit (two little-endian words), ``out`` unit after unit
    (``unit_blocks`` * 2 words each), ``tmp`` is ``(3, len(s))`` scratch."""
    w = s.shape[0]
    blocks = out.view(_V16).reshape(w // 2, unit_blocks)
    blocks[:, 0] = s.view(_V16)
    carry = tmp[0]
    lo_carry, hi_carry = carry[0::2], carry[1::2]
    cur = s
    for j in range(1, unit_blocks):
        nxt = tmp[1 + (j & 1)]
        # One doubling per block: shift each (lo, hi) pair left by one bit; the hi word takes the
        # lo word's top bit, the lo word the reduction 0x87 of the hi word's top bit.
        np.left_shift(cur, _U64(1), out=nxt)
        np.right_shift(cur, _U64(63), out=carry)
        np.bitwise_or(nxt[1::2], lo_carry, out=nxt[1::2])
        np.multiply(hi_carry, _U64(0x87), out=hi_carry)
        np.bitwise_xor(nxt[0::2], hi_carry, out=nxt[0::2])
        blocks[:, j] = nxt.view(_V16)
        cur = nxt


def _xor_pattern(words: _U64Array, pair: _U64Array, out: _U64Array, row: _U64Array) -> None:
    """out = words ^ (16-byte value ``pair`` repeated)."""
    n = words.shape[0]
    if n <= 1024:
        np.bitwise_xor(words.reshape(-1, 2), pair, out=out.reshape(-1, 2))
        return
    width = min(n, _ROW_WORDS)
    _fill_pattern(row[:width], pair)
    if n % width:
        np.bitwise_xor(words, np.resize(row[:width], n), out=out)
    else:
        np.bitwise_xor(words.reshape(-1, width), row[:width], out=out.reshape(-1, width))


def _byte_view(buf: object, name: str) -> memoryview:
    try:
        mv = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be a bytes-like object, not {type(buf).__name__}") from None
    if not mv.c_contiguous:
        raise InputError(f"{name} must be a contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
