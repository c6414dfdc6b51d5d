"""Issue 8 item 5: the host cannot choose an SEV guest's code.

Each test is a host attack written with host interfaces only (the hypervisor's API, the SoC's host
view with its VMRUN, host reads and writes) against a NODBG guest that keeps a secret; each asserts
the hardware's answer: the guest dies (SHUTDOWN, a triple fault) or VMRUN refuses, and the secret
reaches nothing the host can read.  A Python workload runs in an SEV guest only when the guest's
measured program table lists it (:mod:`sevemu.abi.pycode`, :mod:`sevemu.hw.codefetch`).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from hvkit import small_machine

from sevemu._util.units import PAGE, MiB
from sevemu.abi.paging import ExitCode
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.pycode import CODE_GPA, code_table, parse_code_table, program_identity
from sevemu.errors import InputError
from sevemu.guest.kernel import boot, print_
from sevemu.hw.cpu import ForeignEngineError, GuestCpu
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hw.svm import Vmcb, VmExit
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.owner.measurement import expected_launch_digest
from sevemu.scenario import Machine

MEM = 4 * MiB
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
SECRET = b"the victim's disk key: 32 bytes!"
IMAGE = b"\xf4" * PAGE


def _victim_code() -> Generator[Op, Any, None]:
    yield from boot(MEM)
    yield op.write(SECRET_GPA, SECRET)
    yield op.hlt()
    while True:  # later runs: say "still here" (never the secret)
        yield from print_("still here\n")
        yield op.hlt()


def _evil(out: list[bytes]) -> Generator[Op, Any, None]:
    """The host's program: read the secret and print it on the (host's) serial console."""
    yield from boot(MEM)
    data = yield op.read(SECRET_GPA, len(SECRET))
    out.append(data)
    yield from print_(data.hex() + "\n")
    yield op.hlt()


def _lurker(out: list[bytes]) -> Generator[Op, Any, None]:
    """The host's program that waits: halts at once, and on its next run reads the secret."""
    yield op.hlt()
    out.append((yield op.read(SECRET_GPA, len(SECRET))))
    yield op.hlt()


def _victim(m: Machine, programs: tuple[Any, ...] = (_victim_code,)) -> Vm:
    vm = m.hv.create_vm("victim", MEM)
    m.hv.launch(vm, [(IMAGE_GPA, IMAGE)], int(GuestPolicy.NODBG), programs=programs)
    vm.add_vcpu(PyEngine(_victim_code()))
    assert m.hv.run(vm).reason == "hlt", vm.crash_reason
    return vm


def _leaked(m: Machine, vm: Vm, out: list[bytes]) -> bool:
    m.soc.wbinvd_all()
    return (any(SECRET in d for d in out) or SECRET.hex().encode() in vm.console
            or bool(m.soc.dram.find(SECRET[:16])))


def test_the_victim_runs_its_own_measured_code() -> None:
    m = small_machine()
    vm = _victim(m)
    assert m.hv.run(vm).reason == "hlt" and vm.console.endswith(b"still here\n")


def test_run_with_a_host_written_workload_kills_the_guest() -> None:
    """``Hypervisor.run(vm, engine=PyEngine(host_code))``: the code fetch finds the workload in no
    program table of the guest -- the guest dies, nothing of it was read."""
    m = small_machine()
    vm = _victim(m)
    out: list[bytes] = []
    r = m.hv.run(vm, engine=PyEngine(_evil(out)))
    assert r.exit.code == ExitCode.SHUTDOWN and vm.state is VmState.CRASHED
    assert "code fetch" in r.reason and "not in the guest's program table" in r.reason
    assert not out and not _leaked(m, vm, out)


