"""Launch commands: LAUNCH_START, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE, LAUNCH_SECRET, LAUNCH_FINISH
(SEV API 55766 ch. 6, one section per command; AMD's firmware source AMD-ASPFW ``sev_mcmd.c``, "AF").

Allowed guest states are declared with each command (:mod:`sevemu.firmware.core`): LUPDATE for
LAUNCH_UPDATE_DATA and LAUNCH_MEASURE, LSECRET for LAUNCH_SECRET and LAUNCH_FINISH
(INVALID_GUEST_STATE otherwise).

LAUNCH_START
    Order of checks (AF ``sev_mcmd_launch_start``): the owner session when ``dh_cert_paddr != 0``
    (:mod:`sevemu.firmware.sev.session`: INVALID_LENGTH / INVALID_ADDRESS / INVALID_CERTIFICATE /
    BAD_MEASUREMENT); the policy (:func:`~sevemu.firmware.checks.check_policy`: minimum API above
    the firmware's or reserved bits 15:6 set: POLICY_FAILURE); key sharing with a non-zero
    ``handle`` (INVALID_GUEST for an unknown one; POLICY_FAILURE unless both policies are identical
    and without NOKS); SEV-ES required by the policy on a platform INIT did not enable for it
    (UNSUPPORTED).  Only then is anything drawn or created: a VEK from the TRNG (or the shared
    guest's), the context in LUPDATE.  AF checks the policy's API version and reserved bits only
    when a session is given; the model checks them always (model choice), with AF's status.
    Without a session TEK and TIK are zero, as in AF.

LAUNCH_UPDATE_DATA (LUPDATE)
    Needs the guest activated (its key in the memory controller: INACTIVE otherwise); it reads the
    plaintext through the PSP's unencrypted, cache-coherent view, extends the launch digest with it,
    and writes it back in place encrypted with the guest's key, straight to DRAM.  The host's own
    cached copies of those lines are not touched: KVM flushes them first, as it must.  Granularity:
    16 bytes on every generation (partial cache lines are read-modify-written).

LAUNCH_MEASURE (LUPDATE -> LSECRET)
    Returns MEASURE || MNONCE (0x30 bytes) and fixes the launch digest that ATTESTATION will report.
    AF's order: INVALID_GUEST, INVALID_GUEST_STATE (only a guest in LUPDATE: a RUNNING guest must
    not return to LSECRET, where the all-zero channel LAUNCH_FINISH left would let the host seal a
    LAUNCH_SECRET into it), then ``len`` below 0x30 -- or ``paddr`` 0, the length query of Linux
    ``sev_launch_measure`` -- INVALID_LENGTH with ``len`` = 0x30 written back and nothing else
    written; the output buffer outside DRAM: INVALID_ADDRESS.  Only the 0x30 bytes of the
    measurement are written, whatever ``len`` says.

LAUNCH_SECRET (LSECRET)
    Order of checks (AF ``sev_mcmd_launch_secret``): unknown handle INVALID_GUEST; ``guest_paddr``
    not 16-byte aligned INVALID_ADDRESS; ``hdr_len`` not 0x34, ``guest_len`` zero, not a multiple of
    16, above AF's 20 KiB scratch buffer or different from ``trans_len``: INVALID_LENGTH; guest not
    in LSECRET INVALID_GUEST_STATE; not activated INACTIVE; header, TRANS or the guest region outside
    DRAM INVALID_ADDRESS; the packet (:func:`~sevemu.firmware.sev.session.open_secret`):
    BAD_MEASUREMENT / UNSUPPORTED.  ``guest_paddr`` carries the C-bit, which is stripped.  The
    plaintext is then written into guest memory encrypted with the guest's key
    (:func:`~sevemu.firmware.guestmem.write_guest`); only the guest can read it.  Before writing,
    the firmware evicts the host's cached copies of the region (AF's "CSF-698 dummy reads"), so a
    dirty host line cannot later overwrite the secret.  The region is one SPA range, so physically
    contiguous by construction -- the hypervisor must find it so (KVM refuses otherwise).

LAUNCH_FINISH (LSECRET -> RUNNING)
    The trusted channel (TEK, TIK, MEASURE) is closed (AF ``sev_channel_close``).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Final

from sevemu._util.units import LINE, KiB, MiB, align_down, is_aligned
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import HandleCmd, HdrBuf, LaunchStartCmd, LaunchUpdateDataCmd, MeasureBuf, TransportCmd
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.crypto.sha256 import Sha256
from sevemu.crypto.transport import measure_mac
from sevemu.errors import FirmwareError
from sevemu.firmware.checks import check_range, granule_region, host_region, need_active, read_host
from sevemu.firmware.core import READY, Firmware, Reply
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.guestmem import evict_host_lines, write_guest
from sevemu.firmware.sev import session
from sevemu.firmware.sev.api import SEV_API
from sevemu.firmware.sev.guest import create_guest
from sevemu.firmware.sha_engine import engaged, sha_engine, start

__all__ = ["LAUNCH_SECRET_MAX_LEN", "SECRET_GRANULE"]

LAUNCH_SECRET_MAX_LEN: Final = 20 * KiB
"""Largest LAUNCH_SECRET ``guest_len``: AF's scratch buffer (``SEV_SCRATCH_BUF_LEN``, 20 KiB)."""
SECRET_GRANULE: Final = 16
"""LAUNCH_SECRET's alignment of ``guest_paddr`` and unit of ``guest_len`` (AF: 16 bytes)."""

