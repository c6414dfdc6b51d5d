"""SNP_GUEST_REQUEST: the guest's encrypted messages to the firmware -- attestation reports, derived
keys, TSC information (SNP ABI 56860 "SNP_GUEST_REQUEST", "Guest Messages": the message header,
MSG_REPORT_REQ/RSP, MSG_KEY_REQ/RSP, MSG_TSC_INFO_REQ/RSP; Linux ``drivers/virt/coco/sev-guest/
sev-guest.c`` and ``include/uapi/linux/sev-guest.h`` for the guest's side; AMD-ASPFW for the page
rules).

**The command.**  GCTX_PADDR names a RUNNING guest (INVALID_GUEST / INVALID_GUEST_STATE); the three
addresses are page aligned (INVALID_PARAM) and in DRAM (INVALID_ADDRESS).  The request page must be
a Hypervisor page -- the host copied the guest's shared page into one of its own, as KVM does -- and
the response page a Firmware page the host donated for the call (INVALID_PAGE_STATE otherwise; KVM
``snp_setup_guest_buf`` / ``snp_cleanup_guest_buf`` make it one and reclaim it).  Every check is made
before anything changes: a refused command writes nothing and leaves the guest's counters alone.

**The message** (:class:`~sevemu.abi.report.SnpGuestMsgHdr`, 0x60 bytes, then the payload):
ALGO 1 (AES-256-GCM), HDR_VERSION 1, HDR_SIZE 0x60, MSG_VERSION 1, MSG_VMPCK 0..3, MSG_SIZE at most
the page, reserved bytes zero -- else INVALID_PARAM.  The key is VMPCK[MSG_VMPCK] of the guest's
secrets page; IV = MSG_SEQNO as 8 little-endian bytes then 4 zero bytes; AAD = header bytes
[0x30, 0x60); tag in AUTHTAG[0:16], AUTHTAG[16:32] zero.

**Sequence numbers** (model choice where the ABI says only that replays are refused): the firmware
keeps, per VMPCK, the sequence number of its last response (``SnpGuest.msg_count``, 0 at launch).  A
request must carry exactly that number + 1 and is answered with + 2, which becomes the new count --
what Linux's driver does on its side (request ``count + 1``, response ``request + 1``, then
``count += 2``).  Any other number (a replayed or reordered message) is INVALID_PARAM; a message
whose response number would not fit 64 bits is AEAD_OFLOW.  A tag that does not verify (forged,
tampered, wrong key) is INVALID_PARAM.  Only a successful command advances the count.

**Message types.**  The plaintext size must be the type's (REPORT_REQ 0x60, KEY_REQ 0x20 or 0x28,
TSC_INFO_REQ 0x80; INVALID_PARAM otherwise).  MSG_TYPE of a response is the request's + 1, its
MSG_VERSION the request's.  Migration-agent messages (EXPORT/IMPORT/ABSORB/VMRK) and CPUID_REQ are
not modelled: INVALID_PARAM.  A request that decrypts but asks for something the guest may not have
(a VMPL below the caller's, a GUEST_SVN or TCB above what the guest or platform has, a key the
platform lacks, reserved bits) is answered -- the sequence number is consumed -- with STATUS
INVALID_PARAM in the response payload and nothing else.

**MSG_REPORT_REQ** -> the ATTESTATION_REPORT of the version each generation produces (model choice
from real reports: Milan and Genoa version 3, Turin version 5 with the mitigation vectors zero), every
field from the platform and guest state: ID block (GUEST_SVN, FAMILY_ID, IMAGE_ID), POLICY, VMPL as
requested, CURRENT/REPORTED/COMMITTED/LAUNCH TCB, PLATFORM_INFO (SMT_EN, ECC_EN, ALIAS_CHECK_COMPLETE as
real parts report, RAPL_DIS and CIPHERTEXT_HIDING_EN from SNP_INIT_EX), SIGNER_INFO, REPORT_DATA,
MEASUREMENT, HOST_DATA, the ID and author key digests (the author's only with AUTHOR_KEY_EN),
REPORT_ID(_MA), CPUID family/model/stepping of the part, CHIP_ID (zero under MASK_CHIP_ID; Turin 8
bytes), firmware versions (ABI major.minor and the part's build; committed = current: the model has
no firmware update).  Signed (``sevemu.crypto.vcek``) by the VCEK of REPORTED_TCB; under MASK_CHIP_KEY
not signed (SIGNING_KEY 7, signature zero).  KEY_SEL (AMD-ASPFW ``snp_mcmd_guest_request`` and its
``KEY_SEL_*``): 0 the VLEK when one is loaded (SNP_VLEK_LOAD, :mod:`sevemu.firmware.snp.vlek`;
SIGNING_KEY 1), else the VCEK; 1 the VCEK; 2 the VLEK.  MASK_CHIP_KEY masks the VCEK only: a VLEK
still signs.  Answered INVALID_KEY: KEY_SEL 3, KEY_SEL 2 without a VLEK, KEY_SEL 1 for a guest whose
ID block disabled the VCEK, KEY_SEL 0 for such a guest without a VLEK.

**MSG_KEY_REQ** -> a 32-byte key (model KDF; AMD publishes none; ``docs/attestation.md``):

* root: ROOT_KEY_SELECT bit 0 = 1: the guest's VMRK; 0: the VLEK or the chip by KEY_SEL (bits 2:1,
  as for reports; AMD-ASPFW ``snp_msg_key_req_t``) -- the VLEK: its 48-byte private scalar; the
  chip: with TCB_VERSION selected, the 48-byte private scalar of the VCEK of the requested TCB (so a
  key for an older TCB is derivable by newer firmware and never the reverse, as the VCEK); without,
  HKDF-SHA-384(chip secret, salt ``sevemu snp guest key root v1``, info ``chip``).  A chip root
  under MASK_CHIP_KEY and the KEY_SEL refusals of reports answer INVALID_KEY (AMD-ASPFW);
* mix: a fixed 0x98-byte string -- ROOT_KEY_SELECT u32 (bit 0 only: KEY_SEL picks the root, it is not
  mixed), GUEST_FIELD_SELECT u64, VMPL u32, then
  GUEST_SVN u32, TCB_VERSION u64, POLICY u64, IMAGE_ID 16, FAMILY_ID 16, MEASUREMENT 48,
  LAUNCH_MIT_VECTOR u64, each the value when its select bit is set and zeros when not;
* key = HKDF-SHA-256(root, salt ``sevemu gmsg-keyreq v1``, info mix), 32 bytes.

Checks: VMPL from the caller's (the VMPCK index) to 3, GUEST_SVN not above the ID block's, TCB_VERSION
not above COMMITTED_TCB in any component, reserved bits zero, LAUNCH_MIT_VECTOR only in the 0x28-byte
form.

**MSG_TSC_INFO_REQ** -> TSC scale and offset 0 and the secrets page's TSC factor (0): the model has no
Secure TSC.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sevemu._util.units import PAGE
from sevemu.abi.commands import CommandId
from sevemu.abi.report import (
    AAD_OFFSET,
    AUTHTAG_LEN,
    MSG_HDR_SIZE,
    MSG_HDR_VERSION,
    MSG_PAYLOAD_MAX,
    REPORT_SIZE,
    AeadAlgo,
    AttestationReport,
    KeyReq,
    KeyReqMit,
    KeyRsp,
    KeySel,
    MsgType,
    ReportReq,
    ReportRsp,
    SignerInfo,
    SigningKey,
    SnpGuestMsgHdr,
    TscInfoRsp,
)
from sevemu.abi.rmp import RmpPageState
from sevemu.abi.snp import SnpGuestRequestCmd, SnpGuestState, SnpPolicy, tcb_layout
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct, layout_fields
from sevemu.crypto import vcek
from sevemu.errors import AddressError, FirmwareError, LayoutError
from sevemu.firmware.core import ANY_STATE, Firmware
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.state import SnpGuest, SnpPlatform, snp_state

__all__ = ["REPORT_VERSION", "chip_secret", "derive_guest_key", "message_iv", "report_for", "seal_message"]

REPORT_VERSION: Final = {"milan": 3, "genoa": 3, "turin": 5}
"""ATTESTATION_REPORT version per generation (module docstring)."""
_SEQ_MAX: Final = (1 << 64) - 1
_KEY_SALT: Final = b"sevemu gmsg-keyreq v1"
_ROOT_SALT: Final = b"sevemu snp guest key root v1"
_PLATFORM_INFO_BASE: Final = 0x25  # SMT_EN | ECC_EN | ALIAS_CHECK_COMPLETE, as real parts report
_HDR_RESERVED: Final = ((0x28, 0x30), (0x38, 0x3C), (0x3D, 0x60))


def message_iv(seqno: int) -> bytes:
    """The AES-GCM IV of message ``seqno``: 8 little-endian bytes, then 4 zero bytes."""
    return seqno.to_bytes(8, "little") + bytes(4)


class _Answer(Exception):
    """Raised when a decrypted request is answered with a non-zero STATUS in its payload."""

    def __init__(self, detail: str, status: Status = Status.INVALID_PARAM) -> None:
        super().__init__(detail)
        self.status = status


def _refuse(status: Status, detail: str) -> FirmwareError:
    return FirmwareError(status, detail)


def _page_aligned(name: str, addr: int) -> None:
    if addr % PAGE:
        raise _refuse(Status.INVALID_PARAM, f"{name} {addr:#x} is not page aligned")


def _open(g: SnpGuest, page: bytes) -> tuple[SnpGuestMsgHdr, bytes]:
    """The request's header and plaintext, or the command's refusal (module docstring)."""
    raw = page[:MSG_HDR_SIZE]
    for lo, hi in _HDR_RESERVED:
        if any(raw[lo:hi]):
            raise _refuse(Status.INVALID_PARAM, f"message header: reserved bytes {lo:#x}..{hi:#x} are not zero")
    if any(raw[AUTHTAG_LEN:0x20]):
        raise _refuse(Status.INVALID_PARAM, "message header: AUTHTAG bytes 16..31 are not zero")
    try:
        hdr = SnpGuestMsgHdr.decode(raw)
    except LayoutError as exc:  # pragma: no cover - every byte is a field or checked above
        raise _refuse(Status.INVALID_PARAM, f"message header: {exc}") from None
    if hdr.algo != AeadAlgo.AES_256_GCM:
        raise _refuse(Status.INVALID_PARAM, f"message ALGO {hdr.algo} is not AES-256-GCM (1)")
    if hdr.hdr_version != MSG_HDR_VERSION or hdr.hdr_size != MSG_HDR_SIZE:
        raise _refuse(Status.INVALID_PARAM, f"message header version {hdr.hdr_version} size {hdr.hdr_size:#x}")
    if hdr.msg_version != 1:
        raise _refuse(Status.INVALID_PARAM, f"MSG_VERSION {hdr.msg_version} (the firmware knows 1)")
    if hdr.msg_vmpck > 3:
        raise _refuse(Status.INVALID_PARAM, f"MSG_VMPCK {hdr.msg_vmpck} is not 0..3")
    if hdr.msg_size > MSG_PAYLOAD_MAX:
        raise _refuse(Status.INVALID_PARAM, f"MSG_SIZE {hdr.msg_size:#x} exceeds the page")
    count = g.msg_count[hdr.msg_vmpck]
    if count + 2 > _SEQ_MAX:
        raise _refuse(Status.AEAD_OFLOW, f"VMPCK{hdr.msg_vmpck}'s sequence numbers are exhausted")
    if hdr.msg_seqno != count + 1:
        raise _refuse(Status.INVALID_PARAM, f"MSG_SEQNO {hdr.msg_seqno} is not the expected {count + 1} "
                      "(a replayed or reordered message)")
    sealed = page[MSG_HDR_SIZE : MSG_HDR_SIZE + hdr.msg_size] + raw[:AUTHTAG_LEN]
    try:
        plain = AESGCM(g.vmpck[hdr.msg_vmpck]).decrypt(message_iv(hdr.msg_seqno), sealed, raw[AAD_OFFSET:])
    except InvalidTag:
        raise _refuse(Status.INVALID_PARAM, "the message does not authenticate under "
                      f"VMPCK{hdr.msg_vmpck} (forged or tampered)") from None
    return hdr, plain


def seal_message(key: bytes, hdr: SnpGuestMsgHdr, payload: bytes) -> bytes:
    """Header (with its tag) followed by the encrypted ``payload`` (module docstring)."""
    head = bytearray(hdr.encode())
    head[:0x20] = bytes(0x20)
    sealed = AESGCM(key).encrypt(message_iv(hdr.msg_seqno), payload, bytes(head[AAD_OFFSET:]))
    head[:AUTHTAG_LEN] = sealed[-AUTHTAG_LEN:]
    return bytes(head) + sealed[:-AUTHTAG_LEN]


def _fms(fw: Firmware) -> tuple[int, int, int]:
    eax = fw.profile.cpuid_fn0000_0001_eax
    base_family = (eax >> 8) & 0xF
    family = base_family + ((eax >> 20) & 0xFF if base_family == 0xF else 0)
    model = ((eax >> 16) & 0xF) << 4 | (eax >> 4) & 0xF
    return family, model, eax & 0xF


@functools.lru_cache(maxsize=16)
def _chip_id(secret: bytes, generation: str) -> bytes:
    return vcek.snp_chip_id(secret, generation)


def chip_secret(fw: Firmware) -> bytes:
    """The part's fused chip secret (HWERROR_PLATFORM when the fuses hold none)."""
    secret = fw.identity.chip_secret
    if not secret:
        raise _refuse(Status.HWERROR_PLATFORM, "the part's fuses hold no chip secret")
    return secret


