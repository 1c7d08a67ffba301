"""The fault proxy itself, with plain sockets: what it forwards arrives intact and in order,
and each fault does exactly what it says (cut at an exact byte, latency, partition, refusal)."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from copyless.errors import ClosedError, ConfigurationError, Timeout
from copyless.testing import FaultProxy
from copyless.transports import parse_address

pytestmark = pytest.mark.timeout(30)


class Target:
    """A listening socket standing for the proxied server; the test accepts on it itself."""

    def __init__(self, address: str) -> None:
        family, sockaddr = parse_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(sockaddr)
        self.sock.listen(16)
        self.sock.settimeout(5)
        name = self.sock.getsockname()
        self.address = f"tcp://127.0.0.1:{name[1]}" if family != socket.AF_UNIX else address

    def accept(self, timeout: float = 5) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(5)
        return conn

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["tcp", "unix"])
def target(request, tmp_path) -> Iterator[Target]:
    t = Target("tcp://127.0.0.1:0" if request.param == "tcp" else f"unix://{tmp_path}/target.sock")
    yield t
    t.close()


@pytest.fixture
def proxy(target: Target) -> Iterator[FaultProxy]:
    with FaultProxy(target.address) as p:
        yield p


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def dial(address: str, opened: list[socket.socket]) -> socket.socket:
    family, sockaddr = parse_address(address)
    s = socket.socket(family, socket.SOCK_STREAM)
    opened.append(s)
    s.settimeout(5)
    s.connect(sockaddr)
    return s


def assert_refused(address: str, opened: list[socket.socket]) -> None:
    """The connection is reset at once: during connect() (the reset can beat it) or just after."""
    try:
        sock = dial(address, opened)
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return
    assert recv_until_closed(sock)[0] == b""


def through(proxy: FaultProxy, target: Target, opened: list[socket.socket]) -> tuple[socket.socket, socket.socket]:
    """(client, server): a connection made through the proxy, and its far end at the target."""
    client = dial(proxy.address, opened)
    server = target.accept()
    opened.append(server)
    return client, server


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += b
    return bytes(out)


def recv_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, True if it was a reset rather than an EOF)."""
    out = bytearray()
    while True:
        try:
            b = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out), True
        if not b:
            return bytes(out), False
        out += b


