"""The platform directory as users and hosts treat it: racing first uses, lost or edited factory data,
emptied, tampered or read-only NV stores, directories that are no platform.  Each refusal is a
:class:`~sevemu.firmware.nvstore.PlatformDirError` subclass whose message names the file and what
to do; nothing is silently re-manufactured or reset."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sevemu.abi.commands import CommandId
from sevemu.abi.status import Status
from sevemu.amd.roots import AmdRoot
from sevemu.firmware.nvstore import (
    FACTORY_DIR,
    NV_FILENAME,
    FactoryDataError,
    FactoryMissingError,
    NotAPlatformError,
    NvStore,
    NvTamperedError,
    PlatformDirState,
    PlatformReadOnlyError,
    inspect_platform_dir,
    unpack_fuses,
)
from sevemu.scenario import Machine, build_machine

GEN = "milan"


def boot(platform_dir: Path, init: bool = False) -> Machine:
    return build_machine(GEN, dram_size=1 << 30, init=init, platform_dir=platform_dir)


def made(tmp_path: Path, name: str = "p") -> Path:
    d = tmp_path / name
    boot(d).firmware.close()
    return d


def writable(path: Path) -> Path:
    path.chmod(0o644)
    return path


# ---- manufacturing: atomic, and only into a new directory ---------------------------------------
RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    target, barrier = Path(sys.argv[1]), Path(sys.argv[2])
    real_rename = os.rename

    def rename_after_the_other(src, dst):
        # both racers reach the rename that publishes factory/ before either does it
        if Path(dst).name == "factory":
            (barrier / f"ready-{os.getpid()}").touch()
            deadline = time.monotonic() + 60
            while len(list(barrier.glob("ready-*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        return real_rename(src, dst)

    os.rename = rename_after_the_other
    from sevemu.scenario import build_machine

    m = build_machine("milan", dram_size=1 << 30, init=False, platform_dir=target)
    ident = m.firmware.identity
    print(ident.chip_id.hex(), ident.pdh_cert.encode().hex(), len(list(barrier.glob("ready-*"))))
""")


def test_two_processes_racing_to_make_a_platform_get_one_chip(tmp_path: Path) -> None:
    from sevemu.scenario import default_amd_root

    default_amd_root(GEN)  # in the vault before the children start: both load the same manufacturer
    target, barrier = tmp_path / "p", tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(target), str(barrier)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [r.communicate(timeout=240) for r in racers]
    for r, (out, err) in zip(racers, outs, strict=True):
        assert r.returncode == 0, err
    (chip_a, pdh_a, ready_a), (chip_b, pdh_b, ready_b) = (o.split() for o, _ in outs)
    assert ready_a == ready_b == "2"  # both did race to the rename
    assert chip_a == chip_b and pdh_a == pdh_b  # the loser booted the winner's chip and identity
    assert sorted(p.name for p in target.iterdir()) == [FACTORY_DIR, NV_FILENAME]  # no staging left
    again = boot(target)
    assert again.firmware.identity.chip_id.hex() == chip_a and not again.notices


def test_an_unrelated_directory_does_not_become_a_platform(tmp_path: Path) -> None:
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(NotAPlatformError, match=f"{d} is not empty and holds no sevemu platform"):
        boot(d)
    assert [p.name for p in d.iterdir()] == ["holiday.jpg"]  # untouched
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotAPlatformError):
        boot(f)


