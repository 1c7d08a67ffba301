"""One conformance suite, run against every stream transport."""

from __future__ import annotations

import os
import select
import socket
import time

import pytest

from copyless._codec import Writer
from copyless.errors import ConfigurationError
from copyless.transports import Listener, Stream, connect, listen, parse_address


@pytest.fixture(params=["tcp", "unix-path", "unix-abstract", "ipc"])
def address(request, tmp_path, name):
    return {
        "tcp": "tcp://127.0.0.1:0",
        "unix-path": f"unix://{tmp_path}/s.sock",
        "unix-abstract": f"unix://@copyless-test-{name}",
        "ipc": f"ipc://copyless-test-{name}",
    }[request.param]


def wait(stream: Stream | Listener, write: bool = False, timeout: float = 5) -> None:
    """Block until the stream is ready, as a user of the interface does: before_wait()
    first, and room to write shows as readable on a write_wakes_read stream (ipc)."""
    if isinstance(stream, Stream):
        if stream.before_wait():
            return
        write = write and not stream.write_wakes_read
    fd = stream.fileno()
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout)
    assert r or w, "timed out"


def pair(address: str) -> tuple[Listener, Stream, Stream]:
    lst = listen(address)
    client = connect(lst.address)
    wait(lst)
    server = lst.accept()
    assert server is not None
    while not server.handshake():  # plain sockets: at once; ipc: the setup exchange
        wait(server)
    wait(client, write=True)
    assert client.connected()
    while not client.handshake():
        wait(client)
    return lst, client, server


def recv_exactly(stream: Stream, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        wait(stream)
        k = stream.recv_into(view[got:])
        assert k, "unexpected EOF"
        got += k
    return bytes(buf)


def test_scatter_gather_round_trip_into_a_chosen_buffer(address):
    lst, c, s = pair(address)
    try:
        q = Writer()  # the Messenger's send queue, unbound: it writes through stream.send_buffers
        parts = [b"head", bytearray(b"-middle-"), memoryview(b"tail" * 1000)]
        q.add(parts)
        while not q.flush(c):
            wait(c, write=True)
        assert q.pending == 0
        assert recv_exactly(s, sum(len(p) for p in parts)) == b"".join(bytes(p) for p in parts)
    finally:
        for x in (c, s, lst):
            x.close()


def test_partial_writes_resume_where_they_stopped(address):
    if address.startswith("ipc://"):
        address += "?ring=4KiB"  # each side's ring: what a 4 KiB send buffer is to a socket
    lst, c, s = pair(address)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = os.urandom(4 << 20)
        q = Writer()  # the Messenger's send queue, unbound: it writes through stream.send_buffers
        q.add([payload[: 1 << 20], payload[1 << 20 :]])
        assert not q.flush(c), "4 MiB cannot fit a 4 KiB send buffer at once"
        got = bytearray()
        deadline = time.monotonic() + 20
        while len(got) < len(payload) and time.monotonic() < deadline:
            q.flush(c)
            r = s.before_wait() or select.select([s.fileno()], [], [], 0.01)[0]
            if r:
                buf = bytearray(1 << 16)
                try:
                    got += buf[: s.recv_into(memoryview(buf))]
                except BlockingIOError:
                    pass  # a wake byte for the writer, or the last one's leftover
        assert bytes(got) == payload
    finally:
        for x in (c, s, lst):
            x.close()


def test_eof_and_would_block(address):
    lst, c, s = pair(address)
    try:
        with pytest.raises(BlockingIOError):
            s.recv_into(memoryview(bytearray(10)))
        c.close()
        wait(s)
        assert s.recv_into(memoryview(bytearray(10))) == 0
    finally:
        s.close()
        lst.close()


def test_connect_refused_is_reported():
    lst = listen("tcp://127.0.0.1:0")
    addr = lst.address
    lst.close()
    c = connect(addr)
    try:
        wait(c, write=True)
        with pytest.raises(OSError):
            c.connected()
    finally:
        c.close()


def test_stale_unix_socket_file_is_replaced(tmp_path):
    path = f"{tmp_path}/stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens
    lst = listen(f"unix://{path}")
    with pytest.raises(OSError):
        listen(f"unix://{path}")  # a live one is not replaced
    lst.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("bad", ["tcp://nohostport", "unix://relative", "udp://x:1", "tcp://h:notaport"])
def test_bad_addresses(bad):
    with pytest.raises(ConfigurationError):
        parse_address(bad)


def test_unix_streams_may_have_a_large_message_in_flight(tmp_path):
    """Both ends of a unix stream get a send buffer of UNIX_SNDBUF (as far as
    net.core.wmem_max allows): the default (208 KiB) made a 1 MiB message five rounds."""
    from copyless.transports import UNIX_SNDBUF

    with open("/proc/sys/net/core/wmem_max") as f:
        cap = int(f.read())
    lst, client, server = pair(f"unix://{tmp_path}/s.sock")
    try:
        for s in (client, server):
            # the kernel doubles what it is given (bookkeeping overhead)
            assert s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * min(UNIX_SNDBUF, cap)
    finally:
        client.close()
        server.close()
        lst.close()


def test_recv_fill_reads_a_segment_whole_across_the_pieces_it_arrives_in():
    import threading

    from copyless._codec import recv_fill

    a, b = socket.socketpair()
    b.setblocking(False)
    data = os.urandom(1 << 20)

    def trickle() -> None:  # pieces with pauses: the reader must wait for each, in C
        for i in range(0, len(data), 100_000):
            a.sendall(data[i : i + 100_000])
            time.sleep(0.002)

    try:
        t = threading.Thread(target=trickle)
        t.start()
        buf = bytearray(len(data))
        assert recv_fill(b.fileno(), buf, 1.0) == len(data)
        t.join()
        assert buf == data
        with pytest.raises(BlockingIOError):
            recv_fill(b.fileno(), buf, 0.01)  # nothing comes: bounded
        a.sendall(b"tail")
        a.close()
        assert recv_fill(b.fileno(), buf, 1.0) == 4, "the end of the stream after some bytes: those"
        assert buf[:4] == b"tail"
        assert recv_fill(b.fileno(), buf, 1.0) == 0, "then the end itself"
    finally:
        a.close()
        b.close()
