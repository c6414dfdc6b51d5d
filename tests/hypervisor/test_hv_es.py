"""SEV-ES in the KVM model: VM types and vCPU types, KVM_SEV_INIT2, the VMSA KVM makes
(``sev_es_sync_vmsa``) held byte-equal to the guest owner's independent calculator, and
KVM_SEV_LAUNCH_UPDATE_VMSA through both interfaces; the platform brought up as Linux's sev-dev does."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import GiB, MiB
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import PlatformStatus
from sevemu.abi.status import Status
from sevemu.abi.vmsa import SevEsSaveArea, SevFeatures
from sevemu.errors import InputError
from sevemu.hw.profiles import MILAN
from sevemu.hypervisor.errors import Errno, SevError, SevFirmwareError
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevCmdId,
    KvmSevInit,
    KvmSevLaunchMeasure,
    KvmSevLaunchStart,
    KvmVmType,
    load_image,
)
from sevemu.hypervisor.sev import es
from sevemu.hypervisor.sevdev import SevDevice, SevUserCmd, SevUserDataStatus
from sevemu.hypervisor.vcpu import BSP_RESET_EIP, CPU_MODELS, HOST_CPU, CpuModel
from sevemu.hypervisor.vm import Vm, VmState
from sevemu.owner import vmsa as owner
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.session import LaunchSession
from sevemu.scenario import Machine, build_machine

MEM = 16 * MiB
IMAGE_GPA = 0x10000
IMAGE = bytes(range(256)) * 48  # 12 KiB
AP_EIP = 0x0080_B004
ES = int(GuestPolicy.ES)
EINVAL, ENOTTY, EFAULT, EIO = (-int(e) for e in (Errno.EINVAL, Errno.ENOTTY, Errno.EFAULT, Errno.EIO))
DEBUG_SWAP_CPU = dataclasses.replace(MILAN, eax_features=MILAN.eax_features | 1 << 14)  # CPUID EAX[14]


@pytest.fixture(scope="module")
def m() -> Machine:
    return build_machine("milan", seed="hv-es", dram_size=1 * GiB, cache_size=256 << 10)


def es_vm(m: Machine, vm_type: KvmVmType = KvmVmType.SEV_ES_VM, vcpu_type: str = "EPYC-Milan",
          vcpus: int = 2, **init: int) -> tuple[Vm, KvmSev]:
    """A VM made an SEV-ES guest by KVM_SEV_INIT2 (``SEV_ES_VM``) or KVM_SEV_ES_INIT (``DEFAULT_VM``),
    with ``vcpus`` vCPUs (the APs at AP_EIP)."""
    vm = m.hv.create_vm("es", MEM, vm_type=vm_type, vcpu_type=vcpu_type)
    kvm = KvmSev(m.hv, vm)
    if vm_type is KvmVmType.DEFAULT_VM:
        kvm.op(KvmSevCmdId.ES_INIT)
    else:
        kvm.op(KvmSevCmdId.INIT2, KvmSevInit(**init))
    for i in range(vcpus):
        vm.add_vcpu(reset_eip=BSP_RESET_EIP if i == 0 else AP_EIP)
    return vm, kvm


# ---- vCPU types and the VMSA, against the owner's calculator -----------------------------------------
def test_cpu_models_are_qemus_and_the_owners() -> None:
    """Two independent tables (hypervisor: QEMU's models; owner: the guest owner's) agree."""
    assert set(CPU_MODELS) == set(owner.VCPU_TYPES)
    for name, model in CPU_MODELS.items():
        assert model.signature == owner.vcpu_signature(name), name
    assert CPU_MODELS["EPYC-Milan"].signature == 0x00A00F11 and CPU_MODELS["EPYC-Rome-v3"].signature == 0x00830F10
    host = CpuModel.from_signature(HOST_CPU, 0x00A10F11)
    assert (host.family, host.model, host.stepping, host.signature) == (25, 0x11, 1, 0x00A10F11)


def test_unknown_vcpu_type_is_one_line(m: Machine) -> None:
    with pytest.raises(InputError, match="unknown vCPU type 'EPYC-Naples'; known: host, EPYC"):
        m.hv.create_vm("x", MEM, vcpu_type="EPYC-Naples")


def test_host_vcpu_type_is_the_hosts_signature(m: Machine) -> None:
    vm = m.hv.create_vm("host-cpu", MEM)
    try:
        assert vm.add_vcpu().vmcb.regs["rdx"] == m.soc.cpuid(1)[0] == MILAN.cpuid_fn0000_0001_eax
    finally:
        m.hv.destroy(vm)


@pytest.mark.parametrize("vm_type", [KvmVmType.SEV_ES_VM, KvmVmType.DEFAULT_VM])
def test_vmsa_equals_the_owners_for_every_vcpu_type(m: Machine, vm_type: KvmVmType) -> None:
    """``sev_es_sync_vmsa`` of the hypervisor's reset vCPU == ``owner.vmsa.build_vmsa``, byte for
    byte, for every vCPU type, BSP and AP, both KVM VM types."""
    owner_type = owner.KvmVmType.SEV_ES_VM if vm_type is KvmVmType.SEV_ES_VM else owner.KvmVmType.DEFAULT_VM
    for name in sorted(CPU_MODELS):
        vm, _ = es_vm(m, vm_type, name)
        try:
            for vcpu, eip in zip(vm.vcpus, (BSP_RESET_EIP, AP_EIP), strict=True):
                ours = es.sync_vmsa(vm, vcpu).encode()
                theirs = owner.build_vmsa(eip, cpu_signature=owner.vcpu_signature(name), vm_type=owner_type).encode()
                assert ours == theirs, (name, vm_type.name, hex(eip))
        finally:
            m.hv.destroy(vm)


def test_vmsa_carries_the_whole_reset_state(m: Machine) -> None:
    vm, _ = es_vm(m, vcpu_type="EPYC-Genoa")
    try:
        bsp, ap = (SevEsSaveArea.decode(es.sync_vmsa(vm, v).encode()) for v in vm.vcpus)
        assert (bsp.cs_selector, bsp.cs_base, bsp.rip, ap.cs_base, ap.rip) == (0xF000, 0xFFFF0000, 0xFFF0,
                                                                              0x00800000, 0xB004)
        assert (bsp.rdx, bsp.efer, bsp.cr0, bsp.cr4, bsp.dr6, bsp.dr7, bsp.xcr0) == (
            0x00A10F10, 0x1000, 0x10, 0x40, 0xFFFF0FF0, 0x400, 1)
        assert (bsp.tr_attrib, bsp.ldtr_attrib, bsp.es_attrib, bsp.g_pat) == (0x8B, 0x82, 0x93, 0x0007040600070406)
        assert (bsp.mxcsr, bsp.x87_fcw, bsp.sev_features) == (0x1F80, 0x37F, 0)
    finally:
        m.hv.destroy(vm)
    legacy, _ = es_vm(m, KvmVmType.DEFAULT_VM)
    try:
        area = SevEsSaveArea.decode(es.sync_vmsa(legacy, legacy.vcpus[0]).encode())
        assert (area.mxcsr, area.x87_fcw) == (0, 0)  # KVM_SEV_ES_INIT: no FPU state (old digests stay)
    finally:
        m.hv.destroy(legacy)


@pytest.mark.parametrize("vm_type", [KvmVmType.SEV_ES_VM, KvmVmType.DEFAULT_VM])
def test_memoised_vmsa_page_is_always_sync_vmsa(m: Machine, vm_type: KvmVmType) -> None:
    """``es.vmsa_page`` (memoised by the state it reads) == ``sync_vmsa(...).encode()`` for every vCPU
    and after each change of a value ``sync_vmsa`` reads (never a stale page), for both KVM VM types;
    a vCPU being debugged is refused even when a page of its otherwise equal state is memoised."""
    vm, _ = es_vm(m, vm_type)
    try:
        for v in vm.vcpus:
            assert es.vmsa_page(vm, v) == es.sync_vmsa(vm, v).encode()
        bsp = vm.vcpus[0]
        fpu = vm_type is not KvmVmType.DEFAULT_VM  # (the FPU goes into the VMSA of INIT2 VMs only)
        changes = [lambda: bsp.vmcb.regs.__setitem__("r12", 0x1234), lambda: setattr(bsp.vmcb, "rip", 0x42),
                   lambda: setattr(bsp.vmcb, "cr4", 0x640), lambda: setattr(bsp.arch, "pkru", 0x55),
                   lambda: setattr(bsp.arch, "xss", 0x100), lambda: setattr(bsp.arch, "dr6", 0xFFFF0FF1),
                   lambda: setattr(bsp.arch, "g_pat", 0x0606060606060606),
                   lambda: setattr(bsp.arch, "fpu", dataclasses.replace(bsp.arch.fpu, st=bytes(range(128)))),
                   lambda: setattr(bsp.arch, "fpu", dataclasses.replace(bsp.arch.fpu, mxcsr=0x1FA0)),
                   lambda: setattr(vm, "vmsa_features", vm.vmsa_features ^ 0x4),
                   lambda: bsp.arch.segments.__setitem__("cs", dataclasses.replace(bsp.arch.segments["cs"], base=0x1000))]
        seen = {es.vmsa_page(vm, bsp)}
        for i, change in enumerate(changes):
            change()
            page = es.vmsa_page(vm, bsp)
            assert page == es.sync_vmsa(vm, bsp).encode()
            assert (page not in seen) == (fpu or i not in (7, 8)), i  # each change reaches the page
            seen.add(page)
        bsp.arch.guest_debug = True
        with pytest.raises(SevError) as exc:
            es.vmsa_page(vm, bsp)
        assert exc.value.errno == Errno.EINVAL
        bsp.arch.guest_debug = False
        bsp.arch.dr7 = 0x401
        with pytest.raises(SevError):
            es.vmsa_page(vm, bsp)
    finally:
        m.hv.destroy(vm)


def test_vmsa_carries_the_vcpus_state_not_a_template(m: Machine) -> None:
    """What the VMM set (KVM_SET_REGS/SREGS/XCRS/FPU) is what goes into the VMSA."""
    vm, _ = es_vm(m, vcpus=1)
    try:
        v = vm.vcpus[0]
        v.vmcb.regs["r12"], v.vmcb.rip, v.arch.pkru, v.arch.xss = 0x1234, 0x42, 0x55, 0x100
        v.arch.fpu = dataclasses.replace(v.arch.fpu, st=bytes(range(128)), mxcsr=0x1FA0)
        area = SevEsSaveArea.decode(es.sync_vmsa(vm, v).encode())
        assert (area.r12, area.rip, area.pkru, area.xss, area.mxcsr) == (0x1234, 0x42, 0x55, 0x100, 0x1FA0)
        assert area.fpreg_x87 == bytes(range(8)) + bytes(range(16, 24)) + bytes(range(32, 40)) + \
            bytes(range(48, 56)) + bytes(range(64, 72)) + bytes(range(80, 88)) + bytes(range(96, 104)) + \
            bytes(range(112, 120)) + b"".join(bytes(range(16 * i + 8, 16 * i + 10)) for i in range(8))
    finally:
        m.hv.destroy(vm)


# ---- VM types and KVM_SEV_INIT2 ----------------------------------------------------------------------
def test_vm_types_the_host_cannot_run() -> None:
    naples = build_machine("naples", seed="hv-es-naples", dram_size=1 * GiB)
    for host, vm_type in ((naples, KvmVmType.SEV_ES_VM), (naples, KvmVmType.SNP_VM),
                          (naples, KvmVmType.SW_PROTECTED_VM)):
        with pytest.raises(SevError) as ei:
            host.hv.create_vm("x", MEM, vm_type=vm_type)
        assert ei.value.errno == Errno.EINVAL and not host.hv.vms
    naples.hv.create_vm("sev", MEM, vm_type=KvmVmType.SEV_VM)  # SEV_VM needs no ES


def test_init2_makes_sev_and_sev_es_guests(m: Machine) -> None:
    vm, _ = es_vm(m, vcpus=0)
    try:
        assert (vm.sev_active, vm.es, vm.ghcb_version, vm.vmsa_features, vm.need_init) == (True, True, 2, 0, False)
        assert vm.asid in m.profile.es_asids()
    finally:
        m.hv.destroy(vm)
    sev = m.hv.create_vm("sev", MEM, vm_type=KvmVmType.SEV_VM)
    try:
        KvmSev(m.hv, sev).op(KvmSevCmdId.INIT2, KvmSevInit())
        assert (sev.sev_active, sev.es, sev.ghcb_version) == (True, False, 0) and sev.asid in m.profile.sev_asids()
    finally:
        m.hv.destroy(sev)
    legacy, _ = es_vm(m, KvmVmType.DEFAULT_VM, vcpus=0)
    try:
        assert (legacy.es, legacy.ghcb_version) == (True, 1)  # KVM_SEV_ES_INIT keeps the minimal protocol
    finally:
        m.hv.destroy(legacy)


@pytest.mark.parametrize(("vm_type", "data", "want"), [
    (KvmVmType.SEV_ES_VM, {"flags": 1}, EINVAL),
    (KvmVmType.SEV_ES_VM, {"vmsa_features": int(SevFeatures.DEBUG_SWAP)}, EINVAL),  # no DebugSwap here
    (KvmVmType.SEV_ES_VM, {"vmsa_features": int(SevFeatures.SNP_ACTIVE)}, EINVAL),
    (KvmVmType.SEV_ES_VM, {"ghcb_version": 3}, EINVAL),
    (KvmVmType.SEV_VM, {"ghcb_version": 1}, EINVAL),
    (KvmVmType.SEV_VM, {"vmsa_features": int(SevFeatures.DEBUG_SWAP)}, EINVAL),
    (KvmVmType.DEFAULT_VM, {}, EINVAL),  # not an SEV type: checked before the structure is read
    (KvmVmType.SEV_ES_VM, None, EFAULT),  # NULL data
])
def test_init2_refusals(m: Machine, vm_type: KvmVmType, data: dict[str, int] | None, want: int) -> None:
    vm = m.hv.create_vm("x", MEM, vm_type=vm_type)
    try:
        asid = vm.asid
        kvm = KvmSev(m.hv, vm)
        assert kvm.memory_encrypt_op(KvmSevCmdId.INIT2, None if data is None else KvmSevInit(**data)) == want
        assert (vm.sev_active, vm.es, vm.asid, vm.need_init) == (False, False, asid, vm_type.needs_init2)
    finally:
        m.hv.destroy(vm)


def test_init2_order_and_once(m: Machine) -> None:
    vm = m.hv.create_vm("x", MEM, vm_type=KvmVmType.SEV_ES_VM)
    kvm = KvmSev(m.hv, vm)
    try:
        vm.add_vcpu()
        assert kvm.memory_encrypt_op(KvmSevCmdId.INIT2, KvmSevInit()) == EINVAL  # vCPUs exist
        assert kvm.memory_encrypt_op(KvmSevCmdId.ES_INIT) == EINVAL  # the legacy init: default VMs only
        assert kvm.memory_encrypt_op(KvmSevCmdId.INIT) == EINVAL
        assert not vm.sev_active
    finally:
        m.hv.destroy(vm)
    vm, kvm = es_vm(m, vcpus=0)
    try:
        assert kvm.memory_encrypt_op(KvmSevCmdId.INIT2, KvmSevInit()) == EINVAL  # need_init is gone
    finally:
        m.hv.destroy(vm)


def test_debug_swap_where_the_cpu_has_it() -> None:
    host = build_machine(DEBUG_SWAP_CPU, seed="hv-es-debugswap", dram_size=1 * GiB)
    swap = int(SevFeatures.DEBUG_SWAP)
    assert host.hv.sev.caps.vmsa_features == swap
    vm, _ = es_vm(host, vmsa_features=swap, vcpus=1)
    assert vm.vmsa_features == swap
    area = SevEsSaveArea.decode(es.sync_vmsa(vm, vm.vcpus[0]).encode())
    assert area.sev_features == swap
    assert area.encode() == owner.build_vmsa(BSP_RESET_EIP, cpu_signature=owner.vcpu_signature("EPYC-Milan"),
                                             sev_features=swap).encode()
    legacy = host.hv.create_vm("legacy", MEM)  # KVM_SEV_ES_INIT has no vmsa_features
    KvmSev(host.hv, legacy).op(KvmSevCmdId.ES_INIT)
    assert legacy.vmsa_features == 0


# ---- KVM_SEV_LAUNCH_UPDATE_VMSA ----------------------------------------------------------------------
def _owner(m: Machine, policy: int = ES) -> LaunchSession:
    key = m.firmware.identity.pdh_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return LaunchSession.create(key, policy)


def _ioctl_launch(m: Machine, vm: Vm, kvm: KvmSev, sess: LaunchSession) -> bytes:
    dev = SevDevice(m.hv)
    blob = sess.godh_cert_blob
    session = sess.session_blob
    kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=sess.policy, dh_uaddr=blob, dh_len=len(blob),
                                                       session_uaddr=session, session_len=len(session)), sev_fd=dev)
    assert load_image(kvm, IMAGE, IMAGE_GPA) == 0
    kvm.op(KvmSevCmdId.LAUNCH_UPDATE_VMSA)
    out = kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(uaddr=bytearray(0x30), len=0x30))
    assert isinstance(out.uaddr, bytearray)
    return bytes(out.uaddr)


@pytest.mark.parametrize("vm_type", [KvmVmType.SEV_ES_VM, KvmVmType.DEFAULT_VM])
def test_launch_update_vmsa_measures_every_vcpu(m: Machine, vm_type: KvmVmType) -> None:
    """QEMU's SEV-ES launch through the ioctls: the firmware's MEASURE verifies against the owner's
    prediction (image, then one VMSA per vCPU in vCPU order), computed without the platform."""
    owner_type = owner.KvmVmType.SEV_ES_VM if vm_type is KvmVmType.SEV_ES_VM else owner.KvmVmType.DEFAULT_VM
    vm, kvm = es_vm(m, vm_type, "EPYC-Rome", vcpus=3)
    try:
        sess = _owner(m)
        since = len(m.firmware.log)
        blob = _ioctl_launch(m, vm, kvm, sess)
        pages = owner.vmsa_pages(3, AP_EIP, cpu_signature=owner.vcpu_signature("EPYC-Rome"), vm_type=owner_type)
        p = m.profile
        sess.verify_measurement(blob, api_major=p.api_major, api_minor=p.api_minor, build=p.build,
                                expected_ld=expected_launch_digest([IMAGE], pages))
        names = [n for n, _ in m.firmware.log[since:] if n.startswith("LAUNCH_UPDATE_VMSA")]
        assert len(names) == 3
        g = m.firmware.guests[vm.handle]
        assert [spa for spa, _ in g.vmsas] == [vm.vmsa_pages[i] for i in range(3)]  # vCPU order
        assert all(v.guest_state_protected and v.vmcb.sev_es_enable for v in vm.vcpus)
        m.soc.wbinvd_all()
        sig = owner.vcpu_signature("EPYC-Rome").to_bytes(8, "little")
        for spa in vm.vmsa_pages.values():  # the host sees ciphertext: no RDX signature, no reset CS
            page = m.soc.boot_cpu.host_read(spa, 4096)
            assert page[0x310:0x318] != sig and page[0x10:0x12] != b"\x00\xf0"
    finally:
        m.hv.destroy(vm)


def test_python_api_launches_an_es_guest_like_the_ioctls() -> None:
    """``create_vm(vm_type=SEV_ES_VM)`` + ``launch_measure``: the implicit KVM_SEV_INIT2 and one VMSA
    per vCPU; the same firmware commands and digest as the ioctl path of the same machine seed."""
    outs = []
    for path in ("python", "ioctl"):
        m = build_machine("milan", seed="hv-es-paths", dram_size=1 * GiB, cache_size=256 << 10)
        since = len(m.firmware.log)
        if path == "python":
            vm = m.hv.create_vm("es", MEM, vm_type=KvmVmType.SEV_ES_VM, vcpu_type="EPYC")
            m.hv.sev_init(vm)
            vm.add_vcpu()
            vm.add_vcpu(reset_eip=AP_EIP)
            m.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], ES)
        else:
            vm, kvm = es_vm(m, vcpu_type="EPYC")
            kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=ES), sev_fd=SevDevice(m.hv))
            assert load_image(kvm, IMAGE, IMAGE_GPA, page_by_page=False) == 0
            kvm.op(KvmSevCmdId.LAUNCH_UPDATE_VMSA)
        log = [(n, s) for n, s in m.firmware.log[since:] if n not in ("PLATFORM_STATUS", "LAUNCH_MEASURE")]
        outs.append((log, m.firmware.guests[vm.handle].launch_digest, vm.asid))
    assert outs[0] == outs[1]
    pages = owner.vmsa_pages(2, AP_EIP, cpu_signature=owner.vcpu_signature("EPYC"))
    assert outs[0][1] == expected_launch_digest([IMAGE], pages)


def test_python_api_implicit_init2(m: Machine) -> None:
    """Without ``sev_init`` the launch makes the default KVM_SEV_INIT2 -- only while the VM has no
    vCPU yet (the ASID changes for an ES guest, and a vCPU's VMCB carries it)."""
    vm = m.hv.create_vm("implicit", MEM, vm_type=KvmVmType.SEV_ES_VM)
    try:
        m.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], ES)
        assert vm.es and vm.asid in m.profile.es_asids()
        assert m.firmware.guests[vm.handle].launch_digest == expected_launch_digest([IMAGE])  # no vCPU, no VMSA
    finally:
        m.hv.destroy(vm)
    late = m.hv.create_vm("late", MEM, vm_type=KvmVmType.SEV_ES_VM)
    late.add_vcpu()
    with pytest.raises(SevError, match="must come before its vCPUs") as ei:
        m.hv.launch_measure(late, [(IMAGE_GPA, IMAGE)], ES)
    assert ei.value.errno == Errno.EINVAL and not late.sev_active and late.state is VmState.CREATED
    m.hv.destroy(late)


