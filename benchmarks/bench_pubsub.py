#!/usr/bin/env python3
"""copyless vs. the IPC libraries a user would pick instead, in one run.

    python benchmarks/bench_pubsub.py [--quick] [--json PATH] [--only copyless,pipe,unix,zmq,iceoryx2]

Every measurement uses two processes: this one (sender / pinger, owns the
clock) and one child started with multiprocessing 'spawn' (receiver / ponger).
A control pipe carries only set-up handshakes, the end-of-stream ack and the
receiver's counts; payloads go through the backend under test.

Metrics (per backend row):
  msgs_per_s_64        64-byte one-way stream, one send / one blocking receive per
                       message, counted by the receiver, end-to-end (sentinel + ack)
  msgs_per_s_64_busy   the same with a busy-polling receiver (non-blocking receive loop)
  rtt_busy_p50/p99_us  64-byte ping-pong, both sides busy-poll (uses both cores)
  rtt_block_p50/p99_us 64-byte ping-pong, both sides use blocking receives
  gbps_1MiB/_16MiB     one-way bandwidth (1e9 bytes/s); the receiver reads one byte of
                       every 4 KiB page of every message and checks it against the source
Reference rows: eventfd (blocking ping-pong between two processes = kernel wake-up
floor) and memcpy (`dst[:] = src` in one process = bandwidth ceiling).
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import multiprocessing as mp
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (Child, ChildError, PassFd, close_spec, install_signal_cleanup,  # noqa: E402
                      machine_info, median, percentile, render_table)

pc = time.perf_counter_ns
RECV_TIMEOUT = 5.0           # s, any single blocking receive / busy-poll wait
SENTINEL = b"\x00"           # a 1-byte message ends every stream / ping-pong
BIG = 64 * 1024              # messages >= this are "large" (zero-copy paths, page-touching)
COPYLESS_KW: dict = {}       # Publisher sizing kwargs; {} = library defaults (large msgs take the large path)

MODES = {  # seconds per throughput run, ping-pong iterations, repeats of throughput runs
    "quick": dict(stream_s=0.4, bw_s=0.4, rtt_iters=2000, rtt_warm=300, repeats=1),
    "full": dict(stream_s=1.5, bw_s=1.5, rtt_iters=20000, rtt_warm=2000, repeats=3),
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
COLUMNS = ["msgs_per_s_64", "msgs_per_s_64_busy", "rtt_busy_p50_us", "rtt_busy_p99_us",
           "rtt_block_p50_us", "rtt_block_p99_us", "gbps_1MiB", "gbps_16MiB"]
HEADERS = {"msgs_per_s_64": "msg/s 64B", "msgs_per_s_64_busy": "msg/s busy",
           "rtt_busy_p50_us": "busy p50us", "rtt_busy_p99_us": "busy p99us",
           "rtt_block_p50_us": "block p50us", "rtt_block_p99_us": "block p99us",
           "gbps_1MiB": "GB/s 1MiB", "gbps_16MiB": "GB/s 16MiB"}
HIGHER_IS_BETTER = {"msgs_per_s_64", "msgs_per_s_64_busy", "gbps_1MiB", "gbps_16MiB"}


def queue_depth(size):   # for backends that need a bound (iceoryx2 buffer, zmq HWM for large)
    return 256 if size < BIG else (8 if size <= 1 << 20 else 4)


def warm_count(size):    # messages sent before the clock starts (page faults, connections)
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
# An endpoint is one side ('A' = parent, 'B' = child) of a bidirectional
# channel: A->B carries the stream / pings, B->A the pongs.  Construction
# creates what the peer must find; connect() finishes once the peer exists.
# recv() returns a buffer valid until release() / the next recv().

class Endpoint:
    name = ""
    note = None              # how the rows were measured, shown in notes

    @staticmethod
    def prepare(tag):        # -> (spec for A, spec for B); B's is pickled to the child
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
    note = "sender: pub.send(src); receiver: sub.recv(timeout) / sub.recv_nowait(), msg.release()"

    def __init__(self, tag, side, cfg):
        self.cl = cl = import_copyless()
        self.WouldBlock = cl.WouldBlock
        self.tx, self.rx = _names(tag, side)
        self.pub, self.sub, self.msg = cl.Publisher(self.tx, **COPYLESS_KW), None, None
        if side == "B":
            self.sub = cl.Subscriber(self.rx, timeout=10)

    def connect(self):
        if self.sub is None:
            self.sub = self.cl.Subscriber(self.rx, timeout=10)
        self.pub.wait_for_subscribers(1, timeout=10)

    def send(self, data):
        self.pub.send(data)

    def recv(self, timeout):
        self.msg = m = self.sub.recv(timeout=timeout)
        if m is None:
            raise TimeoutError("copyless recv timed out")
        return m.data

    def recv_nowait(self):
        try:
            self.msg = m = self.sub.recv_nowait()
        except self.WouldBlock:
            return None
        return m.data

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


class MpPipe(Endpoint):
    name = "pipe"
    note = ("multiprocessing.Pipe: send_bytes / recv_bytes (large: recv_bytes_into a "
            "preallocated bytearray); busy = conn.poll() spin")

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
            return self.mv[:self.c.recv_bytes_into(self.buf)]
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
    note = ("AF_UNIX SOCK_STREAM socketpair, length prefix; sendall / recv_into a "
            "preallocated buffer; busy = recv_into(MSG_DONTWAIT) spin")
    HDR = struct.Struct("<I")
    CHUNK = 64 * 1024

    @staticmethod
    def prepare(tag):
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def __init__(self, sock, side, cfg):
        self.s = sock
        sock.setblocking(True)   # no timeout: CPython would poll() before every recv
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
        if self.r + need > self.cap:                      # compact (moves < 64 KiB)
            k = self.w - self.r
            self.mv[:k] = self.mv[self.r:self.w]
            self.r, self.w = 0, k
        while self.w - self.r < need:
            end = self.r + need if need > self.CHUNK else min(self.cap, self.w + self.CHUNK)
            n = self.s.recv_into(self.mv[self.w:end], 0, flags)
            if n == 0:
                raise EOFError("peer closed the socket")
            self.w += n
            flags = 0                                      # got something: block for the rest

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
        return self.mv[start:self.r]

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
    return _TMP


class Zmq(Endpoint):
    name = "zmq"
    note = ("pyzmq PUSH/PULL over ipc:// (one pair per direction); large: copy=False both "
            "sides, HWM = queue depth; busy = recv(NOBLOCK) spin")

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
    note = ("Slice[c_uint8] pub/sub, loan_slice_uninit + memmove + assume_init().send(); "
            "receive() + payload().as_memory_view(); blocking = event service "
            "(notify per message, Listener.timed_wait); busy = receive() spin")

    def __init__(self, tag, side, cfg):
        import iceoryx2 as iox
        iox.set_log_level(iox.LogLevel.Error)
        self.iox, self.n = iox, cfg["max_msg"]
        self.node = node = iox.NodeBuilder.new().create(iox.ServiceType.Ipc)
        tx, rx = (f"clbench/{n}" for n in _names(tag, side))
        depth = cfg["depth"]

        def pubsub(name):
            return (node.service_builder(iox.ServiceName.new(name))
                    .publish_subscribe(iox.Slice[ctypes.c_uint8])
                    .enable_safe_overflow(False).subscriber_max_buffer_size(depth)
                    .history_size(0).max_publishers(1).max_subscribers(1).open_or_create())

        def event(name):
            return node.service_builder(iox.ServiceName.new(name + "/ev")).event().open_or_create()

        self.tx_svc, self.rx_svc = pubsub(tx), pubsub(rx)
        self.pub = (self.tx_svc.publisher_builder().initial_max_slice_len(self.n)
                    .backpressure_strategy(iox.BackpressureStrategy.RetryUntilDelivered).create())
        self.sub = self.rx_svc.subscriber_builder().buffer_size(depth).create()
        self.notifier = self.listener = self.tx_ev = None
        if not cfg["busy"]:
            self.tx_ev, rx_ev = event(tx), event(rx)
            self.listener = rx_ev.listener_builder().create()
        self.wait = iox.Duration.from_secs_f64(RECV_TIMEOUT)
        self.sample = self.view = None

    def connect(self):
        deadline = time.monotonic() + 10
        while (self.tx_svc.dynamic_config.number_of_subscribers < 1 or self.tx_ev is not None
               and self.tx_ev.dynamic_config.number_of_listeners < 1):
            if time.monotonic() > deadline:
                raise TimeoutError("iceoryx2: peer's subscriber/listener did not appear")
            time.sleep(0.001)
        self.pub.update_connections()
        if self.tx_ev is not None:   # a Notifier created before the peer's Listener never reaches it
            self.notifier = self.tx_ev.notifier_builder().create()

    def send(self, data):
        n = len(data)
        s = self.pub.loan_slice_uninit(n)
        if data is self.view:                 # pong: copy straight from the received sample
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
        self.view = v = s.payload().as_memory_view().cast("B")   # ctypes format '<B' -> 'B'
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


BACKENDS = {c.name: c for c in (Copyless, CopylessLoan, MpPipe, UnixStream, Zmq, Iceoryx2)}


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


def parent_stream(ep, ch, cfg):
    size, send = cfg["size"], ep.send
    src = make_src(size)
    for _ in range(cfg["warm"]):
        send(src)
    ch.expect("warm", 10)
    batch, sent = (128 if size < BIG else 1), 0
    cpu0, t0 = time.process_time(), pc()
    end = t0 + int(cfg["duration"] * 1e9)
    while True:
        for _ in range(batch):
            send(src)
        sent += batch
        if pc() >= end:
            break
    send(SENTINEL)
    res = ch.expect("result", 10 + 2 * cfg["duration"])
    res.update(sent=sent, seconds=(pc() - t0) / 1e9, parent_cpu_pct=cpu_pct(cpu0, t0))
    return res


def child_stream(ep, ctrl, cfg):
    size, get, release = cfg["size"], make_get(ep, cfg["busy"]), ep.release
    big = size >= BIG
    expect = touch(make_src(size)) if big else None
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
            release()
            break
        if big:
            bad += touch(v) != expect
        else:
            v[-1]                                # read the payload (one cache line)
        count += 1
        nbytes += n
        release()
    ctrl.send(("result", dict(count=count, bytes=nbytes, bad=bad, child_cpu_pct=cpu_pct(cpu0, t0))))


def parent_rtt(ep, ch, cfg):
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
    parent = cpu_pct(cpu0, start)
    send(SENTINEL)
    return dict(ch.expect("result", 10), lat=lat, parent_cpu_pct=parent)


def child_rtt(ep, ctrl, cfg):
    get, send, release = make_get(ep, cfg["busy"]), ep.send, ep.release
    cpu0, t0 = time.process_time(), pc()
    while True:
        v = get()
        if len(v) == 1:
            release()
            break
        send(v)
        release()
    ctrl.send(("result", dict(child_cpu_pct=cpu_pct(cpu0, t0))))


PARENT = {"stream": parent_stream, "rtt": parent_rtt}
CHILD = {"stream": child_stream, "rtt": child_rtt}


def _child_endpoint(ctrl, bname, spec, test, cfg):
    ep = BACKENDS[bname](spec, "B", cfg)
    try:
        ctrl.send(("ready",))
        if not ctrl.poll(30):
            raise TimeoutError("parent sent no 'go'")
        ctrl.recv()
        ep.connect()
        CHILD[test](ep, ctrl, cfg)
    finally:
        ep.close()


_tags = itertools.count()


def measure(bname, test, cfg, timeout):
    """One two-process run of `test` over backend `bname`; returns the parent role's result."""
    B = BACKENDS[bname]
    tag = f"{os.getpid()}_{next(_tags)}"
    pspec, cspec = B.prepare(tag)
    ep = None
    try:
        ep = B(pspec, "A", cfg)
        with Child(_child_endpoint, (bname, cspec, test, cfg), timeout) as ch:
            close_spec(cspec)     # the child has its own copy now (EOF works on death)
            try:
                ch.expect("ready", 30)
                ep.connect()
                ch.send("go")
                return PARENT[test](ep, ch, cfg)
            except (ChildError, TimeoutError):
                raise
            except Exception as e:  # the parent failed because the child did: say why
                err = ch.pending_error()
                if err:
                    raise ChildError(f"{err} (parent saw {type(e).__name__}: {e})") from e
                raise
    finally:
        close_spec(cspec)
        if ep is not None:
            ep.close()


