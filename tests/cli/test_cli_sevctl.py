"""The sevctl-style commands: platform status/export/reset/rotate/provision/generate, verify, session,
measurement verify/build, secret build and the guided launch -- outputs, files, exit codes and the
error messages for wrong input (exit 2, no traceback)."""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import pytest

from sevemu.abi.pycode import CODE_GPA, code_table
from sevemu.cli.main import main
from sevemu.guest.workloads import read_back
from sevemu.hw.pyengine import PyEngine
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevCmdId,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    load_image,
)
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.owner.secret import parse_secret_table
from sevemu.scenario import build_machine


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEVEMU_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command that must fail with exit 2 and a one-line error (no traceback)."""
    rc, _, err = run(capsys, *argv)
    assert rc == 2, err
    assert err.startswith("sevemu: error: ") and "Traceback" not in err and err.count("\n") == 1
    return err


def test_guided_launch(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    rc, out, _ = run(capsys, "launch")
    assert rc == 0
    actors = [line.split("]")[0][1:] for line in out.splitlines() if line.startswith("[")]
    assert actors[:4] == ["platform", "hypervisor", "owner", "owner"] and "guest" in actors
    assert "KVM_SEV_LAUNCH_MEASURE" in out and "correct horse battery staple" in out and "(ciphertext)" in out
    assert (home / "home" / "milan" / "factory").is_dir()  # the default platform directory


def test_guided_launch_with_files_and_json(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    (home / "fw.bin").write_bytes(os.urandom(10000))
    (home / "k.bin").write_bytes(b"\x00\x01binary key\xff")
    guid = str(uuid.uuid4())
    rc, out, _ = run(capsys, "launch", "--platform-dir", "plat", "--generation", "genoa", "--image", "fw.bin",
                     "--secret", f"{guid}:k.bin", "--policy", "0x3", "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["ok"] and result["generation"] == "genoa"
    assert next(s for s in result["steps"] if s["actor"] == "guest")["guid"] == guid
    assert fails(capsys, "launch", "--platform-dir", "plat", "--secret", "not-a-guid:k.bin").endswith(
        "is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)\n")
    assert "plat holds a genoa platform, not milan" in fails(capsys, "launch", "--platform-dir", "plat",
                                                            "--generation", "milan")
    assert "missing.bin: no such file" in fails(capsys, "launch", "--image", "missing.bin")


def test_platform_commands_and_verify(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    rc, out, _ = run(capsys, "platform", "status", "--json")
    status = json.loads(out)
    assert rc == 0 and status["owner"] == "self" and status["state"] == "INIT" and len(status["chip_id"]) == 128
    assert run(capsys, "platform", "export", "--full", "certs")[0] == 0
    assert sorted(p.name for p in (home / "certs").iterdir()) == sorted(
        ["pdh.cert", "pek.cert", "oca.cert", "cek.cert", "ask.cert", "ark.cert"])
    rc, out, _ = run(capsys, "verify", "certs")
    assert rc == 1 and "FAILED ARK" in out and "--emulated" in out  # AMD's real ARKs do not sign emulated chips
    rc, out, _ = run(capsys, "verify", "certs", "--emulated")
    assert rc == 0 and "chain OK: emulated milan ARK" in out
    assert run(capsys, "verify", "--emulated-ark", "certs/ark.cert")[0] == 0  # straight from the platform
    # a PDH from elsewhere does not chain to this PEK
    pdh = bytearray((home / "certs" / "pdh.cert").read_bytes())
    pdh[0x20] ^= 1
    (home / "certs" / "pdh.cert").write_bytes(bytes(pdh))
    rc, out, _ = run(capsys, "verify", "certs", "--emulated", "--json")
    assert rc == 1 and json.loads(out)["link"] in ("PDH", "PDH <- PEK")
    (home / "certs" / "cek.cert").write_bytes(b"x" * 17)
    assert "cek.cert: expected 2084 bytes (an SEV certificate), got 17" in fails(capsys, "verify", "certs")
    (home / "certs" / "ark.cert").unlink()
    assert "missing ark.cert" in fails(capsys, "verify", "certs")

    # ownership: generate an OCA, provision, reset; rotate the PDH
    assert run(capsys, "platform", "generate", "oca.cert", "oca.key")[0] == 0
    assert oct((home / "oca.key").stat().st_mode & 0o777) == "0o600"
    assert run(capsys, "platform", "provision", "--oca-cert", "oca.cert", "--oca-key", "oca.key")[0] == 0
    assert json.loads(run(capsys, "platform", "status", "--json")[1])["owner"] == "external"
    assert "ALREADY_OWNED" in fails(capsys, "platform", "provision", "--oca-cert", "oca.cert", "--oca-key", "oca.key")
    assert "x.key is not the key of oca.cert" in fails(capsys, "platform", "provision", "--oca-cert", "oca.cert",
                                                "--oca-key", _other_key(home))
    assert "not an unencrypted private key (DER or PEM)" in fails(capsys, "platform", "provision", "--oca-cert",
                                                         "oca.cert", "--oca-key", "oca.cert")
    assert run(capsys, "platform", "reset")[0] == 0
    assert json.loads(run(capsys, "platform", "status", "--json")[1])["owner"] == "self"
    before = json.loads(run(capsys, "platform", "export", "a", "--json")[1])
    assert run(capsys, "platform", "rotate")[0] == 0
    run(capsys, "platform", "export", "b")
    assert Path(before["files"][0]).read_bytes() != (home / "b" / "pdh.cert").read_bytes()


def _other_key(home: Path) -> str:
    main(["platform", "generate", str(home / "x.cert"), str(home / "x.key")])
    return str(home / "x.key")


def test_owner_files_against_a_host(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    """session -> (host launches with the files) -> measurement verify -> secret build -> the guest
    reads the secret: the two-party flow through files only."""
    plat = home / "p"
    assert run(capsys, "platform", "export", "--platform-dir", str(plat), "certs")[0] == 0
    assert run(capsys, "session", "--pdh", "certs/pdh.cert", "--policy", "0x1", "--out", "o", "--name", "vm")[0] == 0
    files = {p.name for p in (home / "o").iterdir()}
    assert files == {"vm_godh.b64", "vm_session.b64", "vm_tek.bin", "vm_tik.bin"}  # sevctl's names and formats
    image = os.urandom(12288)
    (home / "fw.bin").write_bytes(image)

    m = build_machine("milan", platform_dir=plat, init=False, dram_size=1 << 30)
    hv, dev = m.hv, SevDevice(m.hv)
    vm = hv.create_vm("g", 16 << 20)
    kvm = KvmSev(hv, vm)
    kvm.op(KvmSevCmdId.INIT, sev_fd=dev)
    godh = base64.b64decode((home / "o" / "vm_godh.b64").read_bytes(), validate=True)
    session = base64.b64decode((home / "o" / "vm_session.b64").read_bytes(), validate=True)
    assert (len(godh), len(session)) == (0x824, 0x80)
    kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=1, dh_uaddr=godh, dh_len=len(godh),
                                                       session_uaddr=session, session_len=len(session)),
           sev_fd=dev)
    assert load_image(kvm, image, 0x100000) == 0
    table = code_table([read_back]).ljust(4096, b"\0")  # the guest's Python code, a page after the image
    assert load_image(kvm, table, CODE_GPA) == 0
    (home / "code.bin").write_bytes(table)
    blob = bytearray(0x30)
    kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(blob, 0x30))
    (home / "measure.txt").write_text(blob.hex())
    p = m.profile
    common = ["--api-major", str(p.api_major), "--api-minor", str(p.api_minor), "--build", str(p.build),
              "--policy", "1"]
    rc, out, _ = run(capsys, "measurement", "verify", "--measurement", "measure.txt", "--tik", "o/vm_tik.bin",
                     "--image", "fw.bin", "--image", "code.bin", *common)
    assert rc == 0 and "measurement OK" in out
    rc, out, _ = run(capsys, "measurement", "verify", "--measurement", "measure.txt", "--tik", "o/vm_tik.bin",
                     "--digest", "00" * 32, *common, "--json")
    assert rc == 1 and json.loads(out)["ok"] is False
    rc, out, _ = run(capsys, "measurement", "build", "--image", "fw.bin", "--image", "code.bin", *common, "--tik", "o/vm_tik.bin",
                     "--mnonce", blob[32:].hex(), "--json")
    assert json.loads(out)["blob"] == blob.hex()
    (home / "short.bin").write_bytes(b"x" * 17)
    assert "short.bin: expected 48 bytes of LAUNCH_MEASURE blob (raw, hex or base64), got 17 bytes" in fails(
        capsys, "measurement", "verify", "--measurement", "short.bin", "--tik", "o/vm_tik.bin", "--image",
        "fw.bin", "--image", "code.bin", *common)
    assert "o/vm_godh.b64: expected 16 bytes of a TIK (raw, hex or base64), got 2780 bytes" in fails(
        capsys, "measurement", "verify", "--measurement", "measure.txt", "--tik", "o/vm_godh.b64", "--image",
        "fw.bin", "--image", "code.bin", *common)

    (home / "disk.key").write_bytes(b"luks passphrase")
    guid = "736869e5-84f0-4973-92ec-06879ce3da0b"
    rc, _, _ = run(capsys, "secret", "build", "--secret", f"{guid}:disk.key", "--tek", "o/vm_tek.bin", "--tik",
                   "o/vm_tik.bin", "--measurement", "measure.txt", "--api-major", str(p.api_major), "--api-minor",
                   str(p.api_minor), "hdr.bin", "secret.bin")
    assert rc == 0
    hdr, trans = (home / "hdr.bin").read_bytes(), (home / "secret.bin").read_bytes()
    kvm.op(KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(hdr, len(hdr), kvm.hva(0x200000), len(trans), trans,
                                                         len(trans)))
    kvm.op(KvmSevCmdId.LAUNCH_FINISH)
    vm.add_vcpu(PyEngine(read_back(16 << 20, 0x200000, len(trans))))
    hv.run(vm)
    table = bytes.fromhex(vm.console.decode().strip().splitlines()[-1])
    assert parse_secret_table(table) == {uuid.UUID(guid): b"luks passphrase"}
    m.firmware.close()


def test_owner_input_errors(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    (home / "x.cert").write_bytes(b"x" * 17)
    assert "x.cert: expected 2084 bytes (an SEV certificate), got 17" in fails(
        capsys, "session", "--pdh", "x.cert", "--policy", "1")
    assert "nope.cert: no such file" in fails(capsys, "session", "--pdh", "nope.cert", "--policy", "1")
    run(capsys, "platform", "export", "--full", "c")
    assert "a PEK certificate, expected PDH" in fails(capsys, "session", "--pdh", "c/pek.cert", "--policy", "1")
    assert "reserved bits" in fails(capsys, "session", "--pdh", "c/pdh.cert", "--policy", "0x40")
    assert "is not a number" in fails(capsys, "session", "--pdh", "c/pdh.cert", "--policy", "one")
    assert "is a directory" in fails(capsys, "session", "--pdh", "c", "--policy", "1")
    assert "expected GUID:FILE" in fails(capsys, "secret", "build", "--secret", "nothing", "--tek", "a", "--tik",
                                         "b", "--measurement", "m", "--api-major", "1", "--api-minor", "0", "h", "s")
