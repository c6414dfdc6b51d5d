"""Initial SEV-ES VMSAs (Linux sev_es_sync_vmsa over a QEMU vCPU in the x86 reset state), the
CPUID signature and QEMU's EPYC vCPU types."""

from __future__ import annotations

import dataclasses

import pytest

from sevemu.abi.vmsa import SEV_ES_SAVE_AREA_SIZE, VMSA_PAGE_SIZE, SevEsSaveArea, SevFeatures
from sevemu.errors import InputError, LayoutError
from sevemu.owner.ovmf import OVMF_TABLE_FOOTER_GUID, SEV_ES_RESET_BLOCK_GUID
from sevemu.owner.vmsa import (
    BSP_RESET_EIP,
    VCPU_TYPES,
    FpuState,
    KvmFpuReset,
    KvmVmType,
    build_vmsa,
    cpuid_signature,
    ovmf_vmsa_pages,
    reset_state,
    sev_es_sync_vmsa,
    vcpu_signature,
    vmsa_pages,
)

MXCSR = range(0x408, 0x40C)
FCW = range(0x410, 0x412)


@pytest.mark.parametrize(
    ("fms", "signature"),
    [
        ((25, 1, 1), 0x00A00F11),  # Milan B1
        ((23, 49, 0), 0x00830F10),  # Rome B0
        ((25, 17, 1), 0x00A10F11),  # Genoa B1
        ((26, 2, 0), 0x00B00F20),  # Turin
        ((23, 1, 2), 0x00800F12),  # Naples B2
        ((6, 10, 3), 0x000006A3),  # below family 0xf: no extended fields
    ],
)
def test_cpuid_signature(fms: tuple[int, int, int], signature: int) -> None:
    assert cpuid_signature(*fms) == signature


@pytest.mark.parametrize("fms", [(6, 0x1A, 0), (25, 256, 0), (25, 1, 16), (-1, 0, 0), (0x10F, 0, 0)])
def test_cpuid_signature_out_of_range(fms: tuple[int, int, int]) -> None:
    with pytest.raises(InputError):
        cpuid_signature(*fms)


# QEMU target/i386/cpu.c builtin_x86_defs, read for this test: .family, .model, .stepping.
QEMU_MODELS = {"EPYC": (23, 1, 2), "EPYC-Rome": (23, 49, 0), "EPYC-Milan": (25, 1, 1),
               "EPYC-Genoa": (25, 17, 0), "EPYC-Turin": (26, 0, 0)}


def test_vcpu_types_are_qemus_models_and_versions() -> None:
    for name, fms in VCPU_TYPES.items():
        base = "EPYC" if name == "EPYC-IBPB" else name.rsplit("-v", 1)[0]
        assert fms == QEMU_MODELS[base], name
    assert {"EPYC-v1", "EPYC-v4", "EPYC-Rome-v4", "EPYC-Milan-v2", "EPYC-Genoa-v1"} <= set(VCPU_TYPES)
    assert vcpu_signature("EPYC") == vcpu_signature("EPYC-v4") == 0x00800F12
    assert vcpu_signature("EPYC-Milan") == 0x00A00F11 and vcpu_signature("EPYC-Genoa") == 0x00A10F10


@pytest.mark.parametrize("name", ["epyc-milan", "EPYC-Milan-v9", "Skylake-Server", ""])
def test_unknown_vcpu_type(name: str) -> None:
    with pytest.raises(InputError, match=f"unknown vCPU type {name!r}; known: EPYC, EPYC-v1"):
        vcpu_signature(name)


def test_bsp_reset_state() -> None:
    vmsa = build_vmsa(BSP_RESET_EIP, cpu_signature=0xA00F11)
    assert (vmsa.cs_selector, vmsa.cs_base, vmsa.rip) == (0xF000, 0xFFFF0000, 0xFFF0)
    assert (vmsa.mxcsr, vmsa.x87_fcw) == (0x1F80, 0x037F)
    assert vmsa.rdx == 0xA00F11 and vmsa.xcr0 == 1 and vmsa.efer == 0x1000
    assert (vmsa.cr0, vmsa.cr4, vmsa.dr6, vmsa.dr7, vmsa.rflags) == (0x10, 0x40, 0xFFFF0FF0, 0x400, 2)
    for seg in ("es", "ss", "ds", "fs", "gs"):
        assert (getattr(vmsa, f"{seg}_attrib"), getattr(vmsa, f"{seg}_limit")) == (0x93, 0xFFFF)
    assert (vmsa.ldtr_attrib, vmsa.tr_attrib, vmsa.gdtr_limit, vmsa.idtr_limit) == (0x82, 0x8B, 0xFFFF, 0xFFFF)
    page = vmsa.encode()
    assert len(page) == VMSA_PAGE_SIZE and not any(page[SEV_ES_SAVE_AREA_SIZE:])
    assert SevEsSaveArea.decode(page) == vmsa


