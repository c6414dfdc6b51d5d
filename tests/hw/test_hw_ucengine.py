"""The Unicorn vCPU engine (hw/ucengine.py) on hand-assembled guest code: exits, registers, memory
semantics (C-bit, always-private fetch, nothing unencrypted in DRAM), faults, coherence, limits.

The snippets are raw machine code (the assembly is beside each), so these tests need no compiler.
"""

from __future__ import annotations

import array
import gc
import mmap
import time
import types
import weakref

import pytest
from hwkit import identity_tables

from sevemu.abi.paging import ExitCode
from sevemu.errors import InputError
from sevemu.hw.svm import Vmcb, VmExit
from sevemu.hw.uc.watchdog import WATCHDOG
from sevemu.hw.ucengine import EngineClosedError, InitialState, UcEngine, check_vmcb_state, scan_io_candidates
from sevemu.hypervisor.kvm import COM1, RunResult
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine

pytest.importorskip("unicorn")

MiB = 1 << 20
BASE = 0x100000

# 32-bit, paging off:  mov $SEV_STATUS,%ecx; rdmsr; mov %eax,%edi; mov $0x3f8,%dx; mov $'O',%al; out;
# mov $'K',%al; out; mov $0x8000001f,%eax; xor %ecx,%ecx; cpuid; mov %ebx,%esi;
# mov $0x11223344,%eax; mov %eax,0x200000; mov 0x200000,%ebp; hlt; ud2
BASIC = bytes.fromhex("b9310101c00f3289c766baf803b04feeb04beeb81f00008031c90fa289deb844332211a3000020008b2d"
                      "00002000f40f0b")
# mov $0x300000,%edi; mov $msg,%esi; mov $64,%ecx; cld; rep movsb; hlt; mov 0x300000,%eax; hlt; msg: ...
MARKER_TEXT = b"TOP-SECRET-MARKER:0123456789abcdef0123456789abcdef-0123456789ABC"
MARKER = bytes.fromhex("bf00003000be19001000b940000000fcf3a4f4a100003000f4") + MARKER_TEXT
LOOP = bytes.fromhex("ebfe")  # 1: jmp 1b
# in $0x71,%al; mov $0x1234,%ax; mov $0x510,%dx; out %ax,%dx; mov $0xdeadbeef,%eax; out %eax,$0x80;
# mov $0x3f8,%dx; mov $'A',%al; out %al,%dx; hlt; mov $msg,%esi; mov $4,%ecx; rep outsb; hlt; "abcd"
IO = bytes.fromhex("e47166b8341266ba100566efb8efbeaddee78066baf803b041eef4be28001000b904000000f36ef461626364")
# for i < 64: *(0x400000 + i*4096) = i; then ebx = sum of them; wbinvd; hlt
PAGES = bytes.fromhex("31c989c8c1e00c8988000040004183f94075ef31c931db89c8c1e00c0398000040004183f94075ef0f09f4")
# 64-bit: write "HELLO" to the shared page 0x120000 and "P-SECRET" to private 0x121000; hlt;
# rbx = shared[64] (the host's reply); r14 = data view of the code page 0x122000 (C=0);
# call 0x122000 (sets r13 = 0x1234); r15 = data view again; hlt
LONG = bytes.fromhex("bf0000120048b848454c4c4f000000488907be0010120048b8502d534543524554488906f4488b5f4041bc"
                     "002012004d8b342441ffd44d8b3c24f4")
CODE2 = bytes.fromhex("41bd34120000c3")  # mov $0x1234,%r13d; ret


def run(m: Machine, vm: Vm, max_exits: int = 1_000_000) -> RunResult:
    """The hypervisor's run loop until something other than the end of a time slice."""
    while True:
        r = m.hv.run(vm, max_exits=max_exits)
        if r.reason != "intr":
            return r


def machine(generation: str = "milan") -> Machine:
    return build_machine(generation, seed="uc-tests", dram_size=1 << 30, cache_size=256 << 10)


