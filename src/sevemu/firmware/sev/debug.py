"""DBG_DECRYPT (0x60) and DBG_ENCRYPT (0x61): the debug window into a guest (SEV API 55766:
DBG_DECRYPT, DBG_ENCRYPT, guest policy NODBG).

DBG_DECRYPT reads ``len`` bytes of guest memory at ``src_paddr``, decrypts them with the guest's
key and writes the plaintext to host memory at ``dst_paddr``; DBG_ENCRYPT reads host plaintext at
``src_paddr`` and writes it into guest memory at ``dst_paddr``, encrypted with the guest's key.
Both only for a guest whose policy has NODBG = 0.

Checks, in the order of AMD's firmware (amd/AMD-ASPFW ``sev_mcmd.c: sev_mcmd_dbg_decrypt``,
``debug_crypt_common``):

* ``src_paddr`` or ``dst_paddr`` (C-bit stripped) not 16-byte aligned: INVALID_ADDRESS;
* ``len`` not a multiple of 16: INVALID_LENGTH (``len`` = 0 too: model choice -- AF lets it through
  as a no-op);
* unknown handle: INVALID_GUEST;
* policy NODBG: POLICY_FAILURE;
* guest not activated (no key in the memory controller): INACTIVE;
* either range outside DRAM: INVALID_ADDRESS.

No guest state is required (AF checks none; the command is registered with every guest state): a
debuggable guest can be inspected from LUPDATE to SENT, as long as it holds an ASID.

SEV-ES guests: AF treats their VMSA pages like any other guest memory -- a guest whose owner allowed
debugging (NODBG = 0) has its registers readable and writable through DBG_*; NODBG refuses both.
A DBG_ENCRYPT into a VMSA does not update the page's TMR checksum (:mod:`sevemu.firmware.tmr`), so
SEND_UPDATE_VMSA (and the CPU at VMRUN) refuse the altered page.  Neither range may touch the TMR.

What the firmware sees is DRAM.  The guest's own dirty cache lines are plaintext inside the SoC,
tagged with its ASID; the PSP's encrypted accesses bypass the caches.  So DBG_DECRYPT returns the
last data *written back*, and a DBG_ENCRYPT can be undone by the later write-back of a stale guest
line (or hidden behind a clean one).  The hypervisor must write back and invalidate the guest's
lines first -- WBINVD, or VMPAGE_FLUSH per page -- as KVM does (``sev_dbg_crypt`` flushes before
the command).  On the host side the firmware is coherent: it reads host plaintext through the
snooping unencrypted path, writes DBG_DECRYPT's output through it (invalidating stale host lines),
and before DBG_ENCRYPT writes the guest range it evicts the host's cached lines of that range
(AF's CSF-698 dummy read), as for LAUNCH_SECRET.  Partial 64-byte lines are read-modify-written
(:func:`~sevemu.firmware.guestmem.write_guest`).
"""

from __future__ import annotations

from typing import Final

from sevemu._util.units import is_aligned
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import DbgCmd
from sevemu.abi.status import Status
from sevemu.errors import FirmwareError
from sevemu.firmware.checks import check_range, need_active
from sevemu.firmware.core import ANY_GUEST, READY, Firmware
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.guestmem import evict_host_lines, read_guest, write_guest
from sevemu.firmware.sev.api import SEV_API

__all__ = ["DBG_GRANULE", "dbg_decrypt", "dbg_encrypt"]

DBG_GRANULE: Final = 16


def _shape(fw: Firmware, cmd: DbgCmd) -> None:
    """Alignment and length, which AF checks before the handle."""
    dma = fw.ports.dma
    src, _ = dma.strip(cmd.src_paddr)
    dst, _ = dma.strip(cmd.dst_paddr)
    if not (is_aligned(src, DBG_GRANULE) and is_aligned(dst, DBG_GRANULE)):
        raise FirmwareError(Status.INVALID_ADDRESS, f"src {src:#x} / dst {dst:#x} not 16-byte aligned")
    if cmd.len == 0 or cmd.len % DBG_GRANULE:
        raise FirmwareError(Status.INVALID_LENGTH, f"len {cmd.len:#x} is not a non-zero multiple of 16")


def _checks(fw: Firmware, cmd: DbgCmd, g: GuestContext) -> tuple[int, int]:
    if g.nodbg:
        raise FirmwareError(Status.POLICY_FAILURE, f"guest {g.handle} policy forbids debugging (NODBG)")
    need_active(g)
    src, _ = fw.ports.dma.strip(cmd.src_paddr)
    dst, _ = fw.ports.dma.strip(cmd.dst_paddr)
    check_range(fw, src, cmd.len)
    check_range(fw, dst, cmd.len)
    return src, dst


@SEV_API.guest(CommandId.DBG_DECRYPT, DbgCmd, READY, ANY_GUEST, before_guest=(_shape,))
def dbg_decrypt(fw: Firmware, cmd: DbgCmd, g: GuestContext) -> None:
    src, dst = _checks(fw, cmd, g)
    fw.ports.dma.write(dst, read_guest(fw, g, src, cmd.len))


@SEV_API.guest(CommandId.DBG_ENCRYPT, DbgCmd, READY, ANY_GUEST, before_guest=(_shape,))
def dbg_encrypt(fw: Firmware, cmd: DbgCmd, g: GuestContext) -> None:
    src, dst = _checks(fw, cmd, g)
    plaintext = fw.ports.dma.read(src, cmd.len)
    evict_host_lines(fw, dst, cmd.len)
    write_guest(fw, g, dst, plaintext)
