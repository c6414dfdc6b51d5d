"""The hypervisor's part of an SNP guest request (GHCB 56421 "SNP Guest Request" and "SNP Extended
Guest Request", NAE events 0x8000_0011 / 0x8000_0012; Linux ``arch/x86/kvm/svm/sev.c``
``snp_handle_guest_req`` / ``snp_handle_ext_guest_req``, ``include/uapi/linux/sev-guest.h`` for the
error encoding).

The guest encrypts its message with a VMPCK the host never sees and puts it in a *shared* page; the
hypervisor only carries it:

1. it copies the guest's request page (SW_EXITINFO1, a shared GPA) into a page of its own -- a
   Hypervisor page in the RMP (``guest_req_buf``);
2. it issues SNP_GUEST_REQUEST with the guest's context, that page, and a response page it donated to
   the firmware (a Firmware page, ``guest_resp_buf``: ``snp_alloc_firmware_page``), which it may read
   (reads are not RMP-checked) but not write;
3. it copies the response to the guest's response GPA (SW_EXITINFO2) and answers SW_EXITINFO2 =
   ``vmm_error << 32 | fw_error`` (0 on success; the firmware's status when it refused; nothing is
   copied then).

Model choice: one request/response page pair per host (KVM keeps one per VM under a mutex), allocated
at first use and kept for the host's lifetime.

**Extended requests** add the certificate table (``decode_cert_table``'s format, GUIDs of the GHCB
specification: VCEK / VLEK, ASK / ASVK, ARK) the host set for every guest with
:meth:`GuestRequests.set_certificates` -- the model of the ``SNP_SET_EXT_CONFIG`` interface of the
SNP host patches (a per-VM blob, ``vm=``, overrides it).  RAX is the page-aligned GPA of the guest's
shared buffer, RBX its size in pages.  A buffer too small for the blob is answered without calling the
firmware: SW_EXITINFO2 = ``SNP_GUEST_VMM_ERR_INVALID_LEN << 32`` and RBX = the pages needed (the guest
then repeats the plain request so its sequence number advances, as Linux's driver does).  Otherwise the
request is served, and on success the blob (zero-padded to the buffer) is written to the buffer; with
no blob set the buffer gets an empty table (zeros).

Refused by the hypervisor (``SNP_GUEST_VMM_ERR_GENERIC``, nothing forwarded): a VM that is not an
SNP guest or has no context, GPAs that are not page aligned, outside the guest or not pages the guest
declared shared (KVM_HC_MAP_GPA_RANGE).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Final

from sevemu._util.units import PAGE, align_up
from sevemu.abi.commands import CommandId
from sevemu.abi.ghcb import SwExitCode
from sevemu.abi.report import decode_cert_table
from sevemu.abi.snp import SnpGuestRequestCmd
from sevemu.errors import LayoutError, UnmappedError
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError
from sevemu.hypervisor.ghcb import NaeExit
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.hypervisor.sev.snp import rmp_make_private
from sevemu.hypervisor.vm import Vm

__all__ = [
    "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_GENERIC",
    "SNP_GUEST_VMM_ERR_INVALID_LEN",
    "GuestRequests",
    "Reply",
    "VmGuestChannel",
    "guest_requests",
]

SNP_GUEST_VMM_ERR_INVALID_LEN: Final = 1
SNP_GUEST_VMM_ERR_BUSY: Final = 2
SNP_GUEST_VMM_ERR_GENERIC: Final = 0xFFFF_FFFF
"""Linux ``SNP_GUEST_VMM_ERR_*`` (the upper half of SW_EXITINFO2)."""


def _err(vmm: int, fw: int = 0) -> int:
    return (vmm & 0xFFFF_FFFF) << 32 | (fw & 0xFFFF_FFFF)


@dataclass(frozen=True, slots=True)
class Reply:
    """What a guest request answered: SW_EXITINFO2 and, for an extended one, RBX (pages)."""

    exitinfo2: int
    pages: int = 0


class GuestRequests:
    """SNP guest requests for one hypervisor (module docstring); :func:`guest_requests` gives it."""

    def __init__(self, hv: Hypervisor) -> None:
        self.hv = hv
        self.certs = b""
        """The certificate blob every extended report carries (empty: none set)."""
        self.vm_certs: weakref.WeakKeyDictionary[Vm, bytes] = weakref.WeakKeyDictionary()
        self._pages: tuple[int, int] | None = None
        self.served = 0
        """Guest requests forwarded to the firmware."""

    # ---- configuration ------------------------------------------------------------------------
    def set_certificates(self, blob: bytes, vm: Vm | None = None) -> None:
        """The certificate table for extended reports (all guests, or ``vm``'s); ``-EINVAL`` for a
        blob that is not a well-formed table."""
        try:
            decode_cert_table(blob)
        except LayoutError as exc:
            raise SevInputError(Errno.EINVAL, f"certificate blob: {exc}") from None
        if vm is None:
            self.certs = bytes(blob)
        else:
            self.vm_certs[vm] = bytes(blob)

    def certificates(self, vm: Vm) -> bytes:
        return self.vm_certs.get(vm, self.certs)

    def install(self) -> None:
        """Register the two NAE events in the hypervisor's GHCB table."""
        self.hv.ghcb.nae_table[SwExitCode.GUEST_REQUEST] = self._nae
        self.hv.ghcb.nae_table[SwExitCode.EXT_GUEST_REQUEST] = self._nae_ext

    # ---- the requests ----------------------------------------------------------------------------
    def _buffers(self) -> tuple[int, int]:
        if self._pages is None:
            host = self.hv.sev
            req = host.tables.alloc()
            resp = host.tables.alloc()
            rmp_make_private(host, resp, 0, 0, True)  # snp_alloc_firmware_page
            self._pages = (req, resp)
        return self._pages

    def _shared(self, vm: Vm, gpa: int, length: int = PAGE) -> bool:
        if gpa % PAGE or gpa < 0 or gpa + length > vm.memory:
            return False
        return all(p in vm.shared_gpas for p in range(gpa, gpa + length, PAGE))

    def request(self, vm: Vm, req_gpa: int, resp_gpa: int) -> Reply:
        """SNP Guest Request (module docstring)."""
        if not vm.snp or not vm.snp_context or not (self._shared(vm, req_gpa) and self._shared(vm, resp_gpa)):
            return Reply(_err(SNP_GUEST_VMM_ERR_GENERIC))
        try:
            message = vm.host_read(req_gpa, PAGE)
        except UnmappedError:
            return Reply(_err(SNP_GUEST_VMM_ERR_GENERIC))
        host = self.hv.sev
        req, resp = self._buffers()
        host.core.host_write_stream(req, message)  # a copy the PSP reads next: straight to DRAM
        try:
            host.issue(CommandId.SNP_GUEST_REQUEST, SnpGuestRequestCmd(gctx_paddr=vm.snp_context, req_paddr=req,
                                                                       res_paddr=resp))
        except SevFirmwareError as exc:
            return Reply(_err(0, exc.status))
        finally:
            self.served += 1
        vm.host_write(resp_gpa, host.core.host_read_stream(resp, PAGE))
        return Reply(0)

    def ext_request(self, vm: Vm, req_gpa: int, resp_gpa: int, data_gpa: int, npages: int) -> Reply:
        """SNP Extended Guest Request (module docstring)."""
        blob = self.certificates(vm)
        need = align_up(len(blob), PAGE) // PAGE
        if npages < need:
            return Reply(_err(SNP_GUEST_VMM_ERR_INVALID_LEN), need)
        if npages and not self._shared(vm, data_gpa, npages * PAGE):
            return Reply(_err(SNP_GUEST_VMM_ERR_GENERIC))
        reply = self.request(vm, req_gpa, resp_gpa)
        if reply.exitinfo2 == 0 and npages:
            vm.host_write(data_gpa, blob.ljust(npages * PAGE, b"\0"))
        return reply

    # ---- VMGEXIT -----------------------------------------------------------------------------------
    def _nae(self, ex: NaeExit) -> None:
        ex.out["sw_exit_info_2"] = self.request(ex.vm, ex.info1, ex.info2).exitinfo2

    def _nae_ext(self, ex: NaeExit) -> None:
        rax, rbx = ex.need("rax", "rbx")
        reply = self.ext_request(ex.vm, ex.info1, ex.info2, rax, rbx)
        ex.out["sw_exit_info_2"] = reply.exitinfo2
        if reply.exitinfo2 == _err(SNP_GUEST_VMM_ERR_INVALID_LEN):
            ex.out["rbx"] = reply.pages


_SERVICES: weakref.WeakKeyDictionary[Hypervisor, GuestRequests] = weakref.WeakKeyDictionary()


def guest_requests(hv: Hypervisor) -> GuestRequests:
    """The guest-request service of ``hv`` (made, and its NAE events registered, at first use)."""
    svc = _SERVICES.get(hv)
    if svc is None:
        svc = _SERVICES[hv] = GuestRequests(hv)
        svc.install()
    return svc


class VmGuestChannel:
    """The guest's side of the transport for a Python guest driver (``sevemu.guest.sev_guest``'s
    ``GuestChannel``): the guest writes its message into its shared page at ``req_gpa`` and exits
    (the model's stand-in for the VMGEXIT until SNP guests run on the vCPU); the answer comes back in
    its shared pages.  The pages must be GPAs ``vm`` declared shared; :meth:`share` declares them as the
    guest's KVM_HC_MAP_GPA_RANGE would."""

    def __init__(self, hv: Hypervisor, vm: Vm, req_gpa: int, resp_gpa: int, data_gpa: int, data_pages: int) -> None:
        self.svc = guest_requests(hv)
        self.vm = vm
        self.req_gpa, self.resp_gpa, self.data_gpa, self.data_pages = req_gpa, resp_gpa, data_gpa, data_pages

    def share(self) -> None:
        """Back the channel's pages and mark them shared (the guest's KVM_HC_MAP_GPA_RANGE)."""
        for gpa in (self.req_gpa, self.resp_gpa, *range(self.data_gpa, self.data_gpa + self.data_pages * PAGE, PAGE)):
            self.vm.back(gpa)
            self.vm.shared_gpas.add(gpa)

    def exchange(self, message: bytes, ext_pages: int | None) -> tuple[bytes, int, int, bytes]:
        """Send ``message``; (response page, SW_EXITINFO2, RBX, certificate pages)."""
        self.vm.host_write(self.req_gpa, message.ljust(PAGE, b"\0"))
        if ext_pages is None:
            reply = self.svc.request(self.vm, self.req_gpa, self.resp_gpa)
            certs = b""
        else:
            pages = min(ext_pages, self.data_pages)
            reply = self.svc.ext_request(self.vm, self.req_gpa, self.resp_gpa, self.data_gpa, pages)
            certs = self.vm.host_read(self.data_gpa, pages * PAGE) if pages and reply.exitinfo2 == 0 else b""
        return self.vm.host_read(self.resp_gpa, PAGE), reply.exitinfo2, reply.pages, certs
