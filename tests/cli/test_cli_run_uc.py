"""``sevemu run`` (cli/run.py) and ``sevemu bench cpu`` (cli/bench_cpu.py) as a user drives them."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevemu.cli import bench_cpu
from sevemu.cli.main import main
from sevemu.errors import GuestBuildError, InputError
from sevemu.guest.build import GUESTS, toolchain

pytest.importorskip("unicorn")


@pytest.fixture(scope="module", autouse=True)
def _guest_builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    old = os.environ.get("SEVEMU_BUILD_DIR")
    os.environ["SEVEMU_BUILD_DIR"] = str(tmp_path_factory.getbasetemp() / "guest-builds")
    yield
    if old is None:
        os.environ.pop("SEVEMU_BUILD_DIR", None)
    else:
        os.environ["SEVEMU_BUILD_DIR"] = old


@pytest.fixture
def gcc() -> None:
    try:
        toolchain()
    except GuestBuildError as exc:
        pytest.skip(str(exc))


def test_run_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for name in GUESTS:
        assert name in out
    assert "prints through the serial console" in out


@pytest.mark.parametrize("mode", ["plain", "sev"])
def test_run_hello(gcc: None, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "hello", "--mode", mode, "--seed", "cli"]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Hello from a sevemu guest")  # the console, on stdout
    assert "finished" in cap.err
    if mode == "sev":
        assert "launch measurement" in cap.err and "verified" in cap.err


def test_run_json_and_vcpus(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "smp", "--vcpus", "2", "--json", "--seed", "cli"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["status"] == "finished" and r["vcpus"] == 2 and r["mode"] == "sev"
    assert r["measurement_verified"] is True
    assert "smp: 2 vCPU(s)" in r["console"]


def test_run_crash_is_reported_not_raised(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "crash", "--mode", "plain"]) == 1
    err = capsys.readouterr().err
    assert "crashed at RIP 0x" in err and "#UD" in err


def test_run_bad_inputs(gcc: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nosuchguest"]) == 2
    assert "no bundled guest" in capsys.readouterr().err
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { this is not C; }\n")
    assert main(["run", str(broken)]) == 2
    assert "compiling broken.c failed" in capsys.readouterr().err
    assert main(["run", "hello", "--memory", "1"]) == 2
    assert "more than the VM" in capsys.readouterr().err
    assert main(["run", "hello", "--vcpus", "0"]) == 2
    assert "--vcpus" in capsys.readouterr().err
    assert main(["run"]) == 2


def test_bench_cpu_small(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    bench_cpu.register_cpu(p.add_subparsers())
    args = p.parse_args(["cpu", "--json", "--iterations", "20000", "--exits", "2000", "--repeat", "1"])
    assert bench_cpu.run_cpu(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["compute"]["instructions"] == 20000 * bench_cpu.INSNS_PER_ITERATION
    assert r["compute"]["guest_instructions_per_s"] > 0 and r["compute"]["bare_instructions_per_s"] > 0
    assert r["exits"]["round_trips"] == 2000 and r["exits"]["round_trips_per_s"] > 0
    assert set(r["targets"]) == {"compute_ratio", "exit_round_trips_per_s", "vmgexit_round_trips_per_s",
                                 "vmgexit_to_exit_ratio"}
    g = r["vmgexits"]  # the SEV-ES guest of the same run
    assert g["round_trips"] == 2000 and g["round_trips_per_s"] > 0 and g["vc_round_trips"] == 500
    assert g["ratio_to_exits"] == pytest.approx(g["round_trips_per_s"] / r["exits"]["round_trips_per_s"])
    # the same loops in this process's CPU time (what a shared machine's other load does not slow)
    assert r["exits"]["cpu_round_trips_per_s"] > 0 and g["cpu_round_trips_per_s"] > 0
    assert g["vc_cpu_round_trips_per_s"] > 0
    assert g["cpu_ratio_to_exits"] == pytest.approx(g["cpu_round_trips_per_s"] / r["exits"]["cpu_round_trips_per_s"])
    args = p.parse_args(["cpu", "--iterations", "20000", "--exits", "1000", "--repeat", "1"])
    assert bench_cpu.run_cpu(args) == 0
    out = capsys.readouterr().out
    assert "VMEXIT round trips" in out and "VMGEXIT round trips (SEV-ES guest" in out
    assert f"both computed {_reference_compute(20000):016x}" in out


def _reference_compute(n: int) -> int:
    """bench_compute's loop in Python (xorshift64, the sum of every state): an independent count."""
    x, acc, mask = 0x9E3779B97F4A7C15, 0, (1 << 64) - 1
    for _ in range(n):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        acc = (acc + x) & mask
    return acc


