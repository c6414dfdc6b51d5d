/*
 * sevemu.hw._mem_accel: optional C helpers for the bulk paths of the memory model (src/sevemu/hw/dram.py,
 * src/sevemu/hw/cache.py).  They move bytes between the model's own Python structures -- DRAM's page
 * store (a dict PFN -> bytearray of 4096 bytes) and the cache's sets (dicts key -> bytearray of 64
 * bytes) -- without one interpreted step per page or per line.  Nothing here encrypts or decides
 * anything: each function does exactly what the pure-Python path beside its caller does.
 *
 *   dram_gather(dst, pages, spa)              dst = the len(dst) bytes from spa (absent pages: zeros)
 *   dram_scatter(pages, spa, src, skip_zero)  store src at spa; an absent page is created, unless
 *                                             skip_zero and its part of src is all zeros
 *   cache_take(sets, lo, hi, dirty)           remove every line with a key in [lo, hi) from the sets;
 *                                             of those, the dirty ones leave `dirty` too and are
 *                                             returned sorted by key: (keys, lines joined, keys as
 *                                             little-endian uint64)
 *   line_runs(cur, snap)                      the runs of 64-byte lines where two equal-sized
 *                                             buffers differ: [(lo, hi), ...] byte offsets
 *                                             (the page pool's write-back, src/sevemu/hw/uc/pool.py)
 *   resident_keys(sets, mask, lo, hi)         the keys k = lo, lo+64, ... below hi held by
 *                                             sets[(k >> 6) & mask] (dicts or sets), ascending: a
 *                                             lookup per address or a visit of the sets' entries,
 *                                             whichever is shorter (None unless each
 *                                             container is exactly a dict or a set)
 *   cache_page_plan / cache_page_install  the two steps of Cache._read_page_run around its bulk read
 *   cache_hit_read(sets, mask, key, n, counters)  the n lines from key joined, when all are resident
 *                                             (each made most recently used, hits += n); else None
 *   cache_hit_write(sets, mask, key, data, dirty, counters)  the same lines overwritten with data
 *                                             and marked dirty, when all are resident; else False
 *   cache_hit_runs(sets, mask, key, runs, counters)  cache_hit_read of several runs ((offset,
 *                                             length) pairs from key) joined, when all are resident
 *   cache_hit_write_runs(sets, mask, key, buf, base, runs, dirty, counters)  cache_hit_write of
 *                                             each (lo, hi) run of `runs` (line_runs' form) with
 *                                             buf[base + lo:base + hi] at key + lo, when every line
 *                                             of every run is resident; else False
 *   slot_sync(buf, off, snap)                 line_runs(buf[off:off + len(snap)], snap), the
 *                                             differing lines copied into snap (the pool's
 *                                             write-back compare, without a copy of the page)
 *   copy_changed(dst, off, src)               dst[off:off + len(src)] = src unless equal already;
 *                                             whether it changed (the pool's write-update)
 *   PoolSnoop(pool, fallback)                 the page pool's snoop: its usual cases in one call
 *   HostPort(core, cache_dict, ...)           a core's host accesses of whole unencrypted lines
 *                                             (write, read_runs, exchange) in one call each
 *   pool_sync_all(pool, cache_dict, write_back)  the pool's write-back at #VMEXIT
 *   PoolSync(pool, cache_dict, write_back)    the same, bound to one pool (what PagePool.sync is)
 *                                             (these four: see their comments below)
 *
 * The GIL is held throughout (the structures are Python objects).  Types and sizes are checked
 * (TypeError / ValueError) before anything is changed, where the check does not need a second pass.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyargs.h"

#include <limits.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#define PAGE 4096
#define LINE 64

/* Whether two 64-byte lines differ: eight 8-byte words compared inline (memcmp's call and its
 * byte-order work cost more than the comparison of a line whose result is only "differs"). */
static inline int line_differs(const char *a, const char *b)
{
    uint64_t x = 0, u, v;
    for (int i = 0; i < LINE; i += 8) {
        memcpy(&u, a + i, 8);
        memcpy(&v, b + i, 8);
        x |= u ^ v;
    }
    return x != 0;
}

/* Whether the SAME_BLOCK bytes at offset o of a and b (buffers of n bytes) are one aligned block that
 * is equal: a page's scan for changed lines then skips the block's lines (its first one closes an
 * open run, as an equal line does; the others change nothing) -- a slot at an exit differs in a few
 * lines, and memcmp compares a block faster than its lines one by one. */
#define SAME_BLOCK 512
static inline int block_same(const char *a, const char *b, Py_ssize_t o, Py_ssize_t n)
{
    return o % SAME_BLOCK == 0 && o + SAME_BLOCK <= n && memcmp(a + o, b + o, SAME_BLOCK) == 0;
}

/* ---- DRAM pages ---------------------------------------------------------------------------- */

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

/* The page of `pfn` (borrowed), NULL when absent (no error set) or on error (error set). */
static PyObject *page_of(PyObject *pages, uint64_t pfn)
{
    PyObject *key = PyLong_FromUnsignedLongLong(pfn);
    PyObject *page;
    if (key == NULL) {
        return NULL;
    }
    page = PyDict_GetItemWithError(pages, key);
    Py_DECREF(key);
    if (page != NULL && (!PyByteArray_CheckExact(page) || PyByteArray_GET_SIZE(page) != PAGE)) {
        PyErr_Format(PyExc_TypeError, "DRAM page %llu is not a bytearray of %d bytes", (unsigned long long)pfn,
                     PAGE);
        return NULL;
    }
    return page;
}

PyDoc_STRVAR(dram_gather_doc,
             "dram_gather(dst, pages, spa, /)\n--\n\n"
             "Copy the len(dst) bytes at physical address spa out of the page store `pages` (dict\n"
             "PFN -> bytearray of 4096 bytes) into dst; pages absent from the store read as zeros.");

static PyObject *dram_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer dst;
    PyObject *pages;
    uint64_t spa;
    Py_ssize_t pos = 0;
    (void)self;

    if (check_nargs("dram_gather", nargs, 3) < 0 || get_u64(args[2], "spa", &spa) < 0) {
        return NULL;
    }
    pages = args[1];
    if (!PyDict_CheckExact(pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    while (pos < dst.len) {
        uint64_t addr = spa + (uint64_t)pos;
        Py_ssize_t off = (Py_ssize_t)(addr & (PAGE - 1));
        Py_ssize_t n = PAGE - off;
        PyObject *page;
        if (n > dst.len - pos) {
            n = dst.len - pos;
        }
        page = page_of(pages, addr >> 12);
        if (page == NULL && PyErr_Occurred()) {
            PyBuffer_Release(&dst);
            return NULL;
        }
        if (page == NULL) {
            memset((char *)dst.buf + pos, 0, (size_t)n);
        } else {
            memcpy((char *)dst.buf + pos, PyByteArray_AS_STRING(page) + off, (size_t)n);
        }
        pos += n;
    }
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static int all_zero(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        if (p[i]) {
            return 0;
        }
    }
    return 1;
}

PyDoc_STRVAR(dram_scatter_doc,
             "dram_scatter(pages, spa, src, skip_zero, /)\n--\n\n"
             "Store src at physical address spa in the page store `pages`.  A page absent from the\n"
             "store is created (a zeroed bytearray of 4096 bytes, then written), except when\n"
             "skip_zero is true and src's part of that page is all zeros: then it stays absent.");

static PyObject *dram_scatter(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer src;
    PyObject *pages;
    uint64_t spa;
    int skip_zero;
    Py_ssize_t pos = 0;
    (void)self;

    if (check_nargs("dram_scatter", nargs, 4) < 0 || get_u64(args[1], "spa", &spa) < 0) {
        return NULL;
    }
    pages = args[0];
    if (!PyDict_CheckExact(pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict");
        return NULL;
    }
    skip_zero = PyObject_IsTrue(args[3]);
    if (skip_zero < 0 || PyObject_GetBuffer(args[2], &src, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    while (pos < src.len) {
        uint64_t addr = spa + (uint64_t)pos;
        Py_ssize_t off = (Py_ssize_t)(addr & (PAGE - 1));
        Py_ssize_t n = PAGE - off;
        const unsigned char *from = (const unsigned char *)src.buf + pos;
        PyObject *page;
        if (n > src.len - pos) {
            n = src.len - pos;
        }
        page = page_of(pages, addr >> 12);
        if (page == NULL && PyErr_Occurred()) {
            goto fail;
        }
        if (page == NULL) {
            PyObject *key;
            int rc;
            if (skip_zero && all_zero(from, n)) {
                pos += n;
                continue;
            }
            page = PyByteArray_FromStringAndSize(NULL, PAGE);
            if (page == NULL) {
                goto fail;
            }
            if (n != PAGE) { /* (a whole page is overwritten below: no zeros first) */
                memset(PyByteArray_AS_STRING(page), 0, PAGE);
            }
            key = PyLong_FromUnsignedLongLong(addr >> 12);
            rc = key == NULL ? -1 : PyDict_SetItem(pages, key, page);
            Py_XDECREF(key);
            Py_DECREF(page); /* the dict holds it now (or it is gone on failure) */
            if (rc < 0) {
                goto fail;
            }
        }
        memcpy(PyByteArray_AS_STRING(page) + off, from, (size_t)n);
        pos += n;
    }
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&src);
    return NULL;
}

/* ---- the RMP's governing entry --------------------------------------------------------------- */

/* The 16-byte RMP entry at `spa` of the page store (absent page: zeros) into lo, hi: 1; 0 when the
 * caller must read it itself (the entry's line is in `dirty`: software's unwritten copy, read through
 * the cache); -1 with an exception set. */
static int rmp_entry_at(PyObject *pages, PyObject *dirty, uint64_t spa, uint64_t *lo, uint64_t *hi)
{
    PyObject *page;
    const unsigned char *p;
    int i;
    if (PySet_GET_SIZE(dirty)) {
        PyObject *key = PyLong_FromUnsignedLongLong(spa & ~(uint64_t)(LINE - 1));
        int in_dirty;
        if (key == NULL) {
            return -1;
        }
        in_dirty = PySet_Contains(dirty, key);
        Py_DECREF(key);
        if (in_dirty) {
            return in_dirty < 0 ? -1 : 0;
        }
    }
    page = page_of(pages, spa >> 12);
    if (page == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        *lo = *hi = 0;
        return 1;
    }
    p = (const unsigned char *)PyByteArray_AS_STRING(page) + (spa & (PAGE - 1));
    *lo = *hi = 0;
    for (i = 7; i >= 0; i--) {
        *lo = *lo << 8 | p[i];
        *hi = *hi << 8 | p[8 + i];
    }
    return 1;
}

PyDoc_STRVAR(rmp_governing_doc,
             "rmp_governing(pages, dirty, first, pfn, /)\n--\n\n"
             "Rmp._authoritative: (pfn of the entry that governs page pfn, its low and high quadwords) --\n"
             "the 2 MiB entry of pfn's region when it is Assigned with Page_Size set, else pfn's own --, the\n"
             "entries (16 bytes each from SPA `first`) read from the page store `pages` (dict PFN -> bytearray\n"
             "of 4096 bytes; absent: zeros).  None, nothing read, when an entry to read lies in a line of\n"
             "`dirty` (an exact set of the host's dirty line keys: the caller reads through the cache) or the\n"
             "arguments are not an exact dict and set.");

static PyObject *rmp_governing(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *pages, *dirty;
    uint64_t first, pfn, large, at, lo = 0, hi = 0;
    int rc;
    (void)self;

    if (check_nargs("rmp_governing", nargs, 4) < 0 || get_u64(args[2], "first", &first) < 0 ||
        get_u64(args[3], "pfn", &pfn) < 0) {
        return NULL;
    }
    pages = args[0];
    dirty = args[1];
    if (!PyDict_CheckExact(pages) || !PySet_CheckExact(dirty)) {
        Py_RETURN_NONE;
    }
    large = pfn & ~(uint64_t)511;
    at = large;
    if (large != pfn) { /* the region's 2 MiB entry first: it governs when Assigned and 2 MiB */
        rc = rmp_entry_at(pages, dirty, first + large * 16, &lo, &hi);
        if (rc <= 0) {
            if (rc < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (!((lo & 1) && (lo & 2))) {
            at = pfn;
        }
    }
    if (at == pfn) {
        rc = rmp_entry_at(pages, dirty, first + pfn * 16, &lo, &hi);
        if (rc <= 0) {
            if (rc < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
    }
    return Py_BuildValue("(KKK)", (unsigned long long)at, (unsigned long long)lo, (unsigned long long)hi);
}

/* ---- cache lines ----------------------------------------------------------------------------- */

/* A prefetch hint (GCC, Clang): the cache's keys and lines are separate small objects spread over the
 * heap, so each pass below asks for the objects a few entries ahead of the one it reads. */
#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)0)
#endif
#define AHEAD 8

/* An int key as uint64 (OverflowError if negative or too large): PyLong_AsUnsignedLong has a
 * short path for small multi-digit ints where unsigned long is 64 bits. */
static unsigned long long as_u64(PyObject *k)
{
#if ULONG_MAX == 0xFFFFFFFFFFFFFFFFUL
    return PyLong_AsUnsignedLong(k);
#else
    return PyLong_AsUnsignedLongLong(k);
#endif
}

typedef struct {
    PyObject *key_obj;
    PyObject *line;
    uint64_t key;
    Py_ssize_t set;
    int dirty;
} Entry;

static void drop_entries(Entry *e, Py_ssize_t n)
{
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        Py_DECREF(e[i].key_obj);
        Py_DECREF(e[i].line);
    }
}

/* Sort e[0:n) by key, all keys in [lo, lo + 64 * 2^bits): LSD radix sort of the line index
 * (key - lo) / 64, 11 bits a pass, through tmp (n entries); the passes alternate between the two
 * buffers and the result is copied back into e only when their count is odd. */
static void sort_by_key(Entry *e, Entry *tmp, Py_ssize_t n, uint64_t lo, int bits)
{
    enum { DIGIT = 11, RADIX = 1 << DIGIT };
    Py_ssize_t count[RADIX];
    Entry *const out = e;
    int shift;
    for (shift = 0; shift < bits; shift += DIGIT) {
        Py_ssize_t i, sum = 0;
        Entry *swap;
        memset(count, 0, sizeof(count));
        for (i = 0; i < n; i++) {
            count[(((e[i].key - lo) >> 6) >> shift) & (RADIX - 1)]++;
        }
        for (i = 0; i < RADIX; i++) {
            Py_ssize_t c = count[i];
            count[i] = sum;
            sum += c;
        }
        for (i = 0; i < n; i++) {
            tmp[count[(((e[i].key - lo) >> 6) >> shift) & (RADIX - 1)]++] = e[i];
        }
        swap = e;
        e = tmp;
        tmp = swap;
    }
    if (e != out) {
        memcpy(out, e, (size_t)n * sizeof(Entry)); /* the result where the caller expects it */
    }
}

/* cache_take's dirty test without a lookup per line: the dirty set's own table is walked once (its
 * entries carry each key's hash, and a non-negative int below the hash modulus is its own hash, so
 * only the keys whose hash falls in [lo, hi) are read), the keys in the range are marked in a bitmap
 * of the range's lines, and each taken entry looks its bit up.  The same answer as one set lookup
 * per taken key -- a key is dirty iff it is in the set -- without the lookups, which for line keys
 * (multiples of 64, so their low hash bits are all zero) collide in the set's table and cost more
 * than everything else cache_take does.  Returns the number of taken entries marked dirty, -1 when
 * the walk cannot be used (then nothing was marked and the caller looks each key up), -2 on an error
 * (MemoryError set).  Nothing changes in any Python object. */
#if PY_VERSION_HEX < 0x030D0000 && !defined(Py_LIMITED_API)
#define DIRTY_WALK 1
#define DIRTY_WALK_MAX_LINES ((uint64_t)1 << 27) /* a bitmap of at most 16 MiB */
static Py_ssize_t mark_dirty_by_walk(Entry *e, Py_ssize_t n, uint64_t lo, uint64_t hi, PyObject *dirty)
{
    uint64_t span = (hi - lo + LINE - 1) / LINE, *bits;
    Py_ssize_t pos = 0, i, marked = 0;
    PyObject *k;
    Py_hash_t h;
    if (!PySet_CheckExact(dirty) || hi > (uint64_t)_PyHASH_MODULUS || span > DIRTY_WALK_MAX_LINES) {
        return -1;
    }
    bits = (uint64_t *)PyMem_Calloc((size_t)(span + 63) / 64, sizeof(uint64_t));
    if (bits == NULL) {
        PyErr_NoMemory();
        return -2;
    }
    while (_PySet_NextEntry(dirty, &pos, &k, &h)) {
        uint64_t v = (uint64_t)h, line;
        if (v < lo || v >= hi) { /* (a negative hash casts above hi) */
            continue;
        }
        if (!PyLong_CheckExact(k)) {
            PyMem_Free(bits);
            return -1;
        }
        v = (uint64_t)as_u64(k);
        if (v == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            continue; /* (not a key of the range: a negative int or one past 64 bits) */
        }
        if (v < lo || v >= hi || (v - lo) % LINE) { /* (a key at or above the modulus whose hash fell in) */
            continue;
        }
        line = (v - lo) / LINE;
        bits[line / 64] |= (uint64_t)1 << (line % 64);
    }
    for (i = 0; i < n; i++) {
        uint64_t line = (e[i].key - lo) / LINE;
        e[i].dirty = (e[i].key - lo) % LINE == 0 && ((bits[line / 64] >> (line % 64)) & 1);
        marked += e[i].dirty;
    }
    PyMem_Free(bits);
    return marked;
}
#else
#define DIRTY_WALK 0
#endif

PyDoc_STRVAR(cache_take_doc,
             "cache_take(sets, lo, hi, dirty, /)\n--\n\n"
             "Remove from every dict of the list `sets` (cache key -> bytearray of 64 bytes) the lines\n"
             "whose key k has lo <= k < hi (lo a multiple of 64).  Those of them in the set `dirty`\n"
             "are removed from it too and returned sorted by key as (keys: list[int], lines:\n"
             "bytearray, the 64-byte lines one after the other, keys: bytes, the keys as little-endian\n"
             "uint64).  Nothing changes when a key is not an int or a line not a 64-byte bytearray.");

static PyObject *cache_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *sets, *dirty, *keys = NULL, *data = NULL, *packed = NULL, *result = NULL;
    uint64_t lo, hi, span;
    Py_ssize_t nsets, s, i, total = 0, n = 0, kept = 0, marked = -1;
    Entry *all = NULL, *tmp = NULL;
    int bits = 0;
    (void)self;

    if (check_nargs("cache_take", nargs, 4) < 0 || get_u64(args[1], "lo", &lo) < 0 ||
        get_u64(args[2], "hi", &hi) < 0) {
        return NULL;
    }
    sets = args[0];
    dirty = args[3];
    if (!PyList_CheckExact(sets) || !PySet_Check(dirty)) {
        PyErr_SetString(PyExc_TypeError, "sets must be a list of dicts and dirty a set");
        return NULL;
    }
    if (lo % LINE || hi < lo) {
        PyErr_SetString(PyExc_ValueError, "lo must be a multiple of 64 and hi at least lo");
        return NULL;
    }
    span = (hi - lo + LINE - 1) / LINE;
    while (bits < 64 && (span - 1) >> bits) {
        bits++;
    }
    nsets = PyList_GET_SIZE(sets);
    for (s = 0; s < nsets; s++) {
        PyObject *d = PyList_GET_ITEM(sets, s);
        if (!PyDict_CheckExact(d)) {
            PyErr_SetString(PyExc_TypeError, "sets must be a list of dicts");
            return NULL;
        }
        total += PyDict_GET_SIZE(d);
    }
    all = (Entry *)PyMem_Malloc((size_t)(total ? total : 1) * sizeof(Entry));
    if (all == NULL) {
        return PyErr_NoMemory();
    }
    /* 1: every resident line's (key, line) pointers, set by set (only the dicts' own tables) */
    for (s = 0; s < nsets; s++) {
        PyObject *d = PyList_GET_ITEM(sets, s), *k, *v;
        Py_ssize_t p = 0;
        while (PyDict_Next(d, &p, &k, &v) && n < total) {
            all[n].key_obj = k;
            all[n].line = v;
            all[n].set = s;
            all[n].dirty = 0;
            n++;
        }
    }
    /* 2: types and keys; the lines of the range move to the front (nothing changed yet) */
    for (i = 0; i < n; i++) {
        PyObject *k = all[i].key_obj, *v = all[i].line;
        uint64_t key;
        if (i + AHEAD < n) {
            PREFETCH(all[i + AHEAD].key_obj);
            PREFETCH(all[i + AHEAD].line);
        }
        if (!PyLong_CheckExact(k) || !PyByteArray_CheckExact(v) || PyByteArray_GET_SIZE(v) != LINE) {
            PyErr_SetString(PyExc_TypeError, "a cache line must be an int key and a bytearray of 64 bytes");
            goto fail_unchanged;
        }
        key = (uint64_t)as_u64(k);
        if (key == (uint64_t)-1 && PyErr_Occurred()) {
            goto fail_unchanged;
        }
        if (key >= lo && key < hi) {
            all[kept] = all[i];
            all[kept].key = key;
            kept++;
        }
    }
    n = kept;
    /* 2b: which of them are dirty, by one walk of `dirty` (nothing changed yet) */
#if DIRTY_WALK
    marked = mark_dirty_by_walk(all, n, lo, hi, dirty);
    if (marked == -2) {
        goto fail_unchanged;
    }
#endif
    /* 3: out of the sets (a set wholly in the range is cleared in one call) */
    for (i = 0; i < n; i++) {
        Py_INCREF(all[i].key_obj);
        Py_INCREF(all[i].line);
    }
    for (i = 0; i < n;) {
        Py_ssize_t j = i, set = all[i].set;
        PyObject *d = PyList_GET_ITEM(sets, set);
        while (j < n && all[j].set == set) {
            j++;
        }
        if (j - i == PyDict_GET_SIZE(d)) {
            PyDict_Clear(d);
        } else {
            Py_ssize_t m;
            for (m = i; m < j; m++) {
                if (PyDict_DelItem(d, all[m].key_obj) < 0) {
                    goto fail;
                }
            }
        }
        i = j;
    }
    /* 4: the dirty ones stay (and leave `dirty`); the others are dropped */
    if (marked >= 0) { /* (known already: all of `dirty` goes at once when every key of it was taken) */
        int whole = marked == PySet_GET_SIZE(dirty);
        kept = 0;
        if (whole && PySet_Clear(dirty) < 0) {
            goto fail;
        }
        for (i = 0; i < n; i++) {
            if (!all[i].dirty) {
                Py_DECREF(all[i].key_obj);
                Py_DECREF(all[i].line);
                continue;
            }
            if (!whole && PySet_Discard(dirty, all[i].key_obj) < 0) {
                drop_entries(all, kept);
                drop_entries(all + i, n - i);
                n = 0;
                goto fail;
            }
            all[kept++] = all[i];
        }
        n = kept;
        goto sort;
    }
    kept = 0;
    for (i = 0; i < n; i++) {
        int was = PySet_Discard(dirty, all[i].key_obj);
        if (was < 0) {
            drop_entries(all, kept);
            drop_entries(all + i, n - i);
            n = 0;
            goto fail;
        }
        if (was) {
            all[kept++] = all[i];
        } else {
            Py_DECREF(all[i].key_obj);
            Py_DECREF(all[i].line);
        }
    }
    n = kept;
sort:
    /* 5: sorted by key, copied out */
    tmp = (Entry *)PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Entry));
    if (tmp == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    sort_by_key(all, tmp, n, lo, bits);
    PyMem_Free(tmp);
    keys = PyList_New(n);
    data = PyByteArray_FromStringAndSize(NULL, n * LINE);
    packed = PyBytes_FromStringAndSize(NULL, n * 8);
    if (keys == NULL || data == NULL || packed == NULL) {
        goto fail;
    }
    for (i = 0; i < n; i++) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(packed) + 8 * i;
        uint64_t key = all[i].key;
        int b;
        if (i + AHEAD < n) {
            PREFETCH(PyByteArray_AS_STRING(all[i + AHEAD].line));
        }
        memcpy(PyByteArray_AS_STRING(data) + LINE * i, PyByteArray_AS_STRING(all[i].line), LINE);
        for (b = 0; b < 8; b++) {
            dst[b] = (unsigned char)(key >> (8 * b));
        }
        PyList_SET_ITEM(keys, i, all[i].key_obj); /* steals the reference */
        Py_DECREF(all[i].line);
    }
    PyMem_Free(all);
    result = PyTuple_Pack(3, keys, data, packed);
    Py_DECREF(keys);
    Py_DECREF(data);
    Py_DECREF(packed);
    return result;
fail:
    drop_entries(all, n);
    Py_XDECREF(keys);
    Py_XDECREF(data);
    Py_XDECREF(packed);
fail_unchanged:
    PyMem_Free(all);
    return NULL;
}

/* ---- the page pool's compare ---------------------------------------------------------------- */

PyDoc_STRVAR(line_runs_doc,
             "line_runs(cur, snap, /)\n--\n\n"
             "The runs of 64-byte lines in which the buffers `cur` and `snap` (the same length, a\n"
             "multiple of 64) differ, in order, as a list of (lo, hi) byte offsets; [] when equal.");

static int append_run(PyObject *out, Py_ssize_t lo, Py_ssize_t hi)
{
    PyObject *run = Py_BuildValue("(nn)", lo, hi);
    int rc;
    if (run == NULL) {
        return -1;
    }
    rc = PyList_Append(out, run);
    Py_DECREF(run);
    return rc;
}

static PyObject *line_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer a, b;
    PyObject *out = NULL;
    Py_ssize_t n, o, start = -1;
    const char *pa, *pb;
    (void)self;
    if (check_nargs("line_runs", nargs, 2) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &a, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&a);
        return NULL;
    }
    n = a.len;
    if (b.len != n || n % LINE) {
        PyErr_Format(PyExc_ValueError, "line_runs needs two buffers of one length, a multiple of %d (got %zd and %zd)",
                     LINE, a.len, b.len);
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL) {
        goto done;
    }
    pa = (const char *)a.buf;
    pb = (const char *)b.buf;
    for (o = 0; o < n; o += LINE) {
        if (line_differs(pa + o, pb + o)) {
            if (start < 0) {
                start = o;
            }
        } else if (start >= 0) {
            if (append_run(out, start, o) < 0) {
                Py_CLEAR(out);
                goto done;
            }
            start = -1;
        }
    }
    if (start >= 0 && append_run(out, start, n) < 0) {
        Py_CLEAR(out);
    }
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

/* The keys k = lo, lo + 64, ... below hi held by sets[(k >> 6) & mask], appended to out: one lookup
 * per address (an empty container is skipped without making the key). */
static int lookup_each(PyObject *sets, uint64_t mask, uint64_t lo, uint64_t hi, PyObject *out)
{
    uint64_t k;
    for (k = lo; k < hi; k += LINE) {
        PyObject *c = PyList_GET_ITEM(sets, (Py_ssize_t)((k >> 6) & mask));
        PyObject *key;
        int has;
        if ((PyDict_CheckExact(c) ? PyDict_GET_SIZE(c) : PySet_GET_SIZE(c)) == 0) {
            continue;
        }
        key = PyLong_FromUnsignedLongLong(k);
        if (key == NULL) {
            return -1;
        }
        has = PyDict_CheckExact(c) ? PyDict_Contains(c, key) : PySet_Contains(c, key);
        if (has > 0) {
            has = PyList_Append(out, key) == 0 ? 1 : -1;
        }
        Py_DECREF(key);
        if (has < 0) {
            return -1;
        }
        if (k > UINT64_MAX - LINE) {
            break;
        }
    }
    return 0;
}

/* Whether `key`, an int whose hash is `hash`, lies in [lo, hi); 0 without looking at the int when its
 * hash is outside (an int below 2^61 - 1 is its own hash, so where hi is at most that, no key of the
 * range has a hash outside it), -1 on error. */
static int key_between(PyObject *key, Py_hash_t hash, uint64_t lo, uint64_t hi)
{
    unsigned long long v;
    if (hi <= (uint64_t)_PyHASH_MODULUS && ((uint64_t)hash < lo || (uint64_t)hash >= hi)) {
        return 0;
    }
    if (!PyLong_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "a cache key is not an int");
        return -1;
    }
    v = as_u64(key);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    return v >= lo && v < hi;
}

/* The keys in [lo, hi) held by the container c (a dict or a set), appended to out (unsorted). */
static int visit(PyObject *c, uint64_t lo, uint64_t hi, PyObject *out)
{
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    Py_hash_t hash;
    int in;
    if (PyDict_CheckExact(c)) {
        while (_PyDict_Next(c, &pos, &key, &value, &hash)) {
            if ((in = key_between(key, hash, lo, hi)) < 0 || (in && PyList_Append(out, key) < 0)) {
                return -1;
            }
        }
    } else {
        while (_PySet_NextEntry(c, &pos, &key, &hash)) {
            if ((in = key_between(key, hash, lo, hi)) < 0 || (in && PyList_Append(out, key) < 0)) {
                return -1;
            }
        }
    }
    return 0;
}

/* A lookup of one address costs about what a visit of this many entries does (~75 ns against ~20). */
#define VISITS_PER_LOOKUP 4

PyDoc_STRVAR(resident_keys_doc,
             "resident_keys(sets, mask, lo, hi, /)\n--\n\n"
             "The keys k = lo, lo + 64, ... below hi (lo a multiple of 64) that the container\n"
             "sets[(k >> 6) & mask] holds (each a dict or a set; len(sets) == mask + 1), ascending:\n"
             "the lines of a cache range (mask: the set mask) or of one set of keys (sets == [keys],\n"
             "mask 0).  Looks each address up, or visits the entries of the sets the range maps to\n"
             "when they hold fewer than 4 times the range's lines (comparing the ints' hashes\n"
             "first); the same keys either way.  None when a container is not exactly a dict or a\n"
             "set (a subclass may answer lookups its own way: the caller then runs its Python path).");

static PyObject *resident_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *sets, *out;
    uint64_t mask, lo, hi, lines;
    Py_ssize_t nsets, i, first, nmapped, held = 0;
    (void)self;

    if (check_nargs("resident_keys", nargs, 4) < 0 || get_u64(args[1], "mask", &mask) < 0 ||
        get_u64(args[2], "lo", &lo) < 0 || get_u64(args[3], "hi", &hi) < 0) {
        return NULL;
    }
    sets = args[0];
    if (!PyList_CheckExact(sets)) {
        PyErr_SetString(PyExc_TypeError, "sets must be a list of dicts or sets");
        return NULL;
    }
    if (lo % LINE) {
        PyErr_SetString(PyExc_ValueError, "lo must be a multiple of 64");
        return NULL;
    }
    nsets = PyList_GET_SIZE(sets);
    if ((uint64_t)nsets != mask + 1 || (mask & (mask + 1))) {
        PyErr_SetString(PyExc_ValueError, "sets must have mask + 1 entries, a power of two");
        return NULL;
    }
    if (hi <= lo) {
        return PyList_New(0);
    }
    lines = (hi - lo + LINE - 1) / LINE;
    first = (Py_ssize_t)((lo >> 6) & mask);
    nmapped = lines >= (uint64_t)nsets ? nsets : (Py_ssize_t)lines;
    /* the sets the range maps to (and only those: a short range costs no pass over every set) */
    for (i = 0; i < nmapped; i++) {
        PyObject *c = PyList_GET_ITEM(sets, (first + i) & (Py_ssize_t)mask);
        if (PyDict_CheckExact(c)) {
            held += PyDict_GET_SIZE(c);
        } else if (PySet_CheckExact(c)) {
            held += PySet_GET_SIZE(c);
        } else {
            Py_RETURN_NONE; /* a subclass may answer lookups its own way: the caller's Python path */
        }
    }
    out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    if (held == 0) {
        return out; /* no line in the sets the range maps to */
    }
    if ((uint64_t)held < VISITS_PER_LOOKUP * lines) {
        for (i = 0; i < nmapped; i++) {
            PyObject *c = PyList_GET_ITEM(sets, (first + i) & (Py_ssize_t)mask);
            /* an emptied dict still walks its table's dummy entries: skip it */
            if ((PyDict_CheckExact(c) ? PyDict_GET_SIZE(c) : PySet_GET_SIZE(c)) == 0) {
                continue;
            }
            if (visit(c, lo, hi, out) < 0) {
                goto fail;
            }
        }
        if (PyList_Sort(out) < 0) {
            goto fail;
        }
    } else if (lookup_each(sets, mask, lo, hi, out) < 0) {
        goto fail;
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *s_hits;

/* ---- whole lines that are all resident: Cache.read_lines / write_lines without a miss ---------- */

PyDoc_STRVAR(cache_hit_read_doc,
             "cache_hit_read(sets, mask, key, n, counters, /)\n--\n\n"
             "The n lines of keys key, key + 64, ... joined (bytes), when every one is resident in\n"
             "sets[(k >> 6) & mask] (exact dicts of 64-byte bytearrays): each becomes the most recently\n"
             "used of its set in order and counters['hits'] grows by n, as n hits of Cache.line.\n"
             "None, with nothing changed, when a line is absent or a container is not exactly that\n"
             "(the caller's Python path then does the whole run).");

PyDoc_STRVAR(cache_hit_write_doc,
             "cache_hit_write(sets, mask, key, data, dirty, counters, /)\n--\n\n"
             "Overwrite the len(data) / 64 lines of keys key, key + 64, ... with data, when every one\n"
             "is resident (as cache_hit_read): each becomes the most recently used of its set in order,\n"
             "joins the set `dirty`, and counters['hits'] grows by their number, as Cache.write_lines\n"
             "does with hits.  False, with nothing changed, when a line is absent or a container is not\n"
             "exactly that.");

/* counters[name] += n */
static int bump_by(PyObject *counters, PyObject *name, Py_ssize_t n)
{
    PyObject *v = PyDict_GetItemWithError(counters, name), *nv, *add;
    int rc;
    if (v == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, name);
        }
        return -1;
    }
    add = PyLong_FromSsize_t(n);
    if (add == NULL) {
        return -1;
    }
    nv = PyNumber_Add(v, add);
    Py_DECREF(add);
    if (nv == NULL) {
        return -1;
    }
    rc = PyDict_SetItem(counters, name, nv);
    Py_DECREF(nv);
    return rc;
}

