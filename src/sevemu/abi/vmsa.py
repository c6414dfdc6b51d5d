"""SEV-ES VM save area (VMSA): APM2 15.35 and Appendix B (Table B-4), Linux
``arch/x86/include/asm/svm.h`` ``struct sev_es_save_area``; SEV_FEATURES and SEV_STATUS: APM2 Table
15-32 and Linux ``SVM_SEV_FEAT_*``.

The VMSA is one 4 KiB page; Linux's struct covers the first 0x670 bytes.  Field names are Linux's
verbatim.  The ten segment registers are each a ``vmcb_seg`` {selector u16, attrib u16, limit u32,
base u64}; they appear flat as ``<seg>_selector``, ``<seg>_attrib``, ``<seg>_limit``, ``<seg>_base``
(:meth:`SevEsSaveArea.segment` gives a :class:`VmcbSeg`).

Beyond Linux's struct, the page declares the APM's guest intercept controls used with
SEV_FEATURES.GuestInterceptCtl: eight 32-bit intercept vector words at 0x900 and four 64-bit MSR
intercept words at 0x920 (as read from the APM; names are ours).  Everything else is reserved, so a
page that uses newer fields fails to decode with "reserved bytes not zero".
"""

from __future__ import annotations

from enum import IntFlag
from typing import Final

from sevemu._util.units import PAGE
from sevemu.abi.struct import Struct, array, layout, raw, u8, u16, u32, u64

__all__ = [
    "SEGMENT_REGISTERS",
    "SEV_ES_SAVE_AREA_SIZE",
    "SEV_STATUS_FEATURES_SHIFT",
    "VMSA_PAGE_SIZE",
    "SevEsSaveArea",
    "SevFeatures",
    "VmcbSeg",
    "sev_status_of",
]

VMSA_PAGE_SIZE: Final = PAGE
"""A VMSA occupies one 4 KiB page; LAUNCH_UPDATE_VMSA measures all of it."""

SEV_ES_SAVE_AREA_SIZE: Final = 0x670
"""``sizeof(struct sev_es_save_area)`` (Linux ``EXPECTED_SEV_ES_SAVE_AREA_SIZE`` = 1648)."""

SEGMENT_REGISTERS: Final = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")
"""The ``vmcb_seg`` fields at 0x00..0x9F, 16 bytes each, in this order."""


class SevFeatures(IntFlag):
    """VMSA ``sev_features`` (0x3B0), APM2 Table 15-32; bit n shows in SEV_STATUS bit n + 2
    (:class:`sevemu.abi.cpuid.SevStatus`, :func:`sev_status_of`)."""

    SNP_ACTIVE = 1 << 0
    VTOM = 1 << 1
    REFLECT_VC = 1 << 2
    RESTRICTED_INJECTION = 1 << 3
    ALTERNATE_INJECTION = 1 << 4
    DEBUG_SWAP = 1 << 5
    PREVENT_HOST_IBS = 1 << 6
    BTB_ISOLATION = 1 << 7
    VMPL_SSS = 1 << 8
    SECURE_TSC = 1 << 9
    VMGEXIT_PARAMETER = 1 << 10
    PMC_VIRT = 1 << 11
    IBS_VIRT = 1 << 12
    GUEST_INTERCEPT_CTL = 1 << 13
    VMSA_REG_PROT = 1 << 14
    SMT_PROTECTION = 1 << 15
    SECURE_AVIC = 1 << 16
    IBPB_ON_ENTRY = 1 << 21


SEV_STATUS_FEATURES_SHIFT: Final = 2
_SEV_STATUS_SEV_ES: Final = 0b11  # SEV_STATUS bits 0 (SEV enabled) and 1 (SEV-ES enabled)


def sev_status_of(sev_features: int) -> int:
    """The SEV_STATUS MSR value an SEV-ES or SNP guest with VMSA ``sev_features`` reads."""
    if not 0 <= sev_features < 1 << 62:
        raise ValueError(f"sev_features {sev_features:#x} out of range")
    return _SEV_STATUS_SEV_ES | sev_features << SEV_STATUS_FEATURES_SHIFT


@layout(size=0x10)
class VmcbSeg(Struct):
    """``struct vmcb_seg``: one segment register as the VMCB/VMSA stores it."""

    selector: int = u16(0x0)
    attrib: int = u16(0x2)
    limit: int = u32(0x4)
    base: int = u64(0x8)


