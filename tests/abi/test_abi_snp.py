"""SEV-SNP layouts (:mod:`sevemu.abi.snp`, :mod:`sevemu.abi.rmp`) against the public sources.

The expected tables are written from Linux ``include/linux/psp-sev.h`` / ``include/uapi/linux/psp-sev.h``
(``struct sev_data_snp_*``, ``sev_user_data_snp_*``), ``arch/x86/include/asm/sev.h``,
``arch/x86/virt/svm/sev.c`` and sev-tool ``src/sevapi.h``, independently of the declarations.
"""

from __future__ import annotations

import hashlib

import pytest

from sevemu.abi import rmp, snp
from sevemu.abi.commands import SNP_COMMANDS, CommandId
from sevemu.abi.struct import Struct, bit_span, field_span, layout_fields
from sevemu.errors import LayoutError

# layout -> (size, {field: (offset, size)})
BYTE_LAYOUTS: dict[type[Struct], tuple[int, dict[str, tuple[int, int]]]] = {
    snp.SnpAddrCmd: (0x08, {"address": (0x00, 8)}),
    snp.SnpInitExCmd: (0x40, {"flags": (0x00, 4), "list_paddr": (0x08, 8), "max_snp_asid": (0x10, 2)}),
    snp.SnpShutdownExCmd: (0x08, {"len": (0x00, 4), "flags": (0x04, 4)}),
    snp.SnpPlatformStatus: (0x20, {"api_major": (0, 1), "api_minor": (1, 1), "state": (2, 1), "init": (3, 1),
                                   "build_id": (4, 4), "flags": (8, 4), "guest_count": (0x0C, 4),
                                   "current_tcb": (0x10, 8), "reported_tcb": (0x18, 8)}),
    snp.SnpConfigCmd: (0x40, {"reported_tcb": (0x00, 8), "flags": (0x08, 4)}),
    snp.SnpVlekLoadCmd: (0x10, {"len": (0, 4), "vlek_wrapped_version": (4, 1), "vlek_wrapped_address": (8, 8)}),
    snp.SnpFeatureInfoCmd: (0x10, {"length": (0, 4), "ecx_in": (4, 4), "feature_info_paddr": (8, 8)}),
    snp.SnpFeatureInfo: (0x10, {"eax": (0, 4), "ebx": (4, 4), "ecx": (8, 4), "edx": (0x0C, 4)}),
    snp.SnpCommitCmd: (0x04, {"len": (0, 4)}),
    snp.SnpActivateCmd: (0x0C, {"gctx_paddr": (0, 8), "asid": (8, 4)}),
    snp.SnpActivateExCmd: (0x20, {"ex_len": (0, 4), "gctx_paddr": (8, 8), "asid": (0x10, 4), "num_ids": (0x14, 4),
                                  "ids_paddr": (0x18, 8)}),
    snp.SnpGuestStatusCmd: (0x10, {"gctx_paddr": (0, 8), "address": (8, 8)}),
    snp.SnpGuestStatus: (0x20, {"policy": (0, 8), "asid": (8, 4), "state": (0x0C, 1)}),
    snp.SnpGuestRequestCmd: (0x18, {"gctx_paddr": (0, 8), "req_paddr": (8, 8), "res_paddr": (0x10, 8)}),
    snp.SnpDbgCmd: (0x18, {"gctx_paddr": (0, 8), "src_addr": (8, 8), "dst_addr": (0x10, 8)}),
    snp.SnpPageCmd: (0x08, {"paddr": (0, 8)}),
    snp.SnpLaunchStartCmd: (0x30, {"gctx_paddr": (0, 8), "policy": (8, 8), "ma_gctx_paddr": (0x10, 8),
                                   "flags": (0x18, 4), "desired_tsc_khz": (0x1C, 4), "gosvw": (0x20, 16)}),
    snp.SnpLaunchUpdateCmd: (0x20, {"gctx_paddr": (0, 8), "flags": (8, 4), "address": (0x10, 8),
                                    "vmpl1_perms": (0x19, 1), "vmpl2_perms": (0x1A, 1), "vmpl3_perms": (0x1B, 1)}),
    snp.SnpLaunchFinishCmd: (0x40, {"gctx_paddr": (0, 8), "id_block_paddr": (8, 8), "id_auth_paddr": (0x10, 8),
                                    "flags": (0x18, 8), "host_data": (0x20, 32)}),
    snp.PageInfo: (0x70, {"digest_cur": (0, 48), "contents": (0x30, 48), "length": (0x60, 2), "page_type": (0x62, 1),
                          "imi_page": (0x63, 1), "vmpl3_perms": (0x64, 1), "vmpl2_perms": (0x65, 1),
                          "vmpl1_perms": (0x66, 1), "gpa": (0x68, 8)}),
    snp.IdBlock: (0x60, {"ld": (0, 48), "family_id": (0x30, 16), "image_id": (0x40, 16), "version": (0x50, 4),
                         "guest_svn": (0x54, 4), "policy": (0x58, 8)}),
    snp.IdAuthInfo: (0x1000, {"id_key_algo": (0, 4), "auth_key_algo": (4, 4), "id_block_sig": (0x40, 0x200),
                              "id_key": (0x240, 0x404), "id_key_sig": (0x680, 0x200), "author_key": (0x880, 0x404)}),
    snp.SecretsOsArea: (0x60, {"msg_seqno_0": (0, 4), "msg_seqno_1": (4, 4), "msg_seqno_2": (8, 4),
                               "msg_seqno_3": (0x0C, 4), "ap_jump_table_pa": (0x10, 8), "guest_usage": (0x40, 32)}),
    snp.SecretsPage: (0x1000, {"version": (0, 4), "flags": (4, 4), "fms": (8, 4), "gosvw": (0x10, 16),
                               "vmpck0": (0x20, 32), "vmpck1": (0x40, 32), "vmpck2": (0x60, 32), "vmpck3": (0x80, 32),
                               "os_area": (0xA0, 0x60), "vmsa_tweak_bitmap": (0x100, 64), "svsm_base": (0x140, 8),
                               "svsm_size": (0x148, 8), "svsm_caa": (0x150, 8), "svsm_max_version": (0x158, 4),
                               "svsm_guest_vmpl": (0x15C, 1), "tsc_factor": (0x160, 4)}),
    snp.SnpCpuidFunction: (0x30, {"eax_in": (0, 4), "ecx_in": (4, 4), "xcr0_in": (8, 8), "xss_in": (0x10, 8),
                                  "eax": (0x18, 4), "ebx": (0x1C, 4), "ecx": (0x20, 4), "edx": (0x24, 4)}),
    snp.SnpCpuidTable: (0xC10, {"count": (0, 4), "fn": (0x10, 64 * 0x30)}),
    snp.TcbVersion: (8, {"boot_loader": (0, 1), "tee": (1, 1), "snp": (6, 1), "microcode": (7, 1)}),
    snp.TcbVersionTurin: (8, {"fmc": (0, 1), "boot_loader": (1, 1), "tee": (2, 1), "snp": (3, 1), "microcode": (7, 1)}),
    rmp.RmpEntryRaw: (16, {"lo": (0, 8), "vmpl_perms": (8, 4)}),
    rmp.RmpReadEntry: (16, {"gpa": (0, 8), "assigned": (8, 1), "pagesize": (9, 1), "immutable": (0x0A, 1),
                            "asid": (0x0C, 4)}),
    rmp.RmpUpdateState: (16, {"gpa": (0, 8), "assigned": (8, 1), "pagesize": (9, 1), "immutable": (0x0A, 1),
                              "asid": (0x0C, 4)}),
}

