"""The time to first token the router adds by itself, without a model's noise.

    python -m benchmark.router_overhead            # 200 pairs -> stdout
    python -m benchmark.router_overhead --pairs 20

A real router process (``python -m molink.entrypoints.router --head URL``, pinned to the last
core) in front of a stand-in head in this process that answers every completion at once with
chunks shaped like a MoLink head's (the prompt's token ids in the first, a token id in each,
usage last). Each request goes straight to the stand-in and through the router, in turn (which
way goes first alternates), with the load client's ``run_load``. Reported: TTFT p50 each way and
the median (and p90) of the paired differences.

``benchmark/scale_out.py`` measures the same against a real head, where a prompt's prefill
varies by more than the router's share on slow CPUs (±150 ms on an AVX2 EPYC).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from benchmark.loadgen import run_load
from benchmark.processes import ManagedProcess

PROMPT = list(range(1000, 1128))  # 128 token ids
OUTPUT_TOKENS = 4


async def _ready(_: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def _completions(request: web.Request) -> web.StreamResponse:
    """A stream of ``OUTPUT_TOKENS`` chunks, then usage, at once."""
    await request.json()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    base = {"id": "cmpl-stand-in", "object": "text_completion", "created": 1, "model": "bench"}
    for i in range(OUTPUT_TOKENS):
        choice = {"index": 0, "text": f" t{i}", "logprobs": None, "token_ids": [500 + i]}
        choice["finish_reason"] = "length" if i == OUTPUT_TOKENS - 1 else None
        if i == 0:
            choice["prompt_token_ids"] = PROMPT
        await resp.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
    usage = {"prompt_tokens": len(PROMPT), "completion_tokens": OUTPUT_TOKENS}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    await resp.write(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def measure(pairs: int, head_port: int, router_port: int) -> dict[str, float]:
    """Start the stand-in and the router, send ``pairs`` requests each way; TTFT figures (ms)."""
    app = web.Application()
    app.router.add_get("/ready", _ready)
    app.router.add_post("/v1/completions", _completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", head_port).start()
    head = f"http://127.0.0.1:{head_port}"
    core = str((os.cpu_count() or 1) - 1)
    argv = ["--head", head, "--host", "127.0.0.1", "--port", str(router_port)]
    cmd = ["taskset", "-c", core, sys.executable, "-m", "molink.entrypoints.router", *argv]
    log = Path(tempfile.gettempdir()) / "molink-router-overhead.log"
    router = ManagedProcess(cmd, log, url=f"http://127.0.0.1:{router_port}", name="router")
    try:
        await asyncio.to_thread(router.wait_healthy, 300)
        ttft: dict[str, list[float]] = {"direct": [], "routed": []}
        ways = [("direct", head), ("routed", router.url)]
        for i in range(pairs):
            for label, url in ways[:: -1 if i % 2 else 1]:
                r = await run_load(url, "bench", [PROMPT], OUTPUT_TOKENS, progress=False)
                if r["failed"]:
                    raise RuntimeError(f"{label} request failed: {r['errors']}")
                ttft[label].append(r["ttft_ms"]["p50"])
    finally:
        router.stop()
        await runner.cleanup()
    added = sorted(r - d for d, r in zip(ttft["direct"], ttft["routed"], strict=True))
    return {
        "pairs": pairs,
        "direct_ttft_p50_ms": statistics.median(ttft["direct"]),
        "routed_ttft_p50_ms": statistics.median(ttft["routed"]),
        "added_p50_ms": statistics.median(added),
        "added_p90_ms": added[int(0.9 * (len(added) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--head-port", type=int, default=8711)
    parser.add_argument("--router-port", type=int, default=8712)
    args = parser.parse_args()
    result = asyncio.run(measure(args.pairs, args.head_port, args.router_port))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
