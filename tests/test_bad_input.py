"""Bad input to a live Messenger: whatever a peer sends, that connection ends with a
specific error (and a handle_fault event) or a clean close, it leaves nothing
behind, and the messenger's other connections carry on.  Over unix:// (a raw socket)
and ipc:// (garbage written into a real ipc stream's ring; bad setup records and
bad ring indices are in test_ipc.py)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import pytest
from conftest import address_of, served, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copyless.errors import ConfigurationError, MessageTooLarge, PeerLost, RemoteProtocolError
from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy
from copyless.protocol.frames import Frame, FrameReader, FrameTooLarge, Tag, encode_frame
from copyless.protocol.session import (
    BANNER,
    BANNER_MAGIC,
    FEATURE_GOODBYE,
    FEATURES_SUPPORTED,
    HELLO,
    PROTOCOL_VERSION,
    Closed,
    FeatureMismatch,
    MessageReceived,
    MessagesReceived,
    OutMessage,
    Role,
    Session,
    SessionConnection,
    SessionRegistry,
    State,
)
from copyless.transports import Stream, connect

READ, REPLY = 1, 2


class Watch(Dispatcher):
    def __init__(self) -> None:
        self.faults: list[BaseException] = []

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        assert msg.connection is not None
        msg.connection.send(msg.reply(REPLY, front=bytes(msg.front)))

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        self.faults.append(error)


@pytest.fixture(scope="module", params=["unix", "ipc"])
def live(request, tmp_path_factory):
    watch = Watch()
    srv = Messenger("store.1", policies={"client": Policy.stateful_server()}, handshake_timeout=0.5)
    srv.add_dispatcher(watch)
    where = f"unix://{tmp_path_factory.mktemp('bad')}/s.sock" if request.param == "unix" else f"ipc://bad-{os.getpid()}"
    addr = srv.bind(where)
    srv.start()
    client = Messenger("client.7")
    healthy = client.connect(addr)
    healthy.wait_ready(5)
    yield srv, watch, addr, healthy
    client.shutdown()
    srv.shutdown()


@pytest.fixture
def leakcheck():  # the module's messengers live across examples; their own test checks leaks
    yield


def wire(*frames) -> bytes:
    return b"".join(bytes(b) for f in frames for b in f)


BANNER_OK = BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, FEATURES_SUPPORTED, 0)
HELLO_OK = wire(encode_frame(Tag.HELLO, [[HELLO.pack(0, 1 << 20) + b"client.evil"]]))

garbage = st.binary(min_size=1, max_size=400)
after_banner = st.builds(lambda g: BANNER_OK + g, garbage)
after_hello = st.builds(lambda g: BANNER_OK + HELLO_OK + g, garbage)
mutated_hello = st.builds(
    lambda pos, bit: _flip(BANNER_OK + HELLO_OK, len(BANNER_OK) + pos % len(HELLO_OK), bit),
    st.integers(0, 10_000),
    st.integers(0, 7),
)
unexpected = st.sampled_from([t for t in Tag if t not in (Tag.HELLO,)]).map(
    lambda t: BANNER_OK + wire(encode_frame(t, [[b"x" * 40]]))
)


def _flip(b: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(b)
    out[pos] ^= 1 << bit
    return bytes(out)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(garbage, after_banner, after_hello, mutated_hello, unexpected), close=st.booleans())
def test_whatever_a_peer_sends_costs_only_its_connection(live, data, close):
    srv, watch, addr, healthy = live
    before = len(watch.faults)
    if addr.startswith("ipc://"):
        send_over_ipc(addr, data, close)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(addr[len("unix://") :])
        try:
            s.sendall(data)
            if close:
                s.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            while True:  # the server answers (banner, hello) and then hangs up on us
                try:
                    if not s.recv(65536):
                        break
                except (ConnectionResetError, TimeoutError):
                    break
            assert time.monotonic() - t0 < 4, "closed within the handshake timeout"
        finally:
            s.close()
    # (ipc: the server may add the connection to its table only after we hung up, so wait
    # for its fault itself, or it lands in the next example)
    fault_due = not close or addr.startswith("ipc://")
    end = time.monotonic() + 2
    while (len(srv._connections) > 1 or (fault_due and len(watch.faults) == before)) and time.monotonic() < end:
        time.sleep(0.005)
    new = watch.faults[before:]
    # garbage or a timeout; or, when we hung up mid-frame, "went away in the middle of a frame"
    assert all(isinstance(e, (RemoteProtocolError, TimeoutError, PeerLost)) for e in new), new
    assert close or not any(isinstance(e, PeerLost) for e in new)
    if not close:
        assert new, "a connection that is not closed by its peer ends with a specific error"
    assert len(srv._connections) == 1, "nothing kept for a connection that never had a session"
    r = healthy.call(Message(READ, front=b"still here"), timeout=5)
    assert bytes(r.front) == b"still here" and healthy.last_error is None


def send_over_ipc(addr: str, data: bytes, close: bool) -> None:
    """Garbage through a well-behaved ipc stream.  An ipc stream has no half-close: with
    close, the client hangs up at once (as the unix client's SHUT_WR makes the server see
    the end); otherwise it reads until the server hangs up on it."""
    c = connect(addr)
    try:
        while not c.handshake():
            assert select.select([c], [], [], 5)[0]
        assert c.send_buffers([memoryview(data)]) == len(data)
        if close:
            return
        t0, buf = time.monotonic(), memoryview(bytearray(65536))
        while time.monotonic() - t0 < 4:
            if not c.before_wait():
                select.select([c], [], [], 1)
            try:
                if c.recv_into(buf) == 0:
                    break
            except BlockingIOError:
                pass
        assert time.monotonic() - t0 < 4, "closed within the handshake timeout"
    finally:
        c.close()


def test_a_wrong_secret_is_a_specific_error_for_both_ends(tmp_path):
    from copyless.protocol.session import AuthenticationFailed

    faults: dict[str, list[BaseException]] = {"srv": [], "cli": []}

    class Note(Dispatcher):
        def __init__(self, who: str) -> None:
            self.who = who

        def handle_fault(self, conn: Connection, error: BaseException) -> None:
            faults[self.who].append(error)

    srv = Messenger("store.1", secret=b"right")
    srv.add_dispatcher(Note("srv"))
    addr = srv.bind(f"unix://{tmp_path}/s.sock")
    srv.start()
    cli = Messenger("client.7", secret=b"wrong", default_policy=Policy.lossy_client())
    cli.add_dispatcher(Note("cli"))
    try:
        conn = cli.connect(addr)
        end = time.monotonic() + 5
        while not (faults["srv"] and faults["cli"]) and time.monotonic() < end:
            time.sleep(0.01)
        assert isinstance(faults["srv"][0], AuthenticationFailed)
        assert isinstance(faults["cli"][0], AuthenticationFailed)
        assert isinstance(conn.last_error, AuthenticationFailed)
        assert len(srv._connections) == 0
    finally:
        cli.shutdown()
        srv.shutdown()
    assert threading.active_count() >= 1


def test_a_banner_that_requires_a_feature_we_lack_costs_only_its_connection(live):
    srv, watch, addr, healthy = live
    before = len(watch.faults)
    raw = RawClient(addr)
    try:
        raw.send(BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, FEATURES_SUPPORTED | 1 << 40, 1 << 40))
        raw.pump(lambda: False, timeout=4, machine=False)  # our banner, then the hang-up
    finally:
        raw.close()
    wait_for(lambda: len(watch.faults) > before, timeout=2)
    assert [type(e) for e in watch.faults[before:]] == [FeatureMismatch]
    assert "0x10000000000" in str(watch.faults[before])
    r = healthy.call(Message(READ, front=b"still here"), timeout=5)
    assert bytes(r.front) == b"still here" and healthy.last_error is None


def test_a_messenger_refuses_a_peer_without_the_features_it_requires(tmp_path):
    """Messenger(features_required=): the bits go in our banner's required mask, and a
    peer whose banner lacks one is refused in the handshake with FeatureMismatch
    (handle_fault), as a client and as a server; peers that have them connect."""
    watch = Watch()
    lacking = FEATURES_SUPPORTED & ~FEATURE_GOODBYE
    with Messenger("store.1", features_required=FEATURE_GOODBYE) as srv:
        srv.add_dispatcher(watch)
        addr = srv.bind(f"unix://{tmp_path}/s.sock")
        srv.start()
        raw = RawClient(addr)
        try:
            raw.send(BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, lacking, 0))
            raw.pump(lambda: False, timeout=4, machine=False)  # its banner, then the hang-up
        finally:
            raw.close()
        assert wait_for(lambda: watch.faults)
        assert [type(e) for e in watch.faults] == [FeatureMismatch]
        assert "we require features 0x2 the peer lacks" in str(watch.faults[0])
        with Messenger("client.7") as good:  # a copyless peer has them all
            assert bytes(good.connect(addr).call(Message(READ, front=b"ok"), timeout=5).front) == b"ok"

    # as a client: a server whose banner lacks the feature
    client = Watch()
    with (
        socket.socket(socket.AF_UNIX) as lsock,
        Messenger("client.7", features_required=FEATURE_GOODBYE, default_policy=Policy.lossy_client()) as cm,
    ):
        lsock.bind(f"{tmp_path}/fake.sock")
        lsock.listen()
        cm.add_dispatcher(client)
        conn = cm.connect(f"unix://{tmp_path}/fake.sock")
        peer, _ = lsock.accept()
        with peer:
            peer.settimeout(5)
            theirs = b""
            while len(theirs) < BANNER.size:
                theirs += peer.recv(BANNER.size - len(theirs))
            assert BANNER.unpack(theirs)[3] & FEATURE_GOODBYE  # in the client's required mask
            peer.sendall(BANNER.pack(BANNER_MAGIC, PROTOCOL_VERSION, lacking, 0))
            assert wait_for(lambda: client.faults)
        assert [type(e) for e in client.faults] == [FeatureMismatch]
        assert isinstance(conn.last_error, FeatureMismatch)


def test_a_messenger_can_only_require_features_copyless_has():
    with pytest.raises(ConfigurationError, match="features_required"):
        Messenger("client.7", features_required=1 << 40)


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_a_segment_over_max_segment_costs_only_its_connection(transport, tmp_path, name):
    """The limit is the receiver's (Messenger(max_segment=)): a longer segment, from a
    peer that does not keep to the limit the receiver announced, is refused from its
    preamble, before any of it is read; what came before it was delivered, and the
    server's other connections carry on."""
    watch = Watch()
    got: list[bytes] = []
    watch.can_fast_dispatch = lambda msg: msg.type == READ  # type: ignore[method-assign]
    watch.dispatch = lambda msg: got.append(bytes(msg.front))  # type: ignore[method-assign]
    with Messenger("store.1", max_segment=64 << 10) as srv:
        srv.add_dispatcher(watch)
        addr = srv.bind(address_of(transport, tmp_path, name))
        srv.start()
        with Messenger("client.7") as good, Messenger("client.8", default_policy=Policy.lossy_client()) as bad:
            healthy = good.connect(addr)
            conn = bad.connect(addr)
            conn.wait_ready(5)
            assert conn._machine.peer_max_segment == 64 << 10
            conn._machine.peer_max_segment = conn.session.peer_max_segment = 0  # it ignores the limit
            conn.send(Message(3, front=b"first"))
            conn.send(Message(3, front=b"big", data=[bytes(100_000)]))
            wait_for(lambda: watch.faults)
            assert [type(e) for e in watch.faults] == [FrameTooLarge], watch.faults
            assert "65536" in str(watch.faults[0])
            wait_for(lambda: got)  # queued dispatch runs on its own thread, maybe after the fault
            assert got == [b"first"]
            r = healthy.call(Message(READ, front=b"still here"), timeout=5)
            assert bytes(r.front) == b"still here" and healthy.last_error is None
            healthy.send(Message(3, front=b"x" * 60_000))  # under the limit: delivered
            wait_for(lambda: len(got) == 2)
            assert got[1:] == [b"x" * 60_000]


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_a_message_over_the_peers_limit_is_refused_by_its_sender(transport, tmp_path, name):
    """Each side announces its max_segment in HELLO, and a sender keeps to its peer's.
    A message queued before the first handshake (nobody listened yet) and over the
    limit is dropped when the limit is learnt: handle_fault(MessageTooLarge), and a call
    waiting for its reply fails with it; what was queued around it is delivered.  Once
    the limit is known, send() and call() raise MessageTooLarge and send nothing.  The
    connection never faults: a lossless connection would otherwise replay the message
    into the receiver's refusal for ever."""
    address = address_of(transport, tmp_path, name)
    if transport == "tcp":
        with socket.socket() as s:  # a port nobody listens on yet (bound, not listening)
            s.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    server, client = Watch(), Watch()
    got: list[bytes] = []
    server.can_fast_dispatch = lambda msg: msg.type == READ  # type: ignore[method-assign]
    server.dispatch = lambda msg: got.append(bytes(msg.front))  # type: ignore[method-assign]
    big = bytes(100_000)
    with Messenger("client.7") as cm:  # lossless_client
        cm.add_dispatcher(client)
        conn = cm.connect(address)
        conn.send(Message(3, front=b"before"))
        failed: list[BaseException] = []

        def call_big() -> None:
            try:
                conn.call(Message(READ, front=b"big", data=[big]), timeout=10)
            except BaseException as e:  # noqa: BLE001 (what the call raised is the result)
                failed.append(e)

        caller = threading.Thread(target=call_big)
        caller.start()
        wait_for(lambda: len(cm._calls) == 1)
        conn.send(Message(3, front=b"after"))
        with Messenger("store.1", max_segment=64 << 10) as srv:
            srv.add_dispatcher(server)
            srv.bind(address)
            srv.start()
            conn.wait_ready(5)
            caller.join(5)
            assert [type(e) for e in failed] == [MessageTooLarge], failed
            assert "100000-byte data segment" in str(failed[0]) and "65536" in str(failed[0])
            assert client.faults == failed and conn.last_error is failed[0]
            assert not cm._calls
            assert wait_for(lambda: got == [b"before", b"after"]), got

            for send in (conn.send, conn._send_python):  # the compiled send and the Python one
                with pytest.raises(MessageTooLarge, match="100000-byte data"):
                    send(Message(3, front=b"big", data=[big]))
                with pytest.raises(MessageTooLarge, match="70000-byte front"):
                    send(Message(3, front=bytes(70_000)))
            with pytest.raises(MessageTooLarge):
                conn.call(Message(READ, front=b"big", data=[big]), timeout=5)
            assert not cm._calls and not conn.session.unsent
            reply = conn.call(Message(READ, front=b"x", data=[bytes(64 << 10)]), timeout=5)  # at the limit
            assert bytes(reply.front) == b"x"
            conn.send(Message(3, front=b"last"))
            assert wait_for(lambda: got[-1:] == [b"last"]), got
            assert server.faults == [] and len(client.faults) == 1
            assert conn.session.out_seq == 4  # before, after, the call at the limit, last


