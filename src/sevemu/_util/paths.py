"""Where sevemu keeps per-user caches: an override variable, else ``$XDG_CACHE_HOME/sevemu/<name>``
(``~/.cache`` when XDG_CACHE_HOME is unset or empty), as the XDG Base Directory specification says."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["user_cache_dir"]


def user_cache_dir(name: str, override: str) -> Path:
    """``$override`` when set and non-empty, else ``$XDG_CACHE_HOME/sevemu/name``."""
    env = os.environ.get(override)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sevemu" / name
