#!/usr/bin/env python3
"""Messenger vs raw sockets and pyzmq, two processes, same run.

    python benchmarks/bench_messenger.py [--quick] [--json PATH]

Rows: request/response round trip (64 B request, 64 B reply) p50/p99, and
1 MiB replies in GB/s (the client posts its buffer; copyless reads the reply's
data straight into it, raw sockets recv_into it, zmq copies out of its frame).
Each server runs in a child process; the client loop is here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

SERVER = {
    "copyless": """
import sys, copyless.messenger as cm
class Echo(cm.Dispatcher):
    def can_fast_dispatch(self, msg): return True
    def fast_dispatch(self, msg):
        n = int.from_bytes(msg.front, "little")
        msg.connection.send(msg.reply(2, front=b"r", data=[BIG[:n]]))
BIG = memoryview(bytes(1 << 20))
m = cm.Messenger("bench.server", policies={"client": cm.Policy.stateful_server()})
m.add_dispatcher(Echo())
print(m.bind(sys.argv[1]), flush=True)
m.start()
sys.stdin.read()
m.shutdown()
""",
    "raw": """
import socket, struct, sys, os
addr = sys.argv[1]
if addr.startswith("tcp://"):
    host, port = addr[6:].rsplit(":", 1); s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(1); print(f"tcp://{host}:{s.getsockname()[1]}", flush=True)
else:
    path = addr[7:]; s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1); print(addr, flush=True)
c, _ = s.accept()
if c.family != socket.AF_UNIX: c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
BIG = bytes(1 << 20); hdr = bytearray(8)
while True:
    v = memoryview(hdr); got = 0
    while got < 8:
        k = c.recv_into(v[got:])
        if not k: sys.exit(0)
        got += k
    n = int.from_bytes(hdr, "little")
    if n < 4096:
        c.sendall(n.to_bytes(8, "little") + BIG[:n])
    else:
        c.sendall(n.to_bytes(8, "little"))
        c.sendall(BIG[:n])
""",
    "zmq": """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.REP)
addr = sys.argv[1]
if addr.startswith("tcp://"):
    port = s.bind_to_random_port(addr.rsplit(":", 1)[0]); print(f"{addr.rsplit(':', 1)[0]}:{port}", flush=True)
else:
    s.bind("ipc://" + addr[7:]); print("ipc://" + addr[7:], flush=True)
BIG = bytes(1 << 20)
while True:
    n = int.from_bytes(s.recv(), "little")
    s.send(BIG[:n], copy=n < 65536)
""",
}


class Client:
    def __init__(self, kind: str, address: str) -> None:
        self.kind = kind
        if kind == "copyless":
            import copyless.messenger as cm

            self.cm = cm
            self.m = cm.Messenger("client.bench", default_policy=cm.Policy.lossless_client(), io_loops=1)
            self.conn = self.m.connect(address)
            self.conn.wait_ready(10)
        elif kind == "raw":
            import socket

            if address.startswith("tcp://"):
                host, port = address[6:].rsplit(":", 1)
                self.s = socket.create_connection((host, int(port)))
                self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(address[7:])
            self.hdr = bytearray(8)
        else:
            import zmq

            self.ctx = zmq.Context()
            self.s = self.ctx.socket(zmq.REQ)
            self.s.connect(address)

    def call(self, n: int, into: bytearray) -> int:
        if self.kind == "copyless":
            r = self.conn.call(self.cm.Message(1, front=n.to_bytes(8, "little")), into=into, timeout=10)
            return len(r.data)
        if self.kind == "raw":
            self.s.sendall(n.to_bytes(8, "little"))
            v = memoryview(self.hdr)
            got = 0
            while got < 8:
                got += self.s.recv_into(v[got:])
            size = int.from_bytes(self.hdr, "little")
            v, got = memoryview(into), 0
            while got < size:
                got += self.s.recv_into(v[got:size])
            return size
        self.s.send(n.to_bytes(8, "little"))
        f = self.s.recv(copy=n < 65536)
        data = f if isinstance(f, bytes) else f.buffer
        into[: len(data)] = data  # the caller wants it in its buffer: one copy
        return len(data)

    def close(self) -> None:
        if self.kind == "copyless":
            self.m.shutdown()
        elif self.kind == "raw":
            self.s.close()
        else:
            self.s.close(linger=0)
            self.ctx.term()


def measure(kind: str, transport: str, iters: int, big_iters: int) -> dict[str, float | None]:
    tmp = tempfile.mkdtemp()
    address = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix://{tmp}/b.sock"
    if kind == "zmq" and transport == "tcp":
        address = "tcp://127.0.0.1:0"
    srv = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SERVER[kind]), address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None
        bound = srv.stdout.readline().strip()
        cl = Client(kind, bound)
        buf = bytearray(1 << 20)
        for _ in range(200):
            cl.call(64, buf)
        lat = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            cl.call(64, buf)
            lat.append(time.perf_counter_ns() - t0)
        lat.sort()
        t0 = time.perf_counter()
        for _ in range(big_iters):
            assert cl.call(1 << 20, buf) == 1 << 20
        gbps = big_iters * (1 << 20) / (time.perf_counter() - t0) / 1e9
        cl.close()
        return {
            "rtt_p50_us": lat[len(lat) // 2] / 1e3,
            "rtt_p99_us": lat[int(len(lat) * 0.99)] / 1e3,
            "gbps_1MiB_reply": gbps,
        }
    finally:
        if srv.stdin:
            srv.stdin.close()
        try:
            srv.wait(5)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    iters, big = (2000, 200) if args.quick else (20000, 2000)
    results: dict[str, dict[str, float | None]] = {}
    for transport in ("tcp", "unix"):
        for kind in ("copyless", "raw", "zmq"):
            try:
                results[f"{kind}/{transport}"] = measure(kind, transport, iters, big)
            except Exception as e:  # a missing peer library costs its row only
                results[f"{kind}/{transport}"] = {"error": str(e)}  # type: ignore[dict-item]
    print(f"{'row':<16} {'RTT p50 us':>11} {'RTT p99 us':>11} {'1 MiB reply GB/s':>17}")
    for k, v in results.items():
        if "error" in v:
            print(f"{k:<16} {v['error']}")
            continue
        print(f"{k:<16} {v['rtt_p50_us']:>11.1f} {v['rtt_p99_us']:>11.1f} {v['gbps_1MiB_reply']:>17.2f}")
    text = json.dumps({"benchmark": "bench_messenger", "iterations": iters, "results": results}, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
