"""One housekeeping thread per process, shared by every endpoint.

It accepts subscribers, runs their handshakes and notices when a peer's
control socket closes.  It never touches the data path: messages flow through
the rings with no system call and no thread hop.  The thread exists only
while some endpoint is registered, and exits (closing its own fds) when the
last one leaves.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Handler = Callable[[], Any]


class _Reactor:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handlers: dict[int, Handler] = {}
        self._sel: selectors.DefaultSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def register(self, sock: socket.socket, handler: Handler) -> None:
        with self._lock:
            if self._thread is None:
                self._sel = selectors.DefaultSelector()
                self._wake_r, self._wake_w = socket.socketpair()
                self._wake_r.setblocking(False)
                self._sel.register(self._wake_r, selectors.EVENT_READ, None)
                self._thread = threading.Thread(target=self._run, name="copyless-housekeeping", daemon=True)
                self._thread.start()
            assert self._sel is not None
            self._handlers[sock.fileno()] = handler
            self._sel.register(sock, selectors.EVENT_READ, sock.fileno())
            self._poke()

    def unregister(self, sock: socket.socket) -> None:
        """Stop watching sock (call before closing it).  Joins the thread if it was the last."""
        thread = None
        with self._lock:
            fd = sock.fileno()
            if fd < 0 or self._handlers.pop(fd, None) is None or self._sel is None:
                return
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if not self._handlers:
                thread = self._thread
            self._poke()
        if thread is not None and thread is not threading.current_thread():
            # wait for it to go, unless someone registered again meanwhile
            deadline = time.monotonic() + 5
            while thread.is_alive() and not self._handlers and time.monotonic() < deadline:
                thread.join(0.01)

    def _poke(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except (BlockingIOError, OSError):
                pass

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._handlers:
                    self._shutdown_locked()
                    return
                sel = self._sel
            assert sel is not None
            events = sel.select(timeout=1.0)
            for key, _ in events:
                if key.data is None:
                    try:
                        while self._wake_r is not None and self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                with self._lock:
                    handler = self._handlers.get(key.data)
                if handler is not None:
                    try:
                        handler()
                    except Exception:  # a handler bug must not kill housekeeping for everyone
                        import traceback

                        traceback.print_exc()

    def _shutdown_locked(self) -> None:
        assert self._sel is not None and self._wake_r is not None and self._wake_w is not None
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel = self._wake_r = self._wake_w = None
        self._thread = None


reactor = _Reactor()
