"""SEV-SNP attestation report, guest messages (SNP_GUEST_REQUEST) and the extended-report certificate
table (SNP ABI 56860: ATTESTATION_REPORT, guest message header, MSG_REPORT_REQ/RSP, MSG_KEY_REQ/RSP;
go-sev-guest ``abi/abi.go``; virtee/sev ``src/firmware/guest/types/snp.rs``; Linux
``arch/x86/include/asm/sev.h`` ``struct snp_guest_msg_hdr`` and ``include/uapi/linux/sev-guest.h``;
GHCB 56421 for the certificate table).

The report is version dependent (``AttestationReport.version``): CPUID_FAM_ID / CPUID_MOD_ID /
CPUID_STEP at 0x188 exist from version 3, LAUNCH_MIT_VECTOR / CURRENT_MIT_VECTOR at 0x1F8 from
version 5; below, those bytes are reserved and the fields decode to ``None``.  The TCB fields are raw
``u64`` because their byte layout depends on the product, not on the report version: decode them with
:func:`sevemu.abi.snp.tcb_layout` (Turin: :class:`~sevemu.abi.snp.TcbVersionTurin`).  ECDSA P-384 /
SHA-384 signs bytes [0, :data:`REPORT_SIGNED_SIZE`).

Decisions where the sources disagree or say nothing (change them here):

* Version 4 has the version 3 layout (virtee/sev reads 3 and 4 alike; go-sev-guest accepts 4).
* PLATFORM_INFO stays a raw ``u64`` in the report (every bit round-trips); :class:`PlatformInfo`
  names the bits the sources name and *ignores* bit 6, which real Turin reports set and no public
  source names; bits 63:8 must be zero.
* SIGNER_INFO (0x48) is decoded strictly (:class:`SignerInfo`, bits 31:5 must be zero, as
  go-sev-guest checks).  The policy is decoded as :class:`~sevemu.abi.snp.SnpPolicy` (bits 63:26 zero).
* MSG_REPORT_REQ 0x44 is ``key_sel`` (:class:`KeySel`), as read from SNP ABI Table 22 by
  usbarmory/tamago; Linux's uapi calls it reserved and sends zero, which selects the default key.
* MSG_KEY_REQ is 0x20 bytes (Linux uapi); the 0x28-byte form with LAUNCH_MIT_VECTOR (firmware 1.58,
  virtee/sev) is :class:`KeyReqMit`.  ROOT_KEY_SELECT bit 0 picks VCEK (0) or VMRK (1); bits 2:1 are
  taken as the key select of newer ABIs (unconfirmed).
* Certificate-table GUIDs are stored in RFC 4122 byte order (``uuid.UUID(...).bytes``), as
  go-sev-guest and virtee/sev write them.
"""

from __future__ import annotations

import uuid
from enum import IntEnum
from typing import Final

from sevemu._util.units import PAGE
from sevemu.abi.certs import SevEcdsaSig
from sevemu.abi.snp import SnpPolicy
from sevemu.abi.struct import Struct, bit, bits, layout, nested, raw, u8, u16, u32, u64
from sevemu.errors import LayoutError

__all__ = [
    "AAD_OFFSET",
    "AUTHTAG_LEN",
    "CERT_GUID_ARK",
    "CERT_GUID_ASK",
    "CERT_GUID_VCEK",
    "CERT_GUID_VLEK",
    "MSG_HDR_SIZE",
    "MSG_HDR_VERSION",
    "MSG_PAYLOAD_MAX",
    "REPORT_MIN_VERSION",
    "REPORT_SIGNED_SIZE",
    "REPORT_SIZE",
    "AeadAlgo",
    "AttestationReport",
    "CertTableEntry",
    "GuestFieldSelect",
    "KeyReq",
    "KeyReqMit",
    "KeyRsp",
    "KeySel",
    "MsgType",
    "PlatformInfo",
    "ReportReq",
    "ReportRsp",
    "RootKeySelect",
    "SignerInfo",
    "SigningKey",
    "SnpGuestMsgHdr",
    "TscInfoReq",
    "TscInfoRsp",
    "decode_cert_table",
    "encode_cert_table",
]

