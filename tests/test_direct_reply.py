"""A large reply read straight into the buffer its call posted is read to its end by the
caller's compiled round (the core's direct_reply): the rest of the data into the buffer
and the frame's tail in scatter reads, checked and handed out with no Python reader.
When the stream stalls, ends or brings something that fails a check, the Python reader
goes on from exactly there (FrameReader._resume_direct) with its precise errors.  These
tests check both halves over tcp (data crc on by default) and unix (off)."""

from __future__ import annotations

import contextlib
import os

import pytest
from conftest import address_of, served

from copyless.messenger import Dispatcher, Message, Policy
from copyless.protocol.frames import FrameReader

SOURCE = memoryview(os.urandom(3 << 20))  # replies are slices of it: each call's are different bytes


class Slices(Dispatcher):
    """Replies with SOURCE[off:off + n], (off, n) from the request's front."""

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        off, n = int.from_bytes(msg.front[:4], "little"), int.from_bytes(msg.front[4:8], "little")
        msg.connection.send(msg.reply(2, data=[SOURCE[off : off + n]]))


def ask(conn, i: int, n: int, buf: bytearray, timeout: float = 10) -> None:
    off = (i * 7919) % (1 << 20)
    reply = conn.call(Message(2, front=off.to_bytes(4, "little") + n.to_bytes(4, "little")), into=buf, timeout=timeout)
    assert reply.data.obj is buf, "the reply's data is the posted buffer"
    assert len(reply.data) == n and reply.data == SOURCE[off : off + n], f"call {i}: wrong bytes"


@contextlib.contextmanager
def session(tmp_path, transport, proxied=False):
    """(client Messenger, its Connection, the FaultProxy between them or None) to a
    server that replies with slices of SOURCE.  Through a proxy, which stands for a wire
    that may damage bytes, both ends put the data crc on (loopback TCP has none by
    default: transports.on_this_host)."""
    crc = True if proxied else None
    address = address_of(transport, tmp_path)
    policy = Policy.lossless_client()
    with served(Slices(), address, data_crc=crc, proxied=proxied, default_policy=policy, io_loops=1) as got:
        yield got
        client, conn, _ = got
        assert client._calls == {} and not conn._leased, "a call was left posted, or the stream leased"


def counting(monkeypatch):
    """Count the Python reader's frames and the core's hand-overs to it."""
    seen = {"slow": 0, "resumed": []}
    slow, resume = FrameReader._slow, FrameReader._resume_direct

    def counted_slow(self):
        seen["slow"] += 1
        return slow(self)

    def counted_resume(self, pre, header, front, target, have, tcrc, chain):
        seen["resumed"].append((have, len(target)))
        return resume(self, pre, header, front, target, have, tcrc, chain)

    monkeypatch.setattr(FrameReader, "_slow", counted_slow)
    monkeypatch.setattr(FrameReader, "_resume_direct", counted_resume)
    return seen


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_large_replies_are_read_to_their_end_in_the_core(transport, tmp_path, monkeypatch):
    with session(tmp_path, transport) as (client, conn, _):
        buf = bytearray(2 << 20)
        for i in range(3):
            ask(conn, i, 1 << 20, buf)
        reader = conn._machine.reader
        copied = reader.copied
        seen = counting(monkeypatch)
        sizes = [1 << 20, 64 << 10, 5000, (1 << 20) + 3, 2 << 20, 300_000]
        for i in range(40):
            ask(conn, i, sizes[i % len(sizes)], buf)
        assert seen == {"slow": 0, "resumed": []}, "the Python reader took part"
        # what the head read had of the data was copied out of the read buffer: no more
        assert 0 < reader.copied - copied <= 40 * 4096


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_stalled_reply_is_finished_by_the_python_reader(transport, tmp_path, monkeypatch):
    """Through a proxy that holds each chunk back 10 ms: the core's read stalls in the
    middle of the data (it waits 5 ms), and the Python reader goes on from there."""
    with session(tmp_path, transport, proxied=True) as (client, conn, proxy):
        buf = bytearray(1 << 20)
        seen = counting(monkeypatch)
        proxy.delay(0.01)
        for i in range(5):
            ask(conn, i, 1 << 20, buf)
        assert any(have < n for have, n in seen["resumed"]), seen["resumed"]


def test_a_damaged_reply_fails_its_crc_and_is_sent_again(tmp_path, monkeypatch):
    """With the data crc (a proxy's session asks for it): bytes flipped in a reply's data fail it (the core hands
    the whole frame to the Python reader, which raises BadChecksum); the connection is
    reset, the lossless session replays, and every call gets the right bytes."""
    with session(tmp_path, "tcp", proxied=True) as (client, conn, proxy):
        buf = bytearray(1 << 20)
        ask(conn, 0, 1 << 20, buf)
        seen = counting(monkeypatch)
        proxy.corrupt(0.02, seed=3)
        for i in range(30):
            ask(conn, i, 1 << 20, buf, timeout=30)
        proxy.corrupt(0)
        assert proxy.statistics().chunks_corrupted > 0
        assert any(have == n for have, n in seen["resumed"]), "no whole reply failed its check in the core"


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_reply_cut_in_the_middle_is_sent_again(transport, tmp_path):
    with session(tmp_path, transport, proxied=True) as (client, conn, proxy):
        buf = bytearray(1 << 20)
        ask(conn, 0, 1 << 20, buf)
        for i in range(1, 4):
            proxy.cut_after(300_000 * i, "downstream")  # in the middle of the next reply's data
            ask(conn, i, 1 << 20, buf, timeout=30)
        assert proxy.statistics().connections_cut == 3
