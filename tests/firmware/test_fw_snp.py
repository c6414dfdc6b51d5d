"""The SNP firmware (firmware/snp) through the real mailbox: platform bring-up as Linux does it, the
guest launch with every page type and a digest equal to sev-snp-measure's PAGE_INFO chain, the page
states each command needs and leaves, ID block and ID authentication, the policy per generation, the
CPUID page check, teardown with reclaim and ASID reuse -- and the host's attacks on each."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fwkit import call, ok
from snpkit import (
    ASID,
    GCTX,
    GUEST_BASE,
    PAGE,
    POLICY,
    SCRATCH,
    SnpLaunch,
    firmware_page,
    guest_status,
    platform_status,
    read_output,
    reclaim,
    rmpupdate,
    snp_machine,
)

from sevemu.abi.commands import CommandId
from sevemu.abi.cpuid import Msr
from sevemu.abi.rmp import RmpPageState, RmpResult, RmpUpdateState
from sevemu.abi.sev import InitCmd
from sevemu.abi.snp import (
    VMSA_GPA,
    IdBlock,
    SecretsPage,
    SnpActivateCmd,
    SnpAddrCmd,
    SnpCommitCmd,
    SnpConfigCmd,
    SnpCpuidFunction,
    SnpDbgCmd,
    SnpFeatureInfo,
    SnpFeatureInfoCmd,
    SnpFeatureInfoEcx,
    SnpGuestState,
    SnpInitExCmd,
    SnpInitExFlags,
    SnpLaunchFinishFlags,
    SnpPageCmd,
    SnpPageType,
    SnpPlatformState,
    SnpShutdownExCmd,
)
from sevemu.abi.status import Status
from sevemu.crypto import ecc
from sevemu.firmware.snp import snp_state
from sevemu.hw.rmp import HostRmpFault

sevsnpmeasure = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure (pip) is not installed")


def _state(m):  # type: ignore[no-untyped-def]
    return snp_state(m.firmware)


# ---- platform ------------------------------------------------------------------------------------
def test_bring_up_as_linux_does() -> None:
    m = snp_machine(init=False)
    assert call(m, CommandId.SNP_DF_FLUSH)[0] == Status.INVALID_PLATFORM_STATE
    assert call(m, CommandId.SNP_INIT_EX, SnpInitExCmd())[0] == Status.RMP_INIT_REQUIRED  # INIT_RMP clear
    ok(m, CommandId.SNP_INIT)
    assert call(m, CommandId.SNP_INIT)[0] == Status.INVALID_PLATFORM_STATE
    st = platform_status(m)
    assert (st.state, st.init.is_rmp_initialized, st.api_major, st.guest_count) == (1, True, 1, 0)
    assert st.flags.feature_info and st.current_tcb == st.reported_tcb != 0
    # every ASID is dirty after SNP_INIT: DF_FLUSH only after a WBINVD
    assert call(m, CommandId.SNP_DF_FLUSH)[0] == Status.WBINVD_REQUIRED
    m.soc.wbinvd_all()
    ok(m, CommandId.SNP_DF_FLUSH)
    ok(m, CommandId.INIT, InitCmd())  # SNP first, then SEV (Linux's order)
    assert m.firmware.state != 0
    assert call(m, CommandId.SNP_SHUTDOWN)[0] == Status.INVALID_PLATFORM_STATE  # not while SEV runs
    ok(m, CommandId.SHUTDOWN)
    assert call(m, CommandId.SNP_SHUTDOWN)[0] == Status.DF_FLUSH_REQUIRED  # INIT left the ASIDs dirty
    m.soc.wbinvd_all()
    ok(m, CommandId.SNP_DF_FLUSH)  # Linux __sev_snp_shutdown_locked: WBINVD, SNP_DF_FLUSH, shutdown
    assert call(m, CommandId.SNP_SHUTDOWN_EX, SnpShutdownExCmd(len=4))[0] == Status.INVALID_PARAM
    ok(m, CommandId.SNP_SHUTDOWN)
    assert _state(m).state == SnpPlatformState.UNINIT
    ok(m, CommandId.SNP_SHUTDOWN)  # SUCCESS without action when already UNINIT


def test_snp_init_needs_snp_en_and_the_sev_platform_uninit() -> None:
    from sevemu.scenario import build_machine
    m = build_machine("milan", dram_size=1 << 30, init=False, seed="snp-no-en")
    assert call(m, CommandId.SNP_INIT)[0] == Status.INVALID_CONFIG
    assert _state(m).state == SnpPlatformState.UNINIT and not m.soc.rmp.initialized  # type: ignore[union-attr]
    m2 = snp_machine(init=False, seed="snp-legacy-first")
    ok(m2, CommandId.INIT, InitCmd())
    assert call(m2, CommandId.SNP_INIT)[0] == Status.INVALID_PLATFORM_STATE
    rome = build_machine("rome", dram_size=1 << 30, init=False, seed="snp-rome")
    assert call(rome, CommandId.SNP_INIT)[0] == Status.UNSUPPORTED


def test_the_rmp_is_the_firmwares_after_init() -> None:
    m = snp_machine()
    rmp = m.soc.rmp
    assert rmp is not None and rmp.initialized
    base = m.hv.soc.rdmsr(Msr.RMP_BASE)
    with pytest.raises(HostRmpFault):
        m.hv.core.host_write(base + 0x4000 + 16 * 0x10000, bytes(16))  # forge an entry: the TMR says no


def test_init_ex_range_list_makes_hypervisor_fixed_pages() -> None:
    m = snp_machine(init=False)
    lst = SCRATCH
    m.hv.core.host_write(lst, (1).to_bytes(4, "little") + bytes(4) + (0x3000_0000).to_bytes(8, "little")
                         + (2).to_bytes(4, "little") + bytes(4))
    ok(m, CommandId.SNP_INIT_EX, SnpInitExCmd(flags=SnpInitExFlags(init_rmp=True, list_paddr_en=True), list_paddr=lst))
    e = m.hv.soc.rmp_entry(0x3000_1000)
    assert not e.assigned and e.immutable
    m.hv.core.host_write(0x3000_1000, b"host data")  # still the hypervisor's
    assert m.hv.core.rmpupdate_state(0x3000_1000, RmpUpdateState(assigned=1, asid=1)) == RmpResult.FAIL_PERMISSION


def test_status_pages_must_be_firmware_pages() -> None:
    m = snp_machine()
    before = m.hv.core.host_read(SCRATCH, 0x20)
    assert call(m, CommandId.SNP_PLATFORM_STATUS, SnpAddrCmd(address=SCRATCH))[0] == Status.INVALID_PAGE_STATE
    assert m.hv.core.host_read(SCRATCH, 0x20) == before
    assert call(m, CommandId.SNP_PLATFORM_STATUS, SnpAddrCmd(address=SCRATCH + PAGE - 0x10))[0] == Status.INVALID_PARAM


def test_feature_info_config_and_commit() -> None:
    m = snp_machine("genoa")
    status, info = read_output(m, CommandId.SNP_FEATURE_INFO, SnpFeatureInfoCmd(feature_info_paddr=SCRATCH), SCRATCH,
                               SnpFeatureInfo)
    assert status == Status.SUCCESS and isinstance(info, SnpFeatureInfo)
    assert info.ecx & SnpFeatureInfoEcx.AES_256_XTS_POLICY and not info.ecx & SnpFeatureInfoEcx.CIPHERTEXT_HIDING
    assert call(m, CommandId.SNP_FEATURE_INFO, SnpFeatureInfoCmd(ecx_in=1, feature_info_paddr=SCRATCH))[0] == Status.INVALID_PARAM
    st = _state(m)
    above = st.current_tcb + (1 << 56)
    assert call(m, CommandId.SNP_CONFIG, SnpConfigCmd(reported_tcb=above))[0] == Status.INVALID_PARAM
    assert st.reported_tcb == st.current_tcb
    lower = st.current_tcb - 1
    ok(m, CommandId.SNP_CONFIG, SnpConfigCmd(reported_tcb=lower))
    assert platform_status(m).reported_tcb == lower
    assert call(m, CommandId.SNP_COMMIT, SnpCommitCmd(len=8))[0] == Status.INVALID_PARAM
    ok(m, CommandId.SNP_COMMIT, SnpCommitCmd())
    assert st.committed_tcb == st.current_tcb


# ---- launch ----------------------------------------------------------------------------------------
def _cpuid_page(m) -> bytes:  # type: ignore[no-untyped-def]
    eax1 = m.hv.soc.cpuid(1)[0]
    fns = [SnpCpuidFunction(eax_in=1, eax=eax1), SnpCpuidFunction(eax_in=0x8000001F, eax=m.hv.soc.cpuid(0x8000001F)[0])]
    return (len(fns)).to_bytes(4, "little") + bytes(12) + b"".join(f.encode() for f in fns)


def _launch(m, policy: int = POLICY) -> tuple[SnpLaunch, object]:  # type: ignore[no-untyped-def]
    lau = SnpLaunch(m, policy=policy)
    assert lau.start() == Status.SUCCESS
    ref = sevsnpmeasure.GCTX()
    code = bytes(range(256)) * 16
    lau.update(0x0, SnpPageType.NORMAL, code)
    ref.update_normal_pages(0x0, code)
    lau.update(0x1000, SnpPageType.ZERO, b"host garbage")
    ref.update_zero_pages(0x1000, PAGE)
    lau.update(0x2000, SnpPageType.UNMEASURED, b"unmeasured")
    ref.update_unmeasured_pages(0x2000, PAGE)
    lau.update(0x3000, SnpPageType.SECRETS)
    ref.update_secrets_page(0x3000)
    lau.update(0x4000, SnpPageType.CPUID, _cpuid_page(m))
    ref.update_cpuid_page(0x4000)
    big = bytes([7]) * (2 << 20)
    lau.update(0x200000, SnpPageType.NORMAL, big, huge=True)
    ref.update_normal_pages(0x200000, big)
    vmsa = bytearray(PAGE)
    vmsa[0x2F0:0x300] = b"\x11" * 16  # GUEST_TSC_SCALE/OFFSET: measured as zero
    vmsa[0x3B0] = 1  # SEV_FEATURES.SNP
    _vmsa_update(lau, bytes(vmsa))
    measured = bytearray(vmsa)
    measured[0x2F0:0x300] = bytes(16)
    ref.update_vmsa_page(bytes(measured))
    return lau, ref


VMSA_SPA = 0x2000_0000


def _vmsa_update(lau: SnpLaunch, vmsa: bytes) -> None:
    """KVM's VMSA update: the page's RMP entry names the GPA 0xFFFFFFFFF000 (``INITIAL_VMSA_GPA``)."""
    from sevemu.abi.snp import SnpLaunchUpdateCmd, SnpLaunchUpdateFlags
    m = lau.m
    m.hv.core.host_write(VMSA_SPA, vmsa)
    m.hv.core.clflush_range(VMSA_SPA, PAGE)
    rmpupdate(m, VMSA_SPA, assigned=True, asid=lau.asid, gpa=VMSA_GPA, immutable=True)
    ok(m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(
        gctx_paddr=lau.gctx, flags=SnpLaunchUpdateFlags(page_type=int(SnpPageType.VMSA)), address=VMSA_SPA))


def test_a_vmsa_page_is_measured_as_read_and_encrypted_where_it_is_a_dirty_host_line_included() -> None:
    """SNP_LAUNCH_UPDATE of a VMSA page reads and encrypts it in one pass: what it measures is what it
    read -- the host's dirty cached line written back first -- with GUEST_TSC_SCALE / OFFSET measured
    as zero; DRAM then holds that page encrypted with the guest's key (TSC fields as written), no host
    line of it stays cached, and the RMP entry is Guest-Valid with RMP.VMSA."""
    from sevemu.abi.snp import SnpLaunchUpdateCmd, SnpLaunchUpdateFlags
    m = snp_machine()
    lau = SnpLaunch(m)
    assert lau.start() == Status.SUCCESS
    ref = sevsnpmeasure.GCTX()
    vmsa = bytearray(range(256)) * 16
    vmsa[0x2F0:0x300] = b"\x22" * 16
    m.hv.core.host_write(VMSA_SPA, bytes(PAGE))
    m.hv.core.clflush_range(VMSA_SPA, PAGE)  # DRAM holds zeros ...
    m.hv.core.host_write(VMSA_SPA, bytes(vmsa))  # ... and the host's cache the page, dirty
    assert m.soc.cache.dirty
    rmpupdate(m, VMSA_SPA, assigned=True, asid=lau.asid, gpa=VMSA_GPA, immutable=True)
    ok(m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(
        gctx_paddr=lau.gctx, flags=SnpLaunchUpdateFlags(page_type=int(SnpPageType.VMSA)), address=VMSA_SPA))
    measured = bytearray(vmsa)
    measured[0x2F0:0x300] = bytes(16)
    ref.update_vmsa_page(bytes(measured))
    assert _state(m).guests[GCTX].ld == ref.ld()  # type: ignore[attr-defined]
    assert m.soc.mc.read(VMSA_SPA, PAGE, ASID, True) == bytes(vmsa)
    assert m.soc.mc.dram.read(VMSA_SPA, PAGE) not in (bytes(vmsa), bytes(PAGE))
    assert not m.soc.cache.resident_keys(0, False, VMSA_SPA, PAGE)
    e = m.hv.soc.rmp_entry(VMSA_SPA)
    assert e.state == RmpPageState.GUEST_VALID and e.vmsa and e.gpa == VMSA_GPA and e.asid == ASID


def test_launch_digest_equals_sev_snp_measure_and_pages_end_guest_valid() -> None:
    m = snp_machine()
    lau, ref = _launch(m)
    g = _state(m).guests[GCTX]
    assert g.ld == ref.ld()  # type: ignore[attr-defined]
    for gpa in (0x0, 0x1000, 0x3000, 0x4000):
        e = m.hv.soc.rmp_entry(GUEST_BASE + gpa)
        assert e.state == RmpPageState.GUEST_VALID and e.gpa == gpa and e.asid == ASID
    assert m.hv.soc.rmp_entry(GUEST_BASE + 0x3FF000).page_size == 1
    assert m.hv.soc.rmp_entry(VMSA_SPA).vmsa
    # encrypted in place: the host sees neither the code nor the secrets; a write faults
    assert m.hv.core.host_read(GUEST_BASE, 256) != bytes(range(256))
    with pytest.raises(HostRmpFault):
        m.hv.core.host_write(GUEST_BASE, b"evil")
    assert lau.finish(host_data=b"H" * 32) == Status.SUCCESS
    gs = guest_status(m)
    assert (gs.state, gs.asid, gs.policy) == (SnpGuestState.RUNNING, ASID, POLICY)
    assert g.host_data == b"H" * 32 and g.ld == ref.ld()  # type: ignore[attr-defined]


def test_secrets_page_carries_the_vmpcks() -> None:
    m = snp_machine()
    _launch(m)
    g = _state(m).guests[GCTX]
    # what the guest reads with its key (the firmware's debug view of guest memory)
    plain = m.soc.mc.read(GUEST_BASE + 0x3000, PAGE, ASID, True)
    sp = SecretsPage.decode(plain)
    assert [sp.vmpck(i) for i in range(4)] == list(g.vmpck) and len(set(g.vmpck)) == 4
    assert sp.version == 2 and sp.fms == m.hv.soc.cpuid(1)[0]
    assert m.soc.mc.read(GUEST_BASE + 0x1000, PAGE, ASID, True) == bytes(PAGE)  # ZERO page: zeros


def test_the_secrets_page_is_its_full_encoding_for_any_keys_gosvw_imien_and_fms() -> None:
    """``launch._secrets`` puts the VMPCKs into a memoised page with zero keys: byte for byte the
    encoding of the whole SecretsPage, for varied keys, GOSVW, IMIEN and FMS (the memo holding several
    kinds at once); keys that are not 32 bytes are refused as the full encoding refuses them."""
    import random
    from types import SimpleNamespace

    from sevemu.abi.snp import SecretsPageFlags
    from sevemu.errors import LayoutError
    from sevemu.firmware.snp.launch import _secrets

    rng = random.Random(11)
    for trial in range(60):
        keys = tuple(rng.randbytes(32) for _ in range(4))
        imi, fms, gosvw = rng.random() < 0.5, rng.choice([0xA00F11, 0xA10F11, 0x830F10]), rng.choice([bytes(16), rng.randbytes(16)])
        fw = SimpleNamespace(profile=SimpleNamespace(cpuid_fn0000_0001_eax=fms))
        g = SimpleNamespace(vmpck=keys, imi_en=imi, gosvw=gosvw)
        want = SecretsPage(flags=SecretsPageFlags(imien=imi), fms=fms, gosvw=gosvw, vmpck0=keys[0],
                           vmpck1=keys[1], vmpck2=keys[2], vmpck3=keys[3]).encode()
        assert _secrets(fw, g) == want, trial  # type: ignore[arg-type]
        assert SecretsPage.decode(want).vmpck(3) == keys[3]
    g = SimpleNamespace(vmpck=(bytes(32), bytes(31), bytes(32), bytes(32)), imi_en=False, gosvw=bytes(16))
    with pytest.raises(LayoutError):
        _secrets(fw, g)  # type: ignore[arg-type]


def test_launch_update_refusals_change_nothing() -> None:
    m = snp_machine()
    lau = SnpLaunch(m)
    assert lau.start() == Status.SUCCESS
    g = _state(m).guests[GCTX]
    ld = g.ld
    from sevemu.abi.snp import SnpLaunchUpdateCmd, SnpLaunchUpdateFlags
    spa = GUEST_BASE + 0x5000

    def upd(**kw: object) -> int:
        flags = kw.pop("flags", SnpLaunchUpdateFlags(page_type=1))
        return call(m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(gctx_paddr=kw.pop("gctx", GCTX), flags=flags,
                                                                        address=kw.pop("address", spa)))[0]

    assert upd() == Status.INVALID_PAGE_STATE  # still the hypervisor's page
    rmpupdate(m, spa, assigned=True, asid=ASID, gpa=0x5000)  # private but mutable: not Pre-Guest
    assert upd() == Status.INVALID_PAGE_STATE
    rmpupdate(m, spa, assigned=False)
    rmpupdate(m, spa, assigned=True, asid=ASID + 1, gpa=0x5000, immutable=True)
    assert upd() == Status.INVALID_PAGE_OWNER
    reclaim(m, spa)
    rmpupdate(m, spa, assigned=True, asid=ASID, gpa=0x5000, immutable=True)
    assert upd(flags=SnpLaunchUpdateFlags(page_type=1, page_size=1)) == Status.INVALID_PAGE_SIZE
    assert upd(flags=SnpLaunchUpdateFlags(page_type=7)) == Status.INVALID_PARAM
    assert upd(flags=SnpLaunchUpdateFlags(page_type=0)) == Status.INVALID_PARAM
    assert upd(address=spa + 0x10) == Status.INVALID_PARAM
    assert upd(gctx=GCTX + PAGE) == Status.INVALID_GUEST
    assert upd(gctx=spa) == Status.INVALID_GUEST  # a guest page is no context
    assert g.ld == ld and m.hv.soc.rmp_entry(spa).state == RmpPageState.PRE_GUEST
    ok(m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(gctx_paddr=GCTX, flags=SnpLaunchUpdateFlags(page_type=1),
                                                          address=spa))
    assert upd() == Status.INVALID_PAGE_STATE  # Guest-Valid now: no second measurement
    assert lau.finish() == Status.SUCCESS
    rmpupdate(m, spa + PAGE, assigned=True, asid=ASID, gpa=0x6000, immutable=True)
    assert upd(address=spa + PAGE) == Status.INVALID_GUEST_STATE  # RUNNING


def test_launch_update_before_activate_is_inactive() -> None:
    m = snp_machine()
    firmware_page(m, GCTX)
    ok(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GCTX))
    from sevemu.abi.snp import SnpLaunchStartCmd, SnpLaunchUpdateCmd, SnpLaunchUpdateFlags
    ok(m, CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd(gctx_paddr=GCTX, policy=POLICY))
    rmpupdate(m, GUEST_BASE, assigned=True, asid=ASID, gpa=0, immutable=True)
    assert call(m, CommandId.SNP_LAUNCH_UPDATE, SnpLaunchUpdateCmd(
        gctx_paddr=GCTX, flags=SnpLaunchUpdateFlags(page_type=1), address=GUEST_BASE))[0] == Status.INACTIVE


def test_cpuid_page_corrected_and_written_back() -> None:
    m = snp_machine()
    lau = SnpLaunch(m)
    assert lau.start() == Status.SUCCESS
    g = _state(m).guests[GCTX]
    ld = g.ld
    bad = SnpCpuidFunction(eax_in=0x8000001F, eax=0xFFFFFFFF, ebx=0x1234)
    fine = SnpCpuidFunction(eax_in=0x4000_0000, eax=0xDEAD)  # hypervisor range: not checked
    page = (2).to_bytes(4, "little") + bytes(12) + bad.encode() + fine.encode()
    lau.update(0x4000, SnpPageType.CPUID, page, expect=Status.INVALID_PARAM)
    spa = GUEST_BASE + 0x4000
    back = m.hv.core.host_read(spa + 0x10, 2 * 0x30)
    fixed = SnpCpuidFunction.decode(back[:0x30])
    allowed = m.hv.soc.cpuid(0x8000001F)
    assert (fixed.eax, fixed.ebx) == (allowed[0], 0x1234 & allowed[1])
    assert SnpCpuidFunction.decode(back[0x30:0x60]).eax == 0xDEAD
    assert g.ld == ld and m.hv.soc.rmp_entry(spa).state == RmpPageState.PRE_GUEST
    # the VMM retries with the corrected page, as QEMU does
    too_many = (65).to_bytes(4, "little") + bytes(12)
    reclaim(m, spa)
    lau.pages.pop()
    lau.update(0x4000, SnpPageType.CPUID, too_many, expect=Status.INVALID_PARAM)
    reclaim(m, spa)
    lau.update(0x4000, SnpPageType.CPUID, page[:0x10] + back)


# ---- ID block, ID authentication -------------------------------------------------------------------
def _pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    from sevemu.abi.snp import EcdsaPublicKey
    qx, qy = ecc.public_key_to_le(key.public_key())
    return EcdsaPublicKey(curve=2, qx=qx, qy=qy).encode()


def _sig(key: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
    from sevemu.abi.snp import EcdsaSignature
    raw = ecc.sign_le(key, msg, hashes.SHA384())
    return EcdsaSignature(r=raw[:72], s=raw[72:]).encode()


def _id_auth(id_key: ec.EllipticCurvePrivateKey, author: ec.EllipticCurvePrivateKey | None, block: bytes) -> bytes:
    page = bytearray(PAGE)
    page[0:4] = (1).to_bytes(4, "little")
    page[4:8] = (1 if author else 0).to_bytes(4, "little")
    page[0x40:0x240] = _sig(id_key, block)
    page[0x240:0x644] = _pub(id_key)
    if author is not None:
        page[0x680:0x880] = _sig(author, _pub(id_key))
        page[0x880:0xC84] = _pub(author)
    return bytes(page)


@pytest.mark.parametrize("case,expect", [
    ("good", Status.SUCCESS), ("ld", Status.BAD_MEASUREMENT), ("policy", Status.POLICY_FAILURE),
    ("sig", Status.BAD_SIGNATURE), ("author_sig", Status.BAD_SIGNATURE), ("algo", Status.INVALID_PARAM),
])
def test_launch_finish_verifies_the_id_block(case: str, expect: Status) -> None:
    m = snp_machine()
    lau, _ = _launch(m)
    g = _state(m).guests[GCTX]
    id_key, author = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    block = IdBlock(ld=bytes(48) if case == "ld" else g.ld, family_id=b"F" * 16, image_id=b"I" * 16, guest_svn=3,
                    policy=POLICY | (1 << 19) if case == "policy" else POLICY).encode()
    auth = bytearray(_id_auth(id_key, author, block))
    if case == "sig":
        auth[0x40] ^= 1
    if case == "author_sig":
        auth[0x680] ^= 1
    if case == "algo":
        auth[0] = 2
    m.hv.core.host_write(SCRATCH, block)
    m.hv.core.host_write(SCRATCH + PAGE, bytes(auth))
    status = lau.finish(id_block_paddr=SCRATCH, id_auth_paddr=SCRATCH + PAGE,
                        flags=SnpLaunchFinishFlags(id_block_en=True, auth_key_en=True), host_data=b"h" * 32)
    assert status == expect
    if expect == Status.SUCCESS:
        assert g.id_key_digest == hashlib.sha384(_pub(id_key)).digest()
        assert g.author_key_digest == hashlib.sha384(_pub(author)).digest()
        assert g.id_block is not None and g.id_block.guest_svn == 3 and g.author_key_en
    else:
        assert g.state == SnpGuestState.LAUNCH and g.host_data == bytes(32) and g.id_block is None


# ---- policy per generation ---------------------------------------------------------------------
@pytest.mark.parametrize("generation,policy,expect", [
    ("milan", POLICY, Status.SUCCESS),
    ("milan", POLICY | 1 << 19 | 1 << 20, Status.SUCCESS),  # DEBUG, SINGLE_SOCKET
    ("milan", 0x10000, Status.POLICY_FAILURE),  # MBO clear
    ("milan", 0x20000, Status.POLICY_FAILURE),  # SMT forbidden on an SMT host
    ("milan", POLICY | 0x0201, Status.POLICY_FAILURE),  # ABI 2.1 > 1.55
    ("milan", POLICY | 0x0137, Status.SUCCESS),  # ABI 1.55
    ("milan", POLICY | 1 << 22, Status.POLICY_FAILURE),  # AES-256-XTS: not on Milan
    ("genoa", POLICY | 1 << 22, Status.SUCCESS),
    ("genoa", POLICY | 1 << 23, Status.POLICY_FAILURE),  # RAPL_DIS needs the platform's RAPL disabled
    ("genoa", POLICY | 1 << 24, Status.POLICY_FAILURE),  # ciphertext hiding: Turin
    ("turin", POLICY | 1 << 25, Status.SUCCESS),  # PAGE_SWAP_DISABLE
    ("turin", POLICY | 1 << 24, Status.POLICY_FAILURE),  # needs SNP_INIT_EX CIPHERTEXT_HIDING_EN
    ("turin", POLICY | 1 << 26, Status.POLICY_FAILURE),  # reserved
    ("milan", POLICY | 1 << 18, Status.SUCCESS),  # MIGRATE_MA allowed without an agent
])
def test_policy_per_generation(generation: str, policy: int, expect: Status) -> None:
    m = snp_machine(generation)
    lau = SnpLaunch(m, policy=policy)
    assert lau.start() == expect
    g = _state(m).guests[GCTX]
    assert g.state == (SnpGuestState.LAUNCH if expect == Status.SUCCESS else SnpGuestState.INIT)


def test_turin_ciphertext_hiding_policy_with_the_platform_flag() -> None:
    m = snp_machine("turin", init=False)
    ok(m, CommandId.SNP_INIT_EX, SnpInitExCmd(flags=SnpInitExFlags(init_rmp=True, ciphertext_hiding_en=True,
                                                                   rapl_dis=True)))
    m.soc.wbinvd_all()
    ok(m, CommandId.SNP_DF_FLUSH)
    assert SnpLaunch(m, policy=POLICY | 1 << 24 | 1 << 23).start() == Status.SUCCESS
    milan = snp_machine("milan", init=False)
    assert call(milan, CommandId.SNP_INIT_EX, SnpInitExCmd(
        flags=SnpInitExFlags(init_rmp=True, ciphertext_hiding_en=True)))[0] == Status.INVALID_PARAM


# ---- teardown, reclaim, ASID reuse, debug ---------------------------------------------------------
def test_decommission_reclaim_and_asid_reuse() -> None:
    m = snp_machine()
    lau, _ = _launch(m)
    assert lau.finish() == Status.SUCCESS
    # the host cannot take pages back while the guest owns them (RMPUPDATE on a mutable guest page works
    # for the hypervisor -- that is how KVM frees memory -- but the context page is immutable)
    assert m.hv.core.rmpupdate_state(GCTX, RmpUpdateState()) == RmpResult.FAIL_PERMISSION
    assert call(m, CommandId.SNP_PAGE_RECLAIM, SnpPageCmd(paddr=GCTX))[0] == Status.INVALID_PAGE_STATE
    ok(m, CommandId.SNP_DECOMMISSION, SnpAddrCmd(address=GCTX))
    assert GCTX not in _state(m).guests
    assert m.hv.soc.rmp_entry(GCTX).state == RmpPageState.FIRMWARE
    assert call(m, CommandId.SNP_DECOMMISSION, SnpAddrCmd(address=GCTX))[0] == Status.INVALID_GUEST
    reclaim(m, GCTX)
    for spa in lau.pages + [VMSA_SPA]:
        huge = m.hv.soc.rmp_entry(spa).page_size == 1
        rmpupdate(m, spa & ~((2 << 20) - 1) if huge else spa, assigned=False, huge=huge)
    # a new guest on the same ASID: WBINVD then SNP_DF_FLUSH first
    lau2 = SnpLaunch(m, gctx=GCTX + PAGE)
    firmware_page(m, lau2.gctx)
    ok(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=lau2.gctx))
    from sevemu.abi.snp import SnpLaunchStartCmd
    ok(m, CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd(gctx_paddr=lau2.gctx, policy=POLICY))
    act = SnpActivateCmd(gctx_paddr=lau2.gctx, asid=ASID)
    assert call(m, CommandId.SNP_ACTIVATE, act)[0] == Status.WBINVD_REQUIRED
    m.soc.wbinvd_all()
    assert call(m, CommandId.SNP_ACTIVATE, act)[0] == Status.DF_FLUSH_REQUIRED
    ok(m, CommandId.SNP_DF_FLUSH)
    ok(m, CommandId.SNP_ACTIVATE, act)
    assert call(m, CommandId.SNP_ACTIVATE, act)[0] == Status.ACTIVE


def test_activate_refuses_an_asid_with_pages_in_the_rmp_and_non_snp_asids() -> None:
    m = snp_machine()
    firmware_page(m, GCTX)
    ok(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GCTX))
    from sevemu.abi.snp import SnpLaunchStartCmd
    ok(m, CommandId.SNP_LAUNCH_START, SnpLaunchStartCmd(gctx_paddr=GCTX, policy=POLICY))
    rmpupdate(m, GUEST_BASE, assigned=True, asid=2, gpa=0)  # a stale page of ASID 2
    assert call(m, CommandId.SNP_ACTIVATE, SnpActivateCmd(gctx_paddr=GCTX, asid=2))[0] == Status.INVALID_CONFIG
    assert call(m, CommandId.SNP_ACTIVATE, SnpActivateCmd(gctx_paddr=GCTX, asid=m.soc.profile.max_asid))[0] \
        == Status.INVALID_ASID  # an SEV (non-ES) ASID
    ok(m, CommandId.SNP_ACTIVATE, SnpActivateCmd(gctx_paddr=GCTX, asid=3))


def test_gctx_create_needs_a_firmware_page() -> None:
    m = snp_machine()
    assert call(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GCTX))[0] == Status.INVALID_PAGE_STATE
    assert call(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GCTX + 8))[0] == Status.INVALID_PARAM
    rmpupdate(m, GUEST_BASE, assigned=True, immutable=True, huge=True)
    assert call(m, CommandId.SNP_GCTX_CREATE, SnpAddrCmd(address=GUEST_BASE))[0] == Status.INVALID_PAGE_SIZE
    assert not _state(m).guests


def test_page_unsmash_rejoins_a_smashed_pre_guest_page() -> None:
    m = snp_machine()
    spa = GUEST_BASE + (4 << 20)
    rmpupdate(m, spa, assigned=True, asid=ASID, gpa=4 << 20, immutable=True, huge=True)
    assert call(m, CommandId.SNP_PAGE_UNSMASH, SnpPageCmd(paddr=spa))[0] == Status.INVALID_PAGE_STATE  # not smashed
    assert m.hv.core.psmash(spa) == RmpResult.SUCCESS
    assert m.hv.soc.rmp_entry(spa + PAGE).page_size == 0
    assert call(m, CommandId.SNP_PAGE_UNSMASH, SnpPageCmd(paddr=spa + PAGE))[0] == Status.INVALID_PARAM
    ok(m, CommandId.SNP_PAGE_UNSMASH, SnpPageCmd(paddr=spa))
    assert m.hv.soc.rmp_entry(spa + PAGE).page_size == 1


def test_dbg_decrypt_needs_the_debug_policy() -> None:
    for policy, expect in ((POLICY, Status.POLICY_FAILURE), (POLICY | 1 << 19, Status.SUCCESS)):
        m = snp_machine()
        _lau, _ = _launch(m, policy)
        out = SCRATCH + 2 * PAGE
        firmware_page(m, out)
        status, _ = call(m, CommandId.SNP_DBG_DECRYPT, SnpDbgCmd(gctx_paddr=GCTX, src_addr=GUEST_BASE, dst_addr=out))
        assert status == expect
        reclaim(m, out)
        got = m.hv.core.host_read(out, 256)
        assert (got == bytes(range(256))) == (expect == Status.SUCCESS)


# ---- the firmware is no confused deputy ------------------------------------------------------------
def test_the_host_cannot_make_the_firmware_write_a_guest_page() -> None:
    """The host names an SNP guest's private page as a legacy command's output, or puts a command
    buffer there: the firmware refuses (INVALID_PAGE_STATE) and the page is unchanged."""
    from sevemu.abi.sev import PdhCertExportCmd
    m = snp_machine()
    ok(m, CommandId.INIT, InitCmd())
    m.soc.wbinvd_all()
    ok(m, CommandId.DF_FLUSH)
    _launch(m)
    victim = GUEST_BASE  # the guest's code page, Guest-Valid
    before = m.soc.mc.read(victim, PAGE, ASID, True)
    status, _ = call(m, CommandId.PDH_CERT_EXPORT, PdhCertExportCmd(pdh_cert_paddr=victim, pdh_cert_len=0x824,
                                                                     certs_paddr=SCRATCH, certs_len=0x2000))
    assert status == Status.INVALID_PAGE_STATE
    from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp
    mbox = m.hv.soc.mailbox
    mbox.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, victim & 0xFFFFFFFF)
    mbox.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, victim >> 32)
    mbox.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(int(CommandId.PLATFORM_STATUS)))
    assert decode_status(mbox.mmio_read(MailboxReg.CMDRESP)) == Status.INVALID_PAGE_STATE
    assert m.soc.mc.read(victim, PAGE, ASID, True) == before and m.firmware.internal_errors == []
