"""Shared fixtures of the guest-image tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sevemu.errors import GuestBuildError
from sevemu.guest.build import toolchain


@pytest.fixture(scope="module")
def guest_builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Skip without gcc/binutils (with the reason); builds go to a temporary cache directory."""
    try:
        toolchain()
    except GuestBuildError as exc:
        pytest.skip(str(exc))
    old = os.environ.get("SEVEMU_BUILD_DIR")
    os.environ["SEVEMU_BUILD_DIR"] = str(tmp_path_factory.getbasetemp() / "guest-builds")
    yield
    if old is None:
        os.environ.pop("SEVEMU_BUILD_DIR", None)
    else:
        os.environ["SEVEMU_BUILD_DIR"] = old
