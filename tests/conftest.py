"""Shared fixtures: unique endpoint names, child processes, and a leak check on every test;
and wait_for(), for tests that wait on another thread's work."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest


def wait_for(pred, timeout=5.0) -> bool:
    """Poll pred until it holds (True) or timeout seconds pass (its last answer)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return out


def _memfd_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "memfd:copyless" in line]


@pytest.fixture(autouse=True)
def leakcheck():
    """No fd, shared-memory mapping or thread may outlive a test."""
    gc.collect()
    fds0, maps0, threads0 = _fds(), _memfd_maps(), threading.active_count()
    yield
    deadline = time.monotonic() + 5
    while True:
        gc.collect()
        fds, maps, threads = _fds(), _memfd_maps(), threading.active_count()
        if (fds <= fds0 and len(maps) <= len(maps0) and threads <= threads0) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert fds - fds0 == set(), "file descriptors leaked"
    assert len(maps) <= len(maps0), f"shared-memory mappings leaked: {maps[:4]}"
    assert threads <= threads0, f"threads leaked: {threading.enumerate()}"
    assert not [n for n in os.listdir("/dev/shm") if "copyless" in n], "/dev/shm entries left"


@pytest.fixture
def name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


class Child:
    """A Python child process running a snippet; kill()able at any point."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait(self, timeout: float = 30) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"child timed out\nstdout:{out}\nstderr:{err}") from None
        return self.proc.returncode, out, err

    def readline(self, timeout: float = 30) -> str:
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("child said nothing in time")
        sel.close()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def child():
    made: list[Child] = []

    def start(code: str, *args: str) -> Child:
        c = Child(code, *args)
        made.append(c)
        return c

    yield start
    for c in made:
        c.close()


def in_threads(run, threads: int, timeout: float = 60) -> None:
    """run(t) for t in range(threads), each on a thread of its own, all at once; an
    exception in any of them, or one still running after `timeout`, fails the test."""
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            run(t)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=guarded, args=(t,)) for t in range(threads)]
    for x in ts:
        x.start()
    end = time.monotonic() + timeout
    for x in ts:
        x.join(max(0.0, end - time.monotonic()))
    assert not errors, errors
    assert not any(x.is_alive() for x in ts), "a thread did not finish"


def address_of(transport: str, tmp_path, name: str = "") -> str:
    """A fresh address of a transport: tcp on loopback, a unix socket in tmp_path, ipc `name`."""
    return {"tcp": "tcp://127.0.0.1:0", "unix": f"unix://{tmp_path}/s.sock", "ipc": f"ipc://{name}"}[transport]


@contextlib.contextmanager
def served(dispatcher, address: str, *, data_crc=None, proxied=False, **client_options):
    """(client Messenger, its READY Connection, the FaultProxy between them or None): a
    stateful server at `address` that dispatches to `dispatcher`, and a client Messenger
    made with client_options; data_crc goes to both."""
    from copyless.messenger import Messenger, Policy
    from copyless.testing import FaultProxy

    with Messenger("store.1", policies={"client": Policy.stateful_server()}, data_crc=data_crc) as server:
        server.add_dispatcher(dispatcher)
        bound = server.bind(address)
        server.start()
        with contextlib.ExitStack() as stack:
            proxy = stack.enter_context(FaultProxy(bound)) if proxied else None
            client = stack.enter_context(Messenger("client.7", data_crc=data_crc, **client_options))
            conn = client.connect(proxy.address if proxy else bound)
            conn.wait_ready(5)
            yield client, conn, proxy


@pytest.fixture(params=["compiled", "python"])
def read_path(request, monkeypatch):
    """Run a test over the compiled read round and call (the default) and over the Python
    paths they stand in for (messenger.compiled_read, compiled_call): both must behave
    the same."""
    if request.param == "python":
        from copyless import messenger

        monkeypatch.setattr(messenger.Connection, "_on_readable", messenger.Connection._on_readable_python)
        monkeypatch.setattr(messenger.Connection, "call", messenger.Connection._call_python)
        monkeypatch.setattr(messenger, "read_round", lambda conn, fill=0: False)
    return request.param
