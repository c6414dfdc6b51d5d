"""The legacy SEV platform chain and its transport buffers.

Sources: SEV API 55766 appendices on the SEV and AMD certificate formats (the signing rule, the
CEK signed by the ASK) and SEND_START (the target's PEK || OCA || CEK and the AMD chain ASK || ARK);
sev-tool ``src/sevcert.cpp``, ``src/amdcert.cpp``; the real chains in the vectors.

::

    ARK (self-signed, pinned) -> ASK -> CEK -> PEK <- OCA (self-signed)
                                              PEK -> PDH

:meth:`PlatformChain.verify` checks, in this order, and raises a
:class:`~sevemu.certs.errors.ChainError` naming the first link that fails:

1. ``ARK``: byte-for-byte one of the pinned ARKs (:class:`~sevemu.certs.errors.UntrustedRootError`
   otherwise), usage ARK, self-certified; ``ARK <- ARK``: its signature, when it carries one (the
   Naples ARK as AMD ships it has none; AMDESE/AMDSEV issue 17), verifies under itself;
2. ``ASK``: usage ASK; ``ASK <- ARK``: certifying_id is the ARK's key_id and the signature verifies;
3. ``CEK``: usage CEK, ECDSA; ``CEK <- ASK``: signed by the ASK with RSA_SHA256 (2048-bit ASK) or
   RSA_SHA384 (4096-bit).  A CEK of one generation under another generation's ASK fails here;
4. ``OCA``: usage OCA, a signing algorithm; ``OCA <- OCA``: self-signed;
5. ``PEK``: usage PEK, ECDSA; ``PEK <- CEK`` and ``PEK <- OCA``: both signatures, in either slot;
6. ``PDH``: usage PDH, ECDH; ``PDH <- PEK``.

Buffers: PDH_CERT_EXPORT's ``cert_chain`` is PEK || OCA || CEK (3 x 0x824 bytes,
:class:`SevCertChain`); SEND_START's ``amd_certs`` is ASK || ARK (:class:`AmdCertChain`; the ARK
may be in AMD's signature-less Naples form).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.certs.amd import AmdCert
from sevemu.certs.errors import CertSignatureError, ChainError, UntrustedRootError
from sevemu.certs.roots import PinnedArk
from sevemu.certs.sev import ECDH_ALGOS, ECDSA_ALGOS, SIGNING_ALGOS, SevCert
from sevemu.errors import LayoutError

__all__ = ["AmdCertChain", "PlatformChain", "SevCertChain"]


@dataclass(frozen=True, slots=True)
class SevCertChain:
    """PDH_CERT_EXPORT ``cert_chain``: PEK || OCA || CEK."""

    pek: SevCert
    oca: SevCert
    cek: SevCert

    SIZE: ClassVar[int] = SEV_CERT_CHAIN_SIZE

    @classmethod
    def decode(cls, data: bytes) -> SevCertChain:
        if len(data) != SEV_CERT_CHAIN_SIZE:
            raise LayoutError(f"cert_chain: expected {SEV_CERT_CHAIN_SIZE:#x} bytes, got {len(data):#x}")
        pek, oca, cek = (SevCert.decode(data[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE]) for i in range(3))
        return cls(pek, oca, cek)

    def encode(self) -> bytes:
        return self.pek.encode() + self.oca.encode() + self.cek.encode()


@dataclass(frozen=True, slots=True)
class AmdCertChain:
    """SEND_START ``amd_certs`` and AMD's ``ask_ark_<product>.cert``: ASK || ARK."""

    ask: AmdCert
    ark: AmdCert

    @classmethod
    def decode(cls, data: bytes) -> AmdCertChain:
        """Decode ASK || ARK; the ARK may lack its signature (AMD's Naples file)."""
        ask, rest = AmdCert.decode_prefix(data)
        return cls(ask, AmdCert.decode(rest, allow_unsigned=True))

    def encode(self) -> bytes:
        return self.ask.encode() + self.ark.encode()


