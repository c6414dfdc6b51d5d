"""SEV-SNP firmware ABI: command buffers, the guest policy, platform and guest status, the launch
structures (PAGE_INFO, ID block, ID authentication), the secrets and CPUID pages and TCB_VERSION
(SNP ABI 56860, the section of each command and structure; Linux ``include/linux/psp-sev.h``
``struct sev_data_snp_*`` and ``include/uapi/linux/psp-sev.h``; AMD sev-tool ``src/sevapi.h``;
Linux ``arch/x86/include/asm/sev.h`` for the secrets and CPUID pages).  Command ids are in
:mod:`sevemu.abi.commands`, status codes in :mod:`sevemu.abi.status`, the RMP in
:mod:`sevemu.abi.rmp`, the attestation report and guest messages in :mod:`sevemu.abi.report`.

Field names are Linux's where Linux declares the structure, the SNP ABI's otherwise, in snake_case.
Bit fields are bit layouts nested in their command buffer (e.g. ``SnpLaunchUpdateCmd.flags.page_type``);
a reserved bit set in a command buffer fails the decode, which the firmware dispatcher answers with
INVALID_PARAM.  The 64-bit guest policy is carried as the raw ``u64`` in command buffers and the ID
block (the firmware answers a bad policy with POLICY_FAILURE, not a decode error) and decoded with
:class:`SnpPolicy` where it is checked; the attestation report carries it as :class:`SnpPolicy`.

Decisions where the sources disagree or say nothing (change them here):

* PAGE_INFO bytes 0x64..0x67 are VMPL3, VMPL2, VMPL1 permissions and a reserved byte, as virtee/sev
  ``gctx.rs`` and sev-snp-measure ``gctx.py`` declare them (their digests match real hardware);
  sev-tool orders them reserved, VMPL1, VMPL2, VMPL3.  All tools leave them zero.
* SNP_PLATFORM_STATUS byte 0x03: bit 0 ``is_rmp_initialized`` (Linux), bit 1 ALIAS_CHECK_COMPLETE and
  bit 3 TIO_EN (virtee/sev, firmware 1.55.22+); the 32-bit flags word at 0x08 as Linux's uapi.
* SNP_GUEST_STATUS output: sev-tool's 0x20-byte ``snp_guest_status_buffer`` (policy, asid, state).
* SNP_LAUNCH_START byte 0x1C ``desired_tsc_khz`` (Linux; sev-tool: reserved).
* The secrets page is declared without version gating: TSC_FACTOR (0x160) and the SVSM fields are
  zero where a generation does not write them; the guest-OS area (0xA0..0xFF) is the guest's, so its
  reserved bytes are ignored rather than must-be-zero.
* The SNP_PAGE_RECLAIM / SNP_PAGE_UNSMASH address carries the page size in bit 0 (Linux); it stays
  a plain ``u64`` (:data:`PADDR_PAGE_SIZE_2M`), the firmware checks the alignment.
* The ECDSA P-384 public key (0x404) and signature (0x200) structures are the ones of the legacy
  SEV certificate (:class:`sevemu.abi.certs.SevEcPubKey`, :class:`~sevemu.abi.certs.SevEcdsaSig`);
  the SNP ABI uses the same format, so they are the same classes under SNP names.
* Commands without a layout here (PAGE_SWAP_OUT/IN, PAGE_MOVE, PAGE_MD_INIT, PAGE_SET_STATE,
  DOWNLOAD_FIRMWARE_EX) are left out of :data:`SNP_COMMAND_BUFFERS`.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from sevemu._util.units import PAGE
from sevemu.abi.certs import SevEcdsaSig, SevEcPubKey
from sevemu.abi.commands import CommandId
from sevemu.abi.struct import Struct, array, bit, bits, layout, nested, raw, u8, u16, u32, u64

__all__ = [
    "CPUID_COUNT_MAX",
    "ID_BLOCK_VERSION",
    "PADDR_PAGE_SIZE_2M",
    "PAGE_INFO_SIZE",
    "SECRETS_PAGE_VERSION",
    "SNP_ACTIVATE_EX_LENGTH",
    "SNP_COMMANDS_WITHOUT_BUFFER",
    "SNP_COMMAND_BUFFERS",
    "SNP_INIT_EX_LENGTH",
    "SNP_VLEK_HASHSTICK_SIZE",
    "VMSA_GPA",
    "EccCurve",
    "EcdsaPublicKey",
    "EcdsaSignature",
    "IdAuthInfo",
    "IdBlock",
    "KeyAlgo",
    "OvmfSectionType",
    "PageInfo",
    "SecretsOsArea",
    "SecretsPage",
    "SecretsPageFlags",
    "SnpActivateCmd",
    "SnpActivateExCmd",
    "SnpAddrCmd",
    "SnpCommitCmd",
    "SnpConfigCmd",
    "SnpConfigFlags",
    "SnpCpuidFunction",
    "SnpCpuidTable",
    "SnpDbgCmd",
    "SnpFeatureInfo",
    "SnpFeatureInfoCmd",
    "SnpFeatureInfoEbx",
    "SnpFeatureInfoEcx",
    "SnpGuestRequestCmd",
    "SnpGuestState",
    "SnpGuestStatus",
    "SnpGuestStatusCmd",
    "SnpInitExCmd",
    "SnpInitExFlags",
    "SnpLaunchFinishCmd",
    "SnpLaunchFinishFlags",
    "SnpLaunchStartCmd",
    "SnpLaunchStartFlags",
    "SnpLaunchUpdateCmd",
    "SnpLaunchUpdateFlags",
    "SnpPageCmd",
    "SnpPageType",
    "SnpPlatformFlags",
    "SnpPlatformInit",
    "SnpPlatformState",
    "SnpPlatformStatus",
    "SnpPolicy",
    "SnpShutdownExCmd",
    "SnpShutdownExFlags",
    "SnpVlekLoadCmd",
    "TcbVersion",
    "TcbVersionTurin",
    "WrappedVlekHashstick",
    "tcb_layout",
]


# --- states and codes ----------------------------------------------------------------------------


class SnpPlatformState(IntEnum):
    """SNP platform state (SNP_PLATFORM_STATUS byte 0x02; sev-tool ``SNP_PLATFORM_STATE``)."""

    UNINIT = 0
    INIT = 1


class SnpGuestState(IntEnum):
    """SNP guest context state (SNP_GUEST_STATUS; sev-tool ``SNP_GUEST_STATE``)."""

    INIT = 0
    LAUNCH = 1
    RUNNING = 2


class OvmfSectionType(IntEnum):
    """Types of OVMF's SEV metadata sections, the ranges a VMM prepares at an SNP launch (OvmfPkg
    ``ResetVector``; QEMU ``target/i386/sev.c`` ``OVMF_SECTION_TYPE_*``)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


