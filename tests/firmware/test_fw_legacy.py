"""Firmware commands through the real mailbox path: status codes, state machines, ASID rules."""

from __future__ import annotations

import copy
import hashlib
import time

import pytest
from fwkit import call, init, ok

from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy, compose_policy
from sevemu.abi.sev import (
    ActivateCmd,
    DbgCmd,
    GuestStatusCmd,
    HandleCmd,
    InitCmd,
    InitOptions,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    MeasureBuf,
    PlatformStatus,
)
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.crypto import memenc
from sevemu.crypto.sha256 import Sha256
from sevemu.firmware import sha_engine
from sevemu.hw.psp import PspDma
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20


@pytest.fixture
def m() -> Machine:
    return build_machine("milan", seed="fw-tests", dram_size=8 << 30, init=False)






def snapshot(m: Machine) -> object:
    fw = m.firmware
    return (fw.state, fw.config_es, {h: (g.state, g.asid, g.policy, g.vek, g.ld.digest())
                                    for h, g in fw.guests.items()},
            dict(fw.asid_owner), dict(fw.asid_dirty), fw.next_handle)


def start_guest(m: Machine, policy: int = 0, asid: int | None = 100) -> int:
    out = ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))
    handle = LaunchStartCmd.decode(out).handle
    if asid is not None:
        ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=asid))
    return handle


def test_platform_status_and_init(m: Machine) -> None:
    st = PlatformStatus.decode(ok(m, CommandId.PLATFORM_STATUS, PlatformStatus()))
    assert (st.api_major, st.api_minor, st.build) == (1, 51, 3)
    assert st.state == PlatformState.UNINIT
    init(m, InitCmd())
    assert call(m, CommandId.INIT, InitCmd())[0] == Status.INVALID_PLATFORM_STATE
    st = PlatformStatus.decode(ok(m, CommandId.PLATFORM_STATUS, PlatformStatus()))
    assert st.state == PlatformState.INIT and st.config == 0


def test_platform_status_ignores_input_bytes(m: Machine) -> None:
    status, out = m.hv.psp.raw(CommandId.PLATFORM_STATUS, b"\xff" * PlatformStatus.SIZE)
    assert status == Status.SUCCESS
    assert PlatformStatus.decode(out).api_major == 1


def test_init_es_needs_tmr(m: Machine) -> None:
    es = int(InitOptions.SEV_ES)
    assert call(m, CommandId.INIT, InitCmd(options=es, tmr_paddr=0x123000, tmr_len=MiB))[0] == Status.INVALID_ADDRESS
    assert call(m, CommandId.INIT, InitCmd(options=es, tmr_paddr=2 * MiB, tmr_len=4096))[0] == Status.INVALID_LENGTH
    assert m.firmware.state == PlatformState.UNINIT
    init(m, InitCmd(options=es, tmr_paddr=2 * MiB, tmr_len=MiB))
    st = PlatformStatus.decode(ok(m, CommandId.PLATFORM_STATUS, PlatformStatus()))
    assert st.config == 1


def test_init_es_on_naples_is_invalid_config() -> None:
    m = build_machine("naples", seed="x", dram_size=1 << 30, init=False)
    assert call(m, CommandId.INIT, InitCmd(options=1, tmr_paddr=2 * MiB, tmr_len=MiB))[0] == Status.INVALID_CONFIG


def test_unknown_command_and_bad_buffers(m: Machine) -> None:
    init(m, InitCmd())
    assert m.hv.psp.raw(CommandId.COPY, bytes(0x18))[0] == Status.INVALID_COMMAND
    # reserved bytes of LAUNCH_UPDATE_DATA (0x04..0x07) must be zero
    raw = bytearray(LaunchUpdateDataCmd(handle=1, paddr=0x1000, len=16).encode())
    raw[5] = 1
    assert m.hv.psp.raw(CommandId.LAUNCH_UPDATE_DATA, bytes(raw))[0] == Status.INVALID_PARAM
    # a buffer address outside DRAM
    from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp

    psp = m.soc.psp
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, 0)
    psp.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, 0x100)  # 1 TiB
    psp.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.GUEST_STATUS)))
    assert decode_status(psp.mmio_read(MailboxReg.CMDRESP)) == Status.INVALID_ADDRESS
    assert not m.firmware.internal_errors


