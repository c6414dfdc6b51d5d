"""``sevemu bench memory``: throughput of the memory model, each figure beside a same-run baseline.

* bulk encrypt+decrypt of a buffer (256 MiB by default) per memory-encryption mode, as a ratio to
  raw AES through ``cryptography`` on the same buffer (AES-128-ECB for XE/XEX, AES-256-XTS for XTS);
* guest 8-byte loads inside an SEV guest (paging on, nested paging, ASID-tagged TLB and cache):
  loads that hit the cache, and loads that miss and fill a line from encrypted DRAM -- measured both
  through the memory port an instruction engine calls and through the Python workload engine;
* resident memory of a 64 GiB SEV guest that touched 64 MiB.

Options are checked before anything runs (a bulk buffer larger than this host's available memory
allows is refused); on a terminal each phase shows its progress on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

from sevemu._util.units import PAGE, GiB, MiB
from sevemu.abi.paging import ExitCode
from sevemu.certs.roots import GENERATIONS
from sevemu.cli.bench_attest import register_attest
from sevemu.cli.bench_launch import register_launch
from sevemu.cli.bench_migrate import register_migrate
from sevemu.cli.bench_ovmf import register_ovmf
from sevemu.cli.bench_snp import register_snp
from sevemu.cli.common import host_memory, positive_int
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.errors import InputError
from sevemu.guest.workloads import touch_pages
from sevemu.hw.codefetch import cpu_engine
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.pyengine import Op, PyEngine, Workload, op
from sevemu.hw.svm import VmExit
from sevemu.scenario import build_machine

TARGETS = {"bulk_ratio": 0.5, "load_hit_per_s": 1_000_000, "load_miss_per_s": 300_000, "rss_ratio": 3.0}


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks, each against a baseline measured in the same run")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    m = bsub.add_parser("memory", help="memory encryption, guest loads, sparse-guest RSS",
                        epilog="examples:\n  sevemu bench memory\n  sevemu bench memory --size 64 --json")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.add_argument("--size", type=positive_int, default=256, metavar="MiB",
                   help="bulk buffer size in MiB (default 256)")
    m.add_argument("--loads", type=positive_int, default=1_000_000, help="loads per load benchmark")
    m.add_argument("--generation", choices=GENERATIONS, default="milan",
                   help="platform for the guest-load benchmarks")
    m.set_defaults(func=run_memory)
    register_launch(bsub)
    register_migrate(bsub)
    register_attest(bsub)
    register_snp(bsub)
    register_ovmf(bsub)
    try:
        from sevemu.cli.bench_cpu import register_cpu
    except ImportError:  # the Unicorn engine is optional until its dependency is installed
        return
    register_cpu(bsub)


@cpu_engine  # the benchmark's stand-in for a compiled engine of the CPU model, not host code in a guest
class _PortLoop:
    """An engine that issues loads straight on the memory port (what a compiled engine would do)."""

    def __init__(self, gvas: list[int], rounds: int) -> None:
        self.gvas = gvas
        self.rounds = rounds
        self.seconds = 0.0

    def run(self, cpu: GuestCpu) -> VmExit:
        load = cpu.load
        gvas = self.gvas
        t = time.perf_counter()
        for _ in range(self.rounds):
            for gva in gvas:
                load(gva, 8)
        self.seconds = time.perf_counter() - t
        return VmExit(ExitCode.HLT)


def _load_workload(gvas: list[int], rounds: int) -> Workload:
    ops: list[Op] = [op.load(gva, 8) for gva in gvas]
    for _ in range(rounds):
        for o in ops:  # noqa: UP028 - not `yield from`: the engine send()s results back
            yield o
    yield op.hlt()


def _guest_loads(generation: str, loads: int) -> dict[str, Any]:
    m = build_machine(generation, seed="bench")
    hv = m.hv
    vm = hv.create_vm("bench", 256 * MiB)
    hv.launch(vm, [(0x100000, bytes(PAGE))], programs=[touch_pages, _load_workload])
    region = 0x1000000
    miss_bytes = m.soc.cache.size * 3 // 2  # 1.5x the cache: a sequential sweep always misses
    vm.add_vcpu(PyEngine(touch_pages(256 * MiB, region, miss_bytes, 64)))
    hv.run(vm)  # boot + back and write every line once
    m.soc.wbinvd_all()
    out: dict[str, Any] = {"platform": m.profile.product, "cache_bytes": m.soc.cache.size}

    def measure(name: str, gvas: list[int], rounds: int, warm: bool) -> None:
        cache = m.soc.cache
        if warm:
            hv.run(vm, engine=_PortLoop(gvas, 1))
        for via in ("port", "engine"):
            h0, m0 = cache.hits, cache.misses
            if via == "port":
                loop = _PortLoop(gvas, rounds)
                hv.run(vm, engine=loop)
                seconds = loop.seconds
            else:
                t = time.perf_counter()
                hv.run(vm, engine=PyEngine(_load_workload(gvas, rounds)))
                seconds = time.perf_counter() - t
            n = len(gvas) * rounds
            hits, misses = cache.hits - h0, cache.misses - m0
            out[f"{name}_{via}_per_s"] = n / seconds
            out[f"{name}_{via}_hit_rate"] = hits / max(hits + misses, 1)

    hit_gvas = [region + 64 * i for i in range(256)]  # 16 KiB: always resident
    measure("load_hit", hit_gvas, max(loads // len(hit_gvas), 1), warm=True)
    miss_gvas = list(range(region, region + miss_bytes, 64))
    measure("load_miss", miss_gvas, max(loads // (4 * len(miss_gvas)), 1), warm=True)
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _sparse_guest(generation: str) -> dict[str, Any]:
    gc.collect()
    m = build_machine(generation, seed="rss", dram_size=256 * GiB)
    before = _rss()
    hv = m.hv
    vm = hv.create_vm("sparse", 64 * GiB)
    hv.launch(vm, [(0x100000, bytes(PAGE))], programs=[touch_pages])
    touched = 64 * MiB
    vm.add_vcpu(PyEngine(touch_pages(64 * GiB, 1 * GiB, touched)))
    hv.run(vm)
    m.soc.wbinvd_all()  # every touched page now lives in DRAM
    gc.collect()
    after = _rss()
    return {"guest_memory": 64 * GiB, "touched": touched, "rss_delta": after - before,
            "rss_ratio": (after - before) / touched, "dram_pages": m.soc.dram.populated_pages}


BULK_MEMORY_FACTOR = 3
"""The bulk benchmark holds its source buffer, its output and the cipher's working copy."""


