from collections.abc import Sequence
from typing import Any

HAVE_SSE42: int

def crc32c(data: Any, value: int = 0, /) -> int: ...
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
    /,
) -> tuple[int, int, int, int, int, int, int]: ...
def _use_hardware_crc(on: bool, /) -> bool: ...
