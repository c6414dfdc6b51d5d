"""Platform identity and key management through the real mailbox: PLATFORM_RESET, PEK_GEN, PEK_CSR,
PEK_CERT_IMPORT, PDH_GEN, PDH_CERT_EXPORT, GET_ID, INIT_EX, PLATFORM_STATUS's owner bit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from fwkit import call, init, ok

from sevemu.abi.certs import SEV_CERT_CHAIN_SIZE, SEV_CERT_SIZE, KeyUsage, SigAlgo
from sevemu.abi.commands import CommandId
from sevemu.abi.sev import (
    INIT_EX_NV_LEN,
    GetIdCmd,
    InitExCmd,
    LaunchStartCmd,
    PdhCertExportCmd,
    PekCertImportCmd,
    PekCsrCmd,
    PlatformStatus,
)
from sevemu.abi.states import PlatformState
from sevemu.abi.status import Status
from sevemu.certs.chain import PlatformChain
from sevemu.certs.errors import UntrustedRootError
from sevemu.certs.roots import AMD_ARKS
from sevemu.certs.sev import EMPTY_SLOT, SevCert
from sevemu.crypto import ecc
from sevemu.firmware.apis import load_firmware
from sevemu.firmware.nvstore import FACTORY_DIR, HOST_NV_MAGIC, unpack_fuses
from sevemu.hw.profiles import profile
from sevemu.hw.soc import Soc
from sevemu.scenario import Machine, build_machine

ECDSA = SigAlgo.ECDSA_SHA256
CERT = SEV_CERT_SIZE
CHAIN = SEV_CERT_CHAIN_SIZE
# offsets in the driver's bounce area
PEK_OFF, OCA_OFF, OUT_OFF, CHAIN_OFF = 0x0000, 0x1000, 0x2000, 0x4000
NV_SPA = 64 << 20  # an INIT_EX NV buffer in host memory
MiB = 1 << 20


def boot(platform_dir: Path, generation: str = "milan") -> Machine:
    return build_machine(generation, dram_size=1 << 30, init=False, platform_dir=platform_dir)


@pytest.fixture
def m(tmp_path: Path) -> Machine:
    return boot(tmp_path / "platform")


# ---- helpers ------------------------------------------------------------------------------------




def spa(m: Machine, off: int) -> int:
    return m.hv.psp.data_spa + off


def working(m: Machine) -> None:
    init(m)
    ok(m, CommandId.LAUNCH_START, LaunchStartCmd(policy=0))
    assert m.firmware.state == PlatformState.WORKING


def status(m: Machine) -> PlatformStatus:
    return PlatformStatus.decode(ok(m, CommandId.PLATFORM_STATUS, PlatformStatus()))


def export(m: Machine) -> PlatformChain:
    """PDH_CERT_EXPORT, plus the platform's AMD chain (as a host gets it from AMD)."""
    ok(m, CommandId.PDH_CERT_EXPORT, PdhCertExportCmd(pdh_cert_paddr=spa(m, OUT_OFF), pdh_cert_len=CERT,
                                                      certs_paddr=spa(m, CHAIN_OFF), certs_len=CHAIN))
    assert m.amd_root is not None
    return PlatformChain.from_buffers(m.hv.psp.get_data(CERT, OUT_OFF), m.hv.psp.get_data(CHAIN, CHAIN_OFF),
                                      m.amd_root.amd_certs.encode())


def csr(m: Machine) -> SevCert:
    ok(m, CommandId.PEK_CSR, PekCsrCmd(csr_paddr=spa(m, OUT_OFF), csr_len=CERT))
    return SevCert.decode(m.hv.psp.get_data(CERT, OUT_OFF))


@dataclass
class Owner:
    """A platform owner with its own OCA (ECDSA P-384 by default)."""

    key: ec.EllipticCurvePrivateKey | crypto_rsa.RSAPrivateKey
    algo: SigAlgo = ECDSA
    cert: SevCert = field(init=False)

    def __post_init__(self) -> None:
        self.cert = SevCert.new(KeyUsage.OCA, self.algo, self.key.public_key()).sign_with(
            self.key, KeyUsage.OCA, self.algo)

    @classmethod
    def new(cls) -> Owner:
        return cls(ecc.generate_private_key())

    def sign(self, pek: SevCert, slot: int = 1) -> SevCert:
        return pek.sign_with(self.key, KeyUsage.OCA, self.algo, slot=slot)


