"""The session protocol of the Messenger, sans-I/O (wire format: docs/protocol.md).

Two objects, after Ceph's AsyncMessenger/msgr2, in our own terms:

- `Session` is the state that outlives a transport connection: cookies,
  global/connect sequence numbers, the outgoing sequence, what was received,
  and the messages sent but not yet acknowledged (replayed after a fault).
- `Handshake`/`SessionConnection` drive one transport connection (one TCP or
  Unix socket, one shared-memory channel): banner, hello, authentication,
  ident or reconnect, then MESSAGE/ACK/KEEPALIVE frames.

Nothing here reads a clock or a socket.  Callers feed bytes (`next_read` /
`bytes_read`, or `receive_data`),
connection loss (`connection_lost`) and time (`tick(now)`), and take bytes
(`data_to_send`), events (`next_events`) and the next deadline.  Anything that
is not in the transition table is a RemoteProtocolError and closes the
connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._codec import OutMessage as OutMessage  # re-exported: the record the session API takes
from .._core import Message
from ..errors import (
    AccessDenied,
    ConfigurationError,
    LocalProtocolError,
    MessageTooLarge,
    PeerLost,
    RemoteProtocolError,
    Timeout,
)
from .frames import Buffer, Frame, FrameAborted, FrameReader, SegmentSink, Tag, encode_frame

BANNER = struct.Struct("<8sHQQ")  # b"copyless", version, supported features, required features
BANNER_MAGIC = b"copyless"
PROTOCOL_VERSION = 4  # 2: crcs chained; 3: HELLO carries the segment limit; 4: epilogue XOR last crc

# feature bits
FEATURE_DATA_CRC_OFF = 1 << 0  # this side may send frames without a data crc
FEATURE_GOODBYE = 1 << 1  # this side understands GOODBYE (a client that ends its session)
FEATURES_SUPPORTED = FEATURE_DATA_CRC_OFF | FEATURE_GOODBYE

HELLO = struct.Struct("<BQ")  # role (0 client, 1 server), the longest segment we take + utf-8 entity name
MIN_MAX_SEGMENT = 4096  # the least segment limit a side may announce: the handshake's frames fit
IDENT = struct.Struct("<QQQQ")  # cookie, global_seq, features in use, incarnation   + utf-8 name
RECONNECT = struct.Struct("<QQQQQ")  # client cookie, server cookie, global_seq, connect_seq, last received seq
U64 = struct.Struct("<Q")
MSG_HEADER = struct.Struct("<HBBQQQ")  # type, priority, flags, tid, seq, ack_seq
NONCE = 32

MSG_FLAG_REPLY = 0x1


class FeatureMismatch(RemoteProtocolError):
    """The peer requires a feature we lack (or the other way round)."""


class WrongPeer(RemoteProtocolError):
    """The dialled address is another endpoint than the one named in connect()."""


class AuthenticationFailed(AccessDenied):
    """The peer did not prove knowledge of the shared secret (or we could not)."""


class Role(enum.Enum):
    CLIENT = 0
    SERVER = 1


class State(enum.Enum):
    BANNER = "banner"
    HELLO = "hello"
    AUTH = "auth"
    SESSION = "session"  # ident / reconnect exchange
    READY = "ready"
    CLOSED = "closed"


# for the per-message paths: a plain global is ~5 ns to compare with, State.READY ~50
_READY = State.READY


# ---------------------------------------------------------------- events
@dataclass
class Established:
    """The connection carries the session now (new=False: a reconnect resumed it)."""

    peer_name: str
    new: bool


@dataclass
class MessageReceived:
    type: int
    tid: int
    seq: int
    front: memoryview
    data: memoryview
    is_reply: bool
    priority: int


@dataclass
class MessagesReceived:
    """Received messages, in order (a SessionConnection made with messages=True): one
    event for a run of them, each a copyless.Message whose connection is the machine's
    `owner`; front and data are memoryviews into the read buffer."""

    messages: list[Message]


@dataclass
class ReplyAborted:
    """The peer revoked a reply while writing it (an aborted MESSAGE frame marked as a
    reply): the call waiting for transaction `tid` gets no reply."""

    tid: int


@dataclass
class SessionReset:
    """The peer no longer knows our session (it restarted): queued messages were dropped."""

    dropped: int


@dataclass
class Waiting:
    """Our connection attempt lost a race with the peer's: the peer told us to wait for its
    connection (this one closes next, with no error)."""


@dataclass
class MessageRefused:
    """A message queued before the peer told its segment limit (its first handshake) is
    over that limit: it was taken off the queue, unsent (a send() made once the limit is
    known raises MessageTooLarge instead)."""

    message: OutMessage
    error: MessageTooLarge


@dataclass
class KeepaliveAck:
    sent_ns: int
    rtt_ns: int


@dataclass
class Closed:
    """The connection is finished; error is None for a clean close.  goodbye: the peer (a
    client) ended its session for good, so there is nothing to keep for it."""

    error: Exception | None
    goodbye: bool = False


Event = (
    Established
    | MessageReceived
    | MessagesReceived
    | ReplyAborted
    | SessionReset
    | Waiting
    | KeepaliveAck
    | MessageRefused
    | Closed
)


# OutMessage(type, front, data, tid=0, priority=0, is_reply=False, seq=0): what a session
# sends and keeps until it is acknowledged (front and data are sequences of buffers; seq is
# assigned when first written).  A plain record, compiled so that the send path can make one
# in a few tens of ns (docs/design.md, "Send path").


class MessageWriter(Protocol):
    """Where write_message puts a message: copyless._codec.Writer."""

    def message(
        self, msg: Message, seq: int, ack: int, data_crc: bool, lossless: bool, max_segment: int, /
    ) -> OutMessage | None: ...
    def send(self, buffers: list[Buffer], /) -> None: ...


# ---------------------------------------------------------------- session state
@dataclass(slots=True)  # slots: the compiled send reads them (copyless._codec.compiled_send)
class Session:
    """What survives a connection fault.  lossless=False (lossy): nothing is replayed.

    A peer session (peer=True) is one per peer name, and either side may connect: its
    cookies are "ours" and "theirs" whichever side dialled.  `attempt` is our own
    connection attempt in flight and `carrier` the connection that carries the session
    now; an incoming connection for the session is weighed against both.  resetcheck
    decides what a peer restart does to what was queued for it: dropped (True, as a
    client's session is), or kept and sent to the new incarnation, renumbered (False).
    """

    lossless: bool = True
    peer: bool = False
    resetcheck: bool = True
    cookie: int = field(default_factory=lambda: int.from_bytes(os.urandom(8), "little") or 1)
    peer_cookie: int = 0
    global_seq: int = 0  # ours: each attempt we make takes the next one
    peer_global_seq: int = 0  # the highest the peer has sent us: an attempt at or below it is stale
    peer_incarnation: int = 0  # when the peer's process started (it restarts with a later one)
    connect_seq: int = 0
    out_seq: int = 0  # last seq assigned
    in_seq: int = 0  # last seq received (and delivered)
    unsent: deque[OutMessage] = field(default_factory=deque)
    sent: deque[OutMessage] = field(default_factory=deque)  # written, not yet acked (lossless only)
    # the longest segment the peer takes, as its last HELLO said (0: not known yet)
    peer_max_segment: int = 0
    attempt: SessionConnection | None = field(default=None, repr=False, compare=False)
    carrier: SessionConnection | None = field(default=None, repr=False, compare=False)

    def queue(self, msg: OutMessage) -> None:
        """Queue msg for sending; MessageTooLarge (nothing queued) if a segment of it is
        over the peer's limit, when known (else it is checked when the limit is: see
        MessageRefused)."""
        if self.peer_max_segment:
            check_size(msg, self.peer_max_segment)
        self.unsent.append(msg)

    def revoke(self, msg: Message) -> bool | None:
        """Take msg (a copyless.Message sent on this session) back from the queues:
        True if it was never written (it is gone: no seq was spent on it); False if it
        was (it is kept as an empty, aborted stand-in with its seq, so that a replay
        neither resends its data nor leaves a gap; the peer may have it already);
        None if it is in neither queue (acknowledged, or not ours).  Either way the
        session holds none of its buffers any more."""
        sent_id = msg._sent_id  # its last send's number (0: never sent)
        for q in (self.unsent, self.sent):
            for i, m in enumerate(q):
                if sent_id and m.sent_id == sent_id:
                    if m.seq == 0:
                        del q[i]
                        return True
                    q[i] = OutMessage(m.type, [], [], m.tid, m.priority, m.is_reply, m.seq, aborted=True)
                    return False
        return None

    def refuse_oversized(self) -> list[MessageRefused]:
        """The messages queued while the peer's limit was not known that are over it
        (now that it is), taken off the queue.  Only unnumbered ones can be: a message
        is numbered once written, against a known limit that holds for the session."""
        kept: deque[OutMessage] = deque()
        refused = []
        for m in self.unsent:
            try:
                if m.seq == 0:
                    check_size(m, self.peer_max_segment)
                kept.append(m)
            except MessageTooLarge as e:
                refused.append(MessageRefused(m, e))
        self.unsent = kept
        return refused

    def acked(self, seq: int) -> None:
        while self.sent and self.sent[0].seq <= seq:
            self.sent.popleft()

    def requeue_unacked(self) -> None:
        """After a fault: what was sent but not acked goes first, in order, same seqs."""
        if self.lossless:
            self.unsent.extendleft(reversed(self.sent))
        self.sent.clear()

    def reset(self, keep: bool = False) -> int:
        """The peer lost the session: start a new one.  What was queued for the old peer
        is dropped (the count is returned), or with keep=True sent to the new one,
        renumbered from 1 in the same order, except replies and revoked messages' stand-ins
        (dropped and counted): they answer calls of the old process, and the new one, whose
        transaction ids start again, would take them for answers to its own."""
        if keep:
            self.requeue_unacked()
            kept = deque(m for m in self.unsent if not (m.is_reply or m.aborted))
            dropped = len(self.unsent) - len(kept)
            self.unsent = kept
            for m in self.unsent:
                m.seq = 0
        else:
            dropped = len(self.unsent) + len(self.sent)
            self.unsent.clear()
            self.sent.clear()
        self.out_seq = self.in_seq = 0
        self.peer_cookie = self.peer_global_seq = 0
        self.connect_seq = 0
        self.cookie = int.from_bytes(os.urandom(8), "little") or 1
        return dropped


def out_message(msg: Message) -> OutMessage:
    """The record a session queues for a copyless.Message (numbered as a send of it,
    for revoke)."""
    if msg.type >= 1 << 16:  # a Message's type is a u32 (pub/sub); the session header has 16 bits
        raise ConfigurationError(f"message type {msg.type} does not fit the messenger's u16")
    # _buffers: the data as a list of buffers, for any Message (a received one can be sent on)
    return OutMessage(msg.type, [msg.front], msg._buffers, msg.tid, msg.priority, msg.is_reply, sent_id=msg._stamp())


def checked_max_segment(n: int) -> int:
    """n, if it will do as the longest segment a side takes (ConfigurationError if not)."""
    if n < MIN_MAX_SEGMENT:
        raise ConfigurationError(f"max_segment must be >= {MIN_MAX_SEGMENT} (the handshake's frames)")
    return n


def check_size(msg: OutMessage, limit: int) -> None:
    """MessageTooLarge if msg's front or data segment is over `limit` bytes."""
    for what, bufs in (("front", msg.front), ("data", msg.data)):
        n = sum(memoryview(b).nbytes for b in bufs)
        if n > limit:
            raise MessageTooLarge(f"a {n}-byte {what} segment, over the peer's limit of {limit} bytes (max_segment)")


