"""``sevemu vmm``: the host's VMM for one SEV guest, as QEMU runs it for an owner who attests it
(QEMU ``-object sev-guest,policy=P,dh-cert-file=GODH,session-file=SESSION`` with ``-S`` and QMP;
QEMU ``target/i386/sev.c``; Linux Documentation/virt/kvm/x86/amd-memory-encryption.rst).

A long-running process, like QEMU:

1. checks every option and input first (the owner's base64 GODH certificate and session buffer,
   the image, the placement, the output paths, the timeout) -- nothing runs before;
2. boots the platform from its directory, then ``KVM_SEV_INIT``, ``KVM_SEV_LAUNCH_START`` with the
   owner's GODH and session, ``KVM_SEV_LAUNCH_UPDATE_DATA`` of the image (padded to whole pages:
   :func:`sevemu.owner.measurement.padded_image`), then of the guest's program table
   (:data:`GUEST_PROGRAM_TABLE`, one page at the top of guest memory), ``KVM_SEV_LAUNCH_MEASURE``;
3. publishes the measurement -- ``--launch-measure-blob FILE`` gets it in base64 (what QEMU's
   ``query-sev-launch-measure`` returns and sevctl reads), and QMP answers
   ``query-sev-launch-measure`` -- then waits, at most ``--timeout`` seconds, for the owner's secret:
   the files ``--secret-header`` and ``--secret-payload`` (sevctl ``secret build`` output) to appear,
   or commands on the QMP socket ``--qmp PATH``;
4. ``KVM_SEV_LAUNCH_SECRET`` into the guest's secret area, ``KVM_SEV_LAUNCH_FINISH`` (QMP ``cont``,
   or as soon as the secret files were injected), and runs the guest, which reads its secret area
   and prints what it finds; the host's read of the same GPA shows ciphertext.

Without ``--qmp`` and without secret files the guest is finished and run right after the
measurement (QEMU without ``-S``).  No secret within the timeout: the guest is destroyed without
running, exit status 1.

QMP (a UNIX socket; one JSON object per line each way; QEMU's greeting and ``qmp_capabilities``
handshake): ``query-sev`` (api-major, api-minor, build-id, policy, state, handle),
``query-sev-launch-measure`` (``data``: base64), ``query-sev-capabilities`` (``pdh``, ``cert-chain``,
``cbitpos``, ``reduced-phys-bits``), ``sev-inject-launch-secret`` (``packet-header``, ``secret``:
base64; ``gpa`` optional), ``query-sev-attestation-report`` (``mnonce`` base64 -> ``data``), ``cont``,
``quit``.  Errors are ``{"error": {"class": "GenericError", "desc": ...}}``.  ``sevemu qmp SOCKET
COMMAND [NAME=VALUE ...]`` is a small client (``NAME=@FILE`` sends the file in base64).

Guest memory layout (model choices, checked before anything runs): the image at ``--firmware-gpa``
(default 0x100000), below 4 GiB as a VMM maps firmware; the guest model keeps its page tables from GPA 0x10000 (the image must not
overlap them); the secret area is the image's OVMF SEV secret block when it has one (QEMU's default
``gpa``), else one page placed after the image and the page tables (OVMF's secret area is one 4 KiB
page too).  A secret larger than that area, or than the 16 KiB KVM copies, is refused with the
limit named.

:class:`SevVmm` is also the host half of the guided ``sevemu launch``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import select
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sevemu._util.units import PAGE, PAGE_2M, GiB, KiB, MiB, align_up
from sevemu.abi.certs import SEV_CERT_SIZE
from sevemu.abi.pycode import code_table
from sevemu.abi.sev import MeasureBuf, SessionBuf
from sevemu.abi.states import GuestState
from sevemu.cli.common import (
    Outputs,
    Platform,
    add_platform_args,
    emit,
    host_memory,
    open_platform,
    parse_int,
    read_blob,
    read_file,
    seconds,
)
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.errors import FileFormatError, InputError, LayoutError, SevemuError
from sevemu.guest.paging import PageTableBuilder
from sevemu.guest.workloads import read_back
from sevemu.hw.pyengine import PyEngine
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevAttestationReport,
    KvmSevCmdId,
    KvmSevGuestStatus,
    KvmSevInit,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmVmType,
    load_image,
)
from sevemu.hypervisor.sevdev import SEV_FW_BLOB_MAX_SIZE, IoctlError
from sevemu.hypervisor.vcpu import BSP_RESET_EIP, CPU_MODELS, HOST_CPU
from sevemu.owner.measurement import padded_image
from sevemu.owner.ovmf import sev_es_reset_eip, sev_secret_area
from sevemu.owner.secret import parse_secret_table

__all__ = ["MAX_VCPUS", "GuestLayout", "Reporter", "SevVmm", "VcpuConfig", "plan_layout", "register"]

IMAGE_GPA = 0x10_0000
GUEST_TABLES_GPA = 0x1_0000
"""Where the guest model builds its page tables (:func:`sevemu.guest.kernel.boot`)."""
MIN_MEMORY = 16 * MiB
LOAD_CHUNK = 4 * MiB
"""LAUNCH_UPDATE_DATA is issued in chunks of this size (one KVM sub-command each; the launch digest
is one running hash, so it does not depend on the chunking); progress is shown per chunk."""
DEFAULT_TIMEOUT = 300.0
FIRMWARE_LIMIT = 4 * GiB
"""Guest firmware and its secret area lie below 4 GiB (QEMU maps the flash there; OVMF's GUIDed table
gives 32-bit addresses)."""
HEADER_SIZE = 0x34
MAX_VCPUS = 64
"""``-smp`` takes 1..MAX_VCPUS (a model choice: each vCPU of an SEV-ES guest is one more VMSA)."""


@dataclass(frozen=True)
class VcpuConfig:
    """The vCPUs and the KVM VM type of the guest (QEMU ``-cpu``, ``-smp``, ``sev-guest``'s
    ``legacy-vm-type``).  An SEV-ES guest (policy ES bit) is a ``KVM_X86_SEV_ES_VM`` made a guest
    with ``KVM_SEV_INIT2``, or with ``legacy_vm_type`` a default VM and ``KVM_SEV_ES_INIT`` (the VMSA
    then lacks the FPU reset state, so the digest differs: ``docs/cli.md``)."""

    count: int = 1
    model: str = HOST_CPU
    es: bool = False
    legacy_vm_type: bool = False
    ap_eip: int = 0
    """The APs' reset EIP (an SEV-ES guest: from the image's SEV-ES reset block)."""

    @property
    def vm_type(self) -> KvmVmType:
        return KvmVmType.SEV_ES_VM if self.es and not self.legacy_vm_type else KvmVmType.DEFAULT_VM


# The guest model's code, measured after the image: a Python workload runs in an SEV guest only when
# the guest's measured program table lists it (sevemu.abi.pycode).  An owner measuring a launch of
# this VMM appends this table, a whole page as every region, to the image (``--firmware IMAGE
# --firmware TABLE``).
GUEST_PROGRAMS = (read_back,)
GUEST_PROGRAM_TABLE = padded_image(code_table(GUEST_PROGRAMS))

# ---- guest layout ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuestLayout:
    """Where the image, the guest's page tables and the secret area lie, and the guest's memory."""

    image_gpa: int
    image_size: int
    memory: int
    tables: tuple[int, int]
    secret_gpa: int
    secret_size: int
    secret_from_image: bool

    @property
    def code_gpa(self) -> int:
        """The guest's program table (:mod:`sevemu.abi.pycode`): the last page, clear of the rest."""
        return self.memory - PAGE

    @property
    def host_dram(self) -> int:
        """DRAM of the host that runs this guest (sparse: only what is touched costs memory)."""
        return max(4 * GiB, align_up(2 * self.memory, GiB))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _tables(memory: int) -> tuple[int, int]:
    return GUEST_TABLES_GPA, PageTableBuilder(GUEST_TABLES_GPA, memory, 0).end