# bit layout -> (size, {field: (hi, lo)})
BIT_LAYOUTS: dict[type[Struct], tuple[int, dict[str, tuple[int, int]]]] = {
    snp.SnpPolicy: (8, {"abi_minor": (7, 0), "abi_major": (15, 8), "smt": (16, 16), "rsvd_mbo": (17, 17),
                        "migrate_ma": (18, 18), "debug": (19, 19), "single_socket": (20, 20), "cxl_allow": (21, 21),
                        "mem_aes_256_xts": (22, 22), "rapl_dis": (23, 23), "ciphertext_hiding_dram": (24, 24),
                        "page_swap_disable": (25, 25)}),
    snp.SnpInitExFlags: (4, {"init_rmp": (0, 0), "list_paddr_en": (1, 1), "rapl_dis": (2, 2),
                             "ciphertext_hiding_en": (3, 3), "tio_en": (4, 4)}),
    snp.SnpShutdownExFlags: (4, {"iommu_snp_shutdown": (0, 0), "x86_snp_shutdown": (1, 1)}),
    snp.SnpPlatformInit: (1, {"is_rmp_initialized": (0, 0), "alias_check_complete": (1, 1), "tio_en": (3, 3)}),
    snp.SnpPlatformFlags: (4, {"mask_chip_id": (0, 0), "mask_chip_key": (1, 1), "vlek_en": (2, 2),
                               "feature_info": (3, 3), "rapl_dis": (4, 4), "ciphertext_hiding_cap": (5, 5),
                               "ciphertext_hiding_en": (6, 6)}),
    snp.SnpConfigFlags: (4, {"mask_chip_id": (0, 0), "mask_chip_key": (1, 1)}),
    snp.SnpLaunchStartFlags: (4, {"ma_en": (0, 0), "imi_en": (1, 1)}),
    snp.SnpLaunchUpdateFlags: (4, {"page_size": (0, 0), "page_type": (3, 1), "imi_page": (4, 4)}),
    snp.SnpLaunchFinishFlags: (8, {"id_block_en": (0, 0), "auth_key_en": (1, 1), "vcek_disabled": (2, 2)}),
    snp.SecretsPageFlags: (4, {"imien": (0, 0)}),
    rmp.RmpEntryRawLo: (8, {"assigned": (0, 0), "pagesize": (1, 1), "immutable": (2, 2), "gpa": (50, 12),
                            "asid": (60, 51), "vmsa": (61, 61), "validated": (62, 62)}),
    rmp.RmpAdjustAttrs: (8, {"target_vmpl": (7, 0), "perm_mask": (15, 8), "vmsa": (16, 16)}),
    rmp.RmpReadPageSize: (1, {"pagesize": (0, 0), "hpage_region_status": (1, 1)}),
}


