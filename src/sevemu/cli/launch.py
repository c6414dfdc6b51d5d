"""``sevemu launch``: the whole guest-owner <-> platform exchange of a measured SEV launch, in one
process, step by step -- the guided form of what ``sevemu session``, ``sevemu vmm``, ``sevemu
measurement verify`` and ``sevemu secret build`` do with files between two parties (docs/cli.md).

::

    [platform]    boot the platform from its directory (firmware UNINIT)
    [hypervisor]  PDH_CERT_EXPORT through /dev/sev: PDH and PEK || OCA || CEK for the owner
    [owner]       verify the chain up to the manufacturer's ARK; LaunchSession: GODH cert + session
    [hypervisor]  KVM_SEV_INIT, KVM_SEV_LAUNCH_START (GODH, session), KVM_SEV_LAUNCH_UPDATE_DATA of
                  the image, KVM_SEV_LAUNCH_MEASURE (length query, then the blob)
    [owner]       verify MEASURE against the digest of the image it expects; seal the secret table
    [hypervisor]  KVM_SEV_LAUNCH_SECRET into the guest's secret area, KVM_SEV_LAUNCH_FINISH
    [guest]       boots and reads its secrets in plaintext at their GPA
    [hypervisor]  reads the same GPA: ciphertext

The host half is :class:`sevemu.cli.vmm.SevVmm` (the VMM of ``sevemu vmm``), the owner half
:mod:`sevemu.owner`; they share nothing but the blobs printed here.  The image is padded with zeros
to whole 4 KiB pages and measured so, by both halves (:func:`sevemu.owner.measurement.padded_image`,
the project's one padding rule).  Every option, the guest layout and the size of the secret table
are checked before the first step.  The platform's chain is checked against the ARK of the emulated
manufacturer that made it (as a relying party would pin it).
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from sevemu._util.units import KiB
from sevemu.abi.policy import check_policy
from sevemu.abi.states import PlatformState
from sevemu.certs.chain import PlatformChain
from sevemu.certs.roots import PinnedArk
from sevemu.cli.common import add_platform_args, emit, open_platform, parse_int, platform_amd_chain
from sevemu.cli.owner import parse_secrets
from sevemu.cli.platform import export_pdh, platform_status
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.cli.vmm import GUEST_PROGRAM_TABLE, IMAGE_GPA, Reporter, SevVmm, load_guest_image, plan_layout
from sevemu.crypto.transport import MeasureMacError
from sevemu.errors import InputError
from sevemu.owner.measurement import expected_launch_digest, padded_image
from sevemu.owner.secret import MAX_SECRET_SIZE, secret_table
from sevemu.owner.session import LaunchSession

__all__ = ["DEMO_SECRET", "DEMO_SECRET_GUID", "register"]

DEMO_SECRET_GUID = uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b")  # sevctl's disk-passphrase GUID
DEMO_SECRET = b"sevemu demo disk passphrase: correct horse battery staple"
DEMO_IMAGE = b"".join(f"sevemu demo firmware volume, line {i:05d}\n".encode().ljust(64, b".")
                      for i in range(1024))

_EPILOG = """\
examples:
  sevemu launch
  sevemu launch --image OVMF.fd --secret 736869e5-84f0-4973-92ec-06879ce3da0b:passphrase.txt
  sevemu launch --generation genoa --policy 0x3 --json
the same exchange with files between two parties: sevemu vmm --help"""


def register(sub: Any) -> None:
    p = sub.add_parser("launch", help="a measured SEV launch with a secret, owner and host in one run",
                       description="The guest owner <-> host exchange of a measured SEV launch, step by "
                                   "step, in one process.", epilog=_EPILOG)
    add_platform_args(p)
    p.add_argument("--image", "--firmware", dest="image", type=Path, metavar="FILE",
                   help="guest image (a file of guest memory contents, e.g. firmware; default a demo image)")
    p.add_argument("--image-gpa", default=hex(IMAGE_GPA), help=f"where to load it (default {IMAGE_GPA:#x})")
    p.add_argument("--policy", default="0x1", help="guest policy (default 0x1: NODBG)")
    p.add_argument("--secret", action="append", metavar="GUID:FILE", help="secret entries (default a demo one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # everything the user gave is checked before the first step
    image = load_guest_image(args.image) if args.image is not None else padded_image(DEMO_IMAGE)
    image_gpa = parse_int(args.image_gpa, "--image-gpa", 40)
    layout = plan_layout(image, image_gpa, option="--image-gpa")
    policy = parse_int(args.policy, "--policy")
    try:
        check_policy(policy)
    except InputError as exc:
        raise InputError(f"--policy: {exc}") from None
    secrets = parse_secrets(args.secret) if args.secret else [(str(DEMO_SECRET_GUID), DEMO_SECRET)]
    table = len(secret_table(secrets))
    if table > min(layout.secret_size, MAX_SECRET_SIZE):
        raise InputError(f"--secret: the secret table is {table} bytes; the guest's secret area at GPA "
                         f"{layout.secret_gpa:#x} holds {layout.secret_size} (and KVM takes at most "
                         f"{MAX_SECRET_SIZE // KiB} KiB)")
    quiet = bool(args.json)
    report = Reporter(quiet=quiet)
    step = report.step

    with Progress(progress_enabled(quiet=quiet or bool(getattr(args, "quiet", False))), "launch") as progress, \
            open_platform(args, dram_size=layout.host_dram) as plat:
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

        vmm = SevVmm(plat, layout, policy, report, progress)
        try:
            vmm.start(godh, session)
            vmm.load(image)
            blob = vmm.measure()
            major, minor, build = vmm.api
            digest = expected_launch_digest([image, GUEST_PROGRAM_TABLE])
            try:
                measured = sess.verify_measurement(blob, api_major=major, api_minor=minor, build=build,
                                                   expected_ld=digest)
            except MeasureMacError:
                step("owner", "measurement does NOT match the expected launch: no secret released", ok=False)
                if quiet:
                    emit(args, {"ok": False, "steps": report.steps}, [])
                return 1
            step("owner", f"measurement verified: launch digest {digest.hex()} (API {major}.{minor} build "
                          f"{build}, policy {policy:#x})", launch_digest=digest.hex())
            packet = measured.launch_secret(secrets)
            step("owner", f"secret table with {len(secrets)} entr{'y' if len(secrets) == 1 else 'ies'} sealed "
                          f"for this launch: header {len(packet.header_bytes):#x} bytes, payload "
                          f"{packet.guest_len} bytes")
            vmm.inject(packet.header_bytes, packet.trans)
            entries = vmm.finish_and_run()
        finally:
            vmm.destroy()
    ok = entries == {uuid.UUID(g): v for g, v in secrets}
    if quiet:
        emit(args, {"ok": ok, "generation": plat.generation, "platform_dir": str(plat.directory),
                    "steps": report.steps}, [])
    else:
        print("launch complete: the guest holds its secrets; the host saw only ciphertext" if ok
              else "launch FAILED: the guest did not read back its secrets")
    return 0 if ok else 1
