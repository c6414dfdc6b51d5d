"""SEV-ES on the CPU: the VMSA checksum (crypto/vmsacrc) held to AMD's crc64_vmsa, VMRUN loading the
registers from the checked VMSA and #VMEXIT storing them back encrypted (hw/vmsa), and exception
delivery through a guest IDT (hw/x86/exc) -- long mode, 32-bit protected mode, IST, #DF, shutdown."""

from __future__ import annotations

import os

import pytest
from hwkit import VMSA_SPA, PageTables, es_vmsa

from sevemu.abi.paging import ExitCode
from sevemu.abi.vmsa import SevEsSaveArea
from sevemu.crypto.vmsacrc import VMSA_CRC_SIZE, VmsaCrc, crc64_vmsa, seal_vmsa
from sevemu.hw.pyengine import Workload, op
from sevemu.hw.soc import Soc
from sevemu.hw.vmsa import VmsaState
from sevemu.hw.x86.arch import Vector
from sevemu.hw.x86.exc import CpuView, Delivered, deliver, escalate

ES_ASID = 5


# ---- the checksum ------------------------------------------------------------------------------------
def test_table_checksum_equals_crc64_vmsa_and_updates_incrementally() -> None:
    crc = VmsaCrc.shared()
    rng = os.urandom
    for trial in range(8):
        page = bytearray(rng(4096))
        lanes = crc.lanes(page)
        assert VmsaCrc.checksum(lanes) == crc64_vmsa(page)
        lo = (trial * 0x1C0) % VMSA_CRC_SIZE & ~63
        before = bytes(page[lo : lo + 64])
        page[lo + trial] ^= 0x5A
        page[lo + 40 : lo + 48] = rng(8)
        crc.update(lanes, lo, before, bytes(page[lo : lo + 64]))
        assert VmsaCrc.checksum(lanes) == crc64_vmsa(page)
    # bytes past the checksummed range change nothing
    lanes = crc.lanes(page)
    crc.update(lanes, VMSA_CRC_SIZE, bytes(64), b"\xff" * 64)
    assert VmsaCrc.checksum(lanes) == crc64_vmsa(page)


def test_known_checksum_of_the_zero_page() -> None:
    # a fixed value, so that a change of the construction cannot go unnoticed
    assert crc64_vmsa(bytes(4096)) == VmsaCrc.checksum(VmsaCrc.shared().lanes(bytes(4096)))
    assert crc64_vmsa(bytes(4096)) != crc64_vmsa(b"\x01" + bytes(4095))


# ---- VMRUN / #VMEXIT with the VMSA ------------------------------------------------------------------
def _halt() -> Workload:
    yield op.hlt()


def _es(soc: Soc) -> tuple[PageTables, object]:
    soc.psp.take_ports().keys.load(ES_ASID, bytes(range(soc.mc.mode.key_size)))  # 16 bytes on Milan
    pt = PageTables(soc, ES_ASID, True)
    pt.identity()
    vmcb = pt.vmcb(paging=False)
    vmcb.sev_es_enable = True
    vmcb.regs["rbx"] = 0x1122_3344_5566_7788
    es_vmsa(soc, vmcb)
    return pt, vmcb


def test_vmrun_loads_the_vmsa_and_vmexit_stores_it_encrypted(soc: Soc) -> None:
    pt, vmcb = _es(soc)
    vmcb.regs["rbx"] = 0  # the VMCB's save area is the hypervisor's: not what the guest gets
    got: list[int] = []

    def first() -> Workload:
        got.append((yield op.vmmcall()))  # never completes: #VC, which the workload does not catch
        yield op.hlt()

    def quiet() -> Workload:
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(first())).code == ExitCode.SHUTDOWN  # an unhandled #VC
    ex = soc.boot_cpu.vmrun(vmcb, pt.engine(quiet()))
    assert ex.code == ExitCode.HLT and ex.info1 == ex.info2 == 0 and vmcb.next_rip == 0
    # the page in DRAM after a WBINVD: the guest's key decrypts it to the stored state (RIP + 1)
    soc.boot_cpu.wbinvd()
    plain = soc.mc.read(VMSA_SPA, 4096, ES_ASID, True)
    def q(off: int) -> int:
        return int.from_bytes(plain[off : off + 8], "little")

    assert q(SevEsSaveArea.offset_of("rbx")) == 0x1122_3344_5566_7788 and q(SevEsSaveArea.offset_of("rip")) == 1
    assert vmcb.regs["rbx"] == 0 and vmcb.rip == 0  # the VMCB never saw the guest's registers
    assert soc.dram.read(VMSA_SPA, 4096) != plain  # ciphertext in DRAM
    assert soc.dram.read(0x1E000, 8) == crc64_vmsa(plain).to_bytes(8, "little")  # the TMR block follows


