"""The composition root: manufacture -> platform -> firmware -> hypervisor -> guests.

This is the only place that holds every part at once, the way a factory and a data centre do:
it builds a :class:`~sevemu.hw.soc.Soc` for a CPU generation, takes the PSP's private ports and
loads the firmware behind the mailbox, and starts the hypervisor on the host side.  Nothing else
crosses those boundaries: the hypervisor drives the firmware only through mailbox registers, and
guests talk to the hypervisor only through exits and shared pages.

The factory (:func:`manufacture`): a chip is fused (:class:`~sevemu.amd.chip.FusedChip`), the
emulated AMD root of its generation certifies its CEK, and the fuses (the chip secret and the
digests of the ARKs the firmware will trust), the CEK certificate and the AMD chain (ASK || ARK) are
written into the *platform directory* (:mod:`sevemu.firmware.nvstore`), where the firmware finds
them when it boots -- bytes in files, the firmware never imports the manufacturer.  AMD also records
an SEV-SNP chip's secret in its vault (:class:`~sevemu.amd.vault.AmdRegistry`), which its KDS
(``sevemu kds serve``) needs to certify the chip's VCEKs.
:func:`build_machine` manufactures a chip into its platform directory the first time and boots from
it every time: the same directory (in a new process too) gives the same chip and the same platform
identity.  Two processes making the same directory at once get one chip: the loser boots the
winner's.

The emulated AMD's own vault: the ARK and ASK private keys of each generation (RSA-4096 key
generation takes about a second per key) are made once and kept in the process and in
``$SEVEMU_AMD_VAULT/<generation>`` (default ``$XDG_DATA_HOME/sevemu-amd-vault``, i.e.
``~/.local/share/sevemu-amd-vault``; ``SEVEMU_AMD_VAULT=""`` keeps them in the process only).  The
vault stands for AMD's side of the world: only this module, in its role of the factory, reads it;
the platform directory, the host (hypervisor, CLI host commands) and the host's cache never hold
these keys (``docs/threat-model.md``).  The keys are emulated, and never trusted by real
verifiers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sevemu._util.units import GiB, MiB
from sevemu.amd.chip import CHIP_SECRET_SIZE, FusedChip
from sevemu.amd.roots import AmdRoot
from sevemu.amd.vault import AmdRegistry
from sevemu.crypto.vcek import SNP_GENERATIONS
from sevemu.errors import InputError, SevemuError
from sevemu.firmware.apis import load_firmware
from sevemu.firmware.core import Firmware
from sevemu.firmware.nvstore import (
    FactoryData,
    FactoryDataError,
    FactoryMissingError,
    NotAPlatformError,
    NvTamperedError,
    PlatformDirError,
    PlatformExistsError,
    PlatformReadOnlyError,
    is_manufactured,
    read_factory,
    write_factory,
)
from sevemu.hw.profiles import CpuProfile, profile
from sevemu.hw.soc import Soc
from sevemu.hypervisor.kvm import Hypervisor

__all__ = [
    "FactoryDataError",
    "FactoryMissingError",
    "Machine",
    "NotAPlatformError",
    "NvTamperedError",
    "PlatformDirError",
    "PlatformExistsError",
    "PlatformReadOnlyError",
    "SeededRng",
    "amd_registry",
    "amd_vault_dir",
    "build_machine",
    "default_amd_root",
    "manufacture",
]



@dataclass
class Machine:
    """One SEV host: the SoC, the firmware on its PSP, and the hypervisor."""

    soc: Soc
    firmware: Firmware
    hv: Hypervisor
    platform_dir: Path | None = None
    """Where the chip's fuses, factory data and NV store live."""
    amd_root: AmdRoot | None = None
    """The emulated manufacturer that certified this chip, when known (its ``pin()`` is the trust anchor)."""

    @property
    def profile(self) -> CpuProfile:
        return self.soc.profile

    @property
    def notices(self) -> list[str]:
        """What the platform noticed at boot that its user should hear (:attr:`Firmware.notices`)."""
        return self.firmware.notices