def test_forwards_both_ways_intact(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    n = 4 << 20
    up, down = os.urandom(n), os.urandom(n)
    got: dict[str, bytes] = {}

    def read(name: str, sock: socket.socket) -> None:
        got[name] = recv_exactly(sock, n)

    readers = [threading.Thread(target=read, args=a) for a in (("up", server), ("down", client))]
    for t in readers:
        t.start()
    client.sendall(up)
    server.sendall(down)
    for t in readers:
        t.join(20)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    s = proxy.statistics()
    assert (s.bytes_upstream, s.bytes_downstream, s.connections_accepted) == (n, n, 1)


@pytest.mark.parametrize("listen", ["unix-path", "unix-abstract"])
def test_listens_on_unix_addresses(target: Target, opened, tmp_path, listen: str) -> None:
    addr = f"unix://{tmp_path}/proxy.sock" if listen == "unix-path" else f"unix://@copyless-proxy-{os.getpid()}"
    with FaultProxy(target.address, addr) as proxy:
        assert proxy.address == addr
        client, server = through(proxy, target, opened)
        client.sendall(b"ping")
        assert recv_exactly(server, 4) == b"ping"
    if listen == "unix-path":
        assert not os.path.exists(f"{tmp_path}/proxy.sock"), "close() removes the socket file"


def test_half_close_is_passed_on(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert recv_until_closed(server) == (b"request", False)
    server.sendall(b"reply")  # the other direction still works
    server.close()
    assert recv_until_closed(client) == (b"reply", False)
    proxy.wait_for(lambda s: s.connections_active == 0, timeout=5)


def test_cut_resets_both_sides_now(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    client.sendall(b"x")
    assert recv_exactly(server, 1) == b"x"
    proxy.cut()
    tcp = client.family != socket.AF_UNIX
    assert recv_until_closed(client) == (b"", tcp), "RST on tcp, EOF on unix"
    assert recv_until_closed(server) == (b"", target.sock.family != socket.AF_UNIX)
    s = proxy.statistics()
    assert (s.connections_cut, s.connections_active) == (1, 0)
    # the proxy still takes new connections
    client, server = through(proxy, target, opened)
    server.sendall(b"again")
    assert recv_exactly(client, 5) == b"again"


@pytest.mark.parametrize("direction", ["upstream", "downstream", "both"])
def test_cut_after_an_exact_byte_count(proxy: FaultProxy, target: Target, opened, direction: str) -> None:
    client, server = through(proxy, target, opened)
    proxy.cut_after(1000, direction)  # type: ignore[arg-type]
    if direction == "downstream":
        client.sendall(b"u" * 3000)  # the other direction does not count
        assert recv_exactly(server, 3000) == b"u" * 3000
        sender, receiver = server, client
    else:
        sender, receiver = client, server
    try:
        for _ in range(7):  # in pieces, so the cut falls inside one
            sender.sendall(b"d" * 300)
            time.sleep(0.01)
    except OSError:
        pass  # the sender was reset too
    data, _ = recv_until_closed(receiver)
    assert data == b"d" * 1000
    assert proxy.wait_for(lambda s: s.connections_cut == 1, timeout=5).connections_active == 0


def test_cut_randomly_cuts_each_connection_at_seeded_offsets(proxy: FaultProxy, target: Target, opened) -> None:
    proxy.cut_randomly(100, 5000, seed=42, direction="upstream")
    expected = random.Random(42)
    for i in range(5):
        client, server = through(proxy, target, opened)
        want = expected.randint(100, 5000)
        with pytest.raises(OSError):  # EPIPE / ECONNRESET once the cut comes
            for _ in range(200):
                client.sendall(bytes(500))
                time.sleep(0.001)
        data, _ = recv_until_closed(server)
        assert len(data) == want, f"connection {i}"
    proxy.heal()
    client, server = through(proxy, target, opened)
    client.sendall(bytes(20000))
    assert len(recv_exactly(server, 20000)) == 20000, "heal() disarms it"
    assert proxy.statistics().connections_cut == 5


def test_delay_adds_latency_and_keeps_order(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    proxy.delay(0.3)
    t0 = time.monotonic()
    client.sendall(b"slow")
    assert recv_exactly(server, 4) == b"slow"
    assert 0.3 <= time.monotonic() - t0 < 2.0
    # chunks sent later with a shorter delay wait behind the earlier ones
    client.sendall(b"A")
    proxy.delay(0.0)
    t0 = time.monotonic()
    for c in b"BCDE":
        client.sendall(bytes([c]))
        time.sleep(0.01)
    got = b""
    while len(got) < 5:
        got += server.recv(5)
    assert got == b"ABCDE"
    assert time.monotonic() - t0 >= 0.2, "B..E were not let past A"
    server.sendall(b"fast")  # and without delay, no latency
    t0 = time.monotonic()
    assert recv_exactly(client, 4) == b"fast"
    assert time.monotonic() - t0 < 0.2


def test_pause_holds_everything_and_resume_delivers_it(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    proxy.pause()
    client.sendall(b"held")
    client.shutdown(socket.SHUT_WR)  # even the end-of-file is held
    server.settimeout(0.3)
    with pytest.raises(TimeoutError):
        server.recv(10)
    # a connection made during the partition reaches the target only afterwards
    late = dial(proxy.address, opened)
    with pytest.raises(TimeoutError):
        target.accept(timeout=0.3)
    assert proxy.statistics().connections_active == 2
    proxy.resume()
    server.settimeout(5)
    assert recv_until_closed(server) == (b"held", False)
    late_server = target.accept()
    opened.append(late_server)
    late.sendall(b"hi")
    assert recv_exactly(late_server, 2) == b"hi"


def test_refuse_resets_new_connections_only(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    proxy.refuse(True)
    assert_refused(proxy.address, opened)
    with pytest.raises(TimeoutError):
        target.accept(timeout=0.2)
    client.sendall(b"still")  # the existing connection is untouched
    assert recv_exactly(server, 5) == b"still"
    proxy.refuse(False)
    through(proxy, target, opened)
    s = proxy.statistics()
    assert (s.connections_refused, s.connections_accepted) == (1, 2)


def test_target_down_resets_the_client(target: Target, opened) -> None:
    target.close()  # nobody listens there any more
    with FaultProxy(target.address) as proxy:
        assert_refused(proxy.address, opened)


def test_corrupt_flips_one_bit_per_chunk(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    proxy.corrupt(1.0, seed=7)
    sent = os.urandom(64 << 10)
    for i in range(0, len(sent), 4096):
        client.sendall(sent[i : i + 4096])
    got = recv_exactly(server, len(sent))
    flipped = sum(bin(a ^ b).count("1") for a, b in zip(sent, got, strict=True))
    assert flipped == proxy.statistics().chunks_corrupted > 0


def test_drop_discards_whole_chunks(proxy: FaultProxy, target: Target, opened) -> None:
    client, server = through(proxy, target, opened)
    proxy.drop(1.0, seed=1)
    client.sendall(b"gone")
    proxy.wait_for(lambda s: s.chunks_dropped >= 1, timeout=5)
    proxy.drop(0.0)
    client.sendall(b"kept")
    assert recv_exactly(server, 4) == b"kept"
    assert proxy.statistics().bytes_upstream == 4


def test_a_reader_that_stops_pushes_back_on_the_sender(proxy: FaultProxy, target: Target, opened) -> None:
    with FaultProxy(target.address, chunk_size=4096, high_water=64 << 10) as small:
        client, server = through(small, target, opened)
        client.setblocking(False)
        sent = 0
        try:
            while sent < 64 << 20:
                sent += client.send(bytes(65536))
        except BlockingIOError:
            pass
        assert sent < 64 << 20, "the proxy buffers a bounded amount, then TCP pushes back"
        client.setblocking(True)
        server.settimeout(5)
        assert len(recv_exactly(server, sent)) == sent


def test_controls_validate_and_close_releases_everything(target: Target, opened) -> None:
    proxy = FaultProxy(target.address)
    with pytest.raises(ConfigurationError):
        proxy.drop(1.5)
    with pytest.raises(ConfigurationError):
        proxy.cut_after(10, "sideways")  # type: ignore[arg-type]
    with pytest.raises(Timeout):
        proxy.wait_for(lambda s: s.connections_accepted > 0, timeout=0.05)
    client, _server = through(proxy, target, opened)
    proxy.close()
    proxy.close()
    data, _ = recv_until_closed(client)
    assert data == b""
    with pytest.raises(ClosedError):
        proxy.cut()
    # the leakcheck fixture verifies the thread and every fd are gone
