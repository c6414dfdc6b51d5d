"""Migration commands: SEND_START, SEND_UPDATE_DATA, SEND_FINISH, SEND_CANCEL, RECEIVE_START,
RECEIVE_UPDATE_DATA, RECEIVE_FINISH (SEV API 55766 ch. 6, SEND_* and RECEIVE_*; Linux
``arch/x86/kvm/svm/sev.c``, ``sev_send_*``; QEMU ``target/i386/sev.c``; AMD's firmware source
AMD-ASPFW ``sev_mcmd.c``, ``sev_channel.c``, ``ccp_direct_cipher.c``, "AF" below).

The source firmware opens a *trusted channel* to the target platform exactly like a guest owner opens
one to a launching platform (SEV API 55766, key derivation): ``Z = ECDH(own PDH private, target PDH public)``, fresh
TEK, TIK and nonce from the TRNG, the session buffer sealed with
:func:`sevemu.crypto.transport.seal_session` (AF ``sev_channel_open_client``: TEK, TIK, nonce, then
wrap_iv, in that order).  The target opens it with its own PDH private key and the source's PDH
(AF ``sev_channel_open_server``), as LAUNCH_START opens an owner session.  TEK and TIK live in the
guest context (``tek``/``tik``, AF ``guest->channel``) until SEND_FINISH, SEND_CANCEL or
RECEIVE_FINISH closes the channel.

Guest states (SEV API 55766 ch. 6, GSTATE; declared with each command): RUNNING -(SEND_START)-> SUPDATE -(SEND_FINISH)-> SENT, or
-(SEND_CANCEL)-> RUNNING; RECEIVE_START creates a guest in RUPDATE -(RECEIVE_FINISH)-> RUNNING.

SEND_START (checks in AF's order; every refusal leaves the guest and memory untouched)
    ======================================================================  ====================
    unknown handle                                                          INVALID_GUEST
    ``session_len`` is not 0x80 (the length query: 0x80 written back)       INVALID_LENGTH
    guest not RUNNING                                                       INVALID_GUEST_STATE
    policy NOSEND                                                           POLICY_FAILURE
    policy SEV: ``plat_certs_len`` not 0x186C, ``pdh_cert_len`` not 0x824,  INVALID_LENGTH
    ``amd_certs_len`` not the size of an ASK || ARK pair
    policy SEV: a certificate buffer outside DRAM                           INVALID_ADDRESS
    policy SEV: the target chain PDH <- PEK <- (CEK <- ASK <- ARK, OCA)     INVALID_CERTIFICATE
    does not decode, a certificate has the wrong usage/algorithm, or the    (BAD_SIGNATURE for a
    ARK is not one the firmware trusts (:meth:`PlatformChain.verify` with   signature that does
    ``fw.identity.trusted_arks``)                                           not verify)
    policy SEV: the target PEK's API version is below the policy minimum    POLICY_FAILURE
    policy DOMAIN: OCA self-signed, PEK <- OCA, PDH <- PEK (same lengths     as for SEV
    and statuses as above)
    policy DOMAIN: the target OCA is not byte-for-byte this platform's      POLICY_FAILURE
    target PDH: length, address; body not a P-384 ECDH_SHA256 PDH key       INVALID_LENGTH /
                                                                            INVALID_ADDRESS /
                                                                            INVALID_CERTIFICATE
    session buffer outside DRAM                                             INVALID_ADDRESS
    ======================================================================  ====================

    Like AF, a policy with neither SEV nor DOMAIN lets the guest go to any PDH: the certificate
    chain is not looked at (the guest owner chose not to restrict the target).  The API minimum is
    checked against the target PEK only under SEV, where the PEK is AMD-certified (AF).
    Output: the session buffer and ``policy`` (the guest's policy, for RECEIVE_START).

SEND_UPDATE_DATA (SUPDATE)
    ``hdr_len`` below 0x34: INVALID_LENGTH with 0x34 written back (the length query; AF checks it
    before the handle).  Then INVALID_GUEST, INVALID_GUEST_STATE, INACTIVE (the guest's key must be
    in the memory controller); ``guest_len`` zero, above one 4 KiB page, not a multiple of the
    granule (16 bytes; 64 on AES-XTS generations), ``trans_len`` zero or below ``guest_len``:
    INVALID_LENGTH; ``guest_paddr`` (C-bit stripped) not granule-aligned: INVALID_ADDRESS; the
    region crossing a 4 KiB boundary: INVALID_LENGTH; header, TRANS or guest region outside DRAM:
    INVALID_ADDRESS.
    One page per call and no page crossing is KVM's contract (``sev_send_update_data``), made a
    firmware rule here (model choice; AF itself accepts up to its 20 KiB scratch buffer).

    The plaintext is read from DRAM through the PSP's encrypted path with the guest's key -- *not*
    coherent with the caches: the guest's dirty lines must have been written back first (the
    hypervisor does WBINVD before sending, and does not run the guest while it sends).
    ``TRANS = AES-128-CTR(TEK, IV)(plaintext)`` with a fresh 16-byte IV from the TRNG (the commands of
    one ring-buffer doorbell draw their IVs in one TRNG read, 16 bytes of it for each), and::

        MAC = HMAC-SHA256(TIK, 0x02 || le32(FLAGS) || IV || le32(GUEST_LEN) || le32(TRANS_LEN) || TRANS)

    From AF: ``send_receive_update_aad`` is the channel
    context byte ``SEV_CHANNEL_CTX_DATA`` (0x02; LAUNCH_SECRET uses 0x01, MEASURE 0x04), the header
    flags, the IV, the uncompressed size and the TRANS size, and ``aesctr_hmac256_encrypt`` MACs
    that AAD followed by the ciphertext (encrypt-then-MAC).  There is no MEASURE term: a migration
    has none.  AF sets ``trans_len = guest_len`` (no compression), writes TRANS (``guest_len``
    bytes) and the header (flags 0), and writes ``hdr_len`` = 0x34 back.

RECEIVE_START
    AF's order: ``session_len`` not 0x80 INVALID_LENGTH; session outside DRAM INVALID_ADDRESS;
    ``pdh_cert_len`` not 0x824 INVALID_LENGTH; source PDH outside DRAM INVALID_ADDRESS; its body not
    a P-384 ECDH_SHA256 PDH INVALID_CERTIFICATE; wrap_mac or policy_mac wrong BAD_MEASUREMENT (AF's
    ``hmac_sha256_verify``); policy minimum API above this firmware's or reserved bits POLICY_FAILURE;
    key sharing with a non-zero ``handle``: INVALID_GUEST for an unknown one, POLICY_FAILURE unless
    both policies are identical and without NOKS; policy ES on a platform without SEV-ES
    UNSUPPORTED.  Then a new guest context in RUPDATE with a fresh VEK from the TRNG (or the shared
    guest's) and the channel's TEK/TIK; the platform becomes WORKING; the new handle is written back.

RECEIVE_UPDATE_DATA (RUPDATE)
    INVALID_GUEST, INVALID_GUEST_STATE, INACTIVE (ACTIVATE the new guest first, as for
    LAUNCH_UPDATE_DATA); ``trans_len`` zero or above a page, ``guest_len`` different from
    ``trans_len``, not a granule multiple, or ``hdr_len`` below 0x34: INVALID_LENGTH; ``guest_paddr``
    not granule-aligned: INVALID_ADDRESS; the region crossing a page: INVALID_LENGTH; any buffer
    outside DRAM: INVALID_ADDRESS;
    header flag COMPRESSED: UNSUPPORTED (AF supports no compression and checks the flag first);
    MAC mismatch (tampered header, TRANS, lengths, or another channel's TIK): BAD_MEASUREMENT.
    The plaintext is then written into the guest's memory encrypted with the guest's (new) key,
    after the host's cached copies of the region are written back and dropped (AF's "CSF-698" dummy
    reads), so a dirty host line cannot later overwrite it.

SEND_UPDATE_VMSA / RECEIVE_UPDATE_VMSA
    The same packets for an SEV-ES guest's VMSA page (AF: the same code path, the same channel
    context byte 0x02), after the DATA checks' state check: a guest that is not SEV-ES answers
    UNSUPPORTED.  SEND_UPDATE_VMSA checks the page before it seals it (AF ``sev_es_validate_vmsa``:
    the guest has VMSAs, the page names one of its TMR checksum blocks and matches the checksum;
    INVALID_PARAM otherwise), so a VMSA the host altered does not leave.  RECEIVE_UPDATE_VMSA, after
    the MAC, sets the page up on the target like LAUNCH_UPDATE_VMSA (a new checksum block; a page
    shorter than 4 KiB INVALID_LENGTH, no free block RESOURCE_LIMIT): :mod:`sevemu.firmware.sev.es`.

SEND_FINISH (SUPDATE -> SENT), SEND_CANCEL (SUPDATE -> RUNNING), RECEIVE_FINISH (RUPDATE -> RUNNING)
    INVALID_GUEST / INVALID_GUEST_STATE; each closes the channel (TEK/TIK forgotten).

The platform keys come from ``fw.identity`` (:class:`~sevemu.firmware.identity.PlatformIdentity`:
``pdh_key``, ``oca_cert``, ``trusted_arks``); an unprovisioned part answers SEND_START and
RECEIVE_START with HWERROR_PLATFORM (:attr:`Firmware.identity`).
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import struct
import threading
from dataclasses import replace
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from sevemu._util.units import LINE, PAGE
from sevemu.abi.certs import AMD_CERT_HEADER_SIZE, SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy, api_major, api_minor
from sevemu.abi.sev import (
    HandleCmd,
    HdrBuf,
    HdrFlags,
    ReceiveStartCmd,
    SendStartCmd,
    SessionBuf,
    TransportCmd,
)
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.abi.struct import field_span
from sevemu.certs.amd import MODULUS_SIZES
from sevemu.certs.chain import PlatformChain, SevCertChain
from sevemu.certs.errors import CertSignatureError, ChainError, UntrustedRootError
from sevemu.certs.sev import SevCert
from sevemu.crypto.ecc import ecdh
from sevemu.crypto.transport import (
    IV_SIZE,
    KEY_SIZE,
    NONCE_SIZE,
    PacketCrypto,
    TransportKeys,
    seal_session,
)
from sevemu.errors import AddressError, FirmwareError, InputError, LayoutError
from sevemu.firmware.checks import check_range, host_region, need_active, read_host
from sevemu.firmware.core import READY, Firmware, QueuedBuffers, Reply
from sevemu.firmware.gctx import CLOSED_KEY, GuestContext
from sevemu.firmware.guestmem import evict_host_lines, read_guest, write_guest
from sevemu.firmware.sev.api import SEV_API
from sevemu.firmware.sev.es import check_vmsa, need_es, set_up_vmsa, vmsa_room
from sevemu.firmware.sev.guest import create_guest
from sevemu.firmware.sev.session import godh_public_key, open_channel
from sevemu.hw import columns

__all__ = [
    "AMD_CERTS_LENGTHS",
    "DATA_CONTEXT",
    "DATA_PACKET_AAD",
    "MAX_PACKET",
    "data_packet_mac",
    "open_data_packet",
    "seal_data_packet",
]

MAX_PACKET: Final = PAGE
"""Largest ``guest_len`` of one SEND/RECEIVE_UPDATE_DATA (one page, KVM's contract)."""
DATA_CONTEXT: Final = 0x02
"""Channel context byte of SEND/RECEIVE_UPDATE_DATA MACs (AF ``SEV_CHANNEL_CTX_DATA``)."""
DATA_PACKET_AAD: Final = struct.Struct("<BI16sII")
"""The terms a data packet's MAC covers before TRANS: context byte, flags, IV, GUEST_LEN, TRANS_LEN (AF
``send_receive_update_aad`` without its 3 pad bytes)."""
_AAD: Final = DATA_PACKET_AAD
_SCRATCH: Final = threading.local()  # the PSP's working buffers of a batch, per thread (_scratch)


def _amd_certs_lengths() -> frozenset[int]:
    signed = {AMD_CERT_HEADER_SIZE + 3 * bits // 8 for bits in MODULUS_SIZES}  # header, exponent, modulus, sig
    unsigned = {AMD_CERT_HEADER_SIZE + 2 * bits // 8 for bits in MODULUS_SIZES}
    return frozenset(ask + ark for ask in signed for ark in signed | unsigned)


AMD_CERTS_LENGTHS: Final = _amd_certs_lengths()
"""Valid ``amd_certs_len`` values: a signed ASK followed by an ARK (signed, or AMD's signature-less
Naples form), each RSA-2048 or RSA-4096 (SEV API 55766 appendix, AMD root/signing key format)."""


# ---- the data packet (AF send_receive_update_aad + aesctr_hmac256_*) ----------------------------


def _aad(flags: int, iv: bytes, guest_len: int, trans_len: int) -> bytes:
    return _AAD.pack(DATA_CONTEXT, flags, bytes(iv), guest_len, trans_len)


def data_packet_mac(tik: bytes, *, flags: int, iv: bytes, guest_len: int, trans: bytes) -> bytes:
    """HMAC-SHA256(TIK, 0x02 || le32(flags) || iv || le32(guest_len) || le32(len(trans)) || trans)."""
    if len(iv) != IV_SIZE or len(tik) != KEY_SIZE:
        raise InputError(f"packet IV and TIK must be {IV_SIZE} bytes, got {len(iv)} and {len(tik)}")
    mac = hmac.new(bytes(tik), _aad(flags, iv, guest_len, len(trans)), hashlib.sha256)
    mac.update(trans)
    return mac.digest()


def _crypto(keys: TransportKeys | PacketCrypto) -> PacketCrypto:
    return keys if isinstance(keys, PacketCrypto) else PacketCrypto(keys.tek, keys.tik)


def seal_data_packet(keys: TransportKeys | PacketCrypto, plaintext: bytes, iv: bytes,
                     flags: int = 0) -> tuple[HdrBuf, bytes]:
    """(header, TRANS) of one SEND_UPDATE_DATA packet."""
    pc = _crypto(keys)
    trans = pc.ctr(iv, plaintext)
    mac = pc.mac(_aad(flags, iv, len(plaintext), len(trans)), trans)
    return HdrBuf(flags=flags, iv=bytes(iv), mac=mac), trans


def open_data_packet(keys: TransportKeys | PacketCrypto, hdr: HdrBuf, trans: bytes, guest_len: int) -> bytes:
    """Verify the MAC of a RECEIVE_UPDATE_DATA packet (BAD_MEASUREMENT) and decrypt TRANS."""
    pc = _crypto(keys)
    expected = pc.mac(_aad(hdr.flags, hdr.iv, guest_len, len(trans)), trans)
    if not hmac.compare_digest(expected, hdr.mac):
        raise FirmwareError(Status.BAD_MEASUREMENT, "packet MAC does not verify")
    return pc.ctr(hdr.iv, trans)


def _channel(g: GuestContext) -> PacketCrypto:
    """The guest's channel contexts (keyed by SEND_START / RECEIVE_START; made here only for a
    context that has none)."""
    pc = g.packets
    if pc is None or not pc.keyed(g.tek, g.tik):
        pc = g.packets = PacketCrypto(g.tek, g.tik)
    return pc


# ---- helpers ------------------------------------------------------------------------------------


def _chain_status(exc: ChainError) -> Status:
    """AF: malformed or misused certificates are INVALID_CERTIFICATE (also an untrusted ARK, whose
    key id or fused hash does not match); a signature that does not verify is BAD_SIGNATURE."""
    if isinstance(exc, UntrustedRootError) or "<-" not in exc.link:
        return Status.INVALID_CERTIFICATE
    return Status.BAD_SIGNATURE


class _TargetCerts:
    """The target's certificates as SEND_START reads them, fetched once, on first need."""

    def __init__(self, fw: Firmware, cmd: SendStartCmd) -> None:
        self._fw = fw
        self._cmd = cmd
        self._pdh: bytes | None = None
        self._chain: SevCertChain | None = None

    def pdh_raw(self) -> bytes:
        if self._pdh is None:
            if self._cmd.pdh_cert_len != SEV_CERT_SIZE:
                raise FirmwareError(Status.INVALID_LENGTH, f"target PDH is {SEV_CERT_SIZE:#x} bytes, "
                                                           f"not {self._cmd.pdh_cert_len:#x}")
            self._pdh = read_host(self._fw, self._cmd.pdh_cert_paddr, SEV_CERT_SIZE)
        return self._pdh

    def _check_sev_lengths(self) -> None:
        cmd = self._cmd
        if cmd.plat_certs_len != SEV_CERT_CHAIN_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH, f"PEK || OCA || CEK is {SEV_CERT_CHAIN_SIZE:#x} "
                                                       f"bytes, not {cmd.plat_certs_len:#x}")
        if cmd.pdh_cert_len != SEV_CERT_SIZE:
            raise FirmwareError(Status.INVALID_LENGTH, f"target PDH is {SEV_CERT_SIZE:#x} bytes")

    def full_chain(self) -> PlatformChain:
        """PDH, PEK, OCA, CEK, ASK, ARK decoded (lengths first, as AF ``validate_platform``)."""
        cmd = self._cmd
        self._check_sev_lengths()
        if cmd.amd_certs_len not in AMD_CERTS_LENGTHS:
            raise FirmwareError(Status.INVALID_LENGTH, f"amd_certs_len {cmd.amd_certs_len:#x} is not "
                                                       "the size of an ASK || ARK pair")
        certs = read_host(self._fw, cmd.plat_certs_paddr, SEV_CERT_CHAIN_SIZE)
        pdh = self.pdh_raw()
        amd = read_host(self._fw, cmd.amd_certs_paddr, cmd.amd_certs_len)
        try:
            chain = PlatformChain.from_buffers(pdh, certs, amd)
        except InputError as exc:
            raise FirmwareError(Status.INVALID_CERTIFICATE, f"target chain: {exc}") from None
        self._chain = chain.cert_chain
        return chain

    def sev_chain(self) -> tuple[SevCert, SevCertChain]:
        """The target PDH and PEK || OCA || CEK decoded (AF ``validate_domain``)."""
        if self._chain is None:
            self._check_sev_lengths()
            certs = read_host(self._fw, self._cmd.plat_certs_paddr, SEV_CERT_CHAIN_SIZE)
            try:
                self._chain = SevCertChain.decode(certs)
            except InputError as exc:
                raise FirmwareError(Status.INVALID_CERTIFICATE, f"target chain: {exc}") from None
        try:
            pdh = SevCert.decode(self.pdh_raw())
        except InputError as exc:
            raise FirmwareError(Status.INVALID_CERTIFICATE, f"target PDH: {exc}") from None
        return pdh, self._chain


def _check_sev_target(fw: Firmware, g: GuestContext, target: _TargetCerts) -> None:
    """Policy SEV: the whole chain verifies to a trusted ARK; the PEK meets the API minimum."""
    chain = target.full_chain()
    try:
        chain.verify(fw.identity.trusted_arks)
    except ChainError as exc:
        raise FirmwareError(_chain_status(exc), f"target chain: {exc}") from None
    want = (api_major(g.policy), api_minor(g.policy))
    if (chain.pek.api_major, chain.pek.api_minor) < want:
        raise FirmwareError(Status.POLICY_FAILURE, f"target firmware API {chain.pek.api_major}."
                                                   f"{chain.pek.api_minor} is below the policy's "
                                                   f"{want[0]}.{want[1]}")


def _check_domain_target(fw: Firmware, target: _TargetCerts) -> None:
    """Policy DOMAIN: OCA -> PEK -> PDH verify and the OCA is this platform's own."""
    pdh, chain = target.sev_chain()
    links = (
        ("OCA", chain.oca, KeyUsage.OCA, "OCA", chain.oca),
        ("PEK", chain.pek, KeyUsage.PEK, "OCA", chain.oca),
        ("PDH", pdh, KeyUsage.PDH, "PEK", chain.pek),
    )
    for name, cert, usage, signer_name, signer in links:
        if cert.usage != usage:
            raise FirmwareError(Status.INVALID_CERTIFICATE, f"target {name} has usage {cert.usage.name}")
        try:
            cert.verify(signer)
        except CertSignatureError as exc:
            raise FirmwareError(Status.BAD_SIGNATURE, f"target {name} <- {signer_name}: {exc}") from None
    if chain.oca.encode() != fw.identity.oca_cert.encode():
        raise FirmwareError(Status.POLICY_FAILURE, "target OCA differs from this platform's (DOMAIN)")


def _transport_region(fw: Firmware, cmd: TransportCmd, length: int) -> int:
    """SPA of the guest region of a SEND/RECEIVE_UPDATE_DATA (lengths checked by the caller)."""
    dma = fw.ports.dma
    spa, _ = dma.strip(cmd.guest_paddr)
    gran = fw.granule()
    if length == 0 or length > MAX_PACKET or length % gran:
        raise FirmwareError(Status.INVALID_LENGTH, f"guest_len {length:#x}: a non-zero multiple of {gran} "
                                                   f"up to {MAX_PACKET:#x} is needed")
    if spa % gran:
        raise FirmwareError(Status.INVALID_ADDRESS, f"guest_paddr {spa:#x} is not {gran}-byte aligned")
    if (spa % PAGE) + length > PAGE:
        raise FirmwareError(Status.INVALID_LENGTH, f"guest region {spa:#x}+{length:#x} crosses a page")
    return spa


# ---- SEND ---------------------------------------------------------------------------------------


_RUNNING: Final = frozenset({GuestState.RUNNING})
_SUPDATE: Final = frozenset({GuestState.SUPDATE})
_RUPDATE: Final = frozenset({GuestState.RUPDATE})


def _session_length_query(fw: Firmware, cmd: SendStartCmd, g: GuestContext) -> None:
    """AF answers a wrong ``session_len`` (the length query) before it looks at the guest state."""
    if cmd.session_len != SessionBuf.SIZE:
        raise Reply(Status.INVALID_LENGTH, replace(cmd, session_len=SessionBuf.SIZE))


@SEV_API.guest(CommandId.SEND_START, SendStartCmd, READY, _RUNNING, before_state=(_session_length_query,))
def send_start(fw: Firmware, cmd: SendStartCmd, g: GuestContext) -> SendStartCmd:
    if g.policy & GuestPolicy.NOSEND:
        raise FirmwareError(Status.POLICY_FAILURE, f"guest {g.handle} may not be sent (NOSEND)")
    target = _TargetCerts(fw, cmd)
    if g.policy & GuestPolicy.SEV:
        _check_sev_target(fw, g, target)
    if g.policy & GuestPolicy.DOMAIN:
        _check_domain_target(fw, target)
    peer = godh_public_key(target.pdh_raw())
    session_spa = host_region(fw, cmd.session_paddr, SessionBuf.SIZE)
    z = ecdh(fw.identity.pdh_key, peer)
    trng = fw.ports.trng
    keys = TransportKeys(tek=trng(KEY_SIZE), tik=trng(KEY_SIZE))
    nonce = trng(NONCE_SIZE)
    session = seal_session(z, nonce, trng(IV_SIZE), keys, g.policy)
    fw.ports.dma.write(session_spa, session.encode())
    g.tek, g.tik = keys.tek, keys.tik
    g.packets = PacketCrypto(keys.tek, keys.tik)
    g.state = GuestState.SUPDATE
    return replace(cmd, policy=g.policy)


def _hdr_length_query(fw: Firmware, cmd: TransportCmd) -> None:
    """AF answers a short ``hdr_len`` (the length query) before it looks at the handle."""
    if cmd.hdr_len < HdrBuf.SIZE:
        raise Reply(Status.INVALID_LENGTH, replace(cmd, hdr_len=HdrBuf.SIZE))


def _send_update(fw: Firmware, cmd: TransportCmd, g: GuestContext, vmsa: bool) -> TransportCmd | None:
    if vmsa:
        need_es(g)
    need_active(g)
    n = cmd.guest_len
    if cmd.trans_len == 0 or cmd.trans_len < n:
        raise FirmwareError(Status.INVALID_LENGTH, f"trans_len {cmd.trans_len:#x} is below guest_len {n:#x}")
    spa = _transport_region(fw, cmd, n)
    dma = fw.ports.dma
    check_range(fw, spa, n)
    hdr_spa = host_region(fw, cmd.hdr_paddr, HdrBuf.SIZE)
    trans_spa = host_region(fw, cmd.trans_paddr, n)
    plaintext = read_guest(fw, g, spa, n)
    if vmsa:
        check_vmsa(fw, g, plaintext)
    hdr, trans = seal_data_packet(_channel(g), plaintext, fw.ports.trng(IV_SIZE))
    dma.write(trans_spa, trans)
    dma.write(hdr_spa, hdr.encode())
    # AF writes hdr_len back; a buffer that already says 0x34 needs no write
    return None if cmd.hdr_len == HdrBuf.SIZE else replace(cmd, hdr_len=HdrBuf.SIZE)


@SEV_API.guest(CommandId.SEND_UPDATE_DATA, TransportCmd, READY, _SUPDATE, before_guest=(_hdr_length_query,))
def send_update_data(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> TransportCmd | None:
    return _send_update(fw, cmd, g, vmsa=False)


class _Spans:
    """Disjoint byte ranges, kept sorted: what a batch has written (or will write) so far."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def hits(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self._starts, lo)
        return (i > 0 and self._ends[i - 1] > lo) or (i < len(self._starts) and self._starts[i] < hi)

    def add(self, lo: int, hi: int) -> None:
        i = bisect.bisect_right(self._starts, lo)
        self._starts.insert(i, lo)
        self._ends.insert(i, hi)


def _batchable(plan: _Spans, reads: list[tuple[int, int]], writes: list[tuple[int, int]]) -> bool:
    """Whether a command with these input and output ranges joins a batch whose earlier commands
    write ``plan``: run one by one, it would read nothing they write, and its writes would not land
    on theirs -- so reading everything first and writing everything after gives the same memory."""
    if any(plan.hits(lo, hi) for lo, hi in reads) or any(plan.hits(lo, hi) for lo, hi in writes):
        return False
    if len(writes) == 2 and writes[0][0] < writes[1][1] and writes[1][0] < writes[0][1]:
        return False  # its own header and TRANS overlap: one by one keeps their order
    for lo, hi in writes:
        plan.add(lo, hi)
    return True


def _batch_guest(fw: Firmware, cmd: TransportCmd, states: frozenset[GuestState],
                 g: GuestContext | None) -> GuestContext | None:
    """The command's guest if it exists, is in ``states`` and is the batch's guest so far."""
    ctx = fw.guests.get(cmd.handle)
    if ctx is None or ctx.state not in states or (g is not None and ctx is not g):
        return None
    return ctx


def _regions(fw: Firmware, cmd: TransportCmd, g: GuestContext, n: int) -> tuple[int, int, int] | None:
    """(guest SPA, header SPA, TRANS SPA) of a SEND/RECEIVE_UPDATE_DATA whose activation and region
    checks all pass (the checks of :func:`_send_update` / :func:`_receive_update`); None otherwise."""
    try:
        need_active(g)
        spa = _transport_region(fw, cmd, n)
        check_range(fw, spa, n)
        return spa, host_region(fw, cmd.hdr_paddr, HdrBuf.SIZE), host_region(fw, cmd.trans_paddr, n)
    except FirmwareError:
        return None


def _read_all(fw: Firmware, ranges: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (SPA, length) through the PSP's coherent unencrypted path, in one read
    where they lie packed together (reads change nothing: the same bytes as one by one)."""
    if not ranges:
        return []
    dma = fw.ports.dma
    lo = min(spa for spa, _ in ranges)
    hi = max(spa + n for spa, n in ranges)
    if hi - lo > 2 * sum(n for _, n in ranges):
        return [dma.read(spa, n) for spa, n in ranges]
    span = dma.read(lo, hi - lo)
    return [span[spa - lo : spa - lo + n] for spa, n in ranges]


def _read_guest_all(fw: Firmware, g: GuestContext, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Guest memory of each (SPA, length), physically consecutive line-aligned ranges decrypted in
    one bulk call (the same bytes as :func:`read_guest` one by one)."""
    out: list[bytes] = []
    i = 0
    while i < len(ranges):
        j = i + 1
        spa, n = ranges[i]
        end = spa + n
        while j < len(ranges) and ranges[j][0] == end and not end % LINE and not ranges[j][1] % LINE \
                and not spa % LINE:
            end += ranges[j][1]
            j += 1
        data = read_guest(fw, g, spa, end - spa)
        pos = 0
        for _, m in ranges[i:j]:
            out.append(data[pos : pos + m])
            pos += m
        i = j
    return out


def _write_runs(fw: Firmware, pieces: list[tuple[int, bytes]]) -> None:
    """Write each (SPA, bytes) through the PSP's unencrypted path, neighbours closer than a line
    in one write (the bytes between them read back first: the same memory as writing one by one)."""
    dma = fw.ports.dma
    pieces.sort()
    i = 0
    while i < len(pieces):
        j = i + 1
        end = pieces[i][0] + len(pieces[i][1])
        while j < len(pieces) and pieces[j][0] - end < LINE:
            end = max(end, pieces[j][0] + len(pieces[j][1]))
            j += 1
        lo = pieces[i][0]
        if j == i + 1:
            dma.write(lo, pieces[i][1])
        else:
            run = bytearray(dma.read(lo, end - lo))
            for spa, data in pieces[i:j]:
                run[spa - lo : spa - lo + len(data)] = data
            dma.write(lo, bytes(run))
        i = j


@SEV_API.batch(CommandId.SEND_UPDATE_DATA)
def send_update_batch(fw: Firmware, items: QueuedBuffers) -> int:
    """SEND_UPDATE_DATA of queued commands at once (ring-buffer mode): the prefix of commands on
    one guest that pass every check of :func:`_send_update` and whose buffers keep clear of the
    others' outputs (:func:`_batchable`) -- all of them at once when they are whole pages
    (:func:`_whole_pages`) --; the plaintexts read, the IVs drawn in command order, each packet
    sealed with its own IV and MAC (:meth:`PacketCrypto.seal_many`), the outputs written in runs."""
    whole = _whole_pages(fw, items, send=True)
    if whole is not None:
        _seal_pages(fw, whole)
        return len(items)
    g: GuestContext | None = None
    plan = _Spans()
    todo: list[tuple[int, int, int, int]] = []  # (guest SPA, length, hdr SPA, TRANS SPA)
    for cspa, cmd in items.decoded():
        if not isinstance(cmd, TransportCmd) or cmd.hdr_len != HdrBuf.SIZE:
            break  # a length query or a header length to write back: one by one
        n = cmd.guest_len
        ctx = _batch_guest(fw, cmd, _SUPDATE, g)
        regions = None if ctx is None or cmd.trans_len == 0 or cmd.trans_len < n else _regions(fw, cmd, ctx, n)
        if ctx is None or regions is None:
            break
        spa, hdr_spa, trans_spa = regions
        if not _batchable(plan, [(cspa, cspa + TransportCmd.SIZE), (spa, spa + n)],
                          [(trans_spa, trans_spa + n), (hdr_spa, hdr_spa + HdrBuf.SIZE)]):
            break
        g = ctx
        todo.append((spa, n, hdr_spa, trans_spa))
    if g is None or not todo:
        return 0
    pc = _channel(g)
    plaintexts = _read_guest_all(fw, g, [(spa, n) for spa, n, _, _ in todo])
    drawn = fw.ports.trng(IV_SIZE * len(todo))  # one draw for the batch, a distinct IV per packet
    ivs = [drawn[i : i + IV_SIZE] for i in range(0, len(drawn), IV_SIZE)]
    pieces: list[tuple[int, bytes]] = []
    headers: list[tuple[int, bytes]] = []
    for (_, n, hdr_spa, trans_spa), iv, plain in zip(todo, ivs, plaintexts, strict=True):
        trans, mac = pc.seal_many(iv, _aad(0, iv, n, n), plain, n)
        pieces.append((trans_spa, bytes(trans)))
        headers.append((hdr_spa, HdrBuf(flags=0, iv=iv, mac=bytes(mac)).encode()))
    _write_runs(fw, pieces)
    _write_runs(fw, headers)
    return len(todo)


# ---- whole-page batches: the checks of a ring-buffer batch on all its commands at once ----------
# Columns of the commands' fields (read from the buffers' bytes, in _COLUMNS' order), then the
# SPAs (C-bit stripped) of the header, guest page and TRANS.
_HANDLE, _HDR_LEN, _GUEST_LEN, _TRANS_LEN, _HDR, _GUEST, _TRANS = 0, 2, 4, 6, 7, 8, 9
_COLUMNS: Final = ("handle", "hdr_paddr", "hdr_len", "guest_paddr", "guest_len", "trans_paddr", "trans_len")
_U64 = npt.NDArray[np.uint64]


def _cmd_words() -> tuple[int, tuple[int, ...], npt.NDArray[np.uint64]]:
    """TransportCmd read as little-endian u64 words (each buffer zero-padded to whole words): how
    many words, the word of each of ``_COLUMNS``, and per word the mask of its reserved bytes.  Each
    column starts a word of its own and the rest of that word is reserved (or padding), so once
    the reserved bytes are found zero each column *is* its word (:func:`_whole_pages`)."""
    count = -(-TransportCmd.SIZE // 8)
    covered: set[int] = set()
    words: list[int] = []
    for name in _COLUMNS:
        offset, size = field_span(TransportCmd, name)
        if offset % 8 or size not in (4, 8) or offset // 8 in words:
            raise LayoutError(f"TransportCmd.{name} at {offset:#x} does not start a word of its own")
        words.append(offset // 8)
        covered.update(range(offset, offset + size))
    mask = bytes(0 if i in covered else 0xFF for i in range(TransportCmd.SIZE)) + bytes(8 * count - TransportCmd.SIZE)
    return count, tuple(words), np.frombuffer(mask, dtype="<u8").astype(np.uint64)


_CMD_WORDS, _COLUMN_WORDS, _RESERVED_MASK = _cmd_words()


def _cmd_columns(raw: bytes, n: int, strip: int | None = None) -> _U64 | None:
    """The ``_COLUMNS`` fields of ``n`` TransportCmd buffers back to back in ``raw``, as the rows of
    a ``(7, n)`` array (the values :meth:`TransportCmd.decode` gives) -- with ``strip`` (a mask),
    three more rows: the header, guest and TRANS addresses ANDed with it (``_HDR``, ``_GUEST``,
    ``_TRANS``); None when a buffer has a reserved byte set (it does not decode).  One pass over the
    buffers (:func:`sevemu.hw.columns.record_words`)."""
    if len(raw) != n * TransportCmd.SIZE:
        raise LayoutError(f"{len(raw)} bytes are not {n} TransportCmd buffers")
    picks, ands = _COLUMN_WORDS, (_ALL_BITS,) * len(_COLUMN_WORDS)
    if strip is not None:  # (hdr_paddr, guest_paddr, trans_paddr again, stripped)
        picks, ands = picks + picks[1:6:2], ands + (strip & _ALL_BITS,) * 3
    return columns.record_words(raw, TransportCmd.SIZE, _RESERVED_MASK, picks, ands)


_ALL_BITS: Final = 0xFFFF_FFFF_FFFF_FFFF
_AAD_DTYPE: Final = np.dtype([("context", "u1"), ("flags", "<u4"), ("iv", "V16"), ("guest_len", "<u4"),
                              ("trans_len", "<u4")])
_HDR_DTYPE: Final = np.dtype([("flags", "<u4"), ("iv", "V16"), ("mac", "V32")])


def _snp_on(fw: Firmware) -> bool:
    rmp = fw.ports.rmp
    return rmp is not None and rmp.rmp.enabled


class _Whole(NamedTuple):
    """A whole-page batch that :func:`_whole_pages` let through: its guest, the guest page, header
    and TRANS SPAs of its commands, and what its checks found about them on the way."""

    g: GuestContext
    guest: _U64
    hdrs: _U64
    trans: _U64
    hdr_stride: int
    """The headers' common spacing (ascending, at least a header apart), else 0 (:func:`_even`)."""
    trans_aligned: bool
    """Whether every TRANS is page-aligned."""


def _whole_pages(fw: Firmware, items: QueuedBuffers, send: bool) -> _Whole | None:
    """The batch of SEND (``send``) or RECEIVE_UPDATE_DATA commands, when they may all run at once:
    every buffer decodes, each names the same activated guest in the
    command's state, moves one whole 4 KiB page at a page-aligned guest address (SEND: ``hdr_len``
    exactly 0x34, ``trans_len`` at least a page; RECEIVE: ``trans_len`` a page, ``hdr_len`` at least
    0x34) with every region in DRAM, outside the TMR and the ring buffer's pages (SNP off), and no
    command's output overlaps any command's output or input (the commands' buffers included) -- so
    each passes every check of :func:`_send_update` / :func:`_receive_update` and running them
    together has the effects of running them one by one (the MACs of a RECEIVE batch are checked
    after: :func:`_open_pages`).  None when any of that does not hold: the batch then goes command
    by command.  The per-command work is two passes over the buffers' bytes
    (:func:`_cmd_columns`, :func:`sevemu.hw.columns.stats`: each column's bounds, OR of its bits,
    spacing and order); the checks are then on those numbers."""
    n = len(items)
    if n < 2 or items.layout is not TransportCmd or _snp_on(fw):
        return None
    cols = _cmd_columns(items.raw, n, ~fw.ports.dma.cbit_mask)
    if cols is None:
        return None  # a buffer that does not decode (reserved bytes set)
    g = fw.guests.get(int(cols[_HANDLE, 0]))
    if g is None or g.state not in (_SUPDATE if send else _RUPDATE) or not g.asid:
        return None
    cmd = items.column if items.column is not None else np.array(items.spas, dtype=np.uint64)
    size, hdr = TransportCmd.SIZE, HdrBuf.SIZE
    shape = columns.stats(cols, (0, 0, 0, 0, 0, 0, 0, hdr, PAGE, PAGE))  # (lengths: the regions' own)
    handle, hdr_len, guest_len, trans_len = shape[_HANDLE], shape[_HDR_LEN], shape[_GUEST_LEN], shape[_TRANS_LEN]
    hdr_at, guest_at, trans_at = shape[_HDR], shape[_GUEST], shape[_TRANS]
    cmd_at = columns.stats(cmd, (size,))[0]
    lengths_ok = hdr_len.lo == hdr_len.hi == hdr and guest_len.lo == guest_len.hi == PAGE and trans_len.lo >= PAGE \
        if send else hdr_len.lo >= hdr and guest_len.lo == guest_len.hi == PAGE and trans_len.lo == trans_len.hi == PAGE
    if not lengths_ok or not handle.lo == handle.hi == g.handle or guest_at.bits % PAGE:
        return None
    shapes = (cmd_at, hdr_at, guest_at, trans_at)
    regions = [(cmd, np.uint64(size)), (cols[_HDR], np.uint64(hdr)), (cols[_GUEST], np.uint64(PAGE)),
               (cols[_TRANS], np.uint64(PAGE))]
    hulls = [(at.lo, at.hi + int(length)) for at, (_, length) in zip(shapes, regions, strict=True)]  # (no wrap)
    try:
        fw.ports.dma.check(0, max(end for _, end in hulls))
    except AddressError:
        return None
    fences = [] if fw.tmr is None else [(fw.tmr.base, fw.tmr.end)]
    if fw.ring is not None:
        fences += [(spa, spa + PAGE) for spa in fw.ring.pages]  # (the dispatcher checked the buffers)
    for lo, hi in fences:
        for (starts, length), (first, end) in zip(regions, hulls, strict=True):
            if first < hi and lo < end and ((starts < np.uint64(hi)) & (np.uint64(lo) < starts + length)).any():
                return None
    picks = ([1, 3], [0, 2]) if send else ([2], [0, 1, 3])  # (outputs, inputs) among the regions
    if not _disjoint([regions[i] for i in picks[0]], [regions[i] for i in picks[1]],
                     ([hulls[i] for i in picks[0]], [hulls[i] for i in picks[1]]),
                     ordered=all(shapes[i].apart for i in picks[0])):
        return None
    return _Whole(g, cols[_GUEST], cols[_HDR], cols[_TRANS], hdr_at.stride if hdr_at.stride >= hdr else 0,
                  not trans_at.bits % PAGE)


def _disjoint(outs: list[tuple[_U64, np.uint64]], ins: list[tuple[_U64, np.uint64]],
              known: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None,
              ordered: bool | None = None) -> bool:
    """Whether the output ranges (starts, length) overlap neither each other nor any input range;
    ``known``: the (lowest start, highest end) of each of ``outs`` and of ``ins`` when the caller
    has them; ``ordered``: whether each output family goes upward without overlapping itself
    (:attr:`ColumnStats.apart <sevemu.hw.columns.ColumnStats.apart>`), when the caller knows."""
    if known is None:
        known = ([(int(s.min()), int(s.max()) + int(length)) for s, length in outs],
                 [(int(s.min()), int(s.max()) + int(length)) for s, length in ins])
    hulls, spread = known
    if ordered is None:
        ordered = all((s[1:] >= s[:-1] + length).all() for s, length in outs)
    if ordered and \
            all(b <= c or d <= a for i, (a, b) in enumerate(hulls) for c, d in hulls[i + 1 :] + spread):
        return True  # (the usual layout: each output family in order, apart from the rest)
    starts = np.concatenate([s for s, _ in outs])
    ends = np.concatenate([s + length for s, length in outs])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    if (starts[1:] < ends[:-1]).any():
        return False
    for lo, length in ins:
        hi = lo + length
        i = np.searchsorted(starts, lo, side="right")  # the outputs starting at or before lo: i-1
        before = i > 0
        if (ends[np.maximum(i - 1, 0)][before] > lo[before]).any():
            return False
        after = i < len(starts)
        if (starts[np.minimum(i, len(starts) - 1)][after] < hi[after]).any():
            return False
    return True


def _aads(flags: npt.NDArray[np.uint32], ivs: bytes, size: int) -> bytes:
    """The AAD (:func:`_aad`) of each packet of a run of ``size``-byte packets."""
    a = np.zeros(len(flags), dtype=_AAD_DTYPE)
    a["context"] = DATA_CONTEXT
    a["flags"] = flags
    a["iv"] = np.frombuffer(ivs, dtype="V16")
    a["guest_len"] = size
    a["trans_len"] = size
    return a.tobytes()


def _page_runs(spas: _U64) -> list[tuple[int, int, int]]:
    """(first index, SPA, length) of each run of physically consecutive pages, in command order
    (:func:`sevemu.hw.columns.runs`, in one C pass where the helpers are built)."""
    return columns.runs(spas, PAGE)


def _even(spas: _U64, size: int) -> int:
    """The spacing of ``spas`` when they go evenly upward at least ``size`` apart, else 0."""
    if len(spas) < 2:
        return size
    stride = columns.stats(spas, (0,))[0].stride
    return stride if stride >= size else 0


def _write_slots(fw: Firmware, spas: _U64, data: bytes, size: int, stride: int | None = None) -> None:
    """Write ``size`` bytes of ``data`` per command at each SPA: when the SPAs are evenly spaced less
    than a line apart, in place row by row where no row crosses a page
    (:meth:`~sevemu.hw.psp.PspDma.write_rows`), else one write of the span with the bytes between
    them read back first -- either way the same memory, and the same host lines written back, as
    writing one by one; otherwise in runs (:func:`_write_runs`).  ``stride``: :func:`_even` of
    ``spas`` when the caller has it."""
    n = len(spas)
    stride = _even(spas, size) if stride is None else stride
    if not stride or stride - size >= LINE:
        _write_runs(fw, [(int(spa), data[i * size : (i + 1) * size]) for i, spa in enumerate(spas)])
        return
    lo, span = int(spas[0]), stride * (n - 1) + size
    if stride > size and fw.ports.dma.write_rows(lo, stride, np.frombuffer(data, dtype=np.uint8).reshape(n, size)):
        return  # (in place, the bytes between rows untouched: the same memory as the span read back and written)
    if stride == size:
        fw.ports.dma.write(lo, data)
        return
    rows = np.frombuffer(fw.ports.dma.read(lo, span) + bytes(stride - size), dtype=np.uint8).reshape(n, stride).copy()
    rows[:, :size] = np.frombuffer(data, dtype=np.uint8).reshape(n, size)
    fw.ports.dma.write(lo, rows.tobytes()[:span])


def _read_slots(fw: Firmware, spas: _U64, size: int, stride: int | None = None) -> bytes:
    """``size`` bytes at each SPA, back to back (one read where they are evenly spaced; ``stride``:
    :func:`_even` of ``spas`` when the caller has it)."""
    n = len(spas)
    stride = _even(spas, size) if stride is None else stride
    if not stride:
        return b"".join(_read_all(fw, [(int(spa), size) for spa in spas]))
    return columns.strided_rows(fw.ports.dma.read(int(spas[0]), stride * (n - 1) + size), 0, stride, n, size)


def _scratch(name: str, length: int) -> memoryview:
    """``length`` bytes of the PSP's own working memory for a batch (per thread, reused from batch
    to batch; never host-visible): what :func:`_seal_pages` and :func:`_open_pages` decrypt into."""
    buf: bytearray | None = getattr(_SCRATCH, name, None)
    if buf is None or len(buf) < length:
        buf = bytearray(length)
        setattr(_SCRATCH, name, buf)
    return memoryview(buf)[:length]


def _seal_pages(fw: Firmware, whole: _Whole) -> None:
    """The effects of SEND_UPDATE_DATA on each whole page (checked by :func:`_whole_pages`): the
    pages read and decrypted from DRAM into the PSP's memory in one gather, whether or not they are
    physically consecutive (:meth:`~sevemu.hw.psp.PspDma.read_encrypted_pages_into`),
    sealed from there straight into the TRANS pages in DRAM when every TRANS is page-aligned (the
    host's lines of them written back and dropped first, as for any PSP write:
    :meth:`~sevemu.hw.psp.PspDma.fill_pages`), else into a second buffer written out run by run."""
    g, guest, hdrs, trans = whole.g, whole.guest, whole.hdrs, whole.trans
    n = len(guest)
    dma = fw.ports.dma
    plain = _scratch("plain", n * PAGE)
    dma.read_encrypted_pages_into(guest, plain, g.asid)  # (one gather, consecutive or not)
    ivs = fw.ports.trng(IV_SIZE * n)  # one draw for the doorbell: a fresh IV per page, in command order
    aads = _aads(np.zeros(n, dtype=np.uint32), ivs, PAGE)
    channel = _channel(g)
    runs = _page_runs(trans)
    if whole.trans_aligned:  # page-aligned TRANS: sealed straight into DRAM's pages
        out: list[bytearray] = []
        dma.fill_pages([(spa, length) for _, spa, length in runs],
                       lambda pages: out.append(channel.seal_many_to_pages(ivs, aads, plain, pages,
                                                                           trans >> np.uint64(12))))
        macs = out[0]
    else:
        sealed = _scratch("sealed", n * PAGE)
        _, macs = channel.seal_many(ivs, aads, plain, PAGE, sealed)
        for first, spa, length in runs:
            dma.write(spa, sealed[first * PAGE : first * PAGE + length])
    head = np.zeros(n, dtype=_HDR_DTYPE)  # flags 0
    head["iv"] = np.frombuffer(ivs, dtype="V16")
    head["mac"] = np.frombuffer(macs, dtype="V32")
    _write_slots(fw, hdrs, head.tobytes(), HdrBuf.SIZE, whole.hdr_stride)


@SEV_API.guest(CommandId.SEND_UPDATE_VMSA, TransportCmd, READY, _SUPDATE, before_guest=(_hdr_length_query,))
def send_update_vmsa(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> TransportCmd | None:
    return _send_update(fw, cmd, g, vmsa=True)


def _close(g: GuestContext, state: GuestState) -> None:
    g.tek = g.tik = CLOSED_KEY
    g.packets = None
    g.state = state


@SEV_API.guest(CommandId.SEND_FINISH, HandleCmd, READY, _SUPDATE)
def send_finish(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
    _close(g, GuestState.SENT)


@SEV_API.guest(CommandId.SEND_CANCEL, HandleCmd, READY, _SUPDATE)
def send_cancel(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
    _close(g, GuestState.RUNNING)


# ---- RECEIVE ------------------------------------------------------------------------------------


def _open_receive_session(fw: Firmware, cmd: ReceiveStartCmd) -> TransportKeys:
    """TEK and TIK from the source's session, wrapped for our PDH by the source's PDH."""
    return open_channel(fw, cmd.session_paddr, cmd.session_len, cmd.pdh_cert_paddr, cmd.pdh_cert_len,
                        cmd.policy, "source PDH")


@SEV_API.platform(CommandId.RECEIVE_START, ReceiveStartCmd, READY)
def receive_start(fw: Firmware, cmd: ReceiveStartCmd) -> ReceiveStartCmd:
    keys = _open_receive_session(fw, cmd)
    handle = create_guest(fw, cmd.handle, cmd.policy, keys, GuestState.RUPDATE)
    fw.guests[handle].packets = PacketCrypto(keys.tek, keys.tik)
    return replace(cmd, handle=handle)


def _receive_update(fw: Firmware, cmd: TransportCmd, g: GuestContext, vmsa: bool) -> None:
    if vmsa:
        need_es(g)
    need_active(g)
    n = cmd.trans_len
    if n == 0 or n > MAX_PACKET or cmd.guest_len != n or cmd.hdr_len < HdrBuf.SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"guest_len {cmd.guest_len:#x}, trans_len {n:#x}, "
                                                   f"hdr_len {cmd.hdr_len:#x}")
    spa = _transport_region(fw, cmd, n)
    check_range(fw, spa, n)
    hdr = HdrBuf.decode(read_host(fw, cmd.hdr_paddr, HdrBuf.SIZE))
    trans = read_host(fw, cmd.trans_paddr, n)
    if hdr.flags & HdrFlags.COMPRESSED:
        raise FirmwareError(Status.UNSUPPORTED, "compressed packets are not supported")
    plaintext = open_data_packet(_channel(g), hdr, trans, n)
    if vmsa:
        vmsa_room(fw, plaintext)
    evict_host_lines(fw, spa, n)
    if vmsa:
        set_up_vmsa(fw, g, spa, plaintext)
        return
    write_guest(fw, g, spa, plaintext)


@SEV_API.guest(CommandId.RECEIVE_UPDATE_DATA, TransportCmd, READY, _RUPDATE)
def receive_update_data(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> None:
    _receive_update(fw, cmd, g, vmsa=False)


@SEV_API.batch(CommandId.RECEIVE_UPDATE_DATA)
def receive_update_batch(fw: Firmware, items: QueuedBuffers) -> int:
    """RECEIVE_UPDATE_DATA of queued commands at once (ring-buffer mode): the prefix of commands on
    one guest that pass every check of :func:`_receive_update` -- the MAC included -- and whose
    inputs keep clear of the others' guest regions (:func:`_batchable`; for whole pages all
    commands are checked at once, :func:`_whole_pages`); each packet verified and decrypted with
    its own IV and MAC (:meth:`PacketCrypto.open_many`), the host's lines of the guest regions
    written back and dropped, the plaintexts written encrypted, physically consecutive pages in
    one write."""
    whole = _whole_pages(fw, items, send=False)
    if whole is not None:
        return _open_pages(fw, whole)
    g: GuestContext | None = None
    plan = _Spans()
    checked: list[tuple[int, int, int, int]] = []  # (guest SPA, length, hdr SPA, TRANS SPA)
    for cspa, cmd in items.decoded():
        if not isinstance(cmd, TransportCmd):
            break
        n = cmd.trans_len
        ctx = _batch_guest(fw, cmd, _RUPDATE, g)
        sane = 0 < n <= MAX_PACKET and cmd.guest_len == n and cmd.hdr_len >= HdrBuf.SIZE
        regions = _regions(fw, cmd, ctx, n) if ctx is not None and sane else None
        if ctx is None or regions is None:
            break
        spa, hdr_spa, trans_spa = regions
        if not _batchable(plan, [(cspa, cspa + TransportCmd.SIZE), (hdr_spa, hdr_spa + HdrBuf.SIZE),
                                 (trans_spa, trans_spa + n)], [(spa, spa + n)]):
            break
        g = ctx
        checked.append((spa, n, hdr_spa, trans_spa))
    if g is None or not checked:
        return 0
    hdrs = _read_all(fw, [(hdr_spa, HdrBuf.SIZE) for _, _, hdr_spa, _ in checked])
    transes = _read_all(fw, [(trans_spa, n) for _, n, _, trans_spa in checked])
    pc = _channel(g)
    todo: list[tuple[int, bytes]] = []  # (guest SPA, plaintext)
    for (spa, n, _, _), raw, trans in zip(checked, hdrs, transes, strict=True):
        try:
            hdr = HdrBuf.decode(raw)
        except LayoutError:
            break
        if hdr.flags & HdrFlags.COMPRESSED:
            break
        good, plain = pc.open_many(hdr.iv, _aad(hdr.flags, hdr.iv, n, n), hdr.mac, trans, n)
        if not good:
            break  # BAD_MEASUREMENT, answered one by one
        todo.append((spa, bytes(plain)))
    _write_received(fw, g, todo)
    return len(todo)


def _write_received(fw: Firmware, g: GuestContext, todo: list[tuple[int, bytes]]) -> None:
    """Write each (guest SPA, plaintext) encrypted with the guest's key, the host's lines of the
    region written back and dropped first; line-aligned neighbours in one write."""
    runs: list[tuple[int, bytearray]] = []
    for spa, plain in todo:
        last = runs[-1] if runs else None
        if last is not None and last[0] + len(last[1]) == spa and not spa % LINE and not len(plain) % LINE:
            last[1].extend(plain)
        else:
            runs.append((spa, bytearray(plain)))
    for spa, data in runs:
        fw.ports.dma.evict(spa, len(data))  # (evict_host_lines without reading and rewriting the bytes)
        write_guest(fw, g, spa, bytes(data))


def _open_pages(fw: Firmware, whole: _Whole) -> int:
    """The effects of RECEIVE_UPDATE_DATA on each whole page (checked by :func:`_whole_pages`) up to
    the first whose header says COMPRESSED or whose MAC does not verify (that one is answered one
    by one: UNSUPPORTED, BAD_MEASUREMENT); how many were received."""
    g, guest, hdrs, trans = whole.g, whole.guest, whole.hdrs, whole.trans
    head = np.frombuffer(_read_slots(fw, hdrs, HdrBuf.SIZE, whole.hdr_stride), dtype=_HDR_DTYPE)
    compressed = np.flatnonzero(head["flags"] & np.uint32(HdrFlags.COMPRESSED))
    n = int(compressed[0]) if len(compressed) else len(head)
    if not n:
        return 0
    head = head[:n]
    dma = fw.ports.dma
    ivs = head["iv"].tobytes()
    aads, macs = _aads(head["flags"], ivs, PAGE), head["mac"].tobytes()
    plain = _scratch("plain", n * PAGE)
    channel = _channel(g)
    runs = _page_runs(trans[:n])
    found = None
    if whole.trans_aligned if n == len(trans) else not (trans[:n] % np.uint64(PAGE)).any():  # page-aligned TRANS: opened where it lies in DRAM
        column = trans[:n] >> np.uint64(12)
        found = dma.read_pages([(spa, length) for _, spa, length in runs],
                               lambda pages: channel.open_many_from_pages(ivs, aads, macs, pages, column, plain))
    if found is None:  # (unaligned, or a dirty host line in the way: read coherently first)
        data = _scratch("trans", n * PAGE)
        for first, spa, length in runs:
            dma.read_into(spa, data[first * PAGE : first * PAGE + length])
        found, _ = channel.open_many(ivs, aads, macs, data, PAGE, plain)
    good = found
    dma.evict_pages(guest[:good])  # (the host's lines of the pages, then one scatter, in any order)
    dma.write_encrypted_pages(guest[:good], plain[: good * PAGE], g.asid)
    return good


@SEV_API.guest(CommandId.RECEIVE_UPDATE_VMSA, TransportCmd, READY, _RUPDATE)
def receive_update_vmsa(fw: Firmware, cmd: TransportCmd, g: GuestContext) -> None:
    _receive_update(fw, cmd, g, vmsa=True)


@SEV_API.guest(CommandId.RECEIVE_FINISH, HandleCmd, READY, _RUPDATE)
def receive_finish(fw: Firmware, cmd: HandleCmd, g: GuestContext) -> None:
    _close(g, GuestState.RUNNING)
