"""The ipc:// transport: addresses, the setup exchange and its errors, access control,
and faults a FaultProxy cannot make (it is a tcp/unix proxy and cannot sit inside shared
memory): a peer SIGKILLed in the middle of a message, a hostile peer that writes a bad
index into its own segment, a peer that speaks another setup version."""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import threading
import time

import pytest

from copyless import _shm
from copyless._core import IPC_RING, IPC_TX_HEAD
from copyless.errors import (
    AccessDenied,
    ConfigurationError,
    NameInUse,
    PeerLost,
    RemoteProtocolError,
    VersionMismatch,
)
from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy
from copyless.transports import IpcStream, connect, listen, parse_address
from copyless.transports._ipc import (
    DEFAULT_RING,
    HELLO,
    REFUSE,
    REFUSE_PROTOCOL,
    REFUSE_VERSION,
    SETUP,
    SETUP_SIZE,
    WELCOME,
    IpcAddress,
    _new_segment,
    _setup_record,
)


def wait(stream, timeout: float = 5) -> None:
    assert select.select([stream.fileno()], [], [], timeout)[0], "timed out"


def setup_pair(address: str):
    lst = listen(address)
    c = connect(address)
    wait(lst)
    s = lst.accept()
    assert isinstance(s, IpcStream) and isinstance(c, IpcStream)
    while not s.handshake():
        wait(s)
    while not c.handshake():
        wait(c)
    return lst, c, s


# ------------------------------------------------------------------ addresses
def test_addresses_and_their_options():
    a = IpcAddress("ipc://store.1?ring=4MiB&spin=20us")
    assert (a.name, a.ring, a.spin) == ("store.1", 4 << 20, pytest.approx(20e-6))
    b = IpcAddress("ipc://store.1")
    assert b.ring == DEFAULT_RING and IpcAddress("ipc://x?spin=0").spin == 0
    assert a.sockaddr() == b.sockaddr() == f"\0copyless-ipc/{os.geteuid()}/store.1".encode()
    assert parse_address("ipc://store.1") == (socket.AF_UNIX, a.sockaddr())


@pytest.mark.parametrize(
    "bad",
    [
        "ipc://",
        "ipc://a/b",
        "ipc://x?ring=3000",
        "ipc://x?ring=2GiB",
        "ipc://x?ring=1KiB",
        "ipc://x?spin=fast",
        "ipc://x?colour=red",
        "ipc://" + "n" * 81,
    ],
)
def test_bad_ipc_addresses(bad):
    with pytest.raises(ConfigurationError):
        listen(bad)


def test_tls_over_ipc_is_refused(name):
    ctx = ssl.create_default_context()
    with pytest.raises(ConfigurationError):
        listen(f"ipc://{name}", tls=ctx)
    with pytest.raises(ConfigurationError):
        connect(f"ipc://{name}", tls=ctx)


def test_a_name_has_one_live_listener_and_leaves_nothing_behind(name):
    lst = listen(f"ipc://{name}")
    with pytest.raises(NameInUse):
        listen(f"ipc://{name}")
    lst.close()
    assert not [n for n in os.listdir("/dev/shm") if name in n]
    listen(f"ipc://{name}").close()  # the kernel freed the abstract name


def test_connect_to_nobody_fails_at_once(name):
    with pytest.raises(ConnectionRefusedError):
        connect(f"ipc://{name}")


def test_each_side_chooses_its_own_ring(name):
    lst, c, s = setup_pair(f"ipc://{name}?ring=64KiB")
    c2 = None
    try:
        assert c.channel is not None and s.channel is not None
        assert c.channel.capacity == s.channel.capacity == 64 << 10
        lst2 = listen(f"ipc://{name}-2?ring=8KiB")
        c2 = connect(f"ipc://{name}-2?ring=1MiB")
        wait(lst2)
        s2 = lst2.accept()
        assert s2 is not None
        while not s2.handshake():
            wait(s2)
        while not c2.handshake():
            wait(c2)
        assert c2.channel is not None and s2.channel is not None
        assert (c2.channel.capacity, s2.channel.capacity) == (1 << 20, 8 << 10)
        s2.close()
        lst2.close()
    finally:
        for x in (c, s, lst, c2):
            if x is not None:
                x.close()


