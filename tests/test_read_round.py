"""The read round's steady state runs in the core (messenger.compiled_read): on the
loop and in a caller that reads its own reply, a run of calls costs no Python round.
(That it behaves as the Python round does: test_dispatch and test_reliability run
over both, see conftest.read_path.)"""

from __future__ import annotations

import pytest
from conftest import address_of, served

from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy
from copyless.protocol.frames import FrameReader


class Echo(Dispatcher):
    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        msg.connection.send(msg.reply(2, data=[bytes(msg.data)]))


@pytest.mark.parametrize("transport", ["tcp", "unix", "ipc"])
def test_calls_in_the_steady_state_run_no_python_round(transport, name, tmp_path, monkeypatch):
    address = address_of(transport, tmp_path, name)
    # every Python round, the loop's (through _on_readable_python) and a caller's, is this
    python_round = Connection._Connection__on_readable_locked  # type: ignore[attr-defined]
    rounds = []

    def counted(self, fill=0):
        rounds.append(fill)
        python_round(self, fill)

    with served(Echo(), address, default_policy=Policy.lossless_client(), io_loops=1) as (_, conn, _):
        buf = bytearray(64)
        for i in range(50):  # the handshake's rounds and the first acks are Python's
            conn.call(Message(2, data=[i.to_bytes(64, "little")]), into=buf, timeout=5)
        monkeypatch.setattr(Connection, "_Connection__on_readable_locked", counted)
        for i in range(300):
            reply = conn.call(Message(2, data=[i.to_bytes(64, "little")]), into=buf, timeout=5)
            assert int.from_bytes(reply.data, "little") == i
            assert reply.data.obj is buf, "the reply's data is the posted buffer"
    assert rounds == [], f"{len(rounds)} Python rounds in 300 calls"


class Large(Dispatcher):
    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        msg.connection.send(msg.reply(2, data=[bytes(1 << 20)]))


def test_a_frame_the_compiled_round_stops_at_is_not_scanned_again(tmp_path, monkeypatch):
    """A large reply's head: the round's scan stops at it (it does not fit the read
    buffer) and hands it to the session, which takes it without a scan of its own.
    (No posted buffer: with one, a caller's round reads the reply to its end in the
    core, see test_direct_reply.py.)"""
    scans = []
    take = FrameReader.take_messages

    def counted(self, *args):
        scans.append(1)
        return take(self, *args)

    with Messenger("store.1", policies={"client": Policy.stateful_server()}) as server:
        server.add_dispatcher(Large())
        bound = server.bind(f"unix://{tmp_path}/s.sock")
        server.start()
        with Messenger("client.1", default_policy=Policy.lossless_client(), io_loops=1) as client:
            conn = client.connect(bound)
            conn.wait_ready(5)
            for _ in range(5):
                conn.call(Message(2), timeout=5)
            monkeypatch.setattr(FrameReader, "take_messages", counted)
            for _ in range(20):
                reply = conn.call(Message(2), timeout=5)
                assert len(reply.data) == 1 << 20
    assert scans == [], f"{len(scans)} Python scans in 20 calls"