def test_a_changed_vmsa_or_checksum_fails_vmrun(soc: Soc) -> None:
    pt, vmcb = _es(soc)
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    soc.boot_cpu.wbinvd()
    cipher = bytearray(soc.dram.read(VMSA_SPA + 0x300, 16))
    cipher[3] ^= 1
    soc.dram.write(VMSA_SPA + 0x300, bytes(cipher))  # the host's write, straight to DRAM
    soc.boot_cpu.wbinvd()  # drops every cached copy (the unit's included)
    ran: list[int] = []

    def work() -> Workload:
        ran.append(1)
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(work())).code == ExitCode.INVALID
    assert ran == [] and "checksum" in soc.boot_cpu.vmsa_failure


def test_a_changed_tmr_block_fails_vmrun_and_a_missing_vmsa_pointer_too(soc: Soc) -> None:
    pt, vmcb = _es(soc)
    soc.dram.write(0x1E000, bytes(8))
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    vmcb.vmsa_pa = 0
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    vmcb.vmsa_pa = VMSA_SPA + 0x10
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID


def test_a_held_vmsa_is_checked_against_its_tmr_block_at_every_vmrun(soc: Soc) -> None:
    """The unit holds the decrypted page between exits; VMRUN still compares the TMR block in DRAM
    with the checksum it stored (the inlined load of a held page, Core.vmrun), and a pointer that
    only differs in bits above DRAM (where the unit's key has the C-bit and ASID) is no such page."""
    pt, vmcb = _es(soc)
    cpu = soc.boot_cpu
    assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    assert cpu.vmsa._held  # held since the #VMEXIT
    checks = cpu.vmsa.checks
    assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    assert cpu.vmsa.checks == checks  # no new read and check of the page: the held copy ran
    cpu.vmsa.forget()  # its checksum into the TMR now
    cpu.vmsa.load(ES_ASID, VMSA_SPA)  # held again, nothing pending
    cpu.vmsa.store(ES_ASID, VMSA_SPA)
    block = soc.dram.read(0x1E000, 8)
    soc.dram.write(0x1E000, bytes(8))  # the TMR block changed behind the held page
    assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    assert "checksum" in cpu.vmsa_failure
    soc.dram.write(0x1E000, block)
    assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    for bad in (VMSA_SPA | 1 << 52, VMSA_SPA | 5 << 53 | 1 << 52, VMSA_SPA + 0x10):
        vmcb.vmsa_pa = bad
        assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    vmcb.vmsa_pa = VMSA_SPA
    assert cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT


def test_an_unsealed_page_names_no_checksum_block(soc: Soc) -> None:
    pt, vmcb = _es(soc)
    soc.cache.write(ES_ASID, True, VMSA_SPA, bytes(4096))  # a page the firmware never set up
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    assert "not set up" in soc.boot_cpu.vmsa_failure


