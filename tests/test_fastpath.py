"""The compiled steady state against the Python path it stands in for.

The core's message scan (FrameReader.take_messages) may only ever accept what the
Python reader and session would accept, and must leave everything else to them, so
the same byte stream, valid or corrupted, cut anywhere, under any budget, must give
the same messages, the same errors and the same session state either way."""

from __future__ import annotations

import mmap
import random
import struct
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_frames import feed

from copyless import ConfigurationError, Message, MessageTooLarge
from copyless._codec import Writer, message_scan
from copyless.messenger import Messenger
from copyless.protocol.frames import UNLIMITED, Frame, FrameAborted, FrameReader, Tag, encode_frame
from copyless.protocol.session import (
    MSG_FLAG_REPLY,
    MSG_HEADER,
    U64,
    Closed,
    MessagesReceived,
    OutMessage,
    Role,
    Session,
    SessionConnection,
    SessionRegistry,
    State,
)


def drain(conn: SessionConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def ready_servers(lossless: bool, sent: int) -> tuple[list[SessionConnection], bytes]:
    """Two READY server machines that saw the same bytes from one client, one with the
    compiled steady state and one without; each has `sent` messages out, unacked.
    Returns them and the client's bytes so far."""
    client = SessionConnection(Role.CLIENT, "client.1", session=Session(lossless=lossless), lossless=lossless)
    servers = [
        SessionConnection(
            Role.SERVER, "store.1", registry=SessionRegistry(), lossless=lossless, messages=True, compiled=c
        )
        for c in (True, False)
    ]
    wire = b""
    for _ in range(10):
        out = drain(client)
        wire += out
        for s in servers:
            s.receive_data(out)
        client.receive_data(drain(servers[0]))
        drain(servers[1])
    for s in servers:
        assert s.state is State.READY
        s.next_events()
        for i in range(sent):
            s.send_message(OutMessage(1, [b"out %d" % i], []))
        drain(s)
    return servers, wire


def message(rng: random.Random, seq: int, ack: int, *, big: bool = False) -> bytes:
    tid = rng.choice([1, 2, 3, rng.randrange(1 << 64)])  # 1 and 2 may be calls that posted a buffer
    header = MSG_HEADER.pack(rng.randrange(1 << 16), rng.randrange(256), rng.randrange(256), tid, seq, ack)
    front = rng.randbytes(rng.choice([0, 1, 7, 100]))
    data = rng.randbytes(rng.choice([0, 64, 1500, 4096 if big else 300]))
    return b"".join(
        bytes(b) for b in encode_frame(Tag.MESSAGE, [[header], [front], [data]], data_crc=rng.random() < 0.8)
    )


def stream(rng: random.Random, n: int, corrupt: float) -> bytes:
    """n frames a peer might send a READY session: mostly messages in order, with
    duplicates, gaps, acks, keepalives, large segments, aborts and malformed frames;
    then perhaps flipped bits and garbage."""
    out, seq = [], 0
    for _ in range(n):
        ack = rng.randrange(8)
        kind = rng.choices(
            ["next", "dup", "gap", "big", "ack", "keepalive", "aborted", "short", "segs", "hello", "flags"],
            [60, 8, 3, 3, 5, 3, 2, 1, 1, 1, 1],
        )[0]
        if kind in ("next", "big"):
            seq += 1
            out.append(message(rng, seq, ack, big=kind == "big"))
        elif kind == "dup":
            out.append(message(rng, rng.randint(0, seq), ack))
        elif kind == "gap":
            seq += rng.randint(2, 4)
            out.append(message(rng, seq, ack))
        elif kind == "ack":
            out.append(b"".join(bytes(b) for b in encode_frame(Tag.ACK, [[U64.pack(ack)]])))
        elif kind == "keepalive":
            out.append(b"".join(bytes(b) for b in encode_frame(Tag.KEEPALIVE, [[U64.pack(rng.randrange(1 << 40))]])))
        elif kind == "aborted":
            frame = encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, seq + 1, 0)], [b""], [b"x"]], aborted=True)
            out.append(b"".join(bytes(b) for b in frame))
        elif kind == "short":  # a header one byte short
            seq += 1
            out.append(b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[bytes(27)], [b""], [b""]])))
        elif kind == "segs":  # two segments
            seq += 1
            out.append(b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, seq, 0)]])))
        elif kind == "hello":  # not in the READY table
            out.append(b"".join(bytes(b) for b in encode_frame(Tag.HELLO, [[b"\x00client.1"]])))
        else:  # an unknown preamble flag, with a valid crc
            f = bytearray(b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[bytes(28)], [b""], [b""]])))
            f[2] |= 0x4
            struct.pack_into("<I", f, 28, __import__("copyless._codec")._codec.crc32c(bytes(f[:28])))
            out.append(bytes(f))
    wire = bytearray(b"".join(out))
    if wire and rng.random() < corrupt:
        for _ in range(rng.randint(1, 3)):
            wire[rng.randrange(len(wire))] ^= 1 << rng.randrange(8)
    if rng.random() < corrupt / 4:
        pos = rng.randrange(len(wire) + 1)
        wire[pos:pos] = rng.randbytes(rng.randint(1, 40))
    return bytes(wire)


