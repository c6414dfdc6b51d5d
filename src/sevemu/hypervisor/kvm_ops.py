"""``KVM_MEMORY_ENCRYPT_OP``: the SEV sub-commands KVM offers user space (Linux arch/x86/kvm/svm/sev.c
``svm_mem_enc_op``; include/uapi/linux/kvm.h ``enum sev_cmd_id`` and ``struct kvm_sev_*``;
Documentation/virt/kvm/x86/amd-memory-encryption.rst).

A VMM (QEMU) drives an SEV guest through ``ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, struct kvm_sev_cmd
{u32 id; u64 data; u32 error; u32 sev_fd})``.  :class:`KvmSev` is that interface for one
:class:`~sevemu.hypervisor.vm.Vm`: :meth:`KvmSev.memory_encrypt_op` takes a :class:`KvmSevCmd` (or
a sub-command id and its argument structure, or a mapping of its fields) and returns 0 or a
negative errno; ``error`` carries the firmware status when the firmware refused (``-EIO``).  It is a
thin wrapper: what each sub-command checks, copies in, runs and copies out is its row of the
command table (:mod:`sevemu.hypervisor.ioctl`), and the work is the SEV flows'
(:mod:`sevemu.hypervisor.sev`), the same the Python API and ``/dev/sev`` use.  Sub-commands follow KVM:

======================  ====================================================================
INIT / ES_INIT          SEV (ES) context for a ``KVM_X86_DEFAULT_VM`` (``-EINVAL`` for another
                        type): platform INIT (+ WBINVD, DF_FLUSH) if needed; before any vCPU
                        exists (``-EINVAL``), once (``-EBUSY``).  ES_INIT: ``-ENOTTY`` without
                        SEV-ES on this CPU; GHCB protocol version 1.
INIT2                   ``struct kvm_sev_init`` for a VM created as ``KVM_X86_SEV_VM`` /
                        ``KVM_X86_SEV_ES_VM`` (``-EINVAL`` for any other, or once done; NULL
                        data ``-EFAULT``): ``flags``, unsupported ``vmsa_features``, a GHCB
                        version above 2 (any for SEV), existing vCPUs: ``-EINVAL``.
LAUNCH_START            copies GODH cert and session blobs, LAUNCH_START through ``sev_fd``
                        (``-EBADF`` without one), ACTIVATE the VM's ASID (DECOMMISSION if that
                        fails), the handle back in ``handle``.
LAUNCH_UPDATE_DATA      pins the guest range, CLFLUSHes it (on every generation: see
                        ``SevHost.clflush_pages``), one firmware command per physically
                        contiguous run, exact lengths.
LAUNCH_UPDATE_VMSA      SEV-ES only (``-ENOTTY`` for an SEV guest): each vCPU's whole save area
                        into a VMSA page (``sev_es_sync_vmsa``; FPU only for INIT2 VMs; DR7
                        other than 0x400 ``-EINVAL``), CLFLUSH, LAUNCH_UPDATE_VMSA with ``len``
                        = 4096, in vCPU order; the vCPUs' state is protected afterwards.
LAUNCH_MEASURE          ``len`` 0 queries the length: the firmware's INVALID_LENGTH answer, with
                        the required length written back into ``len`` (``-EIO``).
LAUNCH_SECRET           the guest range must be physically contiguous (``-EINVAL``).
LAUNCH_FINISH           the VM becomes runnable.
GUEST_STATUS            handle, policy, state.
DBG_DECRYPT/ENCRYPT     page by page, 16-byte aligned firmware accesses, bounce pages for
                        unaligned ranges, read-modify-write for unaligned DBG_ENCRYPT.
GET_ATTESTATION_REPORT  as LAUNCH_MEASURE, with the caller's ``mnonce``.
SEND_START/UPDATE_DATA  length queries as KVM (``session_len`` 0; ``hdr_len`` or ``trans_len``
                        0); one page at most per update (``-EINVAL`` across a page boundary);
                        guest addresses with the C-bit set.
SEND_FINISH/CANCEL      handle only.
RECEIVE_START/UPDATE_   as KVM; RECEIVE_START binds the ASID like LAUNCH_START.
DATA/FINISH
======================  ====================================================================

Deviations, each documented where it happens:

* user memory: guest RAM is mapped in the VMM at :attr:`KvmSev.ram_base`, so a guest-memory
  ``uaddr`` is an ``int`` (:meth:`KvmSev.hva` of a GPA); any other user pointer is a host buffer --
  ``bytes`` for input, a ``bytearray`` the kernel copies into for output (``None`` = NULL).
* ``KVM_SEV_CERT_EXPORT`` (19), ``SEND_UPDATE_VMSA`` (10) and ``RECEIVE_UPDATE_VMSA`` (14): upstream
  KVM defines the ids but answers ``-EINVAL``.  sevemu implements them: CERT_EXPORT as
  PDH_CERT_EXPORT for the VMM (:class:`KvmSevCertExport`: the fields of /dev/sev's
  ``sev_user_data_pdh_cert_export`` with KVM's ``*_uaddr`` naming), the VMSA transfers with AMD's
  out-of-tree layout (``vcpu_id`` plus header and transport buffers) on SEV-ES guests.
* The model's hypervisor gives a VM its SEV ASID when it creates it; INIT checks that the VM was
  created as an SEV VM, ES_INIT exchanges that ASID for one of the SEV-ES range.
* A blob copied out is as long as what the firmware wrote (Linux copies the whole buffer it
  allocated, zeros after the firmware's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar, overload

from sevemu._util.units import PAGE, PAGE_MASK
from sevemu.hypervisor.errors import Errno, IoctlError
from sevemu.hypervisor.ioctl import Api, Caller, table
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import (
    KVM_MEMORY_ENCRYPT_OP,
    KvmSevAttestationReport,
    KvmSevCertExport,
    KvmSevCmdId,
    KvmSevData,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevInit,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    KvmSevReceiveStart,
    KvmSevReceiveUpdateData,
    KvmSevReceiveUpdateVmsa,
    KvmSevSendStart,
    KvmSevSendUpdateData,
    KvmSevSendUpdateVmsa,
    KvmVmType,
    NoData,
    UserFields,
)
from sevemu.hypervisor.vm import Vm

__all__ = [
    "KVM_MEMORY_ENCRYPT_OP",
    "KvmSev",
    "KvmSevAttestationReport",
    "KvmSevCertExport",
    "KvmSevCmd",
    "KvmSevCmdId",
    "KvmSevDbg",
    "KvmSevGuestStatus",
    "KvmSevInit",
    "KvmSevLaunchMeasure",
    "KvmSevLaunchSecret",
    "KvmSevLaunchStart",
    "KvmSevLaunchUpdateData",
    "KvmSevReceiveStart",
    "KvmSevReceiveUpdateData",
    "KvmSevReceiveUpdateVmsa",
    "KvmSevSendStart",
    "KvmSevSendUpdateData",
    "KvmSevSendUpdateVmsa",
    "KvmVmType",
    "load_image",
]

RAM_BASE: Final = 0x7F00_0000_0000
"""Where the model's VMM maps guest RAM (a typical mmap address; any non-NULL base would do)."""