def test_bench_compute_counts_the_instructions_it_runs(gcc: None) -> None:
    # INSNS_PER_ITERATION against the built image: instructions executed (a code hook counts them)
    # for two loop lengths; a compiler or source change that alters the loop fails here, not silently
    # in the instructions/s.
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const

    image = bench_cpu.load_image("bench")
    mu = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    size = (len(image.data) + 0x10000 + 0xFFF) & ~0xFFF
    mu.mem_map(image.base, size)
    mu.mem_write(image.base, image.data)
    stack, ret = image.base + size - 64, image.base + size - 16
    mu.mem_write(stack, ret.to_bytes(8, "little"))
    count = [0]
    mu.hook_add(unicorn.UC_HOOK_CODE, lambda *a: count.__setitem__(0, count[0] + 1))
    executed = {}
    for n in (10, 30):
        count[0] = 0
        mu.reg_write(x86_const.UC_X86_REG_RDI, n)
        mu.reg_write(x86_const.UC_X86_REG_RSI, image.symbol("bench_buffer"))
        mu.reg_write(x86_const.UC_X86_REG_RSP, stack)
        mu.emu_start(image.symbol("bench_compute"), ret)
        executed[n] = count[0]
        assert mu.reg_read(x86_const.UC_X86_REG_RAX) == _reference_compute(n)
    assert executed[30] - executed[10] == 20 * bench_cpu.INSNS_PER_ITERATION