class SeededRng:
    """A deterministic byte source (SHA-256 in counter mode) for reproducible runs and tests.

    Not a cryptographic RNG for real secrets: it stands in for the PSP's TRNG and the boot-time
    randomness of the SoC when a run must be repeatable.
    """

    def __init__(self, seed: bytes | str) -> None:
        self._key = seed.encode() if isinstance(seed, str) else bytes(seed)
        self._counter = 0
        self._pool = b""

    def __call__(self, n: int) -> bytes:
        while len(self._pool) < n:
            block = hashlib.sha256(self._key + self._counter.to_bytes(8, "little")).digest()
            self._pool += block
            self._counter += 1
        out, self._pool = self._pool[:n], self._pool[n:]
        return out


# ---- the emulated manufacturer ------------------------------------------------------------------
_ROOTS: dict[str, AmdRoot] = {}


def amd_vault_dir() -> Path | None:
    """Where the emulated AMD keeps its signing keys (module docstring); None: in the process only."""
    env = os.environ.get("SEVEMU_AMD_VAULT")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sevemu-amd-vault"


def _cached_root(generation: str) -> AmdRoot | None:
    """The root of ``generation`` from the process or the vault, without making one."""
    root = _ROOTS.get(generation)
    cache = amd_vault_dir()
    if root is None and cache is not None and (cache / generation).is_dir():
        try:
            root = AmdRoot.load(cache / generation)
        except (OSError, SevemuError):
            return None  # unreadable or stale: default_amd_root makes a new one
        if root.generation != generation:
            return None
        _ROOTS[generation] = root
    return root


def default_amd_root(generation: str) -> AmdRoot:
    """The emulated AMD root of ``generation``: made once, then kept in the vault (module docstring)."""
    root = _cached_root(generation)
    if root is not None:
        return root
    root = AmdRoot.create(generation)
    _ROOTS[generation] = root
    cache = amd_vault_dir()
    if cache is None:
        return root
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{generation}-", dir=cache))
    except OSError:
        return root  # no writable vault: the process keeps the root
    try:
        root.save(staging)
        final = cache / generation
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)  # a stale root that failed to load
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return root


_PROCESS_REGISTRY = AmdRegistry()
"""The chips AMD made in this process (all of them, whether or not a vault keeps them too)."""


def amd_registry() -> AmdRegistry:
    """The emulated AMD's records of the chips it made: the vault's, or (``SEVEMU_AMD_VAULT=""``)
    this process's."""
    vault = amd_vault_dir()
    return _PROCESS_REGISTRY if vault is None else AmdRegistry(vault)


def _record_snp_chip(chip: FusedChip) -> None:
    """AMD records an SNP chip's secret in its vault, so its KDS can certify the chip's VCEKs
    (:class:`~sevemu.amd.vault.AmdRegistry`); without a writable vault only this process remembers it."""
    if chip.generation not in SNP_GENERATIONS:
        return
    _PROCESS_REGISTRY.record(chip)
    vault = amd_vault_dir()
    if vault is None:
        return
    try:
        AmdRegistry(vault).record(chip)
    except OSError:
        pass


def manufacture(platform_dir: str | os.PathLike[str], generation: str, amd_root: AmdRoot, *,
                secret: bytes | None = None, trusted_roots: Iterable[AmdRoot] = ()) -> FusedChip:
    """Fuse a chip of ``generation``, have ``amd_root`` certify its CEK, provision ``platform_dir``.

    ``secret``: the chip secret to fuse (default: fresh random); ``trusted_roots``: other emulated
    roots whose ARKs the firmware will also trust in a migration target's chain (their digests are
    fused).  Raises :class:`~sevemu.firmware.nvstore.PlatformExistsError` if the directory already
    holds a chip, and the other :class:`~sevemu.firmware.nvstore.PlatformDirError` subclasses for a
    directory that may not become a platform.
    """
    chip = FusedChip.fuse(generation) if secret is None else FusedChip(generation, secret)
    cek_cert = amd_root.certify_chip(chip)
    _record_snp_chip(chip)
    arks = [(amd_root.generation, amd_root.ark.encode())]
    arks += [(r.generation, r.ark.encode()) for r in trusted_roots]
    # the factory fuses the digest of every ARK the firmware is to trust (FactoryData.fused_arks)
    write_factory(platform_dir, FactoryData(
        generation=generation,
        chip_secret=chip.secret,
        cek_cert=cek_cert.encode(),
        amd_chain=amd_root.amd_certs.encode(),
        trusted_arks=tuple(arks),
    ))
    return chip


