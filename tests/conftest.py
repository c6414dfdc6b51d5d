"""Shared fixtures.

Real vectors (AMD certificates, real reports, KATs) live outside the repository, in
``../shared/vectors`` relative to the project root (override with ``SEVEMU_VECTORS``).  Tests that
need them take the ``vectors`` fixture and are skipped, with the reason, when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as _hyp_settings

ROOT = Path(__file__).resolve().parent.parent


def _vectors_dir() -> Path:
    env = os.environ.get("SEVEMU_VECTORS")
    return Path(env) if env else ROOT.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """Path of the shared real-data vectors folder; skips the test when it is absent."""
    path = _vectors_dir()
    if not (path / "README.md").is_file():
        pytest.skip(f"real vectors not found at {path} (set SEVEMU_VECTORS or provide ../shared/vectors)")
    return path


# Hypothesis: random exploration on developer machines; a fixed, reproducible search in CI
# (a CI failure can then be replayed exactly), selected by the CI environment variable.

_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


@pytest.fixture(scope="session")
def snp_root():  # type: ignore[no-untyped-def]
    """``snp_root(generation)``: the emulated AMD SNP root of a generation, made once per session.

    Its ARK/ASK keys come from the AMD vault (``sevemu.scenario.default_amd_root``), its ASVK is kept
    next to them, so later sessions start fast.
    """
    from sevemu.amd.snp import AmdSnpRoot
    from sevemu.scenario import amd_vault_dir, default_amd_root

    cache: dict[str, AmdSnpRoot] = {}

    def get(generation: str) -> AmdSnpRoot:
        if generation not in cache:
            vault = amd_vault_dir()
            cache[generation] = AmdSnpRoot.for_root(
                default_amd_root(generation), None if vault is None else vault / generation / "snp")
        return cache[generation]

    return get
