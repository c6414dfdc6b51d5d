"""SEV-ES layouts and constants: the GHCB (:mod:`sevemu.abi.ghcb`), the VMCB control fields
(:mod:`sevemu.abi.vmcb`) and SEV_FEATURES (:mod:`sevemu.abi.vmsa`), against Linux
``arch/x86/include/asm/svm.h``, ``sev-common.h`` and ``uapi/asm/svm.h`` (values written from the
sources, not from the declarations)."""

from __future__ import annotations

import pytest

from sevemu.abi import cpuid, ghcb, vmcb, vmsa
from sevemu.abi.struct import field_span
from sevemu.errors import LayoutError

# struct ghcb_save_area / struct ghcb offsets (Linux BUILD_BUG_RESERVED_OFFSET list and field order)
GHCB_FIELDS = {
    "cpl": (0x0CB, 1), "xss": (0x140, 8), "dr7": (0x160, 8), "rip": (0x178, 8), "rsp": (0x1D8, 8),
    "rax": (0x1F8, 8), "rcx": (0x308, 8), "rdx": (0x310, 8), "rbx": (0x318, 8), "rbp": (0x328, 8),
    "rsi": (0x330, 8), "rdi": (0x338, 8), "r8": (0x340, 8), "r15": (0x378, 8), "sw_exit_code": (0x390, 8),
    "sw_exit_info_1": (0x398, 8), "sw_exit_info_2": (0x3A0, 8), "sw_scratch": (0x3A8, 8), "xcr0": (0x3E8, 8),
    "valid_bitmap": (0x3F0, 16), "x87_state_gpa": (0x400, 8), "shared_buffer": (0x800, 2032),
    "protocol_version": (0xFFA, 2), "ghcb_usage": (0xFFC, 4),
}


@pytest.mark.parametrize(("name", "span"), sorted(GHCB_FIELDS.items()))
def test_ghcb_offsets(name: str, span: tuple[int, int]) -> None:
    assert field_span(ghcb.Ghcb, name) == span


def test_ghcb_round_trip_and_ignored_reserved_bytes() -> None:
    g = ghcb.Ghcb(rax=0x1234, sw_exit_code=ghcb.SwExitCode.CPUID, valid_bitmap=ghcb.valid_bitmap("rax", "sw_exit_code"),
                  shared_buffer=b"\xaa" * ghcb.GHCB_SHARED_BUF_SIZE, protocol_version=2)
    page = g.encode()
    assert len(page) == 4096 and page[0x1F8:0x200] == (0x1234).to_bytes(8, "little")
    junk = bytearray(page)
    junk[0x000] = junk[0x408] = junk[0xFF0] = 0x5A  # reserved: ignored by the hypervisor (model choice)
    back = ghcb.Ghcb.decode(bytes(junk))
    assert back == g and back.encode() == page
    assert back.is_valid("rax") and back.is_valid("sw_exit_code") and not back.is_valid("rbx")


def test_valid_bitmap() -> None:
    assert ghcb.GHCB_VALID_BITS["rax"] == 63  # 0x1F8 / 8
    assert ghcb.GHCB_VALID_BITS["sw_exit_code"] == 0x390 // 8 and ghcb.GHCB_VALID_BITS["cpl"] == 0xCB // 8
    bm = ghcb.valid_bitmap("rax", "rcx", "sw_exit_info_1")
    assert int.from_bytes(bm, "little") == 1 << 63 | 1 << 0x61 | 1 << 0x73
    assert ghcb.valid_fields(bm) == {"rax", "rcx", "sw_exit_info_1"}
    with pytest.raises(LayoutError, match="no field 'x87_state_gpa' with a valid bit"):
        ghcb.valid_bitmap("x87_state_gpa")
    with pytest.raises(LayoutError, match="marks quadwords of no field"):
        ghcb.valid_fields((1 << 2).to_bytes(16, "little"))
    with pytest.raises(LayoutError, match="expected 16 bytes"):
        ghcb.valid_fields(b"\x00")


# --- MSR protocol: values as Linux's GHCB_MSR_* macros build them -------------------------------


