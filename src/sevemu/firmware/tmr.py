"""The SEV-ES Trusted Memory Region (TMR) and the VMSA checksums the firmware keeps in it.

Sources: SEV API 55766, INIT ("If CONFIG.ES = 1 ... the TMR ... will be used for SEV-ES related
operations"), LAUNCH_UPDATE_VMSA; APM2 15.35 (VMRUN checks the integrity of an SEV-ES guest's saved
state); AMD's firmware source, AMD-ASPFW ``sev_es.c`` (``sev_es_reserve_trusted_region``,
``sev_es_init_trusted_region``, ``sev_es_setup_vmsa``, ``sev_es_validate_vmsa``), ``pool_u32.c``
(the pool of checksum blocks), ``crc.c`` (``crc64_vmsa``), ``x86_copy.c``
(``validate_address_range``); "AF" below.

INIT with CONFIG.ES reserves the region the host gives it: 1 MiB, 1 MiB aligned (while SNP is
initialised 2 MiB, 2 MiB aligned).  Its first half holds the pool's bookkeeping, its second half the
checksum blocks, 8 bytes each.  The checksum itself (:func:`crc64_vmsa`) lives in
:mod:`sevemu.crypto.vmsacrc`, which the CPU model uses too.  The pool is made usable only by the next DF_FLUSH ("We need to force
a WBINVD and DF_FLUSH before it is safe to store data in the TMR").  From INIT on, the firmware
refuses every x86 address range that overlaps the TMR (INVALID_ADDRESS), so no command can make the
PSP write a checksum for the host.

Each VMSA page the firmware sets up (LAUNCH_UPDATE_VMSA, RECEIVE_UPDATE_VMSA) gets a checksum block:
the firmware writes zero at VMSA offset 0x380 and the block's system physical address at 0x388
(bytes the VMSA layout leaves reserved), computes :func:`crc64_vmsa` over the first 0xFC0 bytes of
the page so altered, stores it in the block and then encrypts the page with the guest's key.  The
CPU checks the checksum at VMRUN; SEND_UPDATE_VMSA checks it before a VMSA leaves the platform.
Blocks come from a FIFO free list (AF ``pool_vcpu_alloc``: the lowest indices first, freed blocks
at the tail, one block always left as the list's tail); DECOMMISSION gives a guest's blocks back;
SHUTDOWN zeroes the checksum blocks and releases the region.

Model choices: the pool's free list lives in the firmware's own memory (AF keeps it in the first
half of the TMR, where nothing outside the PSP reads it); the data fabric's protection of the TMR
against x86 accesses is the hardware's and not modelled here -- the firmware's side, refusing x86
ranges that overlap it, is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from sevemu._util.units import MiB, is_aligned
from sevemu.crypto.vmsacrc import (
    VMSA_CRC_PADDR,
    VMSA_CRC_SIZE,
    VMSA_CRC_ZEROS,
    crc32c,
    crc64_vmsa,
    seal_vmsa,
    vmsa_crc_paddr,
)

__all__ = [
    "CRC_BLOCK",
    "TMR_SIZE",
    "VMSA_CRC_PADDR",
    "VMSA_CRC_SIZE",
    "VMSA_CRC_ZEROS",
    "Tmr",
    "crc32c",
    "crc64_vmsa",
    "seal_vmsa",
    "vmsa_crc_paddr",
]

TMR_SIZE: Final = MiB
"""The SEV-ES TMR without SNP: 1 MiB, 1 MiB aligned (AF ``SEV_ES_TMR_SIZE``)."""
CRC_BLOCK: Final = 8
"""One VMSA checksum (AF ``es_vcpu_crc_t``: a CRC64)."""
@dataclass(eq=False)
class Tmr:
    """The TMR INIT reserved, and the checksum pool in its second half (module docstring)."""

    base: int
    size: int = TMR_SIZE
    ready: bool = False
    """The pool is usable (the first DF_FLUSH after INIT; AF ``sev_es_init_trusted_region``)."""
    fresh: int = 0
    """The next index never handed out; indices below it are in use or on :attr:`freed`."""
    freed: list[int] = field(default_factory=list)
    """Indices given back (DECOMMISSION), in the order they join the free list's tail."""

    def __post_init__(self) -> None:
        if not is_aligned(self.base, self.size) or self.size % (2 * CRC_BLOCK):
            raise ValueError(f"TMR {self.base:#x}+{self.size:#x} is not aligned to its size")

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def crc_base(self) -> int:
        """SPA of checksum block 0 (the TMR's second half)."""
        return self.base + self.size // 2

    @property
    def blocks(self) -> int:
        """Checksum blocks in the pool (AF ``nr_blocks``)."""
        return self.size // 2 // CRC_BLOCK

    def overlaps(self, spa: int, length: int) -> bool:
        """Whether ``[spa, spa+length)`` touches the TMR."""
        return spa < self.end and self.base < spa + max(length, 1)

    def crc_paddr(self, index: int) -> int:
        return self.crc_base + index * CRC_BLOCK

    def index_of(self, crc_paddr: int) -> int | None:
        """The block index of a checksum address (None outside the pool or not block-aligned)."""
        off = crc_paddr - self.crc_base
        if not 0 <= off < self.blocks * CRC_BLOCK or off % CRC_BLOCK:
            return None
        return off // CRC_BLOCK

    def available(self) -> int:
        """Blocks :meth:`alloc` can still hand out (the free list keeps one as its tail)."""
        if not self.ready:
            return 0
        return max(self.blocks - self.fresh + len(self.freed) - 1, 0)

    def alloc(self) -> int | None:
        """Take the free list's head; None when the pool is not ready or empty."""
        if not self.available():
            return None
        if self.fresh < self.blocks:
            self.fresh += 1
            return self.fresh - 1
        return self.freed.pop(0)

    def release(self, indices: list[int]) -> None:
        """Give blocks back to the free list's tail (AF ``pool_vcpu_free_list``)."""
        self.freed.extend(indices)
