"""``sevemu measure`` and ``sevemu idblock`` against the reference tools (sev-snp-measure,
snp-create-id-block, run as programs), ``--explain``, and an ID block the firmware accepts at
SNP_LAUNCH_FINISH whichever tool made it."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clikit import fails, run
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

OVMF = Path("/usr/share/ovmf/OVMF.fd")
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")

pytestmark = pytest.mark.skipif(shutil.which("sev-snp-measure") is None, reason="sev-snp-measure is not installed")


def _tool(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "sevsnpmeasure.cli", *argv], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.parametrize("image", [OVMF, CODE], ids=lambda p: p.name)
@pytest.mark.parametrize("argv", [
    ("--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC-Milan"),
    ("--mode", "snp", "--vcpus", "3", "--vcpu-sig", "0xa00f11", "--guest-features", "0x21"),
    ("--mode", "snp", "--vcpus", "2", "--vcpu-family", "23", "--vcpu-model", "49", "--vcpu-stepping", "0",
     "--output-format", "base64"),
    ("--mode", "snp:ovmf-hash"),
    ("--mode", "seves", "--vcpus", "2", "--vcpu-type", "EPYC-v4"),
    ("--mode", "sev"),
])
def test_measure_equals_sev_snp_measure(capsys: pytest.CaptureFixture[str], image: Path, argv: tuple[str, ...]) -> None:
    if not image.is_file():
        pytest.skip(f"{image} is not installed (Debian: apt-get install ovmf)")
    rc, out, _ = run(capsys, "measure", *argv, "--ovmf", str(image))
    assert rc == 0
    assert out.strip() == _tool(*argv, "--ovmf", str(image))


def test_measure_from_an_ovmf_hash_and_explain(capsys: pytest.CaptureFixture[str]) -> None:
    if not OVMF.is_file():
        pytest.skip(f"{OVMF} is not installed")
    rc, seed, _ = run(capsys, "measure", "--mode", "snp:ovmf-hash", "--ovmf", str(OVMF))
    argv = ("--mode", "snp", "--vcpus", "2", "--vcpu-type", "EPYC-Rome", "--ovmf", str(OVMF))
    rc, out, _ = run(capsys, "measure", *argv, "--snp-ovmf-hash", seed.strip())
    assert rc == 0 and out.strip() == _tool(*argv)
    _rc, out, _ = run(capsys, "measure", *argv, "--explain")
    lines = out.strip().splitlines()
    assert lines[-1] == _tool(*argv)
    assert lines[-2].split()[-1] == lines[-1]  # the last PAGE_INFO's digest is the launch digest
    kinds = [ln.split()[1] for ln in lines[1:-1]]
    assert kinds[0] == "NORMAL" and kinds[-2:] == ["VMSA", "VMSA"] and {"ZERO", "SECRETS", "CPUID"} <= set(kinds)


def test_measure_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if not OVMF.is_file():
        pytest.skip(f"{OVMF} is not installed")
    fails(capsys, "measure", "--mode", "snp", "--ovmf", str(OVMF), "--vcpu-type", "EPYC")  # no --vcpus
    fails(capsys, "measure", "--mode", "snp", "--vcpus", "1", "--ovmf", str(OVMF))  # no vCPU model
    fails(capsys, "measure", "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC", "--ovmf", str(tmp_path / "none"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel")
    err = fails(capsys, "measure", "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC", "--ovmf", str(OVMF),
                "--kernel", str(kernel))
    assert "SNP_KERNEL_HASHES" in err
    fails(capsys, "measure", "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC", "--ovmf", str(OVMF),
          "--vmm-type", "azure")  # not a VMM sev-snp-measure knows


def _pem(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def test_idblock_equals_snp_create_id_block(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _pem(tmp_path / "id.pem")
    _pem(tmp_path / "author.pem")
    ld = base64.b64encode(bytes(range(48))).decode()
    r = subprocess.run([sys.executable, "-c", "from sevsnpmeasure.id_block import main; main()", "--measurement", ld,
                        "--idkey", str(tmp_path / "id.pem"), "--authorkey", str(tmp_path / "author.pem")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    theirs = r.stdout.strip().splitlines()
    _rc, out, _ = run(capsys, "idblock", "--measurement", ld, "--idkey", str(tmp_path / "id.pem"),
                     "--authorkey", str(tmp_path / "author.pem"))
    ours = out.strip().splitlines()
    assert ours[0].split(",")[0] == theirs[0].split(",")[0]  # the ID block itself
    assert ours[1:] == theirs[1:]  # the key digests (the signatures differ: ECDSA is randomised)
    their_auth = base64.b64decode(theirs[0].split("id-auth=")[1])
    our_auth = base64.b64decode(ours[0].split("id-auth=")[1])
    assert their_auth[:0x40] == our_auth[:0x40] and their_auth[0x240:0x644] == our_auth[0x240:0x644]
    assert their_auth[0x880:] == our_auth[0x880:]
    fails(capsys, "idblock", "--measurement", "not base64!", "--idkey", str(tmp_path / "id.pem"))
    fails(capsys, "idblock", "--measurement-hex", "00" * 47, "--idkey", str(tmp_path / "id.pem"))
    (tmp_path / "bad.pem").write_text("nope")
    fails(capsys, "idblock", "--measurement-hex", "00" * 48, "--idkey", str(tmp_path / "bad.pem"))


def test_both_tools_id_blocks_pass_the_firmware(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "firmware"))
    from fwkit import call
    from snpkit import GCTX, PAGE, SCRATCH, SnpLaunch, snp_machine

    from sevemu.abi.commands import CommandId
    from sevemu.abi.snp import SnpLaunchFinishCmd, SnpLaunchFinishFlags, SnpPageType
    from sevemu.abi.status import Status
    from sevemu.firmware.snp import snp_state
    from sevemu.owner.idblock import make_id_block

    id_key, author = _pem(tmp_path / "id.pem"), _pem(tmp_path / "author.pem")
    for maker in ("sevemu", "snp-create-id-block"):
        m = snp_machine(seed=f"idblock-{maker}")
        lau = SnpLaunch(m)
        assert lau.start() == Status.SUCCESS
        lau.update(0, SnpPageType.NORMAL, b"guest")
        ld = snp_state(m.firmware).guests[GCTX].ld
        if maker == "sevemu":
            b = make_id_block(ld, id_key, author)
            block, auth = b.id_block, b.id_auth
        else:
            r = subprocess.run([sys.executable, "-c", "from sevsnpmeasure.id_block import main; main()",
                                "--measurement", base64.b64encode(ld).decode(), "--idkey", str(tmp_path / "id.pem"),
                                "--authorkey", str(tmp_path / "author.pem")],
                               capture_output=True, text=True, timeout=60, check=True)
            first = r.stdout.splitlines()[0]
            block = base64.b64decode(first.split(",")[0].split("=", 1)[1])
            auth = base64.b64decode(first.split("id-auth=")[1])
        m.hv.core.host_write(SCRATCH, block)
        m.hv.core.host_write(SCRATCH + PAGE, auth)
        status, _ = call(m, CommandId.SNP_LAUNCH_FINISH, SnpLaunchFinishCmd(
            gctx_paddr=GCTX, id_block_paddr=SCRATCH, id_auth_paddr=SCRATCH + PAGE,
            flags=SnpLaunchFinishFlags(id_block_en=True, auth_key_en=True)))
        assert status == Status.SUCCESS, (maker, Status(status).name)
