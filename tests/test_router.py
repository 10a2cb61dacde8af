"""Scale-out with real processes: heads spread over replicas, and the router in front of them.

Two heads start on the one replica of the tail span there is (the second gets a fair share of its
KV cache). When a second replica joins, one head moves to it, and only one: each head's chain
then takes a different replica (no flags), and the head that shrank grows back. A head that joins
later takes the idle replica. The router (``python -m molink.entrypoints.router``) finds both
heads in the DHT and serves the OpenAI API for them; greedy outputs through it equal one vLLM
process. A head told to stop (SIGTERM) and a head killed (``kill -9``) during greedy streams:
every stream completes through the other head, token for token and character for character as
an undisturbed run, with one ``id`` and usage that adds up. The stitching itself is unit-tested
at the end.
"""

from __future__ import annotations

import asyncio
import copy
import json
from signal import SIGTERM

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import QWEN3_ENGINE_FLAGS, NodeProcess, Swarm, free_port
from probes import eventually, get, scrape, status, value
from reference import STREAM_TOKENS, assert_same, pipeline_outputs, stream_chunks

from molink.entrypoints.router.heads import Head, HeadDirectory
from molink.entrypoints.router.stitching import StreamStitcher, not_resumable

FLAGS = QWEN3_ENGINE_FLAGS
HEAD_FLAGS = [*FLAGS, "--step-timeout", "15"]
WAIT_S = 240.0
ROUTER_KEY = "router-test-key"


def start_router(swarm: Swarm, peer: NodeProcess, *extra: str) -> NodeProcess:
    port = free_port()
    args = ["--initial_peer", peer.grpc_address, "--host", "127.0.0.1", "--port", str(port)]
    router = NodeProcess(
        "router", [*args, *extra], swarm.log_dir, port, 0, module="molink.entrypoints.router"
    )
    swarm.nodes.append(router)
    router.wait_healthy()
    return router


def ready_heads(router: NodeProcess) -> list[str]:
    code, body = get(router.base_url + "/ready")
    return json.loads(body).get("heads", []) if code == 200 else []


def followers_of(nodes: list[NodeProcess]) -> list[int]:
    """How many heads each follower serves."""
    return [len(status(n)["heads"]) for n in nodes]


@pytest.fixture(scope="module")
def scale_out(module_swarm: Swarm, qwen3_model: str):
    a = module_swarm.start("a", qwen3_model, "3,5", FLAGS)
    head1 = module_swarm.start("head1", qwen3_model, "0,2", HEAD_FLAGS, peers=[a])
    head1.wait_healthy()
    head2 = module_swarm.start("head2", qwen3_model, "0,2", HEAD_FLAGS, peers=[a])
    head2.wait_healthy()
    assert followers_of([a]) == [2]  # the one replica there is
    b = module_swarm.start("b", qwen3_model, "3,5", FLAGS, peers=[a])
    router = start_router(module_swarm, a, "--api-key", ROUTER_KEY)
    eventually(lambda: len(ready_heads(router)) == 2, timeout=WAIT_S, what="two ready heads")
    return {"followers": [a, b], "heads": [head1, head2], "router": router}


def test_two_heads_on_one_replica_spread_when_another_joins(scale_out):
    heads = scale_out["heads"]
    eventually(
        lambda: followers_of(scale_out["followers"]) == [1, 1],
        timeout=WAIT_S,
        what="a head to move to the new replica",
    )

    def rebalances() -> list[float]:  # a head's /metrics may lag its engine by a second
        return sorted(value(scrape(h), "molink_rewires_total", cause="rebalance") for h in heads)

    eventually(lambda: rebalances() == [0, 1], timeout=30, what="one rebalance, by one head")
    # The second head got a fair share of the first replica's KV cache: the first shrank. Once
    # they were apart, it grew back to a whole cache (the second started with a share).
    eventually(
        lambda: (
            [value(scrape(h), "molink_rewires_total", cause="kv_resize") for h in heads] == [2, 0]
        ),
        timeout=60,
        what="the first head shrunk, then grown back",
    )
    assert all(value(scrape(h), "molink_stage_losses_total", cause="lost") == 0 for h in heads)


