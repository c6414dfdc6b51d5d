"""``sevemu measure`` (sev-snp-measure's options, plus ``--explain``) and ``sevemu idblock`` (as
``snp-create-id-block``): the guest owner's SEV-SNP launch tools, over :mod:`sevemu.owner.snp_measurement`
and :mod:`sevemu.owner.idblock` (and the SEV / SEV-ES calculator of :mod:`sevemu.owner.measurement`).

``--explain`` lists every PAGE_INFO of an SNP launch -- page type, GPA, CONTENTS (SHA-384 of the page, or
zeros) and the launch digest after it -- runs of the same type at consecutive GPAs shown as one line with
the digest after the last, so a user can find where two digests part.
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sevemu.cli.common import emit, parse_int
from sevemu.cli.vmsa import cpu_signature_of
from sevemu.errors import FileFormatError, InputError
from sevemu.owner import vmsa as owner_vmsa
from sevemu.owner.idblock import make_id_block
from sevemu.owner.measurement import expected_launch_digest, kernel_hashes_table, padded_image
from sevemu.owner.snp_measurement import FOUR_GIB, SnpLaunchDigest, Step, VmmType, ovmf_launch_digest

__all__ = ["register"]

_MODES = ("sev", "seves", "snp", "snp:ovmf-hash")

_MEASURE_EPILOG = """examples:
  sevemu measure --mode snp --vcpus 4 --vcpu-type EPYC-Milan --ovmf /usr/share/ovmf/OVMF.fd
  sevemu measure --mode snp --vcpus 1 --vcpu-type EPYC-v4 --ovmf OVMF.fd --explain
  sevemu measure --mode snp:ovmf-hash --ovmf OVMF.fd
  sevemu measure --mode snp --vcpus 2 --vcpu-sig 0xa00f11 --ovmf OVMF.fd --snp-ovmf-hash HEX
The digest printed is what the firmware's SNP_LAUNCH_FINISH state (and the attestation report's
MEASUREMENT) will hold for a QEMU/KVM launch of that image.
"""

_IDBLOCK_EPILOG = """examples:
  sevemu idblock --measurement BASE64 --idkey id.pem --authorkey author.pem
  sevemu idblock --measurement-hex HEX --idkey id.pem --policy 0x30000 --json
