/*
 * sevemu.crypto._memenc_accel: optional C helpers for the memory-encryption engine
 * (src/sevemu/crypto/memenc.py): the work around the AES that would otherwise take several numpy
 * passes per chunk, and (on VAES) the AES itself:
 *
 *   xor_addr_tweak(dst, src, spa, consts)     XE/XEX: dst = src ^ T(spa + 16k) for each block k
 *   xts_xor(dst, src, tweaks, blocks)         XTS: dst = src ^ E_K2(n) * alpha^j per block j of unit n
 *   xts_sequence(out, first)                  XTS: the 128-bit little-endian numbers first, first+1, ...
 *   xor_bytes(a, b[, c]) -> bytes             the single-line path: a ^ b (^ c)
 *   xor_bytearray(a, b[, c]) -> bytearray     the same, as a new bytearray (cache fills)
 *   crypt_pages(pages, spa, src, consts, key, code, encrypt) -> bool
 *                                             XE/XEX/XTS of src at spa stored into a page store
 *                                             (dict PFN -> 4 KiB bytearray): tweak, AES
 *                                             (OpenSSL's libcrypto) and tweak fused per page in
 *                                             a 4 KiB buffer, written straight into the pages
 *   crypt_from_pages(pages, spa, dst, consts, key, code, encrypt) -> bool
 *                                             the reverse: the pages of a page store (absent ones
 *                                             zeros) transformed into dst, per page in L1
 *   crypt_gather(pages, pfns, dst, consts, key, code, encrypt) -> bool
 *                                             crypt_from_pages of whole pages at a list of PFNs
 *   crypt_scatter(pages, pfns, src, consts, key, code, encrypt) -> bool
 *                                             crypt_pages of whole pages into a list of PFNs
 *   crypt_into(dst, spa, src, consts, key, code, encrypt) -> bool
 *                                             the same between two buffers (memenc's bulk path)
 *   crypt_into_via(dst, spa, src, consts, key, code, encrypt, update, tweak_update, chunk) -> bool
 *                                             crypt_into with the AES through `cryptography` (an
 *                                             AES-XTS context whose masks are zero: VAES where its
 *                                             OpenSSL has it), per chunk (memenc's large transfers)
 *   vector_isa(level=None) -> str             the fused passes' instruction set (see xor_run)
 *   aes_engine(name=None) -> str              the AES engine: 'vaes' / 'vaes256' (one pass on VAES
 *                                             with AVX-512 / AVX2, see xts_vaes_run) or 'openssl'
 *   crypt_pages_in_place(pages, spa, length, consts, key, code, encrypt) -> bytes | None
 *                                             length bytes of a page store transformed in place,
 *                                             the bytes before returned (copied per group of pages
 *                                             just before they are transformed, in one pass)
 *   sha256_new() / sha256_copy(ctx) / sha256_update(ctx, data) / sha256_digest(ctx)
 *                                             a SHA-256 context (OpenSSL's EVP) in a capsule: the
 *                                             SEV launch digest (src/sevemu/crypto/sha256.py)
 *   measure_pages_in_place(pages, spa, length, consts, key, code, ctx)
 *                                             length bytes of a page store hashed into ctx, then
 *                                             encrypted in place, per group of pages in one pass
 *
 * The crypt_* functions run the AES through OpenSSL's libcrypto themselves (one pass over the data
 * instead of three, see xex_pages_run), except crypt_into_via, which calls the update_into of
 * `cryptography` contexts it is given, and where the CPU has VAES with AVX-512: there the
 * rounds are the CPU's AES instructions in this file (the memory controller's engine, checked by a
 * known-answer test before first use; aes_engine); elsewhere the AES stays in `cryptography`.  Portable C99
 * apart from SSE2 intrinsics where the compiler has them (non-temporal stores, the fused passes'
 * XORs) and the fused passes' AVX2 / AVX-512 variants (GCC/Clang target attributes, used only when
 * the CPU has them: see xor_run; vector_isa() reports and forces the level), unaligned accesses
 * through memcpy, little-endian decoding spelled out for the GF(2^128) arithmetic.  Buffers come through the buffer protocol (C-contiguous); every
 * length is checked here (ValueError), although memenc validates its arguments first.  dst may be
 * src itself (each block is read before it is written); other overlaps are not supported.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyargs.h"

#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16
#define PAGE_SHIFT 12
#define PAGE_BLOCKS ((1 << PAGE_SHIFT) / BLOCK)
#define MAX_BITS 63
#define MAX_UNIT_BLOCKS (1L << 24)

/* A read-prefetch hint this far ahead of the source (where the compiler has one: GCC, Clang), for
 * passes that copy (dst != src): in memenc those read a chunk fresh from DRAM, and the hint keeps
 * more of it in flight.  In-place passes work on what AES has just written, in cache, where the
 * hints only cost.  Pointers are formed only inside the buffer. */
#define PREFETCH_AHEAD 4096
#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)0)
#endif

#if defined(__GNUC__)
#define ALIGNED64 __attribute__((aligned(64)))
#else
#define ALIGNED64
#endif

static uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void store64(unsigned char *p, uint64_t v)
{
    memcpy(p, &v, sizeof v);
}

/* Little-endian 64-bit load/store for the GF(2^128) arithmetic, whatever the host's byte order
 * (the test folds to a constant: plain loads and stores on little-endian machines). */
static int host_is_little_endian(void)
{
    const uint16_t one = 1;
    unsigned char first;
    memcpy(&first, &one, 1);
    return first == 1;
}

static uint64_t byte_swap64(uint64_t v)
{
    v = (v & 0x00FF00FF00FF00FFu) << 8 | (v >> 8 & 0x00FF00FF00FF00FFu);
    v = (v & 0x0000FFFF0000FFFFu) << 16 | (v >> 16 & 0x0000FFFF0000FFFFu);
    return v << 32 | v >> 32;
}

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v = load64(p);
    return host_is_little_endian() ? v : byte_swap64(v);
}

static void store_le64(unsigned char *p, uint64_t v)
{
    store64(p, host_is_little_endian() ? v : byte_swap64(v));
}

/* ---- argument helpers -------------------------------------------------------------------- */

static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi)
{
    if (nargs < lo || nargs > hi) {
        if (lo == hi) {
            PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", name, lo, nargs);
        } else {
            PyErr_Format(PyExc_TypeError, "%s() takes %zd to %zd positional arguments (%zd given)", name, lo,
                         hi, nargs);
        }
        return -1;
    }
    return 0;
}

/* Acquire n buffers; the first `writable` of them must be writable.  On failure releases what was
 * acquired and returns -1. */
static int get_buffers(PyObject *const *args, Py_buffer *views, int n, int writable)
{
    int i;
    for (i = 0; i < n; i++) {
        int flags = i < writable ? PyBUF_WRITABLE : PyBUF_SIMPLE;
        if (PyObject_GetBuffer(args[i], &views[i], flags) < 0) {
            while (--i >= 0) {
                PyBuffer_Release(&views[i]);
            }
            return -1;
        }
    }
    return 0;
}

static void release_buffers(Py_buffer *views, int n)
{
    int i;
    for (i = 0; i < n; i++) {
        PyBuffer_Release(&views[i]);
    }
}

/* ---- XE/XEX: the address tweak ------------------------------------------------------------ */

/* T(page base): the XOR of the constants over the address bits >= 12. */
static void page_tweak(uint64_t page_spa, const unsigned char *consts, int nbits, uint64_t t[2])
{
    int i;
    t[0] = t[1] = 0;
    for (i = PAGE_SHIFT; i < nbits; i++) {
        if ((page_spa >> i) & 1) {
            t[0] ^= load64(consts + BLOCK * i);
            t[1] ^= load64(consts + BLOCK * i + 8);
        }
    }
}

/* T(next) from T(page) (both page bases): T is linear in the address bits, so only the constants
 * of the bits that differ change it (on average two per page step, against a test of every bit). */
static void page_tweak_step(uint64_t page, uint64_t next, const unsigned char *consts, int nbits, uint64_t t[2])
{
    uint64_t diff = (page ^ next) >> PAGE_SHIFT;
    int i;
    for (i = PAGE_SHIFT; diff != 0 && i < nbits; i++, diff >>= 1) {
        if (diff & 1) {
            t[0] ^= load64(consts + BLOCK * i);
            t[1] ^= load64(consts + BLOCK * i + 8);
        }
    }
}

/* in_page[b] = XOR of t_(4+j) over the set bits j of b (bits 4..11 of the address): the entries
 * [2^j, 2^(j+1)) are those below 2^j with t_(4+j) added. */
static void in_page_table(const unsigned char *consts, uint64_t in_page[PAGE_BLOCKS][2])
{
    int b, j;
    in_page[0][0] = in_page[0][1] = 0;
    for (j = 0; (1 << j) < PAGE_BLOCKS; j++) {
        uint64_t t_lo = load64(consts + BLOCK * (4 + j));
        uint64_t t_hi = load64(consts + BLOCK * (4 + j) + 8);
        for (b = 0; b < (1 << j); b++) {
            in_page[(1 << j) + b][0] = in_page[b][0] ^ t_lo;
            in_page[(1 << j) + b][1] = in_page[b][1] ^ t_hi;
        }
    }
}

/* T(spa + 16k) = in_page[block in page] ^ T(page base), both XORs of the constants t_i (16 bytes
 * each, t_i for address bit i) over the set bits of the address. */
static void addr_tweak_xor(unsigned char *dst, const unsigned char *src, Py_ssize_t len, uint64_t spa,
                           const unsigned char *consts, int nbits)
{
    uint64_t in_page[PAGE_BLOCKS][2];
    int prefetch = dst != src;

    in_page_table(consts, in_page);
    while (len > 0) {
        uint64_t t[2], page_lo, page_hi;
        Py_ssize_t first = (Py_ssize_t)((spa >> 4) & (PAGE_BLOCKS - 1));
        Py_ssize_t count = PAGE_BLOCKS - first;
        Py_ssize_t k;
        if (count > len / BLOCK) {
            count = len / BLOCK;
        }
        page_tweak(spa, consts, nbits, t);
        page_lo = t[0];
        page_hi = t[1];
        for (k = 0; k < count; k++) {
            const unsigned char *s = src + BLOCK * k;
            unsigned char *d = dst + BLOCK * k;
            if (prefetch && (k & 3) == 0 && BLOCK * k + PREFETCH_AHEAD < len) {
                PREFETCH(s + PREFETCH_AHEAD);
            }
            uint64_t lo = load64(s) ^ in_page[first + k][0] ^ page_lo;
            uint64_t hi = load64(s + 8) ^ in_page[first + k][1] ^ page_hi;
            store64(d, lo);
            store64(d + 8, hi);
        }
        src += BLOCK * count;
        dst += BLOCK * count;
        len -= BLOCK * count;
        spa += (uint64_t)(BLOCK * count);
    }
}

PyDoc_STRVAR(xor_addr_tweak_doc,
             "xor_addr_tweak(dst, src, spa, consts, /)\n--\n\n"
             "dst = src ^ T(spa + 16k) for every 16-byte block k, where T(p) is the XOR of the\n"
             "16-byte constants consts[16i:16i+16] over the set bits i >= 4 of p.  len(consts) is\n"
             "16 * pa_bits (12..63); spa is 16-aligned and spa + len(src) <= 2**pa_bits; dst has\n"
             "len(src) bytes and may be src.");

static PyObject *xor_addr_tweak(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer v[3]; /* dst, src, consts */
    PyObject *bufs[3];
    uint64_t spa;
    Py_ssize_t nbits;
    (void)self;

    if (check_nargs("xor_addr_tweak", nargs, 4, 4) < 0 || get_u64(args[2], "spa", &spa) < 0) {
        return NULL;
    }
    bufs[0] = args[0];
    bufs[1] = args[1];
    bufs[2] = args[3];
    if (get_buffers(bufs, v, 3, 1) < 0) {
        return NULL;
    }
    nbits = v[2].len / BLOCK;
    if (v[0].len != v[1].len || v[1].len % BLOCK) {
        PyErr_Format(PyExc_ValueError, "dst (%zd bytes) and src (%zd bytes) must be the same whole number "
                     "of 16-byte blocks", v[0].len, v[1].len);
    } else if (v[2].len % BLOCK || nbits < PAGE_SHIFT || nbits > MAX_BITS) {
        PyErr_Format(PyExc_ValueError, "consts must be 16 * pa_bits bytes with 12 <= pa_bits <= 63, not %zd",
                     v[2].len);
    } else if (spa % BLOCK) {
        PyErr_SetString(PyExc_ValueError, "spa must be a multiple of 16");
    } else if (spa >> nbits || (uint64_t)v[1].len > ((uint64_t)1 << nbits) - spa) {
        PyErr_Format(PyExc_ValueError, "the span is outside the %zd-bit address space", nbits);
    } else {
        unsigned char *dst = (unsigned char *)v[0].buf;
        const unsigned char *src = (const unsigned char *)v[1].buf;
        const unsigned char *consts = (const unsigned char *)v[2].buf;
        Py_ssize_t len = v[1].len;
        Py_BEGIN_ALLOW_THREADS
        addr_tweak_xor(dst, src, len, spa, consts, (int)nbits);
        Py_END_ALLOW_THREADS
        release_buffers(v, 3);
        Py_RETURN_NONE;
    }
    release_buffers(v, 3);
    return NULL;
}

/* ---- XTS ---------------------------------------------------------------------------------- */

/* dst = src ^ t for one 16-byte block, t = hi:lo little-endian. */
static void xor_block_le(unsigned char *dst, const unsigned char *src, uint64_t lo, uint64_t hi)
{
    uint64_t a = load_le64(src) ^ lo;
    uint64_t b = load_le64(src + 8) ^ hi;
    store_le64(dst, a);
    store_le64(dst + 8, b);
}

/* The GF(2^128) reduction of the bits that x * alpha^j (j <= 3) shifts out of the top: for those
 * bits h (h < 8), the carry-less product h * 0x87. */
static const uint64_t gf_reduce[8] = {0x000, 0x087, 0x10e, 0x189, 0x21c, 0x29b, 0x312, 0x395};

static void xts_xor_units(unsigned char *dst, const unsigned char *src, const unsigned char *tweaks,
                          Py_ssize_t units, Py_ssize_t unit_blocks)
{
    Py_ssize_t u, j;
    Py_ssize_t left = BLOCK * unit_blocks * units; /* bytes from src to the end */
    int prefetch = dst != src;
    for (u = 0; u < units; u++) {
        /* The tweak as a little-endian 128-bit integer (IEEE 1619 byte order): hi:lo. */
        uint64_t lo = load_le64(tweaks + BLOCK * u);
        uint64_t hi = load_le64(tweaks + BLOCK * u + 8);
        for (j = 0; j + 4 <= unit_blocks; j += 4) {
            if (prefetch && PREFETCH_AHEAD < left) {
                PREFETCH(src + PREFETCH_AHEAD);
            }
            /* Four blocks at a time: t * alpha^k = (t << k) ^ reduction of the k bits shifted out,
             * each computed from t directly (no chain from one to the next). */
            xor_block_le(dst, src, lo, hi);
            xor_block_le(dst + BLOCK, src + BLOCK, lo << 1 ^ gf_reduce[hi >> 63], hi << 1 | lo >> 63);
            xor_block_le(dst + 2 * BLOCK, src + 2 * BLOCK, lo << 2 ^ gf_reduce[hi >> 62], hi << 2 | lo >> 62);
            xor_block_le(dst + 3 * BLOCK, src + 3 * BLOCK, lo << 3 ^ gf_reduce[hi >> 61], hi << 3 | lo >> 61);
            if (j + 4 < unit_blocks) { /* t * alpha^4 for the next four (never for a cache line) */
                uint64_t top = hi >> 60;
                hi = hi << 4 | lo >> 60;
                lo = lo << 4 ^ gf_reduce[top & 7] ^ (top >> 3) * ((uint64_t)0x87 << 3);
            }
            src += 4 * BLOCK;
            dst += 4 * BLOCK;
            left -= 4 * BLOCK;
        }
        for (; j < unit_blocks; j++) {
            uint64_t carry = hi >> 63;
            xor_block_le(dst, src, lo, hi);
            hi = hi << 1 | lo >> 63;
            lo = lo << 1 ^ gf_reduce[carry];
            src += BLOCK;
            dst += BLOCK;
            left -= BLOCK;
        }
    }
}

PyDoc_STRVAR(xts_xor_doc,
             "xts_xor(dst, src, tweaks, unit_blocks, /)\n--\n\n"
             "XTS masking: tweaks holds one 16-byte encrypted tweak E_K2(n) per data unit of\n"
             "unit_blocks 16-byte blocks; block j of unit u becomes src ^ E_K2(n_u) * alpha^j in\n"
             "GF(2^128) (IEEE 1619, little-endian).  dst has len(src) bytes and may be src.");