/* The resident lines of the n keys from key: keys[i] and lines[i] new references; 1 when all are
 * there, 0 (nothing held) when one is absent or a container is not what the fast path takes, -1 on
 * error. */
static int hit_lines(PyObject *sets, uint64_t mask, uint64_t key, Py_ssize_t n, PyObject **keys, PyObject **lines)
{
    Py_ssize_t i, got = 0;
    int rc = 1;
    if (!PyList_CheckExact(sets) || (uint64_t)PyList_GET_SIZE(sets) != mask + 1) {
        return 0;
    }
    for (i = 0; i < n && rc == 1; i++) {
        uint64_t k = key + (uint64_t)i * LINE;
        PyObject *s = PyList_GET_ITEM(sets, (Py_ssize_t)((k >> 6) & mask)), *ko, *line;
        if (!PyDict_CheckExact(s)) {
            rc = 0;
            break;
        }
        ko = u64_obj(k);
        if (ko == NULL) {
            rc = -1;
            break;
        }
        line = PyDict_GetItemWithError(s, ko);
        if (line == NULL || !PyByteArray_CheckExact(line) || PyByteArray_GET_SIZE(line) != LINE) {
            rc = (line == NULL && PyErr_Occurred()) ? -1 : 0;
            Py_DECREF(ko);
            break;
        }
        keys[i] = ko;
        lines[i] = Py_NewRef(line);
        got = i + 1;
    }
    if (rc != 1) {
        for (i = 0; i < got; i++) {
            Py_DECREF(keys[i]);
            Py_DECREF(lines[i]);
        }
    }
    return rc;
}

/* Whether the int `key` is the last key of the dict `s` in its order (the most recently used line
 * of a set: re-inserting it would change nothing).  A set holds at most `ways` lines: a short walk. */
static int is_last(PyObject *s, uint64_t key)
{
    /* (PyDict_Next's position is an index of the dict's entries in insertion order, deleted ones
     * included: the last live entry is at index size - 1 or later) */
    Py_ssize_t pos = PyDict_GET_SIZE(s) > 0 ? PyDict_GET_SIZE(s) - 1 : 0;
    PyObject *k, *v, *last = NULL;
    unsigned long long x;
    while (PyDict_Next(s, &pos, &k, &v)) {
        last = k;
    }
    if (last == NULL || !PyLong_CheckExact(last)) {
        return 0;
    }
    x = as_u64(last);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear(); /* not a key this fast path made: re-insert as usual */
        return 0;
    }
    return (uint64_t)x == key;
}

/* Each line becomes the most recently used of its set (re-inserted at the end unless it is there
 * already), in order; the references are released. */
static int touch_lines(PyObject *sets, uint64_t mask, uint64_t key, Py_ssize_t n, PyObject **keys, PyObject **lines,
                       PyObject *dirty)
{
    Py_ssize_t i;
    int rc = 0;
    for (i = 0; i < n; i++) {
        uint64_t k = key + (uint64_t)i * LINE;
        PyObject *s = PyList_GET_ITEM(sets, (Py_ssize_t)((k >> 6) & mask));
        if (rc == 0 && ((!is_last(s, k) && (PyDict_DelItem(s, keys[i]) < 0 ||
                                                   PyDict_SetItem(s, keys[i], lines[i]) < 0)) ||
                        (dirty != NULL && PySet_Add(dirty, keys[i]) < 0))) {
            rc = -1;
        }
        Py_DECREF(keys[i]);
        Py_DECREF(lines[i]);
    }
    return rc;
}

static int hit_args(const char *name, PyObject *const *args, uint64_t *mask, uint64_t *key, PyObject *counters)
{
    if (get_u64(args[1], "mask", mask) < 0 || get_u64(args[2], "key", key) < 0) {
        return -1;
    }
    if (*key % LINE) {
        PyErr_Format(PyExc_ValueError, "%s: key must be a multiple of 64", name);
        return -1;
    }
    if (!PyDict_CheckExact(counters)) {
        PyErr_Format(PyExc_TypeError, "%s: counters must be a dict", name);
        return -1;
    }
    return 0;
}

