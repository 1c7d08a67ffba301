"""The ipc:// rings in the compiled core (copyless._core.IpcChannel), without the transport:
two channels over two sealed segments and a socketpair for the doorbell.

Wrap-around with random chunk sizes, a full ring (the writer waits and is woken once half
the ring is free), the reader's sleep generations (at most one wake byte per sleep), and
the bounds checks on every index read from the peer's segment."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copyless import _shm
from copyless._core import IPC_CLOSED, IPC_RING, IPC_RX_TAIL, IPC_TX_HEAD, IpcChannel, ipc_run_streams
from copyless._ioloop import IOLoop
from copyless.errors import ClosedError, RemoteProtocolError
from copyless.transports._ipc import _new_segment


class Pair:
    """a writes to b and b to a; sa/sb are their ends of the doorbell socket."""

    def __init__(self, cap_a: int = 4096, cap_b: int = 4096) -> None:
        self.sa, self.sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sa.setblocking(False)
        self.sb.setblocking(False)
        fda, self.ma = _new_segment("test-a", cap_a)
        fdb, self.mb = _new_segment("test-b", cap_b)
        try:
            pa = _shm.map_peer(fda, IPC_RING + cap_a, writable=False)
            pb = _shm.map_peer(fdb, IPC_RING + cap_b, writable=False)
        finally:
            os.close(fda)
            os.close(fdb)
        self.a = IpcChannel(self.ma, pb, self.sa.fileno())
        self.b = IpcChannel(self.mb, pa, self.sb.fileno())

    def close(self) -> None:
        self.a.close()
        self.b.close()
        self.sa.close()
        self.sb.close()
        del self.ma, self.mb


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def bells(sock: socket.socket) -> int:
    """Wake bytes waiting in a doorbell socket (read without consuming them)."""
    try:
        return len(sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(st.lists(st.integers(0, 3000), min_size=1, max_size=4), min_size=1, max_size=40),
    reads=st.lists(st.integers(1, 5000), min_size=1, max_size=40),
)
def test_bytes_arrive_in_order_across_wrap_around(writes, reads):
    """Random scatter-gather writes and random read sizes through a 4 KiB ring, which wraps
    many times: every byte arrives once, in order."""
    p = Pair()
    try:
        src = os.urandom(sum(sum(w) for w in writes))
        sent, got = 0, bytearray()
        pending = [[n for n in w] for w in writes]
        i = 0
        while sent < len(src) or p.b.available():
            if pending:
                bufs, pos = [], sent
                for n in pending[0]:
                    bufs.append(memoryview(src)[pos : pos + n])
                    pos += n
                k = p.a.send(bufs)
                assert 0 <= k <= pos - sent
                sent += k
                # what did not fit goes next time, as SendQueue would
                left, rest = k, []
                for n in pending[0]:
                    take = min(n, left)
                    left -= take
                    if n - take:
                        rest.append(n - take)
                pending[0] = rest
                if not rest:
                    pending.pop(0)
            buf = bytearray(reads[i % len(reads)])
            i += 1
            try:
                n = p.b.recv_into(buf)
            except BlockingIOError:
                continue
            assert n > 0
            got += buf[:n]
        assert bytes(got) == src
    finally:
        p.close()


def test_large_copies_without_the_gil_stay_intact():
    """Copies of 64 KiB or more run with the GIL released, while another thread runs."""
    p = Pair(cap_a=4 << 20)
    try:
        data = os.urandom(3 << 20)
        stop = threading.Event()

        def other() -> None:
            while not stop.is_set():
                pass

        t = threading.Thread(target=other)
        t.start()
        try:
            for _ in range(20):
                assert p.a.send([memoryview(data)]) == len(data)
                out = bytearray(len(data))
                assert p.b.recv_into(out) == len(data)
                assert out == data
        finally:
            stop.set()
            t.join()
    finally:
        p.close()


def test_a_full_ring_makes_the_writer_wait_and_half_free_wakes_it(pair: Pair):
    a, b = pair.a, pair.b
    assert a.send([bytes(5000)]) == 4096, "as much as fits"
    assert a.statistics()["writer_waits"] == 1, "what did not fit waits for room already"
    assert a.send([b"x"]) == 0, "full: the writer waits (a new wait)"
    assert a.statistics()["writer_waits"] == 2
    assert not readable(pair.sa)
    buf = bytearray(1000)
    assert b.recv_into(buf) == 1000
    assert not readable(pair.sa), "1000 of 4096 free: not yet (the writer wants half the ring)"
    assert b.recv_into(buf) == 1000 and b.recv_into(buf) == 1000
    assert bells(pair.sa) == 1, "half the ring free: one wake byte"
    assert b.recv_into(buf) == 1000
    assert bells(pair.sa) == 1, "still one: each wait gets at most one wake"
    assert a.send([bytes(4000)]) == 4000
    assert b.statistics()["wakeups_sent"] == 1


def test_a_reader_that_sleeps_gets_one_wake_per_sleep(pair: Pair):
    a, b = pair.a, pair.b
    buf = bytearray(100)
    for _ in range(3):  # the reader is awake: writes cost no wake-up
        a.send([b"m"])
    assert a.statistics()["wakeups_sent"] == 0
    assert b.recv_into(buf) == 3
    with pytest.raises(BlockingIOError):
        b.recv_into(buf)  # empty: the reader says it goes to sleep
    for _ in range(10):
        a.send([b"m"])
    assert a.statistics()["wakeups_sent"] == 1 and bells(pair.sb) == 1, "ten writes, one wake"
    assert b.recv_into(buf) == 10  # awake again
    a.send([b"m"])
    assert a.statistics()["wakeups_sent"] == 1
    assert b.recv_into(buf) == 1
    with pytest.raises(BlockingIOError):
        b.recv_into(buf)  # the next sleep drains the old byte and is a new generation
    assert bells(pair.sb) == 0
    a.send([b"m"])
    assert a.statistics()["wakeups_sent"] == 2 and bells(pair.sb) == 1


def test_arm_costs_nothing_when_already_armed_and_reports_data(pair: Pair):
    a, b = pair.a, pair.b
    assert b.arm() is False  # armed: sleep
    assert b.arm() is False  # still armed, nothing came (no new generation, no wake byte owed)
    a.send([b"hello"])
    assert bells(pair.sb) == 1
    assert b.arm() is True, "data came: do not sleep"
    assert b.recv_into(bytearray(10)) == 5


def test_before_wait_spins_until_data(pair: Pair):
    a, b = pair.a, pair.b
    b.spin = 0.5
    threading.Timer(0.01, lambda: a.send([b"late"])).start()
    assert b.before_wait() is True, "the data came while it spun"
    assert b.recv_into(bytearray(10)) == 4
    assert a.statistics()["wakeups_sent"] == 0, "a spinning reader needs no wake-up"
    b.spin = 0
    assert b.before_wait() is False


def test_a_lease_that_slept_leaves_no_bell_behind(pair: Pair):
    """A caller that armed and slept reads its reply without draining the bell that woke
    it: give_back() drains it.  Left there, it woke the I/O loop at every hand-back,
    which found the next call's lease and took the stream off and on its epoll."""
    a, b = pair.a, pair.b
    b.spin = 0
    b.take()
    assert b.before_wait() is False, "nothing yet: armed, the caller sleeps"
    a.send([b"reply"])
    assert bells(pair.sb) == 1, "the writer rang for the sleeper"
    assert b.recv_into(bytearray(10)) == 5, "read from the ring: the byte stays"
    assert b.give_back() is False, "nothing left to read"
    assert bells(pair.sb) == 0, "the bell went with the lease"
    a.send([b"next"])
    assert bells(pair.sb) == 1, "armed for the loop: a new wake"
    b.take()
    assert b.recv_into(bytearray(10)) == 4
    assert b.give_back() is False
    assert bells(pair.sb) == 1, "a lease that never armed reads no socket (the loop drains that bell)"
    b.take()
    assert b.give_back(True) is False, "woke: the loop was woken during the lease"
    assert bells(pair.sb) == 0, "so that bell is drained too"


