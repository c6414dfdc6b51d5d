"""VMGEXIT stopped by a code hook (the Unicorn engine's fast path, as port I/O stops) against
VMGEXIT through Unicorn's VMMCALL intercept (the slow path): the same guests give the same output,
the same exits (but timer slices) and the same GHCB MSR at the end -- and the fast path really skips the intercept."""

from __future__ import annotations

from collections import Counter

import pytest

from sevemu.cli.run import launch_guest
from sevemu.guest.build import build_guest
from sevemu.hw.uc import exits, ports
from sevemu.hw.uc.ports import scan_vmgexit_candidates

pytest.importorskip("unicorn")
pytestmark = pytest.mark.usefixtures("guest_builds")


def _run(guest: str, vcpus: int, hooked: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[object, ...]:
    calls: Counter[int] = Counter()
    intercept = exits.intercept

    def counting(e: exits.EnginePort, cpu: object, code: int, rip: int) -> object:
        calls[code] += 1
        return intercept(e, cpu, code, rip)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(exits, "intercept", counting)
        if not hooked:
            m.setattr(ports, "scan_vmgexit_candidates", lambda page: ())
        run = launch_guest(build_guest(guest), mode="sev-es", vcpus=vcpus, seed=f"vmgexit-stop-{guest}")
        try:
            out = run.run(timeout=60)
            vm = run.vm
            seen = [Counter({k: n for k, n in v.exits.items() if k != "INTR"}) for v in vm.vcpus]  # (timer slices)
            msrs = [v.vmcb.ghcb_gpa for v in vm.vcpus]
        finally:
            run.close()
    console = out.console if guest != "smp" else sorted(out.console.splitlines())
    return out.status, console, seen, msrs, calls[exits.EXIT_VMMCALL]


@pytest.mark.parametrize("guest,vcpus", [("hello", 1), ("regs", 1), ("shared", 1), ("smp", 4)])
def test_a_hooked_vmgexit_equals_the_intercepted_one(guest: str, vcpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _run(guest, vcpus, True, monkeypatch)
    slow = _run(guest, vcpus, False, monkeypatch)
    assert fast[0] == "finished"
    assert fast[:4] == slow[:4]
    vmgexits = sum(c["VMGEXIT"] for c in fast[2])  # type: ignore[attr-defined]
    # the VMGEXITs took the hook, not the VMMCALL intercept (but for one translated before its hook)
    assert fast[4] <= 1 and slow[4] >= vmgexits > 1


def test_vmgexit_candidates_are_the_0f_01_d9_with_their_prefix_run() -> None:
    page = bytearray(b"\x90" * 64)
    page[10:14] = b"\xf3\x0f\x01\xd9"  # VMGEXIT
    page[20:25] = b"\xf3\x48\x0f\x01\xd9"  # with a REX byte
    page[30:33] = b"\x0f\x01\xd9"  # VMMCALL: hooked too (the engine hands it back to the intercept)
    page[40:43] = b"\x0f\x01\xd8"  # VMRUN: not a candidate
    assert scan_vmgexit_candidates(bytes(page)) == ((10, 11), (20, 22), (30, 30))
