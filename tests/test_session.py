"""The session machine over a simulated link: deterministic, seeded, with cuts that lose
whatever was in flight.  Lossless sessions must deliver every message exactly once,
in order, across any number of faults."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from copyless.errors import ConfigurationError, MessageTooLarge, RemoteProtocolError
from copyless.protocol import session as session_module
from copyless.protocol.frames import Tag, encode_frame
from copyless.protocol.session import (
    BANNER,
    BANNER_MAGIC,
    FEATURE_GOODBYE,
    FEATURES_SUPPORTED,
    HELLO,
    MIN_MAX_SEGMENT,
    PROTOCOL_VERSION,
    AuthenticationFailed,
    Backoff,
    Closed,
    Established,
    FeatureMismatch,
    MessageReceived,
    MessageRefused,
    OutMessage,
    Role,
    Session,
    SessionConnection,
    SessionRegistry,
    SessionReset,
    State,
    out_message,
)


def drain(conn: SessionConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


class Link:
    """Two connection machines joined by byte pipes that deliver in random chunks."""

    def __init__(self, rng: random.Random, client: SessionConnection, server: SessionConnection) -> None:
        self.rng, self.c, self.s = rng, client, server
        self.c2s, self.s2c = bytearray(), bytearray()

    def step(self) -> None:
        self.c2s += drain(self.c)
        self.s2c += drain(self.s)
        for pipe, dst in ((self.c2s, self.s), (self.s2c, self.c)):
            if pipe:
                n = self.rng.randint(1, len(pipe))
                dst.receive_data(bytes(pipe[:n]))
                del pipe[:n]

    def run(self, steps: int = 200) -> None:
        for _ in range(steps):
            self.step()
            if not (self.c2s or self.s2c) and not self.c._out and not self.s._out:
                return

    def cut(self) -> None:
        """The transport dies: bytes in flight are lost, both ends notice."""
        self.c2s.clear()
        self.s2c.clear()
        self.c.connection_lost()
        self.s.connection_lost()


def pair(rng, *, client_session=None, registry=None, lossless=True, **kw):
    client_session = client_session or Session(lossless=lossless)
    registry = registry or SessionRegistry()
    c = SessionConnection(Role.CLIENT, "client.1", session=client_session, lossless=lossless, **kw)
    s = SessionConnection(Role.SERVER, "store.1", registry=registry, lossless=lossless, **kw)
    return Link(rng, c, s), client_session, registry


def received(conn: SessionConnection, into: list) -> list:
    for ev in conn.next_events():
        if isinstance(ev, MessageReceived):
            into.append(bytes(ev.front))
    return into


def test_handshake_and_messages_both_ways():
    link, _, _ = pair(random.Random(1))
    link.run()
    assert link.c.state is State.READY and link.s.state is State.READY
    assert [type(e) for e in link.c.next_events()] == [Established]
    assert link.s.peer_name == "client.1" and link.c.peer_name == "store.1"
    link.c.send_message(OutMessage(7, [b"ping"], [b"data", b"more"], tid=42))
    link.run()
    (ev,) = [e for e in link.s.next_events() if isinstance(e, MessageReceived)]
    assert (ev.type, ev.tid, ev.seq, bytes(ev.front), bytes(ev.data)) == (7, 42, 1, b"ping", b"datamore")
    link.s.send_message(OutMessage(8, [b"pong"], [], tid=42, is_reply=True))
    link.run()
    (ev,) = [e for e in link.c.next_events() if isinstance(e, MessageReceived)]
    assert ev.is_reply and ev.tid == 42
    # the reply's header carried the ack of the request
    assert not link.c.session.sent


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), cuts=st.integers(0, 12))
def test_lossless_exactly_once_in_order_across_faults(seed, cuts):
    rng = random.Random(seed)
    cs, reg = Session(), SessionRegistry()
    link, _, _ = pair(rng, client_session=cs, registry=reg)
    n = 60
    to_server = [f"c{i}".encode() for i in range(n)]
    to_client = [f"s{i}".encode() for i in range(n)]
    got_s: list[bytes] = []
    got_c: list[bytes] = []
    sent_c = sent_s = 0
    cut_at = sorted(rng.randrange(400) for _ in range(cuts))
    for t in range(400):
        if sent_c < n and rng.random() < 0.4:
            link.c.send_message(OutMessage(1, [to_server[sent_c]], []))
            sent_c += 1
        if sent_s < n and link.s.session is not None and rng.random() < 0.4:
            link.s.send_message(OutMessage(1, [to_client[sent_s]], []))
            sent_s += 1
        if rng.random() < 0.2:
            link.c.send_ack()
            link.s.send_ack()
        link.step()
        received(link.s, got_s)
        received(link.c, got_c)
        while cut_at and cut_at[0] == t:
            cut_at.pop(0)
            link.cut()
            received(link.s, got_s)
            received(link.c, got_c)
            link = Link(
                rng,
                SessionConnection(Role.CLIENT, "client.1", session=cs),
                SessionConnection(Role.SERVER, "store.1", registry=reg),
            )
    for _ in range(50):  # let everything finish
        link.c.send_ack()
        link.s.send_ack()
        link.run()
        received(link.s, got_s)
        received(link.c, got_c)
    assert got_s == to_server[:sent_c], "server saw every client message once, in order"
    assert got_c == to_client[:sent_s], "client saw every server message once, in order"
    assert sent_c == n


def test_server_restart_is_a_session_reset():
    rng = random.Random(3)
    cs = Session()
    link, _, _ = pair(rng, client_session=cs)
    link.run()
    link.c.send_message(OutMessage(1, [b"a"], []))
    link.run()
    link.s.send_ack()  # "a" is acknowledged: only what follows is lost with the session
    link.run()
    assert not cs.sent
    link.cut()
    cs.queue(OutMessage(1, [b"lost with the old session"], []))
    # the server restarted: a new registry knows nothing of our session
    link2 = Link(
        rng,
        SessionConnection(Role.CLIENT, "client.1", session=cs),
        SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry()),
    )
    link2.run()
    events = link2.c.next_events()
    resets = [e for e in events if isinstance(e, SessionReset)]
    assert resets and resets[0].dropped == 1
    assert any(isinstance(e, Established) and e.new for e in events)
    link2.c.send_message(OutMessage(1, [b"fresh"], []))
    link2.run()
    got = received(link2.s, [])
    assert got == [b"fresh"]
    assert link2.s.session is not None and link2.s.session.in_seq == 1, "a new session starts at seq 1"


def test_shared_secret_authentication():
    link, _, _ = pair(random.Random(4), secret=b"k" * 32)
    link.run()
    assert link.c.state is State.READY and link.s.state is State.READY
    c = SessionConnection(Role.CLIENT, "client.1", session=Session(), secret=b"right")
    s = SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry(), secret=b"wrong")
    Link(random.Random(5), c, s).run()
    errors = [e.error for e in c.next_events() + s.next_events() if isinstance(e, Closed)]
    assert errors and all(isinstance(e, AuthenticationFailed) for e in errors)
    assert c.state is State.CLOSED and s.state is State.CLOSED


def test_required_feature_missing():
    c = SessionConnection(Role.CLIENT, "c", session=Session(), features_required=1 << 40)
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry())
    Link(random.Random(6), c, s).run()
    (closed,) = [e for e in c.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, FeatureMismatch)


@pytest.mark.parametrize("junk", [b"x" * BANNER.size, b"copyless" + b"\xff" * 18, b"\0" * 200])
def test_garbage_closes_with_a_protocol_error(junk):
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry())
    s.receive_data(junk)
    (closed,) = [e for e in s.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, RemoteProtocolError)
    s.receive_data(b"more junk after close is ignored")


def test_frame_out_of_order_is_a_protocol_error():
    link, _, _ = pair(random.Random(7))
    link.run()
    # a READY server receiving a second CLIENT_IDENT-like handshake frame: not in the table
    from copyless.protocol.frames import Tag, encode_frame

    link.s.receive_data(b"".join(bytes(b) for b in encode_frame(Tag.AUTH_DONE, [[b""]])))
    (closed,) = [e for e in link.s.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, RemoteProtocolError) and "unexpected AUTH_DONE" in str(closed.error)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=400), split=st.integers(1, 50))
def test_fuzz_any_bytes_after_the_banner_never_crash(junk, split):
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry())
    c = SessionConnection(Role.CLIENT, "c", session=Session())
    s.receive_data(drain(c))  # a valid banner and hello
    for i in range(0, len(junk), split):
        s.receive_data(junk[i : i + split])
    for e in s.next_events():
        if isinstance(e, Closed):
            assert e.error is None or isinstance(e.error, RemoteProtocolError)


def test_handshake_timeout_when_the_peer_is_silent():
    c = SessionConnection(Role.CLIENT, "c", session=Session(), now=100.0, handshake_timeout=5)
    assert c.next_deadline() == 105.0
    c.tick(104.9)
    assert c.state is State.BANNER
    c.tick(105.0)
    (closed,) = [e for e in c.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, TimeoutError) and c.next_deadline() is None


def test_keepalive_and_idle_timeout():
    from copyless.protocol.session import KeepaliveAck

    cs = Session()
    c = SessionConnection(Role.CLIENT, "c", session=cs, keepalive_interval=1.0, idle_timeout=3.0)
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry(), idle_timeout=3.0)
    link = Link(random.Random(8), c, s)
    link.run()
    assert c.state is State.READY and c.next_deadline() == 1.0
    for t in (1.0, 2.0, 2.9, 3.5, 4.0):  # keepalives flow both ways: nobody idles out
        c.tick(t)
        s.tick(t)
        if t == 4.0:
            s.send_message(OutMessage(1, [b"last words"], []))  # the client last hears the server at 4.0
        link.run()
    acks = [e for e in c.next_events() if isinstance(e, KeepaliveAck)]
    assert len(acks) >= 3 and all(a.rtt_ns >= 0 for a in acks)
    assert c.state is State.READY and s.state is State.READY
    c.send_message(OutMessage(1, [b"unacked"], []))
    # the peer falls silent from now on: last heard at 4.0, so the client gives up at 7.0
    assert c.next_deadline() < 7.0  # the next keepalive comes first
    c.tick(5.0)
    c.tick(6.9)
    assert c.state is State.READY
    c.tick(7.0)
    (closed,) = [e for e in c.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, TimeoutError)
    assert [bytes(m.front[0]) for m in cs.unsent] == [b"unacked"], "requeued for replay"


def frames_of(data: bytes) -> list[tuple[int, list[bytes]]]:
    """The (tag, segments) of each whole frame in data (a FrameReader's verified view)."""
    from copyless.protocol.frames import FrameReader

    reader, view, out = FrameReader(), memoryview(data), []
    while view:
        buf = reader.next_read()
        n = min(len(buf), len(view))
        buf[:n], view = view[:n], view[n:]
        reader.bytes_read(n)
    while (f := reader.next_frame()) is not None:
        out.append((f.tag, [bytes(s) for s in f.segments]))
    return out


@pytest.mark.parametrize("pinger", [Role.CLIENT, Role.SERVER])
def test_a_keepalive_ack_echoes_its_timestamp_and_measures_the_link_delay(pinger):
    """The clock is fake, so the round trip is known to the nanosecond: the KEEPALIVE
    carries the sender's time, the peer echoes exactly that, and the KeepaliveAck's rtt
    is the time the simulated link took (not merely >= 0, which an echo of 0 passes).
    The clock steps in decimal seconds (as time.monotonic() does), not in powers of 2."""
    from copyless.protocol.frames import Tag
    from copyless.protocol.session import U64, KeepaliveAck

    interval, start = 0.3, 1000.0
    ka = {Role.CLIENT: None, Role.SERVER: None, pinger: interval}
    c = SessionConnection(Role.CLIENT, "c", session=Session(), now=start, keepalive_interval=ka[Role.CLIENT])
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry(), now=start, keepalive_interval=ka[Role.SERVER])
    Link(random.Random(9), c, s).run()
    assert c.state is State.READY and s.state is State.READY
    a, b = (c, s) if pinger is Role.CLIENT else (s, c)
    a.next_events()
    b.next_events()
    rng = random.Random(10)
    for i in range(60):
        sent_at = a.next_deadline()  # the keepalive is due now
        assert sent_at == pytest.approx(start + (i + 1) * interval)
        delay_ns = rng.choice([0, 1, 999, 1_000_000, 7_000_000]) + rng.randrange(250_000_000)
        delay = delay_ns / 1e9  # under the interval: no second keepalive meanwhile
        a.tick(sent_at)
        sent_ns = round(sent_at * 1e9)
        ping = drain(a)
        assert frames_of(ping) == [(Tag.KEEPALIVE, [U64.pack(sent_ns)])], "it carries the sender's time"
        b.tick(sent_at + delay / 3)  # the peer's clock plays no part in the answer
        b.receive_data(ping)
        pong = drain(b)
        assert frames_of(pong) == [(Tag.KEEPALIVE_ACK, [U64.pack(sent_ns)])], "the echo is the time sent"
        if i % 2:
            a.tick(sent_at + delay)
            a.receive_data(pong)
        else:  # as a Messenger's read round tells the time: with the bytes
            buf = a.next_read()
            buf[: len(pong)] = pong
            a.bytes_read(len(pong), now=sent_at + delay)
        acks = [e for e in a.next_events() if isinstance(e, KeepaliveAck)]
        assert acks == [KeepaliveAck(sent_ns=sent_ns, rtt_ns=delay_ns)], (i, sent_at, delay)
        assert not b.next_events() and not drain(a) and not drain(b)


