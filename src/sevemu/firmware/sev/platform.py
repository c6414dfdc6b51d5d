"""Platform commands: INIT, INIT_EX, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH (SEV API 55766 ch. 5:
INIT, INIT_EX, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH; AMD-ASPFW ``sev_mcmd.c``, ``sev_plat.c``).

INIT moves UNINIT -> INIT; with ``options.SEV_ES`` it also enables SEV-ES, which needs a CPU that
has ES ASIDs and a 1 MiB, 1 MiB-aligned Trusted Memory Region (INVALID_ADDRESS / INVALID_LENGTH
otherwise; INVALID_CONFIG when the CPU has no ES ASIDs -- model choices where the spec is silent).
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
"DEACTIVATE will clear the WBINVD indicator causing DF_FLUSH to fail").

INIT_EX (AMD-ASPFW ``sev_mcmd_init_common``): ``length`` must be 0x24 (INVALID_LENGTH).  With
``nv_paddr`` 0 it is INIT: the NV store is the platform's own (the SPI flash, here the sealed SQLite
store of :mod:`sevemu.firmware.nvstore`).  Otherwise the firmware keeps its NV in that host buffer
for this session: 4 KiB aligned and inside DRAM (INVALID_ADDRESS), ``nv_len`` exactly 32 KiB
(INVALID_LENGTH), not overlapping the SEV-ES TMR (INVALID_ADDRESS).  An erased buffer (all 0xFF or
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
    SEV_TMR_LEN,
    InitCmd,
    InitExCmd,
    InitOptions,
    PlatformConfig,
    PlatformStatus,
)
from sevemu.abi.states import PlatformOwner, PlatformState
from sevemu.abi.status import Status
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.core import ANY_STATE, READY, Firmware
from sevemu.firmware.identity import PlatformIdentity
from sevemu.firmware.nvstore import NvStoreError, NvTamperedError, seal_host_nv, unseal_host_nv
from sevemu.firmware.sev.api import SEV_API

__all__ = ["UNINIT"]

UNINIT: Final = frozenset({PlatformState.UNINIT})


def _check_options(fw: Firmware, options: int, tmr_paddr: int, tmr_len: int) -> tuple[bool, tuple[int, int] | None]:
    """(SEV-ES enabled, TMR) of an INIT/INIT_EX request, refusing what the platform cannot do."""
    if options & ~int(InitOptions.SEV_ES):
        raise FirmwareError(Status.INVALID_PARAM, f"unknown INIT options {options:#x}")
    es = bool(options & InitOptions.SEV_ES)
    tmr = None
    if es:
        if not fw.profile.sev_es:
            raise FirmwareError(Status.INVALID_CONFIG, "this CPU has no SEV-ES ASIDs")
        spa, _ = fw.ports.dma.strip(tmr_paddr)
        if not is_aligned(spa, SEV_TMR_LEN) or spa == 0:
            raise FirmwareError(Status.INVALID_ADDRESS, "TMR must be 1 MiB aligned")
        if tmr_len != SEV_TMR_LEN:
            raise FirmwareError(Status.INVALID_LENGTH, "TMR must be 1 MiB")
        tmr = (spa, tmr_len)
    return es, tmr


def _spi_identity(fw: Firmware) -> PlatformIdentity | None:
    """The SPI store's identity when the last INIT_EX used a host buffer; None: already current."""
    if fw.nv_area is None or fw.nv is None:
        return None
    try:
        ident, fresh = fw.identity.with_records(fw.nv.read(), fw.ports.trng)
        if fresh:
            fw.nv.commit(ident.nv_records())
    except NvTamperedError as exc:  # AF sev_mcmd_init_common: a store that does not unseal
        raise FirmwareError(Status.SECURE_DATA_INVALID, str(exc)) from exc
    except NvStoreError as exc:
        raise FirmwareError(Status.HWERROR_PLATFORM, str(exc)) from exc
    return ident


def _invalidate_all(fw: Firmware) -> None:
    """Every ASID invalid for VMRUN; the keys stay in their slots (AF ``mark_all_asids_invalid``)."""
    keys = fw.ports.keys
    for asid in fw.profile.all_asids():
        keys.invalidate(asid)


def _enter_init(fw: Firmware, es: bool, tmr: tuple[int, int] | None) -> None:
    _invalidate_all(fw)
    epoch = fw.ports.flush_epoch()
    fw.asid_dirty = dict.fromkeys(fw.profile.all_asids(), epoch)
    fw.state = PlatformState.INIT
    fw.config_es = es
    fw.tmr = tmr


@SEV_API.platform(CommandId.INIT, InitCmd, UNINIT)
def init(fw: Firmware, cmd: InitCmd) -> None:
    es, tmr = _check_options(fw, cmd.options, cmd.tmr_paddr, cmd.tmr_len)
    spi = _spi_identity(fw)
    if spi is not None:
        fw.identity = spi
        fw.nv_area = None
    _enter_init(fw, es, tmr)


@SEV_API.platform(CommandId.INIT_EX, InitExCmd, UNINIT)
def init_ex(fw: Firmware, cmd: InitExCmd) -> None:
    if cmd.length != INIT_EX_LENGTH:
        raise FirmwareError(Status.INVALID_LENGTH, f"INIT_EX length {cmd.length:#x}, expected 0x24")
    es, tmr = _check_options(fw, cmd.options, cmd.tmr_paddr, cmd.tmr_len)
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
    if tmr is not None and nv_spa < tmr[0] + tmr[1] and tmr[0] < nv_spa + INIT_EX_NV_LEN:
        raise FirmwareError(Status.INVALID_ADDRESS, "the NV buffer overlaps the TMR")
    current = fw.identity
    key = current.nv_seal_key()
    try:
        ident, fresh = current.with_records(unseal_host_nv(key, dma.read(nv_spa, INIT_EX_NV_LEN)),
                                            fw.ports.trng)
    except NvStoreError as exc:
        raise FirmwareError(Status.SECURE_DATA_INVALID, str(exc)) from None
    if fresh:
        dma.write(nv_spa, seal_host_nv(key, ident.nv_records(), fw.ports.trng(12)))
    fw.identity = ident
    fw.nv_area = nv_spa
    _enter_init(fw, es, tmr)


@SEV_API.bare(CommandId.SHUTDOWN, READY)
def shutdown(fw: Firmware) -> None:
    _invalidate_all(fw)
    fw.guests.clear()
    fw.asid_owner.clear()
    fw.state = PlatformState.UNINIT
    fw.config_es = False
    fw.tmr = None


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
    epoch = fw.ports.flush_epoch()
    stale = [asid for asid, at in fw.asid_dirty.items() if at >= epoch]
    if stale:
        raise FirmwareError(Status.WBINVD_REQUIRED, f"no WBINVD since ASID {stale[0]} became dirty")
    fw.asid_dirty.clear()
