"""Peer death, hostile peers, credentials and names: the affected endpoint gets a specific
error in bounded time, nothing leaks, and other endpoints keep every message."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import time

import pytest

import copyless
from copyless import _core, _shm
from copyless._pubsub import _HELLO, _WELCOME, _recv_fds
from copyless.errors import AccessDenied, PeerLost, RemoteProtocolError, VersionMismatch

PUBLISHER = """
import sys, copyless
pub = copyless.Publisher(sys.argv[1], slots=64)
pub.wait_for_subscribers(int(sys.argv[2]), timeout=20)
for i in range(int(sys.argv[3])):
    pub.send(i.to_bytes(8, "little") * (1 + i % 3000))
print("sent", flush=True)
import time; time.sleep(60)
"""


def test_publisher_sigkill_delivers_then_peer_lost(name, child):
    c = child(PUBLISHER, name, "1", "50")
    sub = copyless.Subscriber(name, timeout=20)
    assert c.readline() == "sent"
    c.kill()
    t0 = time.monotonic()
    got = []
    with pytest.raises(PeerLost):
        while True:
            with sub.recv(timeout=5) as m:
                got.append(int.from_bytes(m.data[:8], "little"))
    assert got == list(range(50)), "everything published before the death is delivered"
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(PeerLost):
        sub.recv_nowait()
    sub.close()


def test_publisher_sigkill_wakes_a_sleeping_subscriber_within_a_second(name, child):
    c = child(PUBLISHER, name, "1", "0")
    with copyless.Subscriber(name, timeout=20) as sub:
        assert c.readline() == "sent"
        time.sleep(0.1)
        t0 = time.monotonic()
        os.kill(c.proc.pid, signal.SIGKILL)
        with pytest.raises(PeerLost):
            sub.recv(timeout=5)
        assert time.monotonic() - t0 < 1.0


def test_restarted_publisher_is_reattached(name, child):
    c = child(PUBLISHER, name, "1", "3")
    with copyless.Subscriber(name, timeout=20) as sub:
        assert c.readline() == "sent"
        c.kill()
        assert len([m for m in iter_until_lost(sub)]) == 3
        c2 = child(PUBLISHER, name, "1", "5")  # takes the name over
        sub.reattach(timeout=20)
        assert c2.readline() == "sent"
        assert [int.from_bytes(m.data[:8], "little") for m in iter_n(sub, 5)] == [0, 1, 2, 3, 4]


def iter_until_lost(sub):
    try:
        while True:
            yield sub.recv(timeout=5)
    except PeerLost:
        return


def iter_n(sub, n):
    for _ in range(n):
        yield sub.recv(timeout=5)


SUBSCRIBER_HOLDING = """
import sys, copyless
sub = copyless.Subscriber(sys.argv[1], timeout=20)
held = [sub.recv(timeout=10) for _ in range(int(sys.argv[2]))]
print("holding", flush=True)
import time; time.sleep(60)
"""


@pytest.mark.parametrize("rounds", [3])
def test_subscriber_sigkill_at_random_points_reclaims_everything(name, child, rounds):
    rng = random.Random(42)
    with copyless.Publisher(name, slots=32, queue_depth=64) as pub, copyless.Subscriber(name, timeout=5) as good:
        pub.wait_for_subscribers(1, timeout=5)
        sent = 0
        for _ in range(rounds):
            hold = rng.randint(1, 10)
            c = child(SUBSCRIBER_HOLDING, name, str(hold))
            pub.wait_for_subscribers(2, timeout=20)
            for _ in range(hold + rng.randint(0, 5)):
                pub.send(b"x" * rng.randint(1, 20000))  # some go to large segments
                sent += 1
                with good.recv(timeout=5):
                    pass
            assert c.readline() == "holding"
            assert pub.statistics().slots_in_use + pub.statistics().large_in_use > 0
            c.kill()
            deadline = time.monotonic() + 1
            while pub.subscriber_count != 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            st = pub.statistics()
            assert pub.subscriber_count == 1, "dead subscriber dropped within a second"
            assert st.slots_in_use == 0 and st.large_in_use == 0, "everything it held is reclaimed"
        assert good.statistics().messages == sent


def test_publisher_sigkill_mid_large_message_leaves_nothing(name, child):
    c = child(
        """
        import sys, copyless
        pub = copyless.Publisher(sys.argv[1])
        pub.wait_for_subscribers(1, timeout=20)
        print("go", flush=True)
        while True:
            with pub.loan(8 << 20) as buf:
                buf[:] = bytes(8 << 20)
        """,
        name,
    )
    with copyless.Subscriber(name, timeout=20) as sub:
        assert c.readline() == "go"
        time.sleep(0.2)
        c.kill()
        for m in iter_until_lost(sub):
            assert m.nbytes == 8 << 20
            m.release()
    # the leakcheck fixture asserts no mapping, fd or /dev/shm entry is left


# ------------------------------------------------------------------ hostile publisher
class FakePublisher:
    """Speaks the handshake by hand, so tests can break the protocol on purpose."""

    def __init__(self, name: str, *, version: int = _core.WIRE_VERSION, seal: bool = True) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(f"\0copyless/{name}".encode())
        self.listener.listen(1)
        self.version, self.seal = version, seal
        self.fds: list[int] = []

    def accept(self, n_slots: int = 8, slot_size: int = 64, n_large: int = 2) -> None:
        self.conn, _ = self.listener.accept()
        data, fds = _recv_fds(self.conn, 256, 4)
        assert _HELLO.unpack(data)[0] == b"CLSB"
        self.fds += fds
        self.desc_cap, rel_cap = 4, 16
        size = _core.ctl_size(self.desc_cap, rel_cap)
        arena_size = 4096 + n_slots * slot_size
        if self.seal:
            afd, self.arena = _shm.create("evil", arena_size, readonly_for_peers=True)
        else:
            afd = os.memfd_create("copyless:evil-unsealed")
            os.ftruncate(afd, arena_size)
        dfd, self.db = _shm.create("evil", 4096, readonly_for_peers=False)
        cfd, self.ctl = _shm.create("evil", size, readonly_for_peers=False)
        self.fds += [afd, dfd, cfd]
        struct.pack_into("<4I", self.ctl, 0, _core.CTL_MAGIC, _core.WIRE_VERSION, self.desc_cap, rel_cap)
        welcome = _WELCOME.pack(b"CLPB", self.version, n_slots, slot_size, n_large, os.getpid(), arena_size, size)
        socket.send_fds(self.conn, [welcome], [afd, dfd, cfd])

    def push(self, block: int, length: int, seq: int = 1, gen: int = 0) -> None:
        tail = struct.unpack_from("<Q", self.ctl, _core.CTL_DESC_TAIL)[0]
        off = _core.CTL_DESC_RING + (tail % self.desc_cap) * _core.DESC_SIZE
        struct.pack_into("<IIQQQII", self.ctl, off, block, gen, length, seq, 0, 0, 0)
        struct.pack_into("<Q", self.ctl, _core.CTL_DESC_TAIL, tail + 1)

    def close(self) -> None:
        for attr in ("arena", "db", "ctl"):  # unmap now: pytest keeps the fixture's value a while
            self.__dict__.pop(attr, None)
        for fd in self.fds:
            os.close(fd)
        getattr(self, "conn", self.listener).close()
        self.listener.close()


@pytest.fixture
def fake(name):
    made = []

    def make(**kw):
        made.append(FakePublisher(name, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def subscribe_in_thread(name):
    import concurrent.futures

    ex = concurrent.futures.ThreadPoolExecutor(1)
    fut = ex.submit(copyless.Subscriber, name, timeout=5)
    ex.shutdown(wait=False)
    return fut


@pytest.mark.parametrize(
    "block,length,what",
    [
        (999, 10, "block out of range"),
        (3, 65, "length exceeds the slot size"),
        (8, 10, "names an unknown segment"),  # a large block whose fd never came
        (3, 2**63, "length exceeds the slot size"),
    ],
)
def test_hostile_descriptor_gives_remote_protocol_error(name, fake, block, length, what):
    evil = fake()
    fut = subscribe_in_thread(name)
    evil.accept()
    sub = fut.result(5)
    try:
        evil.push(0, 10)  # a good one first
        assert sub.recv(timeout=1).nbytes == 10
        evil.push(block, length, seq=2)
        with pytest.raises(RemoteProtocolError):
            sub.recv(timeout=6)
        with pytest.raises(RemoteProtocolError):  # and it stays broken: the peer is not trusted again
            sub.recv(timeout=0.1)
    finally:
        sub.close()


def test_hostile_ring_indices(name, fake):
    evil = fake()
    fut = subscribe_in_thread(name)
    evil.accept()
    with fut.result(5) as sub:
        struct.pack_into("<Q", evil.ctl, _core.CTL_DESC_TAIL, 10**12)
        with pytest.raises(RemoteProtocolError):
            sub.recv(timeout=1)


def test_version_mismatch(name, fake):
    evil = fake(version=99)
    fut = subscribe_in_thread(name)
    evil.accept()
    with pytest.raises(VersionMismatch):
        fut.result(5)


def test_unsealed_segment_refused(name, fake):
    evil = fake(seal=False)
    fut = subscribe_in_thread(name)
    evil.accept()
    with pytest.raises(RemoteProtocolError, match="sealed"):
        fut.result(5)


# ------------------------------------------------------------------ hostile subscriber
def test_hostile_subscriber_is_dropped_others_keep_everything(name):
    with copyless.Publisher(name, slots=16) as pub, copyless.Subscriber(name, timeout=5) as good:
        evil = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        evil.connect(f"\0copyless/{name}".encode())
        evfd = os.eventfd(0)
        socket.send_fds(evil, [_HELLO.pack(b"CLSB", _core.WIRE_VERSION, os.getpid())], [evfd])
        data, fds = _recv_fds(evil, 4096, 4)
        ctl_size = _WELCOME.unpack(data)[7]
        ctl = _core.Mapping(fds[2], ctl_size, writable=True)
        # a read-only data segment really is read-only for a peer
        with pytest.raises(PermissionError):
            _core.Mapping(fds[0], 4096, writable=True)
        pub.wait_for_subscribers(2, timeout=5)
        pub.send(b"first")
        assert bytes(good.recv(timeout=1).data) == b"first"
        # release a block it never held
        rel_off = (_core.CTL_DESC_RING + 1024 * _core.DESC_SIZE + 63) // 64 * 64
        cap = struct.unpack_from("<I", ctl, 8)[0]
        rel_off = (_core.CTL_DESC_RING + cap * _core.DESC_SIZE + 63) // 64 * 64
        struct.pack_into("<II", ctl, rel_off, 7, 12345)
        struct.pack_into("<Q", ctl, _core.CTL_REL_TAIL, 1)
        for i in range(100):
            pub.send(i.to_bytes(4, "little"))
            with good.recv(timeout=1) as m:
                assert int.from_bytes(m.data, "little") == i
        st = pub.statistics()
        assert st.protocol_errors == 1 and st.subscribers == 1
        reason, _ = _recv_fds(evil, 4096, 4)
        assert reason.startswith(b"CLNO")
        del ctl
        for fd in fds + [evfd]:
            os.close(fd)
        evil.close()


def test_garbage_hello_is_refused(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as good:
        for junk in (b"", b"x" * 100, _HELLO.pack(b"XXXX", 1, 1)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(f"\0copyless/{name}".encode())
            if junk:
                s.send(junk)
            s.close()
        pub.send(b"still fine")
        assert bytes(good.recv(timeout=1).data) == b"still fine"
        time.sleep(0.1)
        assert pub.subscriber_count == 1


# ------------------------------------------------------------------ credentials and names
def test_other_user_is_refused_unless_allowed(name, child):
    code = """
        import os, sys, copyless
        os.setgid(65534); os.setuid(65534)
        try:
            with copyless.Subscriber(sys.argv[1], timeout=5, allow_uids=[0]) as sub:
                print("attached", bytes(sub.recv(timeout=5).data).decode(), flush=True)
        except copyless.AccessDenied as e:
            print("denied", flush=True)
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user")
    with copyless.Publisher(name) as pub:
        rc, out, err = child(code, name).wait()
        assert out.strip() == "denied", err
    with copyless.Publisher(name, allow_uids=[65534]) as pub:
        c = child(code, name)
        pub.wait_for_subscribers(1, timeout=10)
        pub.send(b"welcome")
        rc, out, err = c.wait()
        assert out.strip() == "attached welcome", err


