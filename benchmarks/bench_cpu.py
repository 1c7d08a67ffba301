#!/usr/bin/env python3
"""CPU time per message on each side of a Messenger stream (and of a call).

    python benchmarks/bench_cpu.py [--transports tcp,unix,ipc] [--sizes 64,4096] [-n 50000] [--repeats 3]

A message rate on a 2-core VM that other work shares says little about where
the time goes; CPU time per message does (it is what the rate is made of, and
other processes change it much less).  For each transport and size:

  sender    CPU seconds of the sending process (all its threads: the caller and
            its I/O loop) from the first send of the measured burst until the
            receiver reports it has everything, divided by the message count;
  receiver  CPU seconds of the receiving process (its I/O loop, fast dispatch that
            counts) over the same burst, per message;
  rate      messages per second of wall time (for orientation only).

and, for a 64 B call (`conn.call`), each side's CPU per call.  The receiver is a
Messenger in a child process (multiprocessing 'spawn') whose Dispatcher counts in
`fast_dispatch`; the sender is this process, `conn.send(Message(1, data=[payload]))`.
Prints a table and, with --json, the raw numbers.

--inproc adds per-message costs measured in this process, each the best of
three: `Message(1, data=[payload])`; `conn.send(msg)` of a prepared message
(thread CPU of the caller; the peer is a sink in a child process); and the
receive path without I/O: a server session fed a buffer of encoded messages
read by read, each message handed to a dispatcher that counts (the
Messenger's own path where this version has one, MessageReceived events
otherwise).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Child, emit_json, install_signal_cleanup, machine_info, median, watchdog  # noqa: E402
from bench_pubsub import import_copyless  # noqa: E402

WARM = 3000
BUDGET = 60.0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _serve(ctrl, address, marks, role):
    import_copyless()
    import copyless.messenger as cm

    state = {"count": 0, "cpu": 0.0}
    marks = list(marks)

    class Sink(cm.Dispatcher):
        def can_fast_dispatch(self, msg):
            return True

        def fast_dispatch(self, msg):
            state["count"] += 1
            if marks and state["count"] == marks[0]:
                marks.pop(0)
                now = cpu()
                ctrl.send(("count", now - state["cpu"]))
                state["cpu"] = now

    class Echo(cm.Dispatcher):
        def can_fast_dispatch(self, msg):
            return True

        def fast_dispatch(self, msg):
            msg.connection.send(msg.reply(2, data=[msg.data]))

    m = cm.Messenger("bench.server", policies={"client": cm.Policy.stateful_server()})
    m.add_dispatcher(Sink() if role == "sink" else Echo())
    address = m.bind(address)
    m.start()
    ctrl.send(("ready", address))
    while True:
        msg = ctrl.recv()
        if msg[0] == "cpu":
            ctrl.send(("cpu", cpu()))


def stream(address, size, n):
    import copyless.messenger as cm

    with Child(_serve, address, (WARM, WARM + n), "sink") as child:
        addr = child.expect("ready", BUDGET)
        with watchdog(BUDGET, child.kill):
            m = cm.Messenger("client.bench", io_loops=1)
            try:
                conn = m.connect(addr)
                conn.wait_ready(10)
                payload, Message, send = bytes(size), cm.Message, conn.send
                for _ in range(WARM):
                    send(Message(1, data=[payload]))
                child.expect("count", BUDGET)
                c0, t0 = cpu(), time.perf_counter()
                for _ in range(n):
                    send(Message(1, data=[payload]))
                rx = child.expect("count", BUDGET)
                t1, c1 = time.perf_counter(), cpu()
            finally:
                m.shutdown()
    return dict(tx_us=(c1 - c0) / n * 1e6, rx_us=rx / n * 1e6, rate=n / (t1 - t0))


def calls(address, n):
    import copyless.messenger as cm

    with Child(_serve, address, (), "echo") as child:
        addr = child.expect("ready", BUDGET)
        with watchdog(BUDGET, child.kill):
            m = cm.Messenger("client.bench", io_loops=1)
            try:
                conn = m.connect(addr)
                conn.wait_ready(10)
                req, buf = bytes(64), bytearray(64)
                for _ in range(300):
                    conn.call(cm.Message(2, data=[req]), into=buf, timeout=10)
                child.ctrl.send(("cpu",))
                s0 = child.expect("cpu", BUDGET)
                c0 = cpu()
                lat = []
                for _ in range(n):
                    a = time.perf_counter()
                    conn.call(cm.Message(2, data=[req]), into=buf, timeout=10)
                    lat.append(time.perf_counter() - a)
                c1 = cpu()
                child.ctrl.send(("cpu",))
                s1 = child.expect("cpu", BUDGET)
            finally:
                m.shutdown()
    lat.sort()
    return dict(tx_us=(c1 - c0) / n * 1e6, rx_us=(s1 - s0) / n * 1e6, p50_us=lat[len(lat) // 2] * 1e6)


def inproc(address, n=200_000):
    import copyless.messenger as cm
    from copyless.protocol import session as ps

    out = {}

    def best(fn, count):
        runs = []
        for _ in range(3):
            t0 = time.thread_time()
            fn(count)
            runs.append((time.thread_time() - t0) / count * 1e9)
        return min(runs)

    payload = bytes(64)

    def make(count):
        M = cm.Message
        for _ in range(count):
            M(1, data=[payload])

    out["Message() ns"] = best(make, n)
    with Child(_serve, address, (10**12,), "sink") as child:
        addr = child.expect("ready", BUDGET)
        m = cm.Messenger("client.bench", io_loops=1)
        try:
            conn = m.connect(addr)
            conn.wait_ready(10)
            msg = cm.Message(1, data=[payload])
            send = conn.send

            def sends(count):
                for _ in range(count):
                    send(msg)

            out["conn.send(msg) ns"] = best(sends, n)
        finally:
            m.shutdown()

    # receive, no I/O: a server session and the dispatch a Messenger does per message
    def drain(c):
        return b"".join(bytes(b) for b in c.data_to_send())

    fast = "messages" in ps.SessionConnection.__init__.__code__.co_varnames
    count = 20_000

    class Count:
        n = 0

        def can_fast_dispatch(self, msg):
            return True

        def fast_dispatch(self, msg):
            self.n += 1

    def receive(_):
        c = ps.SessionConnection(ps.Role.CLIENT, "client.1", session=ps.Session())
        kw = {"messages": True} if fast else {}
        s = ps.SessionConnection(ps.Role.SERVER, "store.1", registry=ps.SessionRegistry(), **kw)
        for _ in range(10):
            s.receive_data(drain(c))
            c.receive_data(drain(s))
        for _ in range(count):
            c.send_message(ps.OutMessage(1, [b""], [payload]))
        wire = memoryview(drain(c))
        d = Count()
        t0 = time.thread_time()
        pos = 0
        while pos < len(wire):
            buf = s.next_read()
            k = min(len(buf), len(wire) - pos)
            buf[:k] = wire[pos : pos + k]
            pos += k
            s.bytes_read(k)
            for ev in s.next_events():
                if fast:
                    msgs = ev.messages if isinstance(ev, ps.MessagesReceived) else ()
                elif isinstance(ev, ps.MessageReceived):
                    e = ev
                    msgs = [cm.Message._received(e.type, e.front, e.data, e.tid, e.priority, e.seq, e.is_reply, None)]
                else:
                    msgs = ()
                for mm in msgs:
                    if d.can_fast_dispatch(mm):
                        d.fast_dispatch(mm)
        receive.t = time.thread_time() - t0
        assert d.n == count

    runs = []
    for _ in range(3):
        receive(0)
        runs.append(receive.t / count * 1e9)
    out["receive, no I/O, ns"] = min(runs)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="tcp,unix,ipc")
    ap.add_argument("--sizes", default="64,4096")
    ap.add_argument("-n", type=int, default=50_000, help="messages per stream")
    ap.add_argument("--calls", type=int, default=3000, help="calls per RTT cell (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--inproc", action="store_true", help="also the per-message costs in this process")
    args = ap.parse_args(argv)
    install_signal_cleanup()
    import_copyless()
    info = machine_info()
    print(f"machine: {info['cpu_model']}, nproc={info['nproc']}; load average {os.getloadavg()[0]:.2f}")
    addresses = {
        "tcp": lambda i: "tcp://127.0.0.1:0",
        "unix": lambda i: f"unix://@clcpu_{os.getpid()}_{i}",
        "ipc": lambda i: f"ipc://clcpu_{os.getpid()}_{i}",
    }
    cell = iter(range(1 << 30))
    results: dict = {}
    print(f"{'cell':18s} {'sender us/msg':>14s} {'receiver us/msg':>16s} {'msg/s (or p50 us)':>18s}")
    for t in [t for t in args.transports.split(",") if t.strip()]:  # (--transports "" --inproc: only that)
        for size in [int(s) for s in args.sizes.split(",")]:
            runs = [stream(addresses[t](next(cell)), size, args.n) for _ in range(args.repeats)]
            r = {k: median([x[k] for x in runs]) for k in runs[0]}
            results[f"{t}/stream_{size}"] = dict(r, runs=runs)
            print(f"{t + ' stream ' + str(size):18s} {r['tx_us']:14.2f} {r['rx_us']:16.2f} {r['rate']:18,.0f}")
        if args.calls:
            runs = [calls(addresses[t](next(cell)), args.calls) for _ in range(args.repeats)]
            r = {k: median([x[k] for x in runs]) for k in runs[0]}
            results[f"{t}/call_64"] = dict(r, runs=runs)
            print(f"{t + ' call 64':18s} {r['tx_us']:14.2f} {r['rx_us']:16.2f} {r['p50_us']:18.1f}")
    if args.inproc:
        r = inproc(addresses["unix"](next(cell)))
        results["inproc"] = r
        for k, v in r.items():
            print(f"{k:28s} {v:8.0f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        emit_json({"benchmark": "copyless benchmarks/bench_cpu.py", "machine": info, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