class SnpPageType(IntEnum):
    """SNP_LAUNCH_UPDATE page types (Linux ``SNP_PAGE_TYPE_*``)."""

    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6


class KeyAlgo(IntEnum):
    """ID_KEY_ALGO / AUTH_KEY_ALGO and the report's SIGNATURE_ALGO (SNP ABI, signature algorithms)."""

    INVALID = 0
    ECDSA_P384_SHA384 = 1


class EccCurve(IntEnum):
    """``curve`` of the ECDSA public key structure (SNP ABI, ECDSA public key format)."""

    P384 = 2


class SnpFeatureInfoEcx(IntFlag):
    """SNP_FEATURE_INFO, sub-function 0, ECX (Linux ``SNP_*_SUPPORTED``)."""

    X86_SHUTDOWN = 1 << 1
    RAPL_DISABLE = 1 << 2
    CIPHERTEXT_HIDING = 1 << 3
    AES_256_XTS_POLICY = 1 << 4
    CXL_ALLOW_POLICY = 1 << 5


class SnpFeatureInfoEbx(IntFlag):
    """SNP_FEATURE_INFO, sub-function 0, EBX (Linux ``SNP_SEV_TIO_SUPPORTED``)."""

    SEV_TIO = 1 << 1


SNP_INIT_EX_LENGTH: Final = 0x40
SNP_ACTIVATE_EX_LENGTH: Final = 0x20
SNP_VLEK_HASHSTICK_SIZE: Final = 432
"""Size of the wrapped VLEK hashstick SNP_VLEK_LOAD reads (Linux ``sev_user_data_snp_wrapped_vlek_hashstick``)."""
PADDR_PAGE_SIZE_2M: Final = 1
"""Bit 0 of an SNP_PAGE_RECLAIM / SNP_PAGE_UNSMASH address: the page is 2 MiB."""
VMSA_GPA: Final = 0xFFFF_FFFF_F000
"""The GPA field of a VMSA page's PAGE_INFO and RMP entry (Linux KVM, sev-snp-measure)."""
PAGE_INFO_SIZE: Final = 0x70
ID_BLOCK_VERSION: Final = 1
SECRETS_PAGE_VERSION: Final = 2
"""Secrets page version sev-tool writes; newer firmware may report a higher one."""
CPUID_COUNT_MAX: Final = 64


