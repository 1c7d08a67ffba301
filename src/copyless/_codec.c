/* copyless._codec: the hot loops of the session protocol's frame codec.
 *
 * Mechanism only, no policy.  frames.py owns the wire format and every error:
 * frame_scan() accepts only frames that are complete, small and valid, and
 * stops at anything else (a large segment, a bad checksum, odd flags, an
 * aborted frame, the end of the budget), leaving that frame to the Python
 * reader, which reads it again and raises the precise error.  So this file
 * can only make valid traffic faster; it cannot change what is accepted.
 *
 *   crc32c(data, value=0) -> int          SSE4.2 when the CPU has it
 *   frame_encode(tag, segments, data_crc, aborted, coalesce) -> list of buffers
 *   frame_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes, frame_type, max_frames=-1)
 *       -> (frames, new_start, frames_used, bytes_used)
 *   message_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes, lossless, in_seq,
 *                connection, out) -> (start, frames_used, bytes_used, in_seq, ack, accepted, stop)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_capi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PREAMBLE_SIZE 32
#define MAX_SEGMENTS 4
#define FLAG_NO_DATA_CRC 0x1
#define LATE_COMPLETE 0x0E /* epilogue status: four bits from aborted, as no crc covers it */
#define LATE_ABORTED 0x01

/* ------------------------------------------------------------------ crc32c */
static uint32_t crc_table[8][256];
static int have_sse42;
#define LANE 4096
static uint32_t lane_shift; /* x^(8 * LANE) mod P */
static uint32_t xpow8n(size_t n);

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    lane_shift = xpow8n(LANE);
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_soft(uint32_t crc, const uint8_t *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = crc_table[7][v & 0xff] ^ crc_table[6][(v >> 8) & 0xff] ^ crc_table[5][(v >> 16) & 0xff] ^
              crc_table[4][(v >> 24) & 0xff] ^ crc_table[3][(v >> 32) & 0xff] ^ crc_table[2][(v >> 40) & 0xff] ^
              crc_table[1][(v >> 48) & 0xff] ^ crc_table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

/* Polynomial arithmetic mod P (reflected), for joining the crcs of adjacent
 * blocks: state(A||B) = shift(state(A), |B|) ^ state0(B) (as zlib's crc32_combine). */
static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0) break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ 0x82F63B78u : b >> 1;
    }
    return p;
}

static uint32_t xpow8n(size_t n) { /* x^(8n) mod P */
    uint32_t sq = 1u << 30, p = 1u << 31; /* x^1, x^0 */
    for (int k = 0; k < 3; k++) sq = multmodp(sq, sq);
    while (n) {
        if (n & 1) p = multmodp(sq, p);
        sq = multmodp(sq, sq);
        n >>= 1;
    }
    return p;
}

#if defined(__x86_64__)
/* Three independent streams hide the crc32 instruction's 3-cycle latency. */
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n >= 3 * LANE) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *q = p;
        for (size_t i = 0; i < LANE; i += 8, q += 8) {
            uint64_t v0, v1, v2;
            memcpy(&v0, q, 8);
            memcpy(&v1, q + LANE, 8);
            memcpy(&v2, q + 2 * LANE, 8);
            c = _mm_crc32_u64(c, v0);
            c1 = _mm_crc32_u64(c1, v1);
            c2 = _mm_crc32_u64(c2, v2);
        }
        c = multmodp(lane_shift, multmodp(lane_shift, (uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * LANE;
        n -= 3 * LANE;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

/* Same convention as the crc32c package: crc32c(b, crc32c(a)) == crc32c(a + b). */
static uint32_t crc32c_update(uint32_t value, const void *data, size_t n) {
    uint32_t crc = ~value;
#if defined(__x86_64__)
    if (have_sse42) return ~crc_hw(crc, data, n);
#endif
    return ~crc_soft(crc, data, n);
}

static PyObject *py_crc32c(PyObject *self, PyObject *args) {
    Py_buffer b;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &b, &value)) return NULL;
    uint32_t r;
    if (b.len >= 65536) {
        Py_BEGIN_ALLOW_THREADS r = crc32c_update(value, b.buf, (size_t)b.len);
        Py_END_ALLOW_THREADS
    } else
        r = crc32c_update(value, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); } /* little-endian hosts only */
static inline void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* ------------------------------------------------------------------ encode */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} Acc;

