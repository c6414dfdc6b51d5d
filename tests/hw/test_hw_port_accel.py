"""The guest's memory port in C (``csrc/mem_accel.c``, ``Port``; :meth:`sevemu.hw.cache.Cache.port`)
against the Python path of :class:`~sevemu.hw.cpu.GuestCpu`: the same values, lines, LRU order,
dirty set, counters and DRAM bytes for the same accesses; lines stay tagged by ASID; write-backs
are encrypted; the port is collected with its guest view."""

from __future__ import annotations

import gc
import random
import sys
from typing import Any

import pytest
from hwkit import GUEST_SPA, MEM_ACCEL_MODES, FnEngine, PageTables, make_soc, mem_accel

from sevemu.abi.paging import ExitCode
from sevemu.crypto.memenc import EncryptionMode, MemoryCipher, TweakConstants
from sevemu.hw import memaccel
from sevemu.hw.cpu import GuestCpu
from sevemu.hw.faults import PageFault
from sevemu.hw.profiles import GENOA, MILAN, CpuProfile
from sevemu.hw.pyengine import op
from sevemu.hw.soc import Soc

GVA = 0x40_0000_0000
PAGES = 24  # 96 KiB of guest memory behind an 8 KiB cache: most accesses miss and evict
SHARED = 3  # the guest maps page 3 shared (C=0): the unencrypted domain


def _guest(profile: CpuProfile, cache_size: int = 8 << 10, ways: int = 4) -> PageTables:
    soc = make_soc(profile, cache_size=cache_size, cache_ways=ways)
    soc.psp.take_ports().keys.load(200, bytes(range(16, 16 + profile.mem_mode.key_size)))
    pt = PageTables(soc, 200, True)
    pt.identity(1 << 20)
    for i in range(PAGES):
        pt.guest_map(GVA + i * 0x1000, 0x10000 + i * 0x1000, c=i != SHARED)
    return pt


def _ops(seed: int, n: int) -> list[tuple[Any, ...]]:
    rnd = random.Random(seed)
    ops: list[tuple[Any, ...]] = []
    for _ in range(n):
        gva = GVA + rnd.randrange(PAGES * 0x1000 - 16)
        size = rnd.choice((1, 2, 4, 8, 8, 8, 3, 16))  # 3 and 16: sizes the C port hands to Python
        if rnd.random() < 0.4:
            value = rnd.choice((rnd.getrandbits(8 * size), -rnd.getrandbits(70), rnd.getrandbits(80)))
            ops.append(("st", gva, size, value))
        else:
            ops.append(("ld", gva, size))
    return ops


def _run(pt: PageTables, ops: list[tuple[Any, ...]]) -> tuple[list[Any], bool]:
    used_c: list[bool] = []

    def body(cpu: GuestCpu) -> list[Any]:
        used_c.append(not hasattr(cpu.load, "__func__"))  # a C method, not the bound Python one
        out: list[Any] = []
        for o in ops:
            try:
                if o[0] == "ld":
                    out.append(cpu.load(o[1], o[2]))
                else:
                    out.append(cpu.store(o[1], o[2], o[3]))
            except Exception as exc:  # noqa: BLE001 - both paths must raise the same
                out.append(type(exc).__name__)
        return out

    eng = FnEngine(body)
    assert pt.soc.boot_cpu.vmrun(pt.vmcb(), eng).code == ExitCode.HLT
    assert isinstance(eng.result, list)
    return eng.result, used_c[0]


def _state(soc: Soc) -> dict[str, Any]:
    cache = soc.cache
    return {
        "sets": [[(k, bytes(v)) for k, v in s.items()] for s in cache.sets],  # LRU order included
        "dirty": sorted(cache.dirty),
        "counters": (cache.hits, cache.misses, cache.writebacks, soc.mc.lines_encrypted),
        "tlb_misses": soc.boot_cpu.tlb.misses,
        "dram": {pfn: bytes(page) for pfn, page in soc.dram.pages_dict().items()},
    }


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
@pytest.mark.parametrize("profile", [MILAN, GENOA], ids=["milan", "genoa-coherent"])
@pytest.mark.parametrize("seed", [1, 2])
def test_c_port_equals_python_path(profile: CpuProfile, seed: int) -> None:
    ops = _ops(seed, 3000)
    runs = []
    for on in (True, False):
        with mem_accel(on):
            pt = _guest(profile)
            before = _state(pt.soc)
            results, used_c = _run(pt, ops)
            assert used_c is on
            after = _state(pt.soc)
            pt.soc.cache.wbinvd()
            runs.append((results, before, after, _state(pt.soc)))
    assert runs[0][1] == runs[1][1]  # the same start
    c, py = runs
    assert c[0] == py[0]
    assert c[2] == py[2]
    assert c[3] == py[3]
    hits, misses, writebacks, _ = c[2]["counters"]
    assert hits > 500 and misses > 500 and writebacks > 100  # every path of the port was taken


