"""Publisher / Subscriber over shared memory (policy over the compiled core).

Rendezvous is a Unix SOCK_SEQPACKET socket named after the endpoint (in the
abstract namespace unless the name is a path), used only to hand over memfds
and to learn, from its closing, that a peer died.  The data path is the core's
rings: see docs/design.md.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _shm
from ._core import CTL_MAGIC as _CTL_MAGIC
from ._core import (
    DB_SIZE,
    POLICY_BLOCK,
    POLICY_OVERWRITE,
    POLICY_RAISE,
    WIRE_VERSION,
    Message,
    PubCore,
    SubCore,
    ctl_size,
)
from ._reactor import reactor
from .errors import (
    AccessDenied,
    ClosedError,
    ConfigurationError,
    MessageTooLarge,
    NameInUse,
    PeerClosed,
    PeerLost,
    RemoteProtocolError,
    Timeout,
    VersionMismatch,
    WouldBlock,
)

__all__ = ["Publisher", "Subscriber", "Message", "PublisherStatistics", "SubscriberStatistics"]

# ---------------------------------------------------------------- control messages
_HELLO = struct.Struct("<4sII")  # b"CLSB", version, pid            + fd: subscriber's eventfd
_WELCOME = struct.Struct("<4sIIIIIQQ")  # b"CLPB", version, n_slots, slot_size, n_large, pid, arena, ctl + 3 fds
_SEGMENT = struct.Struct("<4sIIQ")  # b"CLSG", block, gen, size   + fd
_DROP = struct.Struct("<4sII")  # b"CLDR", block, gen
_REFUSE = struct.Struct("<4sI")  # b"CLNO", code, then utf-8 reason
REFUSE_VERSION, REFUSE_ACCESS, REFUSE_FULL, REFUSE_PROTOCOL = 1, 2, 3, 4

_POLICIES = {"block": POLICY_BLOCK, "raise": POLICY_RAISE, "overwrite": POLICY_OVERWRITE}
DEFAULT_SPIN = 50e-6  # see docs/design.md "How long to spin"


def _address(name: str) -> tuple[str | bytes, str | None]:
    """(socket address, filesystem path or None) for an endpoint name."""
    if not name or "\0" in name:
        raise ConfigurationError(f"bad endpoint name {name!r}")
    if "/" in name:  # a path: visible in the filesystem, stale files replaced
        return name, name
    raw = f"\0copyless/{name}".encode()
    if len(raw) > 107:
        raise ConfigurationError(f"endpoint name too long: {name!r}")
    return raw, None


def _peercred(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def _allowed(uid: int, gid: int, uids: frozenset[int], gids: frozenset[int]) -> bool:
    return uid in uids or gid in gids


def _recv_fds(sock: socket.socket, bufsize: int, maxfds: int, flags: int = 0) -> tuple[bytes, list[int]]:
    """recvmsg with SCM_RIGHTS.  (socket.recv_fds of Python 3.11 ignores its flags argument.)"""
    msg, ancdata, _, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * 4), flags | socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4]))
    return msg, fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _weakly(obj: object, method: str, *args: Any) -> Callable[[], None]:
    """A callback that calls obj.method(*args) while obj lives: the housekeeping
    thread must not keep an endpoint alive (its __del__ closes it)."""
    ref = weakref.ref(obj)

    def call() -> None:
        target = ref()
        if target is not None:
            getattr(target, method)(*args)

    return call


@functools.cache
def _llc_bytes() -> int:
    """Size of this machine's last-level data cache from sysfs, 0 if unknown.

    Not sysconf(_SC_LEVEL3_CACHE_SIZE): glibc derives that from CPUID, which a
    VM can misreport (384 MiB on our 2-core VM, whose L3 is 32 MiB)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = (0, 0)
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/type") as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            size = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
            best = max(best, (level, size))
    except (OSError, ValueError, IndexError):
        return 0
    return best[1]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class PublisherStatistics:
    messages: int
    bytes: int
    overwritten: int
    wakeups: int
    blocked: int
    would_block: int
    loans: int
    slots_in_use: int
    large_in_use: int
    large_segments: int
    subscribers: int
    protocol_errors: int
    per_subscriber: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SubscriberStatistics:
    messages: int
    bytes: int
    gaps: int
    sleeps: int
    wakeups_sent: int
    in_flight: int
    queued: int


