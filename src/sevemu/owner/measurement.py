"""Expected-measurement calculator for legacy SEV and SEV-ES launches (SEV API 55766,
LAUNCH_UPDATE_DATA / LAUNCH_UPDATE_VMSA / LAUNCH_MEASURE; virtee sev ``src/launch/sev.rs``;
sev-snp-measure ``guest.py``; QEMU ``target/i386/sev.c`` for the kernel-hashes table).

Written independently of the firmware model: it predicts what the firmware's GCTX.LD will be from
what the guest owner knows (firmware image, kernel-hashes table, initial VMSAs) and checks the
LAUNCH_MEASURE result against it.

Launch digest
    LD = SHA-256 over the plaintext of every LAUNCH_UPDATE_DATA region in order, then (SEV-ES) over
    every LAUNCH_UPDATE_VMSA page (4096 bytes each) in vCPU order -- one running hash, so
    ``SHA-256(region_1 || ... || region_n || vmsa_0 || ... || vmsa_k)``.  The pages a QEMU/KVM host
    makes for an OVMF guest come from :mod:`sevemu.owner.vmsa` (:func:`~sevemu.owner.vmsa.ovmf_vmsa_pages`).

Kernel-hashes table (QEMU ``-kernel`` with an SEV OVMF)
    ``GUID 9438d606-4f22-4cc9-b479-a793d411fd21 || u16 length || entries``, each entry
    ``GUID || u16 50 || SHA-256`` for, in this order, the command line (hashed with its trailing
    NUL; an absent command line hashes as a single NUL), the initrd (empty if none) and the kernel.
    ``length`` counts header and entries (168) without padding; the table is measured zero-padded
    to a multiple of 16 bytes (176).  GUIDs are stored in their little-endian (``bytes_le``) form.

Image padding (the project's one rule)
    A guest image (a firmware volume, a file given to ``sevemu launch``/``vmm``/``measurement``) is
    loaded into whole 4 KiB pages and measured with its zero padding: :func:`padded_image`.  The
    firmware measures what LAUNCH_UPDATE_DATA covers, and a VMM maps and encrypts whole pages; a
    firmware volume is a whole number of pages already, so for real images this is the file's own
    hash, as sevctl computes it.

LAUNCH_MEASURE
    The 0x30-byte output is ``MEASURE || MNONCE`` with MEASURE as in
    :func:`sevemu.crypto.transport.measure_mac` (the 0x04/API/build prefix only for API >= 0.17).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

from sevemu._util.units import PAGE, align_up
from sevemu.abi.sev import MeasureBuf
from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.crypto.transport import (
    MeasureMacError,
    measure_mac,
    verify_measure_mac,
)
from sevemu.errors import InputError, LayoutError

# Mutation testing (each comparison, condition, constant, statement and keyword argument of this
# module changed or removed in turn; tests/owner and tests/interop run against each mutant): every
# mutant is killed.  No equivalent mutant remains: the three there were are written away -- a VMSA
# counter of which only the truth mattered (now a flag), a padding expression that gave the same
# result for the table's one length (now a constant), and a digest-size check that measure_mac
# repeats with the same error (removed).

__all__ = [
    "IMAGE_ALIGNMENT",
    "SEV_CMDLINE_ENTRY_GUID",
    "SEV_HASH_TABLE_GUID",
    "SEV_HASH_TABLE_LENGTH",
    "SEV_INITRD_ENTRY_GUID",
    "SEV_KERNEL_ENTRY_GUID",
    "LaunchDigest",
    "MeasureMacError",
    "expected_launch_digest",
    "kernel_hashes_table",
    "launch_measure_blob",
    "padded_image",
    "verify_measurement",
]

SEV_HASH_TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
SEV_CMDLINE_ENTRY_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
SEV_INITRD_ENTRY_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
SEV_KERNEL_ENTRY_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")

_ENTRY_LENGTH = 16 + 2 + 32
SEV_HASH_TABLE_LENGTH = 16 + 2 + 3 * _ENTRY_LENGTH
"""Value of the table's u16 length field (168): header plus three entries, without padding."""
_HASH_TABLE_PADDED = align_up(SEV_HASH_TABLE_LENGTH, 16)
"""The table as measured: zero-padded to 16-byte units (176)."""


IMAGE_ALIGNMENT = PAGE
"""A guest image is loaded and measured in whole pages (module docstring)."""


def padded_image(image: bytes) -> bytes:
    """``image`` zero-padded to whole :data:`IMAGE_ALIGNMENT` pages, as it is loaded and measured."""
    return bytes(image) + bytes(-len(image) % IMAGE_ALIGNMENT)


