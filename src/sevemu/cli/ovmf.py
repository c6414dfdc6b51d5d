"""``sevemu run --firmware OVMF.fd --mode plain|sev|sev-es|snp``: real firmware from the x86 reset vector.

The VMM side (:func:`sevemu.hypervisor.ovmf.launch_ovmf`) launches the flash image as QEMU/KVM do; the
launch digest is then checked against the guest owner's calculator (:mod:`sevemu.owner.measurement`
for SEV/SEV-ES, :mod:`sevemu.owner.snp_measurement` for SNP, which equals ``sev-snp-measure``).  The
BSP runs from the reset vector on the Unicorn vCPU (real mode, CS base 0xFFFF0000: ``hw/uc/reset.py``)
with guest memory encrypted as for every other guest, on a QEMU Q35 PC's devices
(:mod:`sevemu.hypervisor.devices`).

:class:`OvmfBoot` runs it and keeps a **timeline** of what the platform saw.  It is the emulator's
own instrumentation (a hardware debugger's view, not the host's: under SEV-ES/SNP the hypervisor sees
none of the registers):

* mode switches -- the first instruction fetch (a TLB fill of the vCPU) in 32-bit protected mode
  (CR0.PE) and in long mode (EFER.LMA), with the time since reset and the exits so far;
* end of SEC -- the first instruction fetched from the PEI firmware volume (``PEI_FV``: OvmfPkgX64's
  ``PcdOvmfPeiMemFvBase`` 0x820000, up to the DXE volume at 0x900000), or, should no fetch fill show
  it, the first exit with RIP there;
* PEI's switch to permanent memory -- the first exit or instruction-fetch TLB fill (after SEC) at which
  the stack pointer is in system RAM (below the RAM size, outside OVMF's SEC/PEI memory ``TEMP_RAM``)
  after it was in the temporary RAM (fills too: a module entered between two exits is never listed
  before the switch that preceded it);
* modules entered -- after the end of SEC, each page the vCPU starts fetching from in RAM is matched
  against the entry code of the image's PEI/DXE modules (:mod:`sevemu.cli.ovmf_fv`: loaded images
  sit at page-aligned addresses, so an entry keeps its in-page offset); the first entry of each module
  is kept, and three are milestones: ``DXE IPL`` (the DxeIpl PEIM, loaded to permanent memory),
  ``DXE core entry`` (the DXE core, which DxeIpl loaded and jumped to) and ``DXE drivers`` (the first
  DXE driver the DXE dispatcher starts).  Pages are matched at the next exit (a time slice at most),
  never inside the engine's TLB fill; modules executed in place from a volume (SEC, the PEI core
  before the switch) are not seen;
* counters: exits by code, #VC by error code, GHCB calls (MSR protocol and NAE events), PVALIDATEs,
  page-state changes (PSC requests and pages), devices touched (the device bus's counters).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sevemu._util.units import PAGE, PAGE_2M, MiB
from sevemu.abi.ghcb import PSC_MAX_ENTRY, GhcbMsrInfo, PscEntry, SwExitCode
from sevemu.cli.ovmf_fv import ModuleMap, ovmf_modules
from sevemu.errors import InputError, SevemuError
from sevemu.hw.ucengine import UcEngine
from sevemu.hypervisor.ovmf import DEFAULT_RAM, MODES, OvmfLaunch, launch_ovmf, parse_ovmf
from sevemu.hypervisor.vm import VmState
from sevemu.scenario import Machine, build_machine

__all__ = ["PEI_FV", "TEMP_RAM", "BootResult", "Event", "OvmfBoot", "ovmf_digest_check"]

PEI_FV: Final = (0x82_0000, 0x90_0000)
"""OvmfPkgX64's PEI firmware volume once SEC decompressed it (PcdOvmfPeiMemFvBase, up to the DXE FV)."""
TEMP_RAM: Final = (0x80_0000, 0x90_0000)
"""OVMF's SEC/PEI memory (MEMFD: page tables, GHCB, secrets/CPUID pages, the temporary RAM, the PEI FV)."""
MILESTONES: Final = ("protected mode", "long mode", "end of SEC", "PEI in permanent memory", "DXE IPL",
                      "DXE core entry", "DXE drivers")
