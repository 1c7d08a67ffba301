"""Lossless peers over real sockets: both Messengers connect to each other, at once, and
through faults; each keeps exactly one Connection per peer, the one connect() returned,
which keeps its queues and sequence numbers whichever socket won; a peer restart is
reported as a remote reset."""

from __future__ import annotations

import random
import threading
import time

import pytest

from copyless.errors import ConfigurationError
from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy
from copyless.protocol.session import WrongPeer
from copyless.testing import FaultProxy

pytestmark = pytest.mark.timeout(60)

DATA = 1


class Peer(Dispatcher):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.conns: set[int] = set()  # ids of the Connections messages came through
        self.resets: list[Connection] = []
        self.faults: list[BaseException] = []
        self.opened: list[tuple[str, Connection]] = []  # handle_connect / handle_accept
        self.cond = threading.Condition()

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        with self.cond:
            self.got.append(bytes(msg.front))
            self.conns.add(id(msg.connection))
            self.cond.notify_all()

    def handle_remote_reset(self, conn: Connection) -> None:
        with self.cond:
            self.resets.append(conn)
            self.cond.notify_all()

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        self.faults.append(error)

    def handle_connect(self, conn: Connection) -> None:
        self.opened.append(("connect", conn))

    def handle_accept(self, conn: Connection) -> None:
        self.opened.append(("accept", conn))

    def wait_for(self, n: int, timeout: float = 10) -> list[bytes]:
        return self.wait_until(lambda got: len(got) >= n, timeout)

    def wait_until(self, done, timeout: float = 10) -> list[bytes]:
        with self.cond:
            self.cond.wait_for(lambda: done(self.got), timeout)
            return list(self.got)


def peer(name: str, tmp_path, policy: Policy | None = None) -> tuple[Messenger, Peer, str]:
    m = Messenger(name, policies={"osd": policy or Policy.lossless_peer()}, idle_timeout=None, keepalive_interval=None)
    d = Peer()
    m.add_dispatcher(d)
    addr = m.bind(f"unix://{tmp_path}/{name}.sock")
    m.start()
    return m, d, addr


def peer_conns(m: Messenger, settle: float = 5) -> list[Connection]:
    """The Messenger's connections, once the attempts that lost a race have been closed
    (the winner's side sees the loser hang up a moment after the race is decided)."""
    deadline = time.monotonic() + settle
    while True:
        with m._lock:
            conns = [c for c in m._connections if not c._closed]
        if len(conns) <= 1 or time.monotonic() > deadline:
            return conns
        time.sleep(0.005)


