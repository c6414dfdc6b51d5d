"""configfs-tsm report directories of an emulated SNP guest: the kernel ABI's attributes, generation
tracking, bad input (wrong inblob sizes, privlevel outside floor..3), and the FUSE glue's file
operations (without mounting); ``sevemu tsm mount`` without FUSE is one clear line."""

from __future__ import annotations

import errno
import os
import sys

import pytest
from cli.clikit import fails
from cryptography.hazmat.primitives import serialization

from sevemu.abi.report import CERT_GUID_VCEK, AttestationReport, decode_cert_table
from sevemu.cli.snp_guest import SnpGuestVm, launch
from sevemu.cli.tsm import TsmFs
from sevemu.guest.tsm import TsmError, TsmReports
from sevemu.owner.snpverify import Chain, SnpPolicy, verify_report


@pytest.fixture(scope="module")
def gvm() -> SnpGuestVm:
    return launch("milan", seed="tsm-report")


def test_report_directory_semantics(gvm: SnpGuestVm) -> None:
    reports = TsmReports(gvm.device)
    r = reports.mkdir("r0")
    assert r.read("provider") == b"sev_guest\n" and r.read("generation") == b"0\n"
    assert r.read("privlevel_floor") == b"0\n"
    with pytest.raises(TsmError) as exc:
        r.read("outblob")  # nothing written yet
    assert exc.value.errno == -errno.EINVAL
    data = os.urandom(64)
    assert r.write("inblob", data) == 64 and r.read("generation") == b"1\n"
    out = r.read("outblob")
    rep = AttestationReport.decode(out)
    assert rep.report_data == data and rep.vmpl == 0
    chain = Chain(gvm.vcek, gvm.root.ask, gvm.root.ark, gvm.root.crl())
    verify_report(out, chain, trusted=[gvm.root.ark_fingerprint()],
                  policy=SnpPolicy(measurement=gvm.measurement, report_data=data))
    assert r.read("outblob") == out  # cached until the next write
    certs = dict(decode_cert_table(r.read("auxblob")))
    assert certs[CERT_GUID_VCEK] == gvm.vcek.public_bytes(serialization.Encoding.DER)
    assert r.write("privlevel", b"2\n") == 2 and r.read("generation") == b"2\n"
    assert AttestationReport.decode(r.read("outblob")).vmpl == 2


@pytest.mark.parametrize("attr, data, err", [
    ("inblob", b"x" * 65, errno.EFBIG), ("privlevel", b"4", errno.EINVAL), ("privlevel", b"-1", errno.EINVAL),
    ("privlevel", b"zz", errno.EINVAL), ("provider", b"x", errno.EACCES), ("nope", b"", errno.ENOENT)])
def test_bad_writes(gvm: SnpGuestVm, attr: str, data: bytes, err: int) -> None:
    r = TsmReports(gvm.device).mkdir("bad")
    with pytest.raises(TsmError) as exc:
        r.write(attr, data)
    assert exc.value.errno == -err and r.write_generation == 0


def test_short_inblob_is_refused_when_generated(gvm: SnpGuestVm) -> None:
    r = TsmReports(gvm.device).mkdir("short")
    r.write("inblob", b"abc")
    with pytest.raises(TsmError) as exc:
        r.read("outblob")
    assert exc.value.errno == -errno.EINVAL and "64 bytes" in str(exc.value)


def test_fuse_operations(gvm: SnpGuestVm) -> None:
    fs = TsmFs(TsmReports(gvm.device))
    assert fs("readdir", "/", None) == [".", "..", "report"]
    fs("mkdir", "/report/a", 0o755)
    with pytest.raises(OSError) as exc:
        fs("mkdir", "/report/a", 0o755)
    assert exc.value.errno == errno.EEXIST
    assert "inblob" in fs("readdir", "/report/a", None)
    fh = fs("open", "/report/a/inblob", os.O_WRONLY | os.O_TRUNC)
    fs("truncate", "/report/a/inblob", 0, fh)
    data = bytes(range(64))
    assert fs("write", "/report/a/inblob", data[:32], 0, fh) == 32
    assert fs("write", "/report/a/inblob", data[32:], 32, fh) == 32
    fs("release", "/report/a/inblob", fh)
    fh = fs("open", "/report/a/outblob", os.O_RDONLY)
    out = fs("read", "/report/a/outblob", 0x10000, 0, fh)
    assert AttestationReport.decode(out).report_data == data
    with pytest.raises(OSError) as exc:
        fs("getattr", "/report/b/outblob", None)
    assert exc.value.errno == errno.ENOENT
    fs("rmdir", "/report/a")
    assert fs("readdir", "/report", None) == [".", ".."]


def test_mount_without_fuse_is_one_line(tmp_path: object, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fuse", None)  # as on a machine without fusepy (import fails)
    assert "FUSE is unavailable" in fails(capsys, "tsm", "mount", str(tmp_path))
