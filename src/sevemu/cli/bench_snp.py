"""``sevemu bench snp``: a full emulated SEV-SNP launch of OVMF beside sev-snp-measure computing only the
digest of the same image in the same run, and PVALIDATE of a guest's memory (4 KiB and 2 MiB pages)
per second.

The launch is the KVM model's, as QEMU drives it (``tests/interop/test_interop_snp_platform.py``):
KVM_SEV_INIT2 for a ``KVM_X86_SNP_VM``, KVM_SEV_SNP_LAUNCH_START, KVM_SEV_SNP_LAUNCH_UPDATE of the image
and of OVMF's SEV metadata sections, KVM_SEV_SNP_LAUNCH_FINISH (one VMSA per vCPU) -- every page
RMPUPDATEd, measured, encrypted by the firmware through the mailbox.  The timed part runs from
KVM_SEV_SNP_LAUNCH_START through KVM_SEV_SNP_LAUNCH_FINISH (the context, every RMPUPDATE, SNP_LAUNCH_UPDATE
with its measurement and encryption, the VMSAs, SNP_LAUNCH_FINISH); building the host, SNP_INIT,
creating the VM, KVM_SEV_INIT2 and the vCPUs are not timed.  KVM backs a 2 MiB-aligned stretch of the
image with a huge folio (one 2 MiB RMPUPDATE and SNP_LAUNCH_UPDATE; the same digest as 512 pages:
``hypervisor/sev/snp.py``); the launch is timed a second time in 4 KiB pages only, as Linux 6.11
populates.  The baseline is sev-snp-measure's ``snp_calc_launch_digest`` (only the digest; the library
call, in this process, reading and parsing the image as it does), or the owner's calculator when the
tool is not installed.

Fairness: both sides run in the same process, warm (one untimed run each first), ``--repeat`` times
(the 4 KiB launch half as many), and the best (lowest wall-clock) run of each is reported with its CPU time (``process_time``); both
timed parts run with the garbage collector paused (as ``timeit``).  Every launch's digest must equal
the calculator's, else the bench refuses to compare.  Each best run's minor page faults (``ru_minflt``)
are reported too: memory the kernel backed on first touch during the timed part (after the warm-up the
launch reuses memory the process already has: ~0 faults, ``docs/snp.md``).

The PSP's SHA engine runs beside its AES engine (:mod:`sevemu.firmware.sha_engine`): the 2 MiB page's
SHA-384 and PAGE_INFO chain on a worker thread while the firmware encrypts it and answers the next
commands, the digest completed when LAUNCH_FINISH reads it (``docs/snp.md``; ``--sha-engine``; ``auto``
engages it only while the host has a spare core).  The wall-clock figure gains from it; the CPU figure
counts every thread of the process, so it does not.

PVALIDATE: the RMP of a fresh SNP SoC, the guest's memory assigned to one ASID in 2 MiB pages
(RMPUPDATE) then smashed (PSMASH) for the 4 KiB run; the timed loop is the instruction's RMP work
(``Rmp.pvalidate``), validate then rescind.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from sevemu._util.units import PAGE, PAGE_2M, GiB, MiB
from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.abi.snp import SnpCpuidFunction
from sevemu.cli.common import emit, positive_int
from sevemu.errors import InputError
from sevemu.firmware import sha_engine
from sevemu.firmware.snp import snp_state
from sevemu.hw.profiles import profile
from sevemu.hw.rmp import RmpFirmwarePort
from sevemu.hw.soc import Soc
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit, KvmVmType
from sevemu.hypervisor.sev import snp
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import KvmSevSnpLaunchFinish, KvmSevSnpLaunchStart, KvmSevSnpLaunchUpdate
from sevemu.hypervisor.vcpu import BSP_RESET_EIP
from sevemu.hypervisor.vm import Vm
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.ovmf import SectionType, sev_es_reset_eip, sev_metadata
from sevemu.owner.snp_measurement import FOUR_GIB, ovmf_launch_digest
from sevemu.scenario import Machine, build_machine

__all__ = ["Timing", "best_of", "cpuid_page", "launch", "qemu_snp_launch", "qemu_snp_launch_steps", "qemu_snp_vm",
           "register_snp", "run_snp", "tool"]

DEFAULT_OVMF = ("/usr/share/ovmf/OVMF.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd")


def register_snp(bsub: Any) -> None:
    """Add ``snp`` to the ``sevemu bench`` sub-commands."""
    p = bsub.add_parser("snp", help="emulated SNP launch of OVMF vs sev-snp-measure; PVALIDATE per second",
                        epilog="examples:\n  sevemu bench snp\n  sevemu bench snp --pvalidate-size 256 --json")
    p.add_argument("--ovmf", type=Path, metavar="PATH", help="the OVMF image (default: Debian's OVMF.fd)")
    p.add_argument("--vcpus", type=positive_int, default=4, help="vCPUs of the launched guest (default 4)")
    p.add_argument("--vcpu-type", default="EPYC-Milan", help="QEMU -cpu model (default EPYC-Milan)")
    p.add_argument("--repeat", type=positive_int, default=15, metavar="N",
                   help="timed runs of each side after a warm-up; the best is reported (default 15)")
    p.add_argument("--pvalidate-size", type=positive_int, default=1024, metavar="MiB",
                   help="guest memory PVALIDATEd, in MiB (default 1024)")
    p.add_argument("--sha-engine", choices=sha_engine.MODES, default="auto",
                   help="the PSP's SHA engine hashing a 2 MiB page on its own thread beside the encryption: "
                        "auto (default: while the host has a spare core), on, off")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_snp)


def cpuid_page(host_cpuid: Any) -> bytes:
    """The CPUID table QEMU hands the firmware: the host's answers for the leaves it has."""
    fns = [SnpCpuidFunction(eax_in=leaf, eax=a, ebx=b, ecx=c, edx=d)
           for leaf in (0x1, 0x8000_0008, 0x8000_001F) for a, b, c, d in [host_cpuid(leaf)]]
    return (len(fns).to_bytes(4, "little") + bytes(12) + b"".join(f.encode() for f in fns)).ljust(PAGE, b"\0")