def test_guest_commands_need_init(m: Machine) -> None:
    assert call(m, CommandId.LAUNCH_START, LaunchStartCmd())[0] == Status.INVALID_PLATFORM_STATE
    assert call(m, CommandId.DF_FLUSH, None)[0] == Status.INVALID_PLATFORM_STATE


def test_launch_flow_and_states(m: Machine) -> None:
    init(m, InitCmd())
    handle = start_guest(m, asid=None)
    assert m.firmware.state == PlatformState.WORKING
    spa = 0x4000_0000
    image = bytes(range(256)) * 32
    m.hv.core.host_write(spa, image)
    upd = LaunchUpdateDataCmd(handle=handle, paddr=spa, len=len(image))
    assert call(m, CommandId.LAUNCH_UPDATE_DATA, upd)[0] == Status.INACTIVE
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=100))
    assert call(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=handle))[0] == Status.INVALID_GUEST_STATE
    for bad, want in ((LaunchUpdateDataCmd(handle=handle, paddr=spa + 8, len=16), Status.INVALID_ADDRESS),
                      (LaunchUpdateDataCmd(handle=handle, paddr=spa, len=24), Status.INVALID_LENGTH),
                      (LaunchUpdateDataCmd(handle=handle, paddr=spa, len=0), Status.INVALID_LENGTH),
                      (LaunchUpdateDataCmd(handle=handle, paddr=1 << 40, len=16), Status.INVALID_ADDRESS),
                      (LaunchUpdateDataCmd(handle=99, paddr=spa, len=16), Status.INVALID_GUEST)):
        before = snapshot(m)
        assert call(m, CommandId.LAUNCH_UPDATE_DATA, bad)[0] == want
        assert snapshot(m) == before
    ok(m, CommandId.LAUNCH_UPDATE_DATA, upd)
    # in place: DRAM now holds ciphertext, the launch digest covers the plaintext
    assert m.soc.dram.read(spa, len(image)) != image
    assert m.firmware.guests[handle].launch_digest == hashlib.sha256(image).digest()
    # length query for LAUNCH_MEASURE
    status, out = call(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=0, len=0))
    assert status == Status.INVALID_LENGTH
    assert LaunchUpdateDataCmd.decode(out).len == MeasureBuf.SIZE
    out_spa = 0x3000_0000
    ok(m, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=handle, paddr=out_spa, len=MeasureBuf.SIZE))
    blob = MeasureBuf.decode(m.hv.core.host_read(out_spa, MeasureBuf.SIZE))
    assert blob.measure == m.firmware.guests[handle].measure
    assert call(m, CommandId.LAUNCH_UPDATE_DATA, upd)[0] == Status.INVALID_GUEST_STATE
    ok(m, CommandId.LAUNCH_FINISH, HandleCmd(handle=handle))
    st = GuestStatusCmd.decode(ok(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=handle)))
    assert (st.state, st.asid, st.policy) == (GuestState.RUNNING, 100, 0)