# --- the guest policy and TCB_VERSION ------------------------------------------------------------


@layout(size=8)
class SnpPolicy(Struct):
    """The 64-bit SNP guest policy (SNP ABI, guest policy; Linux ``SNP_POLICY_MASK_*``).

    Bit 17 is reserved and must be one (``rsvd_mbo``, set by default); bits 63:26 must be zero.
    """

    abi_minor: int = bits(7, 0)
    abi_major: int = bits(15, 8)
    smt: bool = bit(16)
    rsvd_mbo: bool = bit(17, default=True)
    migrate_ma: bool = bit(18)
    debug: bool = bit(19)
    single_socket: bool = bit(20)
    cxl_allow: bool = bit(21)
    mem_aes_256_xts: bool = bit(22)
    rapl_dis: bool = bit(23)
    ciphertext_hiding_dram: bool = bit(24)
    page_swap_disable: bool = bit(25)


@layout(size=8)
class TcbVersion(Struct):
    """TCB_VERSION of Milan and Genoa (Linux ``sev_snp_tcb_version_genoa_milan``); bytes 2..5 reserved.

    Carried as a ``u64`` in reports and status buffers; decode it with :func:`tcb_layout`.
    """

    boot_loader: int = u8(0)
    tee: int = u8(1)
    snp: int = u8(6)
    microcode: int = u8(7)


@layout(size=8)
class TcbVersionTurin(Struct):
    """TCB_VERSION of Turin and later (Linux ``sev_snp_tcb_version_turin``); bytes 4..6 reserved."""

    fmc: int = u8(0)
    boot_loader: int = u8(1)
    tee: int = u8(2)
    snp: int = u8(3)
    microcode: int = u8(7)


def tcb_layout(product: str) -> type[TcbVersion | TcbVersionTurin]:
    """The TCB_VERSION layout of ``product`` (``Milan``, ``Genoa``, ``Turin``; case-insensitive).

    Zen 5 (Turin) and later use :class:`TcbVersionTurin`; Zen 3/4 parts :class:`TcbVersion`.
    """
    name = product.strip().lower()
    if name in ("milan", "genoa"):
        return TcbVersion
    if name == "turin":
        return TcbVersionTurin
    raise ValueError(f"no TCB_VERSION layout known for product {product!r}")


# --- platform commands ---------------------------------------------------------------------------


@layout(size=8)
class SnpAddrCmd(Struct):
    """One system-physical address: SNP_PLATFORM_STATUS (status page), SNP_GCTX_CREATE and
    SNP_DECOMMISSION (guest context page) (Linux ``sev_data_snp_addr``)."""

    address: int = u64(0x00)


@layout(size=4)
class SnpInitExFlags(Struct):
    """SNP_INIT_EX word at 0x00."""

    init_rmp: bool = bit(0)
    list_paddr_en: bool = bit(1)
    rapl_dis: bool = bit(2)
    ciphertext_hiding_en: bool = bit(3)
    tio_en: bool = bit(4)


@layout(size=SNP_INIT_EX_LENGTH)
class SnpInitExCmd(Struct):
    """SNP_INIT_EX (0x85) (Linux ``sev_data_snp_init_ex``); ``list_paddr`` points to a RANGE_LIST."""

    flags: SnpInitExFlags = nested(0x00, SnpInitExFlags)
    list_paddr: int = u64(0x08)
    max_snp_asid: int = u16(0x10)


@layout(size=4)
class SnpShutdownExFlags(Struct):
    iommu_snp_shutdown: bool = bit(0)
    x86_snp_shutdown: bool = bit(1)


