#!/usr/bin/env python3
"""Messenger vs raw sockets, pyzmq and the shared-memory Publisher, in one run.

    python benchmarks/bench_messenger.py [--quick] [--json PATH] [--transports tcp,unix,ipc]

Every cell starts a fresh peer in a child process (multiprocessing 'spawn');
the client runs in this process, and a watchdog bounds each cell (SIGALRM in
this process, then the peer is killed), so a hang costs one cell.

Columns (issue 3's benchmark section):
  msgs_per_s_64/_4KiB  one-way stream of N messages of 64 B / 4 KiB, after a
                       warm-up the receiver acknowledged; the clock stops when
                       the receiver reports it has all N (over the control pipe)
  rtt_p50/p99_us       64 B request, 64 B reply
  gbps_1MiB/_16MiB     replies of that size into a buffer the client posted
                       (1e9 bytes/s); nobody reads the bytes inside the clock;
                       after it, one more call into a cleared buffer is checked

Rows, by transport (copyless messenger rows first):
  copyless   Messenger: conn.send(Message(1, data=[payload])) into a Dispatcher
             that counts in fast_dispatch; conn.call(msg, into=buf)
             with its defaults: no data crc on unix, ipc and TCP over loopback (only
             this host's kernel copies the bytes there; TCP to another address gets
             one: transports.on_this_host, docs/design.md)
  copyless-crc  tcp and unix with Messenger(data_crc=True), large messages only:
             what the checksum costs (the default of TCP to another host)
  raw        sockets: 4-byte length prefix, sendall; the receiver parses its
             stream from greedy recv_into calls; replies recv_into the buffer
  zmq        pyzmq PUSH/PULL and REQ/REP (large replies copy=False, then one
             copy into the caller's buffer); zmq's ipc:// is an AF_UNIX socket,
             so its row stands in for both the unix and the ipc transports
  pubsub     copyless.Publisher(name).send(buf) / Subscriber(name).recv(), one
             way only: rate, and GB/s as a stream of large messages whose
             every 4 KiB page the receiver reads
ipc:// rows of the messenger use the defaults of ipc:// (a 256 KiB ring per
direction, 100 us of spin); benchmarks/bench_ipc.py measures the transport
without the Messenger.
"""

from __future__ import annotations

import argparse
import itertools
import operator
import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Child,
    emit_json,
    fmt,
    install_signal_cleanup,
    machine_info,
    median,
    percentile,
    render_table,
    watchdog,
)
from bench_pubsub import BIG, UnixStream, import_copyless, touch  # noqa: E402

