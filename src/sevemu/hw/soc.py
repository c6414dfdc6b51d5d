"""The SoC: receives its parts and wires them in a documented order.

Wiring order (each part only sees what it is handed):

1. DRAM (sparse page store) of ``dram_size`` bytes;
2. per-boot tweak constants for the profile's memory-encryption mode (the published Zen 1 table, or
   fresh random constants from Zen 2 on) and the memory controller with its host SME key in slot 0;
3. the shared cache in front of the memory controller (coherent across encryption domains only if
   the profile says so), and the MMU that walks tables through that cache;
4. the cores (TLB each);
5. on an SEV-SNP part, the Reverse Map Table (:mod:`sevemu.hw.rmp`): the BIOS reserves its region at
   the top of DRAM, covering all of it, and names it in RMP_BASE / RMP_END; the cores consult it
   once host software sets SYSCFG.SNP_EN (:meth:`Soc.wrmsr`);
6. the PSP device, holding the memory controller's key-slot port (issued exactly once), its DMA view
   of memory, the WBINVD epoch signal, the TRNG and, with SNP, the RMP's firmware port.  The firmware is installed later by the
   composition root (:mod:`sevemu.scenario`), which takes the PSP's ports for it.

The host side (the hypervisor) gets :meth:`Soc.host_view` (:mod:`sevemu.hw.host`): host operations on
the cores, the PSP's mailbox registers, CPUID and MSRs.  It never gets the key-slot port, the PSP's
DMA view or the memory controller.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable

from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.crypto.memenc import TweakConstants
from sevemu.errors import InputError
from sevemu.hw.cache import Cache
from sevemu.hw.cpu import Core
from sevemu.hw.dram import Dram
from sevemu.hw.faults import GeneralProtection
from sevemu.hw.host import HostSoc
from sevemu.hw.memctl import MemoryController
from sevemu.hw.mmu import Mmu
from sevemu.hw.profiles import CpuProfile
from sevemu.hw.psp import Psp, PspDma, PspPorts
from sevemu.hw.rmp import Rmp, RmpFirmwarePort, rmp_region_size
from sevemu.hw.svm import VmcbCache

__all__ = ["Soc"]

# SYSCFG (MSR 0xC001_0010) bit 23: MemEncryptionModEn (APM2 15.34)
_SYSCFG_MEM_ENCRYPTION_MOD_EN = 1 << 23


class _ByteSourceRandom(random.Random):
    """The SoC's byte source (``rng(n) -> bytes``) seen through :class:`random.Random`, as the
    tweak-constant constructors of :mod:`sevemu.crypto.memenc` take it: every bit still comes from
    ``rng`` (a seeded source gives a reproducible boot; os.urandom a fresh one)."""

    def __init__(self, source: Callable[[int], bytes]) -> None:
        self._source = source
        super().__init__(0)

    def getrandbits(self, k: int) -> int:
        return int.from_bytes(self._source((k + 7) // 8), "little") & ((1 << k) - 1)


class Soc:
    """An SEV-capable EPYC SoC: DRAM, memory controller, cache, cores and the PSP."""

    def __init__(self, profile: CpuProfile, *, dram_size: int = 1 << 40, cores: int = 2,
                 cache_size: int = 4 << 20, cache_ways: int = 16, tlb_entries: int = 2048,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        if cores < 1:
            raise InputError("a SoC needs at least one core")
        if dram_size > profile.max_spa:
            raise InputError(
                f"{dram_size:#x} bytes of DRAM exceed the {profile.addr_bits}-bit physical address "
                f"space of {profile.product} with memory encryption enabled"
            )
        self.profile = profile
        self.dram = Dram(dram_size)
        boot_rng = _ByteSourceRandom(rng)
        if profile.published_tweaks:
            tweaks = TweakConstants.published_zen1(profile.phys_addr_bits, boot_rng)
        else:
            tweaks = TweakConstants.random_zen2(profile.phys_addr_bits, boot_rng)
        self.mc = MemoryController(self.dram, profile.mem_mode, tweaks, profile.max_asid, rng)
        self.cache = Cache(self.mc, cache_size, cache_ways, coherent=profile.coherent)
        self.mmu = Mmu(self.cache, profile)
        self.vmcbs = VmcbCache(self.cache)
        """The cores' copies of VMCB pages (:class:`~sevemu.hw.svm.VmcbCache`), shared: a VMCB may run on any core."""
        self.cores = [Core(i, profile, self.cache, self.mmu, self.mc, tlb_entries, self.vmcbs) for i in range(cores)]
        self.rmp: Rmp | None = None
        if profile.sev_snp:
            size = rmp_region_size(dram_size)
            base = dram_size - size
            self.rmp = Rmp(self.cache, self.dram, base, base + size - 1, profile.max_asid)
        self.psp = Psp(PspPorts(
            profile=profile,
            keys=self.mc.secure_port(),
            dma=PspDma(self.cache, self.mc, profile.cbit, self.rmp),
            flush_epoch=lambda: self.cache.flush_epoch,
            trng=rng,
            rmp=None if self.rmp is None else RmpFirmwarePort(self.rmp),
        ))
        self._msrs: dict[int, int] = {int(Msr.SYSCFG): _SYSCFG_MEM_ENCRYPTION_MOD_EN}
        if self.rmp is not None:
            self._msrs[int(Msr.SYSCFG)] |= int(SysCfg.VMPL_EN | SysCfg.MFDM)

    def host_view(self) -> HostSoc:
        """What host software may use (:mod:`sevemu.hw.host`): the hypervisor's handle."""
        return HostSoc(self)

    @property
    def boot_cpu(self) -> Core:
        return self.cores[0]

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """The host's CPUID for the leaves the SEV model defines (others read as zeros)."""
        return self.profile.cpuid(leaf, subleaf)

    def rdmsr(self, msr: int) -> int:
        if self.rmp is not None and msr == Msr.RMP_BASE:
            return self.rmp.base
        if self.rmp is not None and msr == Msr.RMP_END:
            return self.rmp.end
        return self._msrs.get(msr, 0)

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR on every core (the SoC-wide MSRs are kept equal on all cores, as Linux does).

        SYSCFG: only SNP_EN may be set by software, once; with SNP_EN set every SYSCFG write is
        ignored (APM2 15.36.4).  RMP_BASE / RMP_END: writable before SNP_EN (8 KiB aligned), #GP after.
        Setting SNP_EN needs an SNP part and a valid RMP region (#GP otherwise).
        """
        rmp = self.rmp
        if msr == Msr.SYSCFG:
            cur = self._msrs[int(Msr.SYSCFG)]
            if cur & SysCfg.SNP_EN:
                return
            if value & ~int(SysCfg.SNP_EN) != cur & ~int(SysCfg.SNP_EN):
                raise GeneralProtection(f"WRMSR SYSCFG {value:#x}: only SNP_EN may change")
            if value & SysCfg.SNP_EN:
                if rmp is None or not rmp.bounds_valid():
                    raise GeneralProtection("WRMSR SYSCFG.SNP_EN without a valid RMP region")
                rmp.enabled = True
                for core in self.cores:
                    core.rmp = rmp
                    core.vmsa.snp_check = rmp.vmsa_check  # an SNP VMSA: the RMP, not a checksum
                self._msrs[int(Msr.SYSCFG)] = cur | int(SysCfg.SNP_EN)
            return
        if msr in (Msr.RMP_BASE, Msr.RMP_END) and rmp is not None:
            if rmp.enabled or value % 0x2000 != (0 if msr == Msr.RMP_BASE else 0x1FFF):
                raise GeneralProtection(f"WRMSR {Msr(msr).name} {value:#x}")
            if msr == Msr.RMP_BASE:
                rmp.set_bounds(value, rmp.end)
            else:
                rmp.set_bounds(rmp.base, value)
            return
        raise GeneralProtection(f"WRMSR {msr:#x}: not an MSR the model lets host software write")

    def wbinvd_all(self) -> int:
        """WBINVD on every core (the caches are shared, so the first one does the work)."""
        return sum(core.wbinvd() for core in self.cores)
