"""``KVM_MEMORY_ENCRYPT_OP``: the SEV sub-commands KVM offers user space (Linux arch/x86/kvm/svm/sev.c
``svm_mem_enc_op``; include/uapi/linux/kvm.h ``enum sev_cmd_id`` and ``struct kvm_sev_*``;
reference 1.14).

A VMM (QEMU) drives an SEV guest through ``ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, struct kvm_sev_cmd
{u32 id; u64 data; u32 error; u32 sev_fd})``.  :class:`KvmSev` is that interface for one
:class:`~sevemu.hypervisor.vm.Vm`: :meth:`KvmSev.memory_encrypt_op` takes a :class:`KvmSevCmd` (or
a sub-command id and its argument structure, or a dict of its fields) and returns 0 or a negative
errno; ``error`` carries the firmware status when the firmware refused (``-EIO``).  Every firmware
command goes through the PSP mailbox (:class:`~sevemu.hypervisor.psp.PspDriver`).  Sub-commands
follow KVM:

======================  ====================================================================
INIT / ES_INIT          SEV (ES) context for the VM: platform INIT through ``/dev/sev`` if
                        needed; before any vCPU exists (``-EINVAL``), once (``-EBUSY``).
                        ES_INIT: ``-ENOTTY`` without SEV-ES on this CPU.
LAUNCH_START            copies GODH cert and session blobs, LAUNCH_START through ``sev_fd``
                        (``-EBADF`` without one), ACTIVATE the VM's ASID (DECOMMISSION if that
                        fails), the handle back in ``handle``.
LAUNCH_UPDATE_DATA      pins the guest range, CLFLUSHes it (unless the CPU is SME-coherent),
                        one firmware command per physically contiguous run, exact lengths.
LAUNCH_UPDATE_VMSA      SEV-ES only (``-ENOTTY`` for an SEV guest): each vCPU's save area into a
                        VMSA page, CLFLUSH, LAUNCH_UPDATE_VMSA with ``len`` = 4096.
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
  ``sev_user_data_pdh_cert_export`` with KVM's ``*_uaddr`` naming), the VMSA transfers with AMD's out-of-tree layout
  (``vcpu_id`` plus header and transport buffers) on SEV-ES guests.
* ``KVM_SEV_INIT2`` (22) needs the ``KVM_X86_SEV_VM`` VM types, which the model does not have:
  ``-EINVAL``.
* The model's hypervisor gives a VM its SEV ASID when it creates it; INIT checks that the VM was
  created as an SEV VM, ES_INIT exchanges that ASID for one of the SEV-ES range.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import (
    ActivateCmd,
    AttestationCmd,
    DbgCmd,
    GuestStatusCmd,
    HandleCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    PdhCertExportCmd,
    ReceiveStartCmd,
    SendStartCmd,
    TransportCmd,
)
from sevemu.abi.status import Status
from sevemu.abi.vmsa import VMSA_PAGE_SIZE, SevEsSaveArea
from sevemu.errors import InputError
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.sevdev import (
    SEV_FW_BLOB_MAX_SIZE,
    Errno,
    IoctlError,
    SevDevice,
    Staging,
    UserBuffer,
    _Fault,
    copy_from_user,
    copy_to_user,
    ioc,
)
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind, VmState

__all__ = [
    "KVM_MEMORY_ENCRYPT_OP",
    "KvmSev",
    "KvmSevAttestationReport",
    "KvmSevCertExport",
    "KvmSevCmd",
    "KvmSevCmdId",
    "KvmSevDbg",
    "KvmSevGuestStatus",
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
    "load_image",
]

KVM_MEMORY_ENCRYPT_OP: Final = ioc(3, 0xAE, 0xBA, 8)
"""``_IOWR(KVMIO, 0xba, unsigned long)``."""

PAGE: Final = 4096
RAM_BASE: Final = 0x7F00_0000_0000
"""Where the model's VMM maps guest RAM (a typical mmap address; any non-NULL base would do)."""


class KvmSevCmdId(enum.IntEnum):
    """``enum sev_cmd_id`` (include/uapi/linux/kvm.h; reference 1.14)."""

    INIT = 0
    ES_INIT = 1
    LAUNCH_START = 2
    LAUNCH_UPDATE_DATA = 3
    LAUNCH_UPDATE_VMSA = 4
    LAUNCH_SECRET = 5
    LAUNCH_MEASURE = 6
    LAUNCH_FINISH = 7
    SEND_START = 8
    SEND_UPDATE_DATA = 9
    SEND_UPDATE_VMSA = 10
    SEND_FINISH = 11
    RECEIVE_START = 12
    RECEIVE_UPDATE_DATA = 13
    RECEIVE_UPDATE_VMSA = 14
    RECEIVE_FINISH = 15
    GUEST_STATUS = 16
    DBG_DECRYPT = 17
    DBG_ENCRYPT = 18
    CERT_EXPORT = 19
    GET_ATTESTATION_REPORT = 20
    SEND_CANCEL = 21
    INIT2 = 22
    SNP_LAUNCH_START = 100
    SNP_LAUNCH_UPDATE = 101
    SNP_LAUNCH_FINISH = 102


# ---- argument structures (struct kvm_sev_*; padding omitted) -------------------------------
@dataclass
class KvmSevCmd:
    """``struct kvm_sev_cmd``: sub-command ``id``, its ``data``, the firmware ``error`` (out), and
    ``sev_fd``, an open ``/dev/sev`` (LAUNCH_START and RECEIVE_START need it)."""

    id: int
    data: Any = None
    error: int = 0
    sev_fd: SevDevice | None = None