def plan_layout(image: bytes, image_gpa: int, *, option: str = "--firmware-gpa",
                secret_gpa: int | None = None) -> GuestLayout:
    """Place ``image`` (already padded) and the secret area; refuse what the guest cannot run with."""
    if image_gpa % PAGE:
        raise InputError(f"{option} {image_gpa:#x} is not page aligned")
    size = len(image)
    image_range = (image_gpa, image_gpa + size)
    if image_range[1] > FIRMWARE_LIMIT:
        raise InputError(f"{option} {image_gpa:#x}: the image [{image_range[0]:#x}, {image_range[1]:#x}) must lie "
                         f"below 4 GiB, where a VMM maps guest firmware")
    if secret_gpa is not None and secret_gpa + PAGE > FIRMWARE_LIMIT:
        raise InputError(f"--secret-gpa {secret_gpa:#x} must lie below 4 GiB (OVMF's secret block is 32-bit)")
    try:
        area = sev_secret_area(image)
    except LayoutError as exc:
        raise FileFormatError(f"the image's OVMF table: {exc}") from None
    from_image = area is not None and secret_gpa is None
    memory = max(MIN_MEMORY, align_up(image_range[1] + 4 * PAGE, PAGE_2M) + PAGE_2M)
    tables = _tables(memory)
    if _overlap(image_range, tables):
        raise InputError(f"{option} {image_gpa:#x}: the image [{image_range[0]:#x}, {image_range[1]:#x}) overlaps "
                         f"the guest's page tables at [{tables[0]:#x}, {tables[1]:#x}); place it at or above "
                         f"{tables[1]:#x}")
    if area is not None and secret_gpa is None:
        gpa, area_size = area
        if area_size == 0 or gpa % PAGE:
            raise FileFormatError(f"the image's SEV secret block says GPA {gpa:#x}, size {area_size}: unusable")
    else:
        area_size = PAGE
        gpa = secret_gpa if secret_gpa is not None else align_up(image_range[1], PAGE) + PAGE
        if secret_gpa is None and _overlap((gpa, gpa + area_size), tables):
            gpa = max(gpa, tables[1])
        if gpa % PAGE:
            raise InputError(f"--secret-gpa {gpa:#x} is not page aligned")
    secret = (gpa, gpa + area_size)
    memory = max(memory, align_up(secret[1], PAGE_2M) + PAGE_2M)
    tables = _tables(memory)
    for what, rng in (("the page tables", tables), ("the image", image_range)):
        if _overlap(secret, rng):
            raise InputError(f"the secret area [{secret[0]:#x}, {secret[1]:#x}) overlaps {what} at "
                             f"[{rng[0]:#x}, {rng[1]:#x})")
    return GuestLayout(image_gpa, size, memory, tables, gpa, area_size, from_image)


