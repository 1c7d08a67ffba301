/*
 * copyless._core: the compiled mechanism under the shared-memory data path.
 *
 * Mechanism only, no policy: mappings of memfd segments, the per-subscriber
 * SPSC descriptor rings and release rings, the publisher's private block
 * table (reference counts, per-subscriber holdings), futex/eventfd wake-ups.
 * Rendezvous, handshakes, liveness and large-segment caching live in Python
 * (copyless/_pubsub.py).  Layout constants are exported so Python and C
 * cannot disagree; docs/design.md describes the layout and why.
 *
 * Concurrency model: every method runs with the GIL held, and the GIL is the
 * lock for the publisher's private state (the housekeeping thread mutates it
 * only through these methods).  The GIL is released only inside wait loops,
 * which re-read all state after re-acquiring it.  Shared-memory words are
 * accessed with explicit acquire/release (or seq_cst where a Dekker-style
 * "store my flag, then load yours" handshake is needed).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "_capi.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() do {} while (0)
#endif

#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define STORE_SC(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define LOAD_SC(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define XCHG(p, v) __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)

/* ------------------------------------------------------------------ layout */
#define WIRE_VERSION 1u
#define CTL_MAGIC 0x43504c43u /* "CLPC" */

/* Per-subscriber control segment (read-write for both sides). */
#define CTL_HDR 0           /* u32 magic, u32 version, u32 desc_cap, u32 rel_cap, u64 start_seq */
#define CTL_START_SEQ 16
#define CTL_DESC_TAIL 64    /* u64, written by the publisher */
#define CTL_DESC_HEAD 128   /* u64, written by the subscriber (CAS; the publisher CASes it to overwrite) */
#define CTL_REL_TAIL 192    /* u64, written by the subscriber */
#define CTL_REL_HEAD 256    /* u64, written by the publisher */
#define CTL_SUB_WAITER 320  /* u32 futex word: 0 running, 1 futex sleep, 2 eventfd sleep */
#define CTL_PUB_CLOSED 384  /* u32: 1 once the publisher closed gracefully */
#define CTL_DESC_RING 448
#define DESC_SIZE 40        /* u32 block, u32 gen, u64 len, u64 seq, u64 tag, u32 type, u32 flags */
#define REL_SIZE 8          /* u32 block, u32 gen */

/* Doorbell segment (read-write for all): how subscribers wake a blocked publisher. */
#define DB_SEQ 0            /* u32 futex word, bumped by a subscriber that freed something */
#define DB_PUB_WAITING 64   /* u32: 1 while a blocked publisher sleeps */
#define DB_CREDIT 128       /* i32: progress events (pops, releases) the sleeping publisher waits for */
#define DB_SIZE 4096

/* Arena: header page, then n_slots fixed-size slots. */
#define ARENA_DATA 4096

#define WAIT_SLICE_NS 50000000LL
/* A spinning wait gives its CPU away this often (sched_yield).  Spinning pays
 * only while the peer runs on another CPU; when a third process holds that CPU
 * the two peers share one, and a spinner would keep the peer it waits for off
 * the CPU for the rest of its spin, every message.  Measured (1 MiB loans, both
 * processes pinned to one CPU): 12 GB/s, 87 us a message, half of it spinning.
 * Alone on its CPU a spinner loses ~0.4 us per yield, which returns at once. */
#define SPIN_YIELD_NS 5000LL
/* In a spinning wait, at time now: give the CPU away if SPIN_YIELD_NS passed since the
 * last time (*next: when it is due; 0: the spin just began, no yield yet). */
static inline void spin_yield(int64_t now, int64_t *next) {
    if (now < *next) return;
    if (*next) sched_yield();
    *next = now + SPIN_YIELD_NS;
}
#define LARGE_SPIN_NS 100000LL /* a publisher waiting for a large segment polls this long first */ /* wake at least this often to notice dead peers and signals */

static size_t ctl_rel_ring_off(uint32_t desc_cap) {
    size_t end = CTL_DESC_RING + (size_t)desc_cap * DESC_SIZE;
    return (end + 63) & ~(size_t)63;
}
static size_t ctl_size(uint32_t desc_cap, uint32_t rel_cap) {
    size_t end = ctl_rel_ring_off(desc_cap) + (size_t)rel_cap * REL_SIZE;
    return (end + 4095) & ~(size_t)4095;
}

/* ------------------------------------------------------------------ errors */
static PyObject *WouldBlockError; /* set from Python: copyless.errors.WouldBlock */
static PyObject *TimeoutErr;      /* copyless.errors.Timeout */
static PyObject *RemoteProtoErr;  /* copyless.errors.RemoteProtocolError */
static PyObject *ClosedErr;       /* copyless.errors.ClosedError */
static PyObject *ConfigErr;       /* copyless.errors.ConfigurationError */

static PyObject *err_type(PyObject *t, PyObject *fallback) { return t ? t : fallback; }

/* ------------------------------------------------------------------ time, futex */
static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Not FUTEX_PRIVATE: the word lives in a MAP_SHARED mapping of another process. */
static int futex_wait_ns(uint32_t *addr, uint32_t expected, int64_t ns) {
    struct timespec ts;
    if (ns < 0) ns = 0;
    ts.tv_sec = ns / 1000000000LL;
    ts.tv_nsec = ns % 1000000000LL;
    return (int)syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0);
}
static void futex_wake_all(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}
static void eventfd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do { r = write(fd, &one, sizeof one); } while (r < 0 && errno == EINTR);
    /* EAGAIN (counter saturated) still means the reader is woken. */
}

/* timeout argument -> absolute deadline; -1 = forever, 0 = do not wait */
static int parse_deadline(PyObject *timeout, int64_t dflt_ns, int64_t *deadline, int *nowait) {
    int64_t rel;
    if (timeout == NULL || timeout == Py_None) {
        rel = dflt_ns;
    } else {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) return -1;
        if (t < 0) { PyErr_SetString(PyExc_ValueError, "timeout must be >= 0 or None"); return -1; }
        rel = (int64_t)(t * 1e9);
    }
    *nowait = (rel == 0);
    *deadline = rel < 0 ? INT64_MAX : now_ns() + rel;
    return 0;
}

/* ================================================================== Mapping */
/* A mapping of a whole segment.  It is unmapped only when the last reference
 * (the owner's, a Message's, a loan's) is gone, so no view can outlive it. */
typedef struct {
    PyObject_HEAD
    uint8_t *addr;
    Py_ssize_t size;
    int writable;
} MappingObject;

static PyTypeObject MappingType;

static PyObject *Mapping_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "size", "writable", NULL};
    int fd, writable = 0;
    Py_ssize_t size;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "in|p", kwlist, &fd, &size, &writable)) return NULL;
    if (size <= 0) { PyErr_SetString(PyExc_ValueError, "mapping size must be > 0"); return NULL; }
    void *p;
    Py_BEGIN_ALLOW_THREADS
    p = mmap(NULL, (size_t)size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
    Py_END_ALLOW_THREADS
    if (p == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
    MappingObject *self = (MappingObject *)type->tp_alloc(type, 0);
    if (!self) { munmap(p, (size_t)size); return NULL; }
    self->addr = p;
    self->size = size;
    self->writable = writable;
    return (PyObject *)self;
}

static void Mapping_dealloc(MappingObject *self) {
    if (self->addr) munmap(self->addr, (size_t)self->size);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Mapping_getbuffer(MappingObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, !self->writable, flags);
}

static PyBufferProcs Mapping_as_buffer = {(getbufferproc)Mapping_getbuffer, NULL};

static PyObject *Mapping_get_address(MappingObject *self, void *c) { return PyLong_FromVoidPtr(self->addr); }
static PyObject *Mapping_get_size(MappingObject *self, void *c) { return PyLong_FromSsize_t(self->size); }
static PyObject *Mapping_get_writable(MappingObject *self, void *c) { return PyBool_FromLong(self->writable); }

static PyGetSetDef Mapping_getset[] = {
    {"address", (getter)Mapping_get_address, NULL, "start address in this process", NULL},
    {"size", (getter)Mapping_get_size, NULL, "mapped bytes", NULL},
    {"writable", (getter)Mapping_get_writable, NULL, "mapped read-write", NULL},
    {NULL},
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._core.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mapping(fd, size, writable=False): a MAP_SHARED mapping, unmapped when unreferenced.",
    .tp_new = Mapping_new,
    .tp_dealloc = (destructor)Mapping_dealloc,
    .tp_as_buffer = &Mapping_as_buffer,
    .tp_getset = Mapping_getset,
};

/* ================================================================== Region */
/* A buffer exporter over part of a Mapping (used for loans). */
typedef struct {
    PyObject_HEAD
    PyObject *owner; /* keeps the mapping alive */
    uint8_t *ptr;
    Py_ssize_t len;
    int readonly;
} RegionObject;

static PyTypeObject RegionType;

static PyObject *region_view(PyObject *owner, uint8_t *ptr, Py_ssize_t len, int readonly) {
    RegionObject *r = PyObject_New(RegionObject, &RegionType);
    if (!r) return NULL;
    Py_INCREF(owner);
    r->owner = owner;
    r->ptr = ptr;
    r->len = len;
    r->readonly = readonly;
    PyObject *mv = PyMemoryView_FromObject((PyObject *)r);
    Py_DECREF(r);
    return mv;
}
static void Region_dealloc(RegionObject *self) {
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}
static int Region_getbuffer(RegionObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, self->readonly, flags);
}
static PyBufferProcs Region_as_buffer = {(getbufferproc)Region_getbuffer, NULL};
static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._core.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_as_buffer = &Region_as_buffer,
};

/* ================================================================== PubCore */
enum { POLICY_BLOCK = 0, POLICY_RAISE = 1, POLICY_OVERWRITE = 2 };

typedef struct {
    uint32_t refs;       /* holders: subscribers holding it + 1 while the publisher holds it */
    uint32_t gen;        /* bumped at every allocation; stale releases are rejected */
    uint8_t *ptr;        /* in the publisher's mapping */
    uint64_t cap;
    PyObject *mapping;   /* large blocks only: the segment's Mapping */
} Block;

typedef struct {
    PyObject *ctl;       /* Mapping */
    uint8_t *base;
    uint32_t desc_cap, rel_cap;
    uint64_t tail;       /* publisher's own copy of desc tail */
    uint64_t head_cache; /* last head seen */
    uint64_t rel_head;
    int evfd;
    uint8_t *held;       /* n_blocks flags: block is held by (queued to) this subscriber */
    uint32_t nheld;
    int bad;             /* protocol violation seen: to be dropped by Python */
    uint64_t delivered, overwritten, wakeups;
} SubSlot;

typedef struct {
    PyObject_HEAD
    PyObject *arena;      /* Mapping (rw) */
    PyObject *doorbell;   /* Mapping (rw) */
    uint32_t n_slots, slot_size, n_large, n_blocks;
    Block *blocks;
    uint32_t *free_stack;
    uint32_t n_free;
    SubSlot **subs;
    uint32_t max_subs;
    uint32_t sub_hi;      /* one past the highest live subscriber index: the data path loops to here */
    uint32_t n_subs_live;
    uint64_t stream_from; /* copies this big bypass the caches (copy_payload); 0: never */
    int policy;
    int64_t default_timeout_ns; /* -1 forever */
    int64_t spin_ns;            /* how long a blocked send spins before sleeping */
    uint64_t seq;
    int closed;
    /* statistics */
    uint64_t st_msgs, st_bytes, st_overwritten, st_wakeups, st_blocked, st_would_block, st_loans;
    uint64_t frees; /* blocks whose last reference went */
    PyObject *weakreflist;
    PyObject *dict;
} PubCoreObject;

static PyTypeObject PubCoreType;

static inline uint32_t *ctl_u32(SubSlot *s, size_t off) { return (uint32_t *)(s->base + off); }
static inline uint64_t *ctl_u64(SubSlot *s, size_t off) { return (uint64_t *)(s->base + off); }

static void sub_free(SubSlot *s) {
    if (!s) return;
    Py_XDECREF(s->ctl);
    PyMem_Free(s->held);
    PyMem_Free(s);
}

static int PubCore_init(PubCoreObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"arena", "doorbell", "n_slots", "slot_size", "n_large", "max_subscribers", "policy", "timeout", NULL};
    PyObject *arena, *doorbell, *timeout = Py_None;
    unsigned int n_slots, slot_size, n_large, max_subs;
    int policy;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!IIIIi|O", kwlist, &MappingType, &arena, &MappingType, &doorbell,
                                     &n_slots, &slot_size, &n_large, &max_subs, &policy, &timeout))
        return -1;
    if (self->blocks) { PyErr_SetString(PyExc_RuntimeError, "PubCore already initialised"); return -1; }
    MappingObject *am = (MappingObject *)arena;
    if (!am->writable || !((MappingObject *)doorbell)->writable) {
        PyErr_SetString(PyExc_ValueError, "publisher mappings must be writable"); return -1;
    }
    if (n_slots == 0 || slot_size == 0 || slot_size % 64) {
        PyErr_SetString(PyExc_ValueError, "n_slots > 0 and slot_size a positive multiple of 64 required"); return -1;
    }
    if ((Py_ssize_t)ARENA_DATA + (Py_ssize_t)n_slots * slot_size > am->size) {
        PyErr_SetString(PyExc_ValueError, "arena too small for the slots"); return -1;
    }
    if (policy < 0 || policy > 2) { PyErr_SetString(PyExc_ValueError, "bad policy"); return -1; }
    if (timeout == Py_None) self->default_timeout_ns = -1;
    else {
        double t = PyFloat_AsDouble(timeout);
        if (t == -1.0 && PyErr_Occurred()) return -1;
        self->default_timeout_ns = (int64_t)(t * 1e9);
    }
    self->n_slots = n_slots;
    self->slot_size = slot_size;
    self->n_large = n_large;
    self->n_blocks = n_slots + n_large;
    self->blocks = PyMem_Calloc(self->n_blocks, sizeof(Block));
    self->free_stack = PyMem_Calloc(n_slots, sizeof(uint32_t));
    self->subs = PyMem_Calloc(max_subs ? max_subs : 1, sizeof(SubSlot *));
    if (!self->blocks || !self->free_stack || !self->subs) { PyErr_NoMemory(); return -1; }
    for (uint32_t i = 0; i < n_slots; i++) {
        self->blocks[i].ptr = am->addr + ARENA_DATA + (size_t)i * slot_size;
        self->blocks[i].cap = slot_size;
        /* lowest slot on top: a light load keeps reusing a few hot slots */
        self->free_stack[i] = n_slots - 1 - i;
    }
    self->n_free = n_slots;
    self->max_subs = max_subs;
    self->policy = policy;
    self->spin_ns = 0; /* measured: see docs/design.md "How long to spin" */
    Py_INCREF(arena); self->arena = arena;
    Py_INCREF(doorbell); self->doorbell = doorbell;
    return 0;
}

static void pub_release_all(PubCoreObject *self) {
    if (self->subs) {
        for (uint32_t i = 0; i < self->max_subs; i++) { sub_free(self->subs[i]); self->subs[i] = NULL; }
    }
    if (self->blocks) {
        for (uint32_t i = 0; i < self->n_blocks; i++) Py_CLEAR(self->blocks[i].mapping);
    }
    self->n_subs_live = 0;
    self->sub_hi = 0;
}

static int PubCore_traverse(PubCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict);
    return 0;
}
static int PubCore_clear(PubCoreObject *self) {
    Py_CLEAR(self->dict);
    return 0;
}
static void PubCore_dealloc(PubCoreObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    pub_release_all(self);
    PyMem_Free(self->blocks);
    PyMem_Free(self->free_stack);
    PyMem_Free(self->subs);
    Py_CLEAR(self->arena);
    Py_CLEAR(self->doorbell);
    PubCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline uint32_t *db_u32(PubCoreObject *self, size_t off) {
    return (uint32_t *)(((MappingObject *)self->doorbell)->addr + off);
}

static inline void block_decref(PubCoreObject *self, uint32_t b) {
    Block *blk = &self->blocks[b];
    if (--blk->refs == 0) {
        self->frees++;
        if (b < self->n_slots) self->free_stack[self->n_free++] = b;
    }
}

/* Drain one subscriber's release ring.  A release that does not name a block
 * this subscriber holds (with the right generation) marks it bad. */
static void pub_drain_one(PubCoreObject *self, SubSlot *s) {
    if (s->bad) return;
    uint64_t tail = LOAD_ACQ(ctl_u64(s, CTL_REL_TAIL));
    uint64_t head = s->rel_head;
    if (tail == head) return;
    if (tail - head > s->rel_cap) { s->bad = 1; return; }
    uint8_t *ring = s->base + ctl_rel_ring_off(s->desc_cap);
    uint32_t mask = s->rel_cap - 1;
    for (; head != tail; head++) {
        uint32_t ent[2];
        memcpy(ent, ring + (size_t)(head & mask) * REL_SIZE, REL_SIZE);
        uint32_t b = ent[0];
        if (b >= self->n_blocks || !s->held[b] || self->blocks[b].gen != ent[1]) { s->bad = 1; break; }
        s->held[b] = 0;
        s->nheld--;
        block_decref(self, b);
    }
    s->rel_head = head;
    STORE_REL(ctl_u64(s, CTL_REL_HEAD), head);
}

static void pub_drain(PubCoreObject *self) {
    for (uint32_t i = 0; i < self->sub_hi; i++) {
        SubSlot *s = self->subs[i];
        if (s) pub_drain_one(self, s);
    }
}

/* Free entries in a subscriber's descriptor ring (re-reading its head). */
static inline uint64_t sub_space(SubSlot *s) {
    uint64_t used = s->tail - s->head_cache;
    if (used < s->desc_cap) return s->desc_cap - used;
    uint64_t head = LOAD_ACQ(ctl_u64(s, CTL_DESC_HEAD));
    if (s->tail - head > s->desc_cap) { s->bad = 1; return 0; }
    s->head_cache = head;
    return s->desc_cap - (s->tail - head);
}

/* Overwrite-oldest: take back the oldest queued descriptor of s.  Returns 1
 * if one was taken, 0 if the ring was empty (or the subscriber is bad). */
static int sub_steal_oldest(PubCoreObject *self, SubSlot *s) {
    uint64_t *headp = ctl_u64(s, CTL_DESC_HEAD);
    for (;;) {
        uint64_t head = LOAD_ACQ(headp);
        if (s->tail - head > s->desc_cap) { s->bad = 1; return 0; }
        if (head == s->tail) return 0;
        uint32_t b;
        memcpy(&b, s->base + CTL_DESC_RING + (size_t)(head & (s->desc_cap - 1)) * DESC_SIZE, 4);
        if (__atomic_compare_exchange_n(headp, &head, head + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            s->head_cache = head + 1;
            if (b >= self->n_blocks || !s->held[b]) { s->bad = 1; return 0; }
            s->held[b] = 0;
            s->nheld--;
            s->overwritten++;
            self->st_overwritten++;
            block_decref(self, b);
            return 1;
        }
        /* the subscriber consumed it meanwhile: look again */
    }
}

/* Arm the doorbell, then the caller re-checks, then sleeps.
 *
 * `credit` is how many progress events (pops and releases, from any
 * subscriber) the publisher waits for before it is worth waking: waking at
 * the first one would let it send one message and block again, and a fast
 * consumer would then pay a futex wake per message (lockstep).  Callers pick
 * a credit the queued messages alone guarantee; the slice timeout covers the
 * rest. */
typedef struct { uint32_t seen; int armed; int64_t spin_until, next_yield; } Waiter;

static int pub_sleep(PubCoreObject *self, Waiter *w, int64_t deadline, int32_t credit) {
    /* returns 0 to re-check, -1 with an exception set */
    uint32_t *seqp = db_u32(self, DB_SEQ);
    uint32_t *waitp = db_u32(self, DB_PUB_WAITING);
    /* Spin first: a consumer on the other core frees space within
     * microseconds, and sleeping would cost it a futex wake per message. */
    int64_t now0 = now_ns();
    if (w->spin_until == 0) w->spin_until = now0 + self->spin_ns;
    if (now0 < w->spin_until && now0 < deadline) {
        spin_yield(now0, &w->next_yield);
        for (int i = 0; i < 64; i++) cpu_relax();
        return 0;
    }
    if (!w->armed) {
        w->seen = LOAD_SC(seqp);
        STORE_SC((int32_t *)db_u32(self, DB_CREDIT), credit > 0 ? credit : 1);
        STORE_SC(waitp, 1);
        w->armed = 1;
        return 0; /* re-check once with the flag raised */
    }
    int64_t now = now_ns();
    if (now >= deadline) {
        STORE_SC(waitp, 0);
        PyErr_SetString(err_type(TimeoutErr, PyExc_TimeoutError), "publisher: timed out waiting for subscribers to free space");
        return -1;
    }
    int64_t slice = deadline - now;
    if (slice > WAIT_SLICE_NS) slice = WAIT_SLICE_NS;
    self->st_blocked++;
    uint32_t seen = w->seen;
    Py_BEGIN_ALLOW_THREADS
    futex_wait_ns(seqp, seen, slice);
    Py_END_ALLOW_THREADS
    STORE_SC(waitp, 0);
    w->armed = 0;
    if (PyErr_CheckSignals() < 0) return -1;
    if (self->closed) { PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); return -1; }
    return 0;
}

/* Lower the doorbell flag raised by pub_sleep, if it was raised. */
static inline void waiter_disarm(PubCoreObject *self, Waiter *w) {
    if (w->armed) STORE_SC(db_u32(self, DB_PUB_WAITING), 0);
}

/* Any subscriber marked bad is reported to Python, which drops it. */
static int pub_report_bad(PubCoreObject *self) {
    for (uint32_t i = 0; i < self->sub_hi; i++) {
        SubSlot *s = self->subs[i];
        if (s && s->bad) {
            PyObject *r = PyObject_CallMethod((PyObject *)self, "_drop_bad", "I", i);
            if (!r) return -1;
            Py_DECREF(r);
        }
    }
    return 0;
}

static PyObject *would_block(PubCoreObject *self, const char *what) {
    self->st_would_block++;
    PyErr_SetString(err_type(WouldBlockError, PyExc_BlockingIOError), what);
    return NULL;
}

/* Take a free small slot, applying the publisher's policy when none is free. */
static int64_t pub_alloc_small(PubCoreObject *self, int nowait, int64_t deadline) {
    Waiter w = {0, 0, 0};
    for (;;) {
        if (self->closed) { PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); return -1; }
        if (self->n_free == 0) pub_drain(self);
        if (self->n_free == 0 && self->policy == POLICY_OVERWRITE) {
            /* take back queued (not yet received) messages, fullest ring first */
            while (self->n_free == 0) {
                SubSlot *best = NULL;
                uint64_t most = 0;
                for (uint32_t i = 0; i < self->sub_hi; i++) {
                    SubSlot *s = self->subs[i];
                    if (!s || s->bad) continue;
                    uint64_t used = s->tail - LOAD_ACQ(ctl_u64(s, CTL_DESC_HEAD));
                    if (used > most && used <= s->desc_cap) { most = used; best = s; }
                }
                if (!best || !sub_steal_oldest(self, best)) break;
            }
        }
        if (pub_report_bad(self) < 0) return -1;
        if (self->n_free) {
            waiter_disarm(self, &w);
            uint32_t b = self->free_stack[--self->n_free];
            Block *blk = &self->blocks[b];
            blk->refs = 1;
            blk->gen++;
            return b;
        }
        if (nowait || self->policy == POLICY_RAISE) {
            waiter_disarm(self, &w);
            would_block(self, "publisher: every slot is in use (subscribers hold them)");
            return -1;
        }
        /* queued messages will be popped: wait for half of them (at most an
         * eighth of the pool); with none queued, every release counts */
        uint64_t queued = 0;
        for (uint32_t i = 0; i < self->sub_hi; i++) {
            SubSlot *s = self->subs[i];
            if (s && !s->bad) queued += s->tail - LOAD_ACQ(ctl_u64(s, CTL_DESC_HEAD));
        }
        uint64_t credit = queued / 2 < self->n_slots / 8 ? queued / 2 : self->n_slots / 8;
        if (pub_sleep(self, &w, deadline, (int32_t)(credit ? credit : 1)) < 0) return -1;
    }
}

