/*
 * sevemu.crypto._transport_accel: optional C helper for runs of SEV transport packets
 * (src/sevemu/crypto/transport.py, PacketCrypto.seal_many / open_many): many packets of one size,
 * each with its own IV and its own MAC, in one call with the GIL released.
 *
 *   seal(tek, tik, ivs, aads, src, dst, macs, size)
 *       for each packet i: dst_i = AES-128-CTR(tek, iv_i)(src_i);
 *                          mac_i = HMAC-SHA256(tik, aad_i || dst_i)
 *   open(tek, tik, ivs, aads, macs, src, dst, size) -> count
 *       for each packet i in order: stop at the first whose HMAC-SHA256(tik, aad_i || src_i) is not
 *       mac_i (compared in constant time); otherwise dst_i = AES-128-CTR(tek, iv_i)(src_i).
 *       Returns how many packets verified (their plaintexts are in dst).
 *   seal_to_pages(tek, tik, ivs, aads, src, pages, pfns, macs)
 *       seal of 4 KiB packets, each packet's TRANS straight into a page of a page store (dict PFN ->
 *       4096-byte bytearray, DRAM's) at its PFN (pfns: a u64 per packet), absent pages stored
 *       (the firmware sealing into the pages of a DMA run, without a copy).
 *   open_from_pages(tek, tik, ivs, aads, macs, pages, pfns, dst) -> count
 *       open of 4 KiB packets, each packet's TRANS read where it lies in the page store (an
 *       absent page reads as zeros).
 *
 * All cryptography is OpenSSL's libcrypto: one EVP cipher context keyed once (each packet sets
 * only its IV) and one EVP_MAC HMAC context keyed once (re-initialised per packet with the same
 * key).  ivs holds 16 bytes per packet, aads an equal-length AAD per packet, macs 32 bytes per
 * packet, src and dst `size` bytes per packet; every length is checked here (ValueError).  dst
 * must not overlap src.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#define KEY 16
#define IVLEN 16
#define MACLEN 32

static int get_buffers(PyObject *const *args, Py_buffer *views, int n, const int *writable)
{
    for (int i = 0; i < n; i++) {
        if (PyObject_GetBuffer(args[i], &views[i], (writable[i] ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_C_CONTIGUOUS) < 0) {
            for (int j = 0; j < i; j++)
                PyBuffer_Release(&views[j]);
            return -1;
        }
    }
    return 0;
}

static void release_buffers(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* The two keyed contexts of one call. */
struct channel {
    EVP_CIPHER_CTX *aes;
    EVP_MAC *mac;
    EVP_MAC_CTX *hmac;
};

static void channel_free(struct channel *ch)
{
    EVP_CIPHER_CTX_free(ch->aes);
    EVP_MAC_CTX_free(ch->hmac);
    EVP_MAC_free(ch->mac);
}

static int channel_init(struct channel *ch, const unsigned char *tek, const unsigned char *tik)
{
    char digest[] = "SHA256";
    OSSL_PARAM params[2];
    ch->aes = EVP_CIPHER_CTX_new();
    ch->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    ch->hmac = ch->mac ? EVP_MAC_CTX_new(ch->mac) : NULL;
    if (!ch->aes || !ch->hmac)
        return 0;
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0);
    params[1] = OSSL_PARAM_construct_end();
    return EVP_EncryptInit_ex(ch->aes, EVP_aes_128_ctr(), NULL, tek, NULL) == 1
        && EVP_MAC_init(ch->hmac, tik, KEY, params) == 1;
}

/* dst = AES-128-CTR(iv)(src) */
static int ctr(struct channel *ch, const unsigned char *iv, const unsigned char *src, unsigned char *dst, int size)
{
    int out = 0;
    return EVP_EncryptInit_ex(ch->aes, NULL, NULL, NULL, iv) == 1
        && EVP_EncryptUpdate(ch->aes, dst, &out, src, size) == 1 && out == size;
}

