"""Architectural faults raised by the MMU and the cores (modelled events, not crashes).

* :class:`PageFault` (#PF, vector 14): a guest page-table walk or permission check failed; the
  error code follows APM Vol.2 8.4.2 (P, W, U, RSVD, I/D).  It belongs to the guest.
* :class:`NestedPageFault` (#VMEXIT(NPF), exit code 0x400): the nested walk (GPA -> SPA through the
  hypervisor's NPT) failed.  EXITINFO1 carries the error code (reference 3.4: P, W, U, RSVD, FETCH,
  GUEST_FINAL, GUEST_PAGE, ENC -- :class:`sevemu.abi.paging.NpfExitInfo1`), EXITINFO2 the GPA.  It belongs to the hypervisor.
* :class:`GeneralProtection` (#GP).

The vCPU turns them into guest exceptions or VMEXITs; they never escape ``Core.vmrun``.
"""

from __future__ import annotations

from sevemu.errors import ArchitecturalFault

__all__ = ["GeneralProtection", "NestedPageFault", "PageFault"]


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


class GeneralProtection(ArchitecturalFault):
    """Raised when an instruction is refused with #GP (e.g. VMPAGE_FLUSH of ASID 0)."""

    def __init__(self, reason: str, error_code: int = 0) -> None:
        self.error_code = error_code
        super().__init__(f"#GP: {reason}")
