"""A swarm that survives churn, with real node processes, a real DHT and the ``openai`` client.

Streams run through a 2-stage pipeline whose last span has replicas (one of them overlapping the
head, so it serves a sub-span). A serving node is killed (``kill -9``), told to stop (SIGTERM),
killed with no replacement until a new node starts, or stopped (SIGSTOP, a hung node): every
stream completes, and its greedy tokens equal those of an undisturbed run, token for token.
Finally the head is restarted and finds the followers already in the swarm.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import replace
from signal import SIGCONT, SIGSTOP, SIGTERM
from types import SimpleNamespace

import pytest
from conftest import QWEN3_ENGINE_FLAGS, NodeProcess, Swarm
from probes import eventually, get, scrape, status, value
from reference import STREAM_TOKENS, assert_same, pipeline_outputs, stream_all

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import Hop
from molink.core.rebalance import GAIN, first_in_line
from molink.engine.head_config import HeadConfig, RemoteStageSpec
from molink.executor.chain_keeper import ChainKeeper
from molink.executor.remote_stage import StageUnreachable

FLAGS = QWEN3_ENGINE_FLAGS
# The head splits the streams into 2 micro-batches: a loss finds 2 batches in flight. A step
# unanswered for STEP_TIMEOUT_S counts as a lost stage (a hung node).
STEP_TIMEOUT_S = 15
HEAD_FLAGS = [*FLAGS, "--min-micro-batches", "2", "--step-timeout", str(STEP_TIMEOUT_S)]
WAIT_S = 240.0


def serving(nodes: list[NodeProcess]) -> NodeProcess:
    """The follower the head currently streams through."""
    return eventually(
        lambda: next((n for n in nodes if status(n)["state"] == "serving"), None),
        timeout=WAIT_S,
        what="a serving follower",
    )


def standby_ready(head: NodeProcess, node: NodeProcess) -> bool:
    return bool(re.search(rf"Standby for .*: 127\.0\.0\.1:{node.grpc_port} ", head.log()))


def keep_only_the_serving_follower(followers: list[NodeProcess]) -> None:
    """Stop every follower but the one serving (a test run alone starts with two)."""
    keep = serving(followers)
    for node in [n for n in followers if n is not keep]:
        node.stop()
        followers.remove(node)


@pytest.fixture(scope="module")
def churn(module_swarm: Swarm, qwen3_model: str):
    head = module_swarm.start("head", qwen3_model, "0,2", HEAD_FLAGS)
    a = module_swarm.start("a", qwen3_model, "3,5", FLAGS, peers=[head])
    b = module_swarm.start("b", qwen3_model, "2,5", FLAGS, peers=[head])  # overlaps the head
    head.wait_healthy()
    reference = asyncio.run(stream_all(head, qwen3_model))
    assert all(len(tokens) == STREAM_TOKENS for tokens in reference)
    return head, [a, b], reference


def test_kill_9_of_a_serving_stage_loses_no_request(churn, qwen3_model):
    head, followers, reference = churn
    eventually(
        lambda: any(standby_ready(head, n) for n in followers), timeout=WAIT_S, what="a standby"
    )
    victim = serving(followers)
    before = scrape(head)
    got = asyncio.run(stream_all(head, qwen3_model, during=victim.kill))
    assert got == reference
    log = head.log()
    # The replacement serves the same span: only it is refilled, from the head's replay log;
    # the requests keep running and recompute nothing.
    assert "running request(s) keep running; every surviving stage keeps the" in log
    assert re.search(r"Replayed \d+ positions of \d+ request\(s\) into 127\S+ \[3-5\]", log)
    assert "Pipeline restored (epoch 1)" in log and ", by replay: " in log
    assert "preempted (its pipeline broke)" not in log
    after = scrape(head)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # The streams ran as 2 micro-batches (--min-micro-batches 2), so the loss found 2 in flight.
    # (A scrape during the load may get the engine's last snapshot, up to 15 s old: read after.)
    assert added("molink_micro_batch_steps_total", batches="2") > 0
    assert added("molink_replayed_tokens_total") > 0
    assert added("molink_recomputed_tokens_total", cause="stage_loss") == 0
    assert added("molink_recoveries_total", mode="replay") == 1
    assert added("molink_requests_failed_total", cause="outage") == 0
    followers.remove(victim)
    assert status(followers[0])["state"] == "serving"


def test_sigterm_moves_requests_before_the_node_exits(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    keep_only_the_serving_follower(followers)
    # A node without --serving_layers takes the layers after the head's.
    c = module_swarm.start("c", qwen3_model, None, FLAGS, peers=[head])
    eventually(lambda: standby_ready(head, c), timeout=WAIT_S, what="c on standby")
    assert status(c)["serving_layers"] == [3, 5] and status(c)["span_chosen_automatically"]
    leaver = serving(followers)

    def sigterm() -> None:
        leaver.proc.send_signal(SIGTERM)

    got = asyncio.run(stream_all(head, qwen3_model, during=sigterm))
    assert got == reference
    assert leaver.wait_exit(timeout=60) == 0
    assert "The head moved off this node" in leaver.log()
    assert re.search(
        r"Lost stage 127\.0\.0\.1:\d+ \[3-5\]: it announced that it is leaving", head.log()
    )
    followers.remove(leaver)
    followers.append(c)


def test_requests_wait_for_a_node_started_after_the_loss(churn, module_swarm, qwen3_model):
    head, followers, reference = churn

    def kill_then_replace() -> None:
        for node in followers:  # no replica left
            node.kill()
        followers[:] = [module_swarm.start("d", qwen3_model, "3,5", FLAGS, peers=[head])]

    got = asyncio.run(stream_all(head, qwen3_model, during=kill_then_replace))
    assert got == reference
    assert "Pipeline not restored yet: layers 3-5 are not served by any node" in head.log()


def test_hung_stage_is_replaced(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    e = module_swarm.start("e", qwen3_model, "3,5", FLAGS, peers=[head])
    eventually(lambda: standby_ready(head, e), timeout=WAIT_S, what="e on standby")
    hung = serving(followers)
    timed_out = f"Lost the chain: no result within {STEP_TIMEOUT_S} s"
    timeouts = head.log().count(timed_out)
    try:
        got = asyncio.run(stream_all(head, qwen3_model, during=lambda: hung.signal_group(SIGSTOP)))
    finally:
        hung.kill()
        followers[:] = [e]
    assert got == reference  # e took over
    # What found it: the step deadline. A stopped process keeps its sockets open, and gRPC's
    # keepalive has not closed them first in any run here.
    assert head.log().count(timed_out) == timeouts + 1


def test_a_loss_during_the_replay_loses_nothing(churn, module_swarm, qwen3_model):
    """The node that takes the lost span dies while it is being refilled: the head gives up
    that replay, waits for a new node and every stream still comes out undisturbed.

    To land the second kill inside the replay, the replacement runs a fiftieth of the time
    (SIGSTOP/SIGCONT) from the first kill on, and dies as soon as the head starts replaying (at
    a tenth, a loaded machine once saw the replay end before the kill)."""
    head, followers, reference = churn
    f = module_swarm.start("f", qwen3_model, "3,5", FLAGS, peers=[head])
    eventually(lambda: standby_ready(head, f), timeout=WAIT_S, what="f on standby")
    victim = serving(followers)
    slowed = threading.Event()

    def slow_down() -> None:
        while not slowed.is_set():
            f.signal_group(SIGSTOP)
            time.sleep(0.098)
            f.signal_group(SIGCONT)
            time.sleep(0.002)

    def kill_during_the_replay() -> None:
        threading.Thread(target=slow_down, daemon=True).start()
        victim.kill()
        into_f = rf"Replaying the logged positions of .* into 127\.0\.0\.1:{f.grpc_port} "
        deadline = time.monotonic() + WAIT_S
        while not re.search(into_f, head.log()):  # polled fast: the replay has begun
            assert time.monotonic() < deadline, "the head never replayed into f"
            time.sleep(0.005)
        f.kill()
        slowed.set()
        followers[:] = [module_swarm.start("g", qwen3_model, "3,5", FLAGS, peers=[head])]

    try:
        got = asyncio.run(stream_all(head, qwen3_model, during=kill_during_the_replay))
    finally:
        slowed.set()
        f.kill()
    assert got == reference
    assert re.search(rf"Replay into 127\.0\.0\.1:{f.grpc_port} \[3-5\] failed", head.log())


def test_restarted_head_finds_the_followers(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    head.kill()
    new_head = module_swarm.start("head2", qwen3_model, "0,2", HEAD_FLAGS, peers=followers)
    new_head.wait_healthy()
    assert asyncio.run(stream_all(new_head, qwen3_model)) == reference


def test_an_unreachable_node_is_left_out_and_the_head_waits_for_a_reachable_one(
    swarm: Swarm, qwen3_model: str, qwen3_reference: list[dict]
) -> None:
    """The only follower announces an address where nothing listens (it listens on 127.0.0.1),
    and takes no relay (``--reachable yes``): the head names the cause in its log and in
    ``/ready``'s 503, stays up, and serves as soon as a reachable node covers the span."""
    head = swarm.start("head", qwen3_model, "0,2", FLAGS)
    ghost_flags = [*FLAGS, "--announce_host", "127.0.0.2", "--reachable", "yes"]
    ghost = swarm.start("ghost", qwen3_model, "3,5", ghost_flags, peers=[head])
    cause = f"127.0.0.2:{ghost.grpc_port} is unreachable (UNAVAILABLE)"
    eventually(lambda: cause in head.log(), timeout=WAIT_S, what="the unreachable node named")
    left_out = r"Leaving node \S+ out of the chain for \d+ s: " + re.escape(cause)
    assert re.search(left_out, head.log())
    assert head.poll() is None, "the head must not exit"
    for route in ("/ready", "/health"):  # the port answers while the head waits
        code, body = get(head.base_url + route)
        assert code == 503 and cause in json.loads(body)["cause"], (route, code, body)
    good = swarm.start("good", qwen3_model, "3,5", FLAGS, peers=[head])
    head.wait_healthy()
    assert f"127.0.0.1:{good.grpc_port} [3-5]" in head.log()
    assert_same(qwen3_reference, asyncio.run(pipeline_outputs(head.base_url, qwen3_model)))