static PyObject *xts_xor(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer v[3]; /* dst, src, tweaks */
    Py_ssize_t unit_blocks, units;
    (void)self;

    if (check_nargs("xts_xor", nargs, 4, 4) < 0) {
        return NULL;
    }
    unit_blocks = PyLong_AsSsize_t(args[3]);
    if (unit_blocks == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (unit_blocks < 1 || unit_blocks > MAX_UNIT_BLOCKS) {
        PyErr_SetString(PyExc_ValueError, "unit_blocks must be in 1..2**24");
        return NULL;
    }
    if (get_buffers(args, v, 3, 1) < 0) {
        return NULL;
    }
    units = v[2].len / BLOCK;
    if (v[2].len % BLOCK) {
        PyErr_Format(PyExc_ValueError, "tweaks must be a whole number of 16-byte blocks, not %zd bytes",
                     v[2].len);
    } else if (v[0].len != v[1].len || v[1].len % (BLOCK * unit_blocks) ||
               v[1].len / (BLOCK * unit_blocks) != units) {
        PyErr_Format(PyExc_ValueError, "dst (%zd bytes) and src (%zd bytes) must both be %zd units of %zd "
                     "blocks", v[0].len, v[1].len, units, unit_blocks);
    } else {
        unsigned char *dst = (unsigned char *)v[0].buf;
        const unsigned char *src = (const unsigned char *)v[1].buf;
        const unsigned char *tweaks = (const unsigned char *)v[2].buf;
        Py_BEGIN_ALLOW_THREADS
        xts_xor_units(dst, src, tweaks, units, unit_blocks);
        Py_END_ALLOW_THREADS
        release_buffers(v, 3);
        Py_RETURN_NONE;
    }
    release_buffers(v, 3);
    return NULL;
}

PyDoc_STRVAR(xts_sequence_doc,
             "xts_sequence(out, first, /)\n--\n\n"
             "Fill out (a whole number of 16-byte blocks) with the 128-bit little-endian integers\n"
             "first, first + 1, ... (the XTS data-unit sequence numbers); first < 2**64.");

static PyObject *xts_sequence(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer v;
    uint64_t first;
    Py_ssize_t i, count;
    unsigned char *out;
    (void)self;

    if (check_nargs("xts_sequence", nargs, 2, 2) < 0 || get_u64(args[1], "first", &first) < 0) {
        return NULL;
    }
    if (get_buffers(args, &v, 1, 1) < 0) {
        return NULL;
    }
    if (v.len % BLOCK) {
        PyErr_Format(PyExc_ValueError, "out must be a whole number of 16-byte blocks, not %zd bytes", v.len);
        PyBuffer_Release(&v);
        return NULL;
    }
    count = v.len / BLOCK;
    out = (unsigned char *)v.buf;
    for (i = 0; i < count; i++) {
        uint64_t lo = first + (uint64_t)i;
        store_le64(out + BLOCK * i, lo);
        store_le64(out + BLOCK * i + 8, lo < first ? 1 : 0);
    }
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* ---- the single-line path ----------------------------------------------------------------- */

PyDoc_STRVAR(xor_bytes_doc,
             "xor_bytes(a, b, c=None, /)\n--\n\n"
             "a ^ b (^ c) as bytes; the buffers must have the same length.");

PyDoc_STRVAR(xor_bytearray_doc,
             "xor_bytearray(a, b, c=None, /)\n--\n\n"
             "a ^ b (^ c) as a new bytearray (a cache line the caller will own and modify).");

static PyObject *xor_common(const char *name, PyObject *const *args, Py_ssize_t nargs, int as_bytearray)
{
    Py_buffer v[3];
    int n;
    Py_ssize_t len, i;
    PyObject *result = NULL;

    if (check_nargs(name, nargs, 2, 3) < 0) {
        return NULL;
    }
    n = (nargs == 3 && args[2] != Py_None) ? 3 : 2;
    if (get_buffers(args, v, n, 0) < 0) {
        return NULL;
    }
    len = v[0].len;
    if (v[1].len != len || (n == 3 && v[2].len != len)) {
        PyErr_Format(PyExc_ValueError, "%s: the buffers must have the same length", name);
    } else if ((result = as_bytearray ? PyByteArray_FromStringAndSize(NULL, len)
                                      : PyBytes_FromStringAndSize(NULL, len)) != NULL) {
        unsigned char *d = (unsigned char *)(as_bytearray ? PyByteArray_AS_STRING(result)
                                                          : PyBytes_AS_STRING(result));
        const unsigned char *a = (const unsigned char *)v[0].buf;
        const unsigned char *b = (const unsigned char *)v[1].buf;
        const unsigned char *c = n == 3 ? (const unsigned char *)v[2].buf : NULL;
        for (i = 0; i + 8 <= len; i += 8) {
            uint64_t x = load64(a + i) ^ load64(b + i);
            if (c) {
                x ^= load64(c + i);
            }
            store64(d + i, x);
        }
        for (; i < len; i++) {
            d[i] = (unsigned char)(a[i] ^ b[i] ^ (c ? c[i] : 0));
        }
    }
    release_buffers(v, n);
    return result;
}

static PyObject *xor_bytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return xor_common("xor_bytes", args, nargs, 0);
}

static PyObject *xor_bytearray(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return xor_common("xor_bytearray", args, nargs, 1);
}


/* ---- XE/XEX/XTS straight into a page store ------------------------------------------------- */

/* The bulk write of a large transfer (the memory controller's write to DRAM's page store, e.g.
 * LAUNCH_UPDATE_DATA's in-place encryption) in one pass: for each page's part of src, the tweak
 * XOR into a 4 KiB buffer that stays in L1, AES-ECB in place there (OpenSSL), and the second
 * tweak XOR on the way into the page itself -- instead of an XOR pass, an AES pass and an XOR pass
 * over the whole chunk and a scatter into the pages after them.  The same bytes as
 * xor_addr_tweak + AES + xor_addr_tweak followed by dram_scatter(pages, spa, out, True) (tested).
 *
 * With the GIL held, every page of the range is looked up (absent ones are created, zero-filled,
 * and dropped again at the end if they are still all zeros: dram_scatter's skip_zero), and each
 * page's buffer is acquired (a bytearray with an export cannot be resized or freed); then the GIL
 * is released while the data is encrypted, so another thread (the PSP's SHA engine) runs meanwhile. */

#define XP_PAGE 4096
#define DIGEST384 48

typedef struct {
    PyObject *obj;
    Py_buffer view;
    int created;
} PageRef;

/* dst = src ^ T for `blocks` 16-byte blocks, T = inp[k] ^ t for block k (inp: the in-page tweaks
 * from the first block, two words each).  Separate buffers (restrict): the compiler makes one
 * 16-byte vector operation of each block. */
static void xor_tweak_run(unsigned char *restrict dst, const unsigned char *restrict src,
                          const uint64_t *restrict inp, uint64_t t0, uint64_t t1, Py_ssize_t blocks)
{
    Py_ssize_t k;
    for (k = 0; k < blocks; k++) {
        store64(dst + BLOCK * k, load64(src + BLOCK * k) ^ inp[2 * k] ^ t0);
        store64(dst + BLOCK * k + 8, load64(src + BLOCK * k + 8) ^ inp[2 * k + 1] ^ t1);
    }
}

/* The same into memory that will not be read again soon (a DRAM page the transfer is done with):
 * on x86-64, 16-byte non-temporal stores when dst is 16-aligned, which skip reading the
 * destination's old lines into the cache first (measured: 10% off a 64 MiB LAUNCH_UPDATE_DATA). */
#if defined(__SSE2__) && defined(__GNUC__)
#include <emmintrin.h>
static void xor_tweak_stream(unsigned char *restrict dst, const unsigned char *restrict src,
                             const uint64_t *restrict inp, uint64_t t0, uint64_t t1, Py_ssize_t blocks)
{
    Py_ssize_t k;
    __m128i t = _mm_set_epi64x((long long)t1, (long long)t0);
    if ((uintptr_t)dst & 15) {
        xor_tweak_run(dst, src, inp, t0, t1, blocks);
        return;
    }
    for (k = 0; k < blocks; k++) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + BLOCK * k));
        __m128i b = _mm_loadu_si128((const __m128i *)(inp + 2 * k));
        _mm_stream_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, _mm_xor_si128(b, t)));
    }
}
/* xor_tweak_run with one 16-byte vector operation per block, whatever the compiler's cost model
 * decides at -O2 (the fused passes' XORs into and out of their L1 buffer). */
static void xor_tweak_vec(unsigned char *restrict dst, const unsigned char *restrict src,
                          const uint64_t *restrict inp, uint64_t t0, uint64_t t1, Py_ssize_t blocks)
{
    Py_ssize_t k;
    __m128i t = _mm_set_epi64x((long long)t1, (long long)t0);
    for (k = 0; k < blocks; k++) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + BLOCK * k));
        __m128i b = _mm_loadu_si128((const __m128i *)(inp + 2 * k));
        _mm_storeu_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, _mm_xor_si128(b, t)));
    }
}
#define STREAM_FENCE() _mm_sfence()
#else
#define xor_tweak_stream xor_tweak_run
#define xor_tweak_vec xor_tweak_run
#define STREAM_FENCE() ((void)0)
#endif

/* ---- the fused passes' XORs: portable, AVX2 or AVX-512, chosen at run time ----------------------
 *
 * Both passes of a page (input ^ mask into the L1 buffer before the AES, buffer ^ mask into the
 * output after it) are `dst = src ^ m[k] ^ t` over 16-byte blocks k: for XE/XEX m is the in-page
 * tweak table and t the page's tweak; for XTS m is the page's mask (E_K2(n_u) * alpha^j for block
 * j of unit u, computed once per page by xts_page_mask) and t zero.  The AVX2 and AVX-512 variants
 * are compiled for those instruction sets with __attribute__((target)) -- the module itself is
 * built for the baseline x86-64 (no -march) -- and used only when the CPU reports them
 * (__builtin_cpu_supports, GCC/Clang); vector_isa() reports the choice and can force a lower one
 * (the tests compare every level on the same data).  The AES stays OpenSSL's: only the XORs and
 * the GF(2^128) doublings (IEEE 1619-2018, 5.2) are here. */

enum { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char *const isa_names[] = {"portable", "avx2", "avx512"};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#define HAVE_VECTOR_ISA 1
#include <immintrin.h>
/* The VAES engine needs the compiler's VAES / AVX-512 intrinsics (GCC 8, Clang 6 and later). */
#if defined(__clang__) ? __clang_major__ >= 6 : __GNUC__ >= 8
#define HAVE_VAES 1
#endif
#endif

/* The best level this CPU runs; process-wide, like OpenSSL's own capability vector. */
static int isa_supported(void)
{
#ifdef HAVE_VECTOR_ISA
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        return ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2")) {
        return ISA_AVX2;
    }
#endif
    return ISA_PORTABLE;
}

static int isa_level = -1; /* -1: not chosen yet (a benign race: every thread chooses the same) */
static int isa_forced = 0; /* vector_isa(level) was called */

/* The default: AVX2 wherever the CPU has it, AVX-512 only when asked for (vector_isa).  Measured on
 * a Zen 4 EPYC VM (bench memory's 128 MiB, one process alternating the levels, load 1.5-2): ratio to
 * raw AES XEX 0.53 (AVX2) / 0.47-0.48 (AVX-512) / 0.45-0.52 (portable), XE 0.55 / 0.49-0.51 /
 * 0.53-0.54, XTS 0.36-0.38 / 0.36 / 0.34-0.36: with the data coming from DRAM the 64-byte
 * operations bought nothing and cost a little; in L2 AVX-512 was ahead by a few percent. */
static int isa_current(void)
{
    if (isa_level < 0) {
        int best = isa_supported();
        isa_level = best > ISA_AVX2 ? ISA_AVX2 : best;
    }
    return isa_level;
}

/* XTS, portable: the mask of `units` 64-byte units, block j of unit u = tweaks[u] * alpha^j (the
 * GF(2^128) doublings of IEEE 1619, little-endian, each from the tweak directly). */
static void xts_mask_portable(unsigned char *restrict mask, const unsigned char *restrict tweaks, Py_ssize_t units)
{
    Py_ssize_t u;
    int j;
    for (u = 0; u < units; u++) {
        uint64_t lo = load_le64(tweaks + BLOCK * u);
        uint64_t hi = load_le64(tweaks + BLOCK * u + 8);
        store_le64(mask + 64 * u, lo);
        store_le64(mask + 64 * u + 8, hi);
        for (j = 1; j < 4; j++) {
            store_le64(mask + 64 * u + BLOCK * j, lo << j ^ gf_reduce[hi >> (64 - j)]);
            store_le64(mask + 64 * u + BLOCK * j + 8, hi << j | lo >> (64 - j));
        }
    }
}

#ifdef HAVE_VECTOR_ISA
/* AVX2: two blocks of a unit per 256-bit register, the tweak in both halves; per 64-bit lane the
 * shift left by j and the bits shifted out of the other half (a right shift by 64 - j, which is 0
 * for j = 0); the reduction of the bits h shifted out of the top, h * 0x87 carry-less, as
 * h ^ h << 1 ^ h << 2 ^ h << 7 (h < 8). */
__attribute__((target("avx2"))) static void xts_mask_avx2(unsigned char *restrict mask,
                                                          const unsigned char *restrict tweaks, Py_ssize_t units)
{
    const __m256i cnt01 = _mm256_set_epi64x(1, 1, 0, 0), rcnt01 = _mm256_set_epi64x(63, 63, 64, 64);
    const __m256i cnt23 = _mm256_set_epi64x(3, 3, 2, 2), rcnt23 = _mm256_set_epi64x(61, 61, 62, 62);
    Py_ssize_t u;
    for (u = 0; u < units; u++) {
        __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tweaks + BLOCK * u)));
        __m256i sw = _mm256_shuffle_epi32(x, 0x4e); /* hi:lo swapped in each half */
        int half;
        for (half = 0; half < 2; half++) {
            __m256i out = _mm256_sllv_epi64(x, half ? cnt23 : cnt01);
            __m256i car = _mm256_srlv_epi64(sw, half ? rcnt23 : rcnt01);
            __m256i red = _mm256_xor_si256(_mm256_xor_si256(car, _mm256_slli_epi64(car, 1)),
                                           _mm256_xor_si256(_mm256_slli_epi64(car, 2), _mm256_slli_epi64(car, 7)));
            /* low words take the reduction, high words the carried bits */
            out = _mm256_xor_si256(out, _mm256_blend_epi32(red, car, 0xcc));
            _mm256_storeu_si256((__m256i *)(mask + 64 * u + 32 * half), out);
        }
    }
}

/* AVX-512: one unit (four blocks, j = 0..3) per register; the reduction looked up in gf_reduce with
 * a lane permutation. */
__attribute__((target("avx512f"))) static void xts_mask_avx512(unsigned char *restrict mask,
                                                               const unsigned char *restrict tweaks,
                                                               Py_ssize_t units)
{
    const __m512i cnt = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i rcnt = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
    const __m512i table = _mm512_loadu_si512((const void *)gf_reduce);
    Py_ssize_t u;
    for (u = 0; u < units; u++) {
        __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tweaks + BLOCK * u)));
        __m512i car = _mm512_srlv_epi64(_mm512_shuffle_epi32(x, _MM_PERM_BADC), rcnt);
        __m512i red = _mm512_permutexvar_epi64(car, table);
        __m512i out = _mm512_xor_si512(_mm512_sllv_epi64(x, cnt), _mm512_mask_blend_epi64(0xaa, red, car));
        _mm512_storeu_si512((void *)(mask + 64 * u), out);
    }
}

/* dst = src ^ m[k] ^ t, 16-byte blocks; `stream`: non-temporal stores (dst 16-aligned). */
__attribute__((target("avx2"))) static void xor_run_avx2(unsigned char *restrict dst, const unsigned char *restrict src,
                                                         const uint64_t *restrict m, uint64_t t0, uint64_t t1,
                                                         Py_ssize_t blocks, int stream)
{
    __m128i t1x = _mm_set_epi64x((long long)t1, (long long)t0);
    __m256i t = _mm256_broadcastsi128_si256(t1x);
    Py_ssize_t k = 0;
    if (stream) {
        for (; k < blocks && ((uintptr_t)(dst + BLOCK * k) & 31); k++) {
            __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                      _mm_loadu_si128((const __m128i *)(m + 2 * k)));
            _mm_stream_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
        }
        for (; k + 2 <= blocks; k += 2) {
            __m256i a = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + BLOCK * k)),
                                         _mm256_loadu_si256((const __m256i *)(m + 2 * k)));
            _mm256_stream_si256((__m256i *)(dst + BLOCK * k), _mm256_xor_si256(a, t));
        }
        for (; k < blocks; k++) {
            __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                      _mm_loadu_si128((const __m128i *)(m + 2 * k)));
            _mm_stream_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
        }
        return;
    }
    for (; k + 2 <= blocks; k += 2) {
        __m256i a = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(src + BLOCK * k)),
                                     _mm256_loadu_si256((const __m256i *)(m + 2 * k)));
        _mm256_storeu_si256((__m256i *)(dst + BLOCK * k), _mm256_xor_si256(a, t));
    }
    for (; k < blocks; k++) {
        __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                  _mm_loadu_si128((const __m128i *)(m + 2 * k)));
        _mm_storeu_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
    }
}

/* The same, four blocks per instruction, the three-way XOR in one (vpternlogq, truth table 0x96). */
__attribute__((target("avx512f"))) static void xor_run_avx512(unsigned char *restrict dst,
                                                              const unsigned char *restrict src,
                                                              const uint64_t *restrict m, uint64_t t0, uint64_t t1,
                                                              Py_ssize_t blocks, int stream)
{
    __m128i t1x = _mm_set_epi64x((long long)t1, (long long)t0);
    __m512i t = _mm512_broadcast_i32x4(t1x);
    Py_ssize_t k = 0;
    if (stream) {
        for (; k < blocks && ((uintptr_t)(dst + BLOCK * k) & 63); k++) {
            __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                      _mm_loadu_si128((const __m128i *)(m + 2 * k)));
            _mm_stream_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
        }
        for (; k + 4 <= blocks; k += 4) {
            __m512i a = _mm512_ternarylogic_epi64(_mm512_loadu_si512((const void *)(src + BLOCK * k)),
                                                  _mm512_loadu_si512((const void *)(m + 2 * k)), t, 0x96);
            _mm512_stream_si512((void *)(dst + BLOCK * k), a);
        }
        for (; k < blocks; k++) {
            __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                      _mm_loadu_si128((const __m128i *)(m + 2 * k)));
            _mm_stream_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
        }
        return;
    }
    for (; k + 4 <= blocks; k += 4) {
        __m512i a = _mm512_ternarylogic_epi64(_mm512_loadu_si512((const void *)(src + BLOCK * k)),
                                              _mm512_loadu_si512((const void *)(m + 2 * k)), t, 0x96);
        _mm512_storeu_si512((void *)(dst + BLOCK * k), a);
    }
    for (; k < blocks; k++) {
        __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(src + BLOCK * k)),
                                  _mm_loadu_si128((const __m128i *)(m + 2 * k)));
        _mm_storeu_si128((__m128i *)(dst + BLOCK * k), _mm_xor_si128(a, t1x));
    }
}
#endif

/* One pass at the chosen level; `stream` only where dst is 16-aligned (else ordinary stores). */
static void xor_run(int isa, unsigned char *restrict dst, const unsigned char *restrict src,
                    const uint64_t *restrict m, uint64_t t0, uint64_t t1, Py_ssize_t blocks, int stream)
{
    stream = stream && !((uintptr_t)dst & 15);
#ifdef HAVE_VECTOR_ISA
    if (isa == ISA_AVX512) {
        xor_run_avx512(dst, src, m, t0, t1, blocks, stream);
        return;
    }
    if (isa == ISA_AVX2) {
        xor_run_avx2(dst, src, m, t0, t1, blocks, stream);
        return;
    }
#endif
    (void)isa;
    (stream ? xor_tweak_stream : xor_tweak_vec)(dst, src, m, t0, t1, blocks);
}

static void xts_page_mask(int isa, unsigned char *restrict mask, const unsigned char *restrict tweaks, Py_ssize_t units)
{
#ifdef HAVE_VECTOR_ISA
    if (isa == ISA_AVX512) {
        xts_mask_avx512(mask, tweaks, units);
        return;
    }
    if (isa == ISA_AVX2) {
        xts_mask_avx2(mask, tweaks, units);
        return;
    }
#endif
    (void)isa;
    xts_mask_portable(mask, tweaks, units);
}

