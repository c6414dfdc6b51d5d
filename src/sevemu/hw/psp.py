"""The AMD Secure Processor (PSP) as a device: mailbox registers and the PSP's private ports.

x86 software talks to the firmware only through the mailbox (Linux drivers/crypto/ccp/sev-dev.c
``__sev_do_cmd_locked``; register interface in
:mod:`sevemu.abi.mailbox`): it writes the command buffer's physical address to CMDBUFF_ADDR_LO/HI,
then the command id to CMDRESP; the PSP runs the command and answers ``RESP | status`` in CMDRESP.
The model executes the command synchronously inside the CMDRESP write.

Behind the mailbox sits whatever :meth:`Psp.install` received (the firmware, wired by the
composition root).  The firmware reaches the rest of the SoC only through :class:`PspPorts`:

* ``keys``: the memory controller's key-slot port (nobody else has it);
* ``dma``: the PSP's view of memory (:class:`PspDma`): unencrypted accesses are coherent with the
  host's unencrypted cache lines (the PSP snoops them, as DMA does); encrypted accesses go straight
  through the memory controller with the named key and are *not* coherent with the caches -- which
  is why KVM flushes guest pages before LAUNCH_UPDATE_DATA and WBINVDs before DF_FLUSH;
* ``flush_epoch``: a count of completed WBINVDs (the hardware signal the firmware uses for the
  WBINVD_REQUIRED rule);
* ``trng``: the PSP's random-number generator;
* ``rmp``: on an SEV-SNP part, the Reverse Map Table's firmware port (:class:`~sevemu.hw.rmp.RmpFirmwarePort`).
* ``mailbox``: the PSP's side of its own mailbox registers (:class:`MailboxPort`): what ring-buffer
  mode needs (RING_BUFFER, :mod:`sevemu.firmware.ring`) -- the PSP reads x86's RBCtl/RBTail, writes
  RBHead, raises the interrupt and tells the device that from now on every CMDRESP write is a
  doorbell rather than a command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from sevemu._util.units import LINE, PAGE
from sevemu.abi.mailbox import (
    CMDRESP_RESP,
    INTSTS_CMD_COMPLETE,
    MailboxReg,
    PspCapability,
    decode_command,
    encode_response,
)
from sevemu.abi.status import Status
from sevemu.crypto.sha256 import Sha256
from sevemu.errors import AddressError
from sevemu.hw import columns, memaccel
from sevemu.hw.cache import Cache, tag_key
from sevemu.hw.memctl import KeySlotPort, MemoryController
from sevemu.hw.profiles import CpuProfile
from sevemu.hw.rmp import Rmp, RmpFirmwarePort

_CMDRESP = int(MailboxReg.CMDRESP)
_ADDR_LO = int(MailboxReg.CMDBUFF_ADDR_LO)
_ADDR_HI = int(MailboxReg.CMDBUFF_ADDR_HI)
_INTSTS = int(MailboxReg.INTSTS)
_ZERO_PAGE = bytes(PAGE)

__all__ = ["MailboxHandler", "MailboxPort", "Psp", "PspDma", "PspPorts", "RingHandler"]


class MailboxHandler(Protocol):
    """What runs behind the mailbox: takes a command id and buffer address, returns a status."""

    def handle(self, command: int, buffer_paddr: int) -> int: ...


@runtime_checkable
class RingHandler(Protocol):
    """A handler that can put the mailbox in ring-buffer mode: answers each doorbell."""

    def doorbell(self) -> None: ...


class PspDma:
    """The Secure Processor's access to system memory (see the module docstring)."""

    def __init__(self, cache: Cache, mc: MemoryController, cbit: int, rmp: Rmp | None = None) -> None:
        self._cache = cache
        self._mc = mc
        self._rmp = rmp
        self.cbit_mask = 1 << cbit

    def guest_owned(self, spa: int, length: int) -> bool:
        """Whether SNP is enabled and a page of ``[spa, spa+length)`` belongs to a guest in the RMP
        (Assigned with a non-zero ASID): the firmware never writes such a page for the host
        (AMD-ASPFW ``check_page_range_firmware_writable``)."""
        rmp = self._rmp
        if rmp is None or not rmp.enabled or length <= 0:
            return False
        return rmp.guest_page_in(spa, length)

    def strip(self, paddr: int) -> tuple[int, bool]:
        """(SPA, C-bit) of a physical address as software passes it (the C-bit may be set)."""
        return paddr & ~self.cbit_mask, bool(paddr & self.cbit_mask)

    def check(self, spa: int, length: int) -> None:
        """AddressError unless ``[spa, spa+length)`` lies in DRAM."""
        self._mc.dram.check_range(spa, length)

    def read(self, spa: int, length: int) -> bytes:
        """Unencrypted read, coherent with the host's unencrypted cache lines.

        A snoop is answered by a cache only for a line it holds modified; a clean line holds what
        DRAM holds, so only the dirty host-domain lines of the range are merged in.  Large ranges
        visit the dirty lines instead of every address.  (A private level above the cache -- the
        Unicorn engine's page pool -- holds no unwritten modification while the PSP runs: it writes
        back at every #VMEXIT.)
        """
        dram = self._mc.dram
        dram.check_range(spa, length)
        key = spa & ~(LINE - 1)
        if 0 < length and spa + length <= key + LINE:  # within one line (a command buffer): snoop that line
            off = spa - key
            if key in self._cache.dirty:
                line = self._cache.sets[(key >> 6) & self._cache.set_mask].get(key)
                if line is not None:
                    return bytes(line[off : off + length])
            return dram.read_line(key)[off : off + length]
        data = dram.read(spa, length)
        keys = self._dirty_host_lines(spa, length)
        if not keys:
            return data
        out = bytearray(data)
        self._merge(spa, keys, memoryview(out))
        return bytes(out)

    def read_into(self, spa: int, out: bytearray | memoryview) -> None:
        """:meth:`read` of ``len(out)`` bytes into the caller's buffer (a bulk transfer that reuses
        its buffers)."""
        view = memoryview(out).cast("B")
        self._mc.dram.read_into(spa, view)
        keys = self._dirty_host_lines(spa, len(view))
        if keys:
            self._merge(spa, keys, view)

    def _dirty_host_lines(self, spa: int, length: int) -> list[int]:
        """Keys of the host's dirty unencrypted lines of a range, ascending (domain (0, C=0) keys
        are SPAs)."""
        dirty = self._cache.dirty
        first = spa & ~(LINE - 1)
        end = spa + length
        if memaccel.ENABLED:  # the same keys, in C
            found = memaccel.helpers.resident_keys([dirty], 0, first, end)
            if found is not None:  # (None: the dirty set is a set subclass, answered in Python below)
                return found
        if (end - first) // LINE <= len(dirty):
            return [k for k in range(first, end, LINE) if k in dirty]
        return sorted(k for k in dirty if first <= k < end)

    def _merge(self, spa: int, keys: list[int], out: memoryview) -> None:
        cache = self._cache
        end = spa + len(out)
        for key in keys:
            line = cache.sets[(key >> 6) & cache.set_mask].get(key)
            if line is None:
                continue
            lo = max(key, spa)
            hi = min(key + LINE, end)
            out[lo - spa : hi - spa] = line[lo - key : hi - key]

    def write(self, spa: int, data: bytes | bytearray | memoryview, *, guest_ok: bool = False) -> None:
        """Unencrypted write; host copies of those lines (this cache and private levels above it)
        are written back and invalidated first.  AddressError for a guest-owned SNP page unless
        ``guest_ok`` (the firmware's own write-back of a Pre-Guest CPUID page)."""
        self._mc.dram.check_range(spa, len(data))
        if not guest_ok and self.guest_owned(spa, len(data)):
            raise AddressError(f"SPA {spa:#x}+{len(data):#x} is an SNP guest's page: the PSP does not write it")
        self._cache.flush_range(0, False, spa, len(data))
        self._mc.dram.write(spa, data)

    def fill_pages(self, runs: list[tuple[int, int]], fill: Callable[[dict[int, bytearray]], None]) -> None:
        """An unencrypted write of whole pages made in place: each run ``(spa, length)`` (page-aligned)
        is checked and its host lines written back and invalidated, as :meth:`write` does, then
        ``fill`` gets DRAM's page store (PFN -> 4 KiB bytearray) and writes every byte of those
        pages, storing absent ones (the firmware sealing packets straight into a DMA run:
        :meth:`~sevemu.crypto.transport.PacketCrypto.seal_many_to_pages`).  Nothing is flushed or
        written unless every run passes."""
        dram = self._mc.dram
        for spa, length in runs:
            dram.check_range(spa, length)
            if (spa | length) % PAGE:
                raise AddressError(f"fill_pages takes whole pages, got {spa:#x}+{length:#x}")
            if self.guest_owned(spa, length):
                raise AddressError(f"SPA {spa:#x}+{length:#x} is an SNP guest's page: the PSP does not write it")
        for spa, length in runs:
            self._cache.flush_range(0, False, spa, length)
        fill(dram.pages_dict())

    def write_rows(self, spa: int, stride: int, rows: npt.NDArray[np.uint8]) -> bool:
        """An unencrypted write of ``rows`` (n x size bytes) at ``spa + i * stride``, the bytes
        between rows left as they are, made in place in DRAM's pages: the range is checked and its
        host lines written back and invalidated, as :meth:`write` of the span (with the bytes
        between rows read back) does, then each row stored in its page.  Only when no row crosses a
        page (``stride`` divides a page and ``spa`` is a multiple of it; ``size <= stride``);
        False, with nothing done, otherwise (the caller writes the span)."""
        n, size = rows.shape
        if not n or not 0 < size <= stride or PAGE % stride or spa % stride:
            return False
        span = stride * (n - 1) + size
        self._mc.dram.check_range(spa, span)
        if self.guest_owned(spa, span):
            raise AddressError(f"SPA {spa:#x}+{span:#x} is an SNP guest's page: the PSP does not write it")
        self._cache.flush_range(0, False, spa, span)
        pages = self._mc.dram.pages_dict()
        if memaccel.COLUMNS:  # (the same stores, in one call)
            memaccel.helpers.dram_scatter_rows(pages, spa, stride, rows.data if rows.flags.c_contiguous
                                               else np.ascontiguousarray(rows).data, size)
            return True
        per_page = PAGE // stride
        i = 0
        while i < n:
            at = spa + i * stride
            page = pages.get(at >> 12)
            if page is None:
                page = pages[at >> 12] = bytearray(PAGE)
            first = (at & (PAGE - 1)) // stride
            k = min(per_page - first, n - i)
            np.frombuffer(page, dtype=np.uint8).reshape(per_page, stride)[first : first + k, :size] = rows[i : i + k]
            i += k
        return True

    def read_pages(self, runs: list[tuple[int, int]], use: Callable[[dict[int, bytearray]], int]) -> int | None:
        """An unencrypted read of whole pages where they lie: when no run (page-aligned, checked
        as :meth:`read` does) holds a dirty host line -- so DRAM's pages are what a coherent read
        returns -- ``use`` gets DRAM's page store (PFN -> 4 KiB bytearray; an absent page reads as
        zeros) to read those pages in place, without changing it, and its answer is returned;
        otherwise None (nothing read: the caller reads through :meth:`read_into`)."""
        dram = self._mc.dram
        for spa, length in runs:
            dram.check_range(spa, length)
            if (spa | length) % PAGE:
                raise AddressError(f"read_pages takes whole pages, got {spa:#x}+{length:#x}")
        if any(self._dirty_host_lines(spa, length) for spa, length in runs):
            return None
        return use(dram.pages_dict())

    def evict(self, spa: int, length: int) -> None:
        """Write back and drop the host's (unencrypted) cached lines of a range, DRAM otherwise
        unchanged: what :meth:`write` of the range's own bytes does, without the copies."""
        self._mc.dram.check_range(spa, length)
        self._cache.flush_range(0, False, spa, length)

    def zero_encrypted(self, spa: int, length: int, asid: int) -> None:
        """:meth:`evict` of the range, then zeros written with the key of ``asid`` (:meth:`write_encrypted`
        of ``bytes(length)``): the firmware's ZERO page, in one step."""
        mc = self._mc
        mc.dram.check_range(spa, length)
        self._cache.flush_range(0, False, spa, length)
        if length == PAGE:
            mc.write_page(spa, _ZERO_PAGE, asid)
        else:
            mc.write(spa, bytes(length), asid, True)

    def read_invalidate(self, spa: int, length: int) -> bytes:
        """Unencrypted read that also writes back and invalidates the host's lines of the range (the
        read-sized write-back-invalidate AMD's firmware sets around SNP_LAUNCH_UPDATE, AMD-ASPFW
        ``set_misc_read_sized_wrbkinvd``): no stale host line is left to be written back over what the
        firmware writes encrypted next."""
        self.evict(spa, length)
        return self._mc.dram.read(spa, length)

    def encrypt_in_place(self, spa: int, length: int, asid: int, *, hashes: bool = False) -> bytes:
        """:meth:`read_invalidate` of the range, then :meth:`write_encrypted` of what was read with
        the key of ``asid``, in one step (the memory controller's
        :meth:`~sevemu.hw.memctl.MemoryController.encrypt_in_place`): the bytes read are returned,
        DRAM holds them encrypted, and no host line of the range is left cached.  ``hashes`` (whole
        pages): the SHA-384 of each 4 KiB page of the bytes read, instead of the bytes (48 a page,
        hashed in the same pass)."""
        mc = self._mc
        mc.dram.check_range(spa, length)
        self._cache.flush_range(0, False, spa, length)
        return mc.encrypt_in_place(spa, length, asid, hashes=hashes)

    def measure_clean(self, spa: int, length: int, asid: int, sha: Sha256) -> bool:
        """:meth:`read` of the line-aligned range, the bytes read hashed into ``sha``, then
        :meth:`write_encrypted` of them with the key of ``asid`` -- in one pass where the range lies,
        without a copy (the memory controller's
        :meth:`~sevemu.hw.memctl.MemoryController.measure_in_place`), when the range holds no dirty
        host line, so that what a coherent read returns is what DRAM holds.  The host's cached lines
        are left as they are, as :meth:`write_encrypted` leaves them.  False, with nothing read or
        written, when a dirty host line lies in the range (the caller then reads and writes as two
        steps: the dirty line is read, and later written back over the ciphertext, as on hardware)
        or where the accelerator cannot do it."""
        mc = self._mc
        mc.dram.check_range(spa, length)
        if self._dirty_host_lines(spa, length):
            return False
        return mc.measure_in_place(spa, length, asid, sha)

    def read_encrypted(self, spa: int, length: int, asid: int) -> bytes:
        """Read with the key of ``asid`` straight from DRAM (not coherent with the caches)."""
        return self._mc.read(spa, length, asid, True)

    def read_encrypted_into(self, spa: int, out: bytearray | memoryview, asid: int) -> None:
        """:meth:`read_encrypted` of ``len(out)`` bytes into the caller's buffer (the PSP's own
        memory: a bulk transfer that reuses its buffer)."""
        self._mc.read_into(spa, out, asid, True)

    def read_encrypted_pages_into(self, spas: npt.NDArray[np.uint64], out: bytearray | memoryview, asid: int) -> None:
        """:meth:`read_encrypted_into` of whole pages at page-aligned SPAs that need not be consecutive
        (page k of ``out`` from ``spas[k]``), in one pass: a guest whose backing is scattered costs
        what a contiguous one does."""
        self._mc.read_pages_into(spas, out, asid)

    def write_encrypted_pages(self, spas: npt.NDArray[np.uint64], data: bytes | bytearray | memoryview,
                              asid: int) -> None:
        """:meth:`write_encrypted` of whole pages at page-aligned SPAs that need not be consecutive
        (page k of ``data`` to ``spas[k]``, in order), in one pass."""
        self._mc.write_pages(spas, data, asid)

    def evict_pages(self, spas: npt.NDArray[np.uint64]) -> None:
        """:meth:`evict` of each page at the page-aligned ``spas`` (all checked first; physically
        consecutive pages flushed as one range)."""
        flush = self._cache.flush_range
        for _, spa, length in columns.runs(self._mc.page_column(spas, PAGE * len(spas), "spas"), PAGE):
            flush(0, False, spa, length)  # (equivalent mutant: any ASID here, C=0 lines are the host's)

    def write_encrypted(self, spa: int, data: bytes | bytearray | memoryview, asid: int) -> None:
        """Write with the key of ``asid`` straight to DRAM (not coherent with the caches)."""
        if len(data) <= PAGE and not isinstance(data, memoryview):  # (a page: the controller's short path)
            if len(data) == PAGE:
                self._mc.write_page(spa, data, asid)
            else:
                self._mc.write_small(spa, data, asid)
            return
        self._mc.write(spa, data, asid, True)

    def cached_lines(self, asid: int, c: bool, spa: int, length: int) -> int:
        """How many lines of the range are resident in domain (asid, c) (firmware sanity checks)."""
        n = 0
        for line_spa in range(spa & ~(LINE - 1), spa + length, LINE):
            key = tag_key(asid, c, line_spa)
            n += self._cache.sets[(key >> 6) & self._cache.set_mask].get(key) is not None
        return n


