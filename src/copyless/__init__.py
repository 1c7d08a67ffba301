"""copyless: messaging between processes whose data path does not copy.

pub = copyless.Publisher("camera")
with pub.loan(nbytes) as buf:      # build the message in shared memory: zero copies
    buf[:] = frame
sub = copyless.Subscriber("camera")
with sub.recv(timeout=1.0) as msg: # msg.data: read-only memoryview into shared memory
    use(msg.data)
"""

from __future__ import annotations

try:
    from . import _core
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
    Timeout,
    VersionMismatch,
    WouldBlock,
)

_core._set_errors(WouldBlock, Timeout, RemoteProtocolError, ClosedError, ConfigurationError)

__version__ = "0.1.0"
__all__ = [
    "Publisher",
    "Subscriber",
    "Message",
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
    "NameInUse",
    "AccessDenied",
    "ConfigurationError",
]