def qemu_snp_vm(m: Machine, image: bytes, vcpus: int, vcpu_type: str, *, huge_pages: bool = True) -> Vm:
    """The VM QEMU makes before the SNP launch: created, KVM_SEV_INIT2, its vCPUs (the APs at OVMF's
    SEV-ES reset address).  ``huge_pages=False``: KVM populates in 4 KiB pages only, as Linux 6.11's
    ``sev_gmem_post_populate``."""
    vm = m.hv.create_vm("ovmf-snp", FOUR_GIB, vm_type=KvmVmType.SNP_VM, vcpu_type=vcpu_type)
    vm.huge_pages = huge_pages
    KvmSev(m.hv, vm).op(KvmSevCmdId.INIT2, KvmSevInit())
    ap = sev_es_reset_eip(image)
    for i in range(vcpus):
        vm.add_vcpu(reset_eip=BSP_RESET_EIP if i == 0 else ap)
    return vm


def qemu_snp_launch_steps(m: Machine, vm: Vm, image: bytes, *, policy: int = 0x30000,
                          host_data: bytes = bytes(32)) -> None:
    """QEMU's KVM_SEV_SNP_LAUNCH_START / UPDATE (the image, then OVMF's SEV metadata sections) /
    FINISH of OVMF ``image`` on ``vm`` (made by :func:`qemu_snp_vm`)."""
    hv = m.hv
    kvm, dev = KvmSev(hv, vm), SevDevice(hv)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=policy), sev_fd=dev)
    upd = kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(
        gfn_start=(FOUR_GIB - len(image)) >> 12, uaddr=image, len=len(image), type=1), sev_fd=dev)
    if upd.len:
        raise InputError(f"KVM left {upd.len:#x} bytes of the image unprocessed")
    kinds = {SectionType.SNP_SECRETS: 5, SectionType.CPUID: 6}  # SEC_MEM, KERNEL_HASHES, SVSM_CAA: ZERO
    for sec in sev_metadata(image):
        kind = kinds.get(sec.type, 3)
        data = cpuid_page(hv.soc.cpuid) if kind == 6 else bytes(sec.size)
        kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=sec.gpa >> 12, uaddr=bytearray(data),
                                                                    len=sec.size, type=kind), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish(host_data=host_data))