pc = time.perf_counter_ns
RECV_TIMEOUT = 10.0  # s, any single call / receive inside a library
REQ = 64  # bytes of every request; its first 8 say how many bytes to reply with
MAX_REPLY = 16 << 20
SOURCE = memoryview(bytes(range(1, 256)) * (MAX_REPLY // 255 + 1))[:MAX_REPLY]  # replies are slices of it

# (count, warm-up) of small messages per stream / calls per RTT cell; large: count by size.
# Each cell is the median of its repeats; the large ones get more: one repeat of a 16 MiB
# cell (half a second) varies by +-20 % on this VM, copyless's and raw's alike, and a
# median of three still moved their ratio between 0.85 and 1.12 from run to run.
MODES = {
    "quick": dict(stream=(30_000, 2_000), call=(3_000, 300), bw={1 << 20: 1000, 16 << 20: 60}, repeats=1, bw_repeats=1),
    "full": dict(
        stream=(100_000, 5_000), call=(10_000, 1_000), bw={1 << 20: 2000, 16 << 20: 120}, repeats=3, bw_repeats=5
    ),
}
BUDGET = {"quick": 20, "full": 90}  # s, the watchdog of one cell
BW_WARM = {1 << 20: 10, 16 << 20: 3}  # large messages / calls before the clock starts
TESTS = [  # metric, message size, test: 'stream' one way, 'call' request/reply
    ("msgs_per_s_64", 64, "stream"),
    ("msgs_per_s_4KiB", 4096, "stream"),
    ("rtt", 64, "call"),
    ("gbps_1MiB", 1 << 20, "call"),
    ("gbps_16MiB", 16 << 20, "call"),
]
COLUMNS = ["msgs_per_s_64", "msgs_per_s_4KiB", "rtt_p50_us", "rtt_p99_us", "gbps_1MiB", "gbps_16MiB"]
HEADERS = {
    "msgs_per_s_64": "msg/s 64B",
    "msgs_per_s_4KiB": "msg/s 4KiB",
    "rtt_p50_us": "RTT p50 us",
    "rtt_p99_us": "RTT p99 us",
    "gbps_1MiB": "GB/s 1MiB",
    "gbps_16MiB": "GB/s 16MiB",
}
HIGHER_IS_BETTER = {"msgs_per_s_64", "msgs_per_s_4KiB", "gbps_1MiB", "gbps_16MiB"}


def request(size: int) -> bytes:
    return size.to_bytes(8, "little") + bytes(REQ - 8)


def requested(data) -> int:
    return int.from_bytes(data[:8], "little")


# ================================================================ libraries
# A library is a Peer (in the child: binds, then counts a stream or answers
# requests) and a Client (here: sends, calls).  A peer's role is 'sink' (count
# messages, report each of `marks` over the control pipe) or 'echo'.


class Peer:
    address = ""

    def __init__(self, address, role, marks, report):
        self.role, self.marks, self.report = role, marks, report

    def accept(self):
        """Wait for the client (after the orchestrator has been told the address)."""

    def recv(self):
        raise NotImplementedError

    def reply(self, n):
        raise NotImplementedError

    def serve(self):
        if self.role == "echo":
            while True:
                self.reply(requested(self.recv()))
        recv, count = self.recv, 0
        for mark in self.marks:
            while count < mark:
                recv()
                count += 1
            self.report(mark)


class Client:
    one_way = False  # True: no request/reply; large sizes run as a stream
    metrics: tuple[str, ...] | None = None  # only these (None: all)

    def send(self, payload):
        raise NotImplementedError

    def call(self, req, into) -> int:
        raise NotImplementedError

    def close(self):
        pass


# ---------------------------------------------------------------- messenger
class CopylessPeer(Peer):
    """The Dispatcher counts or replies on the I/O loop (fast dispatch)."""

    data_crc = None  # the default: the data crc on plain TCP only

    def __init__(self, address, role, marks, report):
        super().__init__(address, role, marks, report)
        import_copyless()
        import copyless.messenger as cm
        from copyless.errors import ConfigurationError

        peer = self

        class Sink(cm.Dispatcher):
            count = 0

            def can_fast_dispatch(self, msg):
                return True

            def fast_dispatch(self, msg):
                self.count += 1
                if self.count in peer.marks:
                    peer.report(self.count)

        class Echo(cm.Dispatcher):
            def can_fast_dispatch(self, msg):
                return True

            def fast_dispatch(self, msg):
                msg.connection.send(msg.reply(2, data=[SOURCE[: requested(msg.data)]]))

        self.marks = set(marks)
        self.m = cm.Messenger("bench.server", policies={"client": cm.Policy.stateful_server()}, data_crc=self.data_crc)
        self.m.add_dispatcher(Sink() if role == "sink" else Echo())
        try:
            self.address = self.m.bind(address)
        except ConfigurationError as e:
            if address.startswith("ipc://"):
                raise NotImplementedError(f"Messenger.bind: {e}") from e
            raise
        self.m.start()

    def serve(self):
        pass  # the dispatcher does it all on the I/O loop


class CopylessClient(Client):
    data_crc = None

    def __init__(self, address, role):
        import copyless.messenger as cm

        self.Message = cm.Message
        self.m = cm.Messenger(
            "client.bench", default_policy=cm.Policy.lossless_client(), io_loops=1, data_crc=self.data_crc
        )
        self.conn = self.m.connect(address)
        self.conn.wait_ready(RECV_TIMEOUT)

    def send(self, payload):
        self.conn.send(self.Message(1, data=[payload]))

    def call(self, req, into):
        return len(self.conn.call(self.Message(2, data=[req]), into=into, timeout=RECV_TIMEOUT).data)

    def close(self):
        self.m.shutdown()


# -------------------------------------------------------------- raw sockets
HDR = struct.Struct("<I")


def _sockaddr(address):
    import_copyless()
    from copyless.transports import parse_address

    return parse_address(address)


class RawPeer(Peer):
    """One accepted connection; bench_pubsub's UnixStream parses the stream."""

    def __init__(self, address, role, marks, report):
        super().__init__(address, role, marks, report)
        family, sockaddr = _sockaddr(address)
        self.lst = socket.socket(family)
        if family != socket.AF_UNIX:
            self.lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lst.bind(sockaddr)
        self.lst.listen(1)
        name = self.lst.getsockname()
        self.address = f"tcp://{name[0]}:{name[1]}" if family != socket.AF_UNIX else address

    def accept(self):
        s, _ = self.lst.accept()
        if s.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ep = UnixStream(s, "B", {"max_msg": 4096})
        self.recv = self.ep.recv

    def reply(self, n):
        self.ep.send(SOURCE[:n])


class RawClient(Client):
    def __init__(self, address, role):
        family, sockaddr = _sockaddr(address)
        self.s = socket.socket(family)
        self.s.connect(sockaddr)
        if family != socket.AF_UNIX:
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hdr = memoryview(bytearray(HDR.size))

    def send(self, payload):
        self.s.sendall(HDR.pack(len(payload)) + payload)

    def _recv_exact(self, view):
        got, n = 0, len(view)
        while got < n:
            k = self.s.recv_into(view[got:])
            if not k:
                raise EOFError("peer closed the socket")
            got += k

    def call(self, req, into):
        self.s.sendall(HDR.pack(len(req)) + req)
        self._recv_exact(self.hdr)
        n = HDR.unpack(self.hdr)[0]
        self._recv_exact(memoryview(into)[:n])
        return n

    def close(self):
        self.s.close()


# -------------------------------------------------------------------- pyzmq
def _zmq_socket(role, peer):
    import zmq

    ctx = zmq.Context()
    kind = {("sink", True): zmq.PULL, ("sink", False): zmq.PUSH, ("echo", True): zmq.REP, ("echo", False): zmq.REQ}
    s = ctx.socket(kind[role, peer])
    s.linger = 0
    s.sndtimeo = s.rcvtimeo = int(RECV_TIMEOUT * 1000)
    return ctx, s


class ZmqPeer(Peer):
    def __init__(self, address, role, marks, report):
        super().__init__(address, role, marks, report)
        self.ctx, self.s = _zmq_socket(role, True)
        self.s.bind(address[: -len(":0")] + ":*" if address.endswith(":0") else address)
        self.address = self.s.last_endpoint.decode()

    def recv(self):
        return self.s.recv()

    def reply(self, n):
        self.s.send(SOURCE[:n], copy=n < BIG)


class ZmqClient(Client):
    def __init__(self, address, role):
        self.ctx, self.s = _zmq_socket(role, False)
        self.s.connect(address)

    def send(self, payload):
        self.s.send(payload)

    def call(self, req, into):
        self.s.send(req)
        big = len(into) >= BIG
        f = self.s.recv(copy=not big)
        data = f.buffer if big else f
        into[: len(data)] = data  # the caller wants it in its buffer: one copy
        return len(data)

    def close(self):
        self.s.close(linger=0)
        self.ctx.term()


# -------------------------------------------------- shared-memory Publisher
class PubSubPeer(Peer):
    def __init__(self, address, role, marks, report):
        super().__init__(address, role, marks, report)
        self.address = address  # a Publisher name; the client creates it

    def accept(self):
        self.sub = import_copyless().Subscriber(self.address, timeout=RECV_TIMEOUT)

    def recv(self):
        m = self.sub.recv(timeout=RECV_TIMEOUT)
        if m is None:
            raise TimeoutError("Subscriber.recv timed out")
        if len(m.data) >= BIG:
            touch(m.data)
        m.release()


class PubSubClient(Client):
    one_way = True

    def __init__(self, address, role):
        self.pub = import_copyless().Publisher(address)
        self.pub.wait_for_subscribers(1, timeout=RECV_TIMEOUT)

    def send(self, payload):
        self.pub.send(payload)

    def close(self):
        self.pub.close()


class CrcPeer(CopylessPeer):
    data_crc = True


class CrcClient(CopylessClient):
    data_crc = True  # Messenger(data_crc=True): the checksum where the default has none
    metrics = ("gbps_1MiB", "gbps_16MiB")  # the row shows what the checksum costs large messages


LIBS = {
    "copyless": (CopylessPeer, CopylessClient),
    "copyless-crc": (CrcPeer, CrcClient),
    "raw": (RawPeer, RawClient),
    "zmq": (ZmqPeer, ZmqClient),
    "pubsub": (PubSubPeer, PubSubClient),
}
# row: library, the transport group it is compared in, address ({d}: a temporary
# directory, {n}: a name unique to this cell)
ROWS = {
    "copyless/tcp": ("copyless", "tcp", "tcp://127.0.0.1:0"),
    "raw/tcp": ("raw", "tcp", "tcp://127.0.0.1:0"),
    "zmq/tcp": ("zmq", "tcp", "tcp://127.0.0.1:0"),
    "copyless-crc/tcp": ("copyless-crc", "tcp", "tcp://127.0.0.1:0"),
    "copyless/unix": ("copyless", "unix", "unix://{d}/{n}"),
    "copyless-crc/unix": ("copyless-crc", "unix", "unix://{d}/{n}"),
    "raw/unix": ("raw", "unix", "unix://{d}/{n}"),
    "zmq/ipc": ("zmq", "unix", "ipc://{d}/{n}"),
    "copyless/ipc": ("copyless", "ipc", "ipc://{n}"),
    "pubsub/shm": ("pubsub", "ipc", "{n}"),
}
PEERS = {  # what each copyless row is compared with
    "tcp": {"raw": "raw/tcp", "zmq": "zmq/tcp"},
    "unix": {"raw": "raw/unix", "zmq": "zmq/ipc"},
    "ipc": {"zmq": "zmq/ipc", "pubsub": "pubsub/shm"},
}


# =================================================================== cells
def _serve(ctrl, lib, address, role, marks):
    """The child: bind, tell the orchestrator where, serve until killed."""
    try:
        peer = LIBS[lib][0](address, role, marks, lambda count: ctrl.send(("count", count)))
    except NotImplementedError as e:
        ctrl.send(("unsupported", str(e)))
        return
    ctrl.send(("ready", peer.address))
    peer.accept()
    peer.serve()
    ctrl.recv()  # stay connected until the orchestrator kills us


class NotImplementedRow(Exception):
    pass


def run_stream(client, child, size, n, warm, budget):
    payload, send = bytes(SOURCE[:size]), client.send
    for _ in range(warm):
        send(payload)
    child.expect("count", budget)
    t0 = pc()
    for _ in range(n):
        send(payload)
    child.expect("count", budget)
    seconds = (pc() - t0) / 1e9
    return dict(messages=n, seconds=seconds, msgs_per_s=n / seconds, gbps=n * size / seconds / 1e9)


def run_calls(client, size, n, warm):
    req, buf = request(size), bytearray(size)
    call, lat = client.call, [0] * n
    for _ in range(warm):
        call(req, buf)
    for i in range(n):
        t0 = pc()
        call(req, buf)
        lat[i] = pc() - t0
    buf[:] = bytes(size)  # after the clock: does a reply still land in the posted buffer?
    if call(req, buf) != size or buf != SOURCE[:size]:
        raise RuntimeError(f"the reply did not bring {size} bytes into the posted buffer")
    s = sorted(lat)
    return dict(
        calls=n,
        p50_us=percentile(s, 0.5) / 1e3,
        p99_us=percentile(s, 0.99) / 1e3,
        gbps=n * size / sum(lat),
    )


_cells = itertools.count()


def measure(row, size, test, mode, tmp):
    """One cell in a fresh peer process; the client's result."""
    lib, _, template = ROWS[row]
    address = template.format(d=tmp, n=f"clbench_{os.getpid()}_{next(_cells)}")
    PeerCls, ClientCls = LIBS[lib]
    if ClientCls.one_way:
        test = "stream"
    n, warm = (mode["bw"][size], BW_WARM[size]) if size >= BIG else mode[test]
    role = "sink" if test == "stream" else "echo"
    budget = mode["watchdog_s"]
    with Child(_serve, lib, address, role, (warm, warm + n)) as child:
        kind, *rest = child.recv(budget)
        if kind == "unsupported":
            raise NotImplementedRow(rest[0])
        with watchdog(budget, child.kill):
            client = ClientCls(rest[0], role)
            try:
                if test == "stream":
                    return run_stream(client, child, size, n, warm, budget)
                return run_calls(client, size, n, warm)
            finally:
                client.close()


# ===================================================================== main
def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run_rows(rows, mode, tmp):
    """Every row's cells.  Rows are interleaved: for each metric and repeat, each row in
    turn, so a row and the peer it is compared with are measured seconds apart (this
    VM changes speed over minutes: measured one row after the other, a ratio said as
    much about the VM as about the code)."""
    cells = {row: {c: None for c in COLUMNS} for row in rows}
    runs = {row: {} for row in rows}
    notes = {row: [] for row in rows}
    done = set()  # rows not implemented, or that cannot import their library
    for metric, size, test in TESTS:
        failed = set()
        for _ in range(mode["bw_repeats" if metric.startswith("gbps") else "repeats"]):
            for row in rows:
                lib = ROWS[row][0]
                if row in done or row in failed:
                    continue
                if LIBS[lib][1].one_way and metric == "rtt":
                    continue
                if LIBS[lib][1].metrics is not None and metric not in LIBS[lib][1].metrics:
                    continue
                try:
                    runs[row].setdefault(metric, []).append(measure(row, size, test, mode, tmp))
                except NotImplementedRow as e:
                    cells[row]["not_implemented"] = str(e)
                    log(f"  {row:14s} not implemented: {e}")
                    done.add(row)
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    notes[row].append(f"{metric}: {msg}")
                    log(f"  {row:14s} {metric:16s} FAILED {msg}")
                    failed.add(row)
                    runs[row].pop(metric, None)
                    if "ImportError" in msg or "ModuleNotFoundError" in msg:
                        done.add(row)
        for row in rows:
            got = runs[row].get(metric)
            if not got or row in failed:
                continue
            if metric == "rtt":
                for q in ("p50_us", "p99_us"):
                    cells[row][f"rtt_{q}"] = median([r[q] for r in got])
                shown = f"p50 {cells[row]['rtt_p50_us']:.1f} us  p99 {cells[row]['rtt_p99_us']:.1f} us"
            else:
                cells[row][metric] = median([r["gbps" if metric.startswith("gbps") else "msgs_per_s"] for r in got])
                shown = f"{cells[row][metric]:,.2f}"
            log(f"  {row:14s} {metric:16s} {shown}")
    return cells, runs, notes


def ratio(a, b, metric):
    """copyless vs a peer, >1 = copyless better (round trips: peer / copyless)."""
    if not a or not b:
        return None
    return a / b if metric in HIGHER_IS_BETTER else b / a


OPS = {">=": operator.ge, ">": operator.gt, "<": operator.lt}
TARGETS = {  # name: (what the issue asks, [(transport, peer row or None: the value itself, metric, op, limit)])
    "large_gbps": (
        "TCP and Unix large-message GB/s >= 0.9x raw recv_into",
        [(t, PEERS[t]["raw"], m, ">=", 0.9) for t in ("tcp", "unix") for m in ("gbps_1MiB", "gbps_16MiB")],
    ),
    "small_rate": (
        "small-message rate ahead of pyzmq on the same transport",
        [(t, PEERS[t]["zmq"], m, ">", 1.0) for t in PEERS for m in ("msgs_per_s_64", "msgs_per_s_4KiB")],
    ),
    "ipc_rtt": ("ipc:// round trip p50 under 5 us", [("ipc", None, "rtt_p50_us", "<", 5.0)]),
}


def fmt_ratio(v, metric):
    return "-" if v is None else f"{v:.2f}"


def shown(cell, metric):
    return cell


def check_targets(results):
    """Every check of a target must be measured and met for a PASS."""
    out = {}
    for name, (text, checks) in TARGETS.items():
        rows = []
        for t, peer, metric, op, limit in checks:
            mine = results.get(f"copyless/{t}")
            v = mine and mine.get(metric)
            if peer:
                v = ratio(v, results.get(peer, {}).get(metric), metric)
            ok = v is not None and OPS[op](v, limit)
            why = "not run" if mine is None else "not implemented" if mine.get("not_implemented") else "not measured"
            rows.append(dict(transport=t, peer=peer, metric=metric, value=v, op=op, limit=limit, passed=ok))
            if v is None:
                rows[-1]["missing"] = why
        out[name] = dict(target=text, verdict="PASS" if all(r["passed"] for r in rows) else "FAIL", checks=rows)
    return out


def ratios(results):
    """{'copyless/T vs PEER': {metric: ratio}} for every peer of every copyless row."""
    out = {}
    for t, peers in PEERS.items():
        for mine in (f"copyless/{t}", f"copyless-crc/{t}"):
            for name, peer in peers.items():
                if mine in results and peer in results and (mine.startswith("copyless/") or name == "raw"):
                    out[f"{mine} vs {peer}"] = {
                        m: ratio(results[mine].get(m), results[peer].get(m), m) for m in COLUMNS
                    }
    return out


def marked(rows, targets, fmt):
    """Rows of display cells; a target's cell (in the copyless row, and in the ratio
    row it was judged on) gets PASS/FAIL."""
    marks = {}
    for t in targets.values():
        for c in t["checks"]:
            mine = f"copyless/{c['transport']}"
            for row in (mine, f"{mine} vs {c['peer']}"):
                marks[row, c["metric"]] = " PASS" if c["passed"] else " FAIL"
    return {
        row: {
            m: ("not impl." if cells.get("not_implemented") else fmt(cells.get(m), m)) + marks.get((row, m), "")
            for m in COLUMNS
        }
        for row, cells in rows.items()
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (< ~60 s total)")
    ap.add_argument("--json", metavar="PATH", help="write the JSON here instead of stdout")
    ap.add_argument("--transports", default="tcp,unix,ipc", help="comma list of tcp, unix, ipc")
    args = ap.parse_args(argv)
    want = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not want or set(want) - set(PEERS):
        ap.error("--transports: a comma list of tcp, unix, ipc")
    install_signal_cleanup()
    mode_name = "quick" if args.quick else "full"
    mode = dict(MODES[mode_name], watchdog_s=BUDGET[mode_name])
    rows = [r for r in ROWS if ROWS[r][1] in want or r in {p for t in want for p in PEERS[t].values()}]

    info = machine_info()
    print(f"machine: {info['cpu_model']}, nproc={info['nproc']}, kernel {info['kernel']}, Python {info['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    info["loadavg_start"] = os.getloadavg()
    print(f"mode: {mode_name} {mode}; load average {info['loadavg_start'][0]:.2f}", flush=True)

    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="clbench-")
    try:
        cells, raw, notes = run_rows(rows, mode, tmp)
        results = {row: dict(cells[row], notes=notes[row]) for row in rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        info["loadavg_end"] = os.getloadavg()
    targets, rel = check_targets(results), ratios(results)

    print()
    print(render_table(marked(results, targets, fmt), COLUMNS, HEADERS, cell=shown))
    print("\nratios, >1 = copyless better (msg/s, GB/s: copyless/peer; RTT: peer/copyless):")
    print(render_table(marked(rel, targets, fmt_ratio), COLUMNS, HEADERS, cell=shown))
    print("\ntargets:")
    for t in targets.values():
        print(f"  {t['verdict']}  {t['target']}")
        for c in t["checks"]:
            if not c["passed"]:
                v = c.get("missing") or f"{c['value']:.3g}"
                print(f"          {c['transport']} {c['metric']}{' vs ' + c['peer'] if c['peer'] else ''}: {v}")
    print("\nnotes:")
    for row, r in results.items():
        if r.get("not_implemented"):
            print(f"  {row}: not implemented: {r['not_implemented']}")
        for n in r["notes"]:
            print(f"  {row}: {n}")
    print(
        "  messenger, raw and zmq rows: nobody reads the payload inside the clock (the stream receiver\n"
        "  counts; one call after the clock checks its reply); pubsub rows read a byte of every 4 KiB page.\n"
        "  copyless runs with its defaults (no data crc over loopback, unix or ipc); nor do raw and zmq.\n"
        "  The ipc RTT target says 'busy': over ipc, conn.call spins (the address's spin, 100 us by\n"
        "  default) before it sleeps, and so does the server's loop; the cell measures conn.call with its\n"
        "  defaults, so it includes the Python session layer.  The transport alone: bench_ipc.py."
    )
    print(f"\ntotal wall time {time.monotonic() - t_start:.1f} s; load average at end {info['loadavg_end'][0]:.2f}")

    doc = {
        "benchmark": "copyless benchmarks/bench_messenger.py",
        "mode": mode_name,
        "settings": mode,
        "machine": info,
        "units": {
            "msgs_per_s_*": "messages/s, until the receiver has them all",
            "rtt_*_us": "microseconds, 64 B request and 64 B reply",
            "gbps_*": "1e9 bytes/s of replies into the client's buffer (pubsub: one way)",
        },
        "results": results,
        "raw": raw,
        "ratios": {"convention": ratio.__doc__, **rel},
        "targets": targets,
    }
    emit_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
