"""``sevemu bench launch``: LAUNCH_UPDATE_DATA of a large guest image, beside raw AES measured in the
same run.

The hypervisor path is KVM's (:class:`~sevemu.hypervisor.kvm_ops.KvmSev`, KVM_SEV_LAUNCH_UPDATE_DATA):
pin the guest range, CLFLUSH it (non-coherent CPUs), one firmware command per physically contiguous
run through the PSP mailbox.  The firmware reads the plaintext through the PSP's coherent view,
extends the SHA-256 launch digest with it and writes it back encrypted with the guest key.  Figures:

* ``launch_gbps``: bytes measured per second of the whole sub-command (what a VMM waits for: pin,
  CLFLUSH of the host's lines, the firmware command);
* ``firmware_gbps``: the same bytes over the time spent inside mailbox commands only;
* ``baseline_gbps``: raw AES through ``cryptography`` over the same number of bytes in one call,
  into a preallocated buffer -- AES-128-ECB, or AES-256-XTS with 1 MiB data units on XTS generations;
* ``sha256_gbps``: SHA-256 of the same bytes (``hashlib``);
* ``floor_seconds``: AES + SHA-256, one after the other on one core -- the least a serial
  implementation must do; ``max_seconds``: max(AES, SHA-256), what two crypto engines working
  side by side (the PSP's, or two cores) need at least;
* ``ratio`` = floor / launch (target >= 0.5); ``aes_ratio`` = AES alone / launch;
* ``cpu_ratio``: the floor's CPU time over the launch's CPU time (this process, all its threads):
  what the launch costs in work, whatever other processes of a shared machine take.

Each of the ``--repeat`` rounds (default 3) times one launch and, right after it, the baselines of the
same bytes; every figure is the best over the rounds.  Interleaving matters on a shared machine: a
burst of load from another process slows one round's launch and baselines alike, instead of making
the launch look slow against baselines timed in a quiet moment (or the reverse).

The firmware streams the run in 2 MiB chunks (:mod:`sevemu.firmware.sev.launch`).  With a core to
spare, each chunk is hashed on a worker thread (the PSP's SHA engine) while it is encrypted and
written back, so the launch approaches the larger of the SHA-256 time and the rest (the host's
flush, the copy out of DRAM's pages, the encryption); without one (``--sha-engine auto``, the
default, decides by the load average; ``on`` / ``off`` force it) the firmware thread measures each
chunk where it lies in DRAM -- hashed from DRAM's pages, then encrypted in place, one C pass per
group of pages, no plaintext copy (:meth:`~sevemu.crypto.memenc.MemoryCipher.measure_pages_in_place`)
-- which costs the least CPU.  With the engine, the encryption of XE/XEX generations runs in one C
pass per page straight into DRAM's pages (:meth:`~sevemu.crypto.memenc.MemoryCipher.encrypt_to_pages`).
On a loaded machine every figure, the floors included, slows down: compare figures of one run only,
and the CPU-time ratio before the wall-clock one.

The guest image (random bytes) is written into guest memory by the host before the clock starts.
``--size`` is checked against this host's available memory before anything runs; on a terminal the
phases show their progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevemu._util.units import GiB, MiB
from sevemu.certs.roots import GENERATIONS
from sevemu.cli.common import host_memory, positive_int
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.errors import InputError
from sevemu.firmware import sha_engine
from sevemu.hw.profiles import profile
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevLaunchStart, KvmSevLaunchUpdateData
from sevemu.hypervisor.psp import PspDriver
from sevemu.hypervisor.sevdev import IoctlError, SevDevice
from sevemu.scenario import build_machine

__all__ = ["TARGET_RATIO", "bench_launch", "register_launch", "run_launch"]

TARGET_RATIO = 0.5
_IMAGE_GPA = 0x10_0000
_XTS_UNIT = MiB


def register_launch(bsub: Any) -> None:
    """Add ``launch`` to the ``sevemu bench`` sub-commands."""
    p = bsub.add_parser("launch", help="LAUNCH_UPDATE_DATA of a large image vs raw AES",
                        epilog="examples:\n  sevemu bench launch\n  sevemu bench launch --size 256 --repeat 3 --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--size", type=positive_int, default=64, metavar="MiB", help="image size in MiB (default 64)")
    p.add_argument("--generation", choices=GENERATIONS, default="milan", help="platform (default milan)")
    p.add_argument("--repeat", type=positive_int, default=3,
                   help="rounds of a launch and its baselines; the best of each kept (default 3)")
    p.add_argument("--sha-engine", choices=sha_engine.MODES, default="auto",
                   help="hash on the PSP's SHA engine thread beside the encryption: on, off, or auto "
                        "(only while a core is spare; default)")
    p.set_defaults(func=run_launch)


def _best_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best wall-clock seconds, best CPU seconds of this process) over ``repeats`` calls of ``fn``."""
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _baseline(xts: bool, data: bytes, repeats: int = 5) -> tuple[str, tuple[float, float]]:
    """(name, (wall, CPU) seconds) of raw AES over ``data`` (see the module docstring)."""
    out = bytearray(len(data) + 16)
    view, dst = memoryview(data), memoryview(out)
    if not xts:
        enc = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()
        return "AES-128-ECB", _best_cpu(lambda: enc.update_into(view, dst), repeats)
    aes = algorithms.AES(os.urandom(64))

    def run() -> None:
        for off in range(0, len(data), _XTS_UNIT):
            c = Cipher(aes, modes.XTS(off.to_bytes(16, "little"))).encryptor()
            c.update_into(view[off : off + _XTS_UNIT], dst[off : off + _XTS_UNIT + 15])

    return f"AES-256-XTS ({_XTS_UNIT >> 20} MiB units)", _best_cpu(run, repeats)