def test_bench_compute_runs_the_whole_loop_on_both_sides(gcc: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # the bare runner's result is the loop's (computed independently), the guest's is the same
    image = bench_cpu.load_image("bench")
    seconds, result = bench_cpu._bare_compute(image, 1000)
    assert seconds > 0 and result == _reference_compute(1000)
    r = bench_cpu.measure(iterations=1000, exits=200, repeat=1)
    assert r["compute"]["result"] == f"{_reference_compute(1000):016x}"
    # a side that ran another loop (a miscount, a loop cut short) is refused, not compared
    real = bench_cpu._bare_compute
    monkeypatch.setattr(bench_cpu, "_bare_compute", lambda im, n: real(im, n - 1))
    with pytest.raises(InputError, match="did not run the same loop"):
        bench_cpu.measure(iterations=1000, exits=200, repeat=1)


def test_bare_runner_is_w_xor_x_and_runs_self_modifying_code() -> None:
    from sevemu.hw.uc import binding as uc
    from sevemu.hw.uc.bare import BareRunner, _w_xor_x

    assert _w_xor_x(uc.UC_MEM_FETCH) == uc.UC_PROT_READ | uc.UC_PROT_EXEC
    assert _w_xor_x(uc.UC_MEM_WRITE) == uc.UC_PROT_READ | uc.UC_PROT_WRITE
    assert _w_xor_x(16) == uc.UC_PROT_READ  # UC_MEM_READ
    # code that stores `inc rax` over the NOPs it then executes, in its own page
    base = 0x100000
    target = base + 0x20
    code = (b"\x48\x31\xc0"                                                      # xor rax, rax
            + b"\xc7\x04\x25" + target.to_bytes(4, "little") + b"\x48\xff\xc0\x90"  # mov dword [target], inc rax; nop
            + b"\xeb" + bytes([0x20 - 16]))                                       # jmp target
    image = code.ljust(0x20, b"\x90") + b"\x90" * 4 + b"\xf4"
    for wx in (True, False):
        runner = BareRunner(image, base, extra=0x1000, w_xor_x=wx)
        try:
            assert runner.call(base, target + 4)["rax"] == 1
            assert (runner.tlb_fills > 0) == wx
        finally:
            runner.close()


def test_run_inject_shellcode(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    main(["run", "victim", "--mode", "plain", "--inject-shellcode", "--timeout", "2"])
    assert "PWNED by the hypervisor" in capsys.readouterr().out
    assert main(["run", "victim", "--mode", "sev", "--inject-shellcode", "--timeout", "5", "--seed", "a"]) == 1
    cap = capsys.readouterr()
    assert "PWNED" not in cap.out and "wrote" in cap.err
    assert main(["run", "hello", "--inject-shellcode"]) == 2


def test_run_sev_es_and_its_attacks(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "hello", "--mode", "sev-es", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "sev-es" and r["status"] == "finished" and r["measurement_verified"] is True
    assert main(["run", "regs", "--mode", "sev-es", "--attack-registers"]) == 0
    out = capsys.readouterr()
    assert "key in R12 survived the exit" in out.out and "VMSA page in DRAM" in out.err
    assert main(["run", "regs", "--mode", "sev-es", "--tamper-vmsa"]) == 1
    assert "VMEXIT_INVALID" in capsys.readouterr().err
    assert main(["run", "regs", "--mode", "sev", "--tamper-vmsa"]) == 2
    assert "--tamper-vmsa needs --mode sev-es" in capsys.readouterr().err
    assert main(["run", "hello", "--mode", "sev-es", "--generation", "naples"]) == 2
    assert "has no SEV-ES" in capsys.readouterr().err


def test_run_snp_guests(gcc: None, capsys: pytest.CaptureFixture[str]) -> None:
    for guest in ("hello", "secret"):
        assert main(["run", guest, "--mode", "snp", "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["mode"] == "snp" and r["status"] == "finished", r
    assert main(["run", "sevinfo", "--mode", "snp"]) == 0
    out = capsys.readouterr()
    assert "SEV_STATUS MSR: 7 " in out.out and "SEV-SNP: memory integrity" in out.out
    assert "secrets page: version 2, FMS a00f11, VMPCK0 present" in out.out  # Milan's CPUID(1).EAX
    assert "CPUID page: 4 functions" in out.out and "CPUID page 0x8000001F: EAX 3f EBX 4173" in out.out
    assert "SEV-SNP guest on Milan" in out.err
    assert main(["run", "hello", "--mode", "snp", "--generation", "rome"]) == 2
    assert "has no SEV-SNP" in capsys.readouterr().err
    # memory outside the launch: PSC + PVALIDATE, then #VC 0x404 on demand, then a page given back
    assert main(["run", "snpmem", "--mode", "snp"]) == 0
    out = capsys.readouterr().out
    assert "validated 1 page by PSC + PVALIDATE and 256 on demand (#VC 0x404), sum 32896" in out
    assert "gave one page back" in out
    assert main(["run", "snpmem", "--mode", "sev-es"]) == 0
    assert "not an SEV-SNP guest" in capsys.readouterr().out


def test_snp_on_demand_validation_keeps_the_engines_translations(gcc: None) -> None:
    """The RMPUPDATE of each page KVM assigns on demand changes an entry no TLB holds a verdict of:
    Unicorn's translations stay (it flushed at every such page before: ~260 flushes for snpmem)."""
    from sevemu.cli.run import launch_guest, load_image

    run = launch_guest(load_image("snpmem"), mode="snp")
    try:
        assert run.run(timeout=120).status == "finished"
        assert "256 on demand" in run.console
        assert run.engines[0].stats.tlb_flushes < 16
    finally:
        run.close()


def test_smp_snp_guest_starts_its_aps_with_ap_creation(gcc: None) -> None:
    """`sevemu run smp --mode snp`: the BSP writes each AP's VMSA, RMPADJUSTs it, asks for the AP
    (NAE 0x8000_0013); every AP runs from the guest's page, none from its launched VMSA."""
    from sevemu.cli.run import launch_guest, load_image

    run = launch_guest(load_image("smp"), mode="snp", vcpus=3)
    try:
        out = run.run(timeout=120)
        assert out.status == "finished", (out.reason, run.console)
        assert "smp: 3 vCPU(s), total" in run.console and "vCPU 2: partial sum" in run.console
        line = next(s for s in run.console.splitlines() if s.startswith("smp:"))
        total, expected = line.split("total ")[1].split(" (expected ")
        assert total == expected.rstrip(")")
        for v in run.vm.vcpus[1:]:
            assert v.snp_vmsas == 1 and v.vmcb.vmsa_pa != run.vm.vmsa_pages[v.index]
            assert run.machine.hv.soc.rmp_entry(v.vmcb.vmsa_pa).vmsa  # the guest's RMPADJUST
    finally:
        run.close()


def test_unicorn_vmrun_refuses_a_vmcb_the_host_gave_the_snp_guest(gcc: None) -> None:
    """The Unicorn engine's VMRUN goes through the same checks: a VMCB page the host assigned to the
    guest in the RMP is refused (#GP), before the guest runs; given back, the guest finishes."""
    from sevemu.abi.rmp import RmpResult, RmpUpdateState
    from sevemu.cli.run import launch_guest, load_image
    from sevemu.hw.faults import GeneralProtection

    run = launch_guest(load_image("hello"), mode="snp")
    try:
        hv, vm = run.machine.hv, run.vm
        vmcb = vm.vcpus[0].vmcb
        core = hv.soc.boot_cpu
        assert core.rmpupdate_state(vmcb.pa, RmpUpdateState(gpa=0x7000, assigned=1, asid=vm.asid)) \
            == RmpResult.SUCCESS
        rip = vmcb.rip
        with pytest.raises(GeneralProtection, match="VMCB page"):
            hv.run(vm, 0, max_exits=1)
        assert vmcb.rip == rip and not vm.console
        assert core.rmpupdate_state(vmcb.pa, RmpUpdateState()) == RmpResult.SUCCESS
        assert run.run(timeout=120).status == "finished" and "Hello" in run.console
    finally:
        run.close()
