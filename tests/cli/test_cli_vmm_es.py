"""``sevemu vmm -cpu MODEL -smp N`` and SEV-ES guests (policy ES bit): the launch digest the
firmware measures equals the owner's calculator and ``sev-snp-measure --mode seves`` for the same
inputs; bad values are one-line errors."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

import pytest

from sevemu.crypto.transport import MeasureMacError
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.measurement import expected_launch_digest, padded_image, verify_measurement
from tests.cli.clikit import fails, run

OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
needs_ovmf = pytest.mark.skipif(not OVMF.is_file(), reason=f"{OVMF} is not installed (Debian: apt-get install ovmf)")
SECRET_GPA = "0x800000"  # Debian's OVMF_CODE_4M has an empty SEV secret block


def launch(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str, image: Path = OVMF) -> dict[str, object]:
    rc, out, err = run(capsys, "vmm", "--platform-dir", str(tmp_path / "plat"), "--firmware", str(image),
                       "--secret-gpa", SECRET_GPA, "--json", *extra)
    assert rc == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def owner_digest(image: bytes, vcpus: int, model: str, vm_type: owner_vmsa.KvmVmType) -> bytes:
    pages = owner_vmsa.ovmf_vmsa_pages(image, vcpus, cpu_signature=owner_vmsa.vcpu_signature(model), vm_type=vm_type)
    return expected_launch_digest([image], pages)


def check_measure(result: dict[str, object], policy: int, digest: bytes) -> None:
    """The MEASURE is the HMAC of ``digest`` (no owner session: the closed channel's all-zero TIK)."""
    blob = base64.b64decode(str(result["measurement_b64"]))
    verify_measurement(blob, bytes(16), 1, 51, 3, policy, digest)


@needs_ovmf
@pytest.mark.parametrize(("vcpus", "model"), [(1, "EPYC"), (4, "EPYC-Milan"), (2, "EPYC-Genoa")])
def test_an_sev_es_launch_measures_what_the_owner_and_the_tool_compute(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, vcpus: int, model: str) -> None:
    result = launch(capsys, tmp_path, "--policy", "0x5", "-smp", str(vcpus), "-cpu", model)
    image = padded_image(OVMF.read_bytes())
    digest = owner_digest(image, vcpus, model, owner_vmsa.KvmVmType.SEV_ES_VM)
    check_measure(result, 0x5, digest)
    texts = [str(s["text"]) for s in result["steps"]]  # type: ignore[attr-defined]
    assert any("KVM_SEV_INIT2" in t for t in texts) and any(f"{vcpus} VMSA(s)" in t for t in texts)
    if importlib.util.find_spec("sevsnpmeasure") is not None:
        from sevsnpmeasure.guest import seves_calc_launch_digest  # type: ignore[import-untyped]
        from sevsnpmeasure.vcpu_types import CPU_SIGS  # type: ignore[import-untyped]

        assert bytes(seves_calc_launch_digest(vcpus, int(CPU_SIGS[model]), str(OVMF), None, None, None)) == digest


@needs_ovmf
def test_the_legacy_vm_type_measures_the_vmsa_without_fpu_state(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = launch(capsys, tmp_path, "--policy", "0x5", "-smp", "2", "-cpu", "EPYC-Rome", "--legacy-vm-type")
    image = padded_image(OVMF.read_bytes())
    check_measure(result, 0x5, owner_digest(image, 2, "EPYC-Rome", owner_vmsa.KvmVmType.DEFAULT_VM))
    with pytest.raises(MeasureMacError):  # not the digest of a KVM_SEV_INIT2 VM
        check_measure(result, 0x5, owner_digest(image, 2, "EPYC-Rome", owner_vmsa.KvmVmType.SEV_ES_VM))
    assert any("KVM_SEV_ES_INIT" in str(s["text"]) for s in result["steps"])  # type: ignore[attr-defined]


def test_an_sev_guest_with_several_vcpus_measures_no_vmsa_and_runs(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(b"firmware of an SEV guest".ljust(4096, b"\0"))
    result = launch(capsys, tmp_path, "--policy", "0x1", "-smp", "3", "-cpu", "EPYC-v4", image=fw)
    from sevemu.cli.vmm import GUEST_PROGRAM_TABLE

    check_measure(result, 0x1, expected_launch_digest([fw.read_bytes(), GUEST_PROGRAM_TABLE]))
    assert result["ok"] is True
    assert any("3 vCPU(s) of model EPYC-v4" in str(s["text"]) for s in result["steps"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("args", "message"), [
    (("-cpu", "EPYC-Zen9"), "-cpu 'EPYC-Zen9': unknown vCPU model"),
    (("-smp", "0"), "-smp 0: the number of vCPUs must be 1..64"),
    (("-smp", "65"), "-smp 65: the number of vCPUs must be 1..64"),
    (("-smp", "two"), "-smp 'two': not a number of vCPUs"),
    (("--legacy-vm-type",), "--legacy-vm-type chooses how an SEV-ES guest is made"),
    (("--policy", "0x5", "-smp", "2"), "the image has no SEV-ES reset block"),
])
def test_bad_vcpu_options_are_one_line_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              args: tuple[str, ...], message: str) -> None:
    fw = tmp_path / "fw.bin"
    fw.write_bytes(bytes(4096))
    err = fails(capsys, "vmm", "--platform-dir", str(tmp_path / "plat"), "--firmware", str(fw), *args)
    assert message in err
    assert not (tmp_path / "plat").exists()  # refused before anything ran