# ---- reporting ---------------------------------------------------------------------------------
@dataclass
class Reporter:
    """The steps of a launch, each with who does it: printed as they happen, or kept for ``--json``."""

    quiet: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    echo: Callable[[str], None] = print

    def step(self, actor: str, text: str, **data: Any) -> None:
        self.steps.append({"actor": actor, "text": text, **data})
        if not self.quiet:
            self.echo(f"[{actor}] {text}")
            sys.stdout.flush()


def show_value(value: bytes) -> str:
    try:
        text = value.decode()
        if text.isprintable():
            return repr(text if len(text) <= 60 else text[:57] + "...")
    except UnicodeDecodeError:
        pass
    return value[:24].hex() + ("..." if len(value) > 24 else "")


# ---- the VMM -----------------------------------------------------------------------------------
class SevVmm:
    """One SEV guest driven through KVM's interface (:class:`~sevemu.hypervisor.kvm_ops.KvmSev`),
    the way QEMU drives it; the steps are reported to ``report``."""

    def __init__(self, plat: Platform, layout: GuestLayout, policy: int, report: Reporter,
                 progress: Progress, vcpus: VcpuConfig | None = None) -> None:
        self.plat = plat
        self.layout = layout
        self.policy = policy
        self.report = report
        self.progress = progress
        self.vcpus = vcpus if vcpus is not None else VcpuConfig()
        hv = plat.machine.hv
        self.vm = hv.create_vm("guest", layout.memory, vm_type=self.vcpus.vm_type, vcpu_type=self.vcpus.model)
        self.vm.back_range(layout.secret_gpa, layout.secret_size)  # physically contiguous for LAUNCH_SECRET
        self.kvm = KvmSev(hv, self.vm)
        self.state = "uninit"
        self.measurement = b""
        self.handle = 0
        self.secret_len = 0
        self.secret_gpa = layout.secret_gpa
        self.api = plat.dev.api_version()

    # -- launch ----------------------------------------------------------------------------
    def start(self, godh: bytes | None, session: bytes | None) -> None:
        dev = self.plat.dev
        cfg = self.vcpus
        if cfg.vm_type is KvmVmType.SEV_ES_VM:
            self.kvm.op(KvmSevCmdId.INIT2, KvmSevInit(), sev_fd=dev)
            init = "KVM_SEV_INIT2 (VM type KVM_X86_SEV_ES_VM)"
        elif cfg.es:
            self.kvm.op(KvmSevCmdId.ES_INIT, sev_fd=dev)
            init = "KVM_SEV_ES_INIT"
        else:
            self.kvm.op(KvmSevCmdId.INIT, sev_fd=dev)
            init = "KVM_SEV_INIT"
        for i in range(cfg.count):  # KVM_CREATE_VCPU, in the x86 reset state of the -cpu model
            self.vm.add_vcpu(reset_eip=BSP_RESET_EIP if i == 0 else cfg.ap_eip)
        self.api = dev.api_version()
        start = self.kvm.op(KvmSevCmdId.LAUNCH_START, KvmSevLaunchStart(
            policy=self.policy, dh_uaddr=godh, dh_len=len(godh) if godh else 0,
            session_uaddr=session, session_len=len(session) if session else 0), sev_fd=dev)
        self.handle = start.handle
        self.state = "launch-update"
        who = "the owner's GODH and session" if godh else "no owner session"
        self.report.step("hypervisor", f"{init}; {cfg.count} vCPU(s) of model {self.vm.cpu.name}; "
                                       f"KVM_SEV_LAUNCH_START with {who}, policy {self.policy:#x}: "
                                       f"guest handle {start.handle}, ASID {self.vm.asid}",
                         handle=start.handle, asid=self.vm.asid, vcpus=cfg.count, cpu=self.vm.cpu.name,
                         es=cfg.es)

    def load(self, image: bytes) -> None:
        gpa = self.layout.image_gpa
        self.progress.start("LAUNCH_UPDATE_DATA", total=len(image))
        for offset in range(0, len(image), LOAD_CHUNK):
            chunk = image[offset : offset + LOAD_CHUNK]
            rc = load_image(self.kvm, chunk, gpa + offset, page_by_page=False)
            if rc:
                raise IoctlError("KVM_SEV_LAUNCH_UPDATE_DATA", rc, self.kvm.last_error)
            self.progress.advance(len(chunk))
        pages = len(image) // PAGE
        self.report.step("hypervisor", f"KVM_SEV_LAUNCH_UPDATE_DATA: {len(image)} bytes at GPA {gpa:#x}, {pages} "
                                       "page(s), measured and encrypted in place", image_bytes=len(image))
        if self.vcpus.es:
            return  # the guest's code is the image alone (no Python guest model: see finish_and_run)
        # the guest model's code (the program that reads the secret area) is measured after the image
        rc = load_image(self.kvm, GUEST_PROGRAM_TABLE, self.layout.code_gpa)
        if rc:
            raise IoctlError("KVM_SEV_LAUNCH_UPDATE_DATA", rc, self.kvm.last_error)
        self.report.step("hypervisor", f"KVM_SEV_LAUNCH_UPDATE_DATA: the guest's program table "
                                       f"({len(GUEST_PROGRAM_TABLE)} bytes) at GPA {self.layout.code_gpa:#x}")

    def measure(self) -> bytes:
        if self.vcpus.es:  # QEMU: every vCPU's VMSA, encrypted and measured, right before the measurement
            self.progress.step("LAUNCH_UPDATE_VMSA")
            self.kvm.op(KvmSevCmdId.LAUNCH_UPDATE_VMSA)
            self.report.step("hypervisor", f"KVM_SEV_LAUNCH_UPDATE_VMSA: {self.vcpus.count} VMSA(s), measured and "
                                           "encrypted with the guest's key")
        self.progress.step("LAUNCH_MEASURE")
        query = KvmSevLaunchMeasure()
        self.kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_MEASURE, query)
        blob = bytearray(query.len or MeasureBuf.SIZE)
        self.kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(uaddr=blob, len=len(blob)))
        self.measurement = bytes(blob)
        self.state = "launch-secret"
        measure, mnonce = self.measurement[:32], self.measurement[32:]
        self.report.step("hypervisor", f"KVM_SEV_LAUNCH_MEASURE (length query: {query.len:#x}): MEASURE "
                                       f"{measure.hex()}, MNONCE {mnonce.hex()}",
                         measure=measure.hex(), mnonce=mnonce.hex(),
                         blob_b64=base64.b64encode(self.measurement).decode())
        return self.measurement

    def check_secret(self, header: bytes, payload: bytes, gpa: int | None = None) -> int:
        """Refuse a packet that cannot be injected (sizes, state, placement); the GPA to use."""
        lay = self.layout
        if len(header) != HEADER_SIZE:
            raise InputError(f"the packet header is {len(header)} bytes, expected {HEADER_SIZE:#x}")
        if not payload:
            raise InputError("the secret payload is empty")
        if self.state != "launch-secret":
            raise InputError(f"the guest is in state {self.state}; a secret is injected in launch-secret only")
        if len(payload) > SEV_FW_BLOB_MAX_SIZE:
            raise InputError(f"the secret payload is {len(payload)} bytes; KVM takes at most "
                             f"{SEV_FW_BLOB_MAX_SIZE // KiB} KiB (and the guest's secret area holds "
                             f"{lay.secret_size})")
        gpa = lay.secret_gpa if gpa is None else gpa
        if gpa == lay.secret_gpa:
            if len(payload) > lay.secret_size:
                raise InputError(f"the secret payload is {len(payload)} bytes; the guest's secret area at GPA "
                                 f"{gpa:#x} holds {lay.secret_size}")
        elif gpa % PAGE + len(payload) > PAGE or gpa + len(payload) > lay.memory:
            raise InputError(f"GPA {gpa:#x} + {len(payload)} bytes: outside the secret area a secret must fit "
                             "one page of guest memory")
        return gpa

    def inject(self, header: bytes, payload: bytes, gpa: int | None = None) -> None:
        gpa = self.check_secret(header, payload, gpa)
        self.kvm.op(KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(
            hdr_uaddr=header, hdr_len=len(header), guest_uaddr=self.kvm.hva(gpa), guest_len=len(payload),
            trans_uaddr=payload, trans_len=len(payload)))
        self.secret_len = len(payload)
        self.secret_gpa = gpa
        self.report.step("hypervisor", f"KVM_SEV_LAUNCH_SECRET: {len(payload)} bytes at GPA {gpa:#x}",
                         secret_gpa=gpa, secret_bytes=len(payload))

    def attestation_report(self, mnonce: bytes) -> bytes:
        query = KvmSevAttestationReport(mnonce=mnonce)
        self.kvm.memory_encrypt_op(KvmSevCmdId.GET_ATTESTATION_REPORT, query)
        out = bytearray(query.len)
        self.kvm.op(KvmSevCmdId.GET_ATTESTATION_REPORT, KvmSevAttestationReport(mnonce=mnonce, uaddr=out,
                                                                                len=len(out)))
        return bytes(out)

    def finish_and_run(self) -> dict[uuid.UUID, bytes] | None:
        """LAUNCH_FINISH, then the guest boots and reads its secret area; the entries it found."""
        self.kvm.op(KvmSevCmdId.LAUNCH_FINISH)
        status = self.kvm.op(KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus())
        self.state = "running"
        self.report.step("hypervisor", f"KVM_SEV_LAUNCH_FINISH: guest {GuestState(status.state).name}")
        if self.vcpus.es:
            self.report.step("hypervisor", "the SEV-ES guest's code is the image itself, its registers are in its "
                                           "VMSAs: this VMM runs no guest model in it (real guest code runs on "
                                           "the x86 engine: sevemu run GUEST --mode sev-es)")
            return {}
        gpa = self.secret_gpa
        length = self.secret_len or min(self.layout.secret_size, PAGE)
        self.progress.step("running the guest")
        hv = self.plat.machine.hv
        engine = PyEngine(read_back(self.layout.memory, gpa, length), code_gpa=self.layout.code_gpa)
        result = hv.run(self.vm, 0, engine=engine)  # the BSP runs the guest model; the APs stay in reset
        lines = self.vm.console.decode(errors="replace").strip().splitlines()
        if result.reason != "hlt" or not lines:
            self.report.step("guest", f"did not finish: {result.reason}", ok=False)
            return None
        try:
            entries = parse_secret_table(bytes.fromhex(lines[-1]))
        except (ValueError, LayoutError):
            self.report.step("guest", f"finds no secret table at GPA {gpa:#x}", secrets=0)
            entries = {}
        for guid, value in entries.items():
            self.report.step("guest", f"reads its secret {guid} at GPA {gpa:#x}: {show_value(value)}", guid=str(guid))
        if self.secret_len:
            hv.soc.wbinvd_all()
            host_view = self.vm.host_read(gpa, min(32, length))
            self.report.step("hypervisor", f"reads the same GPA after WBINVD: {host_view.hex()} (ciphertext)",
                             host_view=host_view.hex())
        return entries

    def destroy(self) -> None:
        if self.state != "destroyed":
            self.plat.machine.hv.destroy(self.vm)
            self.state = "destroyed"


