"""The owner <-> host exchange with files, each party running its own ``sevemu`` processes, as with
sevctl + QEMU: the host exports its chain, the owner verifies it and makes a session, the host's VMM
launches from the owner's files and publishes the measurement, the owner verifies it and builds the
secret, the VMM injects it, finishes and runs the guest -- and the QMP form of the same."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from clikit import call, spawn

from sevemu.cli.vmm import GUEST_PROGRAM_TABLE

pytestmark = pytest.mark.slow

GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"


def hand_over(src: Path, dst: Path) -> None:
    """Give a file to the other party: it appears whole (copied beside, then renamed)."""
    tmp = dst.with_name("." + dst.name + ".part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 90) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


@contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The VMM process; killed if the test ends before it does."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def vmm_output(proc: subprocess.Popen[str]) -> str:
    """Wait for the VMM's end; it must succeed, without a traceback: its stdout."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return out


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture
def parties(tmp_path: Path) -> tuple[Path, Path, Path]:
    home, host, owner = tmp_path / "home", tmp_path / "host", tmp_path / "owner"
    host.mkdir()
    owner.mkdir()
    return home, host, owner


def owner_session(home: Path, host: Path, owner: Path) -> None:
    """Host exports its chain (and the emulated ARK, standing for AMD's published one); the owner
    verifies the chain and makes a session; the GODH and session files go to the host."""
    ok(call(home, host, "export", "--full", "chain.cert"))
    ok(call(home, host, "platform", "export", "--full", "certs"))
    hand_over(host / "chain.cert", owner / "chain.cert")
    hand_over(host / "certs" / "ark.cert", owner / "ark.cert")
    out = ok(call(home, owner, "verify", "--sev", "chain.cert", "--emulated-ark", "ark.cert"))
    assert "chain OK: emulated" in out
    ok(call(home, owner, "session", "chain.cert", "0x1"))
    for name in ("vm_godh.b64", "vm_session.b64"):
        hand_over(owner / name, host / name)
    (owner / "passphrase.txt").write_bytes(b"correct horse battery staple")


def firmware_version(home: Path, host: Path) -> list[str]:
    v = json.loads(ok(call(home, host, "show", "version", "--json")))
    return ["--api-major", str(v["api_major"]), "--api-minor", str(v["api_minor"]),
            "--build-id", str(v["build"]), "--policy", "0x1"]


def test_exchange_with_files(parties: tuple[Path, Path, Path]) -> None:
    home, host, owner = parties
    owner_session(home, host, owner)
    image = os.urandom(3 * 4096 + 100)  # not whole pages: host and owner pad it the same way
    (host / "fw.bin").write_bytes(image)
    (owner / "fw.bin").write_bytes(image)
    (owner / "code.bin").write_bytes(GUEST_PROGRAM_TABLE)  # the VMM's guest code, measured after the image
    version = firmware_version(home, host)

    with running(spawn(home, host, "vmm", "--dh-cert-file", "vm_godh.b64", "--session-file", "vm_session.b64",
                       "--policy", "0x1", "--firmware", "fw.bin", "--launch-measure-blob", "measure.b64",
                       "--secret-header", "secret_header.bin", "--secret-payload", "secret_payload.bin",
                       "--timeout", "120")) as vmm:
        wait_for(host / "measure.b64", vmm)
        hand_over(host / "measure.b64", owner / "measure.b64")
        out = ok(call(home, owner, "measurement", "verify", "--launch-measure-blob", "measure.b64",
                      "--tik", "vm_tik.bin", "--firmware", "fw.bin", "--firmware", "code.bin", *version))
        assert "measurement OK" in out
        # sevctl's measurement build gives the very blob the firmware returned
        built = ok(call(home, owner, "measurement", "build", "--launch-measure-blob", "measure.b64",
                        "--tik", "vm_tik.bin", "--firmware", "fw.bin", "--firmware", "code.bin", *version)).strip()
        assert base64.b64decode(built) == base64.b64decode((owner / "measure.b64").read_text())
        ok(call(home, owner, "secret", "build", "--tek", "vm_tek.bin", "--tik", "vm_tik.bin",
                "--launch-measure-blob", "measure.b64", "--secret", f"{GUID}:passphrase.txt",
                "secret_header.bin", "secret_payload.bin"))
        hand_over(owner / "secret_header.bin", host / "secret_header.bin")
        hand_over(owner / "secret_payload.bin", host / "secret_payload.bin")
        out = vmm_output(vmm)
    assert f"[guest] reads its secret {GUID}" in out and "correct horse battery staple" in out
    assert "(ciphertext)" in out


