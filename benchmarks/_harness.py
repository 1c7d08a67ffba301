"""Process, timing and reporting helpers for the benchmarks.

Nothing here knows about any messaging library: it starts child processes
(multiprocessing 'spawn'), talks to them over a small control pipe, kills them
on a watchdog deadline, and formats results.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.metadata
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import signal
import sys
import threading
import time
import traceback
from multiprocessing import reduction
from pathlib import Path

_LIVE: set = set()  # child processes not yet reaped


# ----------------------------------------------------------------- children
class ChildError(RuntimeError):
    """A child process failed; the message names the side and its error line."""


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: SIGKILL us when the parent dies (prctl PR_SET_PDEATHSIG = 1)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass
    if os.getppid() != parent_pid:  # parent died before prctl
        os._exit(1)


def _child_main(target, ctrl, parent_pid, args):
    _die_with_parent(parent_pid)
    try:
        target(ctrl, *args)
    except BaseException:
        try:
            ctrl.send(("error", traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)


def _spawn(target, args):
    """Start target(ctrl, *args) in a spawned child; (our end of its control pipe, process)."""
    ctx = mp.get_context("spawn")
    ctrl, child_end = ctx.Pipe()
    p = ctx.Process(target=_child_main, daemon=True, args=(target, child_end, os.getpid(), args))
    p.start()
    _LIVE.add(p)
    child_end.close()
    return ctrl, p


def _describe(proc, msg) -> str:
    """The last line of a child's error, or how its process ended."""
    if msg[0] == "error":
        return msg[1].strip().splitlines()[-1]
    code = proc.exitcode
    if code is not None and code < 0:
        return f"process killed by {signal.Signals(-code).name}"
    return f"process exited (code {code})"


def expect(conn, kind: str, timeout: float):
    """In a child: wait for control message `kind` from the orchestrator."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no {kind!r} from the orchestrator within {timeout:.0f}s")
    msg = conn.recv()
    if msg[0] != kind:
        raise RuntimeError(f"expected {kind!r}, got {msg[0]!r}")
    return msg[1] if len(msg) > 1 else None


class Pair:
    """`with Pair(fn, args_a, args_b) as p:` runs fn(ctrl, *args_x) in two spawned
    children A and B.  The orchestrator (this process) runs no library code: it
    only exchanges small control messages with deadlines, so a child that hangs
    (even inside native code holding its GIL) or crashes is simply killed.  Both
    children are always reaped when the block exits."""

    NAMES = {"A": "sender", "B": "receiver"}

    def __init__(self, target, args_a, args_b):
        self.target, self.args = target, {"A": args_a, "B": args_b}

    def __enter__(self):
        self.ctrl, self.proc, self.pending, self.closed = {}, {}, {"A": [], "B": []}, set()
        try:
            for side in "AB":
                self.ctrl[side], self.proc[side] = _spawn(self.target, self.args[side])
        except BaseException:
            self._kill_all()
            raise
        return self

    def send(self, side, *msg):
        self.ctrl[side].send(msg)

    def _fill(self, deadline, what):
        """Queue the next control message(s) from either child; errors/deaths raise."""
        live = [c for s, c in self.ctrl.items() if s not in self.closed]
        if not live:
            raise ChildError(f"both children exited while waiting for {what}")
        ready = mp.connection.wait(live, max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"hung: no {what} before the deadline (children killed)")
        for side, conn in self.ctrl.items():
            if conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self.proc[side].join(0.5)
                    if self.proc[side].exitcode == 0:  # finished normally
                        self.closed.add(side)
                        continue
                    msg = ("died", None)
                if msg[0] in ("error", "died"):
                    raise ChildError(self._why(side, msg))
                self.pending[side].append(msg)

    def _why(self, side, msg):
        """Describe a failed side, preferring the other side's error if it came first."""
        text = f"{self.NAMES[side]}: {self._line(side, msg)}"
        other = "B" if side == "A" else "A"
        try:
            if other not in self.closed and self.ctrl[other].poll(0.3):
                m = self.ctrl[other].recv()
                if m[0] == "error":
                    return f"{self.NAMES[other]}: {self._line(other, m)}; then {text}"
        except (EOFError, OSError):
            pass
        return text

    def _line(self, side, msg):
        return _describe(self.proc[side], msg)

    def expect(self, side, kind, timeout):
        """Wait for control message `kind` from `side` (messages from the other side queue up)."""
        deadline = time.monotonic() + timeout
        while not self.pending[side]:
            if side in self.closed:
                raise ChildError(f"{self.NAMES[side]} exited before sending {kind!r}")
            self._fill(deadline, f"{kind!r} from the {self.NAMES[side]}")
        msg = self.pending[side].pop(0)
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the {self.NAMES[side]}, got {msg[0]!r}")
        return msg[1] if len(msg) > 1 else None

    def relay(self, until: str, timeout: float):
        """Forward B's messages to A until A sends `until`; return its payload."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending["B"]:
                self.ctrl["A"].send(self.pending["B"].pop(0))
            if self.pending["A"]:
                msg = self.pending["A"].pop(0)
                if msg[0] != until:
                    raise RuntimeError(f"unexpected {msg[0]!r} from the sender")
                return msg[1] if len(msg) > 1 else None
            if "A" in self.closed:
                raise ChildError(f"sender exited before sending {until!r}")
            self._fill(deadline, f"{until!r} from the sender")

    def _kill_all(self):
        for p in getattr(self, "proc", {}).values():
            _kill(p)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            for p in self.proc.values():
                p.join(5)
        self._kill_all()
        for c in self.ctrl.values():
            c.close()
        return False


class Child:
    """`with Child(fn, *args) as c:` runs fn(ctrl, *args) in one spawned child, the
    peer of a client that runs in this process.  c.recv(timeout) returns the
    child's next control message and raises ChildError if it failed or died;
    the child is always killed when the block exits."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __enter__(self):
        self.ctrl, self.proc = _spawn(self.target, self.args)
        return self

    def recv(self, timeout: float):
        if not self.ctrl.poll(timeout):
            raise TimeoutError(f"hung: nothing from the peer within {timeout:.0f} s")
        try:
            msg = self.ctrl.recv()
        except (EOFError, OSError):
            self.proc.join(0.5)
            msg = ("died", None)
        if msg[0] in ("error", "died"):
            raise ChildError(f"peer: {_describe(self.proc, msg)}")
        return msg

    def expect(self, kind: str, timeout: float):
        msg = self.recv(timeout)
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the peer, got {msg[0]!r}")
        return msg[1] if len(msg) > 1 else None

    def kill(self):
        _kill(self.proc)

    def __exit__(self, exc_type, exc, tb):
        self.kill()
        self.ctrl.close()
        return False


