#!/usr/bin/env python3
"""copyless vs. the IPC libraries a user would pick instead, in one run.

    python benchmarks/bench_pubsub.py [--quick] [--json PATH] [--only copyless,pipe,unix,zmq,iceoryx2]

Every measurement starts two fresh processes with multiprocessing 'spawn':
A (sender / pinger, owns the clock) and B (receiver / ponger).  This process
only orchestrates: it runs no messaging-library code, exchanges small control
messages with deadlines (build, connect, start, B's 'warm'/'result' relayed to
A, A's 'done'), and kills both children if anything hangs or dies, so a stuck
native call (or a crash) costs one row, not the run.  Payloads go only through
the backend under test.

Metrics (per backend row):
  msgs_per_s_64        64-byte one-way stream, one send / one blocking receive per
                       message, counted by the receiver, end-to-end (sentinel + ack)
  msgs_per_s_64_busy   the same with a busy-polling receiver (non-blocking receive loop)
  rtt_busy_p50/p99_us  64-byte ping-pong, both sides busy-poll (uses both cores)
  rtt_block_p50/p99_us 64-byte ping-pong, both sides use blocking receives
  gbps_1MiB/_16MiB     one-way bandwidth (1e9 bytes/s); the receiver reads one byte of
                       every 4 KiB page of every message and checks it against the source
  x_memcpy_1MiB/_16MiB that bandwidth over the memcpy ceiling measured by the same sender
                       process around its stream (median over repeats of per-run ratios)
Reference rows: eventfd (blocking ping-pong between two processes = kernel wake-up
floor) and memcpy (`dst[:] = src` in one process = bandwidth ceiling).

How a bandwidth row and its ceiling are paired.  This VM changes speed for
minutes at a time (memcpy itself moves 24 -> 35 GB/s at 16 MiB between runs),
so a ratio of a stream row to a memcpy row measured minutes apart, once, in
another process, reports the VM as much as the library.  Every large-message
stream therefore times the ceiling too: its sender runs `dst[:] = src` from the
very source it sends into a private buffer, for half as long as the stream
lasts just before the warm-up and for the other half just after the receiver
has taken the sentinel (the receiver waits, idle, both times), and x_memcpy is
the stream's GB/s over the mean of the two, per run.  Before and after, not
before only: the VM drifts by as much as 15 % over a second or two (the two
halves of one run have differed by that much).  The ceiling is unchanged
(plain memcpy between two ordinary buffers, one reused destination, hot in
cache); only when and where it is measured is like the row's.  A full run
repeats each bandwidth cell five times (other cells three) and reports
medians: with both vCPUs busy, this VM's host at times halves the memory
bandwidth of each for a few hundred milliseconds (two processes each running
a plain memcpy loop show it, no messaging library involved), which takes a
single run to about 0.5x whatever the ceiling.  The standalone memcpy row is
still printed.  A stream's
duration ends when the receiver takes the sentinel (its CLOCK_MONOTONIC stamp,
shared by both processes), not when the sender hears of it through the
orchestrator: that relay (two pipe hops, three wake-ups) is not the backend's.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")  # numpy must not add (spinning) BLAS threads to our processes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Pair,
    PassFd,
    close_spec,
    emit_json,
    expect,
    install_signal_cleanup,
    machine_info,
    median,
    percentile,
    render_table,
)

pc = time.perf_counter_ns
RECV_TIMEOUT = 5.0  # s, any single blocking receive / busy-poll wait
SENTINEL = b"\x00"  # a 1-byte message ends every stream / ping-pong
BIG = 64 * 1024  # messages >= this are "large" (zero-copy paths, page-touching)
COPYLESS_KW: dict = {}  # Publisher sizing kwargs; {} = library defaults (large msgs take the large path)

# seconds per throughput run, ping-pong iterations, repeats of a cell (bandwidth cells get more:
# a single run moves by +-6 % and at times falls to half, see the module docstring)
MODES = {
    "quick": dict(stream_s=0.4, bw_s=0.4, rtt_iters=2000, rtt_warm=300, repeats=1, bw_repeats=1),
    "full": dict(stream_s=1.0, bw_s=1.0, rtt_iters=10000, rtt_warm=1000, repeats=3, bw_repeats=5),
}
# (metric, test, message size, busy-polling receiver?)
TESTS = [
    ("msgs_per_s_64", "stream", 64, False),
    ("msgs_per_s_64_busy", "stream", 64, True),
    ("rtt_busy", "rtt", 64, True),
    ("rtt_block", "rtt", 64, False),
    ("gbps_1MiB", "stream", 1 << 20, False),
    ("gbps_16MiB", "stream", 16 << 20, False),
]
COLUMNS = [
    "msgs_per_s_64",
    "msgs_per_s_64_busy",
    "rtt_busy_p50_us",
    "rtt_busy_p99_us",
    "rtt_block_p50_us",
    "rtt_block_p99_us",
    "gbps_1MiB",
    "gbps_16MiB",
    "x_memcpy_1MiB",
    "x_memcpy_16MiB",
]
HEADERS = {
    "msgs_per_s_64": "msg/s 64B",
    "msgs_per_s_64_busy": "msg/s busy",
    "rtt_busy_p50_us": "busy p50us",
    "rtt_busy_p99_us": "busy p99us",
    "rtt_block_p50_us": "block p50us",
    "rtt_block_p99_us": "block p99us",
    "gbps_1MiB": "GB/s 1MiB",
    "gbps_16MiB": "GB/s 16MiB",
    "x_memcpy_1MiB": "x memcpy 1MiB",
    "x_memcpy_16MiB": "x memcpy 16MiB",
}
HIGHER_IS_BETTER = {"msgs_per_s_64", "msgs_per_s_64_busy", "gbps_1MiB", "gbps_16MiB", "x_memcpy_1MiB", "x_memcpy_16MiB"}


def queue_depth(size):  # for backends that need a bound (iceoryx2 buffer, zmq HWM for large)
    return 256 if size < BIG else (8 if size <= 1 << 20 else 4)


def warm_count(size):  # messages sent before the clock starts (page faults, connections)
    return 2000 if size < BIG else (16 if size <= 1 << 20 else 6)


def make_src(n: int) -> bytes:
    """Deterministic payload, identical in both processes."""
    import numpy as np

    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


def touch(buf) -> int:
    """Read one byte of every 4 KiB page (forces zero-copy receivers to map the data)."""
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8)[::4096].sum())


# ================================================================= backends
# An endpoint is one side ('A' = sender/pinger, 'B' = receiver/ponger) of a
# bidirectional channel: A->B carries the stream / pings, B->A the pongs.
# Construction creates what the peer must find (A is built first, then B);
# connect() finishes once the peer exists.  recv() returns a buffer valid until
# release() / the next recv().  prepare() runs in the orchestrator and returns
# (spec for A, spec for B); fds/sockets in a spec are handed to the child.


class Endpoint:
    name = ""
    note = None  # how the rows were measured, shown in notes

    @staticmethod
    def prepare(tag):
        return tag, tag

    def connect(self):
        pass

    def release(self):
        pass

    def close(self):
        pass


def _names(tag, side):
    a2b, b2a = f"clbench_{tag}_a2b", f"clbench_{tag}_b2a"
    return (a2b, b2a) if side == "A" else (b2a, a2b)


def import_copyless():
    try:
        import copyless
    except ImportError:
        src = Path(__file__).resolve().parent.parent / "src"
        if not (src / "copyless").is_dir() or str(src) in sys.path:
            raise
        sys.path.insert(0, str(src))
        import copyless
    return copyless


class Copyless(Endpoint):
    name = "copyless"
    note = (
        "sender: pub.send(src); receiver: sub.recv(timeout) / sub.try_recv() (busy), msg.release(); "
        "a blocking recv spins 50 us (the default) before it sleeps"
    )
    spin: float | None = None  # None: the library default

    def __init__(self, tag, side, cfg):
        self.cl = cl = import_copyless()
        self.WouldBlock = cl.WouldBlock
        self.tx, self.rx = _names(tag, side)
        self.pub, self.sub, self.msg = cl.Publisher(self.tx, **COPYLESS_KW), None, None
        if side == "B":
            self.sub = self._subscriber()

    def _subscriber(self):
        kw = {} if self.spin is None else {"spin": self.spin}
        return self.cl.Subscriber(self.rx, timeout=10, **kw)

    def connect(self):
        if self.sub is None:
            self.sub = self._subscriber()
        self.pub.wait_for_subscribers(1, timeout=10)

    def send(self, data):
        self.pub.send(data)

    def recv(self, timeout):
        self.msg = m = self.sub.recv(timeout=timeout)
        if m is None:
            raise TimeoutError("copyless recv timed out")
        return m.data

    def recv_nowait(self):
        self.msg = m = self.sub.try_recv()
        return None if m is None else m.data

    def release(self):
        self.msg.release()

    def close(self):
        for x in (self.sub, self.pub):
            if x is not None:
                x.close()


class CopylessLoan(Copyless):
    name = "copyless-loan"
    note = "sender: with pub.loan(n) as buf: buf[:] = src (the one copy); receiver as copyless"

    def send(self, data):
        with self.pub.loan(len(data)) as buf:
            buf[:] = data


class CopylessNoSpin(Copyless):
    name = "copyless-nospin"
    note = (
        "as copyless, but the subscriber never spins (spin=0): a blocking recv sleeps on the "
        "futex at once, the row to compare with peers that sleep in the kernel"
    )
    spin = 0.0


class MpPipe(Endpoint):
    name = "pipe"
    note = (
        "multiprocessing.Pipe: send_bytes / recv_bytes (large: recv_bytes_into a "
        "preallocated bytearray); busy = conn.poll() spin"
    )

    @staticmethod
    def prepare(tag):
        return mp.get_context("spawn").Pipe()

    def __init__(self, conn, side, cfg):
        self.c = conn
        self.buf = bytearray(cfg["max_msg"]) if cfg["max_msg"] >= BIG else None
        self.mv = memoryview(self.buf) if self.buf is not None else None

    def send(self, data):
        self.c.send_bytes(data)

    def recv(self, timeout=None):  # no timeout: a dead peer gives EOFError
        if self.buf is not None:
            return self.mv[: self.c.recv_bytes_into(self.buf)]
        return self.c.recv_bytes()

    def recv_nowait(self):
        return self.recv() if self.c.poll() else None

    def close(self):
        self.c.close()


class UnixStream(Endpoint):
    """AF_UNIX SOCK_STREAM socketpair, 4-byte length prefix.  The receiver reads
    greedily (<= 64 KiB per recv_into) into one preallocated buffer and returns
    views into it; bodies of large messages are read in place, never moved."""

    name = "unix"
    note = (
        "AF_UNIX SOCK_STREAM socketpair, length prefix; sendall / recv_into a "
        "preallocated buffer; busy = recv_into(MSG_DONTWAIT) spin"
    )
    HDR = struct.Struct("<I")
    CHUNK = 64 * 1024

    @staticmethod
    def prepare(tag):
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def __init__(self, sock, side, cfg):
        self.s = sock
        sock.setblocking(True)  # no timeout: CPython would poll() before every recv
        self.cap = cfg["max_msg"] + 4 + self.CHUNK
        self.buf = bytearray(self.cap)
        self.mv = memoryview(self.buf)
        self.r = self.w = 0

    def send(self, data):
        n = len(data)
        if n <= 4096:
            self.s.sendall(self.HDR.pack(n) + data)
        else:
            self.s.sendall(self.HDR.pack(n))
            self.s.sendall(data)

    def _fill(self, need, flags=0):
        if self.r + need > self.cap:  # compact (moves < 64 KiB)
            k = self.w - self.r
            self.mv[:k] = self.mv[self.r : self.w]
            self.r, self.w = 0, k
        while self.w - self.r < need:
            end = self.r + need if need > self.CHUNK else min(self.cap, self.w + self.CHUNK)
            n = self.s.recv_into(self.mv[self.w : end], 0, flags)
            if n == 0:
                raise EOFError("peer closed the socket")
            self.w += n
            flags = 0  # got something: block for the rest

    def _get(self, flags):
        if self.r == self.w:
            self.r = self.w = 0
        if self.w - self.r < 4:
            self._fill(4, flags)
        n = self.HDR.unpack_from(self.buf, self.r)[0]
        if self.w - self.r < 4 + n:
            self._fill(4 + n)
        start = self.r + 4
        self.r = start + n
        return self.mv[start : self.r]

    def recv(self, timeout=None):
        return self._get(0)

    def recv_nowait(self):
        try:
            return self._get(socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def close(self):
        self.s.close()


_TMP = None


def _tmpdir():
    global _TMP
    if _TMP is None:
        _TMP = tempfile.mkdtemp(prefix="clbench-")
        atexit.register(shutil.rmtree, _TMP, True)
    return _TMP


class Zmq(Endpoint):
    name = "zmq"
    note = (
        "pyzmq PUSH/PULL over ipc:// (one pair per direction); large: copy=False both "
        "sides, HWM = queue depth; busy = recv(NOBLOCK) spin"
    )

    @staticmethod
    def prepare(tag):
        d = _tmpdir()
        spec = (f"ipc://{d}/{tag}-a2b", f"ipc://{d}/{tag}-b2a")
        return spec, spec

    def __init__(self, spec, side, cfg):
        import zmq

        self.Again, self.NOBLOCK = zmq.Again, zmq.NOBLOCK
        self.ctx = zmq.Context()
        self.tx, self.rx = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.copy = cfg["max_msg"] < BIG
        for s in (self.tx, self.rx):
            s.linger = 0
            s.sndtimeo = s.rcvtimeo = int(RECV_TIMEOUT * 1000)
            if not self.copy:
                s.sndhwm = s.rcvhwm = cfg["depth"]
        a2b, b2a = spec
        if side == "A":
            self.tx.bind(a2b)
            self.rx.bind(b2a)
        else:
            self.rx.connect(a2b)
            self.tx.connect(b2a)

    def send(self, data):
        self.tx.send(data, copy=self.copy)

    def recv(self, timeout=None):  # timeout = socket RCVTIMEO (raises zmq.Again)
        m = self.rx.recv(copy=self.copy)
        return m if self.copy else m.buffer

    def recv_nowait(self):
        try:
            m = self.rx.recv(self.NOBLOCK, copy=self.copy)
        except self.Again:
            return None
        return m if self.copy else m.buffer

    def close(self):
        self.tx.close(0)
        self.rx.close(0)
        self.ctx.term()


class Iceoryx2(Endpoint):
    """iceoryx2 publish-subscribe, payload Slice[c_uint8], no safe overflow +
    RetryUntilDelivered (lossless like the others).  Blocking receives need a
    separate event service: the sender notify()s after each send and the
    receiver Listener.timed_wait()s whenever receive() returns None."""

    name = "iceoryx2"
    note = (
        "Slice[c_uint8] pub/sub, loan_slice_uninit + memmove + assume_init().send(); "
        "receive() + payload().as_memory_view(); blocking = event service "
        "(notify per message, Listener.timed_wait); busy = receive() spin"
    )

    def __init__(self, tag, side, cfg):
        import iceoryx2 as iox

        iox.set_log_level(iox.LogLevel.Error)
        self.iox, self.n = iox, cfg["max_msg"]
        self.node = node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        tx, rx = (f"clbench/{n}" for n in _names(tag, side))
        depth = cfg["depth"]

        def pubsub(name):
            return (
                node.service_builder(iox.ServiceName.new(name))
                .publish_subscribe(iox.Slice[ctypes.c_uint8])
                .enable_safe_overflow(False)
                .subscriber_max_buffer_size(depth)
                .history_size(0)
                .max_publishers(1)
                .max_subscribers(1)
                .open_or_create()
            )

        def event(name):
            return node.service_builder(iox.ServiceName.new(name + "/ev")).event().open_or_create()

        self.tx_svc, self.rx_svc = pubsub(tx), pubsub(rx)
        self.pub = (
            self.tx_svc.publisher_builder()
            .initial_max_slice_len(self.n)
            .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        self.sub = self.rx_svc.subscriber_builder().buffer_size(depth).create()
        self.notifier = self.listener = self.tx_ev = None
        if not cfg["busy"]:
            self.tx_ev, rx_ev = event(tx), event(rx)
            self.listener = rx_ev.listener_builder().create()
        self.wait = iox.Duration.from_secs_f64(RECV_TIMEOUT)
        self.sample = self.view = None

    def connect(self):
        deadline = time.monotonic() + 10
        while (
            self.tx_svc.dynamic_config.number_of_subscribers < 1
            or self.tx_ev is not None
            and self.tx_ev.dynamic_config.number_of_listeners < 1
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2: peer's subscriber/listener did not appear")
            time.sleep(0.001)
        self.pub.update_connections()
        if self.tx_ev is not None:  # a Notifier created before the peer's Listener never reaches it
            self.notifier = self.tx_ev.notifier_builder().create()

    def send(self, data):
        n = len(data)
        s = self.pub.loan_slice_uninit(n)
        if data is self.view:  # pong: copy straight from the received sample
            ctypes.memmove(s.payload_ptr, self.sample.payload_ptr, n)
        elif type(data) is bytes:
            ctypes.memmove(s.payload_ptr, data, n)
        else:
            s.payload().as_memory_view().cast("B")[:] = memoryview(data).cast("B")
        s.assume_init().send()
        if self.notifier is not None:
            self.notifier.notify()

    def _take(self, s):
        self.sample = s
        self.view = v = s.payload().as_memory_view().cast("B")  # ctypes format '<B' -> 'B'
        return v

    def recv(self, timeout):
        s = self.sub.receive()
        if s is None:
            # timed_wait() often returns [] early (spurious wake-up), so it is no
            # timeout signal: re-check receive() and keep our own deadline
            deadline = time.monotonic() + timeout
            while (s := self.sub.receive()) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("iceoryx2: no sample within timeout")
                self.listener.timed_wait(self.wait)
        return self._take(s)

    def recv_nowait(self):
        s = self.sub.receive()
        return None if s is None else self._take(s)

    def release(self):
        self.sample.delete()
        self.sample = self.view = None

    def close(self):
        for x in (self.sub, self.pub, self.listener, self.notifier):
            if x is not None:
                x.delete()


class EventFd(Endpoint):
    """Reference: no payload, just the two kernel wake-ups of a round trip."""

    name = "eventfd"
    note = "os.eventfd blocking write/read ping-pong, two processes: kernel wake-up floor"
    metrics = {"rtt_block"}
    PAYLOAD = {1: SENTINEL, 64: bytes(64)}  # the counter value stands for the message length

    @staticmethod
    def prepare(tag):
        spec = (PassFd(os.eventfd(0)), PassFd(os.eventfd(0)))
        return spec, spec

    def __init__(self, spec, side, cfg):
        self.spec = spec
        a2b, b2a = spec[0].fd, spec[1].fd
        self.tx, self.rx = (a2b, b2a) if side == "A" else (b2a, a2b)

    def send(self, data):
        os.eventfd_write(self.tx, len(data))

    def recv(self, timeout=None):  # no timeout: the orchestrator kills us if we hang
        return self.PAYLOAD[os.eventfd_read(self.rx)]

    def close(self):
        close_spec(self.spec)


BACKENDS = {c.name: c for c in (Copyless, CopylessLoan, CopylessNoSpin, MpPipe, UnixStream, Zmq, Iceoryx2, EventFd)}
REFERENCES = ("eventfd", "memcpy")


# ==================================================================== roles
def make_get(ep, busy):
    """A zero-argument receive: blocking, or a busy-poll loop of recv_nowait()."""
    if not busy:
        recv = ep.recv
        return lambda: recv(RECV_TIMEOUT)
    nowait = ep.recv_nowait

    def get():
        v = nowait()
        if v is None:
            deadline = pc() + int(RECV_TIMEOUT * 1e9)
            while (v := nowait()) is None:
                if pc() > deadline:
                    raise TimeoutError("busy-poll receive timed out")
        return v

    return get


def cpu_pct(cpu0, t0):
    """CPU time of this process since (cpu0, t0) as % of wall time (100 = one core busy)."""
    return round(100 * (time.process_time() - cpu0) / max(1e-9, (pc() - t0) / 1e9), 1)


# Side A (sender / pinger) owns the clock; side B (receiver / ponger) reports to
# the orchestrator, which relays B's 'warm' and 'result' messages to A.


def sender_stream(ep, ctrl, cfg):
    size, send = cfg["size"], ep.send
    src = make_src(size)
    big = size >= BIG
    # the ceiling, from this process and this source, half just before the stream and half
    # just after it, the receiver idle both times (module docstring)
    before = ref_memcpy(size, cfg["duration"] / 2, src) if big else None
    for _ in range(cfg["warm"]):
        send(src)
    expect(ctrl, "warm", 10)
    batch, sent = (128 if size < BIG else 1), 0
    cpu0, t0 = time.process_time(), pc()
    end = t0 + int(cfg["duration"] * 1e9)
    while True:
        for _ in range(batch):
            send(src)
        sent += batch
        if pc() >= end:
            break
    cpu = cpu_pct(cpu0, t0)
    send(SENTINEL)
    res = expect(ctrl, "result", 10 + 2 * cfg["duration"])
    # until the receiver took the sentinel: perf_counter is CLOCK_MONOTONIC, one clock for both
    res.update(sent=sent, seconds=(res.pop("t_end") - t0) / 1e9, cpu_pct_sender=cpu)
    if big:  # the receiver now waits for 'finish', idle
        after = ref_memcpy(size, cfg["duration"] / 2, src)
        res.update(memcpy_gbps=(before + after) / 2, memcpy_gbps_before_after=(before, after))
    return res


def receiver_stream(ep, ctrl, cfg):
    size, get, release = cfg["size"], make_get(ep, cfg["busy"]), ep.release
    big = size >= BIG
    expect_sum = touch(make_src(size)) if big else None
    for _ in range(cfg["warm"]):
        get()
        release()
    ctrl.send(("warm",))
    count = nbytes = bad = 0
    cpu0, t0 = time.process_time(), pc()
    while True:
        v = get()
        n = len(v)
        if n == 1:
            t_end = pc()
            release()
            break
        if big:
            bad += touch(v) != expect_sum
        else:
            v[-1]  # read the payload (one cache line)
        count += 1
        nbytes += n
        release()
    ctrl.send(("result", dict(count=count, bytes=nbytes, bad=bad, cpu_pct_receiver=cpu_pct(cpu0, t0), t_end=t_end)))
    expect(ctrl, "finish", 10 + 2 * cfg["duration"])  # idle while the sender times its ceiling again


def sender_rtt(ep, ctrl, cfg):
    src, send, release = make_src(cfg["size"]), ep.send, ep.release
    get = make_get(ep, cfg["busy"])
    n, lat = cfg["iters"], [0] * cfg["iters"]
    cpu0, start = time.process_time(), pc()
    for i in range(-cfg["warm"], n):
        t0 = pc()
        send(src)
        get()
        release()
        t1 = pc()
        if i >= 0:
            lat[i] = t1 - t0
    cpu = cpu_pct(cpu0, start)
    send(SENTINEL)
    return dict(expect(ctrl, "result", 10), lat=lat, cpu_pct_sender=cpu)


def receiver_rtt(ep, ctrl, cfg):
    get, send, release = make_get(ep, cfg["busy"]), ep.send, ep.release
    v = get()
    cpu0, t0 = time.process_time(), pc()  # from the first ping: not the sender's start-up
    while len(v) != 1:
        send(v)
        release()
        v = get()
    release()
    ctrl.send(("result", dict(cpu_pct_receiver=cpu_pct(cpu0, t0))))


ROLES = {
    ("stream", "A"): sender_stream,
    ("stream", "B"): receiver_stream,
    ("rtt", "A"): sender_rtt,
    ("rtt", "B"): receiver_rtt,
}


def _side(ctrl, side, bname, spec, test, cfg):
    """Body of each child: build, connect, run one role, on the orchestrator's cue."""
    expect(ctrl, "build", 30)
    ep = BACKENDS[bname](spec, side, cfg)
    try:
        ctrl.send(("built",))
        expect(ctrl, "connect", 30)
        ep.connect()
        ctrl.send(("connected",))
        expect(ctrl, "start", 30)
        res = ROLES[test, side](ep, ctrl, cfg)
        if side == "A":
            ctrl.send(("done", res))
    finally:
        ep.close()