_LUPDATE: Final = frozenset({GuestState.LUPDATE})
_LSECRET: Final = frozenset({GuestState.LSECRET})


@SEV_API.platform(CommandId.LAUNCH_START, LaunchStartCmd, READY)
def launch_start(fw: Firmware, cmd: LaunchStartCmd) -> LaunchStartCmd:
    keys = session.open_launch_session(fw, cmd) if cmd.dh_cert_paddr else None
    handle = create_guest(fw, cmd.handle, cmd.policy, keys, GuestState.LUPDATE)
    return LaunchStartCmd(handle=handle, policy=cmd.policy, dh_cert_paddr=cmd.dh_cert_paddr,
                          dh_cert_len=cmd.dh_cert_len, session_paddr=cmd.session_paddr,
                          session_len=cmd.session_len)


_STREAM_MIN: Final = MiB  # below this, one read, hash and write; above, streamed in chunks
_STREAM_CHUNK: Final = 2 * MiB
_BUFFERS = threading.local()
# Equivalent mutants (mutation testing of this module, tools/mutate.py): flipping ``cmd.len < _STREAM_MIN``
# (or ``>=`` for ``>`` in launch_update_data), the chunk size, the engine's queue count, the first
# buffer's ``turn`` and the negated ``if engine is None`` change only how the same bytes are cut, which
# buffer holds them and which thread hashes them, never the digest or the memory; ``LINE - 2`` for
# ``LINE - 1`` in the fused path's alignment test differs only on odd addresses, which granule_region
# has already refused (16-byte granules).  Last run (82 mutants): 78 killed, these 4 survived (95.1%).


def _sha_engine() -> ThreadPoolExecutor:
    """The PSP's SHA engine (:mod:`sevemu.firmware.sha_engine`); one chunk in it at a time keeps the
    chunks in order."""
    return sha_engine()


def _chunk_buffers() -> tuple[memoryview, memoryview]:
    """Two chunk buffers of the calling thread, reused by every streamed update (made on first use):
    one is read into while the SHA engine hashes the other."""
    bufs: tuple[memoryview, memoryview] | None = getattr(_BUFFERS, "pair", None)
    if bufs is None:
        bufs = _BUFFERS.pair = (memoryview(bytearray(_STREAM_CHUNK)), memoryview(bytearray(_STREAM_CHUNK)))
    return bufs


def _stream_update(fw: Firmware, g: GuestContext, spa: int, length: int) -> None:
    """LAUNCH_UPDATE_DATA of a large region, chunk by chunk: each chunk is read through the PSP's
    coherent view into a reused buffer, hashed into the launch digest and written back encrypted.

    With a core to spare (:func:`~sevemu.firmware.sha_engine.engaged`), the chunk is handed to the
    SHA engine (a worker thread; the digest's OpenSSL hashing drops the GIL, and one chunk in it at a
    time keeps them in order; :func:`~sevemu.firmware.sha_engine.start` hands the GIL to the idle
    engine at once instead of after the switch interval) and written back while the engine hashes
    it -- the PSP's separate SHA
    and AES engines -- and the next chunk is read into the other of two buffers; a buffer is reused
    only once its hash is done.  Without one, this thread measures each chunk where it lies when no
    dirty host line is in it (:meth:`~sevemu.hw.psp.PspDma.measure_clean`: hashed straight from
    DRAM's pages, then encrypted in place, in one C pass without a copy), or else hashes it right
    after reading it, while it is still in the CPU's caches: a worker waiting for a core would only
    add hand-offs and cache misses to the same work.

    Chunks end on absolute chunk boundaries, so only the first and the last may hold a partial
    line.  The same digest and the same memory as one read, one hash and one write: the command is
    synchronous, nothing else touches the range meanwhile, and the encrypted writes go straight to
    DRAM, never into the caches the coherent reads look at."""
    dma = fw.ports.dma
    engine = _sha_engine() if engaged() else None
    ld = g.ld
    fused = engine is None and isinstance(ld, Sha256)
    bufs = _chunk_buffers()
    pending: Future[None] | None = None
    pos, end = spa, spa + length
    turn = 0
    try:
        while pos < end:
            stop = min(align_down(pos, _STREAM_CHUNK) + _STREAM_CHUNK, end)
            if fused and not (pos | stop) & (LINE - 1) and dma.measure_clean(pos, stop - pos, g.asid, ld):
                pos = stop  # (hashed and encrypted where it lies: no dirty host line in the chunk)
                continue
            chunk = bufs[turn][: stop - pos]
            dma.read_into(pos, chunk)  # (the buffer's previous hash finished before ``pending``'s began)
            if engine is None:
                ld.update(chunk)
            else:
                if pending is not None:
                    pending.result()  # at most one chunk in the engine: bounded memory
                pending = start(partial(ld.update, chunk))  # (the GIL handed over at once: the engine is idle)
                turn ^= 1
            write_guest(fw, g, pos, chunk)
            pos = stop
    finally:
        if pending is not None:
            pending.result()


