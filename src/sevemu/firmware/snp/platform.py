"""SNP platform commands: SNP_INIT, SNP_INIT_EX, SNP_SHUTDOWN, SNP_SHUTDOWN_EX, SNP_PLATFORM_STATUS,
SNP_DF_FLUSH, SNP_CONFIG, SNP_COMMIT, SNP_FEATURE_INFO (SNP ABI 56860 ch. 8; AMD-ASPFW ``sev_mcmd.c``
``snp_mcmd_*``; Linux ``drivers/crypto/ccp/sev-dev.c`` for the order the host issues them in).

Every SNP command is registered for every legacy platform state: the SNP platform has its own state
(:class:`~sevemu.abi.snp.SnpPlatformState`), checked by the handler after the buffer's reserved
fields, in AMD-ASPFW's order.  The legacy and SNP state machines meet where AMD's firmware makes them
meet: SNP_INIT needs the legacy platform UNINIT ("Must Init SNP first if want to run both"), SNP_SHUTDOWN
needs it UNINIT again ("SNP cannot be shutdown while SEV is running").

SNP_INIT initialises the RMP (AMD-ASPFW ``configure_rmp``): every entry Hypervisor, the table's own
pages Firmware pages, the ranges of an SNP_INIT_EX RANGE_LIST hypervisor-fixed (immutable, unassigned);
it needs SYSCFG.SNP_EN on the cores (INVALID_CONFIG otherwise) and leaves every ASID invalid and dirty,
as legacy INIT does (Linux issues WBINVD and SNP_DF_FLUSH right after it).

Output pages (SNP_PLATFORM_STATUS, SNP_FEATURE_INFO once SNP is initialised) must be Firmware pages
(INVALID_PAGE_STATE otherwise; Linux marks them with ``rmp_mark_pages_firmware`` and reclaims them
after), and must not cross a page boundary (INVALID_PARAM).
"""

from __future__ import annotations

from sevemu._util.units import PAGE
from sevemu.abi.commands import CommandId
from sevemu.abi.rmp import RmpPageState
from sevemu.abi.snp import (
    SnpAddrCmd,
    SnpCommitCmd,
    SnpConfigCmd,
    SnpFeatureInfo,
    SnpFeatureInfoCmd,
    SnpFeatureInfoEcx,
    SnpInitExCmd,
    SnpPlatformFlags,
    SnpPlatformInit,
    SnpPlatformState,
    SnpPlatformStatus,
    SnpShutdownExCmd,
)
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.crypto.memenc import EncryptionMode
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.checks import flush_dirty_asids
from sevemu.firmware.core import ANY_STATE, Firmware
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.state import SnpPlatform, snp_state

__all__ = ["write_output"]

_RANGE_ENTRY = 16


