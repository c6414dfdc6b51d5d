"""What the SNP firmware keeps: the SNP platform state beside the legacy one, and one guest context per
guest-context page (SNP ABI 56860, platform and guest state machines; AMD-ASPFW ``sev_mcmd.c``
``guest_context_page_t``).

One firmware, two APIs: the SNP API's state hangs off the same :class:`~sevemu.firmware.core.Firmware`
object as the legacy API's (:func:`snp_state`), and shares its ASID bookkeeping (``asid_owner``,
``asid_dirty``: an ASID reused needs WBINVD then DF_FLUSH / SNP_DF_FLUSH, whichever API freed it), its
TRNG, identity and NV store.

An SNP guest is named by the system-physical address of its guest-context page (a page the host
donated in Firmware state; SNP_GCTX_CREATE turns it into a Context page).  AMD's firmware keeps the
context *in* that page, encrypted with a key only it knows; the model keeps it here, keyed by the
page's SPA (the page itself is unreadable to the host either way: the RMP makes it a Context page, so
the host cannot write it, and what it reads is of no use).  The page's RMP state stays authoritative:
a command whose GCTX page is not in Context state answers INVALID_GUEST.

What other parts read (the SNP_GUEST_REQUEST handler, attestation): :class:`SnpGuest` ``ld``
(MEASUREMENT), ``host_data``, ``id_block`` / ``id_key_digest`` / ``author_key_digest`` (ID block and
keys of LAUNCH_FINISH), ``policy``, ``vmpck`` (the four VMPCKs the secrets page carries),
``report_id``, ``launch_tcb``, ``msg_count``, ``author_key_en``, ``vcek_disabled``; and
:class:`SnpPlatform` ``current_tcb`` / ``reported_tcb`` / ``committed_tcb``, ``mask_chip_id`` /
``mask_chip_key``, ``vlek`` (SNP_VLEK_LOAD's key, or None).
"""

from __future__ import annotations

import weakref
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import PAGE
from sevemu.abi.rmp import RmpPageState
from sevemu.abi.snp import IdBlock, SnpGuestState, SnpPlatformState, SnpPolicy, TcbVersion, TcbVersionTurin
from sevemu.abi.status import Status
from sevemu.crypto.pagehash import measure_pages, page_info_chain, sha384_pages
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.core import Firmware
from sevemu.firmware.sha_engine import CHUNKS, PendingHashes, engaged, start
from sevemu.hw.rmp import RmpEntry, RmpFirmwarePort

__all__ = ["SNP_API_VERSION", "SnpGuest", "SnpPlatform", "snp_state"]

NO_LD: Final = bytes(48)

SNP_API_VERSION: Final = {"milan": (1, 55), "genoa": (1, 55), "turin": (1, 55)}
"""SNP ABI version (major, minor) the model's firmware reports per generation (SNP ABI 56860 rev. 1.55)."""

_TCB: Final = {
    "milan": TcbVersion(boot_loader=3, tee=0, snp=8, microcode=0x73).encode(),
    "genoa": TcbVersion(boot_loader=7, tee=0, snp=14, microcode=0x48).encode(),
    "turin": TcbVersionTurin(fmc=1, boot_loader=1, tee=1, snp=1, microcode=0x10).encode(),
}
"""The running TCB_VERSION per generation (model choice: typical released values)."""


@dataclass(frozen=True, slots=True)
class _Queued:
    """One update waiting behind a page the SHA engine hashes (:meth:`SnpGuest.chain`)."""

    info: bytes
    gpa: int
    count: int
    contents: bytes | PendingHashes | None
    done: Future[bytes] | None
    """The engine's chain of this update from the digest before it (the first queued update, or one
    :meth:`SnpGuest.measure` handed to the engine behind another)."""
    data: bytes | None = None
    """The measured pages themselves when their hashes are still to compute (:meth:`SnpGuest.measure`)."""