static PyObject *cache_hit_read(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t n, i;
    PyObject **refs, *out;
    int rc;
    (void)self;
    if (check_nargs("cache_hit_read", nargs, 5) < 0 || hit_args("cache_hit_read", args, &mask, &key, args[4]) < 0) {
        return NULL;
    }
    n = PyLong_AsSsize_t(args[3]);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (n <= 0 || n > PY_SSIZE_T_MAX / (2 * LINE)) {
        PyErr_SetString(PyExc_ValueError, "cache_hit_read: n must be positive");
        return NULL;
    }
    refs = PyMem_New(PyObject *, 2 * n);
    if (refs == NULL) {
        return PyErr_NoMemory();
    }
    rc = hit_lines(args[0], mask, key, n, refs, refs + n);
    if (rc <= 0) {
        PyMem_Free(refs);
        if (rc < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    out = PyBytes_FromStringAndSize(NULL, n * LINE);
    if (out != NULL) {
        char *p = PyBytes_AS_STRING(out);
        for (i = 0; i < n; i++) {
            memcpy(p + i * LINE, PyByteArray_AS_STRING(refs[n + i]), LINE);
        }
    }
    if (touch_lines(args[0], mask, key, n, refs, refs + n, NULL) < 0 || out == NULL ||
        bump_by(args[4], s_hits, n) < 0) {
        Py_XDECREF(out);
        out = NULL;
    }
    PyMem_Free(refs);
    return out;
}

PyDoc_STRVAR(cache_page_plan_doc,
             "cache_page_plan(sets, mask, key, n, ways, dirty, others, /)\n--\n\n"
             "The first step of Cache._read_page_run for the n lines from key (inside one page, each in its\n"
             "own set), in line order: a resident line becomes the most recent of its set; a missing one\n"
             "first drops the lines of its SPA in the domains `others` (a tuple of domain bits, key >> 52\n"
             "<< 52) from its set, in set order, then the set's least recently used line when the set holds\n"
             "`ways` lines.  Returns (lines, wb_keys, wb_lines, hits, first, last, clash): lines[i] the\n"
             "resident line or None, the dropped lines that are in `dirty` in the order dropped (not\n"
             "removed from `dirty`), the hit count, the first and last missing index (-1 when none),\n"
             "and whether another domain's line of a missing line's SPA was dropped.  None (nothing\n"
             "changed) when a set is not exactly a dict.");

static PyObject *cache_page_plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t n, ways, i, j, no, hits = 0, first = -1, last = -1;
    PyObject *sets, *dirty, *others, *lines = NULL, *wbk = NULL, *wbl = NULL, *out = NULL;
    int clash = 0;
    (void)self;
    if (check_nargs("cache_page_plan", nargs, 7) < 0 || get_u64(args[1], "mask", &mask) < 0 ||
        get_u64(args[2], "key", &key) < 0) {
        return NULL;
    }
    sets = args[0];
    dirty = args[5];
    others = args[6];
    n = PyLong_AsSsize_t(args[3]);
    ways = PyLong_AsSsize_t(args[4]);
    if ((n == -1 || ways == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_CheckExact(sets) || !PySet_Check(dirty) || !PyTuple_CheckExact(others)) {
        PyErr_SetString(PyExc_TypeError, "cache_page_plan: sets must be a list, dirty a set, others a tuple");
        return NULL;
    }
    if (key % LINE || n <= 0 || ways < 1 || (uint64_t)n > mask + 1 || (uint64_t)PyList_GET_SIZE(sets) != mask + 1 ||
        (key & (PAGE - 1)) + (uint64_t)n * LINE > PAGE) {
        PyErr_SetString(PyExc_ValueError, "cache_page_plan: the lines must be inside one page, each in its own set");
        return NULL;
    }
    no = PyTuple_GET_SIZE(others);
    for (i = 0; i < n; i++) { /* (checked before anything changes) */
        if (!PyDict_CheckExact(PyList_GET_ITEM(sets, (Py_ssize_t)(((key >> 6) + (uint64_t)i) & mask)))) {
            Py_RETURN_NONE;
        }
    }
    lines = PyList_New(n);
    wbk = PyList_New(0);
    wbl = PyList_New(0);
    if (lines == NULL || wbk == NULL || wbl == NULL) {
        goto done;
    }
    for (i = 0; i < n; i++) {
        uint64_t k = key + (uint64_t)i * LINE, spa = k & (((uint64_t)1 << 52) - 1);
        PyObject *s = PyList_GET_ITEM(sets, (Py_ssize_t)((k >> 6) & mask));
        PyObject *ko = PyLong_FromUnsignedLongLong(k), *line;
        if (ko == NULL) {
            goto done;
        }
        line = PyDict_GetItemWithError(s, ko);
        if (line != NULL) {
            Py_INCREF(line);
            if (PyDict_DelItem(s, ko) < 0 || PyDict_SetItem(s, ko, line) < 0) {
                Py_DECREF(line);
                Py_DECREF(ko);
                goto done;
            }
            PyList_SET_ITEM(lines, i, line); /* (steals the reference) */
            hits++;
            Py_DECREF(ko);
            continue;
        }
        Py_DECREF(ko);
        if (PyErr_Occurred()) {
            goto done;
        }
        Py_INCREF(Py_None);
        PyList_SET_ITEM(lines, i, Py_None);
        if (first < 0) {
            first = i;
        }
        last = i;
        for (j = 0; j < no; j++) { /* another domain's line of this SPA: drop every such line in set order */
            uint64_t d;
            PyObject *oko;
            int has;
            if (get_u64(PyTuple_GET_ITEM(others, j), "others", &d) < 0) {
                goto done;
            }
            oko = PyLong_FromUnsignedLongLong(d | spa);
            if (oko == NULL) {
                goto done;
            }
            has = PyDict_Contains(s, oko);
            Py_DECREF(oko);
            if (has < 0) {
                goto done;
            }
            if (has) {
                break;
            }
        }
        if (j < no) {
            PyObject *order = PyDict_Keys(s);
            Py_ssize_t m;
            if (order == NULL) {
                goto done;
            }
            clash = 1;
            for (m = 0; m < PyList_GET_SIZE(order); m++) {
                PyObject *ok = PyList_GET_ITEM(order, m), *old;
                uint64_t okv;
                int isd;
                if (get_u64(ok, "key", &okv) < 0) {
                    Py_DECREF(order);
                    goto done;
                }
                if ((okv & (((uint64_t)1 << 52) - 1)) != spa) {
                    continue;
                }
                old = PyDict_GetItemWithError(s, ok);
                Py_XINCREF(old);
                isd = PySet_Contains(dirty, ok);
                if (old == NULL || isd < 0 || PyDict_DelItem(s, ok) < 0 ||
                    (isd && (PyList_Append(wbk, ok) < 0 || PyList_Append(wbl, old) < 0))) {
                    Py_XDECREF(old);
                    Py_DECREF(order);
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_RuntimeError, "cache_page_plan: a set changed");
                    }
                    goto done;
                }
                Py_DECREF(old);
            }
            Py_DECREF(order);
        }
        if (PyDict_GET_SIZE(s) >= ways) { /* the least recently used line: the first in the set's order */
            Py_ssize_t pos = 0;
            PyObject *vk, *vl;
            int isd;
            if (!PyDict_Next(s, &pos, &vk, &vl)) {
                PyErr_SetString(PyExc_RuntimeError, "cache_page_plan: an empty set");
                goto done;
            }
            Py_INCREF(vk);
            Py_INCREF(vl);
            isd = PySet_Contains(dirty, vk);
            if (isd < 0 || PyDict_DelItem(s, vk) < 0 ||
                (isd && (PyList_Append(wbk, vk) < 0 || PyList_Append(wbl, vl) < 0))) {
                Py_DECREF(vk);
                Py_DECREF(vl);
                goto done;
            }
            Py_DECREF(vk);
            Py_DECREF(vl);
        }
    }
    out = Py_BuildValue("(OOOnnnO)", lines, wbk, wbl, hits, first, last, clash ? Py_True : Py_False);
done:
    Py_XDECREF(lines);
    Py_XDECREF(wbk);
    Py_XDECREF(wbl);
    return out;
}

PyDoc_STRVAR(cache_page_install_doc,
             "cache_page_install(sets, mask, key, lines, plain, first, /)\n--\n\n"
             "The last step of Cache._read_page_run: each None of `lines` (index i, the line of key + 64 i)\n"
             "becomes a new bytearray of the 64 bytes of `plain` at (i - first) * 64, stored in the list and\n"
             "in its set (the most recent).  Returns the lines joined.");

static PyObject *cache_page_install(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t n, i, first;
    PyObject *sets, *lines, *out = NULL;
    Py_buffer b;
    char *p;
    (void)self;
    if (check_nargs("cache_page_install", nargs, 6) < 0 || get_u64(args[1], "mask", &mask) < 0 ||
        get_u64(args[2], "key", &key) < 0) {
        return NULL;
    }
    sets = args[0];
    lines = args[3];
    first = PyLong_AsSsize_t(args[5]);
    if (first == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!PyList_CheckExact(sets) || (uint64_t)PyList_GET_SIZE(sets) != mask + 1 || !PyList_CheckExact(lines)) {
        PyErr_SetString(PyExc_TypeError, "cache_page_install: sets and lines must be lists");
        return NULL;
    }
    if (PyObject_GetBuffer(args[4], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    n = PyList_GET_SIZE(lines);
    for (i = 0; i < n; i++) { /* (checked before anything changes) */
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (line == Py_None ? (i < first || (i - first + 1) * LINE > b.len ||
                               !PyDict_CheckExact(PyList_GET_ITEM(sets, (Py_ssize_t)(((key >> 6) + (uint64_t)i) & mask))))
                            : (!PyByteArray_CheckExact(line) || PyByteArray_GET_SIZE(line) != LINE)) {
            PyErr_SetString(PyExc_ValueError, "cache_page_install: a line or the plaintext does not fit");
            goto done;
        }
    }
    for (i = 0; i < n; i++) {
        uint64_t k = key + (uint64_t)i * LINE;
        PyObject *ko, *line;
        if (PyList_GET_ITEM(lines, i) != Py_None) {
            continue;
        }
        line = PyByteArray_FromStringAndSize((const char *)b.buf + (i - first) * LINE, LINE);
        ko = line == NULL ? NULL : PyLong_FromUnsignedLongLong(k);
        if (ko == NULL || PyDict_SetItem(PyList_GET_ITEM(sets, (Py_ssize_t)((k >> 6) & mask)), ko, line) < 0) {
            Py_XDECREF(ko);
            Py_XDECREF(line);
            goto done;
        }
        Py_DECREF(ko);
        PyList_SetItem(lines, i, line); /* (steals; releases the None) */
    }
    out = PyBytes_FromStringAndSize(NULL, n * LINE);
    if (out != NULL) {
        p = PyBytes_AS_STRING(out);
        for (i = 0; i < n; i++) {
            memcpy(p + i * LINE, PyByteArray_AS_STRING(PyList_GET_ITEM(lines, i)), LINE);
        }
    }
done:
    PyBuffer_Release(&b);
    return out;
}


static PyObject *cache_hit_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t n, i;
    PyObject **refs = NULL, *out = NULL;
    Py_buffer b;
    int rc;
    (void)self;
    if (check_nargs("cache_hit_write", nargs, 6) < 0 || hit_args("cache_hit_write", args, &mask, &key, args[5]) < 0) {
        return NULL;
    }
    if (!PySet_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "cache_hit_write: dirty must be a set");
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (b.len <= 0 || b.len % LINE) {
        PyErr_Format(PyExc_ValueError, "cache_hit_write takes whole lines, got %zd bytes", b.len);
        goto done;
    }
    n = b.len / LINE;
    refs = PyMem_New(PyObject *, 2 * n);
    if (refs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    rc = hit_lines(args[0], mask, key, n, refs, refs + n);
    if (rc < 0) {
        goto done;
    }
    if (rc == 0) {
        out = Py_NewRef(Py_False);
        goto done;
    }
    for (i = 0; i < n; i++) {
        memcpy(PyByteArray_AS_STRING(refs[n + i]), (const char *)b.buf + i * LINE, LINE);
    }
    if (touch_lines(args[0], mask, key, n, refs, refs + n, args[4]) == 0 && bump_by(args[5], s_hits, n) == 0) {
        out = Py_NewRef(Py_True);
    }
done:
    PyMem_Free(refs);
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(cache_hit_runs_doc,
             "cache_hit_runs(sets, mask, key, runs, counters, /)\n--\n\n"
             "cache_hit_read of each (offset, length) pair of the tuple `runs` (offsets and lengths\n"
             "multiples of 64, lengths positive) from key + offset, in the order given, joined into one\n"
             "bytes: the same bytes, LRU order and hits.  None, with nothing changed, when a line is\n"
             "absent or a container is not exactly what cache_hit_read takes.");

PyDoc_STRVAR(cache_hit_write_runs_doc,
             "cache_hit_write_runs(sets, mask, key, buf, base, runs, dirty, counters, /)\n--\n\n"
             "cache_hit_write(sets, mask, key + lo, buf[base + lo:base + hi], dirty, counters) of each\n"
             "(lo, hi) pair of the list `runs` (byte offsets of whole lines, as line_runs gives them),\n"
             "in order, when every line of every run is resident: True; False, with nothing changed,\n"
             "otherwise.");

/* Runs of lines parsed by the callers below: spans[2 * r] is the byte offset of run r from the key,
 * spans[2 * r + 1] its number of lines; `total` lines in all. */

/* The two ints of the pair `run` (a 2-tuple); -1 with TypeError/OverflowError. */
static int pair_of(PyObject *run, const char *name, Py_ssize_t *a, Py_ssize_t *b)
{
    if (!PyTuple_CheckExact(run) || PyTuple_GET_SIZE(run) != 2) {
        PyErr_Format(PyExc_TypeError, "%s: each run must be a tuple of two ints", name);
        return -1;
    }
    *a = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 0));
    if (*a == -1 && PyErr_Occurred()) {
        return -1;
    }
    *b = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 1));
    return (*b == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The resident lines of every run, run after run, as hit_lines finds them: a new block of 2 * total
 * references (the keys, then the lines) with *rc = 1; NULL with *rc = 0 when a line is absent or a
 * container is not what hit_lines takes (nothing held), NULL with *rc = -1 on error. */
static PyObject **hit_runs(PyObject *sets, uint64_t mask, uint64_t key, Py_ssize_t nruns, const Py_ssize_t *spans,
                           Py_ssize_t total, int *rc)
{
    Py_ssize_t r, i, got = 0;
    PyObject **refs = PyMem_New(PyObject *, 2 * total);
    if (refs == NULL) {
        PyErr_NoMemory();
        *rc = -1;
        return NULL;
    }
    *rc = 1;
    for (r = 0; r < nruns && *rc == 1; r++) {
        *rc = hit_lines(sets, mask, key + (uint64_t)spans[2 * r], spans[2 * r + 1], refs + got, refs + total + got);
        if (*rc == 1) {
            got += spans[2 * r + 1];
        }
    }
    if (*rc != 1) {
        for (i = 0; i < got; i++) {
            Py_DECREF(refs[i]);
            Py_DECREF(refs[total + i]);
        }
        PyMem_Free(refs);
        return NULL;
    }
    return refs;
}

/* touch_lines of every run, in order (all references released). */
static int touch_runs(PyObject *sets, uint64_t mask, uint64_t key, Py_ssize_t nruns, const Py_ssize_t *spans,
                      Py_ssize_t total, PyObject **refs, PyObject *dirty)
{
    Py_ssize_t r, got = 0;
    int rc = 0;
    for (r = 0; r < nruns; r++) {
        if (touch_lines(sets, mask, key + (uint64_t)spans[2 * r], spans[2 * r + 1], refs + got, refs + total + got,
                        dirty) < 0) {
            rc = -1;
        }
        got += spans[2 * r + 1];
    }
    return rc;
}

/* Room for the spans of `nruns` runs, or NULL with MemoryError. */
static Py_ssize_t *new_spans(Py_ssize_t nruns)
{
    Py_ssize_t *spans = PyMem_New(Py_ssize_t, 2 * nruns + 1);
    if (spans == NULL) {
        PyErr_NoMemory();
    }
    return spans;
}

static PyObject *cache_hit_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t nruns, r, total = 0, i, off, len, *spans = NULL;
    PyObject **refs = NULL, *out = NULL, *runs;
    int rc;
    (void)self;
    if (check_nargs("cache_hit_runs", nargs, 5) < 0 || hit_args("cache_hit_runs", args, &mask, &key, args[4]) < 0) {
        return NULL;
    }
    runs = args[3];
    if (!PyTuple_CheckExact(runs)) {
        PyErr_SetString(PyExc_TypeError, "cache_hit_runs: runs must be a tuple");
        return NULL;
    }
    nruns = PyTuple_GET_SIZE(runs);
    if ((spans = new_spans(nruns)) == NULL) {
        return NULL;
    }
    for (r = 0; r < nruns; r++) {
        if (pair_of(PyTuple_GET_ITEM(runs, r), "cache_hit_runs", &off, &len) < 0) {
            goto done;
        }
        if (off < 0 || len <= 0 || off % LINE || len % LINE || len > PY_SSIZE_T_MAX / 4 - off ||
            total > PY_SSIZE_T_MAX / (4 * LINE) - len / LINE) {
            PyErr_Format(PyExc_ValueError, "cache_hit_runs: run of %zd bytes at offset %zd is not of whole lines",
                         len, off);
            goto done;
        }
        spans[2 * r] = off;
        spans[2 * r + 1] = len / LINE;
        total += len / LINE;
    }
    if (total == 0) {
        out = PyBytes_FromStringAndSize(NULL, 0);
        goto done;
    }
    if ((refs = hit_runs(args[0], mask, key, nruns, spans, total, &rc)) == NULL) {
        out = rc < 0 ? NULL : Py_NewRef(Py_None);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total * LINE);
    if (out != NULL) {
        char *p = PyBytes_AS_STRING(out);
        for (i = 0; i < total; i++) {
            memcpy(p + i * LINE, PyByteArray_AS_STRING(refs[total + i]), LINE);
        }
    }
    /* each run's lines become the most recent, run after run */
    if (touch_runs(args[0], mask, key, nruns, spans, total, refs, NULL) < 0 || out == NULL ||
        bump_by(args[4], s_hits, total) < 0) {
        Py_CLEAR(out);
    }
done:
    PyMem_Free(refs);
    PyMem_Free(spans);
    return out;
}