/* Make room in every live subscriber ring (policy), then write the descriptor
 * to all of them and wake the sleepers.  All-or-nothing: on failure no
 * subscriber has the message and the publisher's reference is dropped. */
static int pub_fanout(PubCoreObject *self, uint32_t b, uint64_t len, uint32_t type, uint64_t tag, int nowait, int64_t deadline) {
    Waiter w = {0, 0, 0};
    for (;;) {
        if (self->closed) { PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); goto fail; }
        int full = 0;
        uint32_t credit = UINT32_MAX;
        for (uint32_t i = 0; i < self->sub_hi; i++) {
            SubSlot *s = self->subs[i];
            if (!s || s->bad) continue;
            if (sub_space(s) == 0) {
                if (self->policy == POLICY_OVERWRITE) {
                    if (!sub_steal_oldest(self, s) && !s->bad) full = 1; /* cannot happen unless raced */
                } else {
                    full = 1;
                    if (s->desc_cap / 2 < credit) credit = s->desc_cap / 2; /* half the full ring drained */
                }
            }
        }
        if (pub_report_bad(self) < 0) goto fail;
        if (!full) break;
        pub_drain(self);
        if (nowait || self->policy == POLICY_RAISE) {
            waiter_disarm(self, &w);
            would_block(self, "publisher: a subscriber's queue is full");
            goto fail;
        }
        if (pub_sleep(self, &w, deadline, (int32_t)(credit == UINT32_MAX || credit == 0 ? 1 : credit)) < 0) goto fail;
    }
    waiter_disarm(self, &w);
    {
        uint64_t seq = ++self->seq;
        Block *blk = &self->blocks[b];
        uint8_t desc[DESC_SIZE];
        uint32_t flags = 0;
        memcpy(desc + 0, &b, 4);
        memcpy(desc + 4, &blk->gen, 4);
        memcpy(desc + 8, &len, 8);
        memcpy(desc + 16, &seq, 8);
        memcpy(desc + 24, &tag, 8);
        memcpy(desc + 32, &type, 4);
        memcpy(desc + 36, &flags, 4);
        for (uint32_t i = 0; i < self->sub_hi; i++) {
            SubSlot *s = self->subs[i];
            if (!s || s->bad) continue;
            memcpy(s->base + CTL_DESC_RING + (size_t)(s->tail & (s->desc_cap - 1)) * DESC_SIZE, desc, DESC_SIZE);
            s->held[b] = 1;
            s->nheld++;
            blk->refs++;
            s->tail++;
            /* seq_cst store, then load the waiter flag: pairs with the
             * subscriber's "store flag, then load tail" (no lost wake-up). */
            STORE_SC(ctl_u64(s, CTL_DESC_TAIL), s->tail);
            s->delivered++;
            uint32_t *waiter = ctl_u32(s, CTL_SUB_WAITER);
            if (LOAD_RLX(waiter) != 0) {
                uint32_t was = XCHG(waiter, 0);
                if (was == 1) { futex_wake_all(waiter); s->wakeups++; self->st_wakeups++; }
                else if (was == 2 && s->evfd >= 0) { eventfd_signal(s->evfd); s->wakeups++; self->st_wakeups++; }
            }
        }
        self->st_msgs++;
        self->st_bytes += len;
        block_decref(self, b); /* the publisher's own reference */
    }
    return 0;
fail:
    block_decref(self, b);
    return -1;
}

/* The one copy of send(): into shared memory, where a subscriber on another
 * core reads it.  A copy bigger than stream_from goes around the caches
 * (streaming stores): once the source plus the segments in flight no longer fit
 * in the last-level cache, every line memcpy writes is first read from memory
 * (read-for-ownership) and later written back, and the streaming store skips
 * that read.  Measured on the 2-core VM (32 MiB L3, memcpy into two alternating
 * buffers): 16 MiB 20-32 -> 33-41 GB/s, 10 MiB 40 -> 43; but 8 MiB 45 -> 40 and
 * 1 MiB 57 -> 40, where the destination stays in cache.  glibc would choose
 * this itself above its own threshold, which it derives from a cache size the
 * VM misreports (384 MiB), so here it never does.  Python sets stream_from
 * from the cache size in sysfs. */
static int64_t pub_take(PubCoreObject *self, uint64_t n, PyObject *timeout);

static void copy_payload(PubCoreObject *self, uint8_t *dst, const uint8_t *src, size_t n) {
#if defined(__x86_64__)
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (self->stream_from && n >= self->stream_from && n >= head + 64) {
        memcpy(dst, src, head);
        dst += head, src += head, n -= head;
        __m128i *d = (__m128i *)dst;
        const __m128i *sp = (const __m128i *)src;
        size_t blocks = n / 64;
        for (size_t i = 0; i < blocks; i++, d += 4, sp += 4) {
            __m128i a = _mm_loadu_si128(sp), b = _mm_loadu_si128(sp + 1), c = _mm_loadu_si128(sp + 2), e = _mm_loadu_si128(sp + 3);
            _mm_stream_si128(d, a);
            _mm_stream_si128(d + 1, b);
            _mm_stream_si128(d + 2, c);
            _mm_stream_si128(d + 3, e);
        }
        memcpy(d, sp, n % 64);
        _mm_sfence(); /* streaming stores are weakly ordered: visible before the descriptor is */
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* send(obj, type=0, tag=0, timeout=None): one copy into a slot (or, above
 * slot_size, into a large segment), then fan out. */
static PyObject *PubCore_send(PubCoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *obj = NULL, *timeout = Py_None;
    unsigned long type = 0;
    unsigned long long tag = 0;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 1 || nargs > 3) { PyErr_SetString(PyExc_TypeError, "send(obj, type=0, tag=0, timeout=None)"); return NULL; }
    obj = args[0];
    if (nargs > 1) { type = PyLong_AsUnsignedLong(args[1]); if (PyErr_Occurred()) return NULL; }
    if (nargs > 2) { tag = PyLong_AsUnsignedLongLong(args[2]); if (PyErr_Occurred()) return NULL; }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(k, "type") == 0) { type = PyLong_AsUnsignedLong(v); if (PyErr_Occurred()) return NULL; }
        else if (PyUnicode_CompareWithASCIIString(k, "tag") == 0) { tag = PyLong_AsUnsignedLongLong(v); if (PyErr_Occurred()) return NULL; }
        else if (PyUnicode_CompareWithASCIIString(k, "timeout") == 0) timeout = v;
        else { PyErr_Format(PyExc_TypeError, "send() got an unexpected keyword argument '%U'", k); return NULL; }
    }
    if (type > 0xffffffffUL) { PyErr_SetString(PyExc_OverflowError, "type must fit in 32 bits"); return NULL; }
    if (!self->blocks) { PyErr_SetString(PyExc_RuntimeError, "PubCore not initialised"); return NULL; }
    Py_buffer src;
    if (PyObject_GetBuffer(obj, &src, PyBUF_SIMPLE) < 0) {
        /* non-contiguous exporters (strided numpy views) are compacted in Python */
        PyErr_Clear();
        return PyObject_CallMethod((PyObject *)self, "_send_strided", "OkKO", obj, type, tag, timeout);
    }
    int64_t deadline;
    int nowait;
    if (parse_deadline(timeout, self->default_timeout_ns, &deadline, &nowait) < 0) { PyBuffer_Release(&src); return NULL; }
    /* a large message: a cached segment, or Python makes one (pub_take); the same
     * block a loan would get, without the loan's objects */
    int64_t b = (uint64_t)src.len > self->slot_size ? pub_take(self, (uint64_t)src.len, timeout)
                                                     : pub_alloc_small(self, nowait, deadline);
    if (b < 0) { PyBuffer_Release(&src); return NULL; }
    copy_payload(self, self->blocks[b].ptr, src.buf, (size_t)src.len);
    uint64_t len = (uint64_t)src.len;
    PyBuffer_Release(&src);
    if (pub_fanout(self, (uint32_t)b, len, (uint32_t)type, tag, nowait, deadline) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(self->seq);
}

/* _claim_large(block): take a free large block (Python picked it). */
static PyObject *PubCore_claim_large(PubCoreObject *self, PyObject *args) {
    unsigned int b;
    if (!PyArg_ParseTuple(args, "I", &b)) return NULL;
    if (b < self->n_slots || b >= self->n_blocks || !self->blocks[b].mapping || self->blocks[b].refs) {
        PyErr_SetString(PyExc_ValueError, "not a free large block"); return NULL;
    }
    self->blocks[b].refs = 1; /* loan() counts loans: this may be a send() */
    Py_RETURN_NONE;
}

/* _install_large(block, mapping|None) -> gen: attach a segment to a free large block id. */
static PyObject *PubCore_install_large(PubCoreObject *self, PyObject *args) {
    unsigned int b;
    PyObject *m;
    if (!PyArg_ParseTuple(args, "IO", &b, &m)) return NULL;
    if (b < self->n_slots || b >= self->n_blocks || self->blocks[b].refs) {
        PyErr_SetString(PyExc_ValueError, "not a free large block id"); return NULL;
    }
    Block *blk = &self->blocks[b];
    if (m == Py_None) {
        Py_CLEAR(blk->mapping);
        blk->ptr = NULL;
        blk->cap = 0;
    } else {
        if (!PyObject_TypeCheck(m, &MappingType) || !((MappingObject *)m)->writable) {
            PyErr_SetString(PyExc_TypeError, "a writable Mapping is required"); return NULL;
        }
        Py_INCREF(m);
        Py_XSETREF(blk->mapping, m);
        blk->ptr = ((MappingObject *)m)->addr;
        blk->cap = (uint64_t)((MappingObject *)m)->size;
    }
    /* for large blocks gen names the segment: subscribers fetch its fd once */
    blk->gen++;
    return PyLong_FromUnsignedLong(blk->gen);
}

/* _block_state(block) -> (refs, gen, cap) */
static PyObject *PubCore_block_state(PubCoreObject *self, PyObject *args) {
    unsigned int b;
    if (!PyArg_ParseTuple(args, "I", &b)) return NULL;
    if (b >= self->n_blocks) { PyErr_SetString(PyExc_IndexError, "block"); return NULL; }
    Block *blk = &self->blocks[b];
    return Py_BuildValue("IIK", blk->refs, blk->gen, (unsigned long long)blk->cap);
}

/* _add_sub(index, ctl_mapping, eventfd): start fanning out to a subscriber. */
static PyObject *PubCore_add_sub(PubCoreObject *self, PyObject *args) {
    unsigned int idx;
    PyObject *ctl;
    int evfd;
    if (!PyArg_ParseTuple(args, "IO!i", &idx, &MappingType, &ctl, &evfd)) return NULL;
    if (idx >= self->max_subs || self->subs[idx]) { PyErr_SetString(PyExc_ValueError, "subscriber slot in use"); return NULL; }
    MappingObject *m = (MappingObject *)ctl;
    uint32_t *hdr = (uint32_t *)m->addr;
    uint32_t dcap = hdr[2], rcap = hdr[3];
    if (hdr[0] != CTL_MAGIC || dcap == 0 || (dcap & (dcap - 1)) || rcap < self->n_blocks || (rcap & (rcap - 1)) ||
        (Py_ssize_t)ctl_size(dcap, rcap) > m->size) {
        PyErr_SetString(PyExc_ValueError, "bad control segment"); return NULL;
    }
    SubSlot *s = PyMem_Calloc(1, sizeof(SubSlot));
    if (!s) return PyErr_NoMemory();
    s->held = PyMem_Calloc(self->n_blocks, 1);
    if (!s->held) { PyMem_Free(s); return PyErr_NoMemory(); }
    Py_INCREF(ctl);
    s->ctl = ctl;
    s->base = m->addr;
    s->desc_cap = dcap;
    s->rel_cap = rcap;
    s->tail = s->head_cache = LOAD_ACQ(ctl_u64(s, CTL_DESC_TAIL));
    s->rel_head = LOAD_ACQ(ctl_u64(s, CTL_REL_HEAD));
    s->evfd = evfd;
    /* the subscriber counts gaps from here on */
    STORE_REL(ctl_u64(s, CTL_START_SEQ), self->seq);
    self->subs[idx] = s;
    self->n_subs_live++;
    if (idx >= self->sub_hi) self->sub_hi = idx + 1;
    Py_RETURN_NONE;
}

/* _remove_sub(index, graceful) -> number of blocks reclaimed */
static PyObject *PubCore_remove_sub(PubCoreObject *self, PyObject *args) {
    unsigned int idx;
    int graceful = 0;
    if (!PyArg_ParseTuple(args, "I|p", &idx, &graceful)) return NULL;
    if (idx >= self->max_subs || !self->subs[idx]) Py_RETURN_NONE;
    SubSlot *s = self->subs[idx];
    self->subs[idx] = NULL;
    self->n_subs_live--;
    while (self->sub_hi && !self->subs[self->sub_hi - 1]) self->sub_hi--;
    if (graceful && !s->bad) pub_drain_one(self, s);
    uint32_t n = 0;
    for (uint32_t b = 0; b < self->n_blocks; b++) {
        if (s->held[b]) { s->held[b] = 0; block_decref(self, b); n++; }
    }
    sub_free(s);
    /* a blocked send may be waiting on that subscriber */
    __atomic_fetch_add(db_u32(self, DB_SEQ), 1, __ATOMIC_SEQ_CST);
    futex_wake_all(db_u32(self, DB_SEQ));
    return PyLong_FromUnsignedLong(n);
}


/* _queued_large() -> large messages sitting unreceived in subscriber rings */
static PyObject *PubCore_queued_large(PubCoreObject *self, PyObject *unused) {
    uint64_t n = 0;
    for (uint32_t i = 0; i < self->sub_hi; i++) {
        SubSlot *s = self->subs[i];
        if (!s || s->bad) continue;
        uint64_t head = LOAD_ACQ(ctl_u64(s, CTL_DESC_HEAD));
        if (s->tail - head > s->desc_cap) continue;
        for (uint64_t h = head; h != s->tail; h++) {
            uint32_t b;
            memcpy(&b, s->base + CTL_DESC_RING + (size_t)(h & (s->desc_cap - 1)) * DESC_SIZE, 4);
            n += b >= self->n_slots;
        }
    }
    return PyLong_FromUnsignedLongLong(n);
}

