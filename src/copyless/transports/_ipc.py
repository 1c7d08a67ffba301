"""ipc://NAME: a byte stream between two processes on one host, over shared memory.

    lst = listen("ipc://store.1")                 # an abstract unix socket: no file anywhere
    c = connect("ipc://store.1?ring=4MiB&spin=50us")
    s = lst.accept(); drive s.handshake() and c.handshake() until both say True
    c.send_buffers([...]); s.recv_into(buf)      # copied once: caller's buffers -> ring -> buf

Each side creates one sealed memfd (a control page, then its TX byte ring),
maps it read-write, and hands it to the peer during the setup exchange; the
peer maps it read-only.  The ring operations and the wake-up protocol are in
the compiled core (`copyless._core.IpcChannel`).  The unix socket stays open
for the life of the stream: it is how a sleeping side is woken (one byte) and
how it learns that the peer died (EOF).  The setup exchange and the control
page are specified in docs/protocol.md; why it is built so, in docs/design.md.

Address options (each side sets its own): `ring` (bytes in this side's TX
ring, a power of two, 4KiB..1GiB, suffixes KiB/MiB/GiB), `spin` (how long a
caller waiting for a reply spins before it sleeps: s, ms, us, ns).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
from urllib.parse import parse_qsl

from .. import _shm
from .._core import IPC_MAGIC, IPC_MAX_CAPACITY, IPC_MIN_CAPACITY, IPC_RING, IPC_VERSION, IpcChannel, Mapping
from .._pubsub import _close_fds, _peercred, _recv_fds
from ..errors import AccessDenied, ConfigurationError, NameInUse, PeerLost, RemoteProtocolError, VersionMismatch
from . import Listener, Stream

DEFAULT_RING = 256 << 10  # per direction; see docs/design.md "ipc://: ring size" for how it was chosen
DEFAULT_SPIN = 100e-6  # see docs/design.md "ipc://: how long to spin"

# The setup exchange: fixed 128-byte records (docs/protocol.md).  The first eight bytes
# (magic, version) keep their place in every version.
SETUP = struct.Struct("<4sIIIQQQ")  # magic, version, pid, code, segment size, ring capacity, flags
SETUP_SIZE = 128
REASON_SIZE = SETUP_SIZE - SETUP.size
HELLO, WELCOME, REFUSE = b"CLIH", b"CLIW", b"CLNO"
REFUSE_VERSION, REFUSE_ACCESS, REFUSE_PROTOCOL = 1, 2, 3
_REFUSALS: dict[int, type[Exception]] = {REFUSE_VERSION: VersionMismatch, REFUSE_ACCESS: AccessDenied}

_NAME = re.compile(r"[A-Za-z0-9._:@+=-]{1,80}")
_SIZE = re.compile(r"(\d+)\s*(|k|kib|m|mib|g|gib)", re.I)
_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
_TIME = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|ns)?", re.I)
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, None: 1.0}


class IpcAddress:
    """A parsed ipc:// address: the name, and this side's options."""

    __slots__ = ("name", "ring", "spin", "text")

    def __init__(self, address: str) -> None:
        if not address.startswith("ipc://"):
            raise ConfigurationError(f"not an ipc:// address: {address!r}")
        name, _, query = address[6:].partition("?")
        if not _NAME.fullmatch(name):
            raise ConfigurationError(f"ipc name must be 1-80 of A-Z a-z 0-9 . _ : @ + = -: {address!r}")
        self.name, self.ring, self.spin, self.text = name, DEFAULT_RING, DEFAULT_SPIN, address
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
            if key == "ring":
                m = _SIZE.fullmatch(value.strip())
                ring = int(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0
                if not IPC_MIN_CAPACITY <= ring <= IPC_MAX_CAPACITY or ring & (ring - 1):
                    raise ConfigurationError(f"ipc ring must be a power of two from 4KiB to 1GiB: {value!r}")
                self.ring = ring
            elif key == "spin":
                t = _TIME.fullmatch(value.strip())
                if not t:
                    raise ConfigurationError(f"ipc spin is a duration (50us, 1ms, 0): {value!r}")
                self.spin = float(t.group(1)) * _SECONDS[t.group(2) and t.group(2).lower()]
            else:
                raise ConfigurationError(f"unknown ipc option {key!r} in {address!r} (ring, spin)")

    def sockaddr(self, uid: int | None = None) -> bytes:
        """The abstract socket the listener binds: per user, so two users' names never meet."""
        return f"\0copyless-ipc/{os.geteuid() if uid is None else uid}/{self.name}".encode()


def _setup_record(magic: bytes, code: int = 0, size: int = 0, ring: int = 0, reason: str = "") -> bytes:
    text = reason.encode()[:REASON_SIZE]
    return SETUP.pack(magic, IPC_VERSION, os.getpid(), code, size, ring, 0) + text.ljust(REASON_SIZE, b"\0")


def _new_segment(name: str, ring: int) -> tuple[int, Mapping]:
    size = IPC_RING + ring
    fd, mapping = _shm.create(f"ipc:{name}", size, readonly_for_peers=True)
    hdr = memoryview(mapping).cast("B")
    struct.pack_into("<IIQQ", hdr, 0, IPC_MAGIC, IPC_VERSION, ring, IPC_RING)
    hdr.release()
    return fd, mapping


class IpcStream(Stream):
    """One end of an ipc:// stream.  fileno() is the unix socket: it turns readable when a
    wake byte came (data to read, or room for a writer that waited) or the peer is gone,
    so writers wait for readability too (write_wakes_read)."""

    write_wakes_read = True

    def __init__(self, sock: socket.socket, peer: str, addr: IpcAddress, server: bool) -> None:
        super().__init__(sock, peer)
        self.addr, self.server, self.spin = addr, server, addr.spin
        # How long an I/O loop reading this stream spins before it sleeps.  A server's
        # loop waits for requests: it spins.  A client's loop sees only acks and
        # unsolicited messages (its callers read their own replies, and spin there):
        # it does not, or on a 2-core host three spinners (caller, client loop, server
        # loop) share two cores and each reply waits for a time slice.
        self.loop_spin = addr.spin if server else 0.0
        self.channel: IpcChannel | None = None
        self._mine: Mapping | None = None  # our segment's mapping until the channel holds it
        self._peer_seg: Mapping | None = None  # the peer's, mapped read-only
        self._got = bytearray()  # a setup record being received
        self._fds: list[int] = []  # fds that came with it
        self._error: BaseException | None = None  # found by connect(), raised by handshake()
        self._closed = False

    # ---------------------------------------------------------- setup
    def _send_record(self, record: bytes, fd: int | None = None) -> None:
        if fd is None:
            self.sock.send(record)
        else:
            socket.send_fds(self.sock, [record], [fd])

    def _recv_record(self) -> bytes | None:
        """The peer's setup record once all of it is here (None: not yet).  Reads exactly
        one record, so a wake byte that follows it stays in the socket."""
        while len(self._got) < SETUP_SIZE:
            try:
                data, fds = _recv_fds(self.sock, SETUP_SIZE - len(self._got), 2, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except ConnectionError as e:
                raise PeerLost(f"{self.peer} went away during the ipc setup: {e}") from e
            self._fds += fds
            if not data:
                raise PeerLost(f"{self.peer} went away during the ipc setup")
            self._got += data
        return bytes(self._got)

    def _check_creds(self) -> None:
        _pid, uid, _gid = _peercred(self.sock)
        if uid != os.geteuid():
            raise AccessDenied(f"{self.peer} runs as uid {uid}; ipc:// takes only its own user ({os.geteuid()})")

    def _refuse(self, code: int, error: Exception) -> Exception:
        try:
            self._send_record(_setup_record(REFUSE, code, reason=str(error)))
        except OSError:
            pass
        return error

    def _take_peer_segment(self, record: bytes, expect: bytes) -> None:
        magic, version, pid, code, size, ring, _flags = SETUP.unpack_from(record)
        if magic == REFUSE and not self.server:
            reason = record[SETUP.size :].rstrip(b"\0").decode(errors="replace")
            raise _REFUSALS.get(code, RemoteProtocolError)(f"{self.addr.name!r} refused us: {reason}")
        if magic != expect:
            raise self._refuse(REFUSE_PROTOCOL, RemoteProtocolError(f"not a copyless ipc peer (magic {magic!r})"))
        if version != IPC_VERSION:
            mismatch = VersionMismatch(f"ipc setup version {version}, we speak {IPC_VERSION}")
            raise self._refuse(REFUSE_VERSION, mismatch)
        if len(self._fds) != 1 or size != IPC_RING + ring or not IPC_MIN_CAPACITY <= ring <= IPC_MAX_CAPACITY:
            err = RemoteProtocolError(f"bad ipc setup: {len(self._fds)} fds, segment {size} B, ring {ring} B")
            raise self._refuse(REFUSE_PROTOCOL, err)
        try:
            peer_seg = _shm.map_peer(self._fds[0], size, writable=False)
        except RemoteProtocolError as e:
            raise self._refuse(REFUSE_PROTOCOL, e) from None
        finally:
            _close_fds(self._fds)
            self._fds = []
        self._peer_seg = peer_seg
        self.peer = f"ipc://{self.addr.name} (pid {pid})"

    def handshake(self) -> bool:
        """Drive the setup exchange one step (non-blocking); True once the rings are mapped."""
        if self.channel is not None:
            return True
        if self._error is not None:
            raise self._error
        if self.server and not self._got:
            try:
                self._check_creds()
            except AccessDenied as e:
                raise self._refuse(REFUSE_ACCESS, e) from None
        record = self._recv_record()
        if record is None:
            return False
        self._take_peer_segment(record, HELLO if self.server else WELCOME)
        if self.server:
            fd, self._mine = _new_segment(self.addr.name, self.addr.ring)
            try:
                self._open_channel()
                self._send_record(_setup_record(WELCOME, size=IPC_RING + self.addr.ring, ring=self.addr.ring), fd)
            finally:
                os.close(fd)
        else:
            self._open_channel()
        return True

    def _open_channel(self) -> None:
        assert self._mine is not None and self._peer_seg is not None
        try:
            chan = IpcChannel(self._mine, self._peer_seg, self.sock.fileno())
        except RemoteProtocolError as e:
            raise self._refuse(REFUSE_PROTOCOL, e) from None
        finally:
            self._mine = self._peer_seg = None
        chan.spin = self.spin
        self.channel = chan
        # the hot calls go straight to the core (no Python frame per call)
        self.send_buffers = chan.send  # type: ignore[method-assign, assignment]
        self.recv_into = chan.recv_into  # type: ignore[method-assign, assignment]
        self.before_wait = chan.before_wait  # type: ignore[method-assign]
        self.arm = chan.arm  # type: ignore[method-assign]
        self.take = chan.take  # type: ignore[method-assign]
        self.give_back = chan.give_back  # type: ignore[method-assign]

    def _start(self) -> None:
        """Client, right after connect(): check who listens, then send our hello and segment."""
        try:
            self._check_creds()
        except AccessDenied as e:
            self._error = e
            self.sock.shutdown(socket.SHUT_RDWR)  # readable at once: the owner calls handshake()
            return
        fd, self._mine = _new_segment(self.addr.name, self.addr.ring)
        try:
            self._send_record(_setup_record(HELLO, size=IPC_RING + self.addr.ring, ring=self.addr.ring), fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------- stream
    def send_buffers(self, buffers: list[memoryview]) -> int:
        return 0  # until the setup is done (then the core's send)

    def recv_into(self, buf: memoryview) -> int:
        raise BlockingIOError  # until the setup is done (then the core's recv_into)

    def connected(self) -> bool:
        return True  # connect() on a unix socket completes at once or fails

    # Until the setup is done; then the channel's own methods (_open_channel).
    def before_wait(self) -> bool:
        """About to block on fileno(): spin for `spin` seconds, then arm the wake-up.
        True: something can be done now (do not block)."""
        return False

    def arm(self) -> bool:
        """Like before_wait() without the spin (the I/O loop calls it before it sleeps)."""
        return False

    # A caller waiting for a reply reads the stream itself for a while (Connection.call).
    # The stream stays registered with its loop (no epoll_ctl per call), but the loop
    # neither spins on it nor arms it while it is leased, and the peer rings no doorbell
    # while the caller spins.
    def take(self) -> None:
        """A caller reads this stream from now on, spinning: the peer need not ring."""

    def give_back(self, woke: bool = False, /) -> bool:
        """The loop reads it again: arm it for a loop that may be asleep.  True if there
        is something to read already (the loop must be told).  woke: the loop was woken
        during the lease (a bell may be waiting in the socket: it is drained first)."""
        return False

    @property
    def leased(self) -> bool:
        chan = self.channel
        return chan is not None and chan.leased

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.channel is not None:
            self.channel.close()  # marks the end for the peer; drops our mappings
        self._mine = None
        _close_fds(self._fds)
        self._fds = []
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class IpcListener(Listener):
    """Listens on the abstract unix socket of an ipc:// name (same user only)."""

    def __init__(self, address: str, backlog: int = 128) -> None:
        self._addr = IpcAddress(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(self._addr.sockaddr())
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise NameInUse(f"a live listener already owns {address!r}") from None
            raise
        self.sock, self.tls, self.address, self._path = sock, None, address, None

    def accept(self) -> IpcStream | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        pid = _peercred(conn)[0]
        return IpcStream(conn, f"ipc://{self._addr.name} (pid {pid})", self._addr, server=True)


def connect_ipc(address: str) -> IpcStream:
    addr = IpcAddress(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        err = sock.connect_ex(addr.sockaddr())
        if err:  # a unix connect does not go on in the background: refused, or the backlog is full
            raise OSError(err, f"connect {address}: {os.strerror(err)}")
        stream = IpcStream(sock, address, addr, server=False)
        stream._start()
    except BaseException:
        sock.close()
        raise
    return stream