def _signer(st: SnpPlatform, g: SnpGuest, key_sel: int) -> SigningKey:
    """Which key signs a report asked for with ``key_sel`` (module docstring; AMD-ASPFW)."""
    if key_sel > KeySel.VLEK:
        raise _Answer(f"KEY_SEL {key_sel} is reserved", Status.INVALID_KEY)
    vlek = st.vlek is not None
    if key_sel == KeySel.VLEK and not vlek:
        raise _Answer("KEY_SEL VLEK but no VLEK is loaded", Status.INVALID_KEY)
    if g.vcek_disabled and (key_sel == KeySel.VCEK or (key_sel == KeySel.DEFAULT and not vlek)):
        raise _Answer("the guest's ID block disables the VCEK and no VLEK is loaded", Status.INVALID_KEY)
    if key_sel == KeySel.VLEK or (key_sel == KeySel.DEFAULT and vlek):
        return SigningKey.VLEK
    return SigningKey.NONE if st.mask_chip_key else SigningKey.VCEK


def report_for(fw: Firmware, st: SnpPlatform, g: SnpGuest, report_data: bytes, vmpl: int,
               signer: SigningKey = SigningKey.VCEK) -> bytes:
    """The ATTESTATION_REPORT of guest ``g`` signed by ``signer`` (VCEK: none under MASK_CHIP_KEY;
    VLEK: the loaded one) (module docstring)."""
    gen = fw.profile.name
    version = REPORT_VERSION.get(gen, 3)
    family, model, step = _fms(fw)
    secret = chip_secret(fw)
    idb = g.id_block
    if signer == SigningKey.VCEK and st.mask_chip_key:
        signer = SigningKey.NONE
    vlek = st.vlek
    if signer == SigningKey.VLEK and vlek is None:
        raise _refuse(Status.INVALID_KEY, "no VLEK is loaded")
    info = _PLATFORM_INFO_BASE | (1 << 3 if st.rapl_dis else 0) | (1 << 4 if st.ciphertext_hiding else 0)
    major, minor = st.api
    mit = 0 if version >= 5 else None
    body = AttestationReport(
        version=version, guest_svn=idb.guest_svn if idb else 0,
        policy=SnpPolicy.decode(g.policy.to_bytes(8, "little")),
        family_id=idb.family_id if idb else bytes(16), image_id=idb.image_id if idb else bytes(16),
        vmpl=vmpl, signature_algo=1, current_tcb=st.current_tcb, platform_info=info,
        signer_info=SignerInfo(author_key_en=g.author_key_en, mask_chip_key=st.mask_chip_key,
                               signing_key=int(signer)),
        report_data=report_data, measurement=g.ld, host_data=g.host_data, id_key_digest=g.id_key_digest,
        author_key_digest=g.author_key_digest if g.author_key_en else bytes(48), report_id=g.report_id,
        report_id_ma=g.report_id_ma, reported_tcb=st.reported_tcb,
        cpuid_fam_id=family if version >= 3 else None, cpuid_mod_id=model if version >= 3 else None,
        cpuid_step=step if version >= 3 else None,
        chip_id=bytes(64) if st.mask_chip_id else _chip_id(secret, gen),
        committed_tcb=st.committed_tcb, current_build=fw.profile.build, current_minor=minor,
        current_major=major, committed_build=fw.profile.build, committed_minor=minor, committed_major=major,
        launch_tcb=g.launch_tcb, launch_mit_vector=mit, current_mit_vector=mit,
    ).encode()
    if signer == SigningKey.NONE:
        return body
    if signer == SigningKey.VLEK and vlek is not None:
        return vcek.sign_report(vlek, body)
    return vcek.sign_report(vcek.derive_vcek(secret, gen, st.reported_tcb), body)