/* _reclaim(): drain all release rings now; returns free small slots. */
static PyObject *PubCore_reclaim(PubCoreObject *self, PyObject *unused) {
    pub_drain(self);
    if (pub_report_bad(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(self->n_free);
}

/* _wake(): wake a blocked send (used by close and the housekeeping thread). */
static PyObject *PubCore_wake(PubCoreObject *self, PyObject *unused) {
    __atomic_fetch_add(db_u32(self, DB_SEQ), 1, __ATOMIC_SEQ_CST);
    futex_wake_all(db_u32(self, DB_SEQ));
    Py_RETURN_NONE;
}

/* _close(): mark closed, tell every subscriber, drop the rings. */
static PyObject *PubCore_close(PubCoreObject *self, PyObject *unused) {
    if (self->closed) Py_RETURN_NONE;
    self->closed = 1;
    for (uint32_t i = 0; i < self->max_subs; i++) {
        SubSlot *s = self->subs[i];
        if (!s) continue;
        STORE_SC(ctl_u32(s, CTL_PUB_CLOSED), 1);
        uint32_t was = XCHG(ctl_u32(s, CTL_SUB_WAITER), 0);
        if (was == 1) futex_wake_all(ctl_u32(s, CTL_SUB_WAITER));
        else if (was == 2 && s->evfd >= 0) eventfd_signal(s->evfd);
    }
    if (self->doorbell) PubCore_wake(self, NULL);
    pub_release_all(self);
    Py_RETURN_NONE;
}

/* _doze(seconds) -> bool: sleep (GIL released) until a subscriber frees
 * something or the time passes; True if something was freed.  Used by the
 * Python paths (large messages) that wait for space. */
static PyObject *PubCore_doze(PubCoreObject *self, PyObject *args) {
    double t;
    if (!PyArg_ParseTuple(args, "d", &t)) return NULL;
    if (self->closed) { PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); return NULL; }
    uint64_t before = self->frees;
    /* A large message takes tens of microseconds to write, and its release
     * usually follows within a few: poll the release rings that long before
     * paying for a kernel wake-up (~50 us here). */
    int64_t now = now_ns(), spin_end = now + (t * 1e9 < LARGE_SPIN_NS ? (int64_t)(t * 1e9) : LARGE_SPIN_NS);
    int64_t next_yield = now + SPIN_YIELD_NS;
    while (now < spin_end) {
        pub_drain(self);
        if (self->frees != before) break;
        for (int i = 0; i < 256; i++) cpu_relax();
        now = now_ns();
        spin_yield(now, &next_yield);
    }
    uint32_t *seqp = db_u32(self, DB_SEQ), *waitp = db_u32(self, DB_PUB_WAITING);
    if (self->frees == before) {
        uint32_t seen = LOAD_SC(seqp);
        STORE_SC((int32_t *)db_u32(self, DB_CREDIT), 1); /* large messages: every release counts */
        STORE_SC(waitp, 1);
        pub_drain(self);
        int64_t ns = (int64_t)(t * 1e9) - (now_ns() - (spin_end - LARGE_SPIN_NS));
        if (self->frees == before && ns > 0) {
            if (ns > WAIT_SLICE_NS) ns = WAIT_SLICE_NS;
            self->st_blocked++;
            Py_BEGIN_ALLOW_THREADS
            futex_wait_ns(seqp, seen, ns);
            Py_END_ALLOW_THREADS
            pub_drain(self);
        }
        STORE_SC(waitp, 0);
    }
    if (pub_report_bad(self) < 0) return NULL;
    return PyBool_FromLong(self->frees != before);
}

static PyObject *PubCore_stats(PubCoreObject *self, PyObject *unused) {
    uint32_t held_small = 0, held_large = 0;
    if (self->blocks) {
        for (uint32_t b = 0; b < self->n_blocks; b++) {
            if (self->blocks[b].refs) { if (b < self->n_slots) held_small++; else held_large++; }
        }
    }
    PyObject *subs = PyDict_New();
    if (!subs) return NULL;
    for (uint32_t i = 0; self->subs && i < self->max_subs; i++) {
        SubSlot *s = self->subs[i];
        if (!s) continue;
        PyObject *k = PyLong_FromUnsignedLong(i);
        PyObject *v = Py_BuildValue("{s:K,s:K,s:K,s:I,s:K}", "delivered", (unsigned long long)s->delivered,
                                    "overwritten", (unsigned long long)s->overwritten, "wakeups",
                                    (unsigned long long)s->wakeups, "in_flight", s->nheld, "queued",
                                    (unsigned long long)(s->tail - LOAD_ACQ(ctl_u64(s, CTL_DESC_HEAD))));
        if (!k || !v || PyDict_SetItem(subs, k, v) < 0) { Py_XDECREF(k); Py_XDECREF(v); Py_DECREF(subs); return NULL; }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:I,s:I,s:I,s:N}", "messages", (unsigned long long)self->st_msgs,
                         "bytes", (unsigned long long)self->st_bytes, "overwritten", (unsigned long long)self->st_overwritten,
                         "wakeups", (unsigned long long)self->st_wakeups, "blocked", (unsigned long long)self->st_blocked,
                         "would_block", (unsigned long long)self->st_would_block, "loans", (unsigned long long)self->st_loans,
                         "slots_in_use", held_small, "large_in_use", held_large, "subscribers", self->n_subs_live, "per_subscriber", subs);
}

static PyObject *PubCore_get_policy(PubCoreObject *self, void *c) { return PyLong_FromLong(self->policy); }
/* a non-negative number of seconds, stored as nanoseconds */
static int set_seconds(int64_t *dst, PyObject *v) {
    double t = PyFloat_AsDouble(v);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (t < 0) { PyErr_SetString(PyExc_ValueError, "spin must be >= 0"); return -1; }
    *dst = (int64_t)(t * 1e9);
    return 0;
}
static PyObject *PubCore_get_spin(PubCoreObject *self, void *c) { return PyFloat_FromDouble(self->spin_ns / 1e9); }
static int PubCore_set_spin(PubCoreObject *self, PyObject *v, void *c) { return set_seconds(&self->spin_ns, v); }

/* A cached large segment of exactly `size` bytes that nobody holds, or -1. */
static int64_t pub_find_large(PubCoreObject *self, uint64_t size) {
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t b = self->n_slots; b < self->n_blocks; b++) {
            Block *blk = &self->blocks[b];
            if (blk->mapping && blk->refs == 0 && blk->cap == size) return b;
        }
        if (pass == 0) pub_drain(self); /* a release may be waiting in a ring */
    }
    return -1;
}

static uint64_t pow2_class(uint64_t n) {
    uint64_t c = 4096;
    while (c < n) c <<= 1;
    return c;
}

/* Take a block for n bytes: a small slot, a cached large segment, or (slow
 * path, Python policy) a new segment from self._alloc_large(n, timeout). */
static int64_t pub_take(PubCoreObject *self, uint64_t n, PyObject *timeout) {
    if (self->closed) { PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); return -1; }
    if (n <= self->slot_size) {
        int64_t deadline;
        int nowait;
        if (parse_deadline(timeout, self->default_timeout_ns, &deadline, &nowait) < 0) return -1;
        return pub_alloc_small(self, nowait, deadline);
    }
    int64_t b = pub_find_large(self, pow2_class(n));
    if (b >= 0) {
        self->blocks[b].refs = 1;
        return b;
    }
    if (pub_report_bad(self) < 0) return -1;
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_alloc_large", "KO", (unsigned long long)n, timeout ? timeout : Py_None);
    if (!r) return -1;
    b = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return b;
}

/* ------------------------------------------------------------------ Loan */
typedef struct {
    PyObject_HEAD
    PubCoreObject *pub;
    PyObject *view;       /* writable memoryview of the block */
    uint64_t nbytes, tag, seq;
    uint32_t block, type;
    int state;            /* 0 open, 1 published, 2 discarded */
} LoanObject;

static PyTypeObject LoanType;
static PyObject *str_release; /* "release", interned: called once per loan */
static PyCFunction view_release; /* memoryview.release's C function (METH_NOARGS), if found */

static void loan_drop_view(LoanObject *l) {
    if (!l->view) return;
    /* invalidate the buffer we handed out if nobody else holds it; a numpy
     * array made from it keeps pointing at the slot (do not write after publish).
     * (Its C function, called directly: no lookup by name each loan.) */
    PyObject *r = view_release && Py_IS_TYPE(l->view, &PyMemoryView_Type) ? view_release(l->view, NULL)
                                                                   : PyObject_CallMethodNoArgs(l->view, str_release);
    if (!r) PyErr_Clear();
    Py_XDECREF(r);
    Py_CLEAR(l->view);
}

static PyObject *loan_closed(void) {
    PyErr_SetString(err_type(ClosedErr, PyExc_ValueError), "loan already published or discarded");
    return NULL;
}

static PyObject *loan_publish(LoanObject *l, PyObject *nobj, PyObject *timeout);

static PyObject *Loan_publish(LoanObject *l, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"nbytes", "timeout", NULL};
    PyObject *nobj = Py_None, *timeout = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO", kwlist, &nobj, &timeout)) return NULL;
    return loan_publish(l, nobj, timeout);
}

/* publish(nbytes=None, timeout=None), also what leaving `with loan:` does */
static PyObject *loan_publish(LoanObject *l, PyObject *nobj, PyObject *timeout) {
    if (l->state) return loan_closed();
    uint64_t n = l->nbytes;
    if (nobj != Py_None) {
        long long v = PyLong_AsLongLong(nobj);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (v < 0 || (uint64_t)v > l->nbytes) {
            PyErr_Format(PyExc_ValueError, "publish %lld bytes of a %llu-byte loan", v, (unsigned long long)l->nbytes);
            return NULL;
        }
        n = (uint64_t)v;
    }
    PubCoreObject *p = l->pub;
    int64_t deadline;
    int nowait;
    if (parse_deadline(timeout, p->default_timeout_ns, &deadline, &nowait) < 0) return NULL;
    loan_drop_view(l);
    l->state = 1;
    if (p->closed) { block_decref(p, l->block); PyErr_SetString(err_type(ClosedErr, PyExc_RuntimeError), "publisher closed"); return NULL; }
    if (pub_fanout(p, l->block, n, l->type, l->tag, nowait, deadline) < 0) return NULL;
    l->seq = p->seq;
    return PyLong_FromUnsignedLongLong(l->seq);
}

static void loan_discard(LoanObject *l) {
    if (l->state) return;
    loan_drop_view(l);
    l->state = 2;
    if (l->pub->blocks && l->pub->blocks[l->block].refs) block_decref(l->pub, l->block);
}

static PyObject *Loan_discard(LoanObject *l, PyObject *unused) {
    loan_discard(l);
    Py_RETURN_NONE;
}

static PyObject *Loan_get_data(LoanObject *l, void *c) {
    if (l->state) return loan_closed();
    Py_INCREF(l->view);
    return l->view;
}

static PyObject *Loan_enter(LoanObject *l, PyObject *unused) { return Loan_get_data(l, NULL); }

static PyObject *Loan_exit(LoanObject *l, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *et = nargs > 0 ? args[0] : Py_None;
    if (et == Py_None) {
        if (l->state == 0) {
            PyObject *r = loan_publish(l, Py_None, Py_None);
            if (!r) return NULL;
            Py_DECREF(r);
        }
    } else {
        loan_discard(l);
    }
    Py_RETURN_FALSE;
}

static void Loan_dealloc(LoanObject *l) {
    loan_discard(l);
    Py_XDECREF(l->view);
    Py_XDECREF(l->pub);
    PyObject_Free(l);
}

static PyObject *Loan_get_seq(LoanObject *l, void *c) {
    if (l->state != 1) Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(l->seq);
}
static PyObject *Loan_get_nbytes(LoanObject *l, void *c) { return PyLong_FromUnsignedLongLong(l->nbytes); }

static PyMethodDef Loan_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))Loan_publish, METH_VARARGS | METH_KEYWORDS,
     "publish(nbytes=None, timeout=None) -> seq: send the first nbytes (default all) with zero copies."},
    {"discard", (PyCFunction)Loan_discard, METH_NOARGS, "Give the buffer back unsent."},
    {"__enter__", (PyCFunction)Loan_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))Loan_exit, METH_FASTCALL, NULL},
    {NULL},
};
static PyGetSetDef Loan_getset[] = {
    {"data", (getter)Loan_get_data, NULL, "writable memoryview into shared memory", NULL},
    {"seq", (getter)Loan_get_seq, NULL, "sequence number once published, else None", NULL},
    {"nbytes", (getter)Loan_get_nbytes, NULL, NULL, NULL},
    {NULL},
};
static PyTypeObject LoanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless.Loan",
    .tp_basicsize = sizeof(LoanObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A writable buffer in shared memory.  As a context manager: leaving the block publishes, an exception discards.",
    .tp_dealloc = (destructor)Loan_dealloc,
    .tp_methods = Loan_methods,
    .tp_getset = Loan_getset,
};

/* loan(nbytes, type=0, tag=0, timeout=None) -> Loan.  Arguments parsed by
 * hand, as send() does: the generic parser was a tenth of a loan's fixed cost. */
static PyObject *PubCore_loan(PubCoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    static const char *names[] = {"nbytes", "type", "tag", "timeout"};
    PyObject *vals[4] = {NULL, NULL, NULL, Py_None};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 4) { PyErr_SetString(PyExc_TypeError, "loan(nbytes, type=0, tag=0, timeout=None)"); return NULL; }
    for (Py_ssize_t i = 0; i < nargs; i++) vals[i] = args[i];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GET_ITEM(kwnames, i);
        int j = 0;
        while (j < 4 && PyUnicode_CompareWithASCIIString(k, names[j]) != 0) j++;
        if (j == 4) { PyErr_Format(PyExc_TypeError, "loan() got an unexpected keyword argument '%U'", k); return NULL; }
        if (j < nargs) { PyErr_Format(PyExc_TypeError, "loan() got multiple values for argument '%s'", names[j]); return NULL; }
        vals[j] = args[nargs + i];
    }
    if (!vals[0]) { PyErr_SetString(PyExc_TypeError, "loan() missing required argument 'nbytes'"); return NULL; }
    long long n = PyLong_AsLongLong(vals[0]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    unsigned long type = 0;
    unsigned long long tag = 0;
    if (vals[1] && ((type = PyLong_AsUnsignedLong(vals[1])) == (unsigned long)-1 && PyErr_Occurred())) return NULL;
    if (vals[2] && ((tag = PyLong_AsUnsignedLongLong(vals[2])) == (unsigned long long)-1 && PyErr_Occurred())) return NULL;
    PyObject *timeout = vals[3];
    if (n < 0) { PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0"); return NULL; }
    if (type > 0xffffffffUL) { PyErr_SetString(PyExc_OverflowError, "type must fit in 32 bits"); return NULL; }
    if (!self->blocks) { PyErr_SetString(PyExc_RuntimeError, "PubCore not initialised"); return NULL; }
    int64_t b = pub_take(self, (uint64_t)n, timeout);
    if (b < 0) return NULL;
    PyObject *owner = b < self->n_slots ? self->arena : self->blocks[b].mapping;
    PyObject *view = region_view(owner, self->blocks[b].ptr, (Py_ssize_t)n, 0);
    if (!view) { block_decref(self, (uint32_t)b); return NULL; }
    LoanObject *l = PyObject_New(LoanObject, &LoanType);
    if (!l) { Py_DECREF(view); block_decref(self, (uint32_t)b); return NULL; }
    Py_INCREF(self);
    l->pub = self;
    l->view = view;
    l->nbytes = (uint64_t)n;
    l->tag = tag;
    l->type = (uint32_t)type;
    l->block = (uint32_t)b;
    l->state = 0;
    l->seq = 0;
    self->st_loans++;
    return (PyObject *)l;
}

static PyMethodDef PubCore_methods[] = {
    {"send", (PyCFunction)(void (*)(void))PubCore_send, METH_FASTCALL | METH_KEYWORDS,
     "send(obj, type=0, tag=0, timeout=None) -> seq: publish a copy of obj (one copy)."},
    {"loan", (PyCFunction)(void (*)(void))PubCore_loan, METH_FASTCALL | METH_KEYWORDS,
     "loan(nbytes, type=0, tag=0, timeout=None) -> Loan: a writable buffer in shared memory (zero copies)."},
    {"_claim_large", (PyCFunction)PubCore_claim_large, METH_VARARGS, NULL},
    {"_install_large", (PyCFunction)PubCore_install_large, METH_VARARGS, NULL},
    {"_block_state", (PyCFunction)PubCore_block_state, METH_VARARGS, NULL},
    {"_add_sub", (PyCFunction)PubCore_add_sub, METH_VARARGS, NULL},
    {"_remove_sub", (PyCFunction)PubCore_remove_sub, METH_VARARGS, NULL},
    {"_reclaim", (PyCFunction)PubCore_reclaim, METH_NOARGS, NULL},
    {"_queued_large", (PyCFunction)PubCore_queued_large, METH_NOARGS, NULL},
    {"_close_core", (PyCFunction)PubCore_close, METH_NOARGS, NULL},
    {"_doze", (PyCFunction)PubCore_doze, METH_VARARGS, NULL},
    {"_core_stats", (PyCFunction)PubCore_stats, METH_NOARGS, NULL},
    {NULL},
};
static PyGetSetDef PubCore_getset[] = {
    {"_policy", (getter)PubCore_get_policy, NULL, NULL, NULL},
    {"spin", (getter)PubCore_get_spin, (setter)PubCore_set_spin, "seconds a blocked send spins before sleeping", NULL},
    {NULL},
};
static PyMemberDef PubCore_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(PubCoreObject, weakreflist), READONLY},
    {"__dictoffset__", T_PYSSIZET, offsetof(PubCoreObject, dict), READONLY},
    {"_stream_from", T_ULONGLONG, offsetof(PubCoreObject, stream_from), 0, "send() copies this big bypass the caches (0: never)"},
    {NULL},
};

static PyTypeObject PubCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._core.PubCore",
    .tp_basicsize = sizeof(PubCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Publisher mechanism: block table, fan-out to subscriber rings.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PubCore_init,
    .tp_dealloc = (destructor)PubCore_dealloc,
    .tp_traverse = (traverseproc)PubCore_traverse,
    .tp_clear = (inquiry)PubCore_clear,
    .tp_methods = PubCore_methods,
    .tp_getset = PubCore_getset,
    .tp_members = PubCore_members,
    .tp_weaklistoffset = offsetof(PubCoreObject, weakreflist),
    .tp_dictoffset = offsetof(PubCoreObject, dict),
};

/* ================================================================== SubCore + Message */
typedef struct {
    PyObject *mapping; /* Mapping (ro) */
    uint32_t gen;
} LargeEntry;

typedef struct {
    PyObject_HEAD
    PyObject *ctl, *arena, *doorbell; /* Mappings */
    uint8_t *base;
    uint32_t desc_cap, rel_cap, n_slots, slot_size, n_large, n_blocks;
    uint64_t head;     /* our copy of desc head */
    uint64_t rel_tail; /* our copy of release tail */
    uint64_t rel_head; /* the publisher's release head as last read: re-read only when the ring looks full */
    LargeEntry *large;
    uint64_t epoch;    /* bumped on every attach, so stale Messages release nothing */
    int attached;
    int broken;        /* protocol violation seen: every recv raises */
    int64_t spin_ns;
    int64_t next_check_ns; /* non-blocking receives look at the peer's liveness at most this often */
    uint64_t last_seq;
    /* statistics */
    uint64_t st_msgs, st_bytes, st_gaps, st_sleeps, st_wakes_sent, st_in_flight;
    PyObject *weakreflist;
    PyObject *dict;
} SubCoreObject;

/* The one Message type of both APIs (docs/design.md, "One Message type").
 * Two kinds share it:
 * - a pub/sub message (sub != NULL), popped by sub_pop: its payload is in
 *   shared memory and release() gives the slot back.  It references only its
 *   subscriber and a mapping and has no setters, so it cannot be part of a
 *   reference cycle of its own making.  It is allocated as before, without
 *   the GC header (PyObject_New), and Message_is_gc tells the collector so:
 *   tp_is_gc exists for types with collectable and non-collectable instances.
 *   A GC allocation (header, generation count, untrack) cost 3.5 ns more per
 *   message, about 9% of a 64 B try_recv + release.
 * - a messenger message (sub == NULL), made by the constructor, reply() or
 *   _received(): front, data and connection are Python objects, which can
 *   refer back to the message (msg.connection -> ... -> msg), so it is tracked.
 * `tag` is the u64 that pub/sub calls the user tag and the messenger the
 * transaction id (`tid`): the same field under two names. */
typedef struct {
    PyObject_HEAD
    SubCoreObject *sub; /* pub/sub: the subscriber it came from; NULL for a messenger message */
    PyObject *mapping;  /* pub/sub: keeps the payload mapped */
    uint8_t *ptr;       /* pub/sub: the payload */
    uint64_t len, seq, tag, epoch; /* len: pub/sub payload bytes (messenger: data bytes once released) */
    uint32_t type, block, gen;
    int released;
    int is_reply, priority;                    /* messenger: reply flag, dispatch priority (u8) */
    PyObject *front, *data, *connection;       /* messenger: NULL for pub/sub (front reads b"") */
    /* a received messenger message: front and data are base[off:off+len], made the first
     * time they are asked for (most messages are dispatched without looking at them,
     * and two memoryviews were two thirds of a message's objects) */
    PyObject *base;
    Py_ssize_t foff, flen, doff, dlen;
    PyObject *weakreflist;
    uint64_t sent_id; /* messenger: what the last send of it was numbered (0: never sent); see revoke */
} MessageObject;

/* Each send of a messenger message takes the next number, so that Connection.revoke can
 * find what the send queued without a reference to the message (a reference kept it
 * alive for the collector to walk: half the 64 B send rate, measured). */
static uint64_t next_sent_id;

static PyTypeObject SubCoreType, MessageType;

static inline uint64_t *sctl_u64(SubCoreObject *s, size_t off) { return (uint64_t *)(s->base + off); }
static inline uint32_t *sctl_u32(SubCoreObject *s, size_t off) { return (uint32_t *)(s->base + off); }

static void sub_detach(SubCoreObject *self) {
    if (self->large) {
        for (uint32_t i = 0; i < self->n_large; i++) Py_CLEAR(self->large[i].mapping);
        PyMem_Free(self->large);
        self->large = NULL;
    }
    Py_CLEAR(self->ctl);
    Py_CLEAR(self->arena);
    Py_CLEAR(self->doorbell);
    self->base = NULL;
    self->attached = 0;
}

