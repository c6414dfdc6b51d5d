"""SEV-ES in the firmware: INIT with CONFIG.ES and the TMR, LAUNCH_UPDATE_VMSA and the VMSA checksums,
ES ASIDs, DBG and SEND/RECEIVE_UPDATE_VMSA on ES guests -- through the real mailbox path.

Statuses and their order follow AMD's firmware source (AMD-ASPFW ``sev_mcmd.c``, ``sev_es.c``,
``crc.c``); every refusal is checked to change neither the firmware's state nor memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
from fwkit import call, init, ok, put
from test_fw_migration import (
    HDR_SPA,
    IMAGE,
    IMAGE_BASE,
    MEASURE_SPA,
    TARGET_BASE,
    TRANS_SPA,
    export,
    get,
    receive_start_cmd,
    receive_update_cmd,
    send_start,
    update_cmd,
)

from sevemu._util.units import GiB, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import (
    ActivateCmd,
    DbgCmd,
    HandleCmd,
    HdrBuf,
    InitCmd,
    InitExCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    MeasureBuf,
    PlatformStatus,
    ReceiveStartCmd,
)
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.firmware.tmr import (
    VMSA_CRC_PADDR,
    VMSA_CRC_SIZE,
    VMSA_CRC_ZEROS,
    crc32c,
    crc64_vmsa,
)
from sevemu.scenario import Machine, build_machine

PAGE = 4096
TMR = 2 * MiB  # the hypervisor's TMR (below its bounce area)
ES = int(GuestPolicy.ES)
VMSA_SPA = 0x4100_0000
VMSA = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))  # a page the host built (not a real VMSA)


def es_init() -> InitCmd:
    return InitCmd(options=1, tmr_paddr=TMR, tmr_len=MiB)


def machine(seed: str, es: bool = True) -> Machine:
    m = build_machine("milan", seed=seed, dram_size=8 * GiB, init=False)
    init(m, es_init() if es else InitCmd())
    return m


@pytest.fixture
def m() -> Machine:
    return machine("fw-es")


def snapshot(m: Machine) -> object:
    fw = m.firmware
    tmr = None if fw.tmr is None else (fw.tmr.base, fw.tmr.ready, fw.tmr.fresh, tuple(fw.tmr.freed))
    return (fw.state, fw.config_es, tmr, fw.next_handle, dict(fw.asid_owner),
            {h: (g.state, g.asid, g.policy, g.ld.digest(), tuple(g.vmsas)) for h, g in fw.guests.items()})


def refused(m: Machine, cmd: CommandId, buf: object, want: Status, *, spa: int = VMSA_SPA) -> None:
    """``cmd`` answers ``want`` and changes neither the firmware state nor the page at ``spa`` nor the TMR."""
    before, page, tmr = snapshot(m), m.soc.dram.read(spa, PAGE), m.soc.dram.read(TMR, MiB)
    status, _ = call(m, cmd, buf)  # type: ignore[arg-type]
    assert Status(status) == want, f"{cmd.name}: {Status(status).name}, expected {want.name}"
    assert snapshot(m) == before
    assert m.soc.dram.read(spa, PAGE) == page and m.soc.dram.read(TMR, MiB) == tmr
    assert not m.firmware.internal_errors


def start(m: Machine, policy: int = ES, asid: int | None = None) -> int:
    """An activated guest in LUPDATE with IMAGE measured at IMAGE_BASE."""
    h = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))).handle
    if asid is None:
        asid = m.profile.es_asids()[0] if policy & ES else m.profile.min_sev_asid
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=h, asid=asid))
    put(m, IMAGE_BASE, IMAGE)
    ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=h, paddr=IMAGE_BASE, len=len(IMAGE)))
    return h


def update_vmsa(m: Machine, h: int, spa: int = VMSA_SPA, page: bytes = VMSA) -> None:
    put(m, spa, page)
    ok(m, CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=h, paddr=spa, len=VMSA_PAGE_SIZE))


def plaintext(m: Machine, h: int, spa: int, length: int = PAGE) -> bytes:
    """Test-only look at guest memory through the guest's key slot."""
    m.soc.wbinvd_all()
    return m.soc.mc.read(spa, length, m.firmware.guests[h].asid, True)