class Hung(TimeoutError):
    """A watchdog deadline passed."""


@contextlib.contextmanager
def watchdog(seconds: float, on_expiry=None):
    """Bound a block that runs in the main thread.  After `seconds`, SIGALRM raises
    Hung in it (a blocking system call is interrupted: the handler raises, so
    PEP 475 does not retry it); `on_expiry` (e.g. Child.kill) also runs from a
    timer thread 2 s later, for a main thread stuck in native code."""

    def fire(signum, frame):
        raise Hung(f"hung: not done within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    backup = threading.Timer(seconds + 2, on_expiry) if on_expiry else None
    if backup:
        backup.daemon = True
        backup.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if backup:
            backup.cancel()


def _kill(proc):
    if proc.is_alive():
        proc.terminate()
        proc.join(1)
    if proc.is_alive():
        proc.kill()
        proc.join(1)
    _LIVE.discard(proc)


@atexit.register
def _reap_all():
    for p in list(_LIVE):
        _kill(p)


def install_signal_cleanup():
    """Turn SIGTERM/SIGHUP into SystemExit so `finally` blocks and atexit run."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))


class PassFd:
    """A raw fd that can be handed to a spawned child as a Process argument."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return (_rebuild_fd, (reduction.DupFd(self.fd),))

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _rebuild_fd(dup):
    return PassFd(dup.detach())


def close_spec(spec):
    """Close fds/sockets/connections in a (possibly nested tuple) spec."""
    for obj in spec if isinstance(spec, (tuple, list)) else (spec,):
        if hasattr(obj, "close"):
            try:
                obj.close()
            except OSError:
                pass


# ---------------------------------------------------------------- statistics
def percentile(sorted_vals, q: float):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def median(vals):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    m = len(vals) // 2
    return vals[m] if len(vals) % 2 else (vals[m - 1] + vals[m]) / 2


# -------------------------------------------------------------- machine info
def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(extra_versions: dict | None = None) -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_model": cpu or platform.processor() or None,
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "versions": {d: _version(d) for d in ("copyless", "pyzmq", "iceoryx2", "numpy")},
    }
    try:
        import zmq

        info["versions"]["libzmq"] = zmq.zmq_version()
    except Exception:
        pass
    info["versions"].update(extra_versions or {})
    return info


# ------------------------------------------------------------------- output
def fmt(v, metric: str) -> str:
    if v is None:
        return "-"
    if metric.startswith("msgs_per_s"):
        return f"{v / 1e6:.3f}M" if v >= 1e5 else f"{v / 1e3:.1f}k"
    if metric.startswith("gbps"):
        return f"{v:.2f}"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def render_table(rows: dict, columns: list, headers: dict, cell=fmt) -> str:
    names = list(rows)
    cells = [[headers.get(c, c) for c in columns]]
    for n in names:
        cells.append([cell(rows[n].get(c), c) for c in columns])
    first = max(len("backend"), *(len(n) for n in names)) if names else 7
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = ["backend".ljust(first) + "  " + "  ".join(h.rjust(w) for h, w in zip(cells[0], widths, strict=True))]
    out.append("-" * len(out[0]))
    for n, r in zip(names, cells[1:], strict=True):
        out.append(n.ljust(first) + "  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def emit_json(doc: dict, path: str | None) -> None:
    """Write the results document to path, or print it when no path is given."""
    text = json.dumps(doc, indent=2, default=str)
    if path:
        Path(path).write_text(text + "\n")
        print(f"JSON written to {path}")
    else:
        print(text)
