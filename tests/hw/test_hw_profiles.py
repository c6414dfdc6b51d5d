"""CPU generation profiles and the SoC's discovery interface (CPUID Fn8000_001F, signatures, MSRs)."""

from __future__ import annotations

import dataclasses

import pytest

from sevemu.abi.cpuid import Msr, SevCpuidEax, SysCfg, ebx_cbit, ebx_num_vmpls, ebx_pa_reduction
from sevemu.crypto.memenc import EncryptionMode
from sevemu.errors import InputError
from sevemu.hw.profiles import GENOA, MILAN, NAPLES, PROFILES, ROME, TURIN, CpuProfile, profile
from sevemu.hw.soc import Soc

MiB = 1 << 20
F = SevCpuidEax

# (EAX, EBX, ECX, EDX) of CPUID Fn8000_001F; EDX 100 is the model's BIOS choice (ES ASIDs 1..99)
CPUID_8000_001F = {
    "naples": (F.SME | F.SEV | F.VMPAGE_FLUSH, 47 | 5 << 6, 15, 1),
    "rome": (F.SME | F.SEV | F.VMPAGE_FLUSH | F.SEV_ES, 47 | 5 << 6, 509, 100),
    "milan": (F.SME | F.SEV | F.VMPAGE_FLUSH | F.SEV_ES | F.SEV_SNP | F.VMPL, 51 | 5 << 6 | 4 << 12, 509, 100),
    "genoa": (F.SME | F.SEV | F.VMPAGE_FLUSH | F.SEV_ES | F.SEV_SNP | F.VMPL | F.SME_COHERENT,
              51 | 6 << 6 | 4 << 12, 1006, 100),
    "turin": (F.SME | F.SEV | F.VMPAGE_FLUSH | F.SEV_ES | F.SEV_SNP | F.VMPL | F.SME_COHERENT,
              51 | 6 << 6 | 4 << 12, 1006, 100),
}

# CPUID Fn0000_0001 EAX of the released parts: Naples B2, Rome B0, Milan B1, Genoa B1, Turin C1
SIGNATURES = {"naples": 0x00800F12, "rome": 0x00830F10, "milan": 0x00A00F11, "genoa": 0x00A10F11,
              "turin": 0x00B00F21}

MODES = {"naples": EncryptionMode.XE, "rome": EncryptionMode.XEX, "milan": EncryptionMode.XEX,
         "genoa": EncryptionMode.XTS256, "turin": EncryptionMode.XTS256}


@pytest.mark.parametrize("name", list(PROFILES))
def test_cpuid_fn8000_001f(name: str) -> None:
    p = profile(name)
    assert p.cpuid_fn8000_001f == CPUID_8000_001F[name]
    eax, ebx, ecx, edx = p.cpuid_fn8000_001f
    assert (ebx_cbit(ebx), ebx_pa_reduction(ebx), ebx_num_vmpls(ebx)) == (p.cbit, p.pa_reduction, p.vmpls)
    assert bool(eax & F.SME_COHERENT) == p.coherent
    soc = Soc(p, dram_size=64 * MiB)
    assert soc.cpuid(0x8000001F) == (eax, ebx, ecx, edx)
    assert soc.cpuid(0x8000001F, 5) == (eax, ebx, ecx, edx)


@pytest.mark.parametrize("name", list(PROFILES))
def test_family_model_signature(name: str) -> None:
    p = profile(name)
    assert p.cpuid_fn0000_0001_eax == SIGNATURES[name]
    assert Soc(p, dram_size=64 * MiB).cpuid(1)[0] == SIGNATURES[name]


@pytest.mark.parametrize("name", list(PROFILES))
def test_asid_ranges(name: str) -> None:
    p = profile(name)
    _, _, ecx, edx = p.cpuid_fn8000_001f
    assert p.sev_asids() == range(edx, ecx + 1)
    assert p.es_asids() == range(1, edx)
    assert p.all_asids() == range(1, ecx + 1)
    # SEV-ES ASIDs lie below the minimum SEV ASID, and the two ranges tile 1..ECX
    assert all(a < edx for a in p.es_asids())
    assert sorted([*p.es_asids(), *p.sev_asids()]) == list(p.all_asids())
    assert p.sev_es == (len(p.es_asids()) > 0)


def test_naples_has_no_sev_es_and_rome_onwards_do() -> None:
    assert not NAPLES.sev_es and len(NAPLES.es_asids()) == 0
    assert ROME.sev_es and MILAN.sev_es and GENOA.sev_es and TURIN.sev_es
    assert not ROME.sev_snp and MILAN.sev_snp


@pytest.mark.parametrize("name", list(PROFILES))
def test_memory_encryption_mode_and_addresses(name: str) -> None:
    p = profile(name)
    assert p.mem_mode is MODES[name]
    assert p.published_tweaks == (p.zen == 1)
    assert p.addr_bits == p.phys_addr_bits - p.pa_reduction
    assert p.max_spa == 1 << p.addr_bits
    assert p.cbit_mask == 1 << p.cbit
    soc = Soc(p, dram_size=64 * MiB)
    assert soc.mc.mode is p.mem_mode
    assert soc.cpuid(0x80000008)[0] & 0xFF == p.phys_addr_bits


def test_profile_lookup() -> None:
    assert profile("MiLaN") is MILAN
    with pytest.raises(InputError, match="naples, rome, milan, genoa, turin"):
        profile("zen6")


def test_generations_are_deltas_of_earlier_ones() -> None:
    assert dataclasses.replace(GENOA, name="turin", product="Turin", zen=5, family=0x1A, model=0x02,
                               api_major=1, api_minor=55, build=37) == TURIN
    assert isinstance(MILAN, CpuProfile)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MILAN.cbit = 3  # type: ignore[misc]


def test_soc_msrs_and_construction_limits() -> None:
    soc = Soc(MILAN, dram_size=64 * MiB)
    assert soc.rdmsr(int(Msr.SYSCFG)) & SysCfg.MEM_ENCRYPTION_MOD_EN
    assert soc.rdmsr(0x1234) == 0
    assert soc.cpuid(0x4000_0000) == (0, 0, 0, 0)
    with pytest.raises(InputError):
        Soc(MILAN, dram_size=MILAN.max_spa + 4096)
    with pytest.raises(InputError):
        Soc(MILAN, dram_size=64 * MiB, cores=0)


def test_seeded_boots_are_reproducible_and_unseeded_ones_differ() -> None:
    from sevemu.scenario import SeededRng

    def host_ct(soc: Soc) -> bytes:
        soc.cache.write(0, True, 0x1000, b"x" * 64)
        soc.cache.wbinvd()
        return soc.dram.read(0x1000, 64)

    for p in (NAPLES, MILAN, GENOA):
        a = Soc(p, dram_size=64 * MiB, rng=SeededRng("s"))
        b = Soc(p, dram_size=64 * MiB, rng=SeededRng("s"))
        c = Soc(p, dram_size=64 * MiB)
        assert host_ct(a) == host_ct(b) != host_ct(c)