def tmr_crc(m: Machine, crc_paddr: int) -> int:
    return int.from_bytes(m.soc.dram.read(crc_paddr, 8), "little")


# ---- the checksum ----------------------------------------------------------------------------------
def _af_crc32c(data: bytes) -> int:
    """AMD-ASPFW crc.c's bit-serial CRC-32C (reflected input through a 32-bit bit reversal), as written there."""
    def rev(x: int) -> int:
        return int(f"{x:032b}"[::-1], 2)

    crc = 0xFFFFFFFF
    for b in data:
        byte = rev(b)
        for _ in range(8):
            if (crc ^ byte) & 0x80000000:
                crc = ((crc << 1) ^ 0x1EDC6F41) & 0xFFFFFFFF
            else:
                crc = (crc << 1) & 0xFFFFFFFF
            byte = (byte << 1) & 0xFFFFFFFF
    return rev(~crc & 0xFFFFFFFF)


def _af_crc64_vmsa(buf: bytes) -> int:
    """AF ``crc64_vmsa``: three lane CRCs (offsets 0, 8, 16 of every 24 bytes), then their CRC."""
    lanes = [b"".join(buf[i + off : i + off + 8] for i in range(0, len(buf) // 24 * 24, 24)) for off in (0, 8, 16)]
    crcs = [_af_crc32c(lane) for lane in lanes]
    combined = _af_crc32c(b"".join(c.to_bytes(4, "little") for c in crcs))
    return (crcs[0] ^ crcs[1] ^ crcs[2]) << 32 | combined


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    data = os.urandom(100)
    assert crc32c(data) == _af_crc32c(data) == crc32c(data[40:], crc32c(data[:40]))


def test_crc64_vmsa_is_amds_construction() -> None:
    for page in (bytes(PAGE), VMSA, os.urandom(PAGE)):
        assert crc64_vmsa(page) == _af_crc64_vmsa(page[:VMSA_CRC_SIZE])
    flipped = bytearray(VMSA)
    flipped[VMSA_CRC_SIZE] ^= 1  # beyond the covered bytes: the same checksum
    assert crc64_vmsa(bytes(flipped)) == crc64_vmsa(VMSA)
    flipped[0x310] ^= 1
    assert crc64_vmsa(bytes(flipped)) != crc64_vmsa(VMSA)
    with pytest.raises(ValueError):
        crc64_vmsa(bytes(16))


# ---- INIT with CONFIG.ES ------------------------------------------------------------------------------
def test_platform_status_reports_config_es() -> None:
    m = build_machine("milan", seed="fw-es-status", dram_size=1 * GiB, init=False)
    status = lambda: PlatformStatus.decode(ok(m, CommandId.PLATFORM_STATUS, PlatformStatus()))
    assert status().config == 0
    init(m, es_init())
    assert status().config == 1 and m.firmware.tmr is not None and m.firmware.tmr.base == TMR
    ok(m, CommandId.SHUTDOWN)
    assert status().config == 0 and m.firmware.tmr is None
    init(m, InitCmd(tmr_paddr=0x123, tmr_len=7))  # without ES the TMR fields are ignored
    assert status().config == 0 and m.firmware.tmr is None


@pytest.mark.parametrize(("cmd", "want"), [
    (InitCmd(options=2), Status.INVALID_CONFIG),  # AF init_cmd_buf_valid: unknown flag
    (InitCmd(options=1 << 16, tmr_paddr=TMR, tmr_len=MiB), Status.INVALID_CONFIG),
    (InitCmd(options=1, tmr_paddr=TMR + PAGE, tmr_len=MiB), Status.INVALID_ADDRESS),
    (InitCmd(options=1, tmr_paddr=TMR, tmr_len=2 * MiB), Status.INVALID_LENGTH),
    (InitCmd(options=1, tmr_paddr=TMR + PAGE, tmr_len=0), Status.INVALID_ADDRESS),  # alignment first
    (InitCmd(options=1, tmr_paddr=0, tmr_len=MiB), Status.INVALID_ADDRESS),  # the legacy ASEG
    (InitCmd(options=1, tmr_paddr=16 * GiB, tmr_len=MiB), Status.INVALID_ADDRESS),  # outside DRAM
])
def test_init_refusals(cmd: InitCmd, want: Status) -> None:
    m = build_machine("milan", seed="fw-es-init", dram_size=8 * GiB, init=False)
    assert call(m, CommandId.INIT, cmd)[0] == want
    assert m.firmware.state == PlatformState.UNINIT and m.firmware.tmr is None and not m.firmware.config_es


def test_init_reserved_bytes_are_invalid_config() -> None:
    """AF: INIT's ``reserved`` bytes must be zero (INVALID_CONFIG, not the dispatcher's INVALID_PARAM)."""
    m = build_machine("milan", seed="fw-es-rsvd", dram_size=1 * GiB, init=False)
    raw = bytearray(es_init().encode())
    raw[5] = 1
    assert m.hv.psp.raw(CommandId.INIT, bytes(raw))[0] == Status.INVALID_CONFIG
    raw = bytearray(InitExCmd(options=1, tmr_paddr=TMR, tmr_len=MiB).encode())
    raw[0x15] = 1
    assert m.hv.psp.raw(CommandId.INIT_EX, bytes(raw))[0] == Status.INVALID_CONFIG
    assert m.firmware.state == PlatformState.UNINIT


def test_init_ex_checks_in_afs_order() -> None:
    """AF: flags, length, the NV buffer, the NV contents, then the TMR (overlap with NV first)."""
    m = build_machine("milan", seed="fw-es-initex", dram_size=8 * GiB, init=False)
    nv = 0x3100_0000
    put(m, nv, b"\xff" * (32 << 10))
    base = InitExCmd(options=1, tmr_paddr=TMR + PAGE, tmr_len=MiB, nv_paddr=nv, nv_len=32 << 10)
    for over, want in (({"options": 3}, Status.INVALID_CONFIG),
                       ({"length": 0x20}, Status.INVALID_LENGTH),
                       ({"nv_len": 4096}, Status.INVALID_LENGTH),  # before the TMR's alignment
                       ({"nv_paddr": nv + 16}, Status.INVALID_ADDRESS),
                       ({}, Status.INVALID_ADDRESS),  # the TMR's alignment
                       ({"tmr_paddr": nv}, Status.INVALID_ADDRESS),  # overlaps the NV buffer
                       ({"tmr_paddr": 16 * GiB}, Status.INVALID_ADDRESS)):
        assert call(m, CommandId.INIT_EX, dataclasses.replace(base, **over))[0] == want, over
        assert m.firmware.state == PlatformState.UNINIT and m.firmware.tmr is None
        assert m.soc.dram.read(nv, 32) == b"\xff" * 32  # the erased NV buffer was not written
    ok(m, CommandId.INIT_EX, dataclasses.replace(base, tmr_paddr=TMR))
    assert m.firmware.config_es and m.firmware.tmr is not None and m.firmware.nv_area == nv


def test_init_es_on_a_cpu_without_es_asids() -> None:
    m = build_machine("naples", seed="fw-es-naples", dram_size=1 * GiB, init=False)
    assert call(m, CommandId.INIT, es_init())[0] == Status.INVALID_CONFIG
    init(m, InitCmd())
    assert call(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=ES))[0] == Status.UNSUPPORTED


def test_the_pool_is_usable_after_df_flush() -> None:
    """AF: the TMR is only reserved by INIT; the first DF_FLUSH (after a WBINVD) initialises it."""
    m = build_machine("milan", seed="fw-es-pool", dram_size=1 * GiB, init=False)
    ok(m, CommandId.INIT, es_init())
    tmr = m.firmware.tmr
    assert tmr is not None and not tmr.ready and tmr.available() == 0
    assert call(m, CommandId.DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    assert not tmr.ready
    m.soc.wbinvd_all()
    ok(m, CommandId.DF_FLUSH)
    assert tmr.ready and tmr.available() == tmr.blocks - 1 == MiB // 2 // 8 - 1


# ---- x86 ranges in the TMR ----------------------------------------------------------------------------
def test_no_command_touches_the_tmr(m: Machine) -> None:
    """The host's attack: have the firmware write a checksum for it (DBG_DECRYPT's output, a guest
    page, a VMSA or the command buffer itself placed in the TMR).  AF ``validate_address_range``
    refuses every x86 range that overlaps a TMR: INVALID_ADDRESS, nothing written."""
    h = start(m, policy=ES)  # debuggable
    crc_half = TMR + MiB // 2
    refused(m, CommandId.DBG_DECRYPT, DbgCmd(handle=h, src_paddr=IMAGE_BASE, dst_paddr=crc_half, len=64),
            Status.INVALID_ADDRESS)
    refused(m, CommandId.DBG_ENCRYPT, DbgCmd(handle=h, src_paddr=IMAGE_BASE, dst_paddr=crc_half - 32, len=64),
            Status.INVALID_ADDRESS)
    refused(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=h, paddr=TMR + MiB - 16, len=32),
            Status.INVALID_ADDRESS)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=h, paddr=crc_half, len=PAGE),
            Status.INVALID_ADDRESS)
    refused(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=h, paddr=TMR, len=0x30),
            Status.INVALID_ADDRESS)
    # the command buffer itself in the TMR (the model's host can put one there: no fabric protection)
    m.soc.dram.write(TMR + PAGE, LaunchUpdateDataCmd(handle=h, paddr=MEASURE_SPA, len=0x30).encode())
    before = snapshot(m)
    psp = m.soc.psp
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, TMR + PAGE)
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, 0)
    psp.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.LAUNCH_MEASURE)))
    assert decode_status(psp.mmio_read(MailboxReg.CMDRESP)) == Status.INVALID_ADDRESS
    assert snapshot(m) == before and m.firmware.guests[h].state == GuestState.LUPDATE