static int acc_put(Acc *a, const void *src, size_t n) {
    if (a->len + n > a->cap) {
        size_t cap = a->cap ? a->cap : 256;
        while (cap < a->len + n) cap *= 2;
        uint8_t *p = PyMem_Realloc(a->p, cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        a->p = p;
        a->cap = cap;
    }
    memcpy(a->p + a->len, src, n);
    a->len += n;
    return 0;
}

static int acc_flush(Acc *a, PyObject *out) {
    if (!a->len) return 0;
    PyObject *b = PyBytes_FromStringAndSize((const char *)a->p, (Py_ssize_t)a->len);
    if (!b) return -1;
    int r = PyList_Append(out, b);
    Py_DECREF(b);
    a->len = 0;
    return r;
}

/* frame_encode(tag, segments, data_crc, aborted, coalesce): one frame as buffers for
 * one sendmsg.  Pieces under `coalesce` bytes are copied into bytes objects with the
 * preamble and checksums; larger ones are passed through (the caller's own objects). */
static PyObject *py_frame_encode(PyObject *self, PyObject *args) {
    unsigned int tag;
    PyObject *segments;
    int data_crc, aborted;
    Py_ssize_t coalesce;
    if (!PyArg_ParseTuple(args, "IOppn", &tag, &segments, &data_crc, &aborted, &coalesce)) return NULL;
    PyObject *segs = PySequence_Fast(segments, "segments must be a sequence");
    if (!segs) return NULL;
    Py_ssize_t nseg = PySequence_Fast_GET_SIZE(segs);
    PyObject *out = NULL, *bufs[MAX_SEGMENTS] = {0};
    Py_buffer *views[MAX_SEGMENTS] = {0};
    Py_ssize_t nviews[MAX_SEGMENTS] = {0};
    uint64_t lengths[MAX_SEGMENTS] = {0};
    uint32_t crcs[MAX_SEGMENTS] = {0};
    Acc acc = {0};
    if (nseg < 1 || nseg > MAX_SEGMENTS) {
        PyErr_Format(PyExc_ValueError, "a frame has 1 to %d segments, not %zd", MAX_SEGMENTS, nseg);
        goto done;
    }
    for (Py_ssize_t i = 0; i < nseg; i++) {
        bufs[i] = PySequence_Fast(PySequence_Fast_GET_ITEM(segs, i), "a segment is a sequence of buffers");
        if (!bufs[i]) goto done;
        Py_ssize_t k = PySequence_Fast_GET_SIZE(bufs[i]);
        views[i] = PyMem_Calloc(k ? (size_t)k : 1, sizeof(Py_buffer));
        if (!views[i]) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t j = 0; j < k; j++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(bufs[i], j), &views[i][j], PyBUF_C_CONTIGUOUS) < 0) goto done;
            nviews[i] = j + 1;
            lengths[i] += (uint64_t)views[i][j].len;
        }
        if (lengths[i] >= (1ull << 32)) {
            PyErr_SetString(PyExc_ValueError, "a segment is limited to 4 GiB - 1");
            goto done;
        }
    }
    uint8_t pre[PREAMBLE_SIZE] = {0};
    pre[0] = (uint8_t)tag;
    pre[1] = (uint8_t)nseg;
    put16(pre + 2, data_crc ? 0 : FLAG_NO_DATA_CRC);
    for (Py_ssize_t i = 0; i < nseg; i++) {
        put32(pre + 4 + 6 * i, (uint32_t)lengths[i]);
        put16(pre + 8 + 6 * i, 1);
    }
    uint32_t chain = crc32c_update(0, pre, 28); /* each segment's crc runs on from the one before */
    put32(pre + 28, chain);
    out = PyList_New(0);
    if (!out || acc_put(&acc, pre, PREAMBLE_SIZE) < 0) goto fail;
    for (Py_ssize_t i = 0; i < nseg; i++) {
        int checked = data_crc || i != nseg - 1;
        if (checked) crcs[i] = chain;
        for (Py_ssize_t j = 0; j < nviews[i]; j++) {
            Py_buffer *v = &views[i][j];
            if (checked) crcs[i] = crc32c_update(crcs[i], v->buf, (size_t)v->len);
            if (v->len >= coalesce) {
                if (acc_flush(&acc, out) < 0 || PyList_Append(out, PySequence_Fast_GET_ITEM(bufs[i], j)) < 0) goto fail;
            } else if (v->len && acc_put(&acc, v->buf, (size_t)v->len) < 0)
                goto fail;
        }
        if (checked) chain = crcs[i];
        uint8_t c[4];
        put32(c, crcs[i]);
        if (acc_put(&acc, c, 4) < 0) goto fail;
    }
    uint8_t epi[4] = {aborted ? LATE_ABORTED : LATE_COMPLETE, 0, 0, 0};
    if (acc_put(&acc, epi, 4) < 0 || acc_flush(&acc, out) < 0) goto fail;
    goto done;
