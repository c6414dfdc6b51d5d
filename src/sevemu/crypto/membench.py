"""Throughput of the memory-encryption engine (:mod:`sevemu.crypto.memenc`) against raw AES.

Backs ``sevemu bench memory``.  Everything is measured in the same process, on the same buffers,
best of ``repeats`` runs, encrypt followed by decrypt of ``size`` bytes (so GB/s counts ``2 * size``
bytes), into preallocated output buffers on both sides (allocating and zeroing 256 MiB would
otherwise dominate both figures).  The runs of a mode and of its baselines alternate, so that a
machine shared with other work slows them alike.

Baselines (``ratio`` = baseline time / mode time):

* XE, XEX: raw AES-128-ECB through `cryptography`, one ``update_into`` call over the whole buffer:
  the AES floor these modes are built on.
* XTS256: `cryptography`'s own AES-256-XTS over the same buffer in 1 MiB data units (one cipher
  context per unit: a new tweak needs a new context there), which runs at the cipher's raw speed.
  As extra information the row also carries the same with ``xts_unit``-byte units
  (``xts_unit_gbps``, ``ratio_xts_unit``; default 4096: what encrypting memory page by page with
  `cryptography` would cost, dominated by setting up a context per page; at most 16 MiB, the
  largest unit OpenSSL accepts).
* XE and XEX also against AES-128-XTS in 1 MiB units (``aes128_xts_gbps``, ``ratio_aes128_xts``): AES-128
  at the speed `cryptography`'s XTS reaches, which on CPUs with VAES is faster than its ECB (whose
  OpenSSL code uses AES-NI only): the ratio against ECB can exceed 1 there when the model's own VAES
  engine runs, and this one says how close the model comes to the fastest AES-128 this machine's
  `cryptography` offers.

``accelerated`` says whether the mode ran through the C accelerator of :mod:`sevemu.crypto.memenc`
(``accel`` forces it on or off; the default uses it when it was built), ``aes_via_xts`` whether its AES
went through `cryptography`'s AES-XTS made AES-ECB (``MemoryCipher.bulk_aes_via_xts``), ``aes_engine``
which AES the bulk path runs (``MemoryCipher.bulk_aes_engine``: ``vaes`` on a CPU with VAES and
AVX-512).

The single-line figures are microseconds per 64-byte line through ``encrypt_line``/``decrypt_line``:
``line_*_us`` cycling over ``lines`` consecutive lines (default 1024 = 64 KiB, a working set whose
tweaks stay memoised), and ``line_*_cold_us`` over consecutive lines of a fresh cipher never seen
before (XTS pays one tweak encryption per page and the alpha multiples per line there; a random
first touch of a page costs it one more AES call of 1 KiB).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevemu.crypto.memenc import LINE_SIZE, EncryptionMode, MemoryCipher, TweakConstants
from sevemu.errors import InputError

__all__ = ["bench_modes"]

_RAW_XTS_UNIT = 1 << 20
_SPA_BASE = 0x1_2340_0000  # a region above 4 GiB, so the high tweak bits take part


def _best(fn: Callable[[], None], repeats: int) -> float:
    return _best_interleaved([fn], repeats)[0]


def _best_interleaved(fns: Sequence[Callable[[], None]], repeats: int) -> list[float]:
    """Best time of each function over ``repeats`` rounds, the functions taking turns."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _ecb_baseline(key: bytes, src: bytearray, dst: bytearray, size: int) -> Callable[[], None]:
    cipher = Cipher(algorithms.AES(key), modes.ECB())
    enc, dec = cipher.encryptor(), cipher.decryptor()
    s, d = memoryview(src), memoryview(dst)

    def run() -> None:
        enc.update_into(s[:size], d)
        dec.update_into(d[:size], s)

    return run


def _xts_baseline(key: bytes, src: bytearray, dst: bytearray, size: int, unit: int) -> Callable[[], None]:
    s, d = memoryview(src), memoryview(dst)
    aes = algorithms.AES(key)

    def run() -> None:
        for a, b in ((s, d), (d, s)):
            encrypt = a is s
            for off in range(0, size, unit):
                tweak = ((_SPA_BASE + off) >> 6).to_bytes(16, "little")
                c = Cipher(aes, modes.XTS(tweak))
                ctx = c.encryptor() if encrypt else c.decryptor()
                ctx.update_into(a[off : off + unit], b[off : off + unit + 15])

    return run


def _other_half(key: bytes) -> bytes:
    """A second 16-byte XTS key half different from ``key`` (OpenSSL refuses equal halves)."""
    return bytes(b ^ 0x5C for b in key)


