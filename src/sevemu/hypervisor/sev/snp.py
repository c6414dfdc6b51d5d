"""The host side of SEV-SNP, as Linux 6.11+ does it (``drivers/crypto/ccp/sev-dev.c``
``__sev_snp_init_locked``; ``arch/x86/kvm/svm/sev.c`` ``snp_launch_start`` / ``snp_launch_update`` /
``sev_gmem_post_populate`` / ``snp_launch_update_vmsa`` / ``snp_launch_finish`` /
``snp_decommission_context``; ``arch/x86/virt/svm/sev.c`` ``rmp_make_private`` / ``rmp_make_shared``;
Documentation/virt/kvm/x86/amd-memory-encryption.rst).

Bring-up (:func:`platform_init`): SYSCFG.SNP_EN on every core, SNP_INIT, WBINVD, SNP_DF_FLUSH -- before
the legacy INIT, which must come second.  From then on ASID flushes use SNP_DF_FLUSH.

A VM of type ``KVM_X86_SNP_VM`` becomes an SNP guest with KVM_SEV_INIT2 (:func:`guest_init2`: an SEV-ES
context, an SEV-ES ASID, ``vmsa_features`` | SNP_ACTIVE, GHCB version 2 unless asked otherwise, never 1).
Its memory is private, guest_memfd-style: the VMM has no mapping of it (:meth:`Vm.host_read` /
``host_write`` refuse a private GPA); only KVM writes a page, once, when it populates it for
KVM_SEV_SNP_LAUNCH_UPDATE, before the page becomes the guest's in the RMP.

KVM_SEV_SNP_LAUNCH_START (:func:`launch_start`): ``-ENOTTY`` unless an SNP VM, ``-EINVAL`` for a second
start, ``flags``, policy bits outside Linux's ``SNP_POLICY_MASK_VALID`` (ABI, SMT, MBO, DEBUG,
SINGLE_SOCKET), SMT or MBO clear, or SINGLE_SOCKET set; then a firmware page for the context
(RMPUPDATE assigned/immutable, ``rmp_mark_pages_firmware``), SNP_GCTX_CREATE, SNP_LAUNCH_START and
SNP_ACTIVATE on the VM's ASID; a firmware refusal is ``-EIO`` with the status and the context is
decommissioned and its page reclaimed.

KVM_SEV_SNP_LAUNCH_UPDATE (:func:`launch_update`): ``-EINVAL`` without a started context, for a length
that is zero or not a multiple of 4 KiB, flags, a page type KVM does not take (VMSA: KVM's own), a range
outside guest RAM or a page already private; then per page: copy the user's data (none for ZERO) into
the page, RMPUPDATE to Pre-Guest (GPA, ASID, immutable), SNP_LAUNCH_UPDATE.  On a refusal the page is
reclaimed (SNP_PAGE_RECLAIM, RMPUPDATE shared); for a CPUID page the firmware's corrected table is
copied back to the user buffer; ``-EIO`` with the status.  ``gfn_start``, ``uaddr`` and ``len`` are
advanced past the pages done.  Huge folios (model choice, ``Vm.huge_pages``, on by default; Linux 6.11's
``sev_gmem_post_populate`` works in 4 KiB pages, guest_memfd huge-page support hands 2 MiB folios): a
2 MiB-aligned stretch of 512 NORMAL / ZERO / UNMEASURED pages of the update whose region is not backed yet
is backed by one host huge page (mapped by a 2 MiB NPT leaf), RMPUPDATEd as one 2 MiB Pre-Guest page and
given to the firmware in one 2 MiB SNP_LAUNCH_UPDATE -- which measures it as the same 512 PAGE_INFOs, so
the launch digest is the one of 4 KiB pages.  A later 4 KiB page-state change or RMP size fault in the
region PSMASHes it (:mod:`sevemu.hypervisor.psc`).

KVM_SEV_SNP_LAUNCH_FINISH (:func:`launch_finish`): every vCPU's VMSA (``sev_es_sync_vmsa``) made a
Pre-Guest page at GPA 0xFFFFFFFFF000 and measured (SNP_LAUNCH_UPDATE type VMSA), BSP first; then the ID
block and auth page when ``id_block_en`` (``psp_copy_user_blob``), host data, SNP_LAUNCH_FINISH.

Teardown (:func:`decommission`): WBINVD, SNP_DECOMMISSION, the context page reclaimed, every private
page and VMSA page back to the hypervisor (SNP_PAGE_RECLAIM where still immutable, then RMPUPDATE
shared) before the pages go back to the host allocator; the ASID awaits WBINVD + SNP_DF_FLUSH.
"""

