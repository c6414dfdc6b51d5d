"""Launch commands: LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_SECRET, LAUNCH_FINISH
(reference 1.3, 1.5, 1.6, 1.9-1.11; AMD's firmware source amd/AMD-ASPFW ``sev_mcmd.c``, "AF").

LAUNCH_START
    Order of checks (AF ``sev_mcmd_launch_start``): the owner session when ``dh_cert_paddr != 0``
    (:mod:`sevemu.firmware.sev.session`: INVALID_LENGTH / INVALID_ADDRESS / INVALID_CERTIFICATE /
    BAD_MEASUREMENT); the policy (:func:`check_policy`: minimum API above the firmware's or reserved
    bits 15:6 set: POLICY_FAILURE); key sharing with a non-zero ``handle`` (INVALID_GUEST for an
    unknown one; POLICY_FAILURE unless both policies are identical and without NOKS); SEV-ES
    required by the policy on a platform INIT did not enable for it (UNSUPPORTED).  Only then is
    anything drawn or created: a VEK from the TRNG (or the shared guest's), the context in LUPDATE.
    AF checks the policy's API version and reserved bits only when a session is given; the model
    checks them always (model choice), with AF's status.  Without a session TEK and TIK are zero,
    as in AF.

LAUNCH_UPDATE_DATA
    Needs the guest activated (its key in the memory controller: INACTIVE otherwise); it reads the
    plaintext through the PSP's unencrypted, cache-coherent view, extends the launch digest with it,
    and writes it back in place encrypted with the guest's key, straight to DRAM.  The host's own
    cached copies of those lines are not touched: KVM flushes them first, as it must.  Granularity:
    16 bytes on every generation (partial cache lines are read-modify-written).

LAUNCH_MEASURE
    LUPDATE -> LSECRET; returns MEASURE || MNONCE (0x30 bytes; length query per reference 1.1) and
    fixes the launch digest that ATTESTATION will report.

LAUNCH_SECRET (LSECRET only)
    Order of checks (AF ``sev_mcmd_launch_secret``): unknown handle INVALID_GUEST; ``guest_paddr``
    not 16-byte aligned INVALID_ADDRESS; ``hdr_len`` not 0x34, ``guest_len`` zero, not a multiple of
    16, above AF's 20 KiB scratch buffer or different from ``trans_len``: INVALID_LENGTH; guest not
    in LSECRET INVALID_GUEST_STATE; not activated INACTIVE; header, TRANS or the guest region outside
    DRAM INVALID_ADDRESS; the packet (:func:`~sevemu.firmware.sev.session.open_secret`):
    BAD_MEASUREMENT / UNSUPPORTED.  ``guest_paddr`` carries the C-bit, which is stripped.  The
    plaintext is then written into guest memory encrypted with the guest's key (:func:`write_guest`);
    only the guest can read it.  Before writing, the firmware evicts the host's cached copies of the
    region (AF's "CSF-698 dummy reads" with RdSzWrBkInvd), so a dirty host line cannot later
    overwrite the secret.  The region is one SPA range, so physically contiguous by construction --
    the hypervisor must find it so (KVM refuses otherwise).

LAUNCH_FINISH
    LSECRET -> RUNNING; the trusted channel (TEK, TIK, MEASURE) is closed (AF ``sev_channel_close``).

Guest memory access (:func:`read_guest`, :func:`write_guest`) goes through the PSP's encrypted DMA
path, straight to DRAM and not coherent with the caches.  The memory controller transfers whole
64-byte lines, so a range that does not cover whole lines is read-modify-written: the enclosing
lines are decrypted with the guest key, patched and re-encrypted.  On XE/XEX generations that leaves
the untouched 16-byte blocks bit-identical; on AES-XTS generations it is the only way to change
part of a 64-byte data unit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sevemu.abi.commands import CommandId
from sevemu.abi.policy import POLICY_RESERVED_MASK, GuestPolicy, api_major, api_minor
from sevemu.abi.sev import HandleCmd, HdrBuf, LaunchStartCmd, LaunchUpdateDataCmd, MeasureBuf, TransportCmd
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.crypto.transport import TransportKeys, measure_mac
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.dispatcher import READY, Firmware, Reply, command
from sevemu.firmware.gctx import CLOSED_KEY, GuestContext
from sevemu.firmware.sev import session

__all__ = [
    "LAUNCH_SECRET_MAX_LEN",
    "check_policy",
    "check_range",
    "create_guest",
    "evict_host_lines",
    "guest_region",
    "need_active",
    "need_state",
    "read_guest",
    "write_guest",
]

LINE = 64
LAUNCH_SECRET_MAX_LEN = 0x5000
"""Largest LAUNCH_SECRET ``guest_len``: AF's scratch buffer (``SEV_SCRATCH_BUF_LEN``, 20 KiB)."""


