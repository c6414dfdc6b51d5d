"""The host side of the SEV-ES commands of the legacy API: VMSAs (SEV API 55766, LAUNCH_UPDATE_VMSA,
SEND_UPDATE_VMSA, RECEIVE_UPDATE_VMSA; APM2 15.35).

An SEV-ES vCPU's register state lives in a VMSA page the firmware encrypts with the guest's key.
``launch_update_vmsa`` builds each vCPU's page from its save area (Linux arch/x86/kvm/svm/sev.c
``sev_es_sync_vmsa``), flushes it and has the firmware measure and encrypt it; the VMSA transfers
move one vCPU's page through a transport packet (AMD's out-of-tree KVM layout: ``vcpu_id`` plus
header and transport buffers; upstream KVM defines the ids but refuses them).  The pages come from
the host's table pages and go back when the VM is destroyed (:meth:`~sevemu.hypervisor.vm.Vm.release`).
"""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import LaunchUpdateDataCmd
from sevemu.abi.vmsa import VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.hypervisor.errors import Errno, SevInputError
from sevemu.hypervisor.sev.common import Reply, SevHost
from sevemu.hypervisor.vm import Vcpu, Vm

__all__ = ["launch_update_vmsa", "receive_update_vmsa", "send_update_vmsa", "vmsa_page"]

_DR6_RESET = 0xFFFF0FF0
_DR7_RESET = 0x400
_PAT_RESET = 0x0007040600070406


def vmsa_page(vcpu: Vcpu) -> bytes:
    """``sev_es_sync_vmsa``: the vCPU's save area as a VMSA page."""
    v = vcpu.vmcb
    regs = v.regs
    area = SevEsSaveArea(
        efer=v.efer, cr4=v.cr4, cr3=v.cr3, cr0=v.cr0, dr7=_DR7_RESET, dr6=_DR6_RESET,
        rflags=v.rflags, rip=v.rip, rsp=regs["rsp"], rax=regs["rax"], rcx=regs["rcx"],
        rdx=regs["rdx"], rbx=regs["rbx"], rbp=regs["rbp"], rsi=regs["rsi"], rdi=regs["rdi"],
        r8=regs["r8"], r9=regs["r9"], r10=regs["r10"], r11=regs["r11"], r12=regs["r12"],
        r13=regs["r13"], r14=regs["r14"], r15=regs["r15"], xcr0=1, g_pat=_PAT_RESET,
    )
    return area.encode()


def _vmsa(host: SevHost, vm: Vm, vcpu: int) -> int:
    """SPA of vCPU ``vcpu``'s VMSA page, with the C-bit (``-EINVAL`` for a vCPU that does not exist)."""
    host.need_context(vm)
    host.need_es(vm)
    if not 0 <= vcpu < len(vm.vcpus):
        raise SevInputError(Errno.EINVAL, f"{vm.name} has no vCPU {vcpu}")
    return vm.vmsa_page(vcpu) | host.caps.me_mask


def launch_update_vmsa(host: SevHost, vm: Vm) -> None:
    """KVM_SEV_LAUNCH_UPDATE_VMSA: every vCPU's VMSA measured and encrypted; its state is protected."""
    host.need_es(vm)
    for vcpu in vm.vcpus:
        spa = vm.vmsa_page(vcpu.index)
        host.core.host_write(spa, vmsa_page(vcpu))
        host.core.clflush_range(spa, VMSA_PAGE_SIZE)
        host.issue(CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=vm.handle, paddr=spa, len=VMSA_PAGE_SIZE))
        vcpu.vmcb.sev_es_enable = True  # guest_state_protected


def send_update_vmsa(host: SevHost, vm: Vm, vcpu: int, hdr_len: int, trans_len: int) -> Reply:
    """SEND_UPDATE_VMSA of one vCPU: (header, transport buffer)."""
    guest = _vmsa(host, vm, vcpu)
    return host.send_packet(CommandId.SEND_UPDATE_VMSA, vm, guest, VMSA_PAGE_SIZE, hdr_len, trans_len)


def receive_update_vmsa(host: SevHost, vm: Vm, vcpu: int, hdr: bytes, trans: bytes) -> None:
    """RECEIVE_UPDATE_VMSA of one vCPU; its state is protected from then on."""
    guest = _vmsa(host, vm, vcpu)
    host.receive_packet(CommandId.RECEIVE_UPDATE_VMSA, vm, guest, VMSA_PAGE_SIZE, hdr, trans)
    vm.vcpus[vcpu].vmcb.sev_es_enable = True
