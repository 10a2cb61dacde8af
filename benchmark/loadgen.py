"""Load generator for any OpenAI-compatible completions endpoint (MoLink, vLLM, ...).

A server started with ``--api-key`` gets the key from the ``OPENAI_API_KEY`` environment variable.

Closed loop (``--concurrency N``: N requests always in flight) or open loop (``--request-rate R``:
Poisson arrivals at R requests/s). Prompts are random token ids of an exact length and outputs are
forced to an exact length (``ignore_eos``), so runs are comparable. Reports output throughput and
TTFT, TPOT, ITL and end-to-end latency percentiles; failed requests are counted, not hidden.

    python -m benchmark.loadgen --base-url http://127.0.0.1:8000 --model smollm2 \\
        --num-prompts 32 --concurrency 32 --input-len 128 --output-len 128 --result-json r.json

Also the load client of the other benchmarks and of the tests: :func:`run_load` (timed load),
:func:`run_streams` (greedy streams that record their token ids, with an event such as a node's
death fired mid-decode: ``benchmark.churn``, ``tests/reference.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from tqdm import tqdm


@dataclass
class RequestResult:
    """Timing of one streamed request (seconds)."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""
    started: float = 0.0  # time.perf_counter() when it was sent

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def prompt_vocab(model: str) -> tuple[int, int]:
    """Token ids random prompts draw from: ``[100, 20000)``, within the model's vocabulary."""
    config = json.loads((Path(model) / "config.json").read_text())
    vocab_size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return 100, min(20000, int(vocab_size or 20000))


def make_prompts(n: int, input_len: int, vocab: tuple[int, int], seed: int) -> list[list[int]]:
    """``n`` prompts of exactly ``input_len`` random token ids in ``[vocab[0], vocab[1])``."""
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(input_len)] for _ in range(n)]


async def sse_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON chunks of a streamed OpenAI response, up to ``[DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send_request(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt: list[int] | str,
    output_len: int,
    timeout: float,
) -> RequestResult:
    """Stream one completion; record time to first token and gaps between tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(ok=False, started=start)
    last = start
    try:
        async with session.post(
            f"{base_url}/v1/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no tokens"
    except (TimeoutError, aiohttp.ClientError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


@dataclass
class Stream:
    """One streamed completion: its token ids and when each chunk arrived (monotonic s)."""

    tokens: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    error: str = ""


async def stream_into(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: list[int] | str,
    n: int,
    out: Stream,
) -> None:
    """Stream one greedy completion of ``n`` tokens (EOS ignored) into ``out``: token ids as
    they arrive; an error is recorded, not raised."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for chunk in sse_chunks(resp):
                if "error" in chunk:
                    out.error = str(chunk["error"])[:300]
                    return
                ids = chunk["choices"][0].get("token_ids") or []
                if ids:
                    out.tokens += ids
                    out.arrivals.append(time.monotonic())
    except (TimeoutError, aiohttp.ClientError) as e:
        out.error = f"{type(e).__name__}: {e}"


async def run_streams(
    url: str,
    model: str,
    prompts: list[list[int]] | list[str],
    n: int,
    after: int = 0,
    event: Callable[[], object] | None = None,
    timeout: float = 3600.0,
) -> tuple[list[Stream], float | None]:
    """Stream every prompt at once (``n`` tokens each); run ``event`` (in a thread) once every
    stream has ``after`` tokens, or every stream ended. ``timeout``: seconds per stream.

    Returns the streams and when the event fired (monotonic s), or None without an event.
    """
    streams = [Stream() for _ in prompts]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        tasks = [
            asyncio.create_task(stream_into(session, url, model, p, n, s))
            for p, s in zip(prompts, streams, strict=True)
        ]
        fired_at = None
        if event is not None:
            while min(len(s.tokens) for s in streams) < after and not all(t.done() for t in tasks):
                await asyncio.sleep(0.02)
            fired_at = time.monotonic()
            await asyncio.to_thread(event)
        await asyncio.gather(*tasks)
    return streams, fired_at


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 and mean, in milliseconds."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "mean": statistics.fmean(ordered) * 1000,
        "p50": pick(0.50),
        "p90": pick(0.90),
        "p99": pick(0.99),
    }


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Aggregate figures of one run."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "output_throughput_tok_s": output_tokens / duration if duration else 0.0,
        "request_throughput_req_s": len(ok) / duration if duration else 0.0,
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.output_tokens > 1]),
        "itl_ms": percentiles([gap for r in ok for gap in r.itl]),
        "e2e_ms": percentiles([r.e2e for r in ok]),
    }


