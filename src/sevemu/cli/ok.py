"""``sevemu ok [sev|es|snp]``: the emulated host's SEV capabilities, checked as virtee/sevctl
``ok`` checks a real host (sevctl ``src/ok.rs``).

Everything is read through host interfaces of the emulated machine: CPUID Fn8000_001F and
Fn0000_0001, the SYSCFG MSR (APM2 15.34: SME/SEV discovery; Linux arch/x86/kvm/svm/sev.c
``sev_hardware_setup`` for what KVM derives from them), ``/dev/sev`` and the KVM-like hypervisor.
The checks form sevctl's tree; a child runs only when its parent passed, and a check of a later
generation than the one asked for is SKIPped:

* AMD CPU (family, model, stepping from CPUID Fn0000_0001 EAX; the vendor and brand-string leaves
  are not modelled, the profile names the part)

  * EPYC part (sevctl: "Microcode support", an EPYC brand string)
  * Secure Memory Encryption (SME): EAX bit 0 and SYSCFG.MemEncryptionModEn
  * Secure Encrypted Virtualization (SEV): EAX bit 1

    * Encrypted State (SEV-ES) [es]: EAX bit 3
    * Secure Nested Paging (SEV-SNP) [snp]: EAX bit 4 and SYSCFG.SNPEn; VM Permission Levels:
      EAX bit 5 and SYSCFG.VMPLEn; number of VMPLs: EBX[15:12]
    * physical address bit reduction EBX[11:6], C-bit location EBX[5:0], number of encrypted
      guests ECX, minimum ASID of an SEV guest without ES EDX (information, always PASS)
    * SEV enabled in KVM (SEV ASIDs EDX..ECX exist), SEV-ES enabled in KVM [es] (ES ASIDs
      1..EDX-1 exist), /dev/sev readable, /dev/sev writable
  * Page flush MSR: EAX bit 2 (ENABLED / DISABLED; always PASS, as in sevctl)

* KVM support (KVM_GET_API_VERSION: 12)
* Memlock resource limit (of this process, as sevctl reads its own)

Without an argument the generation to check is the CPU's, as sevctl decides it from family and
model: family 0x17 models 0x01-0x30 SEV, 0x31-0x3F SEV-ES, families 0x19 and 0x1A SEV-SNP.  The
emulated host of Milan and later boots as a Linux 6.11+ host whose BIOS reserved the RMP: the kernel
set SYSCFG.SNPEn (VMPLEn comes from reset), so the SNP checks PASS.

Exit status 0 when every check that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sevemu.abi.cpuid import (
    CPUID_FN_SEV,
    Msr,
    SevCpuidEax,
    SysCfg,
    ebx_cbit,
    ebx_num_vmpls,
    ebx_pa_reduction,
)
from sevemu.cli.common import add_platform_args, emit, open_platform
from sevemu.errors import InputError

__all__ = ["GENERATIONS", "Check", "register", "run_ok"]

GENERATIONS = ("sev", "es", "snp")
_KVM_API_VERSION = 12  # KVM_GET_API_VERSION (include/uapi/linux/kvm.h KVM_API_VERSION)
_INDENT = 2


@dataclass
class Check:
    """One line of the report: PASS, FAIL or SKIP, with an optional message, and its children."""

    name: str
    level: str  # "sev", "es" or "snp": the least generation the check belongs to
    run: Callable[[], tuple[bool, str]]
    children: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class _Host:
    eax: int
    ebx: int
    ecx: int
    edx: int
    syscfg: int
    signature: int
    product: str
    dev_sev: bool
    dev_sev_writable: bool


def _family_model(signature: int) -> tuple[int, int, int]:
    base_family = (signature >> 8) & 0xF
    family = base_family + ((signature >> 20) & 0xFF if base_family == 0xF else 0)
    model = ((signature >> 4) & 0xF) | (((signature >> 16) & 0xF) << 4)
    return family, model, signature & 0xF


def cpu_generation(signature: int) -> str:
    """sevctl's reading of the CPU generation from CPUID Fn0000_0001 EAX (module docstring)."""
    family, model, _ = _family_model(signature)
    if family == 0x17 and 0x01 <= model <= 0x30:
        return "sev"
    if family == 0x17 and 0x31 <= model <= 0x3F:
        return "es"
    if family in (0x19, 0x1A):
        return "snp"
    raise InputError(f"CPU family {family:#x} model {model:#x} is not of a known SEV generation")


