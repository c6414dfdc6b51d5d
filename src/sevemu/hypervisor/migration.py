"""Moving an SEV guest to another host: the KVM/QEMU flow and its wire protocol (SEV API 55766,
SEND_* and RECEIVE_*; Linux arch/x86/kvm/svm/sev.c ``sev_send_*`` / ``sev_receive_*``; QEMU
target/i386/sev.c).  The firmware side of each step is a flow of :mod:`sevemu.hypervisor.sev.legacy`.

The hypervisor never sees the guest's memory in the clear and holds no key: it moves the firmware's
sealed packets between the two Secure Processors, which share a trusted channel (TEK/TIK) set up by
SEND_START / RECEIVE_START from the *platforms'* Diffie-Hellman keys.

Flow (non-live, "stop and copy": the guest does not run while it is sent)::

    destination                                   source
    -----------                                   ------
    PDH_CERT_EXPORT -> HELLO(PDH, PEK||OCA||CEK,  ->
                             ASK||ARK)
                                                  WBINVD (guest's dirty lines -> DRAM: the PSP reads
                                                          guest memory from DRAM, not from the caches)
                                                  SEND_START (length query, then with the target's
                                                          certificates) -> policy, session
                                              <-  START(policy, memory size, vCPUs, own PDH, session)
    RECEIVE_START -> handle (new VEK)
    ACTIVATE(handle, new ASID)
                                              <-  HUGE(2 MiB regions the source backs whole)
                                                  per batch of up to 510 backed private pages:
                                                      SEND_UPDATE_DATA(GPA's SPA | C-bit) per page
                                                      -> hdr, trans (one doorbell, ring buffer)
                                              <-      PAGES(gpas, hdrs, transport buffers)
    back the pages (huge pages: below),
    RECEIVE_UPDATE_DATA(SPA | C-bit) per page
    (one doorbell, ring buffer)
                                              <-  SHARED(gpa, bytes) per shared (C=0) page: the guest
                                                  made it visible, it travels as plain RAM
                                              <-  VCPU(save area) per vCPU (a plain SEV guest's
                                                  registers are the hypervisor's to see)
                                              <-  FINISH(counts)
    RECEIVE_FINISH -> RUNNING     DONE        ->
                                                  SEND_FINISH -> SENT; the source VM is destroyed

The destination VM gets the same GPAs (backed by its own pages), the same vCPU registers and a new
ASID; it runs from where the source stopped.  What moves is architectural state -- memory and the
VMCB save area; an instruction engine's private state does not (a Python workload is a generator):
the caller attaches the engine that resumes the vCPU, as a fresh x86 engine resumes from registers.  ``ABORT(reason)`` may be sent by either side at any
point.  Failure handling: any error on the source -- the connection dropped or timed out, the
destination aborted (a packet whose MAC did not verify, a refused command), a firmware refusal --
issues SEND_CANCEL, so the source guest is RUNNING again, untouched.  Any error on the destination
discards the new VM (DEACTIVATE, DECOMMISSION, pages freed, ASID to the reclaim set).  One window
remains, as in every two-party commit: if DONE is lost after the destination finished, the source
cancels and both guests run; the caller (a management layer) must decide.

What the protocol does *not* add: legacy SEV packets are MACed one by one (SEV API 55766,
SEND_UPDATE_DATA) but not
bound to a GPA or a sequence number, so a hostile host could drop, replay or move pages; SEV does
not promise the guest otherwise (no integrity before SNP).  The counts in FINISH only catch
accidents.

Wire format: every message is a frame ``u32 big-endian length || u8 type || payload`` (the length
counts the type byte), at most :data:`MAX_FRAME` bytes; integers in payloads are big-endian.  Both
sides bound every wait with a socket timeout.  A PAGES frame carries one doorbell's packets: ``u32
count || count x u64 GPA || count x 64-byte header slot (the 0x34-byte header, zero-padded) ||
count x 4 KiB transport buffer``, at most :data:`~sevemu.hypervisor.sev.legacy.PAGE_BATCH` pages (one doorbell's), laid out
as the bounce area holds them on both sides (one copy in, one copy out: the source sends the parts
as they are with ``sendmsg``, the destination reads the frame into a buffer it reuses and stages
the views).  Every page is still its
own SEND_UPDATE_DATA / RECEIVE_UPDATE_DATA with its own IV and MAC (KVM's contract): the batching
is of submissions (the PSP's ring buffer) and of frames, not of packets.  A PAGE frame (one packet)
is still accepted.

Backing on the destination: the source names, in HUGE frames after START, the 2 MiB-aligned regions
whose 512 pages it has all backed (so all of them travel); the first page received of such a region
backs the whole region with one host huge page (:meth:`Vm.back_huge`: one 2 MiB nested-table leaf,
no page-table entry per page), as QEMU's guest RAM -- anonymous memory advised for transparent huge
pages -- gets a huge page at the first touch of a 2 MiB region when KVM pins the page
RECEIVE_UPDATE_DATA writes.  Other pages (regions not named, ``Vm.huge_pages`` off on the
destination, no huge page left) get 4 KiB pages.  The destination backs the same GPAs as the source:
a named region of which FINISH finds a page missing is a protocol error, as is a region named after
the first page, twice, unaligned or not inside the VM.

Preallocated destination (:func:`prepare_destination`): QEMU's destination, started with
``-incoming`` and the guest's ``-m``, builds the machine before the stream arrives, and for an SEV
guest registers each RAM block with KVM_MEMORY_ENCRYPT_REG_REGION, which pins the whole block (Linux
``sev_mem_enc_register_region``: ``sev_pin_memory`` with write access faults every page in, the host
kernel clearing it; then ``sev_clflush_pages``).  ``prepare_destination`` makes that VM the same way
before the connection -- every page backed (huge pages for 2 MiB regions while any are left) and
cleared (:meth:`~sevemu.hw.host.HostCore.host_clear_pages`: flushed, stored in DRAM as zeros) --
and :func:`receive_vm` (``vm=``) receives into it: START must ask for its size (ProtocolError
otherwise), the HUGE regions are then backed already, and RECEIVE_UPDATE_DATA writes into pages
that exist.

SEV-ES guests (whose registers live in the encrypted VMSA and move with SEND_UPDATE_VMSA) and
plain VMs are refused: only legacy SEV guests are modelled.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from sevemu._util.units import PAGE, PAGE_2M, KiB, MiB
from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import HdrBuf, SessionBuf
from sevemu.errors import SevemuError, VmError
from sevemu.hw import columns
from sevemu.hw.svm import GPRS
from sevemu.hypervisor.errors import SevFirmwareError
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.sev.common import Packet
from sevemu.hypervisor.sev.legacy import (
    HDR_SLOT,
    PAGE_BATCH,
    Gpas,
    PageBatch,
    PageReceiver,
    Transport,
    transport_length,
)
from sevemu.hypervisor.vm import Vm, VmKind, VmState

__all__ = [
    "MAX_FRAME",
    "Abort",
    "Channel",
    "Done",
    "Finish",
    "Hello",
    "Huge",
    "Message",
    "MigrationError",
    "MsgType",
    "Page",
    "Pages",
    "ProtocolError",
    "SendResult",
    "SharedPage",
    "Start",
    "VcpuState",
    "decode_frame",
    "encode_frame",
    "platform_certs",
    "prepare_destination",
    "receive_vm",
    "send_vm",
]

CERT_SIZE: Final = SEV_CERT_SIZE
CHAIN_SIZE: Final = SEV_CERT_CHAIN_SIZE
MAX_FRAME: Final = 4 * MiB
"""Largest frame either side accepts (a PAGES frame of 510 pages is about 2.03 MiB, HELLO about
11.5 KiB)."""
DEFAULT_TIMEOUT: Final = 30.0
_SEND_BUFFER: Final = 256 * KiB
_SOCKET_BUFFER: Final = 8 * MiB
"""SO_SNDBUF / SO_RCVBUF of a channel's socket: about four PAGES frames of 510 pages (Linux caps it
at net.core.wmem_max / rmem_max)."""
_MAX_AMD_CERTS: Final = 8 * KiB
_HUGE_FRAME: Final = 64 * KiB
"""Regions per HUGE frame (512 KiB of GPAs)."""


class MigrationError(VmError):
    """Raised when a migration fails; the local side was rolled back before raising (the source
    guest is RUNNING again after SEND_CANCEL, the destination VM is discarded).  Causes: the
    connection dropped or timed out, the peer aborted, a firmware command refused, a protocol
    violation."""


class ProtocolError(MigrationError):
    """Raised when a frame is malformed, too large, of an unknown type, or not the one expected."""


# ---- messages -----------------------------------------------------------------------------------


class MsgType(enum.IntEnum):
    HELLO = 1
    START = 2
    PAGE = 3
    SHARED = 4
    VCPU = 5
    FINISH = 6
    DONE = 7
    ABORT = 8
    PAGES = 9
    HUGE = 10


@dataclass(frozen=True, slots=True)
class Hello:
    """Destination -> source: the target platform's PDH, PEK || OCA || CEK and ASK || ARK."""

    pdh: bytes
    cert_chain: bytes
    amd_certs: bytes