def test_launch_update_vmsa_refusals(m: Machine) -> None:
    sev = m.hv.create_vm("sev", MEM)
    kvm = KvmSev(m.hv, sev)
    try:
        kvm.op(KvmSevCmdId.INIT)
        sev.add_vcpu()
        assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_UPDATE_VMSA) == ENOTTY  # an SEV (non-ES) guest
    finally:
        m.hv.destroy(sev)
    for arm in ("dr7", "guest_debug"):
        vm, kvm = es_vm(m)
        try:
            kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=ES), sev_fd=SevDevice(m.hv))
            if arm == "dr7":
                vm.vcpus[1].arch.dr7 = 0x401  # a breakpoint armed on the AP
            else:
                vm.vcpus[1].arch.guest_debug = True
            since = len(m.firmware.log)
            assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_UPDATE_VMSA) == EINVAL
            # KVM works vCPU by vCPU: the BSP's page went to the firmware, the AP's did not
            assert [n for n, _ in m.firmware.log[since:]] == ["LAUNCH_UPDATE_VMSA"]
            assert vm.vcpus[0].guest_state_protected and not vm.vcpus[1].guest_state_protected
        finally:
            m.hv.destroy(vm)


# ---- the platform as Linux brings it up ------------------------------------------------------------
@pytest.mark.parametrize(("generation", "es_on"), [("milan", True), ("rome", True), ("genoa", True),
                                                   ("naples", False)])
