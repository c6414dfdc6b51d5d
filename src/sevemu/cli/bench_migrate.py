"""``sevemu bench migrate``: an SEV guest moved between two hosts in two processes over loopback TCP,
beside the raw loopback throughput of the same run.

Setup (not timed).  The emulated AMD root of the generation (:func:`sevemu.scenario.default_amd_root`)
certifies two chips -- the factory -- so each platform's chain verifies on the other.  The source
host boots in this process; the destination host boots in a child process (``multiprocessing``,
spawn) from its own platform directory, makes the destination VM with the guest's memory size and
every page of it backed and pinned, as the destination QEMU (started with ``-incoming`` and the
same ``-m``) has it before the migration -- QEMU registers each RAM block of an SEV guest with
KVM_MEMORY_ENCRYPT_REG_REGION when it creates the machine, which pins, and so faults in, the whole
block (:func:`~sevemu.hypervisor.migration.prepare_destination`; ``--no-prealloc``: the VM is made
when START arrives and its pages are first touched as they are received) -- and listens on
127.0.0.1 (ephemeral port).  The guest
(``--size`` MiB) is backed entirely and launched with LAUNCH_UPDATE_DATA over all of its memory in
runs of up to 64 MiB (a zero image: the host allocator's fresh pages hold zeros), so every page is
populated ciphertext; the guest then boots and writes a random 32-byte marker into 256 pages spread
over its memory.

Timed: :func:`sevemu.hypervisor.migration.send_vm` against :func:`~sevemu.hypervisor.migration.receive_vm`
-- every page through its own SEND_UPDATE_DATA (own IV, own MAC), the wire and its own
RECEIVE_UPDATE_DATA, the commands queued 510 per doorbell (as many as the ring's two queue pages
carry: ``PAGE_BATCH``) through the PSP's ring buffer and 510 pages per PAGES frame, the two hosts
working in parallel.  Figures:

* ``migrate_mbps``: guest memory moved per second (pages x 4 KiB over the source's wall time from
  HELLO to DONE), in MB/s (10^6 bytes);
* ``wire_mbps``: bytes on the wire per second (headers and framing included);
* ``raw_tcp_mbps``: the same number of bytes through a plain TCP connection between the same two
  processes (1 MiB blocking writes, the receiver reading into a preallocated 1 MiB buffer) -- what
  the transport alone could carry; ``ratio``: ``wire_mbps / raw_tcp_mbps``;
* ``floor_mbps``: the per-page cryptography the protocol requires, done in this process on one
  core with the primitives and reused contexts the firmware uses (:func:`crypto_floor`): each page
  decrypted from memory with a memory key (the generation's cipher, over a doorbell's run of
  ``PAGE_BATCH`` pages), a fresh 16-byte IV from the OS, AES-128-CTR under TEK and HMAC-SHA256 under TIK over the
  header terms and TRANS (:meth:`~sevemu.crypto.transport.PacketCrypto.seal_many`: OpenSSL, one IV
  and one MAC per page) -- and nothing else; measured before and after the migration, the better of
  the two kept (``floor_runs_us_per_page`` has both); ``floor_ratio``: ``migrate_mbps /
  floor_mbps`` (each side does this much crypto per page, the destination the reverse);
* ``source_cpu_us_per_page`` / ``destination_cpu_us_per_page``: CPU time of each process per page
  over the migration (the source's over the span of ``migrate_seconds``, from HELLO to SEND_FINISH;
  ``source_teardown_cpu_us_per_page`` is what destroying the sent VM after it costs, not counted
  -- the destination's VM is likewise made before its span), and ``cpu_bound_mbps``, the rate the busier side allows when each process has a core to itself
  (the wall-clock figure also counts time lost to other load on the machine); ``floor_cpu_us_per_page``
  the floor in CPU time (``time.process_time``, the better of two runs) and ``cpu_floor_ratio`` the
  floor's CPU per page over the busier side's -- the ratio a machine with a free core per side
  would show, less sensitive to other load than the wall-clock ``floor_ratio``;
* ``doorbells``: ring-buffer doorbells the source rang;
* ``destination_prealloc``: whether the destination VM was made and pinned before the migration
  (setup above) or when START arrived (``--no-prealloc``).

Verification: the destination runs the guest from where it stopped; it reads the markers back and
prints their SHA-256, which must equal the source's.

The child-process side (:class:`DestinationPlan`, :func:`destination_main`, :class:`Destination`)
is reused by the end-to-end migration tests.  The child is started with SIGINT ignored: Ctrl-C on a
terminal reaches the whole process group, and it is the parent's to handle (it stops the child
and exits with status 130, no traceback from either process).  Options are checked before anything
runs (``--size`` against this host's available memory, ``--timeout`` positive and finite).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final, Self

from sevemu._util.units import PAGE, MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.pycode import CODE_GPA, code_table
from sevemu.abi.sev import ActivateCmd, HandleCmd, LaunchStartCmd, LaunchUpdateDataCmd, MeasureBuf
from sevemu.certs.roots import GENERATIONS
from sevemu.cli.common import host_memory, positive_int, seconds
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.crypto.memenc import MemoryCipher, TweakConstants
from sevemu.crypto.transport import PacketCrypto
from sevemu.errors import InputError
from sevemu.firmware.sev.migrate import DATA_CONTEXT, DATA_PACKET_AAD
from sevemu.guest.kernel import boot, print_
from sevemu.hw.profiles import profile
from sevemu.hw.pyengine import Op, PyEngine, op
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.migration import Channel, MigrationError, prepare_destination, receive_vm, send_vm
from sevemu.hypervisor.psp import RingSession
from sevemu.hypervisor.sev.legacy import PAGE_BATCH
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.scenario import build_machine, default_amd_root, manufacture

__all__ = [
    "Destination",
    "DestinationPlan",
    "bench_migrate",
    "crypto_floor",
    "destination_main",
    "launch_zeroed",
    "register_migrate",
    "run_migrate",
]

_RUN: Final = 64 * MiB
_MARKS: Final = 256
_RAW_CHUNK: Final = MiB
_FLOOR_PAGES: Final = 4096
_LOCALHOST: Final = "127.0.0.1"
MIN_SIZE_MIB: Final = 8
MEMORY_FACTOR: Final = 3
"""Both hosts hold the guest's populated pages, the source its launch and the wire its frames."""


