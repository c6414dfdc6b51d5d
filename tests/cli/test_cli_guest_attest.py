"""``sevemu report`` / ``key`` / ``certificates`` on an emulated SNP guest: the report verifies with
``sevemu verify attestation`` against the certificates of an extended report, keys are stable per
chip and selected fields, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from clikit import fails, run


@pytest.fixture
def plat(tmp_path: Path) -> list[str]:
    return ["--platform-dir", str(tmp_path / "milan"), "--generation", "milan"]


def test_report_then_verify(tmp_path: Path, plat: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rep, req, certs = tmp_path / "report.bin", tmp_path / "req.bin", tmp_path / "certs"
    rc, out, err = run(capsys, "report", str(rep), str(req), "--random", "--extended", str(certs), *plat)
    assert rc == 0, err
    measurement = out.split("measurement ")[1].split()[0]
    assert len(rep.read_bytes()) == 0x4A0 and len(req.read_bytes()) == 64
    assert sorted(p.name for p in certs.iterdir()) == ["ark.pem", "ask.pem", "vcek.pem"]
    rc, out, err = run(capsys, "verify", "attestation", str(certs), str(rep), "--trust-ark", str(certs / "ark.pem"),
                       "--measurement", measurement, "--report-data", req.read_bytes().hex())
    assert rc == 0, out + err
    rc, out, err = run(capsys, "verify", "attestation", str(certs), str(rep), "--trust-ark", str(certs / "ark.pem"),
                       "--measurement", "00" * 48)
    assert rc != 0 and "measurement" in out + err
    # a report of another run (same chip, same REPORT_DATA file) verifies with the same certificates
    rc, _, err = run(capsys, "report", str(tmp_path / "r2.bin"), str(req), *plat)
    assert rc == 0, err
    rc, out, err = run(capsys, "verify", "attestation", str(certs), str(tmp_path / "r2.bin"), "--trust-ark",
                       str(certs / "ark.pem"), "--report-data", req.read_bytes().hex())
    assert rc == 0, out + err


def test_certificates_and_keys(tmp_path: Path, plat: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "certificates", "der", str(tmp_path / "c"), *plat)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ark.der", "ask.der", "vcek.der"]
    keys = []
    for name, extra in (("a", []), ("b", []), ("k3", ["--guest-field-select", "8"]), ("k4", ["--vmpl", "1"])):
        rc, _, err = run(capsys, "key", str(tmp_path / name), "vcek", *extra, *plat)
        assert rc == 0, err
        keys.append((tmp_path / name).read_bytes())
    assert len(keys[0]) == 32 and keys[0] == keys[1] and len(set(keys)) == 3
    assert (tmp_path / "a").stat().st_mode & 0o077 == 0


def test_bad_input(tmp_path: Path, plat: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 10)
    assert "64 bytes" in fails(capsys, "report", str(tmp_path / "r.bin"), str(short), *plat)
    assert "no such file" in fails(capsys, "report", str(tmp_path / "r.bin"), str(tmp_path / "none"), *plat)
    assert "no SEV-SNP" in fails(capsys, "key", str(tmp_path / "k"), "vcek", "--generation", "rome",
                                 "--platform-dir", str(tmp_path / "rome"))
    assert "status 0x16" in fails(capsys, "key", str(tmp_path / "k"), "vcek", "--guest-svn", "5", *plat)
    assert "status 0x16" in fails(capsys, "report", str(tmp_path / "r.bin"), str(tmp_path / "q"), "--random",
                                  "--vmpl", "1", "--vmpck", "2", *plat)
    assert not (tmp_path / "r.bin").exists() and not (tmp_path / "k").exists()


def test_vlek_flow(tmp_path: Path, plat: list[str], capsys: pytest.CaptureFixture[str], snp_root) -> None:  # type: ignore[no-untyped-def]
    """fetch hashstick -> vlek-load / report --vlek -> fetch ca/vlek -> verify attestation --signing-key vlek."""
    import threading

    from sevemu.amd.kds import KeyDistributionService, create_app, loopback_server
    from sevemu.scenario import amd_registry

    registry = amd_registry()
    registry.csp("acme-cli", create=True)
    server = loopback_server(create_app(KeyDistributionService({"milan": snp_root("milan")}, registry)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    certs, req = tmp_path / "certs", tmp_path / "req.bin"
    try:
        rc, out, err = run(capsys, "report", str(tmp_path / "r0.bin"), str(req), "--random", *plat)
        assert rc == 0 and "signed by the VCEK" in out, err
        rc, _, err = run(capsys, "fetch", "hashstick", str(certs), str(tmp_path / "r0.bin"), "--csp", "acme-cli",
                         "--url", url)
        assert rc == 0, err
        stick = certs / "vlek_hashstick.bin"
        assert len(stick.read_bytes()) == 432
        rc, out, err = run(capsys, "vlek-load", str(stick), *plat)
        assert rc == 0 and "VLEK loaded" in out, err
        rc, out, err = run(capsys, "report", str(tmp_path / "r.bin"), str(req), "--vlek", str(stick), *plat)
        assert rc == 0 and "signed by the VLEK" in out, err
        for args in (("ca", str(certs), "--product", "Milan", "--endorser", "vlek"),
                     ("vlek", str(certs), str(tmp_path / "r.bin"), "--csp", "acme-cli"),
                     ("crl", str(certs), "--product", "Milan", "--endorser", "vlek")):
            rc, _, err = run(capsys, "fetch", *args, "--url", url)
            assert rc == 0, err
        rc, out, err = run(capsys, "verify", "attestation", str(certs), str(tmp_path / "r.bin"), "--trust-ark",
                           str(certs / "ark.pem"), "--signing-key", "vlek", "--report-data", req.read_bytes().hex())
        assert rc == 0, out + err
        # an extended report of a VLEK-signing host: the table a CSP installs (VLEK, ASVK, ARK), which
        # verifies the report; without the VLEK's certificate, or with another key's, one line
        ext = tmp_path / "ext"
        rc, out, err = run(capsys, "report", str(tmp_path / "r3.bin"), str(req), "--vlek", str(stick), "--extended",
                           str(ext), "--vlek-cert", str(certs / "vlek.pem"), *plat)
        assert rc == 0 and "signed by the VLEK" in out, err
        assert sorted(p.name for p in ext.iterdir()) == ["ark.pem", "asvk.pem", "vlek.pem"]
        assert (ext / "vlek.pem").read_bytes() == (certs / "vlek.pem").read_bytes()
        rc, out, err = run(capsys, "verify", "attestation", str(ext), str(tmp_path / "r3.bin"), "--trust-ark",
                           str(certs / "ark.pem"), "--signing-key", "vlek", "--report-data", req.read_bytes().hex())
        assert rc == 0, out + err
        assert "--vlek-cert" in fails(capsys, "report", str(tmp_path / "r4.bin"), str(req), "--vlek", str(stick),
                                      "--extended", str(tmp_path / "ext4"), *plat)
        assert "not the loaded VLEK's" in fails(capsys, "report", str(tmp_path / "r5.bin"), str(req), "--vlek",
                                                str(stick), "--extended", str(tmp_path / "ext5"), "--vlek-cert",
                                                str(certs / "asvk.pem"), *plat)
        assert "--vlek FILE too" in fails(capsys, "report", str(tmp_path / "r6.bin"), str(req), "--vlek-cert",
                                          str(certs / "vlek.pem"), *plat)
        assert not any((tmp_path / n).exists() for n in ("r4.bin", "r5.bin", "r6.bin", "ext4", "ext5"))
        # a hashstick altered by the host: the firmware's BAD_MEASUREMENT, one line
        bad = bytearray(stick.read_bytes())
        bad[0x20] ^= 1
        (tmp_path / "bad.bin").write_bytes(bytes(bad))
        assert "BAD_MEASUREMENT" in fails(capsys, "vlek-load", str(tmp_path / "bad.bin"), *plat)
        assert "432 bytes" in fails(capsys, "vlek-load", str(req), *plat)
    finally:
        server.shutdown()
        thread.join(5)
