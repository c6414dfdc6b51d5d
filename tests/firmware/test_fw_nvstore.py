"""The firmware's NV store: SQLite transactions, crash atomicity, factory data, the INIT_EX image."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

import pytest

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import INIT_EX_NV_LEN, InitCmd, PekCertImportCmd, PekCsrCmd
from sevemu.abi.status import Status
from sevemu.certs.sev import SevCert
from sevemu.crypto import ecc
from sevemu.errors import InputError
from sevemu.firmware.identity import IDENTITY_RECORDS
from sevemu.firmware.nvstore import (
    FACTORY_DIR,
    NV_FILENAME,
    FactoryData,
    NvStore,
    NvStoreError,
    is_manufactured,
    pack_fuses,
    read_factory,
    seal_host_nv,
    unpack_fuses,
    unseal_host_nv,
    write_factory,
)
from sevemu.scenario import Machine, build_machine

GEN = "milan"
ECDSA = SigAlgo.ECDSA_SHA256


def boot(platform_dir: Path, init: bool = False) -> Machine:
    return build_machine(GEN, dram_size=1 << 30, init=init, platform_dir=platform_dir)


def ok(m: Machine, cmd: CommandId, buf: bytes | None = None) -> bytes:
    status, out = m.hv.psp.raw(cmd, buf)
    assert status == Status.SUCCESS, Status(status).name
    return out


# ---- the store itself ---------------------------------------------------------------------------
def test_commit_read_delete_reset(tmp_path: Path) -> None:
    nv = NvStore.open(tmp_path)
    assert nv.read() == {} and nv.commits == 0
    assert nv.commit({"a": b"1", "b": b"2"}) == 1
    assert nv.commit({"b": b"3"}, delete=["a"]) == 2
    assert nv.read() == {"b": b"3"}
    nv.commit({"c": b"4"}, reset=True)
    assert nv.read() == {"c": b"4"} and nv.commits == 3
    nv.close()
    again = NvStore.open(tmp_path)  # durable across close/open
    assert again.read() == {"c": b"4"} and again.commits == 3
    again.close()


def test_failed_commit_rolls_back(tmp_path: Path) -> None:
    nv = NvStore.open(tmp_path)
    nv.commit({"a": b"1"})
    # the second record is not bytes: the first INSERT has run when the transaction fails
    with pytest.raises(TypeError):
        nv.commit({"a": b"changed", "z": object()})  # type: ignore[dict-item]
    assert nv.read() == {"a": b"1"} and nv.commits == 1
    assert not nv.connection.in_transaction
    nv.close()


def test_not_a_store_or_other_schema(tmp_path: Path) -> None:
    (tmp_path / NV_FILENAME).write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(NvStoreError):
        NvStore.open(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    nv = NvStore.open(other)
    nv.connection.execute("PRAGMA user_version = 99")
    nv.close()
    with pytest.raises(NvStoreError, match="schema 99"):
        NvStore.open(other)


# ---- factory data -------------------------------------------------------------------------------
def test_factory_data_roundtrip_and_write_once(tmp_path: Path) -> None:
    data = FactoryData(GEN, os.urandom(64), b"c" * 0x824, b"amd", (("milan", b"ark"), ("genoa", b"ark2")))
    assert not is_manufactured(tmp_path)
    write_factory(tmp_path, data)
    assert is_manufactured(tmp_path)
    assert read_factory(tmp_path) == data
    fuses = tmp_path / FACTORY_DIR / "fuses.bin"
    assert unpack_fuses(fuses.read_bytes()) == (data.chip_secret, (sha256(b"ark").digest(), sha256(b"ark2").digest()))
    assert (fuses.stat().st_mode & 0o777) == 0o400
    with pytest.raises(InputError):
        write_factory(tmp_path, data)
    # no staging left behind; the NV store leaves the factory formatted and empty
    assert sorted(p.name for p in tmp_path.iterdir()) == [FACTORY_DIR, NV_FILENAME]


def test_missing_or_malformed_factory_data(tmp_path: Path) -> None:
    with pytest.raises(NvStoreError, match="not a manufactured platform"):
        read_factory(tmp_path)
    write_factory(tmp_path, FactoryData(GEN, os.urandom(64), b"", b"", ()))
    manifest = tmp_path / FACTORY_DIR / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text('{"format": 7}')
    with pytest.raises(NvStoreError, match="format"):
        read_factory(tmp_path)


def test_boot_refuses_broken_platform_dirs(tmp_path: Path) -> None:
    m = boot(tmp_path / "p")
    m.firmware.close()
    with pytest.raises(NvStoreError, match="manufactured as a milan"):
        build_machine("rome", dram_size=1 << 30, init=False, platform_dir=tmp_path / "p")
    # a corrupted NV record: the chain no longer verifies, the part does not boot
    nv = NvStore.open(tmp_path / "p")
    good = nv.read()["pek.cert"]
    pek = bytearray(good)
    pek[0x20] ^= 1
    nv.commit({"pek.cert": bytes(pek)})
    nv.close()
    with pytest.raises(NvStoreError):
        boot(tmp_path / "p")
    # a partial identity
    nv = NvStore.open(tmp_path / "p")
    nv.commit({"pek.cert": good}, delete=["pdh.key"])
    nv.close()
    with pytest.raises(NvStoreError, match="partial identity"):
        boot(tmp_path / "p")
    # other fuses than the chip the CEK certificate was issued for
    q = tmp_path / "q"
    boot(q).firmware.close()
    fuses = q / FACTORY_DIR / "fuses.bin"
    fuses.chmod(0o600)
    fuses.write_bytes(pack_fuses(os.urandom(64), unpack_fuses(fuses.read_bytes())[1]))
    with pytest.raises(NvStoreError, match="CEK"):
        boot(q)


# ---- crash atomicity ----------------------------------------------------------------------------
def _owner_signed(m: Machine) -> tuple[bytes, bytes]:
    """PEK_CSR signed by a fresh owner OCA: (pek, oca) ready for PEK_CERT_IMPORT."""
    psp = m.hv.psp
    spa = psp.put_data(bytes(0x824))
    ok(m, CommandId.PEK_CSR, PekCsrCmd(csr_paddr=spa, csr_len=0x824).encode())
    key = ecc.generate_private_key()
    oca = SevCert.new(KeyUsage.OCA, ECDSA, key.public_key()).sign_with(key, KeyUsage.OCA, ECDSA)
    pek = SevCert.decode(psp.get_data(0x824)).sign_with(key, KeyUsage.OCA, ECDSA, slot=1)
    return pek.encode(), oca.encode()


def _import(pek: bytes, oca: bytes) -> Callable[[Machine], int]:
    def run(m: Machine) -> int:
        psp = m.hv.psp
        pek_spa, oca_spa = psp.put_data(pek), psp.put_data(oca, 0x1000)
        cmd = PekCertImportCmd(pek_cert_paddr=pek_spa, pek_cert_len=0x824, oca_cert_paddr=oca_spa,
                               oca_cert_len=0x824)
        return m.hv.psp.raw(CommandId.PEK_CERT_IMPORT, cmd.encode())[0]
    return run


def _nobuf(cmd: CommandId) -> Callable[[Machine], int]:
    return lambda m: m.hv.psp.raw(cmd, None)[0]


def _run_and_die(platform_dir: Path, action: Callable[[Machine], int], init: bool, kill_at: int) -> int:
    """Run ``action`` in a forked child that ``os._exit``s as its ``kill_at``-th SQL statement starts."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            m = boot(platform_dir, init=init)
            seen = 0

            def trace(_sql: str) -> None:
                nonlocal seen
                seen += 1
                if seen == kill_at:
                    os._exit(17)

            m.firmware.nv.connection.set_trace_callback(trace)  # type: ignore[union-attr]
            status = action(m)
            os._exit(0 if status == Status.SUCCESS else 3)
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            os._exit(4)
    _, wait = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait)


