"""SNP guest management: SNP_GCTX_CREATE, SNP_LAUNCH_START, SNP_ACTIVATE(_EX), SNP_DECOMMISSION,
SNP_GUEST_STATUS, SNP_PAGE_RECLAIM, SNP_PAGE_UNSMASH, SNP_DBG_DECRYPT / SNP_DBG_ENCRYPT (SNP ABI 56860
ch. 8; AMD-ASPFW ``sev_mcmd.c`` ``snp_mcmd_*`` for the order of checks and the status of each).

The 64-bit guest policy (SNP ABI "Guest Policy"; Linux ``SNP_POLICY_MASK_*``) is checked at
SNP_LAUNCH_START (POLICY_FAILURE): bit 17 must be one, the SMT bit must be set (the model's parts run
with SMT on), the minimum ABI version must not exceed the firmware's, bits 63:26 must be zero, and
each generation accepts only the bits its firmware knows (model choice, ``docs/snp.md``):

=========  ====================================================================================
Milan      ABI, SMT, MBO, MIGRATE_MA, DEBUG, SINGLE_SOCKET (bits 0..20)
Genoa      + CXL_ALLOW, MEM_AES_256_XTS (needs the AES-256-XTS memory mode), RAPL_DIS (bits 21..23)
Turin      + CIPHERTEXT_HIDING_DRAM, PAGE_SWAP_DISABLE (bits 24, 25)
=========  ====================================================================================

RAPL_DIS needs the platform initialised with RAPL_DIS, CIPHERTEXT_HIDING_DRAM with ciphertext hiding
enabled (SNP_INIT_EX flags); MIGRATE_MA is required when LAUNCH_START names a migration agent.
"""

from __future__ import annotations

from sevemu._util.units import PAGE, PAGE_2M
from sevemu.abi.commands import CommandId
from sevemu.abi.rmp import RmpPageState
from sevemu.abi.snp import (
    PADDR_PAGE_SIZE_2M,
    SnpActivateCmd,
    SnpActivateExCmd,
    SnpAddrCmd,
    SnpDbgCmd,
    SnpGuestState,
    SnpGuestStatus,
    SnpGuestStatusCmd,
    SnpLaunchStartCmd,
    SnpPageCmd,
    SnpPolicy,
)
from sevemu.abi.status import Status
from sevemu.crypto.memenc import EncryptionMode
from sevemu.errors import AddressError, FirmwareError, LayoutError
from sevemu.firmware.core import ANY_STATE, Firmware
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.platform import write_output
from sevemu.firmware.snp.state import SnpGuest, SnpPlatform, snp_state

__all__ = ["check_snp_policy", "deactivate", "policy_bits"]

_RESERVED_63_26 = ~((1 << 26) - 1) & ((1 << 64) - 1)
_GENERATION_BITS = {3: (1 << 21) - 1, 4: (1 << 24) - 1, 5: (1 << 26) - 1}


def policy_bits(zen: int) -> int:
    """Policy bits the firmware of a Zen ``zen`` part accepts (module docstring)."""
    return _GENERATION_BITS.get(zen, _GENERATION_BITS[5] if zen > 5 else 0)


def check_snp_policy(fw: Firmware, st: SnpPlatform, policy: int) -> SnpPolicy:
    """POLICY_FAILURE unless this platform can honour ``policy`` (module docstring)."""
    if policy & _RESERVED_63_26:
        raise FirmwareError(Status.POLICY_FAILURE, f"policy {policy:#x} sets bits 63:26")
    extra = policy & ~policy_bits(fw.profile.zen)
    if extra:
        raise FirmwareError(Status.POLICY_FAILURE, f"{fw.profile.product} firmware knows no policy bits {extra:#x}")
    try:
        p = SnpPolicy.decode(policy.to_bytes(8, "little"))
    except LayoutError as exc:  # pragma: no cover - every bit 25:0 is a field
        raise FirmwareError(Status.POLICY_FAILURE, str(exc)) from None
    if not p.rsvd_mbo:
        raise FirmwareError(Status.POLICY_FAILURE, "policy bit 17 must be one")
    if not p.smt:
        raise FirmwareError(Status.POLICY_FAILURE, "policy forbids SMT, which this platform has enabled")
    if (p.abi_major, p.abi_minor) > st.api:
        raise FirmwareError(Status.POLICY_FAILURE, f"policy needs SNP ABI {p.abi_major}.{p.abi_minor}, "
                            f"the firmware has {st.api[0]}.{st.api[1]}")
    if p.mem_aes_256_xts and fw.profile.mem_mode != EncryptionMode.XTS256:
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires AES-256-XTS memory encryption")
    if p.rapl_dis and not st.rapl_dis:
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires RAPL disabled (SNP_INIT_EX RAPL_DIS)")
    if p.ciphertext_hiding_dram and not st.ciphertext_hiding:
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires ciphertext hiding (SNP_INIT_EX)")
    return p


