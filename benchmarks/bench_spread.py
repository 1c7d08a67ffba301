#!/usr/bin/env python3
"""The spread of one small-message cell: copyless against pyzmq, cell after cell.

    python benchmarks/bench_spread.py [--transport tcp|unix|ipc] [--test stream|call]
                                      [--size 64] [--cells 10] [--json PATH]

bench_messenger.py reports the median of three repeats per cell, which hides a
rate with two modes (session 13: the 64 B stream ran at ~2.5 M msgs/s in most
cells and at 0.5-1.2 M in a third of them, a lock convoy between the sender and
its I/O loop thread).  This runs the same one-way stream cell (a fresh peer
process each time, bench_messenger.measure) `--cells` times for the copyless
row and its pyzmq peer on the transport, alternating, and prints each row's
minimum, median and maximum, and copyless ÷ pyzmq for each.  A ratio of
minima well under the ratio of medians says copyless has a slow mode.
--test call does the same for the round trip cell (its p50, in µs; the ratio
is then pyzmq ÷ copyless, so > 1 is still copyless ahead).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_messenger as bm  # noqa: E402
from _harness import emit_json, install_signal_cleanup, machine_info  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", default="tcp", choices=sorted(bm.PEERS))
    ap.add_argument("--test", default="stream", choices=["stream", "call"])
    ap.add_argument("--size", type=int, default=64, help="message bytes (below 64 KiB)")
    ap.add_argument("--cells", type=int, default=10)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if not 0 < args.size < bm.BIG:
        ap.error(f"--size: 1..{bm.BIG - 1}")
    install_signal_cleanup()
    rows = [f"copyless/{args.transport}", bm.PEERS[args.transport]["zmq"]]
    mode = dict(bm.MODES["full"], watchdog_s=bm.BUDGET["full"])
    tmp = tempfile.mkdtemp(prefix="clspread-")
    stream = args.test == "stream"
    key, unit, scale = ("msgs_per_s", "M msgs/s", 1e6) if stream else ("p50_us", "round trip p50, us", 1)
    rates: dict[str, list[float]] = {r: [] for r in rows}
    try:
        for i in range(args.cells):
            for row in rows:
                rates[row].append(bm.measure(row, args.size, args.test, mode, tmp)[key])
            print(f"  cell {i + 1}: " + "  ".join(f"{r} {rates[r][-1] / scale:.2f}" for r in rows), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {r: {"min": min(v), "median": statistics.median(v), "max": max(v)} for r, v in rates.items()}
    cl, zq = (summary[r] for r in rows)
    ratio = {k: cl[k] / zq[k] if stream else zq[k] / cl[k] for k in ("min", "median", "max")}
    what = "one-way stream" if stream else "request/reply"
    print(f"\n{args.size} B {what} over {args.transport}, {args.cells} cells each ({unit})")
    print(f"{'backend':16s} {'min':>7s} {'median':>7s} {'max':>7s}")
    for r in rows:
        print(f"{r:16s} " + " ".join(f"{summary[r][k] / scale:7.3f}" for k in ("min", "median", "max")))
    print(f"{'ratio, >1 ahead':16s} " + " ".join(f"{ratio[k]:7.2f}" for k in ("min", "median", "max")))
    emit_json(
        {
            "benchmark": "copyless benchmarks/bench_spread.py",
            "machine": machine_info(),
            "transport": args.transport,
            "test": args.test,
            "size": args.size,
            "cells": rates,
            "summary": summary,
            "ratio_copyless_over_zmq": ratio,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
