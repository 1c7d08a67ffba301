"""A harsher sans-I/O model of two Messengers with lossless-peer sessions (used by
test_peersim.py; written in review of the first version of the race code).

Differences from tests/test_peers.py's World:
- TCP-like close: when one end closes, what it already wrote is still delivered to the
  other end, then EOF (test_peers drops in-flight bytes on any close: a WAITed or
  superseded ident can never arrive late there).
- Per-direction latency, random chunking; network cuts drop in-flight data and each
  end notices at its own (random) time.
- The messenger's Connection model: one current machine per node (attempt or adopted
  carrier); a server machine that gets Established is adopted: the node's previous
  machine's socket is closed and its pending events are dropped (as _adopt does); a
  Closed on the current machine schedules a redial (PEER_WAIT after WAIT, else backoff)
  if the node knows the address; dialing starts only if no current machine.
- The client machine is created only after a connect delay (the messenger makes it in
  _on_connected), so for a while an attempt exists that the session does not know.
- Optional restarts (a node replaced by a new incarnation).
"""

from __future__ import annotations

import random

from copyless.protocol.session import (
    Backoff,
    Closed,
    Established,
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

PEER_WAIT = 0.5


class Node:
    def __init__(self, name, peer, *, dials=True, resetcheck=False, inc=0, hs_timeout=10.0):
        self.name, self.peer_name, self.dials, self.inc = name, peer, dials, inc
        self.reg = SessionRegistry(name, lambda n: Session(resetcheck=resetcheck) if n == peer else None)
        self.session = self.reg.peer(peer)
        self.current = None  # (pipe, machine) the Connection holds
        self.pending_dial = None  # a pipe whose connect has not completed
        self.retry_at = 0.0 if dials else None
        self.backoff = Backoff()  # the Messenger's own
        self.waited = False
        self.got = []
        self.resets = []
        self.waits = 0
        self.attempts = 0
        self.alive = True
        self.hs_timeout = hs_timeout
        self.sent = 0
        self.log = []

    def send(self, tag):
        m = OutMessage(1, [tag], [])
        cur = self.current
        if cur is not None and cur[1].state is State.READY:
            cur[1].send_message(m)
        else:
            self.session.queue(m)
        self.sent += 1

    def schedule(self, now, delay=None):
        if not self.dials or not self.alive:
            return
        if delay is None:
            delay = self.backoff.next_delay()
        self.retry_at = now + delay


class End:
    def __init__(self, node, role):
        self.node, self.role = node, role
        self.m = None
        self.closed = False  # this end's socket is closed
        self.eof_at = None  # we will see the transport end (connection_lost) then
        self.srv_conn = role is Role.SERVER  # a conn_srv until adopted


class Pipe:
    """dialer -> listener.  wires[i]: list of [deliver_at, bytes] from ends[i] to ends[1-i]."""

    def __init__(self, w, dialer, listener):
        self.w = w
        self.ends = (End(dialer, Role.CLIENT), End(listener, Role.SERVER))
        self.lat = (w.rng.choice([0.001, 0.01, 0.03, 0.1, 0.3]), w.rng.choice([0.001, 0.01, 0.03, 0.1, 0.3]))
        self.wires = ([], [])
        self.fin = [None, None]  # time after which direction i has nothing more (its writer closed)
        self.connect_at = w.now + self.lat[0]
        self.ends[1].m = SessionConnection(
            Role.SERVER,
            listener.name,
            registry=listener.reg,
            now=w.now,
            incarnation=listener.inc,
            handshake_timeout=listener.hs_timeout,
        )
        self.dead = False
        self.id = w.next_id
        w.next_id += 1

    def other(self, i):
        return self.ends[1 - i]


class World:
    def __init__(self, seed, a, b, *, cut_rate=0.0, notice=(0.0, 0.3), trace=False):
        self.rng = random.Random(seed)
        self.nodes = [a, b]
        self.now = 0.0
        self.pipes = []
        self.cut_rate = cut_rate
        self.notice = notice
        self.next_id = 0
        self.trace = trace
        self.counts = dict(cuts=0, dials=0)

    def log(self, *a):
        if self.trace:
            print(f"{self.now:7.3f}", *a)

    def peer_of(self, node):
        return self.nodes[1] if node is self.nodes[0] else self.nodes[0]

    def dial(self, node):
        other = self.peer_of(node)
        p = Pipe(self, node, other)
        self.pipes.append(p)
        node.pending_dial = p
        node.attempts += 1
        self.counts["dials"] += 1
        self.log(f"{node.name}#{node.inc} dials pipe {p.id}")
        return p

    # -- closing
    def close_end(self, p, i):
        """End i's socket closes (its owner closed it): what it wrote still arrives, then EOF."""
        e = p.ends[i]
        if e.closed:
            return
        e.closed = True
        o = p.other(i)
        # the other end sees EOF after the last bytes we wrote arrive
        last = max([t for t, _ in p.wires[i]], default=self.now)
        if o.eof_at is None:
            o.eof_at = last + 0.0001
        p.wires[1 - i].clear()  # to a closed socket: dropped
        if e.m is not None and e.m.state is not State.CLOSED:
            pass  # the owner closed it deliberately; the machine is dropped with its events

    def cut(self, p):
        self.counts["cuts"] += 1
        self.log(f"cut pipe {p.id}")
        for i in (0, 1):
            p.wires[i].clear()
            e = p.ends[i]
            if not e.closed and e.eof_at is None:
                e.eof_at = self.now + self.rng.uniform(*self.notice)

    # -- node-level reaction to a machine's events
    def handle(self, p, i):
        e = p.ends[i]
        node = e.node
        m = e.m
        if m is None:
            return
        for ev in m.next_events():
            cur = node.current
            is_cur = cur is not None and cur[1] is m
            if not is_cur and not e.srv_conn:
                continue  # a machine the Connection no longer drives: its events are never seen
            if isinstance(ev, MessageReceived):
                node.got.append(bytes(ev.front))
            elif isinstance(ev, SessionReset):
                node.resets.append(ev.dropped)
                self.log(f"{node.name}#{node.inc} REMOTE RESET dropped={ev.dropped}")
            elif isinstance(ev, Waiting):
                node.waited = True
                node.waits += 1
            elif isinstance(ev, Established):
                node.backoff.reset()
                self.log(f"{node.name}#{node.inc} established on pipe {p.id} as {e.role.name} new={ev.new}")
                if e.srv_conn:
                    # _adopt: the session's Connection takes this transport
                    e.srv_conn = False
                    old = node.current
                    if old is not None and old[1] is not m:
                        op, om = old
                        oi = 0 if op.ends[0].m is om else 1
                        self.close_end(op, oi)
                    if node.pending_dial is not None:
                        pd = node.pending_dial
                        node.pending_dial = None
                        self.close_end(pd, 0)
                    node.current = (p, m)
                    node.retry_at = None
                    node.waited = False
            elif isinstance(ev, Closed):
                if ev.error is not None:
                    self.log(f"{node.name}#{node.inc} pipe {p.id} closed: {ev.error!r}")
                self.close_end(p, i)
                if is_cur:
                    node.current = None
                    waited, node.waited = node.waited, False
                    node.schedule(self.now, PEER_WAIT if waited else None)

    def step(self, dt=0.005, cut_rate=None):
        cut_rate = self.cut_rate if cut_rate is None else cut_rate
        self.now += dt
        now = self.now
        for node in self.nodes:
            if (
                node.alive
                and node.dials
                and node.current is None
                and node.pending_dial is None
                and node.retry_at is not None
                and now >= node.retry_at
            ):
                node.retry_at = None
                self.dial(node)
        for p in list(self.pipes):
            # connect completes: the client machine is made now
            c = p.ends[0]
            if c.m is None and not c.closed and now >= p.connect_at:
                node = c.node
                if node.pending_dial is p and node.alive:
                    node.pending_dial = None
                    c.m = SessionConnection(
                        Role.CLIENT,
                        node.name,
                        session=node.session,
                        expect=node.peer_name,
                        incarnation=node.inc,
                        now=now,
                        handshake_timeout=node.hs_timeout,
                    )
                    node.current = (p, c.m)
                else:
                    self.close_end(p, 0)
            if not p.dead and self.rng.random() < cut_rate:
                self.cut(p)
            for i in (0, 1):
                e = p.ends[i]
                if e.m is None or e.closed:
                    continue
                e.m.tick(now)
                out = b"".join(bytes(x) for x in e.m.data_to_send())
                if out:
                    o = p.other(i)
                    if not o.closed and not (e.eof_at is not None):
                        base = max([t for t, _ in p.wires[i]], default=0)
                        p.wires[i].append([max(now + p.lat[i], base), bytearray(out)])
                self.handle(p, i)
            # deliver
            for i in (0, 1):
                dst = p.other(i)
                w = p.wires[i]
                while w and w[0][0] <= now and dst.m is not None and not dst.closed:
                    t, buf = w[0]
                    n = self.rng.randint(1, len(buf))
                    dst.m.receive_data(bytes(buf[:n]))
                    del buf[:n]
                    if not buf:
                        w.pop(0)
                    j = 1 - i
                    self.handle(p, j)
                    if dst.m.state is State.CLOSED:
                        break
                if w and (dst.closed or (dst.m is not None and dst.m.state is State.CLOSED)):
                    w.clear()
            # EOFs
            for i in (0, 1):
                e = p.ends[i]
                if e.eof_at is not None and now >= e.eof_at and not e.closed and not p.wires[1 - i]:
                    if e.m is not None:
                        if e.m.state is not State.CLOSED:
                            e.m.connection_lost()
                        self.handle(p, i)
                    if e.m is None:
                        # connect never completed
                        node = e.node
                        if node.pending_dial is p:
                            node.pending_dial = None
                            node.schedule(now)
                    e.closed = True
            if all(e.closed for e in p.ends):
                p.dead = True
                self.pipes.remove(p)

    def restart(self, idx, **kw):
        old = self.nodes[idx]
        old.alive = False
        for p in list(self.pipes):
            for i in (0, 1):
                if p.ends[i].node is old:
                    self.close_end(p, i)
        new = Node(old.name, old.peer_name, dials=old.dials, resetcheck=kw.get("resetcheck", False), inc=old.inc + 1)
        self.nodes[idx] = new
        return new

    def carriers_agree(self):
        a, b = self.nodes
        ca, cb = a.session.carrier, b.session.carrier
        if ca is None or cb is None:
            return False
        for p in self.pipes:
            ms = {p.ends[0].m, p.ends[1].m}
            if ms == {ca, cb}:
                return True
        return False

    def quiet(self):
        a, b = self.nodes
        return (
            self.carriers_agree()
            and not a.session.unsent
            and not b.session.unsent
            and not a.session.sent
            and not b.session.sent
            and not any(e.m._out for p in self.pipes for e in p.ends if e.m is not None)
            and not any(p.wires[0] or p.wires[1] for p in self.pipes)
        )
