"""asyncio twins of Publisher, Subscriber and Messenger, with the same names.

A Subscriber waits on its eventfd through the event loop (no polling thread):
it raises its waiter flag with the value that tells the publisher to write
the eventfd instead of waking a futex.  A Publisher blocked by a slow
subscriber waits in the loop's default executor, so the loop keeps running.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from typing import Any

from . import _pubsub, messenger
from ._core import Loan, Message
from .errors import PeerClosed, Timeout, WouldBlock

__all__ = ["Publisher", "Subscriber", "Message", "Loan", "Messenger", "Connection", "Dispatcher"]


class Publisher(_pubsub.Publisher):
    async def send(self, obj: Any, type: int = 0, tag: int = 0, timeout: float | None = None) -> int:  # type: ignore[override]
        try:
            return int(_pubsub.Publisher.send(self, obj, type, tag, timeout=0))
        except WouldBlock:
            if self._policy_raises() or timeout == 0:
                raise
        call = functools.partial(_pubsub.Publisher.send, self, obj, type, tag, timeout=timeout)
        return int(await asyncio.get_running_loop().run_in_executor(None, call))

    async def loan(self, nbytes: int, type: int = 0, tag: int = 0, timeout: float | None = None) -> Loan:  # type: ignore[override]
        """await pub.loan(n): a Loan; use it as `with loan as buf:` to publish on exit."""
        try:
            return _pubsub.Publisher.loan(self, nbytes, type, tag, timeout=0)
        except WouldBlock:
            if self._policy_raises() or timeout == 0:
                raise
        call = functools.partial(_pubsub.Publisher.loan, self, nbytes, type, tag, timeout)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    async def wait_for_subscribers(self, n: int = 1, timeout: float | None = None) -> None:  # type: ignore[override]
        call = functools.partial(_pubsub.Publisher.wait_for_subscribers, self, n, timeout)
        await asyncio.get_running_loop().run_in_executor(None, call)


class Subscriber(_pubsub.Subscriber):
    """Construct it with `await Subscriber.create(name, timeout=...)` to wait for the publisher
    without blocking the loop, or directly when the publisher is known to exist."""

    @classmethod
    async def create(cls, name: str, **kw: Any) -> Subscriber:
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(cls, name, **kw))

    async def recv(self, timeout: float | None = None) -> Message:  # type: ignore[override]
        msg = self._try_recv()
        if msg is not None:
            return msg
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        ctl_woke = True  # look at the peer once up front; afterwards only when its socket stirs
        while True:
            msg = self._try_recv()
            if msg is not None:
                return msg
            if ctl_woke or self._lost is not None or self._pub_closed():
                msg = self._check_peer_or_last()
                if msg is not None:
                    return msg
            if self._arm_eventfd():
                continue  # something arrived while we raised the flag
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self._disarm()
                raise Timeout(f"nothing from {self.name!r} within {timeout} s")
            fut: asyncio.Future[bool] = loop.create_future()

            def wake(from_ctl: bool, fut: asyncio.Future[bool] = fut) -> None:
                if not fut.done():
                    fut.set_result(from_ctl)

            evfd, sock = self._evfd, self._sock
            assert sock is not None
            loop.add_reader(evfd, wake, False)
            loop.add_reader(sock.fileno(), wake, True)  # control messages, or the publisher's death
            ctl_woke = False
            try:
                ctl_woke = await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(evfd)
                loop.remove_reader(sock.fileno())
                self._disarm()
                try:
                    os.read(evfd, 8)
                except BlockingIOError:
                    pass

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.recv()
        except PeerClosed:
            raise StopAsyncIteration from None


# ---------------------------------------------------------------- Messenger
class Dispatcher(messenger.Dispatcher):
    """An asyncio dispatcher: `dispatch` is a coroutine, run on the event loop the
    Messenger was made in, one message at a time in dispatch order (priority, then
    arrival).  The Messenger's dispatch thread waits for each one, so throttles count
    a message until its coroutine is done.  fast_dispatch and the handle_* events stay
    plain functions (they run on the thread reading the connection)."""

    async def dispatch(self, msg: messenger.Message) -> None:  # type: ignore[override]
        pass


class Connection:
    """The asyncio face of a messenger.Connection (`conn.sync` is the object itself)."""

    def __init__(self, conn: messenger.Connection) -> None:
        self.sync = conn

    def send(self, msg: messenger.Message) -> None:
        """Never blocks: writes what the socket takes now and queues the rest."""
        self.sync.send(msg)

    async def call(self, msg: messenger.Message, into: Any = None, timeout: float | None = None) -> messenger.Message:
        """Send a request and await its reply; the reply's data lands in `into`."""
        conn = self.sync
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pending = conn._post_call(msg, into)
        pending.notify = lambda: loop.call_soon_threadsafe(_finish, done)
        try:
            conn.send(msg)
            try:
                await asyncio.wait_for(asyncio.shield(done), timeout)
            except TimeoutError:
                raise Timeout(f"no reply to tid {msg.tid} within {timeout} s") from None
        finally:
            conn.messenger._calls.pop(msg.tid, None)
        return pending.result()

    def revoke(self, msg: messenger.Message) -> bool:
        """messenger.Connection.revoke: take a sent message back (True: the peer will
        not deliver it); copyless holds none of its buffers once it returns."""
        return self.sync.revoke(msg)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.sync.wait_ready, timeout)

    def close(self) -> None:
        self.sync.close()


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Messenger(messenger.Messenger):
    """messenger.Messenger for asyncio: make it inside the running loop.

    async with aio.Messenger("client.7") as m:
        conn = m.connect("tcp://127.0.0.1:6800")
        reply = await conn.call(Message(1, front=b"..."), into=buf, timeout=5)
    """

    def __init__(self, name: str, **kw: Any) -> None:
        self._aloop = asyncio.get_running_loop()
        super().__init__(name, **kw)

    def add_dispatcher(self, d: messenger.Dispatcher) -> None:
        super().add_dispatcher(_OnLoop(d, self._aloop) if isinstance(d, Dispatcher) else d)

    def connect(  # type: ignore[override]
        self, address: str, policy: messenger.Policy | None = None, *, name: str | None = None
    ) -> Connection:
        return Connection(super().connect(address, policy, name=name))

    async def aclose(self) -> None:
        """Shut down without blocking the event loop (the dispatch thread may be
        waiting for a coroutine on it)."""
        await self._aloop.run_in_executor(None, self.shutdown)

    async def __aenter__(self) -> Messenger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _OnLoop(messenger.Dispatcher):
    """Runs an aio.Dispatcher's coroutine on its event loop from the dispatch thread."""

    _PLAIN = ("can_fast_dispatch", "fast_dispatch", "data_buffer") + tuple(
        n for n in vars(messenger.Dispatcher) if n.startswith("handle_")
    )

    def __init__(self, d: Dispatcher, loop: asyncio.AbstractEventLoop) -> None:
        self.d, self.loop = d, loop
        for name in self._PLAIN:  # these run as they are, on the thread that calls them
            setattr(self, name, getattr(d, name))

    def dispatch(self, msg: messenger.Message) -> None:
        if not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.d.dispatch(msg), self.loop).result()