def test_ap_reset_state_and_features() -> None:
    vmsa = build_vmsa(0x0080B004, sev_features=SevFeatures.DEBUG_SWAP)
    assert (vmsa.cs_base, vmsa.rip, vmsa.sev_features) == (0x800000, 0xB004, 0x20)
    legacy = build_vmsa(0x0080B004, vm_type=KvmVmType.DEFAULT_VM)
    assert (legacy.cs_base, legacy.rip, legacy.sev_features) == (0x800000, 0xB004, 0)
    assert (legacy.mxcsr, legacy.x87_fcw) == (0, 0)


def test_vm_types_differ_in_the_fpu_words_only() -> None:
    for eip in (BSP_RESET_EIP, 0x0080B004):
        new = build_vmsa(eip, cpu_signature=0xA00F11, vm_type=KvmVmType.SEV_ES_VM).encode()
        old = build_vmsa(eip, cpu_signature=0xA00F11, vm_type=KvmVmType.DEFAULT_VM).encode()
        assert [i for i in range(VMSA_PAGE_SIZE) if new[i] != old[i]] == [0x408, 0x409, 0x410, 0x411]


def test_vm_type_names() -> None:
    assert (int(KvmVmType.DEFAULT_VM), int(KvmVmType.SEV_ES_VM)) == (0, 3)  # Linux KVM_X86_*_VM
    assert KvmFpuReset is KvmVmType
    assert KvmVmType.KVM_2022 is KvmVmType.DEFAULT_VM and KvmVmType.ARCHITECTURAL is KvmVmType.SEV_ES_VM
    assert [t.init_command for t in KvmVmType] == ["KVM_SEV_ES_INIT", "KVM_SEV_INIT2", "KVM_SEV_INIT2"]  # + SNP_VM
    assert not KvmVmType.DEFAULT_VM.syncs_fpu and KvmVmType.SEV_ES_VM.syncs_fpu


def test_vmsa_features_as_kvm_accepts_them() -> None:
    with pytest.raises(InputError, match="a legacy VM .KVM_SEV_ES_INIT. has no vmsa_features"):
        build_vmsa(BSP_RESET_EIP, sev_features=SevFeatures.DEBUG_SWAP, vm_type=KvmVmType.DEFAULT_VM)
    with pytest.raises(InputError, match=r"accepts only DEBUG_SWAP \(0x20\).*not SNP_ACTIVE \(0x1\)"):
        build_vmsa(BSP_RESET_EIP, sev_features=SevFeatures.SNP_ACTIVE | SevFeatures.DEBUG_SWAP)
    with pytest.raises(InputError, match=r"not unknown bits \(0x4000000000000000\)"):
        build_vmsa(BSP_RESET_EIP, sev_features=1 << 62)
    with pytest.raises(InputError, match="does not fit 64 bits"):
        build_vmsa(BSP_RESET_EIP, sev_features=1 << 64)


def test_sync_refuses_armed_debug_registers() -> None:
    state = reset_state(BSP_RESET_EIP)
    armed = dataclasses.replace(state, vmcb={**state.vmcb, "dr7": 0x401})
    with pytest.raises(InputError, match="DR7 0x401: KVM refuses LAUNCH_UPDATE_VMSA"):
        sev_es_sync_vmsa(armed)
    with pytest.raises(InputError, match=r"registers .* lack: \['cr8'\]"):
        sev_es_sync_vmsa(dataclasses.replace(state, vmcb={**state.vmcb, "cr8": 1}))


