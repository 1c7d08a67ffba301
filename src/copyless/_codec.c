/* copyless._codec: the hot loops of the session protocol's frame codec.
 *
 * Mechanism only, no policy.  frames.py owns the wire format and every error:
 * frame_scan() accepts only frames that are complete, small and valid, and
 * stops at anything else (a large segment, a bad checksum, odd flags, an
 * aborted frame, the end of the budget), leaving that frame to the Python
 * reader, which reads it again and raises the precise error.  So this file
 * can only make valid traffic faster; it cannot change what is accepted.
 *
 *   crc32c(data, value=0) -> int          AVX-512 VPCLMULQDQ or SSE4.2 when the CPU has them
 *   frame_encode(tag, segments, data_crc, aborted, coalesce) -> list of buffers
 *   frame_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes, frame_type, max_frames=-1)
 *       -> (frames, new_start, frames_used, bytes_used)
 *   message_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes, lossless, in_seq,
 *                connection, out[, calls, hooks, room]) -> (start, frames_used, bytes_used, in_seq, ack, accepted, stop)
 *   Writer, Flusher, OutMessage, Lock, compiled_send(...)   the send side (see "sending" below)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <structmember.h>

#include <errno.h>
#include <linux/futex.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/eventfd.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "_capi.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#define PREAMBLE_SIZE 32
#define MAX_SEGMENTS 4
#define FLAG_NO_DATA_CRC 0x1
/* The epilogue: the late status XOR the last crc the frame checks (the chain), so the
 * bytes of the next frame cannot pass for it; the two values differ in four bits. */
#define LATE_COMPLETE 0x0E
#define LATE_ABORTED 0x01

/* ------------------------------------------------------------------ crc32c */
static uint32_t crc_table[8][256];
static int have_sse42;
#define LANE 4096
static uint32_t lane_shift; /* x^(8 * LANE) mod P */
#define SMALL_LANE 512
static uint32_t small_lane_shift; /* x^(8 * SMALL_LANE) mod P: a 4 KiB message's data in three lanes too */
/* Multiplying by a fixed power of x is linear, so it is four table lookups (instead of
 * multmodp's 32 steps): shift_tab[k][j][v] = that power times (v << 8j). */
static uint32_t shift_tab[2][4][256];
static inline uint32_t shift_by(const uint32_t t[4][256], uint32_t c) {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}
static uint32_t xpow_bits(size_t n);
static uint32_t multmodp(uint32_t a, uint32_t b);

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
    lane_shift = xpow_bits(8 * LANE);
    small_lane_shift = xpow_bits(8 * SMALL_LANE);
    for (int j = 0; j < 4; j++)
        for (uint32_t v = 0; v < 256; v++) {
            shift_tab[0][j][v] = multmodp(lane_shift, v << (8 * j));
            shift_tab[1][j][v] = multmodp(small_lane_shift, v << (8 * j));
        }
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

static uint32_t xpow_bits(size_t n) { /* x^n mod P */
    uint32_t sq = 1u << 30, p = 1u << 31; /* x^1, x^0 */
    while (n) {
        if (n & 1) p = multmodp(sq, p);
        sq = multmodp(sq, sq);
        n >>= 1;
    }
    return p;
}

#if defined(__x86_64__)
/* Runs of three lanes of `lane` bytes, crc'd side by side and joined with `tab`
 * (x^(8 * lane) mod P): three independent streams hide the crc32 instruction's
 * 3-cycle latency. */
__attribute__((target("sse4.2"), always_inline)) static inline uint64_t crc_lanes(
    uint64_t c, const uint8_t **pp, size_t *np, size_t lane, const uint32_t (*tab)[256]) {
    const uint8_t *p = *pp;
    size_t n = *np;
    while (n >= 3 * lane) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *q = p;
        for (size_t i = 0; i < lane; i += 8, q += 8) {
            uint64_t v0, v1, v2;
            memcpy(&v0, q, 8);
            memcpy(&v1, q + lane, 8);
            memcpy(&v2, q + 2 * lane, 8);
            c = _mm_crc32_u64(c, v0);
            c1 = _mm_crc32_u64(c1, v1);
            c2 = _mm_crc32_u64(c2, v2);
        }
        c = shift_by(tab, shift_by(tab, (uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * lane;
        n -= 3 * lane;
    }
    *pp = p;
    *np = n;
    return c;
}

__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc_lanes(crc, &p, &n, LANE, shift_tab[0]);
    c = crc_lanes(c, &p, &n, SMALL_LANE, shift_tab[1]);
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

#if defined(__x86_64__)
/* Folding with carry-less multiplies, 64 bytes to an instruction (AVX-512 VPCLMULQDQ):
 * ~3x the crc32 instruction's rate on this project's machines, where a 1 MiB message's
 * checksum is otherwise a tenth of its transfer.  The idea is the one of Intel's paper
 * "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ"; the constants are
 * computed at start-up with xpow_bits, not copied from anywhere.
 *
 * A 128-bit lane V (reflected: the lowest bit of its first byte is the highest power)
 * that stands D bits before another lane contributes V * x^D to it.  V is A * x^64 + B
 * (A its first 8 bytes), and a carry-less multiply of reflected operands gives their
 * product times x, so V * x^D == clmul(A, x^(D+63) mod P) ^ clmul(B, x^(D-1) mod P)
 * (mod P), 96 bits that are xored into the lane D bits on.  Four registers of four
 * lanes run 256 bytes apart; at the end they are folded into one lane, whose crc the
 * crc32 instruction takes (crc32(0, V) == V * x^32 mod P, which is what the state is). */
#define FOLD_MIN 256
static int have_fold; /* the CPU has AVX-512F and VPCLMULQDQ */
static uint64_t fold_k[4][2]; /* for D = 2048 (256 bytes), 512, and 384/256/128 (the last fold) */
static uint64_t fold_last[4][2];

static void fold_init(void) {
    static const size_t dist[] = {2048, 512};
    for (int i = 0; i < 2; i++) {
        fold_k[i][0] = (uint64_t)xpow_bits(dist[i] + 63) << 32;
        fold_k[i][1] = (uint64_t)xpow_bits(dist[i] - 1) << 32;
    }
    for (int lane = 0; lane < 3; lane++) { /* lane 0 is 384 bits before lane 3 */
        size_t d = (size_t)(3 - lane) * 128;
        fold_last[lane][0] = (uint64_t)xpow_bits(d + 63) << 32;
        fold_last[lane][1] = (uint64_t)xpow_bits(d - 1) << 32;
    }
    fold_last[3][0] = fold_last[3][1] = 0;
    __builtin_cpu_init();
    have_fold = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
                __builtin_cpu_supports("sse4.2");
}

#define FOLD_TARGET __attribute__((target("avx512f,vpclmulqdq,sse4.2")))
FOLD_TARGET static inline __m512i fold(__m512i v, __m512i k, __m512i next) {
    return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(v, k, 0x00), _mm512_clmulepi64_epi128(v, k, 0x11),
                                     next, 0x96);
}

/* The crc state after n >= FOLD_MIN bytes (a multiple of 256 of them; the rest is
 * left in *pp, *np for crc_hw). */
FOLD_TARGET static uint32_t crc_fold(uint32_t crc, const uint8_t **pp, size_t *np) {
    const uint8_t *p = *pp;
    size_t n = *np;
    __m512i k256 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fold_k[0]));
    __m512i k64 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fold_k[1]));
    __m512i x0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)crc)));
    __m512i x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128), x3 = _mm512_loadu_si512(p + 192);
    for (p += 256, n -= 256; n >= 256; p += 256, n -= 256) {
        x0 = fold(x0, k256, _mm512_loadu_si512(p));
        x1 = fold(x1, k256, _mm512_loadu_si512(p + 64));
        x2 = fold(x2, k256, _mm512_loadu_si512(p + 128));
        x3 = fold(x3, k256, _mm512_loadu_si512(p + 192));
    }
    x3 = fold(fold(fold(x0, k64, x1), k64, x2), k64, x3);
    __m512i t = fold(x3, _mm512_loadu_si512(fold_last), _mm512_setzero_si512()); /* lanes 0-2 moved to lane 3 */
    __m128i v = _mm_xor_si128(_mm_xor_si128(_mm512_extracti32x4_epi32(t, 0), _mm512_extracti32x4_epi32(t, 1)),
                              _mm_xor_si128(_mm512_extracti32x4_epi32(t, 2), _mm512_extracti32x4_epi32(x3, 3)));
    uint64_t c = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(v));
    c = _mm_crc32_u64(c, (uint64_t)_mm_extract_epi64(v, 1));
    *pp = p;
    *np = n;
    return (uint32_t)c;
}
#endif

/* Same convention as the crc32c package: crc32c(b, crc32c(a)) == crc32c(a + b). */
static uint32_t crc32c_update(uint32_t value, const void *data, size_t n) {
    uint32_t crc = ~value;
#if defined(__x86_64__)
    if (have_fold && n >= FOLD_MIN) {
        const uint8_t *p = data;
        crc = crc_fold(crc, &p, &n);
        return ~crc_hw(crc, p, n);
    }
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
    if (tag > 255) return PyErr_Format(PyExc_ValueError, "a frame's tag is a byte, not %u", tag); /* ("I" wraps) */
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
    uint8_t epi[4];
    put32(epi, (aborted ? LATE_ABORTED : LATE_COMPLETE) ^ chain);
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
/* base's buffer, if [start:end] is within it (the scans' common check). */
static int scan_buffer(PyObject *base, Py_ssize_t start, Py_ssize_t end, Py_buffer *vb) {
    if (PyObject_GetBuffer(base, vb, PyBUF_SIMPLE) < 0) return -1;
    if (start < 0 || end > vb->len || start > end) {
        PyBuffer_Release(vb);
        PyErr_SetString(PyExc_ValueError, "bad scan range");
        return -1;
    }
    return 0;
}

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
    if (scan_buffer(base, start, end, &vb) < 0) return NULL;
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
        if (!ok || (get32(buf + off) ^ chain) != LATE_COMPLETE) break; /* bad crc, abort, bad epilogue: the slow path says which */
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

#define TAG_MESSAGE 16
#define MSG_HEADER_SIZE 28 /* <HBBQQQ: type, priority, flags, tid, seq, ack_seq (session.MSG_HEADER) */
#define MSG_FLAG_REPLY 0x1
#define SCAN_WAIT 0 /* stopped at the end of what was read (or inside a small frame): read more */
#define SCAN_SLOW 1 /* stopped at a frame the Python reader and session must handle */

static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* message_scan(view, start, end, max_segment, direct, budget_frames, budget_bytes,
 *              lossless, in_seq, connection, out[, calls, hooks, room])
 *     -> (start, frames_used, bytes_used, in_seq, ack, accepted, stop)
 *
 * The steady state of a READY session, compiled: for the run of MESSAGE frames at
 * view[start:end] that are complete, small (every segment under `direct`; or, given
 * calls, hooks and room: any frame of at most `room` bytes whose large segment nobody
 * claims, see below), valid
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
typedef struct {
    Py_ssize_t pos, frames, bytes, accepted;
    uint64_t in_seq, ack;
    int stop;
} ScanResult;

/* message_scan's work on buf[start:end] (base: the memoryview the messages' views are
 * made of); calls: a dict or Py_None.  0, or -1 with an error. */
static int scan_messages(PyObject *base, const uint8_t *buf, Py_ssize_t start, Py_ssize_t end,
                         Py_ssize_t max_segment, Py_ssize_t direct, Py_ssize_t budget_frames,
                         Py_ssize_t budget_bytes, int lossless, uint64_t in_seq, PyObject *conn, PyObject *out,
                         PyObject *calls, int hooks, Py_ssize_t room, ScanResult *res) {
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
        int large = 0;
        Py_ssize_t total = PREAMBLE_SIZE + 4 * 3 + 4;
        for (int i = 0; i < 3; i++) {
            len[i] = get32(p + 4 + 6 * i);
            if ((Py_ssize_t)len[i] > max_segment) ok = 0;
            if ((Py_ssize_t)len[i] >= direct) large = 1;
            total += (Py_ssize_t)len[i];
        }
        if (!ok || len[0] != MSG_HEADER_SIZE) break;
        Py_ssize_t body = (Py_ssize_t)len[1] + (Py_ssize_t)len[2];
        if (budget_frames >= 0 && used_frames + 1 > budget_frames) break;
        if (budget_bytes >= 0 && used_bytes + body > budget_bytes) break;
        if (large) {
            /* A large segment is read into a buffer of its own when someone wants it there:
             * the call a reply answers, if it posted one, or a dispatcher's data_buffer().
             * Nobody does (the caller says so: no hooks, and the calls that posted buffers),
             * and the frame fits the read buffer: it stays there, a view like a small one's
             * (the Python reader would allocate a buffer and copy it in).  Else the Python
             * reader takes it, and asks. */
            if (hooks || total > room) break;
            if (avail < PREAMBLE_SIZE + MSG_HEADER_SIZE) {
                stop = SCAN_WAIT; /* its header says whose it is: read on */
                break;
            }
            const uint8_t *h = p + PREAMBLE_SIZE;
            if ((h[3] & MSG_FLAG_REPLY) && calls != Py_None) {
                PyObject *tid = PyLong_FromUnsignedLongLong(get64(h + 4));
                int posted = tid ? PyDict_Contains(calls, tid) : -1;
                Py_XDECREF(tid);
                if (posted < 0) return -1;
                if (posted) break;
            }
        }
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
        if ((get32(buf + off) ^ chain) != LATE_COMPLETE) break;
        const uint8_t *h = buf + offs[0];
        uint64_t seq = get64(h + 12), a = get64(h + 20);
        if (seq > in_seq && lossless && seq != in_seq + 1) break; /* a gap: the session says so */
        if (seq > in_seq) {
            PyObject *msg = capi->received_lazy(get16(h), base, offs[1], len[1], offs[2], len[2], get64(h + 4), h[2],
                                                seq, h[3] & MSG_FLAG_REPLY, conn);
            if (!msg || PyList_Append(out, msg) < 0) {
                Py_XDECREF(msg);
                return -1;
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
    *res = (ScanResult){pos, used_frames, used_bytes, accepted, in_seq, ack, stop};
    return 0;
}

static PyObject *py_message_scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11 && nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "message_scan() takes 11 or 14 arguments");
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
    /* claims: who may want a segment of `direct` bytes or more in a buffer of its own */
    PyObject *calls = nargs == 14 ? args[11] : Py_None;
    int hooks = nargs == 14 ? PyObject_IsTrue(args[12]) : 1;
    Py_ssize_t room = nargs == 14 ? PyLong_AsSsize_t(args[13]) : 0;
    if (PyErr_Occurred()) return NULL;
    if (calls != Py_None && !PyDict_Check(calls)) {
        PyErr_SetString(PyExc_TypeError, "calls must be a dict or None");
        return NULL;
    }
    if (!PyList_Check(out)) {
        PyErr_SetString(PyExc_TypeError, "out must be a list");
        return NULL;
    }
    Py_buffer vb;
    if (scan_buffer(base, start, end, &vb) < 0) return NULL;
    ScanResult r;
    int rc = scan_messages(base, vb.buf, start, end, max_segment, direct, budget_frames, budget_bytes, lossless,
                           in_seq, conn, out, calls, hooks, room, &r);
    PyBuffer_Release(&vb);
    if (rc < 0) return NULL;
    return Py_BuildValue("nnnKKni", r.pos, r.frames, r.bytes, (unsigned long long)r.in_seq,
                         (unsigned long long)r.ack, r.accepted, r.stop);
}

/* ================================================================== sending
 *
 * OutMessage: what a session keeps of a message it sent, to resend it after a
 * fault (the record the Python session queues; a C type so the fast path makes
 * one in ~30 ns, against ~150 for a dataclass).
 *
 * Writer: a connection's send queue.  Small pieces (frames, small payloads) are
 * copied into blocks, so a burst of small frames becomes a few large iovecs; a
 * buffer of `coalesce` bytes or more is queued as it is (never copied), holding
 * its buffer export until written.  Bound to a plain socket it writes with
 * sendmsg itself, on a dup of the socket's fd (so a write without the GIL can
 * never reach an fd number that was closed and reused); bound to another
 * stream (TLS, ipc) it calls the stream's send_buffers.  message() encodes a
 * MESSAGE frame straight into it.
 *
 * Flusher: one thread per I/O loop, in C, that never takes the GIL: it writes
 * the batches the writers leave to it.  The batching ("autocork") rule, for
 * each send (kick()):
 *   - a send while the connection is idle (nothing sent in the last CORK_NS, or
 *     a message received since the last send: a request after its reply) is
 *     written at once, by the sending thread: a lone message or a call costs no
 *     hop to another thread;
 *   - a send that follows another within CORK_NS is left in the queue, and the
 *     flusher is woken if it sleeps (an eventfd write, once per batch).  It lets the
 *     batch grow for FL_HOLD_NS (asleep) unless FL_BATCH bytes are there sooner, then
 *     writes all of it with one sendmsg; what came meanwhile is the next batch.  It
 *     looks for more for FL_SPIN_NS before it sleeps.  Writing at once what was
 *     there gave batches of 2-10 small messages (as many as arrive during one
 *     sendmsg); holding them 25 us gives ~100 at 1.5 M msgs/s, and costs a burst's
 *     messages at most that much latency (never a lone message's);
 *   - past HIGH_WATER queued bytes the sender writes itself.
 * Since the flusher needs no GIL, a batch never waits for a thread that waits
 * for the GIL: a sending thread that stops sending and computes in Python for
 * seconds does not delay what it queued.  (A thread of the I/O loop would: the
 * loop goes back to Python for every ACK frame, and needs the GIL then, which a
 * busy sender holds for up to the 5 ms switch interval.  An epoll wait in C that
 * wrote the batches while it waited was tried first: senders found the loop in
 * Python so often that they wrote one message per sendmsg half the time.)
 * A socket that is full (EAGAIN) is watched by the flusher's epoll and written
 * when it has room.  Python buffers it wrote are given back with the GIL: by the
 * next send or flush of that writer, or by the loop, which the flusher wakes for
 * that (reap()).
 *
 * Locks: each writer has a mutex (its queue, its flags) and the flusher one (its
 * list, sleeping, poked; a writer's dirty/armed flags).  Order: writer before
 * flusher.  Neither is held while waiting for the GIL or calling Python.
 *
 * Lock and compiled_send (after the Flusher): a Connection's reentrant lock, and
 * Connection.send with its steady state in C (seq, ack, encode, the record, write or
 * batch under that lock), reading the Python objects' slots; docs/design.md, "Send
 * path".  An ipc writer with nothing queued writes a frame straight into the ring
 * (w_encode).
 */
#define WR_BLOCK 65536
#define WR_HIGH_WATER (256 << 10)
#define WR_CORK_NS 20000
#define WR_IOV 512
#define FL_HOLD_NS 25000 /* a batch left to the flusher may grow this long after it was left */
#define FL_BATCH (16 << 10) /* ... unless it is this large already */
#define FL_SPIN_NS 10000
#define FL_MAXEV 64

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() do {} while (0)
#endif

static PyObject *LocalProtoErr, *ConfigErr, *TooLargeErr; /* copyless.errors, set by _set_errors */

static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The batching rule reads a clock on every send: the TSC (~8 ns) where it is invariant,
 * calibrated against CLOCK_MONOTONIC once 10 ms have passed since import; until then, and
 * elsewhere, clock_gettime (~20 ns here).  cork_clock() returns "cork units", and
 * cork_window is WR_CORK_NS in them (one decision may be off when the units change:
 * a send written at once instead of batched). */
static int64_t cork_window = WR_CORK_NS, hold_window = FL_HOLD_NS, tsc0, ns0;
static int use_tsc; /* 0: ns; 1: calibrating; 2: TSC */

static void cork_init(void) {
#if defined(__x86_64__)
    unsigned a, b, c, d;
    if (__get_cpuid(0x80000007, &a, &b, &c, &d) && (d & (1u << 8))) { /* invariant TSC */
        tsc0 = (int64_t)__rdtsc();
        ns0 = mono_ns();
        use_tsc = 1;
    }
#endif
}

static inline int64_t cork_clock(void) { /* (senders on several threads may calibrate at once: same result) */
#if defined(__x86_64__)
    int mode = __atomic_load_n(&use_tsc, __ATOMIC_ACQUIRE);
    if (mode == 2) return (int64_t)__rdtsc();
    if (mode == 1) {
        int64_t ns = mono_ns();
        if (ns - ns0 >= 10000000) {
            double per_ns = (double)((int64_t)__rdtsc() - tsc0) / (double)(ns - ns0);
            if (per_ns > 0.1 && per_ns < 100) {
                __atomic_store_n(&cork_window, (int64_t)(WR_CORK_NS * per_ns), __ATOMIC_RELAXED);
                __atomic_store_n(&hold_window, (int64_t)(FL_HOLD_NS * per_ns), __ATOMIC_RELAXED);
                __atomic_store_n(&use_tsc, 2, __ATOMIC_RELEASE);
            } else
                __atomic_store_n(&use_tsc, 0, __ATOMIC_RELEASE);
        }
        return ns;
    }
#endif
    return mono_ns();
}

/* ------------------------------------------------------------------ OutMessage */
/* The buffers are held in the record itself (front's, then data's), not in lists:
 * a record is one allocation that the cyclic collector never sees.  A stream keeps
 * thousands of records until they are acknowledged; as lists and GC objects they
 * made the collector run every few hundred messages and walk them all (0.15-0.3 us a
 * message).  No reference cycle can run through a record: it holds buffers, and only
 * the session holds it.  front and data read as tuples; they are a snapshot of the
 * message's buffers when it was sent. */
typedef struct {
    PyObject_VAR_HEAD
    unsigned long long type, tid, priority, seq;
    char is_reply, aborted; /* aborted: revoked, sent again (a replay) as an aborted frame, empty */
    unsigned long long sent_id; /* the send it was made by (Message._sent_id; revoke looks for it), or 0 */
    Py_ssize_t nfront;
    PyObject *item[1]; /* ob_size of them: front's buffers, then data's */
} OutMessageObject;

static PyTypeObject OutMessageType;

static OutMessageObject *outmessage_alloc(Py_ssize_t n) {
    OutMessageObject *m = PyObject_NewVar(OutMessageObject, &OutMessageType, n);
    if (m) {
        memset(m->item, 0, (size_t)n * sizeof(PyObject *));
        m->sent_id = 0;
        m->aborted = 0;
    }
    return m;
}

static PyObject *OutMessage_new(PyTypeObject *cls, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"type", "front", "data", "tid", "priority", "is_reply", "seq", "sent_id", "aborted", NULL};
    unsigned long long type, tid = 0, prio = 0, seq = 0, sent_id = 0;
    PyObject *front, *data;
    int is_reply = 0, aborted = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KOO|KKpKKp:OutMessage", kwlist, &type, &front, &data, &tid, &prio,
                                     &is_reply, &seq, &sent_id, &aborted))
        return NULL;
    PyObject *f = PySequence_Fast(front, "front must be a sequence of buffers");
    if (!f) return NULL;
    PyObject *d = PySequence_Fast(data, "data must be a sequence of buffers");
    if (!d) {
        Py_DECREF(f);
        return NULL;
    }
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(f), nd = PySequence_Fast_GET_SIZE(d);
    OutMessageObject *m = outmessage_alloc(nf + nd);
    if (m) {
        for (Py_ssize_t i = 0; i < nf; i++) m->item[i] = Py_NewRef(PySequence_Fast_GET_ITEM(f, i));
        for (Py_ssize_t i = 0; i < nd; i++) m->item[nf + i] = Py_NewRef(PySequence_Fast_GET_ITEM(d, i));
        m->nfront = nf;
        m->type = type;
        m->tid = tid;
        m->priority = prio;
        m->is_reply = (char)is_reply;
        m->seq = seq;
        m->aborted = (char)aborted;
        m->sent_id = sent_id;
    }
    Py_DECREF(f);
    Py_DECREF(d);
    return (PyObject *)m;
}

