/*
 * sevemu.hw.uc._uc_accel: the optional C helper of the Unicorn engine's exit path
 * (src/sevemu/hw/uc/engine.py, src/sevemu/hw/uc/accel.py).
 *
 *   Runner(handle, emu_start, reg_read_batch, ids, vals)
 *       handle          the uc_engine pointer (an int)
 *       emu_start       the address of libunicorn's uc_emu_start (from the ctypes handle)
 *       reg_read_batch  the address of uc_reg_read_batch
 *       ids             Unicorn register ids (at most 64)
 *       vals            a writable buffer of len(ids) uint64 (the engine's array('Q')): where each
 *                       stop's register batch goes
 *   Runner.run(rip) -> err
 *       one time slice of the guest: `started` = the monotonic clock (the watchdog's time base:
 *       Python's time.monotonic()), uc_emu_start(handle, rip, 0, 0, 0) with the GIL released (the
 *       watchdog thread and the hooks' Python callbacks need it), `started` = 0, then the register
 *       batch into vals.  Returns uc_emu_start's error, or -1 when the batch read failed.
 *   Runner.started  the monotonic time the current run began (0.0 when none runs)
 *   Runner.enter(state) -> writes, or -1
 *       VMRUN's register load: each GPR of the dict state.regs (keys: the names given, in the order
 *       of the first len(names) ids) whose value (mod 2**64) differs from what Unicorn was last
 *       given or last stopped with is written into Unicorn (uc_reg_write); all of them after
 *       forget().  Returns how many were written, or -1 when state.rflags, .cr0, .cr3, .cr4, .efer
 *       are not the control registers last exchanged (ctl()): the engine then loads those itself
 *       (RFLAGS' fixed bit, EFER through its MSR) and tells set_ctl().  Raises KeyError / TypeError
 *       for a missing or non-int GPR (nothing written), RuntimeError when Unicorn refuses a write.
 *   Runner.leave(state, efer)
 *       #VMEXIT's register store from the last batch: state.regs[name] = the GPR for each name
 *       whose entry is not already that int; state.rip, .rflags, .cr0, .cr3, .cr4 = the batch's
 *       values after the GPRs (RIP, RFLAGS, CR0, CR3, CR4); state.efer = efer | LMA when
 *       efer.LME and CR0.PG (efer: the engine's copy of the guest's EFER, LMA clear); an attribute
 *       that already holds an int of that value is left alone.  enter and leave read a dict that
 *       holds exactly the GPR names (the same str objects) in their order in one walk of its
 *       entries, any other by name.
 *   Runner.ctl() -> (rflags, cr0, cr3, cr4, efer) last exchanged, or () after forget()
 *   Runner.set_ctl(values)  the engine loaded these control registers (values that are not
 *       5 ints in 0..2**64-1 make the next enter() answer -1 again)
 *   Runner.forget()  the next enter() writes every GPR and answers -1
 *   Runner.bind_io(offsets, exits, xgva, pool_address, pool_size)
 *       the engine's port-I/O tables (src/sevemu/hw/uc/ports.py IoHooks.offsets / .exits / .xgva:
 *       dicts the engine mutates but never rebinds) and its page pool's memory
 *   Runner.run_known(engine, rip) -> err or exit
 *       run(rip), then -- when Unicorn stopped without an error and the engine's hooks saw nothing
 *       (engine._event and engine._internal None, engine._tb_flush_pending false) -- the engine's
 *       known-port-I/O test: RIP on a hooked offset of its page, a decoded exit remembered for
 *       that RIP with the same long mode and DX (or an immediate port), and the same 16 instruction
 *       bytes in the slot the page executes from.  Returns that exit (the object remembered), else
 *       the int run() returned (the engine then decides as without this helper: nothing was
 *       changed).
 *
 * It decides nothing: it does what the ctypes path beside it (accel.PyRunner) does, in one call
 * instead of two foreign calls and their argument conversions.  libunicorn is not linked: the
 * function pointers come from the ctypes handle the engine already loaded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "pyargs.h"

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_REGS 64

typedef int (*emu_start_fn)(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
typedef int (*reg_read_batch_fn)(void *uc, int *regs, void **vals, int count);
typedef int (*reg_write_fn)(void *uc, int regid, const void *value);

static PyObject *s_regs, *s_rip, *s_rflags, *s_cr0, *s_cr3, *s_cr4, *s_efer, *s_event, *s_internal, *s_tb_flush_pending;
#define EFER_LME (1ULL << 8)
#define EFER_LMA (1ULL << 10)
#define CR0_PG (1ULL << 31)
#define N_CTL 5 /* RIP, RFLAGS, CR0, CR3, CR4 after the GPRs */
enum { A_REGS, A_RIP, A_RFLAGS, A_CR0, A_CR3, A_CR4, A_EFER, N_ATTR }; /* the save state's attributes */

typedef struct {
    PyObject_HEAD
    void *uc;
    emu_start_fn start;
    reg_read_batch_fn batch;
    reg_write_fn write;
    PyObject *names; /* tuple of str: the GPRs, in the order of ids */
    Py_ssize_t ngpr;
    Py_ssize_t i_rdx;
    PyObject *io_offsets, *io_exits, *xgva; /* bind_io(): dicts */
    const unsigned char *pool;
    uint64_t pool_size;
    uint64_t shadow[MAX_REGS];
    int shadow_valid;
    uint64_t ctl[N_CTL]; /* RFLAGS, CR0, CR3, CR4, EFER as last exchanged */
    int ctl_valid;
    PyTypeObject *slot_type;  /* the save state's type whose slots slot_off names (NULL: none) */
    unsigned int slot_version; /* its version tag then */
    Py_ssize_t slot_off[N_ATTR];
    int n;
    int ids[MAX_REGS];
    void *ptrs[MAX_REGS];
    Py_buffer view;
    int have_view;
    double started;
} Runner;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int runner_init(Runner *self, PyObject *args, PyObject *kwds)
{
    PyObject *handle, *start, *batch, *write, *ids, *vals, *names, *seq = NULL;
    uint64_t h, fs, fb, fw;
    static char *kwlist[] = {"handle", "emu_start", "reg_read_batch", "reg_write", "ids", "vals", "names", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOO!:Runner", kwlist, &handle, &start, &batch, &write, &ids,
                                     &vals, &PyTuple_Type, &names)) {
        return -1;
    }
    if (get_u64(handle, "handle", &h) < 0 || get_u64(start, "emu_start", &fs) < 0 ||
        get_u64(batch, "reg_read_batch", &fb) < 0 || get_u64(write, "reg_write", &fw) < 0) {
        return -1;
    }
    if (!h || !fs || !fb || !fw) {
        PyErr_SetString(PyExc_ValueError, "Runner needs a Unicorn handle and the three function addresses");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(names); i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "names must be a tuple of str");
            return -1;
        }
    }
    seq = PySequence_Fast(ids, "ids must be a sequence of register ids");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_REGS || n != PyTuple_GET_SIZE(names) + N_CTL) {
        PyErr_Format(PyExc_ValueError, "ids must name the %zd GPRs of names, then RIP, RFLAGS, CR0, CR3, CR4 "
                     "(at most %d), got %zd", PyTuple_GET_SIZE(names), MAX_REGS, n);
        Py_DECREF(seq);
        return -1;
    }
    int tmp[MAX_REGS];
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        tmp[i] = (int)v;
    }
    Py_DECREF(seq);
    Py_buffer view;
    if (PyObject_GetBuffer(vals, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        return -1;
    }
    if (view.len != n * (Py_ssize_t)sizeof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "vals must hold %zd uint64 values (%zd bytes), got %zd bytes", n,
                     n * (Py_ssize_t)sizeof(uint64_t), view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    if (self->have_view) {
        PyBuffer_Release(&self->view);
    }
    self->view = view;
    self->have_view = 1;
    self->uc = (void *)(uintptr_t)h;
    self->start = (emu_start_fn)(uintptr_t)fs;
    self->batch = (reg_read_batch_fn)(uintptr_t)fb;
    self->write = (reg_write_fn)(uintptr_t)fw;
    Py_INCREF(names);
    Py_XSETREF(self->names, names);
    self->ngpr = PyTuple_GET_SIZE(names);
    self->i_rdx = -1;
    for (Py_ssize_t i = 0; i < self->ngpr; i++) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, i), "rdx") == 0) {
            self->i_rdx = i;
        }
    }
    self->shadow_valid = 0;
    self->ctl_valid = 0;
    self->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        self->ids[i] = tmp[i];
        self->ptrs[i] = (char *)view.buf + i * sizeof(uint64_t);
    }
    self->started = 0.0;
    return 0;
}