# ---- the command ---------------------------------------------------------------------------------
_EPILOG = """\
examples (the whole exchange, each party in its own shell; see docs/cli.md):
  host$  sevemu export --full chain.cert                  (to the owner)
  owner$ sevemu verify --sev chain.cert --emulated && sevemu session chain.cert 0x1
  host$  sevemu vmm --dh-cert-file vm_godh.b64 --session-file vm_session.b64 --policy 0x1 \\
             --firmware fw.bin --launch-measure-blob measure.b64 \\
             --secret-header secret_header.bin --secret-payload secret_payload.bin &
  owner$ sevemu measurement verify --launch-measure-blob measure.b64 --tik vm_tik.bin --firmware fw.bin \\
             --api-major 1 --api-minor 51 --build-id 3 --policy 0x1
  owner$ sevemu secret build --tek vm_tek.bin --tik vm_tik.bin --launch-measure-blob measure.b64 \\
             --secret 736869e5-84f0-4973-92ec-06879ce3da0b:passphrase.txt secret_header.bin secret_payload.bin
  (the VMM injects the secret, finishes the launch and runs the guest)

  with QMP instead of files:
  host$  sevemu vmm --dh-cert-file vm_godh.b64 --session-file vm_session.b64 --firmware fw.bin --qmp vmm.sock &
  host$  sevemu qmp vmm.sock query-sev-launch-measure
  host$  sevemu qmp vmm.sock sev-inject-launch-secret packet-header=@secret_header.bin secret=@secret_payload.bin
  host$  sevemu qmp vmm.sock cont"""


