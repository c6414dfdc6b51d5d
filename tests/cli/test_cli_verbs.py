"""sevctl's verbs at the top level and their ``platform ...`` aliases: ok, show, export (sevctl's chain
file), verify --sev/--oca/--ca, generate, provision, session files, measurement build options,
secret build, validate; display of every artefact; --version, -q, JSON errors."""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import pytest
from clikit import fails, run
from cryptography.hazmat.primitives import serialization

from sevemu.abi.certs import KeyUsage
from sevemu.certs.chain import AmdCertChain
from sevemu.cli.main import main
from sevemu.owner.measurement import launch_measure_blob, padded_image
from sevemu.scenario import build_machine

CERT = 0x824


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEVEMU_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_ok_checks_the_emulated_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "ok", "es", "--json")
    r = json.loads(out)
    assert rc == 0 and r["ok"] and r["level"] == "es"
    rows = {row["name"]: row for row in r["checks"]}
    assert rows["C-bit location"]["message"] == "51"  # Milan: CPUID Fn8000_001F EBX[5:0]
    assert rows["Minimum ASID value for SEV-enabled, SEV-ES disabled guest"]["message"] == "100"
    assert rows["Secure Nested Paging (SEV-SNP)"]["status"] == "SKIP"
    # the CPU's own generation (Milan: SNP): the host kernel enabled SNP at boot (SYSCFG.SNPEn)
    rc, out, _ = run(capsys, "ok")
    assert rc == 0 and "[ PASS ]     - Secure Nested Paging (SEV-SNP)" in out
    assert "[ PASS ]       - VM Permission Levels" in out and "[ PASS ]         - Number of VMPLs: 4" in out
    # Naples: SEV only; its generation is sevctl's "sev" (family 0x17, model 0x01)
    rc, out, _ = run(capsys, "ok", "--platform-dir", "naples", "--generation", "naples", "--json")
    r = json.loads(out)
    rows = {row["name"]: row for row in r["checks"]}
    assert rc == 0 and r["level"] == "sev" and rows["Encrypted State (SEV-ES)"]["status"] == "SKIP"
    rc, out, _ = run(capsys, "ok", "es", "--platform-dir", "naples")
    assert rc == 1 and "[ FAIL ]     - Encrypted State (SEV-ES)" in out and "no SEV-ES ASIDs" in out
    assert run(capsys, "-q", "ok") == (0, "", "")  # quiet: the status alone
    assert run(capsys, "-q", "ok", "es", "--platform-dir", "naples") == (1, "", "")
    assert "invalid choice: 'tdx'" in fails(capsys, "ok", "tdx")


def test_show_and_its_alias(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "show", "version")
    p = build_machine("milan", init=False).profile
    assert rc == 0 and out == f"{p.api_major}.{p.api_minor}.{p.build}\n"
    rc, out, _ = run(capsys, "show", "identifier")
    ident = out.strip()
    assert len(ident) == 128 and ident == ident.upper()
    assert run(capsys, "show", "guests")[1] == "0\n"
    assert run(capsys, "show", "flags")[1] == "es\n"  # self-owned, SEV-ES configured by INIT
    status = json.loads(run(capsys, "platform", "status", "--json")[1])
    assert status["chip_id"].upper() == ident and json.loads(run(capsys, "show", "--json")[1]) == status


