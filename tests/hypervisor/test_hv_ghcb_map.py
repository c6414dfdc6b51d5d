"""The host's mapping of a guest page (``Vm.host_page``) and the GHCB reads and writes made through
it, against the host's ordinary interface (``Vm.host_read`` / ``Vm.host_write``): the same bytes."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevemu._util.units import PAGE, GiB, MiB
from sevemu.abi.ghcb import GHCB_VALID_BITS, GhcbError
from sevemu.errors import InputError, UnmappedError
from sevemu.hypervisor.ghcb import GhcbHandler
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vm, VmKind
from sevemu.scenario import Machine, build_machine

GPA = 0x5000


@pytest.fixture(scope="module")
def mv() -> tuple[Machine, Vm]:
    m = build_machine("milan", seed="hv-ghcb-map", dram_size=1 * GiB, cache_size=256 << 10)
    vm = m.hv.create_vm("ghcb-map", 16 * MiB, VmKind.SEV, vm_type=KvmVmType.SEV_ES_VM)
    m.hv.sev_init(vm)
    vm.back(GPA)
    return m, vm


@settings(max_examples=60, deadline=None)
@given(off=st.integers(0, PAGE - 1), n=st.integers(0, PAGE), seed=st.integers(0, 1 << 16), aligned=st.booleans())
def test_a_mapped_page_reads_and_writes_what_the_host_interface_does(
        mv: tuple[Machine, Vm], off: int, n: int, seed: int, aligned: bool) -> None:
    _, vm = mv
    if aligned:
        off &= ~63
        n &= ~63
    n = min(n, PAGE - off)
    vm.host_write(GPA, random.Random(seed).randbytes(PAGE))
    page = vm.host_page(GPA + 0x123)
    assert page.gpa == GPA and page.spa == vm.spa_of(GPA)
    assert page.read(off, n) == vm.host_read(GPA + off, n)
    data = random.Random(seed + 1).randbytes(n)
    page.write(off, data)
    assert vm.host_read(GPA + off, n) == data


@settings(max_examples=40, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 63), st.integers(1, 16)), min_size=1, max_size=4),
       seed=st.integers(0, 1 << 16))
def test_a_mapped_page_reads_runs_of_lines_as_the_host_interface_does(
        mv: tuple[Machine, Vm], runs: list[tuple[int, int]], seed: int) -> None:
    """The batched read (the GHCB's head and usage line in one access) gives the bytes of one host
    read per run."""
    _, vm = mv
    vm.host_write(GPA, random.Random(seed).randbytes(PAGE))
    spans = tuple((line * 64, min(n, 64 - line) * 64) for line, n in runs)
    assert vm.host_page(GPA).read_runs(spans) == b"".join(vm.host_read(GPA + off, n) for off, n in spans)


def test_a_mapping_refuses_ranges_outside_its_page_and_unbacked_pages(mv: tuple[Machine, Vm]) -> None:
    _, vm = mv
    page = vm.host_page(GPA)
    before = vm.host_read(GPA, PAGE)
    for off, n in ((PAGE - 8, 16), (-8, 8), (PAGE, 1)):
        with pytest.raises(InputError, match="do not fit in a page"):
            page.read(off, n)
        with pytest.raises(InputError, match="do not fit in a page"):
            page.write(off, bytes(n))
    assert vm.host_read(GPA, PAGE) == before
    with pytest.raises(UnmappedError):
        vm.host_page(0xF0_0000)


_FIELDS = sorted(GHCB_VALID_BITS)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1 << 16), marked=st.sets(st.sampled_from(_FIELDS)),
       out=st.dictionaries(st.sampled_from(_FIELDS), st.integers(0, (1 << 64) - 1), max_size=6))
def test_the_ghcb_read_and_write_back_through_the_mapping_equal_the_field_by_field_view(
        mv: tuple[Machine, Vm], seed: int, marked: set[str], out: dict[str, int]) -> None:
    """What the handler decodes is the page's bytes of every marked field (and ``ghcb_usage``); what
    it writes back changes exactly the output fields and the valid bitmap."""
    _, vm = mv
    raw = bytearray(random.Random(seed).randbytes(PAGE))
    bitmap = sum(1 << GHCB_VALID_BITS[n] for n in marked)
    raw[0x3F0:0x400] = bitmap.to_bytes(16, "little")
    vm.host_write(GPA, bytes(raw))
    save, got_bitmap, usage = GhcbHandler._read(vm.host_page(GPA))
    assert got_bitmap == bitmap and usage == int.from_bytes(raw[0xFFC:0x1000], "little")
    for name in marked:
        off = GHCB_VALID_BITS[name] * 8
        assert save[off - 0xC8 : off - 0xC8 + 8] == raw[off : off + 8], name
    assert save[0x1C0 - 0xC8 :] == raw[0x1C0:0x400]  # the head is read whole
    expect = bytearray(raw)
    outs = {"sw_exit_info_1": 0, "sw_exit_info_2": 0, **out}
    for name, value in outs.items():
        off = GHCB_VALID_BITS[name] * 8
        if name == "cpl":
            expect[off + 3] = value & 0xFF
        else:
            expect[off : off + 8] = value.to_bytes(8, "little")
    expect[0x3F0:0x400] = sum(1 << GHCB_VALID_BITS[n] for n in outs).to_bytes(16, "little")
    GhcbHandler._write_back(vm.host_page(GPA), save, dict(out))
    assert vm.host_read(GPA, PAGE) == bytes(expect)


class _Ports:
    """A NaeHost that records port I/O (the rest is never asked for here)."""

    cbit = 47

    def __init__(self) -> None:
        self.outs: list[tuple[int, int, int]] = []

    def port_out(self, vm: Vm, port: int, size: int, value: int) -> None:
        self.outs.append((port, size, value))

    def port_in(self, vm: Vm, port: int, size: int) -> int:
        return 0x5A


def _out_request(rax: int, port: int = 0x80, usage: int = 0, seed: int = 0) -> bytes:
    """A GHCB asking for an 8-bit OUT of ``rax`` to ``port`` (random bytes elsewhere, as a guest
    leaves them)."""
    raw = bytearray(random.Random(seed).randbytes(PAGE))
    fields = {"rax": rax, "sw_exit_code": 0x7B, "sw_exit_info_1": port << 16 | 0x10 | 0x200, "sw_exit_info_2": 0}
    for name, value in fields.items():
        raw[GHCB_VALID_BITS[name] * 8 : GHCB_VALID_BITS[name] * 8 + 8] = value.to_bytes(8, "little")
    raw[0x3F0:0x400] = sum(1 << GHCB_VALID_BITS[n] for n in fields).to_bytes(16, "little")
    raw[0xFFC:0x1000] = usage.to_bytes(4, "little")
    return bytes(raw)


def _elsewhere(request: bytes) -> bytes:
    """``request`` with RBX and R15 changed (fields an OUT does not read, outside the lines that
    decide it)."""
    raw = bytearray(request)
    for name in ("rbx", "r15"):
        off = GHCB_VALID_BITS[name] * 8
        raw[off] ^= 0xA5
    return bytes(raw)


@pytest.mark.parametrize("second", ["same", "other_rax", "other_port", "bad_usage", "other_handler", "other_rbx"])
def test_a_repeated_ghcb_out_is_answered_as_the_first_one(second: str) -> None:
    """The guest's loop of one OUT through the GHCB: the second identical GHCB (answered from the
    handler's memo of the first) makes the same OUT and leaves the page exactly as a handler that
    never saw the first one leaves it; any difference in the head -- the value, the port, the usage
    word -- or another IOIO handler in the table is decided afresh."""
    m = build_machine("milan", seed="hv-ghcb-known", dram_size=1 * GiB, cache_size=256 << 10)
    vm = m.hv.create_vm("ghcb-known", 16 * MiB, VmKind.SEV, vm_type=KvmVmType.SEV_ES_VM)
    m.hv.sev_init(vm)
    vm.back(GPA)
    vcpu = vm.add_vcpu()
    vcpu.vmcb.ghcb_gpa = GPA
    host = _Ports()
    handler = GhcbHandler(host)  # type: ignore[arg-type]
    first = _out_request(0x11)
    vm.host_write(GPA, first)
    assert handler.vmgexit(vm, vcpu) is None
    answered = vm.host_read(GPA, PAGE)
    again = {"same": first, "other_rax": _out_request(0x22), "other_port": _out_request(0x11, port=0x81),
             "bad_usage": _out_request(0x11, usage=1), "other_handler": first, "other_rbx": _elsewhere(first)}[second]
    other_fn_calls: list[int] = []
    if second == "other_handler":
        handler.nae_table[0x7B] = lambda ex: other_fn_calls.append(ex.info1)  # type: ignore[func-returns-value]
    vm.host_write(GPA, again)
    assert handler.vmgexit(vm, vcpu) is None
    # a handler that never saw the first GHCB, on the same request
    fresh_host = _Ports()
    fresh = GhcbHandler(fresh_host)  # type: ignore[arg-type]
    if second == "other_handler":
        fresh.nae_table[0x7B] = lambda ex: other_fn_calls.append(ex.info1)  # type: ignore[func-returns-value]
    got = vm.host_read(GPA, PAGE)
    vm.host_write(GPA, again)
    assert fresh.vmgexit(vm, vcpu) is None
    assert got == vm.host_read(GPA, PAGE)
    assert host.outs[1:] == fresh_host.outs
    expect = {"same": [(0x80, 1, 0x11)], "other_rax": [(0x80, 1, 0x22)], "other_port": [(0x81, 1, 0x11)],
              "bad_usage": [], "other_handler": [], "other_rbx": [(0x80, 1, 0x11)]}[second]
    assert host.outs == [(0x80, 1, 0x11), *expect]
    if second == "same":
        assert got == answered
    if second == "other_rbx":  # answered from the memo: the other fields stay as the guest left them
        assert got == _elsewhere(answered)
    if second == "other_handler":
        assert len(other_fn_calls) == 2
    if second == "bad_usage":
        assert int.from_bytes(got[GHCB_VALID_BITS["sw_exit_info_2"] * 8 :][:8], "little") == GhcbError.INVALID_USAGE
