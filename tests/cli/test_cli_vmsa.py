"""``sevemu vmsa build|show|update`` (sevctl's VMSA verbs), ``display`` of a VMSA, and the SEV-ES
options of ``measurement build|verify``: the vCPUs as QEMU's model or as sevctl's VMSA files, and
one-line errors for every wrong input (sizes, vCPU types, fields, ES policies without vCPUs)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from clikit import fails, run

from sevemu.abi.vmsa import VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.owner.measurement import expected_launch_digest, launch_measure_blob
from sevemu.owner.ovmf import OVMF_TABLE_FOOTER_GUID, SEV_ES_RESET_BLOCK_GUID
from sevemu.owner.vmsa import BSP_RESET_EIP, KvmVmType, build_vmsa, vcpu_signature, vmsa_pages

AP_EIP = 0x0080B004
SEVCTL_FMS = ["--family", "25", "--model", "1", "--stepping", "1"]
VERSIONS = ["--api-major", "1", "--api-minor", "51", "--build-id", "3"]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SEVEMU_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def ovmf(ap_eip: int | None = AP_EIP, size: int = 64 << 10) -> bytes:
    """An OVMF-shaped image: body, footer table (with an SEV-ES reset block unless ``ap_eip`` is None)."""
    table = b""
    if ap_eip is not None:
        block = ap_eip.to_bytes(4, "little")
        table = block + (len(block) + 18).to_bytes(2, "little") + SEV_ES_RESET_BLOCK_GUID.bytes_le
    tail = table + (len(table) + 18).to_bytes(2, "little") + OVMF_TABLE_FOOTER_GUID.bytes_le + bytes(32)
    return hashlib.shake_256(b"cli vmsa ovmf").digest(size - len(tail)) + tail


@pytest.fixture
def fw(home: Path) -> Path:
    path = home / "OVMF.fd"
    path.write_bytes(ovmf())
    return path


# ---- vmsa build ---------------------------------------------------------------------------------
def test_build_reproduces_sevctls_vmsa_files(capsys: pytest.CaptureFixture[str], vectors: Path, fw: Path) -> None:
    """sevctl vmsa build --userspace qemu --family 25 --model 1 --stepping 1 (a legacy KVM VM)."""
    launch = vectors / "sev-legacy-launch"
    rc, out, _ = run(capsys, "vmsa", "build", "v0.bin", "--cpu", "0", *SEVCTL_FMS, "--vm-type", "legacy",
                     "--userspace", "qemu")
    assert rc == 0 and "VMSA of vCPU 0 (reset EIP 0xfffffff0, CPUID signature 0x00a00f11" in out
    assert Path("v0.bin").read_bytes() == (launch / "sevctl_vmsa0.bin").read_bytes()
    assert run(capsys, "vmsa", "build", "v1.bin", "--cpu", "1", *SEVCTL_FMS, "--vm-type", "legacy",
               "--firmware", str(fw))[0] == 0
    assert Path("v1.bin").read_bytes() == (launch / "sevctl_vmsa1.bin").read_bytes()
    assert run(capsys, "vmsa", "build", "v1r.bin", "--cpu", "3", "--vcpu-type", "EPYC-Milan", "--vm-type", "legacy",
               "--reset-eip", hex(AP_EIP))[0] == 0
    assert Path("v1r.bin").read_bytes() == Path("v1.bin").read_bytes()


def test_build_defaults_to_the_init2_vm_type(capsys: pytest.CaptureFixture[str], fw: Path) -> None:
    rc, out, _ = run(capsys, "vmsa", "build", "v1.bin", "--cpu", "1", "--vcpu-type", "EPYC-Genoa", "--firmware",
                     str(fw), "--vmsa-features", "0x20", "--json")
    r = json.loads(out)
    assert rc == 0 and r["vm_type"] == "init2" and r["reset_eip"] == AP_EIP and r["vmsa_features"] == 0x20
    expected = build_vmsa(AP_EIP, cpu_signature=vcpu_signature("EPYC-Genoa"), sev_features=0x20)
    assert Path("v1.bin").read_bytes() == expected.encode()
    # the firmware is not needed by the BSP (sevctl accepts and ignores it)
    assert run(capsys, "vmsa", "build", "v0.bin", "--cpu", "0", "--vcpu-sig", "0xa10f10", "--firmware", str(fw))[0] == 0
    assert Path("v0.bin").read_bytes() == build_vmsa(BSP_RESET_EIP, cpu_signature=0xA10F10).encode()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpu", "0", "--vcpu-type", "EPYC-Bogus"], "unknown vCPU type 'EPYC-Bogus'; known: EPYC, EPYC-v1"),
        (["--cpu", "0", "--vcpu-type", "epyc-milan"], "unknown vCPU type 'epyc-milan'"),
        (["--cpu", "0"], "vmsa build needs the vCPU model: --vcpu-type T"),
        (["--cpu", "0", "--family", "25", "--model", "1"], "--family, --model and --stepping go together"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--vcpu-sig", "0x800f12"], "name the vCPU one way"),
        (["--cpu", "0", "--family", "25", "--model", "300", "--stepping", "0"], "out of range: 25/300/0"),
        (["--cpu", "1", "--vcpu-type", "EPYC"], "--cpu 1 is an application processor: give --firmware OVMF"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--reset-eip", "0x1000"], "--reset-eip is for an application"),
        (["--cpu", "1", "--vcpu-type", "EPYC", "--reset-eip", "0x100000000"], "--reset-eip: 0x100000000 does not fit"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--userspace", "krun"], "only QEMU's vCPU reset state is modelled"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--vm-type", "legacy", "--vmsa-features", "0x20"],
         "a legacy VM (KVM_SEV_ES_INIT) has no vmsa_features"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--vmsa-features", "0x1"], "accepts only DEBUG_SWAP (0x20)"),
        (["--cpu", "-1", "--vcpu-type", "EPYC"], "'-1' is not a vCPU index"),
        (["--cpu", "x", "--vcpu-type", "EPYC"], "'x' is not a vCPU index"),
        (["--cpu", "0", "--vcpu-type", "EPYC", "--vm-type", "es"], "invalid choice: 'es'"),
    ],
)
def test_build_bad_input(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert message in fails(capsys, "vmsa", "build", "out.bin", *argv)
    assert not Path("out.bin").exists()


def test_build_ap_needs_an_sev_es_ovmf(capsys: pytest.CaptureFixture[str], home: Path) -> None:
    (home / "plain.fd").write_bytes(ovmf(ap_eip=None))
    assert "plain.fd: OVMF image has no SEV-ES reset block" in fails(
        capsys, "vmsa", "build", "v1.bin", "--cpu", "1", "--vcpu-type", "EPYC", "--firmware", "plain.fd")
    assert "nope.fd: no such file" in fails(
        capsys, "vmsa", "build", "v1.bin", "--cpu", "1", "--vcpu-type", "EPYC", "--firmware", "nope.fd")


# ---- vmsa show / display ------------------------------------------------------------------------
def test_show_matches_sevctls_show(capsys: pytest.CaptureFixture[str], vectors: Path) -> None:
    launch = vectors / "sev-legacy-launch"
    for cpu in (0, 1):
        rc, out, _ = run(capsys, "vmsa", "show", str(launch / f"sevctl_vmsa{cpu}.bin"), "--json")
        ours: dict[str, Any] = json.loads(out)
        theirs: dict[str, Any] = json.loads((launch / f"sevctl_vmsa{cpu}-show.txt").read_text())
        common = set(ours) & set(theirs)
        assert rc == 0 and len(common) >= 50  # sevctl (2022) names some fields differently ...
        assert {k: ours[k] for k in common} == {k: theirs[k] for k in common}
        for k in set(theirs) - common:  # ... and those are zero in its files
            assert not any(theirs[k]) if isinstance(theirs[k], list) else theirs[k] == 0, k


def test_show_human_and_text_encodings(capsys: pytest.CaptureFixture[str]) -> None:
    page = build_vmsa(AP_EIP, cpu_signature=0xA00F11, sev_features=0x20).encode()
    Path("v.bin").write_bytes(page)
    Path("v.b64").write_text(base64.b64encode(page).decode() + "\n")
    rc, out, _ = run(capsys, "vmsa", "show", "v.bin")
    assert rc == 0
    assert "  cs                 selector 0xf000 attrib 0x009b limit 0xffff base 0x800000\n" in out
    assert "  rdx                0xa00f11\n" in out and "  sev_features       0x20 (DEBUG_SWAP)\n" in out
    assert "  mxcsr              0x1f80\n" in out and "rax" not in out and out.endswith("(all other fields 0)\n")
    assert run(capsys, "vmsa", "show", "v.b64")[1] == out.replace("v.bin", "v.b64")
    rc, out, _ = run(capsys, "display", "v.bin", "--json")
    r = json.loads(out)
    assert rc == 0 and r["type"] == "vmsa" and r["fields"]["rdx"] == "0xa00f11" and "rax" not in r["fields"]


def test_show_bad_files(capsys: pytest.CaptureFixture[str]) -> None:
    Path("short.bin").write_bytes(bytes(4095))
    Path("dirty.bin").write_bytes(bytes(0x700) + b"\x01" + bytes(VMSA_PAGE_SIZE - 0x701))
    assert "short.bin: expected 4096 bytes of a VMSA page (raw, hex or base64), got 4095 bytes" in fails(
        capsys, "vmsa", "show", "short.bin")
    assert "dirty.bin: not an SEV-ES VMSA page: SevEsSaveArea: reserved bytes" in fails(
        capsys, "vmsa", "show", "dirty.bin")
    assert "nope.bin: no such file" in fails(capsys, "vmsa", "show", "nope.bin")
    rc, out, _ = run(capsys, "vmsa", "show", "short.bin", "--json")
    assert rc == 2 and "expected 4096 bytes of a VMSA page" in json.loads(out)["error"]["message"]


# ---- vmsa update --------------------------------------------------------------------------------
def test_update_as_sevctl_and_by_field(capsys: pytest.CaptureFixture[str], fw: Path) -> None:
    Path("v.bin").write_bytes(build_vmsa(BSP_RESET_EIP, cpu_signature=0x800F12).encode())
    assert run(capsys, "vmsa", "update", "v.bin", "--vcpu-type", "EPYC-Milan")[0] == 0
    assert Path("v.bin").read_bytes() == build_vmsa(BSP_RESET_EIP, cpu_signature=0xA00F11).encode()
    assert run(capsys, "vmsa", "update", "v.bin", "--cpu", "1", "--firmware", str(fw))[0] == 0
    assert Path("v.bin").read_bytes() == build_vmsa(AP_EIP, cpu_signature=0xA00F11).encode()
    rc, out, _ = run(capsys, "vmsa", "update", "v.bin", "--set", "sev_features=0x20", "--set", "cs.base=0x10000",
                     "--set", "guest_intercept_vectors[2]=0x5", "--set", "fpreg_xmm=" + "ab" * 256, "--json")
    vmsa = SevEsSaveArea.decode(Path("v.bin").read_bytes())
    assert rc == 0 and json.loads(out)["fields"]["cs"]["base"] == 0x10000
    assert (vmsa.sev_features, vmsa.cs_base, vmsa.guest_intercept_vectors[2]) == (0x20, 0x10000, 5)
    assert vmsa.fpreg_xmm == b"\xab" * 256 and vmsa.rip == AP_EIP & 0xFFFF


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "bogus=1"], "the VMSA has no field 'bogus'"),
        (["--set", "cs.bogus=1"], "the VMSA has no field 'cs_bogus'; did you mean cs_selector, cs_attrib"),
        (["--set", "cs_limit=0x100000000"], "--set cs_limit: 0x100000000 does not fit 32 bits"),
        (["--set", "rdx"], "expected FIELD=VALUE"),
        (["--set", "rdx=abc"], "--set rdx: 'abc' is not a number"),
        (["--set", "guest_intercept_vectors=1"], "is an array; set one element, guest_intercept_vectors[0..7]=V"),
        (["--set", "guest_intercept_vectors[8]=1"], "guest_intercept_vectors[0..7]=V"),
        (["--set", "rdx[1]=1"], "rdx is not an array"),
        (["--set", "fpreg_xmm=abcd"], "fpreg_xmm takes 256 bytes in hex, got 2"),
        (["--set", "fpreg_xmm=zz"], "fpreg_xmm takes 256 bytes in hex"),
        ([], "nothing to update"),
        (["--cpu", "1"], "--cpu 1 is an application processor"),
        (["--firmware", "OVMF.fd"], "--firmware and --reset-eip need --cpu N"),
        (["--vcpu-type", "EPYC-Nope"], "unknown vCPU type 'EPYC-Nope'"),
        (["--set", "rdx=1", "--set", "cs_limit=0x100000000"], "does not fit 32 bits"),
    ],
)
def test_update_bad_input_changes_nothing(capsys: pytest.CaptureFixture[str], fw: Path, argv: list[str],
                                          message: str) -> None:
    page = build_vmsa(BSP_RESET_EIP, cpu_signature=0x800F12).encode()
    Path("v.bin").write_bytes(page)
    assert message in fails(capsys, "vmsa", "update", "v.bin", *argv)
    assert Path("v.bin").read_bytes() == page


def test_update_refuses_a_file_that_is_no_vmsa(capsys: pytest.CaptureFixture[str]) -> None:
    Path("v.bin").write_bytes(bytes(100))
    assert "v.bin: expected 4096 bytes of a VMSA page" in fails(capsys, "vmsa", "update", "v.bin", "--set", "rdx=1")
    assert Path("v.bin").read_bytes() == bytes(100)


# ---- measurement build|verify with SEV-ES ------------------------------------------------------------
def es_digest(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, out, err = run(capsys, "measurement", "build", *VERSIONS, "--policy", "0x5", *argv, "--json")
    assert rc == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_measurement_from_the_vcpu_model(capsys: pytest.CaptureFixture[str], fw: Path) -> None:
    image = fw.read_bytes()
    sig = vcpu_signature("EPYC-Rome")
    for n in (1, 3, 8):
        r = es_digest(capsys, "--firmware", "OVMF.fd", "--num-cpus", str(n), "--vcpu-type", "EPYC-Rome")
        assert r["launch_digest"] == expected_launch_digest([image], vmsa_pages(n, AP_EIP, cpu_signature=sig)).hex()
        assert r["sev_es"] == {"num_cpus": n, "vcpu_type": "EPYC-Rome", "cpu_signature": sig, "vm_type": "init2",
                               "vmsa_features": 0}
    legacy = es_digest(capsys, "--firmware", "OVMF.fd", "--num-cpus", "2", "--vcpu-sig", hex(sig), "--vm-type",
                       "legacy")["launch_digest"]
    pages = vmsa_pages(2, AP_EIP, cpu_signature=sig, vm_type=KvmVmType.DEFAULT_VM)
    assert legacy == expected_launch_digest([image], pages).hex()
    # the same vCPUs as VMSA files (sevemu vmsa build, sevctl's way): the same digest
    assert run(capsys, "vmsa", "build", "v0.bin", "--cpu", "0", "--vcpu-type", "EPYC-Rome")[0] == 0
    assert run(capsys, "vmsa", "build", "v1.bin", "--cpu", "1", "--vcpu-type", "EPYC-Rome", "--firmware", "OVMF.fd")[0] == 0
    files = es_digest(capsys, "--firmware", "OVMF.fd", "--num-cpus", "8", "--vmsa-cpu0", "v0.bin", "--vmsa-cpu1", "v1.bin")
    model = es_digest(capsys, "--firmware", "OVMF.fd", "--num-cpus", "8", "--vcpu-type", "EPYC-Rome")
    assert files["launch_digest"] == model["launch_digest"]
    assert files["sev_es"] == {"num_cpus": 8, "vmsa_files": ["v0.bin", "v1.bin"]}
    one = es_digest(capsys, "--firmware", "OVMF.fd", "--num-cpus", "1", "--vmsa-cpu0", "v0.bin")
    assert one["launch_digest"] == expected_launch_digest([image], [Path("v0.bin").read_bytes()]).hex()


def test_measurement_verify_with_es(capsys: pytest.CaptureFixture[str], fw: Path) -> None:
    tik, mnonce = bytes(range(16)), bytes(range(16, 32))
    Path("tik.bin").write_bytes(tik)
    pages = vmsa_pages(4, AP_EIP, cpu_signature=vcpu_signature("EPYC-Milan"))
    ld = expected_launch_digest([fw.read_bytes()], pages)
    blob = launch_measure_blob(tik, api_major=1, api_minor=51, build=3, policy=5, launch_digest=ld, mnonce=mnonce)
    Path("m.bin").write_bytes(blob)
    base = ["measurement", "verify", *VERSIONS, "--policy", "0x5", "--firmware", "OVMF.fd", "--tik", "tik.bin",
            "--launch-measure-blob", "m.bin", "--num-cpus", "4"]
    rc, out, _ = run(capsys, *base, "--vcpu-type", "EPYC-Milan")
    assert rc == 0 and out.startswith(f"measurement OK: launch digest {ld.hex()}")
    for wrong in (["--vcpu-type", "EPYC-Genoa"], ["--vcpu-type", "EPYC-Milan", "--vm-type", "legacy"]):
        assert run(capsys, *base, *wrong)[0] == 1
    rc, out, _ = run(capsys, *base[:-1], "3", "--vcpu-type", "EPYC-Milan")
    assert rc == 1 and "does NOT match" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the policy 0x5 requires SEV-ES (0x4), whose launch digest covers every vCPU's VMSA: give the vCPUs"),
        (["--vcpu-type", "EPYC-Milan"], "requires SEV-ES (0x4)"),
        (["--num-cpus", "2"], "--num-cpus 2: give the vCPUs: --num-cpus N --vcpu-type T"),
        (["--num-cpus", "2", "--vcpu-type", "EPYC-Bogus"], "unknown vCPU type 'EPYC-Bogus'"),
        (["--num-cpus", "2", "--vmsa-cpu0", "v.bin"], "--num-cpus 2 needs --vmsa-cpu0 and --vmsa-cpu1"),
        (["--num-cpus", "1", "--vmsa-cpu1", "v.bin"], "--num-cpus 1 needs --vmsa-cpu0"),
        (["--num-cpus", "2", "--vmsa-cpu0", "v.bin", "--vmsa-cpu1", "v.bin", "--vcpu-type", "EPYC"],
         "give --vmsa-cpu0/--vmsa-cpu1 or the vCPU model options, not both"),
        (["--num-cpus", "2", "--vmsa-cpu0", "v.bin", "--vmsa-cpu1", "v.bin", "--vm-type", "legacy"], "not both"),
        (["--num-cpus", "2", "--vmsa-cpu0", "short.bin", "--vmsa-cpu1", "v.bin"],
         "short.bin: expected 4096 bytes (a VMSA page), got 100"),
        (["--num-cpus", "0", "--vcpu-type", "EPYC"], "'0' is not a number of vCPUs (1..4096)"),
        (["--num-cpus", "4097", "--vcpu-type", "EPYC"], "'4097' is not a number of vCPUs"),
        (["--num-cpus", "2", "--vcpu-type", "EPYC", "--vmsa-features", "0x4"], "accepts only DEBUG_SWAP"),
    ],
)
def test_measurement_es_bad_input(capsys: pytest.CaptureFixture[str], fw: Path, argv: list[str], message: str) -> None:
    Path("v.bin").write_bytes(bytes(VMSA_PAGE_SIZE))
    Path("short.bin").write_bytes(bytes(100))
    err = fails(capsys, "measurement", "build", *VERSIONS, "--policy", "0x5", "--firmware", "OVMF.fd", *argv)
    assert message in err


def test_measurement_es_options_and_other_policies(capsys: pytest.CaptureFixture[str], home: Path, fw: Path) -> None:
    assert "--vcpu-type describe an SEV-ES launch; the policy has no ES bit (0x4)" in fails(
        capsys, "measurement", "build", *VERSIONS, "--policy", "0x1", "--firmware", "OVMF.fd", "--vcpu-type", "EPYC")
    digest = base64.b64encode(bytes(32)).decode()
    # a given launch digest covers the VMSAs already: no vCPUs needed, none accepted
    assert es_digest(capsys, "--launch-digest", digest)["launch_digest"] == "00" * 32
    assert "--num-cpus/--vcpu-type: --launch-digest already covers the VMSAs" in fails(
        capsys, "measurement", "build", *VERSIONS, "--policy", "0x5", "--launch-digest", digest, "--num-cpus", "2",
        "--vcpu-type", "EPYC")
    (home / "plain.fd").write_bytes(ovmf(ap_eip=None))
    assert "plain.fd: OVMF image has no SEV-ES reset block; an SEV-ES guest needs OVMF" in fails(
        capsys, "measurement", "build", *VERSIONS, "--policy", "0x5", "--firmware", "plain.fd", "--num-cpus", "2",
        "--vcpu-type", "EPYC")
    rc, out, _ = run(capsys, "measurement", "build", *VERSIONS, "--policy", "0x5", "--firmware", "OVMF.fd", "--json")
    assert rc == 2 and json.loads(out)["error"]["message"].startswith("the policy 0x5 requires SEV-ES")