# ---- LAUNCH_UPDATE_VMSA ---------------------------------------------------------------------------------
def test_launch_update_vmsa_measures_encrypts_and_checksums(m: Machine) -> None:
    h = start(m)
    update_vmsa(m, h)
    g = m.firmware.guests[h]
    assert g.launch_digest == hashlib.sha256(IMAGE + VMSA).digest()  # the unaltered page
    (spa, block), = g.vmsas
    tmr = m.firmware.tmr
    assert tmr is not None and spa == VMSA_SPA and block == 0
    m.soc.wbinvd_all()
    assert m.soc.dram.read(VMSA_SPA, PAGE) != VMSA  # ciphertext in DRAM
    page = plaintext(m, h, VMSA_SPA)
    crc_paddr = tmr.crc_paddr(0)
    assert crc_paddr == TMR + MiB // 2
    want = bytearray(VMSA)
    want[VMSA_CRC_ZEROS : VMSA_CRC_ZEROS + 8] = bytes(8)
    want[VMSA_CRC_PADDR : VMSA_CRC_PADDR + 8] = crc_paddr.to_bytes(8, "little")
    assert page == bytes(want)
    assert tmr_crc(m, crc_paddr) == crc64_vmsa(page)
    # a second vCPU's page gets the next block
    update_vmsa(m, h, VMSA_SPA + PAGE, bytes(PAGE))
    assert g.vmsas[1] == (VMSA_SPA + PAGE, 1)
    assert g.launch_digest == hashlib.sha256(IMAGE + VMSA + bytes(PAGE)).digest()
    out = ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=h, paddr=MEASURE_SPA, len=MeasureBuf.SIZE))
    assert LaunchUpdateDataCmd.decode(out).len == MeasureBuf.SIZE
    assert g.measured_ld == hashlib.sha256(IMAGE + VMSA + bytes(PAGE)).digest()


