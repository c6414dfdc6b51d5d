"""SEV-SNP page-state changes the guest asks for, and the RMP faults KVM resolves (GHCB 56421 sections
2.3.1 "SNP Page State Change" (MSR protocol 0x014 / 0x015) and 4.1.6 "Page State Change" (NAE
0x8000_0010 with PSC descriptors); Linux arch/x86/kvm/svm/sev.c ``snp_begin_psc_msr``,
``snp_begin_psc``, ``sev_handle_rmp_fault``, ``sev_gmem_prepare`` / ``sev_gmem_invalidate``;
arch/x86/coco/sev for the guest's side).

An SNP guest's memory is guest_memfd: private unless the guest asked for it shared.  The guest changes
a page's state in two steps -- PVALIDATE(rescind) then a PSC request to make it shared; a PSC request
to make it private then PVALIDATE -- and the hypervisor applies the request with RMPUPDATE:

* **private**: the GPA leaves the VM's shared set and its backing page becomes assigned to the guest's
  ASID at that GPA, not validated (the guest validates it next);
* **shared**: the backing page becomes Hypervisor-owned (RMPUPDATE clears Validated) after the
  guest's lines of it are flushed (``VMPAGE_FLUSH``), and the GPA joins the shared set.

KVM 6.11 forwards PSC to userspace as ``KVM_HC_MAP_GPA_RANGE`` exits and converts guest_memfd pages on
the next fault; the model applies the same transitions directly in the run loop (one round trip
less, the same RMP states).  ``KVM_HC_MAP_GPA_RANGE`` from an SNP guest (VMMCALL / the GHCB VMMCALL
event) is applied the same way.

RMP faults (#VMEXIT(NPF) with the RMP bit) of an SNP guest are resolved as KVM resolves them: a
private access to a page the RMP still gives the hypervisor (guest_memfd's page not yet prepared)
assigns it (``sev_gmem_prepare``: not validated -- the guest sees #VC 0x404 or validates it first); a
shared access to a private page converts it to shared (the implicit conversion QEMU does after
``KVM_EXIT_MEMORY_FAULT``); a size mismatch on a 2 MiB RMP entry is PSMASHed.  Anything else (the page
is assigned to another guest or at another GPA -- what a host attack leaves) stops the VM with the
reason: KVM cannot make such an access succeed.

PSC errors (SW_EXITINFO2, Linux ``PSC_INVALID_HDR`` / ``PSC_INVALID_ENTRY`` / ``PSC_ERROR_GENERIC``,
the MSR protocol's error field): a bad header or entry, a GPA outside the guest, an RMPUPDATE that
failed.  Entries are applied in order; ``cur_entry`` (and ``cur_page``) say how far it got.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sevemu._util.units import PAGE, PAGE_2M
from sevemu.abi.ghcb import (
    PSC_MAX_ENTRY,
    GhcbMsrInfo,
    HvFeature,
    MsrPscReq,
    MsrPscResp,
    PscEntry,
    PscHeader,
    PscOp,
    SwExitCode,
)
from sevemu.abi.paging import NpfExitInfo1
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.hw.svm import TlbControl

if TYPE_CHECKING:
    from sevemu.hypervisor.ghcb import GhcbHandler, NaeExit
    from sevemu.hypervisor.sev.common import SevHost
    from sevemu.hypervisor.vm import Vcpu, Vm

__all__ = ["PSC_ERROR_GENERIC", "PSC_INVALID_ENTRY", "PSC_INVALID_HDR", "PscError", "gmem_fault", "install",
           "report_snp", "rmp_fault", "set_page_state"]

PSC_ERROR_GENERIC: Final = 1 << 32
PSC_INVALID_HDR: Final = (1 << 32) | 1
PSC_INVALID_ENTRY: Final = (1 << 32) | 2
_HDR: Final = 8
_ENTRY: Final = 8
_NPF_RMP: Final = int(NpfExitInfo1.RMP)
_NPF_ENC: Final = int(NpfExitInfo1.ENC)
_NPF_SIZEM: Final = int(NpfExitInfo1.SIZEM)


class PscError(Exception):
    """Raised when a page-state change cannot be applied (``code``: the SW_EXITINFO2 value)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def set_page_state(host: SevHost, vm: Vm, gpa: int, private: bool, flushed: bool = False) -> None:
    """Make the 4 KiB page at ``gpa`` of SNP guest ``vm`` private or shared (module docstring);
    ``flushed``: the caller has already flushed the host's lines of the page (:func:`_private_range`)."""
    if gpa % PAGE or not 0 <= gpa < vm.memory:
        raise PscError(PSC_INVALID_ENTRY, f"GPA {gpa:#x} is not a page of {vm.name}")
    spa = vm.back(gpa)
    core = host.core
    if private:
        vm.shared_gpas.discard(gpa)
        if spa in vm.private_spas:
            return
        if not flushed:
            core.clflush_range(spa, PAGE)  # the host's lines of the page go before the guest owns it
        rc = core.rmpupdate_state(spa, RmpUpdateState(gpa=gpa, assigned=1, asid=vm.asid))
        if rc != RmpResult.SUCCESS:
            raise PscError(PSC_ERROR_GENERIC, f"RMPUPDATE of GPA {gpa:#x} to private: {RmpResult(rc).name}")
        vm.private_spas.add(spa)
        return
    _smash(host, vm, gpa, spa)
    if spa in vm.private_spas or host.soc.rmp_entry(spa).assigned:
        core.vmpage_flush(spa, vm.asid)  # the guest's lines, written back encrypted, before the page is ours
        rc = core.rmpupdate_state(spa, RmpUpdateState())
        if rc != RmpResult.SUCCESS:
            raise PscError(PSC_ERROR_GENERIC, f"RMPUPDATE of GPA {gpa:#x} to shared: {RmpResult(rc).name}")
        vm.private_spas.discard(spa)
    vm.shared_gpas.add(gpa)