_tags = itertools.count()


def measure(bname, test, cfg, timeout):
    """One run of `test` over backend `bname` in two fresh processes; A's result."""
    tag = f"{os.getpid()}_{next(_tags)}"
    pspec, cspec = BACKENDS[bname].prepare(tag)
    try:
        with Pair(_side, ("A", bname, pspec, test, cfg), ("B", bname, cspec, test, cfg)) as p:
            close_spec(pspec)  # the children hold their own copies (EOF on death works)
            close_spec(cspec)
            for step, reply in (("build", "built"), ("connect", "connected")):
                for side in "AB":  # A first: B opens what A created
                    p.send(side, step)
                    p.expect(side, reply, 40)
            p.send("B", "start")
            p.send("A", "start")
            res = p.relay("done", timeout)
            if test == "stream":
                p.send("B", "finish")
            return res
    finally:
        close_spec(pspec)
        close_spec(cspec)


def ref_memcpy(size, duration, src=None):
    """GB/s of `dst[:] = src` for `duration` seconds, one destination reused."""
    src = make_src(size) if src is None else src
    dst = bytearray(size)
    msrc, mdst = memoryview(src), memoryview(dst)
    for _ in range(3):
        mdst[:] = msrc
    n, t0 = 0, pc()
    end = t0 + int(duration * 1e9)
    while pc() < end:
        mdst[:] = msrc
        n += 1
    return n * size / ((pc() - t0) / 1e9) / 1e9


