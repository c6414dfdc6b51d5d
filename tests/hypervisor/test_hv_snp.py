"""The KVM model's SEV-SNP part (hypervisor/sev/snp.py) through KVM_MEMORY_ENCRYPT_OP: bring-up,
KVM_SEV_INIT2 for KVM_X86_SNP_VM, KVM_SEV_SNP_LAUNCH_START / UPDATE / FINISH with Linux's errnos,
private (guest_memfd) memory the host cannot map or write, teardown with reclaim and ASID reuse --
and the contrast: the same host write that faults under SNP silently corrupts an SEV guest."""

from __future__ import annotations

import pytest

from sevemu._util.units import MiB
from sevemu.abi.rmp import RmpPageState
from sevemu.abi.snp import (
    SnpCpuidFunction,
    SnpGuestState,
    SnpLaunchUpdateCmd,
    SnpLaunchUpdateFlags,
    SnpPageType,
)
from sevemu.abi.status import Status
from sevemu.errors import UnmappedError
from sevemu.firmware.snp import snp_state
from sevemu.hw.rmp import HostRmpFault
from sevemu.hypervisor.errors import Errno, IoctlError, SevInputError
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit, KvmVmType
from sevemu.hypervisor.sev import snp
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import KvmSevSnpLaunchFinish, KvmSevSnpLaunchStart, KvmSevSnpLaunchUpdate
from sevemu.scenario import Machine, build_machine

PAGE = 0x1000
POLICY = 0x30000


@pytest.fixture(scope="module")
def m() -> Machine:
    mach = build_machine("milan", seed="hv-snp", dram_size=1024 * MiB, cache_size=256 << 10, init=False)
    snp.platform_init(mach.hv.sev)
    mach.hv.platform_init()
    return mach


def _vm(m: Machine, vcpus: int = 1) -> tuple[KvmSev, SevDevice]:
    vm = m.hv.create_vm("snp", 64 * MiB, vm_type=KvmVmType.SNP_VM)
    kvm = KvmSev(m.hv, vm)
    kvm.op(KvmSevCmdId.INIT2, KvmSevInit())
    for _ in range(vcpus):
        vm.add_vcpu()
    return kvm, SevDevice(m.hv)


def _errno(fn: object, *args: object, **kw: object) -> tuple[int, int]:
    with pytest.raises(IoctlError) as exc:
        fn(*args, **kw)  # type: ignore[operator]
    return exc.value.ret, exc.value.error


def test_snp_vms_need_snp_on_the_host() -> None:
    plain = build_machine("milan", seed="hv-no-snp", dram_size=512 * MiB, cache_size=256 << 10)
    with pytest.raises(SevInputError) as exc:
        plain.hv.create_vm("snp", 16 * MiB, vm_type=KvmVmType.SNP_VM)
    assert exc.value.errno == Errno.EINVAL


def test_init2_for_an_snp_vm(m: Machine) -> None:
    vm = m.hv.create_vm("snp-init", 16 * MiB, vm_type=KvmVmType.SNP_VM)
    kvm = KvmSev(m.hv, vm)
    assert _errno(kvm.op, KvmSevCmdId.INIT2, KvmSevInit(ghcb_version=1)) == (-Errno.EINVAL, 0)
    kvm.op(KvmSevCmdId.INIT2, KvmSevInit())
    assert vm.snp and vm.es and vm.vmsa_features & 1 and vm.asid in m.soc.profile.es_asids()
    assert _errno(kvm.op, KvmSevCmdId.INIT2, KvmSevInit()) == (-Errno.EINVAL, 0)
    m.hv.destroy(vm)


@pytest.mark.parametrize("policy", [0x10000, 0x20000, POLICY | 1 << 20, POLICY | 1 << 21, POLICY | 1 << 18])
def test_launch_start_refuses_policies_kvm_does_not_pass(m: Machine, policy: int) -> None:
    kvm, dev = _vm(m)
    try:
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=policy), sev_fd=dev) \
            == (-Errno.EINVAL, 0)
        assert not kvm.vm.snp_context
    finally:
        m.hv.destroy(kvm.vm)