from __future__ import annotations

from typing import Final

from sevemu._util.units import LINE, PAGE, PAGE_2M
from sevemu.abi.commands import CommandId
from sevemu.abi.cpuid import Msr, SysCfg
from sevemu.abi.rmp import RmpResult
from sevemu.abi.snp import (
    PADDR_PAGE_SIZE_2M,
    VMSA_GPA,
    SnpActivateCmd,
    SnpAddrCmd,
    SnpCommitCmd,
    SnpConfigCmd,
    SnpConfigFlags,
    SnpLaunchFinishCmd,
    SnpLaunchFinishFlags,
    SnpLaunchStartCmd,
    SnpLaunchUpdateCmd,
    SnpLaunchUpdateFlags,
    SnpPageCmd,
    SnpPageType,
    SnpPlatformStatus,
    SnpVlekLoadCmd,
)
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.abi.vmsa import SevFeatures
from sevemu.hw.host import HostSoc
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError, SevStateError
from sevemu.hypervisor.sev.common import SevHost
from sevemu.hypervisor.sev.es import vmsa_page
from sevemu.hypervisor.sev.legacy import LegacySev
from sevemu.hypervisor.uapi import (
    GHCB_VERSION_MAX,
    KVM_SEV_SNP_FINISH_DATA_SIZE,
    KVM_SEV_SNP_ID_AUTH_SIZE,
    KVM_SEV_SNP_ID_BLOCK_SIZE,
    KVM_SEV_SNP_PAGE_TYPES,
    KvmSevInit,
    KvmSevSnpLaunchFinish,
    KvmSevSnpLaunchStart,
    KvmSevSnpLaunchUpdate,
    copy_from_user,
)
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vm, VmState

_SUBPAGES: Final = PAGE_2M // PAGE
_HUGE_TYPES: Final = frozenset({SnpPageType.NORMAL, SnpPageType.ZERO, SnpPageType.UNMEASURED})
"""Page types a 2 MiB SNP_LAUNCH_UPDATE may carry (VMSA, SECRETS and CPUID pages are 4 KiB only)."""

_CMD_ADDRESS: Final = SnpLaunchUpdateCmd.offset_of("address")

__all__ = [
    "SNP_POLICY_MASK_VALID",
    "commit",
    "decommission",
    "guest_init2",
    "launch_finish",
    "launch_start",
    "launch_update",
    "platform_init",
    "platform_status",
    "rmp_make_private",
    "rmp_make_shared",
    "set_config",
]

_SMT, _MBO, _DEBUG, _SINGLE_SOCKET = 1 << 16, 1 << 17, 1 << 19, 1 << 20
SNP_POLICY_MASK_VALID = 0xFFFF | _SMT | _MBO | _DEBUG | _SINGLE_SOCKET
"""Linux's ``SNP_POLICY_MASK_VALID``: the policy bits KVM passes on."""


def snp_enable(soc: HostSoc) -> None:
    """SYSCFG.SNP_EN on every core, as Linux does at boot when the BIOS reserved the RMP
    (arch/x86/virt/svm/sev.c ``snp_rmptable_init`` -> ``__snp_enable``; VMPL_EN is set from reset
    in the model).  The firmware stays as it was: SNP_INIT is the driver's business."""
    syscfg = soc.rdmsr(Msr.SYSCFG)
    if not syscfg & SysCfg.SNP_EN:
        soc.wrmsr(Msr.SYSCFG, syscfg | int(SysCfg.SNP_EN))


def platform_init(host: SevHost) -> None:
    """SNP_EN on every core, SNP_INIT, WBINVD, SNP_DF_FLUSH (``__sev_snp_init_locked``)."""
    soc = host.soc
    snp_enable(soc)
    host.issue_nobuf(CommandId.SNP_INIT)
    soc.wbinvd_all()
    host.issue_nobuf(CommandId.SNP_DF_FLUSH)
    host.snp = True