def observe(s: SessionConnection, into: list) -> None:
    for ev in s.next_events():
        if isinstance(ev, MessagesReceived):
            into += [
                (m.type, m.tid, m.seq, bytes(m.front), bytes(m.data), m.is_reply, m.priority, m.connection)
                for m in ev.messages
            ]
        elif isinstance(ev, Closed):
            into.append(("closed", type(ev.error), str(ev.error)))
        else:
            into.append(type(ev).__name__)


def state(s: SessionConnection) -> tuple:
    """What the two paths must agree on.  The reader's own counts only while the
    connection is open: after an error, the Python reader may have parsed frames
    beyond the bad one that nobody will look at."""
    r, sess = s.reader, s.session
    assert sess is not None
    common = (s.state, sess.in_seq, [m.seq for m in sess.sent], s._unacked_in, s._ack_due, drain(s))
    if s.state is State.CLOSED:
        return common
    # a frame the Python reader has started is charged; the core charges it once it is all here
    return common + (r.taken_frames - r.open_charge[0], r.taken_bytes - r.open_charge[1], r.paused, r.partial)


def feed_received(s: SessionConnection, data: bytes, into: list) -> int:
    """receive_data() through received(): the messages it hands back go to `into` first."""
    view, taken = memoryview(data), 0
    while view and s.state is not State.CLOSED:
        buf = s.next_read()
        n = min(len(buf), len(view))
        if n == 0:
            break
        buf[:n], view, taken = view[:n], view[n:], taken + n
        msgs = s.received(n, s._now)
        into += [
            (m.type, m.tid, m.seq, bytes(m.front), bytes(m.data), m.is_reply, m.priority, m.connection) for m in msgs
        ]
    return taken


def agree(seen: list[list], pos: list[int]) -> None:
    """Both saw the same so far: one may have read (and so seen) more than the other."""
    short, long = sorted(seen, key=len)
    assert long[: len(short)] == short
    if pos[0] == pos[1]:
        assert seen[0] == seen[1]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 40),
    lossless=st.booleans(),
    corrupt=st.sampled_from([0.0, 0.3, 1.0]),
    budget=st.sampled_from([None, (1, 10**9), (3, 400), (10**9, 100)]),
    claims=st.sampled_from([None, ({}, False), ({1: None, 2: None}, False), ({}, True)]),
    one_call=st.booleans(),
)
def test_compiled_and_python_paths_agree(seed, n, lossless, corrupt, budget, claims, one_call):
    rng = random.Random(seed)
    machines = ready_servers(lossless, sent=rng.randint(0, 8))[0]
    owner = object()
    asked: list[list] = [[], []]  # the large data segments each sink was asked for: (tid, reply)
    for i, s in enumerate(machines):
        s.owner = owner
        s.reader.sink_claims = claims
        s.reader.sink = lambda pre, index, earlier, i=i: (
            asked[i].append(MSG_HEADER.unpack(earlier[0])[3:1:-1])
            if (index == 2 and len(earlier[0]) == MSG_HEADER.size)
            else None
        )
        if budget is not None:
            s.reader.budget_frames, s.reader.budget_bytes = budget
    wire = stream(rng, n, corrupt)
    if rng.random() < 0.3:
        wire = wire[: rng.randrange(len(wire) + 1)]
    seen: list[list] = [[], []]
    pos = [0, 0]  # what each has taken: a reader held by a budget reads ahead as its buffer allows
    while min(pos) < len(wire) and machines[0].state is not State.CLOSED:
        target = max(pos) + rng.randint(1, 600)
        for i, s in enumerate(machines):
            if i == 0 and one_call:  # as the Messenger reads: received() (bytes_read + take_messages)
                pos[i] += feed_received(s, wire[pos[i] : target], seen[i])
            else:
                pos[i] += s.receive_data(wire[pos[i] : target])
            s.ack_if_needed()
            observe(s, seen[i])
        agree(seen, pos)
        if pos[0] == pos[1]:
            assert state(machines[0]) == state(machines[1])
        if any(s.reader.paused for s in machines):  # the owner grants more, the same to both
            assert all(s.reader.paused for s in machines)
            more = rng.randint(1, 5), rng.randint(1, 3000)
            for i, s in enumerate(machines):
                s.reader.budget_frames += more[0]
                s.reader.budget_bytes += more[1]
                s.resume_reading()
                observe(s, seen[i])
            agree(seen, pos)
    assert seen[0] == seen[1]
    assert state(machines[0]) == state(machines[1])
    # The Python reader asks its sink for every large data segment; the core leaves to it
    # those that someone may claim, and no others.
    calls, hooks = claims if claims is not None else ({}, True)
    claimed = [a for a in asked[1] if hooks or (a[1] & MSG_FLAG_REPLY and a[0] in calls)]
    if machines[0].state is not State.CLOSED:  # (after an error the two read different amounts)
        assert asked[0] == claimed
    for i, s in enumerate(machines):  # the peer goes: between frames, or in the middle of one
        s.connection_lost()
        observe(s, seen[i])
    assert seen[0] == seen[1]


