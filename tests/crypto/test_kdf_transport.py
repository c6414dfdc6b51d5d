"""SP800-108 KDF and the SEV transport primitives: SEV API 55766 session/measure/secret vectors, round trips, tampering."""

from __future__ import annotations

import hashlib
import hmac
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu.abi.sev import HdrBuf, SessionBuf
from sevemu.crypto import transport as tp
from sevemu.crypto.kdf import kdf
from sevemu.errors import InputError, KeySizeError, LayoutError, VerificationError

Z0 = bytes(16)
ZERO_KEYS = tp.TransportKeys(tek=bytes(16), tik=bytes(16))


def flip(data: bytes, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# -- KDF ------------------------------------------------------------------------------------------


def test_kdf_reference_vector() -> None:
    assert kdf(bytes(16), b"sev-master-secret", bytes(16), 16).hex() == "ab4d269fcc62bedb4511d56c386ce706"


def test_kdf_matches_the_formula_over_several_blocks() -> None:
    key, label, ctx = b"k" * 16, b"label", b"context"
    length = 80  # three blocks, the last truncated
    fixed = label + b"\x00" + ctx + (8 * length).to_bytes(4, "little")
    blocks = b"".join(
        hmac.new(key, i.to_bytes(4, "little") + fixed, hashlib.sha256).digest() for i in (1, 2, 3)
    )
    assert kdf(key, label, ctx, length) == blocks[:length]


def test_kdf_length_is_bound_into_every_block() -> None:
    # L is part of the PRF input, so a shorter output is not a prefix of a longer one.
    assert kdf(b"k" * 16, b"x", b"", 32)[:16] != kdf(b"k" * 16, b"x", b"", 16)


@pytest.mark.parametrize("length", [0, -1, 2**32])
def test_kdf_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(InputError):
        kdf(b"k" * 16, b"x", b"", length)


def test_kdf_rejects_empty_key() -> None:
    with pytest.raises(InputError):
        kdf(b"", b"x", b"", 16)


# -- session buffer (1.9) --------------------------------------------------------------------------


def test_session_reference_vectors() -> None:
    buf = tp.seal_session(Z0, bytes(16), bytes(16), ZERO_KEYS, 0)
    assert buf.wrap_tk.hex() == "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    assert buf.wrap_mac.hex() == "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    assert buf.policy_mac.hex() == "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
    assert buf.nonce == bytes(16) and buf.wrap_iv == bytes(16)
    assert len(buf.encode()) == 0x80


def test_session_derivation_steps() -> None:
    master = tp.derive_master_secret(Z0, bytes(16))
    assert master.hex() == "ab4d269fcc62bedb4511d56c386ce706"
    wk = tp.derive_wrapping_keys(master)
    assert wk.kek == kdf(master, b"sev-kek", b"", 16)
    assert wk.kik == kdf(master, b"sev-kik", b"", 16)
    assert tp.session_wrapping_keys(Z0, bytes(16)) == wk


@given(
    z=st.binary(min_size=48, max_size=48),
    nonce=st.binary(min_size=16, max_size=16),
    iv=st.binary(min_size=16, max_size=16),
    tek=st.binary(min_size=16, max_size=16),
    tik=st.binary(min_size=16, max_size=16),
    policy=st.integers(0, 2**32 - 1),
)
def test_session_round_trip(z: bytes, nonce: bytes, iv: bytes, tek: bytes, tik: bytes, policy: int) -> None:
    keys = tp.TransportKeys(tek=tek, tik=tik)
    blob = tp.seal_session(z, nonce, iv, keys, policy).encode()
    assert tp.open_session(z, blob, policy) == keys


@pytest.mark.parametrize(
    ("field", "error"),
    [
        ("nonce", tp.WrapMacError),  # other master secret -> other KIK
        ("wrap_tk", tp.WrapMacError),
        ("wrap_mac", tp.WrapMacError),
        ("wrap_iv", tp.PolicyMacError),  # not MACed; unwraps to a wrong TIK
        ("policy_mac", tp.PolicyMacError),
    ],
)
def test_session_tampering(field: str, error: type[VerificationError]) -> None:
    keys = tp.TransportKeys(tek=b"E" * 16, tik=b"I" * 16)
    buf = tp.seal_session(b"z" * 48, b"n" * 16, b"v" * 16, keys, 0x37)
    for bit in (0, 77, 8 * len(getattr(buf, field)) - 1):
        fields = {name: getattr(buf, name) for name in ("nonce", "wrap_tk", "wrap_iv", "wrap_mac", "policy_mac")}
        fields[field] = flip(fields[field], bit % (8 * len(fields[field])))
        with pytest.raises(error):
            tp.open_session(b"z" * 48, SessionBuf(**fields), 0x37)


def test_session_wrong_policy_or_wrong_secret() -> None:
    keys = tp.TransportKeys(tek=b"E" * 16, tik=b"I" * 16)
    blob = tp.seal_session(b"z" * 48, b"n" * 16, b"v" * 16, keys, 0x37).encode()
    with pytest.raises(tp.PolicyMacError):
        tp.open_session(b"z" * 48, blob, 0x33)
    with pytest.raises(tp.WrapMacError):
        tp.open_session(b"y" * 48, blob, 0x37)
    with pytest.raises(LayoutError):
        tp.open_session(b"z" * 48, blob[:-1], 0x37)


def test_policy_mac_rejects_out_of_range_policy() -> None:
    with pytest.raises(InputError):
        tp.policy_mac(bytes(16), 2**32)


def test_key_sizes_are_checked() -> None:
    with pytest.raises(KeySizeError):
        tp.TransportKeys(tek=bytes(15), tik=bytes(16))
    with pytest.raises(KeySizeError):
        tp.WrappingKeys(kek=bytes(16), kik=bytes(32))
    with pytest.raises(LayoutError):
        tp.seal_session(Z0, bytes(15), bytes(16), ZERO_KEYS, 0)
    with pytest.raises(LayoutError):
        tp.aes128_ctr(bytes(16), bytes(8), b"x")
    with pytest.raises(InputError):
        tp.derive_master_secret(b"", bytes(16))


def test_key_material_is_not_in_repr() -> None:
    keys = tp.TransportKeys(tek=b"\xaa" * 16, tik=b"\xbb" * 16)
    assert "aa" not in repr(keys) and "170" not in repr(keys)


# -- LAUNCH_MEASURE (1.10) -------------------------------------------------------------------------

MEASURE_INPUT = {
    "api_major": 0,
    "api_minor": 18,
    "build": 0x0F,
    "policy": 0,
    "launch_digest": bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    "mnonce": bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"),
}
MEASURE_TIK = bytes.fromhex("66320db73158a35a255d051758e95ed4")
MEASURE_EXPECTED = "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"


def test_measure_reference_vector() -> None:
    assert tp.measure_mac(MEASURE_TIK, **MEASURE_INPUT).hex() == MEASURE_EXPECTED


def test_measure_before_api_0_17_omits_the_prefix() -> None:
    inp = dict(MEASURE_INPUT, api_major=0, api_minor=16)
    expected = hmac.new(
        MEASURE_TIK,
        (0).to_bytes(4, "little") + MEASURE_INPUT["launch_digest"] + MEASURE_INPUT["mnonce"],
        hashlib.sha256,
    ).digest()
    assert tp.measure_mac(MEASURE_TIK, **inp) == expected
    # and the version/build are then not bound
    assert tp.measure_mac(MEASURE_TIK, **dict(inp, build=99)) == expected
    assert tp.api_at_least(0, 17, 0, 17) and tp.api_at_least(1, 0, 0, 17) and not tp.api_at_least(0, 16, 0, 17)


@pytest.mark.parametrize("field", ["api_major", "api_minor", "build", "policy", "launch_digest", "mnonce"])
def test_measure_binds_every_input(field: str) -> None:
    measure = bytes.fromhex(MEASURE_EXPECTED)
    tp.verify_measure_mac(MEASURE_TIK, measure, **MEASURE_INPUT)
    value = MEASURE_INPUT[field]
    changed = flip(value) if isinstance(value, bytes) else value ^ 1
    with pytest.raises(tp.MeasureMacError):
        tp.verify_measure_mac(MEASURE_TIK, measure, **dict(MEASURE_INPUT, **{field: changed}))


@pytest.mark.parametrize("bit", [0, 100, 255])
def test_measure_flipped_bit(bit: int) -> None:
    with pytest.raises(tp.MeasureMacError):
        tp.verify_measure_mac(MEASURE_TIK, flip(bytes.fromhex(MEASURE_EXPECTED), bit), **MEASURE_INPUT)


def test_measure_field_ranges() -> None:
    with pytest.raises(InputError):
        tp.measure_mac(MEASURE_TIK, **dict(MEASURE_INPUT, build=256))
    with pytest.raises(LayoutError):
        tp.measure_mac(MEASURE_TIK, **dict(MEASURE_INPUT, mnonce=bytes(15)))
    with pytest.raises(LayoutError):
        tp.verify_measure_mac(MEASURE_TIK, bytes(31), **MEASURE_INPUT)


# -- packets (1.11) --------------------------------------------------------------------------------

KEYS = tp.TransportKeys(tek=b"T" * 16, tik=b"I" * 16)
MEASURE = b"M" * 32
API_NEW = {"api_major": 1, "api_minor": 40}
API_OLD = {"api_major": 0, "api_minor": 16}


def test_packet_mac_formula() -> None:
    iv, plain = b"v" * 16, b"secret data!"
    hdr, trans = tp.seal_packet(KEYS, plain, iv=iv, measure=MEASURE, **API_NEW)
    assert trans == tp.aes128_ctr(KEYS.tek, iv, plain) and len(trans) == len(plain)
    msg = b"\x01" + bytes(4) + iv + (12).to_bytes(4, "little") * 2 + trans + MEASURE
    assert hdr.mac == hmac.new(KEYS.tik, msg, hashlib.sha256).digest()
    assert hdr.flags == 0 and hdr.iv == iv and len(hdr.encode()) == 0x34


def test_packet_before_api_0_17_has_no_measure_term() -> None:
    iv, plain = b"v" * 16, b"secret data!"
    hdr_old, _ = tp.seal_packet(KEYS, plain, iv=iv, measure=None, **API_OLD)
    hdr_other, _ = tp.seal_packet(KEYS, plain, iv=iv, measure=b"X" * 32, **API_OLD)
    assert hdr_old == hdr_other
    with pytest.raises(InputError):
        tp.seal_packet(KEYS, plain, iv=iv, measure=None, **API_NEW)


@given(plain=st.binary(max_size=300), iv=st.binary(min_size=16, max_size=16), flags=st.sampled_from([0, 1]))
def test_packet_round_trip(plain: bytes, iv: bytes, flags: int) -> None:
    hdr, trans = tp.seal_packet(KEYS, plain, iv=iv, measure=MEASURE, flags=flags, **API_NEW)
    got = tp.open_packet(KEYS, hdr.encode(), trans, guest_len=len(plain), measure=MEASURE, **API_NEW)
    assert got == plain


@pytest.mark.parametrize("what", ["flags", "iv", "mac", "trans", "measure", "guest_len", "tik"])
def test_packet_tampering(what: str) -> None:
    plain = b"0123456789abcdef0123"
    hdr, trans = tp.seal_packet(KEYS, plain, iv=b"v" * 16, measure=MEASURE, **API_NEW)
    keys, measure, guest_len = KEYS, MEASURE, len(plain)
    if what == "flags":
        hdr = HdrBuf(flags=hdr.flags ^ 1, iv=hdr.iv, mac=hdr.mac)
    elif what == "iv":
        hdr = HdrBuf(flags=hdr.flags, iv=flip(hdr.iv, 5), mac=hdr.mac)
    elif what == "mac":
        hdr = HdrBuf(flags=hdr.flags, iv=hdr.iv, mac=flip(hdr.mac, 200))
    elif what == "trans":
        trans = flip(trans, 9)
    elif what == "measure":
        measure = flip(measure, 31)
    elif what == "guest_len":
        guest_len += 1
    else:
        keys = tp.TransportKeys(tek=KEYS.tek, tik=flip(KEYS.tik))
    with pytest.raises(tp.PacketMacError):
        tp.open_packet(keys, hdr, trans, guest_len=guest_len, measure=measure, **API_NEW)


def test_open_packet_rejects_malformed_header() -> None:
    with pytest.raises(LayoutError):
        tp.open_packet(KEYS, bytes(0x33), b"", guest_len=0, measure=MEASURE, **API_NEW)


# -- runs of packets (PacketCrypto.seal_many / open_many: the C helper and the Python path) ----------
RUN_PATHS = [
    pytest.param(True, id="accel", marks=pytest.mark.skipif(not tp.ACCELERATED, reason="C helper not built")),
    pytest.param(False, id="python"),
]


def _run(n: int, size: int, aad: int = 29) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    rng = random.Random(n * 7919 + size)
    tek, tik = rng.randbytes(16), rng.randbytes(16)
    return tek, tik, rng.randbytes(16 * n), rng.randbytes(aad * n), rng.randbytes(n * size)


@pytest.mark.parametrize("accel", RUN_PATHS)
@pytest.mark.parametrize("n,size", [(1, 16), (3, 4096), (5, 4000), (130, 4096)])
def test_seal_many_is_each_packet_on_its_own(accel: bool, n: int, size: int) -> None:
    """Packet i of a run: AES-128-CTR under TEK with its own IV, HMAC-SHA256 under TIK over its AAD
    and TRANS -- the bytes of aes128_ctr and hmac_sha256 packet by packet."""
    tek, tik, ivs, aads, data = _run(n, size)
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    assert pc.accelerated is accel
    trans, macs = pc.seal_many(ivs, aads, data, size)
    for i in range(n):
        t = tp.aes128_ctr(tek, ivs[16 * i : 16 * i + 16], data[i * size : (i + 1) * size])
        assert trans[i * size : (i + 1) * size] == t
        assert macs[32 * i : 32 * i + 32] == tp.hmac_sha256(tik, aads[29 * i : 29 * i + 29] + t)
    good, plain = pc.open_many(ivs, aads, bytes(macs), trans, size)
    assert good == n and plain == data


@pytest.mark.parametrize("accel", RUN_PATHS)
@pytest.mark.parametrize("what", ["trans", "mac", "aad"])
def test_open_many_stops_at_the_first_packet_that_does_not_verify(accel: bool, what: str) -> None:
    n, size, bad = 8, 4096, 5
    tek, tik, ivs, aads, data = _run(n, size)
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    trans, macs = pc.seal_many(ivs, aads, data, size)
    bufs = {"trans": bytearray(trans), "mac": bytearray(macs), "aad": bytearray(aads)}
    at = {"trans": bad * size + 100, "mac": bad * 32, "aad": bad * 29 + 3}[what]
    bufs[what][at] ^= 1
    good, plain = pc.open_many(ivs, bytes(bufs["aad"]), bytes(bufs["mac"]), bufs["trans"], size)
    assert good == bad
    assert plain[: bad * size] == data[: bad * size] and not any(plain[bad * size :])


@pytest.mark.parametrize("accel", RUN_PATHS)
def test_runs_into_reused_buffers_give_the_same_bytes(accel: bool) -> None:
    """``out=``: TRANS and the plaintexts land in the caller's buffer, the same bytes as new ones;
    past a packet that does not verify, the buffer keeps what it held (nothing of that packet or
    the ones after it is written)."""
    n, size, bad = 6, 4096, 4
    tek, tik, ivs, aads, data = _run(n, size)
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    fresh, macs = pc.seal_many(ivs, aads, data, size)
    out = bytearray(b"\xee" * (n * size))
    view = memoryview(out)
    trans, macs2 = pc.seal_many(ivs, aads, data, size, view)
    assert out == fresh and macs2 == macs and bytes(trans) == bytes(fresh)
    tampered = bytearray(macs)
    tampered[bad * 32] ^= 1
    plain = bytearray(b"\xaa" * (n * size))
    good, got = pc.open_many(ivs, aads, bytes(tampered), out, size, plain)
    assert good == bad and bytes(got) == bytes(plain)
    assert plain[: bad * size] == data[: bad * size] and plain[bad * size :] == b"\xaa" * ((n - bad) * size)
    for wrong in (bytearray(n * size - 1), bytes(n * size)):  # short; read-only
        with pytest.raises(InputError):
            pc.seal_many(ivs, aads, data, size, wrong)  # type: ignore[arg-type]
        with pytest.raises(InputError):
            pc.open_many(ivs, aads, bytes(macs), fresh, size, wrong)  # type: ignore[arg-type]


@pytest.mark.skipif(not tp.ACCELERATED, reason="C helper not built")
def test_the_c_helper_and_the_python_path_make_the_same_bytes() -> None:
    tek, tik, ivs, aads, data = _run(64, 4096, aad=40)
    one = tp.PacketCrypto(tek, tik, accel=True).seal_many(ivs, aads, data, 4096)
    two = tp.PacketCrypto(tek, tik, accel=False).seal_many(ivs, aads, data, 4096)
    assert one == two


def test_runs_of_packets_check_their_lengths() -> None:
    pc = tp.PacketCrypto(bytes(16), bytes(16))
    with pytest.raises(InputError):
        pc.seal_many(bytes(32), bytes(58), bytes(4096 * 3), 4096)  # 2 IVs, 3 packets of data
    with pytest.raises(InputError):
        pc.seal_many(bytes(32), bytes(57), bytes(8192), 4096)  # AADs do not split in two
    with pytest.raises(InputError):
        pc.open_many(bytes(16), bytes(29), bytes(31), bytes(4096), 4096)  # a short MAC
    with pytest.raises(InputError):
        pc.seal_many(b"", b"", b"", 4096)


# -- seal_many_to_pages: each packet's TRANS straight into a page of a page store (DRAM's) -----------
@pytest.mark.parametrize("accel", RUN_PATHS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), present=st.integers(0, 2**9 - 1))
def test_seal_many_to_pages_is_seal_many(accel: bool, n: int, seed: int, present: int) -> None:
    """The same TRANS and MACs as :meth:`seal_many` (the C helper's as the Python path's), packet
    i in the page at its PFN -- present pages written in place, absent ones stored -- and every
    other page untouched."""
    rng = random.Random(seed)
    tek, tik, ivs, aads, data = (rng.randbytes(16), rng.randbytes(16), rng.randbytes(16 * n),
                                 rng.randbytes(29 * n), rng.randbytes(n * 4096))
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    trans, macs = pc.seal_many(ivs, aads, data, 4096)
    pfns = np.array(rng.sample(range(1000), n), dtype=np.uint64)
    pages = {int(pfn): bytearray(b"\x5a" * 4096) for i, pfn in enumerate(pfns) if present >> i & 1}
    kept = {2000: bytearray(b"\x77" * 4096)}
    pages.update(kept)
    held = {pfn: page for pfn, page in pages.items()}
    assert pc.seal_many_to_pages(ivs, aads, data, pages, pfns) == macs
    for i, pfn in enumerate(pfns.tolist()):
        assert pages[pfn] == trans[i * 4096 : (i + 1) * 4096]
        if pfn in held:
            assert pages[pfn] is held[pfn]  # (written in place)
    assert pages[2000] == b"\x77" * 4096 and len(pages) == n + 1
    if tp.ACCELERATED:
        other: dict[int, bytearray] = {}
        assert tp.PacketCrypto(tek, tik, accel=not accel).seal_many_to_pages(ivs, aads, data, other, pfns) == macs
        assert all(other[pfn] == pages[pfn] for pfn in pfns.tolist())


