"""Messenger: reliable, ordered sessions between named endpoints (after Ceph's AsyncMessenger).

    server = Messenger("store.1", policies={"client": Policy.stateless_server()})
    server.add_dispatcher(MyDispatcher()); server.bind("tcp://127.0.0.1:6800"); server.start()
    client = Messenger("client.7", default_policy=Policy.lossless_client())
    conn = client.connect("tcp://127.0.0.1:6800")
    conn.send(Message(type=1, front=b"...", data=[buf1, buf2]))            # scatter-gather
    reply = conn.call(Message(type=2, front=req), into=user_buffer, timeout=5)  # data lands in user_buffer

The protocol is the sans-I/O machine in protocol/session.py; this module only
drives it over transports, on a fixed pool of I/O loops (never a thread per
connection), and dispatches what arrives: `fast_dispatch` on the thread that
reads the connection (its I/O loop, or a caller waiting in call()) for
messages the dispatcher says may, `dispatch` from one dispatch thread for the
rest (by priority, then in arrival order).

Status (issue 3): tcp://, unix:// and ipc:// (shared memory) transports;
lossless and lossy clients with reconnect and replay; lossless peers that both
dial, with races resolved and one Connection per peer name; direct receive
for replies, read by the calling thread; fast and queued (prioritised)
dispatch; throttles that push back through the transport; TLS over tcp://
(docs/design.md).
"""

from __future__ import annotations

import functools
import itertools
import queue
import select
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._codec import (
    Lock,
    Throttle,
    Writer,
    compiled_call,
    compiled_messenger,
    compiled_read,
    compiled_send,
    read_round,
    recv_fill,
)
from ._core import (
    Message,  # the one Message type, shared with pub/sub (docs/design.md)
    _track_kept,
)
from ._ioloop import IOLoop, Timer
from .errors import ClosedError, ConfigurationError, CopylessError, PeerLost, RemoteProtocolError, ReplyRevoked, Timeout
from .protocol.frames import UNLIMITED, FrameReader, Preamble, Tag
from .protocol.session import (
    FEATURE_DATA_CRC_OFF,
    FEATURE_GOODBYE,
    FEATURES_SUPPORTED,
    MSG_FLAG_REPLY,
    MSG_HEADER,
    Backoff,
    Closed,
    Established,
    MessageRefused,
    MessagesReceived,
    OutMessage,
    ReplyAborted,
    Role,
    Session,
    SessionConnection,
    SessionRegistry,
    SessionReset,
    State,
    Waiting,
    WrongPeer,
    checked_max_segment,
    out_message,
)
from .transports import Listener, Stream, connect, listen

__all__ = ["Messenger", "Connection", "Dispatcher", "Policy", "Message", "FEATURE_DATA_CRC_OFF", "FEATURE_GOODBYE"]

PEER_WAIT = 0.5  # a peer told to wait for the other side's connection tries again after this
_READY = State.READY  # for the per-message paths (a plain global: ~5 ns; State.READY: ~50)
_CLOSED = State.CLOSED
# A caller that reads a socket itself reads a direct segment with recv_fill, waiting at
# most FILL_WAIT for more of it while it holds the connection's lock; if it posted a
# buffer of FILL_MIN or more, its reads between frames take only FILL_HEAD bytes.
FILL_MIN, FILL_WAIT, FILL_HEAD = 64 << 10, 0.005, 4096
TIMER_RETRY = 0.002  # a connection's timer that found a caller holding it looks again this much later


@dataclass(frozen=True)
class Policy:
    """How a connection behaves on faults (Ceph's policies).

    peer: either side may connect, and a Messenger keeps one session (and one
    Connection) per peer name; simultaneous connects are resolved.  resetcheck: when
    the peer restarts, drop what was queued for it (True) or send it to the new
    incarnation (False); either way the restart is reported (handle_remote_reset)."""

    lossy: bool
    server: bool
    reconnect: bool
    peer: bool = False
    resetcheck: bool = True

    @classmethod
    def lossy_client(cls) -> Policy:
        return cls(lossy=True, server=False, reconnect=False)

    @classmethod
    def lossless_client(cls) -> Policy:
        return cls(lossy=False, server=False, reconnect=True)

    @classmethod
    def stateless_server(cls) -> Policy:
        return cls(lossy=True, server=True, reconnect=False)

    @classmethod
    def stateful_server(cls) -> Policy:
        return cls(lossy=False, server=True, reconnect=False)

    @classmethod
    def lossless_peer(cls) -> Policy:
        return cls(lossy=False, server=False, reconnect=True, peer=True, resetcheck=False)

    @classmethod
    def lossless_peer_reuse(cls) -> Policy:
        return cls(lossy=False, server=False, reconnect=True, peer=True, resetcheck=True)


class Dispatcher:
    """Override what you need.  fast_dispatch runs on the thread reading the connection
    (an I/O loop, or a caller waiting for its reply) and must not block."""

    def can_fast_dispatch(self, msg: Message) -> bool:
        return False

    def fast_dispatch(self, msg: Message) -> None:
        pass

    def dispatch(self, msg: Message) -> None:
        pass

    def data_buffer(self, conn: Connection, type: int, tid: int, front: memoryview, nbytes: int) -> Any:
        """Where the data of an incoming message (not a reply to a call) should land:
        return a writable buffer of at least nbytes, or None for a new one.  Asked on
        the reading thread once its header and front are verified, for data large
        enough to be read directly (4 KiB or more), before any of it is read."""
        return None

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        """A transport of conn ended with this error (bad input from the peer, a failed
        authentication, a timeout); the policy acts next (reconnect, standby or reset).
        Also MessageTooLarge, for a message sent before the peer's segment limit was
        known (its first handshake) and over it: that message is dropped, unsent (a call
        waiting for its reply fails with the error), and the connection carries on."""

    def handle_connect(self, conn: Connection) -> None:
        pass

    def handle_accept(self, conn: Connection) -> None:
        pass

    def handle_reset(self, conn: Connection) -> None:
        pass

    def handle_remote_reset(self, conn: Connection) -> None:
        pass

    def handle_refused(self, conn: Connection) -> None:
        pass


# Throttle (from the core): a limit shared by a Messenger's connections (messages, or
# bytes).  A connection reserves what is free before it reads, so the frame reader's
# budget never lets it parse a message body the throttle has no room for; the reader
# then holds the frame and the connection stops reading (the sender's socket fills:
# push-back through the transport).  What the round did not queue for dispatch goes
# back at once; queued messages hold their share until dispatch() returns.  Every read
# round reserves and puts back, so it is a C type (the GIL is its lock).


