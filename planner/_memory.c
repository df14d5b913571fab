/* The inner loop of planner.memory.shares: for each new request j, the largest of
   inv[k] * a[j] + b[k] over the running requests' finishes k < ends[j] (0 when there is none).
   In numpy it is a finishes-by-requests matrix built, masked and reduced, several passes over
   memory for one multiply-add an element; here it is one pass. Arrays come from numpy through
   the buffer protocol. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define ARGS 5

static PyObject *largest(PyObject *self, PyObject *args) {
    PyObject *objs[ARGS];
    if (!PyArg_ParseTuple(args, "OOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4]))
        return NULL;
    Py_buffer bufs[ARGS];
    int held = 0;
    PyObject *result = NULL;
    for (; held < ARGS; held++) {
        const int writable = held == ARGS - 1;
        if (PyObject_GetBuffer(objs[held], &bufs[held], PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
            goto done;
    }
    const Py_ssize_t n = bufs[0].len / 8, m = bufs[2].len / 8;
    if (bufs[0].len != 8 * n || bufs[1].len != 8 * n || bufs[2].len != 8 * m || bufs[3].len != 8 * m ||
        bufs[4].len != 8 * m) {
        PyErr_SetString(PyExc_ValueError, "largest(inv, b, a, ends, out): inv and b of one length, a, ends "
                                          "(int64) and out of another, 8 bytes an element");
        goto done;
    }
    const double *inv = bufs[0].buf, *b = bufs[1].buf, *a = bufs[2].buf;
    const int64_t *ends = bufs[3].buf;
    double *out = bufs[4].buf;
    for (Py_ssize_t j = 0; j < m; j++)
        if (ends[j] < 0 || ends[j] > n) {
            PyErr_SetString(PyExc_ValueError, "ends out of range");
            goto done;
        }
    for (Py_ssize_t j = 0; j < m; j++) {
        double best = 0.0;
        for (int64_t k = 0; k < ends[j]; k++) {
            const double v = inv[k] * a[j] + b[k];
            if (v > best)
                best = v;
        }
        out[j] = best;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&bufs[k]);
    return result;
}

static PyMethodDef methods[] = {
    {"largest", largest, METH_VARARGS,
     "largest(inv, b, a, ends, out): out[j] = the largest inv[k] * a[j] + b[k] for k < ends[j], at least 0."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_memory", "The KV memory shares' inner loop.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__memory(void) { return PyModule_Create(&module); }
