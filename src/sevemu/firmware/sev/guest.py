"""Guest management: ACTIVATE, DEACTIVATE, DECOMMISSION, GUEST_STATUS, and the creation of a guest
context shared by LAUNCH_START and RECEIVE_START (SEV API 55766 ch. 6: ACTIVATE, DEACTIVATE,
DECOMMISSION, GUEST_STATUS; AMD-ASPFW ``sev_mcmd.c``, ``sev_guest.c``).

ASID rules (SEV API 55766 ch. 6, ACTIVATE / DEACTIVATE / DF_FLUSH; APM2 15.34 for the ASID ranges of
CPUID Fn8000_001F; Linux ``arch/x86/kvm/svm/sev.c``, ``sev_flush_asids``; CipherLeaks):

* ACTIVATE loads the guest's VEK into the memory controller's slot for the ASID and makes the ASID
  valid for VMRUN.  The ASID must fit the guest's type (SEV-ES guests: 1..EDX-1; SEV guests:
  EDX..ECX -- INVALID_ASID); a guest that was sent away (SENT) is not activated again
  (INVALID_GUEST_STATE, AF ``activate_common``, checked after the ASID range as AF does); the guest
  must not already be active (ACTIVE) and the ASID not held by a guest with another key
  (ASID_OWNED).  A dirty ASID -- deactivated, or every ASID after INIT -- can only be reused after a
  WBINVD (else WBINVD_REQUIRED) and then a DF_FLUSH (else DF_FLUSH_REQUIRED): lines of the old
  guest would otherwise be written back under the new guest's key.
* DEACTIVATE unbinds the guest (INACTIVE if it was not active) and marks the ASID invalid for VMRUN
  and dirty.  The key stays in the slot until the ASID is activated again -- lines still in the
  caches can only be written back with it (AF ``sev_guest_deactivate``: "We do not clear umc key
  here anymore").
* DECOMMISSION deletes an inactive guest (ACTIVE if it is still bound; AF
  ``mcmd_decommission_common``); its ASID was already invalidated by DEACTIVATE, so there is
  nothing left to invalidate.  An SEV-ES guest's VMSA checksum blocks go back to the TMR's pool
  (:mod:`sevemu.firmware.tmr`).  When the last guest goes the platform returns from WORKING to INIT.

No guest state is required by DEACTIVATE, DECOMMISSION and GUEST_STATUS (AF checks none).
"""

from __future__ import annotations

from typing import Final

from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import ActivateCmd, GuestStatusCmd, HandleCmd
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.crypto.transport import TransportKeys
from sevemu.errors import FirmwareError
from sevemu.firmware.checks import check_policy
from sevemu.firmware.core import ANY_GUEST, READY, Firmware
from sevemu.firmware.gctx import CLOSED_KEY, GuestContext
from sevemu.firmware.sev.api import SEV_API

__all__ = ["ACTIVATE_STATES", "create_guest"]

ACTIVATE_STATES: Final = ANY_GUEST - {GuestState.SENT}


def create_guest(fw: Firmware, share: int, policy: int, keys: TransportKeys | None,
                 state: GuestState) -> int:
    """Check a new guest's policy and create its context (LAUNCH_START, RECEIVE_START); its handle.

    ``share`` non-zero: use that guest's VEK, if both policies are identical and allow key sharing
    (POLICY_FAILURE otherwise).  An ES policy needs SEV-ES enabled by INIT (UNSUPPORTED).  Every check
    comes before any change.  Without owner ``keys`` the channel is closed (all-zero TEK/TIK).
    """
    check_policy(fw, policy)
    shared = None
    if share:
        shared = fw.guest(share)
        if shared.policy != policy or shared.noks:
            raise FirmwareError(Status.POLICY_FAILURE, "key sharing needs identical policies without NOKS")
    es = bool(policy & GuestPolicy.ES)
    if es and not fw.config_es:
        raise FirmwareError(Status.UNSUPPORTED, "policy requires SEV-ES, which INIT did not enable")
    vek = shared.vek if shared is not None else fw.new_key()
    handle = fw.next_handle
    fw.next_handle += 1
    fw.guests[handle] = GuestContext(
        handle=handle,
        policy=policy,
        vek=vek,
        tek=keys.tek if keys is not None else CLOSED_KEY,
        tik=keys.tik if keys is not None else CLOSED_KEY,
        state=state,
        es=es,
        session=keys is not None and state is GuestState.LUPDATE,
    )
    fw.state = PlatformState.WORKING
    return handle


def _asid_fits(fw: Firmware, cmd: ActivateCmd, g: GuestContext) -> None:
    p = fw.profile
    allowed = p.es_asids() if g.es else p.sev_asids()
    if cmd.asid not in allowed:
        kind = "SEV-ES" if g.es else "SEV"
        raise FirmwareError(Status.INVALID_ASID, f"ASID {cmd.asid} is not an {kind} ASID on {p.product}")


@SEV_API.guest(CommandId.ACTIVATE, ActivateCmd, READY, ACTIVATE_STATES, before_state=(_asid_fits,))
def activate(fw: Firmware, cmd: ActivateCmd, g: GuestContext) -> None:
    if g.asid:
        raise FirmwareError(Status.ACTIVE, f"guest {g.handle} is already active on ASID {g.asid}")
    owner = fw.asid_owner.get(cmd.asid)
    if owner is not None and (owner not in fw.guests or fw.guests[owner].vek != g.vek):  # or an SNP guest's
        raise FirmwareError(Status.ASID_OWNED, f"ASID {cmd.asid} belongs to guest {owner}")
    if owner is None and cmd.asid in fw.asid_dirty:
        if fw.asid_dirty[cmd.asid] >= fw.ports.flush_epoch():
            raise FirmwareError(Status.WBINVD_REQUIRED, f"ASID {cmd.asid} reused without WBINVD")
        raise FirmwareError(Status.DF_FLUSH_REQUIRED, f"ASID {cmd.asid} reused without DF_FLUSH")
    if owner is None:
        fw.ports.keys.load(cmd.asid, g.vek)
        fw.asid_owner[cmd.asid] = g.handle
    g.asid = cmd.asid


@SEV_API.guest(CommandId.DEACTIVATE, HandleCmd, READY, ANY_GUEST)
def deactivate(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
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
    fw.asid_dirty[asid] = fw.ports.flush_epoch()


@SEV_API.guest(CommandId.DECOMMISSION, HandleCmd, READY, ANY_GUEST)
def decommission(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
    if g.asid:
        raise FirmwareError(Status.ACTIVE, f"guest {g.handle} must be deactivated first")
    if g.vmsas and fw.tmr is not None:  # AF: the guest's VMSA checksum blocks back to the pool
        fw.tmr.release([block for _, block in g.vmsas])
    del fw.guests[g.handle]
    if not fw.guests:
        fw.state = PlatformState.INIT


@SEV_API.guest(CommandId.GUEST_STATUS, GuestStatusCmd, READY, ANY_GUEST)
def guest_status(fw: Firmware, cmd: GuestStatusCmd, g: GuestContext) -> GuestStatusCmd:
    return GuestStatusCmd(handle=g.handle, policy=g.policy, asid=g.asid, state=int(g.state))
