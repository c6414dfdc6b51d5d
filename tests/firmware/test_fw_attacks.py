"""Host attacks on the firmware's checks, written with host interfaces only.

Each test plays the hypervisor as an attacker: it drives the PSP mailbox (``hv.psp``), the host's
own cores and caches (``hv.soc``: loads, stores, CLFLUSH, WBINVD, VMRUN through the run loop) and
its guests, and asserts what the hardware answers.  Internal state is looked at only to check a
test's precondition (e.g. that the victim's plaintext really sits dirty in the caches).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest
from fwkit import call, ok

from sevemu._util.units import PAGE, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.paging import ExitCode
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import (
    ActivateCmd,
    DbgCmd,
    GuestStatusCmd,
    InitCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    MeasureBuf,
    PlatformStatus,
    TransportCmd,
)
from sevemu.abi.states import GuestState
from sevemu.abi.status import Status
from sevemu.crypto.transport import TransportKeys
from sevemu.firmware.core import LOG_SIZE
from sevemu.guest.kernel import boot
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.owner.secret import package_secret
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

MEM = 4 * MiB
SECRET_GPA = 0x20_0000
IMAGE_GPA = 0x10_0000


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="fw-attacks", dram_size=1 << 30, cache_size=1 << 20)


def _writer(gpa: int, data: bytes) -> Generator[Op, Any, None]:
    yield from boot(MEM)
    yield op.write(gpa, data)
    yield op.hlt()


def _victim(m: Machine, secret: bytes, policy: int = GuestPolicy.NODBG) -> Vm:
    """A NODBG guest that booted and wrote ``secret`` (still dirty in the caches)."""
    vm = m.hv.create_vm("victim", MEM)
    m.hv.launch(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], policy=policy)
    vm.add_vcpu(PyEngine(_writer(SECRET_GPA, secret)))
    assert m.hv.run(vm).reason == "hlt"
    return vm


def _dirty_lines(m: Machine, asid: int) -> int:
    """Precondition check only (not a host interface): dirty lines of ``asid`` in the caches."""
    return sum(1 for key in m.soc.cache.dirty if key >> 52 == (asid << 1) | 1)


def _start(m: Machine, policy: int = 0) -> int:
    return LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))).handle


def _dbg_decrypt(m: Machine, handle: int, spa: int, length: int) -> bytes:
    dst = m.hv.psp.put_data(bytes(length))
    ok(m, CommandId.DBG_DECRYPT, DbgCmd(handle=handle, src_paddr=spa | m.profile.cbit_mask, dst_paddr=dst,
                                        len=length))
    return m.hv.psp.get_data(length)


def _leaks(secret: bytes, seen: bytes) -> bool:
    """Whether any 16-byte block of ``secret`` shows up in ``seen``."""
    return any(secret[i : i + 16] in seen for i in range(0, len(secret), 16))


# ---- issue 8 item 1: ASIDs across SHUTDOWN -> INIT -----------------------------------------------
def test_asid_reuse_after_shutdown_and_init_needs_wbinvd_and_df_flush(m: Machine) -> None:
    secret = os.urandom(PAGE)
    victim = _victim(m, secret)
    asid, spa = victim.asid, victim.spa_of(SECRET_GPA)
    assert _dirty_lines(m, asid) >= PAGE // 64  # the victim's plaintext is dirty in the caches

    # the host tears the platform down and up again and gives the victim's ASID to a debuggable guest
    ok(m, CommandId.SHUTDOWN)
    ok(m, CommandId.INIT, InitCmd())
    spy = _start(m, policy=0)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))[0] == Status.WBINVD_REQUIRED
    assert call(m, CommandId.DF_FLUSH)[0] == Status.WBINVD_REQUIRED  # INIT cleared the WBINVD record
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid + 1))[0] == Status.WBINVD_REQUIRED
    m.hv.soc.wbinvd_all()  # the victim's lines go back to DRAM under the victim's key (still in its slot)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))[0] == Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.DF_FLUSH)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=spy, asid=asid))
    # with the correct flushes the debuggable guest's key decrypts the victim's page to noise
    assert not _leaks(secret, _dbg_decrypt(m, spy, spa, PAGE))


def test_every_asid_is_dirty_after_init_until_wbinvd_and_df_flush(m: Machine) -> None:
    ok(m, CommandId.SHUTDOWN)
    ok(m, CommandId.INIT, InitCmd())
    g = _start(m)
    for asid in (m.profile.min_sev_asid, m.profile.max_asid):
        assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=asid))[0] == Status.WBINVD_REQUIRED
    m.hv.soc.wbinvd_all()
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=m.profile.max_asid))[0] == \
        Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.DF_FLUSH)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=g, asid=m.profile.max_asid))


def test_a_wbinvd_before_init_does_not_count(m: Machine) -> None:
    ok(m, CommandId.SHUTDOWN)
    m.hv.soc.wbinvd_all()  # AF clears WBINVD_DONE at INIT: only a WBINVD after INIT counts
    ok(m, CommandId.INIT, InitCmd())
    assert call(m, CommandId.DF_FLUSH)[0] == Status.WBINVD_REQUIRED


# ---- issue 8 item 2, the firmware's side: SHUTDOWN invalidates every ASID for VMRUN -------------
def test_no_zombie_guest_runs_after_shutdown(m: Machine) -> None:
    secret = os.urandom(PAGE)
    victim = _victim(m, secret, policy=0)
    ok(m, CommandId.SHUTDOWN)
    out: list[bytes] = []

    def reader() -> Generator[Op, Any, None]:
        data = yield op.read(SECRET_GPA, 64)
        out.append(data)
        yield op.hlt()

    r = m.hv.run(victim, engine=PyEngine(reader()))
    assert r.exit.code == ExitCode.INVALID and victim.state is VmState.CRASHED and not out


# ---- issue 8 item 8a: LAUNCH_MEASURE only in LUPDATE --------------------------------------------
def test_a_running_guest_cannot_be_sent_back_to_lsecret(m: Machine) -> None:
    """Without LAUNCH_MEASURE's guest-state check a RUNNING guest (channel closed: TEK = TIK = 0)
    would return to LSECRET and take a LAUNCH_SECRET the host sealed with the all-zero keys."""
    sess = LaunchSession.create(m.firmware.identity.pdh_cert.public_key(), 0)  # type: ignore[arg-type]
    vm = m.hv.create_vm("g", MEM)
    m.hv.launch(vm, [(IMAGE_GPA, b"\xf4" * PAGE)], godh_cert=sess.godh_cert_blob, session=sess.session_blob)
    measure_spa = m.hv.psp.put_data(bytes(MeasureBuf.SIZE))
    measure = LaunchUpdateDataCmd(handle=vm.handle, paddr=measure_spa, len=MeasureBuf.SIZE)
    assert call(m, CommandId.LAUNCH_MEASURE, measure)[0] == Status.INVALID_GUEST_STATE
    assert m.hv.psp.get_data(MeasureBuf.SIZE) == bytes(MeasureBuf.SIZE)  # nothing written
    st = GuestStatusCmd.decode(ok(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle)))
    assert st.state == GuestState.RUNNING
    # the host's forged packet under the all-zero channel keys is refused too
    zero = TransportKeys(bytes(16), bytes(16))
    p = m.profile
    packet = package_secret(zero, b"host-chosen secret, 32 bytes...!", measure=bytes(32), api_major=p.api_major,
                            api_minor=p.api_minor)
    hdr = m.hv.psp.put_data(packet.header_bytes, 0x1000)
    trans = m.hv.psp.put_data(packet.trans, 0x2000)
    spa = vm.back(SECRET_GPA)
    cmd = TransportCmd(handle=vm.handle, hdr_paddr=hdr, hdr_len=0x34, guest_paddr=spa | p.cbit_mask,
                       guest_len=packet.guest_len, trans_paddr=trans, trans_len=packet.guest_len)
    assert call(m, CommandId.LAUNCH_SECRET, cmd)[0] == Status.INVALID_GUEST_STATE


# ---- issue 8 item 8b: LAUNCH_MEASURE writes only within what the host said it has ----------------
@pytest.mark.parametrize("length", [0, 1, 0x10, 0x2F])
def test_launch_measure_with_a_short_buffer_writes_nothing_but_the_length(m: Machine, length: int) -> None:
    vm = m.hv.create_vm("g", MEM)
    handle = _start(m)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=vm.asid))
    canary = os.urandom(0x100)
    out = m.hv.psp.put_data(canary)
    status, back = call(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=out, len=length))
    assert status == Status.INVALID_LENGTH
    assert LaunchUpdateDataCmd.decode(back) == LaunchUpdateDataCmd(handle=handle, paddr=out, len=MeasureBuf.SIZE)
    assert m.hv.psp.get_data(0x100) == canary  # not one byte of the host's buffer was written
    # the guest is still in LUPDATE and measures normally with a long-enough buffer
    status, back = call(m, CommandId.LAUNCH_MEASURE,
                        LaunchUpdateDataCmd(handle=handle, paddr=out, len=MeasureBuf.SIZE + 0x10))
    assert status == Status.SUCCESS
    written = m.hv.psp.get_data(0x100)
    assert written[MeasureBuf.SIZE :] == canary[MeasureBuf.SIZE :]  # exactly 0x30 bytes written


def test_launch_measure_length_query_at_address_zero(m: Machine) -> None:
    handle = _start(m)
    status, back = call(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=0, len=0x100))
    assert status == Status.INVALID_LENGTH and LaunchUpdateDataCmd.decode(back).len == MeasureBuf.SIZE


# ---- issue 8 item 7: the command log is bounded --------------------------------------------------
def test_the_command_log_is_a_ring(m: Machine) -> None:
    for _ in range(LOG_SIZE + 10):
        call(m, CommandId.PLATFORM_STATUS, PlatformStatus())
    log = m.firmware.log
    assert len(log) == LOG_SIZE
    assert log[-1] == ("PLATFORM_STATUS", int(Status.SUCCESS))
    call(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=77))
    assert len(log) == LOG_SIZE and log[-1][0] == "GUEST_STATUS"
    assert list(log) == log[:] and log == list(log)
