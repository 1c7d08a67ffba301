"""The `copyless` command."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import copyless


def _demo_subscriber(name: str, count: int) -> int:
    """Child side of the demo: receive, verify each frame's digest, report."""
    sub = copyless.Subscriber(name, timeout=10)
    got = bad = nbytes = 0
    for msg in sub:
        with msg:
            data = msg.data
            body, digest = data[:-32], data[-32:]
            if hashlib.sha256(body).digest() != digest:
                bad += 1
            got += 1
            nbytes += msg.nbytes
        if got == count:
            break
    print(
        f"  subscriber (pid {os.getpid()}): {got} frames, {nbytes / 1e6:.1f} MB, {bad} corrupt, "
        f"gaps {sub.statistics().gaps}"
    )
    sub.close()
    return 0 if bad == 0 and got == count else 1


def demo(args: argparse.Namespace) -> int:
    name = f"demo-{os.getpid()}"
    frames, size = args.frames, args.size
    print(f"copyless demo: a publisher loans {frames} frames of {size} bytes in shared memory;")
    print("a subscriber in another process reads them in place and checks each frame's SHA-256.")
    with copyless.Publisher(name, slot_size=4096, slots=64) as pub:
        child = subprocess.Popen([sys.executable, "-m", "copyless.cli", "_demo-sub", name, str(frames)])
        try:
            pub.wait_for_subscribers(1, timeout=20)
            t0 = time.perf_counter()
            for i in range(frames):
                with pub.loan(size + 32, tag=i) as buf:  # build the frame in place: zero copies
                    body = buf[:size]
                    body[:8] = i.to_bytes(8, "little")
                    buf[size:] = hashlib.sha256(body).digest()
                    body.release()
            rc = child.wait(timeout=60)
            dt = time.perf_counter() - t0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        st = pub.statistics()
    print(
        f"  publisher: {st.messages} frames in {dt * 1e3:.0f} ms, {st.loans} loans, "
        f"{st.wakeups} wake-ups sent, {st.blocked} waits for space"
    )
    print("demo " + ("passed" if rc == 0 else "FAILED"))
    return rc


def _benchmark_script() -> Path | None:
    """benchmarks/bench_pubsub.py of the source checkout (current directory, or the one installed from)."""
    here = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), here):
        script = root / "benchmarks" / "bench_pubsub.py"
        if script.is_file():
            return script
    return None


def bench(rest: list[str]) -> int:
    script = _benchmark_script()
    if script is None:
        print("copyless bench: the benchmark scripts live in benchmarks/ of the source checkout; run it from there")
        return 2
    return subprocess.call([sys.executable, str(script), *rest])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="copyless", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="two-process publish/subscribe demo")
    d.add_argument("--frames", type=int, default=2000)
    d.add_argument("--size", type=int, default=1 << 20)
    sub.add_parser(
        "bench",
        help="the pub/sub benchmark against its peers (benchmarks/bench_pubsub.py; its options pass through)",
        add_help=False,
    )
    s = sub.add_parser("_demo-sub")
    s.add_argument("name")
    s.add_argument("count", type=int)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "_demo-sub":
        return _demo_subscriber(args.name, args.count)
    return 2


if __name__ == "__main__":
    sys.exit(main())
