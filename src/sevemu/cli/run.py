"""``sevemu run GUEST``: build a bundled guest image, launch it (measured, for SEV) and run it.

The guest is real x86-64 code (:mod:`sevemu.guest.build`) executed by the Unicorn engine
(:mod:`sevemu.hw.ucengine`); its serial console goes to stdout, what happens to it to stderr.
This module is also the small VMM the tests, the demo and the benchmark drive guests with:

* :func:`launch_guest` -- VM (plain or SEV), LAUNCH_UPDATE_DATA of the image, vCPUs in the
  documented initial state (ESI = vCPU index, EDI = vCPU count);
* :class:`GuestRun` -- the run loop: round-robin over the vCPUs, each HLT is "host, your turn" (the
  bounce-buffer device is serviced, an ``on_halt`` callback may act), HLT at the runtime's
  ``rt_done`` means that vCPU is finished; crashes are reported with reason and RIP, never raised.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevemu._util.units import PAGE, MiB
from sevemu.abi.ghcb import HvFeature
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.snp import CPUID_COUNT_MAX, SnpCpuidFunction, SnpCpuidTable, SnpPageType
from sevemu.certs.roots import GENERATIONS
from sevemu.cli.common import positive_int, seconds
from sevemu.errors import GuestBuildError, InputError, SevemuError, UnmappedError
from sevemu.guest.build import GuestImage, build_guest, build_source, list_guests
from sevemu.hw.profiles import profile
from sevemu.hw.ucengine import InitialState, UcEngine
from sevemu.hypervisor.guest_request import guest_requests
from sevemu.hypervisor.kvm import RunResult
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import KvmSevSnpLaunchFinish, KvmSevSnpLaunchStart, KvmSevSnpLaunchUpdate
from sevemu.hypervisor.vcpu import KvmVmType, Segment
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine

__all__ = ["BOUNCE_MAGIC", "GuestRun", "Outcome", "launch_guest", "load_image", "register", "run_guest"]

DEFAULT_MEMORY = 16 * MiB
MODES = ("plain", "sev", "sev-es", "snp")
SNP_POLICY = 0x30000
"""The SNP guest policy ``sevemu run --mode snp`` launches with: SMT allowed, bit 17 (reserved, one)."""
SNP_SECRETS_GPA = 0xFE000
"""Where ``--mode snp`` puts the secrets page (the runtime's ``SNP_SECRETS_GPA``, rt.h)."""
SNP_CPUID_GPA = 0xFF000
"""Where ``--mode snp`` puts the CPUID page (the runtime's ``SNP_CPUID_GPA``, rt.h)."""
SNP_CPUID_LEAVES = (0x0, 0x1, 0x8000_0000, 0x8000_001F)
"""The CPUID functions the VMM puts in the CPUID page (the host's answers; the firmware checks them)."""
BOUNCE_MAGIC = 0x42425653
_BOUNCE_REQUEST, _BOUNCE_REPLY = 1, 2
_OP_ECHO_UPPER, _OP_CHECKSUM = 1, 2


def load_image(guest: str, *, rebuild: bool = False) -> GuestImage:
    """A bundled guest by name, or the guest whose ``main`` is in the C file ``guest``."""
    if guest.endswith(".c") or "/" in guest:
        return build_source(Path(guest), rebuild=rebuild)
    return build_guest(guest, rebuild=rebuild)


@dataclass(frozen=True)
class Outcome:
    """How a guest run ended."""

    status: str
    """``finished`` (every vCPU reached rt_done), ``crashed``, ``timeout`` or ``paused``."""
    console: str
    reason: str = ""
    rip: int | None = None
    exits: int = 0
    seconds: float = 0.0


@dataclass
class GuestRun:
    """A launched guest and the loop that runs it."""

    machine: Machine
    vm: Vm
    image: GuestImage
    engines: list[UcEngine]
    measurement: bytes
    halted: set[int] = field(default_factory=set)
    exits: int = 0
    _printed: int = 0

    @property
    def sev(self) -> bool:
        return self.vm.sev

    @property
    def console(self) -> str:
        return self.vm.console.decode(errors="replace")

    def finished(self, vcpu: int) -> bool:
        """Whether ``vcpu`` is done: halted at the runtime's ``rt_done``; an SEV-ES vCPU, whose RIP the
        host cannot see, parked in AP reset hold for good (the BSP at its first hold, an AP at the
        hold after the one the AP jump table released)."""
        v = self.vm.vcpus[vcpu]
        if v.guest_state_protected:
            return v.reset_hold and (vcpu == 0 or v.released)
        done = self.image.symbols.get("rt_done")
        rip = self.vm.vcpus[vcpu].vmcb.rip
        return done is not None and done <= rip < done + 4

    def step(self, vcpu: int = 0, max_exits: int = 1_000_000) -> RunResult:
        """One pass of the hypervisor's run loop on ``vcpu`` (until HLT, a time slice, a crash)."""
        r = self.machine.hv.run(self.vm, vcpu, max_exits=max_exits)
        self.exits += r.exits
        return r

    def service_bounce(self) -> bool:
        """The host side of the bounce-buffer device: answer a pending request; True if there was one."""
        gpa = self.image.symbols.get("__shared_start")
        if gpa is None:
            return False
        try:
            head = self.vm.host_read(gpa, 16)
        except UnmappedError:
            return False
        magic, state, op, length = (int.from_bytes(head[i : i + 4], "little") for i in range(0, 16, 4))
        if magic != BOUNCE_MAGIC or state != _BOUNCE_REQUEST:
            return False
        data = self.vm.host_read(gpa + 16, min(length, 4080))
        if op == _OP_ECHO_UPPER:
            reply = data.upper()
        elif op == _OP_CHECKSUM:
            reply = f"sum={sum(data)}".encode()
        else:
            reply = b"unknown request"
        self.vm.host_write(gpa + 8, (op.to_bytes(4, "little") + len(reply).to_bytes(4, "little") + reply))
        self.vm.host_write(gpa + 4, _BOUNCE_REPLY.to_bytes(4, "little"))
        return True

    def run(self, *, timeout: float = 60.0, on_halt: Callable[[GuestRun, int], bool | None] | None = None,
            echo: Callable[[str], None] | None = None) -> Outcome:
        """Run every vCPU until all are finished, one crashes, or ``timeout`` seconds pass.

        Each HLT that is not the final one gives the host its turn: a pending bounce request is
        answered, then ``on_halt(run, vcpu)`` is called; returning False pauses the run (call
        :meth:`run` again to go on).  ``echo`` receives console output as it appears.
        """
        start = time.monotonic()
        n = len(self.vm.vcpus)
        while True:
            for i in range(n):
                if i in self.halted:
                    continue
                r = self.step(i, max_exits=20_000)  # bounded, so vCPUs take turns and the timeout is seen
                self._echo(echo)
                if self.vm.state is VmState.CRASHED:
                    return Outcome("crashed", self.console, self.vm.crash_reason or r.reason, self._rip(i),
                                   self.exits, time.monotonic() - start)
                if r.reason == "hold":
                    if self.finished(i):
                        self.halted.add(i)
                    continue
                if r.reason == "hlt":
                    if self.finished(i):
                        self.halted.add(i)
                        continue
                    self.service_bounce()
                    if on_halt is not None and on_halt(self, i) is False:
                        self._echo(echo)
                        return Outcome("paused", self.console, "the hypervisor stopped the vCPU at a HLT",
                                       self._rip(i), self.exits, time.monotonic() - start)
                    self._echo(echo)
            if len(self.halted) == n:
                return Outcome("finished", self.console, "", None, self.exits, time.monotonic() - start)
            if time.monotonic() - start > timeout:
                return Outcome("timeout", self.console, f"the guest did not finish within {timeout:g} s",
                               self._rip(0), self.exits, time.monotonic() - start)

    def _rip(self, vcpu: int) -> int | None:
        """Where a vCPU stopped: the engine's record of a triple fault, else the VMCB's RIP (None
        for an SEV-ES vCPU: its RIP is in the encrypted VMSA)."""
        eng = self.engines[vcpu]
        if eng.crash_rip is not None:
            return eng.crash_rip
        v = self.vm.vcpus[vcpu]
        return None if v.guest_state_protected else v.vmcb.rip

    def _echo(self, echo: Callable[[str], None] | None) -> None:
        if echo is not None and len(self.vm.console) > self._printed:
            echo(self.vm.console[self._printed :].decode(errors="replace"))
            self._printed = len(self.vm.console)

    def close(self) -> None:
        for e in self.engines:
            e.close()


def launch_guest(image: GuestImage, *, mode: str = "sev", vcpus: int = 1, memory: int = DEFAULT_MEMORY,
                 machine: Machine | None = None, generation: str = "milan", seed: str | None = None,
                 pool_pages: int = 4096, slice_s: float | None = None, name: str | None = None) -> GuestRun:
    """Create a VM for ``image`` (plain or SEV), load it through the (measured) launch, add vCPUs.

    Everything is checked before anything runs: the mode, the vCPU count, that the image fits the
    guest's memory (with its shared page).
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}: {', '.join(MODES)}")
    if not 1 <= vcpus <= 8:
        raise InputError(f"--vcpus must be between 1 and 8, got {vcpus}")
    if memory <= 0 or memory % PAGE:
        raise InputError(f"guest memory must be a positive multiple of 4 KiB, got {memory:#x}")
    needed = max(image.end, image.symbols.get("__shared_end", image.end))
    if needed > memory:
        raise GuestBuildError(
            f"guest {image.name!r} needs {needed:#x} bytes of guest-physical memory (image of "
            f"{len(image.data)} bytes at GPA {image.base:#x}), more than the VM's {memory:#x}"
        )
    snp = mode == "snp"
    if snp and machine is None and not profile(generation).sev_snp:
        raise InputError(f"--mode snp: {generation} has no SEV-SNP (Milan and later have it)")
    m = machine or build_machine(generation, seed=seed, snp=snp)
    kind = VmKind.PLAIN if mode == "plain" else VmKind.SEV
    es = mode in ("sev-es", "snp")
    if es and not m.hv.sev.caps.es:
        raise InputError(f"--mode {mode}: the {m.profile.product} platform has no SEV-ES")
    if snp and not m.hv.ghcb.hv_features & HvFeature.SNP:
        raise InputError("--mode snp: the machine's platform was not brought up with SEV-SNP "
                         "(build_machine(..., snp=True))")
    vm_type = KvmVmType.SNP_VM if snp else KvmVmType.SEV_ES_VM if es else KvmVmType.DEFAULT_VM
    vm = m.hv.create_vm(name or image.name, memory, kind, vm_type=vm_type)
    if snp:
        KvmSev(m.hv, vm).op(KvmSevCmdId.INIT2, KvmSevInit())  # SNP_ACTIVE in the VMSA features, GHCB v2
    elif es:
        m.hv.sev_init(vm)  # KVM_SEV_INIT2 before the vCPUs, as QEMU does
    slice_s = slice_s if slice_s is not None else (0.2 if vcpus == 1 else 0.02)
    engines = []
    for i in range(vcpus):  # before the launch: an SEV-ES vCPU's state is measured in its VMSA
        state = InitialState(rip=image.entry, regs=(("rsi", i), ("rdi", vcpus)))
        eng = UcEngine(pool_pages=pool_pages, slice_s=slice_s, initial=state, name=f"{vm.name}/{i}")
        v = vm.add_vcpu(eng)
        state.apply(v.vmcb)
        v.arch.segments = {n: Segment(s.selector, s.attrib, s.limit, s.base) for n, s in state.segments().items()}
        engines.append(eng)
    if snp:
        guest_requests(m.hv)  # KVM's SNP guest-request NAE events (the attest guest's path to its firmware)
        measurement = _snp_launch(m, vm, image)
    else:
        measurement = m.hv.launch(vm, [(image.base, image.data)], policy=int(GuestPolicy.ES) if es else 0)
    mmio = image.symbols.get("mmio_page")
    if mmio is not None:  # the guest's device page: emulated MMIO (a reserved-bit NPT entry)
        m.hv.add_mmio(vm, mmio)
    return GuestRun(m, vm, image, engines, measurement)


def _snp_launch(m: Machine, vm: Vm, image: GuestImage) -> bytes:
    """QEMU's SNP launch through KVM: SNP_LAUNCH_START, the image as NORMAL pages, SNP_LAUNCH_FINISH
    (the VMSAs).  Returns b"": an SNP launch digest reaches the owner in the attestation report."""
    kvm = KvmSev(m.hv, vm)
    dev = SevDevice(m.hv)
    data = image.data.ljust(-(-len(image.data) // PAGE) * PAGE, b"\0")
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=SNP_POLICY), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=image.base // PAGE, uaddr=data,
                                                                len=len(data), type=int(SnpPageType.NORMAL)),
           sev_fd=dev)
    # the secrets page and the CPUID page, at the GPAs the runtime reads them from (rt.h)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(
        gfn_start=SNP_SECRETS_GPA // PAGE, uaddr=bytes(PAGE), len=PAGE, type=int(SnpPageType.SECRETS)), sev_fd=dev)
    functions = [SnpCpuidFunction(eax_in=leaf, ecx_in=0, xcr0_in=0, xss_in=0,
                                  **dict(zip(("eax", "ebx", "ecx", "edx"), m.hv.cpuid(leaf, 0), strict=True)))
                 for leaf in SNP_CPUID_LEAVES]
    table = SnpCpuidTable(count=len(functions), fn=tuple(functions) + (SnpCpuidFunction(),) * (
        CPUID_COUNT_MAX - len(functions))).encode()
    kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(
        gfn_start=SNP_CPUID_GPA // PAGE, uaddr=table.ljust(PAGE, b"\0"), len=PAGE, type=int(SnpPageType.CPUID)),
        sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish())
    for v in vm.vcpus[1:]:  # no INIT-SIPI reaches them: the guest starts its APs with AP creation
        v.reset_hold = True
    return b""


def run_guest(guest: str | GuestImage, mode: str = "sev", **kw: Any) -> Outcome:
    """Build (if needed), launch and run a guest to its end; returns the outcome."""
    image = load_image(guest) if isinstance(guest, str) else guest
    timeout = kw.pop("timeout", 60.0)
    run = launch_guest(image, mode=mode, **kw)
    try:
        return run.run(timeout=timeout)
    finally:
        run.close()


# ---- the command ------------------------------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser("run", help="build, launch and run a guest image (real x86-64 code) on the emulated platform",
                       description="Build a bundled guest (or a C file using the guest runtime), load it through "
                                   "the measured launch and run it; its serial console goes to stdout.",
                       epilog="examples:\n  sevemu run --list\n  sevemu run hello\n"
                              "  sevemu run victim --inject-shellcode\n  sevemu run my_guest.c --vcpus 4 --json\n"
                              "guest builds are cached in $SEVEMU_BUILD_DIR (default ~/.cache/sevemu/guests)")
    p.add_argument("guest", nargs="?", help="a bundled guest name (see --list) or a path to a guest .c file")
    p.add_argument("--firmware", type=Path, metavar="PATH",
                   help="boot a firmware flash image (OVMF.fd) from the x86 reset vector instead of a guest "
                        "(docs/ovmf.md): the run prints a boot timeline")
    p.add_argument("--vcpu-type", default="EPYC-Milan", help="--firmware: QEMU -cpu model (default EPYC-Milan)")
    p.add_argument("--until", default="PEI in permanent memory", metavar="MILESTONE",
                   help="--firmware: stop at this milestone: 'protected mode', 'long mode', 'end of SEC', "
                        "'PEI in permanent memory' (the default), 'DXE IPL', 'DXE core entry', 'DXE drivers'")
    p.add_argument("--list", action="store_true", help="list the bundled guests")
    p.add_argument("--mode", choices=MODES, default="sev",
                   help="plain VM, SEV guest, or SEV-ES guest (registers in the encrypted VMSA, exits "
                        "through the GHCB; default sev)")
    p.add_argument("--vcpus", type=positive_int, default=1, help="number of vCPUs, 1 to 8 (default 1)")
    p.add_argument("--generation", choices=GENERATIONS, default="milan", help="CPU generation (default milan)")
    p.add_argument("--memory", type=positive_int, default=None, metavar="MiB",
                   help="guest memory in MiB (default 16; --firmware: RAM, default 256)")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="S",
                   help="give up after this many seconds (default 60)")
    p.add_argument("--seed", help="make the run reproducible (seeds the TRNG and boot randomness)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the image even if a cached build exists")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the console")
    p.add_argument("--inject-shellcode", action="store_true",
                   help="play the malicious hypervisor: at the guest's first HLT overwrite its report() page "
                        "with code of the host's own (the victim guest), then WBINVD")
    p.add_argument("--attack-registers", action="store_true",
                   help="play the malicious hypervisor at the guest's first HLT (the regs guest): read and "
                        "overwrite its registers, change the CPUID answer; under SEV-ES also read its VMSA")
    p.add_argument("--tamper-vmsa", action="store_true",
                   help="SEV-ES: at the guest's first HLT flip one bit of its VMSA's ciphertext in DRAM "
                        "(the next VMRUN fails its checksum)")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.firmware is not None:
        from sevemu.cli.ovmf import run_firmware

        return run_firmware(args)
    if args.memory is None:
        args.memory = DEFAULT_MEMORY // MiB
    if args.list:
        width = max(len(n) for n, _ in list_guests())
        for name, desc in list_guests():
            print(f"{name:<{width}}  {desc}")
        return 0
    if not args.guest:
        raise InputError("name a guest to run (sevemu run --list shows the bundled ones)")
    if not 1 <= args.vcpus <= 8:
        raise InputError(f"--vcpus must be between 1 and 8, got {args.vcpus}")
    image = load_image(args.guest, rebuild=args.rebuild)
    if args.inject_shellcode and "report" not in image.symbols:
        raise InputError(f"--inject-shellcode needs a guest with a report() function (victim), not {image.name!r}")
    run = launch_guest(image, mode=args.mode, vcpus=args.vcpus, memory=args.memory * MiB,
                       generation=args.generation, seed=args.seed)
    info = _launch_info(run)
    if not args.json:
        print(f"sevemu: {info['summary']}", file=sys.stderr)

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.tamper_vmsa and args.mode != "sev-es":
        raise InputError("--tamper-vmsa needs --mode sev-es (only an SEV-ES guest's registers live in a VMSA)")
    on_halt = (_shellcode_attack(args.json) if args.inject_shellcode
               else register_attack(quiet=args.json) if args.attack_registers
               else vmsa_tamper(quiet=args.json) if args.tamper_vmsa else None)
    try:
        out = run.run(timeout=args.timeout, echo=None if args.json else echo, on_halt=on_halt)
    finally:
        run.close()
    verdict = _guest_report_verdict(run, out.console) if out.status == "finished" else None
    if verdict is not None:
        info["report_verified"], line = verdict
        if not args.json:
            print(f"sevemu: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps({**info, "status": out.status, "console": out.console, "reason": out.reason,
                          "rip": out.rip, "exits": out.exits, "seconds": round(out.seconds, 3)}, indent=2))
    elif out.status == "finished":
        print(f"sevemu: {image.name} finished ({out.exits} exits, {out.seconds:.2f} s)", file=sys.stderr)
    else:
        where = f" at RIP {out.rip:#x}" if out.rip is not None else ""
        print(f"sevemu: {image.name} {out.status}{where}: {out.reason}", file=sys.stderr)
    return 0 if out.status == "finished" and (verdict is None or verdict[0]) else 1


def _guest_report_verdict(run: GuestRun, console: str) -> tuple[bool, str] | None:
    """The host's verification of an attestation report the guest printed (the attest guest), or None."""
    from sevemu.cli.guest_report import guest_report, verify_guest_report
    from sevemu.owner.snpverify import SnpCheckError

    report = guest_report(console)
    if report is None:
        return None
    try:
        got = verify_guest_report(run.machine, report, measurement=_expected_snp_digest(run))
    except (SnpCheckError, InputError) as exc:
        return False, f"the guest's attestation report does NOT verify: {exc}"
    return True, (f"the guest's attestation report verifies (VCEK of the emulated AMD's {got.generation} chain, "
                  f"REPORT_DATA the guest's, MEASUREMENT {got.report.measurement.hex()[:16]}... the launch "
                  "digest the owner computes for this image)")


# x86-64, position independent: lea msg(%rip),%rsi; mov $0x3f8,%dx; 1: lodsb; test %al,%al; jz 2f;
# out %al,%dx; jmp 1b; 2: hlt; jmp 2b; msg: ...
SHELLCODE = bytes.fromhex("488d350f00000066baf803ac84c07403eeebf8f4ebfd") + b"PWNED by the hypervisor\n\0"


def _shellcode_attack(quiet: bool) -> Callable[[GuestRun, int], bool]:
    """What a malicious hypervisor does between two ticks of the victim: its own code over report()."""
    state = {"done": False}

    def attack(run: GuestRun, vcpu: int) -> bool:
        if state["done"]:
            # Halting again after the injection: under SEV the guest never gets here (it faults on
            # the garbage it fetches); without SEV this is the attacker's code halting -- pause, the
            # point is made (otherwise the run would wait for a victim that no longer exists).
            return "PWNED" not in run.console
        gpa = run.image.symbol("report")
        run.vm.host_write(gpa, SHELLCODE)
        run.machine.soc.wbinvd_all()
        state["done"] = True
        if not quiet:
            print(f"sevemu: hypervisor: wrote {len(SHELLCODE)} bytes of its own code over report() at GPA "
                  f"{gpa:#x} and flushed the caches", file=sys.stderr)
        return True

    return attack


FORGED_R12 = 0xBAD0_BAD0_BAD0_BAD0
FORGED_CPUID0 = (0x1337, 0, 0, 0)


def register_attack(quiet: bool = False, log: list[str] | None = None) -> Callable[[GuestRun, int], bool]:
    """What a malicious hypervisor does at the guest's first HLT (the ``regs`` guest keeps its key in
    R12 there): read the registers, overwrite R12, make CPUID(0) answer 0x1337; for an SEV-ES
    guest, also read its VMSA page from DRAM.  Each finding goes to ``log`` (and stderr)."""
    state = {"done": False}
    out = log if log is not None else []

    def say(text: str) -> None:
        out.append(text)
        if not quiet:
            print(f"sevemu: hypervisor: {text}", file=sys.stderr)

    def attack(run: GuestRun, vcpu: int) -> bool:
        if state["done"]:
            return True
        state["done"] = True
        v = run.vm.vcpus[vcpu]
        say(f"R12 in the VMCB = {v.vmcb.regs['r12']:#018x}, RIP = {v.vmcb.rip:#x}")
        v.vmcb.regs["r12"] = FORGED_R12
        say(f"wrote R12 = {FORGED_R12:#x} into the VMCB")
        run.machine.hv.cpuid_overrides[(0, 0)] = FORGED_CPUID0
        say("CPUID(0) now answers EAX = 0x1337")
        if run.vm.es:
            hv = run.machine.hv
            hv.soc.wbinvd_all()  # whatever the guest's lines hold, DRAM gets it
            page = hv.core.host_read(run.vm.vmsa_pages[vcpu], 4096)
            say(f"VMSA page in DRAM (first 32 bytes): {page[:32].hex()}")
        return True

    return attack


def vmsa_tamper(quiet: bool = False) -> Callable[[GuestRun, int], bool]:
    """SEV-ES: at the guest's first HLT flip one bit of its VMSA's ciphertext in DRAM (host
    interfaces only: WBINVD, a read, a write and CLFLUSH in the host's domain)."""
    state = {"done": False}

    def tamper(run: GuestRun, vcpu: int) -> bool:
        if state["done"]:
            return True
        state["done"] = True
        hv = run.machine.hv
        spa = run.vm.vmsa_pages[vcpu]
        hv.soc.wbinvd_all()
        byte = hv.core.host_read(spa + 0x178, 1)[0]  # inside RIP's block
        hv.core.host_write(spa + 0x178, bytes([byte ^ 1]))
        hv.core.clflush(spa + 0x178)
        if not quiet:
            print(f"sevemu: hypervisor: flipped one bit of the VMSA ciphertext at SPA {spa + 0x178:#x}",
                  file=sys.stderr)
        return True

    return tamper


def _launch_info(run: GuestRun) -> dict[str, Any]:
    vm, image = run.vm, run.image
    mode = "snp" if vm.snp else "sev-es" if vm.es else "sev" if vm.sev else "plain"
    info: dict[str, Any] = {"guest": image.name, "mode": mode, "asid": vm.asid,
                            "vcpus": len(vm.vcpus), "image_bytes": len(image.data), "image_sha256": image.digest,
                            "platform": run.machine.profile.product}
    if vm.snp:  # the launch digest reaches the owner in the attestation report, not through the host
        info["summary"] = (f"{image.name}: SEV-SNP guest on {info['platform']} (ASID {vm.asid}), image "
                           f"{len(image.data)} bytes sha256 {image.digest[:16]}..., policy {SNP_POLICY:#x}; "
                           "launch digest: in the guest's attestation report")
    elif vm.sev:
        info["measurement"] = run.measurement[:32].hex()
        info["measurement_verified"] = _verify(run)
        info["summary"] = (f"{image.name}: {'SEV-ES' if vm.es else 'SEV'} guest on {info['platform']} (ASID {vm.asid}), image "
                           f"{len(image.data)} bytes sha256 {image.digest[:16]}..., launch measurement "
                           f"{info['measurement'][:16]}... {'verified' if info['measurement_verified'] else 'MISMATCH'}")
    else:
        info["summary"] = f"{image.name}: plain VM on {info['platform']} (ASID {vm.asid}), image {len(image.data)} bytes"
    return info


def _expected_vmsas(run: GuestRun) -> list[bytes]:
    """The owner's side of an SEV-ES or SNP launch: the VMSA of every vCPU in the documented initial
    state, made with the owner's own ``sev_es_sync_vmsa`` (KVM_SEV_INIT2 VM; no VMSA features for
    SEV-ES, SNP_ACTIVE for SNP as KVM sets it for an SNP VM)."""
    from sevemu.abi.vmsa import SevFeatures, VmcbSeg
    from sevemu.owner.vmsa import DR7_FIXED_1, VcpuState, sev_es_sync_vmsa
    from sevemu.owner.vmsa import KvmVmType as OwnerVmType

    n = len(run.vm.vcpus)
    pages = []
    for i in range(n):
        state = InitialState(rip=run.image.entry, regs=(("rsi", i), ("rdi", n)))
        segments = {name: VmcbSeg(selector=g.selector, attrib=g.attrib, limit=g.limit, base=g.base)
                    for name, g in state.segments().items()}
        regs = dict.fromkeys(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                              "r12", "r13", "r14", "r15"), 0)
        regs.update(state.regs)
        vcpu = VcpuState(segments=segments, vmcb={"efer": 0, "cr4": 0, "cr3": 0, "cr0": 0x11, "dr7": DR7_FIXED_1,
                                                  "rflags": 0x2, "g_pat": 0x0007040600070406},
                         regs=regs, rip=state.rip)
        if run.vm.snp:
            page = sev_es_sync_vmsa(vcpu, vm_type=OwnerVmType.SNP_VM, vmsa_features=int(SevFeatures.SNP_ACTIVE))
        else:
            page = sev_es_sync_vmsa(vcpu, vm_type=OwnerVmType.SEV_ES_VM)
        pages.append(page.encode())
    return pages


