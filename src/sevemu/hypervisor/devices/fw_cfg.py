"""QEMU's firmware configuration device (fw_cfg), I/O-port flavour, with the DMA interface.

Facts from QEMU's docs/specs/fw_cfg.rst and hw/nvram/fw_cfg.c, and the guest side in edk2's
OvmfPkg/Library/QemuFwCfgLib:

* Ports: the selector at 0x510 (16-bit writes select an item and rewind its offset), the data port at
  0x511 (8-bit reads return the item's next byte; 0 past its end or for an unknown item; the
  I/O-port device accepts only 8-bit data accesses and 16-bit selector writes,
  ``fw_cfg_comb_valid``; data writes are ignored, as since QEMU 2.4), the DMA address at 0x514
  (big-endian: a 32-bit write of the high half at 0x514 then of the low half at 0x518 starts the
  transfer; an 8-byte write at 0x514 does both; reads return the signature "QEMU CFG").
* Items: 0x0000 signature "QEMU", 0x0001 the interface ID (bit 0 traditional interface, bit 1 DMA),
  0x0002 UUID, 0x0003 RAM size (le64), 0x0005 the boot CPU count (le16), 0x000E boot menu, 0x000F
  the maximum CPU count (le16), 0x0019 the file directory, files from 0x0020 on; 0x8000 and up are
  architecture-local (0x8003 the legacy e820 table is not provided).
* The file directory: a big-endian count, then per file a big-endian size (u32), selector (u16), a
  reserved u16 and a 56-byte NUL-padded name; files are kept sorted by name and numbered in that
  order, as QEMU inserts them (``fw_cfg_add_file_callback``).
* DMA (``fw_cfg_dma_transfer``): the guest writes the GPA of a ``FWCfgDmaAccess`` {be32 control,
  be32 length, be64 address}; control bits ERROR 0x01, READ 0x02, SKIP 0x04, SELECT 0x08 (selector in
  bits 31:16), WRITE 0x10; the device reads from / skips in the item, zero-fills a read past its end,
  sets ERROR for a failed memory access or a write to a read-only item, and stores the final control
  word (0 on success) back.  OVMF uses DMA only in a guest that is not confidential
  (``QemuFwCfgProbe``: an SEV guest's PEI reads through the data port, ``rep insb`` or one IN per
  byte); DMA needs the guest-memory port the device is built with (the VM's host view:
  plaintext for a plain guest or shared pages, :class:`~sevemu.errors.UnmappedError` for an SNP
  guest's private memory, which is an ERROR here).

Files a QEMU x86 machine gives and OVMF's PEI reads (:func:`qemu_files`): ``etc/e820`` (the RAM
layout, 20-byte entries {le64 base, le64 length, le32 type}; under KVM also the 16 KiB reserved
identity-map page at 0xFEFFC000, QEMU target/i386/kvm/kvm.c ``kvm_arch_init``), ``etc/system-states``
(QEMU hw/acpi/core.c ``acpi_pm1_cnt_init``: {128, 0, 0, 129, 130, 128} with S3 and S4 enabled, bit 7
"enabled", bits 2:0 the SLP_TYP value), ``bootorder`` (empty: no device has a boot index).
``opt/ovmf/X-PciMmio64Mb`` and ``etc/msr_feature_control`` (QEMU adds it only for Intel VMX or
LMCE) are added by the VMM when wanted (:meth:`FwCfg.add_file`).
"""

from __future__ import annotations

import struct
import uuid as uuid_mod
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final, Protocol

from sevemu.errors import InputError, SevemuError
from sevemu.hypervisor.devices.bus import Device, ones

__all__ = [
    "FW_CFG_DMA_SIGNATURE",
    "FW_CFG_PORT",
    "DmaControl",
    "DmaMemory",
    "E820Type",
    "FwCfg",
    "FwCfgItem",
    "e820_table",
    "qemu_files",
]

FW_CFG_PORT: Final = 0x510
FW_CFG_DMA_PORT: Final = 0x514
FW_CFG_DMA_SIGNATURE: Final = 0x51454D5520434647  # "QEMU CFG"
_FILE_FIRST: Final = 0x20
_ENTRY_MASK: Final = 0x3FFF
_ARCH_LOCAL: Final = 0x8000
_FNAME_SIZE: Final = 56
_ID_TRADITIONAL: Final = 1 << 0
_ID_DMA: Final = 1 << 1
_KVM_IDENTITY_MAP: Final = (0xFEFFC000, 0x4000)