REPORT_SIZE: Final = 0x4A0
REPORT_SIGNED_SIZE: Final = 0x2A0
"""The signature covers bytes [0, 0x2A0)."""
REPORT_MIN_VERSION: Final = 2
MSG_HDR_SIZE: Final = 0x60
MSG_HDR_VERSION: Final = 1
MSG_PAYLOAD_MAX: Final = PAGE - MSG_HDR_SIZE
AUTHTAG_LEN: Final = 16
AAD_OFFSET: Final = 0x30
"""AES-GCM additional data: header bytes [0x30, 0x60)."""


class SigningKey(IntEnum):
    """SIGNER_INFO.signing_key (go-sev-guest ``ReportSigner``); 2..6 are reserved."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@layout(size=4)
class SignerInfo(Struct):
    """Report 0x48 (SNP ABI; go-sev-guest ``ParseSignerInfo``)."""

    author_key_en: bool = bit(0)
    mask_chip_key: bool = bit(1)
    signing_key: int = bits(4, 2)


@layout(size=8, ignored_bits=((6, 6),))
class PlatformInfo(Struct):
    """Report 0x40 read as bits (virtee/sev ``PlatformInfo``); bit 6 ignored (module docstring)."""

    smt_en: bool = bit(0)
    tsme_en: bool = bit(1)
    ecc_en: bool = bit(2)
    rapl_dis: bool = bit(3)
    ciphertext_hiding_en: bool = bit(4)
    alias_check_complete: bool = bit(5)
    tio_en: bool = bit(7)


@layout(size=REPORT_SIZE, version="version")
class AttestationReport(Struct):
    """ATTESTATION_REPORT (0x4A0 bytes), versions 2 to 5 (module docstring)."""

    version: int = u32(0x000)
    guest_svn: int = u32(0x004)
    policy: SnpPolicy = nested(0x008, SnpPolicy)
    family_id: bytes = raw(0x010, 16)
    image_id: bytes = raw(0x020, 16)
    vmpl: int = u32(0x030)
    signature_algo: int = u32(0x034)
    current_tcb: int = u64(0x038)
    platform_info: int = u64(0x040)
    signer_info: SignerInfo = nested(0x048, SignerInfo)
    report_data: bytes = raw(0x050, 64)
    measurement: bytes = raw(0x090, 48)
    host_data: bytes = raw(0x0C0, 32)
    id_key_digest: bytes = raw(0x0E0, 48)
    author_key_digest: bytes = raw(0x110, 48)
    report_id: bytes = raw(0x140, 32)
    report_id_ma: bytes = raw(0x160, 32)
    reported_tcb: int = u64(0x180)
    cpuid_fam_id: int | None = u8(0x188, since=3)
    cpuid_mod_id: int | None = u8(0x189, since=3)
    cpuid_step: int | None = u8(0x18A, since=3)
    chip_id: bytes = raw(0x1A0, 64)
    committed_tcb: int = u64(0x1E0)
    current_build: int = u8(0x1E8)
    current_minor: int = u8(0x1E9)
    current_major: int = u8(0x1EA)
    committed_build: int = u8(0x1EC)
    committed_minor: int = u8(0x1ED)
    committed_major: int = u8(0x1EE)
    launch_tcb: int = u64(0x1F0)
    launch_mit_vector: int | None = u64(0x1F8, since=5)
    current_mit_vector: int | None = u64(0x200, since=5)
    signature: SevEcdsaSig = nested(0x2A0, SevEcdsaSig)

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers."""
        return self.encode()[:REPORT_SIGNED_SIZE]


# --- guest messages ------------------------------------------------------------------------------