class _MailboxTimer:
    """Wraps the PSP driver's ``raw`` to add up the time spent inside firmware commands."""

    def __init__(self, psp: PspDriver) -> None:
        self.seconds = 0.0
        self.commands = 0
        self._raw = psp.raw
        psp.raw = self._timed  # type: ignore[method-assign]

    def _timed(self, cmd: Any, buf: bytes | None, *, reply: bool = True) -> tuple[int, bytes]:
        t0 = time.perf_counter()
        try:
            return self._raw(cmd, buf, reply=reply)
        finally:
            self.seconds += time.perf_counter() - t0
            self.commands += 1


def _one_launch(generation: str, image: bytes, seed: str) -> dict[str, float]:
    m = build_machine(generation, seed=seed, dram_size=max(4 * GiB, 4 * len(image)))
    hv = m.hv
    dev = SevDevice(hv)
    vm = hv.create_vm("bench", _IMAGE_GPA + len(image) + MiB)
    kvm = KvmSev(hv, vm)
    kvm.op(KvmSevCmdId.INIT, sev_fd=dev)
    kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=0), sev_fd=dev)
    t0 = time.perf_counter()
    vm.back_range(_IMAGE_GPA, len(image))
    vm.host_write(_IMAGE_GPA, image)
    setup = time.perf_counter() - t0
    timer = _MailboxTimer(hv.psp)
    thread = sha_engine.engaged()
    c0, t0 = time.process_time(), time.perf_counter()
    kvm.op(KvmSevCmdId.LAUNCH_UPDATE_DATA, KvmSevLaunchUpdateData(uaddr=kvm.hva(_IMAGE_GPA), len=len(image)))
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    if m.firmware.internal_errors:
        raise IoctlError("LAUNCH_UPDATE_DATA (firmware internal error)", -5, 0x13)
    return {"seconds": total, "cpu_seconds": cpu, "firmware_seconds": timer.seconds, "commands": timer.commands,
            "setup_seconds": setup, "sha_thread": float(thread)}


MEMORY_FACTOR = 4
"""The image, its copy in the emulated DRAM (encrypted there in place), the baseline's output buffer
and the model's own objects: a 64 MiB run peaked at 274 MiB resident, the interpreter included."""


def bench_launch(generation: str = "milan", size: int = 64 * MiB, repeat: int = 3,
                 progress: Progress | None = None, engine: str = "auto") -> dict[str, Any]:
    """Run the benchmark; returns the figures (module docstring).  ``engine``: the SHA engine's
    :data:`~sevemu.firmware.sha_engine.mode` for the launches (the process's mode is restored)."""
    if engine not in sha_engine.MODES:
        raise InputError(f"SHA engine mode {engine!r}: one of {', '.join(sha_engine.MODES)}")
    before = sha_engine.mode
    sha_engine.mode = engine
    try:
        return _bench_launch(generation, size, repeat, progress, engine)
    finally:
        sha_engine.mode = before


