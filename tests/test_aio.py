"""copyless.aio: the same endpoints, woken through an eventfd on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import copyless
from copyless import aio


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_async_recv_is_woken_by_eventfd_not_polling(name):
    async def main():
        pub = aio.Publisher(name)
        sub = await aio.Subscriber.create(name, timeout=5)
        await pub.wait_for_subscribers(1, timeout=5)
        threads = threading.active_count()

        async def later():
            for i in range(20):
                await asyncio.sleep(0.005)
                await pub.send(bytes([i]))

        task = asyncio.create_task(later())
        got = []
        for _ in range(20):
            with await sub.recv(timeout=2) as m:
                got.append(m.data[0])
        await task
        assert got == list(range(20))
        assert threading.active_count() == threads, "no polling thread"
        st = sub.statistics()
        assert st.sleeps >= 10, "it slept between messages"
        assert pub.statistics().wakeups >= 10, "and was woken through the eventfd"
        pub.close()
        sub.close()

    run(main())


def test_async_for_ends_on_close_and_timeout_raises(name):
    async def main():
        pub = aio.Publisher(name)
        sub = await aio.Subscriber.create(name, timeout=5)
        await pub.wait_for_subscribers(1, timeout=5)
        t0 = time.monotonic()
        with pytest.raises(copyless.Timeout):
            await sub.recv(timeout=0.1)
        assert time.monotonic() - t0 < 1
        for i in range(3):
            await pub.send(bytes([i]))
        pub.close()
        assert [m.data[0] async for m in sub] == [0, 1, 2]
        sub.close()

    run(main())


def test_async_publisher_blocks_without_blocking_the_loop(name):
    async def main():
        pub = aio.Publisher(name, queue_depth=2)
        sub = await aio.Subscriber.create(name, timeout=5)
        await pub.wait_for_subscribers(1, timeout=5)
        await pub.send(b"1")
        await pub.send(b"2")
        sending = asyncio.create_task(pub.send(b"3"))  # the queue is full: waits off the loop
        await asyncio.sleep(0.1)
        assert not sending.done()
        assert bytes((await sub.recv(timeout=1)).data) == b"1"
        await asyncio.wait_for(sending, 5)
        assert [bytes((await sub.recv(timeout=1)).data) for _ in range(2)] == [b"2", b"3"]
        loan = await pub.loan(4)
        with loan as buf:
            buf[:] = b"loan"
        assert bytes((await sub.recv(timeout=1)).data) == b"loan"
        pub.close()
        sub.close()

    run(main())


def test_async_peer_death_is_noticed(name, child):
    c = child(
        """
        import sys, time, copyless
        pub = copyless.Publisher(sys.argv[1])
        pub.wait_for_subscribers(1, timeout=20)
        pub.send(b"last words")
        print("sent", flush=True)
        time.sleep(60)
        """,
        name,
    )

    async def main():
        sub = await aio.Subscriber.create(name, timeout=20)
        assert c.readline() == "sent"
        assert bytes((await sub.recv(timeout=5)).data) == b"last words"
        c.kill()
        t0 = time.monotonic()
        with pytest.raises(copyless.PeerLost):
            await sub.recv(timeout=5)
        assert time.monotonic() - t0 < 1
        sub.close()

    run(main())