def launch(m: Machine, code: bytes, kind: VmKind, state: InitialState | None = None,
           pool_pages: int = 256, slice_s: float = 0.2) -> tuple[Vm, UcEngine]:
    vm = m.hv.create_vm("t", 16 * MiB, kind)
    m.hv.launch(vm, [(BASE, code.ljust((len(code) + 4095) & ~4095, b"\0"))])
    state = state or InitialState(rip=BASE)
    eng = UcEngine(pool_pages=pool_pages, slice_s=slice_s, initial=state)
    state.apply(vm.add_vcpu(eng).vmcb)
    return vm, eng


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_exits_registers_and_demand_paging(kind: VmKind) -> None:
    m = machine()
    vm, eng = launch(m, BASIC, kind)
    r = run(m, vm)
    assert r.reason == "hlt"
    v = vm.vcpus[0]
    assert vm.console == bytearray(b"OK")
    regs = v.vmcb.regs
    assert regs["rdi"] == (1 if kind is VmKind.SEV else 0)  # SEV_STATUS, answered by the CPU itself
    assert regs["rsi"] & 0x3F == m.profile.cbit  # CPUID 0x8000001F went to the hypervisor
    assert regs["rbp"] == 0x11223344  # the store to a demand-paged page, read back
    counts = eng.stats.by_reason
    assert counts["IOIO"] == 2 and counts["CPUID"] == 1 and counts["NPF"] == 1 and counts["HLT"] == 1
    assert v.vmcb.rip == BASE + len(BASIC) - 2  # after HLT: RIP at the ud2
    # the next VMRUN executes ud2: a triple fault, reported with reason and RIP; the host lives on
    r = run(m, vm)
    assert r.exit.code == ExitCode.SHUTDOWN
    assert "#UD" in (vm.crash_reason or "") and f"{BASE + len(BASIC) - 2:#x}" in (vm.crash_reason or "")
    assert eng.crash_rip == BASE + len(BASIC) - 2
    assert eng.run.__self__ is eng  # still callable: a dead guest keeps answering SHUTDOWN


def test_private_memory_is_ciphertext_everywhere_the_host_looks() -> None:
    for kind in (VmKind.SEV, VmKind.PLAIN):
        m = machine()
        vm, _ = launch(m, MARKER, kind)
        assert run(m, vm).reason == "hlt"  # the guest holds the marker in private memory now
        before = vm.host_read(0x300000, len(MARKER_TEXT))  # the guest's lines are still in the SoC
        m.soc.wbinvd_all()  # every line in DRAM
        host = vm.host_read(0x300000, len(MARKER_TEXT))
        dram = m.soc.dram.read(vm.spa_of(0x300000), len(MARKER_TEXT))
        if kind is VmKind.SEV:
            assert MARKER_TEXT not in (before, host, dram)
            assert dram == host  # the hypervisor reads exactly the ciphertext in DRAM
        else:
            assert host == MARKER_TEXT and dram == MARKER_TEXT
        # the guest still reads its plaintext after the flush
        assert run(m, vm).reason == "hlt"
        assert vm.vcpus[0].vmcb.regs["rax"] == int.from_bytes(MARKER_TEXT[:4], "little")


def test_no_plaintext_in_dram_at_any_exit() -> None:
    m = machine()
    vm, eng = launch(m, MARKER, VmKind.SEV)
    for _ in range(20):
        r = run(m, vm, max_exits=1)
        for page in m.soc.dram.pages_dict().values():
            assert MARKER_TEXT[:24] not in page
        if r.reason == "hlt":
            break
    assert eng.resident_pages()  # the plaintext lives in the engine's pool and the cache: inside the SoC