def test_msr_protocol_encodings() -> None:
    # GHCB_MSR_SEV_INFO(max, min, cbit)
    assert ghcb.MsrSevInfoResp(cbit=51, min_protocol=1, max_protocol=2).to_int() == 2 << 48 | 1 << 32 | 51 << 24 | 1
    # GHCB_CPUID_REQ(fn, reg)
    assert ghcb.MsrCpuidReq(reg=1, function=0x8000_001F).to_int() == 0x004 | 1 << 30 | 0x8000_001F << 32
    assert ghcb.MsrCpuidResp(value=0xDEADBEEF).to_int() == 0x005 | 0xDEADBEEF << 32
    # GHCB_MSR_REG_GPA_REQ_VAL(gfn), GHCB_MSR_PSC_REQ_GFN(gfn, op)
    assert ghcb.MsrRegGpaReq(gfn=0x12345).to_int() == 0x12345 << 12 | 0x012
    assert ghcb.MsrPscReq(gfn=0xABCDE, op=ghcb.PscOp.SHARED).to_int() == 2 << 52 | 0xABCDE << 12 | 0x014
    assert ghcb.MsrPscResp(error=7).to_int() == 7 << 32 | 0x015
    # GHCB_SEV_TERM_REASON(set, val) | GHCB_MSR_TERM_REQ
    term = ghcb.MsrTermReq(reason_set=ghcb.TermReasonSet.LINUX, reason_code=ghcb.LinuxTermReason.PVALIDATE)
    assert term.to_int() == 0x100 | 1 << 12 | 2 << 16
    assert ghcb.MsrHvFtResp(features=ghcb.HvFeature.SNP | ghcb.HvFeature.SNP_AP_CREATION).to_int() == 0b11 << 12 | 0x81
    assert ghcb.MsrVmplReq(vmpl=2).to_int() == 2 << 32 | 0x016


def test_decode_ghcb_msr() -> None:
    msg = ghcb.decode_ghcb_msr(0x8000_001F << 32 | 2 << 30 | 0x004)
    assert msg == ghcb.MsrCpuidReq(reg=2, function=0x8000_001F)
    assert ghcb.decode_ghcb_msr(0x002) == ghcb.MsrSevInfoReq()
    for code, cls in ghcb.GHCB_MSR_LAYOUTS.items():
        assert cls().to_int() == code  # each message's default GHCBInfo is its own code
        assert ghcb.decode_ghcb_msr(int(code)) == cls()
    with pytest.raises(LayoutError, match="unknown GHCBInfo 0x003"):
        ghcb.decode_ghcb_msr(0x003)
    with pytest.raises(LayoutError, match="unknown GHCBInfo 0x000"):
        ghcb.decode_ghcb_msr(0x7_F000)  # a GHCB GPA, not a protocol message
    with pytest.raises(LayoutError, match=r"MsrCpuidReq: reserved bits 12 are not zero"):
        ghcb.decode_ghcb_msr(0x004 | 1 << 12)
    with pytest.raises(LayoutError, match=r"MsrTermReq: reserved bits 40 are not zero"):
        ghcb.decode_ghcb_msr(0x100 | 1 << 40)
    with pytest.raises(LayoutError, match="not a 64-bit"):
        ghcb.decode_ghcb_msr(1 << 64)


# --- NAE codes, PSC descriptor ------------------------------------------------------------------


def test_nae_exit_codes() -> None:
    c = ghcb.SwExitCode
    assert (c.MMIO_READ, c.MMIO_WRITE, c.AP_HLT_LOOP, c.AP_JUMP_TABLE, c.UNSUPPORTED_EVENT) == (
        0x8000_0001, 0x8000_0002, 0x8000_0004, 0x8000_0005, 0x8000_FFFF)  # Linux uapi SVM_VMGEXIT_*
    assert (c.PSC, c.GUEST_REQUEST, c.EXT_GUEST_REQUEST, c.AP_CREATION, c.HV_FEATURES, c.TERM_REQUEST) == (
        0x8000_0010, 0x8000_0011, 0x8000_0012, 0x8000_0013, 0x8000_FFFD, 0x8000_FFFE)
    assert (c.CPUID, c.IOIO, c.MSR, c.VMMCALL) == (0x72, 0x7B, 0x7C, 0x81)
    assert [int(e) for e in ghcb.GhcbError] == [1, 2, 3, 4, 5, 6]
    assert ghcb.ApCreationInfo(op=ghcb.ApCreationOp.CREATE, apic_id=3).to_int() == 3 << 32 | 1
    assert ghcb.TermRequestInfo(reason_set=1, reason_code=3).to_int() == 1 | 3 << 4
    assert ghcb.INSN_VMGEXIT == b"\xf3\x0f\x01\xd9" and ghcb.VC_VECTOR == 29


