"""Fixtures of the memory-encryption tests: the C accelerator's XTS engine (``aes_engine``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from sevemu.crypto import memenc


def runnable(choose: Callable[..., str], names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that ``choose`` (``vector_isa`` or ``aes_engine`` of the accelerator) accepts
    on this CPU and build, the process-wide choice put back after."""
    previous = choose()
    ok = []
    try:
        for name in names:
            try:
                choose(name)
            except ValueError:
                continue
            ok.append(name)
    finally:
        choose(previous)
    return ok


def runnable_engines() -> list[str]:
    """The XTS engines this CPU and build run (``openssl`` always; ``vaes`` where it passed its test)."""
    return runnable(memenc._memenc_accel.aes_engine, ("openssl", "vaes")) if memenc.ACCELERATED else []


@pytest.fixture
def restore_engine() -> Iterator[None]:
    """Put back the process-wide XTS engine a test forces."""
    if not memenc.ACCELERATED:
        yield
        return
    previous = memenc._memenc_accel.aes_engine()
    yield
    memenc._memenc_accel.aes_engine(previous)


@pytest.fixture
def openssl_engine(restore_engine: None) -> None:
    """XTS through OpenSSL's AES-ECB between the C passes (the path the VAES engine replaces where the
    CPU has it), for tests of those passes and of crypt_into_via."""
    if memenc.ACCELERATED:
        memenc._memenc_accel.aes_engine("openssl")
