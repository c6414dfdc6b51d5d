"""The KVM-like hypervisor: platform bring-up, ASIDs, VM lifecycle, SEV launch, the vCPU run loop.

This is the Python API a VMM written in Python uses; the SEV work itself is done by the flows of
:mod:`sevemu.hypervisor.sev` (the same ones ``KVM_MEMORY_ENCRYPT_OP`` and ``/dev/sev`` drive), after
the checks this API adds.  Flows follow Linux KVM (arch/x86/kvm/svm/sev.c):

* ``platform_init``: INIT through the PSP driver (with SEV-ES and its TMR wherever the CPU has SEV-ES,
  as Linux's sev-dev does), then WBINVD on every CPU and DF_FLUSH, as Linux does right after INIT.
* ``create_vm``: KVM_CREATE_VM with a VM type (``KvmVmType``: the default, ``SEV_VM``, ``SEV_ES_VM``)
  and a vCPU type (QEMU's ``-cpu``); each vCPU starts in the x86 reset state
  (:mod:`sevemu.hypervisor.vcpu`).
* ASIDs (:mod:`sevemu.hypervisor.asid`): SEV guests get [EDX, ECX], SEV-ES guests [1, EDX-1], plain
  guests ASIDs above ECX.  Freed SEV ASIDs wait in a reclaim set; when no fresh ASID is left the
  hypervisor does WBINVD on all CPUs then DF_FLUSH and reuses them (``sev_flush_asids``) -- the
  firmware refuses an ACTIVATE that skipped either step.
* ``launch`` (SEV) = ``launch_measure`` + ``launch_finish``.  ``launch_measure``: the VM gets its SEV
  context, the host backs and fills the image's pages; LAUNCH_START (new VEK; with the guest
  owner's GODH certificate and session blob when given), ACTIVATE; LAUNCH_UPDATE_DATA of each region
  rounded out to 16 bytes, per physically contiguous run after CLFLUSH; LAUNCH_MEASURE, whose blob
  goes to the owner; for an SEV-ES guest every vCPU's VMSA before LAUNCH_MEASURE
  (:func:`~sevemu.hypervisor.sev.es.launch_update_vmsa`).  Between the two, ``launch_secret`` (KVM_SEV_LAUNCH_SECRET) injects an
  owner-sealed packet at a GPA (physically contiguous backing: ``VmError`` otherwise).
  ``launch_finish``: LAUNCH_FINISH.
* ``attestation_report`` (KVM_SEV_GET_ATTESTATION_REPORT): length query, then ATTESTATION with the
  caller's MNONCE.
* ``dbg_decrypt`` / ``dbg_encrypt`` (KVM_SEV_DBG_DECRYPT / _ENCRYPT): page by page through bounce
  buffers, 16-byte aligned firmware accesses (unaligned ends are read-modify-written); the
  guest's cached lines of each page are written back first (VMPAGE_FLUSH when CPUID
  Fn8000_001F EAX[2] has it, else WBINVD): a host CLFLUSH cannot evict guest-tagged lines.
* ``run``: VMRUN until an exit the run loop cannot handle itself.  #NPF inside guest memory backs
  the page (demand paging); port I/O, MMIO and device MSRs go to the VM's devices (``vm.devices``,
  :mod:`sevemu.hypervisor.devices`: COM1 is the serial console); CPUID returns the host's values
  (including Fn8000_001F, so a guest learns its C-bit); VMMCALL implements KVM_HC_MAP_GPA_RANGE, by
  which an SEV guest announces pages it made shared.  HLT returns to the caller, and so does INTR
  (the host timer ended the guest's time slice: the caller re-enters); SHUTDOWN, an unresolvable
  #NPF or VMEXIT_INVALID mark the VM crashed.
* ``destroy``: WBINVD, DEACTIVATE, DECOMMISSION, the vCPUs' engines closed, every page (guest
  memory, nested page tables, VMSAs) back to the host allocators, the ASID to the reclaim set.

Errors: what the firmware refuses is a :class:`~sevemu.hypervisor.errors.SevFirmwareError` (a
``MailboxError`` with the status); a wrong VM state a ``VmError``; a bad argument an ``InputError``
(:mod:`sevemu.hypervisor.errors`: each also carries the errno the ioctls would return).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sevemu._util.units import PAGE, MiB, align_down, align_up
from sevemu.abi.paging import ExitCode
from sevemu.abi.pycode import CODE_GPA, code_table
from sevemu.abi.sev import GuestStatusCmd, MeasureBuf, PlatformStatus
from sevemu.errors import InputError, VmError
from sevemu.hw.cpu import Engine
from sevemu.hw.host import HostSoc
from sevemu.hw.svm import TlbControl, Vmcb, VmExit
from sevemu.hypervisor import ap_creation, emulate, psc
from sevemu.hypervisor.asid import AsidPool
from sevemu.hypervisor.devices import COM1
from sevemu.hypervisor.errors import Errno, SevFirmwareError, SevInputError
from sevemu.hypervisor.ghcb import GhcbHandler
from sevemu.hypervisor.memory import PageAllocator
from sevemu.hypervisor.psp import PspDriver
from sevemu.hypervisor.sev.es import guest_init2 as init2
from sevemu.hypervisor.sev.es import launch_update_vmsa
from sevemu.hypervisor.sev.legacy import GRANULE, LegacySev
from sevemu.hypervisor.uapi import KvmSevInit
from sevemu.hypervisor.vcpu import HOST_CPU, KvmVmType, cpu_model
from sevemu.hypervisor.vm import Vcpu, Vm, VmKind, VmState

__all__ = ["COM1", "KVM_HC_MAP_GPA_RANGE", "Hypervisor", "RunResult"]

KVM_HC_MAP_GPA_RANGE = 12
_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
_KVM_ENOSYS = (1 << 64) - 1000  # -KVM_ENOSYS as a 64-bit register value
_KVM_EINVAL = (1 << 64) - 22  # -EINVAL
_NPF_RSVD = 1 << 3
_IOIO_STR = 1 << 2
_INDEXED_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F, 0x20, 0x23, 0x24,
                             0x8000_001D, 0x8000_0020, 0x8000_0026})
_NPF_RMP = 1 << 31
_IOIO, _NPF, _VMGEXIT = int(ExitCode.IOIO), int(ExitCode.NPF), int(ExitCode.VMGEXIT)
_EXIT_NAMES = {int(c): c.name for c in ExitCode}  # (VmExit.name, for the counts of a run)
_IOIO_SIZE = {1: 1, 2: 2, 4: 4}  # IOIO EXITINFO1 bits 6:4 (SZ32, SZ16, SZ8) -> bytes

# The host's reserved memory, from the bottom: [1 MiB, +4 KiB) command buffer, [2 MiB, 3 MiB) the
# SEV-ES TMR (1 MiB aligned), [4 MiB, 12 MiB) the PSP bounce area (big enough for the largest
# buffer Linux's page allocator hands out, 4 MiB: SEV_GET_ID2), then page-table and VMSA pages.
_CMD_BUFFER = 1 * MiB
_TMR = 2 * MiB
_BOUNCE, _BOUNCE_LEN = 4 * MiB, 8 * MiB
_TABLES = 12 * MiB


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
        self.psp = PspDriver(self.core, soc.mailbox, buffer_spa=_CMD_BUFFER, data_spa=_BOUNCE, data_len=_BOUNCE_LEN)
        self.tmr_spa = _TMR
        self.tables = PageAllocator(self.core, _TABLES, host_reserved)
        self.pages = PageAllocator(self.core, host_reserved, soc.dram_size)
        self.asids = AsidPool(soc.profile)
        self.sev = LegacySev(soc, self.psp, self.asids, self.tables, self.tmr_spa)
        """The SEV flows (platform and guests) this host runs."""
        self.vms: list[Vm] = []
        self.cpuid_overrides: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        """CPUID results the VMM sets for its guests, by (leaf, subleaf)."""
        self.ghcb = GhcbHandler(self)
        """VMGEXIT of SEV-ES guests: the GHCB MSR protocol and the NAE events (:mod:`sevemu.hypervisor.ghcb`)."""
        psc.install(self.ghcb, self.sev)  # SNP page-state changes (sevemu.hypervisor.psc)
        ap_creation.install(self.ghcb)  # SNP AP creation (sevemu.hypervisor.ap_creation)
        self._last_vmcb: dict[int, Vmcb] = {}  # ASID -> the VMCB that last ran with it on the core

    @property
    def asid_flushes(self) -> int:
        """How many times reclaimed ASIDs were made reusable (WBINVD + DF_FLUSH)."""
        return self.asids.flushes

    # ---- platform ------------------------------------------------------------------------------
    def snp_platform_init(self) -> None:
        """Bring SEV-SNP up before the legacy INIT, as Linux's sev-dev does (SNP_EN, SNP_INIT,
        :func:`sevemu.hypervisor.sev.snp.platform_init`); the GHCB then reports SNP to guests."""
        from sevemu.hypervisor.sev import snp

        snp.platform_init(self.sev)
        psc.report_snp(self.ghcb)

    def platform_init(self, es: bool | None = None) -> None:
        """INIT the SEV firmware, with SEV-ES and its TMR when ``es`` -- by default wherever the CPU
        has SEV-ES, as Linux's sev-dev does -- then WBINVD + DF_FLUSH."""
        self.sev.platform_init(es)

    def platform_status(self) -> PlatformStatus:
        return self.sev.platform_status()

    def guest_status(self, vm: Vm) -> GuestStatusCmd:
        return self.sev.guest_status(vm)

    def flush_asids(self) -> None:
        """Make reclaimed ASIDs reusable: WBINVD on every CPU, then DF_FLUSH (``sev_flush_asids``)."""
        self.sev.flush_asids()

    # ---- VM lifecycle ---------------------------------------------------------------------------
    def create_vm(self, name: str, memory: int, kind: VmKind = VmKind.SEV, *,
                  vm_type: KvmVmType = KvmVmType.DEFAULT_VM, vcpu_type: str = HOST_CPU) -> Vm:
        """A new VM of ``memory`` bytes (a positive multiple of 4 KiB); memory is backed on demand.

        ``vm_type`` is KVM_CREATE_VM's type: ``SEV_VM`` / ``SEV_ES_VM`` make a VM that becomes a guest
        through KVM_SEV_INIT2 (the Python API's launch does it implicitly); a type the host cannot
        run (SEV-ES without SEV-ES ASIDs, SNP, software-protected) is ``-EINVAL``, as
        ``kvm_is_vm_type_supported`` answers.  ``vcpu_type``: QEMU's ``-cpu`` (an EPYC model or
        ``host``), whose CPUID signature each vCPU has in RDX at reset.
        """
        if memory <= 0 or memory % PAGE:
            raise InputError(f"VM memory must be a positive multiple of 4 KiB, got {memory:#x}")
        if memory > self.soc.dram_size:
            raise InputError(f"VM memory {memory:#x} exceeds the host's {self.soc.dram_size:#x} bytes of DRAM")
        vm_type = KvmVmType(vm_type)
        supported = {KvmVmType.DEFAULT_VM, KvmVmType.SEV_VM} | ({KvmVmType.SEV_ES_VM} if self.sev.caps.es else set())
        if self.sev.snp:  # SNP_INIT done (sevemu.hypervisor.sev.snp.platform_init)
            supported.add(KvmVmType.SNP_VM)
        if vm_type not in supported:
            raise SevInputError(Errno.EINVAL, f"VM type {vm_type.name} is not supported by this host "
                                              f"(supported: {', '.join(t.name for t in sorted(supported))})")
        if vm_type.needs_init2 and kind is not VmKind.SEV:
            raise SevInputError(Errno.EINVAL, f"a {vm_type.name} needs an SEV ASID, not a {kind.value} VM")
        cpu = cpu_model(vcpu_type, self.soc.cpuid(1)[0])
        asid = self.sev.asid_new(kind)
        vm = Vm(name, kind, memory, asid, self.core, self.pages, self.tables, vm_type=vm_type, cpu=cpu)
        self.vms.append(vm)
        return vm

    def sev_init(self, vm: Vm, data: KvmSevInit | None = None) -> None:
        """KVM_SEV_INIT2 for a VM created with an SEV type (``struct kvm_sev_init``, default: no
        ``vmsa_features``, KVM's GHCB version): before the VM's first vCPU, as QEMU does it right
        after creating the VM.  A VM of an SEV type launched without it gets the default one."""
        init2(self.sev, vm, data if data is not None else KvmSevInit())

    def launch(self, vm: Vm, regions: list[tuple[int, bytes]], policy: int = 0, *,
               godh_cert: bytes | None = None, session: bytes | None = None,
               programs: Iterable[object] = (), code_gpa: int = CODE_GPA) -> bytes:
        """Load ``regions`` (GPA, bytes) into ``vm`` and, for SEV, run the whole measured launch.

        ``godh_cert`` and ``session`` are the guest owner's GODH certificate and session buffer
        (both or neither).  ``programs``: the Python workloads (generator functions) that are this
        guest's code; see :meth:`launch_measure`.  Returns the LAUNCH_MEASURE blob (MEASURE || MNONCE) for SEV guests, b""
        for plain ones.  To inject secrets, use :meth:`launch_measure`, :meth:`launch_secret` and
        :meth:`launch_finish` instead.
        """
        measure = self.launch_measure(vm, regions, policy, godh_cert=godh_cert, session=session,
                                      programs=programs, code_gpa=code_gpa)
        if vm.sev:
            self.launch_finish(vm)
        return measure

    def launch_measure(self, vm: Vm, regions: list[tuple[int, bytes]], policy: int = 0, *,
                       godh_cert: bytes | None = None, session: bytes | None = None,
                       programs: Iterable[object] = (), code_gpa: int = CODE_GPA) -> bytes:
        """LAUNCH_START .. LAUNCH_MEASURE for ``vm``; returns the 0x30-byte measurement blob.

        The VM stays LAUNCHING (firmware state LSECRET) until :meth:`launch_finish`; a plain VM is
        loaded and RUNNING at once (b"" returned).  A refused LAUNCH_START raises
        :class:`~sevemu.errors.MailboxError` and leaves the VM CREATED.  Each region is measured
        rounded out to the SEV API's 16-byte granularity, so an owner measuring the regions as
        given gets the same digest when they are 16-byte aligned and sized.

        ``programs`` binds Python workloads to the guest: their program table
        (:func:`sevemu.abi.pycode.code_table`) becomes the last region, at ``code_gpa`` (default
        :data:`~sevemu.abi.pycode.CODE_GPA`; a :class:`~sevemu.hw.pyengine.PyEngine` is told where
        when not there), measured like the rest; an SEV guest runs no other Python workload
        (:mod:`sevemu.hw.codefetch`).  An owner measures ``regions`` followed by the table.
        """
        if vm.state is not VmState.CREATED:
            raise VmError(f"{vm.name} was already launched")
        programs = list(programs)
        if programs:
            table = code_table(programs)
            if code_gpa % PAGE or not 0 <= code_gpa <= vm.memory - PAGE:
                raise InputError(f"the program table's GPA {code_gpa:#x} is no page of {vm.name}'s memory")
            for gpa, data in regions:
                if gpa < code_gpa + PAGE and gpa + len(data) > code_gpa:
                    raise InputError(f"image region {gpa:#x}+{len(data):#x} overlaps the program table's page "
                                     f"at GPA {code_gpa:#x}")
            regions = [*regions, (code_gpa, table)]
        if (godh_cert is None) != (session is None):
            raise InputError("an owner session needs both the GODH certificate and the session buffer")
        for gpa, data in regions:
            if gpa < 0 or gpa + len(data) > vm.memory:
                raise InputError(
                    f"image region {gpa:#x}+{len(data):#x} does not fit {vm.name}'s {vm.memory:#x} bytes"
                )
        sev = self.sev
        sev.context(vm)  # the implicit KVM_SEV_INIT (a VM of an SEV type: KVM_SEV_INIT2)
        vm.state = VmState.LAUNCHING
        for gpa, data in regions:
            vm.back_range(gpa, len(data))
            vm.host_write(gpa, data)
        if not vm.sev:
            vm.state = VmState.RUNNING
            return b""
        try:
            sev.launch_start(vm, policy, godh_cert, session)
        except SevFirmwareError:
            vm.state = VmState.CREATED
            raise
        for gpa, data in regions:
            start = align_down(gpa, GRANULE)
            end = align_up(gpa + len(data), GRANULE)
            if end > start:
                sev.launch_update_data(vm, start, end - start)
        if vm.es:  # every vCPU's VMSA, in vCPU order, after the data (as QEMU does)
            launch_update_vmsa(sev, vm)
        return sev.launch_measure(vm, MeasureBuf.SIZE).blobs[0]

    def _measured(self, vm: Vm, what: str) -> None:
        if not vm.sev or vm.state is not VmState.LAUNCHING or not vm.measurement:
            raise VmError(f"{what} needs an SEV guest measured and not yet finished; {vm.name} is "
                          f"{vm.state.value}")

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
        self.sev.launch_secret(vm, gpa, length, header, trans)

    def launch_finish(self, vm: Vm) -> None:
        """LAUNCH_FINISH: the measured (and possibly secret-provisioned) guest becomes RUNNING."""
        self._measured(vm, "LAUNCH_FINISH")
        self.sev.launch_finish(vm)

    def _has_context(self, vm: Vm) -> None:
        if not vm.sev or not vm.handle:
            raise VmError(f"{vm.name} has no SEV guest context")
        self.sev.context(vm)

    def attestation_report(self, vm: Vm, mnonce: bytes) -> bytes:
        """KVM_SEV_GET_ATTESTATION_REPORT: the 0xD0-byte PEK-signed report for ``mnonce``.

        Like KVM, asks the firmware for the length first (INVALID_LENGTH with the length written
        back), then issues ATTESTATION with a buffer of that size.
        """
        self._has_context(vm)
        if len(mnonce) != 16:
            raise InputError(f"MNONCE is 16 bytes, got {len(mnonce)}")
        return self.sev.fetch(lambda length: self.sev.attestation(vm, mnonce, length)).blobs[0]

    # ---- debugging (DBG_DECRYPT / DBG_ENCRYPT) ----------------------------------------------------
    def _debug_range(self, vm: Vm, gpa: int, length: int) -> None:
        self._has_context(vm)
        if gpa < 0 or gpa + length > vm.memory:
            raise InputError(f"range {gpa:#x}+{length:#x} does not fit {vm.name}'s memory")

    def dbg_decrypt(self, vm: Vm, gpa: int, length: int) -> bytes:
        """KVM_SEV_DBG_DECRYPT: ``length`` bytes of guest memory at ``gpa`` in plaintext.

        Refused by the firmware (POLICY_FAILURE in the raised MailboxError) when the guest's policy
        has NODBG.
        """
        self._debug_range(vm, gpa, length)
        return self.sev.dbg_decrypt(vm, gpa, length)

    def dbg_encrypt(self, vm: Vm, gpa: int, data: bytes) -> None:
        """KVM_SEV_DBG_ENCRYPT: write ``data`` into guest memory at ``gpa``, encrypted with the
        guest's key (unaligned ends: the enclosing 16-byte blocks are decrypted and patched first)."""
        self._debug_range(vm, gpa, len(data))
        self.sev.dbg_encrypt(vm, gpa, bytes(data))

    def destroy(self, vm: Vm) -> None:
        """Tear ``vm`` down: DEACTIVATE and DECOMMISSION (SEV), close its vCPUs' engines, give every
        page it held back, reclaim its ASID."""
        if vm.state is VmState.DESTROYED:
            return
        self.sev.decommission(vm)
        for vcpu in vm.vcpus:
            close = getattr(vcpu.engine, "close", None)
            if callable(close):
                close()  # an engine's private copies of guest pages go with it
            vcpu.engine = None
            if self._last_vmcb.get(vcpu.vmcb.asid) is vcpu.vmcb:
                del self._last_vmcb[vcpu.vmcb.asid]
        self.ghcb.forget(vm)
        vm.release()
        vm.state = VmState.DESTROYED
        self.vms.remove(vm)

    def map_foreign(self, vm: Vm, gpa: int, other: Vm, other_gpa: int) -> None:
        """Point ``vm``'s page at ``gpa`` to the page backing ``other_gpa`` of ``other``.

        Nothing stops a hypervisor doing this; the victim's data then reaches ``vm`` decrypted with
        ``vm``'s own key (garbage).  Flushes ``vm``'s TLB entries on its next VMRUN.
        """
        vm.npt.map(align_down(gpa, PAGE), align_down(other.spa_of(other_gpa), PAGE))
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
        if v.reset_hold:  # parked (SEV-ES AP reset hold) until another vCPU releases it
            return RunResult(v.last_exit or VmExit(ExitCode.VMGEXIT), "hold", 0)
        if self._last_vmcb.get(v.vmcb.asid) is not v.vmcb:
            # Another VMCB (another vCPU, or a destroyed VM whose ASID was reused) ran with this
            # ASID on the core last: its translations must not be used (KVM pre_sev_run).
            self._last_vmcb[v.vmcb.asid] = v.vmcb
            v.vmcb.tlb_control = TlbControl.FLUSH_ASID
        vmrun, handle, vmgexit = self.core.vmrun, self._handle_exit, self.ghcb.vmgexit
        names = _EXIT_NAMES
        counts: dict[int, int] = {}  # exits by code, added to v.exits when the loop ends (a Counter's += costs more)
        try:
            for n in range(1, max_exits + 1):
                ex = vmrun(v.vmcb, v.engine)
                code = ex.code
                counts[code] = counts.get(code, 0) + 1
                v.last_exit = ex
                # (VMGEXIT straight to the GHCB handler, as _handle_exit would send it)
                reason = vmgexit(vm, v) if code == _VMGEXIT else handle(vm, v, ex)
                if reason is not None:
                    return RunResult(ex, reason, n)
        finally:
            exits = v.exits
            for code, k in counts.items():
                name = names.get(code)
                exits[f"0x{code:x}" if name is None else name] += k
        return RunResult(v.last_exit or VmExit(0), "exit budget exhausted", max_exits)

    def _handle_exit(self, vm: Vm, v: Vcpu, ex: VmExit) -> str | None:
        """Handle one exit; returns a reason to stop the run loop, or None to re-enter the guest."""
        vmcb = v.vmcb
        regs = vmcb.regs
        code = ex.code
        if code == _IOIO:  # (the exit codes are compared as plain ints: an IntEnum member lookup costs more)
            if ex.info1 & _IOIO_STR:  # INS/OUTS: the instruction emulator (sevemu.hypervisor.emulate)
                why = emulate.string_io(vm, v, ex, self.port_in, self.port_out)
                return None if why is None else self._crash(vm, why)
            port = ex.info1 >> 16
            nbytes = _IOIO_SIZE.get((ex.info1 >> 4) & 0x7, 1)
            if ex.info1 & 1:  # IN: AL/AX merge into RAX, EAX zero-extends (KVM complete_fast_pio_in)
                keep = regs["rax"] & ~((1 << (8 * nbytes)) - 1) if nbytes < 4 else 0
                regs["rax"] = keep | self.port_in(vm, port, nbytes)
            else:
                self.port_out(vm, port, nbytes, regs["rax"])
            vmcb.rip = vmcb.next_rip
            return None
        if code == _NPF:
            gpa = ex.info2
            if ex.info1 & _NPF_RMP and vm.snp:
                why = psc.rmp_fault(self.sev, vm, gpa, ex.info1)
                return None if why is None else self._crash(vm, why)
            if ex.info1 & _NPF_RSVD and gpa & ~0xFFF in vm.mmio and not v.guest_state_protected:
                return self._crash(vm, f"MMIO at GPA {gpa:#x} by a guest whose registers the host cannot "
                                       "emulate here (instruction emulation is not modelled)")
            if ex.info1 & 1 or not 0 <= gpa < vm.memory:
                return self._crash(vm, f"unresolvable #NPF at GPA {gpa:#x} (EXITINFO1 {ex.info1:#x})")
            vm.back(gpa)
            if vm.snp:
                why = psc.gmem_fault(self.sev, vm, gpa, ex.info1)
                return None if why is None else self._crash(vm, why)
            return None
        if code == _VMGEXIT:
            return self.ghcb.vmgexit(vm, v)
        if code == ExitCode.CPUID:
            a, b, c, d = self.cpuid(regs["rax"] & 0xFFFFFFFF, regs["rcx"] & 0xFFFFFFFF)
            regs.update(rax=a, rbx=b, rcx=c, rdx=d)
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.MSR:
            if ex.info1 == 0:
                value = self.msr_read(vm, regs["rcx"] & 0xFFFFFFFF)
                regs["rax"], regs["rdx"] = value & 0xFFFFFFFF, value >> 32
            vmcb.rip = vmcb.next_rip
            return None
        if code == ExitCode.VMMCALL:
            regs["rax"] = self.hypercall(vm, regs)
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

    # ---- the services exits use (also the GHCB's NAE events: sevemu.hypervisor.ghcb.NaeHost) ----------
    def cpuid(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """CPUID as the host answers a guest: the host's values (Fn8000_001F included), or what the
        VMM put in :attr:`cpuid_overrides` (KVM_SET_CPUID2: the host decides what guests see)."""
        if leaf not in _INDEXED_LEAVES:  # ECX is not an input of this leaf (KVM: no SIGNIFCANT_INDEX)
            subleaf = 0
        forced = self.cpuid_overrides.get((leaf, subleaf))
        return forced if forced is not None else self.soc.cpuid(leaf, subleaf)

    @property
    def cbit(self) -> int:
        """The C-bit position guests are told (GHCB SEV information)."""
        return int(self.sev.caps.me_mask).bit_length() - 1

    def port_in(self, vm: Vm, port: int, size: int) -> int:
        """IN from the VM's devices (:attr:`Vm.devices <sevemu.hypervisor.vm.Vm.devices>`: COM1 is the
        serial console; ports no device decodes read all ones)."""
        return vm.devices.io_read(port, size)

    def port_out(self, vm: Vm, port: int, size: int, value: int) -> None:
        """OUT to the VM's devices (COM1 is the serial console)."""
        vm.devices.io_write(port, size, value)

    def port_out_sink(self, vm: Vm, port: int, size: int) -> Callable[[int], None]:
        """:meth:`port_out` of ``size`` bytes to ``port`` of ``vm`` as one callable of the value (the
        GHCB's known OUT, :mod:`sevemu.hypervisor.ghcb`): the device bus's own
        (:meth:`DeviceBus.out_sink <sevemu.hypervisor.devices.bus.DeviceBus.out_sink>`) while
        :meth:`port_out` is this class's -- which is exactly that bus's ``io_write`` --, else
        :meth:`port_out` with these arguments (a subclass's, or one set on the instance)."""
        if getattr(self.port_out, "__func__", None) is Hypervisor.port_out:
            return vm.devices.out_sink(port, size)
        return functools.partial(self.port_out, vm, port, size)

    def msr_read(self, vm: Vm, msr: int) -> int:
        """An intercepted RDMSR: a device's MSR (the LAPIC's IA32_APIC_BASE, :mod:`sevemu.hypervisor.
        devices`), else 0."""
        value = vm.devices.msr_read(msr)
        return 0 if value is None else value

    def msr_write(self, vm: Vm, msr: int, value: int) -> None:
        """An intercepted WRMSR: to a device's MSR, else ignored."""
        vm.devices.msr_write(msr, value)

    def mmio_read(self, vm: Vm, gpa: int, size: int) -> bytes:
        """MMIO read from the VM's devices or one of its emulated pages (all ones elsewhere)."""
        if vm.devices.decodes(gpa):
            return vm.devices.mmio_read(gpa, size).to_bytes(size, "little")
        page = vm.mmio.get(gpa & ~0xFFF)
        off = gpa & 0xFFF
        if page is None or off + size > PAGE:
            return b"\xff" * size
        return bytes(page[off : off + size])

    def mmio_write(self, vm: Vm, gpa: int, data: bytes) -> None:
        """MMIO write to the VM's devices or one of its emulated pages (ignored elsewhere)."""
        if vm.devices.decodes(gpa):
            vm.devices.mmio_write(gpa, len(data), int.from_bytes(data, "little"))
            return
        page = vm.mmio.get(gpa & ~0xFFF)
        off = gpa & 0xFFF
        if page is not None and off + len(data) <= PAGE:
            page[off : off + len(data)] = data

    def add_mmio(self, vm: Vm, gpa: int) -> None:
        """Emulate an MMIO page at ``gpa``: its NPT entry gets a reserved bit, so every access is an
        NPF with RSVD, which an SEV-ES guest takes as #VC 0x400 (APM2 15.35.5)."""
        page = align_down(gpa, PAGE)
        if not 0 <= page < vm.memory:
            raise InputError(f"MMIO GPA {gpa:#x} is outside {vm.name}'s memory")
        vm.mmio.setdefault(page, bytearray(PAGE))
        vm.npt.map(page, vm.back(page) | (1 << (50 if self.cbit == 51 else 51)))  # reserved above MAXPHYADDR
        for vcpu in vm.vcpus:
            vcpu.vmcb.tlb_control = TlbControl.FLUSH_ASID

    def hypercall(self, vm: Vm, regs: dict[str, int]) -> int:
        """VMMCALL: KVM_HC_MAP_GPA_RANGE; -KVM_ENOSYS for anything else."""
        return self._hypercall(vm, regs)

    def _hypercall(self, vm: Vm, regs: dict[str, int]) -> int:
        if regs["rax"] == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = regs["rbx"], regs["rcx"], regs["rdx"]
            if vm.snp:  # the RMP follows (sevemu.hypervisor.psc)
                try:
                    for i in range(npages):
                        psc.set_page_state(self.sev, vm, gpa + i * PAGE, bool(attrs & _MAP_GPA_RANGE_ENCRYPTED))
                except psc.PscError:
                    return _KVM_EINVAL
                return 0
            for i in range(npages):
                page = gpa + i * PAGE
                if attrs & _MAP_GPA_RANGE_ENCRYPTED:
                    vm.shared_gpas.discard(page)
                else:
                    vm.shared_gpas.add(page)
            return 0
        return _KVM_ENOSYS

    @staticmethod
    def _crash(vm: Vm, reason: str) -> str:
        vm.state = VmState.CRASHED
        vm.crash_reason = reason
        return reason
