"""SEV transport cryptography shared by the guest owner and the firmware (SEV API 55766: LAUNCH_START,
LAUNCH_MEASURE, LAUNCH_SECRET; sev-tool src/commands.cpp).

Both ends of a legacy SEV session run the same primitives in opposite directions, so they live
here, pure and symmetric: the owner (:mod:`sevemu.owner`) seals, the firmware opens, and for SEND
and RECEIVE the firmware does both.

Session establishment (SEV API 55766 LAUNCH_START, "session buffer"; sev-tool ``build_session_buffer``)
    ``Z`` is the ECDH shared secret between the guest owner's Diffie-Hellman key (GODH) and the
    platform's PDH -- for P-384 the 48-byte big-endian x-coordinate.  From it::

        master = KDF(Z, "sev-master-secret", nonce, 16)
        KEK    = KDF(master, "sev-kek", "", 16)
        KIK    = KDF(master, "sev-kik", "", 16)
        wrap_tk    = AES-128-CTR(KEK, wrap_iv)(TEK || TIK)
        wrap_mac   = HMAC-SHA256(KIK, wrap_tk)
        policy_mac = HMAC-SHA256(TIK, le32(policy))

    The MAC covers ``wrap_tk`` only, not ``wrap_iv``: a changed IV unwraps to a wrong TEK/TIK and
    is caught by ``policy_mac`` instead.  :func:`open_session` therefore reports a tampered
    ``wrap_iv`` as :class:`PolicyMacError`.

LAUNCH_MEASURE (SEV API 55766 LAUNCH_MEASURE; virtee sev ``src/launch/sev.rs``)
    ``MEASURE = HMAC-SHA256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD || le32(POLICY) || LD ||
    MNONCE)``; firmware older than API 0.17 omits the four-byte prefix.

LAUNCH_SECRET packets (SEV API 55766 LAUNCH_SECRET; sevctl ``src/secret.rs``)
    ``TRANS = AES-128-CTR(TEK, IV)(plaintext)`` and the header MAC is
    ``HMAC-SHA256(TIK, 0x01 || le32(FLAGS) || IV || le32(GUEST_LEN) || le32(TRANS_LEN) || TRANS
    || MEASURE)``, the ``MEASURE`` term only for API >= 0.17.

AES-CTR uses the whole 16-byte IV as the initial counter block, incremented as a 128-bit
big-endian integer (OpenSSL's ``aes-128-ctr``, which the reference tools use).

:class:`PacketCrypto` holds one channel's keyed contexts for a run of packets (SEND/RECEIVE_UPDATE
one page at a time): one AES-ECB context under TEK, from which each packet's CTR keystream is made
(its counter blocks encrypted in one call: CTR mode by definition, NIST SP 800-38A 6.5), and one
HMAC-SHA256 state under TIK, copied per packet -- the same bytes as :func:`aes128_ctr` and
:func:`hmac_sha256`, without keying a cipher and an HMAC for every page.  Every MAC
comparison is constant-time (:func:`hmac.compare_digest`; ``CRYPTO_memcmp`` in C).

Runs of equal-sized packets (:meth:`PacketCrypto.seal_many`, :meth:`PacketCrypto.open_many`: a
ring-buffer batch of SEND/RECEIVE_UPDATE_DATA, each packet still with its own IV and MAC) go through
the optional C helper ``sevemu.crypto._transport_accel`` (``csrc/transport_accel.c``) when it was
built: OpenSSL's libcrypto does AES-128-CTR (one keyed context, a new IV per packet) and
HMAC-SHA256 (one keyed context, re-initialised per packet) for the whole run in one call with the
GIL released, because per packet the Python calls around the primitives cost as much as the
primitives themselves (measured: ``docs/firmware.md``, migration performance).  Without it -- or
with ``PacketCrypto(..., accel=False)`` -- the Python path makes the same bytes (tested equal).  The firmware's failure status codes
for these checks are not published (a model choice); callers map the exceptions below.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevemu._util.units import PAGE
from sevemu.abi.sev import HdrBuf, SessionBuf
from sevemu.crypto.kdf import kdf
from sevemu.errors import InputError, KeySizeError, LayoutError, VerificationError

try:
    from sevemu.crypto import _transport_accel
except ImportError:  # not built (no C compiler or no OpenSSL headers): the Python path
    _transport_accel = None  # type: ignore[assignment]

#: Whether the optional C helper for runs of packets (``csrc/transport_accel.c``) is loaded.
ACCELERATED: bool = _transport_accel is not None

__all__ = [
    "ACCELERATED",
    "DIGEST_SIZE",
    "IV_SIZE",
    "KEK_LABEL",
    "KEY_SIZE",
    "KIK_LABEL",
    "MAC_SIZE",
    "MASTER_SECRET_LABEL",
    "MEASURE_CONTEXT",
    "MNONCE_SIZE",
    "NONCE_SIZE",
    "PACKET_CONTEXT",
    "MeasureMacError",
    "PacketCrypto",
    "PacketMacError",
    "PolicyMacError",
    "TransportKeys",
    "WrapMacError",
    "WrappingKeys",
    "aes128_ctr",
    "api_at_least",
    "derive_master_secret",
    "derive_wrapping_keys",
    "hmac_sha256",
    "measure_mac",
    "open_packet",
    "open_session",
    "packet_mac",
    "policy_mac",
    "seal_packet",
    "seal_session",
    "session_wrapping_keys",
    "unwrap_transport_keys",
    "verify_measure_mac",
    "verify_policy_mac",
    "wrap_transport_keys",
]

KEY_SIZE = 16
"""TEK, TIK, KEK, KIK and the master secret are AES-128 / HMAC keys of 16 bytes."""
NONCE_SIZE = 16
IV_SIZE = 16
MAC_SIZE = 32
DIGEST_SIZE = 32
"""GCTX.LD, the SHA-256 launch digest."""
MNONCE_SIZE = 16

MASTER_SECRET_LABEL = b"sev-master-secret"
KEK_LABEL = b"sev-kek"
KIK_LABEL = b"sev-kik"

MEASURE_CONTEXT = 0x04
"""First byte of the LAUNCH_MEASURE MAC input (API >= 0.17)."""
PACKET_CONTEXT = 0x01
"""First byte of the LAUNCH_SECRET packet MAC input."""

# API version from which the MEASURE prefix and the MEASURE term of packet MACs are present.
_MEASURE_TERM_API = (0, 17)


class WrapMacError(VerificationError):
    """Raised when a session buffer's wrap_mac does not verify under the KIK derived from Z.

    Causes: the GODH/PDH pair does not match, the nonce or wrap_tk was altered.
    """


class PolicyMacError(VerificationError):
    """Raised when policy_mac does not verify under the TIK for the policy given.

    Causes: the launch policy differs from the one the guest owner authorised, or the unwrapped
    TIK is wrong (for instance because wrap_iv was altered).
    """


class MeasureMacError(VerificationError):
    """Raised when a LAUNCH_MEASURE value is not the HMAC of the expected launch context.

    Causes: a different launch digest (other memory contents or VMSAs), policy, firmware version,
    MNONCE or TIK than the ones the verifier expects.
    """


class PacketMacError(VerificationError):
    """Raised when a packet header's MAC does not verify (altered flags, IV, lengths, TRANS,
    MEASURE, or a different TIK)."""


@dataclass(frozen=True, slots=True)
class WrappingKeys:
    """KEK and KIK of one session, derived from the ECDH secret and the session nonce."""

    kek: bytes = field(repr=False)
    kik: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _key("KEK", self.kek)
        _key("KIK", self.kik)


@dataclass(frozen=True, slots=True)
class TransportKeys:
    """TEK (transport encryption key) and TIK (transport integrity key) of a guest."""

    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _key("TEK", self.tek)
        _key("TIK", self.tik)


def _key(name: str, value: bytes) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != KEY_SIZE:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise KeySizeError(f"{name} must be {KEY_SIZE} bytes, got {got}")


def _sized(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise LayoutError(f"{name} must be {size} bytes, got {got}")


def _u32(name: str, value: int) -> bytes:
    if not 0 <= value < 2**32:
        raise InputError(f"{name} must fit in 32 bits, got {value:#x}")
    return value.to_bytes(4, "little")


def _u8(name: str, value: int) -> bytes:
    if not 0 <= value < 2**8:
        raise InputError(f"{name} must fit in 8 bits, got {value:#x}")
    return bytes([value])


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128 in CTR mode with ``iv`` as the 128-bit initial counter block (both directions)."""
    _key("AES-128 key", key)
    _sized("CTR IV", iv, IV_SIZE)
    ctx = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(iv))).encryptor()
    return ctx.update(bytes(data)) + ctx.finalize()


