"""The asyncio Messenger: awaited calls with direct receive, coroutine dispatch in order,
throttles that still count a message until its coroutine is done."""

from __future__ import annotations

import asyncio

import pytest

from copyless import aio
from copyless.errors import Timeout
from copyless.messenger import Message, Policy

READ, REPLY, WRITE, SILENT = 1, 2, 3, 4


class Store(aio.Dispatcher):
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.running = 0
        self.overlap = False

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == READ

    def fast_dispatch(self, msg: Message) -> None:
        n = int.from_bytes(msg.front, "little")
        assert msg.connection is not None
        msg.connection.send(msg.reply(REPLY, data=[bytes([5]) * n]))

    async def dispatch(self, msg: Message) -> None:
        if msg.type != WRITE:
            return
        self.running += 1
        self.overlap |= self.running > 1
        await asyncio.sleep(0.001)  # other coroutines run meanwhile; the next message waits
        self.writes.append(bytes(msg.front))
        self.running -= 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_await_call_and_coroutine_dispatch(tmp_path, name, transport):
    async def main() -> None:
        store = Store()
        async with aio.Messenger("store.1", policies={"client": Policy.stateful_server()}, throttle_messages=4) as srv:
            srv.add_dispatcher(store)
            addr = srv.bind(
                {"tcp": "tcp://127.0.0.1:0", "unix": f"unix://{tmp_path}/a.sock", "ipc": f"ipc://{name}"}[transport]
            )
            srv.start()
            async with aio.Messenger("client.7") as client:
                conn = client.connect(addr)
                await conn.wait_ready(5)
                for n in (1, 100_000):
                    buf = bytearray(n)
                    reply = await conn.call(Message(READ, front=n.to_bytes(8, "little")), into=buf, timeout=5)
                    assert reply.data.obj is buf and bytes(buf) == bytes([5]) * n
                for i in range(200):
                    conn.send(Message(WRITE, front=b"%d" % i))
                ticks = 0
                while len(store.writes) < 200:  # the event loop keeps running meanwhile
                    await asyncio.sleep(0.005)
                    ticks += 1
                    assert srv._throttles[0].used <= 4
                assert ticks > 1
                with pytest.raises(Timeout):
                    await conn.call(Message(SILENT), timeout=0.1)
                assert conn.revoke(Message(WRITE)) is False  # never sent on it
        assert store.writes == [b"%d" % i for i in range(200)], "in order"
        assert not store.overlap, "one coroutine at a time"

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_aio_peers_dial_each_other_and_share_one_connection(tmp_path):
    async def main() -> None:
        got: dict[str, list[bytes]] = {"osd.1": [], "osd.2": []}

        class Peer(aio.Dispatcher):
            def __init__(self, name: str) -> None:
                self.name = name

            async def dispatch(self, msg: Message) -> None:
                got[self.name].append(bytes(msg.front))

        peers = {"osd": Policy.lossless_peer()}
        async with aio.Messenger("osd.1", policies=peers) as a, aio.Messenger("osd.2", policies=peers) as b:
            a.add_dispatcher(Peer("osd.1"))
            b.add_dispatcher(Peer("osd.2"))
            addr_a, addr_b = a.bind(f"unix://{tmp_path}/a.sock"), b.bind(f"unix://{tmp_path}/b.sock")
            a.start()
            b.start()
            ca, cb = a.connect(addr_b, name="osd.2"), b.connect(addr_a, name="osd.1")
            ca.send(Message(WRITE, front=b"to osd.2"))
            cb.send(Message(WRITE, front=b"to osd.1"))
            for _ in range(1000):
                if got["osd.1"] and got["osd.2"]:
                    break
                await asyncio.sleep(0.005)
            assert got == {"osd.1": [b"to osd.1"], "osd.2": [b"to osd.2"]}
            assert a.connect(addr_b, name="osd.2").sync is ca.sync, "one Connection per peer name"

    asyncio.run(main())
