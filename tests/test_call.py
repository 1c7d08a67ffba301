"""Connection.call runs in the core (messenger.compiled_call) when its caller reads the
reply itself, over ipc:// or a plain socket: it posts the call, leases the stream,
sends, reads its reply and gives the stream back in one C call.  These tests check
that it is taken, and that at every edge (a timeout, a sleep, an error mid-call,
unusual arguments) it leaves what the Python path leaves; each runs over both
(conftest.read_path).  (TLS streams take the Python path: test_tls.py.)"""

from __future__ import annotations

import array
import threading
import time

import pytest
from conftest import address_of, in_threads, served, wait_for

from copyless.errors import ConfigurationError, Timeout
from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy, _Call

ECHO, SILENT, LATE = 2, 3, 4


class Server(Dispatcher):
    """ECHO replies on the loop; SILENT never replies; LATE replies 50 ms later (the
    caller spins, then sleeps on the socket)."""

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type != LATE

    def fast_dispatch(self, msg: Message) -> None:
        if msg.type == ECHO:
            msg.connection.send(msg.reply(ECHO, data=[bytes(msg.data)]))

    def dispatch(self, msg: Message) -> None:
        time.sleep(0.05)
        msg.connection.send(msg.reply(LATE, data=[bytes(msg.data)]))


@pytest.fixture(params=["ipc", "unix", "tcp"])
def pair(request, name, tmp_path):
    """(client Messenger, its Connection) to a server over each transport."""
    address = address_of(request.param, tmp_path, name)
    with served(Server(), address, default_policy=Policy.lossless_client(), io_loops=1) as (client, conn, _):
        yield client, conn


def given_back(client: Messenger, conn: Connection) -> bool:
    """Nothing of a call is left: no posted call, the stream back with its loop."""
    st = conn._stream
    if client._calls or conn._leased or st is None:
        return False
    channel = getattr(st, "channel", None)
    return not channel.leased if channel is not None else st.fileno() not in conn.loop._detached


def echo(conn: Connection, i: int, buf: bytearray) -> None:
    reply = conn.call(Message(ECHO, data=[i.to_bytes(64, "little")]), into=buf, timeout=5)
    assert int.from_bytes(reply.data, "little") == i
    assert reply.data.obj is buf, "the reply's data is the posted buffer"


def test_calls_do_not_run_the_python_call(pair, monkeypatch):
    client, conn = pair
    python_call = Connection._call_python
    calls = []

    def counted(self, *args, **kw):
        calls.append(args)
        return python_call(self, *args, **kw)

    monkeypatch.setattr(Connection, "_call_python", counted)
    buf = bytearray(64)
    for i in range(300):
        echo(conn, i, buf)
    assert calls == []
    assert given_back(client, conn)


def test_a_call_makes_its_latch_only_if_its_caller_sleeps(monkeypatch):
    """A caller that sleeps makes the lock it sleeps on (_Call.wait), the finisher
    releases it if there is one: whichever comes first, the caller wakes, at once."""
    reply = Message(ECHO)
    done = _Call(None, None)  # type: ignore[arg-type]
    done.finish(reply=reply)
    assert done._latch is None and done.wait(0) and done.result() is reply
    late = _Call(None, None)  # type: ignore[arg-type]
    assert not late.wait(0.01) and late._latch is not None  # (a timeout: it made one)
    late.finish(reply=reply)
    assert late.wait(0) and late.result() is reply
    # the finish comes between the caller's look at done and its latch's store
    racing = _Call(None, None)  # type: ignore[arg-type]
    make = threading.Lock

    def lock_then_finish() -> threading.Lock:
        monkeypatch.setattr(threading, "Lock", make)
        racing.finish(reply=reply)
        return make()

    monkeypatch.setattr(threading, "Lock", lock_then_finish)
    assert racing.wait(1) and racing.result() is reply


