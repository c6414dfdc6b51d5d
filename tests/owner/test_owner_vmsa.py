"""Initial SEV-ES VMSAs (APM2 15.35; QEMU target/i386/sev.c) and the CPUID signature."""

from __future__ import annotations

import pytest

from sevemu.abi.vmsa import SEV_ES_SAVE_AREA_SIZE, VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.errors import InputError
from sevemu.owner.vmsa import BSP_RESET_EIP, KvmFpuReset, build_vmsa, cpuid_signature, vmsa_pages


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


def test_bsp_reset_state() -> None:
    vmsa = build_vmsa(BSP_RESET_EIP, cpu_signature=0xA00F11)
    assert (vmsa.cs_selector, vmsa.cs_base, vmsa.rip) == (0xF000, 0xFFFF0000, 0xFFF0)
    assert (vmsa.mxcsr, vmsa.x87_fcw) == (0x1F80, 0x037F)
    assert vmsa.rdx == 0xA00F11 and vmsa.xcr0 == 1 and vmsa.efer == 0x1000
    for seg in ("es", "ss", "ds", "fs", "gs"):
        assert (getattr(vmsa, f"{seg}_attrib"), getattr(vmsa, f"{seg}_limit")) == (0x93, 0xFFFF)
    page = vmsa.encode()
    assert len(page) == VMSA_PAGE_SIZE and not any(page[SEV_ES_SAVE_AREA_SIZE:])
    assert SevEsSaveArea.decode(page) == vmsa


def test_ap_reset_state_and_features() -> None:
    vmsa = build_vmsa(0x0080B004, sev_features=1 << 5, fpu=KvmFpuReset.KVM_2022)
    assert (vmsa.cs_base, vmsa.rip, vmsa.sev_features) == (0x800000, 0xB004, 0x20)
    assert (vmsa.mxcsr, vmsa.x87_fcw) == (0, 0)


def test_vmsa_pages() -> None:
    pages = vmsa_pages(3, 0x0080B004)
    assert len(pages) == 3 and pages[1] == pages[2] != pages[0]
    assert vmsa_pages(1, 0x0080B004) == pages[:1]
    with pytest.raises(InputError):
        vmsa_pages(0, 0x0080B004)
    with pytest.raises(InputError):
        build_vmsa(2**32)