def test_exchange_with_qmp(parties: tuple[Path, Path, Path]) -> None:
    home, host, owner = parties
    owner_session(home, host, owner)
    (host / "fw.bin").write_bytes(b"firmware volume".ljust(8192, b"\xff"))
    (owner / "fw.bin").write_bytes((host / "fw.bin").read_bytes())
    (owner / "code.bin").write_bytes(GUEST_PROGRAM_TABLE)
    version = firmware_version(home, host)
    with running(spawn(home, host, "vmm", "--dh-cert-file", "vm_godh.b64", "--session-file", "vm_session.b64",
                       "--firmware", "fw.bin", "--qmp", "vmm.sock", "--timeout", "120")) as vmm:
        wait_for(host / "vmm.sock", vmm)
        sev = json.loads(ok(call(home, host, "qmp", "vmm.sock", "query-sev")))
        assert sev["state"] == "launch-secret" and sev["policy"] == 1
        blob = json.loads(ok(call(home, host, "qmp", "vmm.sock", "query-sev-launch-measure")))["data"]
        # sevctl takes the blob inline in base64 as well as from a file
        assert "measurement OK" in ok(call(home, owner, "measurement", "verify", "--launch-measure-blob", blob,
                                           "--tik", "vm_tik.bin", "--firmware", "fw.bin", "--firmware", "code.bin", *version))
        # the legacy attestation report, checked against the chain's PEK
        mnonce = base64.b64encode(os.urandom(16)).decode()
        report = json.loads(ok(call(home, host, "qmp", "vmm.sock", "query-sev-attestation-report",
                                    f"mnonce={mnonce}")))["data"]
        (owner / "report.b64").write_text(report)
        assert "report OK" in ok(call(home, owner, "validate", "chain.cert", "report.b64", "--mnonce", mnonce))
        ok(call(home, owner, "secret", "build", "--tek", "vm_tek.bin", "--tik", "vm_tik.bin",
                "--launch-measure-blob", blob, "--secret", f"{GUID}:passphrase.txt", "hdr.bin", "payload.bin"))
        shutil.copy(owner / "hdr.bin", host / "hdr.bin")
        shutil.copy(owner / "payload.bin", host / "payload.bin")
        bad = call(home, host, "qmp", "vmm.sock", "no-such-command")
        assert bad.returncode == 2 and "has not been found" in bad.stderr
        forged = bytearray((host / "hdr.bin").read_bytes())
        forged[0x20] ^= 1  # a bit of the MAC: the firmware refuses the packet
        (host / "forged.bin").write_bytes(bytes(forged))
        refused = call(home, host, "qmp", "vmm.sock", "sev-inject-launch-secret", "packet-header=@forged.bin",
                       "secret=@payload.bin")
        assert refused.returncode == 2 and refused.stderr.startswith("sevemu: error: qmp sev-inject-launch-secret")
        ok(call(home, host, "qmp", "vmm.sock", "sev-inject-launch-secret", "packet-header=@hdr.bin",
                "secret=@payload.bin"))
        ok(call(home, host, "qmp", "vmm.sock", "cont"))
        out = vmm_output(vmm)
    assert "correct horse battery staple" in out and not (host / "vmm.sock").exists()


def test_vmm_gives_up_after_its_timeout(parties: tuple[Path, Path, Path]) -> None:
    home, host, owner = parties
    owner_session(home, host, owner)
    (host / "fw.bin").write_bytes(bytes(4096))
    r = call(home, host, "vmm", "--dh-cert-file", "vm_godh.b64", "--session-file", "vm_session.b64",
             "--firmware", "fw.bin", "--launch-measure-blob", "m.b64", "--secret-header", "h.bin",
             "--secret-payload", "p.bin", "--timeout", "1")
    assert r.returncode == 1 and "no secret within 1 s" in r.stderr and "Traceback" not in r.stderr
    assert (host / "m.b64").exists() and "[guest]" not in r.stdout


def test_qmp_quit_and_capabilities(parties: tuple[Path, Path, Path]) -> None:
    home, host, _ = parties
    (host / "fw.bin").write_bytes(bytes(4096))
    with running(spawn(home, host, "vmm", "--firmware", "fw.bin", "--qmp", "q.sock", "--timeout", "120")) as vmm:
        wait_for(host / "q.sock", vmm)
        caps = json.loads(ok(call(home, host, "qmp", "q.sock", "query-sev-capabilities")))
        assert len(base64.b64decode(caps["pdh"])) == 0x824 and len(base64.b64decode(caps["cert-chain"])) == 3 * 0x824
        assert caps["cbitpos"] == 51
        ok(call(home, host, "qmp", "q.sock", "quit"))
        out = vmm_output(vmm)
    assert "quit: the guest is destroyed without running" in out and "[guest]" not in out
    gone = call(home, host, "qmp", "q.sock", "query-sev")
    assert gone.returncode == 2 and "q.sock: no such socket" in gone.stderr