@dataclass(eq=False)
class SnpGuest:
    """One SNP guest's context (AMD-ASPFW ``guest_context_page_t``; SNP ABI "Guest Context")."""

    gctx: int
    """SPA of the guest-context page: the guest's name in every command."""
    vek: bytes
    launch_tcb: int
    state: SnpGuestState = SnpGuestState.INIT
    policy: int = 0
    asid: int = 0
    measured: bytes = NO_LD
    """GCTX.LD as far as it is computed: :attr:`ld` without the updates still queued behind a page
    the SHA engine is hashing (:meth:`chain`)."""
    vmpck: tuple[bytes, bytes, bytes, bytes] = (b"", b"", b"", b"")
    vmrk: bytes = b""
    report_id: bytes = bytes(32)
    report_id_ma: bytes = b"\xff" * 32
    gosvw: bytes = bytes(16)
    desired_tsc_khz: int = 0
    imi_en: bool = False
    host_data: bytes = bytes(32)
    id_block_en: bool = False
    id_block: IdBlock | None = None
    id_key_digest: bytes = NO_LD
    author_key_en: bool = False
    author_key_digest: bytes = NO_LD
    vcek_disabled: bool = False
    msg_count: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    """Successful guest messages per VMPCK (SNP_GUEST_REQUEST's replay protection)."""

    _queued: list[_Queued] = field(default_factory=list, repr=False)
    """Updates chained behind one whose page hashes the SHA engine still computes (:meth:`chain`)."""

    @property
    def ld(self) -> bytes:
        """GCTX.LD: the launch digest (SHA-384 PAGE_INFO chain) so far; MEASUREMENT after LAUNCH_FINISH.
        Reading it completes the queued updates first (:meth:`chain`)."""
        if self._queued:
            ld = self.measured
            for q in self._queued:
                if q.done is not None and not q.done.cancel():  # the engine chained it (or is chaining it)
                    try:
                        ld = q.done.result()
                        continue
                    except CancelledError:  # (a job behind one this reader cancelled: measured here)
                        if q.data is None:
                            raise
                if q.data is not None:  # (the engine did not start it: measured here)
                    ld = measure_pages(ld, q.info, q.gpa, q.data)
                    continue
                hashes = q.contents.result() if isinstance(q.contents, PendingHashes) else q.contents
                ld = page_info_chain(ld, q.info, q.gpa, q.count, hashes)
            self._queued.clear()
            self.measured = ld
        return self.measured

    @ld.setter
    def ld(self, value: bytes) -> None:
        for q in self._queued:
            if q.done is not None:
                q.done.cancel()
        self._queued.clear()
        self.measured = value

    def chain(self, info: bytes, gpa: int, count: int, contents: bytes | PendingHashes | None) -> None:
        """Chain ``count`` 4 KiB pages into the launch digest: PAGE_INFOs from template ``info`` at GPAs
        from ``gpa``, CONTENTS 48 bytes each from ``contents`` (None: the template's)
        (:func:`~sevemu.crypto.pagehash.page_info_chain`).  When ``contents`` are hashes the SHA engine is
        still computing (:func:`~sevemu.firmware.sha_engine.hash_pages_later`), this and every later
        update wait in a queue and the command completes without them (model choice, ``docs/snp.md``:
        the PSP's SHA engine finishes a 2 MiB page's measurement -- its hashes, then its PAGE_INFO chain
        when nothing is queued before it -- while the firmware answers the next commands); :attr:`ld`
        completes the queue when something reads the digest (a chain the engine has not started is
        done by the reader)."""
        if not self._queued and not isinstance(contents, PendingHashes):
            self.measured = page_info_chain(self.measured, info, gpa, count, contents)
            return
        done: Future[bytes] | None = None
        if not self._queued and isinstance(contents, PendingHashes):
            ld, hashes = self.measured, contents
            done = start(lambda: page_info_chain(ld, info, gpa, count, hashes.result()))
        self._queued.append(_Queued(info, gpa, count, contents, done))

    def measure(self, info: bytes, gpa: int, data: bytes, later: bool = False) -> None:
        """Chain every 4 KiB page of ``data`` as a measured page (CONTENTS its SHA-384; GPAs from ``gpa``,
        PAGE_INFOs from template ``info``): :meth:`chain` of its :func:`~sevemu.crypto.pagehash.sha384_pages`,
        both hashes of each page in one pass (:func:`~sevemu.crypto.pagehash.measure_pages`).  ``later``
        (a 2 MiB page; ``data`` immutable bytes): the whole measurement -- hashes and PAGE_INFO chain -- is
        the SHA engine's when it is engaged, one job that drops the GIL once, and the command completes
        without it (model choice, :meth:`chain`); behind another pending update the job starts from that
        update's digest (the engine runs its jobs in order).  A reader of :attr:`ld` measures a job the
        engine has not started itself."""
        count = len(data) // PAGE
        if later and count >= 2 * CHUNKS and engaged():
            ld = self.measured
            if not self._queued:
                done = start(lambda: measure_pages(ld, info, gpa, data))
            else:
                before = self._queued[-1].done
                if before is None:  # (an update queued behind a page whose hashes are pending: chained here)
                    self.chain(info, gpa, count, sha384_pages(data, PAGE))
                    return
                done = start(lambda: measure_pages(before.result(), info, gpa, data))
            self._queued.append(_Queued(info, gpa, count, None, done, data))
            return
        if not self._queued:
            self.measured = measure_pages(self.measured, info, gpa, data)
            return
        self._queued.append(_Queued(info, gpa, count, sha384_pages(data, PAGE), None))

    @property
    def snp_policy(self) -> SnpPolicy:
        return SnpPolicy.decode(self.policy.to_bytes(8, "little"))


