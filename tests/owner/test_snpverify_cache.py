"""The verifier's per-chain memo (``snpverify._prepare``): a second report against the same Chain
object skips the chain's signature work, yet the checks that depend on the caller -- the pins, the
time, the CRL's freshness, the report itself -- still run and still fail."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from sevemu.amd.chip import FusedChip
from sevemu.cli.bench_attest import TCB, _reports
from sevemu.owner import snpverify
from sevemu.owner.snpverify import Chain, SnpCheckError, SnpPolicy, verify_report


def test_memo_keeps_every_per_report_check(snp_root) -> None:  # type: ignore[no-untyped-def]
    root = snp_root("milan")
    chip = FusedChip("milan", hashlib.sha512(b"memo test").digest())
    chain = Chain(root.issue_vcek(chip, TCB), root.ask, root.ark, root.crl())
    pin = [root.ark_fingerprint()]
    a, b = _reports(chip, 2)
    verify_report(a, chain, trusted=pin)
    assert (id(chain), "vcek") in snpverify._prepared_cache  # memoised after the first success
    verify_report(b, chain, trusted=pin)

    def check(report: bytes, **kw: object) -> str:
        with pytest.raises(SnpCheckError) as exc:
            verify_report(report, chain, **{"trusted": pin, **kw})  # type: ignore[arg-type]
        return exc.value.check

    assert check(a, trusted=[bytes(32)]) == "ark"
    assert check(a, trusted=None) == "ark"  # AMD's real pins by default
    later = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    assert check(a, now=later) == "validity"
    crl = chain.crl
    assert crl is not None and crl.next_update_utc is not None
    assert check(a, now=crl.next_update_utc + dt.timedelta(seconds=1)) == "crl"
    tampered = bytearray(b)
    tampered[0x50] ^= 1
    assert check(bytes(tampered)) == "signature"
    assert check(a, policy=SnpPolicy(measurement=bytes(48))) == "policy.measurement"
    assert verify_report(b, chain, trusted=pin).report.report_data == hashlib.sha512((1).to_bytes(4, "little")).digest()