def test_host_built_vmcb_with_the_victims_asid_runs_no_host_code() -> None:
    """VMRUN of a VMCB the host built with the victim's ASID and nested tables: the host's workload
    dies at its first fetch; a host-defined engine object is refused before anything runs."""
    m = small_machine()
    vm = _victim(m)
    host = m.soc.host_view()
    vmcb = Vmcb(asid=vm.asid, np_enable=True, sev_enable=True, ncr3=vm.vcpus[0].vmcb.ncr3)
    out: list[bytes] = []
    ex = host.boot_cpu.vmrun(vmcb, PyEngine(_evil(out)))
    assert ex.code == ExitCode.SHUTDOWN and not out

    class HostEngine:  # "an engine" that is just host code reading through the guest's port
        def run(self, cpu: GuestCpu) -> VmExit:
            out.append(cpu.read(SECRET_GPA, len(SECRET)))
            return VmExit(ExitCode.HLT)

    class Disguised(PyEngine):  # a subclass of the CPU's engine is not the CPU's engine
        def run(self, cpu: GuestCpu) -> VmExit:
            out.append(cpu.read(SECRET_GPA, len(SECRET)))
            return VmExit(ExitCode.HLT)

    runs = m.soc.boot_cpu.vmruns
    for engine in (HostEngine(), Disguised(_victim_code())):
        with pytest.raises(ForeignEngineError, match="runs only its own code"):
            host.boot_cpu.vmrun(vmcb, engine)  # type: ignore[arg-type]
    assert m.soc.boot_cpu.vmruns == runs and not out and not _leaked(m, vm, out)
    # a plain guest has nothing to protect: any engine runs there
    plain = Vmcb(asid=m.profile.max_asid + 7, np_enable=True, ncr3=vm.vcpus[0].vmcb.ncr3)
    assert host.boot_cpu.vmrun(plain, HostEngine()).code == ExitCode.HLT  # type: ignore[arg-type]


def test_code_bound_to_the_hosts_own_guest_does_not_run_in_the_victim() -> None:
    """The host launches its own SEV guest with the evil program measured in, then runs that engine
    on the victim's ASID: the victim's table (under the victim's key) does not list it."""
    m = small_machine()
    vm = _victim(m)
    mine = m.hv.create_vm("attacker", MEM)
    m.hv.launch(mine, [], programs=[_evil, _lurker])
    out: list[bytes] = []
    engine = PyEngine(_lurker(out))
    mine.add_vcpu()
    assert m.hv.run(mine, 0, engine=engine).reason == "hlt"  # fetched and accepted under mine's key
    vmcb = Vmcb(asid=vm.asid, np_enable=True, sev_enable=True, ncr3=vm.vcpus[0].vmcb.ncr3)
    assert m.soc.host_view().boot_cpu.vmrun(vmcb, engine).code == ExitCode.SHUTDOWN  # fetched again
    assert PyEngine(_evil(out)).identity != engine.identity
    assert m.soc.host_view().boot_cpu.vmrun(vmcb, PyEngine(_evil(out))).code == ExitCode.SHUTDOWN
    # ... nor with the attacker's nested tables (its table page decrypts under the victim's key)
    vmcb2 = Vmcb(asid=vm.asid, np_enable=True, sev_enable=True, ncr3=mine.npt.root)
    assert m.soc.host_view().boot_cpu.vmrun(vmcb2, PyEngine(_evil(out))).code == ExitCode.SHUTDOWN
    assert not out and not _leaked(m, vm, out)


def test_host_writes_to_the_program_table_only_kill_the_guest() -> None:
    """The host overwrites the table page, or puts its own guest's table ciphertext there: it
    decrypts to garbage under the victim's key.  The guest dies (denial of service, as on hardware)."""
    m = small_machine()
    vm = _victim(m)
    m.soc.wbinvd_all()
    vm.host_write(CODE_GPA, code_table([_evil]))  # plaintext from the host: ciphertext to the guest
    m.soc.wbinvd_all()
    out: list[bytes] = []
    r = m.hv.run(vm, engine=PyEngine(_evil(out)))
    assert r.exit.code == ExitCode.SHUTDOWN and "no program table" in r.reason
    assert not out and not _leaked(m, vm, out)


