"""``sevemu tsm mount DIR``: an emulated SNP guest's configfs-tsm (``/sys/kernel/config/tsm``) as a
real filesystem through FUSE, so an attester written for Linux reads reports from a path::

    mkdir DIR/report/r0
    head -c 64 /dev/urandom > DIR/report/r0/inblob
    cat DIR/report/r0/outblob > report.bin      # and auxblob: the host's certificate table

The semantics are :mod:`sevemu.guest.tsm`'s; this module maps file operations onto them
(:class:`TsmFs`): ``report/`` takes ``mkdir`` / ``rmdir``, attribute files are read whole, ``inblob``
is written whole and committed when the file is closed (as configfs commits a binary attribute),
``privlevel`` per write.  FUSE needs ``fusepy`` and libfuse; without them the command says so in
one line and exits 2.
"""

from __future__ import annotations

import argparse
import errno
import stat
import time
from pathlib import Path
from typing import Any

from sevemu.cli.common import add_platform_args
from sevemu.errors import InputError
from sevemu.guest.tsm import READABLE, WRITABLE, TsmError, TsmReports

__all__ = ["TsmFs", "register"]


def _oserror(exc: TsmError) -> OSError:
    return OSError(-exc.errno, str(exc))


class TsmFs:
    """File operations over :class:`TsmReports` in fusepy's calling convention (``fs(op, *args)``;
    an :class:`OSError` becomes the errno of the system call)."""

    def __init__(self, reports: TsmReports) -> None:
        self.reports = reports
        self.now = time.time()
        self._pending: dict[int, tuple[str, str, bytearray]] = {}
        self._next_fh = 1

    def __call__(self, op: str, *args: Any) -> Any:
        fn = getattr(self, op, None)
        if fn is None or op.startswith("_"):
            raise OSError(errno.ENOSYS, op)
        try:
            return fn(*args)
        except TsmError as exc:
            raise _oserror(exc) from None

    # ---- paths -----------------------------------------------------------------------------------
    @staticmethod
    def _split(path: str) -> list[str]:
        return [p for p in path.split("/") if p]

    def _attr(self, path: str) -> tuple[str, str]:
        parts = self._split(path)
        if len(parts) != 3 or parts[0] != "report":
            raise OSError(errno.ENOENT, path)
        self.reports.entry(parts[1])
        if parts[2] not in READABLE + WRITABLE:
            raise OSError(errno.ENOENT, path)
        return parts[1], parts[2]

    # ---- operations --------------------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        parts = self._split(path)
        base = {"st_atime": self.now, "st_mtime": self.now, "st_ctime": self.now, "st_nlink": 1}
        if len(parts) <= 1 and (not parts or parts[0] == "report") or (
                len(parts) == 2 and parts[0] == "report" and parts[1] in self.reports.entries):
            return {**base, "st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        _, name = self._attr(path)
        mode = 0o444 if name in READABLE else 0o200
        return {**base, "st_mode": stat.S_IFREG | mode, "st_size": 0}

    def readdir(self, path: str, fh: int | None = None) -> list[str]:
        parts = self._split(path)
        if not parts:
            return [".", "..", "report"]
        if parts == ["report"]:
            return [".", "..", *sorted(self.reports.entries)]
        if len(parts) == 2 and parts[0] == "report":
            self.reports.entry(parts[1])
            return [".", "..", *READABLE, *WRITABLE]
        raise OSError(errno.ENOTDIR, path)

    def mkdir(self, path: str, mode: int) -> int:
        parts = self._split(path)
        if len(parts) != 2 or parts[0] != "report":
            raise OSError(errno.EPERM, path)
        self.reports.mkdir(parts[1])
        return 0

    def rmdir(self, path: str) -> int:
        parts = self._split(path)
        if len(parts) != 2 or parts[0] != "report":
            raise OSError(errno.EPERM, path)
        self.reports.rmdir(parts[1])
        return 0

    def open(self, path: str, flags: int) -> int:
        entry, name = self._attr(path)
        fh = self._next_fh
        self._next_fh += 1
        self._pending[fh] = (entry, name, bytearray())
        return fh

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise OSError(errno.EACCES, path)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._attr(path)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        entry, name = self._attr(path)
        return self.reports.entry(entry).read(name)[offset : offset + size]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        entry, name = self._attr(path)
        if name == "inblob":
            buf = self._pending[fh][2]
            buf[offset : offset + len(data)] = data
            if len(buf) > 64:
                raise OSError(errno.EFBIG, "inblob takes at most 64 bytes")
            return len(data)
        return self.reports.entry(entry).write(name, bytes(data))

    def release(self, path: str, fh: int) -> int:
        entry, name, buf = self._pending.pop(fh, ("", "", bytearray()))
        if name == "inblob" and buf:
            self.reports.entry(entry).write("inblob", bytes(buf))
        return 0

    def flush(self, path: str, fh: int) -> int:
        return 0


def run_mount(args: argparse.Namespace) -> int:
    try:
        import fuse  # fusepy: optional
    except (ImportError, OSError) as exc:
        raise InputError(f"FUSE is unavailable ({exc}); install fusepy and libfuse2, or use "
                         "sevemu.guest.tsm.TsmReports from Python") from None
    from sevemu.cli.guest_attest import _guest

    mountpoint: Path = args.dir
    if not mountpoint.is_dir():
        raise InputError(f"{mountpoint}: not a directory")
    g = _guest(args)
    print(f"configfs-tsm of an emulated SNP guest (measurement {g.measurement.hex()}) at {mountpoint}; "
          "unmount with fusermount -u")
    # direct_io: reads reach the file system whatever st_size says (configfs attributes are not
    # page-cache files either: a binary attribute shows size 0 and reads whole)
    fuse.FUSE(TsmFs(TsmReports(g.device)), str(mountpoint), foreground=True, nothreads=True, direct_io=True)
    return 0


def register(sub: Any) -> None:
    t = sub.add_parser("tsm", help="configfs-tsm report directories of an emulated SNP guest")
    tsub = t.add_subparsers(dest="tsm_command", required=True, metavar="ACTION")
    m = tsub.add_parser("mount", help="mount the guest's configfs-tsm at DIR with FUSE (foreground)",
                        epilog="example:\n  sevemu tsm mount /tmp/tsm &\n  mkdir /tmp/tsm/report/r0\n"
                               "  head -c 64 /dev/urandom > /tmp/tsm/report/r0/inblob\n"
                               "  cat /tmp/tsm/report/r0/outblob > report.bin")
    m.add_argument("dir", type=Path, help="an empty directory to mount on")
    add_platform_args(m)
    m.add_argument("--vmpck", type=int, default=0, help="the driver's VMPCK (privlevel_floor)")
    m.set_defaults(func=run_mount)