def _line_us(cipher: MemoryCipher, count: int, repeats: int) -> tuple[float, float, float, float]:
    line = os.urandom(LINE_SIZE)
    spas = [_SPA_BASE + i * LINE_SIZE for i in range(count)]
    enc, dec = cipher.encrypt_line, cipher.decrypt_line

    def run_enc() -> None:
        for spa in spas:
            enc(spa, line)

    def run_dec() -> None:
        for spa in spas:
            dec(spa, line)

    # Cold: a fresh cipher whose memo has never seen these lines (one pass only, by definition).
    accel = cipher.accelerated
    fresh = MemoryCipher(cipher.mode, os.urandom(cipher.mode.key_size), cipher.tweak_constants, accel=accel)
    cold_spas = [_SPA_BASE + (1 << 30) + i * LINE_SIZE for i in range(count)]
    t0 = time.perf_counter()
    for spa in cold_spas:
        fresh.encrypt_line(spa, line)
    cold_enc = (time.perf_counter() - t0) / count
    fresh = MemoryCipher(cipher.mode, os.urandom(cipher.mode.key_size), cipher.tweak_constants, accel=accel)
    t0 = time.perf_counter()
    for spa in cold_spas:
        fresh.decrypt_line(spa, line)
    cold_dec = (time.perf_counter() - t0) / count
    run_enc()  # warm the memo
    warm_enc = _best(run_enc, repeats) / count
    warm_dec = _best(run_dec, repeats) / count
    return warm_enc * 1e6, warm_dec * 1e6, cold_enc * 1e6, cold_dec * 1e6


def bench_modes(
    size: int = 256 << 20,
    modes: Iterable[EncryptionMode] = tuple(EncryptionMode),
    *,
    repeats: int = 3,
    xts_unit: int = 4096,
    lines: int = 1024,
    accel: bool | None = None,
) -> list[dict[str, Any]]:
    """Measure each mode's bulk encrypt+decrypt throughput against its baseline, and its
    single-line latency; one dict per mode (see the module docstring for the fields)."""
    if size <= 0 or size % _RAW_XTS_UNIT:
        raise InputError(f"size must be a positive multiple of {_RAW_XTS_UNIT} bytes")
    if xts_unit <= 0 or xts_unit % LINE_SIZE or size % xts_unit or xts_unit > 16 << 20:
        raise InputError("xts_unit must be a multiple of 64 dividing size, at most 16 MiB")
    tweaks = TweakConstants.random_zen2()
    # +15: cryptography's update_into wants that much room past the data.
    src = bytearray(os.urandom(1 << 20)) * (size >> 20) + bytearray(15)
    dst = bytearray(size + 15)
    src_view, dst_view = memoryview(src)[:size], memoryview(dst)[:size]
    results: list[dict[str, Any]] = []
    for mode in modes:
        key = os.urandom(mode.key_size)
        cipher = MemoryCipher(mode, key, tweaks, accel=accel)

        def run(c: MemoryCipher = cipher) -> None:
            c.encrypt_bulk_into(_SPA_BASE, src_view, dst_view)
            c.decrypt_bulk_into(_SPA_BASE, dst_view, src_view)

        row: dict[str, Any] = {"mode": mode.value, "size": size, "accelerated": cipher.accelerated}
        if mode is EncryptionMode.XTS256:
            base = _xts_baseline(key, src, dst, size, _RAW_XTS_UNIT)
            row["baseline"] = f"aes-256-xts/{_RAW_XTS_UNIT >> 20}MiB-units"
            extra = [_xts_baseline(key, src, dst, size, xts_unit)]
        else:
            base = _ecb_baseline(key, src, dst, size)
            row["baseline"] = "aes-128-ecb"
            extra = [_xts_baseline(key + _other_half(key), src, dst, size, _RAW_XTS_UNIT)]
        run()  # warm-up: tables, scratch buffers, page faults
        base()
        mode_t, base_t, *extra_t = _best_interleaved([run, base, *extra], repeats)
        row["mode_gbps"] = 2 * size / mode_t / 1e9
        row["baseline_gbps"] = 2 * size / base_t / 1e9
        row["ratio"] = base_t / mode_t
        row["aes_via_xts"] = cipher.bulk_aes_via_xts
        row["aes_engine"] = cipher.bulk_aes_engine
        if mode is EncryptionMode.XTS256:
            row["xts_unit_baseline"] = f"aes-256-xts/{xts_unit}B-units"
            row["xts_unit_gbps"] = 2 * size / extra_t[0] / 1e9
            row["ratio_xts_unit"] = extra_t[0] / mode_t
        else:
            row["aes128_xts_baseline"] = f"aes-128-xts/{_RAW_XTS_UNIT >> 20}MiB-units"
            row["aes128_xts_gbps"] = 2 * size / extra_t[0] / 1e9
            row["ratio_aes128_xts"] = extra_t[0] / mode_t
        enc_us, dec_us, cold_enc, cold_dec = _line_us(cipher, lines, repeats)
        row["line_encrypt_us"] = enc_us
        row["line_decrypt_us"] = dec_us
        row["line_encrypt_cold_us"] = cold_enc
        row["line_decrypt_cold_us"] = cold_dec
        results.append(row)
    return results
