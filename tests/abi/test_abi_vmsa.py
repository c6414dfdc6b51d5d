"""The VMSA layout (APM2 15.35, Linux ``struct sev_es_save_area``): offsets, size, decode/encode on real pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevemu.abi.struct import field_span
from sevemu.abi.vmsa import SEGMENT_REGISTERS, SEV_ES_SAVE_AREA_SIZE, VMSA_PAGE_SIZE, SevEsSaveArea, VmcbSeg
from sevemu.errors import LayoutError

# Offsets checked against Linux's BUILD_BUG_RESERVED_OFFSET list (arch/x86/include/asm/svm.h).
OFFSETS = {
    "pl0_ssp": 0x0A0, "u_cet": 0x0C0, "vmpl": 0x0CA, "cpl": 0x0CB, "efer": 0x0D0, "xss": 0x140,
    "cr4": 0x148, "cr0": 0x158, "dr7": 0x160, "rflags": 0x170, "rip": 0x178, "dr3_addr_mask": 0x1B8,
    "rsp": 0x1D8, "rax": 0x1F8, "cr2": 0x240, "g_pat": 0x268, "last_excp_to": 0x290, "pkru": 0x2E8,
    "tsc_aux": 0x2EC, "tsc_scale": 0x2F0, "tsc_offset": 0x2F8, "rcx": 0x308, "rdx": 0x310, "rbp": 0x328,
    "r15": 0x378, "guest_exit_info_1": 0x390, "sev_features": 0x3B0, "virtual_tom": 0x3C8,
    "xcr0": 0x3E8, "x87_dp": 0x400, "mxcsr": 0x408, "x87_fcw": 0x410, "x87_rip": 0x418,
    "fpreg_x87": 0x420, "fpreg_xmm": 0x470, "fpreg_ymm": 0x570,
}


@pytest.mark.parametrize(("name", "offset"), sorted(OFFSETS.items()))
def test_offsets(name: str, offset: int) -> None:
    assert SevEsSaveArea.offset_of(name) == offset


def test_segments_and_size() -> None:
    assert SevEsSaveArea.SIZE == VMSA_PAGE_SIZE and VmcbSeg.SIZE == 16
    for i, seg in enumerate(SEGMENT_REGISTERS):
        for sub in ("selector", "attrib", "limit", "base"):
            off, size = field_span(SevEsSaveArea, f"{seg}_{sub}")
            assert (off - 16 * i, size) == field_span(VmcbSeg, sub)
    off, size = field_span(SevEsSaveArea, "fpreg_ymm")
    assert off + size == SEV_ES_SAVE_AREA_SIZE


def test_reserved_bytes_must_be_zero() -> None:
    page = bytearray(VMSA_PAGE_SIZE)
    page[0x320] = 1  # reserved_0x320 (rsp lives at 0x1d8)
    with pytest.raises(LayoutError):
        SevEsSaveArea.decode(bytes(page))
    page[0x320] = 0
    page[0xFFF] = 1
    with pytest.raises(LayoutError):
        SevEsSaveArea.decode(bytes(page))


@pytest.mark.parametrize("name", ["sevctl_vmsa0.bin", "sevctl_vmsa1.bin"])
def test_real_pages_round_trip(vectors: Path, name: str) -> None:
    page = (vectors / "sev-legacy-launch" / name).read_bytes()
    assert SevEsSaveArea.decode(page).encode() == page