def test_psc_descriptor() -> None:
    assert ghcb.PscDesc.SIZE == 8 + 253 * 8 == ghcb.GHCB_SHARED_BUF_SIZE
    entries = tuple(ghcb.PscEntry(gfn=0x100 + i, operation=ghcb.PscOp.PRIVATE, pagesize=i & 1)
                    for i in range(ghcb.PSC_MAX_ENTRY))
    desc = ghcb.PscDesc(hdr=ghcb.PscHeader(cur_entry=0, end_entry=252), entries=entries)
    raw = desc.encode()
    # struct psc_entry: cur_page:12, gfn:40, operation:4, pagesize:1
    assert int.from_bytes(raw[8 + 8 * 5 : 16 + 8 * 5], "little") == (0x105 << 12 | 1 << 52 | 1 << 56)
    assert raw[2:4] == (252).to_bytes(2, "little")
    assert ghcb.PscDesc.decode(raw) == desc
    bad = bytearray(raw)
    bad[8 + 8 * 7 + 7] |= 0x80  # entry 7, bit 63: reserved
    with pytest.raises(LayoutError, match=r"PscDesc.entries at 0x8 \[7\]: PscEntry: reserved bits 63"):
        ghcb.PscDesc.decode(bytes(bad))
    bad = bytearray(raw)
    bad[5] = 1  # header reserved u32
    with pytest.raises(LayoutError, match=r"PscDesc.hdr at 0x0: PscHeader: reserved bytes 0x4..0x7"):
        ghcb.PscDesc.decode(bytes(bad))
    with pytest.raises(LayoutError, match=r"PscDesc.entries at 0x8 \[3\]: PscEntry.operation \(bits 55:52\): 16"):
        ghcb.PscDesc(entries=(*entries[:3], ghcb.PscEntry(operation=16), *entries[4:])).encode()
    with pytest.raises(LayoutError, match="expected 253 elements, got tuple of length 254"):
        ghcb.PscDesc(entries=(*entries, ghcb.PscEntry())).encode()


def test_ghcb_shared_buffer_carries_a_psc_descriptor() -> None:
    desc = ghcb.PscDesc(hdr=ghcb.PscHeader(end_entry=0), entries=(ghcb.PscEntry(gfn=7, operation=2),)
                        + (ghcb.PscEntry(),) * 252)
    page = ghcb.Ghcb(shared_buffer=desc.encode(), sw_exit_code=ghcb.SwExitCode.PSC)
    assert ghcb.PscDesc.decode(ghcb.Ghcb.decode(page.encode()).shared_buffer) == desc


# --- VMCB control area and automatic exits ------------------------------------------------------


def test_vmcb_control_offsets() -> None:
    c = vmcb.VmcbControl
    # struct vmcb_control_area, field by field
    assert (c.ASID, c.EXITCODE, c.EXITINFO1, c.EXITINFO2, c.EXITINTINFO, c.MISC_CTL) == (0x58, 0x70, 0x78, 0x80, 0x88,
                                                                                        0x90)
    assert (c.GHCB_GPA, c.EVENTINJ, c.NESTED_CR3, c.MISC_CTL2, c.NEXT_RIP, c.INSN_LEN) == (0xA0, 0xA8, 0xB0, 0xB8, 0xC8,
                                                                                           0xD0)
    assert (c.AVIC_BACKING_PAGE, c.VMSA_PA, c.BUS_LOCK_COUNTER, c.ALLOWED_SEV_FEATURES, c.GUEST_SEV_FEATURES) == (
        0xE0, 0x108, 0x120, 0x138, 0x140)
    assert (vmcb.MiscCtl.NP_ENABLE, vmcb.MiscCtl.SEV_ENABLE, vmcb.MiscCtl.SEV_ES_ENABLE) == (1, 2, 4)
    assert vmcb.ALLOWED_SEV_FEATURES_VALID == 1 << 63 and vmcb.VMCB_CONTROL_AREA_SIZE == 1024


@pytest.mark.parametrize(("code", "info1", "automatic"), [
    (0x60, 0, True), (0x78, 0, True), (0x403, 0, True), (0x93, 0, True), (-1, 0, True),
    (0x72, 0, False), (0x7B, 0, False), (0x7C, 0, False), (0x81, 0, False),
    (0x400, 0x6, True), (0x400, 0xE, False),  # NPF: automatic unless a reserved-bit (MMIO) fault
])
def test_automatic_exits(code: int, info1: int, automatic: bool) -> None:
    assert vmcb.is_automatic_exit(code, info1) is automatic


def test_ioio_exit_info() -> None:
    out = vmcb.IoioExitInfo(type_in=False, sz8=True, a64=True, port=0x3F8)
    assert out.to_int() == 1 << 4 | 1 << 9 | 0x3F8 << 16
    assert vmcb.IoioExitInfo.from_int(0x3F8 << 16 | 1 | 1 << 6).sz32
    with pytest.raises(LayoutError, match="reserved bits 1 are not zero"):
        vmcb.IoioExitInfo.from_int(0b10)


# --- SEV_FEATURES <-> SEV_STATUS ----------------------------------------------------------------


def test_sev_features_mirror_sev_status() -> None:
    status = {m.name: int(m) for m in cpuid.SevStatus}
    for feature in vmsa.SevFeatures:
        assert status[feature.name] == int(feature) << 2, feature.name
    assert len(vmsa.SevFeatures) == len(status) - 2  # all but SEV_ENABLED / SEV_ES_ENABLED
    assert vmsa.sev_status_of(vmsa.SevFeatures.SNP_ACTIVE | vmsa.SevFeatures.DEBUG_SWAP) == 0b11 | 1 << 2 | 1 << 7
    assert vmsa.sev_status_of(0) == cpuid.SevStatus.SEV_ENABLED | cpuid.SevStatus.SEV_ES_ENABLED
