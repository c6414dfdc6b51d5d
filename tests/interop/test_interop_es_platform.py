"""Interop: an SEV-ES launch of Debian's OVMF through the whole platform -- KVM model, PSP mailbox,
firmware -- against ``sev-snp-measure --mode seves``.

The VMM's part is done here as QEMU does it: KVM_CREATE_VM with the VM type (``KVM_X86_SEV_ES_VM``
then KVM_SEV_INIT2, or the legacy default VM then KVM_SEV_ES_INIT), one vCPU per ``-smp`` of the
``-cpu`` model (the BSP at the reset vector, the APs at the EIP of OVMF's SEV-ES reset block, QEMU
``sev_es_set_reset_vector``), LAUNCH_START with the guest owner's session, one LAUNCH_UPDATE_DATA of
the flash image mapped to end at 4 GiB, KVM_SEV_LAUNCH_UPDATE_VMSA (one VMSA per vCPU, made by the
hypervisor from its own vCPU state), LAUNCH_MEASURE.  The owner verifies the firmware's MEASURE with
the session's TIK against the tool's digest (a wrong digest fails the HMAC); a sample also finishes
the launch and reads the launch digest back from a PEK-signed ATTESTATION report.

The tool models a KVM_SEV_INIT2 VM (FPU state in the VMSA); the legacy KVM_SEV_ES_INIT VM differs
in MXCSR and FCW only, so its digest is compared with the owner's calculator
(:func:`sevemu.owner.vmsa.ovmf_vmsa_pages` with ``KvmVmType.DEFAULT_VM``) and shown to differ from
the tool's.  The fast set samples the matrix; ``-m slow`` runs 1-8 vCPUs of EPYC, EPYC-v4,
EPYC-Rome, EPYC-Milan and EPYC-Genoa on both VM types.  Each image is skipped, with the reason,
when it is not installed (Debian 12: ``apt-get install ovmf``), and everything when the tool is not.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.policy import GuestPolicy
from sevemu.crypto.transport import MeasureMacError
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevAttestationReport,
    KvmSevCmdId,
    KvmSevInit,
    KvmSevLaunchMeasure,
    KvmSevLaunchStart,
    KvmVmType,
    load_image,
)
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.vcpu import BSP_RESET_EIP
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.ovmf import sev_es_reset_eip
from sevemu.owner.report import verify_attestation_report
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sevsnpmeasure") is None,
    reason="sev-snp-measure is not installed (it is in the test extra: pip install -e '.[test]')",
)

FOUR_GIB = 1 << 32
DEBIAN_OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
VCPU_TYPES = ("EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa")
POLICY = int(GuestPolicy.ES)


@dataclass(frozen=True)
class Ovmf:
    path: Path
    data: bytes

    @property
    def gpa(self) -> int:
        return FOUR_GIB - len(self.data)


@pytest.fixture(scope="module", params=DEBIAN_OVMF)
def ovmf(request: pytest.FixtureRequest) -> Ovmf:
    path = Path(request.param)
    if not path.is_file():
        pytest.skip(f"{path} is not installed (Debian: apt-get install ovmf)")
    return Ovmf(path, path.read_bytes())


@pytest.fixture(scope="module")
def machine() -> Machine:
    return build_machine("milan", seed="interop-es-platform")


def tool_digest(img: Ovmf, vcpus: int, vcpu_type: str) -> bytes:
    """``sev-snp-measure --mode seves --vmm-type QEMU`` in process (a version QEMU has and the tool's
    table lacks has its base model's signature: versions never change it)."""
    from sevsnpmeasure.guest import seves_calc_launch_digest  # type: ignore[import-untyped]
    from sevsnpmeasure.vcpu_types import CPU_SIGS  # type: ignore[import-untyped]
    from sevsnpmeasure.vmm_types import VMMType  # type: ignore[import-untyped]

    sig = CPU_SIGS.get(vcpu_type, CPU_SIGS.get(vcpu_type.rsplit("-v", 1)[0]))
    return bytes(seves_calc_launch_digest(vcpus, int(sig), str(img.path), None, None, None, vmm_type=VMMType.QEMU))


def owner_digest(img: Ovmf, vcpus: int, vcpu_type: str, vm_type: KvmVmType) -> bytes:
    kind = owner_vmsa.KvmVmType.SEV_ES_VM if vm_type is KvmVmType.SEV_ES_VM else owner_vmsa.KvmVmType.DEFAULT_VM
    pages = owner_vmsa.ovmf_vmsa_pages(img.data, vcpus, cpu_signature=owner_vmsa.vcpu_signature(vcpu_type),
                                       vm_type=kind)
    return expected_launch_digest([img.data], pages)


@dataclass
class Launched:
    kvm: KvmSev
    session: LaunchSession
    measure: bytes


def qemu_launch(m: Machine, img: Ovmf, vcpus: int, vcpu_type: str, vm_type: KvmVmType) -> Launched:
    """QEMU's SEV-ES launch of ``img`` up to LAUNCH_MEASURE, through the ioctls (module docstring)."""
    hv = m.hv
    vm = hv.create_vm("ovmf", FOUR_GIB, vm_type=vm_type, vcpu_type=vcpu_type)  # sparse: only loaded pages
    kvm, dev = KvmSev(hv, vm), SevDevice(hv)
    if vm_type is KvmVmType.SEV_ES_VM:
        kvm.op(KvmSevCmdId.INIT2, KvmSevInit())
    else:
        kvm.op(KvmSevCmdId.ES_INIT)
    ap_eip = sev_es_reset_eip(img.data)
    for i in range(vcpus):
        vm.add_vcpu(reset_eip=BSP_RESET_EIP if i == 0 else ap_eip)
    pdh = m.firmware.identity.pdh_cert.public_key()
    assert isinstance(pdh, ec.EllipticCurvePublicKey)
    sess = LaunchSession.create(pdh, POLICY)
    godh, blob = sess.godh_cert_blob, sess.session_blob
    kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=POLICY, dh_uaddr=godh, dh_len=len(godh),
                                                       session_uaddr=blob, session_len=len(blob)), sev_fd=dev)
    assert load_image(kvm, img.data, img.gpa, page_by_page=False) == 0
    kvm.op(KvmSevCmdId.LAUNCH_UPDATE_VMSA)
    out = kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(uaddr=bytearray(0x30), len=0x30))
    assert isinstance(out.uaddr, bytearray)
    return Launched(kvm, sess, bytes(out.uaddr))