def test_launch_update_vmsa_takes_16_byte_aligned_addresses(m: Machine) -> None:
    """AF checks 16-byte alignment only (the VMCB's page-aligned VMSA pointer is VMRUN's business)."""
    h = start(m)
    update_vmsa(m, h, VMSA_SPA + 0x40)
    assert m.firmware.guests[h].vmsas == [(VMSA_SPA + 0x40, 0)]


def test_launch_update_vmsa_refusals_in_afs_order(m: Machine) -> None:
    h = start(m)
    sev = start(m, policy=0)
    put(m, VMSA_SPA, VMSA)
    cmd = LaunchUpdateDataCmd(handle=h, paddr=VMSA_SPA, len=PAGE)
    # the length first, even before the handle
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, handle=99, len=PAGE // 2), Status.INVALID_LENGTH)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, len=PAGE + 16), Status.INVALID_LENGTH)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, handle=99), Status.INVALID_GUEST)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, handle=sev, paddr=VMSA_SPA + 8),
            Status.UNSUPPORTED)  # a non-ES guest has no VMSA, whatever the address
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, paddr=VMSA_SPA + 8), Status.INVALID_ADDRESS)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, paddr=1 << 40), Status.INVALID_ADDRESS)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, paddr=8 * GiB - 2048), Status.INVALID_ADDRESS)
    # not activated
    h2 = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=ES))).handle
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, handle=h2, paddr=VMSA_SPA + 8), Status.INACTIVE)
    # state: only LUPDATE
    ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=h, paddr=MEASURE_SPA, len=0x30))
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, dataclasses.replace(cmd, paddr=VMSA_SPA + 8),
            Status.INVALID_GUEST_STATE)
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=h))
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, cmd, Status.INVALID_GUEST_STATE)


