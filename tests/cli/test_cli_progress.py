"""Progress of long commands: shown on stderr when it is a terminal, nothing when piped; stdout is the
same either way."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest
from clikit import env, sevemu_cmd

from sevemu.cli.progress import Progress, progress_enabled

pytestmark = pytest.mark.slow


def _run(home: Path, cwd: Path, argv: list[str], *, tty: bool) -> tuple[int, str, str]:
    e = env(home, TERM="xterm-256color", COLUMNS="100")
    if not tty:
        p = subprocess.run(sevemu_cmd(*argv), cwd=cwd, env=e, capture_output=True, text=True, timeout=300,
                           check=False)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(sevemu_cmd(*argv), cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read() if proc.stdout else b""
    proc.wait(timeout=300)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_launch_of_a_large_image_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(24 << 20))
    argv = ["launch", "--image", "big.bin", "--platform-dir", "p"]
    rc, out_tty, err_tty = _run(tmp_path / "h", tmp_path, argv, tty=True)
    assert rc == 0 and "LAUNCH_UPDATE_DATA" in err_tty and "\x1b[" in err_tty
    rc, out_pipe, err_pipe = _run(tmp_path / "h", tmp_path, argv, tty=False)
    assert rc == 0 and err_pipe == ""
    strip = [line.split("]")[0] for line in out_pipe.splitlines()]
    assert strip == [line.split("]")[0] for line in out_tty.splitlines()]  # the steps are the same


def test_progress_is_off_unless_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not progress_enabled()  # pytest captures stderr: not a terminal
    assert not progress_enabled(quiet=True)
    with Progress(False, "x") as p:
        p.step("a")
        p.start("b", total=10)
        p.advance(5)
    assert capsys.readouterr() == ("", "")