def test_export_writes_sevctls_chain_file(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    assert run(capsys, "export", "sev.cert")[0] == 0
    assert run(capsys, "export", "--full", "full.cert")[0] == 0
    sev, full = (home / "sev.cert").read_bytes(), (home / "full.cert").read_bytes()
    assert len(sev) == 4 * CERT and full[: 4 * CERT] == sev
    # read as virtee/sev decodes a chain: version 1, then pub_key_usage at offset 8 of each certificate
    for i, usage in enumerate((KeyUsage.PDH, KeyUsage.PEK, KeyUsage.OCA, KeyUsage.CEK)):
        version, = struct.unpack_from("<I", sev, i * CERT)
        got, = struct.unpack_from("<I", sev, i * CERT + 8)
        assert (version, got) == (1, usage)
    amd = AmdCertChain.decode(full[4 * CERT :])  # ASK || ARK, what sevctl's --ca file holds
    assert (amd.ask.key_usage, amd.ark.key_usage) == (KeyUsage.ASK, KeyUsage.ARK)
    # the directory form (as `platform export`), and the same certificates in it
    assert run(capsys, "export", "--full", "certs/")[0] == 0
    assert (home / "certs" / "pdh.cert").read_bytes() == sev[:CERT]
    assert (home / "certs" / "ark.cert").read_bytes() == amd.ark.encode()
    assert "is a directory" not in run(capsys, "platform", "export", "more")[2]
    assert (home / "more" / "cek.cert").read_bytes() == sev[3 * CERT :]


def test_verify_reads_sevctls_files(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    run(capsys, "export", "sev.cert")
    run(capsys, "export", "--full", "full.cert")
    run(capsys, "export", "--full", "certs/")
    (home / "ca.cert").write_bytes((home / "certs" / "ask.cert").read_bytes() + (home / "certs" / "ark.cert").read_bytes())
    assert run(capsys, "verify", "--sev", "full.cert", "--emulated")[0] == 0
    assert run(capsys, "verify", "full.cert", "--emulated-ark", "certs/ark.cert")[0] == 0
    assert run(capsys, "verify", "--sev", "sev.cert", "--ca", "ca.cert", "--emulated-ark", "certs/ark.cert")[0] == 0
    rc, out, _ = run(capsys, "verify", "--sev", "full.cert")
    assert rc == 1 and "FAILED ARK" in out  # AMD's real ARKs never sign an emulated chip
    assert "holds no ASK || ARK" in fails(capsys, "verify", "--sev", "sev.cert", "--emulated-ark", "certs/ark.cert")
    # an OCA from elsewhere does not sign this PEK
    run(capsys, "generate", "other.cert", "other.key")
    rc, out, _ = run(capsys, "verify", "--sev", "full.cert", "--oca", "other.cert", "--emulated", "--json")
    assert rc == 1 and json.loads(out)["link"] == "PEK <- OCA"
    short = home / "short.cert"
    short.write_bytes(b"\x01" * 100)
    assert "short.cert: expected a chain of at least" in fails(capsys, "verify", "--sev", "short.cert", "--emulated")
    (home / "swapped.cert").write_bytes((home / "sev.cert").read_bytes()[CERT : 2 * CERT] * 4)
    assert "swapped.cert (PDH): a PEK certificate, expected PDH" in fails(capsys, "verify", "--sev", "swapped.cert",
                                                                          "--emulated")
    assert "give the SEV chain once" in fails(capsys, "verify", "full.cert", "--sev", "full.cert")


def test_generate_refuses_to_overwrite_keys(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    assert "same.pem is given both as the OCA certificate and as the OCA private key" in fails(
        capsys, "generate", "same.pem", "same.pem")
    assert not (home / "same.pem").exists()
    assert run(capsys, "generate", "oca.cert", "oca.key")[0] == 0
    key = (home / "oca.key").read_bytes()
    assert "oca.key: exists; refusing to overwrite the OCA private key (--force to replace it)" in fails(
        capsys, "generate", "new.cert", "oca.key")
    assert (home / "oca.key").read_bytes() == key and not (home / "new.cert").exists()
    assert "oca.cert: exists" in fails(capsys, "generate", "oca.cert", "new.key")
    assert run(capsys, "generate", "--force", "oca.cert", "oca.key")[0] == 0
    assert (home / "oca.key").read_bytes() != key and oct((home / "oca.key").stat().st_mode & 0o777) == "0o600"
    os.mkdir(home / "d")
    assert "d: is a directory" in fails(capsys, "generate", "d", "k.key")
    # sevctl's positional form and the old options, one implementation
    assert run(capsys, "provision", "oca.cert", "oca.key")[0] == 0
    assert json.loads(run(capsys, "show", "--json")[1])["owner"] == "external"
    assert run(capsys, "reset")[0] == 0 and run(capsys, "platform", "reset")[0] == 0
    assert run(capsys, "platform", "provision", "--oca-cert", "oca.cert", "--oca-key", "oca.key")[0] == 0
    assert "give the OCA certificate and key once" in fails(capsys, "provision", "oca.cert", "oca.key",
                                                            "--oca-cert", "oca.cert")
    assert "provision needs the OCA certificate" in fails(capsys, "provision")
    assert run(capsys, "rotate")[0] == 0


def test_session_files_and_sevctl_forms(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    run(capsys, "export", "--full", "chain.cert")
    assert run(capsys, "session", "chain.cert", "1")[0] == 0  # the PDH is the chain's first certificate
    godh = base64.b64decode((home / "vm_godh.b64").read_bytes(), validate=True)
    session = base64.b64decode((home / "vm_session.b64").read_bytes(), validate=True)
    assert (len(godh), len(session)) == (CERT, 0x80)
    assert [len((home / f"vm_{k}.bin").read_bytes()) for k in ("tek", "tik")] == [16, 16]
    assert oct((home / "vm_tik.bin").stat().st_mode & 0o777) == "0o600"
    tik = (home / "vm_tik.bin").read_bytes()
    assert "vm_godh.b64: exists; refusing to overwrite" in fails(capsys, "session", "chain.cert", "1")
    assert (home / "vm_tik.bin").read_bytes() == tik
    assert run(capsys, "session", "--name", "g2", "--out", "o", "chain.cert", "0x5")[0] == 0
    assert sorted(p.name for p in (home / "o").iterdir()) == ["g2_godh.b64", "g2_session.b64", "g2_tek.bin",
                                                             "g2_tik.bin"]
    assert "a file-name prefix" in fails(capsys, "session", "--name", "a/b", "chain.cert", "1")
    assert "session needs the platform's PDH and a policy" in fails(capsys, "session", "chain.cert")
    assert "reserved bits" in fails(capsys, "session", "chain.cert", "0x40")


def test_measurement_build_takes_sevctls_options(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    tik, mnonce = os.urandom(16), os.urandom(16)
    image = os.urandom(5000)
    (home / "fw.bin").write_bytes(image)
    (home / "tik.bin").write_bytes(tik)
    from sevemu.owner.measurement import expected_launch_digest

    digest = expected_launch_digest([padded_image(image)])
    blob = launch_measure_blob(tik, api_major=1, api_minor=51, build=3, policy=1, launch_digest=digest, mnonce=mnonce)
    common = ["--api-major", "1", "--api-minor", "0x33", "--build-id", "3", "--policy", "1"]
    b64 = base64.b64encode
    for tik_arg in ("tik.bin", b64(tik).decode()):  # a path, or the value inline in base64
        for nonce in (["--nonce", b64(mnonce).decode()], ["--launch-measure-blob", b64(blob).decode()]):
            rc, out, _ = run(capsys, "measurement", "build", *common, "--firmware", "fw.bin", "--tik", tik_arg, *nonce)
            assert rc == 0 and base64.b64decode(out.strip()) == blob
    rc, out, _ = run(capsys, "measurement", "build", *common, "--launch-digest", b64(digest).decode(),
                     "--tik", "tik.bin", "--nonce", b64(mnonce).decode(), "--outfile", "expected.bin")
    assert rc == 0 and out == "Wrote outfile: expected.bin\n" and (home / "expected.bin").read_bytes() == blob
    # the padding rule: the file measured as the 4 KiB pages it is loaded into
    (home / "padded.bin").write_bytes(padded_image(image))
    outs = [json.loads(run(capsys, "measurement", "build", *common, "--firmware", f, "--json")[1])["launch_digest"]
            for f in ("fw.bin", "padded.bin")]
    assert outs == [digest.hex(), digest.hex()]
    assert "one of --nonce or --launch-measure-blob" in fails(capsys, "measurement", "build", *common,
                                                              "--firmware", "fw.bin", "--tik", "tik.bin")
    assert "--tik nope.bin: no such file" in fails(capsys, "measurement", "build", *common, "--firmware", "fw.bin",
                                                   "--tik", "nope.bin", "--nonce", b64(mnonce).decode())
    assert "requires SEV-ES" in fails(capsys, "measurement", "build", "--api-major", "1", "--api-minor", "51",
                                      "--build-id", "3", "--policy", "0x5", "--firmware", "fw.bin")
    assert "has no ES bit" in fails(capsys, "measurement", "build", *common, "--firmware", "fw.bin",
                                    "--num-cpus", "2")
    (home / "vmsa.bin").write_bytes(bytes(4096))
    es = ["--api-major", "1", "--api-minor", "51", "--build-id", "3", "--policy", "0x5", "--firmware", "fw.bin",
          "--vmsa-cpu0", "vmsa.bin", "--vmsa-cpu1", "vmsa.bin"]
    es_digest = json.loads(run(capsys, "measurement", "build", *es, "--num-cpus", "2", "--json")[1])
    assert es_digest["launch_digest"] == expected_launch_digest([padded_image(image)], [bytes(4096)] * 2).hex()


def test_secret_build_and_validate_errors(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    (home / "tek.bin").write_bytes(os.urandom(16))
    (home / "tik.bin").write_bytes(os.urandom(16))
    (home / "m.bin").write_bytes(os.urandom(48))
    (home / "s.txt").write_bytes(b"secret")
    (home / "big.bin").write_bytes(bytes(20000))
    base = ["secret", "build", "--tek", "tek.bin", "--tik", "tik.bin", "--launch-measure-blob", "m.bin"]
    assert "out.bin is given both as the packet header and as the payload" in fails(
        capsys, *base, "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:s.txt", "out.bin", "out.bin")
    assert "s.txt is an input of this command" in fails(
        capsys, *base, "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:s.txt", "h.bin", "s.txt")
    assert "the secret table is 20048 bytes; LAUNCH_SECRET through KVM takes at most 16384" in fails(
        capsys, *base, "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:big.bin", "h.bin", "p.bin")
    assert not (home / "h.bin").exists()
    assert "GUID 736869e5-84f0-4973-92ec-06879ce3da0b given twice" in fails(
        capsys, *base, "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:s.txt",
        "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:s.txt", "h.bin", "p.bin")
    assert run(capsys, *base, "--secret", "736869e5-84f0-4973-92ec-06879ce3da0b:s.txt", "h.bin", "p.bin")[0] == 0
    assert len((home / "h.bin").read_bytes()) == 0x34
    run(capsys, "export", "chain.cert")
    (home / "report.bin").write_bytes(bytes(100))
    assert "report.bin: expected 208 bytes of a legacy attestation report" in fails(
        capsys, "validate", "chain.cert", "report.bin")
    (home / "report.bin").write_bytes(bytes(0xD0))
    rc, out, _ = run(capsys, "validate", "chain.cert", "report.bin")
    assert rc == 1 and "report NOT valid" in out


def test_display_every_artefact(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    run(capsys, "export", "--full", "chain.cert")
    run(capsys, "export", "--full", "certs/")
    run(capsys, "session", "chain.cert", "1")
    (home / "m.b64").write_text(base64.b64encode(os.urandom(48)).decode())
    (home / "h.bin").write_bytes(bytes(0x34))
    (home / "r.bin").write_bytes(bytes(0xD0))
    (home / "ca.cert").write_bytes((home / "certs/ask.cert").read_bytes() + (home / "certs/ark.cert").read_bytes())
    kinds = {"certs/pdh.cert": "sev-cert", "vm_godh.b64": "sev-cert", "chain.cert": "chain",
             "certs/ark.cert": "amd-cert", "ca.cert": "amd-chain", "vm_session.b64": "session", "m.b64": "measure",
             "h.bin": "secret-header", "r.bin": "report", "vm_tik.bin": "transport-key"}
    for name, kind in kinds.items():
        rc, out, _ = run(capsys, "display", name, "--json")
        assert rc == 0 and json.loads(out)["type"] == kind, name
    out = run(capsys, "display", "vm_godh.b64")[1]
    assert "usage              PDH (0x1003)" in out and "signature 1        empty" in out
    assert "emulated           True" in run(capsys, "display", "certs/ark.cert")[1]
    pem = run(capsys, "display", "certs/pek.cert", "--encoding", "pem")[1]
    serialization.load_pem_public_key(pem.encode())
    assert run(capsys, "display", "certs/ark.cert", "--encoding", "der", "--outfile", "ark.der")[0] == 0
    serialization.load_der_public_key((home / "ark.der").read_bytes())
    assert "applies to a single certificate" in fails(capsys, "display", "chain.cert", "--encoding", "pem")
    (home / "junk").write_bytes(b"\x00" * 7)
    assert "junk: 7 bytes: not a kind of file sevemu knows" in fails(capsys, "display", "junk")
    assert "not the LAUNCH_MEASURE blob" in fails(capsys, "display", "h.bin", "--type", "measure")


def test_version_quiet_and_json_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sevemu ")
    assert run(capsys, "-q", "show", "version") == (0, "", "")
    assert run(capsys, "show", "version", "-q") == (0, "", "")
    rc, out, err = run(capsys, "session", "nope.cert", "1", "--json")
    assert rc == 2 and err == "sevemu: error: nope.cert: no such file\n"
    assert json.loads(out) == {"ok": False, "error": {"message": "nope.cert: no such file",
                                                      "type": "FileFormatError", "exit_status": 2}}
    rc, out, err = run(capsys, "bench", "memory", "--size", "0", "--json")
    assert rc == 2 and json.loads(out)["error"]["type"] == "UsageError"
    assert err.startswith("sevemu: error: argument --size: 0 is not positive (see 'sevemu bench memory --help')")
    for argv in (["frobnicate"], [], ["platform"], ["session", "--bogus"], ["display"]):
        fails(capsys, *argv)


def test_every_command_has_examples() -> None:
    import argparse

    from sevemu.cli.main import build_parser

    missing: list[str] = []

    def walk(p: argparse.ArgumentParser, path: list[str]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, [*path, name])
        if p.get_default("func") is not None and "example" not in (p.epilog or ""):
            missing.append(" ".join(path))

    walk(build_parser(), [])
    assert missing == []


def test_oca_keys_as_sevctl_writes_them(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    """generate writes the key in DER (sevctl: OpenSSL i2d_PrivateKey); provision takes DER or PEM."""
    run(capsys, "generate", "oca.cert", "oca.key")
    key = serialization.load_der_private_key((home / "oca.key").read_bytes(), password=None)
    (home / "oca.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    assert run(capsys, "provision", "oca.cert", "oca.pem")[0] == 0
    run(capsys, "reset")
    assert run(capsys, "provision", "oca.cert", "oca.key")[0] == 0
