"""Several heads share one follower, with real node processes and the ``openai`` client.

The follower (layers 3-5) has room for 45 KV blocks; the heads run on default KV settings, and
one request of their ``--max-model-len`` needs 17 blocks. The first head takes all 45. A second
head, started while the first streams, gets its fair share (22): the first shrinks to 22 and
recomputes its running streams, which come out identical to an undisturbed run. A third head's
share (15) can't hold one request: it is refused with the reason. ``kill -9`` of the second head
leaves the first one's streams unchanged and frees its blocks: the first grows back to all 45,
and shrinks to its share again when a new head comes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from conftest import QWEN3_ENGINE_FLAGS
from probes import eventually, get, scrape, status, total, value
from reference import assert_same, pipeline_outputs, stream_all

# One block holds 32 tokens of 3 layers, each 1 KV head of 64 float32 keys and values.
BLOCK_BYTES = 32 * 64 * 2 * 4 * 3
FOLLOWER_BLOCKS = 45
FOLLOWER_ENV = {"VLLM_CPU_KVCACHE_SPACE": ""}  # so that --kv-cache-memory-bytes counts
FOLLOWER_FLAGS = [
    *QWEN3_ENGINE_FLAGS,
    "--kv-cache-memory-bytes",
    str(FOLLOWER_BLOCKS * BLOCK_BYTES),
    "--join-wait",  # so that two heads' steps share passes whatever the machine's load
    "1",
]


@pytest.fixture(scope="module")
def shared(module_swarm, qwen3_model):
    """The follower and the first head, which holds all of the follower's KV cache."""
    follower = module_swarm.start("shared", qwen3_model, "3,5", FOLLOWER_FLAGS, env=FOLLOWER_ENV)
    first = module_swarm.start("head1", qwen3_model, "0,2", QWEN3_ENGINE_FLAGS, peers=[follower])
    first.wait_healthy()
    return follower, [first]


async def rounds_until_started(head, model: str, start, round_s: float) -> tuple[list, object]:
    """Stream ``stream_all`` rounds on ``head`` until ``start()`` (run in a thread) returns, in
    two loops of back-to-back rounds half a round (``round_s``) apart, so that streams run at
    every moment; return every round and what ``start`` returned."""
    started = asyncio.ensure_future(asyncio.to_thread(start))
    rounds: list = []

    async def loop(delay: float) -> None:
        await asyncio.sleep(delay)
        while not started.done():
            rounds.append(await stream_all(head, model))

    await asyncio.gather(loop(0.0), loop(round_s / 2))
    return rounds, await started


def test_a_second_head_gets_a_fair_share_while_the_first_streams(
    shared, module_swarm, qwen3_model, qwen3_reference
):
    follower, heads = shared
    first = heads[0]
    assert [h["kv_blocks"] for h in status(follower)["heads"]] == [FOLLOWER_BLOCKS]
    began = time.monotonic()
    reference = asyncio.run(stream_all(first, qwen3_model))
    round_s = time.monotonic() - began

    def start_second():
        second = module_swarm.start(
            "head2", qwen3_model, "0,2", QWEN3_ENGINE_FLAGS, peers=[follower]
        )
        second.wait_healthy()
        return second

    rounds, second = asyncio.run(rounds_until_started(first, qwen3_model, start_second, round_s))
    heads.append(second)
    assert all(got == reference for got in rounds)
    # The first head shrank while its streams ran, and recomputed them...
    log = first.log()
    assert "this head's KV cache shrinks from 45 to 22 blocks" in log
    preempted = re.search(
        r"Rewiring without a loss, the KV cache was resized for the heads sharing a stage \(.*\): "
        r"(\d+) running "
        r"request\(s\) preempted",
        log,
    )
    assert preempted and int(preempted.group(1)) > 0
    samples = scrape(first)
    assert value(samples, "molink_rewires_total", cause="kv_resize") == 1
    assert value(samples, "molink_stage_losses_total", cause="lost") == 0
    assert value(samples, "molink_recomputed_tokens_total", cause="kv_resize") > 0
    # ...and the two hold disjoint halves.
    served = status(follower)["heads"]
    assert sorted(h["kv_blocks"] for h in served) == [22, 22]
    taken = [b for h in served for a, n in h["kv_block_runs"] for b in range(a, a + n)]
    assert len(taken) == len(set(taken)) == 44
    assert "Building the stage" in follower.log()
    assert follower.log().count("Building the stage") == 1  # weights loaded once
    for got in asyncio.run(both(heads, qwen3_model)):
        assert_same(qwen3_reference, got)


