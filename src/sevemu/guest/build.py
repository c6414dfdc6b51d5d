"""Guest images from source: small freestanding C programs, built with the machine's gcc.

Each bundled guest is one C file in ``guest/images/`` linked with the boot stub (``boot.S``: from
the defined 32-bit initial state to long mode, with page tables that carry the C-bit when memory
encryption is active) and a tiny runtime (``rt.c``: console on COM1, hypercalls, the shared bounce
buffer) by ``link.ld`` into a flat image loaded at GPA 1 MiB.  The flat image is what the
hypervisor hands to LAUNCH_UPDATE_DATA, so the launch measurement covers exactly the code and data
that run -- zero-filled sections, page-table space and stacks included.

Builds are cached under ``$SEVEMU_BUILD_DIR`` (default ``$XDG_CACHE_HOME/sevemu/guests``), one
directory per guest keyed by a hash of every input (sources, flags, compiler version), so an edit
rebuilds and an unchanged tree does not.  A missing toolchain or a compile error raises
:class:`~sevemu.errors.GuestBuildError` with the compiler's message.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sevemu._util.paths import user_cache_dir
from sevemu.errors import GuestBuildError

__all__ = [
    "GUESTS",
    "IMAGE_BASE",
    "GuestImage",
    "Toolchain",
    "build_dir",
    "build_guest",
    "build_source",
    "images_dir",
    "list_guests",
    "toolchain",
]

IMAGE_BASE = 0x100000
"""GPA (and identity-mapped virtual address) at which every image is linked and loaded."""

GUESTS: dict[str, str] = {
    "hello": "prints through the serial console",
    "sevinfo": "reports SEV_STATUS, CPUID 0x8000001F and its C-bit (output differs plain vs SEV)",
    "secret": "derives a key into private memory and computes a MAC with it",
    "shared": "talks to the host through a bounce buffer in a C-bit-clear page",
    "victim": "halts between ticks; the target of the shellcode-injection demo",
    "crash": "executes an invalid instruction: a triple fault",
    "smp": "sums a table on every vCPU (use with --vcpus)",
    "bench": "the CPU benchmark's guest (compute loop, VMEXIT and VMGEXIT round trips)",
    "regs": "keeps a key in a register across an exit (what SEV-ES changes: --attack-registers)",
    "ghcbbad": "SEV-ES only: sends malformed GHCBs, then asks to be terminated",
    "mmio": "SEV-ES only: a device register the host emulates (reserved-bit NPT entry, #VC 0x400)",
    "snpmem": "SEV-SNP: validates memory the launch left out (PSC + PVALIDATE, #VC 0x404 on demand)",
    "attest": "SEV-SNP: its own attestation report (VMPCK0, AES-256-GCM, NAE guest request); the host verifies it",
}

CFLAGS = ("-m64", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-pie", "-mno-red-zone", "-O2",
          "-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
          "-fno-tree-loop-distribute-patterns", "-fcf-protection=none", "-Wall", "-Werror")
ASFLAGS = ("-m64", "-fno-pic", "-fno-pie")
LDFLAGS = ("-nostdlib", "-static", "-z", "max-page-size=4096", "--build-id=none", "-no-pie")
_RUNTIME = ("boot.S", "rt.c", "rt.h", "link.ld", "aesgcm.h")


def images_dir() -> Path:
    """The directory holding the bundled guest sources."""
    return Path(__file__).parent / "images"


def list_guests() -> list[tuple[str, str]]:
    """(name, description) of every bundled guest."""
    return sorted(GUESTS.items())


def build_dir() -> Path:
    """Where builds are cached (``$SEVEMU_BUILD_DIR``, else the user's cache directory)."""
    return user_cache_dir("guests", "SEVEMU_BUILD_DIR")


@dataclass(frozen=True)
class Toolchain:
    """The host tools a build needs."""

    cc: str
    ld: str
    objcopy: str
    nm: str
    version: str


def toolchain(cc: str | None = None) -> Toolchain:
    """Locate gcc and binutils; :class:`GuestBuildError` says what is missing."""
    cc = cc or os.environ.get("SEVEMU_CC", "gcc")
    tools = {"cc": cc, "ld": "ld", "objcopy": "objcopy", "nm": "nm"}
    found = {k: shutil.which(v) for k, v in tools.items()}
    missing = [tools[k] for k, v in found.items() if v is None]
    if missing:
        raise GuestBuildError(
            f"cannot build guest images: {', '.join(missing)} not found on PATH "
            "(install gcc and binutils, e.g. apt-get install gcc binutils)"
        )
    try:
        out = subprocess.run([found["cc"] or cc, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        raise GuestBuildError(f"cannot run {cc}: {exc}") from exc
    version = out.stdout.splitlines()[0] if out.stdout else cc
    return Toolchain(cc=found["cc"] or cc, ld=found["ld"] or "ld", objcopy=found["objcopy"] or "objcopy",
                     nm=found["nm"] or "nm", version=version)


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the flat image and where things are in it."""

    name: str
    data: bytes
    base: int
    entry: int
    symbols: dict[str, int] = field(repr=False)
    path: Path
    digest: str
    """SHA-256 of :attr:`data` (hex): what the owner's measurement calculator is given."""

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def symbol(self, name: str) -> int:
        """Address (GPA) of a symbol of the image."""
        try:
            return self.symbols[name]
        except KeyError:
            raise GuestBuildError(f"guest {self.name!r} has no symbol {name!r}") from None

    def patched(self, name: str, value: int, size: int = 8) -> GuestImage:
        """A copy with the ``size``-byte little-endian variable ``name`` set to ``value``.

        The measurement changes with it: a patched image is a different image.
        """
        off = self.symbol(name) - self.base
        if not 0 <= off <= len(self.data) - size:
            raise GuestBuildError(f"symbol {name!r} of {self.name!r} is not inside the loaded image")
        data = bytearray(self.data)
        data[off : off + size] = value.to_bytes(size, "little")
        blob = bytes(data)
        return GuestImage(self.name, blob, self.base, self.entry, self.symbols, self.path,
                          hashlib.sha256(blob).hexdigest())


def _hash_inputs(files: list[Path], tc: Toolchain) -> str:
    h = hashlib.sha256()
    for part in (tc.version, " ".join(CFLAGS), " ".join(ASFLAGS), " ".join(LDFLAGS)):
        h.update(part.encode() + b"\0")
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except OSError as exc:
        raise GuestBuildError(f"{what}: cannot run {cmd[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(f"{what}: {cmd[0]} did not finish") from exc
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        lines = msg.splitlines()
        if len(lines) > 25:
            msg = "\n".join(lines[:25] + [f"... ({len(lines) - 25} more lines)"])
        raise GuestBuildError(f"{what} failed:\n{msg}")
    return proc.stdout


def build_guest(name: str, *, cc: str | None = None, cache: Path | None = None, rebuild: bool = False) -> GuestImage:
    """Build (or take from the cache) the bundled guest ``name``."""
    if name not in GUESTS:
        raise GuestBuildError(f"no bundled guest {name!r}; known: {', '.join(sorted(GUESTS))}")
    return build_source(images_dir() / f"{name}.c", name=name, cc=cc, cache=cache, rebuild=rebuild)


def build_source(source: Path, *, name: str | None = None, cc: str | None = None, cache: Path | None = None,
                 rebuild: bool = False) -> GuestImage:
    """Build the guest whose ``main`` is in the C file ``source`` (with the bundled runtime)."""
    source = Path(source)
    if not source.is_file():
        raise GuestBuildError(f"guest source {source} does not exist")
    name = name or source.stem
    tc = toolchain(cc)
    rt = images_dir()
    files = [rt / f for f in _RUNTIME] + [source]
    for f in files:
        if not f.is_file():
            raise GuestBuildError(f"guest runtime file {f} is missing")
    key = _hash_inputs(files, tc)
    out_dir = (cache or build_dir()) / f"{name}-{key}"
    image_path = out_dir / f"{name}.bin"
    sym_path = out_dir / f"{name}.sym"
    if rebuild or not (image_path.is_file() and sym_path.is_file()):
        _build(source, name, tc, out_dir)
    return _load(name, image_path, sym_path)


def _build(source: Path, name: str, tc: Toolchain, out_dir: Path) -> None:
    rt = images_dir()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{name}-") as tmp:
        t = Path(tmp)
        objs = []
        for src, obj, flags in ((rt / "boot.S", t / "boot.o", ASFLAGS), (rt / "rt.c", t / "rt.o", CFLAGS),
                                (source, t / "main.o", CFLAGS)):
            _run([tc.cc, *flags, f"-I{rt}", "-c", str(src), "-o", str(obj)], f"compiling {src.name}")
            objs.append(str(obj))
        elf = t / f"{name}.elf"
        _run([tc.ld, *LDFLAGS, "-T", str(rt / "link.ld"), "-o", str(elf), *objs], f"linking {name}")
        _run([tc.objcopy, "-O", "binary", "--set-section-flags", ".bss=alloc,load,contents",
              str(elf), str(t / f"{name}.bin")], f"objcopy {name}")
        (t / f"{name}.sym").write_text(_run([tc.nm, "-n", str(elf)], f"symbols of {name}"))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(t, out_dir)
        t.mkdir()  # TemporaryDirectory removes its (now moved) directory on exit


def _load(name: str, image_path: Path, sym_path: Path) -> GuestImage:
    data = image_path.read_bytes()
    symbols: dict[str, int] = {}
    for line in sym_path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                symbols[parts[2]] = int(parts[0], 16)
            except ValueError:
                continue
    base = symbols.get("__image_start", IMAGE_BASE)
    entry = symbols.get("_start", base)
    if not data:
        raise GuestBuildError(f"guest {name!r} built to an empty image")
    if entry != base:
        raise GuestBuildError(f"guest {name!r}: the entry point {entry:#x} is not the image's first byte {base:#x}")
    return GuestImage(name, data, base, entry, symbols, image_path, hashlib.sha256(data).hexdigest())
