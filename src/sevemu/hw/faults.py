"""Architectural faults raised by the MMU and the cores (modelled events, not crashes).

* :class:`PageFault` (#PF, vector 14): a guest page-table walk or permission check failed; the
  error code follows APM2 8.4.2 (P, W, U, RSVD, I/D).  It belongs to the guest.
* :class:`NestedPageFault` (#VMEXIT(NPF), exit code 0x400): the nested walk (GPA -> SPA through the
  hypervisor's NPT) failed.  EXITINFO1 carries the error code (APM2 15.25.6, 15.36.10: P, W, U, RSVD,
  FETCH, GUEST_FINAL, GUEST_PAGE, ENC -- :class:`sevemu.abi.paging.NpfExitInfo1`), EXITINFO2 the GPA.  It belongs to the hypervisor.
* :class:`GuestFault` and its kinds :class:`GeneralProtection` (#GP), :class:`InvalidOpcode` (#UD),
  :class:`VmmCommunication` (#VC, APM2 15.35.5: an SEV-ES guest's non-automatic exit, error code =
  the exit code): exceptions the shared instruction semantics (:mod:`sevemu.hw.x86.insn`) raise in
  the guest.

The vCPU turns them into guest exceptions or VMEXITs; they never escape ``Core.vmrun``.
"""

from __future__ import annotations

from sevemu.abi.ghcb import VC_PAGE_NOT_VALIDATED
from sevemu.errors import ArchitecturalFault

__all__ = ["GeneralProtection", "GuestFault", "InvalidOpcode", "NestedPageFault", "PageFault",
           "VmmCommunication"]


class PageFault(ArchitecturalFault):
    """Raised when a guest virtual address cannot be translated or accessed (#PF)."""

    def __init__(self, error_code: int, address: int) -> None:
        self.error_code = error_code
        self.address = address
        super().__init__(f"#PF at {address:#x} (error code {error_code:#x})")


class NestedPageFault(ArchitecturalFault):
    """Raised when a guest-physical address has no usable NPT mapping (#VMEXIT(NPF))."""

    def __init__(self, exit_info1: int, gpa: int) -> None:
        self.exit_info1 = exit_info1
        self.gpa = gpa
        super().__init__(f"#NPF at GPA {gpa:#x} (EXITINFO1 {exit_info1:#x})")


class GuestFault(ArchitecturalFault):
    """Raised when an instruction takes an exception that belongs to the guest (vector, error code)."""

    def __init__(self, vector: int, error_code: int | None, reason: str, mnemonic: str = "") -> None:
        self.vector = vector
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"{mnemonic or f'vector {vector}'}: {reason}")


class GeneralProtection(GuestFault):
    """Raised when an instruction is refused with #GP (e.g. VMPAGE_FLUSH of ASID 0)."""

    def __init__(self, reason: str, error_code: int = 0) -> None:
        super().__init__(13, error_code, reason, "#GP")


class InvalidOpcode(GuestFault):
    """Raised when the guest executes an instruction it may not run here (#UD)."""

    def __init__(self, reason: str) -> None:
        super().__init__(6, None, reason, "#UD")


class VmmCommunication(GuestFault):
    """Raised in an SEV-ES guest instead of a non-automatic #VMEXIT (#VC; error code = exit code)."""

    def __init__(self, exit_code: int, reason: str) -> None:
        super().__init__(29, exit_code, reason, "#VC")


class PageNotValidated(VmmCommunication):
    """Raised when an SNP guest's private access reaches a page it has not validated (#VC 0x404,
    APM2 15.36.10).  Model choice: the faulting linear address is written to CR2 when the #VC is
    delivered, so the guest's handler knows which page to validate."""

    def __init__(self, address: int, reason: str) -> None:
        super().__init__(VC_PAGE_NOT_VALIDATED, reason)
        self.address = address