/* A record of one front buffer and the buffers of a list (the fast path's). */
static PyObject *outmessage_make(uint64_t sent_id, uint32_t type, PyObject *front, PyObject *buffers, uint64_t tid,
                                 int prio, int is_reply, uint64_t seq) {
    Py_ssize_t nd = PyList_GET_SIZE(buffers);
    OutMessageObject *m = outmessage_alloc(1 + nd);
    if (!m) return NULL;
    m->item[0] = Py_NewRef(front);
    for (Py_ssize_t i = 0; i < nd; i++) m->item[1 + i] = Py_NewRef(PyList_GET_ITEM(buffers, i));
    m->nfront = 1;
    m->type = type;
    m->tid = tid;
    m->priority = (unsigned long long)prio;
    m->is_reply = (char)is_reply;
    m->seq = seq;
    m->sent_id = sent_id;
    return (PyObject *)m;
}

static void OutMessage_dealloc(OutMessageObject *m) {
    for (Py_ssize_t i = 0; i < Py_SIZE(m); i++) Py_XDECREF(m->item[i]);
    PyObject_Free(m);
}

static PyObject *OutMessage_get_front(OutMessageObject *m, void *c) {
    PyObject *t = PyTuple_New(m->nfront);
    if (t)
        for (Py_ssize_t i = 0; i < m->nfront; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(m->item[i]));
    return t;
}

static PyObject *OutMessage_get_data(OutMessageObject *m, void *c) {
    Py_ssize_t n = Py_SIZE(m) - m->nfront;
    PyObject *t = PyTuple_New(n);
    if (t)
        for (Py_ssize_t i = 0; i < n; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(m->item[m->nfront + i]));
    return t;
}

static PyObject *OutMessage_repr(OutMessageObject *m) {
    return PyUnicode_FromFormat("OutMessage(type=%llu, tid=%llu, seq=%llu%s)", m->type, m->tid, m->seq,
                                m->is_reply ? ", is_reply=True" : "");
}

static PyMemberDef OutMessage_members[] = {
    {"type", T_ULONGLONG, offsetof(OutMessageObject, type), 0, NULL},
    {"tid", T_ULONGLONG, offsetof(OutMessageObject, tid), 0, NULL},
    {"priority", T_ULONGLONG, offsetof(OutMessageObject, priority), 0, NULL},
    {"is_reply", T_BOOL, offsetof(OutMessageObject, is_reply), 0, NULL},
    {"seq", T_ULONGLONG, offsetof(OutMessageObject, seq), 0, "assigned when first written (0: not yet)"},
    {"aborted", T_BOOL, offsetof(OutMessageObject, aborted), 0, "revoked: sent again as an aborted frame"},
    {"sent_id", T_ULONGLONG, offsetof(OutMessageObject, sent_id), READONLY, "the send it was made by, or 0"},
    {NULL},
};

static PyGetSetDef OutMessage_getset[] = {
    {"front", (getter)OutMessage_get_front, NULL, "the front's buffers, a tuple", NULL},
    {"data", (getter)OutMessage_get_data, NULL, "the data's buffers, a tuple", NULL},
    {NULL},
};

static PyTypeObject OutMessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._codec.OutMessage",
    .tp_basicsize = offsetof(OutMessageObject, item),
    .tp_itemsize = sizeof(PyObject *),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "OutMessage(type, front, data, tid=0, priority=0, is_reply=False, seq=0, sent_id=0, aborted=False): "
              "a message a session sends (front and data: sequences of buffers, kept as tuples), kept until "
              "acknowledged.",
    .tp_new = OutMessage_new,
    .tp_dealloc = (destructor)OutMessage_dealloc,
    .tp_repr = (reprfunc)OutMessage_repr,
    .tp_members = OutMessage_members,
    .tp_getset = OutMessage_getset,
};

/* ------------------------------------------------------------------ Writer */
typedef struct Block {
    struct Block *next;
    size_t cap, used;
    Py_ssize_t chunks; /* chunks that point into it */
    uint8_t data[];
} Block;

typedef struct {
    const uint8_t *p;
    size_t len;
    Block *blk;     /* copied bytes: their block; NULL: a Python buffer, held in view */
    Py_buffer view;
} Chunk;

/* A MESSAGE frame in the queue, for revoke(): where its pieces are, as offsets in the
 * stream of bytes ever queued (WriterObject.q_in), and where its late status is. */
typedef struct {
    uint64_t id;                     /* the send (Message._sent_id; 0: revoked) */
    int crc;                         /* the data crc is on (else the frame carries 0 for it) */
    uint64_t front, data, dend, end; /* offsets: its front, its data, their end, the frame's end */
    uint8_t *late;                   /* its epilogue's late status (in a block of the queue) */
} Track;

typedef struct FlusherObject FlusherObject;

typedef struct WriterObject {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv; /* `writing` went back to 0 */
    Chunk *q;
    size_t cap, rel, head, tail; /* q[rel:head] written, to release (with the GIL); q[head:tail] to write */
    size_t pending;              /* bytes in q[head:tail] */
    size_t py_written;           /* Python buffers in q[rel:head] */
    Block *blocks, *last, *spare; /* spare: a written block kept for the next one (no malloc, no page faults) */
    Py_ssize_t coalesce;
    int fd;                      /* our dup of the socket, or -1 */
    PyObject *stream;            /* bound to a stream that writes itself (send_buffers), or NULL */
    PyObject *chan;              /* an ipc:// stream's IpcChannel: written through the core's C API */
    FlusherObject *flusher;
    int writing, blocked, closing, failed, stalled, read_since;
    int64_t last_ns;
    int dirty, in_ep, armed;     /* flusher->mu */
    int64_t dirty_since;         /* (cork units) when the sender left it to the flusher; 0: write at once */
    struct WriterObject *next_dirty;
    unsigned long long n_kicks, n_direct, n_syscalls; /* statistics */
    uint64_t q_in;               /* bytes ever queued: q_in - pending were written (or dropped) */
    Track *tr;                   /* the frames queued, in order: tr[tr_head:tr_tail] (w->mu) */
    size_t tr_cap, tr_head, tr_tail;
} WriterObject;

struct FlusherObject {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv; /* `busy` changed */
    pthread_t thread;
    int started, stop, closed;
    int efd, ep;        /* its wake-up eventfd; its epoll: the eventfd, and full sockets (EPOLLOUT) */
    int loop_fd;        /* the loop's eventfd, rung when Python buffers are to be given back */
    int sleeping, poked, reap, armed;
    unsigned long long wake_gen; /* +1 each time the events of an epoll_wait have been taken in */
    int64_t spin_ns;
    WriterObject *dirty_head, *dirty_tail, *busy;
    WriterObject **members;
    Py_ssize_t nmembers, capmembers;
};

static PyTypeObject WriterType, FlusherType;

/* --- the chunk queue (w->mu held) */
static int q_room(WriterObject *w) {
    if (w->tail < w->cap) return 0;
    if (w->rel > 0) {
        memmove(w->q, w->q + w->rel, (w->tail - w->rel) * sizeof(Chunk));
        w->head -= w->rel;
        w->tail -= w->rel;
        w->rel = 0;
        if (w->tail < w->cap) return 0;
    }
    size_t cap = w->cap ? w->cap * 2 : 64;
    Chunk *q = realloc(w->q, cap * sizeof(Chunk));
    if (!q) return -1;
    w->q = q;
    w->cap = cap;
    return 0;
}

/* Append block b (cap bytes of room, used of them filled, in chunks chunks) to the
 * writer's list of blocks. */
static void w_link_block(WriterObject *w, Block *b, size_t cap, size_t used, Py_ssize_t chunks) {
    b->next = NULL;
    b->cap = cap;
    b->used = used;
    b->chunks = chunks;
    if (w->last)
        w->last->next = b;
    else
        w->blocks = b;
    w->last = b;
}

/* n contiguous bytes at the end of the queue, to be filled in by the caller (NULL: out
 * of memory).  They extend the last chunk when they follow it in its block. */
static uint8_t *q_reserve(WriterObject *w, size_t n) {
    Block *b = w->last;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > WR_BLOCK ? n : WR_BLOCK;
        if (cap == WR_BLOCK && w->spare) {
            b = w->spare;
            w->spare = NULL;
        } else if (!(b = malloc(sizeof(Block) + cap)))
            return NULL;
        w_link_block(w, b, cap, 0, 0);
    }
    uint8_t *dst = b->data + b->used;
    if (w->tail > w->head) { /* grow the last chunk if these bytes follow it in its block */
        Chunk *c = &w->q[w->tail - 1];
        if (c->blk == b && c->p + c->len == dst) {
            c->len += n;
            b->used += n;
            w->pending += n;
            w->q_in += n;
            return dst;
        }
    }
    if (q_room(w) < 0) return NULL;
    Chunk *c = &w->q[w->tail++];
    c->p = dst;
    c->len = n;
    c->blk = b;
    c->view.obj = NULL;
    b->chunks++;
    b->used += n;
    w->pending += n;
    w->q_in += n;
    return dst;
}

static int q_bytes(WriterObject *w, const void *src, size_t n) {
    if (!n) return 0;
    uint8_t *dst = q_reserve(w, n);
    if (!dst) return -1;
    memcpy(dst, src, n);
    return 0;
}

/* Queue a Python buffer as it is, from byte `off` on; on success the chunk owns *v. */
static int q_view_at(WriterObject *w, Py_buffer *v, size_t off) {
    if (q_room(w) < 0) return -1;
    Chunk *c = &w->q[w->tail++];
    c->p = (const uint8_t *)v->buf + off;
    c->len = (size_t)v->len - off;
    c->blk = NULL;
    c->view = *v;
    w->pending += c->len;
    w->q_in += c->len;
    return 0;
}

static int q_view(WriterObject *w, Py_buffer *v) { return q_view_at(w, v, 0); }

/* Queue one piece of a frame, p[0:len], less the *skip bytes of the frame that were
 * written already (*skip goes down by what this piece had of them).  A large piece of
 * a Python buffer (view: its export) is queued as it is: 1 then, and the queue owns the
 * export; small ones are copied: 0.  -1: out of memory. */
static int q_piece(WriterObject *w, const void *p, size_t len, Py_buffer *view, size_t *skip) {
    if (*skip >= len) {
        *skip -= len;
        return 0;
    }
    size_t off = *skip;
    *skip = 0;
    if (view && view->obj && (Py_ssize_t)len >= w->coalesce) return q_view_at(w, view, off) < 0 ? -1 : 1;
    return q_bytes(w, (const uint8_t *)p + off, len - off);
}

static void q_advance(WriterObject *w, size_t n) {
    w->pending -= n;
    while (n && w->head < w->tail) {
        Chunk *c = &w->q[w->head];
        if (n >= c->len) {
            n -= c->len;
            c->p += c->len;
            c->len = 0;
            if (!c->blk) w->py_written++;
            w->head++;
        } else {
            c->p += n;
            c->len -= n;
            n = 0;
        }
    }
}

static void q_drop(WriterObject *w) { /* everything queued counts as written (and is released as such) */
    while (w->head < w->tail) {
        if (!w->q[w->head].blk) w->py_written++;
        w->head++;
    }
    w->pending = 0;
}

/* With the GIL (w->mu not held): give back what was written, Python buffers outside the lock. */
/* w->mu held: take back what was written.  Blocks are freed here; the Python buffers'
 * views go to *views (up to max), to be released by the caller with the GIL and
 * without the lock (a release may run a finalizer).  Returns how many; if there were
 * more than max, the rest stay for the next call. */
static Py_ssize_t q_reap(WriterObject *w, Py_buffer *views, Py_ssize_t max) {
    Py_ssize_t nv = 0;
    size_t i = w->rel;
    for (; i < w->head; i++) {
        Chunk *c = &w->q[i];
        if (c->blk)
            c->blk->chunks--;
        else if (nv < max) {
            views[nv++] = c->view;
            w->py_written--;
        } else
            break;
    }
    w->rel = i;
    if (w->rel == w->tail) w->rel = w->head = w->tail = 0;
    while (w->blocks && w->blocks != w->last && w->blocks->chunks == 0) {
        Block *b = w->blocks;
        w->blocks = b->next;
        if (b->cap == WR_BLOCK && !w->spare)
            w->spare = b;
        else
            free(b);
    }
    if (w->last && w->last->chunks == 0) w->last->used = 0; /* nothing points into it: reuse it */
    return nv;
}

/* With the GIL (w->mu not held): give back everything written. */
static void w_reap(WriterObject *w) {
    Py_buffer views[16];
    for (;;) {
        pthread_mutex_lock(&w->mu);
        int more = w->rel != w->head;
        Py_ssize_t nv = more ? q_reap(w, views, 16) : 0;
        more = w->rel != w->head;
        pthread_mutex_unlock(&w->mu);
        for (Py_ssize_t i = 0; i < nv; i++) PyBuffer_Release(&views[i]);
        if (!more) return;
    }
}

/* w->mu held: take the frames that were written whole (or dropped) off the track list. */
static void tr_reap(WriterObject *w) {
    uint64_t out = w->q_in - w->pending;
    while (w->tr_head < w->tr_tail && w->tr[w->tr_head].end <= out) w->tr_head++;
    if (w->tr_head == w->tr_tail) w->tr_head = w->tr_tail = 0;
}

/* w->mu held: note a frame just queued (see Track): base is q_in before it was, skip
 * the bytes of it written before (into an ipc ring), f and d its front's and data's
 * lengths, crc whether its data crc is on.  Nothing is noted if its data crc or late
 * status went out already (it cannot be revoked), or on no memory (it then cannot be
 * either). */
static void tr_note(WriterObject *w, uint64_t id, uint64_t base, size_t skip, uint64_t f, uint64_t d, int crc) {
    uint64_t total = 32 + MSG_HEADER_SIZE + 4 + f + 4 + d + 8;
    if (skip + 8 > total || !w->tail) return;
    tr_reap(w);
    if (w->tr_tail == w->tr_cap) {
        if (w->tr_head) {
            memmove(w->tr, w->tr + w->tr_head, (w->tr_tail - w->tr_head) * sizeof(Track));
            w->tr_tail -= w->tr_head;
            w->tr_head = 0;
        } else {
            size_t cap = w->tr_cap ? w->tr_cap * 2 : 64;
            Track *t = realloc(w->tr, cap * sizeof(Track));
            if (!t) return;
            w->tr = t;
            w->tr_cap = cap;
        }
    }
#define AT(x) ((x) > skip ? base + (x) - skip : base)
    Chunk *last = &w->q[w->tail - 1]; /* the epilogue's bytes: copied, at the end of the last chunk */
    Track *t = &w->tr[w->tr_tail++];
    t->id = id;
    t->crc = crc;
    t->front = AT(32 + MSG_HEADER_SIZE + 4);
    t->data = AT(32 + MSG_HEADER_SIZE + 4 + f + 4);
    t->dend = AT(32 + MSG_HEADER_SIZE + 4 + f + 4 + d);
    t->end = AT(total);
    t->late = (uint8_t *)last->p + last->len - 4;
#undef AT
}

/* --- the flusher's list (flusher->mu held) */
static void fl_push(FlusherObject *fl, WriterObject *w) {
    if (w->dirty) return;
    w->dirty = 1;
    w->dirty_since = 0;
    w->next_dirty = NULL;
    if (fl->dirty_tail)
        fl->dirty_tail->next_dirty = w;
    else
        fl->dirty_head = w;
    fl->dirty_tail = w;
}

static void fl_remove(FlusherObject *fl, WriterObject *w) {
    if (!w->dirty) return;
    WriterObject **pp = &fl->dirty_head, *prev = NULL;
    while (*pp && *pp != w) {
        prev = *pp;
        pp = &(*pp)->next_dirty;
    }
    if (*pp) *pp = w->next_dirty;
    if (fl->dirty_tail == w) fl->dirty_tail = prev;
    w->dirty = 0;
}

static void fl_poke(FlusherObject *fl) { /* flusher->mu held: it cannot close meanwhile */
    uint64_t one = 1;
    if (!fl->closed && write(fl->efd, &one, 8) < 0) { /* full: it is awake anyway */
    }
}

/* Write what is queued, without the GIL; w->mu not held on entry.  rounds < 0: until
 * the queue is empty, the socket is full or the writer fails.  Someone else writing
 * already: nothing to do (a writer goes on until the queue is empty).  Returns 1 if
 * rounds ran out with bytes still queued, plus 2 if Python buffers were written. */
static int w_write(WriterObject *w, int rounds) {
    struct iovec iov[WR_IOV];
    int r = 0;
    pthread_mutex_lock(&w->mu);
    if (w->writing || w->closing || w->fd < 0 || w->failed) {
        pthread_mutex_unlock(&w->mu);
        return 0;
    }
    w->writing = 1;
    w->blocked = 0;
    while (w->head < w->tail) {
        if (rounds == 0) {
            r |= 1;
            break;
        }
        if (rounds > 0) rounds--;
        int k = 0;
        for (size_t i = w->head; i < w->tail && k < WR_IOV; i++, k++) {
            iov[k].iov_base = (void *)w->q[i].p;
            iov[k].iov_len = w->q[i].len;
        }
        int fd = w->fd;
        pthread_mutex_unlock(&w->mu);
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = iov;
        mh.msg_iovlen = (size_t)k;
        ssize_t n;
        do n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        int err = errno;
        pthread_mutex_lock(&w->mu);
        if (n < 0) {
            if (err == EAGAIN || err == EWOULDBLOCK)
                w->blocked = 1;
            else {
                w->failed = err; /* the reader sees the fault; what was queued is dropped */
                q_drop(w);
            }
            break;
        }
        w->n_syscalls++;
        q_advance(w, (size_t)n);
        if (w->closing) break;
    }
    if (w->py_written) r |= 2;
    if (w->blocked && !w->closing && w->flusher) { /* the flusher writes the rest when there is room */
        FlusherObject *fl = w->flusher;
        pthread_mutex_lock(&fl->mu);
        if (!fl->closed && !w->armed) {
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLONESHOT, .data.ptr = w};
            if (epoll_ctl(fl->ep, w->in_ep ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, w->fd, &ev) == 0) {
                w->in_ep = w->armed = 1;
                fl->armed++;
            }
        }
        pthread_mutex_unlock(&fl->mu);
    }
    w->writing = 0;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return r;
}

/* With the GIL: write through the bound (or given) stream's send_buffers.  1 all
 * written, 0 not all (the stream took less), -1 error raised. */
static int w_pywrite(WriterObject *w, PyObject *stream) {
    while (w->head < w->tail) {
        size_t k = w->tail - w->head;
        if (k > 1024) k = 1024;
        PyObject *list = PyList_New((Py_ssize_t)k);
        if (!list) return -1;
        for (size_t i = 0; i < k; i++) {
            Chunk *c = &w->q[w->head + i];
            PyObject *v = PyMemoryView_FromMemory((char *)c->p, (Py_ssize_t)c->len, PyBUF_READ);
            if (!v) {
                Py_DECREF(list);
                return -1;
            }
            PyList_SET_ITEM(list, (Py_ssize_t)i, v);
        }
        PyObject *res = PyObject_CallMethod(stream, "send_buffers", "O", list);
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        for (size_t i = 0; i < k; i++) { /* the views end here: none can outlive what they show */
            PyObject *ok = PyObject_CallMethod(PyList_GET_ITEM(list, (Py_ssize_t)i), "release", NULL);
            if (!ok) PyErr_Clear();
            Py_XDECREF(ok);
        }
        Py_DECREF(list);
        PyErr_Restore(et, ev, tb);
        if (!res) return -1;
        Py_ssize_t n = PyLong_AsSsize_t(res);
        Py_DECREF(res);
        if (n < 0) return PyErr_Occurred() ? -1 : 0;
        if (n == 0) return 0;
        pthread_mutex_lock(&w->mu);
        q_advance(w, (size_t)n);
        pthread_mutex_unlock(&w->mu);
    }
    return 1;
}

/* With the GIL: write into an ipc:// channel's ring, as its send_buffers would, without
 * making buffer objects.  1 all written, 0 not all (the ring is full: the channel then
 * waits for room, and its fd turns readable when there is), -1 error raised. */
static int w_ipcwrite(WriterObject *w) {
    struct iovec iov[WR_IOV];
    while (w->head < w->tail) {
        int k = 0;
        size_t want = 0;
        for (size_t i = w->head; i < w->tail && k < WR_IOV; i++, k++) {
            iov[k].iov_base = (void *)w->q[i].p;
            iov[k].iov_len = w->q[i].len;
            want += w->q[i].len;
        }
        Py_ssize_t n = capi->ipc_send(w->chan, iov, k);
        if (n < 0) return -1;
        w->n_syscalls++; /* (a publish, not a system call: one per write all the same) */
        pthread_mutex_lock(&w->mu);
        q_advance(w, (size_t)n);
        pthread_mutex_unlock(&w->mu);
        if ((size_t)n < want) return 0;
    }
    return 1;
}

/* After an append (w->mu held, with the GIL): 1 if the sending thread is to write now;
 * else the writer at work, the flusher or a full socket's watch takes it (see the
 * rules at the top of this section). */
