"""Page walks: the guest's own (GVA -> GPA, C-bit) and the nested one (GPA -> SPA through the NPT).

Both use the x86-64 4-level format (4 KiB pages, 2 MiB pages through PDE.PS).  Every table entry is
read from memory through the cache, so page tables are real bytes in (encrypted) DRAM:

* guest page tables live in guest memory; for an SEV guest the walk is *always private* (domain
  (ASID, C=1)) whatever the C-bit in the entries (APM2 15.34.5);
* the leaf's C-bit decides the domain of SEV data accesses (guest C=1 -> guest key; else the NPT
  C-bit: host key or none -- :func:`~sevemu.hw.memctl.domain_for`); instruction fetches are always
  private;
* NPT tables live in host memory, read in the host's domain (ASID 0, C-bit of the pointer);
* the C-bit is stripped from every address before it is used; for a plain (non-SEV) guest the
  C-bit position is an ordinary reserved address bit.

Accessed/Dirty bits are set in guest entries (a write through the cache, as hardware does); NPT
A/D bits are not maintained (the model's hypervisor does not use them).  Failures raise
:class:`~sevemu.hw.faults.PageFault` (guest) or :class:`~sevemu.hw.faults.NestedPageFault`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sevemu.abi.ghcb import VC_PAGE_NOT_VALIDATED
from sevemu.abi.paging import NpfExitInfo1, PfErrorCode, Pte
from sevemu.hw.cache import Cache
from sevemu.hw.faults import NestedPageFault, PageFault, PageNotValidated
from sevemu.hw.memctl import domain_for
from sevemu.hw.profiles import CpuProfile

if TYPE_CHECKING:
    from sevemu.hw.rmp import Rmp

__all__ = ["PTE_A", "PTE_D", "PTE_NX", "PTE_P", "PTE_PS", "PTE_RW", "PTE_US", "VC_PAGE_NOT_VALIDATED", "Mmu",
           "Translation"]


# Plain ints: IntFlag arithmetic is too slow for the walker.
PTE_P = int(Pte.P)
PTE_RW = int(Pte.RW)
PTE_US = int(Pte.US)
PTE_A = int(Pte.A)
PTE_D = int(Pte.D)
PTE_PS = int(Pte.PS)
PTE_NX = int(Pte.NX)


class PF:
    P = int(PfErrorCode.P)
    W = int(PfErrorCode.W)
    RSVD = int(PfErrorCode.RSVD)
    FETCH = int(PfErrorCode.FETCH)


class NPF:
    P = int(NpfExitInfo1.P)
    W = int(NpfExitInfo1.W)
    U = int(NpfExitInfo1.U)
    RSVD = int(NpfExitInfo1.RSVD)
    FETCH = int(NpfExitInfo1.FETCH)
    GUEST_FINAL = int(NpfExitInfo1.GUEST_FINAL)
    GUEST_PAGE = int(NpfExitInfo1.GUEST_PAGE)
    ENC = int(NpfExitInfo1.ENC)


@dataclass(frozen=True, slots=True)
class Translation:
    """A completed GVA -> SPA translation, what the TLB caches."""

    gpa: int
    spa: int
    data_asid: int
    data_c: bool
    fetch_asid: int
    fetch_c: bool
    writable: bool
    executable: bool


class Mmu:
    """Page walker of one SoC (stateless apart from the cache it reads tables through)."""

    def __init__(self, cache: Cache, profile: CpuProfile) -> None:
        self.cache = cache
        self.cbit = profile.cbit_mask
        # address field of an entry: bits 12..MAXPHYADDR-1, C-bit excluded.  With memory encryption
        # on, MAXPHYADDR loses the EBX[11:6] reduction and those bits become reserved (APM2 15.34, CPUID Fn8000_001F EBX[11:6]).
        self.addr_mask = ((1 << profile.addr_bits) - 1) & ~0xFFF & ~self.cbit
        high = ((1 << 52) - 1) & ~((1 << profile.addr_bits) - 1)
        self.rsvd_plain = high | (self.cbit if self.cbit < (1 << 52) else 0)
        self.rsvd_sev = high & ~self.cbit

    # ---- nested walk ------------------------------------------------------------------------
    def nested(self, ncr3: int, gpa: int, write: bool, fetch: bool, final: bool,
               enc: bool) -> tuple[int, bool, bool, bool, bool]:
        """Translate ``gpa`` through the NPT rooted at ``ncr3``: (spa, npt_c, writable, executable,
        2 MiB leaf)."""
        kind = NPF.U | (NPF.GUEST_FINAL if final else NPF.GUEST_PAGE) | (NPF.ENC if enc else 0)
        if write:
            kind |= NPF.W
        if fetch:
            kind |= NPF.FETCH
        addr_mask = self.addr_mask
        cbit = self.cbit
        table = ncr3 & addr_mask
        table_c = bool(ncr3 & cbit)
        writable = True
        executable = True
        read = self.cache.read
        pte = 0
        huge = False
        for shift in (39, 30, 21, 12):
            raw = read(0, table_c, table + ((gpa >> shift) & 0x1FF) * 8, 8)
            pte = int.from_bytes(raw, "little")
            if not pte & PTE_P:
                raise NestedPageFault(kind, gpa)
            if pte & self.rsvd_sev:
                raise NestedPageFault(kind | NPF.P | NPF.RSVD, gpa)
            writable = writable and bool(pte & PTE_RW)
            executable = executable and not pte & PTE_NX
            if shift == 21 and pte & PTE_PS:
                spa = (pte & addr_mask & ~0x1FFFFF) | (gpa & 0x1FFFFF)
                huge = True
                break
            if shift == 12:
                spa = (pte & addr_mask) | (gpa & 0xFFF)
                break
            table = pte & addr_mask
            table_c = bool(pte & cbit)
        if write and not writable:
            raise NestedPageFault(kind | NPF.P, gpa)
        if fetch and not executable:
            raise NestedPageFault(kind | NPF.P, gpa)
        return spa, bool(pte & cbit), writable, executable, huge

    # ---- guest walk + combined translation --------------------------------------------------
    def translate(self, *, asid: int, sev: bool, ncr3: int, paging: bool, cr3: int, gva: int,
                  write: bool, fetch: bool, rmp: Rmp | None = None, vmpl: int = 0, wp: bool = True) -> Translation:
        """Full GVA -> SPA translation with the guest's and the hypervisor's permissions.

        ``wp``: the guest's CR0.WP.  Every access is a supervisor one here, and with WP clear a
        supervisor write ignores the guest's read-only entries (APM2 5.6, "Write Protect"; firmware clears WP to
        edit page tables it mapped read-only, as edk2's CpuDxe does); the NPT's permissions stay.

        ``rmp``: the guest is SNP-active; the walk's table reads and the final access go through the
        RMP checks (:meth:`~sevemu.hw.rmp.Rmp.check_guest_access`): #VC PAGE_NOT_VALIDATED
        (:class:`~sevemu.hw.faults.PageNotValidated`) or #NPF with the RMP bit; ``vmpl``: the running
        VMSA's level, whose RMP permission masks the accesses (table reads included) need."""
        g_huge = False
        if not paging:
            # Paging off: GVA = GPA, and every access of an SEV guest is private (APM2 15.34.5).
            gpa = gva
            guest_c = sev
            g_writable = g_exec = True
        else:
            gpa, guest_c, g_writable, g_exec, g_huge = self._guest_walk(asid, sev, ncr3, cr3, gva, write, fetch,
                                                                         rmp, vmpl, wp)
        spa, npt_c, n_writable, n_exec, n_huge = self.nested(ncr3, gpa, write, fetch, True,
                                                             sev and (guest_c or fetch))
        # the TLB entry's size: the smaller of the guest's and the NPT's mapping (APM2 15.36.10)
        if rmp is not None and not rmp.check_guest_access(asid, gpa, spa, write=write, fetch=fetch, c=guest_c,
                                                          huge=g_huge and n_huge, vmpl=vmpl):
            raise PageNotValidated(gva, f"GPA {gpa:#x} is not validated")
        data_asid, data_c = domain_for(asid, guest_c, npt_c) if sev else (0, npt_c)
        fetch_asid, fetch_c = (asid, True) if sev else (0, npt_c)
        return Translation(gpa, spa & ~0xFFF, data_asid, data_c, fetch_asid, fetch_c,
                           g_writable and n_writable, g_exec and n_exec)

    def _guest_walk(self, asid: int, sev: bool, ncr3: int, cr3: int, gva: int, write: bool,
                    fetch: bool, rmp: Rmp | None = None, vmpl: int = 0,
                    wp: bool = True) -> tuple[int, bool, bool, bool, bool]:
        err = (PF.W if write else 0) | (PF.FETCH if fetch else 0)
        addr_mask = self.addr_mask
        rsvd = self.rsvd_sev if sev else self.rsvd_plain
        cache = self.cache
        table = cr3 & addr_mask
        writable = True
        executable = True
        entries: list[tuple[int, int, bool, int]] = []
        pte = 0
        size_mask = 0xFFF
        for shift in (39, 30, 21, 12):
            pte_gpa = table + ((gva >> shift) & 0x1FF) * 8
            spa, npt_c, _, _, _ = self.nested(ncr3, pte_gpa, False, False, False, sev)
            if rmp is not None and not rmp.check_guest_access(asid, pte_gpa, spa, write=False, fetch=False,
                                                              c=True, vmpl=vmpl):
                raise PageNotValidated(gva, f"page table at GPA {pte_gpa:#x} is not validated")
            t_asid, t_c = (asid, True) if sev else (0, npt_c)
            pte = int.from_bytes(cache.read(t_asid, t_c, spa, 8), "little")
            if not pte & PTE_P:
                raise PageFault(err, gva)
            if pte & rsvd:
                raise PageFault(err | PF.P | PF.RSVD, gva)
            entries.append((spa, pte, t_c, t_asid))
            writable = writable and bool(pte & PTE_RW)
            executable = executable and not pte & PTE_NX
            if shift == 21 and pte & PTE_PS:
                size_mask = 0x1FFFFF
                break
            if shift == 12:
                break
            table = pte & addr_mask
        if not wp:
            writable = True  # a supervisor write with CR0.WP clear
        if write and not writable:
            raise PageFault(err | PF.P, gva)
        if fetch and not executable:
            raise PageFault(err | PF.P, gva)
        # Accessed on every level, Dirty on the leaf of a write (APM 5.4.2).
        for i, (spa, entry, t_c, t_asid) in enumerate(entries):
            new = entry | PTE_A
            if write and i == len(entries) - 1:
                new |= PTE_D
            if new != entry:
                cache.write(t_asid, t_c, spa, new.to_bytes(8, "little"))
        gpa = (pte & addr_mask & ~size_mask) | (gva & size_mask)
        guest_c = sev and bool(pte & self.cbit)
        return gpa, guest_c, writable, executable, size_mask != 0xFFF
