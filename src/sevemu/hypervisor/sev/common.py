"""What every host-side SEV flow is written with: the firmware exchange, flushes, pinning, ASID reclaim.

One :class:`SevHost` per hypervisor holds the host's parts the flows use (the PSP driver and its
bounce area, the boot core, the ASID books) and the capabilities CPUID Fn8000_001F reports
(:class:`SevCaps`: the C-bit as Linux's ``sev_me_mask``, VMPAGE_FLUSH, hardware cache coherency,
SEV-ES).  The API families build on it: :mod:`.legacy` (the SEV API of SEV API 55766, chapters 5
and 6), :mod:`.es` (its SEV-ES commands); SNP's will be a sibling module over the same primitives.

The one pattern every command with outputs follows -- stage zeroed buffers of the lengths asked
for, issue the command, read back the lengths the firmware wrote, copy the buffers out, turn a
non-success status into an error -- is :meth:`SevHost.exchange`; a length *query* is the same call
with the lengths 0 (address and length 0 in the command buffer: the firmware answers
INVALID_LENGTH with the lengths it needs, Linux arch/x86/kvm/svm/sev.c ``sev_launch_measure``),
and :meth:`SevHost.fetch` asks the length, then fetches.  Errors follow
:mod:`sevemu.hypervisor.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from sevemu._util.units import PAGE, PAGE_MASK, align_down, align_up
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import TransportCmd
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.abi.vmsa import SevFeatures
from sevemu.errors import LayoutError
from sevemu.hw.host import HostSoc
from sevemu.hypervisor.asid import AsidPool
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError, SevStateError
from sevemu.hypervisor.memory import PageAllocator
from sevemu.hypervisor.psp import PspDriver, Stage
from sevemu.hypervisor.vm import Vm, VmKind

__all__ = ["PACKET", "OutBlob", "Packet", "Reply", "SevCaps", "SevHost", "contiguous_runs"]

S = TypeVar("S", bound=Struct)

_FN_SEV = 0x8000_001F
_VMPAGE_FLUSH = 1 << 2  # CPUID Fn8000_001F EAX[2]
_SME_COHERENT = 1 << 10  # EAX[10]: hardware-enforced cache coherency across encryption domains
_DEBUG_SWAP = 1 << 14  # EAX[14]: DebugSwap (X86_FEATURE_DEBUG_SWAP)
_HDR_ROOM = 0x40  # a transport header (HdrBuf, 0x34 bytes) rounded to a cache line


@dataclass(frozen=True, slots=True)
class SevCaps:
    """What CPUID Fn8000_001F tells the host (APM2 15.34; Linux arch/x86/kvm/svm/sev.c ``sev_hardware_setup``)."""

    me_mask: int
    """The C-bit, ``1 << EBX[5:0]`` (Linux ``sev_me_mask``): set in guest addresses given to the firmware."""
    vmpage_flush: bool
    """EAX[2]: the VMPAGE_FLUSH MSR writes back one page of one ASID."""
    sme_coherent: bool
    """EAX[10]: caches are coherent across encryption domains (see :meth:`SevHost.clflush_pages`)."""
    es: bool
    """SEV-ES is enabled and has ASIDs."""
    vmsa_features: int = 0
    """What an SEV-ES VM may ask for in KVM_SEV_INIT2's ``vmsa_features`` (Linux
    ``sev_supported_vmsa_features``: DEBUG_SWAP where EAX[14] says the CPU has it)."""

    @classmethod
    def of(cls, soc: HostSoc) -> SevCaps:
        eax, ebx, _, _ = soc.cpuid(_FN_SEV)
        es = soc.profile.sev_es
        return cls(me_mask=1 << (ebx & 0x3F), vmpage_flush=bool(eax & _VMPAGE_FLUSH),
                   sme_coherent=bool(eax & _SME_COHERENT), es=es,
                   vmsa_features=int(SevFeatures.DEBUG_SWAP) if es and eax & _DEBUG_SWAP else 0)


@dataclass(frozen=True, slots=True)
class OutBlob:
    """An output buffer of a firmware command: the names of its address and length fields."""

    paddr: str
    len: str


PACKET = (OutBlob("hdr_paddr", "hdr_len"), OutBlob("trans_paddr", "trans_len"))
"""The output buffers of SEND_UPDATE_DATA / SEND_UPDATE_VMSA (``struct sev_data_send_update_data``)."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a command returned to its caller: out-buffer lengths as the firmware wrote them back,
    the buffers' contents, and other fields (``handle``, ``policy``, ``state`` ...) by name."""

    lengths: tuple[int, ...] = ()
    blobs: tuple[bytes, ...] = ()
    fields: Mapping[str, int | bytes] = field(default_factory=dict)