@dataclass(frozen=True, slots=True)
class Start:
    """Source -> destination: SEND_START's outputs and what the destination VM needs."""

    policy: int
    memory: int
    vcpus: int
    pdh: bytes  # the source platform's PDH certificate
    session: bytes  # the 0x80-byte session buffer


@dataclass(frozen=True, slots=True)
class Huge:
    """Source -> destination, after START and before any page: 2 MiB-aligned GPAs of regions whose
    512 pages are all backed on the source and will all be sent (module docstring: backing)."""

    regions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Page:
    """One SEND_UPDATE_DATA packet of the private page at ``gpa``."""

    gpa: int
    hdr: bytes
    trans: bytes


@dataclass(frozen=True, slots=True)
class Pages:
    """The SEND_UPDATE_DATA packets of one doorbell: whole private pages (module docstring)."""

    gpas: Gpas
    """A tuple, or a u64 column (:meth:`Channel.recv` with ``stage``; a source's batches)."""
    hdrs: bytes | memoryview
    """A :data:`~sevemu.hypervisor.sev.legacy.HDR_SLOT`-byte slot per page."""
    transport: Transport
    """A 4 KiB transport buffer per page: back to back, or one buffer per page (a source's bounce
    area pages), or None on a destination that received them straight into its bounce area
    (:meth:`Channel.recv` with ``stage``)."""