def test_max_segment_must_leave_room_for_the_handshake():
    with pytest.raises(ConfigurationError):
        Messenger("client.7", max_segment=100)


# ---------------------------------------------------------------- tags outside the Tag enum
# Random bytes never pass the preamble's crc32c, so the fuzzing above never reaches the
# tag check; these frames are well formed (every crc right) and carry a tag that the
# protocol does not have: 0, the first unassigned one, 200, and the largest a u8 holds.
UNKNOWN_TAGS = [0, max(Tag) + 1, 200, 255]


def unknown_frame(tag: int) -> bytes:
    data = wire(encode_frame(tag, [[b"x" * 40]]))
    reader = FrameReader()  # (the test's premise: a reader takes it as a whole, valid frame)
    reader.next_read()[: len(data)] = data
    reader.bytes_read(len(data))
    f = reader.next_frame()
    assert tag not in set(Tag) and isinstance(f, Frame) and f.tag == tag
    return data


def unknown_tag_error(error: BaseException | None, tag: int) -> bool:
    """The specific error: a RemoteProtocolError of the session (not a FrameError: the frame
    passed every check of the reader) that names the tag."""
    return type(error) is RemoteProtocolError and f"tag-{tag}" in str(error)


def fronts(events: list) -> list[bytes]:
    got = []
    for e in events:
        if isinstance(e, MessageReceived):
            got.append(bytes(e.front))
        elif isinstance(e, MessagesReceived):
            got += [bytes(m.front) for m in e.messages]
    return got


