"""Platform commands: INIT, INIT_EX, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH (SEV API 55766 ch. 5:
INIT, INIT_EX, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH; AMD-ASPFW ``sev_mcmd.c``, ``sev_plat.c``).

INIT moves UNINIT -> INIT.  Checks in the order of AMD's firmware (AMD-ASPFW
``sev_mcmd_init_common``, ``sev_es_reserve_trusted_region``): an option bit other than CONFIG.ES, or
non-zero reserved bytes, INVALID_CONFIG (``init_cmd_buf_valid``); the NV store (SECURE_DATA_INVALID);
then, with CONFIG.ES, the Trusted Memory Region: not 1 MiB aligned INVALID_ADDRESS, not exactly
1 MiB INVALID_LENGTH, outside DRAM or over the legacy ASEG INVALID_ADDRESS.  A CPU without SEV-ES
ASIDs answers an ES INIT with INVALID_CONFIG (model choice: AF does not check; Linux never asks).
Without CONFIG.ES the TMR fields are ignored.  The TMR is reserved at INIT and usable from the next
DF_FLUSH (:mod:`sevemu.firmware.tmr`); PLATFORM_STATUS reports CONFIG.ES.  AF writes NV records it
generated before it looks at the TMR; the model checks everything first, so a refused INIT changes
nothing.

Like AMD's firmware (``sev_mcmd_init_common``: ``mark_all_asids_invalid``, ``clear_wbinvd_done``,
every ``asid_dirty``), INIT marks every ASID invalid for VMRUN and dirty: none can be ACTIVATEd
until the host did a WBINVD and then a DF_FLUSH (ACTIVATE: WBINVD_REQUIRED, then
DF_FLUSH_REQUIRED), which is why Linux runs WBINVD + DF_FLUSH right after INIT
(``drivers/crypto/ccp/sev-dev.c``, ``__sev_platform_init_locked``).  Whatever a guest of an earlier
INIT left in the caches is thus written back under that guest's key before its ASID has a new one.

SHUTDOWN returns to UNINIT from INIT or WORKING, forgetting every guest.  Like AMD's firmware
(``sev_clear``: "mark all ASIDs invalid"; ``sev_guest_deactivate``: "We do not clear umc key here
anymore") it marks every ASID invalid for VMRUN and leaves the keys in the memory controller's
slots: lines still in the caches are written back encrypted with the key they were written under.

DF_FLUSH clears the data-fabric write buffers for every dirty ASID (deactivated, or marked at
INIT).  It fails WBINVD_REQUIRED while any of them became dirty after the last WBINVD (Linux:
"DEACTIVATE will clear the WBINVD indicator causing DF_FLUSH to fail").  The first DF_FLUSH after an
ES INIT makes the TMR's checksum pool usable (AF ``mcmd_df_flush_common``).  SHUTDOWN zeroes the
checksum blocks and releases the TMR (AF ``sev_es_release_trusted_region``).

INIT_EX (AMD-ASPFW ``sev_mcmd_init_common``): options and reserved bytes as INIT (INVALID_CONFIG),
then ``length`` must be 0x24 (INVALID_LENGTH).  With ``nv_paddr`` 0 it is INIT: the NV store is the
platform's own (the SPI flash, here the sealed SQLite store of :mod:`sevemu.firmware.nvstore`).
Otherwise the firmware keeps its NV in that host buffer for this session: 4 KiB aligned and inside
DRAM (INVALID_ADDRESS), ``nv_len`` exactly 32 KiB (INVALID_LENGTH); after the NV contents, with
CONFIG.ES, the TMR's range (INVALID_ADDRESS), its overlap with the NV buffer (INVALID_ADDRESS), then
INIT's TMR checks.  An erased buffer (all 0xFF or
all 0x00) gets a fresh self-owned identity, sealed and written back at once; a buffer that does not
unseal with this chip's key, or whose records do not form a valid chain, is refused with
SECURE_DATA_INVALID (AMD's firmware also erases it; the model leaves a refused command's memory
alone).  Until the next INIT, PEK_GEN, PDH_GEN and PEK_CERT_IMPORT write the sealed image there (the
host persists it, as Linux does after those commands); PLATFORM_RESET always resets the SPI store.
A plain INIT returns to the SPI store's identity.

PLATFORM_STATUS reports the owner bit (1 = externally owned) in INIT and WORKING; in UNINIT it
reports 0, like the SEV-ES config bit and the guest count ("these values are invalid if we aren't
initialized", AMD-ASPFW ``sev_mcmd_platform_status``).
"""