@dataclass(frozen=True, slots=True)
class SharedPage:
    """A page the guest shares with the host (C=0): plain RAM, moved as is."""

    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class VcpuState:
    """A vCPU's VMCB save area (control registers, RIP, RFLAGS, the 16 GPRs in :data:`GPRS` order)."""

    index: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    rip: int
    rflags: int
    regs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Finish:
    """Source -> destination: every page was sent (counts for a sanity check)."""

    pages: int
    shared: int


@dataclass(frozen=True, slots=True)
class Done:
    """Destination -> source: RECEIVE_FINISH succeeded, the guest runs here now."""


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side: the migration is abandoned."""

    reason: str


Message = Hello | Start | Huge | Page | Pages | SharedPage | VcpuState | Finish | Done | Abort

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_START = struct.Struct(">IQI")
_VCPU = struct.Struct(">I6Q16Q")
_FINISH = struct.Struct(">QQ")
_HELLO = struct.Struct(">III")
_HEADER = struct.Struct(">IB")
StagePages = Callable[[int, Callable[[list[bytearray]], None]], None]
"""Where a PAGES frame's transport buffers go as they are received (:meth:`Channel.recv`): called
with the frame's page count and the channel's reader of that many pages, it hands the reader the
pages to fill."""


def _blob(*parts: bytes) -> bytes:
    return b"".join(parts)


def _gpa_bytes(gpas: Gpas) -> bytes:
    """The GPAs as big-endian u64s."""
    if isinstance(gpas, np.ndarray):
        return gpas.astype(">u8").tobytes()
    return struct.pack(f">{len(gpas)}Q", *gpas)


def _pages_parts(msg: Pages) -> list[bytes | bytearray | memoryview]:
    """The PAGES frame of ``msg`` as its parts, in order: framing and GPAs, the header slots, the
    transport buffers (sent as they are, without joining them: one part, or one per page)."""
    n = len(msg.gpas)
    transport = msg.transport
    if len(msg.hdrs) != n * HDR_SLOT or transport is None or transport_length(transport) != n * PAGE \
            or (isinstance(transport, list) and len(transport) != n):
        raise ProtocolError(f"PAGES of {n} pages with {len(msg.hdrs)} header and {transport_length(transport)} "
                            "transport bytes")
    length = 1 + 4 + n * (8 + HDR_SLOT + PAGE)
    if length > MAX_FRAME:
        raise ProtocolError(f"PAGES frame of {length} bytes exceeds {MAX_FRAME}")
    head: list[bytes | bytearray | memoryview] = [
        _HEADER.pack(length, MsgType.PAGES) + _U32.pack(n) + _gpa_bytes(msg.gpas), msg.hdrs]
    return [*head, *transport] if isinstance(transport, list) else [*head, transport]


def encode_frame(msg: Message) -> bytes:
    """The frame of ``msg`` (module docstring)."""
    kind: MsgType
    if isinstance(msg, Pages):
        return b"".join(_pages_parts(msg))
    elif isinstance(msg, Page):
        kind, payload = MsgType.PAGE, _blob(_U64.pack(msg.gpa), msg.hdr, msg.trans)
    elif isinstance(msg, Hello):
        kind = MsgType.HELLO
        payload = _blob(_HELLO.pack(len(msg.pdh), len(msg.cert_chain), len(msg.amd_certs)),
                        msg.pdh, msg.cert_chain, msg.amd_certs)
    elif isinstance(msg, Start):
        kind = MsgType.START
        payload = _blob(_START.pack(msg.policy, msg.memory, msg.vcpus), msg.pdh, msg.session)
    elif isinstance(msg, Huge):
        kind, payload = MsgType.HUGE, _U32.pack(len(msg.regions)) + struct.pack(f">{len(msg.regions)}Q", *msg.regions)
    elif isinstance(msg, SharedPage):
        kind, payload = MsgType.SHARED, _blob(_U64.pack(msg.gpa), msg.data)
    elif isinstance(msg, VcpuState):
        kind = MsgType.VCPU
        payload = _VCPU.pack(msg.index, msg.cr0, msg.cr3, msg.cr4, msg.efer, msg.rip, msg.rflags, *msg.regs)
    elif isinstance(msg, Finish):
        kind, payload = MsgType.FINISH, _FINISH.pack(msg.pages, msg.shared)
    elif isinstance(msg, Done):
        kind, payload = MsgType.DONE, b""
    else:
        kind, payload = MsgType.ABORT, msg.reason.encode("utf-8", "replace")[:1024]
    if len(payload) + 1 > MAX_FRAME:
        raise ProtocolError(f"{kind.name} frame of {len(payload) + 1} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(payload) + 1, kind) + payload


def _need(cond: bool, kind: MsgType, what: str) -> None:
    if not cond:
        raise ProtocolError(f"malformed {kind.name} frame: {what}")


def _pages_count(n: int, count_bytes: bytes | memoryview) -> int:
    """The page count of a PAGES payload of ``n`` bytes that starts with ``count_bytes``; checked."""
    kind = MsgType.PAGES
    _need(n >= 4, kind, "truncated")
    count: int = _U32.unpack_from(count_bytes)[0]
    _need(0 < count <= PAGE_BATCH, kind, f"{count} pages")
    _need(n == 4 + count * (8 + HDR_SLOT + PAGE), kind, f"{n} bytes for {count} pages")
    return count


def _pages_head(head: memoryview, count: int, column: bool = False) -> tuple[Gpas, memoryview]:
    """The GPAs (a tuple; a u64 column with ``column``) and header slots (a view) of the ``count *
    (8 + HDR_SLOT)`` bytes after a PAGES payload's count; the slots' padding checked."""
    hdrs = head[8 * count : count * (8 + HDR_SLOT)]
    _need(not np.frombuffer(hdrs, dtype=np.uint8).reshape(count, HDR_SLOT)[:, HdrBuf.SIZE :].any(),
          MsgType.PAGES, "header padding is not zero")
    if column:
        return np.frombuffer(head, dtype=">u8", count=count).astype(np.uint64), hdrs
    return struct.unpack_from(f">{count}Q", head), hdrs


def _decode_pages(payload: bytes | memoryview) -> Pages:
    """The PAGES message of a frame's payload; its header slots and pages are views of it."""
    count = _pages_count(len(payload), payload)
    view = memoryview(payload)  # (the header slots and pages are views of the frame: no copies)
    trans_at = 4 + count * (8 + HDR_SLOT)
    gpas, hdrs = _pages_head(view[4:trans_at], count)
    return Pages(gpas, hdrs, view[trans_at:])


