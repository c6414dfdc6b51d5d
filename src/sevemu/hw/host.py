"""What x86 host software can do with the SoC: the hypervisor's only handle on the hardware.

The host (the hypervisor and everything it links) runs on the cores at ASID 0.  It may read and
write physical memory through its own cache domain (with SEV-SNP enabled, writes only to pages the
RMP gives the hypervisor: #PF with the RMP bit otherwise, :class:`~sevemu.hw.rmp.HostRmpFault`),
program a device to DMA into memory (checked by the IOMMU against the RMP), execute RMPUPDATE,
PSMASH and WRMSR SYSCFG / RMP_BASE / RMP_END, read the RMP, flush lines (CLFLUSH, WBINVD, VMPAGE_FLUSH),
run guests with VMRUN on VMCBs it builds, execute CPUID and RDMSR, and talk to the Secure Processor
through the mailbox registers.  It may not reach the memory controller's key-slot port, the PSP's
DMA view, any other key domain's plaintext, or the PSP's firmware (see ``docs/threat-model.md``).

:class:`HostSoc` and :class:`HostCore` expose exactly that and hold their parts privately, so the
hypervisor is written against the host's interface and a test of a host attack can use nothing
else.  (Python cannot enforce capability boundaries; the import contracts and these facades keep
the model's code honest, and the attack tests are written against them.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.errors import HardwareError
from sevemu.hw import memaccel

if TYPE_CHECKING:
    from sevemu.hw.cpu import Core, Engine
    from sevemu.hw.profiles import CpuProfile
    from sevemu.hw.psp import Psp
    from sevemu.hw.rmp import RmpEntry
    from sevemu.hw.soc import Soc
    from sevemu.hw.svm import Vmcb, VmExit

__all__ = ["HostCore", "HostSoc", "PspMailbox"]


class _HostWrite(Protocol):
    def __call__(self, spa: int, data: bytes | bytearray | memoryview, c: bool = False) -> None: ...


class _HostReadRuns(Protocol):
    def __call__(self, spa: int, runs: tuple[tuple[int, int], ...], c: bool = False) -> bytes: ...




class HostCore:
    """One core as host software drives it (ASID 0).

    ``host_write(spa, data, c=False)``: a store by the host (C=1 selects the host's SME key).
    ``host_read_runs(spa, runs, c=False)``: loads by the host of runs of whole lines in the page at
    ``spa`` -- ``(offset, length)`` pairs (multiples of 64), their bytes joined in the order given:
    what one :meth:`host_read` per run returns, in one call.  ``host_exchange(spa, runs, expect,
    writes)``: ``host_read_runs(spa, runs)``, and when that gives ``expect`` the ``(offset, data)``
    ``writes`` into the page (None returned), else what was read (a request in a shared page and
    the answer given to the same request before).  ``vmrun(vmcb, engine)``: VMRUN the guest
    described by ``vmcb`` until #VMEXIT.  They are the core's (:meth:`Core.host_write
    <sevemu.hw.cpu.Core.host_write>`, :meth:`~sevemu.hw.cpu.Core.host_read_runs`,
    :meth:`~sevemu.hw.cpu.Core.host_exchange`, :meth:`~sevemu.hw.cpu.Core.vmrun`), or where the C
    helpers are built the same accesses of whole unencrypted lines in one call (``HostPort``,
    :mod:`sevemu.hw.memaccel`: the same checks, snoops, bytes, counters and LRU order; anything else
    goes to the core's methods).
    """

    __slots__ = ("_core", "host_exchange", "host_read_runs", "host_write", "vmrun")

    host_write: _HostWrite
    host_read_runs: _HostReadRuns
    host_exchange: Callable[[int, tuple[tuple[int, int], ...], bytes, list[tuple[int, bytes]]], bytes | None]
    vmrun: Callable[[Vmcb, Engine], VmExit]

    def __init__(self, core: Core) -> None:
        self._core = core
        if memaccel.HOST_PORT:
            cache = core.cache
            port = memaccel.helpers.HostPort(core, vars(cache), core.mc.dram.size, core.host_write,
                                             core.host_read_runs, cache._write_lines_rest, cache._read_runs_rest)
            self.host_write, self.host_read_runs, self.host_exchange = port.write, port.read_runs, port.exchange
        else:
            self.host_write, self.host_read_runs = core.host_write, core.host_read_runs
            self.host_exchange = core.host_exchange
        self.vmrun = core.vmrun

    @property
    def index(self) -> int:
        return self._core.index

    def host_read(self, spa: int, length: int, c: bool = False) -> bytes:
        """A load by the host (C=1 selects the host's SME key)."""
        return self._core.host_read(spa, length, c)

    def vmcb_init(self, vmcb: Vmcb) -> None:
        """The hypervisor initialised the VMCB ``vmcb`` in the page at ``vmcb.pa`` (a page it allocated):
        its bytes are stored there (host stores: #PF with the RMP bit unless the page is the
        hypervisor's) and ``vmcb`` stays the hypervisor's mapping of the page -- the view VMRUN uses
        while nobody writes the page (:class:`~sevemu.hw.svm.VmcbCache`)."""
        from sevemu.hw.svm import encode_vmcb
        self._core.host_write(vmcb.pa, encode_vmcb(vmcb))
        self._core.vmcbs.hold(vmcb)

    def vmcb_free(self, vmcb: Vmcb) -> None:
        """The hypervisor is about to free the VMCB page of ``vmcb``: the view is written back and dropped."""
        self._core.vmcbs.drop(vmcb)

    def host_read_stream(self, spa: int, length: int) -> bytes:
        """Non-temporal loads of a large range (C=0)."""
        return self._core.host_read_stream(spa, length)

    def host_read_stream_into(self, spa: int, out: bytearray | memoryview) -> None:
        """:meth:`host_read_stream` of ``len(out)`` bytes into the caller's (reused) buffer."""
        self._core.host_read_stream_into(spa, out)

    def host_write_stream(self, spa: int, data: bytes | bytearray | memoryview) -> None:
        """Non-temporal stores of a large range (C=0)."""
        self._core.host_write_stream(spa, data)

    def host_read_stream_pages(self, spa: int, length: int) -> list[bytearray] | None:
        """A page-aligned :meth:`host_read_stream` as DRAM's own pages, read-only, when they hold what
        it returns (else None: copy instead; :meth:`Core.host_read_stream_pages`)."""
        return self._core.host_read_stream_pages(spa, length)

    def host_write_stream_pages(self, spa: int, length: int, fill: Callable[[list[bytearray]], None]) -> None:
        """A page-aligned :meth:`host_write_stream` whose bytes ``fill`` writes in place into DRAM's
        pages (:meth:`Core.host_write_stream_pages`)."""
        self._core.host_write_stream_pages(spa, length, fill)

    def host_clear_pages(self, spa: int, length: int) -> None:
        """Zero whole pages the host hands out, every page stored in DRAM (:meth:`Core.host_clear_pages`)."""
        self._core.host_clear_pages(spa, length)

    def clflush(self, spa: int, c: bool = False) -> None:
        """CLFLUSH of the host's line (it cannot evict another ASID's line)."""
        self._core.clflush(spa, c)

    def clflush_range(self, spa: int, length: int, c: bool = False) -> None:
        """CLFLUSH of every host line of a range."""
        self._core.clflush_range(spa, length, c)

    def wbinvd(self) -> int:
        """WBINVD: write back and invalidate every line, whatever its ASID."""
        return self._core.wbinvd()

    def vmpage_flush(self, spa: int, asid: int) -> int:
        """WRMSR VMPAGE_FLUSH: write back and invalidate one page's lines of ``asid``."""
        return self._core.vmpage_flush(spa, asid)

    def rmpupdate(self, rax: int, rcx: int) -> int:
        """RMPUPDATE (F2 0F 01 FE): RAX = the page's SPA, RCX = address of the 16-byte new state
        (:class:`~sevemu.abi.rmp.RmpUpdateState`) in host memory (the host's addresses are physical
        in this model); the EAX result (:class:`~sevemu.abi.rmp.RmpResult`).  #UD without SNP_EN."""
        state = RmpUpdateState.decode(self._core.host_read(rcx, RmpUpdateState.SIZE))
        return int(self.rmpupdate_state(rax, state))

    def rmpupdate_state(self, spa: int, state: RmpUpdateState) -> RmpResult:
        """RMPUPDATE with the new state given directly (what :meth:`rmpupdate` reads from [RCX])."""
        rmp = self._core.rmp
        if rmp is None:
            raise HardwareError("#UD: RMPUPDATE with SYSCFG.SNP_EN clear")
        return rmp.rmpupdate(spa, state)

    def rmpupdate_fields(self, spa: int, gpa: int, assigned: int, pagesize: int, immutable: int,
                         asid: int) -> RmpResult:
        """:meth:`rmpupdate_state` with the new state's fields (:class:`~sevemu.abi.rmp.RmpUpdateState`:
        GPA, Assigned, Page_Size, Immutable, ASID) given one by one."""
        rmp = self._core.rmp
        if rmp is None:
            raise HardwareError("#UD: RMPUPDATE with SYSCFG.SNP_EN clear")
        return rmp.rmpupdate_fields(spa, gpa, assigned, pagesize, immutable, asid)

    def rmpupdate_run(self, spa: int, pages: int, state: RmpUpdateState) -> tuple[int, RmpResult]:
        """RMPUPDATE of ``pages`` consecutive 4 KiB pages from ``spa``, page ``i`` with ``state``'s GPA
        advanced by ``i`` pages when it assigns: what one :meth:`rmpupdate_state` per page in order
        does, stopping at the first failure; (pages done, that page's result or SUCCESS)."""
        rmp = self._core.rmp
        if rmp is None:
            raise HardwareError("#UD: RMPUPDATE with SYSCFG.SNP_EN clear")
        return rmp.rmpupdate_run(spa, pages, state)

    def psmash(self, rax: int) -> int:
        """PSMASH (F3 0F 01 FF): RAX = a 2 MiB-aligned SPA; the EAX result.  #UD without SNP_EN."""
        rmp = self._core.rmp
        if rmp is None:
            raise HardwareError("#UD: PSMASH with SYSCFG.SNP_EN clear")
        return int(rmp.psmash(rax))


class PspMailbox:
    """The PSP's mailbox registers, the only part of the Secure Processor x86 software sees."""

    __slots__ = ("_psp",)

    def __init__(self, psp: Psp) -> None:
        self._psp = psp

    def mmio_read(self, offset: int) -> int:
        return self._psp.mmio_read(offset)

    def mmio_write(self, offset: int, value: int) -> None:
        self._psp.mmio_write(offset, value)


class HostSoc:
    """The SoC as the host sees it (see the module docstring)."""

    __slots__ = ("_soc", "cores", "mailbox")

    def __init__(self, soc: Soc) -> None:
        self._soc = soc
        self.cores: tuple[HostCore, ...] = tuple(HostCore(c) for c in soc.cores)
        self.mailbox = PspMailbox(soc.psp)

    @property
    def profile(self) -> CpuProfile:
        """The CPU model (what CPUID and the product name tell software)."""
        return self._soc.profile

    @property
    def boot_cpu(self) -> HostCore:
        return self.cores[0]

    @property
    def dram_size(self) -> int:
        """Bytes of installed DRAM (what the firmware's memory map tells the host)."""
        return self._soc.dram.size

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        return self._soc.cpuid(leaf, subleaf)

    def rdmsr(self, msr: int) -> int:
        return self._soc.rdmsr(msr)

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR on every core (SYSCFG.SNP_EN, RMP_BASE, RMP_END; :meth:`sevemu.hw.soc.Soc.wrmsr`)."""
        self._soc.wrmsr(msr, value)

    def rmp_entry(self, spa: int) -> RmpEntry:
        """The RMP entry governing the page at ``spa``, as software reads it from the table (the
        region stays readable; RMPREAD on Zen 5).  HardwareError without SNP_EN."""
        rmp = self._soc.rmp
        if rmp is None or not rmp.enabled:
            raise HardwareError("no RMP: SYSCFG.SNP_EN is clear")
        return rmp.entry(spa)

    def rmp_assigned(self, spa: int) -> bool:
        """Whether the RMP entry governing the page at ``spa`` is Assigned: :meth:`rmp_entry`'s
        ``assigned``, read from its low quadword alone (Linux ``snp_lookup_rmpentry``'s ``assigned``,
        which KVM checks for every page it populates).  HardwareError without SNP_EN; AddressError
        outside the memory the RMP covers, as there."""
        rmp = self._soc.rmp
        if rmp is None or not rmp.enabled:
            raise HardwareError("no RMP: SYSCFG.SNP_EN is clear")
        return rmp.assigned(spa)

    def device_dma_write(self, spa: int, data: bytes | bytearray) -> None:
        """A device the host programmed writes ``data`` at ``spa`` by DMA (unencrypted, coherent):
        with SNP enabled the IOMMU refuses pages that are not the hypervisor's
        (:class:`~sevemu.hw.rmp.DmaFault`, nothing written)."""
        soc = self._soc
        soc.dram.check_range(spa, len(data))
        if soc.rmp is not None:
            soc.rmp.check_dma_write(spa, len(data))
        soc.vmcbs.touch(spa, len(data), True)  # a VMCB view of the range is dropped (the device wrote it)
        soc.cache.flush_range(0, False, spa, len(data))
        soc.dram.write(spa, data)

    def wbinvd_all(self) -> int:
        """WBINVD on every core."""
        return self._soc.wbinvd_all()