# =============================================================== references
def _eventfd_pong(ctrl, a2b, b2a):
    ctrl.send(("ready",))
    while os.eventfd_read(a2b.fd) == 1:
        os.eventfd_write(b2a.fd, 1)
    ctrl.send(("result", None))


def ref_eventfd(iters, warm):
    a2b, b2a = os.eventfd(0), os.eventfd(0)   # blocking, counter semantics
    try:
        wake = lambda: os.eventfd_write(b2a, 1 << 40)   # noqa: E731  (watchdog unblocks us)
        with Child(_eventfd_pong, (PassFd(a2b), PassFd(b2a)), 10 + iters / 1000, wake) as ch:
            ch.expect("ready", 30)
            lat = [0] * iters
            for i in range(-warm, iters):
                t0 = pc()
                os.eventfd_write(a2b, 1)
                v = os.eventfd_read(b2a)
                t1 = pc()
                if v != 1:
                    raise TimeoutError("eventfd ping-pong stalled (watchdog)")
                if i >= 0:
                    lat[i] = t1 - t0
            os.eventfd_write(a2b, 2)
            ch.expect("result", 10)
            return dict(lat=lat)
    finally:
        os.close(a2b)
        os.close(b2a)


def ref_memcpy(size, duration):
    src = make_src(size)
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
    us = lambda ns: round(ns / 1000, 3)   # noqa: E731
    return dict(iters=len(s), p50_us=us(percentile(s, .5)), p99_us=us(percentile(s, .99)),
                min_us=us(s[0]), max_us=us(s[-1]), mean_us=us(sum(s) / len(s)), **res)


