"""CPU cores: host accesses, VMRUN, and the guest memory port that instruction engines drive.

A :class:`Core` runs either the host (ASID 0) or, inside :meth:`Core.vmrun`, one guest vCPU described
by a :class:`~sevemu.hw.svm.Vmcb`.  VMRUN does the SEV consistency checks of APM2 15.34.3 (and
the ASID-valid state the Secure Processor keeps, SEV API 55766 ACTIVATE/DEACTIVATE), applies the VMCB's TLB_CONTROL, then hands a :class:`GuestCpu` to the vCPU's instruction engine
until the guest does something the hypervisor intercepts; the result is a :class:`~sevemu.hw.svm.VmExit`.

:class:`GuestCpu` is the interface an instruction engine plugs into (the Python workload engine of
:mod:`sevemu.hw.pyengine`, the x86 engine of :mod:`sevemu.hw.ucengine`): ``load``/``store``/``read``/
``write``/``fetch`` through the ASID-tagged TLB, the page walks and the cache; the guest's registers
in ``state`` (:class:`~sevemu.hw.svm.SaveState`: the VMCB's save area for plain and SEV guests) and
the control area in ``vmcb``.  What an instruction does beyond memory (MSRs, CPUID, I/O, VMGEXIT,
PVALIDATE ...) is decided once for both engines in :mod:`sevemu.hw.x86.insn`.  Everything a guest touches is plaintext
inside the SoC and ciphertext in DRAM.  Accesses raise :class:`~sevemu.hw.faults.PageFault` (the
guest's) or :class:`~sevemu.hw.faults.NestedPageFault` (becomes #VMEXIT(NPF)); an access never
half-happens: a faulting access changes no memory, so the instruction can be restarted.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sevemu._util.units import PAGE
from sevemu.abi.paging import ExitCode
from sevemu.errors import AddressError, HardwareError
from sevemu.hw import memaccel
from sevemu.hw.cache import ASID_SHIFT, C_SHIFT, Cache, tag_key
from sevemu.hw.codefetch import _CPU_ENGINES
from sevemu.hw.faults import GeneralProtection, NestedPageFault
from sevemu.hw.memctl import MemoryController
from sevemu.hw.mmu import Mmu, Translation
from sevemu.hw.profiles import CpuProfile
from sevemu.hw.svm import SaveState, TlbControl, Vmcb, VmcbCache, VmExit, vmrun_checks
from sevemu.hw.vmsa import VmsaUnit, _Held

if TYPE_CHECKING:
    from sevemu.hw.rmp import Rmp

__all__ = ["Core", "Engine", "ForeignEngineError", "GuestCpu", "Tlb"]

_SNP_ACTIVE = 1  # SEV_FEATURES bit 0
_C_KEY = 1 << C_SHIFT
_Q = struct.Struct("<Q")
_ES_COMPLETED = frozenset({int(ExitCode.VMGEXIT), int(ExitCode.HLT)})
"""Automatic exits of an SEV-ES guest after which it resumes past the instruction."""
_ES_WITH_INFO = frozenset({int(ExitCode.NPF)})
"""Automatic exits whose EXITINFO1/2 the hypervisor sees (the faulting GPA of an NPF)."""
_ES_BARE: dict[int, VmExit] = {int(ExitCode.VMGEXIT): VmExit(ExitCode.VMGEXIT)}
"""The exit-code-only exits VMRUN of an SEV-ES guest most often returns (one object each)."""
_CR0_PG = 1 << 31

# TLB entry flags
_W_OK = 1  # writable and the guest's Dirty bit already set
_X_OK = 2  # executable


class Tlb:
    """A core's TLB: translations tagged by ASID (one dictionary per ASID), bounded in size."""

    def __init__(self, entries: int = 2048) -> None:
        self.capacity = entries
        self.by_asid: dict[int, dict[int, tuple[int, int, int]]] = {}
        self.misses = 0
        self.rmp_epoch: dict[int, tuple[int, int]] = {}
        """ASID -> (RMP epoch (:attr:`~sevemu.hw.rmp.Rmp.epoch`), VMPL) of its cached SNP translations."""

    def for_asid(self, asid: int) -> dict[int, tuple[int, int, int]]:
        d = self.by_asid.get(asid)
        if d is None:
            d = self.by_asid[asid] = {}
        return d

    def insert(self, table: dict[int, tuple[int, int, int]], vpn: int, entry: tuple[int, int, int]) -> None:
        if len(table) >= self.capacity:
            del table[next(iter(table))]
        table[vpn] = entry

    def flush_asid(self, asid: int) -> None:
        self.by_asid.pop(asid, None)

    def flush_all(self) -> None:
        self.by_asid.clear()

    def asids(self) -> list[int]:
        return [a for a, d in self.by_asid.items() if d]