def contiguous_runs(spas: list[int]) -> list[tuple[int, int]]:
    """(first index, page count) of physically contiguous runs of pages (Linux ``get_num_contig_pages``)."""
    if not spas:
        return []
    breaks = (np.flatnonzero(np.diff(np.asarray(spas, dtype=np.uint64)) != PAGE) + 1).tolist()
    return [(first, end - first) for first, end in zip([0, *breaks], [*breaks, len(spas)], strict=True)]


class Packet:
    """A transport packet's buffers in a stage: TRANS page-aligned (a guest page's packet stays in
    one page) with the header right below it, so one copy moves both."""

    __slots__ = ("_stage", "hdr_spa", "room", "spa", "trans_spa")

    def __init__(self, stage: Stage, hdr_len: int, trans_len: int) -> None:
        self._stage = stage
        self.room = max(_HDR_ROOM, align_up(hdr_len, _HDR_ROOM))
        below = align_up(self.room, PAGE)
        base = stage.alloc(below + trans_len, PAGE)
        self.trans_spa = base + below
        self.spa = self.hdr_spa = self.trans_spa - self.room

    def write(self, hdr: bytes, trans: bytes) -> None:
        self._stage.put_at(self.spa, hdr.ljust(self.room, b"\0") + trans)

    def read(self, hdr_len: int, trans_len: int) -> tuple[bytes, bytes]:
        data = self._stage.get(self.spa, self.room + trans_len)
        return data[:hdr_len], data[self.room :]

    def clear(self, trans_len: int) -> None:
        self._stage.put_at(self.spa, bytes(self.room + trans_len))