def _smash(host: SevHost, vm: Vm, gpa: int, spa: int) -> None:
    """Before a 4 KiB change inside a 2 MiB private page: PSMASH it (Linux ``sev_gmem_invalidate`` /
    ``snp_handle_page_state_change``: a partial conversion of a huge folio smashes its RMP entry) and
    split the NPT's 2 MiB leaf over it, so the guest's 2 MiB mapping cannot outlive the 4 KiB entries."""
    if spa not in vm.private_spas:
        return
    entry = host.soc.rmp_entry(spa)
    if not entry.page_size:
        return
    rc = host.core.psmash(spa & ~(PAGE_2M - 1))
    if rc != RmpResult.SUCCESS:
        raise PscError(PSC_ERROR_GENERIC, f"PSMASH for GPA {gpa:#x}: {RmpResult(rc).name}")
    _split(vm, gpa)


def _split(vm: Vm, gpa: int) -> None:
    """Split the NPT's 2 MiB leaf over ``gpa`` (if any) and have every vCPU flush the ASID (KVM
    ``kvm_zap_gfn_range`` then refaulting at 4 KiB)."""
    if vm.npt.split(gpa):
        for vcpu in vm.vcpus:
            vcpu.vmcb.tlb_control = TlbControl.FLUSH_ASID


def _apply_range(host: SevHost, vm: Vm, gpa: int, pages: int, op: int) -> int:
    """Apply ``op`` to ``pages`` pages from ``gpa``; returns the pages done (PscError on failure)."""
    if op not in (PscOp.PRIVATE, PscOp.SHARED):
        raise PscError(PSC_INVALID_ENTRY, f"page state operation {op} (only PRIVATE and SHARED are supported)")
    if op == PscOp.PRIVATE:
        _private_range(host, vm, gpa, pages)
        return pages
    for i in range(pages):
        set_page_state(host, vm, gpa + i * PAGE, False)
    return pages