def _report(fw: Firmware, st: SnpPlatform, g: SnpGuest, caller: int, plain: bytes) -> Struct:
    if any(plain[0x48:]):
        raise _Answer("MSG_REPORT_REQ reserved bytes are not zero")
    req = ReportReq.decode(plain)
    if not caller <= req.vmpl <= 3:
        raise _Answer(f"VMPL {req.vmpl} is not {caller}..3")
    if req.key_sel >> 2:
        raise _Answer(f"KEY_SEL word {req.key_sel:#x}: reserved bits set")
    signed = report_for(fw, st, g, req.report_data, req.vmpl, _signer(st, g, req.key_sel))
    return ReportRsp(status=0, report_size=REPORT_SIZE, report=AttestationReport.decode(signed))


def _tcb_above(gen: str, tcb: int, limit: int) -> bool:
    layout = tcb_layout(gen)
    try:
        a = layout.decode(tcb.to_bytes(8, "little"))
        b = layout.decode(limit.to_bytes(8, "little"))
    except LayoutError:
        return True
    return any(getattr(a, f.name) > getattr(b, f.name) for f in layout_fields(layout))


def derive_guest_key(fw: Firmware, g: SnpGuest, req: KeyReqMit) -> bytes:
    """The MSG_KEY_REQ key of ``req`` for guest ``g`` (the KDF of the module docstring)."""
    sel = req.guest_field_select
    rks = req.root_key_select
    vlek = snp_state(fw).vlek
    if rks.vmrk:
        root = g.vmrk
    elif vlek is not None and rks.key_sel in (KeySel.DEFAULT, KeySel.VLEK):
        root = vlek.private_numbers().private_value.to_bytes(48, "big")
    elif sel.tcb_version:
        scalar = vcek.derive_vcek(chip_secret(fw), fw.profile.name, req.tcb_version).private_numbers()
        root = scalar.private_value.to_bytes(48, "big")
    else:
        root = HKDF(hashes.SHA384(), 48, _ROOT_SALT, b"chip").derive(chip_secret(fw))
    idb = g.id_block
    mix = b"".join((
        struct.pack("<I", int(rks.vmrk)), sel.encode(), struct.pack("<I", req.vmpl),
        struct.pack("<I", req.guest_svn if sel.guest_svn else 0),
        struct.pack("<Q", req.tcb_version if sel.tcb_version else 0),
        struct.pack("<Q", g.policy if sel.policy else 0),
        (idb.image_id if idb else bytes(16)) if sel.image_id else bytes(16),
        (idb.family_id if idb else bytes(16)) if sel.family_id else bytes(16),
        g.ld if sel.measurement else bytes(48),
        struct.pack("<Q", req.launch_mit_vector if sel.launch_mit_vector else 0),
    ))
    return HKDF(hashes.SHA256(), 32, _KEY_SALT, mix).derive(root)


