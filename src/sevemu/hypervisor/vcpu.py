"""vCPU models and the x86 reset state a new vCPU gets, as QEMU and KVM give it.

Sources: QEMU ``target/i386/cpu.c`` (``builtin_x86_defs``: the EPYC models' family, model and
stepping and their versions; ``x86_cpuid_version_set_family``/``_model``/``_stepping``;
``x86_cpu_reset_hold``: segments, ``EDX = cpuid_version``, FPU, XCR0, DR6/DR7, PAT); Linux
``arch/x86/kvm/x86.c`` (``kvm_vcpu_reset``), ``arch/x86/kvm/svm/svm.c`` (``init_vmcb``, ``svm_set_cr0``,
``svm_set_cr4``, ``svm_set_efer``, ``svm_set_segment``) and ``include/uapi/linux/kvm.h`` /
``arch/x86/include/uapi/asm/kvm.h`` (``KVM_X86_*_VM``).

A VM is created with a VM type (KVM_CREATE_VM's argument, :class:`KvmVmType`) and a vCPU type (QEMU's
``-cpu``, :data:`CPU_MODELS` or ``host``).  Each vCPU starts in the x86 reset state as KVM holds it
once QEMU has reset it: the part the model's VMCB carries (CR0 = 0x10: ET, KVM drops the reset
value's CD and NW; CR4 = 0x40: MCE, kept from the host; EFER = 0x1000: SVME; RIP = EIP & 0xffff;
RFLAGS = 0x2; RDX = the model's CPUID(1).EAX signature, every other GPR 0) and the rest of the save
area and of ``vcpu->arch`` (:class:`X86State`: the segment registers in the VMCB's attribute encoding,
DR6 = 0xffff0ff0, DR7 = 0x400, XCR0 = 1, PKRU = 0, IA32_XSS = 0, PAT = 0x0007040600070406, the FPU
after FNINIT with MXCSR = 0x1f80).  The reset EIP is 0xfffffff0 (CS base 0xffff0000, RIP 0xfff0);
QEMU starts an SEV-ES guest's application processors at the EIP of OVMF's SEV-ES reset block instead
(``sev_es_set_reset_vector``), which a VMM passes when it adds the vCPU.

This is the hypervisor's own vCPU state; the VMSA of an SEV-ES vCPU is made from it
(:mod:`sevemu.hypervisor.sev.es`).  The guest owner's calculator (``sevemu.owner.vmsa``) is written
independently and held byte-equal to it by a test.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Final

from sevemu.errors import InputError
from sevemu.hw.svm import GPRS, Vmcb

__all__ = [
    "BSP_RESET_EIP",
    "CPU_MODELS",
    "DR6_RESET",
    "DR7_RESET",
    "HOST_CPU",
    "CpuModel",
    "Fpu",
    "KvmVmType",
    "Segment",
    "X86State",
    "cpu_model",
    "reset_vcpu",
]


class KvmVmType(enum.IntEnum):
    """KVM_CREATE_VM's ``type`` on x86 (Linux ``KVM_X86_*_VM``)."""

    DEFAULT_VM = 0
    SW_PROTECTED_VM = 1
    SEV_VM = 2
    SEV_ES_VM = 3
    SNP_VM = 4

    @property
    def protected_state(self) -> bool:
        """KVM's ``has_protected_state``: the vCPUs' registers are the guest's (SEV-ES, SNP)."""
        return self in (KvmVmType.SEV_ES_VM, KvmVmType.SNP_VM)

    @property
    def needs_init2(self) -> bool:
        """KVM's ``need_init``: a VM of this type becomes a guest only through KVM_SEV_INIT2."""
        return self in (KvmVmType.SEV_VM, KvmVmType.SEV_ES_VM, KvmVmType.SNP_VM)


BSP_RESET_EIP: Final = 0xFFFF_FFF0
DR6_RESET: Final = 0xFFFF_0FF0
DR7_RESET: Final = 0x400
HOST_CPU: Final = "host"
"""The vCPU type that passes the host CPU's signature through (QEMU ``-cpu host``)."""


@dataclass(frozen=True, slots=True)
class CpuModel:
    """A vCPU model: its name and the display family, model and stepping QEMU gives it."""

    name: str
    family: int
    model: int
    stepping: int

    @property
    def signature(self) -> int:
        """CPUID(1).EAX as QEMU composes ``cpuid_version``: a family above 15 is base family 0xf plus
        an extended family; the model's high nibble goes to the extended-model field."""
        version = (0xF00 | (self.family - 0xF) << 20) if self.family > 0xF else self.family << 8
        version |= (self.model & 0xF) << 4 | (self.model >> 4) << 16
        return version | (self.stepping & 0xF)

    @classmethod
    def from_signature(cls, name: str, eax: int) -> CpuModel:
        """The model a CPUID(1).EAX value names (``host``: the host's own signature)."""
        base_family = eax >> 8 & 0xF
        family = base_family + (eax >> 20 & 0xFF if base_family == 0xF else 0)
        return cls(name, family, (eax >> 16 & 0xF) << 4 | eax >> 4 & 0xF, eax & 0xF)


