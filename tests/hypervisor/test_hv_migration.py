"""Guest migration between two hosts: the wire protocol, the KVM/QEMU flow, failure handling.

The end-to-end tests run the destination host in a second process (``sevemu.cli.bench_migrate``'s
:class:`Destination`) and put a recording proxy on the loopback connection between the two, which
can also cut the connection or flip a byte of a packet.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sevemu._util.units import PAGE, PAGE_2M, GiB, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import TRANSPORT_PACK, GuestStatusCmd
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.amd.roots import AmdRoot
from sevemu.cli.bench_migrate import Destination, DestinationPlan
from sevemu.cli.bench_migrate import _check_workload as destination_check  # the destination's check program
from sevemu.guest.kernel import boot
from sevemu.hw.psp import PspDma
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor import migration
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.migration import (
    MAX_FRAME,
    Abort,
    Channel,
    Done,
    Finish,
    Hello,
    Huge,
    Message,
    MigrationError,
    MsgType,
    Page,
    Pages,
    ProtocolError,
    SharedPage,
    Start,
    VcpuState,
    decode_frame,
    encode_frame,
    prepare_destination,
    receive_vm,
    send_vm,
)
from sevemu.hypervisor.sev.legacy import PAGE_BATCH, Transport, transport_slots
from sevemu.hypervisor.vm import Vm, VmKind, VmState
from sevemu.scenario import Machine, build_machine, default_amd_root, manufacture

MEM = 16 * MiB
SHARED_GPA = 0x0030_0000
SECRET_GPAS = (0x0040_0000, 0x0080_1000, 0x00F0_0000)
SHARED_MARK = b"shared page: the guest published this on purpose".ljust(64, b".")
TIMEOUT = 20.0


# ---- the wire protocol --------------------------------------------------------------------------
MESSAGES: list[Message] = [
    Hello(b"p" * 0x824, b"c" * 0x186C, b"a" * 0xC80),
    Start(0x30005, 64 * MiB, 2, b"d" * 0x824, b"s" * 0x80),
    Huge((0, 0x20_0000, 0x1_0000_0000)),
    Page(0x1234000, b"h" * 0x34, os.urandom(PAGE)),
    Pages((0x1000, 0x7000, 0x2000), (b"h" * 0x34 + bytes(12)) * 3, os.urandom(3 * PAGE)),
    SharedPage(0x5000, os.urandom(PAGE)),
    VcpuState(1, 0x80000011, 0x10000, 0, 0x1000, 0xFFF0, 0x202, tuple(range(16))),
    Finish(12, 3),
    Done(),
    Abort("destination: BAD_MEASUREMENT"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_frames_round_trip(msg: Message) -> None:
    frame = encode_frame(msg)
    length, kind = struct.unpack(">IB", frame[:5])
    assert length == len(frame) - 4
    assert decode_frame(kind, frame[5:]) == msg


@pytest.mark.parametrize("kind,payload", [
    (0, b""),  # unknown type
    (99, b"x"),
    (MsgType.PAGE, b"\x00" * 20),  # shorter than gpa + header
    (MsgType.START, b"\x00" * 10),
    (MsgType.HELLO, struct.pack(">III", 1, 2, 3) + b"xx"),  # lengths do not add up
    (MsgType.SHARED, b"\x00" * 100),
    (MsgType.VCPU, b"\x00" * 7),
    (MsgType.FINISH, b""),
    (MsgType.HUGE, b"\x00"),  # truncated count
    (MsgType.HUGE, struct.pack(">IQ", 2, 0)),  # fewer regions than counted
    (MsgType.DONE, b"\x00"),
    (MsgType.PAGES, b"\x00\x00"),  # truncated count
    (MsgType.PAGES, struct.pack(">I", 0)),  # no pages
    (MsgType.PAGES, struct.pack(">I", PAGE_BATCH + 1) + bytes((PAGE_BATCH + 1) * (8 + 64 + PAGE))),  # more than a doorbell
    (MsgType.PAGES, struct.pack(">IQ", 1, 0x1000) + bytes(64 + PAGE - 1)),  # short
    (MsgType.PAGES, struct.pack(">IQ", 1, 0x1000) + bytes(0x34) + b"\x01" + bytes(11 + PAGE)),  # padding
])
def test_malformed_frames(kind: int, payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(kind, payload)


def test_channel_bounds_frames() -> None:
    a, b = socket.socketpair()
    with a, b:
        chan = Channel(b, timeout=2)
        a.sendall(struct.pack(">IB", MAX_FRAME + 1, MsgType.PAGE))
        with pytest.raises(ProtocolError):
            chan.recv()
    a, b = socket.socketpair()
    with a, b:
        chan = Channel(b, timeout=0.2)
        with pytest.raises(TimeoutError):  # nothing comes: the wait is bounded
            chan.recv()


class _Trickle:
    """A socket whose ``sendmsg`` takes at most ``most`` bytes a call (what a kernel may do)."""

    def __init__(self, sock: socket.socket, most: int) -> None:
        self._sock, self._most, self.calls = sock, most, 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        return self._sock.send(b"".join(bytes(b) for b in buffers)[: self._most])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_pages_frames_go_out_in_parts_whatever_the_kernel_takes() -> None:
    """A PAGES frame is sent from its parts (framing, header slots, transport buffers) without
    joining them; partial sends resume where the kernel stopped: the peer reads the frame
    ``encode_frame`` makes, and ``bytes_sent`` counts it once."""
    msg = Pages((0x1000, 0x7000, 0x3000), (bytes(range(1, 0x35)) + bytes(12)) * 3, os.urandom(3 * PAGE))
    want = encode_frame(msg)
    a, b = socket.socketpair()
    with a, b:
        out, into = Channel(a, timeout=2), Channel(b, timeout=2)
        out.send(Done())  # pending output goes first
        trickle = _Trickle(a, 1000)
        out.sock = trickle  # type: ignore[assignment]
        got: list[Message] = []
        reader = threading.Thread(target=lambda: got.extend([into.recv(), into.recv()]))
        reader.start()
        out.send(msg)
        reader.join(5)
        assert got == [Done(), msg] and trickle.calls > len(want) // 1000
        assert out.bytes_sent == len(encode_frame(Done())) + len(want) == into.bytes_received


def test_transient_receipt_reads_the_same_messages() -> None:
    """``recv(transient=True)`` (the destination's loop): a PAGES frame read into the channel's
    reused buffer decodes to the message ``recv`` gives, other frames as usual, the same byte
    count; malformed PAGES frames are refused all the same."""
    frames = [Pages((0x1000, 0x3000), (bytes(range(1, 0x35)) + bytes(12)) * 2, os.urandom(2 * PAGE)), Done(),
              Pages((0x5000,), bytes(range(2, 0x36)) + bytes(12), os.urandom(PAGE))]
    a, b = socket.socketpair()
    with a, b:
        into = Channel(b, timeout=2)
        for msg in frames:
            a.sendall(encode_frame(msg))
            assert into.recv(transient=True) == msg
        assert into.bytes_received == sum(len(encode_frame(m)) for m in frames)
        bad = bytearray(encode_frame(frames[2]))
        bad[5 + 4 + 8 + 0x40 - 1] = 1  # header padding
        a.sendall(bytes(bad))
        with pytest.raises(ProtocolError):
            into.recv(transient=True)


def test_staged_receipt_puts_the_transport_buffers_where_the_stage_says() -> None:
    """``recv(stage=...)`` (the destination's loop): a PAGES frame's transport buffers go straight
    into the pages the stage hands over -- read in pieces as the peer trickles them in too -- and
    the message is the one ``recv`` gives but for ``transport`` (None); other frames as usual, the
    same byte count; a malformed PAGES frame is refused before the stage is asked for anything."""
    frames = [Pages((0x1000, 0x3000), (bytes(range(1, 0x35)) + bytes(12)) * 2, os.urandom(2 * PAGE)), Done(),
              Pages((0x5000,), bytes(range(2, 0x36)) + bytes(12), os.urandom(PAGE)),
              Pages(tuple(range(0x10_0000, 0x10_0000 + 7 * PAGE, PAGE)), bytes(64) * 7, os.urandom(7 * PAGE))]
    staged: list[bytes] = []

    def stage(count: int, fill: Callable[[list[bytearray]], None]) -> None:
        pages = [bytearray(PAGE) for _ in range(count)]
        fill(pages)
        staged.append(b"".join(pages))

    a, b = socket.socketpair()
    with a, b:
        into = Channel(b, timeout=2)
        for i, msg in enumerate(frames):
            frame = encode_frame(msg)
            if i < 3:
                a.sendall(frame)
            else:  # in pieces that end inside the pages: the reads resume mid-page
                feeder = threading.Thread(target=lambda f=frame: [
                    (a.sendall(f[k : k + 1000]), time.sleep(0.001)) for k in range(0, len(f), 1000)])
                feeder.start()
            got = into.recv(transient=True, stage=stage)
            if isinstance(msg, Pages):
                assert isinstance(got, Pages) and got.transport is None
                assert isinstance(got.gpas, np.ndarray) and got.gpas.dtype == np.uint64  # (a column)
                assert (tuple(got.gpas.tolist()), bytes(got.hdrs)) == (msg.gpas, bytes(msg.hdrs))
                assert staged[-1] == msg.transport
            else:
                assert got == msg
        feeder.join(5)
        assert len(staged) == 3
        assert into.bytes_received == sum(len(encode_frame(m)) for m in frames)
    good = encode_frame(frames[2])
    bad_padding = bytearray(good)
    bad_padding[5 + 4 + 8 + 0x40 - 1] = 1
    bad_count = bytearray(good)
    bad_count[5:9] = struct.pack(">I", 2)  # two pages counted, one sent
    for bad in (bytes(bad_padding), bytes(bad_count), struct.pack(">IB", 3, MsgType.PAGES) + b"\x00\x00"):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(bad)
            with pytest.raises(ProtocolError):
                Channel(b, timeout=2).recv(transient=True, stage=stage)
    assert len(staged) == 3


# ---- hosts and guests ---------------------------------------------------------------------------
def host(seed: str, root: AmdRoot | None = None, platform_dir: Path | None = None) -> Machine:
    return build_machine("milan", seed=seed, dram_size=4 * GiB, cache_size=1 << 20,
                         amd_root=root or default_amd_root("milan"), platform_dir=platform_dir)


def secret_pages() -> dict[int, bytes]:
    """High-entropy page contents the guest keeps private (random: any 32-byte block is unique)."""
    return {gpa: os.urandom(PAGE) for gpa in SECRET_GPAS}


def _guest(secrets: dict[int, bytes]) -> Generator[Op, Any, None]:
    yield from boot(MEM, shared=[SHARED_GPA])
    for gpa, data in secrets.items():
        yield op.write(gpa, data)
    yield op.write(SHARED_GPA, SHARED_MARK)
    yield op.hlt()


def _read_back(ranges: list[tuple[int, int]], out: list[bytes]) -> Generator[Op, Any, None]:
    for gpa, length in ranges:
        data = yield op.read(gpa, length)
        out.append(data)
    yield op.hlt()


def running_guest(m: Machine, secrets: dict[int, bytes], policy: int = 0, vcpus: int = 1) -> Vm:
    """An SEV guest that booted, wrote ``secrets`` into private pages and a mark into a shared one."""
    vm = m.hv.create_vm("guest", MEM)
    m.hv.launch(vm, [(0x10_0000, b"\xf4" * PAGE)], policy=policy, programs=[_guest, _read_back, destination_check])
    vm.add_vcpu(PyEngine(_guest(secrets)))
    for _ in range(vcpus - 1):
        vm.add_vcpu()
    assert m.hv.run(vm).reason == "hlt"
    return vm


def guest_reads(hv: Hypervisor, vm: Vm, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Run ``vm`` (resumed with its own registers: paging on) to read ``ranges``."""
    out: list[bytes] = []
    assert hv.run(vm, engine=PyEngine(_read_back(ranges, out))).reason == "hlt"
    return out


def guest_state(hv: Hypervisor, vm: Vm) -> GuestState:
    return GuestState(hv.psp.call(CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle)).state)


def amd_certs(m: Machine) -> bytes:
    assert m.amd_root is not None
    return m.amd_root.amd_certs.encode()


# ---- in-process migrations (the destination in a thread) ----------------------------------------
def migrate_in_process(src: Machine, dst: Machine, vm: Vm, prepared: Vm | None = None,
                       **kw: Any) -> tuple[Vm | None, Exception | None]:
    a, b = socket.socketpair()
    result: dict[str, Any] = {}

    def destination() -> None:
        try:
            result["vm"] = receive_vm(dst.hv, Channel(b, TIMEOUT), amd_certs=amd_certs(dst), vm=prepared)
        except MigrationError as exc:
            result["error"] = exc

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    error: Exception | None = None
    try:
        send_vm(src.hv, vm, Channel(a, TIMEOUT), **kw)
    except MigrationError as exc:
        error = exc
    t.join(TIMEOUT)
    a.close()
    b.close()
    return result.get("vm"), error or result.get("error")


def test_send_result_times_the_migration_not_the_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SendResult.seconds`` and ``cpu_seconds`` span the migration up to SEND_FINISH; destroying
    the sent VM after it is not counted (as the destination's VM is made before its span)."""
    src, dst = host("hv-mig-cpu-src"), host("hv-mig-cpu-dst")
    vm = running_guest(src, secret_pages())
    destroy = src.hv.destroy
    spent: list[float] = []

    def slow_destroy(v: Vm) -> None:
        t = time.process_time()
        while time.process_time() - t < 0.3:  # CPU the teardown burns
            pass
        spent.append(time.process_time() - t)
        destroy(v)

    monkeypatch.setattr(src.hv, "destroy", slow_destroy)
    a, b = socket.socketpair()
    received: list[Vm] = []
    t = threading.Thread(target=lambda: received.append(
        receive_vm(dst.hv, Channel(b, TIMEOUT), amd_certs=amd_certs(dst))), daemon=True)
    t.start()
    c0 = time.process_time()
    with a, b:
        result = send_vm(src.hv, vm, Channel(a, TIMEOUT))
        total = time.process_time() - c0
        t.join(TIMEOUT)
    assert received and spent and vm not in src.hv.vms and result.pages > 0
    assert 0 < result.cpu_seconds <= total - spent[0]
    assert 0 < result.seconds < TIMEOUT


def test_in_process_migration_keeps_memory_registers_and_shared_pages() -> None:
    src, dst = host("hv-mig-src"), host("hv-mig-dst")
    secrets = secret_pages()
    vm = running_guest(src, secrets, vcpus=2)
    regs = dict(vm.vcpus[0].vmcb.regs)
    moved, error = migrate_in_process(src, dst, vm, keep_source=True)
    assert error is None and moved is not None
    assert guest_state(src.hv, vm) == GuestState.SENT
    assert guest_state(dst.hv, moved) == GuestState.RUNNING
    assert moved.state is VmState.RUNNING and moved.asid != 0 and len(moved.vcpus) == 2
    assert moved.vcpus[0].vmcb.cr3 == vm.vcpus[0].vmcb.cr3 and moved.vcpus[0].vmcb.regs == regs
    assert set(moved.npt.mappings) == set(vm.npt.mappings)  # the same GPAs
    assert moved.shared_gpas == {SHARED_GPA}
    ranges = [(gpa, PAGE) for gpa in secrets] + [(SHARED_GPA, len(SHARED_MARK))]
    assert guest_reads(dst.hv, moved, ranges) == [*secrets.values(), SHARED_MARK]
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors


def test_a_guest_whose_backing_is_scattered_migrates_in_one_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest made after another was destroyed gets its pages back in the allocator's order, not
    physically consecutive: SEND_UPDATE_DATA reads each doorbell's pages in one gather whatever their
    order (no run per page); a destination that also hosted a guest before receives into scattered
    pages through one scatter per doorbell; the destination's guest reads its secrets back."""
    src, dst = host("hv-mig-scatter-src"), host("hv-mig-scatter-dst")
    src.hv.destroy(running_guest(src, secret_pages()))
    dst.hv.destroy(running_guest(dst, secret_pages()))
    secrets = secret_pages()
    vm = running_guest(src, secrets)
    gathered: list[np.ndarray] = []
    scattered: list[np.ndarray] = []
    real_read, real_write = PspDma.read_encrypted_pages_into, PspDma.write_encrypted_pages

    def spy_read(self: PspDma, spas: np.ndarray, out: bytearray | memoryview, asid: int) -> None:
        gathered.append(np.array(spas, dtype=np.uint64))
        real_read(self, spas, out, asid)

    def spy_write(self: PspDma, spas: np.ndarray, data: bytes | bytearray | memoryview, asid: int) -> None:
        scattered.append(np.array(spas, dtype=np.uint64))
        real_write(self, spas, data, asid)

    monkeypatch.setattr(PspDma, "read_encrypted_pages_into", spy_read)
    monkeypatch.setattr(PspDma, "write_encrypted_pages", spy_write)
    moved, error = migrate_in_process(src, dst, vm)
    assert error is None and moved is not None
    for columns in (gathered, scattered):
        assert any(len(c) > 1 and (c[1:] != c[:-1] + np.uint64(PAGE)).any() for c in columns)
    ranges = [(gpa, PAGE) for gpa in secrets]
    assert guest_reads(dst.hv, moved, ranges) == list(secrets.values())
    assert not src.firmware.internal_errors and not dst.firmware.internal_errors


def test_whole_regions_arrive_in_huge_pages_with_the_same_gpas() -> None:
    """A 2 MiB region the source backs whole is named in HUGE: the destination backs it with one huge
    page at its first page (one 2 MiB leaf); the other regions get 4 KiB pages; the GPAs backed and
    the guest's memory are the same."""
    src, dst = host("hv-mig-src-huge"), host("hv-mig-dst-huge")
    secrets = secret_pages()
    vm = running_guest(src, secrets)
    region = SECRET_GPAS[0]  # 2 MiB aligned; backed whole here, the rest of the guest is not
    vm.back_range(region, PAGE_2M)
    regions = [r for r in range(0, MEM, PAGE_2M) if all((r >> 12) + i in vm.npt.mappings for i in range(512))]
    assert regions == [region]
    moved, error = migrate_in_process(src, dst, vm, keep_source=True)
    assert error is None and moved is not None
    assert moved.npt.huge == {region >> 21}
    assert set(moved.npt.mappings) == set(vm.npt.mappings)
    ranges = [(gpa, PAGE) for gpa in secrets] + [(SHARED_GPA, len(SHARED_MARK))]
    assert guest_reads(dst.hv, moved, ranges) == [*secrets.values(), SHARED_MARK]


def test_a_prepared_destination_receives_into_its_pinned_memory() -> None:
    """QEMU's destination (``-incoming``) has the VM and all of its RAM, pinned, before the migration:
    prepare_destination backs every page (huge pages where it can), stores each in DRAM zeroed; the
    guest then arrives into that VM with its memory and registers."""
    src, dst = host("hv-mig-src-pre"), host("hv-mig-dst-pre")
    prepared = prepare_destination(dst.hv, MEM, "incoming")
    spas = set(prepared.npt.mappings.values())
    assert set(prepared.npt.mappings) == set(range(MEM // PAGE)) and prepared.npt.huge
    dram = dst.soc.dram
    assert all(dram.read(spa, PAGE) == bytes(PAGE) for spa in sorted(spas)[::97])
    before = dram.populated_pages
    assert before >= len(spas)  # every backing page stored in DRAM already
    secrets = secret_pages()
    vm = running_guest(src, secrets, vcpus=2)
    regs = dict(vm.vcpus[0].vmcb.regs)
    moved, error = migrate_in_process(src, dst, vm, prepared=prepared)
    assert error is None and moved is prepared and dst.hv.vms == [prepared]
    assert guest_state(dst.hv, moved) == GuestState.RUNNING and moved.state is VmState.RUNNING
    assert set(moved.npt.mappings.values()) == spas and moved.vcpus[0].vmcb.regs == regs
    # written into the pages it had: the only pages created are the PSP's ring and bounce pages
    assert dram.populated_pages - before <= 64 < len(spas)
    ranges = [(gpa, PAGE) for gpa in secrets] + [(SHARED_GPA, len(SHARED_MARK))]
    assert guest_reads(dst.hv, moved, ranges) == [*secrets.values(), SHARED_MARK]
    assert all(dram.find(data[:32]) == [] for data in secrets.values())  # ciphertext in DRAM only
    assert not dst.firmware.internal_errors


def test_a_prepared_destination_of_another_size_refuses_the_guest() -> None:
    """START asks for a memory size the prepared destination VM does not have: a protocol error, the
    destination VM discarded, the source guest running again."""
    src, dst = host("hv-mig-src-pre2"), host("hv-mig-dst-pre2")
    prepared = prepare_destination(dst.hv, 2 * MEM)
    secrets = secret_pages()
    vm = running_guest(src, secrets)
    moved, error = migrate_in_process(src, dst, vm, prepared=prepared)
    assert isinstance(error, MigrationError) and moved is None
    assert not dst.hv.vms and dst.hv.platform_status().guest_count == 0
    assert guest_state(src.hv, vm) == GuestState.RUNNING and vm.state is VmState.RUNNING
    assert guest_reads(src.hv, vm, [(g, PAGE) for g in secrets]) == list(secrets.values())


def test_receive_into_a_vm_that_is_not_fresh_is_refused_and_leaves_it_alone() -> None:
    """receive_vm with a running guest of the destination as ``vm``: refused before anything is sent,
    the guest untouched."""
    dst = host("hv-mig-dst-pre3")
    secrets = secret_pages()
    busy = running_guest(dst, secrets)
    a, b = socket.socketpair()
    with a, b, pytest.raises(MigrationError, match="not a fresh destination VM"):
        receive_vm(dst.hv, Channel(b, TIMEOUT), amd_certs=amd_certs(dst), vm=busy)
    assert dst.hv.vms == [busy] and busy.state is VmState.RUNNING
    assert guest_reads(dst.hv, busy, [(g, PAGE) for g in secrets]) == list(secrets.values())


def test_a_region_named_whole_and_not_sent_whole_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lying source names a region it does not send whole: the destination refuses at FINISH
    (it would back GPAs the source never had), discards the VM, and the source cancels."""
    src, dst = host("hv-mig-src-lie"), host("hv-mig-dst-lie")
    secrets = secret_pages()
    vm = running_guest(src, secrets)
    monkeypatch.setattr(migration, "_whole_regions", lambda _vm, _gfns=None: [SECRET_GPAS[0]])
    moved, error = migrate_in_process(src, dst, vm)
    assert isinstance(error, MigrationError) and "HUGE" in str(error)
    assert moved is None and not dst.hv.vms and dst.hv.platform_status().guest_count == 0
    assert guest_state(src.hv, vm) == GuestState.RUNNING
    assert guest_reads(src.hv, vm, [(g, PAGE) for g in secrets]) == list(secrets.values())


@pytest.mark.parametrize("regions,started", [
    ((0x1000,), False),  # unaligned
    ((MEM,), False),  # outside the VM
    ((MEM - PAGE_2M, MEM - PAGE_2M), False),  # twice
    ((0,), True),  # after the first page
])
def test_bad_huge_frames_are_protocol_errors(regions: tuple[int, ...], started: bool) -> None:
    dst = host("hv-mig-dst-huge-bad")
    vm = dst.hv.create_vm("v", MEM)
    named: set[int] = set()
    pending: set[int] = set()
    with pytest.raises(ProtocolError):
        migration._huge_regions(vm, Huge(regions), named, pending, started)
    assert not named and not pending and not vm.npt.mappings
    migration._huge_regions(vm, Huge((MEM - PAGE_2M,)), named, pending, False)
    with pytest.raises(ProtocolError):  # named in an earlier frame
        migration._huge_regions(vm, Huge((MEM - PAGE_2M,)), named, pending, False)


@pytest.mark.parametrize("gpas", [
    (0x3000, 0x1000, 0x3000),  # repeated, out of order
    (0x1000, 0x1000),  # repeated, in order
    (0x1000, 0x2000, 0x5000),  # 0x5000 received in an earlier frame
    (0x1000, 0x2800),  # unaligned
    (0x1000, MEM),  # outside the VM
    (0x1000, 1 << 64),  # not a u64
    np.array([0x6000, 0x7000, 0x6000], dtype=np.uint64),  # a frame's column: repeated
    np.array([0x6000, MEM + PAGE], dtype=np.uint64),  # a frame's column: outside the VM
])
@pytest.mark.parametrize("in_c", [True, False])
def test_pages_of_a_frame_are_new_pages_of_the_vm(monkeypatch: pytest.MonkeyPatch, gpas: tuple[int, ...],
                                                  in_c: bool) -> None:
    """The destination takes each GPA of a PAGES frame once, inside the VM and page aligned; a frame
    with one bad GPA is refused, naming it, and records none of its pages (the frame's column
    summarised in C, sevemu.hw.columns, or in numpy)."""
    from sevemu.hw import memaccel

    if in_c and not memaccel.COLUMNS:
        pytest.skip("the C helpers were not built")
    monkeypatch.setattr(memaccel, "COLUMNS", in_c)
    vm = Vm.__new__(Vm)
    vm.memory = MEM
    seen = migration._Seen(MEM)
    migration._new_pages(vm, (0x5000, 0x4000), seen)
    before = seen.flags.copy()
    with pytest.raises(ProtocolError, match="unaligned, outside the VM or repeated"):
        migration._new_pages(vm, gpas, seen)
    assert (seen.flags == before).all()
    with pytest.raises(ProtocolError):
        migration._new_page(vm, 0x4000, seen)
    migration._new_pages(vm, (0x1000, 0x3000, 0x2000), seen)
    migration._new_page(vm, MEM - PAGE, seen)
    assert np.flatnonzero(seen.flags).tolist() == [1, 2, 3, 4, 5, MEM // PAGE - 1]


def test_source_vm_is_destroyed_after_success() -> None:
    src, dst = host("hv-mig-src2"), host("hv-mig-dst2")
    vm = running_guest(src, secret_pages())
    moved, error = migrate_in_process(src, dst, vm)
    assert error is None and moved is not None
    assert vm.state is VmState.DESTROYED and vm not in src.hv.vms
    assert src.hv.platform_status().guest_count == 0


def test_refused_send_start_leaves_the_guest_running() -> None:
    """Policy SEV and a destination certified by another manufacturer: SEND_START refuses."""
    src = host("hv-mig-src3")
    dst = host("hv-mig-dst3", root=AmdRoot.create("milan", key_bits=2048))
    secrets = secret_pages()
    vm = running_guest(src, secrets, policy=int(GuestPolicy.SEV))
    moved, error = migrate_in_process(src, dst, vm)
    assert isinstance(error, MigrationError) and "INVALID_CERTIFICATE" in str(error)
    assert moved is None and not dst.hv.vms and dst.hv.platform_status().guest_count == 0
    assert guest_state(src.hv, vm) == GuestState.RUNNING and vm.state is VmState.RUNNING
    assert guest_reads(src.hv, vm, [(g, PAGE) for g in secrets]) == list(secrets.values())


def test_only_launched_sev_guests_are_sent() -> None:
    src = host("hv-mig-src4")
    a, b = socket.socketpair()
    with a, b:
        plain = src.hv.create_vm("plain", MEM, VmKind.PLAIN)
        with pytest.raises(MigrationError):
            send_vm(src.hv, plain, Channel(a, 1))
        fresh = src.hv.create_vm("fresh", MEM)
        with pytest.raises(MigrationError):
            send_vm(src.hv, fresh, Channel(a, 1))


def test_destination_discards_the_vm_on_garbage() -> None:
    dst = host("hv-mig-dst5")
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame(Start(0, MEM, 1, b"\0" * 0x824, b"\0" * 0x80)))
        with pytest.raises(MigrationError):
            receive_vm(dst.hv, Channel(b, 2), amd_certs=amd_certs(dst))
    assert not dst.hv.vms and dst.hv.platform_status().guest_count == 0
    assert dst.firmware.state == PlatformState.INIT


# ---- two processes over loopback TCP, through a recording proxy ---------------------------------
class Proxy:
    """Forwards one connection to ``port`` on 127.0.0.1 and records every byte in both directions.

    ``tamper_page``: flip one byte in the TRANS of that page (counted from 0, in PAGE or PAGES frames);
    ``cut_after_pages``: close both connections once the frame that carries that many pages went through.
    """

    def __init__(self, port: int, *, tamper_page: int | None = None, cut_after_pages: int | None = None) -> None:
        self.target = port
        self.tamper_page = tamper_page
        self.cut_after_pages = cut_after_pages
        self.forward = bytearray()
        self.backward = bytearray()
        self.pages = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            a, _ = self.listener.accept()
            b = socket.create_connection(("127.0.0.1", self.target), timeout=TIMEOUT)
        except OSError:
            return
        for s in (a, b):
            s.settimeout(TIMEOUT)
        self._socks = [a, b]
        threading.Thread(target=self._pump_back, args=(b, a), daemon=True).start()
        try:
            while True:
                head = self._read(a, 5)
                length, kind = struct.unpack(">IB", head)
                body = bytearray(self._read(a, length - 1))
                if kind == MsgType.PAGE:
                    if self.pages == self.tamper_page:
                        body[8 + 0x34 + 100] ^= 0x01
                    self.pages += 1
                elif kind == MsgType.PAGES:  # count, GPAs, 64-byte header slots, 4 KiB TRANS each
                    count = struct.unpack_from(">I", body)[0]
                    if self.tamper_page is not None and self.pages <= self.tamper_page < self.pages + count:
                        body[4 + 72 * count + (self.tamper_page - self.pages) * PAGE + 100] ^= 0x01
                    self.pages += count
                frame = head + bytes(body)
                self.forward += frame
                b.sendall(frame)
                if kind in (MsgType.PAGE, MsgType.PAGES) and self.cut_after_pages is not None \
                        and self.pages >= self.cut_after_pages:
                    self.close()
                    return
        except OSError:
            self.close()

    @staticmethod
    def _read(s: socket.socket, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return bytes(out)

    def _pump_back(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(1 << 16):
                self.backward += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.listener.close()


@pytest.fixture(scope="module")
def root() -> AmdRoot:
    return default_amd_root("milan")


@pytest.fixture
def destination_dir(tmp_path: Path, root: AmdRoot) -> Iterator[Path]:
    path = tmp_path / "destination"
    manufacture(path, "milan", root)
    yield path


def plan(destination_dir: Path, root: AmdRoot, check: tuple[tuple[int, int], ...] = ()) -> DestinationPlan:
    return DestinationPlan("milan", str(destination_dir), root.amd_certs.encode(), timeout=TIMEOUT, check=check,
                           seed="hv-mig-two-process")


def test_two_process_migration_never_puts_plaintext_on_the_wire(destination_dir: Path, root: AmdRoot) -> None:
    secrets = secret_pages()
    check = tuple((gpa, PAGE) for gpa in secrets) + ((SHARED_GPA, len(SHARED_MARK)),)
    src = host("hv-mig-2p-src", root)
    vm = running_guest(src, secrets)
    with Destination(plan(destination_dir, root, check)) as dest:
        proxy = Proxy(dest.port)
        chan = Channel.connect("127.0.0.1", proxy.port, TIMEOUT)
        sent = send_vm(src.hv, vm, chan, keep_source=True)
        chan.close()
        report = dest.result()
    assert report["ok"], report.get("error")
    assert report["guest_state"] == GuestState.RUNNING and report["check_reason"] == "hlt"
    assert bytes.fromhex(report["check_hex"]) == b"".join(secrets.values()) + SHARED_MARK
    assert report["pages"] == sent.pages + sent.shared and not report["firmware_errors"]
    assert guest_state(src.hv, vm) == GuestState.SENT
    wire = bytes(proxy.forward) + bytes(proxy.backward)
    assert len(proxy.forward) == sent.bytes_sent
    assert SHARED_MARK in wire  # the capture sees plaintext when there is some...
    for data in secrets.values():  # ... and the guest's private pages never are
        for off in range(0, PAGE, 32):
            assert data[off : off + 32] not in wire


@pytest.mark.parametrize("failure", ["cut", "tamper"])
def test_two_process_failure_cancels_the_source_and_discards_the_destination(
        destination_dir: Path, root: AmdRoot, failure: str) -> None:
    secrets = secret_pages()
    src = host(f"hv-mig-2p-{failure}", root)
    vm = running_guest(src, secrets)
    with Destination(plan(destination_dir, root)) as dest:
        proxy = Proxy(dest.port, cut_after_pages=3) if failure == "cut" else Proxy(dest.port, tamper_page=2)
        chan = Channel.connect("127.0.0.1", proxy.port, TIMEOUT)
        with pytest.raises(MigrationError):
            send_vm(src.hv, vm, chan)
        chan.close()
        report = dest.result()
    assert not report["ok"]
    if failure == "tamper":
        assert "BAD_MEASUREMENT" in report["error"]
    # the destination threw the half-received guest away ...
    assert report["vms"] == 0 and report["guest_count"] == 0 and report["platform_state"] == PlatformState.INIT
    assert not report["firmware_errors"]
    # ... and the source guest runs on, untouched
    assert guest_state(src.hv, vm) == GuestState.RUNNING and vm.state is VmState.RUNNING
    assert guest_reads(src.hv, vm, [(g, PAGE) for g in secrets]) == list(secrets.values())
    assert not src.firmware.internal_errors


def test_pages_frames_that_do_not_add_up_are_not_sent() -> None:
    with pytest.raises(ProtocolError):
        encode_frame(Pages((0x1000,), bytes(64), bytes(PAGE - 1)))
    with pytest.raises(ProtocolError):
        encode_frame(Pages((0x1000, 0x2000), bytes(64), bytes(2 * PAGE)))


def _joined(transport: Transport) -> bytes:
    """A PAGES message's transport buffers back to back (a source hands its bounce area's pages)."""
    assert transport is not None
    return b"".join(transport) if isinstance(transport, list) else bytes(transport)


def test_migration_queues_a_command_per_page_through_the_ring_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVM's contract holds: every page is its own SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA (its own
    IV and MAC), submitted through the PSP's ring buffer; the mailbox is back in mailbox mode after."""
    sent: list[Pages] = []
    send = Channel.send

    def recording(self: Channel, msg: Message) -> None:
        if isinstance(msg, Pages):  # (a copy: the batch's buffers are reused by the next doorbell)
            sent.append(Pages(msg.gpas, bytes(msg.hdrs), _joined(msg.transport)))
        send(self, msg)

    monkeypatch.setattr(Channel, "send", recording)
    src, dst = host("hv-mig-ring-src"), host("hv-mig-ring-dst")
    vm = running_guest(src, secret_pages())
    private = len(vm.npt.mappings) - len(vm.shared_gpas)
    moved, error = migrate_in_process(src, dst, vm, keep_source=True)
    assert error is None and moved is not None
    for m in (src, dst):
        cmd = "SEND_UPDATE_DATA" if m is src else "RECEIVE_UPDATE_DATA"
        names = [name for name, status in m.firmware.log if status == Status.SUCCESS]
        assert names.count(cmd) == private and "RING_BUFFER" in names
        assert m.firmware.ring is None
    assert sum(len(f.gpas) for f in sent) == private and all(len(f.gpas) <= PAGE_BATCH for f in sent)
    ivs = {f.hdrs[i * 64 + 4 : i * 64 + 20] for f in sent for i in range(len(f.gpas))}  # HdrBuf.iv at 04
    macs = {f.hdrs[i * 64 + 0x14 : i * 64 + 0x34] for f in sent for i in range(len(f.gpas))}
    assert len(ivs) == len(macs) == private  # a fresh IV and a MAC of its own per page


def test_transport_slots_are_the_transport_commands_one_by_one() -> None:
    """The ring slots a page batch queues, built as columns, are TRANSPORT_PACK of each command
    zero-padded to its 64-byte slot (the byte layout KVM's one command per page gives)."""
    spas = [0x8000_0000_0000 | 0x1234_5000, 0x7000, 0x8000_0000_0000 | 0xFFFF_F000, 0x2000]
    slots = transport_slots(0x1_0203, 0x40_0000, 0x34, spas, 0x80_0000)
    assert slots == b"".join(
        TRANSPORT_PACK.pack(0x1_0203, 0x40_0000 + 64 * i, 0x34, spa, PAGE, 0x80_0000 + PAGE * i, PAGE).ljust(64, b"\0")
        for i, spa in enumerate(spas))
    assert transport_slots(1, 0, 0x34, [], 0) == b""


def test_send_page_batches_looks_a_column_up_as_a_tuple() -> None:
    """send_page_batches given its GPAs as a column (SPAs looked up with NestedPageTable.lookup_many,
    the unaligned test run once over the column) answers as given them as a tuple (a lookup per page):
    the same error for an unmapped GPA, an unaligned one, and for good pages of a guest that is not
    sending (the firmware's refusal)."""
    m = host("hv-mig-cols")
    vm = running_guest(m, secret_pages())
    good = sorted(SECRET_GPAS)[:2]
    for gpas in ([MEM + PAGE, *good], [good[0] + 0x10, good[1]], good):  # (the first batch's)
        answers = []
        for given in (np.array(gpas, dtype=np.uint64), tuple(gpas)):
            with pytest.raises(Exception) as caught:
                list(m.hv.sev.send_page_batches(vm, given, batch=2))
            answers.append((type(caught.value), str(caught.value)))
        assert answers[0] == answers[1]
    assert guest_state(m.hv, vm) == GuestState.RUNNING