@pytest.mark.parametrize("on", MEM_ACCEL_MODES)
def test_port_writes_back_only_ciphertext(on: bool) -> None:
    """Plaintext stored through the port reaches DRAM only encrypted (private pages), however the
    line leaves the cache (eviction by the port's own fill, WBINVD)."""
    with mem_accel(on):
        pt = _guest(MILAN, cache_size=4 << 10, ways=2)
        marker = 0x5EC2E7_0F_A11CE  # 7 distinctive bytes
        body_ops = [("st", GVA + i * 0x1000 + 64 * j, 8, marker) for i in range(PAGES) if i != SHARED
                    for j in range(0, 64, 7)]
        body_ops += [("ld", GVA + i * 0x1000 + 64 * j, 8) for i in range(PAGES) if i != SHARED
                     for j in range(0, 64, 7)]
        results, used_c = _run(pt, body_ops)
        assert used_c is on
        n = len(body_ops) // 2
        assert results[n:] == [marker] * n  # the guest reads its data back (through evictions)
        assert pt.soc.cache.writebacks > 0
        pt.soc.cache.wbinvd()
        needle = marker.to_bytes(8, "little")[:7]
        assert pt.soc.dram.find(needle) == []
        assert pt.gread(0x10000, 8) == marker.to_bytes(8, "little")


@pytest.mark.parametrize("on", MEM_ACCEL_MODES)
def test_port_lines_tagged_by_asid(on: bool) -> None:
    """A host remaps guest A's page into guest B: B's loads through the port never hit A's lines
    (a different tag), and what B reads is A's data decrypted with B's key, not A's plaintext."""
    with mem_accel(on):
        soc = make_soc(MILAN, cache_size=64 << 10)
        keys = soc.psp.take_ports().keys
        tables = []
        for asid, pool in ((200, 0x100000), (201, 0x200000)):
            keys.load(asid, bytes([asid]) * 16)
            pt = PageTables(soc, asid, True, npt_pool=pool)
            for gpa in range(0, 0x100000, 0x1000):  # the same SPAs behind both guests
                pt.npt_map(gpa, GUEST_SPA + gpa)
            tables.append(pt)
        a, b = tables
        a.guest_map(GVA, 0x50000)
        b.guest_map(GVA, 0x50000)
        secret = 0x0123_4567_89AB_CDEF
        assert _run(a, [("st", GVA + 0x40, 8, secret), ("ld", GVA + 0x40, 8)])[0] == [None, secret]
        got, used_c = _run(b, [("ld", GVA + 0x40, 8)])
        assert used_c is on
        assert got != [secret]
        spa = GUEST_SPA + 0x50040
        mine, theirs = soc.cache.peek(200, True, spa), soc.cache.peek(201, True, spa)
        assert mine is not None and mine[:8] == secret.to_bytes(8, "little")
        assert theirs is not None and theirs != mine  # B's own line, beside A's
        soc.cache.wbinvd()  # A's line reaches DRAM encrypted with A's key: A still reads its secret
        assert _run(a, [("ld", GVA + 0x40, 8)])[0] == [secret]


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_port_is_freed_with_its_guest_view() -> None:
    """The C port holds only a weak reference to its guest view (which holds the port): views and
    ports go as soon as the core drops the view, without waiting for the garbage collector --
    otherwise every VMRUN would leave the cache's structures referenced until a collection."""
    pt = _guest(MILAN)
    sets = pt.soc.cache.sets
    gc.collect()
    base = sys.getrefcount(sets)
    gc.disable()
    try:
        for _ in range(50):
            _run(pt, [("ld", GVA, 8), ("st", GVA + 0x1000, 8, 1)])
            pt.soc.boot_cpu._last_cpu = None  # (the core keeps its last guest view for reuse)
        assert sys.getrefcount(sets) == base
    finally:
        gc.enable()


@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
def test_a_port_outliving_its_view_refuses() -> None:
    pt = _guest(MILAN)
    eng = FnEngine(lambda cpu: (cpu.load(GVA, 8), cpu.load, cpu.store))
    pt.soc.boot_cpu.vmrun(pt.vmcb(), eng)
    assert isinstance(eng.result, tuple)
    _, load, store = eng.result
    eng.cpu = None
    pt.soc.boot_cpu._last_cpu = None
    gc.collect()
    assert load(GVA, 8) == load(GVA, 8)  # a TLB hit needs no view
    with pytest.raises(ReferenceError):
        load(GVA + 0x5000, 8)  # a TLB miss: the view's walk
    with pytest.raises(ReferenceError):
        store(GVA + 0x3F, 8, 1)  # crossing a line: the view's Python path

