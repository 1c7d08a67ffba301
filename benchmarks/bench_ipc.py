#!/usr/bin/env python3
"""The ipc:// transport by itself (no Messenger, no session, no frames): the floor
under the messenger's ipc:// numbers, against a raw unix stream socket.

    python benchmarks/bench_ipc.py [--quick] [--json PATH]

Two processes (the peer in a child), one IpcStream (or socket) between them.
  pingpong  64 B there, 64 B back; per round trip, p50/p99.  "busy": both sides
            spin for the next message (before_wait with a long spin: no wake-up
            ever); "blocking": spin=0, every wait arms the doorbell and sleeps in
            poll (a wake-up per message each way); "default": the default spin.
  stream    one-way, messages of 1 MiB / 16 MiB read into one reused buffer of the
            message size (what direct receive does); GB/s = bytes / time until the
            peer has read them all.  Run for several ring sizes: how the default
            ring size was chosen.
Caveat: this VM has 2 cores, and other work on it shows as outliers (p99).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid

PEER = r"""
import os, select, socket, sys
mode, addr, size, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if addr.startswith("ipc://"):
    from copyless.transports import listen
    lst = listen(addr)
    print("ready", flush=True)
    select.select([lst], [], [], 20)
    s = lst.accept()
    while not s.handshake():
        select.select([s], [], [], 5)
    def wait():
        if not s.before_wait():
            select.select([s], [], [], 5)
    recv_into, send = s.recv_into, s.send_buffers
else:
    path = addr[len("unix://"):]
    lst = socket.socket(socket.AF_UNIX); lst.bind(path); lst.listen(1)
    print("ready", flush=True)
    s, _ = lst.accept()
    def wait():
        pass
    recv_into, send = s.recv_into, (lambda bufs: s.sendmsg(bufs))
buf = memoryview(bytearray(size))
def read_exactly(n):
    got = 0
    while got < n:
        try:
            k = recv_into(buf[got:n])
        except BlockingIOError:
            wait()
            continue
        if not k:
            raise SystemExit("EOF")
        got += k
def write_all(v):
    while v:
        k = send([v])
        v = v[k:]
        if v:
            wait()
if mode == "pingpong":
    for _ in range(count):
        read_exactly(size)
        write_all(buf[:size])
else:
    for _ in range(count):
        read_exactly(size)
    write_all(memoryview(b"k"))
select.select([s], [], [], 10)
"""


def start_peer(mode: str, addr: str, size: int, count: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", PEER, mode, addr, str(size), str(count)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


class Side:
    """The client's end, with the same read/write loops as the peer."""

    def __init__(self, addr: str, spin: float | None) -> None:
        if addr.startswith("ipc://"):
            from copyless.transports import connect

            self.s = connect(addr)
            while not self.s.handshake():
                select.select([self.s], [], [], 5)
            if spin is not None:
                self.s.channel.spin = spin
            self.recv_into, self.send = self.s.recv_into, self.s.send_buffers
            self.ipc = True
        else:
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(addr[len("unix://") :])
            self.recv_into, self.send = self.s.recv_into, self.s.sendmsg
            self.ipc = False

    def wait(self) -> None:
        if self.ipc and not self.s.before_wait():
            select.select([self.s], [], [], 5)

    def read_exactly(self, buf: memoryview, n: int) -> None:
        got = 0
        while got < n:
            try:
                k = self.recv_into(buf[got:n])
            except BlockingIOError:
                self.wait()
                continue
            if not k:
                raise EOFError
            got += k

    def write_all(self, v: memoryview) -> None:
        while v:
            k = self.send([v])
            v = v[k:]
            if v:
                self.wait()

    def close(self) -> None:
        self.s.close()


def pingpong(addr: str, n: int, spin: float | None) -> dict[str, float]:
    peer_addr = addr if spin is None or not addr.startswith("ipc://") else f"{addr}?spin={spin * 1e6:.0f}us"
    p = start_peer("pingpong", peer_addr, 64, n)
    side = Side(addr, spin)
    buf, msg = memoryview(bytearray(64)), memoryview(bytes(64))
    lat = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            side.write_all(msg)
            side.read_exactly(buf, 64)
            lat.append(time.perf_counter_ns() - t0)
    finally:
        side.close()
        p.wait(10)
    lat = sorted(lat[n // 10 :])
    return {"p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3}


def stream(addr: str, size: int, n: int) -> float:
    p = start_peer("stream", addr, size, n)
    side = Side(addr, None)
    src = memoryview(bytes(range(256)) * (size // 256))
    ack = memoryview(bytearray(1))
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            side.write_all(src)
        side.read_exactly(ack, 1)
        seconds = time.perf_counter() - t0
    finally:
        side.close()
        p.wait(10)
    return n * size / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    n_pp = 5000 if args.quick else 20000
    counts = {1 << 20: 300 if args.quick else 1000, 16 << 20: 20 if args.quick else 60}
    results: dict[str, object] = {"load_average_at_start": os.getloadavg()}
    tmp = f"/tmp/bench-ipc-{uuid.uuid4().hex[:8]}.sock"

    def name() -> str:
        return f"ipc://bench-{uuid.uuid4().hex[:8]}"

    rows = []
    for label, addr_fn, spin in [
        ("ipc busy", name, 0.1),
        ("ipc default spin", name, None),
        ("ipc blocking", name, 0.0),
        ("raw unix", lambda: tmp, None),
    ]:
        if os.path.exists(tmp):
            os.unlink(tmp)
        addr = addr_fn() if label != "raw unix" else f"unix://{tmp}"
        r = pingpong(addr, n_pp, spin)
        rows.append((label, r["p50_us"], r["p99_us"]))
    if os.path.exists(tmp):
        os.unlink(tmp)
    results["pingpong_64B"] = [{"transport": a, "p50_us": b, "p99_us": c} for a, b, c in rows]
    print("64 B ping-pong (round trip)")
    print(f"  {'':18} {'p50 us':>8} {'p99 us':>8}")
    for a, b, c in rows:
        print(f"  {a:18} {b:8.2f} {c:8.2f}")

    bw: dict[str, dict[str, float]] = {}
    rings = ["256KiB", "512KiB", "1MiB", "2MiB", "4MiB", "16MiB"]
    for ring in rings:
        bw[f"ipc ring={ring}"] = {
            f"{size >> 20}MiB": stream(f"{name()}?ring={ring}", size, cnt) for size, cnt in counts.items()
        }
    bw["raw unix"] = {}
    for size, cnt in counts.items():
        if os.path.exists(tmp):
            os.unlink(tmp)
        bw["raw unix"][f"{size >> 20}MiB"] = stream(f"unix://{tmp}", size, cnt)
    if os.path.exists(tmp):
        os.unlink(tmp)
    results["stream_gbps"] = bw
    print("one-way stream, GB/s (messages read into a reused buffer of their size)")
    print(f"  {'':18} {'1 MiB':>8} {'16 MiB':>8}")
    for k, v in bw.items():
        print(f"  {k:18} {v['1MiB']:8.2f} {v['16MiB']:8.2f}")
    results["load_average_at_end"] = os.getloadavg()
    print(f"load average: {results['load_average_at_start']} -> {results['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
