"""Publisher/Subscriber: correctness, zero copy, backpressure policies, across real processes."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np
import pytest

import copyless
from copyless import PeerClosed, Timeout, WouldBlock


def mapping_of(address: int) -> tuple[int, int, str]:
    """(start, inode, path) of the mapping that holds address in this process."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= address < hi:
                return lo, int(parts[4]), " ".join(parts[5:])
    raise AssertionError(f"{address:#x} is not mapped")


def view_address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def test_send_recv_header_and_readonly(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        seq = pub.send(b"hello", type=7, tag=2**63 + 5)
        msg = sub.recv(timeout=1)
        assert (bytes(msg.data), msg.type, msg.tag, msg.seq, msg.nbytes, len(msg)) == (
            b"hello",
            7,
            2**63 + 5,
            seq,
            5,
            5,
        )
        assert msg.data.readonly
        with pytest.raises(TypeError):
            msg.data[0] = 1
        msg.release()
        with pytest.raises(copyless.ClosedError):
            msg.data  # noqa: B018


def test_received_view_points_into_the_publishers_segment(name):
    """Zero copy on receive, and on send with a loan: the subscriber's view and the
    publisher's loan are the same bytes of the same memfd."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for size in (64, pub.slot_size, pub.slot_size + 1, 3 << 20):
            loan = pub.loan(size)
            loan.data[:] = b"x" * size
            loan_addr = view_address(loan.data)
            p_start, p_inode, p_path = mapping_of(loan_addr)
            loan.publish()
            with sub.recv(timeout=1) as msg:
                addr = view_address(msg.data)
                s_start, s_inode, s_path = mapping_of(addr)
                assert s_path.startswith("/memfd:copyless:") and s_inode == p_inode
                assert addr - s_start == loan_addr - p_start, "same offset in the same segment"
                assert msg._address == addr


def test_loan_performs_no_copy_and_send_one(name):
    """Count copies by watching the bytes: what is written through a loan after
    allocation is what arrives (no intermediate buffer), while send() copies once."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        src = bytearray(b"a" * 1000)
        pub.send(src)
        src[:] = b"b" * 1000  # changing the source after send does not change the message: one copy made
        with sub.recv(timeout=1) as msg:
            assert bytes(msg.data) == b"a" * 1000
        loan = pub.loan(1000)
        view = loan.data
        view[:] = b"c" * 1000
        loan.publish()
        with sub.recv(timeout=1) as msg:
            assert bytes(msg.data) == b"c" * 1000


def test_a_loan_view_is_released_once_published_or_discarded(name):
    """A write through a loan's view after its block ends cannot reach the slot, which the
    subscriber now reads (or the pool has back): the view is released."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for size in (64, 1 << 20):
            with pub.loan(size) as buf:
                buf[:2] = b"ok"
            with pytest.raises(ValueError, match="released"):
                buf[:2] = b"no"
            with sub.recv(timeout=1) as msg:
                assert bytes(msg.data[:2]) == b"ok"
            loan = pub.loan(size)
            view = loan.data
            loan.discard()
            with pytest.raises(ValueError, match="released"):
                view[0]  # noqa: B018
        assert pub.statistics().slots_in_use == 0


def test_loan_exception_discards(name):
    with copyless.Publisher(name, slots=4) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for _ in range(10):  # more than the pool: discarded loans return their slot
            with pytest.raises(RuntimeError), pub.loan(10) as buf:
                buf[:2] = b"no"
                raise RuntimeError
        with pytest.raises(WouldBlock):
            sub.recv_nowait()
        assert pub.statistics().slots_in_use == 0


@pytest.mark.parametrize("size", [0, 1, 63, 8192, 8193, 1 << 20, 16 << 20])
def test_sizes_roundtrip(name, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(data)
        with sub.recv(timeout=2) as msg:
            assert msg.nbytes == size
            assert zlib.crc32(msg.data) == zlib.crc32(data)


def test_one_gib_message(name):
    size = 1 << 30
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        with pub.loan(size) as buf:
            arr = np.frombuffer(buf, dtype=np.uint64)
            arr[:] = np.arange(size // 8, dtype=np.uint64)
            del arr
        with sub.recv(timeout=10) as msg:
            got = np.frombuffer(msg.data, dtype=np.uint64)
            assert got.size == size // 8 and got[0] == 0 and got[-1] == size // 8 - 1
            assert int(got[:: 4096 // 8].sum()) == int(np.arange(size // 8, dtype=np.uint64)[:: 4096 // 8].sum())
            del got


def test_strided_source(name):
    """A strided source (no contiguous buffer) is compacted once, then sent like any other,
    small or large, with its type and tag."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for a in (np.arange(100, dtype=np.int32)[::2], np.arange(1 << 20, dtype=np.int32)[::2]):
            pub.send(a, type=3, tag=a.size, timeout=1)
            with sub.recv(timeout=1) as msg:
                assert np.array_equal(np.frombuffer(msg.data, dtype=np.int32), a)
                assert (msg.type, msg.tag) == (3, a.size)
        assert pub.statistics().loans == 0


def test_out_of_order_release_and_slot_reuse(name):
    with copyless.Publisher(name, slots=8) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for i in range(8):
            pub.send(bytes([i]) * 10)
        msgs = [sub.recv(timeout=1) for _ in range(8)]
        with pytest.raises(WouldBlock):
            pub.send(b"x", timeout=0)  # every slot is held
        for m in msgs[1::2]:  # release out of order, keep the evens
            m.release()
        for i in range(4):
            pub.send(bytes([100 + i]) * 10, timeout=1)
        for m in msgs[0::2]:
            assert bytes(m.data) == bytes([m.seq - 1]) * 10  # held messages were not overwritten
            m.release()
        assert [bytes(sub.recv(timeout=1).data)[0] for _ in range(4)] == [100, 101, 102, 103]


def test_slow_subscriber_does_not_block_others_within_budget(name):
    with copyless.Publisher(name, slots=64, queue_depth=16) as pub:
        with copyless.Subscriber(name, timeout=5) as slow, copyless.Subscriber(name, timeout=5) as fast:
            pub.wait_for_subscribers(2, timeout=5)
            held = []
            for i in range(14):
                pub.send(i.to_bytes(4, "little"), timeout=1)
                held.append(slow.recv(timeout=1))  # slow holds everything it got
                with fast.recv(timeout=1) as m:
                    assert int.from_bytes(m.data, "little") == i
            assert pub.statistics().slots_in_use == 14
            del held


def test_block_policy_times_out_and_loses_nothing(name):
    with copyless.Publisher(name, queue_depth=4, send_timeout=0.2) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for i in range(4):
            pub.send(bytes([i]))
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            pub.send(b"late")
        assert 0.15 < time.monotonic() - t0 < 2
        assert [bytes(sub.recv(timeout=1).data) for _ in range(4)] == [b"\0", b"\1", b"\2", b"\3"]
        pub.send(b"after")
        assert bytes(sub.recv(timeout=1).data) == b"after"


def test_block_policy_waits_for_the_subscriber(name, child):
    c = child(
        """
        import sys, time, copyless
        sub = copyless.Subscriber(sys.argv[1], timeout=10)
        print("ready", flush=True)
        time.sleep(0.3)
        n = 0
        for msg in sub:
            with msg:
                assert int.from_bytes(msg.data, "little") == n
                n += 1
        print(n, sub.statistics().gaps, flush=True)
        """,
        name,
    )
    with copyless.Publisher(name, queue_depth=8, slots=16) as pub:
        pub.wait_for_subscribers(1, timeout=10)
        for i in range(2000):
            pub.send(i.to_bytes(4, "little"))
        st = pub.statistics()
    rc, out, err = c.wait()
    assert rc == 0, err
    assert out.split()[-2:] == ["2000", "0"]
    assert st.blocked > 0


def test_raise_policy(name):
    with copyless.Publisher(name, queue_depth=2, on_full="raise") as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(b"1")
        pub.send(b"2")
        with pytest.raises(WouldBlock):
            pub.send(b"3")
        with pytest.raises(WouldBlock), pub.loan(3) as buf:
            buf[:] = b"abc"
        assert pub.statistics().would_block == 2
        assert [bytes(sub.recv(timeout=1).data) for _ in range(2)] == [b"1", b"2"]
        assert pub.statistics().slots_in_use == 0


def test_overwrite_policy_drops_oldest_and_reports_gaps(name):
    with (
        copyless.Publisher(name, queue_depth=4, on_full="overwrite") as pub,
        copyless.Subscriber(name, timeout=5) as sub,
    ):
        pub.wait_for_subscribers(1, timeout=5)
        for i in range(10):
            pub.send(bytes([i]))
        got = [sub.recv(timeout=1) for _ in range(4)]
        assert [bytes(m.data)[0] for m in got] == [6, 7, 8, 9]
        assert [m.seq for m in got] == [7, 8, 9, 10]
        assert pub.statistics().overwritten == 6
        assert sub.statistics().gaps == 1
        del got
        assert pub.statistics().slots_in_use == 0


def test_overwrite_reclaims_pool_from_queues(name):
    with (
        copyless.Publisher(name, slots=4, queue_depth=64, on_full="overwrite") as pub,
        copyless.Subscriber(name, timeout=5) as sub,
    ):
        pub.wait_for_subscribers(1, timeout=5)
        for i in range(20):
            pub.send(bytes([i]))
        assert [bytes(sub.recv(timeout=1).data)[0] for _ in range(4)] == [16, 17, 18, 19]


def test_recv_timeout(name):
    with copyless.Publisher(name), copyless.Subscriber(name, timeout=5) as sub:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            sub.recv(timeout=0.1)
        assert 0.09 < time.monotonic() - t0 < 1
        with pytest.raises(WouldBlock):
            sub.recv_nowait()


def test_many_subscribers_in_processes_see_everything_in_order(name, child):
    code = """
        import sys, zlib, copyless
        sub = copyless.Subscriber(sys.argv[1], timeout=10)
        print("ready", flush=True)
        n = crc = 0
        for msg in sub:
            with msg:
                assert msg.seq == n + 1, (msg.seq, n)
                crc = zlib.crc32(msg.data, crc)
                n += 1
        print(n, crc, flush=True)
    """
    kids = [child(code, name) for _ in range(4)]
    rng = np.random.default_rng(1)
    crc = 0
    with copyless.Publisher(name, slots=32, queue_depth=32) as pub:
        pub.wait_for_subscribers(4, timeout=20)
        for i in range(3000):
            payload = rng.integers(0, 256, int(rng.integers(1, 20000)), dtype=np.uint8)
            crc = zlib.crc32(payload, crc)
            pub.send(payload, tag=i)
    for k in kids:
        rc, out, err = k.wait()
        assert rc == 0, err
        assert out.split()[-2:] == ["3000", str(crc)]


def test_late_joiner_sees_only_later_messages(name):
    with copyless.Publisher(name) as pub:
        with copyless.Subscriber(name, timeout=5) as early:
            pub.wait_for_subscribers(1, timeout=5)
            pub.send(b"before")
            with copyless.Subscriber(name, timeout=5) as late:
                pub.wait_for_subscribers(2, timeout=5)
                pub.send(b"after")
                assert bytes(late.recv(timeout=1).data) == b"after"
                with pytest.raises(WouldBlock):
                    late.recv_nowait()
            assert [bytes(early.recv(timeout=1).data) for _ in range(2)] == [b"before", b"after"]


def test_subscriber_waits_for_publisher(name, child):
    c = child(
        """
        import sys, copyless
        sub = copyless.Subscriber(sys.argv[1], timeout=10)
        with sub.recv(timeout=10) as m:
            print(bytes(m.data).decode(), flush=True)
        """,
        name,
    )
    time.sleep(0.3)
    with copyless.Publisher(name) as pub:
        pub.wait_for_subscribers(1, timeout=10)
        pub.send(b"found you")
        rc, out, err = c.wait()
    assert rc == 0, err
    assert out.strip() == "found you"


def test_subscriber_without_publisher_times_out(name):
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        copyless.Subscriber(name, timeout=0.2)
    assert time.monotonic() - t0 < 2


def test_second_publisher_refused(name):
    with copyless.Publisher(name):
        with pytest.raises(copyless.NameInUse):
            copyless.Publisher(name)


def test_bad_configuration():
    with pytest.raises(copyless.ConfigurationError):
        copyless.Publisher("x", slot_size=100)
    with pytest.raises(copyless.ConfigurationError):
        copyless.Publisher("x", on_full="sometimes")
    with pytest.raises(ValueError):
        copyless.Publisher("")


def test_message_too_large(name):
    with copyless.Publisher(name, max_message=1 << 20) as pub:
        with pytest.raises(copyless.MessageTooLarge):
            pub.send(bytes((1 << 20) + 1))


def test_statistics(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for _ in range(3):
            pub.send(b"abc")
        m = sub.recv(timeout=1)
        ps, ss = pub.statistics(), sub.statistics()
        assert (ps.messages, ps.bytes, ps.subscribers, ps.slots_in_use) == (3, 9, 1, 3)
        assert (ss.messages, ss.bytes, ss.in_flight, ss.queued) == (1, 3, 1, 2)
        assert ps.per_subscriber[os.getpid()]["delivered"] == 3
        m.release()
        with pytest.raises(AttributeError):
            ps.messages = 0  # frozen


def test_closed_publisher_drains_then_peer_closed(name):
    pub = copyless.Publisher(name)
    sub = copyless.Subscriber(name, timeout=5)
    pub.wait_for_subscribers(1, timeout=5)
    pub.send(b"one")
    pub.send(b"x" * 100_000)
    pub.close()
    assert bytes(sub.recv(timeout=1).data) == b"one"
    assert sub.recv(timeout=1).nbytes == 100_000
    with pytest.raises(PeerClosed):
        sub.recv(timeout=1)
    assert list(sub) == []
    with pytest.raises(copyless.ClosedError):
        pub.send(b"late")
    sub.close()


def test_iteration_ends_on_clean_close(name):
    pub = copyless.Publisher(name)
    with copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for i in range(5):
            pub.send(bytes([i]))
        pub.close()
        assert [bytes(m.data)[0] for m in sub] == [0, 1, 2, 3, 4]


def test_publisher_reclaims_on_subscriber_close(name):
    with copyless.Publisher(name, slots=8) as pub:
        sub = copyless.Subscriber(name, timeout=5)
        pub.wait_for_subscribers(1, timeout=5)
        for _ in range(8):
            pub.send(b"x")
        held = [sub.recv(timeout=1) for _ in range(4)]  # 4 held, 4 queued
        assert pub.statistics().slots_in_use == 8
        sub.close()
        deadline = time.monotonic() + 2
        while pub.statistics().slots_in_use and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.statistics().slots_in_use == 0 and pub.subscriber_count == 0
        for m in held:
            m.release()  # releasing after close is harmless


def test_large_segments_are_reused(name):
    """A stream of large messages keeps reusing one hot segment (a fresh one costs a
    page fault per page), and the budget bounds how many are cached."""
    with copyless.Publisher(name, large_budget=8 << 20) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for _ in range(50):
            with pub.loan(1 << 20) as buf:
                buf[:1] = b"x"
            with sub.recv(timeout=1):
                pass
        assert pub.statistics().large_segments == 1
        held = []
        for _ in range(4):  # 4 x 2 MiB classes fit the 8 MiB budget at once...
            pub.send(bytes((1 << 20) + 1))
            held.append(sub.recv(timeout=1))
        with pytest.raises(WouldBlock):  # ...a fifth does not while they are held
            pub.send(bytes((1 << 20) + 1), timeout=0)
        held.pop().release()
        pub.send(bytes((1 << 20) + 1), timeout=1)
        assert pub.statistics().large_segments <= 5
        del held


def test_try_recv_returns_none_when_empty_and_raises_on_close(name):
    pub = copyless.Publisher(name)
    with copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        assert sub.try_recv() is None
        pub.send(b"a")
        assert bytes(sub.try_recv().data) == b"a"
        pub.close()
        with pytest.raises(PeerClosed):
            sub.try_recv()
    with pytest.raises(copyless.ClosedError):
        sub.try_recv()


def test_loan_publishes_while_numpy_holds_the_buffer(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for size in (16, 1 << 20):
            with pub.loan(size, type=3) as buf:
                arr = np.frombuffer(buf, dtype=np.uint8)  # still alive when the block ends
                arr[:] = 7
            with sub.recv(timeout=1) as msg:
                assert msg.type == 3 and msg.nbytes == size and bytes(msg.data) == b"\7" * size
            del arr
        loan = pub.loan(10)
        loan.data[:5] = b"hello"
        assert loan.seq is None
        seq = loan.publish(5)  # a prefix of the loan
        assert loan.seq == seq
        with pytest.raises(copyless.ClosedError):
            loan.data  # noqa: B018
        with pytest.raises(copyless.ClosedError):
            loan.publish()
        assert bytes(sub.recv(timeout=1).data) == b"hello"
        assert pub.statistics().slots_in_use == 0


def test_blocked_publisher_is_woken_in_batches_not_per_message(name, child):
    """A publisher outrunning its subscriber blocks on a full ring.  Waking it at the
    first free entry would put the two in lockstep, a futex wake per message; it is
    woken once half the ring has drained."""
    c = child(
        """
        import sys, copyless
        sub = copyless.Subscriber(sys.argv[1], timeout=20, spin=0)
        n = 0
        for msg in sub:
            sum(msg.data)  # a little work per message: slower than the publisher
            msg.release()
            n += 1
        print(n, sub.statistics().wakeups_sent, flush=True)
        """,
        name,
    )
    with copyless.Publisher(name, queue_depth=64, slots=128) as pub:
        pub.wait_for_subscribers(1, timeout=20)
        for _ in range(20000):
            pub.send(b"x" * 64)
        blocked = pub.statistics().blocked
    rc, out, err = c.wait()
    assert rc == 0, err
    n, wakes = map(int, out.split())
    assert n == 20000 and blocked > 10, "the publisher did block"
    assert wakes <= 20000 // 16, f"{wakes} wake-ups for 20000 messages"


def test_send_timeout_applies_to_large_messages(name):
    with (
        copyless.Publisher(name, send_timeout=0.2, large_budget=1 << 20) as pub,
        copyless.Subscriber(name, timeout=5) as sub,
    ):
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(bytes(1 << 20))
        held = sub.recv(timeout=1)
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            pub.send(bytes(1 << 20))  # the budget is held by the subscriber
        assert 0.15 < time.monotonic() - t0 < 2
        held.release()


def test_large_queue_bounds_segments_ahead_of_a_slow_subscriber(name):
    """Unreceived large messages limit how far the publisher runs ahead (more segments
    would only spill the caches); messages a subscriber holds do not (requirement: a
    holder never blocks others beyond the budget)."""
    big = bytes(1 << 20)
    with copyless.Publisher(name, large_queue=2, send_timeout=0.2) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub.send(big)
        pub.send(big)
        with pytest.raises(Timeout):
            pub.send(big)  # two wait unreceived: wait for the subscriber
        held = [sub.recv(timeout=1), sub.recv(timeout=1)]
        pub.send(big)  # held ones do not count: new segments within the budget
        pub.send(big)
        assert pub.statistics().large_segments == 4
        del held


@pytest.mark.parametrize("stream_from", [0, 64 << 10])
def test_large_send_arrives_intact_from_any_alignment(name, stream_from):
    """send() copies a large message in the core, with streaming stores from
    _stream_from up (0: never); either way every byte arrives, whatever the source's
    alignment and length (the streaming copy does a head and a tail by memcpy)."""
    rng = np.random.default_rng(7)
    base = bytearray(rng.integers(0, 256, (1 << 20) + 256, dtype=np.uint8).tobytes())
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub._stream_from = stream_from
        for offset, size in [(0, 1 << 20), (1, (1 << 20) - 1), (7, 65536 + 63), (15, 200_001), (3, pub.slot_size + 1)]:
            src = memoryview(base)[offset : offset + size]
            pub.send(src, type=5, tag=offset)
            with sub.recv(timeout=2) as msg:
                assert (msg.nbytes, msg.type, msg.tag) == (size, 5, offset)
                assert bytes(msg.data) == bytes(src)


def test_large_send_copies_once_and_is_not_a_loan(name):
    """A large send() is one copy straight into the segment (the source may change
    right after), with no loan in between; a loan counts once even when it needs a
    new segment."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        src = bytearray(b"a" * (1 << 20))
        pub.send(src)
        src[:] = b"b" * (1 << 20)
        with sub.recv(timeout=1) as msg:
            assert bytes(msg.data) == b"a" * (1 << 20)
        assert pub.statistics().loans == 0
        with pub.loan(3 << 20) as buf:  # a new 4 MiB segment
            buf[:3] = b"xyz"
        with sub.recv(timeout=1) as msg:
            assert bytes(msg.data[:3]) == b"xyz"
        assert pub.statistics().loans == 1


def test_loan_arguments(name):
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        for loan in (pub.loan(3, 9, 11), pub.loan(nbytes=3, type=9, tag=11, timeout=1), pub.loan(3, tag=11, type=9)):
            loan.data[:] = b"abc"
            loan.publish()
            with sub.recv(timeout=1) as msg:
                assert (bytes(msg.data), msg.type, msg.tag) == (b"abc", 9, 11)
        for args, kw, exc in [
            ((), {}, TypeError),
            ((1,), {"nbytes": 1}, TypeError),
            ((1,), {"colour": 1}, TypeError),
            ((1, 0, 0, None, 5), {}, TypeError),
            (("1",), {}, TypeError),
            ((-1,), {}, ValueError),
            ((1, 2**32), {}, OverflowError),
            ((1, 0, -1), {}, OverflowError),
        ]:
            with pytest.raises(exc):
                pub.loan(*args, **kw)
        assert pub.statistics().slots_in_use == 0


def test_release_ring_wraps_many_times(name):
    """The subscriber rereads the publisher's release head only when its copy says
    the ring is full: a ring of 8 entries, wrapped hundreds of times, with some
    messages held across the wrap, loses and rejects nothing."""
    with copyless.Publisher(name, slots=4, large_blocks=2, queue_depth=4) as pub, copyless.Subscriber(name) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        held = []
        for i in range(3000):
            pub.send(i.to_bytes(4, "little"), timeout=1)
            msg = sub.recv(timeout=1)
            assert int.from_bytes(msg.data, "little") == i
            held.append(msg)
            if len(held) == 3:
                for m in held:
                    m.release()
                held = []
        assert pub.statistics().protocol_errors == 0 and sub.statistics().in_flight == len(held)


def test_streaming_copy_threshold_below_a_slot(name):
    """_stream_from is the core's mechanism, set by policy: even a threshold
    below the smallest message copies every byte (short copies stay memcpy)."""
    with copyless.Publisher(name) as pub, copyless.Subscriber(name, timeout=5) as sub:
        pub.wait_for_subscribers(1, timeout=5)
        pub._stream_from = 1
        for size in (1, 15, 63, 64, 79, 100, 4097):
            data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
            pub.send(memoryview(b"\x00" + data)[1:])
            with sub.recv(timeout=1) as msg:
                assert bytes(msg.data) == data


def test_streaming_threshold_is_a_third_of_the_last_level_cache(name):
    """The threshold comes from sysfs (glibc's CPUID-derived cache size can be wrong on a VM)."""
    from copyless._pubsub import _llc_bytes

    base = "/sys/devices/system/cpu/cpu0/cache"
    if not os.path.isdir(base):
        pytest.skip("no cache information in sysfs")
    sizes = {}
    for entry in os.listdir(base):
        if entry.startswith("index") and open(f"{base}/{entry}/type").read().strip() != "Instruction":
            text = open(f"{base}/{entry}/size").read().strip()
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
            sizes[int(open(f"{base}/{entry}/level").read())] = size
    assert _llc_bytes() == sizes[max(sizes)] > 0
    with copyless.Publisher(name) as pub:
        assert pub._stream_from == _llc_bytes() // 3
