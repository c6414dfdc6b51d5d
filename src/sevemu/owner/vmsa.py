"""Initial SEV-ES VMSAs as Linux KVM makes them for QEMU vCPUs: the guest owner's own calculator.

Sources: Linux ``arch/x86/kvm/svm/sev.c`` (``sev_es_sync_vmsa``, ``__sev_guest_init``,
``sev_guest_init``), ``arch/x86/kvm/svm/svm.c`` (``svm_set_cr0``/``svm_set_cr4``/``svm_set_efer``/
``svm_set_segment``) and ``arch/x86/include/asm/svm.h``; QEMU ``target/i386/cpu.c``
(``x86_cpu_reset_hold``, the EPYC models of ``builtin_x86_defs``) and ``target/i386/sev.c``
(``legacy-vm-type``, the SEV-ES reset vector of the APs); APM2 15.35 and Appendix B; cross-checked
with virtee ``sev`` (``vmsa``), sevctl ``vmsa build`` and sev-snp-measure (``vmsa.py``,
``vcpu_types.py``).

A guest owner predicting an SEV-ES launch digest must know the exact 4 KiB VMSA page of every vCPU
at LAUNCH_UPDATE_VMSA time.  KVM makes it in two steps, and so does this module:

1. **The vCPU in the x86 reset state** (:func:`reset_state` -> :class:`VcpuState`): what KVM holds
   after QEMU resets a vCPU and loads it with ``KVM_SET_SREGS/REGS/XCRS/XSAVE/MSRS``:

   * segments, in the VMCB's attribute encoding: CS = {0xf000, 0x9b, 0xffff, eip & 0xffff0000};
     ES/SS/DS/FS/GS = {0, 0x93, 0xffff, 0}; GDTR/IDTR = {0, 0, 0xffff, 0}; LDTR = {0, 0x82,
     0xffff, 0}; TR = {0, 0x8b, 0xffff, 0} (a busy 32-bit TSS);
   * RIP = eip & 0xffff; RFLAGS = 0x2; RDX = the CPUID(1).EAX signature of the vCPU model (QEMU
     ``env->regs[R_EDX] = env->cpuid_version``), every other GPR 0;
   * the VMCB's CR0 = 0x10 (ET: KVM clears the reset value's CD and NW), CR4 = 0x40 (KVM keeps the
     host's MCE), EFER = 0x1000 (KVM sets SVME), G_PAT = 0x0007040600070406 (the PAT reset value);
   * DR7 = 0x400, DR6 = 0xffff0ff0, XCR0 = 1 (x87), PKRU = 0, IA32_XSS = 0;
   * x87/SSE/AVX: FCW = 0x037f, MXCSR = 0x1f80, everything else 0 (FNINIT and the MXCSR reset).

2. **``sev_es_sync_vmsa``** (:func:`sev_es_sync_vmsa`): the VMSA page is the VMCB save area, then the
   GPRs and RIP, XCR0, PKRU, XSS and DR6 of the vCPU, and ``sev_features`` = the VM's
   ``vmsa_features``.  KVM refuses (-EINVAL) a vCPU whose DR7 has bits other than 0x400 set.

The switch: the KVM VM type
    Whether the x87/SSE/AVX state is copied into the VMSA depends on the **KVM VM type**, not on the
    kernel's age.  A VM of type ``KVM_X86_DEFAULT_VM`` made an SEV-ES guest with the legacy
    ``KVM_SEV_ES_INIT`` gets no FPU state in its VMSA (FCW and MXCSR stay 0, so that the launch
    digests of existing guests do not change), and its ``vmsa_features`` are always 0.  A VM created with
    type ``KVM_X86_SEV_ES_VM`` and initialised with ``KVM_SEV_INIT2`` (Linux 6.10 and later) gets the
    FPU state (FCW 0x037f, MXCSR 0x1f80 at reset) and the ``vmsa_features`` of ``struct
    kvm_sev_init`` (KVM accepts DEBUG_SWAP for an SEV-ES VM).  :class:`KvmVmType` names the two with
    Linux's values.  QEMU chooses with the ``sev-guest`` property ``legacy-vm-type``: ``off`` makes
    the ``KVM_SEV_INIT2`` VM (and fails on a kernel without it); ``on`` the legacy VM; ``auto``,
    QEMU's default, the legacy VM unless an option needs ``KVM_SEV_INIT2`` (QEMU has none such for
    SEV-ES yet).  An SNP guest is always a ``KVM_SEV_INIT2`` VM.  sevctl's VMSA files and test
    vectors are the legacy VM's; sev-snp-measure's ``--vmm-type QEMU`` pages are the
    ``KVM_SEV_INIT2`` VM's.  The functions here default to the ``KVM_SEV_INIT2`` VM, as
    sev-snp-measure does; a guest owner whose host runs QEMU with its default ``legacy-vm-type``
    asks for :attr:`KvmVmType.DEFAULT_VM`.  (Earlier versions of this module called the two
    ``KvmFpuReset.KVM_2022`` and ``KvmFpuReset.ARCHITECTURAL``, which read as a kernel date; the old
    names remain as aliases.)

vCPU types
    :data:`VCPU_TYPES` maps QEMU's EPYC CPU models to their display family/model/stepping (QEMU
    ``builtin_x86_defs``; a model's versions ``-v1``, ``-v2``, ... and aliases change features,
    never family, model or stepping) and :func:`vcpu_signature` gives the CPUID(1).EAX signature.

VMM types
    sev-snp-measure (``vmsa.py`` ``build_save_area``, ``vmm_types.py``) models two other VMMs'
    reset states beside QEMU's (:class:`VmmType`, :func:`vmm_reset_state`): **EC2** -- RDX 0x600
    whatever the vCPU model, FCW and MXCSR 0, SS attributes 0x92, TR 0x83, and CS 0x9a for the BSP
    (0x9b for the APs); **GCE** -- RDX 0x600, FCW and MXCSR 0, G_PAT 0x0007_0106 (the GCE hypervisor
    replaces the reset PAT).  Everything else is QEMU's.

Which EIP
    The bootstrap processor starts at :data:`BSP_RESET_EIP`; application processors start at the
    EIP of the OVMF SEV-ES reset block (:func:`sevemu.owner.ovmf.sev_es_reset_eip`;
    :func:`ovmf_vmsa_pages` reads it from the image).

This module is written from the sources above, independently of the hypervisor model, so the two
can be held to each other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from sevemu.abi.vmsa import SEGMENT_REGISTERS, SevEsSaveArea, SevFeatures, VmcbSeg
from sevemu.errors import InputError
from sevemu.owner.ovmf import sev_es_reset_eip

__all__ = [
    "BSP_RESET_EIP",
    "KVM_SEV_ES_VMSA_FEATURES",
    "VCPU_TYPES",
    "FpuState",
    "KvmFpuReset",
    "KvmVmType",
    "VcpuState",
    "VmmType",
    "build_vmsa",
    "cpuid_signature",
    "ovmf_vmsa_pages",
    "reset_state",
    "sev_es_sync_vmsa",
    "vcpu_signature",
    "vmm_reset_state",
    "vmsa_pages",
]

BSP_RESET_EIP: Final = 0xFFFFFFF0


class VmmType(enum.Enum):
    """The VMMs whose initial vCPU state sev-snp-measure knows (``--vmm-type``; module docstring)."""

    QEMU = "QEMU"
    EC2 = "ec2"
    GCE = "gce"


_CLOUD_RDX: Final = 0x600  # EC2's and GCE's RDX at reset, whatever the vCPU model
_GCE_G_PAT: Final = 0x0007_0106
"""Architectural reset EIP of the bootstrap processor (CS base 0xffff0000, RIP 0xfff0)."""


class KvmVmType(enum.IntEnum):
    """The KVM VM type of an SEV-ES guest, with Linux's ``KVM_X86_*_VM`` values (module docstring).

    It decides whether ``sev_es_sync_vmsa`` copies the x87/SSE/AVX state into the VMSA and whether
    the VM can have ``vmsa_features``.
    """

    DEFAULT_VM = 0
    """``KVM_X86_DEFAULT_VM`` + ``KVM_SEV_ES_INIT`` (legacy): no FPU state, no vmsa_features."""
    SEV_ES_VM = 3
    """``KVM_X86_SEV_ES_VM`` + ``KVM_SEV_INIT2``: FPU state synced, vmsa_features from kvm_sev_init."""
    SNP_VM = 4
    """``KVM_X86_SNP_VM`` + ``KVM_SEV_INIT2``: as SEV_ES_VM, and KVM adds SNP_ACTIVE to vmsa_features
    (the guest owner names the resulting ``sev_features``, sev-snp-measure's ``--guest-features``)."""

    # Old names (this module's KvmFpuReset), kept as aliases.
    KVM_2022 = 0
    ARCHITECTURAL = 3

    @property
    def syncs_fpu(self) -> bool:
        """Whether KVM copies the x87/SSE/AVX state into the VMSA (any type but the default VM)."""
        return self is not KvmVmType.DEFAULT_VM

    @property
    def init_command(self) -> str:
        """The KVM_MEMORY_ENCRYPT_OP command that makes a VM of this type an SEV-ES guest."""
        return "KVM_SEV_ES_INIT" if self is KvmVmType.DEFAULT_VM else "KVM_SEV_INIT2"

    @property
    def vmsa_features(self) -> SevFeatures:
        """The ``vmsa_features`` KVM can accept for an SEV-ES VM of this type (an SNP VM: any the
        owner names -- which the host supports is the host's to refuse)."""
        if self is KvmVmType.SNP_VM:
            return SevFeatures((1 << 64) - 1)
        return KVM_SEV_ES_VMSA_FEATURES if self.syncs_fpu else SevFeatures(0)


KvmFpuReset = KvmVmType
"""The module's old name for :class:`KvmVmType` (``KVM_2022`` = ``DEFAULT_VM``,
``ARCHITECTURAL`` = ``SEV_ES_VM``)."""

KVM_SEV_ES_VMSA_FEATURES: Final = SevFeatures.DEBUG_SWAP
"""What ``KVM_SEV_INIT2`` accepts in ``vmsa_features`` for an SEV-ES VM (Linux
``sev_supported_vmsa_features`` without the SNP-only SECURE_TSC; DEBUG_SWAP where the CPU has it)."""

# QEMU's EPYC CPU models: display family, model, stepping (QEMU target/i386/cpu.c builtin_x86_defs).
# Versions and the EPYC-IBPB alias (= EPYC-v2) set features and model-id only.
_EPYC_MODELS: Final = {
    "EPYC": ((23, 1, 2), ("v1", "v2", "v3", "v4")),
    "EPYC-Rome": ((23, 49, 0), ("v1", "v2", "v3", "v4", "v5")),
    "EPYC-Milan": ((25, 1, 1), ("v1", "v2", "v3")),
    "EPYC-Genoa": ((25, 17, 0), ("v1", "v2")),
    "EPYC-Turin": ((26, 0, 0), ("v1",)),
}


def _vcpu_types() -> Mapping[str, tuple[int, int, int]]:
    table: dict[str, tuple[int, int, int]] = {}
    for name, (fms, versions) in _EPYC_MODELS.items():
        table[name] = fms
        for version in versions:
            table[f"{name}-{version}"] = fms
    table["EPYC-IBPB"] = table["EPYC-v2"]
    return MappingProxyType(table)


VCPU_TYPES: Final = _vcpu_types()
"""QEMU vCPU model name -> (family, model, stepping), for every EPYC model and version."""


def cpuid_signature(family: int, model: int, stepping: int) -> int:
    """CPUID(1).EAX for a display family/model/stepping (e.g. 25/1/1 -> 0x00a00f11 for Milan).

    Families above 0xf are encoded as base family 0xf plus an extended family; for base family
    0xf the model's high nibble goes to the extended-model field (CPUID Fn0000_0001_EAX; QEMU
    ``x86_cpuid_version_set_family``/``_model``, virtee ``sev`` ``Vmsa::cpu_sku`` and
    sev-snp-measure ``cpu_sig`` encode the same for every AMD family).  A model above 0xf with a
    base family below 0xf has no encoding there and is refused.
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


def vcpu_signature(vcpu_type: str) -> int:
    """The CPUID(1).EAX signature of a QEMU vCPU model (:data:`VCPU_TYPES`; case as QEMU spells it)."""
    fms = VCPU_TYPES.get(vcpu_type)
    if fms is None:
        raise InputError(f"unknown vCPU type {vcpu_type!r}; known: {', '.join(VCPU_TYPES)}")
    return cpuid_signature(*fms)


# ---- step 1: the vCPU in the x86 reset state -----------------------------------------------------
_SEG_LIMIT: Final = 0xFFFF
# VMCB attribute encoding (svm_set_segment): type | S << 4 | DPL << 5 | P << 7 | ...
_CODE_ATTRIB: Final = 0x9B  # present, code, execute/read, accessed
_DATA_ATTRIB: Final = 0x93  # present, data, read/write, accessed
_LDTR_ATTRIB: Final = 0x82  # present, LDT
_TR_ATTRIB: Final = 0x8B  # present, busy 32-bit TSS

_RESET_CR0: Final = 0x10  # ET; KVM clears CD/NW of the 0x60000010 reset value in the VMCB
_RESET_CR4: Final = 0x40  # MCE, kept from the host by svm_set_cr4
_RESET_EFER: Final = 0x1000  # SVME, set by svm_set_efer
_RESET_G_PAT: Final = 0x0007040600070406
_RESET_RFLAGS: Final = 0x2
DR6_ACTIVE_LOW: Final = 0xFFFF0FF0
DR7_FIXED_1: Final = 0x400
_XCR0_X87: Final = 0x1
_FCW_RESET: Final = 0x037F
_MXCSR_RESET: Final = 0x1F80

_GPRS: Final = ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi",
                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# The VMCB save-area fields the memcpy at the start of sev_es_sync_vmsa carries (beyond segments).
_VMCB_SAVE_FIELDS: Final = ("cpl", "efer", "cr4", "cr3", "cr0", "dr7", "dr6", "rflags", "rip", "rsp",
                            "rax", "star", "lstar", "cstar", "sfmask", "kernel_gs_base", "sysenter_cs",
                            "sysenter_esp", "sysenter_eip", "cr2", "g_pat", "dbgctl")


@dataclass(frozen=True, slots=True)
class FpuState:
    """The guest FPU as the legacy FXSAVE area and the AVX upper halves hold it (Linux ``struct
    fxregs_state``: ``cwd``, ``swd``, ``twd`` (abridged), ``fop``, ``rip``, ``rdp``, ``mxcsr``,
    ``st_space`` = 8 registers of 16 bytes, 10 used; ``xmm_space``; the YMM_Hi128 component)."""

    fcw: int = _FCW_RESET
    fsw: int = 0
    ftw: int = 0
    fop: int = 0
    rip: int = 0
    rdp: int = 0
    mxcsr: int = _MXCSR_RESET
    st_space: bytes = bytes(128)
    xmm: bytes = bytes(256)
    ymm: bytes | None = bytes(256)
    """``None`` when the XSAVE area has no YMM component (KVM then zeroes the VMSA's)."""

    def fpreg_x87(self) -> bytes:
        """The VMSA's ``fpreg_x87``: the 8-byte mantissas of ST0-ST7, then their 2-byte sign and
        exponent words (KVM's repacking of the 16-byte FXSAVE slots)."""
        regs = [self.st_space[16 * i : 16 * i + 10] for i in range(8)]
        return b"".join(r[:8] for r in regs) + b"".join(r[8:10] for r in regs)


@dataclass(frozen=True, slots=True)
class VcpuState:
    """What KVM holds of one vCPU before LAUNCH_UPDATE_VMSA: the VMCB save area (``segments`` and
    ``vmcb``: field name -> value, names as :class:`~sevemu.abi.vmsa.SevEsSaveArea` has them), the
    GPR array and RIP (``regs``), ``xcr0``, ``pkru``, ``ia32_xss``, ``dr6`` (``vcpu->arch``) and the
    guest FPU."""

    segments: Mapping[str, VmcbSeg]
    vmcb: Mapping[str, int]
    regs: Mapping[str, int]
    rip: int
    xcr0: int = _XCR0_X87
    pkru: int = 0
    ia32_xss: int = 0
    dr6: int = DR6_ACTIVE_LOW
    fpu: FpuState = field(default_factory=FpuState)


def reset_state(eip: int, *, cpu_signature: int = 0) -> VcpuState:
    """A QEMU vCPU in the x86 reset state, starting at ``eip`` (module docstring, step 1)."""
    if not 0 <= eip < 1 << 32:
        raise InputError(f"reset EIP must be a 32-bit address, got {eip:#x}")
    if not 0 <= cpu_signature < 1 << 32:
        raise InputError(f"CPUID signature must fit 32 bits, got {cpu_signature:#x}")
    data = VmcbSeg(selector=0, attrib=_DATA_ATTRIB, limit=_SEG_LIMIT, base=0)
    segments = {
        "es": data, "ss": data, "ds": data, "fs": data, "gs": data,
        "cs": VmcbSeg(selector=0xF000, attrib=_CODE_ATTRIB, limit=_SEG_LIMIT, base=eip & 0xFFFF0000),
        "gdtr": VmcbSeg(selector=0, attrib=0, limit=_SEG_LIMIT, base=0),
        "idtr": VmcbSeg(selector=0, attrib=0, limit=_SEG_LIMIT, base=0),
        "ldtr": VmcbSeg(selector=0, attrib=_LDTR_ATTRIB, limit=_SEG_LIMIT, base=0),
        "tr": VmcbSeg(selector=0, attrib=_TR_ATTRIB, limit=_SEG_LIMIT, base=0),
    }
    rip = eip & 0xFFFF
    vmcb = {"efer": _RESET_EFER, "cr4": _RESET_CR4, "cr0": _RESET_CR0, "dr7": DR7_FIXED_1,
            "dr6": DR6_ACTIVE_LOW, "rflags": _RESET_RFLAGS, "rip": rip, "g_pat": _RESET_G_PAT}
    regs = dict.fromkeys(_GPRS, 0)
    regs["rdx"] = cpu_signature
    return VcpuState(segments=MappingProxyType(segments), vmcb=MappingProxyType(vmcb),
                     regs=MappingProxyType(regs), rip=rip)


def vmm_reset_state(eip: int, vmm: VmmType = VmmType.QEMU, *, cpu_signature: int = 0) -> VcpuState:
    """The reset state ``vmm`` gives a vCPU starting at ``eip``: QEMU's (:func:`reset_state`) with
    EC2's or GCE's differences (module docstring, "VMM types")."""
    state = reset_state(eip, cpu_signature=cpu_signature)
    if vmm is VmmType.QEMU:
        return state
    segments, vmcb, regs = dict(state.segments), dict(state.vmcb), dict(state.regs)
    regs["rdx"] = _CLOUD_RDX
    if vmm is VmmType.EC2:
        cs = segments["cs"]
        segments["cs"] = VmcbSeg(selector=cs.selector, attrib=0x9A if eip == BSP_RESET_EIP else _CODE_ATTRIB,
                                 limit=cs.limit, base=cs.base)
        segments["ss"] = VmcbSeg(selector=0, attrib=0x92, limit=_SEG_LIMIT, base=0)
        segments["tr"] = VmcbSeg(selector=0, attrib=0x83, limit=_SEG_LIMIT, base=0)
    else:
        vmcb["g_pat"] = _GCE_G_PAT
    return VcpuState(segments=MappingProxyType(segments), vmcb=MappingProxyType(vmcb), regs=MappingProxyType(regs),
                     rip=state.rip, fpu=FpuState(fcw=0, mxcsr=0))


# ---- step 2: sev_es_sync_vmsa --------------------------------------------------------------------
def _check_features(vm_type: KvmVmType, vmsa_features: int) -> None:
    if not 0 <= vmsa_features < 1 << 64:
        raise InputError(f"vmsa_features {vmsa_features:#x} does not fit 64 bits")
    extra = vmsa_features & ~int(vm_type.vmsa_features)
    if not extra:
        return
    if vm_type is KvmVmType.DEFAULT_VM:
        raise InputError(f"sev_features {vmsa_features:#x}: a legacy VM ({vm_type.init_command}) has no "
                         "vmsa_features; use the KVM_SEV_INIT2 VM type")
    known = ", ".join(f.name or "" for f in SevFeatures if f & extra)
    raise InputError(f"sev_features {vmsa_features:#x}: KVM_SEV_INIT2 accepts only "
                     f"{KVM_SEV_ES_VMSA_FEATURES.name} ({int(KVM_SEV_ES_VMSA_FEATURES):#x}) for an SEV-ES VM, "
                     f"not {known or 'unknown bits'} ({extra:#x})")


def sev_es_sync_vmsa(state: VcpuState, *, vm_type: KvmVmType = KvmVmType.SEV_ES_VM,
                     vmsa_features: int = 0) -> SevEsSaveArea:
    """The VMSA KVM writes for ``state`` in a VM of ``vm_type`` with ``vmsa_features`` (module
    docstring, step 2).  Raises :class:`~sevemu.errors.InputError` where KVM answers -EINVAL: DR7
    with bits beyond 0x400, or vmsa_features the VM type cannot have."""
    dr7 = state.vmcb.get("dr7", 0)
    if dr7 & ~DR7_FIXED_1:
        raise InputError(f"DR7 {dr7:#x}: KVM refuses LAUNCH_UPDATE_VMSA while debug registers are armed "
                         f"(only {DR7_FIXED_1:#x} may be set)")
    _check_features(vm_type, vmsa_features)
    unknown = sorted((set(state.vmcb) - set(_VMCB_SAVE_FIELDS)) | (set(state.regs) - set(_GPRS))
                     | (set(state.segments) - set(SEGMENT_REGISTERS)))
    if unknown:
        raise InputError(f"vCPU state names registers the VMCB save area and GPR array lack: {unknown}")
    values: dict[str, Any] = {}
    for name, seg in state.segments.items():  # memcpy(save, &vmcb->save, ...)
        values.update({f"{name}_selector": seg.selector, f"{name}_attrib": seg.attrib,
                       f"{name}_limit": seg.limit, f"{name}_base": seg.base})
    values.update(state.vmcb)
    values.update(state.regs)  # GPRs
    values.update(rip=state.rip, xcr0=state.xcr0, pkru=state.pkru, xss=state.ia32_xss, dr6=state.dr6,
                  sev_features=vmsa_features)
    if vm_type.syncs_fpu:
        fpu = state.fpu
        values.update(x87_dp=fpu.rdp, mxcsr=fpu.mxcsr, x87_ftw=fpu.ftw, x87_fsw=fpu.fsw, x87_fcw=fpu.fcw,
                      x87_fop=fpu.fop, x87_ds=0, x87_cs=0, x87_rip=fpu.rip, fpreg_x87=fpu.fpreg_x87(),
                      fpreg_xmm=bytes(fpu.xmm), fpreg_ymm=bytes(fpu.ymm) if fpu.ymm is not None else bytes(256))
    return SevEsSaveArea(**values)


# ---- what a guest owner calls ----------------------------------------------------------------------
def build_vmsa(
    eip: int,
    *,
    cpu_signature: int = 0,
    sev_features: int = 0,
    vm_type: KvmVmType = KvmVmType.SEV_ES_VM,
    vmm: VmmType = VmmType.QEMU,
) -> SevEsSaveArea:
    """The VMSA of one vCPU of ``vmm`` (QEMU by default) that starts at ``eip`` in a KVM VM of
    ``vm_type`` whose ``vmsa_features`` are ``sev_features``."""
    return sev_es_sync_vmsa(vmm_reset_state(eip, vmm, cpu_signature=cpu_signature), vm_type=vm_type,
                            vmsa_features=sev_features)


def vmsa_pages(
    num_cpus: int,
    ap_eip: int,
    *,
    cpu_signature: int = 0,
    sev_features: int = 0,
    vm_type: KvmVmType = KvmVmType.SEV_ES_VM,
    vmm: VmmType = VmmType.QEMU,
) -> list[bytes]:
    """The VMSA pages of vCPUs 0..num_cpus-1 in LAUNCH_UPDATE_VMSA order (BSP first, then the APs at
    ``ap_eip``)."""
    if num_cpus < 1:
        raise InputError(f"a guest needs at least one vCPU, got {num_cpus}")
    pages = [
        build_vmsa(eip, cpu_signature=cpu_signature, sev_features=sev_features, vm_type=vm_type, vmm=vmm).encode()
        for eip in (BSP_RESET_EIP, ap_eip)
    ]
    return [pages[0]] + [pages[1]] * (num_cpus - 1)


def ovmf_vmsa_pages(
    image: bytes,
    num_cpus: int,
    *,
    cpu_signature: int,
    sev_features: int = 0,
    vm_type: KvmVmType = KvmVmType.SEV_ES_VM,
    vmm: VmmType = VmmType.QEMU,
) -> list[bytes]:
    """:func:`vmsa_pages` for an OVMF ``image`` (the APs' EIP from its SEV-ES reset block; a
    :class:`~sevemu.errors.LayoutError` if it has none)."""
    return vmsa_pages(num_cpus, sev_es_reset_eip(image), cpu_signature=cpu_signature,
                      sev_features=sev_features, vm_type=vm_type, vmm=vmm)
