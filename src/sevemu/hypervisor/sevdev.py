"""The ``/dev/sev`` device: Linux's SEV platform ioctl (drivers/crypto/ccp/sev-dev.c ``sev_ioctl``;
include/uapi/linux/psp-sev.h; reference 1.14).

User space issues ``ioctl(fd, SEV_ISSUE_CMD, struct sev_issue_cmd {u32 cmd; u64 data; u32 error})``
with one of the *user* command ids of :class:`SevUserCmd`; ``data`` points to the command's user
structure (:class:`SevUserDataStatus` ...), ``error`` comes back with the firmware status.  The
driver turns each user command into firmware commands issued through the mailbox only
(:class:`~sevemu.hypervisor.psp.PspDriver`), the way sev-dev.c does:

* ``FACTORY_RESET``: PLATFORM_STATUS first; WORKING -> ``-EBUSY``; INIT -> SHUTDOWN; then
  PLATFORM_RESET (Linux: ``SEV_CMD_FACTORY_RESET``).  Needs a writable fd.
* ``PLATFORM_STATUS``: the firmware's 12 bytes, viewed as Linux's ``sev_user_data_status`` (bytes
  03..06 as one u32 ``flags``: owner = bit 0, CONFIG_ES = bit 8).
* ``PEK_GEN`` / ``PDH_GEN`` / ``PEK_CSR`` / ``PEK_CERT_IMPORT`` / ``PDH_CERT_EXPORT``: if the
  platform is UNINIT the driver INITs it for the command and SHUTs it down again afterwards
  (``sev_move_to_init_state`` / ``shutdown_required``, Linux 6.15).  A failing implicit INIT reports
  ``error = INVALID_PLATFORM_STATE``.  PEK_CERT_IMPORT and PDH_CERT_EXPORT INIT whenever the platform
  is not INIT, so in WORKING the firmware itself refuses PEK_CERT_IMPORT.
* Length queries (``PEK_CSR``, ``PDH_CERT_EXPORT``, ``GET_ID2``): an absent buffer or a zero length
  issues the firmware command with address and length 0; the firmware answers INVALID_LENGTH with
  the required length, which the driver copies back (the ioctl returns ``-EIO`` with ``error`` =
  INVALID_LENGTH, as on Linux).
* ``GET_ID`` (deprecated): a fixed 128-byte ``sev_user_data_get_id`` (two sockets); ``GET_ID2``:
  caller-sized.  Both need firmware API >= 0.16 (``-ENOTSUPP`` otherwise).

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

import enum
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Protocol

from sevemu.abi.commands import CommandId
from sevemu.abi.sev import (
    SEV_TMR_LEN,
    GetIdCmd,
    InitCmd,
    InitOptions,
    PdhCertExportCmd,
    PekCertImportCmd,
    PekCsrCmd,
    PlatformStatus,
)
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status, status_name
from sevemu.errors import HardwareError

if TYPE_CHECKING:
    from sevemu.hypervisor.kvm import Hypervisor

__all__ = [
    "SEV_FW_BLOB_MAX_SIZE",
    "SEV_ISSUE_CMD",
    "Errno",
    "ErrorSink",
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
    "Staging",
    "UserBuffer",
    "copy_from_user",
    "copy_to_user",
    "ioc",
]


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Linux ``_IOC(dir, type, nr, size)`` (x86: dir bits 31:30, size 29:16, type 15:8, nr 7:0)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_READ_WRITE: Final = 3
SEV_ISSUE_CMD: Final = ioc(_IOC_READ_WRITE, ord("S"), 0, 16)
"""``_IOWR('S', 0x0, struct sev_issue_cmd)`` = 0xC0105300."""

SEV_FW_BLOB_MAX_SIZE: Final = 0x4000
"""Largest blob the driver copies from or to user space (Linux ``SEV_FW_BLOB_MAX_SIZE``, 16 KiB)."""

_GET_ID_LEN: Final = 128  # sizeof(struct sev_user_data_get_id): socket1[64], socket2[64]


class Errno(enum.IntEnum):
    """The Linux errno values the SEV ioctls return (negated)."""

    EPERM = 1
    EIO = 5
    EBADF = 9
    ENOMEM = 12
    EFAULT = 14
    EBUSY = 16
    ENODEV = 19
    EINVAL = 22
    ENOTTY = 25
    EOPNOTSUPP = 95
    ENOTSUPP = 524  # kernel-internal, yet what sev-dev.c returns for GET_ID on old firmware


class SevUserCmd(enum.IntEnum):
    """``enum`` of user command ids in include/uapi/linux/psp-sev.h (reference 1.14)."""

    FACTORY_RESET = 0
    PLATFORM_STATUS = 1
    PEK_GEN = 2
    PEK_CSR = 3
    PDH_GEN = 4
    PDH_CERT_EXPORT = 5
    PEK_CERT_IMPORT = 6
    GET_ID = 7
    GET_ID2 = 8
    SNP_PLATFORM_STATUS = 9
    SNP_COMMIT = 10
    SNP_SET_CONFIG = 11
    SNP_VLEK_LOAD = 12


class IoctlError(HardwareError):
    """Raised by :meth:`SevDevice.check` / ``KvmSev.check`` when an ioctl returns a negative errno;
    carries the return value and the firmware status (0 when the firmware was not called or agreed)."""

    def __init__(self, what: str, ret: int, error: int) -> None:
        self.ret = ret
        self.error = error
        try:
            name = Errno(-ret).name
        except ValueError:
            name = str(ret)
        detail = f", firmware status {status_name(error)} (0x{error:02x})" if error else ""
        super().__init__(f"{what} failed: -{name}{detail}")


# ---- user memory -----------------------------------------------------------------------------
UserBuffer = bytes | bytearray | None
"""A user-space pointer in this model: the buffer itself (``None`` is NULL)."""


class ErrorSink(Protocol):
    """Anything with an ``error`` field for the firmware status (``sev_issue_cmd``, ``kvm_sev_cmd``)."""

    error: int


class _Fault(Exception):
    """Internal: a user-copy or argument check failed with ``errno``."""

    def __init__(self, errno: Errno) -> None:
        super().__init__(errno.name)
        self.errno = errno


def copy_from_user(buf: UserBuffer, length: int) -> bytes:
    """``psp_copy_user_blob``: NULL or zero length or more than 16 KiB -> EINVAL; short -> EFAULT."""
    if buf is None or length == 0 or length > SEV_FW_BLOB_MAX_SIZE:
        raise _Fault(Errno.EINVAL)
    if not isinstance(buf, (bytes, bytearray)) or len(buf) < length:
        raise _Fault(Errno.EFAULT)
    return bytes(buf[:length])


def copy_to_user(buf: UserBuffer, data: bytes) -> None:
    """``copy_to_user``: the destination must be a writable buffer of at least ``len(data)`` bytes."""
    if not isinstance(buf, bytearray) or len(buf) < len(data):
        raise _Fault(Errno.EFAULT)
    buf[: len(data)] = data


class Staging:
    """Kernel bounce buffers for one ioctl: blobs copied into the PSP driver's DMA-able area."""

    def __init__(self, hv: Hypervisor) -> None:
        self._psp = hv.psp
        self._offset = 0

    def put(self, data: bytes) -> int:
        """Copy ``data`` into a fresh buffer; returns its physical address."""
        spa = self._psp.put_data(data, self._offset)
        self._offset += (len(data) + 63) & ~63
        return spa

    def zeroed(self, length: int) -> int:
        """A zero-filled buffer of ``length`` bytes (``kzalloc``) for the firmware to write into."""
        return self.put(bytes(length))

    def get(self, spa: int, length: int) -> bytes:
        return self._psp.get_data(length, spa - self._psp.data_spa)


