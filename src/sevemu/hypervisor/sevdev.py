"""The ``/dev/sev`` device: Linux's SEV platform ioctl (drivers/crypto/ccp/sev-dev.c ``sev_ioctl``;
include/uapi/linux/psp-sev.h).

User space issues ``ioctl(fd, SEV_ISSUE_CMD, struct sev_issue_cmd {u32 cmd; u64 data; u32 error})``
with one of the *user* command ids of :class:`SevUserCmd`; ``data`` points to the command's user
structure (:class:`SevUserDataStatus` ...), ``error`` comes back with the firmware status.  The
device is a thin wrapper: each command is a row of the command table
(:mod:`sevemu.hypervisor.ioctl`) that runs a platform flow of :mod:`sevemu.hypervisor.sev.legacy`,
which reaches the firmware through the mailbox only.  As sev-dev.c does:

* ``FACTORY_RESET``: PLATFORM_STATUS first; WORKING -> ``-EBUSY``; INIT -> SHUTDOWN; then
  PLATFORM_RESET (Linux: ``SEV_CMD_FACTORY_RESET``).  Needs a writable fd.
* ``PLATFORM_STATUS``: the firmware's 12 bytes, viewed as Linux's ``sev_user_data_status`` (bytes
  03..06 as one u32 ``flags``: owner = bit 0, CONFIG_ES = bit 8).
* ``PEK_GEN`` / ``PDH_GEN`` / ``PEK_CSR`` / ``PEK_CERT_IMPORT`` / ``PDH_CERT_EXPORT``: if the
  platform is UNINIT the driver INITs it for the command and SHUTs it down again afterwards
  (``sev_move_to_init_state`` / ``shutdown_required``, Linux 6.15).  A failing implicit INIT reports
  ``error = INVALID_PLATFORM_STATE``.  PDH_CERT_EXPORT needs write access only to INIT.
* Length queries (``PEK_CSR``, ``PDH_CERT_EXPORT``, ``GET_ID2``): an absent buffer or a zero length
  issues the firmware command with address and length 0; the firmware answers INVALID_LENGTH with
  the required length, which the driver copies back (the ioctl returns ``-EIO`` with ``error`` =
  INVALID_LENGTH, as on Linux).
* ``GET_ID`` (deprecated): a fixed 128-byte ``sev_user_data_get_id`` (two sockets); ``GET_ID2``:
  caller-sized, up to what the kernel's page allocator gives ``kzalloc`` (4 MiB; ``-ENOMEM``
  above, ``sev_ioctl_do_get_id2``).  Both need firmware API >= 0.16 (``-ENOTSUPP`` otherwise).

Return values are Linux's: 0, or a negative errno (:class:`Errno`); a firmware failure is ``-EIO``
with the status in ``error``.  The implicit INIT is Linux's ``__sev_platform_init_locked``: INIT
(with SEV-ES and the hypervisor's TMR when the CPU has SEV-ES ASIDs), then WBINVD on every CPU and
DF_FLUSH.

Model choices:

* user memory is host buffers: an input pointer is ``bytes`` (``None`` = NULL), an output pointer is
  a ``bytearray`` the driver copies into (``copy_to_user``; shorter than the length it claims:
  ``-EFAULT``).  Blobs are limited to ``SEV_FW_BLOB_MAX_SIZE`` (16 KiB) as Linux does.
* Linux caches the platform state in ``sev->state``; this driver asks the firmware (PLATFORM_STATUS)
  each time it needs it, because the model's hypervisor may INIT the platform without the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sevemu.abi.states import PlatformState
from sevemu.hypervisor.errors import Errno, IoctlError, SevError
from sevemu.hypervisor.ioctl import Api, Caller, table
from sevemu.hypervisor.uapi import (
    SEV_FW_BLOB_MAX_SIZE,
    SEV_ISSUE_CMD,
    NoData,
    SevUserCmd,
    SevUserData,
    SevUserDataGetId,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
    SevUserDataStatus,
    UserBuffer,
    UserFields,
    copy_from_user,
    copy_to_user,
    ioc,
)

if TYPE_CHECKING:
    from sevemu.hypervisor.kvm import Hypervisor

__all__ = [
    "SEV_FW_BLOB_MAX_SIZE",
    "SEV_ISSUE_CMD",
    "Errno",
    "IoctlError",
    "SevDevice",
    "SevIssueCmd",
    "SevUserCmd",
    "SevUserDataGetId",
    "SevUserDataGetId2",
    "SevUserDataPdhCertExport",
    "SevUserDataPekCertImport",
    "SevUserDataPekCsr",
    "SevUserDataStatus",
    "UserBuffer",
    "copy_from_user",
    "copy_to_user",
    "ioc",
]

_TABLE = table(Api.SEV_DEV)


@dataclass
class SevIssueCmd:
    """``struct sev_issue_cmd``: ``data`` is the user structure of ``cmd``; ``error`` is written back."""

    cmd: int
    data: SevUserData | UserFields | None = None
    error: int = 0
    ret: int = 0
    """Not in the C struct: the ioctl's return value, kept by :meth:`SevDevice.ioctl_raw`."""