@layout(size=8)
class SnpShutdownExCmd(Struct):
    """SNP_SHUTDOWN_EX (0x86) (Linux ``sev_data_snp_shutdown_ex``); ``len`` is 8."""

    len: int = u32(0x00, 8)
    flags: SnpShutdownExFlags = nested(0x04, SnpShutdownExFlags)


@layout(size=1)
class SnpPlatformInit(Struct):
    """SNP_PLATFORM_STATUS byte 0x03."""

    is_rmp_initialized: bool = bit(0)
    alias_check_complete: bool = bit(1)
    tio_en: bool = bit(3)


@layout(size=4)
class SnpPlatformFlags(Struct):
    """SNP_PLATFORM_STATUS word at 0x08 (Linux ``sev_user_data_snp_status``)."""

    mask_chip_id: bool = bit(0)
    mask_chip_key: bool = bit(1)
    vlek_en: bool = bit(2)
    feature_info: bool = bit(3)
    rapl_dis: bool = bit(4)
    ciphertext_hiding_cap: bool = bit(5)
    ciphertext_hiding_en: bool = bit(6)


@layout(size=0x20)
class SnpPlatformStatus(Struct):
    """SNP_PLATFORM_STATUS (0x83) output, written to :class:`SnpAddrCmd` ``address``.

    ``current_tcb`` / ``reported_tcb`` are TCB_VERSION values (:func:`tcb_layout`).
    """

    api_major: int = u8(0x00)
    api_minor: int = u8(0x01)
    state: int = u8(0x02)
    init: SnpPlatformInit = nested(0x03, SnpPlatformInit)
    build_id: int = u32(0x04)
    flags: SnpPlatformFlags = nested(0x08, SnpPlatformFlags)
    guest_count: int = u32(0x0C)
    current_tcb: int = u64(0x10)
    reported_tcb: int = u64(0x18)


@layout(size=4)
class SnpConfigFlags(Struct):
    mask_chip_id: bool = bit(0)
    mask_chip_key: bool = bit(1)


@layout(size=0x40)
class SnpConfigCmd(Struct):
    """SNP_CONFIG (0xC9) (Linux ``sev_user_data_snp_config``)."""

    reported_tcb: int = u64(0x00)
    flags: SnpConfigFlags = nested(0x08, SnpConfigFlags)


@layout(size=0x10)
class SnpVlekLoadCmd(Struct):
    """SNP_VLEK_LOAD (0xCD) (Linux ``sev_user_data_snp_vlek_load``); ``len`` is 0x10, version 0."""

    len: int = u32(0x00, 0x10)
    vlek_wrapped_version: int = u8(0x04)
    vlek_wrapped_address: int = u64(0x08)


@layout(size=SNP_VLEK_HASHSTICK_SIZE, ignored=((0x0C, 4), (0x198, 8)))
class WrappedVlekHashstick(Struct):
    """The wrapped VLEK hashstick SNP_VLEK_LOAD reads (AMD-ASPFW ``sev_rmp.h`` ``vlek_wrapped_t``;
    Linux ``sev_user_data_snp_wrapped_vlek_hashstick``, 432 bytes opaque to the host).

    ``vlek_wrapped`` holds eight 48-byte hashsticks (AMD-ASPFW ``vlek[8][PSP_HASHSTICK_LENGTH]``),
    AES-256-GCM encrypted under a chip-unique key with IV ``iv``; the additional data is the 16 bytes
    at 0x190 (``tcb_version`` and the reserved 8 bytes after it), the tag at 0x1A0.  The reserved
    bytes are not checked on decode: those at 0x198 are authenticated, those at 0x0C are not read
    (as AMD's firmware).
    """

    iv: bytes = raw(0x00, 12)
    vlek_wrapped: bytes = raw(0x10, 0x180)
    tcb_version: int = u64(0x190)
    auth_tag: bytes = raw(0x1A0, 16)


@layout(size=0x10)
class SnpFeatureInfoCmd(Struct):
    """SNP_FEATURE_INFO (0xCE) (Linux ``sev_data_snp_feature_info``); ``length`` is 0x10."""

    length: int = u32(0x00, 0x10)
    ecx_in: int = u32(0x04)
    feature_info_paddr: int = u64(0x08)


@layout(size=0x10)
class SnpFeatureInfo(Struct):
    """SNP_FEATURE_INFO output (Linux ``snp_feature_info``): :class:`SnpFeatureInfoEcx` / ``Ebx``."""

    eax: int = u32(0x00)
    ebx: int = u32(0x04)
    ecx: int = u32(0x08)
    edx: int = u32(0x0C)