# ------------------------------------------------------------------ the setup exchange
def raw_client(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(IpcAddress(address).sockaddr())
    return sock


def server_side(lst):
    wait(lst)
    s = lst.accept()
    assert s is not None
    return s


def recv_record(sock: socket.socket) -> tuple:
    data = b""
    while len(data) < SETUP_SIZE:
        chunk = sock.recv(SETUP_SIZE - len(data))
        assert chunk, "EOF before a whole record"
        data += chunk
    return SETUP.unpack_from(data) + (data[SETUP.size :].rstrip(b"\0").decode(),)


@pytest.mark.parametrize(
    "record, error, code",
    [
        (_setup_record(b"HTTP", size=IPC_RING + 4096, ring=4096), RemoteProtocolError, REFUSE_PROTOCOL),
        (b"\x01" * SETUP_SIZE, RemoteProtocolError, REFUSE_PROTOCOL),
        (SETUP.pack(HELLO, 99, 1, 0, IPC_RING + 4096, 4096, 0).ljust(SETUP_SIZE, b"\0"), VersionMismatch, 1),
        (_setup_record(HELLO, size=IPC_RING + 4096, ring=4096), RemoteProtocolError, REFUSE_PROTOCOL),  # no fd
    ],
    ids=["magic", "garbage", "version", "no-segment"],
)
def test_a_bad_hello_is_refused_with_a_specific_error(name, record, error, code):
    lst = listen(f"ipc://{name}")
    sock = raw_client(f"ipc://{name}")
    try:
        sock.sendall(record)
        s = server_side(lst)
        with pytest.raises(error):
            while not s.handshake():
                wait(s)
        s.close()
        magic, _version, _pid, got_code, _size, _ring, _flags, reason = recv_record(sock)
        assert (magic, got_code) == (REFUSE, code) and reason, "the client is told why"
    finally:
        sock.close()
        lst.close()


def test_a_hello_whose_segment_is_smaller_than_announced_is_refused(name):
    lst = listen(f"ipc://{name}")
    sock = raw_client(f"ipc://{name}")
    fd, seg = _new_segment("small", 4096)
    try:
        socket.send_fds(sock, [_setup_record(HELLO, size=IPC_RING + (1 << 20), ring=1 << 20)], [fd])
        s = server_side(lst)
        with pytest.raises(RemoteProtocolError, match="bytes"):
            while not s.handshake():
                wait(s)
        s.close()
        assert recv_record(sock)[0] == REFUSE
    finally:
        os.close(fd)
        sock.close()
        lst.close()


def fake_server(name: str, answer) -> tuple[socket.socket, threading.Thread]:
    """Listens on the name, reads the client's hello and sends `answer(fds)` back."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(IpcAddress(f"ipc://{name}").sockaddr())
    lsock.listen(1)

    def run() -> None:
        conn, _ = lsock.accept()
        with conn:
            _msg, fds, _flags, _addr = socket.recv_fds(conn, SETUP_SIZE, 2)
            for fd in fds:
                os.close(fd)
            record, fds_out = answer()
            try:
                if fds_out:
                    socket.send_fds(conn, [record], fds_out)
                else:
                    conn.sendall(record)
            finally:
                for fd in fds_out:
                    os.close(fd)
            conn.recv(1)  # until the client hangs up

    t = threading.Thread(target=run)
    t.start()
    return lsock, t


def _welcome(magic=WELCOME, version=1, ring=4096, size=None, seg_ring=4096):
    def answer():
        fd, _seg = _new_segment("fake", seg_ring)
        rec = SETUP.pack(magic, version, 1, 0, IPC_RING + ring if size is None else size, ring, 0)
        return rec.ljust(SETUP_SIZE, b"\0"), [fd]

    return answer


@pytest.mark.parametrize(
    "answer, error, match",
    [
        (_welcome(magic=b"NOPE"), RemoteProtocolError, "magic"),
        (_welcome(version=2), VersionMismatch, "version"),
        (_welcome(ring=1 << 20), RemoteProtocolError, "bytes"),  # announces more than it sent
        (_welcome(ring=3000), RemoteProtocolError, "ring"),
        (lambda: (_setup_record(REFUSE, REFUSE_VERSION, reason="too new"), []), VersionMismatch, "too new"),
    ],
    ids=["magic", "version", "short-segment", "ring", "refused"],
)
def test_a_bad_welcome_is_a_specific_error_for_the_client(name, answer, error, match):
    lsock, t = fake_server(name, answer)
    c = connect(f"ipc://{name}")
    try:
        with pytest.raises(error, match=match):
            while not c.handshake():
                wait(c)
    finally:
        c.close()
        t.join(5)
        lsock.close()


def test_the_server_dying_during_setup_is_peer_lost(name):
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(IpcAddress(f"ipc://{name}").sockaddr())
    lsock.listen(1)
    c = connect(f"ipc://{name}")
    try:
        conn, _ = lsock.accept()
        _msg, fds, _f, _a = socket.recv_fds(conn, SETUP_SIZE, 2)
        for fd in fds:
            os.close(fd)
        conn.close()
        with pytest.raises(PeerLost):
            while not c.handshake():
                wait(c)
    finally:
        c.close()
        lsock.close()


def test_another_user_is_refused_on_both_sides(name, monkeypatch):
    lst = listen(f"ipc://{name}")
    c = connect(f"ipc://{name}")
    try:
        s = server_side(lst)
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 4242)  # as if the client were someone else
        with pytest.raises(AccessDenied, match="uid"):
            s.handshake()
        monkeypatch.undo()
        s.close()
        with pytest.raises(AccessDenied, match="refused us"):
            while not c.handshake():
                wait(c)
    finally:
        c.close()
        lst.close()


def test_a_client_does_not_talk_to_a_listener_of_another_user(name, monkeypatch):
    lst = listen(f"ipc://{name}")
    try:
        sockaddr = IpcAddress(f"ipc://{name}").sockaddr()
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 4242)
        monkeypatch.setattr(IpcAddress, "sockaddr", lambda self, uid=None: sockaddr)
        c = connect(f"ipc://{name}")
        monkeypatch.undo()
        try:
            wait(c)  # readable at once: nothing was sent to the squatter
            with pytest.raises(AccessDenied):
                c.handshake()
        finally:
            c.close()
        s = lst.accept()
        assert s is not None
        wait(s)
        with pytest.raises(PeerLost):  # the client hung up without a hello
            s.handshake()
        s.close()
    finally:
        lst.close()


# ------------------------------------------------------------------ faults, through the Messenger
READ, REPLY, WRITE = 1, 2, 3


class Watch(Dispatcher):
    def __init__(self) -> None:
        self.faults: list[BaseException] = []
        self.got: list[bytes] = []
        self.cond = threading.Condition()

    def can_fast_dispatch(self, msg: Message) -> bool:
        return True

    def fast_dispatch(self, msg: Message) -> None:
        if msg.type == READ:
            assert msg.connection is not None
            msg.connection.send(msg.reply(REPLY, front=bytes(msg.front)))
        else:
            with self.cond:
                self.got.append(bytes(msg.front))
                self.cond.notify_all()

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        with self.cond:
            self.faults.append(error)
            self.cond.notify_all()

    def wait_fault(self, timeout: float = 5) -> BaseException:
        with self.cond:
            assert self.cond.wait_for(lambda: self.faults, timeout), "no fault reported"
            return self.faults[0]


@pytest.fixture
def live(name):
    watch = Watch()
    srv = Messenger("store.1", policies={"client": Policy.stateful_server()}, handshake_timeout=2)
    srv.add_dispatcher(watch)
    addr = srv.bind(f"ipc://{name}")
    srv.start()
    client = Messenger("client.1")
    healthy = client.connect(addr)
    healthy.wait_ready(5)
    yield srv, watch, addr, healthy
    client.shutdown()
    srv.shutdown()


def test_a_peer_killed_in_the_middle_of_a_message_is_peer_lost(live, child):
    """The child writes part of a large message into its ring and is SIGKILLed: the server's
    connection ends with PeerLost (not a clean close) and the others carry on."""
    srv, watch, addr, healthy = live
    kid = child(
        """
        import os, signal, sys, time
        from copyless.messenger import Messenger, Message
        m = Messenger("client.9")
        conn = m.connect(sys.argv[1])
        conn.wait_ready(5)
        conn.send(Message(3, front=b"whole"))
        time.sleep(0.2)
        # 64 MiB through a 256 KiB ring: the first part is in the ring when we die
        conn.send(Message(3, front=b"cut", data=[bytes(64 << 20)]))
        print("sent", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        addr,
    )
    t0 = time.monotonic()
    error = watch.wait_fault(10)
    assert isinstance(error, PeerLost) and "middle of a frame" in str(error), error
    assert time.monotonic() - t0 < 10
    assert kid.wait()[0] == -9
    assert watch.got == [b"whole"], "the cut message was never delivered, even in part"
    r = healthy.call(Message(READ, front=b"still here"), timeout=5)
    assert bytes(r.front) == b"still here" and healthy.last_error is None
    dead = [c for c in srv._connections if c.peer_name == "client.9"]
    assert [c._stream for c in dead] == [None], "a stateful server keeps the session, in standby, with no transport"


def test_a_server_killed_while_replying_fails_the_call(name, child):
    kid = child(
        """
        import os, signal, sys, time
        from copyless.messenger import Messenger, Message, Dispatcher, Policy
        class Die(Dispatcher):
            def can_fast_dispatch(self, msg): return True
            def fast_dispatch(self, msg):
                msg.connection.send(msg.reply(2, data=[bytes(64 << 20)]))  # most waits in the queue
                os.kill(os.getpid(), signal.SIGKILL)
        m = Messenger("store.1", policies={"client": Policy.stateful_server()})
        m.add_dispatcher(Die())
        m.bind(sys.argv[1]); m.start()
        print("ready", flush=True)
        time.sleep(60)
        """,
        f"ipc://{name}",
    )
    assert kid.readline() == "ready"
    with Messenger("client.7", default_policy=Policy.lossy_client()) as client:
        conn = client.connect(f"ipc://{name}")
        conn.wait_ready(5)
        t0 = time.monotonic()
        with pytest.raises(PeerLost):
            conn.call(Message(READ), into=bytearray(64 << 20), timeout=10)
        assert time.monotonic() - t0 < 5
        assert isinstance(conn.last_error, PeerLost) and "middle of a frame" in str(conn.last_error)


def test_a_hostile_head_index_is_a_protocol_error_on_that_connection_only(live):
    srv, watch, addr, healthy = live
    evil = connect(addr)
    try:
        while not evil.handshake():
            wait(evil)
        assert evil.channel is not None and evil.channel.segment is not None
        seg = evil.channel.segment
        # a hostile client claims it wrote far more than its ring holds, and rings the bell
        struct.pack_into("<Q", memoryview(seg), IPC_TX_HEAD, 1 << 40)
        evil.sock.send(b"\x01")
        error = watch.wait_fault(5)
        assert isinstance(error, RemoteProtocolError) and "head index" in str(error), error
        buf, ended = memoryview(bytearray(4096)), False
        for _ in range(100):  # what the server sent before (its banner), then the end
            wait(evil)
            try:
                if evil.recv_into(buf) == 0:
                    ended = True
                    break
            except BlockingIOError:
                pass
        assert ended, "the server hung up on the hostile client"
        del seg
    finally:
        evil.close()
    r = healthy.call(Message(READ, front=b"unaffected"), timeout=5)
    assert bytes(r.front) == b"unaffected" and healthy.last_error is None


def test_a_wrong_setup_version_reaches_the_messenger_as_a_fault(live):
    srv, watch, addr, healthy = live
    sock = raw_client(addr)
    try:
        fd, _seg = _new_segment("old", 4096)
        try:
            rec = SETUP.pack(HELLO, 7, 1, 0, IPC_RING + 4096, 4096, 0).ljust(SETUP_SIZE, b"\0")
            socket.send_fds(sock, [rec], [fd])
        finally:
            os.close(fd)
        assert recv_record(sock)[3] == REFUSE_VERSION
        assert isinstance(watch.wait_fault(5), VersionMismatch)
    finally:
        sock.close()
    assert bytes(healthy.call(Message(READ, front=b"ok"), timeout=5).front) == b"ok"


def test_map_peer_refuses_an_unsealed_segment():
    fd = os.memfd_create("copyless:unsealed", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, IPC_RING + 4096)
        with pytest.raises(RemoteProtocolError, match="sealed"):
            _shm.map_peer(fd, IPC_RING + 4096, writable=False)
    finally:
        os.close(fd)


def test_a_large_reply_is_copied_once_from_shared_memory_into_the_posted_buffer(name):
    """Both ends in this process, so tracemalloc sees every Python allocation on the way: the
    8 MiB reply goes from the server's buffer into its ring and from the ring into the
    caller's buffer, and no Python object on the way holds a copy of it."""
    import tracemalloc

    source = memoryview(bytes(range(256)) * (32 << 10))  # 8 MiB

    class Serve(Dispatcher):
        def can_fast_dispatch(self, msg: Message) -> bool:
            return True

        def fast_dispatch(self, msg: Message) -> None:
            assert msg.connection is not None
            msg.connection.send(msg.reply(REPLY, data=[source]))

    srv = Messenger("store.1", policies={"client": Policy.stateful_server()})
    srv.add_dispatcher(Serve())
    addr = srv.bind(f"ipc://{name}")
    srv.start()
    try:
        with Messenger("client.7") as client:
            conn = client.connect(addr)
            conn.wait_ready(5)
            buf = bytearray(len(source))
            conn.call(Message(READ), into=buf, timeout=10)  # warm-up
            buf[:] = bytes(len(buf))
            assert conn._machine is not None
            copied = conn._machine.reader.copied
            tracemalloc.start()
            try:
                reply = conn.call(Message(READ), into=buf, timeout=10)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert reply.data.obj is buf and buf == source
            assert peak < 1 << 20, f"{peak} bytes allocated in Python for an 8 MiB reply"
            r = conn._machine.reader
            assert r.copied - copied < r.stream_prefetch, "only what a bulk read had fetched"
    finally:
        srv.shutdown()