def decode_frame(kind_byte: int, payload: bytes) -> Message:
    """The message of one frame's type byte and payload; :class:`ProtocolError` if malformed."""
    try:
        kind = MsgType(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind_byte}") from None
    n = len(payload)
    if kind is MsgType.PAGES:
        return _decode_pages(payload)
    if kind is MsgType.PAGE:
        _need(n > 8 + HdrBuf.SIZE, kind, f"{n} bytes")
        return Page(_U64.unpack_from(payload)[0], payload[8 : 8 + HdrBuf.SIZE], payload[8 + HdrBuf.SIZE :])
    if kind is MsgType.HELLO:
        _need(n >= _HELLO.size, kind, "truncated")
        a, b, c = _HELLO.unpack_from(payload)
        _need(n == _HELLO.size + a + b + c, kind, "lengths do not add up")
        p = _HELLO.size
        return Hello(payload[p : p + a], payload[p + a : p + a + b], payload[p + a + b :])
    if kind is MsgType.START:
        _need(n == _START.size + CERT_SIZE + SessionBuf.SIZE, kind, f"{n} bytes")
        policy, memory, vcpus = _START.unpack_from(payload)
        p = _START.size
        return Start(policy, memory, vcpus, payload[p : p + CERT_SIZE], payload[p + CERT_SIZE :])
    if kind is MsgType.HUGE:
        _need(n >= 4, kind, "truncated")
        count = _U32.unpack_from(payload)[0]
        _need(n == 4 + 8 * count, kind, f"{n} bytes for {count} regions")
        return Huge(struct.unpack_from(f">{count}Q", payload, 4))
    if kind is MsgType.SHARED:
        _need(n == 8 + PAGE, kind, f"{n} bytes")
        return SharedPage(_U64.unpack_from(payload)[0], payload[8:])
    if kind is MsgType.VCPU:
        _need(n == _VCPU.size, kind, f"{n} bytes")
        v = _VCPU.unpack(payload)
        return VcpuState(v[0], v[1], v[2], v[3], v[4], v[5], v[6], tuple(v[7:]))
    if kind is MsgType.FINISH:
        _need(n == _FINISH.size, kind, f"{n} bytes")
        return Finish(*_FINISH.unpack(payload))
    if kind is MsgType.DONE:
        _need(n == 0, kind, f"{n} bytes")
        return Done()
    return Abort(payload.decode("utf-8", "replace"))