D = TypeVar("D", bound=KvmSevData)
_TABLE = table(Api.KVM)


@dataclass
class KvmSevCmd:
    """``struct kvm_sev_cmd``: sub-command ``id``, its ``data``, the firmware ``error`` (out), and
    ``sev_fd``, an open ``/dev/sev`` (LAUNCH_START and RECEIVE_START need it)."""

    id: int
    data: KvmSevData | UserFields | None = None
    error: int = 0
    sev_fd: SevDevice | None = None


class KvmSev:
    """The KVM side of one VM's SEV ioctl; the VM's SEV state itself lives in the :class:`Vm`."""

    def __init__(self, hv: Hypervisor, vm: Vm, *, ram_base: int = RAM_BASE) -> None:
        self.hv = hv
        self.vm = vm
        self.ram_base = ram_base
        self.fd: SevDevice | None = None
        """The ``/dev/sev`` LAUNCH_START or RECEIVE_START was issued through (KVM ``sev->fd``)."""
        self.last_error = 0
        """Firmware status of the last sub-command (its ``kvm_sev_cmd.error``)."""
        self.last_cmd: KvmSevCmd | None = None

    # ---- the VM's SEV state (kept once, in the Vm) -----------------------------------------------
    @property
    def active(self) -> bool:
        """The VM has an SEV context (KVM ``sev->active``)."""
        return self.vm.sev_active

    @property
    def es_active(self) -> bool:
        return self.vm.es

    @property
    def handle(self) -> int:
        return self.vm.handle

    @property
    def me_mask(self) -> int:
        """The C-bit (``sev_me_mask``), from CPUID Fn8000_001F."""
        return self.hv.sev.caps.me_mask

    # ---- user memory -------------------------------------------------------------------------
    def hva(self, gpa: int) -> int:
        """The VMM's address of guest-physical ``gpa`` (guest RAM is one mapping at ``ram_base``)."""
        return self.ram_base + gpa

    # ---- entry point ---------------------------------------------------------------------------
    def memory_encrypt_op(self, cmd: KvmSevCmd | int, data: KvmSevData | UserFields | None = None,
                          sev_fd: SevDevice | None = None) -> int:
        """``ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)``: 0 or a negative errno.

        ``cmd`` is a :class:`KvmSevCmd`, or a sub-command id with ``data`` (its structure or a
        mapping of that structure's fields) and ``sev_fd``.  The firmware status is in
        ``cmd.error``; with a bare id, read it from :attr:`last_error`.
        """
        if not isinstance(cmd, KvmSevCmd):
            cmd = KvmSevCmd(int(cmd), data, 0, sev_fd)
        row = _TABLE.get(cmd.id)
        if row is None:
            cmd.error, ret = 0, -int(Errno.EINVAL)
        else:
            caller = Caller(self.hv.sev, self.vm, self.ram_base, sev_fd=isinstance(cmd.sev_fd, SevDevice))
            outcome = row.execute(caller, cmd.data)
            if isinstance(outcome.data, KvmSevData) and not isinstance(outcome.data, NoData):
                cmd.data = outcome.data
            cmd.error, ret = outcome.error, outcome.ret
            if ret == 0 and caller.sev_fd and cmd.id in (KvmSevCmdId.LAUNCH_START, KvmSevCmdId.RECEIVE_START):
                self.fd = cmd.sev_fd
        self.last_error = cmd.error
        self.last_cmd = cmd
        return ret

    @overload
    def op(self, sub: KvmSevCmdId, data: None = None, sev_fd: SevDevice | None = None) -> None: ...
    @overload
    def op(self, sub: KvmSevCmdId, data: D, sev_fd: SevDevice | None = None) -> D: ...
    @overload
    def op(self, sub: KvmSevCmdId, data: UserFields, sev_fd: SevDevice | None = None) -> KvmSevData: ...

    def op(self, sub: KvmSevCmdId, data: KvmSevData | UserFields | None = None,
           sev_fd: SevDevice | None = None) -> KvmSevData | None:
        """Run a sub-command and raise :class:`~sevemu.hypervisor.errors.IoctlError` on failure;
        returns the (updated) argument structure."""
        cmd = KvmSevCmd(int(sub), data, 0, sev_fd)
        rc = self.memory_encrypt_op(cmd)
        if rc < 0:
            raise IoctlError(f"KVM_SEV_{sub.name}", rc, cmd.error)
        return cmd.data if isinstance(cmd.data, KvmSevData) and not isinstance(cmd.data, NoData) else None


def load_image(kvm: KvmSev, image: bytes | str | Path, gpa: int, *, page_by_page: bool = True) -> int:
    """Copy a guest image (bytes, or a file of guest-memory contents such as OVMF) to ``gpa`` as the
    host, then measure it with LAUNCH_UPDATE_DATA -- one sub-command per 4 KiB page by default
    (the launch digest is one running SHA-256, so it equals that of a single call).  0 or -errno.
    """
    data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
    if not data or gpa < 0 or gpa + len(data) > kvm.vm.memory:
        return -Errno.EINVAL
    kvm.vm.back_range(gpa, len(data))
    kvm.vm.host_write(gpa, data)
    step = PAGE if page_by_page else len(data)
    pos = 0
    while pos < len(data):
        n = min(step - ((gpa + pos) & PAGE_MASK) if page_by_page else step, len(data) - pos)
        rc = kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_UPDATE_DATA,
                                   KvmSevLaunchUpdateData(uaddr=kvm.hva(gpa + pos), len=n))
        if rc:
            return rc
        pos += n
    return 0
