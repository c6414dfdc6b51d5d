"""OVMF as QEMU/KVM launch it (sevemu.hypervisor.ovmf) and the string I/O KVM emulates (emulate.py).

Debian's ``ovmf`` images are used when installed (skipped otherwise); the layout checks also run on
a synthetic image."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from sevemu.errors import InputError, LayoutError
from sevemu.hw.svm import VmExit
from sevemu.hypervisor.emulate import string_io, translate_gva
from sevemu.hypervisor.ovmf import FOUR_GIB, OvmfSectionType, parse_ovmf, snp_cpuid_table
from sevemu.hypervisor.vm import VmKind
from sevemu.scenario import build_machine

OVMF = Path("/usr/share/ovmf/OVMF.fd")
OVMF_4M = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
needs_ovmf = pytest.mark.skipif(not OVMF.is_file(), reason="Debian's ovmf is not installed (/usr/share/ovmf/OVMF.fd)")


def _footer(entries: list[tuple[str, bytes]], size: int = 0x10000) -> bytearray:
    table = b""
    for guid, data in entries:
        table += data + (len(data) + 18).to_bytes(2, "little") + uuid.UUID(guid).bytes_le
    table += (len(table) + 18).to_bytes(2, "little") + uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    img = bytearray(size)
    img[size - 32 - len(table) : size - 32] = table
    return img


def test_synthetic_image_without_metadata_runs_plain_only() -> None:
    img = parse_ovmf(bytes(_footer([])))
    assert img.gpa == FOUR_GIB - 0x10000 and img.sections == () and img.ap_reset_eip is None
    img.check_mode("plain")
    img.check_mode("sev")
    for mode in ("sev-es", "snp"):
        with pytest.raises(InputError, match="no SEV metadata"):
            img.check_mode(mode)
    with pytest.raises(InputError, match="unknown mode"):
        img.check_mode("tdx")


def test_bad_images_are_refused_clearly() -> None:
    with pytest.raises(InputError, match="4 KiB pages"):
        parse_ovmf(b"\0" * 1000)
    bad = _footer([("dc886566-984a-4798-a75e-5585a7bf67cc", (0x100).to_bytes(4, "little"))])
    with pytest.raises(LayoutError, match="ASEV"):
        parse_ovmf(bytes(bad))
    broken = _footer([])
    broken[0x10000 - 32 - 18 : 0x10000 - 32 - 16] = (0xFFFF).to_bytes(2, "little")
    with pytest.raises(LayoutError, match="does not fit"):
        parse_ovmf(bytes(broken))


@needs_ovmf
def test_debian_ovmf_layout() -> None:
    img = parse_ovmf(OVMF.read_bytes())
    assert img.gpa == 0xFFE0_0000
    assert img.ap_reset_eip == 0x80B004
    assert img.section(OvmfSectionType.CPUID) is not None and img.section(OvmfSectionType.CPUID).gpa == 0x80E000
    assert img.section(OvmfSectionType.SNP_SECRETS).gpa == 0x80D000  # type: ignore[union-attr]
    for mode in ("plain", "sev", "sev-es", "snp"):
        img.check_mode(mode)


@pytest.mark.skipif(not OVMF_4M.is_file(), reason="Debian's ovmf is not installed (OVMF_CODE_4M.fd)")
def test_code_4m_image_is_refused_for_es_and_snp() -> None:
    img = parse_ovmf(OVMF_4M.read_bytes())
    img.check_mode("plain")
    with pytest.raises(InputError, match="OVMF_CODE_4M"):
        img.check_mode("sev-es")


def test_cpuid_page_passes_the_firmware_check() -> None:
    from sevemu.firmware.snp.cpuid import sanitize_cpuid_page
    from sevemu.hw.profiles import profile

    m = build_machine("milan", seed="ovmf-cpuid", init=False)
    page = snp_cpuid_table(m.hv.cpuid)
    count = int.from_bytes(page[:4], "little")
    assert 30 < count <= 64  # the standard and extended leaves up to the part's maxima
    assert sanitize_cpuid_page(profile("milan"), page) is None


def test_string_io_of_a_plain_guest_is_emulated_through_its_page_tables() -> None:
    m = build_machine("milan", seed="ovmf-strio")
    vm = m.hv.create_vm("strio", 4 << 20, VmKind.PLAIN)
    v = vm.add_vcpu()
    vm.state = vm.state.RUNNING
    vm.back_range(0, 4 << 20)
    # long-mode tables: PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> 2 MiB page at GPA 0x200000 for GVA 0x40200000
    vm.host_write(0x1000, (0x2000 | 3).to_bytes(8, "little"))
    vm.host_write(0x2000 + 1 * 8, (0x3000 | 3).to_bytes(8, "little"))
    vm.host_write(0x3000 + 1 * 8, (0x200000 | 0x83).to_bytes(8, "little"))
    v.vmcb.cr0, v.vmcb.cr3, v.vmcb.cr4, v.vmcb.efer = 0x8000_0011, 0x1000, 0x20, 0x500
    assert translate_gva(vm, v.vmcb.cr0, v.vmcb.cr3, v.vmcb.cr4, v.vmcb.efer, 0x4020_0123) == 0x200123
    assert translate_gva(vm, v.vmcb.cr0, v.vmcb.cr3, v.vmcb.cr4, v.vmcb.efer, 0x8000_0000) is None
    data = iter(b"QEMU")
    v.vmcb.regs.update(rdi=0x4020_0100, rcx=4)
    v.vmcb.next_rip = 0x1234
    info1 = (0x511 << 16) | 0x200 | 0x10 | 8 | 4 | 1  # port 0x511, A64, 8-bit, REP, STR, IN
    why = string_io(vm, v, VmExit(0x7B, info1, 0x1234), lambda _vm, port, size: next(data), lambda *a: None)
    assert why is None
    assert vm.host_read(0x200100, 4) == b"QEMU"
    assert v.vmcb.regs["rdi"] == 0x4020_0104 and v.vmcb.regs["rcx"] == 0 and v.vmcb.rip == 0x1234
    out: list[int] = []
    v.vmcb.regs.update(rsi=0x4020_0100, rcx=2)
    info1 = (0x402 << 16) | 0x200 | 0x10 | 8 | 4  # OUTSB, REP
    assert string_io(vm, v, VmExit(0x7B, info1, 0), lambda *a: 0, lambda _vm, p, s, val: out.append(val)) is None
    assert bytes(out) == b"QE"
    v.vmcb.regs.update(rdi=0x8000_0000, rcx=1)
    why = string_io(vm, v, VmExit(0x7B, (0x511 << 16) | 0x200 | 0x10 | 4 | 1, 0), lambda *a: 0, lambda *a: None)
    assert why is not None and "not mapped" in why


def test_string_io_of_an_sev_guest_is_refused() -> None:
    m = build_machine("milan", seed="ovmf-strio-sev")
    vm = m.hv.create_vm("strio", 4 << 20, VmKind.SEV)
    v = vm.add_vcpu()
    why = string_io(vm, v, VmExit(0x7B, (0x511 << 16) | 0x10 | 4 | 1, 0), lambda *a: 0, lambda *a: None)
    assert why is not None and "encrypted" in why