fail:
    Py_CLEAR(out);
done:
    for (Py_ssize_t i = 0; i < MAX_SEGMENTS; i++) {
        for (Py_ssize_t j = 0; j < nviews[i]; j++) PyBuffer_Release(&views[i][j]);
        PyMem_Free(views[i]);
        Py_XDECREF(bufs[i]);
    }
    PyMem_Free(acc.p);
    Py_DECREF(segs);
    return out;
}

/* ------------------------------------------------------------------ scan */
/* A memoryview of base[a:b] (base is a 1-D unsigned-byte memoryview). */
static PyObject *slice_view(PyObject *base, Py_ssize_t a, Py_ssize_t b) {
    PyObject *lo = PyLong_FromSsize_t(a), *hi = PyLong_FromSsize_t(b), *s = NULL, *r = NULL;
    if (lo && hi) s = PySlice_New(lo, hi, NULL);
    if (s) r = PyObject_GetItem(base, s);
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    Py_XDECREF(s);
    return r;
}

/* frame_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes, frame_type, max_frames=-1)
 * Complete, valid frames in view[start:end] whose segments are all under `direct`
 * bytes, as frame_type(tag, [segment views]) instances (a two-field tuple subclass),
 * at most max_frames of them (negative: no limit).
 * Frames of two or more segments count against the budgets (a message each, and
 * the bytes of the segments after the header); a negative budget is unlimited. */