static int w_decide(WriterObject *w, int64_t now) {
    int recent = now - w->last_ns < __atomic_load_n(&cork_window, __ATOMIC_RELAXED) && !w->read_since;
    w->last_ns = now;
    w->read_since = 0;
    w->n_kicks++;
    if (w->writing || w->blocked || w->closing || w->failed || w->head == w->tail) return 0;
    FlusherObject *fl = w->flusher;
    if (!fl || !recent || w->pending >= WR_HIGH_WATER) return 1;
    /* dirty already: the flusher writes it, and takes w->mu to do so, after this append */
    if (__atomic_load_n(&w->dirty, __ATOMIC_RELAXED)) return 0;
    int act = 1;
    pthread_mutex_lock(&fl->mu);
    if (!fl->closed) {
        act = 0;
        fl_push(fl, w);
        w->dirty_since = now;
        if (fl->sleeping && !fl->poked) {
            fl->poked = 1;
            fl_poke(fl);
        }
    }
    pthread_mutex_unlock(&fl->mu);
    return act;
}

/* The sending thread writes (with the GIL, and the connection's lock held).  A write of
 * less than WR_GIL_BYTES keeps the GIL: the socket does not block, and the sendmsg of a
 * few KiB is a few us.  Releasing it there handed the GIL to the I/O loop thread while
 * the sender held the connection's lock: a loop thread that came to read an ACK
 * frame took the GIL, found the lock held, slept, was woken by the lock's release,
 * waited for the GIL again, and got it back only at the sender's next write, inside the
 * lock again.  On a shared CPU each round preempted the sender, whose next send then
 * looked idle (over CORK_NS since the last) and wrote directly again: a 64 B stream
 * fell from ~2.5 M to 0.6-1.2 M msgs/s in about a third of the runs. */
#define WR_GIL_BYTES (64 << 10)
static void w_write_now(WriterObject *w) { /* with the GIL */
    w->n_direct++;
    pthread_mutex_lock(&w->mu);
    size_t pending = w->pending;
    pthread_mutex_unlock(&w->mu);
    if (pending < WR_GIL_BYTES) {
        w_write(w, -1);
    } else {
        Py_BEGIN_ALLOW_THREADS w_write(w, -1);
        Py_END_ALLOW_THREADS
    }
    w_reap(w);
}

/* After an append, with the GIL: write now or batch. */
static void w_kick(WriterObject *w) {
    if (w->fd < 0) {
        if (!w->stream && !w->chan) return;
        int r = w->chan ? w_ipcwrite(w) : w_pywrite(w, w->stream);
        w->stalled = r != 1;
        if (r < 0) PyErr_Clear(); /* the loop's flush meets it again, and handles the fault */
        w_reap(w);
        return;
    }
    int64_t now = cork_clock();
    pthread_mutex_lock(&w->mu);
    int act = w_decide(w, now);
    pthread_mutex_unlock(&w->mu);
    if (act) w_write_now(w);
}

static int Writer_init(WriterObject *w, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"coalesce", NULL};
    Py_ssize_t coalesce = 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n:Writer", kwlist, &coalesce)) return -1;
    if (w->q) {
        PyErr_SetString(PyExc_RuntimeError, "Writer already initialised");
        return -1;
    }
    w->coalesce = coalesce;
    return 0;
}

static PyObject *Writer_new(PyTypeObject *cls, PyObject *args, PyObject *kw) {
    WriterObject *w = (WriterObject *)cls->tp_alloc(cls, 0);
    if (!w) return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->fd = -1;
    w->coalesce = 1024;
    return (PyObject *)w;
}

/* Leave the socket (or stream) and the flusher; drop what is queued.  With the GIL,
 * which it releases while it waits for a write under way (the writing thread may
 * need a lock this thread would otherwise hold while waiting for the GIL). */
static void w_unbind(WriterObject *w) {
    FlusherObject *fl = w->flusher; /* only a thread with the GIL changes it */
    if (fl) { /* first, so the loop's reap() (with the GIL) no longer sees it */
        pthread_mutex_lock(&fl->mu);
        for (Py_ssize_t i = 0; i < fl->nmembers; i++)
            if (fl->members[i] == w) {
                fl->members[i] = fl->members[--fl->nmembers];
                break;
            }
        pthread_mutex_unlock(&fl->mu);
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    w->closing = 1; /* no write starts now; one under way stops after its sendmsg */
    while (w->writing) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
    if (fl) {
        pthread_mutex_lock(&fl->mu);
        while (fl->busy == w) pthread_cond_wait(&fl->cv, &fl->mu); /* the flusher took it off its list */
        if (w->in_ep && !fl->closed) {
            epoll_ctl(fl->ep, EPOLL_CTL_DEL, w->fd, NULL);
            if (fl->sleeping) { /* its epoll_wait may have returned our event already: let it take it in */
                unsigned long long gen = fl->wake_gen;
                fl_poke(fl);
                while (fl->wake_gen == gen && fl->sleeping) pthread_cond_wait(&fl->cv, &fl->mu);
            }
        }
        fl_remove(fl, w);
        if (w->armed) fl->armed--;
        w->in_ep = w->armed = 0;
        pthread_mutex_unlock(&fl->mu);
    }
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    q_drop(w);
    int fd = w->fd;
    w->fd = -1;
    w->flusher = NULL;
    PyObject *stream = w->stream, *chan = w->chan;
    w->stream = w->chan = NULL;
    w->blocked = w->failed = w->stalled = w->read_since = 0;
    w->last_ns = 0;
    w->closing = 0;
    pthread_mutex_unlock(&w->mu);
    w_reap(w);
    if (fd >= 0) close(fd);
    Py_XDECREF(stream);
    Py_XDECREF(chan);
    Py_XDECREF(fl);
}

static void Writer_dealloc(WriterObject *w) {
    w_unbind(w);
    for (Block *b = w->blocks, *n; b; b = n) {
        n = b->next;
        free(b);
    }
    free(w->spare);
    free(w->q);
    free(w->tr);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

/* bind(stream, fd, flusher): write to a plain socket's fd (>= 0; it is dup'ed), with
 * `flusher` (or None) to batch with, or (fd < 0) through stream.send_buffers. */
static PyObject *Writer_bind(WriterObject *w, PyObject *args) {
    PyObject *stream, *flusher;
    int fd;
    if (!PyArg_ParseTuple(args, "OiO:bind", &stream, &fd, &flusher)) return NULL;
    if (flusher != Py_None && !PyObject_TypeCheck(flusher, &FlusherType)) {
        PyErr_SetString(PyExc_TypeError, "flusher must be a Flusher or None");
        return NULL;
    }
    int dup_fd = -1;
    if (fd >= 0 && (dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    w_unbind(w);
    FlusherObject *fl = flusher == Py_None || dup_fd < 0 ? NULL : (FlusherObject *)Py_NewRef(flusher);
    if (fl) {
        pthread_mutex_lock(&fl->mu);
        if (fl->nmembers == fl->capmembers) {
            Py_ssize_t cap = fl->capmembers ? fl->capmembers * 2 : 16;
            WriterObject **m = realloc(fl->members, (size_t)cap * sizeof(*m));
            if (!m) {
                pthread_mutex_unlock(&fl->mu);
                Py_DECREF(fl);
                close(dup_fd);
                return PyErr_NoMemory();
            }
            fl->members = m;
            fl->capmembers = cap;
        }
        fl->members[fl->nmembers++] = w;
        pthread_mutex_unlock(&fl->mu);
    }
    PyObject *chan = NULL;
    if (dup_fd < 0) { /* an ipc:// stream: its channel's ring is written through the core */
        chan = PyObject_GetAttrString(stream, "channel");
        if (!chan)
            PyErr_Clear();
        else if (!Py_IS_TYPE(chan, capi->ipc_channel_type))
            Py_CLEAR(chan);
    }
    pthread_mutex_lock(&w->mu);
    w->fd = dup_fd;
    w->stream = dup_fd < 0 && !chan ? Py_NewRef(stream) : NULL;
    w->chan = chan;
    w->flusher = fl;
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *Writer_clear(WriterObject *w, PyObject *unused) {
    w_unbind(w);
    Py_RETURN_NONE;
}

/* Queue buffers (small ones copied, large ones held); with the GIL, w->mu not held. */
static int w_add(WriterObject *w, PyObject *buffers) {
    PyObject *seq = PySequence_Fast(buffers, "buffers must be a sequence");
    if (!seq) return -1;
    int r = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && r == 0; i++) {
        Py_buffer v;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), &v, PyBUF_C_CONTIGUOUS) < 0) {
            r = -1;
            break;
        }
        pthread_mutex_lock(&w->mu);
        int dropped = w->closing || w->failed;
        int kept = 0;
        if (!dropped && v.len) {
            if (v.len < w->coalesce)
                r = q_bytes(w, v.buf, (size_t)v.len);
            else if ((r = q_view(w, &v)) == 0)
                kept = 1;
        }
        pthread_mutex_unlock(&w->mu);
        if (!kept) PyBuffer_Release(&v);
        if (r < 0) PyErr_NoMemory();
    }
    Py_DECREF(seq);
    return r;
}

static PyObject *Writer_add(WriterObject *w, PyObject *buffers) {
    if (w_add(w, buffers) < 0) return NULL;
    Py_RETURN_NONE;
}

/* send(buffers): add, then write now or batch, as for a message. */
static PyObject *Writer_send(WriterObject *w, PyObject *buffers) {
    if (w_add(w, buffers) < 0) return NULL;
    w_kick(w);
    Py_RETURN_NONE;
}

/* flush(stream) -> bool: write what the transport takes now.  True when everything is
 * written, or (a socket with a flusher) when the flusher will finish it when there is
 * room.  Raises OSError if a write failed. */
static PyObject *Writer_flush(WriterObject *w, PyObject *stream) {
    if (w->fd < 0) {
        int r = w->chan ? w_ipcwrite(w) : w_pywrite(w, w->stream ? w->stream : stream);
        w->stalled = r != 1;
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb); /* the reaping may run finalizers */
        w_reap(w);
        PyErr_Restore(et, ev, tb);
        if (r < 0) return NULL;
        return PyBool_FromLong(r);
    }
    Py_BEGIN_ALLOW_THREADS w_write(w, -1);
    Py_END_ALLOW_THREADS
    w_reap(w);
    if (w->failed) {
        errno = w->failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(!w->blocked || (w->flusher && !w->flusher->closed));
}

/* A buffer of o: a small bytes object's own memory (it is copied before anything can
 * change it, and holds no export: v->obj is NULL), else an export. */
static int get_small(PyObject *o, Py_buffer *v, Py_ssize_t coalesce) {
    if (PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) < coalesce) {
        v->buf = PyBytes_AS_STRING(o);
        v->len = PyBytes_GET_SIZE(o);
        v->obj = NULL;
        return 0;
    }
    return PyObject_GetBuffer(o, v, PyBUF_C_CONTIGUOUS);
}

/* Encode a MESSAGE frame of msg (a copyless.Message) with this seq and ack_seq
 * straight into the queue (the bytes frames.encode_frame would give); MessageTooLarge
 * if its front or data is over max_segment bytes (the peer's limit; 0: not checked).  Returns what
 * the session keeps to resend (lossless), else None; NULL with an error set, and
 * nothing queued (unless the queue ran out of memory: the writer then fails, as a
 * broken socket would).  *act: what w_sent is to do (write now: 1; ipc, written
 * already or waiting for room: -1). */
static PyObject *w_encode(WriterObject *w, PyObject *msg, uint64_t seq, uint64_t ack, int data_crc, int lossless,
                          Py_ssize_t max_segment, int *act_out) {
    *act_out = 0;
    CopylessOutFields f;
    if (capi->outgoing(msg, &f) < 0) return NULL;
    PyObject *rec = NULL;
    int act = 0;
    Py_buffer fv, stack[8], *dv = stack;
    Py_ssize_t nb = PyList_GET_SIZE(f.buffers), got = 0;
    int have_front = 0;
    if (f.type > 0xFFFF) {
        PyErr_Format(ConfigErr ? ConfigErr : PyExc_ValueError, "message type %u does not fit the messenger's u16",
                     f.type);
        goto done;
    }
    if (nb > 8 && !(dv = PyMem_Malloc((size_t)nb * sizeof(Py_buffer)))) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_small(f.front, &fv, w->coalesce) < 0) goto done;
    have_front = fv.obj != NULL;
    uint64_t dlen = 0;
    for (; got < nb; got++) {
        if (get_small(PyList_GET_ITEM(f.buffers, got), &dv[got], w->coalesce) < 0) goto done;
        dlen += (uint64_t)dv[got].len;
    }
    if ((uint64_t)fv.len >= (1ull << 32) || dlen >= (1ull << 32)) {
        PyErr_SetString(LocalProtoErr ? LocalProtoErr : PyExc_ValueError, "a segment is limited to 4 GiB - 1");
        goto done;
    }
    if (max_segment > 0 && (fv.len > max_segment || dlen > (uint64_t)max_segment)) { /* (as session.check_size) */
        int front = fv.len > max_segment;
        PyErr_Format(TooLargeErr ? TooLargeErr : PyExc_ValueError,
                     "a %llu-byte %s segment, over the peer's limit of %zd bytes (max_segment)",
                     front ? (unsigned long long)fv.len : (unsigned long long)dlen, front ? "front" : "data",
                     max_segment);
        goto done;
    }
    /* preamble + header + its crc: 64 bytes, as frame_encode lays them out */
    uint8_t head[32 + MSG_HEADER_SIZE + 4] = {0}, mid[4], tailb[8];
    uint8_t *pre = head, *h = head + 32;
    pre[0] = TAG_MESSAGE;
    pre[1] = 3;
    put16(pre + 2, data_crc ? 0 : FLAG_NO_DATA_CRC);
    uint32_t lens[3] = {MSG_HEADER_SIZE, (uint32_t)fv.len, (uint32_t)dlen};
    for (int i = 0; i < 3; i++) {
        put32(pre + 4 + 6 * i, lens[i]);
        put16(pre + 8 + 6 * i, 1);
    }
    uint32_t chain = crc32c_update(0, pre, 28);
    put32(pre + 28, chain);
    put16(h, (uint16_t)f.type);
    h[2] = (uint8_t)f.priority;
    h[3] = f.is_reply ? MSG_FLAG_REPLY : 0;
    memcpy(h + 4, &f.tid, 8);
    memcpy(h + 12, &seq, 8);
    memcpy(h + 20, &ack, 8);
    chain = crc32c_update(chain, h, MSG_HEADER_SIZE);
    put32(h + MSG_HEADER_SIZE, chain);
    chain = crc32c_update(chain, fv.buf, (size_t)fv.len);
    put32(mid, chain);
    uint32_t dcrc = 0;
    if (data_crc) {
        dcrc = chain;
        for (Py_ssize_t i = 0; i < nb; i++) dcrc = crc32c_update(dcrc, dv[i].buf, (size_t)dv[i].len);
    }
    put32(tailb, dcrc);
    put32(tailb + 4, LATE_COMPLETE ^ (data_crc ? dcrc : chain));
    if (lossless) {
        rec = outmessage_make(f.sent_id, f.type, f.front, f.buffers, f.tid, f.priority, f.is_reply, seq);
        if (!rec) goto done;
    } else
        rec = Py_NewRef(Py_None);
    /* ipc:// with nothing queued: the frame's pieces go straight into the ring (one copy,
     * no queue, no lock), and only what the ring cannot take now is queued.  An ipc
     * writer is only ever touched with the GIL (and under the connection's lock): the
     * flusher never sees it, so its queue indices can be read here without w->mu. */
    size_t skip = 0;
    if (w->chan && w->head == w->tail && w->rel == w->head && !w->closing && !w->failed && nb <= 8) {
        struct iovec iov[12];
        int k = 0;
        size_t total = 0;
#define IOV(ptr, n) (iov[k].iov_base = (void *)(ptr), iov[k].iov_len = (size_t)(n), total += iov[k++].iov_len)
        IOV(head, sizeof head);
        if (fv.len) IOV(fv.buf, fv.len);
        IOV(mid, 4);
        for (Py_ssize_t i = 0; i < nb; i++)
            if (dv[i].len) IOV(dv[i].buf, dv[i].len);
        IOV(tailb, 8);
#undef IOV
        Py_ssize_t n = capi->ipc_send(w->chan, iov, k);
        if (n < 0) /* closed: queued as it was before, and the loop's flush meets the error again */
            PyErr_Clear();
        else {
            w->n_syscalls++; /* (a publish) */
            w->stalled = (size_t)n < total; /* the ring is full: the rest waits (the channel armed its wait) */
            if ((size_t)n == total) {
                act = -1; /* all written: nothing for w_sent to do */
                goto done;
            }
            skip = (size_t)n;
            act = -1;
        }
    }
    int r = 0;
    Py_buffer done[4];
    Py_ssize_t ndone = 0;
    size_t skip0 = skip;
    int64_t now = w->fd >= 0 ? cork_clock() : 0;
    pthread_mutex_lock(&w->mu);
    if (w->rel != w->head) ndone = q_reap(w, done, 4); /* what the flusher wrote since */
    uint64_t base = w->q_in;
    int small = fv.len < w->coalesce && !skip;
    for (Py_ssize_t i = 0; i < nb && small; i++) small = dv[i].len < w->coalesce;
    if (w->closing || w->failed) {
        /* dropped: the connection is going, and the session requeues what it sent */
    } else if (small) { /* the whole frame in one piece of the queue */
        uint8_t *d = q_reserve(w, sizeof head + (size_t)fv.len + 4 + (size_t)dlen + 8);
        if (!d)
            r = -1;
        else {
            memcpy(d, head, sizeof head);
            d += sizeof head;
            memcpy(d, fv.buf, (size_t)fv.len);
            d += fv.len;
            memcpy(d, mid, 4);
            d += 4;
            for (Py_ssize_t i = 0; i < nb; i++) {
                memcpy(d, dv[i].buf, (size_t)dv[i].len);
                d += dv[i].len;
            }
            memcpy(d, tailb, 8);
        }
        if (r < 0) {
            w->failed = ENOMEM;
            q_drop(w);
        }
    } else { /* piece by piece (large buffers queued as they are), less what was written */
        r = q_piece(w, head, sizeof head, NULL, &skip);
        if (r == 0 && fv.len && (r = q_piece(w, fv.buf, (size_t)fv.len, &fv, &skip)) == 1)
            r = 0, have_front = 0; /* the queue holds it now */
        if (r == 0) r = q_piece(w, mid, 4, NULL, &skip);
        for (Py_ssize_t i = 0; i < nb && r == 0; i++)
            if (dv[i].len && (r = q_piece(w, dv[i].buf, (size_t)dv[i].len, &dv[i], &skip)) == 1)
                r = 0, dv[i].obj = NULL, dv[i].buf = NULL; /* held by the queue */
        if (r == 0) r = q_piece(w, tailb, 8, NULL, &skip);
        if (r < 0) { /* half a frame would break the stream: it fails instead */
            w->failed = ENOMEM;
            q_drop(w);
        }
    }
    if (r == 0 && w->q_in != base) /* for revoke() */
        tr_note(w, f.sent_id, base, skip0, (uint64_t)fv.len, dlen, data_crc);
    if (w->fd >= 0 && r == 0) act = w_decide(w, now);
    pthread_mutex_unlock(&w->mu);
    for (Py_ssize_t i = 0; i < ndone; i++) PyBuffer_Release(&done[i]);
    if (r < 0) {
        Py_CLEAR(rec);
        PyErr_NoMemory();
    }
done:
    if (have_front) PyBuffer_Release(&fv);
    for (Py_ssize_t i = 0; i < got; i++)
        if (dv[i].obj) PyBuffer_Release(&dv[i]);
    if (dv != stack) PyMem_Free(dv);
    Py_DECREF(f.front);
    Py_DECREF(f.buffers);
    *act_out = act;
    return rec;
}

/* After w_encode: write now, or leave it to the flusher (act says which), or to the
 * bound stream (ipc ring, a stream's send_buffers). */
static void w_sent(WriterObject *w, int act) {
    if (act < 0) return; /* ipc: written into the ring by w_encode (or the rest waits for room) */
    if (w->fd < 0)
        w_kick(w);
    else if (act)
        w_write_now(w);
}

/* message(msg, seq, ack, data_crc, lossless, max_segment) -> OutMessage | None
 * Encode a MESSAGE frame of msg with this seq and ack_seq into the queue (w_encode),
 * then write now or batch.  Returns what the session keeps to resend (lossless), else
 * None.  (The Python path's; the steady state of Connection.send does both itself,
 * see "compiled send" below.) */
static PyObject *Writer_message(WriterObject *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "message(msg, seq, ack, data_crc, lossless, max_segment)");
        return NULL;
    }
    uint64_t seq = PyLong_AsUnsignedLongLong(args[1]), ack = PyLong_AsUnsignedLongLong(args[2]);
    int data_crc = PyObject_IsTrue(args[3]), lossless = PyObject_IsTrue(args[4]);
    Py_ssize_t max_segment = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) return NULL;
    int act;
    PyObject *rec = w_encode(w, args[0], seq, ack, data_crc, lossless, max_segment, &act);
    if (rec) w_sent(w, act);
    return rec;
}

/* Zeros to send in place of a revoked message's data: a read-only anonymous mapping as
 * large as a segment can be, made once.  It costs address space only: reading it maps
 * the kernel's one zero page. */
