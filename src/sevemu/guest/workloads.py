"""Guest programs used by the demo, the benchmarks and the tests (Python workloads).

Each function returns a generator to hand to :class:`~sevemu.hw.pyengine.PyEngine`.  Results a guest
wants the outside world to see go through the serial console or a shared page -- exactly the channels
an SEV guest has.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from sevemu.guest.kernel import Gen, boot, print_
from sevemu.hw.pyengine import Op, op

__all__ = ["demo_guest", "keep_secret", "read_back", "read_region", "shared_exchange", "touch_pages"]

LARGE = 2 << 20


def keep_secret(mapped: int, secret_gpa: int, secret: bytes, shared: int | None = None) -> Gen:
    """Boot, store ``secret`` in private memory, read it back, say so on the console, halt."""
    yield from boot(mapped, shared=[shared] if shared is not None else [])
    yield op.write(secret_gpa, secret)
    back = yield op.read(secret_gpa, len(secret))
    verdict = "ok" if back == secret else "CORRUPTED"
    yield from print_(f"secret of {len(secret)} bytes stored at GPA {secret_gpa:#x}: read back {verdict}\n")
    yield op.hlt()
    # later runs: keep answering "read it back" requests
    while True:
        back = yield op.read(secret_gpa, len(secret))
        yield from print_(back.hex() + "\n")
        yield op.hlt()


def read_back(mapped: int, gpa: int, length: int) -> Gen:
    """Boot and print the hex of ``length`` bytes at ``gpa`` (as the guest sees them)."""
    yield from boot(mapped)
    data = yield op.read(gpa, length)
    yield from print_(data.hex() + "\n")
    yield op.hlt()


def read_region(gpa: int, length: int) -> Generator[Op, Any, bytes]:
    """Read ``length`` bytes at ``gpa`` (no boot: to be used after :func:`boot`)."""
    data: bytes = yield op.read(gpa, length)
    return data


def shared_exchange(mapped: int, shared: int, message: bytes) -> Gen:
    """Boot with ``shared`` as a C=0 page, put ``message`` there, halt; on resume print the reply."""
    yield from boot(mapped, shared=[shared])
    yield op.write(shared, message.ljust(64, b"\0"))
    yield op.hlt()  # the host reads the page and writes its reply
    reply = yield op.read(shared + 64, 64)
    yield from print_("host replied: " + reply.rstrip(b"\0").decode(errors="replace") + "\n")
    yield op.hlt()


def touch_pages(mapped: int, start: int, length: int, stride: int = 4096) -> Gen:
    """Boot, then write one 8-byte word every ``stride`` bytes of ``[start, start+length)``."""
    yield from boot(mapped)
    for gpa in range(start, start + length, stride):
        yield op.store(gpa, 8, gpa)
    yield op.hlt()


def demo_guest(mapped: int, secret_gpa: int, secret: bytes, shared_gpa: int, message: bytes,
               peek_gpa: int | None = None) -> Gen:
    """The demo's guest: keep a secret, talk to the host through a shared page, report what it sees.

    1. boot with ``shared_gpa`` as a shared (C=0) page; store ``secret`` privately, read it back;
    2. put ``message`` in the shared page and halt (the host reads it, writes a reply at +64);
    3. print the reply; then on every resume print ``secret=<hex>`` (and ``peek=<hex>`` of
       ``peek_gpa``, a page the hypervisor may have remapped) and halt.
    """
    yield from boot(mapped, shared=[shared_gpa])
    yield op.write(secret_gpa, secret)
    back = yield op.read(secret_gpa, len(secret))
    yield from print_(f"stored {len(secret)}-byte secret at GPA {secret_gpa:#x}, read back "
                      f"{'ok' if back == secret else 'CORRUPTED'}\n")
    yield op.write(shared_gpa, message.ljust(64, b"\0"))
    yield op.hlt()
    reply = yield op.read(shared_gpa + 64, 64)
    yield from print_("reply=" + reply.rstrip(b"\0").decode(errors="replace") + "\n")
    while True:
        back = yield op.read(secret_gpa, len(secret))
        yield from print_(f"secret={back.hex()}\n")
        if peek_gpa is not None:
            peek = yield op.read(peek_gpa, len(secret))
            yield from print_(f"peek={peek.hex()}\n")
        yield op.hlt()