# ===================================================================== main
def log(*a):
    print(*a, file=sys.stderr, flush=True)


def lat_stats(res):
    s = sorted(res.pop("lat"))
    us = lambda ns: round(ns / 1000, 3)  # noqa: E731
    return dict(
        iters=len(s),
        p50_us=us(percentile(s, 0.5)),
        p99_us=us(percentile(s, 0.99)),
        min_us=us(s[0]),
        max_us=us(s[-1]),
        mean_us=us(sum(s) / len(s)),
        **res,
    )


def run_backend(bname, mode):
    B = BACKENDS[bname]
    row, raw, notes = {c: None for c in COLUMNS}, {}, [B.note]
    large_hung = False
    for metric, test, size, busy in TESTS:
        if getattr(B, "metrics", None) and metric not in B.metrics:
            continue
        if large_hung and size >= BIG:
            notes.append(f"{metric}: skipped, a smaller large-message run hung")
            continue
        cfg = dict(
            size=size,
            busy=busy,
            max_msg=size,
            depth=queue_depth(size),
            warm=warm_count(size) if test == "stream" else mode["rtt_warm"],
            duration=mode["stream_s"] if size < BIG else mode["bw_s"],
            iters=mode["rtt_iters"],
        )
        try:
            if test == "rtt":
                runs = [
                    lat_stats(measure(bname, "rtt", cfg, timeout=10 + cfg["iters"] / 1000))
                    for _ in range(mode["repeats"])
                ]
                for q in ("p50_us", "p99_us"):
                    row[f"{metric}_{q}"] = median([r[q] for r in runs])
                raw[metric] = dict(
                    median_p50_us=row[f"{metric}_p50_us"], median_p99_us=row[f"{metric}_p99_us"], runs=runs
                )
                log(
                    f"  {bname:14s} {metric:18s} p50 {row[f'{metric}_p50_us']:.2f} us  p99 "
                    f"{row[f'{metric}_p99_us']:.2f} us   cpu% pinger {runs[0]['cpu_pct_sender']} "
                    f"ponger {runs[0]['cpu_pct_receiver']}"
                )
                continue
            reps = mode["bw_repeats" if size >= BIG else "repeats"]
            runs = [measure(bname, "stream", cfg, timeout=10 + 5 * cfg["duration"]) for _ in range(reps)]
            for r in runs:
                r["msgs_per_s"] = r["count"] / r["seconds"]
                r["gbps"] = r["bytes"] / r["seconds"] / 1e9
                if r.get("memcpy_gbps"):
                    r["x_memcpy"] = r["gbps"] / r["memcpy_gbps"]
                lost, bad = r["sent"] - r["count"], r["bad"]
                if lost or bad:
                    notes.append(f"{metric}: {lost} messages lost, {bad} failed the content check")
            key = "gbps" if metric.startswith("gbps") else "msgs_per_s"
            row[metric] = median([r[key] for r in runs])
            raw[metric] = dict(median=row[metric], runs=runs)
            paired = ""
            if metric.startswith("gbps"):
                xm = f"x_memcpy{metric[4:]}"
                row[xm] = raw[metric]["median_x_memcpy"] = median([r["x_memcpy"] for r in runs])
                ceil = median([r["memcpy_gbps"] for r in runs])
                paired = f" = {row[xm]:.3f} x memcpy (same sender, just before: {ceil:.2f})"
            log(
                f"  {bname:14s} {metric:18s} {row[metric]:,.3f}{paired}   cpu% sender "
                f"{runs[0]['cpu_pct_sender']} receiver {runs[0]['cpu_pct_receiver']}"
            )
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            log(f"  {bname:14s} {metric:18s} FAILED {msg}")
            if isinstance(e, ImportError) or "ImportError" in msg or "ModuleNotFoundError" in msg:
                notes.append(f"unavailable: {msg}")  # nothing else will work either
                break
            large_hung |= size >= BIG and "hung" in msg
            notes.append(f"{metric}: {msg}")
    return row, raw, notes