/* mac = HMAC(tik, aad || data) */
static int hmac(struct channel *ch, const unsigned char *aad, size_t aad_len, const unsigned char *data, size_t size,
                unsigned char *mac)
{
    size_t out = 0;
    return EVP_MAC_init(ch->hmac, NULL, 0, NULL) == 1
        && EVP_MAC_update(ch->hmac, aad, aad_len) == 1
        && EVP_MAC_update(ch->hmac, data, size) == 1
        && EVP_MAC_final(ch->hmac, mac, &out, MACLEN) == 1 && out == MACLEN;
}

enum { TEK, TIK, IVS, AADS, A4, A5, A6, NBUF };

/* Common checks: key sizes, packet count from ivs, per-packet lengths of the other buffers. */
static int check(Py_buffer *v, Py_ssize_t size, int macs_at, int src_at, int dst_at, Py_ssize_t *count,
                 Py_ssize_t *aad_len)
{
    Py_ssize_t n;
    if (v[TEK].len != KEY || v[TIK].len != KEY) {
        PyErr_SetString(PyExc_ValueError, "TEK and TIK must be 16 bytes");
        return 0;
    }
    if (size <= 0 || size > (1 << 24) || v[IVS].len % IVLEN) {
        PyErr_SetString(PyExc_ValueError, "packet size out of range or IVs not 16 bytes each");
        return 0;
    }
    n = v[IVS].len / IVLEN;
    if (n == 0 || v[AADS].len % n || v[macs_at].len != n * MACLEN || v[src_at].len != n * size
        || v[dst_at].len != n * size) {
        PyErr_SetString(PyExc_ValueError, "buffer lengths do not match the packet count");
        return 0;
    }
    *count = n;
    *aad_len = v[AADS].len / n;
    return 1;
}

static PyObject *run(PyObject *const *args, Py_ssize_t nargs, int sealing)
{
    static const int seal_writable[NBUF] = {0, 0, 0, 0, 0, 1, 1};  /* tek tik ivs aads src dst macs */
    static const int open_writable[NBUF] = {0, 0, 0, 0, 0, 0, 1};  /* tek tik ivs aads macs src dst */
    Py_buffer v[NBUF];
    Py_ssize_t size, n, aad_len, i = 0;
    struct channel ch = {NULL, NULL, NULL};
    int ok;
    int macs_at = sealing ? A6 : A4, src_at = sealing ? A4 : A5, dst_at = sealing ? A5 : A6;
    if (nargs != NBUF + 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arguments", sealing ? "seal" : "open", NBUF + 1);
        return NULL;
    }
    size = PyLong_AsSsize_t(args[NBUF]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (get_buffers(args, v, NBUF, sealing ? seal_writable : open_writable) < 0)
        return NULL;
    if (!check(v, size, macs_at, src_at, dst_at, &n, &aad_len)) {
        release_buffers(v, NBUF);
        return NULL;
    }
    {
        const unsigned char *ivs = v[IVS].buf, *aads = v[AADS].buf, *src = v[src_at].buf;
        unsigned char *dst = v[dst_at].buf, *macs = v[macs_at].buf;
        unsigned char mac[MACLEN];
        Py_BEGIN_ALLOW_THREADS
        ok = channel_init(&ch, v[TEK].buf, v[TIK].buf);
        for (; ok && i < n; i++) {
            const unsigned char *iv = ivs + i * IVLEN, *aad = aads + i * aad_len;
            if (sealing) {
                ok = ctr(&ch, iv, src + i * size, dst + i * size, (int)size)
                    && hmac(&ch, aad, (size_t)aad_len, dst + i * size, (size_t)size, macs + i * MACLEN);
            } else {
                ok = hmac(&ch, aad, (size_t)aad_len, src + i * size, (size_t)size, mac);
                if (!ok || CRYPTO_memcmp(mac, macs + i * MACLEN, MACLEN) != 0)
                    break;
                ok = ctr(&ch, iv, src + i * size, dst + i * size, (int)size);
            }
        }
        OPENSSL_cleanse(mac, sizeof mac);
        channel_free(&ch);
        Py_END_ALLOW_THREADS
    }
    release_buffers(v, NBUF);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed in the transport accelerator");
        return NULL;
    }
    if (sealing)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(i);
}

