"""Several heads sharing one follower against one head alone, under the same total load.

    python -m benchmark.shared_follower           # demo model, -> resources/shared_follower.md
    python -m benchmark.shared_follower --quick   # a few tiny requests (smoke test)

A 2-stage swarm of the demo model (``benchmark/swarm.py``: the head and the follower each on its
own cores and address). First the head alone serves ``--streams`` concurrent requests; then more
heads join, up to each count of ``--heads``, and the heads split the same streams evenly, through
the one follower. A round keeps each head's streams running in a closed loop until it has sent
``--waves`` x as many requests, each with its own prompt (``--waves 1``: all at once). Each setup
gets a warm-up burst and ``--rounds`` rounds; the median round is reported, with its steady
throughput: the tokens that arrived while every stream was still running (before each head's last
request was sent), over that time. With ``--request-rate`` a round instead sends as many requests
as Poisson arrivals at that rate in all, split evenly over the heads: every setup then gets the
same arrival process (a closed loop's requests come in waves, so one head's prompts run while
none of its streams decode, and several heads' waves drift apart and overlap).

Every added head runs on the first head's cores, though in a deployment each head has a machine
of its own. So that the follower, not the heads' shared core, bounds every setup, the heads get
a light span by default (``--layers``: an eighth of the layers, 0-3 of the demo model) and the
follower the rest: what is measured is how well the follower serves several heads.

Reported: aggregate output tok/s of each setup and its ratio to one head, each head's TPOT p50,
and, from the follower's ``/metrics`` over the setup: the share of its steps that ran joined
with another head's in one forward pass, the share of the time it computed, the tokens per
forward pass and its compute time per token. The follower has ``--follower-kv-gib`` of KV
cache, each head ``--head-kv-gib``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmark.loadgen import make_prompts, measure_rounds, prompt_vocab, run_load
from benchmark.swarm import Swarm, SwarmSpec, demo_model, num_hidden_layers, parse_spans

SERVED_NAME = "bench"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def load(
    urls: list[str],
    prompts: list[list[int]],
    output_len: int,
    waves: int = 1,
    rate: float | None = None,
) -> dict:
    """Split ``prompts`` evenly over the heads at ``urls``, each share in a closed loop of
    ``len(share) // waves`` requests at a time, or (``rate``) as Poisson arrivals at ``rate``
    requests per second in all (each head its own ``rate / len(urls)``); per head and total."""
    share = len(prompts) // len(urls)
    started = time.perf_counter()
    per_head = await asyncio.gather(
        *(
            run_load(
                url,
                SERVED_NAME,
                prompts[i * share : (i + 1) * share],
                output_len,
                concurrency=None if rate else share // waves,
                request_rate=rate / len(urls) if rate else None,
                seed=i,
                progress=False,
            )  # fmt: skip
            for i, url in enumerate(urls)
        )
    )
    duration = time.perf_counter() - started
    tokens = sum(r["output_throughput_tok_s"] * r["duration_s"] for r in per_head)
    return {
        "output_throughput_tok_s": tokens / duration,
        "steady_output_tok_s": sum(r["steady_output_tok_s"] for r in per_head),
        "failed": sum(r["failed"] for r in per_head),
        "heads": per_head,
    }


def follower_counts(url: str) -> dict[str, float]:
    """What the follower at ``url`` ran so far: its steps, the steps joined with another head's,
    its forward passes, the tokens they computed, their compute seconds and the bytes of steps
    it received."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        body = response.read().decode()
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    passes = sums.get("molink_stage_step_seconds_count", 0.0)
    joined = sums.get("molink_stage_joined_steps_total", 0.0)
    return {
        "steps": passes - sums.get("molink_stage_joined_passes_total", 0.0) + joined,
        "joined": joined,
        "passes": passes,
        "tokens": sums.get("molink_stage_tokens_total", 0.0),
        "busy_s": sums.get("molink_stage_step_seconds_sum", 0.0),
        "received_bytes": sums.get("molink_hop_bytes_received_total", 0.0),
    }