def qemu_snp_launch(m: Machine, image: bytes, vcpus: int, vcpu_type: str, *, policy: int = 0x30000,
                    host_data: bytes = bytes(32), huge_pages: bool = True) -> Vm:
    """QEMU's SNP launch of OVMF ``image`` on ``m`` through the KVM model (module docstring); the VM
    (:func:`qemu_snp_vm`, then :func:`qemu_snp_launch_steps`)."""
    vm = qemu_snp_vm(m, image, vcpus, vcpu_type, huge_pages=huge_pages)
    qemu_snp_launch_steps(m, vm, image, policy=policy, host_data=host_data)
    return vm


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    """The garbage collector collected before and paused during a timed part (as ``timeit`` does), for
    both sides of the comparison alike."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Timing(NamedTuple):
    """One timed run: wall-clock and CPU (``process_time``) seconds, and the minor page faults the
    process took meanwhile (``getrusage``'s ``ru_minflt``: memory the kernel backed on first touch)."""

    wall: float
    cpu: float
    minflt: int = 0


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], bytes]) -> tuple[bytes, Timing]:
    with _quiet_gc():
        f0 = _minflt()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        w1, c1 = time.perf_counter(), time.process_time()
        t = Timing(w1 - w0, c1 - c0, _minflt() - f0)
    return out, t


def launch(image: bytes, vcpus: int, vcpu_type: str, *, huge_pages: bool = True) -> tuple[bytes, Timing]:
    """(the firmware's launch digest, time from KVM_SEV_SNP_LAUNCH_START through LAUNCH_FINISH) of a
    QEMU-style SNP launch of ``image`` on a fresh host (``huge_pages``: :func:`qemu_snp_vm`); the time
    includes completing the digest (queued on the SHA engine, if it is on)."""
    m = build_machine("milan", seed="bench-snp", init=False)
    snp.platform_init(m.hv.sev)
    m.hv.platform_init()
    vm = qemu_snp_vm(m, image, vcpus, vcpu_type, huge_pages=huge_pages)

    def steps() -> bytes:
        qemu_snp_launch_steps(m, vm, image)
        # The launch is done when its digest is: with the SHA engine on, the last page hashes may
        # still be queued after LAUNCH_FINISH (without an ID block it does not read the digest).
        return snp_state(m.firmware).guests[vm.snp_context].ld

    ld, t = _timed(steps)
    m.hv.destroy(vm)
    return ld, t


def tool(path: Path, image: bytes, vcpus: int, vcpu_type: str) -> tuple[bytes, Timing, str]:
    """(digest, time, which) of one run of the reference calculator's library call."""
    sig = owner_vmsa.vcpu_signature(vcpu_type)
    try:
        from sevsnpmeasure.guest import snp_calc_launch_digest  # type: ignore[import-untyped]
        from sevsnpmeasure.vmm_types import VMMType  # type: ignore[import-untyped]
    except ImportError:
        ld, t = _timed(lambda: ovmf_launch_digest(image, vcpus, sig).digest)
        return ld, t, "owner calculator (sev-snp-measure not installed)"
    ld, t = _timed(lambda: bytes(snp_calc_launch_digest(vcpus, sig, str(path), None, None, None, 0x1, None,
                                                        vmm_type=VMMType.QEMU)))
    return ld, t, "sev-snp-measure"


def best_of(runs: int, fn: Callable[[], tuple[bytes, Timing]], reference: bytes | None,
            what: str) -> tuple[bytes, Timing]:
    """One untimed warm-up run of ``fn``, then ``runs`` timed ones: (digest, the lowest wall-clock run);
    InputError when a run's digest differs from ``reference`` (without one: from the warm-up's)."""
    ld, _ = fn()
    want = ld if reference is None else reference
    if ld != want:
        raise InputError(f"{what}: digest {ld.hex()} differs from {want.hex()}")
    best: Timing | None = None
    for _ in range(runs):
        got, t = fn()
        if got != want:
            raise InputError(f"{what}: digest {got.hex()} differs from {want.hex()}")
        best = t if best is None or t.wall < best.wall else best
    assert best is not None
    return ld, best


def pvalidate(size: int) -> dict[str, float]:
    """PVALIDATE rates (pages per second) over ``size`` bytes of guest memory, 2 MiB and 4 KiB."""
    soc = Soc(profile("milan"), dram_size=size + 2 * GiB, rng=lambda n: bytes(n))
    host = soc.host_view()
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | int(SysCfg.SNP_EN))
    assert soc.rmp is not None
    rmp = soc.rmp
    RmpFirmwarePort(rmp).initialize()
    base, asid = GiB, 1
    huge = range(0, size, PAGE_2M)
    for gpa in huge:
        rc = rmp.rmpupdate(base + gpa, RmpUpdateState(gpa=gpa, assigned=1, asid=asid, pagesize=1))
        if rc != RmpResult.SUCCESS:
            raise InputError(f"RMPUPDATE failed: {RmpResult(rc).name}")
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for gpa in huge:
        rmp.pvalidate(asid, gpa, base + gpa, True, True)
    for gpa in huge:
        rmp.pvalidate(asid, gpa, base + gpa, True, False)
    out["pvalidate_2m_per_s"] = 2 * len(huge) / (time.perf_counter() - t0)
    for gpa in huge:
        rmp.psmash(base + gpa)
    small = range(0, size, PAGE)
    t0 = time.perf_counter()
    for gpa in small:
        rmp.pvalidate(asid, gpa, base + gpa, False, True)
    out["pvalidate_4k_per_s"] = len(small) / (time.perf_counter() - t0)
    return out


