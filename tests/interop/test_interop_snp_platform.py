"""Interop: SEV-SNP launches of Debian's OVMF through the whole platform -- KVM model, PSP mailbox,
SNP firmware, RMP -- against ``sev-snp-measure --mode snp``.

The VMM's part is done as QEMU does it: KVM_CREATE_VM with ``KVM_X86_SNP_VM``, KVM_SEV_INIT2, one
vCPU per ``-smp`` of the ``-cpu`` model (the BSP at the reset vector, the APs at the EIP of OVMF's
SEV-ES reset block), KVM_SEV_SNP_LAUNCH_START with QEMU's default policy, KVM_SEV_SNP_LAUNCH_UPDATE
of the flash image mapped to end at 4 GiB, then of OVMF's SEV metadata sections in table order
(``OVMF.fd`` has them, ``OVMF_CODE_4M.fd`` none: SEC_MEM as ZERO, SECRETS, CPUID with a table of the
host's CPUID, KERNEL_HASHES and SVSM_CAA as ZERO -- QEMU ``snp_populate_metadata_pages``),
KVM_SEV_SNP_LAUNCH_FINISH (KVM measures one VMSA per vCPU, BSP
first, with ``sev_features`` = SNP_ACTIVE).  The firmware's launch digest is read through the test's
debug hook (the firmware's SNP guest context: what the attestation report will carry) and must equal
the tool's.  The fast set samples vCPU counts and types; ``-m slow`` runs 1-8 vCPUs of every EPYC
model.  Images not installed are skipped with the reason, everything when the tool is missing.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from sevemu.cli import bench_snp
from sevemu.firmware.snp import snp_state
from sevemu.hypervisor.kvm_ops import KvmSev
from sevemu.hypervisor.sev import snp
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.snp_measurement import ovmf_launch_digest
from sevemu.scenario import Machine, build_machine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sevsnpmeasure") is None,
    reason="sev-snp-measure is not installed (it is in the test extra: pip install -e '.[test]')",
)

FOUR_GIB = 1 << 32
DEBIAN_OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")
VCPU_TYPES = ("EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa")
POLICY = 0x30000


@pytest.fixture(scope="module", params=DEBIAN_OVMF)
def ovmf(request: pytest.FixtureRequest) -> Path:
    path = Path(request.param)
    if not path.is_file():
        pytest.skip(f"{path} is not installed (Debian: apt-get install ovmf)")
    return path


@pytest.fixture(scope="module")
def machine() -> Machine:
    m = build_machine("milan", seed="interop-snp-platform", init=False)
    snp.platform_init(m.hv.sev)  # SNP first, then SEV (sev-dev.c)
    m.hv.platform_init()
    return m


def tool_digest(path: Path, vcpus: int, vcpu_type: str) -> bytes:
    """``sev-snp-measure --mode snp --vmm-type QEMU`` in process."""
    from sevsnpmeasure.guest import snp_calc_launch_digest  # type: ignore[import-untyped]
    from sevsnpmeasure.vcpu_types import CPU_SIGS  # type: ignore[import-untyped]
    from sevsnpmeasure.vmm_types import VMMType  # type: ignore[import-untyped]

    sig = CPU_SIGS.get(vcpu_type, CPU_SIGS.get(vcpu_type.rsplit("-v", 1)[0]))
    return bytes(snp_calc_launch_digest(vcpus, int(sig), str(path), None, None, None, 0x1, None,
                                        vmm_type=VMMType.QEMU))


def qemu_snp_launch(m: Machine, path: Path, vcpus: int, vcpu_type: str) -> tuple[KvmSev, bytes]:
    """QEMU's SNP launch of ``path`` (``sevemu.cli.bench_snp.qemu_snp_launch``, the module docstring's
    steps); (the VM's KVM handle, the firmware's digest)."""
    vm = bench_snp.qemu_snp_launch(m, path.read_bytes(), vcpus, vcpu_type, host_data=b"qemu" + bytes(28))
    g = snp_state(m.firmware).guests[vm.snp_context]
    assert g.host_data == b"qemu" + bytes(28) and g.policy == POLICY
    return KvmSev(m.hv, vm), g.ld


def check(m: Machine, path: Path, vcpus: int, vcpu_type: str) -> None:
    kvm, ld = qemu_snp_launch(m, path, vcpus, vcpu_type)
    try:
        assert ld == tool_digest(path, vcpus, vcpu_type), f"{vcpus} x {vcpu_type}: firmware != sev-snp-measure"
        owner = ovmf_launch_digest(path.read_bytes(), vcpus, owner_vmsa.vcpu_signature(vcpu_type)).digest
        assert owner == ld, "the owner's calculator disagrees with the firmware"
    finally:
        m.hv.destroy(kvm.vm)
    assert m.firmware.internal_errors == []


SAMPLE = [(1, "EPYC-Milan"), (4, "EPYC-v4"), (8, "EPYC-Genoa")]


@pytest.mark.parametrize(("vcpus", "vcpu_type"), SAMPLE, ids=[f"{n}x{t}" for n, t in SAMPLE])
def test_snp_platform_digest_sample(machine: Machine, ovmf: Path, vcpus: int, vcpu_type: str) -> None:
    check(machine, ovmf, vcpus, vcpu_type)


def test_snp_platform_digest_against_the_tools_command_line(machine: Machine, ovmf: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "sevsnpmeasure.cli", "--mode", "snp", "--vmm-type", "QEMU",
                        "--ovmf", str(ovmf), "--vcpus", "2", "--vcpu-type", "EPYC-Rome", "--output-format", "hex"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr or r.stdout
    kvm, ld = qemu_snp_launch(machine, ovmf, 2, "EPYC-Rome")
    machine.hv.destroy(kvm.vm)
    assert ld == bytes.fromhex(r.stdout.strip())


def test_a_wrong_vcpu_count_gives_another_digest(machine: Machine, ovmf: Path) -> None:
    kvm, ld = qemu_snp_launch(machine, ovmf, 2, "EPYC-Milan")
    machine.hv.destroy(kvm.vm)
    assert ld != tool_digest(ovmf, 3, "EPYC-Milan") and ld != tool_digest(ovmf, 2, "EPYC-Rome")


@pytest.mark.slow
@pytest.mark.parametrize("vcpu_type", VCPU_TYPES)
@pytest.mark.parametrize("vcpus", range(1, 9))
def test_snp_platform_digest_matrix(machine: Machine, ovmf: Path, vcpus: int, vcpu_type: str) -> None:
    check(machine, ovmf, vcpus, vcpu_type)


CLOUD = [("ec2", "snp", 1), ("ec2", "snp", 3), ("gce", "snp", 2), ("ec2", "seves", 2), ("gce", "seves", 1)]


@pytest.mark.parametrize(("vmm", "mode", "vcpus"), CLOUD, ids=[f"{v}-{m}-{n}" for v, m, n in CLOUD])
def test_cloud_vmm_types_equal_sev_snp_measure(ovmf: Path, vmm: str, mode: str, vcpus: int,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``sevemu measure --vmm-type ec2|gce`` (the owner's calculator: EC2's and GCE's reset states, EC2's
    CPUID page last, GCE's unmeasured SEC_MEM) equals sev-snp-measure's digest for the same options."""
    from sevsnpmeasure.guest import seves_calc_launch_digest, snp_calc_launch_digest
    from sevsnpmeasure.vmm_types import VMMType

    from sevemu.cli.main import main

    kind = VMMType[vmm]
    if mode == "snp":
        theirs = bytes(snp_calc_launch_digest(vcpus, 0, str(ovmf), None, None, None, 0x1, None, vmm_type=kind))
    else:
        if not ovmf.name.startswith("OVMF.fd"):
            pytest.skip("SEV-ES measures the whole flash image (OVMF.fd)")
        theirs = bytes(seves_calc_launch_digest(vcpus, 0, str(ovmf), None, None, None, vmm_type=kind))
    assert main(["measure", "--mode", mode, "--vcpus", str(vcpus), "--ovmf", str(ovmf), "--vmm-type", vmm]) == 0
    ours = bytes.fromhex(capsys.readouterr().out.strip())
    assert ours == theirs
    qemu = ovmf_launch_digest(ovmf.read_bytes(), vcpus, 0).digest if mode == "snp" else None
    assert ours != qemu  # the VMM type is in the digest


@pytest.mark.parametrize("vmm", ["ec2", "gce"])
def test_cloud_vmm_vmsa_pages_equal_sev_snp_measure(ovmf: Path, vmm: str) -> None:
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType
    from sevsnpmeasure.vmsa import VMSA

    from sevemu.owner.ovmf import sev_es_reset_eip

    image = ovmf.read_bytes()
    theirs = list(VMSA(SevMode.SEV_SNP, sev_es_reset_eip(image), 0, 0x1, VMMType[vmm]).pages(2))
    ours = owner_vmsa.ovmf_vmsa_pages(image, 2, cpu_signature=0, sev_features=0x1,
                                      vm_type=owner_vmsa.KvmVmType.SNP_VM, vmm=owner_vmsa.VmmType(vmm))
    assert ours == theirs