class MailboxPort:
    """The PSP's side of its mailbox registers (module docstring)."""

    __slots__ = ("_psp",)

    def __init__(self, psp: Psp) -> None:
        self._psp = psp

    def read(self, reg: MailboxReg) -> int:
        return self._psp._regs[reg]

    def write(self, reg: MailboxReg, value: int) -> None:
        self._psp._regs[reg] = value & 0xFFFFFFFF

    def interrupt(self) -> None:
        """Raise the completion interrupt (INTSTS bit 1)."""
        self._psp._regs[MailboxReg.INTSTS] |= INTSTS_CMD_COMPLETE

    def ring_mode(self, on: bool) -> None:
        """From now on, CMDRESP writes are doorbells (on) or commands (off)."""
        self._psp.ring = on


@dataclass(frozen=True)
class PspPorts:
    """Everything the firmware may touch besides its own state (see the module docstring)."""

    profile: CpuProfile
    keys: KeySlotPort
    dma: PspDma
    flush_epoch: Callable[[], int]
    trng: Callable[[int], bytes] = os.urandom
    rmp: RmpFirmwarePort | None = None
    """The firmware's port into the Reverse Map Table (SEV-SNP parts only)."""
    mailbox: MailboxPort | None = None
    """Given by the PSP device itself (:meth:`Psp.take_ports`)."""