def test_vmsa_state_decodes_what_seal_encodes() -> None:
    area = SevEsSaveArea(rip=0x1234, rsp=0x8000, rax=1, r15=15, rcx=2, cr0=0x11, efer=0x1000, sev_features=4,
                         cs_selector=8, cs_attrib=0xC9B, cs_limit=0xFFFFFFFF, lstar=0xABC)
    page, _ = seal_vmsa(area.encode(), 0x1E000)
    st = VmsaState(page)
    assert (st.rip, st.regs["rsp"], st.regs["rax"], st.regs["r15"], st.regs["rcx"]) == (0x1234, 0x8000, 1, 15, 2)
    assert (st.cr0, st.efer, st.sev_features) == (0x11, 0x1000, 4)
    assert st.segments["cs"].attrib == 0xC9B and st.msrs[0xC000_0082] == 0xABC
    assert list(st.regs) == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    out = bytearray(page)
    st.regs["r12"] = 0x77
    st.rip = 0x99
    st.store(out)
    assert out[SevEsSaveArea.offset_of("r12")] == 0x77 and out[SevEsSaveArea.offset_of("rip")] == 0x99


# ---- exception delivery ------------------------------------------------------------------------------
class FakeMemory:
    """Guest-virtual memory for delivery: a dict of bytes; addresses in ``faulting`` fault."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.faulting: set[int] = set()

    def read_virt(self, gva: int, n: int) -> bytes | None:
        if any(a >> 12 in self.faulting for a in range(gva, gva + n)):
            return None
        return bytes(self.mem.get(a, 0) for a in range(gva, gva + n))

    def write_virt(self, gva: int, data: bytes) -> bool:
        if any(a >> 12 in self.faulting for a in range(gva, gva + len(data))):
            return False
        for i, b in enumerate(data):
            self.mem[gva + i] = b
        return True

    def put(self, gva: int, data: bytes) -> None:
        self.write_virt(gva, data)


def _gate64(handler: int, selector: int = 8, attr: int = 0x8E, ist: int = 0) -> bytes:
    return (handler & 0xFFFF).to_bytes(2, "little") + selector.to_bytes(2, "little") + bytes([ist, attr]) + \
        ((handler >> 16) & 0xFFFF).to_bytes(2, "little") + (handler >> 32).to_bytes(4, "little") + bytes(4)


def _gate32(handler: int, selector: int = 8, attr: int = 0x8E) -> bytes:
    return (handler & 0xFFFF).to_bytes(2, "little") + selector.to_bytes(2, "little") + bytes([0, attr]) + \
        (handler >> 16).to_bytes(2, "little")


IDT = 0x10000


def test_long_mode_vc_frame_with_error_code() -> None:
    m = FakeMemory()
    m.put(IDT + 29 * 16, _gate64(0xFFFF_8000_0000_1234))
    cpu = CpuView(long_mode=True, idtr_base=IDT, idtr_limit=32 * 16 - 1, cs=8, ss=0x10, rip=0x401000,
                  rsp=0x7FF8, rflags=0x246 | 1 << 8)
    d = deliver(m, cpu, Vector.VC, 0x7B)
    assert d == Delivered(0xFFFF_8000_0000_1234, 0x7FF0 - 48, 0x046)  # aligned to 16; IF and TF cleared
    frame = m.read_virt(d.rsp, 48)
    assert frame is not None
    words = [int.from_bytes(frame[i : i + 8], "little") for i in range(0, 48, 8)]
    assert words == [0x7B, 0x401000, 8, 0x346, 0x7FF8, 0x10]  # error, RIP, CS, RFLAGS, RSP, SS


def test_trap_gate_keeps_if_and_ist_switches_the_stack() -> None:
    m = FakeMemory()
    m.put(IDT + 3 * 16, _gate64(0x5000, attr=0x8F, ist=2))
    tss = 0x20000
    m.put(tss + 0x24 + 8, (0x9000).to_bytes(8, "little"))  # IST2
    cpu = CpuView(long_mode=True, idtr_base=IDT, idtr_limit=0xFFF, cs=8, ss=0, rip=0x100, rsp=0x7000,
                  rflags=0x202, tr_base=tss)
    d = deliver(m, cpu, Vector.BP, None)
    assert d == Delivered(0x5000, 0x9000 - 40, 0x202)


def test_protected_mode_frame() -> None:
    m = FakeMemory()
    m.put(IDT + 13 * 8, _gate32(0x00102030))
    cpu = CpuView(long_mode=False, idtr_base=IDT, idtr_limit=0x7FF, cs=8, ss=0x10, rip=0x1000, rsp=0x6000,
                  rflags=0x202)
    d = deliver(m, cpu, Vector.GP, 0)
    assert d == Delivered(0x00102030, 0x6000 - 16, 0x002)
    frame = m.read_virt(d.rsp, 16)
    assert frame is not None
    assert [int.from_bytes(frame[i : i + 4], "little") for i in range(0, 16, 4)] == [0, 0x1000, 8, 0x202]


@pytest.mark.parametrize("setup,expect", [
    ("limit", "beyond the IDT limit"),
    ("absent", "not present"),
    ("task", "gate type 0x5"),
    ("segment", "code segment 0x18"),
    ("stack", "not writable"),
    ("idt", "not readable"),
])
def test_failed_delivery_escalates_to_df_then_shutdown(setup: str, expect: str) -> None:
    m = FakeMemory()
    limit = 32 * 16 - 1
    gate = {"absent": _gate64(0x5000, attr=0x0E), "task": _gate64(0x5000, attr=0x85),
            "segment": _gate64(0x5000, selector=0x18)}.get(setup, _gate64(0x5000))
    m.put(IDT + 29 * 16, gate)
    if setup == "limit":
        limit = 29 * 16
    if setup == "stack":
        m.faulting.add(0x7000 >> 12)
    if setup == "idt":
        m.faulting.add(IDT >> 12)
    cpu = CpuView(long_mode=True, idtr_base=IDT, idtr_limit=limit, cs=8, ss=0, rip=0x100, rsp=0x7800,
                  rflags=2)
    out = escalate(m, cpu, Vector.VC, 0x72)
    assert isinstance(out, str) and expect in out and "then #DF" in out  # no #DF handler: shutdown
    # with a #DF handler (and a usable stack) the double fault is delivered instead
    m.put(IDT + 8 * 16, _gate64(0xDF00))
    if setup in ("absent", "task", "segment"):
        d = escalate(m, cpu, Vector.VC, 0x72)
        assert isinstance(d, Delivered) and d.rip == 0xDF00


def test_the_tmr_checksum_follows_every_store_whenever_the_lines_leave_the_unit(soc: Soc) -> None:
    """#VMEXIT only notes the lines it changes; the checksum is brought up to date when they leave
    the unit (a read snoop, WBINVD): after any mix of stores -- a register changed and changed back
    included -- the TMR holds crc64_vmsa of the page the guest's key decrypts, and VMRUN accepts it."""
    _es(soc)
    unit, cache = soc.boot_cpu.vmsa, soc.boot_cpu.cache
    state = unit.load(ES_ASID, VMSA_SPA)
    assert not isinstance(state, str)
    for i in range(1, 40):
        state.regs["rcx"] = i * 0x0101_0101
        state.regs["r15"] = (1 << 63) | i if i % 3 else state.regs["r15"]
        state.rip = 0x1000 + (i & 1)  # RIP (and its line) changes back and forth
        state.efer = 0x1000 if i % 5 else 0  # EFER changed, then back to the value written back
        unit.store(ES_ASID, VMSA_SPA)
        if i % 7 == 0:
            cache.read(ES_ASID, True, VMSA_SPA + 0x140, 64)  # someone else reads a line: written back
            again = unit.load(ES_ASID, VMSA_SPA)
            assert again is state  # a read snoop leaves the page held
    state.regs["rdx"] ^= 0xFF
    unit.store(ES_ASID, VMSA_SPA)
    state.regs["rdx"] ^= 0xFF  # and back: the line differs from its last store, not from its write-back
    unit.store(ES_ASID, VMSA_SPA)
    soc.boot_cpu.wbinvd()
    plain = soc.mc.read(VMSA_SPA, 4096, ES_ASID, True)
    assert soc.dram.read(0x1E000, 8) == crc64_vmsa(plain).to_bytes(8, "little")
    assert int.from_bytes(plain[SevEsSaveArea.offset_of("rcx") :][:8], "little") == 39 * 0x0101_0101
    reloaded = unit.load(ES_ASID, VMSA_SPA)  # read from DRAM and checked again
    assert not isinstance(reloaded, str) and reloaded.regs["rcx"] == 39 * 0x0101_0101