def test_port_io_exit_information() -> None:
    m = machine()
    vm, eng = launch(m, IO, VmKind.SEV)
    seen = []
    for _ in range(4):
        r = run(m, vm, max_exits=1)
        seen.append((r.exit.info1, r.exit.info2, vm.vcpus[0].vmcb.regs["rax"]))
    # in $0x71,%al: IN, 8-bit, A32, port 0x71; EXITINFO2 = next RIP
    assert seen[0][0] == (0x71 << 16) | (1 << 8) | (1 << 4) | 1 and seen[0][1] == BASE + 2
    # out %ax,%dx (0x66 prefix): 16-bit, port 0x510, AX visible to the hypervisor
    assert seen[1][0] == (0x510 << 16) | (1 << 8) | (1 << 5) and seen[1][2] & 0xFFFF == 0x1234
    # out %eax,$0x80: 32-bit
    assert seen[2][0] == (0x80 << 16) | (1 << 8) | (1 << 6) and seen[2][2] & 0xFFFFFFFF == 0xDEADBEEF
    assert run(m, vm).reason == "hlt" and vm.console == bytearray(b"A")
    # rep outsb: string port I/O exits with STR and REP; the hypervisor cannot emulate it in an SEV
    # guest's encrypted memory and refuses it clearly (a plain guest's is emulated: hypervisor/emulate.py)
    r = run(m, vm)
    assert r.exit.code == ExitCode.IOIO and r.exit.info1 & 0b1100 == 0b1100
    assert vm.state is VmState.CRASHED and "string port I/O" in (vm.crash_reason or "")
    assert eng.stats.io_exits == 5


def test_runaway_guest_is_preempted() -> None:
    m = machine()
    vm, _eng = launch(m, LOOP, VmKind.SEV, slice_s=0.05)
    t = time.monotonic()
    r = m.hv.run(vm)
    assert r.reason == "intr" and r.exit.code == ExitCode.INTR
    assert time.monotonic() - t < 5
    assert vm.vcpus[0].vmcb.rip == BASE  # resumable where it was
    assert m.hv.run(vm).reason == "intr"


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_pool_eviction_keeps_memory_right(kind: VmKind) -> None:
    m = machine()
    vm, eng = launch(m, PAGES, kind, pool_pages=32)
    r = run(m, vm)
    assert r.reason == "hlt", vm.crash_reason
    assert vm.vcpus[0].vmcb.regs["rbx"] == sum(range(64))
    assert eng.stats.evictions > 0  # 64 pages through a 32-slot pool
    assert eng.stats.by_reason.get("WBINVD") is None  # WBINVD was handled inside the CPU


def _long_mode_image(sev_cbit: int | None) -> bytes:
    """LONG + CODE2 with identity page tables: 0x120000 (shared) and 0x122000 (code) have C = 0."""
    img = bytearray(0x31000)
    img[0 : len(LONG)] = LONG
    img[0x22000 : 0x22000 + len(CODE2)] = CODE2
    identity_tables(img, BASE, sev_cbit, shared=(0x120000, 0x122000))
    return bytes(img)


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_long_mode_shared_page_and_always_private_fetch(kind: VmKind) -> None:
    m = machine()
    sev = kind is VmKind.SEV
    image = _long_mode_image(m.profile.cbit if sev else None)
    state = InitialState(rip=BASE, mode="long64", cr3=0x110000, rsp=0x130000)
    vm, _eng = launch(m, image, kind, state)
    assert run(m, vm).reason == "hlt"
    # the shared page is plaintext to the host, the private one is not (under SEV)
    assert vm.host_read(0x120000, 5) == b"HELLO"
    assert (vm.host_read(0x121000, 8) == b"P-SECRET") is not sev
    vm.host_write(0x120040, b"REPLY!!!")  # the guest sees the host's write (snooped) on resume
    assert run(m, vm).reason == "hlt"
    regs = vm.vcpus[0].vmcb.regs
    assert regs["rbx"].to_bytes(8, "little") == b"REPLY!!!"
    assert regs["r13"] == 0x1234  # the code in the C=0 page ran: instruction fetches are private
    code = int.from_bytes(CODE2.ljust(8, b"\0"), "little")
    # its data view through the C=0 mapping: the launched ciphertext under SEV, the code otherwise
    assert (regs["r14"] == code) is not sev and regs["r14"] == regs["r15"]


def test_code_written_by_the_host_runs_only_without_sev() -> None:
    out = {}
    for kind in (VmKind.PLAIN, VmKind.SEV):
        m = machine()
        vm, _eng = launch(m, MARKER, kind)
        assert run(m, vm).reason == "hlt"
        # overwrite the instruction after the HLT with "mov $0x3f8,%dx; mov $'!',%al; out; hlt"
        rip = vm.vcpus[0].vmcb.rip
        vm.host_write(rip, bytes.fromhex("66baf803b021eef4"))
        m.soc.wbinvd_all()
        r = run(m, vm)
        out[kind] = (r, bytes(vm.console))
    assert out[VmKind.PLAIN][1] == b"!"
    r, console = out[VmKind.SEV]
    assert console != b"!" and b"!" not in console


