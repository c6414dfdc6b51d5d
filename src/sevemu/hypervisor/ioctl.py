"""One declarative command table for both SEV ioctls, and the engine that runs its rows.

``KVM_MEMORY_ENCRYPT_OP`` (:mod:`sevemu.hypervisor.kvm_ops`) and ``/dev/sev``
(:mod:`sevemu.hypervisor.sevdev`) are thin: each looks its command up in :data:`COMMANDS` and lets
the row run.  A row (:class:`Command`) says, for one sub-command of one interface:

* ``struct``: the user structure (:mod:`sevemu.hypervisor.uapi`; a mapping of its field names is
  accepted, an unknown name is ``-EINVAL``, a structure of another type ``-EFAULT``);
* ``firmware``: the firmware command(s) its flow issues (a test holds the firmware log to it);
* ``needs``: the checks Linux makes first -- the VM's SEV context (``-ENOTTY``, or ``not_sev``),
  SEV-ES, write access to ``/dev/sev`` (``-EPERM``), an open ``/dev/sev`` in ``sev_fd``
  (``-EBADF``), firmware API 0.16 (``-ENOTSUPP``), and sev-dev.c's implicit INIT for the command
  (``sev_move_to_init_state``: INIT, the command, SHUTDOWN);
* ``ins``: the user blobs copied in (``psp_copy_user_blob``: NULL or length 0 ``-EINVAL``, a short
  buffer ``-EFAULT``; an ``optional`` blob is skipped when its pointer is NULL);
* ``out``: the copy-out rule (:class:`OutRule`) of a command with output buffers: which calls are
  *length queries* (:class:`Query`), the largest buffer and the errno above it, the errno for a
  NULL pointer outside a query, and when the lengths the firmware wrote back reach the user
  structure (:class:`Back`); the buffers themselves are copied out on success;
* ``handler``: the sub-command's flow (:mod:`sevemu.hypervisor.sev`) called with the copied
  blobs and the out-buffer lengths; it returns a :class:`~sevemu.hypervisor.sev.common.Reply`
  whose fields are written into the user structure on success.

The engine maps the error convention (:mod:`sevemu.hypervisor.errors`) to Linux's return:
``-errno``, with ``error`` = the firmware status.  SEV-ES and SNP sub-commands are more rows of
the same table (their flows in ``sev/es.py`` and ``sev/snp.py``).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar

from sevemu._util.units import MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.snp import SNP_VLEK_HASHSTICK_SIZE
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.hypervisor.errors import Errno, SevError, SevInputError, SevStateError
from sevemu.hypervisor.sev import es, snp
from sevemu.hypervisor.sev.common import Reply
from sevemu.hypervisor.sev.legacy import LegacySev
from sevemu.hypervisor.uapi import (
    SEV_FW_BLOB_MAX_SIZE,
    KvmSevAttestationReport,
    KvmSevCertExport,
    KvmSevCmdId,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevInit,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    KvmSevReceiveStart,
    KvmSevReceiveUpdateData,
    KvmSevReceiveUpdateVmsa,
    KvmSevSendStart,
    KvmSevSendUpdateData,
    KvmSevSendUpdateVmsa,
    KvmSevSnpLaunchFinish,
    KvmSevSnpLaunchStart,
    KvmSevSnpLaunchUpdate,
    NoData,
    SevUserCmd,
    SevUserDataGetId,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataPekCertImport,
    SevUserDataPekCsr,
    SevUserDataSnpConfig,
    SevUserDataSnpStatus,
    SevUserDataSnpVlekLoad,
    SevUserDataStatus,
    copy_from_user,
    copy_to_user,
)
from sevemu.hypervisor.vcpu import KvmVmType
from sevemu.hypervisor.vm import Vm

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "COMMANDS",
    "Api",
    "Args",
    "Back",
    "Caller",
    "Command",
    "InBlob",
    "Needs",
    "OutRule",
    "Outcome",
    "Query",
    "Runnable",
    "UserBlob",
    "table",
]

S = TypeVar("S", bound="DataclassInstance")

GET_ID2_MAX: Final = 4 * MiB
"""Largest GET_ID2 buffer: what Linux's page allocator hands ``kzalloc`` (1 << (PAGE_SHIFT +
MAX_PAGE_ORDER)); above it the allocation fails and sev-dev.c returns ``-ENOMEM``."""
_GET_ID_LEN: Final = 128  # sizeof(struct sev_user_data_get_id): socket1[64], socket2[64]
_VLEK_LOAD_LEN: Final = 16  # sizeof(struct sev_user_data_snp_vlek_load)


class Api(enum.Enum):
    """The two interfaces that read the table."""

    KVM = "KVM_MEMORY_ENCRYPT_OP"
    SEV_DEV = "/dev/sev"


class Needs(enum.Flag):
    """What a command checks before it does anything (module docstring)."""

    NONE = 0
    SEV = enum.auto()
    """The VM has an SEV context (``sev_guest(kvm)``): else ``not_sev``."""
    ES = enum.auto()
    """The VM is an SEV-ES guest: else ``-ENOTTY``."""
    SEV_FD = enum.auto()
    """``sev_fd`` is an open ``/dev/sev``: else ``-EBADF`` (checked when the firmware is called)."""
    WRITABLE = enum.auto()
    """``/dev/sev`` was opened for writing: else ``-EPERM``."""
    INIT = enum.auto()
    """An UNINIT platform is INITed for the command and SHUT down after it."""
    WRITE_TO_INIT = enum.auto()
    """With INIT: write access only when the platform has to be INITed (PDH_CERT_EXPORT)."""
    API_0_16 = enum.auto()
    """Firmware API 0.16 or later (GET_ID): else ``-ENOTSUPP``."""
    NEED_INIT = enum.auto()
    """The VM is of an SEV type and awaits KVM_SEV_INIT2 (``sev->need_init``): else ``-EINVAL``,
    before the user structure is read."""


_BIT_SEV, _BIT_ES, _BIT_SEV_FD, _BIT_WRITABLE, _BIT_INIT, _BIT_API_0_16, _BIT_NEED_INIT = (
    int(f.value) for f in (Needs.SEV, Needs.ES, Needs.SEV_FD, Needs.WRITABLE, Needs.INIT, Needs.API_0_16,
                           Needs.NEED_INIT))
"""The bits of :class:`Needs` members, tested against a row's ``needs`` value."""