static int SubCore_traverse(SubCoreObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict);
    return 0;
}
static int SubCore_clear(SubCoreObject *self) {
    Py_CLEAR(self->dict);
    return 0;
}
static void SubCore_dealloc(SubCoreObject *self) {
    PyObject_GC_UnTrack(self);
    if (self->weakreflist) PyObject_ClearWeakRefs((PyObject *)self);
    sub_detach(self);
    SubCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _attach(ctl, arena, doorbell, n_slots, slot_size, n_large) */
static PyObject *SubCore_attach(SubCoreObject *self, PyObject *args) {
    PyObject *ctl, *arena, *doorbell;
    unsigned int n_slots, slot_size, n_large;
    if (!PyArg_ParseTuple(args, "O!O!O!III", &MappingType, &ctl, &MappingType, &arena, &MappingType, &doorbell, &n_slots,
                          &slot_size, &n_large))
        return NULL;
    MappingObject *cm = (MappingObject *)ctl, *am = (MappingObject *)arena, *dm = (MappingObject *)doorbell;
    uint32_t *hdr = (uint32_t *)cm->addr;
    uint32_t dcap = hdr[2], rcap = hdr[3];
    uint32_t n_blocks = n_slots + n_large;
    /* Everything the publisher told us is checked before we trust it. */
    if (cm->size < CTL_DESC_RING || hdr[0] != CTL_MAGIC || hdr[1] != WIRE_VERSION || dcap == 0 || (dcap & (dcap - 1)) ||
        rcap < n_blocks || (rcap & (rcap - 1)) || (Py_ssize_t)ctl_size(dcap, rcap) > cm->size || !cm->writable ||
        !dm->writable || dm->size < DB_SIZE || slot_size == 0 || slot_size % 64 ||
        (Py_ssize_t)ARENA_DATA + (Py_ssize_t)n_slots * slot_size > am->size || n_blocks < n_slots) {
        PyErr_SetString(err_type(RemoteProtoErr, PyExc_ValueError), "publisher sent an inconsistent segment layout");
        return NULL;
    }
    sub_detach(self);
    self->large = PyMem_Calloc(n_large ? n_large : 1, sizeof(LargeEntry));
    if (!self->large) return PyErr_NoMemory();
    Py_INCREF(ctl); self->ctl = ctl;
    Py_INCREF(arena); self->arena = arena;
    Py_INCREF(doorbell); self->doorbell = doorbell;
    self->base = cm->addr;
    self->desc_cap = dcap;
    self->rel_cap = rcap;
    self->n_slots = n_slots;
    self->slot_size = slot_size;
    self->n_large = n_large;
    self->n_blocks = n_blocks;
    self->head = LOAD_ACQ(sctl_u64(self, CTL_DESC_HEAD));
    self->rel_tail = LOAD_ACQ(sctl_u64(self, CTL_REL_TAIL));
    self->rel_head = LOAD_ACQ(sctl_u64(self, CTL_REL_HEAD));
    self->epoch++;
    self->attached = 1;
    self->broken = 0;
    self->last_seq = LOAD_ACQ(sctl_u64(self, CTL_START_SEQ));
    Py_RETURN_NONE;
}

static PyObject *SubCore_detach(SubCoreObject *self, PyObject *unused) {
    sub_detach(self);
    self->epoch++;
    Py_RETURN_NONE;
}

/* _set_large(block, gen, mapping|None) */
static PyObject *SubCore_set_large(SubCoreObject *self, PyObject *args) {
    unsigned int b, gen;
    PyObject *m;
    if (!PyArg_ParseTuple(args, "IIO", &b, &gen, &m)) return NULL;
    if (!self->attached || b < self->n_slots || b >= self->n_blocks) {
        PyErr_SetString(err_type(RemoteProtoErr, PyExc_ValueError), "large segment for a block id out of range");
        return NULL;
    }
    LargeEntry *e = &self->large[b - self->n_slots];
    if (m == Py_None) { Py_CLEAR(e->mapping); e->gen = 0; Py_RETURN_NONE; }
    if (!PyObject_TypeCheck(m, &MappingType)) { PyErr_SetString(PyExc_TypeError, "Mapping required"); return NULL; }
    Py_INCREF(m);
    Py_XSETREF(e->mapping, m);
    e->gen = gen;
    Py_RETURN_NONE;
}

/* _large_gen(block) -> gen of the segment installed for a large block (0: none) */
static PyObject *SubCore_large_gen(SubCoreObject *self, PyObject *args) {
    unsigned int b;
    if (!PyArg_ParseTuple(args, "I", &b)) return NULL;
    if (!self->attached || b < self->n_slots || b >= self->n_blocks) return PyLong_FromLong(0);
    LargeEntry *e = &self->large[b - self->n_slots];
    return PyLong_FromUnsignedLong(e->mapping ? e->gen : 0);
}

static inline void ring_doorbell(SubCoreObject *self) {
    /* the seq_cst operation before this (CAS or store) orders our ring
     * update before this load; pairs with the publisher's pub_sleep */
    uint8_t *db = ((MappingObject *)self->doorbell)->addr;
    if (LOAD_SC((uint32_t *)(db + DB_PUB_WAITING))) {
        /* wake only when the publisher's credit runs out, exactly once */
        if (__atomic_fetch_sub((int32_t *)(db + DB_CREDIT), 1, __ATOMIC_SEQ_CST) == 1) {
            __atomic_fetch_add((uint32_t *)(db + DB_SEQ), 1, __ATOMIC_SEQ_CST);
            futex_wake_all((uint32_t *)(db + DB_SEQ));
            self->st_wakes_sent++;
        }
    }
}

static PyObject *sub_protocol_error(SubCoreObject *self, const char *what) {
    self->broken = 1;
    PyErr_Format(err_type(RemoteProtoErr, PyExc_ValueError), "publisher broke the protocol: %s", what);
    return NULL;
}

/* Pop one descriptor.  Returns a Message, Py_None (new ref) when empty, NULL on error. */
static PyObject *sub_pop(SubCoreObject *self) {
    if (!self->attached) { Py_RETURN_NONE; }
    if (self->broken) return sub_protocol_error(self, "(earlier violation)");
    uint64_t *tailp = sctl_u64(self, CTL_DESC_TAIL), *headp = sctl_u64(self, CTL_DESC_HEAD);
    uint8_t desc[DESC_SIZE];
    for (;;) {
        uint64_t tail = LOAD_ACQ(tailp);
        uint64_t head = self->head;
        if (tail == head) Py_RETURN_NONE;
        if (tail - head > self->desc_cap) {
            /* either the publisher overwrote (moved head past us) or the tail is garbage */
            uint64_t h2 = LOAD_ACQ(headp);
            if (h2 != head && tail - h2 <= self->desc_cap) { self->head = h2; continue; }
            return sub_protocol_error(self, "descriptor ring indices out of range");
        }
        memcpy(desc, self->base + CTL_DESC_RING + (size_t)(head & (self->desc_cap - 1)) * DESC_SIZE, DESC_SIZE);
        uint64_t expect = head;
        if (__atomic_compare_exchange_n(headp, &expect, head + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            self->head = head + 1;
            break;
        }
        self->head = expect; /* the publisher took it back (overwrite-oldest) */
    }
    ring_doorbell(self);
    uint32_t b, gen, type;
    uint64_t len, seq, tag;
    memcpy(&b, desc + 0, 4);
    memcpy(&gen, desc + 4, 4);
    memcpy(&len, desc + 8, 8);
    memcpy(&seq, desc + 16, 8);
    memcpy(&tag, desc + 24, 8);
    memcpy(&type, desc + 32, 4);
    PyObject *mapping;
    uint8_t *ptr;
    if (b < self->n_slots) {
        if (len > self->slot_size) return sub_protocol_error(self, "length exceeds the slot size");
        mapping = self->arena;
        ptr = ((MappingObject *)mapping)->addr + ARENA_DATA + (size_t)b * self->slot_size;
    } else if (b < self->n_blocks) {
        LargeEntry *e = &self->large[b - self->n_slots];
        if (!e->mapping || e->gen != gen) {
            /* the segment's fd is waiting on the control socket */
            PyObject *r = PyObject_CallMethod((PyObject *)self, "_fetch_segment", "II", b, gen);
            if (!r) { self->broken = 1; return NULL; }
            Py_DECREF(r);
            if (!self->attached) return sub_protocol_error(self, "detached while fetching a segment");
            e = &self->large[b - self->n_slots];
            if (!e->mapping || e->gen != gen) return sub_protocol_error(self, "descriptor names an unknown segment");
        }
        mapping = e->mapping;
        if (len > (uint64_t)((MappingObject *)mapping)->size) return sub_protocol_error(self, "length exceeds its segment");
        ptr = ((MappingObject *)mapping)->addr;
    } else {
        return sub_protocol_error(self, "descriptor names a block out of range");
    }
    /* allocated without a GC header: Message_is_gc says so (see MessageObject) */
    MessageObject *m = PyObject_New(MessageObject, &MessageType);
    if (!m) return NULL;
    Py_INCREF(self);
    m->sub = self;
    Py_INCREF(mapping);
    m->mapping = mapping;
    m->ptr = ptr;
    m->len = len;
    m->seq = seq;
    m->tag = tag;
    m->type = type;
    m->block = b;
    m->gen = gen;
    m->epoch = self->epoch;
    m->released = 0;
    m->is_reply = 0;
    m->priority = 0;
    m->front = m->data = m->connection = m->base = NULL;
    m->weakreflist = NULL;
    m->sent_id = 0;
    if (seq != self->last_seq + 1) self->st_gaps++;
    self->last_seq = seq;
    self->st_msgs++;
    self->st_bytes += len;
    self->st_in_flight++;
    return (PyObject *)m;
}

static int message_release(MessageObject *m) {
    if (m->released) return 0;
    m->released = 1;
    SubCoreObject *s = m->sub;
    /* views still alive keep pointing at mapped memory (never a crash), but
     * the publisher may reuse it from now on: that is what release() means */
    s->st_in_flight--;
    if (!s->attached || s->epoch != m->epoch) return 0;
    /* the publisher writes its head at every drain: reading that line at every
     * release would pull it across cores each time, so only when our old copy
     * says the ring is full (the cached opposite index of the descriptor ring) */
    if (s->rel_tail - s->rel_head >= s->rel_cap) s->rel_head = LOAD_ACQ(sctl_u64(s, CTL_REL_HEAD));
    if (s->rel_tail - s->rel_head >= s->rel_cap) {
        /* impossible with an honest publisher: it sized the ring for every block */
        s->broken = 1;
        PyErr_SetString(err_type(RemoteProtoErr, PyExc_ValueError), "release ring full: publisher is not draining it");
        return -1;
    }
    uint32_t ent[2] = {m->block, m->gen};
    memcpy(s->base + ctl_rel_ring_off(s->desc_cap) + (size_t)(s->rel_tail & (s->rel_cap - 1)) * REL_SIZE, ent, REL_SIZE);
    s->rel_tail++;
    STORE_SC(sctl_u64(s, CTL_REL_TAIL), s->rel_tail);
    ring_doorbell(s);
    return 0;
}

/* Wait (GIL released) until the ring is non-empty, the publisher closed, or
 * the time slice ends.  Spins first; then raises the waiter flag and sleeps
 * on the futex.  Returns True if something may be ready. */
static int sub_ready(SubCoreObject *self) {
    return LOAD_ACQ(sctl_u64(self, CTL_DESC_TAIL)) != self->head || LOAD_ACQ(sctl_u32(self, CTL_PUB_CLOSED));
}

static PyObject *SubCore_wait(SubCoreObject *self, PyObject *args) {
    double t;
    if (!PyArg_ParseTuple(args, "d", &t)) return NULL;
    if (!self->attached) Py_RETURN_TRUE;
    if (sub_ready(self)) Py_RETURN_TRUE;
    int64_t slice = (int64_t)(t * 1e9);
    if (slice > WAIT_SLICE_NS * 4) slice = WAIT_SLICE_NS * 4;
    int ready = 0;
    int64_t spin = self->spin_ns;
    uint32_t *waiter = sctl_u32(self, CTL_SUB_WAITER);
    Py_BEGIN_ALLOW_THREADS
    int64_t start = now_ns(), end = start + (spin < slice ? spin : slice), next_yield = start + SPIN_YIELD_NS;
    unsigned i = 0;
    while (!(ready = sub_ready(self))) {
        cpu_relax();
        if ((++i & 63) == 0) {
            int64_t now = now_ns();
            if (now >= end) break;
            spin_yield(now, &next_yield);
        }
    }
    if (!ready && slice > 0) {
        STORE_SC(waiter, 1);
        if (!(ready = sub_ready(self))) {
            int64_t left = start + slice - now_ns();
            if (left > 0) {
                self->st_sleeps++;
                futex_wait_ns(waiter, 1, left);
            }
            ready = sub_ready(self);
        }
        STORE_SC(waiter, 0);
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ready);
}

/* _arm_eventfd() -> bool: raise the waiter flag for eventfd wake-ups (asyncio).
 * Returns True if data arrived meanwhile (then the flag is lowered again). */
static PyObject *SubCore_arm_eventfd(SubCoreObject *self, PyObject *unused) {
    if (!self->attached) Py_RETURN_TRUE;
    uint32_t *waiter = sctl_u32(self, CTL_SUB_WAITER);
    STORE_SC(waiter, 2);
    if (sub_ready(self)) { STORE_SC(waiter, 0); Py_RETURN_TRUE; }
    self->st_sleeps++;
    Py_RETURN_FALSE;
}
static PyObject *SubCore_disarm(SubCoreObject *self, PyObject *unused) {
    if (self->attached) STORE_SC(sctl_u32(self, CTL_SUB_WAITER), 0);
    Py_RETURN_NONE;
}

#define PEER_CHECK_NS 50000000LL

/* The ring is empty: look at the publisher's liveness if that is due (a system
 * call, so at most every PEER_CHECK_NS).  Returns a Message it published just
 * before going, Py_None, or NULL with PeerLost/ClosedError set. */
static PyObject *sub_empty(SubCoreObject *self) {
    int64_t now = now_ns();
    if (self->attached && !self->broken && now < self->next_check_ns && !LOAD_ACQ(sctl_u32(self, CTL_PUB_CLOSED)))
        Py_RETURN_NONE;
    self->next_check_ns = now + PEER_CHECK_NS;
    PyObject *r = PyObject_CallMethod((PyObject *)self, "_check_peer_or_last", NULL);
    return r;
}

/* recv_nowait() -> Message, or raise WouldBlock */
static PyObject *SubCore_recv_nowait(SubCoreObject *self, PyObject *unused) {
    PyObject *m = sub_pop(self);
    if (m != Py_None) return m;
    Py_DECREF(m);
    m = sub_empty(self);
    if (m != Py_None) return m;
    Py_DECREF(m);
    PyErr_SetString(err_type(WouldBlockError, PyExc_BlockingIOError), "nothing queued");
    return NULL;
}

/* try_recv() -> Message or None: the cheapest poll (no exception when empty) */
static PyObject *SubCore_try_recv_public(SubCoreObject *self, PyObject *unused) {
    PyObject *m = sub_pop(self);
    if (m != Py_None) return m;
    Py_DECREF(m);
    return sub_empty(self);
}

/* recv(timeout=None) -> Message: fast path here, waiting in Python. */
static PyObject *SubCore_recv(SubCoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *timeout = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 1 || nargs + nkw > 1) { PyErr_SetString(PyExc_TypeError, "recv(timeout=None)"); return NULL; }
    if (nargs == 1) timeout = args[0];
    if (nkw == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "timeout") != 0) {
            PyErr_SetString(PyExc_TypeError, "recv(timeout=None)"); return NULL;
        }
        timeout = args[0];
    }
    PyObject *m = sub_pop(self);
    if (m != Py_None) return m;
    Py_DECREF(m);
    return PyObject_CallMethod((PyObject *)self, "_recv_slow", "O", timeout);
}

static PyObject *SubCore_try_recv(SubCoreObject *self, PyObject *unused) { return sub_pop(self); }

static PyObject *SubCore_pub_closed(SubCoreObject *self, PyObject *unused) {
    if (!self->attached) Py_RETURN_FALSE;
    return PyBool_FromLong(LOAD_ACQ(sctl_u32(self, CTL_PUB_CLOSED)) != 0);
}

static PyObject *SubCore_stats(SubCoreObject *self, PyObject *unused) {
    uint64_t queued = 0;
    if (self->attached) queued = LOAD_ACQ(sctl_u64(self, CTL_DESC_TAIL)) - self->head;
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "messages", (unsigned long long)self->st_msgs, "bytes",
                         (unsigned long long)self->st_bytes, "gaps", (unsigned long long)self->st_gaps, "sleeps",
                         (unsigned long long)self->st_sleeps, "wakeups_sent", (unsigned long long)self->st_wakes_sent,
                         "in_flight", (unsigned long long)self->st_in_flight, "queued", (unsigned long long)queued);
}

static PyObject *SubCore_get_spin(SubCoreObject *self, void *c) { return PyFloat_FromDouble(self->spin_ns / 1e9); }
static int SubCore_set_spin(SubCoreObject *self, PyObject *v, void *c) { return set_seconds(&self->spin_ns, v); }

static PyMethodDef SubCore_methods[] = {
    {"recv", (PyCFunction)(void (*)(void))SubCore_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv(timeout=None) -> Message: the next message, waiting up to timeout seconds."},
    {"recv_nowait", (PyCFunction)SubCore_recv_nowait, METH_NOARGS, "recv_nowait() -> Message, or raise WouldBlock."},
    {"try_recv", (PyCFunction)SubCore_try_recv_public, METH_NOARGS,
     "try_recv() -> Message or None: like recv_nowait, but None instead of WouldBlock (cheapest to poll)."},
    {"_try_recv", (PyCFunction)SubCore_try_recv, METH_NOARGS, NULL},
    {"_attach", (PyCFunction)SubCore_attach, METH_VARARGS, NULL},
    {"_detach", (PyCFunction)SubCore_detach, METH_NOARGS, NULL},
    {"_set_large", (PyCFunction)SubCore_set_large, METH_VARARGS, NULL},
    {"_large_gen", (PyCFunction)SubCore_large_gen, METH_VARARGS, NULL},
    {"_wait", (PyCFunction)SubCore_wait, METH_VARARGS, NULL},
    {"_arm_eventfd", (PyCFunction)SubCore_arm_eventfd, METH_NOARGS, NULL},
    {"_disarm", (PyCFunction)SubCore_disarm, METH_NOARGS, NULL},
    {"_pub_closed", (PyCFunction)SubCore_pub_closed, METH_NOARGS, NULL},
    {"_core_stats", (PyCFunction)SubCore_stats, METH_NOARGS, NULL},
    {NULL},
};
static PyGetSetDef SubCore_getset[] = {
    {"spin", (getter)SubCore_get_spin, (setter)SubCore_set_spin, "seconds to spin before sleeping", NULL},
    {NULL},
};

static PyTypeObject SubCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._core.SubCore",
    .tp_basicsize = sizeof(SubCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Subscriber mechanism: descriptor ring consumer, release ring producer.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)SubCore_dealloc,
    .tp_traverse = (traverseproc)SubCore_traverse,
    .tp_clear = (inquiry)SubCore_clear,
    .tp_methods = SubCore_methods,
    .tp_getset = SubCore_getset,
    .tp_weaklistoffset = offsetof(SubCoreObject, weakreflist),
    .tp_dictoffset = offsetof(SubCoreObject, dict),
};

/* ---------------------------------------------------------------- Message */
static PyObject *empty_bytes; /* b"": the default front, and the front of every pub/sub message */

static PyObject *msg_closed(void) {
    PyErr_SetString(err_type(ClosedErr, PyExc_ValueError), "message already released");
    return NULL;
}

/* A buffer of plain bytes, one after the other. */
static inline int flat_bytes(const Py_buffer *b) {
    return b->ndim == 1 && b->itemsize == 1 && (!b->strides || b->strides[0] == 1) && !b->suboffsets;
}

