"""SEV-ES: LAUNCH_UPDATE_VMSA, and the VMSA set-up and check SEND/RECEIVE_UPDATE_VMSA share
(SEV API 55766, LAUNCH_UPDATE_VMSA, SEND_UPDATE_VMSA, RECEIVE_UPDATE_VMSA; APM2 15.35; AMD's
firmware source AMD-ASPFW ``sev_mcmd.c``: ``sev_mcmd_launch_update_vmsa``, ``launch_update_common``;
``sev_es.c``: ``sev_es_setup_vmsa``, ``sev_es_validate_vmsa``; "AF" below).

An SEV-ES guest's register state lives in a VMSA page encrypted with its key.  LAUNCH_UPDATE_VMSA
(buffer: the LAUNCH_UPDATE_DATA layout) takes one vCPU's page from the host.  Checks in AF's order:

=================================================================  =====================
``len`` is not 4096 (checked before the handle)                     INVALID_LENGTH
unknown handle                                                      INVALID_GUEST
guest not in LUPDATE                                                INVALID_GUEST_STATE
guest not SEV-ES (its policy has no ES)                             UNSUPPORTED
guest not activated                                                 INACTIVE
``paddr`` (C-bit stripped) not 16-byte aligned                      INVALID_ADDRESS
the page outside DRAM or overlapping the TMR                        INVALID_ADDRESS
no free checksum block in the TMR                                   RESOURCE_LIMIT
=================================================================  =====================

Then the firmware reads the 4096 plaintext bytes through its unencrypted view, extends the launch
digest with them *unaltered* (the guest owner's tools hash the page the VMM built; virtee
``sev-snp-measure``), sets the page up -- a checksum block from the TMR, its address at offset
0x388, the checksum stored in the block (:mod:`sevemu.firmware.tmr`) -- and writes it back in place
encrypted with the guest's key.  The guest context records (SPA, checksum block) of every VMSA
(``GuestContext.vmsas``): VMRUN checks the page against its checksum, SEND_UPDATE_VMSA checks it
before it leaves, DECOMMISSION frees the blocks.  As in AF the address need only be 16-byte aligned
(the VMCB's VMSA pointer is a page address; that is VMRUN's check), and the command may be issued
any number of times, each page getting its own block.

AF extends the digest before it asks the pool for a block, so an exhausted pool leaves the digest
extended; the model asks first, so a refused command changes nothing (model choice).

SEND_UPDATE_VMSA (AF ``sev_es_validate_vmsa``, every failure answered INVALID_PARAM): the guest must
have VMSAs set up, the page must name one of the guest's checksum blocks and match its checksum.
RECEIVE_UPDATE_VMSA sets the received page up like LAUNCH_UPDATE_VMSA (a page shorter than 4096
bytes: INVALID_LENGTH; no block: RESOURCE_LIMIT), after the packet's MAC verified.
"""

from __future__ import annotations

from typing import Final

from sevemu._util.units import is_aligned
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import LaunchUpdateDataCmd
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.errors import FirmwareError
from sevemu.firmware.checks import check_range, need_active
from sevemu.firmware.core import READY, Firmware
from sevemu.firmware.gctx import GuestContext
from sevemu.firmware.guestmem import write_guest
from sevemu.firmware.sev.api import SEV_API
from sevemu.firmware.tmr import CRC_BLOCK, Tmr, crc64_vmsa, seal_vmsa, vmsa_crc_paddr

__all__ = ["VMSA_ALIGN", "check_vmsa", "need_es", "set_up_vmsa", "vmsa_room"]

VMSA_ALIGN: Final = 16
"""LAUNCH_UPDATE_VMSA's address alignment (AF ``IS_ALIGNED_TO_16_BYTES``)."""


def need_es(g: GuestContext) -> None:
    """UNSUPPORTED for a guest whose policy is not SEV-ES: it has no VMSA (AF ``sev_es_guest_enabled``)."""
    if not g.es:
        raise FirmwareError(Status.UNSUPPORTED, f"guest {g.handle} is not an SEV-ES guest: it has no VMSA")