# mov $0x180000,%esp; image A into page 0x200000 (code at +0x40: mov $0xaaaa,%eax; nop; nop; ret) and call it (ebp = its
# eax); then image B over it: a "header" store at +0 (the first store through the new write grant),
# its code at +0x40 (mov 0x200080,%eax; ret) and its data at +0x80 (0xbbbbbbbb), and call it; hlt.
REWRITE = bytes.fromhex("bc00001800be48001000bf40002000b908000000fcf3a4bb40002000ffd389c5c7050000200042420000"
                        "be50001000"
                        "bf40002000b906000000f3a4c70580002000bbbbbbbbffd3f4b8aaaa00009090c3a180002000c3")


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_a_page_rewritten_with_new_code_runs_the_new_code(kind: VmKind) -> None:
    """A page that held executed code is rewritten with another image (OVMF's DXE core loads a driver
    into the pages the one before left): the new code runs, and reads its new data.  Unicorn checks
    stores for translated code only until the first store through a write grant, and that one drops
    only the blocks overlapping what it wrote; the engine drops translated code when it grants write
    access to a page it was translated from (the call ran image A's stale block before)."""
    m = machine()
    vm, eng = launch(m, REWRITE, kind)
    r = run(m, vm)
    assert r.reason == "hlt"
    regs = vm.vcpus[0].vmcb.regs
    assert regs["rbp"] == 0xAAAA  # image A ran
    assert regs["rax"] == 0xBBBBBBBB  # image B ran, not A's translated block (0xaaaa)
    assert eng.stats.tb_flushes >= 1


def test_invalid_initial_state_is_an_error_before_anything_runs() -> None:
    with pytest.raises(InputError):
        InitialState(rip=BASE, mode="real16").validate()
    with pytest.raises(InputError):
        InitialState(rip=1 << 40).validate()
    with pytest.raises(InputError):
        InitialState(rip=BASE, mode="long64", cr3=0x1234).validate()
    with pytest.raises(InputError):
        InitialState(rip=BASE, regs=(("rip", 1),)).validate()
    with pytest.raises(InputError):
        UcEngine(initial=InitialState(rip=BASE, mode="long64"))
    with pytest.raises(InputError):
        UcEngine(pool_pages=4)
    bad = Vmcb(cr0=0x80000011)  # paging without long mode
    assert "long mode" in (check_vmcb_state(bad) or "")
    assert check_vmcb_state(Vmcb(cr0=0x10)) is not None  # real mode
    # a VMCB the engine cannot run: VMEXIT_INVALID with the reason, nothing executed
    m = machine()
    vm = m.hv.create_vm("bad", 16 * MiB, VmKind.SEV)
    m.hv.launch(vm, [(BASE, LOOP.ljust(4096, b"\0"))])
    eng = UcEngine()
    v = vm.add_vcpu(eng)
    v.vmcb.cr0, v.vmcb.rip = 0x80000011, BASE
    r = run(m, vm)
    assert r.exit.code == ExitCode.INVALID and "long mode" in (eng.crash or "")


def test_scan_io_candidates() -> None:
    page = bytes.fromhex("90 66 ee 90 e4 71 48 90 f3 6e 0f 01 d9")
    ranges = scan_io_candidates(page)
    assert (1, 2) in ranges  # 66 ee: out %ax,%dx with its prefix
    assert (4, 4) in ranges  # e4 71: in $0x71,%al
    assert (8, 9) in ranges  # f3 6e: rep outsb
    assert all(page[last] in b"\x6c\x6d\x6e\x6f\xe4\xe5\xe6\xe7\xec\xed\xee\xef" for _, last in ranges)


def test_serial_console_port() -> None:
    assert COM1 == 0x3F8