Prints id-block=...,id-auth=... (QEMU's sev-snp-guest properties) and the key digests the report will show.
"""


def register(sub: Any) -> None:
    m = sub.add_parser("measure", help="expected launch digest of an OVMF guest (sev-snp-measure), with --explain",
                       description="The launch digest a QEMU/KVM launch of OVMF gives (sev-snp-measure's options).",
                       epilog=_MEASURE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--mode", required=True, choices=_MODES, help="guest mode")
    m.add_argument("--vcpus", type=int, metavar="N", help="number of guest vCPUs")
    m.add_argument("--vcpu-type", metavar="CPUTYPE", help="QEMU -cpu model (EPYC, EPYC-v4, EPYC-Rome, EPYC-Milan, ...)")
    m.add_argument("--vcpu-sig", metavar="VALUE", help="the vCPU's CPUID(1).EAX signature")
    m.add_argument("--vcpu-family", dest="family", metavar="FAMILY", help="vCPU family (with model and stepping)")
    m.add_argument("--vcpu-model", dest="model", metavar="MODEL", help="vCPU model")
    m.add_argument("--vcpu-stepping", dest="stepping", metavar="STEPPING", help="vCPU stepping")
    m.add_argument("--vmm-type", default="QEMU", metavar="VMMTYPE",
                   help="QEMU, ec2 or gce: the VMM's reset state and launch order, as sev-snp-measure models them")
    m.add_argument("--ovmf", required=True, type=Path, metavar="PATH", help="the OVMF image")
    m.add_argument("--kernel", type=Path, metavar="PATH", help="kernel (measured through the kernel-hashes table)")
    m.add_argument("--initrd", type=Path, metavar="PATH", help="initrd (with --kernel)")
    m.add_argument("--append", metavar="CMDLINE", help="kernel command line (with --kernel)")
    m.add_argument("--guest-features", default="0x1", metavar="VALUE", help="VMSA sev_features (default 0x1)")
    m.add_argument("--output-format", choices=("hex", "base64"), default="hex", help="digest format")
    m.add_argument("--snp-ovmf-hash", metavar="HASH", help="precalculated OVMF digest (hex) to start from")
    m.add_argument("--dump-vmsa", action="store_true", help="write the measured VMSAs to vmsa<N>.bin")
    m.add_argument("--explain", action="store_true", help="list every PAGE_INFO (type, GPA, contents, digest after)")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=run_measure)

    i = sub.add_parser("idblock", help="an SNP ID block and ID auth for a launch digest (snp-create-id-block)",
                       description="ID block and ID authentication information for SNP_LAUNCH_FINISH.",
                       epilog=_IDBLOCK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--measurement", metavar="VALUE", help="the launch digest, base64")
    i.add_argument("--measurement-hex", metavar="HEX", help="the launch digest, hex")
    i.add_argument("--idkey", required=True, type=Path, metavar="PATH", help="ID private key (PEM, P-384)")
    i.add_argument("--authorkey", type=Path, metavar="PATH", help="author private key (PEM, P-384)")
    i.add_argument("--policy", default="0x30000", metavar="P", help="guest policy (default 0x30000)")
    i.add_argument("--family-id", default="", metavar="HEX", help="16-byte family id (hex; default zeros)")
    i.add_argument("--image-id", default="", metavar="HEX", help="16-byte image id (hex; default zeros)")
    i.add_argument("--svn", default="0", metavar="N", help="guest SVN")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=run_idblock)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FileFormatError(f"{what} {path}: {exc.strerror or exc}") from None


def _signature(args: argparse.Namespace, vmm: VmmType = VmmType.QEMU) -> int:
    sig = cpu_signature_of(args)
    if sig is None and vmm is not VmmType.QEMU:
        return 0  # EC2 and GCE start every vCPU with RDX 0x600, whatever the model (sev-snp-measure)
    if sig is None:
        raise InputError("name the vCPU: --vcpu-type, --vcpu-sig or --vcpu-family/--vcpu-model/--vcpu-stepping")
    return sig


def _format(digest: bytes, fmt: str) -> str:
    return digest.hex() if fmt == "hex" else base64.b64encode(digest).decode()


def _explain(steps: list[Step]) -> list[str]:
    lines = [f"{'#':>5}  {'type':<10} {'GPA':<22} {'contents':<18} digest after"]
    i = 0
    while i < len(steps):
        j = i
        while (j + 1 < len(steps) and steps[j + 1].page_type == steps[i].page_type
               and steps[j + 1].gpa == steps[j].gpa + 0x1000 and steps[i].page_type.name != "VMSA"):
            j += 1
        s, e = steps[i], steps[j]
        where = f"{s.gpa:#x}" if i == j else f"{s.gpa:#x}..{e.gpa + 0xFFF:#x}"
        contents = "zeros" if s.contents == bytes(48) and i == j else (s.contents.hex()[:16] if i == j else f"{j - i + 1} pages")
        lines.append(f"{i:>5}  {s.page_type.name:<10} {where:<22} {contents:<18} {e.digest.hex()}")
        i = j + 1
    return lines


def run_measure(args: argparse.Namespace) -> int:
    try:
        vmm = VmmType(args.vmm_type)
    except ValueError:
        raise InputError(f"--vmm-type {args.vmm_type}: QEMU, ec2 or gce") from None
    image = _read(args.ovmf, "OVMF image")
    assert image is not None
    kernel = _read(args.kernel, "kernel")
    initrd = _read(args.initrd, "initrd") or b""
    if kernel is None and (args.initrd is not None or args.append is not None):
        raise InputError("--initrd and --append go with --kernel")
    if args.mode == "snp:ovmf-hash":
        ld = SnpLaunchDigest(record=args.explain)
        ld.normal(FOUR_GIB - len(image), image)
        digest, steps = ld.digest, ld.steps
    elif args.mode == "snp":
        if args.vcpus is None:
            raise InputError("--mode snp needs --vcpus")
        seed = bytes.fromhex(args.snp_ovmf_hash) if args.snp_ovmf_hash else None
        ld = ovmf_launch_digest(image, args.vcpus, _signature(args, vmm),
                                guest_features=parse_int(args.guest_features, "--guest-features", 64),
                                kernel=kernel, initrd=initrd, cmdline=args.append, vmm=vmm, ovmf_hash=seed)
        digest, steps = ld.digest, ld.steps
        if args.dump_vmsa:
            for n, page in enumerate(owner_vmsa.ovmf_vmsa_pages(
                    image, args.vcpus, cpu_signature=_signature(args, vmm),
                    sev_features=parse_int(args.guest_features, "--guest-features", 64),
                    vm_type=owner_vmsa.KvmVmType.SNP_VM, vmm=vmm)):
                Path(f"vmsa{n}.bin").write_bytes(page)
    else:
        if args.explain:
            raise InputError("--explain lists SNP PAGE_INFOs: use --mode snp")
        regions = [padded_image(image)]
        if kernel is not None:
            regions.append(kernel_hashes_table(kernel, initrd, args.append))
        pages: list[bytes] = []
        if args.mode == "seves":
            if args.vcpus is None:
                raise InputError("--mode seves needs --vcpus")
            pages = owner_vmsa.ovmf_vmsa_pages(image, args.vcpus, cpu_signature=_signature(args, vmm), vmm=vmm)
        digest, steps = expected_launch_digest(regions, pages), []
    text = _format(digest, args.output_format)
    lines = _explain(steps) + [text] if args.explain else [text]
    emit(args, {"mode": args.mode, "digest": digest.hex(),
                "steps": [{"type": s.page_type.name, "gpa": s.gpa, "contents": s.contents.hex(), "digest": s.digest.hex()}
                          for s in steps] if args.explain else None}, lines)
    return 0


def _key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    data = _read(path, what)
    assert data is not None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FileFormatError(f"{what} {path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FileFormatError(f"{what} {path}: not an EC key")
    return key


def _id(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text) if text else bytes(16)
    except ValueError:
        raise InputError(f"{what}: {text!r} is not hex") from None
    if len(raw) > 16:
        raise InputError(f"{what}: at most 16 bytes")
    return raw.ljust(16, b"\0")


def run_idblock(args: argparse.Namespace) -> int:
    if (args.measurement is None) == (args.measurement_hex is None):
        raise InputError("give the launch digest once: --measurement (base64) or --measurement-hex")
    try:
        ld = base64.b64decode(args.measurement, validate=True) if args.measurement else bytes.fromhex(args.measurement_hex)
    except ValueError:
        raise InputError("the measurement does not decode") from None
    bundle = make_id_block(ld, _key(args.idkey, "ID key"),
                           _key(args.authorkey, "author key") if args.authorkey is not None else None,
                           policy=parse_int(args.policy, "--policy", 64), family_id=_id(args.family_id, "--family-id"),
                           image_id=_id(args.image_id, "--image-id"), guest_svn=parse_int(args.svn, "--svn"))
    b64 = base64.b64encode
    emit(args, {"id_block": bundle.id_block.hex(), "id_auth": bundle.id_auth.hex(),
                "id_key_digest": bundle.id_key_digest.hex(), "author_key_digest": bundle.author_key_digest.hex()},
         [f"id-block={b64(bundle.id_block).decode()},id-auth={b64(bundle.id_auth).decode()}",
          f"id_key_hash: {b64(bundle.id_key_digest).decode()}",
          f"author_key: {b64(bundle.author_key_digest).decode()}"])
    return 0