def test_a_wbinvd_inside_the_run_does_not_lose_the_registers_of_its_vmexit(soc: Soc) -> None:
    """The guest's own WBINVD snoops the VMSA unit while the guest runs (the page it holds is
    flushed and dropped); the registers are in the CPU then, and #VMEXIT still stores them.  OVMF's
    SEC does this under SNP: before the fix the exit's registers were dropped and the next VMRUN
    resumed with those of the exit before (its GHCB pointer in R15 came back as a stale value)."""
    pt, vmcb = _es(soc)
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT  # RIP 1 stored

    def flushes() -> Workload:
        yield op.wbinvd()
        yield op.wbinvd()
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(flushes())).code == ExitCode.HLT
    soc.boot_cpu.wbinvd()
    plain = soc.mc.read(VMSA_SPA, 4096, ES_ASID, True)
    assert int.from_bytes(plain[SevEsSaveArea.offset_of("rip") :][:8], "little") == 4
    assert soc.dram.read(0x1E000, 8) == crc64_vmsa(plain).to_bytes(8, "little")
    state = soc.boot_cpu.vmsa.load(ES_ASID, VMSA_SPA)  # read and checked again: RIP as stored
    assert not isinstance(state, str) and state.rip == 4


@pytest.mark.parametrize("generation", ["milan", "genoa"])
def test_the_vmsa_stored_at_vmexit_is_what_every_host_interface_sees(generation: str) -> None:
    """#VMEXIT defers encoding the registers into the page until its lines leave the unit.  After
    each store, every interface that can reach the page must see the current register state: the
    firmware's read in the guest's domain (DBG_DECRYPT's path), DRAM and the host's read after a
    WBINVD -- ciphertext the guest's key decrypts to the current state --, and on a profile with
    cross-domain coherency (Genoa) the host's read without any flush.  Flipping the ciphertext the
    host sees makes the next VMRUN fail."""
    from hwkit import make_soc

    from sevemu.hw.profiles import GENOA, MILAN

    soc = make_soc(GENOA if generation == "genoa" else MILAN)
    pt, vmcb = _es(soc)
    core = soc.boot_cpu
    unit = core.vmsa
    off_rcx, off_rip = SevEsSaveArea.offset_of("rcx"), SevEsSaveArea.offset_of("rip")

    def q(page: bytes, off: int) -> int:
        return int.from_bytes(page[off : off + 8], "little")

    for i in range(1, 5):
        state = unit.load(ES_ASID, VMSA_SPA)
        assert not isinstance(state, str)
        state.regs["rcx"] = 0xC0DE_0000 + i
        state.rip = 0x2000 + i
        unit.store(ES_ASID, VMSA_SPA)  # #VMEXIT
        if i == 1:  # the firmware's view (guest domain, through the cache): the current state
            line = soc.cache.read(ES_ASID, True, VMSA_SPA + (off_rcx & ~63), 64)
            assert q(line, off_rcx & 63) == 0xC0DE_0000 + i
        elif i == 2 and soc.profile.coherent:  # the host's read, no flush: the current ciphertext
            seen = core.host_read(VMSA_SPA, 4096)
            assert seen == soc.dram.read(VMSA_SPA, 4096)
            plain = soc.mc.read(VMSA_SPA, 4096, ES_ASID, True)
            assert q(plain, off_rcx) == 0xC0DE_0000 + i and q(plain, off_rip) == 0x2000 + i
            assert seen != plain
        else:  # WBINVD, then DRAM and the host's read: ciphertext of the current state
            core.wbinvd()
            cipher = soc.dram.read(VMSA_SPA, 4096)
            assert core.host_read(VMSA_SPA, 4096) == cipher
            plain = soc.mc.read(VMSA_SPA, 4096, ES_ASID, True)
            assert cipher != plain
            assert q(plain, off_rcx) == 0xC0DE_0000 + i and q(plain, off_rip) == 0x2000 + i
            assert soc.dram.read(0x1E000, 8) == crc64_vmsa(plain).to_bytes(8, "little")
    # the host flips one bit of the ciphertext it sees: the next VMRUN fails
    core.wbinvd()
    cipher = bytearray(soc.dram.read(VMSA_SPA + (off_rcx & ~63), 64))
    cipher[off_rcx & 63] ^= 1
    core.host_write(VMSA_SPA + (off_rcx & ~63), bytes(cipher))
    core.wbinvd()
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    assert "checksum" in core.vmsa_failure