def test_acks_ride_on_messages_or_wait_for_the_ack_delay():
    from copyless.protocol.frames import Tag

    def tags(conn: SessionConnection) -> list[int]:
        return [b[0] for b in conn.data_to_send()]  # each small frame is one buffer; byte 0 is its tag

    cs = Session()
    c = SessionConnection(Role.CLIENT, "c", session=cs, now=10.0, ack_delay=0.005, ack_every=3)
    s = SessionConnection(Role.SERVER, "s", registry=SessionRegistry(), now=10.0, ack_delay=0.005, ack_every=3)
    link = Link(random.Random(2), c, s)
    link.run()
    c.send_message(OutMessage(1, [b"request"], []))
    s.receive_data(drain(c))
    s.ack_if_needed()
    assert tags(s) == [] and s.next_deadline() == pytest.approx(10.005), "no ACK frame yet: it waits"
    s.send_message(OutMessage(2, [b"reply"], []))
    assert tags(s) == [Tag.MESSAGE] and s.next_deadline() is None, "the reply carried the ack"
    c.send_message(OutMessage(1, [b"one-way"], []))
    s.receive_data(drain(c))
    s.tick(10.004)
    assert tags(s) == []
    s.tick(10.005)
    assert tags(s) == [Tag.ACK], "the ack delay ran out"
    for i in range(3):
        c.send_message(OutMessage(1, [b"burst %d" % i], []))
    s.receive_data(drain(c))
    s.ack_if_needed()
    assert tags(s) == [Tag.ACK], "ack_every messages are acknowledged at once"


