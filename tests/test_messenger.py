"""Messenger over real sockets: request/reply with direct receive, dispatch order,
lossless replay across transport faults, and thread/fd hygiene."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import address_of, in_threads, served, wait_for

from copyless.errors import ClosedError, PeerLost
from copyless.messenger import FILL_HEAD, Connection, Dispatcher, Message, Messenger, Policy
from copyless.protocol.session import SessionConnection
from copyless.transports import on_this_host

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


SLOW, SILENT = 4, 5


class Slow(Store):
    """READ replies at once; SLOW replies from the dispatch thread; SILENT never replies."""

    def dispatch(self, msg: Message) -> None:
        if msg.type == SLOW:
            time.sleep(0.01)
            assert msg.connection is not None
            msg.connection.send(msg.reply(READ_REPLY, front=bytes(msg.front)))
        elif msg.type != SILENT:
            super().dispatch(msg)


@pytest.fixture(params=["tcp", "unix", "ipc"])
def address(request, tmp_path, name):
    return address_of(request.param, tmp_path, name)


@pytest.fixture
def server(address):
    store = Slow()
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


@contextlib.contextmanager
def connected_to_store(transport: str, tmp_path) -> Iterator[Connection]:
    """A client's READY connection to a Store over tcp or unix."""
    with served(Store(), address_of(transport, tmp_path)) as (_, conn, _):
        yield conn