_MAX_CHECKS: Final = 3
"""Times a page is read for module entries: its first fetches (a page the loader reuses for another
image is seen again), never every refill of a hot page (each read is a data fill of the vCPU's TLB,
which costs that page its execute permission until the next fetch fill)."""
_MODULE_MILESTONES: Final = {"PEIM:DxeIpl": "DXE IPL", "DXE core": "DXE core entry", "DXE driver": "DXE drivers"}
_RSP: Final = 7  # index of RSP in the engine's register batch (GPRS order)
_RIP: Final = 16


@dataclass(frozen=True)
class Event:
    """One timeline entry."""

    what: str
    seconds: float
    """Wall-clock seconds since the BSP's first VMRUN."""
    exits: int
    """#VMEXITs of the BSP so far."""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.what, "seconds": round(self.seconds, 4), "exits": self.exits, "detail": self.detail}


@dataclass
class BootResult:
    """How far a boot got, and what happened on the way."""

    mode: str
    status: str
    """``reached`` (the requested milestone), ``crashed``, ``timeout``."""
    reason: str
    seconds: float
    events: list[Event]
    exits: dict[str, int]
    vc: dict[str, int]
    ghcb: dict[str, int]
    pvalidates: int
    psc: dict[str, int]
    devices: dict[str, int]
    launch: dict[str, Any] = field(default_factory=dict)
    rip: int | None = None
    rsp: int | None = None
    modules: list[tuple[str, str, float]] = field(default_factory=list)
    """(name, kind, seconds) of each module entered, in order (first entry only)."""

    @property
    def last_milestone(self) -> str:
        got = {e.what for e in self.events}
        return next((m for m in reversed(MILESTONES) if m in got), "reset vector")

    def reached(self, what: str) -> bool:
        return any(e.what == what for e in self.events)

    def milestone(self, what: str) -> Event | None:
        return next((e for e in self.events if e.what == what), None)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 3),
                "launch": self.launch, "timeline": [e.as_dict() for e in self.events], "exits": self.exits,
                "vc_by_exit_code": self.vc, "ghcb_calls": self.ghcb, "pvalidates": self.pvalidates,
                "page_state_changes": self.psc, "devices_touched": self.devices,
                "rip": None if self.rip is None else hex(self.rip), "rsp": None if self.rsp is None else hex(self.rsp),
                "last_milestone": self.last_milestone,
                "modules_entered": [{"module": n, "kind": k, "seconds": round(t, 3)} for n, k, t in self.modules]}

    def lines(self) -> list[str]:
        out = [f"OVMF as a {self.mode} guest: {self.status}" + (f" ({self.reason})" if self.reason else "")
               + f" after {self.seconds:.1f} s; last milestone: {self.last_milestone}"]
        if self.launch:
            out.append(f"  launch: {self.launch.get('summary', '')}")
        for e in self.events:
            out.append(f"  {e.seconds:9.3f} s  exit {e.exits:>8,}  {e.what}" + (f": {e.detail}" if e.detail else ""))
        for title, table in (("exits", self.exits), ("#VC by exit code", self.vc), ("GHCB calls", self.ghcb),
                             ("page-state changes", self.psc), ("devices touched", self.devices)):
            if table:
                out.append(f"  {title}: " + ", ".join(f"{k} {v:,}" for k, v in table.items()))
        if self.pvalidates:
            out.append(f"  PVALIDATEs: {self.pvalidates:,}")
        if self.modules:
            names = [n for n, _, _ in self.modules]
            out.append(f"  modules entered ({len(names)}): " + ", ".join(names[-12:]) + (" (the last 12)" if len(names) > 12 else ""))
        return out