def _consistent(platform_dir: Path) -> None:
    """The store boots: every key matches its certificate and the whole chain verifies."""
    m = boot(platform_dir, init=True)
    ident = m.firmware.identity
    assert m.amd_root is not None
    ident.platform_chain().verify([m.amd_root.pin()])
    m.firmware.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("name", ["PEK_GEN", "PDH_GEN", "PEK_CERT_IMPORT", "PLATFORM_RESET"])
def test_killed_mid_transaction_leaves_old_or_new_state(tmp_path: Path, name: str) -> None:
    base = tmp_path / "base"
    m = boot(base, init=True)
    action = _nobuf(CommandId[name])
    if name == "PEK_CERT_IMPORT":
        action = _import(*_owner_signed(m))
    m.firmware.close()
    init = name != "PLATFORM_RESET"
    old = NvStore.open(base)
    before, commits = old.read(), old.commits
    old.close()
    outcomes = set()
    for kill_at in range(1, 40):
        work = tmp_path / f"k{kill_at}"
        shutil.copytree(base, work)
        code = _run_and_die(work, action, init, kill_at)
        assert code in (0, 17), code
        nv = NvStore.open(work)
        after, after_commits = nv.read(), nv.commits
        nv.close()
        if code == 17:  # died before COMMIT ran: exactly the old state
            assert (after, after_commits) == (before, commits), kill_at
        else:  # the command completed: the new state, all of it
            assert after_commits == commits + 1
            assert after != before
            changed = {n for n in IDENTITY_RECORDS if after.get(n) != before.get(n)}
            assert {"pdh.key", "pdh.cert"} <= changed
        _consistent(work)
        outcomes.add(code)
        shutil.rmtree(work)
        if code == 0:
            break
    assert outcomes == {0, 17}  # both the interrupted and the completed case were seen


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sevemu.abi.commands import CommandId
    from sevemu.scenario import build_machine

    m = build_machine("milan", dram_size=1 << 30, init=True, platform_dir=Path(sys.argv[1]))
    print("ready", flush=True)
    n = 0
    while True:
        cmd = CommandId.PEK_GEN if n % 2 else CommandId.PDH_GEN
        assert m.hv.psp.raw(cmd, None)[0] == 0
        n += 1
