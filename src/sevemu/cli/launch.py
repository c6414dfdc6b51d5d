"""``sevemu launch``: the whole guest-owner <-> platform exchange of a measured SEV launch, in one
process, step by step (reference 1.9-1.11).

::

    [platform]    boot the platform from its directory (firmware UNINIT)
    [hypervisor]  PDH_CERT_EXPORT through /dev/sev: PDH and PEK || OCA || CEK for the owner
    [owner]       verify the chain up to the manufacturer's ARK; LaunchSession: GODH cert + session
    [hypervisor]  KVM_SEV_INIT, KVM_SEV_LAUNCH_START (GODH, session), KVM_SEV_LAUNCH_UPDATE_DATA of
                  the image page by page, KVM_SEV_LAUNCH_MEASURE (length query, then the blob)
    [owner]       verify MEASURE against the digest of the image it expects; seal the secret table
    [hypervisor]  KVM_SEV_LAUNCH_SECRET into guest memory, KVM_SEV_LAUNCH_FINISH
    [guest]       boots and reads its secrets in plaintext at their GPA
    [hypervisor]  reads the same GPA: ciphertext

The image is padded with zeros to whole 4 KiB pages, as a VMM loads a firmware volume into whole
pages (the firmware measures in 16-byte units, 64 on AES-XTS generations): the owner's expected digest
is that of the padded image.  The hypervisor side is :class:`~sevemu.hypervisor.kvm_ops.KvmSev` (KVM's ioctl), the owner side
:mod:`sevemu.owner`; they share nothing but the blobs printed here.  The platform's chain is checked
against the ARK of the emulated manufacturer that made it (as a relying party would pin it).
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.abi.states import GuestState, PlatformState
from sevemu.certs.chain import PlatformChain
from sevemu.certs.roots import PinnedArk
from sevemu.cli.common import add_platform_args, emit, open_platform, parse_int, platform_amd_chain, read_file
from sevemu.cli.owner import parse_secrets
from sevemu.cli.platform import export_pdh, platform_status
from sevemu.crypto.transport import MeasureMacError
from sevemu.errors import InputError
from sevemu.guest.workloads import read_back
from sevemu.hw.pyengine import PyEngine
from sevemu.hypervisor.kvm_ops import (
    KvmSev,
    KvmSevCmdId,
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    load_image,
)
from sevemu.hypervisor.sevdev import IoctlError
from sevemu.owner.measurement import expected_launch_digest
from sevemu.owner.secret import parse_secret_table
from sevemu.owner.session import LaunchSession

__all__ = ["DEMO_SECRET", "DEMO_SECRET_GUID", "register"]

MiB = 1 << 20
PAGE = 4096
IMAGE_GPA = 0x10_0000
DEMO_SECRET_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")  # sevctl's disk-passphrase GUID
DEMO_SECRET = b"sevemu demo disk passphrase: correct horse battery staple"
DEMO_IMAGE = b"".join(f"sevemu demo firmware volume, line {i:05d}\n".encode().ljust(64, b".")
                      for i in range(1024))


def register(sub: Any) -> None:
    p = sub.add_parser("launch", help="a measured SEV launch with a secret, owner and host in one run")
    add_platform_args(p)
    p.add_argument("--image", type=Path, metavar="FILE",
                   help="guest image (a file of guest memory contents, e.g. firmware; default a demo image)")
    p.add_argument("--image-gpa", default=hex(IMAGE_GPA), help=f"where to load it (default {IMAGE_GPA:#x})")
    p.add_argument("--policy", default="0x1", help="guest policy (default 0x1: NODBG)")
    p.add_argument("--secret", action="append", metavar="GUID:FILE", help="secret entries (default a demo one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _show(value: bytes) -> str:
    try:
        text = value.decode()
        if text.isprintable():
            return repr(text if len(text) <= 60 else text[:57] + "...")
    except UnicodeDecodeError:
        pass
    return value[:24].hex() + ("..." if len(value) > 24 else "")


def run(args: argparse.Namespace) -> int:
    image = read_file(args.image) if args.image is not None else DEMO_IMAGE
    if not image:
        raise InputError(f"{args.image}: the image is empty")
    image += bytes(-len(image) % PAGE)  # loaded into whole pages, and measured so (module docstring)
    image_gpa = parse_int(args.image_gpa, "--image-gpa", 40)
    if image_gpa % PAGE:
        raise InputError(f"--image-gpa {image_gpa:#x} is not page aligned")
    policy = parse_int(args.policy, "--policy")
    secrets = parse_secrets(args.secret) if args.secret else [(str(DEMO_SECRET_GUID), DEMO_SECRET)]
    steps: list[dict[str, Any]] = []
    quiet = args.json

    def step(actor: str, text: str, **data: Any) -> None:
        steps.append({"actor": actor, "text": text, **data})
        if not quiet:
            print(f"[{actor}] {text}")

    end = (image_gpa + len(image) + PAGE - 1) & ~(PAGE - 1)
    secret_gpa = end + PAGE
    memory = max(16 * MiB, ((secret_gpa + 64 * 1024 + 2 * MiB - 1) & ~(2 * MiB - 1)) + 2 * MiB)
    with open_platform(args) as plat:
        hv, dev = plat.machine.hv, plat.dev
        st = platform_status(plat)
        step("platform", f"{plat.generation} platform at {plat.directory}: firmware API "
                         f"{st.api_major}.{st.api_minor} build {st.build}, {PlatformState(st.state).name}")
        pdh, chain = export_pdh(plat)
        step("hypervisor", "PDH_CERT_EXPORT through /dev/sev: the PDH and PEK || OCA || CEK go to the owner")

        amd = platform_amd_chain(plat.directory)
        root = PinnedArk.from_cert(plat.generation, amd.ark, emulated=True)
        PlatformChain(pdh, chain.pek, chain.oca, chain.cek, amd.ask, amd.ark).verify([root])
        step("owner", f"chain ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH verified up to the emulated "
                      f"{plat.generation} ARK {root.key_id.hex()}")
        pdh_key = pdh.public_key()
        if not isinstance(pdh_key, ec.EllipticCurvePublicKey):
            raise InputError("the platform's PDH is not an EC key")
        sess = LaunchSession.create(pdh_key, policy)
        godh, session = sess.godh_cert_blob, sess.session_blob
        step("owner", f"session for policy {policy:#x}: GODH certificate ({len(godh):#x} bytes) and session "
                      f"buffer ({len(session):#x} bytes) to the host; TEK and TIK stay with the owner",
             policy=policy)

        vm = hv.create_vm("guest", memory)
        kvm = KvmSev(hv, vm)
        kvm.op(KvmSevCmdId.INIT, sev_fd=dev)
        start = kvm.op(KvmSevCmdId.LAUNCH_START,
                       KvmSevLaunchStart(policy=policy, dh_uaddr=godh, dh_len=len(godh),
                                         session_uaddr=session, session_len=len(session)), sev_fd=dev)
        step("hypervisor", f"KVM_SEV_INIT; KVM_SEV_LAUNCH_START: guest handle {start.handle}, ASID {vm.asid}",
             handle=start.handle, asid=vm.asid)
        rc = load_image(kvm, image, image_gpa)
        if rc:
            raise IoctlError("KVM_SEV_LAUNCH_UPDATE_DATA", rc, kvm.last_error)
        pages = (len(image) + PAGE - 1) // PAGE
        step("hypervisor", f"KVM_SEV_LAUNCH_UPDATE_DATA: {len(image)} bytes at GPA {image_gpa:#x}, "
                           f"{pages} page(s), each measured and encrypted in place", image_bytes=len(image))
        query = KvmSevLaunchMeasure()
        kvm.memory_encrypt_op(KvmSevCmdId.LAUNCH_MEASURE, query)
        blob = bytearray(query.len)
        kvm.op(KvmSevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure(uaddr=blob, len=len(blob)))
        measure, mnonce = bytes(blob[:32]), bytes(blob[32:])
        step("hypervisor", f"KVM_SEV_LAUNCH_MEASURE (length query: {query.len:#x}): MEASURE {measure.hex()}, "
                           f"MNONCE {mnonce.hex()}", measure=measure.hex(), mnonce=mnonce.hex())

        digest = expected_launch_digest([image])
        try:
            measured = sess.verify_measurement(bytes(blob), api_major=st.api_major, api_minor=st.api_minor,
                                               build=st.build, expected_ld=digest)
        except MeasureMacError:
            step("owner", "measurement does NOT match the expected launch: no secret released", ok=False)
            if quiet:
                emit(args, {"ok": False, "steps": steps}, [])
            return 1
        step("owner", f"measurement verified: launch digest {digest.hex()} (API {st.api_major}."
                      f"{st.api_minor} build {st.build}, policy {policy:#x})", launch_digest=digest.hex())
        packet = measured.launch_secret(secrets)
        step("owner", f"secret table with {len(secrets)} entr{'y' if len(secrets) == 1 else 'ies'} sealed "
                      f"for this launch: header {len(packet.header_bytes):#x} bytes, payload {packet.guest_len} bytes")

        kvm.op(KvmSevCmdId.LAUNCH_SECRET, KvmSevLaunchSecret(
            hdr_uaddr=packet.header_bytes, hdr_len=len(packet.header_bytes), guest_uaddr=kvm.hva(secret_gpa),
            guest_len=packet.guest_len, trans_uaddr=packet.trans, trans_len=len(packet.trans)))
        kvm.op(KvmSevCmdId.LAUNCH_FINISH)
        status = kvm.op(KvmSevCmdId.GUEST_STATUS, KvmSevGuestStatus())
        step("hypervisor", f"KVM_SEV_LAUNCH_SECRET at GPA {secret_gpa:#x}; KVM_SEV_LAUNCH_FINISH: guest "
                           f"{GuestState(status.state).name}", secret_gpa=secret_gpa)

        vm.add_vcpu(PyEngine(read_back(memory, secret_gpa, packet.guest_len)))
        result = hv.run(vm)
        lines = vm.console.decode(errors="replace").strip().splitlines()
        table = bytes.fromhex(lines[-1]) if result.reason == "hlt" and lines else b""
        entries = parse_secret_table(table)
        for guid, value in entries.items():
            step("guest", f"reads its secret {guid} at GPA {secret_gpa:#x}: {_show(value)}", guid=str(guid))
        hv.soc.wbinvd_all()
        host_view = vm.host_read(secret_gpa, min(32, packet.guest_len))
        step("hypervisor", f"reads the same GPA after WBINVD: {host_view.hex()} (ciphertext)",
             host_view=host_view.hex())
        ok = entries == {uuid.UUID(g): v for g, v in secrets}
        hv.destroy(vm)
    if quiet:
        emit(args, {"ok": ok, "generation": plat.generation, "platform_dir": str(plat.directory),
                    "steps": steps}, [])
    else:
        print("launch complete: the guest holds its secrets; the host saw only ciphertext" if ok
              else "launch FAILED: the guest did not read back its secrets")
    return 0 if ok else 1
