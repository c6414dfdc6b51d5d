"""SNP_VLEK_LOAD: a cloud provider's versioned loaded endorsement key, unwrapped into the firmware
(SNP ABI 56860 rev. 1.55 "SNP_VLEK_LOAD"; AMD-ASPFW ``sev_mcmd.c`` ``snp_mcmd_vlek_load``,
``sev_mcmd.h`` ``snp_mcmd_vlek_load_t``, ``sev_rmp.h`` ``vlek_wrapped_t``; Linux
``include/linux/psp-sev.h`` ``sev_data_snp_vlek_load`` and ``include/uapi/linux/psp-sev.h``
``sev_user_data_snp_wrapped_vlek_hashstick``).

AMD gives a CSP, for each of its chips, a *wrapped VLEK hashstick* (0x1B0 bytes,
:class:`~sevemu.abi.snp.WrappedVlekHashstick`): the CSP's VLEK hashsticks for one TCB, encrypted
with AES-256-GCM under a key only that chip can derive.  The host hands it to the firmware, which
from then on can sign reports with the VLEK (SIGNING_KEY 1) instead of the chip's VCEK, so relying
parties see one key per CSP and TCB rather than per chip.

The command, in AMD's order (every check before anything changes; a refused load leaves the loaded
VLEK, if any, in place):

1. LEN 0x10, VLEK_WRAPPED_VERSION 0 and the reserved bytes 5..7 zero, else INVALID_PARAM;
2. the 0x1B0 bytes at VLEK_WRAPPED_ADDRESS are read from DRAM (INVALID_ADDRESS outside it);
3. the hashstick's TCB_VERSION must equal REPORTED_TCB (SNP_CONFIG), else BAD_SVN;
4. it must authenticate under this chip's wrapping key for that TCB (another chip's hashstick, or one
   altered anywhere in its IV, ciphertext, TCB, reserved bytes at 0x198 or tag), else
   BAD_MEASUREMENT;
5. the hashsticks and the VLEK they give replace any loaded before; SNP_PLATFORM_STATUS then shows
   VLEK_EN.  SNP_SHUTDOWN wipes them (AMD-ASPFW ``snp_mcmd_shutdown_common``).

AMD's firmware checks no platform state here; the model neither (Linux asks for an initialised SNP
platform before it sends the command).  The wrapping key and the hashsticks' meaning are the model's
choices where AMD publishes nothing (:mod:`sevemu.crypto.vcek`, ``docs/attestation.md``).
"""

from __future__ import annotations

from sevemu.abi.commands import CommandId
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE, SnpVlekLoadCmd, WrappedVlekHashstick
from sevemu.abi.status import Status
from sevemu.crypto import vcek
from sevemu.errors import AddressError, FirmwareError, VerificationError
from sevemu.firmware.core import ANY_STATE, Firmware
from sevemu.firmware.snp.api import SNP_API
from sevemu.firmware.snp.guest_request import chip_secret
from sevemu.firmware.snp.state import snp_state

__all__ = ["snp_vlek_load"]


@SNP_API.platform(CommandId.SNP_VLEK_LOAD, SnpVlekLoadCmd, ANY_STATE)
def snp_vlek_load(fw: Firmware, cmd: SnpVlekLoadCmd) -> None:
    """SNP_VLEK_LOAD (module docstring)."""
    st = snp_state(fw)
    if cmd.len != SnpVlekLoadCmd.SIZE:
        raise FirmwareError(Status.INVALID_PARAM, f"SNP_VLEK_LOAD length {cmd.len:#x} (expected 0x10)")
    if cmd.vlek_wrapped_version != 0:
        raise FirmwareError(Status.INVALID_PARAM, f"VLEK_WRAPPED_VERSION {cmd.vlek_wrapped_version} (the firmware "
                            "knows 0)")
    dma = fw.ports.dma
    spa, _ = dma.strip(cmd.vlek_wrapped_address)
    try:
        dma.check(spa, SNP_VLEK_HASHSTICK_SIZE)
    except AddressError as exc:
        raise FirmwareError(Status.INVALID_ADDRESS, str(exc)) from None
    raw = dma.read(spa, SNP_VLEK_HASHSTICK_SIZE)
    wrapped = WrappedVlekHashstick.decode(raw)
    if wrapped.tcb_version != st.reported_tcb:
        raise FirmwareError(Status.BAD_SVN, f"the hashstick is for TCB {wrapped.tcb_version:#018x}, "
                            f"REPORTED_TCB is {st.reported_tcb:#018x}")
    gen = fw.profile.name
    try:
        sticks = vcek.unwrap_vlek_hashstick(chip_secret(fw), gen, raw)
    except VerificationError as exc:
        raise FirmwareError(Status.BAD_MEASUREMENT, str(exc)) from None
    st.vlek_sticks, st.vlek = sticks, vcek.vlek_from_hashsticks(sticks, gen)