static void runner_dealloc(Runner *self)
{
    Py_CLEAR(self->names);
    Py_CLEAR(self->io_offsets);
    Py_CLEAR(self->io_exits);
    Py_CLEAR(self->xgva);
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(runner_run_doc, "run(rip) -> err: uc_emu_start from rip (GIL released), then the register batch "
                             "into vals; -1 when the batch read failed.");

static PyObject *runner_run(Runner *self, PyObject *arg)
{
    uint64_t rip;
    int err;
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    if (get_u64(arg, "rip", &rip) < 0) {
        return NULL;
    }
    void *uc = self->uc;
    emu_start_fn start = self->start;
    self->started = monotonic_now();
    Py_BEGIN_ALLOW_THREADS
    err = start(uc, rip, 0, 0, 0);
    Py_END_ALLOW_THREADS
    self->started = 0.0;
    if (self->batch(uc, self->ids, self->ptrs, self->n) != 0) {
        err = -1;
    }
    return PyLong_FromLong(err);
}

PyDoc_STRVAR(runner_enter_doc, "enter(state) -> writes or -1: the GPRs of state.regs that differ from Unicorn's last "
                               "known values written into Unicorn (all after forget()); -1 when the control registers "
                               "are not the ones last exchanged.");

/* The uint64 value of an exact int in 0..2**64-1 into *out: 0, or -1 (no error set) for anything else. */
/* An int's value when it is in 0..2**64-1: 0 with *out set, -1 (no error set) otherwise.  What
 * PyLong_AsUnsignedLongLong gives, without its way through _PyLong_AsByteArray (CPython 3.11
 * Objects/longobject.c), which converts a register value of more than 30 bits byte by byte: where an
 * unsigned long has 64 bits, PyLong_AsUnsignedLong reads the digits themselves (the same range
 * checks, the same OverflowError for a negative or too large value). */
static int int_u64(PyObject *v, uint64_t *out)
{
#if ULONG_MAX == 0xFFFFFFFFFFFFFFFFUL
    unsigned long x = PyLong_AsUnsignedLong(v);
    if (x == (unsigned long)-1 && PyErr_Occurred()) {
#else
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
#endif
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

static int exact_u64(PyObject *v, uint64_t *out)
{
    if (v == NULL || !PyLong_CheckExact(v)) {
        return -1;
    }
    return int_u64(v, out);
}

#ifdef Py_TPFLAGS_VALID_VERSION_TAG
#define VERSION_VALID(tp) (PyType_HasFeature((tp), Py_TPFLAGS_VALID_VERSION_TAG) && (tp)->tp_version_tag != 0)
#else
#define VERSION_VALID(tp) ((tp)->tp_version_tag != 0) /* (Python 3.12 on: a tag of 0 is no tag) */
#endif
static PyObject *attr_names[N_ATTR]; /* regs, rip, rflags, cr0, cr3, cr4, efer (module_exec) */

/* The save state's attributes where its type keeps them (the register exchange's reads and writes:
 * state.regs, .rip, .rflags, .cr0, .cr3, .cr4, .efer).  For a type whose attributes are all plain
 * __slots__ members -- writable object slots, found as member descriptors by the type's lookup, with
 * the generic getattr and setattr -- each is read and written at its offset in the object, as the
 * member descriptor itself reads and writes it (Objects/descrobject.c member_get / member_set,
 * Python/structmember.c PyMember_GetOne / PyMember_SetOne for T_OBJECT_EX): the same objects, the
 * same references, without the attribute lookup by name (what CPython's own LOAD_ATTR_SLOT and
 * STORE_ATTR_SLOT do, Python/specialize.c).  The offsets are kept with the type's version tag, which
 * any change of the type (or of a base) invalidates; any other type, an unset slot or an
 * invalidated tag takes PyObject_GetAttr / PyObject_SetAttr.  1 when state's type has the offsets. */
static int state_slots(Runner *self, PyObject *state)
{
    PyTypeObject *tp = Py_TYPE(state);
    Py_ssize_t off[N_ATTR];
    if (tp == self->slot_type && VERSION_VALID(tp) && tp->tp_version_tag == self->slot_version) {
        return 1;
    }
    self->slot_type = NULL;
    if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_setattro != PyObject_GenericSetAttr) {
        return 0;
    }
    for (int i = 0; i < N_ATTR; i++) {
        PyObject *d = _PyType_Lookup(tp, attr_names[i]); /* (borrowed; assigns the version tag) */
        PyMemberDef *m;
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type)) {
            return 0;
        }
        m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY) || m->offset < (Py_ssize_t)sizeof(PyObject) ||
            !PyType_IsSubtype(tp, PyDescr_TYPE(d))) {
            return 0;
        }
        off[i] = m->offset;
    }
    if (!VERSION_VALID(tp)) {
        return 0;
    }
    memcpy(self->slot_off, off, sizeof off);
    self->slot_version = tp->tp_version_tag;
    self->slot_type = tp;
    return 1;
}

/* state.<attribute i> (a new reference): from its slot when `fast`, else by name. */
static PyObject *state_get(Runner *self, PyObject *state, int fast, int i)
{
    if (fast) {
        PyObject *v = *(PyObject **)((char *)state + self->slot_off[i]);
        if (v != NULL) {
            return Py_NewRef(v);
        }
    }
    return PyObject_GetAttr(state, attr_names[i]); /* (an unset slot: its AttributeError) */
}

/* state.<attribute i> = v (v borrowed): into its slot when `fast`, else by name; 0 or -1. */
static int state_set(Runner *self, PyObject *state, int fast, int i, PyObject *v)
{
    if (fast) {
        PyObject **p = (PyObject **)((char *)state + self->slot_off[i]), *old = *p;
        *p = Py_NewRef(v);
        Py_XDECREF(old);
        return 0;
    }
    return PyObject_SetAttr(state, attr_names[i], v);
}

/* Whether state's RFLAGS, CR0, CR3, CR4, EFER are the ones last exchanged: 1, 0, or -1 on error. */
static int ctl_same(Runner *self, PyObject *state, int fast)
{
    if (!self->ctl_valid) {
        return 0;
    }
    for (int i = 0; i < N_CTL; i++) {
        uint64_t x;
        PyObject *v = state_get(self, state, fast, A_RFLAGS + i); /* rflags, cr0, cr3, cr4, efer */
        if (v == NULL) {
            return -1;
        }
        int ok = exact_u64(v, &x) == 0 && x == self->ctl[i];
        Py_DECREF(v);
        if (!ok) {
            return 0;
        }
    }
    return 1;
}

/* The values of the dict regs for the GPR names, into vals (borrowed), when regs holds exactly those
 * keys -- the same str objects -- in that order (a save state's usual dict): read in one walk of
 * its entries.  1, or 0 when the caller must look each name up. */
static int regs_in_order(Runner *self, PyObject *regs, PyObject **vals)
{
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    if (!PyDict_CheckExact(regs) || PyDict_GET_SIZE(regs) != self->ngpr) {
        return 0;
    }
    while (PyDict_Next(regs, &pos, &k, &v)) {
        if (i >= self->ngpr || k != PyTuple_GET_ITEM(self->names, i)) {
            return 0;
        }
        vals[i++] = v;
    }
    return i == self->ngpr;
}

