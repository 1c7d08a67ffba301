"""Queued dispatch: priorities, and throttles that push back through the transport
instead of growing memory when the dispatcher is slow."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import wait_for

from copyless.errors import ConfigurationError
from copyless.messenger import Dispatcher, Message, Messenger, Policy

WRITE = 3

# each test runs over the compiled read round and over the Python one
pytestmark = pytest.mark.usefixtures("read_path")


class Gate(Dispatcher):
    """Queued dispatch that blocks until the gate opens; records what it saw."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.seen: list[tuple[int, bytes, int]] = []
        self.done = threading.Event()
        self.entered = threading.Event()
        self.expect = 0

    def dispatch(self, msg: Message) -> None:
        self.entered.set()
        self.open.wait(20)
        self.seen.append((msg.priority, bytes(msg.front), len(msg.data)))
        if len(self.seen) >= self.expect:
            self.done.set()


@pytest.fixture
def gated(tmp_path):
    made: list[Messenger] = []

    def make(**kw):
        gate = Gate()
        m = Messenger("store.1", policies={"client": Policy.stateful_server()}, **kw)
        m.add_dispatcher(gate)
        addr = m.bind(f"unix://{tmp_path}/d{len(made)}.sock")
        m.start()
        made.append(m)
        return m, gate, addr

    yield make
    for m in made:
        m.shutdown()


def held_in_the_transport(server: Messenger, queued: int, held: int) -> None:
    """The dispatch queue fills to `queued` messages and stays there: the server's one
    connection stopped reading, holding a frame whose body (`held` bytes) did not fit."""
    assert wait_for(lambda: server._queue.qsize() == queued)
    time.sleep(0.2)
    (srv_conn,) = [c for c in server._connections if c._machine is not None]
    assert server._queue.qsize() == queued
    assert srv_conn._paused, "the connection stopped reading: the next body did not fit"
    reader = srv_conn._machine.reader
    assert reader.paused and reader.held_bytes == held


def test_message_throttle_holds_the_rest_in_the_transport(gated):
    server, gate, addr = gated(throttle_messages=10)
    n = 3000
    gate.expect = n
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i in range(n):
            # 6 MB: more than the unix socket's buffers hold (transports.UNIX_SNDBUF)
            conn.send(Message(WRITE, front=b"%06d" % i, data=[bytes(2000)]))
        msgs = server._throttles[0]
        assert wait_for(lambda: msgs.used == 10), "the throttle filled"
        time.sleep(0.2)
        assert msgs.used == 10 and server._queue.qsize() <= 10, "no more than the limit waits for dispatch"
        assert conn._sendq.pending > 0, "the rest waits on the sender's side: push-back through the socket"
        gate.open.set()
        assert gate.done.wait(20)
    assert [f for _, f, _ in gate.seen] == [b"%06d" % i for i in range(n)], "all of them, in order"
    assert wait_for(lambda: msgs.used == 0), "everything went back"


def test_byte_throttle_is_taken_before_the_body_is_read(gated):
    server, gate, addr = gated(throttle_bytes=1 << 20, dispatch_throttle_bytes=None)
    n, size = 12, 256 << 10
    gate.expect = n
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i in range(n):
            conn.send(Message(WRITE, front=b"%02d" % i, data=[bytes(size)]))
        nbytes = server._throttles[1]
        # three bodies fit in 1 MiB: one in dispatch (blocked), two queued, the fourth held
        held_in_the_transport(server, queued=2, held=size + 2)
        assert nbytes.used == 3 * (size + 2)
        gate.open.set()
        assert gate.done.wait(20)
    assert [f for _, f, _ in gate.seen] == [b"%02d" % i for i in range(n)]
    assert all(n == size for _, _, n in gate.seen)
    assert wait_for(lambda: nbytes.used == 0)


def test_a_message_larger_than_the_byte_throttle_still_passes_alone(gated):
    server, gate, addr = gated(throttle_bytes=64 << 10)
    gate.open.set()
    gate.expect = 3
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        for i, size in enumerate((10, 1 << 20, 10)):
            conn.send(Message(WRITE, front=b"%d" % i, data=[bytes(size)]))
        assert gate.done.wait(10)
    assert [(f, n) for _, f, n in gate.seen] == [(b"0", 10), (b"1", 1 << 20), (b"2", 10)]


