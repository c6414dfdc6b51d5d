"""Interop: our launch-digest predictions, and our firmware's digest, against ``sev-snp-measure``.

``sev-snp-measure`` (PyPI, package ``sevsnpmeasure``) is an independent, pure-Python calculator of
the launch digest a QEMU/KVM host produces for an OVMF guest.  For the same inputs it must give the
same 32 bytes as

* the guest owner's prediction: :func:`sevemu.owner.measurement.expected_launch_digest` over the
  image, :func:`~sevemu.owner.measurement.kernel_hashes_table` and
  :func:`sevemu.owner.vmsa.vmsa_pages` (AP EIP from :func:`sevemu.owner.ovmf.sev_es_reset_eip`);
* the owner's command line: ``sevemu measurement build --policy 0x5 --num-cpus N --vcpu-type T``;
* the firmware model: GCTX.LD after the hypervisor's LAUNCH_UPDATE_DATA of the image placed at
  4 GiB - size, as QEMU maps OVMF's flash.

SEV-ES (owner side): every VMSA page of every QEMU vCPU type, 1-8 vCPUs, both KVM VM types, and the
launch digests for 1-8 vCPUs of EPYC, EPYC-v4, EPYC-Rome, EPYC-Milan and EPYC-Genoa, on Debian 12's
``/usr/share/ovmf/OVMF.fd`` and ``/usr/share/OVMF/OVMF_CODE_4M.fd`` (each skipped, with the reason,
when not installed) and the synthetic image; the tool's VMSA and digest functions are called in
process for the large matrices, its command line for a sample.

The tool is run through its command line (``python -m sevsnpmeasure.cli``, the target of its
``sev-snp-measure`` script); every test skips, with the reason, when it is not installed.

Images
    ``real``: an OVMF image installed on the host -- ``$SEVEMU_OVMF`` if set, else the first image
    with an OVMF footer table and an SEV-ES reset block among the usual locations, AmdSev builds
    first (Debian: ``apt-get install ovmf``).  Skipped, with the places searched, when none exists.
    Debian 12's images have the reset block but an empty SEV hashes-table entry (GPA 0): they are
    not AmdSev builds, and ``sev-snp-measure`` rightly refuses ``--kernel`` with them, so the
    kernel-hashes cases on a real image need an AmdSev build (``real-amdsev``) and skip otherwise.
    ``synthetic``: a 64 KiB image this module builds, with a footer table holding an SEV-ES reset
    block and an SEV hashes-table area, so the kernel-hashes and VMSA paths are compared everywhere.

Conventions, where the two tools could differ (they agree on every one)
    * Kernel hashes: command line hashed with its trailing NUL, an absent one as a lone NUL; no
      initrd hashes as ``SHA-256(b"")``; table length field 168, table zero-padded to 176 bytes and
      measured as its own LAUNCH_UPDATE_DATA region after the image.
    * VMSA: ``--vmm-type QEMU`` pages are those of a ``KVM_SEV_INIT2`` VM (``KVM_X86_SEV_ES_VM``:
      MXCSR 0x1f80, FCW 0x037f synced from the vCPU's FPU): our ``KvmVmType.SEV_ES_VM`` (the default).
      Our ``KvmVmType.DEFAULT_VM`` (the legacy ``KVM_SEV_ES_INIT`` VM: no FPU state, MXCSR = FCW = 0,
      the VM sevctl's vectors come from) differs in those two words only; a test pins that.  The EC2
      and GCE VMM types of ``sev-snp-measure`` are not modelled by :mod:`sevemu.owner.vmsa`.
    * ``--mode seves`` always uses SEV_FEATURES 0 (``--guest-features`` is for SNP): our default.
    * vCPU types: QEMU's family/model/stepping of each EPYC model, written out below, through our
      :func:`~sevemu.owner.vmsa.cpuid_signature` against the tool's ``--vcpu-type`` table.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.cli.main import main as sevemu_main
from sevemu.errors import LayoutError
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevLaunchStart, load_image
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.owner.measurement import expected_launch_digest, kernel_hashes_table
from sevemu.owner.ovmf import (
    OVMF_TABLE_FOOTER_GUID,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_RV_GUID,
    footer_table,
    sev_es_reset_eip,
)
from sevemu.owner.vmsa import (
    VCPU_TYPES,
    KvmVmType,
    cpuid_signature,
    ovmf_vmsa_pages,
    vcpu_signature,
    vmsa_pages,
)
from sevemu.scenario import Machine, build_machine

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sevsnpmeasure") is None,
    reason="sev-snp-measure is not installed (it is in the test extra: pip install -e '.[test]')",
)

FOUR_GIB = 1 << 32

# QEMU's EPYC CPU models (target/i386/cpu.c builtin_x86_defs): display family, model, stepping.
QEMU_EPYC_FMS = {
    "EPYC": (23, 1, 2),
    "EPYC-Rome": (23, 49, 0),
    "EPYC-Milan": (25, 1, 1),
    "EPYC-Genoa": (25, 17, 0),
}

OVMF_GLOBS = (
    "/usr/share/ovmf/*amdsev*.fd",
    "/usr/share/OVMF/*amdsev*.fd",
    "/usr/share/qemu/*amdsev*.fd",
    "/usr/share/edk2/ovmf/*amdsev*.fd",
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/OVMF/OVMF_CODE.fd",
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/qemu/OVMF.fd",
    "/usr/share/edk2/ovmf/OVMF_CODE.fd",
)

SYNTH_AP_EIP = 0x0080B004
SYNTH_HASHES_GPA = 0x0080C000


# ---- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    data: bytes

    @property
    def gpa(self) -> int:
        """Where QEMU maps the flash image: it ends at 4 GiB."""
        return FOUR_GIB - len(self.data)


def _hashes_gpa(data: bytes) -> int:
    """GPA of the image's SEV kernel-hashes area; 0 when it has none (not an AmdSev build)."""
    entry = footer_table(data).get(SEV_HASH_TABLE_RV_GUID, b"")
    return int.from_bytes(entry[:4], "little") if len(entry) >= 4 else 0