def import_cmd(m: Machine, pek: bytes, oca: bytes, *, pek_len: int = CERT, oca_len: int = CERT,
               pek_paddr: int | None = None) -> PekCertImportCmd:
    m.hv.psp.put_data(pek, PEK_OFF)
    m.hv.psp.put_data(oca, OCA_OFF)
    return PekCertImportCmd(pek_cert_paddr=spa(m, PEK_OFF) if pek_paddr is None else pek_paddr,
                            pek_cert_len=pek_len, oca_cert_paddr=spa(m, OCA_OFF), oca_cert_len=oca_len)


def take_ownership(m: Machine, owner: Owner, slot: int = 1) -> None:
    pek = owner.sign(csr(m), slot)
    ok(m, CommandId.PEK_CERT_IMPORT, import_cmd(m, pek.encode(), owner.cert.encode()))


def nv_state(m: Machine) -> tuple[dict[str, bytes], int]:
    nv = m.firmware.nv
    assert nv is not None
    return nv.read(), nv.commits


def refused_cleanly(m: Machine, cmd: CommandId, buf: object | None, want: Status) -> None:
    """``cmd`` answers ``want`` and changes nothing: NV, identity, platform state."""
    before = (nv_state(m), m.firmware.identity.nv_records(), m.firmware.state, m.firmware.nv_area)
    got, _ = call(m, cmd, buf)
    assert got == want, (cmd.name, Status(got).name, want.name)
    assert (nv_state(m), m.firmware.identity.nv_records(), m.firmware.state, m.firmware.nv_area) == before
    assert not m.firmware.internal_errors


# ---- first boot ---------------------------------------------------------------------------------
def test_first_boot_is_self_owned_and_chain_verifies_against_the_emulated_ark(m: Machine) -> None:
    ident = m.firmware.identity
    assert not ident.owner_external and ident.oca_key is not None
    assert len(ident.chip_id) == 64
    init(m)
    assert status(m).owner == 0
    chain = export(m)
    assert m.amd_root is not None
    pin = chain.verify([m.amd_root.pin()])
    assert pin.emulated
    with pytest.raises(UntrustedRootError):
        chain.verify(AMD_ARKS)
    assert chain.cek == ident.cek_cert and chain.pek == ident.pek_cert and chain.pdh == ident.pdh_cert
    # what the certs carry: the profile's API version on OCA/PEK/PDH; slots as on real chains
    prof = m.profile
    for cert in (chain.oca, chain.pek, chain.pdh):
        assert (cert.api_major, cert.api_minor) == (prof.api_major, prof.api_minor)
    assert (ident.api_major, ident.api_minor) == (prof.api_major, prof.api_minor)
    assert [s.usage for s in chain.pek.slots] == [KeyUsage.OCA, KeyUsage.CEK]
    assert chain.pdh.algo == SigAlgo.ECDH_SHA256
    assert ident.trusted_arks == (m.amd_root.pin(),)
    assert ident.amd_chain.encode() == m.amd_root.amd_certs.encode()


def test_chip_id_and_cek_come_from_the_fuses(m: Machine, tmp_path: Path) -> None:
    assert m.platform_dir is not None
    secret, fused = unpack_fuses((m.platform_dir / FACTORY_DIR / "fuses.bin").read_bytes())
    ident = m.firmware.identity
    assert fused == tuple(p.fingerprints and next(iter(p.fingerprints)) for p in ident.trusted_arks)
    assert ident.chip_id == ecc.derive_chip_id(secret)
    assert ident.cek_key.private_numbers() == ecc.derive_cek(secret).private_numbers()
    # the ID is the secp256k1 public point of the chip-unique key, x || y big-endian
    x, y = int.from_bytes(ident.chip_id[:32], "big"), int.from_bytes(ident.chip_id[32:], "big")
    ec.EllipticCurvePublicNumbers(x, y, ec.SECP256K1()).public_key()
    other = boot(tmp_path / "other")
    assert other.firmware.identity.chip_id != ident.chip_id


