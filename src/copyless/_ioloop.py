"""A small selector event loop on its own thread: the Messenger runs a fixed pool
of these (never a thread per connection), and each connection lives on one.

Everything that touches a connection runs on its loop's thread; other threads
hand work over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

Callback = Callable[[], Any]


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callback) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class IOLoop:
    def __init__(self, name: str) -> None:
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self.load = 0  # connections assigned here (the Messenger balances on it)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread
    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            self._calls.append((fn, args))
        self._poke()

    def stop(self) -> None:
        """Stop the loop and join its thread (call from another thread)."""
        self._stopping = True
        self._poke()
        if threading.current_thread() is not self._thread:
            self._thread.join(10)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    # ------------------------------------------------------------ loop thread only
    def add_reader(self, fileobj: Any, cb: Callback) -> None:
        self._set(fileobj, selectors.EVENT_READ, cb, None)

    def set_writer(self, fileobj: Any, cb: Callback | None) -> None:
        key = self._sel.get_map().get(fileobj.fileno()) if fileobj.fileno() >= 0 else None
        reader = key.data[0] if key else None
        self._set(fileobj, selectors.EVENT_READ if reader else 0, reader, cb)

    def _set(self, fileobj: Any, _: int, reader: Callback | None, writer: Callback | None) -> None:
        events = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        fd = fileobj.fileno()
        registered = fd in self._sel.get_map()
        if not events:
            if registered:
                self._sel.unregister(fd)
            return
        if registered:
            self._sel.modify(fd, events, (reader, writer))
        else:
            self._sel.register(fd, events, (reader, writer))

    def remove(self, fileobj: Any) -> None:
        fd = fileobj.fileno()
        if fd >= 0 and fd in self._sel.get_map():
            self._sel.unregister(fd)

    def call_at(self, when: float, fn: Callback) -> Timer:
        t = Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def call_later(self, delay: float, fn: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, fn)

    # ------------------------------------------------------------ internals
    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                for key, mask in self._sel.select(timeout):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    reader, writer = key.data
                    if mask & selectors.EVENT_READ and reader:
                        self._guard(reader)
                    if mask & selectors.EVENT_WRITE and writer:
                        # look again: the reader may have removed or changed it
                        cur = self._sel.get_map().get(key.fd)
                        if cur is not None and cur.data[1] is writer:
                            self._guard(writer)
                with self._lock:
                    calls, self._calls = self._calls, deque()
                for fn, args in calls:
                    self._guard(fn, *args)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, t = heapq.heappop(self._timers)
                    if not t.cancelled:
                        self._guard(t.fn)
        finally:
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # one connection's bug must not stop the loop for the others
            traceback.print_exc()