/* The GPR load of enter(): writes, or -1 with an error set. */
static long enter_gprs(Runner *self, PyObject *regs)
{
    uint64_t now[MAX_REGS];
    PyObject *got[MAX_REGS];
    Py_ssize_t i, ngpr = self->ngpr;
    long writes = 0;
    if (!PyDict_Check(regs)) {
        PyErr_SetString(PyExc_TypeError, "state.regs must be a dict");
        return -1;
    }
    int in_order = regs_in_order(self, regs, got);
    for (i = 0; i < ngpr; i++) { /* every value first: nothing is written when one is bad */
        PyObject *name = PyTuple_GET_ITEM(self->names, i);
        PyObject *v = in_order ? got[i] : PyDict_GetItemWithError(regs, name);
        if (v == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, name);
            }
            return -1;
        }
        if (!PyLong_Check(v)) {
            PyErr_Format(PyExc_TypeError, "register %U must be an int", name);
            return -1;
        }
        now[i] = (uint64_t)PyLong_AsUnsignedLongLongMask(v);
        if (now[i] == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
    }
    for (i = 0; i < ngpr; i++) {
        if (self->shadow_valid && now[i] == self->shadow[i]) {
            continue;
        }
        if (self->write(self->uc, self->ids[i], &now[i]) != 0) {
            self->shadow_valid = 0;
            PyErr_Format(PyExc_RuntimeError, "Unicorn register write failed (register %U)",
                         PyTuple_GET_ITEM(self->names, i));
            return -1;
        }
        self->shadow[i] = now[i];
        writes++;
    }
    self->shadow_valid = 1;
    return writes;
}

static PyObject *runner_enter(Runner *self, PyObject *state)
{
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    PyObject *regs = state_get(self, state, state_slots(self, state), A_REGS);
    if (regs == NULL) {
        return NULL;
    }
    long writes = enter_gprs(self, regs);
    Py_DECREF(regs);
    if (writes < 0) {
        return NULL;
    }
    int same = ctl_same(self, state, state_slots(self, state));
    if (same < 0) {
        return NULL;
    }
    return PyLong_FromLong(same ? writes : -1);
}

static PyObject *runner_ctl(Runner *self, PyObject *unused)
{
    (void)unused;
    if (!self->ctl_valid) {
        return PyTuple_New(0);
    }
    return Py_BuildValue("(KKKKK)", (unsigned long long)self->ctl[0], (unsigned long long)self->ctl[1],
                         (unsigned long long)self->ctl[2], (unsigned long long)self->ctl[3],
                         (unsigned long long)self->ctl[4]);
}

static PyObject *runner_set_ctl(Runner *self, PyObject *values)
{
    uint64_t v[N_CTL];
    self->ctl_valid = 0;
    if (!PyTuple_Check(values)) {
        PyErr_SetString(PyExc_TypeError, "set_ctl() takes a tuple");
        return NULL;
    }
    if (PyTuple_GET_SIZE(values) != N_CTL) {
        Py_RETURN_NONE;
    }
    for (int i = 0; i < N_CTL; i++) {
        if (exact_u64(PyTuple_GET_ITEM(values, i), &v[i]) < 0) {
            Py_RETURN_NONE; /* not representable: the next enter() asks the engine again */
        }
    }
    memcpy(self->ctl, v, sizeof v);
    self->ctl_valid = 1;
    Py_RETURN_NONE;
}

/* state.<name> = x, unless it already is an exact int of that value (no new int, no store: the
 * control registers and EFER rarely change between exits); 0, or -1 with an error set. */
