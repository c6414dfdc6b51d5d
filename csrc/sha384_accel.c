/*
 * sevemu.crypto._sha384_accel: SHA-384 of many equal-sized pieces of a buffer, and the SNP launch
 * digest's PAGE_INFO chain, in one call each (the firmware's SNP_LAUNCH_UPDATE measurement;
 * src/sevemu/crypto/pagehash.py is the Python face and the hashlib fallback).
 *
 *   sha384_pages(data, size) -> bytes     SHA-384 of each size-byte piece of data, 48 bytes each
 *   page_info_chain(ld, info, gpa, count[, contents]) -> bytes
 *                                         count times: ld = SHA-384(info) with ld at 0x00,
 *                                         contents[i] (48 bytes; None: the template's) at 0x30 and
 *                                         gpa + 4096 i (little-endian) at 0x68 of a copy of the
 *                                         0x70-byte template info; the final ld
 *   measure_pages(ld, info, gpa, data) -> bytes
 *                                         page_info_chain with each 4 KiB page of data's SHA-384 as
 *                                         its contents, hashed in the same pass (one call, the GIL
 *                                         released once, for a 2 MiB page's whole measurement)
 *
 * The hashing is OpenSSL's (libcrypto's SHA-384 through one reused EVP context per call): what this
 * saves is the Python work around 2 x 512 hashes per 2 MiB page, not the hashing.  (A four-lane
 * AVX2 SHA-512 was tried: on the EPYC parts measured it was no faster than OpenSSL's one stream.)
 * The GIL is released while hashing.  A piece equal to the one before it is not hashed again: its
 * digest is copied (repeats_previous).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pyargs.h"

#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define DIGEST 48
#define INFO_SIZE 0x70
#define INFO_CONTENTS 0x30
#define INFO_GPA 0x68
#define CHAIN_STRIDE 4096

/* SHA-384 fetched once (OpenSSL 3 would otherwise look the algorithm up at every EVP_DigestInit_ex of
 * EVP_sha384(); the fetched method is process-wide and never freed). */
static const EVP_MD *sha384_md(void)
{
    static const EVP_MD *md = NULL;
    if (md == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        md = EVP_MD_fetch(NULL, "SHA384", NULL);
#endif
        if (md == NULL) {
            md = EVP_sha384();
        }
    }
    return md;
}

static int sha384_into(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *msg, size_t len, unsigned char *out)
{
    unsigned int n = 0;
    return EVP_DigestInit_ex(ctx, md, NULL) == 1 && EVP_DigestUpdate(ctx, msg, len) == 1 &&
           EVP_DigestFinal_ex(ctx, out, &n) == 1 && n == DIGEST;
}

/* Whether piece i (of size bytes) repeats piece i - 1 byte for byte: then its SHA-384 is the one just
 * computed.  Runs of equal pages are common in what guests load -- a firmware volume's erased flash
 * (0xFF), zero-filled padding: 129 of the 512 pages of Debian's OVMF.fd are one 0xFF page -- and the
 * comparison (it stops at the first differing byte, at once for most pages) costs little beside
 * hashing 4 KiB (about 5 us).  The digests are the ones hashing every piece gives (the tests compare
 * with hashlib, page by page, on runs of equal pages and on pages that differ in their last byte). */
static int repeats_previous(const unsigned char *data, size_t i, size_t size)
{
    return i > 0 && memcmp(data + i * size, data + (i - 1) * size, size) == 0;
}

static int hash_pages(EVP_MD_CTX *ctx, const EVP_MD *md, const unsigned char *data, size_t count, size_t size,
                      unsigned char *out)
{
    size_t i;
    for (i = 0; i < count; i++) {
        if (repeats_previous(data, i, size)) {
            memcpy(out + i * DIGEST, out + (i - 1) * DIGEST, DIGEST);
        } else if (!sha384_into(ctx, md, data + i * size, size, out + i * DIGEST)) {
            return 0;
        }
    }
    return 1;
}