# ------------------------------------------------------------ rebalancing, no processes


def follower(peer: str, port: int, heads: tuple[str, ...]) -> NodeAnnouncement:
    return NodeAnnouncement(
        peer_id=peer,
        model_name="m",
        model_hash="h",
        num_layers=6,
        start_layer=3,
        end_layer=5,
        grpc_address=f"127.0.0.1:{port}",
        state="online",
        version="0",
        kv_capacity_bytes=1 << 20,
        is_head=False,
        throughput=100.0,
        kv_free_bytes=1 << 19,
        heads=len(heads),
        head_ids=heads,
    )


def keeper_on(node: NodeAnnouncement, head_id: str, view: list[NodeAnnouncement]) -> ChainKeeper:
    """A head ``head_id`` whose chain is ``node``, seeing the announcements ``view``."""
    head = replace(follower(head_id, 1, ()), start_layer=0, end_layer=2, is_head=True)
    config = HeadConfig(head=head.to_dict(), stages=(RemoteStageSpec.from_hop(Hop(node, 3, 5)),))
    keeper = ChainKeeper(config, stage_config=None, plan_kv=None, session="s")  # type: ignore[arg-type]
    keeper._view = SimpleNamespace(nodes=view, rtt_s=dict)  # type: ignore[assignment]
    return keeper


