"""What the emulated AMD records at manufacture: each chip's fused secret, indexed by its SNP hwid,
and the secrets of the cloud providers it issues VLEKs to.

AMD's key distribution service can certify the VCEK of any chip at any TCB because AMD knows every
chip's secret (AMD VCEK spec 57230: the KDS serves a VCEK per hwid and TCB); the model's AMD keeps
them here, in its vault (``$SEVEMU_AMD_VAULT``, ``docs/threat-model.md``): the platform and the host
never read it.

Layout: ``<dir>/chips/<generation>/<hwid hex>`` holds a chip's secret (raw bytes, mode 0600);
``<dir>/csps/<name>`` a CSP's secret.  A registry without a directory lives in the process only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import CspAccount
from sevemu.crypto.vcek import HWID_SIZE, SNP_GENERATIONS, hwid, snp_chip_id
from sevemu.errors import InputError

__all__ = ["AmdRegistry"]

_CSP_FILE = re.compile(r"^[A-Za-z0-9_.=-]{1,100}$")


def _write_secret(path: Path, secret: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secret)


class AmdRegistry:
    """Chips and CSP accounts the emulated AMD knows (module docstring)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self._chips: dict[tuple[str, bytes], FusedChip] = {}
        self._csps: dict[str, CspAccount] = {}

    # ---- chips ----------------------------------------------------------------------------
    @staticmethod
    def hwid_of(chip: FusedChip) -> bytes:
        """The hwid the KDS indexes ``chip`` by (CHIP_ID, or its first 8 bytes on Turin)."""
        return hwid(chip.generation, snp_chip_id(chip.secret, chip.generation))

    def record(self, chip: FusedChip) -> bytes:
        """Remember ``chip`` (an SNP generation); returns its hwid."""
        if chip.generation not in SNP_GENERATIONS:
            raise InputError(f"{chip.generation} chips have no SEV-SNP hwid")
        chip_hwid = self.hwid_of(chip)
        self._chips[(chip.generation, chip_hwid)] = chip
        if self.directory is not None:
            _write_secret(self.directory / "chips" / chip.generation / chip_hwid.hex(), chip.secret)
        return chip_hwid

    def chip(self, generation: str, chip_hwid: bytes) -> FusedChip | None:
        """The chip of ``generation`` with ``chip_hwid``, or None if AMD never made it."""
        if generation not in SNP_GENERATIONS or len(chip_hwid) != HWID_SIZE[generation]:
            return None
        found = self._chips.get((generation, bytes(chip_hwid)))
        if found is None and self.directory is not None:
            path = self.directory / "chips" / generation / bytes(chip_hwid).hex()
            try:
                found = FusedChip(generation, path.read_bytes())
            except (OSError, InputError):
                return None
            if self.hwid_of(found) != chip_hwid:
                return None  # a file that is not this chip's secret
            self._chips[(generation, bytes(chip_hwid))] = found
        return found

    # ---- cloud providers --------------------------------------------------------------------
    def csp(self, name: str, *, create: bool = False) -> CspAccount | None:
        """The CSP account ``name`` (its VLEK CSP id), made when ``create`` and unknown."""
        if not isinstance(name, str) or not _CSP_FILE.match(name):
            raise InputError(f"CSP name {name!r}: use 1-100 letters, digits, '_', '.', '=' or '-'")
        account = self._csps.get(name)
        path = None if self.directory is None else self.directory / "csps" / name
        if account is None and path is not None and path.is_file():
            try:
                account = CspAccount(name, path.read_bytes())
            except (OSError, InputError):
                account = None
        if account is None and create:
            account = CspAccount.create(name)
            if path is not None:
                _write_secret(path, account.secret)
        if account is not None:
            self._csps[name] = account
        return account