# ---- /dev/sev (sev-dev.c sev_ioctl_do_snp_platform_status / _snp_commit / _snp_set_config) ------
def platform_status(host: SevHost) -> SnpPlatformStatus:
    """SNP_PLATFORM_STATUS into a page the firmware may write (a Firmware page once SNP is
    initialised, reclaimed after: ``rmp_mark_pages_firmware`` / ``snp_reclaim_pages``)."""
    page = host.tables.alloc()
    try:
        if host.snp:
            rmp_make_private(host, page, 0, 0, True)
        try:
            host.issue(CommandId.SNP_PLATFORM_STATUS, SnpAddrCmd(address=page))
        finally:
            if host.snp:
                _reclaim(host, page)
        return SnpPlatformStatus.decode(host.core.host_read(page, SnpPlatformStatus.SIZE))
    finally:
        host.tables.free(page)


def commit(host: SevHost) -> None:
    """SNP_COMMIT: ``-ENXIO`` before SNP_INIT."""
    if not host.snp:
        raise SevStateError(Errno.ENXIO, "SNP is not initialised")
    host.issue(CommandId.SNP_COMMIT, SnpCommitCmd())


def set_config(host: SevHost, reported_tcb: int, mask_chip_id: bool, mask_chip_key: bool) -> None:
    """SNP_CONFIG (SNP_SET_CONFIG): ``-EINVAL`` before SNP_INIT."""
    if not host.snp:
        raise SevStateError(Errno.EINVAL, "SNP is not initialised")
    cfg = SnpConfigCmd(reported_tcb=reported_tcb, flags=SnpConfigFlags(mask_chip_id=mask_chip_id,
                                                                       mask_chip_key=mask_chip_key))
    host.issue(CommandId.SNP_CONFIG, cfg)


def vlek_load(host: SevHost, wrapped: bytes) -> None:
    """SNP_VLEK_LOAD of the wrapped hashstick ``wrapped`` (sev-dev.c ``sev_ioctl_do_snp_vlek_load``:
    the blob in a kernel buffer -- a Hypervisor page the firmware reads): ``-EINVAL`` before SNP_INIT
    (as SNP_SET_CONFIG here)."""
    if not host.snp:
        raise SevStateError(Errno.EINVAL, "SNP is not initialised")
    page = host.tables.alloc()
    try:
        host.core.host_write(page, bytes(wrapped))
        host.core.clflush_range(page, PAGE)
        host.issue(CommandId.SNP_VLEK_LOAD, SnpVlekLoadCmd(vlek_wrapped_address=page))
    finally:
        host.tables.free(page)


def _issue(host: SevHost, cmd: CommandId, buf: Struct) -> None:
    """``sev_issue_cmd`` of a command whose buffer KVM does not read back: :meth:`SevHost.issue`'s
    status check (SevFirmwareError), without reading and decoding the buffer the firmware left."""
    status, _ = host.psp.raw(cmd, buf.encode(), reply=False)
    if status != Status.SUCCESS:
        raise SevFirmwareError(cmd.name, status)


# ---- the RMP, as arch/x86/virt/svm/sev.c drives it ------------------------------------------------
def _rmpupdate(host: SevHost, spa: int, gpa: int = 0, assigned: int = 0, pagesize: int = 0, immutable: int = 0,
               asid: int = 0) -> None:
    """RMPUPDATE of ``spa`` to the state with these fields (:class:`~sevemu.abi.rmp.RmpUpdateState`'s)."""
    rc = host.core.rmpupdate_fields(spa, gpa, assigned, pagesize, immutable, asid)
    if rc != RmpResult.SUCCESS:
        raise SevStateError(Errno.EIO, f"RMPUPDATE of {spa:#x} failed: {RmpResult(rc).name}")


def rmp_make_private(host: SevHost, spa: int, gpa: int, asid: int, immutable: bool) -> None:
    _rmpupdate(host, spa, gpa, 1, 0, int(immutable), asid)


def rmp_make_shared(host: SevHost, spa: int) -> None:
    _rmpupdate(host, spa)


def _reclaim(host: SevHost, spa: int) -> None:
    """``snp_page_reclaim`` + ``rmp_make_shared``: SNP_PAGE_RECLAIM where the page is immutable."""
    entry = host.soc.rmp_entry(spa)
    if entry.page_size:  # a 2 MiB page: reclaimed and returned whole (any of its pages names it)
        spa &= ~(PAGE_2M - 1)
    if entry.immutable:
        host.issue(CommandId.SNP_PAGE_RECLAIM, SnpPageCmd(paddr=spa | (PADDR_PAGE_SIZE_2M if entry.page_size else 0)))
    if entry.assigned or entry.immutable:
        _rmpupdate(host, spa, pagesize=entry.page_size)