def test_seeded_builds_make_the_same_chip(tmp_path: Path) -> None:
    a = build_machine("rome", seed="s", dram_size=1 << 30, init=False, platform_dir=tmp_path / "a")
    b = build_machine("rome", seed="s", dram_size=1 << 30, init=False, platform_dir=tmp_path / "b")
    assert a.firmware.identity.chip_id == b.firmware.identity.chip_id
    ra, rb = a.firmware.identity.nv_records(), b.firmware.identity.nv_records()
    # seeded TRNG: the same keys (ECDSA signatures stay randomized)
    assert all(ra[n] == rb[n] for n in ("oca.key", "pek.key", "pdh.key"))


# ---- GET_ID -------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["UNINIT", "INIT", "WORKING"])
def test_get_id_in_every_state(m: Machine, state: str) -> None:
    if state != "UNINIT":
        (init if state == "INIT" else working)(m)
    for length in (64, 128):  # Linux's legacy buffer has room for two sockets: one is written
        m.hv.psp.put_data(b"\xee" * 128, OUT_OFF)
        out = GetIdCmd.decode(ok(m, CommandId.GET_ID, GetIdCmd(id_paddr=spa(m, OUT_OFF), id_len=length)))
        assert out.id_len == 64
        assert m.hv.psp.get_data(128, OUT_OFF) == m.firmware.identity.chip_id + b"\xee" * 64


@pytest.mark.parametrize("paddr_off,length", [(None, 0), (OUT_OFF, 0), (OUT_OFF, 63), (None, 64)])
def test_get_id_length_query(m: Machine, paddr_off: int | None, length: int) -> None:
    paddr = 0 if paddr_off is None else spa(m, paddr_off)
    got, out = call(m, CommandId.GET_ID, GetIdCmd(id_paddr=paddr, id_len=length))
    assert got == Status.INVALID_LENGTH
    assert GetIdCmd.decode(out) == GetIdCmd(id_paddr=paddr, id_len=64)


# ---- PEK_CSR and PDH_CERT_EXPORT ----------------------------------------------------------------
def test_pek_csr_is_the_unsigned_pek(m: Machine) -> None:
    working(m)  # allowed in WORKING (AMD's firmware)
    got = csr(m)
    pek = m.firmware.identity.pek_cert
    assert got.sig1 == EMPTY_SLOT and got.sig2 == EMPTY_SLOT
    assert got.signed_bytes() == pek.signed_bytes() and got.key == pek.key
    out = PekCsrCmd.decode(ok(m, CommandId.PEK_CSR, PekCsrCmd(csr_paddr=spa(m, OUT_OFF), csr_len=0x1000)))
    assert out.csr_len == CERT


@pytest.mark.parametrize("paddr_off,length", [(None, 0), (OUT_OFF, 0), (OUT_OFF, CERT - 1), (None, CERT)])
def test_pek_csr_length_query(m: Machine, paddr_off: int | None, length: int) -> None:
    init(m)
    paddr = 0 if paddr_off is None else spa(m, paddr_off)
    got, out = call(m, CommandId.PEK_CSR, PekCsrCmd(csr_paddr=paddr, csr_len=length))
    assert got == Status.INVALID_LENGTH and PekCsrCmd.decode(out).csr_len == CERT


@pytest.mark.parametrize("pdh,chain", [((0, 0), (0, 0)), ((OUT_OFF, CERT), (CHAIN_OFF, CHAIN - 1)),
                                       ((OUT_OFF, 1), (CHAIN_OFF, CHAIN)), ((None, CERT), (CHAIN_OFF, CHAIN))])
