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
import signal
import time
import urllib.request

import openai
import pytest
from conftest import QWEN3_ENGINE_FLAGS, NodeProcess, Swarm
from test_head_routes import scrape, value

FLAGS = QWEN3_ENGINE_FLAGS
PROMPTS = [
    " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 3)) + f" {i}"
    for i in range(6)
]
MAX_TOKENS = 96


def status(node: NodeProcess) -> dict:
    with urllib.request.urlopen(node.base_url + "/status", timeout=10) as r:
        return json.load(r)


def wait_for(check, timeout: float = 240.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def serving(nodes: list[NodeProcess]) -> NodeProcess:
    """The follower the head currently streams through."""
    return wait_for(
        lambda: next((n for n in nodes if status(n)["state"] == "serving"), None),
        what="a serving follower",
    )


def standby_ready(head: NodeProcess, node: NodeProcess) -> bool:
    return bool(re.search(rf"Standby for .*: 127\.0\.0\.1:{node.grpc_port} ", head.log()))


async def stream_all(head: NodeProcess, model: str, during=None) -> list[list[int]]:
    """Greedy token ids of every prompt, streamed; ``during`` runs once all streams are going."""
    client = openai.AsyncOpenAI(
        base_url=head.base_url + "/v1", api_key="none", max_retries=0, timeout=600
    )
    started = [asyncio.Event() for _ in PROMPTS]

    async def one(prompt: str, event: asyncio.Event) -> list[int]:
        tokens: list[int] = []
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        async for chunk in stream:
            tokens += chunk.choices[0].token_ids or []
            if len(tokens) >= 16:
                event.set()
        return tokens

    tasks = [asyncio.create_task(one(p, e)) for p, e in zip(PROMPTS, started, strict=True)]
    try:
        if during is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=300)
            await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)
    finally:
        await client.close()


@pytest.fixture(scope="module")
def churn(module_swarm: Swarm, qwen3_model: str):
    head = module_swarm.start("head", qwen3_model, "0,2", FLAGS)
    a = module_swarm.start("a", qwen3_model, "3,5", FLAGS, peers=[head])
    b = module_swarm.start("b", qwen3_model, "2,5", FLAGS, peers=[head])  # overlaps the head
    head.wait_healthy()
    reference = asyncio.run(stream_all(head, qwen3_model))
    assert all(len(tokens) == MAX_TOKENS for tokens in reference)
    return head, [a, b], reference


def test_kill_9_of_a_serving_stage_loses_no_request(churn, qwen3_model):
    head, followers, reference = churn
    wait_for(lambda: any(standby_ready(head, n) for n in followers), what="a standby")
    victim = serving(followers)
    got = asyncio.run(stream_all(head, qwen3_model, during=victim.kill))
    assert got == reference
    log = head.log()
    assert "running request(s) preempted; they resume on the rebuilt chain" in log
    assert "Pipeline restored (epoch 1)" in log
    # Each request's loss is logged and counted, with the tokens it recomputes.
    assert re.search(r"Request cmpl-\S+ preempted \(its pipeline broke\): its \d+ computed", log)
    samples = scrape(head)
    assert value(samples, "molink_recomputed_tokens_total", cause="stage_loss") > 0
    assert value(samples, "molink_recoveries_total") == 1
    assert value(samples, "molink_requests_failed_total", cause="outage") == 0
    followers.remove(victim)
    assert status(followers[0])["state"] == "serving"


def test_sigterm_moves_requests_before_the_node_exits(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    # A node without --serving_layers takes the layers after the head's.
    c = module_swarm.start("c", qwen3_model, None, FLAGS, peers=[head])
    wait_for(lambda: standby_ready(head, c), what="c on standby")
    assert status(c)["serving_layers"] == [3, 5] and status(c)["span_chosen_automatically"]
    leaver = serving(followers)

    def sigterm() -> None:
        leaver.proc.send_signal(signal.SIGTERM)

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
    (last,) = followers  # no replica left

    def kill_then_replace() -> None:
        last.kill()
        followers[:] = [module_swarm.start("d", qwen3_model, "3,5", FLAGS, peers=[head])]

    got = asyncio.run(stream_all(head, qwen3_model, during=kill_then_replace))
    assert got == reference
    assert "Pipeline not restored yet: layers 3-5 are not served by any node" in head.log()


def test_hung_stage_is_replaced(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    e = module_swarm.start("e", qwen3_model, "3,5", FLAGS, peers=[head])
    wait_for(lambda: standby_ready(head, e), what="e on standby")
    hung = serving(followers)
    got = asyncio.run(stream_all(head, qwen3_model, during=lambda: hung._signal(signal.SIGSTOP)))
    assert got == reference  # gRPC keepalive (or --step-timeout) found it; e took over
    hung.kill()
    followers[:] = [e]


def test_restarted_head_finds_the_followers(churn, module_swarm, qwen3_model):
    head, followers, reference = churn
    head.kill()
    new_head = module_swarm.start("head2", qwen3_model, "0,2", FLAGS, peers=followers)
    new_head.wait_healthy()
    assert asyncio.run(stream_all(new_head, qwen3_model)) == reference
