"""The host side of SEV-ES: KVM_SEV_INIT2 and the VMSAs (SEV API 55766, LAUNCH_UPDATE_VMSA,
SEND_UPDATE_VMSA, RECEIVE_UPDATE_VMSA; APM2 15.35; Linux arch/x86/kvm/svm/sev.c ``sev_guest_init2``,
``sev_es_sync_vmsa``, ``__sev_launch_update_vmsa``; Documentation/virt/kvm/x86/amd-memory-encryption.rst).

KVM_SEV_INIT2 (:func:`guest_init2`) makes a VM created with type ``KVM_X86_SEV_VM`` or
``KVM_X86_SEV_ES_VM`` an SEV or SEV-ES guest with the ``struct kvm_sev_init`` it is given:
``-EINVAL`` for a VM of another type or one already initialised, for vCPUs already created, for
``flags``, for ``vmsa_features`` the host does not support (DEBUG_SWAP where CPUID Fn8000_001F EAX[14]
has it; none for an SEV guest) and for a GHCB version above 2 (or any for an SEV guest).

An SEV-ES vCPU's register state lives in a VMSA page the firmware encrypts with the guest's key.
:func:`sync_vmsa` makes the page as ``sev_es_sync_vmsa`` does, from the hypervisor's own vCPU state
(:mod:`sevemu.hypervisor.vcpu`): the whole VMCB save area (segments, EFER, CR0/3/4, DR7, RFLAGS, RIP,
RSP, RAX, PAT ...), then the GPRs and RIP, XCR0, PKRU, XSS and DR6 of ``vcpu->arch``, and
``sev_features`` = the VM's ``vmsa_features``; for a VM of any type but ``KVM_X86_DEFAULT_VM`` (a
KVM_SEV_INIT2 VM) also the x87/SSE/AVX state (FCW 0x37f and MXCSR 0x1f80 at reset; the legacy
KVM_SEV_ES_INIT VM keeps them 0 so that existing launch digests do not change).  A vCPU with
KVM_SET_GUEST_DEBUG on or DR7 other than 0x400 is refused (``-EINVAL``).
:func:`launch_update_vmsa` (KVM_SEV_LAUNCH_UPDATE_VMSA, ``-ENOTTY`` for a VM that is not SEV-ES) does
that for every vCPU in vCPU order: the page written as the host, CLFLUSHed (the firmware encrypts it
in place), LAUNCH_UPDATE_VMSA with ``len`` 4096; the vCPU's state is then protected
(``guest_state_protected``; the VMCB's ``sev_es_enable``).  The pages are the VM's
(:attr:`~sevemu.hypervisor.vm.Vm.vmsa_pages`: vCPU index -> SPA), from the host's table pages, given
back when the VM is destroyed.

The VMSA transfers move one vCPU's page through a transport packet (AMD's out-of-tree KVM layout:
``vcpu_id`` plus header and transport buffers; upstream KVM defines the ids but refuses them).
"""

from __future__ import annotations

from typing import Any

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import LaunchUpdateDataCmd
from sevemu.abi.vmsa import VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.hypervisor.errors import Errno, SevInputError, SevStateError
from sevemu.hypervisor.sev.common import Reply, SevHost
from sevemu.hypervisor.sev.legacy import LegacySev
from sevemu.hypervisor.uapi import KvmSevInit
from sevemu.hypervisor.vcpu import DR7_RESET, KvmVmType
from sevemu.hypervisor.vm import Vcpu, Vm

__all__ = ["guest_init2", "launch_update_vmsa", "receive_update_vmsa", "send_update_vmsa", "sync_vmsa", "vmsa_page"]


def guest_init2(host: LegacySev, vm: Vm, data: KvmSevInit) -> None:
    """KVM_SEV_INIT2 (module docstring)."""
    if not vm.need_init or vm.vm_type not in (KvmVmType.SEV_VM, KvmVmType.SEV_ES_VM):
        raise SevStateError(Errno.EINVAL, f"{vm.name} ({vm.vm_type.name}) takes no KVM_SEV_INIT2")
    host.guest_init(vm, es=vm.vm_type is KvmVmType.SEV_ES_VM, init2=True, vmsa_features=data.vmsa_features,
                    flags=data.flags, ghcb_version=data.ghcb_version)