class LaunchDigest:
    """Running GCTX.LD as the firmware extends it, command by command.

    A functional reference: call :meth:`update_data` for each LAUNCH_UPDATE_DATA region and
    :meth:`update_vmsa` for each LAUNCH_UPDATE_VMSA page, in the order the hypervisor issues them.
    """

    __slots__ = ("_hash", "_vmsa_seen")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._vmsa_seen = False

    def update_data(self, region: bytes) -> LaunchDigest:
        """Extend with the plaintext of a LAUNCH_UPDATE_DATA region; must precede every VMSA."""
        if self._vmsa_seen:
            raise InputError("LAUNCH_UPDATE_DATA after LAUNCH_UPDATE_VMSA is not a valid launch order")
        self._hash.update(bytes(region))
        return self

    def update_vmsa(self, page: bytes) -> LaunchDigest:
        """Extend with one 4096-byte VMSA page (LAUNCH_UPDATE_VMSA)."""
        if len(page) != VMSA_PAGE_SIZE:
            raise LayoutError(f"a VMSA page is {VMSA_PAGE_SIZE:#x} bytes, got {len(page):#x}")
        self._hash.update(bytes(page))
        self._vmsa_seen = True
        return self

    def digest(self) -> bytes:
        """The 32-byte LD so far."""
        return self._hash.digest()


def expected_launch_digest(regions: Iterable[bytes], vmsas: Iterable[bytes] = ()) -> bytes:
    """LD of a launch measuring ``regions`` (LAUNCH_UPDATE_DATA, in order) then ``vmsas``.

    For a QEMU/OVMF direct-kernel boot: ``regions = [ovmf_image, kernel_hashes_table(...)]``.
    """
    ld = LaunchDigest()
    for region in regions:
        ld.update_data(region)
    for page in vmsas:
        ld.update_vmsa(page)
    return ld.digest()


def _entry(guid: uuid.UUID, data: bytes) -> bytes:
    return guid.bytes_le + _ENTRY_LENGTH.to_bytes(2, "little") + hashlib.sha256(data).digest()


def kernel_hashes_table(kernel: bytes, initrd: bytes = b"", cmdline: str | bytes | None = None) -> bytes:
    """The padded SEV kernel-hashes table QEMU measures for ``-kernel/-initrd/-append``.

    ``cmdline`` is hashed with a trailing NUL appended; ``None`` or empty hashes a lone NUL.  A
    ``str`` command line is UTF-8 encoded.
    """
    if isinstance(cmdline, str):
        cmdline = cmdline.encode()
    table = (
        SEV_HASH_TABLE_GUID.bytes_le
        + SEV_HASH_TABLE_LENGTH.to_bytes(2, "little")
        + _entry(SEV_CMDLINE_ENTRY_GUID, (cmdline or b"") + b"\x00")
        + _entry(SEV_INITRD_ENTRY_GUID, bytes(initrd))
        + _entry(SEV_KERNEL_ENTRY_GUID, bytes(kernel))
    )
    return table + bytes(_HASH_TABLE_PADDED - len(table))


def launch_measure_blob(
    tik: bytes,
    *,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    launch_digest: bytes,
    mnonce: bytes,
) -> bytes:
    """The 0x30-byte LAUNCH_MEASURE output a firmware with these inputs returns (MEASURE||MNONCE)."""
    measure = measure_mac(
        tik,
        api_major=api_major,
        api_minor=api_minor,
        build=build,
        policy=policy,
        launch_digest=launch_digest,
        mnonce=mnonce,
    )
    return MeasureBuf(measure=measure, mnonce=bytes(mnonce)).encode()


def verify_measurement(
    measure_blob: bytes,
    tik: bytes,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    expected_ld: bytes,
) -> None:
    """Check a LAUNCH_MEASURE output against the launch the guest owner expects.

    ``measure_blob`` is the 0x30-byte buffer (MEASURE || MNONCE) the hypervisor relays;
    ``api_major``/``api_minor``/``build`` are the firmware version it claims (PLATFORM_STATUS) --
    the MAC binds them, so a lie is caught here.  Raises :class:`MeasureMacError` on mismatch and
    :class:`~sevemu.errors.LayoutError` for a blob or digest of the wrong size (the digest's size is
    checked by :func:`~sevemu.crypto.transport.measure_mac`, with the same error).
    """
    out = MeasureBuf.decode(measure_blob)
    verify_measure_mac(
        tik,
        out.measure,
        api_major=api_major,
        api_minor=api_minor,
        build=build,
        policy=policy,
        launch_digest=expected_ld,
        mnonce=out.mnonce,
    )