@pytest.mark.parametrize("accel", RUN_PATHS)
def test_seal_many_to_pages_refuses_a_bad_store_unchanged(accel: bool) -> None:
    tek, tik, ivs, aads, data = _run(3, 4096)
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    pages: dict[int, bytearray] = {7: bytearray(100)}
    with pytest.raises(TypeError):
        pc.seal_many_to_pages(ivs, aads, data, pages, np.array([5, 6, 7], dtype=np.uint64))
    assert list(pages) == [7] and pages[7] == bytearray(100)
    with pytest.raises(InputError):
        pc.seal_many_to_pages(ivs, aads, data, {}, np.array([5, 6], dtype=np.uint64))


@pytest.mark.skipif(not tp.ACCELERATED, reason="the C helper is not built")
def test_the_page_helpers_share_their_argument_checks() -> None:
    """seal_to_pages and open_from_pages (one marshalling helper in C): a page of the wrong type or
    size is refused before anything is written (open: the output untouched), as is a page that
    overlaps the flat buffer the packets come from (seal) or go to (open), and a PFN column of the
    wrong length."""
    from sevemu.crypto import _transport_accel as c

    tek, tik, ivs, aads, data = _run(2, 4096)
    macs = bytearray(64)
    pfns = np.array([5, 6], dtype="<u8")
    for bad in (bytearray(100), bytes(4096)):
        pages = {5: bytearray(b"\x11" * 4096), 6: bad}
        with pytest.raises(TypeError):
            c.seal_to_pages(tek, tik, ivs, aads, data, pages, pfns.data, macs)
        assert pages[5] == b"\x11" * 4096 and macs == bytes(64)
        out = bytearray(b"\x22" * 8192)
        with pytest.raises(TypeError):
            c.open_from_pages(tek, tik, ivs, aads, bytes(64), pages, pfns.data, out)
        assert out == b"\x22" * 8192
    flat = bytearray(data[:4096])  # one packet whose page is the flat buffer itself
    one = np.array([6], dtype="<u8")
    with pytest.raises(ValueError, match="overlaps the plaintext"):
        c.seal_to_pages(tek, tik, ivs[:16], aads[:29], flat, {6: flat}, one.data, macs[:32])
    with pytest.raises(ValueError, match="overlaps the output"):
        c.open_from_pages(tek, tik, ivs[:16], aads[:29], bytes(32), {6: flat}, one.data, flat)
    shared = {5: bytearray(4096), 6: bytearray(4096)}
    with pytest.raises(ValueError, match="one u64 per packet"):
        c.open_from_pages(tek, tik, ivs, aads, bytes(64), shared, pfns[:1].data, bytearray(8192))
    with pytest.raises(TypeError, match="takes 8 arguments"):
        c.seal_to_pages(tek, tik, ivs, aads, data, shared, pfns.data)