def sync_vmsa(vm: Vm, vcpu: Vcpu) -> SevEsSaveArea:
    """``sev_es_sync_vmsa``: the VMSA of ``vcpu`` (module docstring); ``-EINVAL`` for a vCPU being
    debugged or with DR7 other than 0x400."""
    arch, vmcb = vcpu.arch, vcpu.vmcb
    if arch.guest_debug or arch.dr7 & ~DR7_RESET:
        raise SevInputError(Errno.EINVAL, f"vCPU {vcpu.index} of {vm.name}: debug registers armed "
                                          f"(DR7 {arch.dr7:#x}, guest debug {arch.guest_debug})")
    values: dict[str, Any] = {}
    for name, seg in arch.segments.items():  # the VMCB save area (memcpy)
        values.update({f"{name}_selector": seg.selector, f"{name}_attrib": seg.attrib,
                       f"{name}_limit": seg.limit, f"{name}_base": seg.base})
    values.update(efer=vmcb.efer, cr4=vmcb.cr4, cr3=vmcb.cr3, cr0=vmcb.cr0, dr7=arch.dr7, rflags=vmcb.rflags,
                  g_pat=arch.g_pat)
    values.update(vmcb.regs)  # the GPRs
    values.update(rip=vmcb.rip, xcr0=arch.xcr0, pkru=arch.pkru, xss=arch.xss, dr6=arch.dr6,
                  sev_features=vm.vmsa_features)
    if vm.vm_type is not KvmVmType.DEFAULT_VM:  # FPU and AVX only for KVM_SEV_INIT2 VMs
        fpu = arch.fpu
        st = [fpu.st[16 * i : 16 * i + 10] for i in range(8)]  # 10 of each 16-byte FXSAVE slot
        values.update(x87_dp=fpu.rdp, mxcsr=fpu.mxcsr, x87_ftw=fpu.ftw, x87_fsw=fpu.fsw, x87_fcw=fpu.fcw,
                      x87_fop=fpu.fop, x87_rip=fpu.rip,
                      fpreg_x87=b"".join(r[:8] for r in st) + b"".join(r[8:] for r in st),
                      fpreg_xmm=fpu.xmm, fpreg_ymm=fpu.ymm)
    return SevEsSaveArea(**values)


_PAGES: dict[tuple[Any, ...], bytes] = {}
_PAGES_MAX = 64


def vmsa_page(vm: Vm, vcpu: Vcpu) -> bytes:
    """``sync_vmsa(vm, vcpu).encode()``: the same page (and the same refusal), memoised by every value
    :func:`sync_vmsa` reads -- a launch's APs share one reset state, and launches of one kind of VM
    share theirs, so the encoding is made once per distinct state."""
    arch, vmcb = vcpu.arch, vcpu.vmcb
    fpu = arch.fpu
    key = (arch.guest_debug, arch.dr7, tuple(arch.segments.items()), vmcb.efer, vmcb.cr4, vmcb.cr3, vmcb.cr0,
           vmcb.rflags, arch.g_pat, tuple(vmcb.regs.items()), vmcb.rip, arch.xcr0, arch.pkru, arch.xss, arch.dr6,
           vm.vmsa_features, vm.vm_type is KvmVmType.DEFAULT_VM, fpu.fcw, fpu.fsw, fpu.ftw, fpu.fop, fpu.rip,
           fpu.rdp, fpu.mxcsr, bytes(fpu.st), bytes(fpu.xmm), bytes(fpu.ymm))
    page = _PAGES.get(key)
    if page is None:
        page = sync_vmsa(vm, vcpu).encode()  # (refuses a debugged vCPU: never memoised)
        if len(_PAGES) >= _PAGES_MAX:
            _PAGES.clear()
        _PAGES[key] = page
    return page


def launch_update_vmsa(host: SevHost, vm: Vm) -> None:
    """KVM_SEV_LAUNCH_UPDATE_VMSA: every vCPU's VMSA measured and encrypted; its state is protected."""
    host.need_es(vm)
    for vcpu in vm.vcpus:
        page = vmsa_page(vm, vcpu)
        spa = vm.vmsa_page(vcpu.index)
        host.core.host_write(spa, page)
        host.core.clflush_range(spa, VMSA_PAGE_SIZE)
        host.issue(CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=vm.handle, paddr=spa, len=VMSA_PAGE_SIZE))
        vcpu.guest_state_protected = True
        vcpu.vmcb.sev_es_enable = True
        vcpu.vmcb.vmsa_pa = spa  # the VMCB's VMSA pointer (sev_es_init_vmcb)


def _vmsa(host: SevHost, vm: Vm, vcpu: int) -> int:
    """SPA of vCPU ``vcpu``'s VMSA page, with the C-bit (``-EINVAL`` for a vCPU that does not exist)."""
    host.need_context(vm)
    host.need_es(vm)
    if not 0 <= vcpu < len(vm.vcpus):
        raise SevInputError(Errno.EINVAL, f"{vm.name} has no vCPU {vcpu}")
    return vm.vmsa_page(vcpu) | host.caps.me_mask


def send_update_vmsa(host: SevHost, vm: Vm, vcpu: int, hdr_len: int, trans_len: int) -> Reply:
    """SEND_UPDATE_VMSA of one vCPU: (header, transport buffer)."""
    guest = _vmsa(host, vm, vcpu)
    return host.send_packet(CommandId.SEND_UPDATE_VMSA, vm, guest, VMSA_PAGE_SIZE, hdr_len, trans_len)


def receive_update_vmsa(host: SevHost, vm: Vm, vcpu: int, hdr: bytes, trans: bytes) -> None:
    """RECEIVE_UPDATE_VMSA of one vCPU; its state is protected from then on."""
    guest = _vmsa(host, vm, vcpu)
    host.receive_packet(CommandId.RECEIVE_UPDATE_VMSA, vm, guest, VMSA_PAGE_SIZE, hdr, trans)
    target = vm.vcpus[vcpu]
    target.guest_state_protected = True
    target.vmcb.sev_es_enable = True
    target.vmcb.vmsa_pa = vm.vmsa_page(vcpu)