static const uint8_t *zeros;
static const uint8_t *zero_source(void) {
    if (!zeros) {
        void *z = mmap(NULL, (size_t)1 << 32, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (z != MAP_FAILED) zeros = z;
    }
    return zeros;
}

/* w->mu held, no write under way, no GIL needed: abort the queued frame t (see revoke).
 * Its late status says aborted; what is left of its data is sent from zeros, and its
 * data crc is corrected to cover the zeros (the receiver checks every crc of an aborted
 * frame too: a crc it skipped would let a stream that lost bytes pass unnoticed); what
 * is left of a front held as a Python buffer is copied.  The Python buffers it let go of go to
 * *views (malloc'ed; *nv of them), for the caller to release with the GIL.  -1: no
 * memory, and nothing changed. */
static int tr_abort(WriterObject *w, Track *t, const uint8_t *z, Py_buffer **views, Py_ssize_t *nv) {
    uint64_t pos0 = w->q_in - w->pending, pos = pos0;
    size_t need = 0, fbytes = 0;
    for (size_t i = w->head; i < w->tail && pos < t->dend; pos += w->q[i++].len)
        if (!w->q[i].blk && pos >= t->front && w->q[i].len) {
            need++;
            if (pos < t->data) fbytes = w->q[i].len;
        }
    Py_buffer *v = malloc((need ? need : 1) * sizeof(Py_buffer));
    Block *fb = fbytes ? malloc(sizeof(Block) + fbytes) : NULL;
    if (!v || (fbytes && !fb)) {
        free(v);
        free(fb);
        return -1;
    }
    /* The crc is linear: replacing piece P (ending k bytes before the data's end) by
     * zeros changes the crc by state0(P) shifted by k bytes (state0: the crc register
     * after P from 0; the shift: a multiply by x^(8k), as joining two crcs does). */
    uint32_t delta = 0;
    pos = pos0;
    for (size_t i = w->head; i < w->tail && pos < t->dend; i++) {
        Chunk *c = &w->q[i];
        size_t len = c->len;
        if (!c->blk && pos >= t->front && len) {
            if (pos < t->data) { /* the front (one buffer): a copy of what is left of it, in a block of its own */
                memcpy(fb->data, c->p, len);
                w_link_block(w, fb, len, len, 1);
                c->p = fb->data;
                c->blk = fb;
            } else { /* the data: zeros */
                if (t->crc)
                    delta ^= multmodp(xpow_bits(8 * (t->dend - (pos + len))), ~crc32c_update(0xFFFFFFFFu, c->p, len));
                c->p = z;
            }
            v[(*nv)++] = c->view;
            c->view.obj = NULL;
        }
        pos += len;
    }
    put32(t->late - 4, get32(t->late - 4) ^ delta); /* the data crc: the bytes before the status */
    put32(t->late, get32(t->late) ^ delta ^ LATE_COMPLETE ^ LATE_ABORTED); /* the status, on the new crc */
    *views = v;
    return 0;
}

/* revoke(msg) -> bool: abort the frame of msg (a copyless.Message sent through this
 * writer) if it is queued and its data crc has not started to go: True then, and the
 * writer holds none of msg's buffers any more (the rest of the frame goes as filler,
 * marked aborted, so the stream stays whole and the receiver discards it).  False if
 * its data went whole already (and some of its crc), or it was never queued here.  Waits for a
 * write under way (the GIL released). */
static PyObject *Writer_revoke(WriterObject *w, PyObject *msg) {
    Py_buffer *views = NULL;
    Py_ssize_t nv = 0;
    int r = 0;
    PyObject *ido = PyObject_GetAttrString(msg, "_sent_id");
    if (!ido) return NULL;
    uint64_t id = PyLong_AsUnsignedLongLong(ido);
    Py_DECREF(ido);
    if (PyErr_Occurred()) return NULL;
    if (!id) Py_RETURN_FALSE; /* never sent */
    const uint8_t *z = zero_source(); /* (made with the GIL: two revokes at once would map it twice) */
    if (!z) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    while (w->writing) pthread_cond_wait(&w->cv, &w->mu); /* and none starts while we hold the lock */
    uint64_t out = w->q_in - w->pending;
    for (size_t i = w->tr_head; i < w->tr_tail; i++) {
        Track *t = &w->tr[i];
        if (t->id != id || t->end <= out) continue;
        if (out + 8 > t->end) break; /* its data went whole, and its crc (in part): the peer has it */
        if (tr_abort(w, t, z, &views, &nv) < 0)
            r = -1;
        else {
            r = 1;
            t->id = 0;
        }
        break;
    }
    pthread_mutex_unlock(&w->mu);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nv; i++) PyBuffer_Release(&views[i]);
    free(views);
    if (r < 0) return PyErr_NoMemory();
    return PyBool_FromLong(r);
}

static PyObject *Writer_get_pending(WriterObject *w, void *c) { return PyLong_FromSize_t(w->pending); }
static PyObject *Writer_get_bound(WriterObject *w, void *c) { return PyBool_FromLong(w->fd >= 0 || w->stream || w->chan); }
static PyObject *Writer_get_statistics(WriterObject *w, void *c) {
    return Py_BuildValue("{sKsKsK}", "sends", w->n_kicks, "written_by_sender", w->n_direct, "sendmsg", w->n_syscalls);
}

static PyMethodDef Writer_methods[] = {
    {"bind", (PyCFunction)Writer_bind, METH_VARARGS,
     "bind(stream, fd, flusher): write to fd (a plain socket's; dup'ed), batching with the loop's flusher, "
     "or (fd < 0) through stream.send_buffers."},
    {"clear", (PyCFunction)Writer_clear, METH_NOARGS, "Drop what is queued and leave the socket and the flusher."},
    {"add", (PyCFunction)Writer_add, METH_O, "add(buffers): queue (small ones copied, large ones held as they are)."},
    {"send", (PyCFunction)Writer_send, METH_O, "send(buffers): queue, then write now or batch."},
    {"flush", (PyCFunction)Writer_flush, METH_O,
     "flush(stream) -> bool: write what the transport takes now (True: all, or the flusher finishes it)."},
    {"message", (PyCFunction)(void (*)(void))Writer_message, METH_FASTCALL,
     "message(msg, seq, ack, data_crc, lossless, max_segment) -> OutMessage | None: encode a MESSAGE frame into "
     "the queue, then write now or batch (MessageTooLarge if a segment is over max_segment; 0: no limit)."},
    {"revoke", (PyCFunction)Writer_revoke, METH_O,
     "revoke(msg) -> bool: abort msg's frame if its data crc is still queued (True; the writer holds none of its "
     "buffers now, and sends the rest as filler marked aborted); False if it was written whole or never queued."},
    {NULL},
};

static PyGetSetDef Writer_getset[] = {
    {"pending", (getter)Writer_get_pending, NULL, "bytes queued, not yet written", NULL},
    {"bound", (getter)Writer_get_bound, NULL, "bound to a socket or a stream", NULL},
    {"statistics", (getter)Writer_get_statistics, NULL,
     "{sends, written_by_sender, sendmsg}: sends that went through the batching rule, those the sending thread "
     "wrote itself, and sendmsg calls made (by anyone)",
     NULL},
    {NULL},
};

static PyMemberDef Writer_members[] = {
    {"stalled", T_INT, offsetof(WriterObject, stalled), READONLY,
     "a stream (not a socket) took less than was queued at the last send or flush: flush it when it can take "
     "more"},
    {"read", T_INT, offsetof(WriterObject, read_since), 0,
     "set by the reader: a message arrived since the last send (the next send is not part of a burst)"},
    {NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._codec.Writer",
    .tp_basicsize = sizeof(WriterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Writer(coalesce=1024): a connection's send queue (see the top of this section in _codec.c).",
    .tp_new = Writer_new,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_methods = Writer_methods,
    .tp_getset = Writer_getset,
    .tp_members = Writer_members,
};

/* ------------------------------------------------------------------ Flusher */
static void *fl_main(void *arg) {
    FlusherObject *fl = arg;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* its short sleeps (the hold) end on time */
    struct epoll_event ev[FL_MAXEV];
    pthread_mutex_lock(&fl->mu);
    while (!fl->stop) {
        if (fl->armed && fl->dirty_head) { /* full sockets with room again get their turn too */
            int n = epoll_wait(fl->ep, ev, FL_MAXEV, 0);
            for (int i = 0; i < n; i++) {
                WriterObject *w = ev[i].data.ptr;
                if (!w) continue;
                w->armed = 0;
                fl->armed--;
                fl_push(fl, w);
            }
        }
        if (!fl->dirty_head) {
            /* nothing to write: a stream keeps coming, so look again for a while, then sleep */
            pthread_mutex_unlock(&fl->mu);
            int64_t start = mono_ns();
            unsigned i = 0;
            while (!__atomic_load_n(&fl->dirty_head, __ATOMIC_RELAXED) && !__atomic_load_n(&fl->stop, __ATOMIC_RELAXED) &&
                   mono_ns() - start < fl->spin_ns) {
                cpu_relax();
                if ((++i & 31) == 0) sched_yield(); /* the peer may need this CPU */
            }
            pthread_mutex_lock(&fl->mu);
            if (fl->dirty_head || fl->stop) continue;
            fl->sleeping = 1;
            pthread_mutex_unlock(&fl->mu);
            int n;
            do n = epoll_wait(fl->ep, ev, FL_MAXEV, -1);
            while (n < 0 && errno == EINTR);
            pthread_mutex_lock(&fl->mu);
            fl->sleeping = 0;
            for (int k = 0; k < n; k++) {
                WriterObject *w = ev[k].data.ptr;
                if (!w) { /* the eventfd */
                    uint64_t v;
                    if (read(fl->efd, &v, 8) < 0) { /* already drained */
                    }
                    fl->poked = 0;
                } else {
                    w->armed = 0;
                    fl->armed--;
                    fl_push(fl, w);
                }
            }
            fl->wake_gen++;
            pthread_cond_broadcast(&fl->cv); /* an unbind may wait for these events to be in */
            continue;
        }
        WriterObject *w = fl->dirty_head;
        fl->dirty_head = w->next_dirty;
        if (!fl->dirty_head) fl->dirty_tail = NULL;
        w->dirty = 0;
        fl->busy = w;
        int64_t since = w->dirty_since;
        pthread_mutex_unlock(&fl->mu);
        if (since && __atomic_load_n(&w->pending, __ATOMIC_RELAXED) < FL_BATCH) {
            /* Left by a sender in the middle of a burst: let the batch grow a little (one
             * sendmsg for many messages, one wake-up of the reader), asleep, and never
             * longer than the hold window, whatever the sender does. */
            int64_t left = since + __atomic_load_n(&hold_window, __ATOMIC_RELAXED) - cork_clock();
            if (left > 0) {
                int64_t ns = left * FL_HOLD_NS / __atomic_load_n(&hold_window, __ATOMIC_RELAXED);
                struct timespec ts = {0, (long)ns};
                nanosleep(&ts, NULL);
            }
        }
        /* one sendmsg: what came meanwhile waits for the next turn, and grows there */
        int r = w_write(w, 1);
        pthread_mutex_lock(&fl->mu);
        fl->busy = NULL;
        pthread_cond_broadcast(&fl->cv);
        if (r & 1) { /* more: after the others have had their turn */
            fl_push(fl, w);
            if (since) w->dirty_since = cork_clock();
        }
        if ((r & 2) && !fl->reap) {
            fl->reap = 1;
            uint64_t one = 1;
            if (fl->loop_fd >= 0 && write(fl->loop_fd, &one, 8) < 0) { /* the loop is awake anyway */
            }
        }
    }
    pthread_mutex_unlock(&fl->mu);
    return NULL;
}

static PyObject *Flusher_new(PyTypeObject *cls, PyObject *args, PyObject *kw) {
    FlusherObject *fl = (FlusherObject *)cls->tp_alloc(cls, 0);
    if (!fl) return NULL;
    pthread_mutex_init(&fl->mu, NULL);
    pthread_cond_init(&fl->cv, NULL);
    fl->efd = fl->ep = fl->loop_fd = -1;
    fl->spin_ns = FL_SPIN_NS;
    return (PyObject *)fl;
}

/* Flusher(loop_fd=-1, spin=FL_SPIN_NS seconds): starts its thread. */
static int Flusher_init(FlusherObject *fl, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"loop_fd", "spin", NULL};
    int loop_fd = -1;
    double spin = FL_SPIN_NS / 1e9;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|id:Flusher", kwlist, &loop_fd, &spin)) return -1;
    if (fl->started || fl->efd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Flusher already initialised");
        return -1;
    }
    fl->loop_fd = loop_fd;
    fl->spin_ns = spin < 0 ? 0 : (int64_t)(spin * 1e9);
    fl->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    fl->ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    if (fl->efd < 0 || fl->ep < 0 || epoll_ctl(fl->ep, EPOLL_CTL_ADD, fl->efd, &e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int err = pthread_create(&fl->thread, NULL, fl_main, fl);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    fl->started = 1;
    return 0;
}

/* Stop the thread and close the fds; writers that still hold it write themselves. */
static void fl_close(FlusherObject *fl) {
    pthread_mutex_lock(&fl->mu);
    if (fl->closed) {
        pthread_mutex_unlock(&fl->mu);
        return;
    }
    fl->stop = 1;
    fl_poke(fl);
    pthread_mutex_unlock(&fl->mu);
    if (fl->started) {
        Py_BEGIN_ALLOW_THREADS pthread_join(fl->thread, NULL);
        Py_END_ALLOW_THREADS
    }
    pthread_mutex_lock(&fl->mu);
    fl->closed = 1;
    fl->loop_fd = -1;
    for (Py_ssize_t i = 0; i < fl->nmembers; i++) fl->members[i]->in_ep = fl->members[i]->armed = 0;
    fl->armed = 0;
    while (fl->dirty_head) fl_remove(fl, fl->dirty_head);
    if (fl->efd >= 0) close(fl->efd);
    if (fl->ep >= 0) close(fl->ep);
    fl->efd = fl->ep = -1;
    pthread_mutex_unlock(&fl->mu);
}

static void Flusher_dealloc(FlusherObject *fl) { /* no writer holds it (they hold a reference) */
    fl_close(fl);
    free(fl->members);
    pthread_mutex_destroy(&fl->mu);
    pthread_cond_destroy(&fl->cv);
    Py_TYPE(fl)->tp_free((PyObject *)fl);
}

static PyObject *Flusher_close(FlusherObject *fl, PyObject *unused) {
    fl_close(fl);
    Py_RETURN_NONE;
}

/* reap(): give back the Python buffers the thread wrote (with the GIL). */
static PyObject *Flusher_reap(FlusherObject *fl, PyObject *unused) {
    pthread_mutex_lock(&fl->mu);
    fl->reap = 0;
    Py_ssize_t n = fl->nmembers;
    WriterObject **m = n ? malloc((size_t)n * sizeof(*m)) : NULL;
    if (m) {
        memcpy(m, fl->members, (size_t)n * sizeof(*m));
        for (Py_ssize_t i = 0; i < n; i++) Py_INCREF(m[i]); /* members are alive: they unbind first */
    }
    pthread_mutex_unlock(&fl->mu);
    if (!m) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++) {
        w_reap(m[i]);
        Py_DECREF(m[i]);
    }
    free(m);
    Py_RETURN_NONE;
}

static PyObject *Flusher_get_reap(FlusherObject *fl, void *c) { return PyBool_FromLong(fl->reap); }

static PyMethodDef Flusher_methods[] = {
    {"close", (PyCFunction)Flusher_close, METH_NOARGS, "Stop the thread (its writers then write themselves)."},
    {"reap", (PyCFunction)Flusher_reap, METH_NOARGS, "Give back the Python buffers it wrote (needs the GIL)."},
    {NULL},
};

static PyGetSetDef Flusher_getset[] = {
    {"reap_wanted", (getter)Flusher_get_reap, NULL, "Python buffers were written: call reap()", NULL},
    {NULL},
};

static PyTypeObject FlusherType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._codec.Flusher",
    .tp_basicsize = sizeof(FlusherObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flusher(loop_fd=-1, spin=3e-05): a thread that writes its writers' batches without the GIL.",
    .tp_new = Flusher_new,
    .tp_init = (initproc)Flusher_init,
    .tp_dealloc = (destructor)Flusher_dealloc,
    .tp_methods = Flusher_methods,
    .tp_getset = Flusher_getset,
};

/* ------------------------------------------------------------------ Lock */
/* A Connection's lock: reentrant, with threading.RLock's interface.  It is ours so
 * that the compiled send takes and gives it back in a few ns, with no Python call:
 * the Python half of a connection takes it with `with`, the send path in C directly,
 * and the two exclude each other exactly as two Python holders would.
 *
 * Its state (owner, count, waiters) is only read and changed with the GIL held, so the
 * GIL is what makes those steps atomic (as for the pub/sub core's private state), and
 * taking a free lock is two stores: no atomic instruction, no system call, no clock.
 * (threading.RLock's lock computed a deadline with clock_gettime even to try it: ~20
 * ns of a ~170 ns send.)  A thread that finds it held by another counts itself in
 * `sleepers`, releases the GIL and sleeps on `gen`, a futex word.  A release that
 * finds sleepers bumps gen, wakes them all and sets sleepers to 0: each woken thread
 * takes the GIL back and tries again, and counts itself again if it must wait again.
 * So a release makes a system call only when someone went to sleep since the last
 * wake-up, never for a thread that is awake and waiting for the GIL (a sender that
 * holds the GIL sends thousands of messages meanwhile: counting those waiters until
 * they had the GIL cost every one of those sends a futex call).  A free-threaded build
 * would need a compare-and-swap on owner instead. */
typedef struct {
    PyObject_HEAD
    unsigned long owner, count; /* with the GIL */
    Py_ssize_t sleepers;        /* with the GIL: threads asleep (or about to be) on gen since it last moved */
    uint32_t gen;               /* futex word: moved (with the GIL) by each release that wakes sleepers */
} LockObject;

static PyTypeObject LockType;

static long lock_futex(uint32_t *word, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, word, op, val, ts, NULL, 0);
}

/* With the GIL.  timeout_ns < 0: wait as long as it takes; 0: do not wait.  1 taken, 0
 * not (timed out), -1 error (a signal handler raised while it waited).  The GIL is
 * released while it waits. */
static int lock_take(LockObject *l, int64_t timeout_ns) {
    unsigned long me = PyThread_get_thread_ident();
    if (!l->count) {
        l->owner = me;
        l->count = 1;
        return 1;
    }
    if (l->owner == me) {
        if (l->count == ULONG_MAX) {
            PyErr_SetString(PyExc_OverflowError, "lock taken too many times");
            return -1;
        }
        l->count++;
        return 1;
    }
    if (timeout_ns == 0) return 0;
    int64_t end = timeout_ns > 0 ? mono_ns() + timeout_ns : 0;
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (timeout_ns > 0) {
            int64_t left = end - mono_ns();
            if (left <= 0) return 0;
            ts.tv_sec = (time_t)(left / 1000000000);
            ts.tv_nsec = (long)(left % 1000000000);
            tsp = &ts;
        }
        /* gen is read with the GIL, before it is released: a release after this moves
         * it, and the futex then returns at once instead of sleeping through it */
        uint32_t gen = __atomic_load_n(&l->gen, __ATOMIC_RELAXED);
        l->sleepers++;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        if (lock_futex(&l->gen, FUTEX_WAIT_PRIVATE, gen, tsp) < 0) err = errno;
        Py_END_ALLOW_THREADS
        if (__atomic_load_n(&l->gen, __ATOMIC_RELAXED) == gen)
            l->sleepers--; /* no release woke us (a timeout, a signal): still counted, so uncount */
        if (!l->count) {
            l->owner = me;
            l->count = 1;
            return 1;
        }
        if (err == EINTR && PyErr_CheckSignals() < 0) return -1; /* (Ctrl-C, in the main thread) */
    }
}

static int lock_give(LockObject *l) {
    if (!l->count || l->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--l->count == 0) {
        l->owner = 0;
        if (l->sleepers) { /* (a system call only when someone went to sleep) */
            l->sleepers = 0;
            __atomic_fetch_add(&l->gen, 1, __ATOMIC_RELAXED);
            lock_futex(&l->gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL);
        }
    }
    return 0;
}

static PyObject *Lock_new(PyTypeObject *cls, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    return cls->tp_alloc(cls, 0);
}