def test_a_transport_that_ends_mid_frame_is_a_specific_error():
    from copyless.errors import PeerLost

    rng = random.Random(5)
    link, cs, _ = pair(rng)
    link.run()
    link.c.send_message(OutMessage(1, [b"whole"], []))
    whole = drain(link.c)
    link.s.receive_data(whole[: len(whole) // 2])  # the client died after half of it
    link.s.connection_lost()
    (closed,) = [e for e in link.s.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, PeerLost)
    link2, _, _ = pair(rng)
    link2.run()
    link2.c.connection_lost()  # between frames: a clean end
    (closed,) = [e for e in link2.c.next_events() if isinstance(e, Closed)]
    assert closed.error is None


def test_a_reconnect_older_than_one_already_seen_is_told_to_retry_global(monkeypatch):
    from copyless.protocol import session as sm
    from copyless.protocol.frames import Tag

    key = (State.SESSION, Role.CLIENT, Tag.SESSION_RETRY_GLOBAL)
    answered: list[int] = []
    real = sm._HANDLERS[key]
    monkeypatch.setitem(sm._HANDLERS, key, lambda conn, f: (answered.append(1), real(conn, f)))
    rng = random.Random(11)
    cs, reg = Session(), SessionRegistry()
    link, _, _ = pair(rng, client_session=cs, registry=reg)
    link.run()
    link.c.send_message(OutMessage(1, [b"before"], []))
    link.run()
    (server_session,) = reg.by_client.values()
    server_session.peer_global_seq = 50  # the server has seen a newer attempt from this client
    link.cut()
    c = SessionConnection(Role.CLIENT, "client.1", session=cs)
    link = Link(rng, c, SessionConnection(Role.SERVER, "store.1", registry=reg))
    link.run()
    assert answered and link.c.state is State.READY and link.s.state is State.READY
    assert cs.global_seq > 50
    link.c.send_message(OutMessage(1, [b"after"], []))
    link.run()
    assert received(link.s, []) == [b"after"], "the session resumed: nothing replayed twice, nothing lost"


class FaultyLink(Link):
    """A link whose chunks may be duplicated, dropped or held back while the clock runs
    (a byte stream cannot lose or repeat bytes and stay in sync, so each of these is a
    corruption the receiver must catch), with a fake clock driving the timers."""

    def __init__(self, rng, client, server, now: float) -> None:
        super().__init__(rng, client, server)
        self.now = now
        self.held: list[tuple[float, bytearray, SessionConnection]] = []

    def step(self) -> None:
        self.now += 0.01
        for m in (self.c, self.s):
            m.tick(self.now)
        self.c2s += drain(self.c)
        self.s2c += drain(self.s)
        for pipe, dst in ((self.c2s, self.s), (self.s2c, self.c)):
            if not pipe:
                continue
            n = self.rng.randint(1, len(pipe))
            chunk = bytes(pipe[:n])
            del pipe[:n]
            r = self.rng.random()
            if r < 0.02:
                continue  # dropped
            if r < 0.04:
                dst.receive_data(chunk)  # duplicated
            elif r < 0.06:
                self.held.append((self.now + self.rng.uniform(0.05, 0.5), bytearray(chunk), dst))
                continue  # delayed: everything after it waits too (a stream keeps order)
            if any(d is dst for _, _, d in self.held):
                self.held.append((self.now, bytearray(chunk), dst))
                continue
            dst.receive_data(chunk)
        ready = [h for h in self.held if h[0] <= self.now]
        for h in ready:
            if h is next(x for x in self.held if x[2] is h[2]):  # only the oldest per direction
                self.held.remove(h)
                h[2].receive_data(bytes(h[1]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
# seed 60486: lost bytes left 01 00 00 00 where an epilogue was expected, and a receiver
# that skipped an aborted frame's data crc took it for an abort (session 11, reverted)
@example(seed=60486)
# seed 837: a frame's epilogue was lost whole, and the bytes after it read as the aborted
# status; every crc had passed, so the seq counted and c39 was never sent again (version 3)
@example(seed=837)
def test_exactly_once_in_order_across_drops_duplicates_and_delays(seed):
    rng = random.Random(seed)
    cs, reg = Session(), SessionRegistry()
    timers = {"handshake_timeout": 1.0, "idle_timeout": 2.0, "keepalive_interval": 0.3}
    now = 0.0

    def fresh() -> FaultyLink:
        return FaultyLink(
            rng,
            SessionConnection(Role.CLIENT, "client.1", session=cs, now=now, **timers),
            SessionConnection(Role.SERVER, "store.1", registry=reg, now=now, **timers),
            now,
        )

    link = fresh()
    n = 40
    to_server = [b"c%d" % i for i in range(n)]
    to_client = [b"s%d" % i for i in range(n)]
    got_s: list[bytes] = []
    got_c: list[bytes] = []
    sent_c = sent_s = 0
    for _ in range(3000):
        if sent_c < n and rng.random() < 0.3:
            link.c.send_message(OutMessage(1, [to_server[sent_c]], []))
            sent_c += 1
        if sent_s < n and link.s.session is not None and link.s.state is State.READY and rng.random() < 0.3:
            link.s.send_message(OutMessage(1, [to_client[sent_s]], []))
            sent_s += 1
        link.step()
        received(link.s, got_s)
        received(link.c, got_c)
        if link.c.state is State.CLOSED or link.s.state is State.CLOSED:
            link.c.connection_lost()  # the fault closed one end: the transport goes, both see it
            link.s.connection_lost()
            received(link.s, got_s)
            received(link.c, got_c)
            now = link.now
            link = fresh()
        if sent_c == sent_s == n and got_s == to_server and got_c == to_client:
            break
    assert got_s == to_server[:sent_c] and got_c == to_client[:sent_s], "exactly once, in order"
    assert sent_c == sent_s == n and len(got_s) == len(got_c) == n, "and all of it, in the end"


def test_a_client_that_ends_its_session_says_goodbye():
    """GOODBYE (client to server, if the server has FEATURE_GOODBYE): the server's machine
    closes with Closed(goodbye=True), so its owner keeps nothing for a reconnect."""
    link, _, _ = pair(random.Random(3))
    link.run()
    assert link.c.state is State.READY and link.s.state is State.READY
    link.s.next_events()
    link.s.goodbye()  # a server has no session of its own to end: nothing is sent
    assert not link.s._out
    link.c.goodbye()
    link.run()
    closed = [ev for ev in link.s.next_events() if isinstance(ev, Closed)]
    assert closed == [Closed(None, goodbye=True)] and link.s.state is State.CLOSED


def test_goodbye_is_only_sent_to_a_peer_that_understands_it():
    link, _, _ = pair(random.Random(4))
    link.run()
    link.c.peer_features &= ~FEATURE_GOODBYE  # as a server of an earlier version
    link.c.goodbye()
    assert not link.c._out


def test_reconnect_backoff_doubles_up_to_its_cap_and_starts_over_on_success():
    b = Backoff(0.01, 0.05)
    assert [b.next_delay() for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    b.reset()
    assert b.next_delay() == 0.01
    for first, cap in ((0, 1), (-1, 1), (2, 1)):
        with pytest.raises(ValueError):
            Backoff(first, cap)


@settings(max_examples=300, deadline=None)
@given(
    role=st.sampled_from([Role.SERVER, Role.CLIENT]),
    hello=st.booleans(),
    tag=st.integers(0, 40),
    payload=st.binary(max_size=60),
    segments=st.integers(1, 3),
)
def test_fuzz_any_valid_frame_with_any_payload_is_handled_or_a_protocol_error(role, hello, tag, payload, segments):
    """Frames that pass every crc, of any tag (known or not) with any payload (short
    ones too), in the handshake's first states: the machine carries on, or closes with
    a RemoteProtocolError, or closes cleanly where the frame says so (WAIT to a client);
    nothing else escapes receive_data."""

    def frame(t: int, segs: list[bytes]) -> bytes:
        return b"".join(bytes(b) for b in encode_frame(t, [[x] for x in segs]))

    if role is Role.SERVER:
        m = SessionConnection(Role.SERVER, "s", registry=SessionRegistry())
    else:
        m = SessionConnection(Role.CLIENT, "c", session=Session())
    data = BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, FEATURES_SUPPORTED, 0)
    if hello:
        peer = Role.CLIENT if role is Role.SERVER else Role.SERVER
        data += frame(1, [HELLO.pack(peer.value, 1 << 20) + b"peer.1"])
    data += frame(tag, [payload] * segments)
    m.receive_data(data)
    closed = [e for e in m.next_events() if isinstance(e, Closed)]
    assert all(c.error is None or isinstance(c.error, RemoteProtocolError) for c in closed), closed


def test_each_side_announces_its_segment_limit_and_the_sender_keeps_to_the_peers():
    """HELLO carries the longest segment the sender takes.  Before the handshake the
    peer's limit is unknown, so a message over it is queued; it is taken off the queue
    when the limit is learnt (MessageRefused, not sent: the receiver would only close
    the connection, and a lossless sender replay it forever), and the messages around
    it go, numbered without a gap.  Once the limit is known, send_message refuses such
    a message with MessageTooLarge and queues nothing.  The limits are per direction."""
    cs = Session()
    c = SessionConnection(Role.CLIENT, "client.1", session=cs, max_segment=1 << 20)
    s = SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry(), max_segment=8192)
    link = Link(random.Random(5), c, s)
    c.send_message(OutMessage(1, [b"before"], []))
    c.send_message(OutMessage(2, [b"f"], [bytes(6000), bytes(4000)], tid=5))  # data: 10000 bytes
    c.send_message(OutMessage(1, [bytes(9000)], [], tid=6))  # front: 9000 bytes
    c.send_message(OutMessage(1, [b"after"], [], tid=7))
    link.run()
    assert (c.peer_max_segment, s.peer_max_segment) == (8192, 1 << 20)
    events = c.next_events()
    assert type(events[0]) is Established
    refused = [e for e in events if isinstance(e, MessageRefused)]
    assert [e.message.tid for e in refused] == [5, 6]
    assert all(isinstance(e.error, MessageTooLarge) for e in refused)
    assert "10000-byte data segment" in str(refused[0].error) and "8192" in str(refused[0].error)
    assert "9000-byte front segment" in str(refused[1].error)
    got = [(e.seq, bytes(e.front)) for e in s.next_events() if isinstance(e, MessageReceived)]
    assert got == [(1, b"before"), (2, b"after")]

    with pytest.raises(MessageTooLarge, match="8193-byte data"):
        c.send_message(OutMessage(3, [b""], [bytes(8193)]))
    assert not cs.unsent and cs.out_seq == 2  # nothing queued, no seq taken
    c.send_message(OutMessage(3, [b"at the limit"], [bytes(8192)]))
    s.send_message(OutMessage(4, [b"the other way"], [bytes(10000)]))  # the client takes 1 MiB
    link.run()
    assert [(e.seq, len(e.data)) for e in s.next_events() if isinstance(e, MessageReceived)] == [(3, 8192)]
    assert [(e.seq, len(e.data)) for e in c.next_events() if isinstance(e, MessageReceived)] == [(1, 10000)]
    assert c.state is State.READY and s.state is State.READY


def test_a_session_checks_what_is_queued_against_the_limit_it_last_learnt():
    """A message queued on a session while no connection carries it (a reconnect to come)
    is refused at once if the peer's limit is known from an earlier connection."""
    cs = Session()
    cs.peer_max_segment = MIN_MAX_SEGMENT
    with pytest.raises(MessageTooLarge):
        cs.queue(OutMessage(1, [b""], [bytes(MIN_MAX_SEGMENT + 1)]))
    cs.queue(OutMessage(1, [b""], [bytes(MIN_MAX_SEGMENT)]))
    assert len(cs.unsent) == 1


def test_a_segment_limit_under_the_least_is_refused_at_both_ends():
    with pytest.raises(ConfigurationError):
        SessionConnection(Role.CLIENT, "c", session=Session(), max_segment=MIN_MAX_SEGMENT - 1)
    m = SessionConnection(Role.SERVER, "s", registry=SessionRegistry())
    hello = HELLO.pack(Role.CLIENT.value, MIN_MAX_SEGMENT - 1) + b"client.1"
    m.receive_data(
        BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, FEATURES_SUPPORTED, 0)
        + b"".join(bytes(b) for b in encode_frame(Tag.HELLO, [[hello]]))
    )
    (closed,) = [e for e in m.next_events() if isinstance(e, Closed)]
    assert isinstance(closed.error, RemoteProtocolError) and "under the least" in str(closed.error)


def test_a_revoked_message_is_never_sent_again_and_leaves_no_gap():
    """Session.revoke: a message never written is dropped (no seq spent); one written
    but not acknowledged stays as an empty aborted stand-in with its seq, so the replay
    after a fault neither resends its data nor leaves the receiver a gap, and the
    session holds none of its buffers.  The receiver counts the aborted seq as
    received, once (a second copy is a duplicate)."""
    from copyless import Message

    rng = random.Random(11)
    cs, registry = Session(), SessionRegistry()
    link, _, _ = pair(rng, client_session=cs, registry=registry)
    queued = Message(1, b"queued, never written")
    link.c.send_message(out_message(queued))
    assert cs.revoke(queued) is True and not cs.unsent  # before the handshake: gone
    link.run()
    a, b, c = Message(1, b"a"), Message(1, b"b", [bytearray(5000)]), Message(1, b"c")
    for m in (a, b, c):
        link.c.send_message(out_message(m))
    drain(link.c)  # written, and lost with the transport
    link.cut()
    assert cs.revoke(b) is False  # written: the peer may have had it
    assert [(m.seq, m.aborted, m.data) for m in cs.unsent] == [(1, False, ()), (2, True, ()), (3, False, ())]
    assert cs.revoke(b) is None  # (once)
    link2 = Link(
        rng,
        SessionConnection(Role.CLIENT, "client.1", session=cs),
        SessionConnection(Role.SERVER, "store.1", registry=registry),
    )
    link2.run()
    got = [(e.seq, bytes(e.front)) for e in link2.s.next_events() if isinstance(e, MessageReceived)]
    assert got == [(1, b"a"), (3, b"c")]
    assert link2.s.session.in_seq == 3 and link2.s.state is State.READY
    link2.c.send_message(out_message(Message(1, b"d")))
    link2.run()
    assert [(e.seq, bytes(e.front)) for e in link2.s.next_events() if isinstance(e, MessageReceived)] == [(4, b"d")]


def test_a_stale_reconnect_is_answered_with_retry_and_goes_through(monkeypatch):
    """A reconnect whose connect_seq the server has seen already (an attempt that raced
    an earlier one) gets SESSION_RETRY with the server's connect_seq; the client asks
    again one past it, and the session resumes with nothing lost or duplicated."""
    retries: list[int] = []
    real = SessionConnection._on_session_retry

    def spy(self, f):
        retries.append(int.from_bytes(bytes(f.segments[0]), "little"))
        real(self, f)

    monkeypatch.setitem(session_module._HANDLERS, (State.SESSION, Role.CLIENT, Tag.SESSION_RETRY), spy)
    rng = random.Random(21)
    cs, registry = Session(), SessionRegistry()

    def reconnect() -> Link:
        return Link(
            rng,
            SessionConnection(Role.CLIENT, "client.1", session=cs),
            SessionConnection(Role.SERVER, "store.1", registry=registry),
        )

    link, _, _ = pair(rng, client_session=cs, registry=registry)
    link.run()
    link.c.send_message(OutMessage(1, [b"one"], []))
    link.run()
    link.cut()
    link = reconnect()
    link.run()
    assert cs.connect_seq == 1 and not retries
    ss = link.s.session
    link.cut()
    cs.connect_seq = 0  # the client's view is one attempt behind the server's
    link = reconnect()
    link.c.send_message(OutMessage(1, [b"two"], []))
    link.run()
    assert retries == [1], "the server told the client where it is"
    assert link.c.state is State.READY and cs.connect_seq == ss.connect_seq == 2
    got = [(e.seq, bytes(e.front)) for e in link.s.next_events() if isinstance(e, MessageReceived)]
    assert got == [(2, b"two")] and ss.in_seq == 2
