"""asyncio twins of Publisher and Subscriber, with the same names.

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

from . import _pubsub
from ._core import Loan, Message
from .errors import PeerClosed, Timeout, WouldBlock

__all__ = ["Publisher", "Subscriber", "Message", "Loan"]


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
