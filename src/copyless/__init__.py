"""copyless: messaging between processes whose data path does not copy.

pub = copyless.Publisher("camera")
with pub.loan(nbytes) as buf:      # build the message in shared memory: zero copies
    buf[:] = frame
sub = copyless.Subscriber("camera")
with sub.recv(timeout=1.0) as msg: # msg.data: read-only memoryview into shared memory
    use(msg.data)

with copyless.Messenger("client.7") as m:   # sessions with peers (copyless.messenger)
    conn = m.connect("unix:///run/store.sock")
    conn.send(copyless.Message(type=1, front=b"hdr", data=[buf1, buf2]))  # scatter-gather
"""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from . import _codec, _core
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "copyless's compiled core is not built. Install the package with `pip install .` "
        "(or `make install` in a checkout); for a debug build set COPYLESS_DEBUG=1."
    ) from e

from . import errors
from ._core import Loan, Message
from ._pubsub import Publisher, PublisherStatistics, Subscriber, SubscriberStatistics
from .errors import (
    AccessDenied,
    BrokenError,
    ClosedError,
    ConfigurationError,
    CopylessError,
    LocalProtocolError,
    MessageTooLarge,
    NameInUse,
    PeerClosed,
    PeerLost,
    RemoteProtocolError,
    ReplyRevoked,
    Timeout,
    VersionMismatch,
    WouldBlock,
)

if TYPE_CHECKING:
    from .messenger import Connection, Dispatcher, Messenger, Policy

# The messenger's names are imported on first use: its modules (ssl, the session
# machine, the I/O loops) would double the time `import copyless` takes for a
# program that only publishes or subscribes (28 ms -> 55 ms measured).
_MESSENGER = frozenset({"Messenger", "Connection", "Dispatcher", "Policy"})


def __getattr__(name: str) -> object:
    if name in _MESSENGER:
        from . import messenger

        for n in _MESSENGER:
            globals()[n] = getattr(messenger, n)
        return globals()[name]
    raise AttributeError(f"module 'copyless' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _MESSENGER)


_core._set_errors(WouldBlock, Timeout, RemoteProtocolError, ClosedError, ConfigurationError)
_codec._set_errors(LocalProtocolError, ConfigurationError, MessageTooLarge)

__version__ = "0.1.0"
__all__ = [
    "Publisher",
    "Subscriber",
    "Message",
    "Messenger",
    "Connection",
    "Dispatcher",
    "Policy",
    "Loan",
    "PublisherStatistics",
    "SubscriberStatistics",
    "errors",
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
