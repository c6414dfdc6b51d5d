"""The firmware core every command API shares: the handler registry, the dispatcher and the state.

One firmware, several APIs: the legacy SEV API (``sevemu.firmware.sev``, SEV-ES included) and the
SEV-SNP API (``sevemu.firmware.snp``) each fill a :class:`CommandTable` with their handlers; :class:`Firmware` runs any
set of tables over one dispatcher, one NV store and one platform identity.  This module knows no
command: the API packages import it, never the other way round (an import-linter contract says so),
and the composition root chooses the tables (:mod:`sevemu.firmware.apis`).

Registration is data.  Each entry names the command id, the buffer layout the handler reads (checked
at registration against :data:`sevemu.abi.sev.COMMAND_BUFFERS` or :data:`sevemu.abi.snp.SNP_COMMAND_BUFFERS`, and by mypy against the handler's
signature), the platform states in which the command is allowed (SEV API 55766 ch. 5, "Platform
State Machine"), and, for a command on one guest, the guest states in which it is allowed (SEV API
55766 ch. 6, GSTATE).  The dispatcher:

1. refuses unknown ids (INVALID_COMMAND) and commands not allowed in the current platform state
   (INVALID_PLATFORM_STATE);
2. reads the command buffer through the PSP's DMA view (an address outside DRAM: INVALID_ADDRESS; a
   buffer that does not decode, e.g. non-zero reserved bytes: INVALID_PARAM, model choice);
3. for a guest command: runs the checks the entry orders before the guest lookup, looks the handle
   up (INVALID_GUEST), runs the checks ordered before the guest-state check, then checks the guest
   state (INVALID_GUEST_STATE) -- the order of AMD's firmware for that command (AMD-ASPFW
   ``sev_mcmd.c``: most commands check the handle and the state first; a few check lengths or
   addresses in between, which the entry declares);
4. runs the handler; a handler raises :class:`~sevemu.errors.FirmwareError` to refuse, and must do
   every check before it changes anything, so a refused command leaves the state untouched;
5. writes the handler's output buffer back (also for the length-query convention: :class:`Reply`
   answers INVALID_LENGTH with the required length written into the buffer; Linux
   ``arch/x86/kvm/svm/sev.c``, ``sev_launch_measure``).

In ring-buffer mode (RING_BUFFER; :mod:`sevemu.firmware.ring`) the PSP device calls
:meth:`Firmware.doorbell` for each CMDRESP write, and queued commands run through the same
:meth:`Firmware.handle`; a run of one queued command goes to :meth:`Firmware.handle_batch` when the
command registered a batch runner (:meth:`CommandTable.batch`): the same dispatcher checks per
buffer (its address; its decoding, by the runner: :class:`QueuedBuffers`), then the runner takes the
longest prefix that succeeds, with the effects of one by one.

Nothing raises out of :meth:`Firmware.handle`: an unexpected exception inside a handler is a
firmware bug, answered with HWERROR_PLATFORM and recorded in :attr:`Firmware.internal_errors`
(tests assert it stays empty).  :attr:`Firmware.log` keeps the last :data:`LOG_SIZE` commands and
their statuses (a ring: a host that runs for days does not grow it).
"""

from __future__ import annotations

import os
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Final, Protocol, TypeVar, overload, runtime_checkable

import numpy as np
import numpy.typing as npt

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import COMMAND_BUFFERS
from sevemu.abi.snp import SNP_COMMAND_BUFFERS
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.errors import AddressError, FirmwareError, LayoutError
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.identity import PlatformIdentity, boot_identity
from sevemu.firmware.nvstore import SealedNv
from sevemu.firmware.ring import RingBuffer
from sevemu.firmware.tmr import Tmr
from sevemu.hw import columns
from sevemu.hw.psp import MailboxPort, PspPorts

__all__ = [
    "ANY_GUEST",
    "ANY_STATE",
    "LOG_SIZE",
    "READY",
    "BatchRun",
    "CommandLog",
    "CommandTable",
    "Entry",
    "Firmware",
    "GuestCommandBuffer",
    "QueuedBuffers",
    "Reply",
]

ANY_STATE: Final = frozenset(PlatformState)
READY: Final = frozenset({PlatformState.INIT, PlatformState.WORKING})
ANY_GUEST: Final = frozenset(GuestState) - {GuestState.UNINIT}
"""Every state a guest context can be in (a context is never UNINIT)."""

