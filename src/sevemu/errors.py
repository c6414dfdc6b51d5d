"""The project's exception hierarchy.

Every exception sevemu raises on purpose derives from :class:`SevemuError`.  Callers that want to
tell a user what went wrong catch :class:`SevemuError`; anything else escaping is a bug.

Two families matter:

* *input* errors (:class:`InputError` and subclasses): the caller gave something malformed (an
  unaligned address, an unknown ASID, a wrong key size, a truncated buffer).  They are raised
  before any state changes, so a caller can catch them and go on.
* *modelled events* (:class:`ArchitecturalFault`): an access inside the machine took an
  architectural fault (#PF, #NPF, #GP).  These are part of the model, not failures of it: the vCPU
  turns them into guest exceptions or VMEXITs.

Firmware handlers raise :class:`FirmwareError` carrying a status code; only the firmware
dispatcher turns it into the status word the mailbox returns.
"""

from __future__ import annotations

__all__ = [
    "AddressError",
    "AlignmentError",
    "ArchitecturalFault",
    "AsidError",
    "FileFormatError",
    "FirmwareError",
    "GuestBuildError",
    "HardwareError",
    "InputError",
    "KeySizeError",
    "KeySlotError",
    "LayoutError",
    "MailboxError",
    "SevemuError",
    "UnmappedError",
    "VerificationError",
    "VmError",
]


class SevemuError(Exception):
    """Root of every exception sevemu raises on purpose."""


class InputError(SevemuError, ValueError):
    """Raised when a caller passes a value that is malformed or out of range; nothing changed."""


class AddressError(InputError):
    """Raised when a physical or virtual address is outside the range the component models."""


class AlignmentError(AddressError):
    """Raised when an address or length is not aligned to the granularity the operation needs."""


class AsidError(InputError):
    """Raised when an ASID is unknown, out of the profile's range, or of the wrong kind."""


class KeySizeError(InputError):
    """Raised when key material has the wrong length for the cipher or slot it is meant for."""


class LayoutError(InputError):
    """Raised when a byte buffer does not match a declared layout (size, reserved bytes, fields)."""


class UnmappedError(InputError):
    """Raised when a guest-physical address has no mapping where the caller expected one."""


class HardwareError(SevemuError):
    """Raised when the hardware model is driven in a way the real part would refuse."""


class KeySlotError(HardwareError):
    """Raised when a memory-controller key slot is programmed without the Secure Processor's port."""


class ArchitecturalFault(SevemuError):
    """Raised inside the machine model when an access takes an architectural fault.

    A modelled event, not a failure: the vCPU converts it into a guest exception or a VMEXIT
    carrying the architectural error code.  See :mod:`sevemu.hw.faults`.
    """


class FirmwareError(SevemuError):
    """Raised by a firmware command handler; carries the SEV API status code to return.

    Only the firmware dispatcher catches it and turns it into the mailbox status word.
    """

    def __init__(self, status: int, detail: str = "") -> None:
        self.status = int(status)
        self.detail = detail
        super().__init__(f"status 0x{self.status:02x}" + (f": {detail}" if detail else ""))


class MailboxError(HardwareError):
    """Raised by a host-side driver when the PSP mailbox answers with a non-success status."""

    def __init__(self, command: str, status: int, status_name: str) -> None:
        self.command = command
        self.status = int(status)
        self.status_name = status_name
        super().__init__(f"{command} failed: {status_name} (0x{self.status:02x})")


class VmError(SevemuError):
    """Raised when the hypervisor is asked to do something with a VM that its state forbids."""


class VerificationError(SevemuError):
    """Raised when a signature, MAC, certificate chain or measurement does not verify."""


class FileFormatError(InputError):
    """Raised when a file given on the command line is not of the format expected; says why."""


class GuestBuildError(SevemuError):
    """Raised when a guest image cannot be built or does not fit the VM it is meant for."""
