"""The pipeline's reference: the same greedy requests through one vLLM process, and clients that
send them to a MoLink head and compare the answers, token for token (the streams through churn
are the benchmarks' load client, ``benchmark.loadgen.run_streams``).

One engine configuration is shared by the reference and every pipeline that is compared with it:
small ``max_num_batched_tokens`` (chunked prefill) and a KV cache of few blocks (preemption),
with many concurrent requests of different lengths, ``max_tokens`` and stop strings.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from conftest import NODE_ENV, QWEN3_ENGINE_FLAGS, NodeProcess

ENGINE = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 512,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 64,
    "block_size": 32,
    "num_gpu_blocks_override": 20,
    "seed": 0,
}
# A KV cache of few blocks on top of the shared limits: requests get preempted.
ENGINE_FLAGS = [*QWEN3_ENGINE_FLAGS, "--num-gpu-blocks-override", "20"]
WORDS = (
    "the quick brown fox jumps over the lazy dog while a small bird sings in the old tree "
    "and people walk along the river to see the boats and the bright sun above the hills"
).split()
LOGPROB_TOLERANCE = 1e-4


def make_requests(n: int = 14) -> list[dict]:
    requests = []
    for i in range(n):
        length = 6 + (i * 37) % 150  # 6..155 words: several prefill chunks at 64 tokens/step
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(length)]
        requests.append(
            {
                "prompt": " ".join(words),
                "max_tokens": 4 + (i * 13) % 60,
                "stop": ["the"] if i % 4 == 3 else None,
            }
        )
    return requests


REQUESTS = make_requests()


def reference_outputs(
    model: str, tmp: Path, requests: list[dict] = REQUESTS, engine: dict | None = None
) -> list[dict]:
    """Greedy token ids, logprobs and text of ``requests`` from one vLLM process (``engine``,
    default ``ENGINE``)."""
    spec, out = tmp / "spec.json", tmp / "out.json"
    engine = ENGINE if engine is None else engine
    spec.write_text(json.dumps({"model": model, "engine": engine, "requests": requests}))
    cmd = [sys.executable, str(Path(__file__).parent / "reference_run.py"), str(spec), str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, **NODE_ENV}, timeout=600)
    return json.loads(out.read_text())


async def pipeline_outputs(
    base_url: str, model: str, requests: list[dict] = REQUESTS, key: str = "none"
) -> list[dict]:
    """The same greedy ``requests``, all at once, through the OpenAI API at ``base_url``."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)

    async def one(r: dict) -> dict:
        resp = await client.completions.create(
            model=model,
            prompt=r["prompt"],
            max_tokens=r["max_tokens"],
            stop=r["stop"],
            temperature=0.0,
            logprobs=1,
            extra_body={"return_token_ids": True},
        )
        choice = resp.choices[0]
        return {
            "token_ids": list(choice.token_ids),
            "logprobs": list(choice.logprobs.token_logprobs),
            "text": choice.text,
        }

    try:
        return await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()


def assert_same(reference: list[dict], got: list[dict]) -> None:
    """Identical tokens and text, logprobs within ``LOGPROB_TOLERANCE``."""
    for i, (ref, out) in enumerate(zip(reference, got, strict=True)):
        if out["token_ids"] != ref["token_ids"]:
            pairs = zip(out["token_ids"], ref["token_ids"], strict=False)
            at = next(
                (k for k, (a, b) in enumerate(pairs) if a != b),
                min(len(out["token_ids"]), len(ref["token_ids"])),
            )
            raise AssertionError(
                f"request {i}: tokens differ from token {at} of {len(ref['token_ids'])}: "
                f"{out['token_ids'][at : at + 3]} (logprobs {out['logprobs'][at : at + 3]}), "
                f"one vLLM process {ref['token_ids'][at : at + 3]} "
                f"(logprobs {ref['logprobs'][at : at + 3]})"
            )
        assert out["text"] == ref["text"]
        for a, b in zip(out["logprobs"], ref["logprobs"], strict=True):
            assert abs(a - b) <= LOGPROB_TOLERANCE, f"request {i}: logprob {a} vs {b}"


# ------------------------------------------------------------- streams through churn
STREAM_PROMPTS = [
    " ".join(["the quick brown fox jumps over the lazy dog"] * (1 + i % 3)) + f" {i}"
    for i in range(6)
]
STREAM_TOKENS = 96


async def stream_chunks(
    base_url: str,
    api_key: str,
    model: str,
    during: Callable[[], object] | None = None,
    tokens: int = STREAM_TOKENS,
    **options: Any,
) -> list[list[Any]]:
    """The chunks of every ``STREAM_PROMPTS`` prompt, streamed at once through the ``openai``
    client (greedy, ``tokens`` each, EOS ignored, token ids asked for; ``options`` go to
    ``completions.create``); ``during`` runs (in a thread) once every stream has 16 tokens."""
    client = openai.AsyncOpenAI(
        base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600
    )
    started = [asyncio.Event() for _ in STREAM_PROMPTS]

    async def one(prompt: str, event: asyncio.Event) -> list[Any]:
        chunks: list[Any] = []
        received = 0
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=tokens,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
            **options,
        )
        async for chunk in stream:
            chunks.append(chunk)
            received += sum(len(choice.token_ids or []) for choice in chunk.choices)
            if received >= 16:
                event.set()
        return chunks

    tasks = [asyncio.create_task(one(p, e)) for p, e in zip(STREAM_PROMPTS, started, strict=True)]
    try:
        if during is not None:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=300)
            await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)
    finally:
        await client.close()


async def stream_all(
    head: NodeProcess,
    model: str,
    during: Callable[[], object] | None = None,
    tokens: int = STREAM_TOKENS,
) -> list[list[int]]:
    """Greedy token ids of every ``STREAM_PROMPTS`` prompt, streamed from ``head`` (see
    :func:`stream_chunks`)."""
    streams = await stream_chunks(head.base_url, "none", model, during, tokens)
    return [
        [t for chunk in chunks for choice in chunk.choices for t in choice.token_ids or []]
        for chunks in streams
    ]
