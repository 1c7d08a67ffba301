"""TLS over tcp:// with the standard ssl module: the same session protocol inside,
direct receive and order kept, and certificate or protocol mismatches as specific
errors for that connection only."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time

import pytest

from copyless.messenger import Connection, Dispatcher, Message, Messenger, Policy
from copyless.transports import TLSStream

READ, REPLY, WRITE = 1, 2, 3


def make_cert(d, name: str) -> tuple[str, str]:
    key, cert = str(d / f"{name}.key"), str(d / f"{name}.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    return make_cert(d, "server"), make_cert(d, "stranger")


def server_ctx(cert_key) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_key)
    return ctx


def client_ctx(ca: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    return ctx


class Store(Dispatcher):
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.got = threading.Event()
        self.expect = 0
        self.faults: list[BaseException] = []
        self.accepted: list[Connection] = []

    def can_fast_dispatch(self, msg: Message) -> bool:
        return msg.type == READ

    def fast_dispatch(self, msg: Message) -> None:
        n = int.from_bytes(msg.front, "little")
        assert msg.connection is not None
        msg.connection.send(msg.reply(REPLY, data=[bytes([9]) * n]))

    def dispatch(self, msg: Message) -> None:
        self.writes.append(bytes(msg.front))
        if len(self.writes) >= self.expect:
            self.got.set()

    def handle_fault(self, conn: Connection, error: BaseException) -> None:
        self.faults.append(error)

    def handle_accept(self, conn: Connection) -> None:
        self.accepted.append(conn)


@pytest.fixture
def tls_server(certs):
    store = Store()
    m = Messenger("store.1", policies={"client": Policy.stateful_server()}, tls_server=server_ctx(certs[0]))
    m.add_dispatcher(store)
    addr = m.bind("tcp://127.0.0.1:0")
    m.start()
    yield m, store, addr
    m.shutdown()


def test_calls_and_ordered_sends_over_tls_with_direct_receive(tls_server, certs):
    _, store, addr = tls_server
    store.expect = 500
    with Messenger("client.7", tls_client=client_ctx(certs[0][0])) as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        assert isinstance(conn._stream, TLSStream)
        assert conn._machine is not None and not conn._machine.data_crc, "TLS's MAC checks the data already"
        for n in (1, 5000, 1 << 20):
            buf = bytearray(n)
            r = conn.call(Message(READ, front=n.to_bytes(8, "little")), into=buf, timeout=10)
            assert r.data.obj is buf and bytes(buf) == bytes([9]) * n
        for i in range(500):
            conn.send(Message(WRITE, front=b"%d" % i, data=[bytes(3000)]))
        assert store.got.wait(10)
    assert store.writes == [b"%d" % i for i in range(500)]
    assert not store.faults


def test_lossless_replay_across_cuts_over_tls(tls_server, certs):
    _, store, addr = tls_server
    n = 1500
    store.expect = n
    with Messenger("client.7", tls_client=client_ctx(certs[0][0])) as client:
        conn = client.connect(addr)
        conn.wait_ready(5)
        for i in range(n):
            conn.send(Message(WRITE, front=b"%d" % i))
            if i % 500 == 250:
                (srv,) = store.accepted
                srv.loop.call_soon_threadsafe(lambda s=srv: s._stream and s._stream.sock.shutdown(socket.SHUT_RDWR))
        assert store.got.wait(20), len(store.writes)
    assert store.writes == [b"%d" % i for i in range(n)], "exactly once, in order"


def test_an_untrusted_server_certificate_is_a_specific_error(tls_server, certs):
    _, store, addr = tls_server
    faults: list[BaseException] = []

    class Note(Dispatcher):
        def handle_fault(self, conn: Connection, error: BaseException) -> None:
            faults.append(error)

    client = Messenger("client.7", tls_client=client_ctx(certs[1][0]), default_policy=Policy.lossy_client())
    client.add_dispatcher(Note())
    try:
        conn = client.connect(addr)
        end = time.monotonic() + 5
        while not (faults and store.faults) and time.monotonic() < end:
            time.sleep(0.01)
        assert isinstance(faults[0], ssl.SSLCertVerificationError)
        assert isinstance(conn.last_error, ssl.SSLCertVerificationError)
        assert isinstance(store.faults[0], ssl.SSLError), "the server names it too"
    finally:
        client.shutdown()


def test_a_plain_client_to_a_tls_server_fails_that_connection_only(tls_server, certs):
    _, store, addr = tls_server
    with Messenger("client.good", tls_client=client_ctx(certs[0][0])) as good:
        ok = good.connect(addr)
        ok.wait_ready(5)
        with Messenger("client.plain", default_policy=Policy.lossy_client()) as plain:
            bad = plain.connect(addr)
            end = time.monotonic() + 5
            while bad.last_error is None and time.monotonic() < end:
                time.sleep(0.01)
            assert bad.last_error is not None
        r = ok.call(Message(READ, front=(3).to_bytes(8, "little")), timeout=5)
        assert bytes(r.data) == bytes([9]) * 3
    assert any(isinstance(e, ssl.SSLError) for e in store.faults)


def test_tls_is_refused_for_unix_sockets(tmp_path, certs):
    from copyless.errors import ConfigurationError
    from copyless.transports import listen

    with pytest.raises(ConfigurationError):
        listen(f"unix://{tmp_path}/x.sock", tls=server_ctx(certs[0]))