class Query(enum.Enum):
    """When a call is a length query (the firmware is asked with address and length 0)."""

    LEN_ZERO = "the first length is 0"
    ANY_LEN_ZERO = "any length is 0"
    NULL_OR_ZERO = "a pointer is NULL or the first length is 0"

    def applies(self, ptrs: list[object], lens: list[int]) -> bool:
        if self is Query.LEN_ZERO:
            return not lens[0]
        if self is Query.ANY_LEN_ZERO:
            return not all(lens)
        return not lens[0] or any(p is None for p in ptrs)


class Back(enum.Enum):
    """When the lengths the firmware wrote back reach the user structure."""

    ALWAYS = "whatever the outcome (sev-dev.c; KVM SEND_START)"
    QUERY_OR_SUCCESS = "after a query or a success (KVM LAUNCH_MEASURE, GET_ATTESTATION_REPORT)"
    QUERY = "after a query only (KVM SEND_UPDATE_DATA / _VMSA)"


@dataclass(frozen=True, slots=True)
class UserBlob:
    """A (pointer, length) pair of a user structure, by field names."""

    ptr: str
    len: str


@dataclass(frozen=True, slots=True)
class InBlob:
    """A blob copied from user space (``psp_copy_user_blob``); ``optional``: skipped when NULL."""

    ptr: str
    len: str
    optional: bool = False


@dataclass(frozen=True, slots=True)
class OutRule:
    """How a command's output buffers are filled (module docstring)."""

    blobs: tuple[UserBlob, ...]
    query: Query
    back: Back
    limit: int = SEV_FW_BLOB_MAX_SIZE
    too_big: Errno = Errno.EINVAL
    null: Errno | None = None
    """The errno for a NULL output pointer outside a query; None: the firmware gets address 0."""


@dataclass(frozen=True, slots=True)
class Args:
    """What the engine hands a handler: the copied-in blobs (None: an optional one was NULL, or a
    query), the output lengths (0 for a query or an unstaged buffer), and whether it is a query."""

    blobs: tuple[bytes | None, ...] = ()
    lengths: tuple[int, ...] = ()
    query: bool = False

    def blob(self, i: int) -> bytes:
        b = self.blobs[i]
        return b if b is not None else b""


@dataclass
class Caller:
    """Who issues a command: the host's SEV flows, the VM (KVM), guest RAM's mapping in the VMM,
    whether ``sev_fd`` is an open ``/dev/sev`` (KVM), whether ``/dev/sev`` is writable."""

    sev: LegacySev
    vm: Vm | None = None
    ram_base: int = 0
    sev_fd: bool = False
    writable: bool = True

    @property
    def guest(self) -> Vm:
        if self.vm is None:
            raise SevStateError(Errno.EINVAL, "no VM behind this file")
        return self.vm

    def gpa(self, uaddr: object, length: int) -> int:
        """GPA of a guest-RAM user range; ``-ENOMEM`` (``sev_pin_memory``) when it is not RAM."""
        if not isinstance(uaddr, int) or length <= 0:
            raise SevInputError(Errno.EINVAL, "a guest-RAM address and a positive length are needed")
        gpa = uaddr - self.ram_base
        vm = self.guest
        if gpa < 0 or gpa + length > vm.memory:
            raise SevInputError(Errno.ENOMEM, f"user range {uaddr:#x}+{length:#x} is not {vm.name}'s RAM")
        return gpa