@layout(size=4)
class SnpCommitCmd(Struct):
    """SNP_COMMIT (0xCB) (Linux ``sev_data_snp_commit``); ``len`` is 4."""

    len: int = u32(0x00, 4)


# --- guest management ----------------------------------------------------------------------------


@layout(size=0x0C)
class SnpActivateCmd(Struct):
    """SNP_ACTIVATE (0x91)."""

    gctx_paddr: int = u64(0x00)
    asid: int = u32(0x08)


@layout(size=SNP_ACTIVATE_EX_LENGTH)
class SnpActivateExCmd(Struct):
    """SNP_ACTIVATE_EX (0x95) (sev-tool ``snp_activate_ex_cmd_buf``); ``ids_paddr``: APIC ids."""

    ex_len: int = u32(0x00, SNP_ACTIVATE_EX_LENGTH)
    gctx_paddr: int = u64(0x08)
    asid: int = u32(0x10)
    num_ids: int = u32(0x14)
    ids_paddr: int = u64(0x18)


@layout(size=0x10)
class SnpGuestStatusCmd(Struct):
    """SNP_GUEST_STATUS (0x92); the firmware writes :class:`SnpGuestStatus` at ``address``."""

    gctx_paddr: int = u64(0x00)
    address: int = u64(0x08)


@layout(size=0x20)
class SnpGuestStatus(Struct):
    """SNP_GUEST_STATUS output (sev-tool ``snp_guest_status_buffer``); ``state``: :class:`SnpGuestState`."""

    policy: int = u64(0x00)
    asid: int = u32(0x08)
    state: int = u8(0x0C)


@layout(size=0x18)
class SnpGuestRequestCmd(Struct):
    """SNP_GUEST_REQUEST (0x94): request and response message pages (:mod:`sevemu.abi.report`)."""

    gctx_paddr: int = u64(0x00)
    req_paddr: int = u64(0x08)
    res_paddr: int = u64(0x10)


@layout(size=0x18)
class SnpDbgCmd(Struct):
    """SNP_DBG_DECRYPT (0xB0) / SNP_DBG_ENCRYPT (0xB1): one 4 KiB page."""

    gctx_paddr: int = u64(0x00)
    src_addr: int = u64(0x08)
    dst_addr: int = u64(0x10)


@layout(size=8)
class SnpPageCmd(Struct):
    """SNP_PAGE_RECLAIM (0xC7) / SNP_PAGE_UNSMASH (0xC8); bit 0 of ``paddr``: :data:`PADDR_PAGE_SIZE_2M`."""

    paddr: int = u64(0x00)


# --- launch --------------------------------------------------------------------------------------


@layout(size=4)
class SnpLaunchStartFlags(Struct):
    ma_en: bool = bit(0)
    imi_en: bool = bit(1)


@layout(size=0x30)
class SnpLaunchStartCmd(Struct):
    """SNP_LAUNCH_START (0xA0) (Linux ``sev_data_snp_launch_start``); ``policy``: :class:`SnpPolicy`."""

    gctx_paddr: int = u64(0x00)
    policy: int = u64(0x08)
    ma_gctx_paddr: int = u64(0x10)
    flags: SnpLaunchStartFlags = nested(0x18, SnpLaunchStartFlags)
    desired_tsc_khz: int = u32(0x1C)
    gosvw: bytes = raw(0x20, 16)


@layout(size=4)
class SnpLaunchUpdateFlags(Struct):
    """SNP_LAUNCH_UPDATE word at 0x08: page size (0 4 KiB, 1 2 MiB), :class:`SnpPageType`, IMI page."""

    page_size: int = bits(0, 0)
    page_type: int = bits(3, 1)
    imi_page: bool = bit(4)


@layout(size=0x20)
class SnpLaunchUpdateCmd(Struct):
    """SNP_LAUNCH_UPDATE (0xA1) (Linux ``sev_data_snp_launch_update``); ``address``: the page's SPA."""

    gctx_paddr: int = u64(0x00)
    flags: SnpLaunchUpdateFlags = nested(0x08, SnpLaunchUpdateFlags)
    address: int = u64(0x10)
    vmpl1_perms: int = u8(0x19)
    vmpl2_perms: int = u8(0x1A)
    vmpl3_perms: int = u8(0x1B)