@layout(size=VMSA_PAGE_SIZE)
class SevEsSaveArea(Struct):
    """The VMSA page: ``struct sev_es_save_area``, the guest intercept controls, reserved bytes."""

    es_selector: int = u16(0x000)
    es_attrib: int = u16(0x002)
    es_limit: int = u32(0x004)
    es_base: int = u64(0x008)
    cs_selector: int = u16(0x010)
    cs_attrib: int = u16(0x012)
    cs_limit: int = u32(0x014)
    cs_base: int = u64(0x018)
    ss_selector: int = u16(0x020)
    ss_attrib: int = u16(0x022)
    ss_limit: int = u32(0x024)
    ss_base: int = u64(0x028)
    ds_selector: int = u16(0x030)
    ds_attrib: int = u16(0x032)
    ds_limit: int = u32(0x034)
    ds_base: int = u64(0x038)
    fs_selector: int = u16(0x040)
    fs_attrib: int = u16(0x042)
    fs_limit: int = u32(0x044)
    fs_base: int = u64(0x048)
    gs_selector: int = u16(0x050)
    gs_attrib: int = u16(0x052)
    gs_limit: int = u32(0x054)
    gs_base: int = u64(0x058)
    gdtr_selector: int = u16(0x060)
    gdtr_attrib: int = u16(0x062)
    gdtr_limit: int = u32(0x064)
    gdtr_base: int = u64(0x068)
    ldtr_selector: int = u16(0x070)
    ldtr_attrib: int = u16(0x072)
    ldtr_limit: int = u32(0x074)
    ldtr_base: int = u64(0x078)
    idtr_selector: int = u16(0x080)
    idtr_attrib: int = u16(0x082)
    idtr_limit: int = u32(0x084)
    idtr_base: int = u64(0x088)
    tr_selector: int = u16(0x090)
    tr_attrib: int = u16(0x092)
    tr_limit: int = u32(0x094)
    tr_base: int = u64(0x098)
    pl0_ssp: int = u64(0x0A0)
    pl1_ssp: int = u64(0x0A8)
    pl2_ssp: int = u64(0x0B0)
    pl3_ssp: int = u64(0x0B8)
    u_cet: int = u64(0x0C0)
    # 0x0C8..0x0C9 reserved
    vmpl: int = u8(0x0CA)
    cpl: int = u8(0x0CB)
    # 0x0CC..0x0CF reserved
    efer: int = u64(0x0D0)
    # 0x0D8..0x13F reserved
    xss: int = u64(0x140)
    cr4: int = u64(0x148)
    cr3: int = u64(0x150)
    cr0: int = u64(0x158)
    dr7: int = u64(0x160)
    dr6: int = u64(0x168)
    rflags: int = u64(0x170)
    rip: int = u64(0x178)
    dr0: int = u64(0x180)
    dr1: int = u64(0x188)
    dr2: int = u64(0x190)
    dr3: int = u64(0x198)
    dr0_addr_mask: int = u64(0x1A0)
    dr1_addr_mask: int = u64(0x1A8)
    dr2_addr_mask: int = u64(0x1B0)
    dr3_addr_mask: int = u64(0x1B8)
    # 0x1C0..0x1D7 reserved
    rsp: int = u64(0x1D8)
    s_cet: int = u64(0x1E0)
    ssp: int = u64(0x1E8)
    isst_addr: int = u64(0x1F0)
    rax: int = u64(0x1F8)
    star: int = u64(0x200)
    lstar: int = u64(0x208)
    cstar: int = u64(0x210)
    sfmask: int = u64(0x218)
    kernel_gs_base: int = u64(0x220)
    sysenter_cs: int = u64(0x228)
    sysenter_esp: int = u64(0x230)
    sysenter_eip: int = u64(0x238)
    cr2: int = u64(0x240)
    # 0x248..0x267 reserved
    g_pat: int = u64(0x268)
    dbgctl: int = u64(0x270)
    br_from: int = u64(0x278)
    br_to: int = u64(0x280)
    last_excp_from: int = u64(0x288)
    last_excp_to: int = u64(0x290)
    # 0x298..0x2E7 reserved
    pkru: int = u32(0x2E8)
    tsc_aux: int = u32(0x2EC)
    tsc_scale: int = u64(0x2F0)
    tsc_offset: int = u64(0x2F8)
    # 0x300..0x307 reserved
    rcx: int = u64(0x308)
    rdx: int = u64(0x310)
    rbx: int = u64(0x318)
    # 0x320: reserved (rsp lives at 0x1D8)
    rbp: int = u64(0x328)
    rsi: int = u64(0x330)
    rdi: int = u64(0x338)
    r8: int = u64(0x340)
    r9: int = u64(0x348)
    r10: int = u64(0x350)
    r11: int = u64(0x358)
    r12: int = u64(0x360)
    r13: int = u64(0x368)
    r14: int = u64(0x370)
    r15: int = u64(0x378)
    # 0x380..0x38F reserved
    guest_exit_info_1: int = u64(0x390)
    guest_exit_info_2: int = u64(0x398)
    guest_exit_int_info: int = u64(0x3A0)
    guest_nrip: int = u64(0x3A8)
    sev_features: int = u64(0x3B0)
    vintr_ctrl: int = u64(0x3B8)
    guest_exit_code: int = u64(0x3C0)
    virtual_tom: int = u64(0x3C8)
    tlb_id: int = u64(0x3D0)
    pcpu_id: int = u64(0x3D8)
    event_inj: int = u64(0x3E0)
    xcr0: int = u64(0x3E8)
    # 0x3F0..0x3FF reserved
    x87_dp: int = u64(0x400)
    mxcsr: int = u32(0x408)
    x87_ftw: int = u16(0x40C)
    x87_fsw: int = u16(0x40E)
    x87_fcw: int = u16(0x410)
    x87_fop: int = u16(0x412)
    x87_ds: int = u16(0x414)
    x87_cs: int = u16(0x416)
    x87_rip: int = u64(0x418)
    fpreg_x87: bytes = raw(0x420, 80)
    fpreg_xmm: bytes = raw(0x470, 256)
    fpreg_ymm: bytes = raw(0x570, 256)
    # 0x670..0x8FF reserved
    guest_intercept_vectors: tuple[int, ...] = array(0x900, 8, u32)
    guest_msr_intercepts: tuple[int, ...] = array(0x920, 4, u64)
    # 0x940..0xFFF reserved

    def segment(self, name: str) -> VmcbSeg:
        """Segment register ``name`` (one of :data:`SEGMENT_REGISTERS`) as a :class:`VmcbSeg`."""
        if name not in SEGMENT_REGISTERS:
            raise ValueError(f"no segment register {name!r}; expected one of {', '.join(SEGMENT_REGISTERS)}")
        return VmcbSeg(getattr(self, f"{name}_selector"), getattr(self, f"{name}_attrib"),
                       getattr(self, f"{name}_limit"), getattr(self, f"{name}_base"))
