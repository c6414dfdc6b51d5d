"""``sevemu tsm mount DIR`` as a real FUSE filesystem: an attester that knows only paths (mkdir, write
inblob, read outblob, as a shell script on Linux would) gets a report that verifies.  Skipped, with
the reason, where FUSE is unavailable (fusepy, libfuse2, /dev/fuse, fusermount)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sevemu.abi.report import REPORT_SIZE, AttestationReport


def _fuse_missing() -> str | None:
    try:
        import fuse  # noqa: F401 - fusepy
    except (ImportError, OSError) as exc:
        return f"fusepy/libfuse unavailable: {exc}"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount") is None:
        return "no fusermount"
    return None


def test_mounted_configfs_tsm(tmp_path: Path) -> None:
    why = _fuse_missing()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "tsm"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "sevemu", "tsm", "mount", str(mnt), "--platform-dir",
                             str(tmp_path / "milan"), "--generation", "milan"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (mnt / "report").is_dir():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.skip(f"the FUSE mount did not come up here: {(err or out).strip()[:200]}")
            if time.monotonic() > deadline:
                pytest.fail("the mount did not appear within 120 s")
            time.sleep(0.2)
        entry = mnt / "report" / "r0"
        entry.mkdir()
        assert sorted(p.name for p in entry.iterdir()) == sorted(
            ["auxblob", "generation", "inblob", "outblob", "privlevel", "privlevel_floor", "provider"])
        data = bytes(range(64))
        (entry / "inblob").write_bytes(data)
        out = (entry / "outblob").read_bytes()
        assert len(out) == REPORT_SIZE
        assert AttestationReport.decode(out).report_data == data
        assert (entry / "provider").read_text().strip() == "sev_guest"
        assert (entry / "generation").read_text().strip() == "1"
        assert len((entry / "auxblob").read_bytes()) > 0  # the host's certificate table
        (entry / "privlevel").write_text("2\n")
        assert AttestationReport.decode((entry / "outblob").read_bytes()).vmpl == 2
        (entry / "inblob").write_bytes(b"short")  # the SNP provider takes exactly 64 bytes
        with pytest.raises(OSError):
            (entry / "outblob").read_bytes()
        entry.rmdir()
        assert not entry.exists()
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
