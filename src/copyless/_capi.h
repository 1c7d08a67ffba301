/* The core's C API for the codec, passed from copyless._core to copyless._codec
 * in a capsule (the numpy way): the codec builds received Messages and reads
 * outgoing ones with a C call instead of a Python one.  The Message struct stays
 * private to _core.c; this is the whole of what the codec may do with one. */
#ifndef COPYLESS_CAPI_H
#define COPYLESS_CAPI_H

#include <Python.h>
#include <stdint.h>
#include <sys/uio.h>

#define COPYLESS_CAPI_NAME "copyless._core._CAPI"
#define COPYLESS_CAPI_VERSION 7

/* What a sender needs of an outgoing Message. */
typedef struct {
    uint32_t type;
    int priority, is_reply;
    uint64_t tid;
    PyObject *front;   /* new reference: one buffer */
    PyObject *buffers; /* new reference: the data as a list of buffers (Message._buffers) */
    uint64_t sent_id;  /* this send's number, new each call (Message._sent_id) */
} CopylessOutFields;

typedef struct {
    int version;
    PyTypeObject *message_type;
    /* A received messenger message (Message._received), new reference; front and
     * data are kept as they are (memoryviews), connection may be NULL or None. */
    PyObject *(*received)(uint32_t type, PyObject *front, PyObject *data, uint64_t tid, int priority, uint64_t seq,
                          int is_reply, PyObject *connection);
    /* The fields of any Message; -1 with an error set (not a Message, released). */
    int (*outgoing)(PyObject *msg, CopylessOutFields *out);
    /* A received message whose front and data are base[foff:foff+flen] and
     * base[doff:doff+dlen] (base: a 1-D memoryview of bytes), made when first used;
     * not yet tracked by the collector: call _core._track_kept() on what outlives
     * its dispatch. */
    PyObject *(*received_lazy)(uint32_t type, PyObject *base, Py_ssize_t foff, Py_ssize_t flen, Py_ssize_t doff,
                               Py_ssize_t dlen, uint64_t tid, int priority, uint64_t seq, int is_reply,
                               PyObject *connection);
    /* An ipc:// stream's channel (copyless._core.IpcChannel), and its send from iovecs,
     * with the GIL: what IpcChannel.send(buffers) does, without the buffer objects. */
    PyTypeObject *ipc_channel_type;
    Py_ssize_t (*ipc_send)(PyObject *chan, const struct iovec *iov, Py_ssize_t n);
    /* Read up to len bytes from an ipc:// channel into dst, as IpcChannel.recv_into
     * does: > 0 bytes read, 0 the end of the stream, -2 nothing there (the wake-up
     * armed), -1 with an error set (closed, or the peer broke the protocol). */
    Py_ssize_t (*ipc_recv)(PyObject *chan, void *dst, Py_ssize_t len);
    /* A Message's is_reply flag (1 or 0, and its tid in *tid), -1 if not a Message. */
    int (*reply_tid)(PyObject *msg, uint64_t *tid);
    /* A caller's lease of an ipc:// channel (Connection.call), as the IpcChannel methods
     * of the same names: take() (0); before_wait(): 1 something to do now, 0 the wake-up
     * is armed (block on the socket); give_back(woke): 1 something came already, 0 not,
     * -1 with an error set. */
    int (*ipc_take)(PyObject *chan);
    int (*ipc_before_wait)(PyObject *chan);
    int (*ipc_give_back)(PyObject *chan, int woke);
    /* A received messenger message's data copied into `into` (a writable 1-D memoryview
     * of bytes, at least as long, of another buffer) and replaced by into[:n]: the one
     * copy of a small reply into the buffer its call posted (Messenger._reply), with no
     * view made of the data where it was.  1 done, 0 not such a message or buffer
     * (nothing done), -1 with an error set. */
    int (*data_into)(PyObject *msg, PyObject *into);
} CopylessCAPI;

#endif