def test_launch_errnos(m: Machine) -> None:
    sev_vm = m.hv.create_vm("sev", 16 * MiB, vm_type=KvmVmType.SEV_ES_VM)
    KvmSev(m.hv, sev_vm).op(KvmSevCmdId.INIT2, KvmSevInit())
    assert _errno(KvmSev(m.hv, sev_vm).op, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY),
                  sev_fd=SevDevice(m.hv)) == (-Errno.ENOTTY, 0)
    m.hv.destroy(sev_vm)
    kvm, dev = _vm(m)
    try:
        upd = KvmSevSnpLaunchUpdate(gfn_start=0, uaddr=bytes(PAGE), len=PAGE, type=1)
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_UPDATE, upd, sev_fd=dev) == (-Errno.EINVAL, 0)  # no start
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY, flags=1),
                      sev_fd=dev) == (-Errno.EINVAL, 0)
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY)) == (-Errno.EBADF, 0)
        kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY), sev_fd=dev)
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY),
                      sev_fd=dev) == (-Errno.EINVAL, 0)
        for bad in ({"len": 0}, {"len": PAGE + 1}, {"type": 2}, {"type": 7}, {"flags": 1},
                    {"gfn_start": (64 * MiB) >> 12}):
            args = {"gfn_start": 0, "uaddr": bytes(2 * PAGE), "len": PAGE, "type": 1} | bad
            assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(**args), sev_fd=dev) \
                == (-Errno.EINVAL, 0), bad
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(uaddr=b"short", len=PAGE, type=1),
                      sev_fd=dev) == (-Errno.EFAULT, 0)
        kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=0, uaddr=b"x" * PAGE, len=PAGE, type=1),
               sev_fd=dev)
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_UPDATE,
                      KvmSevSnpLaunchUpdate(gfn_start=0, uaddr=bytes(PAGE), len=PAGE, type=1), sev_fd=dev) \
            == (-Errno.EINVAL, 0)  # already private
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish(flags=1)) == (-Errno.EINVAL, 0)
        kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish())
        assert snp_state(m.firmware).guests[kvm.vm.snp_context].state == SnpGuestState.RUNNING
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish()) \
            == (-Errno.EIO, Status.INVALID_GUEST_STATE)
    finally:
        m.hv.destroy(kvm.vm)


def test_a_bad_cpuid_page_comes_back_corrected(m: Machine) -> None:
    kvm, dev = _vm(m)
    try:
        kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY), sev_fd=dev)
        bad = SnpCpuidFunction(eax_in=0x8000001F, eax=0xFFFFFFFF)
        page = bytearray((1).to_bytes(4, "little") + bytes(12) + bad.encode()).ljust(PAGE, b"\0")
        upd = KvmSevSnpLaunchUpdate(gfn_start=5, uaddr=page, len=PAGE, type=6)
        assert _errno(kvm.op, KvmSevCmdId.SNP_LAUNCH_UPDATE, upd, sev_fd=dev) == (-Errno.EIO, Status.INVALID_PARAM)
        fixed = SnpCpuidFunction.decode(bytes(page[0x10:0x40]))
        assert fixed.eax == m.hv.soc.cpuid(0x8000001F)[0]
        assert m.hv.soc.rmp_entry(kvm.vm.spa_of(5 * PAGE)).state == RmpPageState.HYPERVISOR  # reclaimed
        kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=5, uaddr=page, len=PAGE, type=6),
               sev_fd=dev)  # QEMU retries with the corrected table
    finally:
        m.hv.destroy(kvm.vm)


def test_private_memory_the_host_cannot_map_or_write_and_teardown_gives_it_back(m: Machine) -> None:
    kvm, dev = _vm(m, vcpus=2)
    vm = kvm.vm
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY), sev_fd=dev)
    upd = kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=16, uaddr=b"secret" * 2048,
                                                                      len=3 * PAGE, type=1), sev_fd=dev)
    assert (upd.gfn_start, upd.len) == (19, 0)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish())
    spa = vm.spa_of(16 * PAGE)
    with pytest.raises(UnmappedError):
        vm.host_read(16 * PAGE, 16)  # guest_memfd: no mapping in the VMM
    with pytest.raises(UnmappedError):
        vm.host_write(16 * PAGE, b"evil")
    with pytest.raises(HostRmpFault):
        m.hv.core.host_write(spa, b"evil")  # the kernel's direct map: #PF(RMP)
    assert b"secret" not in m.hv.core.host_read(spa, PAGE)
    vmsas = list(vm.vmsa_pages.values())
    assert all(m.hv.soc.rmp_entry(p).vmsa for p in vmsas)
    gctx = vm.snp_context
    m.hv.destroy(vm)
    for page in [spa, gctx, *vmsas]:
        assert m.hv.soc.rmp_entry(page).state == RmpPageState.HYPERVISOR
    m.hv.core.host_write(spa, b"mine again")
    # the ASID comes back after WBINVD + SNP_DF_FLUSH: many launches in a row reuse it
    for _ in range(3):
        k2, d2 = _vm(m)
        k2.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY), sev_fd=d2)
        m.hv.destroy(k2.vm)
    assert m.firmware.internal_errors == []