# ---- KVM ------------------------------------------------------------------------------------------
def need_snp(vm: Vm, errno: Errno = Errno.ENOTTY) -> None:
    """``sev_snp_guest(kvm)``: ``errno`` unless the VM is an SNP guest."""
    if not vm.snp:
        raise SevStateError(errno, f"{vm.name} is not an SEV-SNP guest")


def guest_init2(host: LegacySev, vm: Vm, data: KvmSevInit) -> None:
    """KVM_SEV_INIT2 for a ``KVM_X86_SNP_VM`` (module docstring)."""
    if vm.vm_type is not KvmVmType.SNP_VM or not vm.need_init:
        raise SevStateError(Errno.EINVAL, f"{vm.name} ({vm.vm_type.name}) takes no SNP KVM_SEV_INIT2")
    if not host.snp:
        raise SevStateError(Errno.EINVAL, "SEV-SNP is not initialised on this host")
    if data.ghcb_version == 1:
        raise SevInputError(Errno.EINVAL, "an SNP guest needs GHCB protocol version 2")
    host.guest_init(vm, es=True, init2=True, vmsa_features=data.vmsa_features, flags=data.flags,
                    ghcb_version=data.ghcb_version or GHCB_VERSION_MAX)
    vm.snp = True
    vm.vmsa_features |= int(SevFeatures.SNP_ACTIVE)


def launch_start(host: SevHost, vm: Vm, p: KvmSevSnpLaunchStart) -> None:
    """KVM_SEV_SNP_LAUNCH_START (module docstring)."""
    need_snp(vm)
    if vm.snp_context:
        raise SevStateError(Errno.EINVAL, f"{vm.name} already has an SNP context")
    if p.flags:
        raise SevInputError(Errno.EINVAL, f"flags {p.flags:#x}: none is defined")
    if p.policy & ~SNP_POLICY_MASK_VALID or not p.policy & _SMT or not p.policy & _MBO or p.policy & _SINGLE_SOCKET:
        raise SevInputError(Errno.EINVAL, f"policy {p.policy:#x}: KVM needs SMT and bit 17, takes only "
                                          f"{SNP_POLICY_MASK_VALID:#x} and no SINGLE_SOCKET")
    if len(p.gosvw) != 16:
        raise SevInputError(Errno.EINVAL, "gosvw is 16 bytes")
    gctx = host.tables.alloc()
    rmp_make_private(host, gctx, 0, 0, True)  # rmp_mark_pages_firmware
    try:
        _issue(host, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=gctx))
    except SevFirmwareError:
        rmp_make_shared(host, gctx)  # still a Firmware page: snp_free_firmware_page reclaims it
        host.tables.free(gctx)
        raise
    vm.snp_context = gctx
    try:
        _issue(host, CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd(gctx_paddr=gctx, policy=p.policy, gosvw=bytes(p.gosvw)))
        _issue(host, CommandId.SNP_ACTIVATE, SnpActivateCmd(gctx_paddr=gctx, asid=vm.asid))
    except SevFirmwareError:
        _free_context(host, vm)
        raise
    vm.policy = p.policy
    vm.handle = 0


def _free_context(host: SevHost, vm: Vm) -> None:
    """``snp_decommission_context``: SNP_DECOMMISSION, the context page reclaimed and freed."""
    gctx = vm.snp_context
    if not gctx:
        return
    host.issue(CommandId.SNP_DECOMMISSION, SnpAddrCmd(address=gctx))
    _reclaim(host, gctx)
    host.tables.free(gctx)
    vm.snp_context = 0


_CMDS: dict[tuple[int, int, bool], bytes] = {}


def _update_cmd(gctx: int, ptype: SnpPageType, huge: bool) -> bytearray:
    """The SNP_LAUNCH_UPDATE buffer of a page of ``ptype`` (4 KiB or 2 MiB) for the context ``gctx``, its
    address zero (the bytes SevHost.issue would write, with the zeros PspDriver.raw stores after them to
    the end of the line; encoded once per kind, the address patched in)."""
    key = (gctx, int(ptype), huge)
    raw = _CMDS.get(key)
    if raw is None:
        if len(_CMDS) >= 64:
            _CMDS.clear()
        raw = _CMDS[key] = SnpLaunchUpdateCmd(gctx_paddr=gctx, flags=SnpLaunchUpdateFlags(
            page_type=int(ptype), page_size=huge)).encode().ljust(LINE, b"\0")
    return bytearray(raw)


