"""The host side of the legacy SEV API, each flow written once (SEV API 55766, chapters 5 and 6).

Every caller goes through these flows: the Python API (:class:`~sevemu.hypervisor.kvm.Hypervisor`),
``KVM_MEMORY_ENCRYPT_OP`` and ``/dev/sev`` (through the command table of
:mod:`sevemu.hypervisor.uapi`), and migration (:mod:`sevemu.hypervisor.migration`).  They follow
Linux: drivers/crypto/ccp/sev-dev.c for the platform, arch/x86/kvm/svm/sev.c for guests.

Platform (sev-dev.c)
    ``platform_init``: INIT (SEV-ES and its TMR where asked), then WBINVD on every CPU and
    DF_FLUSH -- the firmware marks every ASID dirty at INIT (``__sev_platform_init_locked``).
    ``factory_reset`` (``-EBUSY`` while guests run; SHUTDOWN first from INIT), PEK/PDH generation,
    PEK_CSR, PEK_CERT_IMPORT, PDH_CERT_EXPORT, GET_ID with length queries.

Guests (sev.c)
    ``guest_init`` (KVM_SEV_INIT / ES_INIT: before any vCPU, once, SEV-ES ASIDs for ES guests,
    the platform INITed if it is not); ``launch_start`` (owner blobs staged, ACTIVATE of the VM's
    ASID, DECOMMISSION when that fails); ``launch_update_data`` (pin, CLFLUSH unless the CPU is
    coherent, one command per physically contiguous run, exact lengths); ``launch_measure`` and
    ``attestation`` (length queries); ``launch_secret`` (the guest range must be physically
    contiguous: ``-EINVAL``); ``launch_finish``; ``dbg_decrypt`` / ``dbg_encrypt`` (page by page, the
    guest's lines flushed first, 16-byte aligned firmware accesses through bounce buffers,
    read-modify-write for unaligned ends); SEND_* / RECEIVE_* (length queries, one page at most per
    update, guest addresses with the C-bit); ``decommission`` at teardown.

Addresses: guest pages given to the firmware as *guest* memory (LAUNCH_SECRET, SEND/RECEIVE) carry
the C-bit (Linux ORs ``sev_me_mask``); LAUNCH_UPDATE_DATA and DBG take plain SPAs (Linux's
``__sme_page_pa`` adds only the host's SME mask, which this host does not use).  The firmware
strips the bit either way.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import numpy.typing as npt

from sevemu._util.units import PAGE, PAGE_MASK, align_down, align_up
from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import (
    SEV_TMR_LEN,
    ActivateCmd,
    AttestationCmd,
    DbgCmd,
    GetIdCmd,
    GuestStatusCmd,
    HandleCmd,
    InitCmd,
    InitOptions,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    PdhCertExportCmd,
    PekCertImportCmd,
    PekCsrCmd,
    PlatformStatus,
    ReceiveStartCmd,
    SendStartCmd,
    TransportCmd,
)
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.errors import AddressError
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError, SevStateError
from sevemu.hypervisor.psp import DUAL_RING_BATCH, RING_SLOT, RingSession
from sevemu.hypervisor.sev.common import PACKET, OutBlob, Packet, Reply, SevHost, contiguous_runs
from sevemu.hypervisor.uapi import GHCB_VERSION_MAX, GHCB_VERSION_MIN
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vm, VmKind, VmState

__all__ = ["GRANULE", "HDR_SLOT", "PAGE_BATCH", "Gpas", "LegacySev", "PageBatch", "PageReceiver", "Transport",
           "transport_length", "transport_slots"]

GRANULE = 16
"""The SEV API's 16-byte granularity: LAUNCH_UPDATE_DATA lengths, DBG_DECRYPT / DBG_ENCRYPT addresses
and lengths (SEV API 55766, LAUNCH_UPDATE_DATA, DBG_DECRYPT)."""
_MAX_LEN = 1 << 32  # a u32 length field
HDR_SLOT = 64
"""Bytes a transport header occupies in a :class:`PageBatch` (the 0x34-byte header, zero-padded)."""
PAGE_BATCH = DUAL_RING_BATCH
"""Pages per ring-buffer doorbell in migration: as many as one doorbell carries with both queues
configured (``DUAL_RING_BATCH``, 510: 255 in the high-priority queue, then 255 in the low one)."""
def transport_slots(handle: int, hdr_base: int, hdr_len: int, guest_paddrs: list[int] | npt.NDArray[np.uint64],
                    trans_base: int) -> bytes:
    """The ring slots of one whole-page TransportCmd per guest page: command i with its header in the
    64-byte slot ``hdr_base + 64 * i`` (``hdr_len`` bytes) and its TRANS in the page ``trans_base +
    4096 * i`` -- :data:`~sevemu.abi.sev.TRANSPORT_PACK` of each, zero-padded to its slot, built as
    columns (every field of the layout is a little-endian u32 or u64 at a multiple of 8: one u64
    word each)."""
    return SlotTemplate(handle, hdr_base, hdr_len, trans_base, len(guest_paddrs)).slots(guest_paddrs)


class SlotTemplate:
    """:func:`transport_slots` of one session's batches: every field but ``guest_paddr`` is the same
    from doorbell to doorbell (the handle, the header slots and TRANS pages of the session's
    bounce runs), so they are laid out once, for up to ``capacity`` commands, and each batch only
    writes its guest addresses into the words (the same bytes as :func:`transport_slots`)."""

    __slots__ = ("_words",)

    def __init__(self, handle: int, hdr_base: int, hdr_len: int, trans_base: int, capacity: int) -> None:
        at = np.arange(capacity, dtype=np.uint64)
        words = np.zeros((capacity, RING_SLOT // 8), dtype="<u8")
        words[:, 0] = handle
        words[:, 1] = at * np.uint64(HDR_SLOT) + np.uint64(hdr_base)
        words[:, 2] = hdr_len
        words[:, 4] = PAGE
        words[:, 5] = at * np.uint64(PAGE) + np.uint64(trans_base)
        words[:, 6] = PAGE
        self._words = words

    def slots(self, guest_paddrs: list[int] | tuple[int, ...] | npt.NDArray[np.uint64]) -> bytes:
        """The slots of a batch of these guest page addresses (at most ``capacity``)."""
        n = len(guest_paddrs)
        words = self._words[:n]
        words[:, 3] = guest_paddrs if isinstance(guest_paddrs, np.ndarray) else np.fromiter(guest_paddrs, dtype=np.uint64, count=n)
        return words.tobytes()


Gpas = tuple[int, ...] | npt.NDArray[np.uint64]
"""A batch's guest page addresses: a tuple, or a u64 column (the source's sorted pages, a
destination's frame)."""
Transport = bytes | memoryview | list[bytearray] | None
"""A batch's transport buffers: back to back; or one 4 KiB buffer per page (the bounce area's DRAM
pages a source hands to the socket as they lie, read-only: :meth:`LegacySev.send_page_batches`);
or None on a destination whose channel received them straight into the bounce area
(:meth:`PageReceiver.stage`)."""


