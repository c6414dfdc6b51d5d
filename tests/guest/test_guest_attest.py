"""The ``attest`` guest: real guest code on the vCPU obtains its own attestation report (VMPCK0 from
the secrets page, its own AES-256-GCM, the GHCB's SNP Guest Request), and the host verifies it.

* the runtime's AES-256-GCM (``guest/images/aesgcm.h``) is compiled for the host and checked against
  ``cryptography``'s AES-GCM: the GCM specification's AES-256 test case and random messages of the
  sizes guest messages have;
* ``sevemu run attest --mode snp``: the report the guest printed verifies against the emulated AMD's
  chain, carries the guest's REPORT_DATA and the launch digest the firmware computed;
* the host's attacks on the exchange -- a response altered in the shared page, a forged error -- are
  caught by the guest, which disables VMPCK0 as Linux does.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevemu.abi.report import SigningKey
from sevemu.cli.guest_report import ATTEST_REPORT_DATA, guest_report, verify_guest_report
from sevemu.cli.run import launch_guest, load_image
from sevemu.firmware.snp import snp_state
from sevemu.guest.build import images_dir
from sevemu.hypervisor.guest_request import Reply, guest_requests
from sevemu.owner.snpverify import SnpCheckError

pytest.importorskip("unicorn")
pytestmark = pytest.mark.usefixtures("guest_builds")

_WRAPPER = """
typedef unsigned char u8; typedef unsigned int u32; typedef unsigned long u64;
#include "aesgcm.h"
void seal(const u8 *k, const u8 *iv, const u8 *a, u64 al, const u8 *p, u64 n, u8 *c, u8 *t) {
    aes256gcm_seal(k, iv, a, al, p, n, c, t);
}
int open_(const u8 *k, const u8 *iv, const u8 *a, u64 al, const u8 *c, u64 n, const u8 *t, u8 *p) {
    return aes256gcm_open(k, iv, a, al, c, n, t, p);
}
"""


@pytest.fixture(scope="module")
def aesgcm(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    d = tmp_path_factory.mktemp("aesgcm")
    (d / "w.c").write_text(_WRAPPER)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-Werror", f"-I{images_dir()}", str(d / "w.c"),
                    "-o", str(d / "w.so")], check=True, capture_output=True)
    return ctypes.CDLL(str(d / "w.so"))


def _seal(lib: ctypes.CDLL, key: bytes, iv: bytes, aad: bytes, pt: bytes) -> bytes:
    ct, tag = ctypes.create_string_buffer(max(len(pt), 1)), ctypes.create_string_buffer(16)
    lib.seal(key, iv, aad, ctypes.c_uint64(len(aad)), pt, ctypes.c_uint64(len(pt)), ct, tag)
    return ct.raw[: len(pt)] + tag.raw


def _open(lib: ctypes.CDLL, key: bytes, iv: bytes, aad: bytes, sealed: bytes) -> bytes | None:
    ct, tag = sealed[:-16], sealed[-16:]
    pt = ctypes.create_string_buffer(max(len(ct), 1))
    rc = lib.open_(key, iv, aad, ctypes.c_uint64(len(aad)), ct, ctypes.c_uint64(len(ct)), tag, pt)
    return pt.raw[: len(ct)] if rc == 0 else None


def test_guest_aes_gcm_matches_cryptography(aesgcm: ctypes.CDLL) -> None:
    # The GCM specification's test case 16 (AES-256, 96-bit IV, 60-byte plaintext, 20-byte AAD)
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex("cafebabefacedbaddecaf888")
    pt = bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e24"
                       "49a6b525b16aedf5aa0de657ba637b39")
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    sealed = _seal(aesgcm, key, iv, aad, pt)
    assert sealed == AESGCM(key).encrypt(iv, pt, aad)
    assert sealed[-16:].hex() == "76fc6ece0f4e1768cddf8853bb2d551b"
    # guest-message shapes: AAD 0x30 bytes (header 0x30..0x5F), payloads 0x60 / 0x4C0 / 0, odd sizes
    for n in (0, 1, 15, 16, 17, 0x60, 0x4C0, 1000):
        key, iv, aad, pt = os.urandom(32), os.urandom(12), os.urandom(0x30), os.urandom(n)
        ref = AESGCM(key).encrypt(iv, pt, aad)
        assert _seal(aesgcm, key, iv, aad, pt) == ref
        assert _open(aesgcm, key, iv, aad, ref) == pt
        for where in (0, len(ref) - 1):
            bad = bytearray(ref)
            bad[where] ^= 0x80
            assert _open(aesgcm, key, iv, aad, bytes(bad)) is None
        assert _open(aesgcm, key, iv, aad[:-1] + bytes([aad[-1] ^ 1]), ref) is None


@pytest.mark.parametrize("generation", ["milan", "turin"])
def test_attest_guest_report_verifies_on_the_host(generation: str) -> None:
    run = launch_guest(load_image("attest"), mode="snp", generation=generation, seed=f"attest-{generation}")
    try:
        out = run.run(timeout=120)
        assert out.status == "finished", out.console + out.reason
        report = guest_report(out.console)
        assert report is not None, out.console
        got = verify_guest_report(run.machine, report)
        g = snp_state(run.machine.firmware).guests[run.vm.snp_context]
        assert got.report.measurement == g.ld != bytes(48)  # the launch digest the firmware computed
        # the owner's calculator, written apart from the firmware, gives the same digest, and the host's
        # check pins it: a report of any other launch would fail
        from sevemu.cli.run import _expected_snp_digest

        assert _expected_snp_digest(run) == g.ld
        verify_guest_report(run.machine, report, measurement=g.ld)
        with pytest.raises(SnpCheckError) as exc:
            verify_guest_report(run.machine, report, measurement=bytes(47) + b"\1")
        assert exc.value.check == "policy.measurement"
        assert got.report.report_data == ATTEST_REPORT_DATA
        assert got.report.signer_info.signing_key == SigningKey.VCEK and g.msg_count[0] == 2
        # the verifier is not a rubber stamp: other REPORT_DATA, a changed byte
        with pytest.raises(SnpCheckError) as exc:
            verify_guest_report(run.machine, report, report_data=bytes(64))
        assert exc.value.check == "policy.report_data"
        bad = bytearray(report)
        bad[0x90] ^= 1
        with pytest.raises(SnpCheckError):
            verify_guest_report(run.machine, bytes(bad))
    finally:
        run.close()


def _attacked(attack: str) -> str:
    run = launch_guest(load_image("attest"), mode="snp", seed=f"attest-attack-{attack}")
    svc = guest_requests(run.machine.hv)
    real = svc.request

    def hostile(vm, req_gpa: int, resp_gpa: int) -> Reply:  # type: ignore[no-untyped-def]
        if attack == "forged-error":
            return Reply(0x16)  # INVALID_PARAM, made up by the host: the firmware was never asked
        reply = real(vm, req_gpa, resp_gpa)
        page = bytearray(vm.host_read(resp_gpa, 0x1000))
        page[0x60 + 0x30] ^= 1  # a byte of the encrypted report, in the guest's shared page
        vm.host_write(resp_gpa, bytes(page))
        return reply

    svc.request = hostile  # type: ignore[method-assign]
    try:
        out = run.run(timeout=120)
        assert out.status == "finished", out.console + out.reason
        assert guest_report(out.console) is None
        return out.console
    finally:
        svc.request = real  # type: ignore[method-assign]
        run.close()


def test_host_tampering_costs_the_guest_its_key() -> None:
    console = _attacked("tamper")
    assert "the response does not authenticate: VMPCK0 disabled" in console
    console = _attacked("forged-error")
    assert "the guest request failed: firmware error 16" in console and "VMPCK0 disabled" in console


def test_attest_guest_outside_snp() -> None:
    run = launch_guest(load_image("attest"), mode="sev-es", seed="attest-es")
    try:
        out = run.run(timeout=60)
    finally:
        run.close()
    assert out.status == "finished" and "not an SEV-SNP guest" in out.console


def test_sevemu_run_attest_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sevemu.cli.main import main

    rc = main(["run", "attest", "--mode", "snp", "--seed", "attest-cli"])
    err = capsys.readouterr().err
    assert rc == 0 and "the guest's attestation report verifies" in err, err
    assert "the launch digest the owner computes for this image" in err, err