static PyObject *py_frame_scan(PyObject *self, PyObject *args) {
    PyObject *base, *frame_type;
    Py_ssize_t start, end, max_segment, direct, budget_frames, budget_bytes, max_frames = -1;
    if (!PyArg_ParseTuple(args, "OnnnnnnO!|n", &base, &start, &end, &max_segment, &direct, &budget_frames,
                          &budget_bytes, &PyType_Type, &frame_type, &max_frames))
        return NULL;
    PyTypeObject *ft = (PyTypeObject *)frame_type;
    if (!PyType_IsSubtype(ft, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "frame_type must be a tuple subclass");
        return NULL;
    }
    Py_buffer vb;
    if (PyObject_GetBuffer(base, &vb, PyBUF_SIMPLE) < 0) return NULL;
    if (start < 0 || end > vb.len || start > end) {
        PyBuffer_Release(&vb);
        PyErr_SetString(PyExc_ValueError, "bad scan range");
        return NULL;
    }
    const uint8_t *buf = vb.buf;
    PyObject *frames = PyList_New(0);
    Py_ssize_t pos = start, used_frames = 0, used_bytes = 0;
    if (!frames) goto fail;
    for (;;) {
        Py_ssize_t avail = end - pos;
        if (avail < PREAMBLE_SIZE || (max_frames >= 0 && PyList_GET_SIZE(frames) >= max_frames)) break;
        const uint8_t *p = buf + pos;
        if (crc32c_update(0, p, 28) != get32(p + 28)) break;
        unsigned tag = p[0], nseg = p[1], flags = get16(p + 2);
        if (nseg < 1 || nseg > MAX_SEGMENTS || (flags & ~FLAG_NO_DATA_CRC)) break;
        uint32_t len[MAX_SEGMENTS];
        Py_ssize_t total = PREAMBLE_SIZE + 4, body = 0;
        int ok = 1;
        for (unsigned i = 0; i < MAX_SEGMENTS; i++) {
            len[i] = get32(p + 4 + 6 * i);
            uint16_t align = get16(p + 8 + 6 * i);
            if (i >= nseg) {
                if (len[i] || align) ok = 0;
                continue;
            }
            if ((Py_ssize_t)len[i] >= direct || (Py_ssize_t)len[i] > max_segment) ok = 0;
            total += (Py_ssize_t)len[i] + 4;
            if (i > 0) body += len[i];
        }
        if (!ok || avail < total) break;
        if (nseg > 1 && budget_frames >= 0 && used_frames + 1 > budget_frames) break;
        if (nseg > 1 && budget_bytes >= 0 && used_bytes + body > budget_bytes) break;
        /* verify every checksum and the epilogue before anything is handed out */
        Py_ssize_t off = pos + PREAMBLE_SIZE, offs[MAX_SEGMENTS];
        uint32_t chain = get32(p + 28);
        for (unsigned i = 0; i < nseg && ok; i++) {
            offs[i] = off;
            int checked = !(flags & FLAG_NO_DATA_CRC) || i != nseg - 1;
            if (checked) {
                chain = crc32c_update(chain, buf + off, len[i]);
                if (chain != get32(buf + off + len[i])) ok = 0;
            }
            off += (Py_ssize_t)len[i] + 4;
        }
        if (!ok || get32(buf + off) != LATE_COMPLETE) break; /* bad crc, abort, bad epilogue: the slow path says which */
        PyObject *segs = PyList_New(nseg);
        if (!segs) goto fail;
        for (unsigned i = 0; i < nseg; i++) {
            PyObject *v = slice_view(base, offs[i], offs[i] + len[i]);
            if (!v) {
                Py_DECREF(segs);
                goto fail;
            }
            PyList_SET_ITEM(segs, i, v);
        }
        PyObject *f = ft->tp_alloc(ft, 2);
        PyObject *t = PyLong_FromUnsignedLong(tag);
        if (!f || !t) {
            Py_XDECREF(f);
            Py_XDECREF(t);
            Py_DECREF(segs);
            goto fail;
        }
        PyTuple_SET_ITEM(f, 0, t);
        PyTuple_SET_ITEM(f, 1, segs);
        int r = PyList_Append(frames, f);
        Py_DECREF(f);
        if (r < 0) goto fail;
        if (nseg > 1) {
            used_frames++;
            used_bytes += body;
        }
        pos = off + 4;
    }
    PyBuffer_Release(&vb);
    return Py_BuildValue("Nnnn", frames, pos, used_frames, used_bytes);
fail:
    Py_XDECREF(frames);
    PyBuffer_Release(&vb);
    return NULL;
}

/* ------------------------------------------------------------------ messages */
static const CopylessCAPI *capi; /* the core's Message constructors (_capi.h), set at import */

/* base[off:off + len] as a memoryview that shares base's managed buffer (as a
 * slice does), without the slice and index objects a slice costs.  base must be
 * a 1-D memoryview of bytes; anything else takes the generic path. */
static PyObject *sub_view(PyObject *base, Py_ssize_t off, Py_ssize_t len) {
    if (PyMemoryView_Check(base)) {
        Py_buffer *b = &((PyMemoryViewObject *)base)->view;
        if (b->ndim == 1 && b->itemsize == 1 && b->strides[0] == 1 && !b->suboffsets && off >= 0 && len >= 0 &&
            off + len <= b->len) {
            PyObject *v = PyMemoryView_FromObject(base); /* a new view on the same managed buffer */
            if (!v) return NULL;
            Py_buffer *w = &((PyMemoryViewObject *)v)->view;
            w->buf = (char *)b->buf + off; /* what memoryview's own slicing does to a 1-D view */
            w->len = len;
            w->shape[0] = len;
            return v;
        }
    }
    return slice_view(base, off, off + len);
}