def _key(fw: Firmware, st: SnpPlatform, g: SnpGuest, caller: int, plain: bytes) -> Struct:
    if any(plain[4:8]) or int.from_bytes(plain[0:4], "little") & ~0x7:
        raise _Answer("ROOT_KEY_SELECT reserved bits set")
    if int.from_bytes(plain[8:16], "little") >> 7:
        raise _Answer("GUEST_FIELD_SELECT reserved bits set")
    if len(plain) == KeyReq.SIZE:
        short = KeyReq.decode(plain)
        req = KeyReqMit(short.root_key_select, short.guest_field_select, short.vmpl, short.guest_svn,
                        short.tcb_version, 0)
        if short.guest_field_select.launch_mit_vector:
            raise _Answer("LAUNCH_MIT_VECTOR selected in a 0x20-byte MSG_KEY_REQ")
    else:
        req = KeyReqMit.decode(plain)
    if not caller <= req.vmpl <= 3:
        raise _Answer(f"VMPL {req.vmpl} is not {caller}..3")
    svn = g.id_block.guest_svn if g.id_block else 0
    if req.guest_svn > svn:
        raise _Answer(f"GUEST_SVN {req.guest_svn} is above the guest's {svn}")
    if _tcb_above(fw.profile.name, req.tcb_version, st.committed_tcb):
        raise _Answer(f"TCB_VERSION {req.tcb_version:#x} is above the committed TCB {st.committed_tcb:#x}")
    if not req.root_key_select.vmrk:
        if st.mask_chip_key:  # AMD-ASPFW: the chip key is masked (the check precedes KEY_SEL's)
            raise _Answer("MASK_CHIP_KEY: no key derives from the chip", Status.INVALID_KEY)
        _signer(st, g, req.root_key_select.key_sel)
    return KeyRsp(status=0, derived_key=derive_guest_key(fw, g, req))