def check_memory(size: int, factor: int, option: str = "--size") -> None:
    """Refuse a benchmark size this host cannot hold (``factor`` x ``size`` bytes of memory)."""
    available = host_memory()
    if size * factor > available:
        raise InputError(f"{option} {size // MiB} MiB: the benchmark needs about {factor}x that in memory, and "
                         f"this host has {available // MiB} MiB available")


def run_memory(args: argparse.Namespace) -> int:
    check_memory(args.size * MiB, BULK_MEMORY_FACTOR)
    from sevemu.crypto.membench import bench_modes

    results: dict[str, Any] = {"targets": TARGETS}
    with Progress(progress_enabled(quiet=args.json or bool(getattr(args, "quiet", False))), "bench memory") as p:
        p.step(f"bulk encrypt+decrypt of {args.size} MiB per mode")
        results["bulk"] = bench_modes(args.size * MiB)
        p.step("guest loads (hits and misses)")
        results["loads"] = _guest_loads(args.generation, args.loads)
        p.step("a 64 GiB sparse SEV guest")
        results["sparse_guest"] = _sparse_guest(args.generation)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    w: Callable[..., None] = print
    w(f"bulk encrypt+decrypt of {args.size} MiB (ratio to raw AES on the same buffer; target >= 0.5):")
    for r in results["bulk"]:
        how = "C accelerator" if r.get("accelerated") else "numpy fallback"
        if r.get("aes_engine") == "vaes":
            how += ", one pass on VAES/AVX-512"
        elif r.get("aes_via_xts"):
            how += ", AES through cryptography's XTS"
        w(f"  {r['mode']:<12} {r['mode_gbps']:6.2f} GB/s   baseline {r['baseline']:<12} "
          f"{r['baseline_gbps']:6.2f} GB/s   ratio {r['ratio']:.2f}   ({how})")
        if "aes128_xts_gbps" in r:
            w(f"  {'':<12} (vs {r['aes128_xts_baseline']}, AES-128 at cryptography's XTS speed: "
              f"{r['aes128_xts_gbps']:.2f} GB/s, ratio {r['ratio_aes128_xts']:.2f})")
        if "xts_unit_gbps" in r:
            w(f"  {'':<12} (vs {r['xts_unit_baseline']}: {r['xts_unit_gbps']:.2f} GB/s, "
              f"ratio {r['ratio_xts_unit']:.2f})")
        if "line_encrypt_us" in r:
            w(f"  {'':<12} single 64-byte line: encrypt {r['line_encrypt_us']:.2f} us, "
              f"decrypt {r['line_decrypt_us']:.2f} us")
    ld = results["loads"]
    w(f"guest 8-byte loads in an SEV guest on {ld['platform']} ({ld['cache_bytes'] >> 20} MiB cache):")
    for name, target in (("load_hit", TARGETS["load_hit_per_s"]), ("load_miss", TARGETS["load_miss_per_s"])):
        for via in ("port", "engine"):
            w(f"  {name:<9} via {via:<6} {ld[f'{name}_{via}_per_s']:>12,.0f} /s  "
              f"(cache hit rate {ld[f'{name}_{via}_hit_rate']:.3f}; target >= {target:,})")
    sg = results["sparse_guest"]
    w(f"64 GiB SEV guest touching {sg['touched'] >> 20} MiB: RSS grew {sg['rss_delta'] / MiB:.1f} MiB "
      f"= {sg['rss_ratio']:.2f}x what it touched (target <= 3x); {sg['dram_pages']} DRAM pages populated")
    return 0


