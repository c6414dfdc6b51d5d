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

#endif
