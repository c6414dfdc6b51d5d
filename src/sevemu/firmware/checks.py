"""Checks every command API shares: policy, activation, address ranges, buffers in host memory.

Each raises :class:`~sevemu.errors.FirmwareError` with the status AMD's firmware answers
(AMD-ASPFW ``sev_mcmd.c``; ``sev_guest.c: sev_guest_verify_policy``; ``helper.c:
validate_address_range``) and changes nothing, so a handler can call them in the order its command
checks in and only then act.
"""

from __future__ import annotations

from sevemu.abi.policy import POLICY_RESERVED_MASK, api_major, api_minor
from sevemu.abi.status import Status
from sevemu.errors import AddressError, FirmwareError
from sevemu.firmware.core import Firmware
from sevemu.firmware.gctx import GuestContext

__all__ = ["check_policy", "check_range", "flush_dirty_asids", "granule_region", "host_region", "need_active",
           "read_host"]


def check_policy(fw: Firmware, policy: int) -> None:
    """Refuse a policy this firmware cannot honour: minimum API version above the firmware's, or
    reserved bits 15:6 set (POLICY_FAILURE, AMD-ASPFW ``sev_guest_verify_policy``)."""
    major, minor, _ = fw.api_version
    if (api_major(policy), api_minor(policy)) > (major, minor):
        raise FirmwareError(Status.POLICY_FAILURE, "policy requires a newer firmware API")
    if policy & POLICY_RESERVED_MASK:
        raise FirmwareError(Status.POLICY_FAILURE, f"policy {policy:#x} sets reserved bits")


def need_active(g: GuestContext) -> None:
    """INACTIVE unless ``g`` is activated (its key in the memory controller)."""
    if not g.asid:
        raise FirmwareError(Status.INACTIVE, f"guest {g.handle} must be activated first")


def check_range(fw: Firmware, spa: int, length: int) -> None:
    """INVALID_ADDRESS unless ``[spa, spa+length)`` lies in DRAM, outside the SEV-ES TMR and outside
    the ring buffer's pages (AF ``validate_address_range``: no x86 range may touch a TMR or the ring
    buffer; :mod:`sevemu.firmware.tmr`, :mod:`sevemu.firmware.ring`); INVALID_PAGE_STATE when SNP is on
    and a page of it is a guest's in the RMP (AF ``check_page_range_firmware_writable``: the firmware
    is no confused deputy for the host)."""
    try:
        fw.ports.dma.check(spa, length)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    if fw.tmr is not None and fw.tmr.overlaps(spa, length):
        raise FirmwareError(Status.INVALID_ADDRESS, f"range {spa:#x}+{length:#x} overlaps the SEV-ES TMR")
    if fw.ring is not None and fw.ring.overlaps(spa, length):
        raise FirmwareError(Status.INVALID_ADDRESS, f"range {spa:#x}+{length:#x} overlaps the ring buffer")
    if fw.ports.dma.guest_owned(spa, length):
        raise FirmwareError(Status.INVALID_PAGE_STATE, f"range {spa:#x}+{length:#x} holds an SNP guest's page")


def host_region(fw: Firmware, paddr: int, length: int) -> int:
    """SPA of a buffer at ``paddr`` (C-bit stripped); INVALID_ADDRESS unless it lies in DRAM."""
    spa, _ = fw.ports.dma.strip(paddr)
    check_range(fw, spa, length)
    return spa


def read_host(fw: Firmware, paddr: int, length: int) -> bytes:
    """``length`` bytes of host memory at ``paddr`` (C-bit stripped); INVALID_ADDRESS outside DRAM."""
    return fw.ports.dma.read(host_region(fw, paddr, length), length)


def granule_region(fw: Firmware, paddr: int, length: int) -> int:
    """SPA of a guest region the firmware encrypts in place (LAUNCH_UPDATE_DATA): ``length`` a
    non-zero multiple of the granule (INVALID_LENGTH), the address granule-aligned
    (INVALID_ADDRESS), the region in DRAM (INVALID_ADDRESS)."""
    spa, _ = fw.ports.dma.strip(paddr)
    gran = fw.granule()
    if length == 0 or length % gran:
        raise FirmwareError(Status.INVALID_LENGTH, f"length {length:#x} is not a multiple of {gran}")
    if spa % gran:
        raise FirmwareError(Status.INVALID_ADDRESS, f"address {spa:#x} is not {gran}-byte aligned")
    check_range(fw, spa, length)
    return spa


def flush_dirty_asids(fw: Firmware) -> None:
    """DF_FLUSH / SNP_DF_FLUSH (AF ``mcmd_df_flush_common``): every dirty ASID clean again, or
    WBINVD_REQUIRED when one became dirty after the last WBINVD (then nothing changes)."""
    epoch = fw.ports.flush_epoch()
    stale = [asid for asid, at in fw.asid_dirty.items() if at >= epoch]
    if stale:
        raise FirmwareError(Status.WBINVD_REQUIRED, f"no WBINVD since ASID {stale[0]} became dirty")
    fw.asid_dirty.clear()
