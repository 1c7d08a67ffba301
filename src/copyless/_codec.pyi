from collections.abc import Callable, Sequence
from typing import Any

HAVE_SSE42: int
HAVE_FOLD: int

def crc32c(data: Any, value: int = 0, /) -> int: ...
def recv_fill(fd: int, buf: Any, wait: float, /) -> int: ...
def frame_encode(
    tag: int, segments: Sequence[Sequence[Any]], data_crc: bool, aborted: bool, coalesce: int, /
) -> list[Any]: ...
def frame_scan(
    view: memoryview,
    start: int,
    end: int,
    max_segment: int,
    direct: int,
    budget_frames: int,
    budget_bytes: int,
    frame_type: type[Any],
    max_frames: int = -1,
    /,
) -> tuple[list[Any], int, int, int]: ...
def message_scan(
    view: memoryview,
    start: int,
    end: int,
    max_segment: int,
    direct: int,
    budget_frames: int,
    budget_bytes: int,
    lossless: bool,
    in_seq: int,
    connection: Any,
    out: list[Any],
    calls: dict[int, Any] | None = None,
    hooks: bool = True,
    room: int = 0,
    /,
) -> tuple[int, int, int, int, int, int, int]: ...
def _crc_impl(name: str, /) -> bool: ...
def sole_view(view: memoryview, /) -> bool: ...
def _set_errors(local_protocol: type, configuration: type, too_large: type, /) -> None: ...

class OutMessage:
    """What a session sends and keeps until it is acknowledged (a compiled record)."""

    type: int
    tid: int
    priority: int
    is_reply: bool
    seq: int
    aborted: bool  # revoked: sent again (a replay) as an aborted frame, empty
    @property
    def sent_id(self) -> int: ...  # the send of a Message it was made by (Message._sent_id), or 0
    @property
    def front(self) -> tuple[Any, ...]: ...
    @property
    def data(self) -> tuple[Any, ...]: ...
    def __init__(
        self,
        type: int,
        front: Sequence[Any],
        data: Sequence[Any],
        tid: int = 0,
        priority: int = 0,
        is_reply: bool = False,
        seq: int = 0,
        sent_id: int = 0,
        aborted: bool = False,
    ) -> None: ...

class Flusher:
    """A thread (in C, never taking the GIL) that writes its writers' batches."""

    def __init__(self, loop_fd: int = -1, spin: float = 3e-05) -> None: ...
    @property
    def reap_wanted(self) -> bool: ...
    def reap(self) -> None: ...
    def close(self) -> None: ...

class Writer:
    """A connection's send queue: batches small frames, writes without the GIL."""

    stalled: int
    read: int
    def __init__(self, coalesce: int = 1024) -> None: ...
    @property
    def pending(self) -> int: ...
    @property
    def bound(self) -> bool: ...
    @property
    def statistics(self) -> dict[str, int]: ...
    def bind(self, stream: Any, fd: int, flusher: Flusher | None, /) -> None: ...
    def clear(self) -> None: ...
    def add(self, buffers: Sequence[Any], /) -> None: ...
    def send(self, buffers: Sequence[Any], /) -> None: ...
    def flush(self, stream: Any, /) -> bool: ...
    def message(
        self, msg: Any, seq: int, ack: int, data_crc: bool, lossless: bool, max_segment: int, /
    ) -> OutMessage | None: ...
    def revoke(self, msg: Any, /) -> bool: ...

class Lock:
    """A reentrant lock (threading.RLock's interface) that the compiled send takes without a Python call."""

    def __init__(self) -> None: ...
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(self, *exc: object) -> None: ...
    def _is_owned(self) -> bool: ...

class Throttle:
    """A limit shared by a Messenger's connections (messages, or bytes); the GIL is its lock."""

    def __init__(self, limit: int | None = None) -> None: ...
    @property
    def limit(self) -> int | None: ...
    @property
    def used(self) -> int: ...
    def reserve(self, need: int = 0, /) -> int: ...
    def put(self, n: int, /) -> None: ...
    def when_free(self, cb: Callable[[], object], /) -> None: ...

def compiled_send(connection: type, machine: type, session: type, ready: object, /) -> Any:
    """Connection.send with its steady state compiled (the classes must declare the slots it uses)."""

def compiled_messenger(messenger: type, loop: type, /) -> None:
    """Where the Messenger's and IOLoop's attributes that the compiled read round and call read are (their slots)."""

def compiled_read(
    connection: type,
    machine: type,
    session: type,
    reader: type,
    call: type,
    ready: object,
    closed: object,
    remote_error: type,
    track_kept: Any,
    /,
) -> Any:
    """Connection._on_readable with the read round's steady state compiled (after compiled_send)."""

def compiled_call(connection: type, stream: type, fill_head: int, fill_min: int, /) -> Any:
    """Connection.call compiled for a caller that reads its reply from an ipc:// stream or a
    plain socket (after compiled_read)."""

def read_round(connection: Any, fill: int = 0, /) -> bool:
    """A connection's read round, compiled (the caller holds its lock); False: not the steady state."""
