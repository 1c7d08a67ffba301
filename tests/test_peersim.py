"""Lossless peers in a harsher simulated network (tests/peersim.py): per-direction
latency, a close delivers what was written before the end, each side notices a cut at
its own time (even seconds later: half-open connections), connects take time, and a
peer may restart in the middle of anything.  Sans-I/O, seeded."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peersim import Node, World

MODES = {
    "both dial": {},
    "heavy cuts": dict(cut_rate=0.03),
    "slow to notice": dict(cut_rate=0.02, notice=(0.0, 2.0)),
    "half-open": dict(cut_rate=0.02, notice=(0.0, 8.0), settle=120.0),
    "only osd.1 dials": dict(dials=(True, False), cut_rate=0.03),
    "only osd.2 dials": dict(dials=(False, True), cut_rate=0.03),
    "short handshake timeout": dict(cut_rate=0.01, hs=0.25),
}


def run(seed, *, cut_rate=0.01, dials=(True, True), n=40, fault_time=15.0, settle=60.0, notice=(0.0, 0.3), hs=10.0):
    rng = random.Random(seed ^ 0x5EED)
    a = Node("osd.1", "osd.2", dials=dials[0], hs_timeout=hs)
    b = Node("osd.2", "osd.1", dials=dials[1], hs_timeout=hs)
    w = World(seed, a, b, cut_rate=cut_rate, notice=notice)
    a.retry_at = rng.uniform(0, 0.1) if dials[0] else None
    b.retry_at = rng.uniform(0, 0.1) if dials[1] else None
    while w.now < fault_time + settle:
        for nd in w.nodes:
            if nd.sent < n and rng.random() < 0.1:
                nd.send(b"%s-%d" % (nd.name.encode(), nd.sent))
        w.step(cut_rate=cut_rate if w.now < fault_time else 0.0)
        if w.now > fault_time and a.sent == b.sent == n and len(a.got) >= n and len(b.got) >= n and w.quiet():
            break
    return w, a, b


@pytest.mark.parametrize("mode", list(MODES))
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_exactly_once_in_order_and_one_connection_in_the_end(mode, seed):
    w, a, b = run(seed, **MODES[mode])
    assert b.got == [b"osd.1-%d" % i for i in range(a.sent)], "osd.1 to osd.2: exactly once, in order"
    assert a.got == [b"osd.2-%d" % i for i in range(b.sent)], "osd.2 to osd.1"
    assert a.sent == b.sent == 40
    assert not a.resets and not b.resets, "nobody restarted: no remote reset"
    assert w.carriers_agree(), "both sides carry the session on the same connection"


@pytest.mark.parametrize("resetcheck", [False, True], ids=["lossless_peer", "lossless_peer_reuse"])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), who=st.sampled_from([0, 1]))
def test_a_peer_restarting_at_any_moment_is_reported_once(resetcheck, seed, who):
    rng = random.Random(seed ^ 0xABC)
    a = Node("osd.1", "osd.2", resetcheck=resetcheck)
    b = Node("osd.2", "osd.1", resetcheck=resetcheck)
    w = World(seed, a, b, cut_rate=0.01)
    a.retry_at, b.retry_at = rng.uniform(0, 0.1), rng.uniform(0, 0.1)
    restart_at, n = rng.uniform(0.0, 3.0), 40
    old = new = None
    knew = False
    while w.now < 60:
        for nd in w.nodes:
            if nd.sent < n and rng.random() < 0.1:
                nd.send(b"%s#%d-%d" % (nd.name.encode(), nd.inc, nd.sent))
        if old is None and w.now >= restart_at:
            old = w.nodes[who]
            knew = w.nodes[1 - who].session.peer_cookie != 0  # it had met the old incarnation
            new = w.restart(who, resetcheck=resetcheck)
        w.step(cut_rate=0.01 if w.now < 6.0 else 0.0)
        if new is not None and w.now > 6.0 and new.sent == w.nodes[1 - who].sent == n and w.quiet():
            exp_new = [b"%s#1-%d" % (new.name.encode(), i) for i in range(new.sent)]
            if w.nodes[1 - who].got[-len(exp_new) :] == exp_new:
                break
    assert old is not None and new is not None
    surv = w.nodes[1 - who]
    exp_old = [b"%s#0-%d" % (old.name.encode(), i) for i in range(old.sent)]
    exp_new = [b"%s#1-%d" % (new.name.encode(), i) for i in range(new.sent)]
    k = len(surv.got) - len(exp_new)
    assert k >= 0 and surv.got[:k] == exp_old[:k] and surv.got[k:] == exp_new, "a prefix of the old's, all of the new's"
    exp_surv = [b"%s#0-%d" % (surv.name.encode(), i) for i in range(surv.sent)]
    assert old.got == exp_surv[: len(old.got)], "the old incarnation got a prefix, in order"
    tail = exp_surv[len(exp_surv) - len(new.got) :] if new.got else []
    assert new.got == tail, "the new incarnation gets the rest, in order"
    if not resetcheck:
        assert len(exp_surv) - len(new.got) <= len(old.got), "kept: nothing the old one had not received is lost"
    assert len(surv.resets) == (1 if knew else len(surv.resets)) and len(surv.resets) <= 1, "reported once"
    assert not new.resets
    assert w.carriers_agree()