def _private_range(host: SevHost, vm: Vm, gpa: int, pages: int) -> None:
    """:func:`set_page_state` (private) of each page from ``gpa`` in order, the RMPUPDATEs of each run of
    contiguous backing in one :meth:`~sevemu.hw.host.HostCore.rmpupdate_run`: the same RMP, shared set,
    private set and error (the first page refused) as page by page.  The pages are backed and the host's
    lines of those not private yet flushed first (one CLFLUSH range per run), as before."""
    spas: list[int] = []
    bad: int | None = None
    for i in range(pages):
        page = gpa + i * PAGE
        if page % PAGE or not 0 <= page < vm.memory:
            bad = page
            break
        spas.append(vm.back(page))
    private = vm.private_spas
    shared = vm.shared_gpas
    start = end = -1
    for spa in spas:  # one CLFLUSH range per run of contiguous backing not private yet
        if spa in private:
            continue
        if spa != end:
            if end > start:
                host.core.clflush_range(start, end - start)
            start = spa
        end = spa + PAGE
    if end > start:
        host.core.clflush_range(start, end - start)
    n = len(spas)
    i = 0
    while i < n:
        spa = spas[i]
        if spa in private:
            shared.discard(gpa + i * PAGE)
            i += 1
            continue
        j = i + 1
        while j < n and spas[j] == spas[j - 1] + PAGE and spas[j] not in private:
            j += 1
        done, rc = host.core.rmpupdate_run(spa, j - i, RmpUpdateState(gpa=gpa + i * PAGE, assigned=1, asid=vm.asid))
        last = min(i + done + 1, j)  # the pages tried: the one refused had left the shared set too
        if shared:
            shared.difference_update(range(gpa + i * PAGE, gpa + last * PAGE, PAGE))
        private.update(spas[i : i + done])
        if rc != RmpResult.SUCCESS:
            raise PscError(PSC_ERROR_GENERIC,
                           f"RMPUPDATE of GPA {gpa + (i + done) * PAGE:#x} to private: {RmpResult(rc).name}")
        i = j
    if bad is not None:
        raise PscError(PSC_INVALID_ENTRY, f"GPA {bad:#x} is not a page of {vm.name}")


# ---- the GHCB requests ------------------------------------------------------------------------------
def _msr_psc(host: SevHost, vm: Vm, vcpu: Vcpu, msr: int) -> None:
    """MSR protocol PSC_REQ: one 4 KiB page; PSC_RESP with the error in bits 63:32."""
    req = MsrPscReq.from_int(msr)
    error = 0
    try:
        if not vm.snp:
            raise PscError(PSC_ERROR_GENERIC, f"{vm.name} is not an SNP guest")
        _apply_range(host, vm, req.gfn * PAGE, 1, req.op)
    except PscError as e:
        error = e.code & 0xFFFFFFFF or 1
        vcpu.ghcb_errors.append(f"PSC: {e.detail}")
    vcpu.vmcb.ghcb_gpa = MsrPscResp(error=error).to_int()


def _nae_psc(host: SevHost, ex: NaeExit) -> None:
    """NAE PSC: the descriptor in the scratch area, entries cur_entry..end_entry applied in order."""
    vm = ex.vm
    if not vm.snp:
        ex.out["sw_exit_info_2"] = PSC_ERROR_GENERIC
        return
    gpa = ex.scratch(_HDR + _ENTRY)
    # KVM reads only cur_entry and end_entry: the header's reserved dword is the guest's (edk2 2025.02's
    # SEC leaves whatever the shared buffer held there), never checked and written back as it was
    head = vm.host_read(gpa, _HDR)
    cur, end = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if end >= PSC_MAX_ENTRY or cur > end:
        ex.out["sw_exit_info_2"] = PSC_INVALID_HDR
        return
    length = _HDR + (end + 1) * _ENTRY
    gpa = ex.scratch(length)
    raw = bytearray(vm.host_read(gpa, length))
    result = 0
    while cur <= end:
        off = _HDR + cur * _ENTRY
        entry = PscEntry.from_int(int.from_bytes(raw[off : off + _ENTRY], "little"))
        size = PAGE_2M if entry.pagesize else PAGE
        pages = size // PAGE
        base = entry.gfn * PAGE
        if base % size or entry.cur_page > pages:
            result = PSC_INVALID_ENTRY
            break
        try:
            done = entry.cur_page + _apply_range(host, vm, base + entry.cur_page * PAGE, pages - entry.cur_page,
                                                 entry.operation)
        except PscError as e:
            result = e.code
            ex.vcpu.ghcb_errors.append(f"PSC entry {cur}: {e.detail}")
            break
        raw[off : off + _ENTRY] = PscEntry(cur_page=done, gfn=entry.gfn, operation=entry.operation,
                                           pagesize=entry.pagesize).to_int().to_bytes(_ENTRY, "little")
        cur += 1
    raw[0:4] = PscHeader(cur_entry=cur, end_entry=end).encode()[0:4]
    vm.host_write(gpa, bytes(raw))
    ex.out["sw_exit_info_2"] = result


