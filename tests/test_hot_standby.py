"""Hot standbys (``--hot-standby``): what a standby's KV blocks hold, the mirror that feeds it, and
with real node processes, losses that a hot standby takes over with nothing to replay.

The first tests need no process; the last ones run a 3-stage chain of the tiny Qwen3 (head 0-1,
then 2-3 and 4-5, each with a replica), stream through it with the ``openai`` client and kill
serving nodes: every stream equals an undisturbed run.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from signal import SIGTERM

import pytest
from conftest import QWEN3_ENGINE_FLAGS, NodeProcess
from probes import eventually, status
from reference import STREAM_TOKENS, stream_all
from test_stage_engine import Sink, Worker, decode, prefill, work

from molink.core.head_session import HeadSession
from molink.core.hot_standby import (
    MIRROR_BACKLOG,
    KVValidity,
    StandbyMirror,
    StandbySink,
    held_positions,
    valid_prefix,
)
from molink.core.kv_regions import Region
from molink.core.replay_plan import ReplayItem
from molink.engine.stage_engine import StageEngine
from molink.executor.hot_standbys import HotStandbys

BLOCK = 4


def held(validity: KVValidity, blocks: list[int]) -> int:
    return valid_prefix(blocks, held_positions(validity.snapshot(range(20))), BLOCK)


def test_a_request_met_from_its_first_position_is_held_as_it_grows():
    v = KVValidity(BLOCK)
    v.written(1, 1, [(0, 6, [3, 7])])  # a prefill of 6 positions
    assert held(v, [3, 7]) == 6
    assert v.snapshot([3, 7, 9]) == [4, 2, 0]
    v.written(1, 2, [(6, 1, [3, 7])])
    v.written(1, 3, [(7, 1, [3, 7, 9])])  # a new block comes with position 8
    assert held(v, [3, 7, 9]) == 8
    v.written(1, 4, [(8, 1, [3, 7, 9])])
    assert held(v, [3, 7, 9]) == 9
    assert (v.epoch, v.last_step) == (1, 4)


def test_positions_written_after_a_gap_are_not_held():
    """A request first met mid-way (resumed as the standby became hot): its earlier KV is not
    here, so what it computes from there on is not what the serving node holds."""
    v = KVValidity(BLOCK)
    v.written(1, 1, [(5, 2, [1, 2])])
    assert held(v, [1, 2]) == 0
    assert v.snapshot([1, 2]) == [0, 0]
    # A request held whole finishes; its blocks go to one met mid-way, which writes into
    # block 4 at its second position.
    v.written(1, 2, [(0, 8, [4, 5])])
    assert v.snapshot([4, 5]) == [4, 4]
    v.written(1, 3, [(5, 1, [6, 4])])
    assert v.snapshot([4, 5]) == [1, 4] and held(v, [6, 4]) == 0


def test_a_rewrite_of_earlier_positions_drops_what_came_after_them():
    """After a rollback the steps in flight run again, maybe with other tokens (sampling): what
    was held after the rewritten positions is no longer known to match."""
    v = KVValidity(BLOCK)
    v.written(1, 1, [(0, 10, [1, 2, 3])])
    assert held(v, [1, 2, 3]) == 10
    v.written(2, 1, [(5, 1, [1, 2, 3])])
    assert held(v, [1, 2, 3]) == 6 and v.snapshot([1, 2, 3]) == [4, 2, 0]


def test_a_prefix_cached_request_is_held_where_its_shared_blocks_are():
    v = KVValidity(BLOCK)
    v.written(1, 1, [(0, 9, [1, 2, 3])])
    # A new request shares blocks 1 and 2 (8 cached positions) and computes from there.
    v.written(1, 2, [(8, 3, [1, 2, 8])])
    assert held(v, [1, 2, 8]) == 11 and held(v, [1, 2, 3]) == 9


def test_a_drain_waits_for_the_last_step_or_forgets():
    v = KVValidity(BLOCK, "layers 2-3")
    v.written(3, 5, [(0, 4, [1])])
    threading.Timer(0.1, v.written, args=(3, 7, [(4, 1, [1, 2])])).start()
    v.drain(3, 7, timeout=5)
    assert v.snapshot([1, 2]) == [4, 1] and not v.lost
    v.drain(3, 8, timeout=0.1)  # step 8 never comes
    assert v.snapshot([1, 2]) == [0, 0] and v.lost
    assert not v.wait_for(3, 0, 0)  # lost: not even an idle epoch counts
    v.follow()
    assert v.wait_for(4, 0, 0)
    v.clear("its step stream broke")
    assert not v.wait_for(4, 9, 5)  # returns at once


class Link:
    def __init__(self, address: str) -> None:
        self.address = address
        self.sent: list[tuple[int, object]] = []
        self.closed = False
        self.queued = 0
        self.last_step = 0

    def emit(self, work, output) -> None:
        self.sent.append((work.step_id, output))

    def fail(self, work, error: str) -> None:
        self.sent.append((work.step_id, error))

    def backlog(self) -> int:
        return self.queued

    def close(self) -> None:
        self.closed = True

    def stats(self) -> dict:
        return {"address": self.address}


def test_the_mirror_sends_every_step_but_replay_steps_and_drops_a_lagging_standby():
    primary, standby = Link("next"), Link("standby")
    mirror = StandbyMirror(primary, standby)
    replay = work(2, "a", prefill("r"))
    replay.replay = True
    for w in (work(1, "a", decode("x")), replay):
        mirror.emit(w, "rows")
    mirror.fail(work(3, "a", decode("x")), "boom")
    assert primary.sent == [(1, "rows"), (2, "rows"), (3, "boom")]
    assert standby.sent == [(1, "rows"), (3, "boom")]
    assert mirror.stats() == {"address": "next", "hot_standby": "standby"}
    standby.queued = MIRROR_BACKLOG
    mirror.emit(work(4, "a", decode("x")), "rows")
    # The standby gets the step as failed (it then forgets what it holds), and its stream ends.
    assert standby.sent[2][0] == 4 and "steps behind" in standby.sent[2][1]
    assert standby.closed and mirror.mirror is None
    mirror.emit(work(5, "a", decode("x")), "rows")  # the chain goes on without it
    assert [s for s, _ in primary.sent] == [1, 2, 3, 4, 5]
    mirror.close()
    assert primary.closed


class RecordingWorker(Worker):
    """Reports each request of a step as written at position 0 into the stage's block 5."""

    def kv_positions_written(self, so) -> list[tuple[int, int, list[int]]]:
        return [(0, n, [5]) for n in so.num_scheduled_tokens.values()]