def check_policy(fw: Firmware, policy: int) -> None:
    """Refuse a policy this firmware cannot honour: minimum API version above the firmware's, or
    reserved bits 15:6 set (POLICY_FAILURE, AF ``sev_guest_verify_policy``)."""
    major, minor, _ = fw.api_version
    if (api_major(policy), api_minor(policy)) > (major, minor):
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires a newer firmware API")
    if policy & POLICY_RESERVED_MASK:
        raise FirmwareError(Status.POLICY_FAILURE, f"policy {policy:#x} sets reserved bits")


def need_state(g: GuestContext, *states: GuestState) -> None:
    if g.state not in states:
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest {g.handle} is {g.state.name}")


def need_active(g: GuestContext) -> None:
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, f"guest {g.handle} must be activated first")


def check_range(fw: Firmware, spa: int, length: int) -> None:
    """INVALID_ADDRESS unless ``[spa, spa+length)`` lies in DRAM."""
    try:
        fw.ports.dma.check(spa, length)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None


def _lines(spa: int, length: int) -> tuple[int, int]:
    lo = spa & ~(LINE - 1)
    return lo, ((spa + length + LINE - 1) & ~(LINE - 1)) - lo


def read_guest(fw: Firmware, g: GuestContext, spa: int, length: int) -> bytes:
    """Guest memory decrypted with ``g``'s key, as DRAM holds it (cached lines are not seen)."""
    lo, span = _lines(spa, length)
    data = fw.ports.dma.read_encrypted(lo, span, g.asid)
    return data[spa - lo : spa - lo + length]


def write_guest(fw: Firmware, g: GuestContext, spa: int, data: bytes) -> None:
    """Write ``data`` into guest memory encrypted with ``g``'s key, straight to DRAM (module
    docstring: partial lines are read-modify-written)."""
    dma = fw.ports.dma
    lo, span = _lines(spa, len(data))
    if lo == spa and span == len(data):
        dma.write_encrypted(spa, data, g.asid)
        return
    lines = bytearray(dma.read_encrypted(lo, span, g.asid))
    lines[spa - lo : spa - lo + len(data)] = data
    dma.write_encrypted(lo, bytes(lines), g.asid)


def evict_host_lines(fw: Firmware, spa: int, length: int) -> None:
    """Write back and drop the host's (unencrypted) cached lines of a range, leaving its bytes as
    they are: AF's dummy reads under RdSzWrBkInvd before it writes a range encrypted."""
    dma = fw.ports.dma
    dma.write(spa, dma.read(spa, length))


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


@command(CommandId.LAUNCH_START, READY)
def launch_start(fw: Firmware, cmd: LaunchStartCmd) -> LaunchStartCmd:
    keys = session.open_launch_session(fw, cmd) if cmd.dh_cert_paddr else None
    handle = create_guest(fw, cmd.handle, cmd.policy, keys, GuestState.LUPDATE)
    return LaunchStartCmd(handle=handle, policy=cmd.policy, dh_cert_paddr=cmd.dh_cert_paddr,
                          dh_cert_len=cmd.dh_cert_len, session_paddr=cmd.session_paddr,
                          session_len=cmd.session_len)


def guest_region(fw: Firmware, paddr: int, length: int) -> int:
    """SPA of a LAUNCH_UPDATE_DATA region; checks granule alignment and range."""
    spa, _ = fw.ports.dma.strip(paddr)
    gran = fw.granule()
    if length == 0 or length % gran:
        raise FirmwareError(Status.INVALID_LENGTH, f"length {length:#x} is not a multiple of {gran}")
    if spa % gran:
        raise FirmwareError(Status.INVALID_ADDRESS, f"address {spa:#x} is not {gran}-byte aligned")
    check_range(fw, spa, length)
    return spa


