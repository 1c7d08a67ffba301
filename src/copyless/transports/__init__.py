"""Byte-stream transports behind one interface: they move buffers and know
nothing of frames or sequence numbers.

    listener = listen("tcp://127.0.0.1:0")      # or "unix:///path", "unix://@abstract"
    t = connect(listener.address)               # non-blocking Stream
    peer = listener.accept()                    # Stream or None
    n = t.send_buffers(buffers)                 # scatter-gather, no concatenation: bytes taken
    n = t.recv_into(buffer)                     # into a buffer the caller chose

Addresses: tcp://HOST:PORT, unix:///absolute/path, unix://@name (abstract),
ipc://NAME[?ring=2MiB&spin=50us] (shared memory between two processes on one host:
see _ipc.py).  A stream whose `write_wakes_read` is True (ipc) signals room to
write by turning readable: wait for readability whatever you wait for, then
retry both the read and the pending write.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import ssl

from ..errors import ConfigurationError

Buffer = bytes | bytearray | memoryview

__all__ = [
    "Stream",
    "TLSStream",
    "IpcStream",
    "Listener",
    "IpcListener",
    "connect",
    "listen",
    "parse_address",
]

IOV_MAX = 1024


def parse_address(address: str) -> tuple[int, str | bytes | tuple[str, int]]:
    """(socket family, sockaddr) for a transport address."""
    if address.startswith("tcp://"):
        host, sep, port = address[6:].rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigurationError(f"tcp address needs host:port: {address!r}")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, int(port))
    if address.startswith("unix://"):
        path = address[7:]
        if path.startswith("@"):
            return socket.AF_UNIX, b"\0" + path[1:].encode()
        if not path.startswith("/"):
            raise ConfigurationError(f"unix address needs an absolute path or @name: {address!r}")
        return socket.AF_UNIX, path
    if address.startswith("ipc://"):
        return socket.AF_UNIX, IpcAddress(address).sockaddr()
    raise ConfigurationError(f"unknown transport in {address!r} (tcp://, unix://, ipc://)")


def on_this_host(family: int, peer: str) -> bool:
    """Whether a stream's bytes are only ever copied by this host's kernel: a unix
    socket, or TCP to a loopback address (the lo device: no NIC, no wire, no middlebox;
    Linux does not even compute TCP's checksum there).  TCP to any other address is
    not: its 16-bit checksum misses too much of what NICs, switches and middleboxes do
    to data.  A host name is taken for another host (resolving it here would block)."""
    if family == socket.AF_UNIX:
        return True
    host = peer[6:].rpartition(":")[0].strip("[]") if peer.startswith("tcp://") else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def _format(family: int, sockaddr: object) -> str:
    if family == socket.AF_UNIX:
        if isinstance(sockaddr, bytes):
            return "unix://@" + sockaddr[1:].decode()
        return f"unix://{sockaddr}"
    host, port = sockaddr[0], sockaddr[1]  # type: ignore[index]
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


UNIX_SNDBUF = 1 << 20  # the kernel caps it at net.core.wmem_max


class Stream:
    """A connected, non-blocking byte stream."""

    write_wakes_read = False  # True: room to write shows as readable (ipc), never as writable
    buffered = False  # True: pending() may hold bytes a read takes without the fd turning readable (TLS)

    def __init__(self, sock: socket.socket, peer: str) -> None:
        # The transport itself delivers the bytes as they were sent (see on_this_host): a
        # messenger puts its own data crc on a stream by default only where it does not.
        self.integrity = on_this_host(sock.family, peer)
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock.family == socket.AF_UNIX:
            # A unix socket's send buffer (208 KiB by default) is all a sender may have in
            # flight: a 1 MiB message took five rounds of EAGAIN, epoll and wake-up.
            # (TCP sizes its buffers itself; setting one would turn that off.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        self.sock = sock
        self.peer = peer

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_buffers(self, buffers: list[memoryview]) -> int:
        """One sendmsg of as many buffers as it takes; returns bytes written (0 if it would block)."""
        try:
            return self.sock.sendmsg(buffers[:IOV_MAX])
        except BlockingIOError:
            return 0

    def recv_into(self, buf: memoryview) -> int:
        """Bytes read into buf; 0 means the peer closed.  Raises BlockingIOError when nothing is there."""
        return self.sock.recv_into(buf)

    def pending(self) -> int:
        """Bytes already received and decrypted but not read (TLS); 0 for a plain socket."""
        return 0

    def before_wait(self) -> bool:
        """Call before blocking on fileno(): True if there is something to do already, so
        do not block (TLS: decrypted bytes; ipc: spins, then arms its wake-up)."""
        return self.pending() > 0

    def handshake(self) -> bool:
        """Drive a TLS handshake (ipc: the setup exchange) one step: True once done (plain
        streams: at once)."""
        return True

    def connected(self) -> bool:
        """For a connect in progress: True once established; raises if it failed."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        try:
            self.sock.getpeername()
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


class TLSStream(Stream):
    """TCP with TLS from the standard ssl module, non-blocking.  Call handshake() when
    the socket is ready (readable, or writable if want_write) until it returns True.
    SSLSocket has no sendmsg: small pieces are joined into one write (a copy of at
    most 64 KiB), a large buffer is written as it is."""

    sock: ssl.SSLSocket
    buffered = True

    def __init__(self, sock: ssl.SSLSocket, peer: str) -> None:
        super().__init__(sock, peer)
        self.integrity = True  # every TLS record carries a MAC
        self.want_write = False

    def handshake(self) -> bool:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want_write = False
            return False
        except ssl.SSLWantWriteError:
            self.want_write = True
            return False
        return True

    def send_buffers(self, buffers: list[memoryview]) -> int:
        data: Buffer = buffers[0]
        if buffers[0].nbytes < TLS_JOIN and len(buffers) > 1:
            joined = bytearray()
            for b in buffers:
                if joined and len(joined) + b.nbytes > TLS_JOIN:
                    break
                joined += b
            data = joined
        try:
            return self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def pending(self) -> int:
        return self.sock.pending()


TLS_JOIN = 64 << 10


class Listener:
    def __init__(self, address: str, backlog: int = 128, tls: ssl.SSLContext | None = None) -> None:
        family, sockaddr = parse_address(address)
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif isinstance(sockaddr, str) and os.path.exists(sockaddr):
                _replace_stale_unix(sockaddr)
            sock.bind(sockaddr)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        if tls is not None and family == socket.AF_UNIX:
            sock.close()
            raise ConfigurationError("TLS is for tcp:// (a unix socket is already private to this host)")
        self.sock = sock
        self.tls = tls
        self.address = _format(family, sock.getsockname())
        self._path = sockaddr if isinstance(sockaddr, str) and family == socket.AF_UNIX else None

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Stream | None:
        try:
            conn, addr = self.sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        peer = _format(conn.family, addr) if addr else "unix://(client)"
        if self.tls is not None:
            conn.setblocking(False)
            return TLSStream(self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), peer)
        return Stream(conn, peer)

    def close(self) -> None:
        self.sock.close()
        if self._path:
            try:
                os.unlink(self._path)
            except OSError:
                pass


