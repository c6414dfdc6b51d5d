"""Debian's OVMF from the reset vector on the vCPU: `sevemu run --firmware` (cli/ovmf.py, docs/ovmf.md).

Skipped when /usr/share/ovmf/OVMF.fd is absent (Debian: apt-get install ovmf).  The fast tier boots
every mode into long mode with the launch checked against the owner's calculator; the slow tier
follows OVMF into PEI's permanent memory and looks at DRAM as the host."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from sevemu.cli.main import main
from sevemu.cli.ovmf import PEI_FV, OvmfBoot, _psc_pages
from sevemu.errors import UnmappedError
from sevemu.hypervisor.vm import VmState

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


def test_snp_sec_keeps_its_ghcb_pointer_across_its_first_page_state_change() -> None:
    """SEC's pre-validation loop: a GHCB page-state change (VMGEXIT), a WBINVD, PVALIDATE of each
    page with the GHCB pointer held in R15.  The WBINVD used to drop the VMSA the unit held while the
    guest ran, and the registers of the next #VMEXIT with it: R15 came back stale (0x600) and SEC
    read GHCB fields at GPA 0x3A0, took #VC 0x404 and asked to be terminated."""
    boot = OvmfBoot(OVMF, "snp")
    try:
        hv, vm, eng = boot.machine.hv, boot.launch.vm, boot.engines[0]
        deadline = time.monotonic() + 120
        while eng.stats.pvalidates < 253 and vm.state is not VmState.CRASHED and time.monotonic() < deadline:
            hv.run(vm, 0, max_exits=1)
        assert vm.state is not VmState.CRASHED, vm.crash_reason
        assert eng.stats.pvalidates >= 253 and boot.psc["NAE requests"] >= 1
        assert eng.stats.vc_by_code.get(0x404, 0) == 0
    finally:
        boot.close()


def test_the_timeline_counts_a_2m_page_state_entry_as_512_pages() -> None:
    entry_4k, entry_2m = 0x820 << 12, (1 << 56) | (0xA00 << 12)
    desc = struct.pack("<HHIQQQ", 1, 2, 0, entry_4k, entry_2m, entry_4k)  # entries 1..2 still to do
    assert _psc_pages(desc.ljust(2032, b"\0")) == 513


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "sev", "sev-es"])
def test_ovmf_reaches_peis_switch_to_permanent_memory(mode: str) -> None:
    boot = OvmfBoot(OVMF, mode)
    try:
        r = boot.run(timeout=600)
    finally:
        boot.close()
    assert r.status == "reached", r.lines()
    names = [e.what for e in r.events]
    assert names[:4] == ["protected mode", "long mode", "end of SEC", "PEI in permanent memory"]
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


@pytest.mark.slow
def test_snp_ovmf_runs_sec_and_pei_until_platformpei_writes_memory_it_never_validated() -> None:
    """Debian's 2022.11 PlatformPei copies the variable store into permanent PEI memory (the top of
    RAM) before AmdSevSnpInitialize validates the system RAM -- an OVMF bug, fixed upstream by moving
    ReserveEmuVariableNvStore after the SNP initialization (edk2 pull request 6285).  On hardware the
    write is #VC 0x404, and OVMF's handler asks to be terminated; so it is here, after all of SEC."""
    boot = OvmfBoot(OVMF, "snp")
    try:
        r = boot.run(timeout=600)
    finally:
        boot.close()
    assert r.status == "crashed" and "0x404" in r.reason, r.lines()
    assert [e.what for e in r.events] == ["protected mode", "long mode", "end of SEC"]
    assert r.vc.get("PAGE_NOT_VALIDATED") == 1 and r.ghcb.get("NAE UNSUPPORTED_EVENT") == 1
    # SEC validated its range (0x820000 up to the end of the decompression scratch area) 4 KiB at a time
    assert r.pvalidates > (0x170_0000 - 0x82_0000) // 0x1000 and r.psc["pages"] > 0xE00
    assert r.devices.get("fw_cfg", 0) > 0 and r.devices.get("cmos", 0) > 0  # PlatformPei ran


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
@pytest.mark.parametrize("mode", ["sev", "sev-es", "snp"])
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
        if mode == "snp":  # private memory is guest_memfd's: the host has no mapping to read at all
            with pytest.raises(UnmappedError):
                guest.launch.vm.host_read(PEI_FV[0], 0x20000)
        else:
            fv = guest.launch.vm.host_read(PEI_FV[0], 0x20000)  # the host's own read: ciphertext
            assert not any(x in fv for x in needles)
    finally:
        guest.close()