def test_contrast_the_same_write_corrupts_an_sev_guest(m: Machine) -> None:
    vm = m.hv.create_vm("sev", 16 * MiB, vm_type=KvmVmType.SEV_ES_VM)
    try:
        m.hv.launch(vm, [(0, b"secret".ljust(PAGE, b"\0"))], policy=0x4)
        spa = vm.spa_of(0)
        before = m.hv.core.host_read(spa, 16)
        m.hv.core.host_write(spa, b"evil")  # no RMP entry makes this page the guest's: it lands
        assert m.hv.core.host_read(spa, 4) == b"evil" and before[:4] != b"evil"
    finally:
        m.hv.destroy(vm)


def test_dev_sev_snp_commands(m: Machine) -> None:
    """/dev/sev SNP_PLATFORM_STATUS (through a firmware page KVM reclaims), SNP_SET_CONFIG,
    SNP_COMMIT; write access needed for the latter two; -ENXIO / -EINVAL before SNP_INIT."""
    from sevemu.hypervisor.uapi import SevUserCmd, SevUserDataSnpConfig, SevUserDataSnpStatus
    dev = SevDevice(m.hv)
    st = dev.issue(SevUserCmd.SNP_PLATFORM_STATUS, SevUserDataSnpStatus()).data
    assert isinstance(st, SevUserDataSnpStatus)
    assert (st.api_major, st.state, st.is_rmp_initialized, st.feature_info) == (1, 1, True, True)
    assert st.current_tcb_version == st.reported_tcb_version != 0
    lower = st.current_tcb_version - 1
    dev.issue(SevUserCmd.SNP_SET_CONFIG, SevUserDataSnpConfig(reported_tcb=lower, mask_chip_id=1))
    st2 = dev.issue(SevUserCmd.SNP_PLATFORM_STATUS, SevUserDataSnpStatus()).data
    assert isinstance(st2, SevUserDataSnpStatus) and st2.reported_tcb_version == lower and st2.mask_chip_id
    dev.issue(SevUserCmd.SNP_SET_CONFIG, SevUserDataSnpConfig())  # back to the current TCB, unmasked
    ro = SevDevice(m.hv, writable=False)
    assert _errno(ro.issue, SevUserCmd.SNP_COMMIT)[0] == -Errno.EPERM
    dev.issue(SevUserCmd.SNP_COMMIT)
    assert snp_state(m.firmware).committed_tcb == snp_state(m.firmware).current_tcb
    plain = build_machine("milan", seed="hv-no-snp2", dram_size=512 * MiB, cache_size=256 << 10)
    pdev = SevDevice(plain.hv)
    assert _errno(pdev.issue, SevUserCmd.SNP_COMMIT)[0] == -Errno.ENXIO
    assert _errno(pdev.issue, SevUserCmd.SNP_SET_CONFIG, SevUserDataSnpConfig())[0] == -Errno.EINVAL
    st3 = pdev.issue(SevUserCmd.SNP_PLATFORM_STATUS, SevUserDataSnpStatus()).data
    assert isinstance(st3, SevUserDataSnpStatus) and st3.state == 0 and not st3.is_rmp_initialized


@pytest.mark.parametrize("ptype", list(SnpPageType))
@pytest.mark.parametrize("huge", [False, True])
def test_kvms_cached_update_buffer_is_the_encoded_command(ptype: SnpPageType, huge: bool) -> None:
    """The SNP_LAUNCH_UPDATE buffer KVM encodes once per kind and patches (launch_update, the VMSAs of
    launch_finish): the bytes of the command encoded afresh, then zeros to the end of the line (what
    PspDriver.raw stores after a 32-byte buffer); each copy is the caller's own."""
    spa = 0x1234_5000 | (1 << 51)
    cmd = snp._update_cmd(0x7000, ptype, huge)
    cmd[snp._CMD_ADDRESS : snp._CMD_ADDRESS + 8] = spa.to_bytes(8, "little")
    want = SnpLaunchUpdateCmd(gctx_paddr=0x7000, flags=SnpLaunchUpdateFlags(page_type=int(ptype), page_size=int(huge)),
                              address=spa).encode()
    assert bytes(cmd) == want + bytes(64 - len(want))
    assert snp._update_cmd(0x7000, ptype, huge) == want[:0x10] + bytes(8) + want[0x18:] + bytes(64 - len(want))
