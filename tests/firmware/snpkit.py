"""Helpers for the SNP firmware tests: an SNP host brought up as Linux does it (SYSCFG.SNP_EN on every
core, SNP_INIT, WBINVD, SNP_DF_FLUSH), firmware pages made and reclaimed with RMPUPDATE and
SNP_PAGE_RECLAIM, and a guest launched through the mailbox, every step a host interface."""

from __future__ import annotations

from dataclasses import dataclass, field

from fwkit import call, ok

from sevemu.abi.commands import CommandId
from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.rmp import RmpResult, RmpUpdateState
from sevemu.abi.snp import (
    PADDR_PAGE_SIZE_2M,
    SnpActivateCmd,
    SnpAddrCmd,
    SnpGuestStatus,
    SnpGuestStatusCmd,
    SnpLaunchFinishCmd,
    SnpLaunchStartCmd,
    SnpLaunchUpdateCmd,
    SnpLaunchUpdateFlags,
    SnpPageCmd,
    SnpPageType,
    SnpPlatformStatus,
)
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.scenario import Machine, build_machine

GiB = 1 << 30
MiB = 1 << 20
PAGE = 0x1000
POLICY = 0x30000  # SMT | MBO, QEMU's default
SCRATCH = 0x0080_0000  # host pages for output buffers, ID blocks
GCTX = 0x0090_0000
GUEST_BASE = 0x1000_0000  # SPA of GPA 0 for the test guests
ASID = 1


def snp_machine(generation: str = "milan", *, init: bool = True, seed: str = "snp-tests") -> Machine:
    m = build_machine(generation, dram_size=1 * GiB, init=False, seed=seed)
    host = m.hv.soc
    host.wrmsr(Msr.SYSCFG, host.rdmsr(Msr.SYSCFG) | int(SysCfg.SNP_EN))
    if init:
        ok(m, CommandId.SNP_INIT)
        m.soc.wbinvd_all()
        ok(m, CommandId.SNP_DF_FLUSH)
    return m


def rmpupdate(m: Machine, spa: int, *, assigned: bool, asid: int = 0, gpa: int = 0, immutable: bool = False,
              huge: bool = False) -> None:
    rc = m.hv.core.rmpupdate_state(spa, RmpUpdateState(gpa=gpa, assigned=int(assigned), asid=asid,
                                                       immutable=int(immutable), pagesize=int(huge)))
    assert rc == RmpResult.SUCCESS, RmpResult(rc).name


def firmware_page(m: Machine, spa: int) -> None:
    """Linux ``rmp_mark_pages_firmware``: assigned, ASID 0, immutable."""
    rmpupdate(m, spa, assigned=True, immutable=True)


def reclaim(m: Machine, spa: int, huge: bool = False) -> None:
    """Linux ``snp_reclaim_pages``: SNP_PAGE_RECLAIM, then RMPUPDATE to shared."""
    ok(m, CommandId.SNP_PAGE_RECLAIM, SnpPageCmd(paddr=spa | (PADDR_PAGE_SIZE_2M if huge else 0)))
    rmpupdate(m, spa, assigned=False, huge=huge)


def read_output(m: Machine, cmd: CommandId, buf: Struct, out_spa: int, layout: type[Struct]) -> tuple[int, Struct | None]:
    """Issue a command that writes ``layout`` to a firmware page at ``out_spa``; reclaim and read it."""
    firmware_page(m, out_spa)
    status, _ = call(m, cmd, buf)
    reclaim(m, out_spa)
    if status != Status.SUCCESS:
        return status, None
    return status, layout.decode(m.hv.core.host_read(out_spa, layout.SIZE))


def platform_status(m: Machine) -> SnpPlatformStatus:
    status, out = read_output(m, CommandId.SNP_PLATFORM_STATUS, SnpAddrCmd(address=SCRATCH), SCRATCH,
                              SnpPlatformStatus)
    assert status == Status.SUCCESS and isinstance(out, SnpPlatformStatus), Status(status).name
    return out


def guest_status(m: Machine, gctx: int = GCTX) -> SnpGuestStatus:
    status, out = read_output(m, CommandId.SNP_GUEST_STATUS, SnpGuestStatusCmd(gctx_paddr=gctx, address=SCRATCH),
                              SCRATCH, SnpGuestStatus)
    assert status == Status.SUCCESS and isinstance(out, SnpGuestStatus), Status(status).name
    return out


@dataclass
class SnpLaunch:
    """One guest's launch as KVM drives it (``snp_launch_start`` / ``snp_launch_update`` / finish)."""

    m: Machine
    gctx: int = GCTX
    asid: int = ASID
    policy: int = POLICY
    base: int = GUEST_BASE
    pages: list[int] = field(default_factory=list)

    def start(self, **kw: int) -> int:
        firmware_page(self.m, self.gctx)
        ok(self.m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=self.gctx))
        status, _ = call(self.m, CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd(gctx_paddr=self.gctx,
                                                                                policy=self.policy, **kw))
        if status == Status.SUCCESS:
            ok(self.m, CommandId.SNP_ACTIVATE, SnpActivateCmd(gctx_paddr=self.gctx, asid=self.asid))
        return status

    def spa(self, gpa: int) -> int:
        return self.base + gpa

    def update(self, gpa: int, ptype: SnpPageType, data: bytes = b"", *, huge: bool = False,
               perms: tuple[int, int, int] = (0, 0, 0), expect: Status = Status.SUCCESS) -> None:
        spa = self.spa(gpa)
        size = 2 * MiB if huge else PAGE
        self.m.hv.core.host_write(spa, data.ljust(size, b"\0"))
        self.m.hv.core.clflush_range(spa, size)
        rmpupdate(self.m, spa, assigned=True, asid=self.asid, gpa=gpa, immutable=True, huge=huge)
        status, _ = call(self.m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(
            gctx_paddr=self.gctx, flags=SnpLaunchUpdateFlags(page_size=int(huge), page_type=int(ptype)),
            address=spa, vmpl1_perms=perms[0], vmpl2_perms=perms[1], vmpl3_perms=perms[2]))
        assert status == expect, Status(status).name
        self.pages.append(spa)

    def finish(self, **kw: object) -> int:
        status, _ = call(self.m, CommandId.SNP_LAUNCH_FINISH, SnpLaunchFinishCmd(gctx_paddr=self.gctx, **kw))
        return status