@SEV_API.guest(CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd, READY, _LUPDATE)
def launch_update_data(fw: Firmware, cmd: LaunchUpdateDataCmd, g: GuestContext) -> None:
    need_active(g)
    spa = granule_region(fw, cmd.paddr, cmd.len)
    if cmd.len >= _STREAM_MIN:
        _stream_update(fw, g, spa, cmd.len)
        return
    plaintext = fw.ports.dma.read(spa, cmd.len)
    g.ld.update(plaintext)
    write_guest(fw, g, spa, plaintext)


@SEV_API.guest(CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd, READY, _LUPDATE)
def launch_measure(fw: Firmware, cmd: LaunchUpdateDataCmd, g: GuestContext) -> None:
    if cmd.paddr == 0 or cmd.len < MeasureBuf.SIZE:
        raise Reply(Status.INVALID_LENGTH, LaunchUpdateDataCmd(handle=cmd.handle, paddr=cmd.paddr,
                                                               len=MeasureBuf.SIZE))
    spa = host_region(fw, cmd.paddr, MeasureBuf.SIZE)
    major, minor, build = fw.api_version
    mnonce = fw.ports.trng(16)
    launch_digest = g.launch_digest
    measure = measure_mac(g.tik, api_major=major, api_minor=minor, build=build, policy=g.policy,
                          launch_digest=launch_digest, mnonce=mnonce)
    fw.ports.dma.write(spa, MeasureBuf(measure=measure, mnonce=mnonce).encode())
    g.measure = measure
    g.measured_ld = launch_digest
    g.state = GuestState.LSECRET


def _secret_shape(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> None:
    """LAUNCH_SECRET's address and length checks, which AF makes before the guest state."""
    spa, _ = fw.ports.dma.strip(cmd.guest_paddr)
    if not is_aligned(spa, SECRET_GRANULE):
        raise FirmwareError(Status.INVALID_ADDRESS, f"guest_paddr {spa:#x} is not 16-byte aligned")
    n = cmd.guest_len
    if cmd.hdr_len != HdrBuf.SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"header is {HdrBuf.SIZE:#x} bytes, not {cmd.hdr_len:#x}")
    if n == 0 or n % SECRET_GRANULE or n > LAUNCH_SECRET_MAX_LEN or n != cmd.trans_len:
        raise FirmwareError(Status.INVALID_LENGTH, f"guest_len {n:#x} / trans_len {cmd.trans_len:#x}: "
                            f"equal, non-zero multiples of 16 up to {LAUNCH_SECRET_MAX_LEN:#x} needed")


@SEV_API.guest(CommandId.LAUNCH_SECRET, TransportCmd, READY, _LSECRET, before_state=(_secret_shape,))
def launch_secret(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> None:
    need_active(g)
    n = cmd.guest_len
    header = read_host(fw, cmd.hdr_paddr, HdrBuf.SIZE)
    trans = read_host(fw, cmd.trans_paddr, n)
    spa, _ = fw.ports.dma.strip(cmd.guest_paddr)
    check_range(fw, spa, n)
    plaintext = session.open_secret(fw, g, header, trans, n)
    evict_host_lines(fw, spa, n)
    write_guest(fw, g, spa, plaintext)


@SEV_API.guest(CommandId.LAUNCH_FINISH, HandleCmd, READY, _LSECRET)
def launch_finish(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
    g.close_channel()
    g.state = GuestState.RUNNING