def transport_length(transport: Transport) -> int:
    """Bytes of a batch's transport buffers (0 for None)."""
    if transport is None:
        return 0
    if isinstance(transport, list):
        return sum(map(len, transport))
    return len(transport)


@dataclass(frozen=True, slots=True)
class PageBatch:
    """SEND_UPDATE_DATA packets of whole pages, as one doorbell produced them: ``hdrs`` holds a
    :data:`HDR_SLOT`-byte slot per page (its first ``hdr_len`` bytes the header), ``transport`` the
    pages' transport buffers (:data:`Transport`)."""

    gpas: Gpas
    hdrs: bytes | memoryview
    transport: Transport
    hdr_len: int

    def hdr(self, i: int) -> bytes:
        return bytes(self.hdrs[i * HDR_SLOT : i * HDR_SLOT + self.hdr_len])

    def trans(self, i: int) -> bytes:
        transport = self.transport
        if transport is None:
            raise SevInputError(Errno.EINVAL, "the batch's transport buffers went straight into the bounce area")
        if isinstance(transport, list):
            return bytes(transport[i])
        return bytes(transport[i * PAGE : (i + 1) * PAGE])


class PageReceiver:
    """RECEIVE_UPDATE_DATA of page batches through one open ring-buffer session
    (:meth:`LegacySev.page_receiver`)."""

    def __init__(self, sev: LegacySev, vm: Vm, ring: RingSession, hdr_base: int, trans_base: int) -> None:
        self._sev = sev
        self._vm = vm
        self._ring = ring
        self._hdr_base = hdr_base
        self._trans_base = trans_base
        self._staged = 0
        self._template: SlotTemplate | None = None  # (made at the first batch: hdr_len is the batch's)
        self._hdr_len = -1

    def stage(self, count: int, fill: Callable[[list[bytearray]], None]) -> None:
        """The transport buffers of the next batch (``count`` pages) written into the bounce area in
        place: ``fill`` gets its pages (:meth:`~sevemu.hw.host.HostCore.host_write_stream_pages`, the
        host's streaming write, its cached lines of the range written back and dropped first) and
        writes every byte -- the channel receiving them from the socket straight there.  The next
        :meth:`receive` must then be of a batch of ``count`` pages whose ``transport`` is None."""
        if not 0 < count <= PAGE_BATCH:
            raise SevInputError(Errno.EINVAL, f"batch of {count} pages: 1..{PAGE_BATCH}")
        self._staged = 0
        self._sev.core.host_write_stream_pages(self._trans_base, count * PAGE, fill)
        self._staged = count

    def receive(self, batch: PageBatch) -> None:
        """:meth:`LegacySev.receive_page_batch` of ``batch`` in this session (its transport buffers
        staged by :meth:`stage` when ``batch.transport`` is None)."""
        sev, vm = self._sev, self._vm
        n = len(batch.gpas)
        staged, self._staged = self._staged, 0
        if not 0 < n <= PAGE_BATCH:
            raise SevInputError(Errno.EINVAL, f"batch of {n} pages: 1..{PAGE_BATCH}")
        if len(batch.hdrs) != n * HDR_SLOT or batch.hdr_len > HDR_SLOT or (
                staged != n if batch.transport is None else transport_length(batch.transport) != n * PAGE):
            raise SevInputError(Errno.EINVAL, "page batch buffers do not match its page count")
        me_mask = sev.caps.me_mask
        column = vm.backed_spas(batch.gpas) if isinstance(batch.gpas, np.ndarray) else None
        if column is None:  # (not all backed already: back them)
            gpas = batch.gpas.tolist() if isinstance(batch.gpas, np.ndarray) else list(batch.gpas)
            try:
                spas = vm.back_pages(gpas)  # (the same pages as guest_page() of each, mapped in runs)
            except AddressError:  # (it checks every GPA before it backs any)
                spas = [sev.guest_page(vm, gpa, PAGE) for gpa in gpas]  # raises what KVM answers
            column = np.array(spas, dtype=np.uint64)
        hdr_base, trans_base = self._hdr_base, self._trans_base
        sev.core.host_write_stream(hdr_base, batch.hdrs)
        if batch.transport is not None:  # (None: staged in place)
            if isinstance(batch.transport, list):
                sev.core.host_write_stream(trans_base, b"".join(batch.transport))
            else:
                sev.core.host_write_stream(trans_base, batch.transport)
        if self._template is None or self._hdr_len != batch.hdr_len:
            self._template = SlotTemplate(vm.handle, hdr_base, batch.hdr_len, trans_base, PAGE_BATCH)
            self._hdr_len = batch.hdr_len
        self._ring.submit_many(CommandId.RECEIVE_UPDATE_DATA, self._template.slots(column | np.uint64(me_mask)))
        _check_batch(CommandId.RECEIVE_UPDATE_DATA, self._ring.run())


