"""Several heads sharing one follower against one head alone, under the same total load.

    python -m benchmark.shared_follower           # demo model, -> resources/shared_follower.md
    python -m benchmark.shared_follower --quick   # a few tiny requests (smoke test)

A 2-stage swarm of the demo model (``benchmark/swarm.py``: the head and the follower each on its
own cores and address), with as many heads as the largest count of ``--heads``. A setup is a head
count: one head serves all ``--streams`` concurrent requests, or that many heads split the same
streams evenly, through the one follower (the other heads idle). A round keeps each head's
streams running in a closed loop until it has sent ``--waves`` x as many requests, each with its
own prompt (``--waves 1``: all at once). Each setup gets a warm-up burst; then every round runs
each setup in turn (in reverse order every other round, after a pause that lets the heads see
who is busy), so that the setups meet the same state of the machine and are compared round by
round. The median round of each setup is reported, with its steady throughput: the tokens that
arrived while every stream was still running (before each head's last request was sent), over
that time. With ``--request-rate`` a round instead sends as many requests as Poisson arrivals at
that rate in all, split evenly over the heads: every setup then gets the same arrival process (a
closed loop's requests come in waves, so one head's prompts run while none of its streams decode,
and several heads' waves drift apart and overlap).

Every added head runs on the first head's cores, though in a deployment each head has a machine
of its own. So that the follower, not the heads' shared core, bounds every setup, the heads get
a light span by default (``--layers``: an eighth of the layers, 0-3 of the demo model) and the
follower the rest: what is measured is how well the follower serves several heads.

Reported: aggregate output tok/s of each setup and its ratio to one head, each head's TPOT p50,
the slowest head's TPOT p50 over one head's in the same round (the median and the range over the
rounds), and, from the follower's ``/metrics`` over the setup's rounds: the share of its steps
that ran joined with another head's in one forward pass, the share of the time it computed, the
tokens per forward pass and its compute time per token. The follower has ``--follower-kv-gib`` of
KV cache, each head ``--head-kv-gib``.

With ``--trace`` every head writes a step trace (``--step-trace``) and the report adds, per
setup, how the follower grouped the heads' steps: the share of the steps that ran in passes of
1, 2, 3 ... heads and those passes' mean compute time, the heads' turnaround (a step's
sampled tokens back at its head until its next step reaches the follower), and each head's
decode cycle (between the results of two decode-only steps in a row).
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
from itertools import pairwise
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from benchmark.loadgen import make_prompts, prompt_vocab, run_load
from benchmark.swarm import Swarm, SwarmSpec, demo_model, num_hidden_layers, parse_spans
from molink.telemetry.step_trace import read

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


def run_round(
    urls: list[str], prompts: list[list[int]], args: argparse.Namespace, follower: str
) -> tuple[dict, dict[str, float]]:
    """One round of load on the heads at ``urls``: its result (:func:`load`) and what the
    follower ran meanwhile (:func:`follower_counts`' differences, and ``wall_s``)."""
    before = follower_counts(follower)
    started, started_unix = time.perf_counter(), time.time()
    result = asyncio.run(load(urls, prompts, args.output_len, args.waves, args.request_rate))
    ran = {"wall_s": time.perf_counter() - started}
    result["window_unix"] = [started_unix, time.time()]
    after = follower_counts(follower)
    ran.update({name: after[name] - before[name] for name in after})
    return result, ran


def summarize(heads: int, rounds: list[dict], follower_runs: list[dict], alone: list[dict]) -> dict:
    """A setup's rounds (``alone``: the one-head setup's, round for round) as one row."""
    ran = {name: sum(r[name] for r in follower_runs) for name in follower_runs[0]}
    median = sorted(rounds, key=lambda r: r["output_throughput_tok_s"])[len(rounds) // 2]
    slowest = [
        max(h["tpot_ms"]["p50"] for h in mine["heads"]) / one["heads"][0]["tpot_ms"]["p50"]
        for mine, one in zip(rounds, alone, strict=True)
    ]
    return {
        "heads": heads,
        # the follower over the setup's rounds
        "joined_share": ran["joined"] / max(ran["steps"], 1.0),
        "follower_busy": ran["busy_s"] / ran["wall_s"],
        "follower_tokens_per_pass": ran["tokens"] / max(ran["passes"], 1.0),
        "follower_ms_per_token": 1000 * ran["busy_s"] / max(ran["tokens"], 1.0),
        "output_throughput_tok_s": statistics.median(r["output_throughput_tok_s"] for r in rounds),
        "steady_output_tok_s": statistics.median(r["steady_output_tok_s"] for r in rounds),
        "tpot_p50_ms": [h["tpot_ms"]["p50"] for h in median["heads"]],
        "ttft_p50_ms": [h["ttft_ms"]["p50"] for h in median["heads"]],
        # the slowest head's TPOT p50 over one head's, round by round
        "slowest_tpot_vs_one_head": slowest,
        "failed": sum(r["failed"] for r in rounds),
        "rounds": rounds,
    }


def measure(urls: list[str], args: argparse.Namespace, follower: str) -> list[dict]:
    """Every setup (one head, then each count of ``--heads``), round by round in turn."""
    counts = [1, *args.heads]
    prompts = make_prompts(args.streams * args.waves, args.input_len, args.vocab, seed=1)
    for n in counts:  # warm-up
        asyncio.run(load(urls[:n], prompts[: max(n, args.streams // 4)], 16))
    rounds: dict[int, list[dict]] = {n: [] for n in counts}
    follower_runs: dict[int, list[dict]] = {n: [] for n in counts}
    for i in range(args.rounds):
        for n in counts if i % 2 == 0 else counts[::-1]:
            time.sleep(args.settle)  # the heads' view of who runs on the follower catches up
            result, ran = run_round(urls[:n], prompts, args, follower)
            log(
                f"    {n} head(s), round {i + 1}/{args.rounds}: "
                f"{result['output_throughput_tok_s']:.1f} tok/s, TPOT p50 "
                + " / ".join(f"{h['tpot_ms']['p50']:.0f}" for h in result["heads"])
                + f" ms, {result['failed']} failed"
            )
            rounds[n].append(result)
            follower_runs[n].append(ran)
    return [summarize(n, rounds[n], follower_runs[n], rounds[1]) for n in counts]


def pass_groups(traces: list[list[dict]], windows: list[list[float]], decode_rows: int) -> dict:
    """How the follower (the last stage) ran the steps that the heads' step traces
    (``traces``, one per head) record within ``windows`` ([start, end] unix times): per number
    of heads in a pass, the share of the steps, the passes' mean compute ms and mean tokens;
    the heads' median turnaround (ms from a step's sampled tokens reaching its head to its
    next step reaching the follower); and each head's decode cycle (the median ms between the
    results of two steps in a row that only decode, at most ``decode_rows`` tokens each: the
    pace of a stream while no prompt is being computed)."""
    # a pass's compute ms (one value per pass) -> its steps, its tokens
    passes: dict[float, list[int]] = {}
    turnaround = []
    decode_cycles = []
    for records in traces:
        mine = [r for r in records if any(a <= r["result"] <= b for a, b in windows)]
        for r in mine:
            steps_tokens = passes.setdefault(r["stages"][-1]["compute_ms"], [0, 0])
            steps_tokens[0] += 1
            steps_tokens[1] += r["tokens"]
        cycle = []
        for done, following in pairwise(mine):
            wait = following["stages"][-1]["arrived"] - done["result"]
            if 0 < wait < 10:  # the head had nothing else in flight (and wasn't idle long)
                turnaround.append(1e3 * wait)
                if max(done["tokens"], following["tokens"]) <= decode_rows:
                    cycle.append(1e3 * (following["result"] - done["result"]))
        decode_cycles.append(statistics.median(cycle) if cycle else None)
    steps = sum(heads for heads, _ in passes.values())
    by_size: dict[str, dict[str, float]] = {}
    for compute_ms, (heads, tokens) in passes.items():
        size = by_size.setdefault(
            str(heads), dict.fromkeys(("steps", "passes", "compute_ms", "tokens"), 0)
        )
        size["steps"] += heads
        size["passes"] += 1
        size["compute_ms"] += compute_ms
        size["tokens"] += tokens
    for size in by_size.values():
        size["compute_ms"] /= size["passes"]
        size["tokens"] /= size["passes"]
        size["share_of_steps"] = size["steps"] / steps
    return {
        "passes_by_heads": dict(sorted(by_size.items(), key=lambda kv: int(kv[0]))),
        "turnaround_ms_p50": statistics.median(turnaround) if turnaround else None,
        "decode_cycle_ms_p50": decode_cycles,
    }


def slowest_tpot(ratios: list[float]) -> str:
    """The median of a setup's TPOT ratios, with their range when there are several rounds."""
    median = f"{statistics.median(ratios):.2f}"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}-{max(ratios):.2f})"


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
        "--settle",
        type=float,
        default=10.0,
        help="seconds to wait before each round, so that each head sees which heads are busy "
        "on the follower (default 10: two announcements)",
    )
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
        "--trace",
        action="store_true",
        help="heads write step traces (--step-trace); the report adds how the follower grouped "
        "their steps into passes, the heads' turnaround, and each head's decode cycle",
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
        args.heads, args.settle = [2], 0.0
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
    traces = [spec.log_dir / f"head{n + 1}.trace.jsonl" for n in range(max(args.heads))]
    trace_args = [["--step-trace", str(path)] if args.trace else [] for path in traces]
    spec.head_args = trace_args[0]
    for path in traces:
        path.unlink(missing_ok=True)  # a trace file is appended to
    with Swarm(spec) as swarm:
        log(f"one head: {swarm.describe()}")
        spans = " | ".join(f"{a}-{b}" for a, b in swarm.layers)
        # A follower without an API key serves /metrics on loopback only.
        follower = f"http://127.0.0.1:{args.port + 1}"
        urls = [swarm.base_url]
        while len(urls) < max(args.heads):
            log(f"head {len(urls) + 1} joins")
            urls.append(swarm.add_head(trace_args[len(urls)]))
        setups = measure(urls, args, follower)
    if args.trace:
        records = [read(path) if path.exists() else [] for path in traces]  # one per head, in order
        for setup in setups:
            windows = [r["window_unix"] for r in setup["rounds"]]
            setup.update(
                pass_groups(records[: setup["heads"]], windows, args.streams // setup["heads"])
            )
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
        + f"; median of {args.rounds} rounds, the setups taking turns in each. Command: "
        f"`{results['command']}`",
        "",
        "| Setup | Output tok/s (all heads) | Against one head | Steady: tok/s | against one "
        "head | TPOT p50 per head (ms) | slowest head's over one head's (rounds) | TTFT p50 per "
        "head (ms) | Follower: steps joined | busy | tokens per pass | ms per token | Failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            + f" | {slowest_tpot(setup['slowest_tpot_vs_one_head'])} | "
            + " / ".join(f"{t:.0f}" for t in setup["ttft_p50_ms"])
            + f" | {setup['joined_share']:.0%} | {setup['follower_busy']:.0%} "
            f"| {setup['follower_tokens_per_pass']:.1f} | {setup['follower_ms_per_token']:.2f} "
            f"| {setup['failed']} |"
        )
    if args.trace:
        lines += [
            "",
            "From the heads' step traces: the follower's passes by the heads in them (the share "
            "of the steps that ran in such passes, their mean compute time and tokens), and the "
            "heads' turnaround p50 (sampled tokens back at a head until its next step reaches "
            "the follower); each head's decode cycle p50 (between the results of two decode-only "
            "steps in a row: a stream's pace while no prompt is computed; TPOT adds the prompts' "
            "passes).",
            "",
            "| Setup | Passes by heads in them: share of steps (compute ms, tokens) "
            "| Turnaround p50 (ms) | Decode cycle p50 per head (ms) |",
            "|---|---|---:|---:|",
        ]
        for setup in setups:
            groups = ", ".join(
                f"{n}: {g['share_of_steps']:.0%} ({g['compute_ms']:.0f} ms, {g['tokens']:.0f})"
                for n, g in setup["passes_by_heads"].items()
            )
            turnaround = setup["turnaround_ms_p50"]
            lines.append(
                f"| {setup['heads']} head{'s' if setup['heads'] > 1 else ''} | {groups} | "
                + (f"{turnaround:.0f}" if turnaround is not None else "-")
                + " | "
                + " / ".join("-" if c is None else f"{c:.0f}" for c in setup["decode_cycle_ms_p50"])
                + " |"
            )
    (args.output_dir / "shared_follower.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
