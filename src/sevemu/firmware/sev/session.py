"""The trusted channel between the guest owner and the firmware (SEV API 55766: LAUNCH_START, key
derivation and LAUNCH_SECRET; the SEV certificate appendix; sev-tool ``src/commands.cpp``,
``build_session_buffer``).

LAUNCH_START with an owner session
    The hypervisor relays two owner-built blobs: the guest owner's Diffie-Hellman certificate (GODH,
    a 0x824-byte SEV certificate) and the 0x80-byte session buffer.  The firmware computes
    ``Z = ECDH(PDH private, GODH public)`` and opens the session with
    :func:`sevemu.crypto.transport.open_session`, which yields the owner's TEK and TIK.

    Checks and their status codes, in the order AMD's firmware makes them (amd/AMD-ASPFW
    ``sev_mcmd.c: sev_mcmd_launch_start``, ``sev_channel.c: sev_channel_open_server``,
    ``sev_cert.c: sev_cert_sanity_check``, ``ecdh.c: ecdh_key_agreement``, ``hmac.c``,
    ``sev_guest.c: sev_guest_verify_policy``):

    ======================================================================  ====================
    session length is not 0x80                                              INVALID_LENGTH
    session buffer outside DRAM                                             INVALID_ADDRESS
    GODH certificate length is not 0x824                                    INVALID_LENGTH
    GODH certificate outside DRAM                                           INVALID_ADDRESS
    GODH body malformed (version, reserved bytes, unknown curve, must-be-   INVALID_CERTIFICATE
    zero bytes of the key), usage not PDH, algorithm not ECDH_SHA256, key
    not a point of P-384
    wrap_mac does not verify under KIK (wrong PDH, altered nonce/wrap_tk/   BAD_MEASUREMENT
    wrap_mac)
    policy_mac does not verify under the unwrapped TIK (other policy,       BAD_MEASUREMENT
    altered wrap_iv/policy_mac)
    ======================================================================  ====================

    AMD's ``hmac_sha256_verify`` answers every MAC mismatch with BAD_MEASUREMENT; the model does
    the same rather than inventing a distinction (BAD_SIGNATURE, POLICY_FAILURE) the firmware does
    not make.  The certificate's signature slots are not looked at: AMD's firmware checks only the
    body, and the owner tools disagree on them (virtee/sev leaves both empty, sev-tool self-signs
    with usage PEK; sev-tool ``src/sevcert.cpp``, virtee ``sev`` ``src/certs/sev``).

    Presence of a session is keyed on ``dh_cert_paddr != 0``, as in AMD's firmware; without it
    TEK and TIK stay all-zero (AMD zeroes the new guest context and only ``open_server`` fills the
    channel), so the MEASURE of a launch without a session is an HMAC under a key everybody knows.

LAUNCH_SECRET packets
    :func:`open_secret` verifies the header MAC under the TIK (covering the launch's MEASURE from
    API 0.17 on) and decrypts TRANS with the TEK.  MAC mismatch (tampered header or TRANS, a packet
    sealed with another guest's TIK, or bound to another launch's MEASURE): BAD_MEASUREMENT; a
    correctly MACed packet with the COMPRESSED flag: UNSUPPORTED (AMD firmware checks the flag only
    after the MAC, and supports no compression).

The PDH private key is ``fw.identity.pdh_key`` (:mod:`sevemu.firmware.identity`); an unprovisioned
part has none and answers HWERROR_PLATFORM.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import SEV_CERT_SIZE, SEV_CERT_VERSION, EcCurve, KeyUsage, SevCertLayout, SigAlgo
from sevemu.abi.sev import HdrBuf, HdrFlags, LaunchStartCmd, SessionBuf
from sevemu.abi.status import Status
from sevemu.certs.sev import SevEcKey
from sevemu.crypto.ecc import ecdh
from sevemu.crypto.transport import (
    PacketMacError,
    PolicyMacError,
    TransportKeys,
    WrapMacError,
    open_packet,
    open_session,
)
from sevemu.errors import FirmwareError, InputError, LayoutError
from sevemu.firmware.checks import read_host
from sevemu.firmware.core import Firmware
from sevemu.firmware.gctx import GuestContext

__all__ = ["godh_public_key", "open_channel", "open_launch_session", "open_secret"]


def godh_public_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    """The P-384 public key of a GODH certificate; INVALID_CERTIFICATE for anything else.

    Only the body is checked (version, usage PDH, algorithm ECDH_SHA256, a valid P-384 point),
    like AMD's ``sev_cert_sanity_check``; the signature slots are ignored.
    """
    try:
        body = SevCertLayout.decode(raw)
        if body.version != SEV_CERT_VERSION:
            raise InputError(f"version {body.version}")
        if body.pub_key_usage != KeyUsage.PDH or body.pub_key_algo != SigAlgo.ECDH_SHA256:
            raise InputError(f"usage {body.pub_key_usage:#x} / algorithm {body.pub_key_algo:#x}, "
                             "expected PDH / ECDH_SHA256")
        key = SevEcKey.decode(body.pub_key)
        if key.curve != EcCurve.P384:
            raise InputError(f"curve {key.curve.name}, the PDH is P-384")
        return key.to_crypto()
    except InputError as exc:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"GODH certificate: {exc}") from None


def open_channel(fw: Firmware, session_paddr: int, session_len: int, cert_paddr: int, cert_len: int,
                 policy: int, peer: str) -> TransportKeys:
    """TEK and TIK from a session buffer wrapped for our PDH by ``peer``'s Diffie-Hellman key.

    The owner's GODH at LAUNCH_START and the source platform's PDH at RECEIVE_START open the same
    way (SEV API 55766: LAUNCH_START, RECEIVE_START; AF ``sev_channel_open_server``): the session length and address, then
    the certificate's, then ECDH with our PDH and the session's MACs (any MAC failure:
    BAD_MEASUREMENT).
    """
    if session_len != SessionBuf.SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"session is {SessionBuf.SIZE:#x} bytes, "
                                                   f"not {session_len:#x}")
    session = read_host(fw, session_paddr, SessionBuf.SIZE)
    if cert_len != SEV_CERT_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, f"{peer} certificate is {SEV_CERT_SIZE:#x} bytes, "
                                                   f"not {cert_len:#x}")
    peer_key = godh_public_key(read_host(fw, cert_paddr, SEV_CERT_SIZE))
    z = ecdh(fw.identity.pdh_key, peer_key)
    try:
        return open_session(z, session, policy)
    except (WrapMacError, PolicyMacError, LayoutError) as exc:
        raise FirmwareError(Status.BAD_MEASUREMENT, f"session: {exc}") from None


def open_launch_session(fw: Firmware, cmd: LaunchStartCmd) -> TransportKeys:
    """TEK and TIK from the owner's GODH certificate and session buffer (checks: module docstring)."""
    return open_channel(fw, cmd.session_paddr, cmd.session_len, cmd.dh_cert_paddr, cmd.dh_cert_len,
                        cmd.policy, "GODH")


def open_secret(fw: Firmware, g: GuestContext, header: bytes, trans: bytes, guest_len: int) -> bytes:
    """Verify and decrypt a LAUNCH_SECRET packet for guest ``g``; the plaintext."""
    hdr = HdrBuf.decode(header)
    major, minor, _ = fw.api_version
    try:
        plaintext = open_packet(TransportKeys(g.tek, g.tik), hdr, trans, guest_len=guest_len,
                                api_major=major, api_minor=minor, measure=g.measure or None)
    except PacketMacError as exc:
        raise FirmwareError(Status.BAD_MEASUREMENT, f"LAUNCH_SECRET packet: {exc}") from None
    if hdr.flags & HdrFlags.COMPRESSED:
        raise FirmwareError(Status.UNSUPPORTED, "compressed packets are not supported")
    return plaintext
