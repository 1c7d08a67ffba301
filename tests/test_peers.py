"""Lossless peers over a simulated network: either side connects, simultaneous connects
and reconnects are resolved (global_seq, connect_seq, then a name tiebreak), the
winning connection carries the one session each side keeps per peer, and a peer
restart is reported.  Deterministic and seeded, sans-I/O."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copyless.errors import RemoteProtocolError
from copyless.protocol.session import (
    Closed,
    MessageReceived,
    OutMessage,
    Role,
    Session,
    SessionConnection,
    SessionRegistry,
    SessionReset,
    State,
    Waiting,
)

WAIT_RETRY = 0.5  # a side told to wait tries again after this long (if nothing came)
BACKOFF = 0.05


class Node:
    """One Messenger's view of its peer: a registry with one peer session."""

    def __init__(self, name: str, peer: str, *, resetcheck: bool = False, dials: bool = True) -> None:
        self.name, self.peer_name, self.dials = name, peer, dials
        self.reg = SessionRegistry(name, lambda n: Session(resetcheck=resetcheck) if n == peer else None)
        self.session = self.reg.peer(peer)
        assert self.session is not None
        self.got: list[bytes] = []
        self.resets: list[int] = []
        self.retry_at = 0.0
        self.attempts = self.waits = 0

    def send(self, data: bytes) -> None:
        s = self.session
        m = OutMessage(1, [data], [])
        if s.carrier is not None:
            s.carrier.send_message(m)
        else:
            s.queue(m)

    def machine(self, role: Role, now: float) -> SessionConnection:
        if role is Role.CLIENT:
            self.attempts += 1
            return SessionConnection(Role.CLIENT, self.name, session=self.session, expect=self.peer_name, now=now)
        return SessionConnection(Role.SERVER, self.name, registry=self.reg, now=now)


class Pipe:
    """A transport from `dialer` to `listener`, delivering random chunks each step."""

    def __init__(self, rng: random.Random, dialer: Node, listener: Node, now: float, whole: bool = False) -> None:
        self.whole = whole  # deliver all that is in flight at each step (lockstep), not a random part
        self.rng = rng
        self.ends = ((dialer, dialer.machine(Role.CLIENT, now)), (listener, listener.machine(Role.SERVER, now)))
        self.wires = (bytearray(), bytearray())  # dialer -> listener, listener -> dialer
        self.closed = False

    @property
    def client(self) -> SessionConnection:
        return self.ends[0][1]

    @property
    def server(self) -> SessionConnection:
        return self.ends[1][1]

    def step(self, now: float) -> None:
        for i, (_, m) in enumerate(self.ends):
            m.tick(now)
            self.wires[i].extend(b"".join(bytes(b) for b in m.data_to_send()))
        for i, wire in enumerate(self.wires):
            if wire:
                n = len(wire) if self.whole else self.rng.randint(1, len(wire))
                self.ends[1 - i][1].receive_data(bytes(wire[:n]))
                del wire[:n]

    def cut(self) -> None:
        if not self.closed:
            self.closed = True
            for w in self.wires:
                w.clear()
            for _, m in self.ends:
                m.connection_lost()


