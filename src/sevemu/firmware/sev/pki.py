"""Platform key management: PLATFORM_RESET, PEK_GEN, PEK_CSR, PEK_CERT_IMPORT, PDH_GEN,
PDH_CERT_EXPORT, GET_ID (SEV API 55766 ch. 5, one section per command, and its certificate
appendix; behaviour cross-checked with AMD's firmware source, AMD-ASPFW ``sev_mcmd.c``, "AF").

Ownership (SEV API 55766 ch. 5, "Platform Ownership"): PLATFORM_RESET (UNINIT) and PEK_GEN (INIT) make the platform self-owned
with a new OCA, PEK and PDH; PEK_CERT_IMPORT (INIT, self-owned only, else ALREADY_OWNED) makes it
externally owned.  The owner cannot change in WORKING: PEK_GEN and PEK_CERT_IMPORT answer
INVALID_PLATFORM_STATE there.  PDH_GEN (INIT or WORKING) replaces the PDH only.

Every command that changes the identity builds the new one first, commits its NV records in ONE
transaction (:meth:`sevemu.firmware.nvstore.NvStore.commit`), and only then makes it current; a
refusal changes nothing, in memory or in NV.  PLATFORM_RESET also drops every other NV record.

PEK_CERT_IMPORT checks, in AF's order: lengths exactly 0x824 each (INVALID_LENGTH); buffers in DRAM
(INVALID_ADDRESS); both certificates decode (INVALID_CERTIFICATE -- model choice, AF would read the
raw bytes); the OCA certificate has usage OCA, a signing algorithm and a valid key, and carries a
slot for itself (INVALID_CERTIFICATE) whose signature verifies (BAD_SIGNATURE); the PEK certificate
has usage PEK and a slot for the OCA (INVALID_CERTIFICATE) whose signature verifies (BAD_SIGNATURE);
its body is the current PEK's byte for byte and its other slot is free for the CEK signature
(INVALID_CERTIFICATE).  Then the firmware moves its CEK signature in, records the owner's OCA, marks
the platform externally owned and makes a new PDH.

Output commands follow the length-query convention (Linux ``drivers/crypto/ccp/sev-dev.c``,
``sev_ioctl_do_pek_csr``): an address of 0 or a length
below what is needed answers INVALID_LENGTH with the needed length(s) written back; on success the
length actually written is written back too (AF ``exit_store_length``).  PEK_CSR and PDH_CERT_EXPORT
are allowed in INIT and WORKING (AF ``sev_mcmd_pek_csr``).

PDH_CERT_EXPORT's chain is PEK || OCA || CEK with the CEK certificate the factory provisioned,
signed by the emulated ASK.  (AF writes the CEK *body* unsigned there and leaves it to the host to
fetch the signed one from AMD's key distribution service by GET_ID; the model hands out the signed
one so that the exported chain verifies on its own.)

GET_ID (any state): 64 bytes per socket, one socket here (:attr:`PlatformIdentity.chip_id`; a
128-byte buffer, Linux's two-socket ``sev_user_data_get_id``, gets 64 bytes and ``id_len = 64``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import GetIdCmd, PdhCertExportCmd, PekCertImportCmd, PekCsrCmd
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.certs.errors import CertSignatureError
from sevemu.certs.sev import SIGNING_ALGOS, SevCert
from sevemu.errors import FirmwareError, InputError, LayoutError
from sevemu.firmware.checks import host_region
from sevemu.firmware.core import ANY_STATE, READY, Firmware, Reply
from sevemu.firmware.identity import IDENTITY_RECORDS, PlatformIdentity
from sevemu.firmware.nvstore import NvStoreError, seal_host_nv
from sevemu.firmware.sev.api import SEV_API
from sevemu.firmware.sev.platform import UNINIT

__all__ = ["commit_identity"]

_INIT: Final = frozenset({PlatformState.INIT})


def commit_identity(fw: Firmware, new: PlatformIdentity, *, reset: bool = False) -> None:
    """Commit ``new`` to NV in one transaction, then make it current.

    NV is the SPI store, or INIT_EX's host buffer while one is in use (written as one sealed image).
    ``reset`` (PLATFORM_RESET) drops every SPI record first and always targets the SPI store.  A
    failed commit changes nothing and answers HWERROR_PLATFORM.
    """
    if fw.nv is None:
        raise FirmwareError(Status.HWERROR_PLATFORM, "unprovisioned part: no NV store")
    try:
        if fw.nv_area is not None and not reset:
            image = seal_host_nv(new.nv_seal_key(), new.nv_records(), fw.ports.trng(12))
            fw.ports.dma.write(fw.nv_area, image)
        else:
            fw.nv.commit(new.nv_records(), delete=IDENTITY_RECORDS, reset=reset)
            fw.nv_area = None
    except NvStoreError as exc:
        raise FirmwareError(Status.HWERROR_PLATFORM, str(exc)) from exc
    fw.identity = new


def _check_signed(child: SevCert, signer: SevCert, link: str) -> None:
    """``signer`` signed ``child``: INVALID_CERTIFICATE if it cannot have, BAD_SIGNATURE if it did not."""
    if signer.algo not in SIGNING_ALGOS:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"{link}: a {signer.algo.name} key cannot sign")
    try:
        signer.public_key()
    except InputError as exc:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"{link}: invalid signer key: {exc}") from None
    if not any(s.usage == signer.usage and s.algo == signer.algo for s in child.slots):
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"{link}: no signature slot for the signer")
    try:
        child.verify(signer)
    except CertSignatureError as exc:
        raise FirmwareError(Status.BAD_SIGNATURE, f"{link}: {exc}") from None


# ---- ownership ----------------------------------------------------------------------------------
@SEV_API.bare(CommandId.PLATFORM_RESET, UNINIT)
def platform_reset(fw: Firmware) -> None:
    commit_identity(fw, fw.identity.with_new_owner(fw.ports.trng), reset=True)


@SEV_API.bare(CommandId.PEK_GEN, _INIT)
def pek_gen(fw: Firmware) -> None:
    commit_identity(fw, fw.identity.with_new_owner(fw.ports.trng))


@SEV_API.bare(CommandId.PDH_GEN, READY)
def pdh_gen(fw: Firmware) -> None:
    commit_identity(fw, fw.identity.with_new_pdh(fw.ports.trng))


@SEV_API.platform(CommandId.PEK_CSR, PekCsrCmd, READY)
def pek_csr(fw: Firmware, cmd: PekCsrCmd) -> PekCsrCmd:
    csr = fw.identity.pek_csr().encode()
    done = replace(cmd, csr_len=SEV_CERT_SIZE)
    if cmd.csr_paddr == 0 or cmd.csr_len < SEV_CERT_SIZE:
        raise Reply(Status.INVALID_LENGTH, done, "PEK_CSR needs 0x824 bytes")
    spa = host_region(fw, cmd.csr_paddr, SEV_CERT_SIZE)
    fw.ports.dma.write(spa, csr)
    return done


@SEV_API.platform(CommandId.PEK_CERT_IMPORT, PekCertImportCmd, _INIT)
def pek_cert_import(fw: Firmware, cmd: PekCertImportCmd) -> None:
    ident = fw.identity
    if ident.owner_external:
        raise FirmwareError(Status.ALREADY_OWNED, "the platform is externally owned; PEK_GEN first")
    if cmd.pek_cert_len != SEV_CERT_SIZE or cmd.oca_cert_len != SEV_CERT_SIZE:
        raise FirmwareError(Status.INVALID_LENGTH, "PEK and OCA certificates are 0x824 bytes each")
    pek_spa = host_region(fw, cmd.pek_cert_paddr, SEV_CERT_SIZE)
    oca_spa = host_region(fw, cmd.oca_cert_paddr, SEV_CERT_SIZE)
    try:
        pek = SevCert.decode(fw.ports.dma.read(pek_spa, SEV_CERT_SIZE))
        oca = SevCert.decode(fw.ports.dma.read(oca_spa, SEV_CERT_SIZE))
    except LayoutError as exc:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"malformed certificate: {exc}") from None
    if oca.usage != KeyUsage.OCA:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"OCA certificate has usage {oca.usage.name}")
    _check_signed(oca, oca, "OCA <- OCA")
    if pek.usage != KeyUsage.PEK:
        raise FirmwareError(Status.INVALID_CERTIFICATE, f"PEK certificate has usage {pek.usage.name}")
    _check_signed(pek, oca, "PEK <- OCA")
    try:
        new = ident.with_external_owner(pek, oca, fw.ports.trng)
    except InputError as exc:
        raise FirmwareError(Status.INVALID_CERTIFICATE, str(exc)) from None
    commit_identity(fw, new)


# ---- export -------------------------------------------------------------------------------------
@SEV_API.platform(CommandId.PDH_CERT_EXPORT, PdhCertExportCmd, READY)
def pdh_cert_export(fw: Firmware, cmd: PdhCertExportCmd) -> PdhCertExportCmd:
    ident = fw.identity
    done = replace(cmd, pdh_cert_len=SEV_CERT_SIZE, certs_len=SEV_CERT_CHAIN_SIZE)
    if (cmd.pdh_cert_paddr == 0 or cmd.certs_paddr == 0
            or cmd.pdh_cert_len < SEV_CERT_SIZE or cmd.certs_len < SEV_CERT_CHAIN_SIZE):
        raise Reply(Status.INVALID_LENGTH, done, "PDH_CERT_EXPORT needs 0x824 and 0x186C bytes")
    pdh_spa = host_region(fw, cmd.pdh_cert_paddr, SEV_CERT_SIZE)
    chain_spa = host_region(fw, cmd.certs_paddr, SEV_CERT_CHAIN_SIZE)
    fw.ports.dma.write(pdh_spa, ident.pdh_cert.encode())
    fw.ports.dma.write(chain_spa, ident.cert_chain.encode())
    return done


@SEV_API.platform(CommandId.GET_ID, GetIdCmd, ANY_STATE)
def get_id(fw: Firmware, cmd: GetIdCmd) -> GetIdCmd:
    chip_id = fw.identity.chip_id
    done = replace(cmd, id_len=len(chip_id))
    if cmd.id_paddr == 0 or cmd.id_len < len(chip_id):
        raise Reply(Status.INVALID_LENGTH, done, "GET_ID needs 64 bytes per socket")
    spa = host_region(fw, cmd.id_paddr, len(chip_id))
    fw.ports.dma.write(spa, chip_id)
    return done