from __future__ import annotations

from typing import Final

from sevemu._util.units import PAGE, is_aligned
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import (
    INIT_EX_LENGTH,
    INIT_EX_NV_LEN,
    InitCmd,
    InitExCmd,
    InitOptions,
    PlatformConfig,
    PlatformStatus,
)
from sevemu.abi.states import PlatformOwner, PlatformState
from sevemu.abi.status import Status
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.checks import flush_dirty_asids
from sevemu.firmware.core import ANY_STATE, READY, Firmware
from sevemu.firmware.identity import PlatformIdentity
from sevemu.firmware.nvstore import NvStoreError, NvTamperedError, seal_host_nv, unseal_host_nv
from sevemu.firmware.sev.api import SEV_API
from sevemu.firmware.tmr import CRC_BLOCK, TMR_SIZE, Tmr

__all__ = ["UNINIT"]

UNINIT: Final = frozenset({PlatformState.UNINIT})


_ASEG: Final = (0xA0000, 0xC0000)
"""The legacy SMM ASEG, which no x86 range may touch (AF ``validate_address_range``)."""


def _check_config(options: int) -> bool:
    """Whether INIT asks for SEV-ES; INVALID_CONFIG for an option bit AF does not know (AF
    ``init_cmd_buf_valid``: every ``flags`` bit but CONFIG.ES must be zero)."""
    if options & ~int(InitOptions.SEV_ES):
        raise FirmwareError(Status.INVALID_CONFIG, f"unknown INIT options {options:#x}")
    return bool(options & InitOptions.SEV_ES)


