"""``sevemu bench ovmf``: OVMF from the reset vector to PEI on the vCPU in each mode, beside the same
image on a bare Unicorn with the same device models, in the same run.

For each mode (plain, SEV, SEV-ES, SNP by default) a fresh host launches Debian's ``OVMF.fd``
(:class:`sevemu.cli.ovmf.OvmfBoot`) and the BSP runs until the end of SEC (the first fetch from the PEI
firmware volume) and then until PEI's switch to permanent memory.  The baseline is
:class:`sevemu.hw.ucengine.BareFirmware`: flat memory, Unicorn's own page walk, the same Q35 device
models on its IN/OUT hooks.  SEC is where nearly all instructions are (LZMA decompression of the
firmware volumes); their number is counted once on the bare Unicorn (Unicorn's counter, in chunks of
one million, a separate untimed pass), and instructions per second are that count over each run's
time to the end of SEC.  A mode that stops before a milestone reports how far it got: ``reached`` is
the last milestone of its run, and every mode is compared with the bare baseline on what both reached
(SEC's instructions per second for all; the time from reset to PEI's switch where the mode got there --
Debian 12's OVMF terminates itself under SNP before it, ``docs/ovmf.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from sevemu._util.units import MiB
from sevemu.cli.common import emit
from sevemu.cli.ovmf import PEI_FV, TEMP_RAM, OvmfBoot
from sevemu.errors import InputError
from sevemu.hw.ucengine import BareFirmware
from sevemu.hypervisor.devices import DeviceBus, install_pc
from sevemu.hypervisor.ovmf import DEFAULT_RAM, MODES

__all__ = ["bare_baseline", "register_ovmf", "run_ovmf_bench"]

DEFAULT_OVMF = Path("/usr/share/ovmf/OVMF.fd")


def register_ovmf(bsub: Any) -> None:
    """Add ``ovmf`` to the ``sevemu bench`` sub-commands."""
    p = bsub.add_parser("ovmf", help="OVMF reset vector to PEI in each mode vs the same image on bare Unicorn",
                        epilog="examples:\n  sevemu bench ovmf\n  sevemu bench ovmf --modes plain,snp --json")
    p.add_argument("--ovmf", default=str(DEFAULT_OVMF), metavar="PATH",
                   help="the OVMF image, or a suite `sevemu ovmf fetch` got (trixie) (default: Debian's "
                        "/usr/share/ovmf/OVMF.fd)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: all four)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S", help="per run (default 300)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_ovmf_bench)


def _in_permanent(ram: int) -> Any:
    seen = {"temp": False}

    def done(esp: int) -> bool:
        if TEMP_RAM[0] <= esp <= TEMP_RAM[1]:
            seen["temp"] = True
            return False
        return seen["temp"] and MiB <= esp < ram

    return done


def bare_baseline(image: bytes, ram: int, timeout: float) -> dict[str, Any]:
    """Seconds from reset to the end of SEC and to PEI's stack switch on a bare Unicorn, and SEC's
    instruction count (a second, counting pass)."""
    bus = DeviceBus()
    install_pc(bus, ram=ram)
    bare = BareFirmware(image, ram, bus.io_read, bus.io_write)
    c0 = time.process_time()
    cpu_pei = None
    try:
        t_sec = bare.run_until_range(*PEI_FV, timeout)
        cpu_sec = time.process_time() - c0
        t_pei = bare.run_until_stack(_in_permanent(ram), timeout) if t_sec is not None else None
        if t_pei is not None:
            cpu_pei = time.process_time() - c0
    finally:
        bare.close()
    bus2 = DeviceBus()
    install_pc(bus2, ram=ram)
    counter = BareFirmware(image, ram, bus2.io_read, bus2.io_write)
    try:
        count = counter.count_until_range(*PEI_FV)
    finally:
        counter.close()
    return {"sec_s": t_sec, "pei_s": None if t_pei is None or t_sec is None else t_sec + t_pei,
            "sec_cpu_s": cpu_sec if t_sec is not None else None, "pei_cpu_s": cpu_pei, "sec_instructions": count}


def _mode_run(image: bytes, mode: str, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    boot = OvmfBoot(image, mode)
    launch_s = time.perf_counter() - t0
    c0 = time.process_time()
    cpu_sec = cpu_pei = None
    try:
        r = boot.run(until="end of SEC", timeout=timeout)
        if r.status == "reached":
            cpu_sec = time.process_time() - c0  # (at the exit after the first fetch from the PEI volume)
            r = boot.run(until="PEI in permanent memory", timeout=timeout)
            if r.status == "reached":
                cpu_pei = time.process_time() - c0
    finally:
        boot.close()
    sec, pei = r.milestone("end of SEC"), r.milestone("PEI in permanent memory")
    events = [e.what for e in r.events]
    return {"launch_s": launch_s, "verified": boot.launch_info.get("verified"), "status": r.status,
            "reason": r.reason, "sec_s": sec.seconds if sec else None, "pei_s": pei.seconds if pei else None,
            "sec_cpu_s": cpu_sec, "pei_cpu_s": cpu_pei, "reached": events[-1] if events else "reset", "milestones": events, "exits": sum(r.exits.values()),
            "vc": sum(r.vc.values()), "pvalidates": r.pvalidates}


def image_label(path: Path, image: bytes) -> str:
    """Which image: its path, size and SHA256, and the Debian package version when ``sevemu ovmf
    fetch`` put it there (its ``manifest.json`` lists the file)."""
    digest = hashlib.sha256(image).hexdigest()
    label = f"{path} ({len(image) // 1024} KiB, SHA256 {digest[:16]}"
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        if manifest.get("files", {}).get(path.name) == digest:
            label += f", Debian ovmf {manifest['version']}"
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return label + ")"


def run_ovmf_bench(args: argparse.Namespace) -> int:
    from sevemu.cli.ovmf_fetch import resolve_firmware

    args.ovmf = resolve_firmware(args.ovmf)
    if not args.ovmf.is_file():
        raise InputError(f"no OVMF image at {args.ovmf} (Debian: apt-get install ovmf; or `sevemu ovmf fetch` "
                         "and --ovmf trixie)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise InputError(f"unknown mode {m!r}: {', '.join(MODES)}")
    image = args.ovmf.read_bytes()
    label = image_label(args.ovmf, image)
    load = [os.getloadavg()[0]]
    bare = bare_baseline(image, DEFAULT_RAM, args.timeout)
    count = bare["sec_instructions"]
    runs = {m: _mode_run(image, m, args.timeout) for m in modes}
    load.append(os.getloadavg()[0])
    lines = [f"OVMF {label}, reset -> end of SEC -> PEI in permanent memory",
             (f"  (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: wall-clock figures depend on "
              "machine load, CPU seconds of this process much less)")]

    def rate(seconds: float | None) -> float | None:
        return count / seconds if count and seconds else None

    bare_rate = rate(bare["sec_s"])
    lines.append(f"  bare Unicorn: end of SEC {_s(bare['sec_s'])}, PEI in permanent memory {_s(bare['pei_s'])}, "
                 f"SEC = {count or 0:,} instructions, {_mips(bare_rate)}; SEC in {_s(bare['sec_cpu_s'])} of CPU, "
                 f"PEI's switch in {_s(bare['pei_cpu_s'])} of CPU")
    for m, r in runs.items():
        r["sec_instructions_per_s"] = rate(r["sec_s"])
        r["vs_bare"] = (r["sec_instructions_per_s"] / bare_rate) if r["sec_instructions_per_s"] and bare_rate else None
        r["pei_vs_bare"] = bare["pei_s"] / r["pei_s"] if r["pei_s"] and bare["pei_s"] else None
        r["sec_cpu_vs_bare"] = bare["sec_cpu_s"] / r["sec_cpu_s"] if r["sec_cpu_s"] and bare["sec_cpu_s"] else None
        r["pei_cpu_vs_bare"] = bare["pei_cpu_s"] / r["pei_cpu_s"] if r["pei_cpu_s"] and bare["pei_cpu_s"] else None
        ratio = f", x{r['vs_bare']:.2f} of bare" if r["vs_bare"] else ""
        pei_ratio = f" (x{r['pei_vs_bare']:.2f} of bare)" if r["pei_vs_bare"] else ""
        cpu_ratio = f", x{r['sec_cpu_vs_bare']:.2f} of bare" if r["sec_cpu_vs_bare"] else ""
        pei_cpu = (f"; PEI's switch in {_s(r['pei_cpu_s'])} of CPU, x{r['pei_cpu_vs_bare']:.2f} of bare"
                   if r["pei_cpu_vs_bare"] else "")
        lines.append(f"  {m:<7} reached {r['reached']}: end of SEC {_s(r['sec_s'])}, PEI in permanent memory "
                     f"{_s(r['pei_s'])}{pei_ratio} ({_mips(r['sec_instructions_per_s'])} in SEC{ratio}; "
                     f"{r['exits']:,} exits, {r['vc']:,} #VC, {r['pvalidates']:,} PVALIDATEs; SEC in {_s(r['sec_cpu_s'])} "
                     f"of CPU{cpu_ratio}{pei_cpu})"
                     f"{'' if r['status'] == 'reached' else ': ' + r['reason']}")
    emit(args, {"ovmf": str(args.ovmf), "image": label, "load_average": load, "bare": {**bare, "sec_instructions_per_s": bare_rate}, "modes": runs}, lines)
    return 0


def _s(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f} s"


def _mips(v: float | None) -> str:
    return "-" if v is None else f"{v / 1e6:.1f} M instructions/s"