def test_launch_update_vmsa_pool_exhausted(m: Machine) -> None:
    """No free checksum block: RESOURCE_LIMIT, and -- unlike AF, which hashed first -- the launch
    digest unchanged (model choice)."""
    h = start(m)
    tmr = m.firmware.tmr
    assert tmr is not None
    tmr.fresh = tmr.blocks - 1  # the pool's last free block is its tail, never handed out
    put(m, VMSA_SPA, VMSA)
    refused(m, CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=h, paddr=VMSA_SPA, len=PAGE),
            Status.RESOURCE_LIMIT)
    tmr.freed.append(5)  # a decommissioned guest's block: it joins behind the tail
    update_vmsa(m, h)
    assert m.firmware.guests[h].vmsas == [(VMSA_SPA, tmr.blocks - 1)]
    assert tmr.available() == 0


def test_decommission_frees_the_checksum_blocks_and_shutdown_zeroes_them(m: Machine) -> None:
    h = start(m)
    update_vmsa(m, h)
    update_vmsa(m, h, VMSA_SPA + PAGE)
    tmr = m.firmware.tmr
    assert tmr is not None
    first = tmr.crc_paddr(0)
    assert tmr_crc(m, first) != 0
    ok(m, CommandId.DEACTIVATE, HandleCmd(handle=h))
    ok(m, CommandId.DECOMMISSION, HandleCmd(handle=h))
    assert tmr.freed == [0, 1]
    h = start(m, asid=2)
    update_vmsa(m, h)
    assert m.firmware.guests[h].vmsas[0][1] == 2  # fresh blocks first (FIFO: freed ones at the tail)
    ok(m, CommandId.SHUTDOWN)
    assert m.soc.dram.read(first, 24) == bytes(24)