def test_a_hot_standby_stage_counts_what_it_computes_and_reports_it_at_the_next_epoch():
    engine = StageEngine(RecordingWorker(), (3, 5))
    try:
        region = Region((5, 6))
        hot = KVValidity(32, "test")
        session = HeadSession("h", region=region, hot=hot)
        assert engine.start_epoch(session, 1, StandbySink(hot)) == [0, 0]
        for step_id in (1, 2):
            w = work(step_id, "h", decode("x"))
            w.epoch = 1
            engine.submit(w)
        hot.drain(1, 2, timeout=10)
        assert hot.last_step == 2 and not hot.lost
        # The head's block 0 is the stage's block 5: it holds 1 position.
        assert engine.start_epoch(session, 2, Sink()) == [1, 0]
        session.hot = None  # taken into the chain: a plain stage reports nothing
        assert engine.start_epoch(session, 3, Sink()) == []
    finally:
        engine.shutdown()


def test_a_replay_into_a_former_hot_standby_skips_what_it_holds():
    hot = HotStandbys(True, chain=None, wire=None, block_size=BLOCK, timeout=1)  # type: ignore[arg-type]
    node = object()
    plan = {
        "all": ReplayItem("all", tuple(range(6)), (0, 1), 6),
        "part": ReplayItem("part", tuple(range(9)), (2, 3, 4), 9),
        "none": ReplayItem("none", tuple(range(3)), (5,), 3),
    }
    hot._held[id(node)] = [4, 4, 4, 2, 0, 0]  # per block of the head's plan
    left = hot.skip_held(plan, node)  # type: ignore[arg-type]
    assert {r: i.start for r, i in left.items()} == {"part": 6, "none": 0}
    assert hot.skip_held(plan, node) is plan  # used once  # type: ignore[arg-type]


# ------------------------------------------------------------ real processes

# Room for streams long enough that a node started 16 tokens in comes up and becomes hot well
# before they end (about 12 s of decoding here; the node takes about 3).
FLAGS = [*QWEN3_ENGINE_FLAGS, "--max-model-len", "1024"]
LONG_STREAM_TOKENS = 960  # after prompts of up to 31 tokens
HEAD_FLAGS = [*FLAGS, "--min-micro-batches", "2", "--hot-standby"]
WAIT_S = 240.0


def hot(node: NodeProcess) -> bool:
    return "Hot standby for layers" in node.log()


