"""Messenger over real sockets: request/reply with direct receive, dispatch order,
lossless replay across transport faults, and thread/fd hygiene."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from copyless.errors import ClosedError, PeerLost
from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy

READ, READ_REPLY, WRITE = 1, 2, 3


class Store(Dispatcher):
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.accepted: list[Connection] = []
        self.got = threading.Event()
        self.expect = 0

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == READ

    def fast_dispatch(self, msg: Message) -> None:  # on the I/O loop
        n = int.from_bytes(msg.front, "little")
        assert msg.connection is not None
        msg.connection.send(msg.reply(READ_REPLY, front=b"ok", data=[bytes([7]) * n]))

    def dispatch(self, msg: Message) -> None:  # queued
        self.writes.append(bytes(msg.front) + bytes(msg.data))
        if len(self.writes) >= self.expect:
            self.got.set()

    def handle_accept(self, conn: Connection) -> None:
        self.accepted.append(conn)


@pytest.fixture(params=["tcp", "unix"])
def address(request, tmp_path):
    return "tcp://127.0.0.1:0" if request.param == "tcp" else f"unix://{tmp_path}/m.sock"


@pytest.fixture
def server(address):
    store = Store()
    m = Messenger("store.1", policies={"client": Policy.stateful_server()})
    m.add_dispatcher(store)
    bound = m.bind(address)
    m.start()
    yield m, store, bound
    m.shutdown()


def test_call_reply_lands_in_the_posted_buffer(server):
    _, store, addr = server
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for n in (0, 1, 5000, 1 << 20):
            buf = bytearray(n + 10)
            reply = conn.call(Message(READ, front=n.to_bytes(8, "little")), into=buf, timeout=5)
            assert reply.type == READ_REPLY and bytes(reply.front) == b"ok"
            assert bytes(reply.data) == bytes([7]) * n
            if n:
                assert reply.data.obj is buf, "read straight into the caller's buffer: no copy"
        assert [c.peer_name for c in store.accepted] == ["client.7"]


def test_queued_dispatch_keeps_order_and_scatter_gather(server):
    _, store, addr = server
    store.expect = 500
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        for i in range(500):
            conn.send(Message(WRITE, front=b"w%d:" % i, data=[b"a", bytearray(b"b"), memoryview(b"c")]))
        assert store.got.wait(10)
    assert store.writes == [b"w%d:abc" % i for i in range(500)]


def test_lossless_client_replays_across_transport_faults(server):
    m, store, addr = server
    n = 3000
    store.expect = n
    with Messenger("client.7", default_policy=Policy.lossless_client()) as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i in range(n):
            conn.send(Message(WRITE, front=i.to_bytes(4, "little")))
            if i % 700 == 350:  # cut the server's end of the transport, abruptly
                (srv,) = [c for c in store.accepted]
                loop = srv.loop
                loop.call_soon_threadsafe(lambda s=srv: s._stream and s._stream.sock.shutdown(socket.SHUT_RDWR))
        assert store.got.wait(20), f"{len(store.writes)} of {n} delivered"
        time.sleep(0.2)
    got = [int.from_bytes(w[:4], "little") for w in store.writes]
    assert got == list(range(n)), "every message exactly once, in order, across faults"
    assert len(store.accepted) == 1, "the reconnects resumed the same session"


def test_call_to_a_dead_server_fails_and_nothing_leaks(address):
    before = threading.active_count()
    store = Store()
    srv = Messenger("store.1")
    srv.add_dispatcher(store)
    addr = srv.bind(address)
    srv.start()
    client = Messenger("client.7", default_policy=Policy.lossy_client())
    conn = client.connect(addr)
    conn.wait_ready(5)
    srv.shutdown()
    # the lossy connection is reset: the call fails at once with a specific error, not a timeout
    t0 = time.monotonic()
    with pytest.raises((PeerLost, ClosedError)):
        conn.call(Message(READ, front=(1).to_bytes(8, "little")), timeout=5)
    assert time.monotonic() - t0 < 4
    client.shutdown()
    time.sleep(0.1)
    assert threading.active_count() <= before
