"""The optional C helpers of the memory model's bulk paths (``csrc/mem_accel.c``, built by ``setup.py``
as ``sevemu.hw._mem_accel``): DRAM gathers and scatters, the large-range cache flush, the
search for the resident (or dirty) lines of a range, the page pool's compare of a page with its
snapshot (``line_runs``, :mod:`sevemu.hw.uc.pool`), the whole-line reads and writes of resident
lines (``cache_hit_read`` / ``cache_hit_write``: :meth:`~sevemu.hw.cache.Cache.read_lines`,
:meth:`~sevemu.hw.cache.Cache.write_lines` when no line misses), and the guest's memory port (``Port``: one load
or store through the TLB and the cache, :meth:`sevemu.hw.cache.Cache.port`), and the memory
controller's single-line cipher (``LineCipher``: AES through OpenSSL's libcrypto, which this
extension links, around the tweaks of :class:`~sevemu.crypto.memenc.MemoryCipher`).

They decide nothing: each does what the Python loop beside its caller (:mod:`sevemu.hw.dram`,
:mod:`sevemu.hw.cache`, :mod:`sevemu.hw.uc.pool`) does, without one interpreted step per page or per line.  Without a C
compiler the install still succeeds and :data:`ENABLED` is false; tests turn it off to run the
Python paths.
"""

from __future__ import annotations

__all__ = ["ENABLED", "helpers"]  # helpers: only where ENABLED


_FUNCTIONS = ("dram_gather", "dram_scatter", "cache_take", "resident_keys", "line_runs", "Port", "LineCipher",
              "cache_hit_read", "cache_hit_write", "cache_hit_runs", "cache_hit_write_runs", "slot_sync",
              "copy_changed")

ENABLED: bool
"""Whether the callers use the C helpers (``helpers``); false when they were not built, or were built
from an older ``csrc/mem_accel.c`` that lacks one of them (then rebuild: ``setup.py build_ext``)."""
try:
    from sevemu.hw import _mem_accel as helpers
except ImportError:  # installed without a C compiler: the Python loops
    ENABLED = False
else:
    ENABLED = all(hasattr(helpers, name) for name in _FUNCTIONS)