def ovmf_digest_check(boot: OvmfBoot) -> dict[str, Any]:
    """The guest owner's check of the launch: the firmware's digest against the owner's calculator
    (SEV/SEV-ES: LAUNCH_MEASURE verified with the expected digest; SNP: the launch digest against
    :func:`~sevemu.owner.snp_measurement.ovmf_launch_digest`, i.e. sev-snp-measure's)."""
    from sevemu.owner import vmsa as owner_vmsa
    from sevemu.owner.measurement import expected_launch_digest, verify_measurement
    from sevemu.owner.snp_measurement import ovmf_launch_digest

    launch, mode, image = boot.launch, boot.mode, boot.launch.image.data
    n = len(launch.vm.vcpus)
    sig = owner_vmsa.vcpu_signature(boot.vcpu_type)
    if mode == "plain":
        return {"summary": f"plain VM, flash of {len(image) // 1024} KiB at {launch.image.gpa:#x} (no measurement)"}
    if mode == "snp":
        from sevemu.firmware.snp import snp_state

        ours = snp_state(boot.machine.firmware).guests[launch.vm.snp_context].ld
        theirs = ovmf_launch_digest(image, n, sig).digest
        ok = ours == theirs
        return {"launch_digest": ours.hex(), "owner_digest": theirs.hex(), "verified": ok,
                "summary": f"SNP launch digest {ours.hex()[:16]}... {'equals' if ok else 'DIFFERS FROM'} the owner's "
                           "calculator (sev-snp-measure)"}
    vmsas = (owner_vmsa.ovmf_vmsa_pages(image, n, cpu_signature=sig, vm_type=owner_vmsa.KvmVmType.SEV_ES_VM)
             if mode == "sev-es" else [])
    expected = expected_launch_digest([image], vmsas)
    st = boot.machine.hv.platform_status()
    try:
        verify_measurement(launch.measurement, bytes(16), st.api_major, st.api_minor, st.build, launch.policy, expected)
        ok = True
    except SevemuError:
        ok = False
    return {"measurement": launch.measurement[:32].hex(), "owner_digest": expected.hex(), "verified": ok,
            "summary": f"{mode.upper()} LAUNCH_MEASURE {launch.measurement[:8].hex()}... "
                       f"{'verified' if ok else 'MISMATCH'} against the owner's digest {expected.hex()[:16]}..."}