def _tsc(fw: Firmware, st: SnpPlatform, g: SnpGuest, caller: int, plain: bytes) -> Struct:
    if any(plain):
        raise _Answer("MSG_TSC_INFO_REQ reserved bytes are not zero")
    return TscInfoRsp(status=0, tsc_scale=0, tsc_offset=0, tsc_factor=0)


_Handler = Callable[[Firmware, SnpPlatform, SnpGuest, int, bytes], Struct]
_HANDLERS: Final[dict[int, tuple[tuple[int, ...], _Handler, Callable[[int], Struct]]]] = {
    MsgType.REPORT_REQ: ((ReportReq.SIZE,), _report, lambda status: ReportRsp(status=status, report_size=0)),
    MsgType.KEY_REQ: ((KeyReq.SIZE, KeyReqMit.SIZE), _key, lambda status: KeyRsp(status=status)),
    MsgType.TSC_INFO_REQ: ((0x80,), _tsc, lambda status: TscInfoRsp(status=status)),
}


@SNP_API.platform(CommandId.SNP_GUEST_REQUEST, SnpGuestRequestCmd, ANY_STATE)
def snp_guest_request(fw: Firmware, cmd: SnpGuestRequestCmd) -> None:
    st = snp_state(fw)
    dma = fw.ports.dma
    req_spa, _ = dma.strip(cmd.req_paddr)
    res_spa, _ = dma.strip(cmd.res_paddr)
    _page_aligned("GCTX address", cmd.gctx_paddr)
    _page_aligned("request page", req_spa)
    _page_aligned("response page", res_spa)
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    if g.state != SnpGuestState.RUNNING:
        raise _refuse(Status.INVALID_GUEST_STATE, f"guest at {g.gctx:#x} is {g.state.name}, not RUNNING")
    try:
        dma.check(req_spa, PAGE)
        dma.check(res_spa, PAGE)
    except AddressError as exc:
        raise _refuse(Status.INVALID_ADDRESS, str(exc)) from None
    if st.page_state(req_spa) != RmpPageState.HYPERVISOR:
        raise _refuse(Status.INVALID_PAGE_STATE, f"request page {req_spa:#x} is not a Hypervisor page")
    if st.page_state(res_spa) != RmpPageState.FIRMWARE:
        raise _refuse(Status.INVALID_PAGE_STATE, f"response page {res_spa:#x} is not a Firmware page")
    hdr, plain = _open(g, dma.read(req_spa, PAGE))
    entry = _HANDLERS.get(hdr.msg_type)
    if entry is None:
        raise _refuse(Status.INVALID_PARAM, f"MSG_TYPE {hdr.msg_type} is not a request the firmware serves")
    sizes, handler, refusal = entry
    if len(plain) not in sizes:
        raise _refuse(Status.INVALID_PARAM, f"{MsgType(hdr.msg_type).name} of {len(plain):#x} bytes "
                      f"(expected {' or '.join(hex(s) for s in sizes)})")
    try:
        answer = handler(fw, st, g, hdr.msg_vmpck, plain)
    except _Answer as refused:
        answer = refusal(int(refused.status))
    seq = hdr.msg_seqno + 1
    rsp_hdr = SnpGuestMsgHdr(msg_seqno=seq, msg_type=hdr.msg_type + 1, msg_version=hdr.msg_version,
                             msg_size=answer.SIZE, msg_vmpck=hdr.msg_vmpck)
    out = seal_message(g.vmpck[hdr.msg_vmpck], rsp_hdr, answer.encode())
    dma.write(res_spa, out.ljust(PAGE, b"\0"))
    g.msg_count[hdr.msg_vmpck] = seq