class FwCfgItem(IntEnum):
    """Well-known selectors (QEMU include/standard-headers/linux/qemu_fw_cfg.h)."""

    SIGNATURE = 0x00
    ID = 0x01
    UUID = 0x02
    RAM_SIZE = 0x03
    NOGRAPHIC = 0x04
    NB_CPUS = 0x05
    MACHINE_ID = 0x06
    BOOT_MENU = 0x0E
    MAX_CPUS = 0x0F
    FILE_DIR = 0x19
    IRQ0_OVERRIDE = 0x8002


class DmaControl(IntFlag):
    """``FWCfgDmaAccess.control`` bits."""

    ERROR = 0x01
    READ = 0x02
    SKIP = 0x04
    SELECT = 0x08
    WRITE = 0x10


class E820Type(IntEnum):
    """E820 address range types (ACPI 6.5 table 15.4)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


class DmaMemory(Protocol):
    """Guest memory as the device's DMA reaches it (the VM's host view: ``Vm.host_read/host_write``)."""

    def host_read(self, gpa: int, length: int) -> bytes: ...

    def host_write(self, gpa: int, data: bytes) -> None: ...


@dataclass(slots=True)
class _Item:
    data: bytes
    writable: bool = False


def e820_table(below_4g: int, above_4g: int = 0, *, kvm: bool = True) -> bytes:
    """``etc/e820`` for RAM split at 4 GiB as QEMU's ``pc_memory_init`` adds it, after the entry
    ``kvm_arch_init`` added first (the accelerator is set up before the board)."""
    entries = [(*_KVM_IDENTITY_MAP, E820Type.RESERVED)] if kvm else []
    entries.append((0, below_4g, E820Type.RAM))
    if above_4g:
        entries.append((1 << 32, above_4g, E820Type.RAM))
    return b"".join(struct.pack("<QQI", base, length, int(kind)) for base, length, kind in entries)


def qemu_files(below_4g: int, above_4g: int = 0, *, s3: bool = True, s4: bool = True) -> dict[str, bytes]:
    """The fw_cfg files of a QEMU/KVM x86 machine that OVMF's PEI reads (module docstring)."""
    states = bytes([128, 0, 0, 1 | (0x80 if s3 else 0), 2 | (0x80 if s4 else 0), 128])
    return {"etc/e820": e820_table(below_4g, above_4g), "etc/system-states": states, "bootorder": b""}