def _page_addr(paddr: int) -> None:
    if paddr % PAGE:
        raise FirmwareError(Status.INVALID_PARAM, f"address {paddr:#x} is not page aligned")


@SNP_API.platform(CommandId.SNP_GCTX_CREATE, SnpAddrCmd, ANY_STATE)
def snp_gctx_create(fw: Firmware, cmd: SnpAddrCmd) -> None:
    st = snp_state(fw)
    spa, _ = fw.ports.dma.strip(cmd.address)
    _page_addr(spa)
    st.need_init()
    if st.page_state(spa) != RmpPageState.FIRMWARE:
        raise FirmwareError(Status.INVALID_PAGE_STATE, f"GCTX page {spa:#x} is not a Firmware page")
    port = st.port()
    entry = port.entry(spa)
    if entry.page_size:
        raise FirmwareError(Status.INVALID_PAGE_SIZE, "the GCTX page must be a 4 KiB page")
    fw.ports.dma.write(spa, bytes(PAGE))  # the firmware clears the page it now keeps its context in
    port.update(spa, entry, vmsa=True)  # Firmware -> Context
    st.guests[spa] = SnpGuest(gctx=spa, vek=fw.new_key(), launch_tcb=st.committed_tcb)


@SNP_API.platform(CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd, ANY_STATE)
def snp_launch_start(fw: Firmware, cmd: SnpLaunchStartCmd) -> None:
    st = snp_state(fw)
    _page_addr(cmd.gctx_paddr)
    if cmd.flags.ma_en:
        _page_addr(cmd.ma_gctx_paddr)
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    if g.state != SnpGuestState.INIT:
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest at {g.gctx:#x} is {g.state.name}, not INIT")
    ma = st.guest(cmd.ma_gctx_paddr) if cmd.flags.ma_en else None
    p = check_snp_policy(fw, st, cmd.policy)
    if ma is not None:
        if not p.migrate_ma:
            raise FirmwareError(Status.POLICY_FAILURE, "a migration agent needs policy MIGRATE_MA")
        if ma.report_id_ma != b"\xff" * 32:
            raise FirmwareError(Status.POLICY_FAILURE, "the migration agent is itself bound to an agent")
        if p.single_socket and not ma.snp_policy.single_socket:
            raise FirmwareError(Status.POLICY_FAILURE, "a SINGLE_SOCKET guest needs a SINGLE_SOCKET agent")
    trng = fw.ports.trng
    g.policy = cmd.policy
    g.vmpck = (trng(32), trng(32), trng(32), trng(32))
    g.vmrk = trng(32)
    g.report_id = trng(32)
    if ma is not None:
        g.report_id_ma = ma.report_id
    g.imi_en = cmd.flags.imi_en
    g.gosvw = cmd.gosvw
    g.desired_tsc_khz = cmd.desired_tsc_khz
    st.guest_count += 1
    g.state = SnpGuestState.LAUNCH


def _activate(fw: Firmware, st: SnpPlatform, g: SnpGuest, asid: int, ex: bool) -> None:
    if g.state not in (SnpGuestState.LAUNCH, SnpGuestState.RUNNING):
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest at {g.gctx:#x} is {g.state.name}")
    p = fw.profile
    if asid not in p.es_asids() or (st.max_snp_asid and asid > st.max_snp_asid):
        raise FirmwareError(Status.INVALID_ASID, f"ASID {asid} is not an SEV-SNP ASID on {p.product}")
    if not (ex and g.asid) and st.port().asid_pages(asid):
        raise FirmwareError(Status.INVALID_CONFIG, f"pages are still assigned to ASID {asid} in the RMP")
    if g.asid:
        raise FirmwareError(Status.ACTIVE, f"guest at {g.gctx:#x} is already active on ASID {g.asid}")
    if asid in fw.asid_owner:
        raise FirmwareError(Status.ASID_OWNED, f"ASID {asid} belongs to another guest")
    if asid in fw.asid_dirty:
        if fw.asid_dirty[asid] >= fw.ports.flush_epoch():
            raise FirmwareError(Status.WBINVD_REQUIRED, f"ASID {asid} reused without WBINVD")
        raise FirmwareError(Status.DF_FLUSH_REQUIRED, f"ASID {asid} reused without SNP_DF_FLUSH")
    fw.ports.keys.load(asid, g.vek)
    fw.asid_owner[asid] = -g.gctx  # SNP guests own ASIDs under a name no legacy handle can take
    g.asid = asid


@SNP_API.platform(CommandId.SNP_ACTIVATE, SnpActivateCmd, ANY_STATE)
def snp_activate(fw: Firmware, cmd: SnpActivateCmd) -> None:
    st = snp_state(fw)
    _page_addr(cmd.gctx_paddr)
    st.need_init()
    _activate(fw, st, st.guest(cmd.gctx_paddr), cmd.asid, False)


@SNP_API.platform(CommandId.SNP_ACTIVATE_EX, SnpActivateExCmd, ANY_STATE)
def snp_activate_ex(fw: Firmware, cmd: SnpActivateExCmd) -> None:
    st = snp_state(fw)
    if cmd.ex_len != SnpActivateExCmd.SIZE:
        raise FirmwareError(Status.INVALID_PARAM, f"SNP_ACTIVATE_EX ex_len {cmd.ex_len:#x}")
    _page_addr(cmd.gctx_paddr)
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    if cmd.num_ids:
        try:
            fw.ports.dma.check(fw.ports.dma.strip(cmd.ids_paddr)[0], 4 * cmd.num_ids)
        except AddressError as exc:
            raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    _activate(fw, st, g, cmd.asid, True)


def deactivate(fw: Firmware, g: SnpGuest) -> None:
    """Take ``g``'s ASID away (its key stays for write-backs; the ASID is dirty until WBINVD + DF_FLUSH)."""
    if not g.asid:
        return
    fw.asid_owner.pop(g.asid, None)
    fw.ports.keys.invalidate(g.asid)
    fw.asid_dirty[g.asid] = fw.ports.flush_epoch()
    g.asid = 0


@SNP_API.platform(CommandId.SNP_DECOMMISSION, SnpAddrCmd, ANY_STATE)
def snp_decommission(fw: Firmware, cmd: SnpAddrCmd) -> None:
    st = snp_state(fw)
    _page_addr(cmd.address)
    st.need_init()
    g = st.guest(cmd.address)
    deactivate(fw, g)
    if g.state != SnpGuestState.INIT:
        st.guest_count -= 1
    del st.guests[g.gctx]
    port = st.port()
    port.update(g.gctx, port.entry(g.gctx), vmsa=False)  # Context -> Firmware


@SNP_API.platform(CommandId.SNP_GUEST_STATUS, SnpGuestStatusCmd, ANY_STATE)
def snp_guest_status(fw: Firmware, cmd: SnpGuestStatusCmd) -> None:
    st = snp_state(fw)
    _page_addr(cmd.gctx_paddr)
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    write_output(fw, st, cmd.address, SnpGuestStatus(policy=g.policy, asid=g.asid, state=int(g.state)))


_RECLAIMABLE = {RmpPageState.METADATA, RmpPageState.FIRMWARE, RmpPageState.PRE_GUEST, RmpPageState.PRE_SWAP}


@SNP_API.platform(CommandId.SNP_PAGE_RECLAIM, SnpPageCmd, ANY_STATE)
def snp_page_reclaim(fw: Firmware, cmd: SnpPageCmd) -> None:
    st = snp_state(fw)
    if cmd.paddr & (PAGE - 1) & ~PADDR_PAGE_SIZE_2M:
        raise FirmwareError(Status.INVALID_PARAM, f"reserved bits set in {cmd.paddr:#x}")
    spa, _ = fw.ports.dma.strip(cmd.paddr & ~(PAGE - 1))
    huge = bool(cmd.paddr & PADDR_PAGE_SIZE_2M)
    st.need_init()
    try:
        fw.ports.dma.check(spa, PAGE_2M if huge else PAGE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    state = st.page_state(spa)
    port = st.port()
    entry = port.entry(spa)
    if bool(entry.page_size) != huge:
        raise FirmwareError(Status.INVALID_PAGE_SIZE, f"page {spa:#x}: RMP page size differs from the request")
    if huge and spa % PAGE_2M:
        raise FirmwareError(Status.INVALID_ADDRESS, f"2 MiB page {spa:#x} is not 2 MiB aligned")
    if not entry.immutable:
        return  # already reclaimed
    if state not in _RECLAIMABLE:
        raise FirmwareError(Status.INVALID_PAGE_STATE, f"page {spa:#x} is {state.name}: not reclaimable")
    port.update(spa, entry, immutable=False, gpa=0 if state == RmpPageState.METADATA else entry.gpa)


@SNP_API.platform(CommandId.SNP_PAGE_UNSMASH, SnpPageCmd, ANY_STATE)
def snp_page_unsmash(fw: Firmware, cmd: SnpPageCmd) -> None:
    st = snp_state(fw)
    if cmd.paddr & (PAGE - 1) & ~PADDR_PAGE_SIZE_2M or cmd.paddr % PAGE_2M:
        raise FirmwareError(Status.INVALID_PARAM, f"{cmd.paddr:#x} is not a 2 MiB-aligned address")
    spa, _ = fw.ports.dma.strip(cmd.paddr)
    st.need_init()
    port = st.port()
    rmp = port.rmp
    if spa + PAGE_2M > rmp.covered:
        raise FirmwareError(Status.INVALID_ADDRESS, f"{spa:#x} is not covered by the RMP")
    if rmp.in_region(spa, PAGE_2M):
        raise FirmwareError(Status.INVALID_ADDRESS, "the range overlaps the RMP itself")
    entries = [rmp.raw_entry(spa + i * PAGE) for i in range(PAGE_2M // PAGE)]
    first = entries[0]
    if first.gpa % PAGE_2M:
        raise FirmwareError(Status.INVALID_PAGE_STATE, "the first page's GPA is not 2 MiB aligned")
    for i, e in enumerate(entries):
        if (e.page_size or not e.immutable or e.vmsa or not e.asid or e.asid != first.asid
                or e.state != first.state or e.gpa != first.gpa + i * PAGE):
            raise FirmwareError(Status.INVALID_PAGE_STATE, f"page {i} of {spa:#x} cannot join a 2 MiB page")
    port.update(spa, first, huge=True)


def _dbg_pages(fw: Firmware, st: SnpPlatform, cmd: SnpDbgCmd, decrypt: bool) -> tuple[SnpGuest, int, int]:
    for a in (cmd.gctx_paddr, cmd.src_addr, cmd.dst_addr):
        _page_addr(fw.ports.dma.strip(a)[0])
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    src, _ = fw.ports.dma.strip(cmd.src_addr)
    dst, _ = fw.ports.dma.strip(cmd.dst_addr)
    guest_page, plain_page = (src, dst) if decrypt else (dst, src)
    guest_states = {RmpPageState.PRE_GUEST, RmpPageState.PRE_SWAP, RmpPageState.GUEST_INVALID,
                    RmpPageState.GUEST_VALID}
    if st.page_state(guest_page) not in guest_states or st.page_state(plain_page) != RmpPageState.FIRMWARE:
        raise FirmwareError(Status.INVALID_PAGE_STATE, "DBG: the guest page must be a guest page, the other a Firmware page")
    if st.port().entry(guest_page).asid != g.asid:
        raise FirmwareError(Status.INVALID_PAGE_OWNER, f"page {guest_page:#x} is not this guest's")
    if not g.snp_policy.debug:
        raise FirmwareError(Status.POLICY_FAILURE, "the guest's policy forbids debugging")
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, "the guest is not active")
    return g, guest_page, plain_page


@SNP_API.platform(CommandId.SNP_DBG_DECRYPT, SnpDbgCmd, ANY_STATE)
def snp_dbg_decrypt(fw: Firmware, cmd: SnpDbgCmd) -> None:
    st = snp_state(fw)
    g, guest_page, plain_page = _dbg_pages(fw, st, cmd, True)
    fw.ports.dma.write(plain_page, fw.ports.dma.read_encrypted(guest_page, PAGE, g.asid))


@SNP_API.platform(CommandId.SNP_DBG_ENCRYPT, SnpDbgCmd, ANY_STATE)
def snp_dbg_encrypt(fw: Firmware, cmd: SnpDbgCmd) -> None:
    st = snp_state(fw)
    g, guest_page, plain_page = _dbg_pages(fw, st, cmd, False)
    fw.ports.dma.write_encrypted(guest_page, fw.ports.dma.read(plain_page, PAGE), g.asid)
