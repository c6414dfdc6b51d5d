"""The user-space ABI of the host's SEV stack: Linux's ioctl numbers, command ids and user structures.

Two interfaces, as on Linux:

* ``ioctl(vm_fd, KVM_MEMORY_ENCRYPT_OP, struct kvm_sev_cmd)`` with a sub-command of
  :class:`KvmSevCmdId` and its ``struct kvm_sev_*`` (Linux include/uapi/linux/kvm.h ``enum
  sev_cmd_id``; Documentation/virt/kvm/x86/amd-memory-encryption.rst);
* ``ioctl(sev_fd, SEV_ISSUE_CMD, struct sev_issue_cmd)`` on ``/dev/sev`` with a command of
  :class:`SevUserCmd` and its ``struct sev_user_data_*`` (Linux include/uapi/linux/psp-sev.h).

The structures are mutable dataclasses with the C field names (padding omitted).  User memory is
modelled as host buffers: a pointer to user data is the buffer itself -- ``bytes`` for input, a
``bytearray`` the kernel copies into for output, ``None`` for NULL (:data:`UserBuffer`); a pointer
into guest RAM is an ``int`` (the VMM maps guest RAM at ``KvmSev.ram_base``).  What each command
does with its structure is declared once, for both interfaces, in :mod:`sevemu.hypervisor.ioctl`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from sevemu._util.units import KiB
from sevemu.hypervisor.errors import Errno, SevInputError
from sevemu.hypervisor.vcpu import KvmVmType

__all__ = [
    "GHCB_VERSION_MAX",
    "GHCB_VERSION_MIN",
    "KVM_MEMORY_ENCRYPT_OP",
    "KVM_SEV_SNP_FINISH_DATA_SIZE",
    "KVM_SEV_SNP_ID_AUTH_SIZE",
    "KVM_SEV_SNP_ID_BLOCK_SIZE",
    "KVM_SEV_SNP_PAGE_TYPES",
    "SEV_FW_BLOB_MAX_SIZE",
    "SEV_ISSUE_CMD",
    "KvmSevAttestationReport",
    "KvmSevCertExport",
    "KvmSevCmdId",
    "KvmSevData",
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
    "KvmSevSnpLaunchFinish",
    "KvmSevSnpLaunchStart",
    "KvmSevSnpLaunchUpdate",
    "KvmVmType",
    "NoData",
    "SevUserCmd",
    "SevUserData",
    "SevUserDataGetId",
    "SevUserDataGetId2",
    "SevUserDataPdhCertExport",
    "SevUserDataPekCertImport",
    "SevUserDataPekCsr",
    "SevUserDataSnpConfig",
    "SevUserDataSnpStatus",
    "SevUserDataSnpVlekLoad",
    "SevUserDataStatus",
    "UserBuffer",
    "UserFields",
    "copy_from_user",
    "copy_to_user",
    "ioc",
]


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Linux ``_IOC(dir, type, nr, size)`` (x86: dir bits 31:30, size 29:16, type 15:8, nr 7:0)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_READ_WRITE: Final = 3
SEV_ISSUE_CMD: Final = ioc(_IOC_READ_WRITE, ord("S"), 0, 16)
"""``_IOWR('S', 0x0, struct sev_issue_cmd)`` = 0xC0105300."""
KVM_MEMORY_ENCRYPT_OP: Final = ioc(_IOC_READ_WRITE, 0xAE, 0xBA, 8)
"""``_IOWR(KVMIO, 0xba, unsigned long)``."""

SEV_FW_BLOB_MAX_SIZE: Final = 16 * KiB
"""Largest blob the drivers copy from or to user space (Linux ``SEV_FW_BLOB_MAX_SIZE``)."""

UserBuffer = bytes | bytearray | None
"""A user-space pointer in this model: the buffer itself (``None`` is NULL)."""
UserFields = Mapping[str, "int | bytes | bytearray | None"]
"""A user structure given as a mapping of its field names (unknown names: ``-EINVAL``)."""


def copy_from_user(buf: UserBuffer, length: int) -> bytes:
    """``psp_copy_user_blob``: NULL, zero length or more than 16 KiB -> ``-EINVAL``; short -> ``-EFAULT``."""
    if buf is None or length == 0 or length > SEV_FW_BLOB_MAX_SIZE:
        raise SevInputError(Errno.EINVAL, f"user blob of {length} bytes at {'NULL' if buf is None else 'a buffer'}")
    if not isinstance(buf, (bytes, bytearray)) or len(buf) < length:
        raise SevInputError(Errno.EFAULT, f"user buffer shorter than the {length} bytes claimed")
    return bytes(buf[:length])


def copy_to_user(buf: object, data: bytes) -> None:
    """``copy_to_user``: the destination must be a writable buffer of at least ``len(data)`` bytes."""
    if not isinstance(buf, bytearray) or len(buf) < len(data):
        raise SevInputError(Errno.EFAULT, f"user buffer cannot take {len(data)} bytes")
    buf[: len(data)] = data


@dataclass
class NoData:
    """The structure of a command that takes none (its ``data`` is ignored)."""


# ---- KVM_MEMORY_ENCRYPT_OP (include/uapi/linux/kvm.h) ----------------------------------------
class KvmSevCmdId(enum.IntEnum):
    """``enum sev_cmd_id`` (Linux include/uapi/linux/kvm.h)."""

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


GHCB_VERSION_MIN: Final = 1
GHCB_VERSION_MAX: Final = 2
"""The GHCB protocol versions KVM supports (Linux ``GHCB_VERSION_MIN``/``_MAX``; KVM_SEV_INIT2
makes 2 the default of an SEV-ES VM, KVM_SEV_ES_INIT keeps 1)."""


@dataclass
class KvmSevInit:
    """``struct kvm_sev_init`` (KVM_SEV_INIT2): ``vmsa_features`` (the VMSA's ``sev_features``),
    ``flags`` (none defined: non-zero is ``-EINVAL``), ``ghcb_version`` (0: KVM's default), padding
    KVM does not look at."""

    vmsa_features: int = 0
    flags: int = 0
    ghcb_version: int = 0
    pad1: int = 0
    pad2: tuple[int, ...] = (0,) * 8


@dataclass
class KvmSevSnpLaunchStart:
    """``struct kvm_sev_snp_launch_start`` (KVM_SEV_SNP_LAUNCH_START): the 64-bit SNP ``policy``,
    ``gosvw`` (16 bytes), ``flags`` (none defined: non-zero is ``-EINVAL``), padding."""

    policy: int = 0
    gosvw: bytes = bytes(16)
    flags: int = 0
    pad0: bytes = bytes(6)
    pad1: tuple[int, ...] = (0,) * 4


KVM_SEV_SNP_PAGE_TYPES: Final = {1: "NORMAL", 3: "ZERO", 4: "UNMEASURED", 5: "SECRETS", 6: "CPUID"}
"""``KVM_SEV_SNP_PAGE_TYPE_*`` KVM_SEV_SNP_LAUNCH_UPDATE accepts (the firmware's page types; VMSA pages
are KVM's own, at SNP_LAUNCH_FINISH)."""


@dataclass
class KvmSevSnpLaunchUpdate:
    """``struct kvm_sev_snp_launch_update``: ``gfn_start``, ``uaddr`` (the data, 4 KiB aligned in Linux;
    ignored for ZERO pages), ``len`` (a non-zero multiple of 4 KiB), ``type``, ``flags`` (none);
    on return ``gfn_start``/``uaddr``/``len`` describe what was not processed."""

    gfn_start: int = 0
    uaddr: UserBuffer = None
    len: int = 0
    type: int = 0
    pad0: int = 0
    flags: int = 0
    pad1: int = 0
    pad2: tuple[int, ...] = (0,) * 4


KVM_SEV_SNP_ID_BLOCK_SIZE: Final = 96
KVM_SEV_SNP_ID_AUTH_SIZE: Final = 4096
KVM_SEV_SNP_FINISH_DATA_SIZE: Final = 32


@dataclass
class KvmSevSnpLaunchFinish:
    """``struct kvm_sev_snp_launch_finish``: the ID block (96 bytes) and ID auth page (4096) when
    ``id_block_en``, ``auth_key_en``, ``vcek_disabled``, ``host_data`` (32 bytes), ``flags`` (none)."""

    id_block_uaddr: UserBuffer = None
    id_auth_uaddr: UserBuffer = None
    id_block_en: int = 0
    auth_key_en: int = 0
    vcek_disabled: int = 0
    host_data: bytes = bytes(32)
    pad0: bytes = bytes(3)
    flags: int = 0
    pad1: tuple[int, ...] = (0,) * 4


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
    """``struct kvm_sev_launch_update_data``: ``uaddr`` in guest RAM (``KvmSev.hva``)."""

    uaddr: int = 0
    len: int = 0


@dataclass
class _Transport:
    """The fields ``struct kvm_sev_launch_secret``, ``_send_update_data`` and
    ``_receive_update_data`` share: a header, a guest range (RAM), a transport buffer."""

    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    guest_uaddr: int = 0
    guest_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevLaunchSecret(_Transport):
    """``struct kvm_sev_launch_secret``: header and transport buffers in, guest range (RAM) out."""


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
class KvmSevSendUpdateData(_Transport):
    """``struct kvm_sev_send_update_data``: one guest page at most; header and transport out."""


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
class KvmSevReceiveUpdateData(_Transport):
    """``struct kvm_sev_receive_update_data``: header and transport in, one guest page."""


@dataclass
class _VmsaTransport:
    """One vCPU's VMSA packet (AMD's out-of-tree layout; upstream KVM has none)."""

    vcpu_id: int = 0
    hdr_uaddr: UserBuffer = None
    hdr_len: int = 0
    trans_uaddr: UserBuffer = None
    trans_len: int = 0


@dataclass
class KvmSevSendUpdateVmsa(_VmsaTransport):
    """SEND_UPDATE_VMSA of one vCPU: header and transport out."""


@dataclass
class KvmSevReceiveUpdateVmsa(_VmsaTransport):
    """RECEIVE_UPDATE_VMSA of one vCPU: header and transport in."""


@dataclass
class KvmSevCertExport:
    """CERT_EXPORT (sevemu extension): PDH and PEK || OCA || CEK out, lengths in/out."""

    pdh_cert_uaddr: UserBuffer = None
    pdh_cert_len: int = 0
    cert_chain_uaddr: UserBuffer = None
    cert_chain_len: int = 0


KvmSevData = (KvmSevInit | KvmSevLaunchStart | KvmSevLaunchUpdateData | KvmSevLaunchSecret | KvmSevLaunchMeasure
              | KvmSevGuestStatus | KvmSevDbg | KvmSevAttestationReport | KvmSevSendStart
              | KvmSevSendUpdateData | KvmSevSendUpdateVmsa | KvmSevReceiveStart | KvmSevReceiveUpdateData
              | KvmSevReceiveUpdateVmsa | KvmSevCertExport | KvmSevSnpLaunchStart | KvmSevSnpLaunchUpdate
              | KvmSevSnpLaunchFinish | NoData)
"""Any ``struct kvm_sev_*`` (the ``data`` of :class:`KvmSevCmd`)."""


# ---- /dev/sev (include/uapi/linux/psp-sev.h) -------------------------------------------------
class SevUserCmd(enum.IntEnum):
    """The user command ids of ``SEV_ISSUE_CMD`` (Linux include/uapi/linux/psp-sev.h)."""

    FACTORY_RESET = 0
    PLATFORM_STATUS = 1
    PEK_GEN = 2
    PEK_CSR = 3
    PDH_GEN = 4
    PDH_CERT_EXPORT = 5
    PEK_CERT_IMPORT = 6
    GET_ID = 7
    GET_ID2 = 8
    SNP_PLATFORM_STATUS = 9
    SNP_COMMIT = 10
    SNP_SET_CONFIG = 11
    SNP_VLEK_LOAD = 12


@dataclass
class SevUserDataStatus:
    """``struct sev_user_data_status`` (out): ``flags`` bit 0 owner, bit 8 CONFIG_ES."""

    api_major: int = 0
    api_minor: int = 0
    state: int = 0
    flags: int = 0
    build: int = 0
    guest_count: int = 0


@dataclass
class SevUserDataSnpStatus:
    """``struct sev_user_data_snp_status`` (SNP_PLATFORM_STATUS, out): the firmware's status buffer
    by Linux's field names (the bit fields as booleans)."""

    api_major: int = 0
    api_minor: int = 0
    state: int = 0
    is_rmp_initialized: bool = False
    build_id: int = 0
    mask_chip_id: bool = False
    mask_chip_key: bool = False
    vlek_en: bool = False
    feature_info: bool = False
    rapl_dis: bool = False
    ciphertext_hiding_cap: bool = False
    ciphertext_hiding_en: bool = False
    guest_count: int = 0
    current_tcb_version: int = 0
    reported_tcb_version: int = 0


@dataclass
class SevUserDataSnpConfig:
    """``struct sev_user_data_snp_config`` (SNP_SET_CONFIG, in): ``reported_tcb`` (0: the current one),
    ``mask_chip_id``, ``mask_chip_key``."""

    reported_tcb: int = 0
    mask_chip_id: int = 0
    mask_chip_key: int = 0


@dataclass
class SevUserDataSnpVlekLoad:
    """``struct sev_user_data_snp_vlek_load`` (SNP_VLEK_LOAD, in): ``len`` = 16 (its size),
    ``vlek_wrapped_version`` 0, ``vlek_wrapped_address`` the 432-byte wrapped hashstick
    (``struct sev_user_data_snp_wrapped_vlek_hashstick``)."""

    len: int = 16
    vlek_wrapped_version: int = 0
    vlek_wrapped_address: UserBuffer = None


@dataclass
class SevUserDataPekCsr:
    """``struct sev_user_data_pek_csr``: ``address`` out (0x824-byte CSR), ``length`` in/out."""

    address: UserBuffer = None
    length: int = 0


@dataclass
class SevUserDataPekCertImport:
    """``struct sev_user_data_pek_cert_import``: the OCA-signed PEK and the OCA (in)."""

    pek_cert_address: UserBuffer = None
    pek_cert_len: int = 0
    oca_cert_address: UserBuffer = None
    oca_cert_len: int = 0


@dataclass
class SevUserDataPdhCertExport:
    """``struct sev_user_data_pdh_cert_export``: PDH and PEK || OCA || CEK (out), lengths in/out."""

    pdh_cert_address: UserBuffer = None
    pdh_cert_len: int = 0
    cert_chain_address: UserBuffer = None
    cert_chain_len: int = 0


@dataclass
class SevUserDataGetId:
    """``struct sev_user_data_get_id`` (out): one 64-byte ID per socket."""

    socket1: bytes = field(default=bytes(64))
    socket2: bytes = field(default=bytes(64))


@dataclass
class SevUserDataGetId2:
    """``struct sev_user_data_get_id2``: ``address`` out, ``length`` in/out."""

    address: UserBuffer = None
    length: int = 0


SevUserData = (SevUserDataStatus | SevUserDataPekCsr | SevUserDataPekCertImport | SevUserDataPdhCertExport
               | SevUserDataGetId | SevUserDataGetId2 | SevUserDataSnpStatus | SevUserDataSnpConfig
               | SevUserDataSnpVlekLoad | NoData)
"""Any ``struct sev_user_data_*`` (the ``data`` of ``struct sev_issue_cmd``)."""