def _expected_snp_digest(run: GuestRun) -> bytes:
    """The owner's SNP launch digest of ``run``'s launch (:func:`_snp_launch`): the image as NORMAL
    pages, the secrets and CPUID pages, then one VMSA per vCPU -- computed with the owner's
    calculator, never read from the firmware."""
    from sevemu.owner.snp_measurement import SnpLaunchDigest

    ld = SnpLaunchDigest(record=False)
    ld.normal(run.image.base, run.image.data.ljust(-(-len(run.image.data) // PAGE) * PAGE, b"\0"))
    ld.secrets(SNP_SECRETS_GPA)
    ld.cpuid(SNP_CPUID_GPA)
    for page in _expected_vmsas(run):
        ld.vmsa(page)
    return ld.digest


def _verify(run: GuestRun) -> bool:
    """What the guest owner checks: LAUNCH_MEASURE against the image it expects to run.

    Without an owner session the firmware's TIK is the closed channel's all-zero key (model choice,
    see docs/firmware.md), so the check shows the digest covers exactly this image.
    """
    from sevemu.owner.measurement import expected_launch_digest, verify_measurement

    st = run.machine.hv.platform_status()
    vmsas = _expected_vmsas(run) if run.vm.es else []
    try:
        verify_measurement(run.measurement, bytes(16), st.api_major, st.api_minor, st.build, run.vm.policy,
                           expected_launch_digest([run.image.data], vmsas))
    except SevemuError:
        return False
    return True
