"""Real guests with the Unicorn engine's exit path in C (``csrc/uc_accel.c``) and with its ctypes
fallback (:mod:`sevemu.hw.uc.accel`): the same console, end and exits, for a plain-exit guest and
the SEV-ES #VC / VMGEXIT path.  Needs gcc and binutils (skipped with the reason otherwise)."""

from __future__ import annotations

from typing import Any

import pytest

from sevemu.cli.run import launch_guest
from sevemu.guest.build import build_guest
from sevemu.hw.uc import accel

pytest.importorskip("unicorn")
pytestmark = pytest.mark.usefixtures("guest_builds")


def _run(guest: str, mode: str, use_c: bool) -> tuple[Any, ...]:
    run = launch_guest(build_guest(guest), mode=mode, vcpus=1, seed=f"accel-{guest}")
    try:
        eng = run.vm.vcpus[0].engine
        eng.use_c_runner = use_c  # (before its first VMRUN, which boots it)
        out = run.run(timeout=60)
        assert isinstance(eng._runner, accel.PyRunner) is not use_c
        return out.status, out.console, dict(run.vm.vcpus[0].exits), eng.stats.io_exits, dict(eng.stats.vc_by_code)
    finally:
        run.close()


@pytest.mark.parametrize("guest,mode", [("hello", "sev"), ("regs", "sev"), ("hello", "sev-es"), ("mmio", "sev-es")])
def test_a_guest_ends_the_same_with_either_runner(guest: str, mode: str) -> None:
    py = _run(guest, mode, False)
    assert py[1]  # it printed something
    if not accel.ENABLED:
        pytest.skip("the C helper is not built")
    assert _run(guest, mode, True) == py