/* The arguments of seal_to_pages / open_from_pages, marshalled by one helper (page_call_open) and
 * released by another (page_call_close): seven single buffers -- TEK, TIK, IVs, AADs, then the
 * plaintext (seal) or the MACs (open), the PFN column, then the MACs (seal) or the output (open)
 * -- and a page store (a dict PFN -> 4096-byte bytearray) between them, each packet's page
 * resolved to a pointer and its buffer held (a bytearray with an export cannot be resized) while
 * the GIL is released.
 *
 * Sealing: the pages are written; every present page is checked (type and size) before any
 * absent one is stored (zeros), so a TypeError changes nothing.  Opening: the pages are read; an
 * absent page reads as zeros.  No page may overlap the single buffer the packets are read from
 * (seal) or written to (open). */
#define PAGE_BYTES 4096

enum { PG_TEK, PG_TIK, PG_IVS, PG_AADS, PG_FLAT, PG_PFNS, PG_LAST, PG_NSINGLE };  /* the single buffers */
#define PG_NARGS (PG_NSINGLE + 1)                                                 /* + the page store */
#define PG_PAGES_AT 5                                                              /* its position */

static const unsigned char zero_page[PAGE_BYTES];

struct page_call {
    Py_buffer v[PG_NSINGLE];
    int have_v;
    Py_buffer *views;       /* one per packet (obj NULL: not held) */
    unsigned char **page;   /* each packet's page */
    Py_ssize_t n, aad_len, held;
};

static void page_call_close(struct page_call *pc)
{
    for (Py_ssize_t i = 0; i < pc->held; i++)
        if (pc->views[i].obj != NULL)
            PyBuffer_Release(&pc->views[i]);
    PyMem_Free(pc->views);
    PyMem_Free(pc->page);
    if (pc->have_v)
        release_buffers(pc->v, PG_NSINGLE);
}

/* The page of pfn in the store, a borrowed reference; NULL with no error: absent.  TypeError for
 * a page that is not a 4096-byte bytearray. */
static PyObject *store_lookup(PyObject *pages, uint64_t pfn, PyObject **key_out)
{
    PyObject *key = PyLong_FromUnsignedLongLong(pfn), *page;
    if (!key)
        return NULL;
    page = PyDict_GetItemWithError(pages, key);
    if (page != NULL && (!PyByteArray_CheckExact(page) || PyByteArray_GET_SIZE(page) != PAGE_BYTES)) {
        PyErr_SetString(PyExc_TypeError, "a page must be a bytearray of 4096 bytes");
        page = NULL;
    }
    if (key_out != NULL && page == NULL && !PyErr_Occurred())
        *key_out = key;  /* (absent: the caller stores under this key) */
    else
        Py_DECREF(key);
    return page;
}

/* Marshal the arguments (layout above); 0 with an exception set on failure (pc->... released by
 * page_call_close either way). */
