"""``sevemu vmsa build|show|update``: SEV-ES VMSA files, in the manner of ``sevctl vmsa`` (virtee/sevctl
``src/vmsa/``), and the vCPU options ``measurement build|verify`` share with them.

* ``vmsa build FILE --cpu N (--vcpu-type T | --family F --model M --stepping S | --vcpu-sig SIG)
  [--firmware OVMF | --reset-eip ADDR] [--vm-type init2|legacy] [--vmsa-features F]``: the 4 KiB
  VMSA page KVM makes for vCPU N of a QEMU guest (:mod:`sevemu.owner.vmsa`): vCPU 0 starts at the
  reset vector, the others at the OVMF image's SEV-ES reset block (or ``--reset-eip``).
  ``--vm-type legacy`` is the ``KVM_SEV_ES_INIT`` VM, whose pages sevctl builds (FPU words 0) and
  which QEMU makes by default (``legacy-vm-type=auto``); ``init2`` (the default here, as in
  sev-snp-measure) the ``KVM_SEV_INIT2`` VM (QEMU ``legacy-vm-type=off``).
* ``vmsa show FILE [--json]``: the fields of a VMSA page (raw, hex or base64), by Linux's names
  (``struct sev_es_save_area``); segments as ``selector/attrib/limit/base``.  Human output lists
  the non-zero fields; ``--json`` all of them, segments as objects as sevctl prints them.
* ``vmsa update FILE [--cpu N --firmware OVMF | --reset-eip ADDR] [--vcpu-type T | --family ...]
  [--set FIELD=VALUE ...]``: change a file in place, as sevctl's ``update`` (CPU signature in RDX,
  an AP's reset address) and, beyond it, any field by name (``cs.base=0x800000``, ``rdx=0xa00f11``,
  ``guest_intercept_vectors[1]=0x10``, bytes fields in hex of their exact size).

Departures from sevctl, each to refuse a silent wrong result: an application processor (``--cpu``
other than 0) without ``--firmware`` or ``--reset-eip`` is refused (sevctl writes the BSP's reset
vector); a VMSA without a vCPU model is refused (sevctl writes RDX 0, which no QEMU vCPU has);
``--userspace krun`` is not modelled.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

from sevemu.abi.struct import layout_fields
from sevemu.abi.vmsa import SEGMENT_REGISTERS, VMSA_PAGE_SIZE, SevEsSaveArea, SevFeatures
from sevemu.cli.common import Outputs, emit, parse_int, read_blob, read_file
from sevemu.errors import FileFormatError, InputError, LayoutError
from sevemu.owner.ovmf import sev_es_reset_eip
from sevemu.owner.vmsa import BSP_RESET_EIP, KvmVmType, build_vmsa, cpuid_signature, vcpu_signature

__all__ = [
    "MAX_VCPUS",
    "VM_TYPES",
    "add_vcpu_args",
    "cpu_signature_of",
    "features_of",
    "read_vmsa",
    "register",
    "vcpu_given",
    "vm_options_given",
    "vm_type_of",
    "vmsa_fields",
    "vmsa_json",
]

VM_TYPES = {"init2": KvmVmType.SEV_ES_VM, "legacy": KvmVmType.DEFAULT_VM}
"""``--vm-type`` values: the KVM VM type the host makes the SEV-ES guest with (owner.vmsa)."""
MAX_VCPUS = 4096
"""The most vCPUs a KVM VM can have (Linux ``KVM_MAX_VCPUS`` on x86)."""


# ---- the vCPU options (measurement build|verify, vmsa build|update) ----------------------------
def add_vcpu_args(p: argparse._ActionsContainer, *, vm: bool = True) -> None:
    """``--vcpu-type``, ``--vcpu-sig``, ``--family/--model/--stepping`` (also spelled
    ``--vcpu-family`` ...), and with ``vm`` the VM's ``--vm-type`` and ``--vmsa-features``."""
    p.add_argument("--vcpu-type", metavar="TYPE",
                   help="QEMU's -cpu model of the guest (EPYC, EPYC-v4, EPYC-Rome, EPYC-Milan, EPYC-Genoa, "
                        "... and their versions)")
    p.add_argument("--vcpu-sig", metavar="SIG", help="the vCPU's CPUID(1).EAX signature itself")
    p.add_argument("--family", "--vcpu-family", dest="family", metavar="F", help="CPU family (with --model, "
                   "--stepping)")
    p.add_argument("--model", "--vcpu-model", dest="model", metavar="M", help="CPU model")
    p.add_argument("--stepping", "--vcpu-stepping", dest="stepping", metavar="S", help="CPU stepping")
    if vm:
        p.add_argument("--vm-type", choices=tuple(VM_TYPES), default=None,
                       help="the KVM VM type the host made: init2 (KVM_SEV_INIT2, QEMU legacy-vm-type=off; "
                            "sev-snp-measure's pages; the default) or legacy (KVM_SEV_ES_INIT, QEMU's default "
                            "legacy-vm-type=auto/on; sevctl's VMSAs)")
        p.add_argument("--vmsa-features", metavar="F",
                       help="the VM's vmsa_features = VMSA sev_features (init2 only; KVM takes DEBUG_SWAP 0x20)")