static PyObject *cache_hit_write_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t mask, key;
    Py_ssize_t base, nruns, r, total = 0, got = 0, i, lo, hi, *spans = NULL;
    PyObject **refs = NULL, *out = NULL, *runs;
    Py_buffer b;
    int rc;
    (void)self;
    if (check_nargs("cache_hit_write_runs", nargs, 8) < 0 ||
        hit_args("cache_hit_write_runs", args, &mask, &key, args[7]) < 0) {
        return NULL;
    }
    if (!PySet_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "cache_hit_write_runs: dirty must be a set");
        return NULL;
    }
    runs = args[5];
    if (!PyList_CheckExact(runs)) {
        PyErr_SetString(PyExc_TypeError, "cache_hit_write_runs: runs must be a list");
        return NULL;
    }
    base = PyLong_AsSsize_t(args[4]);
    if (base == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (base < 0) {
        PyErr_SetString(PyExc_ValueError, "cache_hit_write_runs: base must not be negative");
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    nruns = PyList_GET_SIZE(runs);
    if ((spans = new_spans(nruns)) == NULL) {
        goto done;
    }
    for (r = 0; r < nruns; r++) {
        if (pair_of(PyList_GET_ITEM(runs, r), "cache_hit_write_runs", &lo, &hi) < 0) {
            goto done;
        }
        if (lo < 0 || hi <= lo || lo % LINE || hi % LINE || base > b.len || hi > b.len - base) {
            PyErr_Format(PyExc_ValueError, "cache_hit_write_runs: run %zd..%zd (base %zd) is not of whole lines "
                         "inside the %zd-byte buffer", lo, hi, base, b.len);
            goto done;
        }
        spans[2 * r] = lo;
        spans[2 * r + 1] = (hi - lo) / LINE;
        total += (hi - lo) / LINE;
    }
    if (total == 0) {
        out = Py_NewRef(Py_True);
        goto done;
    }
    if ((refs = hit_runs(args[0], mask, key, nruns, spans, total, &rc)) == NULL) {
        out = rc < 0 ? NULL : Py_NewRef(Py_False);
        goto done;
    }
    for (r = 0; r < nruns; r++) { /* the bytes, run after run; then the lines made the most recent */
        for (i = 0; i < spans[2 * r + 1]; i++, got++) {
            memcpy(PyByteArray_AS_STRING(refs[total + got]), (const char *)b.buf + base + spans[2 * r] + i * LINE,
                   LINE);
        }
    }
    if (touch_runs(args[0], mask, key, nruns, spans, total, refs, args[6]) == 0 &&
        bump_by(args[7], s_hits, total) == 0) {
        out = Py_NewRef(Py_True);
    }
done:
    PyMem_Free(refs);
    PyMem_Free(spans);
    PyBuffer_Release(&b);
    return out;
}

/* ---- the page pool's write-back compare and write-update ------------------------------------- */

PyDoc_STRVAR(slot_sync_doc,
             "slot_sync(buf, off, snap, /)\n--\n\n"
             "The runs of 64-byte lines in which buf[off:off + len(snap)] and the bytearray `snap` (a\n"
             "multiple of 64 bytes) differ, as line_runs gives them, after copying those lines into\n"
             "snap: [(lo, hi), ...] byte offsets; [] when equal.");

/* The arguments (buffer, offset, buffer) of slot_sync and copy_changed: both buffers (the one
 * `writable` names, 0 or 2, held writable) and the offset; 0, or -1 with an error and nothing held. */
static int buffers_at(const char *name, PyObject *const *args, Py_ssize_t nargs, int writable, Py_buffer *x,
                      Py_ssize_t *off, Py_buffer *y)
{
    if (check_nargs(name, nargs, 3) < 0) {
        return -1;
    }
    *off = PyLong_AsSsize_t(args[1]);
    if (*off == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (PyObject_GetBuffer(args[0], x, writable == 0 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(args[2], y, writable == 2 ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(x);
        return -1;
    }
    return 0;
}

static PyObject *slot_sync(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer a, b;
    Py_ssize_t off, n, o, start = -1;
    PyObject *out = NULL;
    const char *pa;
    char *pb;
    (void)self;
    if (buffers_at("slot_sync", args, nargs, 2, &a, &off, &b) < 0) {
        return NULL;
    }
    n = b.len;
    if (n % LINE || off < 0 || off > a.len || n > a.len - off) {
        PyErr_Format(PyExc_ValueError, "slot_sync: %zd bytes at offset %zd of a %zd-byte buffer (whole lines)", n, off,
                     a.len);
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL) {
        goto done;
    }
    pa = (const char *)a.buf + off;
    pb = (char *)b.buf;
    if (memcmp(pa, pb, (size_t)n) == 0) { /* (the usual slot at an exit: unchanged) */
        goto done;
    }
    for (o = 0; o <= n; o += LINE) {
        int same_block = block_same(pa, pb, o, n);
        int differs = !same_block && o < n && line_differs(pa + o, pb + o);
        if (differs) {
            memcpy(pb + o, pa + o, LINE);
            if (start < 0) {
                start = o;
            }
        } else if (start >= 0) {
            if (append_run(out, start, o) < 0) {
                Py_CLEAR(out);
                goto done;
            }
            start = -1;
        }
        if (same_block) {
            o += SAME_BLOCK - LINE; /* (its other lines: equal too, and no run is open) */
        }
    }
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(copy_changed_doc,
             "copy_changed(dst, off, src, /)\n--\n\n"
             "dst[off:off + len(src)] = src (dst a writable buffer) unless those bytes are equal to\n"
             "src already; True when they changed.");

static PyObject *copy_changed(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer d, s;
    Py_ssize_t off;
    PyObject *out = NULL;
    (void)self;
    if (buffers_at("copy_changed", args, nargs, 0, &d, &off, &s) < 0) {
        return NULL;
    }
    if (off < 0 || off > d.len || s.len > d.len - off) {
        PyErr_Format(PyExc_ValueError, "copy_changed: %zd bytes at offset %zd of a %zd-byte buffer", s.len, off, d.len);
    } else if (memcmp((char *)d.buf + off, s.buf, (size_t)s.len) != 0) {
        memcpy((char *)d.buf + off, s.buf, (size_t)s.len);
        out = Py_NewRef(Py_True);
    } else {
        out = Py_NewRef(Py_False);
    }
    PyBuffer_Release(&d);
    PyBuffer_Release(&s);
    return out;
}

/* ---- the guest's memory port: one load or store through the TLB and the cache --------------- */

/* Port(view, tlb, sets, mask, counters, dirty, readers, ways, coherent, fill, write_line): the hot path of GuestCpu.load/store (src/sevemu/hw/cpu.py) and of Cache.line/fill
 * (src/sevemu/hw/cache.py), for one guest view of a core.  A hit, and a miss of a non-coherent cache
 * whose domain has a reader, run here; everything else -- an access crossing a line, a size other
 * than 1..8, a set that is not exactly a dict, a coherent cache, a domain without a key -- is handed
 * to the Python path (the view's _load / _store, Cache.fill) before anything changed, so the bytes, counters and LRU order are those
 * of the Python path.  The decryption of a fill and the encryption of a write-back stay in the
 * memory controller's callables (readers[key >> 52], write_line). */

/* The object references of the two types below, in one array each: traversed and cleared alike. */
static int refs_traverse(PyObject **refs, int n, visitproc visit, void *arg)
{
    int i;
    for (i = 0; i < n; i++) {
        Py_VISIT(refs[i]);
    }
    return 0;
}

static void refs_clear(PyObject **refs, int n)
{
    int i;
    for (i = 0; i < n; i++) {
        Py_CLEAR(refs[i]);
    }
}

enum {
    P_TLB,        /* dict vpn -> (data key, flags, fetch key) */
    P_SETS,       /* list of dicts key -> bytearray(64), LRU order */
    P_COUNTERS,   /* the cache's instance dict: hits, misses, writebacks */
    P_DIRTY,      /* set of dirty keys */
    P_READERS,    /* dict (key >> 52) -> fill function */
    P_VIEW,       /* a weak reference to the guest view: its _walk, _load, _store */
    P_FILL,       /* Cache.fill(key, set) -> line */
    P_WRITE_LINE, /* MemoryController.write_line(spa, asid, c, line) */
    P_REFS
};

typedef struct {
    PyObject_HEAD
    PyObject *ref[P_REFS];
    uint64_t mask;
    Py_ssize_t ways;
    int coherent;
} PortObject;

static PyObject *s_misses, *s_writebacks, *s_walk, *s_load, *s_store;

#define C_SHIFT 52
#define ASID_SHIFT 53
#define SPA_MASK ((UINT64_C(1) << C_SHIFT) - 1)
#define W_OK_FLAG 1

static int port_traverse(PortObject *p, visitproc visit, void *arg)
{
    return refs_traverse(p->ref, P_REFS, visit, arg);
}

static int port_clear(PortObject *p)
{
    refs_clear(p->ref, P_REFS);
    return 0;
}

static void port_dealloc(PortObject *p)
{
    PyObject_GC_UnTrack(p);
    port_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *port_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *view, *tlb, *sets, *mask, *counters, *dirty, *readers, *ways, *coherent, *fill, *write_line;
    PortObject *p;
    uint64_t m, w;
    int coh;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Port() takes positional arguments only");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Port", 11, 11, &view, &tlb, &sets, &mask, &counters, &dirty, &readers, &ways,
                           &coherent, &fill, &write_line)) {
        return NULL;
    }
    if (!PyDict_CheckExact(tlb) || !PyList_CheckExact(sets) || !PyDict_CheckExact(counters) ||
        !PySet_Check(dirty) || !PyDict_CheckExact(readers)) {
        PyErr_SetString(PyExc_TypeError, "Port: tlb, counters and readers must be dicts, sets a list, dirty a set");
        return NULL;
    }
    if (get_u64(mask, "mask", &m) < 0 || get_u64(ways, "ways", &w) < 0) {
        return NULL;
    }
    if ((uint64_t)PyList_GET_SIZE(sets) != m + 1 || (m & (m + 1)) || w < 1 || w > PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "Port: sets must have mask + 1 entries (a power of two), ways >= 1");
        return NULL;
    }
    coh = PyObject_IsTrue(coherent);
    if (coh < 0) {
        return NULL;
    }
    if (!PyWeakref_CheckRef(view) || !PyCallable_Check(fill) || !PyCallable_Check(write_line)) {
        PyErr_SetString(PyExc_TypeError, "Port: view must be a weak reference, fill and write_line callable");
        return NULL;
    }
    p = (PortObject *)type->tp_alloc(type, 0);
    if (p == NULL) {
        return NULL;
    }
    p->ref[P_TLB] = Py_NewRef(tlb);
    p->ref[P_SETS] = Py_NewRef(sets);
    p->ref[P_COUNTERS] = Py_NewRef(counters);
    p->ref[P_DIRTY] = Py_NewRef(dirty);
    p->ref[P_READERS] = Py_NewRef(readers);
    p->ref[P_VIEW] = Py_NewRef(view);
    p->ref[P_FILL] = Py_NewRef(fill);
    p->ref[P_WRITE_LINE] = Py_NewRef(write_line);
    p->mask = m;
    p->ways = (Py_ssize_t)w;
    p->coherent = coh;
    return (PyObject *)p;
}

/* view.<name>(*args) (the guest view's Python methods; ReferenceError once the view is gone) */
static PyObject *view_call(PortObject *p, PyObject *name, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *stack[4];
    PyObject *v = PyWeakref_GetObject(p->ref[P_VIEW]); /* borrowed */
    Py_ssize_t i;
    if (v == NULL) {
        return NULL;
    }
    if (v == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "the guest view of this memory port is gone");
        return NULL;
    }
    stack[0] = v;
    for (i = 0; i < nargs && i < 3; i++) {
        stack[i + 1] = args[i];
    }
    Py_INCREF(v);
    {
        PyObject *r = PyObject_VectorcallMethod(name, stack, (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(v);
        return r;
    }
}

/* counters[name] += 1 (the cache's hits / misses / writebacks, plain int attributes) */
static int bump(PyObject *counters, PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(counters, name), *nv;
    int rc;
    if (v == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetObject(PyExc_AttributeError, name);
        }
        return -1;
    }
    if (PyLong_CheckExact(v)) {
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) {
            return -1;
        }
        nv = x < LLONG_MAX ? PyLong_FromLongLong(x + 1) : NULL;
        if (nv == NULL && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_OverflowError, "counter overflow");
        }
    } else {
        PyObject *one = PyLong_FromLong(1);
        nv = one == NULL ? NULL : PyNumber_Add(v, one);
        Py_XDECREF(one);
    }
    if (nv == NULL) {
        return -1;
    }
    rc = PyDict_SetItem(counters, name, nv);
    Py_DECREF(nv);
    return rc;
}

/* The TLB entry of gva (a new reference): the TLB's, or the walk's when absent or (for a write)
 * without W_OK. */
static PyObject *port_entry(PortObject *p, uint64_t gva, PyObject *gva_obj, int write)
{
    PyObject *vpn = PyLong_FromUnsignedLongLong(gva >> 12), *e;
    if (vpn == NULL) {
        return NULL;
    }
    e = PyDict_GetItemWithError(p->ref[P_TLB], vpn);
    Py_DECREF(vpn);
    if (e == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (e != NULL && write) {
        PyObject *flags;
        long f;
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) < 2) {
            PyErr_SetString(PyExc_TypeError, "a TLB entry must be a tuple (key, flags, fetch key)");
            return NULL;
        }
        flags = PyTuple_GET_ITEM(e, 1);
        f = PyLong_AsLong(flags);
        if (f == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (!(f & W_OK_FLAG)) {
            e = NULL;
        }
    }
    if (e != NULL) {
        return Py_NewRef(e);
    }
    {
        PyObject *wargs[3] = {gva_obj, write ? Py_True : Py_False, Py_False};
        return view_call(p, s_walk, wargs, 3);
    }
}

/* The line of `key` in set `s` (a borrowed reference, owned by the set), filled on a miss. */
static PyObject *port_line(PortObject *p, PyObject *s, uint64_t key)
{
    PyObject *k = PyLong_FromUnsignedLongLong(key), *line, *reader, *rk, *got;
    if (k == NULL) {
        return NULL;
    }
    line = PyDict_GetItemWithError(s, k);
    if (line != NULL) { /* a hit: most recently used, back to the end of the set's order */
        Py_INCREF(line);
        if (PyDict_DelItem(s, k) < 0 || PyDict_SetItem(s, k, line) < 0) {
            goto fail_line;
        }
        Py_DECREF(line); /* the set holds it */
        Py_DECREF(k);
        return bump(p->ref[P_COUNTERS], s_hits) < 0 ? NULL : line;
    }
    if (PyErr_Occurred()) {
        goto fail;
    }
    /* a miss */
    rk = PyLong_FromUnsignedLongLong(key >> C_SHIFT);
    if (rk == NULL) {
        goto fail;
    }
    reader = PyDict_GetItemWithError(p->ref[P_READERS], rk);
    Py_DECREF(rk);
    if (reader == NULL && PyErr_Occurred()) {
        goto fail;
    }
    if (reader == NULL || p->coherent) { /* Cache.fill: the coherent path, or its KeySlotError */
        got = PyObject_CallFunctionObjArgs(p->ref[P_FILL], k, s, NULL);
        Py_DECREF(k);
        if (got == NULL) {
            return NULL;
        }
        Py_DECREF(got); /* the set holds it */
        return got;
    }
    Py_INCREF(reader);
    if (bump(p->ref[P_COUNTERS], s_misses) < 0) {
        goto fail_reader;
    }
    if (PyDict_GET_SIZE(s) >= p->ways) { /* the least recently used line goes, written back if dirty */
        PyObject *vk, *vl;
        Py_ssize_t pos = 0;
        int was;
        if (!PyDict_Next(s, &pos, &vk, &vl)) {
            PyErr_SetString(PyExc_RuntimeError, "cache set changed during a fill");
            goto fail_reader;
        }
        Py_INCREF(vk);
        Py_INCREF(vl);
        if (PyDict_DelItem(s, vk) < 0) {
            Py_DECREF(vk);
            Py_DECREF(vl);
            goto fail_reader;
        }
        was = PySet_Discard(p->ref[P_DIRTY], vk);
        if (was > 0) {
            uint64_t victim = (uint64_t)as_u64(vk);
            PyObject *res = NULL;
            if (!(victim == (uint64_t)-1 && PyErr_Occurred()) && bump(p->ref[P_COUNTERS], s_writebacks) == 0) {
                PyObject *spa = PyLong_FromUnsignedLongLong(victim & SPA_MASK);
                PyObject *asid = PyLong_FromUnsignedLongLong(victim >> ASID_SHIFT);
                if (spa != NULL && asid != NULL) {
                    res = PyObject_CallFunctionObjArgs(p->ref[P_WRITE_LINE], spa, asid,
                                                       (victim >> C_SHIFT) & 1 ? Py_True : Py_False, vl, NULL);
                }
                Py_XDECREF(spa);
                Py_XDECREF(asid);
            }
            if (res == NULL) {
                was = -1;
            }
            Py_XDECREF(res);
        }
        Py_DECREF(vk);
        Py_DECREF(vl);
        if (was < 0) {
            goto fail_reader;
        }
    }
    {
        PyObject *spa = PyLong_FromUnsignedLongLong(key & SPA_MASK);
        if (spa == NULL) {
            goto fail_reader;
        }
        line = PyObject_CallOneArg(reader, spa);
        Py_DECREF(spa);
    }
    Py_DECREF(reader);
    if (line == NULL) {
        goto fail;
    }
    if (PyDict_SetItem(s, k, line) < 0) {
        goto fail_line;
    }
    Py_DECREF(line);
    Py_DECREF(k);
    return line;
fail_reader:
    Py_DECREF(reader);
    goto fail;
fail_line:
    Py_DECREF(line);
fail:
    Py_DECREF(k);
    return NULL;
}

/* The set of `key` when this port may serve it (a borrowed reference), NULL (no error) when the
 * Python path must. */
static PyObject *port_set(PortObject *p, uint64_t key)
{
    PyObject *s;
    if ((uint64_t)PyList_GET_SIZE(p->ref[P_SETS]) != p->mask + 1) {
        return NULL;
    }
    s = PyList_GET_ITEM(p->ref[P_SETS], (Py_ssize_t)((key >> 6) & p->mask));
    return PyDict_CheckExact(s) ? s : NULL;
}

/* gva as uint64 when it is an int in range; 0 (no error) otherwise: the Python path decides. */
static int port_gva(PyObject *obj, uint64_t *gva)
{
    unsigned long long v;
    if (!PyLong_CheckExact(obj)) {
        return 0;
    }
    v = as_u64(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *gva = (uint64_t)v;
    return 1;
}

static int entry_key(PyObject *e, int index, uint64_t *out)
{
    PyObject *k;
    unsigned long long v;
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) <= index || !PyLong_CheckExact(k = PyTuple_GET_ITEM(e, index))) {
        PyErr_SetString(PyExc_TypeError, "a TLB entry must be a tuple of ints (key, flags, fetch key)");
        return -1;
    }
    v = as_u64(k);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* The line of the access (gva = args[0], size = args[1]) of a load or (write) a store, a borrowed
 * reference, with its gva, size and key; NULL with *python set when the Python path must serve it
 * (nothing changed), NULL with an error set on failure. */
static PyObject *port_access(PortObject *p, PyObject *const *args, int write, int *python, uint64_t *gva,
                             long *size, uint64_t *key)
{
    uint64_t base;
    PyObject *e, *s, *line;
    *python = 0;
    *size = PyLong_CheckExact(args[1]) ? PyLong_AsLong(args[1]) : 0;
    if (*size == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        *size = 0;
    }
    if (!port_gva(args[0], gva) || *size < 1 || *size > 8 || (*gva & 63) + (uint64_t)*size > 64) {
        *python = 1;
        return NULL;
    }
    e = port_entry(p, *gva, args[0], write);
    if (e == NULL) {
        return NULL;
    }
    if (entry_key(e, 0, &base) < 0) {
        Py_DECREF(e);
        return NULL;
    }
    Py_DECREF(e);
    *key = base | (*gva & 0xFC0);
    s = port_set(p, *key);
    if (s == NULL) {
        *python = 1;
        return NULL;
    }
    line = port_line(p, s, *key);
    if (line != NULL && (!PyByteArray_CheckExact(line) || PyByteArray_GET_SIZE(line) != LINE)) {
        PyErr_SetString(PyExc_TypeError, "a cache line must be a bytearray of 64 bytes");
        return NULL;
    }
    return line;
}

PyDoc_STRVAR(port_load_doc, "load(gva, size, /)\n--\n\nGuestCpu.load: a little-endian int of size bytes at gva.");

static PyObject *port_load(PortObject *p, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t gva, key, v = 0;
    long size, i;
    int python;
    PyObject *line;
    const unsigned char *b;
    if (check_nargs("load", nargs, 2) < 0) {
        return NULL;
    }
    line = port_access(p, args, 0, &python, &gva, &size, &key);
    if (line == NULL) {
        return python ? view_call(p, s_load, args, 2) : NULL;
    }
    b = (const unsigned char *)PyByteArray_AS_STRING(line) + (gva & 63);
    for (i = size - 1; i >= 0; i--) {
        v = (v << 8) | b[i];
    }
    return PyLong_FromUnsignedLongLong(v);
}

PyDoc_STRVAR(port_store_doc,
             "store(gva, size, value, /)\n--\n\nGuestCpu.store: the low size bytes of value at gva, little-endian.");

static PyObject *port_store(PortObject *p, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t gva, key, v;
    long size, i;
    int python, rc;
    PyObject *line, *k;
    unsigned char *b;
    if (check_nargs("store", nargs, 3) < 0) {
        return NULL;
    }
    if (!PyLong_CheckExact(args[2])) {
        return view_call(p, s_store, args, 3);
    }
    v = (uint64_t)PyLong_AsUnsignedLongLongMask(args[2]); /* value mod 2^64: its low bytes */
    if (v == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    line = port_access(p, args, 1, &python, &gva, &size, &key);
    if (line == NULL) {
        return python ? view_call(p, s_store, args, 3) : NULL;
    }
    b = (unsigned char *)PyByteArray_AS_STRING(line) + (gva & 63);
    for (i = 0; i < size; i++) {
        b[i] = (unsigned char)(v >> (8 * i));
    }
    k = PyLong_FromUnsignedLongLong(key);
    if (k == NULL) {
        return NULL;
    }
    rc = PySet_Add(p->ref[P_DIRTY], k);
    Py_DECREF(k);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef port_methods[] = {
    {"load", (PyCFunction)(void (*)(void))port_load, METH_FASTCALL, port_load_doc},
    {"store", (PyCFunction)(void (*)(void))port_store, METH_FASTCALL, port_store_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(port_doc,
             "Port(view, tlb, sets, mask, counters, dirty, readers, ways, coherent, fill, write_line)\n"
             "--\n\n"
             "A guest view of a core's memory port (GuestCpu.load / GuestCpu.store) over the TLB dict\n"
             "`tlb` and the cache's `sets`; `view` is a weak reference to the GuestCpu, whose _walk, _load\n"
             "and _store it calls for what it does not serve itself (no reference cycle: the view holds\n"
             "the port); see src/sevemu/hw/cache.py (Cache.port).");

static PyTypeObject PortType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw._mem_accel.Port",
    .tp_basicsize = sizeof(PortObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = port_doc,
    .tp_new = port_new,
    .tp_dealloc = (destructor)port_dealloc,
    .tp_traverse = (traverseproc)port_traverse,
    .tp_clear = (inquiry)port_clear,
    .tp_methods = port_methods,
};

/* ---- the memory controller's line cipher: one 64-byte line, AES through OpenSSL -------------- */

/* LineCipher(code, key, pages, memo, fallback, lines): the memory controller's single-line path for
 * one key slot, in C (src/sevemu/hw/memctl.py, _install; the bytes of MemoryCipher.line_functions and
 * line_reader in src/sevemu/crypto/memenc.py).  The line's 64-byte tweak T comes from the cipher's
 * own memo (memo[spa >> 12] for XE/XEX, memo[spa >> 6] for XTS), or fallback(spa) when absent (which
 * memoises it); XE/XEX add the in-page tweak lines[(spa >> 6) & 63].  Then, with AES-ECB under the
 * data key (AES-128 for XE/XEX, AES-256 = K1 for XTS):
 *     XE:       enc = E(d ^ T)        dec = D(d) ^ T
 *     XEX, XTS: enc = E(d ^ T) ^ T    dec = D(d ^ T) ^ T
 * read(spa) decrypts the line of the page store `pages` (an absent page reads as zeros) into a new
 * bytearray: the cache's fill. */

enum { CODE_XE = 0, CODE_XEX = 1, CODE_XTS = 2 };
enum {
    L_PAGES,    /* DRAM's page store */
    L_MEMO,     /* the cipher's memo of line tweaks */
    L_FALLBACK, /* fallback(spa) -> the line's tweak */
    L_LINES,    /* tuple of the 64 in-page tweaks (XE/XEX), or NULL */
    L_REFS
};

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    PyObject *ref[L_REFS];
    int code;
} LineCipherObject;

static int lc_traverse(LineCipherObject *c, visitproc visit, void *arg)
{
    return refs_traverse(c->ref, L_REFS, visit, arg);
}

static int lc_clear(LineCipherObject *c)
{
    refs_clear(c->ref, L_REFS);
    return 0;
}

static void lc_dealloc(LineCipherObject *c)
{
    PyObject_GC_UnTrack(c);
    lc_clear(c);
    EVP_CIPHER_CTX_free(c->enc); /* (frees the key schedule: OPENSSL_cleanse'd by OpenSSL) */
    EVP_CIPHER_CTX_free(c->dec);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *lc_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *code_obj, *key_obj, *pages, *memo, *fallback, *lines, *tuple = NULL;
    LineCipherObject *c;
    Py_buffer key;
    long code;
    const EVP_CIPHER *aes;
    Py_ssize_t i;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "LineCipher() takes positional arguments only");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "LineCipher", 6, 6, &code_obj, &key_obj, &pages, &memo, &fallback, &lines)) {
        return NULL;
    }
    code = PyLong_AsLong(code_obj);
    if (code == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (code < CODE_XE || code > CODE_XTS || !PyDict_CheckExact(pages) || !PyDict_CheckExact(memo) ||
        !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "LineCipher(code 0..2, key, pages: dict, memo: dict, fallback: callable, lines)");
        return NULL;
    }
    if (code != CODE_XTS) {
        if (!PySequence_Check(lines) || (tuple = PySequence_Tuple(lines)) == NULL) {
            return NULL;
        }
        if (PyTuple_GET_SIZE(tuple) != PAGE / LINE) {
            PyErr_SetString(PyExc_ValueError, "LineCipher: lines must hold the 64 in-page tweaks");
            Py_DECREF(tuple);
            return NULL;
        }
        for (i = 0; i < PAGE / LINE; i++) {
            PyObject *t = PyTuple_GET_ITEM(tuple, i);
            if (!PyBytes_CheckExact(t) || PyBytes_GET_SIZE(t) != LINE) {
                PyErr_SetString(PyExc_TypeError, "LineCipher: each in-page tweak must be 64 bytes");
                Py_DECREF(tuple);
                return NULL;
            }
        }
    }
    if (PyObject_GetBuffer(key_obj, &key, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(tuple);
        return NULL;
    }
    aes = key.len == 16 && code != CODE_XTS ? EVP_aes_128_ecb() : key.len == 32 && code == CODE_XTS ? EVP_aes_256_ecb() : NULL;
    if (aes == NULL) {
        PyErr_SetString(PyExc_ValueError, "LineCipher: a 16-byte key for XE/XEX, the 32-byte data key for XTS");
        goto fail_key;
    }
    c = (LineCipherObject *)type->tp_alloc(type, 0);
    if (c == NULL) {
        goto fail_key;
    }
    c->enc = EVP_CIPHER_CTX_new();
    c->dec = EVP_CIPHER_CTX_new();
    if (c->enc == NULL || c->dec == NULL || EVP_EncryptInit_ex(c->enc, aes, NULL, key.buf, NULL) != 1 ||
        EVP_DecryptInit_ex(c->dec, aes, NULL, key.buf, NULL) != 1 || EVP_CIPHER_CTX_set_padding(c->enc, 0) != 1 ||
        EVP_CIPHER_CTX_set_padding(c->dec, 0) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "LineCipher: OpenSSL could not set up AES-ECB");
        PyBuffer_Release(&key);
        Py_XDECREF(tuple);
        Py_DECREF(c);
        return NULL;
    }
    PyBuffer_Release(&key);
    c->code = (int)code;
    c->ref[L_PAGES] = Py_NewRef(pages);
    c->ref[L_MEMO] = Py_NewRef(memo);
    c->ref[L_FALLBACK] = Py_NewRef(fallback);
    c->ref[L_LINES] = tuple;
    return (PyObject *)c;
fail_key:
    PyBuffer_Release(&key);
    Py_XDECREF(tuple);
    return NULL;
}