def register_migrate(bench_subparsers: Any) -> None:
    """Add ``migrate`` to the ``sevemu bench`` sub-commands."""
    p = bench_subparsers.add_parser("migrate", help="SEV guest migration over loopback TCP vs raw TCP",
                                    epilog="examples:\n  sevemu bench migrate\n"
                                           "  sevemu bench migrate --size 64 --json")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--size", type=positive_int, default=1024, metavar="MiB",
                   help=f"guest memory in MiB (default 1024, at least {MIN_SIZE_MIB})")
    p.add_argument("--generation", choices=GENERATIONS, default="milan", help="platform of both hosts (default milan)")
    p.add_argument("--timeout", type=seconds, default=60.0, metavar="S",
                   help="bound on every network wait, seconds (default 60)")
    p.add_argument("--no-prealloc", dest="prealloc", action="store_false",
                   help="make the destination VM when START arrives (its RAM first touched as pages are "
                        "received) instead of before the migration, pinned, as QEMU's destination has it")
    p.set_defaults(func=run_migrate)


# ---- the destination host (child process) -------------------------------------------------------


@dataclass(frozen=True)
class DestinationPlan:
    """What the destination process needs (picklable: it crosses to a spawned process)."""

    generation: str
    platform_dir: str
    """A manufactured platform directory (:func:`sevemu.scenario.manufacture`)."""
    amd_certs: bytes
    """ASK || ARK of the destination's chip, as its host fetched it from the manufacturer."""
    timeout: float = 30.0
    check: tuple[tuple[int, int], ...] = ()
    """(GPA, length) ranges the received guest reads back once it runs (results in the report)."""
    baseline: bool = False
    """After the migration, accept one plain TCP connection and swallow it (raw loopback figure)."""
    seed: str | None = None
    memory: int = 0
    """The destination VM's RAM, as the destination QEMU is started with it (``-m``, ``-incoming``):
    when set, the VM is made with every page backed and pinned before the host listens
    (:func:`~sevemu.hypervisor.migration.prepare_destination`); 0: made when START arrives."""