def test_platform_comes_up_with_es_where_the_cpu_has_it(generation: str, es_on: bool) -> None:
    host = build_machine(generation, seed="hv-es-up", dram_size=1 * GiB)
    st = host.hv.platform_status()
    assert st.config == int(es_on) and (host.firmware.tmr is not None) == es_on
    user = SevDevice(host.hv).issue(SevUserCmd.PLATFORM_STATUS, SevUserDataStatus()).data
    assert isinstance(user, SevUserDataStatus) and user.flags & 0x100 == 0x100 * es_on  # SEV_STATUS_FLAGS_CONFIG_ES
    if es_on:
        assert host.firmware.tmr is not None and host.firmware.tmr.ready  # DF_FLUSH after INIT
        assert host.firmware.tmr.base == host.hv.tmr_spa
    # the hypervisor's implicit INIT (sev-dev's sev_move_to_init_state / KVM_SEV_INIT) does the same
    host.hv.sev.shutdown()
    assert host.hv.sev.ensure_init()
    assert PlatformStatus.decode(host.hv.psp.raw(0x04, bytes(12))[1]).config == int(es_on)


def test_an_es_policy_on_a_platform_without_es_says_so() -> None:
    host = build_machine("milan", seed="hv-es-off", dram_size=1 * GiB, es=False)
    vm = host.hv.create_vm("g", MEM)
    with pytest.raises(SevFirmwareError, match="requires SEV-ES, which the platform was not INITed with") as ei:
        host.hv.launch_measure(vm, [(IMAGE_GPA, IMAGE)], ES)
    assert ei.value.status == Status.UNSUPPORTED and ei.value.errno == Errno.EIO
    vm2 = host.hv.create_vm("g2", MEM)
    kvm = KvmSev(host.hv, vm2)
    kvm.op(KvmSevCmdId.INIT)
    assert kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(policy=ES),
                                 sev_fd=SevDevice(host.hv)) == EIO
    assert kvm.last_error == Status.UNSUPPORTED


def test_an_es_policy_on_a_vm_that_is_not_es_says_so(m: Machine) -> None:
    """KVM does not compare the policy with the VM: the firmware's ASID ranges refuse the ACTIVATE
    (INVALID_ASID, the guest decommissioned), and the error names the mismatch."""
    for policy, make_es in ((ES, False), (0, True)):
        vm = m.hv.create_vm("mismatch", MEM)
        kvm = KvmSev(m.hv, vm)
        kvm.op(KvmSevCmdId.ES_INIT if make_es else KvmSevCmdId.INIT)
        guests = dict(m.firmware.guests)
        with pytest.raises(SevFirmwareError, match="needs an SEV-ES guest" if policy else "needs an SEV guest") as ei:
            m.hv.sev.launch_start(vm, policy)
        assert ei.value.status == Status.INVALID_ASID and m.firmware.guests == guests and not vm.handle
        m.hv.destroy(vm)