def test_of_two_heads_on_one_node_the_first_in_line_moves_to_an_idle_replica() -> None:
    heads = ("12D3KooWHeadA", "12D3KooWHeadB")
    shared = follower("12D3KooWShared", 50051, heads)
    idle = follower("12D3KooWSpare", 50052, ())
    first, second = sorted(heads, key=lambda h: not first_in_line(shared.peer_id, heads, h))
    mover = keeper_on(shared, first, [shared, idle])
    current, best = mover.rebalance_option()
    assert best.peer_ids[1:] == [idle.peer_id] and best.cost < current * (1 - GAIN)
    assert keeper_on(shared, second, [shared, idle]).rebalance_option() is None
    # Once the first moved, the idle replica serves it and the second head stays.
    moved = [
        replace(shared, heads=1, head_ids=(second,)),
        replace(idle, heads=1, head_ids=(first,)),
    ]
    assert keeper_on(moved[0], second, moved).rebalance_option() is None
    # A head alone on its node never moves, however cheap another replica looks.
    alone = replace(shared, heads=1, head_ids=(first,), throughput=10.0)
    assert keeper_on(alone, first, [alone, idle]).rebalance_option() is None


def test_a_chain_shares_its_stages_when_a_node_of_it_runs_another_heads_sequences() -> None:
    me, other = "12D3KooWHeadA", "12D3KooWHeadB"
    node = follower("12D3KooWNode", 50051, (me,))
    assert not keeper_on(node, me, [node]).shares_stages()
    # Another head that holds KV there but runs nothing doesn't take the node's time.
    shared = replace(node, heads=2, head_ids=(me, other), running_head_ids=(me,))
    assert not keeper_on(shared, me, [shared]).shares_stages()
    busy = replace(shared, running_head_ids=(me, other))
    assert keeper_on(busy, me, [busy]).shares_stages()
    # Another head busy on a node outside the chain (a replica) doesn't count.
    replica = follower("12D3KooWSpare", 50052, (other,))
    replica = replace(replica, running_head_ids=(other,))
    assert not keeper_on(node, me, [node, replica]).shares_stages()


def test_init_stages_leaves_a_node_that_fails_out_and_plans_again_without_it() -> None:
    """In the engine (a node that turned unreachable after the head's probe): the stage whose
    ``InitStage`` fails is left out with its cause, and the next chain takes the replica."""
    ghost = follower("12D3KooWGhost", 50051, ())
    good = follower("12D3KooWGood", 50052, ())
    keeper = keeper_on(ghost, "12D3KooWHead", [ghost, good])
    keeper._view.refresh = lambda: None  # type: ignore[attr-defined]
    keeper.head = replace(keeper.head, chain_timeout=5.0)
    initialized = []

    def init(remote) -> None:
        if remote.peer_id == ghost.peer_id:
            raise StageUnreachable(f"{remote.address} is unreachable (UNAVAILABLE)")
        initialized.append(remote.peer_id)

    keeper._init = init  # type: ignore[method-assign]
    keeper.init_stages()
    remotes = [r.peer_id for r in keeper.remotes]
    for remote in keeper.remotes:
        remote.close()
    assert remotes == [good.peer_id] == initialized
    assert keeper.describe_exclusions() == {
        ghost.peer_id: "StageUnreachable: 127.0.0.1:50051 is unreachable (UNAVAILABLE)"
    }