/* base[off:off + len] as a memoryview that shares base's managed buffer (as a slice
 * does), without the slice and index objects a slice costs: what memoryview's own
 * slicing does to a 1-D byte view.  Anything else takes the generic path. */
static PyObject *sub_view(PyObject *base, Py_ssize_t off, Py_ssize_t len) {
    if (PyMemoryView_Check(base)) {
        Py_buffer *b = &((PyMemoryViewObject *)base)->view;
        if (flat_bytes(b) && off >= 0 && len >= 0 && off + len <= b->len) {
            PyObject *v = PyMemoryView_FromObject(base); /* a new view on the same managed buffer */
            if (!v) return NULL;
            Py_buffer *w = &((PyMemoryViewObject *)v)->view;
            w->buf = (char *)b->buf + off;
            w->len = len;
            w->shape[0] = len;
            return v;
        }
    }
    return PySequence_GetSlice(base, off, off + len);
}

/* A received message's front and data, made on first use (see MessageObject). */
static int msg_lazy(MessageObject *m) {
    if (!m->base) return 0;
    if (!m->front && !(m->front = sub_view(m->base, m->foff, m->flen))) return -1;
    if (!m->data && !(m->data = sub_view(m->base, m->doff, m->dlen))) return -1;
    Py_CLEAR(m->base);
    return 0;
}

/* An int in [0, max] (anything with __index__), else ConfigurationError naming the field. */
static int msg_uint(PyObject *v, uint64_t max, const char *what, uint64_t *out) {
    PyObject *i = PyNumber_Index(v);
    if (!i) return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(i);
    Py_DECREF(i);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
        PyErr_Clear();
    } else if (x <= max) {
        *out = x;
        return 0;
    }
    PyErr_Format(err_type(ConfigErr, PyExc_ValueError), "message %s must be in [0, %llu]", what, (unsigned long long)max);
    return -1;
}

static int msg_check_front(PyObject *front) {
    if (PyObject_CheckBuffer(front)) return 0;
    PyErr_Format(PyExc_TypeError, "front must be a bytes-like object, not %.100s", Py_TYPE(front)->tp_name);
    return -1;
}

/* Every item of a list or tuple is a buffer. */
static int msg_check_items(PyObject *seq) {
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyObject_CheckBuffer(o)) {
            PyErr_Format(PyExc_TypeError, "data[%zd] is a %.100s, not a bytes-like object", i, Py_TYPE(o)->tp_name);
            return -1;
        }
    }
    return 0;
}

/* data as the constructor takes it: nothing (NULL) is [], one buffer becomes
 * [buf], a sequence of buffers a new list (the caller's is not aliased). */
static PyObject *msg_data_list(PyObject *data) {
    if (!data) return PyList_New(0);
    if (PyObject_CheckBuffer(data)) {
        PyObject *l = PyList_New(1);
        if (l) PyList_SET_ITEM(l, 0, Py_NewRef(data));
        return l;
    }
    if (PyUnicode_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be a buffer or a sequence of buffers, not str");
        return NULL;
    }
    PyObject *l = PySequence_List(data);
    if (!l) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "data must be a buffer or a sequence of buffers, not %.100s",
                         Py_TYPE(data)->tp_name);
        }
        return NULL;
    }
    if (msg_check_items(l) < 0) { Py_DECREF(l); return NULL; }
    return l;
}

/* Bytes in one buffer (any shape), or -1 with an error set. */
static Py_ssize_t buf_nbytes(PyObject *o) {
    if (PyBytes_CheckExact(o)) return PyBytes_GET_SIZE(o);
    Py_buffer v;
    if (PyObject_GetBuffer(o, &v, PyBUF_FULL_RO) < 0) return -1;
    Py_ssize_t n = v.len;
    PyBuffer_Release(&v);
    return n;
}

/* Bytes in a messenger message's data: one buffer, or a sequence of them. */
static Py_ssize_t data_nbytes(PyObject *data) {
    if (PyObject_CheckBuffer(data)) return buf_nbytes(data);
    PyObject *seq = PySequence_Fast(data, "message data must be a buffer or a sequence of buffers");
    if (!seq) return -1;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq) && total >= 0; i++) {
        PyObject *o = Py_NewRef(PySequence_Fast_GET_ITEM(seq, i));
        Py_ssize_t n = buf_nbytes(o);
        Py_DECREF(o);
        total = n < 0 ? -1 : total + n;
    }
    Py_DECREF(seq);
    return total;
}

static Py_ssize_t msg_nbytes(MessageObject *m) {
    if (m->base && !m->data && !m->released) return m->dlen;
    return m->sub || m->released ? (Py_ssize_t)m->len : data_nbytes(m->data);
}

/* A messenger message's release(): drop front and data.  What the session
 * still has to send (or resend) it holds by its own references. */
static int msgr_release(MessageObject *m) {
    if (m->released) return 0;
    Py_ssize_t n = m->base && !m->data ? m->dlen : data_nbytes(m->data);
    Py_CLEAR(m->base);
    if (n < 0) { PyErr_Clear(); n = 0; } /* a non-buffer set into a data list: nothing to count */
    m->len = (uint64_t)n;
    m->released = 1;
    Py_CLEAR(m->front);
    Py_CLEAR(m->data);
    return 0;
}

static int msg_release(MessageObject *m) { return m->sub ? message_release(m) : msgr_release(m); }

/* A zeroed messenger message, not yet tracked. */
static MessageObject *msg_alloc(void) {
    MessageObject *m = PyObject_GC_New(MessageObject, &MessageType);
    if (m) memset((char *)m + sizeof(PyObject), 0, sizeof(MessageObject) - sizeof(PyObject));
    return m;
}

/* An outgoing message: front and data as the constructor takes them. */
static PyObject *msg_make(uint32_t type, PyObject *front, PyObject *data, uint64_t tid, int priority, int is_reply) {
    if (msg_check_front(front) < 0) return NULL;
    PyObject *list = msg_data_list(data);
    if (!list) return NULL;
    MessageObject *m = msg_alloc();
    if (!m) { Py_DECREF(list); return NULL; }
    m->type = type;
    m->tag = tid;
    m->priority = priority;
    m->is_reply = is_reply;
    m->front = Py_NewRef(front);
    m->data = list;
    PyObject_GC_Track(m);
    return (PyObject *)m;
}

/* Message(type, front=b"", data=(), tid=0, priority=0) */
static PyObject *Message_new(PyTypeObject *cls, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"type", "front", "data", "tid", "priority", NULL};
    PyObject *type_o, *front = empty_bytes, *data = NULL, *tid_o = NULL, *prio_o = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OOOO:Message", kwlist, &type_o, &front, &data, &tid_o, &prio_o))
        return NULL;
    uint64_t type, tid = 0, prio = 0;
    if (msg_uint(type_o, UINT32_MAX, "type", &type) < 0) return NULL;
    if (tid_o && msg_uint(tid_o, UINT64_MAX, "tid", &tid) < 0) return NULL;
    if (prio_o && msg_uint(prio_o, 255, "priority", &prio) < 0) return NULL;
    return msg_make((uint32_t)type, front, data, tid, (int)prio, 0);
}

/* Vectorcall arguments (type, front, data, tid, priority), the first `n` of them, into v
 * (NULL: not given), for fn ("Message" or "reply"): a small message's construction is
 * half argument parsing through an args tuple and a kwargs dict. */
static int msg_args(const char *fn, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **v, int n) {
    static const char *names[5] = {"type", "front", "data", "tid", "priority"};
    static PyObject *interned[5]; /* keyword names in code are interned: a pointer compare finds them */
    if (!interned[0])
        for (int j = 0; j < 5; j++)
            if (!(interned[j] = PyUnicode_InternFromString(names[j]))) return -1;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, n, nargs);
        return -1;
    }
    for (int j = 0; j < n; j++) v[j] = j < nargs ? args[j] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < n && name != interned[j]) j++;
        if (j == n)
            for (j = 0; j < n && !_PyUnicode_EqualToASCIIString(name, names[j]);) j++;
        if (j == n) {
            PyErr_Format(PyExc_TypeError, "'%U' is an invalid keyword argument for %s()", name, fn);
            return -1;
        }
        if (v[j]) {
            PyErr_Format(PyExc_TypeError, "argument for %s() given by name ('%s') and position (%d)", fn, names[j], j + 1);
            return -1;
        }
        v[j] = args[nargs + k];
    }
    if (!v[0]) {
        PyErr_Format(PyExc_TypeError, "%s() missing required argument 'type' (pos 1)", fn);
        return -1;
    }
    return 0;
}

/* A message's type: an int in 0..2**32-1 (an exact int without PyNumber_Index). */
static int msg_type(PyObject *o, uint64_t *type) {
    if (PyLong_CheckExact(o)) {
        unsigned long t = PyLong_AsUnsignedLong(o);
        if (!(t == (unsigned long)-1 && PyErr_Occurred()) && t <= UINT32_MAX) {
            *type = t;
            return 0;
        }
        PyErr_Clear();
    }
    return msg_uint(o, UINT32_MAX, "type", type);
}

/* Message(...) as the type's vectorcall (see msg_args). */
static PyObject *Message_vectorcall(PyObject *cls, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *v[5];
    if (msg_args("Message", args, PyVectorcall_NARGS(nargsf), kwnames, v, 5) < 0) return NULL;
    uint64_t type, tid = 0, prio = 0;
    if (msg_type(v[0], &type) < 0) return NULL;
    if (v[3] && msg_uint(v[3], UINT64_MAX, "tid", &tid) < 0) return NULL;
    if (v[4] && msg_uint(v[4], 255, "priority", &prio) < 0) return NULL;
    return msg_make((uint32_t)type, v[1] ? v[1] : empty_bytes, v[2], tid, (int)prio, 0);
}

/* Message._received(type, front, data, tid, priority, seq, is_reply, connection):
 * the messenger's received message in one call, from fields its session has
 * already verified (ints from the header, front and data as memoryviews).
 * data is kept as it is, one buffer. */
static PyObject *capi_received(uint32_t type, PyObject *front, PyObject *data, uint64_t tid, int priority, uint64_t seq,
                               int is_reply, PyObject *connection);

static PyObject *Message_received(PyObject *cls, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "_received(type, front, data, tid, priority, seq, is_reply, connection)");
        return NULL;
    }
    unsigned long type = PyLong_AsUnsignedLong(args[0]);
    unsigned long long tid = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long prio = PyLong_AsUnsignedLong(args[4]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[5]);
    int is_reply = PyObject_IsTrue(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (type > UINT32_MAX || prio > 255) {
        PyErr_SetString(err_type(ConfigErr, PyExc_ValueError), "message type or priority out of range");
        return NULL;
    }
    return capi_received((uint32_t)type, args[1], args[2], tid, (int)prio, seq, is_reply, args[7]);
}

/* ---------------------------------------------------------------- the C API (_capi.h) */
/* A received message's header fields (its segments are the caller's to set). */
static MessageObject *msg_received(uint32_t type, uint64_t tid, int priority, uint64_t seq, int is_reply,
                                   PyObject *connection) {
    MessageObject *m = msg_alloc();
    if (!m) return NULL;
    m->type = type;
    m->tag = tid;
    m->priority = priority;
    m->seq = seq;
    m->is_reply = is_reply;
    m->connection = connection == NULL || connection == Py_None ? NULL : Py_NewRef(connection);
    return m;
}

static PyObject *capi_received(uint32_t type, PyObject *front, PyObject *data, uint64_t tid, int priority, uint64_t seq,
                               int is_reply, PyObject *connection) {
    MessageObject *m = msg_received(type, tid, priority, seq, is_reply, connection);
    if (!m) return NULL;
    m->front = Py_NewRef(front);
    m->data = Py_NewRef(data);
    PyObject_GC_Track(m);
    return (PyObject *)m;
}

/* A received message whose front and data are views of base made on first use, not yet
 * tracked by the collector: its receiver tracks it if it outlives its dispatch
 * (capi_track_kept).  Until then it is only in the receiver's list, so it cannot be
 * part of a cycle the collector would need to see. */
static PyObject *capi_received_lazy(uint32_t type, PyObject *base, Py_ssize_t foff, Py_ssize_t flen, Py_ssize_t doff,
                                    Py_ssize_t dlen, uint64_t tid, int priority, uint64_t seq, int is_reply,
                                    PyObject *connection) {
    MessageObject *m = msg_received(type, tid, priority, seq, is_reply, connection);
    if (!m) return NULL;
    m->base = Py_NewRef(base);
    m->foff = foff;
    m->flen = flen;
    m->doff = doff;
    m->dlen = dlen;
    return (PyObject *)m;
}

/* _track_kept(messages): track those that something besides the list still holds. */
static PyObject *mod_track_kept(PyObject *mod, PyObject *list) {
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "_track_kept() takes a list");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); i++) {
        PyObject *o = PyList_GET_ITEM(list, i);
        if (Py_REFCNT(o) > 1 && Py_IS_TYPE(o, &MessageType) && !PyObject_GC_IsTracked(o)) PyObject_GC_Track(o);
    }
    Py_RETURN_NONE;
}

static PyObject *Message_get_buffers(MessageObject *m, void *c);

static int capi_outgoing(PyObject *o, CopylessOutFields *out) {
    if (!PyObject_TypeCheck(o, &MessageType)) {
        PyErr_Format(PyExc_TypeError, "send() takes a copyless.Message, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    MessageObject *m = (MessageObject *)o;
    PyObject *bufs = Message_get_buffers(m, NULL); /* raises if released; makes lazy views */
    if (!bufs) return -1;
    out->type = m->type;
    out->priority = m->priority;
    out->is_reply = m->is_reply;
    out->tid = m->tag;
    out->front = Py_NewRef(m->sub ? empty_bytes : m->front);
    out->buffers = bufs;
    out->sent_id = m->sent_id = ++next_sent_id; /* (with the GIL) */
    return 0;
}

static int capi_reply_tid(PyObject *o, uint64_t *tid) {
    if (!Py_IS_TYPE(o, &MessageType)) return -1;
    *tid = ((MessageObject *)o)->tag;
    return ((MessageObject *)o)->is_reply != 0;
}

static int capi_data_into(PyObject *o, PyObject *into) {
    if (!Py_IS_TYPE(o, &MessageType) || !PyMemoryView_Check(into)) return 0;
    MessageObject *m = (MessageObject *)o;
    if (m->sub || m->released) return 0;
    Py_buffer *src; /* the data's buffer, and where in it */
    Py_ssize_t off, n;
    if (!m->data && m->base && PyMemoryView_Check(m->base)) { /* not made yet: read it from base */
        src = PyMemoryView_GET_BUFFER(m->base);
        off = m->doff;
        n = m->dlen;
    } else if (m->data && PyMemoryView_Check(m->data)) {
        src = PyMemoryView_GET_BUFFER(m->data);
        off = 0;
        n = src->len;
    } else {
        return 0;
    }
    Py_buffer *dst = PyMemoryView_GET_BUFFER(into);
    if (!flat_bytes(src) || off + n > src->len || !flat_bytes(dst) || dst->readonly || dst->len < n ||
        dst->obj == src->obj)
        return 0;
    memcpy(dst->buf, (const char *)src->buf + off, (size_t)n);
    PyObject *v = sub_view(into, 0, n);
    if (!v) return -1;
    Py_XSETREF(m->data, v);
    return 1;
}

static Py_ssize_t capi_ipc_send(PyObject *chan, const struct iovec *iov, Py_ssize_t n);
static Py_ssize_t capi_ipc_recv(PyObject *chan, void *dst, Py_ssize_t len);
static int capi_ipc_take(PyObject *chan);
static int capi_ipc_before_wait(PyObject *chan);
static int capi_ipc_give_back(PyObject *chan, int woke);
static PyTypeObject IpcChannelType;
static CopylessCAPI capi = {COPYLESS_CAPI_VERSION, &MessageType,         capi_received,       capi_outgoing,
                            capi_received_lazy,    &IpcChannelType,      capi_ipc_send,       capi_ipc_recv,
                            capi_reply_tid,        capi_ipc_take,        capi_ipc_before_wait, capi_ipc_give_back,
                            capi_data_into};

/* Which instances the collector may look at: the messenger's (see MessageObject). */
static int Message_is_gc(MessageObject *m) { return m->sub == NULL; }

static void Message_dealloc(MessageObject *m) {
    if (m->weakreflist) PyObject_ClearWeakRefs((PyObject *)m);
    if (m->sub) { /* pub/sub: give the slot back; allocated without a GC header */
        if (!m->released) {
            PyObject *et, *ev, *tb;
            PyErr_Fetch(&et, &ev, &tb);
            if (message_release(m) < 0) PyErr_WriteUnraisable((PyObject *)m);
            PyErr_Restore(et, ev, tb);
        }
        Py_DECREF(m->mapping);
        Py_DECREF(m->sub);
        PyObject_Free(m);
        return;
    }
    PyObject_GC_UnTrack(m);
    Py_XDECREF(m->front);
    Py_XDECREF(m->data);
    Py_XDECREF(m->connection);
    Py_XDECREF(m->base);
    PyObject_GC_Del(m);
}

static int Message_traverse(MessageObject *m, visitproc visit, void *arg) {
    Py_VISIT(m->front);
    Py_VISIT(m->data);
    Py_VISIT(m->connection);
    Py_VISIT(m->base);
    return 0;
}

static int Message_clear(MessageObject *m) {
    m->released = 1;      /* the getters must not see the NULLs */
    Py_CLEAR(m->front);
    Py_CLEAR(m->data);
    Py_CLEAR(m->connection);
    Py_CLEAR(m->base);
    return 0;
}

/* The one buffer of a messenger message's data (new reference): the data
 * itself, or the only item of a list or tuple.  NULL, no error set, when it
 * has none or several (*count says how many, -1 for neither kind). */
static PyObject *msg_single(MessageObject *m, Py_ssize_t *count) {
    if (msg_lazy(m) < 0) {
        *count = -2;
        return NULL;
    }
    PyObject *d = m->data;
    if (PyObject_CheckBuffer(d)) { *count = 1; return Py_NewRef(d); }
    if (PyList_Check(d) || PyTuple_Check(d)) {
        *count = PySequence_Fast_GET_SIZE(d);
        return *count == 1 ? Py_NewRef(PySequence_Fast_GET_ITEM(d, 0)) : NULL;
    }
    *count = -1;
    return NULL;
}

static int Message_getbuffer(MessageObject *m, Py_buffer *view, int flags) {
    view->obj = NULL;
    if (m->released) { msg_closed(); return -1; }
    if (m->sub) return PyBuffer_FillInfo(view, (PyObject *)m, m->ptr, (Py_ssize_t)m->len, 1, flags);
    /* A messenger message lends the buffer of its data, when that is one
     * buffer: the view then refers to that buffer, not to the message. */
    Py_ssize_t count;
    PyObject *one = msg_single(m, &count);
    if (!one) {
        if (count == -2) return -1; /* making its views failed */
        if (count < 0)
            PyErr_SetString(PyExc_TypeError, "this message's data is not a buffer or a sequence of buffers");
        else
            PyErr_Format(PyExc_TypeError,
                         "this message's data is %zd buffers, not one: use msg.data (or msg.tobytes() for a copy)", count);
        return -1;
    }
    /* a message is a buffer itself, so its data may hold it: RecursionError, not a crash */
    if (Py_EnterRecursiveCall(" in a message's buffer")) { Py_DECREF(one); return -1; }
    int r = PyObject_GetBuffer(one, view, flags);
    Py_LeaveRecursiveCall();
    Py_DECREF(one);
    if (r < 0) return -1;
    if (!PyBuffer_IsContiguous(view, 'A')) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_TypeError, "this message's data is not contiguous: use msg.data");
        return -1;
    }
    return 0;
}
static PyBufferProcs Message_as_buffer = {(getbufferproc)Message_getbuffer, NULL};

static PyObject *Message_get_data(MessageObject *m, void *c) {
    if (m->released) return msg_closed();
    if (!m->sub) return msg_lazy(m) < 0 ? NULL : Py_NewRef(m->data);
    /* The message exports the view, so the view keeps it alive and the slot
     * goes back only when release() is called or no view is left.  Not
     * cached: a cached view would make a reference cycle. */
    return PyMemoryView_FromObject((PyObject *)m);
}

/* data as the list of buffers a sender writes (scatter-gather), whatever kind
 * of message it is: a received message can be sent on. */
