"""Frames of the copyless session protocol, sans-I/O (wire format: docs/protocol.md).

A frame is a 32-byte preamble (tag, segment count, each segment's length and
alignment, crc32c of the preamble), then each segment followed by the running
crc32c of the frame up to its end (so segments of two frames cannot be spliced
into one that checks), then a 4-byte epilogue whose status says the frame is complete or
that the sender aborted it (XORed with the frame's last crc, so that bytes of another
frame read in its place do not pass for it).  Because every segment carries its own checksum, a receiver can trust a
message's header before it reads the data, and choose where the data goes
(direct receive: straight from the socket into a buffer the application posted).

`encode_frame` returns a list of buffers for one sendmsg (payload buffers are
never concatenated; small pieces are).  `FrameReader` says into which buffer
it wants bytes next, and turns what was read into frames; it never touches a
socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._codec import crc32c, frame_encode, frame_scan, message_scan, sole_view
from .._core import Message
from ..errors import LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview

PREAMBLE = struct.Struct("<BBH" + "IH" * 4 + "I")  # tag, nseg, flags, 4 x (len, align), crc
assert PREAMBLE.size == 32
CRC = struct.Struct("<I")
EPILOGUE = struct.Struct("<I")  # the late status XOR the frame's last crc
MAX_SEGMENTS = 4

# preamble flags
FLAG_NO_DATA_CRC = 0x1  # the last segment's crc is not computed (sent as 0)
# epilogue late status, sent XORed with the last crc the frame checks (version 4: a stream
# that lost the epilogue put the next frame's bytes in its place, and they read as a
# status).  The two values differ in four bits and anything else is an error: no single
# flipped bit can make a receiver discard a good frame as aborted.
LATE_COMPLETE = 0x0E
LATE_ABORTED = 0x01


class Tag(enum.IntEnum):
    HELLO = 1
    AUTH_REQUEST = 2
    AUTH_CHALLENGE = 3
    AUTH_REPLY = 4
    AUTH_DONE = 5
    AUTH_BAD = 6
    CLIENT_IDENT = 7
    SERVER_IDENT = 8
    IDENT_MISSING_FEATURES = 9  # reserved: nothing sends it (the banners settle features); docs/protocol.md
    SESSION_RECONNECT = 10
    SESSION_RECONNECT_OK = 11
    SESSION_RETRY = 12
    SESSION_RETRY_GLOBAL = 13
    SESSION_RESET = 14
    WAIT = 15
    MESSAGE = 16
    ACK = 17
    KEEPALIVE = 18
    KEEPALIVE_ACK = 19
    GOODBYE = 20


class FrameError(RemoteProtocolError):
    """The byte stream is not a valid frame."""


class BadChecksum(FrameError):
    """A crc32c did not match: the stream is corrupt."""


class FrameTooLarge(FrameError):
    """A segment is longer than this endpoint accepts (checked before reading it)."""


COALESCE = 1024  # buffers smaller than this are copied into the frame's own bytes


def encode_frame(
    tag: int,
    segments: Sequence[Sequence[Buffer]],
    *,
    data_crc: bool = True,
    aborted: bool = False,
) -> list[Buffer]:
    """The buffers of one frame, ready for a scatter-gather send.

    Each segment is a sequence of buffers sent back to back; its checksum
    covers them all.  Small buffers are coalesced with the preamble and
    checksums into one bytearray; a buffer of COALESCE bytes or more is passed
    through as it is (never copied), so a small message is one buffer and a
    large one is three.  With data_crc=False the last segment is not
    checksummed (for payloads protected elsewhere, or when the CPU matters more).
    """
    try:
        return frame_encode(tag, segments, data_crc, aborted, COALESCE)
    except ValueError as e:
        raise LocalProtocolError(str(e)) from None


@dataclass(frozen=True)
class Preamble:
    tag: int
    lengths: tuple[int, ...]
    aligns: tuple[int, ...]
    data_crc: bool
    crc: int  # its own crc32c: the first segment's crc runs on from it


class Frame(NamedTuple):
    """A complete, verified frame: one memoryview per segment."""

    tag: int
    segments: list[memoryview]


@dataclass
class FrameAborted:
    """The sender gave the frame up after starting it (it revoked the message): the
    receiver discards it.  Its segments passed their crcs (a sender that aborts sends
    correct crcs over the filler it sends), so a MESSAGE's header is sound and its seq
    counts as received (the sender will not send that seq again)."""

    tag: int
    segments: list[memoryview] = field(default_factory=list)


SegmentSink = Callable[[Preamble, int, Sequence[memoryview]], "memoryview | None"]
UNLIMITED = -1

# reader phases
_PREAMBLE, _SEGMENT, _CRC, _EPILOGUE = range(4)


class FrameReader:
    """Incremental frame reader with a prefetch buffer and direct receive.

    Loop: `buf = reader.next_read()`, read at most len(buf) bytes into it (for
    example `sock.recv_into(buf)`), `reader.bytes_read(n)`, then take complete
    frames with `reader.next_frame()` until it returns None.

    Small items (preambles, checksums, segments under `direct` bytes) are read
    in bulk into a prefetch buffer, so one read can carry many frames; their
    segments are memoryviews into that buffer (a full buffer is replaced, never
    overwritten, so views stay valid).  Runs of complete small frames are
    parsed and verified by the compiled core.  A segment of `direct` bytes or
    more is read straight into its own buffer: only what a bulk read had
    already fetched of it (less than one buffer: `prefetch` bytes, or
    `stream_prefetch` once reads fill whole buffers) is copied.

    `sink(preamble, index, earlier_segments)` is asked for the buffer of each
    direct segment once the earlier segments (the header first) are verified:
    that is how large data lands in a caller's buffer.  None means "allocate".
    An owner that can say in advance which MESSAGE data its sink may want
    (`sink_claims`) lets take_messages() keep unclaimed large data of a frame
    that fits the buffer in the buffer, as a view, like a small segment: no
    sink call, no buffer of its own, no copy.

    Budgets: `budget_frames` and `budget_bytes` (UNLIMITED by default) bound
    the frames of two or more segments (messages) and the bytes after their
    header that may still be parsed.  A frame that does not fit is held from
    its preamble on: the reader asks for no more bytes until the owner raises
    the budget and calls `resume()` (throttles push back on the transport
    instead of growing memory; at most one prefetch buffer is read ahead).
    `taken_frames`/`taken_bytes` count what was charged; `open_charge` is the
    part of it that belongs to a frame still being read.
    """

    # What the compiled read round reads and writes is in slots (messenger.py,
    # compiled_read): the core finds it at fixed offsets.
    __slots__ = (
        "_buf",
        "_view",
        "_start",
        "_end",
        "_phase",
        "_ready",
        "_target",
        "paused",
        "_filled",
        "budget_frames",
        "budget_bytes",
        "taken_frames",
        "taken_bytes",
        "max_segment",
        "direct",
        "stream_prefetch",
        "sink_claims",
        "open_charge",
        "__dict__",
    )

    def __init__(
        self,
        max_segment: int = 64 << 20,
        sink: SegmentSink | None = None,
        *,
        prefetch: int = 16 << 10,
        direct: int = 4 << 10,
        stream_prefetch: int | None = None,
    ) -> None:
        if direct > prefetch // 2:
            raise LocalProtocolError("direct threshold must be at most half the prefetch size")
        self.max_segment, self.sink = max_segment, sink
        self.prefetch, self.direct = prefetch, direct
        # A read that fills all the buffer offered it means a stream is coming: the next
        # buffer is this big, so one read carries more of it.  Otherwise buffers stay at
        # `prefetch`, since a message kept by the application keeps its buffer alive.
        self.stream_prefetch = max(prefetch, stream_prefetch if stream_prefetch is not None else 4 * prefetch)
        self._filled = False
        # What the sink may claim, for take_messages: None, it may want any direct segment
        # (the core leaves every frame with one to the Python reader); or (calls, hooks): a
        # MESSAGE's data is wanted only by the call a reply answers, if its tid is in
        # `calls` (a dict), or by anyone if `hooks` is true.  Unclaimed, a large segment of
        # a frame that fits half the prefetch buffer is read there, as a small one is.
        self.sink_claims: tuple[dict[int, Any], bool] | None = None
        self.budget_frames = self.budget_bytes = UNLIMITED
        self.taken_frames = self.taken_bytes = 0
        self.copied = 0  # bytes of direct segments copied out of the prefetch buffer
        self._buf = bytearray(prefetch)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unparsed bytes are _buf[_start:_end]
        self._ready: list[Frame] = []  # parsed by the core, not yet handed out
        self._phase = _PREAMBLE
        self._index = 0
        self._pre: Preamble | None = None
        self._segments: list[memoryview] = []
        self._target: memoryview | None = None  # a direct segment being filled
        self._tcrc: int | None = None  # its running crc32c (None: not checked)
        self._crcs: dict[int, int] = {}  # crc32c of direct segments, computed as they landed
        self._chain = 0  # the running crc32c of the frame so far (preamble, then each segment)
        self._have = 0
        self.paused = False  # the frame at hand is over budget: wait for resume() (read-only)
        self.held_bytes = 0  # the body of the held frame
        self.open_charge = (0, 0)  # (1, body) while a charged frame is still being read

    # ------------------------------------------------------------------ API
    @property
    def in_target(self) -> bool:
        """next_read() is (the rest of) a direct segment's own buffer."""
        return self._target is not None and self._start == self._end

    @property
    def partial(self) -> bool:
        """Bytes of a frame (or of the banner) have been read but not the whole of it."""
        return self._phase != _PREAMBLE or self._target is not None or self._end > self._start

    def next_read(self) -> memoryview:
        """The buffer to read into next (empty while paused)."""
        if self.paused:
            return self._view[:0]
        if self._target is not None and self._start == self._end:
            return self._target[self._have :]
        # Full: a new buffer.  Drained past half: start it over, but only if nothing points
        # into it (then it is free to reuse); else read on into its rest.  (Renewing then
        # allocated a buffer for the 8 bytes that end a large frame whose head is still
        # held: every other 1 MiB call.)
        if self._end == len(self._buf) or (
            self._start == self._end and self._end > len(self._buf) // 2 and sole_view(self._view)
        ):
            self._renew()
        return self._view[self._end :]

    def bytes_read(self, n: int) -> None:
        """Account for n bytes read into the last next_read() buffer."""
        if n < 0:
            raise LocalProtocolError("negative read")
        if self._target is not None and self._start == self._end:
            if self._have + n > len(self._target):
                raise LocalProtocolError("bytes_read() does not match the last next_read()")
            if self._tcrc is not None:  # checksummed as it lands, while it is in cache
                self._tcrc = crc32c(self._target[self._have : self._have + n], self._tcrc)
            self._have += n
        else:
            if self._end + n > len(self._buf):
                raise LocalProtocolError("bytes_read() does not match the last next_read()")
            self._end += n
            self._filled = self._end == len(self._buf)

    def take(self, n: int) -> memoryview | None:
        """n raw bytes from the stream (before any frame: the banner), or None if not here yet."""
        return self._consume(n) if self._avail() >= n else None

    def resume(self) -> None:
        """The budget was raised: a held frame may go on."""
        self.paused = False

    def next_frame(self, single: bool = False) -> Frame | FrameAborted | None:
        """The next frame completed by what was read so far, or None.  single: parse
        only this one (the caller takes the frames after it another way)."""
        if self._ready:
            return self._ready.pop()
        if self._phase == _PREAMBLE and self._end - self._start > PREAMBLE.size and not self.paused:
            self._scan(1 if single else -1)
            if self._ready:
                return self._ready.pop()
        return self._slow()

    @property
    def at_frame(self) -> bool:
        """Between frames, with nothing parsed and not handed out: take_messages() may run."""
        return self._phase == _PREAMBLE and not self._ready and not self.paused and self._target is None

    def take_messages(
        self, lossless: bool, in_seq: int, connection: Any, out: list[Message]
    ) -> tuple[int, int, int, bool]:
        """The compiled steady state of a session (only when `at_frame`): the run of
        complete, small, valid MESSAGE frames at hand whose seq follows in_seq
        (lossless: in_seq + 1; lossy: any higher one; lower ones are replayed
        duplicates and dropped) becomes received Messages appended to out, charged to
        the budgets like any frame.  Returns (new in_seq, highest ack_seq seen or 0,
        messages accepted, more): more=True means a frame is at hand that
        next_frame() must take (another tag, a gap, a large segment, bad input);
        False, that the rest is an incomplete frame or nothing."""
        claims = self.sink_claims
        self._start, nf, nb, in_seq, ack, n, stop = message_scan(
            self._view,
            self._start,
            self._end,
            self.max_segment,
            self.direct,
            *self._left(),
            lossless,
            in_seq,
            connection,
            out,
            *((claims[0], claims[1], self.stream_prefetch // 2) if claims is not None else ()),
        )
        self.taken_frames += nf
        self.taken_bytes += nb
        return in_seq, ack, n, stop != 0

    def read_messages(
        self, n: int, lossless: bool, in_seq: int, connection: Any, out: list[Message]
    ) -> tuple[int, int, int, bool] | None:
        """bytes_read(n) and then take_messages(), in one call, when the reader is
        between frames with nothing held, handed out or being read straight into a
        target (the steady state); None, having done nothing, otherwise."""
        if self._phase != _PREAMBLE or self.paused or self._ready or self._target is not None:
            return None
        end = self._end + n
        if n < 0 or end > len(self._buf):
            raise LocalProtocolError("bytes_read() does not match the last next_read()")
        self._end = end
        self._filled = end == len(self._buf)
        return self.take_messages(lossless, in_seq, connection, out)

    # ------------------------------------------------------------------ internals
    def _left(self) -> tuple[int, int]:
        """The frames and body bytes the budgets still allow, as the core's scanners take them."""
        bf, bb = self.budget_frames, self.budget_bytes
        return (
            UNLIMITED if bf == UNLIMITED else max(0, bf - self.taken_frames),
            UNLIMITED if bb == UNLIMITED else max(0, bb - self.taken_bytes),
        )

    def _scan(self, max_frames: int = -1) -> None:
        """Let the core parse the run of complete, small, valid frames at hand."""
        frames, self._start, nf, nb = frame_scan(
            self._view,
            self._start,
            self._end,
            self.max_segment,
            self.direct,
            *self._left(),
            Frame,
            max_frames,
        )
        self.taken_frames += nf
        self.taken_bytes += nb
        frames.reverse()  # handed out with pop()
        self._ready = frames

    def _renew(self) -> None:
        """A fresh prefetch buffer; the unparsed tail (part of one frame that fits a buffer)
        moves over.  The old buffer lives on as long as segments handed out still point
        into it; if none does, it is used again (no allocation, no page faults, and the
        memory is still in the cache)."""
        tail = self._end - self._start
        size = max(self.stream_prefetch if self._filled else self.prefetch, tail * 2)
        old = self._buf
        if len(old) == size and sole_view(self._view):
            self._view.release()
            old[:tail] = old[self._start : self._end]
            self._view = memoryview(old)
            self._start, self._end = 0, tail
            return
        buf = bytearray(size)
        buf[:tail] = old[self._start : self._end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, tail

    def _avail(self) -> int:
        return self._end - self._start

    def _consume(self, n: int) -> memoryview:
        v = self._view[self._start : self._start + n]
        self._start += n
        return v

    def _fits(self, pre: Preamble) -> bool:
        """Charge a message frame to the budgets, or hold it."""
        if len(pre.lengths) < 2:
            return True
        body = sum(pre.lengths[1:])
        if (self.budget_frames != UNLIMITED and self.taken_frames + 1 > self.budget_frames) or (
            self.budget_bytes != UNLIMITED and self.taken_bytes + body > self.budget_bytes
        ):
            self.paused, self.held_bytes = True, body
            return False
        self.taken_frames += 1
        self.taken_bytes += body
        self.open_charge = (1, body)
        return True

    def _slow(self) -> Frame | FrameAborted | None:
        """One item at a time, with every check and its precise error."""
        if self.paused:
            return None
        while True:
            phase = self._phase
            if phase == _PREAMBLE:
                if self._avail() < PREAMBLE.size:
                    return None
                pre = self._parse_preamble(self._view[self._start : self._start + PREAMBLE.size])
                if not self._fits(pre):
                    return None
                self._start += PREAMBLE.size
                self._pre, self._segments, self._index, self._crcs = pre, [], 0, {}
                self._chain = pre.crc
                self._phase = _SEGMENT
                continue
            cur = self._pre
            assert cur is not None
            pre = cur
            if phase == _SEGMENT:
                if self._index == len(pre.lengths):
                    self._phase = _EPILOGUE
                    continue
                if self._target is None and not self._open_segment(pre):
                    return None
                if self._target is not None:
                    if not self._fill_target():
                        return None
                    self._segments.append(self._target)
                    if self._tcrc is not None:
                        self._crcs[self._index] = self._tcrc
                    self._target, self._tcrc = None, None
                self._phase = _CRC
                continue
            if phase == _CRC:
                if self._avail() < CRC.size:
                    return None
                (want,) = CRC.unpack(self._consume(CRC.size))
                i = self._index
                got = self._crcs.pop(i, None)
                if (pre.data_crc or i != len(pre.lengths) - 1) and (
                    got if got is not None else crc32c(self._segments[i], self._chain)
                ) != want:
                    raise BadChecksum(f"segment {i} of a {_tag_name(pre.tag)} frame fails its crc32c")
                if pre.data_crc or i != len(pre.lengths) - 1:
                    self._chain = want
                self._index += 1
                self._phase = _SEGMENT
                continue
            # epilogue
            if self._avail() < EPILOGUE.size:
                return None
            (late,) = EPILOGUE.unpack(self._consume(EPILOGUE.size))
            late ^= self._chain
            segments, self._segments, self._pre = self._segments, [], None
            self._phase = _PREAMBLE
            self.open_charge = (0, 0)
            if late == LATE_ABORTED:
                return FrameAborted(pre.tag, segments)
            if late != LATE_COMPLETE:
                raise FrameError(f"bad epilogue (status {late:#010x})")
            return Frame(pre.tag, segments)

    def _resume_direct(
        self,
        preamble: memoryview,
        header: memoryview,
        front: memoryview,
        target: memoryview,
        have: int,
        tcrc: int | None,
        chain: int,
    ) -> None:
        """The core read a reply's data straight into its target (messenger's compiled
        read round, for a caller) and stopped short of the frame's end, or found it fails
        a check: go on from there as if this reader had read those bytes itself.  The
        core charged the frame, checked its preamble, header and front (chain: the crc
        after the front), copied `have` bytes into the target (tcrc: their running crc,
        None if the data carries none) and left _start/_end at what follows them."""
        pre = self._parse_preamble(preamble)
        self._pre, self._index, self._crcs, self._chain = pre, 2, {}, chain
        self.open_charge = (1, sum(pre.lengths[1:]))
        if have < len(target):
            self._segments = [header, front]
            self._target, self._have, self._tcrc = target, have, tcrc
            self._phase = _SEGMENT
        else:
            self._segments = [header, front, target]
            self._target, self._tcrc = None, None
            if tcrc is not None:
                self._crcs[2] = tcrc
            self._phase = _CRC

    def _open_segment(self, pre: Preamble) -> bool:
        """Start segment _index: a small one is taken from the prefetch buffer once
        it is all here (False: not yet); a large one gets its own buffer."""
        i, n = self._index, pre.lengths[self._index]
        if n < self.direct:
            if self._avail() < n:
                return False
            self._segments.append(self._consume(n))
            return True
        target = self.sink(pre, i, self._segments) if self.sink is not None else None
        view = memoryview(target if target is not None else bytearray(n)).cast("B")
        if view.readonly or len(view) != n:
            raise LocalProtocolError(f"the sink must give a writable buffer of exactly {n} bytes")
        self._target, self._have = view, 0
        self._tcrc = self._chain if pre.data_crc or i != len(pre.lengths) - 1 else None
        return True

    def _fill_target(self) -> bool:
        """Copy what the prefetch buffer already holds of the direct segment; True when full."""
        t = self._target
        assert t is not None
        k = min(self._avail(), len(t) - self._have)
        if k:
            t[self._have : self._have + k] = self._consume(k)
            if self._tcrc is not None:
                self._tcrc = crc32c(t[self._have : self._have + k], self._tcrc)
            self._have += k
            self.copied += k
        return self._have == len(t)

    def _parse_preamble(self, buf: memoryview) -> Preamble:
        fields = PREAMBLE.unpack(buf)
        if crc32c(buf[:28]) != fields[-1]:
            raise BadChecksum("frame preamble fails its crc32c")
        tag, nseg, flags = fields[0], fields[1], fields[2]
        if not 1 <= nseg <= MAX_SEGMENTS:
            raise FrameError(f"frame with {nseg} segments")
        if flags & ~FLAG_NO_DATA_CRC:
            raise FrameError(f"unknown frame flags {flags:#x}")
        lengths = tuple(fields[3 + 2 * i] for i in range(nseg))
        aligns = tuple(fields[4 + 2 * i] for i in range(nseg))
        if any(fields[3 + 2 * i] or fields[4 + 2 * i] for i in range(nseg, MAX_SEGMENTS)):
            raise FrameError("unused segment slots are not zero")
        for i, n in enumerate(lengths):
            if n > self.max_segment:
                raise FrameTooLarge(f"segment {i} of a {_tag_name(tag)} frame is {n} bytes, over {self.max_segment}")
        return Preamble(tag, lengths, aligns, not flags & FLAG_NO_DATA_CRC, fields[-1])


def _tag_name(tag: int) -> str:
    try:
        return Tag(tag).name
    except ValueError:
        return f"tag-{tag}"