def _check_cert(name: str, cert: SevCert, usage: KeyUsage, algos: Iterable[SigAlgo]) -> None:
    allowed = frozenset(algos)
    if cert.usage != usage:
        raise ChainError(name, f"pub_key_usage is {cert.usage.name}, expected {usage.name}")
    if cert.algo not in allowed:
        names = ", ".join(sorted(a.name for a in allowed))
        raise ChainError(name, f"pub_key_algo is {cert.algo.name}, expected one of {names}")


def _check_link(child_name: str, child: SevCert, signer_name: str, signer: SevCert | AmdCert) -> None:
    try:
        child.verify(signer)
    except CertSignatureError as exc:
        raise ChainError(f"{child_name} <- {signer_name}", str(exc)) from exc


@dataclass(frozen=True, slots=True)
class PlatformChain:
    """A platform's whole legacy chain: PDH, PEK, OCA, CEK and the AMD ASK and ARK."""

    pdh: SevCert
    pek: SevCert
    oca: SevCert
    cek: SevCert
    ask: AmdCert
    ark: AmdCert

    @classmethod
    def from_buffers(cls, pdh: bytes, cert_chain: bytes, amd_certs: bytes) -> PlatformChain:
        """From PDH_CERT_EXPORT's two outputs and AMD's ASK || ARK."""
        sev = SevCertChain.decode(cert_chain)
        amd = AmdCertChain.decode(amd_certs)
        return cls(SevCert.decode(pdh), sev.pek, sev.oca, sev.cek, amd.ask, amd.ark)

    @property
    def cert_chain(self) -> SevCertChain:
        return SevCertChain(self.pek, self.oca, self.cek)

    @property
    def amd_certs(self) -> AmdCertChain:
        return AmdCertChain(self.ask, self.ark)

    def verify(self, pinned_arks: Iterable[PinnedArk]) -> PinnedArk:
        """Check every link (module docstring); returns the pin the ARK matched.

        Raises :class:`~sevemu.certs.errors.ChainError` (or its subclass
        :class:`~sevemu.certs.errors.UntrustedRootError` for the ARK) naming the failed link.
        """
        pin = self._verify_amd(pinned_arks)
        _check_cert("CEK", self.cek, KeyUsage.CEK, ECDSA_ALGOS)
        _check_link("CEK", self.cek, "ASK", self.ask)
        _check_cert("OCA", self.oca, KeyUsage.OCA, SIGNING_ALGOS)
        _check_link("OCA", self.oca, "OCA", self.oca)
        _check_cert("PEK", self.pek, KeyUsage.PEK, ECDSA_ALGOS)
        _check_link("PEK", self.pek, "CEK", self.cek)
        _check_link("PEK", self.pek, "OCA", self.oca)
        _check_cert("PDH", self.pdh, KeyUsage.PDH, ECDH_ALGOS)
        _check_link("PDH", self.pdh, "PEK", self.pek)
        return pin

    def _verify_amd(self, pinned_arks: Iterable[PinnedArk]) -> PinnedArk:
        ark, ask = self.ark, self.ask
        pin = next((p for p in pinned_arks if p.accepts(ark)), None)
        if pin is None:
            raise UntrustedRootError(
                "ARK", f"key_id {ark.key_id.hex()}, fingerprint {ark.fingerprint().hex()} is not pinned"
            )
        if ark.key_usage != KeyUsage.ARK or not ark.is_self_certified:
            raise ChainError("ARK", "not a self-certified ARK")
        if ark.signature is not None:
            try:
                ark.verify(ark)
            except CertSignatureError as exc:
                raise ChainError("ARK <- ARK", str(exc)) from exc
        if ask.key_usage != KeyUsage.ASK:
            raise ChainError("ASK", f"key_usage is {ask.key_usage.name}, expected ASK")
        try:
            ask.verify(ark)
        except CertSignatureError as exc:
            raise ChainError("ASK <- ARK", str(exc)) from exc
        return pin