def vcpu_given(args: argparse.Namespace) -> bool:
    """Whether any option naming the vCPU model was given."""
    return any(getattr(args, k, None) is not None for k in ("vcpu_type", "vcpu_sig", "family", "model", "stepping"))


def cpu_signature_of(args: argparse.Namespace) -> int | None:
    """The CPUID(1).EAX signature the vCPU options give, or ``None`` when none is given."""
    fms = [getattr(args, k) for k in ("family", "model", "stepping")]
    ways = [args.vcpu_type is not None, args.vcpu_sig is not None, any(v is not None for v in fms)]
    if sum(ways) > 1:
        raise InputError("name the vCPU one way: --vcpu-type, --vcpu-sig or --family/--model/--stepping")
    if args.vcpu_type is not None:
        return vcpu_signature(args.vcpu_type)
    if args.vcpu_sig is not None:
        return parse_int(args.vcpu_sig, "--vcpu-sig")
    if ways[2]:
        if None in fms:
            raise InputError("--family, --model and --stepping go together")
        family, model, stepping = (parse_int(v, f"--{k}", 16) for v, k in zip(fms, ("family", "model", "stepping"),
                                                                              strict=True))
        return cpuid_signature(family, model, stepping)
    return None


def vm_type_of(args: argparse.Namespace) -> KvmVmType:
    """The KVM VM type ``--vm-type`` names (default: the KVM_SEV_INIT2 VM)."""
    return VM_TYPES[args.vm_type or "init2"]


def features_of(args: argparse.Namespace) -> int:
    """The VM's ``vmsa_features`` (``--vmsa-features``, default 0)."""
    return parse_int(args.vmsa_features, "--vmsa-features", 64) if args.vmsa_features is not None else 0


def vm_options_given(args: argparse.Namespace) -> bool:
    """Whether ``--vm-type`` or ``--vmsa-features`` was given."""
    return args.vm_type is not None or args.vmsa_features is not None


# ---- VMSA files --------------------------------------------------------------------------------
def read_vmsa(path: Path) -> SevEsSaveArea:
    """A VMSA page from ``path`` (raw, or hex / base64 text); one line naming the file if it is not."""
    data = read_file(path)
    if len(data) != VMSA_PAGE_SIZE:
        data = read_blob(path, VMSA_PAGE_SIZE, "a VMSA page")
    try:
        return SevEsSaveArea.decode(data)
    except LayoutError as exc:
        raise FileFormatError(f"{path}: not an SEV-ES VMSA page: {exc}") from None


def _value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, tuple):
        return [_value(e) for e in v]
    return v