def swarm(head) -> dict:
    """The head's ``/swarm`` report."""
    code, body = get(head.base_url + "/swarm")
    assert code == 200, body
    return json.loads(body)


async def both(heads, model: str) -> list[list[dict]]:
    return await asyncio.gather(*(pipeline_outputs(h.base_url, model) for h in heads))


def test_a_head_without_room_is_refused_with_the_reason(shared, module_swarm, qwen3_model):
    follower, _ = shared
    third = module_swarm.start("head3", qwen3_model, "0,2", QWEN3_ENGINE_FLAGS, peers=[follower])
    assert third.wait_exit(timeout=300) != 0
    assert f"has no room for this head's KV cache: {BLOCK_BYTES} bytes free" in third.log()
    assert len(status(follower)["heads"]) == 2


def test_kill_9_of_one_head_leaves_the_other_unchanged_and_it_grows_back(
    shared, module_swarm, qwen3_model, qwen3_reference
):
    follower, (survivor, doomed) = shared  # the first head survives: it shrank for the second
    reference = asyncio.run(stream_all(survivor, qwen3_model))
    got = asyncio.run(stream_all(survivor, qwen3_model, during=doomed.kill))
    assert got == reference
    # The follower noticed the dead head's stream and freed its blocks...
    eventually(lambda: len(status(follower)["heads"]) == 1, timeout=60, what="the KV freed")
    assert "released this stage" in follower.log()
    # ...and offered them to the survivor, which grows back to the whole cache.
    eventually(
        lambda: [h["kv_blocks"] for h in status(follower)["heads"]] == [FOLLOWER_BLOCKS],
        timeout=120,
        what="the survivor grown back",
    )
    assert "this head's KV cache grows from 22 to 45 blocks" in survivor.log()
    eventually(lambda: get(survivor.base_url + "/ready")[0] == 200, timeout=60, what="ready")
    assert_same(qwen3_reference, asyncio.run(pipeline_outputs(survivor.base_url, qwen3_model)))
    samples = scrape(survivor)
    assert value(samples, "molink_rewires_total", cause="kv_resize") == 2
    assert value(samples, "molink_stage_losses_total", cause="lost") == 0
    # A new head gets its fair share of them again.
    new = module_swarm.start("head4", qwen3_model, "0,2", QWEN3_ENGINE_FLAGS, peers=[follower])
    new.wait_healthy()
    assert sorted(h["kv_blocks"] for h in status(follower)["heads"]) == [22, 22]
    # The survivor keeps one micro-batch in flight only while the new head runs sequences on
    # the follower too: the follower announces which heads run sequences on it.
    eventually(lambda: swarm(survivor)["stages_shared"] is False, timeout=30, what="not shared")

    def new_head_seen_running() -> None:
        eventually(lambda: swarm(survivor)["stages_shared"], timeout=60, what="shared")
        node = next(n for n in swarm(survivor)["nodes"] if n["role"] == "stage")
        assert len(node["heads"]) == 2

    rounds, _ = asyncio.run(rounds_until_started(new, qwen3_model, new_head_seen_running, 2.0))
    assert all(got == reference for got in rounds)
    eventually(lambda: swarm(survivor)["stages_shared"] is False, timeout=30, what="not shared")
    joined = total(scrape(follower), "molink_stage_joined_steps_total")
    for got in asyncio.run(both([survivor, new], qwen3_model)):
        assert_same(qwen3_reference, got)
    # Both heads' steps waited on the follower together, and shared its forward passes.
    assert total(scrape(follower), "molink_stage_joined_steps_total") > joined