# QEMU builtin_x86_defs: the EPYC models (family, model, stepping) and their versions; a version
# changes features and cache information, never the signature.  EPYC-IBPB is an alias of EPYC-v2.
_EPYC: Final = (
    ("EPYC", 23, 1, 2, 4),
    ("EPYC-Rome", 23, 49, 0, 5),
    ("EPYC-Milan", 25, 1, 1, 3),
    ("EPYC-Genoa", 25, 17, 0, 2),
    ("EPYC-Turin", 26, 0, 0, 1),
)


def _models() -> dict[str, CpuModel]:
    table: dict[str, CpuModel] = {}
    for name, family, model, stepping, versions in _EPYC:
        for alias in (name, *(f"{name}-v{v}" for v in range(1, versions + 1))):
            table[alias] = CpuModel(alias, family, model, stepping)
    table["EPYC-IBPB"] = CpuModel("EPYC-IBPB", 23, 1, 2)
    return table


CPU_MODELS: Final = MappingProxyType(_models())
"""QEMU's EPYC vCPU models by name (with every ``-vN`` version and the EPYC-IBPB alias)."""


def cpu_model(name: str, host_signature: int) -> CpuModel:
    """The model called ``name``; ``host`` is the host CPU (``host_signature``).  An unknown name is
    an :class:`~sevemu.errors.InputError` listing the known ones."""
    if name == HOST_CPU:
        return CpuModel.from_signature(HOST_CPU, host_signature)
    model = CPU_MODELS.get(name)
    if model is None:
        raise InputError(f"unknown vCPU type {name!r}; known: {HOST_CPU}, {', '.join(CPU_MODELS)}")
    return model


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment register as the VMCB keeps it (``struct vmcb_seg``; ``attrib`` in the VMCB's
    12-bit encoding: type, S, DPL, P, AVL, L, D/B, G)."""

    selector: int = 0
    attrib: int = 0
    limit: int = 0
    base: int = 0


_DATA: Final = 0x93  # present, S, read/write data, accessed
_CODE: Final = 0x9B  # present, S, execute/read code, accessed
_LDT: Final = 0x82  # present, LDT
_BUSY_TSS: Final = 0x8B  # present, 32-bit busy TSS


def _reset_segments(eip: int) -> dict[str, Segment]:
    data = Segment(0, _DATA, 0xFFFF, 0)
    return {"es": data, "cs": Segment(0xF000, _CODE, 0xFFFF, eip & 0xFFFF_0000), "ss": data, "ds": data,
            "fs": data, "gs": data, "gdtr": Segment(0, 0, 0xFFFF, 0), "ldtr": Segment(0, _LDT, 0xFFFF, 0),
            "idtr": Segment(0, 0, 0xFFFF, 0), "tr": Segment(0, _BUSY_TSS, 0xFFFF, 0)}


@dataclass
class Fpu:
    """The guest FPU in its FXSAVE/XSAVE form (``fxregs_state``: control, status and abridged tag
    words, last opcode, instruction and data pointers, MXCSR, ST0-ST7 in 16-byte slots, XMM0-15,
    and the upper halves of YMM0-15)."""

    fcw: int = 0x037F
    fsw: int = 0
    ftw: int = 0
    fop: int = 0
    rip: int = 0
    rdp: int = 0
    mxcsr: int = 0x1F80
    st: bytes = bytes(128)
    xmm: bytes = bytes(256)
    ymm: bytes = bytes(256)


@dataclass
class X86State:
    """What KVM holds of a vCPU beyond the model's VMCB fields (module docstring)."""

    segments: dict[str, Segment] = field(default_factory=lambda: _reset_segments(BSP_RESET_EIP))
    dr6: int = DR6_RESET
    dr7: int = DR7_RESET
    xcr0: int = 1
    pkru: int = 0
    xss: int = 0
    g_pat: int = 0x0007_0406_0007_0406
    fpu: Fpu = field(default_factory=Fpu)
    guest_debug: bool = False
    """KVM_SET_GUEST_DEBUG enabled (KVM refuses an SEV-ES vCPU's LAUNCH_UPDATE_VMSA then)."""


_RESET_CR0: Final = 0x10
_RESET_CR4: Final = 0x40
_RESET_EFER: Final = 0x1000


def reset_vcpu(vmcb: Vmcb, state: X86State, signature: int, eip: int = BSP_RESET_EIP) -> None:
    """Put a vCPU (its VMCB save fields and ``state``) into the x86 reset state at ``eip``."""
    if not 0 <= eip < 1 << 32:
        raise InputError(f"a reset EIP is a 32-bit address, got {eip:#x}")
    vmcb.cr0, vmcb.cr3, vmcb.cr4, vmcb.efer = _RESET_CR0, 0, _RESET_CR4, _RESET_EFER
    vmcb.rip, vmcb.rflags = eip & 0xFFFF, 0x2
    vmcb.regs.update(dict.fromkeys(GPRS, 0), rdx=signature)
    fresh = X86State(segments=_reset_segments(eip))
    for f in fields(X86State):
        setattr(state, f.name, getattr(fresh, f.name))