static int page_call_open(struct page_call *pc, PyObject *const *args, Py_ssize_t nargs, int sealing, const char *name)
{
    static const int writable[PG_NSINGLE] = {0, 0, 0, 0, 0, 0, 1};
    PyObject *single[PG_NSINGLE], *pages;
    const uint64_t *pfns;
    const unsigned char *flat;
    memset(pc, 0, sizeof *pc);
    if (nargs != PG_NARGS) {
        PyErr_Format(PyExc_TypeError, "%s() takes %d arguments", name, PG_NARGS);
        return 0;
    }
    pages = args[PG_PAGES_AT];
    if (!PyDict_CheckExact(pages)) {
        PyErr_SetString(PyExc_TypeError, "pages must be a dict PFN -> bytearray");
        return 0;
    }
    for (int i = 0, j = 0; i < PG_NARGS; i++)
        if (i != PG_PAGES_AT)
            single[j++] = args[i];
    if (get_buffers(single, pc->v, PG_NSINGLE, writable) < 0)
        return 0;
    pc->have_v = 1;
    /* check(): the MACs are PG_LAST (seal) or PG_FLAT (open); the flat buffer stands for both the
     * source and the destination (the pages are a page each) */
    if (!check(pc->v, PAGE_BYTES, sealing ? PG_LAST : PG_FLAT, sealing ? PG_FLAT : PG_LAST,
               sealing ? PG_FLAT : PG_LAST, &pc->n, &pc->aad_len))
        return 0;
    if (pc->v[PG_PFNS].len != pc->n * 8) {
        PyErr_SetString(PyExc_ValueError, "pfns must hold one u64 per packet");
        return 0;
    }
    pfns = (const uint64_t *)pc->v[PG_PFNS].buf;
    flat = sealing ? pc->v[PG_FLAT].buf : pc->v[PG_LAST].buf;  /* the plaintext (seal) or the output (open) */
    pc->views = PyMem_Calloc((size_t)pc->n, sizeof(Py_buffer));
    pc->page = PyMem_Calloc((size_t)pc->n, sizeof(*pc->page));
    if (!pc->views || !pc->page) {
        PyErr_NoMemory();
        return 0;
    }
    if (sealing) {  /* every present page checked before any page is stored */
        for (Py_ssize_t i = 0; i < pc->n; i++)
            if (store_lookup(pages, pfns[i], NULL) == NULL && PyErr_Occurred())
                return 0;
    }
    for (Py_ssize_t i = 0; i < pc->n; i++) {
        PyObject *key = NULL, *page = store_lookup(pages, pfns[i], sealing ? &key : NULL);
        if (page == NULL && PyErr_Occurred())
            return 0;
        if (page == NULL && !sealing) {
            pc->page[i] = (unsigned char *)zero_page;  /* (read only) */
            continue;
        }
        if (page == NULL) {  /* sealing into an absent page: stored first, zeros */
            PyObject *fresh = PyByteArray_FromStringAndSize(NULL, PAGE_BYTES);
            int rc = fresh == NULL ? -1 : PyDict_SetItem(pages, key, fresh);
            if (fresh)
                memset(PyByteArray_AS_STRING(fresh), 0, PAGE_BYTES);
            Py_DECREF(key);
            page = fresh;
            Py_XDECREF(fresh);  /* (the dict holds it) */
            if (rc < 0)
                return 0;
        }
        if (PyObject_GetBuffer(page, &pc->views[i], sealing ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            return 0;
        pc->held = i + 1;
        pc->page[i] = pc->views[i].buf;
        {
            const unsigned char *lo = pc->page[i];
            Py_ssize_t flat_len = sealing ? pc->v[PG_FLAT].len : pc->v[PG_LAST].len;
            if (flat < lo + PAGE_BYTES && lo < flat + flat_len) {
                PyErr_SetString(PyExc_ValueError, sealing ? "a page overlaps the plaintext" : "a page overlaps the output");
                return 0;
            }
        }
    }
    return 1;
}

/* seal_to_pages(tek, tik, ivs, aads, src, pages, pfns, macs): seal of 4 KiB packets, packet i's
 * TRANS written into its page of the store. */
static PyObject *seal_to_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct page_call pc;
    struct channel ch = {NULL, NULL, NULL};
    PyObject *result = NULL;
    int ok;
    (void)self;
    if (page_call_open(&pc, args, nargs, 1, "seal_to_pages")) {
        const unsigned char *ivs = pc.v[PG_IVS].buf, *aads = pc.v[PG_AADS].buf, *src = pc.v[PG_FLAT].buf;
        unsigned char *macs = pc.v[PG_LAST].buf;
        Py_BEGIN_ALLOW_THREADS
        ok = channel_init(&ch, pc.v[PG_TEK].buf, pc.v[PG_TIK].buf);
        for (Py_ssize_t i = 0; ok && i < pc.n; i++)
            ok = ctr(&ch, ivs + i * IVLEN, src + i * PAGE_BYTES, pc.page[i], PAGE_BYTES)
                && hmac(&ch, aads + i * pc.aad_len, (size_t)pc.aad_len, pc.page[i], PAGE_BYTES, macs + i * MACLEN);
        channel_free(&ch);
        Py_END_ALLOW_THREADS
        if (!ok)
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed in the transport accelerator");
        else
            result = Py_NewRef(Py_None);
    }
    page_call_close(&pc);
    return result;
}

/* open_from_pages(tek, tik, ivs, aads, macs, pages, pfns, dst) -> count: the reverse of
 * seal_to_pages -- each packet's TRANS read where it lies in the store, verified in order and
 * decrypted into dst; how many verified before the first that did not. */
static PyObject *open_from_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct page_call pc;
    struct channel ch = {NULL, NULL, NULL};
    PyObject *result = NULL;
    Py_ssize_t i = 0;
    int ok;
    (void)self;
    if (page_call_open(&pc, args, nargs, 0, "open_from_pages")) {
        const unsigned char *ivs = pc.v[PG_IVS].buf, *aads = pc.v[PG_AADS].buf, *macs = pc.v[PG_FLAT].buf;
        unsigned char *dst = pc.v[PG_LAST].buf, mac[MACLEN];
        Py_BEGIN_ALLOW_THREADS
        ok = channel_init(&ch, pc.v[PG_TEK].buf, pc.v[PG_TIK].buf);
        for (; ok && i < pc.n; i++) {
            ok = hmac(&ch, aads + i * pc.aad_len, (size_t)pc.aad_len, pc.page[i], PAGE_BYTES, mac);
            if (!ok || CRYPTO_memcmp(mac, macs + i * MACLEN, MACLEN) != 0)
                break;
            ok = ctr(&ch, ivs + i * IVLEN, pc.page[i], dst + i * PAGE_BYTES, PAGE_BYTES);
        }
        OPENSSL_cleanse(mac, sizeof mac);
        channel_free(&ch);
        Py_END_ALLOW_THREADS
        if (!ok)
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed in the transport accelerator");
        else
            result = PyLong_FromSsize_t(i);
    }
    page_call_close(&pc);
    return result;
}