/* t = the 64-byte tweak of the line at spa. */
static int lc_tweak(LineCipherObject *c, uint64_t spa, unsigned char *t)
{
    PyObject *k = PyLong_FromUnsignedLongLong(c->code == CODE_XTS ? spa >> 6 : spa >> 12), *tw;
    Py_buffer view;
    int i;
    if (k == NULL) {
        return -1;
    }
    tw = PyDict_GetItemWithError(c->ref[L_MEMO], k);
    Py_DECREF(k);
    if (tw != NULL) {
        Py_INCREF(tw);
    } else {
        PyObject *a;
        if (PyErr_Occurred() || (a = PyLong_FromUnsignedLongLong(spa)) == NULL) {
            return -1;
        }
        tw = PyObject_CallOneArg(c->ref[L_FALLBACK], a);
        Py_DECREF(a);
        if (tw == NULL) {
            return -1;
        }
    }
    if (PyBytes_CheckExact(tw) && PyBytes_GET_SIZE(tw) == LINE) {
        memcpy(t, PyBytes_AS_STRING(tw), LINE);
    } else if (PyByteArray_CheckExact(tw) && PyByteArray_GET_SIZE(tw) == LINE) {
        memcpy(t, PyByteArray_AS_STRING(tw), LINE);
    } else {
        if (PyObject_GetBuffer(tw, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(tw);
            return -1;
        }
        if (view.len != LINE) {
            PyBuffer_Release(&view);
            Py_DECREF(tw);
            PyErr_SetString(PyExc_ValueError, "a line tweak must be 64 bytes");
            return -1;
        }
        memcpy(t, view.buf, LINE);
        PyBuffer_Release(&view);
    }
    Py_DECREF(tw);
    if (c->code != CODE_XTS) {
        const unsigned char *l = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(c->ref[L_LINES], (spa >> 6) & 63));
        for (i = 0; i < LINE; i++) {
            t[i] ^= l[i];
        }
    }
    return 0;
}

static void xor64(unsigned char *d, const unsigned char *t)
{
    int i;
    for (i = 0; i < LINE; i++) {
        d[i] ^= t[i];
    }
}

/* out = the line `in` (64 bytes) at spa, encrypted or decrypted. */
static int lc_crypt(LineCipherObject *c, uint64_t spa, const unsigned char *in, unsigned char *out, int encrypt)
{
    unsigned char t[LINE], x[LINE];
    int n = 0;
    if (spa % LINE) {
        PyErr_Format(PyExc_ValueError, "a line address must be 64-byte aligned, got %#llx", (unsigned long long)spa);
        return -1;
    }
    if (lc_tweak(c, spa, t) < 0) {
        return -1;
    }
    memcpy(x, in, LINE);
    if (encrypt || c->code != CODE_XE) {
        xor64(x, t);
    }
    if ((encrypt ? EVP_EncryptUpdate(c->enc, out, &n, x, LINE) : EVP_DecryptUpdate(c->dec, out, &n, x, LINE)) != 1 ||
        n != LINE) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL AES-ECB failed on a line");
        return -1;
    }
    if (!encrypt || c->code != CODE_XE) {
        xor64(out, t);
    }
    return 0;
}

static PyObject *lc_apply(LineCipherObject *c, PyObject *const *args, Py_ssize_t nargs, int encrypt)
{
    uint64_t spa;
    Py_buffer data;
    PyObject *out;
    if (check_nargs(encrypt ? "encrypt" : "decrypt", nargs, 2) < 0 || get_u64(args[0], "spa", &spa) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (data.len != LINE) {
        PyBuffer_Release(&data);
        PyErr_Format(PyExc_ValueError, "a line is 64 bytes, got %zd", data.len);
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, LINE);
    if (out != NULL && lc_crypt(c, spa, (const unsigned char *)data.buf, (unsigned char *)PyBytes_AS_STRING(out), encrypt) < 0) {
        Py_CLEAR(out);
    }
    PyBuffer_Release(&data);
    return out;
}

PyDoc_STRVAR(lc_encrypt_doc, "encrypt(spa, line, /)\n--\n\nThe 64-byte line at spa, encrypted (bytes).");
PyDoc_STRVAR(lc_decrypt_doc, "decrypt(spa, line, /)\n--\n\nThe 64-byte line at spa, decrypted (bytes).");
PyDoc_STRVAR(lc_read_doc,
             "read(spa, /)\n--\n\nThe line at spa of the page store, decrypted, as a new bytearray (a cache fill).");

static PyObject *lc_encrypt(LineCipherObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    return lc_apply(c, args, nargs, 1);
}

static PyObject *lc_decrypt(LineCipherObject *c, PyObject *const *args, Py_ssize_t nargs)
{
    return lc_apply(c, args, nargs, 0);
}

static PyObject *lc_read(LineCipherObject *c, PyObject *arg)
{
    static const unsigned char zero[LINE];
    uint64_t spa;
    PyObject *page, *out;
    const unsigned char *src = zero;
    if (get_u64(arg, "spa", &spa) < 0) {
        return NULL;
    }
    page = page_of(c->ref[L_PAGES], spa >> 12);
    if (page == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (page != NULL) {
        src = (const unsigned char *)PyByteArray_AS_STRING(page) + (spa & (PAGE - 1) & ~(uint64_t)(LINE - 1));
    }
    out = PyByteArray_FromStringAndSize(NULL, LINE);
    if (out != NULL && lc_crypt(c, spa, src, (unsigned char *)PyByteArray_AS_STRING(out), 0) < 0) {
        Py_CLEAR(out);
    }
    return out;
}

static PyMethodDef lc_methods[] = {
    {"encrypt", (PyCFunction)(void (*)(void))lc_encrypt, METH_FASTCALL, lc_encrypt_doc},
    {"decrypt", (PyCFunction)(void (*)(void))lc_decrypt, METH_FASTCALL, lc_decrypt_doc},
    {"read", (PyCFunction)lc_read, METH_O, lc_read_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(lc_doc,
             "LineCipher(code, key, pages, memo, fallback, lines)\n--\n\n"
             "One key slot's single-line path (XE 0, XEX 1, XTS 2) with AES-ECB through OpenSSL; the\n"
             "tweaks come from the MemoryCipher's memo or fallback(spa).  See src/sevemu/hw/memctl.py.");

static PyTypeObject LineCipherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw._mem_accel.LineCipher",
    .tp_basicsize = sizeof(LineCipherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = lc_doc,
    .tp_new = lc_new,
    .tp_dealloc = (destructor)lc_dealloc,
    .tp_traverse = (traverseproc)lc_traverse,
    .tp_clear = (inquiry)lc_clear,
    .tp_methods = lc_methods,
};

/* ---- the page pool's snoop and the host's whole-line accesses, one call each ------------------
 *
 * PoolSnoop(pool, fallback): a callable the page pool (src/sevemu/hw/uc/pool.py) installs as its
 * `snoop`: snoop(lo, hi, invalidate, data=None) does here what PagePool.snoop does in the cases an
 * exit's host accesses make -- a read while the pool is synced (nothing), a range of one page the
 * pool holds no slot of (nothing), the write-update of whole lines of one slot while synced
 * (PagePool._take: the bytes into the slot and its snapshot, the slot noted as updated when it
 * holds code, stats.slot_updates + 1) -- and hands every other call, unchanged, to `fallback`
 * (PagePool.snoop itself).  It reads the pool's attributes at every call (never through its
 * __dict__: an object whose __dict__ was asked for loses CPython's faster attribute access).
 *
 * HostPort(core, cache_dict, dram_size, write, read_runs, write_rest, runs_rest): the host's
 * whole-line accesses of src/sevemu/hw/cpu.py (Core.host_write of whole lines, Core.host_read_runs,
 * C=0) with Cache.write_lines / read_runs behind them, in one call: the same checks (DRAM range; no
 * RMP, no VMCB view in the range -- else `write` / `read_runs`, the Core's methods, do the whole
 * access), the same snoops of the cache's unencrypted agents (their `snoop`, called as the cache
 * calls it), then the resident lines as cache_hit_write / cache_hit_runs -- or, when a line is
 * absent, the cache's Python rest of the access after its snoop (`write_rest(key, view)`,
 * `runs_rest(key, runs)`).  Anything else (C=1, a length that is not whole lines, another type of
 * data, keywords) goes to `write` / `read_runs` before anything happened.
 *
 * HostPort.exchange(spa, runs, expect, writes) -- Core.host_exchange: the read of the runs, and when it
 * gives `expect` the writes -- is one pass when every run and write is whole lines of the page
 * (exchange_fast): the page is checked once (no RMP, no VMCB view in it) for the read and the writes
 * unless Python code ran in between (an agent's snoop in Python, a PoolSnoop's fallback, a cache's
 * Python rest: then each write is host_port_write with its own checks); a PoolSnoop agent is served
 * in C without argument objects (its fallback, and any other agent, called as snoop_plain calls
 * them, with a memoryview of the bytes written); the lines read are compared where they lie (the
 * bytes are built only for another request); the hits are added to the counter once, before any
 * Python code could look.  The same checks, snoops (in the same order), bytes, LRU order, dirty set
 * and counters as the Python sequence (tests/hypervisor/test_hv_es_fastpath.py). */

static PyObject *s_synced, *s_slot_of, *s_mm, *s_snap, *s_code_slots, *s_updated, *s_stats, *s_slot_updates,
    *s_snoop, *s_rmp, *s_check_host_write, *s_vmcbs, *s_lo, *s_hi, *s_plain_agents, *s_sets, *s_set_mask, *s_dirty, *s_one;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *pool;     /* the pool */
    PyObject *fallback; /* PagePool.snoop of the pool */
} PoolSnoopObject;

/* obj.<name> (a new reference); NULL with no error set when absent, NULL with an error on error. */
static PyObject *attr_of(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return v;
}

/* dict[key] for an int key (borrowed); NULL with no error when absent, NULL with an error on error. */
static PyObject *dict_at(PyObject *dict, uint64_t key)
{
    PyObject *k = u64_obj(key), *v;
    if (k == NULL) {
        return NULL;
    }
    v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    return v;
}

/* An exact int in 0..2**64-1 into *out: 1; 0 (no error) when it is something else (port_gva's test). */
static int exact_u64_of(PyObject *o, uint64_t *out)
{
    return port_gva(o, out);
}

/* stats.<name> += 1 */
static int bump_attr(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name), *nv;
    int rc;
    if (v == NULL) {
        return -1;
    }
    nv = PyNumber_Add(v, s_one);
    Py_DECREF(v);
    if (nv == NULL) {
        return -1;
    }
    rc = PyObject_SetAttr(obj, name, nv);
    Py_DECREF(nv);
    return rc;
}

/* PagePool._take of slot `slot` (the page at `page`), bytes [o1, o2) of it from `data`: 1 done,
 * 0 when something is not what this path takes (nothing changed), -1 on error. */
static int pool_take(PyObject *pool, PyObject *slot_obj, uint64_t o1, uint64_t o2, PyObject *data)
{
    PyObject *a[5] = {NULL, NULL, NULL, NULL, NULL}, *names[5] = {s_mm, s_snap, s_code_slots, s_updated, s_stats};
    PyObject *mm, *snaps, *snap, *code, *updated, *stats;
    Py_buffer mb, db;
    Py_ssize_t slot;
    int changed, rc = 0, i;
    if (!PyLong_CheckExact(slot_obj) || (slot = PyLong_AsSsize_t(slot_obj)) < 0) {
        PyErr_Clear();
        return 0;
    }
    for (i = 0; i < 5; i++) {
        if ((a[i] = attr_of(pool, names[i])) == NULL) {
            rc = PyErr_Occurred() ? -1 : 0;
            goto out;
        }
    }
    mm = a[0];
    snaps = a[1];
    code = a[2];
    updated = a[3];
    stats = a[4];
    if (!PyDict_CheckExact(snaps) || !PyList_CheckExact(updated) || (code != Py_None && !PyAnySet_CheckExact(code))) {
        goto out;
    }
    if ((snap = PyDict_GetItemWithError(snaps, slot_obj)) == NULL) {
        rc = PyErr_Occurred() ? -1 : 0;
        goto out;
    }
    if ((!PyByteArray_CheckExact(snap) && !PyBytes_CheckExact(snap)) || Py_SIZE(snap) != PAGE) {
        goto out;
    }
    if (PyObject_GetBuffer(mm, &mb, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        goto out;
    }
    if (PyObject_GetBuffer(data, &db, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&mb);
        goto out;
    }
    if ((uint64_t)db.len != o2 - o1 || slot > (mb.len - PAGE) / PAGE || mb.len < PAGE) {
        goto done;
    }
    char *dst = (char *)mb.buf + slot * PAGE + o1;
    changed = memcmp(dst, db.buf, (size_t)db.len) != 0;
    if (changed) {
        memcpy(dst, db.buf, (size_t)db.len);
        int code_slot = code == Py_None ? 1 : PySet_Contains(code, slot_obj);
        if (code_slot < 0 || (code_slot && PyList_Append(updated, slot_obj) < 0)) {
            rc = -1;
            goto done;
        }
    }
    if (!PyByteArray_CheckExact(snap)) { /* (updated in place from now on, as PagePool._take does) */
        PyObject *copy = PyByteArray_FromObject(snap);
        if (copy == NULL || PyDict_SetItem(snaps, slot_obj, copy) < 0) {
            Py_XDECREF(copy);
            rc = -1;
            goto done;
        }
        snap = copy;
        Py_DECREF(copy); /* (the dict holds it) */
    }
    memcpy(PyByteArray_AS_STRING(snap) + o1, db.buf, (size_t)db.len);
    rc = bump_attr(stats, s_slot_updates) < 0 ? -1 : 1;
done:
    PyBuffer_Release(&db);
    PyBuffer_Release(&mb);
out:
    for (i = 0; i < 5; i++) {
        Py_XDECREF(a[i]);
    }
    return rc;
}

/* PoolSnoop's work for snoop(lo, hi, invalidate, data) (data NULL for None): 1 done, 0 when the call
 * must go to the fallback (nothing changed), -1 on error.  Runs no Python code. */
static int pool_snoop_do(PoolSnoopObject *p, uint64_t lo, uint64_t hi, int invalidate, PyObject *data)
{
    PyObject *pool = p->pool, *synced_o, *slot_of, *slot;
    uint64_t page;
    int synced, rc;
    if ((synced_o = attr_of(pool, s_synced)) == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    synced = synced_o == Py_True ? 1 : synced_o == Py_False ? 0 : -2;
    Py_DECREF(synced_o);
    if (synced < 0) {
        return 0; /* (not a bool: PagePool.snoop decides) */
    }
    if (synced && !invalidate) {
        return 1; /* a read of what the cache holds already */
    }
    if ((slot_of = attr_of(pool, s_slot_of)) == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    rc = 0; /* 0: to the fallback, 1: done, -1: error */
    page = lo & ~(uint64_t)(PAGE - 1);
    if (!PyDict_CheckExact(slot_of) || (PyDict_GET_SIZE(slot_of) != 0 && (hi <= lo || hi - page > PAGE))) {
        rc = 0;
    } else if (PyDict_GET_SIZE(slot_of) == 0) {
        rc = 1;
    } else if ((slot = dict_at(slot_of, page)) == NULL) {
        rc = PyErr_Occurred() ? -1 : 1; /* no slot of the page */
    } else if (synced && invalidate && data != NULL) {
        Py_INCREF(slot);
        rc = pool_take(pool, slot, lo - page, hi - page, data);
        Py_DECREF(slot);
    }
    Py_DECREF(slot_of);
    return rc;
}

static PyObject *pool_snoop_call(PoolSnoopObject *p, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *data = NULL;
    uint64_t lo, hi;
    int invalidate, rc;
    if (kwnames != NULL || nargs < 3 || nargs > 4 || !exact_u64_of(args[0], &lo) || !exact_u64_of(args[1], &hi)) {
        goto fallback;
    }
    if ((invalidate = PyObject_IsTrue(args[2])) < 0) {
        return NULL;
    }
    if (nargs == 4 && args[3] != Py_None) {
        data = args[3];
    }
    if ((rc = pool_snoop_do(p, lo, hi, invalidate, data)) < 0) {
        return NULL;
    }
    if (rc > 0) {
        Py_RETURN_NONE;
    }
fallback:
    return PyObject_Vectorcall(p->fallback, args, nargsf, kwnames);
}

static int pool_snoop_traverse(PoolSnoopObject *p, visitproc visit, void *arg)
{
    Py_VISIT(p->pool);
    Py_VISIT(p->fallback);
    return 0;
}

static int pool_snoop_clear(PoolSnoopObject *p)
{
    Py_CLEAR(p->pool);
    Py_CLEAR(p->fallback);
    return 0;
}

static void pool_snoop_dealloc(PoolSnoopObject *p)
{
    PyObject_GC_UnTrack(p);
    pool_snoop_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pool_snoop_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *pool, *fallback;
    PoolSnoopObject *p;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "PoolSnoop() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO:PoolSnoop", &pool, &fallback)) {
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "PoolSnoop(): the fallback must be callable");
        return NULL;
    }
    p = (PoolSnoopObject *)type->tp_alloc(type, 0);
    if (p == NULL) {
        return NULL;
    }
    p->vectorcall = (vectorcallfunc)pool_snoop_call;
    p->pool = Py_NewRef(pool);
    p->fallback = Py_NewRef(fallback);
    return (PyObject *)p;
}

PyDoc_STRVAR(pool_snoop_doc, "PoolSnoop(pool, fallback): PagePool.snoop's usual cases in one call "
                             "(csrc/mem_accel.c); every other call goes to fallback.");

static PyTypeObject PoolSnoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw._mem_accel.PoolSnoop",
    .tp_basicsize = sizeof(PoolSnoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(PoolSnoopObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_doc = pool_snoop_doc,
    .tp_new = pool_snoop_new,
    .tp_dealloc = (destructor)pool_snoop_dealloc,
    .tp_traverse = (traverseproc)pool_snoop_traverse,
    .tp_clear = (inquiry)pool_snoop_clear,
};

typedef struct {
    PyObject_HEAD
    PyObject *core;       /* the Core (its attributes read at each call; its __dict__ is left alone) */
    PyObject *cache;      /* its Cache's __dict__ */
    uint64_t dram_size;
    PyObject *write;      /* Core.host_write */
    PyObject *read_runs;  /* Core.host_read_runs */
    PyObject *write_rest; /* Cache._write_lines_rest */
    PyObject *runs_rest;  /* Cache._read_runs_rest */
} HostPortObject;

/* 1 when the host's access [spa, spa + n) may go on here: inside DRAM, no VMCB view overlapping it, and
 * no RMP -- or, for a write (`spa_obj`: the caller's spa argument), the RMP's check of a host write
 * passed (Rmp.check_host_write, called here after the other checks, so that nothing sends the access
 * on to the Core's Python method, which would check it again); 0 when the Core's Python method must
 * do it; -1 on error (the RMP's fault: the exception Core.host_write raises, nothing written). */
static int host_plain(HostPortObject *h, uint64_t spa, uint64_t n, PyObject *spa_obj)
{
    PyObject *rmp, *vmcbs, *lo_o, *hi_o;
    uint64_t lo = UINT64_MAX, hi = 0;
    int ok;
    if (n == 0 || spa > h->dram_size || n > h->dram_size - spa) {
        return 0;
    }
    if ((rmp = PyObject_GetAttr(h->core, s_rmp)) == NULL) {
        return -1;
    }
    if (rmp != Py_None && spa_obj == NULL) {
        Py_DECREF(rmp);
        return 0;
    }
    if ((vmcbs = PyObject_GetAttr(h->core, s_vmcbs)) == NULL) {
        Py_DECREF(rmp);
        return -1;
    }
    lo_o = PyObject_GetAttr(vmcbs, s_lo);
    hi_o = lo_o == NULL ? NULL : PyObject_GetAttr(vmcbs, s_hi);
    Py_DECREF(vmcbs);
    if (hi_o == NULL) {
        Py_XDECREF(lo_o);
        Py_DECREF(rmp);
        return -1;
    }
    ok = exact_u64_of(hi_o, &hi);
    if (ok && !exact_u64_of(lo_o, &lo)) { /* (no view held: lo is 2**64) */
        ok = PyLong_CheckExact(lo_o) && _PyLong_Sign(lo_o) > 0;
        lo = UINT64_MAX;
    }
    Py_DECREF(lo_o);
    Py_DECREF(hi_o);
    ok = ok && !(spa < hi && spa + n > lo);
    if (ok && rmp != Py_None) { /* SNP: #PF(RMP) unless Hypervisor-owned (raised as Core.host_write does) */
        PyObject *length = PyLong_FromUnsignedLongLong(n), *r;
        r = length == NULL ? NULL : PyObject_CallMethodObjArgs(rmp, s_check_host_write, spa_obj, length, NULL);
        Py_XDECREF(length);
        if (r == NULL) {
            Py_DECREF(rmp);
            return -1;
        }
        Py_DECREF(r);
    }
    Py_DECREF(rmp);
    return ok;
}

/* agent.snoop(lo, hi, invalidate, data) for every unencrypted agent of the cache (Cache._snoop's
 * loop, no origin): 0, or -1 on error. */
static int snoop_plain(HostPortObject *h, uint64_t lo, uint64_t hi, int invalidate, PyObject *data)
{
    PyObject *agents = PyDict_GetItemWithError(h->cache, s_plain_agents), *a[5];
    Py_ssize_t i;
    if (agents == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_AttributeError, "the cache has no plain_agents");
        }
        return -1;
    }
    if (!PyTuple_CheckExact(agents)) {
        PyErr_SetString(PyExc_TypeError, "cache.plain_agents must be a tuple");
        return -1;
    }
    if (PyTuple_GET_SIZE(agents) == 0) {
        return 0;
    }
    if ((a[1] = PyLong_FromUnsignedLongLong(lo)) == NULL) {
        return -1;
    }
    if ((a[2] = PyLong_FromUnsignedLongLong(hi)) == NULL) {
        Py_DECREF(a[1]);
        return -1;
    }
    a[3] = invalidate ? Py_True : Py_False;
    a[4] = data;
    for (i = 0; i < PyTuple_GET_SIZE(agents); i++) {
        PyObject *agent = PyTuple_GET_ITEM(agents, i), *r;
        a[0] = agent;
        Py_INCREF(agent); /* (a snoop may detach it) */
        r = PyObject_VectorcallMethod(s_snoop, a, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(agent);
        if (r == NULL) {
            Py_DECREF(a[1]);
            Py_DECREF(a[2]);
            return -1;
        }
        Py_DECREF(r);
    }
    Py_DECREF(a[1]);
    Py_DECREF(a[2]);
    return 0;
}

/* The sets, set mask and dirty set of the cache whose __dict__ is `cd` (borrowed); -1 on error. */
static int cache_parts_of(PyObject *cd, PyObject **sets, uint64_t *mask, PyObject **dirty)
{
    PyObject *m;
    if ((*sets = PyDict_GetItemWithError(cd, s_sets)) == NULL || (m = PyDict_GetItemWithError(cd, s_set_mask)) == NULL ||
        (*dirty = PyDict_GetItemWithError(cd, s_dirty)) == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_AttributeError, "the cache lacks sets, set_mask or dirty");
        }
        return -1;
    }
    return get_u64(m, "set_mask", mask);
}

