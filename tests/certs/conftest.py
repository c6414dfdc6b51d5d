"""Fixtures for the certificate tests: the real legacy certificates of the shared vectors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def legacy(vectors: Path) -> Callable[[str], bytes]:
    """Read ``sev-legacy-certs/<name>`` from the shared vectors (skips when they are absent)."""
    folder = vectors / "sev-legacy-certs"

    def read(name: str) -> bytes:
        return (folder / name).read_bytes()

    return read