def test_a_write_that_fills_the_cached_room_exactly_looks_again(pair: Pair):
    """The writer's view of the free room is cached; when it runs out exactly at the end
    of a buffer with more to go, it reads the peer's tail again instead of waiting."""
    a, b = pair.a, pair.b
    buf = bytearray(4096)
    assert a.send([bytes(3000)]) == 3000
    assert b.recv_into(buf) == 3000  # the reader freed it all; the writer's cache says 1096
    assert a.send([bytes(1096), bytes(500)]) == 1596, "all of it"
    assert a.statistics()["writer_waits"] == 0


def test_closed_peer_reads_as_the_end_after_its_data(pair: Pair):
    a, b = pair.a, pair.b
    a.send([b"last words"])
    a.close()
    buf = bytearray(100)
    assert b.recv_into(buf) == 10 and buf[:10] == b"last words"
    assert b.recv_into(buf) == 0, "closed flag, ring drained: the end"
    with pytest.raises(ClosedError):
        a.send([b"x"])


def test_a_bad_head_from_the_peer_is_a_protocol_error_on_that_channel_only(pair: Pair):
    other = Pair()
    try:
        pair.a.send([b"fine"])
        struct.pack_into("<Q", memoryview(pair.ma), IPC_TX_HEAD, 1 << 40)  # a hostile peer's own segment
        with pytest.raises(RemoteProtocolError, match="head index"):
            pair.b.recv_into(bytearray(100))
        with pytest.raises(RemoteProtocolError):
            pair.b.recv_into(bytearray(100))  # and it stays broken
        assert pair.sa.recv(10) == b"", "the socket is shut down: the peer sees the end"
        other.a.send([b"unaffected"])
        assert other.b.recv_into(bytearray(100)) == 10
    finally:
        other.close()


