"""One Message type for pub/sub and the messenger (issue 3): copyless.Message is built
in the core, constructible, and is what both APIs receive and what a Connection sends."""

from __future__ import annotations

import array
import gc
import threading
import time
import weakref

import pytest

import copyless
from copyless import ClosedError, ConfigurationError, Message
from copyless.messenger import Connection, Dispatcher, Messenger, Policy

READ, READ_REPLY, WRITE = 1, 2, 3


def test_one_type_and_the_issue_3_imports():
    from copyless import Dispatcher as D
    from copyless import Messenger as M
    from copyless import Policy as P

    assert copyless.Message is copyless.messenger.Message is copyless._core.Message
    assert (M, copyless.Connection, D, P) == (Messenger, Connection, Dispatcher, Policy)
    assert {"Messenger", "Connection", "Dispatcher", "Policy", "Message"} <= set(copyless.__all__)
    assert "Messenger" in dir(copyless)
    with pytest.raises(AttributeError):
        copyless.NoSuchName  # noqa: B018


def test_construct_positional_and_keyword():
    a = Message(WRITE, b"hdr", [b"a", b"b"], 9, 4)
    b = Message(type=WRITE, front=b"hdr", data=[b"a", b"b"], tid=9, priority=4)
    for m in (a, b):
        assert (m.type, bytes(m.front), m.data, m.tid, m.priority) == (WRITE, b"hdr", [b"a", b"b"], 9, 4)
        assert (m.seq, m.is_reply, m.connection, m.released) == (0, False, None, False)
    d = Message(1)
    assert (d.front, d.data, d.tid, d.tag, d.priority) == (b"", [], 0, 0, 0)
    assert isinstance(d, Message) and type(d) is Message
    assert "tid=0" in repr(d)


def test_data_one_buffer_becomes_a_list_and_a_sequence_a_new_list():
    buf = bytearray(b"xyz")
    assert Message(1, data=buf).data == [buf] and Message(1, data=buf).data[0] is buf
    mv = memoryview(b"abc")
    assert Message(1, data=mv).data[0] is mv
    arr = array.array("i", [1, 2, 3])  # any buffer, not only bytes/bytearray/memoryview
    assert Message(1, data=arr).data[0] is arr
    mine = [b"a", b"b"]
    m = Message(1, data=mine)
    assert m.data == mine and m.data is not mine, "the caller's list is not aliased"
    assert Message(1, data=(b"a", b"b")).data == [b"a", b"b"]
    assert Message(1, data=(x for x in [b"a"])).data == [b"a"]
    with pytest.raises(TypeError, match="not str"):
        Message(1, data="text")
    with pytest.raises(TypeError, match=r"data\[1\] is a int"):
        Message(1, data=[b"a", 5])
    with pytest.raises(TypeError, match="not int"):
        Message(1, data=5)
    with pytest.raises(TypeError, match="front must be a bytes-like object"):
        Message(1, front="text")


def test_field_ranges():
    assert Message(2**32 - 1).type == 2**32 - 1, "the core's type is a u32 (pub/sub)"
    assert Message(1, tid=2**64 - 1).tid == 2**64 - 1
    for kw in (
        {"type": -1},
        {"type": 2**32},
        {"type": 1, "tid": -1},
        {"type": 1, "tid": 2**64},
        {"type": 1, "priority": 256},
    ):
        with pytest.raises(ConfigurationError):
            Message(**kw)
    with pytest.raises(TypeError):
        Message("1")


def test_tag_and_tid_are_one_field():
    m = Message(1, tid=7)
    assert m.tag == 7
    m.tag = 8
    assert m.tid == 8
    m.tid = 9
    assert m.tag == 9


def test_reply_keeps_tid_and_priority():
    m = Message(READ, b"q", tid=41, priority=3)
    m.seq = 5
    r = m.reply(READ_REPLY, front=b"ok", data=b"payload")
    assert type(r) is Message
    assert (r.type, bytes(r.front), r.data, r.tid, r.priority, r.is_reply, r.seq) == (
        READ_REPLY,
        b"ok",
        [b"payload"],
        41,
        3,
        True,
        0,
    )
    assert not m.is_reply
    assert m.reply(READ_REPLY).data == [] and m.reply(type=READ_REPLY, data=[b"a", b"b"]).data == [b"a", b"b"]