def _replace_stale_unix(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: a leftover of a dead process
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use by a live listener")
    finally:
        probe.close()


def _no_tls(address: str, tls: ssl.SSLContext | None) -> None:
    if tls is not None:
        raise ConfigurationError(f"TLS is for tcp:// ({address.split(':', 1)[0]}:// never leaves this host)")


def listen(address: str, tls: ssl.SSLContext | None = None) -> Listener:
    if address.startswith("ipc://"):
        _no_tls(address, tls)
        return IpcListener(address)
    return Listener(address, tls=tls)


def connect(address: str, tls: ssl.SSLContext | None = None) -> Stream:
    """Start a non-blocking connect; poll for writability, then check Stream.connected()
    (and, with tls, drive Stream.handshake()).  ipc: the socket is connected at once and
    the stream turns readable when handshake() has something to read."""
    if address.startswith("ipc://"):
        _no_tls(address, tls)
        return connect_ipc(address)
    family, sockaddr = parse_address(address)
    if tls is not None and family == socket.AF_UNIX:
        raise ConfigurationError("TLS is for tcp:// (a unix socket is already private to this host)")
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(err, f"connect {address}: {os.strerror(err)}")
    except BaseException:
        sock.close()
        raise
    if tls is not None:
        host = sockaddr[0] if isinstance(sockaddr, tuple) else None
        return TLSStream(tls.wrap_socket(sock, do_handshake_on_connect=False, server_hostname=host), address)
    return Stream(sock, address)


from ._ipc import IpcAddress, IpcListener, IpcStream, connect_ipc  # noqa: E402  (it subclasses Stream)
