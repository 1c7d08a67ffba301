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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default="tcp,unix,ipc")
    ap.add_argument("--sizes", default="64,4096")
    ap.add_argument("-n", type=int, default=50_000, help="messages per stream")
    ap.add_argument("--calls", type=int, default=3000, help="calls per RTT cell (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
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
    for t in args.transports.split(","):
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
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        emit_json({"benchmark": "copyless benchmarks/bench_cpu.py", "machine": info, "results": results}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