@dataclass(frozen=True, slots=True)
class Outcome:
    """The ioctl's result: return value, firmware status for ``error``, the structure (converted
    from a mapping when one was given)."""

    ret: int
    error: int
    data: object


Handler = Callable[[Caller, S, Args], "Reply | None"]


class Runnable(Protocol):
    """What an interface needs of a row."""

    @property
    def api(self) -> Api: ...
    @property
    def sub(self) -> int: ...
    @property
    def firmware(self) -> tuple[CommandId, ...]: ...
    def execute(self, caller: Caller, data: object) -> Outcome: ...


@dataclass(frozen=True, eq=False)
class Command(Generic[S]):
    """One row of the table (module docstring)."""

    api: Api
    sub: int
    struct: type[S]
    handler: Handler[S]
    firmware: tuple[CommandId, ...] = ()
    needs: Needs = Needs.NONE
    ins: tuple[InBlob, ...] = ()
    out: OutRule | None = None
    not_sev: Errno = Errno.ENOTTY
    default_struct: bool = False
    """A NULL ``data`` stands for a zeroed structure (an output-only one)."""
    null_data: Errno = Errno.EFAULT
    """The errno for a NULL ``data`` otherwise (``copy_from_user`` of NULL: -EFAULT; sev-dev.c's SNP
    commands check ``argp->data`` first: -EINVAL)."""

    def execute(self, caller: Caller, data: object) -> Outcome:
        """Run the command for ``caller`` on the user structure ``data``."""
        p: S | None = None
        try:
            if isinstance(data, Mapping):
                data = self._from_fields(data)
            self._check(caller)
            p = self._structure(data)
            args = self._args(p)
            if self.needs._value_ & _BIT_SEV_FD and not caller.sev_fd:
                raise SevInputError(Errno.EBADF, "sev_fd is not an open /dev/sev")
            reply = self._run(caller, p, args)
            self._copy_out(p, args, reply)
        except SevError as e:
            if p is not None:
                self._back_on_error(p, e)
            return Outcome(-int(e.errno), e.status, data if p is None else p)
        return Outcome(0, 0, p)

    # ---- steps ----------------------------------------------------------------------------------
    def _from_fields(self, data: Mapping[object, object]) -> S | NoData:
        struct = self.struct
        names = {f.name for f in fields(struct)}
        if struct is NoData or not set(data) <= names:
            raise SevInputError(Errno.EINVAL, f"fields {sorted(map(str, data))} are not those of {struct.__name__}")
        return struct(**{str(k): v for k, v in data.items()})

    def _check(self, caller: Caller) -> None:
        """The checks Linux makes before it reads the user structure."""
        needs: int = self.needs._value_  # (bit tests of the value: a Flag's ``in`` costs ~0.3 us each)
        if needs & _BIT_API_0_16:
            major, minor, _ = caller.sev.api_version()
            if (major, minor) < (0, 16):
                raise SevStateError(Errno.ENOTSUPP, "GET_ID needs firmware API 0.16")
        if needs & _BIT_WRITABLE and not caller.writable:
            raise SevStateError(Errno.EPERM, "/dev/sev is not open for writing")
        if needs & _BIT_NEED_INIT and not caller.guest.need_init:
            raise SevStateError(Errno.EINVAL, f"{caller.guest.name} ({caller.guest.vm_type.name}) takes no "
                                              "KVM_SEV_INIT2")
        if needs & _BIT_SEV:
            caller.sev.need_context(caller.guest, self.not_sev)
        if needs & _BIT_ES:
            caller.sev.need_es(caller.guest)

    def _structure(self, data: object) -> S:
        struct = self.struct
        if struct is NoData or (data is None and self.default_struct):
            return struct()
        if data is None:
            raise SevInputError(self.null_data, f"data is NULL, {struct.__name__} expected")
        if not isinstance(data, struct):  # copy_from_user of a bad pointer
            raise SevInputError(Errno.EFAULT, f"data is not a {struct.__name__}")
        return data

    def _args(self, p: S) -> Args:
        out = self.out
        lengths: tuple[int, ...] = ()
        query = False
        if out is not None:
            ptrs = [getattr(p, b.ptr) for b in out.blobs]
            lens = [int(getattr(p, b.len)) for b in out.blobs]
            query = out.query.applies(ptrs, lens)
            if query:
                return Args((None,) * len(self.ins), (0,) * len(lens), True)
            if out.null is not None and any(ptr is None for ptr in ptrs):
                raise SevInputError(out.null, "an output buffer is NULL")
            if any(n > out.limit for n in lens):
                raise SevInputError(out.too_big, f"an output buffer of more than {out.limit} bytes")
            lengths = tuple(n if ptr is not None else 0 for ptr, n in zip(ptrs, lens, strict=True))
        for blob in self.ins:
            ptr, n = getattr(p, blob.ptr), getattr(p, blob.len)
            if not blob.optional and (ptr is None or not n):
                raise SevInputError(Errno.EINVAL, f"{blob.ptr} is NULL or {blob.len} is 0")
        blobs = tuple(None if b.optional and getattr(p, b.ptr) is None
                      else copy_from_user(getattr(p, b.ptr), getattr(p, b.len)) for b in self.ins)
        return Args(blobs, lengths, query)

    def _run(self, caller: Caller, p: S, args: Args) -> Reply | None:
        if not self.needs._value_ & _BIT_INIT:
            return self.handler(caller, p, args)
        sev = caller.sev
        if sev.platform_state() != PlatformState.UNINIT:
            return self.handler(caller, p, args)
        if Needs.WRITE_TO_INIT in self.needs and not caller.writable:
            raise SevStateError(Errno.EPERM, "INIT for this command needs /dev/sev open for writing")
        try:
            sev.platform_init()
        except SevError as e:  # sev_move_to_init_state reports the failed INIT this way
            raise SevStateError(Errno.EIO, f"implicit INIT failed: {e}", int(Status.INVALID_PLATFORM_STATE)) from e
        try:
            return self.handler(caller, p, args)
        finally:
            with contextlib.suppress(SevError):  # as sev-dev.c, a failed SHUTDOWN is not the command's error
                sev.shutdown()

    def _back_on_error(self, p: S, e: SevError) -> None:
        out = self.out
        if out is None or not e.lengths:
            return
        query = out.query.applies([getattr(p, b.ptr) for b in out.blobs], [int(getattr(p, b.len)) for b in out.blobs])
        if out.back is Back.ALWAYS or query:
            for blob, n in zip(out.blobs, e.lengths, strict=True):
                setattr(p, blob.len, n)
        if out.back is Back.ALWAYS and not query:
            for name, value in e.fields.items():
                if hasattr(p, name):
                    setattr(p, name, value)

    def _copy_out(self, p: S, args: Args, reply: Reply | None) -> None:
        if reply is None:
            return
        out = self.out
        if out is not None and reply.lengths and (args.query or out.back is not Back.QUERY):
            for blob, n in zip(out.blobs, reply.lengths, strict=True):
                setattr(p, blob.len, n)
        for name, value in reply.fields.items():
            if hasattr(p, name):
                setattr(p, name, value)
        if out is not None and not args.query:
            for blob, data, n in zip(out.blobs, reply.blobs, args.lengths, strict=True):
                if n:
                    copy_to_user(getattr(p, blob.ptr), data)


