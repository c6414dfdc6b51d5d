"""SNP launch: SNP_LAUNCH_UPDATE (every page type) and SNP_LAUNCH_FINISH (ID block, ID authentication,
host data) (SNP ABI 56860, SNP_LAUNCH_UPDATE / SNP_LAUNCH_FINISH; AMD-ASPFW ``sev_mcmd.c``
``snp_mcmd_launch_update`` / ``snp_mcmd_launch_finish`` for the checks, their order and the measurement).

The launch digest: GCTX.LD starts as 48 zero bytes; every 4 KiB of every update (a 2 MiB update is 512
of them, the GPA advancing by 4 KiB) replaces it with SHA-384 of a PAGE_INFO (:class:`~sevemu.abi.snp.PageInfo`)
holding the previous LD, the page's CONTENTS, its type, the VMPL1-3 permissions and its GPA (the one
the RMP entry names).  CONTENTS is SHA-384 of the plaintext for NORMAL and VMSA pages (for a VMSA with
GUEST_TSC_SCALE / GUEST_TSC_OFFSET measured as zero), 48 zero bytes for ZERO, UNMEASURED, SECRETS and
CPUID pages.  The page is then encrypted in place with the guest's key and its RMP entry goes from
Pre-Guest to Guest-Valid (Validated by the firmware, Immutable cleared, the VMPL1-3 permissions of the
command, RMP.VMSA for a VMSA page).

The secrets page (SNP ABI "Secrets Page"; Linux ``snp_secrets_page``): version 2, IMIEN, the CPUID
family/model/stepping, GOSVW from LAUNCH_START, VMPCK0-3, and from Zen 4 the TSC factor (model
choice: 0); the VMSA tweak bitmap is zero (the model applies no VMSA register tweak).

The CPUID page (:mod:`sevemu.firmware.snp.cpuid`): a page that fails validation is written back with
the corrected values, unencrypted, and the command answers INVALID_PARAM with the page still
Pre-Guest and the digest unchanged (Linux ``snp_launch_update`` then copies the corrected page back to
the VMM).
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import PAGE, PAGE_2M
from sevemu.abi.commands import CommandId
from sevemu.abi.rmp import VMPL_PERM_MASK, RmpPageState
from sevemu.abi.snp import (
    IdAuthInfo,
    IdBlock,
    KeyAlgo,
    PageInfo,
    SecretsPage,
    SecretsPageFlags,
    SnpGuestState,
    SnpLaunchFinishCmd,
    SnpLaunchUpdateCmd,
    SnpPageType,
)
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct
from sevemu.crypto import ecc, pagehash
from sevemu.errors import AddressError, FirmwareError, InputError, LayoutError, VerificationError
from sevemu.firmware.core import ANY_STATE, Firmware
from sevemu.firmware.sha_engine import engaged
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.cpuid import sanitize_cpuid_page
from sevemu.firmware.snp.state import SnpGuest, snp_state

__all__ = ["measure_pages", "page_info_digest"]

_ZERO_CONTENTS: Final = bytes(48)
_VMSA_TSC: Final = slice(0x2F0, 0x300)  # GUEST_TSC_SCALE, GUEST_TSC_OFFSET (sev_es_save_area)
_FOUR_K_ONLY: Final = {SnpPageType.VMSA, SnpPageType.SECRETS, SnpPageType.CPUID}


_TEMPLATES: dict[tuple[int, int, int, int, int], bytes] = {}
"""PAGE_INFO templates by (page type, IMI, VMPL1, VMPL2, VMPL3 permissions)."""


def _template(page_type: int, vmpl_perms: tuple[int, int, int], imi_page: bool) -> bytes:
    """The PAGE_INFO of a command with its fixed fields (type, IMI, VMPL1-3 permissions) filled,
    digest, contents and GPA zero (built once per kind of command)."""
    key = (page_type, int(imi_page), *vmpl_perms)
    info = _TEMPLATES.get(key)
    if info is None:
        if len(_TEMPLATES) >= 64:
            _TEMPLATES.clear()
        info = _TEMPLATES[key] = PageInfo(page_type=page_type, imi_page=int(imi_page), vmpl1_perms=vmpl_perms[0],
                                          vmpl2_perms=vmpl_perms[1], vmpl3_perms=vmpl_perms[2]).encode()
    return info


def page_info_digest(ld: bytes, contents: bytes, page_type: int, gpa: int, vmpl_perms: tuple[int, int, int] = (0, 0, 0),
                     imi_page: bool = False) -> bytes:
    """SHA-384 of the PAGE_INFO that chains ``ld`` with one 4 KiB page (``vmpl_perms``: VMPL1, 2, 3)."""
    info = bytearray(_template(page_type, vmpl_perms, imi_page))
    info[0x00:0x30] = ld
    info[0x30:0x60] = contents
    info[0x68:0x70] = gpa.to_bytes(8, "little")
    return hashlib.sha384(info).digest()


def measure_pages(ld: bytes, data: bytes, page_type: int, gpa: int, vmpl_perms: tuple[int, int, int] = (0, 0, 0),
                  imi_page: bool = False) -> bytes:
    """The launch digest after ``ld`` is chained with every 4 KiB page of ``data`` (GPAs from ``gpa``)
    as measured pages: CONTENTS = SHA-384 of the page.  The same digest as :func:`page_info_digest` page
    by page, in one call (:func:`sevemu.crypto.pagehash.measure_pages`)."""
    return pagehash.measure_pages(ld, _template(page_type, vmpl_perms, imi_page), gpa, data)


_VMPCKS: Final = slice(SecretsPage.offset_of("vmpck0"), SecretsPage.offset_of("vmpck3") + 32)
assert [SecretsPage.offset_of(f"vmpck{i}") for i in range(4)] == list(range(_VMPCKS.start, _VMPCKS.stop, 32))
_SECRETS: dict[tuple[bool, int, bytes], bytes] = {}
"""Secrets pages with zero VMPCKs by (IMIEN, FMS, GOSVW): a guest's page is one with its keys put in."""


