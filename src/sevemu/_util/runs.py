"""Runs of physically consecutive pages in a column of page-aligned SPAs (the firmware's and the PSP's
DMA batches take each run as one range)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import numpy.typing as npt

from sevemu._util.units import PAGE


def page_runs(spas: npt.NDArray[np.uint64]) -> list[tuple[int, int, int]]:
    """(first index, SPA, length in bytes) of each run of physically consecutive pages, in order."""
    n = len(spas)
    if not n:
        return []
    breaks = np.flatnonzero(spas[1:] != spas[:-1] + np.uint64(PAGE)) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(a, int(spas[a]), (b - a) * PAGE) for a, b in pairwise(bounds)]