def run_memcpy(mode):
    row = {c: None for c in COLUMNS}
    row["gbps_1MiB"] = ref_memcpy(1 << 20, mode["bw_s"])
    row["gbps_16MiB"] = ref_memcpy(16 << 20, mode["bw_s"])
    log(f"  memcpy         gbps_1MiB/16MiB    {row['gbps_1MiB']:.2f} / {row['gbps_16MiB']:.2f}")
    return (
        row,
        {"gbps_1MiB": row["gbps_1MiB"], "gbps_16MiB": row["gbps_16MiB"]},
        [
            "memoryview dst[:] = src in the orchestrating process, GB/s: bandwidth ceiling; the "
            "x memcpy columns divide each row by the ceiling its own sender measured around it"
        ],
    )


def ratios(results):
    out = {
        "convention": (
            "for each copyless variant and peer: msgs_per_s*/gbps* = copyless/peer, "
            "rtt_* = peer/copyless; >1 always means copyless is better. x_memcpy_* = copyless's "
            "x_memcpy / the peer's: each row over the ceiling its own sender measured, so the VM's "
            "speed at the time of each row cancels"
        )
    }
    for cl in ("copyless", "copyless-loan"):
        if cl not in results:
            continue
        out[cl] = {}
        for peer, prow in results.items():
            if peer.startswith("copyless"):
                continue
            r = {}
            for m in COLUMNS:
                a, b = results[cl].get(m), prow.get(m)
                if a and b:
                    r[m] = round(a / b if m in HIGHER_IS_BETTER else b / a, 3)
            if r:
                out[cl][peer] = r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (< ~60 s total)")
    ap.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    ap.add_argument(
        "--only",
        metavar="LIST",
        help="comma list of backends: copyless (both variants), copyless-loan, pipe, "
        "unix, zmq, iceoryx2; the eventfd/memcpy reference rows always run "
        "unless --no-ref",
    )
    ap.add_argument("--no-ref", action="store_true", help="skip the eventfd/memcpy reference rows")
    args = ap.parse_args(argv)
    install_signal_cleanup()

    names = [n for n in BACKENDS if n not in REFERENCES]
    if args.only:
        want = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = want - set(names) - set(REFERENCES)
        if unknown:
            ap.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
        names = [n for n in names if n in want or (n.startswith("copyless") and "copyless" in want)]
    refs = [] if args.no_ref else list(REFERENCES)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]

    info = machine_info()
    try:
        info["versions"]["copyless"] = info["versions"]["copyless"] or import_copyless().__version__
    except Exception:
        pass
    print(f"machine: {info['cpu_model']}, nproc={info['nproc']}, kernel {info['kernel']}, Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    info["loadavg_start"] = os.getloadavg()
    print(
        f"mode: {mode_name} ("
        + ", ".join(f"{k}={v}" for k, v in mode.items())
        + f"); load average {info['loadavg_start'][0]:.2f}",
        flush=True,
    )

    t_start = time.monotonic()
    results, raw = {}, {}
    try:
        for b in names + refs:
            log(f"[{b}]")
            row, braw, notes = run_memcpy(mode) if b == "memcpy" else run_backend(b, mode)
            results[b], raw[b] = dict(row, notes=notes), braw
    finally:
        if _TMP:
            shutil.rmtree(_TMP, ignore_errors=True)
        info["loadavg_end"] = os.getloadavg()

    print()
    print(render_table(results, COLUMNS, HEADERS))
    print("\nnotes:")
    for b, row in results.items():
        for n in row.get("notes", []):
            print(f"  {b}: {n}")
    print("  busy-poll rows spin one core per process, i.e. both cores of this machine.")
    print(
        "  rtt_block depends on how fast a sleeping process is woken; on a VM that is often\n"
        "  bimodal (host halt-polling): compare rtt_block rows with the eventfd row of the same run."
    )
    print(
        f"\ntotal wall time {time.monotonic() - t_start:.1f} s; load average at end "
        f"{info['loadavg_end'][0]:.2f} (other load on this machine skews every row)"
    )

    doc = {
        "benchmark": "copyless benchmarks/bench_pubsub.py",
        "mode": mode_name,
        "settings": mode,
        "machine": info,
        "units": {
            "msgs_per_s_*": "messages/s (receiver count, end-to-end)",
            "rtt_*_us": "microseconds round trip, 64 B each way",
            "gbps_*": "1e9 bytes/s received, every 4 KiB page read by the receiver",
        },
        "method": {
            "tests": [
                dict(
                    metric=m,
                    test=t,
                    size=s,
                    busy_receiver=b,
                    depth=queue_depth(s),
                    warm=warm_count(s) if t == "stream" else mode["rtt_warm"],
                )
                for m, t, s, b in TESTS
            ],
            "busy": "both sides busy-poll; uses both cores",
            "repeats": f"throughput: median of runs ({mode['bw_repeats']} for bandwidth cells, else "
            f"{mode['repeats']}); rtt: median of per-run p50/p99",
            "cpu_pct": "process CPU time / wall time during the measured phase, per side "
            "(sender = pinger, receiver = ponger); 100 = one core busy",
            "x_memcpy": "per run: stream GB/s / GB/s of dst[:] = src timed by the same sender, from the "
            "same source, half just before and half just after the stream (receiver idle), mean of the "
            "two; median over repeats",
            "stream_end": "the receiver's CLOCK_MONOTONIC stamp when it takes the sentinel",
            "copyless_publisher_kwargs": COPYLESS_KW,
        },
        "results": results,
        "raw": raw,
        "ratios": ratios(results),
    }
    emit_json(doc, args.json)


if __name__ == "__main__":
    main()
