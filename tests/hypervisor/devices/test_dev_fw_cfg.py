"""fw_cfg (devices/fw_cfg.py): the probe, items and file directory as OVMF's QemuFwCfgLib reads them
through the ports, and the DMA interface."""

from __future__ import annotations

import struct

import pytest

from sevemu._util.units import GiB, MiB
from sevemu.errors import InputError, UnmappedError
from sevemu.hypervisor.devices import DeviceBus, FwCfg, FwCfgItem, e820_table, install_pc
from sevemu.hypervisor.devices.fw_cfg import FW_CFG_DMA_SIGNATURE, DmaControl


class Memory:
    """Guest memory for DMA: a dict of bytes; GPAs at or above ``private`` are unmapped."""

    def __init__(self, private: int = 1 << 40) -> None:
        self.data = bytearray(1 << 20)
        self.private = private

    def host_read(self, gpa: int, length: int) -> bytes:
        if gpa + length > self.private:
            raise UnmappedError(f"GPA {gpa:#x} is private")
        return bytes(self.data[gpa : gpa + length])

    def host_write(self, gpa: int, data: bytes) -> None:
        if gpa + len(data) > self.private:
            raise UnmappedError(f"GPA {gpa:#x} is private")
        self.data[gpa : gpa + len(data)] = data


def select(b: DeviceBus, item: int) -> None:
    b.io_write(0x510, 2, item)


def read(b: DeviceBus, n: int) -> bytes:
    return b.ins(0x511, 1, n)  # IoReadFifo8: rep insb


def find_file(b: DeviceBus, name: str) -> tuple[int, int] | None:
    """QemuFwCfgFindFile, as edk2 writes it."""
    select(b, FwCfgItem.FILE_DIR)
    (count,) = struct.unpack(">I", read(b, 4))
    for _ in range(count):
        size, sel, _res = struct.unpack(">IHH", read(b, 8))
        fname = read(b, 56).split(b"\0")[0].decode()
        if fname == name:
            return sel, size
    return None


@pytest.fixture
def pc() -> DeviceBus:
    b = DeviceBus()
    install_pc(b, ram=256 * MiB, cpus=2, max_cpus=4)
    return b


def test_probe_signature_and_revision(pc: DeviceBus) -> None:
    select(pc, FwCfgItem.SIGNATURE)
    assert read(pc, 4) == b"QEMU"
    select(pc, FwCfgItem.ID)
    assert struct.unpack("<I", read(pc, 4))[0] == 1  # traditional interface; no DMA without memory
    dma = DeviceBus()
    install_pc(dma, ram=256 * MiB, dma=Memory())
    select(dma, FwCfgItem.ID)
    assert struct.unpack("<I", read(dma, 4))[0] == 3


def test_items_ovmf_reads(pc: DeviceBus) -> None:
    select(pc, FwCfgItem.NB_CPUS)
    assert struct.unpack("<H", read(pc, 2))[0] == 2  # PlatformMaxCpuCountInitialization
    select(pc, FwCfgItem.MAX_CPUS)
    assert struct.unpack("<H", read(pc, 2))[0] == 4
    select(pc, FwCfgItem.RAM_SIZE)
    assert struct.unpack("<Q", read(pc, 8))[0] == 256 * MiB
    select(pc, 0x1234)  # no such item: zeros
    assert read(pc, 4) == bytes(4)
    select(pc, FwCfgItem.NB_CPUS)
    assert read(pc, 4) == b"\x02\x00\x00\x00"  # past the end: zeros
    assert pc.io_read(0x511, 2) == 0xFFFF  # only byte reads of the data port are valid
    pc.io_write(0x511, 1, 0x55)  # data writes are ignored
    select(pc, FwCfgItem.SIGNATURE)
    assert read(pc, 4) == b"QEMU"