def _reserve_tmr(fw: Firmware, tmr_paddr: int, tmr_len: int) -> Tmr:
    """The TMR of an INIT with CONFIG.ES (AF ``sev_es_reserve_trusted_region``): 1 MiB aligned
    (INVALID_ADDRESS), exactly 1 MiB (INVALID_LENGTH), in DRAM and clear of the legacy ASEG
    (INVALID_ADDRESS).  A CPU without SEV-ES ASIDs answers INVALID_CONFIG (model choice)."""
    if not fw.profile.sev_es:
        raise FirmwareError(Status.INVALID_CONFIG, "this CPU has no SEV-ES ASIDs")
    spa, _ = fw.ports.dma.strip(tmr_paddr)
    if not is_aligned(spa, TMR_SIZE):
        raise FirmwareError(Status.INVALID_ADDRESS, f"TMR {spa:#x} is not 1 MiB aligned")
    if tmr_len != TMR_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"TMR length {tmr_len:#x}, expected 1 MiB")
    if spa < _ASEG[1] and _ASEG[0] < spa + TMR_SIZE:
        raise FirmwareError(Status.INVALID_ADDRESS, f"TMR {spa:#x} overlaps the legacy ASEG")
    try:
        fw.ports.dma.check(spa, TMR_SIZE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    return Tmr(spa)


def _spi_identity(fw: Firmware) -> tuple[PlatformIdentity, bool] | None:
    """The SPI store's identity (and whether it is freshly made) when the last INIT_EX used a host
    buffer; None: already current."""
    if fw.nv_area is None or fw.nv is None:
        return None
    try:
        return fw.identity.with_records(fw.nv.read(), fw.ports.trng)
    except NvTamperedError as exc:  # AF sev_mcmd_init_common: a store that does not unseal
        raise FirmwareError(Status.SECURE_DATA_INVALID, str(exc)) from exc
    except NvStoreError as exc:
        raise FirmwareError(Status.HWERROR_PLATFORM, str(exc)) from exc


def _invalidate_all(fw: Firmware) -> None:
    """Every ASID invalid for VMRUN; the keys stay in their slots (AF ``mark_all_asids_invalid``)."""
    keys = fw.ports.keys
    for asid in fw.profile.all_asids():
        keys.invalidate(asid)


def _enter_init(fw: Firmware, tmr: Tmr | None) -> None:
    _invalidate_all(fw)
    epoch = fw.ports.flush_epoch()
    fw.asid_dirty = dict.fromkeys(fw.profile.all_asids(), epoch)
    fw.state = PlatformState.INIT
    fw.config_es = tmr is not None
    fw.tmr = tmr


@SEV_API.platform(CommandId.INIT, InitCmd, UNINIT, malformed=Status.INVALID_CONFIG)
def init(fw: Firmware, cmd: InitCmd) -> None:
    es = _check_config(cmd.options)
    spi = _spi_identity(fw)
    tmr = _reserve_tmr(fw, cmd.tmr_paddr, cmd.tmr_len) if es else None
    if spi is not None:
        ident, fresh = spi
        if fresh and fw.nv is not None:
            try:
                fw.nv.commit(ident.nv_records())
            except NvStoreError as exc:
                raise FirmwareError(Status.HWERROR_PLATFORM, str(exc)) from exc
        fw.identity = ident
        fw.nv_area = None
    _enter_init(fw, tmr)


@SEV_API.platform(CommandId.INIT_EX, InitExCmd, UNINIT, malformed=Status.INVALID_CONFIG)
def init_ex(fw: Firmware, cmd: InitExCmd) -> None:
    es = _check_config(cmd.options)
    if cmd.length != INIT_EX_LENGTH:
        raise FirmwareError(Status.INVALID_LENGTH, f"INIT_EX length {cmd.length:#x}, expected 0x24")
    if not cmd.nv_paddr:
        init(fw, InitCmd(options=cmd.options, tmr_paddr=cmd.tmr_paddr, tmr_len=cmd.tmr_len))
        return
    dma = fw.ports.dma
    nv_spa, _ = dma.strip(cmd.nv_paddr)
    if not is_aligned(nv_spa, PAGE):
        raise FirmwareError(Status.INVALID_ADDRESS, "the NV buffer must be 4 KiB aligned")
    try:
        dma.check(nv_spa, max(cmd.nv_len, 1))
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    if cmd.nv_len != INIT_EX_NV_LEN:
        raise FirmwareError(Status.INVALID_LENGTH, f"nv_len {cmd.nv_len:#x}, expected 32 KiB")
    current = fw.identity
    key = current.nv_seal_key()
    try:
        ident, fresh = current.with_records(unseal_host_nv(key, dma.read(nv_spa, INIT_EX_NV_LEN)),
                                            fw.ports.trng)
    except NvStoreError as exc:
        raise FirmwareError(Status.SECURE_DATA_INVALID, str(exc)) from None
    tmr = None
    if es:  # AF: the TMR's range and its overlap with the NV buffer first, then the reservation
        tmr_spa, _ = dma.strip(cmd.tmr_paddr)
        try:
            dma.check(tmr_spa, max(cmd.tmr_len, 1))
        except AddressError as exc:
            raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
        if nv_spa < tmr_spa + TMR_SIZE and tmr_spa < nv_spa + INIT_EX_NV_LEN:
            raise FirmwareError(Status.INVALID_ADDRESS, "the NV buffer overlaps the TMR")
        tmr = _reserve_tmr(fw, cmd.tmr_paddr, cmd.tmr_len)
    if fresh:
        dma.write(nv_spa, seal_host_nv(key, ident.nv_records(), fw.ports.trng(12)))
    fw.identity = ident
    fw.nv_area = nv_spa
    _enter_init(fw, tmr)


def _release_tmr(fw: Firmware) -> None:
    """SHUTDOWN's end of the TMR (AF ``sev_es_release_trusted_region``): the checksum blocks are
    zeroed (``pool_vcpu_destroy``, when the pool was set up) and the region is the host's again."""
    tmr = fw.tmr
    if tmr is not None and tmr.ready:
        fw.ports.dma.write(tmr.crc_base, bytes(tmr.blocks * CRC_BLOCK))
    fw.tmr = None


@SEV_API.bare(CommandId.SHUTDOWN, READY)
def shutdown(fw: Firmware) -> None:
    _invalidate_all(fw)
    _release_tmr(fw)
    fw.guests.clear()
    fw.asid_owner.clear()
    fw.state = PlatformState.UNINIT
    fw.config_es = False


@SEV_API.output(CommandId.PLATFORM_STATUS, PlatformStatus, ANY_STATE)
def platform_status(fw: Firmware) -> PlatformStatus:
    major, minor, build = fw.api_version
    owner = PlatformOwner.SELF_OWNED
    if fw.state != PlatformState.UNINIT and fw.nv is not None and fw.identity.owner_external:
        owner = PlatformOwner.EXTERNAL
    return PlatformStatus(
        api_major=major,
        api_minor=minor,
        state=int(fw.state),
        owner=int(owner),
        config=int(PlatformConfig.ES) if fw.config_es else 0,
        build=build,
        guest_count=len(fw.guests),
    )


@SEV_API.bare(CommandId.DF_FLUSH, READY)
def df_flush(fw: Firmware) -> None:
    flush_dirty_asids(fw)
    if fw.tmr is not None:  # AF mcmd_df_flush_common: "it is now safe to initialize the TMR"
        fw.tmr.ready = True
