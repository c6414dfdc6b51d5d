"""Debian 13's OVMF (edk2 2025.02, `sevemu ovmf fetch`) on the vCPU: the image Debian 12's cannot be --
an SNP guest that runs SEC and PEI into permanent memory (docs/ovmf.md).

The image comes from `sevemu ovmf fetch` (its cache, ``$SEVEMU_OVMF_DIR`` or ``~/.cache/sevemu/ovmf``)
or ``$SEVEMU_OVMF_TRIXIE``; every test skips with the reason when it is absent."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sevemu.abi.snp import OvmfSectionType
from sevemu.cli.ovmf import OvmfBoot
from sevemu.cli.ovmf_fetch import ovmf_cache_dir
from sevemu.hypervisor.ovmf import parse_ovmf

IMAGE = Path(os.environ.get("SEVEMU_OVMF_TRIXIE") or ovmf_cache_dir() / "trixie" / "OVMF.fd")
pytestmark = pytest.mark.skipif(not IMAGE.is_file(), reason=f"no Debian trixie OVMF at {IMAGE} (run `sevemu ovmf "
                                                             "fetch`, or set SEVEMU_OVMF_TRIXIE)")


def test_the_2025_image_is_one_4m_image_with_an_svsm_calling_area_section() -> None:
    img = parse_ovmf(IMAGE.read_bytes())
    assert len(img.data) == 4 << 20 and img.gpa == 0xFFC0_0000
    kinds = [s.type for s in img.sections]
    assert OvmfSectionType.SVSM_CAA in kinds and OvmfSectionType.CPUID in kinds


@pytest.mark.skipif(importlib.util.find_spec("sevsnpmeasure") is None, reason="sev-snp-measure is not installed")
def test_the_snp_launch_digest_equals_sev_snp_measure() -> None:
    """QEMU measures the SVSM calling-area section as a ZERO page (target/i386/sev.c); so do the VMM
    here and the owner's calculator, and so does sev-snp-measure."""
    boot = OvmfBoot(IMAGE, "snp")
    try:
        ours = boot.launch_info["launch_digest"]
        assert boot.launch_info["verified"], boot.launch_info
    finally:
        boot.close()
    out = subprocess.run([sys.executable, "-m", "sevsnpmeasure.cli", "--mode", "snp", "--vcpus", "1",
                          "--vcpu-type", "EPYC-Milan", "--ovmf", str(IMAGE), "--output-format", "hex"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ours


@pytest.mark.slow
def test_snp_ovmf_2025_reaches_peis_switch_to_permanent_memory() -> None:
    boot = OvmfBoot(IMAGE, "snp")
    try:
        r = boot.run(timeout=900)
    finally:
        boot.close()
    assert r.status == "reached", r.lines()
    assert r.launch["verified"]
    assert [e.what for e in r.events][:4] == ["protected mode", "long mode", "end of SEC", "PEI in permanent memory"]
    assert r.rsp is not None and 0x100_0000 <= r.rsp < boot.ram
    assert r.vc.get("PAGE_NOT_VALIDATED", 0) == 0  # PlatformPei validated RAM before using it (edk2 PR 6285)
    assert r.pvalidates > (boot.ram - 0x100_0000) // 0x1000  # it validated the system RAM
    assert r.devices.get("fw_cfg", 0) > 0 and r.devices.get("cmos", 0) > 0


@pytest.mark.slow
def test_the_host_finds_none_of_the_snp_guests_decompressed_firmware_in_dram() -> None:
    """The acceptance check of issue 13 with the image that boots as an SNP guest: 32-byte pieces of the
    PEI volume SEC decompressed (absent from the compressed flash) are in a plain run's DRAM and in
    none of an SNP run's, at PEI's switch to permanent memory (after WBINVD: all the caches hold)."""
    image = IMAGE.read_bytes()
    plain = OvmfBoot(image, "plain")
    try:
        assert plain.run(until="end of SEC", timeout=900).status == "reached"
        fv = plain.launch.vm.host_read(0x82_0000, 0x20000)
        needles = [fv[o : o + 32] for o in range(0x1000, len(fv) - 32, 0x1000)
                   if len(set(fv[o : o + 32])) > 12 and fv[o : o + 32] not in image][:8]
        assert len(needles) == 8
        plain.machine.soc.wbinvd_all()
        assert all(plain.machine.soc.dram.find(x) for x in needles)
    finally:
        plain.close()
    snp = OvmfBoot(image, "snp")
    try:
        assert snp.run(timeout=900).status == "reached"
        snp.machine.soc.wbinvd_all()
        assert not any(snp.machine.soc.dram.find(x) for x in needles)
    finally:
        snp.close()


@pytest.mark.slow
def test_snp_pvalidates_retired_in_c_leave_what_the_python_hook_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    """OVMF's 65,535 PVALIDATEs (SEC and PEI, paging on: the operand through the walker's 2 MiB regions)
    retired by the engine's C hook once armed, and all by the Python hook: the same RMP table in DRAM,
    epoch and per-ASID counts at PEI's switch, the same counts; the C hook took all but a few."""
    import hashlib

    from sevemu.hw.uc import accel
    from sevemu.hw.uc.engine import UcEngine

    if not accel.PV_ENABLED:
        pytest.skip("the C extension sevemu.hw.uc._uc_accel is not built with PvHook")
    python_hook = UcEngine._on_invalid

    def run(use_c: bool) -> tuple[object, ...]:
        calls = [0]

        def counted(self: UcEngine, h: object, user: object) -> bool:
            calls[0] += 1
            return python_hook(self, h, user)

        monkeypatch.setattr(UcEngine, "_on_invalid", counted)
        monkeypatch.setattr(accel, "PV_ENABLED", use_c)
        boot = OvmfBoot(IMAGE, "snp")
        try:
            r = boot.run(until="PEI in permanent memory", timeout=900)
            rmp = boot.machine.soc.rmp
            assert rmp is not None
            table = hashlib.sha256(boot.machine.soc.dram.read(rmp.base, rmp.end + 1 - rmp.base)).hexdigest()
            return r.status, r.pvalidates, table, rmp.epoch, rmp.asid_pages(boot.launch.vm.asid), calls[0]
        finally:
            boot.close()
            monkeypatch.undo()

    fast, slow = run(True), run(False)
    assert fast[0] == "reached" and fast[:5] == slow[:5]
    assert slow[5] >= slow[1] > 65_000 and fast[5] < slow[1] // 20