def test_a_bad_tail_from_the_peer_stops_the_writer_and_fails_its_reads(pair: Pair):
    pair.a.send([bytes(4000)])
    assert pair.a.send([bytes(200)]) == 96
    struct.pack_into("<Q", memoryview(pair.mb), IPC_RX_TAIL, 1 << 50)  # more than was ever written
    assert pair.a.send([bytes(10)]) == 0, "a send does not raise into the application"
    with pytest.raises(RemoteProtocolError, match="tail index"):
        pair.a.recv_into(bytearray(10))  # the read side reports it
    assert pair.sb.recv(10) == b""


def test_a_peer_segment_with_a_bad_header_is_refused():
    sa, sb = socket.socketpair()
    fd1, mine = _new_segment("mine", 4096)
    fd2, bad = _new_segment("bad", 4096)
    try:
        peer = _shm.map_peer(fd2, IPC_RING + 4096, writable=False)
        struct.pack_into("<I", memoryview(bad), 0, 0xDEADBEEF)
        with pytest.raises(RemoteProtocolError, match="magic"):
            IpcChannel(mine, peer, sa.fileno())
        struct.pack_into("<IIQ", memoryview(bad), 0, 0x53494C43, 1, 3000)  # not a power of two
        with pytest.raises(RemoteProtocolError, match="capacity"):
            IpcChannel(mine, peer, sa.fileno())
        struct.pack_into("<IIQ", memoryview(bad), 0, 0x53494C43, 7, 4096)
        with pytest.raises(RemoteProtocolError, match="version"):
            IpcChannel(mine, peer, sa.fileno())
        del peer
    finally:
        os.close(fd1)
        os.close(fd2)
        sa.close()
        sb.close()


def test_close_marks_the_segment_closed(pair: Pair):
    pair.a.close()
    assert struct.unpack_from("<I", memoryview(pair.ma), IPC_CLOSED)[0] == 1
    assert pair.a.closed and pair.a.segment is None


class Spinning:
    """What an I/O loop reads of an IpcStream when it spins (ipc_run_streams)."""

    def __init__(self, channel: IpcChannel | None, loop_spin: float = 0.5) -> None:
        self.channel, self.loop_spin = channel, loop_spin


class Loop:
    """The I/O loop, as ipc_run_streams sees it: the callbacks it runs log themselves
    (and drain the channel), and it runs them while `_armable_cache` is its list."""

    def __init__(self, *pairs: tuple[int, IpcChannel | None, float]) -> None:
        self.ran: list[tuple[int, str]] = []
        self._armable_cache = [(fd, Spinning(ch, spin), self.reader(fd, ch), None) for fd, ch, spin in pairs]

    def reader(self, fd, ch):
        def read():
            self.ran.append((fd, "read"))
            while ch is not None and ch.available():
                ch.recv_into(bytearray(64))

        return read

    def run(self, timeout: float):
        self.ran.clear()
        return ipc_run_streams(self._armable_cache, timeout, self)


def test_the_loop_spins_over_all_its_channels_at_once():
    p, q = Pair(), Pair()
    try:
        quick = Loop((10, p.b, 0.001), (11, q.b, 0.001))
        assert quick.run(-1.0) is None and quick.ran == [], "nothing to do"
        loop = Loop((10, p.b, 0.5), (11, q.b, 0.5))
        threading.Timer(0.01, lambda: q.a.send([b"x"])).start()
        assert loop.run(-1.0) == [] and loop.ran == [(11, "read")], "the second one got data while it spun"
        q.a.send([b"y"])
        q.b.take()
        assert q.b.leased
        assert loop.run(0.001) is None and loop.ran == [], "a leased stream is its caller's: left out"
        assert q.b.give_back() and not q.b.leased, "given back with something to read"
        p.a.close()
        assert loop.run(-1.0) == [] and loop.ran == [(10, "read"), (11, "read")], "a closed peer is work too"
        assert Loop((9, None, 0.5), (10, p.b, 0.5)).run(-1.0) is None, "one in setup: no spin"
        assert q.a.statistics()["wakeups_sent"] == 0
    finally:
        p.close()
        q.close()


