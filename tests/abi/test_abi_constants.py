"""Status codes, command ids, states, policy, mailbox, CPUID/MSR and paging constants against
the public sources (SEV API 55766, SNP ABI 56860, APM2 15.34-15.36) and Linux's psp driver."""

from __future__ import annotations

import pytest

from sevemu.abi import cpuid, mailbox, paging, policy
from sevemu.abi.commands import LEGACY_COMMANDS, SNP_COMMANDS, CommandId
from sevemu.abi.states import GuestState, PlatformOwner, PlatformState
from sevemu.abi.status import NO_FW_CALL, Status, status_name
from sevemu.errors import InputError, LayoutError

STATUS_TABLE = """
00 SUCCESS 01 INVALID_PLATFORM_STATE 02 INVALID_GUEST_STATE 03 INVALID_CONFIG 04 INVALID_LENGTH
05 ALREADY_OWNED 06 INVALID_CERTIFICATE 07 POLICY_FAILURE 08 INACTIVE 09 INVALID_ADDRESS
0A BAD_SIGNATURE 0B BAD_MEASUREMENT 0C ASID_OWNED 0D INVALID_ASID 0E WBINVD_REQUIRED
0F DF_FLUSH_REQUIRED 10 INVALID_GUEST 11 INVALID_COMMAND 12 ACTIVE 13 HWERROR_PLATFORM
14 HWERROR_UNSAFE 15 UNSUPPORTED 16 INVALID_PARAM 17 RESOURCE_LIMIT 18 SECURE_DATA_INVALID
19 INVALID_PAGE_SIZE 1A INVALID_PAGE_STATE 1B INVALID_MDATA_ENTRY 1C INVALID_PAGE_OWNER
1D AEAD_OFLOW 1F RING_BUFFER_EXIT 20 RMP_INIT_REQUIRED 21 BAD_SVN 22 BAD_VERSION
23 SHUTDOWN_REQUIRED 24 UPDATE_FAILED 25 RESTORE_REQUIRED 26 RMP_INITIALIZATION_FAILED 27 INVALID_KEY
"""

LEGACY_TABLE = """
01 INIT 02 SHUTDOWN 03 PLATFORM_RESET 04 PLATFORM_STATUS 05 PEK_GEN 06 PEK_CSR 07 PEK_CERT_IMPORT
08 PDH_CERT_EXPORT 09 PDH_GEN 0A DF_FLUSH 0B DOWNLOAD_FIRMWARE 0C GET_ID 0D INIT_EX 0E NOP
0F RING_BUFFER 20 DECOMMISSION 21 ACTIVATE 22 DEACTIVATE 23 GUEST_STATUS 24 COPY 25 ACTIVATE_EX
30 LAUNCH_START 31 LAUNCH_UPDATE_DATA 32 LAUNCH_UPDATE_VMSA 33 LAUNCH_MEASURE 34 LAUNCH_SECRET
35 LAUNCH_FINISH 36 ATTESTATION 40 SEND_START 41 SEND_UPDATE_DATA 42 SEND_UPDATE_VMSA
43 SEND_FINISH 44 SEND_CANCEL 50 RECEIVE_START 51 RECEIVE_UPDATE_DATA 52 RECEIVE_UPDATE_VMSA
53 RECEIVE_FINISH 60 DBG_DECRYPT 61 DBG_ENCRYPT 70 SWAP_OUT 71 SWAP_IN
"""

SNP_TABLE = """
81 SNP_INIT 82 SNP_SHUTDOWN 83 SNP_PLATFORM_STATUS 84 SNP_DF_FLUSH 85 SNP_INIT_EX
86 SNP_SHUTDOWN_EX 90 SNP_DECOMMISSION 91 SNP_ACTIVATE 92 SNP_GUEST_STATUS 93 SNP_GCTX_CREATE
94 SNP_GUEST_REQUEST 95 SNP_ACTIVATE_EX A0 SNP_LAUNCH_START A1 SNP_LAUNCH_UPDATE A2 SNP_LAUNCH_FINISH
B0 SNP_DBG_DECRYPT B1 SNP_DBG_ENCRYPT C0 SNP_PAGE_SWAP_OUT C1 SNP_PAGE_SWAP_IN C2 SNP_PAGE_MOVE
C3 SNP_PAGE_MD_INIT C6 SNP_PAGE_SET_STATE C7 SNP_PAGE_RECLAIM C8 SNP_PAGE_UNSMASH C9 SNP_CONFIG
CA SNP_DOWNLOAD_FIRMWARE_EX CB SNP_COMMIT CD SNP_VLEK_LOAD CE SNP_FEATURE_INFO
"""


def _table(text: str) -> dict[str, int]:
    words = text.split()
    return {name: int(code, 16) for code, name in zip(words[::2], words[1::2], strict=True)}