# mov $EFER,%ecx; rdmsr; or $0x800,%eax; wrmsr; rdmsr; mov %eax,%ebp; hlt;
# xor %eax,%eax; vmgexit (rep vmmcall); mov %eax,%esi; hlt; pvalidate
SHARED = bytes.fromhex("b9800000c00f320d000800000f300f3289c5f4" "31c0f30f01d989c6f4" "f20f01ff")


@pytest.mark.parametrize("kind", [VmKind.PLAIN, VmKind.SEV])
def test_shared_instruction_semantics_on_real_code(kind: VmKind) -> None:
    """EFER is the CPU's (no exit), VMGEXIT outside SEV-ES is VMMCALL, PVALIDATE outside SNP is #UD --
    decided by hw/x86/insn.py, the same code the Python engine runs."""
    m = machine()
    vm, eng = launch(m, SHARED, kind)
    assert run(m, vm).reason == "hlt"
    v = vm.vcpus[0].vmcb
    assert v.regs["rbp"] & 0xFFFFFFFF == 0x800 and v.efer & 0x800
    assert "MSR" not in eng.stats.by_reason
    assert run(m, vm).reason == "hlt"
    assert eng.stats.by_reason["VMMCALL"] == 1
    assert v.regs["rsi"] & 0xFFFFFFFF == ((1 << 64) - 1000) & 0xFFFFFFFF  # KVM's -ENOSYS for hypercall 0
    r = run(m, vm)
    assert r.exit.code == ExitCode.SHUTDOWN
    assert "#UD" in (vm.crash_reason or "") and "PVALIDATE outside an SEV-SNP guest" in (vm.crash_reason or "")
    assert eng.crash_rip == BASE + len(SHARED) - 4


def test_a_vmgexit_remembered_in_an_sev_es_run_is_vmmcall_in_a_run_without_sev_es() -> None:
    """The engine remembers a VMGEXIT it stopped at (RIP, mode, instruction bytes) with its known
    port-I/O exits, for an SEV-ES guest; a VMRUN without SEV-ES at the same RIP with the same bytes
    -- the memo made in an SEV-ES run, here planted -- still executes VMMCALL."""
    m = machine()
    vm, eng = launch(m, SHARED, VmKind.SEV)
    assert run(m, vm).reason == "hlt"
    rip = BASE + 21  # (after the first HLT: xor %eax,%eax; then the VMGEXIT)
    assert eng.read_code(rip, 3) == bytes.fromhex("f30f01")
    long_mode = bool(vm.vcpus[0].vmcb.cr0 & 1 << 31)
    assert eng._ports is not None
    eng._ports.remember(rip, eng.read_code(rip, 16), long_mode, VmExit(ExitCode.VMGEXIT, 0, rip + 4))
    assert run(m, vm).reason == "hlt"
    assert eng.stats.by_reason["VMMCALL"] == 1 and "VMGEXIT" not in eng.stats.by_reason
    assert rip not in eng._ports.exits


def _reachable_bytes(root: object) -> list[bytes]:
    """Every byte buffer reachable from ``root`` through instances and containers (not through
    classes, modules or functions: those lead to the rest of the program)."""
    seen: set[int] = set()
    todo = [root]
    out: list[bytes] = []
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)):
            continue
        if isinstance(obj, (bytes, bytearray, memoryview, array.array)):
            out.append(bytes(obj))
            continue
        if isinstance(obj, mmap.mmap):
            if not obj.closed:
                out.append(obj[:])
            continue
        if isinstance(obj, types.MethodType):
            todo.append(obj.__self__)
            continue
        todo.extend(gc.get_referents(obj))
    return out