@layout(size=8)
class SnpLaunchFinishFlags(Struct):
    id_block_en: bool = bit(0)
    auth_key_en: bool = bit(1)
    vcek_disabled: bool = bit(2)


@layout(size=0x40)
class SnpLaunchFinishCmd(Struct):
    """SNP_LAUNCH_FINISH (0xA2) (Linux ``sev_data_snp_launch_finish``): :class:`IdBlock`, :class:`IdAuthInfo`."""

    gctx_paddr: int = u64(0x00)
    id_block_paddr: int = u64(0x08)
    id_auth_paddr: int = u64(0x10)
    flags: SnpLaunchFinishFlags = nested(0x18, SnpLaunchFinishFlags)
    host_data: bytes = raw(0x20, 32)


@layout(size=PAGE_INFO_SIZE)
class PageInfo(Struct):
    """PAGE_INFO, hashed with SHA-384 into the launch digest by SNP_LAUNCH_UPDATE (SNP ABI,
    SNP_LAUNCH_UPDATE; virtee/sev ``gctx.rs``): digest = SHA-384(PageInfo(digest_cur=previous, ...))."""

    digest_cur: bytes = raw(0x00, 48)
    contents: bytes = raw(0x30, 48)
    length: int = u16(0x60, PAGE_INFO_SIZE)
    page_type: int = u8(0x62)
    imi_page: int = u8(0x63)
    vmpl3_perms: int = u8(0x64)
    vmpl2_perms: int = u8(0x65)
    vmpl1_perms: int = u8(0x66)
    gpa: int = u64(0x68)


@layout(size=0x60)
class IdBlock(Struct):
    """ID block of SNP_LAUNCH_FINISH (SNP ABI, ID_BLOCK; sev-tool ``snp_launch_finish_id_block``)."""

    ld: bytes = raw(0x00, 48)
    family_id: bytes = raw(0x30, 16)
    image_id: bytes = raw(0x40, 16)
    version: int = u32(0x50, ID_BLOCK_VERSION)
    guest_svn: int = u32(0x54)
    policy: int = u64(0x58)


EcdsaPublicKey = SevEcPubKey
"""ECDSA P-384 public key structure, 0x404 bytes: curve, QX, QY (72-byte little-endian each)."""
EcdsaSignature = SevEcdsaSig
"""ECDSA P-384 signature structure, 0x200 bytes: R, S (72-byte little-endian each)."""


@layout(size=PAGE)
class IdAuthInfo(Struct):
    """ID authentication information of SNP_LAUNCH_FINISH (sev-tool ``snp_launch_finish_id_auth_page``).

    ``id_block_sig`` signs the 0x60-byte ID block with the ID key; ``id_key_sig`` signs the 0x404-byte
    ``id_key`` with the author key.  The report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST are SHA-384 of the
    0x404-byte key structures.
    """

    id_key_algo: int = u32(0x000)
    auth_key_algo: int = u32(0x004)
    id_block_sig: SevEcdsaSig = nested(0x040, SevEcdsaSig)
    id_key: SevEcPubKey = nested(0x240, SevEcPubKey)
    id_key_sig: SevEcdsaSig = nested(0x680, SevEcdsaSig)
    author_key: SevEcPubKey = nested(0x880, SevEcPubKey)


# --- the pages the firmware writes ---------------------------------------------------------------


@layout(size=4)
class SecretsPageFlags(Struct):
    imien: bool = bit(0)


@layout(size=0x60, ignored=((0x18, 40),))
class SecretsOsArea(Struct):
    """The guest-OS area of the secrets page (Linux ``secrets_os_area``); the firmware leaves it alone."""

    msg_seqno_0: int = u32(0x00)
    msg_seqno_1: int = u32(0x04)
    msg_seqno_2: int = u32(0x08)
    msg_seqno_3: int = u32(0x0C)
    ap_jump_table_pa: int = u64(0x10)
    guest_usage: bytes = raw(0x40, 32)