def write_output(fw: Firmware, st: SnpPlatform, paddr: int, out: Struct) -> None:
    """Write ``out`` at ``paddr`` for the host: within one page (INVALID_PARAM), in DRAM
    (INVALID_ADDRESS), and once SNP is initialised a Firmware page (INVALID_PAGE_STATE)."""
    spa, _ = fw.ports.dma.strip(paddr)
    if spa % PAGE + out.SIZE > PAGE:
        raise FirmwareError(Status.INVALID_PARAM, f"output at {spa:#x} crosses a page boundary")
    try:
        fw.ports.dma.check(spa, out.SIZE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    if st.state == SnpPlatformState.INIT and st.page_state(spa) != RmpPageState.FIRMWARE:
        raise FirmwareError(Status.INVALID_PAGE_STATE, f"output page {spa:#x} is not a Firmware page")
    fw.ports.dma.write(spa, out.encode())


def _range_list(fw: Firmware, paddr: int) -> list[tuple[int, int]]:
    """The RANGE_LIST of SNP_INIT_EX (num u32, rsvd u32, {base u64, page_count u32, rsvd u32}[])."""
    dma = fw.ports.dma
    spa, _ = dma.strip(paddr)
    try:
        head = dma.read(spa, 8)
        n = int.from_bytes(head[:4], "little")
        if n * _RANGE_ENTRY + 8 > PAGE:
            raise FirmwareError(Status.INVALID_PARAM, f"RANGE_LIST of {n} ranges exceeds its page")
        body = dma.read(spa + 8, n * _RANGE_ENTRY)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    ranges = []
    for i in range(n):
        e = body[i * _RANGE_ENTRY : (i + 1) * _RANGE_ENTRY]
        base, count = int.from_bytes(e[:8], "little"), int.from_bytes(e[8:12], "little")
        if base % PAGE or e[12:] != bytes(4):
            raise FirmwareError(Status.INVALID_PARAM, f"RANGE_LIST entry {i} is malformed")
        ranges.append((base, count))
    return ranges


def _init(fw: Firmware, ex: SnpInitExCmd | None) -> None:
    st = snp_state(fw)
    if st.state != SnpPlatformState.UNINIT or fw.state != PlatformState.UNINIT:
        raise FirmwareError(Status.INVALID_PLATFORM_STATE, "SNP_INIT needs both the SNP and the SEV platform UNINIT")
    port = st.port()
    rmp = port.rmp
    init_rmp = True
    ranges: list[tuple[int, int]] = []
    if ex is not None:
        if not ex.flags.init_rmp:
            if not rmp.initialized:
                raise FirmwareError(Status.RMP_INIT_REQUIRED, "the RMP was never initialised")
            init_rmp = False
        if ex.flags.list_paddr_en:
            if not init_rmp:
                raise FirmwareError(Status.INVALID_PARAM, "a RANGE_LIST needs INIT_RMP")
            ranges = _range_list(fw, ex.list_paddr)
        if ex.flags.ciphertext_hiding_en and fw.profile.zen < 5:
            raise FirmwareError(Status.INVALID_PARAM, f"{fw.profile.product} has no ciphertext hiding")
        if ex.flags.tio_en:
            raise FirmwareError(Status.INVALID_PARAM, "SEV-TIO is not modelled")
        if ex.max_snp_asid > fw.profile.max_asid:
            raise FirmwareError(Status.INVALID_PARAM, f"max_snp_asid {ex.max_snp_asid} exceeds the part's ASIDs")
    if not rmp.enabled or not rmp.bounds_valid():
        raise FirmwareError(Status.INVALID_CONFIG, "SYSCFG.SNP_EN is clear or RMP_BASE/RMP_END invalid")
    for base, count in ranges:
        if base + count * PAGE > rmp.covered:
            raise FirmwareError(Status.INVALID_PARAM, f"range {base:#x}+{count} pages is not covered by the RMP")
    if init_rmp:
        port.initialize()
        for base, count in ranges:
            for spa in range(base, base + count * PAGE, PAGE):
                port.set(spa, assigned=False, immutable=True)  # HV_FIXED (AMD-ASPFW RMP_ENTRY_VAL_HV_FIXED)
    keys = fw.ports.keys
    for asid in fw.profile.all_asids():
        keys.invalidate(asid)
    fw.asid_dirty = dict.fromkeys(fw.profile.all_asids(), fw.ports.flush_epoch())
    if ex is not None:
        st.rapl_dis = ex.flags.rapl_dis
        st.ciphertext_hiding = ex.flags.ciphertext_hiding_en
        st.max_snp_asid = ex.max_snp_asid
    st.state = SnpPlatformState.INIT


@SNP_API.bare(CommandId.SNP_INIT, ANY_STATE)
def snp_init(fw: Firmware) -> None:
    _init(fw, None)


@SNP_API.platform(CommandId.SNP_INIT_EX, SnpInitExCmd, ANY_STATE)
def snp_init_ex(fw: Firmware, cmd: SnpInitExCmd) -> None:
    _init(fw, cmd)


def _shutdown(fw: Firmware, ex: SnpShutdownExCmd | None) -> None:
    st = snp_state(fw)
    if fw.state != PlatformState.UNINIT:
        raise FirmwareError(Status.INVALID_PLATFORM_STATE, "SNP cannot be shut down while SEV is running")
    if st.state == SnpPlatformState.UNINIT:
        return
    if fw.asid_dirty:
        raise FirmwareError(Status.DF_FLUSH_REQUIRED, "every ASID must be clean (WBINVD, SNP_DF_FLUSH)")
    if ex is not None:
        if ex.len != SnpShutdownExCmd.SIZE:
            raise FirmwareError(Status.INVALID_PARAM, f"SNP_SHUTDOWN_EX length {ex.len:#x}")
        if ex.flags.x86_snp_shutdown and not ex.flags.iommu_snp_shutdown:
            raise FirmwareError(Status.INVALID_PARAM, "X86_SNP_SHUTDOWN requires IOMMU_SNP_SHUTDOWN")
    for g in st.guests.values():
        if g.asid:
            fw.ports.keys.invalidate(g.asid)
            fw.asid_owner.pop(g.asid, None)
    st.guests.clear()
    st.guest_count = 0
    if ex is not None and ex.flags.x86_snp_shutdown:
        st.port().shutdown()
    st.state = SnpPlatformState.UNINIT
    st.vlek, st.vlek_sticks = None, b""  # AMD-ASPFW snp_mcmd_shutdown_common: "Wipe the VLEK"


@SNP_API.bare(CommandId.SNP_SHUTDOWN, ANY_STATE)
def snp_shutdown(fw: Firmware) -> None:
    _shutdown(fw, None)


@SNP_API.platform(CommandId.SNP_SHUTDOWN_EX, SnpShutdownExCmd, ANY_STATE)
def snp_shutdown_ex(fw: Firmware, cmd: SnpShutdownExCmd) -> None:
    _shutdown(fw, cmd)


@SNP_API.platform(CommandId.SNP_PLATFORM_STATUS, SnpAddrCmd, ANY_STATE)
def snp_platform_status(fw: Firmware, cmd: SnpAddrCmd) -> None:
    st = snp_state(fw)
    rmp = None if st.rmp is None else st.rmp.rmp
    p = fw.profile
    status = SnpPlatformStatus(
        api_major=st.api[0], api_minor=st.api[1], state=int(st.state),
        init=SnpPlatformInit(is_rmp_initialized=bool(rmp and rmp.initialized)),
        build_id=p.build,
        flags=SnpPlatformFlags(mask_chip_id=st.mask_chip_id, mask_chip_key=st.mask_chip_key,
                               vlek_en=st.vlek is not None, feature_info=True,
                               rapl_dis=st.rapl_dis, ciphertext_hiding_cap=p.zen >= 5,
                               ciphertext_hiding_en=st.ciphertext_hiding),
        guest_count=st.guest_count, current_tcb=st.current_tcb, reported_tcb=st.reported_tcb,
    )
    write_output(fw, st, cmd.address, status)


@SNP_API.bare(CommandId.SNP_DF_FLUSH, ANY_STATE)
def snp_df_flush(fw: Firmware) -> None:
    snp_state(fw).need_init()
    flush_dirty_asids(fw)


def _tcb_above(a: int, b: int) -> bool:
    """Some SVN of TCB_VERSION ``a`` exceeds the same byte of ``b`` (AMD-ASPFW ``tcb_compare_versions``)."""
    return any(((a >> s) & 0xFF) > ((b >> s) & 0xFF) for s in range(0, 64, 8))


@SNP_API.platform(CommandId.SNP_CONFIG, SnpConfigCmd, ANY_STATE)
def snp_config(fw: Firmware, cmd: SnpConfigCmd) -> None:
    st = snp_state(fw)
    st.need_init()
    tcb = cmd.reported_tcb or st.current_tcb
    if _tcb_above(tcb, st.current_tcb):
        raise FirmwareError(Status.INVALID_PARAM, f"REPORTED_TCB {tcb:#018x} above the running {st.current_tcb:#018x}")
    st.reported_tcb = tcb
    st.mask_chip_id = cmd.flags.mask_chip_id
    st.mask_chip_key = cmd.flags.mask_chip_key


@SNP_API.platform(CommandId.SNP_COMMIT, SnpCommitCmd, ANY_STATE)
def snp_commit(fw: Firmware, cmd: SnpCommitCmd) -> None:
    st = snp_state(fw)
    if cmd.len != SnpCommitCmd.SIZE:
        raise FirmwareError(Status.INVALID_PARAM, f"SNP_COMMIT length {cmd.len}")
    st.need_init()
    st.committed_tcb = st.current_tcb


@SNP_API.platform(CommandId.SNP_FEATURE_INFO, SnpFeatureInfoCmd, ANY_STATE)
def snp_feature_info(fw: Firmware, cmd: SnpFeatureInfoCmd) -> None:
    st = snp_state(fw)
    if cmd.length != SnpFeatureInfoCmd.SIZE:
        raise FirmwareError(Status.INVALID_PARAM, f"SNP_FEATURE_INFO length {cmd.length:#x}")
    if cmd.ecx_in != 0:
        raise FirmwareError(Status.INVALID_PARAM, f"SNP_FEATURE_INFO sub-function {cmd.ecx_in} does not exist")
    p = fw.profile
    ecx = SnpFeatureInfoEcx.X86_SHUTDOWN | SnpFeatureInfoEcx.RAPL_DISABLE
    if p.mem_mode == EncryptionMode.XTS256:
        ecx |= SnpFeatureInfoEcx.AES_256_XTS_POLICY
    if p.zen >= 5:
        ecx |= SnpFeatureInfoEcx.CIPHERTEXT_HIDING | SnpFeatureInfoEcx.CXL_ALLOW_POLICY
    write_output(fw, st, cmd.feature_info_paddr, SnpFeatureInfo(ecx=int(ecx)))