class Channel:
    """One migration connection: framed messages over a stream socket, every wait bounded.

    Outgoing frames are buffered and pushed by :meth:`flush` (called before every wait for an
    answer); ``bytes_sent`` / ``bytes_received`` count the wire bytes.  The socket's kernel buffers
    are asked to hold several PAGES frames each way (``_SOCKET_BUFFER``): the sender seals the next
    doorbell's pages while the receiver still works on earlier ones, instead of the two taking
    turns (with the kernel's default start the loopback stream stalled about once a frame).
    """

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        sock.settimeout(timeout)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
        self.sock = sock
        self._out = bytearray()
        self._reused = bytearray()
        self.bytes_sent = 0
        self.bytes_received = 0

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> Channel:
        return cls(socket.create_connection((host, port), timeout=timeout), timeout)

    @classmethod
    def accept(cls, listener: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> Channel:
        listener.settimeout(timeout)
        sock, _ = listener.accept()
        return cls(sock, timeout)

    def send(self, msg: Message) -> None:
        if isinstance(msg, Pages):  # (about a MiB: its parts go out as they are, after what is pending)
            parts = _pages_parts(msg)  # (their lengths checked: the frame's)
            total = _HEADER.size + 4 + len(msg.gpas) * (8 + HDR_SLOT + PAGE)
            self.flush()
            self._send_parts(parts, total)
            self.bytes_sent += total
            return
        frame = encode_frame(msg)
        self.bytes_sent += len(frame)
        if len(frame) >= _SEND_BUFFER:  # a large frame goes out as it is, after what is pending
            self.flush()
            self.sock.sendall(frame)
            return
        self._out += frame
        if len(self._out) >= _SEND_BUFFER:
            self.flush()

    def _send_parts(self, parts: list[bytes | bytearray | memoryview], total: int) -> None:
        """``sendall`` of the parts (byte buffers of ``total`` bytes) one after the other, gathered
        by the kernel (``sendmsg``); after a partial send, the rest from where the kernel stopped."""
        left = parts
        while total > 0:
            sent = self.sock.sendmsg(left)
            if sent >= total:
                return
            total -= sent
            i = 0
            while sent >= len(left[i]):
                sent -= len(left[i])
                i += 1
            left = left[i:]
            if sent:
                left[0] = memoryview(left[0]).cast("B")[sent:]

    def flush(self) -> None:
        if self._out:
            out, self._out = bytes(self._out), bytearray()
            self.sock.sendall(out)

    def _fill(self, view: memoryview) -> None:
        """Read exactly ``len(view)`` bytes into ``view`` (frames are read exactly, nothing ahead:
        a PAGES frame's transport buffers can then go straight where they belong)."""
        got, n = 0, len(view)
        while got < n:
            k = self.sock.recv_into(view[got:] if got else view)
            if not k:
                raise ConnectionError("the peer closed the connection")
            got += k
        self.bytes_received += n

    def _fill_pages(self, pages: list[bytearray]) -> None:
        """Read exactly ``len(pages)`` 4 KiB pages into ``pages``, in order (``recvmsg_into``: the
        kernel scatters each read over them)."""
        total = len(pages) * PAGE
        got = 0
        while got < total:
            i, off = divmod(got, PAGE)
            into: list[bytearray | memoryview] = list(pages[i:]) if not off else [memoryview(pages[i])[off:], *pages[i + 1 :]]
            k = self.sock.recvmsg_into(into)[0]
            if not k:
                raise ConnectionError("the peer closed the connection")
            got += k
        self.bytes_received += total

    def _read(self, n: int) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf))
        return bytes(buf)

    def recv(self, transient: bool = False, stage: StagePages | None = None) -> Message:
        """The next message (flushes pending output first).  ``transient``: a PAGES frame is read
        into a buffer the channel reuses and its header slots and pages are views of it, valid
        until the next call (the destination copies them into the bounce area first).  ``stage``:
        a PAGES frame's transport buffers are read straight into the pages ``stage`` hands over
        (``stage(count, fill)`` calls ``fill`` with them: :meth:`PageReceiver.stage`), after its
        count, GPAs and header slots were read and checked, and the message's ``transport`` is
        None."""
        self.flush()
        length, kind = _HEADER.unpack(self._read(_HEADER.size))
        if not 1 <= length <= MAX_FRAME:
            raise ProtocolError(f"frame length {length} outside 1..{MAX_FRAME}")
        if stage is not None and kind == MsgType.PAGES:
            count = _pages_count(length - 1, self._read(4) if length > 4 else b"")
            gpas, hdrs = _pages_head(self._read_reused(count * (8 + HDR_SLOT)), count, column=True)
            stage(count, self._fill_pages)
            return Pages(gpas, hdrs, None)
        if transient and kind == MsgType.PAGES:
            return _decode_pages(self._read_reused(length - 1))
        return decode_frame(kind, self._read(length - 1))

    def _read_reused(self, n: int) -> memoryview:
        """``n`` bytes read into the channel's reused buffer (a new one when it is too small: views
        of the old one stay valid)."""
        if len(self._reused) < n:
            self._reused = bytearray(n)
        view = memoryview(self._reused)[:n]
        self._fill(view)
        return view

    def abort(self, reason: str) -> None:
        """Best effort: tell the peer the migration is off (errors ignored: it may be gone)."""
        try:
            self.send(Abort(reason))
            self.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.sock.close()


M = TypeVar("M", Hello, Start, Done)


def _next(chan: Channel, transient: bool = False, stage: StagePages | None = None) -> Message:
    msg = chan.recv(transient, stage)
    if isinstance(msg, Abort):
        raise MigrationError(f"the peer aborted: {msg.reason}")
    return msg


def _expect(chan: Channel, kind: type[M]) -> M:
    msg = _next(chan)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__}, got a {type(msg).__name__} frame")
    return msg


# ---- firmware calls -----------------------------------------------------------------------------


def platform_certs(hv: Hypervisor) -> tuple[bytes, bytes]:
    """(PDH, PEK || OCA || CEK) of this platform, by PDH_CERT_EXPORT."""
    return hv.sev.platform_certs()


# ---- source -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendResult:
    """What :func:`send_vm` moved."""

    pages: int
    shared: int
    bytes_sent: int
    seconds: float
    """Wall time from the start to SEND_FINISH (the source VM's teardown after it not counted)."""
    cpu_seconds: float = 0.0
    """This process's CPU time over the same span (``time.process_time``)."""


def _check_sendable(vm: Vm) -> None:
    if vm.kind is not VmKind.SEV or not vm.handle:
        raise MigrationError(f"{vm.name} is not a launched SEV guest")
    if vm.state is not VmState.RUNNING:
        raise MigrationError(f"{vm.name} is {vm.state.value}, not running")
    if vm.policy & GuestPolicy.ES:
        raise MigrationError(f"{vm.name} is an SEV-ES guest: SEND_UPDATE_VMSA is not modelled")