def run_backend(bname, mode):
    row, raw, notes = {c: None for c in COLUMNS}, {}, [BACKENDS[bname].note]
    large_hung = False
    for metric, test, size, busy in TESTS:
        if large_hung and size >= BIG:
            notes.append(f"{metric}: skipped, a smaller large-message run hung")
            continue
        cfg = dict(size=size, busy=busy, max_msg=size, depth=queue_depth(size),
                   warm=warm_count(size) if test == "stream" else mode["rtt_warm"],
                   duration=mode["stream_s"] if size < BIG else mode["bw_s"],
                   iters=mode["rtt_iters"])
        try:
            if test == "rtt":
                st = lat_stats(measure(bname, "rtt", cfg, timeout=10 + cfg["iters"] / 1000))
                row[f"{metric}_p50_us"], row[f"{metric}_p99_us"] = st["p50_us"], st["p99_us"]
                raw[metric] = st
                log(f"  {bname:14s} {metric:18s} p50 {st['p50_us']:.2f} us  p99 {st['p99_us']:.2f} us"
                    f"   cpu% parent {st['parent_cpu_pct']} child {st['child_cpu_pct']}")
                continue
            runs = [measure(bname, "stream", cfg, timeout=10 + 5 * cfg["duration"])
                    for _ in range(mode["repeats"])]
            for r in runs:
                r["msgs_per_s"] = r["count"] / r["seconds"]
                r["gbps"] = r["bytes"] / r["seconds"] / 1e9
                lost, bad = r["sent"] - r["count"], r["bad"]
                if lost or bad:
                    notes.append(f"{metric}: {lost} messages lost, {bad} failed the content check")
            key = "gbps" if metric.startswith("gbps") else "msgs_per_s"
            row[metric] = median([r[key] for r in runs])
            raw[metric] = dict(median=row[metric], runs=runs)
            log(f"  {bname:14s} {metric:18s} {row[metric]:,.3f}   cpu% parent "
                f"{runs[0]['parent_cpu_pct']} child {runs[0]['child_cpu_pct']}")
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            log(f"  {bname:14s} {metric:18s} FAILED {msg}")
            if isinstance(e, ImportError):  # library unavailable: nothing else will work
                notes.append(f"unavailable: {msg}")
                break
            large_hung |= size >= BIG and isinstance(e, TimeoutError)
            notes.append(f"{metric}: {msg}")
    return row, raw, notes


