"""The emulated AMD Key Distribution Service (KDS) as a Flask application.

URL grammar of AMD's KDS (AMD VCEK spec 57230 chapter 4; as go-sev-guest ``kds/kds.go``, virtee
snpguest ``src/fetch.rs`` and the IETF RATS wiki's KDS analysis use it), relative to the server:

=========================================================  =========================================
``GET /vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=``  the VCEK, DER.  Turin: 16 hex
                                                          digits of hwid and ``fmcSPL`` too; other
                                                          products 128 hex digits.  A missing SPL
                                                          counts as 0, as at AMD.
``GET /vcek/v1/{product}/cert_chain``                      ASK then ARK, PEM
``GET /vcek/v1/{product}/crl``                             the ARK's CRL, DER
``GET /vlek/v1/{product}/cert_chain``                      ASVK then ARK, PEM
``GET /vlek/v1/{product}/crl``                             the ARK's CRL for the ASVK, DER
``GET /vlek/v1/{product}/cert?cspID=&blSPL=...``           a VLEK, DER (an sevemu extension: AMD hands
                                                          VLEKs to CSPs through a private channel)
``GET /vlek/v1/{product}/hashstick?cspID=&hwid=&blSPL=...`` the CSP's wrapped VLEK hashstick for the
                                                          chip ``hwid`` (0x1B0 bytes,
                                                          ``application/octet-stream``; sevemu's
                                                          extension, as above)
=========================================================  =========================================

Errors (a one-line ``text/plain`` reason): 400 for a malformed hwid, an SPL that is not a decimal
0..255, an unknown or repeated query parameter, or an SPL the product does not have (``fmcSPL``
before Turin); 404 for an unknown product or path, and for a hwid or CSP AMD never issued; 405 for
anything but GET/HEAD; 429 with ``Retry-After`` when a client exceeds the optional rate limit (a
token bucket per client address), as AMD's rate-limited service answers.

Content types: ``application/pkix-cert`` (VCEK/VLEK), ``application/x-pem-file`` (chains),
``application/pkix-crl`` (CRLs) -- a model choice; AMD documents the encodings, not the headers.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import serialization
from flask import Flask, Response, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from sevemu.amd.chip import FusedChip
from sevemu.amd.snp import AmdSnpRoot, CspAccount, KeyKind, wrap_vlek
from sevemu.amd.vault import AmdRegistry
from sevemu.certs.snp import generation_of_product
from sevemu.crypto.vcek import HWID_SIZE, PRODUCTS
from sevemu.errors import InputError

__all__ = ["KdsError", "KeyDistributionService", "RateLimiter", "create_app", "loopback_server"]

_SPL_PARAMS: Final = {
    "milan": ("blSPL", "teeSPL", "snpSPL", "ucodeSPL"),
    "genoa": ("blSPL", "teeSPL", "snpSPL", "ucodeSPL"),
    "turin": ("fmcSPL", "blSPL", "teeSPL", "snpSPL", "ucodeSPL"),
}
_SPL_BYTE: Final = {
    "milan": {"blSPL": 0, "teeSPL": 1, "snpSPL": 6, "ucodeSPL": 7},
    "genoa": {"blSPL": 0, "teeSPL": 1, "snpSPL": 6, "ucodeSPL": 7},
    "turin": {"fmcSPL": 0, "blSPL": 1, "teeSPL": 2, "snpSPL": 3, "ucodeSPL": 7},
}
_HEX: Final = re.compile(r"^[0-9a-fA-F]+$")
_DEC: Final = re.compile(r"^[0-9]{1,3}$")


class KdsError(InputError):
    """Raised when a KDS request cannot be answered; :attr:`status` is the HTTP status."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        super().__init__(reason)


