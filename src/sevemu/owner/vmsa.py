"""Initial SEV-ES VMSAs as QEMU + KVM create them for an OVMF guest (APM2 15.35; QEMU
``target/i386/sev.c``; Linux arch/x86/kvm/svm/sev.c ``sev_es_sync_vmsa``; sev-snp-measure ``vmsa.py``).

A guest owner predicting an SEV-ES launch digest must know the exact 4 KiB VMSA page of every vCPU
at LAUNCH_UPDATE_VMSA time.  For QEMU/KVM booting OVMF that is the x86 reset state:

* segments: CS = {0xf000, attrib 0x9b, limit 0xffff, base = eip & 0xffff0000}; ES/SS/DS/FS/GS =
  {0, 0x93, 0xffff, 0}; GDTR/IDTR = {0, 0, 0xffff, 0}; LDTR = {0, 0x82, 0xffff, 0}; TR = {0, 0x8b,
  0xffff, 0};
* RIP = eip & 0xffff, EFER = 0x1000 (SVME), CR4 = 0x40 (MCE), CR0 = 0x10 (ET), DR7 = 0x400, DR6 =
  0xffff0ff0, RFLAGS = 0x2, G_PAT = 0x0007040600070406, XCR0 = 1;
* RDX = the CPUID(1).EAX processor signature (family/model/stepping) of the vCPU model;
* SEV_FEATURES as the hypervisor enables them (0 for a plain SEV-ES guest of that era);
* x87/SSE control words: KVM kernels up to 2022 left MXCSR and FCW at 0 in the VMSA; later
  kernels sync the architectural reset values MXCSR = 0x1f80 and FCW = 0x037f (see
  :class:`KvmFpuReset`).  The digest therefore depends on the host kernel generation modelled.

The bootstrap processor starts at EIP 0xfffffff0; application processors start at the EIP of the
OVMF SEV-ES reset block (:func:`sevemu.owner.ovmf.sev_es_reset_eip`).  This module builds these
pages independently of the hypervisor model so the two can be checked against each other.
"""

from __future__ import annotations

import enum

from sevemu.abi.vmsa import SevEsSaveArea
from sevemu.errors import InputError

__all__ = [
    "BSP_RESET_EIP",
    "KvmFpuReset",
    "build_vmsa",
    "cpuid_signature",
    "vmsa_pages",
]

BSP_RESET_EIP = 0xFFFFFFF0
"""Architectural reset EIP of the bootstrap processor (CS base 0xffff0000, RIP 0xfff0)."""

_DATA_SEG_ATTRIB = 0x93  # present, DPL0, read/write data, accessed
_CODE_SEG_ATTRIB = 0x9B  # present, DPL0, execute/read code, accessed
_LDTR_ATTRIB = 0x82  # present, LDT
_TR_ATTRIB = 0x8B  # present, busy 32-bit TSS
_SEG_LIMIT = 0xFFFF


class KvmFpuReset(enum.Enum):
    """Which x87/SSE control values KVM writes into the VMSA at LAUNCH_UPDATE_VMSA.

    ``KVM_2022``: MXCSR = 0 and FCW = 0 (kernels of 2022 and earlier; sevctl's test vectors).
    ``ARCHITECTURAL``: MXCSR = 0x1f80 and FCW = 0x037f (later kernels; sev-snp-measure).
    """

    KVM_2022 = (0, 0)
    ARCHITECTURAL = (0x1F80, 0x037F)

    @property
    def mxcsr(self) -> int:
        """MXCSR value at VMSA offset 0x408."""
        return self.value[0]

    @property
    def fcw(self) -> int:
        """x87 control word at VMSA offset 0x410."""
        return self.value[1]


def cpuid_signature(family: int, model: int, stepping: int) -> int:
    """CPUID(1).EAX for a display family/model/stepping (e.g. 25/1/1 -> 0x00a00f11 for Milan).

    Families above 0xf are encoded as base family 0xf plus an extended family; for base family
    0xf the model's high nibble goes to the extended-model field.
    """
    if not (0 <= family <= 0xF + 0xFF and 0 <= model <= 0xFF and 0 <= stepping <= 0xF):
        raise InputError(f"family/model/stepping out of range: {family}/{model}/{stepping}")
    if family < 0xF:
        if model > 0xF:
            raise InputError(f"model {model:#x} needs extended model, only valid for family >= 0xf")
        base_family, ext_family, base_model, ext_model = family, 0, model, 0
    else:
        base_family, ext_family = 0xF, family - 0xF
        base_model, ext_model = model & 0xF, model >> 4
    return (ext_family << 20) | (ext_model << 16) | (base_family << 8) | (base_model << 4) | stepping


def build_vmsa(
    eip: int,
    *,
    cpu_signature: int = 0,
    sev_features: int = 0,
    fpu: KvmFpuReset = KvmFpuReset.ARCHITECTURAL,
) -> SevEsSaveArea:
    """The VMSA of one vCPU that starts at ``eip`` (see the module docstring for every value)."""
    if not 0 <= eip < 2**32:
        raise InputError(f"reset EIP must be a 32-bit address, got {eip:#x}")
    if not 0 <= cpu_signature < 2**32:
        raise InputError(f"CPUID signature must fit 32 bits, got {cpu_signature:#x}")
    return SevEsSaveArea(
        # every segment but CS: selector 0, base 0, limit 0xffff
        es_attrib=_DATA_SEG_ATTRIB,
        es_limit=_SEG_LIMIT,
        ss_attrib=_DATA_SEG_ATTRIB,
        ss_limit=_SEG_LIMIT,
        ds_attrib=_DATA_SEG_ATTRIB,
        ds_limit=_SEG_LIMIT,
        fs_attrib=_DATA_SEG_ATTRIB,
        fs_limit=_SEG_LIMIT,
        gs_attrib=_DATA_SEG_ATTRIB,
        gs_limit=_SEG_LIMIT,
        gdtr_limit=_SEG_LIMIT,
        ldtr_attrib=_LDTR_ATTRIB,
        ldtr_limit=_SEG_LIMIT,
        idtr_limit=_SEG_LIMIT,
        tr_attrib=_TR_ATTRIB,
        tr_limit=_SEG_LIMIT,
        cs_selector=0xF000,
        cs_attrib=_CODE_SEG_ATTRIB,
        cs_limit=_SEG_LIMIT,
        cs_base=eip & 0xFFFF0000,
        rip=eip & 0xFFFF,
        efer=0x1000,
        cr4=0x40,
        cr0=0x10,
        dr7=0x400,
        dr6=0xFFFF0FF0,
        rflags=0x2,
        g_pat=0x0007040600070406,
        rdx=cpu_signature,
        sev_features=sev_features,
        xcr0=0x1,
        mxcsr=fpu.mxcsr,
        x87_fcw=fpu.fcw,
    )


def vmsa_pages(
    num_cpus: int,
    ap_eip: int,
    *,
    cpu_signature: int = 0,
    sev_features: int = 0,
    fpu: KvmFpuReset = KvmFpuReset.ARCHITECTURAL,
) -> list[bytes]:
    """The VMSA pages of vCPUs 0..num_cpus-1 in LAUNCH_UPDATE_VMSA order (BSP first)."""
    if num_cpus < 1:
        raise InputError(f"a guest needs at least one vCPU, got {num_cpus}")
    pages = [
        build_vmsa(eip, cpu_signature=cpu_signature, sev_features=sev_features, fpu=fpu).encode()
        for eip in (BSP_RESET_EIP, ap_eip)
    ]
    return [pages[0]] + [pages[1]] * (num_cpus - 1)