def _pool(fw: Firmware) -> Tmr:
    """The TMR with a free checksum block; RESOURCE_LIMIT otherwise (AF ``pool_vcpu_alloc`` fails)."""
    tmr = fw.tmr
    if tmr is None or not tmr.available():
        raise FirmwareError(Status.RESOURCE_LIMIT, "no free VMSA checksum block in the SEV-ES TMR")
    return tmr


def vmsa_room(fw: Firmware, plaintext: bytes) -> Tmr:
    """What :func:`set_up_vmsa` needs: a whole page (INVALID_LENGTH for a shorter one, AF
    ``sev_es_setup_vmsa``) and a free checksum block (RESOURCE_LIMIT)."""
    if len(plaintext) < VMSA_PAGE_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"a VMSA is {VMSA_PAGE_SIZE} bytes, got {len(plaintext)}")
    return _pool(fw)


def set_up_vmsa(fw: Firmware, g: GuestContext, spa: int, plaintext: bytes) -> None:
    """Give the VMSA page at ``spa`` a checksum block and write it encrypted with ``g``'s key
    (:func:`vmsa_room` checked first: nothing changes on a refusal)."""
    tmr = vmsa_room(fw, plaintext)
    index = tmr.alloc()
    assert index is not None  # _pool checked
    crc_paddr = tmr.crc_paddr(index)
    page, crc = seal_vmsa(plaintext[:VMSA_PAGE_SIZE], crc_paddr)
    fw.ports.dma.write(crc_paddr, crc.to_bytes(CRC_BLOCK, "little"))
    write_guest(fw, g, spa, page)
    g.vmsas.append((spa, index))


def check_vmsa(fw: Firmware, g: GuestContext, plaintext: bytes) -> None:
    """A VMSA about to leave (SEND_UPDATE_VMSA) is one of ``g``'s and matches its checksum;
    INVALID_PARAM otherwise (AF maps every ``sev_es_validate_vmsa`` failure to it)."""
    tmr = fw.tmr
    if tmr is None or not g.vmsas:
        raise FirmwareError(Status.INVALID_PARAM, f"guest {g.handle} has no VMSA set up")
    if len(plaintext) < VMSA_PAGE_SIZE:
        raise FirmwareError(Status.INVALID_PARAM, f"a VMSA is {VMSA_PAGE_SIZE} bytes, got {len(plaintext)}")
    crc_paddr = vmsa_crc_paddr(plaintext)
    index = tmr.index_of(crc_paddr)
    if index is None or index not in {block for _, block in g.vmsas}:
        raise FirmwareError(Status.INVALID_PARAM, f"the page names checksum block {crc_paddr:#x}, not one "
                                                  f"of guest {g.handle}'s")
    stored = int.from_bytes(fw.ports.dma.read(crc_paddr, CRC_BLOCK), "little")
    if stored != crc64_vmsa(plaintext):
        raise FirmwareError(Status.INVALID_PARAM, "the VMSA does not match its checksum")


def _vmsa_length(fw: Firmware, cmd: LaunchUpdateDataCmd) -> None:
    """AF checks the length before anything else."""
    if cmd.len != VMSA_PAGE_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"LAUNCH_UPDATE_VMSA len {cmd.len:#x}, expected 0x1000")


@SEV_API.guest(CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd, READY, frozenset({GuestState.LUPDATE}),
               before_guest=(_vmsa_length,))
def launch_update_vmsa(fw: Firmware, cmd: LaunchUpdateDataCmd, g: GuestContext) -> None:
    need_es(g)
    need_active(g)
    spa, _ = fw.ports.dma.strip(cmd.paddr)
    if not is_aligned(spa, VMSA_ALIGN):
        raise FirmwareError(Status.INVALID_ADDRESS, f"VMSA address {spa:#x} is not 16-byte aligned")
    check_range(fw, spa, VMSA_PAGE_SIZE)
    _pool(fw)  # before the digest moves (module docstring)
    plaintext = fw.ports.dma.read(spa, VMSA_PAGE_SIZE)
    g.ld.update(plaintext)
    set_up_vmsa(fw, g, spa, plaintext)
