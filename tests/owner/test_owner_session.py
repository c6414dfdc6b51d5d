"""LaunchSession -> MeasuredLaunch -> LaunchSecret, checked against the firmware-side inverse."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.crypto import transport as tp
from sevemu.errors import InputError, LayoutError
from sevemu.owner.measurement import launch_measure_blob
from sevemu.owner.secret import parse_secret_table
from sevemu.owner.session import LaunchSession, MeasuredLaunch, shared_secret

POLICY = 0x33
API = {"api_major": 1, "api_minor": 49, "build": 6}
LD = hashlib.sha256(b"guest image").digest()
MNONCE = bytes(range(16))


@pytest.fixture(scope="module")
def pdh() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def firmware_open(pdh: ec.EllipticCurvePrivateKey, session: LaunchSession, policy: int = POLICY) -> tp.TransportKeys:
    """What LAUNCH_START does with the GODH key and the session blob."""
    z = pdh.exchange(ec.ECDH(), session.godh_public_key())
    return tp.open_session(z, session.session_blob, policy)


def test_firmware_unwraps_the_owner_keys(pdh: ec.EllipticCurvePrivateKey) -> None:
    session = LaunchSession.create(pdh.public_key(), POLICY)
    assert len(session.session_blob) == 0x80
    assert firmware_open(pdh, session) == session.keys
    assert isinstance(session.godh_public_key().curve, ec.SECP384R1)


def test_every_session_is_fresh(pdh: ec.EllipticCurvePrivateKey) -> None:
    a = LaunchSession.create(pdh.public_key(), POLICY)
    b = LaunchSession.create(pdh.public_key(), POLICY)
    assert a.keys != b.keys and a.session.nonce != b.session.nonce and a.session.wrap_iv != b.session.wrap_iv
    assert a.godh_public_key().public_numbers() != b.godh_public_key().public_numbers()


def test_deterministic_inputs_give_the_transport_construction(pdh: ec.EllipticCurvePrivateKey) -> None:
    godh = ec.generate_private_key(ec.SECP384R1())
    session = LaunchSession.create(
        pdh.public_key(), POLICY, tek=b"E" * 16, tik=b"I" * 16, godh_private=godh, nonce=b"n" * 16, wrap_iv=b"v" * 16
    )
    z = godh.exchange(ec.ECDH(), pdh.public_key())
    assert len(z) == 48 and shared_secret(godh, pdh.public_key()) == z
    keys = tp.TransportKeys(tek=b"E" * 16, tik=b"I" * 16)
    assert session.session == tp.seal_session(z, b"n" * 16, b"v" * 16, keys, POLICY)


def test_another_platform_cannot_open_the_session(pdh: ec.EllipticCurvePrivateKey) -> None:
    session = LaunchSession.create(pdh.public_key(), POLICY)
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(tp.WrapMacError):
        firmware_open(other, session)


def test_a_launch_with_another_policy_is_refused(pdh: ec.EllipticCurvePrivateKey) -> None:
    session = LaunchSession.create(pdh.public_key(), POLICY)
    with pytest.raises(tp.PolicyMacError):
        firmware_open(pdh, session, POLICY & ~1)  # debugging allowed: not what the owner signed


def test_bad_inputs(pdh: ec.EllipticCurvePrivateKey) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InputError):
        LaunchSession.create(p256.public_key(), POLICY)
    with pytest.raises(LayoutError):
        LaunchSession.create(pdh.public_key(), 1 << 6)  # reserved policy bit
    with pytest.raises(InputError):
        LaunchSession.create(pdh.public_key(), POLICY, tek=bytes(8))


def measured(pdh: ec.EllipticCurvePrivateKey) -> tuple[LaunchSession, tp.TransportKeys, bytes]:
    session = LaunchSession.create(pdh.public_key(), POLICY)
    fw_keys = firmware_open(pdh, session)
    blob = launch_measure_blob(fw_keys.tik, **API, policy=POLICY, launch_digest=LD, mnonce=MNONCE)
    return session, fw_keys, blob


def test_full_flow_to_the_firmware(pdh: ec.EllipticCurvePrivateKey) -> None:
    session, fw_keys, blob = measured(pdh)
    launch = session.verify_measurement(blob, **API, expected_ld=LD)
    assert isinstance(launch, MeasuredLaunch)
    assert launch.measure == blob[:32] and launch.mnonce == MNONCE and launch.policy == POLICY
    assert (launch.api_major, launch.api_minor, launch.build) == (1, 49, 6)

    packet = launch.launch_secret([("736869e5-84f0-4973-92ec-06879ce3da0b", b"disk passphrase")])
    # LAUNCH_SECRET in the firmware: TIK/TEK from the session, MEASURE from its own LAUNCH_MEASURE
    plain = tp.open_packet(fw_keys, packet.header, packet.trans, guest_len=packet.guest_len,
                           api_major=1, api_minor=49, measure=blob[:32])
    assert list(parse_secret_table(plain).values()) == [b"disk passphrase"]


def test_secret_is_bound_to_the_measured_launch(pdh: ec.EllipticCurvePrivateKey) -> None:
    session, fw_keys, blob = measured(pdh)
    launch = session.verify_measurement(blob, **API, expected_ld=LD)
    packet = launch.launch_secret_raw(b"x" * 32)
    other_measure = launch_measure_blob(fw_keys.tik, **API, policy=POLICY, launch_digest=LD, mnonce=bytes(16))[:32]
    with pytest.raises(tp.PacketMacError):
        tp.open_packet(fw_keys, packet.header, packet.trans, guest_len=32, api_major=1, api_minor=49,
                       measure=other_measure)


@pytest.mark.parametrize(
    "change",
    ["ld", "build", "api_minor", "measure_bit", "mnonce_bit"],
)
def test_unexpected_measurement_yields_no_next_state(pdh: ec.EllipticCurvePrivateKey, change: str) -> None:
    session, _, blob = measured(pdh)
    api = dict(API)
    ld = LD
    if change == "ld":
        ld = hashlib.sha256(b"another image").digest()
    elif change in ("build", "api_minor"):
        api[change] += 1
    elif change == "measure_bit":
        blob = bytes([blob[0] ^ 0x80]) + blob[1:]
    else:
        blob = blob[:40] + bytes([blob[40] ^ 1]) + blob[41:]
    with pytest.raises(tp.MeasureMacError):
        session.verify_measurement(blob, **api, expected_ld=ld)


def test_measurement_blob_must_be_0x30_bytes(pdh: ec.EllipticCurvePrivateKey) -> None:
    session, _, blob = measured(pdh)
    with pytest.raises(LayoutError):
        session.verify_measurement(blob[:32], **API, expected_ld=LD)