_PARALLEL_DIGEST_MIN = 1 << 20  # below this, hashing inline is cheaper than a hand-off
_SHA_ENGINE: list[ThreadPoolExecutor] = []


def _sha_engine() -> ThreadPoolExecutor:
    """One worker thread standing for the PSP's SHA engine (made on first use)."""
    if not _SHA_ENGINE:
        _SHA_ENGINE.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="psp-sha"))
    return _SHA_ENGINE[0]


@command(CommandId.LAUNCH_UPDATE_DATA, READY)
def launch_update_data(fw: Firmware, cmd: LaunchUpdateDataCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LUPDATE)
    need_active(g)
    spa = guest_region(fw, cmd.paddr, cmd.len)
    plaintext = fw.ports.dma.read(spa, cmd.len)
    if cmd.len < _PARALLEL_DIGEST_MIN:
        g.ld.update(plaintext)
        write_guest(fw, g, spa, plaintext)
        return
    # The PSP hashes and encrypts on separate crypto engines; so does the model for large runs
    # (hashlib drops the GIL while it hashes): same digest, same memory, faster when a core is free.
    digest = _sha_engine().submit(g.ld.update, plaintext)
    try:
        write_guest(fw, g, spa, plaintext)
    finally:
        digest.result()


@command(CommandId.LAUNCH_MEASURE, READY)
def launch_measure(fw: Firmware, cmd: LaunchUpdateDataCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LUPDATE)
    if cmd.paddr == 0 or cmd.len < MeasureBuf.SIZE:
        raise Reply(Status.INVALID_LENGTH, LaunchUpdateDataCmd(handle=cmd.handle, paddr=cmd.paddr,
                                                               len=MeasureBuf.SIZE))
    spa, _ = fw.ports.dma.strip(cmd.paddr)
    check_range(fw, spa, MeasureBuf.SIZE)
    major, minor, build = fw.api_version
    mnonce = fw.ports.trng(16)
    launch_digest = g.launch_digest
    measure = measure_mac(g.tik, api_major=major, api_minor=minor, build=build, policy=g.policy,
                          launch_digest=launch_digest, mnonce=mnonce)
    fw.ports.dma.write(spa, MeasureBuf(measure=measure, mnonce=mnonce).encode())
    g.measure = measure
    g.measured_ld = launch_digest
    g.state = GuestState.LSECRET


@command(CommandId.LAUNCH_SECRET, READY)
def launch_secret(fw: Firmware, cmd: TransportCmd) -> None:
    g = fw.guest(cmd.handle)
    dma = fw.ports.dma
    spa, _ = dma.strip(cmd.guest_paddr)
    if spa % 16:
        raise FirmwareError(Status.INVALID_ADDRESS, f"guest_paddr {spa:#x} is not 16-byte aligned")
    n = cmd.guest_len
    if cmd.hdr_len != HdrBuf.SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"header is {HdrBuf.SIZE:#x} bytes, not {cmd.hdr_len:#x}")
    if n == 0 or n % 16 or n > LAUNCH_SECRET_MAX_LEN or n != cmd.trans_len:
        raise FirmwareError(Status.INVALID_LENGTH, f"guest_len {n:#x} / trans_len {cmd.trans_len:#x}: "
                            f"equal, non-zero multiples of 16 up to {LAUNCH_SECRET_MAX_LEN:#x} needed")
    need_state(g, GuestState.LSECRET)
    need_active(g)
    header = session.read_host(fw, cmd.hdr_paddr, HdrBuf.SIZE)
    trans = session.read_host(fw, cmd.trans_paddr, n)
    check_range(fw, spa, n)
    plaintext = session.open_secret(fw, g, header, trans, n)
    evict_host_lines(fw, spa, n)
    write_guest(fw, g, spa, plaintext)


@command(CommandId.LAUNCH_FINISH, READY)
def launch_finish(fw: Firmware, cmd: HandleCmd) -> None:
    g = fw.guest(cmd.handle)
    need_state(g, GuestState.LSECRET)
    g.close_channel()
    g.state = GuestState.RUNNING