def test_pdh_cert_export_length_query(m: Machine, pdh: tuple[int | None, int],
                                      chain: tuple[int | None, int]) -> None:
    init(m)
    m.hv.psp.put_data(b"\xaa" * 0x6000, OUT_OFF)

    def where(off: int | None, length: int) -> int:
        return 0 if off is None or length == 0 and off == 0 else spa(m, off)

    cmd = PdhCertExportCmd(pdh_cert_paddr=where(*pdh), pdh_cert_len=pdh[1], certs_paddr=where(*chain),
                           certs_len=chain[1])
    got, out = call(m, CommandId.PDH_CERT_EXPORT, cmd)
    assert got == Status.INVALID_LENGTH
    back = PdhCertExportCmd.decode(out)
    assert (back.pdh_cert_len, back.certs_len) == (CERT, CHAIN)
    assert m.hv.psp.get_data(0x6000, OUT_OFF) == b"\xaa" * 0x6000  # nothing written


def test_pdh_cert_export_writes_lengths_back(m: Machine) -> None:
    working(m)
    cmd = PdhCertExportCmd(pdh_cert_paddr=spa(m, OUT_OFF), pdh_cert_len=0x1000, certs_paddr=spa(m, CHAIN_OFF),
                           certs_len=0x2000)
    back = PdhCertExportCmd.decode(ok(m, CommandId.PDH_CERT_EXPORT, cmd))
    assert (back.pdh_cert_len, back.certs_len) == (CERT, CHAIN)


# ---- PEK_GEN, PDH_GEN, PLATFORM_RESET -----------------------------------------------------------
def test_pek_gen_makes_a_new_owner_and_keeps_the_cek(m: Machine) -> None:
    init(m)
    before = m.firmware.identity
    commits = nv_state(m)[1]
    ok(m, CommandId.PEK_GEN)
    after = m.firmware.identity
    assert nv_state(m) == (after.nv_records(), commits + 1)  # one transaction
    for name in ("oca.cert", "pek.cert", "pdh.cert", "oca.key", "pek.key", "pdh.key"):
        assert before.nv_records()[name] != after.nv_records()[name], name
    assert after.cek_cert == before.cek_cert and after.chip_id == before.chip_id
    assert m.amd_root is not None
    export(m).verify([m.amd_root.pin()])


def test_pdh_gen_changes_the_pdh_only(m: Machine) -> None:
    working(m)
    before = m.firmware.identity.nv_records()
    ok(m, CommandId.PDH_GEN)
    after = m.firmware.identity.nv_records()
    assert {n for n in after if after[n] != before[n]} == {"pdh.key", "pdh.cert"}
    assert nv_state(m)[0] == after
    assert m.amd_root is not None
    export(m).verify([m.amd_root.pin()])


def test_platform_reset_resets_nv(m: Machine) -> None:
    nv = m.firmware.nv
    assert nv is not None
    nv.commit({"snp.something": b"x"})  # another engineer's record: PLATFORM_RESET drops it too
    before = m.firmware.identity.nv_records()
    ok(m, CommandId.PLATFORM_RESET)
    after = m.firmware.identity.nv_records()
    assert nv.read() == after
    assert all(after[n] != before[n] for n in ("oca.key", "pek.key", "pdh.key"))


# ---- ownership ----------------------------------------------------------------------------------
def test_ownership_round_trip(m: Machine) -> None:
    assert m.amd_root is not None
    pin = m.amd_root.pin()
    init(m)
    owner = Owner.new()
    request = csr(m)
    signed = owner.sign(request)
    ok(m, CommandId.PEK_CERT_IMPORT, import_cmd(m, signed.encode(), owner.cert.encode()))
    ident = m.firmware.identity
    assert ident.owner_external and ident.oca_key is None and ident.oca_cert == owner.cert
    assert status(m).owner == 1
    chain = export(m)
    chain.verify([pin])
    assert chain.oca == owner.cert
    assert chain.pek.sig1 == signed.sig1 and chain.pek.sig2.usage == KeyUsage.CEK  # CEK in the free slot
    assert chain.pek.signed_bytes() == request.signed_bytes()
    assert "oca.key" not in nv_state(m)[0] and nv_state(m)[0]["owner"] == b"\x01"
    # the owner cannot be replaced by another import, nor while guests run
    refused_cleanly(m, CommandId.PEK_CERT_IMPORT, import_cmd(m, signed.encode(), owner.cert.encode()),
                    Status.ALREADY_OWNED)
    # PEK_GEN takes the platform back; it can then be owned again (OCA in slot 2 this time)
    ok(m, CommandId.PEK_GEN)
    assert not m.firmware.identity.owner_external and status(m).owner == 0
    take_ownership(m, owner, slot=2)
    chain = export(m)
    chain.verify([pin])
    assert [s.usage for s in chain.pek.slots] == [KeyUsage.CEK, KeyUsage.OCA]
    # PLATFORM_RESET (UNINIT only) makes it self-owned again
    refused_cleanly(m, CommandId.PLATFORM_RESET, None, Status.INVALID_PLATFORM_STATE)
    ok(m, CommandId.SHUTDOWN)
    assert status(m).owner == 0  # the owner bit is not reported in UNINIT (AMD's firmware)
    assert m.firmware.identity.owner_external
    ok(m, CommandId.PLATFORM_RESET)
    init(m)
    assert status(m).owner == 0 and not m.firmware.identity.owner_external
    assert "oca.key" in nv_state(m)[0]
    export(m).verify([pin])