def send_vm(hv: Hypervisor, vm: Vm, chan: Channel, *, keep_source: bool = False) -> SendResult:
    """Send ``vm`` over ``chan`` (module docstring); the guest must not run meanwhile.

    On success the source guest is SENT and the VM destroyed (kept, for inspection, with
    ``keep_source``).  On failure SEND_CANCEL makes it RUNNING again and :class:`MigrationError` is
    raised.
    """
    _check_sendable(vm)
    t0, c0 = time.perf_counter(), time.process_time()
    sev = hv.sev
    sev.context(vm)
    started = False
    try:
        hello = _expect(chan, Hello)
        if len(hello.pdh) != CERT_SIZE or len(hello.cert_chain) != CHAIN_SIZE \
                or not 0 < len(hello.amd_certs) <= _MAX_AMD_CERTS:
            raise ProtocolError("HELLO certificates have the wrong sizes")
        hv.soc.wbinvd_all()  # the guest's dirty lines to DRAM: SEND_UPDATE_DATA reads DRAM
        out = sev.send_start(vm, hello.pdh, hello.cert_chain, hello.amd_certs, sev.session_length(vm))
        started = True
        own_pdh, _ = sev.platform_certs()
        chan.send(Start(int(out.fields["policy"]), vm.memory, len(vm.vcpus), own_pdh, out.blobs[0]))
        pages, shared = _send_pages(hv, vm, chan)
        for vcpu in vm.vcpus:
            s = vcpu.vmcb
            chan.send(VcpuState(vcpu.index, s.cr0, s.cr3, s.cr4, s.efer, s.rip, s.rflags,
                                tuple(s.regs[r] for r in GPRS)))
        chan.send(Finish(pages, shared))
        _expect(chan, Done)
        sev.send_finish(vm)
    except (OSError, SevemuError) as exc:
        note = ""
        if started:
            try:
                sev.send_cancel(vm)
            except SevFirmwareError as cancel:
                note = f"; SEND_CANCEL failed too: {cancel}"
        chan.abort(f"source: {exc}")
        if isinstance(exc, MigrationError) and not note:
            raise
        raise MigrationError(f"sending {vm.name} failed: {exc}{note}") from exc
    result = SendResult(pages, shared, chan.bytes_sent, time.perf_counter() - t0, time.process_time() - c0)
    if not keep_source:
        hv.destroy(vm)
    return result


def _send_pages(hv: Hypervisor, vm: Vm, chan: Channel) -> tuple[int, int]:
    columns = vm.npt.columns()  # (every mapping, ascending: read once; nothing maps or unmaps meanwhile)
    regions = _whole_regions(vm, columns[0])  # (named before any page: module docstring, backing)
    for i in range(0, len(regions), _HUGE_FRAME):
        chan.send(Huge(tuple(regions[i : i + _HUGE_FRAME])))
    gfns = columns[0].astype(np.uint64)
    is_shared = np.isin(gfns, np.fromiter((gpa >> 12 for gpa in vm.shared_gpas), dtype=np.uint64))
    for gfn in gfns[is_shared].tolist():  # (ascending, before the private pages)
        chan.send(SharedPage(gfn << 12, vm.host_read(gfn << 12, PAGE)))
    shared = int(np.count_nonzero(is_shared))
    private = gfns[~is_shared] << np.uint64(12)
    pages = 0
    with contextlib.closing(hv.sev.send_page_batches(vm, private)) as batches:
        for batch in batches:
            if batch.hdr_len != HdrBuf.SIZE:
                raise ProtocolError(f"SEND_UPDATE_DATA headers of {batch.hdr_len:#x} bytes do not fit PAGES")
            chan.send(Pages(batch.gpas, batch.hdrs, batch.transport))
            pages += len(batch.gpas)
    return pages, shared


# ---- destination --------------------------------------------------------------------------------


def prepare_destination(hv: Hypervisor, memory: int, name: str = "migrated") -> Vm:
    """The destination VM as QEMU started with ``-incoming`` has it before the migration begins (module
    docstring, preallocated destination): created with ``memory`` bytes of RAM, every page backed
    (2 MiB regions with a host huge page each where one is left, the rest with 4 KiB pages) and
    pinned -- KVM_MEMORY_ENCRYPT_REG_REGION, which QEMU issues for every RAM block of an SEV
    guest when it creates the machine, pins the whole range (``sev_pin_memory`` with write access:
    every page faulted in and cleared by the host kernel) and flushes it (``sev_clflush_pages``).
    Pass it to :func:`receive_vm` (``vm=``)."""
    if memory <= 0 or memory % PAGE or memory > hv.soc.dram_size:
        raise MigrationError(f"a destination of {memory:#x} bytes: a positive multiple of 4 KiB within DRAM")
    vm = hv.create_vm(name, memory, VmKind.SEV)
    try:
        if vm.huge_pages:
            for gpa in range(0, memory - PAGE_2M + 1, PAGE_2M):
                if vm.back_huge(gpa) is None:
                    break  # (no huge page left: 4 KiB pages for the rest)
        vm.back_range(0, memory)
        spas = np.sort(np.fromiter(vm.npt.mappings.values(), dtype=np.uint64, count=len(vm.npt.mappings)))
        breaks = np.flatnonzero(np.diff(spas) != np.uint64(PAGE)) + 1
        for run in np.split(spas, breaks):
            hv.core.host_clear_pages(int(run[0]), len(run) * PAGE)  # (cleared: flushed and zeroed)
    except SevemuError:
        hv.destroy(vm)
        raise
    return vm