class AeadAlgo(IntEnum):
    """Guest message ALGO (Linux ``enum aead_algo``)."""

    INVALID = 0
    AES_256_GCM = 1


class MsgType(IntEnum):
    """Guest message MSG_TYPE (Linux ``enum msg_type``; a response is its request + 1)."""

    INVALID = 0
    CPUID_REQ = 1
    CPUID_RSP = 2
    KEY_REQ = 3
    KEY_RSP = 4
    REPORT_REQ = 5
    REPORT_RSP = 6
    EXPORT_REQ = 7
    EXPORT_RSP = 8
    IMPORT_REQ = 9
    IMPORT_RSP = 10
    ABSORB_REQ = 11
    ABSORB_RSP = 12
    VMRK_REQ = 13
    VMRK_RSP = 14
    ABSORB_NOMA_REQ = 15
    ABSORB_NOMA_RSP = 16
    TSC_INFO_REQ = 17
    TSC_INFO_RSP = 18


@layout(size=MSG_HDR_SIZE)
class SnpGuestMsgHdr(Struct):
    """Guest message header (Linux ``struct snp_guest_msg_hdr``); the payload follows at 0x60.

    AES-256-GCM with VMPCK[``msg_vmpck``]: IV = little-endian ``msg_seqno`` padded to 12 bytes,
    AAD = bytes [:data:`AAD_OFFSET`, 0x60), tag in ``authtag[:16]``.
    """

    authtag: bytes = raw(0x00, 32)
    msg_seqno: int = u64(0x20)
    algo: int = u8(0x30, AeadAlgo.AES_256_GCM)
    hdr_version: int = u8(0x31, MSG_HDR_VERSION)
    hdr_size: int = u16(0x32, MSG_HDR_SIZE)
    msg_type: int = u8(0x34)
    msg_version: int = u8(0x35, 1)
    msg_size: int = u16(0x36)
    msg_vmpck: int = u8(0x3C)


class KeySel(IntEnum):
    """MSG_REPORT_REQ ``key_sel`` (module docstring)."""

    DEFAULT = 0
    """VLEK if one is loaded, else VCEK."""
    VCEK = 1
    VLEK = 2


@layout(size=0x60)
class ReportReq(Struct):
    """MSG_REPORT_REQ (Linux ``struct snp_report_req``): ``vmpl`` >= the caller's VMPL."""

    report_data: bytes = raw(0x00, 64)
    vmpl: int = u32(0x40)
    key_sel: int = u32(0x44)


@layout(size=0x20 + REPORT_SIZE)
class ReportRsp(Struct):
    """MSG_REPORT_RSP: ``status`` 0 or a firmware status (INVALID_PARAM), then the report."""

    status: int = u32(0x00)
    report_size: int = u32(0x04, REPORT_SIZE)
    report: AttestationReport = nested(0x20, AttestationReport)


@layout(size=4)
class RootKeySelect(Struct):
    """MSG_KEY_REQ 0x00: bit 0 root key (0 VCEK-derived, 1 VMRK); bits 2:1 key select (unconfirmed)."""

    vmrk: bool = bit(0)
    key_sel: int = bits(2, 1)


@layout(size=8)
class GuestFieldSelect(Struct):
    """MSG_KEY_REQ 0x08: the guest fields mixed into the derived key."""

    policy: bool = bit(0)
    image_id: bool = bit(1)
    family_id: bool = bit(2)
    measurement: bool = bit(3)
    guest_svn: bool = bit(4)
    tcb_version: bool = bit(5)
    launch_mit_vector: bool = bit(6)


@layout(size=0x20)
class KeyReq(Struct):
    """MSG_KEY_REQ (Linux ``struct snp_derived_key_req``)."""

    root_key_select: RootKeySelect = nested(0x00, RootKeySelect)
    guest_field_select: GuestFieldSelect = nested(0x08, GuestFieldSelect)
    vmpl: int = u32(0x10)
    guest_svn: int = u32(0x14)
    tcb_version: int = u64(0x18)


