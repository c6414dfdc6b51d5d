"""The snpguest-style CLI: fetch from our KDS, verify certs / attestation, display report, kds serve."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from clikit import fails, run
from reportkit import CHIP, make_report

import sevemu
from sevemu.amd.kds import KeyDistributionService, create_app, loopback_server
from sevemu.amd.snp import AmdSnpRoot
from sevemu.amd.vault import AmdRegistry
from sevemu.cli.attest import route

Root = Callable[[str], AmdSnpRoot]
TCB = 0x7308000000000003
SRC = Path(sevemu.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kds_url(snp_root: Root) -> Iterator[str]:
    registry = AmdRegistry()
    registry.record(CHIP["milan"])
    server = loopback_server(create_app(KeyDistributionService({"milan": snp_root("milan")}, registry)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


@pytest.fixture
def certs(kds_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    report = tmp_path / "report.bin"
    report.write_bytes(make_report("milan", TCB))
    d = tmp_path / "certs"
    assert run(capsys, "fetch", "ca", str(d), "--product", "Milan", "--url", kds_url)[0] == 0
    rc, out, err = run(capsys, "fetch", "vcek", str(d), str(report), "--url", kds_url)
    assert rc == 0, err
    assert "vcek/v1/Milan/" in out and "blSPL=3&teeSPL=0&snpSPL=8&ucodeSPL=115" in out
    assert run(capsys, "fetch", "crl", str(d), "--product", "Milan", "--url", kds_url)[0] == 0
    assert sorted(p.name for p in d.iterdir()) == ["ark.pem", "ask.pem", "crl.der", "vcek.pem"]
    return d, report


def test_fetch_then_verify(certs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    d, report = certs
    ark = str(d / "ark.pem")
    rc, out, _ = run(capsys, "verify", "certs", str(d), "--trust-ark", ark)
    assert rc == 0 and "certificates OK (emulated root)" in out
    rc, out, _ = run(capsys, "verify", "attestation", str(d), str(report), "--trust-ark", ark,
                     "--measurement", "22" * 48, "--min-tcb", hex(TCB), "--require-crl", "--json")
    result = json.loads(out)
    assert rc == 0 and result["ok"] and result["emulated_root"] and result["crl_checked"]
    rc, out, _ = run(capsys, "verify", "attestation", str(d), str(report), "--trust-ark", ark,
                     "--measurement", "00" * 48)
    assert rc == 1 and "FAILED policy.measurement:" in out
    rc, out, _ = run(capsys, "verify", "attestation", str(d), str(report))  # AMD's pins only
    assert rc == 1 and "FAILED ark:" in out
    rc, out, _ = run(capsys, "verify", "certs", str(d))
    assert rc == 1 and "FAILED ark:" in out
    tampered = d.parent / "tampered.bin"
    data = bytearray(report.read_bytes())
    data[0x50] ^= 1
    tampered.write_bytes(bytes(data))
    rc, out, _ = run(capsys, "verify", "attestation", str(d), str(tampered), "--trust-ark", ark, "--json")
    assert rc == 1 and json.loads(out)["check"] == "signature"


def test_display_report(certs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, report = certs
    rc, out, _ = run(capsys, "display", "report", str(report))
    assert rc == 0 and "product            Milan" in out and "boot_loader=3" in out
    rc, out, _ = run(capsys, "display", "report", str(report), "--json")
    assert json.loads(out)["fields"]["measurement"] == "22" * 48
    rc, out, _ = run(capsys, "display", str(report))  # recognised without the word "report"
    assert rc == 0 and "snp-report" in out


@pytest.mark.parametrize(("argv", "words"), [
    (["verify", "attestation", "{d}", "{d}/missing.bin"], "missing.bin"),
    (["verify", "attestation", "{d}", "{d}/ark.pem"], "format:"),
    (["verify", "certs", "{d}/nothing"], "not a directory"),
    (["verify", "attestation", "{d}", "{report}", "--measurement", "abc"], "not hex"),
    (["verify", "attestation", "{d}", "{report}", "--min-firmware", "one"], "MAJOR.MINOR"),
    (["verify", "attestation", "{d}", "{report}", "--at", "yesterday"], "ISO 8601"),
    (["fetch", "ca", "{d}", "--product", "Naples", "--url", "{url}"], "unknown SEV-SNP product"),
    (["fetch", "ca", "{d}", "--product", "Genoa", "--url", "{url}"], "answered 404: unknown product"),
    (["fetch", "ca", "{d}", "--product", "Milan", "--url", "http://127.0.0.1:1"], "cannot reach"),
    (["fetch", "vcek", "{d}", "{d}/ark.pem", "--url", "{url}"], "an SNP report is 0x4a0 bytes"),
    (["display", "report", "{d}/ark.pem"], "not an SEV-SNP attestation report"),
])
def test_bad_input_is_one_line(certs: tuple[Path, Path], kds_url: str, capsys: pytest.CaptureFixture[str],
                               argv: list[str], words: str) -> None:
    d, report = certs
    args = [a.format(d=d, report=report, url=kds_url) for a in argv]
    rc, out, err = run(capsys, *args)
    assert rc in (1, 2) and "Traceback" not in err + out
    text = err if rc == 2 else out
    assert words in text, (rc, out, err)
    if rc == 2:
        assert err.startswith("sevemu: error: ") and err.count("\n") == 1


def test_vcek_for_unknown_chip_is_404(kds_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "r.bin"
    report.write_bytes(make_report("milan", TCB, chip_id=b"\x07" * 64))
    err = fails(capsys, "fetch", "vcek", str(tmp_path), str(report), "--url", kds_url)
    assert "answered 404: no Milan chip" in err


def test_route_keeps_sevctl_verify() -> None:
    assert route(["verify", "certs", "d"]) == ["snp-verify", "certs", "d"]
    assert route(["-q", "verify", "attestation", "d", "r"]) == ["-q", "snp-verify", "attestation", "d", "r"]
    assert route(["verify", "certs"]) == ["verify", "certs"]  # a legacy chain directory named certs
    assert route(["verify", "certs/", "--emulated"]) == ["verify", "certs/", "--emulated"]
    assert route(["verify", "certs", "--emulated"]) == ["verify", "certs", "--emulated"]
    assert route(["verify", "--sev", "chain.cert"]) == ["verify", "--sev", "chain.cert"]
    assert route(["display", "report", "r.bin", "--json"]) == ["display", "r.bin", "--type", "snp-report", "--json"]
    assert route(["display", "report"]) == ["display", "report"]


def test_kds_serve_process(tmp_path: Path) -> None:
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.Popen([sys.executable, "-m", "sevemu", "kds", "serve", "--port", "0", "--product", "Milan"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "emulated AMD KDS on http://127.0.0.1:" in line, proc.stderr.read() if proc.stderr else ""
        url = line.split(" on ")[1].split()[0]
        r = requests.get(f"{url}/vcek/v1/Milan/cert_chain", timeout=30)
        assert r.status_code == 200 and r.text.count("BEGIN CERTIFICATE") == 2
    finally:
        proc.terminate()
        proc.wait(10)


def test_kds_serve_refuses_non_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert "loopback" in fails(capsys, "kds", "serve", "--host", "0.0.0.0", "--product", "Milan")


def test_bench_attest_small(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "bench", "attest", "--reports", "5", "--requests", "8", "--clients", "2", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["reports"] == 5 and result["verified_per_s"] > 0 and result["kds_requests"] == 8
    assert result["kds_requests_per_s"] > 0
    if result.get("omne_attest") is not None or "ratio" in result:
        assert result["omne_attest_verified_per_s"] > 0 and result["ratio"] > 0
