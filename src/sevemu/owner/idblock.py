"""The guest owner's ID block and ID authentication information for SNP_LAUNCH_FINISH (SNP ABI 56860,
ID_BLOCK and ID_AUTH_INFO; sev-snp-measure ``snp-create-id-block``).

The ID block (0x60 bytes) names the expected launch digest, family and image ids, the guest SVN and the
policy; the ID key signs it (ECDSA P-384 with SHA-384, AMD's little-endian r/s), the author key signs the
ID key's 0x404-byte public-key structure.  The attestation report then carries SHA-384 of each public-key
structure (ID_KEY_DIGEST, AUTHOR_KEY_DIGEST).  Defaults are snp-create-id-block's: zero ids, SVN 0,
policy 0x30000, version 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.snp import EccCurve, EcdsaPublicKey, EcdsaSignature, IdAuthInfo, IdBlock, KeyAlgo
from sevemu.crypto import ecc
from sevemu.errors import InputError

__all__ = ["IdBlockBundle", "make_id_block", "public_key_struct"]

DEFAULT_POLICY = 0x30000


def public_key_struct(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> EcdsaPublicKey:
    """The 0x404-byte SNP public-key structure of a P-384 key."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    if not isinstance(pub.curve, ec.SECP384R1):
        raise InputError(f"ID and author keys are P-384 keys, not {pub.curve.name}")
    qx, qy = ecc.public_key_to_le(pub)
    return EcdsaPublicKey(curve=int(EccCurve.P384), qx=qx, qy=qy)


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> EcdsaSignature:
    raw = ecc.sign_le(key, message, hashes.SHA384())
    return EcdsaSignature(r=raw[: len(raw) // 2], s=raw[len(raw) // 2 :])


@dataclass(frozen=True, slots=True)
class IdBlockBundle:
    """What SNP_LAUNCH_FINISH takes and what the report will show."""

    id_block: bytes
    id_auth: bytes
    id_key_digest: bytes
    author_key_digest: bytes


def make_id_block(ld: bytes, id_key: ec.EllipticCurvePrivateKey, author_key: ec.EllipticCurvePrivateKey | None = None,
                  *, policy: int = DEFAULT_POLICY, family_id: bytes = bytes(16), image_id: bytes = bytes(16),
                  guest_svn: int = 0) -> IdBlockBundle:
    """The ID block for launch digest ``ld`` signed with ``id_key`` (and the ID key signed with
    ``author_key`` when given); :class:`~sevemu.errors.InputError` for sizes that do not fit."""
    if len(ld) != 48:
        raise InputError(f"a launch digest is 48 bytes, got {len(ld)}")
    if len(family_id) != 16 or len(image_id) != 16:
        raise InputError("family and image ids are 16 bytes each")
    if not 0 <= guest_svn < 1 << 32 or not 0 <= policy < 1 << 64:
        raise InputError("the guest SVN is a u32 and the policy a u64")
    block = IdBlock(ld=ld, family_id=family_id, image_id=image_id, guest_svn=guest_svn, policy=policy).encode()
    id_pub = public_key_struct(id_key)
    id_pub_raw = id_pub.encode()
    author_pub = public_key_struct(author_key) if author_key is not None else EcdsaPublicKey()
    auth = IdAuthInfo(
        id_key_algo=int(KeyAlgo.ECDSA_P384_SHA384),
        auth_key_algo=int(KeyAlgo.ECDSA_P384_SHA384) if author_key is not None else 0,
        id_block_sig=_sign(id_key, block),
        id_key=id_pub,
        id_key_sig=_sign(author_key, id_pub_raw) if author_key is not None else EcdsaSignature(),
        author_key=author_pub,
    ).encode()
    author_digest = hashlib.sha384(author_pub.encode()).digest() if author_key is not None else bytes(48)
    return IdBlockBundle(block, auth, hashlib.sha384(id_pub_raw).digest(), author_digest)
