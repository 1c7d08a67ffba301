#!/usr/bin/env python3
"""Where a Messenger call's round trip goes: a diagnostic, not a comparison.

    python benchmarks/bench_call.py [--transports ipc,unix,tcp] [-n 5000] [--repeats 3] [--json PATH]

A 64 B `conn.call(msg, into=buf)` against an echo server that replies in
`fast_dispatch`, in a child process (multiprocessing 'spawn').  The request
carries the client's perf_counter_ns() at the start of the call; the server
writes its own at the entry of fast_dispatch into the reply (both processes
read the same CLOCK_MONOTONIC).  Per transport, p50 over n calls (after 500
of warm-up), median of the repeats:

  to_server    call() entered -> the server's fast_dispatch runs (the client's
               send, the transport, the server's loop and read round)
  to_client    fast_dispatch entered -> call() returns (the reply built and sent,
               the transport, the caller's read round and hand-back)
  rtt          the whole call

The two halves add up to the round trip, so a change shows on the side it
belongs to.  The ipc:// target of issue 3 is rtt p50 < 5 us (busy).
Caveat: this VM has 2 vCPUs that other work shares, and a spinning peer slows
Python on the other vCPU: compare numbers taken in one run.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Child, emit_json, install_signal_cleanup, machine_info, median, render_table  # noqa: E402

STAMP = struct.Struct("<q")


def serve(ctrl, address):
    """The child: an echo server that stamps its fast_dispatch entry into the reply."""
    import copyless.messenger as cm

    pc = time.perf_counter_ns

    class Echo(cm.Dispatcher):
        def can_fast_dispatch(self, msg):
            return True

        def fast_dispatch(self, msg):
            t = pc()
            msg.connection.send(msg.reply(2, data=[STAMP.pack(t) + bytes(56)]))

    m = cm.Messenger("bench.server", policies={"client": cm.Policy.stateful_server()})
    m.add_dispatcher(Echo())
    ctrl.send(("ready", m.bind(address)))
    m.start()
    ctrl.recv()  # until the orchestrator is done
    m.shutdown()


def measure(address: str, n: int) -> dict:
    import copyless.messenger as cm

    halves: tuple[list[int], list[int], list[int]] = ([], [], [])
    with Child(serve, address) as child:
        bound = child.expect("ready", 20)
        m = cm.Messenger("client.bench", default_policy=cm.Policy.lossless_client(), io_loops=1)
        try:
            conn = m.connect(bound)
            conn.wait_ready(10)
            pc, buf = time.perf_counter_ns, bytearray(64)
            for i in range(n + 500):
                t0 = pc()
                conn.call(cm.Message(2, data=[STAMP.pack(t0) + bytes(56)]), into=buf, timeout=10)
                t2 = pc()
                (t1,) = STAMP.unpack_from(buf)
                if i >= 500:
                    for lst, v in zip(halves, (t1 - t0, t2 - t1, t2 - t0), strict=True):
                        lst.append(v)
        finally:
            m.shutdown()
    out = {}
    for name, lst in zip(("to_server_us", "to_client_us", "rtt_us"), halves, strict=True):
        lst.sort()
        out[name] = lst[len(lst) // 2] / 1000
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="ipc,unix,tcp")
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    install_signal_cleanup()
    tmp = tempfile.mkdtemp(prefix="copyless-bench-call-")
    addresses = {
        "ipc": f"ipc://bench-call-{os.getpid()}",
        "unix": f"unix://{tmp}/call.sock",
        "tcp": "tcp://127.0.0.1:0",
    }
    rows = {}
    for t in args.transports.split(","):
        runs = [measure(addresses[t], args.n) for _ in range(args.repeats)]
        rows[t] = {k: median([r[k] for r in runs]) for k in runs[0]}
        print(f"  {t:5s} " + "  ".join(f"{k} {v:.1f}" for k, v in rows[t].items()), file=sys.stderr, flush=True)
    cols = ["to_server_us", "to_client_us", "rtt_us"]
    heads = {
        "to_server_us": "call -> fast_dispatch us",
        "to_client_us": "fast_dispatch -> return us",
        "rtt_us": "RTT p50 us",
    }
    print(render_table(rows, cols, heads, cell=lambda v, _m: "-" if v is None else f"{v:.1f}"))
    emit_json({"machine": machine_info(), "n": args.n, "repeats": args.repeats, "results": rows}, args.json)


if __name__ == "__main__":
    main()
