"""Debian's OVMF from the reset vector on the vCPU: `sevemu run --firmware` (cli/ovmf.py, docs/ovmf.md).

Skipped when /usr/share/ovmf/OVMF.fd is absent (Debian: apt-get install ovmf).  The fast tier boots
every mode into long mode with the launch checked against the owner's calculator; the slow tier
follows OVMF into PEI's permanent memory and looks at DRAM as the host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sevemu.cli.main import main
from sevemu.cli.ovmf import PEI_FV, OvmfBoot

OVMF = Path("/usr/share/ovmf/OVMF.fd")
pytestmark = pytest.mark.skipif(not OVMF.is_file(), reason="Debian's ovmf is not installed (/usr/share/ovmf/OVMF.fd)")


@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es", "snp"])
def test_every_mode_starts_at_the_reset_vector_and_reaches_long_mode(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", "--firmware", str(OVMF), "--mode", mode, "--until", "long mode", "--timeout", "60", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["status"] == "reached"
    events = [e["event"] for e in out["timeline"]]
    assert events[:2] == ["protected mode", "long mode"]
    if mode != "plain":
        assert out["launch"]["verified"] is True  # the firmware's digest equals the owner's calculator
    if mode in ("sev-es", "snp"):  # the reset vector's CPUID is a #VC (SNP: answered from the CPUID page)
        assert out["exits"].get("CPUID", 0) == 0
        assert out["vc_by_exit_code"].get("CPUID", 0) >= 1
        assert out["ghcb_calls"].get("MSR SEV_INFO_REQ", 0) + out["ghcb_calls"].get("MSR CPUID_REQ", 0) >= 1 \
            or mode == "snp"


def test_an_image_without_sev_metadata_is_refused_for_snp(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "code.fd"
    image.write_bytes(bytes(0x10000))
    assert main(["run", "--firmware", str(image), "--mode", "snp"]) == 2
    assert "no SEV metadata" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "sev"])
def test_ovmf_reaches_peis_switch_to_permanent_memory(mode: str) -> None:
    boot = OvmfBoot(OVMF, mode)
    try:
        r = boot.run(timeout=600)
    finally:
        boot.close()
    assert r.status == "reached", r.lines()
    names = [e.what for e in r.events]
    assert names == ["protected mode", "long mode", "end of SEC", "PEI in permanent memory"]
    assert r.milestone("end of SEC").exits < r.milestone("PEI in permanent memory").exits  # type: ignore[union-attr]
    assert r.devices.get("fw_cfg", 0) > 0 and r.devices.get("cmos", 0) > 0  # PlatformPei asked the devices
    assert r.rsp is not None and 0x1000000 <= r.rsp < boot.ram


@pytest.mark.slow
def test_sev_es_ovmf_reaches_pei_through_the_ghcb() -> None:
    boot = OvmfBoot(OVMF, "sev-es")
    try:
        r = boot.run(until="end of SEC", timeout=600)
    finally:
        boot.close()
    assert r.status == "reached", r.lines()
    assert r.exits.get("IOIO", 0) == 0 and r.exits.get("CPUID", 0) == 0  # only automatic exits reach the host
    assert r.vc.get("IOIO", 0) > 0 and r.ghcb.get("NAE IOIO", 0) == r.vc["IOIO"]


def _needles(plain: OvmfBoot, image: bytes, n: int = 8) -> list[bytes]:
    """32-byte pieces of the decompressed PEI volume that the (compressed) flash image does not hold."""
    out: list[bytes] = []
    fv = plain.launch.vm.host_read(PEI_FV[0], 0x20000)
    for off in range(0x1000, len(fv) - 32, 0x1000):
        piece = fv[off : off + 32]
        if len(set(piece)) > 12 and piece not in image:
            out.append(piece)
        if len(out) == n:
            break
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sev", "sev-es"])
def test_the_host_finds_the_decompressed_firmware_in_dram_only_without_sev(mode: str) -> None:
    image = OVMF.read_bytes()
    plain = OvmfBoot(image, "plain")
    try:
        assert plain.run(until="end of SEC", timeout=600).status == "reached"
        needles = _needles(plain, image)
        assert len(needles) == 8
        plain.machine.soc.wbinvd_all()
        dram = plain.machine.soc.dram
        assert all(dram.find(x) for x in needles)  # a plain guest's firmware is plaintext in DRAM
    finally:
        plain.close()
    guest = OvmfBoot(image, mode)
    try:
        assert guest.run(until="end of SEC", timeout=600).status == "reached"
        guest.machine.soc.wbinvd_all()  # whatever the caches hold goes to DRAM (encrypted with the guest's key)
        dram = guest.machine.soc.dram
        assert not any(dram.find(x) for x in needles)
        fv = guest.launch.vm.host_read(PEI_FV[0], 0x20000)  # the host's own read: ciphertext
        assert not any(x in fv for x in needles)
    finally:
        guest.close()
