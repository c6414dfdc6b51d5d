"""The guest owner's side of a legacy SEV launch, as a small typed state machine (SEV API
55766, LAUNCH_START / LAUNCH_MEASURE / LAUNCH_SECRET and its key-derivation appendix; SP 800-108;
sev-tool ``src/commands.cpp``).

::

    LaunchSession.create(pdh, policy)        fresh GODH key pair, nonce, wrap IV, TEK/TIK
        .godh_public_key()                   -> the guest owner's DH public key
        .godh_cert_blob                      -> the 0x824-byte GODH certificate (LAUNCH_START)
        .session_blob                        -> the 0x80-byte session buffer (LAUNCH_START)
        .verify_measurement(blob, ...)       -> MeasuredLaunch   (after LAUNCH_MEASURE)
            .launch_secret(secrets)          -> LaunchSecret     (for LAUNCH_SECRET)

Each step returns the next state object; a failed check raises and yields no next state.

Key agreement: ``Z = ECDH(GODH private, PDH public)`` on P-384, the 48-byte big-endian
x-coordinate (``cryptography``'s ECDH output).  The rest is
:func:`sevemu.crypto.transport.seal_session`.

GODH certificate (SEV API 55766, certificate appendix; sev-tool ``src/sevcert.cpp``): an AMD-format SEV certificate carrying the GODH public key,
usage PDH (0x1003), algorithm ECDH_SHA256 (3), curve P-384, version 1, API version 0.0, both
signature slots empty -- as virtee/sev builds it.  AMD's firmware checks only the body (version,
usage, algorithm, a valid P-384 point) and ignores the slots; sev-tool's self-signature (slot 1
usage PEK) would be accepted the same way.  :func:`godh_certificate` builds it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.policy import check_policy
from sevemu.abi.sev import MeasureBuf, SessionBuf
from sevemu.certs.sev import SevCert
from sevemu.crypto.ecc import ecdh
from sevemu.crypto.transport import (
    IV_SIZE,
    KEY_SIZE,
    NONCE_SIZE,
    TransportKeys,
    seal_session,
)
from sevemu.errors import InputError
from sevemu.owner.measurement import verify_measurement
from sevemu.owner.secret import LaunchSecret, package_secret, secret_table

__all__ = ["LaunchSession", "MeasuredLaunch", "godh_certificate", "shared_secret"]


def shared_secret(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """Z = ECDH over P-384: the big-endian x-coordinate of the shared point (48 bytes).

    Raises :class:`~sevemu.errors.InputError` when either key is not on P-384.
    """
    for what, key in (("private key", private), ("peer public key", peer)):
        if not isinstance(key.curve, ec.SECP384R1):
            raise InputError(f"SEV sessions use P-384; the {what} is on {key.curve.name}")
    return ecdh(private, peer)


def godh_certificate(public_key: ec.EllipticCurvePublicKey) -> SevCert:
    """The GODH certificate for ``public_key`` (module docstring): usage PDH, ECDH_SHA256, P-384,
    signature slots empty.

    Raises :class:`~sevemu.errors.InputError` when the key is not on P-384.
    """
    if not isinstance(public_key.curve, ec.SECP384R1):
        raise InputError(f"a GODH key is on P-384, not {public_key.curve.name}")
    return SevCert.new(KeyUsage.PDH, SigAlgo.ECDH_SHA256, public_key)


@dataclass(frozen=True, slots=True)
class LaunchSession:
    """State 1: the session offered to the platform, waiting for the launch measurement."""

    policy: int
    keys: TransportKeys
    session: SessionBuf
    godh_public: ec.EllipticCurvePublicKey = field(repr=False)

    @classmethod
    def create(
        cls,
        pdh_public: ec.EllipticCurvePublicKey,
        policy: int,
        *,
        tek: bytes | None = None,
        tik: bytes | None = None,
        godh_private: ec.EllipticCurvePrivateKey | None = None,
        nonce: bytes | None = None,
        wrap_iv: bytes | None = None,
    ) -> LaunchSession:
        """Open a session to the platform owning ``pdh_public`` for a guest with ``policy``.

        Everything not given is freshly random (TEK, TIK, nonce, wrap IV, the GODH key pair); pass
        them only to make tests deterministic.  The GODH private key is used once and not kept.
        Raises :class:`~sevemu.errors.LayoutError` for a policy with reserved bits set and
        :class:`~sevemu.errors.InputError` for a PDH key not on P-384.
        """
        policy = check_policy(policy)
        private = godh_private if godh_private is not None else ec.generate_private_key(ec.SECP384R1())
        z = shared_secret(private, pdh_public)
        keys = TransportKeys(
            tek=os.urandom(KEY_SIZE) if tek is None else tek,
            tik=os.urandom(KEY_SIZE) if tik is None else tik,
        )
        session = seal_session(
            z,
            os.urandom(NONCE_SIZE) if nonce is None else nonce,
            os.urandom(IV_SIZE) if wrap_iv is None else wrap_iv,
            keys,
            policy,
        )
        return cls(policy=policy, keys=keys, session=session, godh_public=private.public_key())

    def godh_public_key(self) -> ec.EllipticCurvePublicKey:
        """The guest owner's DH public key, to be certified as the GODH cert of LAUNCH_START."""
        return self.godh_public

    def godh_cert(self) -> SevCert:
        """The GODH certificate carrying :meth:`godh_public_key` (for LAUNCH_START)."""
        return godh_certificate(self.godh_public)

    @property
    def godh_cert_blob(self) -> bytes:
        """The encoded 0x824-byte GODH certificate (LAUNCH_START ``dh_cert``)."""
        return self.godh_cert().encode()

    @property
    def session_blob(self) -> bytes:
        """The 0x80-byte session buffer for LAUNCH_START."""
        return self.session.encode()

    def verify_measurement(
        self,
        measure_blob: bytes,
        *,
        api_major: int,
        api_minor: int,
        build: int,
        expected_ld: bytes,
    ) -> MeasuredLaunch:
        """Check the LAUNCH_MEASURE output against the expected launch digest; next state.

        ``api_major``/``api_minor``/``build`` are the firmware version reported with the
        measurement.  Raises :class:`~sevemu.crypto.transport.MeasureMacError` on mismatch.
        """
        verify_measurement(measure_blob, self.keys.tik, api_major, api_minor, build, self.policy, expected_ld)
        out = MeasureBuf.decode(measure_blob)
        return MeasuredLaunch(
            policy=self.policy,
            keys=self.keys,
            api_major=api_major,
            api_minor=api_minor,
            build=build,
            launch_digest=bytes(expected_ld),
            measure=out.measure,
            mnonce=out.mnonce,
        )


@dataclass(frozen=True, slots=True)
class MeasuredLaunch:
    """State 2: the launch measured as expected; secrets may now be released to it."""

    policy: int
    keys: TransportKeys
    api_major: int
    api_minor: int
    build: int
    launch_digest: bytes
    measure: bytes
    mnonce: bytes

    def launch_secret(
        self, secrets: Iterable[tuple[uuid.UUID | str, bytes]], *, iv: bytes | None = None
    ) -> LaunchSecret:
        """Package ``secrets`` as an OVMF secret table in a LAUNCH_SECRET packet for this launch."""
        return self.launch_secret_raw(secret_table(secrets), iv=iv)

    def launch_secret_raw(self, plaintext: bytes, *, iv: bytes | None = None, flags: int = 0) -> LaunchSecret:
        """Package arbitrary bytes (no OVMF table) in a LAUNCH_SECRET packet for this launch."""
        return package_secret(
            self.keys,
            plaintext,
            measure=self.measure,
            api_major=self.api_major,
            api_minor=self.api_minor,
            iv=iv,
            flags=flags,
        )
