#!/usr/bin/env python3
"""Per-message API rate with bare loops: how many 64-byte messages per second each
library moves between two processes when the loops do nothing else.

    python benchmarks/bench_rate.py [--quick] [--json PATH]

bench_pubsub.py wraps every library in the same harness, whose own receive loop
costs ~250 ns per message (so it caps any library near 4 M msgs/s); this script
shows what the libraries themselves can do.  Each loop is the tightest idiomatic
one: receive a message, look at one byte, let it go; each runs in a function (at
module level every assignment is a store into the globals dict).  The receiver counts; the
rate is messages / (time from first to last message at the receiver).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time

N_FULL, N_QUICK = 3_000_000, 600_000

COPYLESS_TX = """
import copyless, sys
pub = copyless.Publisher(NAME)
pub.wait_for_subscribers(1, timeout=20)
send, p = pub.send, b"x" * 64
for _ in range(N):
    send(p)
pub.close()
"""
COPYLESS_RX = """
import copyless, time
sub = copyless.Subscriber(NAME, timeout=20)
recv = sub.recv
recv(timeout=20).release()
t0 = time.perf_counter()
for _ in range(N - 1):
    m = recv()
    m.data[0]
    m.release()
print(time.perf_counter() - t0)
"""
ZMQ_TX = """
import zmq
s = zmq.Context().socket(zmq.PUSH)
s.connect("ipc:///tmp/" + NAME)
send, p = s.send, b"x" * 64
for _ in range(N):
    send(p)
s.close(linger=-1)
"""
ZMQ_RX = """
import zmq, time
s = zmq.Context().socket(zmq.PULL)
s.bind("ipc:///tmp/" + NAME)
print("ready", flush=True)
recv = s.recv
recv()
t0 = time.perf_counter()
for _ in range(N - 1):
    m = recv()
    m[0]
print(time.perf_counter() - t0)
s.close(linger=0)  # (a socket left open makes the context's teardown wait forever)
"""
ICEORYX2_TX = """
import ctypes, time, iceoryx2 as iox2
iox2.set_log_level(iox2.LogLevel.Error)
node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
svc = (node.service_builder(iox2.ServiceName.new(NAME)).publish_subscribe(iox2.Slice[ctypes.c_uint8])
       .enable_safe_overflow(False).subscriber_max_buffer_size(1024).history_size(0).open_or_create())
pub = (svc.publisher_builder().initial_max_slice_len(64)
       .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered).create())
while svc.dynamic_config.number_of_subscribers < 1:
    time.sleep(0.001)
p = b"x" * 64
for _ in range(N):
    s = pub.loan_slice_uninit(64)
    ctypes.memmove(s.payload_ptr, p, 64)
    s.assume_init().send()
"""
ICEORYX2_RX = """
import ctypes, time, iceoryx2 as iox2
iox2.set_log_level(iox2.LogLevel.Error)
node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
svc = (node.service_builder(iox2.ServiceName.new(NAME)).publish_subscribe(iox2.Slice[ctypes.c_uint8])
       .enable_safe_overflow(False).subscriber_max_buffer_size(1024).history_size(0).open_or_create())
sub = svc.subscriber_builder().buffer_size(1024).create()
print("ready", flush=True)
receive = sub.receive
n = 0
t0 = None
while n < N:
    s = receive()
    if s is None:
        continue
    if t0 is None:
        t0 = time.perf_counter()
    s.payload().as_memory_view().cast("B")[0]
    s.delete()
    n += 1
print(time.perf_counter() - t0)
"""

BACKENDS = {
    "copyless": (COPYLESS_TX, COPYLESS_RX, False),
    "zmq": (ZMQ_TX, ZMQ_RX, True),
    "iceoryx2": (ICEORYX2_TX, ICEORYX2_RX, True),
}
# iceoryx2's sender can spin forever inside send() (RetryUntilDelivered holds the GIL and
# never notices trouble); its rate is ~0.5 M/s, so fewer messages keep a hang short
MAX_MESSAGES = {"iceoryx2": N_QUICK}


def run(backend: str, n: int) -> tuple[float | None, str]:
    tx, rx, rx_first = BACKENDS[backend]
    name = f"rate-{backend}-{os.getpid()}"
    prelude = f"NAME = {name!r}\nN = {n}\n"

    def start(code: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            # in a function, as real code runs (at module level, every assignment in the
            # loop is a store into the globals dict: a quarter of copyless's receive loop)
            [
                sys.executable,
                "-c",
                prelude + "def main():\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\nmain()\n",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    procs = []
    try:
        if rx_first:  # binds/creates first
            r = start(rx)
            procs.append(r)
            assert r.stdout is not None
            if r.stdout.readline().strip() != "ready":
                return None, r.stderr.read() if r.stderr else "receiver failed"
            procs.append(start(tx))
        else:
            procs.append(start(tx))
            time.sleep(0.2)
            r = start(rx)
            procs.append(r)
        out, err = r.communicate(timeout=60)
        for p in procs:
            p.wait(timeout=30)
        if r.returncode != 0:
            return None, err.strip().splitlines()[-1] if err.strip() else f"exit {r.returncode}"
        seconds = float(out.strip().splitlines()[-1])
        return (n - 1) / seconds, ""
    except ImportError as e:
        return None, str(e)
    except subprocess.TimeoutExpired:
        return None, "timed out (hung)"
    except ValueError as e:
        return None, f"failed: {e}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            os.unlink(f"/tmp/{name}")
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    n = N_QUICK if args.quick else N_FULL
    repeats = 1 if args.quick else 3
    results: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for backend in BACKENDS:
        rates = []
        for _ in range(repeats):
            rate, note = run(backend, min(n, MAX_MESSAGES.get(backend, n)))
            if rate is None:
                notes[backend] = note
                break
            rates.append(rate)
        results[backend] = sorted(rates)[len(rates) // 2] if rates else None
    base = results.get("copyless")
    ratios = {k: (base / v if base and v else None) for k, v in results.items() if k != "copyless"}
    print(f"{'backend':<10} {'msgs/s (64 B, bare loop)':>26}  copyless / this")
    for k, v in results.items():
        ratio = "" if k == "copyless" or ratios.get(k) is None else f"{ratios[k]:.2f}x"
        print(f"{k:<10} {'-' if v is None else f'{v / 1e6:.2f} M':>26}  {ratio}")
    for k, v in notes.items():
        print(f"  {k}: {v}")
    doc = {
        "benchmark": "bench_rate",
        "messages": n,
        "repeats": repeats,
        "msgs_per_s_64_bare": results,
        "ratios_copyless_over_peer": ratios,
        "notes": notes,
    }
    text = json.dumps(doc, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
