/*
 * nstap.netns._scan: the numbers nstap exports from a /proc/net text file, in one pass in C.
 *
 * /proc/net/{snmp,netstat,dev,sockstat} are whitespace-separated tokens ("Tcp:", "RetransSegs",
 * "eth0:", "1234", ...). Where each wanted number sits, and which tokens must read what they read
 * when that was learnt (the field names, the interface names), is a *plan* worked out once in
 * Python (nstap/netns/scan.py) and reused while the file keeps its shape. scan() walks the bytes
 * once, checks those tokens and the token count, and converts only the wanted numbers: a few
 * microseconds where the same work in Python (split, index, int) costs tens, on every sample of
 * every namespace. A file whose shape changed gives None, and Python learns the plan again.
 *
 * Tokens are separated by ASCII whitespace and ':' ("eth0:123" is two tokens, as /proc/net/dev
 * prints a large counter right after the colon). This is the same rule as the pure-Python
 * fallback, scan.scan_py, which the tests hold it to.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline int is_sep(unsigned char c) {
    return c == ' ' || c == '\n' || c == '\t' || c == '\r' || c == ':' || c == '\v' || c == '\f';
}

/* scan(data, plan, expected, ntokens, nvalues) -> tuple of nvalues ints, or None
 *   plan: bytes of native int32 pairs (token position, slot), sorted by position;
 *         slot >= 0: the token is a number, stored at that index of the result;
 *         slot < 0: the token must equal expected[-slot - 1].
 *   ntokens: the file's token count when the plan was learnt. */
static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer data, plan;
    PyObject *expected;
    Py_ssize_t ntokens, nvalues;
    if (!PyArg_ParseTuple(args, "y*y*O!nn", &data, &plan, &PyTuple_Type, &expected, &ntokens, &nvalues))
        return NULL;
    PyObject *result = NULL;
    PyObject *out = NULL;
    if (plan.len % 8 != 0 || nvalues < 0) {
        PyErr_SetString(PyExc_ValueError, "bad plan");
        goto done;
    }
    out = PyTuple_New(nvalues);
    if (out == NULL)
        goto done;
    const unsigned char *p = data.buf, *end = p + data.len;
    const int32_t *steps = plan.buf;
    Py_ssize_t nsteps = plan.len / 8, step = 0, token = 0, filled = 0;
    while (p < end) {
        while (p < end && is_sep(*p))
            p++;
        if (p >= end)
            break;
        const unsigned char *start = p;
        while (p < end && !is_sep(*p))
            p++;
        while (step < nsteps && steps[2 * step] == token) {
            int32_t slot = steps[2 * step + 1];
            Py_ssize_t len = p - start;
            if (slot < 0) {
                Py_ssize_t e = -(Py_ssize_t)slot - 1;
                if (e >= PyTuple_GET_SIZE(expected))
                    goto mismatch;
                PyObject *want = PyTuple_GET_ITEM(expected, e);
                if (!PyBytes_Check(want) || PyBytes_GET_SIZE(want) != len || memcmp(PyBytes_AS_STRING(want), start, len) != 0)
                    goto mismatch;
            } else {
                if (slot >= nvalues || len == 0 || len > 20)
                    goto mismatch;
                const unsigned char *q = start;
                int negative = 0;
                if (*q == '-') {
                    negative = 1;
                    q++;
                    if (q == p)
                        goto mismatch;
                }
                unsigned long long v = 0;
                for (; q < p; q++) {
                    if (*q < '0' || *q > '9')
                        goto mismatch;
                    unsigned long long next = v * 10 + (unsigned long long)(*q - '0');
                    if (next < v)
                        goto mismatch;
                    v = next;
                }
                if (negative && v > (unsigned long long)INT64_MAX + 1ULL)
                    goto mismatch;
                PyObject *n = negative ? PyLong_FromLongLong(v == (unsigned long long)INT64_MAX + 1ULL ? INT64_MIN : -(long long)v)
                                       : PyLong_FromUnsignedLongLong(v);
                if (n == NULL)
                    goto done;
                PyObject *old = PyTuple_GET_ITEM(out, slot);
                if (old == NULL)
                    filled++;
                Py_XDECREF(old);
                PyTuple_SET_ITEM(out, slot, n);
            }
            step++;
        }
        token++;
    }
    if (token != ntokens || step != nsteps || filled != nvalues)
        goto mismatch;
    result = out;
    out = NULL;
    goto done;
mismatch:
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(out);
    PyBuffer_Release(&data);
    PyBuffer_Release(&plan);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(data, plan, expected, ntokens, nvalues) -> tuple of ints, or None if the file's shape changed"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", "The wanted numbers of a /proc/net text file, in one pass.", -1, methods};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