static int cache_parts(HostPortObject *h, PyObject **sets, uint64_t *mask, PyObject **dirty)
{
    return cache_parts_of(h->cache, sets, mask, dirty);
}

/* pool_sync_all(pool, cache_dict, write_back) -> int: PagePool.sync_all with the C helpers
 * (src/sevemu/hw/uc/pool.py): for each slot of pool.writable that pool.slot_key holds, slot_sync of
 * the slot against its snapshot (made a bytearray first); a slot with changed lines has them written
 * into the cache -- as cache_hit_write_runs when no agent of the slot's domain but the pool is
 * snooped and every line is resident (stats.lines_written_back grows by their number), else by
 * write_back(slot, snap, runs) (PagePool._write_back, which does both).  Returns how many slots had
 * changed lines. */
static PyObject *s_slot_key, *s_writable, *s_agents, *s_lines_written_back;

/* The loop of pool_sync_all over the pool's parts (mm, slot_key, _snap, stats, writable). */
static PyObject *pool_sync_parts(PyObject *pool, PyObject *cd, PyObject *write_back, PyObject *mm, PyObject *keys,
                                 PyObject *snaps, PyObject *stats, PyObject *wset)
{
    PyObject *slots = NULL, *out = NULL, *sets, *cdirty, *runs = NULL, *small[8];
    uint64_t mask;
    Py_buffer mb;
    Py_ssize_t i, count = 0, nslots = 0;
    if (mm == Py_None || (PyAnySet_Check(wset) && PySet_GET_SIZE(wset) == 0)) {
        return PyLong_FromLong(0);
    }
    if (!PyDict_CheckExact(keys) || !PyDict_CheckExact(snaps) || !PyAnySet_Check(wset)) {
        PyErr_SetString(PyExc_TypeError, "pool_sync_all: slot_key, _snap must be dicts, writable a set");
        return NULL;
    }
    if (cache_parts_of(cd, &sets, &mask, &cdirty) < 0) {
        return NULL;
    }
    /* the set, as iterated (a write-back's Python code may change it): a few slots held here, more as a list */
    if (PySet_GET_SIZE(wset) <= 8) {
        Py_ssize_t pos = 0;
        Py_hash_t hash;
        PyObject *key;
        while (_PySet_NextEntry(wset, &pos, &key, &hash)) {
            small[nslots++] = Py_NewRef(key);
        }
    } else if ((slots = PySequence_List(wset)) == NULL) {
        return NULL;
    } else {
        nslots = PyList_GET_SIZE(slots);
    }
    if (PyObject_GetBuffer(mm, &mb, PyBUF_SIMPLE) < 0) {
        goto unref;
    }
    for (i = 0; i < nslots; i++) {
        PyObject *s = slots == NULL ? small[i] : PyList_GET_ITEM(slots, i), *key_o, *snap, *agents;
        Py_ssize_t slot, o, start = -1, total = 0, nruns = 0;
        Py_ssize_t spans[2 * (PAGE / LINE / 2 + 1)];
        uint64_t key;
        int foreign = 0;
        if ((key_o = PyDict_GetItemWithError(keys, s)) == NULL) {
            if (PyErr_Occurred()) {
                goto done;
            }
            continue;
        }
        slot = PyLong_AsSsize_t(s);
        if (slot == -1 && PyErr_Occurred()) {
            goto done;
        }
        if (slot < 0 || mb.len < PAGE || slot > (mb.len - PAGE) / PAGE) {
            PyErr_Format(PyExc_ValueError, "pool_sync_all: slot %zd is outside the pool", slot);
            goto done;
        }
        if (get_u64(key_o, "slot key", &key) < 0) {
            goto done;
        }
        if ((snap = PyDict_GetItemWithError(snaps, s)) == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, s);
            }
            goto done;
        }
        if (!PyByteArray_CheckExact(snap)) { /* (updated in place from now on) */
            PyObject *copy = PyByteArray_FromObject(snap);
            if (copy == NULL || PyDict_SetItem(snaps, s, copy) < 0) {
                Py_XDECREF(copy);
                goto done;
            }
            snap = copy;
            Py_DECREF(copy);
        }
        if (PyByteArray_GET_SIZE(snap) != PAGE) {
            PyErr_SetString(PyExc_ValueError, "pool_sync_all: a snapshot is not a page");
            goto done;
        }
        const char *pa = (const char *)mb.buf + slot * PAGE;
        char *pb = PyByteArray_AS_STRING(snap);
        if (memcmp(pa, pb, PAGE) == 0) {
            continue;
        }
        for (o = 0; o <= PAGE; o += LINE) { /* slot_sync: the runs of changed lines, taken into the snapshot */
            int same_block = block_same(pa, pb, o, PAGE);
            int differs = !same_block && o < PAGE && line_differs(pa + o, pb + o);
            if (differs) {
                memcpy(pb + o, pa + o, LINE);
                if (start < 0) {
                    start = o;
                }
            } else if (start >= 0) {
                spans[2 * nruns] = start;
                spans[2 * nruns + 1] = (o - start) / LINE;
                total += (o - start) / LINE;
                nruns++;
                start = -1;
            }
            if (same_block) {
                o += SAME_BLOCK - LINE; /* (its other lines: equal too, and no run is open) */
            }
        }
        count++;
        agents = PyDict_GetItemWithError(cd, (key >> 52) & 1 ? s_agents : s_plain_agents);
        if (agents == NULL || !PyTuple_CheckExact(agents)) {
            if (PyErr_Occurred()) {
                goto done;
            }
            foreign = 1;
        } else {
            for (Py_ssize_t a = 0; a < PyTuple_GET_SIZE(agents); a++) {
                foreign |= PyTuple_GET_ITEM(agents, a) != pool;
            }
        }
        if (!foreign) {
            int rc;
            PyObject **refs = hit_runs(sets, mask, key, nruns, spans, total, &rc);
            if (refs == NULL && rc < 0) {
                goto done;
            }
            if (refs != NULL) {
                Py_ssize_t got = 0, r, j;
                for (r = 0; r < nruns; r++) {
                    for (j = 0; j < spans[2 * r + 1]; j++, got++) {
                        memcpy(PyByteArray_AS_STRING(refs[total + got]), pa + spans[2 * r] + j * LINE, LINE);
                    }
                }
                rc = touch_runs(sets, mask, key, nruns, spans, total, refs, cdirty);
                PyMem_Free(refs);
                if (rc < 0 || bump_by(cd, s_hits, total) < 0) {
                    goto done;
                }
                PyObject *v = PyObject_GetAttr(stats, s_lines_written_back), *nv;
                if (v == NULL) {
                    goto done;
                }
                PyObject *add = PyLong_FromSsize_t(total);
                nv = add == NULL ? NULL : PyNumber_Add(v, add);
                Py_DECREF(v);
                Py_XDECREF(add);
                if (nv == NULL || PyObject_SetAttr(stats, s_lines_written_back, nv) < 0) {
                    Py_XDECREF(nv);
                    goto done;
                }
                Py_DECREF(nv);
                continue;
            }
        }
        /* another agent to snoop, or a line absent: PagePool._write_back with the runs */
        runs = PyList_New(nruns);
        if (runs == NULL) {
            goto done;
        }
        for (Py_ssize_t r = 0; r < nruns; r++) {
            PyObject *run = Py_BuildValue("(nn)", spans[2 * r], spans[2 * r] + spans[2 * r + 1] * LINE);
            if (run == NULL) {
                goto done;
            }
            PyList_SET_ITEM(runs, r, run);
        }
        PyObject *a[3] = {s, snap, runs};
        Py_INCREF(snap);
        PyObject *r = PyObject_Vectorcall(write_back, a, 3, NULL);
        Py_DECREF(snap);
        Py_CLEAR(runs);
        if (r == NULL) {
            goto done;
        }
        Py_DECREF(r);
    }
    out = PyLong_FromSsize_t(count);
done:
    Py_XDECREF(runs);
    PyBuffer_Release(&mb);
unref:
    if (slots == NULL) {
        for (i = 0; i < nslots; i++) {
            Py_DECREF(small[i]);
        }
    }
    Py_XDECREF(slots);
    return out;
}

static PyObject *pool_sync_all(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *out = NULL, *a[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *names[5] = {s_mm, s_slot_key, s_snap, s_stats, s_writable};
    (void)self;
    if (check_nargs("pool_sync_all", nargs, 3) < 0) {
        return NULL;
    }
    if (!PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "pool_sync_all: the cache's __dict__ must be a dict");
        return NULL;
    }
    for (int i = 0; i < 5; i++) { /* (attributes, not the pool's __dict__: see PoolSnoop) */
        if ((a[i] = PyObject_GetAttr(args[0], names[i])) == NULL) {
            goto release;
        }
    }
    out = pool_sync_parts(args[0], args[1], args[2], a[0], a[1], a[2], a[3], a[4]);
release:
    for (int i = 0; i < 5; i++) {
        Py_XDECREF(a[i]);
    }
    return out;
}

/* PoolSync(pool, cache_dict, write_back): pool_sync_all(pool, cache_dict, write_back) as a callable
 * that holds the pool's slot_key, _snap, stats and writable (objects a PagePool never rebinds: read
 * once here) and reads pool.mm at each call (rebound at open and close). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *pool, *cd, *write_back, *keys, *snaps, *stats, *wset;
} PoolSyncObject;

static PyObject *pool_sync_obj_call(PoolSyncObject *p, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    (void)args;
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "PoolSync() takes no arguments");
        return NULL;
    }
    PyObject *mm = PyObject_GetAttr(p->pool, s_mm), *out;
    if (mm == NULL) {
        return NULL;
    }
    out = pool_sync_parts(p->pool, p->cd, p->write_back, mm, p->keys, p->snaps, p->stats, p->wset);
    Py_DECREF(mm);
    return out;
}

static int pool_sync_obj_traverse(PoolSyncObject *p, visitproc visit, void *arg)
{
    Py_VISIT(p->pool);
    Py_VISIT(p->cd);
    Py_VISIT(p->write_back);
    Py_VISIT(p->keys);
    Py_VISIT(p->snaps);
    Py_VISIT(p->stats);
    Py_VISIT(p->wset);
    return 0;
}

static int pool_sync_obj_clear(PoolSyncObject *p)
{
    Py_CLEAR(p->pool);
    Py_CLEAR(p->cd);
    Py_CLEAR(p->write_back);
    Py_CLEAR(p->keys);
    Py_CLEAR(p->snaps);
    Py_CLEAR(p->stats);
    Py_CLEAR(p->wset);
    return 0;
}

static void pool_sync_obj_dealloc(PoolSyncObject *p)
{
    PyObject_GC_UnTrack(p);
    pool_sync_obj_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pool_sync_obj_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *pool, *cd, *write_back, *a[4] = {NULL, NULL, NULL, NULL};
    PyObject *names[4] = {s_slot_key, s_snap, s_stats, s_writable};
    PoolSyncObject *p;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "PoolSync() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!O:PoolSync", &pool, &PyDict_Type, &cd, &write_back)) {
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        if ((a[i] = PyObject_GetAttr(pool, names[i])) == NULL) {
            goto fail;
        }
    }
    if (!PyDict_CheckExact(a[0]) || !PyDict_CheckExact(a[1]) || !PyAnySet_Check(a[3])) {
        PyErr_SetString(PyExc_TypeError, "PoolSync: slot_key, _snap must be dicts, writable a set");
        goto fail;
    }
    if ((p = (PoolSyncObject *)type->tp_alloc(type, 0)) == NULL) {
        goto fail;
    }
    p->vectorcall = (vectorcallfunc)pool_sync_obj_call;
    p->pool = Py_NewRef(pool);
    p->cd = Py_NewRef(cd);
    p->write_back = Py_NewRef(write_back);
    p->keys = a[0];
    p->snaps = a[1];
    p->stats = a[2];
    p->wset = a[3];
    return (PyObject *)p;
fail:
    for (int i = 0; i < 4; i++) {
        Py_XDECREF(a[i]);
    }
    return NULL;
}

PyDoc_STRVAR(pool_sync_obj_doc, "PoolSync(pool, cache_dict, write_back)(): pool_sync_all(pool, cache_dict, write_back) "
                                "with the pool's slot_key, _snap, stats, writable read once (csrc/mem_accel.c).");

static PyTypeObject PoolSyncType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw._mem_accel.PoolSync",
    .tp_basicsize = sizeof(PoolSyncObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(PoolSyncObject, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_doc = pool_sync_obj_doc,
    .tp_new = pool_sync_obj_new,
    .tp_dealloc = (destructor)pool_sync_obj_dealloc,
    .tp_traverse = (traverseproc)pool_sync_obj_traverse,
    .tp_clear = (inquiry)pool_sync_obj_clear,
};


PyDoc_STRVAR(host_port_write_doc, "write(spa, data, c=False): Core.host_write (see the comment in csrc/mem_accel.c).");

static PyObject *host_port_write(HostPortObject *h, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), n, i;
    PyObject *data, *view = NULL, *sets, *dirty, *out = NULL, **refs = NULL;
    uint64_t spa, mask;
    int rc, c = 0;
    if (kwnames != NULL || nargs < 2 || nargs > 3 || !exact_u64_of(args[0], &spa)) {
        goto python;
    }
    if (nargs == 3 && (c = PyObject_IsTrue(args[2])) != 0) {
        if (c < 0) {
            return NULL;
        }
        goto python;
    }
    data = args[1];
    if (!PyBytes_CheckExact(data) && !PyByteArray_CheckExact(data)) {
        goto python;
    }
    n = Py_SIZE(data);
    if (n == 0 || ((spa | (uint64_t)n) & (LINE - 1))) {
        goto python;
    }
    if ((rc = host_plain(h, spa, (uint64_t)n, args[0])) <= 0) {
        if (rc < 0) {
            return NULL;
        }
        goto python;
    }
    if ((view = PyMemoryView_FromObject(data)) == NULL) {
        return NULL;
    }
    if (snoop_plain(h, spa, spa + (uint64_t)n, 1, view) < 0 || cache_parts(h, &sets, &mask, &dirty) < 0) {
        goto done;
    }
    if (!PySet_Check(dirty)) {
        PyErr_SetString(PyExc_TypeError, "cache.dirty must be a set");
        goto done;
    }
    n /= LINE;
    refs = PyMem_New(PyObject *, 2 * n);
    if (refs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* The view's bytes: a bytearray's buffer is read through the view, which pins it. */
    const char *src = PyBytes_CheckExact(data) ? PyBytes_AS_STRING(data) : PyByteArray_AS_STRING(data);
    rc = hit_lines(sets, mask, spa, n, refs, refs + n);
    if (rc < 0) {
        goto done;
    }
    if (rc == 0) { /* a line is absent: the cache's Python rest of write_lines */
        PyObject *a[2] = {PyLong_FromUnsignedLongLong(spa), view};
        if (a[0] != NULL) {
            out = PyObject_Vectorcall(h->write_rest, a, 2, NULL);
            Py_DECREF(a[0]);
        }
        if (out != NULL) {
            Py_DECREF(out);
            out = Py_NewRef(Py_None);
        }
        goto done;
    }
    for (i = 0; i < n; i++) {
        memcpy(PyByteArray_AS_STRING(refs[n + i]), src + i * LINE, LINE);
    }
    if (touch_lines(sets, mask, spa, n, refs, refs + n, dirty) == 0 && bump_by(h->cache, s_hits, n) == 0) {
        out = Py_NewRef(Py_None);
    }
done:
    PyMem_Free(refs);
    Py_XDECREF(view);
    return out;
python:
    return PyObject_Vectorcall(h->write, args, nargsf, kwnames);
}

PyDoc_STRVAR(host_port_read_runs_doc,
             "read_runs(spa, runs, c=False): Core.host_read_runs (see the comment in csrc/mem_accel.c).");

