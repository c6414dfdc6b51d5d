"""The memory controller: per-ASID AES engine between the SoC and DRAM.

Everything that leaves the SoC passes here (APM2 15.34.5-15.34.9).  A memory access
arrives tagged with an *encryption domain* ``(asid, c)``:

* ``c = 1``: encrypt/decrypt with the key in slot ``asid`` (slot 0 is the host's SME key, generated
  at boot and never leaving the controller);
* ``c = 0``: no encryption, whatever the ASID.

Key slots are programmed only through the Secure Processor's port (:meth:`MemoryController.secure_port`,
handed out once, to the PSP, by :class:`~sevemu.hw.soc.Soc`); x86 software has no way to read or set
a key.  The cipher (XE, XEX or AES-256-XTS) and its per-boot tweak constants come from the CPU
profile (SEVurity, Du et al., IEEE 1619; model choices in ``docs/memory-model.md``).

**A cleared slot** (:meth:`KeySlotPort.clear`: SHUTDOWN, DECOMMISSION) may still have lines of its
ASID in the caches -- software should have flushed them, but a CPU instruction never fails because
it did not.  Model choice (AMD documents nothing): the slot then holds a fresh random key nobody
knows, created when first needed; a line written back in that domain is encrypted under it (the
data is destroyed, never leaked, and nothing raises) and a fill in that domain reads garbage.  For
everything else the slot is empty: no key, not valid for VMRUN, :meth:`MemoryController.read_line`
and the bulk path refuse it.

The key-selection table of APM Table 15-31 (guest C-bit, NPT C-bit -> key) lives in :func:`domain_for`,
used by the MMU.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from sevemu._util.units import LINE, PAGE, KiB, MiB
from sevemu.crypto.memenc import EncryptionMode, MemoryCipher, TweakConstants
from sevemu.crypto.pagehash import sha384_pages
from sevemu.errors import AlignmentError, AsidError, InputError, KeySlotError
from sevemu.hw import memaccel
from sevemu.hw.dram import Dram

if TYPE_CHECKING:
    from sevemu.crypto.sha256 import Sha256
    from sevemu.hw._mem_accel import LineCipher

_ZERO_LINE = bytes(LINE)
_CHUNK = MiB  # bulk encryption granule of large transfers (a whole number of pages)
_FUSED_MIN = 64 * KiB  # bulk writes (reads) from this size go through MemoryCipher.encrypt_to_pages (decrypt_from_pages) where it can
_SCRATCH = threading.local()  # per thread: one _CHUNK buffer the bulk writes encrypt into, reused
# Equivalent mutants (mutation testing of this module, tools/mutate.py): the ``if TYPE_CHECKING`` block
# (typing only); _line_cipher's guards (``memaccel.ENABLED``, ``source is None``), whose fallback is the
# cipher's Python line functions, the same bytes; another _FUSED_MIN, and ``>`` for ``>=`` against it,
# choose only between two paths to the same bytes.  Last run (214 mutants): 204 killed, these 10
# survived (95.3%).


def _scratch() -> memoryview:
    buf: memoryview | None = getattr(_SCRATCH, "buf", None)
    if buf is None:
        buf = _SCRATCH.buf = memoryview(bytearray(_CHUNK))
    return buf

__all__ = ["KeySlotPort", "MemoryController", "domain_for"]

Rng = Callable[[int], bytes]


def domain_for(guest_asid: int, guest_c: bool, npt_c: bool) -> tuple[int, bool]:
    """Encryption domain of a guest data access (APM2 15.34.5, Table 15-31).

    guest C=1 -> guest key, whatever the NPT says; guest C=0 and NPT C=1 -> host (SME) key;
    both 0 -> unencrypted.
    """
    if guest_c:
        return guest_asid, True
    if npt_c:
        return 0, True
    return 0, False


class MemoryController:
    """AES engine with one key slot per ASID, in front of :class:`~sevemu.hw.dram.Dram`."""

    def __init__(self, dram: Dram, mode: EncryptionMode, tweaks: TweakConstants, max_asid: int,
                 rng: Rng = os.urandom) -> None:
        self.dram = dram
        self._rng = rng
        self.mode = mode
        self.tweaks = tweaks
        self.max_asid = max_asid
        self._pages = dram.pages_dict()  # the line path reads DRAM's page store directly
        self._slots: dict[int, MemoryCipher] = {}
        self._valid: set[int] = set()
        """ASIDs VMRUN accepts for an SEV guest: loaded by the PSP and not marked invalid since
        (AMD's firmware marks an ASID invalid at DEACTIVATE, SHUTDOWN and INIT; the key stays in the
        slot so that the ASID's dirty lines can still be written back)."""
        # per-slot specialised line functions (the cache's fill and write-back path)
        self._line_enc: dict[int, Callable[[int, bytes | bytearray], bytes]] = {}
        self._line_dec: dict[int, Callable[[int, bytes | bytearray], bytes]] = {}
        self.readers: dict[int, Callable[[int], bytearray]] = {0: self._read_plain}
        """Line-fill function per encryption domain, keyed ``(asid << 1) | c`` (the top bits of a
        cache key): what the cache calls on a miss; each returns a new bytearray of the line's
        plaintext.  Only (0, C=0) and loaded key slots have one."""
        self._scraps: dict[int, MemoryCipher] = {}
        """ASID -> the unknown random key a cleared slot holds (see the module docstring)."""
        key0 = rng(mode.key_size)
        self._install(0, MemoryCipher(mode, key0, tweaks), key0)
        self._port_issued = False
        self.lines_encrypted = 0

    # ---- key slots ---------------------------------------------------------------------------
    def secure_port(self) -> KeySlotPort:
        """The key-programming port; handed out once (to the Secure Processor)."""
        if self._port_issued:
            raise KeySlotError("the key-slot port belongs to the Secure Processor and was already issued")
        self._port_issued = True
        return KeySlotPort(self)

    def _install(self, asid: int, cipher: MemoryCipher, key: bytes) -> None:
        self._slots[asid] = cipher
        line = self._line_cipher(cipher, key)
        if line is None:
            self._line_enc[asid], self._line_dec[asid] = cipher.line_functions()
            self.readers[(asid << 1) | 1] = cipher.line_reader(self._pages)
        else:
            self._line_enc[asid], self._line_dec[asid] = line.encrypt, line.decrypt
            self.readers[(asid << 1) | 1] = line.read

    def _line_cipher(self, cipher: MemoryCipher, key: bytes) -> LineCipher | None:
        """The slot's single-line path in C (``csrc/mem_accel.c``, ``LineCipher``: AES-ECB through
        OpenSSL around the cipher's own tweaks), or None where the C helpers are off: then the
        cipher's Python line functions, which give the same bytes."""
        if not memaccel.ENABLED:
            return None
        source = cipher.line_tweak_source()
        if source is None:
            return None
        code, memo, fallback, lines = source
        data_key = key[:32] if self.mode is EncryptionMode.XTS256 else key  # (XTS: K1 encrypts the data)
        return memaccel.helpers.LineCipher(code, data_key, self._pages, memo, fallback, lines)

    def _remove(self, asid: int) -> None:
        self._valid.discard(asid)
        had_key = self._slots.pop(asid, None) is not None
        self._line_dec.pop(asid, None)
        self._scraps.pop(asid, None)  # every clear gets its own unknown key
        if not had_key:
            return
        # Lines of the ASID still in the caches go to DRAM under a key nobody knows (module docstring).
        self._line_enc[asid] = lambda spa, data: self._scrap(asid).encrypt_line(spa, data)
        self.readers[(asid << 1) | 1] = lambda spa: self._scrap_read(asid, spa)

    def _scrap(self, asid: int) -> MemoryCipher:
        cipher = self._scraps.get(asid)
        if cipher is None:
            cipher = self._scraps[asid] = MemoryCipher(self.mode, self._rng(self.mode.key_size), self.tweaks)
        return cipher

    def _scrap_read(self, asid: int, spa: int) -> bytearray:
        page = self._pages.get(spa >> 12)
        off = spa & 0xFFF
        data = _ZERO_LINE if page is None else page[off : off + LINE]
        return bytearray(self._scrap(asid).decrypt_line(spa, data))

    def has_key(self, asid: int) -> bool:
        return asid in self._slots

    def asid_valid(self, asid: int) -> bool:
        """Whether VMRUN may run an SEV guest on ``asid`` (its key loaded and not invalidated)."""
        return asid in self._valid

    def _cipher(self, asid: int) -> MemoryCipher:
        cipher = self._slots.get(asid)
        if cipher is None:
            raise KeySlotError(f"no key is loaded for ASID {asid}")
        return cipher

    # ---- line path (cache fills and write-backs) --------------------------------------------
    def _read_plain(self, spa: int) -> bytearray:
        page = self._pages.get(spa >> 12)
        if page is None:
            return bytearray(LINE)
        off = spa & 0xFFF
        return page[off : off + LINE]  # a bytearray slice: a copy

    def read_line(self, spa: int, asid: int, c: int | bool) -> bytes | bytearray:
        """Fill a 64-byte line from DRAM in domain (asid, c)."""
        page = self._pages.get(spa >> 12)
        if page is None:
            data: bytes | bytearray = _ZERO_LINE
        else:
            off = spa & 0xFFF
            data = page[off : off + LINE]
        if not c:
            return data
        dec = self._line_dec.get(asid)
        if dec is None:
            raise KeySlotError(f"no key is loaded for ASID {asid}")
        return dec(spa, data)

    def read_run(self, spa: int, length: int, asid: int, c: bool) -> bytes | bytearray:
        """The plaintext of the lines ``[spa, spa + length)`` inside one page in domain (asid, c):
        the bytes :attr:`readers`' function gives for each line, decrypted by one bulk call of the
        cipher (a cleared slot's unknown key too).  The caller has checked the domain's reader."""
        page = self._pages.get(spa >> 12)
        off = spa & 0xFFF
        data = bytes(length) if page is None else page[off : off + length]
        if not c:
            return data
        cipher = self._slots.get(asid)
        return (self._scrap(asid) if cipher is None else cipher).decrypt_bulk(spa, data)

    def write_line(self, spa: int, asid: int, c: bool, data: bytes | bytearray) -> None:
        """Write a 64-byte line back to DRAM in domain (asid, c)."""
        if c:
            self.lines_encrypted += 1
            enc = self._line_enc.get(asid)
            if enc is None:
                raise KeySlotError(f"no key is loaded for ASID {asid}")
            data = enc(spa, data)
        self.dram.write_line(spa, data)

    def write_run(self, spa: int, asid: int, c: bool, data: bytes | bytearray | memoryview) -> None:
        """Write consecutive 64-byte lines back from the line-aligned ``spa`` in domain (asid, c):
        the same DRAM bytes as :meth:`write_line` for each, encrypted by the cipher's bulk path
        (the write-back of a large flush)."""
        if c:
            cipher = self._slots.get(asid)
            if cipher is None:
                if asid not in self._line_enc:
                    raise KeySlotError(f"no key is loaded for ASID {asid}")
                cipher = self._scrap(asid)  # a cleared slot (module docstring)
            self.lines_encrypted += len(data) // LINE
            data = cipher.encrypt_bulk(spa, data)
        self.dram.write_lines(spa, data)

    # ---- bulk path (DMA, firmware in-place operations) --------------------------------------
    def read(self, spa: int, length: int, asid: int, c: bool) -> bytes:
        """``length`` bytes at line-aligned ``spa`` through domain (asid, c), bypassing the caches."""
        self._check_bulk(spa, length)
        raw = self.dram.read(spa, length)
        if not c:
            return raw
        return bytes(self._cipher(asid).decrypt_bulk(spa, raw))

    def read_into(self, spa: int, out: bytearray | memoryview, asid: int, c: bool) -> None:
        """:meth:`read` of ``len(out)`` bytes into the caller's buffer (decrypted in place there: a
        bulk transfer that reuses its buffer)."""
        view = memoryview(out).cast("B")
        self._check_bulk(spa, len(view))
        cipher = self._cipher(asid) if c else None  # (no key: nothing is read)
        if cipher is not None and len(view) >= _FUSED_MIN \
                and cipher.decrypt_from_pages(spa, self.dram.pages_dict(), view):
            return  # (large reads: one fused pass from the pages, the same bytes)
        self.dram.read_into(spa, view)
        if cipher is not None:
            cipher.decrypt_bulk_into(spa, view, view)

    def read_pages_into(self, spas: npt.NDArray[np.uint64], out: bytearray | memoryview, asid: int) -> None:
        """:meth:`read_into` through (asid, C=1) of whole pages that need not be consecutive: page k of
        ``out`` (4 KiB per SPA) from the page-aligned ``spas[k]``, in one pass where the accelerator
        has it (:meth:`MemoryCipher.decrypt_pages_gather`), else page by page.  Every SPA is checked
        first: a refused transfer changes nothing."""
        view = memoryview(out).cast("B")
        column = self.page_column(spas, len(view), "out")
        if not len(column):
            return
        cipher = self._cipher(asid)
        if cipher.decrypt_pages_gather(column >> np.uint64(12), self.dram.pages_dict(), view):
            return
        for k, spa in enumerate(column.tolist()):
            self.read_into(spa, view[k * PAGE : (k + 1) * PAGE], asid, True)

    def write_pages(self, spas: npt.NDArray[np.uint64], data: bytes | bytearray | memoryview, asid: int) -> None:
        """:meth:`write` through (asid, C=1) of whole pages that need not be consecutive: page k of
        ``data`` (4 KiB per SPA) to the page-aligned ``spas[k]``, in order (a repeated SPA ends with
        its last page), in one pass where the accelerator has it
        (:meth:`MemoryCipher.encrypt_pages_scatter`), else page by page.  Every SPA is checked
        first: a refused transfer changes nothing."""
        view = memoryview(data).cast("B")
        column = self.page_column(spas, len(view), "data")
        if not len(column):
            return
        cipher = self._cipher(asid)
        if cipher.encrypt_pages_scatter(column >> np.uint64(12), view, self.dram.pages_dict()):
            return
        for k, spa in enumerate(column.tolist()):
            self.write(spa, view[k * PAGE : (k + 1) * PAGE], asid, True)

    def page_column(self, spas: npt.NDArray[np.uint64], nbytes: int, name: str) -> npt.NDArray[np.uint64]:
        """The SPAs of a page-list transfer as a u64 column, checked: ``nbytes`` (of ``name``) is 4 KiB
        per SPA, each SPA page-aligned (the first that is not, named) and its page inside DRAM."""
        column = np.ascontiguousarray(spas, dtype=np.uint64)
        if nbytes != PAGE * len(column):
            raise InputError(f"{name} has {nbytes} bytes for {len(column)} pages")
        if len(column):
            if (column % np.uint64(PAGE)).any():
                bad = int(column[(column % np.uint64(PAGE)) != 0][0])
                raise AlignmentError(f"page transfers take page-aligned SPAs: {bad:#x}")
            self.dram.check_range(int(column.max()), PAGE)
        return column

    def write(self, spa: int, data: bytes | bytearray | memoryview, asid: int, c: bool) -> None:
        """Store ``data`` at line-aligned ``spa`` through domain (asid, c), bypassing the caches.

        Encrypted in chunks through one buffer reused by every call of the thread (no ciphertext
        copy of the whole range, no fresh allocation); the whole range is checked first, so a
        refused transfer changes nothing."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_bulk(spa, n)
        if not c:
            self.dram.write(spa, view)
            return
        cipher = self._cipher(asid)
        if n >= _FUSED_MIN and cipher.encrypt_to_pages(spa, view, self.dram.pages_dict()):
            return  # (large XE/XEX writes: one fused pass straight into the pages, the same bytes)
        buf = _scratch()
        for pos in range(0, n, _CHUNK):
            part = view[pos : pos + _CHUNK]
            out = buf[: len(part)]
            cipher.encrypt_bulk_into(spa + pos, part, out)
            self.dram.write(spa + pos, out)

    def encrypt_in_place(self, spa: int, length: int, asid: int, *, hashes: bool = False) -> bytes:
        """Encrypt the ``length`` bytes at line-aligned ``spa`` in DRAM with the key of ``asid``
        where they are, bypassing the caches, and return the bytes DRAM held there before: what
        :meth:`read` through (asid, C=0) then :meth:`write` of those bytes through (asid, C=1) give,
        in one pass where the accelerator has it (:meth:`MemoryCipher.encrypt_pages_in_place`).
        The whole range is checked first: a refused transfer changes nothing.  ``hashes`` (a
        page-aligned range): the SHA-384 of each 4 KiB page of those bytes instead (48 bytes a page;
        :meth:`MemoryCipher.encrypt_pages_in_place`: hashed in the same pass, no copy of the range)."""
        self._check_bulk(spa, length)
        if hashes and (spa | length) % PAGE:
            raise AlignmentError(f"page hashes take whole pages: {spa:#x}+{length:#x}")
        cipher = self._cipher(asid)
        before = cipher.encrypt_pages_in_place(spa, length, self.dram.pages_dict(), hashes=hashes)
        if before is None:
            before = self.dram.read(spa, length)
            self.write(spa, before, asid, True)
            if hashes:
                return sha384_pages(before, PAGE)
        return before

    def measure_in_place(self, spa: int, length: int, asid: int, sha: Sha256) -> bool:
        """Hash the ``length`` bytes DRAM holds at line-aligned ``spa`` into ``sha``, then encrypt them
        there with the key of ``asid``, bypassing the caches: the digest and the DRAM contents of
        :meth:`encrypt_in_place` followed by hashing the bytes it returns, in one pass without a copy
        where the accelerator has it (:meth:`MemoryCipher.measure_pages_in_place`).  False, with
        nothing done, otherwise.  The whole range is checked first: a refused transfer changes nothing."""
        self._check_bulk(spa, length)
        return self._cipher(asid).measure_pages_in_place(spa, length, self.dram.pages_dict(), sha)

    def write_small(self, spa: int, data: bytes | bytearray, asid: int) -> None:
        """:meth:`write` of at most a page through domain (asid, C=1), in fewer steps: the same checks
        first (nothing changes when one fails), the ciphertext from :meth:`MemoryCipher.encrypt_small`."""
        self._check_bulk(spa, len(data))
        self.dram.write(spa, self._cipher(asid).encrypt_small(spa, data))

    def write_page(self, spa: int, data: bytes | bytearray, asid: int) -> None:
        """:meth:`write_small` of one whole page at a page-aligned ``spa``: the ciphertext encrypted
        straight into the DRAM page in one fused pass where the accelerator has it
        (:meth:`MemoryCipher.encrypt_to_pages`: the same bytes), else as :meth:`write_small`."""
        n = len(data)
        self._check_bulk(spa, n)
        cipher = self._cipher(asid)
        if n != PAGE or spa % PAGE or not cipher.encrypt_to_pages(spa, data, self.dram.pages_dict()):
            self.dram.write(spa, cipher.encrypt_small(spa, data))

    def _check_bulk(self, spa: int, length: int) -> None:
        if spa % LINE or length % LINE:
            raise AlignmentError(f"memory-controller transfers are whole 64-byte lines: {spa:#x}+{length:#x}")
        self.dram.check_range(spa, length)


class KeySlotPort:
    """The Secure Processor's private port into the memory controller's key slots."""

    __slots__ = ("_mc",)

    def __init__(self, mc: MemoryController) -> None:
        self._mc = mc

    def load(self, asid: int, key: bytes) -> None:
        """Install ``key`` for ``asid`` (ACTIVATE); the ASID is valid for VMRUN from now on."""
        mc = self._mc
        if not 1 <= asid <= mc.max_asid:
            raise AsidError(f"ASID {asid} is outside 1..{mc.max_asid}")
        key = bytes(key)
        mc._install(asid, MemoryCipher(mc.mode, key, mc.tweaks), key)  # KeySizeError for a wrong size
        mc._valid.add(asid)

    def invalidate(self, asid: int) -> None:
        """Mark ``asid`` invalid for VMRUN (DEACTIVATE, SHUTDOWN, INIT); the key stays loaded, so
        lines of that ASID still in the caches are written back encrypted as before."""
        self._mc._valid.discard(asid)

    def valid(self, asid: int) -> bool:
        """Whether ``asid`` is loaded and valid for VMRUN."""
        return self._mc.asid_valid(asid)

    def clear(self, asid: int) -> None:
        """Remove the key of ``asid`` (the slot reads as empty afterwards; lines of the ASID still
        cached are written back under an unknown random key: see the module docstring)."""
        if asid == 0:
            raise AsidError("slot 0 holds the host SME key and cannot be cleared")
        self._mc._remove(asid)

    def loaded(self, asid: int) -> bool:
        return asid in self._mc._slots