def run_references(mode):
    rows, raw = {}, {}
    row = {c: None for c in COLUMNS}
    try:
        st = lat_stats(ref_eventfd(mode["rtt_iters"], mode["rtt_warm"]))
        row["rtt_block_p50_us"], row["rtt_block_p99_us"] = st["p50_us"], st["p99_us"]
        raw["eventfd"] = {"rtt_block": st}
        row["notes"] = ["os.eventfd blocking write/read ping-pong, two processes: kernel wake-up floor"]
    except Exception as e:
        row["notes"] = [f"failed: {type(e).__name__}: {e}"]
    rows["eventfd"] = row
    log(f"  eventfd        rtt_block          p50 {row['rtt_block_p50_us']} us")
    row = {c: None for c in COLUMNS}
    row["gbps_1MiB"] = ref_memcpy(1 << 20, mode["bw_s"])
    row["gbps_16MiB"] = ref_memcpy(16 << 20, mode["bw_s"])
    row["notes"] = ["memoryview dst[:] = src in one process, GB/s: bandwidth ceiling"]
    raw["memcpy"] = {"gbps_1MiB": row["gbps_1MiB"], "gbps_16MiB": row["gbps_16MiB"]}
    rows["memcpy"] = row
    log(f"  memcpy         gbps               {row['gbps_1MiB']:.2f} / {row['gbps_16MiB']:.2f}")
    return rows, raw