def measure_rounds(
    run_round: Callable[[], dict], num_rounds: int, label: str
) -> tuple[list[dict], dict]:
    """Run ``num_rounds`` rounds of load (each a :func:`summarize`-like dict with
    ``output_throughput_tok_s`` and ``failed``), logging each as ``label``; returns every round
    and the median one by throughput."""
    rounds = []
    for i in range(num_rounds):
        r = run_round()
        print(f"    {label}, round {i + 1}/{num_rounds}: {r['output_throughput_tok_s']:.1f} "
              f"tok/s, {r['failed']} failed", file=sys.stderr, flush=True)  # fmt: skip
        rounds.append(r)
    ordered = sorted(rounds, key=lambda r: r["output_throughput_tok_s"])
    return rounds, ordered[len(ordered) // 2]


async def run_load(
    base_url: str,
    model: str,
    prompts: list[list[int]] | list[str],
    output_len: int,
    concurrency: int | None = None,
    request_rate: float | None = None,
    interval: float | None = None,
    timeout: float = 600.0,
    seed: int = 0,
    progress: bool = True,
    each: bool = False,
) -> dict:
    """Send every prompt: closed loop at ``concurrency``, Poisson arrivals at ``request_rate``
    (the same arrival times for the same ``seed``), or one request every ``interval`` seconds
    (all at once when none is given). ``each``: also the TTFT of every request, in the order of
    ``prompts`` (``ttft_each_ms``; None for a failed one)."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(concurrency or len(prompts))
    bar = tqdm(total=len(prompts), disable=not progress, desc="requests", file=sys.stderr)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=auth_headers()) as session:

        async def one(prompt: list[int] | str) -> RequestResult:
            async with semaphore:
                result = await send_request(session, base_url, model, prompt, output_len, timeout)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if request_rate:
                await asyncio.sleep(rng.expovariate(request_rate))
            elif interval:
                await asyncio.sleep(interval)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    summary = summarize(list(results), duration)
    summary["steady_output_tok_s"] = steady_throughput(list(results), start)
    if each:
        summary["ttft_each_ms"] = [r.ttft * 1000 if r.ok else None for r in results]
    return summary


def steady_throughput(results: list[RequestResult], started: float) -> float:
    """Output tok/s while a closed loop kept all its streams running: the streamed chunks (one
    token each) that arrived before its last request was sent, over that time since
    ``started``; 0.0 when every request was sent at once."""
    last_sent = max((r.started for r in results), default=started)
    window = last_sent - started
    if window <= 0.5:
        return 0.0
    arrived = 0
    for r in results:
        if r.ok and r.ttft:
            times = itertools.accumulate(r.itl, initial=r.started + r.ttft)
            arrived += sum(1 for t in times if t <= last_sent)
    return arrived / window


def auth_headers() -> dict[str, str]:
    """The bearer token for a server started with ``--api-key`` (from ``OPENAI_API_KEY``)."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    parser.add_argument("--model", required=True, help="model name as the server knows it")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument(
        "--vocab-range",
        type=int,
        nargs=2,
        default=(100, 1000),
        metavar=("LOW", "HIGH"),
        help="random prompt token ids are drawn from [LOW, HIGH)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    parser.add_argument("--result-json", default=None, help="write the results here as JSON")


def write_result(args: argparse.Namespace, result: dict) -> None:
    """Print ``result`` (with the run's settings) as JSON, and save it to ``--result-json``."""
    result["config"] = {k: v for k, v in vars(args).items() if k != "result_json"}
    text = json.dumps(result, indent=2)
    if args.result_json:
        with open(args.result_json, "w") as f:
            f.write(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.loadgen",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--num-prompts", type=int, default=32)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="closed loop: in flight")
    mode.add_argument("--request-rate", type=float, default=None, help="open loop: Poisson req/s")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first, not counted")
    args = parser.parse_args()

    prompts = make_prompts(
        args.num_prompts + args.warmup, args.input_len, args.vocab_range, args.seed
    )
    if args.warmup:
        asyncio.run(
            run_load(
                args.base_url,
                args.model,
                prompts[: args.warmup],
                8,
                concurrency=args.warmup,
                timeout=args.timeout,
                progress=False,
            )
        )
    result = asyncio.run(
        run_load(
            args.base_url,
            args.model,
            prompts[args.warmup :],
            args.output_len,
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            timeout=args.timeout,
            seed=args.seed,
        )
    )
    write_result(args, result)


if __name__ == "__main__":
    main()