class Blocks(Dispatcher):
    """Replies to READ with the first n bytes of one block made up front (n in the
    front): serving allocates nothing the size of a reply."""

    def __init__(self, size: int) -> None:
        self.block = memoryview(bytes(range(256)) * (size // 256))

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == READ

    def fast_dispatch(self, msg: Message) -> None:
        assert msg.connection is not None
        n = int.from_bytes(msg.front, "little")
        msg.connection.send(msg.reply(READ_REPLY, data=[self.block[:n]]))


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_large_reply_is_read_from_the_socket_into_the_posted_buffer(transport, tmp_path, read_path):
    """Not through the prefetch buffer, nor through any buffer of its own: a caller that
    posted a large buffer reads only FILL_HEAD bytes ahead (the frame's head, and what
    follows it in that read), so at most that sliver of the data is copied (reader.copied
    counts every byte of a direct segment that was), and no Python object on the way is
    the size of the reply (both ends are in this process: tracemalloc sees them all).
    Reading the head to the byte would cost two more system calls than copying 4 KiB
    does."""
    import tracemalloc

    size = 1 << 20
    serve = Blocks(size)
    with served(serve, address_of(transport, tmp_path)) as (_, conn, _):
        buf = bytearray(size)
        conn.call(Message(READ, front=size.to_bytes(8, "little")), into=buf, timeout=5)  # warm-up
        tracemalloc.start()
        try:
            for _ in range(20):
                buf[:] = bytes(size)  # (before the clock of the next line: not traced at its peak)
                tracemalloc.reset_peak()
                assert conn._machine is not None
                reader = conn._machine.reader
                before = reader.copied
                reply = conn.call(Message(READ, front=size.to_bytes(8, "little")), into=buf, timeout=5)
                _, peak = tracemalloc.get_traced_memory()
                assert reply.data.obj is buf and reply.data == serve.block
                assert reader.copied - before < FILL_HEAD, "the data went straight into the posted buffer"
                assert peak < size // 4, f"{peak} bytes allocated on the way: a copy of the reply"
        finally:
            tracemalloc.stop()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_the_rest_of_a_direct_segment_is_not_read_in_head_sized_pieces(transport, tmp_path, monkeypatch):
    """A reply of 64 KiB into a 64 KiB buffer: the head read takes FILL_HEAD bytes, and
    the rest of the segment (under FILL_MIN) went on in FILL_HEAD pieces, a read round
    each (16 of them, most of the caller's CPU).  A read into the segment's own buffer
    takes all of it that is there."""
    rounds = [0]
    received = SessionConnection.received

    def counted(self: SessionConnection, n: int, now: float) -> list:
        rounds[0] += 1
        return received(self, n, now)

    monkeypatch.setattr(SessionConnection, "received", counted)
    with connected_to_store(transport, tmp_path) as conn:
        n, calls = 64 << 10, 20
        buf = bytearray(n)
        rounds[0] = 0
        for _ in range(calls):
            buf[:] = bytes(n)
            reply = conn.call(Message(READ, front=n.to_bytes(8, "little")), into=buf, timeout=5)
            assert reply.data.obj is buf and buf == bytes([7]) * n
        # head, the segment's rest, the frame's tail (and, at times, a piece more)
        assert rounds[0] <= 5 * calls, f"{rounds[0] / calls:.1f} read rounds a call"


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


def test_concurrent_callers_on_one_connection_each_get_their_reply(server):
    """One caller at a time reads the socket itself; it delivers the others' replies."""
    _, _, addr = server
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)

        def worker(k: int) -> None:
            for i in range(60):
                kind = SLOW if i % 10 == 0 else READ
                tag = f"{k}:{i}".encode()
                r = conn.call(Message(kind, front=tag if kind == SLOW else (3).to_bytes(8, "little")), timeout=5)
                assert bytes(r.front) == (tag if kind == SLOW else b"ok")

        in_threads(worker, 4, timeout=30)
        assert not conn._leased, "the last caller handed the socket back to the loop"


def test_call_timeout_returns_the_socket_to_the_loop(server):
    _, store, addr = server
    store.expect = 1
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.call(Message(SILENT), timeout=0.2)
        assert 0.2 <= time.monotonic() - t0 < 1.5
        # the loop reads the connection again: unsolicited traffic and calls still work
        conn.send(Message(WRITE, front=b"after"))
        assert store.got.wait(5)
        r = conn.call(Message(READ, front=(2).to_bytes(8, "little")), timeout=5)
        assert bytes(r.data) == b"\x07\x07"


def test_a_call_survives_a_transport_cut_while_its_caller_reads(server):
    """Lossless: the request is replayed on the new transport; the caller, whose leased
    socket died, waits for the loop to deliver the reply."""
    _, store, addr = server
    with Messenger("client.7", default_policy=Policy.lossless_client()) as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i in range(20):
            st = conn._stream
            assert st is not None
            threading.Timer(0.003, lambda s=st: s.sock.shutdown(socket.SHUT_RDWR)).start()
            r = conn.call(Message(SLOW, front=b"%d" % i), timeout=10)
            assert bytes(r.front) == b"%d" % i
            conn.wait_ready(5)


def test_accepted_connections_spread_over_the_loop_pool(server):
    """Never a thread per connection, and not all on one loop either: least-loaded first."""
    m, store, addr = server
    before = threading.active_count()
    clients = [Messenger(f"client.{i}") for i in range(4)]
    try:
        conns = [c.connect(addr) for c in clients]
        for c in conns:
            c.wait_ready(5)
            assert bytes(c.call(Message(READ, front=(1).to_bytes(8, "little")), timeout=5).data) == b"\x07"
        loops = sorted(sum(1 for c in store.accepted if c.loop is lp) for lp in m._loops)
        assert loops == [2, 2], "two loops, two connections each"
        assert threading.active_count() - before == 4 * 3, "each client messenger: 2 loops + dispatch"
    finally:
        for c in clients:
            c.shutdown()


def test_new_connections_go_to_the_least_loaded_loop_on_both_sides(server):
    """Least-loaded, not round-robin (which also makes [2, 2] of four in a row): once
    closing connections has emptied one loop, the next connections all go there, on the
    client (connect) and on the server (accept).  Loads count open connections: a closed
    one is taken off its loop's."""
    m, store, addr = server
    probe = Message(READ, front=(1).to_bytes(8, "little"))
    with Messenger("client.7", io_loops=2) as client:

        def peer_of(c: Connection) -> Connection:  # the server's side of a client connection
            assert wait_for(lambda: any(s.session.peer_cookie == c.session.cookie for s in store.accepted))
            return next(s for s in store.accepted if s.session.peer_cookie == c.session.cookie)

        def open_one() -> Connection:  # one at a time: accepted in the order they connect
            c = client.connect(addr)
            c.wait_ready(5)
            assert bytes(c.call(probe, timeout=5).data) == b"\x07"
            return c

        conns = [open_one() for _ in range(4)]
        assert sorted(lp.load for lp in client._loops) == [2, 2]
        assert sorted(lp.load for lp in m._loops) == [2, 2]
        mine, theirs = conns[0].loop, peer_of(conns[0]).loop
        going = [c for c in conns if c.loop is mine]
        assert len(going) == 2 and all(peer_of(c).loop is theirs for c in going), "(the test's premise)"
        for c in going:
            c.close()
        assert wait_for(lambda: mine.load == 0 and theirs.load == 0), "closed: off their loops' load"
        assert wait_for(lambda: len(m._connections) == 2)
        staying = [c for c in conns if c not in going]
        # round-robin would put one of these on each loop; least-loaded puts both on the empty one
        new = [open_one() for _ in range(2)]
        assert [c.loop is mine for c in new] == [True, True], "client: both on the emptier loop"
        assert [peer_of(c).loop is theirs for c in new] == [True, True], "server: both on the emptier loop"
        assert sorted(lp.load for lp in client._loops) == [2, 2]
        assert sorted(lp.load for lp in m._loops) == [2, 2]
        for c in staying + new:
            assert bytes(c.call(probe, timeout=5).data) == b"\x07"


def test_a_dispatcher_chooses_where_unsolicited_data_lands(address):
    """From the verified header and front, before the data is read: no intermediate copy
    of a large message (at most what one prefetch read took of it), and a small one is
    not asked about."""
    big = 1 << 20
    arena = bytearray(big + 4096)
    asked: list[tuple[int, bytes, int]] = []
    got: list[Message] = []
    accepted: list[Connection] = []
    done = threading.Event()

    class Placer(Dispatcher):
        def data_buffer(self, conn, type, tid, front, nbytes):
            asked.append((type, bytes(front), nbytes))
            offset = int(bytes(front))
            return memoryview(arena)[offset : offset + nbytes] if type == WRITE else None

        def dispatch(self, msg: Message) -> None:
            got.append(msg)
            if len(got) == 3:
                done.set()

        def handle_accept(self, conn: Connection) -> None:
            accepted.append(conn)

    payload = bytes(range(256)) * (big // 256)
    srv = Messenger("store.1")
    srv.add_dispatcher(Placer())
    addr = srv.bind(address)
    srv.start()
    try:
        with Messenger("client.7") as client:
            conn = client.connect(addr)
            conn.send(Message(WRITE, front=b"4096", data=[payload]))
            conn.send(Message(WRITE, front=b"0", data=[b"\x02" * 100]))  # small: not asked
            conn.send(Message(READ, front=b"0", data=[b"\x03" * 10_000]))  # declined: a new buffer
            assert done.wait(5)
            machine = accepted[0]._machine
            assert machine is not None
            copied = machine.reader.copied
    finally:
        srv.shutdown()
    assert asked == [(WRITE, b"4096", big), (READ, b"0", 10_000)]
    assert got[0].data.obj is arena and arena[4096:] == payload, "landed in place"
    assert copied < (64 << 10) + 10_000, f"{copied} bytes copied: the large one went through a buffer"
    assert got[1].data.obj is not arena and bytes(got[1].data) == b"\x02" * 100
    assert got[2].data.obj is not arena and bytes(got[2].data) == b"\x03" * 10_000


def test_a_loop_stopped_while_busy_still_runs_what_it_was_handed():
    """Connection.close() hands its teardown (which closes the socket) to the loop, and
    Messenger.shutdown() stops the loop right after: what was handed over must run."""
    from copyless._ioloop import IOLoop

    loop, gate, ran = IOLoop("t"), threading.Event(), threading.Event()
    loop.call_soon_threadsafe(gate.wait)  # the loop thread is busy in a call ...
    time.sleep(0.05)
    loop.call_soon_threadsafe(ran.set)  # ... when a teardown is handed over
    stopper = threading.Thread(target=loop.stop)
    stopper.start()
    time.sleep(0.05)  # stop() has asked it to stop
    gate.set()
    stopper.join(10)
    assert ran.is_set()


class Resets(Store):
    def __init__(self) -> None:
        super().__init__()
        self.resets: list[Connection] = []

    def handle_reset(self, conn: Connection) -> None:
        self.resets.append(conn)


@pytest.mark.parametrize("policy", ["stateless", "stateful"])
def test_a_server_forgets_clients_that_are_gone(address, policy, monkeypatch):
    """A stateless server drops a client's session with its connection; a stateful one
    keeps it for the client to resume within `session_linger`, then drops it (and the
    dispatcher hears handle_reset).  Nothing of the clients is left behind.  The clients
    vanish without a word (as if killed or cut off): no GOODBYE."""
    monkeypatch.setattr(SessionConnection, "goodbye", lambda self: None)
    store = Resets()
    server_policy = Policy.stateless_server() if policy == "stateless" else Policy.stateful_server()
    linger = 0.5
    with Messenger("store.1", policies={"client": server_policy}, session_linger=linger) as m:
        m.add_dispatcher(store)
        addr = m.bind(address)
        m.start()
        for i in range(5):
            client_policy = Policy.lossy_client() if policy == "stateless" else Policy.lossless_client()
            with Messenger(f"client.{i}", default_policy=client_policy) as client:
                conn = client.connect(addr)
                reply = conn.call(Message(READ, front=(3).to_bytes(4, "little")), timeout=5)
                assert bytes(reply.data) == bytes([7]) * 3
        if policy == "stateful":
            assert len(m._registry.by_client) == 5, "kept for the clients to come back, for a while"
        assert wait_for(lambda: not m._registry.by_client and not m._connections and not m._by_session)
        assert len(store.resets) == 5 and {c.peer_name for c in store.resets} == {f"client.{i}" for i in range(5)}


def test_a_client_that_closes_is_forgotten_at_once(address):
    """A client that closes its connection says GOODBYE: a stateful server ends the session
    then (handle_reset), instead of keeping it for the linger."""
    store = Resets()
    with Messenger("store.1", policies={"client": Policy.stateful_server()}, session_linger=300) as m:
        m.add_dispatcher(store)
        addr = m.bind(address)
        m.start()
        for i in range(3):
            with Messenger(f"client.{i}") as client:
                conn = client.connect(addr)
                assert conn.call(Message(READ, front=(3).to_bytes(4, "little")), timeout=5).data == b"\x07" * 3
            assert wait_for(lambda i=i: len(store.resets) == i + 1), "ended when the client closed"
        assert wait_for(lambda: not m._registry.by_client and not m._connections and not m._by_session)
        assert all(c._retry is None for c in store.resets), "no linger timer left"


def test_a_client_that_comes_back_within_the_linger_resumes_its_session(server):
    """The linger timer of a stateful server's session stops when its client reconnects."""
    m, store, addr = server
    m._session_linger = 0.4
    with Messenger("client.7", default_policy=Policy.lossless_client()) as client:
        conn = client.connect(addr)
        for round in range(3):
            for i in range(50):
                conn.send(Message(WRITE, front=(round * 50 + i).to_bytes(4, "little")))
            store.expect = (round + 1) * 50
            assert store.got.wait(5)
            store.got.clear()
            (srv,) = store.accepted
            srv.loop.call_soon_threadsafe(lambda s=srv: s._stream and s._stream.sock.shutdown(socket.SHUT_RDWR))
            time.sleep(0.6)  # longer than the linger: only the reconnect keeps the session
        assert conn.call(Message(READ, front=(1).to_bytes(4, "little")), timeout=5).data == b"\x07"
        assert not srv._closed, "the linger never ran out: each reconnect stopped it"
    got = [int.from_bytes(w[:4], "little") for w in store.writes]
    assert got == list(range(150)) and len(store.accepted) == 1


def test_the_loop_reads_again_after_a_caller_slept_on_the_stream(address):
    """A caller that sleeps on a leased ipc:// stream arms it, and the doorbell may wake the
    loop first: the loop then leaves the stream to the caller until the lease ends.  After
    the lease the loop must read the stream again: a message the server pushes unasked,
    with no call under way, arrives."""

    class Pusher(Store):
        def dispatch(self, msg: Message) -> None:  # pushed back unasked
            assert msg.connection is not None
            msg.connection.send(Message(WRITE, front=bytes(msg.front)))

    class Inbox(Dispatcher):
        def __init__(self) -> None:
            self.got: list[bytes] = []
            self.cv = threading.Condition()

        def can_fast_dispatch(self, msg: Message) -> bool:
            return msg.type == WRITE

        def fast_dispatch(self, msg: Message) -> None:
            with self.cv:
                self.got.append(bytes(msg.front))
                self.cv.notify_all()

    with Messenger("store.1", policies={"client": Policy.stateful_server()}) as m:
        m.add_dispatcher(Pusher())
        addr = m.bind(address)
        m.start()
        inbox = Inbox()
        with Messenger("client.7", default_policy=Policy.lossless_client()) as client:
            client.add_dispatcher(inbox)
            conn = client.connect(addr)
            for i in range(3):
                conn.call(Message(READ, front=(1).to_bytes(4, "little")), timeout=5)  # (a READY session)
                st = conn._lease()
                assert st is not None
                conn._on_readable()  # what the loop does when a byte for the sleeping caller wakes it
                assert conn._lease_off == st.write_wakes_read
                conn._unlease(st)
                assert not getattr(st, "leased", False)
                conn.send(Message(WRITE, front=b"%d" % i))
                with inbox.cv:
                    assert inbox.cv.wait_for(lambda i=i: len(inbox.got) > i, 5), f"push {i} never read"
    assert inbox.got == [b"%d" % i for i in range(3)]


@pytest.mark.parametrize("forced", [None, True, False])
def test_the_data_crc_is_on_by_default_only_where_the_transport_can_corrupt(address, forced):
    """A unix socket, shared memory and TCP over loopback (copies made by this host) get
    no data crc unless the messenger asks for it (TCP to another host does: the rule is
    tested below); data_crc=False turns it off anywhere."""
    want = False if forced is None else forced
    store = Store()
    with Messenger("store.1", policies={"client": Policy.stateful_server()}, data_crc=forced) as server:
        server.add_dispatcher(store)
        addr = server.bind(address)
        server.start()
        with Messenger("client.7", data_crc=forced) as client:
            conn = client.connect(addr)
            conn.wait_ready(5)
            reply = conn.call(Message(READ, front=(1 << 16).to_bytes(4, "little")), timeout=5)
            assert bytes(reply.data) == bytes([7]) * (1 << 16)
            wait_for(lambda: store.accepted)
            assert conn._machine is not None and conn._machine.data_crc is want
            assert store.accepted[0]._machine.data_crc is want


@pytest.mark.parametrize(
    "family, peer, local",
    [
        (socket.AF_UNIX, "unix:///run/x.sock", True),
        (socket.AF_UNIX, "unix://(client)", True),
        (socket.AF_INET, "tcp://127.0.0.1:6800", True),
        (socket.AF_INET, "tcp://127.3.2.1:1", True),
        (socket.AF_INET6, "tcp://[::1]:6800", True),
        (socket.AF_INET6, "tcp://[::ffff:127.0.0.1]:6800", True),
        (socket.AF_INET, "tcp://10.0.0.2:6800", False),
        (socket.AF_INET, "tcp://192.0.2.2:6800", False),
        (socket.AF_INET6, "tcp://[fd00::2]:6800", False),
        (socket.AF_INET6, "tcp://[::ffff:10.0.0.1]:6800", False),
        (socket.AF_INET, "tcp://localhost:6800", False),  # a name: taken for another host
        (socket.AF_INET, "tcp://store.example:6800", False),
    ],
)
def test_only_copies_made_by_this_host_count_as_integrity(family, peer, local):
    """The data crc's default follows transports.on_this_host: TCP to any address that is
    not loopback may cross a NIC, a wire and middleboxes."""
    assert on_this_host(family, peer) is local


def test_tcp_to_another_address_of_this_host_keeps_the_data_crc():
    """Through a non-loopback address (here one of this host's own, if it has one) the
    stream does not count as this host's copy, so the data crc stays on by default."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a source address
        here = probe.getsockname()[0]
        probe.close()
    except OSError:
        pytest.skip("no route off loopback on this host")
    if ipaddress.ip_address(here).is_loopback:
        pytest.skip("this host has no address off loopback")
    with served(Store(), f"tcp://{here}:0") as (_, conn, _):
        conn.call(Message(READ, front=(1 << 16).to_bytes(4, "little")), timeout=5)
        assert conn._machine is not None and conn._machine.data_crc is True


def test_a_due_timer_does_not_block_its_loop_on_a_connection_a_caller_holds(server):
    """A connection's timer that comes due while a caller holds the connection (it reads
    its reply) must not wait for the lock on the loop thread: the loop has other work,
    and waiting woke it at every release of the lock.  It looks again later instead."""
    _, _, addr = server
    with Messenger("client.7", io_loops=1) as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        loop = conn.loop
        ran = threading.Event()
        with conn._lock:
            conn._arm_timer(time.monotonic() - 1)  # due now: the loop runs it
            time.sleep(0.05)
            loop.call_soon_threadsafe(ran.set)  # then this, on the same loop
            assert ran.wait(2), "the loop went on while the connection was held"
            assert conn._timer is not None and conn._timer.when < time.monotonic(), "not run: held"
        wait_for(lambda: conn._timer is None or conn._timer.when > time.monotonic())  # ran once free


def test_a_refused_connect_is_reported_and_retried_with_backoff(address, tmp_path):
    """Nobody listens yet: every refused attempt calls handle_refused (unix:// and ipc://
    refuse within connect(), tcp:// once the connect completes), the attempts back off
    exponentially (a handful a second, not one every 10 ms), and once a server binds
    the address the connection is made within the backoff's cap."""
    if address.startswith("tcp://"):
        with socket.socket() as s:  # a port nobody listens on (bound, not listening)
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    refused: list[float] = []

    class Watch(Dispatcher):
        def handle_refused(self, conn: Connection) -> None:
            refused.append(time.monotonic())

    with Messenger("client.7") as client:
        client.add_dispatcher(Watch())
        conn = client.connect(address)
        time.sleep(1.0)
        n = len(refused)
        assert 4 <= n <= 10, f"{n} attempts in 1 s: 0.01 s doubling up to 2 s makes 7"
        gaps = [b - a for a, b in itertools.pairwise(refused)]
        assert gaps[-1] > 4 * gaps[0], f"the gaps grow: {gaps}"
        assert isinstance(conn.last_error, OSError)
        with Messenger("store.1") as server:
            server.add_dispatcher(Store())
            server.bind(address)
            server.start()
            conn.wait_ready(5)
            reply = conn.call(Message(READ, front=(3).to_bytes(8, "little")), timeout=5)
            assert bytes(reply.data) == b"\x07" * 3


def test_a_lossless_client_sees_its_server_restart(address):
    """A lossless client whose server dies and comes back as a new process (a new
    Messenger on the same address, that knows nothing of the session): the client
    hears handle_refused while nobody listens, then handle_remote_reset when the new
    server answers SESSION_RESET; what was queued for the old server is dropped (the
    lossless_client policy: resetcheck), and the session starts again from seq 1."""
    if address.startswith("tcp://"):
        with socket.socket() as s:  # a fixed port, so the new server can bind it again
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    events: list[str] = []

    class Watch(Dispatcher):
        def handle_connect(self, conn: Connection) -> None:
            events.append("connect")

        def handle_refused(self, conn: Connection) -> None:
            events.append("refused")

        def handle_remote_reset(self, conn: Connection) -> None:
            events.append("remote_reset")

    with Messenger("client.7") as client:
        client.add_dispatcher(Watch())
        first = Store()
        with Messenger("store.1", policies={"client": Policy.stateful_server()}) as old:
            old.add_dispatcher(first)
            old.bind(address)
            old.start()
            conn = client.connect(address)
            conn.wait_ready(5)
            first.expect = 1
            conn.send(Message(WRITE, front=b"to the old one"))
            assert first.got.wait(5)
        assert wait_for(lambda: "refused" in events, timeout=5), events  # it is gone: nobody listens
        conn.send(Message(WRITE, front=b"queued for the old one"))
        second = Store()
        with Messenger("store.1", policies={"client": Policy.stateful_server()}) as new:
            new.add_dispatcher(second)
            new.bind(address)
            new.start()
            assert wait_for(lambda: "remote_reset" in events and events[-1] == "connect", timeout=5), events
            steps = [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]  # (refused: once a try)
            assert steps == ["connect", "refused", "remote_reset", "connect"], events  # a new session, a new connect
            second.expect = 1
            conn.send(Message(WRITE, front=b"to the new one"))
            assert second.got.wait(5)
            assert second.writes == [b"to the new one"]
            assert conn.session is not None and conn.session.out_seq == 1
