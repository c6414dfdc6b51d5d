"""``sevemu bench attest``: the attestation figures that need no platform.

* reports verified per second by :func:`sevemu.owner.snpverify.verify_report` (full checks: chain,
  binding, signature, default policy), beside omne-attest (PyPI) verifying the same reports with the
  same chain in the same run, the two taking turns in batches of ten (alternating which goes first,
  so a change of the machine's load weighs on both); the ratio is ours / omne-attest (target >= 1);
* report signatures per second (:func:`sevemu.crypto.vcek.sign_report`, the firmware's signing step
  alone -- not the guest request path, which needs the SNP platform);
* KDS requests per second: ``--clients`` concurrent clients (threads with their own HTTP session)
  asking the emulated KDS on loopback for VCEKs and the certificate chain;
* reports per second through the guest request path (``--guest-reports``, 0 to skip): an emulated
  SNP guest's ``/dev/sev-guest`` SNP_GET_REPORT -> its shared pages -> KVM's guest-request handler ->
  SNP_GUEST_REQUEST in the firmware (AES-256-GCM, report built and signed with the VCEK) -> back and
  decrypted; the first and last reports must verify against the emulated chain.

Every verified report must pass and a tampered control must fail, else the benchmark fails (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time
from typing import Any

from cryptography.hazmat.primitives import serialization

from sevemu.abi.report import AttestationReport, SignerInfo
from sevemu.abi.snp import SnpPolicy as GuestPolicy
from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import AmdSnpRoot
from sevemu.amd.vault import AmdRegistry
from sevemu.cli.common import emit, positive_int
from sevemu.crypto import vcek
from sevemu.errors import VerificationError
from sevemu.owner.snpverify import Chain, SnpCheckError, verify_report

__all__ = ["register_attest"]

TCB = 0x7308000000000003
_BATCH = 10
"""Reports per timed batch when ours and omne-attest take turns."""


def register_attest(bsub: Any) -> None:
    a = bsub.add_parser("attest", help="SNP report verification (ours beside omne-attest), signing, KDS",
                        epilog="examples:\n  sevemu bench attest\n  sevemu bench attest --reports 500 --clients 8 --json")
    a.add_argument("--reports", type=positive_int, default=200, help="reports to verify (default 200)")
    a.add_argument("--clients", type=positive_int, default=4, help="concurrent KDS clients (default 4)")
    a.add_argument("--requests", type=positive_int, default=400, help="KDS requests in total (default 400)")
    a.add_argument("--guest-reports", type=lambda t: int(t, 0), default=100,
                   help="reports through the guest request path (default 100; 0: skip)")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=run_attest)


def _guest_path(n: int) -> tuple[float, float]:
    """(reports/s, ms per report) through the guest request path (module docstring)."""
    from sevemu.abi.report import ReportReq, ReportRsp
    from sevemu.cli.snp_guest import launch

    g = launch("milan", seed="sevemu bench attest guest", certificates=False)
    chain = Chain(g.vcek, g.root.ask, g.root.ark, g.root.crl())
    dev = g.device
    dev.get_report(ReportReq())  # warm: VCEK derivation, buffers
    reports = []
    t = time.perf_counter()
    for i in range(n):
        reports.append(dev.get_report(ReportReq(report_data=i.to_bytes(64, "little"))))
    elapsed = time.perf_counter() - t
    for raw in (reports[0], reports[-1]):
        rsp = ReportRsp.decode(raw[: ReportRsp.SIZE])
        if rsp.status:
            raise VerificationError(f"bench attest: the firmware answered status {rsp.status:#x}")
        verify_report(rsp.report.encode(), chain, trusted=[g.root.ark_fingerprint()])
    return n / elapsed, elapsed * 1000 / n


def _reports(chip: FusedChip, n: int) -> list[bytes]:
    key = vcek.derive_vcek(chip.secret, "milan", TCB)
    out = []
    for i in range(n):
        body = AttestationReport(
            version=3, guest_svn=1, policy=GuestPolicy(smt=True), signature_algo=1, current_tcb=TCB,
            platform_info=1, signer_info=SignerInfo(), report_data=hashlib.sha512(i.to_bytes(4, "little")).digest(),
            measurement=b"\x22" * 48, report_id=b"\x55" * 32, report_id_ma=b"\xff" * 32, reported_tcb=TCB,
            cpuid_fam_id=0x19, cpuid_mod_id=0x01, cpuid_step=1, chip_id=vcek.snp_chip_id(chip.secret, "milan"),
            committed_tcb=TCB, current_major=1, current_minor=55, current_build=4, committed_major=1,
            committed_minor=55, committed_build=4, launch_tcb=TCB).encode()
        out.append(vcek.sign_report(key, body))
    return out


def run_attest(args: argparse.Namespace) -> int:
    from sevemu.amd.kds import KeyDistributionService, create_app, loopback_server  # Flask: only when run
    from sevemu.scenario import amd_vault_dir, default_amd_root

    vault = amd_vault_dir()
    root = AmdSnpRoot.for_root(default_amd_root("milan"), None if vault is None else vault / "milan" / "snp")
    chip = FusedChip("milan", hashlib.sha512(b"sevemu bench attest").digest())
    chain = Chain(root.issue_vcek(chip, TCB), root.ask, root.ark, root.crl())
    pin = root.ark_fingerprint()

    t = time.perf_counter()
    reports = _reports(chip, args.reports)
    sign_s = time.perf_counter() - t
    result: dict[str, Any] = {"reports": len(reports), "signed_per_s": round(len(reports) / sign_s, 1)}

    tampered = bytearray(reports[0])
    tampered[0x90] ^= 1
    try:
        verify_report(bytes(tampered), chain, trusted=[pin])
        raise VerificationError("bench attest: the verifier accepted a tampered report")
    except SnpCheckError:
        pass
    def ours(batch: list[bytes]) -> float:
        t = time.perf_counter()
        for r in batch:
            verify_report(r, chain, trusted=[pin])
        return time.perf_counter() - t

    try:
        import omne_attest as omne
    except ImportError:
        omne = None
    if omne is None:
        ours_s = ours(reports)
    else:
        der = [c.public_bytes(serialization.Encoding.DER) for c in (chain.signer, chain.intermediate, chain.ark)]
        policy = omne.Policy(max_vmpl=3, reject_debug=True)
        try:
            omne.verify(bytes(tampered), der[0], der[1], der[2], pin, policy)
            raise VerificationError("bench attest: omne-attest accepted a tampered report")
        except omne.Fail:
            pass

        def theirs(batch: list[bytes]) -> float:
            t = time.perf_counter()
            for r in batch:
                omne.verify(r, der[0], der[1], der[2], pin, policy)
            return time.perf_counter() - t

        # interleaved batches, alternating which goes first, so a change in the machine's load
        # weighs on both sides alike
        ours_s = omne_s = 0.0
        for i in range(0, len(reports), _BATCH):
            batch = reports[i:i + _BATCH]
            if (i // _BATCH) % 2:
                omne_s += theirs(batch)
                ours_s += ours(batch)
            else:
                ours_s += ours(batch)
                omne_s += theirs(batch)
    result["verified_per_s"] = round(len(reports) / ours_s, 1)
    lines = [f"signing (crypto.vcek.sign_report)   {result['signed_per_s']:>10.1f} reports/s",
             f"verifying (owner.snpverify)         {result['verified_per_s']:>10.1f} reports/s"]
    if omne is None:
        result["omne_attest"] = None
        lines.append("omne-attest                         not installed (pip install omne-attest)")
    else:
        result["omne_attest_verified_per_s"] = round(len(reports) / omne_s, 1)
        result["ratio"] = round(omne_s / ours_s, 2)
        lines.append(f"verifying (omne-attest, same run)   {result['omne_attest_verified_per_s']:>10.1f} reports/s")
        lines.append(f"ours / omne-attest                  {result['ratio']:>10.2f}x  (target >= 1)")

    registry = AmdRegistry()
    hw = registry.record(chip)
    server = loopback_server(create_app(KeyDistributionService({"milan": root}, registry)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    paths = [f"/vcek/v1/Milan/{hw.hex()}?blSPL={bl}&teeSPL=0&snpSPL=8&ucodeSPL=115" for bl in range(4)]
    paths.append("/vcek/v1/Milan/cert_chain")
    errors: list[str] = []
    per_client = max(1, args.requests // args.clients)

    def client(seed: int) -> None:
        import requests

        with requests.Session() as s:
            for i in range(per_client):
                r = s.get(base + paths[(seed + i) % len(paths)], timeout=60)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text.strip()[:80]}")
    try:
        import requests

        for p in paths:  # issue each certificate once before timing
            warm = requests.get(base + p, timeout=60)
            if warm.status_code != 200:
                raise VerificationError(f"bench attest: KDS answered {warm.status_code} for {p}")
        workers = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        kds_s = time.perf_counter() - t
    finally:
        server.shutdown()
        thread.join(5)
    if errors:
        raise VerificationError(f"bench attest: {len(errors)} KDS requests failed, first: {errors[0]}")
    total = per_client * args.clients
    result.update(kds_clients=args.clients, kds_requests=total, kds_requests_per_s=round(total / kds_s, 1))
    lines.append(f"KDS ({args.clients} clients, {total} requests)       {result['kds_requests_per_s']:>10.1f} requests/s")
    if args.guest_reports > 0:
        per_s, ms = _guest_path(args.guest_reports)
        result.update(guest_reports=args.guest_reports, guest_path_reports_per_s=round(per_s, 1),
                      guest_path_ms_per_report=round(ms, 2))
        lines.append(f"guest request path (driver->KVM->FW) {per_s:>10.1f} reports/s ({ms:.2f} ms each)")
    lines.append("(figures depend on the machine's load)")
    emit(args, result, lines)
    return 0