@layout(size=0x28)
class KeyReqMit(Struct):
    """MSG_KEY_REQ with LAUNCH_MIT_VECTOR (virtee/sev ``DerivedKeyReq``, firmware 1.58)."""

    root_key_select: RootKeySelect = nested(0x00, RootKeySelect)
    guest_field_select: GuestFieldSelect = nested(0x08, GuestFieldSelect)
    vmpl: int = u32(0x10)
    guest_svn: int = u32(0x14)
    tcb_version: int = u64(0x18)
    launch_mit_vector: int = u64(0x20)


@layout(size=0x40)
class KeyRsp(Struct):
    """MSG_KEY_RSP (virtee/sev ``DerivedKeyRsp``)."""

    status: int = u32(0x00)
    derived_key: bytes = raw(0x20, 32)


@layout(size=0x80)
class TscInfoReq(Struct):
    """MSG_TSC_INFO_REQ: 128 reserved bytes (Linux ``struct snp_tsc_info_req``)."""


@layout(size=0x80)
class TscInfoRsp(Struct):
    """MSG_TSC_INFO_RSP (Linux ``struct snp_tsc_info_resp``)."""

    status: int = u32(0x00)
    tsc_scale: int = u64(0x08)
    tsc_offset: int = u64(0x10)
    tsc_factor: int = u32(0x18)


# --- extended report certificate table -----------------------------------------------------------

CERT_GUID_VCEK: Final = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes
CERT_GUID_VLEK: Final = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes
CERT_GUID_ASK: Final = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes
"""The ASK, or the ASVK for a VLEK."""
CERT_GUID_ARK: Final = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes


@layout(size=24)
class CertTableEntry(Struct):
    """One certificate-table entry: ``offset`` / ``length`` of a certificate in the data pages."""

    guid: bytes = raw(0x00, 16)
    offset: int = u32(0x10)
    length: int = u32(0x14)


def decode_cert_table(data: bytes | bytearray | memoryview) -> list[tuple[bytes, bytes]]:
    """(GUID, certificate) pairs of an extended-report certificate buffer.

    Entries run to an all-zero terminator; every certificate must lie inside ``data`` after the table.
    An empty buffer is an empty table.
    """
    data = bytes(data)
    if not data:
        return []
    entries: list[CertTableEntry] = []
    pos = 0
    while True:
        if pos + CertTableEntry.SIZE > len(data):
            raise LayoutError(f"certificate table: no all-zero terminator within {len(data)} bytes")
        entry = CertTableEntry.decode(data[pos : pos + CertTableEntry.SIZE])
        pos += CertTableEntry.SIZE
        if entry == CertTableEntry():
            break
        entries.append(entry)
    out = []
    for i, e in enumerate(entries):
        if e.offset < pos or e.offset + e.length > len(data):
            raise LayoutError(f"certificate table entry {i}: bytes {e.offset:#x}+{e.length:#x} outside "
                              f"the data after the {pos:#x}-byte table (buffer {len(data):#x} bytes)")
        out.append((e.guid, data[e.offset : e.offset + e.length]))
    return out


def encode_cert_table(certs: list[tuple[bytes, bytes]]) -> bytes:
    """The certificate buffer for (GUID, certificate) pairs: table, terminator, certificates."""
    table = bytearray()
    blobs = bytearray()
    start = (len(certs) + 1) * CertTableEntry.SIZE if certs else 0
    for guid, cert in certs:
        if len(guid) != 16 or guid == bytes(16):
            raise LayoutError(f"certificate table: GUID {guid.hex()} is not 16 non-zero bytes")
        table += CertTableEntry(guid, start + len(blobs), len(cert)).encode()
        blobs += cert
    if certs:
        table += CertTableEntry().encode()
    return bytes(table + blobs)