/* ---- XTS with the mask made on the fly (crypt_into_via) ------------------------------------
 *
 * dst = src ^ M for `units` 64-byte units, M of unit u the four blocks S_u * alpha^j (j = 0..3),
 * S_u = tw[u] (16 bytes, a little-endian GF(2^128) element: E_K2(n_u)): the mask is made in
 * registers and never stored (xts_page_mask's arithmetic, IEEE 1619-2018 5.2), so a pass over a
 * chunk in L2 reads 16 bytes of tweak per 64 of data instead of a 64-byte mask.  `stream`:
 * non-temporal stores (dst 16-aligned). */
static void xts_run_portable(unsigned char *dst, const unsigned char *src, const unsigned char *tw,
                             Py_ssize_t units, int stream)
{
    unsigned char mask[64];
    Py_ssize_t u;
    int k;
    (void)stream;
    for (u = 0; u < units; u++) {
        xts_mask_portable(mask, tw + BLOCK * u, 1);
        for (k = 0; k < 64; k += 8) {
            store64(dst + 64 * u + k, load64(src + 64 * u + k) ^ load64(mask + k));
        }
    }
}

#ifdef HAVE_VECTOR_ISA
__attribute__((target("avx2"))) static void xts_run_avx2(unsigned char *dst, const unsigned char *src,
                                                         const unsigned char *tw, Py_ssize_t units, int stream)
{
    const __m256i cnt01 = _mm256_set_epi64x(1, 1, 0, 0), rcnt01 = _mm256_set_epi64x(63, 63, 64, 64);
    const __m256i cnt23 = _mm256_set_epi64x(3, 3, 2, 2), rcnt23 = _mm256_set_epi64x(61, 61, 62, 62);
    int aligned = !((uintptr_t)dst & 31);
    Py_ssize_t u;
    for (u = 0; u < units; u++) {
        __m128i s = _mm_loadu_si128((const __m128i *)(tw + BLOCK * u));
        __m256i x = _mm256_broadcastsi128_si256(s);
        __m256i sw = _mm256_shuffle_epi32(x, 0x4e);
        int half;
        for (half = 0; half < 2; half++) {
            __m256i out = _mm256_sllv_epi64(x, half ? cnt23 : cnt01);
            __m256i car = _mm256_srlv_epi64(sw, half ? rcnt23 : rcnt01);
            __m256i red = _mm256_xor_si256(_mm256_xor_si256(car, _mm256_slli_epi64(car, 1)),
                                           _mm256_xor_si256(_mm256_slli_epi64(car, 2), _mm256_slli_epi64(car, 7)));
            const unsigned char *in = src + 64 * u + 32 * half;
            unsigned char *o = dst + 64 * u + 32 * half;
            out = _mm256_xor_si256(out, _mm256_blend_epi32(red, car, 0xcc));
            out = _mm256_xor_si256(out, _mm256_loadu_si256((const __m256i *)in));
            if (!stream) {
                _mm256_storeu_si256((__m256i *)o, out);
            } else if (aligned) {
                _mm256_stream_si256((__m256i *)o, out);
            } else {
                _mm_stream_si128((__m128i *)o, _mm256_castsi256_si128(out));
                _mm_stream_si128((__m128i *)(o + 16), _mm256_extracti128_si256(out, 1));
            }
        }
    }
}

__attribute__((target("avx512f"))) static void xts_run_avx512(unsigned char *dst, const unsigned char *src,
                                                              const unsigned char *tw, Py_ssize_t units,
                                                              int stream)
{
    const __m512i cnt = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i rcnt = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
    const __m512i table = _mm512_loadu_si512((const void *)gf_reduce);
    int aligned = !((uintptr_t)dst & 63);
    Py_ssize_t u;
    for (u = 0; u < units; u++) {
        __m128i s = _mm_loadu_si128((const __m128i *)(tw + BLOCK * u));
        __m512i x = _mm512_broadcast_i32x4(s);
        __m512i car = _mm512_srlv_epi64(_mm512_shuffle_epi32(x, _MM_PERM_BADC), rcnt);
        __m512i red = _mm512_permutexvar_epi64(car, table);
        __m512i m = _mm512_xor_si512(_mm512_sllv_epi64(x, cnt), _mm512_mask_blend_epi64(0xaa, red, car));
        __m512i out = _mm512_xor_si512(m, _mm512_loadu_si512((const void *)(src + 64 * u)));
        unsigned char *o = dst + 64 * u;
        if (!stream) {
            _mm512_storeu_si512((void *)o, out);
        } else if (aligned) {
            _mm512_stream_si512((void *)o, out);
        } else {
            _mm_stream_si128((__m128i *)o, _mm512_castsi512_si128(out));
            _mm_stream_si128((__m128i *)(o + 16), _mm512_extracti32x4_epi32(out, 1));
            _mm_stream_si128((__m128i *)(o + 32), _mm512_extracti32x4_epi32(out, 2));
            _mm_stream_si128((__m128i *)(o + 48), _mm512_extracti32x4_epi32(out, 3));
        }
    }
}
#endif

static void xts_run(int isa, unsigned char *dst, const unsigned char *src, const unsigned char *tw,
                    Py_ssize_t units, int stream)
{
    stream = stream && !((uintptr_t)dst & 15);
#ifdef HAVE_VECTOR_ISA
    if (isa == ISA_AVX512) {
        xts_run_avx512(dst, src, tw, units, stream);
        return;
    }
    if (isa == ISA_AVX2) {
        xts_run_avx2(dst, src, tw, units, stream);
        return;
    }
#endif
    (void)isa;
    xts_run_portable(dst, src, tw, units, stream);
}

/* ---- the vector level of the fused passes ------------------------------------------------ */

PyDoc_STRVAR(vector_isa_doc,
             "vector_isa(level=None, /) -> str\n--\n\n"
             "The instruction set of the fused passes' XORs and XTS masks (crypt_*): 'avx512',\n"
             "'avx2' or 'portable'; at first use 'avx2' when the CPU has it, else 'portable'.\n"
             "With `level`, that one is used from now on, process-wide (ValueError if this CPU or\n"
             "build lacks it), and the previous one returned: every level gives the same bytes.\n"
             "crypt_into_via's XTS masks run on AVX-512 where the CPU has it until a level is set.");

/* The optional name argument of vector_isa and aes_engine: its index among `names` (count of them;
 * `what` and `choices` spell the argument and its values in the error) in *chosen and 1; 0 when none
 * was given (or None); -1 with an exception set. */
static int chosen_name(const char *fname, PyObject *const *args, Py_ssize_t nargs, const char *const *names,
                       int count, const char *what, const char *choices, int *chosen)
{
    const char *name;
    int i;
    if (check_nargs(fname, nargs, 0, 1) < 0) {
        return -1;
    }
    if (nargs == 0 || args[0] == Py_None) {
        return 0;
    }
    name = PyUnicode_AsUTF8(args[0]);
    if (name == NULL) {
        return -1;
    }
    for (i = 0; i < count && strcmp(name, names[i]) != 0; i++) {
    }
    if (i == count) {
        PyErr_Format(PyExc_ValueError, "%s must be %s, not %R", what, choices, args[0]);
        return -1;
    }
    *chosen = i;
    return 1;
}

static PyObject *vector_isa(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int previous = isa_current(), level = 0;
    int given = chosen_name("vector_isa", args, nargs, isa_names, 3, "level", "'portable', 'avx2' or 'avx512'", &level);
    (void)self;
    if (given < 0) {
        return NULL;
    }
    if (given) {
        if (level > isa_supported()) {
            PyErr_Format(PyExc_ValueError, "this CPU (or build) does not run the %s level", isa_names[level]);
            return NULL;
        }
        isa_level = level;
        isa_forced = 1;
    }
    return PyUnicode_FromString(isa_names[previous]);
}

/* ---- the AES engine: VAES (AVX-512) or OpenSSL ---------------------------------------------
 *
 * Through OpenSSL a page's transform is three steps (input ^ tweak into an L1 buffer, AES-ECB
 * there, buffer ^ tweak into the output: xex_pages_run / xts_pages_run; XTS with its unit tweaks
 * E_K2(n) in one more call first) or per chunk (crypt_into_via), with the AES an opaque call that
 * nothing else overlaps.  Where the CPU has VAES with AVX-512, four 16-byte blocks are one ZMM
 * register and the whole transform is one pass in registers: xts_vaes_run (AES-256-XTS with 64-byte
 * units, IEEE 1619-2018 5.3.1: a unit is one register, its tweak and masks E_K2(n) * alpha^j made
 * beside the data rounds) and xex_vaes_run (XE/XEX, AES-128: the address tweak from the in-page
 * table and the page's tweak), eight registers per step, each byte read once and written once;
 * where the CPU has VAES without AVX-512 (Zen 3, Intel client cores) the same on YMM registers of
 * two blocks (xts_vaes256_run, xex_vaes256_run: engine 'vaes256').
 *
 * The rounds are the CPU's AES instructions (VAESENC / VAESDEC; the key schedules with
 * AESKEYGENASSIST and AESIMC, FIPS 197 5.2 and 5.3.5's equivalent inverse cipher).  Before the
 * engine is first used known-answer tests run it (FIPS 197 Appendix C.1 and C.3, AES-128 and
 * AES-256, both directions, every lane); if they fail, or the CPU lacks VAES, AES-NI or both of
 * AVX-512F and AVX2, OpenSSL's path runs, the same bytes.  aes_engine() reports and forces the choice (the tests run
 * both on the same data). */

enum { ENGINE_OPENSSL = 0, ENGINE_VAES = 1, ENGINE_VAES256 = 2, ENGINES = 3 };
static const char *const engine_names[] = {"openssl", "vaes", "vaes256"};
static int engine_level = -1; /* -1: not chosen yet (a benign race: every thread chooses the same) */

#define XTS_ROUNDS 14 /* AES-256 */
#define XEX_ROUNDS 10 /* AES-128 */

/* A key schedule, each round key broadcast to a 64-byte row (the rounds take them as memory
 * operands); AES-128 uses the first 11 rows. */
typedef unsigned char AesRows[XTS_ROUNDS + 1][64];

/* The expanded keys of one run: k1 the data key's schedule for the run's direction (decryption:
 * the equivalent inverse cipher's; AES-128 for XE/XEX, AES-256 for XTS), k2 XTS's tweak key's
 * encryption schedule. */
typedef struct {
    AesRows k1 ALIGNED64;
    AesRows k2 ALIGNED64;
    int wide; /* the kernels on ZMM registers (ENGINE_VAES), else on YMM (ENGINE_VAES256) */
} EngineKeys;

#ifdef HAVE_VAES
__attribute__((target("aes"))) static __m128i ks_mix(__m128i k, __m128i t)
{
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    k = _mm_xor_si128(k, _mm_slli_si128(k, 4));
    return _mm_xor_si128(k, t);
}

/* FIPS 197 5.2 for a 256-bit key: words w[8i..8i+7] from w[8i-8..8i-1]; AESKEYGENASSIST gives
 * SubWord(RotWord(w)) ^ Rcon (dword 3, even round keys) and SubWord(w) (dword 2, odd ones). */
#define KS256_EVEN(i, rcon) \
    rk[i] = ks_mix(rk[(i) - 2], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[(i) - 1], rcon), 0xff))
#define KS256_ODD(i) \
    rk[i] = ks_mix(rk[(i) - 2], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[(i) - 1], 0), 0xaa))

/* FIPS 197 5.2 for a 128-bit key: each round key from the previous one and SubWord(RotWord(its last
 * word)) ^ Rcon (AESKEYGENASSIST's dword 3). */
#define KS128(i, rcon) \
    rk[i] = ks_mix(rk[(i) - 1], _mm_shuffle_epi32(_mm_aeskeygenassist_si128(rk[(i) - 1], rcon), 0xff))

/* The schedule of a 16-byte (bits 128) or 32-byte key into rows (each round key four times):
 * encryption, or with `decrypt` the equivalent inverse cipher's (FIPS 197 5.3.5: reversed,
 * InvMixColumns on the middle ones). */
__attribute__((target("aes"))) static void ks_rows(AesRows rows, const unsigned char *key, int bits, int decrypt)
{
    __m128i rk[XTS_ROUNDS + 1];
    int i, lane, rounds = bits == 256 ? XTS_ROUNDS : XEX_ROUNDS;
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    if (bits != 256) {
        KS128(1, 0x01);
        KS128(2, 0x02);
        KS128(3, 0x04);
        KS128(4, 0x08);
        KS128(5, 0x10);
        KS128(6, 0x20);
        KS128(7, 0x40);
        KS128(8, 0x80);
        KS128(9, 0x1b);
        KS128(10, 0x36);
    } else {
        rk[1] = _mm_loadu_si128((const __m128i *)(key + 16));
        KS256_EVEN(2, 0x01);
        KS256_ODD(3);
        KS256_EVEN(4, 0x02);
        KS256_ODD(5);
        KS256_EVEN(6, 0x04);
        KS256_ODD(7);
        KS256_EVEN(8, 0x08);
        KS256_ODD(9);
        KS256_EVEN(10, 0x10);
        KS256_ODD(11);
        KS256_EVEN(12, 0x20);
        KS256_ODD(13);
        KS256_EVEN(14, 0x40);
    }
    for (i = 0; i <= rounds; i++) {
        __m128i k = rk[i];
        if (decrypt) {
            k = rk[rounds - i];
            if (i > 0 && i < rounds) {
                k = _mm_aesimc_si128(k);
            }
        }
        for (lane = 0; lane < 4; lane++) {
            _mm_store_si128((__m128i *)(rows[i] + 16 * lane), k);
        }
    }
}
#undef KS256_EVEN
#undef KS256_ODD
#undef KS128

#define ROUND_KEY(row) _mm512_load_si512((const void *)(row))
/* The AES rounds (10 or 14) over n registers side by side (n and rounds compile-time constants after
 * inlining where the caller's are). */
__attribute__((target("avx512f,vaes"), always_inline)) static inline void
aes_zmm(__m512i *x, int n, const AesRows rows, int rounds, int decrypt)
{
    int i, r;
    for (i = 0; i < n; i++) {
        x[i] = _mm512_xor_si512(x[i], ROUND_KEY(rows[0]));
    }
    for (r = 1; r < rounds; r++) {
        __m512i k = ROUND_KEY(rows[r]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm512_aesdec_epi128(x[i], k) : _mm512_aesenc_epi128(x[i], k);
        }
    }
    for (i = 0; i < n; i++) {
        __m512i k = ROUND_KEY(rows[rounds]);
        x[i] = decrypt ? _mm512_aesdeclast_epi128(x[i], k) : _mm512_aesenclast_epi128(x[i], k);
    }
}

/* The mask of a unit whose tweak S is in all four lanes of x: lane j = S * alpha^j (as xts_run_avx512). */
__attribute__((target("avx512f"), always_inline)) static inline __m512i xts_unit_mask(__m512i x, __m512i table)
{
    const __m512i cnt = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i rcnt = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
    __m512i car = _mm512_srlv_epi64(_mm512_shuffle_epi32(x, _MM_PERM_BADC), rcnt);
    __m512i red = _mm512_permutexvar_epi64(car, table);
    return _mm512_xor_si512(_mm512_sllv_epi64(x, cnt), _mm512_mask_blend_epi64(0xaa, red, car));
}

/* The data rounds of x[0..n) (K1's schedule, either direction) and the tweak rounds of t[0..2) (K2's,
 * encryption) interleaved round by round: the next step's tweaks are made while this step's data
 * goes through, instead of holding up the step's start for a whole chain of AES latencies. */
__attribute__((target("avx512f,vaes"), always_inline)) static inline void
aes_zmm_with_tweaks(__m512i *x, int n, const AesRows k1, int decrypt, __m512i *t, const AesRows k2)
{
    int i, r;
    for (i = 0; i < n; i++) {
        x[i] = _mm512_xor_si512(x[i], ROUND_KEY(k1[0]));
    }
    t[0] = _mm512_xor_si512(t[0], ROUND_KEY(k2[0]));
    t[1] = _mm512_xor_si512(t[1], ROUND_KEY(k2[0]));
    for (r = 1; r < XTS_ROUNDS; r++) {
        __m512i k = ROUND_KEY(k1[r]), kt = ROUND_KEY(k2[r]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm512_aesdec_epi128(x[i], k) : _mm512_aesenc_epi128(x[i], k);
        }
        t[0] = _mm512_aesenc_epi128(t[0], kt);
        t[1] = _mm512_aesenc_epi128(t[1], kt);
    }
    {
        __m512i k = ROUND_KEY(k1[XTS_ROUNDS]), kt = ROUND_KEY(k2[XTS_ROUNDS]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm512_aesdeclast_epi128(x[i], k) : _mm512_aesenclast_epi128(x[i], k);
        }
        t[0] = _mm512_aesenclast_epi128(t[0], kt);
        t[1] = _mm512_aesenclast_epi128(t[1], kt);
    }
}

#undef ROUND_KEY

/* `units` 64-byte units of XTS from src into dst (may be src itself), the first unit's sequence
 * number `seq`.  Eight units per step: their
 * tweaks (two registers of four, made during the previous step) give the eight masks, the eight
 * data registers go through K1's rounds with the next step's tweaks through K2's beside them; a
 * last step of fewer units takes the same path with the registers it needs. */
__attribute__((target("avx512f,vaes"))) static void xts_vaes_run(unsigned char *dst, const unsigned char *src,
                                                                  uint64_t seq, Py_ssize_t units,
                                                                  const EngineKeys *ks, int decrypt)
{
    const __m512i table = _mm512_loadu_si512((const void *)gf_reduce);
    const __m512i step = _mm512_maskz_set1_epi64(0x55, 4);
    __m512i tw[2];
    tw[0] = _mm512_add_epi64(_mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0), _mm512_maskz_set1_epi64(0x55, (long long)seq));
    tw[1] = _mm512_add_epi64(tw[0], step);
    aes_zmm(tw, units > 4 ? 2 : 1, ks->k2, XTS_ROUNDS, 0);
    while (units > 0) {
        __m512i x[8], m[8], next[2];
        int n = units < 8 ? (int)units : 8, i;
        for (i = 0; i < n; i++) {
            __m512i t = tw[i >> 2];
            switch (i & 3) {
            case 0: t = _mm512_shuffle_i64x2(t, t, 0x00); break;
            case 1: t = _mm512_shuffle_i64x2(t, t, 0x55); break;
            case 2: t = _mm512_shuffle_i64x2(t, t, 0xaa); break;
            default: t = _mm512_shuffle_i64x2(t, t, 0xff); break;
            }
            m[i] = xts_unit_mask(t, table);
            x[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(src + 64 * i)), m[i]);
        }
        if (units > 8) { /* (so n == 8) */
            seq += 8;
            next[0] = _mm512_add_epi64(_mm512_set_epi64(0, 3, 0, 2, 0, 1, 0, 0),
                                       _mm512_maskz_set1_epi64(0x55, (long long)seq));
            next[1] = _mm512_add_epi64(next[0], step);
            aes_zmm_with_tweaks(x, 8, ks->k1, decrypt, next, ks->k2);
            tw[0] = next[0];
            tw[1] = next[1];
        } else {
            aes_zmm(x, n, ks->k1, XTS_ROUNDS, decrypt);
        }
        for (i = 0; i < n; i++) {
            _mm512_storeu_si512((void *)(dst + 64 * i), _mm512_xor_si512(x[i], m[i]));
        }
        src += 64 * n;
        dst += 64 * n;
        units -= n;
    }
}

