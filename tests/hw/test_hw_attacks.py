"""Host attacks on the SoC's ASID lifecycle, written with host interfaces only (the hypervisor, the
SoC's host view, the PSP mailbox) and asserting what the hardware answers.

* A "zombie" VMRUN: the host keeps a guest's VMCB and runs it again after the firmware took the
  ASID away (DEACTIVATE, DECOMMISSION, SHUTDOWN).  VMRUN checks the ASID-valid state the Secure
  Processor keeps apart from the key slot: VMEXIT_INVALID, nothing executed, no line dirtied -- so
  no line of the old guest can reach the next guest of that ASID.
* SHUTDOWN with lines of a running guest still dirty: the key slots are cleared under them.  The
  host's next WBINVD must neither raise nor leak: the lines go to DRAM under a key nobody knows.
"""

from __future__ import annotations

import pytest

from sevemu.abi.commands import CommandId
from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp
from sevemu.abi.paging import ExitCode
from sevemu.abi.sev import HandleCmd
from sevemu.abi.status import Status
from sevemu.hw.host import HostSoc
from sevemu.hw.pyengine import PyEngine, Workload, op
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
SECRET = b"victim's data key, 32 bytes long"
CMD_BUF = 0x8000  # a host page the hypervisor does not use: the attacker's own command buffer


def mailbox(host: HostSoc, cmd: CommandId, buf: bytes | None = None) -> int:
    """Issue a firmware command through the mailbox registers, as any host software can; the status."""
    spa = 0
    if buf is not None:
        spa = CMD_BUF
        host.boot_cpu.host_write(spa, buf)
    host.mailbox.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, spa & 0xFFFFFFFF)
    host.mailbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, spa >> 32)
    host.mailbox.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(cmd)))
    return decode_status(host.mailbox.mmio_read(MailboxReg.CMDRESP))


def _writer(secret: bytes) -> Workload:
    yield op.write(SECRET_GPA, secret)
    yield op.hlt()


def _victim() -> tuple[Machine, Vm, HostSoc]:
    m = build_machine("milan", seed="hw-attacks", dram_size=1 << 30, cache_size=256 << 10)
    vm = m.hv.create_vm("victim", 16 * MiB)
    m.hv.launch(vm, [(IMAGE_GPA, bytes(4096))], programs=[_writer])
    vm.add_vcpu(PyEngine(_writer(SECRET)))
    assert m.hv.run(vm).reason == "hlt"
    return m, vm, m.soc.host_view()


def _lines_of(m: Machine, asid: int) -> list[tuple[int, bool, int, bool]]:
    return [line for line in m.soc.cache.resident() if line[0] == asid]


@pytest.mark.parametrize("teardown", ["deactivate", "decommission", "shutdown"])
def test_zombie_vmrun_after_the_firmware_took_the_asid_away(teardown: str) -> None:
    m, vm, host = _victim()
    vmcb = vm.vcpus[0].vmcb
    asid = vmcb.asid
    host.wbinvd_all()  # KVM's flush: nothing of the victim left in the caches
    assert mailbox(host, CommandId.DEACTIVATE, HandleCmd(handle=vm.handle).encode()) == Status.SUCCESS
    if teardown == "decommission":
        assert mailbox(host, CommandId.DECOMMISSION, HandleCmd(handle=vm.handle).encode()) == Status.SUCCESS
    elif teardown == "shutdown":
        assert mailbox(host, CommandId.SHUTDOWN) == Status.SUCCESS
    host.wbinvd_all()
    assert not _lines_of(m, asid)
    dirty_before = set(m.soc.cache.dirty)
    zombie = PyEngine(_writer(b"written by a zombie guest run!!!"))
    vmcb.rip = 0
    ex = host.boot_cpu.vmrun(vmcb, zombie)
    assert ex.code == ExitCode.INVALID and vmcb.exit_code == ExitCode.INVALID
    assert zombie.ops == 0  # nothing ran
    assert not _lines_of(m, asid) and set(m.soc.cache.dirty) == dirty_before  # no line dirtied


def test_shutdown_with_dirty_guest_lines_then_wbinvd() -> None:
    m, vm, host = _victim()
    asid = vm.asid
    spa = vm.spa_of(SECRET_GPA)
    assert any(d for _, _, s, d in _lines_of(m, asid) if s == spa)  # the secret is dirty in the cache
    assert mailbox(host, CommandId.SHUTDOWN) == Status.SUCCESS  # slots cleared under dirty lines
    written = host.wbinvd_all()  # a CPU instruction: never raises, never loses the line silently
    assert written >= 1 and not _lines_of(m, asid)
    assert host.wbinvd_all() == 0  # and the next one works too
    dump = host.boot_cpu.host_read(spa, len(SECRET))
    assert dump != SECRET and SECRET not in b"".join(p for _, p in m.soc.dram.pages())


def test_the_batched_host_read_sees_no_private_plaintext() -> None:
    """The host's read of several runs of lines in one access (the GHCB path) is a host read like any
    other: a guest's private line, dirty in the cache with its plaintext, is not what it returns."""
    m, vm, host = _victim()
    spa = vm.spa_of(SECRET_GPA)
    assert any(d for _, _, s, d in _lines_of(m, vm.asid) if s == spa)  # the plaintext is in the cache
    page, off = spa & ~0xFFF, spa & 0xFFF & ~63
    got = host.boot_cpu.host_read_runs(page, ((off, 64), (0, 128)))
    assert SECRET not in got
    assert got == host.boot_cpu.host_read(page + off, 64) + host.boot_cpu.host_read(page, 128)