@pytest.mark.parametrize("accel", RUN_PATHS)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**32 - 1), bad=st.integers(-1, 8), absent=st.integers(-1, 8))
def test_open_many_from_pages_is_open_many(accel: bool, n: int, seed: int, bad: int, absent: int) -> None:
    """The same count and plaintexts as :meth:`open_many` of the same TRANS gathered (an absent page
    read as zeros; a packet altered stops the run there), the C helper's as the Python path's, the
    page store unchanged."""
    rng = random.Random(seed)
    tek, tik, ivs, aads, data = (rng.randbytes(16), rng.randbytes(16), rng.randbytes(16 * n),
                                 rng.randbytes(29 * n), rng.randbytes(n * 4096))
    pc = tp.PacketCrypto(tek, tik, accel=accel)
    trans, macs = pc.seal_many(ivs, aads, data, 4096)
    gathered = bytearray(trans)
    pfns = np.array(rng.sample(range(1000), n), dtype=np.uint64)
    pages = {pfn: bytearray(trans[i * 4096 : (i + 1) * 4096]) for i, pfn in enumerate(pfns.tolist())}
    if 0 <= bad < n:
        pages[int(pfns[bad])][rng.randrange(4096)] ^= 1 << rng.randrange(8)
        gathered[bad * 4096 :] = b"".join(pages[p] for p in pfns[bad:].tolist())
    if 0 <= absent < n:
        del pages[int(pfns[absent])]
        gathered[absent * 4096 : (absent + 1) * 4096] = bytes(4096)
    before = {p: bytes(v) for p, v in pages.items()}
    want = bytearray(b"\xaa" * (n * 4096))
    good = pc.open_many(ivs, aads, bytes(macs), gathered, 4096, want)[0]
    got = bytearray(b"\xaa" * (n * 4096))
    assert pc.open_many_from_pages(ivs, aads, bytes(macs), pages, pfns, got) == good
    assert got == want and {p: bytes(v) for p, v in pages.items()} == before
    if tp.ACCELERATED:
        other = bytearray(b"\xaa" * (n * 4096))
        assert tp.PacketCrypto(tek, tik, accel=not accel).open_many_from_pages(ivs, aads, bytes(macs), pages,
                                                                               pfns, other) == good
        assert other == got