static int set_u64_attr(Runner *self, PyObject *state, int i, uint64_t x)
{
    uint64_t have;
    int fast = state_slots(self, state); /* (asked again: a store may have run Python code) */
    PyObject *old = state_get(self, state, fast, i);
    if (old == NULL) {
        PyErr_Clear(); /* (not there yet: stored below) */
    } else {
        int same = exact_u64(old, &have) == 0 && have == x;
        Py_DECREF(old);
        if (same) {
            return 0;
        }
    }
    PyObject *v = PyLong_FromUnsignedLongLong(x);
    if (v == NULL || state_set(self, state, state_slots(self, state), i, v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    Py_DECREF(v);
    return 0;
}

PyDoc_STRVAR(runner_leave_doc, "leave(state, efer): state.regs, state.rip/rflags/cr0/cr3/cr4 from the last register "
                               "batch, state.efer from efer (LMA when LME and CR0.PG).");

static PyObject *runner_leave(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i, ngpr = self->ngpr;
    const uint64_t *vals;
    uint64_t efer;
    PyObject *state, *regs;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "leave() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    state = args[0];
    if (get_u64(args[1], "efer", &efer) < 0) {
        return NULL;
    }
    if (!self->have_view) {
        PyErr_SetString(PyExc_RuntimeError, "Runner was not initialised");
        return NULL;
    }
    self->ctl_valid = 0;
    vals = (const uint64_t *)self->view.buf;
    regs = state_get(self, state, state_slots(self, state), A_REGS);
    if (regs == NULL) {
        return NULL;
    }
    if (!PyDict_Check(regs)) {
        Py_DECREF(regs);
        PyErr_SetString(PyExc_TypeError, "state.regs must be a dict");
        return NULL;
    }
    PyObject *got[MAX_REGS];
    int in_order = regs_in_order(self, regs, got); /* (a store below replaces a value: got[i] is not read after) */
    for (i = 0; i < ngpr; i++) {
        PyObject *name = PyTuple_GET_ITEM(self->names, i);
        PyObject *old = in_order ? got[i] : PyDict_GetItemWithError(regs, name);
        self->shadow[i] = vals[i];
        if (old != NULL && PyLong_CheckExact(old)) {
            uint64_t have;
            if (int_u64(old, &have) == 0 && have == vals[i]) {
                continue; /* already that int */
            }
        } else if (old == NULL && PyErr_Occurred()) {
            Py_DECREF(regs);
            self->shadow_valid = 0;
            return NULL;
        }
        PyObject *v = PyLong_FromUnsignedLongLong(vals[i]);
        if (v == NULL || PyDict_SetItem(regs, name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(regs);
            self->shadow_valid = 0;
            return NULL;
        }
        Py_DECREF(v);
    }
    Py_DECREF(regs);
    self->shadow_valid = 1;
    for (i = 0; i < N_CTL; i++) {
        if (set_u64_attr(self, state, A_RIP + i, vals[ngpr + i]) < 0) { /* rip, rflags, cr0, cr3, cr4 */
            return NULL;
        }
    }
    uint64_t cr0 = vals[ngpr + 2];
    if ((efer & EFER_LME) && (cr0 & CR0_PG)) {
        efer |= EFER_LMA;
    }
    if (set_u64_attr(self, state, A_EFER, efer) < 0) {
        return NULL;
    }
    self->ctl[0] = vals[ngpr + 1]; /* RFLAGS, CR0, CR3, CR4 as stored, and EFER */
    self->ctl[1] = cr0;
    self->ctl[2] = vals[ngpr + 3];
    self->ctl[3] = vals[ngpr + 4];
    self->ctl[4] = efer;
    self->ctl_valid = 1;
    Py_RETURN_NONE;
}

static PyObject *runner_forget(Runner *self, PyObject *unused)
{
    (void)unused;
    self->shadow_valid = 0;
    self->ctl_valid = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(runner_bind_io_doc, "bind_io(offsets, exits, xgva, pool_address, pool_size): the engine's port-I/O "
                                 "tables and page pool, for run_known().");

static PyObject *runner_bind_io(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t address, size;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "bind_io() takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyDict_CheckExact(args[0]) || !PyDict_CheckExact(args[1]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "bind_io(): offsets, exits and xgva must be dicts");
        return NULL;
    }
    if (get_u64(args[3], "pool_address", &address) < 0 || get_u64(args[4], "pool_size", &size) < 0) {
        return NULL;
    }
    if (!address || size % 4096) {
        PyErr_SetString(PyExc_ValueError, "bind_io(): the pool must be a mapped whole number of pages");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(self->io_offsets, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(self->io_exits, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(self->xgva, args[2]);
    self->pool = (const unsigned char *)(uintptr_t)address;
    self->pool_size = size;
    Py_RETURN_NONE;
}

/* dict[int(key)] (borrowed; NULL when absent or on error -- the error is then cleared: the caller
 * only falls back to the engine's own test). */
static PyObject *get_by_u64(PyObject *dict, uint64_t key)
{
    PyObject *k = u64_obj(key);
    if (k == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(dict, k);
    Py_DECREF(k);
    if (v == NULL) {
        PyErr_Clear();
    }
    return v;
}

/* 1 when engine.<name> is None, 0 when not (or on error, cleared). */
static int attr_is_none(PyObject *engine, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(engine, name);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int none = v == Py_None;
    Py_DECREF(v);
    return none;
}

/* The remembered exit of a known port-I/O stop at the batch's RIP (new reference), or NULL (no
 * error set): see run_known. */
static PyObject *known_io(Runner *self, PyObject *engine)
{
    const uint64_t *vals = (const uint64_t *)self->view.buf;
    uint64_t rip = vals[self->ngpr], page = rip & ~(uint64_t)0xFFF, off = rip & 0xFFF;
    if (self->io_offsets == NULL || self->i_rdx < 0) {
        return NULL;
    }
    if (!attr_is_none(engine, s_event) || !attr_is_none(engine, s_internal)) {
        return NULL;
    }
    PyObject *pending = PyObject_GetAttr(engine, s_tb_flush_pending);
    if (pending == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int flush = PyObject_IsTrue(pending);
    Py_DECREF(pending);
    if (flush != 0) {
        if (flush < 0) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyObject *offs = get_by_u64(self->io_offsets, page);
    if (offs == NULL || !PyAnySet_Check(offs)) {
        return NULL;
    }
    PyObject *o = u64_obj(off);
    if (o == NULL) {
        PyErr_Clear();
        return NULL;
    }
    int hooked = PySet_Contains(offs, o);
    Py_DECREF(o);
    if (hooked != 1) {
        if (hooked < 0) {
            PyErr_Clear();
        }
        return NULL;
    }
    PyObject *hit = get_by_u64(self->io_exits, rip);
    if (hit == NULL || !PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) != 4) {
        return NULL;
    }
    PyObject *code = PyTuple_GET_ITEM(hit, 0), *lm = PyTuple_GET_ITEM(hit, 1), *dx = PyTuple_GET_ITEM(hit, 2);
    if (!PyBytes_CheckExact(code) || PyBytes_GET_SIZE(code) != 16 || !PyBool_Check(lm) || !PyLong_CheckExact(dx)) {
        return NULL;
    }
    int long_mode = (vals[self->ngpr + 2] >> 31) & 1; /* CR0.PG */
    if ((lm == Py_True) != long_mode) {
        return NULL;
    }
    int overflow = 0;
    long long want = PyLong_AsLongLongAndOverflow(dx, &overflow);
    if (overflow || (want == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return NULL;
    }
    if (want != -1 && (uint64_t)want != (vals[self->i_rdx] & 0xFFFF)) {
        return NULL;
    }
    PyObject *slot_obj = get_by_u64(self->xgva, page);
    if (slot_obj == NULL || !PyLong_CheckExact(slot_obj) || off > 4096 - 16) {
        return NULL;
    }
    unsigned long long slot = PyLong_AsUnsignedLongLong(slot_obj);
    if (slot == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    if (slot >= self->pool_size / 4096) {
        return NULL;
    }
    if (memcmp(self->pool + slot * 4096 + off, PyBytes_AS_STRING(code), 16) != 0) {
        return NULL;
    }
    PyObject *ex = PyTuple_GET_ITEM(hit, 3);
    Py_INCREF(ex);
    return ex;
}

PyDoc_STRVAR(runner_run_known_doc, "run_known(engine, rip) -> err or exit: run(rip), then the known port-I/O exit "
                                   "at the stop, if it is one (see the module comment).");

static PyObject *runner_run_known(Runner *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "run_known() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *r = runner_run(self, args[1]);
    if (r == NULL || PyLong_AsLong(r) != 0) {
        return r;
    }
    PyObject *ex = known_io(self, args[0]);
    if (ex == NULL) {
        return r;
    }
    Py_DECREF(r);
    return ex;
}

static PyObject *runner_get_started(Runner *self, void *closure)
{
    (void)closure;
    return PyFloat_FromDouble(self->started);
}

static PyObject *runner_slotted(Runner *self, PyObject *state)
{
    return PyBool_FromLong(state_slots(self, state));
}

static PyMethodDef runner_methods[] = {
    {"slotted", (PyCFunction)runner_slotted, METH_O,
     "slotted(state) -> whether enter() and leave() reach state's attributes at their slots' offsets."},
    {"run", (PyCFunction)runner_run, METH_O, runner_run_doc},
    {"enter", (PyCFunction)runner_enter, METH_O, runner_enter_doc},
    {"leave", (PyCFunction)(void (*)(void))runner_leave, METH_FASTCALL, runner_leave_doc},
    {"ctl", (PyCFunction)runner_ctl, METH_NOARGS, "ctl() -> the control registers last exchanged, or ()."},
    {"set_ctl", (PyCFunction)runner_set_ctl, METH_O, "set_ctl(values): the engine loaded these control registers."},
    {"forget", (PyCFunction)runner_forget, METH_NOARGS, "forget(): the next enter() writes every register."},
    {"bind_io", (PyCFunction)(void (*)(void))runner_bind_io, METH_FASTCALL, runner_bind_io_doc},
    {"run_known", (PyCFunction)(void (*)(void))runner_run_known, METH_FASTCALL, runner_run_known_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef runner_getset[] = {
    {"started", (getter)runner_get_started, NULL, "monotonic time the current run began (0.0: none runs)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(runner_doc, "Runner(handle, emu_start, reg_read_batch, reg_write, ids, vals, names): one call per time "
                         "slice of the Unicorn engine (uc_emu_start, then the register batch), and the GPR exchange "
                         "with the save state at VMRUN and #VMEXIT.");

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw.uc._uc_accel.Runner",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = runner_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)runner_init,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_methods = runner_methods,
    .tp_getset = runner_getset,
};

/* ---- PVALIDATE retired in the invalid-instruction hook, in C -----------------------------------
 * PvHook(handle, reg_read_batch, reg_write_batch, ids, fallback) is the UC_HOOK_INSN_INVALID
 * callback of an engine with this helper (address(): the C function; the hook's user data is the
 * object itself, which the engine keeps alive).  Each call takes the GIL and either retires the
 * instruction itself or calls fallback(None, None) -- the engine's Python hook, _on_invalid, whose
 * answer (a bool) it returns.  It retires only what exits.pvalidate_in_place would retire with the
 * same result, for the one case the engine armed it for (arm(): after the Python path retired a
 * PVALIDATE of a 4 KiB page to validated with the engine's caching walker):
 *   - RDX bit 0 set (validate), ECX 0 (4 KiB), CR0.PG as armed, and the 15 bytes at RIP in the
 *     slot the page executes from (bind(): the engine's xgva and pool) equal to the armed ones: the same
 *     decode (PVALIDATE, its length) as the Python path's decode of the same bytes in the same mode;
 *   - the vCPU's RMP epoch (epochs[asid]) equal to (rmp.epoch, 0);
 *   - the operand's (GPA, SPA) answered by the walker's own caches as NestedCachingMmu.operand
 *     answers them (the guest 2 MiB region, then the nested translation, then the region's NPT
 *     page table): the same dicts, looked up with the same keys;
 *   - Rmp._validate_4k's case: SPA covered, no software line over the page's entry nor over its
 *     region's 2 MiB entry, no assigned 2 MiB entry over the region, the entry in DRAM, assigned to
 *     the ASID, mutable, 4 KiB, at the GPA.
 * Anything else -- and every check that does not pass -- goes to the fallback with nothing changed.
 * A validated entry answers EAX 0 with CF 1; else the table line's CLFLUSH (cache.clflush(0, False,
 * spa) when the line is in its set; else, as that CLFLUSH does for a line the cache does not hold,
 * agent.snoop(key, key + 64, True, None) of each of cache.plain_agents) and the low quadword's store
 * with Validated, EAX 0 and CF 0.  Then as the Python path: engine.refresh() when the pool has stale
 * or updated slots, the stats' pvalidates and pvalidates_in_place counted, the TLB flushed if the
 * epoch moved (cpu.rmp_changed(), engine.flush_tlb()), RAX, RFLAGS, RIP written in one batch.  An
 * exception after the first change is the engine's internal error (engine._internal = "Type: msg",
 * the hook answers false), as the Python hook reports it.
 * disarm(): the next call goes to the fallback (the engine disarms at every VMRUN). */
typedef int (*reg_write_batch_fn)(void *uc, int *regs, void *const *vals, int count);

#define PV_CODE 15
#define PV_NREGS 7 /* RAX, RCX, RDX, RIP, RFLAGS, CR0, CR3 */
#define RMP_ASSIGNED 1ULL
#define RMP_PAGESIZE 2ULL
#define RMP_IMMUTABLE 4ULL
#define RMP_GPA_MASK (((1ULL << 39) - 1) << 12)
#define RMP_VALIDATED (1ULL << 62)
#define RFLAGS_CF 1ULL

static PyObject *s_epoch, *s_dirty, *s_plain_agents, *s_stale, *s_updated, *s_refresh, *s_clflush, *s_pvalidates,
    *s_pvalidates_in_place, *s_rmp_changed, *s_flush_tlb, *s_snoop, *pv_zero, *pv_one;

typedef struct {
    PyObject_HEAD
    void *uc;
    reg_read_batch_fn rbatch;
    reg_write_batch_fn wbatch;
    int ids[PV_NREGS];
    PyObject *xgva; /* bind(): the engine's IoHooks.xgva (mutated, never rebound) */
    const unsigned char *mem;
    uint64_t mem_size;
    PyObject *fallback;
    /* armed */
    int armed;
    int paging, sev;
    unsigned char code[PV_CODE];
    uint64_t length, asid, ncr3, first, covered, set_mask, addr_mask, rsvd;
    PyObject *engine, *cpu, *rmp, *epochs, *asid_obj, *ncr3_obj, *sevkey_obj, *regions, *nested, *optables, *cache,
        *sets, *pages, *pool, *stats;
} PvHook;

static void pv_clear_armed(PvHook *self)
{
    self->armed = 0;
    Py_CLEAR(self->engine);
    Py_CLEAR(self->cpu);
    Py_CLEAR(self->rmp);
    Py_CLEAR(self->epochs);
    Py_CLEAR(self->asid_obj);
    Py_CLEAR(self->ncr3_obj);
    Py_CLEAR(self->sevkey_obj);
    Py_CLEAR(self->regions);
    Py_CLEAR(self->nested);
    Py_CLEAR(self->optables);
    Py_CLEAR(self->cache);
    Py_CLEAR(self->sets);
    Py_CLEAR(self->pages);
    Py_CLEAR(self->pool);
    Py_CLEAR(self->stats);
}

static int pvhook_init(PvHook *self, PyObject *args, PyObject *kwds)
{
    PyObject *handle, *rb, *wb, *ids, *fallback, *seq;
    uint64_t h, frb, fwb;
    static char *kwlist[] = {"handle", "reg_read_batch", "reg_write_batch", "ids", "fallback", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:PvHook", kwlist, &handle, &rb, &wb, &ids, &fallback)) {
        return -1;
    }
    if (get_u64(handle, "handle", &h) < 0 || get_u64(rb, "reg_read_batch", &frb) < 0 ||
        get_u64(wb, "reg_write_batch", &fwb) < 0) {
        return -1;
    }
    if (!h || !frb || !fwb || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_ValueError, "PvHook needs a Unicorn handle, the two batch functions and a callable");
        return -1;
    }
    seq = PySequence_Fast(ids, "ids must be a sequence of register ids");
    if (seq == NULL) {
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != PV_NREGS) {
        PyErr_SetString(PyExc_ValueError, "ids must name RAX, RCX, RDX, RIP, RFLAGS, CR0, CR3");
        Py_DECREF(seq);
        return -1;
    }
    for (int i = 0; i < PV_NREGS; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        self->ids[i] = (int)v;
    }
    Py_DECREF(seq);
    self->uc = (void *)(uintptr_t)h;
    self->rbatch = (reg_read_batch_fn)(uintptr_t)frb;
    self->wbatch = (reg_write_batch_fn)(uintptr_t)fwb;
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    pv_clear_armed(self);
    return 0;
}

static int pvhook_traverse(PvHook *self, visitproc visit, void *arg)
{
    Py_VISIT(self->xgva);
    Py_VISIT(self->fallback);
    Py_VISIT(self->engine);
    Py_VISIT(self->cpu);
    Py_VISIT(self->rmp);
    Py_VISIT(self->cache);
    Py_VISIT(self->pool);
    Py_VISIT(self->stats);
    Py_VISIT(self->regions);
    Py_VISIT(self->nested);
    Py_VISIT(self->optables);
    Py_VISIT(self->epochs);
    Py_VISIT(self->sets);
    Py_VISIT(self->pages);
    return 0;
}

static int pvhook_clear(PvHook *self)
{
    pv_clear_armed(self);
    Py_CLEAR(self->xgva);
    self->mem = NULL;
    Py_CLEAR(self->fallback);
    return 0;
}

static void pvhook_dealloc(PvHook *self)
{
    PyObject_GC_UnTrack(self);
    pvhook_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int u64_attr(PyObject *obj, const char *name, uint64_t *out)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL) {
        return -1;
    }
    int r = get_u64(v, name, out);
    Py_DECREF(v);
    return r;
}

static PyObject *dict_attr(PyObject *obj, const char *name)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v != NULL && !PyDict_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be a dict", name);
        Py_CLEAR(v);
    }
    return v;
}

PyDoc_STRVAR(pvhook_arm_doc,
             "arm(code, paging, length, engine, cpu, rmp, epochs, asid, sev, ncr3, walker, cache, pages, first, "
             "pool, stats)\nRetire in C the PVALIDATEs of these 15 instruction bytes in this paging mode (see the "
             "module docstring).");

static PyObject *pvhook_arm(PvHook *self, PyObject *args)
{
    Py_buffer code;
    int paging, sev;
    unsigned long long length, asid, ncr3, first;
    PyObject *engine, *cpu, *rmp, *epochs, *walker, *cache, *pages, *pool, *stats;
    if (!PyArg_ParseTuple(args, "y*pKOOOO!KpKOOO!KOO:arm", &code, &paging, &length, &engine, &cpu, &rmp,
                          &PyDict_Type, &epochs, &asid, &sev, &ncr3, &walker, &cache, &PyDict_Type, &pages, &first,
                          &pool, &stats)) {
        return NULL;
    }
    pv_clear_armed(self);
    if (code.len != PV_CODE || length == 0 || length > PV_CODE) {
        PyBuffer_Release(&code);
        PyErr_SetString(PyExc_ValueError, "arm needs the 15 instruction bytes and a length of at most 15");
        return NULL;
    }
    memcpy(self->code, code.buf, PV_CODE);
    PyBuffer_Release(&code);
    PyObject *regions = dict_attr(walker, "_regions"), *nested = dict_attr(walker, "_nested"),
             *optables = dict_attr(walker, "_operand_tables"), *sets = PyObject_GetAttrString(cache, "sets");
    uint64_t covered, set_mask, addr_mask, rsvd;
    if (regions == NULL || nested == NULL || optables == NULL || sets == NULL || !PyList_CheckExact(sets) ||
        u64_attr(rmp, "covered", &covered) < 0 || u64_attr(cache, "set_mask", &set_mask) < 0 ||
        u64_attr(walker, "addr_mask", &addr_mask) < 0 || u64_attr(walker, "rsvd_sev", &rsvd) < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "cache.sets must be a list");
        }
        Py_XDECREF(regions);
        Py_XDECREF(nested);
        Py_XDECREF(optables);
        Py_XDECREF(sets);
        return NULL;
    }
    self->asid_obj = PyLong_FromUnsignedLongLong(asid);
    self->ncr3_obj = PyLong_FromUnsignedLongLong(ncr3);
    self->sevkey_obj = PyLong_FromLong(sev << 2 | 8);
    if (self->asid_obj == NULL || self->ncr3_obj == NULL || self->sevkey_obj == NULL) {
        Py_DECREF(regions);
        Py_DECREF(nested);
        Py_DECREF(optables);
        Py_DECREF(sets);
        pv_clear_armed(self);
        return NULL;
    }
    self->regions = regions;
    self->nested = nested;
    self->optables = optables;
    self->sets = sets;
    self->paging = paging;
    self->sev = sev;
    self->length = length;
    self->asid = asid;
    self->ncr3 = ncr3;
    self->first = first;
    self->covered = covered;
    self->set_mask = set_mask;
    self->addr_mask = addr_mask;
    self->rsvd = rsvd;
#define PV_KEEP(field, v) Py_INCREF(v); self->field = v
    PV_KEEP(engine, engine);
    PV_KEEP(cpu, cpu);
    PV_KEEP(rmp, rmp);
    PV_KEEP(epochs, epochs);
    PV_KEEP(cache, cache);
    PV_KEEP(pages, pages);
    PV_KEEP(pool, pool);
    PV_KEEP(stats, stats);
#undef PV_KEEP
    self->armed = 1;
    Py_RETURN_NONE;
}

static PyObject *pvhook_bind(PvHook *self, PyObject *args)
{
    PyObject *xgva;
    unsigned long long address, size;
    if (!PyArg_ParseTuple(args, "O!KK:bind", &PyDict_Type, &xgva, &address, &size)) {
        return NULL;
    }
    pv_clear_armed(self);
    Py_INCREF(xgva);
    Py_XSETREF(self->xgva, xgva);
    self->mem = (const unsigned char *)(uintptr_t)address;
    self->mem_size = size;
    Py_RETURN_NONE;
}

static PyObject *pvhook_disarm(PvHook *self, PyObject *unused)
{
    (void)unused;
    pv_clear_armed(self);
    Py_RETURN_NONE;
}

static PyObject *pvhook_get_armed(PvHook *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->armed);
}

/* dict[key] for a tuple key of n unsigned ints (borrowed; NULL: missing or an error, cleared). */
static PyObject *get_by_tuple(PyObject *dict, int n, PyObject *const *items)
{
    PyObject *key = PyTuple_New(n);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(key, i, items[i]);
    }
    PyObject *v = PyDict_GetItemWithError(dict, key);
    Py_DECREF(key);
    if (v == NULL) {
        PyErr_Clear();
    }
    return v;
}

/* The low quadword at byte off of a DRAM page (a bytearray of at least off + 8 bytes); -1: not one. */
static int page_lo(PyObject *page, uint64_t off, uint64_t *lo)
{
    if (!PyByteArray_CheckExact(page) || (uint64_t)PyByteArray_GET_SIZE(page) < off + 16) {
        return -1;
    }
    memcpy(lo, PyByteArray_AS_STRING(page) + off, 8); /* (little-endian host: x86-64 only, as Unicorn) */
    return 0;
}

/* key in the set (or dict) `dirty`: 1, 0, or -1 when it cannot tell (not a set). */
static int in_dirty(PyObject *dirty, uint64_t key)
{
    if (!PySet_CheckExact(dirty)) {
        return -1;
    }
    if (PySet_GET_SIZE(dirty) == 0) {
        return 0;
    }
    PyObject *k = PyLong_FromUnsignedLongLong(key);
    if (k == NULL) {
        PyErr_Clear();
        return -1;
    }
    int r = PySet_Contains(dirty, k);
    Py_DECREF(k);
    if (r < 0) {
        PyErr_Clear();
    }
    return r;
}

/* 1 when the vCPU's RMP epoch (epochs[asid]) is (rmp.epoch, 0), 0 when not, -1 on an error (set). */
static int epoch_current(PvHook *self)
{
    PyObject *epoch = PyObject_GetAttr(self->rmp, s_epoch);
    if (epoch == NULL) {
        return -1;
    }
    PyObject *seen = PyDict_GetItemWithError(self->epochs, self->asid_obj);
    int same = 0;
    if (seen != NULL && PyTuple_CheckExact(seen) && PyTuple_GET_SIZE(seen) == 2 &&
        PyLong_CheckExact(PyTuple_GET_ITEM(seen, 1)) && PyLong_AsLong(PyTuple_GET_ITEM(seen, 1)) == 0) {
        same = PyObject_RichCompareBool(PyTuple_GET_ITEM(seen, 0), epoch, Py_EQ);
    }
    Py_DECREF(epoch);
    return same < 0 || PyErr_Occurred() ? -1 : same;
}

/* The checks and the retire: 1 retired, 0 declined (nothing changed), -1 an exception after a change. */
static int pv_fast(PvHook *self)
{
    uint64_t r[PV_NREGS];
    void *ptrs[PV_NREGS];
    for (int i = 0; i < PV_NREGS; i++) {
        ptrs[i] = &r[i];
    }
    if (self->rbatch(self->uc, self->ids, ptrs, PV_NREGS)) {
        return 0;
    }
    uint64_t gva = r[0], rip = r[3], rflags = r[4], cr3 = r[6];
    if (!(r[2] & 1) || (r[1] & 0xFFFFFFFFULL) || (int)((r[5] >> 31) & 1) != self->paging) {
        return 0;
    }
    /* the instruction: the armed bytes in the slot the page executes from */
    uint64_t off = rip & 0xFFF, slot;
    if (self->xgva == NULL || self->mem == NULL || off + PV_CODE > 0x1000 ||
        exact_u64(get_by_u64(self->xgva, rip & ~0xFFFULL), &slot) < 0 || slot >= self->mem_size / 0x1000 ||
        memcmp(self->mem + slot * 0x1000 + off, self->code, PV_CODE) != 0) {
        return 0;
    }
    /* the vCPU's RMP epoch */
    if (epoch_current(self) != 1) {
        PyErr_Clear();
        return 0;
    }
    /* the operand: NestedCachingMmu.operand's cached answers */
    uint64_t gpa, spa;
    int enc = self->sev;
    if (self->paging) {
        PyObject *hi = PyLong_FromUnsignedLongLong(gva >> 21), *c3 = PyLong_FromUnsignedLongLong(cr3),
                 *zero = PyLong_FromLong(0);
        PyObject *region = NULL;
        if (hi != NULL && c3 != NULL && zero != NULL) {
            PyObject *items[7] = {hi, self->sevkey_obj, c3, self->asid_obj, self->ncr3_obj, zero, zero};
            region = get_by_tuple(self->regions, 7, items);
        }
        Py_XDECREF(hi);
        Py_XDECREF(c3);
        Py_XDECREF(zero);
        uint64_t base;
        if (region == NULL || !PyTuple_CheckExact(region) || PyTuple_GET_SIZE(region) < 2 ||
            exact_u64(PyTuple_GET_ITEM(region, 0), &base) < 0) {
            PyErr_Clear();
            return 0;
        }
        int c = PyObject_IsTrue(PyTuple_GET_ITEM(region, 1));
        if (c < 0) {
            PyErr_Clear();
            return 0;
        }
        gpa = base | (gva & 0x1FFFFF);
        enc = enc && c;
    } else {
        gpa = gva;
    }
    PyObject *pn = PyLong_FromUnsignedLongLong(gpa >> 12), *kind = PyLong_FromLong(4 | enc << 3);
    PyObject *hit = NULL;
    if (pn != NULL && kind != NULL) {
        PyObject *items[3] = {self->ncr3_obj, pn, kind};
        hit = get_by_tuple(self->nested, 3, items);
    }
    Py_XDECREF(pn);
    Py_XDECREF(kind);
    if (hit != NULL) {
        if (!PyTuple_CheckExact(hit) || PyTuple_GET_SIZE(hit) < 1 || exact_u64(PyTuple_GET_ITEM(hit, 0), &spa) < 0) {
            return 0;
        }
    } else {
        PyObject *rg = PyLong_FromUnsignedLongLong(gpa >> 21);
        PyObject *entries = NULL;
        if (rg != NULL) {
            PyObject *items[2] = {self->ncr3_obj, rg};
            entries = get_by_tuple(self->optables, 2, items);
            Py_DECREF(rg);
        }
        PyErr_Clear();
        uint64_t eo = (gpa >> 9) & 0xFF8, pte;
        const char *raw = NULL;
        if (entries != NULL && PyBytes_CheckExact(entries) && (uint64_t)PyBytes_GET_SIZE(entries) >= eo + 8) {
            raw = PyBytes_AS_STRING(entries);
        } else if (entries != NULL && PyByteArray_CheckExact(entries) &&
                   (uint64_t)PyByteArray_GET_SIZE(entries) >= eo + 8) {
            raw = PyByteArray_AS_STRING(entries);
        }
        if (raw == NULL) {
            return 0;
        }
        memcpy(&pte, raw + eo, 8);
        if (!(pte & 1) || (pte & self->rsvd)) {
            return 0;
        }
        spa = pte & self->addr_mask;
    }
    gpa &= ~0xFFFULL;
    spa &= ~0xFFFULL;
    /* Rmp._validate_4k */
    if (spa >= self->covered) {
        return 0;
    }
    uint64_t pfn = spa >> 12, large = pfn & ~511ULL, lo;
    PyObject *dirty = PyObject_GetAttr(self->cache, s_dirty);
    if (dirty == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *page;
    if (large != pfn) {
        uint64_t at = self->first + large * 16;
        if (in_dirty(dirty, at & ~63ULL) != 0) {
            Py_DECREF(dirty);
            return 0;
        }
        page = get_by_u64(self->pages, at >> 12);
        if (page != NULL) {
            if (page_lo(page, at & 0xFFF, &lo) < 0) {
                Py_DECREF(dirty);
                return 0;
            }
            if ((lo & (RMP_ASSIGNED | RMP_PAGESIZE)) == (RMP_ASSIGNED | RMP_PAGESIZE)) {
                Py_DECREF(dirty);
                return 0;
            }
        }
    }
    uint64_t at = self->first + pfn * 16, key = at & ~63ULL;
    int d = in_dirty(dirty, key);
    Py_DECREF(dirty);
    if (d != 0) {
        return 0;
    }
    page = get_by_u64(self->pages, at >> 12);
    if (page == NULL || page_lo(page, at & 0xFFF, &lo) < 0) {
        return 0;
    }
    if ((lo & (RMP_ASSIGNED | RMP_PAGESIZE | RMP_IMMUTABLE)) != RMP_ASSIGNED || ((lo >> 51) & 0x3FF) != self->asid ||
        (lo & RMP_GPA_MASK) != gpa) {
        return 0;
    }
    int cf = 1;
    if (!(lo & RMP_VALIDATED)) {
        /* from here on the model changes: an exception is the engine's internal error */
        cf = 0;
        Py_INCREF(page);
        PyObject *agents = PyObject_GetAttr(self->cache, s_plain_agents);
        PyObject *set = PyList_GET_ITEM(self->sets, (Py_ssize_t)((key >> 6) & self->set_mask));
        if (agents == NULL || !PyTuple_CheckExact(agents) || !PyDict_CheckExact(set)) {
            PyErr_Clear();
            Py_XDECREF(agents);
            Py_DECREF(page);
            return 0; /* (nothing changed yet) */
        }
        PyObject *line = get_by_u64(set, key);
        int failed = 0;
        if (line != NULL) { /* the line is cached: Cache.clflush (write-back, snoops) */
            PyObject *spa_obj = PyLong_FromUnsignedLongLong(at);
            PyObject *res = spa_obj == NULL ? NULL : PyObject_CallMethodObjArgs(self->cache, s_clflush, pv_zero,
                                                                                 Py_False, spa_obj, NULL);
            Py_XDECREF(spa_obj);
            failed = res == NULL;
            Py_XDECREF(res);
        } else if (PyTuple_GET_SIZE(agents)) {
            /* Cache.clflush(0, False, spa) of a line it does not hold: its snoop of the plain agents
             * (Cache._snoop: the line's keys [key, key + 64), invalidate, no data), then nothing */
            PyObject *lo_obj = PyLong_FromUnsignedLongLong(key), *hi_obj = PyLong_FromUnsignedLongLong(key + 64);
            failed = lo_obj == NULL || hi_obj == NULL;
            for (Py_ssize_t i = 0; !failed && i < PyTuple_GET_SIZE(agents); i++) {
                PyObject *res = PyObject_CallMethodObjArgs(PyTuple_GET_ITEM(agents, i), s_snoop, lo_obj, hi_obj,
                                                           Py_True, Py_None, NULL);
                failed = res == NULL;
                Py_XDECREF(res);
            }
            Py_XDECREF(lo_obj);
            Py_XDECREF(hi_obj);
        }
        Py_DECREF(agents);
        if (failed) {
            Py_DECREF(page);
            return -1;
        }
        if ((uint64_t)PyByteArray_GET_SIZE(page) < (at & 0xFFF) + 8) {
            Py_DECREF(page);
            PyErr_SetString(PyExc_RuntimeError, "the RMP page shrank");
            return -1;
        }
        uint64_t v = lo | RMP_VALIDATED;
        memcpy(PyByteArray_AS_STRING(page) + (at & 0xFFF), &v, 8);
        Py_DECREF(page);
    }
    /* cpu.rmp_changed()'s test (insn.pvalidate calls it): never true here, validating takes no access away */
    int same = epoch_current(self);
    if (same < 0) {
        return -1;
    }
    if (!same) {
        PyObject *res = PyObject_CallMethodNoArgs(self->cpu, s_rmp_changed);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    /* as the Python path after insn.pvalidate */
    int stale = 0;
    for (int i = 0; i < 2 && !stale; i++) {
        PyObject *v = PyObject_GetAttr(self->pool, i ? s_updated : s_stale);
        if (v == NULL) {
            return -1;
        }
        stale = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (stale < 0) {
            return -1;
        }
    }
    if (stale) {
        PyObject *res = PyObject_CallMethodNoArgs(self->engine, s_refresh);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    PyObject *names[2] = {s_pvalidates, s_pvalidates_in_place};
    for (int i = 0; i < 2; i++) {
        PyObject *v = PyObject_GetAttr(self->stats, names[i]);
        if (v == NULL) {
            return -1;
        }
        PyObject *n = PyNumber_Add(v, pv_one);
        Py_DECREF(v);
        if (n == NULL) {
            return -1;
        }
        int e = PyObject_SetAttr(self->stats, names[i], n);
        Py_DECREF(n);
        if (e < 0) {
            return -1;
        }
    }
    if (!same) { /* the RMP took an access away: Unicorn's TLB too */
        PyObject *res = PyObject_CallMethodNoArgs(self->engine, s_flush_tlb);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    uint64_t w[3] = {0, cf ? (rflags | RFLAGS_CF) : (rflags & ~RFLAGS_CF), rip + self->length};
    void *wp[3] = {&w[0], &w[1], &w[2]};
    int wid[3] = {self->ids[0], self->ids[4], self->ids[3]};
    if (self->wbatch(self->uc, wid, wp, 3)) {
        PyErr_SetString(PyExc_RuntimeError, "register write failed");
        return -1;
    }
    return 1;
}

static bool pv_hook(void *uc, void *user)
{
    PvHook *self = (PvHook *)user;
    (void)uc;
    PyGILState_STATE g = PyGILState_Ensure();
    bool out = false;
    int r = self->armed ? pv_fast(self) : 0;
    if (r == 1) {
        out = true;
    } else if (r < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *name = type != NULL ? PyObject_GetAttrString(type, "__name__") : NULL;
        PyObject *msg = name != NULL ? PyUnicode_FromFormat("%U: %S", name, value != NULL ? value : Py_None) : NULL;
        if (msg == NULL || self->engine == NULL || PyObject_SetAttr(self->engine, s_internal, msg) < 0) {
            PyErr_Clear();
        }
        Py_XDECREF(msg);
        Py_XDECREF(name);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    } else {
        PyObject *res = PyObject_CallFunctionObjArgs(self->fallback, Py_None, Py_None, NULL);
        if (res == NULL) {
            PyErr_WriteUnraisable(self->fallback);
        } else {
            out = PyObject_IsTrue(res) == 1;
            PyErr_Clear();
            Py_DECREF(res);
        }
    }
    PyGILState_Release(g);
    return out;
}

static PyObject *pvhook_address(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyLong_FromVoidPtr((void *)pv_hook);
}

static PyMethodDef pvhook_methods[] = {
    {"arm", (PyCFunction)pvhook_arm, METH_VARARGS, pvhook_arm_doc},
    {"bind", (PyCFunction)pvhook_bind, METH_VARARGS,
     "bind(xgva, pool_address, pool_size): the engine's executed-page slots (a dict it mutates, never rebinds) "
     "and its page pool's memory"},
    {"disarm", (PyCFunction)pvhook_disarm, METH_NOARGS, "disarm(): every call goes to the fallback"},
    {"address", (PyCFunction)pvhook_address, METH_NOARGS | METH_STATIC,
     "address() -> the UC_HOOK_INSN_INVALID callback (its user data: the PvHook)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pvhook_getset[] = {
    {"armed", (getter)pvhook_get_armed, NULL, "whether arm() holds a case the hook retires in C", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(pvhook_doc, "PvHook(handle, reg_read_batch, reg_write_batch, ids, fallback): PVALIDATE "
                         "retired in C in the invalid-instruction hook (csrc/uc_accel.c).");

static PyTypeObject PvHookType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sevemu.hw.uc._uc_accel.PvHook",
    .tp_basicsize = sizeof(PvHook),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = pvhook_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pvhook_init,
    .tp_dealloc = (destructor)pvhook_dealloc,
    .tp_traverse = (traverseproc)pvhook_traverse,
    .tp_clear = (inquiry)pvhook_clear,
    .tp_methods = pvhook_methods,
    .tp_getset = pvhook_getset,
};

static int pvhook_exec(PyObject *m)
{
    if ((s_epoch = PyUnicode_InternFromString("epoch")) == NULL ||
        (s_dirty = PyUnicode_InternFromString("dirty")) == NULL ||
        (s_plain_agents = PyUnicode_InternFromString("plain_agents")) == NULL ||
        (s_stale = PyUnicode_InternFromString("stale")) == NULL ||
        (s_updated = PyUnicode_InternFromString("updated")) == NULL ||
        (s_refresh = PyUnicode_InternFromString("refresh")) == NULL ||
        (s_clflush = PyUnicode_InternFromString("clflush")) == NULL ||
        (s_pvalidates = PyUnicode_InternFromString("pvalidates")) == NULL ||
        (s_pvalidates_in_place = PyUnicode_InternFromString("pvalidates_in_place")) == NULL ||
        (s_rmp_changed = PyUnicode_InternFromString("rmp_changed")) == NULL ||
        (s_flush_tlb = PyUnicode_InternFromString("flush_tlb")) == NULL ||
        (s_snoop = PyUnicode_InternFromString("snoop")) == NULL || (pv_zero = PyLong_FromLong(0)) == NULL ||
        (pv_one = PyLong_FromLong(1)) == NULL) {
        return -1;
    }
    if (PyType_Ready(&PvHookType) < 0) {
        return -1;
    }
    Py_INCREF(&PvHookType);
    if (PyModule_AddObject(m, "PvHook", (PyObject *)&PvHookType) < 0) {
        Py_DECREF(&PvHookType);
        return -1;
    }
    return 0;
}

static int module_exec(PyObject *m)
{
    if ((s_regs = PyUnicode_InternFromString("regs")) == NULL || (s_rip = PyUnicode_InternFromString("rip")) == NULL ||
        (s_rflags = PyUnicode_InternFromString("rflags")) == NULL ||
        (s_cr0 = PyUnicode_InternFromString("cr0")) == NULL || (s_cr3 = PyUnicode_InternFromString("cr3")) == NULL ||
        (s_cr4 = PyUnicode_InternFromString("cr4")) == NULL || (s_efer = PyUnicode_InternFromString("efer")) == NULL ||
        (s_event = PyUnicode_InternFromString("_event")) == NULL ||
        (s_internal = PyUnicode_InternFromString("_internal")) == NULL ||
        (s_tb_flush_pending = PyUnicode_InternFromString("_tb_flush_pending")) == NULL) {
        return -1;
    }
    attr_names[A_REGS] = s_regs;
    attr_names[A_RIP] = s_rip;
    attr_names[A_RFLAGS] = s_rflags;
    attr_names[A_CR0] = s_cr0;
    attr_names[A_CR3] = s_cr3;
    attr_names[A_CR4] = s_cr4;
    attr_names[A_EFER] = s_efer;
    if (PyType_Ready(&RunnerType) < 0) {
        return -1;
    }
    Py_INCREF(&RunnerType);
    if (PyModule_AddObject(m, "Runner", (PyObject *)&RunnerType) < 0) {
        Py_DECREF(&RunnerType);
        return -1;
    }
    return pvhook_exec(m);
}

/* ---- stops at a block boundary ---------------------------------------------------------------
 * Unicorn 2.1.4 tests for a pending uc_emu_stop after every guest load and store and leaves with RIP
 * back at the start of the instruction, whose store has already been written: a read-modify-write
 * on memory then runs twice when emulation resumes (tests/hw/test_hw_unicorn_stop.py).  Stops that
 * are not made by a code hook (the watchdog's time slice, a fill hook's TB-flush or eviction request)
 * therefore only set a request word, and this block hook stops at the start of the next translated
 * block, before any of it executes.  user_data points at a StopWord the engine owns. */
typedef int (*emu_stop_fn)(void *uc);
typedef struct {
    volatile int request;
    int reserved;
    emu_stop_fn stop;
} StopWord;

static void stop_at_block(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    StopWord *w = (StopWord *)user_data;
    (void)address;
    (void)size;
    if (w->request) {
        w->request = 0;
        w->stop(uc);
    }
}

static PyObject *block_stop_address(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyLong_FromVoidPtr((void *)stop_at_block);
}

static PyMethodDef module_methods[] = {
    {"block_stop_address", block_stop_address, METH_NOARGS,
     "block_stop_address() -> the address of the UC_HOOK_BLOCK callback that stops when the StopWord\n"
     "{int request; int reserved; uc_emu_stop's address} given as its user data has request set."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, module_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED}, /* a static type (Runner) */
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "sevemu.hw.uc._uc_accel",
    "Optional C helper of the Unicorn engine's exit path (csrc/uc_accel.c).",
    0,
    module_methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__uc_accel(void)
{
    return PyModuleDef_Init(&module);
}