def _check_batch(cmd: CommandId, statuses: list[int | None]) -> None:
    """SevFirmwareError with the status of the first command of a batch that did not succeed."""
    if statuses.count(Status.SUCCESS) == len(statuses):
        return
    for status in statuses:
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, Status.HWERROR_PLATFORM if status is None else status)

_MEASURE = (OutBlob("paddr", "len"),)
_PEK_CSR = (OutBlob("csr_paddr", "csr_len"),)
_PDH_EXPORT = (OutBlob("pdh_cert_paddr", "pdh_cert_len"), OutBlob("certs_paddr", "certs_len"))
_GET_ID = (OutBlob("id_paddr", "id_len"),)
_SESSION = (OutBlob("session_paddr", "session_len"),)


class LegacySev(SevHost):
    """The SEV flows of one host (module docstring)."""

    # ==== platform (sev-dev.c) ====================================================================
    def platform_status(self) -> PlatformStatus:
        return self.issue(CommandId.PLATFORM_STATUS, PlatformStatus())

    def platform_state(self) -> PlatformState:
        return PlatformState(self.platform_status().state)

    def api_version(self) -> tuple[int, int, int]:
        """(major, minor, build) of the firmware; (0, 0, 0) when PLATFORM_STATUS fails."""
        try:
            st = self.platform_status()
        except SevFirmwareError:
            return (0, 0, 0)
        return st.api_major, st.api_minor, st.build

    def platform_init(self, es: bool | None = None) -> None:
        """INIT (with SEV-ES and the TMR when ``es``; by default when the CPU has SEV-ES), then
        WBINVD on every CPU and DF_FLUSH, as Linux ``__sev_platform_init_locked`` does."""
        if self.caps.es if es is None else es:
            init = InitCmd(options=int(InitOptions.SEV_ES), tmr_paddr=self.tmr_spa, tmr_len=SEV_TMR_LEN)
        else:
            init = InitCmd()
        self.issue(CommandId.INIT, init)
        self.soc.wbinvd_all()
        self.issue_nobuf(CommandId.DF_FLUSH)

    def ensure_init(self) -> bool:
        """``sev_platform_init``: INIT the platform unless it is initialised; True when this call did."""
        if self.platform_state() != PlatformState.UNINIT:
            return False
        self.platform_init()
        return True

    def shutdown(self) -> None:
        self.issue_nobuf(CommandId.SHUTDOWN)

    def factory_reset(self) -> None:
        """``sev_ioctl_do_reset``: ``-EBUSY`` while guests run; SHUTDOWN from INIT; PLATFORM_RESET."""
        state = self.platform_state()
        if state == PlatformState.WORKING:
            raise SevStateError(Errno.EBUSY, "the platform has guests (WORKING): no factory reset")
        if state == PlatformState.INIT:
            self.shutdown()
        self.issue_nobuf(CommandId.PLATFORM_RESET)

    def pek_gen(self) -> None:
        self.issue_nobuf(CommandId.PEK_GEN)

    def pdh_gen(self) -> None:
        self.issue_nobuf(CommandId.PDH_GEN)

    def pek_csr(self, length: int) -> Reply:
        """PEK_CSR into a ``length``-byte buffer (0: the length query)."""
        return self.exchange(CommandId.PEK_CSR, PekCsrCmd, {}, _PEK_CSR, (length,))

    def pek_cert_import(self, pek: bytes, oca: bytes) -> None:
        with self.psp.bounce.stage() as st:
            self.issue(CommandId.PEK_CERT_IMPORT, PekCertImportCmd(
                pek_cert_paddr=st.put(pek), pek_cert_len=len(pek), oca_cert_paddr=st.put(oca), oca_cert_len=len(oca)))

    def pdh_cert_export(self, pdh_len: int, chain_len: int) -> Reply:
        """PDH_CERT_EXPORT into buffers of these lengths (0: the length query): (PDH, PEK || OCA || CEK)."""
        return self.exchange(CommandId.PDH_CERT_EXPORT, PdhCertExportCmd, {}, _PDH_EXPORT, (pdh_len, chain_len))

    def platform_certs(self) -> tuple[bytes, bytes]:
        """(PDH, PEK || OCA || CEK) of this platform, as a migration peer or an owner asks for them."""
        reply = self.pdh_cert_export(SEV_CERT_SIZE, SEV_CERT_CHAIN_SIZE)
        return reply.blobs[0], reply.blobs[1]

    def get_id(self, length: int) -> Reply:
        """GET_ID into a ``length``-byte buffer (0: the length query)."""
        return self.exchange(CommandId.GET_ID, GetIdCmd, {}, _GET_ID, (length,))

    # ==== ASIDs ===================================================================================
    def asid_new(self, kind: VmKind) -> int:
        """An ASID for a new VM; reclaimed SEV ASIDs are flushed (WBINVD + DF_FLUSH) when no fresh one is left."""
        if kind is VmKind.PLAIN:
            return self.asids.alloc_plain()
        if not self.asids.sev_free() and self.asids.reclaimable:
            self.flush_asids()
        return self.asids.alloc_sev()

    # ==== guest context ===========================================================================
    def context(self, vm: Vm) -> None:
        """Give an SEV VM its SEV context without INITing the platform (the Python API's implicit
        KVM_SEV_INIT: its VMs live on a platform the hypervisor brought up); a VM of an SEV type
        gets KVM_SEV_INIT2's with the default ``struct kvm_sev_init``."""
        if vm.kind is not VmKind.SEV or vm.sev_active:
            return
        if vm.need_init:
            if vm.vcpus:
                raise SevStateError(Errno.EINVAL, f"{vm.name} is a {vm.vm_type.name}: its KVM_SEV_INIT2 must come "
                                                  "before its vCPUs (Hypervisor.sev_init right after create_vm)")
            self.guest_init(vm, es=vm.vm_type is not KvmVmType.SEV_VM, init2=True)
            return
        vm.sev_active = True

    def guest_init(self, vm: Vm, es: bool = False, *, init2: bool = False, vmsa_features: int = 0,
                   flags: int = 0, ghcb_version: int | None = None) -> None:
        """KVM_SEV_INIT / KVM_SEV_ES_INIT (``sev_guest_init``), or with ``init2`` KVM_SEV_INIT2
        (``sev_guest_init2``: the VM's type says SEV or SEV-ES), then ``__sev_guest_init``: no vCPU
        yet, no flags, only the ``vmsa_features`` KVM supports (none for SEV), a GHCB version KVM
        knows (none for SEV), once; SEV-ES ASIDs for ES guests, the platform INITed if it is not."""
        if init2:
            if not vm.need_init:
                raise SevStateError(Errno.EINVAL, f"{vm.name} is not a VM of an SEV type awaiting KVM_SEV_INIT2")
        else:
            if es and not self.caps.es:
                raise SevStateError(Errno.ENOTTY, "this CPU has no SEV-ES")
            if vm.vm_type is not KvmVmType.DEFAULT_VM:
                raise SevStateError(Errno.EINVAL, f"{vm.name} is a {vm.vm_type.name}: KVM_SEV_INIT2 only")
            ghcb_version = GHCB_VERSION_MIN if es else 0  # KVM_SEV_ES_INIT: the minimal protocol
        ghcb = ghcb_version or 0
        if vm.vcpus:
            raise SevStateError(Errno.EINVAL, f"{vm.name} already has vCPUs")
        if flags:
            raise SevInputError(Errno.EINVAL, f"kvm_sev_init.flags {flags:#x}: no flag is defined")
        valid = self.caps.vmsa_features if es else 0
        if vmsa_features & ~valid:
            raise SevInputError(Errno.EINVAL, f"vmsa_features {vmsa_features:#x}: this host supports {valid:#x}"
                                              f"{'' if es else ' (none for an SEV guest)'}")
        if ghcb > GHCB_VERSION_MAX or (not es and ghcb):
            raise SevInputError(Errno.EINVAL, f"GHCB version {ghcb} (SEV-ES guests: 1..{GHCB_VERSION_MAX})")
        if vm.sev_active:
            raise SevStateError(Errno.EINVAL if init2 else Errno.EBUSY, f"{vm.name} already has an SEV context")
        if vm.kind is not VmKind.SEV:
            raise SevStateError(Errno.EINVAL, f"{vm.name} was not created as an SEV VM (no SEV ASID)")
        swap = es and not self.asids.is_es(vm.asid)
        if swap and not self.asids.es_free() and self.asids.reclaimable:
            self.flush_asids()  # sev_asid_new: reclaim before giving up
        if swap and not self.asids.es_free():
            raise SevStateError(Errno.EBUSY, "no free SEV-ES ASID")
        self.ensure_init()
        if swap:
            asid = self.asids.exchange_for_es(vm.asid)
            if asid is None:
                raise SevStateError(Errno.EBUSY, "no free SEV-ES ASID")
            vm.asid = asid
        vm.sev_active = True
        vm.es = es
        vm.vmsa_features = vmsa_features
        vm.ghcb_version = ghcb or (GHCB_VERSION_MAX if es else 0)  # KVM's default for an ES VM
        vm.need_init = False

    def _activate(self, vm: Vm, handle: int, policy: int) -> None:
        """ACTIVATE ``handle`` on the VM's ASID (``sev_bind_asid``); DECOMMISSION when it fails.  An
        ES policy on a VM that is not SEV-ES (or the reverse) meets the firmware's ASID ranges: the
        error says so."""
        try:
            self.issue(CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=vm.asid))
        except SevFirmwareError as e:
            self.psp.raw(CommandId.DECOMMISSION, HandleCmd(handle=handle).encode())
            if e.status == Status.INVALID_ASID and bool(policy & GuestPolicy.ES) != vm.es:
                want = "an SEV-ES guest (KVM_SEV_ES_INIT, or KVM_SEV_INIT2 of a KVM_X86_SEV_ES_VM)" \
                    if policy & GuestPolicy.ES else "an SEV guest without ES"
                raise SevFirmwareError(f"ACTIVATE of ASID {vm.asid} (policy {policy:#x} needs {want})",
                                       e.status) from e
            raise

    def _started(self, vm: Vm, handle: int, policy: int) -> None:
        vm.handle = handle
        vm.policy = policy
        vm.state = VmState.LAUNCHING

    # ==== launch ==================================================================================
    def launch_start(self, vm: Vm, policy: int, dh: bytes | None = None, session: bytes | None = None,
                     handle: int = 0) -> int:
        """LAUNCH_START (the owner's GODH certificate and session blob staged when given), then
        ACTIVATE of the VM's ASID; the VM is LAUNCHING with the new handle, which is returned."""
        self.need_context(vm)
        fields: dict[str, int | bytes] = {"handle": handle, "policy": policy}
        with self.psp.bounce.stage() as st:
            if dh is not None:
                fields.update(dh_cert_paddr=st.put(dh), dh_cert_len=len(dh))
            if session is not None:
                fields.update(session_paddr=st.put(session), session_len=len(session))
            try:
                done = self.issue(CommandId.LAUNCH_START, self.build(LaunchStartCmd, fields))
            except SevFirmwareError as e:
                if e.status == Status.UNSUPPORTED and policy & GuestPolicy.ES:
                    raise SevFirmwareError(f"LAUNCH_START (policy {policy:#x} requires SEV-ES, which the "
                                           "platform was not INITed with)", e.status) from e
                raise
        self._activate(vm, done.handle, policy)
        self._started(vm, done.handle, policy)
        return done.handle

    def launch_update_data(self, vm: Vm, gpa: int, length: int) -> None:
        """LAUNCH_UPDATE_DATA of ``[gpa, gpa+length)`` (``sev_launch_update_data``)."""
        self.need_context(vm)
        if not 0 < length < _MAX_LEN:
            raise SevInputError(Errno.EINVAL, f"LAUNCH_UPDATE_DATA length {length:#x}")
        spas = self.pin(vm, gpa, length)  # (page-aligned SPAs)
        runs = contiguous_runs(spas)
        self.clflush_runs(spas, runs)
        offset = gpa & PAGE_MASK
        size = length
        for first, count in runs:
            n = min(count * PAGE - offset, size)
            self.issue(CommandId.LAUNCH_UPDATE_DATA,
                       LaunchUpdateDataCmd(handle=vm.handle, paddr=spas[first] + offset, len=n))
            size -= n
            offset = 0

    def launch_measure(self, vm: Vm, length: int) -> Reply:
        """LAUNCH_MEASURE into a ``length``-byte buffer (0: the length query); the VM keeps the blob."""
        self.need_context(vm)
        reply = self.exchange(CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd, {"handle": vm.handle},
                              _MEASURE, (length,))
        if length:
            vm.measurement = reply.blobs[0]
        return reply

    def launch_secret(self, vm: Vm, gpa: int, guest_len: int, hdr: bytes, trans: bytes) -> None:
        """LAUNCH_SECRET: the firmware decrypts the owner's packet into ``[gpa, gpa+guest_len)``,
        which must be backed by physically contiguous pages (``-EINVAL``, KVM ``sev_launch_secret``)."""
        self.need_context(vm)
        spas = self.pin(vm, gpa, guest_len)
        if len(contiguous_runs(spas)) != 1:
            raise SevStateError(Errno.EINVAL, f"secret region {gpa:#x}+{guest_len:#x} of {vm.name} is not "
                                              "physically contiguous")
        self.clflush_pages(spas)
        with self.psp.bounce.stage() as st:
            trans_spa = st.put(trans)
            hdr_spa = st.put(hdr)
            guest = (spas[0] + (gpa & PAGE_MASK)) | self.caps.me_mask
            self.transport(CommandId.LAUNCH_SECRET, vm, hdr_spa, len(hdr), guest, guest_len, trans_spa, len(trans))

    def launch_finish(self, vm: Vm) -> None:
        """LAUNCH_FINISH: the guest is RUNNING."""
        self.need_context(vm)
        self.issue(CommandId.LAUNCH_FINISH, HandleCmd(handle=vm.handle))
        vm.state = VmState.RUNNING

    def guest_status(self, vm: Vm) -> GuestStatusCmd:
        return self.issue(CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle))

    def attestation(self, vm: Vm, mnonce: bytes, length: int) -> Reply:
        """ATTESTATION with ``mnonce`` into a ``length``-byte buffer (0: the length query, whose
        MNONCE is zero as in KVM ``sev_get_attestation_report``)."""
        self.need_context(vm)
        if len(mnonce) != 16:
            raise SevInputError(Errno.EINVAL, f"MNONCE is 16 bytes, got {len(mnonce)}")
        return self.exchange(CommandId.ATTESTATION, AttestationCmd,
                             {"handle": vm.handle, "mnonce": bytes(mnonce) if length else bytes(16)},
                             _MEASURE, (length,))

    # ==== debug ===================================================================================
    def _dbg(self, cmd: CommandId, vm: Vm, src: int, dst: int, length: int) -> None:
        self.issue(cmd, DbgCmd(handle=vm.handle, src_paddr=src, dst_paddr=dst, len=length))

    def _dbg_read(self, vm: Vm, spa: int, length: int) -> bytes:
        """``__sev_dbg_decrypt``: the enclosing 16-byte blocks of ``[spa, spa+length)`` through a bounce buffer."""
        start = align_down(spa, GRANULE)
        size = align_up(spa + length, GRANULE) - start
        with self.psp.bounce.stage() as st:
            tmp = st.zeroed(size)
            self._dbg(CommandId.DBG_DECRYPT, vm, start, tmp, size)
            data = st.get(tmp, size)
        return data[spa - start : spa - start + length]

    def _dbg_pieces(self, vm: Vm, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """(offset in the range, SPA, length) per page of a guest range, each page pinned and its
        lines flushed (``sev_dbg_crypt``); none for an empty range."""
        self.need_context(vm)
        if length <= 0:
            return []
        spas = self.pin(vm, gpa, length)
        pieces = []
        pos = 0
        for page in spas:
            n = min(PAGE - ((gpa + pos) & PAGE_MASK), length - pos)
            self.flush_guest_page(vm, page)
            pieces.append((pos, page + ((gpa + pos) & PAGE_MASK), n))
            pos += n
        return pieces

    def dbg_decrypt(self, vm: Vm, gpa: int, length: int) -> bytes:
        """DBG_DECRYPT: ``length`` bytes of guest memory at ``gpa`` in plaintext (``sev_dbg_crypt``);
        the firmware refuses a NODBG guest (POLICY_FAILURE)."""
        out = bytearray()
        for _, spa, n in self._dbg_pieces(vm, gpa, length):
            out += self._dbg_read(vm, spa, n)
        return bytes(out)

    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None:
        """DBG_ENCRYPT: write ``data`` at ``gpa`` with the guest's key; an unaligned piece is merged
        into its decrypted 16-byte blocks first (``__sev_dbg_encrypt_user``)."""
        for pos, spa, n in self._dbg_pieces(vm, gpa, len(data)):
            piece = data[pos : pos + n]
            start = align_down(spa, GRANULE)
            end = align_up(spa + n, GRANULE)
            if (start, end) != (spa, spa + n):
                old = self._dbg_read(vm, start, end - start)
                piece = old[: spa - start] + piece + old[spa - start + n :]
            with self.psp.bounce.stage() as st:
                self._dbg(CommandId.DBG_ENCRYPT, vm, st.put(piece), start, len(piece))

    # ==== migration: source =======================================================================
    def send_start(self, vm: Vm, pdh: bytes, plat_certs: bytes, amd_certs: bytes, session_len: int) -> Reply:
        """SEND_START with the target's certificates; ``session_len`` 0 is the length query (the
        handle only, as KVM ``__sev_send_start_query_session_length``).  Returns the session and
        the guest's ``policy``."""
        self.need_context(vm)
        if not session_len:
            return self.exchange(CommandId.SEND_START, SendStartCmd, {"handle": vm.handle}, _SESSION, (0,))
        with self.psp.bounce.stage() as st:
            fields: dict[str, int | bytes] = {
                "handle": vm.handle,
                "pdh_cert_paddr": st.put(pdh), "pdh_cert_len": len(pdh),
                "plat_certs_paddr": st.put(plat_certs), "plat_certs_len": len(plat_certs),
                "amd_certs_paddr": st.put(amd_certs), "amd_certs_len": len(amd_certs),
            }
            return self.exchange(CommandId.SEND_START, SendStartCmd, fields, _SESSION, (session_len,), ("policy",))

    def session_length(self, vm: Vm) -> int:
        """The session buffer's length SEND_START needs (its query, the handle only)."""
        self.need_context(vm)
        return self.query(CommandId.SEND_START, SendStartCmd, {"handle": vm.handle}, _SESSION)[0]

    def packet_lengths(self, vm: Vm, cmd: CommandId = CommandId.SEND_UPDATE_DATA) -> tuple[int, int]:
        """(hdr_len, trans_len) a SEND_UPDATE_DATA / _VMSA needs (the query, the handle only)."""
        self.need_context(vm)
        hdr_len, trans_len = self.query(cmd, TransportCmd, {"handle": vm.handle}, PACKET)
        return hdr_len, trans_len

    def send_update_query(self, vm: Vm, cmd: CommandId = CommandId.SEND_UPDATE_DATA) -> Reply:
        """SEND_UPDATE_DATA / _VMSA as a length query (KVM: ``hdr_len`` or ``trans_len`` 0)."""
        self.need_context(vm)
        return self.exchange(cmd, TransportCmd, {"handle": vm.handle}, PACKET, (0, 0))

    def send_update_data(self, vm: Vm, gpa: int, guest_len: int, hdr_len: int, trans_len: int) -> Reply:
        """SEND_UPDATE_DATA of a guest range inside one page: (header, transport buffer)."""
        self.need_context(vm)
        guest = self.guest_page(vm, gpa, guest_len)
        return self.send_packet(CommandId.SEND_UPDATE_DATA, vm, guest, guest_len, hdr_len, trans_len)

    def send_pages(self, vm: Vm, gpas: Iterable[int]) -> Generator[tuple[int, bytes, bytes], None, None]:
        """SEND_UPDATE_DATA of whole private pages, one command each (KVM's contract): yields
        (GPA, header, transport buffer), from :meth:`send_page_batches`."""
        for batch in self.send_page_batches(vm, gpas):
            at = batch.gpas.tolist() if isinstance(batch.gpas, np.ndarray) else batch.gpas
            for i, gpa in enumerate(at):
                yield gpa, batch.hdr(i), batch.trans(i)

    def send_page_batches(self, vm: Vm, gpas: Iterable[int] | npt.NDArray[np.uint64],
                          batch: int = PAGE_BATCH) -> Generator[PageBatch, None, None]:
        """SEND_UPDATE_DATA of whole private pages, still one command per page with its own IV and
        MAC (KVM's contract), submitted ``batch`` at a time through the mailbox's ring buffer
        (:meth:`~sevemu.hypervisor.psp.PspDriver.ring`): the headers land in 64-byte slots and the
        transport buffers in consecutive pages of one bounce run, read back with one streaming read
        each.  Both ring-buffer queues are configured, so a doorbell carries up to
        :data:`PAGE_BATCH` (510) commands.  ``gpas`` may be a numpy column (the SPAs of all its pages
        are then looked up in one pass before the first doorbell,
        :meth:`~sevemu.hypervisor.npt.NestedPageTable.lookup_many`: the same pages, the nested page
        table not changing meanwhile).  Yields a :class:`PageBatch` per doorbell, its header slots
        and transport buffers views of two buffers the generator reuses, or the transport buffers
        the bounce area's own DRAM pages (a list, read-only) where those hold what the host's
        streaming read returns (:meth:`~sevemu.hw.host.HostCore.host_read_stream_pages`: a socket
        takes them as they lie) -- either way valid until the next batch is asked for (copy what
        must outlive it).  A refused command raises :class:`SevFirmwareError` (the pages before it
        were sent)."""
        if not 0 < batch <= PAGE_BATCH:
            raise SevInputError(Errno.EINVAL, f"batch of {batch} pages: 1..{PAGE_BATCH}")
        hdr_len, _ = self.packet_lengths(vm)
        me_mask = np.uint64(self.caps.me_mask)
        core = self.core
        handle = vm.handle
        spa_of = vm.spa_of
        mapped = vm.npt.mappings.get
        order = gpas.astype(np.uint64) if isinstance(gpas, np.ndarray) else None
        todo = iter(gpas) if order is None else None
        looked_up = None  # (a column: every page's SPA looked up in one pass, before any doorbell)
        any_unaligned = any_unmapped = False
        if order is not None:
            looked_up = vm.npt.lookup_many((order >> np.uint64(12)).astype(np.int64))
            any_unaligned = bool((order & np.uint64(PAGE_MASK)).any())  # (else no batch has one)
            any_unmapped = bool((looked_up < 0).any())  # (nor one of these)
            paddrs = None if any_unmapped else looked_up.astype(np.uint64) | me_mask  # (the C-bit, once)
        hdr_out = memoryview(bytearray(batch * HDR_SLOT))  # (reused: see the docstring)
        trans_out = memoryview(bytearray(batch * PAGE))
        with self.psp.ring(high=True) as ring, self.psp.bounce.stage() as st:
            hdr_base = st.alloc(batch * HDR_SLOT, PAGE)
            trans_base = st.alloc(batch * PAGE, PAGE)
            template = SlotTemplate(handle, hdr_base, hdr_len, trans_base, batch)
            start = 0
            while True:
                named: Gpas
                if order is not None and looked_up is not None:  # (GPAs as a column: SPAs looked up above)
                    named = order[start : start + batch]
                    unaligned = any_unaligned and bool((named & np.uint64(PAGE_MASK)).any())
                    spas = looked_up[start : start + batch]
                    unmapped = any_unmapped and bool((spas < 0).any())
                    column = None if paddrs is None else paddrs[start : start + batch]
                    start += batch
                else:
                    named = tuple(itertools.islice(cast("Iterator[int]", todo), batch))
                    unaligned = any(gpa & PAGE_MASK for gpa in named)
                    spas = np.fromiter(map(mapped, [gpa >> 12 for gpa in named], itertools.repeat(-1)),
                                       dtype=np.int64, count=len(named))
                    unmapped, column = bool((spas < 0).any()), None
                n = len(named)
                if not n:
                    break
                if unaligned or unmapped:  # the error KVM answers
                    listed = named.tolist() if isinstance(named, np.ndarray) else named
                    spas = np.array([spa_of(gpa) if gpa & PAGE_MASK or s < 0 else s
                                     for gpa, s in zip(listed, spas.tolist(), strict=True)], dtype=np.int64)
                if unaligned or unmapped or column is None:
                    column = spas.astype(np.uint64) | me_mask
                ring.submit_many(CommandId.SEND_UPDATE_DATA, template.slots(column))
                _check_batch(CommandId.SEND_UPDATE_DATA, ring.run())
                hdrs = hdr_out[: n * HDR_SLOT]
                core.host_read_stream_into(hdr_base, hdrs)
                trans: Transport = core.host_read_stream_pages(trans_base, n * PAGE)  # (no copy)
                if trans is None:
                    trans = trans_out[: n * PAGE]
                    core.host_read_stream_into(trans_base, trans)
                yield PageBatch(named, hdrs, trans, hdr_len)

    def send_finish(self, vm: Vm) -> None:
        self.need_context(vm)
        self.issue(CommandId.SEND_FINISH, HandleCmd(handle=vm.handle))

    def send_cancel(self, vm: Vm) -> None:
        self.need_context(vm)
        self.issue(CommandId.SEND_CANCEL, HandleCmd(handle=vm.handle))

    # ==== migration: destination ==================================================================
    def receive_start(self, vm: Vm, policy: int, pdh: bytes, session: bytes, handle: int = 0) -> int:
        """RECEIVE_START with the source's PDH and session (a new VEK), then ACTIVATE as LAUNCH_START."""
        self.need_context(vm)
        with self.psp.bounce.stage() as st:
            buf = self.build(ReceiveStartCmd, {
                "handle": handle, "policy": policy, "pdh_cert_paddr": st.put(pdh), "pdh_cert_len": len(pdh),
                "session_paddr": st.put(session), "session_len": len(session)})
            done = self.issue(CommandId.RECEIVE_START, buf)
        self._activate(vm, done.handle, policy)
        self._started(vm, done.handle, policy)
        return done.handle

    def receive_update_data(self, vm: Vm, gpa: int, guest_len: int, hdr: bytes, trans: bytes,
                            packet: Packet | None = None) -> None:
        """RECEIVE_UPDATE_DATA into a guest range inside one page.  ``packet``: a buffer the caller
        staged for a run of pages (migration), else one is staged for this call."""
        self.need_context(vm, Errno.EINVAL)
        guest = self.guest_page(vm, gpa, guest_len)
        self.receive_packet(CommandId.RECEIVE_UPDATE_DATA, vm, guest, guest_len, hdr, trans, packet)

    def receive_page_batch(self, vm: Vm, batch: PageBatch) -> None:
        """RECEIVE_UPDATE_DATA of whole pages, one command per page (KVM's contract), the batch
        submitted with one doorbell through the ring buffer: each GPA is backed (a fresh page,
        zeroed and flushed by the allocator), the headers and transport buffers copied into the
        bounce area with one streaming write each.  A refused command raises
        :class:`SevFirmwareError` (the pages before it were received).  For a run of batches,
        :meth:`page_receiver` keeps one ring-buffer session open across them."""
        with self.page_receiver(vm) as receiver:
            receiver.receive(batch)

    @contextlib.contextmanager
    def page_receiver(self, vm: Vm) -> Generator[PageReceiver, None, None]:
        """A ring-buffer session and bounce buffers for :meth:`PageReceiver.receive` of batch after
        batch (no other firmware command may be issued while it is open)."""
        self.need_context(vm, Errno.EINVAL)
        with self.psp.ring(high=True) as ring, self.psp.bounce.stage() as st:
            yield PageReceiver(self, vm, ring, st.alloc(PAGE_BATCH * HDR_SLOT, PAGE), st.alloc(PAGE_BATCH * PAGE, PAGE))

    def receive_finish(self, vm: Vm) -> None:
        """RECEIVE_FINISH: the guest is RUNNING here."""
        self.need_context(vm)
        self.issue(CommandId.RECEIVE_FINISH, HandleCmd(handle=vm.handle))
        vm.state = VmState.RUNNING

    # ==== teardown ================================================================================
    def decommission(self, vm: Vm) -> None:
        """The firmware side of ``sev_vm_destroy``: WBINVD (the guest's lines reach DRAM before its
        pages are freed: a host CLFLUSH cannot evict them), DEACTIVATE (an INACTIVE guest is fine),
        DECOMMISSION; the ASID goes to the reclaim set, or straight back if it was never bound."""
        if vm.kind is not VmKind.SEV:
            self.asids.free(vm.asid, activated=False)
            return
        if vm.snp:
            from sevemu.hypervisor.sev import snp

            snp.decommission(self, vm)
            return
        self.soc.wbinvd_all()
        if not vm.handle:
            self.asids.free(vm.asid, activated=False)
            return
        try:
            self.issue(CommandId.DEACTIVATE, HandleCmd(handle=vm.handle))
        except SevFirmwareError as e:
            if e.status != Status.INACTIVE:
                raise
        self.issue(CommandId.DECOMMISSION, HandleCmd(handle=vm.handle))
        self.asids.free(vm.asid, activated=True)