class SevHost:
    """The host parts and primitives the SEV flows share (see the module docstring)."""

    def __init__(self, soc: HostSoc, psp: PspDriver, asids: AsidPool, tables: PageAllocator, tmr_spa: int) -> None:
        self.soc = soc
        self.core = soc.boot_cpu
        self.psp = psp
        self.asids = asids
        self.tables = tables
        self.tmr_spa = tmr_spa
        self.caps = SevCaps.of(soc)
        self.snp = False
        """SNP_INIT done (:func:`sevemu.hypervisor.sev.snp.platform_init`): ASID flushes use SNP_DF_FLUSH."""

    # ---- firmware commands ------------------------------------------------------------------
    @staticmethod
    def build(layout: type[S], fields: Mapping[str, int | bytes]) -> S:
        """A command buffer; a value that does not fit its field is ``-EINVAL`` (the ioctl's argument)."""
        try:
            buf = layout(**fields)
            buf.encode()
        except LayoutError as e:
            raise SevInputError(Errno.EINVAL, str(e)) from None
        return buf

    def issue(self, cmd: CommandId, buf: S) -> S:
        """Issue ``cmd``; the buffer as the firmware wrote it back, or :class:`SevFirmwareError`."""
        status, out = self.psp.raw(cmd, buf.encode())
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, status)
        return type(buf).decode(out)

    def issue_nobuf(self, cmd: CommandId) -> None:
        status, _ = self.psp.raw(cmd, None)
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, status)

    def exchange(self, cmd: CommandId, cls: type[S], fields: Mapping[str, int | bytes],
                 outs: tuple[OutBlob, ...], lengths: tuple[int, ...], back: tuple[str, ...] = ()) -> Reply:
        """Issue ``cmd`` with a zeroed bounce buffer of each length in ``lengths`` for ``outs`` (a
        length 0: address and length 0, a length query); returns the lengths the firmware wrote
        back, each buffer (as much as it wrote), and the fields named in ``back``.  On a refusal,
        :class:`SevFirmwareError` carries the lengths and fields it wrote back (a query's answer)."""
        with self.psp.bounce.stage() as st:
            kw: dict[str, int | bytes] = dict(fields)
            addrs = []
            for blob, n in zip(outs, lengths, strict=True):
                spa = st.zeroed(n) if n else 0
                addrs.append(spa)
                kw[blob.paddr], kw[blob.len] = spa, n
            buf = self.build(cls, kw)
            status, out = self.psp.raw(cmd, buf.encode())
            done = cls.decode(out)
            got = tuple(int(getattr(done, blob.len)) for blob in outs)
            values = {name: getattr(done, name) for name in back}
            if status != Status.SUCCESS:
                raise SevFirmwareError(cmd.name, status, lengths=got,
                                       fields={k: v for k, v in values.items() if isinstance(v, int)})
            blobs = tuple(st.get(spa, min(n, g)) if spa else b""
                          for spa, n, g in zip(addrs, lengths, got, strict=True))
        return Reply(got, blobs, values)

    @staticmethod
    def answered(query: Callable[[], Reply]) -> tuple[int, ...]:
        """The lengths a length query was answered with (INVALID_LENGTH, the lengths written back)."""
        try:
            reply = query()
        except SevFirmwareError as e:
            if e.status != Status.INVALID_LENGTH or not any(e.lengths):
                raise
            return e.lengths
        raise SevStateError(Errno.EIO, f"a length query succeeded (lengths {reply.lengths})")

    def query(self, cmd: CommandId, cls: type[S], fields: Mapping[str, int | bytes],
              outs: tuple[OutBlob, ...]) -> tuple[int, ...]:
        """The length query of ``cmd``: the lengths the firmware needs."""
        return self.answered(lambda: self.exchange(cmd, cls, fields, outs, (0,) * len(outs)))

    @classmethod
    def fetch(cls, flow: Callable[..., Reply], outs: int = 1) -> Reply:
        """Run ``flow`` (a flow with ``outs`` output lengths) as a length query, then with the
        lengths the firmware answered: what a caller of the ioctls does in two calls."""
        return flow(*cls.answered(lambda: flow(*(0,) * outs)))

    def transport(self, cmd: CommandId, vm: Vm, hdr_spa: int, hdr_len: int, guest_paddr: int, guest_len: int,
                  trans_spa: int, trans_len: int) -> None:
        """One command of the transport family (LAUNCH_SECRET, SEND_/RECEIVE_UPDATE_*): ``struct
        sev_data_send_update_data`` and its siblings, one layout in SEV API 55766."""
        buf = TransportCmd(handle=vm.handle, hdr_paddr=hdr_spa, hdr_len=hdr_len, guest_paddr=guest_paddr,
                           guest_len=guest_len, trans_paddr=trans_spa, trans_len=trans_len)
        status, _ = self.psp.raw(cmd, buf.encode())
        if status != Status.SUCCESS:
            raise SevFirmwareError(cmd.name, status)

    def send_packet(self, cmd: CommandId, vm: Vm, guest: int, guest_len: int, hdr_len: int,
                    trans_len: int) -> Reply:
        """SEND_UPDATE_DATA / _VMSA of one guest range into staged buffers: (header, transport buffer)."""
        with self.psp.bounce.stage() as st:
            packet = Packet(st, hdr_len, trans_len)
            self.transport(cmd, vm, packet.hdr_spa, hdr_len, guest, guest_len, packet.trans_spa, trans_len)
            return Reply(blobs=packet.read(hdr_len, trans_len))

    def receive_packet(self, cmd: CommandId, vm: Vm, guest: int, guest_len: int, hdr: bytes, trans: bytes,
                       packet: Packet | None = None) -> None:
        """RECEIVE_UPDATE_DATA / _VMSA of one packet into a guest range; ``packet``: a buffer the
        caller staged for a run of packets (migration), else one is staged for this call."""
        if packet is None:
            with self.psp.bounce.stage() as st:
                self.receive_packet(cmd, vm, guest, guest_len, hdr, trans, Packet(st, len(hdr), len(trans)))
            return
        packet.write(hdr, trans)
        self.transport(cmd, vm, packet.hdr_spa, len(hdr), guest, guest_len, packet.trans_spa, len(trans))

    # ---- the VM's context and memory ---------------------------------------------------------
    @staticmethod
    def need_context(vm: Vm, errno: Errno = Errno.ENOTTY) -> None:
        """The VM has an SEV context (KVM ``sev_guest(kvm)``; a firmware handle implies one):
        ``-ENOTTY`` otherwise."""
        if vm.kind is not VmKind.SEV or not (vm.sev_active or vm.handle):
            raise SevStateError(errno, f"{vm.name} has no SEV guest context")

    @staticmethod
    def need_es(vm: Vm) -> None:
        """The VM is an SEV-ES guest (KVM ``sev_es_guest(kvm)``): ``-ENOTTY`` otherwise."""
        if not (vm.sev_active and vm.es):
            raise SevStateError(Errno.ENOTTY, f"{vm.name} is not an SEV-ES guest")

    @staticmethod
    def pin(vm: Vm, gpa: int, length: int) -> list[int]:
        """``sev_pin_memory``: back ``[gpa, gpa+length)`` and return its pages' SPAs; ``-ENOMEM``
        when the range is not guest RAM, ``-EINVAL`` when it is empty."""
        if length <= 0:
            raise SevInputError(Errno.EINVAL, f"empty guest range at GPA {gpa:#x}")
        if gpa < 0 or gpa + length > vm.memory:
            raise SevInputError(Errno.ENOMEM, f"range {gpa:#x}+{length:#x} is not in {vm.name}'s "
                                              f"{vm.memory:#x} bytes of RAM")
        return vm.back_range(gpa, length)

    def guest_page(self, vm: Vm, gpa: int, length: int) -> int:
        """The SPA, with the C-bit, of a guest range inside one page (``-EINVAL`` across a page boundary)."""
        offset = gpa & PAGE_MASK
        if offset + length > PAGE:
            raise SevInputError(Errno.EINVAL, f"guest range {gpa:#x}+{length:#x} crosses a page boundary")
        if length <= 0 or gpa < 0 or gpa - offset + PAGE > vm.memory:
            self.pin(vm, gpa - offset, PAGE if length > 0 else 0)  # raises what sev_pin_memory does
        return (vm.back(gpa) + offset) | self.caps.me_mask

    # ---- flushes ------------------------------------------------------------------------------
    def clflush_pages(self, spas: list[int]) -> None:
        """``sev_clflush_pages``: the host's lines of these pages to DRAM.

        Linux skips this on CPUs with hardware-enforced coherency (:attr:`SevCaps.sme_coherent`),
        where the PSP's encrypted write invalidates the C=0 lines.  The model's PSP writes
        encrypted data straight to DRAM without snooping (:mod:`sevemu.hw.psp`), so the host
        flushes on every generation (model choice)."""
        pages = spas if all(not spa & PAGE_MASK for spa in spas) else [align_down(spa, PAGE) for spa in spas]
        self.clflush_runs(pages, contiguous_runs(pages))

    def clflush_runs(self, pages: list[int], runs: list[tuple[int, int]]) -> None:
        """:meth:`clflush_pages` of page-aligned SPAs whose :func:`contiguous_runs` the caller has
        already (a large pinned range: one pass over its pages, not three)."""
        for first, count in runs:
            self.core.clflush_range(pages[first], count * PAGE)

    def flush_guest_page(self, vm: Vm, spa: int) -> None:
        """Before the firmware reads or writes a guest page in DRAM: the host's lines of it and the
        guest's own (VMPAGE_FLUSH where CPUID offers it, else WBINVD) -- a host CLFLUSH cannot
        evict ASID-tagged lines, and the PSP's encrypted accesses bypass the caches (model choice:
        Linux relies on ``sev_clflush_pages`` alone)."""
        page = align_down(spa, PAGE)
        self.clflush_pages([page])
        if self.caps.vmpage_flush:
            self.core.vmpage_flush(page, vm.asid)
        else:
            self.soc.wbinvd_all()

    def flush_asids(self) -> None:
        """Make reclaimed ASIDs reusable: WBINVD on every CPU, then DF_FLUSH -- SNP_DF_FLUSH once SNP is
        initialised (``sev_flush_asids``)."""
        self.soc.wbinvd_all()
        self.issue_nobuf(CommandId.SNP_DF_FLUSH if self.snp else CommandId.DF_FLUSH)
        self.asids.reclaimed()