def test_the_router_answers_like_one_vllm_process(scale_out, qwen3_model, qwen3_reference):
    router = scale_out["router"]
    # (a head that just grew back rewires once: both must be ready again before the load)
    eventually(lambda: len(ready_heads(router)) == 2, timeout=WAIT_S, what="two ready heads")
    client = openai.OpenAI(base_url=router.base_url + "/v1", api_key=ROUTER_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [qwen3_model]
    got = asyncio.run(pipeline_outputs(router.base_url, qwen3_model, key=ROUTER_KEY))
    assert_same(qwen3_reference, got)
    sent = [h["sent"] for h in json.loads(get(router.base_url + "/swarm")[1])["heads"]]
    assert len(sent) == 2 and min(sent) > 0, f"both heads should have served: {sent}"
    # Bad input gets the head's 4xx; a wrong key gets the router's 401.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=qwen3_model, prompt="hi", max_tokens=-1)
    bad = openai.OpenAI(base_url=router.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


async def streams(router: NodeProcess, model: str, during=None) -> list[dict]:
    """Every ``STREAM_PROMPTS`` prompt streamed through the router at once (greedy, EOS
    ignored): token ids, text, chunk ids and usage; ``during`` runs once all have 16 tokens."""
    results = await stream_chunks(
        router.base_url, ROUTER_KEY, model, during, stream_options={"include_usage": True}
    )
    out = []
    for chunks in results:
        got: dict = {"ids": [], "text": "", "chunk_ids": {c.id for c in chunks}, "usage": None}
        for chunk in chunks:
            if chunk.usage is not None:
                got["usage"] = chunk.usage.model_dump()
            for choice in chunk.choices:
                got["ids"] += choice.token_ids or []
                got["text"] += choice.text
        out.append(got)
    return out


def router_metric(router: NodeProcess, name: str) -> float:
    text = get(router.base_url + "/metrics")[1]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def assert_streams_match(reference: list[dict], got: list[dict]) -> None:
    for i, (ref, out) in enumerate(zip(reference, got, strict=True)):
        assert out["ids"] == ref["ids"], f"stream {i}: tokens differ"
        assert out["text"] == ref["text"], f"stream {i}: text differs"
        assert len(out["chunk_ids"]) == 1, f"stream {i}: several ids {out['chunk_ids']}"
        usage = out["usage"]
        assert usage["completion_tokens"] == STREAM_TOKENS
        assert usage["prompt_tokens"] == ref["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + STREAM_TOKENS


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_no_stream_dies_with_its_head(scale_out, module_swarm, qwen3_model, how):
    router = scale_out["router"]
    reference = asyncio.run(streams(router, qwen3_model))
    assert all(len(r["ids"]) == STREAM_TOKENS for r in reference)
    moved = router_metric(router, "molink_router_resumed_total")
    victim = scale_out["heads"][0]

    def lose_head() -> None:  # the head with the most of the streams
        nonlocal victim
        busiest = max(json.loads(get(router.base_url + "/swarm")[1])["heads"],
                      key=lambda h: h["outstanding"])  # fmt: skip
        victim = next(h for h in scale_out["heads"] if h.base_url == busiest["url"])
        if how == "kill":
            victim.kill()
        else:
            victim._signal(SIGTERM)

    got = asyncio.run(streams(router, qwen3_model, during=lose_head))
    assert_streams_match(reference, got)
    if how == "kill":  # (a head told to stop may finish its streams itself before it exits)
        assert router_metric(router, "molink_router_resumed_total") > moved
    eventually(lambda: len(ready_heads(router)) == 1, timeout=WAIT_S, what="the lost head gone")
    victim.kill()  # (after SIGTERM vLLM's shutdown sometimes hangs; see docs/deployment.md)
    if how == "sigterm":  # the next case needs two heads again
        # A new head takes the lost one's place: the router finds it without any change.
        peers = scale_out["followers"][:1]
        new = module_swarm.start("head3", qwen3_model, "0,2", HEAD_FLAGS, peers=peers)
        scale_out["heads"] = [*(h for h in scale_out["heads"] if h is not victim), new]
        eventually(lambda: len(ready_heads(router)) == 2, timeout=WAIT_S, what="the new head")
        # It takes the replica the stopped head left idle (no flags): at once, or, when it
        # chose before that replica announced it was idle, by a rebalance soon after.
        eventually(
            lambda: followers_of(scale_out["followers"]) == [1, 1],
            timeout=WAIT_S,
            what="the new head on the idle replica",
        )


# ---------------------------------------------------------------- stitching, no processes
def completion_chunk(text: str, ids: list[int], finish: str | None = None, **extra) -> dict:
    choice = {"index": 0, "text": text, "token_ids": ids, "finish_reason": finish, **extra}
    return {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m",
            "choices": [choice]}  # fmt: skip


def test_a_cut_completion_stream_continues_from_its_token_ids():
    body = {"model": "m", "prompt": "hi", "max_tokens": 5, "min_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    s = StreamStitcher("completion", copy.deepcopy(body))
    assert s.first_request()["return_token_ids"] is True
    first = s.from_head(completion_chunk("A", [10], prompt_token_ids=[1, 2]))
    assert "token_ids" not in first["choices"][0] and "prompt_token_ids" not in first["choices"][0]
    s.from_head(completion_chunk("B", [11]))
    assert s.can_continue()
    rest = s.continuation()
    assert rest["prompt"] == [1, 2, 10, 11]
    assert rest["max_tokens"] == 3 and rest["min_tokens"] == 1
    assert rest["stream"] and rest["return_token_ids"]
    chunk = completion_chunk("C", [12])
    chunk["id"], chunk["created"] = "cmpl-other", 99
    out = s.from_continuation(chunk)
    assert (out["id"], out["created"], out["choices"][0]["text"]) == ("cmpl-1", 7, "C")
    usage = {"id": "cmpl-other", "choices": [], "usage": {"prompt_tokens": 4,
             "completion_tokens": 3, "total_tokens": 7}}  # fmt: skip
    assert s.from_continuation(usage)["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
    }


def test_a_cut_chat_stream_continues_as_chat_chunks():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_completion_tokens": 4, "temperature": 0.0}  # fmt: skip
    s = StreamStitcher("chat", body)
    role = {"id": "chatcmpl-1", "created": 3, "model": "m", "prompt_token_ids": [5, 6],
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}  # fmt: skip
    s.from_head(role)
    word = {"index": 0, "delta": {"content": "Yo"}, "token_ids": [8]}
    s.from_head({"id": "chatcmpl-1", "created": 3, "model": "m", "choices": [word]})
    rest = s.continuation()
    assert rest["prompt"] == [5, 6, 8] and rest["max_tokens"] == 3 and rest["temperature"] == 0.0
    assert "messages" not in rest
    out = s.from_continuation(completion_chunk("!", [9], finish="length"))
    assert out["object"] == "chat.completion.chunk" and out["id"] == "chatcmpl-1"
    assert out["choices"][0]["delta"] == {"content": "!"}
    assert out["choices"][0]["finish_reason"] == "length"
    assert not s.can_continue()  # finished


def test_streams_that_cannot_continue_exactly_say_why():
    assert not_resumable("completion", {"prompt": ["a", "b"]}) == "it has several prompts"
    assert not_resumable("completion", {"prompt": "a", "n": 2})
    assert not_resumable("chat", {"messages": [], "tools": [{}]})
    assert not_resumable("completion", {"prompt": [1, 2, 3]}) is None
    s = StreamStitcher("completion", {"prompt": "a"})
    s.from_head({"choices": [{"index": 0, "text": "x", "prompt_token_ids": [1]}]})
    assert not s.can_continue()  # a chunk came without its token ids


def test_the_head_with_least_outstanding_work_is_picked():
    directory = HeadDirectory(None, static_urls=["http://a:1", "http://b:2", "http://c:3"])
    a, b, c = directory.heads.values()
    assert directory.pick() is None  # none checked ready yet
    for head, outstanding in ((a, 2), (b, 1), (c, 1)):
        head.ready, head.outstanding = True, outstanding
    c.sent = 5
    assert directory.pick() is b
    assert directory.pick(exclude={b.url}) is c
    directory.failed(b, "HTTP 503")
    assert directory.pick() is c and "HTTP 503" in directory.unavailable_cause()
    assert isinstance(a, Head)


def test_a_head_that_flaps_keeps_the_event_its_streams_watch():
    """A head busy for a moment (its /ready 503) and ready again is the same head: streams
    opened before still watch the event that its exit sets."""

    async def run() -> None:
        statuses = [200, 503, 200]
        app = web.Application()

        async def ready(_: web.Request) -> web.Response:
            return web.json_response({"ready": True}, status=statuses.pop(0))

        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        directory = HeadDirectory(None, static_urls=[f"http://127.0.0.1:{port}"])
        (head,) = directory.heads.values()
        async with aiohttp.ClientSession() as session:
            await directory.refresh(session)
            watched = head.gone  # what a stream opened now waits on
            await directory.refresh(session)  # busy: 503
            await directory.refresh(session)  # ready again
            assert head.ready and head.gone is watched
            await runner.cleanup()  # the head exits: nothing listens
            await directory.refresh(session)
        assert watched.is_set() and not head.ready

    asyncio.run(run())


def test_a_head_slow_to_answer_is_busy_not_gone(monkeypatch: pytest.MonkeyPatch):
    """A /ready that times out keeps the head's last answer for READY_GRACE_S, then it counts
    as unreachable."""
    from molink.entrypoints.router import heads

    monkeypatch.setattr(heads, "READY_TIMEOUT_S", 0.05)

    async def run() -> None:
        delays = [0.0, 1.0, 1.0]
        app = web.Application()

        async def ready(_: web.Request) -> web.Response:
            await asyncio.sleep(delays.pop(0))
            return web.json_response({"ready": True})

        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        directory = HeadDirectory(None, static_urls=[f"http://127.0.0.1:{port}"])
        (head,) = directory.heads.values()
        try:
            async with aiohttp.ClientSession() as session:
                await directory.refresh(session)
                assert head.ready
                await directory.refresh(session)  # times out: busy
                assert head.ready and not head.gone.is_set()
                monkeypatch.setattr(heads, "READY_GRACE_S", 0.0)
                await directory.refresh(session)  # times out, and has for too long
                assert not head.ready and "Timeout" in head.cause
        finally:
            await runner.cleanup()

    asyncio.run(run())


def test_sigusr1_writes_every_threads_stack_to_the_log(tmp_path):
    """``kill -USR1`` of a MoLink process (here a router with a head that isn't there) writes
    its threads' stacks to its log, and it keeps running."""
    port = free_port()
    args = ["--head", "http://127.0.0.1:9", "--host", "127.0.0.1", "--port", str(port)]
    router = NodeProcess("router", args, tmp_path, port, 0, module="molink.entrypoints.router")
    try:
        router.wait_healthy()
        assert router.dump_stacks()
        eventually(lambda: "most recent call first" in router.log(), timeout=10)
        assert router.poll() is None
    finally:
        router.stop()