""")


def test_sigkill_during_a_stream_of_writes(tmp_path: Path) -> None:
    d = tmp_path / "p"
    boot(d).firmware.close()
    for round_ in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(d)], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.15 + 0.1 * round_)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        nv = NvStore.open(d)
        assert nv.commits > 1 + round_  # the child did commit while it ran
        nv.close()
        _consistent(d)


# ---- the INIT_EX image --------------------------------------------------------------------------
def test_host_image_seal_unseal() -> None:
    key = os.urandom(32)
    records = {"owner": b"\x00", "pek.cert": os.urandom(0x824), "x": b""}
    image = seal_host_nv(key, records, os.urandom(12))
    assert len(image) == INIT_EX_NV_LEN and image.startswith(b"SEVEMUNV")
    assert unseal_host_nv(key, image) == records
    assert unseal_host_nv(key, b"\xff" * INIT_EX_NV_LEN) == {}
    assert unseal_host_nv(key, bytes(INIT_EX_NV_LEN)) == {}
    with pytest.raises(NvStoreError, match="authenticate"):
        unseal_host_nv(os.urandom(32), image)
    tampered = bytearray(image)
    tampered[40] ^= 1
    with pytest.raises(NvStoreError, match="authenticate"):
        unseal_host_nv(key, bytes(tampered))
    with pytest.raises(NvStoreError, match="header"):
        unseal_host_nv(key, b"garbage" + bytes(INIT_EX_NV_LEN - 7))
    with pytest.raises(NvStoreError, match="holds"):
        seal_host_nv(key, {"big": bytes(INIT_EX_NV_LEN)}, os.urandom(12))


def test_restart_forgets_volatile_state(tmp_path: Path) -> None:
    m = boot(tmp_path, init=True)
    ok(m, CommandId.PDH_GEN)
    records = m.firmware.identity.nv_records()
    m.firmware.close()
    again = boot(tmp_path)
    assert again.firmware.state == 0 and not again.firmware.guests  # UNINIT, no guests
    assert again.firmware.identity.nv_records() == records
    ok(again, CommandId.INIT, InitCmd().encode())


def test_boot_refuses_a_cek_certified_by_another_root(tmp_path: Path) -> None:
    from sevemu.amd.roots import AmdRoot

    boot(tmp_path).firmware.close()
    stranger = AmdRoot.create("milan", key_bits=2048)  # a small key: fast; the chain check fails anyway
    amd = tmp_path / FACTORY_DIR / "ask_ark.cert"
    amd.chmod(0o644)
    amd.write_bytes(stranger.amd_certs.encode())
    with pytest.raises(NvStoreError, match="chain to the AMD"):
        boot(tmp_path)
