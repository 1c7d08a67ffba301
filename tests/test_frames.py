"""Frame codec: round trips under any chunking, every corruption caught, direct receive."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copyless.errors import LocalProtocolError, RemoteProtocolError
from copyless.protocol.frames import (
    BadChecksum,
    Frame,
    FrameAborted,
    FrameError,
    FrameReader,
    FrameTooLarge,
    Tag,
    encode_frame,
)


def feed(reader: FrameReader, wire: bytes, chunks: list[int] | None = None) -> list:
    """Drive the reader as an I/O loop would, with reads of the given sizes."""
    out, pos, i = [], 0, 0
    while pos < len(wire):
        buf = reader.next_read()
        want = len(buf)
        if chunks:
            want = max(1, min(want, chunks[i % len(chunks)]))
            i += 1
        n = min(want, len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        pos += n
        reader.bytes_read(n)
        while (ev := reader.next_frame()) is not None:
            out.append(ev)
    return out


def wire_of(buffers) -> bytes:
    return b"".join(bytes(b) for b in buffers)


segment = st.lists(st.binary(max_size=300), min_size=0, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(
        st.tuples(st.sampled_from(list(Tag)), st.lists(segment, min_size=1, max_size=4), st.booleans()),
        min_size=1,
        max_size=5,
    ),
    chunks=st.lists(st.integers(1, 64), max_size=8),
)
def test_round_trip_any_chunking(frames, chunks):
    wire = b"".join(wire_of(encode_frame(tag, segs, data_crc=dc)) for tag, segs, dc in frames)
    events = feed(FrameReader(), wire, chunks)
    assert len(events) == len(frames)
    for ev, (tag, segs, _) in zip(events, frames, strict=True):
        assert isinstance(ev, Frame) and ev.tag == tag
        assert [bytes(s) for s in ev.segments] == [b"".join(seg) for seg in segs]


def test_encode_passes_large_buffers_through_and_coalesces_small_ones():
    data = [bytearray(b"a" * 5000), memoryview(b"b" * 5000)]
    bufs = encode_frame(Tag.MESSAGE, [[b"hdr"], data])
    assert bufs[1] is data[0] and bufs[2] is data[1], "large buffers are passed through, not copied"
    assert len(encode_frame(Tag.MESSAGE, [[b"hdr"], [b"front"], [b"x" * 100]])) == 1, "a small frame is one buffer"


def test_many_small_frames_in_one_read():
    wire = b"".join(wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b""], [bytes([i]) * 64]])) for i in range(50))
    reader = FrameReader()
    buf = reader.next_read()
    assert len(buf) >= len(wire)
    buf[: len(wire)] = wire
    reader.bytes_read(len(wire))
    frames = []
    while (f := reader.next_frame()) is not None:
        frames.append(f)
    assert [bytes(f.segments[2]) for f in frames] == [bytes([i]) * 64 for i in range(50)]
    assert frames[0].segments[2].obj is frames[49].segments[2].obj is reader._buf, "views into the prefetch buffer"


def test_large_segment_is_read_directly_copying_at_most_the_prefetched_part():
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b"f"], [payload]]))
    reader = FrameReader(prefetch=16 << 10)
    (frame,) = feed(reader, wire)
    assert bytes(frame.segments[2]) == payload
    assert reader.copied < 16 << 10, "only the bulk read's overlap with the segment was copied"


def test_large_frames_read_a_head_at_a_time_reuse_one_prefetch_buffer():
    """A caller with a large posted buffer reads 4 KiB heads (Connection's FILL_HEAD) and
    the data straight into its buffer.  The frame's head stays held (its segments are
    views) until the frame ends, so the reader must not start the buffer over then: it
    allocated a new one for the 8 bytes that end the frame, every other frame."""
    payload = bytes(range(256)) * 256  # 64 KiB
    wire = wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b""], [payload]]))
    reader = FrameReader(prefetch=16 << 10)
    bufs = set()
    for _ in range(20):
        (frame,) = feed(reader, wire, chunks=[4096, len(wire)])
        assert bytes(frame.segments[2]) == payload
        del frame
        bufs.add(id(reader._buf))
    assert len(bufs) == 1, "one prefetch buffer, used again and again"


@settings(max_examples=300, deadline=None)
@given(segs=st.lists(segment, min_size=1, max_size=4), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_every_single_bit_flip_is_caught(segs, pos, bit):
    wire = bytearray(wire_of(encode_frame(Tag.MESSAGE, segs)))
    pos %= len(wire)  # the epilogue too
    wire[pos] ^= 1 << bit
    reader = FrameReader()
    with pytest.raises(RemoteProtocolError):
        events = feed(reader, bytes(wire))
        # a flip in a length can leave the reader waiting for bytes that never come
        assert events == [], "a corrupt frame was accepted"
        raise FrameError("incomplete")


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=32, max_size=200))
def test_garbage_is_rejected(garbage):
    with pytest.raises(RemoteProtocolError):
        feed(FrameReader(), garbage)
        raise FrameError("incomplete")  # not enough for a frame: also fine


def test_header_is_verified_before_data_is_read_into_the_callers_buffer():
    header, payload = b"H" * 28, bytes(range(256)) * 64
    wire = wire_of(encode_frame(Tag.MESSAGE, [[header], [b"front"], [payload]]))
    posted = bytearray(len(payload))
    seen = []

    def sink(pre, index, earlier):
        seen.append((index, [bytes(s) for s in earlier]))
        return memoryview(posted)

    (frame,) = feed(FrameReader(sink=sink), wire, [7])
    assert seen == [(2, [header, b"front"])], "asked once, for the data, after header and front were verified"
    assert bytes(posted) == payload
    assert frame.segments[2].obj is posted, "the data segment is the caller's buffer, no copy"


def test_corrupt_header_stops_before_data():
    wire = bytearray(wire_of(encode_frame(Tag.MESSAGE, [[b"H" * 28], [b"D" * 5000]])))
    wire[40] ^= 1  # inside the header
    asked = []
    with pytest.raises(BadChecksum):
        feed(FrameReader(sink=lambda p, i, e: asked.append(i)), bytes(wire))
    assert 1 not in asked, "no buffer was asked for the data of a frame whose header failed"


def test_oversize_segment_is_refused_from_the_preamble():
    wire = wire_of(encode_frame(Tag.MESSAGE, [[b"h"], [bytes(2000)]]))
    reader = FrameReader(max_segment=1000)
    reader.next_read()[:32] = wire[:32]
    reader.bytes_read(32)
    with pytest.raises(FrameTooLarge):
        reader.next_frame()


def test_budget_holds_a_frame_before_its_body_until_resumed():
    small = wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b""], [b"s" * 100]]))
    big = wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b""], [bytes(100_000)]]))
    wire = small * 3 + big + small
    reader = FrameReader()
    reader.budget_frames = 2
    pos, got = 0, []

    def pump() -> None:
        nonlocal pos
        while True:
            while (f := reader.next_frame()) is not None:
                got.append(f)
            buf = reader.next_read()
            if not buf or pos == len(wire):
                return
            n = min(len(buf), len(wire) - pos)
            buf[:n] = wire[pos : pos + n]
            pos += n
            reader.bytes_read(n)

    pump()
    assert len(got) == 2 and reader.paused and len(reader.next_read()) == 0
    reader.budget_frames, reader.budget_bytes = 4, reader.taken_bytes + 100 + 99_999
    reader.resume()
    pump()
    assert len(got) == 3 and reader.paused, "the big frame does not fit the byte budget"
    assert pos < 20_000, "its data was not read from the transport"
    reader.budget_bytes += 1
    reader.resume()
    pump()
    assert len(got) == 4 and bytes(got[3].segments[2]) == bytes(100_000) and pos == len(wire)
    assert reader.paused, "the fifth frame waits for budget"
    reader.budget_frames = reader.budget_bytes = -1
    reader.resume()
    pump()
    assert len(got) == 5 and reader.taken_frames == 5


def test_aborted_frame_is_discarded_and_the_stream_continues():
    wire = wire_of(encode_frame(Tag.MESSAGE, [[b"half"]], aborted=True)) + wire_of(
        encode_frame(Tag.ACK, [[struct.pack("<Q", 9)]])
    )
    events = feed(FrameReader(), wire)
    assert isinstance(events[0], FrameAborted) and events[0].tag == Tag.MESSAGE
    assert isinstance(events[1], Frame) and bytes(events[1].segments[0]) == struct.pack("<Q", 9)


@pytest.mark.parametrize("aborted", [False, True])
@pytest.mark.parametrize("bit", range(32))
def test_no_bit_flip_in_the_epilogue_turns_complete_into_aborted_or_back(aborted, bit):
    """Regression: the epilogue is not under any crc, and complete (0) and aborted (1) differed in
    one bit, so one flipped bit made the receiver silently discard a good MESSAGE (found by the
    FaultProxy's corrupt(): a lossless call then waited for a reply that only a later message
    from the server would have shown missing)."""
    wire = bytearray(wire_of(encode_frame(Tag.MESSAGE, [[b"header"], [b"data"]], aborted=aborted)))
    wire[len(wire) - 4 + bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameError):
        feed(FrameReader(), bytes(wire))


@pytest.mark.parametrize("data_crc", [True, False])
@pytest.mark.parametrize("aborted", [False, True])
def test_a_lost_epilogue_is_an_error_whatever_follows(data_crc, aborted):
    """Regression (version 3): the epilogue was a bare status, so a stream that lost exactly
    a frame's epilogue put the next frame's first bytes in its place, and 01 00 00 00 there
    read as "aborted": the frame, all of whose crcs had passed, was dropped as revoked and
    its seq counted (the simulated link's fault test, seed 837).  The status is now sent
    XORed with the frame's last crc."""
    first = wire_of(encode_frame(Tag.MESSAGE, [[b"header"], [b"data"]], data_crc=data_crc, aborted=aborted))
    for status in (0x01, 0x0E):  # what either status used to look like on the wire
        wire = first[:-4] + struct.pack("<I", status) + wire_of(encode_frame(Tag.ACK, [[struct.pack("<Q", 9)]]))
        with pytest.raises(FrameError, match="epilogue"):
            feed(FrameReader(), wire)
    events = feed(FrameReader(), first)  # and whole, it still reads
    assert len(events) == 1 and isinstance(events[0], FrameAborted) == aborted


def test_data_crc_can_be_off():
    bufs = encode_frame(Tag.MESSAGE, [[b"hdr"], [b"data"]], data_crc=False)
    wire = bytearray(wire_of(bufs))
    wire[-10] ^= 0xFF  # corrupt the data: not caught, by request
    (frame,) = feed(FrameReader(), bytes(wire))
    assert bytes(frame.segments[0]) == b"hdr"


def test_encoder_refuses_bad_frames():
    with pytest.raises(LocalProtocolError):
        encode_frame(Tag.MESSAGE, [])
    with pytest.raises(LocalProtocolError):
        encode_frame(Tag.MESSAGE, [[b"x"]] * 5)
    for tag in (256, 256 + Tag.MESSAGE, -1):  # a byte on the wire: it must not wrap to another tag
        with pytest.raises(LocalProtocolError, match="tag"):
            encode_frame(tag, [[b"x"]])


def test_sink_must_give_the_right_buffer():
    wire = wire_of(encode_frame(Tag.MESSAGE, [[b"h"], [b"data" * 2000]]))
    with pytest.raises(LocalProtocolError):
        feed(FrameReader(sink=lambda p, i, e: bytearray(3)), wire)


def _crc32c_reference(data: bytes, value: int = 0) -> int:
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


CRC_IMPLS = ["table", "sse4.2", "fold"]


@pytest.fixture(params=CRC_IMPLS)
def crc_impl(request):
    from copyless._codec import _crc_impl

    best = next(name for name in reversed(CRC_IMPLS) if _crc_impl(name))
    if not _crc_impl(request.param):
        pytest.skip(f"this CPU has no {request.param} crc32c")
    yield request.param
    _crc_impl(best)


@pytest.mark.parametrize(
    "n",
    [0, 1, 7, 8, 9, 255, 256, 257, 511, 512, 3 * 512 - 1, 3 * 512, 1300, 4095, 4096, 3 * 4096 - 1, 3 * 4096]
    + [3 * 4096 + 1, 2 * 3 * 4096 + 13, 65536 + 255],
)
def test_crc32c_matches_the_bitwise_definition(n, crc_impl):
    from copyless._codec import crc32c

    check(n, crc32c)


@given(st.binary(min_size=0, max_size=5000), st.integers(0, 63), st.integers(0, 2**32 - 1))
def test_every_crc32c_implementation_agrees(data, offset, seed):
    """Any length, start alignment and seed: the table (checked against the bitwise
    definition above) is the reference for the hardware paths."""
    from copyless._codec import _crc_impl, crc32c

    view = memoryview(bytes(offset) + data)[offset:]
    results = {}
    try:
        for name in CRC_IMPLS:
            if _crc_impl(name):
                results[name] = crc32c(view, seed)
    finally:
        for name in reversed(CRC_IMPLS):
            if _crc_impl(name):
                break
    assert len(set(results.values())) == 1, results


def check(n, crc32c):
    data = bytes((i * 131 + n) & 0xFF for i in range(n))
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(data) == _crc32c_reference(data)
    assert crc32c(data[n // 3 :], crc32c(data[: n // 3])) == crc32c(data), "chaining"


@pytest.mark.parametrize("chunk", [1000, 7, 1 << 20])
@pytest.mark.parametrize("where", [0, 1, 4095, 20_000, 99_999])
def test_a_flip_in_a_direct_segment_is_caught_by_the_crc_taken_as_it_landed(where, chunk):
    payload = bytes(range(256)) * 400  # 102 400 bytes: read straight into its own buffer
    wire = bytearray(wire_of(encode_frame(Tag.MESSAGE, [[b"h" * 28], [b"f"], [payload]])))
    start = 32 + 28 + 4 + 1 + 4
    assert bytes(feed(FrameReader(), bytes(wire), [chunk])[0].segments[2]) == payload
    wire[start + where] ^= 0x10
    with pytest.raises(BadChecksum):
        feed(FrameReader(), bytes(wire), [chunk])


@pytest.mark.parametrize("front", [b"s35", bytes(range(256)) * 40])  # small (core) and direct (Python) fronts
def test_two_frames_of_the_same_shape_cannot_be_spliced_into_one_that_checks(front):
    """A stream that loses bytes may join the first part of one frame to the rest of
    the next.  Each segment's crc runs on from the one before, so the spliced frame
    fails: the header of one message never travels with the body of another."""
    a = wire_of(encode_frame(Tag.MESSAGE, [[b"header-34"], [front[:-2] + b"34"], []]))
    b = wire_of(encode_frame(Tag.MESSAGE, [[b"header-35"], [front], []]))
    cut = 32 + len(b"header-34") + 4  # a's preamble and header (with its crc), then b from its front on
    assert len(a) == len(b)
    assert [bytes(s) for s in feed(FrameReader(), a + b)[1].segments] == [b"header-35", front, b""]
    for chunks in (None, [7]):
        with pytest.raises(BadChecksum, match="segment 1"):
            feed(FrameReader(), a[:cut] + b[cut:], chunks)
