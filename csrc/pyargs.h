/* Argument helpers the C accelerators share (each extension includes this header; static, so every
 * module has its own copy of the code, but the source is written once). */
#ifndef SEVEMU_PYARGS_H
#define SEVEMU_PYARGS_H

#include <Python.h>
#include <stdint.h>

/* An int argument in 0..2**64-1: TypeError for a non-int, ValueError when out of range. */
static int get_u64(PyObject *obj, const char *what, uint64_t *out)
{
    unsigned long long v;
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s must be in 0..2**64-1", what);
        }
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* An int object of the value v (a new reference), reusing the one made last for a value that falls in
 * the same entry of a small direct-mapped table: the lookup keys the exit path makes again and again
 * (cache-line keys, pages, RIPs) cost no allocation and no deallocation.  An int is immutable and
 * compares and hashes by value, so a dict or set finds (and stores) the same key either way.
 * (Each extension has its own table; the GIL guards it.) */
#define U64_OBJ_ENTRIES 256
static inline PyObject *u64_obj(uint64_t v)
{
    static struct {
        uint64_t v;
        PyObject *o;
    } table[U64_OBJ_ENTRIES];
    uint64_t h = v ^ (v >> 8) ^ (v >> 21) ^ (v >> 43);
    size_t i = (size_t)((h ^ (h >> 6)) & (U64_OBJ_ENTRIES - 1));
    PyObject *o = table[i].o;
    if (o != NULL && table[i].v == v) {
        return Py_NewRef(o);
    }
    o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL) {
        return NULL;
    }
    Py_XSETREF(table[i].o, Py_NewRef(o));
    table[i].v = v;
    return o;
}

#endif