def _secrets(fw: Firmware, g: SnpGuest) -> bytes:
    """The guest's secrets page: the encoding of its :class:`SecretsPage`, its four 32-byte VMPCKs (the
    contiguous 0x20..0x9F) put into the encoding of the same page with zero keys, made once per
    (IMIEN, FMS, GOSVW); any other key length takes the full encoding (which refuses it)."""
    k0, k1, k2, k3 = vmpck = g.vmpck
    fms = fw.profile.cpuid_fn0000_0001_eax
    if all(type(k) is bytes and len(k) == 32 for k in vmpck):
        key = (bool(g.imi_en), fms, g.gosvw)
        page = _SECRETS.get(key)
        if page is None:
            if len(_SECRETS) >= 64:
                _SECRETS.clear()
            page = _SECRETS[key] = SecretsPage(flags=SecretsPageFlags(imien=g.imi_en), fms=fms,
                                               gosvw=g.gosvw).encode()
        return page[: _VMPCKS.start] + k0 + k1 + k2 + k3 + page[_VMPCKS.stop :]
    return SecretsPage(flags=SecretsPageFlags(imien=g.imi_en), fms=fms,
                       gosvw=g.gosvw, vmpck0=k0, vmpck1=k1, vmpck2=k2, vmpck3=k3).encode()


_PAGE_TYPES: Final = {int(t): t for t in SnpPageType}


