/*
 * nstap.netns._scan: the numbers nstap exports from a /proc/net text file, in one pass in C
 * (and, below, a conntrack dump reduced to what counting flows per container needs).
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

/* Conntrack dump answers, reduced to what counting flows per container needs. */

static inline uint16_t u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

#define NLA_TYPE_MASK 0x3FFF
#define NLMSG_ERROR 2
#define NLMSG_DONE 3

/* The source address inside a CTA_TUPLE_ORIG/REPLY attribute ([pos, end)), and its protocol number. */
static void ct_tuple(const unsigned char *pos, const unsigned char *end, const unsigned char **src, Py_ssize_t *src_len, int *proto) {
    while (pos + 4 <= end) {
        uint16_t len = u16(pos), kind = u16(pos + 2) & NLA_TYPE_MASK;
        if (len < 4 || pos + len > end)
            return;
        const unsigned char *p = pos + 4, *e = pos + len;
        while (p + 4 <= e) {
            uint16_t ln = u16(p), k = u16(p + 2) & NLA_TYPE_MASK;
            if (ln < 4 || p + ln > e)
                break;
            if (kind == 1 && (k == 1 || k == 3)) { /* CTA_TUPLE_IP: CTA_IP_V4_SRC, CTA_IP_V6_SRC */
                *src = p + 4;
                *src_len = ln - 4;
            } else if (kind == 2 && k == 1 && proto != NULL && ln >= 5) { /* CTA_TUPLE_PROTO: CTA_PROTO_NUM */
                *proto = p[4];
            }
            p += (ln + 3) & ~3u;
        }
        pos += (len + 3) & ~3u;
    }
}

/* conntrack_summaries(data, seq, offsets=False) -> (list of (proto, orig_src, reply_src, status, tcp_state), end)
 *   end: 0 more messages to come, 1 the dump is done, < 0 the kernel's error (-errno).
 *   offsets: each tuple ends with the message's offset in data as well (to parse it whole). */
static PyObject *conntrack_summaries(PyObject *self, PyObject *args) {
    Py_buffer data;
    unsigned int seq;
    int offsets = 0;
    if (!PyArg_ParseTuple(args, "y*I|p", &data, &seq, &offsets))
        return NULL;
    PyObject *out = PyList_New(0);
    int done = 0;
    const unsigned char *p = data.buf, *end = p + data.len;
    while (out != NULL && !done && p + 16 <= end) {
        uint32_t length = u32(p);
        uint16_t type = u16(p + 4);
        if (length < 16) {
            PyErr_SetString(PyExc_ValueError, "truncated netlink message");
            Py_CLEAR(out);
            break;
        }
        const unsigned char *mend = p + length < end ? p + length : end;
        if (u32(p + 8) == seq) {
            if (type == NLMSG_DONE) {
                done = 1;
            } else if (type == NLMSG_ERROR) {
                int32_t code = p + 20 <= end ? (int32_t)u32(p + 16) : 0;
                done = code ? code : 1;
            } else if ((type & 0xFF) == 0) { /* IPCTNL_MSG_CT_NEW */
                const unsigned char *orig = NULL, *reply = NULL;
                Py_ssize_t orig_len = 0, reply_len = 0;
                int proto = 0, tcp_state = -1;
                uint32_t status = 0;
                const unsigned char *pos = p + 20;
                while (pos + 4 <= mend) {
                    uint16_t len = u16(pos), kind = u16(pos + 2) & NLA_TYPE_MASK;
                    if (len < 4 || pos + len > mend)
                        break;
                    if (kind == 1) /* CTA_TUPLE_ORIG */
                        ct_tuple(pos + 4, pos + len, &orig, &orig_len, &proto);
                    else if (kind == 2) /* CTA_TUPLE_REPLY */
                        ct_tuple(pos + 4, pos + len, &reply, &reply_len, NULL);
                    else if (kind == 3 && len >= 8) /* CTA_STATUS, big-endian */
                        status = ((uint32_t)pos[4] << 24) | ((uint32_t)pos[5] << 16) | ((uint32_t)pos[6] << 8) | pos[7];
                    else if (kind == 4) { /* CTA_PROTOINFO { CTA_PROTOINFO_TCP { CTA_PROTOINFO_TCP_STATE } } */
                        const unsigned char *q = pos + 4, *qe = pos + len;
                        while (q + 4 <= qe) {
                            uint16_t ln = u16(q), k = u16(q + 2) & NLA_TYPE_MASK;
                            if (ln < 4 || q + ln > qe)
                                break;
                            if (k == 1) {
                                const unsigned char *r = q + 4, *re = q + ln;
                                while (r + 4 <= re) {
                                    uint16_t l2 = u16(r), k2 = u16(r + 2) & NLA_TYPE_MASK;
                                    if (l2 < 4 || r + l2 > re)
                                        break;
                                    if (k2 == 1 && l2 >= 5)
                                        tcp_state = r[4];
                                    r += (l2 + 3) & ~3u;
                                }
                            }
                            q += (ln + 3) & ~3u;
                        }
                    }
                    pos += (len + 3) & ~3u;
                }
                const char *o = orig ? (const char *)orig : "", *r = reply ? (const char *)reply : "";
                PyObject *item = offsets ? Py_BuildValue("(iy#y#Iin)", proto, o, orig_len, r, reply_len, status, tcp_state,
                                                         (Py_ssize_t)(p - (const unsigned char *)data.buf))
                                         : Py_BuildValue("(iy#y#Ii)", proto, o, orig_len, r, reply_len, status, tcp_state);
                if (item == NULL || PyList_Append(out, item) < 0) {
                    Py_XDECREF(item);
                    Py_CLEAR(out);
                    break;
                }
                Py_DECREF(item);
            }
        }
        p += (length + 3) & ~3u;
    }
    PyBuffer_Release(&data);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("(Ni)", out, done);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "scan(data, plan, expected, ntokens, nvalues) -> tuple of ints, or None if the file's shape changed"},
    {"conntrack_summaries", conntrack_summaries, METH_VARARGS,
     "conntrack_summaries(data, seq, offsets=False) -> ([(proto, orig_src, reply_src, status, tcp_state[, offset]), ...], end): one recv of a conntrack dump"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", "The wanted numbers of a /proc/net text file, in one pass.", -1, methods};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