def test_close_leaves_no_plaintext_in_the_engine_and_detaches_it() -> None:
    m = machine()
    vm, eng = launch(m, MARKER, VmKind.SEV)
    assert run(m, vm).reason == "hlt"  # the guest wrote the marker into private memory
    assert any(MARKER_TEXT[:24] in b for b in _reachable_bytes(eng))  # held in the pool: the check can fail
    pool = eng.pool
    assert pool in m.soc.cache.agents
    eng.close()
    assert pool not in m.soc.cache.agents and eng not in m.soc.cache.agents
    assert not any(MARKER_TEXT[:24] in b for b in _reachable_bytes(eng))
    assert not any(MARKER_TEXT[:24] in b for b in _reachable_bytes(pool))
    assert eng.resident_pages() == [] and eng.closed
    with pytest.raises(EngineClosedError, match="closed"):
        m.hv.run(vm)
    eng.close()  # closing twice is harmless
    # the guest's plaintext went to the cache before the pool was zeroed (not lost): a new engine
    # picks the guest up where it was
    eng2 = UcEngine(pool_pages=256)
    assert m.hv.run(vm, engine=eng2).reason == "hlt"
    assert vm.vcpus[0].vmcb.regs["rax"] == int.from_bytes(MARKER_TEXT[:4], "little")
    eng2.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("close", [True, False])
def test_engines_created_and_dropped_do_not_accumulate(close: bool) -> None:
    """A long-lived host runs guest after guest: closed (or merely dropped) engines are freed, the
    watchdog walks only live ones, and memory stays flat."""
    m = machine()
    vm = m.hv.create_vm("churn", 16 * MiB, VmKind.SEV)
    m.hv.launch(vm, [(BASE, b"\xf4".ljust(4096, b"\0"))])
    v = vm.add_vcpu()
    gc.collect()
    base = len(WATCHDOG)
    refs = []

    def cycle() -> None:
        eng = UcEngine(pool_pages=32)
        InitialState(rip=BASE).apply(v.vmcb)
        assert m.hv.run(vm, engine=eng).reason == "hlt"
        assert len(WATCHDOG) <= base + 1 + (0 if close else len(refs))
        refs.append(weakref.ref(eng))
        v.engine = None
        if close:
            eng.close()
            assert len(WATCHDOG) <= base  # gone (an earlier test's engine may be collected meanwhile)

    for _ in range(5):
        cycle()
    gc.collect()
    before = _rss()
    gc_was = gc.isenabled()
    if close:
        gc.disable()  # a closed engine is freed by reference counting alone: no cycles left
    try:
        for _ in range(40):
            cycle()
        if close:
            assert all(r() is None for r in refs)
    finally:
        if gc_was:
            gc.enable()
    gc.collect()
    time.sleep(0.02)  # a watchdog tick
    assert all(r() is None for r in refs)
    assert len(WATCHDOG) <= base
    assert _rss() - before < 16 * MiB, f"{(_rss() - before) / MiB:.1f} MiB more after 40 engines"


@pytest.mark.parametrize("kind,flush", [(VmKind.SEV, "wbinvd"), (VmKind.PLAIN, "wbinvd"), (VmKind.PLAIN, "clflush")])
def test_host_flushes_make_the_engine_drop_its_page_copies(kind: VmKind, flush: str) -> None:
    """WBINVD / CLFLUSH snoop the engine's page pool: after them the guest reads DRAM again, so a
    physical write to DRAM in between is what the guest sees (decrypted with its key under SEV)."""
    m = machine()
    vm, eng = launch(m, MARKER, kind)
    assert run(m, vm).reason == "hlt"  # the marker is in the guest's page: pool and cache
    spa = vm.spa_of(0x300000)
    host = m.soc.host_view().boot_cpu
    if flush == "wbinvd":
        host.wbinvd()
    else:
        host.clflush(spa)  # the host's own line: for a plain guest, the guest's line too
    m.soc.dram.write(spa, b"ATTACKER")  # DRAM written behind the caches (a physical attacker)
    refreshes = eng.stats.slot_refreshes
    assert run(m, vm).reason == "hlt"
    got = vm.vcpus[0].vmcb.regs["rax"] & 0xFFFFFFFF
    assert got != int.from_bytes(MARKER_TEXT[:4], "little")  # not the copy the engine held
    if kind is VmKind.PLAIN:
        assert got == int.from_bytes(b"ATTA", "little")
    assert eng.stats.slot_refreshes > refreshes


# mov $0x300000,%edi; mov $msg,%esi; mov $64,%ecx; cld; rep movsb; hlt; wbinvd; mov 0x300000,%eax; hlt; msg
MARKER_WBINVD = bytes.fromhex("bf00003000be1b001000b940000000fcf3a4f40f09a100003000f4") + MARKER_TEXT


