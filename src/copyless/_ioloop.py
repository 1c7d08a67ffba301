"""A small epoll event loop on its own thread: the Messenger runs a fixed pool
of these (never a thread per connection), and each connection lives on one.

Registration (`add_reader`, `set_writer`, `remove`, `detach`/`attach`) and
timers (`call_at`) may be used from any thread: a caller waiting for a reply
takes a connection's socket off its loop for that time and reads it itself
(see Connection.call), which saves the hop from the loop thread to the caller.
Other work is handed over with `call_soon_threadsafe`.

Streams whose `write_wakes_read` is True (ipc://) signal room to write by
turning readable, so the loop watches them for EPOLLIN whatever the interest
and calls both callbacks on it; and before it sleeps it `arm()`s each of them
(their peer sends a wake byte only to a side that said it is going to sleep).
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from ._codec import Flusher
from ._core import ipc_run_streams

Callback = Callable[[], Any]
SKIP_EPOLL = 16  # at most this many loop turns in a row run ipc work without epoll_wait

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class Timer:
    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callback) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class IOLoop:
    # (a slot: the compiled call reads it at its offset, see messenger.compiled_messenger)
    __slots__ = ("_ident", "__dict__", "__weakref__")

    def __init__(self, name: str) -> None:
        self.name = name
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # a C thread that writes the batches of this loop's send queues (copyless._codec.Writer)
        # without the GIL; it rings _wake when written Python buffers are to be given back
        self.flusher = Flusher(self._wake)
        self._ep.register(self._wake, _IN)
        self._lock = threading.Lock()  # handlers, registrations, calls and timers
        self._handlers: dict[int, tuple[Callback | None, Callback | None]] = {}
        self._detached: set[int] = set()  # registered, but a caller is reading it for now
        self._wwr: dict[int, Any] = {}  # fd -> stream whose writes wait for readability (ipc)
        self._armable_cache: list[tuple[int, Any, Callback | None, Callback | None]] | None = None  # see _armable
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._sleeping = False  # in epoll_wait: a new earlier timer must poke
        self.load = 0  # connections assigned here (the Messenger balances on it)
        self._skipped = 0  # epoll_waits skipped in a row because spinning found ipc work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ident = self._thread.ident  # (start() returns once the thread runs)

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
        return threading.get_ident() == self._ident

    def add_reader(self, fileobj: Any, cb: Callback) -> None:
        fd = fileobj.fileno()
        with self._lock:
            self._note(fd, fileobj)
            writer = self._handlers.get(fd, (None, None))[1]
            self._update(fd, cb, writer)
        self._arm_from_outside(fd, fileobj)

    def set_writer(self, fileobj: Any, cb: Callback | None) -> None:
        fd = fileobj.fileno()
        if fd < 0:
            return
        with self._lock:
            self._note(fd, fileobj)
            reader = self._handlers.get(fd, (None, None))[0]
            self._update(fd, reader, cb)

    def remove(self, fileobj: Any) -> None:
        fd = fileobj.fileno()
        with self._lock:
            if fd >= 0:
                self._update(fd, None, None)

    def detach(self, fileobj: Any) -> None:
        """Stop watching fd (its handlers are kept) until attach(): another thread reads it."""
        fd = fileobj.fileno()
        with self._lock:
            if fd in self._handlers and fd not in self._detached:
                self._detached.add(fd)
                self._ep.unregister(fd)
                self._armable_cache = None

    def attach(self, fileobj: Any) -> None:
        fd = fileobj.fileno()
        with self._lock:
            if fd in self._detached:
                self._detached.discard(fd)
                self._armable_cache = None
                reader, writer = self._handlers[fd]
                self._ep.register(fd, self._mask(fd, reader, writer))
        self._arm_from_outside(fd, fileobj)

    def call_at(self, when: float, fn: Callback) -> Timer:
        t = Timer(when, fn)
        with self._lock:
            first = not self._timers or when < self._timers[0][0]
            heapq.heappush(self._timers, (when, next(self._seq), t))
            poke = first and self._sleeping and not self.in_loop()
        if poke:
            self._poke()
        return t

    def call_later(self, delay: float, fn: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, fn)

    # ------------------------------------------------------------ internals
    def _note(self, fd: int, fileobj: Any) -> None:
        if getattr(fileobj, "write_wakes_read", False):
            self._wwr[fd] = fileobj

    def _arm_from_outside(self, fd: int, fileobj: Any) -> None:
        """An ipc stream registered from another thread while the loop may be asleep: the
        loop arms its streams only before it sleeps, so arm this one here (its peer then
        rings), and wake the loop only if there is something to read already."""
        if fd in self._wwr and not self.in_loop() and fileobj.arm():
            self._poke()

    def _mask(self, fd: int, reader: Callback | None, writer: Callback | None) -> int:
        if fd in self._wwr:
            return _IN if reader or writer else 0
        return (_IN if reader else 0) | (_OUT if writer else 0)

    def _update(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        """With the lock held: set fd's handlers and its epoll interest."""
        self._armable_cache = None
        old = self._handlers.get(fd)
        known = old is not None
        if old == (reader, writer):
            return
        if reader is None and writer is None:
            if known:
                del self._handlers[fd]
                self._wwr.pop(fd, None)
                if fd in self._detached:
                    self._detached.discard(fd)
                else:
                    self._ep.unregister(fd)
            return
        self._handlers[fd] = (reader, writer)
        if fd in self._detached:
            return
        mask = self._mask(fd, reader, writer)
        if old is not None and self._mask(fd, *old) == mask:
            return  # same interest: no epoll_ctl
        if known:
            self._ep.modify(fd, mask)
        else:
            self._ep.register(fd, mask)

    def _poke(self) -> None:
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    timeout, due = -1.0, 0.0
                    if self._calls:
                        timeout = 0.0
                    elif self._timers:
                        due = self._timers[0][0]
                        timeout = max(0.0, due - time.monotonic())
                    self._sleeping = True
                    armable = (self._armable_cache or self._armable()) if timeout and self._wwr else None
                # spin (GIL released) over the ipc streams, and run the callbacks of those
                # that have work (None: none had); it leaves us [(fd, _IN)] it did not run
                left = ipc_run_streams(armable, timeout, self) if armable else None
                if left is not None and self._skipped < SKIP_EPOLL:
                    # spinning found work: no epoll_wait (no system call), but not
                    # forever, or the loop's other fds would never get a turn
                    self._skipped += 1
                    events = left
                else:
                    # a side that sleeps says so first, or its peer sends no wake byte
                    ready = left or []
                    if left is None and armable:
                        if due:  # the spin took its time out of the wait, up to all of it
                            timeout = max(0.0, due - time.monotonic())
                        if timeout:  # (a timer due now: run it, and spin again, unarmed)
                            ready = [(fd, _IN) for fd, stream, _, _ in armable if not stream.leased and stream.arm()]
                    self._skipped = 0
                    events = self._ep.poll(0 if left is not None or ready else timeout)
                    if ready:
                        seen = {fd for fd, _ in events}
                        events += [ev for ev in ready if ev[0] not in seen]
                self._sleeping = False
                if self.flusher.reap_wanted:
                    self.flusher.reap()
                for fd, mask in events:
                    if fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except OSError:
                            pass
                        continue
                    with self._lock:  # look it up now: an earlier callback may have changed it
                        reader, writer = self._handlers.get(fd, (None, None))
                        if fd in self._detached:
                            continue
                        wmask = _IN | _ERR if fd in self._wwr else _OUT | _ERR
                    if mask & (_IN | _ERR) and reader:
                        try:  # (_guard, inline: this runs once a message on a busy loop)
                            reader()
                        except Exception:
                            traceback.print_exc()
                    if mask & wmask and writer:
                        with self._lock:
                            cur = self._handlers.get(fd, (None, None))[1]
                        if cur is writer:
                            self._guard(writer)
                # (looked at without the lock first: a busy loop turns once a message, and
                # mostly finds neither; one added meanwhile is seen on the next turn, which
                # does not sleep: the timeout is 0 while calls wait, and timers set it)
                if self._calls:
                    with self._lock:
                        calls, self._calls = self._calls, deque()
                    for fn, args in calls:
                        self._guard(fn, *args)
                timers = self._timers
                if timers and timers[0][0] <= (now := time.monotonic()):
                    while True:
                        with self._lock:
                            if not timers or timers[0][0] > now:
                                break
                            _, _, t = heapq.heappop(timers)
                        if not t.cancelled:
                            self._guard(t.fn)
        finally:
            # what was handed over before stop() still runs: a Connection's close() hands
            # over its teardown, which closes its socket, and stop() may come right after
            with self._lock:
                calls, self._calls = self._calls, deque()
            for fn, args in calls:
                self._guard(fn, *args)
            self.flusher.close()
            self._ep.close()
            os.close(self._wake)

    def _armable(self) -> list[tuple[int, Any, Callback | None, Callback | None]]:
        """With the lock held: the ipc streams this loop reads, with their reader and
        writer, to spin on, run, and arm before it sleeps (ipc_run_streams and the arming
        leave out those a caller reads for now, `leased`: it spins on them itself, see
        IpcStream.take).  Kept until a registration changes (a new list: ipc_run_streams
        runs callbacks only while it is this one): a server's loop asks for it every turn."""
        if self._armable_cache is None:
            self._armable_cache = [
                (fd, s, *self._handlers[fd])
                for fd, s in self._wwr.items()
                if fd not in self._detached and self._handlers[fd][0] is not None
            ]
        return self._armable_cache

    @staticmethod
    def _guard(fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # one connection's bug must not stop the loop for the others
            traceback.print_exc()
