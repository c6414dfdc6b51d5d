"""Guest memory as the Secure Processor reaches it: through the memory controller with the guest's
key, straight to DRAM.

The PSP's encrypted path moves whole 64-byte lines and is *not* coherent with the caches (APM2
15.34, "SEV ... the hypervisor must flush"; Linux ``arch/x86/kvm/svm/sev.c`` flushes guest pages
before every command that touches them).  A range that does not cover whole lines is
read-modify-written: the enclosing lines are decrypted with the guest key, patched and
re-encrypted.  On XE/XEX generations that leaves the untouched 16-byte blocks bit-identical; on
AES-XTS generations it is the only way to change part of a 64-byte data unit.

Before the firmware writes a range encrypted it evicts the host's cached (unencrypted) lines of it,
as AMD's firmware does with "CSF-698 dummy reads" under RdSzWrBkInvd (AMD-ASPFW ``sev_mcmd.c``), so
a dirty host line cannot later overwrite what the firmware wrote.
"""

from __future__ import annotations

from sevemu._util.units import LINE, align_down, align_up
from sevemu.firmware.core import Firmware
from sevemu.firmware.gctx import GuestContext

__all__ = ["evict_host_lines", "read_guest", "write_guest"]


def _lines(spa: int, length: int) -> tuple[int, int]:
    lo = align_down(spa, LINE)
    return lo, align_up(spa + length, LINE) - lo


def read_guest(fw: Firmware, g: GuestContext, spa: int, length: int) -> bytes:
    """Guest memory decrypted with ``g``'s key, as DRAM holds it (cached lines are not seen)."""
    lo, span = _lines(spa, length)
    data = fw.ports.dma.read_encrypted(lo, span, g.asid)
    return data[spa - lo : spa - lo + length]


def write_guest(fw: Firmware, g: GuestContext, spa: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` into guest memory encrypted with ``g``'s key, straight to DRAM (partial lines
    are read-modify-written)."""
    dma = fw.ports.dma
    lo, span = _lines(spa, len(data))
    # (equivalent mutant: ``lo != spa`` here sends whole-line writes through the read-modify-write
    # path, which writes the same bytes)
    if lo == spa and span == len(data):
        dma.write_encrypted(spa, data, g.asid)
        return
    lines = bytearray(dma.read_encrypted(lo, span, g.asid))
    lines[spa - lo : spa - lo + len(data)] = data
    dma.write_encrypted(lo, bytes(lines), g.asid)


def evict_host_lines(fw: Firmware, spa: int, length: int) -> None:
    """Write back and drop the host's (unencrypted) cached lines of a range, leaving its bytes as
    they are."""
    dma = fw.ports.dma
    dma.write(spa, dma.read(spa, length))