class Backoff:
    """When to try again after a failed connection attempt: `first` seconds, doubled
    after each failure up to `cap`; back to `first` once a session is established.
    A peer that is down costs a few attempts a second at most, and one that comes
    back is found within `cap`."""

    def __init__(self, first: float = 0.01, cap: float = 2.0) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got {first}, {cap}")
        self.first, self.cap = first, cap
        self._next = first

    def next_delay(self) -> float:
        """The delay before the next attempt (each call is one more failure)."""
        d = self._next
        self._next = min(d * 2, self.cap)
        return d

    def reset(self) -> None:
        self._next = self.first


class SessionRegistry:
    """A Messenger's sessions: clients' by their cookie, peers' by name.

    `name` is ours (it breaks ties between simultaneous connects); `make_peer(name)`
    returns a new Session if that name is a peer of ours, None if it is a client."""

    def __init__(self, name: str = "", make_peer: Callable[[str], Session | None] | None = None) -> None:
        self.name = name
        self.by_client: dict[int, Session] = {}
        self.by_peer: dict[str, Session] = {}
        self._make_peer = make_peer or (lambda _name: None)

    def peer(self, name: str) -> Session | None:
        """The session with peer `name` (made if the name is a peer's), or None (a client)."""
        s = self.by_peer.get(name)
        if s is None:
            s = self._make_peer(name)
            if s is not None:
                s.peer = True
                self.by_peer[name] = s
        return s

    def lookup(self, client_cookie: int) -> Session | None:
        return self.by_client.get(client_cookie)

    def create(self, client_cookie: int, lossless: bool) -> Session:
        s = Session(lossless=lossless)
        s.peer_cookie = client_cookie
        self.by_client[client_cookie] = s
        return s