class FwCfg(Device):
    """fw_cfg on ports 0x510/0x511 and DMA at 0x514 (module docstring)."""

    io_sizes = frozenset({1, 2, 4, 8})

    def __init__(self, *, ram_size: int, cpus: int = 1, max_cpus: int | None = None,
                 files: dict[str, bytes] | None = None, dma: DmaMemory | None = None,
                 machine_uuid: bytes = b"\0" * 16, name: str = "fw_cfg") -> None:
        super().__init__(name)
        if len(machine_uuid) != 16:
            raise InputError(f"the fw_cfg UUID is 16 bytes, not {len(machine_uuid)}")
        self.dma = dma
        self.items: dict[int, _Item] = {
            FwCfgItem.SIGNATURE: _Item(b"QEMU"),
            FwCfgItem.ID: _Item(struct.pack("<I", _ID_TRADITIONAL | (_ID_DMA if dma is not None else 0))),
            FwCfgItem.UUID: _Item(machine_uuid),
            FwCfgItem.RAM_SIZE: _Item(struct.pack("<Q", ram_size)),
            FwCfgItem.NOGRAPHIC: _Item(struct.pack("<H", 0)),
            FwCfgItem.NB_CPUS: _Item(struct.pack("<H", cpus)),
            FwCfgItem.MAX_CPUS: _Item(struct.pack("<H", max_cpus if max_cpus is not None else cpus)),
            FwCfgItem.BOOT_MENU: _Item(struct.pack("<H", 0)),
            FwCfgItem.IRQ0_OVERRIDE: _Item(struct.pack("<I", 1)),
        }
        self.files: dict[str, _Item] = {}
        for fname, data in (files or {}).items():
            self.add_file(fname, data)
        self.selector = 0
        self.offset = 0
        self._cur: _Item | None = self.item(0)
        self._dma_high = 0
        self.selects: list[int] = []
        """Every selector the guest wrote, in order (what it asked for)."""
        self.dma_transfers = 0

    @staticmethod
    def uuid_bytes(value: str) -> bytes:
        """A UUID string as the 16 bytes of item 0x0002 (big-endian, as QEMU stores ``qemu_uuid``)."""
        return uuid_mod.UUID(value).bytes

    # ---- content ------------------------------------------------------------------------------------------
    def add_file(self, fname: str, data: bytes, writable: bool = False) -> int:
        """Add (or replace) file ``fname``; returns its selector (files are numbered by name order)."""
        raw = fname.encode()
        if not raw or len(raw) >= _FNAME_SIZE or b"\0" in raw:
            raise InputError(f"fw_cfg file name {fname!r} must be 1..55 bytes without NUL")
        if len(self.files) >= _ENTRY_MASK - _FILE_FIRST and fname not in self.files:
            raise InputError("fw_cfg has no selector left for another file")
        self.files[fname] = _Item(bytes(data), writable)
        self.files = dict(sorted(self.files.items(), key=lambda kv: kv[0].encode()))
        return self.file_selector(fname)

    def file_selector(self, fname: str) -> int:
        """The selector of file ``fname``."""
        for i, name in enumerate(self.files):
            if name == fname:
                return _FILE_FIRST + i
        raise InputError(f"fw_cfg has no file {fname!r}")

    def directory(self) -> bytes:
        """The file directory item (0x0019)."""
        out = bytearray(struct.pack(">I", len(self.files)))
        for i, (fname, item) in enumerate(self.files.items()):
            out += struct.pack(">IHH", len(item.data), _FILE_FIRST + i, 0) + fname.encode().ljust(_FNAME_SIZE, b"\0")
        return bytes(out)

    def item(self, selector: int) -> _Item | None:
        """The item a selector names (None: none)."""
        key = selector & (_ENTRY_MASK | _ARCH_LOCAL)
        if key == FwCfgItem.FILE_DIR:
            return _Item(self.directory())
        if _FILE_FIRST <= key < _ARCH_LOCAL:
            i = key - _FILE_FIRST
            if i < len(self.files):
                return list(self.files.values())[i]
            return None
        return self.items.get(key)

    def file_names(self) -> Iterable[str]:
        return tuple(self.files)

    # ---- the guest's accesses -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.selector = 0
        self.offset = 0
        self._cur = self.item(0)
        self._dma_high = 0

    def select(self, selector: int) -> None:
        self.selector = selector & 0xFFFF
        self.offset = 0
        self.selects.append(self.selector)
        self._cur = self.item(self.selector)

    def io_read(self, offset: int, size: int) -> int:
        if offset < 2:
            if size != 1:
                return ones(size)
            cur = self._cur
            if cur is None or self.offset >= len(cur.data):
                return 0
            b = cur.data[self.offset]
            self.offset += 1
            return b
        if offset >= 4:  # the DMA register reads back the big-endian signature
            pos = offset - 4
            if pos + size > 8:
                return ones(size)
            sig = FW_CFG_DMA_SIGNATURE.to_bytes(8, "big")[pos : pos + size]
            return int.from_bytes(sig, "little")
        return ones(size)

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset < 2:
            if size == 2:
                self.select(value)
            return  # data-port writes are ignored (QEMU >= 2.4)
        if self.dma is None or offset < 4:
            return
        if offset == 4 and size == 8:
            self._dma(int.from_bytes(value.to_bytes(8, "little"), "big"))
        elif offset == 4 and size == 4:
            self._dma_high = int.from_bytes(value.to_bytes(4, "little"), "big")
        elif offset == 8 and size == 4:
            self._dma(self._dma_high << 32 | int.from_bytes(value.to_bytes(4, "little"), "big"))

    def _dma(self, gpa: int) -> None:
        mem = self.dma
        assert mem is not None
        self.dma_transfers += 1
        self._dma_high = 0
        try:
            control, length, address = struct.unpack(">IIQ", mem.host_read(gpa, 16))
        except SevemuError:
            return  # the descriptor cannot be read: nothing to report it in
        if control & DmaControl.SELECT:
            self.select(control >> 16)
        read = bool(control & DmaControl.READ)
        write = not read and bool(control & DmaControl.WRITE)
        if not (read or write or control & DmaControl.SKIP):
            length = 0
        status = 0
        cur = self._cur
        while length > 0 and not status:
            if cur is None or self.offset >= len(cur.data):
                n = length
                if read:
                    status |= self._mem_write(address, bytes(n))
                if write:
                    status |= DmaControl.ERROR
            else:
                n = min(length, len(cur.data) - self.offset)
                if read:
                    status |= self._mem_write(address, cur.data[self.offset : self.offset + n])
                if write:
                    if not cur.writable or n != length:
                        status |= DmaControl.ERROR
                    else:
                        try:
                            chunk = mem.host_read(address, n)
                        except SevemuError:
                            status |= DmaControl.ERROR
                        else:
                            cur.data = cur.data[: self.offset] + chunk + cur.data[self.offset + n :]
                self.offset += n
            address += n
            length -= n
        try:
            mem.host_write(gpa, struct.pack(">I", int(status)))
        except SevemuError:
            pass

    def _mem_write(self, gpa: int, data: bytes) -> int:
        assert self.dma is not None
        try:
            self.dma.host_write(gpa, data)
        except SevemuError:
            return int(DmaControl.ERROR)
        return 0
