"""The compiled send (Connection.send, copyless._codec.compiled_send) against the Python
path it stands in for (Connection._send_python -> SessionConnection.write_message).

In the steady state (a READY connection with nothing queued ahead) the core does the
whole send; everywhere else it must hand the message to the Python path.  So:
- the same sends, acks and received messages, through either path, give the same bytes
  on the wire and the same session state (differential test);
- each state that is not the steady one takes the Python path (a spy counts it), with
  the Python path's result: queued in order, after control frames, ClosedError,
  ConfigurationError;
- sends from several threads while the loop reads acks (and, through a FaultProxy,
  while the transport is cut) arrive exactly once, in each thread's order.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import address_of, in_threads, served, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from copyless import ClosedError, ConfigurationError, Message, ReplyRevoked
from copyless._codec import Lock, Writer
from copyless.messenger import Connection, Dispatcher, Messenger, Policy
from copyless.protocol.frames import Tag, encode_frame
from copyless.protocol.session import U64, OutMessage, Role, Session, SessionConnection, SessionRegistry, State
from copyless.testing import FaultProxy

pytestmark = pytest.mark.timeout(60)

_python_send = Connection._send_python


def drain(m: SessionConnection) -> bytes:
    return b"".join(bytes(b) for b in m.data_to_send())


class Twin:
    """A client Connection over a READY machine, without a Messenger or a loop: its
    writer writes each send at once into one end of a socketpair (no flusher), and
    `wire()` reads what arrived at the other.  `peer` is the server machine, for
    messages and acks the other way."""

    def __init__(self, lossless: bool = True, data_crc: bool = True) -> None:
        session = Session(lossless=lossless)
        self.m = SessionConnection(
            Role.CLIENT, "client.1", session=session, lossless=lossless, data_crc=data_crc, messages=True
        )
        self.peer = SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry(), lossless=lossless)
        for _ in range(10):
            self.peer.receive_data(drain(self.m))
            self.m.receive_data(drain(self.peer))
        assert self.m.state is State.READY and self.peer.state is State.READY
        self.m.next_events()
        self.a, self.b = socket.socketpair()
        self.b.setblocking(False)
        self.w = Writer()
        self.w.bind(self.a, self.a.fileno(), None)
        conn = Connection.__new__(Connection)  # the slots and attributes a send reads, no Messenger
        conn._closed, conn._lock, conn._machine, conn._stream, conn._sendq = False, Lock(), self.m, self.a, self.w
        conn.session, conn.peer_name, conn.address = session, "store.1", "test://"
        self.conn = conn

    @property
    def session(self) -> Session:
        assert self.m.session is not None
        return self.m.session

    def wire(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.b.recv(1 << 20)
            except BlockingIOError:
                return out
            out += chunk

    def state(self) -> tuple[Any, ...]:
        s = self.session
        sent = [
            (r.seq, r.type, r.tid, r.priority, r.is_reply, [bytes(b) for b in r.front], [bytes(b) for b in r.data])
            for r in s.sent
        ]
        return (
            s.out_seq,
            s.in_seq,
            sent,
            len(s.unsent),
            self.m._unacked_in,
            self.m._ack_due,
            len(self.m._out),
            self.m.state,
        )

    def close(self) -> None:
        self.w.clear()
        self.a.close()
        self.b.close()


@contextlib.contextmanager
def twins(**kw: Any) -> Iterator[tuple[Twin, Twin]]:
    x, y = Twin(**kw), Twin(**kw)
    try:
        yield x, y
    finally:
        x.close()
        y.close()


@pytest.fixture
def spy(monkeypatch) -> list[Connection]:
    """The connections whose send took the Python path, one entry per send."""
    calls: list[Connection] = []

    def python_send(self: Connection, msg: Message) -> None:
        calls.append(self)
        _python_send(self, msg)

    monkeypatch.setattr(Connection, "_send_python", python_send)
    return calls


def test_the_class_send_is_the_compiled_one():
    assert type(Connection.__dict__["send"]).__name__ == "method_descriptor"
    assert Connection.send.__doc__ and "send(msg)" in Connection.send.__doc__


# ------------------------------------------------------------------ the lock
def test_lock_is_reentrant_and_exclusive():
    lock = Lock()
    with lock, lock:
        assert lock._is_owned()
        took: list[bool] = []
        t = threading.Thread(target=lambda: took.append(lock.acquire(timeout=0.05)))
        t.start()
        t.join()
        assert took == [False], "another thread waited and timed out"
        assert lock.acquire(blocking=False)  # the owner again
        lock.release()
    assert not lock._is_owned()
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)


def test_a_signal_handler_interrupts_a_wait_for_the_lock():
    """A main thread waiting for the lock still runs its signal handlers (Ctrl-C)."""

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    lock, held, done = Lock(), threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (lock.acquire(), held.set(), done.wait(5), lock.release()))
    t.start()
    held.wait(5)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            lock.acquire()
        assert not lock._is_owned()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        done.set()
        t.join()
    assert lock.acquire(timeout=1), "free again once its holder let go"
    lock.release()


def test_lock_serializes_threads():
    lock, total, n = Lock(), [0], 20_000

    def work() -> None:
        for _ in range(n):
            with lock:
                v = total[0]
                time.sleep(0) if v % 5000 == 0 else None  # a switch inside the critical section now and then
                total[0] = v + 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert total[0] == 4 * n


# ------------------------------------------------------------------ differential
buffers = st.one_of(
    st.binary(max_size=96),
    st.binary(min_size=1024, max_size=3000),  # at or above the writer's coalesce: queued as a view
    st.binary(max_size=200).map(bytearray),
    st.binary(max_size=200).map(memoryview),
)
messages = st.builds(
    lambda t, front, data, tid, prio, reply: (t, front, data, tid, prio, reply),
    st.one_of(st.integers(0, 0xFFFF), st.integers(1 << 16, (1 << 32) - 1)),
    st.one_of(st.just(b""), st.binary(max_size=64), st.binary(min_size=1024, max_size=1500)),
    st.lists(buffers, max_size=4),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 255),
    st.booleans(),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), messages),
        st.tuples(st.just("receive"), st.integers(1, 70)),  # the peer sends us some: ack becomes due
        st.tuples(st.just("ack"), st.integers(0, 1000)),  # the peer acks up to a seq (an ACK frame)
        st.tuples(st.just("tick"), st.floats(0, 0.02)),  # time passes: a due ACK frame goes (control bytes)
    ),
    max_size=40,
)


def make(spec: tuple[Any, ...]) -> Message:
    t, front, data, tid, prio, reply = spec
    msg = Message(t & 0xFFFFFFFF, front=front, data=list(data), tid=tid, priority=prio)
    return msg.reply(t, front=front, data=list(data)) if reply else msg


def apply(tw: Twin, op: tuple[Any, Any], send: Callable[[Connection, Message], None], now: list[float]) -> Any:
    kind, arg = op
    if kind == "send":
        try:
            send(tw.conn, make(arg))
        except ConfigurationError as e:
            return type(e)
    elif kind == "receive":
        for i in range(arg):
            tw.peer.send_message(OutMessage(7, [b"f"], [bytes([i % 256]) * (i % 5)], tid=i))
        tw.m.receive_data(drain(tw.peer))
        tw.m.next_events()
    elif kind == "ack":
        tw.m.receive_data(b"".join(bytes(b) for b in encode_frame(Tag.ACK, [[U64.pack(arg)]])))
    elif kind == "tick":
        now[0] += arg
        tw.m.tick(now[0])
        tw.w.send(tw.m.data_to_send())  # what the owner's _pump does with control bytes
    return None


@settings(max_examples=150, deadline=None)
@given(ops=ops, lossless=st.booleans(), data_crc=st.booleans())
def test_compiled_and_python_sends_give_the_same_bytes_and_state(ops, lossless, data_crc):
    with twins(lossless=lossless, data_crc=data_crc) as (fast, slow):
        clocks = [0.0], [0.0]
        for op in ops:
            a = apply(fast, op, lambda c, m: c.send(m), clocks[0])
            b = apply(slow, op, _python_send, clocks[1])
            assert a == b, f"{op}: same outcome"
            assert fast.wire() == slow.wire(), f"{op}: same bytes"
            assert fast.state() == slow.state(), f"{op}: same session state"
            if op[0] == "send" and a is None:
                assert fast.session.out_seq > 0


def test_the_steady_state_takes_no_python(spy):
    with twins() as (tw, _):
        for i in range(100):
            tw.conn.send(Message(1, front=b"h", data=[bytes(i)], tid=i))
        assert spy == []
        assert tw.session.out_seq == 100 and [r.seq for r in tw.session.sent] == list(range(1, 101))


def test_the_ack_rides_on_the_next_message():
    with twins() as (tw, _):
        apply(tw, ("receive", 3), _python_send, [0.0])
        assert tw.m._unacked_in == 3 and tw.m._ack_due is not None
        tw.conn.send(Message(1))
        assert tw.m._unacked_in == 0 and tw.m._ack_due is None
        frame = tw.wire()
        assert struct.unpack_from("<Q", frame, 32 + 20)[0] == 3, "the header's ack_seq is what we received"


# ------------------------------------------------------------------ the fallbacks
def test_a_closed_connection_raises_closed_error(spy):
    with twins() as (tw, _):
        tw.conn._closed = True
        with pytest.raises(ClosedError):
            tw.conn.send(Message(1))
        assert spy == [tw.conn] and tw.wire() == b"" and tw.session.out_seq == 0


@pytest.mark.parametrize("ready", [True, False])
def test_a_type_wider_than_16_bits_raises_configuration_error(spy, ready):
    with twins() as (tw, _):
        if not ready:
            tw.m.state = State.SESSION
        before = tw.state()
        with pytest.raises(ConfigurationError):
            tw.conn.send(Message(1 << 16))
        assert tw.wire() == b"" and tw.state() == before, "nothing sent, nothing queued"
        assert spy == ([] if ready else [tw.conn])


@pytest.mark.parametrize("how", ["no machine", "handshake", "no stream"])
def test_a_reconnecting_connection_queues_in_order(spy, how):
    with twins() as (tw, _):
        tw.conn.send(Message(1, tid=1))
        tw.wire()
        if how == "no machine":
            tw.conn._machine = None
        elif how == "handshake":
            tw.m.state = State.SESSION
        else:
            tw.conn._stream = None
        for tid in (2, 3):
            tw.conn.send(Message(1, tid=tid))
        assert spy == [tw.conn] * 2
        assert tw.wire() == b"", "nothing written while no transport carries the session"
        assert [m.tid for m in tw.session.unsent] == [2, 3]
        tw.conn._machine, tw.conn._stream, tw.m.state = tw.m, tw.a, State.READY
        tw.conn.send(Message(1, tid=4))  # queued ahead of it: the Python path flushes them first
        assert len(spy) == 3
        assert [r.tid for r in tw.session.sent] == [1, 2, 3, 4]
        assert [r.seq for r in tw.session.sent] == [1, 2, 3, 4]
        tw.conn.send(Message(1, tid=5))  # the queue is empty again: the steady state
        assert len(spy) == 3 and tw.session.out_seq == 5


def test_queued_messages_go_first(spy):
    with twins() as (fast, slow):
        for tw in (fast, slow):
            tw.session.queue(OutMessage(2, [b"q"], [b"queued"], tid=9))
        fast.conn.send(Message(1, tid=10))
        _python_send(slow.conn, Message(1, tid=10))
        assert spy == [fast.conn]
        assert [r.tid for r in fast.session.sent] == [9, 10]
        assert fast.wire() == slow.wire() and fast.state() == slow.state()


@pytest.mark.parametrize("control", ["keepalive", "ack"])
def test_pending_control_bytes_go_first(spy, control):
    with twins() as (fast, slow):
        for tw in (fast, slow):
            if control == "keepalive":
                tw.m.keepalive(1.0)
            else:
                apply(tw, ("receive", 2), _python_send, [0.0])
                tw.m.send_ack()
            assert tw.m._out
        fast.conn.send(Message(1))
        _python_send(slow.conn, Message(1))
        assert spy == [fast.conn]
        wire = fast.wire()
        assert wire == slow.wire() and fast.state() == slow.state()
        assert wire[0] == (Tag.KEEPALIVE if control == "keepalive" else Tag.ACK), "the control frame first"
        assert not fast.m._out


def test_a_subclass_takes_the_python_path(spy):
    class Mine(Connection):
        pass

    with twins() as (tw, _):
        tw.conn.__class__ = Mine
        tw.conn.send(Message(1))
        assert spy == [tw.conn] and tw.session.out_seq == 1


def test_unexpected_slot_values_take_the_python_path(spy):
    with twins() as (tw, _):
        tw.session.unsent = []  # type: ignore[assignment]  # not a deque: the core does not guess
        tw.conn.send(Message(1))
        assert spy == [tw.conn] and tw.session.out_seq == 1


def test_a_send_waits_for_the_lock_held_by_another_thread():
    with twins() as (tw, _):
        held, go = threading.Event(), threading.Event()

        def hold() -> None:
            with tw.conn._lock:
                held.set()
                go.wait(5)
                tw.session.out_seq = 41  # a change made under the lock is what the send sees

        t = threading.Thread(target=hold)
        t.start()
        held.wait(5)
        threading.Timer(0.1, go.set).start()
        t0 = time.monotonic()
        tw.conn.send(Message(1))
        assert time.monotonic() - t0 >= 0.09, "the send waited for the holder"
        t.join()
        assert tw.session.out_seq == 42


def test_a_small_write_by_the_sending_thread_keeps_the_gil():
    """Regression: the sending thread released the GIL for its own sendmsg, with the
    connection's lock held.  An I/O loop thread that came to read an ACK frame got the
    GIL there, found the lock held and slept; the release woke it, it waited for the GIL,
    got it at the sender's next write, inside the lock again, and so on: on a shared CPU
    each round preempted the sender, whose next send then looked idle and was written
    directly too (a 64 B stream fell from ~2.5 M to 0.6-1.2 M msgs/s in a third of the
    runs).  Here a second thread asks for the GIL all the time (a 1 us switch interval):
    it would get it at any release, and it must never see a write under way."""
    a, b = socket.socketpair()
    a.setblocking(False)
    w = Writer()
    w.bind(a, a.fileno(), None)  # no flusher: each send is written by the sending thread
    seen: list[int] = []
    looks = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal looks
        while not stop.is_set():
            looks += 1
            if w.pending:
                seen.append(w.pending)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(2000):
            w.send([b"x" * 64])
            assert b.recv(4096) == b"x" * 64
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
        w.clear()
        a.close()
        b.close()
    assert w.statistics["written_by_sender"] == 2000 and looks > 0
    assert seen == [], "another thread ran while the sender wrote"


def test_a_bad_message_raises_and_leaves_the_state_alone():
    with twins() as (tw, _):
        before = tw.state()
        with pytest.raises(TypeError):
            tw.conn.send(b"not a message")  # type: ignore[arg-type]
        released = Message(1, data=[b"x"])
        released.release()
        with pytest.raises(ClosedError):
            tw.conn.send(released)
        assert tw.state() == before and tw.wire() == b""
        assert not tw.conn._lock._is_owned(), "the lock was given back"


# ------------------------------------------------------------------ threads, on a real Messenger
HEAD = struct.Struct("<HQI")  # thread, index, crc32 of the data


class Recorder(Dispatcher):
    def __init__(self) -> None:
        self.got: dict[int, list[int]] = defaultdict(list)
        self.bad = 0
        self.cond = threading.Condition()

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        t, i, crc = HEAD.unpack_from(msg.front)
        with self.cond:
            self.bad += zlib.crc32(msg.data) != crc
            self.got[t].append(i)
            self.cond.notify_all()

    def wait_one(self, t: int, n: int, timeout: float = 30) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.got[t]) >= n, timeout), (t, len(self.got[t]), n)

    def wait(self, threads: int, n: int, timeout: float = 30) -> dict[int, list[int]]:
        with self.cond:
            done = self.cond.wait_for(lambda: all(len(self.got[t]) >= n for t in range(threads)), timeout)
            assert done, {t: len(self.got[t]) for t in range(threads)}
            return {t: list(v) for t, v in self.got.items()}


def sending_threads(conn: Connection, threads: int, n: int, seed: int, pace: Recorder | None = None) -> None:
    """`threads` threads each send n messages on conn; with `pace`, each lets the
    receiver catch up every 100 (so that a FaultProxy's cuts fall all along)."""

    def run(t: int) -> None:
        rng = random.Random(seed + t)
        for i in range(n):
            data = rng.randbytes(rng.choice((0, 8, 64, 200, 1500)))
            conn.send(Message(1, front=HEAD.pack(t, i, zlib.crc32(data)), data=[data]))
            if pace is not None and i % 100 == 99:
                pace.wait_one(t, i - 50)

    in_threads(run, threads)


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_threads_sending_at_once_each_arrive_exactly_once_in_order(transport, tmp_path, name):
    threads, n = 4, 3000
    store = Recorder()
    address = address_of(transport, tmp_path, name)
    with served(store, address, default_policy=Policy.lossless_client(), io_loops=1) as (_, conn, _):
        sending_threads(conn, threads, n, seed=1)
        got = store.wait(threads, n)
        assert conn.session is not None
        deadline = time.monotonic() + 10
        while conn.session.sent and time.monotonic() < deadline:  # the loop reads the acks meanwhile
            time.sleep(0.01)
        assert not conn.session.sent, "every message acknowledged (acks were read while the threads sent)"
        assert conn.session.out_seq == threads * n
    assert got == {t: list(range(n)) for t in range(threads)}
    assert store.bad == 0


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_threads_sending_across_cuts_lose_nothing(transport, tmp_path):
    """Lossless: several threads send while the FaultProxy cuts the transport at random;
    every message arrives exactly once, in each thread's order."""
    if transport == "tcp":
        addresses = ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    else:
        addresses = (f"unix://{tmp_path}/server.sock", f"unix://{tmp_path}/proxy.sock")
    timers: dict[str, Any] = {"handshake_timeout": 2.0, "idle_timeout": 5.0, "keepalive_interval": 0.5}
    threads, n = 3, 1500
    store = Recorder()
    with (
        Messenger("store.1", policies={"client": Policy.stateful_server()}, **timers) as srv,
        Messenger("client.7", default_policy=Policy.lossless_client(), **timers) as client,
    ):
        srv.add_dispatcher(store)
        srv.start()
        with FaultProxy(srv.bind(addresses[0]), addresses[1]) as proxy:
            conn = client.connect(proxy.address)
            conn.wait_ready(5)
            proxy.cut_randomly(5_000, 60_000, seed=5)
            sending_threads(conn, threads, n, seed=7, pace=store)
            proxy.heal()
            got = store.wait(threads, n)
            cuts = proxy.statistics().connections_cut
    assert got == {t: list(range(n)) for t in range(threads)}, "exactly once, in each thread's order"
    assert store.bad == 0
    assert cuts >= 5, f"only {cuts} cuts: the test did not exercise the faults"


def test_ipc_frames_larger_than_the_ring_go_in_part_and_the_rest_waits(name):
    """Over ipc an idle writer puts a frame straight into the ring and queues only what
    does not fit.  With a 4 KiB ring, and each send (or short burst) made when the
    previous ones have left the queue, most frames go in part: the ring is partly full
    with their predecessors' tails, and the cut falls inside a header, a front, or a
    data buffer that is then queued as a view from that offset.  The other thread sends
    without waiting (its frames queue behind).  Everything arrives intact, in each
    thread's order."""
    store = Recorder()
    threads, n = 2, 300
    with (
        Messenger("store.1", policies={"client": Policy.stateful_server()}) as srv,
        Messenger("client.7", default_policy=Policy.lossless_client(), io_loops=1) as client,
    ):
        srv.add_dispatcher(store)
        srv.start()
        conn = client.connect(srv.bind(f"ipc://{name}?ring=4KiB"))  # (the bound address keeps the option)
        conn.wait_ready(5)

        def run(t: int) -> None:
            rng = random.Random(t)
            for i in range(n):
                parts = [rng.randbytes(rng.choice((0, 3, 700, 1024, 3000, 9000))) for _ in range(rng.randint(0, 3))]
                data = b"".join(parts)
                pad = rng.randbytes(rng.choice((0, 10, 1500, 5000)))
                front = HEAD.pack(t, i, zlib.crc32(data)) + pad
                conn.send(Message(1, front=front, data=[bytearray(p) if len(p) % 2 else p for p in parts]))
                deadline = time.monotonic() + 10
                while t == 0 and rng.random() < 0.7 and conn._sendq.pending and time.monotonic() < deadline:
                    time.sleep(0.0002)  # until the loop has written what waited for room

        in_threads(run, threads)
        got = store.wait(threads, n)
    assert got == {t: list(range(n)) for t in range(threads)}
    assert store.bad == 0


class Received(Dispatcher):
    """Queued dispatch of what arrives; a message of type HOLD blocks the I/O loop that
    reads it until `held` is set (the loop stops reading: the sender's path fills)."""

    HOLD = 9

    def __init__(self) -> None:
        self.got: list[tuple[int, bytes, int]] = []
        self.faults: list[BaseException] = []
        self.held = threading.Event()

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == self.HOLD

    def fast_dispatch(self, msg: Message) -> None:
        self.held.wait(10)

    def dispatch(self, msg: Message) -> None:
        self.got.append((msg.seq, bytes(msg.front), len(msg.data)))

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        self.faults.append(error)


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_a_message_revoked_in_the_middle_of_its_frame(transport, tmp_path, name):
    """Connection.revoke on a message whose frame is half written (the peer stopped
    reading): True, and its buffer is the caller's again at once (resizable: no export
    held); once the peer reads again it discards the frame, and the messages around it
    arrive in order on the same lossless connection, with no fault.  A message written
    whole is not revoked (False); one still queued is (True)."""
    server, client = Received(), Received()
    with served(server, address_of(transport, tmp_path, name)) as (cm, conn, _):
        cm.add_dispatcher(client)
        conn.send(Message(3, front=b"before"))
        assert wait_for(lambda: len(server.got) == 1)
        assert conn.revoke(Message(3, front=b"not sent")) is False
        conn.send(Message(Received.HOLD))
        big = bytearray(64 << 20)  # more than the socket buffers (or the ring) hold: its frame stops half way
        msg = Message(3, front=b"big", data=[big])
        conn.send(msg)
        qbuf = bytearray(1 << 20)
        queued = Message(3, front=b"queued behind it", data=[qbuf])
        conn.send(queued)
        assert conn.revoke(queued) is True
        time.sleep(0.1)
        assert conn.revoke(msg) is True
        big.extend(b"!")  # resizable: copyless holds no export of them
        qbuf.extend(b"!")
        conn.send(Message(3, front=b"after"))
        server.held.set()
        assert wait_for(lambda: len(server.got) == 2, timeout=10), server.got
        assert [g[1] for g in server.got] == [b"before", b"after"]
        assert [g[0] for g in server.got] == [1, 5]  # the revoked ones' seqs were spent, and counted
        assert server.faults == [] and client.faults == [] and conn.last_error is None


class RevokesItsReply(Dispatcher):
    """Answers a call with a reply too large to go at once, then revokes it half written:
    first it holds the caller's reading (a HOLD message, which the caller's thread
    fast-dispatches and waits in until `go` is set), so the reply's frame stops half way."""

    def __init__(self, go: threading.Event) -> None:
        self.go, self.revoked = go, []
        self.reply_buf = bytearray(64 << 20)

    def dispatch(self, msg: Message) -> None:
        conn = msg.connection
        conn.send(Message(Received.HOLD))
        reply = msg.reply(2, data=[self.reply_buf])
        conn.send(reply)
        time.sleep(0.1)
        self.revoked.append(conn.revoke(reply))
        self.go.set()


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_a_call_whose_reply_the_peer_revokes_fails_with_reply_revoked(transport, tmp_path, name, read_path):
    """The server revokes its reply half written: the caller gets ReplyRevoked as soon as
    it reads the aborted frame (it used to wait for its timeout), and the connection
    carries on: the next call is answered, with no fault on either side."""
    go = threading.Event()
    server = RevokesItsReply(go)
    client = Received()
    client.held = go  # the caller's thread reads, so the HOLD message waits there
    with served(server, address_of(transport, tmp_path, name)) as (cm, conn, _):
        cm.add_dispatcher(client)
        buf = bytearray(64 << 20)
        t0 = time.monotonic()
        with pytest.raises(ReplyRevoked, match="revoked its reply"):
            conn.call(Message(1), into=buf, timeout=30)
        assert time.monotonic() - t0 < 10, "not a timeout"
        assert server.revoked == [True]
        assert not cm._calls
        go.clear()
        server.revoked.clear()
        server.reply_buf = bytearray(16)  # small: written whole, so not revoked
        reply = conn.call(Message(1), into=bytearray(16), timeout=10)
        assert len(reply.data) == 16 and server.revoked == [False]
        assert client.faults == [] and conn.last_error is None
