"""Helpers for the CLI tests: run ``sevemu`` in-process or as a separate process, and check that a
failure is one ``sevemu: error:`` line with exit status 2 (never a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sevemu
from sevemu.cli.main import main

SRC = Path(sevemu.__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``sevemu ARGV`` in this process: (exit status, stdout, stderr)."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 2) -> str:
    """Run a command that must fail with ``status`` and a one-line error (no traceback); its stderr."""
    rc, _, err = run(capsys, *argv)
    assert rc == status, err
    assert err.startswith("sevemu: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a separate ``sevemu`` process: this tree's package, ``home`` as SEVEMU_HOME."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["SEVEMU_HOME"] = str(home)
    e.update(extra)
    return e


def sevemu_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sevemu", *argv]


def spawn(home: Path, cwd: Path, *argv: str, **kw: object) -> subprocess.Popen[str]:
    """Start ``sevemu ARGV`` as its own process (text pipes)."""
    return subprocess.Popen(sevemu_cmd(*argv), cwd=cwd, env=env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # type: ignore[call-overload]


def call(home: Path, cwd: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``sevemu ARGV`` as a separate process to its end."""
    return subprocess.run(sevemu_cmd(*argv), cwd=cwd, env=env(home), capture_output=True, text=True,
                          timeout=timeout, check=False)
