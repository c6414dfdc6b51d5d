"""CPU generation profiles: what CPUID Fn8000_001F and the SEV MSRs say on each EPYC generation.

Generations are data (design.md): one :class:`CpuProfile` per generation, later ones written as small
deltas on earlier ones with :func:`dataclasses.replace`.

Sources: APM2 15.34 and Linux arch/x86/kvm/svm/sev.c ``sev_hardware_setup`` (CPUID Fn8000_001F
EAX/EBX/ECX/EDX, ASID ranges); SEVurity, Du et al. and SNP ABI 56860 (memory-encryption mode per
generation); go-sev-guest ``kds/kds.go`` (family/model/stepping per product).  Values AMD leaves to the BIOS
(the SEV-ES ASID space limit, i.e. CPUID EDX) are model choices, documented per field; they can be
changed per platform with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sevemu.crypto.memenc import EncryptionMode
from sevemu.errors import InputError

__all__ = ["GENOA", "MILAN", "NAPLES", "PROFILES", "ROME", "TURIN", "CpuProfile", "profile"]

# CPUID Fn8000_001F EAX feature bits (APM2 15.34; sevemu.abi.cpuid.SevCpuidEax).
_SME = 1 << 0
_SEV = 1 << 1
_VMPAGE_FLUSH = 1 << 2
_SEV_ES = 1 << 3
_SEV_SNP = 1 << 4
_VMPL = 1 << 5
_COHERENT = 1 << 10


@dataclass(frozen=True, slots=True)
class CpuProfile:
    """One EPYC generation as the memory-encryption hardware and firmware see it."""

    name: str
    """Lower-case short name used on the command line (``milan``)."""
    product: str
    """AMD product name (``Milan``), as used by AMD's key distribution service."""
    zen: int
    family: int
    model: int
    stepping: int
    cbit: int
    """C-bit position (CPUID Fn8000_001F EBX[5:0])."""
    phys_addr_bits: int
    """MAXPHYADDR before the memory-encryption reduction."""
    pa_reduction: int
    """Physical address bits lost when memory encryption is enabled (EBX[11:6])."""
    max_asid: int
    """Number of encrypted guests supported at once = highest SEV ASID (ECX)."""
    min_sev_asid: int
    """Lowest ASID usable by an SEV guest without ES (EDX); ES/SNP guests use 1 .. EDX-1."""
    vmpls: int
    eax_features: int
    mem_mode: EncryptionMode
    """Memory-encryption mode used for guest and SME keys (``docs/memory-model.md``, "Ciphers")."""
    published_tweaks: bool
    """True: the XE/XEX tweak constants are the published Zen 1 table; False: random per boot."""
    api_major: int
    api_minor: int
    build: int
    """SEV firmware API version and build reported by PLATFORM_STATUS (typical released values)."""

    # ---- derived values -------------------------------------------------------------------
    @property
    def coherent(self) -> bool:
        """Hardware enforces cache coherency across encryption domains (EAX bit 10)."""
        return bool(self.eax_features & _COHERENT)

    @property
    def sev_es(self) -> bool:
        return bool(self.eax_features & _SEV_ES) and self.min_sev_asid > 1

    @property
    def sev_snp(self) -> bool:
        return bool(self.eax_features & _SEV_SNP)

    @property
    def addr_bits(self) -> int:
        """Usable system-physical-address bits with memory encryption enabled."""
        return self.phys_addr_bits - self.pa_reduction

    @property
    def cbit_mask(self) -> int:
        return 1 << self.cbit

    @property
    def max_spa(self) -> int:
        """One past the highest system physical address DRAM may occupy."""
        return 1 << self.addr_bits

    @property
    def cpuid_fn8000_001f(self) -> tuple[int, int, int, int]:
        """(EAX, EBX, ECX, EDX) of CPUID Fn8000_001F."""
        ebx = (self.cbit & 0x3F) | ((self.pa_reduction & 0x3F) << 6) | ((self.vmpls & 0xF) << 12)
        return self.eax_features, ebx, self.max_asid, self.min_sev_asid

    @property
    def cpuid_fn0000_0001_eax(self) -> int:
        """Family/model/stepping signature as CPUID Fn0000_0001 EAX encodes it."""
        base_family = min(self.family, 0xF)
        ext_family = self.family - 0xF if self.family > 0xF else 0
        return (
            (self.stepping & 0xF)
            | ((self.model & 0xF) << 4)
            | (base_family << 8)
            | (((self.model >> 4) & 0xF) << 16)
            | ((ext_family & 0xFF) << 20)
        )

    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """CPUID as the part answers it for the leaves the model defines (others read as zeros)."""
        if leaf == 0x8000001F:
            return self.cpuid_fn8000_001f
        if leaf in (0x00000000, 0x80000000):  # highest leaf of the range, vendor "AuthenticAMD"
            return (0x10 if leaf == 0 else 0x8000001F), *_AMD_VENDOR
        if leaf == 0x00000001:
            return self.cpuid_fn0000_0001_eax, 0, 0, 0
        if leaf == 0x80000008:
            return self.phys_addr_bits | (48 << 8), 0, 0, 0
        return 0, 0, 0, 0

    def sev_asids(self) -> range:
        """ASIDs an SEV (non-ES) guest may use: [EDX, ECX]."""
        return range(self.min_sev_asid, self.max_asid + 1)

    def es_asids(self) -> range:
        """ASIDs an SEV-ES or SEV-SNP guest may use: [1, EDX-1] (empty when EDX = 1)."""
        return range(1, self.min_sev_asid)

    def all_asids(self) -> range:
        return range(1, self.max_asid + 1)


