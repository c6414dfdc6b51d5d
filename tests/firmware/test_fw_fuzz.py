"""Robustness fuzz of the legacy SEV firmware through the real mailbox.

Every legacy command id (and ids nobody defined) is issued with random buffers and with mutations of
valid buffers -- fields replaced by interesting or random values, bits flipped, reserved bytes set,
the data the buffer points to corrupted, the buffer address itself moved -- in every platform state
(UNINIT, INIT, WORKING) and with a guest in every state (LUPDATE, LSECRET, RUNNING, SUPDATE, RUPDATE,
SENT, an SEV-ES guest in LUPDATE, and a deactivated guest whose ASID awaits WBINVD and DF_FLUSH),
each reached by valid command sequences.  Invariants:

* the firmware never raises out of the mailbox and always answers a 16-bit status;
* ``Firmware.internal_errors`` stays empty (no handler bug reached the dispatcher's safety net);
* a refused command changes nothing: the firmware's whole state (platform state, guests' state,
  ASID, policy, keys, digests, ASID tables, identity and NV records, memory-controller key slots)
  and memory as the host sees it (DRAM with the host's dirty cache lines merged in, plus the guests'
  dirty lines) are identical before and after -- except the command buffer itself when the answer is
  INVALID_LENGTH (the length query writes the required length back).

Machines in each state are built once and reused while commands are refused (which is asserted to
change nothing); one whose firmware state a successful command changed is rebuilt for the next
example.  The default run stays well under 30 s; ``-m slow`` runs a longer variant and the whole
deterministic sweep (every state x every command x every fixed mutation, valid buffers included).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevemu.abi.certs import KeyUsage, SigAlgo
from sevemu.abi.commands import LEGACY_COMMANDS, CommandId
from sevemu.abi.mailbox import MailboxReg, decode_status, encode_cmdresp, is_response
from sevemu.abi.policy import GuestPolicy
from sevemu.abi.sev import (
    COMMAND_BUFFERS,
    ActivateCmd,
    ActivateExCmd,
    AttestationCmd,
    CopyCmd,
    DbgCmd,
    DownloadFirmwareCmd,
    GetIdCmd,
    GuestStatusCmd,
    HandleCmd,
    InitCmd,
    InitExCmd,
    LaunchStartCmd,
    LaunchUpdateDataCmd,
    PdhCertExportCmd,
    PekCertImportCmd,
    PekCsrCmd,
    PlatformStatus,
    ReceiveStartCmd,
    SendStartCmd,
    TransportCmd,
)
from sevemu.abi.states import GuestState, PlatformState
from sevemu.abi.status import Status
from sevemu.abi.struct import Struct, field_span
from sevemu.abi.vmsa import VMSA_PAGE_SIZE
from sevemu.certs.sev import SevCert
from sevemu.crypto.transport import PacketCrypto
from sevemu.firmware.core import Firmware
from sevemu.firmware.nvstore import NvStore, SealedNv
from sevemu.firmware.ring import RingBuffer
from sevemu.firmware.sev.migrate import seal_data_packet
from sevemu.hypervisor.kvm import Hypervisor
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.secret import package_secret
from sevemu.owner.session import LaunchSession, godh_certificate
from sevemu.scenario import Machine, build_machine

MiB = 1 << 20
DRAM = 96 * MiB
HOST_RESERVED = 32 * MiB
PAGE = 4096
SEV_CERT = 0x824
ALL_IDS = sorted(int(c) for c in LEGACY_COMMANDS)
STATES = ("uninit", "init", "lupdate", "lsecret", "running", "supdate", "sent", "rupdate", "es_lupdate",
          "deactivated")

# owner material shared by every machine (keys only; sessions are sealed per platform)
_OCA_KEY = ec.derive_private_key(0x5EC0CA, ec.SECP384R1())
_OCA_CERT = SevCert.new(KeyUsage.OCA, SigAlgo.ECDSA_SHA256, _OCA_KEY.public_key()).sign_with(
    _OCA_KEY, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
_TARGET_PDH = godh_certificate(ec.derive_private_key(0x7A26E7, ec.SECP384R1()).public_key()).encode()
IMAGE = bytes(range(256)) * 16

# data slots in the PSP driver's bounce area (offsets), each up to 16 KiB
SLOT = {name: i * 0x4000 for i, name in enumerate((
    "out0", "out1", "godh", "session", "hdr", "trans", "target_pdh", "plat_certs", "amd_certs",
    "pek_import", "oca_import", "measure", "report", "dbg_src", "dbg_dst", "send_hdr", "send_trans",
    "recv_pdh", "recv_session", "recv_hdr", "recv_trans", "send_session"))}
NV_OFFSET = 0x60000  # 32 KiB for INIT_EX


# ---- snapshots -----------------------------------------------------------------------------
def norm(x: Any) -> Any:
    """A comparable, hashable rendering of firmware state (raises on a type it does not know)."""
    if x is None or isinstance(x, (bool, int, float, str, bytes)):
        return x
    if isinstance(x, enum.Enum):
        return (type(x).__name__, x.value)
    if isinstance(x, (bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, dict):
        return ("dict", tuple(sorted(((norm(k), norm(v)) for k, v in x.items()), key=repr)))
    if isinstance(x, (list, tuple)):
        return tuple(norm(v) for v in x)
    if isinstance(x, (set, frozenset)):
        return ("set", tuple(sorted((norm(v) for v in x), key=repr)))
    if isinstance(x, NvStore):
        return ("nv", norm(x.read()))
    if isinstance(x, SealedNv):  # the sealed bytes as stored: any write changes them (fresh nonces)
        return ("nv", norm(x.store.read()))
    if hasattr(x, "nv_records") and hasattr(x, "chip_id"):  # PlatformIdentity: its NV image says all
        cached = _IDENTITIES.get(id(x))
        if cached is None or cached[0] is not x:  # immutable: render each identity object once
            cached = _IDENTITIES[id(x)] = (x, ("identity", x.chip_id, norm(x.nv_records()), x.owner_external))
        return cached[1]
    if hasattr(x, "digest") and hasattr(x, "copy"):  # a running hashlib object
        return ("hash", x.copy().digest())
    if isinstance(x, PacketCrypto):  # keyed contexts derived from TEK/TIK: rendered by their keys
        return ("packets", x.tek, x.tik)
    if isinstance(x, RingBuffer):
        return ("ring", norm(x.queues), x.int_on_empty, x.head)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return (type(x).__name__, tuple((f.name, norm(getattr(x, f.name))) for f in dataclasses.fields(x)))
    if isinstance(x, Path):
        return str(x)
    if callable(x):
        return ("callable", getattr(x, "__qualname__", type(x).__name__))
    raise TypeError(f"snapshot: no rendering for {type(x).__name__}")


_FW_SKIP = {"ports", "profile", "log", "internal_errors", "_table"}
_IDENTITIES: dict[int, tuple[Any, Any]] = {}


def fw_snapshot(m: Machine) -> Any:
    fw = m.firmware
    state = {k: norm(v) for k, v in vars(fw).items() if k not in _FW_SKIP}
    slots = m.soc.mc._slots
    return (state, tuple(sorted((asid, id(cipher)) for asid, cipher in slots.items())),
            tuple(sorted(m.soc.mc._valid)))


def mem_snapshot(m: Machine) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """(host view of every populated page, the guests' dirty lines): what software could observe."""
    cache = m.soc.cache
    pages = {pfn: bytearray(page) for pfn, page in m.soc.dram.pages_dict().items()}
    guest_lines: dict[int, bytes] = {}
    for s in cache.sets:
        for key, line in s.items():
            if key not in cache.dirty:
                continue
            if key >> 52:  # an encrypted domain: plaintext of a guest (or host C=1) line
                guest_lines[key] = bytes(line)
                continue
            page = pages.setdefault(key >> 12, bytearray(PAGE))
            page[key & 0xFFF : (key & 0xFFF) + 64] = line
    return {pfn: bytes(p) for pfn, p in pages.items() if any(p)}, guest_lines


def mem_diff(before: dict[int, bytes], after: dict[int, bytes], allowed: tuple[int, int] | None) -> list[str]:
    out = []
    for pfn in sorted(set(before) | set(after)):
        a, b = before.get(pfn, bytes(PAGE)), after.get(pfn, bytes(PAGE))
        if a == b:
            continue
        diff = [pfn * PAGE + i for i in range(PAGE) if a[i] != b[i]]
        if allowed is not None:
            lo, hi = allowed
            diff = [d for d in diff if not lo <= d < hi]
        if diff:
            out.append(f"page {pfn:#x}: {len(diff)} bytes from {diff[0]:#x}")
    return out


# ---- machines in each state -----------------------------------------------------------------
@dataclass
class Rig:
    """A machine driven to one state, and the valid buffers and data of that state."""

    name: str
    m: Machine
    hv: Hypervisor
    handle: int = 0
    asid: int = 0
    image_spa: int = 0
    vmsa_spa: int = 0
    secret_spa: int = 0
    blobs: dict[str, bytes] = field(default_factory=dict)
    written: dict[str, bytes] = field(default_factory=dict)  # what the data slots hold now
    templates: dict[int, Struct | None] = field(default_factory=dict)

    @property
    def fw(self) -> Firmware:
        return self.m.firmware

    def slot(self, name: str) -> int:
        return self.hv.psp.data_spa + SLOT[name]

    @property
    def cbit(self) -> int:
        return self.m.profile.cbit_mask


def _ok(rig: Rig, cmd: CommandId, buf: Struct | None) -> bytes:
    status, out = rig.hv.psp.raw(cmd, None if buf is None else buf.encode())
    assert status == Status.SUCCESS, f"setup {cmd.name}: {Status(status).name}"
    return out


def _put(rig: Rig, name: str, data: bytes) -> int:
    rig.blobs[name] = data
    return rig.hv.psp.put_data(data, SLOT[name])


def _platform_pdh(rig: Rig) -> ec.EllipticCurvePublicKey:
    key = rig.fw.identity.pdh_cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def build_rig(name: str, seed: int) -> Rig:
    es = name == "es_lupdate"
    m = build_machine("milan", seed=f"fuzz-{name}-{seed}", dram_size=DRAM, cache_size=64 << 10, init=False)
    hv = Hypervisor(m.soc.host_view(), host_reserved=HOST_RESERVED)
    rig = Rig(name, m, hv)
    if name != "uninit":
        hv.platform_init(es=es)
        m.soc.wbinvd_all()  # INIT leaves every ASID dirty: WBINVD + DF_FLUSH, as Linux does
        hv.psp.call_nobuf(CommandId.DF_FLUSH)
    ident = rig.fw.identity
    api = (m.profile.api_major, m.profile.api_minor)
    # blobs every state offers (the platform's own chain, an owner-signed PEK, a target PDH)
    pek = ident.pek_csr().sign_with(_OCA_KEY, KeyUsage.OCA, SigAlgo.ECDSA_SHA256)
    _put(rig, "pek_import", pek.encode())
    _put(rig, "oca_import", _OCA_CERT.encode())
    _put(rig, "target_pdh", _TARGET_PDH)
    _put(rig, "plat_certs", ident.cert_chain.encode())
    _put(rig, "amd_certs", ident.amd_chain.encode())
    policy = int(GuestPolicy.ES) if es else 0
    sess = LaunchSession.create(_platform_pdh(rig), policy)
    _put(rig, "godh", sess.godh_cert_blob)
    _put(rig, "session", sess.session_blob)
    recv = LaunchSession.create(_platform_pdh(rig), 0)
    _put(rig, "recv_pdh", recv.godh_cert_blob)
    _put(rig, "recv_session", recv.session_blob)
    hdr, trans = seal_data_packet(recv.keys, IMAGE, iv=bytes(range(16)))
    _put(rig, "recv_hdr", hdr.encode())
    _put(rig, "recv_trans", trans)
    _put(rig, "dbg_src", IMAGE[:64])

    vm_pages = [hv.pages.alloc() for _ in range(3)]
    rig.image_spa, rig.secret_spa, recv_page = vm_pages
    rig.vmsa_spa = hv.tables.alloc()
    hv.core.host_write(rig.image_spa, IMAGE)
    hv.core.host_write(rig.vmsa_spa, bytes(VMSA_PAGE_SIZE))
    if name in ("lupdate", "lsecret", "running", "supdate", "sent", "es_lupdate", "deactivated"):
        start = LaunchStartCmd(policy=policy, dh_cert_paddr=rig.slot("godh"), dh_cert_len=SEV_CERT,
                               session_paddr=rig.slot("session"), session_len=0x80)
        rig.handle = LaunchStartCmd.decode(_ok(rig, CommandId.LAUNCH_START, start)).handle
        rig.asid = m.profile.es_asids()[0] if es else m.profile.sev_asids()[0]
        _ok(rig, CommandId.ACTIVATE, ActivateCmd(handle=rig.handle, asid=rig.asid))
        hv.core.clflush_range(rig.image_spa, PAGE)
        _ok(rig, CommandId.LAUNCH_UPDATE_DATA, LaunchUpdateDataCmd(handle=rig.handle, paddr=rig.image_spa,
                                                                   len=PAGE))
    if es:  # one VMSA set up already: the guest has a checksum block in the TMR
        first_vmsa = hv.tables.alloc()
        hv.core.host_write(first_vmsa, bytes(VMSA_PAGE_SIZE))
        hv.core.clflush_range(first_vmsa, VMSA_PAGE_SIZE)
        _ok(rig, CommandId.LAUNCH_UPDATE_VMSA, LaunchUpdateDataCmd(handle=rig.handle, paddr=first_vmsa,
                                                                   len=VMSA_PAGE_SIZE))
        assert len(rig.fw.guests[rig.handle].vmsas) == 1
    measure = bytes(32)
    if name in ("lsecret", "running", "supdate", "sent", "deactivated"):
        _ok(rig, CommandId.LAUNCH_MEASURE, LaunchUpdateDataCmd(handle=rig.handle, paddr=rig.slot("measure"),
                                                               len=0x30))
        blob = rig.hv.psp.get_data(0x30, SLOT["measure"])
        measured = sess.verify_measurement(blob, api_major=api[0], api_minor=api[1],
                                           build=m.profile.build, expected_ld=expected_launch_digest([IMAGE]))
        measure = measured.measure
        packet = measured.launch_secret_raw(b"fuzz secret, 32 bytes long ....!")
    else:
        packet = package_secret(sess.keys, b"fuzz secret, 32 bytes long ....!", measure=measure,
                                api_major=api[0], api_minor=api[1])
    _put(rig, "hdr", packet.header_bytes)
    _put(rig, "trans", packet.trans)
    if name in ("running", "supdate", "sent", "deactivated"):
        _ok(rig, CommandId.LAUNCH_SECRET, _secret_cmd(rig, packet.guest_len))
        _ok(rig, CommandId.LAUNCH_FINISH, HandleCmd(handle=rig.handle))
    if name == "deactivated":  # ASID unbound, no WBINVD since: its reuse needs WBINVD and DF_FLUSH
        _ok(rig, CommandId.DEACTIVATE, HandleCmd(handle=rig.handle))
    if name in ("supdate", "sent"):
        _ok(rig, CommandId.SEND_START, _send_start(rig))
    if name == "sent":
        m.soc.wbinvd_all()
        _ok(rig, CommandId.SEND_UPDATE_DATA, _send_update(rig, rig.image_spa))
        _ok(rig, CommandId.SEND_FINISH, HandleCmd(handle=rig.handle))
    if name == "rupdate":
        out = _ok(rig, CommandId.RECEIVE_START, _receive_start(rig))
        rig.handle = ReceiveStartCmd.decode(out).handle
        rig.asid = m.profile.sev_asids()[0]
        _ok(rig, CommandId.ACTIVATE, ActivateCmd(handle=rig.handle, asid=rig.asid))
        rig.image_spa = recv_page
    rig.templates = templates(rig, len(packet.trans))
    expected = {"uninit": PlatformState.UNINIT, "init": PlatformState.INIT}.get(name, PlatformState.WORKING)
    assert rig.fw.state == expected
    if rig.handle:
        want = {"lupdate": GuestState.LUPDATE, "es_lupdate": GuestState.LUPDATE, "lsecret": GuestState.LSECRET,
                "running": GuestState.RUNNING, "supdate": GuestState.SUPDATE, "sent": GuestState.SENT,
                "rupdate": GuestState.RUPDATE, "deactivated": GuestState.RUNNING}[name]
        assert rig.fw.guests[rig.handle].state == want
    assert not rig.fw.internal_errors
    return rig


def _secret_cmd(rig: Rig, length: int) -> TransportCmd:
    return TransportCmd(handle=rig.handle, hdr_paddr=rig.slot("hdr"), hdr_len=0x34,
                        guest_paddr=rig.secret_spa | rig.cbit, guest_len=length, trans_paddr=rig.slot("trans"),
                        trans_len=length)


def _send_start(rig: Rig) -> SendStartCmd:
    return SendStartCmd(handle=rig.handle, pdh_cert_paddr=rig.slot("target_pdh"), pdh_cert_len=SEV_CERT,
                        plat_certs_paddr=rig.slot("plat_certs"), plat_certs_len=len(rig.blobs["plat_certs"]),
                        amd_certs_paddr=rig.slot("amd_certs"), amd_certs_len=len(rig.blobs["amd_certs"]),
                        session_paddr=rig.slot("send_session"), session_len=0x80)


def _send_update(rig: Rig, spa: int) -> TransportCmd:
    return TransportCmd(handle=rig.handle, hdr_paddr=rig.slot("send_hdr"), hdr_len=0x34,
                        guest_paddr=spa | rig.cbit, guest_len=PAGE, trans_paddr=rig.slot("send_trans"),
                        trans_len=PAGE)


def _receive_start(rig: Rig) -> ReceiveStartCmd:
    return ReceiveStartCmd(policy=0, pdh_cert_paddr=rig.slot("recv_pdh"), pdh_cert_len=SEV_CERT,
                           session_paddr=rig.slot("recv_session"), session_len=0x80)


def templates(rig: Rig, secret_len: int) -> dict[int, Struct | None]:
    """A valid (or the most plausible) buffer of every legacy command in this rig's state."""
    h, s = rig.handle, rig.slot
    nv = rig.hv.psp.data_spa + NV_OFFSET
    t: dict[int, Struct | None] = {
        CommandId.INIT: (InitCmd(options=1, tmr_paddr=rig.hv.tmr_spa, tmr_len=MiB) if rig.name == "es_lupdate"
                         else InitCmd()),
        CommandId.SHUTDOWN: None,
        CommandId.PLATFORM_RESET: None,
        CommandId.PLATFORM_STATUS: PlatformStatus(),
        CommandId.PEK_GEN: None,
        CommandId.PEK_CSR: PekCsrCmd(csr_paddr=s("out0"), csr_len=SEV_CERT),
        CommandId.PEK_CERT_IMPORT: PekCertImportCmd(pek_cert_paddr=s("pek_import"), pek_cert_len=SEV_CERT,
                                                    oca_cert_paddr=s("oca_import"), oca_cert_len=SEV_CERT),
        CommandId.PDH_CERT_EXPORT: PdhCertExportCmd(pdh_cert_paddr=s("out0"), pdh_cert_len=SEV_CERT,
                                                    certs_paddr=s("out1"), certs_len=3 * SEV_CERT),
        CommandId.PDH_GEN: None,
        CommandId.DF_FLUSH: None,
        CommandId.DOWNLOAD_FIRMWARE: DownloadFirmwareCmd(fw_paddr=s("out0"), fw_len=PAGE),
        CommandId.GET_ID: GetIdCmd(id_paddr=s("out0"), id_len=64),
        CommandId.INIT_EX: InitExCmd(nv_paddr=nv, nv_len=32 << 10),
        CommandId.NOP: None,
        CommandId.RING_BUFFER: None,
        CommandId.DECOMMISSION: HandleCmd(handle=h),
        CommandId.ACTIVATE: ActivateCmd(handle=h, asid=rig.asid or rig.m.profile.sev_asids()[0]),
        CommandId.DEACTIVATE: HandleCmd(handle=h),
        CommandId.GUEST_STATUS: GuestStatusCmd(handle=h),
        CommandId.COPY: CopyCmd(handle=h, len=64, src_paddr=rig.image_spa, dst_paddr=rig.secret_spa),
        CommandId.ACTIVATE_EX: ActivateExCmd(handle=h, asid=rig.asid or 1),
        CommandId.LAUNCH_START: LaunchStartCmd(policy=0, dh_cert_paddr=s("godh"), dh_cert_len=SEV_CERT,
                                               session_paddr=s("session"), session_len=0x80),
        CommandId.LAUNCH_UPDATE_DATA: LaunchUpdateDataCmd(handle=h, paddr=rig.image_spa, len=PAGE),
        CommandId.LAUNCH_UPDATE_VMSA: LaunchUpdateDataCmd(handle=h, paddr=rig.vmsa_spa, len=VMSA_PAGE_SIZE),
        CommandId.LAUNCH_MEASURE: LaunchUpdateDataCmd(handle=h, paddr=s("measure"), len=0x30),
        CommandId.LAUNCH_SECRET: _secret_cmd(rig, secret_len),
        CommandId.LAUNCH_FINISH: HandleCmd(handle=h),
        CommandId.ATTESTATION: AttestationCmd(handle=h, paddr=s("report"), mnonce=bytes(range(16)), len=0xD0),
        CommandId.SEND_START: _send_start(rig),
        CommandId.SEND_UPDATE_DATA: _send_update(rig, rig.image_spa),
        CommandId.SEND_UPDATE_VMSA: _send_update(rig, rig.vmsa_spa),
        CommandId.SEND_FINISH: HandleCmd(handle=h),
        CommandId.SEND_CANCEL: HandleCmd(handle=h),
        CommandId.RECEIVE_START: _receive_start(rig),
        CommandId.RECEIVE_UPDATE_DATA: TransportCmd(
            handle=h, hdr_paddr=s("recv_hdr"), hdr_len=0x34, guest_paddr=rig.image_spa | rig.cbit,
            guest_len=len(IMAGE), trans_paddr=s("recv_trans"), trans_len=len(IMAGE)),
        CommandId.RECEIVE_UPDATE_VMSA: TransportCmd(
            handle=h, hdr_paddr=s("recv_hdr"), hdr_len=0x34, guest_paddr=rig.vmsa_spa | rig.cbit,
            guest_len=len(IMAGE), trans_paddr=s("recv_trans"), trans_len=len(IMAGE)),
        CommandId.RECEIVE_FINISH: HandleCmd(handle=h),
        CommandId.DBG_DECRYPT: DbgCmd(handle=h, src_paddr=rig.image_spa | rig.cbit, dst_paddr=s("dbg_dst"), len=64),
        CommandId.DBG_ENCRYPT: DbgCmd(handle=h, src_paddr=s("dbg_src"), dst_paddr=rig.image_spa | rig.cbit, len=64),
        CommandId.SWAP_OUT: None,
        CommandId.SWAP_IN: None,
    }
    missing = [c for c in LEGACY_COMMANDS if c not in t]
    assert not missing, f"no template for {missing}"
    return {int(k): v for k, v in t.items()}


class Rigs:
    """One reusable rig per state; rebuilt when a command changed its firmware state."""

    def __init__(self) -> None:
        self._rigs: dict[str, Rig] = {}
        self.builds = 0

    def get(self, name: str) -> Rig:
        rig = self._rigs.get(name)
        if rig is None:
            self.builds += 1
            rig = self._rigs[name] = build_rig(name, self.builds)
        return rig

    def spoil(self, name: str) -> None:
        rig = self._rigs.pop(name, None)
        if rig is not None:
            rig.m.firmware.close()


_RIGS = Rigs()


# ---- one fuzzed command --------------------------------------------------------------------
def interesting_values(rig: Rig, size: int) -> list[int]:
    dram = rig.m.soc.dram.size
    vals = [0, 1, 2, 0x10, 0x30, 0x34, 0x80, 0x824, 0x186C, PAGE - 1, PAGE, PAGE + 16, 0x5000, 0x7FFF,
            rig.handle, rig.handle + 1, rig.asid, rig.asid + 1, rig.m.profile.max_asid,
            rig.m.profile.max_asid + 1, rig.image_spa, rig.image_spa + 8, rig.image_spa | rig.cbit,
            rig.secret_spa, rig.vmsa_spa, rig.slot("out0"), rig.hv.psp.buffer_spa, dram - 16, dram - PAGE, dram,
            dram + PAGE, 1 << 47, rig.cbit, (1 << 64) - 1, (1 << 32) - 1, (1 << 31), 0xFFFF]
    return [v & ((1 << (8 * size)) - 1) for v in vals]


@dataclass(frozen=True)
class Case:
    state: str
    command: int
    mode: str  # "valid", "mutate", "random"
    mutations: tuple[tuple[str, int, int], ...] = ()
    raw: bytes = b""
    paddr: int | None = None  # None: the driver's command buffer


def apply(rig: Rig, case: Case) -> tuple[bytes | None, dict[str, bytes]]:
    """The command buffer bytes and the data blobs for ``case`` (blob mutations applied)."""
    blobs = dict(rig.blobs)
    tmpl = rig.templates.get(case.command)
    cls = COMMAND_BUFFERS.get(CommandId(case.command)) if case.command in ALL_IDS else None
    if case.mode == "random":
        return case.raw, blobs
    if tmpl is None:
        buf = bytearray(cls.SIZE) if cls is not None else None
    else:
        buf = bytearray(tmpl.encode())
    names = sorted(blobs)
    for kind, a, b in case.mutations:
        if kind == "field" and tmpl is not None:
            fields = [f.name for f in dataclasses.fields(tmpl)]
            off, size = field_span(type(tmpl), fields[a % len(fields)])
            vals = interesting_values(rig, size)
            value = vals[b % len(vals)] if b < 1 << 20 else b & ((1 << (8 * size)) - 1)
            assert buf is not None
            buf[off : off + size] = value.to_bytes(size, "little")
        elif kind == "flip" and buf:
            buf[a % len(buf)] ^= 1 << (b % 8)
        elif kind == "byte" and buf:
            buf[a % len(buf)] = b & 0xFF
        elif kind == "blob" and names:
            name = names[a % len(names)]
            data = bytearray(blobs[name])
            if data:
                data[b % len(data)] ^= 1 << (b >> 16) % 8
            blobs[name] = bytes(data)
        elif kind == "truncate" and names:
            name = names[a % len(names)]
            blobs[name] = blobs[name][: b % (len(blobs[name]) + 1)]
    return (bytes(buf) if buf is not None else None), blobs


def issue(rig: Rig, case: Case) -> tuple[int, Any, Any]:
    """Write the blobs and the buffer as the host, snapshot, ring the mailbox, snapshot."""
    buf, blobs = apply(rig, case)
    psp = rig.hv.psp
    for name, data in blobs.items():  # (re)write what differs from what memory holds
        clean = rig.blobs[name]
        data = data.ljust(len(clean), b"\0") if len(data) < len(clean) else data
        if rig.written.get(name) != data:
            psp.put_data(data, SLOT[name])
            rig.written[name] = data
    paddr = 0
    if buf is not None:
        rig.hv.core.host_write(psp.buffer_spa, buf)
        paddr = psp.buffer_spa
    if case.paddr is not None:
        paddr = case.paddr
    fw_before, (mem_before, lines_before) = fw_snapshot(rig.m), mem_snapshot(rig.m)
    dev = rig.m.soc.psp
    dev.mmio_write(MailboxReg.CMDBUFF_ADDR_LO, paddr & 0xFFFFFFFF)
    dev.mmio_write(MailboxReg.CMDBUFF_ADDR_HI, (paddr >> 32) & 0xFFFFFFFF)
    dev.mmio_write(MailboxReg.CMDRESP, encode_cmdresp(case.command))
    reg = dev.mmio_read(MailboxReg.CMDRESP)
    assert is_response(reg), f"no answer to {case}"
    status = decode_status(reg)
    assert 0 <= status <= 0xFFFF
    assert not rig.fw.internal_errors, f"{case}:\n" + "\n".join(rig.fw.internal_errors)
    fw_after = fw_snapshot(rig.m)
    if status == Status.SUCCESS:
        rig.written.clear()  # outputs may have landed anywhere: rewrite every blob next time
        if fw_after != fw_before:
            _RIGS.spoil(rig.name)
        return status, None, None
    assert fw_after == fw_before, f"refused {case} ({Status(status).name}) changed the firmware state"
    mem_after, lines_after = mem_snapshot(rig.m)
    allowed = None
    cls = COMMAND_BUFFERS.get(CommandId(case.command)) if case.command in ALL_IDS else None
    if status == Status.INVALID_LENGTH and cls is not None:
        spa = paddr & ~rig.cbit
        allowed = (spa, spa + cls.SIZE)
    diff = mem_diff(mem_before, mem_after, allowed)
    assert not diff, f"refused {case} ({Status(status).name}) changed memory: {diff[:4]}"
    assert lines_after == lines_before, f"refused {case} ({Status(status).name}) changed guest cache lines"
    return status, fw_before, mem_before


# ---- strategies ----------------------------------------------------------------------------
def cases(states: tuple[str, ...] = STATES) -> st.SearchStrategy[Case]:
    mutation = st.tuples(st.sampled_from(("field", "field", "field", "flip", "byte", "blob", "truncate")),
                         st.integers(0, 1 << 12), st.one_of(st.integers(0, 63), st.integers(0, (1 << 64) - 1)))
    paddrs = st.one_of(st.none(), st.none(), st.none(),
                       st.sampled_from((0, 1, 0x100008, DRAM - 8, DRAM, 1 << 51, (1 << 64) - 1)),
                       st.integers(0, (1 << 64) - 1))
    command = st.one_of(st.sampled_from(ALL_IDS), st.integers(0, 0x7F), st.integers(0x80, 0x7FF))
    return st.builds(
        Case,
        state=st.sampled_from(states),
        command=command,
        mode=st.sampled_from(("valid", "mutate", "mutate", "mutate", "random")),
        mutations=st.lists(mutation, min_size=1, max_size=4).map(tuple),
        raw=st.binary(min_size=0, max_size=0x44),
        paddr=paddrs,
    ).map(lambda c: dataclasses.replace(c, mutations=()) if c.mode == "valid" else c)


def run_case(case: Case) -> int:
    rig = _RIGS.get(case.state)
    status, _, _ = issue(rig, case)
    return status


@settings(max_examples=int(os.environ.get("SEVEMU_FUZZ_EXAMPLES", "300")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzz_firmware_commands(case: Case) -> None:
    run_case(case)


@pytest.mark.slow
@settings(max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_fuzz_firmware_commands_long(case: Case) -> None:
    run_case(case)


# ---- deterministic sweep: every state x every command ----------------------------------------
_FIXED: tuple[tuple[str, tuple[tuple[str, int, int], ...], int | None], ...] = (
    ("handle 0", (("field", 0, 0),), None),
    ("first field huge", (("field", 0, 1 << 63),), None),
    ("second field interesting", (("field", 1, 26),), None),
    ("third field beyond DRAM", (("field", 2, 31),), None),
    ("last byte set", (("byte", (1 << 12) - 1, 0xA5),), None),
    ("blob bit flip", (("blob", 3, 77 | 5 << 16),), None),
    ("blob truncated", (("truncate", 2, 100),), None),
    ("buffer outside DRAM", (("flip", 0, 0),), DRAM + PAGE),
    ("buffer with the C-bit", (("flip", 4, 3),), None),
)


_QUICK = ("handle 0", "third field beyond DRAM", "last byte set", "buffer outside DRAM", "blob bit flip")


def _sweep(states: tuple[str, ...], with_valid: bool, fixed: tuple[str, ...] | None = None) -> dict[str, int]:
    seen: dict[str, int] = {}
    chosen = [f for f in _FIXED if fixed is None or f[0] in fixed]
    rng = random.Random(0x5EED)
    for state in states:
        for command in ALL_IDS + [0x00, 0x1F, 0x7F]:
            if command in COMMAND_BUFFERS:
                variants = [Case(state, command, "mutate", muts, paddr=p) for _, muts, p in chosen]
                size = COMMAND_BUFFERS[CommandId(command)].SIZE
            else:  # no buffer to mutate: only where the address points and what lies there
                variants = [Case(state, command, "mutate", (), paddr=DRAM + PAGE)]
                size = 0x44
            variants.append(Case(state, command, "random", raw=rng.randbytes(size)))
            if with_valid:
                variants.append(Case(state, command, "valid"))
            for case in variants:
                status = run_case(case)
                key = f"{state}:{command:#x}:{Status(status).name if status in Status._value2member_map_ else status}"
                seen[key] = seen.get(key, 0) + 1
    return seen


def test_sweep_every_state_and_command() -> None:
    """Each (state, command) pair sees some of the fixed mutations and a random buffer."""
    seen = _sweep(STATES, with_valid=False, fixed=_QUICK)
    assert len({k.rsplit(":", 1)[0] for k in seen}) == len(STATES) * (len(ALL_IDS) + 3)


@pytest.mark.slow
def test_sweep_with_valid_buffers() -> None:
    """Every fixed mutation, plus each state's valid buffer (state-changing successes rebuild)."""
    _sweep(STATES, with_valid=True)


def test_every_state_is_reachable() -> None:
    for name in STATES:
        rig = build_rig(name, 0)
        assert rig.templates.keys() >= set(ALL_IDS)


def test_refusals_are_seen() -> None:
    """Sanity: the harness does detect a change (a successful state change spoils the rig)."""
    rig = build_rig("lupdate", 99)
    _RIGS._rigs["probe"] = rig
    rig.name = "probe"
    status, _, _ = issue(rig, Case("probe", int(CommandId.LAUNCH_MEASURE), "valid"))
    assert status == Status.SUCCESS
    assert "probe" not in _RIGS._rigs  # the measure moved the guest to LSECRET: rebuilt next time


def test_the_harness_catches_a_sloppy_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler that changes state before refusing, or that crashes, fails the invariants."""
    from sevemu.errors import FirmwareError
    from sevemu.firmware.core import Entry

    def sloppy(fw: Firmware, _: Struct | None) -> None:
        fw.next_handle += 1
        raise FirmwareError(Status.INVALID_PARAM, "changed something first")

    def crashing(fw: Firmware, _: Struct | None) -> None:
        raise KeyError("a bug")

    rig = build_rig("init", 7)
    rig.name = "harness"
    nop = int(CommandId.NOP)
    for handler, message in ((sloppy, "changed the firmware state"), (crashing, "KeyError")):
        monkeypatch.setitem(rig.fw._table, nop, Entry(CommandId.NOP, "test", None, frozenset(PlatformState),
                                                      None, True, handler))
        with pytest.raises(AssertionError, match=message):
            issue(rig, Case("harness", nop, "valid"))
        rig.fw.internal_errors.clear()


# ---- the allowed-state table -----------------------------------------------------------------
_U, _I, _W = PlatformState.UNINIT, PlatformState.INIT, PlatformState.WORKING
_ANY = frozenset({_U, _I, _W})
_READY = frozenset({_I, _W})
_EVERY_GUEST = frozenset(GuestState) - {GuestState.UNINIT}
_G = GuestState
ALLOWED: dict[CommandId, tuple[frozenset[PlatformState], frozenset[GuestState] | None]] = {
    # SEV API 55766 ch. 5 (platform state machine); AMD-ASPFW sev_mcmd.c where the spec is silent
    CommandId.INIT: (frozenset({_U}), None),
    CommandId.INIT_EX: (frozenset({_U}), None),
    CommandId.SHUTDOWN: (_READY, None),
    CommandId.PLATFORM_RESET: (frozenset({_U}), None),
    CommandId.PLATFORM_STATUS: (_ANY, None),
    CommandId.PEK_GEN: (frozenset({_I}), None),
    CommandId.PEK_CSR: (_READY, None),
    CommandId.PEK_CERT_IMPORT: (frozenset({_I}), None),
    CommandId.PDH_GEN: (_READY, None),
    CommandId.PDH_CERT_EXPORT: (_READY, None),
    CommandId.DF_FLUSH: (_READY, None),
    CommandId.GET_ID: (_ANY, None),
    # SEV API 55766 ch. 6 (GSTATE); AF for ACTIVATE (not SENT), ATTESTATION and DBG (no state)
    CommandId.ACTIVATE: (_READY, _EVERY_GUEST - {_G.SENT}),
    CommandId.DEACTIVATE: (_READY, _EVERY_GUEST),
    CommandId.DECOMMISSION: (_READY, _EVERY_GUEST),
    CommandId.GUEST_STATUS: (_READY, _EVERY_GUEST),
    CommandId.LAUNCH_START: (_READY, None),
    CommandId.LAUNCH_UPDATE_DATA: (_READY, frozenset({_G.LUPDATE})),
    CommandId.LAUNCH_UPDATE_VMSA: (_READY, frozenset({_G.LUPDATE})),
    CommandId.LAUNCH_MEASURE: (_READY, frozenset({_G.LUPDATE})),
    CommandId.LAUNCH_SECRET: (_READY, frozenset({_G.LSECRET})),
    CommandId.LAUNCH_FINISH: (_READY, frozenset({_G.LSECRET})),
    CommandId.ATTESTATION: (_READY, frozenset({_G.LSECRET, _G.RUNNING, _G.SUPDATE, _G.SENT})),
    CommandId.SEND_START: (_READY, frozenset({_G.RUNNING})),
    CommandId.SEND_UPDATE_DATA: (_READY, frozenset({_G.SUPDATE})),
    CommandId.SEND_UPDATE_VMSA: (_READY, frozenset({_G.SUPDATE})),
    CommandId.SEND_FINISH: (_READY, frozenset({_G.SUPDATE})),
    CommandId.SEND_CANCEL: (_READY, frozenset({_G.SUPDATE})),
    CommandId.RECEIVE_START: (_READY, None),
    CommandId.RECEIVE_UPDATE_DATA: (_READY, frozenset({_G.RUPDATE})),
    CommandId.RECEIVE_UPDATE_VMSA: (_READY, frozenset({_G.RUPDATE})),
    CommandId.RECEIVE_FINISH: (_READY, frozenset({_G.RUPDATE})),
    CommandId.DBG_DECRYPT: (_READY, _EVERY_GUEST),
    CommandId.DBG_ENCRYPT: (_READY, _EVERY_GUEST),
    CommandId.RING_BUFFER: (_READY, None),  # AF sev_mcmd_ring_buffer: SEV INIT or WORKING
}
"""What the spec and AMD's firmware allow, written here independently of the firmware's tables."""


def test_the_firmware_declares_the_allowed_state_table() -> None:
    rig = _RIGS.get("init")
    declared = {CommandId(cid): (e.platform_states, e.guest_states) for cid, e in rig.fw.commands.items()
                if e.api == "SEV"}  # the SNP API keeps its own platform state (test_fw_snp_fuzz.py)
    assert declared == ALLOWED


def _expected_refusal(rig: Rig, command: CommandId) -> Status | None:
    platform_states, guest_states = ALLOWED[command]
    if rig.fw.state not in platform_states:
        return Status.INVALID_PLATFORM_STATE
    if guest_states is not None and rig.handle and rig.fw.guests[rig.handle].state not in guest_states:
        return Status.INVALID_GUEST_STATE
    return None


@pytest.mark.parametrize("state", STATES)
def test_commands_outside_their_allowed_states_are_refused(state: str) -> None:
    """Every command, with the valid buffer of the state, outside its allowed platform or guest
    states answers INVALID_PLATFORM_STATE / INVALID_GUEST_STATE and changes nothing (``issue``)."""
    refused = 0
    for command in sorted(ALLOWED):
        rig = _RIGS.get(state)
        want = _expected_refusal(rig, command)
        if want is None:
            continue
        status = run_case(Case(state, int(command), "valid"))
        assert status == want, f"{state}: {command.name} answered {Status(status).name}, expected {want.name}"
        refused += 1
    assert refused  # every state has commands it refuses


@pytest.mark.slow
@pytest.mark.parametrize("state", STATES)
def test_commands_inside_their_allowed_states_are_not_refused_for_the_state(state: str) -> None:
    for command in sorted(ALLOWED):
        rig = _RIGS.get(state)
        if _expected_refusal(rig, command) is not None:
            continue
        status = run_case(Case(state, int(command), "valid"))
        assert status not in (Status.INVALID_PLATFORM_STATE, Status.INVALID_GUEST_STATE), \
            f"{state}: {command.name} answered {Status(status).name}"