@SNP_API.platform(CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd, ANY_STATE)
def snp_launch_update(fw: Firmware, cmd: SnpLaunchUpdateCmd) -> None:
    st = snp_state(fw)
    dma = fw.ports.dma
    spa = cmd.address & ~dma.cbit_mask  # (dma.strip)
    gctx = cmd.gctx_paddr
    if gctx % PAGE or spa % PAGE:
        raise FirmwareError(Status.INVALID_PARAM, "SNP_LAUNCH_UPDATE addresses must be page aligned")
    st.need_init()
    g = st.guest(gctx)
    port = st.port()
    try:  # (SnpPlatform.governing, without asking for the port again)
        own, lo, hi, state, huge, asid, gpa = port.governing(spa)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    if state != RmpPageState.PRE_GUEST:
        raise FirmwareError(Status.INVALID_PAGE_STATE, f"page {spa:#x} is {state.name}, not Pre-Guest")
    flags = cmd.flags
    if huge != flags.page_size:
        raise FirmwareError(Status.INVALID_PAGE_SIZE, f"page {spa:#x}: the RMP page size differs from the command's")
    if huge and spa % PAGE_2M:
        raise FirmwareError(Status.INVALID_ADDRESS, f"2 MiB page {spa:#x} is not 2 MiB aligned")
    ptype = _PAGE_TYPES.get(flags.page_type)
    if ptype is None:
        raise FirmwareError(Status.INVALID_PARAM, f"page type {flags.page_type} does not exist")
    if huge and ptype in _FOUR_K_ONLY:
        raise FirmwareError(Status.INVALID_PAGE_SIZE, f"a {ptype.name} page must be 4 KiB")
    if g.state != SnpGuestState.LAUNCH:
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest at {g.gctx:#x} is {g.state.name}, not LAUNCH")
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, "the guest must be activated before SNP_LAUNCH_UPDATE")
    if asid != g.asid:
        raise FirmwareError(Status.INVALID_PAGE_OWNER, f"page {spa:#x} belongs to ASID {asid}, not {g.asid}")
    imi = flags.imi_page
    if g.imi_en and not imi:
        raise FirmwareError(Status.INVALID_PARAM, "an IMI guest's pages must be IMI pages")
    v1, v2, v3 = cmd.vmpl1_perms, cmd.vmpl2_perms, cmd.vmpl3_perms
    if (v1 | v2 | v3) & ~VMPL_PERM_MASK:
        raise FirmwareError(Status.INVALID_PARAM, "VMPL permission masks set bits 7:5")
    perms = (v1, v2, v3)
    size = PAGE_2M if huge else PAGE
    count = size // PAGE
    info = _TEMPLATES.get((ptype, imi, v1, v2, v3)) or _template(int(ptype), perms, bool(imi))
    if ptype == SnpPageType.ZERO:  # the range's host lines written back and dropped; nothing to read
        dma.zero_encrypted(spa, size, g.asid)
        g.chain(info, gpa, count, None)
        port.make_guest_valid(own, lo, hi, False, perms)
        return
    if ptype == SnpPageType.NORMAL:  # CONTENTS: the pages' hashes (a 2 MiB page's: on the SHA engine)
        # read (the host's lines written back and dropped) and encrypted where it is, in one pass;
        # the bytes read are what is measured
        if huge and engaged():  # the SHA engine hashes a copy of the bytes read while the firmware goes on
            data = dma.encrypt_in_place(spa, size, g.asid)
            g.measure(info, gpa, data, later=True)
        else:  # each page hashed as it is read, in the pass that encrypts it (no copy): the same CONTENTS
            g.chain(info, gpa, count, dma.encrypt_in_place(spa, size, g.asid, hashes=True))
        port.make_guest_valid(own, lo, hi, False, perms)
        return
    if ptype == SnpPageType.VMSA:  # read and encrypted where it is in one pass, as a NORMAL page: the
        # bytes read are measured (nothing between the read and the write can fail)
        measured = bytearray(dma.encrypt_in_place(spa, size, g.asid))
        measured[_VMSA_TSC] = bytes(16)
        g.chain(info, gpa, count, hashlib.sha384(measured).digest())
        port.make_guest_valid(own, lo, hi, True, perms)
        return
    data = dma.read_invalidate(spa, size)  # the whole page at once
    if ptype == SnpPageType.SECRETS:
        data = _secrets(fw, g)
    elif ptype == SnpPageType.CPUID:
        fixed = sanitize_cpuid_page(fw.profile, data)
        if fixed is not None:
            dma.write(spa, fixed, guest_ok=True)  # the corrected page, unencrypted, for the VMM
            raise FirmwareError(Status.INVALID_PARAM, "CPUID page entries exceed what the part allows")
    dma.write_encrypted(spa, data, g.asid)
    g.chain(info, gpa, count, None)  # CONTENTS zero (the template's): SECRETS, CPUID, UNMEASURED
    port.make_guest_valid(own, lo, hi, False, perms)