def _sev_capable(data: bytes) -> bool:
    try:
        sev_es_reset_eip(data)
    except LayoutError:
        return False
    return True


def _real_paths() -> list[str]:
    env = os.environ.get("SEVEMU_OVMF")
    paths = [env] if env else []
    for pattern in OVMF_GLOBS:
        paths += sorted(glob.glob(pattern))
    return paths


@functools.cache
def _real_image(need_hashes: bool) -> Image | None:
    for p in _real_paths():
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        if _sev_capable(data) and (not need_hashes or _hashes_gpa(data)):
            return Image("real-amdsev" if need_hashes else "real", Path(p), data)
    return None


def _no_real_image(need_hashes: bool) -> str:
    what = "AmdSev OVMF image (SEV hashes-table area)" if need_hashes else "OVMF image with SEV metadata"
    where = ", ".join(OVMF_GLOBS)
    hint = "" if need_hashes else " (Debian: apt-get install ovmf)"
    return f"no {what} found: set SEVEMU_OVMF or install one{hint}; searched {where}"


def _footer_entry(guid_bytes: bytes, data: bytes) -> bytes:
    return data + (len(data) + 18).to_bytes(2, "little") + guid_bytes


def synthetic_ovmf(size: int = 64 << 10) -> bytes:
    """An OVMF-shaped image: opaque body, footer table (hashes area, SEV-ES reset block), reset area."""
    table = _footer_entry(SEV_HASH_TABLE_RV_GUID.bytes_le,
                          SYNTH_HASHES_GPA.to_bytes(4, "little") + (0x400).to_bytes(4, "little"))
    table += _footer_entry(SEV_ES_RESET_BLOCK_GUID.bytes_le, SYNTH_AP_EIP.to_bytes(4, "little"))
    footer = (len(table) + 18).to_bytes(2, "little") + OVMF_TABLE_FOOTER_GUID.bytes_le
    reset_area = bytes.fromhex("90" * 16 + "e9" + "00" * 15)  # stands in for the reset vector
    tail = table + footer + reset_area
    return hashlib.shake_256(b"sevemu interop synthetic OVMF").digest(size - len(tail)) + tail


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="module")
def synthetic(workdir: Path) -> Image:
    path = workdir / "OVMF.synthetic.fd"
    data = synthetic_ovmf()
    path.write_bytes(data)
    return Image("synthetic", path, data)