static PyObject *Message_get_buffers(MessageObject *m, void *c) {
    if (m->released) return msg_closed();
    if (msg_lazy(m) < 0) return NULL;
    PyObject *one;
    if (m->sub) {
        if (!(one = PyMemoryView_FromObject((PyObject *)m))) return NULL;
    } else if (PyList_Check(m->data)) {
        return Py_NewRef(m->data);
    } else if (PyTuple_Check(m->data)) {
        return PySequence_List(m->data);
    } else {
        one = Py_NewRef(m->data);
    }
    PyObject *l = PyList_New(1);
    if (!l) { Py_DECREF(one); return NULL; }
    PyList_SET_ITEM(l, 0, one);
    return l;
}

static PyObject *Message_get_front(MessageObject *m, void *c) {
    if (m->released) return msg_closed();
    if (msg_lazy(m) < 0) return NULL;
    return Py_NewRef(m->sub ? empty_bytes : m->front);
}

/* What the messenger sets may be set on its messages; a pub/sub message is
 * what the publisher sent, read-only (and so never part of a cycle). */
static int msg_settable(MessageObject *m, PyObject *v, const char *name) {
    if (!v) {
        PyErr_Format(PyExc_AttributeError, "cannot delete Message.%s", name);
        return -1;
    }
    if (m->sub) {
        PyErr_Format(PyExc_AttributeError, "Message.%s of a received pub/sub message is read-only", name);
        return -1;
    }
    return 0;
}

/* msg.data = one buffer (kept as it is: a received message's) or a list or tuple of buffers */
static int Message_set_data(MessageObject *m, PyObject *v, void *c) {
    if (msg_settable(m, v, "data") < 0) return -1;
    if (m->released) { msg_closed(); return -1; }
    if (msg_lazy(m) < 0) return -1;
    if (!PyObject_CheckBuffer(v)) {
        if (!PyList_Check(v) && !PyTuple_Check(v)) {
            PyErr_Format(PyExc_TypeError, "data must be a buffer or a list of buffers, not %.100s", Py_TYPE(v)->tp_name);
            return -1;
        }
        if (msg_check_items(v) < 0) return -1;
    }
    Py_SETREF(m->data, Py_NewRef(v));
    return 0;
}

static int Message_set_front(MessageObject *m, PyObject *v, void *c) {
    if (msg_settable(m, v, "front") < 0) return -1;
    if (m->released) { msg_closed(); return -1; }
    if (msg_lazy(m) < 0) return -1;
    if (msg_check_front(v) < 0) return -1;
    Py_SETREF(m->front, Py_NewRef(v));
    return 0;
}

static int Message_set_connection(MessageObject *m, PyObject *v, void *c) {
    if (msg_settable(m, v, "connection") < 0) return -1;
    Py_XSETREF(m->connection, v == Py_None ? NULL : Py_NewRef(v));
    return 0;
}

static int Message_set_is_reply(MessageObject *m, PyObject *v, void *c) {
    if (msg_settable(m, v, "is_reply") < 0) return -1;
    int r = PyObject_IsTrue(v);
    if (r < 0) return -1;
    m->is_reply = r;
    return 0;
}

static int Message_set_seq(MessageObject *m, PyObject *v, void *c) {
    uint64_t x;
    if (msg_settable(m, v, "seq") < 0 || msg_uint(v, UINT64_MAX, "seq", &x) < 0) return -1;
    m->seq = x;
    return 0;
}

static int Message_set_tag(MessageObject *m, PyObject *v, void *c) {
    uint64_t x;
    if (msg_settable(m, v, (const char *)c) < 0 || msg_uint(v, UINT64_MAX, (const char *)c, &x) < 0) return -1;
    m->tag = x;
    return 0;
}

static int Message_set_type(MessageObject *m, PyObject *v, void *c) {
    uint64_t x;
    if (msg_settable(m, v, "type") < 0 || msg_uint(v, UINT32_MAX, "type", &x) < 0) return -1;
    m->type = (uint32_t)x;
    return 0;
}

static int Message_set_priority(MessageObject *m, PyObject *v, void *c) {
    uint64_t x;
    if (msg_settable(m, v, "priority") < 0 || msg_uint(v, 255, "priority", &x) < 0) return -1;
    m->priority = (int)x;
    return 0;
}

static PyObject *Message_release(MessageObject *m, PyObject *unused) {
    if (msg_release(m) < 0) return NULL;
    Py_RETURN_NONE;
}
static PyObject *Message_enter(MessageObject *m, PyObject *unused) { Py_INCREF(m); return (PyObject *)m; }
static PyObject *Message_exit(MessageObject *m, PyObject *args) {
    if (msg_release(m) < 0) return NULL;
    Py_RETURN_FALSE;
}
static PyObject *Message_bytes(MessageObject *m, PyObject *unused) {
    if (m->released) return msg_closed();
    if (m->sub) return PyBytes_FromStringAndSize((const char *)m->ptr, (Py_ssize_t)m->len);
    if (msg_lazy(m) < 0) return NULL;
    if (PyObject_CheckBuffer(m->data)) return PyBytes_FromObject(m->data);
    return PyObject_CallMethod(empty_bytes, "join", "O", m->data);
}
static Py_ssize_t Message_len(MessageObject *m) { return msg_nbytes(m); }

/* reply(type, front=b"", data=()): same tid and priority, is_reply set */
static PyObject *Message_reply(MessageObject *m, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *v[3];
    uint64_t type;
    if (msg_args("reply", args, nargs, kwnames, v, 3) < 0 || msg_type(v[0], &type) < 0) return NULL;
    return msg_make((uint32_t)type, v[1] ? v[1] : empty_bytes, v[2], m->tag, m->priority, 1);
}

static PyObject *Message_repr(MessageObject *m) {
    if (m->sub)
        return PyUnicode_FromFormat("<copyless.Message seq=%llu type=%u tag=%llu nbytes=%llu%s>", (unsigned long long)m->seq,
                                    m->type, (unsigned long long)m->tag, (unsigned long long)m->len,
                                    m->released ? " released" : "");
    return PyUnicode_FromFormat("<copyless.Message type=%u tid=%llu seq=%llu%s%s>", m->type, (unsigned long long)m->tag,
                                (unsigned long long)m->seq, m->is_reply ? " reply" : "", m->released ? " released" : "");
}

static PyObject *Message_get_seq(MessageObject *m, void *c) { return PyLong_FromUnsignedLongLong(m->seq); }
static PyObject *Message_get_tag(MessageObject *m, void *c) { return PyLong_FromUnsignedLongLong(m->tag); }
static PyObject *Message_get_type(MessageObject *m, void *c) { return PyLong_FromUnsignedLong(m->type); }
static PyObject *Message_get_priority(MessageObject *m, void *c) { return PyLong_FromLong(m->priority); }
static PyObject *Message_get_is_reply(MessageObject *m, void *c) { return PyBool_FromLong(m->is_reply); }
static PyObject *Message_get_connection(MessageObject *m, void *c) {
    return Py_NewRef(m->connection ? m->connection : Py_None);
}
static PyObject *Message_get_nbytes(MessageObject *m, void *c) {
    Py_ssize_t n = msg_nbytes(m);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}
static PyObject *Message_get_released(MessageObject *m, void *c) { return PyBool_FromLong(m->released); }
static PyObject *Message_get_address(MessageObject *m, void *c) { return PyLong_FromVoidPtr(m->ptr); }

static PyObject *Message_stamp(MessageObject *m, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(m->sent_id = ++next_sent_id);
}

static PyObject *Message_get_sent_id(MessageObject *m, void *c) { return PyLong_FromUnsignedLongLong(m->sent_id); }

static PyMethodDef Message_methods[] = {
    {"release", (PyCFunction)Message_release, METH_NOARGS,
     "Pub/sub: return the slot to the publisher.  Messenger: drop front and data.  data is invalid afterwards."},
    {"tobytes", (PyCFunction)Message_bytes, METH_NOARGS, "A private copy of the data (joined, if several buffers)."},
    {"reply", (PyCFunction)(void (*)(void))Message_reply, METH_FASTCALL | METH_KEYWORDS,
     "reply(type, front=b\"\", data=()) -> Message with this one's tid and priority, is_reply set."},
    {"_received", (PyCFunction)(void (*)(void))Message_received, METH_FASTCALL | METH_CLASS,
     "_received(type, front, data, tid, priority, seq, is_reply, connection): the messenger's received message."},
    {"_stamp", (PyCFunction)Message_stamp, METH_NOARGS,
     "_stamp() -> int: number a send of this message (as the compiled send does): see _sent_id."},
    {"__enter__", (PyCFunction)Message_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Message_exit, METH_VARARGS, NULL},
    {NULL},
};
static PyGetSetDef Message_getset[] = {
    {"_sent_id", (getter)Message_get_sent_id, NULL, "the number of the last send of this message (0: never sent)",
     NULL},
    {"data", (getter)Message_get_data, (setter)Message_set_data,
     "Pub/sub: a fresh read-only memoryview into shared memory.  Messenger: the list of buffers to send, or the "
     "one memoryview received.",
     NULL},
    {"front", (getter)Message_get_front, (setter)Message_set_front, "messenger: the front segment (b\"\" for pub/sub)",
     NULL},
    {"seq", (getter)Message_get_seq, (setter)Message_set_seq,
     "sequence number (pub/sub: the publisher's, gaps mean overwritten messages; messenger: the session's)", NULL},
    {"tag", (getter)Message_get_tag, (setter)Message_set_tag, "u64 user tag; the same field as tid", "tag"},
    {"tid", (getter)Message_get_tag, (setter)Message_set_tag, "u64 transaction id; the same field as tag", "tid"},
    {"type", (getter)Message_get_type, (setter)Message_set_type, "u32 user type (the messenger sends u16)", NULL},
    {"priority", (getter)Message_get_priority, (setter)Message_set_priority, "messenger: dispatch priority, 0-255",
     NULL},
    {"is_reply", (getter)Message_get_is_reply, (setter)Message_set_is_reply, "messenger: a reply to a call", NULL},
    {"connection", (getter)Message_get_connection, (setter)Message_set_connection,
     "messenger: the Connection it came from (None for pub/sub and outgoing messages)", NULL},
    {"nbytes", (getter)Message_get_nbytes, NULL, "data bytes", NULL},
    {"released", (getter)Message_get_released, NULL, NULL, NULL},
    {"_buffers", (getter)Message_get_buffers, NULL, "data as a list of buffers to send", NULL},
    {"_address", (getter)Message_get_address, NULL, NULL, NULL},
    {NULL},
};
static PySequenceMethods Message_as_seq = {.sq_length = (lenfunc)Message_len};

