"""One error convention for the host's SEV stack: every refusal carries Linux's errno and the firmware status.

Linux reports a refused SEV operation to user space as a negative errno from the ioctl, with the
firmware's status word in the ``error`` field of ``struct kvm_sev_cmd`` / ``struct sev_issue_cmd``
(``-EIO`` + status when the firmware refused; another errno + 0 when the kernel refused before asking
it: Linux arch/x86/kvm/svm/sev.c ``sev_issue_cmd``, drivers/crypto/ccp/sev-dev.c
``__sev_do_cmd_locked``).  The model keeps exactly that pair on one exception family:

* every host-side SEV flow (:mod:`sevemu.hypervisor.sev`) raises a :class:`SevError` with
  :attr:`~SevError.errno` (what the ioctl returns, negated) and :attr:`~SevError.status` (the
  firmware status, 0 when the firmware was not asked);
* the subclass says what kind of refusal it was, so Python callers catch it as they catch any
  sevemu error: :class:`SevFirmwareError` is a :class:`~sevemu.errors.MailboxError` (the firmware
  refused: ``-EIO``), :class:`SevStateError` a :class:`~sevemu.errors.VmError` (the VM or platform
  is in the wrong state: ``-ENOTTY``, ``-EBUSY``, ``-EINVAL``, ``-EPERM`` ...),
  :class:`SevInputError` an :class:`~sevemu.errors.InputError` (a bad argument or user buffer:
  ``-EINVAL``, ``-EFAULT``, ``-ENOMEM``); nothing changed when it was raised by a check;
* the ioctl layers (``KVM_MEMORY_ENCRYPT_OP``, ``/dev/sev``) catch :class:`SevError` and return
  ``-errno`` with ``error = status``; their checked helpers (``KvmSev.op``, ``SevDevice.issue``)
  raise :class:`IoctlError`, the same family, from such a return.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from sevemu.abi.status import status_name
from sevemu.errors import HardwareError, InputError, MailboxError, SevemuError, VmError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Errno", "IoctlError", "SevError", "SevFirmwareError", "SevInputError", "SevStateError"]


class Errno(enum.IntEnum):
    """The Linux errno values the SEV ioctls return (negated)."""

    EPERM = 1
    EIO = 5
    ENXIO = 6
    EBADF = 9
    ENOMEM = 12
    EFAULT = 14
    EBUSY = 16
    ENODEV = 19
    EINVAL = 22
    ENOTTY = 25
    EOPNOTSUPP = 95
    ENOTSUPP = 524  # kernel-internal, yet what sev-dev.c returns for GET_ID on old firmware


def errno_name(ret: int) -> str:
    """``EIO`` for -5 (the number itself for a value outside :class:`Errno`)."""
    try:
        return Errno(-ret).name
    except ValueError:
        return str(ret)


class SevError(SevemuError):
    """Raised when a host-side SEV operation is refused; carries ``errno`` and the firmware ``status``.

    ``lengths`` and ``fields`` are what the firmware wrote back into the command buffer before it
    refused (a length query's required lengths, SEND_START's policy); the ioctl layers copy them to
    the user structure where Linux does.
    """

    errno: Errno
    status: int
    lengths: tuple[int, ...]
    fields: Mapping[str, int]

    def __init__(self, errno: Errno, message: str, status: int = 0) -> None:
        super().__init__(message)
        self._set(errno, status)

    def _set(self, errno: Errno, status: int, lengths: tuple[int, ...] = (),
             fields: Mapping[str, int] | None = None) -> None:
        self.errno = errno
        self.status = int(status)
        self.lengths = lengths
        self.fields = fields or {}


class SevStateError(SevError, VmError):
    """Raised when the VM's or the platform's state forbids the operation (checked before any change)."""


class SevInputError(SevError, InputError):
    """Raised when an argument or a user buffer is malformed; nothing changed."""


class SevFirmwareError(SevError, MailboxError):
    """Raised when the firmware answered a command with a non-success status (``-EIO``)."""

    def __init__(self, command: str, status: int, *, lengths: tuple[int, ...] = (),
                 fields: Mapping[str, int] | None = None) -> None:
        MailboxError.__init__(self, command, status, status_name(status))
        self._set(Errno.EIO, status, lengths, fields)


class IoctlError(SevError, HardwareError):
    """Raised by ``SevDevice.issue`` / ``KvmSev.op`` when the ioctl returned a negative errno;
    ``ret`` is that value, ``error`` the firmware status (0 when the firmware was not called or agreed)."""

    def __init__(self, what: str, ret: int, error: int) -> None:
        self.ret = ret
        self.error = error
        detail = f", firmware status {status_name(error)} (0x{error:02x})" if error else ""
        HardwareError.__init__(self, f"{what} failed: -{errno_name(ret)}{detail}")
        try:
            errno = Errno(-ret)
        except ValueError:
            errno = Errno.EINVAL
        self._set(errno, error)