def test_the_guests_wbinvd_empties_the_engines_pool_and_the_guest_reads_dram_again() -> None:
    """The guest's own WBINVD writes back and forgets every page the engine holds (its private cache
    level), without re-reading them: the page the guest reads next comes from DRAM -- here what a
    physical attacker wrote behind the caches while the engine held a clean copy."""
    m = machine()
    vm, eng = launch(m, MARKER_WBINVD, VmKind.PLAIN)
    assert run(m, vm).reason == "hlt"  # the marker written: in the engine's pool
    spa = vm.spa_of(0x300000)
    host = m.soc.host_view().boot_cpu
    host.host_read(0x4000000, 2 * m.soc.cache.size)  # the guest's lines leave the shared cache (to DRAM)
    assert m.soc.cache.peek(0, False, spa) is None
    m.soc.dram.write(spa, b"ATTACKER")  # behind every cache: the engine's copy still says the marker
    assert any(p[2] == spa & ~0xFFF for p in eng.resident_pages())
    reread: list[int] = []
    refresh = eng.pool.refresh_stale

    def counting() -> list[int]:
        reread.extend(eng.pool.stale)
        return refresh()

    eng.pool.refresh_stale = counting  # type: ignore[method-assign]
    assert run(m, vm).reason == "hlt"
    assert vm.vcpus[0].vmcb.regs["rax"] & 0xFFFFFFFF == int.from_bytes(b"ATTA", "little")
    assert reread == []  # forgotten, not re-read
    assert eng.stats.by_reason.get("WBINVD") is None  # handled inside the CPU


def test_streaming_host_write_reaches_a_page_the_engine_holds() -> None:
    """A non-temporal store (or a DMA write) to memory whose lines are no longer in the shared cache
    still snoops the engine's copy: the guest sees the new bytes."""
    m = machine()
    vm, _eng = launch(m, MARKER, VmKind.PLAIN)
    assert run(m, vm).reason == "hlt"
    host = m.soc.host_view().boot_cpu
    host.host_read(0x4000000, 2 * m.soc.cache.size)  # evicts the guest's (clean) lines from the cache
    spa = vm.spa_of(0x300000)
    assert m.soc.cache.peek(0, False, spa) is None
    host.host_write_stream(spa, b"STREAMED")
    assert run(m, vm).reason == "hlt"
    assert vm.vcpus[0].vmcb.regs["rax"] & 0xFFFFFFFF == int.from_bytes(b"STRE", "little")


def test_host_write_of_whole_lines_updates_the_engines_copy_in_place() -> None:
    """Write-update: a host write of whole lines to a page the engine holds (the guest stopped,
    its modifications written back) goes into the engine's copy as it goes into the cache -- the
    guest sees the new bytes, without the copy being dropped and re-read."""
    m = machine()
    vm, eng = launch(m, MARKER, VmKind.PLAIN)
    assert run(m, vm).reason == "hlt"  # the guest wrote the marker: its page is in the pool
    host = m.soc.host_view().boot_cpu
    spa = vm.spa_of(0x300000)
    updates, refreshes = eng.stats.slot_updates, eng.stats.slot_refreshes
    host.host_write(spa, b"ATTACKER" * 8)  # one whole line
    assert eng.stats.slot_updates == updates + 1
    assert run(m, vm).reason == "hlt"
    assert vm.vcpus[0].vmcb.regs["rax"] & 0xFFFFFFFF == int.from_bytes(b"ATTA", "little")
    assert eng.stats.slot_refreshes == refreshes
    assert m.soc.cache.read(0, False, spa, 64) == b"ATTACKER" * 8  # the cache holds what the guest sees


