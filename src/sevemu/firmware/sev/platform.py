"""Platform commands: INIT, SHUTDOWN, PLATFORM_STATUS, DF_FLUSH (SEV API 55766 ch. 5; reference 1.2-1.5).

INIT moves UNINIT -> INIT; with ``options.SEV_ES`` it also enables SEV-ES, which needs a CPU that
has ES ASIDs and a 1 MiB, 1 MiB-aligned Trusted Memory Region (INVALID_ADDRESS / INVALID_LENGTH
otherwise; INVALID_CONFIG when the CPU has no ES ASIDs -- model choices where the spec is silent).

SHUTDOWN returns to UNINIT from INIT or WORKING, forgetting every guest and unloading their keys.

DF_FLUSH clears the data-fabric write buffers for every ASID deactivated since the last DF_FLUSH.
It fails WBINVD_REQUIRED while any of those ASIDs was deactivated after the last WBINVD (Linux:
"DEACTIVATE will clear the WBINVD indicator causing DF_FLUSH to fail").
"""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import SEV_TMR_LEN, InitCmd, InitOptions, PlatformConfig, PlatformStatus
from sevemu.abi.states import PlatformOwner, PlatformState
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError
from sevemu.firmware.dispatcher import READY, Firmware, command


@command(CommandId.INIT, frozenset({PlatformState.UNINIT}))
def init(fw: Firmware, cmd: InitCmd) -> None:
    if cmd.options & ~int(InitOptions.SEV_ES):
        raise FirmwareError(Status.INVALID_PARAM, f"unknown INIT options {cmd.options:#x}")
    es = bool(cmd.options & InitOptions.SEV_ES)
    tmr = None
    if es:
        if not fw.profile.sev_es:
            raise FirmwareError(Status.INVALID_CONFIG, "this CPU has no SEV-ES ASIDs")
        spa, _ = fw.ports.dma.strip(cmd.tmr_paddr)
        if spa % SEV_TMR_LEN or spa == 0:
            raise FirmwareError(Status.INVALID_ADDRESS, "TMR must be 1 MiB aligned")
        if cmd.tmr_len != SEV_TMR_LEN:
            raise FirmwareError(Status.INVALID_LENGTH, "TMR must be 1 MiB")
        tmr = (spa, cmd.tmr_len)
    fw.state = PlatformState.INIT
    fw.config_es = es
    fw.tmr = tmr


@command(CommandId.SHUTDOWN, READY)
def shutdown(fw: Firmware, _: None) -> None:
    keys = fw.ports.keys
    for asid in list(fw.asid_owner):
        keys.clear(asid)
    fw.guests.clear()
    fw.asid_owner.clear()
    fw.state = PlatformState.UNINIT
    fw.config_es = False
    fw.tmr = None


@command(CommandId.PLATFORM_STATUS, frozenset(PlatformState), output_only=True)
def platform_status(fw: Firmware, _: None) -> PlatformStatus:
    major, minor, build = fw.api_version
    return PlatformStatus(
        api_major=major,
        api_minor=minor,
        state=int(fw.state),
        owner=int(PlatformOwner.SELF_OWNED),
        config=int(PlatformConfig.ES) if fw.config_es else 0,
        build=build,
        guest_count=len(fw.guests),
    )


@command(CommandId.DF_FLUSH, READY)
def df_flush(fw: Firmware, _: None) -> None:
    epoch = fw.ports.flush_epoch()
    stale = [asid for asid, at in fw.asid_deactivated.items() if at >= epoch]
    if stale:
        raise FirmwareError(Status.WBINVD_REQUIRED, f"no WBINVD since ASID {stale[0]} was deactivated")
    fw.asid_deactivated.clear()