def register(sub: Any) -> None:
    p = sub.add_parser("vmm", help="the host's VMM: launch a guest from the owner's files, wait for its secret",
                       description="Start an SEV guest from the owner's GODH and session files (as QEMU's "
                                   "sev-guest object), publish its launch measurement, wait for the owner's "
                                   "secret (files or QMP), inject it, finish the launch and run the guest.",
                       epilog=_EPILOG)
    add_platform_args(p)
    p.add_argument("--dh-cert-file", type=Path, metavar="FILE", help="the owner's GODH certificate (base64)")
    p.add_argument("--session-file", type=Path, metavar="FILE", help="the owner's session buffer (base64)")
    p.add_argument("--policy", default="0x1", help="guest policy (default 0x1: NODBG; with the ES bit 0x4 an "
                                                    "SEV-ES guest, as QEMU's sev-guest object)")
    p.add_argument("-cpu", "--cpu", dest="cpu", default=HOST_CPU, metavar="MODEL",
                   help=f"the vCPU model (QEMU -cpu): {', '.join(CPU_MODELS)} or {HOST_CPU} (default)")
    p.add_argument("-smp", "--smp", dest="smp", default="1", metavar="N",
                   help=f"number of vCPUs, 1..{MAX_VCPUS} (QEMU -smp; an SEV-ES guest measures one VMSA each)")
    p.add_argument("--legacy-vm-type", action="store_true",
                   help="SEV-ES: KVM_SEV_ES_INIT on the default VM type instead of KVM_X86_SEV_ES_VM with "
                        "KVM_SEV_INIT2 (QEMU sev-guest legacy-vm-type=on)")
    p.add_argument("--firmware", type=Path, required=True, metavar="FILE",
                   help="the guest image to load and measure (e.g. an OVMF build)")
    p.add_argument("--firmware-gpa", default=hex(IMAGE_GPA), metavar="ADDR",
                   help=f"where to load it (default {IMAGE_GPA:#x})")
    p.add_argument("--launch-measure-blob", type=Path, metavar="FILE",
                   help="write the LAUNCH_MEASURE blob here (base64) for the owner")
    p.add_argument("--secret-header", type=Path, metavar="FILE", help="wait for the owner's packet header here")
    p.add_argument("--secret-payload", type=Path, metavar="FILE", help="wait for the owner's secret payload here")
    p.add_argument("--secret-gpa", metavar="ADDR", help="inject the secret there (default: the image's "
                                                          "OVMF secret area, else the page after the image)")
    p.add_argument("--qmp", type=Path, metavar="SOCKET", help="serve QMP commands on this UNIX socket")
    p.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"give up waiting for the secret after S seconds (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true", help="the steps as JSON")
    p.set_defaults(func=run_vmm)

    q = sub.add_parser("qmp", help="send one QMP command to a running sevemu vmm",
                       epilog="examples:\n  sevemu qmp vmm.sock query-sev\n"
                              "  sevemu qmp vmm.sock query-sev-launch-measure\n"
                              "  sevemu qmp vmm.sock sev-inject-launch-secret packet-header=@hdr.bin "
                              "secret=@payload.bin\n  sevemu qmp vmm.sock cont")
    q.add_argument("socket", type=Path, help="the VMM's QMP socket (sevemu vmm --qmp)")
    q.add_argument("execute", metavar="COMMAND", help="the QMP command")
    q.add_argument("arguments", nargs="*", metavar="NAME=VALUE",
                   help="arguments; NAME=@FILE sends FILE's bytes in base64; numbers are sent as numbers")
    q.add_argument("--timeout", type=seconds, default=60.0, metavar="S", help="wait at most S seconds (default 60)")
    q.set_defaults(func=run_qmp_client)


