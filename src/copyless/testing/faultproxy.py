"""A fault-injecting proxy for stream sockets: test how an application survives the network.

    with FaultProxy("tcp://127.0.0.1:6800") as proxy:    # listens on tcp://127.0.0.1:<free port>
        conn = messenger.connect(proxy.address)
        proxy.cut_after(10_000)              # reset both sides once 10 kB more have passed
        proxy.delay(0.05)                    # 50 ms more latency per chunk, order kept
        proxy.pause(); proxy.resume()        # a partition: nothing passes, nothing closes
        proxy.drop(0.01, seed=1)             # discard chunks; corrupt(0.01, seed=2) flips bits
        proxy.wait_for(lambda s: s.connections_cut >= 1, timeout=5)

Every connection made to `address` is forwarded to the target, bytes both ways,
on one background thread running a selector loop (never a thread per
connection).  Addresses are the transports' (tcp://host:port, unix:///path,
unix://@name), and the two sides need not use the same transport.

Faults apply to chunks: what one recv() returned (at most `chunk_size` bytes).
Random faults draw from their own seeded generator, so a seed gives the same
sequence of decisions; where chunk boundaries fall still depends on timing.
Every control may be called from any thread; it takes effect on the proxy's
thread before the call returns.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
import selectors
import socket
import struct
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ..errors import ClosedError, ConfigurationError, Timeout
from ..transports import Listener, parse_address

__all__ = ["FaultProxy", "FaultProxyStatistics", "Direction"]

Direction = Literal["upstream", "downstream", "both"]
"""upstream: from the connecting client to the target; downstream: back."""

_DIRECTIONS = ("upstream", "downstream", "both")
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, as a failed network would look
_T = TypeVar("_T")


@dataclass(frozen=True)
class FaultProxyStatistics:
    connections_accepted: int  # proxied (refused ones are counted apart)
    connections_refused: int
    connections_active: int
    connections_cut: int  # closed by cut() or cut_after()
    bytes_upstream: int  # forwarded client -> target
    bytes_downstream: int  # forwarded target -> client
    chunks_dropped: int
    chunks_corrupted: int


class _Pipe:
    """One direction of one proxied connection: chunks read from src, waiting to be written to dst."""

    __slots__ = ("direction", "src", "dst", "chunks", "queued", "eof", "shut", "timer_at")

    def __init__(self, direction: str, src: socket.socket, dst: socket.socket) -> None:
        self.direction, self.src, self.dst = direction, src, dst
        self.chunks: deque[tuple[float, memoryview]] = deque()  # (when it may go, bytes), in order
        self.queued = 0
        self.eof = False  # src has said end-of-file
        self.shut = False  # ... and we passed it on (shutdown of dst's write side)
        self.timer_at = 0.0  # the wake-up already scheduled for the head chunk


class _Link:
    """One proxied connection: the accepted client socket and our socket to the target."""

    __slots__ = ("client", "server", "connecting", "up", "down", "masks", "closed")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None  # None until we connect (not while paused)
        self.connecting = False
        self.up: _Pipe | None = None
        self.down: _Pipe | None = None
        self.masks: dict[socket.socket, int] = {}  # what each socket is registered for
        self.closed = False


class _Command:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class FaultProxy:
    """Forwards connections on `address` to `target_address`, with faults on demand.

    `close()` (or leaving the `with` block) resets every proxied connection,
    stops the thread and releases every file descriptor.
    """

    def __init__(
        self,
        target_address: str,
        listen_address: str = "tcp://127.0.0.1:0",
        *,
        chunk_size: int = 65536,
        high_water: int = 1 << 20,
    ) -> None:
        if chunk_size < 1 or high_water < chunk_size:
            raise ConfigurationError("need 1 <= chunk_size <= high_water")
        self.target_address = target_address
        self._target = parse_address(target_address)
        self._chunk, self._high = chunk_size, high_water
        # the faults (only the proxy thread reads or writes these)
        self._delay = 0.0
        self._drop: tuple[float, random.Random] | None = None
        self._corrupt: tuple[float, random.Random] | None = None
        self._paused = False
        self._refusing = False
        self._cut_budget: int | None = None  # bytes that may still pass before a cut
        self._cut_direction: str = "both"
        self._cut_random: tuple[int, int, random.Random] | None = None  # re-arm after each cut
        # counters (written by the proxy thread; published under _cond)
        self._accepted = self._refused = self._cuts = 0
        self._bytes = {"upstream": 0, "downstream": 0}
        self._dropped = self._corrupted = 0
        self._links: set[_Link] = set()
        self._timers: list[tuple[float, int, _Link]] = []
        self._seq = itertools.count()

        self._listener = Listener(listen_address)
        try:
            self._sel = selectors.DefaultSelector()
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._listener.sock, selectors.EVENT_READ, self._listener)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()  # guards _commands and _closing
        self._commands: deque[_Command] = deque()
        self._closing = False
        self._stopped = False  # the thread has released everything
        self._cond = threading.Condition()
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._run, name=f"copyless-faultproxy-{self.address}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread
    @property
    def address(self) -> str:
        """Where to connect to go through the proxy (the port is filled in)."""
        return self._listener.address

    def cut(self) -> None:
        """Reset every proxied connection now, both sides (RST where the transport has one)."""
        self._call(self._cut_all)

    def cut_after(self, nbytes: int, direction: Direction = "both") -> None:
        """Cut every connection once `nbytes` more bytes have been forwarded in `direction`
        (counted over all connections).  Exactly that many pass, so a cut falls mid-frame.
        One shot; a new call replaces an armed one."""
        _check_direction(direction)
        if nbytes < 0:
            raise ConfigurationError("nbytes must be >= 0")

        def arm() -> None:
            self._cut_random = None
            self._arm(nbytes, direction)

        self._call(arm)

    def cut_randomly(self, low: int, high: int, seed: int | None = None, direction: Direction = "both") -> None:
        """Keep cutting: after every cut, the next one comes after a random number of bytes
        in [low, high] (drawn from a generator seeded with `seed`).  Stop with heal()."""
        _check_direction(direction)
        if not 0 < low <= high:
            raise ConfigurationError("need 0 < low <= high")
        rng = random.Random(seed)

        def arm() -> None:
            self._cut_random = (low, high, rng)
            self._arm(rng.randint(low, high), direction)

        self._call(arm)

    def delay(self, seconds: float) -> None:
        """Hold every chunk read from now on for `seconds` before passing it on (order is kept)."""
        if seconds < 0:
            raise ConfigurationError("delay must be >= 0")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    def drop(self, probability: float, seed: int | None = None) -> None:
        """Discard each chunk with this probability.  On a byte stream that breaks the framing,
        which a receiver must detect (by checksum or length) and close the connection on."""
        rule = _rule(probability, seed)
        self._call(lambda: setattr(self, "_drop", rule))

    def corrupt(self, probability: float, seed: int | None = None) -> None:
        """Flip one random bit in each chunk with this probability."""
        rule = _rule(probability, seed)
        self._call(lambda: setattr(self, "_corrupt", rule))

    def pause(self) -> None:
        """A partition: nothing passes either way (not even a close), nothing is closed.
        New connections are accepted but reach the target only after resume()."""
        self._call(lambda: self._set_paused(True))

    def resume(self) -> None:
        """End a partition: what was held goes on, in order."""
        self._call(lambda: self._set_paused(False))

    def refuse(self, refusing: bool = True) -> None:
        """Accept new connections and reset them at once (existing ones are untouched)."""
        self._call(lambda: setattr(self, "_refusing", bool(refusing)))

    def heal(self) -> None:
        """Remove every fault: no delay, drop, corruption, pending cut or refusal; resume."""

        def heal() -> None:
            self._delay, self._drop, self._corrupt, self._refusing = 0.0, None, None, False
            self._cut_budget = self._cut_random = None
            self._set_paused(False)

        self._call(heal)

    def statistics(self) -> FaultProxyStatistics:
        """A snapshot of the counters, taken on the proxy's thread (the final ones once closed)."""
        try:
            return self._call(self._snapshot)
        except ClosedError:
            with self._cond:
                return self._stats

    def wait_for(
        self, predicate: Callable[[FaultProxyStatistics], bool], timeout: float | None = None
    ) -> FaultProxyStatistics:
        """Block until predicate(statistics) holds; raises Timeout (or ClosedError if closed first)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: predicate(self._stats) or self._stopped, timeout)
            if not predicate(self._stats):
                if ok:
                    raise ClosedError("the fault proxy closed while waiting")
                raise Timeout(f"{self._stats} did not satisfy the condition within {timeout} s")
            return self._stats

    def close(self) -> None:
        """Reset every proxied connection, stop the thread, release every fd.  Idempotent."""
        with self._lock:
            self._closing = True
        self._poke()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.address} -> {self.target_address}>"

    # ------------------------------------------------------------ handing work to the proxy thread
    def _call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        cmd = _Command(fn)
        with self._lock:
            if self._closing:
                raise ClosedError("the fault proxy is closed")
            self._commands.append(cmd)
        self._poke()
        while not cmd.done.wait(0.5):
            if not self._thread.is_alive():
                raise ClosedError("the fault proxy's thread has stopped")
        if cmd.error is not None:
            raise cmd.error
        result: _T = cmd.result
        return result

    def _poke(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake-up is pending anyway) or already closed

    # ------------------------------------------------------------ the proxy thread
    def _run(self) -> None:
        try:
            while True:
                for key, mask in self._sel.select(self._timeout()):
                    if key.data is None:
                        self._drain_wakeups()
                    elif key.data is self._listener:
                        self._accept()
                    else:
                        self._guarded(key.data, self._on_io, key.data, key.fileobj, mask)
                with self._lock:
                    commands, self._commands = self._commands, deque()
                    closing = self._closing
                for cmd in commands:
                    try:
                        cmd.result = cmd.fn()
                    except BaseException as e:  # handed back to the caller
                        cmd.error = e
                    self._publish()
                    cmd.done.set()
                if closing:
                    break
                self._fire_timers()
                self._publish()
        except BaseException:  # pragma: no cover - a bug in the proxy: say so, and clean up
            traceback.print_exc()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            pending, self._commands = self._commands, deque()
        for cmd in pending:
            cmd.error = ClosedError("the fault proxy is closed")
            cmd.done.set()
        for link in list(self._links):
            self._close_link(link, reset=True)
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._publish()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _timeout(self) -> float | None:
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, link = heapq.heappop(self._timers)
            if not link.closed:
                self._guarded(link, self._pump, link)

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _guarded(self, link: _Link, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # pragma: no cover - a bug: lose that connection, keep the others
            traceback.print_exc()
            self._close_link(link, reset=True)

    def _snapshot(self) -> FaultProxyStatistics:
        return FaultProxyStatistics(
            connections_accepted=self._accepted,
            connections_refused=self._refused,
            connections_active=len(self._links),
            connections_cut=self._cuts,
            bytes_upstream=self._bytes["upstream"],
            bytes_downstream=self._bytes["downstream"],
            chunks_dropped=self._dropped,
            chunks_corrupted=self._corrupted,
        )

    def _publish(self) -> None:
        stats = self._snapshot()
        if stats != self._stats:
            with self._cond:
                self._stats = stats
                self._cond.notify_all()

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # out of fds, say: leave the rest in the backlog
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            if self._refusing:
                self._refused += 1
                _reset(sock)
                continue
            sock.setblocking(False)
            _nodelay(sock)
            self._accepted += 1
            link = _Link(sock)
            self._links.add(link)
            if not self._paused:
                self._connect(link)

    def _connect(self, link: _Link) -> None:
        family, sockaddr = self._target
        server = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        err = server.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):  # refused: so is the client
            server.close()
            self._close_link(link, reset=True)
            return
        _nodelay(server)
        link.server, link.connecting = server, True
        link.up = _Pipe("upstream", link.client, server)
        link.down = _Pipe("downstream", server, link.client)
        self._update(link, time.monotonic())  # writable once connected

    def _on_io(self, link: _Link, sock: socket.socket, mask: int) -> None:
        if link.closed:
            return
        if link.connecting:
            if sock is link.server and mask & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._close_link(link, reset=True)
                    return
                link.connecting = False
            self._pump(link)
            return
        assert link.up is not None and link.down is not None
        if mask & selectors.EVENT_READ and not self._paused:
            self._read(link, link.up if sock is link.client else link.down)
        if not link.closed:
            self._pump(link)

    def _read(self, link: _Link, pipe: _Pipe) -> None:
        if pipe.eof or pipe.queued >= self._high:
            return
        try:
            data = pipe.src.recv(min(self._chunk, self._high - pipe.queued))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the peer: reset the other side too
            self._close_link(link, reset=True)
            return
        if not data:
            pipe.eof = True
            return
        if self._drop is not None and self._drop[1].random() < self._drop[0]:
            self._dropped += 1
            return
        chunk = memoryview(data)
        if self._corrupt is not None and self._corrupt[1].random() < self._corrupt[0]:
            rng = self._corrupt[1]
            flipped = bytearray(data)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            chunk = memoryview(flipped)
            self._corrupted += 1
        when = time.monotonic() + self._delay
        if pipe.chunks:
            when = max(when, pipe.chunks[-1][0])  # a shorter delay never overtakes a longer one
        pipe.chunks.append((when, chunk))
        pipe.queued += len(chunk)

    def _pump(self, link: _Link) -> None:
        """Write what is due, pass on end-of-file, and register for what is needed next."""
        if link.closed:
            return
        now = time.monotonic()
        if not link.connecting and link.up is not None and link.down is not None:
            for pipe in (link.up, link.down):
                self._flush(link, pipe, now)
                if link.closed:
                    return
            if link.up.shut and link.down.shut:  # both sides closed cleanly
                self._close_link(link, reset=False)
                return
        self._update(link, now)

    def _flush(self, link: _Link, pipe: _Pipe, now: float) -> None:
        if self._paused:
            return
        while pipe.chunks:
            when, chunk = pipe.chunks[0]
            if when > now:
                if pipe.timer_at != when:
                    pipe.timer_at = when
                    heapq.heappush(self._timers, (when, next(self._seq), link))
                return
            budget = self._cut_budget if self._cut_direction in ("both", pipe.direction) else None
            n = len(chunk) if budget is None else min(len(chunk), budget)
            try:
                sent = pipe.dst.send(chunk[:n])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_link(link, reset=True)
                return
            pipe.queued -= sent
            self._bytes[pipe.direction] += sent
            if sent == len(chunk):
                pipe.chunks.popleft()
            else:
                pipe.chunks[0] = (when, chunk[sent:])
            if budget is not None and self._cut_budget is not None:
                self._cut_budget -= sent
                if self._cut_budget <= 0:
                    self._cut_due()
                    return
            if sent < n:
                return  # the socket is full: wait until it is writable
        if pipe.eof and not pipe.shut:
            pipe.shut = True
            try:
                pipe.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _update(self, link: _Link, now: float) -> None:
        """(Re)register the link's sockets for exactly what they are waiting for."""
        wanted: dict[socket.socket, int] = {link.client: 0}
        if link.server is not None:
            wanted[link.server] = 0
            if link.connecting:
                wanted[link.server] = selectors.EVENT_WRITE
            elif not self._paused:
                assert link.up is not None and link.down is not None
                for pipe in (link.up, link.down):
                    if not pipe.eof and pipe.queued < self._high:
                        wanted[pipe.src] |= selectors.EVENT_READ
                    if pipe.chunks and pipe.chunks[0][0] <= now:  # due, and the last send was short
                        wanted[pipe.dst] |= selectors.EVENT_WRITE
        for sock, mask in wanted.items():
            old = link.masks.get(sock, 0)
            if mask == old:
                continue
            if not mask:
                self._sel.unregister(sock)
            elif not old:
                self._sel.register(sock, mask, link)
            else:
                self._sel.modify(sock, mask, link)
            link.masks[sock] = mask

    def _close_link(self, link: _Link, reset: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for sock in (link.client, link.server):
            if sock is None:
                continue
            if link.masks.get(sock):
                self._sel.unregister(sock)
            if reset:
                _reset(sock)
            else:
                sock.close()
        link.masks.clear()
        if link.up is not None and link.down is not None:
            link.up.chunks.clear()
            link.down.chunks.clear()

    # ------------------------------------------------------------ faults
    def _cut_all(self) -> None:
        for link in list(self._links):
            self._close_link(link, reset=True)
            self._cuts += 1

    def _arm(self, nbytes: int, direction: str) -> None:
        self._cut_budget, self._cut_direction = nbytes, direction
        if nbytes == 0:
            self._cut_due()

    def _cut_due(self) -> None:
        self._cut_budget = None
        self._cut_all()
        if self._cut_random is not None:
            low, high, rng = self._cut_random
            self._cut_budget = rng.randint(low, high)

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        for link in list(self._links):
            if not paused and link.server is None:
                self._connect(link)
            elif not link.closed:
                self._pump(link)


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ConfigurationError(f"direction is one of {_DIRECTIONS}, not {direction!r}")


def _rule(probability: float, seed: int | None) -> tuple[float, random.Random] | None:
    if not 0.0 <= probability <= 1.0:
        raise ConfigurationError("probability is in [0, 1]")
    return (probability, random.Random(seed)) if probability else None


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset(sock: socket.socket) -> None:
    """Close like a failed network: RST for TCP (unread data is discarded, the peer gets ECONNRESET)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    sock.close()