def check(m: Machine, img: Ovmf, vcpus: int, vcpu_type: str, vm_type: KvmVmType, *, attest: bool = False) -> None:
    """Launch, verify the MEASURE against the expected digest (the tool's for a KVM_SEV_INIT2 VM),
    optionally read the digest back from ATTESTATION, tear down."""
    launched = qemu_launch(m, img, vcpus, vcpu_type, vm_type)
    try:
        theirs = tool_digest(img, vcpus, vcpu_type)
        ours = owner_digest(img, vcpus, vcpu_type, vm_type)
        if vm_type is KvmVmType.SEV_ES_VM:
            assert ours == theirs, f"{vcpus} x {vcpu_type}: the owner's calculator disagrees with the tool"
            expected = theirs
        else:
            assert ours != theirs  # the legacy VM's VMSAs have no FPU state
            expected = ours
        p = m.profile
        # raises MeasureMacError unless the firmware's GCTX.LD is ``expected``
        launched.session.verify_measurement(launched.measure, api_major=p.api_major, api_minor=p.api_minor,
                                            build=p.build, expected_ld=expected)
        if attest:
            kvm = launched.kvm
            kvm.op(KvmSevCmdId.LAUNCH_FINISH)
            report = kvm.op(KvmSevCmdId.GET_ATTESTATION_REPORT,
                            KvmSevAttestationReport(mnonce=bytes(range(16)), uaddr=bytearray(0xD0), len=0xD0))
            assert isinstance(report.uaddr, bytearray)
            pek = m.firmware.identity.pek_cert.public_key()  # what PDH_CERT_EXPORT hands the owner
            assert isinstance(pek, ec.EllipticCurvePublicKey)
            verified = verify_attestation_report(bytes(report.uaddr), pek, mnonce=bytes(range(16)),
                                                 launch_digest=expected, policy=POLICY)
            assert verified.launch_digest == expected
    finally:
        m.hv.destroy(launched.kvm.vm)