@pytest.fixture(scope="module", params=["real", "synthetic"])
def image(request: pytest.FixtureRequest, synthetic: Image) -> Image:
    """Any OVMF image with SEV metadata (reset block): for --mode sev and seves."""
    if request.param == "synthetic":
        return synthetic
    real = _real_image(need_hashes=False)
    if real is None:
        pytest.skip(_no_real_image(need_hashes=False))
    return real


@pytest.fixture(scope="module", params=["real-amdsev", "synthetic"])
def hashes_image(request: pytest.FixtureRequest, synthetic: Image) -> Image:
    """An OVMF image with an SEV kernel-hashes area: for -kernel/-initrd/-append launches."""
    if request.param == "synthetic":
        return synthetic
    real = _real_image(need_hashes=True)
    if real is None:
        pytest.skip(_no_real_image(need_hashes=True))
    return real


@dataclass(frozen=True)
class Boot:
    """A QEMU direct-kernel boot: -kernel, optional -initrd and -append."""

    name: str
    kernel: Path
    initrd: Path | None
    append: str | None

    def table(self) -> bytes:
        initrd = self.initrd.read_bytes() if self.initrd else b""
        return kernel_hashes_table(self.kernel.read_bytes(), initrd, self.append)

    def args(self) -> tuple[str, ...]:
        out: tuple[str, ...] = ("--kernel", str(self.kernel))
        if self.initrd is not None:
            out += ("--initrd", str(self.initrd))
        if self.append is not None:
            out += ("--append", self.append)
        return out


@pytest.fixture(scope="module")
def kernel_files(workdir: Path) -> tuple[Path, Path]:
    kernel, initrd = workdir / "vmlinuz", workdir / "initrd.img"
    kernel.write_bytes(b"MZ" + hashlib.shake_256(b"fake kernel").digest(96 << 10))
    initrd.write_bytes(b"070701" + hashlib.shake_256(b"fake initrd").digest(40 << 10))
    return kernel, initrd


BOOTS = ["kernel-only", "kernel+initrd+cmdline", "kernel+empty-cmdline"]


@pytest.fixture(scope="module", params=BOOTS)
def boot(request: pytest.FixtureRequest, kernel_files: tuple[Path, Path]) -> Boot:
    kernel, initrd = kernel_files
    name = request.param
    if name == "kernel-only":
        return Boot(name, kernel, None, None)
    if name == "kernel+initrd+cmdline":
        return Boot(name, kernel, initrd, "console=ttyS0 root=/dev/vda1 ro quiet")
    return Boot(name, kernel, None, "")