def test_dispatch_throttle_bounds_the_bytes_waiting_for_dispatch(gated):
    """The dispatch throttle (dispatch_throttle_bytes, Ceph's dispatch throttler) alone:
    the bytes of queued messages, counting the one in dispatch() until it returns, never
    exceed the limit; a message larger than the limit is the one exception, and it
    waits alone.  The rest waits in the transport, and nothing is lost or reordered
    once the dispatcher catches up."""
    limit, size = 1 << 20, 200_000  # five messages fit (with their 3-byte fronts), six do not
    server, gate, addr = gated(dispatch_throttle_bytes=limit)
    assert server._throttles[0].limit is None and server._throttles[1].limit is None, "this throttle alone"
    queued = server._throttles[2]
    sizes = [size] * 14 + [limit + (1 << 19)] + [size] * 14  # one over the limit, in the middle
    gate.expect = len(sizes)
    waiting: list[tuple[int, int, int]] = []  # (messages, bytes, throttle used) seen during each dispatch
    real = gate.dispatch

    def dispatch(msg: Message) -> None:
        real(msg)  # (blocks while the gate is shut)
        time.sleep(0.002)  # slow: the reader has time to fill the room that the last one left
        held = [m for _, _, m in list(server._queue.queue) if m is not None] + [msg]
        waiting.append((len(held), sum(len(m.front) + len(m.data) for m in held), queued.used))

    gate.dispatch = dispatch  # type: ignore[method-assign]
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i, n in enumerate(sizes):
            conn.send(Message(WRITE, front=b"%03d" % i, data=[bytes(n)]))
        # one message in dispatch (blocked), four queued: the sixth does not fit
        held_in_the_transport(server, queued=4, held=size + 3)
        assert queued.used == 5 * (size + 3)
        assert conn._sendq.pending > 0, "the rest waits on the sender's side: push-back through the socket"
        gate.open.set()
        assert gate.done.wait(20)
    assert [(f, n) for _, f, n in gate.seen] == [(b"%03d" % i, n) for i, n in enumerate(sizes)], "all, in order"
    for count, nbytes, used in waiting:
        assert nbytes <= limit or count == 1, (count, nbytes)
        assert used <= limit or count == 1, (count, used)
    big = [w for w in waiting if w[1] > limit]
    assert big == [(1, limit + (1 << 19) + 3, limit + (1 << 19) + 3)], "the large one passed alone"
    assert max(n for c, n, _ in waiting if c > 1) > limit - 2 * (size + 3), "the queue did fill up to the limit"
    assert wait_for(lambda: queued.used == 0), "everything went back"


def test_queued_dispatch_goes_by_priority_then_arrival(gated):
    server, gate, addr = gated()
    plan = [(0, b"first")] + [(p, b"%d-%d" % (p, i)) for i in range(5) for p in (1, 9, 5)]
    gate.expect = len(plan)
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.send(Message(WRITE, front=plan[0][1]))
        assert gate.entered.wait(5)  # "first" is in dispatch, blocked: the rest queue up behind it
        for p, front in plan[1:]:
            conn.send(Message(WRITE, front=front, priority=p))
        assert wait_for(lambda: server._queue.qsize() == len(plan) - 1)
        gate.open.set()
        assert gate.done.wait(10)
    got = [f for _, f, _ in gate.seen]
    assert got[0] == b"first"
    assert got[1:] == [b"%d-%d" % (p, i) for p in (9, 5, 1) for i in range(5)], "urgent first, FIFO within"


@pytest.mark.parametrize("option", ["throttle_messages", "throttle_bytes", "dispatch_throttle_bytes"])
def test_a_bad_throttle_limit_is_refused_and_leaves_no_thread(option):
    before = threading.active_count()
    with pytest.raises(ConfigurationError):
        Messenger("store.1", **{option: 0})
    assert threading.active_count() == before, "no I/O loop started for a messenger that was refused"
