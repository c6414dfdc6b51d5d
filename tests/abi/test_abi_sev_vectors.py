"""Real third-party data (../shared/vectors/sev-legacy-launch): LAUNCH_MEASURE blobs and
LAUNCH_SECRET packet headers produced by virtee/sevctl and AMDESE/sev-tool decode and re-encode
byte for byte.  The folder holds no session blob (its PROVENANCE.md says none is public).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from sevemu.abi.sev import HdrBuf, HdrFlags, MeasureBuf


def _expected(vectors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((vectors / "sev-legacy-launch" / "expected.json").read_text())
    return data


def test_launch_measure_blobs_round_trip(vectors: Path) -> None:
    expected = _expected(vectors)
    blobs = 0
    for case in expected["launch_measure"]:
        if "expected_launch_measure_blob_b64" in case:
            blob = base64.b64decode(case["expected_launch_measure_blob_b64"])
            measure = MeasureBuf.decode(blob)
            assert measure.encode() == blob
            if "mnonce_b64" in case:
                assert measure.mnonce == base64.b64decode(case["mnonce_b64"])
            blobs += 1
        elif "expected_measure_hex" in case:
            # sev-tool KAT: MEASURE and MNONCE given separately.
            blob = bytes.fromhex(case["expected_measure_hex"] + case["mnonce_hex"])
            measure = MeasureBuf.decode(blob)
            assert measure.measure.hex() == case["expected_measure_hex"]
            assert measure.encode() == blob
            blobs += 1
    for case in expected["launch_secret"]:
        if "launch_measure_blob_b64" in case:
            blob = base64.b64decode(case["launch_measure_blob_b64"])
            assert MeasureBuf.decode(blob).encode() == blob
            blobs += 1
    assert blobs >= 5


def test_launch_secret_headers_round_trip(vectors: Path) -> None:
    headers = 0
    for case in _expected(vectors)["launch_secret"]:
        if "expected_header_b64" not in case:
            continue
        raw = base64.b64decode(case["expected_header_b64"])
        hdr = HdrBuf.decode(raw)
        assert hdr.encode() == raw
        assert hdr.flags == 0 and not HdrFlags(hdr.flags) & HdrFlags.COMPRESSED
        assert hdr.iv == base64.b64decode(case["iv_b64"])
        headers += 1
    assert headers == 2