def test_import_with_an_rsa_oca(m: Machine) -> None:
    init(m)
    owner = Owner(crypto_rsa.generate_private_key(65537, 2048), SigAlgo.RSA_SHA256)
    take_ownership(m, owner)
    assert m.amd_root is not None
    export(m).verify([m.amd_root.pin()])


def _other_key_pek(m: Machine, owner: Owner) -> bytes:
    other = ecc.generate_private_key()
    prof = m.profile
    pek = SevCert.new(KeyUsage.PEK, ECDSA, other.public_key(), api_major=prof.api_major,
                      api_minor=prof.api_minor)
    return owner.sign(pek).encode()


ImportCase = Callable[[Machine, Owner], PekCertImportCmd]


def _bad(pek: Callable[[Machine, Owner], bytes], oca: Callable[[Machine, Owner], bytes],
         **kw: int) -> ImportCase:
    return lambda m, owner: import_cmd(m, pek(m, owner), oca(m, owner), **kw)


def _signed(m: Machine, o: Owner) -> bytes:
    return o.sign(csr(m)).encode()


def _oca(m: Machine, o: Owner) -> bytes:
    return o.cert.encode()


def _wrong_self_sig(m: Machine, o: Owner) -> bytes:
    impostor = ecc.generate_private_key()
    return SevCert.new(KeyUsage.OCA, ECDSA, o.key.public_key()).sign_with(impostor, KeyUsage.OCA, ECDSA).encode()


def _oca_as_pek_usage(m: Machine, o: Owner) -> bytes:
    return SevCert.new(KeyUsage.PEK, ECDSA, o.key.public_key()).sign_with(o.key, KeyUsage.PEK, ECDSA).encode()


def _oca_unsigned(m: Machine, o: Owner) -> bytes:
    return SevCert.new(KeyUsage.OCA, ECDSA, o.key.public_key()).encode()


IMPORT_REFUSALS: list[tuple[str, ImportCase, Status]] = [
    ("PEK length", _bad(_signed, _oca, pek_len=CERT - 1), Status.INVALID_LENGTH),
    ("OCA length 0", _bad(_signed, _oca, oca_len=0), Status.INVALID_LENGTH),
    ("PEK outside DRAM", _bad(_signed, _oca, pek_paddr=1 << 40), Status.INVALID_ADDRESS),
    ("garbage PEK", _bad(lambda m, o: b"\x5a" * CERT, _oca), Status.INVALID_CERTIFICATE),
    ("OCA with PEK usage", _bad(_signed, _oca_as_pek_usage), Status.INVALID_CERTIFICATE),
    ("OCA not self-signed", _bad(_signed, _oca_unsigned), Status.INVALID_CERTIFICATE),
    ("OCA self-signature wrong", _bad(_signed, _wrong_self_sig), Status.BAD_SIGNATURE),
    ("PEK unsigned (the CSR)", _bad(lambda m, o: csr(m).encode(), _oca), Status.INVALID_CERTIFICATE),
    ("PEK signed by another OCA", _bad(lambda m, o: Owner.new().sign(csr(m)).encode(), _oca),
     Status.BAD_SIGNATURE),
    ("PEK of another key", _bad(_other_key_pek, _oca), Status.INVALID_CERTIFICATE),
    ("PEK with no free slot", _bad(lambda m, o: o.sign(o.sign(csr(m)), slot=2).encode(), _oca),
     Status.INVALID_CERTIFICATE),
    ("OCA given as PEK", _bad(_oca, _oca), Status.INVALID_CERTIFICATE),
]