def receive_vm(hv: Hypervisor, chan: Channel, *, amd_certs: bytes, name: str = "migrated",
               max_memory: int | None = None, vm: Vm | None = None) -> Vm:
    """Receive a guest over ``chan`` (module docstring); returns the RUNNING VM.

    ``amd_certs`` is this platform's ASK || ARK (a host fetches it from AMD's key server).  ``vm``:
    a destination VM made beforehand by :func:`prepare_destination` (START must then ask for its
    memory size: ProtocolError otherwise); by default one is created when START arrives.  On any
    failure the new VM is discarded and :class:`MigrationError` raised.
    """
    prepared = vm
    if prepared is not None and (prepared.handle or prepared.vcpus or prepared.kind is not VmKind.SEV
                                 or prepared not in hv.vms):
        raise MigrationError(f"{prepared.name} is not a fresh destination VM of this host (prepare_destination)")
    sev = hv.sev
    try:
        pdh, chain = sev.platform_certs()
        chan.send(Hello(pdh, chain, bytes(amd_certs)))
        start = _expect(chan, Start)
        limit = max_memory if max_memory is not None else hv.soc.dram_size
        if start.memory <= 0 or start.memory % PAGE or start.memory > limit or not 0 < start.vcpus <= 64:
            raise ProtocolError(f"START asks for {start.memory:#x} bytes and {start.vcpus} vCPUs")
        if prepared is not None and start.memory != prepared.memory:
            raise ProtocolError(f"START asks for {start.memory:#x} bytes; the destination VM has {prepared.memory:#x}")
        vm = prepared if prepared is not None else hv.create_vm(name, start.memory, VmKind.SEV)
        sev.context(vm)
        sev.receive_start(vm, start.policy, start.pdh, start.session)
        _receive_pages(hv, vm, chan, start.vcpus)
        vm.state = VmState.RUNNING
        chan.send(Done())
        chan.flush()
    except (OSError, SevemuError) as exc:
        if vm is not None:
            hv.destroy(vm)
        chan.abort(f"destination: {exc}")
        if isinstance(exc, MigrationError):
            raise
        raise MigrationError(f"receiving failed: {exc}") from exc
    return vm


