"""Two heads sharing one follower against one head alone, under the same total load.

    python -m benchmark.shared_follower           # demo model, -> resources/shared_follower.md
    python -m benchmark.shared_follower --quick   # a few tiny requests (smoke test)

A 2-stage swarm of the demo model (``benchmark/swarm.py``: the head and the follower on the spans
``molink split-plan`` prints, each on its own cores and address). First the head alone
serves ``--streams`` concurrent requests; then a second head joins (the head's span, on the
first head's cores: the heads' machine is shared, the follower's isn't) and each head serves half
of them at the same time, through the one follower. Each setup gets a warm-up burst and
``--rounds`` rounds; the median round is reported.

Reported: aggregate output tok/s of both setups and their ratio, and each head's TPOT p50. The
follower has ``--follower-kv-gib`` of KV cache, each head ``--head-kv-gib``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmark.loadgen import make_prompts, measure_rounds, prompt_vocab, run_load
from benchmark.swarm import Swarm, SwarmSpec, demo_model

SERVED_NAME = "bench"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def load(urls: list[str], prompts: list[list[int]], output_len: int) -> dict:
    """Split ``prompts`` evenly over the heads at ``urls``, all at once; per head and total."""
    share = len(prompts) // len(urls)
    started = time.perf_counter()
    per_head = await asyncio.gather(
        *(
            run_load(
                url, SERVED_NAME, prompts[i * share : (i + 1) * share], output_len, progress=False
            )  # fmt: skip
            for i, url in enumerate(urls)
        )
    )
    duration = time.perf_counter() - started
    tokens = sum(r["output_throughput_tok_s"] * r["duration_s"] for r in per_head)
    return {
        "output_throughput_tok_s": tokens / duration,
        "failed": sum(r["failed"] for r in per_head),
        "heads": per_head,
    }


def measure(urls: list[str], args: argparse.Namespace) -> dict:
    prompts = make_prompts(args.streams, args.input_len, args.vocab, seed=1)
    asyncio.run(load(urls, prompts[: max(len(urls), len(prompts) // 4)], 16))  # warm-up
    rounds, median = measure_rounds(
        lambda: asyncio.run(load(urls, prompts, args.output_len)), args.rounds,
        f"{len(urls)} head(s)",
    )  # fmt: skip
    return {
        "output_throughput_tok_s": statistics.median(r["output_throughput_tok_s"] for r in rounds),
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
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
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
    parser.add_argument("--quick", action="store_true", help="4 streams of 8 tokens, 1 round")
    parser.add_argument(
        "--engine-args",
        type=shlex.split,
        default=shlex.split("--dtype float32 --enforce-eager --max-model-len 2048"),
        help='flags for every node, as one string: --engine-args="--max-num-seqs 64"',
    )
    args = parser.parse_args()
    if args.quick:
        args.streams, args.input_len, args.output_len, args.rounds = 4, 16, 8, 1
    model = args.model or demo_model()
    args.vocab = prompt_vocab(model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    spec = SwarmSpec(
        model=model,
        stages=2,
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
        alone = measure([swarm.base_url], args)
        log("a second head joins")
        shared = measure([swarm.base_url, swarm.add_head()], args)
    ratio = shared["output_throughput_tok_s"] / alone["output_throughput_tok_s"]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(model).name,
        "command": " ".join(["python -m benchmark.shared_follower", *sys.argv[1:]]),
        "one_head": alone,
        "two_heads": shared,
        "ratio": ratio,
        "layers": spans,
    }
    (args.output_dir / "shared_follower.json").write_text(json.dumps(results, indent=2) + "\n")
    half = args.streams // 2
    lines = [
        f"# Two heads sharing one follower ({results['date']})",
        "",
        f"Model {results['model']}, 2 stages (layers {spans}), {args.input_len}-token "
        f"prompts, {args.output_len} output tokens, median of {args.rounds} rounds. "
        f"Command: `{results['command']}`",
        "",
        "| Setup | Output tok/s (all heads) | TPOT p50 per head (ms) | Failed |",
        "|---|---:|---:|---:|",
        f"| one head, {args.streams} concurrent | {alone['output_throughput_tok_s']:.1f} | "
        f"{alone['tpot_p50_ms'][0]:.0f} | {alone['failed']} |",
        f"| two heads, {half} concurrent each | {shared['output_throughput_tok_s']:.1f} | "
        + " / ".join(f"{t:.0f}" for t in shared["tpot_p50_ms"])
        + f" | {shared['failed']} |",
        "",
        f"Two heads / one head: **{ratio:.2f}** of the aggregate throughput.",
    ]
    (args.output_dir / "shared_follower.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