# ---- user structures (include/uapi/linux/psp-sev.h) -----------------------------------------
@dataclass
class SevIssueCmd:
    """``struct sev_issue_cmd``: ``data`` is the user structure of ``cmd``; ``error`` is written back."""

    cmd: int
    data: Any = None
    error: int = 0
    ret: int = 0
    """Not in the C struct: the ioctl's return value, kept by :meth:`SevDevice.ioctl_raw`."""


@dataclass
class SevUserDataStatus:
    """``struct sev_user_data_status`` (out): ``flags`` bit 0 owner, bit 8 CONFIG_ES."""

    api_major: int = 0
    api_minor: int = 0
    state: int = 0
    flags: int = 0
    build: int = 0
    guest_count: int = 0


@dataclass
class SevUserDataPekCsr:
    """``struct sev_user_data_pek_csr``: ``address`` out (0x824-byte CSR), ``length`` in/out."""

    address: UserBuffer = None
    length: int = 0


@dataclass
class SevUserDataPekCertImport:
    """``struct sev_user_data_pek_cert_import``: the OCA-signed PEK and the OCA (in)."""

    pek_cert_address: UserBuffer = None
    pek_cert_len: int = 0
    oca_cert_address: UserBuffer = None
    oca_cert_len: int = 0


@dataclass
class SevUserDataPdhCertExport:
    """``struct sev_user_data_pdh_cert_export``: PDH and PEK || OCA || CEK (out), lengths in/out."""

    pdh_cert_address: UserBuffer = None
    pdh_cert_len: int = 0
    cert_chain_address: UserBuffer = None
    cert_chain_len: int = 0