def test_a_clean_run_is_all_taken_by_the_core():
    rng = random.Random(1)
    wire = b"".join(message(rng, seq, ack=min(seq, 3)) for seq in range(1, 101))
    r = FrameReader(prefetch=len(wire))
    buf = r.next_read()
    buf[: len(wire)] = wire
    r.bytes_read(len(wire))
    out: list = []
    in_seq, ack, n, more = r.take_messages(True, 0, None, out)
    assert (in_seq, ack, n, more) == (100, 3, 100, False)
    assert [m.seq for m in out] == list(range(1, 101))
    assert r.taken_frames == 100 and not r.partial


@pytest.mark.parametrize(
    "why, frame",
    [
        ("an ACK", encode_frame(Tag.ACK, [[U64.pack(1)]])),
        ("a gap", encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, 3, 0)], [b""], [b""]])),
        ("a large segment", encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, 2, 0)], [b""], [bytes(4096)]])),
        ("a short header", encode_frame(Tag.MESSAGE, [[bytes(27)], [b""], [b""]])),
        ("an abort", encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, 2, 0)], [b""], [b""]], aborted=True)),
    ],
)
def test_the_core_stops_before_what_it_does_not_take(why, frame):
    first = b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(1, 0, 0, 0, 1, 0)], [b"a"], [b""]]))
    wire = first + b"".join(bytes(b) for b in frame)
    r = FrameReader()
    buf = r.next_read()
    buf[: len(wire)] = wire
    r.bytes_read(len(wire))
    out: list = []
    assert r.take_messages(True, 0, None, out) == (1, 0, 1, True), why
    assert r._start == len(first)
    f = r.next_frame(single=True)
    assert f is not None and not isinstance(f, Frame) or f.tag in (Tag.ACK, Tag.MESSAGE)


def test_budgets_stop_the_core_before_the_frame_that_does_not_fit():
    rng = random.Random(2)
    wire = b"".join(message(rng, seq, 0) for seq in range(1, 6))
    r = FrameReader()
    buf = r.next_read()
    buf[: len(wire)] = wire
    r.bytes_read(len(wire))
    r.budget_frames, r.budget_bytes = 2, UNLIMITED
    out: list = []
    assert r.take_messages(True, 0, None, out)[2:] == (2, True)
    assert r.taken_frames == 2
    assert r.next_frame(single=True) is None and r.paused  # the Python reader holds it


def test_message_scan_checks_its_arguments():
    with pytest.raises(TypeError):
        message_scan(memoryview(bytearray(8)), 0, 8, 1, 1, -1, -1, True, 0, None, ())
    with pytest.raises(ValueError):
        message_scan(memoryview(bytearray(8)), 0, 9, 1, 1, -1, -1, True, 0, None, [])