def test_only_write_updates_of_pages_the_guest_executes_are_reported_for_a_rescan() -> None:
    """The engine rescans code among the slots a host write updated in place; the pool reports
    only slots the engine fetched code from (its port scanner's set), so a data page's update --
    an SEV-ES guest's GHCB answer at every VMGEXIT -- costs no rescan."""
    m = machine()
    vm, eng = launch(m, MARKER, VmKind.PLAIN)
    assert run(m, vm).reason == "hlt"
    pool, host = eng.pool, m.soc.host_view().boot_cpu
    assert pool.code_slots is not None and pool.code_slots  # the engine's executable slots, kept current
    host.host_write(vm.spa_of(0x300000), b"ATTACKER" * 8)  # a data page: updated in place, not reported
    assert pool.updated == [] and eng.stats.slot_updates > 0
    code = next(iter(pool.code_slots))
    spa = pool.slot_key[code]  # (a plain VM's page: the host's domain, the key is the SPA)
    old = host.host_read(spa, 64)
    host.host_write(spa, bytes(b ^ 0xFF for b in old))
    assert pool.updated == [code]


def test_host_write_of_whole_lines_never_reaches_an_sev_guests_private_copy() -> None:
    """The host's whole-line write to the SPA of an SEV guest's private page names the host's
    domain: the engine's plaintext copy (the guest's domain) takes nothing, and the guest keeps
    reading its own plaintext, not the host's bytes."""
    m = machine()
    vm, eng = launch(m, MARKER, VmKind.SEV)
    assert run(m, vm).reason == "hlt"
    host = m.soc.host_view().boot_cpu
    spa = vm.spa_of(0x300000)
    updates = eng.stats.slot_updates
    host.host_write(spa, b"ATTACKER" * 8)
    assert eng.stats.slot_updates == updates
    assert run(m, vm).reason == "hlt"
    got = vm.vcpus[0].vmcb.regs["rax"] & 0xFFFFFFFF
    assert got == int.from_bytes(MARKER_TEXT[:4], "little")
    assert got != int.from_bytes(b"ATTA", "little")


# addl $1,0x100040 (a counter in the code page itself); mov 0x100040,%eax; hlt
RMW_ON_CODE_PAGE = bytes.fromhex("83054000100001a140001000f4").ljust(0x40, b"\x90") + bytes(4)


def test_a_read_modify_write_that_makes_its_own_code_page_writable_runs_once() -> None:
    """The add's store makes its code page writable, which asks for a TB flush and so a stop from
    inside the store's fill.  Unicorn 2.1.4 honours a pending stop after the store and resumes at the
    start of the add, whose store is done (``tests/hw/test_hw_unicorn_stop.py``): the add ran again,
    its fetch took the write grant back, its store asked for it again, and the guest never halted.
    The engine's stops now wait for the next block boundary.  Run in a child process with a time
    limit: the failure mode is a hang."""
    import subprocess
    import sys
    from pathlib import Path

    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_hw_ucengine import RMW_ON_CODE_PAGE, launch, machine, run\n"
              "from sevemu.hypervisor.vm import VmKind\n"
              "for kind in (VmKind.PLAIN, VmKind.SEV):\n"
              "    m = machine()\n"
              "    vm, _ = launch(m, RMW_ON_CODE_PAGE, kind)\n"
              "    r = run(m, vm)\n"
              "    print(kind.name, r.reason, vm.vcpus[0].vmcb.regs['rax'])\n")
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the guest's read-modify-write on its own code page never finished (it ran again and again)")
    assert out.stdout.split() == ["PLAIN", "hlt", "1", "SEV", "hlt", "1"]


def test_time_slices_end_between_instructions() -> None:
    """A loop of read-modify-writes cut into many time slices by the watchdog counts exactly: a
    slice ends at a block boundary, never inside the add between its store and its retirement."""
    n = 3_000_000
    # movl $0,0x200000; mov $n,%ecx; 1: addl $1,0x200000; loop 1b; mov 0x200000,%eax; hlt
    code = (bytes.fromhex("c7050000200000000000b9") + n.to_bytes(4, "little")
            + bytes.fromhex("83050000200001e2f7a100002000f4"))
    for kind in (VmKind.PLAIN, VmKind.SEV):
        m = machine()
        vm, eng = launch(m, code, kind, slice_s=0.001)
        assert run(m, vm).reason == "hlt"
        assert vm.vcpus[0].vmcb.regs["rax"] == n
        assert eng.stats.by_reason["INTR"] >= 1  # (the slices did end: 10-20 on this machine)