def _read(fw: Firmware, paddr: int, layout: type[Struct]) -> bytes:
    spa, _ = fw.ports.dma.strip(paddr)
    try:
        return fw.ports.dma.read(spa, layout.SIZE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None


def _verify(key: ec.EllipticCurvePublicKey | None, message: bytes, sig: bytes, what: str) -> None:
    if key is None:
        raise FirmwareError(Status.BAD_SIGNATURE, f"the {what} is not a P-384 point")
    try:
        ecc.verify_le(key, message, sig, hashes.SHA384())
    except VerificationError as exc:
        raise FirmwareError(Status.BAD_SIGNATURE, f"{what}: {exc}") from None


def _public_key(curve: int, qx: bytes, qy: bytes) -> ec.EllipticCurvePublicKey | None:
    if curve != 2:
        return None
    try:
        return ecc.public_key_from_le(qx, qy)
    except (InputError, ValueError):
        return None


@SNP_API.platform(CommandId.SNP_LAUNCH_FINISH, SnpLaunchFinishCmd, ANY_STATE)
def snp_launch_finish(fw: Firmware, cmd: SnpLaunchFinishCmd) -> None:
    st = snp_state(fw)
    if cmd.gctx_paddr % PAGE:
        raise FirmwareError(Status.INVALID_PARAM, "the GCTX address must be page aligned")
    st.need_init()
    g = st.guest(cmd.gctx_paddr)
    if g.state != SnpGuestState.LAUNCH or g.imi_en:
        raise FirmwareError(Status.INVALID_GUEST_STATE, f"guest at {g.gctx:#x} is {g.state.name}")
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, "the guest must be activated before SNP_LAUNCH_FINISH")
    id_block: IdBlock | None = None
    id_key_digest = author_key_digest = bytes(48)
    if cmd.flags.id_block_en:
        block_raw = _read(fw, cmd.id_block_paddr, IdBlock)
        auth_raw = _read(fw, cmd.id_auth_paddr, IdAuthInfo)
        try:
            id_block = IdBlock.decode(block_raw)
            auth = IdAuthInfo.decode(auth_raw)
        except LayoutError as exc:
            raise FirmwareError(Status.INVALID_PARAM, f"ID block / ID auth: {exc}") from None
        if id_block.ld != g.ld:
            raise FirmwareError(Status.BAD_MEASUREMENT, "the ID block's launch digest is not the guest's")
        if id_block.policy != g.policy:
            raise FirmwareError(Status.POLICY_FAILURE, "the ID block's policy is not the guest's")
        if auth.id_key_algo != KeyAlgo.ECDSA_P384_SHA384 or (
                cmd.flags.auth_key_en and auth.auth_key_algo != KeyAlgo.ECDSA_P384_SHA384):
            raise FirmwareError(Status.INVALID_PARAM, "ID / author key algorithm is not ECDSA P-384 SHA-384")
        id_key = auth.id_key
        _verify(_public_key(id_key.curve, id_key.qx, id_key.qy), block_raw,
                auth.id_block_sig.r + auth.id_block_sig.s, "ID block signature")
        id_key_raw = id_key.encode()
        id_key_digest = hashlib.sha384(id_key_raw).digest()
        if cmd.flags.auth_key_en:
            author = auth.author_key
            _verify(_public_key(author.curve, author.qx, author.qy), id_key_raw,
                    auth.id_key_sig.r + auth.id_key_sig.s, "ID key signature")
            author_key_digest = hashlib.sha384(author.encode()).digest()
    g.id_block_en = cmd.flags.id_block_en
    g.id_block = id_block
    g.id_key_digest = id_key_digest
    g.author_key_en = cmd.flags.auth_key_en and cmd.flags.id_block_en
    g.author_key_digest = author_key_digest
    g.vcek_disabled = cmd.flags.vcek_disabled
    g.host_data = cmd.host_data
    g.state = SnpGuestState.RUNNING