class Psp:
    """The PSP mailbox device."""

    def __init__(self, ports: PspPorts) -> None:
        self._ports: PspPorts | None = replace(ports, mailbox=MailboxPort(self))
        self._handler: MailboxHandler | None = None
        self._ring_handler: RingHandler | None = None  # the handler when it answers doorbells
        self._regs: dict[int, int] = {r.value: 0 for r in MailboxReg}
        self._regs[MailboxReg.FEATURE] = int(PspCapability.SEV)
        self.commands = 0
        self.ring = False
        """Ring-buffer mode: a CMDRESP write is RBCtl, a doorbell (set by the firmware)."""

    def take_ports(self) -> PspPorts:
        """Hand the PSP's private ports to the firmware (once; the composition root does it)."""
        if self._ports is None:
            raise AddressError("the PSP ports were already handed to the firmware")
        ports, self._ports = self._ports, None
        return ports

    def install(self, handler: MailboxHandler) -> None:
        """Load the firmware that answers mailbox commands."""
        self._handler = handler
        # (checked once here: a runtime Protocol check costs a few microseconds per doorbell)
        self._ring_handler = handler if isinstance(handler, RingHandler) else None

    # ---- MMIO ----------------------------------------------------------------------------
    def mmio_read(self, offset: int) -> int:
        if offset not in self._regs:
            raise AddressError(f"no PSP mailbox register at offset {offset:#x}")
        return self._regs[offset]

    def mmio_write(self, offset: int, value: int) -> None:
        regs = self._regs
        if offset not in regs:
            raise AddressError(f"no PSP mailbox register at offset {offset:#x}")
        value &= 0xFFFFFFFF
        if offset != _CMDRESP:
            regs[offset] = value
            return
        ring_handler = self._ring_handler
        if self.ring and ring_handler is not None:
            regs[offset] = value  # RBCtl
            ring_handler.doorbell()
            return
        if value & CMDRESP_RESP:
            regs[offset] = value  # software clearing/acknowledging; not a command
            return
        self.commands += 1
        cmd = decode_command(value)
        paddr = regs[_ADDR_HI] << 32 | regs[_ADDR_LO]
        status = Status.INVALID_COMMAND if self._handler is None else self._handler.handle(cmd, paddr)
        regs[_CMDRESP] = encode_response(int(status))
        regs[_INTSTS] |= INTSTS_CMD_COMPLETE
