"""The AMD-SP firmware: command dispatcher and platform state.

:class:`Firmware` is what the PSP mailbox calls (``handle(command, buffer_paddr) -> status``).  For
each command id a handler is registered with :func:`command`, naming the buffer layout it reads
(from :data:`sevemu.abi.sev.COMMAND_BUFFERS`) and the platform states in which it is allowed
(reference 1.2).  The dispatcher:

1. refuses unknown ids (INVALID_COMMAND) and commands not allowed in the current platform state
   (INVALID_PLATFORM_STATE);
2. reads the command buffer from memory through the PSP's DMA view (an address outside DRAM:
   INVALID_ADDRESS; a buffer that does not decode, e.g. non-zero reserved bytes: INVALID_PARAM);
3. runs the handler; a handler raises :class:`~sevemu.errors.FirmwareError` to refuse, and must do
   every check before it changes anything, so a refused command leaves the state untouched;
4. writes the handler's output buffer back (also for the length-query convention: INVALID_LENGTH
   with the required length written into the buffer, reference 1.1).

Nothing raises out of :meth:`Firmware.handle`: an unexpected exception inside a handler is a
firmware bug, answered with HWERROR_PLATFORM and recorded in :attr:`Firmware.internal_errors`
(tests assert it stays empty).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import COMMAND_BUFFERS
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.errors import AddressError, FirmwareError, LayoutError
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.identity import PlatformIdentity, boot_identity
from sevemu.firmware.nvstore import NvStore
from sevemu.hw.psp import PspPorts

__all__ = ["ANY_STATE", "READY", "Firmware", "Reply", "command"]

ANY_STATE = frozenset(PlatformState)
READY = frozenset({PlatformState.INIT, PlatformState.WORKING})

Handler = Callable[["Firmware", Any], "Struct | None"]


@dataclass(frozen=True)
class _Entry:
    fn: Handler
    buffer: type[Struct] | None
    states: frozenset[PlatformState]
    decode: bool  # False for output-only buffers (PLATFORM_STATUS): their input bytes are ignored


_REGISTRY: dict[int, _Entry] = {}


def command(cid: CommandId, states: frozenset[PlatformState],
            output_only: bool = False) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of ``cid``, allowed in the platform ``states``."""

    def wrap(fn: Handler) -> Handler:
        _REGISTRY[int(cid)] = _Entry(fn, COMMAND_BUFFERS.get(cid), states, not output_only)
        return fn

    return wrap


class Reply(FirmwareError):
    """Raised by a handler to refuse with ``status`` *and* write ``buffer`` back (length queries)."""

    def __init__(self, status: Status, buffer: Struct, detail: str = "") -> None:
        super().__init__(status, detail)
        self.buffer = buffer


class Firmware:
    """The SEV firmware running on the PSP."""

    def __init__(self, ports: PspPorts, platform_dir: str | os.PathLike[str] | None = None) -> None:
        # importing the command modules registers their handlers
        from sevemu.firmware.sev import attest, debug, guest, launch, migrate, pki, platform  # noqa: F401

        self.ports = ports
        self.profile = ports.profile
        self.state = PlatformState.UNINIT
        self.config_es = False
        self.tmr: tuple[int, int] | None = None
        self.guests: dict[int, GuestContext] = {}
        self.next_handle = 1
        self.asid_owner: dict[int, int] = {}  # ASID -> handle of the guest activated on it
        self.asid_deactivated: dict[int, int] = {}  # ASID -> WBINVD epoch at DEACTIVATE (needs flush)
        self.internal_errors: list[str] = []
        self.log: list[tuple[str, int]] = []  # (command name, status), newest last
        # Non-volatile state (sevemu.firmware.nvstore): the platform identity, loaded at boot from the
        # platform directory the factory provisioned; without one the part is unprovisioned and the
        # commands that need the identity answer HWERROR_PLATFORM.
        self.nv: NvStore | None = None
        self._identity: PlatformIdentity | None = None
        self.nv_area: int | None = None  # SPA of INIT_EX's host NV buffer; None: the SPI store
        if platform_dir is not None:
            p = self.profile
            self.nv, self._identity = boot_identity(platform_dir, generation=p.name, api_major=p.api_major,
                                                    api_minor=p.api_minor, rng=ports.trng)

    # ---- mailbox entry point -------------------------------------------------------------------
    def handle(self, command_id: int, buffer_paddr: int) -> int:
        status = self._dispatch(command_id, buffer_paddr)
        try:
            name = CommandId(command_id).name
        except ValueError:
            name = f"0x{command_id:x}"
        self.log.append((name, int(status)))
        return int(status)

    def _dispatch(self, command_id: int, buffer_paddr: int) -> Status:
        entry = _REGISTRY.get(command_id)
        if entry is None:
            return Status.INVALID_COMMAND
        if self.state not in entry.states:
            return Status.INVALID_PLATFORM_STATE
        dma = self.ports.dma
        spa = 0
        buf: Struct | None = None
        if entry.buffer is not None:
            spa, _ = dma.strip(buffer_paddr)
            try:
                raw = dma.read(spa, entry.buffer.SIZE)
            except AddressError:
                return Status.INVALID_ADDRESS
            if entry.decode:
                try:
                    buf = entry.buffer.decode(raw)
                except LayoutError:
                    return Status.INVALID_PARAM
        try:
            out = entry.fn(self, buf)
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

    # ---- helpers shared by handlers ------------------------------------------------------------
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
        (:func:`sevemu.firmware.sev.launch.write_guest`) and 16 bytes work on every generation.
        """
        return 16

    def new_key(self) -> bytes:
        """A fresh VEK from the TRNG, sized for the memory controller's mode."""
        return self.ports.trng(self.profile.mem_mode.key_size)