# ---------------------------------------------------------------------- send path
class Collect:
    """A stream that takes what it is given (or `room` bytes at a time)."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.wire, self.room = bytearray(), room

    def send_buffers(self, buffers: list) -> int:
        n = 0
        for b in buffers:
            k = min(len(b), self.room - n)
            self.wire += b[:k]
            n += k
            if n == self.room:
                break
        return n


@settings(max_examples=200, deadline=None)
@given(
    mtype=st.integers(0, 0xFFFF),
    prio=st.integers(0, 255),
    tid=st.integers(0, 2**64 - 1),
    seq=st.integers(1, 2**64 - 1),
    ack=st.integers(0, 2**64 - 1),
    reply=st.booleans(),
    front=st.binary(max_size=1500),
    data=st.lists(st.binary(max_size=3000), max_size=4),
    data_crc=st.booleans(),
    lossless=st.booleans(),
)
def test_the_core_encodes_a_message_as_encode_frame_does(
    mtype, prio, tid, seq, ack, reply, front, data, data_crc, lossless
):
    msg = Message(mtype, front, data, tid=tid, priority=prio)
    if reply:
        msg = msg.reply(mtype, front, data)
    w, out = Writer(), Collect()
    w.bind(out, -1, None)
    kept = w.message(msg, seq, ack, data_crc, lossless, 0)
    header = MSG_HEADER.pack(mtype, prio, MSG_FLAG_REPLY if reply else 0, tid, seq, ack)
    want = b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[header], [front], data], data_crc=data_crc))
    assert bytes(out.wire) == want and w.pending == 0
    if lossless:
        assert kept is not None
        assert (kept.type, kept.tid, kept.priority, kept.is_reply, kept.seq) == (mtype, tid, prio, reply, seq)
        assert [bytes(b) for b in kept.front] == [front] and [bytes(b) for b in kept.data] == data
    else:
        assert kept is None


def test_the_writer_holds_large_buffers_until_written_and_copies_small_ones():
    big, small = bytearray(4096), bytearray(100)
    out = Collect(room=0)
    w = Writer()
    w.bind(out, -1, None)
    w.add([small, big])
    assert w.pending == 4196 and not w.flush(out)
    small.extend(b"x")  # copied: free to change
    with pytest.raises(BufferError):
        big.extend(b"x")  # queued as it is: held until written
    out.room = 1 << 30
    assert w.flush(out) and w.pending == 0
    big.extend(b"x")  # given back
    assert bytes(out.wire) == bytes(100) + bytes(4096)
    w.add([bytearray(4096)])
    w.clear()  # dropped, and given back
    assert w.pending == 0 and not w.bound


def test_messages_that_do_not_fit_the_header_are_refused_before_anything_is_queued():
    w, out = Writer(), Collect()
    w.bind(out, -1, None)
    with pytest.raises(ConfigurationError, match="u16"):
        w.message(Message(1 << 16), 1, 0, True, True, 0)
    with pytest.raises(TypeError):
        w.message(b"not a message", 1, 0, True, True, 0)
    # over the peer's segment limit (the last argument): its data, then its front
    with pytest.raises(MessageTooLarge, match="101-byte data segment, over the peer's limit of 100"):
        w.message(Message(1, b"", [bytes(60), bytes(41)]), 1, 0, True, True, 100)
    with pytest.raises(MessageTooLarge, match="101-byte front"):
        w.message(Message(1, bytes(101)), 1, 0, True, True, 100)
    assert w.pending == 0 and not out.wire
    assert w.message(Message(1, bytes(100), [bytes(100)]), 1, 0, True, False, 100) is None  # at the limit
    assert out.wire


SINK = """
import mmap, struct, sys, time
from copyless.messenger import Dispatcher, Messenger, Policy
f = open(sys.argv[1], "r+b")
count = mmap.mmap(f.fileno(), 8)
class Sink(Dispatcher):
    n = 0
    def can_fast_dispatch(self, msg):
        return True
    def fast_dispatch(self, msg):
        self.n += 1
        struct.pack_into("<Q", count, 0, self.n)