/* XE / XEX of `blocks` 16-byte blocks from src into dst (may be src itself) on the VAES engine:
 * T_k = tab[k] ^ t (tab: the in-page tweaks from the first block, t the page's tweak), the block
 * ^ T_k before the rounds when `pre`, after them when `post` (xex_pages_run's flags).  Eight
 * registers of four blocks per step; a last step of fewer blocks loads and stores through lane
 * masks (the masked-off bytes are neither read nor written). */
__attribute__((target("avx512f,vaes"))) static void xex_vaes_run(unsigned char *dst, const unsigned char *src,
                                                                  const uint64_t *tab, uint64_t t0, uint64_t t1,
                                                                  Py_ssize_t blocks, const AesRows rows, int pre,
                                                                  int post, int decrypt)
{
    const __m512i t = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)t1, (long long)t0));
    const __m512i *tp = (const __m512i *)(const void *)tab;
    for (; blocks >= 32; blocks -= 32, src += 512, dst += 512, tp += 8) {
        __m512i x[8], m[8];
        int i;
        for (i = 0; i < 8; i++) {
            m[i] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(tp + i)), t);
            x[i] = _mm512_loadu_si512((const void *)(src + 64 * i));
            if (pre) {
                x[i] = _mm512_xor_si512(x[i], m[i]);
            }
        }
        aes_zmm(x, 8, rows, XEX_ROUNDS, decrypt);
        for (i = 0; i < 8; i++) {
            _mm512_storeu_si512((void *)(dst + 64 * i), post ? _mm512_xor_si512(x[i], m[i]) : x[i]);
        }
    }
    if (blocks > 0) {
        __m512i x[8], m[8];
        __mmask8 lanes[8];
        int n = (int)((blocks + 3) / 4), i;
        for (i = 0; i < n; i++) {
            Py_ssize_t left = blocks - 4 * i;
            lanes[i] = left >= 4 ? (__mmask8)0xff : (__mmask8)((1u << (2 * left)) - 1);
            m[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi64(lanes[i], (const void *)(tp + i)), t);
            x[i] = _mm512_maskz_loadu_epi64(lanes[i], (const void *)(src + 64 * i));
            if (pre) {
                x[i] = _mm512_xor_si512(x[i], m[i]);
            }
        }
        aes_zmm(x, n, rows, XEX_ROUNDS, decrypt);
        for (i = 0; i < n; i++) {
            _mm512_mask_storeu_epi64((void *)(dst + 64 * i), lanes[i], post ? _mm512_xor_si512(x[i], m[i]) : x[i]);
        }
    }
}

/* One FIPS 197 known answer: key 00 01 .. (bits / 8 bytes) encrypts `plain` to `cipher` on every
 * lane, and decrypts it back. */
__attribute__((target("avx512f,vaes"))) static int vaes_answer(int bits, const unsigned char *plain,
                                                               const unsigned char *cipher)
{
    unsigned char key[32], out[64];
    EngineKeys ks;
    __m512i x[1];
    int i, ok = 1, rounds = bits == 256 ? XTS_ROUNDS : XEX_ROUNDS;
    for (i = 0; i < 32; i++) {
        key[i] = (unsigned char)i;
    }
    ks_rows(ks.k1, key, bits, 0);
    ks_rows(ks.k2, key, bits, 1);
    x[0] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)plain));
    aes_zmm(x, 1, ks.k1, rounds, 0);
    _mm512_storeu_si512((void *)out, x[0]);
    for (i = 0; i < 4; i++) {
        ok &= memcmp(out + 16 * i, cipher, 16) == 0;
    }
    aes_zmm(x, 1, ks.k2, rounds, 1);
    _mm512_storeu_si512((void *)out, x[0]);
    for (i = 0; i < 4; i++) {
        ok &= memcmp(out + 16 * i, plain, 16) == 0;
    }
    return ok;
}

/* ---- the same engine on 256-bit registers (VAES with AVX2: Zen 3, Intel client cores) --------
 *
 * Where the CPU has VAES but not AVX-512, the same one-pass transforms run on YMM registers of two
 * blocks: XTS four 64-byte units per step (two registers each; their tweaks two to a register,
 * made beside the previous step's data rounds; the masks as xts_run_avx2 makes them), XE/XEX eight
 * registers of two blocks per step with the last ones loaded and stored through AVX2 lane masks. */

#define ROUND_KEY256(row) _mm256_load_si256((const __m256i *)(const void *)(row))

__attribute__((target("avx2,vaes"), always_inline)) static inline void
aes_ymm(__m256i *x, int n, const AesRows rows, int rounds, int decrypt)
{
    int i, r;
    for (i = 0; i < n; i++) {
        x[i] = _mm256_xor_si256(x[i], ROUND_KEY256(rows[0]));
    }
    for (r = 1; r < rounds; r++) {
        __m256i k = ROUND_KEY256(rows[r]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm256_aesdec_epi128(x[i], k) : _mm256_aesenc_epi128(x[i], k);
        }
    }
    for (i = 0; i < n; i++) {
        __m256i k = ROUND_KEY256(rows[rounds]);
        x[i] = decrypt ? _mm256_aesdeclast_epi128(x[i], k) : _mm256_aesenclast_epi128(x[i], k);
    }
}

/* aes_zmm_with_tweaks on YMM: x[0..n) through K1's rounds, t[0..2) through K2's, interleaved. */
__attribute__((target("avx2,vaes"), always_inline)) static inline void
aes_ymm_with_tweaks(__m256i *x, int n, const AesRows k1, int decrypt, __m256i *t, const AesRows k2)
{
    int i, r;
    for (i = 0; i < n; i++) {
        x[i] = _mm256_xor_si256(x[i], ROUND_KEY256(k1[0]));
    }
    t[0] = _mm256_xor_si256(t[0], ROUND_KEY256(k2[0]));
    t[1] = _mm256_xor_si256(t[1], ROUND_KEY256(k2[0]));
    for (r = 1; r < XTS_ROUNDS; r++) {
        __m256i k = ROUND_KEY256(k1[r]), kt = ROUND_KEY256(k2[r]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm256_aesdec_epi128(x[i], k) : _mm256_aesenc_epi128(x[i], k);
        }
        t[0] = _mm256_aesenc_epi128(t[0], kt);
        t[1] = _mm256_aesenc_epi128(t[1], kt);
    }
    {
        __m256i k = ROUND_KEY256(k1[XTS_ROUNDS]), kt = ROUND_KEY256(k2[XTS_ROUNDS]);
        for (i = 0; i < n; i++) {
            x[i] = decrypt ? _mm256_aesdeclast_epi128(x[i], k) : _mm256_aesenclast_epi128(x[i], k);
        }
        t[0] = _mm256_aesenclast_epi128(t[0], kt);
        t[1] = _mm256_aesenclast_epi128(t[1], kt);
    }
}
#undef ROUND_KEY256

/* The half `half` (blocks 2*half, 2*half + 1) of the mask of a unit whose tweak S is in both lanes of
 * x: S * alpha^(2*half), S * alpha^(2*half + 1) (as xts_run_avx2). */
__attribute__((target("avx2"), always_inline)) static inline __m256i xts_half_mask(__m256i x, int half)
{
    const __m256i cnt = half ? _mm256_set_epi64x(3, 3, 2, 2) : _mm256_set_epi64x(1, 1, 0, 0);
    const __m256i rcnt = half ? _mm256_set_epi64x(61, 61, 62, 62) : _mm256_set_epi64x(63, 63, 64, 64);
    __m256i sw = _mm256_shuffle_epi32(x, 0x4e);
    __m256i out = _mm256_sllv_epi64(x, cnt);
    __m256i car = _mm256_srlv_epi64(sw, rcnt);
    __m256i red = _mm256_xor_si256(_mm256_xor_si256(car, _mm256_slli_epi64(car, 1)),
                                   _mm256_xor_si256(_mm256_slli_epi64(car, 2), _mm256_slli_epi64(car, 7)));
    return _mm256_xor_si256(out, _mm256_blend_epi32(red, car, 0xcc));
}

/* xts_vaes_run on YMM: four units (eight registers) per step. */
__attribute__((target("avx2,vaes"))) static void xts_vaes256_run(unsigned char *dst, const unsigned char *src,
                                                                  uint64_t seq, Py_ssize_t units,
                                                                  const EngineKeys *ks, int decrypt)
{
    const __m256i lanes = _mm256_set_epi64x(0, 1, 0, 0);
    __m256i tw[2];
    tw[0] = _mm256_add_epi64(lanes, _mm256_set_epi64x(0, (long long)seq, 0, (long long)seq));
    tw[1] = _mm256_add_epi64(tw[0], _mm256_set_epi64x(0, 2, 0, 2));
    aes_ymm(tw, units > 2 ? 2 : 1, ks->k2, XTS_ROUNDS, 0);
    while (units > 0) {
        __m256i x[8], m[8], next[2];
        int n = units < 4 ? (int)units : 4, i;
        for (i = 0; i < n; i++) {
            __m256i t = tw[i >> 1];
            t = (i & 1) ? _mm256_permute2x128_si256(t, t, 0x11) : _mm256_permute2x128_si256(t, t, 0x00);
            m[2 * i] = xts_half_mask(t, 0);
            m[2 * i + 1] = xts_half_mask(t, 1);
            x[2 * i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(const void *)(src + 64 * i)), m[2 * i]);
            x[2 * i + 1] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(const void *)(src + 64 * i + 32)),
                                            m[2 * i + 1]);
        }
        if (units > 4) { /* (so n == 4) */
            seq += 4;
            next[0] = _mm256_add_epi64(lanes, _mm256_set_epi64x(0, (long long)seq, 0, (long long)seq));
            next[1] = _mm256_add_epi64(next[0], _mm256_set_epi64x(0, 2, 0, 2));
            aes_ymm_with_tweaks(x, 8, ks->k1, decrypt, next, ks->k2);
            tw[0] = next[0];
            tw[1] = next[1];
        } else {
            aes_ymm(x, 2 * n, ks->k1, XTS_ROUNDS, decrypt);
        }
        for (i = 0; i < 2 * n; i++) {
            _mm256_storeu_si256((__m256i *)(void *)(dst + 32 * i), _mm256_xor_si256(x[i], m[i]));
        }
        src += 64 * n;
        dst += 64 * n;
        units -= n;
    }
}

/* xex_vaes_run on YMM: eight registers of two blocks per step; a last step of fewer than 16 blocks
 * through lane masks (VPMASKMOVQ: masked-off lanes neither read nor written). */
__attribute__((target("avx2,vaes"))) static void xex_vaes256_run(unsigned char *dst, const unsigned char *src,
                                                                  const uint64_t *tab, uint64_t t0, uint64_t t1,
                                                                  Py_ssize_t blocks, const AesRows rows, int pre,
                                                                  int post, int decrypt)
{
    const __m256i t = _mm256_set_epi64x((long long)t1, (long long)t0, (long long)t1, (long long)t0);
    const __m256i *tp = (const __m256i *)(const void *)tab;
    for (; blocks >= 16; blocks -= 16, src += 256, dst += 256, tp += 8) {
        __m256i x[8], m[8];
        int i;
        for (i = 0; i < 8; i++) {
            m[i] = _mm256_xor_si256(_mm256_loadu_si256(tp + i), t);
            x[i] = _mm256_loadu_si256((const __m256i *)(const void *)(src + 32 * i));
            if (pre) {
                x[i] = _mm256_xor_si256(x[i], m[i]);
            }
        }
        aes_ymm(x, 8, rows, XEX_ROUNDS, decrypt);
        for (i = 0; i < 8; i++) {
            _mm256_storeu_si256((__m256i *)(void *)(dst + 32 * i), post ? _mm256_xor_si256(x[i], m[i]) : x[i]);
        }
    }
    if (blocks > 0) {
        __m256i x[8], m[8], lanes[8];
        int n = (int)((blocks + 1) / 2), i;
        for (i = 0; i < n; i++) {
            lanes[i] = blocks - 2 * i >= 2 ? _mm256_set1_epi64x(-1) : _mm256_set_epi64x(0, 0, -1, -1);
            m[i] = _mm256_xor_si256(_mm256_maskload_epi64((const long long *)(const void *)(tp + i), lanes[i]), t);
            x[i] = _mm256_maskload_epi64((const long long *)(const void *)(src + 32 * i), lanes[i]);
            if (pre) {
                x[i] = _mm256_xor_si256(x[i], m[i]);
            }
        }
        aes_ymm(x, n, rows, XEX_ROUNDS, decrypt);
        for (i = 0; i < n; i++) {
            _mm256_maskstore_epi64((long long *)(void *)(dst + 32 * i), lanes[i],
                                   post ? _mm256_xor_si256(x[i], m[i]) : x[i]);
        }
    }
}

/* vaes_answer on YMM. */
__attribute__((target("avx2,vaes"))) static int vaes256_answer(int bits, const unsigned char *plain,
                                                                const unsigned char *cipher)
{
    unsigned char key[32], out[32];
    EngineKeys ks;
    __m256i x[1];
    int i, ok = 1, rounds = bits == 256 ? XTS_ROUNDS : XEX_ROUNDS;
    for (i = 0; i < 32; i++) {
        key[i] = (unsigned char)i;
    }
    ks_rows(ks.k1, key, bits, 0);
    ks_rows(ks.k2, key, bits, 1);
    x[0] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)plain));
    aes_ymm(x, 1, ks.k1, rounds, 0);
    _mm256_storeu_si256((__m256i *)(void *)out, x[0]);
    for (i = 0; i < 2; i++) {
        ok &= memcmp(out + 16 * i, cipher, 16) == 0;
    }
    aes_ymm(x, 1, ks.k2, rounds, 1);
    _mm256_storeu_si256((__m256i *)(void *)out, x[0]);
    for (i = 0; i < 2; i++) {
        ok &= memcmp(out + 16 * i, plain, 16) == 0;
    }
    return ok;
}

/* FIPS 197 Appendix C.1 (AES-128) and C.3 (AES-256): an engine's rounds and key schedules. */
static int vaes_known_answer(int engine)
{
    static const unsigned char plain[16] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                            0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff};
    static const unsigned char c128[16] = {0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30,
                                           0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a};
    static const unsigned char c256[16] = {0x8e, 0xa2, 0xb7, 0xca, 0x51, 0x67, 0x45, 0xbf,
                                           0xea, 0xfc, 0x49, 0x90, 0x4b, 0x49, 0x60, 0x89};
    if (engine == ENGINE_VAES256) {
        return vaes256_answer(128, plain, c128) && vaes256_answer(256, plain, c256);
    }
    return vaes_answer(128, plain, c128) && vaes_answer(256, plain, c256);
}
#endif

/* Whether this CPU (and build) can run a VAES engine at all: VAES and AES-NI, with AVX-512F (vaes)
 * or AVX2 (vaes256). */
static int vaes_supported(int engine)
{
#ifdef HAVE_VAES
    __builtin_cpu_init();
    return __builtin_cpu_supports("vaes") && __builtin_cpu_supports("aes") &&
           (engine == ENGINE_VAES ? __builtin_cpu_supports("avx512f") : __builtin_cpu_supports("avx2"));
#else
    (void)engine;
    return 0;
#endif
}

/* Whether an engine may run: OpenSSL always; a VAES one where the CPU has it and it passed the
 * known-answer test (once per engine). */
static int engine_usable(int engine)
{
    static int ok[ENGINES] = {1, -1, -1};
    if (ok[engine] < 0) {
#ifdef HAVE_VAES
        ok[engine] = vaes_supported(engine) && vaes_known_answer(engine);
#else
        ok[engine] = 0;
#endif
    }
    return ok[engine];
}

/* The engine in use: at first the fastest that may run (ZMM, then YMM, then OpenSSL). */
static int engine_current(void)
{
    if (engine_level < 0) {
        engine_level = engine_usable(ENGINE_VAES) ? ENGINE_VAES
                       : engine_usable(ENGINE_VAES256) ? ENGINE_VAES256 : ENGINE_OPENSSL;
    }
    return engine_level;
}

/* The keys of a run (code 2: key = K1 || K2, 64 bytes; else a 16-byte AES-128 key) when a VAES
 * engine runs it, else NULL. */
static const EngineKeys *engine_keys(EngineKeys *ks, int engine, const unsigned char *key, long code, int encrypt)
{
#ifdef HAVE_VAES
    if (engine != ENGINE_OPENSSL) {
        ks->wide = engine == ENGINE_VAES;
        ks_rows(ks->k1, key, code == 2 ? 256 : 128, !encrypt);
        if (code == 2) {
            ks_rows(ks->k2, key + 32, 256, 0);
        }
        return ks;
    }
#endif
    (void)engine;
    (void)code;
    (void)ks;
    (void)key;
    (void)encrypt;
    return NULL;
}

PyDoc_STRVAR(aes_engine_doc,
             "aes_engine(name=None, /) -> str\n--\n\n"
             "The AES engine of the crypt_* functions: 'vaes' or 'vaes256' (the whole transform in\n"
             "one pass on VAES with AVX-512 or AVX2, where the CPU has them and the engine passed its\n"
             "known-answer tests; the first that may run is the default) or 'openssl' (libcrypto's\n"
             "AES-ECB between the tweak passes).  With `name`, that one\n"
             "is used from now on, process-wide (ValueError if this CPU or build lacks it), and the\n"
             "previous one returned: both give the same bytes.");

static PyObject *aes_engine(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int previous = engine_current(), engine = 0;
    int given = chosen_name("aes_engine", args, nargs, engine_names, ENGINES, "name", "'openssl', 'vaes' or 'vaes256'",
                            &engine);
    (void)self;
    if (given < 0) {
        return NULL;
    }
    if (given) {
        if (!engine_usable(engine)) {
            PyErr_Format(PyExc_ValueError, "this CPU (or build) does not run the %s engine", engine_names[engine]);
            return NULL;
        }
        engine_level = engine;
    }
    return PyUnicode_FromString(engine_names[previous]);
}


/* One side of a fused run: the pages of a page store (one pointer per page of the span, the first
 * at the span's offset in its page) or one contiguous buffer. */
typedef struct {
    unsigned char *const *pages;
    unsigned char *buf;
    const uint64_t *pfns; /* page p's PFN where the pages are not consecutive (whole pages: a gather
                             or a scatter); NULL: consecutive from the run's SPA */
} Span;

