"""An emulated SNP guest with its ``/dev/sev-guest``: what ``sevemu report`` / ``key`` /
``certificates`` and ``sevemu bench attest`` run on (the composition root of the guest request path).

:func:`launch` brings up an SNP host as Linux does, launches a guest through the KVM model
(KVM_SEV_INIT2, SNP_LAUNCH_START, a measured code page at GPA 0, the secrets page at GPA 0x1000, the
VMSA at LAUNCH_FINISH), shares three pages for the guest-request channel, installs the host's
certificate table (the VCEK, ASK and ARK of the emulated AMD, GUIDs of the GHCB specification) and
opens the guest driver (:class:`sevemu.guest.sev_guest.SevGuestDevice`) on the guest's secrets page.

The guest's read of its own secrets page is the model's stand-in for the guest CPU's C=1 load (SNP
guests running their driver on the vCPU are another piece of work): the page is read through the
memory controller with the guest's ASID after WBINVD -- never through a host interface, which sees only
ciphertext.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sevemu._util.units import PAGE, MiB
from sevemu.abi.report import CERT_GUID_ARK, CERT_GUID_ASK, CERT_GUID_VCEK, CERT_GUID_VLEK, encode_cert_table
from sevemu.abi.status import status_name
from sevemu.amd.snp import AmdSnpRoot
from sevemu.crypto.vcek import HWID_SIZE
from sevemu.errors import InputError
from sevemu.firmware.snp import snp_state
from sevemu.guest.sev_guest import GuestSecrets, SevGuestDevice
from sevemu.hypervisor.guest_request import GuestRequests, VmGuestChannel, guest_requests
from sevemu.hypervisor.kvm_ops import KvmSev, KvmSevCmdId, KvmSevInit, KvmVmType
from sevemu.hypervisor.sev import snp
from sevemu.hypervisor.sevdev import SevDevice
from sevemu.hypervisor.uapi import (
    KvmSevSnpLaunchFinish,
    KvmSevSnpLaunchStart,
    KvmSevSnpLaunchUpdate,
    SevUserCmd,
    SevUserDataGetId,
    SevUserDataSnpVlekLoad,
)
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import Machine, amd_registry, amd_vault_dir, build_machine, default_amd_root

__all__ = ["SECRETS_GPA", "SnpGuestVm", "launch"]

CODE_GPA = 0x0
SECRETS_GPA = 0x1000
CHANNEL_GPA = 0x10_0000  # request, response, then the certificate pages
CERT_PAGES = 4
POLICY = 0x30000


@dataclass
class SnpGuestVm:
    """A launched SNP guest, its host, the host's guest-request service and the guest's driver."""

    machine: Machine
    vm: Vm
    device: SevGuestDevice
    service: GuestRequests
    root: AmdSnpRoot
    vcek: x509.Certificate
    vlek_cert: x509.Certificate | None = None
    """The VLEK certificate the host serves (a VLEK was loaded with its certificate), else None."""

    @property
    def measurement(self) -> bytes:
        """The launch digest the firmware computed (what the report must state)."""
        return snp_state(self.machine.firmware).guests[self.vm.snp_context].ld


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def launch(generation: str = "milan", *, seed: str | None = None, image: bytes = b"sevemu snp guest",
           host_data: bytes = bytes(32), platform_dir: str | Path | None = None, vmpck: int = 0,
           certificates: bool = True, vlek: bytes | None = None,
           vlek_cert: x509.Certificate | None = None) -> SnpGuestVm:
    """Launch an SNP guest of ``generation`` and open its ``/dev/sev-guest`` (module docstring);
    ``vlek``: a wrapped VLEK hashstick the host loads first (``/dev/sev`` SNP_VLEK_LOAD), and
    ``vlek_cert`` its certificate: the host's certificate table is then VLEK, ASVK (under the ASK's
    GUID, as the GHCB specification has no ASVK GUID) and ARK; with a VLEK but no certificate the
    host installs no table (the VCEK's would not verify what the VLEK signs)."""
    m = build_machine(generation, dram_size=1024 * MiB, cache_size=1 * MiB, init=False, seed=seed,
                      platform_dir=platform_dir)
    snp.platform_init(m.hv.sev)
    m.hv.platform_init()
    vm = m.hv.create_vm("snp-guest", 16 * MiB, vm_type=KvmVmType.SNP_VM)
    kvm, dev = KvmSev(m.hv, vm), SevDevice(m.hv)
    if vlek is not None:
        load = dev.ioctl_raw(SevUserCmd.SNP_VLEK_LOAD, SevUserDataSnpVlekLoad(vlek_wrapped_address=vlek))
        if load.ret:
            raise InputError(f"SNP_VLEK_LOAD: errno {-load.ret}, firmware status {status_name(load.error)} "
                             f"({load.error:#x})")
    kvm.op(KvmSevCmdId.INIT2, KvmSevInit())
    vm.add_vcpu()
    kvm.op(KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart(policy=POLICY), sev_fd=dev)
    code = image.ljust(-(-max(len(image), 1) // PAGE) * PAGE, b"\0")
    kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=CODE_GPA // PAGE, uaddr=code,
                                                                 len=len(code), type=1), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate(gfn_start=SECRETS_GPA // PAGE, uaddr=bytes(PAGE),
                                                                 len=PAGE, type=5), sev_fd=dev)
    kvm.op(KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish(host_data=host_data), sev_fd=dev)

    # the guest's own (C=1) read of its secrets page
    m.soc.wbinvd_all()
    secrets = m.soc.mc.read(vm.spa_of(SECRETS_GPA), PAGE, vm.asid, True)

    channel = VmGuestChannel(m.hv, vm, CHANNEL_GPA, CHANNEL_GPA + PAGE, CHANNEL_GPA + 2 * PAGE, CERT_PAGES)
    channel.share()
    service = guest_requests(m.hv)
    vault = amd_vault_dir()
    root = AmdSnpRoot.for_root(m.amd_root or default_amd_root(m.soc.profile.name),
                               None if vault is None else vault / m.soc.profile.name / "snp")
    # as the KDS: the chip AMD recorded under the hwid the host reads with GET_ID (no composition
    # reads the chip's fuses)
    gen = m.soc.profile.name
    ident = dev.issue(SevUserCmd.GET_ID, SevUserDataGetId()).data
    assert isinstance(ident, SevUserDataGetId)
    chip = amd_registry().chip(gen, bytes(ident.socket1[:HWID_SIZE[gen]]))
    if chip is None:
        raise InputError(f"the emulated AMD has no record of this {gen} chip (made by another vault?): "
                         "its VCEK cannot be issued")
    vcek = root.issue_vcek(chip, snp_state(m.firmware).reported_tcb)
    der = serialization.Encoding.DER
    if certificates and vlek is None:
        service.set_certificates(encode_cert_table([(CERT_GUID_VCEK, vcek.public_bytes(der)),
                                                    (CERT_GUID_ASK, root.ask.public_bytes(der)),
                                                    (CERT_GUID_ARK, root.ark.public_bytes(der))]))
    elif certificates and vlek_cert is not None:
        service.set_certificates(encode_cert_table([(CERT_GUID_VLEK, vlek_cert.public_bytes(der)),
                                                    (CERT_GUID_ASK, root.asvk.public_bytes(der)),
                                                    (CERT_GUID_ARK, root.ark.public_bytes(der))]))
    device = SevGuestDevice(channel, GuestSecrets(secrets), vmpck)
    return SnpGuestVm(m, vm, device, service, root, vcek, vlek_cert if vlek is not None else None)