def test_a_loop_that_spins_is_not_rung(pair: Pair):
    """Regression: a read that found the ring empty armed it, and the loop then spun with
    the ring still armed: the peer rang for its next write, the bell made a later
    epoll_wait see the stream readable, the reader's empty read armed it again, and so
    on (test_syscalls' ipc call: a doorbell every few calls, 97 in 2000 once)."""
    with pytest.raises(BlockingIOError):
        pair.b.recv_into(bytearray(64))  # empty: armed, as for a sleep
    loop = Loop((10, pair.b, 0.5))
    threading.Timer(0.01, lambda: pair.a.send([b"x"])).start()
    assert loop.run(-1.0) == [] and loop.ran == [(10, "read")]
    assert pair.a.statistics()["wakeups_sent"] == 0, "the loop was spinning: no bell"
    assert pair.b.arm() is False and bells(pair.sb) == 0, "it arms before it sleeps"
    sleeps = pair.b.statistics()["sleeps"]
    assert loop.run(0.01) is None, "nothing came"
    assert pair.b.arm() is False and pair.b.statistics()["sleeps"] == sleeps, (
        "a ring the loop armed stays armed through a spin: arming it again drains nothing"
    )
    pair.a.send([b"y"])
    assert bells(pair.sb) == 1, "and then it is rung"


def test_the_loop_runs_callbacks_only_while_its_registrations_stand():
    """A callback that changes the loop's registrations (a new `_armable_cache`) stops the
    run: what had work and did not run (all its callbacks) is left to the loop, as epoll's events; a
    callback's Exception is printed and the run goes on; a BaseException goes up."""
    p, q, r = Pair(), Pair(), Pair()
    try:
        loop = Loop((10, p.b, 0.5), (11, q.b, 0.5), (12, r.b, 0.5))
        items = loop._armable_cache

        def first():
            loop.ran.append((10, "read"))
            raise ValueError("one connection's bug")

        def second():
            loop.ran.append((11, "read"))
            loop._armable_cache = None  # a registration changed

        items[0] = (10, items[0][1], first, None)
        items[1] = (11, items[1][1], second, lambda: loop.ran.append((11, "write")))
        for pair in (p, q, r):
            pair.a.send([b"x"])
        assert loop.run(-1.0) == [(11, select.EPOLLIN), (12, select.EPOLLIN)], "the loop runs the rest"
        assert loop.ran == [(10, "read"), (11, "read")], "not the second one's writer, nor the third one"

        def stop():
            raise KeyboardInterrupt

        loop._armable_cache = items
        items[0] = (10, items[0][1], stop, None)
        with pytest.raises(KeyboardInterrupt):
            loop.run(-1.0)
    finally:
        for pair in (p, q, r):
            pair.close()


class Counted:
    """An ipc stream as the IOLoop sees it, counting the times the loop armed it."""

    write_wakes_read = True
    leased = False

    def __init__(self, channel: IpcChannel, sock: socket.socket, loop_spin: float) -> None:
        self.channel, self.sock, self.loop_spin, self.arms = channel, sock, loop_spin, 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def arm(self) -> bool:
        self.arms += 1
        return self.channel.arm()


def test_a_loop_whose_spin_ends_at_a_timer_runs_it_without_arming(pair: Pair):
    """Regression: the loop spun until its next timer was due, then armed its ipc streams
    and waited in epoll for the whole time to that timer once more (the timeout it took
    before the spin): the timer ran that much late, and a peer that wrote meanwhile rang
    a doorbell (an ipc:// server's ack timer came due every few ms: a caller's request
    now and then cost a system call on each side, seen by test_syscalls under strace)."""
    loop = IOLoop("t-spin")
    stream = Counted(pair.b, pair.sb, loop_spin=10.0)
    arms_at_timer: list[int] = []
    fired = threading.Event()
    try:
        loop.add_reader(stream, lambda: None)
        stream.arms = 0  # (armed from outside, as registered: the loop is asleep)
        loop.call_later(0.05, lambda: (arms_at_timer.append(stream.arms), fired.set()))
        assert fired.wait(10)
        assert arms_at_timer == [0], "spun up to the timer, ran it, did not arm"
        for _ in range(100):  # no timer left: it spins its 100 ms at most, then arms and sleeps
            if stream.arms:
                break
            time.sleep(0.05)
        assert stream.arms >= 1, "a loop with nothing due arms before it sleeps"
        assert pair.a.statistics()["wakeups_sent"] == 0
    finally:
        loop.remove(stream)
        loop.stop()