def _check_workload(ranges: tuple[tuple[int, int], ...]) -> Generator[Op, Any, None]:
    """The received guest, resumed with the source's registers: read ``ranges``, print the hex of
    what it read, then its SHA-256."""
    h = hashlib.sha256()
    seen = bytearray()
    for gpa, length in ranges:
        data = yield op.read(gpa, length)
        h.update(data)
        seen += data
    yield from print_(bytes(seen).hex() + "\n" + h.hexdigest() + "\n")
    yield op.hlt()


def destination_main(plan: DestinationPlan, conn: Connection) -> None:
    """The destination host: boot, listen, receive one guest, report; run in a child process.

    Messages to ``conn``: ``("port", int)``, then ``("result", dict)`` or ``("error", str)``.
    """
    try:
        m = build_machine(plan.generation, platform_dir=plan.platform_dir, seed=plan.seed)
        hv = m.hv
        prepared = prepare_destination(hv, plan.memory, "received") if plan.memory else None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind((_LOCALHOST, 0))
            listener.listen(2)
            conn.send(("port", listener.getsockname()[1]))
            chan = Channel.accept(listener, plan.timeout)
            t0, c0 = time.perf_counter(), time.process_time()
            report: dict[str, Any] = {}
            try:
                vm = receive_vm(hv, chan, amd_certs=plan.amd_certs, name="received", vm=prepared)
            except MigrationError as exc:
                report.update(ok=False, error=str(exc))
                vm = None
            finally:
                report.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0,
                              bytes_received=chan.bytes_received)
                chan.close()
            status = hv.platform_status()
            report.update(vms=len(hv.vms), guest_count=status.guest_count, platform_state=status.state,
                          firmware_errors=list(m.firmware.internal_errors))
            if vm is not None:
                report.update(ok=True, memory=vm.memory, pages=len(vm.npt.mappings),
                              guest_state=hv.guest_status(vm).state, policy=vm.policy)
                if plan.check:
                    result = hv.run(vm, engine=PyEngine(_check_workload(plan.check)))
                    lines = bytes(vm.console).decode(errors="replace").split()
                    report.update(check_reason=result.reason, check_hex=lines[0] if lines else "",
                                  check_digest=lines[1] if len(lines) > 1 else "")
            conn.send(("result", report))
            if plan.baseline and vm is not None:
                _swallow(listener, plan.timeout)
    except Exception:  # noqa: BLE001 - a process boundary: the parent gets the traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _swallow(listener: socket.socket, timeout: float) -> None:
    """Accept one connection, read an 8-byte length then that many bytes (blocking reads into one
    1 MiB buffer), answer b"k"."""
    listener.settimeout(timeout)
    sock, _ = listener.accept()
    with sock:
        sock.settimeout(timeout)
        want = int.from_bytes(_recv_exact(sock, 8), "big")
        buf = bytearray(_RAW_CHUNK)
        view = memoryview(buf)
        got = 0
        while got < want:
            n = sock.recv_into(view, min(len(buf), want - got))
            if not n:
                raise ConnectionError("raw TCP sender closed early")
            got += n
        sock.sendall(b"k")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed")
        out += chunk
    return bytes(out)