def _checks(h: _Host) -> list[Check]:
    def bit(flag: int) -> bool:
        return bool(h.eax & flag)

    def info(value: object) -> Callable[[], tuple[bool, str]]:
        return lambda: (True, str(value))

    family, model, stepping = _family_model(h.signature)
    cpu = f"EPYC {h.product}: family {family:#x}, model {model:#x}, stepping {stepping}"
    sev_range = (h.edx, h.ecx)
    es_range = (1, h.edx - 1)
    snp = Check("Secure Nested Paging (SEV-SNP)", "snp",
                lambda: (bit(SevCpuidEax.SEV_SNP) and bool(h.syscfg & SysCfg.SNP_EN),
                         "" if h.syscfg & SysCfg.SNP_EN else "SYSCFG.SNPEn is clear"), [
        Check("VM Permission Levels", "snp",
              lambda: (bit(SevCpuidEax.VMPL) and bool(h.syscfg & SysCfg.VMPL_EN), ""), [
            Check("Number of VMPLs", "snp", info(ebx_num_vmpls(h.ebx))),
        ]),
    ])
    sev = Check("Secure Encrypted Virtualization (SEV)", "sev", lambda: (bit(SevCpuidEax.SEV), ""), [
        Check("Encrypted State (SEV-ES)", "es", lambda: (bit(SevCpuidEax.SEV_ES), "")),
        snp,
        Check("Physical address bit reduction", "sev", info(ebx_pa_reduction(h.ebx))),
        Check("C-bit location", "sev", info(ebx_cbit(h.ebx))),
        Check("Number of encrypted guests supported simultaneously", "sev", info(h.ecx)),
        Check("Minimum ASID value for SEV-enabled, SEV-ES disabled guest", "sev", info(h.edx)),
        Check("SEV enabled in KVM", "sev",
              lambda: (h.edx <= h.ecx and h.edx >= 1,
                       f"enabled (ASIDs {sev_range[0]}-{sev_range[1]})" if 1 <= h.edx <= h.ecx
                       else "no SEV ASIDs")),
        Check("SEV-ES enabled in KVM", "es",
              lambda: (bit(SevCpuidEax.SEV_ES) and h.edx > 1,
                       f"enabled (ASIDs {es_range[0]}-{es_range[1]})" if bit(SevCpuidEax.SEV_ES) and h.edx > 1
                       else "no SEV-ES ASIDs (CPUID Fn8000_001F EDX = 1)")),
        Check("Reading /dev/sev", "sev",
              lambda: (h.dev_sev, "/dev/sev readable" if h.dev_sev else "/dev/sev not readable")),
        Check("Writing /dev/sev", "sev",
              lambda: (h.dev_sev_writable,
                       "/dev/sev writable" if h.dev_sev_writable else "/dev/sev not writable")),
    ])
    return [
        Check("AMD CPU", "sev", lambda: (True, cpu), [
            Check("Microcode support", "sev", lambda: (True, f"EPYC ({h.product})")),
            Check("Secure Memory Encryption (SME)", "sev",
                  lambda: (bit(SevCpuidEax.SME) and bool(h.syscfg & SysCfg.MEM_ENCRYPTION_MOD_EN), "")),
            sev,
            Check("Page flush MSR", "sev",
                  lambda: (True, "ENABLED" if bit(SevCpuidEax.VMPAGE_FLUSH) else "DISABLED")),
        ]),
        Check("KVM supported", "sev", info(f"API version: {_KVM_API_VERSION}")),
        Check("Memlock resource limit", "sev", _memlock),
    ]


def _memlock() -> tuple[bool, str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def show(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    return True, f"Soft: {show(soft)} | Hard: {show(hard)}"


_ORDER = {"sev": 0, "es": 1, "snp": 2}


def _walk(checks: list[Check], generation: str, depth: int, out: list[dict[str, Any]], skip: bool = False) -> bool:
    passed = True
    for c in checks:
        if skip or _ORDER[c.level] > _ORDER[generation]:
            out.append({"name": c.name, "status": "SKIP", "message": "", "depth": depth})
            _walk(c.children, generation, depth + 1, out, skip=True)
            continue
        ok, message = c.run()
        out.append({"name": c.name, "status": "PASS" if ok else "FAIL", "message": message, "depth": depth})
        passed = _walk(c.children, generation, depth + 1, out, skip=not ok) and ok and passed
    return passed


def register(sub: Any) -> None:
    p = sub.add_parser("ok", help="check the emulated host's SEV support, as sevctl ok does",
                       description="Probe the emulated platform for SEV, SEV-ES and SEV-SNP support "
                                   "(CPUID Fn8000_001F, SYSCFG, /dev/sev, KVM) and report each check.",
                       epilog="examples:\n  sevemu ok            the checks of the CPU's generation\n"
                              "  sevemu ok es         SEV and SEV-ES only\n"
                              "  sevemu ok --generation rome --json")
    p.add_argument("level", nargs="?", choices=GENERATIONS, metavar="{sev,es,snp}",
                   help="the SEV generation to check (default: the CPU's)")
    add_platform_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_ok)


def run_ok(args: argparse.Namespace) -> int:
    with open_platform(args, writable=True) as plat:
        host = plat.machine.soc.host_view()
        eax, ebx, ecx, edx = host.cpuid(CPUID_FN_SEV)
        h = _Host(eax, ebx, ecx, edx, host.rdmsr(Msr.SYSCFG), host.cpuid(1)[0], host.profile.product,
                  dev_sev=True, dev_sev_writable=plat.dev.writable)
    level = args.level or cpu_generation(h.signature)
    rows: list[dict[str, Any]] = []
    passed = _walk(_checks(h), level, 0, rows)
    lines = [f"[ {r['status']:^4} ] {'':{r['depth'] * _INDENT}}- {r['name']}"
             + (f": {r['message']}" if r["message"] else "") for r in rows]
    if not passed:
        lines.append("one or more checks failed")
    emit(args, {"ok": passed, "level": level, "generation": plat.generation, "checks": rows}, lines)
    return 0 if passed else 1