def launch_update(host: SevHost, vm: Vm, p: KvmSevSnpLaunchUpdate) -> None:
    """KVM_SEV_SNP_LAUNCH_UPDATE (module docstring)."""
    if not vm.snp or not vm.snp_context:
        raise SevStateError(Errno.EINVAL, f"{vm.name} has no SNP context (KVM_SEV_SNP_LAUNCH_START first)")
    if not p.len or p.len % PAGE or p.flags or p.type not in KVM_SEV_SNP_PAGE_TYPES:
        raise SevInputError(Errno.EINVAL, f"len {p.len:#x}, flags {p.flags:#x}, type {p.type}: "
                                          f"KVM takes a non-zero multiple of 4 KiB of types {sorted(KVM_SEV_SNP_PAGE_TYPES)}")
    ptype = SnpPageType(p.type)
    src: bytes | None = None
    if ptype != SnpPageType.ZERO:
        if not isinstance(p.uaddr, (bytes, bytearray)) or len(p.uaddr) < p.len:
            raise SevInputError(Errno.EFAULT, f"user buffer shorter than the {p.len} bytes claimed")
        src = bytes(p.uaddr[: p.len])  # kvm_gmem_populate reads the user pages directly
    gpa0 = p.gfn_start * PAGE
    if gpa0 < 0 or gpa0 + p.len > vm.memory:
        raise SevInputError(Errno.EINVAL, f"GFNs {p.gfn_start:#x}+{p.len // PAGE} are not in a private memslot")
    done = 0
    pages = p.len // PAGE
    # The command buffer of each page differs only in its address (a 4 KiB and a 2 MiB variant): encoded
    # once, the address patched in per page (the bytes SevHost.issue would write; the reply is unused).
    cmds = [_update_cmd(vm.snp_context, ptype, False), bytearray()]  # (whole 64-byte lines, as raw stores them)
    at = slice(_CMD_ADDRESS, _CMD_ADDRESS + 8)
    me_mask = host.caps.me_mask
    rmp_assigned = host.soc.rmp_assigned
    rmpupdate = host.core.rmpupdate_fields
    write_page = host.core.host_write_stream
    issue = host.psp.raw
    private = vm.private_spas
    asid = vm.asid
    may_huge = ptype in _HUGE_TYPES and vm.huge_pages
    backed: list[int] = []  # SPAs of the 4 KiB pages from ``done`` on, backed a stretch at a time
    first_backed = 0
    try:
        while done < pages:
            gpa = gpa0 + done * PAGE
            huge = (may_huge and not gpa % PAGE_2M and pages - done >= _SUBPAGES
                    and vm.back_huge(gpa))
            if huge:  # a 2 MiB folio: one RMPUPDATE and one SNP_LAUNCH_UPDATE for its 512 pages
                spa = huge
                if src is not None:
                    write_page(spa, src[done * PAGE : done * PAGE + PAGE_2M])  # kvm_gmem_populate: the kernel fills it
            else:
                if done - first_backed >= len(backed):  # back up to the next 2 MiB boundary in one step
                    end = min(pages, done + (_SUBPAGES - (gpa // PAGE) % _SUBPAGES))
                    gpas = range(gpa, gpa0 + end * PAGE, PAGE)
                    backed = vm.back_pages(list(gpas))
                    first_backed = done
                spa = backed[done - first_backed]
                if spa in private or rmp_assigned(spa):
                    raise SevInputError(Errno.EINVAL, f"GPA {gpa:#x} is already private")
                if src is not None:  # (ZERO: no source; the firmware writes the zeros)
                    write_page(spa, src[done * PAGE : (done + 1) * PAGE])
            # ... then it is the guest's (RmpUpdateState's fields: gpa, assigned, pagesize, immutable, asid)
            rc = rmpupdate(spa, gpa, 1, 1 if huge else 0, 1, asid)
            if rc != RmpResult.SUCCESS:
                raise SevStateError(Errno.EIO, f"RMPUPDATE of {spa:#x} failed: {RmpResult(rc).name}")
            if huge and not cmds[1]:
                cmds[1] = _update_cmd(vm.snp_context, ptype, True)
            cmd = cmds[1 if huge else 0]
            cmd[at] = (spa | me_mask).to_bytes(8, "little")
            status, _ = issue(CommandId.SNP_LAUNCH_UPDATE, bytes(cmd), reply=False)
            if status != Status.SUCCESS:
                e = SevFirmwareError(CommandId.SNP_LAUNCH_UPDATE.name, status)
                fixed = host.core.host_read(spa, PAGE)  # a CPUID page: the firmware's corrections
                _reclaim(host, spa)
                if ptype == SnpPageType.CPUID and e.status == Status.INVALID_PARAM and isinstance(p.uaddr, bytearray):
                    p.uaddr[done * PAGE : (done + 1) * PAGE] = fixed
                raise SevStateError(Errno.EIO, f"SNP_LAUNCH_UPDATE of GPA {gpa:#x}: {e}", e.status) from None
            if huge:
                private.update(range(spa, spa + PAGE_2M, PAGE))
                done += _SUBPAGES
            else:
                private.add(spa)
                done += 1
    finally:
        p.gfn_start += done
        p.len -= done * PAGE
        if ptype != SnpPageType.ZERO and done and isinstance(p.uaddr, (bytes, bytearray)):
            p.uaddr = p.uaddr[done * PAGE :]


def launch_finish(host: SevHost, vm: Vm, p: KvmSevSnpLaunchFinish) -> None:
    """KVM_SEV_SNP_LAUNCH_FINISH (module docstring)."""
    need_snp(vm)
    if not vm.snp_context:
        raise SevStateError(Errno.EINVAL, f"{vm.name} has no SNP context")
    if p.flags:
        raise SevInputError(Errno.EINVAL, f"flags {p.flags:#x}: none is defined")
    if len(p.host_data) != KVM_SEV_SNP_FINISH_DATA_SIZE:
        raise SevInputError(Errno.EINVAL, "host_data is 32 bytes")
    for vcpu in sorted(vm.vcpus, key=lambda v: v.index != 0):  # the BSP first
        page = vmsa_page(vm, vcpu)
        spa = vm.vmsa_page(vcpu.index)
        if host.soc.rmp_assigned(spa):
            continue  # measured by an earlier, failed FINISH
        host.core.host_write_stream(spa, page)  # as written, then CLFLUSHed (the firmware reads DRAM)
        rmp_make_private(host, spa, VMSA_GPA, vm.asid, True)
        cmd = _update_cmd(vm.snp_context, SnpPageType.VMSA, False)  # (launch_update's buffer, a VMSA page's)
        cmd[_CMD_ADDRESS : _CMD_ADDRESS + 8] = (spa | host.caps.me_mask).to_bytes(8, "little")
        status, _ = host.psp.raw(CommandId.SNP_LAUNCH_UPDATE, bytes(cmd), reply=False)  # (the reply is unused)
        if status != Status.SUCCESS:
            _reclaim(host, spa)
            raise SevFirmwareError(CommandId.SNP_LAUNCH_UPDATE.name, status)
        vcpu.guest_state_protected = True
        vcpu.vmcb.sev_es_enable = True
        vcpu.vmcb.vmsa_pa = spa  # sev_es_init_vmcb: the VMCB's VMSA pointer
        vcpu.vmcb.sev_features = vm.vmsa_features  # SNP_ACTIVE: VMRUN checks the page in the RMP
    flags = SnpLaunchFinishFlags(id_block_en=bool(p.id_block_en), auth_key_en=bool(p.id_block_en and p.auth_key_en),
                                 vcek_disabled=bool(p.vcek_disabled))
    id_block = id_auth = 0
    if p.id_block_en:
        block = copy_from_user(p.id_block_uaddr, KVM_SEV_SNP_ID_BLOCK_SIZE)
        auth = copy_from_user(p.id_auth_uaddr, KVM_SEV_SNP_ID_AUTH_SIZE)
        id_block, id_auth = host.psp.data_spa, host.psp.data_spa + PAGE
        host.core.host_write(id_block, block)
        host.core.host_write(id_auth, auth)
    _issue(host, CommandId.SNP_LAUNCH_FINISH, SnpLaunchFinishCmd(
        gctx_paddr=vm.snp_context, id_block_paddr=id_block, id_auth_paddr=id_auth, flags=flags,
        host_data=bytes(p.host_data)))
    vm.state = VmState.RUNNING


def decommission(host: SevHost, vm: Vm) -> None:
    """Teardown of an SNP VM (module docstring)."""
    host.soc.wbinvd_all()
    activated = bool(vm.snp_context)
    _free_context(host, vm)
    for spa in sorted(vm.private_spas | set(vm.vmsa_pages.values())):
        _reclaim(host, spa)
    vm.private_spas.clear()
    host.asids.free(vm.asid, activated=activated)