# ---------------------------------------------------------------- the connection machine
class SessionConnection:
    """One transport connection carrying a session.

    Client: `SessionConnection(Role.CLIENT, name, session=Session(...))`.
    Server: `SessionConnection(Role.SERVER, name, registry=registry)`; the
    session is found or made during the handshake.
    """

    # What the compiled send of a Messenger's Connection reads and writes is in slots
    # (copyless._codec.compiled_send); everything else in __dict__.
    __slots__ = (
        "state",
        "session",
        "_out",
        "data_crc",
        "_unacked_in",
        "_ack_due",
        "peer_max_segment",
        # and the compiled read round's (messenger.py, compiled_read)
        "reader",
        "compiled",
        "messages",
        "_events",
        "_now",
        "_last_rx",
        "ack_every",
        "ack_delay",
        "owner",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        role: Role,
        name: str,
        *,
        session: Session | None = None,
        registry: SessionRegistry | None = None,
        expect: str | None = None,
        incarnation: int = 0,
        lossless: bool = True,
        secret: bytes | None = None,
        features_required: int = 0,
        data_crc: bool = True,
        max_segment: int = 64 << 20,
        sink: SegmentSink | None = None,
        now: float = 0.0,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = None,
        keepalive_interval: float | None = None,
        ack_delay: float = 0.005,
        ack_every: int = 64,
        messages: bool = False,
        compiled: bool = True,
    ) -> None:
        if role is Role.CLIENT and session is None:
            raise LocalProtocolError("a client connection needs its Session")
        if role is Role.SERVER and registry is None:
            raise LocalProtocolError("a server connection needs the SessionRegistry")
        self.role, self.name = role, name
        self.session = session
        self.registry = registry
        self.expect = expect  # client: the name the peer must have
        self.incarnation = incarnation  # when our process started: orders a peer's restarts
        self._cs = 0  # client: the connect_seq this attempt asks for
        self._waited = False  # server: we told the peer to wait, so it hangs up on us
        if session is not None and role is Role.CLIENT:
            session.attempt = self
        self.lossless = lossless
        self.secret = secret
        self.required = features_required | (0 if data_crc else FEATURE_DATA_CRC_OFF)
        self.data_crc = data_crc
        self.state = State.BANNER
        self.peer_name = ""
        self.peer_features = 0
        self.max_segment = checked_max_segment(max_segment)  # the longest segment we take (announced in HELLO)
        self.peer_max_segment = 0  # and the peer's (0: not known until its HELLO)
        self.reader = FrameReader(max_segment=max_segment, sink=sink)  # budgets: the owner's throttles
        # messages=True: what arrives is handed out as copyless.Message objects, a run of them
        # per MessagesReceived event, each with `owner` as its connection; and, with compiled
        # (the default), the steady state (runs of small MESSAGE frames in READY) is parsed,
        # checked and sequenced by the core in one call (FrameReader.take_messages).  Else one
        # MessageReceived event per message, all in Python.
        self.messages, self.compiled = messages, compiled
        self.owner: Any = None  # a messenger Connection
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self._nonce = b""
        self._unacked_in = 0  # messages received since we last told the peer
        # Acks ride on our next message; an ACK frame goes only when ack_every messages
        # are unacknowledged or ack_delay passed without one (a frame per message would
        # wake the peer once more per request/reply).
        self.ack_delay, self.ack_every = ack_delay, ack_every
        self._ack_due: float | None = None
        # time: only what callers tell us (tick); never a clock
        self._now = self._started = self._last_rx = now
        self.handshake_timeout, self.idle_timeout = handshake_timeout, idle_timeout
        self.keepalive_interval = keepalive_interval
        self._next_keepalive: float | None = None
        self._out.append(BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, FEATURES_SUPPORTED, self.required))

    # ------------------------------------------------------------ API
    def data_to_send(self) -> list[Buffer]:
        out, self._out = self._out, []
        return out

    def next_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def take_messages(self) -> list[Message]:
        """The messages received so far, if nothing else is pending before or after them
        (the steady state: a run of MessagesReceived): the owner may deliver them at
        once, after each read, instead of with next_events().  [] otherwise."""
        ev = self._events
        if len(ev) == 1 and type(ev[0]) is MessagesReceived:
            self._events = []
            return ev[0].messages
        return []

    def send_message(self, msg: OutMessage) -> None:
        """Queue a message on the session; it goes out now if the connection is ready."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection closed")
        if self.session is None:
            raise LocalProtocolError("no session yet: wait for Established")
        self.session.queue(msg)
        if self.state is State.READY:
            self._flush()

    def write_message(self, msg: Message, out: MessageWriter) -> None:
        """Send a copyless.Message: the steady-state twin of send_message for an owner
        that writes through a compiled send queue (`out`, a copyless._codec.Writer).  On
        a READY connection with nothing queued before it, the seq and ack are assigned
        here and the core encodes the frame straight into `out` (which writes it now or
        batches it); otherwise it goes through send_message and data_to_send into `out`."""
        s = self.session
        if self.state is not _READY or s is None or s.unsent or self._out:
            self.send_message(out_message(msg))
            out.send(self.data_to_send())
            return
        seq = s.out_seq + 1
        kept = out.message(msg, seq, s.in_seq, self.data_crc, s.lossless, self.peer_max_segment)
        s.out_seq = seq
        if kept is not None:
            s.sent.append(kept)
        self._unacked_in, self._ack_due = 0, None  # the header carried our ack

    def flush(self) -> None:
        """Write what was queued on the session while no connection carried it."""
        if self.state is State.READY and self.session is not None and self.session.unsent:
            self._flush()

    def tick(self, now: float) -> None:
        """Tell the machine the time; it closes on a deadline or sends a keepalive."""
        self._now = now
        if self.state is State.CLOSED:
            return
        if self.state is not State.READY:
            if now - self._started >= self.handshake_timeout:
                self._close(
                    Timeout(f"handshake with {self.peer_name or 'the peer'} took over {self.handshake_timeout} s")
                )
            return
        if self.idle_timeout is not None and now - self._last_rx >= self.idle_timeout:
            if self.session is not None:
                self.session.requeue_unacked()
            self._close(Timeout(f"nothing from {self.peer_name} for {self.idle_timeout} s"))
            return
        if self._next_keepalive is not None and now >= self._next_keepalive:
            self.keepalive(now)
        if self._ack_due is not None and now >= self._ack_due:
            self.send_ack()

    def next_deadline(self) -> float | None:
        """When tick() must be called next (None: no timer running)."""
        if self.state is State.CLOSED:
            return None
        if self.state is not State.READY:
            return self._started + self.handshake_timeout
        times = [t for t in (self._next_keepalive, self._ack_due) if t is not None]
        if self.idle_timeout is not None:
            times.append(self._last_rx + self.idle_timeout)
        return min(times) if times else None

    def ack_if_needed(self) -> None:
        """After a batch of reads: acknowledge now if ack_every messages are waiting for it
        (otherwise the ack rides on our next message, or goes when ack_delay runs out)."""
        if self._unacked_in >= self.ack_every:
            self.send_ack()

    def settle_reads(self) -> float:
        """After a round of reads whose messages the owner took (take_messages):
        acknowledge now if ack_every of them wait for it.  Returns -1.0 if the owner must
        pump (events, bytes to send, or not READY any more), else the time by which its
        timer must fire for the ack owed (0.0: none owed)."""
        if self._unacked_in >= self.ack_every:
            self.send_ack()
        if self._events or self._out or self.state is not _READY:
            return -1.0
        return self._ack_due or 0.0

    def send_ack(self) -> None:
        """Acknowledge everything received, now, with an ACK frame."""
        if self.state is State.READY and self.session is not None and self._unacked_in:
            self._out += encode_frame(Tag.ACK, [[U64.pack(self.session.in_seq)]])
        self._unacked_in = 0
        self._ack_due = None

    def keepalive(self, now: float) -> None:
        if self.state is State.READY:
            # round, not int(): a float time in seconds truncated to ns is often 1 ns short
            # (1000.3 s gave 1000299999999 ns), and so was the rtt that the peer's echo gives
            self._out += encode_frame(Tag.KEEPALIVE, [[U64.pack(round(now * 1e9))]])
            if self.keepalive_interval is not None:
                self._next_keepalive = now + self.keepalive_interval

    def close(self) -> None:
        self._close(None)

    def goodbye(self) -> None:
        """A client ends its session for good: tell the server (if it understands it), so it
        need not keep the session for a reconnect that will not come.  Queues the frame
        only; the owner flushes it and closes the transport."""
        if self.role is Role.CLIENT and self.state is State.READY and self.peer_features & FEATURE_GOODBYE:
            self._out += encode_frame(Tag.GOODBYE, [[b""]])

    def connection_lost(self) -> None:
        """The transport ended: unacked messages go back to the queue (lossless).  An end
        during the handshake or in the middle of a frame is an error (PeerLost): the peer
        refused us, died, or the link broke mid-message."""
        if self.state is not State.CLOSED:
            if self.session is not None:
                self.session.requeue_unacked()
            who = self.peer_name or "the peer"
            if self._waited or self._race_over():
                self._close(None)  # it went, as we asked; or it lost a race and gave up
            elif self.role is Role.SERVER and not self.peer_name and not self.reader.partial:
                self._close(None)  # it never said who it is: nobody to report a fault to
            elif self.state is not State.READY:
                self._close(PeerLost(f"{who} hung up during the handshake (not our protocol, or refused us)"))
            elif self.reader.partial:
                self._close(PeerLost(f"{who} went away in the middle of a frame"))
            else:
                self._close(None)

    def next_read(self) -> memoryview:
        """The buffer the transport should read into next (empty: read nothing now)."""
        if self.state is State.CLOSED:
            return memoryview(b"")
        return self.reader.next_read()

    def bytes_read(self, n: int, now: float | None = None) -> None:
        """Account for n bytes read into the buffer from next_read(), and act on them
        (`now`: the time, if the owner has it: cheaper than a tick() per read)."""
        if self.state is State.CLOSED:
            return
        if now is not None:
            self._now = now
        self._last_rx = self._now
        self.reader.bytes_read(n)
        self._parse()

    def received(self, n: int, now: float) -> list[Message]:
        """bytes_read(n, now) and then take_messages(), in one call: the steady state of a
        read (a run of whole MESSAGE frames, parsed by the core) costs the owner one call."""
        reader, s = self.reader, self.session
        if self.state is _READY and self.compiled and self.messages and not self._events and s is not None:
            out: list[Message] = []
            got = reader.read_messages(n, s.lossless, s.in_seq, self.owner, out)
            if got is not None:
                self._now = self._last_rx = now
                more = self._took(s, *got)
                if not more:
                    return out
                if out:  # a frame the core left to us comes after these
                    self._events.append(MessagesReceived(out))
                return self.after_scan()
        self.bytes_read(n, now)
        return self.take_messages()

    def after_scan(self) -> list[Message]:
        """The core's scan stopped at a frame that is the Python path's: act on it and
        on what follows, without scanning it again; then take_messages().  (received()
        ends so, and the compiled read round calls it after its own scan.)"""
        self._parse(scanned=True)
        return self.take_messages()

    def _parse(self, scanned: bool = False) -> None:
        """Act on what the reader has (after bytes_read).  scanned: the core's scan just
        stopped at the frame at hand (it is the Python path's)."""
        reader = self.reader
        try:
            if self.state is State.BANNER:
                raw = reader.take(BANNER.size)
                if raw is None:
                    return
                self._on_banner(bytes(raw))
            fast = self.messages and self.compiled
            while True:
                if fast and self.state is _READY and reader.at_frame:
                    # (not scanning again what the core just stopped at, nor an empty
                    # buffer: a large reply is three reads, each with a scan or two)
                    if scanned:
                        scanned = False
                    elif not reader.partial or not self._take_messages():
                        break  # nothing else is complete yet
                    f = reader.next_frame(single=True)  # one frame the core left to us
                else:
                    f = reader.next_frame()
                if f is None:
                    break
                if isinstance(f, Frame):
                    self._on_frame(f)
                elif f.tag == Tag.MESSAGE and self.state is _READY:
                    self._on_aborted_message(f)  # the sender revoked it: its seq still counts
                # (any other aborted frame is dropped: the sender gave it up)
                if self._closed():
                    break
        except (RemoteProtocolError, AuthenticationFailed) as e:
            # the peer broke the protocol or failed authentication: this connection ends
            if self.session is not None:
                self.session.requeue_unacked()
            self._close(e)

    def resume_reading(self) -> None:
        """The owner raised the reader's budgets: a held frame may go on."""
        self.reader.resume()
        self.bytes_read(0)

    def receive_data(self, data: bytes) -> int:
        """Convenience for tests and simple transports: feed bytes (copied into place).
        Returns how many were taken (fewer while reading is paused)."""
        view = memoryview(data)
        taken = 0
        while view and self.state is not State.CLOSED:
            buf = self.next_read()
            n = min(len(buf), len(view))
            if n == 0:
                break
            buf[:n] = view[:n]
            view = view[n:]
            taken += n
            self.bytes_read(n)
        return taken

    # ------------------------------------------------------------ handshake
    def _on_banner(self, raw: bytes) -> None:
        magic, version, supported, required = BANNER.unpack(raw)
        if magic != BANNER_MAGIC:
            raise RemoteProtocolError("the peer is not speaking the copyless session protocol")
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version {version}, we speak {PROTOCOL_VERSION}")
        if required & ~FEATURES_SUPPORTED:
            raise FeatureMismatch(f"the peer requires features {required & ~FEATURES_SUPPORTED:#x} we lack")
        if self.required & ~supported:
            raise FeatureMismatch(f"we require features {self.required & ~supported:#x} the peer lacks")
        self.peer_features = supported
        self.state = State.HELLO
        self._out += encode_frame(Tag.HELLO, [[HELLO.pack(self.role.value, self.max_segment) + self.name.encode()]])

    def _on_frame(self, f: Frame) -> None:
        handler = _HANDLERS.get((self.state, self.role, f.tag))
        if handler is None:
            raise RemoteProtocolError(f"unexpected {_name(f.tag)} frame in state {self.state.value} ({self.role.name})")
        try:
            handler(self, f)
        except (struct.error, IndexError, UnicodeDecodeError) as e:  # a payload shorter than its layout
            raise RemoteProtocolError(f"malformed {_name(f.tag)} frame: {e}") from e

    def _on_hello(self, f: Frame) -> None:
        body = bytes(f.segments[0])
        role, limit = HELLO.unpack_from(body)
        if role == self.role.value:
            raise RemoteProtocolError("both ends claim the same role")
        if limit < MIN_MAX_SEGMENT:
            raise RemoteProtocolError(f"the peer takes segments of {limit} bytes, under the least ({MIN_MAX_SEGMENT})")
        self.peer_max_segment = limit
        self.peer_name = body[HELLO.size :].decode(errors="replace")
        if self.expect is not None and self.peer_name != self.expect:
            raise WrongPeer(f"reached {self.peer_name!r}, not {self.expect!r}")
        if self.secret is None:
            self._to_session()
        else:
            self.state = State.AUTH
            if self.role is Role.CLIENT:  # the client asks; the server challenges back
                self._nonce = os.urandom(NONCE)
                self._out += encode_frame(Tag.AUTH_REQUEST, [[self._nonce]])

    def _mac(self, nonce: bytes, who: bytes) -> bytes:
        assert self.secret is not None
        return hmac.new(self.secret, who + nonce, hashlib.sha256).digest()

    def _on_auth_request(self, f: Frame) -> None:  # server
        client_nonce = bytes(f.segments[0])
        if len(client_nonce) != NONCE:
            raise RemoteProtocolError("bad auth request")
        self._nonce = os.urandom(NONCE)
        # prove we know the secret, and challenge the client to prove it too
        self._out += encode_frame(Tag.AUTH_CHALLENGE, [[self._mac(client_nonce, b"server"), self._nonce]])

    def _on_auth_challenge(self, f: Frame) -> None:  # client
        body = bytes(f.segments[0])
        proof, server_nonce = body[:32], body[32:]
        if len(server_nonce) != NONCE:
            raise RemoteProtocolError("bad auth challenge")
        if not hmac.compare_digest(proof, self._mac(self._nonce, b"server")):
            self._out += encode_frame(Tag.AUTH_BAD, [[b"bad secret"]])  # so the server fails too
            raise AuthenticationFailed(f"{self.peer_name or 'the server'} does not know the shared secret")
        self._out += encode_frame(Tag.AUTH_REPLY, [[self._mac(server_nonce, b"client")]])

    def _on_auth_reply(self, f: Frame) -> None:  # server
        if not hmac.compare_digest(bytes(f.segments[0]), self._mac(self._nonce, b"client")):
            self._out += encode_frame(Tag.AUTH_BAD, [[b"bad secret"]])
            raise AuthenticationFailed(f"{self.peer_name or 'the client'} does not know the shared secret")
        self._out += encode_frame(Tag.AUTH_DONE, [[b""]])
        self._to_session()

    def _on_auth_done(self, f: Frame) -> None:  # client
        self._to_session()

    def _on_auth_bad(self, f: Frame) -> None:
        raise AuthenticationFailed(f"{self.peer_name} refused our proof of the shared secret")

    def _to_session(self) -> None:
        self.state = State.SESSION
        if self.role is Role.SERVER:
            return  # the client speaks first
        s = self.session
        assert s is not None
        if s.peer_cookie == 0:  # a new session
            s.global_seq += 1
            ident = IDENT.pack(s.cookie, s.global_seq, 0, self.incarnation) + self.name.encode()
            self._out += encode_frame(Tag.CLIENT_IDENT, [[ident]])
        else:
            s.global_seq += 1
            self._cs = s.connect_seq + 1  # the session's own moves when this attempt succeeds
            self._out += encode_frame(
                Tag.SESSION_RECONNECT,
                [[RECONNECT.pack(s.cookie, s.peer_cookie, s.global_seq, self._cs, s.in_seq)]],
            )

    # server side of the session exchange
    def _on_client_ident(self, f: Frame) -> None:
        assert self.registry is not None
        body = bytes(f.segments[0])
        cookie, global_seq, _features, incarnation = IDENT.unpack_from(body)
        reset: SessionReset | None = None
        s = self.registry.peer(self.peer_name)
        if s is not None:
            if incarnation < s.peer_incarnation:
                # written by a process of that name that has since restarted (it died
                # with this in flight): not the peer we know, and not a restart of it
                raise RemoteProtocolError(f"an ident from an earlier incarnation of {self.peer_name}")
            if incarnation == s.peer_incarnation and global_seq <= s.peer_global_seq:
                # older than something the peer has already sent us: an attempt it gave
                # up (it lost a race), delayed; if it still wants it, it comes again
                self._answer(Tag.SESSION_RETRY_GLOBAL, s.peer_global_seq)
                return
            if s.peer_cookie and s.peer_cookie != cookie:
                # the peer restarted (a new cookie): report it, and drop or keep its queue
                reset = SessionReset(s.reset(keep=not s.resetcheck))
            elif self._race_won(s, cookie):
                self._answer(Tag.WAIT, s.global_seq)  # our own attempt goes on: it waits for it
                return
        else:
            s = self.registry.lookup(cookie)
            if s is None:
                s = self.registry.create(cookie, self.lossless)
        if s.peer_cookie == cookie:
            # A cookie we know in an ident (not a reconnect): the peer never saw our
            # SERVER_IDENT, so it sent nothing on the session, and it has seen nothing
            # of ours either.  Resume from zero: everything we sent goes again, and
            # nothing we queued is dropped.  (A restarted peer has a new cookie.)  A
            # connection we still hold for the session is dead to the peer: this one
            # replaces it.
            s.requeue_unacked()
        s.peer_cookie, s.peer_incarnation = cookie, incarnation
        s.peer_global_seq = max(s.peer_global_seq, global_seq)
        self.session = s
        ident = IDENT.pack(s.cookie, s.global_seq, 0, self.incarnation) + self.name.encode()
        self._out += encode_frame(Tag.SERVER_IDENT, [[ident]])
        self._ready(new=True)
        if reset is not None:  # after Established: the owner knows the session's connection by then
            self._events.append(reset)

    def _race_won(self, s: Session, their_cookie: int) -> bool:
        """Both sides are connecting: the attempt of the side with the lower (name, cookie)
        goes on, decided the same way at both ends."""
        return self._attempt_alive(s) and (self.name, s.cookie) < (self.peer_name, their_cookie)

    def _attempt_alive(self, s: Session) -> bool:
        a = s.attempt
        return a is not None and a is not self and a.state is not State.CLOSED

    def _race_over(self) -> bool:
        """An incoming attempt from a peer whose session another connection carries, or
        races our own attempt: a hang-up is the peer giving this one up, not a fault."""
        if self.role is Role.CLIENT or self.registry is None or self.state is State.READY or not self.peer_name:
            return False
        s = self.registry.by_peer.get(self.peer_name)
        return s is not None and (self._carried_elsewhere(s) or self._attempt_alive(s))

    def _carried_elsewhere(self, s: Session) -> bool:
        c = s.carrier
        return c is not None and c is not self and c.state is State.READY

    def _answer(self, tag: Tag, value: int) -> None:
        self._out += encode_frame(tag, [[U64.pack(value)]])
        self._waited = tag is Tag.WAIT

    def _on_reconnect(self, f: Frame) -> None:
        assert self.registry is not None
        client_cookie, server_cookie, global_seq, connect_seq, peer_in_seq = RECONNECT.unpack(bytes(f.segments[0]))
        s = self.registry.peer(self.peer_name) or self.registry.lookup(client_cookie)
        if s is not None and s.peer and s.cookie == server_cookie and s.peer_cookie == 0:
            # our attempt reached the peer, which answered, but the answer never reached
            # us: it knows our session, we learn its cookie now (we received nothing yet)
            s.peer_cookie = client_cookie
        if s is None or s.cookie != server_cookie or s.peer_cookie != client_cookie:
            # we restarted (or never knew it): the peer must start a new session
            self._answer(Tag.SESSION_RESET, 0)
            return
        if global_seq <= s.peer_global_seq:
            # an attempt older than something we have already seen from this peer (it
            # was delayed, or raced a newer one): it must come again with a newer one
            self._answer(Tag.SESSION_RETRY_GLOBAL, s.peer_global_seq)
            return
        if s.peer and self._race_won(s, client_cookie):
            self._answer(Tag.WAIT, s.global_seq)  # both reconnect at once: ours goes on
            return
        if connect_seq <= s.connect_seq:  # a stale attempt: tell it where we are
            self._answer(Tag.SESSION_RETRY, s.connect_seq)
            return
        s.connect_seq, s.peer_global_seq = connect_seq, max(s.peer_global_seq, global_seq)
        self.session = s
        s.requeue_unacked()  # our side of the old connection may not have seen its fault yet
        s.acked(peer_in_seq)
        s.unsent = deque(m for m in s.unsent if m.seq == 0 or m.seq > peer_in_seq)
        self._out += encode_frame(Tag.SESSION_RECONNECT_OK, [[U64.pack(s.in_seq)]])
        self._ready(new=False)

    # client side of the session exchange
    def _on_server_ident(self, f: Frame) -> None:
        s = self.session
        assert s is not None
        body = bytes(f.segments[0])
        cookie, global_seq, _features, incarnation = IDENT.unpack_from(body)
        s.peer_cookie, s.peer_global_seq = cookie, max(s.peer_global_seq, global_seq)
        s.peer_incarnation = incarnation
        self._ready(new=True)

    def _on_reconnect_ok(self, f: Frame) -> None:
        s = self.session
        assert s is not None
        (peer_in_seq,) = U64.unpack(bytes(f.segments[0]))
        s.connect_seq = self._cs
        s.acked(peer_in_seq)
        s.unsent = deque(m for m in s.unsent if m.seq == 0 or m.seq > peer_in_seq)
        self._ready(new=False)

    def _on_session_reset(self, f: Frame) -> None:
        s = self.session
        assert s is not None
        dropped = s.reset(keep=not s.resetcheck)
        self._events.append(SessionReset(dropped))
        self._to_session()  # and start a new one on this connection

    def _on_session_retry(self, f: Frame) -> None:
        s = self.session
        assert s is not None
        (server_connect_seq,) = U64.unpack(bytes(f.segments[0]))
        s.connect_seq = max(s.connect_seq, server_connect_seq)  # _to_session asks for one past it
        self._to_session()

    def _on_session_retry_global(self, f: Frame) -> None:
        s = self.session
        assert s is not None
        (server_global_seq,) = U64.unpack(bytes(f.segments[0]))
        s.global_seq = max(s.global_seq, server_global_seq)  # _to_session bumps it past
        self._to_session()

    def _on_wait(self, f: Frame) -> None:
        self._events.append(Waiting())
        self._close(None)

    def _ready(self, new: bool) -> None:
        s = self.session
        assert s is not None
        if s.attempt is not None and s.attempt is not self:
            s.attempt._close(None)  # the peer's connection won: ours stops, and leaves the session be
        if self._carried_elsewhere(s):
            assert s.carrier is not None
            s.carrier._close(None)  # its transport is dead or dying: this one carries on
        s.attempt, s.carrier = None, self
        self.state = State.READY
        self._last_rx = self._now
        if self.keepalive_interval is not None:
            self._next_keepalive = self._now + self.keepalive_interval
        self._events.append(Established(self.peer_name, new))
        if s.peer_max_segment != self.peer_max_segment:  # first known, or a restarted peer's
            s.peer_max_segment = self.peer_max_segment
            self._events += s.refuse_oversized()
        self._flush()

    # ------------------------------------------------------------ steady state
    def _flush(self) -> None:
        s = self.session
        assert s is not None
        while s.unsent:
            m = s.unsent.popleft()
            if m.seq == 0:
                s.out_seq += 1
                m.seq = s.out_seq
            flags = MSG_FLAG_REPLY if m.is_reply else 0
            header = MSG_HEADER.pack(m.type, m.priority, flags, m.tid, m.seq, s.in_seq)
            self._out += encode_frame(
                Tag.MESSAGE, [[header], m.front, m.data], data_crc=self.data_crc, aborted=m.aborted
            )
            self._unacked_in, self._ack_due = 0, None  # the header carried our ack
            if s.lossless:
                s.sent.append(m)

    def _received(self) -> list[Message]:
        """The list the next received message goes to: that of the last event if it is a
        MessagesReceived (so a run stays one event), else a new one's."""
        ev = self._events
        if ev:
            last = ev[-1]
            if type(last) is MessagesReceived:
                return last.messages
        batch = MessagesReceived([])
        ev.append(batch)
        return batch.messages

    def _take_messages(self) -> bool:
        """Let the core take the run of steady-state MESSAGE frames at hand (what
        _on_message would do to each of them, in one call).  True: a frame it left
        is at hand for the Python path."""
        s = self.session
        assert s is not None
        out = self._received()
        more = self._took(s, *self.reader.take_messages(s.lossless, s.in_seq, self.owner, out))
        if not out:
            self._events.pop()  # the batch _received() opened stayed empty
        return more

    def _took(self, s: Session, in_seq: int, ack: int, n: int, more: bool) -> bool:
        """What the core's scan of n messages means for the session (returns `more`)."""
        if ack:
            s.acked(ack)
        if n:
            s.in_seq = in_seq
            self._unacked_in += n
            if self._ack_due is None:
                self._ack_due = self._now + self.ack_delay
        return more

    def _on_message(self, f: Frame) -> None:
        h = self._sequence(f.segments)
        if h is None:
            return  # a replayed duplicate: already delivered
        mtype, prio, flags, tid, seq, _ack = h
        front, data, reply = f.segments[1], f.segments[2], bool(flags & MSG_FLAG_REPLY)
        if self.messages:
            self._received().append(Message._received(mtype, front, data, tid, prio, seq, reply, self.owner))
        else:
            self._events.append(MessageReceived(mtype, tid, seq, front, data, reply, prio))

    def _on_aborted_message(self, f: FrameAborted) -> None:
        """A MESSAGE its sender revoked while writing it: not delivered, but its header
        (crc-checked) counts as a delivered one's would: the ack it carries, and its seq
        as received (the sender does not send that seq again, so a lossless session's
        next message follows it with no gap).  A reply says so (ReplyAborted): a call
        waits for it."""
        h = self._sequence(f.segments)
        if h is not None and h[2] & MSG_FLAG_REPLY:
            self._events.append(ReplyAborted(h[3]))

    def _sequence(self, segments: list[memoryview]) -> tuple[int, int, int, int, int, int] | None:
        """A MESSAGE frame's header, checked and sequenced: its ack taken, its seq
        received.  None: a replayed duplicate (already received)."""
        s = self.session
        assert s is not None
        if len(segments) != 3 or len(segments[0]) != MSG_HEADER.size:
            raise RemoteProtocolError("malformed MESSAGE frame")
        h = MSG_HEADER.unpack(segments[0])
        seq = h[4]
        s.acked(h[5])
        if seq <= s.in_seq:
            return None
        if s.lossless and seq != s.in_seq + 1:
            raise RemoteProtocolError(f"message seq {seq} after {s.in_seq}: a gap in a lossless session")
        s.in_seq = seq
        self._unacked_in += 1
        if self._ack_due is None:
            self._ack_due = self._now + self.ack_delay
        return h

    def _on_ack(self, f: Frame) -> None:
        assert self.session is not None
        (seq,) = U64.unpack(bytes(f.segments[0]))
        self.session.acked(seq)

    def _on_keepalive(self, f: Frame) -> None:
        self._out += encode_frame(Tag.KEEPALIVE_ACK, [[bytes(f.segments[0])]])

    def _on_keepalive_ack(self, f: Frame) -> None:
        (sent,) = U64.unpack(bytes(f.segments[0]))
        self._events.append(KeepaliveAck(sent, round(self._now * 1e9) - sent))

    def _on_goodbye(self, f: Frame) -> None:
        self._close(None, goodbye=True)

    def _closed(self) -> bool:  # a method, so type checkers do not narrow self.state across calls
        return self.state is State.CLOSED

    def _close(self, error: Exception | None, goodbye: bool = False) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        s = self.session
        if s is not None:
            if s.attempt is self:
                s.attempt = None
            if s.carrier is self:
                s.carrier = None
        self._events.append(Closed(error, goodbye))


def _name(tag: int) -> str:
    try:
        return Tag(tag).name
    except ValueError:
        return f"tag-{tag}"


C, S = Role.CLIENT, Role.SERVER
# the transition table: anything not here is a protocol error
_HANDLERS: dict[tuple[State, Role, int], Callable[[SessionConnection, Frame], None]] = {
    (State.HELLO, C, Tag.HELLO): SessionConnection._on_hello,
    (State.HELLO, S, Tag.HELLO): SessionConnection._on_hello,
    (State.AUTH, S, Tag.AUTH_REQUEST): SessionConnection._on_auth_request,
    (State.AUTH, C, Tag.AUTH_CHALLENGE): SessionConnection._on_auth_challenge,
    (State.AUTH, S, Tag.AUTH_REPLY): SessionConnection._on_auth_reply,
    (State.AUTH, C, Tag.AUTH_DONE): SessionConnection._on_auth_done,
    (State.AUTH, C, Tag.AUTH_BAD): SessionConnection._on_auth_bad,
    (State.AUTH, S, Tag.AUTH_BAD): SessionConnection._on_auth_bad,
    (State.SESSION, S, Tag.CLIENT_IDENT): SessionConnection._on_client_ident,
    (State.SESSION, S, Tag.SESSION_RECONNECT): SessionConnection._on_reconnect,
    (State.SESSION, C, Tag.SERVER_IDENT): SessionConnection._on_server_ident,
    (State.SESSION, C, Tag.SESSION_RECONNECT_OK): SessionConnection._on_reconnect_ok,
    (State.SESSION, C, Tag.SESSION_RESET): SessionConnection._on_session_reset,
    (State.SESSION, C, Tag.SESSION_RETRY): SessionConnection._on_session_retry,
    (State.SESSION, C, Tag.SESSION_RETRY_GLOBAL): SessionConnection._on_session_retry_global,
    (State.SESSION, C, Tag.WAIT): SessionConnection._on_wait,
    (State.READY, C, Tag.MESSAGE): SessionConnection._on_message,
    (State.READY, S, Tag.MESSAGE): SessionConnection._on_message,
    (State.READY, C, Tag.ACK): SessionConnection._on_ack,
    (State.READY, S, Tag.ACK): SessionConnection._on_ack,
    (State.READY, C, Tag.KEEPALIVE): SessionConnection._on_keepalive,
    (State.READY, S, Tag.KEEPALIVE): SessionConnection._on_keepalive,
    (State.READY, C, Tag.KEEPALIVE_ACK): SessionConnection._on_keepalive_ack,
    (State.READY, S, Tag.KEEPALIVE_ACK): SessionConnection._on_keepalive_ack,
    (State.READY, S, Tag.GOODBYE): SessionConnection._on_goodbye,
}
