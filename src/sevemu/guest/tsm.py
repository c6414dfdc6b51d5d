"""configfs-tsm report directories of an SNP guest (Linux ``drivers/virt/coco/tsm.c`` -- now
``tsm-report.c`` -- and ``Documentation/ABI/testing/configfs-tsm-report``; the SNP provider is
``sev-guest.c``'s ``sev_report_new``).

``/sys/kernel/config/tsm/report/$name/`` as objects: :class:`TsmReports` is the ``report`` group
(``mkdir`` / ``rmdir`` of named entries), :class:`TsmReport` one entry with the attributes the SNP
provider shows (no SVSM: ``manifestblob`` and the ``service_*`` attributes are hidden, as Linux hides
them without one):

=================  ====  ==========================================================================
``inblob``         WO    REPORT_DATA, at most 64 bytes (``TSM_INBLOB_MAX``; more: ``-EFBIG``); the
                         SNP provider needs exactly 64 (``-EINVAL`` when the report is generated)
``outblob``        RO    the attestation report (0x4A0 bytes), generated on the first read after a
                         write; ``-EINVAL`` before any ``inblob`` write
``auxblob``        RO    the certificate table of the extended report (empty if the host set none)
``provider``       RO    ``sev_guest``
``generation``     RO    the write generation: every write of ``inblob`` / ``privlevel`` adds one,
                         so a reader compares it before and after to detect a concurrent writer
``privlevel``      WO    the VMPL to report, ``privlevel_floor``..3 (``-EINVAL`` otherwise)
``privlevel_floor`` RO   the VMPL the guest's driver runs at (its VMPCK index)
=================  ====  ==========================================================================

Text attributes read as ``"%u\\n"`` / ``"%s\\n"``; writes of text attributes parse as ``kstrtouint``
(decimal, ``0x`` hex or ``0`` octal, an optional trailing newline).  Errors raise
:class:`TsmError` carrying the negative errno a ``read``/``write`` system call would return.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Final

from sevemu.abi.report import REPORT_SIZE, CertTableEntry, ReportReq, ReportRsp
from sevemu.errors import SevemuError
from sevemu.guest.sev_guest import SevGuestDevice, SevGuestError, SnpExtReportReq

__all__ = ["READABLE", "TSM_INBLOB_MAX", "WRITABLE", "TsmError", "TsmReport", "TsmReports"]

TSM_INBLOB_MAX: Final = 64
PROVIDER: Final = "sev_guest"
READABLE: Final = ("outblob", "auxblob", "provider", "generation", "privlevel_floor")
WRITABLE: Final = ("inblob", "privlevel")
_CERTS_LEN: Final = 0x4000


class TsmError(SevemuError):
    """Raised when a configfs-tsm attribute access fails; ``errno`` is the negative errno."""

    def __init__(self, err: int, detail: str) -> None:
        self.errno = -abs(err)
        super().__init__(f"-{errno.errorcode.get(abs(err), str(err))}: {detail}")


def _kstrtouint(data: bytes) -> int:
    text = data.decode("ascii", "replace").removesuffix("\n")
    octal = len(text) > 1 and text[0] == "0" and text[1] not in "xX"
    try:
        value = int(text[1:], 8) if octal else int(text, 16 if text[:2].lower() == "0x" else 10)
    except ValueError:
        raise TsmError(errno.EINVAL, f"{text!r} is not an unsigned integer") from None
    if text[0] in "+-" or text[:1].isspace():
        raise TsmError(errno.EINVAL, f"{text!r} is not an unsigned integer")
    if value > 0xFFFF_FFFF:
        raise TsmError(errno.ERANGE, f"{text!r} is not a u32")
    return value


def _cert_blob(certs: bytes) -> bytes:
    """The certificate buffer up to its last certificate (the zero padding dropped)."""
    end = pos = 0
    while pos + CertTableEntry.SIZE <= len(certs):
        e = CertTableEntry.decode(certs[pos : pos + CertTableEntry.SIZE])
        pos += CertTableEntry.SIZE
        if e == CertTableEntry():
            return certs[: max(end, pos)]
        end = max(end, e.offset + e.length)
    return certs[:end]


@dataclass
class TsmReport:
    """One ``report/$name`` entry (module docstring)."""

    device: SevGuestDevice
    inblob: bytes = b""
    privlevel: int = 0
    write_generation: int = 0
    read_generation: int = 0
    outblob: bytes | None = None
    auxblob: bytes = b""

    @property
    def privlevel_floor(self) -> int:
        return self.device.vmpck_id

    # ---- the attributes --------------------------------------------------------------------------
    def write(self, name: str, data: bytes) -> int:
        """Write ``data`` to attribute ``name``; the byte count, as write(2)."""
        if name == "inblob":
            if len(data) > TSM_INBLOB_MAX:
                raise TsmError(errno.EFBIG, f"inblob takes at most {TSM_INBLOB_MAX} bytes, not {len(data)}")
            self.write_generation += 1
            self.inblob = bytes(data)
            return len(data)
        if name == "privlevel":
            value = _kstrtouint(data)
            if not self.privlevel_floor <= value <= 3:
                raise TsmError(errno.EINVAL, f"privlevel {value} is not {self.privlevel_floor}..3")
            self.write_generation += 1
            self.privlevel = value
            return len(data)
        if name in READABLE:
            raise TsmError(errno.EACCES, f"{name} is read-only")
        raise TsmError(errno.ENOENT, f"no attribute {name}")

    def read(self, name: str) -> bytes:
        """The content of attribute ``name``, as read(2) from offset 0 would return it all."""
        if name == "provider":
            return f"{PROVIDER}\n".encode()
        if name == "generation":
            return f"{self.write_generation}\n".encode()
        if name == "privlevel_floor":
            return f"{self.privlevel_floor}\n".encode()
        if name in ("outblob", "auxblob"):
            self._generate()
            return (self.outblob or b"") if name == "outblob" else self.auxblob
        if name in WRITABLE:
            raise TsmError(errno.EACCES, f"{name} is write-only")
        raise TsmError(errno.ENOENT, f"no attribute {name}")

    def size(self, name: str) -> int:
        """What ``stat`` reports: a configfs attribute has no size until read (0), as in Linux."""
        if name not in READABLE and name not in WRITABLE:
            raise TsmError(errno.ENOENT, f"no attribute {name}")
        return 0

    def _generate(self) -> None:
        if not self.inblob:
            raise TsmError(errno.EINVAL, "write inblob first")
        if self.outblob is not None and self.read_generation == self.write_generation:
            return
        if len(self.inblob) != 64:
            raise TsmError(errno.EINVAL, f"the SEV-SNP provider takes 64 bytes of inblob, not {len(self.inblob)}")
        req = SnpExtReportReq(data=ReportReq(report_data=self.inblob, vmpl=self.privlevel),
                              certs_address=1, certs_len=_CERTS_LEN)
        try:
            raw, certs, _ = self.device.get_ext_report(req)
        except SevGuestError as exc:
            raise TsmError(exc.errno, str(exc)) from None
        rsp = ReportRsp.decode(raw[: ReportRsp.SIZE])
        if rsp.status:
            raise TsmError(errno.EIO, f"the firmware answered status {rsp.status:#x}")
        self.outblob = rsp.report.encode()[:REPORT_SIZE]
        self.auxblob = _cert_blob(certs)
        self.read_generation = self.write_generation


@dataclass
class TsmReports:
    """The ``tsm/report`` group: named entries made with :meth:`mkdir`, dropped with :meth:`rmdir`."""

    device: SevGuestDevice
    entries: dict[str, TsmReport] = field(default_factory=dict)

    def mkdir(self, name: str) -> TsmReport:
        if not name or "/" in name or name in (".", ".."):
            raise TsmError(errno.EINVAL, f"{name!r} is not a name")
        if name in self.entries:
            raise TsmError(errno.EEXIST, f"report {name} exists")
        self.entries[name] = TsmReport(self.device)
        return self.entries[name]

    def rmdir(self, name: str) -> None:
        if self.entries.pop(name, None) is None:
            raise TsmError(errno.ENOENT, f"no report {name}")

    def entry(self, name: str) -> TsmReport:
        try:
            return self.entries[name]
        except KeyError:
            raise TsmError(errno.ENOENT, f"no report {name}") from None