SAMPLE = [(1, "EPYC-Milan", KvmVmType.SEV_ES_VM), (4, "EPYC-v4", KvmVmType.SEV_ES_VM),
          (8, "EPYC-Genoa", KvmVmType.SEV_ES_VM), (2, "EPYC-Rome", KvmVmType.DEFAULT_VM)]


@pytest.mark.parametrize(("vcpus", "vcpu_type", "vm_type"), SAMPLE,
                         ids=[f"{n}x{t}-{v.name}" for n, t, v in SAMPLE])
def test_platform_digest_sample(machine: Machine, ovmf: Ovmf, vcpus: int, vcpu_type: str, vm_type: KvmVmType) -> None:
    check(machine, ovmf, vcpus, vcpu_type, vm_type, attest=vcpus == 1)


def test_platform_digest_against_the_tools_command_line(machine: Machine, ovmf: Ovmf) -> None:
    """The firmware's digest against ``sev-snp-measure`` run as a program, for 3 EPYC-v4 vCPUs."""
    r = subprocess.run([sys.executable, "-m", "sevsnpmeasure.cli", "--mode", "seves", "--vmm-type", "QEMU",
                        "--ovmf", str(ovmf.path), "--vcpus", "3", "--vcpu-type", "EPYC-v4", "--output-format", "hex"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr or r.stdout
    cli = bytes.fromhex(r.stdout.strip())
    assert cli == tool_digest(ovmf, 3, "EPYC-v4")
    launched = qemu_launch(machine, ovmf, 3, "EPYC-v4", KvmVmType.SEV_ES_VM)
    try:
        p = machine.profile
        launched.session.verify_measurement(launched.measure, api_major=p.api_major, api_minor=p.api_minor,
                                            build=p.build, expected_ld=cli)
    finally:
        machine.hv.destroy(launched.kvm.vm)


def test_a_wrong_vcpu_type_fails_the_owners_check(machine: Machine, ovmf: Ovmf) -> None:
    """The check is not vacuous: a host that runs another vCPU model than the owner expects (or
    another vCPU count) gives a MEASURE the owner rejects."""
    launched = qemu_launch(machine, ovmf, 2, "EPYC-Rome", KvmVmType.SEV_ES_VM)
    try:
        p = machine.profile
        for vcpus, vcpu_type in ((2, "EPYC-Milan"), (1, "EPYC-Rome")):
            with pytest.raises(MeasureMacError):
                launched.session.verify_measurement(launched.measure, api_major=p.api_major, api_minor=p.api_minor,
                                                    build=p.build, expected_ld=tool_digest(ovmf, vcpus, vcpu_type))
    finally:
        machine.hv.destroy(launched.kvm.vm)


@pytest.mark.slow
@pytest.mark.parametrize("vm_type", [KvmVmType.SEV_ES_VM, KvmVmType.DEFAULT_VM], ids=lambda v: v.name)
@pytest.mark.parametrize("vcpu_type", VCPU_TYPES)
def test_platform_digest_matrix(machine: Machine, ovmf: Ovmf, vcpu_type: str, vm_type: KvmVmType) -> None:
    """1-8 vCPUs of each vCPU type, on both KVM VM types."""
    for vcpus in range(1, 9):
        check(machine, ovmf, vcpus, vcpu_type, vm_type)