# ==== the handlers: each maps a user structure to its flow ===========================================
def _kvm_init(c: Caller, p: NoData, a: Args) -> None:
    c.sev.guest_init(c.guest, es=False)


def _kvm_es_init(c: Caller, p: NoData, a: Args) -> None:
    c.sev.guest_init(c.guest, es=True)


def _kvm_init2(c: Caller, p: KvmSevInit, a: Args) -> None:
    if c.guest.vm_type is KvmVmType.SNP_VM:
        snp.guest_init2(c.sev, c.guest, p)
    else:
        es.guest_init2(c.sev, c.guest, p)


def _snp_launch_start(c: Caller, p: KvmSevSnpLaunchStart, a: Args) -> None:
    snp.launch_start(c.sev, c.guest, p)


def _snp_launch_update(c: Caller, p: KvmSevSnpLaunchUpdate, a: Args) -> None:
    snp.launch_update(c.sev, c.guest, p)


def _snp_launch_finish(c: Caller, p: KvmSevSnpLaunchFinish, a: Args) -> None:
    snp.launch_finish(c.sev, c.guest, p)


def _launch_start(c: Caller, p: KvmSevLaunchStart, a: Args) -> Reply:
    handle = c.sev.launch_start(c.guest, p.policy, a.blobs[0], a.blobs[1], handle=p.handle)
    return Reply(fields={"handle": handle})


def _launch_update_data(c: Caller, p: KvmSevLaunchUpdateData, a: Args) -> None:
    c.sev.launch_update_data(c.guest, c.gpa(p.uaddr, p.len), p.len)


def _launch_update_vmsa(c: Caller, p: NoData, a: Args) -> None:
    es.launch_update_vmsa(c.sev, c.guest)


def _launch_secret(c: Caller, p: KvmSevLaunchSecret, a: Args) -> None:
    c.sev.launch_secret(c.guest, c.gpa(p.guest_uaddr, p.guest_len), p.guest_len, a.blob(0), a.blob(1))


