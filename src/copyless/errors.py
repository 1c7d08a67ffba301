"""The one exception hierarchy of copyless, named by cause and by who is at fault.

CopylessError
├── LocalProtocolError          you used the API wrongly
│   └── MessageTooLarge
├── RemoteProtocolError         the peer broke the protocol (bad descriptor, bad segment, ...)
│   └── VersionMismatch
├── ClosedError                 you closed it
├── BrokenError                 something outside failed (see __cause__)
│   └── PeerLost                the peer died or went away
│       └── PeerClosed          ... by closing cleanly
├── WouldBlock (BlockingIOError)   a non-blocking call could not proceed
├── Timeout (TimeoutError)         a blocking call ran out of time
├── ReplyRevoked                the peer revoked the reply a call waited for
├── NameInUse                   a live endpoint already owns the name
├── AccessDenied (PermissionError) the peer's credentials are not allowed
└── ConfigurationError (ValueError)
"""

from __future__ import annotations

__all__ = [
    "CopylessError",
    "LocalProtocolError",
    "MessageTooLarge",
    "RemoteProtocolError",
    "VersionMismatch",
    "ClosedError",
    "BrokenError",
    "PeerLost",
    "PeerClosed",
    "WouldBlock",
    "Timeout",
    "ReplyRevoked",
    "NameInUse",
    "AccessDenied",
    "ConfigurationError",
]


class CopylessError(Exception):
    """Root of every error copyless raises on purpose."""


class LocalProtocolError(CopylessError):
    """The caller misused the API (the fault is on this side)."""


class MessageTooLarge(LocalProtocolError):
    """A message exceeds what the endpoint was configured to carry."""


class RemoteProtocolError(CopylessError):
    """The peer broke the protocol: malformed descriptor, bad segment, wrong layout.

    Only the endpoint that talks to that peer is affected.
    """


class VersionMismatch(RemoteProtocolError):
    """The peer speaks a wire version this copyless does not."""


class ClosedError(CopylessError):
    """The endpoint (or message) was closed by this process."""


class BrokenError(CopylessError):
    """Something outside this process failed; ``__cause__`` says what, where known."""


class PeerLost(BrokenError):
    """The peer process died or disconnected.  Everything it had sent was delivered first."""


class PeerClosed(PeerLost):
    """The peer closed the endpoint cleanly."""


class WouldBlock(CopylessError, BlockingIOError):
    """A non-blocking call could not proceed now (queue full, nothing to receive)."""


class Timeout(CopylessError, TimeoutError):
    """A blocking call did not complete within its timeout."""


class ReplyRevoked(CopylessError):
    """The peer revoked the reply a call was waiting for (Connection.revoke on its side,
    while the reply was being written): it will not come.  The connection carries on.
    A buffer posted with `into=` may hold part of the data, or zeros."""


class NameInUse(CopylessError):
    """A live endpoint already owns that name."""


class AccessDenied(CopylessError, PermissionError):
    """The peer's credentials (SO_PEERCRED) are not in the allowed set."""


class ConfigurationError(CopylessError, ValueError):
    """An argument or setting is out of range or inconsistent."""