def test_file_directory_e820_and_system_states(pc: DeviceBus) -> None:
    hit = find_file(pc, "etc/e820")
    assert hit is not None
    sel, size = hit
    assert size % 20 == 0
    select(pc, sel)
    entries = [struct.unpack("<QQI", read(pc, 20)) for _ in range(size // 20)]
    assert entries == [(0xFEFFC000, 0x4000, 2), (0, 256 * MiB, 1)]  # KVM's entry first, as QEMU adds it
    states = find_file(pc, "etc/system-states")
    assert states is not None and states[1] == 6
    select(pc, states[0])
    assert read(pc, 6) == bytes([128, 0, 0, 129, 130, 128])  # S3 enabled: QemuFwCfgS3Enabled is TRUE
    boot = find_file(pc, "bootorder")
    assert boot is not None and boot[1] == 0  # no device has a boot index
    assert find_file(pc, "opt/ovmf/X-PciMmio64Mb") is None


def test_files_are_sorted_and_numbered_from_0x20() -> None:
    fw = FwCfg(ram_size=MiB, files={"z": b"1", "a": b"22", "m/x": b""})
    assert fw.file_names() == ("a", "m/x", "z")
    assert [fw.file_selector(n) for n in ("a", "m/x", "z")] == [0x20, 0x21, 0x22]
    d = fw.directory()
    assert struct.unpack_from(">I", d)[0] == 3 and len(d) == 4 + 3 * 64
    assert struct.unpack_from(">IHH", d, 4) == (2, 0x20, 0) and d[12:14] == b"a\0"
    with pytest.raises(InputError):
        fw.add_file("x" * 56, b"")
    with pytest.raises(InputError):
        fw.file_selector("nope")
    assert e820_table(2 * GiB, 1 * GiB, kvm=False) == struct.pack("<QQIQQI", 0, 2 * GiB, 1, 4 * GiB, 1 * GiB, 1)


def _dma(b: DeviceBus, mem: Memory, desc_gpa: int, control: int, length: int, address: int) -> int:
    mem.host_write(desc_gpa, struct.pack(">IIQ", control, length, address))
    b.io_write(0x514, 4, int.from_bytes((desc_gpa >> 32).to_bytes(4, "big"), "little"))  # SwapBytes32
    b.io_write(0x518, 4, int.from_bytes((desc_gpa & 0xFFFFFFFF).to_bytes(4, "big"), "little"))
    return struct.unpack(">I", mem.host_read(desc_gpa, 4))[0]


def test_dma_read_skip_and_errors() -> None:
    mem = Memory(private=0x80000)
    b = DeviceBus()
    pc = install_pc(b, ram=256 * MiB, dma=mem, files={"opt/rw": b"abcd"})
    pc.fw_cfg.files["opt/rw"].writable = True
    # the signature register reads "QEMU CFG" big-endian
    assert b.io_read(0x514, 4) == int.from_bytes(b"QEMU", "little")
    assert b.io_read(0x518, 4) == int.from_bytes(b" CFG", "little")
    assert FW_CFG_DMA_SIGNATURE.to_bytes(8, "big") == b"QEMU CFG"
    # select + read the signature item, 8 bytes: 4 of data and 4 zero-filled
    mem.data[0x2000:0x2008] = b"\xEE" * 8
    status = _dma(b, mem, 0x1000, FwCfgItem.SIGNATURE << 16 | DmaControl.SELECT | DmaControl.READ, 8, 0x2000)
    assert status == 0 and mem.data[0x2000:0x2008] == b"QEMU\0\0\0\0"
    # skip 2 bytes of the file then read 2
    sel = pc.fw_cfg.file_selector("opt/rw")
    assert _dma(b, mem, 0x1000, sel << 16 | DmaControl.SELECT | DmaControl.SKIP, 2, 0) == 0
    assert _dma(b, mem, 0x1000, DmaControl.READ, 2, 0x3000) == 0 and mem.data[0x3000:0x3002] == b"cd"
    # a write to a writable file, from offset 0
    mem.data[0x3100:0x3102] = b"XY"
    assert _dma(b, mem, 0x1000, sel << 16 | DmaControl.SELECT | DmaControl.WRITE, 2, 0x3100) == 0
    assert pc.fw_cfg.files["opt/rw"].data == b"XYcd"
    # a write to a read-only item, and a read into memory the host cannot reach: ERROR
    assert _dma(b, mem, 0x1000, FwCfgItem.SIGNATURE << 16 | DmaControl.SELECT | DmaControl.WRITE, 1,
                0x3100) == DmaControl.ERROR
    assert _dma(b, mem, 0x1000, FwCfgItem.SIGNATURE << 16 | DmaControl.SELECT | DmaControl.READ, 4,
                0x90000) == DmaControl.ERROR
    assert pc.fw_cfg.dma_transfers == 6


def test_without_dma_memory_the_dma_port_does_nothing(pc: DeviceBus) -> None:
    pc.io_write(0x514, 4, 0)
    pc.io_write(0x518, 4, 0x00100000)
    select(pc, FwCfgItem.SIGNATURE)
    assert read(pc, 4) == b"QEMU"