class World:
    def __init__(self, rng: random.Random, a: Node, b: Node) -> None:
        self.rng, self.nodes, self.now = rng, (a, b), 0.0
        self.pipes: list[Pipe] = []

    def dial(self, node: Node, whole: bool = False) -> Pipe:
        other = self.nodes[1] if node is self.nodes[0] else self.nodes[0]
        p = Pipe(self.rng, node, other, self.now, whole)
        self.pipes.append(p)
        return p

    def step(self, cut_rate: float = 0.0) -> None:
        self.now += 0.01
        for node in self.nodes:
            s = node.session
            idle = s.carrier is None and (s.attempt is None or s.attempt.state is State.CLOSED)
            if node.dials and idle and self.now >= node.retry_at:
                self.dial(node)
        for p in list(self.pipes):
            if self.rng.random() < cut_rate:
                p.cut()
            else:
                p.step(self.now)
            self.events(p)
            if any(m.state is State.CLOSED for _, m in p.ends):
                p.cut()  # an end that closed closes the transport: the other end sees it go
                self.events(p)
            if p.closed:
                self.pipes.remove(p)

    def events(self, p: Pipe) -> None:
        for node, m in p.ends:
            for ev in m.next_events():
                if isinstance(ev, MessageReceived):
                    node.got.append(bytes(ev.front))
                elif isinstance(ev, SessionReset):
                    node.resets.append(ev.dropped)
                elif isinstance(ev, Waiting):
                    node.waits += 1
                    node.retry_at = self.now + WAIT_RETRY
                elif isinstance(ev, Closed) and m is p.client and node.retry_at <= self.now:
                    node.retry_at = self.now + BACKOFF

    def settle(self, steps: int = 2000) -> None:
        for _ in range(steps):
            self.step()
            if self.quiet():
                return

    def quiet(self) -> bool:
        a, b = self.nodes
        return (
            not any(p.wires[0] or p.wires[1] or p.client._out or p.server._out for p in self.pipes)
            and a.session.carrier is not None
            and b.session.carrier is not None
            and not a.session.unsent
            and not b.session.unsent
        )

    def carrier_pipe(self) -> Pipe:
        """The one transport both sides agree carries the session."""
        a, b = self.nodes
        (p,) = [p for p in self.pipes if {a.session.carrier, b.session.carrier} == {p.client, p.server}]
        return p


def test_simultaneous_connects_settle_on_the_lower_names_connection():
    rng = random.Random(1)
    a, b = Node("osd.1", "osd.2"), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    pa, pb = w.dial(a, whole=True), w.dial(b, whole=True)  # in lockstep: the idents cross
    a.send(b"from a")
    b.send(b"from b")
    w.settle()
    assert w.carrier_pipe() is pa, "osd.1 < osd.2: the connection osd.1 made carries the session"
    assert pb.closed and b.attempts == 1 and a.attempts == 1
    assert pb.server._waited, "osd.1 told the attempt of osd.2 to wait (osd.2 had already given it up)"
    assert a.got == [b"from b"] and b.got == [b"from a"]
    assert not a.resets and not b.resets
    assert a.session.peer_cookie == b.session.cookie and b.session.peer_cookie == a.session.cookie


@pytest.mark.parametrize("seed", range(20))
def test_simultaneous_connects_with_any_timing_agree_on_one_connection(seed):
    rng = random.Random(seed)
    a, b = Node("osd.1", "osd.2"), Node("osd.2", "osd.1")
    a.retry_at, b.retry_at = rng.uniform(0, 0.05), rng.uniform(0, 0.05)
    w = World(rng, a, b)
    w.settle()
    p = w.carrier_pipe()
    assert not [q for q in w.pipes if q is not p], "every other attempt was closed"
    a.send(b"x")
    b.send(b"y")
    w.settle()
    assert (a.got, b.got) == ([b"y"], [b"x"])


def test_only_one_side_dials_the_other_accepts_into_its_peer_session():
    rng = random.Random(2)
    a, b = Node("osd.1", "osd.2", dials=False), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    a.send(b"queued before anyone connected")
    w.settle()
    assert w.carrier_pipe().client.session is b.session
    assert b.got == [b"queued before anyone connected"]