/* The PAGE_INFO chain of count pages from the template info (its ld, contents and GPA fields
 * overwritten): contents from contents (48 bytes each), or the SHA-384 of each 4 KiB page of pages, or
 * the template's own; ld updated in place.  Runs without the GIL. */
static int chain_pages(unsigned char *ld, unsigned char *info, uint64_t gpa, uint64_t count,
                       const unsigned char *contents, const unsigned char *pages)
{
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    const EVP_MD *md = sha384_md();
    int ok = ctx != NULL && md != NULL;
    uint64_t i;
    for (i = 0; ok && i < count; i++) {
        uint64_t addr = gpa + i * CHAIN_STRIDE;
        int k;
        if (pages != NULL) { /* (a page equal to the one before: its hash is still at CONTENTS) */
            if (!repeats_previous(pages, (size_t)i, CHAIN_STRIDE)) {
                ok = sha384_into(ctx, md, pages + i * CHAIN_STRIDE, CHAIN_STRIDE, info + INFO_CONTENTS);
            }
        } else if (contents != NULL) {
            memcpy(info + INFO_CONTENTS, contents + i * DIGEST, DIGEST);
        }
        memcpy(info, ld, DIGEST);
        for (k = 0; k < 8; k++) {
            info[INFO_GPA + k] = (unsigned char)(addr >> (8 * k));
        }
        ok = ok && sha384_into(ctx, md, info, INFO_SIZE, ld);
    }
    EVP_MD_CTX_free(ctx);
    return ok;
}

/* Acquire the buffers of objs[0..n) (NULL entries: none taken, views[i].obj NULL), all or none. */
static int get_buffers(PyObject *const *objs, int n, Py_buffer *views)
{
    int i, j;
    for (i = 0; i < n; i++) {
        views[i].obj = NULL;
        if (objs[i] != NULL && PyObject_GetBuffer(objs[i], &views[i], PyBUF_SIMPLE) < 0) {
            for (j = 0; j < i; j++) {
                if (views[j].obj != NULL) {
                    PyBuffer_Release(&views[j]);
                }
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
        if (views[i].obj != NULL) {
            PyBuffer_Release(&views[i]);
        }
    }
}

/* ---- Python ----------------------------------------------------------------------------------- */
PyDoc_STRVAR(sha384_pages_doc,
             "sha384_pages(data, size, /) -> bytes\n--\n\n"
             "SHA-384 of each size-byte piece of data (len(data) a multiple of size), concatenated.");

static PyObject *sha384_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    uint64_t size;
    size_t count;
    PyObject *out;
    (void)self;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "sha384_pages() takes 2 positional arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_u64(args[1], "size", &size) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (size == 0 || size > ((uint64_t)1 << 40) || (uint64_t)data.len % size) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "sha384_pages: size must be non-zero and divide len(data)");
        return NULL;
    }
    count = (size_t)((uint64_t)data.len / size);
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * DIGEST));
    if (out != NULL) {
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
        EVP_MD_CTX *ctx = EVP_MD_CTX_new();
        const EVP_MD *md = sha384_md();
        int ok = ctx != NULL && md != NULL;
        if (ok) {
            Py_BEGIN_ALLOW_THREADS
            ok = hash_pages(ctx, md, (const unsigned char *)data.buf, count, (size_t)size, dst);
            Py_END_ALLOW_THREADS
        }
        EVP_MD_CTX_free(ctx);
        if (!ok) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_RuntimeError, "sha384_pages: OpenSSL's SHA-384 failed");
        }
    }
    PyBuffer_Release(&data);
    return out;
}

PyDoc_STRVAR(page_info_chain_doc,
             "page_info_chain(ld, info, gpa, count, contents=None, /) -> bytes\n--\n\n"
             "count times: ld = SHA-384(info) with ld at 0x00, contents[48 i:48 i+48] at 0x30 (None: the\n"
             "template's bytes) and gpa + 4096 i at 0x68 of a copy of the 0x70-byte template info.");