class SevDevice:
    """An open ``/dev/sev`` (``writable``: opened with write access, as sevctl does for changes)."""

    def __init__(self, hv: Hypervisor, *, writable: bool = True) -> None:
        self.hv = hv
        self.writable = writable

    # ---- the ioctl entry point -----------------------------------------------------------
    def ioctl(self, request: int, arg: SevIssueCmd) -> int:
        """``ioctl(fd, request, arg)``: 0 or a negative errno; ``arg.error`` holds the firmware status."""
        if request != SEV_ISSUE_CMD:
            return -Errno.EINVAL
        arg.error = 0
        row = _TABLE.get(arg.cmd)
        if row is None:  # unknown ids, and the SNP user commands of an SNP platform (not modelled here)
            return -Errno.EINVAL
        outcome = row.execute(Caller(self.hv.sev, writable=self.writable), arg.data)
        if isinstance(outcome.data, SevUserData) and not isinstance(outcome.data, NoData):
            arg.data = outcome.data
        arg.error = outcome.error
        return outcome.ret

    def ioctl_raw(self, cmd: SevUserCmd, data: SevUserData | UserFields | None = None) -> SevIssueCmd:
        """Run ``cmd`` and return the :class:`SevIssueCmd` whatever the outcome (``ret`` in it)."""
        arg = SevIssueCmd(int(cmd), data)
        arg.ret = self.ioctl(SEV_ISSUE_CMD, arg)
        return arg

    def issue(self, cmd: SevUserCmd, data: SevUserData | UserFields | None = None) -> SevIssueCmd:
        """Build a :class:`SevIssueCmd`, run it, and raise :class:`IoctlError` on failure."""
        arg = SevIssueCmd(int(cmd), data)
        self.check(cmd.name, self.ioctl(SEV_ISSUE_CMD, arg), arg.error)
        return arg

    @staticmethod
    def check(what: str, ret: int, error: int) -> None:
        if ret < 0:
            raise IoctlError(what, ret, error)

    # ---- the driver's own platform calls (sev-dev.c, used by KVM and at boot) -----------------
    def platform_state(self) -> PlatformState:
        """The firmware's platform state (PLATFORM_STATUS)."""
        return self.hv.sev.platform_state()

    def api_version(self) -> tuple[int, int, int]:
        """(API major, API minor, build) the firmware reports (PLATFORM_STATUS; the driver's
        ``sev->api_major``/``api_minor``/``build``)."""
        return self.hv.sev.api_version()

    def platform_init(self) -> int:
        """``sev_platform_init``: INIT (SEV-ES with the TMR when the CPU has it) unless already
        initialised, then WBINVD on all CPUs and DF_FLUSH.  0 or -EIO."""
        try:
            self.hv.sev.ensure_init()
        except SevError as e:
            return -int(e.errno)
        return 0
