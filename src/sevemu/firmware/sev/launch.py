"""Launch commands: LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_FINISH (reference 1.3, 1.5,
1.9, 1.10).

LAUNCH_START creates a guest context in LUPDATE with a fresh VEK from the TRNG (or, with a non-zero
handle, the VEK of that guest if neither policy forbids key sharing).  Without a session (GODH
certificate and session lengths both 0) the firmware draws TEK and TIK itself (reference 1.9 item 5,
model choice); owner sessions are opened by :mod:`sevemu.firmware.sev.session` when present.

LAUNCH_UPDATE_DATA needs the guest activated (its key in the memory controller: INACTIVE otherwise);
it reads the plaintext through the PSP's unencrypted, cache-coherent view, extends the launch
digest with it, and writes it back in place encrypted with the guest's key, straight to DRAM.  The
host's own cached copies of those lines are not touched: KVM flushes them first, as it must.
Granularity: 16 bytes (64 bytes on AES-XTS generations, whose data unit is the cache line).

LAUNCH_MEASURE moves LUPDATE -> LSECRET and returns MEASURE || MNONCE (0x30 bytes; length query
per reference 1.1); LAUNCH_FINISH moves LSECRET -> RUNNING.
"""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy, api_major, api_minor
from sevemu.abi.sev import HandleCmd, LaunchStartCmd, LaunchUpdateDataCmd, MeasureBuf
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.crypto.transport import measure_mac
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.dispatcher import READY, Firmware, Reply, command
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.sev import session


def check_policy(fw: Firmware, policy: int) -> None:
    """Refuse a policy this platform cannot honour (POLICY_FAILURE; reserved bits: INVALID_PARAM)."""
    if policy & 0xFFC0:
        raise FirmwareError(Status.INVALID_PARAM, f"policy {policy:#x} sets reserved bits")
    major, minor, _ = fw.api_version
    if (api_major(policy), api_minor(policy)) > (major, minor):
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires a newer firmware API")
    if policy & GuestPolicy.ES and not fw.config_es:
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires SEV-ES, which INIT did not enable")


def need_state(g: GuestContext, *states: GuestState) -> None:
    if g.state not in states:
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest {g.handle} is {g.state.name}")


@command(CommandId.LAUNCH_START, READY)
def launch_start(fw: Firmware, cmd: LaunchStartCmd) -> LaunchStartCmd:
    check_policy(fw, cmd.policy)
    if cmd.handle:
        other = fw.guest(cmd.handle)
        if (other.policy | cmd.policy) & GuestPolicy.NOKS:
            raise FirmwareError(Status.POLICY_FAILURE, "key sharing forbidden by policy (NOKS)")
        vek = other.vek
    else:
        vek = fw.new_key()
    if cmd.dh_cert_len or cmd.session_len:
        tek, tik = session.open_launch_session(fw, cmd)
    else:
        tek, tik = fw.ports.trng(16), fw.ports.trng(16)
    handle = fw.next_handle
    fw.next_handle += 1
    fw.guests[handle] = GuestContext(handle=handle, policy=cmd.policy, vek=vek, tek=tek, tik=tik,
                                     es=bool(cmd.policy & GuestPolicy.ES))
    fw.state = PlatformState.WORKING
    return LaunchStartCmd(handle=handle, policy=cmd.policy, dh_cert_paddr=cmd.dh_cert_paddr,
                          dh_cert_len=cmd.dh_cert_len, session_paddr=cmd.session_paddr,
                          session_len=cmd.session_len)


def guest_region(fw: Firmware, paddr: int, length: int) -> int:
    """SPA of a guest region given to the firmware; checks alignment and range."""
    spa, _ = fw.ports.dma.strip(paddr)
    gran = fw.granule()
    if length == 0 or length % gran:
        raise FirmwareError(Status.INVALID_LENGTH, f"length {length:#x} is not a multiple of {gran}")
    if spa % gran:
        raise FirmwareError(Status.INVALID_ADDRESS, f"address {spa:#x} is not {gran}-byte aligned")
    try:
        fw.ports.dma.check(spa, length)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    return spa


@command(CommandId.LAUNCH_UPDATE_DATA, READY)
def launch_update_data(fw: Firmware, cmd: LaunchUpdateDataCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LUPDATE)
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, f"guest {g.handle} must be activated first")
    spa = guest_region(fw, cmd.paddr, cmd.len)
    dma = fw.ports.dma
    plaintext = dma.read(spa, cmd.len)
    g.ld.update(plaintext)
    dma.write_encrypted(spa, plaintext, g.asid)


@command(CommandId.LAUNCH_MEASURE, READY)
def launch_measure(fw: Firmware, cmd: LaunchUpdateDataCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LUPDATE)
    if cmd.paddr == 0 or cmd.len < MeasureBuf.SIZE:
        raise Reply(Status.INVALID_LENGTH, LaunchUpdateDataCmd(handle=cmd.handle, paddr=cmd.paddr,
                                                               len=MeasureBuf.SIZE))
    spa, _ = fw.ports.dma.strip(cmd.paddr)
    try:
        fw.ports.dma.check(spa, MeasureBuf.SIZE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    major, minor, build = fw.api_version
    mnonce = fw.ports.trng(16)
    measure = measure_mac(g.tik, api_major=major, api_minor=minor, build=build, policy=g.policy,
                          launch_digest=g.launch_digest, mnonce=mnonce)
    out = MeasureBuf(measure=measure, mnonce=mnonce).encode()
    fw.ports.dma.write(spa, out)
    g.measure = measure
    g.state = GuestState.LSECRET


@command(CommandId.LAUNCH_FINISH, READY)
def launch_finish(fw: Firmware, cmd: HandleCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LSECRET)
    g.state = GuestState.RUNNING
