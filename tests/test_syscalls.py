"""Principle 2, measured: while messages flow, neither side makes a system call per message
(pub/sub, and an ipc:// stream).

The process under test runs under strace; two getppid() calls mark the start
and end of the measured loop, and we count the main thread's system calls
between them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

N = 20000

PUB = """
import os, sys, copyless
pub = copyless.Publisher(sys.argv[1], slot_size=64, slots=32768, queue_depth=32768)
pub.wait_for_subscribers(1, timeout=20)
send = pub.send
payload = b"x" * 64
for _ in range(1000):
    send(payload)
os.getppid()
for _ in range({N}):
    send(payload)
os.getppid()
import time; time.sleep(0.3)
pub.close()
"""

SUB = """
import os, sys, copyless
# spin longer than strace stalls the traced publisher at a syscall, or each stall
# would put this side to sleep and cost another (traced, stalling) wake-up
sub = copyless.Subscriber(sys.argv[1], timeout=20, spin=0.005)
recv = sub.recv
for _ in range(1000):
    recv(timeout=10).release()
os.getppid()
for _ in range({N}):
    recv(timeout=10).release()
os.getppid()
sub.close()
"""


def syscalls_between_markers(trace: str) -> list[str]:
    lines = [line for line in trace.splitlines() if line.strip()]
    pid = lines[0].split()[0]
    # one entry per call: strace splits a call interrupted by another thread into
    # "name(... <unfinished ...>" and "<... name resumed>"; count the first part
    main = [line for line in lines if line.split()[0] == pid and "resumed>" not in line]
    marks = [i for i, line in enumerate(main) if "getppid(" in line]
    assert len(marks) == 2, f"markers not found in trace: {marks}"
    return main[marks[0] + 1 : marks[1]]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (scripts/install-deps.sh)")
@pytest.mark.parametrize("traced", ["publisher", "subscriber"])
def test_no_syscall_per_message(name, tmp_path, traced):
    out = tmp_path / "trace"
    pub_code, sub_code = textwrap.dedent(PUB.format(N=N)), textwrap.dedent(SUB.format(N=N))
    strace = ["strace", "-f", "-o", str(out)]
    pub = subprocess.Popen((strace if traced == "publisher" else []) + [sys.executable, "-c", pub_code, name])
    sub = subprocess.Popen((strace if traced == "subscriber" else []) + [sys.executable, "-c", sub_code, name])
    try:
        assert sub.wait(60) == 0 and pub.wait(60) == 0
    finally:
        for p in (pub, sub):
            if p.poll() is None:
                p.kill()
                p.wait()
    calls = syscalls_between_markers(out.read_text())
    # never one per message; a few wake-ups when one side briefly outruns the other
    assert len(calls) <= N // 1000, f"{len(calls)} system calls for {N} messages: {calls[:10]}"


# ipc://: a writer streaming 64-byte messages into an IpcStream, and a reader that keeps up
# (it spins before it sleeps, as the messenger's callers do).  Room to write and data to
# read both show as readable: whoever waits calls before_wait() and then polls for input.
IPC_WRITER = """
import os, select, sys, time
from copyless.transports import connect
c = connect(sys.argv[1])
while not c.handshake():
    select.select([c], [], [], 5)
send, payload = c.send_buffers, memoryview(b"x" * 64)
def put():
    v = payload
    while v:  # what did not fit (a full ring) waits for room, which shows as readable
        v = v[send([v]):]
        if v and not c.before_wait():
            select.select([c], [], [], 5)
for _ in range(1000):
    put()
os.getppid()
for _ in range({N}):
    put()
os.getppid()
select.select([c], [], [], 10)  # until the reader hangs up
c.close()
"""

IPC_READER = """
import os, select, sys
from copyless.transports import listen
lst = listen(sys.argv[1])
print("ready", flush=True)
select.select([lst], [], [], 20)
s = lst.accept()
while not s.handshake():
    select.select([s], [], [], 5)
s.channel.spin = 0.005  # longer than strace stalls the traced writer at a syscall
buf, got = memoryview(bytearray(1 << 16)), 0
def read_until(total):
    global got
    while got < total:
        if not s.before_wait():
            select.select([s], [], [], 5)
        try:
            got += s.recv_into(buf)
        except BlockingIOError:
            pass
read_until(1000 * 64)
os.getppid()
read_until((1000 + {N}) * 64)
os.getppid()
s.close()
lst.close()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (scripts/install-deps.sh)")
@pytest.mark.parametrize("traced", ["writer", "reader"])
def test_no_syscall_per_message_over_ipc(name, tmp_path, traced):
    out = tmp_path / "trace"
    addr = f"ipc://{name}"
    strace = ["strace", "-f", "-o", str(out)]
    w_code, r_code = textwrap.dedent(IPC_WRITER.format(N=N)), textwrap.dedent(IPC_READER.format(N=N))
    reader = subprocess.Popen(
        (strace if traced == "reader" else []) + [sys.executable, "-c", r_code, addr], stdout=subprocess.PIPE, text=True
    )
    writer = None
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
        writer = subprocess.Popen((strace if traced == "writer" else []) + [sys.executable, "-c", w_code, addr])
        assert reader.wait(60) == 0 and writer.wait(60) == 0
    finally:
        for p in (reader, writer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if reader.stdout is not None:
            reader.stdout.close()
    calls = syscalls_between_markers(out.read_text())
    wakes = [c for c in calls if c.split()[1].startswith(("write", "send", "sendto", "sendmsg"))]
    # never one per message: a few wake-ups when one side briefly outruns the other
    assert len(wakes) <= N // 1000, f"{len(wakes)} wake-ups for {N} messages: {wakes[:10]}"
    # a spinning side yields the CPU while it waits (sched_yield): how often depends on
    # the load on the machine, not on the messages; every other call is counted
    others = [c for c in calls if not c.split()[1].startswith("sched_yield")]
    assert len(others) <= N // 200, f"{len(others)} system calls for {N} messages: {others[:10]}"