/* The SPA of page p of a run (p > 0, the run not done): from the PFN list of the side that has one,
 * else `spa` (the previous page's end). */
static uint64_t span_spa(const Span *in, const Span *out, Py_ssize_t p, uint64_t spa)
{
    const uint64_t *pfns = in->pfns != NULL ? in->pfns : out->pfns;
    return pfns != NULL ? pfns[p] << PAGE_SHIFT : spa;
}

static unsigned char *span_at(const Span *s, Py_ssize_t page, Py_ssize_t done, Py_ssize_t off)
{
    return s->pages != NULL ? s->pages[page] + off : s->buf + done;
}

/* Prefetch hints for the input's next page (n bytes), issued before a page's AES: the loads from
 * DRAM then overlap the AES instead of stalling the next page's first XOR. */
static void prefetch_next(const Span *in, Py_ssize_t page, Py_ssize_t done, Py_ssize_t n)
{
    const unsigned char *next = span_at(in, page, done, 0);
    Py_ssize_t q;
    for (q = 0; q < n; q += 64) {
        PREFETCH(next + q);
    }
}

/* The transform itself, without the GIL: 0, or -1 when OpenSSL failed.  Per page of the span: the
 * input ^ T into tmp, AES in place there, tmp ^ T into the output (tmp and the tweak table stay in
 * L1).  Without the first XOR (XE decryption) AES reads the input itself; without the second (XE
 * encryption) AES writes the output itself.  `stream`: non-temporal stores into the output (it is
 * not read again soon).  The input and output may be the same memory, page for page.  Measured on
 * a 2-core EPYC VM, 128 MiB encrypt+decrypt: 0.80 (XE) and 0.68-0.75 (XEX) of one raw AES-128-ECB
 * call over the buffer, against 0.66 and 0.53 for three passes over 256 KiB chunks; tiles of 2-8
 * pages per AES call or smaller prefetch slices measured no better.  The page tweak T is stepped
 * from page to page (page_tweak_step) instead of rebuilt from all the address bits: perf showed the
 * per-bit rebuild at ~6% of an in-cache run's samples; the step cut CPU time 9-14% in cache and
 * ~2% at 128 MiB (memory-bound there).  Dropping prefetch_next measured no better in cache and
 * 8% worse out of it. */
static int xex_pages_run(const Span *in, const Span *out, int stream, uint64_t spa, Py_ssize_t len,
                         const unsigned char *consts, int nbits, EVP_CIPHER_CTX *ctx, const EngineKeys *ks,
                         int pre, int post, int encrypt)
{
    uint64_t in_page[PAGE_BLOCKS][2];
    uint64_t tmp_words[XP_PAGE / 8 + 3 * 8];
    /* (tmp 3 lines past the table's page offset: buffers 4 KiB apart make loads wait for stores
     * to the same page offset, x86's "4K aliasing") */
    unsigned char *tmp = (unsigned char *)(tmp_words + 3 * 8);
    Py_ssize_t p = 0, done = 0;
    int isa = isa_current();
    uint64_t t[2], page = spa & ~(uint64_t)(XP_PAGE - 1);
    in_page_table(consts, in_page);
    page_tweak(page, consts, nbits, t);
#ifdef HAVE_VAES
    if (ks != NULL) { /* the VAES engine: one pass per page (ordinary stores, as xts_pages_run's) */
        (void)stream;
        (void)tmp;
        while (len > 0) {
            Py_ssize_t off = (Py_ssize_t)(spa & (XP_PAGE - 1));
            Py_ssize_t n = XP_PAGE - off < len ? XP_PAGE - off : len;
            if (in->pages != NULL && len > n) {
                prefetch_next(in, p + 1, done + n, len - n < XP_PAGE ? len - n : XP_PAGE);
            }
            (ks->wide ? xex_vaes_run : xex_vaes256_run)(span_at(out, p, done, off), span_at(in, p, done, off),
                                                        in_page[off / BLOCK], t[0], t[1], n / BLOCK, ks->k1, pre,
                                                        post, !encrypt);
            spa += (uint64_t)n;
            len -= n;
            done += n;
            p++;
            if (len > 0) {
                spa = span_spa(in, out, p, spa);
                page_tweak_step(page, spa, consts, nbits, t);
                page = spa;
            }
        }
        return 0;
    }
#endif
    (void)ks;
    while (len > 0) {
        Py_ssize_t off = (Py_ssize_t)(spa & (XP_PAGE - 1));
        Py_ssize_t n = XP_PAGE - off < len ? XP_PAGE - off : len;
        const uint64_t *inp = in_page[off / BLOCK];
        const unsigned char *src = span_at(in, p, done, off);
        unsigned char *dst = span_at(out, p, done, off);
        const unsigned char *aes_in = pre ? tmp : src;
        unsigned char *aes_out = post ? tmp : dst;
        int out_len = 0;
        if (pre) {
            xor_run(isa, tmp, src, inp, t[0], t[1], n / BLOCK, 0);
        }
        if (len > n) {
            prefetch_next(in, p + 1, done + n, len - n < XP_PAGE ? len - n : XP_PAGE);
        }
        if ((encrypt ? EVP_EncryptUpdate(ctx, aes_out, &out_len, aes_in, (int)n)
                     : EVP_DecryptUpdate(ctx, aes_out, &out_len, aes_in, (int)n)) != 1 || out_len != (int)n) {
            return -1;
        }
        if (post) {
            xor_run(isa, dst, tmp, inp, t[0], t[1], n / BLOCK, stream);
        }
        spa += (uint64_t)n;
        len -= n;
        done += n;
        p++;
        if (len > 0) {
            spa = span_spa(in, out, p, spa);
            page_tweak_step(page, spa, consts, nbits, t);
            page = spa;
        }
    }
    if (stream) {
        STREAM_FENCE();
    }
    return 0;
}

/* AES-256-XTS with 64-byte data units (the sequence number of a unit is its SPA >> 6), per page as
 * xex_pages_run: the page's unit tweaks E_K2(n) in one AES call, the page's mask (E_K2(n) * alpha^j
 * for each block j of each unit: xts_page_mask) once into an L1 buffer, input ^ mask into tmp, AES
 * (K1) in place, tmp ^ mask into the output (non-temporal stores with `stream`); spa and len are
 * multiples of 64.  0, or -1 when OpenSSL failed. */
static int xts_pages_run(const Span *in, const Span *out, int stream, uint64_t spa, Py_ssize_t len,
                         EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *tweak_ctx, const EngineKeys *ks, int encrypt)
{
    unsigned char seq[XP_PAGE / 4];
    /* mask, then tmp 3 lines past the next page offset (x86's "4K aliasing", see xex_pages_run) */
    uint64_t words[2 * (XP_PAGE / 8) + 3 * 8] ALIGNED64;
    uint64_t *mask = words;
    unsigned char *tmp = (unsigned char *)(words + XP_PAGE / 8 + 3 * 8);
    Py_ssize_t p = 0, done = 0;
    int isa = isa_current();
#ifdef HAVE_VAES
    if (ks != NULL) {
        /* The VAES engine: one pass per page, ordinary stores whatever `stream` says (256 MiB
         * encrypted and decrypted on a Zen 4 EPYC VM: 7.7 GB/s with them, 6.8 with non-temporal
         * stores; software prefetch 1-4 KiB ahead within 2%, so none). */
        (void)stream;
        while (len > 0) {
            Py_ssize_t off = (Py_ssize_t)(spa & (XP_PAGE - 1));
            Py_ssize_t n = XP_PAGE - off < len ? XP_PAGE - off : len;
            unsigned char *dst = span_at(out, p, done, off);
            if (in->pages != NULL && len > n) { /* (a page store's next page is elsewhere) */
                prefetch_next(in, p + 1, done + n, len - n < XP_PAGE ? len - n : XP_PAGE);
            }
            (ks->wide ? xts_vaes_run : xts_vaes256_run)(dst, span_at(in, p, done, off), spa >> 6, n / 64, ks,
                                                        !encrypt);
            spa += (uint64_t)n;
            len -= n;
            done += n;
            p++;
            if (len > 0) {
                spa = span_spa(in, out, p, spa);
            }
        }
        return 0;
    }
#endif
    (void)ks;
    while (len > 0) {
        Py_ssize_t off = (Py_ssize_t)(spa & (XP_PAGE - 1));
        Py_ssize_t n = XP_PAGE - off < len ? XP_PAGE - off : len;
        Py_ssize_t units = n / 64, u;
        int out_len = 0;
        for (u = 0; u < units; u++) {
            store_le64(seq + BLOCK * u, (spa >> 6) + (uint64_t)u);
            store_le64(seq + BLOCK * u + 8, 0);
        }
        if (EVP_EncryptUpdate(tweak_ctx, seq, &out_len, seq, (int)(BLOCK * units)) != 1 ||
            out_len != (int)(BLOCK * units)) {
            return -1;
        }
        xts_page_mask(isa, (unsigned char *)mask, seq, units);
        xor_run(isa, tmp, span_at(in, p, done, off), mask, 0, 0, n / BLOCK, 0);
        if (len > n) {
            prefetch_next(in, p + 1, done + n, len - n < XP_PAGE ? len - n : XP_PAGE);
        }
        if ((encrypt ? EVP_EncryptUpdate(ctx, tmp, &out_len, tmp, (int)n)
                     : EVP_DecryptUpdate(ctx, tmp, &out_len, tmp, (int)n)) != 1 || out_len != (int)n) {
            return -1;
        }
        xor_run(isa, span_at(out, p, done, off), tmp, mask, 0, 0, n / BLOCK, stream);
        spa += (uint64_t)n;
        len -= n;
        done += n;
        p++;
        if (len > 0) {
            spa = span_spa(in, out, p, spa);
        }
    }
    if (stream) {
        STREAM_FENCE();
    }
    return 0;
}

/* The arguments crypt_pages, crypt_from_pages and crypt_into share: (pages, spa, data, consts, key,
 * code, encrypt), checked; the three buffers acquired (released again on failure).  0, or -1 with
 * an exception set.  pages NULL: none (crypt_into, whose first argument is its output). */
typedef struct {
    PyObject *pages;
    uint64_t spa;
    Py_buffer data, consts, key;
    Py_ssize_t nbits;
    long code;
    int encrypt;
    int engine; /* the AES engine of the run (engine_current() when the arguments were taken) */
} CryptArgs;

static int crypt_args(const char *name, PyObject *const *args, Py_ssize_t nargs, int writable, CryptArgs *a)
{
    int granule;
    if (check_nargs(name, nargs, 7, 7) < 0 || get_u64(args[1], "spa", &a->spa) < 0) {
        return -1;
    }
    a->pages = args[0];
    if (a->pages != NULL && !PyDict_CheckExact(a->pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict");
        return -1;
    }
    a->code = PyLong_AsLong(args[5]);
    if (a->code == -1 && PyErr_Occurred()) {
        return -1;
    }
    a->encrypt = PyObject_IsTrue(args[6]);
    if (a->encrypt < 0) {
        return -1;
    }
    a->engine = engine_current();
    if (a->code < 0 || a->code > 2) {
        PyErr_SetString(PyExc_ValueError, "code must be 0 (XE), 1 (XEX) or 2 (XTS)");
        return -1;
    }
    granule = a->code == 2 ? 64 : BLOCK;
    if (PyObject_GetBuffer(args[2], &a->data, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(args[3], &a->consts, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&a->data);
        return -1;
    }
    if (PyObject_GetBuffer(args[4], &a->key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&a->consts);
        PyBuffer_Release(&a->data);
        return -1;
    }
    a->nbits = a->consts.len / BLOCK;
    if (a->data.len % granule || a->spa % (uint64_t)granule) {
        PyErr_Format(PyExc_ValueError, "spa and the data's length must be multiples of %d", granule);
    } else if (a->consts.len % BLOCK || a->nbits < PAGE_SHIFT || a->nbits > MAX_BITS) {
        PyErr_Format(PyExc_ValueError, "consts must be 16 * pa_bits bytes with 12 <= pa_bits <= 63, not %zd",
                     a->consts.len);
    } else if (a->spa >> a->nbits || (uint64_t)a->data.len > ((uint64_t)1 << a->nbits) - a->spa) {
        PyErr_Format(PyExc_ValueError, "the span is outside the %zd-bit address space", a->nbits);
    } else if (a->key.len != (a->code == 2 ? 64 : 16)) {
        PyErr_SetString(PyExc_ValueError, a->code == 2 ? "key must be 64 bytes (AES-256-XTS: K1 || K2)"
                                                       : "key must be 16 bytes (AES-128)");
    } else {
        return 0;
    }
    PyBuffer_Release(&a->key);
    PyBuffer_Release(&a->consts);
    PyBuffer_Release(&a->data);
    return -1;
}

static void crypt_args_release(CryptArgs *a)
{
    PyBuffer_Release(&a->key);
    PyBuffer_Release(&a->consts);
    PyBuffer_Release(&a->data);
}

/* AES-128-ECB (bits 128) or AES-256-ECB, fetched once: OpenSSL 3 would otherwise look the algorithm
 * up again at every EVP_EncryptInit_ex of EVP_aes_*_ecb() (a few microseconds of every page-sized
 * call).  The fetched methods are process-wide and never freed; without EVP_CIPHER_fetch (OpenSSL
 * 1.1) or when it fails, the built-in ones. */
static const EVP_CIPHER *aes_ecb(int bits)
{
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    static const EVP_CIPHER *fetched[2] = {NULL, NULL};
    int i = bits == 256;
    if (fetched[i] == NULL) {
        fetched[i] = EVP_CIPHER_fetch(NULL, i ? "AES-256-ECB" : "AES-128-ECB", NULL);
    }
    if (fetched[i] != NULL) {
        return fetched[i];
    }
#endif
    return bits == 256 ? EVP_aes_256_ecb() : EVP_aes_128_ecb();
}

/* The AES-ECB contexts of a run (the tweak context for XTS only), none when a VAES engine runs it
 * (setting them up cost a microsecond of every page-sized call for nothing); 0, or -1 with
 * RuntimeError. */
static int crypt_contexts(const char *name, const CryptArgs *a, EVP_CIPHER_CTX **ctx, EVP_CIPHER_CTX **tweak_ctx)
{
    const EVP_CIPHER *aes = aes_ecb(a->code == 2 ? 256 : 128);
    const unsigned char *k = (const unsigned char *)a->key.buf;
    if (a->engine != ENGINE_OPENSSL) {
        return 0;
    }
    *ctx = EVP_CIPHER_CTX_new();
    if (*ctx == NULL ||
        (a->encrypt ? EVP_EncryptInit_ex(*ctx, aes, NULL, k, NULL) : EVP_DecryptInit_ex(*ctx, aes, NULL, k, NULL)) != 1 ||
        EVP_CIPHER_CTX_set_padding(*ctx, 0) != 1 ||
        (a->code == 2 && ((*tweak_ctx = EVP_CIPHER_CTX_new()) == NULL ||
                          EVP_EncryptInit_ex(*tweak_ctx, aes, NULL, k + 32, NULL) != 1 ||
                          EVP_CIPHER_CTX_set_padding(*tweak_ctx, 0) != 1))) {
        PyErr_Format(PyExc_RuntimeError, "%s: OpenSSL could not set up AES-ECB", name);
        return -1;
    }
    return 0;
}

/* The run itself, the GIL released (beyond a page): 0, or -1 with RuntimeError. */
static int crypt_run(const char *name, const CryptArgs *a, const Span *in, const Span *out, int stream,
                     EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *tweak_ctx)
{
    int failed;
    const unsigned char *consts = (const unsigned char *)a->consts.buf;
    Py_ssize_t len = a->data.len;
    int nbits = (int)a->nbits, encrypt = a->encrypt, pre = encrypt || a->code == 1, post = !encrypt || a->code == 1;
    long code = a->code;
    uint64_t spa = a->spa;
    EngineKeys ksbuf;
    const EngineKeys *ks = engine_keys(&ksbuf, a->engine, (const unsigned char *)a->key.buf, code, encrypt);
    if (len <= XP_PAGE) { /* a page or less (about a microsecond): not worth handing the GIL over */
        failed = code == 2 ? xts_pages_run(in, out, stream, spa, len, ctx, tweak_ctx, ks, encrypt)
                           : xex_pages_run(in, out, stream, spa, len, consts, nbits, ctx, ks, pre, post, encrypt);
    } else {
        Py_BEGIN_ALLOW_THREADS
        failed = code == 2 ? xts_pages_run(in, out, stream, spa, len, ctx, tweak_ctx, ks, encrypt)
                           : xex_pages_run(in, out, stream, spa, len, consts, nbits, ctx, ks, pre, post, encrypt);
        Py_END_ALLOW_THREADS
    }
    if (failed) {
        PyErr_Format(PyExc_RuntimeError, "%s: OpenSSL AES-ECB failed", name);
        return -1;
    }
    return 0;
}

static const unsigned char zero_page[XP_PAGE];

/* The page of `pages` (a dict PFN -> 4096-byte bytearray) at pfn, borrowed, in *page (NULL when
 * absent); 0, or -1 with an exception set (TypeError for a page of another type or size). */
static int page_at(PyObject *pages, uint64_t pfn, PyObject **page)
{
    PyObject *key = PyLong_FromUnsignedLongLong(pfn);
    if (key == NULL) {
        return -1;
    }
    *page = PyDict_GetItemWithError(pages, key);
    Py_DECREF(key);
    if (*page == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyByteArray_CheckExact(*page) || PyByteArray_GET_SIZE(*page) != XP_PAGE) {
        PyErr_SetString(PyExc_TypeError, "a page must be a bytearray of 4096 bytes");
        return -1;
    }
    return 0;
}

/* The pages of a page store a crypt_* call writes: every page of [spa, spa+len) held writable
 * (ptrs: their buffers), absent ones created zeroed.  page_set_take: 0; 1 when one of the pages
 * overlaps `avoid` (the caller writes nothing: its other path); -1 with an exception set.  The
 * pages' types are checked before any is created.  page_set_drop (also after a failure): the
 * buffers released, and pages the call created that are still all zeros removed again (as if
 * unwritten, as Dram.write leaves them). */
typedef struct {
    PyObject *pages;
    uint64_t first_pfn;
    Py_ssize_t owned, held;
    PageRef *refs;
    unsigned char **ptrs;
    const uint64_t *pfns; /* page i's PFN when listed (page_set_take_list), else first_pfn + i */
} PageSet;

static uint64_t page_set_pfn(const PageSet *ps, Py_ssize_t i)
{
    return ps->pfns != NULL ? ps->pfns[i] : ps->first_pfn + (uint64_t)i;
}

static int page_set_take_pages(PageSet *ps, PyObject *pages, Py_ssize_t npages, const char *avoid,
                               Py_ssize_t avoid_len);

static int page_set_take(PageSet *ps, PyObject *pages, uint64_t spa, Py_ssize_t len, const char *avoid,
                         Py_ssize_t avoid_len)
{
    ps->first_pfn = spa >> PAGE_SHIFT;
    ps->pfns = NULL;
    return page_set_take_pages(ps, pages, (Py_ssize_t)(((spa + (uint64_t)len - 1) >> PAGE_SHIFT) - ps->first_pfn + 1),
                               avoid, avoid_len);
}

/* page_set_take of the pages at pfns[0..npages) (distinct: a repeated PFN would be created twice). */
static int page_set_take_list(PageSet *ps, PyObject *pages, const uint64_t *pfns, Py_ssize_t npages,
                              const char *avoid, Py_ssize_t avoid_len)
{
    ps->first_pfn = 0;
    ps->pfns = pfns;
    return page_set_take_pages(ps, pages, npages, avoid, avoid_len);
}

static int page_set_take_pages(PageSet *ps, PyObject *pages, Py_ssize_t npages, const char *avoid,
                               Py_ssize_t avoid_len)
{
    Py_ssize_t i;
    ps->pages = pages;
    ps->refs = (PageRef *)PyMem_Calloc((size_t)npages, sizeof(PageRef));
    ps->ptrs = (unsigned char **)PyMem_Calloc((size_t)npages, sizeof(*ps->ptrs));
    if (ps->refs == NULL || ps->ptrs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < npages; i++) {
        /* borrowed until the next loop takes a reference (not dropped on errors) */
        if (page_at(pages, page_set_pfn(ps, i), &ps->refs[i].obj) < 0) {
            return -1;
        }
    }
    for (i = 0; i < npages; i++) {
        PyObject *page = ps->refs[i].obj;
        if (page == NULL) {
            PyObject *key;
            int rc;
            page = PyByteArray_FromStringAndSize(NULL, XP_PAGE);
            if (page == NULL) {
                return -1;
            }
            memset(PyByteArray_AS_STRING(page), 0, XP_PAGE);
            key = PyLong_FromUnsignedLongLong(page_set_pfn(ps, i));
            rc = key == NULL ? -1 : PyDict_SetItem(pages, key, page);
            Py_XDECREF(key);
            if (rc < 0) {
                Py_DECREF(page);
                return -1;
            }
            ps->refs[i].created = 1;
        } else {
            Py_INCREF(page);
        }
        ps->refs[i].obj = page;
        ps->owned = i + 1;
        if (PyObject_GetBuffer(page, &ps->refs[i].view, PyBUF_WRITABLE) < 0) {
            return -1;
        }
        ps->held = i + 1;
        ps->ptrs[i] = (unsigned char *)ps->refs[i].view.buf;
        if (avoid != NULL) {
            const char *lo = (const char *)ps->refs[i].view.buf;
            if (avoid < lo + XP_PAGE && lo < avoid + avoid_len) {
                return 1;
            }
        }
    }
    return 0;
}

static void page_set_drop(PageSet *ps)
{
    Py_ssize_t i;
    for (i = 0; i < ps->held; i++) {
        PyBuffer_Release(&ps->refs[i].view);
    }
    for (i = 0; i < ps->owned; i++) {
        if (ps->refs[i].created && !memcmp(PyByteArray_AS_STRING(ps->refs[i].obj), zero_page, XP_PAGE)) {
            PyObject *key = PyLong_FromUnsignedLongLong(page_set_pfn(ps, i));
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb); /* (an error of the call stays the one raised) */
            if (key == NULL || PyDict_DelItem(ps->pages, key) < 0) {
                PyErr_Clear();
            }
            Py_XDECREF(key);
            PyErr_Restore(type, value, tb);
        }
        Py_DECREF(ps->refs[i].obj);
    }
    PyMem_Free(ps->refs);
    PyMem_Free(ps->ptrs);
}

PyDoc_STRVAR(crypt_pages_doc,
             "crypt_pages(pages, spa, src, consts, key, code, encrypt, /)\n--\n\n"
             "XE (code 0) or XEX (code 1) with the AES-128 key `key`, or AES-256-XTS (code 2, 64-byte\n"
             "data units, key K1 || K2 of 64 bytes), of src (16-byte blocks; XTS: 64-byte units) at\n"
             "spa (aligned alike), encrypted (or decrypted) into the page store `pages` (a dict PFN ->\n"
             "4096-byte bytearray; absent pages are created unless their part of the result is all\n"
             "zeros).  consts as for xor_addr_tweak (checked, unused by XTS).  True when done; False,\n"
             "with nothing changed, when src overlaps one of the pages.  The same pages as the\n"
             "bulk path's passes and a scatter.");

static PyObject *crypt_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL;
    CryptArgs a;
    PageSet ps = {NULL, 0, 0, 0, NULL, NULL};
    EVP_CIPHER_CTX *ctx = NULL, *tweak_ctx = NULL;
    int taken;
    (void)self;

    if (crypt_args("crypt_pages", args, nargs, 0, &a) < 0) {
        return NULL;
    }
    if (a.data.len == 0) {
        result = Py_NewRef(Py_True);
        goto done;
    }
    taken = page_set_take(&ps, a.pages, a.spa, a.data.len, (const char *)a.data.buf, a.data.len);
    if (taken == 1) { /* src overlaps a page: nothing written, the caller's other path */
        result = Py_NewRef(Py_False);
    } else if (taken == 0) {
        Span src = {NULL, (unsigned char *)a.data.buf}, dst = {ps.ptrs, NULL};
        if (crypt_contexts("crypt_pages", &a, &ctx, &tweak_ctx) == 0 &&
            crypt_run("crypt_pages", &a, &src, &dst, 1, ctx, tweak_ctx) == 0) {
            result = Py_NewRef(Py_True);
        }
    }
done:
    page_set_drop(&ps);
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_CTX_free(tweak_ctx);
    crypt_args_release(&a);
    return result;
}