def test_subscriber_refuses_publisher_of_another_user(name, child):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as another user")
    c = child(
        """
        import os, sys, time, copyless
        os.setgid(65534); os.setuid(65534)
        pub = copyless.Publisher(sys.argv[1])
        print("up", flush=True); time.sleep(30)
        """,
        name,
    )
    assert c.readline() == "up"
    with pytest.raises(AccessDenied):
        copyless.Subscriber(name, timeout=5)


def test_stale_socket_file_is_replaced(tmp_path, child):
    path = str(tmp_path / "cam.sock")
    c = child(PUBLISHER, path, "1", "1")
    with copyless.Subscriber(path, timeout=20) as sub:
        assert c.readline() == "sent"
        c.kill()
        assert len(list(iter_until_lost(sub))) == 1
    assert os.path.exists(path)  # SIGKILL left the file behind
    with copyless.Publisher(path) as pub:  # a live name is refused, a stale one replaced
        with pytest.raises(copyless.NameInUse):
            copyless.Publisher(path)
        with copyless.Subscriber(path, timeout=5) as sub:
            pub.wait_for_subscribers(1, timeout=5)
            pub.send(b"new")
            assert bytes(sub.recv(timeout=1).data) == b"new"
    assert not os.path.exists(path), "a clean close removes the file"


def test_publisher_sigkill_at_random_points(name, child):
    """Kill a busy publisher at random moments: the subscriber gets a gap-free prefix
    of the stream, then PeerLost, and nothing leaks (leakcheck fixture)."""
    rng = random.Random(7)
    code = """
        import sys, copyless
        pub = copyless.Publisher(sys.argv[1], slots=16, queue_depth=16)
        pub.wait_for_subscribers(1, timeout=20)
        print("go", flush=True)
        i = 0
        while True:
            size = (i * 7919) % 50000 + 8  # small and large messages
            with pub.loan(size) as buf:
                buf[:8] = i.to_bytes(8, "little")
            i += 1
    """
    for _ in range(4):
        c = child(code, name)
        with copyless.Subscriber(name, timeout=20) as sub:
            assert c.readline() == "go"
            time.sleep(rng.uniform(0.0, 0.2))
            c.kill()
            n = 0
            for m in iter_until_lost(sub):
                assert int.from_bytes(m.data[:8], "little") == n and m.seq == n + 1
                m.release()
                n += 1
        c.close()