@pytest.mark.parametrize("round", range(8))
def test_both_connect_at_once_and_each_keeps_one_connection(tmp_path, round):
    a, da, addr_a = peer("osd.1", tmp_path)
    b, db, addr_b = peer("osd.2", tmp_path)
    try:
        go = threading.Barrier(2)
        conns: dict[str, Connection] = {}

        def dial(m: Messenger, addr: str, name: str) -> None:
            go.wait()
            conns[m.name] = m.connect(addr, name=name)

        ts = [threading.Thread(target=dial, args=args) for args in ((a, addr_b, "osd.2"), (b, addr_a, "osd.1"))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ca, cb = conns["osd.1"], conns["osd.2"]
        for i in range(50):
            ca.send(Message(DATA, front=b"a%d" % i))
            cb.send(Message(DATA, front=b"b%d" % i))
        assert db.wait_for(50) == [b"a%d" % i for i in range(50)]
        assert da.wait_for(50) == [b"b%d" % i for i in range(50)]
        assert peer_conns(a) == [ca] and peer_conns(b) == [cb], "one Connection per peer, the one connect() gave"
        assert da.conns == {id(ca)} and db.conns == {id(cb)}, "messages arrive on that same object"
        assert a.connect(addr_b, name="osd.2") is ca, "connecting again returns it"
        assert not da.resets and not db.resets and not da.faults and not db.faults
        # one side opened the session by connecting, the other by accepting, on these objects
        assert sorted(k for k, _ in da.opened + db.opened) == ["accept", "connect"]
        assert [c for _, c in da.opened] == [ca] and [c for _, c in db.opened] == [cb]
    finally:
        a.shutdown()
        b.shutdown()


def test_a_peer_that_connected_to_us_is_the_connection_we_get_when_we_connect(tmp_path):
    a, da, addr_a = peer("osd.1", tmp_path)
    b, db, addr_b = peer("osd.2", tmp_path)
    try:
        cb = b.connect(addr_a, name="osd.1")
        cb.send(Message(DATA, front=b"hello"))
        assert da.wait_for(1) == [b"hello"]
        (accepted,) = peer_conns(a)
        ca = a.connect(addr_b, name="osd.2")
        assert ca is accepted and ca.address == addr_b
        ca.send(Message(DATA, front=b"back"))
        assert db.wait_for(1) == [b"back"]
        assert len(peer_conns(a)) == 1 and len(peer_conns(b)) == 1
    finally:
        a.shutdown()
        b.shutdown()


def test_lossless_between_peers_that_both_reconnect_through_random_cuts(tmp_path):
    """Each side dials the other through its own fault proxy, and a thread cuts one or
    both at seeded random moments while messages flow both ways: both sides see faults,
    reconnect (often at once) and replay."""
    a, da, addr_a = peer("osd.1", tmp_path)
    b, db, addr_b = peer("osd.2", tmp_path)
    rng, n, stop = random.Random(7), 2000, threading.Event()
    with FaultProxy(addr_a, f"unix://{tmp_path}/pa.sock") as pa, FaultProxy(addr_b, f"unix://{tmp_path}/pb.sock") as pb:

        def cutter() -> None:
            r = random.Random(8)
            while not stop.wait(r.uniform(0.005, 0.05)):
                x = r.random()
                for proxy in (pa,) if x < 0.4 else (pb,) if x < 0.8 else (pa, pb):
                    proxy.cut()

        t = threading.Thread(target=cutter)
        try:
            ca, cb = a.connect(pb.address, name="osd.2"), b.connect(pa.address, name="osd.1")
            t.start()
            for i in range(n):
                ca.send(Message(DATA, front=b"a%d" % i, data=rng.randbytes(rng.randint(0, 3000))))
                cb.send(Message(DATA, front=b"b%d" % i))
                if i % 50 == 0:
                    time.sleep(0.02)  # paced: the cuts fall while messages are in flight
            stop.set()
            t.join()
            assert db.wait_for(n, 30) == [b"a%d" % i for i in range(n)], "exactly once, in order"
            assert da.wait_for(n, 30) == [b"b%d" % i for i in range(n)]
            assert peer_conns(a) == [ca] and peer_conns(b) == [cb]
            assert not da.resets and not db.resets
            assert ca.session is not None and cb.session is not None
            assert ca.session.connect_seq >= 5, "it reconnected (and replayed) many times"
        finally:
            stop.set()
            if t.is_alive():
                t.join()
            a.shutdown()
            b.shutdown()


@pytest.mark.parametrize("policy", [Policy.lossless_peer(), Policy.lossless_peer_reuse()], ids=["peer", "reuse"])
def test_a_restarted_peer_is_reported_as_a_remote_reset(tmp_path, policy):
    a, da, addr_a = peer("osd.1", tmp_path, policy)
    b, db, addr_b = peer("osd.2", tmp_path, policy)
    b2 = None
    try:
        ca = a.connect(addr_b, name="osd.2")
        ca.send(Message(DATA, front=b"first"))
        assert db.wait_for(1) == [b"first"]
        b.shutdown()  # osd.2 goes away; osd.1 queues for it meanwhile
        deadline = time.monotonic() + 5
        while ca._machine is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        ca.send(Message(DATA, front=b"while it was down"))
        b2, db2, _ = peer("osd.2", tmp_path, policy)  # a new incarnation, same name and address
        with da.cond:
            assert da.cond.wait_for(lambda: da.resets, 5) and da.resets == [ca]
        ca.send(Message(DATA, front=b"after"))
        got = db2.wait_until(lambda got: b"after" in got)
        if policy.resetcheck:
            assert got[-1] == b"after" and b"while it was down" not in got
        else:
            # what the old incarnation had not acknowledged goes to the new one, in order
            assert got[-2:] == [b"while it was down", b"after"] and got[:-2] in ([], [b"first"]), got
    finally:
        a.shutdown()
        b.shutdown()
        if b2 is not None:
            b2.shutdown()


def test_a_peer_policy_needs_the_name_and_the_name_is_checked(tmp_path):
    a, da, addr_a = peer("osd.1", tmp_path)
    b, db, addr_b = peer("osd.2", tmp_path)
    try:
        with pytest.raises(ConfigurationError):
            a.connect(addr_b, policy=Policy.lossless_peer())
        c = a.connect(addr_b, name="osd.3")  # osd.2 listens there
        deadline = time.monotonic() + 5
        while not da.faults and time.monotonic() < deadline:
            time.sleep(0.01)
        assert isinstance(da.faults[0], WrongPeer) and "osd.3" in str(da.faults[0])
        deadline = time.monotonic() + 5
        while not c._closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c._closed and len(da.faults) == 1, "someone else's address: no point dialling it again"
    finally:
        a.shutdown()
        b.shutdown()


def test_accepted_transports_that_end_at_once_leave_no_connection_behind(tmp_path):
    import socket

    a, da, addr_a = peer("osd.1", tmp_path)
    try:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(addr_a[len("unix://") :])
            s.close()  # gone before osd.1 accepts and writes its banner
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with a._lock:
                left = list(a._connections)
            if not left:
                break
            time.sleep(0.01)
        assert left == []
    finally:
        a.shutdown()


def test_a_transport_replaced_in_the_middle_of_a_frame_gives_its_throttle_charge_back(tmp_path):
    """osd.2 dials through a proxy that pauses half way through a 1 MiB message (osd.1
    holds a READY transport with a frame half read: charged to its byte throttle).  osd.2
    gives up on it and reconnects by another route; osd.1 takes the new transport in place
    of the old one, whose charge must go back, or the throttle shrinks for good."""
    a = Messenger(
        "osd.1",
        policies={"osd": Policy.lossless_peer()},
        idle_timeout=None,
        keepalive_interval=None,
        throttle_bytes=8 << 20,
        dispatch_throttle_bytes=None,
    )
    da = Peer()
    a.add_dispatcher(da)
    addr_a = a.bind(f"unix://{tmp_path}/a.sock")
    a.start()
    b = Messenger("osd.2", policies={"osd": Policy.lossless_peer()}, idle_timeout=0.5, keepalive_interval=0.1)
    b.start()
    n, size = 4, 1 << 20
    try:
        with FaultProxy(addr_a, f"unix://{tmp_path}/pa.sock", chunk_size=16384) as pa:
            cb = b.connect(pa.address, name="osd.1")
            cb.send(Message(DATA, front=b"warm-up"))
            assert da.wait_for(1) == [b"warm-up"]
            start = pa.statistics().bytes_upstream
            for i in range(n):
                cb.send(Message(DATA, front=b"m%d" % i, data=bytes(size)))
            deadline = time.monotonic() + 10
            while pa.statistics().bytes_upstream < start + size // 2 and time.monotonic() < deadline:
                time.sleep(0.0005)
            pa.pause()
            time.sleep(0.1)
            assert a._throttles[1].used > 0, "a frame is half read and charged"
            cb.address = addr_a  # osd.2's next attempt goes straight to osd.1 (another route)
            assert len(da.wait_for(n + 1, 20)) == n + 1
            deadline = time.monotonic() + 5
            while a._throttles[1].used and time.monotonic() < deadline:
                time.sleep(0.01)
            assert a._throttles[1].used == 0 and a._throttles[0].used == 0
    finally:
        a.shutdown()
        b.shutdown()