PyDoc_STRVAR(crypt_from_pages_doc,
             "crypt_from_pages(pages, spa, dst, consts, key, code, encrypt, /)\n--\n\n"
             "XE (code 0) / XEX (code 1, AES-128 key) / XTS (code 2, K1 || K2) of the bytes of the page\n"
             "store `pages` (dict PFN -> 4096-byte bytearray; an absent page reads as zeros) at spa,\n"
             "len(dst) bytes (16-byte blocks; XTS: 64-byte units, spa aligned alike), into dst.  True when\n"
             "done; False, with nothing written, when dst overlaps one of the pages.  The same bytes as\n"
             "gathering the pages and the bulk path's passes.");

/* crypt_from_pages: the reverse direction of crypt_pages -- the pages of a page store (an absent
 * page reads as zeros) transformed into one contiguous buffer, per page through a 4 KiB buffer that
 * stays in L1 (the bulk path instead gathers the pages into the buffer and makes three passes over
 * it).  The pages' buffers are held (a bytearray with an export cannot be resized) while the GIL is
 * released. */
/* crypt_from_pages and crypt_gather: the pages of a->pages at the PFNs pfns[0..npages) (pfns NULL:
 * consecutive from a->spa's page) transformed into a->data (a->spa: the first page's SPA plus the
 * offset).  A new reference to True, to False when dst overlaps one of the pages (nothing written),
 * or NULL with an exception set. */
static PyObject *from_pages_run(const char *name, const CryptArgs *a, const uint64_t *pfns, Py_ssize_t npages)
{
    PyObject *result = NULL;
    Py_buffer *views = NULL;
    unsigned char **in = NULL;
    uint64_t first_pfn = a->spa >> PAGE_SHIFT;
    Py_ssize_t held = 0, i;
    EVP_CIPHER_CTX *ctx = NULL, *tweak_ctx = NULL;
    views = (Py_buffer *)PyMem_Calloc((size_t)npages, sizeof(Py_buffer));
    in = (unsigned char **)PyMem_Calloc((size_t)npages, sizeof(*in));
    if (views == NULL || in == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < npages; i++) {
        PyObject *page;
        if (page_at(a->pages, pfns != NULL ? pfns[i] : first_pfn + (uint64_t)i, &page) < 0) {
            goto done;
        }
        if (page == NULL) {
            in[i] = (unsigned char *)zero_page; /* (only read: the run writes dst) */
            continue;
        }
        if (PyObject_GetBuffer(page, &views[i], PyBUF_SIMPLE) < 0) {
            goto done;
        }
        held = i + 1;
        in[i] = (unsigned char *)views[i].buf;
        {
            const char *lo = (const char *)views[i].buf, *d = (const char *)a->data.buf;
            if (d < lo + XP_PAGE && lo < d + a->data.len) { /* nothing written: the caller's other path */
                result = Py_NewRef(Py_False);
                goto done;
            }
        }
    }
    {
        Span src = {in, NULL, pfns}, dst = {NULL, (unsigned char *)a->data.buf, NULL};
        if (crypt_contexts(name, a, &ctx, &tweak_ctx) < 0 || crypt_run(name, a, &src, &dst, 0, ctx, tweak_ctx) < 0) {
            goto done;
        }
    }
    result = Py_NewRef(Py_True);
done:
    for (i = 0; i < held; i++) {
        if (views[i].obj != NULL) {
            PyBuffer_Release(&views[i]);
        }
    }
    PyMem_Free(views);
    PyMem_Free(in);
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_CTX_free(tweak_ctx);
    return result;
}

static PyObject *crypt_from_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result;
    CryptArgs a;
    (void)self;

    if (crypt_args("crypt_from_pages", args, nargs, 1, &a) < 0) {
        return NULL;
    }
    if (a.data.len == 0) {
        result = Py_NewRef(Py_True);
    } else {
        uint64_t first_pfn = a.spa >> PAGE_SHIFT;
        Py_ssize_t npages = (Py_ssize_t)(((a.spa + (uint64_t)a.data.len - 1) >> PAGE_SHIFT) - first_pfn + 1);
        result = from_pages_run("crypt_from_pages", &a, NULL, npages);
    }
    crypt_args_release(&a);
    return result;
}

PyDoc_STRVAR(crypt_gather_doc,
             "crypt_gather(pages, pfns, dst, consts, key, code, encrypt, /)\n--\n\n"
             "crypt_from_pages of whole pages that need not be consecutive: page k of dst (4096 bytes\n"
             "per PFN) is the transform of the page store's page pfns[k] (native u64s, e.g. a numpy\n"
             "uint64 array; an absent page reads as zeros) at SPA pfns[k] << 12.  True when done; False,\n"
             "with nothing written, when dst overlaps one of the pages.  The same bytes as\n"
             "crypt_from_pages of each page.");

/* The arguments crypt_gather and crypt_scatter share, (pages, pfns, data, consts, key, code,
 * encrypt): checked as crypt_args' (with spa 0), data 4096 bytes per PFN, the PFNs copied into *pfns
 * (PyMem; the run releases the GIL) and each checked against the address space, a->spa the first
 * page's SPA.  0 (*pfns NULL when there are none), or -1 with an exception set and nothing held. */
static int pfn_list_args(const char *name, PyObject *const *args, Py_ssize_t nargs, int writable, CryptArgs *a,
                         uint64_t **pfns, Py_ssize_t *count)
{
    PyObject *argv[7], *zero;
    Py_buffer pv;
    Py_ssize_t i;
    int rc;
    *pfns = NULL;
    if (check_nargs(name, nargs, 7, 7) < 0 || (zero = PyLong_FromLong(0)) == NULL) {
        return -1;
    }
    for (i = 0; i < 7; i++) {
        argv[i] = i == 1 ? zero : args[i];
    }
    rc = crypt_args(name, argv, 7, writable, a);
    Py_DECREF(zero);
    if (rc < 0) {
        return -1;
    }
    if (PyObject_GetBuffer(args[1], &pv, PyBUF_SIMPLE) < 0) {
        crypt_args_release(a);
        return -1;
    }
    *count = pv.len / 8;
    rc = -1;
    if (pv.len % 8) {
        PyErr_Format(PyExc_ValueError, "pfns must be native 8-byte integers, not %zd bytes", pv.len);
    } else if (a->data.len != *count * XP_PAGE) {
        PyErr_Format(PyExc_ValueError, "the data has %zd bytes for %zd pages (4096 bytes each)", a->data.len,
                     *count);
    } else if (*count > 0 && (*pfns = (uint64_t *)PyMem_Malloc((size_t)*count * 8)) == NULL) {
        PyErr_NoMemory();
    } else {
        if (*count > 0) {
            memcpy(*pfns, pv.buf, (size_t)*count * 8);
        }
        for (i = 0; i < *count && ((*pfns)[i] >> (a->nbits - PAGE_SHIFT)) == 0; i++) {
        }
        if (i < *count) {
            PyErr_Format(PyExc_ValueError, "PFN %#llx is outside the %zd-bit address space",
                         (unsigned long long)(*pfns)[i], a->nbits);
        } else {
            a->spa = *count > 0 ? (*pfns)[0] << PAGE_SHIFT : 0;
            rc = 0;
        }
    }
    PyBuffer_Release(&pv);
    if (rc < 0) {
        PyMem_Free(*pfns);
        *pfns = NULL;
        crypt_args_release(a);
    }
    return rc;
}

static PyObject *crypt_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result;
    CryptArgs a;
    uint64_t *pfns;
    Py_ssize_t count;
    (void)self;

    if (pfn_list_args("crypt_gather", args, nargs, 1, &a, &pfns, &count) < 0) {
        return NULL;
    }
    result = count == 0 ? Py_NewRef(Py_True) : from_pages_run("crypt_gather", &a, pfns, count);
    PyMem_Free(pfns);
    crypt_args_release(&a);
    return result;
}

PyDoc_STRVAR(crypt_scatter_doc,
             "crypt_scatter(pages, pfns, src, consts, key, code, encrypt, /)\n--\n\n"
             "crypt_pages of whole pages that need not be consecutive: page k of src (4096 bytes per\n"
             "PFN) transformed into the page store's page pfns[k] (native u64s; absent pages are\n"
             "created unless their result is all zeros) at SPA pfns[k] << 12.  True when done; False,\n"
             "with nothing changed, when a PFN repeats or src overlaps one of the pages.  The same\n"
             "pages as crypt_pages of each page.");

static int u64_cmp(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return (a > b) - (a < b);
}