static PyObject *page_info_chain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer views[3];
    PyObject *objs[3];
    uint64_t gpa, count;
    int have_contents, ok;
    unsigned char info[INFO_SIZE], ld[DIGEST];
    (void)self;
    if (nargs < 4 || nargs > 5) {
        PyErr_Format(PyExc_TypeError, "page_info_chain() takes 4 or 5 positional arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_u64(args[2], "gpa", &gpa) < 0 || get_u64(args[3], "count", &count) < 0) {
        return NULL;
    }
    have_contents = nargs == 5 && args[4] != Py_None;
    objs[0] = args[0];
    objs[1] = args[1];
    objs[2] = have_contents ? args[4] : NULL;
    if (get_buffers(objs, 3, views) < 0) {
        return NULL;
    }
    if (views[0].len != DIGEST || views[1].len != INFO_SIZE ||
        (have_contents && (uint64_t)views[2].len != count * DIGEST) || count > ((uint64_t)1 << 40)) {
        release_buffers(views, 3);
        PyErr_SetString(PyExc_ValueError,
                        "page_info_chain: ld is 48 bytes, info 0x70, contents 48 bytes per page");
        return NULL;
    }
    memcpy(ld, views[0].buf, DIGEST);
    memcpy(info, views[1].buf, INFO_SIZE);
    Py_BEGIN_ALLOW_THREADS
    ok = chain_pages(ld, info, gpa, count, have_contents ? (const unsigned char *)views[2].buf : NULL, NULL);
    Py_END_ALLOW_THREADS
    release_buffers(views, 3);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "page_info_chain: OpenSSL's SHA-384 failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)ld, DIGEST);
}

PyDoc_STRVAR(measure_pages_doc,
             "measure_pages(ld, info, gpa, data, /) -> bytes\n--\n\n"
             "page_info_chain(ld, info, gpa, len(data) // 4096, sha384_pages(data, 4096)) in one pass: each\n"
             "4 KiB page of data hashed, then its PAGE_INFO (len(data) a multiple of 4096).");

static PyObject *measure_pages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer views[3];
    PyObject *objs[3];
    uint64_t gpa, count;
    int ok;
    unsigned char info[INFO_SIZE], ld[DIGEST];
    (void)self;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "measure_pages() takes 4 positional arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_u64(args[2], "gpa", &gpa) < 0) {
        return NULL;
    }
    objs[0] = args[0];
    objs[1] = args[1];
    objs[2] = args[3];
    if (get_buffers(objs, 3, views) < 0) {
        return NULL;
    }
    count = (uint64_t)views[2].len / CHAIN_STRIDE;
    if (views[0].len != DIGEST || views[1].len != INFO_SIZE || (uint64_t)views[2].len % CHAIN_STRIDE ||
        count > ((uint64_t)1 << 40)) {
        release_buffers(views, 3);
        PyErr_SetString(PyExc_ValueError, "measure_pages: ld is 48 bytes, info 0x70, data whole 4 KiB pages");
        return NULL;
    }
    memcpy(ld, views[0].buf, DIGEST);
    memcpy(info, views[1].buf, INFO_SIZE);
    Py_BEGIN_ALLOW_THREADS
    ok = chain_pages(ld, info, gpa, count, NULL, (const unsigned char *)views[2].buf);
    Py_END_ALLOW_THREADS
    release_buffers(views, 3);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "measure_pages: OpenSSL's SHA-384 failed");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)ld, DIGEST);
}

static PyMethodDef methods[] = {
    {"sha384_pages", (PyCFunction)(void (*)(void))sha384_pages, METH_FASTCALL, sha384_pages_doc},
    {"page_info_chain", (PyCFunction)(void (*)(void))page_info_chain, METH_FASTCALL, page_info_chain_doc},
    {"measure_pages", (PyCFunction)(void (*)(void))measure_pages, METH_FASTCALL, measure_pages_doc},
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
    "sevemu.crypto._sha384_accel",
    "Optional C SHA-384 of many pages at once and the SNP PAGE_INFO chain (sevemu.crypto.pagehash).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__sha384_accel(void)
{
    return PyModuleDef_Init(&module);
}