@dataclass
class KvmSevLaunchStart:
    """``struct kvm_sev_launch_start``: ``handle`` in (0 = new key) and out."""

    handle: int = 0
    policy: int = 0
    dh_uaddr: UserBuffer = None
    dh_len: int = 0
    session_uaddr: UserBuffer = None
    session_len: int = 0


@dataclass
class KvmSevLaunchUpdateData:
    """``struct kvm_sev_launch_update_data``: ``uaddr`` in guest RAM (:meth:`KvmSev.hva`)."""

    uaddr: int = 0
    len: int = 0


@dataclass
class KvmSevLaunchSecret:
    """``struct kvm_sev_launch_secret``: header and transport buffers in, guest range (RAM) out."""

    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    guest_uaddr: int = 0
    guest_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevLaunchMeasure:
    """``struct kvm_sev_launch_measure``: ``len`` 0 queries the length."""

    uaddr: UserBuffer = None
    len: int = 0


@dataclass
class KvmSevGuestStatus:
    """``struct kvm_sev_guest_status`` (out)."""

    handle: int = 0
    policy: int = 0
    state: int = 0


@dataclass
class KvmSevDbg:
    """``struct kvm_sev_dbg``: DBG_DECRYPT reads guest RAM (``src_uaddr`` an int) into a host
    ``bytearray``; DBG_ENCRYPT writes host ``bytes`` into guest RAM (``dst_uaddr`` an int)."""

    src_uaddr: int | UserBuffer = None
    dst_uaddr: int | UserBuffer = None
    len: int = 0


@dataclass
class KvmSevAttestationReport:
    """``struct kvm_sev_attestation_report``: ``len`` 0 queries the length."""

    mnonce: bytes = field(default=bytes(16))
    uaddr: UserBuffer = None
    len: int = 0


@dataclass
class KvmSevSendStart:
    """``struct kvm_sev_send_start``: target PDH, target PEK||OCA||CEK, ASK||ARK in; the session
    (``session_len`` 0 queries its length) and ``policy`` out."""

    policy: int = 0
    pdh_cert_uaddr: UserBuffer = None
    pdh_cert_len: int = 0
    plat_certs_uaddr: UserBuffer = None
    plat_certs_len: int = 0
    amd_certs_uaddr: UserBuffer = None
    amd_certs_len: int = 0
    session_uaddr: UserBuffer = None
    session_len: int = 0


@dataclass
class KvmSevSendUpdateData:
    """``struct kvm_sev_send_update_data``: one guest page at most; header and transport out."""

    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    guest_uaddr: int = 0
    guest_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevReceiveStart:
    """``struct kvm_sev_receive_start``: the source's PDH and session in, ``handle`` out."""

    handle: int = 0
    policy: int = 0
    pdh_uaddr: UserBuffer = None
    pdh_len: int = 0
    session_uaddr: UserBuffer = None
    session_len: int = 0


@dataclass
class KvmSevReceiveUpdateData:
    """``struct kvm_sev_receive_update_data``: header and transport in, one guest page."""

    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    guest_uaddr: int = 0
    guest_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevSendUpdateVmsa:
    """SEND_UPDATE_VMSA of one vCPU (AMD's out-of-tree layout; upstream KVM has none)."""

    vcpu_id: int = 0
    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevReceiveUpdateVmsa:
    """RECEIVE_UPDATE_VMSA of one vCPU (AMD's out-of-tree layout)."""

    vcpu_id: int = 0
    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevCertExport:
    """CERT_EXPORT (sevemu extension): PDH and PEK || OCA || CEK out, lengths in/out."""

    pdh_cert_uaddr: UserBuffer = None
    pdh_cert_len: int = 0
    cert_chain_uaddr: UserBuffer = None
    cert_chain_len: int = 0


STRUCTS: Final[dict[KvmSevCmdId, type[Any]]] = {
    KvmSevCmdId.LAUNCH_START: KvmSevLaunchStart,
    KvmSevCmdId.LAUNCH_UPDATE_DATA: KvmSevLaunchUpdateData,
    KvmSevCmdId.LAUNCH_SECRET: KvmSevLaunchSecret,
    KvmSevCmdId.LAUNCH_MEASURE: KvmSevLaunchMeasure,
    KvmSevCmdId.GUEST_STATUS: KvmSevGuestStatus,
    KvmSevCmdId.DBG_DECRYPT: KvmSevDbg,
    KvmSevCmdId.DBG_ENCRYPT: KvmSevDbg,
    KvmSevCmdId.GET_ATTESTATION_REPORT: KvmSevAttestationReport,
    KvmSevCmdId.SEND_START: KvmSevSendStart,
    KvmSevCmdId.SEND_UPDATE_DATA: KvmSevSendUpdateData,
    KvmSevCmdId.SEND_UPDATE_VMSA: KvmSevSendUpdateVmsa,
    KvmSevCmdId.RECEIVE_START: KvmSevReceiveStart,
    KvmSevCmdId.RECEIVE_UPDATE_DATA: KvmSevReceiveUpdateData,
    KvmSevCmdId.RECEIVE_UPDATE_VMSA: KvmSevReceiveUpdateVmsa,
    KvmSevCmdId.CERT_EXPORT: KvmSevCertExport,
}