_AMD_VENDOR = (0x6874_7541, 0x444D_4163, 0x6974_6E65)  # EBX, ECX, EDX: "Auth" "cAMD" "enti"

NAPLES = CpuProfile(
    name="naples",
    product="Naples",
    zen=1,
    family=0x17,
    model=0x01,
    stepping=2,
    cbit=47,
    phys_addr_bits=48,
    pa_reduction=5,
    max_asid=15,
    # Naples firmware has no SEV-ES: EDX = 1 leaves no ES ASIDs.
    min_sev_asid=1,
    vmpls=0,
    eax_features=_SME | _SEV | _VMPAGE_FLUSH,
    # Early Zen 1 EPYC (7251) uses XE; SEVurity found XEX on other Zen 1 parts.  XE is kept for
    # Naples so that the distinguishing algebra of both modes can be shown.
    mem_mode=EncryptionMode.XE,
    published_tweaks=True,
    api_major=0,
    api_minor=17,
    build=48,
)

ROME = dataclasses.replace(
    NAPLES,
    name="rome",
    product="Rome",
    zen=2,
    model=0x31,
    stepping=0,
    max_asid=509,
    # Model choice: the BIOS "SEV-ES ASID space limit" set to 100 (ES ASIDs 1..99).
    min_sev_asid=100,
    eax_features=_SME | _SEV | _VMPAGE_FLUSH | _SEV_ES,
    mem_mode=EncryptionMode.XEX,
    published_tweaks=False,
    api_major=0,
    api_minor=24,
    build=15,
)

MILAN = dataclasses.replace(
    ROME,
    name="milan",
    product="Milan",
    zen=3,
    family=0x19,
    model=0x01,
    stepping=1,
    cbit=51,
    vmpls=4,
    eax_features=_SME | _SEV | _VMPAGE_FLUSH | _SEV_ES | _SEV_SNP | _VMPL,
    api_major=1,
    api_minor=51,
    build=3,
)

GENOA = dataclasses.replace(
    MILAN,
    name="genoa",
    product="Genoa",
    zen=4,
    model=0x11,
    stepping=1,
    phys_addr_bits=52,
    pa_reduction=6,
    max_asid=1006,
    eax_features=MILAN.eax_features | _COHERENT,
    mem_mode=EncryptionMode.XTS256,
    api_major=1,
    api_minor=55,
    build=21,
)

TURIN = dataclasses.replace(
    GENOA,
    name="turin",
    product="Turin",
    zen=5,
    family=0x1A,
    model=0x02,
    stepping=1,
    api_major=1,
    api_minor=55,
    build=37,
)

PROFILES: dict[str, CpuProfile] = {p.name: p for p in (NAPLES, ROME, MILAN, GENOA, TURIN)}


def profile(name: str) -> CpuProfile:
    """The profile called ``name`` (case-insensitive); :class:`InputError` lists the known ones."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise InputError(f"unknown CPU generation {name!r}; known: {', '.join(PROFILES)}") from None
