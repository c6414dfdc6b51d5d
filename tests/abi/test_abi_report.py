"""The SNP attestation report, guest messages, the certificate table (:mod:`sevemu.abi.report`) and the
ID block / ID authentication structures (:mod:`sevemu.abi.snp`) on real data: the 18 hardware reports
of ``../shared/vectors/snp-real-reports`` (Milan, Genoa, Turin; versions 2, 3, 5; one VLEK) and the
virtee / sev-snp-measure ID-block vectors of ``../shared/vectors/snp-id-block``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi import report, snp
from sevemu.abi.struct import field_span
from sevemu.errors import LayoutError


def _reports(vectors: Path) -> list[tuple[dict[str, Any], bytes]]:
    folder = vectors / "snp-real-reports"
    out = []
    for case in json.loads((folder / "expected.json").read_text()):
        data = (folder / case["report_file"]).read_bytes()
        if case["report_encoding"] == "hex text":
            data = bytes.fromhex(data.decode().strip())
        out.append((case, data))
    return out


def _der_int(hex_der: str) -> int:
    der = bytes.fromhex(hex_der)
    assert der[0] == 0x02 and der[1] == len(der) - 2, hex_der  # INTEGER, short length
    return int.from_bytes(der[2:], "big")


def _fw(major: int, minor: int, build: int) -> str:
    return f"{major}.{minor} build {build}"


def test_real_reports_decode_re_encode_and_match_expected_fields(vectors: Path) -> None:
    cases = _reports(vectors)
    assert len(cases) == 18
    versions, products = set(), set()
    for case, data in cases:
        name = case["report_file"]
        r = report.AttestationReport.decode(data)
        assert r.encode() == data, name
        assert hashlib.sha384(r.signed_bytes()).hexdigest() == case["signed_region_sha384"], name
        versions.add(r.version)
        products.add(case["product"])
        assert r.version == case["version"] and r.guest_svn == case["guest_svn"], name
        assert r.policy.to_int() == int(case["policy"], 16) and r.vmpl == case["vmpl"], name
        assert r.signature_algo == case["signature_algo"] == snp.KeyAlgo.ECDSA_P384_SHA384, name
        assert r.platform_info == int(case["platform_info"], 16), name
        assert r.signer_info.to_int() == int(case["flags_0x48"], 16), name
        assert r.signer_info.signing_key == (report.SigningKey.VLEK if case["signer_key"] == "VLEK"
                                             else report.SigningKey.VCEK), name
        for f in ("measurement", "report_data", "host_data", "id_key_digest", "author_key_digest", "report_id",
                  "report_id_ma", "chip_id"):
            assert getattr(r, f).hex() == case[f], (name, f)
        for f in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
            assert getattr(r, f) == int(case[f + "_raw"], 16), (name, f)
        assert _fw(r.current_major, r.current_minor, r.current_build) == case["current_fw"], name
        assert _fw(r.committed_major, r.committed_minor, r.committed_build) == case["committed_fw"], name
        if r.version >= 3:
            assert (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == (
                int(case["cpuid_fam_id"], 16), int(case["cpuid_mod_id"], 16), int(case["cpuid_step"], 16)), name
        else:
            assert r.cpuid_fam_id is r.cpuid_mod_id is r.cpuid_step is None, name
            assert case["cpuid_fam_id"] is None
        if r.version >= 5:
            assert (r.launch_mit_vector, r.current_mit_vector) == (
                int(case["launch_mit_vector"], 16), int(case["current_mit_vector"], 16)), name
        else:
            assert r.launch_mit_vector is None and r.current_mit_vector is None, name
            assert case["launch_mit_vector"] == case["current_mit_vector"] == "0x0"
        # TCB_VERSION per generation, checked against expected.json and the VCEK's SPL extensions
        tcb = snp.tcb_layout(case["product"]).from_int(r.reported_tcb)
        expected_tcb = case["reported_tcb"]
        assert (tcb.boot_loader, tcb.tee, tcb.snp, tcb.microcode) == (
            expected_tcb["bootloader"], expected_tcb["tee"], expected_tcb["snp"], expected_tcb["microcode"]), name
        ext = case["cert_extensions_raw_hex"]
        prefix = "1.3.6.1.4.1.3704.1."
        assert _der_int(ext[prefix + "3.1"]) == tcb.boot_loader and _der_int(ext[prefix + "3.2"]) == tcb.tee, name
        assert _der_int(ext[prefix + "3.3"]) == tcb.snp and _der_int(ext[prefix + "3.8"]) == tcb.microcode, name
        if isinstance(tcb, snp.TcbVersionTurin):
            assert tcb.fmc == expected_tcb["fmc"] == _der_int(ext[prefix + "3.9"]), name
            assert not any(r.chip_id[8:]) and ext[prefix + "4"] == r.chip_id[:8].hex(), name
        elif case["signer_key"] == "VCEK":
            assert ext[prefix + "4"] == r.chip_id.hex(), name
    assert versions == {2, 3, 5} and products == {"milan", "genoa", "turin"}


def test_real_report_mutations_are_refused_with_the_field_named(vectors: Path) -> None:
    reports = {case["report_file"]: data for case, data in _reports(vectors)}
    v2 = reports["virtee_report_milan.hex"]
    v3 = reports["mstav_genoa_attestation_report.bin"]
    v5 = reports["mstav_turin_attestation_report.bin"]
    cases = [
        (v2, 0x188, 0x19, r"AttestationReport.cpuid_fam_id at 0x188: field exists from version 3; version 2"),
        (v3, 0x1F8, 0x01, r"AttestationReport.launch_mit_vector at 0x1f8: field exists from version 5; version 3"),
        (v3, 0x204, 0x01, r"AttestationReport.current_mit_vector at 0x200: field exists from version 5"),
        (v5, 0x18B, 0x01, r"AttestationReport: reserved bytes 0x18b..0x19f are not zero"),
        (v5, 0x04C, 0x01, r"AttestationReport: reserved bytes 0x4c..0x4f are not zero"),
        (v5, 0x1EB, 0x01, r"AttestationReport: reserved bytes 0x1eb..0x1eb"),
        (v5, 0x208, 0x01, r"AttestationReport: reserved bytes 0x208..0x29f"),
        (v3, 0x2A0 + 0x90, 0x01, r"AttestationReport.signature at 0x2a0: SevEcdsaSig: reserved bytes 0x90..0x1ff"),
        (v3, 0x4A0 - 1, 0x01, r"AttestationReport.signature at 0x2a0: SevEcdsaSig: reserved bytes 0x90..0x1ff"),
        (v2, 0x048, 0x20, r"AttestationReport.signer_info at 0x48: SignerInfo: reserved bits 5 are not zero"),
        (v2, 0x00B, 0x04, r"AttestationReport.policy at 0x8: SnpPolicy: reserved bits 26 are not zero"),
    ]
    for data, offset, value, message in cases:
        bad = bytearray(data)
        bad[offset] |= value
        with pytest.raises(LayoutError, match=message):
            report.AttestationReport.decode(bytes(bad))
    # where a field lives does not change: the same byte is a field in a later version
    assert report.AttestationReport.decode(v5).cpuid_fam_id == 0x1A
    with pytest.raises(LayoutError, match=r"expected 0x4a0 bytes, got 0x4a1"):
        report.AttestationReport.decode(v5 + b"\x00")
    with pytest.raises(LayoutError, match=r"expected 0x4a0 bytes, got 0x49f"):
        report.AttestationReport.decode(v5[:-1])


def test_report_versions_gate_encoding(vectors: Path) -> None:
    v5 = report.AttestationReport.decode(
        (vectors / "snp-real-reports" / "mstav_turin_attestation_report.bin").read_bytes())
    with pytest.raises(LayoutError, match=r"launch_mit_vector at 0x1f8: field exists from version 5; version 3 needs None"):
        dataclasses.replace(v5, version=3).encode()
    v3 = dataclasses.replace(v5, version=3, launch_mit_vector=None, current_mit_vector=None)
    assert report.AttestationReport.decode(v3.encode()) == v3
    with pytest.raises(LayoutError, match=r"cpuid_fam_id at 0x188: field exists from version 3; version 2"):
        dataclasses.replace(v3, version=2).encode()
    with pytest.raises(LayoutError, match=r"current_mit_vector at 0x200: version 5 has this field; it is None"):
        dataclasses.replace(v5, current_mit_vector=None).encode()


def test_platform_info_and_signer_info_bits(vectors: Path) -> None:
    for case, data in _reports(vectors):
        r = report.AttestationReport.decode(data)
        info = report.PlatformInfo.from_int(r.platform_info)
        assert info.smt_en == bool(r.platform_info & 1)
        assert info.to_int() == r.platform_info & ~(1 << 6), case["report_file"]  # bit 6: ignored
    with pytest.raises(LayoutError, match="PlatformInfo: reserved bits 8 are not zero"):
        report.PlatformInfo.from_int(1 << 8)
    assert report.SignerInfo(author_key_en=True, mask_chip_key=True,
                             signing_key=report.SigningKey.NONE).to_int() == 0b11111


def test_report_response_nests_the_report(vectors: Path) -> None:
    data = (vectors / "snp-real-reports" / "oak_genoa_oc_report_extracted.bin").read_bytes()
    rsp = report.ReportRsp(status=0, report=report.AttestationReport.decode(data))
    raw = rsp.encode()
    assert len(raw) == 0x4C0 and raw[4:8] == (0x4A0).to_bytes(4, "little") and raw[0x20:] == data
    assert report.ReportRsp.decode(raw) == rsp


# --- guest messages -----------------------------------------------------------------------------


def test_guest_message_header() -> None:
    # struct snp_guest_msg_hdr
    spans = {"authtag": (0x00, 32), "msg_seqno": (0x20, 8), "algo": (0x30, 1), "hdr_version": (0x31, 1),
             "hdr_size": (0x32, 2), "msg_type": (0x34, 1), "msg_version": (0x35, 1), "msg_size": (0x36, 2),
             "msg_vmpck": (0x3C, 1)}
    for name, span in spans.items():
        assert field_span(report.SnpGuestMsgHdr, name) == span
    hdr = report.SnpGuestMsgHdr(msg_seqno=1, msg_type=report.MsgType.REPORT_REQ, msg_size=0x60, msg_vmpck=0)
    raw = hdr.encode()
    assert raw[0x30:0x38] == bytes([1, 1, 0x60, 0, 5, 1, 0x60, 0])
    for offset in (0x28, 0x38, 0x3D, 0x5F):
        bad = bytearray(raw)
        bad[offset] = 1
        with pytest.raises(LayoutError, match="SnpGuestMsgHdr: reserved bytes"):
            report.SnpGuestMsgHdr.decode(bytes(bad))
    assert int(report.MsgType.TSC_INFO_REQ) == 17 and report.MSG_PAYLOAD_MAX == 4096 - 0x60


def test_request_and_response_payloads() -> None:
    req = report.ReportReq(report_data=b"\x42" * 64, vmpl=1)
    assert report.ReportReq.decode(req.encode()) == req and report.ReportReq.SIZE == 0x60
    bad = bytearray(req.encode())
    bad[0x48] = 1
    with pytest.raises(LayoutError, match=r"ReportReq: reserved bytes 0x48..0x5f"):
        report.ReportReq.decode(bytes(bad))
    key = report.KeyReq(root_key_select=report.RootKeySelect(vmrk=True),
                        guest_field_select=report.GuestFieldSelect(measurement=True, tcb_version=True),
                        vmpl=1, guest_svn=2, tcb_version=0x7308000000000003)
    raw = key.encode()  # struct snp_derived_key_req
    assert raw[0:4] == b"\x01\x00\x00\x00" and raw[8:16] == (0b101000).to_bytes(8, "little")
    assert raw[0x10:0x18] == b"\x01\x00\x00\x00\x02\x00\x00\x00" and report.KeyReq.decode(raw) == key
    bad = bytearray(raw)
    bad[8] |= 0x80  # guest_field_select bit 7
    with pytest.raises(LayoutError, match=r"KeyReq.guest_field_select at 0x8: GuestFieldSelect: reserved bits 7"):
        report.KeyReq.decode(bytes(bad))
    assert report.KeyReqMit.SIZE == 0x28 and field_span(report.KeyReqMit, "launch_mit_vector") == (0x20, 8)
    assert field_span(report.KeyRsp, "derived_key") == (0x20, 32) and report.KeyRsp.SIZE == 0x40
    assert report.TscInfoRsp.SIZE == 0x80 and field_span(report.TscInfoRsp, "tsc_factor") == (0x18, 4)


# --- certificate table --------------------------------------------------------------------------


def test_certificate_table_guids_and_round_trip() -> None:
    assert report.CERT_GUID_VCEK == bytes.fromhex("63da758de6644564adc5f4b93be8accd")
    assert str(uuid.UUID(bytes=report.CERT_GUID_ARK)) == "c0b406a4-a803-4952-9743-3fb6014cd0ae"
    certs = [(report.CERT_GUID_ARK, b"ark-der"), (report.CERT_GUID_ASK, b"ask"), (report.CERT_GUID_VCEK, b"v" * 100)]
    buf = report.encode_cert_table(certs)
    assert buf[:16] == report.CERT_GUID_ARK and buf[3 * 24 : 4 * 24] == bytes(24)
    assert int.from_bytes(buf[16:20], "little") == 4 * 24  # first certificate right after the table
    assert report.decode_cert_table(buf + bytes(4096 - len(buf))) == certs
    assert report.decode_cert_table(b"") == [] and report.encode_cert_table([]) == b""


def test_certificate_table_refusals() -> None:
    buf = report.encode_cert_table([(report.CERT_GUID_VCEK, b"x" * 10)])
    with pytest.raises(LayoutError, match="no all-zero terminator"):
        report.decode_cert_table(buf[:24])
    bad = bytearray(buf)
    bad[20:24] = (11).to_bytes(4, "little")  # length past the end
    with pytest.raises(LayoutError, match="certificate table entry 0: bytes"):
        report.decode_cert_table(bytes(bad))
    bad = bytearray(buf)
    bad[16:20] = (8).to_bytes(4, "little")  # offset inside the table
    with pytest.raises(LayoutError, match="outside the data after the 0x30-byte table"):
        report.decode_cert_table(bytes(bad))
    with pytest.raises(LayoutError, match="not 16 non-zero bytes"):
        report.encode_cert_table([(bytes(16), b"x")])


# --- ID block and ID authentication -------------------------------------------------------------


def _ec_key_struct(pem: bytes) -> snp.EcdsaPublicKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    nums = key.public_key().public_numbers()
    return snp.EcdsaPublicKey(curve=snp.EccCurve.P384, qx=nums.x.to_bytes(72, "little"),
                              qy=nums.y.to_bytes(72, "little"))


def test_id_block_vectors(vectors: Path) -> None:
    folder = vectors / "snp-id-block"
    expected = json.loads((folder / "expected.json").read_text())
    for tool in ("virtee_sev", "sev_snp_measure"):
        case = expected[tool]
        raw = base64.b64decode(case["expected_id_block_b64"])
        block = snp.IdBlock.decode(raw)
        assert block.encode() == raw
        ld = bytes.fromhex(case["launch_digest_hex"]) if "launch_digest_hex" in case else base64.b64decode(
            case["launch_digest_b64"])
        assert block == snp.IdBlock(ld=ld, policy=0x30000)  # version 1, zero ids and svn
        assert snp.SnpPolicy.from_int(block.policy) == snp.SnpPolicy(smt=True)
        for role in ("id", "author"):
            key = _ec_key_struct((folder / case[f"{role}_key"]).read_bytes())
            digest = hashlib.sha384(key.encode()).digest()
            assert digest == base64.b64decode(case[f"expected_{role}_key_digest_b64"]), (tool, role)


def test_id_auth_info_vector(vectors: Path) -> None:
    folder = vectors / "snp-id-block"
    raw = (folder / "virtee_test_auth_block.bin").read_bytes()
    auth = snp.IdAuthInfo.decode(raw)
    assert auth.encode() == raw
    assert auth.id_key_algo == auth.auth_key_algo == snp.KeyAlgo.ECDSA_P384_SHA384
    assert auth.id_block_sig == snp.EcdsaSignature.decode((folder / "virtee_test_id_sig.bin").read_bytes())
    assert auth.id_key_sig == snp.EcdsaSignature.decode((folder / "virtee_test_auth_sig.bin").read_bytes())
    assert auth.id_key == _ec_key_struct((folder / "virtee_test_id_key.pem").read_bytes())
    assert auth.author_key == _ec_key_struct((folder / "virtee_test_auth_key.pem").read_bytes())
    bad = bytearray(raw)
    bad[0x644] = 1  # reserved between ID_KEY and ID_KEY_SIG
    with pytest.raises(LayoutError, match=r"IdAuthInfo: reserved bytes 0x644..0x67f"):
        snp.IdAuthInfo.decode(bytes(bad))
