"""SNP_LAUNCH_UPDATE of a 2 MiB page measured on the PSP's SHA engine while the firmware answers the
next commands (firmware/snp/state.py ``SnpGuest.chain``; firmware/sha_engine.py ``hash_pages_later``):
the digest equals the one-thread digest and the owner's calculator whatever the engine does, updates
chained behind the pending page wait in order, anything that reads the digest completes it, and a
refused command neither waits for nor changes it."""

from __future__ import annotations

import hashlib

import pytest

from sevemu._util.units import MiB
from sevemu.abi.commands import CommandId
from sevemu.abi.snp import SnpGuestState, SnpLaunchUpdateCmd, SnpLaunchUpdateFlags, SnpPageType
from sevemu.abi.status import Status
from sevemu.crypto.pagehash import page_info_chain, sha384_pages
from sevemu.firmware import sha_engine
from sevemu.firmware.sha_engine import PendingHashes, hash_pages_later
from sevemu.firmware.snp import snp_state
from sevemu.firmware.snp.launch import _template, page_info_digest
from sevemu.firmware.snp.state import SnpGuest, _Queued
from sevemu.owner.snp_measurement import SnpLaunchDigest
from tests.firmware.fwkit import call
from tests.firmware.snpkit import GCTX, SnpLaunch, snp_machine

PAGE = 0x1000
HUGE = 2 * MiB