def test_what_the_messenger_sets_is_settable():
    m = Message(1)
    m.seq, m.is_reply, m.tid, m.priority, m.type = 3, True, 4, 5, 6
    sentinel = object()
    m.connection = sentinel
    assert (m.seq, m.is_reply, m.tid, m.priority, m.type, m.connection) == (3, True, 4, 5, 6, sentinel)
    m.connection = None
    assert m.connection is None
    view = memoryview(bytearray(b"abc"))
    m.data = view  # a received message's data: one buffer, kept as it is
    assert m.data is view
    m.data = [b"a"]
    assert m.data == [b"a"]
    m.front = b"f"
    assert m.front == b"f"
    with pytest.raises(TypeError):
        m.data = 5
    with pytest.raises(TypeError):
        m.front = "f"
    with pytest.raises(ConfigurationError):
        m.priority = 300
    with pytest.raises(AttributeError):
        del m.data
    with pytest.raises(AttributeError):
        m.nbytes = 3  # type: ignore[misc]


def test_nbytes_len_and_tobytes_count_every_buffer():
    ints = array.array("i", [1, 2])
    m = Message(1, front=b"front is not data", data=[b"ab", bytearray(b"c"), memoryview(b"def"), ints])
    assert m.nbytes == len(m) == 6 + ints.itemsize * 2
    assert m.tobytes() == b"abcdef" + ints.tobytes()
    assert Message(1).nbytes == 0 and Message(1).tobytes() == b""


def test_release_drops_front_and_data_and_is_idempotent():
    data = bytearray(b"abc")
    ref = weakref.ref(m := Message(1, b"f", [memoryview(data)], tid=2))
    conn = object()
    m.connection = conn
    m.release()
    m.release()
    assert m.released and m.nbytes == 3, "nbytes still says what it held"
    for get in (lambda: m.data, lambda: m.front, lambda: m.tobytes(), lambda: memoryview(m)):
        with pytest.raises(ClosedError):
            get()
    with pytest.raises(ClosedError):
        m.data = [b"x"]
    assert m.connection is conn and m.tid == 2, "what identifies it stays: one can still reply"
    assert m.reply(2).tid == 2
    data.extend(b"d")  # no view of it is held any more: the bytearray may resize
    assert ref() is m
    with Message(1, data=b"x") as w:
        assert w.data == [b"x"]
    assert w.released


def test_buffer_protocol_exposes_one_contiguous_buffer():
    src = bytearray(b"payload")
    received = Message._received(WRITE, memoryview(b"f"), memoryview(src), 1, 0, 1, False, None)
    v = memoryview(received)
    assert bytes(v) == b"payload" and v.obj is received.data, "the view is of the data's own buffer"
    src[0:1] = b"P"
    assert bytes(v) == b"Payload", "no copy"
    assert bytes(Message(1, data=b"one")) == b"one", "one buffer in the list is one buffer"
    with pytest.raises(TypeError, match="2 buffers, not one"):
        memoryview(Message(1, data=[b"a", b"b"]))
    with pytest.raises(TypeError, match="0 buffers"):
        memoryview(Message(1))
    with pytest.raises(TypeError, match="not contiguous"):
        memoryview(Message(1, data=memoryview(b"abcd")[::2]))
    loop = Message(1)
    loop.data = [loop]  # a Message is a buffer, so its data may hold itself: an error, not a crash
    with pytest.raises(RecursionError):
        memoryview(loop)
    loop.release()


def test_a_cycle_through_the_connection_is_collected():
    class Conn:
        pass

    gc.collect()
    c = Conn()
    m = Message(1, data=[b"x"])
    m.connection = c
    c.last = m  # type: ignore[attr-defined]
    assert gc.is_tracked(m) and c in gc.get_referents(m)
    dead = weakref.ref(m)
    del m, c
    assert dead() is not None, "the cycle keeps it: only the collector can free it"
    gc.collect()
    assert dead() is None