static PyObject *Lock_acquire(LockObject *l, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pd:acquire", kwlist, &blocking, &timeout)) return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    int64_t ns = !blocking ? 0 : timeout < 0 ? -1 : timeout * 1e9 > 9e18 ? INT64_MAX : (int64_t)(timeout * 1e9);
    if (blocking && timeout >= 0 && ns == 0) ns = 1; /* a tiny timeout still waits a moment */
    int r = lock_take(l, ns);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyObject *Lock_enter(LockObject *l, PyObject *unused) {
    int r = lock_take(l, -1);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyObject *Lock_release(LockObject *l, PyObject *unused) {
    if (lock_give(l) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Lock_exit(LockObject *l, PyObject *const *args, Py_ssize_t nargs) {
    if (lock_give(l) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Lock_is_owned(LockObject *l, PyObject *unused) {
    return PyBool_FromLong(l->count && l->owner == PyThread_get_thread_ident());
}

static PyObject *Lock_repr(LockObject *l) {
    return PyUnicode_FromFormat("<copyless._codec.Lock %s owner=%lu count=%lu at %p>",
                                l->count ? "locked" : "unlocked", l->owner, l->count, (void *)l);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool, as threading.RLock's"},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "release(): as threading.RLock's"},
    {"__enter__", (PyCFunction)Lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Lock_exit, METH_FASTCALL, NULL},
    {"_is_owned", (PyCFunction)Lock_is_owned, METH_NOARGS, "held by the calling thread"},
    {NULL},
};

static PyTypeObject LockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._codec.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Lock(): a reentrant lock (threading.RLock's interface) that the compiled send takes without a "
              "Python call; a Connection's lock.",
    .tp_new = Lock_new,
    .tp_repr = (reprfunc)Lock_repr,
    .tp_methods = Lock_methods,
};

/* ------------------------------------------------------------------ recv_fill */
/* A reply that stops coming for a moment is looked for again this long before the caller
 * sleeps in poll.  A TCP sender paced by its congestion control (BBR, the default on many
 * hosts, paces even on loopback) sends a large reply in bursts some 10-30 us apart: a
 * caller that slept between them was woken for each (~15 us on a VM, an IPI to a halted
 * vCPU), and its acks, as late, kept BBR's bandwidth estimate and so its pacing low (a
 * 1 MiB reply over loopback took ~310 us a call, ~165 us with this spin). */
#define DIRECT_SPIN_NS 50000

/* After an EAGAIN in the middle of a reply, without the GIL: 1 to read again at once
 * (*gap: when this gap began, 0 when data came since), 0 to sleep in poll. */
static int look_again(int64_t *gap) {
    int64_t now = mono_ns();
    if (!*gap) *gap = now;
    if (now - *gap < DIRECT_SPIN_NS) { /* the next burst is on its way */
        cpu_relax();
        sched_yield(); /* the sender may need this CPU */
        return 1;
    }
    *gap = 0;
    return 0;
}

/* recv_fill(fd, buf, wait) -> n: read into buf from a non-blocking socket until it is
 * full, without the GIL and without going back to Python between the pieces the
 * transport delivers (TCP hands a large message over in 64 KiB pieces: a Python read
 * round and a poll() each cost more than the copy).  Stops early at the end of the
 * stream or an error once something was read, or when nothing more came for `wait`
 * seconds (the caller holds its connection's lock: bounded).  0: the end of the
 * stream; BlockingIOError: nothing came within `wait`; OSError otherwise. */
static PyObject *py_recv_fill(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer b;
    double wait;
    if (!PyArg_ParseTuple(args, "iw*d:recv_fill", &fd, &b, &wait)) return NULL;
    size_t got = 0, len = (size_t)b.len;
    int err = 0, eof = 0;
    int ms = wait <= 0 ? 0 : wait > 3600 ? 3600000 : (int)(wait * 1000) + 1;
    int64_t gap = 0;
    Py_BEGIN_ALLOW_THREADS
    while (got < len) {
        ssize_t n = recv(fd, (char *)b.buf + got, len - got, MSG_DONTWAIT);
        if (n > 0) {
            got += (size_t)n;
            gap = 0;
            continue;
        }
        if (n == 0) {
            eof = 1;
            break;
        }
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            err = errno;
            break;
        }
        if (ms && look_again(&gap)) continue;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, ms);
        if (r < 0 && errno != EINTR) {
            err = errno;
            break;
        }
        if (r == 0) {
            err = EAGAIN;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    if (got > 0 || eof) return PyLong_FromSize_t(got);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError); /* EAGAIN: BlockingIOError */
}

/* ------------------------------------------------------------------ Throttle */
/* A limit shared by a Messenger's connections (messages, or bytes): see
 * messenger.Throttle's docstring for what it is for.  Every read round reserves from
 * it and puts back, on every loop thread, so it is a C type whose state the GIL
 * guards: no lock, and a reserve or a put is one C call. */
typedef struct {
    PyObject_HEAD
    long long limit; /* -1: none */
    long long used, low;
    PyObject *waiters; /* list of callables, run once it is down to `low` */
} ThrottleObject;

static int Throttle_init(ThrottleObject *t, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"limit", NULL};
    PyObject *limit = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O:Throttle", kwlist, &limit)) return -1;
    long long v = -1;
    if (limit != Py_None) {
        v = PyLong_AsLongLong(limit);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 1) {
            PyErr_SetString(ConfigErr ? ConfigErr : PyExc_ValueError, "a throttle limit is >= 1 (or None for no limit)");
            return -1;
        }
    }
    t->limit = v;
    t->used = 0;
    t->low = v < 0 ? 0 : v * 3 / 4;
    Py_XSETREF(t->waiters, PyList_New(0));
    return t->waiters ? 0 : -1;
}

static void Throttle_dealloc(ThrottleObject *t) {
    Py_XDECREF(t->waiters);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

/* reserve(need=0) -> int: take everything free (UNLIMITED without a limit).  When
 * nothing is in use, at least `need`: one message larger than the limit still gets
 * through, alone. */
static long long throttle_take(ThrottleObject *t, long long need) {
    if (t->limit < 0) return -1; /* frames.UNLIMITED */
    long long n = t->limit - t->used;
    if (n < 0) n = 0;
    if (t->used == 0 && need > n) n = need;
    t->used += n;
    return n;
}

static PyObject *Throttle_reserve(ThrottleObject *t, PyObject *const *args, Py_ssize_t nargs) {
    long long need = 0;
    if (nargs > 1) return PyErr_Format(PyExc_TypeError, "reserve() takes at most 1 argument");
    if (nargs == 1 && (need = PyLong_AsLongLong(args[0])) == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(throttle_take(t, need));
}

/* Run the waiters (taken out first: one may add itself again). */
static int throttle_fire(ThrottleObject *t) {
    PyObject *w = t->waiters;
    if (!(t->waiters = PyList_New(0))) {
        t->waiters = w;
        return -1;
    }
    int r = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(w) && r == 0; i++) {
        PyObject *res = PyObject_CallNoArgs(PyList_GET_ITEM(w, i));
        if (!res) r = -1;
        Py_XDECREF(res);
    }
    Py_DECREF(w);
    return r;
}

/* put(n): give n back; the waiters run once it is down to the low-water mark. */
static int throttle_give(ThrottleObject *t, long long n) {
    if (t->limit < 0 || n <= 0) return 0;
    t->used -= n;
    if (t->used > t->low || !PyList_GET_SIZE(t->waiters)) return 0;
    return throttle_fire(t);
}

static PyObject *Throttle_put(ThrottleObject *t, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (throttle_give(t, n) < 0) return NULL;
    Py_RETURN_NONE;
}

/* when_free(cb): cb() once this throttle is down to its low-water mark (3/4 of the
 * limit: a paused reader resumes with room for more than one message); at once if it is. */
static PyObject *Throttle_when_free(ThrottleObject *t, PyObject *cb) {
    if (t->limit >= 0 && t->used > t->low) {
        if (PyList_Append(t->waiters, cb) < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *res = PyObject_CallNoArgs(cb);
    if (!res) return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static PyObject *Throttle_get_limit(ThrottleObject *t, void *c) {
    return t->limit < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(t->limit);
}
static PyObject *Throttle_get_used(ThrottleObject *t, void *c) { return PyLong_FromLongLong(t->used); }

static PyMethodDef Throttle_methods[] = {
    {"reserve", (PyCFunction)(void (*)(void))Throttle_reserve, METH_FASTCALL,
     "reserve(need=0) -> int: everything free (UNLIMITED without a limit); at least need if nothing is in use"},
    {"put", (PyCFunction)Throttle_put, METH_O, "put(n): give n back"},
    {"when_free", (PyCFunction)Throttle_when_free, METH_O, "when_free(cb): cb() once down to 3/4 of the limit"},
    {NULL},
};

static PyGetSetDef Throttle_getset[] = {
    {"limit", (getter)Throttle_get_limit, NULL, "the limit, or None", NULL},
    {"used", (getter)Throttle_get_used, NULL, "reserved now", NULL},
    {NULL},
};

static PyTypeObject ThrottleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._codec.Throttle",
    .tp_basicsize = sizeof(ThrottleObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Throttle(limit=None): a limit shared by a Messenger's connections (see messenger.Throttle).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Throttle_init,
    .tp_dealloc = (destructor)Throttle_dealloc,
    .tp_methods = Throttle_methods,
    .tp_getset = Throttle_getset,
};

/* ------------------------------------------------------------------ compiled send */
/* Connection.send's steady state: what the Python path does on a READY connection
 * with nothing queued ahead (Connection._send_python -> SessionConnection.
 * write_message -> Writer.message), without a Python frame.  It reads and writes the
 * very attributes the Python path does, in the slots of the three classes (their
 * __slots__), under the connection's own lock: so there is no copy of any state to
 * keep in step, and nothing it reads can be stale.  Anything else (another state,
 * messages or control frames queued ahead, a closed connection, a subclass, a slot
 * not set or of an unexpected type) takes the Python path, which decides it as
 * before.  Equivalence with the Python path: tests/test_send.py. */
#define SLOTS_MAX 24
typedef struct {
    PyTypeObject *type;
    const char *names[SLOTS_MAX];
    Py_ssize_t off[SLOTS_MAX];
} SlotMap;

/* Connection */
enum { C_CLOSED, C_LOCK, C_MACHINE, C_STREAM, C_SENDQ };
/* SessionConnection */
enum { M_STATE, M_SESSION, M_OUT, M_DATA_CRC, M_UNACKED_IN, M_ACK_DUE, M_PEER_MAX };
/* Session */
enum { S_UNSENT, S_SENT, S_OUT_SEQ, S_IN_SEQ, S_LOSSLESS };

static SlotMap sp_conn = {NULL, {"_closed", "_lock", "_machine", "_stream", "_sendq"}, {0}};
static SlotMap sp_mach = {
    NULL, {"state", "session", "_out", "data_crc", "_unacked_in", "_ack_due", "peer_max_segment"}, {0}};
static SlotMap sp_sess = {NULL, {"unsent", "sent", "out_seq", "in_seq", "lossless"}, {0}};
static PyObject *sp_ready, *sp_zero, *sp_fallback, *sp_stalled, *sp_append;
static PyTypeObject *sp_deque;

#define SLOT(o, map, i) (*(PyObject **)((char *)(o) + (map).off[i]))

/* Where each name's slot is in instances of `type` (a slot it declares itself). */
static int slotmap_resolve(SlotMap *map, PyObject *type) {
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "compiled_send() and compiled_read() take classes");
        return -1;
    }
    PyTypeObject *t = (PyTypeObject *)type;
    Py_ssize_t off[SLOTS_MAX] = {0};
    for (int i = 0; i < SLOTS_MAX && map->names[i]; i++) {
        PyObject *d = PyDict_GetItemString(t->tp_dict, map->names[i]); /* borrowed */
        PyMemberDef *md = d && Py_IS_TYPE(d, &PyMemberDescr_Type) ? ((PyMemberDescrObject *)d)->d_member : NULL;
        if (!md || md->type != T_OBJECT_EX || (md->flags & READONLY)) {
            PyErr_Format(PyExc_TypeError, "%s.%s is not a slot of the class (its __slots__)", t->tp_name,
                         map->names[i]);
            return -1;
        }
        off[i] = md->offset;
    }
    Py_XSETREF(map->type, (PyTypeObject *)Py_NewRef(type));
    memcpy(map->off, off, sizeof off);
    return 0;
}

/* send(msg) for a Connection: the method installed as Connection.send. */
static PyObject *conn_send(PyObject *conn, PyObject *msg) {
    if (Py_TYPE(conn) != sp_conn.type || SLOT(conn, sp_conn, C_CLOSED) != Py_False) goto python;
    PyObject *lk = SLOT(conn, sp_conn, C_LOCK);
    if (!lk || !Py_IS_TYPE(lk, &LockType)) goto python;
    LockObject *lock = (LockObject *)Py_NewRef(lk);
    if (lock_take(lock, -1) < 0) { /* (a signal handler raised while it waited) */
        Py_DECREF(lock);
        return NULL;
    }
    /* From here on nothing else runs under the lock.  The checks are write_message's and
     * the Python send's: a READY machine on a live stream, nothing queued ahead of it. */
    PyObject *m = SLOT(conn, sp_conn, C_MACHINE), *st = SLOT(conn, sp_conn, C_STREAM);
    PyObject *wo = SLOT(conn, sp_conn, C_SENDQ);
    if (!m || !Py_IS_TYPE(m, sp_mach.type) || !st || st == Py_None || !wo || !Py_IS_TYPE(wo, &WriterType) ||
        SLOT(m, sp_mach, M_STATE) != sp_ready)
        goto unlock_python;
    PyObject *s = SLOT(m, sp_mach, M_SESSION), *out = SLOT(m, sp_mach, M_OUT);
    PyObject *crc = SLOT(m, sp_mach, M_DATA_CRC), *lim = SLOT(m, sp_mach, M_PEER_MAX);
    if (!s || !Py_IS_TYPE(s, sp_sess.type) || !out || !PyList_CheckExact(out) || PyList_GET_SIZE(out) || !crc ||
        !PyBool_Check(crc) || !SLOT(m, sp_mach, M_UNACKED_IN) || !SLOT(m, sp_mach, M_ACK_DUE) || !lim ||
        !PyLong_CheckExact(lim))
        goto unlock_python;
    Py_ssize_t max_segment = PyLong_AsSsize_t(lim);
    if (max_segment < 0) { /* (an overflow too): the Python path decides */
        PyErr_Clear();
        goto unlock_python;
    }
    PyObject *unsent = SLOT(s, sp_sess, S_UNSENT), *sent = SLOT(s, sp_sess, S_SENT);
    PyObject *oseq = SLOT(s, sp_sess, S_OUT_SEQ), *iseq = SLOT(s, sp_sess, S_IN_SEQ);
    PyObject *lossless = SLOT(s, sp_sess, S_LOSSLESS);
    if (!unsent || !Py_IS_TYPE(unsent, sp_deque) || Py_TYPE(unsent)->tp_as_sequence->sq_length(unsent) != 0 ||
        !sent || !Py_IS_TYPE(sent, sp_deque) || !oseq || !PyLong_CheckExact(oseq) || !iseq ||
        !PyLong_CheckExact(iseq) || !lossless || !PyBool_Check(lossless))
        goto unlock_python;
    uint64_t seq = PyLong_AsUnsignedLongLong(oseq) + 1, ack = PyLong_AsUnsignedLongLong(iseq);
    if (PyErr_Occurred() || seq == 0) { /* out of a u64: the Python path raises what it raises */
        PyErr_Clear();
        goto unlock_python;
    }
    /* Held until the end: releasing a written buffer, or a stream's send_buffers, may
     * run Python code that drops what the slots held (the Python path holds them in
     * its frame's variables) */
    PyObject *held[4] = {Py_NewRef(m), Py_NewRef(s), Py_NewRef(sent), Py_NewRef(wo)};
    WriterObject *w = (WriterObject *)wo;
    PyObject *seq_o = PyLong_FromUnsignedLongLong(seq);
    if (!seq_o) goto fail;
    int stalled = w->stalled, act;
    PyObject *rec = w_encode(w, msg, seq, ack, crc == Py_True, lossless == Py_True, max_segment, &act);
    if (!rec) {
        Py_DECREF(seq_o);
        goto fail;
    }
    /* the session's state as write_message leaves it: s.out_seq = seq; s.sent.append(kept);
     * the header carried our ack: m._unacked_in, m._ack_due = 0, None.  (No Python code
     * runs here: the old values are ints, a float and None.) */
    Py_SETREF(SLOT(s, sp_sess, S_OUT_SEQ), seq_o);
    if (rec != Py_None) {
        PyObject *a[2] = {sent, rec};
        PyObject *r = PyObject_Vectorcall(sp_append, a, 2, NULL); /* deque.append(sent, rec) */
        if (!r) {
            Py_DECREF(rec);
            goto fail;
        }
        Py_DECREF(r);
    }
    Py_DECREF(rec);
    Py_SETREF(SLOT(m, sp_mach, M_UNACKED_IN), Py_NewRef(sp_zero));
    Py_SETREF(SLOT(m, sp_mach, M_ACK_DUE), Py_NewRef(Py_None));
    w_sent(w, act); /* written now (the GIL released, the lock held), or batched */
    if (w->stalled && !stalled) { /* a stream (TLS, ipc) took less than all: the loop goes on with it */
        PyObject *r = PyObject_CallMethodNoArgs(conn, sp_stalled);
        if (!r) goto fail;
        Py_DECREF(r);
    }
    for (int i = 0; i < 4; i++) Py_DECREF(held[i]);
    lock_give(lock); /* (taken above by this thread: cannot fail) */
    Py_DECREF(lock);
    Py_RETURN_NONE;
fail:
    for (int i = 0; i < 4; i++) Py_DECREF(held[i]);
    lock_give(lock);
    Py_DECREF(lock);
    return NULL;
unlock_python:
    lock_give(lock);
    Py_DECREF(lock);
python:
    return PyObject_CallMethodOneArg(conn, sp_fallback, msg);
}

static PyMethodDef conn_send_def = {
    "send", (PyCFunction)conn_send, METH_O,
    "send(msg): send a message (scatter-gather: the data buffers are not joined or copied).\n\n"
    "The calling thread writes to the socket itself when it is idle; a send that follows another closely is "
    "batched with it (a flusher thread writes the batch, see docs/design.md, \"Send path\"); a message sent while "
    "the session is (re)connecting waits in the session's queue, in order.  Compiled: the steady state (a READY "
    "connection with nothing queued ahead) runs in C; everything else in Connection._send_python."};

/* compiled_send(Connection, SessionConnection, Session, State.READY) -> the method to
 * install as Connection.send.  Each class must declare the slots the send reads
 * (see SlotMap above); the Python path is Connection._send_python, and a send that
 * leaves a stream stalled calls Connection._write_stalled() under the lock. */
static PyObject *py_compiled_send(PyObject *self, PyObject *args) {
    PyObject *conn_t, *mach_t, *sess_t, *ready;
    if (!PyArg_ParseTuple(args, "OOOO:compiled_send", &conn_t, &mach_t, &sess_t, &ready)) return NULL;
    if (slotmap_resolve(&sp_conn, conn_t) < 0 || slotmap_resolve(&sp_mach, mach_t) < 0 ||
        slotmap_resolve(&sp_sess, sess_t) < 0)
        return NULL;
    if (!sp_deque) {
        PyObject *coll = PyImport_ImportModule("collections");
        PyObject *dq = coll ? PyObject_GetAttrString(coll, "deque") : NULL;
        Py_XDECREF(coll);
        if (!dq) return NULL;
        if (!PyType_Check(dq) || !(sp_append = PyObject_GetAttrString(dq, "append"))) {
            Py_DECREF(dq);
            return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_TypeError, "collections.deque is not a type");
        }
        sp_deque = (PyTypeObject *)dq;
    }
    if (!sp_zero && !(sp_zero = PyLong_FromLong(0))) return NULL;
    if (!sp_fallback && !(sp_fallback = PyUnicode_InternFromString("_send_python"))) return NULL;
    if (!sp_stalled && !(sp_stalled = PyUnicode_InternFromString("_write_stalled"))) return NULL;
    Py_XSETREF(sp_ready, Py_NewRef(ready));
    return PyDescr_NewMethod((PyTypeObject *)conn_t, &conn_send_def);
}

static PyObject *py_set_errors(PyObject *self, PyObject *args) {
    PyObject *lp, *cf, *tl;
    if (!PyArg_ParseTuple(args, "OOO", &lp, &cf, &tl)) return NULL;
    Py_XSETREF(LocalProtoErr, Py_NewRef(lp));
    Py_XSETREF(ConfigErr, Py_NewRef(cf));
    Py_XSETREF(TooLargeErr, Py_NewRef(tl));
    Py_RETURN_NONE;
}

/* sole_view(view) -> bool: the read buffer's own memoryview, called as
 * sole_view(reader._view), is the only thing that holds it (the attribute and the
 * argument: two references) and the only view of its buffer: no message or segment
 * handed out, made yet or to be made (a received message holds the view until it
 * makes its own), points into the buffer, which may then be written again. */
static PyObject *py_sole_view(PyObject *self, PyObject *arg) {
    if (!PyMemoryView_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "sole_view() takes a memoryview");
        return NULL;
    }
    PyMemoryViewObject *v = (PyMemoryViewObject *)arg;
    return PyBool_FromLong(Py_REFCNT(arg) == 2 && v->mbuf && v->mbuf->exports == 1 && v->exports == 0);
}

/* ------------------------------------------------------------------ compiled read */
/* A read round's steady state (Connection._on_readable_python -> __on_readable_locked
 * -> SessionConnection.received -> FrameReader.read_messages -> take_messages, then
 * Messenger._deliver), in one C call, as compiled_send is for a send: it reads and
 * writes the very slots the Python path does, so nothing is kept twice.  The steady
 * state: a READY machine that parses MESSAGE frames in the core, with no event
 * waiting, over a plain socket or an ipc:// ring (not TLS), whose reader is between
 * frames with nothing held or handed out.  Anything else, at the start, is left to
 * the Python round (nothing done yet); within a round, what the Python path would
 * call (a frame the core leaves: after_scan(); the end of the stream:
 * connection_lost(); a peer that broke the ipc protocol: _teardown_locked(); a message for
 * the dispatch queue: Messenger._enqueue(); the pump,
 * the ack timer, a pause) it calls; a reply finishes its _Call here (Messenger._reply,
 * _Call.finish).  Only the fast-dispatch callbacks and those run Python code.  Equivalence with the Python round: the whole test suite runs on it,
 * and tests/test_fastpath.py counts the Python calls it leaves. */
enum { RC_LOCK, RC_MACHINE, RC_STREAM, RC_SENDQ, RC_MESSENGER, RC_TIMER, RC_QUEUED, RC_IN_ROUND, RC_LEASED, RC_PAUSED };
enum {
    RM_STATE, RM_SESSION, RM_OUT, RM_UNACKED_IN, RM_ACK_DUE, RM_READER, RM_COMPILED, RM_MESSAGES, RM_EVENTS, RM_NOW,
    RM_LAST_RX, RM_ACK_EVERY, RM_ACK_DELAY, RM_OWNER
};
enum { RS_SENT, RS_IN_SEQ, RS_LOSSLESS };
enum {
    RR_BUF, RR_VIEW, RR_START, RR_END, RR_PHASE, RR_READY, RR_TARGET, RR_PAUSED, RR_FILLED, RR_BUDGET_FRAMES,
    RR_BUDGET_BYTES, RR_TAKEN_FRAMES, RR_TAKEN_BYTES, RR_MAX_SEGMENT, RR_DIRECT, RR_STREAM_PREFETCH, RR_SINK_CLAIMS,
    RR_OPEN_CHARGE
};
static SlotMap rp_conn = {NULL,
                             {"_lock", "_machine", "_stream", "_sendq", "messenger", "_timer", "_queued", "_in_round",
                              "_leased", "_paused"},
                             {0}};
static SlotMap rp_mach = {NULL,
                             {"state", "session", "_out", "_unacked_in", "_ack_due", "reader", "compiled", "messages",
                              "_events", "_now", "_last_rx", "ack_every", "ack_delay", "owner"},
                             {0}};
static SlotMap rp_sess = {NULL, {"sent", "in_seq", "lossless"}, {0}};
enum { RK_INTO, RK_DONE, RK_LATCH, RK_REPLY, RK_ERROR, RK_NOTIFY, RK_CONN };
static SlotMap rp_call = {NULL, {"into", "done", "_latch", "reply", "error", "notify", "conn"}, {0}};
static SlotMap rp_read = {NULL,
                             {"_buf", "_view", "_start", "_end", "_phase", "_ready", "_target", "paused", "_filled",
                              "budget_frames", "budget_bytes", "taken_frames", "taken_bytes", "max_segment", "direct",
                              "stream_prefetch", "sink_claims", "open_charge"},
                             {0}};
static PyObject *rp_closed, *rp_popleft, *rp_track_kept, *rp_remote_err, *rp_python;
/* What a read round and a call read of the Messenger and of the connection's loop, each
 * time: slots of theirs (compiled_messenger), at their offsets; by name before that, or
 * in an object of another type.  (Seven lookups by name cost a call ~0.2 us.) */
enum { MS_CALLS, MS_FAST, MS_CLAIMS, MS_LIMITED, MS_LIMIT_FRAMES, MS_LIMIT_BYTES, MS_TIDS };
static SlotMap ms_msgr = {NULL, {"_calls", "_fast", "_claims", "_limited", "_limit_frames", "_limit_bytes", "_tids"}, {0}};
static SlotMap ms_loop = {NULL, {"_ident"}, {0}};
static PyObject *hot_attr(PyObject *o, SlotMap *map, int i, PyObject *name) {
    if (map->type && PyObject_TypeCheck(o, map->type) && SLOT(o, *map, i)) return Py_NewRef(SLOT(o, *map, i));
    return PyObject_GetAttr(o, name);
}
static PyObject *rs_release, *rs_deliver, *rs_limited, *rs_limit_frames, *rs_limit_bytes, *rs_claims, *rs_calls, *rs_fast, *rs_reply,
    *rs_enqueue, *rs_after_scan, *rs_connection_lost, *rs_teardown, *rs_send_ack, *rs_pump, *rs_arm_timer, *rs_when,
    *rs_renew, *rs_pause, *rs_acked;

/* A slot holding an exact int: its value in *v (0: unset, not an int, or too large). */
static int slot_ssize(PyObject *o, Py_ssize_t *v) {
    if (!o || !PyLong_CheckExact(o)) return 0;
    *v = PyLong_AsSsize_t(o);
    if (*v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* Set a slot to a new int (or float); -1 if it could not be made. */
static int set_ssize(PyObject *o, SlotMap *map, int i, Py_ssize_t v) {
    PyObject *n = PyLong_FromSsize_t(v);
    if (!n) return -1;
    Py_XSETREF(SLOT(o, *map, i), n);
    return 0;
}
static int set_double(PyObject *o, SlotMap *map, int i, double v) {
    PyObject *n = PyFloat_FromDouble(v);
    if (!n) return -1;
    Py_XSETREF(SLOT(o, *map, i), n);
    return 0;
}

static long long throttle_take(ThrottleObject *t, long long need);
static int throttle_give(ThrottleObject *t, long long n);

static PyObject *call1(PyObject *o, PyObject *name, PyObject *arg) {
    return arg ? PyObject_CallMethodOneArg(o, name, arg) : PyObject_CallMethodNoArgs(o, name);
}
static int call_ok(PyObject *o, PyObject *name, PyObject *arg) {
    PyObject *r = call1(o, name, arg);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* Session.acked(ack): what was sent up to ack_seq leaves the replay queue. */
static int session_acked(PyObject *s, PyObject *sent, uint64_t ack) {
    PySequenceMethods *sq = Py_TYPE(sent)->tp_as_sequence;
    while (sq->sq_length(sent) > 0) {
        PyObject *first = sq->sq_item(sent, 0);
        if (!first) return -1;
        int is_out = Py_IS_TYPE(first, &OutMessageType);
        unsigned long long seq = is_out ? ((OutMessageObject *)first)->seq : 0;
        Py_DECREF(first);
        if (!is_out) { /* not a record of ours: the session's own method */
            PyObject *a = PyLong_FromUnsignedLongLong(ack);
            int r = a ? call_ok(s, rs_acked, a) : -1;
            Py_XDECREF(a);
            return r;
        }
        if (seq > ack) break;
        PyObject *r = PyObject_Vectorcall(rp_popleft, &sent, 1, NULL);
        if (!r) return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* _Call.waits_on(conn), for a _Call: a reply on conn may answer it. */
static inline int call_waits_on(PyObject *pending, PyObject *conn) {
    return SLOT(pending, rp_call, RK_CONN) == conn && SLOT(pending, rp_call, RK_DONE) == Py_False;
}

/* Messenger._reply: a reply to a call (a _Call) it may answer finishes it (1); 0: no
 * such call waits for it (it is dispatched as any message). */
static int round_reply(PyObject *conn, PyObject *msgr, PyObject *calls, PyObject *msg, uint64_t tid) {
    PyObject *key = PyLong_FromUnsignedLongLong(tid);
    if (!key) return -1;
    PyObject *pending = PyDict_GetItemWithError(calls, key); /* borrowed */
    Py_DECREF(key);
    if (!pending) return PyErr_Occurred() ? -1 : 0;
    if (Py_TYPE(pending) != rp_call.type) { /* not ours: the Python method */
        PyObject *r = PyObject_CallMethodOneArg(msgr, rs_reply, msg);
        int taken = r ? PyObject_IsTrue(r) : -1;
        Py_XDECREF(r);
        return taken;
    }
    if (!call_waits_on(pending, conn)) return 0;
    Py_INCREF(pending);
    int rc = -1;
    PyObject *into = SLOT(pending, rp_call, RK_INTO);
    if (!into) {
        PyErr_SetString(PyExc_AttributeError, "a _Call without its slots");
        goto done;
    }
    /* a small reply came in the prefetch buffer: one copy into the posted one */
    if (into != Py_None && capi->data_into(msg, into) < 0) goto done;
    /* _Call.finish(reply=msg) */
    Py_XSETREF(SLOT(pending, rp_call, RK_REPLY), Py_NewRef(msg));
    Py_XSETREF(SLOT(pending, rp_call, RK_ERROR), Py_NewRef(Py_None));
    Py_XSETREF(SLOT(pending, rp_call, RK_DONE), Py_NewRef(Py_True));
    PyObject *latch = SLOT(pending, rp_call, RK_LATCH); /* (after done: see _Call) */
    if (latch && latch != Py_None && call_ok(latch, rs_release, NULL) < 0) goto done;
    PyObject *notify = SLOT(pending, rp_call, RK_NOTIFY);
    if (notify && notify != Py_None) {
        PyObject *r = PyObject_CallNoArgs(notify);
        if (!r) goto done;
        Py_DECREF(r);
    }
    rc = 1;
done:
    Py_DECREF(pending);
    return rc;
}

/* Hand a run of received messages out, in order, as Messenger._deliver does. */
static int round_deliver(PyObject *conn, PyObject *msgr, WriterObject *w, PyObject *msgs) {
    w->read_since = 1; /* a send after this answers it: not part of a burst */
    PyObject *calls = hot_attr(msgr, &ms_msgr, MS_CALLS, rs_calls), *fast = hot_attr(msgr, &ms_msgr, MS_FAST, rs_fast);
    int rc = -1;
    if (!calls || !fast || !PyDict_Check(calls) || !PyList_Check(fast)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "Messenger._calls/_fast are not a dict and a list");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(msgs); i++) {
        PyObject *msg = PyList_GET_ITEM(msgs, i);
        uint64_t tid;
        if (capi->reply_tid(msg, &tid) == 1 && PyDict_GET_SIZE(calls)) {
            int taken = round_reply(conn, msgr, calls, msg, tid);
            if (taken < 0) goto done;
            if (taken) continue;
        }
        int handled = 0;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(fast) && !handled; j++) {
            PyObject *pair = PyList_GET_ITEM(fast, j);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_SetString(PyExc_TypeError, "Messenger._fast holds (can, go) pairs");
                goto done;
            }
            Py_INCREF(pair); /* the callbacks may change the list */
            PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(pair, 0), msg);
            int yes = r ? PyObject_IsTrue(r) : -1;
            Py_XDECREF(r);
            if (yes > 0) {
                r = PyObject_CallOneArg(PyTuple_GET_ITEM(pair, 1), msg);
                Py_XDECREF(r);
                if (!r) yes = -1;
                handled = 1;
            }
            Py_DECREF(pair);
            if (yes < 0) goto done;
        }
        if (!handled) {
            PyObject *a[3] = {msgr, conn, msg};
            PyObject *r = PyObject_VectorcallMethod(rs_enqueue, a, 3, NULL);
            if (!r) goto done;
            Py_DECREF(r);
        }
    }
    rc = 0;
done:
    Py_XDECREF(calls);
    Py_XDECREF(fast);
    return rc;
}

static int track_kept(PyObject *msgs) {
    PyObject *r = PyObject_CallOneArg(rp_track_kept, msgs);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* SessionConnection._took: the acks and sequence numbers of what a scan accepted. */
static int round_took(PyObject *m, PyObject *s, PyObject *sent, uint64_t ack, Py_ssize_t accepted, uint64_t in_seq,
                      double now) {
    if (ack && session_acked(s, sent, ack) < 0) return -1;
    if (!accepted) return 0;
    Py_ssize_t un;
    PyObject *seq = PyLong_FromUnsignedLongLong(in_seq);
    if (!seq) return -1;
    Py_XSETREF(SLOT(s, rp_sess, RS_IN_SEQ), seq);
    if (!slot_ssize(SLOT(m, rp_mach, RM_UNACKED_IN), &un) || set_ssize(m, &rp_mach, RM_UNACKED_IN, un + accepted) < 0)
        return -1;
    if (SLOT(m, rp_mach, RM_ACK_DUE) == Py_None) {
        double delay = PyFloat_AsDouble(SLOT(m, rp_mach, RM_ACK_DELAY));
        if (delay == -1.0 && PyErr_Occurred()) return -1;
        if (set_double(m, &rp_mach, RM_ACK_DUE, now + delay) < 0) return -1;
    }
    return 0;
}

/* ---- a direct reply, read to its end by the caller */
static int direct_wait_ms = 5; /* as messenger.FILL_WAIT: how long the stream may stall before the
                                  Python reader takes over (and the caller's deadline is looked at) */
static PyObject *rs_resume_direct, *rs_copied;

/* The frame at buf[start:end] is a reply whose large data segment goes straight into
 * the buffer its call posted (Messenger._sink), and the caller reads a plain socket
 * (a lease): read it to its end here, with the GIL released, in scatter reads (the
 * rest of the data into the posted buffer, the frame's tail and whatever follows into
 * the read buffer), check it and hand it out, as the Python reader and session do
 * (FrameReader._slow, _open_segment, _fill_target; SessionConnection._on_frame).
 * 0: not such a frame (or not all of its head here yet), nothing done; 1: done, the
 * reader's start and end moved past it; 2: the read stopped short of the frame's end
 * (the stream stalled, or ended: *eof), or what came fails a check: the reader is put
 * where the Python reader would be had it read the same bytes (_resume_direct), and
 * after_scan() goes on from there with its precise errors; -1 with an error. */
static int direct_reply(PyObject *conn, PyObject *m, PyObject *s, PyObject *sent, PyObject *reader, PyObject *msgr,
                        WriterObject *w, int fd, PyObject *buf, PyObject *view, Py_ssize_t start, Py_ssize_t end,
                        Py_ssize_t maxseg, Py_ssize_t direct, Py_ssize_t lf, Py_ssize_t lb, Py_ssize_t tf,
                        Py_ssize_t tb, int lossless, uint64_t in_seq, PyObject *calls, double now, int *eof) {
    Py_ssize_t size = PyByteArray_GET_SIZE(buf);
    uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(buf);
    const uint8_t *p = b + start;
    if (!PyDict_Check(calls) || end - start < PREAMBLE_SIZE) return 0;
    if (p[0] != TAG_MESSAGE || p[1] != 3 || (get16(p + 2) & ~FLAG_NO_DATA_CRC) || get32(p + 22) || get16(p + 26) ||
        crc32c_update(0, p, 28) != get32(p + 28))
        return 0;
    Py_ssize_t hl = get32(p + 4), fl = get32(p + 10), dl = get32(p + 16);
    if (hl != MSG_HEADER_SIZE || fl >= direct || dl < direct || dl > maxseg) return 0;
    Py_ssize_t hoff = start + PREAMBLE_SIZE, foff = hoff + hl + 4, doff = foff + fl + 4;
    if (doff > end) return 0; /* the header and front are not all here */
    uint32_t chain = crc32c_update(get32(p + 28), b + hoff, (size_t)hl);
    if (chain != get32(b + hoff + hl)) return 0;
    chain = crc32c_update(chain, b + foff, (size_t)fl);
    if (chain != get32(b + foff + fl)) return 0;
    const uint8_t *h = b + hoff;
    uint64_t tid = get64(h + 4), seq = get64(h + 12), ack = get64(h + 20);
    if (!(h[3] & MSG_FLAG_REPLY) || (lossless ? seq != in_seq + 1 : seq <= in_seq)) return 0; /* (a gap, a replay) */
    Py_ssize_t body = fl + dl, k0 = end - doff < dl ? end - doff : dl, tpos = doff + k0;
    if (lf == 0 || (lb >= 0 && body > lb) || size - tpos < 8) return 0; /* (a budget: the Python reader holds it) */
    PyObject *key = PyLong_FromUnsignedLongLong(tid);
    if (!key) return -1;
    PyObject *pending = PyDict_GetItemWithError(calls, key); /* borrowed */
    Py_DECREF(key);
    if (!pending) return PyErr_Occurred() ? -1 : 0;
    if (Py_TYPE(pending) != rp_call.type || !call_waits_on(pending, conn)) return 0;
    PyObject *into = SLOT(pending, rp_call, RK_INTO);
    if (!into || !PyMemoryView_Check(into)) return 0;
    Py_buffer *ib = PyMemoryView_GET_BUFFER(into);
    if (ib->readonly || ib->len < dl || ib->itemsize != 1 || !PyBuffer_IsContiguous(ib, 'C')) return 0;

    /* It is ours.  FrameReader._fits: charged to the budgets; _fill_target: what the read
     * buffer holds of the data is copied over. */
    int data_crc = !(get16(p + 2) & FLAG_NO_DATA_CRC), rc = -1;
    if (set_ssize(reader, &rp_read, RR_TAKEN_FRAMES, tf + 1) < 0 ||
        set_ssize(reader, &rp_read, RR_TAKEN_BYTES, tb + body) < 0)
        return -1;
    PyObject *held[2] = {Py_NewRef(pending), Py_NewRef(into)}, *msgs = NULL, *target = NULL;
    uint8_t *data = ib->buf;
    memcpy(data, b + doff, (size_t)k0);
    Py_ssize_t have = k0, after = end - tpos; /* after: bytes past the data in the read buffer */
    int ended = 0;
    uint32_t crc = chain;
    int64_t gap = 0; /* when the stream stopped coming (0: it comes) */
    Py_BEGIN_ALLOW_THREADS
    /* the data's crc as it lands (still in cache, and while the rest is on its way) */
    if (data_crc) crc = crc32c_update(crc, data, (size_t)have);
    while (have < dl || after < 8) {
        struct iovec iov[2];
        int n = 0;
        if (have < dl) iov[n++] = (struct iovec){data + have, (size_t)(dl - have)};
        iov[n++] = (struct iovec){b + tpos + after, (size_t)(size - tpos - after)};
        struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t k = recvmsg(fd, &mh, MSG_DONTWAIT);
        if (k > 0) {
            gap = 0;
            Py_ssize_t a = k < dl - have ? (Py_ssize_t)k : dl - have;
            if (data_crc) crc = crc32c_update(crc, data + have, (size_t)a);
            have += a;
            after += (Py_ssize_t)k - a;
            continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) { /* the end, or a broken connection */
            ended = 1;
            break;
        }
        if (look_again(&gap)) continue;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int r = poll(&pfd, 1, direct_wait_ms);
        if (r == 0 || (r < 0 && errno != EINTR)) break; /* stalled */
    }
    Py_END_ALLOW_THREADS
    { /* FrameReader.copied += k0 */
        PyObject *kk = PyLong_FromSsize_t(k0), *cv = PyObject_GetAttr(reader, rs_copied), *sum = NULL;
        if (kk && cv) sum = PyNumber_Add(cv, kk);
        int bad = !sum || PyObject_SetAttr(reader, rs_copied, sum) < 0;
        Py_XDECREF(kk);
        Py_XDECREF(cv);
        Py_XDECREF(sum);
        if (bad) goto done;
    }
    int whole = have == dl && after >= 8;
    if (whole && (!data_crc || crc == get32(b + tpos)) && (get32(b + tpos + 4) ^ crc) == LATE_COMPLETE) {
        /* SessionConnection._on_frame: a message in sequence; Messenger._deliver */
        PyObject *front = slice_view(view, foff, foff + fl), *dv = front ? PySequence_GetSlice(into, 0, dl) : NULL;
        PyObject *msg = dv ? capi->received(get16(h), front, dv, tid, h[2], seq, 1, conn) : NULL;
        Py_XDECREF(front);
        Py_XDECREF(dv);
        if (!msg) goto done;
        msgs = PyList_New(1);
        if (!msgs) {
            Py_DECREF(msg);
            goto done;
        }
        PyList_SET_ITEM(msgs, 0, msg);
        if (set_ssize(reader, &rp_read, RR_START, tpos + 8) < 0 || set_ssize(reader, &rp_read, RR_END, tpos + after) < 0 ||
            round_took(m, s, sent, ack, 1, seq, now) < 0)
            goto done;
        Py_XSETREF(SLOT(reader, rp_read, RR_FILLED), Py_NewRef(tpos + after == size ? Py_True : Py_False));
        int d = round_deliver(conn, msgr, w, msgs), t = track_kept(msgs);
        if (d < 0 || t < 0) goto done;
        rc = 1;
        goto done;
    }
    /* Short of the end, or a check fails: where the Python reader would be. */
    *eof = ended && !whole;
    if (set_ssize(reader, &rp_read, RR_START, tpos) < 0 || set_ssize(reader, &rp_read, RR_END, tpos + after) < 0)
        goto done;
    Py_XSETREF(SLOT(reader, rp_read, RR_FILLED), Py_NewRef(tpos + after == size ? Py_True : Py_False));
    {
        PyObject *a[8] = {reader, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
        a[1] = slice_view(view, start, start + PREAMBLE_SIZE);
        a[2] = slice_view(view, hoff, hoff + hl);
        a[3] = slice_view(view, foff, foff + fl);
        a[4] = target = PySequence_GetSlice(into, 0, dl);
        a[5] = PyLong_FromSsize_t(have);
        a[6] = data_crc ? PyLong_FromUnsignedLong(crc) : Py_NewRef(Py_None);
        a[7] = PyLong_FromUnsignedLong(chain);
        PyObject *r = NULL;
        if (a[1] && a[2] && a[3] && a[4] && a[5] && a[6] && a[7])
            r = PyObject_VectorcallMethod(rs_resume_direct, a, 8, NULL);
        for (int i = 1; i < 8; i++)
            if (i != 4) Py_XDECREF(a[i]);
        if (!r) goto done;
        Py_DECREF(r);
    }
    rc = 2;
done:
    Py_XDECREF(msgs);
    Py_XDECREF(target);
    Py_DECREF(held[0]);
    Py_DECREF(held[1]);
    return rc;
}

#define ROUND_MAX_READS 64 /* bounded: other connections on this loop get their turn */

/* 1: the round is done; 0: not the steady state, nothing done (the Python round runs);
 * -1 with an error (as the Python round raises, after it settled the throttles). */
static int read_round(PyObject *conn, Py_ssize_t fill) {
    if (Py_TYPE(conn) != rp_conn.type) return 0;
    PyObject *m = SLOT(conn, rp_conn, RC_MACHINE), *st = SLOT(conn, rp_conn, RC_STREAM);
    PyObject *wo = SLOT(conn, rp_conn, RC_SENDQ), *msgr = SLOT(conn, rp_conn, RC_MESSENGER);
    if (!m || !Py_IS_TYPE(m, rp_mach.type) || !st || st == Py_None || !wo || !Py_IS_TYPE(wo, &WriterType) || !msgr)
        return 0;
    if (SLOT(m, rp_mach, RM_STATE) != sp_ready || SLOT(m, rp_mach, RM_COMPILED) != Py_True ||
        SLOT(m, rp_mach, RM_MESSAGES) != Py_True || SLOT(m, rp_mach, RM_OWNER) != conn)
        return 0;
    PyObject *events = SLOT(m, rp_mach, RM_EVENTS), *s = SLOT(m, rp_mach, RM_SESSION);
    PyObject *reader = SLOT(m, rp_mach, RM_READER);
    if (!events || !PyList_CheckExact(events) || PyList_GET_SIZE(events) || !s || !Py_IS_TYPE(s, rp_sess.type) ||
        !reader || !Py_IS_TYPE(reader, rp_read.type))
        return 0;
    PyObject *sent = SLOT(s, rp_sess, RS_SENT), *lossless = SLOT(s, rp_sess, RS_LOSSLESS);
    if (!sent || !Py_IS_TYPE(sent, sp_deque) || !lossless || !PyBool_Check(lossless)) return 0;
    Py_ssize_t phase, x;
    PyObject *ready = SLOT(reader, rp_read, RR_READY);
    if (!slot_ssize(SLOT(reader, rp_read, RR_PHASE), &phase) || phase != 0 ||
        SLOT(reader, rp_read, RR_PAUSED) != Py_False || SLOT(reader, rp_read, RR_TARGET) != Py_None || !ready ||
        !PyList_CheckExact(ready) || PyList_GET_SIZE(ready) ||
        !slot_ssize(SLOT(reader, rp_read, RR_TAKEN_FRAMES), &x) || !slot_ssize(SLOT(reader, rp_read, RR_TAKEN_BYTES), &x))
        return 0;
    PyObject *chan = ((WriterObject *)wo)->chan;
    int fd = ((WriterObject *)wo)->fd;
    if (!chan && fd < 0) return 0; /* TLS: the stream reads itself */
    if (chan) fill = 0;
    int caller = fill > 0; /* a caller reads a plain socket (a lease): it may wait for a direct reply */
    if (fill <= 0) fill = PY_SSIZE_T_MAX;

    /* The round.  Held until the end: what the callbacks may drop from the slots. */
    PyObject *held[5] = {Py_NewRef(m), Py_NewRef(st), Py_NewRef(wo), Py_NewRef(reader), Py_NewRef(s)};
    PyObject *limit_frames = NULL, *limit_bytes = NULL, *before = NULL, *msgs = NULL, *now_o = NULL;
    long long frames_granted = -1, room[8];
    Py_ssize_t nbytes_t = 0;
    int rc = -1, settle_reads = 1, limited = 0, granted = 0;
    WriterObject *w = (WriterObject *)wo;

    PyObject *lim = hot_attr(msgr, &ms_msgr, MS_LIMITED, rs_limited), *claims = hot_attr(msgr, &ms_msgr, MS_CLAIMS, rs_claims);
    if (!lim || !claims) {
        Py_XDECREF(lim);
        Py_XDECREF(claims);
        goto out;
    }
    limited = lim == Py_True;
    Py_DECREF(lim);
    Py_XSETREF(SLOT(reader, rp_read, RR_SINK_CLAIMS), claims); /* (what the sink may want this round) */
    if (limited) { /* Messenger._grant */
        if (!(limit_frames = hot_attr(msgr, &ms_msgr, MS_LIMIT_FRAMES, rs_limit_frames)) ||
            !(limit_bytes = hot_attr(msgr, &ms_msgr, MS_LIMIT_BYTES, rs_limit_bytes)))
            goto out;
        if (!PyList_Check(limit_bytes) || PyList_GET_SIZE(limit_bytes) > 8 ||
            (limit_frames != Py_None && !Py_IS_TYPE(limit_frames, &ThrottleType))) {
            PyErr_SetString(PyExc_TypeError, "Messenger's throttles are not Throttles");
            goto out;
        }
        nbytes_t = PyList_GET_SIZE(limit_bytes);
        for (Py_ssize_t i = 0; i < nbytes_t; i++)
            if (!Py_IS_TYPE(PyList_GET_ITEM(limit_bytes, i), &ThrottleType)) {
                PyErr_SetString(PyExc_TypeError, "Messenger's throttles are not Throttles");
                goto out;
            }
        Py_ssize_t tf = 0, tb = 0;
        slot_ssize(SLOT(reader, rp_read, RR_TAKEN_FRAMES), &tf);
        slot_ssize(SLOT(reader, rp_read, RR_TAKEN_BYTES), &tb);
        if (limit_frames != Py_None) frames_granted = throttle_take((ThrottleObject *)limit_frames, 1);
        long long least = -1;
        for (Py_ssize_t i = 0; i < nbytes_t; i++) {
            room[i] = throttle_take((ThrottleObject *)PyList_GET_ITEM(limit_bytes, i), 0);
            if (least < 0 || room[i] < least) least = room[i];
        }
        granted = 1; /* (from here on, the finally gives back what is not kept) */
        before = Py_XNewRef(SLOT(reader, rp_read, RR_OPEN_CHARGE));
        if (set_ssize(reader, &rp_read, RR_BUDGET_FRAMES, frames_granted < 0 ? -1 : tf + (Py_ssize_t)frames_granted) < 0 ||
            set_ssize(reader, &rp_read, RR_BUDGET_BYTES, nbytes_t ? tb + (Py_ssize_t)least : -1) < 0)
            goto out;
        PyObject *q = SLOT(conn, rp_conn, RC_QUEUED);
        if (q && PyList_CheckExact(q) && PyList_GET_SIZE(q) == 2) {
            Py_SETREF(PyList_GET_ITEM(q, 0), Py_NewRef(sp_zero)); /* (ints: no code runs) */
            Py_SETREF(PyList_GET_ITEM(q, 1), Py_NewRef(sp_zero));
        } else {
            PyObject *nq = Py_BuildValue("[ii]", 0, 0);
            if (!nq) goto out;
            Py_XSETREF(SLOT(conn, rp_conn, RC_QUEUED), nq);
        }
    }
    Py_XSETREF(SLOT(conn, rp_conn, RC_IN_ROUND), Py_NewRef(Py_True));
    double now = (double)mono_ns() / 1e9;
    if (!(now_o = PyFloat_FromDouble(now))) goto out;
    for (int reads = 0; reads < ROUND_MAX_READS; reads++) {
        /* next_read(): a full buffer, or one drained past half that nothing points into,
         * is renewed (by the reader's own _renew) */
        PyObject *buf = SLOT(reader, rp_read, RR_BUF), *view = SLOT(reader, rp_read, RR_VIEW);
        Py_ssize_t start, end, size;
        if (!buf || !PyByteArray_CheckExact(buf) || !view || !PyMemoryView_Check(view) ||
            !slot_ssize(SLOT(reader, rp_read, RR_START), &start) || !slot_ssize(SLOT(reader, rp_read, RR_END), &end)) {
            PyErr_SetString(PyExc_TypeError, "FrameReader's buffer slots changed type");
            goto out;
        }
        size = PyByteArray_GET_SIZE(buf);
        PyMemoryViewObject *mv = (PyMemoryViewObject *)view;
        if (end == size || (start == end && end > size / 2 && Py_REFCNT(view) == 1 && mv->mbuf &&
                            mv->mbuf->exports == 1 && mv->exports == 0)) {
            if (call_ok(reader, rs_renew, NULL) < 0) goto out;
            buf = SLOT(reader, rp_read, RR_BUF);
            view = SLOT(reader, rp_read, RR_VIEW);
            if (!buf || !PyByteArray_CheckExact(buf) || !view ||
                !slot_ssize(SLOT(reader, rp_read, RR_START), &start) ||
                !slot_ssize(SLOT(reader, rp_read, RR_END), &end)) {
                PyErr_SetString(PyExc_TypeError, "FrameReader's buffer slots changed type");
                goto out;
            }
            size = PyByteArray_GET_SIZE(buf);
        }
        Py_ssize_t want = size - end;
        if (want > fill) want = fill;
        uint8_t *dst = (uint8_t *)PyByteArray_AS_STRING(buf) + end;
        Py_ssize_t k;
        if (chan) {
            Py_INCREF(buf); /* (a large copy runs without the GIL) */
            k = capi->ipc_recv(chan, dst, want);
            Py_DECREF(buf);
            if (k == -2) break; /* empty (armed) */
            if (k == -1) {
                if (PyErr_ExceptionMatches(rp_remote_err)) { /* ipc: a bad ring index */
                    PyObject *et, *ev, *tb;
                    PyErr_Fetch(&et, &ev, &tb);
                    PyErr_NormalizeException(&et, &ev, &tb);
                    Py_XDECREF(et);
                    Py_XDECREF(tb);
                    int r = call_ok(conn, rs_teardown, ev ? ev : Py_None);
                    Py_XDECREF(ev);
                    if (r < 0) goto out;
                    settle_reads = 0;
                    goto settled;
                }
                if (!PyErr_ExceptionMatches(PyExc_OSError)) goto out;
                PyErr_Clear();
                k = 0;
            }
        } else {
            do {
                k = recv(fd, dst, (size_t)want, MSG_DONTWAIT);
            } while (k < 0 && errno == EINTR && !PyErr_CheckSignals());
            if (k < 0 && PyErr_Occurred()) goto out;
            if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            if (k < 0) k = 0; /* the connection is gone: as the end of the stream */
        }
        if (k == 0) {
            if (call_ok(m, rs_connection_lost, NULL) < 0) goto out;
            break;
        }
        /* received(k, now) */
        end += k;
        if (set_ssize(reader, &rp_read, RR_END, end) < 0) goto out;
        Py_XSETREF(SLOT(reader, rp_read, RR_FILLED), Py_NewRef(end == size ? Py_True : Py_False));
        Py_XSETREF(SLOT(m, rp_mach, RM_NOW), Py_NewRef(now_o));
        Py_XSETREF(SLOT(m, rp_mach, RM_LAST_RX), Py_NewRef(now_o));
    rescan:;
        Py_ssize_t bf, bb, tf, tb, maxseg, direct, sprefetch, in_seq_v;
        if (!slot_ssize(SLOT(reader, rp_read, RR_BUDGET_FRAMES), &bf) ||
            !slot_ssize(SLOT(reader, rp_read, RR_BUDGET_BYTES), &bb) ||
            !slot_ssize(SLOT(reader, rp_read, RR_TAKEN_FRAMES), &tf) ||
            !slot_ssize(SLOT(reader, rp_read, RR_TAKEN_BYTES), &tb) ||
            !slot_ssize(SLOT(reader, rp_read, RR_MAX_SEGMENT), &maxseg) ||
            !slot_ssize(SLOT(reader, rp_read, RR_DIRECT), &direct) ||
            !slot_ssize(SLOT(reader, rp_read, RR_STREAM_PREFETCH), &sprefetch) ||
            !slot_ssize(SLOT(s, rp_sess, RS_IN_SEQ), &in_seq_v) ||
            !slot_ssize(SLOT(reader, rp_read, RR_START), &start) || !slot_ssize(SLOT(reader, rp_read, RR_END), &end)) {
            PyErr_SetString(PyExc_TypeError, "a reader or session slot changed type");
            goto out;
        }
        /* FrameReader._left(): what the budgets still allow */
        Py_ssize_t lf = bf < 0 ? -1 : (bf - tf > 0 ? bf - tf : 0), lb = bb < 0 ? -1 : (bb - tb > 0 ? bb - tb : 0);
        PyObject *cl = SLOT(reader, rp_read, RR_SINK_CLAIMS), *calls = Py_None;
        int hooks = 1;
        if (cl && PyTuple_Check(cl) && PyTuple_GET_SIZE(cl) == 2 && PyDict_Check(PyTuple_GET_ITEM(cl, 0))) {
            calls = PyTuple_GET_ITEM(cl, 0);
            if ((hooks = PyObject_IsTrue(PyTuple_GET_ITEM(cl, 1))) < 0) goto out;
        }
        if (!(msgs = PyList_New(0))) goto out;
        ScanResult r;
        if (scan_messages(view, (const uint8_t *)PyByteArray_AS_STRING(buf), start, end, maxseg, direct, lf, lb,
                          lossless == Py_True, (uint64_t)in_seq_v, conn, msgs, calls, hooks, sprefetch / 2, &r) < 0)
            goto out;
        if (set_ssize(reader, &rp_read, RR_START, r.pos) < 0 ||
            set_ssize(reader, &rp_read, RR_TAKEN_FRAMES, tf + r.frames) < 0 ||
            set_ssize(reader, &rp_read, RR_TAKEN_BYTES, tb + r.bytes) < 0)
            goto out;
        if (round_took(m, s, sent, r.ack, r.accepted, r.in_seq, now) < 0) goto out;
        if (PyList_GET_SIZE(msgs)) { /* delivered read by read: fewer of them alive at once */
            int d = round_deliver(conn, msgr, w, msgs);
            int t = track_kept(msgs);
            if (d < 0 || t < 0) goto out;
        }
        Py_CLEAR(msgs);
        int eof = 0;
        if (r.stop == SCAN_SLOW && caller && SLOT(conn, rp_conn, RC_MACHINE) == m &&
            SLOT(m, rp_mach, RM_STATE) == sp_ready) {
            /* a reply read straight into its call's buffer: to its end, here (what the
             * callbacks above left of the reader and session: from their slots) */
            Py_ssize_t tf2, tb2, seq2, start2, end2;
            if (!slot_ssize(SLOT(reader, rp_read, RR_TAKEN_FRAMES), &tf2) ||
                !slot_ssize(SLOT(reader, rp_read, RR_TAKEN_BYTES), &tb2) ||
                !slot_ssize(SLOT(s, rp_sess, RS_IN_SEQ), &seq2) || !slot_ssize(SLOT(reader, rp_read, RR_START), &start2) ||
                !slot_ssize(SLOT(reader, rp_read, RR_END), &end2) || SLOT(reader, rp_read, RR_BUF) != buf) {
                PyErr_SetString(PyExc_TypeError, "a reader or session slot changed type");
                goto out;
            }
            int d = direct_reply(conn, m, s, sent, reader, msgr, w, fd, buf, view, start2, end2, maxseg, direct,
                                 lf < 0 ? -1 : lf - r.frames, lb < 0 ? -1 : lb - r.bytes, tf2, tb2,
                                 lossless == Py_True, (uint64_t)seq2, calls, now, &eof);
            if (d < 0) goto out;
            if (d == 1) {
                if (SLOT(conn, rp_conn, RC_MACHINE) != m || SLOT(m, rp_mach, RM_STATE) == rp_closed) break;
                k = 0; /* (the socket is as good as drained: no more reads this round) */
                goto rescan; /* what followed the frame is in the read buffer */
            }
        }
        if (r.stop == SCAN_SLOW && SLOT(conn, rp_conn, RC_MACHINE) == m) {
            /* a frame the core leaves to the Python reader and session (not scanned again) */
            if (!(msgs = PyObject_CallMethodNoArgs(m, rs_after_scan))) goto out;
            if (PyList_Check(msgs) && PyList_GET_SIZE(msgs)) {
                PyObject *da[3] = {msgr, conn, msgs};
                PyObject *dr = PyObject_VectorcallMethod(rs_deliver, da, 3, NULL);
                int t2 = track_kept(msgs);
                Py_XDECREF(dr);
                if (!dr || t2 < 0) goto out;
            }
            Py_CLEAR(msgs);
            if (eof && SLOT(conn, rp_conn, RC_MACHINE) == m && SLOT(m, rp_mach, RM_STATE) != rp_closed &&
                call_ok(m, rs_connection_lost, NULL) < 0)
                goto out;
            break; /* the reader may be elsewhere than between frames now: the next round sees */
        }
        if (SLOT(conn, rp_conn, RC_MACHINE) != m || SLOT(m, rp_mach, RM_STATE) == rp_closed) break;
        if (k < want) break; /* a short read: drained (saves the EAGAIN round) */
    }
    if (settle_reads) { /* SessionConnection.settle_reads, and what the owner does with it */
        Py_ssize_t un, every;
        if (slot_ssize(SLOT(m, rp_mach, RM_UNACKED_IN), &un) && slot_ssize(SLOT(m, rp_mach, RM_ACK_EVERY), &every) &&
            un >= every && call_ok(m, rs_send_ack, NULL) < 0)
            goto out;
        PyObject *ev = SLOT(m, rp_mach, RM_EVENTS), *o = SLOT(m, rp_mach, RM_OUT);
        if ((ev && (!PyList_Check(ev) || PyList_GET_SIZE(ev))) || (o && (!PyList_Check(o) || PyList_GET_SIZE(o))) ||
            SLOT(m, rp_mach, RM_STATE) != sp_ready) {
            if (call_ok(conn, rs_pump, NULL) < 0) goto out;
        } else {
            PyObject *due = SLOT(m, rp_mach, RM_ACK_DUE);
            int owed = due && due != Py_None ? PyObject_IsTrue(due) : 0;
            if (owed < 0) goto out;
            if (owed) {
                PyObject *timer = SLOT(conn, rp_conn, RC_TIMER);
                int arm = !timer || timer == Py_None;
                if (!arm) {
                    PyObject *when = PyObject_GetAttr(timer, rs_when);
                    if (!when) goto out;
                    arm = PyObject_RichCompareBool(due, when, Py_LT);
                    Py_DECREF(when);
                    if (arm < 0) goto out;
                }
                if (arm && call_ok(conn, rs_arm_timer, due) < 0) goto out;
            }
        }
    }
settled:
    rc = 1;
out:
    Py_XDECREF(msgs);
    Py_XDECREF(now_o);
    { /* the finally: what the round did not queue goes back, except a frame still being read */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        Py_XSETREF(SLOT(conn, rp_conn, RC_IN_ROUND), Py_NewRef(Py_False));
        if (granted) {
            Py_ssize_t kept_msgs = 0, kept_bytes = 0, v;
            PyObject *q = SLOT(conn, rp_conn, RC_QUEUED), *left = SLOT(reader, rp_read, RR_OPEN_CHARGE);
            if (q && PyList_Check(q) && PyList_GET_SIZE(q) == 2) {
                if (slot_ssize(PyList_GET_ITEM(q, 0), &v)) kept_msgs += v;
                if (slot_ssize(PyList_GET_ITEM(q, 1), &v)) kept_bytes += v;
            }
            if (SLOT(m, rp_mach, RM_STATE) != rp_closed && left && PyTuple_Check(left) && PyTuple_GET_SIZE(left) == 2) {
                if (slot_ssize(PyTuple_GET_ITEM(left, 0), &v)) kept_msgs += v;
                if (slot_ssize(PyTuple_GET_ITEM(left, 1), &v)) kept_bytes += v;
            }
            if (before && PyTuple_Check(before) && PyTuple_GET_SIZE(before) == 2) {
                if (slot_ssize(PyTuple_GET_ITEM(before, 0), &v)) kept_msgs -= v;
                if (slot_ssize(PyTuple_GET_ITEM(before, 1), &v)) kept_bytes -= v;
            }
            int bad = 0;
            if (limit_frames && limit_frames != Py_None)
                bad |= throttle_give((ThrottleObject *)limit_frames, frames_granted - kept_msgs) < 0;
            for (Py_ssize_t i = 0; i < nbytes_t; i++)
                bad |= throttle_give((ThrottleObject *)PyList_GET_ITEM(limit_bytes, i), room[i] - kept_bytes) < 0;
            if (bad && !et) {
                rc = -1;
                PyErr_Fetch(&et, &ev, &tb);
            } else if (bad) {
                PyErr_Clear();
            }
        }
        if (et) {
            PyErr_Restore(et, ev, tb);
            rc = -1;
        }
    }
    if (rc == 1 && limited && SLOT(conn, rp_conn, RC_MACHINE) == m && SLOT(conn, rp_conn, RC_STREAM) == st &&
        SLOT(reader, rp_read, RR_PAUSED) == Py_True && SLOT(conn, rp_conn, RC_PAUSED) == Py_False &&
        call_ok(conn, rs_pause, st) < 0)
        rc = -1;
    Py_XDECREF(before);
    Py_XDECREF(limit_frames);
    Py_XDECREF(limit_bytes);
    for (int i = 0; i < 5; i++) Py_DECREF(held[i]);
    return rc;
}

/* read_round(conn, fill=0) -> bool: the round, compiled (True), or False (not the steady
 * state: nothing done, run the Python round).  The caller holds the connection's lock. */
static PyObject *py_read_round(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) return PyErr_Format(PyExc_TypeError, "read_round(conn, fill=0)");
    if (!rp_conn.type) return PyErr_Format(PyExc_RuntimeError, "compiled_read() was not called");
    Py_ssize_t fill = 0;
    if (nargs == 2 && (fill = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) return NULL;
    int r = read_round(args[0], fill);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

/* Connection._on_readable, compiled: the loop's round under the connection's lock; a
 * leased connection (a caller reads it), or any state but the steady one, goes to
 * Connection._on_readable_python. */
static PyObject *conn_on_readable(PyObject *conn, PyObject *unused) {
    if (Py_TYPE(conn) != rp_conn.type) goto python;
    PyObject *lk = SLOT(conn, rp_conn, RC_LOCK);
    if (!lk || !Py_IS_TYPE(lk, &LockType)) goto python;
    LockObject *lock = (LockObject *)Py_NewRef(lk);
    if (lock_take(lock, -1) < 0) {
        Py_DECREF(lock);
        return NULL;
    }
    int r = SLOT(conn, rp_conn, RC_LEASED) == Py_False ? read_round(conn, 0) : 0;
    lock_give(lock);
    Py_DECREF(lock);
    if (r < 0) return NULL;
    if (r) Py_RETURN_NONE;
python:
    return PyObject_CallMethodNoArgs(conn, rp_python);
}

static PyMethodDef conn_on_readable_def = {
    "_on_readable", (PyCFunction)conn_on_readable, METH_NOARGS,
    "The I/O loop's read round for this connection, compiled (see read_round); anything but the steady state in "
    "Connection._on_readable_python."};

#define INTERN(var, s)                                                                                                 \
    if (!var && !(var = PyUnicode_InternFromString(s))) return NULL

/* compiled_read(Connection, SessionConnection, Session, FrameReader, _Call, State.READY,
 *               State.CLOSED, RemoteProtocolError, _core._track_kept)
 *     -> Connection._on_readable, compiled (read_round(conn, fill) is the round itself). */
static PyObject *py_compiled_read(PyObject *self, PyObject *args) {
    PyObject *conn_t, *mach_t, *sess_t, *read_t, *call_t, *ready, *closed, *remote, *track;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO:compiled_read", &conn_t, &mach_t, &sess_t, &read_t, &call_t, &ready, &closed,
                          &remote, &track))
        return NULL;
    if (!sp_deque || !sp_ready || !sp_zero)
        return PyErr_Format(PyExc_RuntimeError, "compiled_read() comes after compiled_send()");
    if (ready != sp_ready) return PyErr_Format(PyExc_ValueError, "compiled_read() and compiled_send() disagree on READY");
    if (slotmap_resolve(&rp_conn, conn_t) < 0 || slotmap_resolve(&rp_mach, mach_t) < 0 ||
        slotmap_resolve(&rp_sess, sess_t) < 0 || slotmap_resolve(&rp_read, read_t) < 0 ||
        slotmap_resolve(&rp_call, call_t) < 0)
        return NULL;
    if (!rp_popleft && !(rp_popleft = PyObject_GetAttrString((PyObject *)sp_deque, "popleft"))) return NULL;
    Py_XSETREF(rp_closed, Py_NewRef(closed));
    Py_XSETREF(rp_remote_err, Py_NewRef(remote));
    Py_XSETREF(rp_track_kept, Py_NewRef(track));
    INTERN(rp_python, "_on_readable_python");
    INTERN(rs_limited, "_limited");
    INTERN(rs_limit_frames, "_limit_frames");
    INTERN(rs_limit_bytes, "_limit_bytes");
    INTERN(rs_claims, "_claims");
    INTERN(rs_calls, "_calls");
    INTERN(rs_fast, "_fast");
    INTERN(rs_reply, "_reply");
    INTERN(rs_enqueue, "_enqueue");
    INTERN(rs_deliver, "_deliver");
    INTERN(rs_release, "release");
    INTERN(rs_after_scan, "after_scan");
    INTERN(rs_connection_lost, "connection_lost");
    INTERN(rs_teardown, "_teardown_locked");
    INTERN(rs_send_ack, "send_ack");
    INTERN(rs_pump, "_pump");
    INTERN(rs_arm_timer, "_arm_timer");
    INTERN(rs_when, "when");
    INTERN(rs_renew, "_renew");
    INTERN(rs_pause, "_pause");
    INTERN(rs_acked, "acked");
    INTERN(rs_resume_direct, "_resume_direct");
    INTERN(rs_copied, "copied");
    return PyDescr_NewMethod((PyTypeObject *)conn_t, &conn_on_readable_def);
}

/* ------------------------------------------------------------------ compiled call */
/* Connection.call for a caller that reads its own reply (Connection._call_python:
 * _post_call, _lease, send, _read_until, _unlease, _await_call), in one C call, over
 * an ipc:// stream or a plain socket: the call is posted as a _Call in
 * Messenger._calls, the stream leased from its loop (ipc: the channel's take(); a
 * socket: the loop's detach()), the request sent (conn_send), the reply read by this
 * thread (ipc: before_wait() spins first; then the socket is polled with the GIL
 * released; each round is read_round() under the connection's lock, or the Python
 * round where that declines), and the stream given back.  What it reads and writes is
 * the Python path's own slots.  Anything but that case at the start (called on the
 * loop's thread, a TLS stream, a connection that is not READY, leased or paused, an
 * unusual argument) runs _call_python, which decides it as before; a call whose reply
 * did not come while the stream was leased (a new transport, a throttle, the
 * deadline) waits in _await_call, as the Python path does. */
enum { CC_CLOSED, CC_LOCK, CC_MACHINE, CC_STREAM, CC_SENDQ, CC_MESSENGER, CC_LOOP, CC_LEASED, CC_PAUSED, CC_LEASE_OFF };
static SlotMap cc_conn = {NULL,
                             {"_closed", "_lock", "_machine", "_stream", "_sendq", "messenger", "loop", "_leased",
                              "_paused", "_lease_off"},
                             {0}};
static PyTypeObject *cc_stream; /* transports.Stream: a plain socket (not TLS, not ipc) */
static Py_ssize_t cc_fill_head, cc_fill_min;
static PyObject *cc_python, *cc_await, *cc_ident, *cc_tids, *cc_tid, *cc_cast, *cc_B,
    *cc_round, *cc_detach, *cc_attach, *cc_call_soon, *cc_on_readable;

/* Connection._unlease: the loop reads the stream again (chan: an ipc stream's channel;
 * NULL, a plain socket, which the lease took off the loop). */
static int cc_unlease(PyObject *conn, LockObject *lock, PyObject *st, PyObject *chan) {
    if (lock_take(lock, -1) < 0) return -1;
    Py_XSETREF(SLOT(conn, cc_conn, CC_LEASED), Py_NewRef(Py_False));
    int off = SLOT(conn, cc_conn, CC_LEASE_OFF) == Py_True || !chan; /* (a socket is off its loop) */
    Py_XSETREF(SLOT(conn, cc_conn, CC_LEASE_OFF), Py_NewRef(Py_False));
    int came = chan ? capi->ipc_give_back(chan, off) : 0, rc = came < 0 ? -1 : 0;
    if (rc == 0 && SLOT(conn, cc_conn, CC_STREAM) == st) {
        PyObject *loop = Py_XNewRef(SLOT(conn, cc_conn, CC_LOOP)), *r = Py_None;
        int paused = SLOT(conn, cc_conn, CC_PAUSED) == Py_True;
        if (!loop) {
            PyErr_SetString(PyExc_AttributeError, "Connection.loop");
            r = NULL;
        } else if (!off && paused) { /* a throttle filled while we read: off until it frees */
            r = PyObject_CallMethodOneArg(loop, cc_detach, st);
        } else if (!off && came) { /* something came meanwhile */
            PyObject *cb = PyObject_GetAttr(conn, cc_on_readable);
            r = cb ? PyObject_CallMethodOneArg(loop, cc_call_soon, cb) : NULL;
            Py_XDECREF(cb);
        } else if (off && !paused) { /* it was taken off its loop (a socket; an ipc caller slept) */
            r = PyObject_CallMethodOneArg(loop, cc_attach, st);
        } else {
            Py_INCREF(r);
        }
        if (!r) rc = -1;
        Py_XDECREF(r);
        Py_XDECREF(loop);
    }
    lock_give(lock);
    return rc;
}

/* The caller reads its reply: rounds until the call is done (1), or the stream is not
 * ours any more, a throttle paused it or the deadline (< 0: none) passed (0); -1 error. */
static int cc_read_until(PyObject *conn, LockObject *lock, PyObject *st, PyObject *chan, WriterObject *w,
                         Py_ssize_t fill, PyObject *pending, double deadline) {
    int fd = -1;
    for (int turn = 0; SLOT(pending, rp_call, RK_DONE) != Py_True; turn++) {
        /* (a stream that always has something to do must not keep us past the deadline) */
        if (turn && deadline >= 0 && mono_ns() / 1e9 >= deadline) return 0;
        /* ipc: spin, then arm the wake-up; a socket: straight to the poll */
        if (!chan || !capi->ipc_before_wait(chan)) {
            if (lock_take(lock, -1) < 0) return -1;
            int ours = SLOT(conn, cc_conn, CC_STREAM) == st; /* (a teardown may have closed it) */
            lock_give(lock);
            if (!ours) return 0;
            if (fd < 0 && (fd = PyObject_AsFileDescriptor(st)) < 0) return -1;
            int wait = -1;
            if (deadline >= 0) {
                double left = deadline - mono_ns() / 1e9;
                if (left <= 0) return 0;
                wait = (int)(left * 1000) + 1;
            }
            /* (a socket with a stalled send: room to write too, as on the loop) */
            struct pollfd pfd = {fd, (short)(POLLIN | (!chan && w->pending ? POLLOUT : 0)), 0};
            int n;
            Py_BEGIN_ALLOW_THREADS
            n = poll(&pfd, 1, wait);
            Py_END_ALLOW_THREADS
            if (n < 0) {
                if (errno != EINTR) {
                    PyErr_SetFromErrno(PyExc_OSError);
                    return -1;
                }
                if (PyErr_CheckSignals() < 0) return -1;
                continue;
            }
            if (n == 0) continue;
        }
        if (lock_take(lock, -1) < 0) return -1;
        if (SLOT(conn, cc_conn, CC_STREAM) != st) {
            lock_give(lock);
            return 0; /* the transport changed: the loop owns the new one */
        }
        int r = read_round(conn, fill);
        if (r == 0) { /* not the steady state: the Python round */
            PyObject *f = PyLong_FromSsize_t(fill);
            PyObject *x = f ? PyObject_CallMethodOneArg(conn, cc_round, f) : NULL;
            Py_XDECREF(f);
            r = x ? 1 : -1;
            Py_XDECREF(x);
        }
        /* The loop leaves a leased ipc stream alone: its writer's part too, the rest of a
         * send the ring had no room for (a request longer than the ring).  Room for it
         * shows as readable, and our read drains the bell that would have woken the loop. */
        if (r > 0 && chan && w->pending && SLOT(conn, cc_conn, CC_STREAM) == st && call_ok(conn, rs_pump, NULL) < 0)
            r = -1;
        int paused = SLOT(conn, cc_conn, CC_PAUSED) == Py_True;
        lock_give(lock);
        if (r < 0) return -1;
        if (paused) return 0; /* a throttle is full: the loop resumes reading when it frees */
    }
    return 1;
}

/* A _Call, as _post_call makes it (no latch: _Call.wait makes one for a caller that must sleep). */
static PyObject *cc_new_call(PyObject *conn, PyObject *view) {
    PyObject *c = rp_call.type->tp_alloc(rp_call.type, 0);
    if (!c) return NULL;
    SLOT(c, rp_call, RK_CONN) = Py_NewRef(conn);
    SLOT(c, rp_call, RK_INTO) = Py_NewRef(view);
    SLOT(c, rp_call, RK_DONE) = Py_NewRef(Py_False);
    SLOT(c, rp_call, RK_LATCH) = Py_NewRef(Py_None); /* (made by a caller that must sleep: _Call.wait) */
    SLOT(c, rp_call, RK_REPLY) = Py_NewRef(Py_None);
    SLOT(c, rp_call, RK_ERROR) = Py_NewRef(Py_None);
    SLOT(c, rp_call, RK_NOTIFY) = Py_NewRef(Py_None);
    return c;
}

/* call(msg, into=None, timeout=None): the method installed as Connection.call. */
static PyObject *conn_call(PyObject *conn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *msg, *into = Py_None, *timeout = Py_None;
    if (nargs < 1 || nargs > 3) goto python;
    msg = args[0];
    if (nargs > 1) into = args[1];
    if (nargs > 2) timeout = args[2];
    for (Py_ssize_t i = 0; kwnames && i < PyTuple_GET_SIZE(kwnames); i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        if (nargs < 2 && PyUnicode_CompareWithASCIIString(k, "into") == 0)
            into = args[nargs + i];
        else if (nargs < 3 && PyUnicode_CompareWithASCIIString(k, "timeout") == 0)
            timeout = args[nargs + i];
        else
            goto python; /* (it raises the TypeError) */
    }
    double deadline = -1;
    if (timeout != Py_None) {
        if (!PyFloat_CheckExact(timeout) && !PyLong_CheckExact(timeout)) goto python;
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            goto python;
        }
        if (!(t >= -1e9 && t <= 1e9)) goto python;
        deadline = mono_ns() / 1e9 + t;
        if (deadline < 0) deadline = 0;
    }
    uint64_t tid;
    if (Py_TYPE(conn) != cc_conn.type || SLOT(conn, cc_conn, CC_CLOSED) != Py_False ||
        capi->reply_tid(msg, &tid) < 0)
        goto python;
    PyObject *lk = SLOT(conn, cc_conn, CC_LOCK), *loop = SLOT(conn, cc_conn, CC_LOOP);
    PyObject *msgr = SLOT(conn, cc_conn, CC_MESSENGER);
    if (!lk || !Py_IS_TYPE(lk, &LockType) || !loop || !msgr) goto python;
    PyObject *ident = hot_attr(loop, &ms_loop, 0, cc_ident); /* the loop's own thread reads nothing itself */
    if (!ident) {
        PyErr_Clear();
        goto python;
    }
    unsigned long id = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (id == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        goto python;
    }
    if (id == PyThread_get_thread_ident()) goto python;

    /* the posted buffer: memoryview(into).cast("B") */
    PyObject *view;
    if (into == Py_None) {
        view = Py_NewRef(Py_None);
    } else {
        PyObject *v = PyMemoryView_FromObject(into);
        if (!v) return NULL;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        if (b->ndim == 1 && b->itemsize == 1 && b->format && strcmp(b->format, "B") == 0 &&
            (b->strides == NULL || b->strides[0] == 1)) {
            view = v;
        } else {
            view = PyObject_CallMethodOneArg(v, cc_cast, cc_B);
            Py_DECREF(v);
            if (!view) return NULL;
        }
    }

    /* the lease (Connection._lease): the caller reads the stream; its loop leaves it */
    LockObject *lock = (LockObject *)Py_NewRef(lk);
    if (lock_take(lock, -1) < 0) {
        Py_DECREF(lock);
        Py_DECREF(view);
        return NULL;
    }
    PyObject *m = SLOT(conn, cc_conn, CC_MACHINE), *st = SLOT(conn, cc_conn, CC_STREAM);
    PyObject *wo = SLOT(conn, cc_conn, CC_SENDQ);
    WriterObject *w = wo && Py_IS_TYPE(wo, &WriterType) ? (WriterObject *)wo : NULL;
    if (!m || !Py_IS_TYPE(m, sp_mach.type) || SLOT(m, sp_mach, M_STATE) != sp_ready || !st || st == Py_None ||
        SLOT(conn, cc_conn, CC_LEASED) != Py_False || SLOT(conn, cc_conn, CC_PAUSED) != Py_False ||
        !SLOT(conn, cc_conn, CC_LEASE_OFF) || !w ||
        !(w->chan ? Py_IS_TYPE(w->chan, capi->ipc_channel_type) : w->fd >= 0 && Py_IS_TYPE(st, cc_stream))) {
        lock_give(lock);
        Py_DECREF(lock);
        Py_DECREF(view);
        goto python;
    }
    PyObject *chan = Py_XNewRef(w->chan);
    Py_INCREF(w);
    st = Py_NewRef(st);
    Py_XSETREF(SLOT(conn, cc_conn, CC_LEASED), Py_NewRef(Py_True));
    /* an ipc stream stays on its loop (take: the loop leaves it, the peer need not ring);
     * a socket comes off it before the request goes (the loop never sees the reply) */
    PyObject *det = chan ? (capi->ipc_take(chan), Py_NewRef(Py_None)) : PyObject_CallMethodOneArg(loop, cc_detach, st);
    if (!det) {
        Py_XSETREF(SLOT(conn, cc_conn, CC_LEASED), Py_NewRef(Py_False));
        lock_give(lock);
        Py_XDECREF(chan);
        Py_DECREF(w);
        Py_DECREF(st);
        Py_DECREF(lock);
        Py_DECREF(view);
        return NULL;
    }
    Py_DECREF(det);
    lock_give(lock);
    /* a socket: if the reply is to land in a large buffer, reads between frames take only
     * the head, so its data goes straight there (as _read_until) */
    Py_ssize_t fill = chan ? 0 : view != Py_None && PyObject_Length(view) >= cc_fill_min ? cc_fill_head : (Py_ssize_t)1 << 30;

    /* from here on the stream is given back whatever happens */
    PyObject *calls = NULL, *pending = NULL, *key = NULL, *result = NULL;
    if (!(calls = hot_attr(msgr, &ms_msgr, MS_CALLS, rs_calls))) goto unlease;
    if (!PyDict_Check(calls)) {
        PyErr_SetString(PyExc_TypeError, "Messenger._calls is not a dict");
        goto unlease;
    }
    if (tid == 0) { /* _post_call: a transaction id */
        PyObject *tids = hot_attr(msgr, &ms_msgr, MS_TIDS, cc_tids);
        PyObject *t = tids ? PyIter_Next(tids) : NULL;
        Py_XDECREF(tids);
        if (!t) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "Messenger._tids ran out");
            goto unlease;
        }
        int r = PyObject_SetAttr(msg, cc_tid, t);
        Py_DECREF(t);
        if (r < 0 || capi->reply_tid(msg, &tid) < 0) goto unlease;
    }
    if (!(key = PyLong_FromUnsignedLongLong(tid)) || !(pending = cc_new_call(conn, view)) ||
        PyDict_SetItem(calls, key, pending) < 0)
        goto unlease;
    PyObject *r = conn_send(conn, msg);
    if (!r) goto unlease;
    Py_DECREF(r);
    if (cc_read_until(conn, lock, st, chan, w, fill, pending, deadline) < 0) goto unlease;
    if (cc_unlease(conn, lock, st, chan) < 0) goto out;
    if (SLOT(pending, rp_call, RK_DONE) != Py_True) { /* (rare: most calls read their own reply) */
        PyObject *dl = deadline < 0 ? Py_NewRef(Py_None) : PyFloat_FromDouble(deadline);
        if (!dl) goto out;
        PyObject *a[5] = {conn, pending, key, timeout, dl};
        result = PyObject_VectorcallMethod(cc_await, a, 5, NULL);
        Py_DECREF(dl);
        goto out;
    }
    PyObject *err = SLOT(pending, rp_call, RK_ERROR), *reply = SLOT(pending, rp_call, RK_REPLY);
    if (err && err != Py_None)
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
    else if (!reply || reply == Py_None)
        PyErr_SetString(PyExc_RuntimeError, "a finished call without its reply");
    else
        result = Py_NewRef(reply);
    goto out;
unlease: { /* an error with the stream leased: give it back first (its own error wins) */
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (cc_unlease(conn, lock, st, chan) < 0) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    } else {
        PyErr_Restore(et, ev, tb);
    }
}
out:
    if (key && calls) { /* Messenger._calls.pop(tid, None) */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (PyDict_DelItem(calls, key) < 0) PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    }
    Py_XDECREF(key);
    Py_XDECREF(pending);
    Py_XDECREF(calls);
    Py_XDECREF(chan);
    Py_DECREF(w);
    Py_DECREF(st);
    Py_DECREF(lock);
    Py_DECREF(view);
    return result;
python: { /* self._call_python(*args, **kwargs) */
    Py_ssize_t n = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[8], **a = n < 8 ? small : PyMem_Malloc((size_t)(n + 1) * sizeof(PyObject *));
    if (!a) return PyErr_NoMemory();
    a[0] = conn;
    memcpy(a + 1, args, (size_t)n * sizeof(PyObject *));
    PyObject *res = PyObject_VectorcallMethod(cc_python, a, (size_t)nargs + 1, kwnames);
    if (a != small) PyMem_Free(a);
    return res;
}
}

static PyMethodDef conn_call_def = {
    "call", (PyCFunction)(void (*)(void))conn_call, METH_FASTCALL | METH_KEYWORDS,
    "call(msg, into=None, timeout=None) -> Message: send a request and wait for its reply; the reply's data is read "
    "straight into `into`.  Compiled for a caller that reads its own reply from an ipc:// stream or a plain socket; "
    "everything else in Connection._call_python."};

/* compiled_call(Connection) -> the method to install as Connection.call (after
 * compiled_read: it posts _Calls and reads with read_round). */
static PyObject *py_compiled_call(PyObject *self, PyObject *args) {
    PyObject *conn_t, *stream_t;
    Py_ssize_t head, min;
    if (!PyArg_ParseTuple(args, "OO!nn:compiled_call", &conn_t, &PyType_Type, &stream_t, &head, &min)) return NULL;
    if (!rp_call.type || !rp_conn.type) return PyErr_Format(PyExc_RuntimeError, "compiled_call() comes after compiled_read()");
    if (conn_t != (PyObject *)rp_conn.type) return PyErr_Format(PyExc_ValueError, "compiled_call() and compiled_read() disagree on Connection");
    if (slotmap_resolve(&cc_conn, conn_t) < 0) return NULL;
    Py_XSETREF(cc_stream, (PyTypeObject *)Py_NewRef(stream_t));
    cc_fill_head = head;
    cc_fill_min = min;
    INTERN(cc_python, "_call_python");
    INTERN(cc_await, "_await_call");
    INTERN(cc_ident, "_ident");
    INTERN(cc_tids, "_tids");
    INTERN(cc_tid, "tid");
    INTERN(cc_cast, "cast");
    INTERN(cc_B, "B");
    INTERN(cc_round, "_Connection__on_readable_locked");
    INTERN(cc_detach, "detach");
    INTERN(cc_attach, "attach");
    INTERN(cc_call_soon, "call_soon_threadsafe");
    INTERN(cc_on_readable, "_on_readable");
    return PyDescr_NewMethod((PyTypeObject *)conn_t, &conn_call_def);
}

/* compiled_messenger(Messenger, IOLoop): where their attributes the round and the call
 * read each time are (see hot_attr). */
static PyObject *py_compiled_messenger(PyObject *self, PyObject *args) {
    PyObject *msgr_t, *loop_t;
    if (!PyArg_ParseTuple(args, "OO:compiled_messenger", &msgr_t, &loop_t)) return NULL;
    if (slotmap_resolve(&ms_msgr, msgr_t) < 0 || slotmap_resolve(&ms_loop, loop_t) < 0) return NULL;
    Py_RETURN_NONE;
}

static int cpu_sse42, cpu_fold;

/* _crc_impl(name) -> bool: compute crc32c with "table", "sse4.2" or "fold" (and the
 * ones before it), if the CPU can; False if it cannot.  Tests cover every path. */
static PyObject *py_crc_impl(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!name) return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_TypeError, "_crc_impl() takes a str");
    int level = !strcmp(name, "table") ? 0 : !strcmp(name, "sse4.2") ? 1 : !strcmp(name, "fold") ? 2 : -1;
    if (level < 0) return PyErr_Format(PyExc_ValueError, "no crc32c implementation %R", arg);
    if ((level >= 1 && !cpu_sse42) || (level == 2 && !cpu_fold)) Py_RETURN_FALSE;
    have_sse42 = level >= 1;