def test_the_owner_sees_which_code_was_bound() -> None:
    """The program table is launch data: binding other code changes the launch digest the owner
    checks, so a host that launches the owner's image with its own program is caught."""
    m = small_machine()
    honest = m.hv.create_vm("honest", MEM)
    m.hv.launch(honest, [(IMAGE_GPA, IMAGE)], programs=[_victim_code])
    swapped = m.hv.create_vm("swapped", MEM)
    m.hv.launch(swapped, [(IMAGE_GPA, IMAGE)], programs=[_evil])
    want = expected_launch_digest([IMAGE, code_table([_victim_code])])
    assert want != expected_launch_digest([IMAGE, code_table([_evil])])
    assert honest.measurement != swapped.measurement  # the LAUNCH_MEASURE blobs (MAC over the digest)
    report = m.hv.attestation_report(honest, bytes(16))
    assert want in report and want not in m.hv.attestation_report(swapped, bytes(16))


def test_program_identity_and_table_choices() -> None:
    """What identifies a program (code, not its arguments or where the file puts it), and bad tables."""
    assert program_identity(_evil) == program_identity(_evil([]))
    assert program_identity(_evil) != program_identity(_victim_code)
    table = code_table([_victim_code, _evil, _victim_code])
    assert parse_code_table(table) == 2 and len(table) == 0x20 + 2 * 32
    for bad in (b"", b"SEVEMUPY" + bytes(24), table[:8] + b"\x02" + table[9:], table[:0x10] + b"\x01" + table[0x11:]):
        assert parse_code_table(bad) == 0
    with pytest.raises(InputError, match="1 to 127 programs"):
        code_table([])
    with pytest.raises(InputError, match="generator function"):
        program_identity(42)
    finished = _victim_code()
    finished.close()
    with pytest.raises(InputError, match="already finished"):
        program_identity(finished)
    m = small_machine()
    vm = m.hv.create_vm("overlap", MEM)
    pages = m.hv.pages.allocated
    with pytest.raises(InputError, match="overlaps the program table"):
        m.hv.launch(vm, [(0, b"x" * 64)], programs=[_evil])
    with pytest.raises(InputError, match="no page of"):
        m.hv.launch(vm, [], programs=[_evil], code_gpa=MEM)
    assert vm.state is VmState.CREATED and m.hv.pages.allocated == pages


def test_plain_guests_run_any_workload() -> None:
    m = small_machine()
    vm = m.hv.create_vm("plain", MEM, VmKind.PLAIN)
    m.hv.launch(vm, [(IMAGE_GPA, IMAGE)])
    out: list[bytes] = []
    assert m.hv.run(vm, engine=PyEngine(_evil(out)), vcpu=vm.add_vcpu()).reason == "hlt" and out


def test_an_engine_accepted_before_is_fetched_again_after_asid_reuse() -> None:
    """The host's engine ran in its own guest on ASID a; that guest is destroyed and the victim gets
    ASID a (a new launch, a new key): the same engine object on the victim's VMCB fetches the
    victim's table and dies."""
    import dataclasses

    from sevemu.hw.profiles import MILAN

    m = small_machine(dataclasses.replace(MILAN, max_asid=100))  # type: ignore[arg-type]  # one SEV ASID
    mine = m.hv.create_vm("attacker", MEM)
    m.hv.launch(mine, [], programs=[_lurker])
    out: list[bytes] = []
    engine = PyEngine(_lurker(out))
    mine.add_vcpu()
    assert m.hv.run(mine, 0, engine=engine).reason == "hlt"
    asid = mine.asid
    mine.vcpus[0].engine = None  # the host keeps its engine object; the VM lets go of it
    m.hv.destroy(mine)
    vm = _victim(m)
    assert vm.asid == asid
    vmcb = Vmcb(asid=vm.asid, np_enable=True, sev_enable=True, ncr3=vm.vcpus[0].vmcb.ncr3)
    assert m.soc.host_view().boot_cpu.vmrun(vmcb, engine).code == ExitCode.SHUTDOWN
    assert not out and not _leaked(m, vm, out)