def _launch_measure(c: Caller, p: KvmSevLaunchMeasure, a: Args) -> Reply:
    return c.sev.launch_measure(c.guest, a.lengths[0])


def _launch_finish(c: Caller, p: NoData, a: Args) -> None:
    c.sev.launch_finish(c.guest)


def _guest_status(c: Caller, p: KvmSevGuestStatus, a: Args) -> Reply:
    st = c.sev.guest_status(c.guest)
    return Reply(fields={"handle": st.handle, "policy": st.policy, "state": st.state})


def _dbg_range(c: Caller, p: KvmSevDbg, guest: object, user: object, decrypt: bool) -> int:
    """The GPA of a debug request (``-EINVAL`` without a length or destination, ``-EFAULT`` for
    pointers of the wrong kind: guest RAM is an int, user memory a buffer)."""
    if not p.len or p.dst_uaddr is None:
        raise SevInputError(Errno.EINVAL, "DBG needs a length and a destination")
    host_ok = isinstance(user, bytearray) if decrypt else isinstance(user, (bytes, bytearray)) and len(user) >= p.len
    if not isinstance(guest, int) or not host_ok:
        raise SevInputError(Errno.EFAULT, "DBG: a guest-RAM address and a user buffer are needed")
    return c.gpa(guest, p.len)


def _dbg_decrypt(c: Caller, p: KvmSevDbg, a: Args) -> None:
    gpa = _dbg_range(c, p, p.src_uaddr, p.dst_uaddr, True)
    copy_to_user(p.dst_uaddr, c.sev.dbg_decrypt(c.guest, gpa, p.len))


def _dbg_encrypt(c: Caller, p: KvmSevDbg, a: Args) -> None:
    gpa = _dbg_range(c, p, p.dst_uaddr, p.src_uaddr, False)
    src = p.src_uaddr
    assert isinstance(src, (bytes, bytearray))  # checked by _dbg_range
    c.sev.dbg_encrypt(c.guest, gpa, bytes(src[: p.len]))


def _attestation(c: Caller, p: KvmSevAttestationReport, a: Args) -> Reply:
    return c.sev.attestation(c.guest, bytes(p.mnonce), a.lengths[0])


def _cert_export(c: Caller, p: KvmSevCertExport | SevUserDataPdhCertExport, a: Args) -> Reply:
    return c.sev.pdh_cert_export(a.lengths[0], a.lengths[1])


def _send_start(c: Caller, p: KvmSevSendStart, a: Args) -> Reply:
    return c.sev.send_start(c.guest, a.blob(0), a.blob(1), a.blob(2), a.lengths[0])


def _guest_range(c: Caller, uaddr: object, length: int) -> int:
    if not isinstance(uaddr, int):
        raise SevInputError(Errno.EFAULT, "the guest address is not in guest RAM")
    if not uaddr or not length:
        raise SevInputError(Errno.EINVAL, "a guest address and length are needed")
    return c.gpa(uaddr, length)


def _send_update_data(c: Caller, p: KvmSevSendUpdateData, a: Args) -> Reply:
    if a.query:
        return c.sev.send_update_query(c.guest)
    gpa = _guest_range(c, p.guest_uaddr, p.guest_len)
    return c.sev.send_update_data(c.guest, gpa, p.guest_len, a.lengths[0], a.lengths[1])


def _send_update_vmsa(c: Caller, p: KvmSevSendUpdateVmsa, a: Args) -> Reply:
    if a.query:
        return c.sev.send_update_query(c.guest, CommandId.SEND_UPDATE_VMSA)
    return es.send_update_vmsa(c.sev, c.guest, p.vcpu_id, a.lengths[0], a.lengths[1])


def _send_finish(c: Caller, p: NoData, a: Args) -> None:
    c.sev.send_finish(c.guest)


def _send_cancel(c: Caller, p: NoData, a: Args) -> None:
    c.sev.send_cancel(c.guest)


def _receive_start(c: Caller, p: KvmSevReceiveStart, a: Args) -> Reply:
    handle = c.sev.receive_start(c.guest, p.policy, a.blob(0), a.blob(1), handle=p.handle)
    return Reply(fields={"handle": handle})


def _receive_update_data(c: Caller, p: KvmSevReceiveUpdateData, a: Args) -> None:
    gpa = _guest_range(c, p.guest_uaddr, p.guest_len)
    c.sev.receive_update_data(c.guest, gpa, p.guest_len, a.blob(0), a.blob(1))


def _receive_update_vmsa(c: Caller, p: KvmSevReceiveUpdateVmsa, a: Args) -> None:
    es.receive_update_vmsa(c.sev, c.guest, p.vcpu_id, a.blob(0), a.blob(1))


def _receive_finish(c: Caller, p: NoData, a: Args) -> None:
    c.sev.receive_finish(c.guest)


