"""The SEV-ES guest's save state inside the CPU: VMRUN loads it from the encrypted VMSA, #VMEXIT
stores it back (APM2 15.35.8 "VMSA", 15.35.4; AMD-ASPFW ``sev_es.c``: the checksum the microcode
checks; Linux arch/x86/kvm/svm/sev.c ``sev_es_init_vmcb``: the VMCB's VMSA pointer).

For an SEV-ES guest the VMCB's save area is unused: its registers live in the VMSA page whose
system-physical address is the VMCB's VMSA pointer (control area 0x108, :attr:`Vmcb.vmsa_pa
<sevemu.hw.svm.Vmcb.vmsa_pa>`), encrypted with the guest's key.  :class:`VmsaUnit` is the part of
a core that does the exchange:

* **VMRUN** reads the page in the guest's encryption domain (ASID, C = 1) through the cache -- so
  the memory controller decrypts it with the guest's key, inside the SoC -- and checks it against
  the checksum the firmware stored in the TMR (the block the page names at 0x388,
  :func:`~sevemu.crypto.vmsacrc.crc64_vmsa`).  A page that does not match (the host changed its
  ciphertext, or the TMR block) fails VMRUN with VMEXIT_INVALID: SEV-ES has no integrity for guest
  memory, but a tampered VMSA never runs.  The registers become a :class:`VmsaState`, the save state
  the engines read and write (:class:`~sevemu.hw.svm.SaveState`).
* **#VMEXIT** stores the registers back into the page -- encoded when its lines leave the unit,
  the only moment anyone else can see them (``tests/hw/test_hw_es.py`` reads the page through every
  host interface after each store); the changed lines are modified lines of this private level, written into the cache in the guest's domain -- and the page's checksum into
  the TMR -- as soon as anyone else reads, writes or flushes them (WBINVD included):
  ciphertext in DRAM once they leave the cache.  (The firmware reads a VMSA and its TMR block from
  DRAM, so a host flushes before SEND_UPDATE_VMSA anyway, as it must for any encrypted page.)
  The hypervisor sees the exit code (and, for an NPF, the GPA) only.

The unit keeps the decrypted page between exits as a private level above the cache (a
:class:`~sevemu.hw.cache.CacheAgent`): the next VMRUN uses it while nobody else wrote, flushed or
invalidated those lines; the shared cache's snoop drops it otherwise and VMRUN reads and checks the
page again.  Its checksum is kept by :class:`~sevemu.crypto.vmsacrc.VmsaCrc` and updated from the
changed bytes only -- the value :func:`~sevemu.crypto.vmsacrc.crc64_vmsa` gives -- when the lines
leave the unit: #VMEXIT only notes which lines changed (and what they held when last written back),
so a run of exits costs one update per line that left, not one per exit.  VMRUN compares the TMR
with the value the unit last stored there, so when the arithmetic happens is not observable.
Between VMRUN and #VMEXIT the registers are in the CPU, not in the cache: a snoop that drops the
held page then (the guest's own WBINVD -- OVMF's SEC and PEI execute it) only means the page is read
and checked again at the next VMRUN; #VMEXIT still stores the whole state it loaded, every line of
the page, as the CPU writes its save state back.

Model choices: #VMEXIT stores what the engines exchange at every exit (GPRs, RIP, RFLAGS, CR0,
CR3, CR4, EFER); the other fields of the page (segments, descriptor tables, MSRs, FPU) are loaded at
VMRUN and kept by the engine across exits; the hardware's ``guest_exit_*`` fields are not written.
The TMR checksum block is read and written by the CPU directly in DRAM (the data fabric keeps x86
software away from the TMR; the firmware's side is in :mod:`sevemu.firmware.tmr`); VMRUN compares
it with the value the unit last stored, so a changed block fails VMRUN whether or not the page
changed since.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from sevemu._util.units import LINE, PAGE
from sevemu.abi.vmsa import SEGMENT_REGISTERS, SevEsSaveArea
from sevemu.crypto.vmsacrc import VMSA_CRC_SIZE, VmsaCrc, vmsa_crc_paddr
from sevemu.hw.cache import ASID_SHIFT, C_SHIFT, SPA_MASK, Cache
from sevemu.hw.dram import Dram
from sevemu.hw.svm import GPRS, Segment

__all__ = ["VmsaState", "VmsaUnit"]

_O: Final = SevEsSaveArea.offset_of
_Q: Final = struct.Struct("<Q")
_CTL: Final = struct.Struct("<QQQ16xQQ")  # cr4, cr3, cr0, (dr7, dr6), rflags, rip at 0x148
_HIGH: Final = struct.Struct("<QQQ8xQQQQQQQQQQQ")  # rcx, rdx, rbx, (0x320), rbp ... r15 at 0x308
_SEG: Final = struct.Struct("<HHIQ")

_HIGH_GPRS: Final = ("rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
                     "r15")
_high_gprs: Final = operator.itemgetter(*_HIGH_GPRS)
_OFF_CTL: Final = _O("cr4")
_OFF_HIGH: Final = _O("rcx")
_OFF_EFER: Final = _O("efer")
_OFF_RSP: Final = _O("rsp")
_OFF_RAX: Final = _O("rax")
_OFF_FEATURES: Final = _O("sev_features")
_OFF_VMPL: Final = _O("vmpl")
_SNP_ACTIVE: Final = 1  # SEV_FEATURES bit 0
_C_KEY: Final = 1 << C_SHIFT
_MSR_FIELDS: Final = {0x174: "sysenter_cs", 0x175: "sysenter_esp", 0x176: "sysenter_eip", 0x277: "g_pat",
                      0xC000_0081: "star", 0xC000_0082: "lstar", 0xC000_0083: "cstar", 0xC000_0084: "sfmask",
                      0xC000_0102: "kernel_gs_base"}


class VmsaState:
    """An SEV-ES guest's registers as VMRUN decrypted them from its VMSA (a
    :class:`~sevemu.hw.svm.SaveState`)."""

    __slots__ = ("cr0", "cr3", "cr4", "efer", "msrs", "regs", "rflags", "rip", "segments", "sev_features", "vmpl")

    def __init__(self, page: bytes | bytearray) -> None:
        self.efer = _Q.unpack_from(page, _OFF_EFER)[0]
        self.cr4, self.cr3, self.cr0, self.rflags, self.rip = _CTL.unpack_from(page, _OFF_CTL)
        high = dict(zip(_HIGH_GPRS, _HIGH.unpack_from(page, _OFF_HIGH), strict=True))
        high["rax"] = _Q.unpack_from(page, _OFF_RAX)[0]
        high["rsp"] = _Q.unpack_from(page, _OFF_RSP)[0]
        self.regs: dict[str, int] = {name: high[name] for name in GPRS}
        self.sev_features = _Q.unpack_from(page, _OFF_FEATURES)[0]
        self.vmpl = page[_OFF_VMPL]
        """The VMPL the vCPU runs at (SEV-SNP: APM2 15.36.7; its RMP checks use this level's masks)."""
        self.segments: dict[str, Segment] = {}
        for i, name in enumerate(SEGMENT_REGISTERS):
            self.segments[name] = Segment(*_SEG.unpack_from(page, 16 * i))
        self.msrs: dict[int, int] = {msr: _Q.unpack_from(page, _O(f))[0] for msr, f in _MSR_FIELDS.items()}

    def store(self, page: bytearray, changed: dict[int, bytes] | None = None) -> None:
        """Write the registers #VMEXIT saves into ``page``; every 64-byte line this changes gets
        its contents from before into ``changed`` (offset -> line) unless it is there already."""
        if changed is None:
            changed = {}
        r = self.regs
        ctl = _CTL.pack(self.cr4, self.cr3, self.cr0, self.rflags, self.rip)
        if page[_OFF_CTL : _OFF_CTL + _CTL.size] != ctl:
            _put(page, _OFF_CTL, ctl, changed)
        high = _HIGH.pack(*_high_gprs(r))
        if page[_OFF_HIGH : _OFF_HIGH + _HIGH.size] != high:
            _put(page, _OFF_HIGH, high, changed)
        for off, value in ((_OFF_RAX, r["rax"]), (_OFF_RSP, r["rsp"]), (_OFF_EFER, self.efer)):
            if _Q.unpack_from(page, off)[0] != value:
                _put(page, off, _Q.pack(value), changed)


def _put(page: bytearray, off: int, data: bytes, changed: dict[int, bytes]) -> None:
    """Store ``data`` at ``off``, noting the lines' contents from before in ``changed``."""
    for lo in range(off & ~(LINE - 1), off + len(data), LINE):
        if lo not in changed:
            changed[lo] = bytes(page[lo : lo + LINE])
    page[off : off + len(data)] = data


@dataclass(eq=False, slots=True)
class _Held:
    """One VMSA page held decrypted by the unit."""

    asid: int
    spa: int
    page: bytearray
    lanes: list[int]
    crc: int
    crc_paddr: int
    state: VmsaState
    dirty: dict[int, bytes] = field(default_factory=dict)
    """Lines modified since they were written back: offset -> the line as it was written back (the
    checksum is brought up to date from these differences when the lines leave the unit)."""
    snp: bool = False
    """An SEV-SNP guest's VMSA (no checksum: the RMP protects it)."""
    pending: bool = False
    """#VMEXIT stored :attr:`state` but it is not encoded into :attr:`page` yet: that happens when
    the lines leave the unit (:meth:`VmsaUnit._write_back`), the only way anyone else sees them."""
    live: bool = True
    """In the unit's table (:attr:`VmsaUnit._held`) under its key: cleared whenever it leaves it
    (VMRUN's inlined load in :meth:`Core.vmrun <sevemu.hw.cpu.Core.vmrun>` tests this instead of
    looking the page up again)."""


class VmsaUnit:
    """The VMSA exchange of one core (module docstring)."""

    encrypted_only = True
    """It holds pages of the guest's encrypted domain only: the cache does not snoop it about a
    C=0 range (:data:`~sevemu.hw.cache.ENCRYPTED_ONLY`), such as the host's accesses to a GHCB."""

    def __init__(self, cache: Cache, dram: Dram) -> None:
        self.cache = cache
        self.dram = dram
        self._size = dram.size
        self._dram_pages = dram.pages_dict()  # (the page store: never rebound)
        self._held: dict[int, _Held] = {}
        self._running: _Held | None = None
        """The page of the guest between VMRUN and #VMEXIT: its registers are in the CPU then, so a
        snoop that drops the page (the guest's own WBINVD) does not lose what #VMEXIT stores."""
        self._attached = False
        self.checks = 0
        """Full checksum computations (a page read from the cache: first VMRUN, after a snoop)."""
        self.snp_check: Callable[[int, int], str | None] | None = None
        """SEV-SNP (set by the SNP work): why the page at ``spa`` may not be ``asid``'s VMSA (its RMP
        entry: assigned to the guest, VMSA bit ...), or None; an SNP guest's VMSA (SEV_FEATURES bit 0)
        is checked by it instead of the TMR checksum.  Unset, an SNP guest's VMSA is loaded without
        a check (VMRUN's consistency checks already require an RMP)."""

    # ---- VMRUN / #VMEXIT ----------------------------------------------------------------------
    def load(self, asid: int, spa: int) -> VmsaState | str:
        """VMRUN: the guest's registers from the VMSA at ``spa``, or why VMRUN must fail."""
        if spa & (PAGE - 1) or spa <= 0 or spa + PAGE > self._size:
            return f"VMSA pointer {spa:#x} is not a page of DRAM"
        h = self._held.get(asid << ASID_SHIFT | _C_KEY | spa)  # (tag_key(asid, True, spa) of a page)
        if h is not None:  # held since the last #VMEXIT: the TMR block must still be what was stored
            if h.snp:
                self._running = h
                return h.state
            block = self._dram_pages.get(h.crc_paddr >> 12)  # (Dram.read_u64, inlined: every VMRUN)
            if (_Q.unpack_from(block, h.crc_paddr & (PAGE - 1))[0] if block is not None else 0) == h.crc:
                self._running = h
                return h.state
        return self._load(asid, spa)

    def _load(self, asid: int, spa: int) -> VmsaState | str:
        """:meth:`load` of a page not held (read and checked), or held but whose TMR block changed."""
        if not self._attached:
            self.cache.attach(self)
            self._attached = True
        key = asid << ASID_SHIFT | 1 << C_SHIFT | (spa & ~(LINE - 1))  # (tag_key(asid, True, spa), inlined)
        h = self._held.get(key)
        if h is None:
            page = bytearray(self.cache.read(asid, True, spa, PAGE, origin=self))
            state = VmsaState(page)
            if state.sev_features & _SNP_ACTIVE:  # SNP: the RMP protects the VMSA, not a checksum
                check = self.snp_check
                reason = None if check is None else check(asid, spa)
                if reason is not None:
                    self._held.pop(key, None)
                    return reason
                h = _Held(asid, spa, page, [], 0, 0, state, snp=True)
                self._held[key] = h
                self._running = h
                return state
            crc_paddr = vmsa_crc_paddr(page)
            if crc_paddr & 7 or not 0 < crc_paddr <= self.dram.size - 8:
                self._held.pop(key, None)
                return f"the VMSA at {spa:#x} names no checksum block ({crc_paddr:#x}): not set up by the firmware"
            lanes = VmsaCrc.shared().lanes(page)
            self.checks += 1
            h = _Held(asid, spa, page, lanes, VmsaCrc.checksum(lanes), crc_paddr, state)
            self._held[key] = h
        # the block in DRAM (its address was checked when the page was read) as this unit last
        # stored it (a changed page is its own)
        if not h.snp and self.dram.read_u64(h.crc_paddr) != h.crc:
            self._held.pop(key)
            h.live = False
            return f"the VMSA at {spa:#x} does not match its checksum in the TMR"
        self._running = h
        return h.state

    def store(self, asid: int, spa: int) -> None:
        """#VMEXIT: the state :meth:`load` returned goes back into the page.  The changed lines stay
        modified in this private level until the cache snoops them (a write-back level: they reach
        the shared cache, and DRAM encrypted, as soon as anyone else looks or flushes); the TMR
        gets the checksum of the page as it is then."""
        key = asid << ASID_SHIFT | 1 << C_SHIFT | (spa & ~(LINE - 1))  # (tag_key(asid, True, spa), inlined)
        h = self._held.get(key)
        running, self._running = self._running, None
        if h is None:
            if running is None or running.asid != asid or running.spa != spa:  # pragma: no cover - engine bug
                return
            # A snoop dropped the page while the guest ran (its own WBINVD, say): the CPU still has
            # the state VMRUN loaded and stores all of it -- every line of the page goes back, so
            # the cache holds the page the unit holds again (whatever was written there meanwhile).
            h = running
            h.live = True
            self._held[key] = h
            for lo in range(0, PAGE, LINE):
                h.dirty.setdefault(lo, bytes(h.page[lo : lo + LINE]))
        # Encoded when the lines leave the unit (a snoop, WBINVD, forget): the page is private to
        # the unit until then, so nobody can tell when the encoding happened (a test tries).
        h.pending = True

    def _write_back(self, h: _Held) -> None:
        """The modified lines of ``h`` into the shared cache, in the guest's domain, and its
        checksum into the TMR (updated from the lines' changes since it was last stored: the same
        value :func:`~sevemu.crypto.vmsacrc.crc64_vmsa` gives for the page)."""
        if h.pending:  # the state the last #VMEXIT stored goes into the page now
            h.state.store(h.page, h.dirty)
            h.pending = False
        update = VmsaCrc.shared().update
        page = h.page
        changed = False
        for lo, before in sorted(h.dirty.items()):
            after = page[lo : lo + LINE]
            self.cache.write(h.asid, True, h.spa + lo, after, origin=self)
            if before != after and not h.snp:
                if lo < VMSA_CRC_SIZE:
                    update(h.lanes, lo, before, after)
                changed = True
        h.dirty.clear()
        if changed:
            h.crc = VmsaCrc.checksum(h.lanes)
            self.dram.write(h.crc_paddr, h.crc.to_bytes(8, "little"))

    def forget(self) -> None:
        """Write back and drop every held page (the next VMRUN reads and checks again)."""
        for h in self._held.values():
            if h.dirty or h.pending:
                self._write_back(h)
            h.live = False
        self._held.clear()

    # ---- CacheAgent -----------------------------------------------------------------------------
    def snoop(self, lo: int, hi: int, invalidate: bool, data: memoryview | None = None) -> None:
        """Someone else reads lines of a held page (its modified lines are written back first) or
        writes, flushes or drops them (written back, then the page must be read and checked again
        at the next VMRUN; the bytes of a write, ``data``, are not taken)."""
        held = self._held
        if not held:
            return
        if hi - lo <= PAGE:  # (the usual snoop: a few lines, at most two pages to look up)
            first, last = lo & ~(PAGE - 1), (hi - 1) & ~(PAGE - 1)
            if first not in held and last not in held:
                return
        for key, h in list(held.items()):
            if key < hi and key + PAGE > lo:
                if h.dirty or h.pending:
                    self._write_back(h)
                if invalidate:  # the next VMRUN reads and checks the page again
                    del held[key]
                    h.live = False

    def fill_is_idle(self, key: int) -> bool:
        """Whether :meth:`snoop_fill` of every line of ``key``'s page would do nothing (no copy of
        the page held in another domain)."""
        spa = key & SPA_MASK & ~(PAGE - 1)
        page_key = key & ~(PAGE - 1)
        return not any(h.spa == spa and held_key != page_key for held_key, h in self._held.items())

    def snoop_fill(self, key: int) -> None:
        """Coherent profiles: a fill of the same SPA in another domain drops the held copy."""
        spa = key & SPA_MASK & ~(PAGE - 1)
        page_key = key & ~(PAGE - 1)
        for held_key, h in list(self._held.items()):
            if h.spa == spa and held_key != page_key:
                if h.dirty or h.pending:
                    self._write_back(h)
                del self._held[held_key]
                h.live = False
