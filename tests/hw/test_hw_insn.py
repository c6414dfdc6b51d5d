"""The instruction semantics both engines share (hw/x86/insn.py): MSRs, the intercept decision
(#VMEXIT or #VC), port I/O, VMGEXIT, and the PVALIDATE / RMPADJUST entry points with their
register conventions -- through the Python engine, and on real code through the Unicorn engine."""

from __future__ import annotations

from typing import Any

import pytest
from hwkit import GUEST_SPA, PageTables, es_vmsa

from sevemu.abi.paging import ExitCode
from sevemu.hw.faults import GeneralProtection, InvalidOpcode, VmmCommunication
from sevemu.hw.pyengine import Workload, op
from sevemu.hw.soc import Soc
from sevemu.hw.svm import Vmcb, VmExit
from sevemu.hw.x86 import insn
from sevemu.hw.x86.decode import GuestInsn, decode_guest_insn, decode_io, ioio_info1

ES_ASID = 5  # Milan: SEV-ES ASIDs are 1..99


def _es_tables(soc: Soc, sev_features: int = 0) -> tuple[PageTables, Vmcb]:
    soc.psp.take_ports().keys.load(ES_ASID, bytes(16))
    pt = PageTables(soc, ES_ASID, True)
    pt.identity()
    vmcb = pt.vmcb(paging=False)
    vmcb.sev_es_enable = True
    vmcb.sev_features = sev_features
    es_vmsa(soc, vmcb)
    return pt, vmcb


def _resume(v: Vmcb) -> None:
    v.rip = v.next_rip


def test_decoding_of_the_guest_instructions() -> None:
    assert decode_guest_insn(bytes.fromhex("0f01d9"), False) == (GuestInsn.VMMCALL, 3)
    assert decode_guest_insn(bytes.fromhex("f30f01d9"), False) == (GuestInsn.VMGEXIT, 4)
    assert decode_guest_insn(bytes.fromhex("f20f01ff"), True) == (GuestInsn.PVALIDATE, 4)
    assert decode_guest_insn(bytes.fromhex("f3480f01fe"), True) == (GuestInsn.RMPADJUST, 5)  # REX allowed
    assert decode_guest_insn(bytes.fromhex("f2f30f01d9"), False) == (GuestInsn.VMGEXIT, 5)  # last F2/F3 wins
    assert decode_guest_insn(bytes.fromhex("660f01d9"), False) == (GuestInsn.VMMCALL, 4)
    for other in ("0f01d8", "0f01ff", "f20f01fe", "90", "0f01", ""):
        assert decode_guest_insn(bytes.fromhex(other), True) is None
    io = decode_io(bytes.fromhex("66ef"), False, 0x1510)
    assert io is not None and (io.port, io.size, io.is_in, io.length, io.imm_port) == (0x1510, 2, False, 2, False)
    assert ioio_info1(0x80, 4, True, addr_bits=64) == (0x80 << 16) | (1 << 9) | (1 << 6) | 1
    assert ioio_info1(0x80, 3, True) is None and ioio_info1(0x10000, 1, False) is None


@pytest.mark.parametrize("code,info1,automatic", [
    (ExitCode.HLT, 0, True), (ExitCode.VMGEXIT, 0, True), (ExitCode.INTR, 0, True), (ExitCode.NPF, 0x7, True),
    (ExitCode.NPF, 0x8 | 0x1, False), (ExitCode.CPUID, 0, False), (ExitCode.IOIO, 0, False),
    (ExitCode.MSR, 1, False), (ExitCode.VMMCALL, 0, False), (0x89, 0, False), (0x93, 0, True),
])
def test_automatic_and_non_automatic_exits(code: int, info1: int, automatic: bool) -> None:
    assert insn.is_automatic(code, info1) is automatic


def test_es_guest_takes_vc_for_non_automatic_exits(soc: Soc) -> None:
    pt, vmcb = _es_tables(soc)
    seen: list[tuple[int, int | None]] = []

    def work() -> Workload:
        for o in (op.cpuid(1), op.out(0x3F8, 0x41), op.rdmsr(0xC0010010), op.vmmcall(rax=1)):
            try:
                yield o
            except VmmCommunication as vc:
                seen.append((vc.vector, vc.error_code))
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(work())).code == ExitCode.HLT
    assert seen == [(29, 0x72), (29, 0x7B), (29, 0x7C), (29, 0x81)]  # #VC, error code = the exit code
    assert vmcb.regs["rax"] == 0  # nothing was staged for the hypervisor