def _shown(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex() if len(v) <= 16 else f"{v.hex()[:32]}... ({len(v)} bytes)"
    if isinstance(v, tuple):
        return "[" + ", ".join(f"{e:#x}" for e in v) + "]"
    return f"{v:#x}"


def vmsa_json(vmsa: SevEsSaveArea) -> dict[str, Any]:
    """Every field by name; segments as ``{selector, attrib, limit, base}`` objects (sevctl's shape)."""
    out: dict[str, Any] = {}
    for info in layout_fields(SevEsSaveArea):
        seg, _, part = info.name.partition("_")
        value = _value(getattr(vmsa, info.name))
        if seg in SEGMENT_REGISTERS and part in ("selector", "attrib", "limit", "base"):
            out.setdefault(seg, {})[part] = value
        else:
            out[info.name] = value
    return out


def vmsa_fields(vmsa: SevEsSaveArea) -> list[tuple[str, str]]:
    """The non-zero fields, for people: segments on one line each, sev_features by name."""
    rows: list[tuple[str, str]] = []
    for seg in SEGMENT_REGISTERS:
        s = vmsa.segment(seg)
        if any((s.selector, s.attrib, s.limit, s.base)):
            rows.append((seg, f"selector {s.selector:#06x} attrib {s.attrib:#06x} limit {s.limit:#x} base {s.base:#x}"))
    for info in layout_fields(SevEsSaveArea):
        seg, _, part = info.name.partition("_")
        value = getattr(vmsa, info.name)
        if (seg in SEGMENT_REGISTERS and part in ("selector", "attrib", "limit", "base")) or not _nonzero(value):
            continue
        text = _shown(value)
        if info.name == "sev_features":
            names = "|".join(f.name or "" for f in SevFeatures if f & value)
            unknown = value & ~sum(int(f) for f in SevFeatures)
            text += f" ({names}{'|' if names and unknown else ''}{f'{unknown:#x}' if unknown else ''})"
        rows.append((info.name, text))
    return rows


def _nonzero(value: Any) -> bool:
    return any(value) if isinstance(value, (bytes, tuple)) else bool(value)


# ---- build / update ---------------------------------------------------------------------------
def _reset_eip(args: argparse.Namespace) -> int | None:
    """The reset EIP ``--cpu``/``--firmware``/``--reset-eip`` give (None: leave the file's)."""
    if args.firmware is not None and args.reset_eip is not None:
        raise InputError("give the APs' reset address once: --firmware OVMF or --reset-eip ADDR")
    if args.cpu is None:
        if args.firmware is not None or args.reset_eip is not None:
            raise InputError("--firmware and --reset-eip need --cpu N (vCPU 0 starts at the reset vector)")
        return None
    if args.cpu == 0:
        if args.reset_eip is not None:
            raise InputError("--reset-eip is for an application processor; vCPU 0 starts at the reset vector")
        return BSP_RESET_EIP  # --firmware is accepted and unused for vCPU 0, as sevctl does
    if args.reset_eip is not None:
        return parse_int(args.reset_eip, "--reset-eip")
    if args.firmware is None:
        raise InputError(f"--cpu {args.cpu} is an application processor: give --firmware OVMF (its SEV-ES reset "
                         "block) or --reset-eip ADDR")
    try:
        return sev_es_reset_eip(read_file(args.firmware))
    except LayoutError as exc:
        raise FileFormatError(f"{args.firmware}: {exc}") from None


def _cpu_index(text: str) -> int:
    """argparse type: a vCPU index."""
    try:
        value = int(text, 0)
    except ValueError:
        value = -1
    if not 0 <= value < MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a vCPU index (0..{MAX_VCPUS - 1})")
    return value


_SET = re.compile(r"^(?P<name>[a-z0-9_]+)(?:\.(?P<part>[a-z]+))?(?:\[(?P<index>\d+)\])?=(?P<value>.*)$")


def _apply_set(vmsa: SevEsSaveArea, item: str) -> SevEsSaveArea:
    """One ``--set FIELD=VALUE``; errors name the field."""
    m = _SET.match(item.strip())
    if m is None:
        raise InputError(f"--set {item!r}: expected FIELD=VALUE (e.g. rdx=0xa00f11, cs.base=0x800000)")
    name = m["name"] if m["part"] is None else f"{m['name']}_{m['part']}"
    infos = {info.name: info for info in layout_fields(SevEsSaveArea)}
    info = infos.get(name)
    if info is None:
        close = [n for n in infos if n.startswith(name.split("_")[0])][:6]
        hint = f"; did you mean {', '.join(close)}?" if close else "; sevemu vmsa show --json lists them"
        raise InputError(f"--set {item!r}: the VMSA has no field {name!r}{hint}")
    text = m["value"]
    value: Any
    if info.kind == "bytes":
        if m["index"] is not None:
            raise InputError(f"--set {item!r}: {name} is a byte field, not an array")
        try:
            value = bytes.fromhex(text)
        except ValueError:
            raise InputError(f"--set {item!r}: {name} takes {info.size} bytes in hex") from None
        if len(value) != info.size:
            raise InputError(f"--set {item!r}: {name} takes {info.size} bytes in hex, got {len(value)}")
    elif info.kind == "ints":
        if m["index"] is None or int(m["index"]) >= info.count:
            raise InputError(f"--set {item!r}: {name} is an array; set one element, {name}[0..{info.count - 1}]=V")
        elems = list(getattr(vmsa, name))
        elems[int(m["index"])] = parse_int(text, f"--set {name}[{m['index']}]", 8 * info.elem_size)
        value = tuple(elems)
    else:
        if m["index"] is not None:
            raise InputError(f"--set {item!r}: {name} is not an array")
        value = parse_int(text, f"--set {name}", 8 * info.size)
    return dataclasses.replace(vmsa, **{name: value})


_BUILD_EPILOG = """\
examples:
  sevemu vmsa build vmsa0.bin --cpu 0 --vcpu-type EPYC-Milan
  sevemu vmsa build vmsa1.bin --cpu 1 --vcpu-type EPYC-Milan --firmware /usr/share/ovmf/OVMF.fd
  sevemu vmsa build vmsa0.bin --cpu 0 --family 25 --model 1 --stepping 1 --vm-type legacy   (sevctl's bytes)"""
_VMSA_EPILOG = """\
examples:
  sevemu vmsa build vmsa1.bin --cpu 1 --vcpu-type EPYC-Milan --firmware /usr/share/ovmf/OVMF.fd
  sevemu vmsa show vmsa1.bin
  sevemu vmsa update vmsa1.bin --set sev_features=0x20"""
_SHOW_EPILOG = """\
examples:
  sevemu vmsa show vmsa1.bin
  sevemu vmsa show vmsa1.bin --json"""
_UPDATE_EPILOG = """\
examples:
  sevemu vmsa update vmsa1.bin --cpu 1 --firmware OVMF.fd          (the AP reset address of another image)
  sevemu vmsa update vmsa0.bin --vcpu-type EPYC-Genoa               (RDX: another vCPU model)
  sevemu vmsa update vmsa0.bin --set sev_features=0x20 --set cs.base=0xffff0000"""


def register(sub: Any) -> None:
    v = sub.add_parser("vmsa", help="build, show or update an SEV-ES VMSA file (sevctl vmsa)",
                       description="SEV-ES initial VMSA pages as KVM makes them for QEMU vCPUs (sevctl vmsa).",
                       epilog=_VMSA_EPILOG)
    vsub = v.add_subparsers(dest="vmsa_command", required=True, metavar="ACTION")
    b = vsub.add_parser("build", help="the VMSA page of one vCPU of a QEMU/KVM SEV-ES guest", epilog=_BUILD_EPILOG)
    s = vsub.add_parser("show", help="the fields of a VMSA page", epilog=_SHOW_EPILOG)
    u = vsub.add_parser("update", help="change fields of a VMSA file in place", epilog=_UPDATE_EPILOG)
    for p in (b, u):
        p.add_argument("file", type=Path, metavar="FILE", help="the VMSA file (4096 bytes)")
        p.add_argument("--cpu", type=_cpu_index, required=p is b, metavar="N",
                       help="vCPU index: 0 the bootstrap processor, others the application processors")
        p.add_argument("--firmware", type=Path, metavar="OVMF", help="the OVMF image (an AP's reset address)")
        p.add_argument("--reset-eip", metavar="ADDR", help="an AP's reset address itself")
        p.add_argument("--userspace", choices=("qemu", "krun"), default="qemu",
                       help="the VMM (qemu; krun is not modelled)")
        add_vcpu_args(p, vm=p is b)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    u.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set a field by its name (repeatable; sevemu vmsa show --json lists them)")
    s.add_argument("file", type=Path, metavar="FILE", help="the VMSA file (raw, hex or base64)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=run_build)
    s.set_defaults(func=run_show)
    u.set_defaults(func=run_update)


def _userspace(args: argparse.Namespace) -> None:
    if args.userspace != "qemu":
        raise InputError(f"--userspace {args.userspace}: only QEMU's vCPU reset state is modelled")


def run_build(args: argparse.Namespace) -> int:
    _userspace(args)
    inputs = (args.firmware,) if args.firmware is not None else ()
    outputs = Outputs(inputs=inputs)
    outputs.add(args.file, "the VMSA file")
    signature = cpu_signature_of(args)
    if signature is None:
        raise InputError("vmsa build needs the vCPU model: --vcpu-type T, --family F --model M --stepping S, "
                         "or --vcpu-sig SIG")
    eip = _reset_eip(args)
    if eip is None:
        raise InputError("vmsa build needs --cpu N")
    vm_type = vm_type_of(args)
    vmsa = build_vmsa(eip, cpu_signature=signature, sev_features=features_of(args), vm_type=vm_type)
    outputs.write(args.file, vmsa.encode())
    emit(args, {"file": str(args.file), "cpu": args.cpu, "reset_eip": eip, "cpu_signature": signature,
                "vm_type": args.vm_type or "init2", "vmsa_features": vmsa.sev_features},
         [(f"Wrote {args.file}: VMSA of vCPU {args.cpu} (reset EIP {eip:#010x}, CPUID signature {signature:#010x}, "
          f"{vm_type.init_command} VM)")])
    return 0


def run_show(args: argparse.Namespace) -> int:
    vmsa = read_vmsa(args.file)
    rows = vmsa_fields(vmsa)
    emit(args, vmsa_json(vmsa),
         [f"{args.file}: SEV-ES VMSA ({VMSA_PAGE_SIZE} bytes)"] + [f"  {k:<18} {v}" for k, v in rows]
         + ["  (all other fields 0)"])
    return 0


def run_update(args: argparse.Namespace) -> int:
    _userspace(args)
    vmsa = read_vmsa(args.file)
    outputs = Outputs(inputs=(args.firmware,) if args.firmware is not None else ())
    outputs.add(args.file, "the updated VMSA file")
    changes: dict[str, Any] = {}
    signature = cpu_signature_of(args)
    if signature is not None:
        changes["rdx"] = signature
    eip = _reset_eip(args)
    if eip is not None:
        changes.update(cs_base=eip & 0xFFFF0000, rip=eip & 0xFFFF)
    if not changes and not args.set:
        raise InputError("nothing to update: give --vcpu-type/--family..., --cpu N with --firmware, or --set FIELD=V")
    vmsa = dataclasses.replace(vmsa, **changes)
    for item in args.set:
        vmsa = _apply_set(vmsa, item)
    outputs.write(args.file, vmsa.encode())
    emit(args, {"file": str(args.file), "fields": vmsa_json(vmsa)}, [f"Updated {args.file}"])
    return 0
