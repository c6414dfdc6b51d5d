"""Launch digest, kernel-hashes table and LAUNCH_MEASURE verification (SEV API 55766, LAUNCH_MEASURE)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from sevemu.errors import InputError, LayoutError
from sevemu.owner import measurement as m

TIK = bytes.fromhex("66320db73158a35a255d051758e95ed4")
EMPTY_LD = hashlib.sha256(b"").digest()
MNONCE = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
KAT = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")


def test_reference_measure_vector() -> None:
    blob = m.launch_measure_blob(TIK, api_major=0, api_minor=18, build=0x0F, policy=0, launch_digest=EMPTY_LD,
                                 mnonce=MNONCE)
    assert blob == KAT + MNONCE
    m.verify_measurement(blob, TIK, 0, 18, 0x0F, 0, EMPTY_LD)
    assert m.expected_launch_digest([]) == EMPTY_LD


@pytest.mark.parametrize("bit", [0, 7, 255, 256, 383])  # MEASURE bits, then MNONCE bits
def test_flipped_bit_in_the_blob(bit: int) -> None:
    blob = bytearray(KAT + MNONCE)
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(m.MeasureMacError):
        m.verify_measurement(bytes(blob), TIK, 0, 18, 0x0F, 0, EMPTY_LD)


@pytest.mark.parametrize(
    ("args", "ld"),
    [
        ((0, 18, 0x0F, 1), EMPTY_LD),  # policy
        ((0, 19, 0x0F, 0), EMPTY_LD),  # API minor
        ((1, 18, 0x0F, 0), EMPTY_LD),  # API major
        ((0, 18, 0x10, 0), EMPTY_LD),  # build
        ((0, 18, 0x0F, 0), hashlib.sha256(b"x").digest()),  # digest
    ],
)
def test_every_input_is_bound(args: tuple[int, int, int, int], ld: bytes) -> None:
    with pytest.raises(m.MeasureMacError):
        m.verify_measurement(KAT + MNONCE, TIK, *args, ld)


def test_wrong_tik() -> None:
    with pytest.raises(m.MeasureMacError):
        m.verify_measurement(KAT + MNONCE, bytes(16), 0, 18, 0x0F, 0, EMPTY_LD)


def test_pre_0_17_variant_round_trip() -> None:
    blob = m.launch_measure_blob(TIK, api_major=0, api_minor=16, build=3, policy=1, launch_digest=EMPTY_LD,
                                 mnonce=MNONCE)
    m.verify_measurement(blob, TIK, 0, 16, 3, 1, EMPTY_LD)
    m.verify_measurement(blob, TIK, 0, 16, 200, 1, EMPTY_LD)  # build not bound before 0.17
    with pytest.raises(m.MeasureMacError):
        m.verify_measurement(blob, TIK, 0, 17, 3, 1, EMPTY_LD)


def test_wrong_sizes() -> None:
    with pytest.raises(LayoutError):
        m.verify_measurement(KAT, TIK, 0, 18, 0x0F, 0, EMPTY_LD)
    with pytest.raises(LayoutError, match="launch digest must be 32 bytes, got 16"):
        m.verify_measurement(KAT + MNONCE, TIK, 0, 18, 0x0F, 0, EMPTY_LD[:16])


@pytest.mark.parametrize(("size", "padded"), [(1, 4096), (4095, 4096), (4096, 4096), (4097, 8192), (0, 0)])
def test_the_one_padding_rule(size: int, padded: int) -> None:
    """An image is measured as the whole 4 KiB pages it is loaded into, its tail zero-filled."""
    image = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    out = m.padded_image(image)
    assert len(out) == padded and out[:size] == image and out[size:] == bytes(padded - size)
    assert m.IMAGE_ALIGNMENT == 4096


def test_launch_digest_is_one_running_hash() -> None:
    regions = [b"firmware" * 100, b"table"]
    vmsas = [bytes([1]) * 4096, bytes([2]) * 4096]
    assert m.expected_launch_digest(regions, vmsas) == hashlib.sha256(b"".join(regions + vmsas)).digest()
    ld = m.LaunchDigest().update_data(regions[0]).update_data(regions[1])
    assert ld.update_vmsa(vmsas[0]).update_vmsa(vmsas[1]).digest() == m.expected_launch_digest(regions, vmsas)


def test_launch_digest_order_rules() -> None:
    ld = m.LaunchDigest().update_data(b"early").update_data(b"")  # data after data is fine
    ld.update_vmsa(bytes(4096))
    with pytest.raises(InputError, match="LAUNCH_UPDATE_DATA after LAUNCH_UPDATE_VMSA"):
        ld.update_data(b"late")
    with pytest.raises(LayoutError, match="a VMSA page is 0x1000 bytes, got 0xfff"):
        m.LaunchDigest().update_vmsa(bytes(4095))


def test_kernel_hashes_table_layout() -> None:
    kernel, initrd, cmdline = b"kernel image", b"initrd image", "console=ttyS0"
    table = m.kernel_hashes_table(kernel, initrd, cmdline)
    assert len(table) == 176 and table[168:] == bytes(8)
    assert table[:16] == uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21").bytes_le
    assert table[16:18] == (168).to_bytes(2, "little")
    entries = [table[18 + 50 * i : 18 + 50 * (i + 1)] for i in range(3)]
    expected = [
        (m.SEV_CMDLINE_ENTRY_GUID, hashlib.sha256(cmdline.encode() + b"\x00").digest()),
        (m.SEV_INITRD_ENTRY_GUID, hashlib.sha256(initrd).digest()),
        (m.SEV_KERNEL_ENTRY_GUID, hashlib.sha256(kernel).digest()),
    ]
    for entry, (guid, digest) in zip(entries, expected, strict=True):
        assert entry[:16] == guid.bytes_le
        assert entry[16:18] == (50).to_bytes(2, "little")
        assert entry[18:] == digest
    # GUIDs are stored mixed-endian: the first three groups byte-swapped
    assert m.SEV_KERNEL_ENTRY_GUID.bytes_le[:4] == bytes.fromhex("3794e74d")


def test_kernel_hashes_table_defaults() -> None:
    table = m.kernel_hashes_table(b"k")
    assert table[18 + 18 : 18 + 50] == hashlib.sha256(b"\x00").digest()  # no cmdline: a lone NUL
    assert table[68 + 18 : 68 + 50] == hashlib.sha256(b"").digest()  # no initrd
    assert m.kernel_hashes_table(b"k", b"", "") == table == m.kernel_hashes_table(b"k", b"", b"")