# ---- the independent tool -----------------------------------------------------------------------
@functools.cache
def ssm(*args: str) -> tuple[bytes, tuple[bytes, ...]]:
    """Run sev-snp-measure with ``args`` (cached); returns the digest and, for ``--dump-vmsa``, the
    VMSA pages it measured (written to the working directory as vmsa<N>.bin)."""
    with tempfile.TemporaryDirectory(prefix="ssm-") as cwd:
        r = subprocess.run([sys.executable, "-m", "sevsnpmeasure.cli", *args, "--output-format", "hex"],
                           cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, f"sev-snp-measure {' '.join(args)} failed: {r.stderr or r.stdout}"
        pages: list[bytes] = []
        while (Path(cwd) / f"vmsa{len(pages)}.bin").is_file():
            pages.append((Path(cwd) / f"vmsa{len(pages)}.bin").read_bytes())
    return bytes.fromhex(r.stdout.strip()), tuple(pages)


def ssm_sev(img: Image, boot: Boot | None = None) -> bytes:
    return ssm("--mode", "sev", "--ovmf", str(img.path), *(boot.args() if boot else ()))[0]


def ssm_seves(img: Image, vcpus: int, cpu: str, boot: Boot | None = None) -> tuple[bytes, tuple[bytes, ...]]:
    return ssm("--mode", "seves", "--ovmf", str(img.path), "--vcpus", str(vcpus), "--vcpu-type", cpu,
               "--vmm-type", "QEMU", "--dump-vmsa", *(boot.args() if boot else ()))


def first_difference(ours: bytes, theirs: bytes) -> str:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            return f"first difference at offset {i:#x}: ours {a:#04x}, sev-snp-measure {b:#04x}"
    return "identical"


# ---- owner predictions against sev-snp-measure --------------------------------------------------
def test_sev_ovmf_only(image: Image) -> None:
    assert expected_launch_digest([image.data]).hex() == ssm_sev(image).hex()


def test_sev_kernel_hashes(hashes_image: Image, boot: Boot) -> None:
    ours = expected_launch_digest([hashes_image.data, boot.table()])
    assert ours.hex() == ssm_sev(hashes_image, boot).hex()


def test_kernel_hashes_table_bytes(boot: Boot) -> None:
    """The table itself, byte for byte (a diagnostic for test_sev_kernel_hashes)."""
    from sevsnpmeasure.sev_hashes import SevHashes  # type: ignore[import-untyped]

    theirs = SevHashes(str(boot.kernel), str(boot.initrd or ""), boot.append or "").construct_table()
    ours = boot.table()
    assert len(ours) == len(theirs) == 176
    assert ours == theirs, first_difference(ours, theirs)


@pytest.mark.parametrize(("vcpus", "cpu"), [(1, "EPYC-Milan"), (4, "EPYC-Rome"), (2, "EPYC-Genoa"), (3, "EPYC")])
def test_seves_vmsas(image: Image, vcpus: int, cpu: str) -> None:
    pages = vmsa_pages(vcpus, sev_es_reset_eip(image.data), cpu_signature=cpuid_signature(*QEMU_EPYC_FMS[cpu]))
    digest, theirs = ssm_seves(image, vcpus, cpu)
    assert len(theirs) == vcpus and all(len(p) == VMSA_PAGE_SIZE for p in theirs)
    for i, (a, b) in enumerate(zip(pages, theirs, strict=True)):
        assert a == b, f"vCPU {i}: {first_difference(a, b)}"
    assert expected_launch_digest([image.data], pages).hex() == digest.hex()


def test_seves_kernel_hashes(hashes_image: Image, boot: Boot) -> None:
    pages = vmsa_pages(2, sev_es_reset_eip(hashes_image.data),
                       cpu_signature=cpuid_signature(*QEMU_EPYC_FMS["EPYC-Milan"]))
    digest, _ = ssm_seves(hashes_image, 2, "EPYC-Milan", boot)
    assert expected_launch_digest([hashes_image.data, boot.table()], pages).hex() == digest.hex()


def test_seves_legacy_vm_type_is_a_different_measurement(synthetic: Image) -> None:
    """sev-snp-measure's QEMU VMSA has MXCSR/FCW at their reset values (a KVM_SEV_INIT2 VM); the legacy
    KVM_SEV_ES_INIT VM's has them at 0."""
    eip, sig = sev_es_reset_eip(synthetic.data), cpuid_signature(*QEMU_EPYC_FMS["EPYC-Milan"])
    digest, theirs = ssm_seves(synthetic, 1, "EPYC-Milan")
    old = vmsa_pages(1, eip, cpu_signature=sig, vm_type=KvmVmType.DEFAULT_VM)[0]
    assert expected_launch_digest([synthetic.data], [old]) != digest
    diff = [i for i, (a, b) in enumerate(zip(old, theirs[0], strict=True)) if a != b]
    assert diff and all(0x408 <= i < 0x40C or 0x410 <= i < 0x412 for i in diff)  # mxcsr, x87_fcw only


# ---- SEV-ES: every vCPU type, 1-8 vCPUs, both KVM VM types, Debian's OVMF images ------------------
DEBIAN_OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")
ES_VCPU_TYPES = ("EPYC", "EPYC-v4", "EPYC-Rome", "EPYC-Milan", "EPYC-Genoa")
MXCSR_FCW = {0x408, 0x409, 0x410, 0x411}


@pytest.fixture(scope="module", params=[*DEBIAN_OVMF, "synthetic"])
def es_image(request: pytest.FixtureRequest, synthetic: Image) -> Image:
    """Debian 12's two SEV-ES capable OVMF builds (package ``ovmf``), and the synthetic image."""
    if request.param == "synthetic":
        return synthetic
    path = Path(request.param)
    if not path.is_file():
        pytest.skip(f"{path} is not installed (Debian: apt-get install ovmf)")
    return Image(path.name, path, path.read_bytes())


def tool_signature(vcpu_type: str) -> int:
    """The tool's CPUID signature for ``vcpu_type``; for a QEMU model version it does not list, its
    base model's (QEMU's versions change features, never family/model/stepping)."""
    from sevsnpmeasure.vcpu_types import CPU_SIGS  # type: ignore[import-untyped]

    sig = CPU_SIGS.get(vcpu_type)
    return int(sig if sig is not None else CPU_SIGS[vcpu_type.rsplit("-v", 1)[0]])


def tool_pages(ap_eip: int, vcpus: int, sig: int) -> list[bytes]:
    from sevsnpmeasure.sev_mode import SevMode  # type: ignore[import-untyped]
    from sevsnpmeasure.vmm_types import VMMType  # type: ignore[import-untyped]
    from sevsnpmeasure.vmsa import VMSA  # type: ignore[import-untyped]

    return [bytes(p) for p in VMSA(SevMode.SEV_ES, ap_eip, sig, 0x0, VMMType.QEMU).pages(vcpus)]


def test_vcpu_types_equal_the_tools_table() -> None:
    from sevsnpmeasure.vcpu_types import CPU_SIGS

    assert set(CPU_SIGS) <= set(VCPU_TYPES)
    for name in VCPU_TYPES:
        assert vcpu_signature(name) == tool_signature(name), name


@pytest.mark.parametrize("vm_type", list(KvmVmType))
@pytest.mark.parametrize("vcpu_type", sorted(VCPU_TYPES))
def test_vmsa_bytes_every_vcpu_type(es_image: Image, vcpu_type: str, vm_type: KvmVmType) -> None:
    """Every page for 1-8 vCPUs: equal to the tool's for a KVM_SEV_INIT2 VM; for the legacy VM type
    different in MXCSR and FCW only (0 there)."""
    theirs = tool_pages(sev_es_reset_eip(es_image.data), 8, tool_signature(vcpu_type))
    for vcpus in range(1, 9):
        ours = ovmf_vmsa_pages(es_image.data, vcpus, cpu_signature=vcpu_signature(vcpu_type), vm_type=vm_type)
        assert len(ours) == vcpus
        for i, (a, b) in enumerate(zip(ours, theirs[:vcpus], strict=True)):
            if vm_type in (KvmVmType.SEV_ES_VM, KvmVmType.SNP_VM):  # an SNP VM's, with sev_features 0: the same
                assert a == b, f"vCPU {i}: {first_difference(a, b)}"
            else:
                assert {k for k in range(VMSA_PAGE_SIZE) if a[k] != b[k]} == MXCSR_FCW, f"vCPU {i}"
                assert not any(a[k] for k in MXCSR_FCW)


@pytest.mark.parametrize("vcpu_type", ES_VCPU_TYPES)
def test_seves_digests_1_to_8_vcpus(es_image: Image, vcpu_type: str) -> None:
    """The owner's SEV-ES launch digest against the tool's, in process, for 1-8 vCPUs."""
    from sevsnpmeasure.guest import seves_calc_launch_digest  # type: ignore[import-untyped]
    from sevsnpmeasure.vmm_types import VMMType

    sig = vcpu_signature(vcpu_type)
    for vcpus in range(1, 9):
        theirs = seves_calc_launch_digest(vcpus, sig, str(es_image.path), None, None, None, vmm_type=VMMType.QEMU)
        ours = expected_launch_digest([es_image.data], ovmf_vmsa_pages(es_image.data, vcpus, cpu_signature=sig))
        assert ours.hex() == theirs.hex(), f"{vcpus} vCPUs"


def owner_cli_digest(img: Image, vcpus: int, vcpu_type: str, boot: Boot | None = None) -> bytes:
    """``sevemu measurement build`` (the owner's command line, in this process) for an SEV-ES launch."""
    argv = ["measurement", "build", "--api-major", "1", "--api-minor", "51", "--build-id", "3", "--policy", "0x5",
            "--firmware", str(img.path), "--num-cpus", str(vcpus), "--vcpu-type", vcpu_type, "--json"]
    if boot is not None:
        argv += ["--kernel", str(boot.kernel)] + (["--initrd", str(boot.initrd)] if boot.initrd else [])
        argv += ["--cmdline", boot.append] if boot.append is not None else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = sevemu_main(argv)
    assert rc == 0, out.getvalue()
    return bytes.fromhex(json.loads(out.getvalue())["launch_digest"])


@pytest.mark.parametrize("vcpu_type", ES_VCPU_TYPES)
def test_owner_cli_seves_digests_1_to_8_vcpus(es_image: Image, vcpu_type: str) -> None:
    """``sevemu measurement build --num-cpus N --vcpu-type T`` against the tool, for 1-8 vCPUs."""
    from sevsnpmeasure.guest import seves_calc_launch_digest
    from sevsnpmeasure.vmm_types import VMMType

    for vcpus in range(1, 9):
        theirs = seves_calc_launch_digest(vcpus, tool_signature(vcpu_type), str(es_image.path), None, None, None,
                                          vmm_type=VMMType.QEMU)
        assert owner_cli_digest(es_image, vcpus, vcpu_type).hex() == theirs.hex(), f"{vcpus} vCPUs"


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_owner_cli_against_the_tools_cli(es_image: Image, vcpus: int) -> None:
    """Command line against command line (``sev-snp-measure --mode seves --vcpu-type EPYC-v4``)."""
    assert owner_cli_digest(es_image, vcpus, "EPYC-v4").hex() == ssm_seves(es_image, vcpus, "EPYC-v4")[0].hex()


def test_owner_cli_seves_kernel_hashes(hashes_image: Image, boot: Boot) -> None:
    digest, _ = ssm_seves(hashes_image, 3, "EPYC-Genoa", boot)
    assert owner_cli_digest(hashes_image, 3, "EPYC-Genoa", boot).hex() == digest.hex()


# ---- the firmware's launch digest against sev-snp-measure ---------------------------------------
# Two host paths load the regions: ``kvm-ioctl`` is QEMU's (KVM_MEMORY_ENCRYPT_OP LAUNCH_START and
# LAUNCH_UPDATE_DATA through :class:`~sevemu.hypervisor.kvm_ops.KvmSev`, exact lengths as KVM);
# ``hv.launch`` is the model's one-call :meth:`~sevemu.hypervisor.kvm.Hypervisor.launch`.


@pytest.fixture(scope="module")
def machine() -> Machine:
    return build_machine("milan", seed="interop-sev-snp-measure")


def firmware_ld(m: Machine, regions: list[tuple[int, bytes]], path: str) -> bytes:
    """GCTX.LD after loading ``regions`` (GPA, bytes) in order into a 4 GiB SEV guest by ``path``."""
    vm = m.hv.create_vm("ovmf-guest", FOUR_GIB)  # sparse: only the loaded pages are backed
    try:
        if path == "hv.launch":
            m.hv.launch(vm, regions)
        else:
            kvm = KvmSev(m.hv, vm)
            dev = SevDevice(m.hv)
            assert kvm.memory_encrypt_op(KvmSevCmdId.INIT, sev_fd=dev) == 0
            kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=0), sev_fd=dev)
            for gpa, data in regions:
                assert load_image(kvm, data, gpa, page_by_page=False) == 0
        return m.firmware.guests[vm.handle].launch_digest
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize("path", ["kvm-ioctl", "hv.launch"])
def test_firmware_sev_ovmf(machine: Machine, image: Image, path: str) -> None:
    ld = firmware_ld(machine, [(image.gpa, image.data)], path)
    assert ld.hex() == ssm_sev(image).hex()


@pytest.mark.parametrize("path", ["kvm-ioctl", "hv.launch"])
def test_firmware_sev_kernel_hashes(machine: Machine, hashes_image: Image, kernel_files: tuple[Path, Path],
                                    path: str) -> None:
    """QEMU measures the image, then the padded table at the GPA of the image's hashes area."""
    kernel, initrd = kernel_files
    boot = Boot("kernel+initrd+cmdline", kernel, initrd, "console=ttyS0")
    regions = [(hashes_image.gpa, hashes_image.data), (_hashes_gpa(hashes_image.data), boot.table())]
    ld = firmware_ld(machine, regions, path)
    assert ld.hex() == ssm_sev(hashes_image, boot).hex()
