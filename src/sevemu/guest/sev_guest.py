"""``/dev/sev-guest`` of an SNP guest, in Python: SNP_GET_REPORT, SNP_GET_EXT_REPORT and
SNP_GET_DERIVED_KEY as Linux's driver serves them (``drivers/virt/coco/sev-guest/sev-guest.c``,
``include/uapi/linux/sev-guest.h``; the message format is SNP ABI 56860's guest message header).

The driver owns the guest's secrets page mapping (:class:`GuestSecrets`): it encrypts with
VMPCK[``vmpck_id``] (AES-256-GCM, IV = the sequence number, AAD = header bytes 0x30..0x5F) and keeps
the sequence number where Linux keeps it, in the guest-OS area of the secrets page (``msg_seqno_N``,
u32): a request carries ``count + 1``, the response must carry ``count + 2``, after the exchange the
count grows by 2 *whatever the outcome* (the IV is never reused).  A count at ``2^32 - 1`` refuses
further requests (``-EIO``).

The host carries the message (:class:`GuestChannel`: the shared pages and the VMGEXIT; for a model
guest ``sevemu.hypervisor.guest_request.VmGuestChannel``).  As Linux, the driver trusts nothing it
answers:

* SW_EXITINFO2 ``vmm_error << 32 | fw_error``: INVALID_LEN on an extended request retries the same
  message as a plain request (so the firmware sees the sequence number) and reports ``-EIO`` with
  ``vmm_error`` 1 and the needed ``certs_len``; any other error is ``-EIO`` and **disables the key**;
* a response that is not the request's (sequence number, type, version, algorithm, sizes) or does
  not authenticate is ``-EBADMSG`` and disables the key;
* a disabled key (zeroed in the secrets page, ``snp_disable_vmpck``) answers every later ioctl with
  ``-ENOTTY`` -- a host that tampers once loses the guest its attestation until reboot, never an IV.

The ioctls take the uapi layouts: ``struct snp_report_req`` and ``struct snp_derived_key_req`` are the
firmware's MSG_REPORT_REQ and MSG_KEY_REQ (:class:`sevemu.abi.report.ReportReq` -- REPORT_DATA, VMPL,
KEY_SEL -- and :class:`sevemu.abi.report.KeyReq`), :class:`SnpExtReportReq` wraps a ``ReportReq``,
:class:`SnpGuestRequestIoctl`; :class:`SevGuestError` carries the negative errno
and the ioctl's ``fw_error`` / ``vmm_error``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevemu._util.units import PAGE
from sevemu.abi.report import (
    AAD_OFFSET,
    AUTHTAG_LEN,
    MSG_HDR_SIZE,
    MSG_HDR_VERSION,
    AeadAlgo,
    KeyReq,
    MsgType,
    ReportReq,
    SnpGuestMsgHdr,
)
from sevemu.abi.struct import Struct, layout, nested, u8, u32, u64
from sevemu.errors import SevemuError

__all__ = [
    "SEV_FW_BLOB_MAX_SIZE",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "GuestChannel",
    "GuestSecrets",
    "SevGuestDevice",
    "SevGuestError",
    "SnpExtReportReq",
    "SnpGuestRequestIoctl",
]

SEV_FW_BLOB_MAX_SIZE: Final = 0x4000
"""Linux's limit on ``certs_len`` (16 KiB)."""
SNP_GUEST_VMM_ERR_INVALID_LEN: Final = 1
SNP_REPORT_RESP_LEN: Final = 4000
"""``sizeof(struct snp_report_resp)``: what SNP_GET_REPORT copies out."""
SNP_DERIVED_KEY_RESP_LEN: Final = 64
_SECRETS_VMPCK: Final = 0x20
_SECRETS_SEQNO: Final = 0xA0
_UINT_MAX: Final = 0xFFFF_FFFF


@layout(size=0x70)
class SnpExtReportReq(Struct):
    """``struct snp_ext_report_req``: the report request, then the certificate buffer."""

    data: ReportReq = nested(0x00, ReportReq)
    certs_address: int = u64(0x60)
    certs_len: int = u32(0x68)


@layout(size=0x20)
class SnpGuestRequestIoctl(Struct):
    """``struct snp_guest_request_ioctl``: ``exitinfo2`` is ``vmm_error << 32 | fw_error``."""

    msg_version: int = u8(0x00)
    req_data: int = u64(0x08)
    resp_data: int = u64(0x10)
    exitinfo2: int = u64(0x18)