def test_es_guest_ghcb_msr_vmgexit_and_sev_status(soc: Soc) -> None:
    pt, vmcb = _es_tables(soc, sev_features=1 << 1)  # vTOM
    got: dict[str, Any] = {}

    def work() -> Workload:
        yield op.wrmsr(0xC0010130, 0x0080_9000 | 0x012)  # GHCB MSR: the CPU keeps it, no exit
        got["ghcb"] = yield op.rdmsr(0xC0010130)
        got["status"] = yield op.rdmsr(0xC0010131)
        yield op.vmgexit()
        yield op.hlt()

    ex = soc.boot_cpu.vmrun(vmcb, pt.engine(work()))
    assert ex == VmExit(ExitCode.VMGEXIT)  # automatic: the hypervisor reads the GHCB MSR from the VMCB
    assert vmcb.ghcb_gpa == 0x0080_9012 and got["ghcb"] == 0x0080_9012
    assert got["status"] == 0b11 | (1 << 1) << 2  # SEV, SEV-ES, then SEV_FEATURES from bit 2


def test_plain_sev_guest_vmgexit_is_vmmcall_and_ghcb_msr_is_intercepted(sev_tables: PageTables) -> None:
    vmcb = sev_tables.vmcb(paging=False)

    def work() -> Workload:
        yield op.vmgexit()
        yield op.wrmsr(0xC0010130, 1)
        yield op.hlt()

    eng = sev_tables.engine(work())
    cpu = sev_tables.soc.boot_cpu
    assert cpu.vmrun(vmcb, eng).code == ExitCode.VMMCALL
    _resume(vmcb)
    assert (cpu.vmrun(vmcb, eng).code, vmcb.exit_info1) == (ExitCode.MSR, 1)
    assert vmcb.ghcb_gpa == 0


def test_cpu_handled_msrs(sev_tables: PageTables) -> None:
    vmcb = sev_tables.vmcb(paging=False)
    seen: list[str] = []
    got: dict[str, int] = {}

    def work() -> Workload:
        yield op.wrmsr(0xC0000080, 0x800)  # EFER.NXE
        got["efer"] = yield op.rdmsr(0xC0000080)
        yield op.wrmsr(0xC0000102, 0x1234_5678_9ABC)  # KERNEL_GS_BASE: a save-area MSR
        got["kgs"] = yield op.rdmsr(0xC0000102)
        for bad in (op.wrmsr(0xC0000080, 1 << 9), op.wrmsr(0xC0010131, 0)):
            try:
                yield bad
            except GeneralProtection as gp:
                seen.append(str(gp))
        yield op.hlt()

    assert sev_tables.soc.boot_cpu.vmrun(vmcb, sev_tables.engine(work())).code == ExitCode.HLT
    assert got == {"efer": 0x800, "kgs": 0x1234_5678_9ABC}
    assert vmcb.efer == 0x800 and vmcb.msrs[0xC0000102] == 0x1234_5678_9ABC
    assert len(seen) == 2 and "reserved" in seen[0] and "SEV_STATUS" in seen[1]