static PyObject *host_port_read_runs(HostPortObject *h, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), nruns, r, total = 0, i, off, len, *spans = NULL;
    PyObject *runs, *sets, *dirty, *out = NULL, **refs = NULL;
    uint64_t spa, mask, first = PAGE, end = 0;
    int rc, c = 0;
    if (kwnames != NULL || nargs < 2 || nargs > 3 || !exact_u64_of(args[0], &spa) || (spa & (PAGE - 1))) {
        goto python;
    }
    if (nargs == 3 && (c = PyObject_IsTrue(args[2])) != 0) {
        if (c < 0) {
            return NULL;
        }
        goto python;
    }
    runs = args[1];
    if (!PyTuple_CheckExact(runs) || (nruns = PyTuple_GET_SIZE(runs)) == 0) {
        goto python;
    }
    for (r = 0; r < nruns; r++) { /* whole lines inside the page, or Cache.read_runs says what is wrong */
        PyObject *run = PyTuple_GET_ITEM(runs, r);
        if (!PyTuple_CheckExact(run) || PyTuple_GET_SIZE(run) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(run, 0)) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(run, 1))) {
            goto python;
        }
        off = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 0));
        len = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 1));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            goto python;
        }
        if (((off | len) & (LINE - 1)) || off < 0 || len <= 0 || off >= PAGE || len > PAGE - off) {
            goto python;
        }
        first = (uint64_t)off < first ? (uint64_t)off : first;
        end = (uint64_t)(off + len) > end ? (uint64_t)(off + len) : end;
    }
    if ((rc = host_plain(h, spa, PAGE, NULL)) <= 0) {
        if (rc < 0) {
            return NULL;
        }
        goto python;
    }
    if (snoop_plain(h, spa + first, spa + end, 0, Py_None) < 0 || cache_parts(h, &sets, &mask, &dirty) < 0) {
        return NULL;
    }
    if ((spans = new_spans(nruns)) == NULL) {
        return NULL;
    }
    for (r = 0; r < nruns; r++) {
        PyObject *run = PyTuple_GET_ITEM(runs, r);
        spans[2 * r] = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 0));
        spans[2 * r + 1] = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 1)) / LINE;
        total += spans[2 * r + 1];
    }
    if ((refs = hit_runs(sets, mask, spa, nruns, spans, total, &rc)) == NULL) {
        if (rc == 0) { /* a line is absent: the cache's Python rest of read_runs */
            PyObject *a[2] = {PyLong_FromUnsignedLongLong(spa), runs};
            if (a[0] != NULL) {
                out = PyObject_Vectorcall(h->runs_rest, a, 2, NULL);
                Py_DECREF(a[0]);
            }
        }
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, total * LINE);
    if (out != NULL) {
        char *p = PyBytes_AS_STRING(out);
        for (i = 0; i < total; i++) {
            memcpy(p + i * LINE, PyByteArray_AS_STRING(refs[total + i]), LINE);
        }
    }
    if (touch_runs(sets, mask, spa, nruns, spans, total, refs, NULL) < 0 || out == NULL ||
        bump_by(h->cache, s_hits, total) < 0) {
        Py_CLEAR(out);
    }
done:
    PyMem_Free(refs);
    PyMem_Free(spans);
    return out;
python:
    return PyObject_Vectorcall(h->read_runs, args, nargsf, kwnames);
}

PyDoc_STRVAR(host_port_exchange_doc,
             "exchange(spa, runs, expect, writes) -> None or bytes: read_runs(spa, runs); when that equals\n"
             "expect, write(spa + off, data) of each (off, data) pair of the list `writes` and None, else\n"
             "what was read (nothing written).  (See the comment in csrc/mem_accel.c.)");

/* cache.hits += *pending (hits counted but not yet added: before anything may look), *pending = 0 */
static int flush_hits(HostPortObject *h, Py_ssize_t *pending)
{
    Py_ssize_t n = *pending;
    *pending = 0;
    return n == 0 ? 0 : bump_by(h->cache, s_hits, n);
}

/* The snoops of snoop_plain, an agent whose `snoop` is a PoolSnoop served here without Python
 * objects for the arguments (PoolSnoop's own work; its fallback called as snoop_plain would call it):
 * 0, or -1 on error.  *python becomes 1 when Python code may have run (another agent's snoop, a
 * fallback).  `data` is the bytes written (NULL for a read); other agents get a memoryview of it. */
static int snoop_plain_fast(HostPortObject *h, uint64_t lo, uint64_t hi, int invalidate, PyObject *data, int *python,
                            Py_ssize_t *pending)
{
    PyObject *agents = PyDict_GetItemWithError(h->cache, s_plain_agents), *view = NULL;
    Py_ssize_t i;
    int rc = 0;
    if (agents == NULL || !PyTuple_CheckExact(agents)) {
        *python = 1;
        if (flush_hits(h, pending) < 0) {
            return -1;
        }
        return snoop_plain(h, lo, hi, invalidate, data == NULL ? Py_None : data); /* (says what is wrong) */
    }
    for (i = 0; i < PyTuple_GET_SIZE(agents) && rc == 0; i++) {
        PyObject *agent = PyTuple_GET_ITEM(agents, i), *fn, *r, *a[4];
        Py_INCREF(agent); /* (a snoop may detach it) */
        fn = PyObject_GetAttr(agent, s_snoop);
        Py_DECREF(agent);
        if (fn == NULL) {
            return -1;
        }
        if (Py_IS_TYPE(fn, &PoolSnoopType)) {
            rc = pool_snoop_do((PoolSnoopObject *)fn, lo, hi, invalidate, data);
            if (rc != 0) {
                Py_DECREF(fn);
                rc = rc < 0 ? -1 : 0;
                continue;
            }
        }
        *python = 1; /* another agent, or PoolSnoop's fallback: called as snoop_plain calls it */
        if (flush_hits(h, pending) < 0) {
            Py_DECREF(fn);
            return -1;
        }
        if (data != NULL && view == NULL && (view = PyMemoryView_FromObject(data)) == NULL) {
            Py_DECREF(fn);
            return -1;
        }
        a[0] = PyLong_FromUnsignedLongLong(lo);
        a[1] = a[0] == NULL ? NULL : PyLong_FromUnsignedLongLong(hi);
        a[2] = invalidate ? Py_True : Py_False;
        a[3] = data == NULL ? Py_None : view;
        r = a[1] == NULL ? NULL
            : PyObject_Vectorcall(Py_IS_TYPE(fn, &PoolSnoopType) ? ((PoolSnoopObject *)fn)->fallback : fn, a, 4, NULL);
        Py_XDECREF(a[0]);
        Py_XDECREF(a[1]);
        Py_DECREF(fn);
        if (r == NULL) {
            rc = -1;
        } else {
            Py_DECREF(r);
        }
    }
    Py_XDECREF(view);
    return rc;
}

/* exchange(spa, runs, expect, writes) of whole lines in the page (see host_port_exchange): 1 with
 * *out set (None or the bytes read), 0 when the generic sequence must do it (nothing happened yet),
 * -1 on error.  The page is checked once (host_plain of the whole page) unless Python code ran
 * since; the read's lines are compared where they lie; the counters grow as the generic sequence
 * makes them grow. */
#define EXCHANGE_RUNS 16
static int exchange_fast(HostPortObject *h, uint64_t spa, PyObject *runs, PyObject *expect, PyObject *writes,
                         PyObject **out)
{
    Py_ssize_t nruns, nw, r, i, total = 0, spans[2 * EXCHANGE_RUNS], woff[EXCHANGE_RUNS];
    PyObject *sets, *dirty, **refs, *keys[PAGE / LINE], *lines[PAGE / LINE];
    uint64_t mask, first = PAGE, end = 0;
    Py_ssize_t pending = 0; /* hits not yet added to cache.hits (flush_hits before any Python code) */
    int rc, python = 0, same = 1;
    if ((spa & (PAGE - 1)) || !PyTuple_CheckExact(runs) || (nruns = PyTuple_GET_SIZE(runs)) == 0 ||
        nruns > EXCHANGE_RUNS || (nw = PyList_GET_SIZE(writes)) > EXCHANGE_RUNS) {
        return 0;
    }
    for (r = 0; r < nruns; r++) { /* whole lines inside the page (else the generic sequence says what is wrong) */
        PyObject *run = PyTuple_GET_ITEM(runs, r);
        Py_ssize_t off, len;
        if (!PyTuple_CheckExact(run) || PyTuple_GET_SIZE(run) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(run, 0)) ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(run, 1))) {
            return 0;
        }
        off = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 0));
        len = PyLong_AsSsize_t(PyTuple_GET_ITEM(run, 1));
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (((off | len) & (LINE - 1)) || off < 0 || len <= 0 || off >= PAGE || len > PAGE - off) {
            return 0;
        }
        spans[2 * r] = off;
        spans[2 * r + 1] = len / LINE;
        total += len / LINE;
        first = (uint64_t)off < first ? (uint64_t)off : first;
        end = (uint64_t)(off + len) > end ? (uint64_t)(off + len) : end;
    }
    for (i = 0; i < nw; i++) { /* (offset, bytes) of whole lines inside the page */
        PyObject *w = PyList_GET_ITEM(writes, i), *d;
        if (!PyTuple_CheckExact(w) || PyTuple_GET_SIZE(w) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(w, 0)) ||
            !PyBytes_CheckExact(d = PyTuple_GET_ITEM(w, 1))) {
            return 0;
        }
        woff[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(w, 0));
        if (woff[i] == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
        if (((woff[i] | PyBytes_GET_SIZE(d)) & (LINE - 1)) || woff[i] < 0 || PyBytes_GET_SIZE(d) == 0 ||
            woff[i] >= PAGE || PyBytes_GET_SIZE(d) > PAGE - woff[i]) {
            return 0;
        }
    }
    if (PyBytes_GET_SIZE(expect) != total * LINE) {
        return 0;
    }
    if ((rc = host_plain(h, spa, PAGE, NULL)) <= 0) {
        return rc;
    }
    if (cache_parts(h, &sets, &mask, &dirty) < 0) {
        return -1;
    }
    if (!PySet_Check(dirty)) {
        return 0;
    }
    /* the read: Core.host_read_runs of the runs */
    if (snoop_plain_fast(h, spa + first, spa + end, 0, NULL, &python, &pending) < 0 ||
        (python && cache_parts(h, &sets, &mask, &dirty) < 0)) {
        return -1;
    }
    if ((refs = hit_runs(sets, mask, spa, nruns, spans, total, &rc)) == NULL) {
        PyObject *got, *a[2];
        if (rc < 0) {
            return -1;
        }
        /* a line is absent: the cache's Python rest of read_runs, then the generic comparison */
        if ((a[0] = PyLong_FromUnsignedLongLong(spa)) == NULL) {
            return -1;
        }
        a[1] = runs;
        got = PyObject_Vectorcall(h->runs_rest, a, 2, NULL);
        Py_DECREF(a[0]);
        if (got == NULL) {
            return -1;
        }
        if (!PyBytes_CheckExact(got) || PyBytes_GET_SIZE(got) != PyBytes_GET_SIZE(expect) ||
            memcmp(PyBytes_AS_STRING(got), PyBytes_AS_STRING(expect), (size_t)PyBytes_GET_SIZE(got)) != 0) {
            *out = got;
            return 1;
        }
        Py_DECREF(got);
        python = 1;
    } else {
        for (i = 0; i < total && same; i++) {
            same = memcmp(PyByteArray_AS_STRING(refs[total + i]), PyBytes_AS_STRING(expect) + i * LINE, LINE) == 0;
        }
        *out = NULL;
        if (!same) { /* another request: what was read */
            *out = PyBytes_FromStringAndSize(NULL, total * LINE);
            if (*out != NULL) {
                for (i = 0; i < total; i++) {
                    memcpy(PyBytes_AS_STRING(*out) + i * LINE, PyByteArray_AS_STRING(refs[total + i]), LINE);
                }
            }
        }
        rc = touch_runs(sets, mask, spa, nruns, spans, total, refs, NULL);
        PyMem_Free(refs);
        pending = total;
        if (rc < 0 || (!same && *out == NULL) || (!same && flush_hits(h, &pending) < 0)) {
            Py_CLEAR(*out);
            return -1;
        }
        if (!same) {
            return 1;
        }
    }
    /* the answer: Core.host_write of each (offset, data) */
    for (i = 0; i < nw; i++) {
        PyObject *d = PyTuple_GET_ITEM(PyList_GET_ITEM(writes, i), 1);
        uint64_t wspa = spa + (uint64_t)woff[i];
        Py_ssize_t n = PyBytes_GET_SIZE(d) / LINE;
        Py_INCREF(d);
        if (python) { /* Python ran since the page was checked: the whole write as host_port_write does it */
            PyObject *a[2] = {PyLong_FromUnsignedLongLong(wspa), d}, *res;
            res = a[0] == NULL || flush_hits(h, &pending) < 0 ? NULL : host_port_write(h, a, 2, NULL);
            Py_XDECREF(a[0]);
            Py_DECREF(d);
            if (res == NULL) {
                return -1;
            }
            Py_DECREF(res);
            continue;
        }
        if (snoop_plain_fast(h, wspa, wspa + (uint64_t)n * LINE, 1, d, &python, &pending) < 0) {
            Py_DECREF(d);
            return -1;
        }
        if (python && cache_parts(h, &sets, &mask, &dirty) < 0) { /* (a snoop ran Python: the parts again) */
            Py_DECREF(d);
            return -1;
        }
        if (!PySet_Check(dirty)) {
            PyErr_SetString(PyExc_TypeError, "cache.dirty must be a set");
            rc = -1;
        } else {
            rc = hit_lines(sets, mask, wspa, n, keys, lines);
        }
        if (rc < 0) {
            Py_DECREF(d);
            return -1;
        }
        if (rc == 0) { /* a line is absent: the cache's Python rest of write_lines */
            PyObject *a[2] = {PyLong_FromUnsignedLongLong(wspa), NULL}, *res = NULL;
            if (a[0] != NULL && flush_hits(h, &pending) == 0 && (a[1] = PyMemoryView_FromObject(d)) != NULL) {
                res = PyObject_Vectorcall(h->write_rest, a, 2, NULL);
            }
            Py_XDECREF(a[0]);
            Py_XDECREF(a[1]);
            Py_DECREF(d);
            if (res == NULL) {
                return -1;
            }
            Py_DECREF(res);
            python = 1;
            continue;
        }
        for (r = 0; r < n; r++) {
            memcpy(PyByteArray_AS_STRING(lines[r]), PyBytes_AS_STRING(d) + r * LINE, LINE);
        }
        Py_DECREF(d);
        if (touch_lines(sets, mask, wspa, n, keys, lines, dirty) < 0) {
            return -1;
        }
        pending += n;
    }
    if (flush_hits(h, &pending) < 0) {
        return -1;
    }
    *out = Py_NewRef(Py_None);
    return 1;
}

static PyObject *host_port_exchange(HostPortObject *h, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *got, *writes, *a[2];
    Py_ssize_t i, n;
    uint64_t spa;
    int rc;
    if (check_nargs("exchange", nargs, 4) < 0) {
        return NULL;
    }
    writes = args[3];
    if (!PyBytes_CheckExact(args[2]) || !PyList_CheckExact(writes) || get_u64(args[0], "spa", &spa) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "exchange(): expect must be bytes, writes a list");
        }
        return NULL;
    }
    if ((rc = exchange_fast(h, spa, args[1], args[2], writes, &got)) != 0) {
        return rc < 0 ? NULL : got;
    }
    got = host_port_read_runs(h, args, 2, NULL);
    if (got == NULL) {
        return NULL;
    }
    if (!PyBytes_CheckExact(got) || PyBytes_GET_SIZE(got) != PyBytes_GET_SIZE(args[2]) ||
        memcmp(PyBytes_AS_STRING(got), PyBytes_AS_STRING(args[2]), (size_t)PyBytes_GET_SIZE(got)) != 0) {
        return got; /* another head: the caller decides */
    }
    Py_DECREF(got);
    n = PyList_GET_SIZE(writes);
    for (i = 0; i < n && i < PyList_GET_SIZE(writes); i++) {
        PyObject *w = PyList_GET_ITEM(writes, i), *r;
        Py_ssize_t off;
        if (!PyTuple_CheckExact(w) || PyTuple_GET_SIZE(w) != 2) {
            PyErr_SetString(PyExc_TypeError, "exchange(): each write must be an (offset, data) tuple");
            return NULL;
        }
        off = PyLong_AsSsize_t(PyTuple_GET_ITEM(w, 0));
        if (off == -1 && PyErr_Occurred()) {
            return NULL;
        }
        Py_INCREF(w);
        a[1] = PyTuple_GET_ITEM(w, 1);
        if (off < 0 || off >= PAGE || PyObject_Length(a[1]) < 0 || PyObject_Length(a[1]) > PAGE - off) {
            Py_DECREF(w);
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "exchange(): a write at offset %zd does not fit in the page", off);
            }
            return NULL;
        }
        a[0] = PyLong_FromUnsignedLongLong(spa + (uint64_t)off);
        if (a[0] == NULL) {
            Py_DECREF(w);
            return NULL;
        }
        r = host_port_write(h, a, 2, NULL);
        Py_DECREF(a[0]);
        Py_DECREF(w);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static int host_port_traverse(HostPortObject *h, visitproc visit, void *arg)
{
    Py_VISIT(h->core);
    Py_VISIT(h->cache);
    Py_VISIT(h->write);
    Py_VISIT(h->read_runs);
    Py_VISIT(h->write_rest);
    Py_VISIT(h->runs_rest);
    return 0;
}

static int host_port_clear(HostPortObject *h)
{
    Py_CLEAR(h->core);
    Py_CLEAR(h->cache);
    Py_CLEAR(h->write);
    Py_CLEAR(h->read_runs);
    Py_CLEAR(h->write_rest);
    Py_CLEAR(h->runs_rest);
    return 0;
}

static void host_port_dealloc(HostPortObject *h)
{
    PyObject_GC_UnTrack(h);
    host_port_clear(h);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyObject *host_port_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *core, *cache, *size, *fns[4];
    HostPortObject *h;
    uint64_t dram_size;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "HostPort() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OO!OOOOO:HostPort", &core, &PyDict_Type, &cache, &size, &fns[0],
                          &fns[1], &fns[2], &fns[3])) {
        return NULL;
    }
    if (get_u64(size, "dram_size", &dram_size) < 0) {
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        if (!PyCallable_Check(fns[i])) {
            PyErr_SetString(PyExc_TypeError, "HostPort(): write, read_runs, write_rest and runs_rest must be callable");
            return NULL;
        }
    }
    h = (HostPortObject *)type->tp_alloc(type, 0);
    if (h == NULL) {
        return NULL;
    }
    h->core = Py_NewRef(core);
    h->cache = Py_NewRef(cache);
    h->dram_size = dram_size;
    h->write = Py_NewRef(fns[0]);
    h->read_runs = Py_NewRef(fns[1]);
    h->write_rest = Py_NewRef(fns[2]);
    h->runs_rest = Py_NewRef(fns[3]);
    return (PyObject *)h;
}