def test_sync_copies_the_vcpu_not_the_vmcb() -> None:
    """GPRs and RIP come from the register array, xcr0/pkru/xss/dr6 from vcpu->arch, over the VMCB."""
    state = reset_state(BSP_RESET_EIP)
    state = dataclasses.replace(
        state, vmcb={**state.vmcb, "rsp": 0x1111, "rax": 0x2222, "dr6": 0xFFFF4FF0},
        regs={**state.regs, "rsp": 0x3333, "r15": 0x4444}, rip=0x5555, xcr0=0x7, pkru=0x55555554, ia32_xss=0x800,
        dr6=0xFFFF0FF1)
    vmsa = sev_es_sync_vmsa(state)
    assert (vmsa.rsp, vmsa.rax, vmsa.r15, vmsa.rip) == (0x3333, 0, 0x4444, 0x5555)
    assert (vmsa.xcr0, vmsa.pkru, vmsa.xss, vmsa.dr6) == (0x7, 0x55555554, 0x800, 0xFFFF0FF1)


def test_sync_fpu_only_for_the_init2_vm_type() -> None:
    st = bytes(range(1, 129))
    fpu = FpuState(fcw=0x27F, fsw=0x3800, ftw=0x80, fop=0x1DD, rip=0x1234, rdp=0x5678, mxcsr=0x9FC0,
                   st_space=st, xmm=b"\xaa" * 256, ymm=None)
    state = dataclasses.replace(reset_state(BSP_RESET_EIP), fpu=fpu)
    vmsa = sev_es_sync_vmsa(state, vm_type=KvmVmType.SEV_ES_VM)
    assert (vmsa.x87_fcw, vmsa.x87_fsw, vmsa.x87_ftw, vmsa.x87_fop) == (0x27F, 0x3800, 0x80, 0x1DD)
    assert (vmsa.x87_rip, vmsa.x87_dp, vmsa.mxcsr, vmsa.x87_cs, vmsa.x87_ds) == (0x1234, 0x5678, 0x9FC0, 0, 0)
    # ST(i) is FXSAVE bytes 16i..16i+9: the mantissa goes to 0x420 + 8i, sign/exponent to 0x460 + 2i
    for i in range(8):
        assert vmsa.fpreg_x87[8 * i : 8 * i + 8] == st[16 * i : 16 * i + 8]
        assert vmsa.fpreg_x87[64 + 2 * i : 66 + 2 * i] == st[16 * i + 8 : 16 * i + 10]
    assert vmsa.fpreg_xmm == b"\xaa" * 256 and vmsa.fpreg_ymm == bytes(256)
    ymm = sev_es_sync_vmsa(dataclasses.replace(state, fpu=dataclasses.replace(fpu, ymm=b"\x5b" * 256)))
    assert ymm.fpreg_ymm == b"\x5b" * 256
    legacy = sev_es_sync_vmsa(state, vm_type=KvmVmType.DEFAULT_VM).encode()
    assert not any(legacy[0x400:SEV_ES_SAVE_AREA_SIZE])


def test_vmsa_pages() -> None:
    pages = vmsa_pages(3, 0x0080B004)
    assert len(pages) == 3 and pages[1] == pages[2] != pages[0]
    assert vmsa_pages(1, 0x0080B004) == pages[:1]
    with pytest.raises(InputError):
        vmsa_pages(0, 0x0080B004)
    with pytest.raises(InputError):
        build_vmsa(2**32)
    with pytest.raises(InputError, match="CPUID signature must fit 32 bits"):
        build_vmsa(BSP_RESET_EIP, cpu_signature=1 << 32)


def test_ovmf_vmsa_pages_read_the_ap_eip() -> None:
    block = (0x0080A004).to_bytes(4, "little")
    table = block + (len(block) + 18).to_bytes(2, "little") + SEV_ES_RESET_BLOCK_GUID.bytes_le
    image = bytes(4096) + table + (len(table) + 18).to_bytes(2, "little") + OVMF_TABLE_FOOTER_GUID.bytes_le
    image += bytes(32)  # the reset vector area
    pages = ovmf_vmsa_pages(image, 2, cpu_signature=0xA00F11)
    assert pages == vmsa_pages(2, 0x0080A004, cpu_signature=0xA00F11)
    assert SevEsSaveArea.decode(pages[1]).cs_base == 0x800000
    with pytest.raises(LayoutError, match="no OVMF footer table"):
        ovmf_vmsa_pages(bytes(64 << 10), 2, cpu_signature=0xA00F11)
