/*
 * nstap._exposition: the hot lines of a /metrics scrape, formatted in C.
 *
 * A scrape of 1,000 containers is about 80,000 lines, and most of them are one family's name, one
 * container's label text and one of the kernel's counters: "nstap_interface_receive_bytes_total
 * {container="web",...} 1234\n". In Python each line is an f-string and a list append (about
 * 0.6 us, half of a render); here a call formats every line of one interface, or of one
 * namespace's protocol counters, straight into each family's bytearray.
 *
 * The pure-Python twin, exporter.put_py, does the same and the tests hold the two to the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <math.h>
#include <string.h>

static int append(PyObject *buf, const char *a, Py_ssize_t alen, const char *b, Py_ssize_t blen, const char *c, Py_ssize_t clen) {
    Py_ssize_t old = PyByteArray_GET_SIZE(buf);
    if (PyByteArray_Resize(buf, old + alen + blen + 1 + clen + 1) < 0)
        return -1;
    char *p = PyByteArray_AS_STRING(buf) + old;
    memcpy(p, a, alen);
    p += alen;
    memcpy(p, b, blen);
    p += blen;
    *p++ = ' ';
    memcpy(p, c, clen);
    p += clen;
    *p = '\n';
    return 0;
}

static int u64_digits(unsigned long long v, char *out) {
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

/* The value as Prometheus text, as exporter.number writes it: an int's digits (the common case,
 * without a Python object), 1 or 0 for a bool, a float's repr or +Inf, -Inf, NaN, and str() of
 * anything else. */
static int put_line(PyObject *buf, PyObject *name, const char *text, Py_ssize_t text_len, PyObject *value) {
    char digits[32];
    int n = -1;
    if (PyLong_CheckExact(value)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            if (v < 0) {
                digits[0] = '-';
                n = 1 + u64_digits(v == LLONG_MIN ? (unsigned long long)LLONG_MAX + 1ULL : (unsigned long long)-v, digits + 1);
            } else
                n = u64_digits((unsigned long long)v, digits);
        } else if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(value);
            if (u == (unsigned long long)-1 && PyErr_Occurred())
                PyErr_Clear(); /* wider than 64 bits: str() below */
            else
                n = u64_digits(u, digits);
        }
    } else if (PyBool_Check(value)) {
        digits[0] = value == Py_True ? '1' : '0';
        n = 1;
    } else if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        if (isnan(d))
            return append(buf, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), text, text_len, "NaN", 3);
        if (isinf(d))
            return append(buf, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), text, text_len, d > 0 ? "+Inf" : "-Inf", 4);
        /* repr's shortest round-trip digits, as Python prints a float */
        char *r = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (r == NULL)
            return -1;
        int rc = append(buf, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), text, text_len, r, (Py_ssize_t)strlen(r));
        PyMem_Free(r);
        return rc;
    }
    if (n >= 0)
        return append(buf, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), text, text_len, digits, n);
    PyObject *s = PyObject_Str(value);
    if (s == NULL)
        return -1;
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(s, &len);
    int rc = utf8 == NULL ? -1 : append(buf, PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), text, text_len, utf8, len);
    Py_DECREF(s);
    return rc;
}

/* put(specs, text, values, missing) -> None
 *   specs: tuple of (bytearray, name: bytes, key); one line "<name><text> <value>\n" per spec,
 *   appended to its bytearray. values: a tuple (key: an index) or a dict (key: a key; a key it
 *   does not hold, or holds None, gives missing's line, or none when missing is None). */
static PyObject *put(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "put(specs, text, values, missing)");
        return NULL;
    }
    PyObject *specs = args[0], *text = args[1], *values = args[2], *missing = args[3];
    if (!PyTuple_Check(specs) || !PyBytes_Check(text) || !(PyTuple_Check(values) || PyDict_Check(values))) {
        PyErr_SetString(PyExc_TypeError, "put(tuple, bytes, tuple or dict, missing)");
        return NULL;
    }
    const char *t = PyBytes_AS_STRING(text);
    Py_ssize_t tlen = PyBytes_GET_SIZE(text);
    int is_dict = PyDict_Check(values);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(specs); i++) {
        PyObject *spec = PyTuple_GET_ITEM(specs, i);
        if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 3 || !PyByteArray_Check(PyTuple_GET_ITEM(spec, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(spec, 1))) {
            PyErr_SetString(PyExc_TypeError, "a spec is (bytearray, bytes, key)");
            return NULL;
        }
        PyObject *buf = PyTuple_GET_ITEM(spec, 0), *name = PyTuple_GET_ITEM(spec, 1), *key = PyTuple_GET_ITEM(spec, 2);
        PyObject *value;
        if (is_dict) {
            value = PyDict_GetItemWithError(values, key); /* borrowed */
            if (value == NULL && PyErr_Occurred())
                return NULL;
            if (value == NULL || value == Py_None) {
                if (missing == Py_None)
                    continue;
                value = missing;
            }
        } else {
            Py_ssize_t index = PyLong_AsSsize_t(key);
            if (index == -1 && PyErr_Occurred())
                return NULL;
            if (index < 0 || index >= PyTuple_GET_SIZE(values)) {
                PyErr_SetString(PyExc_IndexError, "a spec's index is out of the values");
                return NULL;
            }
            value = PyTuple_GET_ITEM(values, index);
        }
        if (put_line(buf, name, t, tlen, value) < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"put", (PyCFunction)(void (*)(void))put, METH_FASTCALL,
     "put(specs, text, values, missing) -> None: one line <name><text> <value> per (bytearray, name, key) spec"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exposition", "The hot lines of a /metrics scrape, formatted in C.", -1, methods};

PyMODINIT_FUNC PyInit__exposition(void) { return PyModule_Create(&module); }