@pytest.fixture(scope="module")
def chain(module_swarm, qwen3_model):
    head = module_swarm.start("head", qwen3_model, "0,1", HEAD_FLAGS)
    spans = {"2,3": [], "4,5": []}
    for span, nodes in spans.items():
        for name in ("a", "b"):
            nodes.append(
                module_swarm.start(f"{name}{span[0]}", qwen3_model, span, FLAGS, peers=[head])
            )
    head.wait_healthy()
    for nodes in spans.values():
        eventually(
            lambda nodes=nodes: any(hot(n) for n in nodes), timeout=WAIT_S, what="a hot standby"
        )
    reference = asyncio.run(stream_all(head, qwen3_model))
    assert all(len(tokens) == STREAM_TOKENS for tokens in reference)
    return head, spans, reference


def serving_of(nodes: list[NodeProcess]) -> NodeProcess:
    return eventually(
        lambda: next((n for n in nodes if status(n)["state"] == "serving"), None),
        timeout=WAIT_S,
        what="a serving node",
    )


def test_kill_9_of_the_middle_stage_is_taken_over_by_its_hot_standby(chain, qwen3_model):
    head, spans, reference = chain
    victim = serving_of(spans["2,3"])
    standby = next(n for n in spans["2,3"] if n is not victim)
    last_standby = next(n for n in spans["4,5"] if n is not serving_of(spans["4,5"]))
    got = asyncio.run(stream_all(head, qwen3_model, during=victim.kill))
    assert got == reference
    log = head.log()
    found = re.search(
        rf"127\.0\.0\.1:{standby.grpc_port} \[2-3\] was the hot standby: its KV cache holds "
        r"(\d+) of the (\d+) positions to refill",
        log,
    )
    assert found, log[-3000:]
    assert 0 < int(found[1]) <= int(found[2])
    assert "by replay" in log
    # The last span's hot standby was fed by the lost node: told so, it forgot what it held at
    # once (waiting for steps that will never come would hold up the restore).
    assert "the stage before it was lost; what its KV cache holds is forgotten" in (
        last_standby.log()
    )
    spans["2,3"].remove(victim)


def test_kill_9_of_the_last_stage_replays_nothing(chain, qwen3_model):
    """The last span's hot standby lost its mirror with the middle stage and became hot again
    from the new one: streams started after that are held whole."""
    head, spans, reference = chain
    victim = serving_of(spans["4,5"])
    standby = next(n for n in spans["4,5"] if n is not victim)
    eventually(lambda: hot(standby), timeout=WAIT_S, what="the hot standby")
    got = asyncio.run(stream_all(head, qwen3_model, during=victim.kill))
    assert got == reference
    found = re.search(
        rf"127\.0\.0\.1:{standby.grpc_port} \[4-5\] was the hot standby: its KV cache holds "
        r"(\d+) of the (\d+) positions to refill \(\d+ request\(s\) complete\); replaying the "
        r"other 0",
        head.log(),
    )
    assert found and int(found[1]) > 0, head.log()[-3000:]


def test_a_standby_that_joins_while_streams_run_becomes_hot_mid_stream(
    chain, module_swarm, qwen3_model
):
    """The head rewires to make it hot while the streams run, keeping every KV cache: the
    requests keep running, and every stream equals an undisturbed run."""
    head, spans, _ = chain
    started = time.monotonic()
    reference = asyncio.run(stream_all(head, qwen3_model, tokens=LONG_STREAM_TOKENS))
    undisturbed_s = time.monotonic() - started

    def join() -> None:
        node = module_swarm.start("c4", qwen3_model, "4,5", FLAGS, peers=[head])
        spans["4,5"].append(node)
        eventually(lambda: hot(node), timeout=WAIT_S, what="the new hot standby")

    started = time.monotonic()
    got = asyncio.run(stream_all(head, qwen3_model, during=join, tokens=LONG_STREAM_TOKENS))
    assert got == reference
    running = re.findall(
        r"a standby became hot \(.*\): (\d+) running request\(s\) keep running", head.log()
    )
    assert running and int(running[-1]) > 0, (
        f"the standby became hot after the streams (they took {undisturbed_s:.0f} s undisturbed,"
        f" {time.monotonic() - started:.0f} s with it)"
    )


def test_a_hot_standby_that_leaves_is_let_go_at_once(chain, qwen3_model):
    head, spans, _ = chain
    leaver = spans["4,5"][-1]  # the standby that became hot in the test before
    eventually(lambda: hot(leaver), timeout=WAIT_S, what="the hot standby")
    leaver.proc.send_signal(SIGTERM)
    assert leaver.wait_exit(timeout=20) == 0  # not the 30 s of --leave-timeout
    assert "The head moved off this node" in leaver.log()
    assert re.search(rf"Hot standby 127\.0\.0\.1:{leaver.grpc_port} \S+ is leaving", head.log())