@pytest.mark.parametrize("engine", ["on", "off"])  # the SHA engine's thread hashing, or the caller
def test_large_launch_updates_are_hashed_and_encrypted_like_small_ones(m: Machine, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of 1 MiB and more hash on the PSP's separate SHA engine (a worker thread) beside the
    encryption: the digest and the memory must be those of the inline path."""
    monkeypatch.setattr(sha_engine, "mode", engine)
    init(m, InitCmd())
    handle = start_guest(m, asid=100)
    spa = 0x4000_0000
    big = hashlib.shake_256(b"big").digest(MiB + 4096)
    small = hashlib.shake_256(b"small").digest(4096)
    for _ in range(2):  # the engine is made on first use and reused after
        for data, at in ((big, spa), (small, spa + 2 * MiB)):
            m.hv.core.host_write(at, data)
            m.hv.core.clflush_range(at, len(data))
            ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=at, len=len(data)))
    assert m.firmware.guests[handle].launch_digest == hashlib.sha256((big + small) * 2).digest()
    assert m.soc.dram.read(spa, 4096) != big[:4096]
    for off in (0, MiB):
        dst = m.hv.psp.put_data(bytes(64))
        ok(m, CommandId.DBG_DECRYPT, DbgCmd(handle=handle, src_paddr=(spa + off) | m.profile.cbit_mask,
                                            dst_paddr=dst, len=64))
        assert m.hv.psp.get_data(64) == big[off : off + 64]


@pytest.mark.parametrize("engine", ["on", "off"])  # the SHA engine's thread hashing, or the caller
def test_a_streamed_launch_update_equals_one_pass_at_unaligned_ends_and_chunk_seams(m: Machine, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of several streaming chunks that starts and ends inside cache lines: the digest is
    SHA-256 of the bytes as the host last wrote them (dirty host lines included: the PSP's reads
    are coherent), every byte decrypts back, the seams between chunks included, and the bytes
    around the run are left as they were."""
    monkeypatch.setattr(sha_engine, "mode", engine)
    init(m, InitCmd())
    handle = start_guest(m, asid=100)
    spa = 0x4000_0000 + 0x30  # 16-byte aligned, not line aligned
    data = hashlib.shake_256(b"stream").digest(5 * MiB + 0x50)
    m.hv.core.host_write(spa - 0x30, bytes(range(0x30)))
    m.hv.core.host_write(spa, data)
    m.hv.core.host_write(spa + len(data), b"\xee" * 0x30)
    m.hv.core.clflush_range(spa - 0x30, len(data) + 0x60)
    m.hv.core.host_write(spa + 3 * MiB, b"dirty host line, not flushed")  # the PSP snoops it
    data = data[: 3 * MiB] + b"dirty host line, not flushed" + data[3 * MiB + 28 :]
    ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=spa, len=len(data)))
    assert m.firmware.guests[handle].launch_digest == hashlib.sha256(data).digest()
    dst = m.hv.psp.put_data(bytes(0x100))
    for off in (0, 2 * MiB - 0x70, 4 * MiB - 0x70, 3 * MiB, len(data) - 0x40):
        ok(m, CommandId.DBG_DECRYPT, DbgCmd(handle=handle, src_paddr=(spa + off) | m.profile.cbit_mask,
                                            dst_paddr=dst, len=0x40))
        assert m.hv.psp.get_data(0x40) == data[off : off + 0x40], hex(off)
    assert m.soc.dram.read(spa - 0x30, 0x30) == bytes(range(0x30))
    assert m.soc.dram.read(spa + len(data), 0x30) == b"\xee" * 0x30


def _launch_image(m: Machine, data: bytes, spa: int, dirty: int | None, sha_accel: bool | None) -> tuple[int, int]:
    """LAUNCH_UPDATE_DATA of ``data`` at ``spa`` (written and flushed by the host first; ``dirty``:
    an offset at which the host then writes one more line without flushing it), the guest's launch
    digest a :class:`Sha256` in the accelerator or not; (handle, chunks hashed in place)."""
    init(m, InitCmd())
    handle = start_guest(m, asid=100)
    m.firmware.guests[handle].ld = Sha256(accel=sha_accel)
    m.hv.core.host_write(spa, data)
    m.hv.core.clflush_range(spa, len(data))
    if dirty is not None:
        m.hv.core.host_write(spa + dirty, b"D" * 64)
    fused = []
    real = PspDma.measure_clean

    def spy(self: PspDma, at: int, length: int, asid: int, sha: Sha256) -> bool:
        done = real(self, at, length, asid, sha)
        fused.append(done)
        return done

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PspDma, "measure_clean", spy)
        ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=spa, len=len(data)))
    return handle, sum(fused)