def _round_down(x: int, a: int) -> int:
    return x & ~(a - 1)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


class KvmSev:
    """The SEV state KVM keeps for one VM (``struct kvm_sev_info``) and its ioctl."""

    def __init__(self, hv: Hypervisor, vm: Vm, *, ram_base: int = RAM_BASE) -> None:
        self.hv = hv
        self.vm = vm
        self.ram_base = ram_base
        self.active = False
        self.es_active = False
        self.handle = 0
        self.fd: SevDevice | None = None
        self.vmsa_spa: dict[int, int] = {}  # vCPU index -> SPA of its VMSA page (SEV-ES)
        self.last_error = 0
        """Firmware status of the last sub-command (its ``kvm_sev_cmd.error``)."""
        self.last_cmd: KvmSevCmd | None = None
        _, ebx, _, _ = hv.soc.cpuid(0x8000_001F)
        eax = hv.soc.cpuid(0x8000_001F)[0]
        self.me_mask = 1 << (ebx & 0x3F)  # sev_me_mask: the C-bit
        self.sme_coherent = bool(eax & (1 << 10))  # X86_FEATURE_SME_COHERENT

    # ---- user memory -------------------------------------------------------------------------
    def hva(self, gpa: int) -> int:
        """The VMM's address of guest-physical ``gpa`` (guest RAM is one mapping at ``ram_base``)."""
        return self.ram_base + gpa

    def _gpa(self, uaddr: int, length: int) -> int:
        """GPA of a guest-RAM user range; ``-ENOMEM`` (``sev_pin_memory``) when it is not RAM."""
        if not isinstance(uaddr, int) or length <= 0:
            raise _Fault(Errno.EINVAL)
        gpa = uaddr - self.ram_base
        if gpa < 0 or gpa + length > self.vm.memory:
            raise _Fault(Errno.ENOMEM)
        return gpa

    def _pin(self, uaddr: int, length: int) -> list[int]:
        """``sev_pin_memory``: the SPAs of the pages backing ``[uaddr, uaddr+length)``."""
        gpa = self._gpa(uaddr, length)
        return self.vm.back_range(gpa, length)

    def _clflush_pages(self, spas: list[int]) -> None:
        """``sev_clflush_pages``: nothing to do on SME-coherent CPUs."""
        if self.sme_coherent:
            return
        pages = [spa & ~(PAGE - 1) for spa in spas]
        for first, count in self._contiguous(pages):  # the same lines, one range per run
            self.hv.core.clflush_range(pages[first], count * PAGE)

    def _flush_for_firmware(self, page: int) -> None:
        """Before the firmware reads or writes a guest page in DRAM: the host's lines of it
        (``sev_clflush_pages``) and the guest's own (VMPAGE_FLUSH when CPUID Fn8000_001F EAX[2]
        offers it, else WBINVD) -- a host CLFLUSH cannot evict ASID-tagged lines, and the PSP's
        encrypted accesses bypass the caches."""
        self._clflush_pages([page])
        if self.hv.soc.cpuid(0x8000_001F)[0] & (1 << 2):
            self.hv.core.vmpage_flush(page, self.vm.asid)
        else:
            self.hv.soc.wbinvd_all()

    # ---- entry point ---------------------------------------------------------------------------
    def memory_encrypt_op(self, cmd: KvmSevCmd | int, data: Any = None, sev_fd: SevDevice | None = None) -> int:
        """``ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)``: 0 or a negative errno.

        ``cmd`` is a :class:`KvmSevCmd`, or a sub-command id with ``data`` (its structure or a dict
        of that structure's fields) and ``sev_fd``.  The firmware status is in ``cmd.error``; with a
        bare id, read it from :attr:`last_error`.
        """
        if not isinstance(cmd, KvmSevCmd):
            cmd = KvmSevCmd(int(cmd), data, 0, sev_fd)
        rc = self._dispatch(cmd)
        self.last_error = cmd.error
        self.last_cmd = cmd
        return rc

    def op(self, sub: KvmSevCmdId, data: Any = None, sev_fd: SevDevice | None = None) -> Any:
        """Run a sub-command and raise :class:`~sevemu.hypervisor.sevdev.IoctlError` on failure;
        returns the (updated) argument structure."""
        cmd = KvmSevCmd(int(sub), data, 0, sev_fd)
        rc = self.memory_encrypt_op(cmd)
        if rc < 0:
            raise IoctlError(f"KVM_SEV_{sub.name}", rc, cmd.error)
        return cmd.data

    def _dispatch(self, cmd: KvmSevCmd) -> int:
        try:
            sub = KvmSevCmdId(cmd.id)
        except ValueError:
            return -Errno.EINVAL
        handler = _HANDLERS.get(sub)
        if handler is None:
            return -Errno.EINVAL
        cls = STRUCTS.get(sub)
        if cls is not None:
            if isinstance(cmd.data, dict):
                if not set(cmd.data) <= {f.name for f in fields(cls)}:
                    return -Errno.EINVAL
                cmd.data = cls(**cmd.data)
            elif cmd.data is None and sub in (KvmSevCmdId.GUEST_STATUS,):
                cmd.data = cls()
            if not isinstance(cmd.data, cls):
                return -Errno.EFAULT  # copy_from_user of a bad pointer
        try:
            return int(handler(self, cmd))
        except _Fault as f:
            return -int(f.errno)

    # ---- firmware --------------------------------------------------------------------------
    def _fw(self, command: CommandId, buf: bytes | None, cmd: KvmSevCmd) -> tuple[int, bytes]:
        """``sev_issue_cmd``: the firmware status goes to ``error``; 0 or -EIO."""
        status, out = self.hv.psp.raw(command, buf)
        cmd.error = status
        return (-int(Errno.EIO) if status != Status.SUCCESS else 0), out

    def _need_sev(self) -> None:
        if not self.active:
            raise _Fault(Errno.ENOTTY)

    def _bind_asid(self, handle: int, cmd: KvmSevCmd) -> int:
        rc, _ = self._fw(CommandId.ACTIVATE, ActivateCmd(handle=handle, asid=self.vm.asid).encode(), cmd)
        return rc

    def _decommission(self, handle: int) -> None:
        self.hv.psp.raw(CommandId.DECOMMISSION, HandleCmd(handle=handle).encode())

    # ---- INIT / ES_INIT ----------------------------------------------------------------------
    def _init(self, cmd: KvmSevCmd, es: bool) -> int:
        vm = self.vm
        if es and not self.hv.soc.profile.sev_es:
            return -Errno.ENOTTY
        if vm.vcpus:
            return -Errno.EINVAL
        if self.active:
            return -Errno.EBUSY
        if vm.kind is not VmKind.SEV:
            return -Errno.EINVAL  # model: the VM was not created as an SEV VM (no SEV ASID)
        if es and vm.asid not in self.hv.soc.profile.es_asids() and not self._swap_to_es_asid():
            return -Errno.EBUSY
        dev = cmd.sev_fd if cmd.sev_fd is not None else SevDevice(self.hv)
        rc = dev.platform_init(cmd)
        if rc:
            return rc
        self.active = True
        self.es_active = es
        return 0

    def _swap_to_es_asid(self) -> bool:
        """``sev_asid_new`` for an ES guest: give the VM's SEV ASID back, take an SEV-ES one."""
        hv = self.hv
        es_free: list[int] = hv._es_free
        if not es_free:
            return False
        hv._sev_free.insert(0, self.vm.asid)
        self.vm.asid = es_free.pop(0)
        return True

    def _cmd_init(self, cmd: KvmSevCmd) -> int:
        return self._init(cmd, es=False)

    def _cmd_es_init(self, cmd: KvmSevCmd) -> int:
        return self._init(cmd, es=True)

    # ---- launch ----------------------------------------------------------------------------
    def _cmd_launch_start(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevLaunchStart = cmd.data
        stage = Staging(self.hv)
        start = {"handle": p.handle, "policy": p.policy}
        if p.dh_uaddr is not None:
            start["dh_cert_paddr"] = stage.put(copy_from_user(p.dh_uaddr, p.dh_len))
            start["dh_cert_len"] = p.dh_len
        if p.session_uaddr is not None:
            start["session_paddr"] = stage.put(copy_from_user(p.session_uaddr, p.session_len))
            start["session_len"] = p.session_len
        if not isinstance(cmd.sev_fd, SevDevice):
            return -Errno.EBADF
        try:
            buf = LaunchStartCmd(**start).encode()
        except InputError:
            return -Errno.EINVAL
        rc, out = self._fw(CommandId.LAUNCH_START, buf, cmd)
        if rc:
            return rc
        handle = LaunchStartCmd.decode(out).handle
        rc = self._bind_asid(handle, cmd)
        if rc:
            self._decommission(handle)
            return rc
        p.handle = handle
        self.handle = handle
        self.fd = cmd.sev_fd
        vm = self.vm
        vm.handle = handle
        vm.policy = p.policy
        vm.state = VmState.LAUNCHING
        return 0

    def _contiguous(self, spas: list[int]) -> list[tuple[int, int]]:
        """(first page index, page count) of physically contiguous runs (``get_num_contig_pages``)."""
        runs: list[tuple[int, int]] = []
        i = 0
        while i < len(spas):
            n = 1
            while i + n < len(spas) and spas[i + n - 1] + PAGE == spas[i + n]:
                n += 1
            runs.append((i, n))
            i += n
        return runs

    def _cmd_launch_update_data(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevLaunchUpdateData = cmd.data
        if p.len == 0 or p.len >= 1 << 32:
            return -Errno.EINVAL
        spas = self._pin(p.uaddr, p.len)
        self._clflush_pages(spas)
        offset = (p.uaddr - self.ram_base) & (PAGE - 1)
        size = p.len
        for first, count in self._contiguous(spas):
            length = min(count * PAGE - offset, size)
            data = LaunchUpdateDataCmd(handle=self.handle, paddr=spas[first] + offset, len=length)
            rc, _ = self._fw(CommandId.LAUNCH_UPDATE_DATA, data.encode(), cmd)
            if rc:
                return rc
            size -= length
            offset = 0
        return 0

    def _vmsa_page(self, vcpu: Vcpu) -> bytes:
        """``sev_es_sync_vmsa``: the vCPU's save area as a VMSA page."""
        v = vcpu.vmcb
        regs = v.regs
        area = SevEsSaveArea(
            efer=v.efer, cr4=v.cr4, cr3=v.cr3, cr0=v.cr0, dr7=0x400, dr6=0xFFFF0FF0,
            rflags=v.rflags, rip=v.rip, rsp=regs["rsp"], rax=regs["rax"], rcx=regs["rcx"],
            rdx=regs["rdx"], rbx=regs["rbx"], rbp=regs["rbp"], rsi=regs["rsi"], rdi=regs["rdi"],
            r8=regs["r8"], r9=regs["r9"], r10=regs["r10"], r11=regs["r11"], r12=regs["r12"],
            r13=regs["r13"], r14=regs["r14"], r15=regs["r15"], xcr0=1, g_pat=0x0007040600070406,
        )
        return area.encode()

    def _cmd_launch_update_vmsa(self, cmd: KvmSevCmd) -> int:
        if not self.es_active:
            return -Errno.ENOTTY
        for vcpu in self.vm.vcpus:
            spa = self.vmsa_spa.get(vcpu.index)
            if spa is None:
                spa = self.vmsa_spa[vcpu.index] = self.hv.tables.alloc()
            self.hv.core.host_write(spa, self._vmsa_page(vcpu))
            self.hv.core.clflush_range(spa, VMSA_PAGE_SIZE)
            data = LaunchUpdateDataCmd(handle=self.handle, paddr=spa, len=VMSA_PAGE_SIZE)
            rc, _ = self._fw(CommandId.LAUNCH_UPDATE_VMSA, data.encode(), cmd)
            if rc:
                return rc
            vcpu.vmcb.sev_es_enable = True  # guest_state_protected
        return 0

    def _blob_query(self, cmd: KvmSevCmd, command: CommandId, params: Any, make: Any) -> int:
        """LAUNCH_MEASURE / ATTESTATION: ``len`` 0 queries; otherwise a bounce buffer of ``len``."""
        stage = Staging(self.hv)
        blob = 0
        if params.len and params.uaddr is not None:
            if params.len > SEV_FW_BLOB_MAX_SIZE:
                return -Errno.EINVAL
            blob = stage.zeroed(params.len)
        buf = make(blob, params.len if blob else 0)
        rc, out = self._fw(command, buf.encode(), cmd)
        done = type(buf).decode(out)
        if params.len and rc:
            return rc
        if blob:
            copy_to_user(params.uaddr, stage.get(blob, params.len))
        params.len = done.len
        return rc

    def _cmd_launch_measure(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevLaunchMeasure = cmd.data
        rc = self._blob_query(cmd, CommandId.LAUNCH_MEASURE, p,
                              lambda a, n: LaunchUpdateDataCmd(handle=self.handle, paddr=a, len=n))
        if rc == 0 and isinstance(p.uaddr, bytearray):
            self.vm.measurement = bytes(p.uaddr[: p.len])
        return rc

    def _cmd_launch_secret(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevLaunchSecret = cmd.data
        spas = self._pin(p.guest_uaddr, p.guest_len)
        self._clflush_pages(spas)
        if len(self._contiguous(spas)) != 1:
            return -Errno.EINVAL
        stage = Staging(self.hv)
        offset = (p.guest_uaddr - self.ram_base) & (PAGE - 1)
        trans = stage.put(copy_from_user(p.trans_uaddr, p.trans_len))
        hdr = stage.put(copy_from_user(p.hdr_uaddr, p.hdr_len))
        data = TransportCmd(handle=self.handle, hdr_paddr=hdr, hdr_len=p.hdr_len,
                            guest_paddr=spas[0] + offset, guest_len=p.guest_len,
                            trans_paddr=trans, trans_len=p.trans_len)
        rc, _ = self._fw(CommandId.LAUNCH_SECRET, data.encode(), cmd)
        return rc

    def _cmd_launch_finish(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        rc, _ = self._fw(CommandId.LAUNCH_FINISH, HandleCmd(handle=self.handle).encode(), cmd)
        if rc == 0:
            self.vm.state = VmState.RUNNING
        return rc

    def _cmd_guest_status(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevGuestStatus = cmd.data
        rc, out = self._fw(CommandId.GUEST_STATUS, GuestStatusCmd(handle=self.handle).encode(), cmd)
        if rc:
            return rc
        st = GuestStatusCmd.decode(out)
        p.handle, p.policy, p.state = st.handle, st.policy, st.state
        return 0

    # ---- debug ---------------------------------------------------------------------------------
    def _dbg(self, command: CommandId, src: int, dst: int, length: int, cmd: KvmSevCmd) -> int:
        data = DbgCmd(handle=self.handle, src_paddr=src, dst_paddr=dst, len=length)
        rc, _ = self._fw(command, data.encode(), cmd)
        return rc

    def _dbg_decrypt_chunk(self, spa: int, length: int, cmd: KvmSevCmd) -> tuple[int, bytes]:
        """``__sev_dbg_decrypt`` into a bounce page: 16-byte aligned source and length."""
        offset = spa & 15
        src = _round_down(spa, 16)
        size = _round_up(length + offset, 16)
        stage = Staging(self.hv)
        tmp = stage.zeroed(size)
        rc = self._dbg(CommandId.DBG_DECRYPT, src, tmp, size, cmd)
        if rc:
            return rc, b""
        return 0, stage.get(tmp, size)[offset : offset + length]

    def _cmd_dbg(self, cmd: KvmSevCmd, decrypt: bool) -> int:
        self._need_sev()
        p: KvmSevDbg = cmd.data
        if not p.len or p.dst_uaddr is None:
            return -Errno.EINVAL
        if decrypt:
            if not isinstance(p.src_uaddr, int) or not isinstance(p.dst_uaddr, bytearray):
                return -Errno.EFAULT
            gpa = self._gpa(p.src_uaddr, p.len)
            out = bytearray()
            pos = 0
            while pos < p.len:
                off = (gpa + pos) & (PAGE - 1)
                n = min(PAGE - off, p.len - pos)
                page = self.vm.back(gpa + pos)
                self._flush_for_firmware(page)
                rc, chunk = self._dbg_decrypt_chunk(page + off, n, cmd)
                if rc:
                    return rc
                out += chunk
                pos += n
            copy_to_user(p.dst_uaddr, bytes(out))
            return 0
        if not isinstance(p.dst_uaddr, int) or not isinstance(p.src_uaddr, (bytes, bytearray)):
            return -Errno.EFAULT
        if len(p.src_uaddr) < p.len:
            return -Errno.EFAULT
        gpa = self._gpa(p.dst_uaddr, p.len)
        pos = 0
        while pos < p.len:
            off = (gpa + pos) & (PAGE - 1)
            n = min(PAGE - off, p.len - pos)
            page = self.vm.back(gpa + pos)
            self._flush_for_firmware(page)
            rc = self._dbg_encrypt_chunk(page + off, bytes(p.src_uaddr[pos : pos + n]), cmd)
            if rc:
                return rc
            pos += n
        return 0

    def _dbg_encrypt_chunk(self, spa: int, data: bytes, cmd: KvmSevCmd) -> int:
        """``__sev_dbg_encrypt_user``: read-modify-write when the destination or length is unaligned."""
        stage = Staging(self.hv)
        if spa & 15 or len(data) & 15:
            rc, old = self._dbg_decrypt_chunk(_round_down(spa, 16),
                                              _round_up(len(data) + (spa & 15), 16), cmd)
            if rc:
                return rc
            off = spa & 15
            merged = old[:off] + data + old[off + len(data):]
            src = stage.put(merged)
            return self._dbg(CommandId.DBG_ENCRYPT, src, _round_down(spa, 16), len(merged), cmd)
        src = stage.put(data)
        return self._dbg(CommandId.DBG_ENCRYPT, src, spa, len(data), cmd)

    def _cmd_dbg_decrypt(self, cmd: KvmSevCmd) -> int:
        return self._cmd_dbg(cmd, decrypt=True)

    def _cmd_dbg_encrypt(self, cmd: KvmSevCmd) -> int:
        return self._cmd_dbg(cmd, decrypt=False)

    # ---- attestation and certificates --------------------------------------------------------
    def _cmd_get_attestation_report(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevAttestationReport = cmd.data
        if len(p.mnonce) != 16:
            return -Errno.EINVAL
        return self._blob_query(cmd, CommandId.ATTESTATION, p,
                                lambda a, n: AttestationCmd(handle=self.handle, paddr=a,
                                                            mnonce=bytes(p.mnonce) if a else bytes(16),
                                                            len=n))

    def _cmd_cert_export(self, cmd: KvmSevCmd) -> int:
        p: KvmSevCertExport = cmd.data
        stage = Staging(self.hv)
        pdh = chain = 0
        if p.pdh_cert_uaddr is not None and p.pdh_cert_len and p.cert_chain_uaddr is not None:
            if p.pdh_cert_len > SEV_FW_BLOB_MAX_SIZE or p.cert_chain_len > SEV_FW_BLOB_MAX_SIZE:
                return -Errno.EINVAL
            pdh = stage.zeroed(p.pdh_cert_len)
            chain = stage.zeroed(p.cert_chain_len)
        data = PdhCertExportCmd(pdh_cert_paddr=pdh, pdh_cert_len=p.pdh_cert_len if pdh else 0,
                                certs_paddr=chain, certs_len=p.cert_chain_len if pdh else 0)
        rc, out = self._fw(CommandId.PDH_CERT_EXPORT, data.encode(), cmd)
        done = PdhCertExportCmd.decode(out)
        p.pdh_cert_len, p.cert_chain_len = done.pdh_cert_len, done.certs_len
        if rc == 0 and pdh:
            copy_to_user(p.pdh_cert_uaddr, stage.get(pdh, done.pdh_cert_len))
            copy_to_user(p.cert_chain_uaddr, stage.get(chain, done.certs_len))
        return rc

    # ---- migration ------------------------------------------------------------------------------
    def _cmd_send_start(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevSendStart = cmd.data
        stage = Staging(self.hv)
        if not p.session_len:
            rc, out = self._fw(CommandId.SEND_START, SendStartCmd(handle=self.handle).encode(), cmd)
            p.session_len = SendStartCmd.decode(out).session_len
            return rc
        if (p.pdh_cert_uaddr is None or not p.pdh_cert_len or p.session_uaddr is None
                or p.session_len > SEV_FW_BLOB_MAX_SIZE):
            return -Errno.EINVAL
        session = stage.zeroed(p.session_len)
        pdh = stage.put(copy_from_user(p.pdh_cert_uaddr, p.pdh_cert_len))
        plat = stage.put(copy_from_user(p.plat_certs_uaddr, p.plat_certs_len))
        amd = stage.put(copy_from_user(p.amd_certs_uaddr, p.amd_certs_len))
        data = SendStartCmd(handle=self.handle, pdh_cert_paddr=pdh, pdh_cert_len=p.pdh_cert_len,
                            plat_certs_paddr=plat, plat_certs_len=p.plat_certs_len,
                            amd_certs_paddr=amd, amd_certs_len=p.amd_certs_len,
                            session_paddr=session, session_len=p.session_len)
        rc, out = self._fw(CommandId.SEND_START, data.encode(), cmd)
        done = SendStartCmd.decode(out)
        if rc == 0:
            copy_to_user(p.session_uaddr, stage.get(session, p.session_len))
        p.policy = done.policy
        p.session_len = done.session_len
        return rc

    def _guest_page(self, uaddr: int, length: int) -> int:
        """The SPA (with the C-bit) of a guest range within one page (``-EINVAL`` across pages)."""
        if not isinstance(uaddr, int):
            raise _Fault(Errno.EFAULT)
        offset = (uaddr - self.ram_base) & (PAGE - 1)
        if length + offset > PAGE:
            raise _Fault(Errno.EINVAL)
        spa = self._pin(uaddr & ~(PAGE - 1), PAGE)[0]
        return (spa + offset) | self.me_mask

    def _cmd_send_update_data(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevSendUpdateData = cmd.data
        if not p.trans_len or not p.hdr_len:
            rc, out = self._fw(CommandId.SEND_UPDATE_DATA, TransportCmd(handle=self.handle).encode(), cmd)
            done = TransportCmd.decode(out)
            p.hdr_len, p.trans_len = done.hdr_len, done.trans_len
            return rc
        if p.trans_uaddr is None or not p.guest_uaddr or not p.guest_len or p.hdr_uaddr is None:
            return -Errno.EINVAL
        if p.hdr_len > SEV_FW_BLOB_MAX_SIZE or p.trans_len > SEV_FW_BLOB_MAX_SIZE:
            return -Errno.ENOMEM
        guest = self._guest_page(p.guest_uaddr, p.guest_len)
        return self._send_update(cmd, CommandId.SEND_UPDATE_DATA, p, guest, p.guest_len)

    def _send_update(self, cmd: KvmSevCmd, command: CommandId, p: Any, guest: int, guest_len: int) -> int:
        stage = Staging(self.hv)
        hdr = stage.zeroed(p.hdr_len)
        trans = stage.zeroed(p.trans_len)
        data = TransportCmd(handle=self.handle, hdr_paddr=hdr, hdr_len=p.hdr_len, guest_paddr=guest,
                            guest_len=guest_len, trans_paddr=trans, trans_len=p.trans_len)
        rc, _ = self._fw(command, data.encode(), cmd)
        if rc:
            return rc
        copy_to_user(p.trans_uaddr, stage.get(trans, p.trans_len))
        copy_to_user(p.hdr_uaddr, stage.get(hdr, p.hdr_len))
        return 0

    def _vmsa_of(self, vcpu_id: int) -> int:
        if not self.es_active:
            raise _Fault(Errno.ENOTTY)
        if not 0 <= vcpu_id < len(self.vm.vcpus):
            raise _Fault(Errno.EINVAL)
        spa = self.vmsa_spa.get(vcpu_id)
        if spa is None:
            spa = self.vmsa_spa[vcpu_id] = self.hv.tables.alloc()
        return spa | self.me_mask

    def _cmd_send_update_vmsa(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevSendUpdateVmsa = cmd.data
        if not p.trans_len or not p.hdr_len:
            rc, out = self._fw(CommandId.SEND_UPDATE_VMSA, TransportCmd(handle=self.handle).encode(), cmd)
            done = TransportCmd.decode(out)
            p.hdr_len, p.trans_len = done.hdr_len, done.trans_len
            return rc
        if p.trans_uaddr is None or p.hdr_uaddr is None:
            return -Errno.EINVAL
        if p.hdr_len > SEV_FW_BLOB_MAX_SIZE or p.trans_len > SEV_FW_BLOB_MAX_SIZE:
            return -Errno.ENOMEM
        return self._send_update(cmd, CommandId.SEND_UPDATE_VMSA, p, self._vmsa_of(p.vcpu_id), VMSA_PAGE_SIZE)

    def _cmd_send_finish(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        rc, _ = self._fw(CommandId.SEND_FINISH, HandleCmd(handle=self.handle).encode(), cmd)
        return rc

    def _cmd_send_cancel(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        rc, _ = self._fw(CommandId.SEND_CANCEL, HandleCmd(handle=self.handle).encode(), cmd)
        return rc

    def _cmd_receive_start(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevReceiveStart = cmd.data
        if p.pdh_uaddr is None or not p.pdh_len or p.session_uaddr is None or not p.session_len:
            return -Errno.EINVAL
        stage = Staging(self.hv)
        pdh = stage.put(copy_from_user(p.pdh_uaddr, p.pdh_len))
        session = stage.put(copy_from_user(p.session_uaddr, p.session_len))
        if not isinstance(cmd.sev_fd, SevDevice):
            return -Errno.EBADF
        try:
            buf = ReceiveStartCmd(handle=p.handle, policy=p.policy, pdh_cert_paddr=pdh,
                                  pdh_cert_len=p.pdh_len, session_paddr=session,
                                  session_len=p.session_len).encode()
        except InputError:
            return -Errno.EINVAL
        rc, out = self._fw(CommandId.RECEIVE_START, buf, cmd)
        if rc:
            return rc
        handle = ReceiveStartCmd.decode(out).handle
        rc = self._bind_asid(handle, cmd)
        if rc:
            return rc
        p.handle = handle
        self.handle = handle
        self.fd = cmd.sev_fd
        self.vm.handle = handle
        self.vm.policy = p.policy
        self.vm.state = VmState.LAUNCHING
        return 0

    def _receive_blobs(self, p: Any) -> tuple[int, int]:
        stage = Staging(self.hv)
        hdr = stage.put(copy_from_user(p.hdr_uaddr, p.hdr_len))
        trans = stage.put(copy_from_user(p.trans_uaddr, p.trans_len))
        return hdr, trans

    def _cmd_receive_update_data(self, cmd: KvmSevCmd) -> int:
        if not self.active:
            return -Errno.EINVAL
        p: KvmSevReceiveUpdateData = cmd.data
        if (p.hdr_uaddr is None or not p.hdr_len or not p.guest_uaddr or not p.guest_len
                or p.trans_uaddr is None or not p.trans_len):
            return -Errno.EINVAL
        if not isinstance(p.guest_uaddr, int):
            return -Errno.EFAULT
        if ((p.guest_uaddr - self.ram_base) & (PAGE - 1)) + p.guest_len > PAGE:
            return -Errno.EINVAL
        hdr, trans = self._receive_blobs(p)
        guest = self._guest_page(p.guest_uaddr, p.guest_len)
        data = TransportCmd(handle=self.handle, hdr_paddr=hdr, hdr_len=p.hdr_len, guest_paddr=guest,
                            guest_len=p.guest_len, trans_paddr=trans, trans_len=p.trans_len)
        rc, _ = self._fw(CommandId.RECEIVE_UPDATE_DATA, data.encode(), cmd)
        return rc

    def _cmd_receive_update_vmsa(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        p: KvmSevReceiveUpdateVmsa = cmd.data
        if p.hdr_uaddr is None or not p.hdr_len or p.trans_uaddr is None or not p.trans_len:
            return -Errno.EINVAL
        guest = self._vmsa_of(p.vcpu_id)
        hdr, trans = self._receive_blobs(p)
        data = TransportCmd(handle=self.handle, hdr_paddr=hdr, hdr_len=p.hdr_len, guest_paddr=guest,
                            guest_len=VMSA_PAGE_SIZE, trans_paddr=trans, trans_len=p.trans_len)
        rc, _ = self._fw(CommandId.RECEIVE_UPDATE_VMSA, data.encode(), cmd)
        if rc == 0:
            self.vm.vcpus[p.vcpu_id].vmcb.sev_es_enable = True
        return rc

    def _cmd_receive_finish(self, cmd: KvmSevCmd) -> int:
        self._need_sev()
        rc, _ = self._fw(CommandId.RECEIVE_FINISH, HandleCmd(handle=self.handle).encode(), cmd)
        if rc == 0:
            self.vm.state = VmState.RUNNING
        return rc


_HANDLERS: Final[dict[KvmSevCmdId, Any]] = {
    KvmSevCmdId.INIT: KvmSev._cmd_init,
    KvmSevCmdId.ES_INIT: KvmSev._cmd_es_init,
    KvmSevCmdId.LAUNCH_START: KvmSev._cmd_launch_start,
    KvmSevCmdId.LAUNCH_UPDATE_DATA: KvmSev._cmd_launch_update_data,
    KvmSevCmdId.LAUNCH_UPDATE_VMSA: KvmSev._cmd_launch_update_vmsa,
    KvmSevCmdId.LAUNCH_SECRET: KvmSev._cmd_launch_secret,
    KvmSevCmdId.LAUNCH_MEASURE: KvmSev._cmd_launch_measure,
    KvmSevCmdId.LAUNCH_FINISH: KvmSev._cmd_launch_finish,
    KvmSevCmdId.SEND_START: KvmSev._cmd_send_start,
    KvmSevCmdId.SEND_UPDATE_DATA: KvmSev._cmd_send_update_data,
    KvmSevCmdId.SEND_UPDATE_VMSA: KvmSev._cmd_send_update_vmsa,
    KvmSevCmdId.SEND_FINISH: KvmSev._cmd_send_finish,
    KvmSevCmdId.RECEIVE_START: KvmSev._cmd_receive_start,
    KvmSevCmdId.RECEIVE_UPDATE_DATA: KvmSev._cmd_receive_update_data,
    KvmSevCmdId.RECEIVE_UPDATE_VMSA: KvmSev._cmd_receive_update_vmsa,
    KvmSevCmdId.RECEIVE_FINISH: KvmSev._cmd_receive_finish,
    KvmSevCmdId.GUEST_STATUS: KvmSev._cmd_guest_status,
    KvmSevCmdId.DBG_DECRYPT: KvmSev._cmd_dbg_decrypt,
    KvmSevCmdId.DBG_ENCRYPT: KvmSev._cmd_dbg_encrypt,
    KvmSevCmdId.CERT_EXPORT: KvmSev._cmd_cert_export,
    KvmSevCmdId.GET_ATTESTATION_REPORT: KvmSev._cmd_get_attestation_report,
    KvmSevCmdId.SEND_CANCEL: KvmSev._cmd_send_cancel,
}


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
        n = min(step - ((gpa + pos) & (PAGE - 1)) if page_by_page else step, len(data) - pos)
        rc = kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_UPDATE_DATA,
                                   KvmSevLaunchUpdateData(uaddr=kvm.hva(gpa + pos), len=n))
        if rc:
            return rc
        pos += n
    return 0