def _read_b64_file(path: Path, size: int, what: str, option: str) -> bytes:
    """A base64 file as QEMU reads ``dh-cert-file`` / ``session-file`` (raw accepted too)."""
    data = read_file(path)
    if len(data) == size:
        return data
    try:
        value = base64.b64decode(data.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise FileFormatError(f"{path}: not base64 ({option}: {what}, as sevemu session writes it)") from None
    if len(value) != size:
        raise FileFormatError(f"{path}: {what} of {len(value)} bytes, expected {size:#x}")
    return value


@dataclass
class _Inputs:
    godh: bytes | None
    session: bytes | None
    image: bytes
    layout: GuestLayout
    policy: int
    vcpus: VcpuConfig


def _vcpu_config(args: argparse.Namespace, policy: int, image: bytes) -> VcpuConfig:
    """-cpu, -smp and the VM type, checked (one-line errors)."""
    from sevemu.abi.policy import GuestPolicy

    model = str(args.cpu)
    if model != HOST_CPU and model not in CPU_MODELS:
        raise InputError(f"-cpu {model!r}: unknown vCPU model; known: {', '.join(CPU_MODELS)}, {HOST_CPU}")
    try:
        count = int(str(args.smp), 0)
    except ValueError:
        raise InputError(f"-smp {args.smp!r}: not a number of vCPUs") from None
    if not 1 <= count <= MAX_VCPUS:
        raise InputError(f"-smp {count}: the number of vCPUs must be 1..{MAX_VCPUS}")
    es = bool(policy & GuestPolicy.ES)
    if args.legacy_vm_type and not es:
        raise InputError("--legacy-vm-type chooses how an SEV-ES guest is made: the policy has no ES bit (0x4)")
    ap_eip = 0
    if es and count > 1:
        try:
            ap_eip = sev_es_reset_eip(image)
        except LayoutError:
            raise InputError(f"-smp {count} with an SEV-ES policy: the image has no SEV-ES reset block (OVMF's "
                             "footer table), so the APs have no reset address") from None
    return VcpuConfig(count, model, es, bool(args.legacy_vm_type), ap_eip)


def _check_inputs(args: argparse.Namespace, outputs: Outputs) -> _Inputs:
    from sevemu.abi.policy import check_policy

    if (args.dh_cert_file is None) != (args.session_file is None):
        raise InputError("--dh-cert-file and --session-file go together (sevemu session writes both)")
    if (args.secret_header is None) != (args.secret_payload is None):
        raise InputError("--secret-header and --secret-payload go together")
    if args.secret_header is not None and args.secret_header == args.secret_payload:
        raise InputError(f"--secret-header and --secret-payload are the same file {args.secret_header}")
    godh = session = None
    if args.dh_cert_file is not None:
        godh = _read_b64_file(args.dh_cert_file, SEV_CERT_SIZE, "a GODH certificate", "--dh-cert-file")
        session = _read_b64_file(args.session_file, SessionBuf.SIZE, "a session buffer", "--session-file")
    policy = parse_int(args.policy, "--policy")
    try:
        check_policy(policy)
    except InputError as exc:
        raise InputError(f"--policy: {exc}") from None
    image = load_guest_image(args.firmware)
    gpa = parse_int(args.firmware_gpa, "--firmware-gpa", 40)
    secret_gpa = parse_int(args.secret_gpa, "--secret-gpa", 40) if args.secret_gpa is not None else None
    layout = plan_layout(image, gpa, secret_gpa=secret_gpa)
    vcpus = _vcpu_config(args, policy, image)
    if args.launch_measure_blob is not None:
        outputs.add(args.launch_measure_blob, "the launch-measure blob")
    if args.qmp is not None:
        if args.qmp.exists() and not args.qmp.is_socket():
            raise FileFormatError(f"{args.qmp}: exists and is not a socket")
        if len(os.fsencode(args.qmp)) > 100:
            raise InputError(f"--qmp {args.qmp}: a UNIX socket path must be shorter (use a relative path)")
    return _Inputs(godh, session, image, layout, policy, vcpus)


def load_guest_image(path: Path) -> bytes:
    """The image file, padded to whole pages; refused when empty or larger than this host can hold."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise FileFormatError(f"{path}: not a regular file (a device or pipe has no size to load)")
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size * 3 > host_memory():
        raise InputError(f"{path}: {size >> 20} MiB; loading it needs about three times that in host memory "
                         f"({host_memory() >> 20} MiB available)")
    data = read_file(path)
    if not data:
        raise FileFormatError(f"{path}: the image is empty")
    return padded_image(data)


def run_vmm(args: argparse.Namespace) -> int:
    outputs = Outputs()
    inp = _check_inputs(args, outputs)
    quiet = bool(getattr(args, "json", False))
    report = Reporter(quiet=quiet)
    waits = args.qmp is not None or args.secret_header is not None
    with ExitStack() as stack:
        progress = stack.enter_context(Progress(progress_enabled(quiet=quiet or bool(getattr(args, "quiet", False))),
                                                "vmm"))
        plat = stack.enter_context(open_platform(args, dram_size=inp.layout.host_dram))
        vmm = SevVmm(plat, inp.layout, inp.policy, report, progress, inp.vcpus)
        stack.callback(vmm.destroy)
        major, minor, build = plat.dev.api_version()
        report.step("hypervisor", f"{plat.generation} platform at {plat.directory}; guest of {inp.layout.memory >> 20} "
                                  f"MiB, image {args.firmware} at GPA {inp.layout.image_gpa:#x}, secret area "
                                  f"[{inp.layout.secret_gpa:#x}, +{inp.layout.secret_size:#x})")
        vmm.start(inp.godh, inp.session)
        vmm.load(inp.image)
        blob = vmm.measure()
        major, minor, build = vmm.api
        report.step("hypervisor", f"for the owner (query-sev): firmware API {major}.{minor} build {build}, "
                                  f"policy {inp.policy:#x}", api_major=major, api_minor=minor, build=build)
        if args.launch_measure_blob is not None:
            outputs.write(args.launch_measure_blob, base64.b64encode(blob) + b"\n")
            report.step("hypervisor", f"wrote the launch-measure blob to {args.launch_measure_blob}")
        entries: dict[uuid.UUID, bytes] | None
        if not waits:
            entries = vmm.finish_and_run()
        else:
            outcome, entries = _serve(args, vmm, progress)
            if outcome == "quit":
                if quiet:
                    emit(args, {"ok": True, "quit": True, "steps": report.steps}, [])
                return 0
            if outcome == "timeout":
                if quiet:
                    emit(args, {"ok": False, "steps": report.steps, "reason": "timeout"}, [])
                print(f"sevemu: error: no secret within {args.timeout:g} s; the guest was destroyed without "
                      "running", file=sys.stderr)
                return 1
    ok = entries is not None
    if quiet:
        emit(args, {"ok": ok, "generation": plat.generation, "platform_dir": str(plat.directory),
                    "measurement_b64": base64.b64encode(blob).decode(), "steps": report.steps}, [])
    return 0 if ok else 1


# ---- waiting for the owner: files and QMP --------------------------------------------------------
def _files_ready(header: Path, payload: Path) -> bool:
    try:
        return header.stat().st_size > 0 and payload.stat().st_size > 0
    except OSError:
        return False


def _serve(args: argparse.Namespace, vmm: SevVmm,
           progress: Progress) -> tuple[str, dict[uuid.UUID, bytes] | None]:
    """Wait for the secret files or QMP commands until the guest runs (``"ran"`` and what it read),
    ``quit`` (``"quit"``), or the timeout (``"timeout"``)."""
    deadline = time.monotonic() + args.timeout
    where = []
    if args.secret_header is not None:
        where.append(f"{args.secret_header} and {args.secret_payload}")
    if args.qmp is not None:
        where.append(f"QMP commands on {args.qmp}")
    vmm.report.step("hypervisor", f"waiting up to {args.timeout:g} s for {' or '.join(where)}")
    progress.step("waiting for the owner's secret")
    with _listening(args.qmp) as server:
        qmp = QmpServer(vmm)
        while time.monotonic() < deadline:
            if args.secret_header is not None and _files_ready(args.secret_header, args.secret_payload):
                header = read_blob(args.secret_header, HEADER_SIZE, "a LAUNCH_SECRET packet header")
                payload = read_file(args.secret_payload)
                try:
                    vmm.check_secret(header, payload)
                except InputError as exc:
                    raise InputError(f"{args.secret_payload}: {exc}") from None
                vmm.inject(header, payload)
                return "ran", vmm.finish_and_run()
            if server is not None:
                ready, _, _ = select.select([server], [], [], min(0.1, max(deadline - time.monotonic(), 0)))
                if ready:
                    conn, _ = server.accept()
                    with conn:
                        qmp.session(conn, deadline)
                    if qmp.finished:
                        return ("ran" if vmm.state == "running" else "quit"), qmp.entries
            else:
                time.sleep(0.05)
    return "timeout", None


@contextmanager
def _listening(path: Path | None) -> Iterator[socket.socket | None]:
    if path is None:
        yield None
        return
    if path.is_socket():
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(os.fspath(path))
        server.listen(4)
        yield server
    finally:
        server.close()
        path.unlink(missing_ok=True)


class QmpError(SevemuError):
    """Raised when a QMP command fails; sent back as a QMP ``GenericError``."""


class QmpServer:
    """The QMP commands of the module docstring, over one connection at a time."""

    def __init__(self, vmm: SevVmm) -> None:
        self.vmm = vmm
        self.finished = False
        self.entries: dict[uuid.UUID, bytes] | None = None

    def session(self, conn: socket.socket, deadline: float) -> None:
        conn.settimeout(max(deadline - time.monotonic(), 0.1))
        reader = conn.makefile("rb")
        _send(conn, {"QMP": {"version": {"package": "sevemu"}, "capabilities": []}})
        try:
            for line in reader:
                if not line.strip():
                    continue
                reply = self.handle(line)
                _send(conn, reply)
                if self.finished:
                    return
        except (OSError, TimeoutError):
            return

    def handle(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
                raise QmpError("expected {\"execute\": COMMAND, \"arguments\": {...}}")
            arguments = msg.get("arguments", {})
            if not isinstance(arguments, dict):
                raise QmpError("arguments must be an object")
            return {"return": self.execute(msg["execute"], arguments)}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("the command is not JSON")
        except SevemuError as exc:
            return _error(str(exc))

    def execute(self, command: str, a: dict[str, Any]) -> Any:
        vmm = self.vmm
        if command == "qmp_capabilities":
            return {}
        if command == "query-sev":
            major, minor, build = vmm.api
            return {"enabled": True, "api-major": major, "api-minor": minor, "build-id": build,
                    "policy": vmm.policy, "state": vmm.state, "handle": vmm.handle, "sev-type": "sev"}
        if command == "query-sev-launch-measure":
            if not vmm.measurement:
                raise QmpError("SEV launch measurement is not available")
            return {"data": base64.b64encode(vmm.measurement).decode()}
        if command == "query-sev-capabilities":
            from sevemu.cli.platform import export_pdh

            pdh, chain = export_pdh(vmm.plat)
            ebx = vmm.plat.machine.soc.host_view().cpuid(0x8000001F)[1]
            return {"pdh": base64.b64encode(pdh.encode()).decode(),
                    "cert-chain": base64.b64encode(chain.encode()).decode(),
                    "cbitpos": ebx & 0x3F, "reduced-phys-bits": 1}
        if command == "sev-inject-launch-secret":
            header = _b64_arg(a, "packet-header")
            payload = _b64_arg(a, "secret")
            gpa = a.get("gpa")
            if gpa is not None and (not isinstance(gpa, int) or gpa < 0):
                raise QmpError("gpa must be a non-negative number")
            vmm.inject(header, payload, gpa)
            return {}
        if command == "query-sev-attestation-report":
            mnonce = _b64_arg(a, "mnonce")
            if len(mnonce) != 16:
                raise QmpError(f"SEV: mnonce must be 16 bytes (got {len(mnonce)})")
            return {"data": base64.b64encode(vmm.attestation_report(mnonce)).decode()}
        if command == "cont":
            if vmm.state != "launch-secret":
                raise QmpError(f"the guest is {vmm.state}")
            self.entries = vmm.finish_and_run()
            self.finished = True
            return {}
        if command == "quit":
            vmm.report.step("hypervisor", "quit: the guest is destroyed without running")
            self.finished = True
            return {}
        raise QmpError(f"The command {command} has not been found")


def _b64_arg(a: dict[str, Any], name: str) -> bytes:
    value = a.get(name)
    if not isinstance(value, str):
        raise QmpError(f"Parameter '{name}' is missing (base64)")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise QmpError(f"Parameter '{name}' is not base64") from None


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(json.dumps(msg).encode() + b"\n")


# ---- the client ------------------------------------------------------------------------------------
def _client_arguments(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InputError(f"{item!r}: expected NAME=VALUE")
        if value.startswith("@"):
            out[name] = base64.b64encode(read_file(value[1:])).decode()
        else:
            try:
                out[name] = int(value, 0)
            except ValueError:
                out[name] = value
    return out


def run_qmp_client(args: argparse.Namespace) -> int:
    arguments = _client_arguments(args.arguments)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    try:
        try:
            sock.connect(os.fspath(args.socket))
        except FileNotFoundError:
            raise FileFormatError(f"{args.socket}: no such socket (is sevemu vmm --qmp running?)") from None
        except OSError as exc:
            raise FileFormatError(f"{args.socket}: cannot connect: {exc.strerror or exc}") from None
        reader = sock.makefile("rb")
        _recv(reader, args.socket)  # the greeting
        _send(sock, {"execute": "qmp_capabilities"})
        _recv(reader, args.socket)
        _send(sock, {"execute": args.execute, "arguments": arguments})
        reply = _recv(reader, args.socket)
    except TimeoutError:
        raise FileFormatError(f"{args.socket}: no answer within {args.timeout:g} s") from None
    finally:
        sock.close()
    if "error" in reply:
        raise InputError(f"qmp {args.execute}: {reply['error'].get('desc', reply['error'])}")
    print(json.dumps(reply.get("return", {}), indent=2))
    return 0


def _recv(reader: Any, path: Path) -> dict[str, Any]:
    line = reader.readline()
    if not line:
        raise FileFormatError(f"{path}: the VMM closed the connection")
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict):
        raise FileFormatError(f"{path}: not a QMP reply: {line[:60]!r}")
    return msg