/* Whether a PFN list repeats one (sorted copy; 0 or 1, -1 with MemoryError). */
static int pfns_repeat(const uint64_t *pfns, Py_ssize_t count)
{
    uint64_t *sorted;
    Py_ssize_t i;
    int repeat = 0;
    if (count < 2) {
        return 0;
    }
    sorted = (uint64_t *)PyMem_Malloc((size_t)count * 8);
    if (sorted == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(sorted, pfns, (size_t)count * 8);
    qsort(sorted, (size_t)count, 8, u64_cmp);
    for (i = 1; i < count && !repeat; i++) {
        repeat = sorted[i] == sorted[i - 1];
    }
    PyMem_Free(sorted);
    return repeat;
}

static PyObject *crypt_scatter(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL;
    CryptArgs a;
    PageSet ps = {NULL, 0, 0, 0, NULL, NULL, NULL};
    EVP_CIPHER_CTX *ctx = NULL, *tweak_ctx = NULL;
    uint64_t *pfns;
    Py_ssize_t count;
    int repeat, taken;
    (void)self;

    if (pfn_list_args("crypt_scatter", args, nargs, 0, &a, &pfns, &count) < 0) {
        return NULL;
    }
    if (count == 0) {
        result = Py_NewRef(Py_True);
        goto done;
    }
    repeat = pfns_repeat(pfns, count);
    if (repeat != 0) { /* a repeated page: the caller's other path, page by page in order */
        result = repeat < 0 ? NULL : Py_NewRef(Py_False);
        goto done;
    }
    taken = page_set_take_list(&ps, a.pages, pfns, count, (const char *)a.data.buf, a.data.len);
    if (taken == 1) { /* src overlaps a page: nothing written */
        result = Py_NewRef(Py_False);
    } else if (taken == 0) {
        Span src = {NULL, (unsigned char *)a.data.buf, NULL}, dst = {ps.ptrs, NULL, pfns};
        if (crypt_contexts("crypt_scatter", &a, &ctx, &tweak_ctx) == 0 &&
            crypt_run("crypt_scatter", &a, &src, &dst, 1, ctx, tweak_ctx) == 0) {
            result = Py_NewRef(Py_True);
        }
    }
done:
    page_set_drop(&ps);
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_CTX_free(tweak_ctx);
    PyMem_Free(pfns);
    crypt_args_release(&a);
    return result;
}

/* Results this large or larger leave through non-temporal stores (they exceed the CPU's caches). */
#define STREAM_MIN ((Py_ssize_t)4 << 20)

/* The (dst, spa, src, consts, key, code, encrypt) head of crypt_into and crypt_into_via: dst acquired
 * writable and the rest checked (crypt_args, no page store).  -1 with an exception set and nothing held;
 * otherwise both held and 0 to run, 1 when dst overlaps src other than exactly (the answer: False,
 * nothing written), 2 when src is empty (the answer: True). */
static int into_args(const char *name, PyObject *const *args, Py_buffer *dstv, CryptArgs *a)
{
    PyObject *sub[7] = {NULL, args[1], args[2], args[3], args[4], args[5], args[6]};
    const unsigned char *d, *s;
    if (PyObject_GetBuffer(args[0], dstv, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (crypt_args(name, sub, 7, 0, a) < 0) {
        PyBuffer_Release(dstv);
        return -1;
    }
    if (dstv->len != a->data.len) {
        PyErr_Format(PyExc_ValueError, "dst has %zd bytes for %zd bytes of src", dstv->len, a->data.len);
        crypt_args_release(a);
        PyBuffer_Release(dstv);
        return -1;
    }
    d = (const unsigned char *)dstv->buf;
    s = (const unsigned char *)a->data.buf;
    if (d != s && s < d + dstv->len && d < s + a->data.len) {
        return 1;
    }
    return a->data.len == 0 ? 2 : 0;
}

PyDoc_STRVAR(crypt_into_doc,
             "crypt_into(dst, spa, src, consts, key, code, encrypt, /)\n--\n\n"
             "crypt_pages' transform of src at spa into one writable buffer dst of len(src) bytes\n"
             "(may be src itself).  True when done; False, with nothing written, when dst overlaps src\n"
             "other than exactly.  The same bytes as the bulk path's three passes.");

/* crypt_into: the bulk path of MemoryCipher (encrypt_bulk_into / decrypt_bulk_into): the per-page
 * fused transform between two contiguous buffers. */
static PyObject *crypt_into(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL;
    CryptArgs a;
    Py_buffer dstv;
    EVP_CIPHER_CTX *ctx = NULL, *tweak_ctx = NULL;
    int state;
    (void)self;

    if (check_nargs("crypt_into", nargs, 7, 7) < 0 || (state = into_args("crypt_into", args, &dstv, &a)) < 0) {
        return NULL;
    }
    if (state > 0) {
        result = Py_NewRef(state == 1 ? Py_False : Py_True);
    } else {
        Span src = {NULL, (unsigned char *)a.data.buf}, dst = {NULL, (unsigned char *)dstv.buf};
        if (crypt_contexts("crypt_into", &a, &ctx, &tweak_ctx) == 0 &&
            crypt_run("crypt_into", &a, &src, &dst, a.data.len >= STREAM_MIN, ctx, tweak_ctx) == 0) {
            result = Py_NewRef(Py_True);
        }
    }
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_CTX_free(tweak_ctx);
    crypt_args_release(&a);
    PyBuffer_Release(&dstv);
    return result;
}

/* ---- the bulk path with the AES of `cryptography` (crypt_into_via) ---------------------------
 *
 * crypt_into's AES-ECB comes from the system libcrypto, which may lack the VAES code paths (OpenSSL
 * 3.0 has AES-NI only for ECB).  The OpenSSL that `cryptography` bundles runs AES-XTS on VAES /
 * AVX-512 where the CPU has them (its ECB is AES-NI there too): on a Zen 4 EPYC 1.5x (AES-128) and
 * 1.7x (AES-256) the ECB speed in cache.  XTS encrypts block i of a data unit as
 * C_i = E_K1(P_i ^ M_i) ^ M_i with M_i = E_K2(iv) * alpha^i (IEEE 1619-2018, 5.3.1), so with
 * iv = D_K2(0) every mask is zero and an XTS context is an ECB context under K1 (K2 is a fixed key
 * != K1: OpenSSL refuses equal halves).  OpenSSL's XTS treats each update call as a whole data unit
 * from the context's iv (every call here is a whole number of blocks, no ciphertext stealing), so one
 * context per direction serves every chunk; MemoryCipher checks both properties at first use and
 * takes crypt_into when they do not hold.
 *
 * The AES is reached through the context's bound update_into, one call per chunk of 4 KiB to 1 MiB
 * (memenc: 128-256 KiB; a call costs ~0.3-0.5 us, against ~10 us of AES-256 on 128 KiB); the passes
 * around it are crypt_into's, per chunk instead of per page (the chunk stays in L2): XE/XEX the
 * address tweak before and after (XE encryption: none after; XE decryption: none before, the AES
 * reads the input), XTS the unit tweaks E_K2(n_u) of the chunk in one AES call (through a second
 * zero-mask context under K2, or the system libcrypto's ECB) and their masks made on the fly
 * (xts_run) before and after.  The AES writes the output and the second pass runs in place there,
 * merged with the next chunk's first pass, whose input is hinted into L2 ahead (via_run). */

#define VIA_CHUNK_MAX ((Py_ssize_t)1 << 20)
/* The merged pass's step (bytes of each side) and how far ahead of chunk k+1's first pass its input
 * is hinted into L2 (measured on the EPYC VM at 256 MiB: 4-16 KiB ahead and 1 KiB steps within a few
 * percent of each other; no hints: 15-20% slower). */
#define VIA_PIECE ((Py_ssize_t)1024)
#define VIA_AHEAD ((Py_ssize_t)16384)

/* Hints for n bytes at p into L2 (x86: PREFETCHT1; elsewhere the compiler's generic hint). */
static void via_hint(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t q;
    for (q = 0; q < n; q += 64) {
#ifdef HAVE_VECTOR_ISA
        _mm_prefetch((const char *)(p + q), _MM_HINT_T1);
#else
        PREFETCH(p + q);
#endif
    }
}

typedef struct {
    int isa, xts_isa, code, encrypt, nbits;
    const unsigned char *consts;
    EVP_CIPHER_CTX *tweak_ctx; /* XTS without tweak_update: AES-256-ECB under K2 */
    PyObject *update, *tweak_update;
    unsigned char *tmp, *tw[2], *seq; /* chunk bytes; XTS: chunk / 4 bytes of unit tweaks, twice, and
                                       * of their sequence numbers (the tweak AES's input) */
    uint64_t in_page[PAGE_BLOCKS][2];
} ViaRun;

/* One XOR pass over a chunk: none, the XE/XEX address tweak (from spa on, its page tweak carried
 * along), or the XTS masks of the unit tweaks tw. */
enum { PASS_NONE = 0, PASS_XEX = 1, PASS_XTS = 2 };
typedef struct {
    int kind;
    unsigned char *dst;
    const unsigned char *src, *tw;
    Py_ssize_t n;
    uint64_t spa, page, t[2];
} ViaPass;

static void pass_init(ViaRun *r, ViaPass *p, int kind, unsigned char *dst, const unsigned char *src, Py_ssize_t n,
                      uint64_t spa, const unsigned char *tw)
{
    p->kind = kind;
    p->dst = dst;
    p->src = src;
    p->n = kind == PASS_NONE ? 0 : n;
    p->tw = tw;
    p->spa = spa;
    p->page = spa & ~(uint64_t)(XP_PAGE - 1);
    if (kind == PASS_XEX) {
        page_tweak(p->page, r->consts, r->nbits, p->t);
    }
}

/* The pass's bytes [at, at + m) (pieces in order). */
static void pass_piece(ViaRun *r, ViaPass *p, Py_ssize_t at, Py_ssize_t m)
{
    Py_ssize_t end;
    if (at >= p->n) {
        return;
    }
    end = at + m < p->n ? at + m : p->n;
    if (p->kind == PASS_XTS) {
        xts_run(r->xts_isa, p->dst + at, p->src + at, p->tw + at / 4, (end - at) / 64, 0);
        return;
    }
    while (at < end) {
        uint64_t page = p->spa & ~(uint64_t)(XP_PAGE - 1);
        Py_ssize_t off = (Py_ssize_t)(p->spa & (XP_PAGE - 1));
        Py_ssize_t k = XP_PAGE - off < end - at ? XP_PAGE - off : end - at;
        if (page != p->page) {
            page_tweak_step(p->page, page, r->consts, r->nbits, p->t);
            p->page = page;
        }
        xor_run(r->isa, p->dst + at, p->src + at, r->in_page[off / BLOCK], p->t[0], p->t[1], k / BLOCK, 0);
        at += k;
        p->spa += (uint64_t)k;
    }
}

/* Chunk k's second pass (a, in place on the output the AES wrote) and chunk k+1's first (b, from the
 * input into tmp) in one loop, piece by piece, with chunk k+1's input (hint, hint_len bytes: what b
 * reads, or what the AES reads when b is PASS_NONE) hinted VIA_AHEAD bytes ahead. */
static void via_merged(ViaRun *r, ViaPass *a, ViaPass *b, const unsigned char *hint, Py_ssize_t hint_len)
{
    Py_ssize_t n = a->n > b->n ? a->n : b->n, at;
    if (hint_len > n) {
        n = hint_len;
    }
    for (at = 0; at < n; at += VIA_PIECE) {
        Py_ssize_t h = at + VIA_AHEAD;
        if (h < hint_len) {
            via_hint(hint + h, hint_len - h < VIA_PIECE ? hint_len - h : VIA_PIECE);
        }
        pass_piece(r, a, at, VIA_PIECE);
        pass_piece(r, b, at, VIA_PIECE);
    }
}

/* update(in, out) over n bytes (the GIL held): 0, or -1 with the exception set.  The memoryviews
 * are released afterwards if anything kept them (they point into buffers this call frees or does
 * not own). */
static int via_call(PyObject *fn, const unsigned char *in, unsigned char *out, Py_ssize_t n)
{
    PyObject *vin, *vout, *res = NULL;
    vin = PyMemoryView_FromMemory((char *)in, n, in == out ? PyBUF_WRITE : PyBUF_READ);
    if (vin == NULL) {
        return -1;
    }
    vout = in == out ? Py_NewRef(vin) : PyMemoryView_FromMemory((char *)out, n, PyBUF_WRITE);
    if (vout != NULL) {
        PyObject *call_args[2] = {vin, vout};
        res = PyObject_Vectorcall(fn, call_args, 2, NULL);
    }
    if ((vout != NULL && Py_REFCNT(vout) > 1 + (vout == vin)) || Py_REFCNT(vin) > 1 + (vout == vin)) {
        PyObject *type, *value, *tb, *r;
        PyErr_Fetch(&type, &value, &tb); /* (the call's exception, if any, kept) */
        if (vout != NULL && vout != vin) {
            r = PyObject_CallMethod(vout, "release", NULL);
            Py_XDECREF(r);
            PyErr_Clear();
        }
        r = PyObject_CallMethod(vin, "release", NULL);
        Py_XDECREF(r);
        PyErr_Clear();
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(vout);
    Py_DECREF(vin);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* E_K2(n_u) of the units of n bytes at spa into tw (XTS); called with the GIL released (*ts), which
 * it takes for the tweak context's call.  0, or -1 with an exception set and the GIL held. */
static int via_tweaks(ViaRun *r, unsigned char *tw, uint64_t spa, Py_ssize_t n, PyThreadState **ts)
{
    Py_ssize_t units = n / 64, u;
    int out_len = 0;
    /* (cryptography 51 refuses an update_into whose output overlaps its input, where 48 took it: the
     * sequence numbers go in a buffer of their own) */
    unsigned char *seq = r->tweak_update != NULL ? r->seq : tw;
    for (u = 0; u < units; u++) {
        store_le64(seq + BLOCK * u, (spa >> 6) + (uint64_t)u);
        store_le64(seq + BLOCK * u + 8, 0);
    }
    if (r->tweak_update != NULL) {
        PyEval_RestoreThread(*ts);
        if (via_call(r->tweak_update, seq, tw, BLOCK * units) != 0) {
            return -1;
        }
        *ts = PyEval_SaveThread();
        return 0;
    }
    if (EVP_EncryptUpdate(r->tweak_ctx, tw, &out_len, tw, (int)(BLOCK * units)) != 1 ||
        out_len != (int)(BLOCK * units)) {
        PyEval_RestoreThread(*ts);
        PyErr_SetString(PyExc_RuntimeError, "crypt_into_via: OpenSSL AES-ECB failed");
        return -1;
    }
    return 0;
}

/* The run, entered and left with the GIL held (released around the passes): 0, or -1 with an
 * exception set.  Per chunk k: its first pass into tmp (XE decryption: none), the AES from tmp (XE
 * decryption: from the input) into the output, then its second pass in place on the output (XE
 * encryption: none) merged with chunk k+1's first pass.  The AES writing the output with ordinary
 * stores (its lines fetched and written back by the cache while other work runs) measured 3-10%
 * faster at 256 MiB than writing tmp and streaming the second pass into the output (non-temporal
 * stores), and needs one tmp buffer instead of two. */
static int via_run(ViaRun *r, unsigned char *d, const unsigned char *s, uint64_t spa, Py_ssize_t len,
                   Py_ssize_t chunk)
{
    int xe_enc = r->code == 0 && r->encrypt, xe_dec = r->code == 0 && !r->encrypt, k = 0;
    int first_kind = xe_dec ? PASS_NONE : r->code == 2 ? PASS_XTS : PASS_XEX;
    int second_kind = xe_enc ? PASS_NONE : r->code == 2 ? PASS_XTS : PASS_XEX;
    Py_ssize_t done = 0, n = len < chunk ? len : chunk;
    ViaPass a, b;
    PyThreadState *ts = PyEval_SaveThread();
    /* chunk 0's first pass */
    if (r->code == 2 && via_tweaks(r, r->tw[0], spa, n, &ts) != 0) {
        return -1;
    }
    pass_init(r, &a, PASS_NONE, NULL, NULL, 0, 0, NULL);
    pass_init(r, &b, first_kind, r->tmp, s, n, spa, r->tw[0]);
    via_merged(r, &a, &b, s, n);
    while (done < len) {
        Py_ssize_t next = len - done - n < chunk ? len - done - n : chunk;
        const unsigned char *src = s + done, *nsrc = s + done + n;
        unsigned char *dst = d + done;
        via_hint(nsrc, next < VIA_AHEAD ? next : VIA_AHEAD);
        PyEval_RestoreThread(ts);
        if (via_call(r->update, xe_dec ? src : r->tmp, dst, n) != 0) {
            return -1;
        }
        ts = PyEval_SaveThread();
        if (next > 0 && r->code == 2 && via_tweaks(r, r->tw[(k + 1) & 1], spa + (uint64_t)n, next, &ts) != 0) {
            return -1;
        }
        pass_init(r, &a, second_kind, dst, dst, n, spa, r->tw[k & 1]);
        pass_init(r, &b, next > 0 ? first_kind : PASS_NONE, r->tmp, nsrc, next, spa + (uint64_t)n, r->tw[(k + 1) & 1]);
        via_merged(r, &a, &b, nsrc, next);
        done += n;
        spa += (uint64_t)n;
        n = next;
        k++;
    }
    PyEval_RestoreThread(ts);
    return 0;
}

PyDoc_STRVAR(crypt_into_via_doc,
             "crypt_into_via(dst, spa, src, consts, key, code, encrypt, update, tweak_update, chunk, /)\n--\n\n"
             "crypt_into's transform with its AES-ECB through `cryptography`: update is the bound\n"
             "update_into of a context that encrypts (decrypts, for encrypt false) AES-ECB under the\n"
             "mode's data key (XTS: K1) -- an AES-XTS context whose tweak encrypts to zero -- called once\n"
             "per chunk of `chunk` bytes (a multiple of 4096, at most 1 MiB); tweak_update (XTS only, or\n"
             "None: the system libcrypto) the same for the unit tweaks' AES-ECB encryption under K2.\n"
             "True when done; False, with nothing written, when dst overlaps src other than exactly, or\n"
             "is src itself for XE decryption (whose AES reads src: crypt_into serves it).");

static PyObject *crypt_into_via(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL;
    CryptArgs a;
    Py_buffer dstv;
    Py_ssize_t chunk;
    int state;
    (void)self;

    if (check_nargs("crypt_into_via", nargs, 10, 10) < 0) {
        return NULL;
    }
    chunk = PyLong_AsSsize_t(args[9]);
    if (chunk == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (chunk <= 0 || chunk % XP_PAGE || chunk > VIA_CHUNK_MAX) {
        PyErr_SetString(PyExc_ValueError, "chunk must be a positive multiple of 4096, at most 1 MiB");
        return NULL;
    }
    if (!PyCallable_Check(args[7]) || (args[8] != Py_None && !PyCallable_Check(args[8]))) {
        PyErr_SetString(PyExc_TypeError, "update and tweak_update must be callable (tweak_update: or None)");
        return NULL;
    }
    if ((state = into_args("crypt_into_via", args, &dstv, &a)) < 0) {
        return NULL;
    }
    if (state == 0 && a.code == 0 && !a.encrypt && dstv.buf == a.data.buf) {
        state = 1; /* XE decryption in place: its AES reads the input and writes the output, which
                    * cryptography after 48 refuses to overlap -- False, and the caller takes crypt_into */
    }
    if (state > 0) {
        result = Py_NewRef(state == 1 ? Py_False : Py_True);
    } else {
        unsigned char *d = (unsigned char *)dstv.buf;
        const unsigned char *s = (const unsigned char *)a.data.buf;
        ViaRun *r = (ViaRun *)PyMem_Calloc(1, sizeof(ViaRun));
        /* tmp, then the unit tweaks and their sequence numbers, each 3 lines past the previous
         * buffer's page offset (4K aliasing, see xex_pages_run) */
        void *raw = PyMem_Malloc((size_t)(chunk + 3 * (chunk / 4) + 3 * 3 * 64 + 64));
        if (r == NULL || raw == NULL) {
            PyErr_NoMemory();
        } else {
            int best = isa_supported();
            r->isa = isa_current();
            /* (the XTS masks made on the fly: AVX-512 where the CPU has it unless vector_isa set a
             * level -- measured 8-15% faster than AVX2 here, where the XORs alone were not) */
            r->xts_isa = !isa_forced && best == ISA_AVX512 ? ISA_AVX512 : r->isa;
            r->code = (int)a.code;
            r->encrypt = a.encrypt;
            r->nbits = (int)a.nbits;
            r->consts = (const unsigned char *)a.consts.buf;
            r->update = args[7];
            r->tweak_update = args[8] == Py_None ? NULL : args[8];
            r->tmp = (unsigned char *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
            r->tw[0] = r->tmp + chunk + 3 * 64;
            r->tw[1] = r->tw[0] + chunk / 4 + 3 * 64;
            r->seq = r->tw[1] + chunk / 4 + 3 * 64;
            if (a.code != 2) {
                in_page_table(r->consts, r->in_page);
            }
            if (a.code == 2 && r->tweak_update == NULL) {
                const unsigned char *k2 = (const unsigned char *)a.key.buf + 32;
                r->tweak_ctx = EVP_CIPHER_CTX_new();
                if (r->tweak_ctx == NULL || EVP_EncryptInit_ex(r->tweak_ctx, aes_ecb(256), NULL, k2, NULL) != 1 ||
                    EVP_CIPHER_CTX_set_padding(r->tweak_ctx, 0) != 1) {
                    PyErr_SetString(PyExc_RuntimeError, "crypt_into_via: OpenSSL could not set up AES-ECB");
                }
            }
            if (!PyErr_Occurred() && via_run(r, d, s, a.spa, a.data.len, chunk) == 0) {
                result = Py_NewRef(Py_True);
            }
            EVP_CIPHER_CTX_free(r->tweak_ctx);
        }
        PyMem_Free(raw);
        PyMem_Free(r);
    }
    crypt_args_release(&a);
    PyBuffer_Release(&dstv);
    return result;
}


/* Pages per group of the in-place passes (crypt_pages_in_place, measure_pages_in_place): read, then
 * transformed, while still in L2. */
#define IN_PLACE_GROUP 16

/* What an in-place pass does with the range's bytes before they are transformed: called for each
 * piece (the part of one page in the range, in order; at: its offset in the range; last: the
 * group's last piece, transformed once this returns) with the GIL released.  0, or nonzero when
 * OpenSSL failed. */
typedef int (*PieceFn)(void *state, const unsigned char *piece, Py_ssize_t at, Py_ssize_t len, int last);

/* The `length` bytes of a page store at a->spa, in place: per group of up to IN_PLACE_GROUP pages
 * ending at a page boundary, each piece handed to piece(), then the group transformed (a->code,
 * a->encrypt) while it is still in the CPU's cache -- one pass over the pages, no copy of the range.
 * Pages are created (zeroed) before the GIL is released for the loop; page_set_drop removes created
 * pages left all zeros, as in crypt_pages.  0, or -1 with an exception set (RuntimeError `failed`
 * when OpenSSL failed in the loop). */
static int in_place_run(const char *name, const char *failed_msg, const CryptArgs *a, Py_ssize_t length,
                        PieceFn piece, void *state)
{
    PageSet ps = {NULL, 0, 0, 0, NULL, NULL};
    EVP_CIPHER_CTX *ctx = NULL, *tweak_ctx = NULL;
    int rc = -1;
    if (length == 0) {
        return 0;
    }
    if (page_set_take(&ps, a->pages, a->spa, length, NULL, 0) < 0 || crypt_contexts(name, a, &ctx, &tweak_ctx) < 0) {
        goto done;
    }
    {
        const unsigned char *consts = (const unsigned char *)a->consts.buf;
        unsigned char **ptrs = ps.ptrs;
        int nbits = (int)a->nbits, encrypt = a->encrypt, failed = 0;
        int pre = encrypt || a->code == 1, post = !encrypt || a->code == 1;
        long code = a->code;
        uint64_t spa = a->spa;
        Py_ssize_t left = length, done = 0, p = 0;
        EngineKeys ksbuf;
        const EngineKeys *ks = engine_keys(&ksbuf, a->engine, (const unsigned char *)a->key.buf, code, encrypt);
        Py_BEGIN_ALLOW_THREADS
        while (left > 0 && !failed) {
            /* a group: up to IN_PLACE_GROUP pages, ending at a page boundary */
            Py_ssize_t off = (Py_ssize_t)(spa & (XP_PAGE - 1));
            Py_ssize_t n = (Py_ssize_t)IN_PLACE_GROUP * XP_PAGE - off, q, at;
            Span span = {ptrs + p, NULL};
            if (n > left) {
                n = left;
            }
            for (q = 0, at = 0; at < n && !failed; q++) { /* the bytes before, page by page */
                Py_ssize_t o = q == 0 ? off : 0;
                Py_ssize_t k = XP_PAGE - o < n - at ? XP_PAGE - o : n - at;
                failed = piece(state, ptrs[p + q] + o, done + at, k, at + k == n);
                at += k;
            }
            if (!failed) {
                failed = code == 2 ? xts_pages_run(&span, &span, 0, spa, n, ctx, tweak_ctx, ks, encrypt)
                                   : xex_pages_run(&span, &span, 0, spa, n, consts, nbits, ctx, ks, pre, post, encrypt);
            }
            spa += (uint64_t)n;
            done += n;
            left -= n;
            p += q;
        }
        Py_END_ALLOW_THREADS
        if (failed) {
            PyErr_SetString(PyExc_RuntimeError, failed_msg);
            goto done;
        }
    }
    rc = 0;
done:
    page_set_drop(&ps);
    EVP_CIPHER_CTX_free(ctx);
    EVP_CIPHER_CTX_free(tweak_ctx);
    return rc;
}

/* An in-place pass's `length` argument: 0, or -1 with an exception set. */
static int in_place_length(PyObject *arg, Py_ssize_t *length)
{
    *length = PyLong_AsSsize_t(arg);
    if (*length == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*length < 0) {
        PyErr_SetString(PyExc_ValueError, "length must not be negative");
        return -1;
    }
    return 0;
}

/* crypt_pages_in_place's pieces: the bytes before, copied into the result. */
static int copy_piece(void *state, const unsigned char *piece, Py_ssize_t at, Py_ssize_t len, int last)
{
    (void)last;
    memcpy((unsigned char *)state + at, piece, (size_t)len);
    return 0;
}

/* crypt_pages_in_place's pieces with `hashes` (whole pages): the SHA-384 of each page before.  A
 * page equal to the one before it (runs of erased flash or zeros) has its digest copied, as
 * sha384_accel's measure_pages does; the one before is compared as it was: within a group the page
 * itself (not transformed yet), across groups `last`, the previous group's last page saved before
 * that group's transform. */
typedef struct {
    EVP_MD_CTX *md;
    unsigned char *digests;
    const unsigned char *prev;
    unsigned char last[XP_PAGE];
} PageDigests;

static int digest_piece(void *state, const unsigned char *piece, Py_ssize_t at, Py_ssize_t len, int last)
{
    PageDigests *d = (PageDigests *)state;
    unsigned char *out = d->digests + at / XP_PAGE * DIGEST384;
    (void)len; /* (XP_PAGE: spa and length are whole pages) */
    if (d->prev != NULL && memcmp(piece, d->prev, XP_PAGE) == 0) {
        memcpy(out, out - DIGEST384, DIGEST384);
    } else {
        unsigned int dn = 0;
        if (!(EVP_DigestInit_ex(d->md, EVP_sha384(), NULL) == 1 && EVP_DigestUpdate(d->md, piece, XP_PAGE) == 1 &&
              EVP_DigestFinal_ex(d->md, out, &dn) == 1 && dn == DIGEST384)) {
            return 1;
        }
    }
    if (last) {
        memcpy(d->last, piece, XP_PAGE);
        d->prev = d->last;
    } else {
        d->prev = piece;
    }
    return 0;
}

PyDoc_STRVAR(crypt_pages_in_place_doc,
             "crypt_pages_in_place(pages, spa, length, consts, key, code, encrypt, hashes=False, /)\n--\n\n"
             "crypt_pages' transform of the `length` bytes of the page store `pages` (dict PFN ->\n"
             "4096-byte bytearray; an absent page reads as zeros and is created unless its part of the\n"
             "result is all zeros) at spa, written back into the same pages; returns the bytes the\n"
             "range held before (a new bytes object of `length` bytes).  The same pages and bytes as\n"
             "gathering the range, then crypt_pages of what was gathered.  With `hashes` true (spa and\n"
             "length whole pages): returns instead the SHA-384 of each 4 KiB page as it was (48 bytes a\n"
             "page, in order), each page hashed just before its group is transformed.");

/* crypt_pages_in_place: a page store's range read and transformed in place in one pass
 * (in_place_run): per group of pages, their bytes copied into the result (or hashed), then the
 * group transformed in place -- instead of a gather into a buffer and a second pass from that
 * buffer back into the pages. */
static PyObject *crypt_pages_in_place(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL, *before = NULL, *scratch = NULL, *sub[7];
    CryptArgs a;
    Py_ssize_t length, i;
    PageDigests digests;
    int hashing = 0;
    (void)self;

    digests.md = NULL;
    digests.prev = NULL;
    if (check_nargs("crypt_pages_in_place", nargs, 7, 8) < 0) {
        return NULL;
    }
    if (nargs == 8) {
        hashing = PyObject_IsTrue(args[7]);
        if (hashing < 0) {
            return NULL;
        }
    }
    if (in_place_length(args[2], &length) < 0) {
        return NULL;
    }
    if (hashing) {
        unsigned long long at = PyLong_AsUnsignedLongLong(args[1]);
        if (at == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if ((at | (unsigned long long)length) & (XP_PAGE - 1)) {
            PyErr_SetString(PyExc_ValueError, "crypt_pages_in_place: hashes take whole 4 KiB pages");
            return NULL;
        }
        digests.md = EVP_MD_CTX_new();
        if (digests.md == NULL) {
            return PyErr_NoMemory();
        }
    }
    /* the result (the copy, or the digests), and the checks of crypt_args on a buffer of `length`
     * bytes (hashing: a scratch one, never written) */
    before = PyBytes_FromStringAndSize(NULL, hashing ? length / XP_PAGE * DIGEST384 : length);
    scratch = before == NULL || !hashing ? NULL : PyByteArray_FromStringAndSize(NULL, length);
    for (i = 0; i < 7; i++) {
        sub[i] = args[i];
    }
    sub[2] = hashing ? scratch : before;
    if (sub[2] == NULL || crypt_args("crypt_pages_in_place", sub, 7, 0, &a) < 0) {
        Py_XDECREF(before);
        Py_XDECREF(scratch);
        EVP_MD_CTX_free(digests.md);
        return NULL;
    }
    digests.digests = (unsigned char *)PyBytes_AS_STRING(before);
    if (in_place_run("crypt_pages_in_place", "crypt_pages_in_place: OpenSSL AES-ECB or SHA-384 failed", &a, length,
                     hashing ? digest_piece : copy_piece, hashing ? (void *)&digests : (void *)digests.digests) == 0) {
        result = Py_NewRef(before);
    }
    EVP_MD_CTX_free(digests.md);
    crypt_args_release(&a);
    Py_DECREF(before);
    Py_XDECREF(scratch);
    return result;
}

/* ---- the launch digest: SHA-256 whose state lives here, so that a page store can be hashed in place ----
 *
 * A SHA-256 context (OpenSSL's EVP, one per capsule) that LAUNCH_UPDATE_DATA's measurement extends
 * straight from DRAM's pages (measure_pages_in_place) as well as from buffers (sha256_update), the
 * same digest as hashlib's of the same bytes in the same order. */

#define SHA_CAPSULE "sevemu.sha256"

static void sha_capsule_free(PyObject *capsule)
{
    EVP_MD_CTX *ctx = (EVP_MD_CTX *)PyCapsule_GetPointer(capsule, SHA_CAPSULE);
    EVP_MD_CTX_free(ctx);
}

static const EVP_MD *sha256_md(void)
{
    static const EVP_MD *md = NULL; /* fetched once (OpenSSL 3 looks it up at every init otherwise) */
    if (md == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        md = EVP_MD_fetch(NULL, "SHA256", NULL);
#endif
        if (md == NULL) {
            md = EVP_sha256();
        }
    }
    return md;
}

static PyObject *sha_wrap(EVP_MD_CTX *ctx)
{
    PyObject *capsule = PyCapsule_New(ctx, SHA_CAPSULE, sha_capsule_free);
    if (capsule == NULL) {
        EVP_MD_CTX_free(ctx);
    }
    return capsule;
}

static EVP_MD_CTX *sha_ctx(PyObject *capsule)
{
    return (EVP_MD_CTX *)PyCapsule_GetPointer(capsule, SHA_CAPSULE); /* (ValueError when not ours) */
}

PyDoc_STRVAR(sha256_new_doc, "sha256_new(/)\n--\n\nA fresh SHA-256 context (a capsule).");

static PyObject *sha256_new(PyObject *self, PyObject *unused)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    (void)self;
    (void)unused;
    if (ctx == NULL) {
        return PyErr_NoMemory();
    }
    if (EVP_DigestInit_ex(ctx, sha256_md(), NULL) != 1) {
        EVP_MD_CTX_free(ctx);
        PyErr_SetString(PyExc_RuntimeError, "sha256_new: OpenSSL SHA-256 failed");
        return NULL;
    }
    return sha_wrap(ctx);
}

/* A new context in the state of the capsule's (sha256_copy, sha256_digest); NULL with an exception
 * set (RuntimeError `failed` when OpenSSL could not copy it). */
static EVP_MD_CTX *sha_dup(PyObject *capsule, const char *failed)
{
    EVP_MD_CTX *ctx = sha_ctx(capsule), *dup;
    if (ctx == NULL) {
        return NULL;
    }
    dup = EVP_MD_CTX_new();
    if (dup == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    if (EVP_MD_CTX_copy_ex(dup, ctx) != 1) {
        EVP_MD_CTX_free(dup);
        PyErr_SetString(PyExc_RuntimeError, failed);
        return NULL;
    }
    return dup;
}

PyDoc_STRVAR(sha256_copy_doc, "sha256_copy(ctx, /)\n--\n\nA new context in the state of ctx.");

static PyObject *sha256_copy(PyObject *self, PyObject *capsule)
{
    EVP_MD_CTX *dup = sha_dup(capsule, "sha256_copy: OpenSSL failed");
    (void)self;
    return dup == NULL ? NULL : sha_wrap(dup);
}

PyDoc_STRVAR(sha256_digest_doc, "sha256_digest(ctx, /)\n--\n\nThe digest of what ctx has hashed (ctx unchanged).");

static PyObject *sha256_digest(PyObject *self, PyObject *capsule)
{
    EVP_MD_CTX *dup = sha_dup(capsule, "sha256_digest: OpenSSL failed");
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    int ok;
    (void)self;
    if (dup == NULL) {
        return NULL;
    }
    ok = EVP_DigestFinal_ex(dup, out, &n) == 1 && n == 32;
    EVP_MD_CTX_free(dup);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "sha256_digest: OpenSSL failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

PyDoc_STRVAR(sha256_update_doc,
             "sha256_update(ctx, data, /)\n--\n\nExtend ctx with the bytes of data (the GIL released from 4 KiB on).");

static PyObject *sha256_update(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    EVP_MD_CTX *ctx;
    Py_buffer view;
    int ok;
    (void)self;
    if (check_nargs("sha256_update", nargs, 2, 2) < 0 || (ctx = sha_ctx(args[0])) == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len >= XP_PAGE) {
        Py_BEGIN_ALLOW_THREADS
        ok = EVP_DigestUpdate(ctx, view.buf, (size_t)view.len) == 1;
        Py_END_ALLOW_THREADS
    } else {
        ok = EVP_DigestUpdate(ctx, view.buf, (size_t)view.len) == 1;
    }
    PyBuffer_Release(&view);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "sha256_update: OpenSSL failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* measure_pages_in_place's pieces: the plaintext, extending the SHA-256 context. */
static int sha256_piece(void *state, const unsigned char *piece, Py_ssize_t at, Py_ssize_t len, int last)
{
    (void)at;
    (void)last;
    return EVP_DigestUpdate((EVP_MD_CTX *)state, piece, (size_t)len) != 1;
}

PyDoc_STRVAR(measure_pages_in_place_doc,
             "measure_pages_in_place(pages, spa, length, consts, key, code, ctx, /)\n--\n\n"
             "The `length` bytes of the page store `pages` (dict PFN -> 4096-byte bytearray; an absent\n"
             "page reads as zeros) at spa hashed into the SHA-256 context ctx, then encrypted in place\n"
             "as crypt_pages_in_place encrypts them (code 0 XE, 1 XEX, 2 XTS): the same pages and the\n"
             "same digest as gathering the range, hashing what was gathered and crypt_pages of it,\n"
             "without the copy.  Per group of pages (still in the CPU's cache), the GIL released.");

/* measure_pages_in_place: LAUNCH_UPDATE_DATA's read, measurement and encryption in one pass over a
 * page store's range that nothing else holds a newer copy of (the caller checked: no dirty host
 * line) -- per group of pages (in_place_run), SHA-256 of their plaintext, then AES in place while
 * they are still in L2: DRAM's pages are read once, and no plaintext copy is made. */
static PyObject *measure_pages_in_place(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *result = NULL, *sub[7];
    CryptArgs a;
    Py_ssize_t length, i;
    EVP_MD_CTX *sha;
    PyObject *sized = NULL;
    (void)self;

    if (check_nargs("measure_pages_in_place", nargs, 7, 7) < 0 || (sha = sha_ctx(args[6])) == NULL) {
        return NULL;
    }
    if (in_place_length(args[2], &length) < 0) {
        return NULL;
    }
    sized = PyBytes_FromStringAndSize(NULL, 0); /* (crypt_args checks the rest; the span is checked below) */
    if (sized == NULL) {
        return NULL;
    }
    for (i = 0; i < 6; i++) {
        sub[i] = args[i];
    }
    sub[2] = sized;
    sub[6] = Py_True;
    if (crypt_args("measure_pages_in_place", sub, 7, 0, &a) < 0) {
        Py_DECREF(sized);
        return NULL;
    }
    if (length % (a.code == 2 ? 64 : BLOCK) || a.spa % (a.code == 2 ? 64 : BLOCK)) {
        PyErr_SetString(PyExc_ValueError, "measure_pages_in_place: spa and length must be whole blocks (XTS: units)");
    } else if ((uint64_t)length > ((uint64_t)1 << a.nbits) - a.spa) {
        PyErr_Format(PyExc_ValueError, "the span is outside the %zd-bit address space", a.nbits);
    } else if (in_place_run("measure_pages_in_place", "measure_pages_in_place: OpenSSL failed", &a, length,
                            sha256_piece, sha) == 0) {
        result = Py_NewRef(Py_None);
    }
    crypt_args_release(&a);
    Py_DECREF(sized);
    return result;
}

static PyMethodDef methods[] = {
    {"xor_addr_tweak", (PyCFunction)(void (*)(void))xor_addr_tweak, METH_FASTCALL, xor_addr_tweak_doc},
    {"xts_xor", (PyCFunction)(void (*)(void))xts_xor, METH_FASTCALL, xts_xor_doc},
    {"xts_sequence", (PyCFunction)(void (*)(void))xts_sequence, METH_FASTCALL, xts_sequence_doc},
    {"xor_bytes", (PyCFunction)(void (*)(void))xor_bytes, METH_FASTCALL, xor_bytes_doc},
    {"xor_bytearray", (PyCFunction)(void (*)(void))xor_bytearray, METH_FASTCALL, xor_bytearray_doc},
    {"crypt_pages", (PyCFunction)(void (*)(void))crypt_pages, METH_FASTCALL, crypt_pages_doc},
    {"sha256_new", (PyCFunction)sha256_new, METH_NOARGS, sha256_new_doc},
    {"sha256_copy", (PyCFunction)sha256_copy, METH_O, sha256_copy_doc},
    {"sha256_digest", (PyCFunction)sha256_digest, METH_O, sha256_digest_doc},
    {"sha256_update", (PyCFunction)(void (*)(void))sha256_update, METH_FASTCALL, sha256_update_doc},
    {"measure_pages_in_place", (PyCFunction)(void (*)(void))measure_pages_in_place, METH_FASTCALL,
     measure_pages_in_place_doc},
    {"crypt_into", (PyCFunction)(void (*)(void))crypt_into, METH_FASTCALL, crypt_into_doc},
    {"crypt_into_via", (PyCFunction)(void (*)(void))crypt_into_via, METH_FASTCALL, crypt_into_via_doc},
    {"crypt_from_pages", (PyCFunction)(void (*)(void))crypt_from_pages, METH_FASTCALL, crypt_from_pages_doc},
    {"crypt_gather", (PyCFunction)(void (*)(void))crypt_gather, METH_FASTCALL, crypt_gather_doc},
    {"crypt_scatter", (PyCFunction)(void (*)(void))crypt_scatter, METH_FASTCALL, crypt_scatter_doc},
    {"crypt_pages_in_place", (PyCFunction)(void (*)(void))crypt_pages_in_place, METH_FASTCALL,
     crypt_pages_in_place_doc},
    {"vector_isa", (PyCFunction)(void (*)(void))vector_isa, METH_FASTCALL, vector_isa_doc},
    {"aes_engine", (PyCFunction)(void (*)(void))aes_engine, METH_FASTCALL, aes_engine_doc},
    {NULL, NULL, 0, NULL},
};

/* The module keeps no state: safe in subinterpreters and without the GIL. */
static PyModuleDef_Slot slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sevemu.crypto._memenc_accel",
    "Optional C helpers of sevemu.crypto.memenc (tweak XOR passes; the fused XE/XEX page write).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__memenc_accel(void)
{
    return PyModuleDef_Init(&module);
}
