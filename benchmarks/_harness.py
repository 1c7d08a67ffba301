"""Process, timing and reporting helpers for bench_pubsub.py.

Nothing here knows about any messaging library: it starts one child process
(multiprocessing 'spawn'), talks to it over a small control pipe, kills it on a
watchdog deadline, and formats results.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib.metadata
import multiprocessing as mp
import os
import platform
import signal
import sys
import threading
import traceback
from multiprocessing import reduction

_LIVE: set = set()  # child processes not yet reaped


# ----------------------------------------------------------------- children
class ChildError(RuntimeError):
    """The child process raised; str() is the last line of its traceback."""


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


class Child:
    """`with Child(fn, args, timeout) as ch:` runs fn(ctrl, *args) in a spawned
    process. The watchdog kills it after `timeout` seconds (and calls `wake`, to
    unblock a parent stuck in a call that a dead peer does not interrupt). The
    child is always reaped on exit from the block."""

    def __init__(self, target, args=(), timeout=60.0, wake=None):
        self.target, self.args, self.timeout, self.wake = target, args, timeout, wake
        self.expired = False

    def __enter__(self):
        ctx = mp.get_context("spawn")
        self.ctrl, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, daemon=True,
                                args=(self.target, child_end, os.getpid(), self.args))
        self.proc.start()
        _LIVE.add(self.proc)
        child_end.close()
        self.timer = threading.Timer(self.timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def _expire(self):
        self.expired = True
        _kill(self.proc)
        if self.wake is not None:
            try:
                self.wake()
            except Exception:
                pass

    def send(self, *msg):
        self.ctrl.send(msg)

    def expect(self, kind: str, timeout: float):
        """Wait for control message `kind` from the child; return its payload."""
        if not self.ctrl.poll(timeout):
            raise TimeoutError(f"child sent no {kind!r} within {timeout:.0f}s")
        try:
            msg = self.ctrl.recv()
        except EOFError:
            raise ChildError(self._death()) from None
        if msg[0] == "error":
            raise ChildError(msg[1].strip().splitlines()[-1])
        if msg[0] != kind:
            raise RuntimeError(f"expected {kind!r} from child, got {msg[0]!r}")
        return msg[1] if len(msg) > 1 else None

    def pending_error(self, wait: float = 0.5):
        """The child's error line if it reported one (used when the parent failed)."""
        try:
            while self.ctrl.poll(wait):
                msg = self.ctrl.recv()
                if msg[0] == "error":
                    return msg[1].strip().splitlines()[-1]
        except (EOFError, OSError):
            pass
        return None

    def _death(self):
        self.proc.join(1)
        if self.expired:
            return f"watchdog killed child after {self.timeout:.0f}s"
        return f"child exited (code {self.proc.exitcode})"

    def __exit__(self, exc_type, exc, tb):
        self.timer.cancel()
        self.proc.join(5 if exc_type is None else 0.2)
        _kill(self.proc)
        self.ctrl.close()
        if self.expired and exc_type is not None:
            raise TimeoutError(f"hung: watchdog killed the child after {self.timeout:.0f}s") from exc
        return False


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


def render_table(rows: dict, columns: list, headers: dict) -> str:
    names = list(rows)
    cells = [[headers.get(c, c) for c in columns]]
    for n in names:
        cells.append([fmt(rows[n].get(c), c) for c in columns])
    first = max(len("backend"), *(len(n) for n in names)) if names else 7
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = ["backend".ljust(first) + "  " + "  ".join(h.rjust(w) for h, w in zip(cells[0], widths))]
    out.append("-" * len(out[0]))
    for n, r in zip(names, cells[1:]):
        out.append(n.ljust(first) + "  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return "\n".join(out)