LOG_SIZE: Final = 4096
"""Entries :attr:`Firmware.log` keeps (the newest)."""

B = TypeVar("B", bound=Struct)

_NAMES: Final = {int(c): c.name for c in CommandId}
"""The log's name of each command id (one lookup per command, not an enum construction)."""


@runtime_checkable
class GuestCommandBuffer(Protocol):
    """A command buffer that names one guest by its ``handle``."""

    @property
    def handle(self) -> int: ...


Run = Callable[["Firmware", "Struct | None"], "Struct | None"]
"""An entry's handler with the buffer type erased: the dispatcher's side of the seam."""
class QueuedBuffers:
    """The command buffers of a queued run of one command, as its batch runner gets them: their SPAs
    (each buffer in DRAM and clear of the TMR and the ring buffer's pages), their bytes back to back
    (:attr:`raw`, ``layout.SIZE`` each), and the prefix that decodes (:meth:`decoded`, on first use)."""

    __slots__ = ("_decoded", "_spas", "column", "layout", "raw")

    def __init__(self, layout: type[Struct], spas: list[int] | None, raw: bytes,
                 column: npt.NDArray[np.uint64] | None = None) -> None:
        if spas is None and column is None:
            raise ValueError("queued buffers need their SPAs, as a list or a column")
        self.layout = layout
        self._spas = spas
        self.raw = raw
        self.column = column
        """The same SPAs as a u64 column when the dispatcher had them so (else None)."""
        self._decoded: list[tuple[int, Struct]] | None = None

    @property
    def spas(self) -> list[int]:
        """The buffers' SPAs (a list made from :attr:`column` on first use when given only that)."""
        if self._spas is None:
            assert self.column is not None
            self._spas = self.column.tolist()
        return self._spas

    def __len__(self) -> int:
        return len(self._spas) if self._spas is not None else len(self.column)  # type: ignore[arg-type]

    def decoded(self) -> list[tuple[int, Struct]]:
        """(SPA, decoded buffer) of each command up to the first whose buffer does not decode."""
        if self._decoded is None:
            size = self.layout.SIZE
            out: list[tuple[int, Struct]] = []
            for i, spa in enumerate(self.spas):
                try:
                    out.append((spa, self.layout.decode(self.raw[i * size : (i + 1) * size])))
                except LayoutError:
                    break
            self._decoded = out
        return self._decoded


BatchRun = Callable[["Firmware", QueuedBuffers], int]
"""A command's batch runner (ring-buffer mode, :meth:`Firmware.handle_batch`): given the buffers of
queued commands, runs the longest prefix whose commands all succeed -- none past the first buffer
that does not decode --, with the same effects as running them one by one, and returns its length
(0 lets the dispatcher run the first command on its own)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One registered command (module docstring)."""

    command: CommandId
    api: str
    buffer: type[Struct] | None
    """The layout the dispatcher reads; ``None`` for a command without a buffer."""
    platform_states: frozenset[PlatformState]
    guest_states: frozenset[GuestState] | None
    """Allowed guest states of a command on one guest (INVALID_GUEST_STATE otherwise); ``None`` for
    a command that names no existing guest."""
    decode: bool
    """False for an output-only buffer (PLATFORM_STATUS): its input bytes are ignored."""
    run: Run
    malformed: Status = Status.INVALID_PARAM
    """The answer to a buffer that does not decode (non-zero reserved bytes): INVALID_PARAM (model
    choice) unless AMD's firmware says otherwise for the command (INIT: INVALID_CONFIG)."""
    batch: BatchRun | None = None
    """Runs a queued run of this command at once (:data:`BatchRun`); None: one by one."""


class Reply(FirmwareError):
    """Raised by a handler to refuse with ``status`` *and* write ``buffer`` back (length queries)."""

    def __init__(self, status: Status, buffer: Struct, detail: str = "") -> None:
        super().__init__(status, detail)
        self.buffer = buffer


def _expect(buffer: type[B], buf: Struct | None) -> B:
    if not isinstance(buf, buffer):
        raise TypeError(f"dispatcher passed {type(buf).__name__}, the handler reads {buffer.__name__}")
    return buf