def _factory_reset(c: Caller, p: NoData, a: Args) -> None:
    c.sev.factory_reset()


def _platform_status(c: Caller, p: SevUserDataStatus, a: Args) -> Reply:
    st = c.sev.platform_status()
    # Linux's view: bytes 03..06 of the firmware's buffer as one u32 (owner = bit 0, CONFIG_ES = bit 8)
    return Reply(fields={"api_major": st.api_major, "api_minor": st.api_minor, "state": st.state,
                         "flags": st.owner | st.config << 8, "build": st.build, "guest_count": st.guest_count})


def _snp_platform_status(c: Caller, p: SevUserDataSnpStatus, a: Args) -> Reply:
    st = snp.platform_status(c.sev)
    f = st.flags
    return Reply(fields={"api_major": st.api_major, "api_minor": st.api_minor, "state": st.state,
                         "is_rmp_initialized": st.init.is_rmp_initialized, "build_id": st.build_id,
                         "mask_chip_id": f.mask_chip_id, "mask_chip_key": f.mask_chip_key, "vlek_en": f.vlek_en,
                         "feature_info": f.feature_info, "rapl_dis": f.rapl_dis,
                         "ciphertext_hiding_cap": f.ciphertext_hiding_cap, "ciphertext_hiding_en": f.ciphertext_hiding_en,
                         "guest_count": st.guest_count, "current_tcb_version": st.current_tcb,
                         "reported_tcb_version": st.reported_tcb})


def _snp_commit(c: Caller, p: NoData, a: Args) -> None:
    snp.commit(c.sev)


def _snp_set_config(c: Caller, p: SevUserDataSnpConfig, a: Args) -> None:
    snp.set_config(c.sev, p.reported_tcb, bool(p.mask_chip_id), bool(p.mask_chip_key))


def _snp_vlek_load(c: Caller, p: SevUserDataSnpVlekLoad, a: Args) -> None:
    if not c.sev.snp:  # sev-dev.c checks this with argp->data, before it reads the structure
        raise SevStateError(Errno.EINVAL, "SNP is not initialised")
    if p.len != _VLEK_LOAD_LEN or p.vlek_wrapped_version != 0:
        raise SevInputError(Errno.EINVAL, f"len {p.len} (expected {_VLEK_LOAD_LEN}) or version "
                                          f"{p.vlek_wrapped_version} (expected 0)")
    snp.vlek_load(c.sev, copy_from_user(p.vlek_wrapped_address, SNP_VLEK_HASHSTICK_SIZE))


def _pek_gen(c: Caller, p: NoData, a: Args) -> None:
    c.sev.pek_gen()


def _pdh_gen(c: Caller, p: NoData, a: Args) -> None:
    c.sev.pdh_gen()


def _pek_csr(c: Caller, p: SevUserDataPekCsr, a: Args) -> Reply:
    return c.sev.pek_csr(a.lengths[0])


def _pek_cert_import(c: Caller, p: SevUserDataPekCertImport, a: Args) -> None:
    c.sev.pek_cert_import(a.blob(0), a.blob(1))


def _get_id(c: Caller, p: SevUserDataGetId, a: Args) -> Reply:
    raw = c.sev.get_id(_GET_ID_LEN).blobs[0].ljust(_GET_ID_LEN, b"\0")
    return Reply(fields={"socket1": raw[:64], "socket2": raw[64:]})


def _get_id2(c: Caller, p: SevUserDataGetId2, a: Args) -> Reply:
    return c.sev.get_id(a.lengths[0])


# ==== the table ============================================================================================
_K, _D = Api.KVM, Api.SEV_DEV
_F = CommandId
_SEV = Needs.SEV
_HDR_TRANS = (InBlob("hdr_uaddr", "hdr_len"), InBlob("trans_uaddr", "trans_len"))
_SEND_PACKET = OutRule((UserBlob("hdr_uaddr", "hdr_len"), UserBlob("trans_uaddr", "trans_len")),
                       Query.ANY_LEN_ZERO, Back.QUERY, too_big=Errno.ENOMEM, null=Errno.EINVAL)
_KVM_BLOB = OutRule((UserBlob("uaddr", "len"),), Query.LEN_ZERO, Back.QUERY_OR_SUCCESS)


def _pdh_export(api: Api, struct: type[KvmSevCertExport | SevUserDataPdhCertExport], pdh: UserBlob,
                chain: UserBlob, too_big: Errno, needs: Needs) -> Runnable:
    """PDH_CERT_EXPORT for /dev/sev and its KVM extension CERT_EXPORT: one flow, two structures."""
    sub = KvmSevCmdId.CERT_EXPORT if api is Api.KVM else SevUserCmd.PDH_CERT_EXPORT
    return Command(api, sub, struct, _cert_export, (_F.PDH_CERT_EXPORT,), needs,
                   out=OutRule((pdh, chain), Query.NULL_OR_ZERO, Back.ALWAYS, too_big=too_big))