#define TAG_MESSAGE 16
#define MSG_HEADER_SIZE 28 /* <HBBQQQ: type, priority, flags, tid, seq, ack_seq (session.MSG_HEADER) */
#define MSG_FLAG_REPLY 0x1
#define SCAN_WAIT 0 /* stopped at the end of what was read (or inside a small frame): read more */
#define SCAN_SLOW 1 /* stopped at a frame the Python reader and session must handle */

static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* message_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes,
 *              lossless, in_seq, connection, out)
 *     -> (start, frames_used, bytes_used, in_seq, ack, accepted, stop)
 *
 * The steady state of a READY session, compiled: for the run of MESSAGE frames at
 * view[start:end] that are complete, small (every segment under `direct`), valid
 * (checksums, epilogue, a 28-byte header, three segments) and within the budgets,
 * drop replayed duplicates (seq <= in_seq), accept the next seq (lossless: exactly
 * in_seq + 1; lossy: any higher one), and append a received Message for each
 * accepted one to `out` (front and data are views into `view`).  It stops before
 * the first frame that is anything else (another tag, a gap, a large segment, a bad
 * checksum, an abort, the end of a budget), which the Python reader and session then
 * handle with their precise errors.  So it accepts only what they would accept, and
 * what it returns is what they would have done: the new in_seq, the highest ack_seq
 * seen (applying it once is what applying each one does), the messages accepted, and
 * the frames and body bytes charged to the budgets (duplicates included, as the
 * reader charges them).  stop: 0 read more, 1 a frame for the slow path. */
static PyObject *py_message_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "message_scan() takes 11 arguments");
        return NULL;
    }
    if (!capi) {
        PyErr_SetString(PyExc_RuntimeError, "copyless._core's C API is missing");
        return NULL;
    }
    PyObject *base = args[0], *conn = args[9], *out = args[10];
    Py_ssize_t start = PyLong_AsSsize_t(args[1]), end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t max_segment = PyLong_AsSsize_t(args[3]), direct = PyLong_AsSsize_t(args[4]);
    Py_ssize_t budget_frames = PyLong_AsSsize_t(args[5]), budget_bytes = PyLong_AsSsize_t(args[6]);
    int lossless = PyObject_IsTrue(args[7]);
    uint64_t in_seq = PyLong_AsUnsignedLongLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    Py_buffer vb;
    if (PyObject_GetBuffer(base, &vb, PyBUF_SIMPLE) < 0) return NULL;
    if (start < 0 || end > vb.len || start > end) {
        PyBuffer_Release(&vb);
        PyErr_SetString(PyExc_ValueError, "bad scan range");
        return NULL;
    }
    const uint8_t *buf = vb.buf;
    Py_ssize_t pos = start, used_frames = 0, used_bytes = 0, accepted = 0;
    uint64_t ack = 0;
    int stop = SCAN_WAIT;
    for (;;) {
        Py_ssize_t avail = end - pos;
        if (avail < PREAMBLE_SIZE) break;
        const uint8_t *p = buf + pos;
        stop = SCAN_SLOW;
        if (p[0] != TAG_MESSAGE || p[1] != 3 || (get16(p + 2) & ~FLAG_NO_DATA_CRC)) break;
        if (crc32c_update(0, p, 28) != get32(p + 28)) break;
        uint32_t len[3];
        int ok = get32(p + 4 + 18) == 0 && get16(p + 8 + 18) == 0; /* the unused fourth slot */
        Py_ssize_t total = PREAMBLE_SIZE + 4 * 3 + 4;
        for (int i = 0; i < 3; i++) {
            len[i] = get32(p + 4 + 6 * i);
            if ((Py_ssize_t)len[i] >= direct || (Py_ssize_t)len[i] > max_segment) ok = 0;
            total += (Py_ssize_t)len[i];
        }
        if (!ok || len[0] != MSG_HEADER_SIZE) break;
        Py_ssize_t body = (Py_ssize_t)len[1] + (Py_ssize_t)len[2];
        if (budget_frames >= 0 && used_frames + 1 > budget_frames) break;
        if (budget_bytes >= 0 && used_bytes + body > budget_bytes) break;
        Py_ssize_t off = pos + PREAMBLE_SIZE, offs[3];
        uint32_t chain = get32(p + 28);
        int data_crc = !(get16(p + 2) & FLAG_NO_DATA_CRC);
        /* The segments (of a frame not all here yet: those that are), as the Python
         * reader checks them, so a bad one is an error as soon as it would be there. */
        for (int i = 0; i < 3 && ok && off + (Py_ssize_t)len[i] + 4 <= end; i++) {
            offs[i] = off;
            if (data_crc || i != 2) {
                chain = crc32c_update(chain, buf + off, len[i]);
                if (chain != get32(buf + off + len[i])) ok = 0;
            }
            off += (Py_ssize_t)len[i] + 4;
        }
        if (!ok) break;
        if (avail < total) {
            stop = SCAN_WAIT; /* a small frame, good so far, not all here yet: read on */
            break;
        }
        if (get32(buf + off) != LATE_COMPLETE) break;
        const uint8_t *h = buf + offs[0];
        uint64_t seq = get64(h + 12), a = get64(h + 20);
        if (seq > in_seq && lossless && seq != in_seq + 1) break; /* a gap: the session says so */
        if (seq > in_seq) {
            PyObject *front = sub_view(base, offs[1], len[1]);
            PyObject *data = front ? sub_view(base, offs[2], len[2]) : NULL;
            PyObject *msg = data ? capi->received(get16(h), front, data, get64(h + 4), h[2], seq, h[3] & MSG_FLAG_REPLY,
                                                  conn)
                                 : NULL;
            Py_XDECREF(front);
            Py_XDECREF(data);
            if (!msg || PyList_Append(out, msg) < 0) {
                Py_XDECREF(msg);
                goto fail;
            }
            Py_DECREF(msg);
            in_seq = seq;
            accepted++;
        } /* else a replayed duplicate, already delivered: only its ack counts */
        if (a > ack) ack = a;
        used_frames++;
        used_bytes += body;
        pos = off + 4;
        stop = SCAN_WAIT;
    }
    PyBuffer_Release(&vb);
    return Py_BuildValue("nnnKKni", pos, used_frames, used_bytes, (unsigned long long)in_seq, (unsigned long long)ack,
                         accepted, stop);