@dataclass(eq=False)
class SnpPlatform:
    """The SNP side of the platform (AMD-ASPFW ``gpDram->perm``: snp_state, TCBs, masks, guest count)."""

    rmp: RmpFirmwarePort | None
    current_tcb: int
    reported_tcb: int
    committed_tcb: int
    api: tuple[int, int]
    state: SnpPlatformState = SnpPlatformState.UNINIT
    guests: dict[int, SnpGuest] = field(default_factory=dict)
    mask_chip_id: bool = False
    mask_chip_key: bool = False
    rapl_dis: bool = False
    ciphertext_hiding: bool = False
    max_snp_asid: int = 0
    guest_count: int = 0
    """SNP_LAUNCH_STARTs since SNP_INIT that were not decommissioned (PLATFORM_STATUS guest_count)."""
    vlek_sticks: bytes = b""
    """The hashsticks SNP_VLEK_LOAD unwrapped (AMD-ASPFW ``perm.vlek``); empty: no VLEK loaded."""
    vlek: ec.EllipticCurvePrivateKey | None = None
    """The VLEK they give (AMD-ASPFW ``perm.vlek_key``); wiped by SNP_SHUTDOWN."""

    # ---- checks every command makes, in AMD-ASPFW's order ------------------------------------
    def need_init(self) -> None:
        if self.state != SnpPlatformState.INIT:
            raise FirmwareError(Status.INVALID_PLATFORM_STATE, f"the SNP platform is {self.state.name}")

    def port(self) -> RmpFirmwarePort:
        if self.rmp is None:
            raise FirmwareError(Status.UNSUPPORTED, "this part has no RMP (no SEV-SNP)")
        return self.rmp

    def entry(self, spa: int) -> RmpEntry:
        """The RMP entry governing the page at ``spa``; INVALID_ADDRESS outside the memory the RMP covers."""
        port = self.port()
        try:
            return port.entry(spa)
        except AddressError as exc:
            raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None

    def governing(self, spa: int) -> tuple[int, int, int, RmpPageState, int, int, int]:
        """:meth:`entry`'s fields with the raw entry (:meth:`~sevemu.hw.rmp.RmpFirmwarePort.governing`):
        (pfn of the governing entry, low and high quadwords, state, page size, ASID, GPA);
        INVALID_ADDRESS outside the memory the RMP covers."""
        port = self.port()
        try:
            return port.governing(spa)
        except AddressError as exc:
            raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None

    def page_state(self, spa: int) -> RmpPageState:
        """RMP state of the page at ``spa``; INVALID_ADDRESS outside the memory the RMP covers."""
        port = self.port()
        if not 0 <= spa < port.rmp.covered:
            return self.entry(spa).state  # (raises INVALID_ADDRESS)
        return port.state(spa)

    def guest(self, gctx_paddr: int) -> SnpGuest:
        """The guest whose context page is at ``gctx_paddr``: INVALID_PARAM for a misaligned address,
        INVALID_GUEST unless the page is a Context page of a known guest."""
        if gctx_paddr % 0x1000:
            raise FirmwareError(Status.INVALID_PARAM, f"GCTX address {gctx_paddr:#x} is not page aligned")
        g = self.guests.get(gctx_paddr)  # (a known context first: the same status either way)
        if g is None:
            raise FirmwareError(Status.INVALID_GUEST, f"no guest context at {gctx_paddr:#x}")
        port = self.port()
        if 0 <= gctx_paddr < port.rmp.covered:  # (the state's test, from one quadword)
            if port.is_context(gctx_paddr):
                return g
        elif self.page_state(gctx_paddr) == RmpPageState.CONTEXT:  # (raises INVALID_ADDRESS)
            return g
        raise FirmwareError(Status.INVALID_GUEST, f"no guest context at {gctx_paddr:#x}")


_STATES: weakref.WeakKeyDictionary[Firmware, SnpPlatform] = weakref.WeakKeyDictionary()


_LAST: list[tuple[weakref.ref[Firmware], SnpPlatform]] = []
"""The last firmware :func:`snp_state` answered for, and its state (every SNP command asks: a weak
reference called is cheaper than a WeakKeyDictionary lookup)."""


def snp_state(fw: Firmware) -> SnpPlatform:
    """The SNP platform state of ``fw`` (created at first use, from the part's profile and RMP)."""
    if _LAST:
        ref, last = _LAST[0]
        if ref() is fw:
            return last
    st = _STATES.get(fw)
    if st is None:
        tcb = int.from_bytes(_TCB.get(fw.profile.name, _TCB["milan"]), "little")
        api = SNP_API_VERSION.get(fw.profile.name, (1, 55))
        st = _STATES[fw] = SnpPlatform(rmp=fw.ports.rmp, current_tcb=tcb, reported_tcb=tcb, committed_tcb=tcb,
                                       api=api)
    _LAST[:] = [(weakref.ref(fw), st)]
    return st
