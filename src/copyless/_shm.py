"""Shared-memory segments: anonymous memfds, sealed, mapped by the core.

Nothing here touches /dev/shm or the filesystem: a segment lives exactly as
long as some process holds its fd or a mapping of it, so SIGKILL leaks nothing.
"""

from __future__ import annotations

import fcntl
import os

from ._core import Mapping
from .errors import RemoteProtocolError

F_SEAL_SEAL = 0x1
F_SEAL_SHRINK = 0x2
F_SEAL_GROW = 0x4
F_SEAL_FUTURE_WRITE = 0x10  # Linux 5.1: no new writable mappings, the creator's stays
F_ADD_SEALS = 1033
F_GET_SEALS = 1034

PAGE = os.sysconf("SC_PAGE_SIZE")

# a peer that can shrink a segment can make us SIGBUS: both seals are required
REQUIRED_SEALS = F_SEAL_SHRINK | F_SEAL_GROW


def page_round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def create(tag: str, size: int, *, readonly_for_peers: bool) -> tuple[int, Mapping]:
    """A new sealed memfd of `size` bytes, mapped read-write here.

    With readonly_for_peers, F_SEAL_FUTURE_WRITE stops any other process from
    mapping it writable (our own mapping, made first, keeps working).
    """
    fd = os.memfd_create(f"copyless:{tag}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        mapping = Mapping(fd, size, writable=True)
        seals = REQUIRED_SEALS | F_SEAL_SEAL
        if readonly_for_peers:
            seals |= F_SEAL_FUTURE_WRITE
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


def map_peer(fd: int, size: int, *, writable: bool) -> Mapping:
    """Map a segment a peer sent us, after checking it cannot shrink under us."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError as e:
        raise RemoteProtocolError(f"peer sent an fd that is not a sealable memfd: {e}") from e
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise RemoteProtocolError("peer sent a segment that is not sealed against resizing")
    if size <= 0 or st.st_size < size:
        raise RemoteProtocolError(f"peer sent a segment of {st.st_size} bytes, {size} announced")
    return Mapping(fd, size, writable=writable)