class _Seen:
    """The GPAs received so far: a flag per page of the VM (a frame's pages checked and recorded as
    columns, whatever the number received before)."""

    def __init__(self, memory: int) -> None:
        self.flags = np.zeros(memory // PAGE, dtype=bool)
        self.any = False

    def region_whole(self, gpa: int) -> bool:
        """Whether every page of the 2 MiB region at ``gpa`` (inside the VM) was received."""
        return bool(self.flags[gpa // PAGE : (gpa + PAGE_2M) // PAGE].all())


def _new_page(vm: Vm, gpa: int, seen: _Seen) -> None:
    """ProtocolError unless ``gpa`` is a page of the VM not received before; records it."""
    if gpa % PAGE or not 0 <= gpa < vm.memory or seen.flags[gpa // PAGE]:
        raise ProtocolError(f"page at GPA {gpa:#x}: unaligned, outside the VM or repeated")
    seen.flags[gpa // PAGE] = True
    seen.any = True


def _new_pages(vm: Vm, gpas: Gpas, seen: _Seen) -> None:
    """:func:`_new_page` of each GPA (all checked before any is recorded)."""
    try:
        at = np.asarray(gpas, dtype=np.uint64)
    except (OverflowError, ValueError):  # not a u64 (a frame's GPAs are): named below
        bad = True
    else:
        shape = columns.stats(at, (1,))[0] if len(at) else None  # (bounds, alignment, order: one pass)
        bad = shape is not None and (shape.bits % PAGE != 0 or shape.hi >= vm.memory)
    if not bad:
        gfns = (at >> np.uint64(12)).astype(np.intp)
        # (ascending -- each GPA above the one before: none repeated)
        repeated = shape is not None and not shape.apart and len(np.unique(gfns)) != len(gfns)
        bad = repeated or bool(seen.flags[gfns].any())
    if bad:
        flags = seen.flags
        listed = gpas.tolist() if isinstance(gpas, np.ndarray) else list(gpas)
        bad_gpa = next(gpa for i, gpa in enumerate(listed) if gpa % PAGE or not 0 <= gpa < vm.memory
                       or flags[gpa // PAGE] or gpa in listed[:i])
        raise ProtocolError(f"page at GPA {bad_gpa:#x}: unaligned, outside the VM or repeated")
    seen.flags[gfns] = True
    seen.any = True


def _whole_regions(vm: Vm, gfns: npt.NDArray[np.int64] | None = None) -> list[int]:
    """2 MiB-aligned GPAs of the regions of ``vm`` whose 512 pages are all backed, ascending
    (``gfns``: its backed GFNs when the caller has them as a column)."""
    if gfns is None:
        gfns = np.fromiter(vm.npt.mappings, dtype=np.int64, count=len(vm.npt.mappings))
    counts = np.bincount(gfns >> 9)
    return [int(region) << 21 for region in np.flatnonzero(counts == PAGE_2M // PAGE)]


def _huge_regions(vm: Vm, msg: Huge, named: set[int], pending: set[int], started: bool) -> None:
    """Record the regions of a HUGE frame (module docstring: backing); ProtocolError if one is
    unaligned, outside the VM, named before or arrives after the first page."""
    fresh = set(msg.regions)
    bad = started or len(fresh) != len(msg.regions) or not named.isdisjoint(fresh) or any(
        r % PAGE_2M or not 0 <= r <= vm.memory - PAGE_2M for r in fresh)
    if bad:
        raise ProtocolError("HUGE names a region twice, unaligned or outside the VM, or comes after a page")
    named |= fresh
    if vm.huge_pages:  # (a region with a page backed already -- a prepared destination's -- gets none)
        mapped = vm.npt.mappings.keys()
        pending |= {r for r in fresh if mapped.isdisjoint(range(r >> 12, (r + PAGE_2M) >> 12))}


def _back_huge(vm: Vm, gpas: Gpas | list[int], pending: set[int]) -> None:
    """Back with one huge page each the regions of ``gpas`` named by HUGE and not backed yet."""
    if not pending:
        return
    firsts = np.asarray(gpas, dtype=np.uint64) >> np.uint64(21)
    # the regions in order of their first page (the order one by one would back them in)
    regions, at = np.unique(firsts, return_index=True)
    for region in regions[np.argsort(at, kind="stable")].tolist():
        if region << 21 in pending:
            pending.discard(region << 21)
            vm.back_huge(region << 21)  # (None: no huge page left, the pages get 4 KiB ones)


def _receive_pages(hv: Hypervisor, vm: Vm, chan: Channel, vcpus: int) -> None:
    sev = hv.sev
    pages = shared = 0
    seen = _Seen(vm.memory)
    named: set[int] = set()  # regions HUGE named
    pending: set[int] = set()  # of those, the ones to back with a huge page at their first page
    with hv.psp.bounce.stage() as st, contextlib.ExitStack() as session:
        packet = Packet(st, HdrBuf.SIZE, PAGE)
        receiver: PageReceiver | None = None  # one ring-buffer session for a run of PAGES frames

        def stage(count: int, fill: Callable[[list[bytearray]], None]) -> None:
            """A PAGES frame's transport buffers straight into the session's bounce area."""
            nonlocal receiver
            if receiver is None:
                receiver = session.enter_context(sev.page_receiver(vm))
            receiver.stage(count, fill)

        while True:
            msg = _next(chan, transient=True, stage=stage)  # (a PAGES frame is staged before the next read)
            if isinstance(msg, Pages):
                _new_pages(vm, msg.gpas, seen)
                _back_huge(vm, msg.gpas, pending)
                if receiver is None:
                    receiver = session.enter_context(sev.page_receiver(vm))
                # each GPA backs a fresh page: zeroed and flushed by the allocator
                receiver.receive(PageBatch(msg.gpas, msg.hdrs, msg.transport, HdrBuf.SIZE))
                pages += len(msg.gpas)
                continue
            if receiver is not None:  # other commands go through the mailbox again
                session.close()
                receiver = None
            if isinstance(msg, (Page, SharedPage)):
                gpa = msg.gpa
                _new_page(vm, gpa, seen)
                _back_huge(vm, [gpa], pending)
                if isinstance(msg, SharedPage):
                    vm.back(gpa)
                    vm.host_write(gpa, msg.data)
                    vm.shared_gpas.add(gpa)
                    shared += 1
                    continue
                if len(msg.trans) > PAGE:
                    raise ProtocolError(f"packet of {len(msg.trans)} bytes exceeds a page")
                if len(msg.hdr) > packet.room:
                    raise ProtocolError(f"packet header of {len(msg.hdr)} bytes")
                # backs a fresh page: zeroed and flushed by the allocator, no host line to write back
                sev.receive_update_data(vm, gpa, len(msg.trans), msg.hdr, msg.trans, packet)
                pages += 1
            elif isinstance(msg, Huge):
                _huge_regions(vm, msg, named, pending, seen.any)
            elif isinstance(msg, VcpuState):
                if msg.index != len(vm.vcpus) or msg.index >= vcpus:
                    raise ProtocolError(f"vCPU {msg.index} out of order")
                s = vm.add_vcpu().vmcb
                s.cr0, s.cr3, s.cr4, s.efer, s.rip, s.rflags = msg.cr0, msg.cr3, msg.cr4, msg.efer, msg.rip, msg.rflags
                s.regs.update(zip(GPRS, msg.regs, strict=True))
            elif isinstance(msg, Finish):
                if (msg.pages, msg.shared) != (pages, shared) or len(vm.vcpus) != vcpus:
                    raise ProtocolError(f"FINISH counts {msg.pages}+{msg.shared} pages, {vcpus} vCPUs; "
                                        f"received {pages}+{shared}, {len(vm.vcpus)}")
                short = next((r for r in sorted(named) if not seen.region_whole(r)), None)
                if short is not None:
                    raise ProtocolError(f"HUGE named the region at GPA {short:#x}, and not all of its pages came")
                sev.receive_finish(vm)
                return
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} frame while receiving pages")