@pytest.mark.parametrize("name,case,want", IMPORT_REFUSALS, ids=[c[0] for c in IMPORT_REFUSALS])
def test_pek_cert_import_refusals(m: Machine, name: str, case: ImportCase, want: Status) -> None:
    init(m)
    refused_cleanly(m, CommandId.PEK_CERT_IMPORT, case(m, Owner.new()), want)


def test_import_of_a_stale_csr_after_pek_gen(m: Machine) -> None:
    init(m)
    owner = Owner.new()
    stale = owner.sign(csr(m)).encode()
    ok(m, CommandId.PEK_GEN)
    refused_cleanly(m, CommandId.PEK_CERT_IMPORT, import_cmd(m, stale, owner.cert.encode()),
                    Status.INVALID_CERTIFICATE)


# ---- every refusal in one table: states and lengths ---------------------------------------------
def _import_ok(m: Machine) -> PekCertImportCmd:
    owner = Owner.new()
    return import_cmd(m, owner.sign(m.firmware.identity.pek_csr()).encode(), owner.cert.encode())


STATE_REFUSALS: list[tuple[str, Callable[[Machine], None], CommandId, Callable[[Machine], object | None]]] = [
    ("UNINIT", lambda m: None, CommandId.PEK_GEN, lambda m: None),
    ("UNINIT", lambda m: None, CommandId.PDH_GEN, lambda m: None),
    ("UNINIT", lambda m: None, CommandId.PEK_CSR, lambda m: PekCsrCmd(csr_paddr=spa(m, OUT_OFF), csr_len=CERT)),
    ("UNINIT", lambda m: None, CommandId.PEK_CERT_IMPORT, _import_ok),
    ("UNINIT", lambda m: None, CommandId.PDH_CERT_EXPORT, lambda m: PdhCertExportCmd()),
    ("INIT", init, CommandId.PLATFORM_RESET, lambda m: None),
    ("INIT", init, CommandId.INIT_EX, lambda m: InitExCmd()),
    ("WORKING", working, CommandId.PLATFORM_RESET, lambda m: None),
    ("WORKING", working, CommandId.PEK_GEN, lambda m: None),
    ("WORKING", working, CommandId.PEK_CERT_IMPORT, _import_ok),
    ("WORKING", working, CommandId.INIT_EX, lambda m: InitExCmd()),
]


@pytest.mark.parametrize("state,setup,cmd,buf", STATE_REFUSALS,
                         ids=[f"{c[2].name}-in-{c[0]}" for c in STATE_REFUSALS])
def test_commands_refused_in_the_wrong_state(m: Machine, state: str, setup: Callable[[Machine], None],
                                             cmd: CommandId, buf: Callable[[Machine], object | None]) -> None:
    setup(m)
    refused_cleanly(m, cmd, buf(m), Status.INVALID_PLATFORM_STATE)


def test_successful_commands_each_commit_one_transaction(m: Machine) -> None:
    init(m)
    for cmd in (CommandId.PDH_GEN, CommandId.PEK_GEN):
        commits = nv_state(m)[1]
        ok(m, cmd)
        assert nv_state(m) == (m.firmware.identity.nv_records(), commits + 1)
    commits = nv_state(m)[1]
    take_ownership(m, Owner.new())
    assert nv_state(m) == (m.firmware.identity.nv_records(), commits + 1)
    # read-only commands write nothing
    before = nv_state(m)
    csr(m)
    export(m)
    ok(m, CommandId.GET_ID, GetIdCmd(id_paddr=spa(m, OUT_OFF), id_len=64))
    status(m)
    assert nv_state(m) == before