@pytest.mark.skipif(not memenc.ACCELERATED, reason="the C accelerator was not built")
@pytest.mark.parametrize("dirty", [None, 3 * MiB + 0x1000])
def test_a_launch_update_measured_in_place_is_the_two_step_read_hash_write(dirty: int | None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a spare core each clean chunk is hashed and encrypted where it lies in DRAM (no
    plaintext copy): the same digest, the same DRAM (ciphertext only) as the read, hash and write
    the firmware makes with a ``hashlib`` digest -- and a chunk holding a dirty host line takes
    that two-step path, so the PSP's coherent read measures the host's line, which later wins over
    the ciphertext when the host flushes it, as on hardware."""
    monkeypatch.setattr(sha_engine, "mode", "off")
    spa = 0x4000_0000
    data = hashlib.shake_256(b"in place").digest(5 * MiB + 0x1000)
    want = data if dirty is None else data[:dirty] + b"D" * 64 + data[dirty + 64 :]
    runs = []
    for accel in (True, False):
        m = build_machine("milan", seed="fw-tests", dram_size=8 << 30, init=False)
        handle, fused = _launch_image(m, data, spa, dirty, accel)
        assert fused == (0 if not accel else 3 if dirty is None else 2)  # 3 chunks: 2 MiB, 2 MiB, 1 MiB + 4 KiB
        assert m.firmware.guests[handle].launch_digest == hashlib.sha256(want).digest()
        stored = m.soc.dram.read(spa, len(data))
        assert all(stored[o : o + 16] != want[o : o + 16] for o in range(0, len(want), 4096))
        if dirty is not None:
            m.hv.core.clflush_range(spa + dirty, 64)  # the host's dirty line goes to DRAM last
            assert m.soc.dram.read(spa + dirty, 64) == b"D" * 64
        runs.append((m.firmware.guests[handle].launch_digest, m.soc.dram.read(spa - 4096, len(data) + 8192)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("engine", ["on", "off"])  # the SHA engine's thread hashing, or the caller
def test_a_large_launch_update_waits_for_its_hash(m: Machine, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command returns only once the SHA engine has taken the run in: a slow hash (standing for
    a hash that outlasts the encryption) is still in the digest the moment the command answers."""
    monkeypatch.setattr(sha_engine, "mode", engine)
    init(m, InitCmd())
    handle = start_guest(m, asid=100)
    g = m.firmware.guests[handle]
    real = g.ld

    class SlowHash:
        def update(self, data: bytes) -> None:
            time.sleep(0.3)
            real.update(data)

        def digest(self) -> bytes:
            return real.digest()

    g.ld = SlowHash()  # type: ignore[assignment]
    big = bytes(MiB)
    m.hv.core.host_write(0x4000_0000, big)
    ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=0x4000_0000, len=len(big)))
    assert g.launch_digest == hashlib.sha256(big).digest()