class _Large:
    """A large segment's fd (sent to each subscriber once); the core holds its mapping."""

    __slots__ = ("fd", "size", "gen")

    def __init__(self, fd: int, size: int, gen: int) -> None:
        self.fd, self.size, self.gen = fd, size, gen


class _Peer:
    """The publisher's view of one subscriber connection."""

    __slots__ = ("sock", "pid", "uid", "index", "evfd", "known", "attached")

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock, self.pid, self.uid = sock, pid, uid
        self.index = -1
        self.evfd = -1
        self.known: dict[int, int] = {}  # large block -> gen whose fd this subscriber has
        self.attached = False


class Publisher(PubCore):
    """The sending end of a named shared-memory channel, fanning out to every subscriber.

    slot_size/slots: the pool for ordinary messages (each at most slot_size bytes);
    larger messages get segments of their own, cached up to large_budget bytes.
    large_queue: how many large messages may wait unreceived before a send waits
    for a subscriber instead of making another segment (more would only spill the
    caches; messages subscribers hold do not count).
    queue_depth: descriptors queued per subscriber.  on_full: what a send does
    when a subscriber is behind: "block" (default, up to send_timeout), "raise"
    (WouldBlock), or "overwrite" (drop that subscriber's oldest unreceived message).
    """

    def __init__(
        self,
        name: str,
        *,
        slot_size: int = 8192,
        slots: int = 1024,
        queue_depth: int = 1024,
        on_full: str = "block",
        send_timeout: float | None = None,
        large_budget: int = 1 << 30,
        large_blocks: int = 64,
        large_queue: int = 2,
        max_message: int = 1 << 34,
        max_subscribers: int = 64,
        allow_uids: list[int] | None = None,
        allow_gids: list[int] | None = None,
        spin: float = 0.0,
    ) -> None:
        if on_full not in _POLICIES:
            raise ConfigurationError(f"on_full must be one of {sorted(_POLICIES)}")
        if slot_size <= 0 or slot_size % 64 or slots <= 0 or queue_depth <= 0 or max_subscribers <= 0:
            raise ConfigurationError("slot_size must be a positive multiple of 64; slots, queue_depth > 0")
        if large_blocks < 1 or large_budget <= 0 or large_queue < 1:
            raise ConfigurationError("large_blocks, large_budget and large_queue must be positive")
        self._name = name
        self._addr, self._path = _address(name)
        self._closed = True  # until fully built
        self._lock = threading.RLock()
        self._attached_cv = threading.Condition(self._lock)
        self._peers: dict[socket.socket, _Peer] = {}
        self._by_index: dict[int, _Peer] = {}
        self._large: dict[int, _Large] = {}
        self._large_free_ids = list(range(slots + large_blocks - 1, slots - 1, -1))
        self._large_budget = large_budget
        self._max_message = max_message
        self._send_timeout = send_timeout
        self._large_queue = large_queue
        self._protocol_errors = 0
        self._uids = frozenset([os.geteuid()] + list(allow_uids or []))
        self._gids = frozenset(allow_gids or [])
        self._desc_cap = _pow2(queue_depth)
        self._rel_cap = _pow2(slots + large_blocks)
        self._ctl_size = ctl_size(self._desc_cap, self._rel_cap)
        self._slot_size = slot_size
        self._n_slots = slots
        self._n_large = large_blocks
        self._max_subs = max_subscribers
        self._fds: list[int] = []
        self._listener = self._bind()
        try:
            self._arena_size = _shm.page_round(4096 + slots * slot_size)
            arena_fd, arena = _shm.create(f"{name}:arena", self._arena_size, readonly_for_peers=True)
            self._fds.append(arena_fd)
            db_fd, doorbell = _shm.create(f"{name}:doorbell", DB_SIZE, readonly_for_peers=False)
            self._fds.append(db_fd)
            self._arena_fd, self._db_fd = arena_fd, db_fd
            PubCore.__init__(
                self, arena, doorbell, slots, slot_size, large_blocks, max_subscribers, _POLICIES[on_full], send_timeout
            )
        except BaseException:
            self._listener.close()
            _close_fds(self._fds)
            raise
        self.spin = spin
        # send() streams a copy past the caches once it and the segments in flight (the source
        # plus two segments) no longer fit in the last-level cache: see copy_payload in _core.c
        self._stream_from = _llc_bytes() // 3
        self._closed = False
        reactor.register(self._listener, _weakly(self, "_on_accept"))

    # ------------------------------------------------------------ rendezvous
    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            try:
                sock.bind(self._addr)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                if self._path is None or self._path_is_live():
                    raise NameInUse(f"a live publisher already owns {self._name!r}") from None
                os.unlink(self._path)  # left by a publisher that died: replace it
                sock.bind(self._addr)
            sock.listen(64)
            # to remove the file at close only if it is still ours
            self._path_ino = os.stat(self._path).st_ino if self._path else 0
        except BaseException:
            sock.close()
            raise
        return sock

    def _path_is_live(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self._addr)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        finally:
            probe.close()

    def _on_accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(False)
            pid, uid, gid = _peercred(conn)
            peer = _Peer(conn, pid, uid)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                if not _allowed(uid, gid, self._uids, self._gids):
                    self._refuse(peer, REFUSE_ACCESS, f"uid {uid} gid {gid} may not subscribe to {self._name!r}")
                    continue
                self._peers[conn] = peer
            reactor.register(conn, _weakly(self, "_on_peer_readable", peer))

    def _refuse(self, peer: _Peer, code: int, reason: str) -> None:
        try:
            # unread data at close would reset the connection and hide the reason from the peer
            while True:
                data, fds = _recv_fds(peer.sock, 4096, 4, socket.MSG_DONTWAIT)
                _close_fds(fds)
                if not data:
                    break
        except OSError:
            pass
        try:
            peer.sock.send(_REFUSE.pack(b"CLNO", code) + reason.encode())
        except OSError:
            pass
        peer.sock.close()

    def _on_peer_readable(self, peer: _Peer) -> None:
        try:
            data, fds = _recv_fds(peer.sock, 256, 4)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if peer.attached or not data:
            _close_fds(fds)
            # EOF: the subscriber closed or died; anything else after the hello is a protocol error
            self._drop(peer, None if not data else "unexpected data on the control socket")
            return
        try:
            self._attach(peer, data, fds)
        except Exception as e:  # refuse this subscriber only
            _close_fds(fds)
            self._drop(peer, f"handshake failed: {e}")

    def _attach(self, peer: _Peer, data: bytes, fds: list[int]) -> None:
        if len(data) != _HELLO.size or len(fds) != 1:
            raise RemoteProtocolError("malformed hello")
        magic, version, _pid = _HELLO.unpack(data)
        if magic != b"CLSB":
            raise RemoteProtocolError("not a copyless subscriber")
        with self._lock:
            if version != WIRE_VERSION:
                self._forget(peer)
                _close_fds(fds)
                self._refuse(peer, REFUSE_VERSION, f"publisher speaks version {WIRE_VERSION}, subscriber {version}")
                return
            free = [i for i in range(self._max_subs) if i not in self._by_index]
            if self._closed or not free:
                self._forget(peer)
                _close_fds(fds)
                self._refuse(peer, REFUSE_FULL, f"{self._name!r} has its maximum of {self._max_subs} subscribers")
                return
            peer.evfd = fds[0]
            fds.clear()  # the peer owns it now (closed by _drop)
            ctl_fd, ctl = _shm.create(f"{self._name}:ctl", self._ctl_size, readonly_for_peers=False)
            try:
                hdr = memoryview(ctl).cast("I")
                hdr[0], hdr[1], hdr[2], hdr[3] = _CTL_MAGIC, WIRE_VERSION, self._desc_cap, self._rel_cap
                hdr.release()
                # into the fan-out first: what is sent from now on queues until it maps the ring
                peer.index = free[0]
                self._add_sub(peer.index, ctl, peer.evfd)
                self._by_index[peer.index] = peer
                peer.attached = True
                welcome = _WELCOME.pack(
                    b"CLPB",
                    WIRE_VERSION,
                    self._n_slots,
                    self._slot_size,
                    self._n_large,
                    os.getpid(),
                    self._arena_size,
                    self._ctl_size,
                )
                socket.send_fds(peer.sock, [welcome], [self._arena_fd, self._db_fd, ctl_fd])
            finally:
                os.close(ctl_fd)
            # every cached large segment, so no descriptor can name one it lacks
            for block, lg in self._large.items():
                self._send_ctl(peer, _SEGMENT.pack(b"CLSG", block, lg.gen, lg.size), [lg.fd])
                peer.known[block] = lg.gen
            self._attached_cv.notify_all()

    def _send_ctl(self, peer: _Peer, data: bytes, fds: list[int]) -> None:
        """Send a control message; a subscriber too far behind to take it in 1 s is dropped."""
        deadline = time.monotonic() + 1.0
        while True:
            try:
                socket.send_fds(peer.sock, [data], fds) if fds else peer.sock.send(data)
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteProtocolError("subscriber does not read its control socket") from None
                select.select([], [peer.sock], [], left)

    def _forget(self, peer: _Peer) -> None:
        self._peers.pop(peer.sock, None)
        reactor.unregister(peer.sock)

    def _drop(self, peer: _Peer, error: str | None) -> None:
        """Disconnect a subscriber and take back everything it held."""
        with self._lock:
            if peer.sock not in self._peers:
                return
            self._forget(peer)
            if peer.attached:
                del self._by_index[peer.index]
                self._remove_sub(peer.index, error is None)
            if error is not None:
                self._protocol_errors += 1
                self._refuse(peer, REFUSE_PROTOCOL, error)
            else:
                peer.sock.close()
            _close_fds([peer.evfd] if peer.evfd >= 0 else [])
            peer.evfd = -1

    def _drop_bad(self, index: int) -> None:  # called by the core
        peer = self._by_index.get(index)
        if peer is not None:
            self._drop(peer, "bad release or ring index from this subscriber")
        else:
            self._remove_sub(index, False)

    # ------------------------------------------------------------ sending
    def _send_strided(self, obj: Any, type: int, tag: int, timeout: float | None) -> int:
        """send() of a source that is no contiguous buffer (a strided view): called by the core.
        Compacting it costs one copy more; the core then sends the compact copy."""
        return int(self.send(memoryview(obj).tobytes(), type, tag, timeout=timeout))

    def _alloc_large(self, n: int, timeout: float | None) -> int:
        """A block for a message bigger than a slot (called by the core when no cached segment fits)."""
        if n > self._max_message:
            raise MessageTooLarge(f"{n} bytes is over this publisher's max_message of {self._max_message}")
        self._check_open()
        size = max(_pow2(n), _shm.PAGE)
        if timeout is None:
            timeout = self._send_timeout  # as the core does for small messages
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                block = self._take_large(size)
                if block is not None:
                    return block
            if timeout == 0 or self._policy_raises():
                raise WouldBlock("publisher: large-message budget in use (subscribers hold it)")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout("publisher: timed out waiting for large-message space")
            self._doze(0.05 if left is None else min(left, 0.05))

    def _policy_raises(self) -> bool:
        return bool(self._policy == POLICY_RAISE)

    def _take_large(self, size: int) -> int | None:
        """A free large block of exactly `size` bytes, creating (and evicting) segments as the budget allows."""
        # take in what subscribers released first: otherwise a segment just released looks
        # busy, and a fresh one costs a page fault per page on its first write
        self._reclaim()
        free, used_bytes, cached_bytes = [], 0, 0
        for block, lg in self._large.items():
            refs = self._block_state(block)[0]
            if refs == 0:
                if lg.size == size:
                    self._claim_large(block)
                    return block
                free.append(block)
                cached_bytes += lg.size
            else:
                used_bytes += lg.size
        if used_bytes and used_bytes + size > self._large_budget:
            return None  # wait for subscribers to release (one message alone may exceed the budget)
        if used_bytes and self._queued_large() >= self._large_queue:
            return None  # subscribers are behind: wait for them rather than grow the working set
        # evict free segments until the new one fits in the budget and has an id
        free.sort(key=lambda b: self._large[b].size, reverse=True)
        while free and (used_bytes + cached_bytes + size > self._large_budget or not self._large_free_ids):
            block = free.pop()
            cached_bytes -= self._large[block].size
            self._evict(block)
        if not self._large_free_ids:
            return None
        block = self._large_free_ids.pop()
        fd, mapping = _shm.create(f"{self._name}:large", size, readonly_for_peers=True)
        gen = self._install_large(block, mapping)
        self._large[block] = _Large(fd, size, gen)
        for peer in list(self._by_index.values()):
            try:
                self._send_ctl(peer, _SEGMENT.pack(b"CLSG", block, gen, size), [fd])
                peer.known[block] = gen
            except (RemoteProtocolError, OSError) as e:
                self._drop(peer, str(e))
        self._claim_large(block)
        return block

    def _evict(self, block: int) -> None:
        lg = self._large.pop(block)
        self._install_large(block, None)
        for peer in list(self._by_index.values()):
            if peer.known.pop(block, None) is not None:
                try:
                    self._send_ctl(peer, _DROP.pack(b"CLDR", block, lg.gen), [])
                except (RemoteProtocolError, OSError) as e:
                    self._drop(peer, str(e))
        os.close(lg.fd)
        self._large_free_ids.append(block)

    # ------------------------------------------------------------ the rest of the API
    @property
    def name(self) -> str:
        return self._name

    @property
    def subscriber_count(self) -> int:
        return len(self._by_index)

    @property
    def slot_size(self) -> int:
        return self._slot_size

    def wait_for_subscribers(self, n: int = 1, timeout: float | None = None) -> None:
        """Block until at least n subscribers are attached (Timeout otherwise)."""
        with self._attached_cv:
            if not self._attached_cv.wait_for(lambda: len(self._by_index) >= n or self._closed, timeout):
                raise Timeout(f"{len(self._by_index)} of {n} subscribers attached in time")
        self._check_open()

    def statistics(self) -> PublisherStatistics:
        with self._lock:
            if not self._closed:
                self._reclaim()
            st = self._core_stats()
            # keyed by subscriber pid: the index is an internal detail
            st["per_subscriber"] = {p.pid: st["per_subscriber"].get(i, {}) for i, p in self._by_index.items()}
            return PublisherStatistics(**st, large_segments=len(self._large), protocol_errors=self._protocol_errors)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"publisher {self._name!r} is closed")

    def close(self) -> None:
        """Tell subscribers we are done (they drain, then get PeerClosed) and free everything."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_core()
            peers = list(self._peers.values())
            self._attached_cv.notify_all()
        reactor.unregister(self._listener)
        for peer in peers:
            reactor.unregister(peer.sock)
            peer.sock.close()
            _close_fds([peer.evfd] if peer.evfd >= 0 else [])
        self._peers.clear()
        self._by_index.clear()
        if self._path is not None:
            try:
                if os.stat(self._path).st_ino == self._path_ino:
                    os.unlink(self._path)
            except OSError:
                pass
        self._listener.close()
        for lg in self._large.values():
            os.close(lg.fd)
        self._large.clear()
        _close_fds(self._fds)
        self._fds = []

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._by_index)} subscribers"
        return f"<copyless.Publisher {self._name!r} {state}>"


class Subscriber(SubCore):
    """The receiving end: messages arrive as read-only memoryviews into the publisher's shared memory.

    timeout: how long to wait for the publisher to appear (None: forever).
    spin: seconds to busy-poll before sleeping on the futex.
    """

    def __init__(
        self,
        name: str,
        *,
        timeout: float | None = None,
        spin: float = DEFAULT_SPIN,
        allow_uids: list[int] | None = None,
        allow_gids: list[int] | None = None,
    ) -> None:
        self._name = name
        self._addr, self._path = _address(name)
        self._sock: socket.socket | None = None
        self._closed = False
        self._lost: tuple[type[PeerLost], str] | None = None
        self._uids = frozenset([os.geteuid()] + list(allow_uids or []))
        self._gids = frozenset(allow_gids or [])
        self.spin = spin
        self._evfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._connect(timeout)
        except BaseException:
            os.close(self._evfd)
            self._closed = True
            raise

    # ------------------------------------------------------------ attach
    def _connect(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self._addr)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                sock.close()
            except BaseException:
                sock.close()
                raise
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"no publisher named {self._name!r} appeared in time")
            time.sleep(delay if left is None else min(delay, left))
            delay = min(delay * 2, 0.05)
        try:
            self._handshake(sock, deadline)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._lost = None

    def _handshake(self, sock: socket.socket, deadline: float | None) -> None:
        _pid, uid, gid = _peercred(sock)
        if not _allowed(uid, gid, self._uids, self._gids):
            raise AccessDenied(f"publisher {self._name!r} runs as uid {uid}, not an allowed one")
        try:
            socket.send_fds(sock, [_HELLO.pack(b"CLSB", WIRE_VERSION, os.getpid())], [self._evfd])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before our hello: the reason is waiting to be read below
        left = 10.0 if deadline is None else max(0.001, deadline - time.monotonic())
        sock.settimeout(left)
        try:
            data, fds = _recv_fds(sock, 4096, 4)
        except TimeoutError:
            raise Timeout(f"publisher {self._name!r} did not answer the handshake") from None
        except OSError as e:
            raise PeerLost(f"publisher {self._name!r} went away during the handshake: {e}") from e
        finally:
            sock.settimeout(None)
        try:
            if data[:4] == b"CLNO":
                code = _REFUSE.unpack_from(data)[1]
                reason = data[_REFUSE.size :].decode(errors="replace")
                exc = {REFUSE_VERSION: VersionMismatch, REFUSE_ACCESS: AccessDenied}.get(code, RemoteProtocolError)
                raise exc(reason)
            if not data:
                raise PeerLost(f"publisher {self._name!r} went away during the handshake")
            if len(data) != _WELCOME.size or len(fds) != 3:
                raise RemoteProtocolError("malformed welcome")
            magic, version, n_slots, slot_size, n_large, _ppid, arena_size, ctl_sz = _WELCOME.unpack(data)
            if magic != b"CLPB":
                raise RemoteProtocolError("not a copyless publisher")
            if version != WIRE_VERSION:
                raise VersionMismatch(f"publisher speaks version {version}, we speak {WIRE_VERSION}")
            arena = _shm.map_peer(fds[0], arena_size, writable=False)
            doorbell = _shm.map_peer(fds[1], DB_SIZE, writable=True)
            ctl = _shm.map_peer(fds[2], ctl_sz, writable=True)
            self._attach(ctl, arena, doorbell, n_slots, slot_size, n_large)
        finally:
            _close_fds(fds)

    def reattach(self, timeout: float | None = None) -> None:
        """After PeerLost: wait for a (restarted) publisher of the same name and attach to it."""
        self._check_open()
        self._drop_connection()
        self._connect(timeout)

    def _drop_connection(self) -> None:
        self._detach()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------ control socket
    def _read_ctl(self, block: bool, timeout: float = 5.0) -> bool:
        """Handle one control message.  False if none was waiting (non-blocking), raises on EOF."""
        sock = self._sock
        if sock is None:
            raise PeerLost(f"publisher {self._name!r} is gone")
        if block:
            r, _, _ = select.select([sock], [], [], timeout)
            if not r:
                raise RemoteProtocolError("publisher named a segment it never sent")
        try:
            data, fds = _recv_fds(sock, 4096, 4, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            raise PeerLost(f"publisher {self._name!r}: {e}") from e
        try:
            if not data:
                raise PeerLost(f"publisher {self._name!r} died")
            magic = data[:4]
            if magic == b"CLSG" and len(data) == _SEGMENT.size and len(fds) == 1:
                _, block_id, gen, size = _SEGMENT.unpack(data)
                self._set_large(block_id, gen, _shm.map_peer(fds[0], size, writable=False))
            elif magic == b"CLDR" and len(data) == _DROP.size:
                _, block_id, gen = _DROP.unpack(data)
                self._set_large(block_id, 0, None)
            elif magic == b"CLNO":
                reason = data[_REFUSE.size :].decode(errors="replace")
                raise PeerLost(f"publisher {self._name!r} disconnected us: {reason}")
            else:
                raise RemoteProtocolError(f"unknown control message {magic!r}")
        finally:
            _close_fds(fds)
        return True

    def _fetch_segment(self, block: int, gen: int) -> None:  # called by the core
        # the publisher sends a segment's fd before any descriptor that names it
        while self._large_gen(block) != gen:
            self._read_ctl(block=True)

    # ------------------------------------------------------------ receiving
    def _peer_state(self) -> None:
        """Raise PeerClosed/PeerLost if the publisher is gone (call only with the ring empty)."""
        if self._closed:
            raise ClosedError(f"subscriber {self._name!r} is closed")
        if self._lost is None:
            self._lost = self._find_loss()
        if self._lost is not None:
            # a fresh exception each time: a stored one would collect tracebacks (and their frames)
            cls, text = self._lost
            raise cls(text)

    def _find_loss(self) -> tuple[type[PeerLost], str] | None:
        sock = self._sock
        if sock is None:
            return PeerLost, f"not attached to {self._name!r}"
        if self._pub_closed():
            return PeerClosed, f"publisher {self._name!r} closed"
        p = select.poll()
        p.register(sock, select.POLLIN | select.POLLRDHUP)
        for _, ev in p.poll(0):
            if ev & select.POLLIN:
                try:
                    while self._read_ctl(block=False):
                        pass
                except PeerLost as e:
                    return type(e), str(e)
            if ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                return PeerLost, f"publisher {self._name!r} died"
        return None

    def _recv_slow(self, timeout: float | None) -> Message:  # called by the core when the ring is empty
        deadline = None if timeout is None else time.monotonic() + timeout
        idle = False
        while True:
            msg = self._try_recv()
            if msg is not None:
                return msg
            # liveness costs a system call: look only after a whole wait slice with no traffic
            if idle or self._lost is not None or self._pub_closed():
                msg = self._check_peer_or_last()
                if msg is not None:
                    return msg
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"nothing from {self._name!r} within {timeout} s")
            idle = not self._wait(0.2 if left is None else min(left, 0.2))

    def _check_peer_or_last(self) -> Message | None:
        """None if the publisher is alive; a message it published just before going; else raise."""
        try:
            self._peer_state()
        except PeerLost:
            msg = self._try_recv()
            if msg is not None:
                return msg
            raise
        return None

    def __iter__(self) -> Subscriber:
        return self

    def __next__(self) -> Message:
        try:
            return self.recv()
        except PeerClosed:
            raise StopIteration from None

    # ------------------------------------------------------------ the rest of the API
    @property
    def name(self) -> str:
        return self._name

    def statistics(self) -> SubscriberStatistics:
        return SubscriberStatistics(**self._core_stats())

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"subscriber {self._name!r} is closed")

    def close(self) -> None:
        """Detach: the publisher takes back every slot this subscriber held."""
        if self._closed:
            return
        self._closed = True
        self._drop_connection()
        os.close(self._evfd)
        self._evfd = -1

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<copyless.Subscriber {self._name!r}{' closed' if self._closed else ''}>"