# ---- persistence --------------------------------------------------------------------------------
def test_identity_survives_a_restart(tmp_path: Path) -> None:
    d = tmp_path / "p"
    m = boot(d)
    init(m)
    take_ownership(m, Owner.new())
    records, chip_id = m.firmware.identity.nv_records(), m.firmware.identity.chip_id
    m.firmware.close()
    again = boot(d)
    assert again.firmware.state == PlatformState.UNINIT
    assert again.firmware.identity.nv_records() == records and again.firmware.identity.chip_id == chip_id
    init(again)
    assert status(again).owner == 1
    export(again).verify([again.amd_root.pin()])  # type: ignore[union-attr]


RESTART = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from sevemu.scenario import build_machine
    m = build_machine("milan", dram_size=1 << 30, init=False, platform_dir=Path(sys.argv[1]))
    ident = m.firmware.identity
    print(ident.chip_id.hex(), hashlib.sha256(b"".join(sorted(ident.nv_records().values()))).hexdigest())
""")


def test_identity_survives_a_new_process(tmp_path: Path) -> None:
    d = tmp_path / "p"
    m = boot(d)
    init(m)
    ok(m, CommandId.PEK_GEN)
    ident = m.firmware.identity
    import hashlib

    want = f"{ident.chip_id.hex()} {hashlib.sha256(b''.join(sorted(ident.nv_records().values()))).hexdigest()}"
    m.firmware.close()
    out = subprocess.run([sys.executable, "-c", RESTART, str(d)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == want


def test_an_existing_platform_dir_keeps_its_generation(tmp_path: Path) -> None:
    boot(tmp_path / "p", "naples").firmware.close()
    from sevemu.firmware.nvstore import NvStoreError

    with pytest.raises(NvStoreError):
        boot(tmp_path / "p", "milan")


def test_unprovisioned_firmware_answers_hwerror(tmp_path: Path) -> None:
    soc = Soc(profile("milan"), dram_size=1 << 30)
    fw = load_firmware(soc.psp.take_ports())
    soc.psp.install(fw)
    assert fw.handle(CommandId.PLATFORM_RESET, 0) == Status.HWERROR_PLATFORM
    assert fw.handle(CommandId.INIT, 0) == Status.SUCCESS  # INIT itself needs no identity
    assert fw.handle(CommandId.PDH_GEN, 0) == Status.HWERROR_PLATFORM
    assert not fw.internal_errors


# ---- INIT_EX ------------------------------------------------------------------------------------
def init_ex(nv_paddr: int = NV_SPA, nv_len: int = INIT_EX_NV_LEN, **kw: int) -> InitExCmd:
    return InitExCmd(nv_paddr=nv_paddr, nv_len=nv_len, **kw)


def test_init_ex_without_nv_buffer_is_init(m: Machine) -> None:
    records = m.firmware.identity.nv_records()
    ok(m, CommandId.INIT_EX, init_ex(nv_paddr=0, nv_len=0))
    assert m.firmware.state == PlatformState.INIT and m.firmware.nv_area is None
    assert m.firmware.identity.nv_records() == records


INIT_EX_REFUSALS = [
    ("length", InitExCmd(length=0x20), Status.INVALID_LENGTH),
    ("unaligned NV", init_ex(nv_paddr=NV_SPA + 0x800), Status.INVALID_ADDRESS),
    ("NV outside DRAM", init_ex(nv_paddr=1 << 40), Status.INVALID_ADDRESS),
    ("NV length", init_ex(nv_len=16 << 10), Status.INVALID_LENGTH),
    ("options", init_ex(options=2), Status.INVALID_CONFIG),  # AF init_ex_cmd_buf_valid
    ("NV overlaps the TMR", init_ex(nv_paddr=2 * MiB, options=1, tmr_paddr=2 * MiB, tmr_len=MiB),
     Status.INVALID_ADDRESS),
]


@pytest.mark.parametrize("name,cmd,want", INIT_EX_REFUSALS, ids=[c[0] for c in INIT_EX_REFUSALS])
def test_init_ex_refusals(m: Machine, name: str, cmd: InitExCmd, want: Status) -> None:
    refused_cleanly(m, CommandId.INIT_EX, cmd, want)


def test_init_ex_keeps_nv_in_the_host_buffer(m: Machine, tmp_path: Path) -> None:
    core = m.hv.core
    spi = m.firmware.identity.nv_records()
    spi_nv = nv_state(m)
    core.host_write(NV_SPA, b"\xff" * INIT_EX_NV_LEN)  # an erased area: the firmware formats it
    ok(m, CommandId.INIT_EX, init_ex())
    image = core.host_read(NV_SPA, INIT_EX_NV_LEN)
    assert image.startswith(HOST_NV_MAGIC)
    host = m.firmware.identity
    assert host.nv_records()["pek.cert"] != spi["pek.cert"] and host.chip_id == m.firmware.identity.chip_id
    assert m.amd_root is not None
    export(m).verify([m.amd_root.pin()])
    # NV-changing commands now write the host buffer, not the SPI store
    ok(m, CommandId.PDH_GEN)
    take_ownership(m, Owner.new())
    image2 = core.host_read(NV_SPA, INIT_EX_NV_LEN)
    assert image2 != image and nv_state(m) == spi_nv
    owned = m.firmware.identity.nv_records()
    # after a SHUTDOWN the same buffer brings the same identity back
    ok(m, CommandId.SHUTDOWN)
    ok(m, CommandId.INIT_EX, init_ex())
    assert m.firmware.identity.nv_records() == owned and status(m).owner == 1
    # a plain INIT goes back to the SPI store's identity
    ok(m, CommandId.SHUTDOWN)
    init(m)
    assert m.firmware.identity.nv_records() == spi and status(m).owner == 0
    # an altered image, or another chip's, does not unseal
    ok(m, CommandId.SHUTDOWN)
    bad = bytearray(image2)
    bad[100] ^= 1
    core.host_write(NV_SPA, bytes(bad))
    refused_cleanly(m, CommandId.INIT_EX, init_ex(), Status.SECURE_DATA_INVALID)
    assert core.host_read(NV_SPA, INIT_EX_NV_LEN) == bytes(bad)
    other = boot(tmp_path / "other")
    other.hv.core.host_write(NV_SPA, image2)
    refused_cleanly(other, CommandId.INIT_EX, init_ex(), Status.SECURE_DATA_INVALID)
    # PLATFORM_RESET resets the SPI store only
    core.host_write(NV_SPA, image2)
    ok(m, CommandId.PLATFORM_RESET)
    assert nv_state(m)[0] == m.firmware.identity.nv_records() != spi
    ok(m, CommandId.INIT_EX, init_ex())
    assert m.firmware.identity.nv_records() == owned


# ---- the factory --------------------------------------------------------------------------------
def test_amd_roots_are_kept_in_the_process_and_in_amds_vault(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sevemu import scenario

    monkeypatch.setenv("SEVEMU_AMD_VAULT", str(tmp_path / "vault"))
    monkeypatch.setenv("SEVEMU_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(scenario, "_ROOTS", {})
    made = scenario.default_amd_root("naples")
    assert scenario.default_amd_root("naples") is made
    assert (tmp_path / "vault" / "naples" / "ark.cert").read_bytes() == made.ark.encode()
    assert (tmp_path / "vault").stat().st_mode & 0o077 == 0  # AMD's side: private to its owner
    # the host's cache holds no AMD key (issue: the emulated AMD's keys used to sit in ~/.cache)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "xdg-cache").exists()
    monkeypatch.setattr(scenario, "_ROOTS", {})  # a new process: loaded from the vault, not made again
    assert scenario.default_amd_root("naples").ark.encode() == made.ark.encode()
    monkeypatch.setenv("SEVEMU_AMD_VAULT", "")
    monkeypatch.setattr(scenario, "_ROOTS", {})
    assert scenario.default_amd_root("naples").ark.encode() != made.ark.encode()


def test_a_given_root_manufactures_the_chip(tmp_path: Path) -> None:
    from sevemu import scenario
    from sevemu.errors import InputError

    root = scenario.default_amd_root("naples")
    m = build_machine("naples", dram_size=1 << 30, init=False, platform_dir=tmp_path / "p", amd_root=root)
    assert m.amd_root is root
    m.firmware.identity.platform_chain().verify([root.pin()])
    with pytest.raises(InputError):
        build_machine("milan", dram_size=1 << 30, init=False, amd_root=root)