m = Messenger("store.1", policies={"client": Policy.stateful_server()})
m.add_dispatcher(Sink())
print(m.bind(sys.argv[2]), flush=True)
m.start()
time.sleep(120)
"""


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_burst_arrives_while_the_sender_keeps_the_gil(child, tmp_path, transport):
    """Sends that follow each other closely are batched, and the batch is written by a
    thread that needs no GIL: a sender that stops sending and then computes without
    releasing the GIL (here: for as long as it takes, with the switch interval set so
    that no other thread of this process gets the GIL meanwhile) delays none of it."""
    counter = tmp_path / "count"
    counter.write_bytes(bytes(8))
    addr = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix://{tmp_path}/s.sock"
    kid = child(SINK, str(counter), addr)
    addr = kid.readline()
    n = 5000
    with open(counter, "rb") as f, mmap.mmap(f.fileno(), 8, prot=mmap.PROT_READ) as count:
        with Messenger("client.7") as client:
            conn = client.connect(addr)
            conn.wait_ready(5)
            payload = bytes(64)
            old = sys.getswitchinterval()
            sys.setswitchinterval(60)
            try:
                for _ in range(n):
                    conn.send(Message(1, data=[payload]))
                end = time.monotonic() + 20
                while struct.unpack_from("<Q", count)[0] < n and time.monotonic() < end:
                    pass  # pure Python: the GIL stays here
                got = struct.unpack_from("<Q", count)[0]
            finally:
                sys.setswitchinterval(old)
            stats = conn._sendq.statistics
    assert got == n, "everything arrived while the sending thread held the GIL"
    # (how many messages a batch holds depends on timing; that there are batches does not)
    assert stats["sendmsg"] < n and stats["written_by_sender"] < n // 2, f"a burst goes out in batches: {stats}"


def test_unclaimed_large_data_stays_in_the_read_buffer_and_claimed_data_is_asked_for():
    rng = random.Random(3)
    frames = []
    for seq in range(1, 7):  # replies to tids 1 and 2; 2 posted a buffer
        header = MSG_HEADER.pack(1, 0, MSG_FLAG_REPLY, 1 + seq % 2, seq, 0)
        data = rng.randbytes(5000)
        frames.append((data, b"".join(bytes(b) for b in encode_frame(Tag.MESSAGE, [[header], [b""], [data]]))))
    wire = b"".join(f for _, f in frames)
    asked = []
    r = FrameReader(prefetch=64 << 10, sink=lambda pre, i, earlier: asked.append(i))
    r.sink_claims = ({2: None}, False)
    buf = r.next_read()
    buf[: len(wire)] = wire
    r.bytes_read(len(wire))
    out: list = []
    in_seq = 0
    while True:
        in_seq, _, _, more = r.take_messages(True, in_seq, None, out)
        if not more:
            break
        f = r.next_frame(single=True)  # a claimed one: the Python reader asks the sink
        assert f is not None and isinstance(f, Frame)
        in_seq += 1
    assert [m.seq for m in out] == [2, 4, 6] and asked == [2, 2, 2]
    assert [bytes(m.data) for m in out] == [frames[i][0] for i in (1, 3, 5)]
    assert all(m.data.obj is out[0].data.obj for m in out), "views into the read buffer: not copied"
    assert r.copied == 3 * 5000, "only the claimed ones were copied (into the buffers the sink gave)"


def scanned(payloads: list[bytes], reader: FrameReader | None = None) -> tuple[FrameReader, list]:
    """Messages the core made from frames carrying these payloads (front b"f<i>")."""
    r = reader or FrameReader()
    wire = b"".join(
        b"".join(
            bytes(b) for b in encode_frame(Tag.MESSAGE, [[MSG_HEADER.pack(7, 1, 0, 9, i + 1, 0)], [b"f%d" % i], [p]])
        )
        for i, p in enumerate(payloads)
    )
    out: list = []
    pos, in_seq = 0, 0
    while pos < len(wire):
        buf = r.next_read()
        n = min(len(buf), len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        pos += n
        r.bytes_read(n)
        in_seq = r.take_messages(True, in_seq, None, out)[0]
    return r, out


def test_a_received_message_makes_its_views_when_first_asked_and_counts_its_bytes_before():
    _, (a, b, c, d) = scanned([b"alpha", b"", b"gamma" * 10, b"delta"])
    assert (len(a), a.nbytes, b.nbytes, len(c)) == (5, 5, 0, 50), "sizes without making views"
    assert (bytes(a.front), bytes(a.data)) == (b"f0", b"alpha")
    assert a.data is a.data and a.data.obj is c.data.obj, "made once, views into the read buffer"
    assert bytes(memoryview(c)) == b"gamma" * 10 and c.tobytes() == b"gamma" * 10
    d.release()
    assert d.released and d.nbytes == 5, "released before its views were made"
    w, out = Writer(), Collect()
    w.bind(out, -1, None)
    w.message(b, 1, 0, True, False, 0)  # a received message can be sent on
    assert bytes(out.wire).endswith(b"f1" + out.wire[-12:-8] + out.wire[-8:])


def test_received_messages_are_tracked_by_the_collector_only_if_kept():
    import gc

    from copyless._core import _track_kept

    _, msgs = scanned([b"x"] * 3)
    assert not any(gc.is_tracked(m) for m in msgs)
    kept = msgs[1]
    _track_kept(msgs)
    assert [gc.is_tracked(m) for m in msgs] == [False, True, False]
    assert gc.is_tracked(kept)


def test_a_read_buffer_is_used_again_only_when_nothing_points_into_it():
    r = FrameReader(prefetch=4096, direct=1024)
    r, first = scanned([bytes([i]) * 100 for i in range(100)], r)  # several buffers' worth
    held = first[0]  # its views are not made yet: it holds the read buffer it came in
    buffers = {id(r._buf)}
    for _ in range(20):
        r, more = scanned([b"z" * 100] * 30, r)
        buffers.add(id(r._buf))
        del more
    assert bytes(held.data) == bytes([0]) * 100, "a kept message's bytes were not overwritten"
    assert len(buffers) < 20, "buffers nobody points into are used again"


def test_a_send_on_an_idle_connection_is_written_at_once_by_the_sender(child, tmp_path):
    """Only sends that follow another closely are left to the flusher: one after a pause,
    and one that answers something received, go out from the sending thread."""
    counter = tmp_path / "count"
    counter.write_bytes(bytes(8))
    kid = child(SINK, str(counter), f"unix://{tmp_path}/s.sock")
    addr = kid.readline()
    with Messenger("client.7") as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        before = conn._sendq.statistics
        for _ in range(5):
            time.sleep(0.01)
            conn.send(Message(1, data=[b"x"]))
        after = conn._sendq.statistics
    assert after["sends"] - before["sends"] == 5
    assert after["written_by_sender"] - before["written_by_sender"] == 5


def test_a_large_reply_read_in_three_reads_is_scanned_by_the_core_once(monkeypatch):
    """A reply whose data goes straight into a posted buffer is three reads on a caller:
    its head, the data, the frame's tail.  The core scans the head once and stops at the
    frame (the Python path's); scanning it again, or scanning the empty buffer after the
    tail, found nothing, at a scan's and a few Python calls' cost in each read."""
    import copyless.protocol.frames as frames

    n = 64 << 10
    posted = bytearray(n)
    calls = {9: None}

    def sink(pre, index, earlier):
        return memoryview(posted)[: pre.lengths[index]] if index == 2 else None

    client = SessionConnection(
        Role.CLIENT, "client.1", session=Session(lossless=False), lossless=False, messages=True, sink=sink
    )
    server = SessionConnection(Role.SERVER, "store.1", registry=SessionRegistry(), lossless=False)
    for _ in range(10):
        client.receive_data(drain(server))
        server.receive_data(drain(client))
    assert client.state is State.READY and server.state is State.READY
    client.next_events()
    client.reader.sink_claims = (calls, False)
    data = bytes(range(256)) * (n // 256)
    server.send_message(OutMessage(2, [b"ok"], [data], tid=9, is_reply=True))
    wire = memoryview(drain(server))
    scans = []
    scan = frames.message_scan
    monkeypatch.setattr(frames, "message_scan", lambda *a: scans.append(1) or scan(*a))
    got = []
    for piece in (wire[:4096], wire[4096:-8], wire[-8:]):
        buf = client.next_read()
        assert len(buf) >= len(piece)
        buf[: len(piece)] = piece
        got += client.received(len(piece), 0.0)
    assert [(m.tid, bytes(m.front)) for m in got] == [(9, b"ok")]
    assert got[0].data.obj is posted and posted == data
    assert len(scans) == 1


class Choke:
    """A stream that takes `room` bytes, then none until it is given more."""

    def __init__(self, room: int) -> None:
        self.wire, self.room = bytearray(), room

    def send_buffers(self, buffers: list) -> int:
        n = 0
        for b in buffers:
            k = min(len(b), self.room)
            self.wire += b[:k]
            self.room -= k
            n += k
            if not self.room:
                break
        return n


FRONT, DATA = 5000, 300_000  # the front over the writer's coalesce (held, not copied), the data in two buffers
WHOLE = 64 + FRONT + 4 + DATA + 8


@pytest.mark.parametrize(
    "cut",
    [0, 10, 64 + 2000, 64 + FRONT + 4 + 1000, 64 + FRONT + 4 + 200_000, WHOLE - 8],
    ids=["nothing", "preamble", "front", "data", "second buffer", "all the data"],
)
@pytest.mark.parametrize("data_crc", [True, False])
def test_a_revoked_frame_is_aborted_where_its_writing_stopped(cut, data_crc):
    """Writer.revoke: the frame's rest goes as filler (the data from zeros, the front
    copied) with its late status set to aborted, and with crcs that hold for what is
    sent (the receiver checks them: the data crc is corrected for the zeros); the
    writer lets go of the message's buffers at once; the receiver discards the frame
    and reads the next one.  The frame's seq is in its (sound) header."""
    front = bytearray(b"F" * FRONT)
    data = [bytearray(random.randbytes(DATA // 2)), bytearray(random.randbytes(DATA // 2))]
    w, out = Writer(), Choke(cut)
    w.bind(out, -1, None)
    msg = Message(7, front, data, tid=3)
    original = bytes(data[0]) + bytes(data[1])
    w.message(msg, 1, 0, data_crc, False, 0)
    assert len(out.wire) == cut and w.pending == WHOLE - cut
    assert w.revoke(msg) is True
    assert w.revoke(msg) is False  # (once)
    for b in (front, *data):
        b.extend(b"!")  # resizable: nothing holds an export of it any more
    w.message(Message(8, b"next"), 2, 0, True, False, 0)
    out.room = 1 << 30
    assert w.flush(out)
    got = feed(FrameReader(), bytes(out.wire))
    assert isinstance(got[0], FrameAborted) and got[0].tag == Tag.MESSAGE
    assert MSG_HEADER.unpack(got[0].segments[0])[3:5] == (3, 1)
    assert bytes(got[0].segments[1]) == b"F" * FRONT
    sent = min(DATA, max(0, cut - (64 + FRONT + 4)))  # of the data, before the revoke
    assert bytes(got[0].segments[2][:sent]) == original[:sent]
    assert bytes(got[0].segments[2][sent:]) == bytes(DATA - sent)  # then zeros, not the caller's bytes
    assert isinstance(got[1], Frame) and bytes(got[1].segments[1]) == b"next"
    assert MSG_HEADER.unpack(got[1].segments[0])[4] == 2 and len(got) == 2


@pytest.mark.parametrize("cut", [WHOLE - 7, WHOLE - 3, WHOLE])
def test_a_frame_whose_crc_went_cannot_be_revoked(cut):
    """Once the data is written whole and any byte of its crc too, the frame is whole
    at the peer: revoke says False, and the frame arrives complete."""
    data = bytearray(random.randbytes(DATA))
    w, out = Writer(), Choke(cut)
    w.bind(out, -1, None)
    msg = Message(7, b"F" * FRONT, [data])
    w.message(msg, 1, 0, True, False, 0)
    assert w.revoke(msg) is False
    out.room = 1 << 30
    assert w.flush(out)
    (frame,) = feed(FrameReader(), bytes(out.wire))
    assert isinstance(frame, Frame) and bytes(frame.segments[2]) == data


def test_revoke_finds_only_the_message_it_is_given():
    w, out = Writer(), Choke(0)
    w.bind(out, -1, None)
    a, b = Message(1, b"a", [bytes(100_000)]), Message(1, b"b", [bytes(100_000)])
    w.message(a, 1, 0, True, False, 0)
    assert w.revoke(b) is False and w.revoke(Message(1, b"a", [bytes(100_000)])) is False
    w.message(b, 2, 0, True, False, 0)
    assert w.revoke(b) is True
    out.room = 1 << 30
    assert w.flush(out)
    got = feed(FrameReader(), bytes(out.wire))
    assert [type(f) for f in got] == [Frame, FrameAborted]
