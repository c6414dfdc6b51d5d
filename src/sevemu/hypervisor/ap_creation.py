"""SEV-SNP AP creation: the guest starts (or stops) a vCPU with a VMSA it made itself (GHCB 56421
section 4.1.9 "SNP AP Creation", NAE event 0x8000_0013; Linux arch/x86/kvm/svm/sev.c
``sev_snp_ap_creation`` and ``sev_snp_init_protected_guest_state``; the guest's side: Linux
arch/x86/coco/sev ``wakeup_cpu_via_vmgexit``).

An SNP guest's registers live in VMSA pages the host cannot read or write, so the host cannot put an
AP at an entry point the way INIT-SIPI does.  The guest builds the AP's VMSA in a private page of its
own, gives the page the VMSA bit with RMPADJUST (only the guest can: RMPADJUST runs in the guest) and
asks the hypervisor to run that vCPU from it:

* SW_EXITINFO1[31:0] the request (0 create on INIT, 1 create, 2 destroy), [63:32] the target's APIC
  ID (the model's APIC ID is the vCPU index); SW_EXITINFO2 the VMSA's GPA; RAX the SEV_FEATURES the
  VMSA carries (not needed for destroy).
* KVM's checks, in its order: an APIC ID of this VM's vCPUs; RAX equal to the VM's ``vmsa_features``
  (KVM_SEV_INIT2); a page-aligned GPA inside the guest; not 2 MiB aligned (KVM refuses those: the
  SNP erratum of a 2 MiB RMP page colliding with a VMSA's entry).  A refused request is answered with
  SW_EXITINFO1 = 2, SW_EXITINFO2 = ``GHCB_ERR_INVALID_INPUT``; nothing changes.
* CREATE and DESTROY take effect at once (KVM kicks the target with
  ``KVM_REQ_UPDATE_PROTECTED_GUEST_STATE``); CREATE_ON_INIT waits for the target's next INIT
  (:func:`deliver_init`; the model has no local APIC, so the VMM calls it where KVM would see INIT).
  Taking effect: the target stops (not runnable), its VMCB's VMSA pointer is dropped; with a GPA, the
  pointer becomes the guest_memfd page backing it (a private page: a GPA the guest made shared leaves
  the vCPU stopped, as ``kvm_gmem_get_pfn`` fails) and the vCPU is runnable again.

What the host does not check -- the page's RMP entry -- VMRUN checks at every entry (APM2 15.36.12,
:meth:`sevemu.hw.rmp.Rmp.vmsa_check`): a page without the VMSA bit, not validated, or another
guest's, fails VMRUN with VMEXIT_INVALID.  So a hypervisor that points an AP at a page of its choice
gets VMEXIT_INVALID, not a vCPU running the host's registers.

Model choices: the target's "stopped, waiting for AP creation" state is the AP-reset-hold state of
:class:`~sevemu.hypervisor.vm.Vcpu` (``reset_hold``; ``released`` once a VMSA was given).  An engine
that already ran the vCPU keeps its segment and descriptor-table state; the GPRs, RIP, RFLAGS, CR0,
CR3, CR4 and EFER come from the new VMSA at VMRUN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from sevemu._util.units import PAGE, PAGE_2M
from sevemu.abi.ghcb import ApCreationInfo, ApCreationOp, GhcbError, SwExitCode

if TYPE_CHECKING:
    from sevemu.hypervisor.ghcb import GhcbHandler, NaeExit
    from sevemu.hypervisor.vm import Vcpu, Vm

__all__ = ["NO_VMSA", "deliver_init", "install"]

NO_VMSA: Final = 0
"""The VMCB's VMSA pointer of a vCPU KVM stopped (KVM's ``INVALID_PAGE``: VMRUN would fail)."""


def _nae_ap_creation(ex: NaeExit) -> None:
    vm = ex.vm
    if not vm.snp:
        ex.refuse(GhcbError.INVALID_EVENT, "AP creation from a guest that is not an SNP guest")
    info = ApCreationInfo.from_int(ex.info1)
    if info.op != ApCreationOp.DESTROY:
        ex.need("rax")  # sev_es_validate_vmgexit: RAX valid unless DESTROY
    if not 0 <= info.apic_id < len(vm.vcpus):
        ex.refuse(GhcbError.INVALID_INPUT, f"AP creation for APIC ID {info.apic_id:#x}: no such vCPU")
    target = vm.vcpus[info.apic_id]
    if info.op in (ApCreationOp.CREATE, ApCreationOp.CREATE_ON_INIT):
        (rax,) = ex.need("rax")
        if rax != vm.vmsa_features:
            ex.refuse(GhcbError.INVALID_INPUT, f"AP creation: SEV_FEATURES {rax:#x} are not the VM's "
                                               f"({vm.vmsa_features:#x})")
        gpa = ex.info2
        if gpa % PAGE or not 0 <= gpa < vm.memory:
            ex.refuse(GhcbError.INVALID_INPUT, f"AP creation: VMSA GPA {gpa:#x} is not a page of the guest")
        if gpa % PAGE_2M == 0:
            ex.refuse(GhcbError.INVALID_INPUT, f"AP creation: VMSA GPA {gpa:#x} is 2 MiB aligned")
        target.snp_vmsa_gpa = gpa
    elif info.op == ApCreationOp.DESTROY:
        target.snp_vmsa_gpa = None
    else:
        ex.refuse(GhcbError.INVALID_INPUT, f"AP creation request {info.op:#x}")
    target.snp_ap_waiting_for_reset = True
    if info.op != ApCreationOp.CREATE_ON_INIT:
        _update_protected_state(vm, target)


def _update_protected_state(vm: Vm, target: Vcpu) -> None:
    """KVM ``__sev_snp_update_protected_guest_state``: stop the target; run it from the new VMSA."""
    target.snp_ap_waiting_for_reset = False
    target.reset_hold = True  # not runnable (KVM_MP_STATE_HALTED)
    target.vmcb.vmsa_pa = NO_VMSA
    gpa = target.snp_vmsa_gpa
    target.snp_vmsa_gpa = None
    if gpa is None or gpa in vm.shared_gpas:
        return
    target.vmcb.vmsa_pa = vm.back(gpa)  # the guest_memfd page (private: the host has no mapping)
    target.guest_state_protected = True
    target.reset_hold = False  # KVM_MP_STATE_RUNNABLE
    target.released = True
    target.snp_vmsas += 1


def deliver_init(vm: Vm, target: Vcpu) -> bool:
    """INIT reached ``target`` (KVM ``sev_snp_init_protected_guest_state``): a pending CREATE_ON_INIT
    takes effect; True when one did."""
    if not (vm.snp and target.snp_ap_waiting_for_reset):
        return False
    _update_protected_state(vm, target)
    return True


def install(ghcb: GhcbHandler) -> None:
    """Register NAE 0x8000_0013 with ``ghcb``."""
    ghcb.nae_table[SwExitCode.AP_CREATION] = _nae_ap_creation