def _seed_bytes(seed: bytes | str, purpose: str) -> bytes:
    raw = seed.encode() if isinstance(seed, str) else bytes(seed)
    return hashlib.sha256(purpose.encode() + b"\x00" + raw).digest()


def build_machine(generation: str | CpuProfile = "milan", *, dram_size: int = 256 * GiB,
                  cores: int = 2, cache_size: int = 4 * MiB, seed: bytes | str | None = None,
                  init: bool = True, es: bool | None = None, snp: bool = False,
                  platform_dir: str | os.PathLike[str] | None = None,
                  amd_root: AmdRoot | None = None) -> Machine:
    """Build a host of ``generation`` with its firmware loaded and (by default) INIT done as Linux
    does it: with SEV-ES and a TMR where the CPU has SEV-ES (``es`` None; True/False force it), then
    WBINVD and DF_FLUSH.  ``snp``: SEV-SNP first (SNP_EN, SNP_INIT, SNP_DF_FLUSH), then that INIT, as
    Linux's sev-dev does on an SNP host (an SNP part: Milan and later).

    ``platform_dir``: the chip's directory (fuses, factory data, NV store); by default a temporary
    one, removed when the firmware is garbage-collected (or at exit).  A directory without a chip
    gets one manufactured by ``amd_root`` (default :func:`default_amd_root`); one with a chip is
    booted as it is (same identity), and :attr:`Machine.amd_root` is the given root or, if it made
    this chip, this process's default one.  With a ``seed`` a new chip's secret is derived from it
    too, so equal seeds make equal chips (and, the TRNG being seeded, equal OCA/PEK/PDH keys).
    """
    prof = profile(generation) if isinstance(generation, str) else generation
    rng: Callable[[int], bytes] = SeededRng(seed) if seed is not None else os.urandom
    if amd_root is not None and amd_root.generation != prof.name:
        raise InputError(f"a {amd_root.generation} root cannot make a {prof.name} chip")
    temporary = platform_dir is None
    path = Path(tempfile.mkdtemp(prefix="sevemu-platform-") if platform_dir is None else platform_dir)
    try:
        if not is_manufactured(path):
            maker = amd_root or default_amd_root(prof.name)
            secret = None if seed is None else SeededRng(_seed_bytes(seed, "fuses"))(CHIP_SECRET_SIZE)
            try:
                manufacture(path, prof.name, maker, secret=secret)
                amd_root = maker
            except PlatformExistsError:
                pass  # another process made this chip meanwhile: boot the winner's
        if amd_root is None:
            # already in this process (loading one from disk costs a second): the root that made it?
            known = _ROOTS.get(prof.name)
            if known is not None and known.amd_certs.encode() == read_factory(path).amd_chain:
                amd_root = known
        soc = Soc(prof, dram_size=dram_size, cores=cores, cache_size=cache_size, rng=rng)
        firmware = load_firmware(soc.psp.take_ports(), path)
    except BaseException:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if temporary:  # the chip's directory lives as long as its firmware
        weakref.finalize(firmware, shutil.rmtree, path, True)
    soc.psp.install(firmware)
    hv = Hypervisor(soc.host_view())
    if snp:
        if soc.rmp is None:
            raise InputError(f"{prof.name} has no SEV-SNP (Milan and later have it)")
        if init:
            hv.snp_platform_init()
    if init:
        # As Linux's sev-dev (__sev_platform_init_locked): INIT, with SEV-ES and a 1 MiB TMR wherever
        # the CPU has SEV-ES (``es`` None), then WBINVD on every CPU and DF_FLUSH -- INIT leaves every
        # ASID dirty, and the TMR is usable only after that DF_FLUSH.
        hv.platform_init(es=es)
    return Machine(soc, firmware, hv, path, amd_root)