fail:
    PyBuffer_Release(&vb);
    return NULL;
}

static int cpu_sse42;

static PyObject *py_use_hardware(PyObject *self, PyObject *arg) { /* tests cover both paths */
    int on = PyObject_IsTrue(arg);
    if (on < 0) return NULL;
    have_sse42 = on && cpu_sse42;
    return PyBool_FromLong(have_sse42);
}

static PyMethodDef codec_methods[] = {
    {"_use_hardware_crc", py_use_hardware, METH_O, "Use SSE4.2 for crc32c if the CPU has it (True) or not."},
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c(data, value=0) -> int (Castagnoli, as the crc32c package)"},
    {"frame_encode", py_frame_encode, METH_VARARGS, "One frame as a list of buffers (see frames.encode_frame)."},
    {"frame_scan", py_frame_scan, METH_VARARGS, "Complete small valid frames in a buffer (see frames.FrameReader)."},
    {"message_scan", (PyCFunction)(void (*)(void))py_message_scan, METH_FASTCALL,
     "The run of steady-state MESSAGE frames in a buffer, as received Messages (see session.SessionConnection)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codecmodule = {PyModuleDef_HEAD_INIT, "copyless._codec", NULL, -1, codec_methods};

PyMODINIT_FUNC PyInit__codec(void) {
    crc_init();
    cpu_sse42 = have_sse42;
    capi = PyCapsule_Import(COPYLESS_CAPI_NAME, 0);
    if (!capi) return NULL;
    if (capi->version != COPYLESS_CAPI_VERSION) {
        PyErr_SetString(PyExc_ImportError, "copyless._core and copyless._codec are from different builds: rebuild");
        return NULL;
    }
    PyObject *m = PyModule_Create(&codecmodule);
    if (!m) return NULL;
    PyModule_AddIntConstant(m, "HAVE_SSE42", have_sse42 != 0);
    return m;
}
