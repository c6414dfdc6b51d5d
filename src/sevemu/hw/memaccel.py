"""The optional C helpers of the memory model's bulk paths (``csrc/mem_accel.c``, built by ``setup.py``
as ``sevemu.hw._mem_accel``): DRAM gathers and scatters, the large-range cache flush, the
search for the resident (or dirty) lines of a range, the page pool's compare of a page with its
snapshot (``line_runs``, :mod:`sevemu.hw.uc.pool`), the whole-line reads and writes of resident
lines (``cache_hit_read`` / ``cache_hit_write``: :meth:`~sevemu.hw.cache.Cache.read_lines`,
:meth:`~sevemu.hw.cache.Cache.write_lines` when no line misses), and the guest's memory port (``Port``: one load
or store through the TLB and the cache, :meth:`sevemu.hw.cache.Cache.port`), and the memory
controller's single-line cipher (``LineCipher``: AES through OpenSSL's libcrypto, which this
extension links, around the tweaks of :class:`~sevemu.crypto.memenc.MemoryCipher`); and an SEV-ES
exit's host accesses in one call each (:data:`HOST_PORT`: ``HostPort``, the host's whole-line
writes, run reads and the GHCB exchange of :class:`~sevemu.hw.host.HostCore`, with ``PoolSnoop``, the
page pool's snoop; :data:`POOL_SYNC`: ``pool_sync_all``, the pool's write-back at #VMEXIT); and the RMP's
governing-entry lookup of every RMP check (``rmp_governing``: :meth:`~sevemu.hw.rmp.Rmp._authoritative`,
used where the extension has it -- an older build without it keeps the Python lookup).

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

HOST_PORT: bool = ENABLED and hasattr(helpers, "HostPort") and hasattr(helpers, "PoolSnoop")
"""Whether the host's whole-line accesses (``HostPort``: :class:`~sevemu.hw.host.HostCore`'s
``host_write`` / ``host_read_runs``) and the page pool's snoop (``PoolSnoop``:
:meth:`~sevemu.hw.uc.pool.PagePool.snoop`) take their one-call C paths; read when a core's host
interface or a pool is made (tests turn it off first for the Python paths, which give the same results)."""

POOL_SYNC: bool = ENABLED and hasattr(helpers, "pool_sync_all") and hasattr(helpers, "PoolSync")
"""Whether :meth:`PagePool.sync_all <sevemu.hw.uc.pool.PagePool.sync_all>` runs its loop in one C call
(``pool_sync_all``, bound to a pool as ``PoolSync``: the same compares, write-backs, counters; a slot whose lines another agent must be
snooped about, or that misses in the cache, goes to the pool's Python write-back).  Tests turn it off
for the Python loop."""

PAGE_FILL: bool = ENABLED and hasattr(helpers, "cache_page_plan") and hasattr(helpers, "cache_page_install")
"""Whether a page run's fill (:meth:`Cache._read_page_run <sevemu.hw.cache.Cache._read_page_run>`, the
page pool's page loads) takes its lookups, evictions and installs in C (``cache_page_plan`` /
``cache_page_install``: the same steps as the Python loop, which stays where they were not built or
:data:`ENABLED` is off)."""

COLUMNS: bool = ENABLED and all(hasattr(helpers, name) for name in
                                ("u64_columns", "u64_runs", "record_words", "strided_rows", "key_run",
                                 "dram_scatter_rows", "dram_page_list", "u64_dict_get"))
"""Whether :mod:`sevemu.hw.columns` summarises u64 columns in C (one pass each: the firmware's
whole-page batches and ring-buffer queues); its numpy expressions, which give the same values, stay
where they were not built; and :meth:`PspDma.write_rows <sevemu.hw.psp.PspDma.write_rows>` stores its
rows in one call (``dram_scatter_rows``), and a core's page-run streaming accesses list DRAM's pages in
one (``dram_page_list``).  Tests turn it off for the numpy paths."""