@dataclass
class SevUserDataGetId:
    """``struct sev_user_data_get_id`` (out): one 64-byte ID per socket."""

    socket1: bytes = field(default=bytes(64))
    socket2: bytes = field(default=bytes(64))


@dataclass
class SevUserDataGetId2:
    """``struct sev_user_data_get_id2``: ``address`` out, ``length`` in/out."""

    address: UserBuffer = None
    length: int = 0


USER_STRUCTS: Final[dict[SevUserCmd, type[Any]]] = {
    SevUserCmd.PLATFORM_STATUS: SevUserDataStatus,
    SevUserCmd.PEK_CSR: SevUserDataPekCsr,
    SevUserCmd.PEK_CERT_IMPORT: SevUserDataPekCertImport,
    SevUserCmd.PDH_CERT_EXPORT: SevUserDataPdhCertExport,
    SevUserCmd.GET_ID: SevUserDataGetId,
    SevUserCmd.GET_ID2: SevUserDataGetId2,
}


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in fields(cls)}


# ---- the device ----------------------------------------------------------------------------
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
        try:
            cmd = SevUserCmd(arg.cmd)
        except ValueError:
            return -Errno.EINVAL
        handler = _HANDLERS.get(cmd)
        if handler is None:  # the SNP user commands belong to an SNP platform (not modelled here)
            return -Errno.EINVAL
        if isinstance(arg.data, dict):
            cls = USER_STRUCTS.get(cmd)
            if cls is None or not set(arg.data) <= _field_names(cls):
                return -Errno.EINVAL
            arg.data = cls(**arg.data)
        arg.error = 0
        try:
            return int(handler(self, arg))
        except _Fault as f:
            return -int(f.errno)

    def ioctl_raw(self, cmd: SevUserCmd, data: Any = None) -> SevIssueCmd:
        """Run ``cmd`` and return the :class:`SevIssueCmd` whatever the outcome (``ret`` in it)."""
        arg = SevIssueCmd(int(cmd), data)
        arg.ret = self.ioctl(SEV_ISSUE_CMD, arg)
        return arg

    def issue(self, cmd: SevUserCmd, data: Any = None) -> SevIssueCmd:
        """Build a :class:`SevIssueCmd`, run it, and raise :class:`IoctlError` on failure."""
        arg = SevIssueCmd(int(cmd), data)
        self.check(cmd.name, self.ioctl(SEV_ISSUE_CMD, arg), arg.error)
        return arg

    @staticmethod
    def check(what: str, ret: int, error: int) -> None:
        if ret < 0:
            raise IoctlError(what, ret, error)

    # ---- firmware access (sev-dev.c __sev_do_cmd_locked) ---------------------------------
    def do_cmd(self, cmd: CommandId, buf: bytes | None, arg: ErrorSink | None = None) -> tuple[int, bytes]:
        """Issue one firmware command; returns (0 or -EIO, the buffer as the firmware left it)."""
        status, out = self.hv.psp.raw(cmd, buf)
        if arg is not None:
            arg.error = status
        return (-int(Errno.EIO) if status != Status.SUCCESS else 0), out

    def platform_state(self) -> PlatformState:
        """The firmware's platform state (PLATFORM_STATUS)."""
        status, out = self.hv.psp.raw(CommandId.PLATFORM_STATUS, bytes(PlatformStatus.SIZE))
        if status != Status.SUCCESS:
            raise IoctlError("PLATFORM_STATUS", -int(Errno.EIO), status)
        return PlatformState(PlatformStatus.decode(out).state)

    def api_version(self) -> tuple[int, int, int]:
        status, out = self.hv.psp.raw(CommandId.PLATFORM_STATUS, bytes(PlatformStatus.SIZE))
        if status != Status.SUCCESS:
            return (0, 0, 0)
        st = PlatformStatus.decode(out)
        return st.api_major, st.api_minor, st.build

    def platform_init(self, arg: ErrorSink | None = None) -> int:
        """``__sev_platform_init_locked``: INIT (SEV-ES with the TMR when the CPU has it) unless
        already initialised, then WBINVD on all CPUs and DF_FLUSH.  0 or -EIO."""
        if self.platform_state() != PlatformState.UNINIT:
            return 0
        hv = self.hv
        if hv.soc.profile.sev_es:
            init = InitCmd(options=int(InitOptions.SEV_ES), tmr_paddr=hv.tmr_spa, tmr_len=SEV_TMR_LEN)
        else:
            init = InitCmd()
        rc, _ = self.do_cmd(CommandId.INIT, init.encode(), arg)
        if rc:
            return rc
        hv.soc.wbinvd_all()
        rc, _ = self.do_cmd(CommandId.DF_FLUSH, None, arg)
        return rc

    def platform_shutdown(self) -> int:
        rc, _ = self.do_cmd(CommandId.SHUTDOWN, None)
        return rc

    def _move_to_init(self, arg: SevIssueCmd) -> bool:
        """``sev_move_to_init_state``: INIT for this command; True when a SHUTDOWN is due after it."""
        if self.platform_init(arg):
            arg.error = int(Status.INVALID_PLATFORM_STATE)
            raise _Fault(Errno.EIO)
        return True

    # ---- user commands -----------------------------------------------------------------------
    def _factory_reset(self, arg: SevIssueCmd) -> int:
        if not self.writable:
            return -Errno.EPERM
        state = self.platform_state()
        if state == PlatformState.WORKING:
            return -Errno.EBUSY
        if state == PlatformState.INIT:
            rc, _ = self.do_cmd(CommandId.SHUTDOWN, None, arg)
            if rc:
                return rc
        rc, _ = self.do_cmd(CommandId.PLATFORM_RESET, None, arg)
        return rc

    def _platform_status(self, arg: SevIssueCmd) -> int:
        rc, out = self.do_cmd(CommandId.PLATFORM_STATUS, bytes(PlatformStatus.SIZE), arg)
        if rc:
            return rc
        data = arg.data if isinstance(arg.data, SevUserDataStatus) else None
        if data is None:
            return -Errno.EFAULT
        data.api_major, data.api_minor, data.state = out[0], out[1], out[2]
        data.flags = int.from_bytes(out[3:7], "little")
        data.build = out[7]
        data.guest_count = int.from_bytes(out[8:12], "little")
        return 0

    def _pek_pdh_gen(self, cmd: CommandId, arg: SevIssueCmd) -> int:
        if not self.writable:
            return -Errno.EPERM
        shutdown = self.platform_state() == PlatformState.UNINIT and self._move_to_init(arg)
        rc, _ = self.do_cmd(cmd, None, arg)
        if shutdown:
            self.platform_shutdown()
        return rc

    def _pek_gen(self, arg: SevIssueCmd) -> int:
        return self._pek_pdh_gen(CommandId.PEK_GEN, arg)

    def _pdh_gen(self, arg: SevIssueCmd) -> int:
        return self._pek_pdh_gen(CommandId.PDH_GEN, arg)

    def _pek_csr(self, arg: SevIssueCmd) -> int:
        if not self.writable:
            return -Errno.EPERM
        inp = arg.data
        if not isinstance(inp, SevUserDataPekCsr):
            return -Errno.EFAULT
        stage = Staging(self.hv)
        blob = 0
        if inp.address is not None and inp.length:
            if inp.length > SEV_FW_BLOB_MAX_SIZE:
                return -Errno.EFAULT
            blob = stage.zeroed(inp.length)
        data = PekCsrCmd(csr_paddr=blob, csr_len=inp.length if blob else 0)
        shutdown = self.platform_state() == PlatformState.UNINIT and self._move_to_init(arg)
        try:
            rc, out = self.do_cmd(CommandId.PEK_CSR, data.encode(), arg)
            done = PekCsrCmd.decode(out)
            # if the length was queried the firmware answered with it
            inp.length = done.csr_len
            if rc == 0 and blob:
                copy_to_user(inp.address, stage.get(blob, done.csr_len))
            return rc
        finally:
            if shutdown:
                self.platform_shutdown()

    def _pek_cert_import(self, arg: SevIssueCmd) -> int:
        if not self.writable:
            return -Errno.EPERM
        inp = arg.data
        if not isinstance(inp, SevUserDataPekCertImport):
            return -Errno.EFAULT
        stage = Staging(self.hv)
        pek = stage.put(copy_from_user(inp.pek_cert_address, inp.pek_cert_len))
        oca = stage.put(copy_from_user(inp.oca_cert_address, inp.oca_cert_len))
        data = PekCertImportCmd(pek_cert_paddr=pek, pek_cert_len=inp.pek_cert_len,
                                oca_cert_paddr=oca, oca_cert_len=inp.oca_cert_len)
        shutdown = self.platform_state() == PlatformState.UNINIT and self._move_to_init(arg)
        try:
            rc, _ = self.do_cmd(CommandId.PEK_CERT_IMPORT, data.encode(), arg)
            return rc
        finally:
            if shutdown:
                self.platform_shutdown()

    def _pdh_cert_export(self, arg: SevIssueCmd) -> int:
        inp = arg.data
        if not isinstance(inp, SevUserDataPdhCertExport):
            return -Errno.EFAULT
        stage = Staging(self.hv)
        pdh = chain = 0
        if inp.pdh_cert_address is not None and inp.pdh_cert_len and inp.cert_chain_address is not None:
            if inp.pdh_cert_len > SEV_FW_BLOB_MAX_SIZE or inp.cert_chain_len > SEV_FW_BLOB_MAX_SIZE:
                return -Errno.EFAULT
            pdh = stage.zeroed(inp.pdh_cert_len)
            chain = stage.zeroed(inp.cert_chain_len)
        data = PdhCertExportCmd(pdh_cert_paddr=pdh, pdh_cert_len=inp.pdh_cert_len if pdh else 0,
                                certs_paddr=chain, certs_len=inp.cert_chain_len if pdh else 0)
        shutdown = False
        if self.platform_state() == PlatformState.UNINIT:
            if not self.writable:
                return -Errno.EPERM
            shutdown = self._move_to_init(arg)
        try:
            rc, out = self.do_cmd(CommandId.PDH_CERT_EXPORT, data.encode(), arg)
            done = PdhCertExportCmd.decode(out)
            inp.pdh_cert_len = done.pdh_cert_len
            inp.cert_chain_len = done.certs_len
            if rc == 0 and pdh:
                copy_to_user(inp.pdh_cert_address, stage.get(pdh, done.pdh_cert_len))
                copy_to_user(inp.cert_chain_address, stage.get(chain, done.certs_len))
            return rc
        finally:
            if shutdown:
                self.platform_shutdown()

    def _need_get_id(self) -> None:
        major, minor, _ = self.api_version()
        if (major, minor) < (0, 16):
            raise _Fault(Errno.ENOTSUPP)

    def _get_id(self, arg: SevIssueCmd) -> int:
        self._need_get_id()
        out_struct = arg.data
        if not isinstance(out_struct, SevUserDataGetId):
            return -Errno.EFAULT
        stage = Staging(self.hv)
        blob = stage.zeroed(_GET_ID_LEN)
        rc, _ = self.do_cmd(CommandId.GET_ID, GetIdCmd(id_paddr=blob, id_len=_GET_ID_LEN).encode(), arg)
        if rc == 0:
            raw = stage.get(blob, _GET_ID_LEN)
            out_struct.socket1, out_struct.socket2 = raw[:64], raw[64:]
        return rc

    def _get_id2(self, arg: SevIssueCmd) -> int:
        self._need_get_id()
        inp = arg.data
        if not isinstance(inp, SevUserDataGetId2):
            return -Errno.EFAULT
        stage = Staging(self.hv)
        blob = 0
        if inp.address is not None and inp.length:
            if inp.length > SEV_FW_BLOB_MAX_SIZE:
                return -Errno.EFAULT
            blob = stage.zeroed(inp.length)
        data = GetIdCmd(id_paddr=blob, id_len=inp.length if blob else 0)
        rc, out = self.do_cmd(CommandId.GET_ID, data.encode(), arg)
        # the firmware returns the length of the ID (the required or the written length)
        done = GetIdCmd.decode(out)
        inp.length = done.id_len
        if blob and rc == 0:
            copy_to_user(inp.address, stage.get(blob, done.id_len))
        return rc


_HANDLERS: Final[dict[SevUserCmd, Any]] = {
    SevUserCmd.FACTORY_RESET: SevDevice._factory_reset,
    SevUserCmd.PLATFORM_STATUS: SevDevice._platform_status,
    SevUserCmd.PEK_GEN: SevDevice._pek_gen,
    SevUserCmd.PEK_CSR: SevDevice._pek_csr,
    SevUserCmd.PDH_GEN: SevDevice._pdh_gen,
    SevUserCmd.PDH_CERT_EXPORT: SevDevice._pdh_cert_export,
    SevUserCmd.PEK_CERT_IMPORT: SevDevice._pek_cert_import,
    SevUserCmd.GET_ID: SevDevice._get_id,
    SevUserCmd.GET_ID2: SevDevice._get_id2,
}