def _image(n: int) -> bytes:
    return b"".join(hashlib.sha512(i.to_bytes(4, "little")).digest() * (PAGE // 64) for i in range(n))


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hash_pages_later_equals_one_thread(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(sha_engine, "mode", mode)
    data = _image(512)
    got = hash_pages_later(data)
    assert isinstance(got, PendingHashes) == (mode == "on")
    hashes = got.result() if isinstance(got, PendingHashes) else got
    assert hashes == sha384_pages(data, accel=False)
    if isinstance(got, PendingHashes):
        assert got.result() is hashes  # computed once
    assert hash_pages_later(data[: 8 * PAGE]) == sha384_pages(data[: 8 * PAGE])  # too small to share out


def _want(image: bytes) -> bytes:
    """The owner's calculator: the 2 MiB image at GPA 0, a ZERO page, a NORMAL page, a SECRETS page."""
    d = SnpLaunchDigest(record=False)
    d.normal(0, image)
    d.zero(HUGE, PAGE)
    d.normal(HUGE + PAGE, image[:PAGE])
    d.secrets(HUGE + 2 * PAGE)
    return d.digest


def _launched_image() -> tuple[SnpLaunch, SnpGuest, bytes]:
    """A started guest whose first update is a 2 MiB NORMAL page: (launch, its context, the image)."""
    m = snp_machine()
    launch = SnpLaunch(m)
    assert launch.start() == Status.SUCCESS
    image = _image(512)
    launch.update(0, SnpPageType.NORMAL, image, huge=True)
    return launch, snp_state(m.firmware).guests[GCTX], image


@pytest.mark.parametrize("mode", ["on", "off"])
def test_updates_behind_a_pending_page_chain_in_order(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setattr(sha_engine, "mode", mode)
    launch, g, image = _launched_image()
    assert bool(g._queued) == (mode == "on")  # on the engine: the command completed before its digest
    launch.update(HUGE, SnpPageType.ZERO)
    launch.update(HUGE + PAGE, SnpPageType.NORMAL, image[:PAGE])
    launch.update(HUGE + 2 * PAGE, SnpPageType.SECRETS)
    assert len(g._queued) == (4 if mode == "on" else 0)
    if mode == "on":  # the engine chains the 2 MiB page itself, from the digest before it
        first = g._queued[0]
        assert first.done is not None and first.count == 512
        assert first.done.result() == page_info_chain(bytes(48), _template(1, (0, 0, 0), False), 0, 512,
                                                      sha384_pages(image))
    assert g.ld == _want(image)  # reading it completes the queue
    assert not g._queued and g.measured == g.ld
    assert launch.finish() == Status.SUCCESS
    assert g.state == SnpGuestState.RUNNING and g.ld == _want(image)
    assert launch.m.firmware.internal_errors == []


def test_a_refused_update_leaves_the_pending_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sha_engine, "mode", "on")
    launch, g, image = _launched_image()
    queued = list(g._queued)
    # a Hypervisor page (never RMPUPDATEd): INVALID_PAGE_STATE, nothing queued or computed
    status, _ = call(launch.m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(
        gctx_paddr=GCTX, flags=SnpLaunchUpdateFlags(page_type=int(SnpPageType.NORMAL)), address=launch.spa(HUGE)))
    assert status == Status.INVALID_PAGE_STATE
    assert g._queued == queued
    ld = page_info_chain(bytes(48), _template(1, (0, 0, 0), False), 0, 512, sha384_pages(image))
    assert g.ld == ld


def test_setting_the_digest_drops_the_queue() -> None:
    m = snp_machine()
    launch = SnpLaunch(m)
    assert launch.start() == Status.SUCCESS
    g = snp_state(m.firmware).guests[GCTX]
    g._queued.append(_Queued(_template(3, (0, 0, 0), False), 0, 1, None, None))
    g.ld = b"\x11" * 48
    assert g.ld == b"\x11" * 48 and not g._queued
    g.chain(_template(3, (0, 0, 0), False), 0x5000, 1, None)
    assert g.ld == page_info_digest(b"\x11" * 48, bytes(48), 3, 0x5000)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_two_2m_pages_in_a_row_measure_as_one_thread(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Two 2 MiB NORMAL pages back to back (a 4 MiB image): with the engine on, the second page's whole
    measurement is an engine job that starts from the first's digest; the digest equals the owner's
    calculator either way, also with a ZERO page between and after them."""
    monkeypatch.setattr(sha_engine, "mode", mode)
    launch, g, image = _launched_image()
    second = _image(1024)[HUGE:]
    launch.update(HUGE, SnpPageType.NORMAL, second, huge=True)
    if mode == "on":
        assert len(g._queued) == 2 and all(q.done is not None and q.data is not None for q in g._queued)
    launch.update(2 * HUGE, SnpPageType.ZERO)
    launch.update(2 * HUGE + PAGE, SnpPageType.NORMAL, image[:PAGE])
    d = SnpLaunchDigest(record=False)
    d.normal(0, image)
    d.normal(HUGE, second)
    d.zero(2 * HUGE, PAGE)
    d.normal(2 * HUGE + PAGE, image[:PAGE])
    assert g.ld == d.digest and not g._queued
    assert launch.m.firmware.internal_errors == []


def test_a_reader_measures_what_the_engine_did_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine busy elsewhere: a reader of the digest cancels the queued measurement jobs and measures
    their pages itself (never waiting for a job that has not started); a job that failed because the
    one before it was cancelled is measured by the reader too.  The digest is the one-thread digest."""
    monkeypatch.setattr(sha_engine, "mode", "on")
    import threading
    from concurrent.futures import CancelledError, Future

    gate = threading.Event()
    blocker = sha_engine.sha_engine().submit(gate.wait)
    try:
        launch, g, image = _launched_image()
        second = _image(1024)[HUGE:]
        launch.update(HUGE, SnpPageType.NORMAL, second, huge=True)
        jobs = [q.done for q in g._queued]
        assert len(jobs) == 2 and all(j is not None and not j.running() for j in jobs)
        want = page_info_chain(bytes(48), _template(1, (0, 0, 0), False), 0, 1024, sha384_pages(image + second))
        assert g.ld == want
        assert all(j is not None and j.cancelled() for j in jobs)
    finally:
        gate.set()
        blocker.result()
    failed: Future[bytes] = Future()
    failed.set_exception(CancelledError())
    g2 = SnpGuest(gctx=GCTX, vek=bytes(16), launch_tcb=0)
    g2._queued.append(_Queued(_template(1, (0, 0, 0), False), 0, 512, None, failed, image))
    assert g2.ld == page_info_chain(bytes(48), _template(1, (0, 0, 0), False), 0, 512, sha384_pages(image))
    broken: Future[bytes] = Future()
    broken.set_exception(CancelledError())
    g3 = SnpGuest(gctx=GCTX, vek=bytes(16), launch_tcb=0)
    g3._queued.append(_Queued(_template(1, (0, 0, 0), False), 0, 512, sha384_pages(image), broken))
    with pytest.raises(CancelledError):  # (no pages to measure: the engine's failure is reported)
        _ = g3.ld