def test_status_codes() -> None:
    assert {s.name: int(s) for s in Status} == _table(STATUS_TABLE)
    assert all(0 <= s < 1 << 16 for s in Status)
    assert status_name(0x0C) == "ASID_OWNED"
    assert status_name(0x1E) == "UNKNOWN_0x001e"
    assert NO_FW_CALL not in {int(s) for s in Status}


def test_command_ids() -> None:
    legacy, snp = _table(LEGACY_TABLE), _table(SNP_TABLE)
    tio = {
        "TIO_STATUS": 0xD0,
        "TIO_INIT": 0xD1,
        "TIO_DEV_CREATE": 0xD2,
        "TIO_DEV_RECLAIM": 0xD3,
        "TIO_DEV_CONNECT": 0xD4,
        "TIO_DEV_DISCONNECT": 0xD5,
    }
    assert {c.name: int(c) for c in CommandId} == legacy | snp | tio
    assert {c.name for c in LEGACY_COMMANDS} == set(legacy)
    assert {c.name for c in SNP_COMMANDS} == set(snp)


def test_states() -> None:
    assert [(s.name, int(s)) for s in PlatformState] == [("UNINIT", 0), ("INIT", 1), ("WORKING", 2)]
    names = ["UNINIT", "LUPDATE", "LSECRET", "RUNNING", "SUPDATE", "RUPDATE", "SENT"]
    assert [(s.name, int(s)) for s in GuestState] == [(n, i) for i, n in enumerate(names)]
    assert (int(PlatformOwner.EXTERNAL), int(PlatformOwner.SELF_OWNED)) == (1, 0)


def test_policy_bits_and_recommended_values() -> None:
    bits = ["NODBG", "NOKS", "ES", "NOSEND", "DOMAIN", "SEV"]
    assert [(p.name, int(p)) for p in policy.GuestPolicy] == [(n, 1 << i) for i, n in enumerate(bits)]
    assert policy.POLICY_NORM == 0x37
    assert policy.POLICY_DEBUG == 0x32
    assert policy.POLICY_MAX == 0x0F
    assert policy.POLICY_MIN == 0


def test_policy_api_version_fields() -> None:
    p = policy.compose_policy(policy.GuestPolicy.NODBG | policy.GuestPolicy.ES, api_major=1, api_minor=55)
    assert p == 0x3701_0005
    assert (policy.api_major(p), policy.api_minor(p)) == (1, 55)
    assert policy.check_policy(p) == p


@pytest.mark.parametrize(
    "value",
    [1 << 6, 1 << 15, 0x0000_FFC0, -1, 1 << 32],
    ids=["bit6", "bit15", "all-reserved", "negative", "33-bit"],
)
def test_check_policy_rejects(value: int) -> None:
    with pytest.raises(LayoutError):
        policy.check_policy(value)


@pytest.mark.parametrize(
    ("flags", "major", "minor"), [(1 << 6, 0, 0), (0, 256, 0), (0, 0, -1)], ids=["flag", "major", "minor"]
)
def test_compose_policy_rejects(flags: int, major: int, minor: int) -> None:
    with pytest.raises(LayoutError):
        policy.compose_policy(flags, major, minor)


def test_mailbox_cmdresp_encoding() -> None:
    # Linux: reg = FIELD_PREP(SEV_CMDRESP_CMD, cmd) | SEV_CMDRESP_IOC; SEV_CMDRESP_CMD = GENMASK(26, 16).
    assert mailbox.CMDRESP_CMD_MASK == 0x07FF_0000
    reg = mailbox.encode_cmdresp(CommandId.LAUNCH_START)
    assert reg == 0x0030_0001
    assert mailbox.encode_cmdresp(CommandId.SNP_FEATURE_INFO, ioc=False) == 0x00CE_0000
    assert mailbox.decode_command(reg) == CommandId.LAUNCH_START
    assert not mailbox.is_response(reg)
    resp = mailbox.encode_response(Status.INVALID_LENGTH)
    assert resp == 0x8000_0004
    assert mailbox.is_response(resp) and mailbox.decode_status(resp) == Status.INVALID_LENGTH
    assert mailbox.decode_status(0x8000_FFFF) == 0xFFFF


def test_mailbox_register_offsets() -> None:
    # drivers/crypto/ccp/sp-pci.c sevv2 (C2PMSG_32 / 56 / 57).
    reg = mailbox.MailboxReg
    assert [int(reg.CMDRESP), int(reg.CMDBUFF_ADDR_LO), int(reg.CMDBUFF_ADDR_HI)] == [
        0x10980,
        0x109E0,
        0x109E4,
    ]


@pytest.mark.parametrize("cmd", [-1, 0x800])
def test_mailbox_command_out_of_range(cmd: int) -> None:
    with pytest.raises(LayoutError):
        mailbox.encode_cmdresp(cmd)