# ---- ASIDs and policy --------------------------------------------------------------------------------
def test_es_guests_only_below_the_sev_range(m: Machine) -> None:
    es_asids, sev_asids = m.profile.es_asids(), m.profile.sev_asids()
    assert (es_asids.start, es_asids.stop, sev_asids.start) == (1, 100, 100)
    es = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=ES))).handle
    sev = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=0))).handle
    for h, asid in ((es, 100), (es, 0), (es, m.profile.max_asid), (sev, 99), (sev, 1), (sev, 0)):
        refused(m, CommandId.ACTIVATE, ActivateCmd(handle=h, asid=asid), Status.INVALID_ASID)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=es, asid=99))
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=sev, asid=100))


def test_es_policy_needs_an_es_platform() -> None:
    m = machine("fw-es-off", es=False)
    assert call(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=ES))[0] == Status.UNSUPPORTED
    assert not m.firmware.guests


# ---- DBG on SEV-ES guests ------------------------------------------------------------------------------
def test_debug_reads_and_writes_vmsas_as_amds_firmware_does(m: Machine) -> None:
    """AF's DBG_* know nothing of VMSAs: a debuggable ES guest's VMSA can be read and written (the
    owner allowed it); the checksum still catches the write when the page leaves (SEND_UPDATE_VMSA)
    -- the CPU checks it at VMRUN."""
    h = start(m)
    update_vmsa(m, h)
    m.soc.wbinvd_all()
    out = 0x3000_0000
    ok(m, CommandId.DBG_DECRYPT, DbgCmd(handle=h, src_paddr=VMSA_SPA, dst_paddr=out, len=PAGE))
    page = get(m, out, PAGE)
    assert page == plaintext(m, h, VMSA_SPA) and page[:0x300] == VMSA[:0x300]
    put(m, out, b"\x41" * 16)
    ok(m, CommandId.DBG_ENCRYPT, DbgCmd(handle=h, src_paddr=out, dst_paddr=VMSA_SPA + 0x1F0, len=16))
    assert plaintext(m, h, VMSA_SPA)[0x1F0:0x200] == b"\x41" * 16
    assert crc64_vmsa(plaintext(m, h, VMSA_SPA)) != tmr_crc(m, m.firmware.tmr.crc_paddr(0))  # type: ignore[union-attr]
    nodbg = start(m, policy=ES | int(GuestPolicy.NODBG), asid=2)
    update_vmsa(m, nodbg, VMSA_SPA + PAGE)
    refused(m, CommandId.DBG_DECRYPT, DbgCmd(handle=nodbg, src_paddr=VMSA_SPA + PAGE, dst_paddr=out, len=PAGE),
            Status.POLICY_FAILURE)


# ---- SEND/RECEIVE_UPDATE_VMSA --------------------------------------------------------------------------
def _running_es_guest(m: Machine) -> int:
    h = start(m)
    update_vmsa(m, h)
    ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=h, paddr=MEASURE_SPA, len=0x30))
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=h))
    return h


def _es_channel(src: Machine, dst: Machine) -> tuple[int, int]:
    sh = _running_es_guest(src)
    _, session = send_start(src, sh, export(dst))
    dh = ReceiveStartCmd.decode(ok(dst, CommandId.RECEIVE_START, receive_start_cmd(dst, export(src), ES,
                                                                                     session))).handle
    ok(dst, CommandId.ACTIVATE, ActivateCmd(handle=dh, asid=dst.profile.es_asids()[0]))
    src.soc.wbinvd_all()  # the source does not run while it sends
    return sh, dh