@dataclass
class Destination:
    """A destination host running :func:`destination_main` in a spawned child process.

    Use as a context manager; the child is joined (and, if it overran ``timeout``, terminated by
    its own process id) on exit.  Spawned processes re-import the main module: a script that uses
    this must keep its top level under ``if __name__ == "__main__":`` (the ``sevemu`` entry point
    and pytest do).
    """

    plan: DestinationPlan
    start_timeout: float = 120.0
    port: int = 0
    process: Any = field(default=None, repr=False)
    _conn: Any = field(default=None, repr=False)

    def __enter__(self) -> Self:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self._conn = parent
        self.process = ctx.Process(target=destination_main, args=(self.plan, child), daemon=True,
                                   name="sevemu-destination")
        with _sigint_ignored():  # inherited: Ctrl-C is the parent's (module docstring)
            self.process.start()
        child.close()
        port = self._expect("port", self.start_timeout)
        if not isinstance(port, int):
            raise MigrationError(f"destination reported port {port!r}")
        self.port = port
        return self

    def _expect(self, tag: str, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise MigrationError(f"the destination process sent no {tag} within {timeout:.0f} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise MigrationError("the destination process died") from None
        if kind == "error":
            raise MigrationError(f"the destination process failed:\n{value}")
        if kind != tag:
            raise MigrationError(f"the destination process sent {kind!r}, expected {tag!r}")
        return value

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The destination's report (see :func:`destination_main`)."""
        value = self._expect("result", self.plan.timeout * 2 + 30 if timeout is None else timeout)
        if not isinstance(value, dict):
            raise MigrationError(f"the destination reported {value!r}")
        return value

    def __exit__(self, exc_type: object, *rest: object) -> None:
        proc = self.process
        if proc is not None:
            # on an error here the child may be waiting for us: do not wait for its timeouts
            proc.join(5 if exc_type is not None else self.plan.timeout + 10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        if self._conn is not None:
            self._conn.close()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child is started (only the main thread may change signal handlers)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- the source guest ---------------------------------------------------------------------------


def launch_zeroed(hv: Hypervisor, vm: Vm, policy: int = 0, programs: Iterable[object] = ()) -> None:
    """Back all of ``vm`` and launch it with LAUNCH_UPDATE_DATA over its whole memory (zeros).

    Pages fresh from the host allocator hold zeros in DRAM, so the image is written by nobody but
    the program table of ``programs`` (the guest's Python code, :mod:`sevemu.abi.pycode`); the
    firmware encrypts it in place, run by run, as for any image (the launch digest covers it).
    """
    vm.back_range(0, vm.memory)
    if programs:
        vm.host_write(CODE_GPA, code_table(programs))
        hv.core.clflush_range(vm.spa_of(CODE_GPA), PAGE)  # the firmware reads DRAM
    vm.state = VmState.LAUNCHING
    psp = hv.psp
    vm.policy = policy
    vm.handle = psp.call(CommandId.LAUNCH_START, LaunchStartCmd(policy=policy)).handle
    psp.call(CommandId.ACTIVATE, ActivateCmd(handle=vm.handle, asid=vm.asid))
    runs: list[list[int]] = []
    for _gfn, spa in sorted(vm.npt.mappings.items()):
        last = runs[-1] if runs else None
        if last is not None and last[0] + last[1] == spa and last[1] < _RUN:
            last[1] += PAGE
        else:
            runs.append([spa, PAGE])
    for spa, length in runs:
        psp.call(CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=vm.handle, paddr=spa, len=length))
    out = psp.put_data(bytes(MeasureBuf.SIZE))
    psp.call(CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=vm.handle, paddr=out, len=MeasureBuf.SIZE))
    vm.measurement = psp.get_data(MeasureBuf.SIZE)
    psp.call(CommandId.LAUNCH_FINISH, HandleCmd(handle=vm.handle))
    vm.state = VmState.RUNNING


def _marking_workload(mapped: int, marks: list[tuple[int, bytes]]) -> Generator[Op, Any, None]:
    yield from boot(mapped)
    for gpa, data in marks:
        yield op.write(gpa, data)
    yield op.hlt()


def _marks(size: int, count: int) -> list[tuple[int, bytes]]:
    """``count`` (GPA, 32 random bytes) spread over ``[4 MiB, size)``, away from the page tables."""
    low = 4 * MiB
    pages = (size - low) // PAGE
    step = max(pages // count, 1)
    return [(low + (i * step) * PAGE + 64 * (i % 60), os.urandom(32)) for i in range(min(count, pages))]


# ---- the benchmark ------------------------------------------------------------------------------


def _raw_tcp(port: int, nbytes: int, timeout: float) -> float:
    """Seconds to push ``nbytes`` through a plain TCP connection to the destination's listener, in
    1 MiB blocking writes."""
    chunk = os.urandom(_RAW_CHUNK)
    with socket.create_connection((_LOCALHOST, port), timeout=timeout) as sock:
        sock.settimeout(None)  # blocking writes: the kernel takes each 1 MiB as fast as it can
        t0 = time.perf_counter()
        sock.sendall(nbytes.to_bytes(8, "big"))
        left = nbytes
        view = memoryview(chunk)
        while left > 0:
            n = min(left, len(chunk))
            sock.sendall(view[:n])
            left -= n
        sock.settimeout(timeout)
        if _recv_exact(sock, 1) != b"k":
            raise MigrationError("raw TCP receiver answered garbage")
        return time.perf_counter() - t0


def crypto_floor(generation: str, pages: int = _FLOOR_PAGES, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per page of the per-page cryptography a SEND_UPDATE_DATA needs, on one core (module
    docstring): each page decrypted from memory with a memory key, given a fresh IV from the OS's
    random source, encrypted with AES-128-CTR under TEK and MACed with HMAC-SHA256 under TIK over
    its header terms and TRANS.  Done with the primitives and reused contexts the firmware uses
    (:meth:`MemoryCipher.decrypt_bulk_into` over a doorbell's run of pages,
    :meth:`PacketCrypto.seal_many`: OpenSSL, one IV and one MAC per page), ``PAGE_BATCH`` pages per run, and
    nothing else: no memory model, no commands, no copies between buffers.  ``clock``: wall clock
    (default) or the process's CPU time (``time.process_time``)."""
    prof = profile(generation)
    cipher = MemoryCipher(prof.mem_mode, os.urandom(prof.mem_mode.key_size), TweakConstants.random_zen2())
    channel = PacketCrypto(os.urandom(16), os.urandom(16))
    run = PAGE_BATCH
    memory = os.urandom(run * PAGE)
    plain = bytearray(run * PAGE)
    aad = DATA_PACKET_AAD
    runs = max(-(-pages // run), 1)
    best = float("inf")
    for _ in range(3):
        t0 = clock()
        for i in range(0, runs * run, run):
            cipher.decrypt_bulk_into(0x1_0000_0000 + i * PAGE, memory, plain)
            ivs = [os.urandom(16) for _ in range(run)]
            channel.seal_many(b"".join(ivs), b"".join([aad.pack(DATA_CONTEXT, 0, iv, PAGE, PAGE) for iv in ivs]),
                              plain, PAGE)
        best = min(best, (clock() - t0) / (runs * run))
    return best


TARGET_MBPS: Final = 200.0
TARGET_FLOOR_RATIO: Final = 0.5


def _count_doorbells(hv: Hypervisor) -> Callable[[], int]:
    """Counts the ring-buffer doorbells of the sessions ``hv``'s PSP driver opens from now on."""
    psp = hv.psp
    opened: list[RingSession] = []
    ring = psp.ring

    def counting(high: bool = False) -> RingSession:
        session = ring(high)
        opened.append(session)
        return session

    psp.ring = counting  # type: ignore[method-assign]
    return lambda: sum(s.doorbells for s in opened)


def bench_migrate(size_mib: int, generation: str = "milan", timeout: float = 60.0,
                  progress: Progress | None = None, prealloc: bool = True) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the figures.  ``prealloc``: the destination
    VM made and its RAM pinned before the migration, as QEMU's destination has it (module
    docstring); False: made when START arrives, its pages first touched as they are received."""
    if size_mib < MIN_SIZE_MIB:
        raise InputError(f"--size {size_mib}: the benchmark guest needs at least {MIN_SIZE_MIB} MiB")
    size = size_mib * MiB
    available = host_memory()
    if size * MEMORY_FACTOR > available:
        raise InputError(f"--size {size_mib} MiB: the benchmark needs about {MEMORY_FACTOR}x that in memory, "
                         f"and this host has {available // MiB} MiB available")
    progress = progress or Progress(False)
    progress.step("manufacturing the destination's chip, starting its process")
    t_setup = time.perf_counter()
    root = default_amd_root(generation)
    marks = _marks(size, _MARKS)
    expected = hashlib.sha256(b"".join(d for _, d in marks)).hexdigest()
    with tempfile.TemporaryDirectory(prefix="sevemu-bench-migrate-") as tmp:
        dst_dir = Path(tmp) / "destination"
        manufacture(dst_dir, generation, root)
        plan = DestinationPlan(generation, str(dst_dir), root.amd_certs.encode(), timeout=timeout,
                               check=tuple((gpa, len(d)) for gpa, d in marks), baseline=True,
                               memory=size if prealloc else 0)
        with Destination(plan) as dest:
            progress.step(f"launching a {size_mib} MiB SEV guest on the source")
            src = build_machine(generation, amd_root=root)
            hv = src.hv
            vm = hv.create_vm("bench", size)
            launch_zeroed(hv, vm, programs=(_marking_workload, _check_workload))
            vm.add_vcpu(PyEngine(_marking_workload(size, marks)))
            booted = hv.run(vm)
            if booted.reason != "hlt":
                raise MigrationError(f"the benchmark guest did not boot: {booted.reason}")
            setup = time.perf_counter() - t_setup
            progress.step("crypto floor: the per-page cryptography alone, one core")
            floors = [crypto_floor(generation)]
            cpu_floors = [crypto_floor(generation, clock=time.process_time)]
            progress.step(f"migrating {size_mib} MiB over loopback TCP")
            chan = Channel.connect(_LOCALHOST, dest.port, timeout)
            c0 = time.process_time()
            rings = _count_doorbells(hv)
            try:
                sent = send_vm(hv, vm, chan)
            finally:
                chan.close()
            doorbells = rings()
            source_total_cpu = time.process_time() - c0
            source_cpu = sent.cpu_seconds  # (the migration's span, as migrate_seconds: not the teardown after)
            received = dest.result()
            if not received.get("ok"):
                raise MigrationError(f"the destination failed: {received.get('error')}")
            progress.step("raw TCP baseline")
            raw_seconds = _raw_tcp(dest.port, sent.bytes_sent, timeout)
    progress.step("crypto floor again (the better of two, either side of the migration)")
    floors.append(crypto_floor(generation))
    cpu_floors.append(crypto_floor(generation, clock=time.process_time))
    floor = min(floors)
    cpu_floor = min(cpu_floors)
    moved = sent.pages * PAGE
    migrate_mbps = moved / sent.seconds / 1e6
    wire_mbps = sent.bytes_sent / sent.seconds / 1e6
    raw_mbps = sent.bytes_sent / raw_seconds / 1e6
    busiest = max(source_cpu, received["cpu_seconds"])
    return {
        "generation": generation,
        "guest_mib": size_mib,
        "pages": sent.pages,
        "shared_pages": sent.shared,
        "setup_seconds": setup,
        "migrate_seconds": sent.seconds,
        "destination_seconds": received["seconds"],
        "source_cpu_us_per_page": source_cpu / sent.pages * 1e6,
        "source_teardown_cpu_us_per_page": (source_total_cpu - source_cpu) / sent.pages * 1e6,
        "destination_cpu_us_per_page": received["cpu_seconds"] / sent.pages * 1e6,
        "cpu_bound_mbps": moved / busiest / 1e6,
        "wire_bytes": sent.bytes_sent,
        "migrate_mbps": migrate_mbps,
        "wire_mbps": wire_mbps,
        "raw_tcp_seconds": raw_seconds,
        "raw_tcp_mbps": raw_mbps,
        "ratio": wire_mbps / raw_mbps,
        "floor_us_per_page": floor * 1e6,
        "floor_runs_us_per_page": [f * 1e6 for f in floors],
        "floor_mbps": PAGE / floor / 1e6,
        "floor_ratio": migrate_mbps / (PAGE / floor / 1e6),
        "floor_cpu_us_per_page": cpu_floor * 1e6,
        "cpu_floor_ratio": cpu_floor / (busiest / sent.pages),
        "target_mbps": TARGET_MBPS,
        "target_floor_ratio": TARGET_FLOOR_RATIO,
        "doorbells": doorbells,
        "destination_prealloc": prealloc,
        "verified": received.get("check_digest") == expected and received.get("check_reason") == "hlt",
    }


def run_migrate(args: argparse.Namespace) -> int:
    with Progress(progress_enabled(quiet=args.json or bool(getattr(args, "quiet", False))), "bench migrate") as p:
        r = bench_migrate(args.size, args.generation, args.timeout, p, prealloc=getattr(args, "prealloc", True))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0 if r["verified"] else 1
    print(f"migration of a {r['guest_mib']} MiB SEV guest ({r['pages']} pages) between two {r['generation']} "
          f"hosts in two processes over loopback TCP (setup {r['setup_seconds']:.1f} s, not timed):")
    print(f"  migration  {r['migrate_mbps']:9.2f} MB/s of guest memory   {r['migrate_seconds']:7.2f} s   "
          f"wire {r['wire_mbps']:.2f} MB/s ({r['wire_bytes']:,} bytes)")
    print(f"  raw TCP    {r['raw_tcp_mbps']:9.2f} MB/s, the same bytes       {r['raw_tcp_seconds']:7.2f} s   "
          f"ratio {r['ratio']:.4f} (1 MiB blocking writes)")
    print(f"  crypto floor {r['floor_mbps']:7.2f} MB/s ({r['floor_us_per_page']:.1f} us/page: memory decrypt + "
          f"AES-CTR + HMAC, one core); migration / floor {r['floor_ratio']:.2f} "
          f"(targets: >= {TARGET_MBPS:.0f} MB/s, >= {TARGET_FLOOR_RATIO} of the floor)")
    print(f"  {r['pages']} SEND_UPDATE_DATA commands in {r['doorbells']} ring-buffer doorbells")
    print(f"  CPU per page: source {r['source_cpu_us_per_page']:.1f} us (then "
          f"{r['source_teardown_cpu_us_per_page']:.1f} us destroying the sent VM), destination "
          f"{r['destination_cpu_us_per_page']:.1f} us -> {r['cpu_bound_mbps']:.2f} MB/s with a core each; "
          f"floor {r['floor_cpu_us_per_page']:.1f} us of CPU -> ratio {r['cpu_floor_ratio']:.2f} in CPU time")
    print("  destination VM " + ("made with its RAM backed and pinned before the migration (as QEMU's -incoming "
                                 "destination has it)" if r["destination_prealloc"] else
                                 "made when START arrived, its pages backed as they were received"))
    print(f"  destination guest read its markers back: {'ok' if r['verified'] else 'MISMATCH'}")
    return 0 if r["verified"] else 1