def _bench_launch(generation: str, size: int, repeat: int, progress: Progress | None, engine: str) -> dict[str, Any]:
    available = host_memory()
    if size * MEMORY_FACTOR > available:
        raise InputError(f"--size {size // MiB} MiB: the benchmark needs about {MEMORY_FACTOR}x that in memory, "
                         f"and this host has {available // MiB} MiB available")
    progress = progress or Progress(False)
    image = os.urandom(size)
    xts = profile(generation).mem_mode.key_size == 64
    runs: list[dict[str, float]] = []
    aes: list[tuple[float, float]] = []
    shas: list[tuple[float, float]] = []
    rounds = max(repeat, 1)
    name = ""
    for i in range(rounds):
        progress.step(f"round {i + 1} of {rounds}: LAUNCH_UPDATE_DATA of {size // MiB} MiB")
        runs.append(_one_launch(generation, image, f"bench-launch-{i}"))
        progress.step(f"round {i + 1} of {rounds}: raw AES and SHA-256 of the same bytes")
        name, timed = _baseline(xts, image, 3)
        aes.append(timed)
        shas.append(_best_cpu(lambda: hashlib.sha256(image).digest(), 3))
    best = min(runs, key=lambda r: r["seconds"])
    launch_cpu = min(r["cpu_seconds"] for r in runs)
    base, base_cpu = min(a[0] for a in aes), min(a[1] for a in aes)
    sha, sha_cpu = min(h[0] for h in shas), min(h[1] for h in shas)
    gb = size / 1e9
    floor = base + sha
    return {
        "generation": generation,
        "bytes": size,
        "launch_seconds": best["seconds"],
        "launch_gbps": gb / best["seconds"],
        "firmware_seconds": best["firmware_seconds"],
        "firmware_gbps": gb / best["firmware_seconds"],
        "firmware_commands": int(best["commands"]),
        "host_seconds": best["seconds"] - best["firmware_seconds"],
        "setup_seconds": best["setup_seconds"],
        "baseline": name,
        "baseline_seconds": base,
        "baseline_gbps": gb / base,
        "sha256_seconds": sha,
        "sha256_gbps": gb / sha,
        "floor_seconds": floor,
        "floor_gbps": gb / floor,
        "max_seconds": max(base, sha),
        "max_gbps": gb / max(base, sha),
        "ratio": floor / best["seconds"],
        "launch_cpu_seconds": launch_cpu,
        "floor_cpu_seconds": base_cpu + sha_cpu,
        "cpu_ratio": (base_cpu + sha_cpu) / launch_cpu if launch_cpu > 0 else 0.0,
        "rounds": rounds,
        "load_average": os.getloadavg()[0],
        "aes_ratio": base / best["seconds"],
        "target_ratio": TARGET_RATIO,
        "sha_engine": engine,
        "sha_engine_thread": bool(best["sha_thread"]),
    }


def run_launch(args: argparse.Namespace) -> int:
    with Progress(progress_enabled(quiet=args.json or bool(getattr(args, "quiet", False))), "bench launch") as p:
        r = bench_launch(args.generation, args.size * MiB, args.repeat, p, args.sha_engine)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    w: Callable[..., None] = print
    w(f"LAUNCH_UPDATE_DATA of {args.size} MiB on {r['generation']} "
      f"({r['firmware_commands']} firmware command(s) through the PSP mailbox):")
    w(f"  KVM sub-command   {r['launch_gbps']:6.2f} GB/s  ({r['launch_seconds'] * 1e3:7.1f} ms; "
      f"host pin+flush {r['host_seconds'] * 1e3:.1f} ms)")
    w(f"  firmware only     {r['firmware_gbps']:6.2f} GB/s  ({r['firmware_seconds'] * 1e3:7.1f} ms)")
    w(f"  raw {r['baseline']:<26} {r['baseline_gbps']:6.2f} GB/s  ({r['baseline_seconds'] * 1e3:7.1f} ms)")
    w(f"  SHA-256 (hashlib)              {r['sha256_gbps']:6.2f} GB/s  ({r['sha256_seconds'] * 1e3:7.1f} ms)")
    w(f"  floor: AES + SHA-256 serial    {r['floor_gbps']:6.2f} GB/s  ({r['floor_seconds'] * 1e3:7.1f} ms); "
      f"max(AES, SHA-256) {r['max_seconds'] * 1e3:.1f} ms")
    w(f"  ratio floor / launch: {r['ratio']:.2f} (target >= {TARGET_RATIO}); raw AES alone / launch: "
      f"{r['aes_ratio']:.2f}")
    w(f"  in CPU time (all threads of this process): launch {r['launch_cpu_seconds'] * 1e3:.1f} ms, floor "
      f"{r['floor_cpu_seconds'] * 1e3:.1f} ms, ratio {r['cpu_ratio']:.2f}")
    w(f"  SHA-256 {'on the SHA engine thread beside the encryption' if r['sha_engine_thread'] else 'on the firmware thread, each chunk where it lies in DRAM (no spare core)'}"
      f" (--sha-engine {r['sha_engine']})")
    w(f"  best of {r['rounds']} interleaved round(s); load average {r['load_average']:.1f}")
    return 0