static PyTypeObject MessageType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless.Message",
    .tp_basicsize = sizeof(MessageObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Message(type, front=b\"\", data=(), tid=0, priority=0): the message of both APIs.\n\n"
              "Received from a Subscriber, data is a read-only view into shared memory, valid until release().\n"
              "Made for a Connection, data is a list of buffers sent as they are (scatter-gather).\n"
              "tag and tid are two names of the same u64 field.",
    .tp_new = Message_new,
    .tp_vectorcall = Message_vectorcall,
    .tp_dealloc = (destructor)Message_dealloc,
    .tp_traverse = (traverseproc)Message_traverse,
    .tp_clear = (inquiry)Message_clear,
    .tp_is_gc = (inquiry)Message_is_gc,
    .tp_as_buffer = &Message_as_buffer,
    .tp_as_sequence = &Message_as_seq,
    .tp_methods = Message_methods,
    .tp_getset = Message_getset,
    .tp_repr = (reprfunc)Message_repr,
    .tp_weaklistoffset = offsetof(MessageObject, weakreflist),
};

/* ================================================================== IpcChannel */
/*
 * One end of an ipc:// byte stream: mechanism only (the rendezvous, the setup
 * exchange and the socket live in copyless/transports/_ipc.py).
 *
 * Each side owns ONE segment: a control page holding the words only it
 * writes, then its TX byte ring.  It maps its own segment read-write and the
 * peer's read-only, so a peer can corrupt nothing but its own memory, and
 * every index read from the peer's segment is bounds-checked here.
 *
 * Wake-ups go through the unix socket both ends keep open: one byte is one
 * wake, EOF is the peer gone.  A writer sends a byte only if the reader said
 * it is about to sleep (an odd value in its rx_sleep word that this writer has
 * not woken yet: each sleep is a new value, so it gets at most one byte), and
 * a reader wakes a writer that waits for space the same way (tx_wait, once
 * tx_want bytes are free).  While traffic flows there is no system call.
 *
 * Each publish of an index is followed by a seq_cst fence before the other
 * side's flag is read, and each flag is followed by a fence before the ring
 * is read again (Dekker): either the writer sees the reader's flag, or the
 * reader sees the writer's data.
 */
#define IPC_MAGIC 0x53494c43u /* "CLIS" */
#define IPC_VERSION 1u
#define IPC_HDR 0         /* u32 magic, u32 version, u64 capacity, u64 ring offset: written before the fd goes */
#define IPC_TX_HEAD 64    /* u64: bytes ever written to my TX ring (the peer reads it) */
#define IPC_RX_TAIL 128   /* u64: bytes ever read from the peer's TX ring (the peer's writer reads it) */
#define IPC_RX_SLEEP 192  /* u32: odd while my reader is (about to be) asleep; a new value each sleep */
#define IPC_TX_WAIT 256   /* u32: odd while my writer waits for space; a new value each wait */
#define IPC_TX_WANT 264   /* u64: the free bytes that waiting writer wants before it is woken */
#define IPC_CLOSED 320    /* u32: 1 once I closed gracefully (everything I wrote is published) */
#define IPC_RING 4096     /* the TX ring, `capacity` bytes (a power of two) */
#define IPC_MIN_CAP 4096ull
#define IPC_MAX_CAP (1ull << 30)
#define IPC_NOGIL_COPY 65536 /* copies this large run without the GIL */
#define IPC_MAX_SPIN_NS 100000000LL

typedef struct {
    PyObject_HEAD
    PyObject *mine, *peer; /* Mappings: my segment (rw), the peer's (ro) */
    uint8_t *m, *p;        /* their addresses; NULL once closed */
    uint64_t cap, pcap;    /* my TX ring's capacity, the peer's */
    int fd;                /* the connected unix socket: the doorbell (owned by Python) */
    /* writer (my ring) */
    uint64_t head, tail_seen;
    uint32_t wait_val, woken_sleep;
    int waiting;
    /* reader (the peer's ring) */
    uint64_t tail, head_seen;
    uint32_t sleep_val, woken_wait;
    int armed, eof;
    int read_armed; /* armed by a read that found the ring empty, not by a sleeper's arm */
    int leased; /* a caller reads (and spins on) this stream for now, not its I/O loop */
    uint32_t lease_sleep; /* sleep_val when the lease began: a caller that armed may leave a bell */
    int broken, rbusy, wbusy;
    const char *why;
    int64_t spin_ns;
    uint64_t st_in, st_out, st_wakes, st_sleeps, st_waits, st_bells_heard;
    PyObject *weakreflist;
} IpcChannelObject;

static PyTypeObject IpcChannelType;

static inline uint64_t *u64_at(uint8_t *base, size_t off) { return (uint64_t *)(base + off); }
static inline uint32_t *u32_at(uint8_t *base, size_t off) { return (uint32_t *)(base + off); }

static void ipc_bell(IpcChannelObject *c) {
    static const char one = 1;
    if (c->fd < 0) return;
    ssize_t r;
    do { r = send(c->fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    /* EAGAIN: bytes are already waiting, so the peer is woken anyway; EPIPE: it is gone */
    c->st_wakes++;
}

/* The peer broke the protocol: this stream is finished (the socket is shut
 * down, so both ends notice), and every later read raises. */
static int ipc_break(IpcChannelObject *c, const char *why) {
    if (!c->broken) {
        c->broken = 1;
        c->why = why;
        if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
    }
    PyErr_Format(err_type(RemoteProtoErr, PyExc_ValueError), "ipc peer broke the protocol: %s", c->why);
    return -1;
}

static int ipc_closed_error(void) {
    PyErr_SetString(err_type(ClosedErr, PyExc_ValueError), "ipc channel is closed");
    return -1;
}

/* Bytes readable now; re-reads the peer's head only when the cached one is used up. */
static int64_t ipc_avail(IpcChannelObject *c) {
    uint64_t a = c->head_seen - c->tail;
    if (a) return (int64_t)a;
    uint64_t h = LOAD_ACQ(u64_at(c->p, IPC_TX_HEAD));
    if (h - c->tail > c->pcap) return ipc_break(c, "its ring's head index is out of bounds");
    c->head_seen = h;
    return (int64_t)(h - c->tail);
}

/* Free bytes in my ring, counting `ahead` bytes past c->head as written (a write in
 * progress: ipc_write_iov moves c->head at its end, but its large copies publish the
 * head as they go, and the peer may have read those bytes already); re-reads the
 * peer's tail only when the cached view has fewer than need. */
static int64_t ipc_free_ahead(IpcChannelObject *c, uint64_t need, uint64_t ahead) {
    uint64_t head = c->head + ahead, f = c->cap - (head - c->tail_seen);
    if (f >= need) return (int64_t)f;
    uint64_t t = LOAD_ACQ(u64_at(c->p, IPC_RX_TAIL));
    if (head - t > c->cap) return ipc_break(c, "its tail index on our ring is out of bounds");
    c->tail_seen = t;
    return (int64_t)(c->cap - (head - t));
}
static int64_t ipc_free(IpcChannelObject *c, uint64_t need) { return ipc_free_ahead(c, need, 0); }

static void ring_copy_out(const uint8_t *ring, uint64_t cap, uint64_t pos, uint8_t *dst, uint64_t n) {
    uint64_t off = pos & (cap - 1), first = cap - off;
    if (first > n) first = n;
    memcpy(dst, ring + off, first);
    if (n > first) memcpy(dst + first, ring, n - first);
}
static void ring_copy_in(uint8_t *ring, uint64_t cap, uint64_t pos, const uint8_t *src, uint64_t n) {
    uint64_t off = pos & (cap - 1), first = cap - off;
    if (first > n) first = n;
    memcpy(ring + off, src, first);
    if (n > first) memcpy(ring, src + first, n - first);
}

/* After the reader moved its tail: wake the peer's writer if it waits and has room now.
 * (Pointers passed in: a large copy publishes as it goes, without the GIL.) */
static void ipc_publish_tail(IpcChannelObject *c, uint8_t *m, const uint8_t *p, uint64_t tail) {
    STORE_REL(u64_at(m, IPC_RX_TAIL), tail);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t v = LOAD_ACQ(u32_at((uint8_t *)p, IPC_TX_WAIT));
    if ((v & 1) && v != c->woken_wait) {
        uint64_t want = LOAD_RLX(u64_at((uint8_t *)p, IPC_TX_WANT));
        uint64_t used = LOAD_ACQ(u64_at((uint8_t *)p, IPC_TX_HEAD)) - tail;
        if (used > c->pcap || c->pcap - used >= want) { /* garbage: wake it, its own reads will fail */
            c->woken_wait = v;
            ipc_bell(c);
        }
    }
}

static void ipc_published_tail(IpcChannelObject *c) { ipc_publish_tail(c, c->m, c->p, c->tail); }

/* After the writer moved its head: wake the peer's reader if it said it sleeps. */
static void ipc_publish_head(IpcChannelObject *c, uint8_t *m, const uint8_t *p, uint64_t head) {
    STORE_REL(u64_at(m, IPC_TX_HEAD), head);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t v = LOAD_RLX(u32_at((uint8_t *)p, IPC_RX_SLEEP));
    if ((v & 1) && v != c->woken_sleep) {
        c->woken_sleep = v;
        ipc_bell(c);
    }
}
static void ipc_published_head(IpcChannelObject *c) { ipc_publish_head(c, c->m, c->p, c->head); }

/* A large copy publishes its index every IPC_CHUNK bytes, so the other side
 * copies out what is still in the shared cache while the rest goes in. */
#define IPC_CHUNK (128u << 10)

static inline void ipc_disarm_reader(IpcChannelObject *c) {
    c->read_armed = 0;
    if (c->armed) {
        c->sleep_val++; /* even: awake */
        STORE_REL(u32_at(c->m, IPC_RX_SLEEP), c->sleep_val);
        c->armed = 0;
    }
}
static inline void ipc_disarm_writer(IpcChannelObject *c) {
    if (c->waiting) {
        c->wait_val++;
        STORE_REL(u32_at(c->m, IPC_TX_WAIT), c->wait_val);
        c->waiting = 0;
    }
}

/* A large copy between a ring and buf, without the GIL, in IPC_CHUNK pieces: the
 * index moves after each piece but the last (the caller moves it then), so the other
 * side copies out what is still in the shared cache while the rest goes in.
 * out: from the peer's ring at pos into buf (the reader); else from buf into mine at
 * pos (the writer).  A close() meanwhile must not unmap the segments under us:
 * both are held, and the busy flag makes the other calls step aside. */
static void ipc_copy_nogil(IpcChannelObject *c, int out, uint64_t pos, uint8_t *buf, uint64_t n) {
    PyObject *keep = Py_NewRef(c->peer), *keep2 = Py_NewRef(c->mine);
    uint8_t *m = c->m;
    const uint8_t *p = c->p;
    uint64_t cap = out ? c->pcap : c->cap;
    int *busy = out ? &c->rbusy : &c->wbusy;
    *busy = 1;
    Py_BEGIN_ALLOW_THREADS
    for (uint64_t done = 0; done < n;) {
        uint64_t k = n - done > IPC_CHUNK ? IPC_CHUNK : n - done;
        if (out) {
            ring_copy_out(p + IPC_RING, cap, pos + done, buf + done, k);
        } else {
            ring_copy_in(m + IPC_RING, cap, pos + done, buf + done, k);
        }
        done += k;
        if (done < n) (out ? ipc_publish_tail : ipc_publish_head)(c, m, p, pos + done);
    }
    Py_END_ALLOW_THREADS
    *busy = 0;
    Py_DECREF(keep);
    Py_DECREF(keep2);
}

/* Copy up to len readable bytes into dst.  Returns bytes copied, or -1 with an exception. */
static Py_ssize_t ipc_read(IpcChannelObject *c, uint8_t *dst, Py_ssize_t len) {
    int64_t a = ipc_avail(c);
    if (a < 0) return -1;
    uint64_t n = (uint64_t)a < (uint64_t)len ? (uint64_t)a : (uint64_t)len;
    if (!n) return 0;
    if (n >= IPC_NOGIL_COPY) {
        ipc_copy_nogil(c, 1, c->tail, dst, n);
        if (!c->m) return ipc_closed_error();
    } else {
        ring_copy_out(c->p + IPC_RING, c->pcap, c->tail, dst, n);
    }
    c->tail += n;
    c->st_in += n;
    ipc_disarm_reader(c);
    ipc_published_tail(c);
    return (Py_ssize_t)n;
}

/* Read the doorbell bytes that woke us (non-blocking); notes EOF. */
static void ipc_drain(IpcChannelObject *c) {
    char buf[256];
    while (c->fd >= 0 && !c->eof) {
        ssize_t r = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r > 0) {
            c->st_bells_heard += (uint64_t)r;
            if ((size_t)r < sizeof buf) return;
            continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        c->eof = 1; /* 0: EOF; any other error: the connection is gone as well */
    }
}

static inline int ipc_writer_may_go(IpcChannelObject *c) {
    if (!c->waiting) return 0;
    uint64_t want = c->cap / 2;
    int64_t f = ipc_free(c, want);
    if (f < 0) { PyErr_Clear(); return 1; } /* broken: let the owner find out */
    return (uint64_t)f >= want;
}

/* The ring is empty and the caller is about to sleep on the socket: drain the
 * doorbell, say we sleep (a new odd value), and look once more.  Returns 1 if
 * there is something to read (data, or the peer's end), 2 if only our writer
 * can go on, 0 to sleep, -1 with an exception. */
static int ipc_prepare_sleep(IpcChannelObject *c) {
    ipc_drain(c);
    c->sleep_val += c->armed ? 2 : 1; /* odd, and new */
    c->armed = 1;
    STORE_REL(u32_at(c->m, IPC_RX_SLEEP), c->sleep_val);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t a = ipc_avail(c);
    if (a < 0) return -1;
    if (a > 0) { ipc_disarm_reader(c); return 1; }
    if (c->eof || LOAD_ACQ(u32_at(c->p, IPC_CLOSED))) return 1;
    if (ipc_writer_may_go(c)) return 2;
    c->st_sleeps++;
    return 0;
}

static int ipc_check(IpcChannelObject *c) {
    if (c->broken) return ipc_break(c, c->why);
    if (!c->m) return ipc_closed_error();
    return 0;
}

/* Read up to len bytes into dst: > 0 read, 0 the end of the stream (the peer closed or
 * died, the ring drained), -2 nothing there (the wake-up armed), -1 with an error. */
static Py_ssize_t ipc_recv(IpcChannelObject *c, void *dst, Py_ssize_t len) {
    if (ipc_check(c) < 0) return -1;
    if (c->rbusy) {
        PyErr_SetString(PyExc_RuntimeError, "ipc channel read from two threads at once");
        return -1;
    }
    Py_ssize_t n = ipc_read(c, dst, len);
    if (n == 0 && len > 0) {
        int r = ipc_prepare_sleep(c);
        if (r < 0) return -1;
        c->read_armed = r != 1;
        if (r != 1) return -2;
        n = ipc_read(c, dst, len); /* 0 here is the end of the stream */
    }
    return n;
}

static Py_ssize_t capi_ipc_recv(PyObject *chan, void *dst, Py_ssize_t len) {
    return ipc_recv((IpcChannelObject *)chan, dst, len);
}

/* recv_into(buf) -> bytes read; 0 at the end (peer closed or died, ring drained);
 * raises BlockingIOError when nothing is there (after arming the wake-up). */
static PyObject *IpcChannel_recv_into(IpcChannelObject *c, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = ipc_recv(c, b.buf, b.len);
    PyBuffer_Release(&b);
    if (n == -2) {
        PyErr_SetString(PyExc_BlockingIOError, "ipc ring empty");
        return NULL;
    }
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* Write what fits of iov[0:n] into my ring, with one publish of the head (room: what
 * was free when last looked); *rest = 1 if not all of it fit.  The peer's tail is read
 * again before anything is found not to fit: the cached room ran out exactly at a
 * buffer's end every other ring wrap or so, and the rest of a call then waited for the
 * I/O loop although the ring had room. */
static Py_ssize_t ipc_write_iov(IpcChannelObject *c, const struct iovec *iov, Py_ssize_t nbufs, int64_t room, int *rest) {
    Py_ssize_t total = 0;
    uint8_t *ring = c->m + IPC_RING;
    int fresh = 0; /* room comes from the cached tail until something does not fit */
    for (Py_ssize_t i = 0; i < nbufs; i++) {
        const uint8_t *buf = iov[i].iov_base;
        uint64_t len = iov[i].iov_len;
        if (len > (uint64_t)room && !fresh) {
            fresh = 1;
            /* re-read the peer's tail (past what this write published already: checked
             * against c->head alone, a peer that had read it looked out of bounds) */
            int64_t f = ipc_free_ahead(c, UINT64_MAX, (uint64_t)total);
            if (f < 0) return -1;
            room = f;
        }
        uint64_t n = len < (uint64_t)room ? len : (uint64_t)room;
        if (n >= IPC_NOGIL_COPY) {
            ipc_copy_nogil(c, 0, c->head + (uint64_t)total, (uint8_t *)buf, n);
        } else if (n) {
            ring_copy_in(ring, c->cap, c->head + (uint64_t)total, buf, n);
        }
        if (!c->m) return ipc_closed_error();
        total += (Py_ssize_t)n;
        room -= (int64_t)n;
        if (n < len) {
            *rest = 1;
            break;
        }
    }
    if (total) {
        c->head += (uint64_t)total;
        c->st_out += (uint64_t)total;
        ipc_disarm_writer(c);
        ipc_published_head(c);
    }
    return total;
}

static Py_ssize_t ipc_write(IpcChannelObject *c, PyObject *seq, int64_t room, int *rest) {
    Py_ssize_t nbufs = PySequence_Fast_GET_SIZE(seq), got = 0, total = -1;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer *b = PyMem_Calloc(nbufs ? (size_t)nbufs : 1, sizeof(Py_buffer));
    struct iovec *iov = PyMem_Calloc(nbufs ? (size_t)nbufs : 1, sizeof(struct iovec));
    if (!b || !iov) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < nbufs; got++) {
        if (PyObject_GetBuffer(items[got], &b[got], PyBUF_C_CONTIGUOUS) < 0) goto done;
        iov[got].iov_base = b[got].buf;
        iov[got].iov_len = (size_t)b[got].len;
    }
    total = ipc_write_iov(c, iov, nbufs, room, rest);
done:
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&b[i]);
    PyMem_Free(b);
    PyMem_Free(iov);
    return total;
}

/* Say my writer waits for half the ring to be free (a new odd value). */
static void ipc_arm_writer(IpcChannelObject *c) {
    c->wait_val += c->waiting ? 2 : 1;
    c->waiting = 1;
    c->st_waits++;
    STORE_RLX(u64_at(c->m, IPC_TX_WANT), c->cap / 2);
    STORE_REL(u32_at(c->m, IPC_TX_WAIT), c->wait_val);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* The send of IpcChannel.send, from iovecs (with the GIL): bytes written, 0 if the ring
 * is full (the writer then waits: the fd turns readable once half the ring is free) or
 * the peer broke the protocol (the socket is shut down, the read side raises); -1 with
 * an error (closed). */
static Py_ssize_t ipc_send_iov(IpcChannelObject *c, const struct iovec *iov, Py_ssize_t n) {
    if (!c->m) return ipc_closed_error();
    if (c->broken) return 0;
    if (c->wbusy) {
        PyErr_SetString(PyExc_RuntimeError, "ipc channel written from two threads at once");
        return -1;
    }
    Py_ssize_t total = 0;
    int rest = 0;
    int64_t room = ipc_free(c, 1);
    if (room == 0) { /* full: say we wait, then look once more */
        ipc_arm_writer(c);
        room = ipc_free(c, 1);
    }
    if (room > 0) {
        total = ipc_write_iov(c, iov, n, room, &rest);
        if (total > 0 && rest) ipc_arm_writer(c); /* what did not fit waits for room */
    }
    if (room < 0 || total < 0) {
        if (c->broken && PyErr_ExceptionMatches(err_type(RemoteProtoErr, PyExc_ValueError))) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    return total;
}

static Py_ssize_t capi_ipc_send(PyObject *chan, const struct iovec *iov, Py_ssize_t n) {
    return ipc_send_iov((IpcChannelObject *)chan, iov, n);
}

/* send(buffers) -> bytes written (0 if the ring is full: then the writer waits,
 * and the fd turns readable once half the ring is free).  A peer that broke the
 * protocol makes it return 0 and shut the socket down: the read side raises. */
static PyObject *IpcChannel_send(IpcChannelObject *c, PyObject *bufs) {
    if (!c->m) { ipc_closed_error(); return NULL; }
    if (c->broken) return PyLong_FromLong(0);
    if (c->wbusy) { PyErr_SetString(PyExc_RuntimeError, "ipc channel written from two threads at once"); return NULL; }
    PyObject *seq = PySequence_Fast(bufs, "send() takes a sequence of buffers");
    if (!seq) return NULL;
    Py_ssize_t total = 0;
    int rest = 0;
    int64_t room = ipc_free(c, 1);
    if (room == 0) { /* full: say we wait, then look once more */
        ipc_arm_writer(c);
        room = ipc_free(c, 1);
    }
    if (room > 0) {
        total = ipc_write(c, seq, room, &rest);
        /* What did not fit waits for room: say so now, as a socket's POLLOUT would */
        if (total > 0 && rest) ipc_arm_writer(c);
    }
    Py_DECREF(seq);
    if (room < 0 || total < 0) {
        if (c->broken && PyErr_ExceptionMatches(err_type(RemoteProtoErr, PyExc_ValueError))) {
            PyErr_Clear();
            return PyLong_FromLong(0);
        }
        return NULL;
    }
    return PyLong_FromSsize_t(total);
}

static PyObject *IpcChannel_available(IpcChannelObject *c, PyObject *unused) {
    if (ipc_check(c) < 0) return NULL;
    int64_t a = ipc_avail(c);
    return a < 0 ? NULL : PyLong_FromLongLong(a);
}

/* Is anything ready, looking only at shared memory (no GIL needed, no syscall)? */
static int ipc_ready_shm(const uint8_t *p, uint64_t tail, int waiting, uint64_t head, uint64_t cap) {
    if (LOAD_ACQ(u64_at((uint8_t *)p, IPC_TX_HEAD)) != tail) return 1;
    if (LOAD_ACQ(u32_at((uint8_t *)p, IPC_CLOSED))) return 1;
    if (waiting && cap - (head - LOAD_ACQ(u64_at((uint8_t *)p, IPC_RX_TAIL))) >= cap / 2) return 1;
    return 0;
}

/* One step of a spin: a pause for the first IPC_PURE_SPIN_NS, then a yield of
 * the CPU each 64th step.  On a host with few cores the scheduler often wakes
 * the peer on the CPU of the thread that woke it (wake-affine), and a pure spin
 * then holds the very CPU the peer needs to answer: each round trip cost a
 * whole spin (64 B ping-pong, 50 us spin: p50 115 us; with the yield: see
 * docs/design.md).  sched_yield() is a system call, but only while idle. */
#define IPC_PURE_SPIN_NS 1000
static inline void ipc_relax(unsigned step, int64_t start) {
    cpu_relax();
    if ((step & 63) == 0 && now_ns() - start > IPC_PURE_SPIN_NS) sched_yield();
}

/* Spin (GIL released) up to ns for something to do. */
static int ipc_spin(IpcChannelObject *c, int64_t ns) {
    if (ns > IPC_MAX_SPIN_NS) ns = IPC_MAX_SPIN_NS;
    const uint8_t *p = c->p;
    uint64_t tail = c->tail, head = c->head, cap = c->cap;
    int waiting = c->waiting;
    if (ipc_ready_shm(p, tail, waiting, head, cap)) return 1;
    if (ns <= 0) return 0;
    int ready = 0;
    PyObject *keep = Py_NewRef(c->peer);
    Py_BEGIN_ALLOW_THREADS
    int64_t start = now_ns(), end = start + ns;
    unsigned i = 0;
    while (!(ready = ipc_ready_shm(p, tail, waiting, head, cap))) {
        ipc_relax(++i, start);
        if ((i & 63) == 0 && now_ns() >= end) break;
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(keep);
    return ready;
}

/* wait(seconds) -> bool: spin for something to read (or room for a waiting writer). */
static PyObject *IpcChannel_wait(IpcChannelObject *c, PyObject *arg) {
    double t = PyFloat_AsDouble(arg);
    if (t == -1.0 && PyErr_Occurred()) return NULL;
    if (ipc_check(c) < 0) return NULL;
    return PyBool_FromLong(ipc_spin(c, (int64_t)(t * 1e9)));
}

/* About to block on the socket: arm the wake-up (unless it is armed already
 * and nothing came: then no system call).  True: do not block, there is
 * something to do (read, or write for a waiting writer). */
static int ipc_arm(IpcChannelObject *c) {
    if (!c->m || c->broken || c->rbusy) return 1; /* the owner finds out by reading */
    c->read_armed = 0; /* armed for a sleep now */
    int r;
    if (c->armed) {
        int64_t a = ipc_avail(c);
        r = a != 0 || LOAD_ACQ(u32_at(c->p, IPC_CLOSED)) || ipc_writer_may_go(c);
    } else {
        r = ipc_prepare_sleep(c);
    }
    if (r < 0) PyErr_Clear();
    return r != 0;
}

/* arm() -> bool: what the I/O loop calls for each ipc stream before it sleeps. */
static PyObject *IpcChannel_arm(IpcChannelObject *c, PyObject *unused) { return PyBool_FromLong(ipc_arm(c)); }

/* take(): a caller reads this stream from now on, spinning (Connection.call): its loop
 * leaves it out (ipc_run_streams, arming), and the peer need not ring. */
static int capi_ipc_take(PyObject *chan) {
    IpcChannelObject *c = (IpcChannelObject *)chan;
    c->leased = 1;
    if (c->m) ipc_disarm_reader(c);
    c->lease_sleep = c->sleep_val; /* (a new value: the caller armed) */
    return 0;
}
static PyObject *IpcChannel_take(IpcChannelObject *c, PyObject *unused) {
    capi_ipc_take((PyObject *)c);
    Py_RETURN_NONE;
}

/* arm() without reading the doorbell first, for a caller that hands reading back to a
 * loop that may sleep (a byte left in the socket costs the loop one early wake-up, in
 * which it drains it; a recv per hand-back would cost every call). */
static int ipc_rearm(IpcChannelObject *c) {
    if (!c->m || c->broken || c->rbusy) return 1;
    c->sleep_val += c->armed ? 2 : 1; /* odd, and new */
    c->armed = 1;
    c->read_armed = 0;
    STORE_REL(u32_at(c->m, IPC_RX_SLEEP), c->sleep_val);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int64_t a = ipc_avail(c);
    int r = a != 0 || c->eof || LOAD_ACQ(u32_at(c->p, IPC_CLOSED)) || ipc_writer_may_go(c);
    if (a < 0) PyErr_Clear();
    return r;
}

/* give_back(woke=False) -> bool: the loop reads it again: rearm() for a loop that may be
 * asleep; True if there is something to read already (the loop must be told).
 * First the doorbell is drained if a bell may be in it: the caller armed and slept (the
 * bell that woke it is still there: it read the ring, not the socket), or `woke`, the
 * loop was woken during the lease (by a bell rung for the loop's own arm).  Left in the
 * socket, such a byte kept the loop's epoll readable: at every hand-back the loop woke,
 * found the next call's lease and took the stream off and back on (a futex, a GIL
 * hand-over and two epoll_ctl per call: p50 10 -> 28 us), for as long as calls came
 * back to back. */
static PyObject *IpcChannel_give_back(IpcChannelObject *c, PyObject *const *args, Py_ssize_t nargs) {
    int woke = 0;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "give_back() takes at most one argument");
        return NULL;
    }
    if (nargs == 1 && (woke = PyObject_IsTrue(args[0])) < 0) return NULL;
    return PyBool_FromLong(capi_ipc_give_back((PyObject *)c, woke));
}
static int capi_ipc_give_back(PyObject *chan, int woke) {
    IpcChannelObject *c = (IpcChannelObject *)chan;
    c->leased = 0;
    if ((woke || c->sleep_val != c->lease_sleep) && c->m && !c->rbusy) ipc_drain(c);
    return ipc_rearm(c);
}

/* before_wait() -> bool: spin for `spin` seconds (GIL released), then arm(). */
static int capi_ipc_before_wait(PyObject *chan) {
    IpcChannelObject *c = (IpcChannelObject *)chan;
    if (!c->m || c->broken) return 1;
    if (c->head_seen != c->tail) return 1;
    if (ipc_spin(c, c->spin_ns)) return 1;
    return ipc_arm(c);
}
static PyObject *IpcChannel_before_wait(IpcChannelObject *c, PyObject *unused) {
    return PyBool_FromLong(capi_ipc_before_wait((PyObject *)c));
}

/* close(): say we closed gracefully (everything written is published) and drop the mappings. */
static PyObject *IpcChannel_close(IpcChannelObject *c, PyObject *unused) {
    if (c->m) STORE_SC(u32_at(c->m, IPC_CLOSED), 1);
    c->m = c->p = NULL;
    c->fd = -1;
    Py_CLEAR(c->mine);
    Py_CLEAR(c->peer);
    Py_RETURN_NONE;
}

/* The I/O loop spins over all its ipc streams at once before it sleeps. */
typedef struct {
    const uint8_t *p; /* NULL: ready without spinning (closed, broken, or unread bytes) */
    uint64_t tail, head, cap;
    int waiting;
} SpinView;

/* Spin (GIL released) up to ns until one of the n channels has something to do;
 * ready[i] says which.  keep[i] holds each spun-on mapping (a close() meanwhile must
 * not unmap it under us).  -1: not a channel (error set). */
static int spin_channels(PyObject *const *chans, Py_ssize_t n, int64_t ns, SpinView *v, PyObject **keep,
                         char *ready) {
    int any = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(chans[i], &IpcChannelType)) {
            PyErr_SetString(PyExc_TypeError, "IpcChannel required");
            return -1;
        }
        IpcChannelObject *c = (IpcChannelObject *)chans[i];
        if (!c->m || c->broken || c->head_seen != c->tail) {
            any = 1;
            continue;
        }
        keep[i] = Py_NewRef(c->peer);
        v[i] = (SpinView){c->p, c->tail, c->head, c->cap, c->waiting};
        /* A loop that spins is awake: a read that found the ring empty armed it (and
         * drained the bell), and the peer would ring for each write while we spin; the
         * bell then made a later epoll_wait see the stream readable, whose empty read
         * armed it again, and so on, a bell every few calls.  The loop arms before it
         * sleeps.  (A ring the loop itself armed stays armed: arming it again then
         * costs no system call, where a disarmed one is drained first.) */
        if (ns > 0 && c->read_armed && !c->rbusy) ipc_disarm_reader(c);
    }
    if (ns > IPC_MAX_SPIN_NS) ns = IPC_MAX_SPIN_NS;
    if (!any && ns > 0) {
        Py_BEGIN_ALLOW_THREADS
        int64_t start = now_ns(), end = start + ns;
        for (unsigned k = 1; !any; k++) {
            for (Py_ssize_t i = 0; i < n && !any; i++)
                any = ipc_ready_shm(v[i].p, v[i].tail, v[i].waiting, v[i].head, v[i].cap);
            ipc_relax(k, start);
            if ((k & 31) == 0 && now_ns() >= end) break;
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < n; i++)
        ready[i] = !v[i].p || ipc_ready_shm(v[i].p, v[i].tail, v[i].waiting, v[i].head, v[i].cap);
    return 0;
}

/* Call fn() as the I/O loop's _guard does: an Exception is printed, and the loop goes
 * on (one connection's bug must not stop it for the others); -1 for any other
 * BaseException (KeyboardInterrupt, SystemExit), which goes up. */
static int call_guarded(PyObject *fn) {
    PyObject *r = PyObject_CallNoArgs(fn);
    if (r) {
        Py_DECREF(r);
        return 0;
    }
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyErr_PrintEx(0); /* (0: no sys.last_value keeping the connection alive) */
    return 0;
}

/* ipc_run_streams(items, timeout, loop) -> None | [(fd, EPOLLIN)]: an I/O loop's turn over
 * its ipc streams, as one call.  items: the loop's `_armable_cache`, (fd, stream, reader,
 * writer); streams whose channel is leased (a caller spins on it: take()) are left out.
 * It spins for the longest `loop_spin` of the others (at most timeout, if > 0; not at all
 * if one has no channel yet): None if nothing came.  Else it runs the reader, then the
 * writer (if any: room to write shows as readable too), of each stream that has work,
 * in order, with no Python loop turn between the ring and the reader (a request on an
 * ipc:// server); and returns what it left to the caller, as epoll's events: those whose
 * callbacks did not all run because one changed the loop's registrations (its
 * _armable_cache is no longer items; the loop runs them again, and a read finds the
 * ring as it is). */
static PyObject *mod_ipc_run_streams(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    static PyObject *s_channel, *s_loop_spin, *s_cache, *s_in;
    if (!s_channel &&
        (!(s_channel = PyUnicode_InternFromString("channel")) || !(s_loop_spin = PyUnicode_InternFromString("loop_spin")) ||
         !(s_cache = PyUnicode_InternFromString("_armable_cache")) || !(s_in = PyLong_FromLong(EPOLLIN))))
        return NULL;
    if (nargs != 3 || !PyList_Check(args[0])) return PyErr_Format(PyExc_TypeError, "ipc_run_streams(list, timeout, loop)");
    double timeout = PyFloat_AsDouble(args[1]);
    if (timeout == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *items = Py_NewRef(args[0]), *loop = args[2], *out = NULL;
    Py_ssize_t n = PyList_GET_SIZE(items), m = 0;
    PyObject **chans = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    PyObject **its = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    SpinView *v = PyMem_Calloc(n ? (size_t)n : 1, sizeof(SpinView));
    PyObject **keep = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
    char *ready = PyMem_Calloc(n ? (size_t)n : 1, 1);
    if (!chans || !its || !v || !keep || !ready) {
        PyErr_NoMemory();
        goto done;
    }
    double spin = 0;
    int spin_ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyTuple_Check(it) || PyTuple_GET_SIZE(it) != 4) {
            PyErr_SetString(PyExc_TypeError, "ipc_run_streams() takes (fd, stream, reader, writer) items");
            goto done;
        }
        PyObject *st = PyTuple_GET_ITEM(it, 1);
        PyObject *chan = PyObject_GetAttr(st, s_channel);
        if (!chan) goto done;
        if (!PyObject_TypeCheck(chan, &IpcChannelType)) { /* still in its setup */
            Py_DECREF(chan);
            spin_ok = 0;
            continue;
        }
        if (((IpcChannelObject *)chan)->leased) {
            Py_DECREF(chan);
            continue;
        }
        PyObject *ls = PyObject_GetAttr(st, s_loop_spin);
        double d = ls ? PyFloat_AsDouble(ls) : -1.0;
        Py_XDECREF(ls);
        if (d == -1.0 && PyErr_Occurred()) {
            Py_DECREF(chan);
            goto done;
        }
        if (d > spin) spin = d;
        chans[m] = chan; /* (owned) */
        its[m++] = Py_NewRef(it);
    }
    if (timeout > 0 && spin > timeout) spin = timeout;
    if (!spin_ok || spin <= 0 || m == 0) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (spin_channels(chans, m, (int64_t)(spin * 1e9), v, keep, ready) < 0) goto done;
    Py_ssize_t first = 0;
    while (first < m && !ready[first]) first++;
    if (first == m) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    if (!(out = PyList_New(0))) goto done;
    int ours = 1; /* the loop's registrations are still those of items */
    for (Py_ssize_t i = first; i < m; i++) {
        if (!ready[i]) continue;
        PyObject *it = its[i];
        for (int k = 2; k < 4 && ours; k++) {
            PyObject *cache = PyObject_GetAttr(loop, s_cache);
            if (!cache) goto fail;
            ours = cache == items;
            Py_DECREF(cache);
            if (ours && PyTuple_GET_ITEM(it, k) != Py_None && call_guarded(PyTuple_GET_ITEM(it, k)) < 0) goto fail;
        }
        if (!ours) {
            PyObject *ev = PyTuple_Pack(2, PyTuple_GET_ITEM(it, 0), s_in);
            if (!ev || PyList_Append(out, ev) < 0) {
                Py_XDECREF(ev);
                goto fail;
            }
            Py_DECREF(ev);
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    for (Py_ssize_t i = 0; i < m; i++) {
        Py_DECREF(chans[i]);
        Py_DECREF(its[i]);
        Py_XDECREF(keep[i]);
    }
    PyMem_Free(chans);
    PyMem_Free(its);
    PyMem_Free(v);
    PyMem_Free(keep);
    PyMem_Free(ready);
    Py_DECREF(items);
    return out;
}

static int ipc_check_header(MappingObject *seg, uint64_t *cap, const char **why) {
    if (seg->size < IPC_RING) { *why = "segment smaller than its control page"; return -1; }
    uint32_t *h = (uint32_t *)seg->addr;
    uint64_t c = *u64_at(seg->addr, 8), off = *u64_at(seg->addr, 16);
    if (h[0] != IPC_MAGIC) { *why = "bad segment magic"; return -1; }
    if (h[1] != IPC_VERSION) { *why = "unknown segment version"; return -1; }
    if (off != IPC_RING || c < IPC_MIN_CAP || c > IPC_MAX_CAP || (c & (c - 1))) {
        *why = "bad ring capacity or offset"; return -1;
    }
    if ((uint64_t)seg->size < IPC_RING + c) { *why = "segment smaller than its ring"; return -1; }
    *cap = c;
    return 0;
}

/* IpcChannel(mine, peer, fd): my segment (rw, header written), the peer's (ro), the socket's fd. */
static int IpcChannel_init(IpcChannelObject *c, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mine", "peer", "fd", NULL};
    PyObject *mine, *peer;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!i", kwlist, &MappingType, &mine, &MappingType, &peer, &fd)) return -1;
    MappingObject *mm = (MappingObject *)mine, *pm = (MappingObject *)peer;
    const char *why = NULL;
    uint64_t cap, pcap;
    if (!mm->writable || ipc_check_header(mm, &cap, &why) < 0) {
        PyErr_Format(PyExc_ValueError, "own ipc segment: %s", why ? why : "not writable");
        return -1;
    }
    if (ipc_check_header(pm, &pcap, &why) < 0) {
        PyErr_Format(err_type(RemoteProtoErr, PyExc_ValueError), "peer's ipc segment: %s", why);
        return -1;
    }
    Py_XSETREF(c->mine, Py_NewRef(mine));
    Py_XSETREF(c->peer, Py_NewRef(peer));
    c->m = mm->addr;
    c->p = pm->addr;
    c->cap = cap;
    c->pcap = pcap;
    c->fd = fd;
    c->head = LOAD_ACQ(u64_at(c->m, IPC_TX_HEAD));
    c->tail = LOAD_ACQ(u64_at(c->m, IPC_RX_TAIL));
    c->tail_seen = c->head; /* nothing read of a new ring */
    c->head_seen = c->tail;
    return 0;
}

static void IpcChannel_dealloc(IpcChannelObject *c) {
    if (c->weakreflist) PyObject_ClearWeakRefs((PyObject *)c);
    Py_CLEAR(c->mine);
    Py_CLEAR(c->peer);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *IpcChannel_stats(IpcChannelObject *c, PyObject *unused) {
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "bytes_in", (unsigned long long)c->st_in, "bytes_out",
                         (unsigned long long)c->st_out, "wakeups_sent", (unsigned long long)c->st_wakes, "sleeps",
                         (unsigned long long)c->st_sleeps, "writer_waits", (unsigned long long)c->st_waits,
                         "wakeups_heard", (unsigned long long)c->st_bells_heard);
}

static PyObject *IpcChannel_get_spin(IpcChannelObject *c, void *x) { return PyFloat_FromDouble(c->spin_ns / 1e9); }
static int IpcChannel_set_spin(IpcChannelObject *c, PyObject *v, void *x) { return set_seconds(&c->spin_ns, v); }
static PyObject *IpcChannel_get_segment(IpcChannelObject *c, void *x) { return Py_NewRef(c->mine ? c->mine : Py_None); }
static PyObject *IpcChannel_get_capacity(IpcChannelObject *c, void *x) { return PyLong_FromUnsignedLongLong(c->cap); }
static PyObject *IpcChannel_get_closed(IpcChannelObject *c, void *x) { return PyBool_FromLong(c->m == NULL); }

static PyMethodDef IpcChannel_methods[] = {
    {"recv_into", (PyCFunction)IpcChannel_recv_into, METH_O,
     "recv_into(buf) -> n: copy from the ring into buf; 0 at the end; BlockingIOError (armed) when empty."},
    {"send", (PyCFunction)IpcChannel_send, METH_O, "send(buffers) -> bytes copied into the ring (0 when full)."},
    {"available", (PyCFunction)IpcChannel_available, METH_NOARGS, "available() -> bytes readable now."},
    {"wait", (PyCFunction)IpcChannel_wait, METH_O, "wait(seconds) -> bool: spin (GIL released) for something to do."},
    {"before_wait", (PyCFunction)IpcChannel_before_wait, METH_NOARGS,
     "before_wait() -> bool: spin, then arm the wake-up; True if there is something to do now."},
    {"arm", (PyCFunction)IpcChannel_arm, METH_NOARGS,
     "arm() -> bool: arm the wake-up before sleeping on the socket; True if there is something to do now."},
    {"take", (PyCFunction)IpcChannel_take, METH_NOARGS, "take(): a caller reads and spins from now on (leased)."},
    {"give_back", (PyCFunction)(void (*)(void))IpcChannel_give_back, METH_FASTCALL,
     "give_back(woke=False) -> bool: back to the loop, rearmed (the doorbell drained if the caller slept\n"
     "or `woke`: the loop was woken meanwhile); True if there is something to read already."},
    {"close", (PyCFunction)IpcChannel_close, METH_NOARGS, "close(): mark closed, drop the mappings."},
    {"statistics", (PyCFunction)IpcChannel_stats, METH_NOARGS, NULL},
    {NULL},
};
static PyObject *IpcChannel_get_leased(IpcChannelObject *c, void *x) { return PyBool_FromLong(c->leased); }
static PyGetSetDef IpcChannel_getset[] = {
    {"spin", (getter)IpcChannel_get_spin, (setter)IpcChannel_set_spin, "seconds before_wait() spins", NULL},
    {"segment", (getter)IpcChannel_get_segment, NULL, "this side's own segment (a Mapping)", NULL},
    {"capacity", (getter)IpcChannel_get_capacity, NULL, "bytes in this side's TX ring", NULL},
    {"closed", (getter)IpcChannel_get_closed, NULL, NULL, NULL},
    {"leased", (getter)IpcChannel_get_leased, NULL, "a caller reads it for now (take/give_back)", NULL},
    {NULL},
};

static PyTypeObject IpcChannelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "copyless._core.IpcChannel",
    .tp_basicsize = sizeof(IpcChannelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "IpcChannel(mine, peer, fd): one end of an ipc:// byte stream over two shared-memory rings.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)IpcChannel_init,
    .tp_dealloc = (destructor)IpcChannel_dealloc,
    .tp_methods = IpcChannel_methods,
    .tp_getset = IpcChannel_getset,
    .tp_weaklistoffset = offsetof(IpcChannelObject, weakreflist),
};

/* ================================================================== module */
static PyObject *mod_set_errors(PyObject *mod, PyObject *args) {
    PyObject *wb, *to, *rp, *cl, *cf = NULL;
    if (!PyArg_ParseTuple(args, "OOOO|O", &wb, &to, &rp, &cl, &cf)) return NULL;
    if (cf) Py_XSETREF(ConfigErr, Py_NewRef(cf));
    Py_XSETREF(WouldBlockError, Py_NewRef(wb));
    Py_XSETREF(TimeoutErr, Py_NewRef(to));
    Py_XSETREF(RemoteProtoErr, Py_NewRef(rp));
    Py_XSETREF(ClosedErr, Py_NewRef(cl));
    Py_RETURN_NONE;
}

static PyObject *mod_ctl_size(PyObject *mod, PyObject *args) {
    unsigned int d, r;
    if (!PyArg_ParseTuple(args, "II", &d, &r)) return NULL;
    return PyLong_FromSize_t(ctl_size(d, r));
}



static PyMethodDef module_methods[] = {
    {"_set_errors", mod_set_errors, METH_VARARGS, NULL},
    {"_track_kept", mod_track_kept, METH_O,
     "_track_kept(messages): let the collector see the received messages still held after their dispatch."},
    {"ctl_size", mod_ctl_size, METH_VARARGS, "ctl_size(desc_cap, rel_cap) -> bytes of a control segment"},
    {"ipc_run_streams", (PyCFunction)(void (*)(void))mod_ipc_run_streams, METH_FASTCALL,
     "ipc_run_streams([(fd, stream, reader, writer)], timeout, loop) -> None | [(fd, EPOLLIN)]: an I/O loop's turn "
     "over its ipc streams: spin, then run the callbacks of those with work."},
    {NULL},
};

static struct PyModuleDef coremodule = {PyModuleDef_HEAD_INIT, "copyless._core", "copyless compiled core", -1, module_methods};

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&RegionType) < 0 || PyType_Ready(&PubCoreType) < 0 ||
        PyType_Ready(&SubCoreType) < 0 || PyType_Ready(&MessageType) < 0 || PyType_Ready(&LoanType) < 0 ||
        PyType_Ready(&IpcChannelType) < 0)
        return NULL;
    if (!empty_bytes && !(empty_bytes = PyBytes_FromStringAndSize(NULL, 0))) return NULL;
    if (!str_release && !(str_release = PyUnicode_InternFromString("release"))) return NULL;
    if (!view_release) { /* (its method descriptor, as the type holds it) */
        PyObject *d = PyDict_GetItemWithError(PyMemoryView_Type.tp_dict, str_release);
        if (d && Py_IS_TYPE(d, &PyMethodDescr_Type) &&
            (((PyMethodDescrObject *)d)->d_method->ml_flags & (METH_VARARGS | METH_FASTCALL | METH_NOARGS | METH_O |
                                                               METH_KEYWORDS | METH_METHOD)) == METH_NOARGS)
            view_release = ((PyMethodDescrObject *)d)->d_method->ml_meth;
        else if (PyErr_Occurred())
            return NULL;
    }
    PyObject *m = PyModule_Create(&coremodule);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObjectRef(m, "PubCore", (PyObject *)&PubCoreType) < 0 ||
        PyModule_AddObjectRef(m, "SubCore", (PyObject *)&SubCoreType) < 0 ||
        PyModule_AddObjectRef(m, "Message", (PyObject *)&MessageType) < 0 ||
        PyModule_AddObjectRef(m, "Loan", (PyObject *)&LoanType) < 0 ||
        PyModule_AddObjectRef(m, "IpcChannel", (PyObject *)&IpcChannelType) < 0)
        return NULL;
    PyObject *cap = PyCapsule_New(&capi, COPYLESS_CAPI_NAME, NULL);
    if (!cap || PyModule_AddObject(m, "_CAPI", cap) < 0) {
        Py_XDECREF(cap);
        return NULL;
    }
    PyModule_AddIntConstant(m, "WIRE_VERSION", WIRE_VERSION);
    PyModule_AddIntConstant(m, "CTL_MAGIC", CTL_MAGIC);
    PyModule_AddIntConstant(m, "CTL_DESC_TAIL", CTL_DESC_TAIL);
    PyModule_AddIntConstant(m, "CTL_DESC_HEAD", CTL_DESC_HEAD);
    PyModule_AddIntConstant(m, "CTL_REL_TAIL", CTL_REL_TAIL);
    PyModule_AddIntConstant(m, "CTL_REL_HEAD", CTL_REL_HEAD);
    PyModule_AddIntConstant(m, "CTL_SUB_WAITER", CTL_SUB_WAITER);
    PyModule_AddIntConstant(m, "CTL_PUB_CLOSED", CTL_PUB_CLOSED);
    PyModule_AddIntConstant(m, "CTL_DESC_RING", CTL_DESC_RING);
    PyModule_AddIntConstant(m, "DESC_SIZE", DESC_SIZE);
    PyModule_AddIntConstant(m, "REL_SIZE", REL_SIZE);
    PyModule_AddIntConstant(m, "DB_SEQ", DB_SEQ);
    PyModule_AddIntConstant(m, "DB_PUB_WAITING", DB_PUB_WAITING);
    PyModule_AddIntConstant(m, "DB_SIZE", DB_SIZE);
    PyModule_AddIntConstant(m, "ARENA_DATA", ARENA_DATA);
    PyModule_AddIntConstant(m, "POLICY_BLOCK", POLICY_BLOCK);
    PyModule_AddIntConstant(m, "POLICY_RAISE", POLICY_RAISE);
    PyModule_AddIntConstant(m, "POLICY_OVERWRITE", POLICY_OVERWRITE);
    PyModule_AddIntConstant(m, "IPC_MAGIC", IPC_MAGIC);
    PyModule_AddIntConstant(m, "IPC_VERSION", IPC_VERSION);
    PyModule_AddIntConstant(m, "IPC_TX_HEAD", IPC_TX_HEAD);
    PyModule_AddIntConstant(m, "IPC_RX_TAIL", IPC_RX_TAIL);
    PyModule_AddIntConstant(m, "IPC_RX_SLEEP", IPC_RX_SLEEP);
    PyModule_AddIntConstant(m, "IPC_TX_WAIT", IPC_TX_WAIT);
    PyModule_AddIntConstant(m, "IPC_TX_WANT", IPC_TX_WANT);
    PyModule_AddIntConstant(m, "IPC_CLOSED", IPC_CLOSED);
    PyModule_AddIntConstant(m, "IPC_RING", IPC_RING);
    PyModule_AddIntConstant(m, "IPC_MIN_CAPACITY", (long)IPC_MIN_CAP);
    PyModule_AddIntConstant(m, "IPC_MAX_CAPACITY", (long)IPC_MAX_CAP);
    return m;
}