class OvmfBoot:
    """An OVMF guest launched on a fresh emulated host, ready to run from its reset vector."""

    def __init__(self, image: bytes | str | Path, mode: str, *, vcpus: int = 1, vcpu_type: str = "EPYC-Milan",
                 ram: int = DEFAULT_RAM, generation: str = "milan", seed: str | None = "ovmf",
                 machine: Machine | None = None, slice_s: float = 0.2) -> None:
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: {', '.join(MODES)}")
        parsed = parse_ovmf(data)
        parsed.check_mode(mode)
        if not 1 <= vcpus <= 8:
            raise InputError(f"--vcpus must be between 1 and 8, got {vcpus}")
        self.mode = mode
        self.vcpu_type = vcpu_type
        self.ram = ram
        self.machine = machine or build_machine(generation, seed=seed, snp=mode == "snp")
        self.engines = [UcEngine(pool_pages=8192, slice_s=slice_s, name=f"ovmf/{i}", nested_cache=True)
                        for i in range(vcpus)]
        self.launch: OvmfLaunch = launch_ovmf(self.machine.hv, parsed, mode, self.engines, ram=ram,
                                              vcpu_type=vcpu_type)
        self.launch_info = ovmf_digest_check(self)
        self.events: list[Event] = []
        self.ghcb: Counter[str] = Counter()
        self.psc: Counter[str] = Counter()
        self._t0: float | None = None
        self._in_temp = False
        self._modules = ModuleMap(ovmf_modules(data))
        self._fetched: list[tuple[int, float, int]] = []
        self.modules: list[tuple[str, str, float]] = []
        self._entered: set[str] = set()
        self._after_sec = False
        self._checks: dict[int, int] = {}
        bsp = self.engines[0]
        bsp.fetch_observer = self._on_fetch
        self._count_ghcb()

    # ---- observation -------------------------------------------------------------------------------
    def _now(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def _event(self, what: str, detail: str = "") -> None:
        if not any(e.what == what for e in self.events):
            self.events.append(Event(what, self._now(), self.engines[0].stats.exits, detail))

    def _on_fetch(self, vaddr: int, cr0: int, efer: int, rsp: int) -> None:
        if cr0 & 1:
            self._event("protected mode", f"first fetch at {vaddr:#x} with CR0.PE")
        if cr0 >> 31 and efer & 0x100:
            self._event("long mode", f"first fetch at {vaddr:#x} with EFER.LMA")
        in_pei_fv = PEI_FV[0] <= vaddr < PEI_FV[1]
        if in_pei_fv:
            self._event("end of SEC", f"first fetch from the PEI firmware volume at {vaddr:#x}")
            self._after_sec = True
        if not self._after_sec:
            return
        self._watch_stack(rsp, f"seen at a fetch fill at {vaddr:#x}")  # at fetch fills too: exits can be far apart (a module entered
        # between two exits must not be seen before the stack switch that preceded it)
        if not in_pei_fv and MiB <= vaddr < self.ram and self._modules.modules and \
                self._checks.get(vaddr & ~(PAGE - 1), 0) < _MAX_CHECKS:  # matched at the next exit
            self._fetched.append((vaddr, self._now(), self.engines[0].stats.exits))

    def _match_fetched(self) -> None:
        eng, todo = self.engines[0], self._fetched
        self._fetched = []
        done: set[int] = set()
        for vaddr, seconds, exits in todo:
            base = vaddr & ~(PAGE - 1)
            if base in done:
                continue
            done.add(base)
            self._checks[base] = self._checks.get(base, 0) + 1
            page = eng.read_virt(base, PAGE)
            for m in self._modules.entered(page) if page else ():
                key = f"{m.kind}:{m.name}"
                if key in self._entered:
                    continue
                self._entered.add(key)
                self.modules.append((m.name, m.kind, seconds))
                what = _MODULE_MILESTONES.get(key) or _MODULE_MILESTONES.get(m.kind)
                if what and not any(e.what == what for e in self.events):
                    self.events.append(Event(what, seconds, exits, f"{m.name} entered (page {vaddr:#x})"))

    def _on_exit(self) -> None:
        if self._fetched:
            self._match_fetched()
        vals = self.engines[0].vals
        rsp, rip = vals[_RSP], vals[_RIP]
        if PEI_FV[0] <= rip < PEI_FV[1]:  # (the fetch fill is seen first; this catches a fill it missed)
            self._event("end of SEC", f"at an exit in the PEI firmware volume at {rip:#x}")
        self._watch_stack(rsp, f"seen at an exit, RIP {rip:#x}")

    def _watch_stack(self, rsp: int, where: str) -> None:
        if TEMP_RAM[0] <= rsp <= TEMP_RAM[1]:
            self._in_temp = True
        elif self._in_temp and 1 * MiB <= rsp < self.ram:
            self._event("PEI in permanent memory", f"stack moved from the temporary RAM to {rsp:#x} "
                                                    f"({where})")

    def _count_ghcb(self) -> None:
        """Count the GHCB calls the hypervisor answers (its handler tables, wrapped for this VM's host)."""
        handler = self.machine.hv.ghcb
        for code, mfn in list(handler.msr_table.items()):
            handler.msr_table[code] = self._counted_msr(f"MSR {_name(GhcbMsrInfo, code)}", mfn)
        for code, nfn in list(handler.nae_table.items()):
            handler.nae_table[code] = self._counted_nae(f"NAE {_name(SwExitCode, code)}", int(code), nfn)

    def _counted_msr(self, name: str, fn: Any) -> Any:
        def call(vm: Any, vcpu: Any, msr: int) -> Any:
            self.ghcb[name] += 1
            if msr & 0xFFF == 0x014:  # SNP page state change request (MSR protocol): one page
                self.psc["MSR protocol requests"] += 1
                self.psc["pages"] += 1
            return fn(vm, vcpu, msr)
        return call

    def _counted_nae(self, name: str, code: int, fn: Any) -> Any:
        def call(ex: Any) -> Any:
            self.ghcb[name] += 1
            if code == int(SwExitCode.PSC):
                self.psc["NAE requests"] += 1
                try:
                    self.psc["pages"] += _psc_pages(self.launch.vm.host_page(ex.gpa).read(0x800, 8 + 8 * PSC_MAX_ENTRY))
                except SevemuError:
                    pass
            return fn(ex)
        return call

    # ---- running -----------------------------------------------------------------------------------
    def run(self, until: str = "PEI in permanent memory", timeout: float = 120.0) -> BootResult:
        """Run the BSP until the milestone ``until`` (one of :data:`MILESTONES`), a crash, or ``timeout``
        seconds."""
        if until not in MILESTONES:
            raise InputError(f"unknown milestone {until!r}: {', '.join(MILESTONES)}")
        hv, vm = self.machine.hv, self.launch.vm
        if self._t0 is None:
            self._t0 = time.monotonic()
        status, reason = "timeout", f"{until} not reached within {timeout:g} s"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = hv.run(vm, 0, max_exits=1)
            self._on_exit()
            if vm.state is VmState.CRASHED:
                status, reason = "crashed", vm.crash_reason or r.reason
                break
            if r.reason == "hlt" and not vm.vcpus[0].guest_state_protected:
                pass  # a plain/SEV HLT returns to the VMM; the guest continues at the next VMRUN
            if r.reason == "hold":
                status, reason = "halted", "the BSP parked in AP reset hold"
                break
            if any(e.what == until for e in self.events):
                status, reason = "reached", ""
                break
        return self.result(status, reason)

    def result(self, status: str, reason: str) -> BootResult:
        eng = self.engines[0]
        if self._fetched and not eng.closed:
            self._match_fetched()
        stats = eng.stats
        bus = self.launch.vm.devices
        return BootResult(
            mode=self.mode, status=status, reason=reason, seconds=self._now(),
            events=sorted(self.events, key=lambda e: e.seconds),
            exits=dict(sorted(stats.by_reason.items())),
            vc={_name(SwExitCode, c): n for c, n in sorted(stats.vc_by_code.items())},
            ghcb=dict(sorted(self.ghcb.items())), pvalidates=stats.pvalidates, psc=dict(self.psc),
            devices=dict(sorted(bus.touched().items())), launch=self.launch_info,
            rip=None if eng.closed else eng.vals[_RIP], rsp=None if eng.closed else eng.vals[_RSP],
            modules=list(self.modules))

    def close(self) -> None:
        self.machine.hv.destroy(self.launch.vm)


def _psc_pages(desc: bytes) -> int:
    """4 KiB pages a GHCB page-state-change descriptor (the shared buffer: header, entries) asks
    for, from its current entry to its end entry: 512 for a 2 MiB entry."""
    cur, end = int.from_bytes(desc[0:2], "little"), int.from_bytes(desc[2:4], "little")
    pages = 0
    for i in range(cur, min(end, PSC_MAX_ENTRY - 1) + 1):
        entry = PscEntry.from_int(int.from_bytes(desc[8 + 8 * i : 16 + 8 * i], "little"))
        pages += PAGE_2M // PAGE if entry.pagesize else 1
    return pages


_VC_NAMES: Final = {0x404: "PAGE_NOT_VALIDATED"}
"""#VC error codes that are no SW_EXITCODE (APM2 15.36.10: an SNP guest's access to a page it did not validate)."""


def _name(enum_type: Any, code: int) -> str:
    try:
        return str(enum_type(code).name)
    except ValueError:
        return _VC_NAMES.get(code, f"{code:#x}") if enum_type is SwExitCode else f"{code:#x}"


def run_firmware(args: Any) -> int:
    """``sevemu run --firmware PATH``: launch, run to the milestone, print the timeline (or ``--json``)."""
    import json
    import sys

    from sevemu.cli.ovmf_fetch import resolve_firmware

    if args.guest:
        raise InputError("give either a guest or --firmware, not both")
    args.firmware = resolve_firmware(args.firmware)
    if not args.firmware.is_file():
        raise InputError(f"no firmware image at {args.firmware} (Debian: apt-get install ovmf; or `sevemu ovmf "
                         "fetch` and --firmware trixie)")
    ram = (args.memory or DEFAULT_RAM // MiB) * MiB
    boot = OvmfBoot(args.firmware, args.mode, vcpus=args.vcpus, vcpu_type=args.vcpu_type, ram=ram,
                    generation=args.generation, seed=args.seed or "ovmf")
    try:
        if not args.json:
            print(f"sevemu: {boot.launch_info['summary']}", file=sys.stderr)
        result = boot.run(until=args.until, timeout=args.timeout)
    finally:
        boot.close()
    if args.json:
        print(json.dumps({"firmware": str(args.firmware), **result.as_dict()}, indent=2))
    else:
        print("\n".join(result.lines()))
    verified = boot.launch_info.get("verified", True)
    return 0 if result.status == "reached" and verified else 1