def gmem_fault(host: SevHost, vm: Vm, gpa: int, info1: int) -> str | None:
    """A not-present #NPF of SNP guest ``vm`` that KVM just backed: a private access (ENC) to a page
    the guest did not make shared gets its guest_memfd page prepared as it is mapped -- assigned to
    the guest, not validated (``kvm_gmem_get_pfn`` -> ``sev_gmem_prepare``) -- so the guest's retry
    is its #VC 0x404 (or its PVALIDATE goes on) without a second, RMP, fault.  None, or why not."""
    page = gpa & ~(PAGE - 1)
    if not info1 & _NPF_ENC or page in vm.shared_gpas or vm.back(page) in vm.private_spas:
        return None
    if host.soc.rmp_entry(vm.back(page)).assigned:
        return None  # the RMP fault that follows says what it is
    try:
        set_page_state(host, vm, page, True)
    except PscError as e:
        return e.detail
    return None


def rmp_fault(host: SevHost, vm: Vm, gpa: int, info1: int) -> str | None:
    """#VMEXIT(NPF) with the RMP bit of SNP guest ``vm``: resolve it (None: re-enter) or why not."""
    page = gpa & ~(PAGE - 1)
    if not 0 <= page < vm.memory:
        return f"RMP #NPF at GPA {gpa:#x}, outside the guest"
    spa = vm.back(page)
    entry = host.soc.rmp_entry(spa)
    if info1 & _NPF_SIZEM:  # Linux sev_handle_rmp_fault: the mapping sizes must agree
        if entry.page_size:  # a 4 KiB request (PVALIDATE) on a 2 MiB RMP page: PSMASH it
            rc = host.core.psmash(spa & ~(PAGE_2M - 1))
            return None if rc == RmpResult.SUCCESS else f"PSMASH for GPA {gpa:#x}: {RmpResult(rc).name}"
        if page >> 21 in vm.npt.huge:  # a 2 MiB NPT leaf over 4 KiB RMP entries: map 4 KiB pages
            _split(vm, page)
            return None
    try:
        if not info1 & _NPF_ENC:  # a shared access to a private page: the implicit conversion
            if entry.assigned and entry.asid == vm.asid and entry.gpa == page:
                set_page_state(host, vm, page, False)
                return None
        elif not entry.assigned:  # guest_memfd's page, not prepared yet
            set_page_state(host, vm, page, True)
            return None
    except PscError as e:
        return e.detail
    return (f"RMP #NPF at GPA {gpa:#x} (EXITINFO1 {info1:#x}) that KVM cannot resolve: the page is "
            f"{entry.state.name}, ASID {entry.asid}, GPA {entry.gpa:#x}")


def install(ghcb: GhcbHandler, host: SevHost) -> None:
    """Register the SNP page-state-change requests with ``ghcb`` (an SEV-ES guest that sends one is
    answered with an error: it is not an SNP guest)."""
    ghcb.msr_table[GhcbMsrInfo.PSC_REQ] = lambda vm, vcpu, msr: _msr_psc(host, vm, vcpu, msr)
    ghcb.nae_table[SwExitCode.PSC] = lambda ex: _nae_psc(host, ex)


def report_snp(ghcb: GhcbHandler) -> None:
    """SNP is up on the host: HV_FT_RESP / HV_FEATURES report it and AP creation (KVM's
    ``GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION``)."""
    ghcb.hv_features |= int(HvFeature.SNP | HvFeature.SNP_AP_CREATION)