class _Call:
    """A call waiting for its reply; `notify` (if set) runs once it is finished.
    (The compiled read round finishes it as finish() does, in its slots.)"""

    __slots__ = ("conn", "into", "done", "_latch", "reply", "error", "notify")

    def __init__(self, conn: Connection, into: memoryview | None) -> None:
        self.conn, self.into = conn, into
        self.done = False
        # A held lock the caller sleeps on until the call finishes, made only when it
        # must sleep: most callers read their own reply, and a lock per call cost them
        # ~0.1 us.  The finisher sets done, then releases the latch if there is one; the
        # waiter stores its latch, then looks at done again (the GIL orders the two), so
        # one of them sees the other.  One waiter: the caller.
        self._latch: threading.Lock | None = None
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.notify: Callable[[], object] | None = None

    def finish(self, reply: Message | None = None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        self.done = True
        if self._latch is not None:
            self._latch.release()
        if self.notify is not None:
            self.notify()

    def waits_on(self, conn: Connection | None) -> bool:
        """Made on conn and not finished: what a reply on conn may answer, or a fault of
        conn's fail (transaction ids are the Messenger's: one peer must not answer, or
        write into the buffer of, a call made to another)."""
        return self.conn is conn and not self.done

    def wait(self, timeout: float | None) -> bool:
        """Wait until finished; False if `timeout` passed first."""
        if self.done:
            return True
        latch = self._latch
        if latch is None:
            latch = threading.Lock()
            latch.acquire()
            self._latch = latch
            if self.done:
                return True
        return latch.acquire(timeout=-1 if timeout is None else timeout)

    def result(self) -> Message:
        """The reply of a finished call, or its error raised."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


class Connection:
    """A session with one peer; survives transport faults according to its policy."""

    # What the compiled send reads and writes lives in slots (the rest in __dict__): the
    # core finds it at fixed offsets, with no lookup (see compiled_send below).
    # So is what the compiled read round reads and writes (compiled_read, below the class).
    __slots__ = (
        "_closed",
        "_lock",
        "_machine",
        "_stream",
        "_sendq",
        "messenger",
        "_timer",
        "_queued",
        "_in_round",
        "_leased",
        "_paused",
        "loop",
        "_lease_off",
        "__dict__",
        "__weakref__",
    )

    def __init__(self, messenger: Messenger, loop: IOLoop, policy: Policy, address: str = "") -> None:
        self.messenger, self.loop, self.policy, self.address = messenger, loop, policy, address
        self.peer_name = ""
        self.session: Session | None = Session(lossless=not policy.lossy) if not policy.server else None
        self._machine: SessionConnection | None = None
        self._stream: Stream | None = None
        self._sendq = Writer()  # the core's send queue (docs/design.md, "Send path")
        self._timer: Timer | None = None
        self._closed = False
        self._backoff = Backoff()
        self._ready = threading.Event()
        # Held by every loop-side entry point, and by send() from any thread, which
        # writes to the socket itself (run to completion: no hop to the loop thread).
        # Reentrant, as threading.RLock; the compiled send takes it without a Python call.
        self._lock = Lock()
        self._adopted_by: Connection | None = None  # server: the session's connection took our transport
        self._leased = False  # a thread in call() is reading the socket instead of the loop
        self._lease_off = False  # an ipc stream leased and then taken off its loop (see _on_readable)
        self.last_error: BaseException | None = None  # why the last transport ended, if it failed
        self._paused = False  # a throttle is full: the socket is off the loop until it frees
        self._waiting = False  # our attempt lost a race: the peer connects to us
        self._retry: Timer | None = None  # the next connection attempt
        self.expect = ""  # a peer's name, known before we reach it
        self._queued = [0, 0]  # messages and bytes this read round queued for dispatch
        self._in_round = False

    # ------------------------------------------------------------ any thread
    def send(self, msg: Message) -> None:
        """Send a message (scatter-gather: the data buffers are not joined or copied).

        The calling thread writes to the socket itself when it is idle; a send that
        follows another closely is batched with it (a flusher thread writes the batch, see
        docs/design.md, "Send path"); a message sent while the session is (re)connecting
        waits in the session's queue, in order.

        The class's send is the core's (compiled_send, below the class): it does the
        steady state (a READY connection with nothing queued ahead) in C, exactly as
        this does, and calls this, as _send_python, for everything else."""
        if self._closed:
            raise ClosedError(f"connection to {self.peer_name or self.address} is closed")
        lock = self._lock
        lock.acquire()  # (not `with`: half the cost, and this runs once a message)
        try:
            m = self._machine
            if m is not None and m.state is _READY and self._stream is not None:
                w = self._sendq
                stalled = w.stalled
                m.write_message(msg, w)  # encoded by the core, written now or batched
                if w.stalled and not stalled:
                    self._write_stalled()
                return
            rec = out_message(msg)
            if self.session is None:
                raise ClosedError("no session with the peer yet")
            self.session.queue(rec)
        finally:
            lock.release()

    _send_python = send  # the compiled send's fallback: any state but the steady one

    def revoke(self, msg: Message) -> bool:
        """Take back a message sent on this connection (as Ceph's ceph_msg_revoke does
        for a request it cancels): once this returns, copyless holds none of its buffers,
        so the caller may reuse or free them, and it is never sent again.

        True: the peer will not deliver it.  It was still queued, or it was being
        written: the rest of its frame goes as filler (zeros, no copy) marked aborted,
        and the receiver discards it (its seq counts, so a lossless stream has no
        gap).  The front, if not yet written, is copied once so its checksum holds.
        False: it was written whole already (the peer may deliver it; a lossless
        session will not replay it), or it was never sent here."""
        with self._lock:
            gone = self.session.revoke(msg) if self.session is not None else None
            if gone:
                return True  # never written: no seq spent on it
            return self._sendq.revoke(msg)

    def _write_stalled(self) -> None:
        """(Under the lock.) A stream (TLS, ipc) took less than all of a send: the loop
        goes on with the rest when it can take more."""
        if self.loop.in_loop():
            self._pump()
        else:
            self.loop.call_soon_threadsafe(self._locked, self._pump)

    def call(self, msg: Message, into: Any = None, timeout: float | None = None) -> Message:
        """Send a request and wait for its reply; the reply's data is read straight into `into`.

        The class's call is the core's (compiled_call, below the class): it runs a call
        whose caller reads its own reply from an ipc:// stream or a plain socket in C,
        exactly as this does, and calls this, as _call_python, for everything else."""
        pending = self._post_call(msg, into)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            leased = self._lease()
            try:
                self.send(msg)
                if leased is not None:
                    self._read_until(leased, pending, deadline)
            finally:
                if leased is not None:
                    self._unlease(leased)  # before waiting: the loop reads a new transport
            return self._await_call(pending, msg.tid, timeout, deadline)
        finally:
            self.messenger._calls.pop(msg.tid, None)

    _call_python = call  # the compiled call's fallback

    def _await_call(self, pending: _Call, tid: int, timeout: float | None, deadline: float | None) -> Message:
        """The reply, once the call is finished (by the loop, if the caller did not read it)."""
        if not pending.done:  # (most calls read their own reply: no wait)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not pending.wait(left):
                raise Timeout(f"no reply to tid {tid} within {timeout} s")
        return pending.result()

    def _post_call(self, msg: Message, into: Any) -> _Call:
        """Give msg a transaction id and post the call (and its buffer) for the reply."""
        if msg.tid == 0:
            msg.tid = next(self.messenger._tids)
        pending = _Call(self, memoryview(into).cast("B") if into is not None else None)
        self.messenger._calls[msg.tid] = pending
        return pending

    # A caller waiting for a reply reads the socket itself (a lease from the loop):
    # waking the loop thread and then the caller costs two wake-ups and a GIL
    # hand-over per call; polling the socket on the caller's thread costs one wake-up,
    # as a plain blocking socket does.  One caller leases a connection at a time (the
    # others wait for it to deliver their replies); what it reads is handled exactly
    # as on the loop, under the connection's lock, in order.
    # An ipc stream stays on its loop meanwhile (IpcStream.take: the loop skips it, and
    # the peer rings no doorbell while the caller spins), so a call costs no epoll_ctl
    # and never wakes the loop; a socket is taken off the loop (epoll would wake it).
    def _lease(self) -> Stream | None:
        if self.loop.in_loop():
            return None
        with self._lock:
            st, m = self._stream, self._machine
            if st is None or m is None or m.state is not State.READY or self._leased or self._paused:
                return None  # the loop reads and wakes us
            self._leased = True
            if st.write_wakes_read:
                st.take()  # type: ignore[attr-defined]
            else:
                self.loop.detach(st)  # before the request goes: the loop never sees the reply
            return st

    def _unlease(self, st: Stream) -> None:
        with self._lock:
            self._leased = False
            off, self._lease_off = self._lease_off, False
            ipc = st.write_wakes_read
            came = ipc and st.give_back(off)  # type: ignore[attr-defined]  # (armed for a loop that may sleep)
            if self._stream is not st:
                return
            if ipc and not off:  # it stayed on the loop
                if self._paused:
                    self.loop.detach(st)  # a throttle filled while we read: off until it frees
                elif came:
                    self.loop.call_soon_threadsafe(self._on_readable)  # something came meanwhile
            elif not self._paused:
                self.loop.attach(st)  # (ipc: arms it, and wakes the loop if something came)

    def _read_until(self, st: Stream, pending: _Call, deadline: float | None) -> None:
        poller, interest = None, 0
        # a plain socket: large segments are read whole (recv_fill); and if the reply is
        # to land in a large buffer, a read between frames takes only FILL_HEAD bytes, so
        # its data goes straight there instead of through the prefetch buffer
        fill = 0
        if type(st) is Stream:
            into = pending.into
            fill = FILL_HEAD if into is not None and len(into) >= FILL_MIN else 1 << 30
        turn = 0
        while not pending.done:
            # (a stream that always has something to do must not keep us past the deadline)
            if turn and deadline is not None and time.monotonic() >= deadline:
                return
            turn += 1
            if not st.before_wait():  # TLS: decrypted bytes; ipc: spins, then arms
                # (ipc: room to write shows as readable too)
                want = select.POLLIN | (select.POLLOUT if self._sendq.pending and not st.write_wakes_read else 0)
                if want != interest:
                    with self._lock:  # a teardown on the loop thread may have closed it
                        if self._stream is not st:
                            return
                        if poller is None:
                            poller = select.poll()
                        (poller.modify if interest else poller.register)(st.fileno(), want)
                    interest = want
                if deadline is None:
                    wait = -1
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    wait = int(left * 1000) + 1
                assert poller is not None
                if not poller.poll(wait):
                    continue
            with self._lock:
                if self._stream is not st:
                    return  # the transport changed: the loop owns the new one
                if not read_round(self, fill):  # (the steady state, compiled)
                    self.__on_readable_locked(fill)
                if st.write_wakes_read and self._sendq.pending and self._stream is st:
                    # the loop leaves a leased ipc stream alone: its writer's part too, the
                    # rest of a send the ring had no room for (a request longer than the
                    # ring); room shows as readable, and our read drains the loop's bell
                    self._pump()
                if self._paused:
                    return  # a throttle is full: the loop resumes reading when it frees

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._ready.wait(timeout):
            raise Timeout(f"session with {self.address} not established in time")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._retry is not None:
                self._retry.cancel()
            self.loop.call_soon_threadsafe(self._teardown, None)

    # ------------------------------------------------------------ loop thread
    def _locked(self, fn: Any, *args: Any) -> None:
        with self._lock:
            fn(*args)

    def _start_connect(self) -> None:
        self._retry = None
        if self._closed or self._stream is not None:
            return  # closed, or an attempt (or the peer's connection that won) is already here
        try:
            tls = self.messenger._tls_client if self.address.startswith("tcp://") else None
            stream = connect(self.address, tls=tls)
        except OSError as e:  # refused at once (unix://, ipc://: nobody listens there)
            self.last_error = e
            self.messenger._each(lambda d: d.handle_refused(self))
            self._schedule_reconnect()
            return
        self._stream = stream
        self.loop.set_writer(stream, lambda: self._on_connected(stream))

    def _on_connected(self, stream: Stream) -> None:
        with self._lock:
            if self._stream is stream:  # else the peer's connection won meanwhile and took its place
                self.__on_connected_locked(stream)

    def __on_connected_locked(self, stream: Stream) -> None:
        self.loop.set_writer(stream, None)
        error: OSError | None = None
        try:
            ok = stream.connected()
        except OSError as e:
            ok, error = False, e
        if not ok:
            self.last_error = error or ConnectionRefusedError(f"{self.address}: not connected")
            self.loop.remove(stream)
            stream.close()
            self._stream = None
            self.messenger._each(lambda d: d.handle_refused(self))
            self._schedule_reconnect()
            return
        assert self.session is not None
        machine = functools.partial(
            self.messenger._machine, self, stream, Role.CLIENT, session=self.session, expect=self.expect or None
        )
        self._after_tls(stream, lambda: self._attach(stream, machine()))

    def _after_tls(self, stream: Stream, then: Callable[[], None]) -> None:
        """Run `then` once the stream's TLS handshake is done (at once for a plain stream).
        A failed handshake (bad certificate, not TLS) is a fault of this transport."""
        if self._stream is not stream:
            return  # a step left over from a transport that another one replaced
        try:
            done = stream.handshake()
        except (OSError, CopylessError) as e:  # ssl.SSLError included; ipc: a refused setup
            self._teardown_locked(e)
            return
        self.loop.remove(stream)
        if done:
            then()
            return
        step = lambda: self._locked(self._after_tls, stream, then)  # noqa: E731
        if getattr(stream, "want_write", False):
            self.loop.set_writer(stream, step)
        else:
            self.loop.add_reader(stream, step)

    def _attach(self, stream: Stream, machine: SessionConnection) -> None:
        self._stream, self._machine = stream, machine
        self._paused = False  # a new reader: fresh budgets
        self._sendq.clear()
        # a plain socket is written by the core (its fd, batching with this loop's flusher);
        # TLS and ipc streams through their own send_buffers
        self._sendq.bind(stream, stream.fileno() if type(stream) is Stream else -1, self.loop.flusher)
        self.loop.add_reader(stream, self._on_readable)
        self._pump()

    def _on_readable(self) -> None:
        """The loop's read round (the class's is the core's: compiled_read, below the
        class; it runs the steady state in C, and this for everything else)."""
        with self._lock:
            if not self._leased:
                self.__on_readable_locked()
                return
            # A caller reads it.  An ipc stream stays on the loop while leased; it turns
            # readable only if the caller armed it and went to sleep: take it off the loop
            # until the lease ends, or the loop would wake on that byte until it is read.
            st = self._stream
            if st is not None and st.write_wakes_read and not self._lease_off:
                self._lease_off = True
                self.loop.detach(st)

    def __on_readable_locked(self, fill: int = 0) -> None:
        # A round of reads.  This runs once per message in a call (on both sides), so the
        # steady state is kept to a few calls: throttles only when one has a limit, and
        # the pump only when the machine has more than messages for us.
        # fill: a caller reads a plain socket (a lease): a segment that goes straight
        # into its buffer is read whole in one C call (recv_fill), not a round and a
        # poll() per piece the transport delivers (TCP: 64 KiB); so is the rest of one
        # under FILL_MIN (a 64 KiB reply's, after the head read took 4 KiB of it: it
        # went on in `fill`-sized pieces, 16 rounds).  Only a caller may wait there: on
        # the loop, other connections would wait too.  Other reads take at most `fill`
        # bytes.
        m, st = self._machine, self._stream
        if m is None or st is None:
            return
        messenger, reader = self.messenger, m.reader
        limited = messenger._limited
        if limited:
            grant = messenger._grant(reader)
            before = reader.open_charge
            self._queued = [0, 0]
        else:
            reader.sink_claims = messenger._claims
        self._in_round = True
        try:
            if limited and reader.paused:
                m.resume_reading()  # a held frame, if the grant has room for it now
            now = time.monotonic()
            for _ in range(64):  # bounded: other connections on this loop get their turn
                buf = reader.next_read() if m.state is not _CLOSED else None  # (m.next_read(), inline)
                if not buf:
                    break  # held by a throttle, or closed
                try:
                    if not fill:
                        k = st.recv_into(buf)
                    elif reader.in_target:
                        k = recv_fill(st.fileno(), buf, FILL_WAIT)
                    else:
                        if len(buf) > fill:
                            buf = buf[:fill]
                        k = st.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    k = 0
                except RemoteProtocolError as e:  # a transport that checks its peer (ipc: a bad ring index)
                    self._teardown_locked(e)
                    return
                if k == 0:
                    m.connection_lost()
                    break
                msgs = m.received(k, now)
                if msgs:  # delivered read by read: fewer of them alive at once (see _deliver)
                    try:
                        messenger._deliver(self, msgs)
                    finally:
                        _track_kept(msgs)
                    del msgs
                    if self._machine is not m:
                        break
                if (k < len(buf) and not (st.buffered and st.pending())) or m.state is _CLOSED:
                    break  # a short read: the socket is drained (saves the EAGAIN round)
            due = m.settle_reads()
            if due < 0:
                self._pump()
            elif due and (self._timer is None or due < self._timer.when):
                self._arm_timer(due)
        finally:
            self._in_round = False
            if limited:
                # what the round did not queue goes back, except a frame still being read
                left = reader.open_charge if m.state is not State.CLOSED else (0, 0)
                q = self._queued
                messenger._settle(grant, q[0] + left[0] - before[0], q[1] + left[1] - before[1])
        if limited and self._machine is m and self._stream is st and reader.paused and not self._paused:
            self._pause(st)

    def _pause(self, st: Stream) -> None:
        """A throttle is full: the stream is read no more until one frees."""
        self._paused = True
        if not self._leased:
            self.loop.detach(st)
        self.messenger._when_free(lambda: self.loop.call_soon_threadsafe(self._locked, self._resume, st))

    def _resume(self, st: Stream) -> None:
        """A throttle has room again (the first of them to free calls this)."""
        if not self._paused or self._stream is not st:
            return
        self._paused = False
        if not self._leased:
            self.loop.attach(st)
        self.__on_readable_locked()

    def _on_writable(self) -> None:
        with self._lock:
            self.__on_writable_locked()

    def __on_writable_locked(self) -> None:
        self._pump()

    def _pump(self) -> None:
        m, st = self._machine, self._stream
        if m is None or st is None:
            return
        m.tick(time.monotonic())
        events = m.next_events()
        i = 0
        while i < len(events) and self._machine is m:
            self._on_event(events[i])
            i += 1
        if self._machine is not m:
            owner = self._adopted_by
            if owner is not None:
                with owner._lock:
                    if owner._machine is m:  # the rest belongs to the adopting connection
                        for ev in events[i:]:
                            owner._on_event(ev)
                        owner._pump()
            return
        self._sendq.add(m.data_to_send())
        try:
            done = self._sendq.flush(st)
        except OSError:
            m.connection_lost()
            done = True
            for ev in m.next_events():
                self._on_event(ev)
        if self._machine is not m:
            return
        self.loop.set_writer(st, None if done else self._on_writable)
        deadline = m.next_deadline()
        if deadline is not None:
            self._arm_timer(deadline)

    def _arm_timer(self, deadline: float) -> None:
        """Make sure the timer fires by `deadline`."""
        t = self._timer
        if t is None or deadline < t.when:
            # Armed only when the deadline comes earlier: a timer that fires early
            # just pumps and re-arms, which is cheaper than re-arming on every message.
            if t is not None:
                t.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        if not self._lock.acquire(blocking=False):
            # A caller holds the connection (it reads its reply, and settles acks as it
            # goes).  Waiting for the lock here woke this thread at every release of it,
            # to lose it again to the caller's next step: a futex and a GIL hand-over per
            # step of every call while a timer was due.  Look again shortly instead.
            self.loop.call_at(time.monotonic() + TIMER_RETRY, self._on_timer)
            return
        try:
            if self._timer is not None and self._timer.when <= time.monotonic():
                self._timer = None
                self._pump()
        finally:
            self._lock.release()

    def _on_event(self, ev: object) -> None:
        if type(ev) is MessagesReceived:
            try:
                self.messenger._deliver(self, ev.messages)
            finally:
                _track_kept(ev.messages)
        elif isinstance(ev, Established):
            self.peer_name = ev.peer_name
            self._backoff.reset()
            if self.session is None and self._machine is not None:
                self.session = self._machine.session
            self._ready.set()
            if self.policy.server:
                self.messenger._adopt(self, ev.new)
            elif ev.new:
                self.messenger._each(lambda d: d.handle_connect(self))
        elif isinstance(ev, SessionReset):
            self.messenger._each(lambda d: d.handle_remote_reset(self))
        elif isinstance(ev, MessageRefused):
            self._refused(ev.message, ev.error)
        elif isinstance(ev, ReplyAborted):
            self._fail_call(ev.tid, ReplyRevoked(f"{self.peer_name} revoked its reply to transaction {ev.tid}"))
        elif isinstance(ev, Waiting):
            self._waiting = True
        elif isinstance(ev, Closed):
            self._teardown(ev.error, ev.goodbye)

    def _refused(self, msg: OutMessage, error: BaseException) -> None:
        """A message queued before the peer's limit was known is over it: it never goes.
        A call waiting for its reply fails with the error; the dispatchers hear of it
        through handle_fault, and the connection carries on."""
        self.last_error = error
        if not msg.is_reply:
            self._fail_call(msg.tid, error)
        self.messenger._each(lambda d: d.handle_fault(self, error))

    def _fail_call(self, tid: int, error: BaseException) -> None:
        """A call made on this connection that waits for transaction tid fails with error."""
        pending = self.messenger._calls.get(tid)
        if pending is not None and pending.waits_on(self):
            pending.finish(error=error)

    def _teardown(self, error: BaseException | None, goodbye: bool = False) -> None:
        """The transport is gone; reconnect if the policy says so (goodbye: the client
        ended its session: nothing to keep)."""
        with self._lock:
            self._teardown_locked(error, goodbye)

    def _release_open_charge(self) -> None:
        """The machine goes with a frame charged to the throttles and never finished
        (a timeout closed it, or another transport took its place): give it back."""
        if self._machine is not None and not self._in_round:
            n, b = self._machine.reader.open_charge
            self._machine.reader.open_charge = (0, 0)
            self.messenger._settle((n, [b] * len(self.messenger._limit_bytes)), 0, 0)

    def _teardown_locked(self, error: BaseException | None, goodbye: bool = False) -> None:
        self._release_open_charge()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream is not None:
            if self._machine is not None:  # best effort: the frame that tells the peer why (AUTH_BAD)
                if self._closed:
                    self._machine.goodbye()  # a client that closed: its server forgets the session now
                self._sendq.add(self._machine.data_to_send())
                try:
                    self._sendq.flush(self._stream)
                except OSError:
                    pass
            self.loop.remove(self._stream)
            self._stream.close()
            self._stream = None
        if self._machine is not None and self._machine.state is not State.CLOSED:
            self._machine.connection_lost()
        self._machine = None
        self._sendq.clear()
        self._ready.clear()
        if error is not None:
            self.last_error = error
            self.messenger._each(lambda d: d.handle_fault(self, error))
        if self.policy.server and self.session is None and not self._closed:
            self._closed = True  # it never got as far as a session: nothing to keep
            self.messenger._forget(self)
            return
        if goodbye and not self._closed:
            self._closed = True  # the client ended the session: nothing to keep, no linger
            self.messenger._each(lambda d: d.handle_reset(self))
        if self.policy.server and not self.policy.lossy and not self._closed:
            # standby: a stateful server keeps the session for the client to reconnect to
            # (_adopt moves its new transport in and cancels this), for so long
            linger = self.messenger._session_linger
            if linger is not None and self._retry is None:
                self._retry = self.loop.call_later(linger, lambda: self._locked(self._expire))
            return
        if isinstance(error, WrongPeer) and not self._closed:
            self._closed = True  # not a fault that passes: that address is someone else's
            self.messenger._each(lambda d: d.handle_reset(self))
        if self.policy.peer and not self._closed:
            waited, self._waiting = self._waiting, False
            if self.address:  # we know where it listens: we reconnect too (a race is resolved)
                self._schedule_reconnect(PEER_WAIT if waited else None)
            return  # else standby: the peer reconnects to us
        if self._closed or not self.policy.reconnect:
            if not self._closed:
                self._closed = True
                self.messenger._each(lambda d: d.handle_reset(self))
            lost = PeerLost(f"connection to {self.peer_name or self.address} lost")
            lost.__cause__ = error
            self.messenger._fail_calls(self, lost)
            self.messenger._forget(self)
            return
        if self.policy.lossy and self.session is not None:
            self.session.reset()
        self._schedule_reconnect()

    def _expire(self) -> None:
        """A stateful server's session whose client did not come back within the linger:
        it ends as a lossy one does (the dispatcher hears handle_reset)."""
        self._retry = None
        if self._stream is not None or self._closed:
            return  # it came back (and _adopt missed this timer), or it was closed meanwhile
        self._closed = True
        self.messenger._each(lambda d: d.handle_reset(self))
        self.messenger._fail_calls(self, PeerLost(f"{self.peer_name} did not come back within the session linger"))
        self.messenger._forget(self)

    def _schedule_reconnect(self, delay: float | None = None) -> None:
        if self._closed:
            return
        if delay is None:
            delay = self._backoff.next_delay()
        if self._retry is not None:
            self._retry.cancel()
        self._retry = self.loop.call_later(delay, lambda: self._locked(self._start_connect))


# Connection.send, compiled: the steady state of _send_python (a READY connection with
# nothing queued ahead: seq, piggy-backed ack, encode, the record kept for replay, write
# or batch) in one C call under the connection's lock, reading and writing the same
# slots of Connection, SessionConnection and Session; anything else calls _send_python.
# docs/design.md, "Send path".
Connection.send = compiled_send(Connection, SessionConnection, Session, State.READY)  # type: ignore[method-assign]

# Connection._on_readable, compiled: the steady state of the read round (a READY
# connection whose reader is between frames, over a plain socket or an ipc:// ring:
# read, parse, sequence, acknowledge, hand out) in one C call under the connection's
# lock, reading and writing the slots of Connection, SessionConnection, Session and
# FrameReader; anything else calls _on_readable_python.  A caller that reads its own
# reply runs read_round(conn, fill) itself.  docs/design.md, "The read round, compiled".
Connection._on_readable_python = Connection._on_readable  # type: ignore[attr-defined]
Connection._on_readable = compiled_read(  # type: ignore[method-assign]
    Connection,
    SessionConnection,
    Session,
    FrameReader,
    _Call,
    State.READY,
    State.CLOSED,
    RemoteProtocolError,
    _track_kept,
)

# Connection.call, compiled: a caller that reads its own reply from an ipc:// stream or
# a plain socket (post the call, lease the stream, send, read rounds, give it back) in
# one C call, on the same slots; anything else (TLS, the loop's own thread, a leased or
# paused connection) calls _call_python.  docs/design.md, "The
# call, compiled".
Connection.call = compiled_call(Connection, Stream, FILL_HEAD, FILL_MIN)  # type: ignore[method-assign]


class Messenger:
    """An endpoint named "type.id"; the type before the dot picks the policy for a peer."""

    # What every read round and call reads: slots, which the core reads at their
    # offsets (compiled_messenger, below the class); the rest in the instance's dict.
    __slots__ = (
        "_calls",
        "_fast",
        "_claims",
        "_limited",
        "_limit_frames",
        "_limit_bytes",
        "_tids",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        name: str,
        *,
        policies: dict[str, Policy] | None = None,
        default_policy: Policy | None = None,
        io_loops: int = 2,
        secret: bytes | None = None,
        data_crc: bool | None = None,
        handshake_timeout: float = 10.0,
        idle_timeout: float | None = 30.0,
        keepalive_interval: float | None = 5.0,
        session_linger: float | None = 300.0,
        throttle_messages: int | None = None,
        throttle_bytes: int | None = None,
        dispatch_throttle_bytes: int | None = 100 << 20,
        max_segment: int = 64 << 20,
        features_required: int = 0,
        tls_server: ssl.SSLContext | None = None,
        tls_client: ssl.SSLContext | None = None,
    ) -> None:
        if io_loops < 1:
            raise ConfigurationError("io_loops must be >= 1")
        if features_required & ~FEATURES_SUPPORTED:
            # (we must support what we require: it is in our banner's supported mask too)
            raise ConfigurationError(
                f"features_required {features_required:#x}: copyless knows only {FEATURES_SUPPORTED:#x}"
            )
        # the feature bits (FEATURE_*) a peer's banner must say it supports: a peer
        # without them is refused in the handshake, with FeatureMismatch at both ends
        self._features_required = features_required
        # the largest segment (front, or all the data of a message) accepted from a peer:
        # a longer one is refused from its preamble, before any of it is read
        self._max_segment = checked_max_segment(max_segment)
        self.name = name
        self.policies = dict(policies or {})
        self.default_policy = default_policy or Policy.lossless_client()
        self._secret, self._data_crc = secret, data_crc
        self._tls_server, self._tls_client = tls_server, tls_client  # for tcp:// (ssl module)
        self._timeouts = (handshake_timeout, idle_timeout, keepalive_interval)
        # How long a stateful server keeps a client's session once its connection ended,
        # for the client to reconnect and resume it (None: until shutdown).  Without a
        # limit, every client that went away for good left its session (and what was
        # queued for it) behind.
        self._session_linger = session_linger
        # (before the loops: a bad limit raises, and must leave no thread behind)
        throttles = (Throttle(throttle_messages), Throttle(throttle_bytes), Throttle(dispatch_throttle_bytes))
        self._loops = [IOLoop(f"copyless-io-{name}-{i}") for i in range(io_loops)]
        self._dispatchers: list[Dispatcher] = []
        self._fast: list[tuple[Callable[[Message], bool], Callable[[Message], None]]] = []
        self._registry = SessionRegistry(name, self._make_peer)
        self._named: dict[str, Policy] = {}  # policies given to connect() for one peer name
        self._incarnation = time.time_ns()  # a restarted peer of ours comes back with a later one
        self._listeners: list[Listener] = []
        self._connections: set[Connection] = set()
        self._by_session: dict[int, Connection] = {}
        self._calls: dict[int, _Call] = {}
        self._claims: tuple[dict[int, Any], bool] = (self._calls, False)
        self._tids = itertools.count(1)
        # queued dispatch: most urgent first (higher priority), then arrival order
        self._queue: queue.PriorityQueue[tuple[float, int, Message | None]] = queue.PriorityQueue()
        self._arrival = itertools.count()
        # received messages, their bytes, and the bytes waiting for dispatch (Ceph's
        # policy throttlers and dispatch throttler), taken before a body is read
        self._throttles = throttles
        # what a read round reserves from: the messages throttle (for frames) if it has a
        # limit, and those of the others that have one (for body bytes); none: it skips them
        msgs, nbytes, queued = self._throttles
        self._limit_frames = msgs if msgs.limit is not None else None
        self._limit_bytes = [t for t in (nbytes, queued) if t.limit is not None]
        self._limited = self._limit_frames is not None or bool(self._limit_bytes)
        self._dispatch_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # One lock for all the connections a server accepts.  A reconnect's handshake runs on
        # the new transport's Connection but changes the session that another Connection holds
        # and application threads send on; with a lock each, a message sent meanwhile was lost.
        self._accepted_lock = Lock()
        self._shut = False

    # ------------------------------------------------------------ setup
    def add_dispatcher(self, d: Dispatcher) -> None:
        self._dispatchers.append(d)
        self._fast = [(x.can_fast_dispatch, x.fast_dispatch) for x in self._dispatchers]  # for _deliver
        # who may want an incoming message's data in a buffer of its own (see _sink): the
        # calls that posted one, and dispatchers that choose one (data_buffer)
        hooks = any(getattr(x.data_buffer, "__func__", None) is not Dispatcher.data_buffer for x in self._dispatchers)
        self._claims = (self._calls, hooks)

    def bind(self, address: str) -> str:
        """Listen on an address (tcp://host:port, unix:///path, ipc://name); returns the bound address."""
        lst = listen(address, tls=self._tls_server if address.startswith("tcp://") else None)
        self._listeners.append(lst)
        loop = self._loops[0]  # accepts here; each connection goes to the least-loaded loop
        loop.call_soon_threadsafe(loop.add_reader, lst, lambda: self._on_accept(lst))
        return lst.address

    def start(self) -> None:
        if self._dispatch_thread is None:
            self._dispatch_thread = threading.Thread(target=self._dispatch_loop, name=f"copyless-dispatch-{self.name}")
            self._dispatch_thread.daemon = True
            self._dispatch_thread.start()

    def connect(self, address: str, policy: Policy | None = None, *, name: str | None = None) -> Connection:
        """A connection to the Messenger at `address`.  `name` is the peer's ("type.id"):
        its type picks the policy (unless `policy` is given), the handshake checks it,
        and for a peer policy it is required: there is one Connection per peer name, so
        connecting to a peer that already has one (it connected to us) returns that."""
        self.start()
        if policy is None:
            policy = self._policy_for(name) if name else self.default_policy
        elif name:
            self._named[name] = policy  # connections it makes to us are that peer's too
        if not policy.peer:
            return self._new_connection(address, policy, name)
        if not name:
            raise ConfigurationError("a peer policy needs the peer's name: connect(address, name=...)")
        with self._accepted_lock:  # the connections we accept reach peer sessions under it too
            session = self._registry.by_peer.get(name)
            existing = self._by_session.get(id(session)) if session is not None else None
            if existing is not None and not existing._closed:
                # where it listens: new if it connected to us, or if it moved
                existing.address, existing.expect = address, name
                if existing._machine is None and existing._stream is None:
                    existing._schedule_reconnect(0.0)
                return existing
            if session is None or existing is not None:  # (else a connection we accepted is using it)
                session = self._registry.by_peer[name] = Session(peer=True, resetcheck=policy.resetcheck)
            return self._new_connection(address, policy, name, session)

    def _new_connection(
        self, address: str, policy: Policy, name: str | None, session: Session | None = None
    ) -> Connection:
        loop = self._take_loop()
        conn = Connection(self, loop, policy, address)
        conn.expect = name or ""
        if session is not None:
            conn.session = session
            conn._lock = self._accepted_lock
            self._by_session[id(session)] = conn
        with self._lock:
            self._connections.add(conn)
        loop.call_soon_threadsafe(conn._locked, conn._start_connect)
        return conn

    def shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            c.close()
        for lst in self._listeners:
            self._loops[0].call_soon_threadsafe(self._loops[0].remove, lst)
        for loop in self._loops:
            loop.stop()
        for lst in self._listeners:
            lst.close()
        self._queue.put((float("inf"), next(self._arrival), None))
        if self._dispatch_thread is not None:
            self._dispatch_thread.join(10)

    def __enter__(self) -> Messenger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------ internals
    def _machine(self, conn: Connection, stream: Stream, role: Role, **kw: Any) -> SessionConnection:
        hs, idle, ka = self._timeouts
        # The data crc by default where the transport does not keep the bytes intact
        # itself: TCP to another host (transports.on_this_host; docs/design.md, "Where
        # the data crc is on").
        data_crc = not stream.integrity if self._data_crc is None else self._data_crc

        def sink(pre: Preamble, index: int, earlier: Sequence[memoryview]) -> memoryview | None:
            return self._sink(conn._adopted_by or conn, pre, index, earlier)

        machine = SessionConnection(
            role,
            self.name,
            incarnation=self._incarnation,
            messages=True,  # received: copyless.Message objects, a run per event, parsed in C
            secret=self._secret,
            data_crc=data_crc,
            sink=sink,
            now=time.monotonic(),
            handshake_timeout=hs,
            idle_timeout=idle,
            keepalive_interval=ka,
            max_segment=self._max_segment,
            features_required=self._features_required,
            **kw,
        )
        machine.owner = conn  # the connection of what it receives (_deliver corrects it after an _adopt)
        return machine

    def _policy_for(self, peer_name: str) -> Policy:
        named = self._named.get(peer_name)
        return named or self.policies.get(peer_name.split(".", 1)[0], self.default_policy)

    def _make_peer(self, name: str) -> Session | None:
        """The registry met a name it has no session for: a new one if it is a peer's."""
        policy = self._policy_for(name)
        return Session(resetcheck=policy.resetcheck) if policy.peer else None

    def _on_accept(self, lst: Listener) -> None:
        while (stream := lst.accept()) is not None:
            loop = self._take_loop()
            conn = Connection(self, loop, Policy.stateful_server(), stream.peer)
            conn._lock = self._accepted_lock
            with self._lock:  # before its first step, which may already end it (and _forget it)
                self._connections.add(conn)
            with conn._lock:
                conn._stream = stream
                conn._after_tls(stream, functools.partial(self._attach_server, conn, stream))

    def _attach_server(self, conn: Connection, stream: Stream) -> None:
        conn._attach(stream, self._machine(conn, stream, Role.SERVER, registry=self._registry))

    def _adopt(self, conn: Connection, new: bool) -> None:
        """A server transport finished its handshake: bind it to the connection of its
        session.  On a reconnect the existing Connection keeps its identity (and what
        the application holds) and the new transport moves into it."""
        assert conn.session is not None
        key = id(conn.session)
        existing = self._by_session.get(key)
        policy = self._policy_for(conn.peer_name)
        if existing is None or existing is conn or existing._closed:
            # the first connection of this session: it becomes the session's Connection
            if policy.peer:
                conn.policy, conn.address = policy, ""  # where it listens is unknown until we connect()
            else:
                conn.policy = Policy(lossy=policy.lossy, server=True, reconnect=False)
            self._by_session[key] = conn
            self._each(lambda d: d.handle_accept(conn))
            return
        with existing._lock:  # application threads may be sending on it
            for t in (existing._timer, existing._retry):
                if t is not None:
                    t.cancel()
            existing._timer = existing._retry = None
            existing._waiting = False
            existing._release_open_charge()
            if existing._stream is not None:
                existing.loop.remove(existing._stream)
                existing._stream.close()
            existing._stream, existing._machine, existing._sendq = conn._stream, conn._machine, conn._sendq
            existing.peer_name = conn.peer_name
            if existing._machine is not None:
                # what the application sent on `existing` between the handshake and now
                # went to the session's queue: it goes out with the rest
                existing._machine.flush()
            existing._ready.set()
            if conn._timer is not None:
                conn._timer.cancel()
            conn._stream, conn._machine, conn._adopted_by, conn._closed = None, None, existing, True
            existing._paused = False  # a new transport, a new reader: fresh budgets
            if existing._stream is not None:
                conn.loop.remove(existing._stream)  # it may move to the other connection's loop
                existing.loop.add_reader(existing._stream, existing._on_readable)
        self._release_loop(conn)
        if new:  # a peer's connection opened the session (it won a race, or it restarted)
            self._each(lambda d: d.handle_accept(existing))

    def _sink(self, conn: Connection, pre: Preamble, index: int, earlier: Sequence[memoryview]) -> memoryview | None:
        """Direct receive: a large data segment goes straight from the transport into the
        buffer its call posted, or one a dispatcher chose from the verified header
        (small ones are copied into a posted buffer by _deliver)."""
        if pre.tag != Tag.MESSAGE or index != 2 or len(earlier) != 2 or len(earlier[0]) != MSG_HEADER.size:
            return None
        mtype, _p, flags, tid, _s, _a = MSG_HEADER.unpack(earlier[0])
        n = pre.lengths[2]
        pending = self._calls.get(tid) if flags & MSG_FLAG_REPLY else None
        if pending is not None and pending.waits_on(conn):
            if pending.into is not None and len(pending.into) >= n:
                return pending.into[:n]
            return None
        for d in self._dispatchers:
            buf = d.data_buffer(conn, mtype, tid, earlier[1], n)
            if buf is not None:
                view = memoryview(buf).cast("B")
                if view.readonly or len(view) < n:  # the application's bug must not cost the message
                    msg = f"{type(d).__name__}.data_buffer() gave an unusable buffer for {n} bytes"
                    warnings.warn(msg, RuntimeWarning, stacklevel=1)
                    return None
                return view[:n]
        return None

    def _deliver(self, conn: Connection, msgs: list[Message]) -> None:
        """Hand a run of received messages out, in order: a reply to the call waiting for it,
        else to the first dispatcher that fast-dispatches it, else to the dispatch queue.
        The per-message work here is all there is in Python between the core's parse and
        the application, so it is kept to lookups and calls.  Messages the core made are
        not tracked by the cyclic collector until they outlive this (the caller passes
        the list to _core._track_kept after): most are dropped at once, and a run of
        them tracked kept the collector busy (a quarter of a 64 B stream's receiver)."""
        conn._sendq.read = 1  # a send after this answers it: not part of a burst
        if msgs[0].connection is not conn:
            # parsed before an _adopt moved the transport into the session's Connection
            for msg in msgs:
                msg.connection = conn
            if conn._machine is not None:
                conn._machine.owner = conn
        calls, fast = self._calls, self._fast
        for msg in msgs:
            if msg.is_reply and calls and self._reply(msg):
                continue
            for can, go in fast:
                if can(msg):
                    go(msg)
                    break
            else:
                self._enqueue(conn, msg)

    def _enqueue(self, conn: Connection, msg: Message) -> None:
        """A received message for the dispatch queue (charged to the round that read it)."""
        conn._queued[0] += 1
        conn._queued[1] += len(msg.front) + len(msg.data)
        self._queue.put((-msg.priority, next(self._arrival), msg))

    def _reply(self, msg: Message) -> bool:
        """A reply to a call it may answer (_Call.waits_on) finishes it (True); else it is
        dispatched as any message."""
        pending = self._calls.get(msg.tid)
        if pending is None or not pending.waits_on(msg.connection):
            return False
        into, data = pending.into, msg.data
        n = len(data)
        if into is not None and data.obj is not into.obj and n <= len(into):
            into[:n] = data  # a small reply came in the prefetch buffer: one copy
            msg.data = into[:n]
        pending.finish(reply=msg)
        return True

    def _dispatch_loop(self) -> None:
        msgs, nbytes, queued = self._throttles
        while (msg := self._queue.get()[2]) is not None:
            size = len(msg.front) + len(msg.data)  # before dispatch: it may release the message
            for d in self._dispatchers:
                try:
                    d.dispatch(msg)
                except Exception:
                    import traceback

                    traceback.print_exc()
            queued.put(size)
            msgs.put(1)
            nbytes.put(size)

    # ------------------------------------------------------------ throttles
    def _grant(self, reader: FrameReader) -> tuple[int, list[int]]:
        """Reserve what the throttles with a limit have free and make it the reader's budget:
        (frames granted or UNLIMITED, bytes granted by each of _limit_bytes)."""
        need = reader.held_bytes if reader.paused else 0
        reader.sink_claims = self._claims  # (and what the sink may want this round)
        t = self._limit_frames
        frames = UNLIMITED if t is None else t.reserve(1)
        reader.budget_frames = UNLIMITED if t is None else reader.taken_frames + frames
        room = [t.reserve(need) for t in self._limit_bytes]
        reader.budget_bytes = reader.taken_bytes + min(room) if room else UNLIMITED
        return frames, room

    def _settle(self, grant: tuple[int, list[int]], kept_msgs: int, kept_bytes: int) -> None:
        """After a read round: everything granted but not kept goes back."""
        frames, room = grant
        if self._limit_frames is not None:
            self._limit_frames.put(frames - kept_msgs)
        for t, g in zip(self._limit_bytes, room, strict=True):
            t.put(g - kept_bytes)

    def _when_free(self, cb: Callable[[], object]) -> None:
        """cb() once, when the first full throttle frees (a paused reader resumes)."""
        fired = threading.Lock()

        def once() -> None:
            if fired.acquire(blocking=False):
                cb()

        for t in self._throttles:
            if t.limit is not None:
                t.when_free(once)

    def _each(self, fn: Any) -> None:
        for d in self._dispatchers:
            fn(d)

    def _fail_calls(self, conn: Connection, error: BaseException) -> None:
        for pending in list(self._calls.values()):
            if pending.waits_on(conn):
                pending.finish(error=error)

    def _take_loop(self) -> IOLoop:
        """The least-loaded loop, charged with one more connection (connect() runs on
        application threads, accepts and teardowns on the loops: under the lock)."""
        with self._lock:
            loop = min(self._loops, key=lambda lp: lp.load)
            loop.load += 1
            return loop

    def _release_loop(self, conn: Connection) -> None:
        """conn is gone (or moved into another Connection): its loop's charge with it."""
        with self._lock:
            self._connections.discard(conn)
            conn.loop.load = max(0, conn.loop.load - 1)

    def _forget(self, conn: Connection) -> None:
        self._release_loop(conn)
        s = conn.session
        if s is not None and self._by_session.get(id(s)) is conn:
            del self._by_session[id(s)]
            if self._registry.by_peer.get(conn.peer_name or conn.expect) is s:
                del self._registry.by_peer[conn.peer_name or conn.expect]
            if self._registry.by_client.get(s.peer_cookie) is s:
                del self._registry.by_client[s.peer_cookie]  # a client of ours that is gone


compiled_messenger(Messenger, IOLoop)
