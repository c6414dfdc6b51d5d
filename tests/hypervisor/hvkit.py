"""Fixtures for the hypervisor tests: a small host of each generation with its firmware INIT."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sevemu._util.units import MiB
from sevemu.hw.cpu import Engine
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine, build_machine


def small_machine(generation: str = "milan", seed: str = "hv-tests", cache_size: int = 256 << 10,
                  dram_size: int = 512 * MiB) -> Machine:
    return build_machine(generation, seed=seed, dram_size=dram_size, cache_size=cache_size)


@pytest.fixture
def machine() -> Machine:
    return small_machine()


def snp_machine(seed: str) -> Machine:
    """A Milan host brought up with SEV-SNP before INIT (as sev-dev does)."""
    return build_machine("milan", seed=seed, dram_size=1024 * MiB, cache_size=256 << 10, snp=True)


def launch_snp(m: Machine, engine: Engine, pages: Sequence[tuple[int, bytes]] = (), *,
               name: str = "snp", memory: int = 16 * MiB, aps: Sequence[Engine] = (), asid: int | None = None,
               huge_pages: bool = True) -> Vm:
    """An SNP VM with one vCPU running ``engine`` (and one more per engine of ``aps``), launched
    (START, NORMAL ``pages``, FINISH) by KVM; ``asid``: the one the host gives it instead of the pool's."""
    from sevemu._util.units import PAGE
    from sevemu.abi.pycode import CODE_GPA, identity_table
    from sevemu.hw.pyengine import PyEngine
    from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit, KvmVmType
    from sevemu.hypervisor.sevdev import SevDevice
    from sevemu.hypervisor.uapi import KvmSevSnpLaunchFinish, KvmSevSnpLaunchStart, KvmSevSnpLaunchUpdate

    ids = [e.identity for e in (engine, *aps) if isinstance(e, PyEngine) and e.identity]
    if ids:  # their program table, launched as QEMU would any page
        pages = [(CODE_GPA, identity_table(ids).ljust(PAGE, b"\0")), *pages]
    vm = m.hv.create_vm(name, memory, vm_type=KvmVmType.SNP_VM)
    vm.huge_pages = huge_pages  # 2 MiB folios for whole 2 MiB-aligned stretches of an update
    if asid is not None:  # a host that picks the ASID itself (KVM chooses them)
        vm.asid = asid
    kvm = KvmSev(m.hv, vm)
    kvm.op(KvmSevCmdId.INIT2, KvmSevInit())
    vm.add_vcpu(engine)
    for ap in aps:
        vm.add_vcpu(ap)
    dev = SevDevice(m.hv)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=0x30000), sev_fd=dev)
    for gpa, data in pages:
        kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=gpa >> 12, uaddr=data, len=len(data),
                                                                    type=1), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish())
    return vm