class CommandTable:
    """The handlers of one command API (``SEV``, later ``SNP``), registered by decorators."""

    def __init__(self, api: str) -> None:
        self.api = api
        self._entries: dict[CommandId, Entry] = {}

    @property
    def entries(self) -> Mapping[CommandId, Entry]:
        return dict(self._entries)

    def _add(self, cid: CommandId, buffer: type[Struct] | None, states: frozenset[PlatformState],
             guest_states: frozenset[GuestState] | None, run: Run, decode: bool = True,
             malformed: Status = Status.INVALID_PARAM) -> None:
        if cid in self._entries:
            raise ValueError(f"{self.api}: {cid.name} is registered twice")
        want = COMMAND_BUFFERS.get(cid, SNP_COMMAND_BUFFERS.get(cid))
        if want is not buffer:
            raise TypeError(f"{self.api}: the {cid.name} handler reads {getattr(buffer, '__name__', None)}, "
                            f"the command's buffer is {getattr(want, '__name__', None)}")
        if not states <= ANY_STATE or not states:
            raise ValueError(f"{self.api}: {cid.name} needs a non-empty set of platform states")
        self._entries[cid] = Entry(cid, self.api, buffer, states, guest_states, decode, run, malformed)

    def batch(self, cid: CommandId) -> Callable[[BatchRun], BatchRun]:
        """Give the registered command ``cid`` a batch runner (:data:`BatchRun`)."""

        def wrap(fn: BatchRun) -> BatchRun:
            entry = self._entries.get(cid)
            if entry is None:
                raise ValueError(f"{self.api}: {cid.name} must be registered before its batch runner")
            self._entries[cid] = replace(entry, batch=fn)
            return fn

        return wrap

    def bare(self, cid: CommandId, states: frozenset[PlatformState]
             ) -> Callable[[Callable[[Firmware], None]], Callable[[Firmware], None]]:
        """Register a command without a buffer: ``fn(fw)``."""

        def wrap(fn: Callable[[Firmware], None]) -> Callable[[Firmware], None]:
            def run(fw: Firmware, _: Struct | None) -> None:
                fn(fw)

            self._add(cid, None, states, None, run)
            return fn

        return wrap

    def output(self, cid: CommandId, buffer: type[B], states: frozenset[PlatformState]
               ) -> Callable[[Callable[[Firmware], B]], Callable[[Firmware], B]]:
        """Register a command whose buffer is output only: ``fn(fw) -> buffer``."""

        def wrap(fn: Callable[[Firmware], B]) -> Callable[[Firmware], B]:
            def run(fw: Firmware, _: Struct | None) -> B:
                return fn(fw)

            self._add(cid, buffer, states, None, run, decode=False)
            return fn

        return wrap

    def platform(self, cid: CommandId, buffer: type[B], states: frozenset[PlatformState], *,
                 malformed: Status = Status.INVALID_PARAM
                 ) -> Callable[[Callable[[Firmware, B], B | None]], Callable[[Firmware, B], B | None]]:
        """Register a command that reads ``buffer`` and names no existing guest: ``fn(fw, cmd)``;
        ``malformed``: the status for a buffer with non-zero reserved bytes."""

        def wrap(fn: Callable[[Firmware, B], B | None]) -> Callable[[Firmware, B], B | None]:
            def run(fw: Firmware, buf: Struct | None) -> B | None:
                return fn(fw, buf if type(buf) is buffer else _expect(buffer, buf))

            self._add(cid, buffer, states, None, run, malformed=malformed)
            return fn

        return wrap

    def guest(
        self,
        cid: CommandId,
        buffer: type[B],
        states: frozenset[PlatformState],
        guest_states: frozenset[GuestState],
        *,
        before_guest: Sequence[Callable[[Firmware, B], None]] = (),
        before_state: Sequence[Callable[[Firmware, B, GuestContext], None]] = (),
    ) -> Callable[[Callable[[Firmware, B, GuestContext], B | None]], Callable[[Firmware, B, GuestContext], B | None]]:
        """Register a command on the guest ``cmd.handle``: ``fn(fw, cmd, guest)``.

        The dispatcher runs ``before_guest`` checks, looks the guest up (INVALID_GUEST), runs
        ``before_state`` checks, then requires ``guest.state in guest_states`` (INVALID_GUEST_STATE).
        """
        if not (is_dataclass(buffer) and "handle" in {f.name for f in fields(buffer)}):
            raise TypeError(f"{self.api}: {cid.name}'s buffer {buffer.__name__} names no guest handle")
        if not guest_states or not guest_states <= ANY_GUEST:
            raise ValueError(f"{self.api}: {cid.name} needs a non-empty set of guest states")
        pre = tuple(before_guest)
        mid = tuple(before_state)

        def wrap(fn: Callable[[Firmware, B, GuestContext], B | None]) -> Callable[[Firmware, B, GuestContext], B | None]:
            def run(fw: Firmware, buf: Struct | None) -> B | None:
                cmd = buf if type(buf) is buffer else _expect(buffer, buf)
                for check in pre:
                    check(fw, cmd)
                handle = getattr(cmd, "handle", None)  # (an isinstance check of the Protocol costs ~20 us)
                if not isinstance(handle, int):
                    raise TypeError(f"{type(cmd).__name__} has no handle")
                g = fw.guest(handle)
                for later in mid:
                    later(fw, cmd, g)
                if g.state not in guest_states:
                    raise FirmwareError(Status.INVALID_GUEST_STATE, f"{cid.name}: guest {g.handle} is "
                                        f"{g.state.name}, allowed: {', '.join(sorted(s.name for s in guest_states))}")
                return fn(fw, cmd, g)

            self._add(cid, buffer, states, guest_states, run)
            return fn

        return wrap