class FakeRmp:
    """Records what PVALIDATE/RMPADJUST hand the RMP (the SNP work's hw/rmp.py implements it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.validated: set[int] = set()
        self.epoch = 0

    def vmsa_check(self, asid: int, spa: int) -> None:
        return None

    def vmcb_check(self, spa: int) -> None:
        return None

    def check_host_write(self, spa: int, length: int) -> None:
        pass

    def mark_in_use(self, spas: Any) -> None:
        pass

    def release(self, spas: Any) -> None:
        pass

    def check_guest_access(self, *args: Any, **kw: Any) -> bool:
        return True

    def pvalidate(self, asid: int, gpa: int, spa: int, huge: bool, validate: bool) -> tuple[int, bool]:
        self.calls.append(("pvalidate", asid, gpa, spa, huge, validate))
        unchanged = (spa in self.validated) == validate
        (self.validated.add if validate else self.validated.discard)(spa)
        return 0, unchanged

    def rmpadjust(self, asid: int, gpa: int, spa: int, huge: bool, target_vmpl: int, perms: int,
                  vmsa: bool, caller_vmpl: int = 0) -> int:
        self.calls.append(("rmpadjust", asid, gpa, spa, huge, target_vmpl, perms, vmsa))
        return 2 if target_vmpl == 0 else 0


def test_pvalidate_and_rmpadjust_outside_snp_are_ud(sev_tables: PageTables) -> None:
    seen: list[str] = []

    def work() -> Workload:
        for o in (op.pvalidate(0x5000), op.rmpadjust(0x5000, 0, 1)):
            try:
                yield o
            except InvalidOpcode as ud:
                seen.append(str(ud))
        yield op.hlt()

    sev_tables.soc.boot_cpu.rmp = FakeRmp()  # even with an RMP: the guest is not SNP-active
    assert sev_tables.soc.boot_cpu.vmrun(sev_tables.vmcb(paging=False), sev_tables.engine(work())).code == ExitCode.HLT
    assert seen == ["#UD: invalid opcode: PVALIDATE outside an SEV-SNP guest",
                    "#UD: invalid opcode: RMPADJUST outside an SEV-SNP guest"]


def test_snp_guest_needs_an_rmp_to_run(soc: Soc) -> None:
    pt, vmcb = _es_tables(soc, sev_features=1)

    def halt() -> Workload:
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(halt())).code == ExitCode.INVALID
    soc.boot_cpu.rmp = FakeRmp()
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(halt())).code == ExitCode.HLT
    # the SNP work's RMP check of the VMSA page replaces the TMR checksum
    calls: list[tuple[int, int]] = []
    soc.boot_cpu.vmsa.snp_check = lambda asid, spa: calls.append((asid, spa)) or "not a VMSA page in the RMP"
    soc.boot_cpu.vmsa.forget()
    assert soc.boot_cpu.vmrun(vmcb, pt.engine(halt())).code == ExitCode.INVALID
    assert calls == [(ES_ASID, vmcb.vmsa_pa)] and soc.boot_cpu.vmsa_failure == "not a VMSA page in the RMP"


def test_pvalidate_and_rmpadjust_register_conventions_in_an_snp_guest(soc: Soc) -> None:
    pt, vmcb = _es_tables(soc, sev_features=1)
    rmp = soc.boot_cpu.rmp = FakeRmp()
    got: list[Any] = []

    def work() -> Workload:
        got.append((yield op.pvalidate(0x5000, 0, True)))
        got.append((yield op.pvalidate(0x5000, 0, True)))  # already validated: CF = 1
        # RAX's page offset is ignored (edk2's SevSnpIsVmpl0 RMPADJUSTs an unaligned array and needs
        # success at VMPL0: docs/ovmf.md): this names page 0x5000, already validated
        got.append((yield op.pvalidate(0x5010, 0, True)))
        got.append((yield op.pvalidate(0x200000 + 0x1000, 1, True)))  # 2 MiB size, not 2 MiB aligned
        got.append((yield op.pvalidate(0x5000, 2, True)))  # no such size
        got.append((yield op.pvalidate(0x200000, 1, False)))
        got.append((yield op.rmpadjust(0x6000, 0, 1 | 0x0F << 8 | 1 << 16)))
        got.append((yield op.rmpadjust(0x6000, 0, 0)))
        yield op.hlt()

    assert soc.boot_cpu.vmrun(vmcb, pt.engine(work())).code == ExitCode.HLT
    assert got == [(0, False), (0, True), (0, True), (1, False), (1, False), (0, True), (0, False), (2, False)]
    assert rmp.calls == [
        ("pvalidate", ES_ASID, 0x5000, GUEST_SPA + 0x5000, False, True),
        ("pvalidate", ES_ASID, 0x5000, GUEST_SPA + 0x5000, False, True),
        ("pvalidate", ES_ASID, 0x5000, GUEST_SPA + 0x5000, False, True),
        ("pvalidate", ES_ASID, 0x200000, GUEST_SPA + 0x200000, True, False),
        ("rmpadjust", ES_ASID, 0x6000, GUEST_SPA + 0x6000, False, 1, 0x0F, True),
        ("rmpadjust", ES_ASID, 0x6000, GUEST_SPA + 0x6000, False, 0, 0, False),
    ]


def test_impossible_io_is_gp_whatever_the_guest(soc: Soc) -> None:
    pt, vmcb = _es_tables(soc)
    seen: list[type] = []

    def work() -> Workload:
        try:
            yield op.out(0x3F8, 1, 3)
        except Exception as e:  # noqa: BLE001 - the test records the kind
            seen.append(type(e))
        yield op.hlt()

    soc.boot_cpu.vmrun(vmcb, pt.engine(work()))
    assert seen == [GeneralProtection]  # #GP comes before the #VC decision
