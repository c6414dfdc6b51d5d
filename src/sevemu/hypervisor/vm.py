"""Virtual machines as the hypervisor sees them: memory (NPT + backing pages), vCPUs, console.

The hypervisor can read and write any physical memory as the host (ASID 0, C=0).  For a guest's
private pages that is ciphertext when read, and silent corruption when written -- SEV (before SNP)
has no integrity (APM2 15.34; SEVurity).  :meth:`Vm.host_read` / :meth:`Vm.host_write` do exactly
that, by GPA, through the SPA the NPT maps it to.

A VM's whole state lives here, once: its lifecycle (:class:`VmState`) and the SEV information KVM
keeps per VM in ``struct kvm_sev_info`` (Linux arch/x86/kvm/svm/svm.h): ``sev_active`` (the SEV
context exists: ``KVM_SEV_INIT`` or a launch through :class:`~sevemu.hypervisor.kvm.Hypervisor`),
``es`` (SEV-ES), the firmware ``handle``, the guest ``policy`` and each vCPU's VMSA page, and what
KVM keeps per VM for SEV-ES (``vm_type``, ``need_init``, ``vmsa_features``, ``ghcb_version``) and
the vCPU model.  The
ioctl layer (``KvmSev``) keeps no copy of it.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt

from sevemu._util.units import PAGE, PAGE_2M, PAGE_MASK, align_down
from sevemu.errors import AddressError, InputError, UnmappedError
from sevemu.hw import columns
from sevemu.hw.cpu import Engine
from sevemu.hw.host import HostCore
from sevemu.hw.svm import Vmcb, VmExit
from sevemu.hypervisor import npt as npt_mod
from sevemu.hypervisor.devices import DeviceBus, console_bus
from sevemu.hypervisor.memory import PageAllocator
from sevemu.hypervisor.npt import NestedPageTable
from sevemu.hypervisor.vcpu import BSP_RESET_EIP, CpuModel, KvmVmType, X86State, reset_vcpu

__all__ = ["HostPage", "Vcpu", "Vm", "VmKind", "VmState"]


class VmKind(enum.Enum):
    """What protection the VM runs with."""

    PLAIN = "plain"
    SEV = "sev"


class VmState(enum.Enum):
    """Where a VM is in its life: created, being launched (or received), running, crashed, gone."""

    CREATED = "created"
    LAUNCHING = "launching"
    RUNNING = "running"
    CRASHED = "crashed"
    DESTROYED = "destroyed"


@dataclass(eq=False)
class Vcpu:
    """One virtual CPU: its VMCB and the instruction engine running on it."""

    index: int
    vmcb: Vmcb
    engine: Engine | None = None
    exits: Counter[str] = field(default_factory=Counter)
    last_exit: VmExit | None = None
    arch: X86State = field(default_factory=X86State)
    """The rest of the vCPU's register state (segments, DR6/DR7, XCR0, PKRU, XSS, PAT, FPU):
    :mod:`sevemu.hypervisor.vcpu`."""
    guest_state_protected: bool = False
    """SEV-ES: the vCPU's state went into its encrypted VMSA (KVM ``guest_state_protected``); the
    VMCB's save fields and :attr:`arch` are no longer the guest's."""
    reset_hold: bool = False
    """SEV-ES: parked in AP reset hold (GHCB MSR protocol or AP_HLT_LOOP) until released."""
    holds: int = 0
    """How many times the vCPU entered AP reset hold."""
    released: bool = False
    """Released from AP reset hold by the AP jump table (the model's INIT-SIPI, :mod:`sevemu.hypervisor.ghcb`)."""
    snp_vmsa_gpa: int | None = None
    """SNP AP creation: the VMSA GPA the guest named for this vCPU, until it takes effect
    (:mod:`sevemu.hypervisor.ap_creation`)."""
    snp_ap_waiting_for_reset: bool = False
    """SNP AP creation: a request for this vCPU is pending (CREATE_ON_INIT: until INIT)."""
    snp_vmsas: int = 0
    """How many guest-made VMSAs this vCPU was started from (SNP AP creation)."""
    ghcb_registered: int | None = None
    """The GHCB GPA the guest registered (GHCB MSR protocol REG_GPA_REQ), if it did."""
    ghcb_errors: list[str] = field(default_factory=list)
    """GHCB errors the hypervisor answered this vCPU's VMGEXITs with (:mod:`sevemu.hypervisor.ghcb`)."""
    ghcb_map: HostPage | None = None
    """The host's mapping of the GHCB page of this vCPU's last VMGEXIT (``kvm_vcpu_map``), reused
    while the NPT still maps its GPA to the same SPA (:mod:`sevemu.hypervisor.ghcb`)."""


class Vm:
    """A guest: kind, ASID, NPT, firmware handle (SEV), vCPUs and the host-emulated serial console."""

    def __init__(self, name: str, kind: VmKind, memory: int, asid: int, core: HostCore,
                 alloc: PageAllocator, table_alloc: PageAllocator, *,
                 vm_type: KvmVmType = KvmVmType.DEFAULT_VM, cpu: CpuModel | None = None) -> None:
        if memory <= 0 or memory % PAGE:
            raise AddressError(f"VM memory must be a positive multiple of 4 KiB, got {memory:#x}")
        self.name = name
        self.kind = kind
        self.memory = memory
        self.asid = asid
        self.state = VmState.CREATED
        self.sev_active = False
        """The SEV context exists (KVM ``sev->active``: KVM_SEV_INIT, or a launch by the hypervisor)."""
        self.es = False
        """An SEV-ES guest (KVM ``sev->es_active``)."""
        self.handle = 0
        """The firmware's guest handle (0: none yet)."""
        self.policy = 0
        self.measurement = b""
        self.vmsa_pages: dict[int, int] = {}  # vCPU index -> SPA of its VMSA page (SEV-ES)
        self.vm_type = vm_type
        """KVM_CREATE_VM's type (:class:`~sevemu.hypervisor.vcpu.KvmVmType`)."""
        self.need_init = vm_type.needs_init2
        """KVM ``need_init``: a VM of an SEV type waits for KVM_SEV_INIT2."""
        self.vmsa_features = 0
        """The SEV-ES guest's ``sev_features`` (KVM ``vmsa_features``, from KVM_SEV_INIT2)."""
        self.ghcb_version = 0
        """The GHCB protocol version the guest may use (KVM ``ghcb_version``)."""
        self.cpu = cpu if cpu is not None else CpuModel("none", 0, 0, 0)
        """The vCPU model (QEMU ``-cpu``): its signature goes to RDX at reset."""
        self._core = core
        self._alloc = alloc
        self._table_alloc = table_alloc
        self.npt = NestedPageTable(core, table_alloc, memory)
        self.vcpus: list[Vcpu] = []
        self.console = bytearray()
        self.devices: DeviceBus = console_bus(self.console)
        """The VM's device models (:mod:`sevemu.hypervisor.devices`): every port I/O and MMIO access of
        the guest, by exit or through the GHCB, goes to this bus; it starts with the COM1 console
        writing to :attr:`console`, a VMM adds a PC's devices (``install_pc``)."""
        self.shared_gpas: set[int] = set()  # pages the guest declared shared (KVM_HC_MAP_GPA_RANGE)
        self.snp = False
        """An SEV-SNP guest (KVM ``sev_snp_guest``): its memory is private (guest_memfd) unless shared."""
        self.snp_context = 0
        """SPA of the SNP guest-context page (KVM ``snp_context``; 0: none)."""
        self.huge_pages = True
        """Back 2 MiB-aligned regions KVM populates whole with host huge pages (SNP launch updates,
        the regions an incoming migration names whole: :mod:`sevemu.hypervisor.migration`)."""
        self.private_spas: set[int] = set()
        """SNP: backing pages the RMP gives the guest (:mod:`sevemu.hypervisor.sev.snp`)."""
        self.crash_reason: str | None = None
        self.termination: tuple[int, int] | None = None
        """SEV-ES: the (reason set, reason code) of the guest's termination request."""
        self.ap_jump_table = 0
        """SEV-ES: the AP jump table's address the guest set (GHCB AP_JUMP_TABLE)."""
        self.mmio: dict[int, bytearray] = {}
        """Emulated MMIO pages (GPA -> register bytes): the NPT maps them with a reserved bit, so an
        access is an NPF with RSVD (SEV-ES: #VC 0x400 in the guest, which asks with MMIO_READ/WRITE)."""
        self._owned: set[int] = set()  # SPAs allocated for this VM (freed on release)
        self._owned_huge: list[int] = []  # first SPAs of the huge pages allocated for it (freed on release)

    @property
    def sev(self) -> bool:
        return self.kind is VmKind.SEV

    def add_vcpu(self, engine: Engine | None = None, *, reset_eip: int = BSP_RESET_EIP) -> Vcpu:
        """A new vCPU in the x86 reset state at ``reset_eip`` (KVM_CREATE_VCPU, then QEMU's reset;
        an SEV-ES guest's APs start at OVMF's SEV-ES reset EIP)."""
        vmcb = Vmcb(asid=self.asid, np_enable=True, sev_enable=self.sev, ncr3=self.npt.root,
                    pa=self._table_alloc.alloc())  # the VMCB page (KVM: one page per vCPU)
        vcpu = Vcpu(len(self.vcpus), vmcb, engine)
        reset_vcpu(vmcb, vcpu.arch, self.cpu.signature, reset_eip)
        self._core.vmcb_init(vmcb)
        self.vcpus.append(vcpu)
        return vcpu

    # ---- backing memory ---------------------------------------------------------------------
    def back(self, gpa: int) -> int:
        """Back the guest page containing ``gpa`` with a host page (if not yet); returns its SPA."""
        page = align_down(gpa, PAGE)
        if not 0 <= page < self.memory:
            raise AddressError(f"GPA {gpa:#x} is outside {self.name}'s {self.memory:#x} bytes")
        spa = self.npt.lookup(page)
        if spa is None:
            spa = self._alloc.alloc()
            self.npt.map(page, spa)
            self._owned.add(spa)
        return spa

    def back_huge(self, gpa: int) -> int | None:
        """Back the 2 MiB-aligned guest region at ``gpa`` with one host huge page (contiguous, 2 MiB
        aligned: what a guest_memfd huge folio gives) when none of its pages is backed yet; its SPA, or
        None (region partly backed, not 2 MiB aligned or outside the guest, or no huge page left)."""
        if gpa % PAGE_2M or not 0 <= gpa or gpa + PAGE_2M > self.memory:
            return None
        mapped = self.npt.mappings
        first = gpa >> 12
        if not mapped.keys().isdisjoint(range(first, first + PAGE_2M // PAGE)):  # (one pass in C)
            return None
        spa = self._alloc.alloc_huge()
        if spa is None:
            return None
        self.npt.map_huge(gpa, spa)
        self._owned_huge.append(spa)
        return spa

    def back_range(self, gpa: int, length: int) -> list[int]:
        """Back every page of ``[gpa, gpa+length)``; their SPAs in order (KVM ``sev_pin_memory``)."""
        first = align_down(gpa, PAGE)
        count = len(range(first, gpa + length, PAGE))
        # gfn -> SPA of the pages already backed, in one C pass (``map``), without a walk each; only
        # the others (None, or SPA 0 as before) are backed one by one
        spas: list[int] = list(map(self.npt.mappings.get, range(first >> 12, (first >> 12) + count)))  # type: ignore[arg-type]
        if not all(spas):
            for i, spa in enumerate(spas):
                if not spa:
                    spas[i] = self.back(first + i * PAGE)
        return spas

    def back_pages(self, gpas: list[int]) -> list[int]:
        """:meth:`back` of each page-aligned GPA, in order; their SPAs.  The new pages are mapped
        with :meth:`Npt.map_many` (the same pages and entries as one :meth:`back` after another)."""
        memory = self.memory
        if len(gpas) <= npt_mod.SMALL_BATCH:  # (a few pages: the same check without the array)
            outside = not all(not gpa & PAGE_MASK and 0 <= gpa < memory for gpa in gpas)
        else:
            try:
                at = np.array(gpas, dtype=np.int64)
                outside = bool((at & PAGE_MASK).any() or (at < 0).any() or (at >= memory).any())
            except (OverflowError, ValueError):  # beyond 63 bits: named below
                outside = True
        if outside:
            bad = next(gpa for gpa in gpas if gpa & PAGE_MASK or not 0 <= gpa < memory)
            raise AddressError(f"GPA {bad:#x} is not a page of {self.name}'s {memory:#x} bytes")
        mapped = self.npt.mappings
        got = list(map(mapped.get, [gpa >> 12 for gpa in gpas]))
        if None not in got:  # every page backed already (a huge page's): nothing to map
            return cast("list[int]", got)
        fresh = [gpa for gpa in dict.fromkeys(gpas) if gpa >> 12 not in mapped]
        spas = self._alloc.alloc_many(len(fresh))
        self.npt.map_many(list(zip(fresh, spas, strict=True)))
        self._owned.update(spas)
        if len(fresh) == len(gpas):  # every page new: the SPAs just allocated, in order
            return spas
        return [mapped[gpa >> 12] for gpa in gpas]

    def backed_spas(self, gpas: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64] | None:
        """The SPAs of a column of GPAs when every one is a page of this VM that is backed already (a
        prepared destination's): what :meth:`back_pages` returns for them then, as a column, without
        backing anything; None when one is unaligned, outside the VM or not backed (back them with
        :meth:`back_pages`)."""
        if not len(gpas) or bool((gpas & np.uint64(PAGE_MASK)).any()) or int(gpas.max()) >= self.memory:
            return None
        # (a dict lookup per page -- NestedPageTable.lookup_many measured 0.1-0.2 us per page slower here
        # in a migration's receive loop, though cheaper alone: docs/firmware.md, the twelfth round --
        # made in one C call, sevemu.hw.columns.lookup)
        spas = columns.lookup(self.npt.mappings, gpas, 12)
        if bool((spas < 0).any()):
            return None
        return spas.astype(np.uint64)

    def spa_of(self, gpa: int) -> int:
        """SPA backing ``gpa``; :class:`UnmappedError` if the page is not backed."""
        spa = self.npt.lookup(gpa)
        if spa is None:
            raise UnmappedError(f"GPA {gpa:#x} of {self.name} is not mapped")
        return spa

    # ---- the host's view ----------------------------------------------------------------------
    def _mapped(self, page: int) -> None:
        """An SNP guest's private memory is guest_memfd: the VMM has no mapping of it."""
        if self.snp and page not in self.shared_gpas:
            raise UnmappedError(f"GPA {page:#x} of {self.name} is private (guest_memfd): the host has no mapping")

    def host_read(self, gpa: int, length: int) -> bytes:
        """Read guest memory as the host: plaintext for shared pages, ciphertext for private ones
        (an SNP guest's private pages are not mapped at all)."""
        for page, _, _ in _pieces(gpa, length):
            self._mapped(page)
        out = bytearray()
        for page, off, n in _pieces(gpa, length):
            out += self._core.host_read(self.spa_of(page) + off, n)
        return bytes(out)

    def host_write(self, gpa: int, data: bytes) -> None:
        """Write guest memory as the host (corrupts private pages: no integrity before SNP; an SNP
        guest's private pages are not mapped)."""
        for page, _, _ in _pieces(gpa, len(data)):
            self._mapped(page)
        view = memoryview(data)
        pos = 0
        for spa, n in self._spa_runs(gpa, len(data)):  # one host write per physically contiguous run
            self._core.host_write(spa, view[pos : pos + n])
            pos += n

    def _spa_runs(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """(SPA, length) of the physically contiguous runs of ``[gpa, gpa+length)``, in GPA order
        (the pages must be mapped)."""
        runs: list[tuple[int, int]] = []
        for page, off, n in _pieces(gpa, length):
            spa = self.spa_of(page) + off
            if runs and runs[-1][0] + runs[-1][1] == spa:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((spa, n))
        return runs

    def host_page(self, gpa: int) -> HostPage:
        """The host's mapping of the guest page holding ``gpa`` (``kvm_vcpu_map``): reads and writes
        at offsets in it go straight to :meth:`host_read` / :meth:`host_write`'s core interface,
        the page resolved once; :class:`UnmappedError` if it is not backed."""
        page = gpa & ~PAGE_MASK
        return HostPage(page, self.spa_of(page), self._core)

    def vmsa_page(self, vcpu: int) -> int:
        """SPA of ``vcpu``'s VMSA page (allocated from the host's table pages on first use)."""
        spa = self.vmsa_pages.get(vcpu)
        if spa is None:
            spa = self.vmsa_pages[vcpu] = self._table_alloc.alloc()
        return spa

    def release(self) -> None:
        """Return every page the VM holds to the host allocators: backing pages, the NPT's table
        pages and the VMSA pages."""
        self.npt.release()
        for spa in self._owned_huge:  # (into the set: the pages go back in the order they always did)
            self._owned.update(range(spa, spa + PAGE_2M, PAGE))
        self._owned_huge.clear()
        self._alloc.free_many(self._owned)
        self._owned.clear()
        for spa in self.vmsa_pages.values():
            self._table_alloc.free(spa)
        self.vmsa_pages.clear()
        for vcpu in self.vcpus:
            if vcpu.vmcb.pa:
                self._core.vmcb_free(vcpu.vmcb)
                self._table_alloc.free(vcpu.vmcb.pa)
                vcpu.vmcb.pa = 0


class HostPage:
    """The host's mapping of one guest page (:meth:`Vm.host_page`): what :meth:`Vm.host_read` and
    :meth:`Vm.host_write` do for a range inside it, without resolving the page again."""

    __slots__ = ("_core", "gpa", "spa")

    def __init__(self, gpa: int, spa: int, core: HostCore) -> None:
        self.gpa = gpa
        self.spa = spa
        self._core = core

    def read(self, off: int, length: int) -> bytes:
        """``length`` bytes at offset ``off`` of the page, as the host reads them."""
        if not 0 <= off <= off + length <= PAGE:
            raise InputError(f"{length} bytes at offset {off:#x} do not fit in a page")
        return self._core.host_read(self.spa + off, length)

    def read_runs(self, runs: tuple[tuple[int, int], ...]) -> bytes:
        """The runs ``(offset, length)`` of whole 64-byte lines of the page, joined in the order
        given, as the host reads them (what :meth:`read` of each returns, in one call)."""
        return self._core.host_read_runs(self.spa, runs)

    def exchange(self, runs: tuple[tuple[int, int], ...], expect: bytes,
                 writes: list[tuple[int, bytes]]) -> bytes | None:
        """:meth:`read_runs` of ``runs``; when that gives ``expect``, each ``(offset, data)`` of
        ``writes`` written into the page (as :meth:`write`) and None, else what was read (nothing
        written) -- in one call (:meth:`HostCore.host_exchange <sevemu.hw.host.HostCore>`)."""
        return self._core.host_exchange(self.spa, runs, expect, writes)

    def write(self, off: int, data: bytes | bytearray) -> None:
        """Write ``data`` at offset ``off`` of the page, as the host writes."""
        if not 0 <= off <= off + len(data) <= PAGE:
            raise InputError(f"{len(data)} bytes at offset {off:#x} do not fit in a page")
        self._core.host_write(self.spa + off, data)


def _pieces(gpa: int, length: int) -> list[tuple[int, int, int]]:
    """(page GPA, offset, length) pieces of a range split at page boundaries."""
    out = []
    pos = gpa
    end = gpa + length
    while pos < end:
        off = pos & PAGE_MASK
        n = min(PAGE - off, end - pos)
        out.append((pos - off, off, n))
        pos += n
    return out