def _reserved_bytes(cls: type[Struct]) -> list[int]:
    size, fields = BYTE_LAYOUTS[cls]
    covered: set[int] = set()
    for off, n in fields.values():
        covered.update(range(off, off + n))
    return [i for i in range(size) if i not in covered]


@pytest.mark.parametrize("cls", list(BYTE_LAYOUTS), ids=lambda c: c.__name__)
def test_byte_layouts_match_the_sources(cls: type[Struct]) -> None:
    size, fields = BYTE_LAYOUTS[cls]
    assert cls.SIZE == size
    assert {f.name for f in layout_fields(cls)} == set(fields)
    for name, span in fields.items():
        assert field_span(cls, name) == span, name


@pytest.mark.parametrize("cls", [c for c in BYTE_LAYOUTS if c not in (snp.SecretsOsArea, snp.SecretsPage)],
                         ids=lambda c: c.__name__)
def test_reserved_bytes_refused(cls: type[Struct]) -> None:
    base = cls().encode()
    for i in _reserved_bytes(cls)[:: max(1, len(_reserved_bytes(cls)) // 64)]:
        bad = bytearray(base)
        bad[i] = 0x80
        with pytest.raises(LayoutError, match="reserved"):
            cls.decode(bytes(bad))


@pytest.mark.parametrize("cls", list(BIT_LAYOUTS), ids=lambda c: c.__name__)
def test_bit_layouts_match_the_sources(cls: type[Struct]) -> None:
    size, fields = BIT_LAYOUTS[cls]
    assert cls.SIZE == size
    assert {f.name for f in layout_fields(cls)} == set(fields)
    covered = 0
    for name, (hi, lo) in fields.items():
        assert bit_span(cls, name) == (hi, lo), name
        covered |= ((1 << (hi - lo + 1)) - 1) << lo
    assert cls.from_int(covered).to_int() == covered
    for b in range(8 * size):
        if not covered >> b & 1:
            with pytest.raises(LayoutError, match=f"reserved bits {b} are not zero"):
                cls.from_int(1 << b)


def test_secrets_page_guest_os_area_reserved_bytes_are_ignored() -> None:
    page = bytearray(snp.SecretsPage().encode())
    page[0xA0 + 0x18 : 0xA0 + 0x40] = b"\xee" * 40  # os_area rsvd[40]: the guest's
    decoded = snp.SecretsPage.decode(bytes(page))
    assert decoded.encode()[0xB8:0xE0] == bytes(40)
    page[0x164] = 1  # reserved remainder of the page
    with pytest.raises(LayoutError, match=r"SecretsPage: reserved bytes 0x164..0xfff"):
        snp.SecretsPage.decode(bytes(page))
    page[0x164] = 0
    page[0x15D] = 1
    with pytest.raises(LayoutError, match=r"reserved bytes 0x15d..0x15f"):
        snp.SecretsPage.decode(bytes(page))


def test_secrets_page_vmpcks() -> None:
    keys = [bytes([i]) * 32 for i in range(4)]
    page = snp.SecretsPage(vmpck0=keys[0], vmpck1=keys[1], vmpck2=keys[2], vmpck3=keys[3], fms=0xA00F11)
    back = snp.SecretsPage.decode(page.encode())
    assert [back.vmpck(i) for i in range(4)] == keys
    assert back.version == snp.SECRETS_PAGE_VERSION
    with pytest.raises(ValueError, match="VMPCK index 4"):
        back.vmpck(4)


def test_policy_values() -> None:
    assert snp.SnpPolicy().to_int() == 1 << 17  # reserved bit 17 is one by default
    qemu_default = snp.SnpPolicy(smt=True)
    assert qemu_default.to_int() == 0x30000
    p = snp.SnpPolicy.from_int(0x3001F | 1 << 19 | 2 << 8)
    assert (p.abi_minor, p.abi_major, p.smt, p.debug) == (0x1F, 2, True, True)
    with pytest.raises(LayoutError, match="reserved bits 26 are not zero"):
        snp.SnpPolicy.from_int(0x30000 | 1 << 26)
    with pytest.raises(LayoutError, match="reserved bits 63:26"):
        snp.SnpPolicy.from_int((1 << 64) - 1)


def test_launch_update_flags_and_reserved_bits() -> None:
    cmd = snp.SnpLaunchUpdateCmd(gctx_paddr=0x1000, flags=snp.SnpLaunchUpdateFlags(page_type=snp.SnpPageType.VMSA),
                                 address=0x5000, vmpl1_perms=0x1F)
    raw = cmd.encode()
    assert raw[8:12] == (snp.SnpPageType.VMSA << 1).to_bytes(4, "little") and raw[0x19] == 0x1F
    assert snp.SnpLaunchUpdateCmd.decode(raw) == cmd
    bad = bytearray(raw)
    bad[8] |= 1 << 5  # flags bit 5: reserved
    with pytest.raises(LayoutError, match=r"SnpLaunchUpdateCmd.flags at 0x8: SnpLaunchUpdateFlags: reserved bits 5"):
        snp.SnpLaunchUpdateCmd.decode(bytes(bad))
    with pytest.raises(LayoutError, match=r"page_type \(bits 3:1\): 8 does not fit 3 bit"):
        snp.SnpLaunchUpdateFlags(page_type=8).encode()


def test_tcb_versions_per_generation() -> None:
    milan = snp.TcbVersion.from_int(0x7308000000000003)  # virtee report_milan
    assert (milan.boot_loader, milan.tee, milan.snp, milan.microcode) == (3, 0, 8, 0x73)
    turin = snp.TcbVersionTurin.from_int(0x4700000002000100)  # oak turin_oc
    assert (turin.fmc, turin.boot_loader, turin.tee, turin.snp, turin.microcode) == (0, 1, 0, 2, 0x47)
    assert snp.tcb_layout("Milan") is snp.tcb_layout("genoa") is snp.TcbVersion
    assert snp.tcb_layout("Turin") is snp.TcbVersionTurin
    with pytest.raises(ValueError, match="Naples"):
        snp.tcb_layout("Naples")
    with pytest.raises(LayoutError, match=r"TcbVersion: reserved bytes 0x2..0x5"):
        snp.TcbVersion.from_int(0x4700000002000100)  # a Turin TCB is not a Milan one


def test_cpuid_table_array() -> None:
    fns = tuple(snp.SnpCpuidFunction(eax_in=0x8000_001F, eax=i) for i in range(snp.CPUID_COUNT_MAX))
    table = snp.SnpCpuidTable(count=64, fn=fns)
    raw = table.encode()
    assert raw[0x10 + 63 * 0x30 + 0x18] == 63
    assert snp.SnpCpuidTable.decode(raw) == table
    with pytest.raises(LayoutError, match=r"SnpCpuidTable.fn at 0x10: expected 64 elements, got tuple of length 65"):
        snp.SnpCpuidTable(fn=(*fns, snp.SnpCpuidFunction())).encode()
    bad = bytearray(raw)
    bad[0x10 + 5 * 0x30 + 0x28] = 1  # entry 5, reserved u64
    with pytest.raises(LayoutError, match=r"SnpCpuidTable.fn at 0x10 \[5\]: SnpCpuidFunction: reserved bytes 0x28"):
        snp.SnpCpuidTable.decode(bytes(bad))


def test_command_buffer_table() -> None:
    assert set(snp.SNP_COMMAND_BUFFERS) <= SNP_COMMANDS
    assert not set(snp.SNP_COMMAND_BUFFERS) & snp.SNP_COMMANDS_WITHOUT_BUFFER
    assert snp.SNP_COMMAND_BUFFERS[CommandId.SNP_LAUNCH_UPDATE] is snp.SnpLaunchUpdateCmd
    assert snp.SnpInitExCmd.SIZE == snp.SNP_INIT_EX_LENGTH and snp.SnpActivateExCmd().ex_len == 0x20
    assert snp.SnpShutdownExCmd().len == 8 and snp.SnpCommitCmd().len == 4


def test_id_auth_info_nests_the_key_and_signature_formats() -> None:
    assert snp.EcdsaPublicKey.SIZE == 0x404 and snp.EcdsaSignature.SIZE == 0x200
    key = snp.EcdsaPublicKey(curve=snp.EccCurve.P384, qx=b"\x01" * 72, qy=b"\x02" * 72)
    auth = snp.IdAuthInfo(id_key_algo=1, auth_key_algo=1, id_key=key)
    raw = auth.encode()
    assert raw[0x240:0x644] == key.encode()
    bad = bytearray(raw)
    bad[0x240 + 0x94] = 1  # id_key: reserved tail of the public key
    with pytest.raises(LayoutError, match=r"IdAuthInfo.id_key at 0x240: SevEcPubKey: reserved bytes 0x94"):
        snp.IdAuthInfo.decode(bytes(bad))


# --- the launch digest chain (PAGE_INFO), vectors computed with sev-snp-measure gctx.py --------

ZERO48 = bytes(48)


def _extend(ld: bytes, contents: bytes, page_type: snp.SnpPageType, gpa: int) -> bytes:
    info = snp.PageInfo(digest_cur=ld, contents=contents, page_type=page_type, gpa=gpa)
    raw = info.encode()
    assert len(raw) == 0x70 and raw[0x60:0x62] == b"\x70\x00"
    return hashlib.sha384(raw).digest()


def test_page_info_digest_normal_zero_page() -> None:
    ld = _extend(ZERO48, hashlib.sha384(bytes(4096)).digest(), snp.SnpPageType.NORMAL, 0)
    assert ld.hex() == ("9d13634b6014bb21cf059b2dc694e7bff01a8a7137041100cd2b695f3d10fb68"
                        "7267b97808b27f8f471d943bc6f53a20")


def test_page_info_digest_zero_page() -> None:
    ld = _extend(ZERO48, ZERO48, snp.SnpPageType.ZERO, 0x1000)
    assert ld.hex() == ("4bd4147976a1e7554c1c778a781affc1c672f1965a727ba16084989b7e356044"
                        "a28bbe585a2f75dac9356fa5ab78f061")


def test_page_info_digest_chain() -> None:
    ld = _extend(ZERO48, hashlib.sha384(bytes(range(256)) * 16).digest(), snp.SnpPageType.NORMAL, 0xFFC0_0000)
    ld = _extend(ld, ZERO48, snp.SnpPageType.SECRETS, 0x80_0000)
    ld = _extend(ld, ZERO48, snp.SnpPageType.CPUID, 0x80_1000)
    ld = _extend(ld, hashlib.sha384(bytes(4096)).digest(), snp.SnpPageType.VMSA, snp.VMSA_GPA)
    assert ld.hex() == ("bd86d5af8b924fc30e475aa214d850dca45a6fd3f86b08362f5a484c680639d4"
                        "6558d05b740884029cdd48e564e763c6")


def test_page_info_decodes_its_own_chain() -> None:
    info = snp.PageInfo(digest_cur=b"\x11" * 48, contents=b"\x22" * 48, page_type=snp.SnpPageType.ZERO, gpa=0x1000,
                        vmpl3_perms=1, vmpl2_perms=2, vmpl1_perms=3)
    raw = info.encode()
    assert raw[0x64:0x68] == b"\x01\x02\x03\x00"
    assert snp.PageInfo.decode(raw) == info


# --- RMP ----------------------------------------------------------------------------------------


def test_rmp_raw_entry_bits() -> None:
    lo = rmp.RmpEntryRawLo(assigned=True, pagesize=1, immutable=True, gpa=0x12345, asid=0x3FF, vmsa=True,
                           validated=True)
    value = lo.to_int()
    assert value == 1 | 1 << 1 | 1 << 2 | 0x12345 << 12 | 0x3FF << 51 | 1 << 61 | 1 << 62
    entry = rmp.RmpEntryRaw(lo=lo, vmpl_perms=(0x1F, 0x03, 0, 0))
    raw = entry.encode()
    assert raw[:8] == value.to_bytes(8, "little") and raw[8:12] == b"\x1f\x03\x00\x00"
    assert rmp.RmpEntryRaw.decode(raw) == entry
    with pytest.raises(LayoutError, match=r"RmpEntryRaw.lo at 0x0: RmpEntryRawLo: reserved bits 63"):
        rmp.RmpEntryRaw.decode((value | 1 << 63).to_bytes(8, "little") + raw[8:])
    with pytest.raises(LayoutError, match=r"RmpEntryRaw: reserved bytes 0xc..0xf"):
        rmp.RmpEntryRaw.decode(raw[:15] + b"\x01")
    with pytest.raises(LayoutError, match=r"gpa \(bits 50:12\): .* does not fit 39 bit"):
        rmp.RmpEntryRawLo(gpa=1 << 39).encode()


def test_rmp_geometry() -> None:
    assert rmp.rmp_entry_offset(0) == 0x4000 and rmp.rmp_entry_offset(0x1000) == 0x4010
    assert rmp.rmp_covered_bytes(0x10_0000, 0x110_3FFF) == 4 << 30  # APM2 15.36 example: 4 GiB
    assert rmp.rmp_covered_bytes(0x10_0000, 0x10_1FFF) == 0
    assert rmp.RmpAdjustAttrs(target_vmpl=1, perm_mask=0x1F, vmsa=True).to_int() == 1 | 0x1F << 8 | 1 << 16
    assert int(rmp.VmplPerm.READ | rmp.VmplPerm.WRITE | rmp.VmplPerm.EXEC_USER | rmp.VmplPerm.EXEC_SUPERVISOR
               | rmp.VmplPerm.SUPERVISOR_SHADOW_STACK) == rmp.VMPL_PERM_MASK
    assert (rmp.RmpResult.FAIL_INUSE, rmp.RmpResult.FAIL_OVERLAP, rmp.RmpResult.FAIL_SIZEMISMATCH) == (3, 4, 6)
    assert (int(rmp.RmpPageState.GUEST_VALID), int(rmp.RmpPageState.HYPERVISOR)) == (0xA, 2)