def test_pubsub_messages_are_read_only_and_untracked(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(b"hello", type=2**32 - 1, tag=2**63 + 5)
        msg = sub.recv(timeout=1)
        assert type(msg) is Message
        assert (msg.type, msg.tag, msg.tid, msg.front, msg.priority, msg.is_reply, msg.connection) == (
            2**32 - 1,
            2**63 + 5,
            2**63 + 5,
            b"",
            0,
            False,
            None,
        )
        assert msg.data.readonly and msg.data.obj is msg and bytes(msg) == b"hello"
        assert [bytes(b) for b in msg._buffers] == [b"hello"]
        assert not gc.is_tracked(msg), "no collector work on the pub/sub hot path"
        for attr, value in (
            ("data", [b"x"]),
            ("front", b"x"),
            ("tid", 1),
            ("tag", 1),
            ("seq", 1),
            ("connection", None),
        ):
            with pytest.raises(AttributeError, match="read-only"):
                setattr(msg, attr, value)
        r = msg.reply(3, data=b"ok")
        assert (r.tid, r.is_reply, r.data) == (2**63 + 5, True, [b"ok"])
        msg.release()
        with pytest.raises(ClosedError):
            msg.data  # noqa: B018


class Keep(Dispatcher):
    """Replies to READ; keeps every other message, released inside `with`, for the test."""

    def __init__(self) -> None:
        self.kept: list[Message] = []
        self.views: list[bytes] = []
        self.done = threading.Event()
        self.expect = 1

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == READ

    def fast_dispatch(self, msg: Message) -> None:
        msg.connection.send(msg.reply(READ_REPLY, front=bytes(msg.front), data=[b"re", b"ply"]))

    def dispatch(self, msg: Message) -> None:  # queued: the dispatch thread
        with msg:  # releasing in dispatch must not upset the throttles' bookkeeping
            self.views.append(bytes(memoryview(msg)))
            self.kept.append(msg)
        if len(self.kept) >= self.expect:
            self.done.set()


@pytest.fixture
def keep_server(tmp_path):
    d = Keep()
    m = Messenger("store.1", policies={"client": Policy.stateful_server()}, throttle_bytes=1 << 20)
    m.add_dispatcher(d)
    addr = m.bind(f"unix://{tmp_path}/m.sock")
    m.start()
    yield m, d, addr
    m.shutdown()


def test_round_trip_over_unix_with_scatter_gather(keep_server):
    server, d, addr = keep_server
    d.expect = 2
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        conn.send(Message(WRITE, front=b"hdr", data=[b"ab", bytearray(b"cd"), memoryview(b"ef")], tid=77, priority=9))
        conn.send(Message(WRITE, front=b"two", data=array.array("B", b"gh")))
        reply = conn.call(Message(READ, front=b"q"), timeout=5)
        assert type(reply) is Message and reply.is_reply and reply.connection is conn
        assert (reply.type, bytes(reply.front), bytes(reply.data), reply.nbytes) == (READ_REPLY, b"q", b"reply", 5)
        assert d.done.wait(5)
    first, second = d.kept
    assert d.views == [b"abcdef", b"gh"], "scatter-gather on the wire, one buffer on arrival"
    assert (first.type, first.tid, first.priority, first.is_reply, first.nbytes) == (WRITE, 77, 9, False, 6)
    assert first.released and second.released
    assert first.seq + 1 == second.seq and first.connection is second.connection
    assert isinstance(first.connection, Connection) and first.connection.messenger is server
    # dispatch() sets `done` before the dispatch thread gives the throttles back: wait for that
    deadline = time.monotonic() + 5
    while server._throttles[1].used and time.monotonic() < deadline:
        time.sleep(0.001)
    assert server._throttles[1].used == 0, "the dispatch thread accounted for released messages"


def test_the_messenger_refuses_types_wider_than_16_bits(keep_server):
    _, d, addr = keep_server
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        with pytest.raises(ConfigurationError, match="u16"):
            conn.send(Message(1 << 16))
        with pytest.raises(ConfigurationError, match="u16"):
            conn.call(Message(1 << 16), timeout=5)
        assert bytes(conn.call(Message(READ, front=b"still"), timeout=5).front) == b"still"


def test_a_pubsub_message_is_sent_on_as_it_is(keep_server, name):
    _, d, addr = keep_server
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub, Messenger("client.7") as client:
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(b"from shared memory", type=WRITE, tag=1234)
        conn = client.connect(addr)
        conn.wait_ready(5)
        with sub.recv(timeout=1) as msg:
            conn.send(msg)
        assert d.done.wait(5)
    (got,) = d.kept
    assert (got.type, got.tid, d.views) == (WRITE, 1234, [b"from shared memory"])


def test_received_messages_in_a_cycle_with_their_connection_are_collected(tmp_path):
    def run() -> list[weakref.ref[Message]]:
        d = Keep()
        d.expect = 3
        server = Messenger("store.1", policies={"client": Policy.stateful_server()})
        server.add_dispatcher(d)
        addr = server.bind(f"unix://{tmp_path}/c.sock")
        server.start()
        with Messenger("client.7") as client:
            conn = client.connect(addr)
            conn.wait_ready(5)
            for i in range(3):
                conn.send(Message(WRITE, data=[b"%d" % i]))
            assert d.done.wait(5)
        server.shutdown()
        # message -> connection -> messenger -> dispatcher -> list -> message
        assert all(m.connection.messenger._dispatchers[0].kept is d.kept for m in d.kept)
        return [weakref.ref(m) for m in d.kept]

    gc.collect()
    gc.disable()  # so that only the collection below can free the cycle
    try:
        refs = run()
        assert all(r() is not None for r in refs), "nothing but the collector frees a cycle"
        gc.collect()
    finally:
        gc.enable()
    assert [r() for r in refs] == [None] * 3
