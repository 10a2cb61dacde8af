"""Several heads share one follower, with real node processes and the ``openai`` client.

The follower (layers 3-5) has room for 45 KV blocks; each head plans 20. Two heads serve
concurrent requests through it with outputs equal to single-process vLLM; a third finds no room
and is refused with the reason; ``kill -9`` of one head leaves the other's streams unchanged and
frees its blocks, which a new head then gets.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import QWEN3_ENGINE_FLAGS
from probes import eventually, status
from reference import ENGINE_FLAGS, assert_same, pipeline_outputs, stream_all

# One block holds 32 tokens of 3 layers, each 1 KV head of 64 float32 keys and values.
BLOCK_BYTES = 32 * 64 * 2 * 4 * 3
FOLLOWER_BLOCKS = 45  # two heads of 20 blocks (--num-gpu-blocks-override) fit, a third doesn't
FOLLOWER_ENV = {"VLLM_CPU_KVCACHE_SPACE": ""}  # so that --kv-cache-memory-bytes counts
FOLLOWER_FLAGS = [
    *QWEN3_ENGINE_FLAGS,
    "--kv-cache-memory-bytes",
    str(FOLLOWER_BLOCKS * BLOCK_BYTES),
]


@pytest.fixture(scope="module")
def shared(module_swarm, qwen3_model):
    follower = module_swarm.start("shared", qwen3_model, "3,5", FOLLOWER_FLAGS, env=FOLLOWER_ENV)
    heads = [
        module_swarm.start(f"head{i}", qwen3_model, "0,2", ENGINE_FLAGS, peers=[follower])
        for i in (1, 2)
    ]
    for head in heads:
        head.wait_healthy()
    return follower, heads


async def both(heads, model: str) -> list[list[dict]]:
    return await asyncio.gather(*(pipeline_outputs(h.base_url, model) for h in heads))


def test_two_heads_share_a_follower_with_exact_outputs(shared, qwen3_model, qwen3_reference):
    follower, heads = shared
    for got in asyncio.run(both(heads, qwen3_model)):
        assert_same(qwen3_reference, got)
    served = status(follower)["heads"]
    assert len(served) == 2 and {h["kv_blocks"] for h in served} == {20}
    regions = sorted((h["kv_first_block"], h["kv_blocks"]) for h in served)
    assert regions[0][0] + regions[0][1] <= regions[1][0]  # disjoint
    assert "Building the stage" in follower.log()
    assert follower.log().count("Building the stage") == 1  # weights loaded once


def test_a_head_without_room_is_refused_with_the_reason(shared, module_swarm, qwen3_model):
    follower, _ = shared
    third = module_swarm.start("head3", qwen3_model, "0,2", ENGINE_FLAGS, peers=[follower])
    assert third.wait_exit(timeout=300) != 0
    assert f"has no room for this head's KV cache: {5 * BLOCK_BYTES} bytes free" in third.log()
    assert len(status(follower)["heads"]) == 2


def test_kill_9_of_one_head_leaves_the_other_unchanged(
    shared, module_swarm, qwen3_model, qwen3_reference
):
    follower, (doomed, survivor) = shared
    reference = asyncio.run(stream_all(survivor, qwen3_model))
    got = asyncio.run(stream_all(survivor, qwen3_model, during=doomed.kill))
    assert got == reference
    # The follower noticed the dead head's stream and freed its blocks...
    eventually(lambda: len(status(follower)["heads"]) == 1, timeout=60, what="the KV freed")
    assert "released this stage" in follower.log()
    # ...which a new head gets.
    new = module_swarm.start("head4", qwen3_model, "0,2", ENGINE_FLAGS, peers=[follower])
    new.wait_healthy()
    assert_same(qwen3_reference, asyncio.run(pipeline_outputs(new.base_url, qwen3_model)))