def ratios(results):
    out = {"convention": ("for each copyless variant and peer: msgs_per_s*/gbps* = copyless/peer, "
                          "rtt_* = peer/copyless; >1 always means copyless is better")}
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
    ap.add_argument("--only", metavar="LIST",
                    help=f"comma list of backends from {','.join(BACKENDS)} ('copyless' "
                         "selects both copyless variants); eventfd/memcpy reference rows always run "
                         "unless --no-ref")
    ap.add_argument("--no-ref", action="store_true", help="skip the eventfd/memcpy reference rows")
    args = ap.parse_args(argv)
    install_signal_cleanup()

    names = list(BACKENDS)
    if args.only:
        want = {w.strip() for w in args.only.split(",") if w.strip()}
        unknown = want - set(BACKENDS) - {"eventfd", "memcpy", "ref"}
        if unknown:
            ap.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
        names = [n for n in BACKENDS if n in want or (n.startswith("copyless") and "copyless" in want)]
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]

    info = machine_info()
    try:
        info["versions"]["copyless"] = info["versions"]["copyless"] or import_copyless().__version__
    except Exception:
        pass
    print(f"machine: {info['cpu_model']}, nproc={info['nproc']}, kernel {info['kernel']}, "
          f"Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    print(f"mode: {mode_name} {mode}", flush=True)

    t_start = time.monotonic()
    results, raw = {}, {}
    try:
        for b in names:
            log(f"[{b}]")
            row, braw, notes = run_backend(b, mode)
            results[b], raw[b] = dict(row, notes=notes), braw
        if not args.no_ref:
            log("[references]")
            rrows, rraw = run_references(mode)
            results.update(rrows)
            raw.update(rraw)
    finally:
        if _TMP:
            shutil.rmtree(_TMP, ignore_errors=True)

    print()
    print(render_table(results, COLUMNS, HEADERS))
    print("\nnotes:")
    for b, row in results.items():
        for n in row.get("notes", []):
            print(f"  {b}: {n}")
    print("  busy-poll rows spin one core per process, i.e. both cores of this machine.")
    print(f"\ntotal wall time {time.monotonic() - t_start:.1f} s")

    doc = {
        "benchmark": "copyless benchmarks/bench_pubsub.py",
        "mode": mode_name, "settings": mode, "machine": info,
        "units": {"msgs_per_s_*": "messages/s (receiver count, end-to-end)",
                  "rtt_*_us": "microseconds round trip, 64 B each way",
                  "gbps_*": "1e9 bytes/s received, every 4 KiB page read by the receiver"},
        "method": {"tests": [dict(metric=m, test=t, size=s, busy_receiver=b, depth=queue_depth(s),
                                  warm=warm_count(s) if t == "stream" else mode["rtt_warm"])
                             for m, t, s, b in TESTS],
                   "busy": "both sides busy-poll; uses both cores",
                   "copyless_publisher_kwargs": COPYLESS_KW},
        "results": results, "raw": raw, "ratios": ratios(results),
    }
    text = json.dumps(doc, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
        print(f"JSON written to {args.json}")
    else:
        print(text)


if __name__ == "__main__":
    main()
