"""Every file path the documentation names exists, so the docs stay true to the tree.

A path is a token ending in a suffix of the project's own files (``.py``, ``.pyi``, ``.md``,
``.toml``) inside backticks or a fenced block of ``docs/*.md`` or ``README.md`` (``.c``/``.h`` names
are Linux's, QEMU's and AMD's sources).  A module the text announces as "a new `x.py`" is a plan,
not a path.  It may be written
relative to any directory (``hw/host.py``, ``sev/legacy.py`` under ``hypervisor/``), so it must be the
tail, component by component, of a file of the repository.  Placeholders (``<family>``, ``$VAR``,
``~``) and files of a platform directory or of the host are not repository paths and are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_SKIP_DIRS = {".git", ".hypothesis", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".import_linter_cache",
              "__pycache__", "build", "dist", ".venv"}
_PATH = re.compile(r"[A-Za-z0-9_.*/-]+\.(?:py|pyi|md|toml)\b")
_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)


def _repo_files() -> set[tuple[str, ...]]:
    files: set[tuple[str, ...]] = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        rel = Path(dirpath).relative_to(ROOT).parts
        files.update((*rel, name) for name in filenames)
    return files


def _named_paths(text: str) -> set[str]:
    found: set[str] = set()
    for sm in _SPAN.finditer(text):
        span = sm.group(0)
        if text[max(0, sm.start() - 4) : sm.start()] == "new ":
            continue
        for m in _PATH.finditer(span):
            start = m.start()
            before = span[start - 1] if start else ""
            if before in "<$~" or "*" in m.group(0) or m.group(0).startswith("."):
                continue
            found.add(m.group(0).strip("/"))
    return found


def _exists(path: str, files: set[tuple[str, ...]]) -> bool:
    parts = tuple(p for p in path.split("/") if p)
    return any(f[-len(parts):] == parts for f in files)


DOCS = sorted((ROOT / "docs").glob("*.md")) + [p for p in (ROOT / "README.md",) if p.exists()]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_a_doc_names_exists(doc: Path) -> None:
    files = _repo_files()
    missing = sorted(p for p in _named_paths(doc.read_text()) if not _exists(p, files))
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_check_catches_a_stale_path() -> None:
    files = _repo_files()
    assert _named_paths("see `firmware/dispatcher.py` and `hw/host.py: HostSoc`") == {"firmware/dispatcher.py",
                                                                                        "hw/host.py"}
    assert not _exists("firmware/dispatcher.py", files) and _exists("hw/host.py", files)
    assert _named_paths("`sev/<family>.py`, `$HOME/x.py`, `~/.cache/y.py`, a new `snp/x.py`, `sev.c`") == set()