static PyMethodDef host_port_methods[] = {
    {"write", (PyCFunction)(void (*)(void))host_port_write, METH_FASTCALL | METH_KEYWORDS, host_port_write_doc},
    {"read_runs", (PyCFunction)(void (*)(void))host_port_read_runs, METH_FASTCALL | METH_KEYWORDS,
     host_port_read_runs_doc},
    {"exchange", (PyCFunction)(void (*)(void))host_port_exchange, METH_FASTCALL, host_port_exchange_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(host_port_doc, "HostPort(core, cache_dict, dram_size, write, read_runs, write_rest, runs_rest): "
                            "the host's whole-line accesses of a core in one call (csrc/mem_accel.c).");

static PyTypeObject HostPortType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw._mem_accel.HostPort",
    .tp_basicsize = sizeof(HostPortObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = host_port_doc,
    .tp_new = host_port_new,
    .tp_dealloc = (destructor)host_port_dealloc,
    .tp_traverse = (traverseproc)host_port_traverse,
    .tp_clear = (inquiry)host_port_clear,
    .tp_methods = host_port_methods,
};

static int host_port_init_module(PyObject *m)
{
#define INTERN(var, text)                                                                                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                                           \
        return -1;                                                                                                     \
    }
    INTERN(s_synced, "synced")
    INTERN(s_slot_of, "slot_of")
    INTERN(s_mm, "mm")
    INTERN(s_snap, "_snap")
    INTERN(s_code_slots, "code_slots")
    INTERN(s_updated, "updated")
    INTERN(s_stats, "stats")
    INTERN(s_slot_updates, "slot_updates")
    INTERN(s_snoop, "snoop")
    INTERN(s_rmp, "rmp")
    INTERN(s_check_host_write, "check_host_write")
    INTERN(s_vmcbs, "vmcbs")
    INTERN(s_lo, "lo")
    INTERN(s_hi, "hi")
    INTERN(s_plain_agents, "plain_agents")
    INTERN(s_sets, "sets")
    INTERN(s_set_mask, "set_mask")
    INTERN(s_dirty, "dirty")
    INTERN(s_slot_key, "slot_key")
    INTERN(s_writable, "writable")
    INTERN(s_agents, "agents")
    INTERN(s_lines_written_back, "lines_written_back")
#undef INTERN
    if ((s_one = PyLong_FromLong(1)) == NULL) {
        return -1;
    }
    PyTypeObject *types[3] = {&PoolSnoopType, &HostPortType, &PoolSyncType};
    const char *names[3] = {"PoolSnoop", "HostPort", "PoolSync"};
    for (int i = 0; i < 3; i++) {
        if (PyType_Ready(types[i]) < 0) {
            return -1;
        }
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    return 0;
}

/* ---- u64 columns (the firmware's whole-page batches, the ring's queue entries) ---------------
 * Summaries of little-endian u64 columns in one pass each, so that a caller deciding on a batch of
 * commands reads a few numbers instead of running a dozen array operations over it.  They decide
 * nothing: each gives what the numpy expression quoted in its doc string gives. */

static inline uint64_t le64_at(const char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void le64_put(char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

/* The u64 items of a tuple of ints into out[] (TypeError / ValueError as get_u64); -1 on error. */
static int u64_tuple(PyObject *t, const char *what, uint64_t *out, Py_ssize_t want)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != want) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of %zd ints", what, want);
        return -1;
    }
    for (Py_ssize_t i = 0; i < want; i++) {
        if (get_u64(PyTuple_GET_ITEM(t, i), what, &out[i]) < 0) {
            return -1;
        }
    }
    return 0;
}

PyDoc_STRVAR(u64_columns_doc,
             "u64_columns(buf, lengths, /)\n--\n\n"
             "buf: len(lengths) columns of n little-endian u64 each, back to back (n >= 1).  For each\n"
             "column c and its length L, (min, max, or, stride, apart): c.min(), c.max(), the OR of\n"
             "all values; stride = c[1] - c[0] when n > 1, c[1] >= c[0] and every step c[i+1] - c[i]\n"
             "equals it, else 0; apart = (c[1:] >= c[:-1] + L).all() with u64 wrap-around (True for\n"
             "n == 1).");

static PyObject *u64_columns(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b;
    PyObject *out = NULL;
    Py_ssize_t k, n;
    uint64_t lens[16];
    (void)self;
    if (check_nargs("u64_columns", nargs, 2) < 0) {
        return NULL;
    }
    if (!PyTuple_Check(args[1]) || (k = PyTuple_GET_SIZE(args[1])) < 1 || k > 16) {
        PyErr_SetString(PyExc_TypeError, "lengths must be a tuple of 1..16 ints");
        return NULL;
    }
    if (u64_tuple(args[1], "lengths", lens, k) < 0 || PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (b.len == 0 || b.len % (8 * k)) {
        PyErr_Format(PyExc_ValueError, "u64_columns needs %zd non-empty columns of u64 (got %zd bytes)", k, b.len);
        goto done;
    }
    n = b.len / (8 * k);
    out = PyList_New(k);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        const char *c = (const char *)b.buf + 8 * n * j;
        uint64_t first = le64_at(c), lo = first, hi = first, bits = first, prev = first, step = 0;
        int even = n > 1, apart = 1;
        if (n > 1) {
            step = le64_at(c + 8) - first;
            even = le64_at(c + 8) >= first;
        }
        for (Py_ssize_t i = 1; i < n; i++) {
            uint64_t v = le64_at(c + 8 * i);
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
            bits |= v;
            even &= v - prev == step;
            apart &= v >= prev + lens[j];
            prev = v;
        }
        PyObject *item = Py_BuildValue("(KKKKO)", (unsigned long long)lo, (unsigned long long)hi,
                                       (unsigned long long)bits, (unsigned long long)(even ? step : 0),
                                       apart ? Py_True : Py_False);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, j, item);
    }
done:
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(u64_runs_doc,
             "u64_runs(buf, step, /)\n--\n\n"
             "The runs of a column of little-endian u64 values c (buf) in which each value is the one\n"
             "before it plus step (u64 wrap-around): [(first index, c[first], count * step), ...] in\n"
             "order ([] for an empty column).");

static PyObject *u64_runs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b;
    PyObject *out = NULL;
    uint64_t step;
    Py_ssize_t n, first = 0;
    (void)self;
    if (check_nargs("u64_runs", nargs, 2) < 0 || get_u64(args[1], "step", &step) < 0 ||
        PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (b.len % 8) {
        PyErr_Format(PyExc_ValueError, "u64_runs needs a column of u64 (got %zd bytes)", b.len);
        goto done;
    }
    n = b.len / 8;
    out = PyList_New(0);
    if (out == NULL) {
        goto done;
    }
    const char *c = (const char *)b.buf;
    for (Py_ssize_t i = 1; i <= n; i++) {
        if (i < n && le64_at(c + 8 * i) == le64_at(c + 8 * (i - 1)) + step) {
            continue;
        }
        PyObject *run = Py_BuildValue("(nKK)", first, (unsigned long long)le64_at(c + 8 * first),
                                      (unsigned long long)((uint64_t)(i - first) * step));
        if (run == NULL || PyList_Append(out, run) < 0) {
            Py_XDECREF(run);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(run);
        first = i;
    }
done:
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(record_words_doc,
             "record_words(raw, size, mask, picks, ands, /)\n--\n\n"
             "raw: n records of size bytes back to back, each read as W = len(mask) // 8 little-endian\n"
             "u64 words (zero-padded to 8 * W >= size bytes).  None when a word w of a record has a\n"
             "bit of mask's word w set; else the columns picks[j] (a word index) of every record, each\n"
             "ANDed with ands[j], back to back: len(picks) columns of n u64.");

static PyObject *record_words(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer raw, mask;
    PyObject *out = NULL;
    uint64_t size, m[16], picks[16], ands[16];
    Py_ssize_t w, k, n;
    (void)self;
    if (check_nargs("record_words", nargs, 5) < 0 || get_u64(args[1], "size", &size) < 0) {
        return NULL;
    }
    if (!PyTuple_Check(args[3]) || (k = PyTuple_GET_SIZE(args[3])) < 1 || k > 16) {
        PyErr_SetString(PyExc_TypeError, "picks must be a tuple of 1..16 ints");
        return NULL;
    }
    if (u64_tuple(args[3], "picks", picks, k) < 0 || u64_tuple(args[4], "ands", ands, k) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &raw, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[2], &mask, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    w = mask.len / 8;
    if (size == 0 || mask.len % 8 || w > 16 || (uint64_t)(8 * w) < size || (uint64_t)(8 * w) - size >= 8 ||
        raw.len % (Py_ssize_t)size) {
        PyErr_SetString(PyExc_ValueError, "record_words: raw is not whole records, or mask is not the records' words");
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (picks[j] >= (uint64_t)w) {
            PyErr_SetString(PyExc_ValueError, "record_words: a pick is not a word of the record");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < w; i++) {
        m[i] = le64_at((const char *)mask.buf + 8 * i);
    }
    n = raw.len / (Py_ssize_t)size;
    out = PyBytes_FromStringAndSize(NULL, 8 * k * n);
    if (out == NULL) {
        goto done;
    }
    char *dst = PyBytes_AS_STRING(out);
    for (Py_ssize_t r = 0; r < n; r++) {
        const char *rec = (const char *)raw.buf + (Py_ssize_t)size * r;
        uint64_t words[16], bad = 0;
        for (Py_ssize_t i = 0; i < w; i++) {
            if ((uint64_t)(8 * i + 8) <= size) {
                words[i] = le64_at(rec + 8 * i);
            } else {
                char pad[8] = {0};
                memcpy(pad, rec + 8 * i, (size_t)(size - 8 * (uint64_t)i));
                words[i] = le64_at(pad);
            }
            bad |= words[i] & m[i];
        }
        if (bad) {
            Py_CLEAR(out);
            out = Py_NewRef(Py_None);
            goto done;
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            le64_put(dst + 8 * (n * j + r), words[picks[j]] & ands[j]);
        }
    }
done:
    PyBuffer_Release(&raw);
    PyBuffer_Release(&mask);
    return out;
}

PyDoc_STRVAR(strided_rows_doc,
             "strided_rows(span, offset, stride, n, size, /)\n--\n\n"
             "The n rows span[offset + i * stride : offset + i * stride + size] joined (bytes);\n"
             "ValueError when the last row does not fit span.");

static PyObject *strided_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b;
    PyObject *out = NULL;
    uint64_t offset, stride, n, size;
    (void)self;
    if (check_nargs("strided_rows", nargs, 5) < 0 || get_u64(args[1], "offset", &offset) < 0 ||
        get_u64(args[2], "stride", &stride) < 0 || get_u64(args[3], "n", &n) < 0 ||
        get_u64(args[4], "size", &size) < 0 || PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (n == 0 || n > (uint64_t)PY_SSIZE_T_MAX / (size ? size : 1) || stride > (uint64_t)PY_SSIZE_T_MAX / n ||
        offset > (uint64_t)b.len || (n - 1) * stride + size > (uint64_t)b.len - offset) {
        PyErr_SetString(PyExc_ValueError, "strided_rows: the rows do not fit the span");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * size));
    if (out == NULL) {
        goto done;
    }
    for (uint64_t i = 0; i < n; i++) {
        memcpy(PyBytes_AS_STRING(out) + i * size, (const char *)b.buf + offset + i * stride, (size_t)size);
    }
done:
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(dram_scatter_rows_doc,
             "dram_scatter_rows(pages, spa, stride, rows, size, /)\n--\n\n"
             "Store the len(rows) // size rows of size bytes of `rows` at spa + i * stride in the page\n"
             "store `pages` (dict PFN -> bytearray of 4096 bytes; an absent page is created, zeroed),\n"
             "the bytes between rows left as they are: dram_scatter of each row.  Only for rows that\n"
             "cannot cross a page (stride divides 4096, spa is a multiple of it, 0 < size <= stride):\n"
             "ValueError otherwise, before anything is stored.");

static PyObject *dram_scatter_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer rows;
    PyObject *pages, *page = NULL;
    uint64_t spa, stride, size, last_pfn = UINT64_MAX;
    (void)self;
    if (check_nargs("dram_scatter_rows", nargs, 5) < 0 || get_u64(args[1], "spa", &spa) < 0 ||
        get_u64(args[2], "stride", &stride) < 0 || get_u64(args[4], "size", &size) < 0) {
        return NULL;
    }
    pages = args[0];
    if (!PyDict_CheckExact(pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict");
        return NULL;
    }
    if (size == 0 || size > stride || stride > PAGE || PAGE % stride || spa % stride) {
        PyErr_SetString(PyExc_ValueError, "dram_scatter_rows: rows that may cross a page");
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &rows, PyBUF_C_CONTIGUOUS) < 0) {
        return NULL;
    }
    if (rows.len % (Py_ssize_t)size || (uint64_t)(rows.len / (Py_ssize_t)size) > (UINT64_MAX - spa) / stride) {
        PyErr_SetString(PyExc_ValueError, "dram_scatter_rows: rows is not whole rows, or they pass the top of memory");
        PyBuffer_Release(&rows);
        return NULL;
    }
    for (Py_ssize_t i = 0, n = rows.len / (Py_ssize_t)size; i < n; i++) {
        uint64_t addr = spa + (uint64_t)i * stride;
        if (addr >> 12 != last_pfn) { /* (the rows of one page share its lookup) */
            page = page_of(pages, addr >> 12);
            if (page == NULL && PyErr_Occurred()) {
                goto fail;
            }
            if (page == NULL) {
                PyObject *key;
                int rc;
                page = PyByteArray_FromStringAndSize(NULL, PAGE);
                if (page == NULL) {
                    goto fail;
                }
                memset(PyByteArray_AS_STRING(page), 0, PAGE);
                key = PyLong_FromUnsignedLongLong(addr >> 12);
                rc = key == NULL ? -1 : PyDict_SetItem(pages, key, page);
                Py_XDECREF(key);
                Py_DECREF(page); /* the dict holds it now (or it is gone on failure) */
                if (rc < 0) {
                    goto fail;
                }
            }
            last_pfn = addr >> 12;
        }
        memcpy(PyByteArray_AS_STRING(page) + (addr & (PAGE - 1)), (const char *)rows.buf + i * (Py_ssize_t)size,
               (size_t)size);
    }
    PyBuffer_Release(&rows);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&rows);
    return NULL;
}

PyDoc_STRVAR(dram_page_list_doc,
             "dram_page_list(pages, pfn, count, create, /)\n--\n\n"
             "The pages pfn, pfn + 1, ... (count of them) of the page store `pages` (dict PFN ->\n"
             "bytearray of 4096 bytes) as a list, in order; an absent page is stored first as a new\n"
             "zeroed bytearray when `create`, else the answer is None (nothing stored).");

static PyObject *dram_page_list(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *pages, *out;
    uint64_t pfn, count;
    int create;
    (void)self;
    if (check_nargs("dram_page_list", nargs, 4) < 0 || get_u64(args[1], "pfn", &pfn) < 0 ||
        get_u64(args[2], "count", &count) < 0) {
        return NULL;
    }
    pages = args[0];
    if (!PyDict_CheckExact(pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict");
        return NULL;
    }
    if ((create = PyObject_IsTrue(args[3])) < 0) {
        return NULL;
    }
    if (count > (uint64_t)PY_SSIZE_T_MAX / sizeof(PyObject *) || pfn > UINT64_MAX - count) {
        PyErr_SetString(PyExc_ValueError, "dram_page_list: too many pages");
        return NULL;
    }
    out = PyList_New((Py_ssize_t)count);
    if (out == NULL) {
        return NULL;
    }
    for (uint64_t i = 0; i < count; i++) {
        PyObject *page = page_of(pages, pfn + i);
        if (page == NULL && PyErr_Occurred()) {
            goto fail;
        }
        if (page == NULL) {
            PyObject *key;
            int rc;
            if (!create) {
                Py_DECREF(out);
                Py_RETURN_NONE;
            }
            page = PyByteArray_FromStringAndSize(NULL, PAGE);
            if (page == NULL) {
                goto fail;
            }
            memset(PyByteArray_AS_STRING(page), 0, PAGE);
            key = PyLong_FromUnsignedLongLong(pfn + i);
            rc = key == NULL ? -1 : PyDict_SetItem(pages, key, page);
            Py_XDECREF(key);
            if (rc < 0) {
                Py_DECREF(page);
                goto fail;
            }
            PyList_SET_ITEM(out, (Py_ssize_t)i, page); /* (the list's reference; the dict holds its own) */
            continue;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, Py_NewRef(page));
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(u64_dict_get_doc,
             "u64_dict_get(mapping, keys, shift, /)\n--\n\n"
             "mapping.get(k >> shift, -1) for each little-endian u64 k of `keys` (mapping: a dict of\n"
             "int -> int), as little-endian int64 values back to back (bytes); TypeError for a value\n"
             "that is not an int, OverflowError for one outside int64.");

static PyObject *u64_dict_get(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b;
    PyObject *mapping, *out = NULL;
    uint64_t shift;
    (void)self;
    if (check_nargs("u64_dict_get", nargs, 3) < 0 || get_u64(args[2], "shift", &shift) < 0) {
        return NULL;
    }
    mapping = args[0];
    if (!PyDict_CheckExact(mapping)) {
        PyErr_SetString(PyExc_TypeError, "mapping must be a dict");
        return NULL;
    }
    if (shift > 63) {
        PyErr_SetString(PyExc_ValueError, "shift must be in 0..63");
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (b.len % 8) {
        PyErr_Format(PyExc_ValueError, "u64_dict_get needs a column of u64 (got %zd bytes)", b.len);
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, b.len);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < b.len / 8; i++) {
        PyObject *key = PyLong_FromUnsignedLongLong(le64_at((const char *)b.buf + 8 * i) >> shift);
        PyObject *value;
        long long v = -1;
        if (key == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        value = PyDict_GetItemWithError(mapping, key);
        Py_DECREF(key);
        if (value == NULL && PyErr_Occurred()) {
            Py_CLEAR(out);
            goto done;
        }
        if (value != NULL) {
            if (!PyLong_Check(value)) {
                PyErr_SetString(PyExc_TypeError, "u64_dict_get: a value is not an int");
                Py_CLEAR(out);
                goto done;
            }
            v = PyLong_AsLongLong(value);
            if (v == -1 && PyErr_Occurred()) {
                Py_CLEAR(out);
                goto done;
            }
        }
        le64_put(PyBytes_AS_STRING(out) + 8 * i, (uint64_t)v);
    }
done:
    PyBuffer_Release(&b);
    return out;
}

PyDoc_STRVAR(key_run_doc,
             "key_run(raw, mask, /)\n--\n\n"
             "raw: 16-byte entries (two little-endian u64 words each, at least one); how many of\n"
             "them, from the first on, have (word0 & mask) equal to the first entry's.");

static PyObject *key_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b;
    uint64_t mask;
    Py_ssize_t n, i = 1;
    (void)self;
    if (check_nargs("key_run", nargs, 2) < 0 || get_u64(args[1], "mask", &mask) < 0 ||
        PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (b.len == 0 || b.len % 16) {
        PyBuffer_Release(&b);
        PyErr_Format(PyExc_ValueError, "key_run needs whole 16-byte entries (got %zd bytes)", b.len);
        return NULL;
    }
    n = b.len / 16;
    const char *p = (const char *)b.buf;
    uint64_t key = le64_at(p) & mask;
    while (i < n && (le64_at(p + 16 * i) & mask) == key) {
        i++;
    }
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(i);
}

static PyMethodDef methods[] = {
    {"dram_gather", (PyCFunction)(void (*)(void))dram_gather, METH_FASTCALL, dram_gather_doc},
    {"cache_page_plan", (PyCFunction)(void (*)(void))cache_page_plan, METH_FASTCALL, cache_page_plan_doc},
    {"cache_page_install", (PyCFunction)(void (*)(void))cache_page_install, METH_FASTCALL, cache_page_install_doc},
    {"dram_scatter", (PyCFunction)(void (*)(void))dram_scatter, METH_FASTCALL, dram_scatter_doc},
    {"cache_take", (PyCFunction)(void (*)(void))cache_take, METH_FASTCALL, cache_take_doc},
    {"line_runs", (PyCFunction)(void (*)(void))line_runs, METH_FASTCALL, line_runs_doc},
    {"resident_keys", (PyCFunction)(void (*)(void))resident_keys, METH_FASTCALL, resident_keys_doc},
    {"rmp_governing", (PyCFunction)(void (*)(void))rmp_governing, METH_FASTCALL, rmp_governing_doc},
    {"cache_hit_read", (PyCFunction)(void (*)(void))cache_hit_read, METH_FASTCALL, cache_hit_read_doc},
    {"cache_hit_write", (PyCFunction)(void (*)(void))cache_hit_write, METH_FASTCALL, cache_hit_write_doc},
    {"cache_hit_runs", (PyCFunction)(void (*)(void))cache_hit_runs, METH_FASTCALL, cache_hit_runs_doc},
    {"cache_hit_write_runs", (PyCFunction)(void (*)(void))cache_hit_write_runs, METH_FASTCALL,
     cache_hit_write_runs_doc},
    {"slot_sync", (PyCFunction)(void (*)(void))slot_sync, METH_FASTCALL, slot_sync_doc},
    {"copy_changed", (PyCFunction)(void (*)(void))copy_changed, METH_FASTCALL, copy_changed_doc},
    {"u64_columns", (PyCFunction)(void (*)(void))u64_columns, METH_FASTCALL, u64_columns_doc},
    {"u64_runs", (PyCFunction)(void (*)(void))u64_runs, METH_FASTCALL, u64_runs_doc},
    {"record_words", (PyCFunction)(void (*)(void))record_words, METH_FASTCALL, record_words_doc},
    {"strided_rows", (PyCFunction)(void (*)(void))strided_rows, METH_FASTCALL, strided_rows_doc},
    {"key_run", (PyCFunction)(void (*)(void))key_run, METH_FASTCALL, key_run_doc},
    {"u64_dict_get", (PyCFunction)(void (*)(void))u64_dict_get, METH_FASTCALL, u64_dict_get_doc},
    {"dram_page_list", (PyCFunction)(void (*)(void))dram_page_list, METH_FASTCALL, dram_page_list_doc},
    {"dram_scatter_rows", (PyCFunction)(void (*)(void))dram_scatter_rows, METH_FASTCALL, dram_scatter_rows_doc},
    {"pool_sync_all", (PyCFunction)(void (*)(void))pool_sync_all, METH_FASTCALL,
     "pool_sync_all(pool, cache_dict, write_back) -> int: PagePool.sync_all (csrc/mem_accel.c)."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m)
{
    if ((s_hits = PyUnicode_InternFromString("hits")) == NULL ||
        (s_misses = PyUnicode_InternFromString("misses")) == NULL ||
        (s_writebacks = PyUnicode_InternFromString("writebacks")) == NULL ||
        (s_walk = PyUnicode_InternFromString("_walk")) == NULL || (s_load = PyUnicode_InternFromString("_load")) == NULL ||
        (s_store = PyUnicode_InternFromString("_store")) == NULL) {
        return -1;
    }
    if (PyType_Ready(&PortType) < 0) {
        return -1;
    }
    Py_INCREF(&PortType);
    if (PyModule_AddObject(m, "Port", (PyObject *)&PortType) < 0) {
        Py_DECREF(&PortType);
        return -1;
    }
    if (host_port_init_module(m) < 0) {
        return -1;
    }
    if (PyType_Ready(&LineCipherType) < 0) {
        return -1;
    }
    Py_INCREF(&LineCipherType);
    if (PyModule_AddObject(m, "LineCipher", (PyObject *)&LineCipherType) < 0) {
        Py_DECREF(&LineCipherType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED}, /* a static type (Port) */
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sevemu.hw._mem_accel",
    "Optional C helpers for the bulk paths of the memory model (csrc/mem_accel.c).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__mem_accel(void)
{
    return PyModuleDef_Init(&module);
}