@pytest.mark.parametrize("status", [-1, 0x10000])
def test_mailbox_status_out_of_range(status: int) -> None:
    with pytest.raises(LayoutError):
        mailbox.encode_response(status)


def test_cpuid_fields() -> None:
    # EPYC 9654 example (APM2 15.34, CPUID Fn8000_001F): C-bit 51, PA reduction 6, 4 VMPLs.
    ebx = cpuid.encode_ebx(51, 6, 4)
    assert ebx == 51 | 6 << 6 | 4 << 12
    assert (cpuid.ebx_cbit(ebx), cpuid.ebx_pa_reduction(ebx), cpuid.ebx_num_vmpls(ebx)) == (51, 6, 4)
    eax = cpuid.SevCpuidEax
    assert (eax.SME, eax.SEV, eax.SEV_ES, eax.SEV_SNP, eax.SME_COHERENT) == (1, 2, 8, 16, 1 << 10)
    with pytest.raises(LayoutError):
        cpuid.encode_ebx(64, 0)
    with pytest.raises(LayoutError):
        cpuid.encode_ebx(47, 64)
    with pytest.raises(LayoutError):
        cpuid.encode_ebx(47, 5, 16)


def test_msrs_and_bits() -> None:
    msr = cpuid.Msr
    assert (msr.SYSCFG, msr.HWCR, msr.VMPAGE_FLUSH) == (0xC0010010, 0xC0010015, 0xC001011E)
    assert (msr.GHCB, msr.SEV_STATUS, msr.RMP_BASE, msr.RMP_END) == (
        0xC0010130,
        0xC0010131,
        0xC0010132,
        0xC0010133,
    )
    sc = cpuid.SysCfg
    assert (sc.MFDM, sc.MEM_ENCRYPTION_MOD_EN, sc.SNP_EN, sc.VMPL_EN) == (1 << 19, 1 << 23, 1 << 24, 1 << 25)
    ss = cpuid.SevStatus
    assert (ss.SEV_ENABLED, ss.SEV_ES_ENABLED, ss.SNP_ACTIVE) == (1, 2, 4)
    assert ss.SECURE_TSC == 1 << 11 and ss.IBPB_ON_ENTRY == 1 << 23


def test_pte_and_fault_bits() -> None:
    pte = paging.Pte
    assert [int(b) for b in (pte.P, pte.RW, pte.US, pte.PWT, pte.PCD, pte.A, pte.D, pte.PS, pte.G)] == [
        1 << i for i in range(9)
    ]
    assert pte.NX == 1 << 63
    pf = paging.PfErrorCode
    assert (pf.P, pf.W, pf.U, pf.RSVD, pf.FETCH, pf.RMP) == (1, 2, 4, 8, 16, 1 << 31)
    npf = paging.NpfExitInfo1
    assert (npf.GUEST_FINAL, npf.GUEST_PAGE, npf.ENC, npf.SIZEM, npf.VMPL, npf.SSS) == tuple(
        1 << b for b in range(32, 38)
    )


def test_address_mask_strips_c_bit() -> None:
    mask = paging.address_mask(c_bit=47, pa_bits=52)
    assert mask == 0x000F_7FFF_FFFF_F000
    entry = (1 << 47) | 0x1234_5000 | paging.Pte.P | paging.Pte.NX
    assert entry & mask == 0x1234_5000
    assert paging.address_mask(c_bit=51, pa_bits=46) == 0x0000_3FFF_FFFF_F000
    assert paging.address_mask(c_bit=51, pa_bits=52, page_shift=21) == 0x0007_FFFF_FFE0_0000


@pytest.mark.parametrize(("c_bit", "pa_bits"), [(51, 12), (51, 53), (64, 48), (-1, 48)])
def test_address_mask_rejects(c_bit: int, pa_bits: int) -> None:
    with pytest.raises(InputError):
        paging.address_mask(c_bit, pa_bits)


def test_exit_codes() -> None:
    ec = paging.ExitCode
    expected = {"INTR": 0x60, "CPUID": 0x72, "HLT": 0x78, "IOIO": 0x7B, "MSR": 0x7C, "SHUTDOWN": 0x7F}
    expected |= {"VMMCALL": 0x81, "NPF": 0x400, "VMGEXIT": 0x403, "INVALID": -1}
    assert {e.name: int(e) for e in ec} == expected
    assert paging.exitcode_to_field(ec.INVALID) == 0xFFFF_FFFF_FFFF_FFFF
    assert paging.exitcode_from_field(0xFFFF_FFFF_FFFF_FFFF) is ec.INVALID
    assert paging.exitcode_from_field(0x400) is ec.NPF
    assert paging.exitcode_from_field(0x7E) == 0x7E