_COUNTERS = np.arange(1 << 12, dtype=np.uint64)  # block offsets of up to 64 KiB of keystream


def _out_buffer(out: bytearray | memoryview, length: int) -> memoryview:
    """``out`` as a writable byte view of exactly ``length`` bytes (InputError otherwise)."""
    view = memoryview(out).cast("B")
    if view.readonly or view.nbytes != length:
        raise InputError(f"an output buffer of {length} writable bytes is needed, got {view.nbytes}"
                         f"{' read-only' if view.readonly else ''}")
    return view


class PacketCrypto:
    """AES-128-CTR under a TEK and HMAC-SHA256 under a TIK, keyed once for many packets (module
    docstring).  Holds key material: keep it where the keys live, and drop it with them."""

    __slots__ = ("_accel", "_ecb", "_mac", "tek", "tik")

    def __init__(self, tek: bytes, tik: bytes, accel: bool | None = None) -> None:
        """``accel``: runs of packets through the C helper (None: when it was built; True: require
        it; False: the Python path)."""
        _key("TEK", tek)
        _key("TIK", tik)
        if accel and not ACCELERATED:
            raise InputError("the C helper sevemu.crypto._transport_accel was not built")
        self.tek, self.tik = bytes(tek), bytes(tik)
        self._accel = ACCELERATED if accel is None else accel
        self._ecb = Cipher(algorithms.AES(self.tek), modes.ECB()).encryptor()
        self._mac = hmac.new(self.tik, digestmod=hashlib.sha256)

    @property
    def accelerated(self) -> bool:
        """Whether :meth:`seal_many` and :meth:`open_many` run in the C helper."""
        return self._accel

    def keyed(self, tek: bytes, tik: bytes) -> bool:
        """Whether these are the contexts of ``tek`` and ``tik``."""
        return self.tek == tek and self.tik == tik

    def ctr(self, iv: bytes, data: bytes) -> bytes:
        """AES-128-CTR(TEK, ``iv``) of ``data`` (either direction; :func:`aes128_ctr`'s bytes)."""
        _sized("CTR IV", iv, IV_SIZE)
        n = (len(data) + 15) >> 4
        if n > len(_COUNTERS):
            return aes128_ctr(self.tek, iv, data)
        hi = np.uint64(int.from_bytes(iv[:8], "big"))
        lo = np.uint64(int.from_bytes(iv[8:], "big"))
        blocks = np.empty((n, 2), dtype=">u8")
        low = lo + _COUNTERS[:n]  # wraps modulo 2^64; the carry goes into the high half
        blocks[:, 1] = low
        blocks[:, 0] = hi + (low < lo)
        stream = np.frombuffer(self._ecb.update(blocks.tobytes()), dtype=np.uint8)
        return (np.frombuffer(data, dtype=np.uint8) ^ stream[: len(data)]).tobytes()

    def ctr_many(self, ivs: Sequence[bytes], datas: Sequence[bytes]) -> list[bytes]:
        """:meth:`ctr` of each (IV, data) pair, the keystreams of all in one AES call."""
        if len(ivs) != len(datas):
            raise InputError(f"{len(ivs)} IVs for {len(datas)} buffers")
        counts = [(len(d) + 15) >> 4 for d in datas]
        if not datas or max(counts) > len(_COUNTERS):
            return [self.ctr(iv, d) for iv, d in zip(ivs, datas, strict=True)]
        for iv in ivs:
            _sized("CTR IV", iv, IV_SIZE)
        heads = np.frombuffer(b"".join(ivs), dtype=">u8").reshape(-1, 2).astype(np.uint64)
        reps = np.asarray(counts)
        hi = np.repeat(heads[:, 0], reps)
        lo = np.repeat(heads[:, 1], reps)
        offsets = np.concatenate([_COUNTERS[:c] for c in counts])
        blocks = np.empty((len(offsets), 2), dtype=">u8")
        low = lo + offsets
        blocks[:, 1] = low
        blocks[:, 0] = hi + (low < lo)
        stream = np.frombuffer(self._ecb.update(blocks.tobytes()), dtype=np.uint8)
        out: list[bytes] = []
        pos = 0
        if all(len(d) == c << 4 for d, c in zip(datas, counts, strict=True)):  # whole blocks: one XOR
            mixed = (np.frombuffer(b"".join(datas), dtype=np.uint8) ^ stream).tobytes()
            for d in datas:
                out.append(mixed[pos : pos + len(d)])
                pos += len(d)
            return out
        for d, c in zip(datas, counts, strict=True):
            out.append((np.frombuffer(d, dtype=np.uint8) ^ stream[pos : pos + len(d)]).tobytes())
            pos += c << 4
        return out

    def mac(self, *parts: bytes | bytearray | memoryview) -> bytes:
        """HMAC-SHA256(TIK, the concatenation of ``parts``)."""
        h = self._mac.copy()
        for part in parts:
            h.update(part)
        return h.digest()

    @staticmethod
    def _run(ivs: bytes, aads: bytes, size: int, *buffers: tuple[str, bytes | bytearray | memoryview, int]) -> int:
        """The packet count of a run (``ivs``: 16 bytes each); InputError unless ``aads`` splits
        evenly and each named buffer holds its per-packet length."""
        if size <= 0 or len(ivs) % IV_SIZE or not ivs:
            raise InputError(f"a run of packets of {size} bytes with {len(ivs)} bytes of IVs")
        n = len(ivs) // IV_SIZE
        if len(aads) % n:
            raise InputError(f"{len(aads)} bytes of AADs for {n} packets")
        for name, buf, each in buffers:
            if memoryview(buf).nbytes != n * each:
                raise InputError(f"{name} holds {memoryview(buf).nbytes} bytes, {n} packets need {n * each}")
        return n

    def seal_many(self, ivs: bytes, aads: bytes, data: bytes | bytearray | memoryview,
                  size: int, out: bytearray | memoryview | None = None) -> tuple[bytearray | memoryview, bytearray]:
        """(TRANS, MACs) of a run of packets of ``size`` bytes each: packet i is
        ``TRANS_i = AES-128-CTR(TEK, iv_i)(data_i)`` and ``MAC_i = HMAC-SHA256(TIK, aad_i || TRANS_i)``
        (``ivs`` 16 bytes and ``aads`` an equal share per packet; TRANS back to back, 32-byte MACs
        back to back).  ``out``: a writable buffer of the data's length that receives TRANS (a run
        that reuses its buffer; it must not overlap ``data``)."""
        n = self._run(ivs, aads, size, ("data", data, size))
        trans = bytearray(n * size) if out is None else _out_buffer(out, n * size)
        macs = bytearray(n * MAC_SIZE)
        if self._accel:
            _transport_accel.seal(self.tek, self.tik, ivs, aads, data, trans, macs, size)
            return trans, macs
        view = memoryview(data).cast("B")
        a = len(aads) // n
        parts = self.ctr_many([ivs[i * IV_SIZE : (i + 1) * IV_SIZE] for i in range(n)],
                              [bytes(view[i * size : (i + 1) * size]) for i in range(n)])
        for i, part in enumerate(parts):
            trans[i * size : (i + 1) * size] = part
            macs[i * MAC_SIZE : (i + 1) * MAC_SIZE] = self.mac(aads[i * a : (i + 1) * a], part)
        return trans, macs

    def seal_many_to_pages(self, ivs: bytes, aads: bytes, data: bytes | bytearray | memoryview,
                           pages: dict[int, bytearray], pfns: npt.NDArray[np.uint64]) -> bytearray:
        """:meth:`seal_many` of 4 KiB packets with packet i's TRANS written straight into
        ``pages[pfns[i]]`` -- a page store (PFN -> 4096-byte bytearray: DRAM's), an absent page
        stored first -- instead of a buffer (the firmware sealing into the pages of a DMA run
        without a copy); returns the MACs.  The same bytes as :meth:`seal_many`.  A page of
        another type or size is refused (TypeError) before any page is written."""
        n = self._run(ivs, aads, PAGE, ("data", data, PAGE))
        column = np.ascontiguousarray(pfns, dtype="<u8")
        if column.shape != (n,):
            raise InputError(f"{n} packets need {n} PFNs, got {column.shape}")
        macs = bytearray(n * MAC_SIZE)
        if self._accel:
            _transport_accel.seal_to_pages(self.tek, self.tik, ivs, aads, data, pages, column.data, macs)
            return macs
        numbers = column.tolist()
        for pfn in numbers:
            page = pages.get(pfn)
            if page is not None and (type(page) is not bytearray or len(page) != PAGE):
                raise TypeError("a page must be a bytearray of 4096 bytes")
        trans, macs = self.seal_many(ivs, aads, data, PAGE)
        for i, pfn in enumerate(numbers):
            page = pages.get(pfn)
            if page is None:
                page = pages[pfn] = bytearray(PAGE)
            page[:] = trans[i * PAGE : (i + 1) * PAGE]
        return macs

    def open_many_from_pages(self, ivs: bytes, aads: bytes, macs: bytes, pages: dict[int, bytearray],
                             pfns: npt.NDArray[np.uint64], out: bytearray | memoryview) -> int:
        """:meth:`open_many` of 4 KiB packets with packet i's TRANS read where it lies, in
        ``pages[pfns[i]]`` (a page store: PFN -> 4096-byte bytearray, DRAM's; an absent page reads
        as zeros) instead of a buffer; the plaintexts of the packets that verified go to ``out``
        (not overlapping any page); returns how many verified.  The same as :meth:`open_many`."""
        n = self._run(ivs, aads, PAGE, ("MACs", macs, MAC_SIZE))
        column = np.ascontiguousarray(pfns, dtype="<u8")
        if column.shape != (n,):
            raise InputError(f"{n} packets need {n} PFNs, got {column.shape}")
        plain = _out_buffer(out, n * PAGE)
        if self._accel:
            return int(_transport_accel.open_from_pages(self.tek, self.tik, ivs, aads, macs, pages, column.data, plain))
        trans = bytearray(n * PAGE)
        for i, pfn in enumerate(column.tolist()):
            page = pages.get(pfn)
            if page is not None:
                if type(page) is not bytearray or len(page) != PAGE:
                    raise TypeError("a page must be a bytearray of 4096 bytes")
                trans[i * PAGE : (i + 1) * PAGE] = page
        good, _ = self.open_many(ivs, aads, macs, trans, PAGE, plain)
        return good

    def open_many(self, ivs: bytes, aads: bytes, macs: bytes, trans: bytes | bytearray | memoryview,
                  size: int, out: bytearray | memoryview | None = None) -> tuple[int, bytearray | memoryview]:
        """Verify a run of packets in order (``MAC_i`` against HMAC-SHA256(TIK, aad_i || TRANS_i),
        constant-time) and decrypt each that verifies: (how many verified before the first that did
        not, their plaintexts back to back -- the rest of a new buffer zero).  ``out``: a writable
        buffer of TRANS's length that receives the plaintexts (a run that reuses its buffer; it must
        not overlap ``trans``; past the verified packets its bytes are left as they were)."""
        n = self._run(ivs, aads, size, ("MACs", macs, MAC_SIZE), ("TRANS", trans, size))
        plain = bytearray(n * size) if out is None else _out_buffer(out, n * size)
        if self._accel:
            return _transport_accel.open(self.tek, self.tik, ivs, aads, macs, trans, plain, size), plain
        view = memoryview(trans).cast("B")
        a = len(aads) // n
        good = 0
        while good < n:
            i = good
            if not hmac.compare_digest(self.mac(aads[i * a : (i + 1) * a], view[i * size : (i + 1) * size]),
                                       bytes(macs[i * MAC_SIZE : (i + 1) * MAC_SIZE])):
                break
            good += 1
        if good:
            parts = self.ctr_many([ivs[i * IV_SIZE : (i + 1) * IV_SIZE] for i in range(good)],
                                  [bytes(view[i * size : (i + 1) * size]) for i in range(good)])
            plain[: good * size] = b"".join(parts)
        return good, plain


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``."""
    return hmac.new(bytes(key), bytes(data), hashlib.sha256).digest()


def _check_mac(expected: bytes, given: bytes, error: type[VerificationError], what: str) -> None:
    _sized(what, given, MAC_SIZE)
    if not hmac.compare_digest(expected, bytes(given)):
        raise error(f"{what} does not verify")


# -- session establishment (1.9) ---------------------------------------------------------------


def derive_master_secret(z: bytes, nonce: bytes) -> bytes:
    """master = KDF(Z, "sev-master-secret", nonce, 16).

    ``z`` is the raw ECDH output (48 bytes for P-384; the published test vector uses 16 zero
    bytes, so any non-empty length is accepted).
    """
    if not z:
        raise InputError("shared secret Z must not be empty")
    _sized("session nonce", nonce, NONCE_SIZE)
    return kdf(bytes(z), MASTER_SECRET_LABEL, bytes(nonce), KEY_SIZE)


def derive_wrapping_keys(master: bytes) -> WrappingKeys:
    """KEK = KDF(master, "sev-kek", "", 16); KIK = KDF(master, "sev-kik", "", 16)."""
    _key("master secret", master)
    return WrappingKeys(
        kek=kdf(bytes(master), KEK_LABEL, b"", KEY_SIZE),
        kik=kdf(bytes(master), KIK_LABEL, b"", KEY_SIZE),
    )


def session_wrapping_keys(z: bytes, nonce: bytes) -> WrappingKeys:
    """KEK and KIK straight from the shared secret and the session nonce."""
    return derive_wrapping_keys(derive_master_secret(z, nonce))


def wrap_transport_keys(wrapping: WrappingKeys, keys: TransportKeys, wrap_iv: bytes) -> tuple[bytes, bytes]:
    """(wrap_tk, wrap_mac) for TEK||TIK under KEK/KIK and ``wrap_iv``."""
    wrap_tk = aes128_ctr(wrapping.kek, wrap_iv, keys.tek + keys.tik)
    return wrap_tk, hmac_sha256(wrapping.kik, wrap_tk)


def unwrap_transport_keys(
    wrapping: WrappingKeys, wrap_tk: bytes, wrap_iv: bytes, wrap_mac: bytes
) -> TransportKeys:
    """Verify ``wrap_mac`` over ``wrap_tk`` with KIK, then decrypt TEK||TIK with KEK.

    Raises :class:`WrapMacError` when the MAC does not verify.
    """
    _sized("wrap_tk", wrap_tk, 2 * KEY_SIZE)
    _check_mac(hmac_sha256(wrapping.kik, wrap_tk), wrap_mac, WrapMacError, "wrap_mac")
    plain = aes128_ctr(wrapping.kek, wrap_iv, wrap_tk)
    return TransportKeys(tek=plain[:KEY_SIZE], tik=plain[KEY_SIZE:])


def policy_mac(tik: bytes, policy: int) -> bytes:
    """policy_mac = HMAC-SHA256(TIK, le32(policy))."""
    _key("TIK", tik)
    return hmac_sha256(tik, _u32("policy", policy))


def verify_policy_mac(tik: bytes, policy: int, mac: bytes) -> None:
    """Raise :class:`PolicyMacError` unless ``mac`` is :func:`policy_mac` of ``policy``."""
    _check_mac(policy_mac(tik, policy), mac, PolicyMacError, "policy_mac")


def seal_session(
    z: bytes, nonce: bytes, wrap_iv: bytes, keys: TransportKeys, policy: int
) -> SessionBuf:
    """Build the session buffer that hands ``keys`` to the peer holding the other half of ``z``."""
    wrapping = session_wrapping_keys(z, nonce)
    wrap_tk, wrap_mac = wrap_transport_keys(wrapping, keys, wrap_iv)
    return SessionBuf(
        nonce=bytes(nonce),
        wrap_tk=wrap_tk,
        wrap_iv=bytes(wrap_iv),
        wrap_mac=wrap_mac,
        policy_mac=policy_mac(keys.tik, policy),
    )


def open_session(z: bytes, session: SessionBuf | bytes, policy: int) -> TransportKeys:
    """Inverse of :func:`seal_session`: check both MACs and return TEK/TIK.

    Raises :class:`WrapMacError` (wrong Z, nonce or wrap_tk), :class:`PolicyMacError` (policy not
    the one sealed, or a wrong TIK from an altered wrap_iv), :class:`~sevemu.errors.LayoutError`
    for a buffer that is not 0x80 bytes.
    """
    buf = session if isinstance(session, SessionBuf) else SessionBuf.decode(session)
    wrapping = session_wrapping_keys(z, buf.nonce)
    keys = unwrap_transport_keys(wrapping, buf.wrap_tk, buf.wrap_iv, buf.wrap_mac)
    verify_policy_mac(keys.tik, policy, buf.policy_mac)
    return keys


# -- LAUNCH_MEASURE (1.10) ---------------------------------------------------------------------


def api_at_least(api_major: int, api_minor: int, major: int, minor: int) -> bool:
    """True when firmware API ``api_major.api_minor`` is ``major.minor`` or later."""
    return (api_major, api_minor) >= (major, minor)


def measure_mac(
    tik: bytes,
    *,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    launch_digest: bytes,
    mnonce: bytes,
) -> bytes:
    """MEASURE = HMAC-SHA256(TIK, [0x04 || major || minor || build] || le32(policy) || LD || MNONCE).

    The bracketed prefix is present for API >= 0.17 only.
    """
    _key("TIK", tik)
    _sized("launch digest", launch_digest, DIGEST_SIZE)
    _sized("MNONCE", mnonce, MNONCE_SIZE)
    msg = bytearray()
    if api_at_least(api_major, api_minor, *_MEASURE_TERM_API):
        msg += bytes([MEASURE_CONTEXT])
        msg += _u8("API major", api_major) + _u8("API minor", api_minor) + _u8("build", build)
    msg += _u32("policy", policy) + bytes(launch_digest) + bytes(mnonce)
    return hmac_sha256(tik, bytes(msg))


def verify_measure_mac(
    tik: bytes,
    measure: bytes,
    *,
    api_major: int,
    api_minor: int,
    build: int,
    policy: int,
    launch_digest: bytes,
    mnonce: bytes,
) -> None:
    """Raise :class:`MeasureMacError` unless ``measure`` is :func:`measure_mac` of the inputs."""
    expected = measure_mac(
        tik,
        api_major=api_major,
        api_minor=api_minor,
        build=build,
        policy=policy,
        launch_digest=launch_digest,
        mnonce=mnonce,
    )
    _check_mac(expected, measure, MeasureMacError, "MEASURE")


# -- packets: LAUNCH_SECRET (1.11) -------------------------------------------------------------


def _measure_term(api_major: int, api_minor: int, measure: bytes | None) -> bytes:
    if not api_at_least(api_major, api_minor, *_MEASURE_TERM_API):
        return b""
    if measure is None:
        raise InputError("API >= 0.17 packet MACs cover MEASURE; none was given")
    _sized("MEASURE", measure, MAC_SIZE)
    return bytes(measure)


def packet_mac(
    tik: bytes,
    *,
    flags: int,
    iv: bytes,
    guest_len: int,
    trans: bytes,
    api_major: int,
    api_minor: int,
    measure: bytes | None,
) -> bytes:
    """HMAC-SHA256(TIK, 0x01 || le32(flags) || iv || le32(guest_len) || le32(len(trans)) || trans
    [|| measure]).

    ``measure`` (the 32-byte MEASURE of this launch) is required for API >= 0.17 and ignored
    before it.
    """
    _key("TIK", tik)
    _sized("packet IV", iv, IV_SIZE)
    msg = (
        bytes([PACKET_CONTEXT])
        + _u32("flags", flags)
        + bytes(iv)
        + _u32("guest_len", guest_len)
        + _u32("trans_len", len(trans))
        + bytes(trans)
        + _measure_term(api_major, api_minor, measure)
    )
    return hmac_sha256(tik, msg)


def seal_packet(
    keys: TransportKeys,
    plaintext: bytes,
    *,
    iv: bytes,
    api_major: int,
    api_minor: int,
    measure: bytes | None,
    flags: int = 0,
) -> tuple[HdrBuf, bytes]:
    """Encrypt ``plaintext`` under TEK and MAC it under TIK: returns (header, TRANS).

    GUEST_LEN = TRANS_LEN = ``len(plaintext)`` (CTR mode keeps the length).
    """
    trans = aes128_ctr(keys.tek, iv, plaintext)
    mac = packet_mac(
        keys.tik,
        flags=flags,
        iv=iv,
        guest_len=len(plaintext),
        trans=trans,
        api_major=api_major,
        api_minor=api_minor,
        measure=measure,
    )
    return HdrBuf(flags=flags, iv=bytes(iv), mac=mac), trans


def open_packet(
    keys: TransportKeys,
    header: HdrBuf | bytes,
    trans: bytes,
    *,
    guest_len: int,
    api_major: int,
    api_minor: int,
    measure: bytes | None,
) -> bytes:
    """Inverse of :func:`seal_packet`: verify the header MAC, then decrypt TRANS with TEK.

    Raises :class:`PacketMacError` when the MAC does not verify.
    """
    hdr = header if isinstance(header, HdrBuf) else HdrBuf.decode(header)
    expected = packet_mac(
        keys.tik,
        flags=hdr.flags,
        iv=hdr.iv,
        guest_len=guest_len,
        trans=trans,
        api_major=api_major,
        api_minor=api_minor,
        measure=measure,
    )
    _check_mac(expected, hdr.mac, PacketMacError, "packet MAC")
    return aes128_ctr(keys.tek, hdr.iv, trans)