static PyObject *seal(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return run(args, nargs, 1);
}

static PyObject *open_(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    return run(args, nargs, 0);
}

PyDoc_STRVAR(seal_doc, "seal(tek, tik, ivs, aads, src, dst, macs, size, /)\n--\n\n"
             "dst_i = AES-128-CTR(tek, iv_i)(src_i); mac_i = HMAC-SHA256(tik, aad_i || dst_i).");
PyDoc_STRVAR(open_doc, "open(tek, tik, ivs, aads, macs, src, dst, size, /)\n--\n\n"
             "Verify mac_i = HMAC-SHA256(tik, aad_i || src_i) in order, decrypting each that verifies; "
             "returns how many did.");

PyDoc_STRVAR(seal_to_pages_doc, "seal_to_pages(tek, tik, ivs, aads, src, pages, pfns, macs, /)\n--\n\n"
             "seal of 4 KiB packets with packet i's TRANS written into pages[pfns[i]] (a dict PFN ->\n"
             "4096-byte bytearray; absent pages are stored).");

PyDoc_STRVAR(open_from_pages_doc, "open_from_pages(tek, tik, ivs, aads, macs, pages, pfns, dst, /)\n--\n\n"
             "open of 4 KiB packets with packet i's TRANS read from pages[pfns[i]] (absent: zeros);\n"
             "returns how many verified.");

static PyMethodDef methods[] = {
    {"open_from_pages", (PyCFunction)(void (*)(void))open_from_pages, METH_FASTCALL, open_from_pages_doc},
    {"seal_to_pages", (PyCFunction)(void (*)(void))seal_to_pages, METH_FASTCALL, seal_to_pages_doc},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL, seal_doc},
    {"open", (PyCFunction)(void (*)(void))open_, METH_FASTCALL, open_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_transport_accel",
    "Optional C helper of sevemu.crypto.transport: runs of SEV transport packets through OpenSSL.",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__transport_accel(void)
{
    return PyModuleDef_Init(&module);
}
