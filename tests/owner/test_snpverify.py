"""The SEV-SNP report verifier: real reports from AMD hardware, single-byte changes, emulated reports
signed by derived VCEKs/VLEKs, the policy checks, and omne-attest's verdict on our output."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from reportkit import CHIP, make_report

from sevemu.abi.report import SignerInfo
from sevemu.abi.snp import SnpPolicy as GuestPolicy
from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import AmdSnpRoot, CspAccount
from sevemu.certs.snp import load_certificate, load_certificates
from sevemu.crypto import vcek
from sevemu.owner.snpverify import (
    AMD_SNP_ARK_FINGERPRINTS,
    Chain,
    SnpCheckError,
    SnpPolicy,
    fingerprint,
    verify_report,
)

Root = Callable[[str], AmdSnpRoot]
MILAN_TCB = 0x7308000000000003
TURIN_TCB = 0x5100000004010101


# ---- real reports ------------------------------------------------------------------------------
def _real_cases(vectors: Path) -> list[tuple[dict[str, object], bytes, Chain]]:
    folder = vectors / "snp-real-reports"
    roots = vectors / "snp-amd-roots"
    out = []
    for e in json.loads((folder / "expected.json").read_text()):
        signer_file = folder / str(e["signer_cert_file"])
        if not signer_file.is_file():
            continue
        raw = (folder / str(e["report_file"])).read_bytes()
        report = bytes.fromhex(raw.decode().strip()) if e["report_encoding"] == "hex text" else raw
        signer = load_certificates(signer_file.read_bytes())[0]
        product = str(e["product"])
        suffix = {"milan": "milan", "genoa": "genoa", "turin": "turin_vcek"}[product] if e["signer_key"] == "VCEK" \
            else f"{product}_vlek"
        ask, ark = load_certificates((roots / f"gosevguest_ask_ark_{suffix}.pem").read_bytes())
        out.append((e, report, Chain(signer, ask, ark)))
    return out


def _inside(chain: Chain) -> dt.datetime:
    return chain.signer.not_valid_before_utc + dt.timedelta(days=1)


def test_every_real_report_verifies_as_expected(vectors: Path) -> None:
    cases = _real_cases(vectors)
    assert len(cases) == 18
    for e, report, chain in cases:
        assert e["expected_signature_valid"] is True
        got = verify_report(report, chain, now=_inside(chain), policy=SnpPolicy(allow_debug=True))
        assert got.generation == e["product"], e["report_file"]
        assert got.signing_key == str(e["signer_key"]).lower()
        assert not got.emulated_root
        assert got.report.measurement.hex() == e["measurement"]
        assert got.report.reported_tcb == int(str(e["reported_tcb_raw"]), 16)
        if int(str(e["policy"]), 16) & (1 << 19):  # a debuggable guest fails the default policy
            with pytest.raises(SnpCheckError, match="^policy.debug:"):
                verify_report(report, chain, now=_inside(chain))
        else:
            verify_report(report, chain, now=_inside(chain))


def test_real_vlek_has_expired_by_now(vectors: Path) -> None:
    (_, report, chain), = [c for c in _real_cases(vectors) if c[0]["signer_key"] == "VLEK"]
    with pytest.raises(SnpCheckError, match="^validity: VLEK expired 2025-12-10") as info:
        verify_report(report, chain, now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert info.value.check == "validity"


def test_real_chain_is_refused_without_amd_pins(vectors: Path) -> None:
    _, report, chain = _real_cases(vectors)[0]
    with pytest.raises(SnpCheckError) as info:
        verify_report(report, chain, trusted=[bytes(32)], now=_inside(chain))
    assert info.value.check == "ark"


def test_wrong_product_and_wrong_signer(vectors: Path) -> None:
    cases = _real_cases(vectors)
    milan = next(c for c in cases if c[0]["product"] == "milan" and c[0]["signer_key"] == "VCEK")
    genoa = next(c for c in cases if c[0]["product"] == "genoa")
    _, report, chain = milan
    with pytest.raises(SnpCheckError) as info:  # a Milan VCEK against Genoa's ASK
        verify_report(report, Chain(chain.signer, genoa[2].intermediate, genoa[2].ark), now=_inside(chain))
    assert info.value.check == "chain"
    with pytest.raises(SnpCheckError) as info:  # another chip's VCEK
        verify_report(genoa[1], Chain(chain.signer, chain.intermediate, chain.ark), now=_inside(chain))
    assert info.value.check in ("binding", "product")


def _flip_all(report: bytes, chain: Chain, offsets: list[int], masks: tuple[int, ...]) -> None:
    for off in offsets:
        for mask in masks:
            bad = bytearray(report)
            bad[off] ^= mask
            with pytest.raises(SnpCheckError) as info:
                verify_report(bytes(bad), chain, now=_inside(chain), policy=SnpPolicy(allow_debug=True))
            assert info.value.check.split(".")[0] in ("format", "signer", "binding", "signature", "product",
                                                      "chain", "policy"), (off, info.value)
            assert "\n" not in str(info.value)


def test_single_byte_changes_fail_sample(vectors: Path) -> None:
    rng = random.Random(12)
    for _, report, chain in _real_cases(vectors)[::4]:
        offsets = sorted(set(rng.sample(range(len(report)), 24)) | {0, 0x34, 0x48, 0x188, 0x1A0, 0x29F, 0x2A0,
                                                                    0x2CF, 0x2E8, 0x32F, 0x330, 0x49F})
        _flip_all(report, chain, offsets, (0x01,))


@pytest.mark.slow
def test_single_byte_changes_fail_exhaustive(vectors: Path) -> None:
    for _, report, chain in _real_cases(vectors):
        _flip_all(report, chain, list(range(len(report))), (0x01, 0x80))


# ---- emulated reports ----------------------------------------------------------------------------
def _chain(root: AmdSnpRoot, tcb: int, kind: str = "vcek", csp: CspAccount | None = None) -> Chain:
    if kind == "vcek":
        return Chain(root.issue_vcek(CHIP[root.generation], tcb), root.ask, root.ark, root.crl())
    assert csp is not None
    return Chain(root.issue_vlek(csp, tcb), root.asvk, root.ark, root.crl("vlek"))


@pytest.mark.parametrize(("generation", "tcb"), [("milan", MILAN_TCB), ("genoa", 0x541700000000000A),
                                                 ("turin", TURIN_TCB)])
def test_emulated_reports_verify_with_their_root_only(snp_root: Root, generation: str, tcb: int) -> None:
    root = snp_root(generation)
    report = make_report(generation, tcb)
    chain = _chain(root, tcb)
    got = verify_report(report, chain, trusted=[root.ark_fingerprint()], policy=SnpPolicy(
        measurement=b"\x22" * 48, report_data=b"\x11" * 64, host_data=b"\x33" * 32, id_key_digest=b"\x44" * 48,
        author_key_digest=bytes(48), vmpl=0, min_tcb=tcb, min_firmware=(1, 55, 4), signing_key="vcek",
        require_crl=True))
    assert got.emulated_root and got.crl_checked and got.generation == generation
    with pytest.raises(SnpCheckError) as info:
        verify_report(report, chain)  # AMD's real pins only
    assert info.value.check == "ark"
    assert root.ark_fingerprint() not in AMD_SNP_ARK_FINGERPRINTS


def test_emulated_vlek(snp_root: Root) -> None:
    root = snp_root("genoa")
    csp = CspAccount("CN=cloud.example", b"\x07" * 48)
    report = make_report("genoa", 0x541700000000000A, key="vlek", secret=csp.secret)
    got = verify_report(report, _chain(root, 0x541700000000000A, "vlek", csp), trusted=[root.ark_fingerprint()],
                        policy=SnpPolicy(signing_key="vlek"))
    assert got.signing_key == "vlek"
    with pytest.raises(SnpCheckError) as info:
        verify_report(report, _chain(root, 0x541700000000000A, "vlek", csp), trusted=[root.ark_fingerprint()],
                      policy=SnpPolicy(signing_key="vcek"))
    assert info.value.check == "policy.signing_key"


POLICY_CASES: list[tuple[dict[str, object], dict[str, object], str]] = [
    ({}, {"measurement": b"\x00" * 48}, "policy.measurement"),
    ({}, {"report_data": b"\x00" * 64}, "policy.report_data"),
    ({}, {"host_data": b"\x00" * 32}, "policy.host_data"),
    ({}, {"id_key_digest": b"\x00" * 48}, "policy.id_key_digest"),
    ({}, {"author_key_digest": b"\x01" * 48}, "policy.author_key_digest"),
    ({}, {"family_id": b"\x01" * 16}, "policy.family_id"),
    ({}, {"image_id": b"\x01" * 16}, "policy.image_id"),
    ({"vmpl": 2}, {"vmpl": 0}, "policy.vmpl"),
    ({"policy": GuestPolicy(debug=True)}, {}, "policy.debug"),
    ({"policy": GuestPolicy(migrate_ma=True)}, {"allow_migrate_ma": False}, "policy.migrate_ma"),
    ({}, {"allow_smt": False}, "policy.smt"),
    ({"guest_svn": 1}, {"min_guest_svn": 2}, "policy.guest_svn"),
    ({}, {"min_tcb": MILAN_TCB + 1}, "policy.tcb"),
    ({}, {"min_tcb": MILAN_TCB + (1 << 56)}, "policy.tcb"),
    ({"committed_tcb": MILAN_TCB - 1}, {}, "policy.committed_tcb"),  # rollback: reported above committed
    ({}, {"min_firmware": (1, 55, 5)}, "policy.firmware"),
    ({}, {"signing_key": "vlek"}, "policy.signing_key"),
]


@pytest.mark.parametrize(("fields", "policy", "check"), POLICY_CASES, ids=[c[2] for c in POLICY_CASES])
def test_policy_checks_name_themselves(snp_root: Root, fields: dict[str, object], policy: dict[str, object],
                                       check: str) -> None:
    root = snp_root("milan")
    report = make_report("milan", MILAN_TCB, **fields)
    with pytest.raises(SnpCheckError) as info:
        verify_report(report, _chain(root, MILAN_TCB), trusted=[root.ark_fingerprint()],
                      policy=SnpPolicy(**policy))  # type: ignore[arg-type]
    assert info.value.check == check, str(info.value)


def test_tcb_not_certified_and_other_chip(snp_root: Root) -> None:
    root = snp_root("milan")
    report = make_report("milan", MILAN_TCB)
    with pytest.raises(SnpCheckError, match="^binding: VCEK TCB") as info:
        verify_report(report, _chain(root, MILAN_TCB + 1), trusted=[root.ark_fingerprint()])
    other = FusedChip("milan", b"\x09" * 64)
    chain = Chain(root.issue_vcek(other, MILAN_TCB), root.ask, root.ark)
    with pytest.raises(SnpCheckError, match="^binding: VCEK hwID") as info:
        verify_report(report, chain, trusted=[root.ark_fingerprint()])
    masked = make_report("milan", MILAN_TCB, chip_id=bytes(64))
    with pytest.raises(SnpCheckError, match="masked") as info:
        verify_report(masked, _chain(root, MILAN_TCB), trusted=[root.ark_fingerprint()])
    assert info.value.check == "binding"


def test_turin_chip_id_beyond_eight_bytes(snp_root: Root) -> None:
    root = snp_root("turin")
    chip_id = vcek.snp_chip_id(CHIP["turin"].secret, "turin")
    report = make_report("turin", TURIN_TCB, chip_id=chip_id[:8] + b"\x01" + bytes(55))
    with pytest.raises(SnpCheckError, match="bytes 8..63") as info:
        verify_report(report, _chain(root, TURIN_TCB), trusted=[root.ark_fingerprint()])
    assert info.value.check == "binding"


def test_revoked_ask_and_stale_crl(snp_root: Root, tmp_path: Path) -> None:
    from sevemu.scenario import default_amd_root
    root = AmdSnpRoot.load(snp_root("milan").save(tmp_path / "r"), default_amd_root("milan"))
    report = make_report("milan", MILAN_TCB)
    root.revoke("vcek")
    with pytest.raises(SnpCheckError, match="^crl: the ASK .* is revoked"):
        verify_report(report, _chain(root, MILAN_TCB), trusted=[root.ark_fingerprint()])
    fresh = snp_root("milan")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    with pytest.raises(SnpCheckError, match="^crl: CRL expired"):
        verify_report(report, _chain(fresh, MILAN_TCB), trusted=[fresh.ark_fingerprint()], now=later)
    with pytest.raises(SnpCheckError, match="^crl: no CRL"):
        verify_report(report, Chain(fresh.issue_vcek(CHIP["milan"], MILAN_TCB), fresh.ask, fresh.ark),
                      trusted=[fresh.ark_fingerprint()], policy=SnpPolicy(require_crl=True))


def test_bad_input_one_line(snp_root: Root) -> None:
    root = snp_root("milan")
    chain = _chain(root, MILAN_TCB)
    good = make_report("milan", MILAN_TCB)
    for bad, words in ((good[:-1], "0x4a0 bytes"), (good + b"\0", "0x4a0 bytes"), (b"", "0x4a0 bytes"),
                       (b"\x09" + good[1:], "version 9"), (good[:0x34] + b"\x02" + good[0x35:], "SIGNATURE_ALGO 2")):
        with pytest.raises(SnpCheckError, match=words) as info:
            verify_report(bad, chain, trusted=[root.ark_fingerprint()])
        assert info.value.check == "format"
    unsigned = make_report("milan", MILAN_TCB, signer_info=SignerInfo(signing_key=7))
    with pytest.raises(SnpCheckError, match="unsigned"):
        verify_report(unsigned, chain, trusted=[root.ark_fingerprint()])


# ---- an independent verifier -----------------------------------------------------------------------
def test_omne_attest_accepts_ours_and_rejects_tampered(snp_root: Root) -> None:
    omne = pytest.importorskip("omne_attest", reason="omne-attest (PyPI) is not installed")
    root = snp_root("milan")
    report = make_report("milan", MILAN_TCB)
    chain = _chain(root, MILAN_TCB)
    der = [c.public_bytes(serialization.Encoding.DER) for c in (chain.signer, chain.intermediate, chain.ark)]
    pin = hashlib.sha256(der[2]).digest()
    assert pin == fingerprint(root.ark)
    policy = omne.Policy(measurement=b"\x22" * 48, report_data=b"\x11" * 64, max_vmpl=0, reject_debug=True)
    result = omne.verify(report, der[0], der[1], der[2], pin, policy)
    assert result.measurement == b"\x22" * 48
    tampered = bytearray(report)
    tampered[0x90] ^= 1
    with pytest.raises(omne.Fail):
        omne.verify(bytes(tampered), der[0], der[1], der[2], pin, policy)
    with pytest.raises(omne.Fail):  # AMD's real Milan ARK pinned instead of ours
        omne.verify(report, der[0], der[1], der[2], bytes.fromhex(
            "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd"), policy)
    assert isinstance(load_certificate(der[0]), x509.Certificate)