class CommandLog(Sequence[tuple[str, int]]):
    """The newest :data:`LOG_SIZE` (command name, status) pairs, oldest first (a ring buffer).

    Indexing and slicing read like a list; it compares equal to a list of the same pairs.
    """

    def __init__(self, size: int = LOG_SIZE) -> None:
        self._ring: deque[tuple[str, int]] = deque(maxlen=size)

    @property
    def size(self) -> int:
        maxlen = self._ring.maxlen
        return LOG_SIZE if maxlen is None else maxlen

    def append(self, entry: tuple[str, int]) -> None:
        self._ring.append(entry)

    def extend(self, entries: Iterable[tuple[str, int]]) -> None:
        self._ring.extend(entries)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, int]]: ...

    def __getitem__(self, index: int | slice) -> tuple[str, int] | list[tuple[str, int]]:
        if isinstance(index, slice):
            return list(self._ring)[index]
        return self._ring[index]

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self._ring)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CommandLog):
            return list(self._ring) == list(other._ring)
        if isinstance(other, list):
            return list(self._ring) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"CommandLog({list(self._ring)!r})"


class Firmware:
    """The AMD-SP firmware: one dispatcher and one platform over the command ``apis`` it runs."""

    def __init__(self, ports: PspPorts, platform_dir: str | os.PathLike[str] | None = None, *,
                 apis: Iterable[CommandTable]) -> None:
        table: dict[int, Entry] = {}
        for api in apis:
            for cid, entry in api.entries.items():
                if int(cid) in table:
                    raise ValueError(f"{cid.name} is registered by both {table[int(cid)].api} and {api.api}")
                table[int(cid)] = entry
        self._table = table
        self.ports = ports
        self.profile = ports.profile
        self.state = PlatformState.UNINIT
        self.config_es = False
        self.tmr: Tmr | None = None
        """The SEV-ES Trusted Memory Region INIT reserved (CONFIG.ES), with its VMSA checksum pool
        (:mod:`sevemu.firmware.tmr`); None without SEV-ES."""
        self.guests: dict[int, GuestContext] = {}
        self.next_handle = 1
        self.asid_owner: dict[int, int] = {}  # ASID -> handle of the guest activated on it
        self.asid_dirty: dict[int, int] = {}
        """ASID -> WBINVD epoch when it became dirty (DEACTIVATE, or every ASID at INIT): its reuse
        needs a WBINVD after that epoch and then a DF_FLUSH (:mod:`sevemu.firmware.sev.guest`)."""
        self.ring: RingBuffer | None = None
        """Ring-buffer mode (RING_BUFFER, :mod:`sevemu.firmware.ring`); None: mailbox mode."""
        self.internal_errors: list[str] = []
        self.log = CommandLog()
        self.notices: list[str] = []
        """Things the platform noticed at boot that its user should hear about (e.g. an emptied NV
        store that reset the ownership); the CLI prints them."""
        # Non-volatile state (sevemu.firmware.nvstore): the platform identity, loaded at boot from the
        # platform directory the factory provisioned; without one the part is unprovisioned and the
        # commands that need the identity answer HWERROR_PLATFORM.
        self.nv: SealedNv | None = None
        self._identity: PlatformIdentity | None = None
        self.nv_area: int | None = None  # SPA of INIT_EX's host NV buffer; None: the SPI store
        if platform_dir is not None:
            p = self.profile
            boot = boot_identity(platform_dir, generation=p.name, api_major=p.api_major,
                                 api_minor=p.api_minor, rng=ports.trng)
            self.nv, self._identity = boot.nv, boot.identity
            self.notices.extend(boot.notices)

    @property
    def commands(self) -> Mapping[int, Entry]:
        """The registered commands by id (the allowed-state tables are their ``platform_states`` and
        ``guest_states``)."""
        return dict(self._table)

    # ---- mailbox entry point -------------------------------------------------------------------
    def handle(self, command_id: int, buffer_paddr: int) -> int:
        status = int(self._dispatch(command_id, buffer_paddr))
        name = _NAMES.get(command_id)
        if name is None:
            name = f"0x{command_id:x}"
        self.log.append((name, status))
        return status

    def handle_batch(self, command_id: int,
                     buffer_paddrs: Sequence[int] | npt.NDArray[np.uint64]) -> int:
        """Ring-buffer mode: run as many of these queued commands (one id, their buffers' addresses:
        a sequence, or a u64 column as the queue entries hold them) as the command's batch runner
        takes at once; returns how many ran, all successfully (0: the caller runs the first one
        through :meth:`handle`).  The dispatcher's checks come first for each buffer (state,
        address, decoding); the batch ends before the first that fails them."""
        entry = self._table.get(command_id)
        if entry is None or entry.batch is None or entry.buffer is None or self.state not in entry.platform_states:
            return 0
        dma = self.ports.dma
        size = entry.buffer.SIZE
        keep = ~dma.cbit_mask
        if isinstance(buffer_paddrs, np.ndarray):  # (dma.strip of each, as a column)
            column = buffer_paddrs.astype(np.uint64) & np.uint64(keep & 0xFFFF_FFFF_FFFF_FFFF)
            n = len(column)
            if not n:
                return 0
            shape = columns.stats(column, (size,))[0]  # (where they lie, whether evenly spaced: one pass)
            lo, hi, even = shape.lo, shape.hi + size, shape.stride
            span = self._span(lo, hi, n * size)
            if span and even >= size and not self._fenced(lo, hi):  # evenly spaced slots: every buffer read, in one step
                return self._run_batch(entry.command, entry.batch, QueuedBuffers(
                    entry.buffer, None, columns.strided_rows(span, 0, even, n, size), column))
            spas = column.tolist()
        else:
            spas = [paddr & keep for paddr in buffer_paddrs]  # (dma.strip of each)
            if not spas:
                return 0
            lo, hi = min(spas), max(spas) + size
            span = self._span(lo, hi, len(spas) * size)
        fenced = self._fenced(lo, hi)  # else no buffer touches them
        raws: list[bytes] = []
        for spa in spas:
            if fenced and ((self.tmr is not None and self.tmr.overlaps(spa, size)) or
                           (self.ring is not None and self.ring.overlaps(spa, size))):
                break
            try:
                raws.append(span[spa - lo : spa - lo + size] if span else dma.read(spa, size))
            except AddressError:
                break
        if not raws:
            return 0
        return self._run_batch(entry.command, entry.batch, QueuedBuffers(entry.buffer, spas[: len(raws)], b"".join(raws)))

    def _span(self, lo: int, hi: int, total: int) -> bytes:
        """The bytes of ``[lo, hi)`` when queued buffers of ``total`` bytes lie packed together in
        it (one read for all of them), else (or outside DRAM) b""."""
        if hi - lo > 4 * total:
            return b""
        try:
            return self.ports.dma.read(lo, hi - lo)
        except AddressError:
            return b""

    def _fenced(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` touches the TMR or the ring buffer's pages."""
        return (self.tmr is not None and self.tmr.overlaps(lo, hi - lo)) or \
            (self.ring is not None and self.ring.overlaps(lo, hi - lo))

    def _run_batch(self, command: CommandId, batch: BatchRun, items: QueuedBuffers) -> int:
        """``batch`` on ``items``; how many commands it ran, logged as successes."""
        try:
            done = batch(self, items)
        except Exception:  # noqa: BLE001 - a firmware bug: never raise out of the mailbox
            self.internal_errors.append(traceback.format_exc())
            return 0
        self.log.extend([(command.name, int(Status.SUCCESS))] * done)
        return done

    def doorbell(self) -> None:
        """A CMDRESP write in ring-buffer mode (the PSP device calls it only while the mode is on)."""
        if self.ring is not None:
            self.ring.doorbell(self)

    @property
    def mailbox(self) -> MailboxPort:
        """The PSP's side of the mailbox registers (ring-buffer mode)."""
        port = self.ports.mailbox
        if port is None:
            raise FirmwareError(Status.HWERROR_PLATFORM, "this PSP gave the firmware no mailbox port")
        return port

    def _dispatch(self, command_id: int, buffer_paddr: int) -> Status:
        entry = self._table.get(command_id)
        if entry is None:
            return Status.INVALID_COMMAND
        if self.state not in entry.platform_states:
            return Status.INVALID_PLATFORM_STATE
        dma = self.ports.dma
        spa = 0
        buf: Struct | None = None
        if entry.buffer is not None:
            spa = buffer_paddr & ~dma.cbit_mask  # (dma.strip)
            if self.tmr is not None and self.tmr.overlaps(spa, entry.buffer.SIZE):
                return Status.INVALID_ADDRESS  # no x86 range inside the TMR (sevemu.firmware.tmr)
            if self.ring is not None and self.ring.overlaps(spa, entry.buffer.SIZE):
                return Status.INVALID_ADDRESS  # nor inside the ring buffer's pages (sevemu.firmware.ring)
            if dma.guest_owned(spa, entry.buffer.SIZE):
                return Status.INVALID_PAGE_STATE  # an SNP guest's page is never a command buffer
            try:
                raw = dma.read(spa, entry.buffer.SIZE)
            except AddressError:
                return Status.INVALID_ADDRESS
            if entry.decode:
                try:
                    buf = entry.buffer.decode(raw)
                except LayoutError:
                    return entry.malformed
        try:
            out = entry.run(self, buf)
        except Reply as r:
            dma.write(spa, r.buffer.encode())
            return Status(r.status)
        except FirmwareError as e:
            return Status(e.status)
        except Exception:  # noqa: BLE001 - a firmware bug: never raise out of the mailbox
            self.internal_errors.append(traceback.format_exc())
            return Status.HWERROR_PLATFORM
        if out is not None:
            dma.write(spa, out.encode())
        return Status.SUCCESS

    # ---- what handlers share -------------------------------------------------------------------
    @property
    def identity(self) -> PlatformIdentity:
        """The platform's keys and certificates; HWERROR_PLATFORM on an unprovisioned part."""
        if self._identity is None:
            raise FirmwareError(Status.HWERROR_PLATFORM, "unprovisioned part: no platform identity")
        return self._identity

    @identity.setter
    def identity(self, value: PlatformIdentity) -> None:
        self._identity = value

    def close(self) -> None:
        """Close the NV store (the firmware answers no more commands that touch it)."""
        if self.nv is not None:
            self.nv.close()

    def guest(self, handle: int) -> GuestContext:
        """The context of ``handle``; INVALID_GUEST when there is none."""
        g = self.guests.get(handle)
        if g is None:
            raise FirmwareError(Status.INVALID_GUEST, f"no guest with handle {handle}")
        return g

    @property
    def api_version(self) -> tuple[int, int, int]:
        return self.profile.api_major, self.profile.api_minor, self.profile.build

    def granule(self) -> int:
        """Smallest unit of guest memory the firmware encrypts in place: the SEV API's 16 bytes.

        Every mode encrypts each 16-byte block independently (XTS too: block j of a 64-byte data
        unit has its own tweak), so partial cache lines are read-modify-written
        (:func:`sevemu.firmware.guestmem.write_guest`) and 16 bytes work on every generation.
        """
        return 16

    def new_key(self) -> bytes:
        """A fresh VEK from the TRNG, sized for the memory controller's mode."""
        return self.ports.trng(self.profile.mem_mode.key_size)