@pytest.mark.skipif(not memaccel.ENABLED, reason="csrc/mem_accel.c not built")
@pytest.mark.parametrize("mode", list(EncryptionMode), ids=lambda m: m.value)
def test_line_cipher_same_bytes_as_memory_cipher(mode: EncryptionMode) -> None:
    """The memory controller's C line cipher gives the bytes of MemoryCipher's line path: encrypt,
    decrypt and the fill from a page store, on memoised and fresh tweaks, pages present or not."""
    rnd = random.Random(mode.value)
    key = rnd.randbytes(mode.key_size)
    tweaks = TweakConstants.random_zen2()
    ref = MemoryCipher(mode, key, tweaks)
    mine = MemoryCipher(mode, key, tweaks)
    source = mine.line_tweak_source()
    assert source is not None
    code, memo, fallback, lines = source
    pages: dict[int, bytearray] = {}
    c = memaccel.helpers.LineCipher(code, key[:32] if mode is EncryptionMode.XTS256 else key, pages, memo,
                                    fallback, lines)
    enc, dec = ref.line_functions()
    for _ in range(400):
        spa = rnd.choice((rnd.randrange(1 << 20), rnd.randrange(1 << 40))) & ~63
        data = rnd.randbytes(64)
        assert c.encrypt(spa, data) == enc(spa, data) == ref.encrypt_line(spa, data)
        assert c.decrypt(spa, data) == dec(spa, data) == ref.decrypt_line(spa, data)
        pfn = spa >> 12
        if rnd.random() < 0.7:
            pages.setdefault(pfn, bytearray(rnd.randbytes(4096)))
        raw = bytes(pages[pfn][spa & 0xFFF:][:64]) if pfn in pages else bytes(64)
        line = c.read(spa)
        assert type(line) is bytearray and line == ref.decrypt_line(spa, raw)
    with pytest.raises(ValueError):
        c.encrypt(64 + 1, bytes(64))
    with pytest.raises(ValueError):
        c.decrypt(64, bytes(63))


@pytest.mark.parametrize("on", MEM_ACCEL_MODES)
def test_key_slots_use_the_c_line_cipher_when_built(on: bool) -> None:
    with mem_accel(on):
        soc = make_soc(MILAN)
        soc.psp.take_ports().keys.load(200, bytes(16))
        reader = soc.mc.readers[(200 << 1) | 1]
        assert (type(reader).__name__ == "builtin_function_or_method") is on


@pytest.mark.parametrize("on", MEM_ACCEL_MODES)
def test_engine_memory_runs_count_and_restart(on: bool) -> None:
    """The Python engine runs consecutive loads and stores without its per-operation steps: the
    operation count and RIP stay exact across an NPF in the middle of a run (the faulting operation
    restarts, the ones before it are not repeated), a #PF thrown into the workload mid-run, a
    non-memory operation ending a run, and a workload that dies or ends inside a run."""
    with mem_accel(on):
        soc = make_soc(MILAN)
        soc.psp.take_ports().keys.load(200, bytes(16))
        pt = PageTables(soc, 200, True)
        pt.identity(1 << 20)
        got: list[Any] = []

        def work() -> Any:
            yield op.store(0x1008, 8, 0xAB)
            got.append((yield op.load(0x1008, 8)))
            yield op.store(0x200008, 8, 0xCD)  # NPF: GPA 2 MiB is not mapped yet
            got.append((yield op.load(0x200008, 8)))
            got.append((yield op.cpuid(0)))  # ends the run (an exit)
            got.append((yield op.load(0x1008, 2)))
            yield op.hlt()

        eng = pt.engine(work())
        vmcb = pt.vmcb(paging=False)
        ex = soc.boot_cpu.vmrun(vmcb, eng)
        assert (ex.code, ex.info2) == (ExitCode.NPF, 0x200008)
        assert (eng.ops, vmcb.rip, got) == (2, 2, [0xAB])
        pt.npt_map(0x200000, GUEST_SPA + 0x200000)
        ex = soc.boot_cpu.vmrun(vmcb, eng)
        assert ex.code == ExitCode.CPUID
        assert (eng.ops, vmcb.rip, got) == (4, 4, [0xAB, 0xCD])
        vmcb.rip = vmcb.next_rip
        assert soc.boot_cpu.vmrun(vmcb, eng).code == ExitCode.HLT
        assert eng.ops == 5 and got[-1] == 0xAB  # (intercepted operations are not counted)

        pt.guest_map(0x10000, 0x5000, flags=1)  # read-only for the #PF below
        pt.guest_map(0x11000, 0x6000)
        seen: list[Any] = []

        def faulting() -> Any:
            yield op.store(0x11000, 8, 1)
            try:
                yield op.store(0x10010, 4, 1)
            except PageFault as pf:
                seen.append(pf.address)
            seen.append((yield op.load(0x11000, 8)))
            raise RuntimeError("dies inside a run")

        eng = pt.engine(faulting())
        vmcb = pt.vmcb()
        assert soc.boot_cpu.vmrun(vmcb, eng).code == ExitCode.SHUTDOWN
        assert seen == [0x10010, 1] and eng.ops == 2 and vmcb.rip == 2
        assert eng.crash == "RuntimeError: dies inside a run"

        def short() -> Any:
            yield op.store(0x11000, 8, 2)
            yield op.load(0x11000, 8)

        eng = pt.engine(short())
        assert soc.boot_cpu.vmrun(pt.vmcb(), eng).code == ExitCode.HLT
        assert eng.finished and eng.ops == 2