COMMANDS: Final[tuple[Runnable, ...]] = (
    # ---- KVM_MEMORY_ENCRYPT_OP (arch/x86/kvm/svm/sev.c) ----
    Command(_K, KvmSevCmdId.INIT, NoData, _kvm_init, (_F.PLATFORM_STATUS, _F.INIT, _F.DF_FLUSH)),
    Command(_K, KvmSevCmdId.ES_INIT, NoData, _kvm_es_init, (_F.PLATFORM_STATUS, _F.INIT, _F.DF_FLUSH)),
    Command(_K, KvmSevCmdId.INIT2, KvmSevInit, _kvm_init2, (_F.PLATFORM_STATUS, _F.INIT, _F.DF_FLUSH),
            Needs.NEED_INIT),
    Command(_K, KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart, _launch_start, (_F.LAUNCH_START, _F.ACTIVATE),
            _SEV | Needs.SEV_FD, ins=(InBlob("dh_uaddr", "dh_len", optional=True),
                                      InBlob("session_uaddr", "session_len", optional=True))),
    Command(_K, KvmSevCmdId.LAUNCH_UPDATE_DATA, KvmSevLaunchUpdateData, _launch_update_data,
            (_F.LAUNCH_UPDATE_DATA,), _SEV),
    Command(_K, KvmSevCmdId.LAUNCH_UPDATE_VMSA, NoData, _launch_update_vmsa, (_F.LAUNCH_UPDATE_VMSA,), Needs.ES),
    Command(_K, KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret, _launch_secret, (_F.LAUNCH_SECRET,), _SEV,
            ins=_HDR_TRANS),
    Command(_K, KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure, _launch_measure, (_F.LAUNCH_MEASURE,), _SEV,
            out=_KVM_BLOB),
    Command(_K, KvmSevCmdId.LAUNCH_FINISH, NoData, _launch_finish, (_F.LAUNCH_FINISH,), _SEV),
    Command(_K, KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus, _guest_status, (_F.GUEST_STATUS,), _SEV,
            default_struct=True),
    Command(_K, KvmSevCmdId.DBG_DECRYPT, KvmSevDbg, _dbg_decrypt, (_F.DBG_DECRYPT,), _SEV),
    Command(_K, KvmSevCmdId.DBG_ENCRYPT, KvmSevDbg, _dbg_encrypt, (_F.DBG_DECRYPT, _F.DBG_ENCRYPT), _SEV),
    Command(_K, KvmSevCmdId.GET_ATTESTATION_REPORT, KvmSevAttestationReport, _attestation, (_F.ATTESTATION,),
            _SEV, out=_KVM_BLOB),
    _pdh_export(_K, KvmSevCertExport, UserBlob("pdh_cert_uaddr", "pdh_cert_len"),
                UserBlob("cert_chain_uaddr", "cert_chain_len"), Errno.EINVAL, Needs.NONE),
    Command(_K, KvmSevCmdId.SEND_START, KvmSevSendStart, _send_start, (_F.SEND_START,), _SEV,
            ins=(InBlob("pdh_cert_uaddr", "pdh_cert_len"), InBlob("plat_certs_uaddr", "plat_certs_len"),
                 InBlob("amd_certs_uaddr", "amd_certs_len")),
            out=OutRule((UserBlob("session_uaddr", "session_len"),), Query.LEN_ZERO, Back.ALWAYS, null=Errno.EINVAL)),
    Command(_K, KvmSevCmdId.SEND_UPDATE_DATA, KvmSevSendUpdateData, _send_update_data, (_F.SEND_UPDATE_DATA,),
            _SEV, out=_SEND_PACKET),
    Command(_K, KvmSevCmdId.SEND_UPDATE_VMSA, KvmSevSendUpdateVmsa, _send_update_vmsa, (_F.SEND_UPDATE_VMSA,),
            _SEV, out=_SEND_PACKET),
    Command(_K, KvmSevCmdId.SEND_FINISH, NoData, _send_finish, (_F.SEND_FINISH,), _SEV),
    Command(_K, KvmSevCmdId.SEND_CANCEL, NoData, _send_cancel, (_F.SEND_CANCEL,), _SEV),
    Command(_K, KvmSevCmdId.RECEIVE_START, KvmSevReceiveStart, _receive_start, (_F.RECEIVE_START, _F.ACTIVATE),
            _SEV | Needs.SEV_FD, ins=(InBlob("pdh_uaddr", "pdh_len"), InBlob("session_uaddr", "session_len"))),
    Command(_K, KvmSevCmdId.RECEIVE_UPDATE_DATA, KvmSevReceiveUpdateData, _receive_update_data,
            (_F.RECEIVE_UPDATE_DATA,), _SEV, ins=_HDR_TRANS, not_sev=Errno.EINVAL),
    Command(_K, KvmSevCmdId.RECEIVE_UPDATE_VMSA, KvmSevReceiveUpdateVmsa, _receive_update_vmsa,
            (_F.RECEIVE_UPDATE_VMSA,), _SEV, ins=_HDR_TRANS),
    Command(_K, KvmSevCmdId.RECEIVE_FINISH, NoData, _receive_finish, (_F.RECEIVE_FINISH,), _SEV),
    Command(_K, KvmSevCmdId.SNP_LAUNCH_START, KvmSevSnpLaunchStart, _snp_launch_start,
            (_F.SNP_GCTX_CREATE, _F.SNP_LAUNCH_START, _F.SNP_ACTIVATE), Needs.SEV_FD),
    Command(_K, KvmSevCmdId.SNP_LAUNCH_UPDATE, KvmSevSnpLaunchUpdate, _snp_launch_update, (_F.SNP_LAUNCH_UPDATE,),
            Needs.SEV_FD),
    Command(_K, KvmSevCmdId.SNP_LAUNCH_FINISH, KvmSevSnpLaunchFinish, _snp_launch_finish,
            (_F.SNP_LAUNCH_UPDATE, _F.SNP_LAUNCH_FINISH)),
    # ---- /dev/sev SEV_ISSUE_CMD (drivers/crypto/ccp/sev-dev.c) ----
    Command(_D, SevUserCmd.FACTORY_RESET, NoData, _factory_reset,
            (_F.PLATFORM_STATUS, _F.SHUTDOWN, _F.PLATFORM_RESET), Needs.WRITABLE),
    Command(_D, SevUserCmd.PLATFORM_STATUS, SevUserDataStatus, _platform_status, (_F.PLATFORM_STATUS,)),
    Command(_D, SevUserCmd.PEK_GEN, NoData, _pek_gen, (_F.PEK_GEN,), Needs.WRITABLE | Needs.INIT),
    Command(_D, SevUserCmd.PDH_GEN, NoData, _pdh_gen, (_F.PDH_GEN,), Needs.WRITABLE | Needs.INIT),
    Command(_D, SevUserCmd.PEK_CSR, SevUserDataPekCsr, _pek_csr, (_F.PEK_CSR,), Needs.WRITABLE | Needs.INIT,
            out=OutRule((UserBlob("address", "length"),), Query.NULL_OR_ZERO, Back.ALWAYS, too_big=Errno.EFAULT)),
    Command(_D, SevUserCmd.PEK_CERT_IMPORT, SevUserDataPekCertImport, _pek_cert_import, (_F.PEK_CERT_IMPORT,),
            Needs.WRITABLE | Needs.INIT, ins=(InBlob("pek_cert_address", "pek_cert_len"),
                                              InBlob("oca_cert_address", "oca_cert_len"))),
    _pdh_export(_D, SevUserDataPdhCertExport, UserBlob("pdh_cert_address", "pdh_cert_len"),
                UserBlob("cert_chain_address", "cert_chain_len"), Errno.EFAULT, Needs.INIT | Needs.WRITE_TO_INIT),
    Command(_D, SevUserCmd.GET_ID, SevUserDataGetId, _get_id, (_F.GET_ID,), Needs.API_0_16),
    Command(_D, SevUserCmd.SNP_PLATFORM_STATUS, SevUserDataSnpStatus, _snp_platform_status,
            (_F.SNP_PLATFORM_STATUS,), null_data=Errno.EINVAL),
    Command(_D, SevUserCmd.SNP_COMMIT, NoData, _snp_commit, (_F.SNP_COMMIT,), Needs.WRITABLE),
    Command(_D, SevUserCmd.SNP_SET_CONFIG, SevUserDataSnpConfig, _snp_set_config, (_F.SNP_CONFIG,), Needs.WRITABLE,
            null_data=Errno.EINVAL),
    Command(_D, SevUserCmd.SNP_VLEK_LOAD, SevUserDataSnpVlekLoad, _snp_vlek_load, (_F.SNP_VLEK_LOAD,),
            Needs.WRITABLE, null_data=Errno.EINVAL),
    Command(_D, SevUserCmd.GET_ID2, SevUserDataGetId2, _get_id2, (_F.GET_ID,), Needs.API_0_16,
            out=OutRule((UserBlob("address", "length"),), Query.NULL_OR_ZERO, Back.ALWAYS, limit=GET_ID2_MAX,
                        too_big=Errno.ENOMEM)),
)
"""Every sub-command of both interfaces (module docstring)."""


def table(api: Api) -> dict[int, Runnable]:
    """The rows of one interface by sub-command id."""
    return {row.sub: row for row in COMMANDS if row.api is api}