@pytest.mark.parametrize("engine", ["on", "off"])  # the SHA engine's thread hashing, or the caller
def test_a_streamed_update_reuses_a_chunk_buffer_only_after_its_hash(m: Machine, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream reads each chunk into one of two reused buffers while the SHA engine hashes the
    previous one: with a hash slower than everything else, every chunk must still be hashed as it
    was read (a buffer overwritten before its hash ran would change the digest)."""
    monkeypatch.setattr(sha_engine, "mode", engine)
    init(m, InitCmd())
    handle = start_guest(m, asid=100)
    g = m.firmware.guests[handle]
    real = g.ld
    seen: list[bytes] = []

    class SlowHash:
        def update(self, data: bytes) -> None:
            time.sleep(0.05)
            seen.append(bytes(data[:16]))
            real.update(data)

        def digest(self) -> bytes:
            return real.digest()

    g.ld = SlowHash()  # type: ignore[assignment]
    data = hashlib.shake_256(b"chunks").digest(7 * MiB)
    m.hv.core.host_write(0x4000_0000, data)
    m.hv.core.clflush_range(0x4000_0000, len(data))
    ok(m, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=handle, paddr=0x4000_0000, len=len(data)))
    assert len(seen) == 4 and seen == [data[off : off + 16] for off in range(0, len(data), 2 * MiB)]
    assert g.launch_digest == hashlib.sha256(data).digest()


def test_policy_checks(m: Machine) -> None:
    init(m, InitCmd())
    cases = [
        (0x40, Status.POLICY_FAILURE),  # reserved bit 6 (AMD sev_guest_verify_policy)
        (compose_policy(0, api_major=2), Status.POLICY_FAILURE),  # needs API 2.0
        (int(GuestPolicy.ES), Status.UNSUPPORTED),  # SEV-ES not enabled by INIT (AMD launch_start)
    ]
    for policy, want in cases:
        before = snapshot(m)
        assert call(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=policy))[0] == want
        assert snapshot(m) == before
    # key sharing
    h1 = start_guest(m, policy=int(GuestPolicy.NOKS), asid=None)
    assert call(m, CommandId.LAUNCH_START, LaunchStartCmd(handle=h1))[0] == Status.POLICY_FAILURE
    h2 = start_guest(m, asid=None)
    shared = LaunchStartCmd.decode(ok(m, CommandId.LAUNCH_START, LaunchStartCmd(handle=h2))).handle
    assert m.firmware.guests[shared].vek == m.firmware.guests[h2].vek
    assert call(m, CommandId.LAUNCH_START, LaunchStartCmd(handle=77))[0] == Status.INVALID_GUEST


def test_activate_rules(m: Machine) -> None:
    init(m, InitCmd())
    a = start_guest(m, asid=None)
    b = start_guest(m, asid=None)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=a, asid=5))[0] == Status.INVALID_ASID  # ES range
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=a, asid=510))[0] == Status.INVALID_ASID
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=a, asid=100))
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=a, asid=101))[0] == Status.ACTIVE
    before = snapshot(m)
    assert call(m, CommandId.ACTIVATE, ActivateCmd(handle=b, asid=100))[0] == Status.ASID_OWNED
    assert snapshot(m) == before
    assert call(m, CommandId.DECOMMISSION, HandleCmd(handle=a))[0] == Status.ACTIVE
    assert call(m, CommandId.DEACTIVATE, HandleCmd(handle=b))[0] == Status.INACTIVE


def test_asid_reuse_needs_wbinvd_then_df_flush(m: Machine) -> None:
    init(m, InitCmd())
    a = start_guest(m, asid=100)
    ok(m, CommandId.DEACTIVATE, HandleCmd(handle=a))
    ok(m, CommandId.DECOMMISSION, HandleCmd(handle=a))
    assert m.firmware.state == PlatformState.INIT  # last guest gone
    b = start_guest(m, asid=None)
    reuse = ActivateCmd(handle=b, asid=100)
    assert call(m, CommandId.ACTIVATE, reuse)[0] == Status.WBINVD_REQUIRED
    assert call(m, CommandId.DF_FLUSH, None)[0] == Status.WBINVD_REQUIRED
    m.soc.wbinvd_all()
    assert call(m, CommandId.ACTIVATE, reuse)[0] == Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.DF_FLUSH)
    ok(m, CommandId.ACTIVATE, reuse)
    # another ASID was never used: no flush needed
    c = start_guest(m, asid=None)
    ok(m, CommandId.ACTIVATE, ActivateCmd(handle=c, asid=101))


def test_shutdown_forgets_guests_and_invalidates_their_asids(m: Machine) -> None:
    init(m, InitCmd())
    start_guest(m, asid=100)
    assert m.soc.mc.has_key(100) and m.soc.mc.asid_valid(100)
    ok(m, CommandId.SHUTDOWN)
    assert m.firmware.state == PlatformState.UNINIT and not m.firmware.guests
    # AMD-ASPFW sev_clear marks every ASID invalid and leaves the key in its slot, so the guest's
    # lines still in the caches write back under the key they were written with
    assert not m.soc.mc.asid_valid(100) and m.soc.mc.has_key(100)
    assert call(m, CommandId.SHUTDOWN, None)[0] == Status.INVALID_PLATFORM_STATE


def test_guest_status_unknown_handle(m: Machine) -> None:
    init(m, InitCmd())
    assert call(m, CommandId.GUEST_STATUS, GuestStatusCmd(handle=3))[0] == Status.INVALID_GUEST


def test_mailbox_never_raises_on_garbage(m: Machine) -> None:
    import random

    rnd = random.Random(7)
    init(m, InitCmd())
    start_guest(m, asid=100)
    for _ in range(400):
        cmd = rnd.choice(list(CommandId))
        size = rnd.choice([0, 4, 8, 0x14, 0x24, 0x34, 0x44])
        raw = bytes(rnd.getrandbits(8) for _ in range(size)) if size else None
        before = copy.copy(snapshot(m))
        status, _ = m.hv.psp.raw(cmd, raw)
        assert 0 <= status <= 0xFFFF
        if status != Status.SUCCESS:
            assert snapshot(m) == before, (cmd.name, Status(status).name)
    assert not m.firmware.internal_errors