@layout(size=PAGE)
class SecretsPage(Struct):
    """The secrets page SNP_LAUNCH_UPDATE (type SECRETS) writes (Linux ``snp_secrets_page``)."""

    version: int = u32(0x000, SECRETS_PAGE_VERSION)
    flags: SecretsPageFlags = nested(0x004, SecretsPageFlags)
    fms: int = u32(0x008)
    gosvw: bytes = raw(0x010, 16)
    vmpck0: bytes = raw(0x020, 32)
    vmpck1: bytes = raw(0x040, 32)
    vmpck2: bytes = raw(0x060, 32)
    vmpck3: bytes = raw(0x080, 32)
    os_area: SecretsOsArea = nested(0x0A0, SecretsOsArea)
    vmsa_tweak_bitmap: bytes = raw(0x100, 64)
    svsm_base: int = u64(0x140)
    svsm_size: int = u64(0x148)
    svsm_caa: int = u64(0x150)
    svsm_max_version: int = u32(0x158)
    svsm_guest_vmpl: int = u8(0x15C)
    tsc_factor: int = u32(0x160)

    def vmpck(self, index: int) -> bytes:
        """VMPCK ``index`` (0..3)."""
        keys = (self.vmpck0, self.vmpck1, self.vmpck2, self.vmpck3)
        if not 0 <= index < len(keys):
            raise ValueError(f"VMPCK index {index} is not 0..3")
        return keys[index]


@layout(size=0x30)
class SnpCpuidFunction(Struct):
    """One CPUID page entry (Linux ``snp_cpuid_fn``): inputs, then the EAX..EDX the guest will see."""

    eax_in: int = u32(0x00)
    ecx_in: int = u32(0x04)
    xcr0_in: int = u64(0x08)
    xss_in: int = u64(0x10)
    eax: int = u32(0x18)
    ebx: int = u32(0x1C)
    ecx: int = u32(0x20)
    edx: int = u32(0x24)


@layout(size=0x10 + CPUID_COUNT_MAX * 0x30)
class SnpCpuidTable(Struct):
    """The CPUID table at the start of the CPUID page (Linux ``snp_cpuid_table``, 0xC10 bytes; the
    rest of the 4 KiB page is not part of it): ``count`` valid entries of ``fn``."""

    count: int = u32(0x00)
    fn: tuple[SnpCpuidFunction, ...] = array(0x10, CPUID_COUNT_MAX, SnpCpuidFunction)


# --- dispatch tables -----------------------------------------------------------------------------

SNP_COMMAND_BUFFERS: Final[dict[CommandId, type[Struct]]] = {
    CommandId.SNP_PLATFORM_STATUS: SnpAddrCmd,
    CommandId.SNP_INIT_EX: SnpInitExCmd,
    CommandId.SNP_SHUTDOWN_EX: SnpShutdownExCmd,
    CommandId.SNP_DECOMMISSION: SnpAddrCmd,
    CommandId.SNP_ACTIVATE: SnpActivateCmd,
    CommandId.SNP_GUEST_STATUS: SnpGuestStatusCmd,
    CommandId.SNP_GCTX_CREATE: SnpAddrCmd,
    CommandId.SNP_GUEST_REQUEST: SnpGuestRequestCmd,
    CommandId.SNP_ACTIVATE_EX: SnpActivateExCmd,
    CommandId.SNP_LAUNCH_START: SnpLaunchStartCmd,
    CommandId.SNP_LAUNCH_UPDATE: SnpLaunchUpdateCmd,
    CommandId.SNP_LAUNCH_FINISH: SnpLaunchFinishCmd,
    CommandId.SNP_DBG_DECRYPT: SnpDbgCmd,
    CommandId.SNP_DBG_ENCRYPT: SnpDbgCmd,
    CommandId.SNP_PAGE_RECLAIM: SnpPageCmd,
    CommandId.SNP_PAGE_UNSMASH: SnpPageCmd,
    CommandId.SNP_CONFIG: SnpConfigCmd,
    CommandId.SNP_COMMIT: SnpCommitCmd,
    CommandId.SNP_VLEK_LOAD: SnpVlekLoadCmd,
    CommandId.SNP_FEATURE_INFO: SnpFeatureInfoCmd,
}
"""The buffer each SNP command reads (and possibly writes back)."""

SNP_COMMANDS_WITHOUT_BUFFER: Final = frozenset({CommandId.SNP_INIT, CommandId.SNP_SHUTDOWN, CommandId.SNP_DF_FLUSH})
"""SNP commands Linux issues with a NULL buffer."""
