"""The KVM-like hypervisor: platform bring-up, ASIDs, VM lifecycle, SEV launch, the vCPU run loop.

Flows follow Linux KVM (arch/x86/kvm/svm/sev.c, reference 1.3/1.14):

* ``platform_init``: INIT through the PSP driver (the SEV-ES TMR when asked).
* ASIDs (reference 4.1): SEV guests get [EDX, ECX], SEV-ES guests [1, EDX-1], plain guests ASIDs
  above ECX.  Freed SEV ASIDs wait in a reclaim set; when no fresh ASID is left the hypervisor does
  WBINVD on all CPUs then DF_FLUSH and reuses them (``sev_flush_asids``) -- the firmware refuses an
  ACTIVATE that skipped either step.
* ``launch`` (SEV) = ``launch_measure`` + ``launch_finish``.  ``launch_measure``: LAUNCH_START (new
  VEK; with the guest owner's GODH certificate and session blob when given, copied into the PSP
  bounce area like KVM's ``dh_uaddr``/``session_uaddr``), ACTIVATE (bind the ASID), for each image
  region: back and fill the pages as the host, CLFLUSH them (``sev_clflush_pages``),
  LAUNCH_UPDATE_DATA per physically contiguous run; LAUNCH_MEASURE, whose blob goes to the owner.
  Between the two, ``launch_secret`` (KVM_SEV_LAUNCH_SECRET) injects an owner-sealed packet at a
  GPA: the guest region is backed, must be physically contiguous (``-EINVAL`` otherwise), is
  CLFLUSHed, and is given to the firmware by SPA with the C-bit set.  ``launch_finish``:
  LAUNCH_FINISH.
* ``attestation_report`` (KVM_SEV_GET_ATTESTATION_REPORT): length query, then ATTESTATION with the
  caller's MNONCE.
* ``dbg_decrypt`` / ``dbg_encrypt`` (KVM_SEV_DBG_DECRYPT / _ENCRYPT): page by page through a bounce
  buffer, 16-byte aligned (unaligned ends are handled by decrypting the enclosing blocks first, as
  KVM does).  The firmware works on DRAM, so the guest's cached lines of each page are written back
  and invalidated first (VMPAGE_FLUSH when CPUID Fn8000_001F EAX[2] has it, else WBINVD): a host
  CLFLUSH cannot evict guest-tagged lines.
* ``run``: VMRUN until an exit the run loop cannot handle itself.  #NPF inside guest memory backs
  the page (demand paging); port I/O to COM1 is the serial console; CPUID returns the host's values
  (including Fn8000_001F, so a guest learns its C-bit); VMMCALL implements KVM_HC_MAP_GPA_RANGE, by
  which an SEV guest announces pages it made shared.  HLT returns to the caller, and so does INTR
  (the host timer ended the guest's time slice: the caller re-enters); SHUTDOWN, an unresolvable
  #NPF or VMEXIT_INVALID mark the VM crashed.
* ``destroy``: DEACTIVATE, DECOMMISSION, release memory, ASID to the reclaim set.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevemu.abi.commands import CommandId
from sevemu.abi.paging import ExitCode
from sevemu.abi.sev import (
    SEV_TMR_LEN,
    ActivateCmd,
    AttestationCmd,
    DbgCmd,
    GuestStatusCmd,
    HandleCmd,
    InitCmd,
    InitOptions,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    LegacyAttestationReport,
    MeasureBuf,
    PlatformStatus,
    TransportCmd,
)
from sevemu.abi.status import Status, status_name
from sevemu.errors import AsidError, InputError, MailboxError, VmError
from sevemu.hw.cpu import Engine
from sevemu.hw.host import HostSoc
from sevemu.hw.svm import TlbControl, Vmcb, VmExit
from sevemu.hypervisor.memory import PageAllocator
from sevemu.hypervisor.psp import PspDriver
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind, VmState

__all__ = ["COM1", "KVM_HC_MAP_GPA_RANGE", "Hypervisor", "RunResult"]

COM1 = 0x3F8
KVM_HC_MAP_GPA_RANGE = 12
_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
PAGE = 4096
MiB = 1 << 20
_VMPAGE_FLUSH = 1 << 2  # CPUID Fn8000_001F EAX[2]
_SECRET_HDR_OFFSET = 0  # PSP bounce-area layout for LAUNCH_START / LAUNCH_SECRET blobs
_SECRET_TRANS_OFFSET = PAGE


@dataclass(frozen=True)
class RunResult:
    """Why the run loop returned."""

    exit: VmExit
    reason: str
    exits: int


class Hypervisor:
    """A KVM-like host running on core 0 of ``soc``."""

    def __init__(self, soc: HostSoc, host_reserved: int = 256 * MiB) -> None:
        self.soc = soc  # the host's view only (sevemu.hw.host): no key ports, no decrypting reads
        self.core = soc.boot_cpu
        p = soc.profile
        # host layout: [1 MiB, 2 MiB) PSP buffers, [2 MiB, 4 MiB) TMR, [4 MiB, reserved) tables
        self.psp = PspDriver(self.core, soc.mailbox, buffer_spa=1 * MiB, data_spa=1 * MiB + PAGE,
                             data_len=1 * MiB - PAGE)
        self.tmr_spa = 2 * MiB
        self.tables = PageAllocator(self.core, 4 * MiB, host_reserved)
        self.pages = PageAllocator(self.core, host_reserved, soc.dram_size)
        self.vms: list[Vm] = []
        self._sev_free = list(p.sev_asids())
        self._es_free = list(p.es_asids())
        self._reclaim: set[int] = set()
        self._plain_next = p.max_asid + 1
        self.asid_flushes = 0
        self._last_vmcb: dict[int, Vmcb] = {}  # ASID -> the VMCB that last ran with it on the core

    # ---- platform ------------------------------------------------------------------------------
    def platform_init(self, es: bool = False) -> None:
        """INIT the SEV firmware (with SEV-ES and its TMR when ``es``)."""
        if es:
            self.psp.call(CommandId.INIT, InitCmd(options=int(InitOptions.SEV_ES), tmr_paddr=self.tmr_spa,
                                                  tmr_len=SEV_TMR_LEN))
        else:
            self.psp.call(CommandId.INIT, InitCmd())

    def platform_status(self) -> PlatformStatus:
        return self.psp.call(CommandId.PLATFORM_STATUS, PlatformStatus())

    def guest_status(self, vm: Vm) -> GuestStatusCmd:
        return self.psp.call(CommandId.GUEST_STATUS, GuestStatusCmd(handle=vm.handle))

    # ---- ASIDs ----------------------------------------------------------------------------------
    def _alloc_asid(self, kind: VmKind) -> int:
        if kind is VmKind.PLAIN:
            asid = self._plain_next
            self._plain_next += 1
            return asid
        if not self._sev_free and self._reclaim:
            self.flush_asids()
        if not self._sev_free:
            raise AsidError(f"no free SEV ASID ({self.soc.profile.max_asid} in use)")
        return self._sev_free.pop(0)

    def flush_asids(self) -> None:
        """Make reclaimed ASIDs reusable: WBINVD on every CPU, then DF_FLUSH (``sev_flush_asids``)."""
        self.soc.wbinvd_all()
        self.psp.call_nobuf(CommandId.DF_FLUSH)
        self._sev_free = sorted(set(self._sev_free) | self._reclaim)
        self._reclaim.clear()
        self.asid_flushes += 1

    # ---- VM lifecycle ---------------------------------------------------------------------------
    def create_vm(self, name: str, memory: int, kind: VmKind = VmKind.SEV) -> Vm:
        """A new VM of ``memory`` bytes (a positive multiple of 4 KiB); memory is backed on demand."""
        if memory <= 0 or memory % PAGE:
            raise InputError(f"VM memory must be a positive multiple of 4 KiB, got {memory:#x}")
        if memory > self.soc.dram_size:
            raise InputError(f"VM memory {memory:#x} exceeds the host's {self.soc.dram_size:#x} bytes of DRAM")
        asid = self._alloc_asid(kind)
        vm = Vm(name, kind, memory, asid, self.core, self.pages, self.tables)
        self.vms.append(vm)
        return vm

    def launch(self, vm: Vm, regions: list[tuple[int, bytes]], policy: int = 0, *,
               godh_cert: bytes | None = None, session: bytes | None = None) -> bytes:
        """Load ``regions`` (GPA, bytes) into ``vm`` and, for SEV, run the whole measured launch.

        ``godh_cert`` and ``session`` are the guest owner's GODH certificate and session buffer
        (both or neither).  Returns the LAUNCH_MEASURE blob (MEASURE || MNONCE) for SEV guests, b""
        for plain ones.  To inject secrets, use :meth:`launch_measure`, :meth:`launch_secret` and
        :meth:`launch_finish` instead.
        """
        measure = self.launch_measure(vm, regions, policy, godh_cert=godh_cert, session=session)
        if vm.sev:
            self.launch_finish(vm)
        return measure

    def launch_measure(self, vm: Vm, regions: list[tuple[int, bytes]], policy: int = 0, *,
                       godh_cert: bytes | None = None, session: bytes | None = None) -> bytes:
        """LAUNCH_START .. LAUNCH_MEASURE for ``vm``; returns the 0x30-byte measurement blob.

        The VM stays LAUNCHING (firmware state LSECRET) until :meth:`launch_finish`; a plain VM is
        loaded and RUNNING at once (b"" returned).  A refused LAUNCH_START raises
        :class:`~sevemu.errors.MailboxError` and leaves the VM CREATED.
        """
        if vm.state is not VmState.CREATED:
            raise VmError(f"{vm.name} was already launched")
        if (godh_cert is None) != (session is None):
            raise InputError("an owner session needs both the GODH certificate and the session buffer")
        for gpa, data in regions:
            if gpa < 0 or gpa + len(data) > vm.memory:
                raise InputError(
                    f"image region {gpa:#x}+{len(data):#x} does not fit {vm.name}'s {vm.memory:#x} bytes"
                )
        vm.state = VmState.LAUNCHING
        for gpa, data in regions:
            vm.back_range(gpa, len(data))
            vm.host_write(gpa, data)
        if not vm.sev:
            vm.state = VmState.RUNNING
            return b""
        start_cmd = LaunchStartCmd(policy=policy)
        if godh_cert is not None and session is not None:
            start_cmd = LaunchStartCmd(
                policy=policy,
                dh_cert_paddr=self.psp.put_data(godh_cert, _SECRET_HDR_OFFSET),
                dh_cert_len=len(godh_cert),
                session_paddr=self.psp.put_data(session, _SECRET_TRANS_OFFSET),
                session_len=len(session),
            )
        try:
            start = self.psp.call(CommandId.LAUNCH_START, start_cmd)
        except MailboxError:
            vm.state = VmState.CREATED
            raise
        vm.policy = policy
        vm.handle = start.handle
        self.psp.call(CommandId.ACTIVATE, ActivateCmd(handle=vm.handle, asid=vm.asid))
        for gpa, data in regions:
            for spa, length in self._contiguous_runs(vm, gpa, len(data)):
                for line in range(spa & ~63, spa + length, 64):
                    self.core.clflush(line)
                self.psp.call(CommandId.LAUNCH_UPDATE_DATA,
                              LaunchUpdateDataCmd(handle=vm.handle, paddr=spa, len=length))
        out_spa = self.psp.put_data(bytes(MeasureBuf.SIZE))
        self.psp.call(CommandId.LAUNCH_MEASURE,
                      LaunchUpdateDataCmd(handle=vm.handle, paddr=out_spa, len=MeasureBuf.SIZE))
        measure = self.psp.get_data(MeasureBuf.SIZE)
        vm.measurement = measure
        return measure

    def _measured(self, vm: Vm, what: str) -> None:
        if not vm.sev or vm.state is not VmState.LAUNCHING or not vm.measurement:
            raise VmError(f"{what} needs an SEV guest measured and not yet finished; {vm.name} is "
                          f"{vm.state.value}")

    def _cbit_mask(self) -> int:
        """The C-bit as software learns it: CPUID Fn8000_001F EBX[5:0]."""
        return 1 << (self.soc.cpuid(0x8000001F)[1] & 0x3F)

    def launch_secret(self, vm: Vm, header: bytes, trans: bytes, gpa: int,
                      guest_len: int | None = None) -> None:
        """KVM_SEV_LAUNCH_SECRET: hand the owner's packet (header, TRANS) to the firmware, which
        decrypts it into guest memory at ``gpa`` (``guest_len`` defaults to ``len(trans)``).

        Raises :class:`~sevemu.errors.VmError` when the VM is not between LAUNCH_MEASURE and
        LAUNCH_FINISH or the guest region is not physically contiguous,
        :class:`~sevemu.errors.MailboxError` when the firmware refuses the packet.
        """
        self._measured(vm, "LAUNCH_SECRET")
        length = len(trans) if guest_len is None else guest_len
        if gpa < 0 or length <= 0 or gpa + length > vm.memory:
            raise InputError(f"secret region {gpa:#x}+{length:#x} does not fit {vm.name}'s memory")
        vm.back_range(gpa, length)
        spa = vm.spa_of(gpa)
        for page in range((gpa & ~0xFFF) + PAGE, gpa + length, PAGE):
            if vm.spa_of(page) != spa + (page - gpa):
                raise VmError(f"secret region {gpa:#x}+{length:#x} of {vm.name} is not physically "
                              "contiguous (KVM: -EINVAL)")
        for line in range(spa & ~63, spa + length, 64):
            self.core.clflush(line)
        cmd = TransportCmd(
            handle=vm.handle,
            hdr_paddr=self.psp.put_data(header, _SECRET_HDR_OFFSET),
            hdr_len=len(header),
            guest_paddr=spa | self._cbit_mask(),
            guest_len=length,
            trans_paddr=self.psp.put_data(trans, _SECRET_TRANS_OFFSET),
            trans_len=len(trans),
        )
        self.psp.call(CommandId.LAUNCH_SECRET, cmd)

    def launch_finish(self, vm: Vm) -> None:
        """LAUNCH_FINISH: the measured (and possibly secret-provisioned) guest becomes RUNNING."""
        self._measured(vm, "LAUNCH_FINISH")
        self.psp.call(CommandId.LAUNCH_FINISH, HandleCmd(handle=vm.handle))
        vm.state = VmState.RUNNING

    def attestation_report(self, vm: Vm, mnonce: bytes) -> bytes:
        """KVM_SEV_GET_ATTESTATION_REPORT: the 0xD0-byte PEK-signed report for ``mnonce``.

        Like KVM, asks the firmware for the length first (INVALID_LENGTH with the length written
        back), then issues ATTESTATION with a buffer of that size.
        """
        if not vm.sev or not vm.handle:
            raise VmError(f"{vm.name} has no SEV guest context")
        if len(mnonce) != 16:
            raise InputError(f"MNONCE is 16 bytes, got {len(mnonce)}")
        status, out = self.psp.raw(CommandId.ATTESTATION,
                                   AttestationCmd(handle=vm.handle, mnonce=mnonce).encode())
        if status != Status.INVALID_LENGTH:
            raise MailboxError(CommandId.ATTESTATION.name, status, status_name(status))
        length = AttestationCmd.decode(out).len
        paddr = self.psp.put_data(bytes(length))
        self.psp.call(CommandId.ATTESTATION, AttestationCmd(handle=vm.handle, paddr=paddr, mnonce=mnonce,
                                                            len=length))
        return self.psp.get_data(LegacyAttestationReport.SIZE)

    # ---- debugging (DBG_DECRYPT / DBG_ENCRYPT) ----------------------------------------------------
    def _flush_guest_page(self, vm: Vm, spa: int) -> None:
        """Write back and invalidate the guest's cached lines of one page before the firmware
        touches it in DRAM (see the module docstring)."""
        if self.soc.cpuid(0x8000001F)[0] & _VMPAGE_FLUSH:
            self.core.vmpage_flush(spa & ~0xFFF, vm.asid)
        else:
            self.soc.wbinvd_all()

    def _dbg_chunks(self, vm: Vm, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """(GPA, SPA, length) per page of a 16-byte aligned range; the pages must be backed."""
        if not vm.sev or not vm.handle:
            raise VmError(f"{vm.name} has no SEV guest context")
        if gpa < 0 or gpa + length > vm.memory:
            raise InputError(f"range {gpa:#x}+{length:#x} does not fit {vm.name}'s memory")
        out = []
        pos = gpa
        while pos < gpa + length:
            n = min(PAGE - (pos & 0xFFF), gpa + length - pos)
            out.append((pos, vm.spa_of(pos), n))
            pos += n
        return out

    def dbg_decrypt(self, vm: Vm, gpa: int, length: int) -> bytes:
        """KVM_SEV_DBG_DECRYPT: ``length`` bytes of guest memory at ``gpa`` in plaintext.

        Refused by the firmware (POLICY_FAILURE in the raised MailboxError) when the guest's policy
        has NODBG.
        """
        start = gpa & ~15
        end = (gpa + length + 15) & ~15
        out = bytearray()
        for _, spa, n in self._dbg_chunks(vm, start, end - start):
            self._flush_guest_page(vm, spa)
            dst = self.psp.put_data(bytes(n))
            self.psp.call(CommandId.DBG_DECRYPT, DbgCmd(handle=vm.handle, src_paddr=spa | self._cbit_mask(),
                                                        dst_paddr=dst, len=n))
            out += self.psp.get_data(n)
        return bytes(out[gpa - start : gpa - start + length])

    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None:
        """KVM_SEV_DBG_ENCRYPT: write ``data`` into guest memory at ``gpa``, encrypted with the
        guest's key (unaligned ends: the enclosing 16-byte blocks are decrypted and patched first)."""
        start = gpa & ~15
        end = (gpa + len(data) + 15) & ~15
        plain = bytes(data)
        if (start, end) != (gpa, gpa + len(data)):
            buf = bytearray(self.dbg_decrypt(vm, start, end - start))
            buf[gpa - start : gpa - start + len(data)] = data
            plain = bytes(buf)
        for pos, spa, n in self._dbg_chunks(vm, start, end - start):
            self._flush_guest_page(vm, spa)
            src = self.psp.put_data(plain[pos - start : pos - start + n])
            self.psp.call(CommandId.DBG_ENCRYPT, DbgCmd(handle=vm.handle, src_paddr=src,
                                                        dst_paddr=spa | self._cbit_mask(), len=n))

    @staticmethod
    def _contiguous_runs(vm: Vm, gpa: int, length: int) -> list[tuple[int, int]]:
        """(SPA, length) runs of physically contiguous backing for a GPA range, rounded out to the
        SEV API's 16-byte granularity (as KVM does), so an owner measuring the regions as given
        gets the same digest when they are 16-byte aligned and sized."""
        start = gpa & ~15
        end = (gpa + length + 15) & ~15
        runs: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            n = min(PAGE - (pos & 0xFFF), end - pos)
            spa = vm.spa_of(pos)
            if runs and runs[-1][0] + runs[-1][1] == spa:
                runs[-1] = (runs[-1][0], runs[-1][1] + n)
            else:
                runs.append((spa, n))
            pos += n
        return runs

    def destroy(self, vm: Vm) -> None:
        """Tear ``vm`` down: DEACTIVATE and DECOMMISSION (SEV), free its memory, reclaim its ASID."""
        if vm.state is VmState.DESTROYED:
            return
        if vm.sev:
            # Guest-tagged lines must reach DRAM before the pages go back to the allocator: CLFLUSH
            # from the host cannot evict them, so WBINVD (KVM sev_vm_destroy).  Otherwise a later
            # write-back of a stale line would overwrite the pages' next owner.
            self.soc.wbinvd_all()
        if vm.sev and not vm.handle:
            self._sev_free = sorted({*self._sev_free, vm.asid})  # never activated: no flush needed
        if vm.sev and vm.handle:
            try:
                self.psp.call(CommandId.DEACTIVATE, HandleCmd(handle=vm.handle))
            except MailboxError as e:
                if e.status != Status.INACTIVE:
                    raise
            self.psp.call(CommandId.DECOMMISSION, HandleCmd(handle=vm.handle))
            self._reclaim.add(vm.asid)
        vm.release()
        vm.state = VmState.DESTROYED
        self.vms.remove(vm)

    def map_foreign(self, vm: Vm, gpa: int, other: Vm, other_gpa: int) -> None:
        """Point ``vm``'s page at ``gpa`` to the page backing ``other_gpa`` of ``other``.

        Nothing stops a hypervisor doing this; the victim's data then reaches ``vm`` decrypted with
        ``vm``'s own key (garbage).  Flushes ``vm``'s TLB entries on its next VMRUN.
        """
        vm.npt.map(gpa & ~0xFFF, other.spa_of(other_gpa) & ~0xFFF)
        for vcpu in vm.vcpus:
            vcpu.vmcb.tlb_control = TlbControl.FLUSH_ASID

    # ---- running ----------------------------------------------------------------------------------
    def run(self, vm: Vm, vcpu: Vcpu | int = 0, engine: Engine | None = None,
            max_exits: int = 1_000_000) -> RunResult:
        """VMRUN ``vcpu`` of ``vm`` until it halts, crashes, or ``max_exits`` exits were handled."""
        if vm.state is not VmState.RUNNING:
            raise VmError(f"{vm.name} is {vm.state.value}, not running")
        if isinstance(vcpu, int):
            if not 0 <= vcpu < len(vm.vcpus):
                raise VmError(f"{vm.name} has no vCPU {vcpu} ({len(vm.vcpus)} created)")
            v = vm.vcpus[vcpu]
        else:
            v = vcpu
        if engine is not None:
            v.engine = engine
        if v.engine is None:
            raise VmError(f"vCPU {v.index} of {vm.name} has nothing to run")
        if self._last_vmcb.get(v.vmcb.asid) is not v.vmcb:
            # Another VMCB (another vCPU, or a destroyed VM whose ASID was reused) ran with this
            # ASID on the core last: its translations must not be used (KVM pre_sev_run).
            self._last_vmcb[v.vmcb.asid] = v.vmcb
            v.vmcb.tlb_control = TlbControl.FLUSH_ASID
        for n in range(1, max_exits + 1):
            ex = self.core.vmrun(v.vmcb, v.engine)
            v.exits[ex.name] += 1
            v.last_exit = ex
            reason = self._handle_exit(vm, v, ex)
            if reason is not None:
                return RunResult(ex, reason, n)
        return RunResult(v.last_exit or VmExit(0), "exit budget exhausted", max_exits)

    def _handle_exit(self, vm: Vm, v: Vcpu, ex: VmExit) -> str | None:
        """Handle one exit; returns a reason to stop the run loop, or None to re-enter the guest."""
        vmcb = v.vmcb
        regs = vmcb.regs
        code = ex.code
        if code == ExitCode.NPF:
            gpa = ex.info2
            if ex.info1 & 1 or not 0 <= gpa < vm.memory:
                return self._crash(vm, f"unresolvable #NPF at GPA {gpa:#x} (EXITINFO1 {ex.info1:#x})")
            vm.back(gpa)
            return None
        if code == ExitCode.IOIO:
            port = ex.info1 >> 16
            size = (ex.info1 >> 4) & 0x7
            nbytes = {1: 1, 2: 2, 4: 4}.get(size, 1)
            if ex.info1 & 1:  # IN
                regs["rax"] = 0x20 if port == COM1 + 5 else (1 << (8 * nbytes)) - 1
            elif port == COM1:
                vm.console.append(regs["rax"] & 0xFF)
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.CPUID:
            a, b, c, d = self.soc.cpuid(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
            regs.update(rax=a, rbx=b, rcx=c, rdx=d)
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.MSR:
            if ex.info1 == 0:
                regs["rax"], regs["rdx"] = 0, 0
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.VMMCALL:
            regs["rax"] = self._hypercall(vm, regs)
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.HLT:
            vmcb.rip = vmcb.next_rip
            return "hlt"
        if code == ExitCode.INTR:
            # A physical interrupt (the host's timer) ended the guest's time slice: back to the
            # caller, which decides when to re-enter (the guest resumes where it was).
            return "intr"
        if code == ExitCode.SHUTDOWN:
            crash = getattr(v.engine, "crash", None)
            return self._crash(vm, f"triple fault (shutdown){': ' + crash if crash else ''}")
        if code == ExitCode.INVALID:
            return self._crash(vm, "VMRUN failed its consistency checks (VMEXIT_INVALID)")
        return self._crash(vm, f"unhandled exit {ex.name}")

    def _hypercall(self, vm: Vm, regs: dict[str, int]) -> int:
        if regs["rax"] == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = regs["rbx"], regs["rcx"], regs["rdx"]
            for i in range(npages):
                page = gpa + i * PAGE
                if attrs & _MAP_GPA_RANGE_ENCRYPTED:
                    vm.shared_gpas.discard(page)
                else:
                    vm.shared_gpas.add(page)
            return 0
        return (1 << 64) - 1000  # -KVM_ENOSYS

    @staticmethod
    def _crash(vm: Vm, reason: str) -> str:
        vm.state = VmState.CRASHED
        vm.crash_reason = reason
        return reason
