"""``sevemu demo``: two SEV guests on one Milan host, and what each party can see.

1. Boot a platform (Milan by default), INIT the SEV firmware, launch two SEV VMs (measured launch:
   LAUNCH_START -> ACTIVATE -> LAUNCH_UPDATE_DATA -> LAUNCH_MEASURE -> LAUNCH_FINISH).
2. Each guest boots (page tables with the C-bit), stores a secret in private memory and puts a
   message in a shared (C=0) page; the host reads the message and answers.
3. Side by side: the guest's view of its secret (plaintext), the hypervisor's read of the same guest
   page (ciphertext), a DRAM "cold boot" dump searched for the secret (absent) and for the
   ciphertext (present), and VM B reading VM A's page after the hypervisor remapped it (garbage).

``--dump PATH`` is checked before the demo runs (a file name in a writable directory); on a terminal
the demo shows its progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from sevemu._util.units import PAGE, GiB, MiB
from sevemu.certs.roots import GENERATIONS
from sevemu.cli.common import Outputs
from sevemu.cli.progress import Progress, progress_enabled
from sevemu.guest.workloads import demo_guest
from sevemu.hw.dram import ColdBootImage
from sevemu.hw.pyengine import PyEngine
from sevemu.hypervisor.vm import Vm
from sevemu.scenario import build_machine

GUEST_MEMORY = 64 * MiB
IMAGE_GPA = 0x100000
SECRET_GPA = 0x200000
SHARED_GPA = 0x300000
PEEK_GPA = 0x400000


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="two SEV guests, a hypervisor and a DRAM dump: who sees what",
                       description="Launch two SEV guests on one platform and show side by side what the "
                                   "guests, the hypervisor and a cold-boot DRAM dump see.",
                       epilog="examples:\n  sevemu demo\n  sevemu demo --generation genoa --json\n"
                              "  sevemu demo --dump /tmp/dram.img       keep the 1 GiB (sparse) DRAM image")
    p.add_argument("--generation", choices=GENERATIONS, default="milan", help="CPU generation (default milan)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--dump", type=Path, metavar="PATH", help="keep the cold-boot DRAM image at this path")
    p.add_argument("--seed", help="make the run reproducible (seeds the TRNG and boot randomness)")
    p.set_defaults(func=run)


def _console_value(vm: Vm, key: str) -> str:
    for line in reversed(vm.console.decode(errors="replace").splitlines()):
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    return ""


def scenario(generation: str = "milan", dump: Path | None = None, seed: str | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress(False)
    progress.step("booting the platform")
    m = build_machine(generation, seed=seed)
    hv = m.hv
    secrets = {"vm-a": b"vm-a: attack at dawn, key 0x5EC2", "vm-b": b"vm-b: my password is hunter2!!!!"}
    messages = {"vm-a": b"hello host, this is vm-a", "vm-b": b"hello host, this is vm-b"}
    out: dict[str, Any] = {"generation": m.profile.product, "memory_mode": m.profile.mem_mode.value,
                           "cbit": m.profile.cbit, "vms": {}}
    vms: dict[str, Vm] = {}
    progress.step("launching two SEV guests")
    for name, secret in secrets.items():
        vm = hv.create_vm(name, GUEST_MEMORY)
        image = f"sevemu demo boot image for {name}\n".encode().ljust(PAGE, b"\0")
        measure = hv.launch(vm, [(IMAGE_GPA, image)])
        peek = PEEK_GPA if name == "vm-b" else None
        vm.add_vcpu(PyEngine(demo_guest(GUEST_MEMORY, SECRET_GPA, secret, SHARED_GPA,
                                        messages[name], peek)))
        vms[name] = vm
        status = hv.guest_status(vm)
        out["vms"][name] = {"asid": vm.asid, "handle": vm.handle, "guest_state": status.state,
                            "launch_measure": measure[:32].hex(), "mnonce": measure[32:].hex()}
    # Phase 1: boot, store the secret, post a message in the shared page.
    progress.step("running the guests")
    for name, vm in vms.items():
        hv.run(vm)
        shared = vm.host_read(SHARED_GPA, 64).rstrip(b"\0")
        vm.host_write(SHARED_GPA + 64, b"hello " + name.encode() + b", host here")
        out["vms"][name]["shared_page_seen_by_host"] = shared.decode(errors="replace")
        out["vms"][name]["shared_pages_announced"] = sorted(hex(p) for p in vm.shared_gpas)
    # Flush the caches so DRAM holds everything the guests wrote (any host may WBINVD at will),
    # then remap VM B's PEEK page onto VM A's secret page: B will decrypt A's ciphertext with B's key.
    m.soc.wbinvd_all()
    hv.map_foreign(vms["vm-b"], PEEK_GPA, vms["vm-a"], SECRET_GPA)
    # Phase 2: guests print the reply and what they see at their secret (and B at PEEK).
    for vm in vms.values():
        hv.run(vm)
    # Flush the caches so DRAM holds everything the guests wrote (any host may WBINVD at will).
    m.soc.wbinvd_all()
    for name, vm in vms.items():
        secret = secrets[name]
        guest_view = bytes.fromhex(_console_value(vm, "secret"))
        host_view = vm.host_read(SECRET_GPA, len(secret))
        d = out["vms"][name]
        d["console"] = vm.console.decode(errors="replace")
        d["secret"] = secret.decode()
        d["guest_view"] = guest_view.hex()
        d["guest_view_matches"] = guest_view == secret
        d["hypervisor_view"] = host_view.hex()
        d["hypervisor_sees_plaintext"] = host_view == secret
        d["secret_spa"] = hex(vm.spa_of(SECRET_GPA))
    peeked = bytes.fromhex(_console_value(vms["vm-b"], "peek"))
    out["remap"] = {"vm-b_gpa": hex(PEEK_GPA), "vm-a_spa": out["vms"]["vm-a"]["secret_spa"],
                    "vm-b_reads": peeked.hex(), "equals_vm-a_secret": peeked == secrets["vm-a"]}
    progress.step("dumping and searching the first GiB of DRAM")
    with tempfile.TemporaryDirectory() as tmp:
        path = dump or Path(tmp) / "dram.img"
        # the guest pool starts at the hypervisor's reserved boundary; dump the first 1 GiB
        written = m.soc.dram.dump(path, 0, GiB)
        # one pass over the populated part of the image for every needle (the image is sparse)
        ciphertexts = {n: bytes.fromhex(out["vms"][n]["hypervisor_view"]) for n in secrets}
        found = ColdBootImage(path).find_many([*secrets.values(), *ciphertexts.values(), messages["vm-a"]])
        out["cold_boot"] = {
            "path": str(path) if dump else None,
            "bytes_dumped": GiB,
            "populated_bytes": written,
            "secrets_found": {n: [hex(a) for a in found[s]] for n, s in secrets.items()},
            "ciphertext_found": {n: [hex(a) for a in found[c]] for n, c in ciphertexts.items()},
            "shared_message_found": [hex(a) for a in found[messages["vm-a"]]],
        }
    out["firmware_log"] = [f"{name}:{status}" for name, status in m.firmware.log]
    return out


def _print_human(r: dict[str, Any]) -> None:
    w = print
    w(f"sevemu demo: {r['generation']} platform, memory encryption {r['memory_mode']}, C-bit {r['cbit']}")
    w("")
    w("1. Measured launch of two SEV guests (hypervisor -> PSP mailbox -> firmware):")
    for name, d in r["vms"].items():
        w(f"   {name}: handle {d['handle']}, ASID {d['asid']}, state {d['guest_state']} (RUNNING=3), "
          f"MEASURE {d['launch_measure'][:16]}...")
    w("")
    w("2. Each guest stores a secret in private memory (C=1) and talks to the host through a shared page (C=0):")
    for name, d in r["vms"].items():
        for line in d["console"].splitlines()[:2]:
            w(f"   {name} console> {line}")
        w(f"   host read {name}'s shared page in clear: {d['shared_page_seen_by_host']!r}")
    w("")
    w("3. The same secret, seen by each party (16-byte blocks):")
    for name, d in r["vms"].items():
        w(f"   {name} secret page at SPA {d['secret_spa']}")
        w(f"     guest      : {d['guest_view'][:64]}  = {d['secret']!r}")
        w(f"     hypervisor : {d['hypervisor_view'][:64]}  (plaintext? {d['hypervisor_sees_plaintext']})")
    rm = r["remap"]
    w(f"   vm-b, after the hypervisor mapped its GPA {rm['vm-b_gpa']} onto vm-a's page {rm['vm-a_spa']}:")
    w(f"     vm-b reads : {rm['vm-b_reads'][:64]}  (vm-a's secret? {rm['equals_vm-a_secret']})")
    cb = r["cold_boot"]
    w("")
    w(f"4. Cold-boot image of the first GiB of DRAM ({cb['populated_bytes'] // PAGE} pages populated):")
    for name, hits in cb["secrets_found"].items():
        w(f"     {name} secret plaintext found at: {hits or 'nowhere'}")
    for name, hits in cb["ciphertext_found"].items():
        w(f"     {name} ciphertext found at:       {hits or 'nowhere'}")
    w(f"     vm-a's shared-page message (C=0) found at: {cb['shared_message_found'] or 'nowhere'}")
    if cb["path"]:
        w(f"   image kept at {cb['path']}")
    w("")
    w("Guest plaintext never left the SoC: the hypervisor and DRAM hold only ciphertext; shared pages are")
    w("the guest's deliberate exception.  SEV has no integrity: the hypervisor could still write that")
    w("ciphertext, or remap pages -- the guest then reads garbage, as vm-b did.")


def run(args: argparse.Namespace) -> int:
    if args.dump is not None:
        Outputs().add(args.dump, "--dump (the DRAM image)", create_parents=False)  # before the demo runs
    enabled = progress_enabled(quiet=args.json or bool(getattr(args, "quiet", False)))
    with Progress(enabled, "demo") as progress:
        r = scenario(args.generation, args.dump, args.seed, progress)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print_human(r)
    return 0