def test_vmsa_moves_and_gets_a_new_checksum_block(m: Machine) -> None:
    dst = machine("fw-es-dst")
    sh, dh = _es_channel(m, dst)
    ok(m, CommandId.SEND_UPDATE_VMSA, update_cmd(m, sh, VMSA_SPA))
    hdr, trans = get(m, HDR_SPA, HdrBuf.SIZE), get(m, TRANS_SPA, PAGE)
    dst.firmware.tmr.fresh = 7  # type: ignore[union-attr]  # the target's pool is elsewhere in its list
    ok(dst, CommandId.RECEIVE_UPDATE_VMSA, receive_update_cmd(dst, dh, TARGET_BASE, hdr, trans))
    src_page, dst_page = plaintext(m, sh, VMSA_SPA), plaintext(dst, dh, TARGET_BASE)
    tmr = dst.firmware.tmr
    assert tmr is not None and dst.firmware.guests[dh].vmsas == [(TARGET_BASE, 7)]
    assert int.from_bytes(dst_page[VMSA_CRC_PADDR : VMSA_CRC_PADDR + 8], "little") == tmr.crc_paddr(7)
    assert dst_page[:VMSA_CRC_PADDR] == src_page[:VMSA_CRC_PADDR]
    assert dst_page[VMSA_CRC_PADDR + 8 :] == src_page[VMSA_CRC_PADDR + 8 :]
    assert tmr_crc(dst, tmr.crc_paddr(7)) == crc64_vmsa(dst_page)
    # the received VMSA can be sent on: it checks against the target's block
    ok(dst, CommandId.RECEIVE_FINISH, HandleCmd(handle=dh))
    assert dst.firmware.guests[dh].state == GuestState.RUNNING


def test_send_update_vmsa_checks_the_checksum(m: Machine) -> None:
    """The host flips VMSA ciphertext, or passes a page that is no VMSA of this guest: AF
    ``sev_es_validate_vmsa`` fails and SEND_UPDATE_VMSA answers INVALID_PARAM; nothing is sent."""
    dst = machine("fw-es-dst2")
    sh, _ = _es_channel(m, dst)
    refused(m, CommandId.SEND_UPDATE_VMSA, update_cmd(m, sh, IMAGE_BASE), Status.INVALID_PARAM,
            spa=TRANS_SPA)  # a data page: names no checksum block
    refused(m, CommandId.SEND_UPDATE_VMSA, update_cmd(m, sh, VMSA_SPA, length=PAGE // 2), Status.INVALID_PARAM,
            spa=TRANS_SPA)  # shorter than a VMSA
    cipher = bytearray(m.soc.dram.read(VMSA_SPA, PAGE))
    cipher[0x178] ^= 0x80  # RIP's block
    m.soc.dram.write(VMSA_SPA, bytes(cipher))
    refused(m, CommandId.SEND_UPDATE_VMSA, update_cmd(m, sh, VMSA_SPA), Status.INVALID_PARAM, spa=TRANS_SPA)
    assert m.firmware.guests[sh].state == GuestState.SUPDATE


def test_receive_update_vmsa_refusals(m: Machine) -> None:
    dst = machine("fw-es-dst3")
    sh, dh = _es_channel(m, dst)
    ok(m, CommandId.SEND_UPDATE_VMSA, update_cmd(m, sh, VMSA_SPA))
    hdr, trans = get(m, HDR_SPA, HdrBuf.SIZE), get(m, TRANS_SPA, PAGE)
    tmr = dst.firmware.tmr
    assert tmr is not None
    tmr.fresh = tmr.blocks - 1
    refused(dst, CommandId.RECEIVE_UPDATE_VMSA, receive_update_cmd(dst, dh, TARGET_BASE, hdr, trans),
            Status.RESOURCE_LIMIT, spa=TARGET_BASE)
    tmr.fresh = 0
    bad = bytearray(trans)
    bad[9] ^= 1
    refused(dst, CommandId.RECEIVE_UPDATE_VMSA, receive_update_cmd(dst, dh, TARGET_BASE, hdr, bytes(bad)),
            Status.BAD_MEASUREMENT, spa=TARGET_BASE)
    ok(dst, CommandId.RECEIVE_UPDATE_VMSA, receive_update_cmd(dst, dh, TARGET_BASE, hdr, trans))