def test_genoa_host_tamper_without_wbinvd_reaches_the_unit_through_the_coherent_fill() -> None:
    """The cache does not snoop the VMSA unit about the host's unencrypted (C=0) ranges -- it holds
    encrypted lines only -- but on a profile with cross-domain coherency the host's fill of the
    page's SPA still makes the unit write its modified lines back and drop its decrypted copy: the
    host reads the current ciphertext, flips a bit, writes it back and flushes its line, with no
    WBINVD, and the next VMRUN reads the page again and fails its checksum."""
    from hwkit import make_soc

    from sevemu.hw.profiles import GENOA

    soc = make_soc(GENOA)
    pt, vmcb = _es(soc)
    core = soc.boot_cpu
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT  # the unit holds the page
    assert core.vmsa not in soc.cache.plain_agents and core.vmsa in soc.cache.agents
    off = SevEsSaveArea.offset_of("rip") & ~63
    line = bytearray(core.host_read(VMSA_SPA + off, 64))
    assert bytes(line) == soc.dram.read(VMSA_SPA + off, 64)  # the current ciphertext, written back
    line[5] ^= 1
    core.host_write(VMSA_SPA + off, bytes(line))
    core.clflush(VMSA_SPA + off)
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
    assert "checksum" in core.vmsa_failure


