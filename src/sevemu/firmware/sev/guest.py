"""Guest-management commands: ACTIVATE, DEACTIVATE, DECOMMISSION, GUEST_STATUS (reference 1.3, 1.5).

ASID rules (reference 1.3, 4.1; CipherLeaks' ASID notes; Linux ``sev_flush_asids``):

* ACTIVATE loads the guest's VEK into the memory controller's slot for the ASID.  The ASID must fit
  the guest's type (SEV-ES guests: 1..EDX-1; SEV guests: EDX..ECX -- INVALID_ASID), must not be held
  by another guest with a different key (ASID_OWNED), and the guest must not already be active
  (ACTIVE).  An ASID deactivated earlier can only be reused after a WBINVD (else WBINVD_REQUIRED)
  and then a DF_FLUSH (else DF_FLUSH_REQUIRED): stale lines of the old guest would otherwise be
  written back under the new guest's key.
* DEACTIVATE unbinds the guest (INACTIVE if it was not active).  The key stays in the slot until
  the ASID is activated again -- lines still in the caches can only be written back with it.
* DECOMMISSION deletes an inactive guest (ACTIVE if it is still bound); when the last guest goes the
  platform returns from WORKING to INIT.
"""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import ActivateCmd, GuestStatusCmd, HandleCmd
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError
from sevemu.firmware.dispatcher import READY, Firmware, command


@command(CommandId.ACTIVATE, READY)
def activate(fw: Firmware, cmd: ActivateCmd) -> None:
    g = fw.guest(cmd.handle)
    p = fw.profile
    allowed = p.es_asids() if g.es else p.sev_asids()
    if cmd.asid not in allowed:
        kind = "SEV-ES" if g.es else "SEV"
        raise FirmwareError(Status.INVALID_ASID, f"ASID {cmd.asid} is not an {kind} ASID on {p.product}")
    if g.asid:
        raise FirmwareError(Status.ACTIVE, f"guest {g.handle} is already active on ASID {g.asid}")
    owner = fw.asid_owner.get(cmd.asid)
    if owner is not None and fw.guests[owner].vek != g.vek:
        raise FirmwareError(Status.ASID_OWNED, f"ASID {cmd.asid} belongs to guest {owner}")
    if owner is None and cmd.asid in fw.asid_deactivated:
        if fw.asid_deactivated[cmd.asid] >= fw.ports.flush_epoch():
            raise FirmwareError(Status.WBINVD_REQUIRED, f"ASID {cmd.asid} reused without WBINVD")
        raise FirmwareError(Status.DF_FLUSH_REQUIRED, f"ASID {cmd.asid} reused without DF_FLUSH")
    if owner is None:
        fw.ports.keys.load(cmd.asid, g.vek)
        fw.asid_owner[cmd.asid] = g.handle
    g.asid = cmd.asid


@command(CommandId.DEACTIVATE, READY)
def deactivate(fw: Firmware, cmd: HandleCmd) -> None:
    g = fw.guest(cmd.handle)
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, f"guest {g.handle} is not active")
    asid = g.asid
    sharers = [h for h, o in fw.guests.items() if o.asid == asid and h != g.handle]
    g.asid = 0
    if sharers:
        fw.asid_owner[asid] = sharers[0]
        return
    del fw.asid_owner[asid]
    fw.ports.keys.invalidate(asid)  # VMRUN on it now fails; its lines still write back with the key
    fw.asid_deactivated[asid] = fw.ports.flush_epoch()


@command(CommandId.DECOMMISSION, READY)
def decommission(fw: Firmware, cmd: HandleCmd) -> None:
    g = fw.guest(cmd.handle)
    if g.asid:
        raise FirmwareError(Status.ACTIVE, f"guest {g.handle} must be deactivated first")
    del fw.guests[g.handle]
    if not fw.guests:
        fw.state = PlatformState.INIT


@command(CommandId.GUEST_STATUS, READY)
def guest_status(fw: Firmware, cmd: GuestStatusCmd) -> GuestStatusCmd:
    g = fw.guest(cmd.handle)
    return GuestStatusCmd(handle=g.handle, policy=g.policy, asid=g.asid, state=int(g.state))
