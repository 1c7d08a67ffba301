"""Frames of the copyless session protocol, sans-I/O (wire format: docs/protocol.md).

A frame is a 32-byte preamble (tag, segment count, each segment's length and
alignment, crc32c of the preamble), then each segment followed by its own
crc32c, then a 4-byte epilogue whose flags can say the sender aborted the
frame.  Because every segment carries its own checksum, a receiver can trust a
message's header before it reads the data, and choose where the data goes
(direct receive: straight from the socket into a buffer the application posted).

`encode_frame` returns a list of buffers for one sendmsg (payload buffers are
never concatenated).  `FrameReader` says how many bytes it wants next and into
which buffer, and turns what was read into events; it never touches a socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from crc32c import crc32c

from ..errors import LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview

PREAMBLE = struct.Struct("<BBH" + "IH" * 4 + "I")  # tag, nseg, flags, 4 x (len, align), crc
assert PREAMBLE.size == 32
CRC = struct.Struct("<I")
EPILOGUE = struct.Struct("<I")  # u8 late status, 3 zero bytes
MAX_SEGMENTS = 4

# preamble flags
FLAG_NO_DATA_CRC = 0x1  # the last segment's crc is not computed (sent as 0)
# epilogue late status.  Nothing checksums the epilogue, so the two values differ in four
# bits and anything else is an error: no single flipped bit can make a receiver discard a
# good frame as aborted (msgr2.1 chose its late status values for the same reason).
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
    IDENT_MISSING_FEATURES = 9
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


class FrameError(RemoteProtocolError):
    """The byte stream is not a valid frame."""


class BadChecksum(FrameError):
    """A crc32c did not match: the stream is corrupt."""


class FrameTooLarge(FrameError):
    """A segment is longer than this endpoint accepts (checked before reading it)."""


def _crc(buffers: Sequence[Buffer], value: int = 0) -> int:
    for b in buffers:
        value = crc32c(b, value)
    return value


def _nbytes(buffers: Sequence[Buffer]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


def encode_frame(
    tag: int,
    segments: Sequence[Sequence[Buffer]],
    *,
    aligns: Sequence[int] | None = None,
    data_crc: bool = True,
    aborted: bool = False,
) -> list[Buffer]:
    """The buffers of one frame, ready for a scatter-gather send.

    Each segment is a sequence of buffers sent back to back; its checksum
    covers them all.  With data_crc=False the last segment is not checksummed
    (for payloads protected elsewhere, or when the CPU matters more).
    """
    if not 1 <= len(segments) <= MAX_SEGMENTS:
        raise LocalProtocolError(f"a frame has 1 to {MAX_SEGMENTS} segments, not {len(segments)}")
    lengths = [_nbytes(seg) for seg in segments]
    if any(n >= 1 << 32 for n in lengths):
        raise LocalProtocolError("a segment is limited to 4 GiB - 1")
    aligns = list(aligns) if aligns is not None else [1] * len(segments)
    flags = 0 if data_crc else FLAG_NO_DATA_CRC
    fields: list[int] = []
    for i in range(MAX_SEGMENTS):
        fields += [lengths[i], aligns[i]] if i < len(segments) else [0, 0]
    head = PREAMBLE.pack(tag, len(segments), flags, *fields, 0)
    preamble = head[:28] + CRC.pack(crc32c(head[:28]))
    out: list[Buffer] = [preamble]
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        out.extend(b for b in seg if memoryview(b).nbytes)
        out.append(CRC.pack(0 if (i == last and not data_crc) else _crc(seg)))
    out.append(EPILOGUE.pack(LATE_ABORTED if aborted else LATE_COMPLETE))
    return out


@dataclass(frozen=True)
class Preamble:
    tag: int
    lengths: tuple[int, ...]
    aligns: tuple[int, ...]
    data_crc: bool


@dataclass
class Frame:
    """A complete, verified frame: one memoryview per segment."""

    tag: int
    segments: list[memoryview]
    aligns: tuple[int, ...] = ()


@dataclass
class FrameAborted:
    """The sender gave the frame up after starting it; its contents are discarded."""

    tag: int


@dataclass
class _Step:
    kind: str  # "preamble", "segment", "crc", "epilogue"
    index: int = 0


@dataclass
class ReadRequest:
    """Read exactly nbytes into buffer (a memoryview of exactly that many bytes)."""

    buffer: memoryview
    nbytes: int


SegmentSink = Callable[[Preamble, int, Sequence[memoryview]], "memoryview | None"]


@dataclass
class FrameReader:
    """Incremental, zero-copy frame reader.

    Loop: `req = reader.next_read()`, read up to `req.nbytes` into `req.buffer`
    (for example `sock.recv_into(req.buffer)`), then `reader.bytes_read(n)`,
    which returns a Frame or FrameAborted once one is complete, else None.

    `sink(preamble, index, earlier_segments)` may return a buffer for segment
    `index` (exactly its length) once the earlier segments (the header first)
    are verified: that is how data lands directly in a caller's buffer.
    Returning None means "the reader's own buffer".
    """

    max_segment: int = 64 << 20
    sink: SegmentSink | None = None
    _scratch: bytearray = field(default_factory=lambda: bytearray(64))
    _step: _Step = field(default_factory=lambda: _Step("preamble"))
    _have: int = 0
    _pre: Preamble | None = None
    _segments: list[memoryview] = field(default_factory=list)
    _target: memoryview | None = None

    def next_read(self) -> ReadRequest:
        if self._target is None:
            self._target = self._buffer_for_step()
        rest = self._target[self._have :]
        return ReadRequest(rest, len(rest))

    def bytes_read(self, n: int) -> Frame | FrameAborted | None:
        """Account for n bytes read into the last request's buffer."""
        if self._target is None or n < 0 or self._have + n > len(self._target):
            raise LocalProtocolError("bytes_read() does not match the last next_read()")
        self._have += n
        if self._have < len(self._target):
            return None
        return self._advance()

    # ------------------------------------------------------------------ internals
    def _scratch_view(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def _buffer_for_step(self) -> memoryview:
        step = self._step
        if step.kind == "preamble":
            return self._scratch_view(PREAMBLE.size)
        if step.kind in ("crc", "epilogue"):
            return memoryview(bytearray(4))
        assert self._pre is not None
        n = self._pre.lengths[step.index]
        if self.sink is not None:
            buf = self.sink(self._pre, step.index, self._segments)
            if buf is not None:
                buf = memoryview(buf).cast("B")
                if buf.readonly or len(buf) != n:
                    raise LocalProtocolError(f"the sink must give a writable buffer of exactly {n} bytes")
                return buf
        return memoryview(bytearray(n))

    def _advance(self) -> Frame | FrameAborted | None:
        buf, step = self._target, self._step
        assert buf is not None
        self._target, self._have = None, 0
        if step.kind == "preamble":
            self._pre = self._parse_preamble(buf)
            self._segments = []
            self._step = self._segment_or_epilogue(0)
            if self._step.kind == "segment" and self._pre.lengths[0] == 0:
                return self._advance_empty()
            return None
        pre = self._pre
        assert pre is not None
        if step.kind == "segment":
            self._segments.append(buf)
            self._step = _Step("crc", step.index)
            return None
        if step.kind == "crc":
            (want,) = CRC.unpack(buf)
            seg = self._segments[step.index]
            last = step.index == len(pre.lengths) - 1
            if (pre.data_crc or not last) and crc32c(seg) != want:
                raise BadChecksum(f"segment {step.index} of a {_tag_name(pre.tag)} frame fails its crc32c")
            self._step = self._segment_or_epilogue(step.index + 1)
            if self._step.kind == "segment" and pre.lengths[self._step.index] == 0:
                return self._advance_empty()
            return None
        # epilogue
        (late,) = EPILOGUE.unpack(buf)
        self._step = _Step("preamble")
        self._pre = None
        segments, self._segments = self._segments, []
        if late == LATE_ABORTED:
            return FrameAborted(pre.tag)
        if late != LATE_COMPLETE:
            raise FrameError(f"bad epilogue {late:#010x}")
        return Frame(pre.tag, segments, pre.aligns)

    def _advance_empty(self) -> Frame | FrameAborted | None:
        self._target = memoryview(b"")
        return self._advance()

    def _segment_or_epilogue(self, index: int) -> _Step:
        assert self._pre is not None
        return _Step("segment", index) if index < len(self._pre.lengths) else _Step("epilogue")

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
        return Preamble(tag, lengths, aligns, not flags & FLAG_NO_DATA_CRC)


def _tag_name(tag: int) -> str:
    try:
        return Tag(tag).name
    except ValueError:
        return f"tag-{tag}"