#if defined(__x86_64__)
    have_fold = level == 2;
#endif
    Py_RETURN_TRUE;
}

static PyMethodDef codec_methods[] = {
    {"_crc_impl", py_crc_impl, METH_O, "_crc_impl('table' | 'sse4.2' | 'fold') -> bool: use it, if the CPU can."},
    {"_set_errors", py_set_errors, METH_VARARGS, "_set_errors(LocalProtocolError, ConfigurationError)"},
    {"sole_view", py_sole_view, METH_O, "sole_view(reader._view) -> bool: nothing else points into its buffer."},
    {"crc32c", py_crc32c, METH_VARARGS, "crc32c(data, value=0) -> int (Castagnoli, as the crc32c package)"},
    {"recv_fill", py_recv_fill, METH_VARARGS, "recv_fill(fd, buf, wait) -> n: read until buf is full (GIL released)."},
    {"frame_encode", py_frame_encode, METH_VARARGS, "One frame as a list of buffers (see frames.encode_frame)."},
    {"frame_scan", py_frame_scan, METH_VARARGS, "Complete small valid frames in a buffer (see frames.FrameReader)."},
    {"compiled_send", py_compiled_send, METH_VARARGS,
     "compiled_send(Connection, SessionConnection, Session, State.READY) -> Connection.send, compiled."},
    {"compiled_read", py_compiled_read, METH_VARARGS,
     "compiled_read(Connection, SessionConnection, Session, FrameReader, _Call, State.READY, State.CLOSED, "
     "RemoteProtocolError, _track_kept) -> Connection._on_readable, compiled."},
    {"compiled_messenger", py_compiled_messenger, METH_VARARGS,
     "compiled_messenger(Messenger, IOLoop): the slots of theirs the compiled round and call read"},
    {"compiled_call", py_compiled_call, METH_VARARGS,
     "compiled_call(Connection, Stream, FILL_HEAD, FILL_MIN) -> Connection.call, compiled for a caller that reads "
     "its reply from an ipc:// stream or a plain socket (after compiled_read)."},
    {"read_round", (PyCFunction)(void (*)(void))py_read_round, METH_FASTCALL,
     "read_round(conn, fill=0) -> bool: a connection's read round, compiled; False: not the steady state, nothing "
     "done."},
    {"message_scan", (PyCFunction)(void (*)(void))py_message_scan, METH_FASTCALL,
     "The run of steady-state MESSAGE frames in a buffer, as received Messages (see session.SessionConnection)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codecmodule = {PyModuleDef_HEAD_INIT, "copyless._codec", NULL, -1, codec_methods};

PyMODINIT_FUNC PyInit__codec(void) {
    crc_init();
#if defined(__x86_64__)
    fold_init();
    cpu_fold = have_fold;
#endif
    cork_init();
    cpu_sse42 = have_sse42;
    /* the module itself, not PyCapsule_Import's attribute walk from the package, which
     * fails while `copyless` is still being imported */
    PyObject *core = PyImport_ImportModule("copyless._core");
    PyObject *cap = core ? PyObject_GetAttrString(core, "_CAPI") : NULL;
    Py_XDECREF(core);
    capi = cap ? PyCapsule_GetPointer(cap, COPYLESS_CAPI_NAME) : NULL;
    Py_XDECREF(cap); /* the core module keeps the capsule, and the struct is static there */
    if (!capi) return NULL;
    if (capi->version != COPYLESS_CAPI_VERSION) {
        PyErr_SetString(PyExc_ImportError, "copyless._core and copyless._codec are from different builds: rebuild");
        return NULL;
    }
    if (PyType_Ready(&OutMessageType) < 0 || PyType_Ready(&WriterType) < 0 || PyType_Ready(&FlusherType) < 0 ||
        PyType_Ready(&LockType) < 0 || PyType_Ready(&ThrottleType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&codecmodule);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "OutMessage", (PyObject *)&OutMessageType) < 0 ||
        PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0 ||
        PyModule_AddObjectRef(m, "Flusher", (PyObject *)&FlusherType) < 0 ||
        PyModule_AddObjectRef(m, "Lock", (PyObject *)&LockType) < 0 ||
        PyModule_AddObjectRef(m, "Throttle", (PyObject *)&ThrottleType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "HAVE_SSE42", have_sse42 != 0);
    PyModule_AddIntConstant(m, "HAVE_FOLD", cpu_fold != 0);
    return m;
}