def measure(urls: list[str], args: argparse.Namespace, follower: str) -> dict:
    before = follower_counts(follower)
    started = time.perf_counter()
    prompts = make_prompts(args.streams * args.waves, args.input_len, args.vocab, seed=1)
    asyncio.run(load(urls, prompts[: max(len(urls), args.streams // 4)], 16))  # warm-up
    rounds, median = measure_rounds(
        lambda: asyncio.run(load(urls, prompts, args.output_len, args.waves, args.request_rate)),
        args.rounds,
        f"{len(urls)} head(s)",
    )  # fmt: skip
    after = follower_counts(follower)
    ran = {name: after[name] - before[name] for name in after}
    return {
        "heads": len(urls),
        # the follower over the warm-up and the rounds
        "joined_share": ran["joined"] / max(ran["steps"], 1.0),
        "follower_busy": ran["busy_s"] / (time.perf_counter() - started),
        "follower_tokens_per_pass": ran["tokens"] / max(ran["passes"], 1.0),
        "follower_ms_per_token": 1000 * ran["busy_s"] / max(ran["tokens"], 1.0),
        "output_throughput_tok_s": statistics.median(r["output_throughput_tok_s"] for r in rounds),
        "steady_output_tok_s": statistics.median(r["steady_output_tok_s"] for r in rounds),
        "tpot_p50_ms": [h["tpot_ms"]["p50"] for h in median["heads"]],
        "ttft_p50_ms": [h["ttft_ms"]["p50"] for h in median["heads"]],
        "failed": sum(r["failed"] for r in rounds),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.shared_follower",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent requests in all")
    parser.add_argument(
        "--heads",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[2, 4],
        help="head counts to measure after one head, comma-separated (default 2,4)",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--waves",
        type=int,
        default=3,
        help="requests per stream in a round, sent in a closed loop (1: all at once)",
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals at this many requests per second in all, split evenly over the "
        "heads, instead of the closed loop (--streams x --waves requests a round)",
    )
    parser.add_argument(
        "--layers",
        type=parse_spans,
        default=None,
        help="the head's and the follower's spans (default: the head an eighth of the layers, "
        "0-3,4-29 for the demo model)",
    )
    parser.add_argument("--head-kv-gib", type=int, default=1)
    parser.add_argument("--follower-kv-gib", type=int, default=2)
    parser.add_argument("--wire-dtype", default="float16")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument(
        "--grpc-base-port",
        type=int,
        default=SwarmSpec.grpc_base_port,
        help=f"the first node's gRPC port; the others count up (default "
        f"{SwarmSpec.grpc_base_port})",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    parser.add_argument(
        "--quick", action="store_true", help="4 streams of 8 tokens, 1 round, 1 and 2 heads"
    )
    parser.add_argument(
        "--engine-args",
        type=shlex.split,
        default=shlex.split("--dtype float32 --enforce-eager --max-model-len 2048"),
        help='flags for every node, as one string: --engine-args="--max-num-seqs 64"',
    )
    args = parser.parse_args()
    if args.quick:
        args.streams, args.input_len, args.output_len, args.rounds, args.waves = 4, 16, 8, 1, 1
        args.heads = [2]
    model = args.model or demo_model()
    args.vocab = prompt_vocab(model)
    if args.layers is None:
        layers = num_hidden_layers(model)
        args.layers = [(0, layers // 8), (layers // 8 + 1, layers - 1)]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    spec = SwarmSpec(
        model=model,
        stages=2,
        layers=args.layers,
        port=args.port,
        grpc_base_port=args.grpc_base_port,
        node_args=[
            "--served-model-name",
            SERVED_NAME,
            "--wire_dtype",
            args.wire_dtype,
            *args.engine_args,
        ],  # fmt: skip
        env={"VLLM_CPU_KVCACHE_SPACE": str(args.follower_kv_gib)},
        head_env={"VLLM_CPU_KVCACHE_SPACE": str(args.head_kv_gib)},
        log_dir=args.output_dir / "logs" / "shared_follower",
    )
    with Swarm(spec) as swarm:
        log(f"one head: {swarm.describe()}")
        spans = " | ".join(f"{a}-{b}" for a, b in swarm.layers)
        # A follower without an API key serves /metrics on loopback only.
        follower = f"http://127.0.0.1:{args.port + 1}"
        urls = [swarm.base_url]
        setups = [measure(urls, args, follower)]
        for heads in args.heads:
            while len(urls) < heads:
                log(f"head {len(urls) + 1} joins")
                urls.append(swarm.add_head())
            setups.append(measure(urls, args, follower))
    alone, steady_alone = (setups[0][k] for k in ("output_throughput_tok_s", "steady_output_tok_s"))
    for setup in setups:
        setup["ratio"] = setup["output_throughput_tok_s"] / alone
        setup["steady_ratio"] = setup["steady_output_tok_s"] / steady_alone if steady_alone else 0
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(model).name,
        "command": " ".join(["python -m benchmark.shared_follower", *sys.argv[1:]]),
        "setups": setups,
        "layers": spans,
    }
    (args.output_dir / "shared_follower.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Heads sharing one follower ({results['date']})",
        "",
        f"Model {results['model']}, 2 stages (layers {spans}), {args.input_len}-token "
        f"prompts, {args.output_len} output tokens; "
        + (
            f"a round sends {args.streams * args.waves} requests as Poisson arrivals at "
            f"{args.request_rate:g} requests/s in all, split evenly over the heads"
            if args.request_rate
            else f"a round keeps the streams running until each head has sent {args.waves} x "
            "its share"
        )
        + f"; median of {args.rounds} rounds. Command: `{results['command']}`",
        "",
        "| Setup | Output tok/s (all heads) | Against one head | Steady: tok/s | against one "
        "head | TPOT p50 per head (ms) | TTFT p50 per head (ms) | Follower: steps joined | busy "
        "| tokens per pass | ms per token | Failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in setups:
        heads = setup["heads"]
        load_each = (
            f"{args.request_rate / heads:.2g} requests/s each"
            if args.request_rate
            else f"{args.streams // heads} concurrent each"
        )
        lines.append(
            f"| {heads} head{'s' if heads > 1 else ''}, {load_each} "
            f"| {setup['output_throughput_tok_s']:.1f} | {setup['ratio']:.2f} "
            f"| {setup['steady_output_tok_s']:.1f} | {setup['steady_ratio']:.2f} | "
            + " / ".join(f"{t:.0f}" for t in setup["tpot_p50_ms"])
            + " | "
            + " / ".join(f"{t:.0f}" for t in setup["ttft_p50_ms"])
            + f" | {setup['joined_share']:.0%} | {setup['follower_busy']:.0%} "
            f"| {setup['follower_tokens_per_pass']:.1f} | {setup['follower_ms_per_token']:.2f} "
            f"| {setup['failed']} |"
        )
    (args.output_dir / "shared_follower.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
