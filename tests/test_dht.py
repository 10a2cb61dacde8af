"""Membership over a real hivemind DHT on 127.0.0.1 (no relays, no NAT)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from probes import eventually

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import wait_for_chain
from molink.comm.dht_process import proc_stat
from molink.comm.membership import Membership

PERIOD = 1.0  # refresh period: entries expire 2 * PERIOD + 1 s after the last refresh
DEADLINE = 10.0  # generous bound for anything that should take ~1 s
REPO = Path(__file__).resolve().parents[1]


def _ours_or_orphaned(pid: int) -> bool:
    """True if ``pid`` descends from this test process or was orphaned (adopted by init).

    Other engineers' servers may run their own p2pd concurrently; those are not counted.
    """
    stat = proc_stat(pid)
    if stat is None:
        return False
    ppid = stat[2]
    if ppid <= 1:
        return True
    while ppid > 1:
        if ppid == os.getpid():
            return True
        parent = proc_stat(ppid)
        if parent is None:
            return True  # its parent just died: about to be orphaned
        ppid = parent[2]
    return False


def p2pd_pids() -> set[int]:
    """Live (non-zombie) p2pd processes that are ours or orphaned (``pgrep -x p2pd``)."""
    out = subprocess.run(
        ["pgrep", "-x", "p2pd"], check=False, capture_output=True, text=True
    ).stdout
    pids = set()
    for pid in map(int, out.split()):
        stat = proc_stat(pid)
        if stat is not None and stat[1] != "Z" and _ours_or_orphaned(pid):
            pids.add(pid)
    return pids


def make_ann(m: Membership, start: int, end: int, state: str = "joining") -> NodeAnnouncement:
    return NodeAnnouncement(
        peer_id=m.peer_id,
        model_name="test-model",
        model_hash="h1",
        num_layers=30,
        start_layer=start,
        end_layer=end,
        grpc_address="127.0.0.1:50051",
        state=state,
        version="0.2.0",
        kv_capacity_bytes=1 << 20,
        is_head=start == 0,
    )


def seen_by(observer: Membership) -> dict[str, NodeAnnouncement]:
    return {a.peer_id: a for a in observer.nodes()}


@pytest.fixture(scope="module")
def swarm() -> Iterator[tuple[Membership, Membership]]:
    """Two peers: ``a`` (announces 127.0.0.1 on an explicit port) and ``b`` joining via ``a``."""
    before = p2pd_pids()
    members: list[Membership] = []
    try:
        a = Membership(host="127.0.0.1", announce_host="127.0.0.1", startup_timeout=30)
        members.append(a)
        b = Membership(initial_peers=a.visible_maddrs(), host="127.0.0.1", startup_timeout=30)
        members.append(b)
        a.announce(make_ann(a, 0, 14), period=PERIOD)
        b.announce(make_ann(b, 15, 29), period=PERIOD)
        yield a, b
    finally:
        for m in members:
            m.shutdown()
    eventually(lambda: not (p2pd_pids() - before), what="p2pd processes to exit")


def test_peers_see_each_other(swarm: tuple[Membership, Membership]) -> None:
    a, b = swarm
    maddrs = a.visible_maddrs()
    assert maddrs and all(
        m.startswith("/ip4/127.0.0.1/tcp/") and m.endswith(f"/p2p/{a.peer_id}") for m in maddrs
    )
    both = {a.peer_id, b.peer_id}
    eventually(lambda: set(seen_by(a)) == both, what="a to see both")
    eventually(lambda: set(seen_by(b)) == both, what="b to see both")
    assert seen_by(a)[b.peer_id] == b.announcement


def test_announce_rejects_foreign_peer_id(swarm: tuple[Membership, Membership]) -> None:
    a, b = swarm
    with pytest.raises(ValueError, match="this node is"):
        a.announce(make_ann(b, 15, 29))


def test_update_propagates(swarm: tuple[Membership, Membership]) -> None:
    a, b = swarm
    b.update(
        state="online", kv_capacity_bytes=123, head_ids=(a.peer_id,), running_head_ids=(a.peer_id,)
    )
    eventually(
        lambda: b.peer_id in seen_by(a) and seen_by(a)[b.peer_id].kv_capacity_bytes == 123,
        what="a to see b's update",
    )
    assert seen_by(a)[b.peer_id].state == "online"
    assert seen_by(a)[b.peer_id].head_ids == (a.peer_id,)  # a tuple again after msgpack
    assert seen_by(a)[b.peer_id].running_head_ids == (a.peer_id,)
    with pytest.raises(ValueError, match="head_ids has 'not a peer'"):
        b.update(head_ids=("not a peer",))
    with pytest.raises(ValueError, match="running_head_ids has .not a peer."):
        b.update(running_head_ids=("not a peer",))


def test_wait_for_chain_end_to_end(swarm: tuple[Membership, Membership]) -> None:
    a, b = swarm
    b.update(state="online")
    eventually(lambda: seen_by(a).get(b.peer_id), what="a to see b")
    head = a.announcement
    assert head is not None
    chain = wait_for_chain(a, head, timeout=DEADLINE, poll_interval=0.2)
    assert chain.peer_ids == [a.peer_id, b.peer_id]
    assert chain.partition == [15, 15]


def test_withdraw_then_crash_expires(swarm: tuple[Membership, Membership]) -> None:
    a, b = swarm
    c = Membership(initial_peers=b.visible_maddrs(), host="127.0.0.1", startup_timeout=30)
    try:
        c.announce(make_ann(c, 15, 29), period=PERIOD)
        eventually(lambda: c.peer_id in seen_by(a), what="a to see c")

        c.withdraw()  # a tombstone replaces the entry at once
        eventually(lambda: c.peer_id not in seen_by(a), what="a to drop withdrawn c")
        assert c.peer_id not in seen_by(c)

        c.announce(make_ann(c, 15, 29), period=PERIOD)
        eventually(lambda: c.peer_id in seen_by(a), what="a to see c again")
        p2pd = [pid for pid, _ in c._p2pd]
        assert p2pd
        os.kill(c._dht.pid, signal.SIGKILL)  # crash: no withdraw, no more refreshes
        start = time.monotonic()
        eventually(lambda: c.peer_id not in seen_by(a), what="c's entry to expire")
        assert time.monotonic() - start < 2 * PERIOD + 1.0 + 5.0
    finally:
        c.shutdown()
        c.shutdown()  # idempotent
    eventually(lambda: not (set(p2pd) & p2pd_pids()), what="c's p2pd to exit")


def test_p2pd_dies_with_a_killed_parent() -> None:
    """A parent that is SIGKILLed (no atexit, no shutdown) must not orphan the DHT or p2pd."""
    script = textwrap.dedent(
        """
        import logging, os, signal, sys, types
        # stand-in for vllm.logger: importing vllm costs ~10 s on this machine
        logger_mod = types.ModuleType("vllm.logger")
        logger_mod.init_logger = logging.getLogger
        vllm_mod = types.ModuleType("vllm")
        vllm_mod.logger = logger_mod
        sys.modules.update({"vllm": vllm_mod, "vllm.logger": logger_mod})
        from molink.comm.membership import Membership
        m = Membership(host="127.0.0.1", startup_timeout=30)
        print(m._dht.pid, *[pid for pid, _ in m._p2pd], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2, proc.stdout  # the DHT process and its p2pd

    def all_gone() -> bool:
        return all((s := proc_stat(pid)) is None or s[1] == "Z" for pid in pids)

    eventually(all_gone, what="the orphaned DHT process and p2pd to exit")


def test_a_ready_dht_that_doesnt_answer_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DHT process that comes up but gives no answer (a hung fork) is shut down and started
    again, instead of hanging the node in an unbounded wait."""
    from molink.comm import dht_process

    answers = dht_process._first_answers
    calls: list[int] = []

    def no_answer_the_first_time(dht):  # noqa: ANN001, ANN202
        calls.append(dht.pid)
        return None if len(calls) == 1 else answers(dht)

    monkeypatch.setattr(dht_process, "_first_answers", no_answer_the_first_time)
    member = Membership(host="127.0.0.1")
    try:
        assert len(calls) == 2 and calls[0] != calls[1]  # a second process
        assert member.visible_maddrs()
        eventually(lambda: proc_stat(calls[0]) is None, timeout=15, what="first DHT gone")
    finally:
        member.shutdown()
