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
 *
 * All cryptography is OpenSSL's libcrypto: one EVP cipher context keyed once (each packet sets
 * only its IV) and one EVP_MAC HMAC context keyed once (re-initialised per packet with the same
 * key).  ivs holds 16 bytes per packet, aads an equal-length AAD per packet, macs 32 bytes per
 * packet, src and dst `size` bytes per packet; every length is checked here (ValueError).  dst
 * must not overlap src.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

static PyMethodDef methods[] = {
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
