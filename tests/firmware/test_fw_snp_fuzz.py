"""Robustness fuzz of the SNP firmware through the real mailbox (the SNP half of test_fw_fuzz.py).

Every SNP command is issued with random buffers and with mutations of valid ones (fields replaced by
interesting addresses -- the guest context, a guest page, a firmware page, the RMP itself, beyond
DRAM, unaligned, with the C-bit -- or random values; bits flipped; reserved bytes set) with the SNP
platform UNINIT, INIT without guests, and with a guest in INIT, LAUNCH and RUNNING.  Invariants:

* the firmware never raises out of the mailbox, ``internal_errors`` stays empty;
* a refused command changes nothing: the SNP platform and every guest context, the shared ASID
  tables, the loaded key slots and the whole RMP (every entry) are identical before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from snpkit import ASID, GCTX, GUEST_BASE, PAGE, SCRATCH, SnpLaunch, firmware_page, snp_machine

from sevemu.abi.commands import CommandId
from sevemu.abi.snp import SNP_COMMAND_BUFFERS, SNP_COMMANDS_WITHOUT_BUFFER, SnpPageType
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.firmware.snp import snp_state
from sevemu.scenario import Machine

COMMANDS = sorted(set(SNP_COMMAND_BUFFERS) | set(SNP_COMMANDS_WITHOUT_BUFFER))
STATES = ("uninit", "init", "guest-init", "guest-launch", "guest-running")
FW_PAGE = SCRATCH + 4 * PAGE


def _build(state: str) -> Machine:
    m = snp_machine(init=state != "uninit", seed=f"snp-fuzz-{state}")
    if state == "uninit":
        return m
    firmware_page(m, FW_PAGE)
    if state == "init":
        return m
    lau = SnpLaunch(m)
    if state == "guest-init":
        firmware_page(m, GCTX)
        from fwkit import ok

        from sevemu.abi.snp import SnpAddrCmd
        ok(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GCTX))
        return m
    assert lau.start() == Status.SUCCESS
    lau.update(0, SnpPageType.NORMAL, b"code")
    from snpkit import rmpupdate
    rmpupdate(m, GUEST_BASE + PAGE, assigned=True, asid=ASID, gpa=PAGE, immutable=True)  # Pre-Guest, waiting
    if state == "guest-running":
        assert lau.finish() == Status.SUCCESS
    return m


_RIGS: dict[str, Machine] = {}


def _rig(state: str) -> Machine:
    m = _RIGS.get(state)
    if m is None:
        m = _RIGS[state] = _build(state)
    return m


def _snapshot(m: Machine) -> Any:
    s = snp_state(m.firmware)
    guests = {k: dataclasses.asdict(g) for k, g in s.guests.items()}
    plat = {f.name: copy.deepcopy(getattr(s, f.name)) for f in dataclasses.fields(s) if f.name not in ("guests", "rmp")}
    rmp = m.soc.rmp
    assert rmp is not None
    table = [(spa, m.soc.cache.read(0, False, spa, PAGE)) for spa in rmp._table_pages()]
    keys = sorted(a for a in m.soc.profile.all_asids() if m.soc.mc.has_key(a))
    valid = sorted(a for a in m.soc.profile.all_asids() if m.soc.mc.asid_valid(a))
    return (guests, plat, dict(m.firmware.asid_owner), dict(m.firmware.asid_dirty), keys, valid, table,
            rmp.initialized, m.firmware.state)


def _interesting(m: Machine) -> list[int]:
    rmp = m.soc.rmp
    assert rmp is not None
    cbit = m.soc.profile.cbit_mask
    return [0, GCTX, GCTX + 8, GCTX | cbit, GUEST_BASE, GUEST_BASE + PAGE, GUEST_BASE | 1, FW_PAGE, SCRATCH,
            rmp.base, rmp.end - 0xFFF, m.soc.dram.size, m.soc.dram.size - PAGE, (1 << 64) - PAGE, 0x200000, ASID, 1, 2]


def _valid(cmd: CommandId, m: Machine) -> bytes:
    layout = SNP_COMMAND_BUFFERS[cmd]
    values: dict[str, Any] = {}
    for f in dataclasses.fields(layout):
        if f.name in ("gctx_paddr",):
            values[f.name] = GCTX
        elif f.name in ("address", "feature_info_paddr", "dst_addr"):
            values[f.name] = FW_PAGE
        elif f.name in ("src_addr", "paddr"):
            values[f.name] = GUEST_BASE + PAGE
        elif f.name == "asid":
            values[f.name] = ASID
        elif f.name == "policy":
            values[f.name] = 0x30000
    try:
        return layout(**values).encode()
    except Exception:  # noqa: BLE001 - a layout whose defaults suffice
        return layout().encode()


def _mutate(raw: bytes, m: Machine, rnd: random.Random) -> bytes:
    buf = bytearray(raw)
    for _ in range(rnd.randint(1, 3)):
        kind = rnd.randrange(4)
        if kind == 0 and len(buf) >= 8:
            off = rnd.randrange(0, len(buf) - 7, 4)
            buf[off : off + 8] = rnd.choice(_interesting(m)).to_bytes(8, "little")
        elif kind == 1:
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
        elif kind == 2:
            i = rnd.randrange(len(buf))
            buf[i] = rnd.randrange(256)
        else:
            off = rnd.randrange(0, len(buf), 4)
            buf[off : off + 4] = rnd.randrange(1 << 32).to_bytes(4, "little")[: len(buf) - off]
    return bytes(buf)


def _issue(m: Machine, cmd: CommandId, buf: bytes | None) -> int:
    return m.hv.psp.raw(cmd, buf)[0]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(state=st.sampled_from(STATES), cmd=st.sampled_from(COMMANDS), seed=st.integers(0, 2**32 - 1),
       fully_random=st.booleans())
def test_refused_snp_commands_change_nothing(state: str, cmd: CommandId, seed: int, fully_random: bool) -> None:
    m = _rig(state)
    rnd = random.Random(seed)
    layout: type[Struct] | None = SNP_COMMAND_BUFFERS.get(cmd)
    buf = None
    if layout is not None:
        buf = rnd.randbytes(layout.SIZE) if fully_random else _mutate(_valid(cmd, m), m, rnd)
    before = _snapshot(m)
    status = _issue(m, cmd, buf)
    assert 0 <= status <= 0xFFFF
    assert m.firmware.internal_errors == []
    if status != Status.SUCCESS:
        assert _snapshot(m) == before, f"{cmd.name} answered {Status(status).name} and changed state"
    else:
        _RIGS.pop(state, None)  # changed: rebuild for the next example


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_snp_command_in_every_state_answers_and_refusals_change_nothing(state: str, cmd: CommandId) -> None:
    m = _rig(state)
    layout = SNP_COMMAND_BUFFERS.get(cmd)
    buf = None if layout is None else _valid(cmd, m)
    before = _snapshot(m)
    status = _issue(m, cmd, buf)
    assert m.firmware.internal_errors == []
    if status != Status.SUCCESS:
        assert _snapshot(m) == before, f"{cmd.name} answered {Status(status).name} and changed state"
    else:
        _RIGS.pop(state, None)