@pytest.mark.parametrize("messages", [False, True], ids=["events", "compiled"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
@pytest.mark.parametrize("stage", ["after-banner", "ready"])
@pytest.mark.parametrize("tag", UNKNOWN_TAGS)
def test_an_unknown_tag_with_valid_crcs_closes_the_machine_with_a_specific_error(tag, stage, role, messages):
    """Sans-I/O: the frame reaches the transition table, which has no entry for the tag.
    The machine closes with an error naming it; what came before it is delivered, what
    comes after it is not (a compiled run of MESSAGE frames stops at it too)."""
    c = SessionConnection(Role.CLIENT, "client.1", session=Session(), messages=messages)
    s = SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry(), messages=messages)
    me, peer = (s, c) if role is Role.SERVER else (c, s)
    before = after = b""
    if stage == "after-banner":
        me.receive_data(b"".join(bytes(b) for b in peer.data_to_send()))  # the peer's banner alone
        assert me.state is State.HELLO
    else:
        for _ in range(10):  # the handshake, in whole flights
            for a, b in ((c, s), (s, c)):
                b.receive_data(b"".join(bytes(x) for x in a.data_to_send()))
        assert me.state is State.READY and peer.state is State.READY
        me.next_events()
        for front in (b"one", b"two"):
            peer.send_message(OutMessage(1, [front], []))
        before = b"".join(bytes(x) for x in peer.data_to_send())
        peer.send_message(OutMessage(1, [b"after it"], []))
        after = b"".join(bytes(x) for x in peer.data_to_send())
    me.receive_data(before + unknown_frame(tag) + after)  # in one read, as a socket may give it
    events = me.next_events()
    closed = [e for e in events if isinstance(e, Closed)]
    assert len(closed) == 1 and unknown_tag_error(closed[0].error, tag), closed
    assert me.state is State.CLOSED and events[-1] is closed[0]
    assert fronts(events) == ([b"one", b"two"] if stage == "ready" else [])


class RawClient:
    """A client of our own over a transport stream (unix socket, or an ipc ring): a
    sans-I/O machine drives the handshake and messages, and any bytes can go after."""

    def __init__(self, address: str) -> None:
        self.st = connect(address)
        if type(self.st) is Stream:
            assert select.select([], [self.st], [], 5)[1] and self.st.connected()
        while not self.st.handshake():  # (ipc: the ring setup)
            assert select.select([self.st], [], [], 5)[0]
        self.machine = SessionConnection(Role.CLIENT, "client.evil", session=Session())
        self.events: list = []
        self.eof = False

    def send(self, data: bytes) -> None:
        view, end = memoryview(data), time.monotonic() + 5
        while view:
            assert time.monotonic() < end, "the server does not read"
            n = self.st.send_buffers([view])
            view = view[n:]
            if not n:
                time.sleep(0.001)

    def pump(self, until, timeout: float = 5, machine: bool = True) -> None:
        """Write what the machine has, feed it what comes, until until() or the stream ends
        (machine=False: only read, and drop what comes)."""
        buf, end = memoryview(bytearray(65536)), time.monotonic() + timeout
        while not until() and not self.eof:
            assert time.monotonic() < end, "timed out"
            if machine:
                self.send(b"".join(bytes(b) for b in self.machine.data_to_send()))
            if not self.st.before_wait():
                select.select([self.st], [], [], 0.01)
            try:
                n = self.st.recv_into(buf)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                n = 0
            if n == 0:
                self.eof = True
            elif machine:
                self.machine.receive_data(bytes(buf[:n]))
                self.events += self.machine.next_events()

    def close(self) -> None:
        self.st.close()


@pytest.mark.usefixtures("read_path")
@pytest.mark.parametrize("stage", ["after-banner", "ready"])
@pytest.mark.parametrize("transport", ["unix", "ipc"])
def test_an_unknown_tag_costs_a_live_messenger_only_that_connection(transport, stage, tmp_path, name):
    """A Messenger that reads a valid frame with an unknown tag, right after the banner or
    on a connection that finished its handshake and carried a message: that connection
    ends with a RemoteProtocolError naming the tag, handed to Dispatcher.handle_fault, and
    the hang-up; another connection of the same Messenger carries on."""
    tag = 200
    watch = Watch()
    with served(watch, address_of(transport, tmp_path, name)) as (_, healthy, _):
        assert bytes(healthy.call(Message(READ, front=b"before"), timeout=5).front) == b"before"
        raw = RawClient(healthy.address)
        try:
            if stage == "after-banner":
                raw.send(BANNER_OK + unknown_frame(tag))
                raw.pump(lambda: False, machine=False)  # until the server hangs up on it
            else:
                raw.pump(lambda: raw.machine.state is State.READY)
                raw.machine.send_message(OutMessage(READ, [b"evil but well formed"], []))
                raw.pump(lambda: fronts(raw.events))
                assert fronts(raw.events) == [b"evil but well formed"], "the server answered it: READY"
                raw.send(unknown_frame(tag))
                raw.pump(lambda: False)  # until the server hangs up on it
        finally:
            raw.close()
        assert wait_for(lambda: watch.faults), "Dispatcher.handle_fault was called"
        assert len(watch.faults) == 1 and unknown_tag_error(watch.faults[0], tag), watch.faults
        assert f"in state {'hello' if stage == 'after-banner' else 'ready'}" in str(watch.faults[0])
        for i in range(3):
            reply = healthy.call(Message(READ, front=b"still here %d" % i), timeout=5)
            assert bytes(reply.front) == b"still here %d" % i
        assert healthy.last_error is None and not healthy._closed
