"""The SoC's cache: set-associative, write-back, LRU, lines tagged by encryption domain.

Inside the SoC data is plaintext (APM 15.34.7, reference 4.2).  Each 64-byte line is tagged with the
domain of the access that brought it in, ``(ASID, C-bit)``, and its SPA; a lookup matches all three,
so a line of one ASID never serves another.  Lines reach DRAM only through the memory controller,
which encrypts them with the key of their own tag on eviction, CLFLUSH, VMPAGE_FLUSH or WBINVD.

Unencrypted accesses (C=0) carry no key, so they all share one domain ``(0, 0)`` whoever makes them:
that is why a shared (C=0) page works as a bounce buffer between a guest and the host without
flushes.  Encrypted lines of different ASIDs (or the same SPA seen with and without the C-bit) are
*not* coherent unless the profile has hardware-enforced coherency (CPUID Fn8000_001F EAX[10]):
two lines for one SPA may coexist, and whichever is written back last wins in DRAM — the reason the
hypervisor must flush before changing a page's key or C-bit (reference 4.2).  With the coherency
feature, a fill evicts (writing back) every other-domain line of the same SPA first.

The whole cache hierarchy is modelled as one shared level: private L1/L2 levels would change timing,
which this model does not claim, but not which bytes reach DRAM.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from sevemu.errors import AlignmentError, InputError
from sevemu.hw.dram import LINE
from sevemu.hw.memctl import MemoryController

__all__ = ["Cache", "tag_key", "key_domain", "C_SHIFT", "ASID_SHIFT", "SPA_MASK"]

C_SHIFT = 52
ASID_SHIFT = 53
SPA_MASK = (1 << C_SHIFT) - 1
_LINE_MASK = ~(LINE - 1)


def tag_key(asid: int, c: bool, spa: int) -> int:
    """The cache key of the line holding ``spa`` in domain (asid, c)."""
    if not c:
        asid = 0
    return (asid << ASID_SHIFT) | (int(c) << C_SHIFT) | (spa & _LINE_MASK)


def key_domain(key: int) -> tuple[int, bool, int]:
    """(asid, c, line spa) of a cache key."""
    return key >> ASID_SHIFT, bool((key >> C_SHIFT) & 1), key & SPA_MASK


class Cache:
    """Set-associative write-back cache with LRU replacement, in front of the memory controller."""

    def __init__(self, mc: MemoryController, size: int = 4 << 20, ways: int = 16,
                 coherent: bool = False) -> None:
        nsets = size // (LINE * ways)
        if nsets <= 0 or nsets & (nsets - 1) or nsets * LINE * ways != size:
            raise InputError(f"cache of {size} bytes, {ways} ways: the set count must be a power of two")
        self.mc = mc
        self._read_line = mc.read_line
        self.size = size
        self.ways = ways
        self.coherent = coherent
        self.set_mask = nsets - 1
        # each set maps cache key -> the line's 64 plaintext bytes, in LRU order (oldest first)
        self.sets: list[OrderedDict[int, bytearray]] = [OrderedDict() for _ in range(nsets)]
        self.dirty: set[int] = set()
        """Keys of the lines modified since they were filled (written back on eviction)."""
        self.hits = 0
        self.misses = 0
        self.writebacks = 0
        self.flush_epoch = 0
        """Number of completed WBINVDs; the Secure Processor reads it to enforce ASID-reuse rules."""

    # ---- the lookup every access goes through -------------------------------------------------
    def line(self, key: int) -> bytearray:
        """The plaintext of the line for cache key ``key`` (see :func:`tag_key`), filled on a miss.

        A caller that modifies the bytes must add ``key`` to :attr:`dirty`.
        """
        s = self.sets[(key >> 6) & self.set_mask]
        line = s.get(key)
        if line is not None:
            s.move_to_end(key)
            self.hits += 1
            return line
        # miss: make room (LRU victim, written back if dirty), then fill through the memory controller
        self.misses += 1
        spa = key & SPA_MASK
        if self.coherent:
            for other in [k for k in s if k & SPA_MASK == spa]:
                self._writeback(other, s.pop(other))
        if len(s) >= self.ways:
            victim, old = s.popitem(last=False)
            if victim in self.dirty:
                self._writeback(victim, old)
        line = s[key] = bytearray(self._read_line(spa, key >> ASID_SHIFT, (key >> C_SHIFT) & 1))
        return line

    def _writeback(self, key: int, line: bytearray) -> None:
        if key in self.dirty:
            self.dirty.discard(key)
            self.writebacks += 1
            self.mc.write_line(key & SPA_MASK, key >> ASID_SHIFT, bool((key >> C_SHIFT) & 1), line)

    # ---- multi-byte helpers (host accesses, page-table walks, tests) -------------------------
    def read(self, asid: int, c: bool, spa: int, length: int) -> bytes:
        """``length`` bytes at ``spa`` in domain (asid, c), through the cache."""
        out = bytearray()
        pos = spa
        end = spa + length
        while pos < end:
            off = pos & (LINE - 1)
            n = min(LINE - off, end - pos)
            out += self.line(tag_key(asid, c, pos))[off : off + n]
            pos += n
        return bytes(out)

    def write(self, asid: int, c: bool, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``spa`` in domain (asid, c), through the cache (write-allocate)."""
        view = memoryview(data).cast("B")
        pos = 0
        length = len(view)
        while pos < length:
            addr = spa + pos
            off = addr & (LINE - 1)
            n = min(LINE - off, length - pos)
            key = tag_key(asid, c, addr)
            self.line(key)[off : off + n] = view[pos : pos + n]
            self.dirty.add(key)
            pos += n

    # ---- maintenance --------------------------------------------------------------------------
    def clflush(self, asid: int, c: bool, spa: int) -> bool:
        """CLFLUSH: write back and invalidate the line of ``spa`` in domain (asid, c) only.

        Returns whether a line was present.  A host CLFLUSH names the host's own domain, so it
        does not evict guest-tagged lines (reference 4.2).
        """
        key = tag_key(asid, c, spa)
        s = self.sets[(key >> 6) & self.set_mask]
        line = s.pop(key, None)
        if line is None:
            return False
        self._writeback(key, line)
        return True

    def flush_range(self, asid: int, c: bool, spa: int, length: int) -> None:
        """CLFLUSH every line of ``[spa, spa+length)`` in domain (asid, c)."""
        for addr in range(spa & _LINE_MASK, spa + length, LINE):
            self.clflush(asid, c, addr)

    def vmpage_flush(self, asid: int, spa: int) -> int:
        """VMPAGE_FLUSH MSR: write back and invalidate the encrypted lines of one 4 KiB page of ``asid``."""
        if spa & 0xFFF:
            raise AlignmentError(f"VMPAGE_FLUSH takes a page address, got {spa:#x}")
        n = 0
        for addr in range(spa, spa + 4096, LINE):
            n += self.clflush(asid, True, addr)
        return n

    def wbinvd(self) -> int:
        """WBINVD: write back every dirty line and invalidate the whole cache; returns lines written."""
        before = self.writebacks
        for s in self.sets:
            for key, line in s.items():
                self._writeback(key, line)
            s.clear()
        self.flush_epoch += 1
        return self.writebacks - before

    def invalidate_all(self) -> None:
        """INVD: drop every line without writing anything back."""
        for s in self.sets:
            s.clear()
        self.dirty.clear()

    # ---- inspection ---------------------------------------------------------------------------
    def resident(self) -> Iterator[tuple[int, bool, int, bool]]:
        """(asid, c, spa, dirty) of every resident line."""
        for s in self.sets:
            for key in s:
                asid, c, spa = key_domain(key)
                yield asid, c, spa, key in self.dirty

    def peek(self, asid: int, c: bool, spa: int) -> bytes | None:
        """The cached plaintext of a line without touching LRU state or filling; None if absent."""
        key = tag_key(asid, c, spa)
        line = self.sets[(key >> 6) & self.set_mask].get(key)
        return None if line is None else bytes(line)