class SevGuestError(SevemuError):
    """Raised when an ioctl of :class:`SevGuestDevice` fails: ``errno`` (negative, as the ioctl
    returns it), ``fw_error`` and ``vmm_error`` as the ioctl struct reports them."""

    def __init__(self, err: int, detail: str, exitinfo2: int = 0) -> None:
        self.errno = -abs(err)
        self.exitinfo2 = exitinfo2
        self.fw_error = exitinfo2 & _UINT_MAX
        self.vmm_error = exitinfo2 >> 32
        self.certs_len = 0
        """SNP_GET_EXT_REPORT with INVALID_LEN: the certificate length the host needs."""
        name = errno.errorcode.get(abs(err), str(abs(err)))
        super().__init__(f"-{name}: {detail}")


class GuestChannel(Protocol):
    """The host's transport: the message into the shared request page, VMGEXIT (SNP Guest Request,
    or the extended one when ``ext_pages`` is not None), and back the response page, SW_EXITINFO2,
    RBX (pages the host wants) and the certificate pages."""

    def exchange(self, message: bytes, ext_pages: int | None) -> tuple[bytes, int, int, bytes]: ...


class GuestSecrets:
    """The guest's mapping of its secrets page (a mutable copy the driver owns, as Linux's
    ``ioremap`` of it): the VMPCKs and the guest-OS area's sequence numbers."""

    def __init__(self, page: bytes) -> None:
        if len(page) != PAGE:
            raise ValueError(f"a secrets page is {PAGE} bytes, not {len(page)}")
        self.page = bytearray(page)

    def vmpck(self, index: int) -> bytes:
        off = _SECRETS_VMPCK + 32 * index
        return bytes(self.page[off : off + 32])

    def disable(self, index: int) -> None:
        """``snp_disable_vmpck``: zero the key in the secrets page."""
        off = _SECRETS_VMPCK + 32 * index
        self.page[off : off + 32] = bytes(32)

    def seqno(self, index: int) -> int:
        return int.from_bytes(self.page[_SECRETS_SEQNO + 4 * index : _SECRETS_SEQNO + 4 * index + 4], "little")

    def set_seqno(self, index: int, value: int) -> None:
        self.page[_SECRETS_SEQNO + 4 * index : _SECRETS_SEQNO + 4 * index + 4] = (value & _UINT_MAX).to_bytes(4, "little")


@dataclass
class _Request:
    mtype: MsgType
    version: int
    payload: bytes
    ext_pages: int | None = None
    certs: bytes = b""