def test_an_empty_or_absent_directory_is_manufactured(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert inspect_platform_dir(empty) is PlatformDirState.NEW
    m = boot(empty)
    assert inspect_platform_dir(empty) is PlatformDirState.MANUFACTURED and not m.notices
    assert inspect_platform_dir(tmp_path / "absent") is PlatformDirState.NEW


def test_a_platform_that_lost_its_factory_data_is_not_remade(tmp_path: Path) -> None:
    d = made(tmp_path)
    before = NvStore.open(d)
    records = before.read()
    before.close()
    shutil.rmtree(d / FACTORY_DIR)
    assert inspect_platform_dir(d) is PlatformDirState.DAMAGED
    with pytest.raises(FactoryMissingError, match=rf"{d}.*no complete factory/.*restore {d / FACTORY_DIR} from a backup"):
        boot(d)
    assert not (d / FACTORY_DIR).exists()  # nothing re-manufactured
    nv = NvStore.open(d)
    assert nv.read() == records  # and the NV store left alone
    nv.close()


# ---- factory data: every file named when it is damaged -------------------------------------------
@pytest.mark.parametrize("name", ["manifest.json", "fuses.bin", "cek.cert", "ask_ark.cert", "trusted_ark_0.cert"])
@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_corrupt_factory_files_are_named(tmp_path: Path, name: str, damage: str) -> None:
    d = made(tmp_path)
    path = d / FACTORY_DIR / name
    if damage == "missing":
        path.unlink()
    else:
        writable(path).write_bytes(b"garbage")
    with pytest.raises(FactoryDataError, match=str(path)):
        boot(d)


def test_a_platform_of_an_older_factory_format_is_refused_clearly(tmp_path: Path) -> None:
    d = made(tmp_path)
    manifest = writable(d / FACTORY_DIR / "manifest.json")
    data = json.loads(manifest.read_text())
    data["format"] = 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(FactoryDataError, match="format 1.*reads format 2.*move the directory away"):
        boot(d)


# ---- fused trust anchors -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stranger() -> AmdRoot:
    return AmdRoot.create(GEN, key_bits=2048)  # a host-made "AMD" (small keys: fast)


def test_adding_a_trusted_ark_file_does_not_make_it_trusted(tmp_path: Path, stranger: AmdRoot) -> None:
    d = made(tmp_path)
    folder = d / FACTORY_DIR
    (folder / "trusted_ark_1.cert").write_bytes(stranger.ark.encode())
    manifest = writable(folder / "manifest.json")
    data = json.loads(manifest.read_text())
    data["trusted_arks"].append({"generation": GEN, "file": "trusted_ark_1.cert"})
    manifest.write_text(json.dumps(data))
    with pytest.raises(FactoryDataError, match=rf"{folder / 'trusted_ark_1.cert'}: this ARK is not fused"):
        boot(d)


def test_replacing_a_trusted_ark_file_does_not_change_the_root(tmp_path: Path, stranger: AmdRoot) -> None:
    d = made(tmp_path)
    writable(d / FACTORY_DIR / "trusted_ark_0.cert").write_bytes(stranger.ark.encode())
    with pytest.raises(FactoryDataError, match="trusted_ark_0.cert: this ARK is not fused"):
        boot(d)


def test_dropping_a_fused_root_from_the_manifest_is_refused(tmp_path: Path, stranger: AmdRoot) -> None:
    from sevemu.scenario import default_amd_root, manufacture

    d = tmp_path / "p"
    manufacture(d, GEN, default_amd_root(GEN), trusted_roots=[stranger])  # two roots fused
    boot(d).firmware.close()
    manifest = writable(d / FACTORY_DIR / "manifest.json")
    data = json.loads(manifest.read_text())
    assert len(data["trusted_arks"]) == 2
    data["trusted_arks"] = data["trusted_arks"][:1]
    manifest.write_text(json.dumps(data))
    with pytest.raises(FactoryDataError, match="manifest.json: no trusted_ark file for the fused root"):
        boot(d)


def test_a_whole_fake_manufacturer_in_factory_is_refused(tmp_path: Path, stranger: AmdRoot) -> None:
    """ASK || ARK, CEK and the trusted ARK all replaced consistently by the host's own "AMD": the
    CEK chains, but the ARK is not the fused one."""
    d = made(tmp_path)
    folder = d / FACTORY_DIR
    secret, _ = unpack_fuses((folder / "fuses.bin").read_bytes())
    from sevemu.amd.chip import FusedChip

    writable(folder / "cek.cert").write_bytes(stranger.certify_chip(FusedChip(GEN, secret)).encode())
    writable(folder / "ask_ark.cert").write_bytes(stranger.amd_certs.encode())
    writable(folder / "trusted_ark_0.cert").write_bytes(stranger.ark.encode())
    with pytest.raises(FactoryDataError, match="ask_ark.cert: its ARK is not the root fused into this chip"):
        boot(d)


# ---- the NV store --------------------------------------------------------------------------------
def test_a_missing_or_emptied_nv_store_resets_ownership_with_a_notice(tmp_path: Path) -> None:
    d = made(tmp_path)
    first = boot(d)
    assert not first.notices  # the first boot of a new chip is no surprise
    chip, pdh = first.firmware.identity.chip_id, first.firmware.identity.pdh_cert.encode()
    first.firmware.close()
    (d / NV_FILENAME).unlink()
    m = boot(d)
    assert len(m.notices) == 1 and f"{d / NV_FILENAME}: the NV store was missing" in m.notices[0]
    assert "ownership" in m.notices[0]
    assert m.firmware.identity.chip_id == chip and m.firmware.identity.pdh_cert.encode() != pdh
    m.firmware.close()
    assert not boot(d).notices  # said once; the new identity is committed
    (d / NV_FILENAME).write_bytes(b"")  # truncated
    assert "was missing" in boot(d).notices[0]
    nv = NvStore.open(d)
    nv.commit({}, reset=True)  # every record deleted
    nv.close()
    m = boot(d)
    assert "was emptied" in m.notices[0] and m.firmware.nv is not None and m.firmware.nv.read()


def test_a_tampered_record_stops_the_boot_and_says_how_to_recover(tmp_path: Path) -> None:
    d = made(tmp_path)
    nv = NvStore.open(d)
    sealed = nv.read()
    pdh = bytearray(sealed["pdh.key"])
    pdh[-1] ^= 1
    nv.commit({"pdh.key": bytes(pdh)})
    nv.close()
    with pytest.raises(NvTamperedError, match=rf"{d / NV_FILENAME}: NV record 'pdh.key'.*restore nv.sqlite3"):
        boot(d)
    (d / NV_FILENAME).unlink()  # the recovery the message gives
    assert "missing" in boot(d).notices[0]


def test_records_swapped_between_names_or_chips_do_not_authenticate(tmp_path: Path) -> None:
    d, other = made(tmp_path), made(tmp_path, "other")
    nv = NvStore.open(d)
    sealed = nv.read()
    nv.commit({"pek.key": sealed["pdh.key"]})  # a sealed key moved under another name
    nv.close()
    with pytest.raises(NvTamperedError, match="'pek.key'"):
        boot(d)
    nv = NvStore.open(d)
    nv.commit(sealed)
    nv.close()
    boot(d).firmware.close()  # restored: boots
    theirs = NvStore.open(other)
    foreign = theirs.read()
    theirs.close()
    nv = NvStore.open(d)
    nv.commit(foreign)  # another chip's records, each validly sealed for that chip
    nv.close()
    with pytest.raises(NvTamperedError):
        boot(d)


def test_a_tampered_store_met_at_init_answers_secure_data_invalid(tmp_path: Path) -> None:
    """After INIT_EX moved NV to a host buffer, INIT reads the SPI store again (AF
    ``sev_mcmd_init_common``: a store that does not unseal is SECURE_DATA_INVALID)."""
    from sevemu.abi.sev import INIT_EX_NV_LEN, InitCmd, InitExCmd

    m = boot(made(tmp_path))
    nv_spa = 64 << 20
    m.hv.core.host_write(nv_spa, b"\xff" * INIT_EX_NV_LEN)
    psp = m.hv.psp
    assert psp.raw(CommandId.INIT_EX, InitExCmd(nv_paddr=nv_spa, nv_len=INIT_EX_NV_LEN).encode())[0] == 0
    assert psp.raw(CommandId.SHUTDOWN, None)[0] == 0
    assert m.firmware.nv is not None
    conn = sqlite3.connect(m.firmware.nv.path)
    conn.execute("UPDATE nv SET value = X'00' WHERE name = 'owner'")
    conn.commit()
    conn.close()
    assert psp.raw(CommandId.INIT, InitCmd().encode())[0] == Status.SECURE_DATA_INVALID


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` made read-only for this process: by mode bits, or, for root (whom modes do not
    stop), by a read-only bind mount; yields the path to use."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield path
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mnt = path.parent / (path.name + "-ro")
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(path), str(mnt)], check=False, capture_output=True).returncode:
        pytest.skip("running as root without the right to bind-mount: cannot make a read-only directory")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], check=False, capture_output=True).returncode:
            pytest.skip("cannot remount read-only")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def test_a_read_only_platform_directory_is_named(tmp_path: Path) -> None:
    d = made(tmp_path)
    with read_only(d) as ro, pytest.raises(PlatformReadOnlyError, match=rf"{ro}.*not writable.*{ro / NV_FILENAME}"):
        boot(ro)


def test_an_empty_read_only_directory_is_named(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    with read_only(d) as ro, pytest.raises(PlatformReadOnlyError, match=str(ro)):
        boot(ro)