def _drop_by(how: str, soc: Soc) -> None:
    core = soc.boot_cpu
    if how == "wbinvd":
        core.wbinvd()
    elif how == "vmpage_flush":
        core.vmpage_flush(VMSA_SPA, ES_ASID)
    elif how == "forget":
        core.vmsa.forget()
    elif how == "coherent_fill":  # (GENOA: the host's C=0 fill of the page's SPA)
        core.host_read(VMSA_SPA, 64)
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["wbinvd", "vmpage_flush", "forget", "coherent_fill", "tmr_block"])
def test_a_vmsa_page_the_unit_dropped_is_read_and_checked_again_at_the_next_vmrun(how: str) -> None:
    """Core.vmrun keeps the page of the last SEV-ES VMRUN and takes it again while the unit holds
    it (``_Held.live``): every way the page leaves the unit makes the next VMRUN read the page and
    check it again (a page dropped and kept by the core would run the guest from stale registers)."""
    from hwkit import make_soc

    from sevemu.hw.profiles import GENOA, MILAN

    soc = make_soc(GENOA if how == "coherent_fill" else MILAN)
    pt, vmcb = _es(soc)
    core = soc.boot_cpu
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    first = core._es_held
    assert first is not None and first.live and list(core.vmsa._held.values()) == [first]
    checks = core.vmsa.checks
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    assert core.vmsa.checks == checks and core._es_held is first  # taken again, no look-up
    if how == "tmr_block":
        core.vmsa.forget()  # (its checksum into the TMR)
        assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
        held = core._es_held
        assert held is not None and held.live
        block = soc.dram.read(0x1E000, 8)
        soc.dram.write(0x1E000, bytes(8))
        assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.INVALID
        assert not held.live and held not in core.vmsa._held.values()
        soc.dram.write(0x1E000, block)
    else:
        _drop_by(how, soc)
        assert not first.live and first not in core.vmsa._held.values()
    checks = core.vmsa.checks
    assert core.vmrun(vmcb, pt.engine(_halt())).code == ExitCode.HLT
    assert core.vmsa.checks == checks + 1  # read from the cache and checked again
    again = core._es_held
    assert again is not None and again is not first and again.live
    assert all(h.live for h in core.vmsa._held.values())