def run_snp(args: argparse.Namespace) -> int:
    before = sha_engine.mode
    try:
        return _run_snp(args)
    finally:
        sha_engine.mode = before


def _run_snp(args: argparse.Namespace) -> int:
    path = args.ovmf or next((Path(p) for p in DEFAULT_OVMF if Path(p).is_file()), None)
    if path is None or not path.is_file():
        raise InputError("no OVMF image: give --ovmf (Debian: apt-get install ovmf)")
    image = path.read_bytes()
    runs = args.repeat
    sha_engine.mode = args.sha_engine
    engine = sha_engine.engaged()
    names: list[str] = []

    def calc() -> tuple[bytes, Timing]:
        ld, t, which = tool(path, image, args.vcpus, args.vcpu_type)
        names.append(which)
        return ld, t

    theirs, t_tool = best_of(runs, calc, None, "the calculator")
    which = names[0]
    _, t_launch = best_of(runs, lambda: launch(image, args.vcpus, args.vcpu_type), theirs,
                          f"the emulated launch (2 MiB folios) vs {which}")
    _, t_launch_4k = best_of(max(1, runs // 2), lambda: launch(image, args.vcpus, args.vcpu_type, huge_pages=False),
                             theirs, f"the emulated launch (4 KiB pages) vs {which}")
    rates = pvalidate(args.pvalidate_size * MiB)
    result = {"ovmf": str(path), "image_bytes": len(image), "vcpus": args.vcpus, "repeat": runs,
              "launch_s": t_launch.wall, "launch_cpu_s": t_launch.cpu, "launch_minflt": t_launch.minflt,
              "launch_4k_s": t_launch_4k.wall, "launch_4k_cpu_s": t_launch_4k.cpu,
              "launch_4k_minflt": t_launch_4k.minflt,
              "digest_only_s": t_tool.wall, "digest_only_cpu_s": t_tool.cpu, "digest_only_minflt": t_tool.minflt,
              "baseline": which,
              "launch_over_digest": t_launch.wall / t_tool.wall,
              "launch_4k_over_digest": t_launch_4k.wall / t_tool.wall,
              "digest": theirs.hex(), "pvalidate_bytes": args.pvalidate_size * MiB,
              "sha_engine": args.sha_engine, "sha_engine_thread": engine, **rates}
    launch_line = (f"SNP launch of {path} ({len(image) // 1024} KiB, {args.vcpus} vCPUs), best of {runs}: "
                   f"{t_launch.wall * 1e3:.1f} ms emulated (CPU {t_launch.cpu * 1e3:.1f} ms; LAUNCH_START..FINISH: "
                   f"RMPUPDATE, LAUNCH_UPDATE, encryption, VMSAs) vs {t_tool.wall * 1e3:.1f} ms (CPU "
                   f"{t_tool.cpu * 1e3:.1f} ms) {which} (digest only): x{t_launch.wall / t_tool.wall:.2f}; digests equal; "
                   f"minor page faults in the best runs: {t_launch.minflt} vs {t_tool.minflt}")
    engine_line = (f"  the PSP's SHA engine runs beside its AES engine: a 2 MiB page's SHA-384 "
                   f"{'on its own thread while the firmware encrypts and answers the next commands' if engine else 'on the firmware thread (no spare core)'}"
                   f" (--sha-engine {args.sha_engine}); CPU time counts every thread")
    launch_4k_line = (f"  the same launch in 4 KiB pages only (KVM as Linux 6.11's sev_gmem_post_populate): "
                      f"{t_launch_4k.wall * 1e3:.1f} ms (CPU {t_launch_4k.cpu * 1e3:.1f} ms), "
                      f"x{t_launch_4k.wall / t_tool.wall:.2f}")
    rate_line = (f"PVALIDATE over {args.pvalidate_size} MiB: {rates['pvalidate_2m_per_s']:,.0f} 2 MiB pages/s, "
                 f"{rates['pvalidate_4k_per_s']:,.0f} 4 KiB pages/s")
    emit(args, result, [launch_line, engine_line, launch_4k_line, rate_line])
    return 0