def test_a_reconnect_race_after_a_fault_is_resolved_and_loses_nothing():
    rng = random.Random(3)
    a, b = Node("osd.1", "osd.2"), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    w.settle()
    for i in range(5):
        a.send(b"a%d" % i)
        b.send(b"b%d" % i)
    w.carrier_pipe().cut()
    a.retry_at = b.retry_at = w.now  # both notice at once and both reconnect
    w.settle()
    p = w.carrier_pipe()
    assert p.client.session is a.session, "the lower name's reconnect won"
    assert a.session.connect_seq == b.session.connect_seq == 1
    assert a.got == [b"b%d" % i for i in range(5)] and b.got == [b"a%d" % i for i in range(5)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_exactly_once_in_order_between_peers_that_both_dial_through_faults(seed):
    rng = random.Random(seed)
    a, b = Node("osd.1", "osd.2"), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    n = 30
    sent_a = sent_b = 0
    for _ in range(4000):
        if sent_a < n and rng.random() < 0.2:
            a.send(b"a%d" % sent_a)
            sent_a += 1
        if sent_b < n and rng.random() < 0.2:
            b.send(b"b%d" % sent_b)
            sent_b += 1
        w.step(cut_rate=0.01 if w.now < 20 else 0.0)
        if sent_a == sent_b == n and len(a.got) == len(b.got) == n:
            break
    assert b.got == [b"a%d" % i for i in range(sent_a)] and a.got == [b"b%d" % i for i in range(sent_b)]
    assert sent_a == sent_b == n
    assert not a.resets and not b.resets


@pytest.mark.parametrize("resetcheck", [True, False])
def test_a_restarted_peer_is_reported_and_its_queue_dropped_or_kept(resetcheck):
    rng = random.Random(4)
    a, b = Node("osd.1", "osd.2", resetcheck=resetcheck, dials=False), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    w.settle()
    w.carrier_pipe().cut()  # osd.2 dies ...
    for i in range(3):
        a.send(b"for the old osd.2, %d" % i)  # ... while osd.1 queues for it
    # a reply answers a call of the old process: the new one's tids start again at 1, so
    # it would take it for the answer to its own call 1 (dropped even with keep, counted)
    a.session.queue(OutMessage(1, [b"reply to the old osd.2's call 1"], [], tid=1, is_reply=True))
    b2 = Node("osd.2", "osd.1")  # ... and comes back with a new cookie
    w.nodes = (a, b2)
    w.settle()
    assert a.resets == ([4] if resetcheck else [1]), "the restart is reported as a remote reset"
    assert b2.got == ([] if resetcheck else [b"for the old osd.2, %d" % i for i in range(3)])
    a.send(b"after")
    w.settle()
    assert b2.got[-1] == b"after" and a.session.out_seq == len(b2.got), "renumbered from 1"


def test_a_fresh_ident_replaces_a_connection_the_peer_no_longer_has():
    """Half-open: osd.2's connection died without osd.1 noticing, and osd.2 (which never
    saw osd.1's answer, so it knows no cookie) dials again.  The connection osd.1 still
    holds is dead to osd.2: the new one replaces it, and nothing queued is lost."""
    rng = random.Random(5)
    a, b = Node("osd.1", "osd.2", dials=False), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    w.settle()
    old = w.carrier_pipe()
    b.session.peer_cookie = 0
    a.send(b"queued on the old connection")
    p = w.dial(b)
    w.settle()
    assert w.carrier_pipe() is p and old.server.state is State.CLOSED
    assert b.got == [b"queued on the old connection"] and not a.resets and not b.resets


def test_a_stale_ident_is_told_to_retry_with_a_newer_global_seq():
    """An attempt the peer gave up (it lost a race) may still arrive after the winner
    carries the session: its global_seq is not newer than what the peer has sent since."""
    rng = random.Random(8)
    a, b = Node("osd.1", "osd.2"), Node("osd.2", "osd.1")
    w = World(rng, a, b)
    w.settle()
    carrier = w.carrier_pipe()
    stale = SessionConnection(Role.CLIENT, "osd.2", session=Session(cookie=b.session.cookie), expect="osd.1")
    stale.session.global_seq = b.session.global_seq - 1 if b.session.global_seq else 0
    server = a.machine(Role.SERVER, w.now)
    sent_with = None
    for _ in range(20):
        server.receive_data(b"".join(bytes(x) for x in stale.data_to_send()))
        if stale.state is State.SESSION and sent_with is None:
            sent_with = stale.session.global_seq  # its ident went with this one
        stale.receive_data(b"".join(bytes(x) for x in server.data_to_send()))
        if sent_with is not None and stale.session.global_seq > sent_with:
            break  # told to retry: it comes again with a newer one (an abandoned one would not)
    assert sent_with is not None and stale.session.global_seq > sent_with
    assert server.state is State.SESSION and a.session.carrier in (carrier.client, carrier.server), "the carrier stays"


def test_a_client_that_reaches_the_wrong_peer_gives_up_with_a_clear_error():
    rng = random.Random(6)
    a, b = Node("osd.1", "osd.3"), Node("osd.2", "osd.1")  # a dials expecting osd.3, reaches osd.2
    w = World(rng, a, b)
    p = w.dial(a)
    for _ in range(20):
        p.step(w.now)
    (closed,) = [e for e in p.client.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, RemoteProtocolError) and "osd.3" in str(closed.error)