def test_a_call_that_times_out(pair, read_path):
    client, conn = pair
    start = time.monotonic()
    with pytest.raises(Timeout, match="no reply to tid"):
        conn.call(Message(SILENT, data=[b"x"]), timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 2
    assert given_back(client, conn)
    echo(conn, 7, bytearray(64))  # and the connection goes on
    with pytest.raises(Timeout):
        conn.call(Message(SILENT), timeout=0)  # (a deadline already past: still one try)
    assert given_back(client, conn)


def test_a_late_reply_wakes_the_sleeping_caller(pair, read_path):
    client, conn = pair
    buf = bytearray(64)
    for i in range(5):  # the caller spins past its budget, arms, and sleeps on the socket
        reply = conn.call(Message(LATE, data=[i.to_bytes(64, "little")]), into=buf, timeout=5)
        assert int.from_bytes(reply.data, "little") == i and reply.data.obj is buf
        assert given_back(client, conn)
    for i in range(100):  # and the calls after a sleep are read by the caller again
        echo(conn, i, buf)


def test_a_request_longer_than_the_ring_goes_whole(pair, read_path):
    """The caller reads its stream for the call, and the loop leaves it alone: so the
    caller also writes what the stream could not take of its request at once (an ipc
    ring's room; a socket's buffer).  It hung, spinning with the GIL, past its timeout."""
    client, conn = pair
    size = 4 << 20
    request = bytes(range(256)) * (size // 256)
    buf = bytearray(size)
    for _ in range(3):
        reply = conn.call(Message(ECHO, data=[request]), into=buf, timeout=10)
        assert reply.data.obj is buf and bytes(buf) == request
        assert given_back(client, conn)
    echo(conn, 1, bytearray(64))


def test_an_error_mid_call_gives_the_stream_back(pair, read_path):
    client, conn = pair
    with pytest.raises(ConfigurationError):
        conn.call(Message(1 << 16), timeout=5)  # the send refuses a type beyond the session's u16
    assert given_back(client, conn)
    echo(conn, 1, bytearray(64))


def test_calls_from_threads_at_once(pair, read_path):
    """One caller leases the stream; the others' replies come through it or the loop."""
    client, conn = pair

    def caller(k: int) -> None:
        buf = bytearray(64)
        for i in range(200):
            echo(conn, k * 1000 + i, buf)

    in_threads(caller, 4, timeout=30)
    assert given_back(client, conn)


def test_arguments(pair, read_path):
    client, conn = pair
    buf = bytearray(64)
    reply = conn.call(Message(ECHO, data=[bytes(range(64))]), buf, 5)  # positional
    assert bytes(reply.data) == bytes(range(64)) and reply.data.obj is buf
    reply = conn.call(Message(ECHO, data=[b"abc"]))  # no buffer, no timeout
    assert bytes(reply.data) == b"abc"
    words = array.array("I", [0] * 16)  # not bytes: cast to them, as memoryview(into).cast("B")
    reply = conn.call(Message(ECHO, data=[array.array("I", range(16)).tobytes()]), into=words, timeout=5)
    assert list(words) == list(range(16))
    msg = Message(ECHO, data=[b"t"])
    conn.call(msg, timeout=5)
    assert msg.tid != 0  # the call gave it its transaction id
    with pytest.raises(TypeError):
        conn.call(Message(ECHO), buf, into=buf)
    with pytest.raises(TypeError):
        conn.call(Message(ECHO), deadline=5)
    with pytest.raises(TypeError):
        conn.call(Message(ECHO), memoryview(bytearray(8))[::2])  # not contiguous
    with pytest.raises(AttributeError):
        conn.call(b"not a message", timeout=5)
    assert given_back(client, conn)


class Faults(Server):
    """Server, noting its faults (and BIG requests get a 1 MiB reply of their own)."""

    def __init__(self) -> None:
        self.faults: list[BaseException] = []

    def fast_dispatch(self, msg: Message) -> None:
        if msg.type == BIG:
            i = int.from_bytes(msg.data, "little")
            msg.connection.send(msg.reply(BIG, data=[bytes([i & 0xFF]) * (1 << 20)]))
        else:
            super().fast_dispatch(msg)

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        self.faults.append(error)


BIG = 5


@pytest.mark.parametrize("transport", ["ipc", "unix", "tcp"])
def test_large_replies_back_to_back_never_fault(transport, name, tmp_path):
    """A reply larger than the ipc ring is written in turns, as the caller frees room:
    call after call, every reply lands whole in the posted buffer and neither side sees
    a fault.  (An ipc write whose large copy published the head as it went, and then
    re-read the peer's tail for its next piece, checked that tail against the head from
    before the write: a caller that had read the published part already looked out of
    bounds, 'its tail index on our ring is out of bounds', and the connection was torn
    down and replayed, a 5-80 ms stall per call in the benchmark.)"""
    server, client = Faults(), Faults()
    with served(server, address_of(transport, tmp_path, name), default_policy=Policy.lossless_client()) as (
        m,
        conn,
        _,
    ):
        m.add_dispatcher(client)
        buf = bytearray(1 << 20)
        for i in range(60):
            reply = conn.call(Message(BIG, data=[i.to_bytes(8, "little")]), into=buf, timeout=10)
            assert reply.data.obj is buf and len(reply.data) == 1 << 20
            assert buf.count(bytes([i & 0xFF])) == 1 << 20, f"call {i}: the reply is not whole"
        assert server.faults == [] and client.faults == [] and conn.last_error is None


class Gated(Dispatcher):
    """Replies (with what came) once the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def dispatch(self, msg: Message) -> None:
        assert self.gate.wait(5)
        msg.connection.send(msg.reply(ECHO, data=[bytes(msg.data)]))


class Forger(Dispatcher):
    """Answers a call twice, with as many bytes as came: first a reply forged for the
    tid in its front (0xEE), then its own (0xAA)."""

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        forged = msg.reply(ECHO, data=[b"\xee" * len(msg.data)])
        forged.tid = int.from_bytes(msg.front, "little")
        msg.connection.send(forged)
        msg.connection.send(msg.reply(ECHO, data=[b"\xaa" * len(msg.data)]))


class Recorder(Dispatcher):
    def __init__(self) -> None:
        self.got: list[tuple[int, bool, int]] = []

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        self.got.append((msg.tid, msg.is_reply, len(msg.data)))


@pytest.mark.parametrize("size", [64, 1 << 20], ids=["small", "direct"])
@pytest.mark.parametrize("transport", ["ipc", "unix", "tcp"])
def test_a_peer_cannot_answer_a_call_made_to_another(transport, size, tmp_path, name, read_path):
    """Transaction ids are the Messenger's: a reply that comes on another connection
    (a peer that guessed or was sent the tid) neither finishes the call nor lands in
    its buffer, whether the loop reads it or a caller of that connection does (and
    reads its reply's data straight into its own buffer); it is dispatched as any
    message, and each call gets its own reply."""
    gated, recorder = Gated(), Recorder()
    with (
        Messenger("store.1", policies={"client": Policy.stateful_server()}) as s1,
        Messenger("store.2", policies={"client": Policy.stateful_server()}) as s2,
        Messenger("client.7", io_loops=1) as client,
    ):
        s1.add_dispatcher(gated)
        s2.add_dispatcher(Forger())
        client.add_dispatcher(recorder)
        (tmp_path / "1").mkdir()
        a1 = s1.bind(address_of(transport, tmp_path / "1", name + "a"))
        a2 = s2.bind(address_of(transport, tmp_path, name + "b"))
        s1.start()
        s2.start()
        conn1, conn2 = client.connect(a1), client.connect(a2)
        conn1.wait_ready(5)
        conn2.wait_ready(5)
        tid, buf, result = 1 << 40, bytearray(size), []
        caller = threading.Thread(
            target=lambda: result.append(conn1.call(Message(ECHO, data=[b"q" * 16], tid=tid), into=buf, timeout=10))
        )
        caller.start()
        try:
            assert wait_for(lambda: tid in client._calls)
            mine = bytearray(size)  # (this caller reads conn2, while the loop reads conn1)
            reply = conn2.call(Message(ECHO, front=tid.to_bytes(8, "little"), data=[bytes(size)]), into=mine, timeout=5)
            assert bytes(reply.data) == b"\xaa" * size and reply.data.obj is mine
            assert wait_for(lambda: recorder.got)
            assert recorder.got == [(tid, True, size)]
            assert not client._calls[tid].done and bytes(buf) == bytes(size)
        finally:
            gated.gate.set()
            caller.join(10)
        assert bytes(result[0].data) == b"q" * 16 and result[0].data.obj is buf
        assert bytes(buf[16:]) == bytes(size - 16)
