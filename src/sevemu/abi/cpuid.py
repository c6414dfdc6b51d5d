"""Memory-encryption discovery: CPUID Fn8000_001F and the SEV-related MSRs (AMD APM Vol. 2 §15.34,
§15.35, §15.36; Linux ``arch/x86/kvm/svm/sev.c`` ``sev_hardware_setup``).

CPUID Fn8000_001F: EAX feature bits (:class:`SevCpuidEax`); EBX [5:0] C-bit position, [11:6]
physical-address-width reduction when memory encryption is on, [15:12] number of VMPLs; ECX the
number of encrypted guests supported simultaneously (= highest SEV ASID); EDX the lowest ASID an SEV
guest *without* SEV-ES may use (ASIDs below it are for SEV-ES / SEV-SNP).

Only the EAX bits APM2 15.34 and Linux confirm are named; the others (6, 8, 9, 11..15, 19..21, 24, 25,
28, 30) exist on some parts but are left out.  Pure constants and bit-field helpers.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu.errors import LayoutError

__all__ = [
    "CPUID_FN_SEV",
    "EBX_CBIT_MASK",
    "EBX_NUM_VMPLS_MASK",
    "EBX_NUM_VMPLS_SHIFT",
    "EBX_PA_REDUCTION_MASK",
    "EBX_PA_REDUCTION_SHIFT",
    "VMPAGE_FLUSH_ASID_MASK",
    "Hwcr",
    "Msr",
    "SevCpuidEax",
    "SevStatus",
    "SysCfg",
    "ebx_cbit",
    "ebx_num_vmpls",
    "ebx_pa_reduction",
    "encode_ebx",
]

CPUID_FN_SEV: Final = 0x8000_001F


class SevCpuidEax(IntFlag):
    """CPUID Fn8000_001F_EAX feature bits."""

    SME = 1 << 0
    SEV = 1 << 1
    VMPAGE_FLUSH = 1 << 2  # VMPAGE_FLUSH MSR supported
    SEV_ES = 1 << 3
    SEV_SNP = 1 << 4
    VMPL = 1 << 5
    VMPL_SSS = 1 << 7
    SME_COHERENT = 1 << 10  # hardware cache coherency across encryption domains
    VTE = 1 << 16
    VMGEXIT_PARAMETER = 1 << 17
    VIRTUAL_TOM_MSR = 1 << 18
    GUEST_INTERCEPT_CTL = 1 << 22
    SEGMENTED_RMP = 1 << 23
    SECURE_AVIC = 1 << 26
    ALLOWED_SEV_FEATURES = 1 << 27
    NESTED_VIRT_SNP_MSR = 1 << 29
    IBPB_ON_ENTRY = 1 << 31


EBX_CBIT_MASK: Final = 0x3F
EBX_PA_REDUCTION_SHIFT: Final = 6
EBX_PA_REDUCTION_MASK: Final = 0x3F
EBX_NUM_VMPLS_SHIFT: Final = 12
EBX_NUM_VMPLS_MASK: Final = 0xF


def ebx_cbit(ebx: int) -> int:
    """C-bit position, EBX[5:0]."""
    return ebx & EBX_CBIT_MASK


def ebx_pa_reduction(ebx: int) -> int:
    """Physical-address bits lost when memory encryption is enabled, EBX[11:6]."""
    return (ebx >> EBX_PA_REDUCTION_SHIFT) & EBX_PA_REDUCTION_MASK


def ebx_num_vmpls(ebx: int) -> int:
    """Number of VMPLs, EBX[15:12]."""
    return (ebx >> EBX_NUM_VMPLS_SHIFT) & EBX_NUM_VMPLS_MASK


def encode_ebx(c_bit: int, pa_reduction: int, num_vmpls: int = 0) -> int:
    """Fn8000_001F_EBX from its three fields; rejects a value too large for its field."""
    if not 0 <= c_bit <= EBX_CBIT_MASK:
        raise LayoutError(f"C-bit position {c_bit} does not fit EBX[5:0]")
    if not 0 <= pa_reduction <= EBX_PA_REDUCTION_MASK:
        raise LayoutError(f"PA reduction {pa_reduction} does not fit EBX[11:6]")
    if not 0 <= num_vmpls <= EBX_NUM_VMPLS_MASK:
        raise LayoutError(f"VMPL count {num_vmpls} does not fit EBX[15:12]")
    return c_bit | pa_reduction << EBX_PA_REDUCTION_SHIFT | num_vmpls << EBX_NUM_VMPLS_SHIFT


class Msr(IntEnum):
    """MSR numbers used by memory encryption, SEV-ES and SEV-SNP."""

    SYSCFG = 0xC001_0010
    HWCR = 0xC001_0015
    VM_HSAVE_PA = 0xC001_0117  # must be Hypervisor-owned under SNP (APM Table 15-41)
    VMPAGE_FLUSH = 0xC001_011E  # write: [63:12] host VA, [11:0] ASID
    GHCB = 0xC001_0130  # guest mode only
    SEV_STATUS = 0xC001_0131  # read-only
    RMP_BASE = 0xC001_0132
    RMP_END = 0xC001_0133
    GUEST_TSC_FREQ = 0xC001_0134
    VIRTUAL_TOM = 0xC001_0135
    SEG_RMP_CFG = 0xC001_0136
    SECURE_AVIC_CTL = 0xC001_0138
    VIRT_RMPUPDATE = 0xC001_F001  # nested SNP: emulated by the L0 hypervisor
    VIRT_PSMASH = 0xC001_F002


VMPAGE_FLUSH_ASID_MASK: Final = 0xFFF


class SysCfg(IntFlag):
    """SYSCFG (MSR C001_0010) bits involved in memory encryption."""

    MFDM = 1 << 19
    MEM_ENCRYPTION_MOD_EN = 1 << 23  # must be 1 for SME/SEV
    SNP_EN = 1 << 24  # SecureNestedPagingEn
    VMPL_EN = 1 << 25


class Hwcr(IntFlag):
    """HWCR (MSR C001_0015) bits; SmmLock is required for VMRUN of an SEV guest."""

    SMM_LOCK = 1 << 0


class SevStatus(IntFlag):
    """SEV_STATUS (MSR C001_0131) as a guest reads it (APM2 15.35, Table 15-32; Linux
    ``arch/x86/include/asm/svm.h`` ``SVM_SEV_FEAT_*``).

    From bit 2 up, SEV_STATUS bit n mirrors VMSA SEV_FEATURES bit n-2.
    """

    SEV_ENABLED = 1 << 0
    SEV_ES_ENABLED = 1 << 1
    SNP_ACTIVE = 1 << 2
    VTOM = 1 << 3
    REFLECT_VC = 1 << 4
    RESTRICTED_INJECTION = 1 << 5
    ALTERNATE_INJECTION = 1 << 6
    DEBUG_SWAP = 1 << 7
    PREVENT_HOST_IBS = 1 << 8
    BTB_ISOLATION = 1 << 9
    VMPL_SSS = 1 << 10
    SECURE_TSC = 1 << 11
    VMGEXIT_PARAMETER = 1 << 12
    PMC_VIRT = 1 << 13
    IBS_VIRT = 1 << 14
    GUEST_INTERCEPT_CTL = 1 << 15
    VMSA_REG_PROT = 1 << 16
    SMT_PROTECTION = 1 << 17
    SECURE_AVIC = 1 << 18
    IBPB_ON_ENTRY = 1 << 23