@dataclass
class KeyDistributionService:
    """The KDS logic, without HTTP: roots by generation, the registry of chips and CSPs."""

    roots: Mapping[str, AmdSnpRoot]
    registry: AmdRegistry = field(default_factory=AmdRegistry)

    def root(self, product: str) -> AmdSnpRoot:
        try:
            gen = generation_of_product(product)
        except InputError:
            raise KdsError(404, f"unknown product {product!r}") from None
        if PRODUCTS[gen] != product or gen not in self.roots:
            raise KdsError(404, f"unknown product {product!r}; this KDS serves "
                                f"{', '.join(PRODUCTS[g] for g in self.roots)}")
        return self.roots[gen]

    def cert_chain(self, kind: KeyKind, product: str) -> bytes:
        return self.root(product).cert_chain_pem(kind)

    def crl(self, kind: KeyKind, product: str) -> bytes:
        return self.root(product).crl(kind).public_bytes(serialization.Encoding.DER)

    @staticmethod
    def tcb_from_query(generation: str, query: Mapping[str, list[str]], extra: tuple[str, ...] = ()) -> int:
        """The TCB_VERSION the SPL query parameters name (missing ones count 0)."""
        allowed = _SPL_PARAMS[generation]
        tcb = 0
        for name, values in query.items():
            if name in extra:
                continue
            if name not in allowed:
                known = set().union(*_SPL_PARAMS.values())
                why = f"{PRODUCTS[generation]} has no {name}" if name in known else f"unknown parameter {name!r}"
                raise KdsError(400, why)
            if len(values) != 1:
                raise KdsError(400, f"{name} given {len(values)} times")
            if not _DEC.match(values[0]) or int(values[0]) > 255:
                raise KdsError(400, f"{name}={values[0]!r} is not a decimal SPL 0..255")
            tcb |= int(values[0]) << (8 * _SPL_BYTE[generation][name])
        return tcb

    def _chip(self, product: str, gen: str, hwid_hex: str) -> FusedChip:
        """The chip of ``hwid_hex``: 400 for a malformed hwid, 404 for one AMD never made."""
        size = HWID_SIZE[gen]
        if not _HEX.match(hwid_hex) or len(hwid_hex) != 2 * size:
            raise KdsError(400, f"a {product} hwid is {2 * size} hex digits, got {hwid_hex[:140]!r}")
        chip = self.registry.chip(gen, bytes.fromhex(hwid_hex))
        if chip is None:
            raise KdsError(404, f"no {product} chip with hwid {hwid_hex.lower()[:16]}...")
        return chip

    def _csp(self, name: str) -> CspAccount:
        """The CSP account ``name``: 400 for a malformed name, 404 for one AMD does not know."""
        try:
            csp = self.registry.csp(name)
        except InputError as exc:
            raise KdsError(400, str(exc)) from None
        if csp is None:
            raise KdsError(404, f"no CSP account {name!r}")
        return csp

    def vcek(self, product: str, hwid_hex: str, query: Mapping[str, list[str]]) -> bytes:
        root = self.root(product)
        gen = root.generation
        size = HWID_SIZE[gen]
        if not _HEX.match(hwid_hex) or len(hwid_hex) != 2 * size:  # before the SPLs, as before
            raise KdsError(400, f"a {product} hwid is {2 * size} hex digits, got {hwid_hex[:140]!r}")
        tcb = self.tcb_from_query(gen, query)
        return root.issue_vcek(self._chip(product, gen, hwid_hex), tcb).public_bytes(serialization.Encoding.DER)

    def vlek(self, product: str, query: Mapping[str, list[str]]) -> bytes:
        root = self.root(product)
        ids = query.get("cspID", [])
        if len(ids) != 1:
            raise KdsError(400, "a VLEK request names one cspID")
        tcb = self.tcb_from_query(root.generation, query, extra=("cspID",))
        return root.issue_vlek(self._csp(ids[0]), tcb).public_bytes(serialization.Encoding.DER)

    def hashstick(self, product: str, query: Mapping[str, list[str]]) -> bytes:
        """The wrapped VLEK hashstick of ``cspID`` at the SPLs for the chip ``hwid``."""
        root = self.root(product)
        gen = root.generation
        ids, hwids = query.get("cspID", []), query.get("hwid", [])
        if len(ids) != 1 or len(hwids) != 1:
            raise KdsError(400, "a hashstick request names one cspID and one hwid")
        tcb = self.tcb_from_query(gen, query, extra=("cspID", "hwid"))
        csp = self._csp(ids[0])
        return wrap_vlek(csp, self._chip(product, gen, hwids[0]), tcb)


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int | None = None) -> None:
        if not rate > 0:
            raise InputError(f"rate limit must be positive, got {rate}")
        self.rate = rate
        self.burst = max(1, burst if burst is not None else math.ceil(rate))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """0 if ``client`` may go now (a token is spent), else the seconds until it may."""
        t = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), t))
            tokens = min(float(self.burst), tokens + (t - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, t)
                return 0.0
            self._buckets[client] = (tokens, t)
            return (1.0 - tokens) / self.rate


def create_app(kds: KeyDistributionService, *, rate_limit: RateLimiter | None = None) -> Flask:
    """The Flask application serving ``kds`` with AMD's URL grammar (module docstring)."""
    app = Flask("sevemu-kds")

    def text(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
        return Response(reason.rstrip() + "\n", status=status, mimetype="text/plain", headers=headers)

    @app.before_request
    def _limit() -> Response | None:
        if rate_limit is None:
            return None
        wait = rate_limit.retry_after(request.remote_addr or "?")
        if wait > 0:
            return text(429, "Too Many Requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        return None

    def answer(kind: str, make: Callable[[], bytes]) -> Response:
        try:
            body = make()
        except KdsError as exc:
            return text(exc.status, str(exc))
        mimetype = {"cert": "application/pkix-cert", "pem": "application/x-pem-file",
                    "crl": "application/pkix-crl", "blob": "application/octet-stream"}[kind]
        return Response(body, status=200, mimetype=mimetype)

    def query() -> dict[str, list[str]]:
        return {k: request.args.getlist(k) for k in request.args}

    for key_kind in ("vcek", "vlek"):  # static rules, so they win over /vcek/v1/<product>/<hwid>
        def chain_view(product: str, kind: KeyKind = key_kind) -> Response:
            return answer("pem", lambda: kds.cert_chain(kind, product))

        def crl_view(product: str, kind: KeyKind = key_kind) -> Response:
            return answer("crl", lambda: kds.crl(kind, product))

        app.add_url_rule(f"/{key_kind}/v1/<product>/cert_chain", f"{key_kind}_chain", chain_view, methods=["GET"])
        app.add_url_rule(f"/{key_kind}/v1/<product>/crl", f"{key_kind}_crl", crl_view, methods=["GET"])

    @app.get("/vlek/v1/<product>/cert")
    def vlek(product: str) -> Response:
        return answer("cert", lambda: kds.vlek(product, query()))

    @app.get("/vlek/v1/<product>/hashstick")
    def hashstick(product: str) -> Response:
        return answer("blob", lambda: kds.hashstick(product, query()))

    @app.get("/vcek/v1/<product>/<hwid>")
    def vcek(product: str, hwid: str) -> Response:
        return answer("cert", lambda: kds.vcek(product, hwid, query()))

    @app.errorhandler(404)
    def _not_found(_exc: Exception) -> Response:
        return text(404, f"no such resource: {request.path[:200]}")

    @app.errorhandler(405)
    def _not_allowed(_exc: Exception) -> Response:
        return text(405, f"method {request.method} not allowed")

    return app


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug's request handler without its per-request log lines."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


def loopback_server(app: Flask, host: str = "127.0.0.1", port: int = 0, *, log: bool = False) -> BaseWSGIServer:
    """A threaded WSGI server for ``app`` bound to a loopback address (``port`` 0: any free port);
    ``log``: one line per request on stderr (werkzeug's access log).

    Raises :class:`~sevemu.errors.InputError` for a host that is not loopback, and for a port that
    cannot be bound.
    """
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        raise InputError(f"cannot resolve host {host!r}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise InputError(f"the emulated KDS serves loopback only; {host!r} is not a loopback address")
    if not 0 <= port <= 65535:
        raise InputError(f"port {port} is not 0..65535")
    try:
        return make_server(host, port, app, threaded=True, request_handler=None if log else _QuietHandler)
    except (OSError, SystemExit) as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc}") from None