class SevGuestDevice:
    """``/dev/sev-guest`` over ``channel`` with the secrets page ``secrets`` (module docstring)."""

    def __init__(self, channel: GuestChannel, secrets: GuestSecrets, vmpck_id: int = 0) -> None:
        if not 0 <= vmpck_id <= 3:
            raise ValueError(f"vmpck_id {vmpck_id} is not 0..3")
        self.channel = channel
        self.secrets = secrets
        self.vmpck_id = vmpck_id
        self.log: list[str] = []
        """What the driver would print (``pr_alert``) when it disables the key."""

    @property
    def disabled(self) -> bool:
        return not any(self.secrets.vmpck(self.vmpck_id))

    # ---- ioctls --------------------------------------------------------------------------------
    def get_report(self, req: ReportReq, msg_version: int = 1) -> bytes:
        """SNP_GET_REPORT: the 4000-byte response (MSG_REPORT_RSP: status, size, report, zero pad)."""
        plain = self._send(_Request(MsgType.REPORT_REQ, msg_version, req.encode()))
        return plain.ljust(SNP_REPORT_RESP_LEN, b"\0")[:SNP_REPORT_RESP_LEN]

    def get_derived_key(self, req: KeyReq, msg_version: int = 1) -> bytes:
        """SNP_GET_DERIVED_KEY: the 64-byte response (MSG_KEY_RSP)."""
        plain = self._send(_Request(MsgType.KEY_REQ, msg_version, req.encode()))
        return plain.ljust(SNP_DERIVED_KEY_RESP_LEN, b"\0")[:SNP_DERIVED_KEY_RESP_LEN]

    def get_ext_report(self, req: SnpExtReportReq, msg_version: int = 1) -> tuple[bytes, bytes, int]:
        """SNP_GET_EXT_REPORT: (report response, certificate buffer of ``certs_len`` bytes, certs_len).

        ``certs_len`` must be page aligned and at most 16 KiB (``-EINVAL``); zero with a zero address
        is a plain report.  Too small: ``-EIO`` with ``vmm_error`` 1 and the length needed in
        :attr:`SevGuestError.certs_len`."""
        if req.certs_len > SEV_FW_BLOB_MAX_SIZE or req.certs_len % PAGE:
            raise SevGuestError(errno.EINVAL, f"certs_len {req.certs_len:#x} is not page aligned or above 16 KiB")
        if not req.certs_address and not req.certs_len:
            return self.get_report(req.data, msg_version), b"", 0
        r = _Request(MsgType.REPORT_REQ, msg_version, req.data.encode(), ext_pages=req.certs_len // PAGE)
        plain = self._send(r)
        certs = r.certs
        return plain.ljust(SNP_REPORT_RESP_LEN, b"\0")[:SNP_REPORT_RESP_LEN], certs, req.certs_len

    # ---- the message path (snp_send_guest_request) ------------------------------------------------
    def _send(self, r: _Request) -> bytes:
        n = self.vmpck_id
        if self.disabled:
            raise SevGuestError(errno.ENOTTY, f"VMPCK{n} is disabled")
        if not r.version:
            raise SevGuestError(errno.EINVAL, "msg_version 0")
        count = self.secrets.seqno(n) + 1
        if count >= _UINT_MAX:
            raise SevGuestError(errno.EIO, "request message sequence counter overflow")
        key = self.secrets.vmpck(n)
        hdr = SnpGuestMsgHdr(msg_seqno=count, msg_type=int(r.mtype), msg_version=r.version,
                             msg_size=len(r.payload), msg_vmpck=n)
        message = _seal(key, hdr, r.payload)
        page, info2, pages, certs = self.channel.exchange(message, r.ext_pages)
        override = needed = 0
        if r.ext_pages is not None and info2 == SNP_GUEST_VMM_ERR_INVALID_LEN << 32:
            override, needed = info2, pages  # retry as a plain request: the firmware must see this seqno
            page, info2, _, _ = self.channel.exchange(message, None)
        self.secrets.set_seqno(n, self.secrets.seqno(n) + 2)  # snp_inc_msg_seqno
        if override:
            err = SevGuestError(errno.EIO, f"certificate buffer too small: {needed * PAGE:#x} bytes needed",
                                override)
            err.certs_len = needed * PAGE
            raise err
        if info2:
            self._disable(f"Detected error from ASP request. exitinfo2: {info2:#x}")
            raise SevGuestError(errno.EIO, f"the request failed (fw_error {info2 & _UINT_MAX:#x}, vmm_error "
                                f"{info2 >> 32:#x})", info2)
        try:
            plain = _open(key, hdr, page)
        except _BadMessage as bad:
            self._disable(f"Detected unexpected decode failure from ASP: {bad}")
            raise SevGuestError(errno.EBADMSG, str(bad)) from None
        if r.ext_pages:
            r.certs = certs
        return plain

    def _disable(self, why: str) -> None:
        self.log.append(f"{why}; disabling VMPCK{self.vmpck_id}")
        self.secrets.disable(self.vmpck_id)


class _BadMessage(Exception):
    """Raised when a response is not the answer to the request (verify_and_dec_payload)."""


def _iv(seqno: int) -> bytes:
    return seqno.to_bytes(8, "little") + bytes(4)


def _seal(key: bytes, hdr: SnpGuestMsgHdr, payload: bytes) -> bytes:
    head = bytearray(hdr.encode())
    sealed = AESGCM(key).encrypt(_iv(hdr.msg_seqno), payload, bytes(head[AAD_OFFSET:]))
    head[:AUTHTAG_LEN] = sealed[-AUTHTAG_LEN:]
    return bytes(head) + sealed[:-AUTHTAG_LEN]


def _open(key: bytes, req: SnpGuestMsgHdr, page: bytes) -> bytes:
    if len(page) < MSG_HDR_SIZE:
        raise _BadMessage("short response")
    seqno, = struct.unpack_from("<Q", page, 0x20)
    algo, hver, hsize, mtype, mver, size = struct.unpack_from("<BBHBBH", page, 0x30)
    if seqno != req.msg_seqno + 1:
        raise _BadMessage(f"response sequence number {seqno}, expected {req.msg_seqno + 1}")
    if (algo, hver, hsize) != (AeadAlgo.AES_256_GCM, MSG_HDR_VERSION, MSG_HDR_SIZE):
        raise _BadMessage("response header algorithm or version")
    if mtype != req.msg_type + 1 or mver != req.msg_version:
        raise _BadMessage(f"response type {mtype} version {mver} do not answer the request")
    if size > PAGE - MSG_HDR_SIZE:
        raise _BadMessage(f"response size {size:#x}")
    try:
        return AESGCM(key).decrypt(_iv(seqno), page[MSG_HDR_SIZE : MSG_HDR_SIZE + size] + page[:AUTHTAG_LEN],
                                   page[AAD_OFFSET:MSG_HDR_SIZE])
    except InvalidTag:
        raise _BadMessage("the response does not authenticate") from None