class ForeignEngineError(HardwareError):
    """Raised when VMRUN of an SEV guest is handed an engine that is not one of the CPU's own
    (:func:`sevemu.hw.codefetch.cpu_engine`): host code must not run with the guest's key."""


class Engine(Protocol):
    """An instruction engine: runs guest code on a :class:`GuestCpu` until an intercepted event.

    ``run`` returns the exit (HLT, IOIO, CPUID, MSR, VMMCALL, SHUTDOWN ...) with the guest's
    registers left in ``cpu.vmcb``; it lets :class:`NestedPageFault` propagate, leaving the
    faulting instruction to be restarted by the next ``run``.
    """

    def run(self, cpu: GuestCpu) -> VmExit: ...


class GuestCpu:
    """The guest's view of a core during VMRUN: memory port + register state (the VMCB save area)."""

    __slots__ = ("__weakref__", "_cache", "_dirty", "_fill", "_line", "_mmu", "_set_mask", "_sets", "_tlb",
                 "_tlb_insert", "asid", "core", "load", "rmp", "sev", "state", "store", "vmcb", "vmpl")

    load: Callable[[int, int], int]
    """load(gva, size): a little-endian integer of ``size`` (1, 2, 4, 8) bytes (:meth:`_load`, or the
    same in C: :meth:`~sevemu.hw.cache.Cache.port`)."""
    store: Callable[[int, int, int], None]
    """store(gva, size, value): the low ``size`` bytes of ``value``, little-endian (:meth:`_store`, or
    the same in C)."""

    def __init__(self, core: Core, vmcb: Vmcb, state: SaveState | None = None) -> None:
        self.core = core
        self.vmcb = vmcb
        self.state: SaveState = vmcb if state is None else state
        self.asid = vmcb.asid
        self.sev = vmcb.sev_enable
        rmp = core.rmp
        self.rmp: Rmp | None = rmp if (rmp is not None and vmcb.sev_es_enable
                                        and self.state.sev_features & _SNP_ACTIVE) else None
        """The RMP when this guest is SNP-active (its accesses are checked on every TLB fill), else None."""
        self.vmpl: int = getattr(self.state, "vmpl", 0) if self.rmp is not None else 0
        """The VMPL of the running VMSA (SNP): the RMP permission masks its accesses are checked against."""
        if self.rmp is not None:
            epochs = core.tlb.rmp_epoch
            mark = (self.rmp.epoch, self.vmpl)
            if epochs.get(vmcb.asid) != mark:  # the RMP changed since these verdicts were cached, or
                core.tlb.flush_asid(vmcb.asid)  # they were another VMPL's (the TLB is tagged by ASID)
                epochs[vmcb.asid] = mark
        self._tlb = core.tlb.for_asid(vmcb.asid)
        self._tlb_insert = core.tlb.insert
        self._line = core.cache.line
        self._cache = core.cache
        self._sets = core.cache.sets  # the cache never rebinds its set list
        self._set_mask = core.cache.set_mask
        self._fill = core.cache.fill
        self._dirty = core.cache.dirty.add
        self._mmu = core.mmu
        port = core.cache.port(weakref.ref(self), self._tlb)
        if port is None:  # (the Python path: bound methods, a cycle the garbage collector breaks)
            self.load, self.store = self._load, self._store
        else:
            self.load, self.store = port

    # ---- translation ------------------------------------------------------------------------
    def _walk(self, gva: int, write: bool, fetch: bool) -> tuple[int, int, int]:
        st = self.state
        self.core.tlb.misses += 1
        rmp = self.rmp
        t: Translation = self._mmu.translate(asid=self.asid, sev=self.sev, ncr3=self.vmcb.ncr3,
                                             paging=bool(st.cr0 & _CR0_PG), cr3=st.cr3, gva=gva, write=write,
                                             fetch=fetch, rmp=rmp, vmpl=self.vmpl)
        flags = (_W_OK if (write and t.writable) else 0) | (_X_OK if t.executable else 0)
        entry = (tag_key(t.data_asid, t.data_c, t.spa), flags, tag_key(t.fetch_asid, t.fetch_c, t.spa))
        self._tlb_insert(self._tlb, gva >> 12, entry)
        return entry

    def translate(self, gva: int, write: bool = False) -> Translation:
        """Walk (without the TLB) and return the translation; faults as an access would."""
        st = self.state
        return self._mmu.translate(asid=self.asid, sev=self.sev, ncr3=self.vmcb.ncr3, paging=bool(st.cr0 & _CR0_PG),
                                   cr3=st.cr3, gva=gva, write=write, fetch=False)

    # ---- the hot paths ----------------------------------------------------------------------
    def _load(self, gva: int, size: int) -> int:
        """Load a little-endian integer of ``size`` (1, 2, 4, 8) bytes."""
        e = self._tlb.get(gva >> 12)
        if e is None:
            e = self._walk(gva, False, False)
        off = gva & 63
        if off + size <= 64:
            # the cache's hit path, inlined (Cache.line does the same, and handles the miss)
            key = e[0] | (gva & 0xFC0)
            s = self._sets[(key >> 6) & self._set_mask]
            line = s.get(key)
            if line is None:
                line = self._fill(key, s)
            else:
                del s[key]  # most recently used (as Cache.line does)
                s[key] = line
                self._cache.hits += 1
            return int.from_bytes(line[off : off + size], "little")
        return int.from_bytes(self.read(gva, size), "little")

    def _store(self, gva: int, size: int, value: int) -> None:
        """Store the low ``size`` bytes of ``value``, little-endian."""
        e = self._tlb.get(gva >> 12)
        if e is None or not e[1] & _W_OK:
            e = self._walk(gva, True, False)
        off = gva & 63
        if off + size <= 64:
            key = e[0] | (gva & 0xFC0)
            self._line(key)[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._dirty(key)
            return
        self.write(gva, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def read(self, gva: int, length: int) -> bytes:
        """``length`` bytes from ``gva`` (any alignment)."""
        out = bytearray()
        pos = gva
        end = gva + length
        while pos < end:
            e = self._tlb.get(pos >> 12)
            if e is None:
                e = self._walk(pos, False, False)
            off = pos & 63
            n = min(64 - off, end - pos)
            out += self._line(e[0] | (pos & 0xFC0))[off : off + n]
            pos += n
        return bytes(out)

    def write(self, gva: int, data: bytes | bytearray) -> None:
        """Store ``data`` at ``gva``; every page is translated before any byte is written."""
        end = gva + len(data)
        entries = {}
        for page in range(gva >> 12, ((end - 1) >> 12) + 1):
            addr = max(page << 12, gva)
            e = self._tlb.get(page)
            if e is None or not e[1] & _W_OK:
                e = self._walk(addr, True, False)
            entries[page] = e
        pos = gva
        while pos < end:
            e = entries[pos >> 12]
            off = pos & 63
            n = min(64 - off, end - pos)
            key = e[0] | (pos & 0xFC0)
            self._line(key)[off : off + n] = data[pos - gva : pos - gva + n]
            self._dirty(key)
            pos += n

    def fetch(self, gva: int, length: int) -> bytes:
        """Instruction fetch: always private for an SEV guest (APM2 15.34.5)."""
        out = bytearray()
        pos = gva
        end = gva + length
        while pos < end:
            e = self._tlb.get(pos >> 12)
            if e is None or not e[1] & _X_OK:
                e = self._walk(pos, False, True)
            off = pos & 63
            n = min(64 - off, end - pos)
            out += self._line(e[2] | (pos & 0xFC0))[off : off + n]
            pos += n
        return bytes(out)

    def rmp_changed(self) -> bool:
        """After the guest's own PVALIDATE / RMPADJUST: drop this ASID's cached translations when the
        RMP changed in a way that may take an access away; True when they were dropped (an engine
        with its own TLB flushes it too)."""
        rmp = self.rmp
        tlb = self.core.tlb
        if rmp is None or tlb.rmp_epoch.get(self.asid) == (rmp.epoch, self.vmpl):
            return False
        self._tlb.clear()
        tlb.rmp_epoch[self.asid] = (rmp.epoch, self.vmpl)
        return True

    # ---- guest control operations -----------------------------------------------------------
    def write_cr3(self, value: int) -> None:
        """MOV CR3: switch page tables, flushing this ASID's (non-global) translations."""
        self.state.cr3 = value
        self._tlb.clear()

    def write_cr0(self, value: int) -> None:
        self.state.cr0 = value
        self._tlb.clear()

    def invlpg(self, gva: int) -> None:
        self._tlb.pop(gva >> 12, None)


class Core:
    """One x86 core of the SoC: host accesses, cache maintenance, VMRUN."""

    def __init__(self, index: int, profile: CpuProfile, cache: Cache, mmu: Mmu, mc: MemoryController,
                 tlb_entries: int = 2048, vmcbs: VmcbCache | None = None) -> None:
        self.index = index
        self.profile = profile
        self.cache = cache
        self.mmu = mmu
        self.mc = mc
        self.tlb = Tlb(tlb_entries)
        self.rmp: Rmp | None = None
        """The Reverse Map Table once SEV-SNP is enabled (SYSCFG.SNP_EN); None before."""
        self.wbinvd_count = 0
        self.vmruns = 0
        self.vmsa = VmsaUnit(cache, mc.dram)
        """The SEV-ES save-state exchange (:mod:`sevemu.hw.vmsa`)."""
        self.vmsa_failure = ""
        self.vmrun_failure = ""
        """Why the last VMRUN that failed with VMEXIT_INVALID failed (:meth:`vmrun`, :func:`~sevemu.hw.svm.vmrun_checks`)."""
        self.vmcbs = VmcbCache(cache) if vmcbs is None else vmcbs
        """The SoC's copies of VMCB pages (:class:`~sevemu.hw.svm.VmcbCache`)."""
        self._last_cpu: GuestCpu | None = None  # the guest view of the last VMRUN (reused while it still fits)
        self._es_held: _Held | None = None
        """The VMSA page the VMSA unit held at the last SEV-ES VMRUN (while :attr:`_Held.live
        <sevemu.hw.vmsa._Held.live>`, the next VMRUN of the same VMSA takes it without a look-up)."""
        """Why the last SEV-ES VMRUN failed its VMSA check (empty when it did not)."""

    # ---- host (ASID 0) memory accesses ------------------------------------------------------
    def host_read(self, spa: int, length: int, c: bool = False) -> bytes:
        """Read physical memory as the host: domain (0, c) -- ciphertext for guest-private pages."""
        self.mc.dram.check_range(spa, length)
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            v.touch(spa, length, False)  # a VMCB view of the range goes to memory first
        if (spa | length) & 63:
            return self.cache.read(0, c, spa, length)
        return self.cache.read_lines(0, c, spa, length)  # whole lines: the same bytes in one call

    def host_read_runs(self, spa: int, runs: tuple[tuple[int, int], ...], c: bool = False) -> bytes:
        """:meth:`host_read` of several runs of whole lines in the page at ``spa`` (``(offset,
        length)`` pairs), joined in the order given: the same bytes as one read per run, in one
        call (:meth:`Cache.read_runs <sevemu.hw.cache.Cache.read_runs>`)."""
        if spa < 0 or spa + PAGE > self.mc.dram.size:
            self.mc.dram.check_range(spa, PAGE)  # (raises)
        v = self.vmcbs
        if spa < v.hi and spa + PAGE > v.lo:
            for off, length in runs:
                v.touch(spa + off, length, False)  # a VMCB view of a run goes to memory first
        return self.cache.read_runs(0, c, spa, runs)

    def host_exchange(self, spa: int, runs: tuple[tuple[int, int], ...], expect: bytes,
                      writes: list[tuple[int, bytes]]) -> bytes | None:
        """:meth:`host_read_runs` of the page at ``spa`` (C=0); when it returns ``expect``, each
        ``(offset, data)`` of ``writes`` is written into the page (:meth:`host_write`) and None is
        returned, else what was read (nothing written): a hypervisor's look at a request in a shared
        page followed by the answer it gave the same request before, in one call."""
        got = self.host_read_runs(spa, runs)
        if got != expect:
            return got
        for off, data in writes:
            if not 0 <= off < PAGE or len(data) > PAGE - off:
                raise ValueError(f"exchange(): a write at offset {off} does not fit in the page")
            self.host_write(spa + off, data)
        return None

    def host_write(self, spa: int, data: bytes | bytearray | memoryview, c: bool = False) -> None:
        """Write physical memory as the host (no integrity on SEV: guest pages are silently corrupted)."""
        n = len(data)
        if spa < 0 or spa + n > self.mc.dram.size:
            self.mc.dram.check_range(spa, n)  # (raises)
        if self.rmp is not None:
            self.rmp.check_host_write(spa, n)  # SNP: #PF(RMP) unless Hypervisor-owned
        v = self.vmcbs
        if spa < v.hi and spa + n > v.lo:
            v.touch(spa, n, True)  # a VMCB view of the range: written back, then dropped
        if (spa | n) & 63:
            self.cache.write(0, c, spa, data)
        else:
            self.cache.write_lines(0, c, spa, data)  # whole lines: the same bytes in one call

    def host_read_stream(self, spa: int, length: int) -> bytes:
        """Streaming (non-temporal) read of unencrypted memory as the host, C=0 (``MOVNTDQA``).

        Returns what an ordinary read would -- DRAM, with the host's dirty cached lines of the range
        in place of their DRAM bytes -- but allocates no line: how a large copy out of a DMA buffer
        (PSP output, a NIC ring) avoids polluting the cache.
        """
        dram = self.mc.dram
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            v.touch(spa, length, False)
        data = dram.read(spa, length)
        keys = self._dirty_host_lines(spa, length)
        if not keys:
            return data
        out = bytearray(data)
        self._overlay_dirty(spa, memoryview(out), keys)
        return bytes(out)

    def host_read_stream_into(self, spa: int, out: bytearray | memoryview) -> None:
        """:meth:`host_read_stream` of ``len(out)`` bytes from ``spa``, into the caller's buffer (a
        large copy that reuses its buffer instead of allocating one each time)."""
        view = memoryview(out).cast("B")
        length = len(view)
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            v.touch(spa, length, False)
        self.mc.dram.read_into(spa, view)
        keys = self._dirty_host_lines(spa, length)
        if keys:
            self._overlay_dirty(spa, view, keys)

    def host_read_stream_pages(self, spa: int, length: int) -> list[bytearray] | None:
        """:meth:`host_read_stream` of the page-aligned range ``[spa, spa+length)`` as DRAM's own 4 KiB
        pages, in address order, instead of a copy -- when they hold exactly what it would return:
        every page stored, no dirty host line in the range, no VMCB view over it; None otherwise (the
        caller copies with :meth:`host_read_stream_into`).  For a device that takes the buffer as it
        lies (a migration source handing its bounce area's transport buffers to the socket,
        ``sendmsg``): the caller only reads them, before anything writes the range again."""
        if (spa | length) & (PAGE - 1) or length <= 0:
            return None
        dram = self.mc.dram
        dram.check_range(spa, length)
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            return None
        first = spa >> 12
        if memaccel.COLUMNS:  # (the same list, in one call)
            listed = memaccel.helpers.dram_page_list(dram.pages_dict(), first, length >> 12, False)
            return None if listed is None or self._dirty_host_lines(spa, length) else listed
        pages = list(map(dram.pages_dict().get, range(first, first + (length >> 12))))
        if None in pages or self._dirty_host_lines(spa, length):
            return None
        return pages  # type: ignore[return-value]  # (no None left in it)

    def host_write_stream_pages(self, spa: int, length: int, fill: Callable[[list[bytearray]], None]) -> None:
        """:meth:`host_write_stream` of the page-aligned range ``[spa, spa+length)`` whose bytes arrive in
        place: the range checked and its host lines written back and invalidated (a VMCB view over it
        dropped) as there, every page of it stored (an absent one created), then ``fill`` gets DRAM's
        pages of the range, in address order, and writes every byte of them -- a device delivering
        straight into the buffer (a migration destination receiving transport buffers from the socket
        into its bounce area, ``recvmsg_into``).  The same memory as the write of those bytes, but a
        page written with zeros is stored rather than left absent."""
        if (spa | length) & (PAGE - 1) or length <= 0:
            raise AddressError(f"host_write_stream_pages takes whole pages, got {spa:#x}+{length:#x}")
        self._host_stream_begin(spa, length)
        store = self.mc.dram.pages_dict()
        first = spa >> 12
        if memaccel.COLUMNS:  # (the same pages stored and listed, in one call)
            made = memaccel.helpers.dram_page_list(store, first, length >> 12, True)
            assert made is not None
            fill(made)
            return
        pages = list(map(store.get, range(first, first + (length >> 12))))
        if None in pages:
            for i, page in enumerate(pages):
                if page is None:
                    pages[i] = store[first + i] = bytearray(PAGE)
        fill(pages)  # type: ignore[arg-type]  # (no None left in it)

    def _dirty_host_lines(self, spa: int, length: int) -> list[int]:
        """The host's dirty lines (domain (0, C=0): the key is the SPA) of ``[spa, spa+length)``."""
        dirty = self.cache.dirty
        first, end = spa & ~63, spa + length
        if memaccel.ENABLED:  # the same keys, in C (as the PSP's coherent reads find them)
            found = memaccel.helpers.resident_keys([dirty], 0, first, end)
            if found is not None:  # (None: the dirty set is a set subclass, answered in Python below)
                return found
        if (end - first) >> 6 <= len(dirty):
            return [k for k in range(first, end, 64) if k in dirty]
        return sorted(k for k in dirty if first <= k < end)  # fewer dirty lines than addresses: visit them

    def _overlay_dirty(self, spa: int, out: memoryview, keys: list[int]) -> None:
        """The bytes of the cached lines ``keys`` in place of DRAM's in ``out`` (read from ``spa``)."""
        cache = self.cache
        end = spa + len(out)
        for key in keys:
            line = cache.sets[(key >> 6) & cache.set_mask].get(key)
            if line is not None:
                lo, hi = max(key, spa), min(key + 64, end)
                out[lo - spa : hi - spa] = line[lo - key : hi - key]

    def host_write_stream(self, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Streaming (non-temporal) write of unencrypted memory as the host, C=0 (``MOVNTDQ``).

        The host's cached lines of the range -- in this cache and in private levels above it -- are
        written back and invalidated, then the bytes go straight to DRAM: the same memory contents
        as an ordinary write followed by CLFLUSH, without filling the cache (copying into a DMA
        buffer the PSP or a device reads next).
        """
        self._host_stream_begin(spa, len(data))
        self.mc.dram.write(spa, data)

    def _host_stream_begin(self, spa: int, length: int) -> None:
        """What every streaming host write does before its bytes reach DRAM: the range checked (DRAM,
        the RMP's host-write check), a VMCB view over it dropped, the host's cached lines of it written
        back and invalidated."""
        self.mc.dram.check_range(spa, length)
        if self.rmp is not None:
            self.rmp.check_host_write(spa, length)
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            v.touch(spa, length, True)
        self.cache.flush_range(0, False, spa, length)

    def host_clear_pages(self, spa: int, length: int) -> None:
        """The host zeroes whole pages it hands out (Linux ``clear_page``; KVM pinning an SEV guest's
        RAM faults every page in): :meth:`host_write_stream` of zeros over the page-aligned range --
        the host's cached lines written back and invalidated, zeros in DRAM -- with every page of it
        stored in DRAM's page store (:meth:`Dram.zero_pages`) rather than left absent."""
        self._host_stream_begin(spa, length)
        self.mc.dram.zero_pages(spa, length)

    def clflush(self, spa: int, c: bool = False) -> None:
        """CLFLUSH of one line as the host: only host-domain lines are evicted."""
        self.cache.clflush(0, c, spa)

    def clflush_range(self, spa: int, length: int, c: bool = False) -> None:
        """CLFLUSH every line of ``[spa, spa+length)`` as the host (Linux ``clflush_cache_range``)."""
        v = self.vmcbs
        if spa < v.hi and spa + length > v.lo:
            v.touch(spa, length, True)
        self.cache.flush_range(0, c, spa, length)

    def wbinvd(self) -> int:
        """WBINVD: write back and invalidate every line, whatever its ASID."""
        self.wbinvd_count += 1
        return self.cache.wbinvd()

    def vmpage_flush(self, spa: int, asid: int) -> int:
        """WRMSR VMPAGE_FLUSH (0xC001_011E): flush one page's lines of ``asid``; #GP for ASID 0."""
        if asid == 0 or asid > self.profile.max_asid:
            raise GeneralProtection(f"VMPAGE_FLUSH with ASID {asid}")
        return self.cache.vmpage_flush(asid, spa & ~0xFFF)

    # ---- VMRUN --------------------------------------------------------------------------------
    def vmrun(self, vmcb: Vmcb, engine: Engine) -> VmExit:
        """Run the guest described by ``vmcb`` until #VMEXIT; the exit is also written into ``vmcb``."""
        if vmcb.sev_enable and type(engine) not in _CPU_ENGINES:  # (not is_cpu_engine(engine), inlined: the exit path)
            raise ForeignEngineError(f"VMRUN of an SEV guest (ASID {vmcb.asid}) with a {type(engine).__name__}: "
                                     "an SEV guest runs only its own code on the CPU's engines")
        self.vmruns += 1
        # VMRUN's checks, the one place both engines' VMRUN goes through (sevemu.hw.svm.vmrun_checks):
        # with SEV-SNP the VMCB page must be Hypervisor-owned (#GP, raised); the view is made what the
        # VMCB page in memory holds (no read while nobody wrote it); then why VMRUN must fail with
        # VMEXIT_INVALID, or None.  No allocation on the usual path.  (MemoryController.asid_valid,
        # inlined: the ASID's key loaded and not invalidated)
        rmp = self.rmp
        if rmp is not None:  # (SNP_EN) before the page is read: a VMCB must be the hypervisor's page
            why = rmp.vmcb_check(vmcb.pa)
            if why is not None:
                raise GeneralProtection(f"VMRUN: {why}")
        pa = vmcb.pa
        if pa and self.vmcbs.view(pa) is not vmcb:
            self.vmcbs.load(vmcb)
        invalid = vmrun_checks(vmcb, self.profile, rmp, vmcb.asid in self.mc._valid if vmcb.sev_enable else True,
                               self.mc.dram.size)
        if invalid is not None:
            return self._vmrun_failed(vmcb, invalid)
        tlb_control = vmcb.tlb_control
        if tlb_control:
            if tlb_control == TlbControl.FLUSH_ALL:
                self.tlb.flush_all()
            elif tlb_control == TlbControl.FLUSH_ASID:
                self.tlb.flush_asid(vmcb.asid)
            vmcb.tlb_control = TlbControl.DO_NOTHING
        if vmcb.sev_es_enable:  # (the SEV-ES VMRUN, inline here: the exit path)
            # VMRUN of an SEV-ES guest: registers from the VMSA (checked against its TMR checksum),
            # back into it at #VMEXIT (:mod:`sevemu.hw.vmsa`).  The hypervisor sees the exit code, the
            # exit information of an NPF and the GHCB MSR; a VMGEXIT or HLT completes in the guest (RIP
            # past it, as the hardware saves it), so ``next_rip`` is not shown.
            # (rmp: an SNP VMSA's RMP entry was checked by vmrun_checks above, at every VMRUN)
            vmsa, asid, vmsa_pa = self.vmsa, vmcb.asid, vmcb.vmsa_pa
            # VmsaUnit.load of a page the unit holds, inlined (the exit path): a page of DRAM, held
            # since the last #VMEXIT, and its TMR block still what the unit stored there
            h = self._es_held  # (the page of the last SEV-ES VMRUN: still held, the same VMSA?)
            if h is None or not h.live or h.spa != vmsa_pa or h.asid != asid:
                key = asid << ASID_SHIFT | _C_KEY | vmsa_pa
                h = vmsa._held.get(key) if not vmsa_pa & (PAGE - 1) and 0 < vmsa_pa <= vmsa._size - PAGE else None
                self._es_held = h
            if h is not None and not h.snp:
                block = vmsa._dram_pages.get(h.crc_paddr >> 12)  # (Dram.read_u64, inlined)
                if (_Q.unpack_from(block, h.crc_paddr & (PAGE - 1))[0] if block is not None else 0) != h.crc:
                    h = None
            if h is not None:
                vmsa._running = h
                state = h.state
            else:
                loaded = vmsa.load(asid, vmsa_pa)
                if isinstance(loaded, str):
                    return self._vmrun_failed(vmcb, loaded)
                state = loaded
                self._es_held = vmsa._running
            c = self._last_cpu  # (_guest_cpu's reuse test, inlined: the exit path)
            if (c is not None and c.vmcb is vmcb and c.state is state and rmp is None and c.asid == asid
                    and c.sev == vmcb.sev_enable and c._cache is self.cache and c._tlb is self.tlb.by_asid.get(asid)):
                cpu = c
            else:
                cpu = self._guest_cpu(vmcb, state)
            if rmp is None:
                try:
                    ex = engine.run(cpu)
                except NestedPageFault as f:
                    ex = VmExit(ExitCode.NPF, f.exit_info1, f.gpa)
            else:
                pages = (vmcb.pa, vmsa_pa) if vmcb.pa else (vmsa_pa,)
                rmp.mark_in_use(pages)  # RMPUPDATE / PSMASH of the page: FAIL_INUSE until #VMEXIT
                try:
                    ex = engine.run(cpu)
                except NestedPageFault as f:
                    ex = VmExit(ExitCode.NPF, f.exit_info1, f.gpa)
                finally:
                    rmp.release(pages)
            code = ex.code
            if code in _ES_COMPLETED:
                state.rip = vmcb.next_rip
            vmcb.next_rip = 0
            if h is not None and vmsa._running is h and h.live:  # (VmsaUnit.store of it, inlined)
                vmsa._running = None
                h.pending = True
            else:
                vmsa.store(asid, vmsa_pa)
            if code not in _ES_WITH_INFO and (ex.info1 or ex.info2):
                bare = _ES_BARE.get(code)
                ex = bare if bare is not None else VmExit(code)  # the exit code only
            vmcb.exit_code = code  # (_exit, inlined)
            vmcb.exit_info1 = ex.info1
            vmcb.exit_info2 = ex.info2
            return ex
        c = self._last_cpu  # (_guest_cpu's reuse test, inlined: the exit path)
        if (c is not None and c.vmcb is vmcb and c.state is vmcb and rmp is None and c.asid == vmcb.asid
                and c.sev == vmcb.sev_enable and c._cache is self.cache and c._tlb is self.tlb.by_asid.get(vmcb.asid)):
            cpu = c
        else:
            cpu = self._guest_cpu(vmcb, vmcb)
        in_use = (vmcb.pa,) if rmp is not None and vmcb.pa else ()
        if in_use:
            rmp.mark_in_use(in_use)  # type: ignore[union-attr]  # RMPUPDATE of the VMCB: FAIL_INUSE
        try:
            ex = engine.run(cpu)
        except NestedPageFault as f:
            ex = VmExit(ExitCode.NPF, f.exit_info1, f.gpa)
        finally:
            if in_use:
                rmp.release(in_use)  # type: ignore[union-attr]
        vmcb.exit_code = ex.code  # (_exit, inlined)
        vmcb.exit_info1 = ex.info1
        vmcb.exit_info2 = ex.info2
        return ex

    def _guest_cpu(self, vmcb: Vmcb, state: SaveState) -> GuestCpu:
        """The guest's view of this core for a VMRUN of ``vmcb`` with ``state``: the last one again
        while nothing it was made from changed (same VMCB, save state, ASID, cache and TLB table; no
        RMP, whose epoch is checked when a view is made), else a new one."""
        c = self._last_cpu
        if (c is not None and c.vmcb is vmcb and c.state is state and self.rmp is None and c.asid == vmcb.asid
                and c.sev == vmcb.sev_enable and c._cache is self.cache
                and c._tlb is self.tlb.by_asid.get(vmcb.asid)):
            return c
        c = self._last_cpu = GuestCpu(self, vmcb, None if state is vmcb else state)
        return c

    def _vmrun_failed(self, vmcb: Vmcb, reason: str) -> VmExit:
        self.vmrun_failure = reason
        if "VMSA" in reason:
            self.vmsa_failure = reason
        vmcb.next_rip = 0
        return self._exit(vmcb, VmExit(ExitCode.INVALID))

    @staticmethod
    def _exit(vmcb: Vmcb, ex: VmExit) -> VmExit:
        vmcb.exit_code = ex.code
        vmcb.exit_info1 = ex.info1
        vmcb.exit_info2 = ex.info2
        return ex

    def check_spa(self, spa: int) -> None:
        if not 0 <= spa < self.mc.dram.size:
            raise AddressError(f"SPA {spa:#x} is outside DRAM")
