"""Compare single-node vLLM with MoLink pipelines under the same load, in one run.

    python -m benchmark.compare           # full run (over an hour on 2 cores) -> resources/
    python -m benchmark.compare --quick   # a few tiny requests per setup (smoke test)

Setups (one at a time, same model, same flags, same cores; a server the next measurement needs
too stays up for it, so the first pair's setups are measured last): plain vLLM; MoLink with 2 and 3
stages on loopback; 2 and 3 stages with every hop behind an emulated link (``--delay-ms``,
``--rate-mbit``) and 2 stages behind a far one (``--far-delay-ms``); MoLink setups with
micro-batching on (``--max-micro-batches`` default) and off (``--max-micro-batches 1``). vLLM and
2-stage loopback are also loaded with ``--heavy-requests`` concurrent requests. The setups behind
each target ratio are compared once more in paired rounds (``--paired A:B``: both servers up,
rounds alternating, ``--paired-rounds`` of each). MoLink nodes are separate machines: each node's
threads are bound to its own cores (``benchmark/swarm.py``); one labelled setup runs 2 stages on
one machine (shared cores). For each: a warm-up burst (not counted), then ``--rounds`` bursts of
``--num-requests`` concurrent requests; the median round is reported. On the emulated 3-stage
pipeline it also measures the TTFT of a long prompt on an idle pipeline and while decode streams
run, and those streams' TPOT with and without it.

Writes ``benchmark.json`` (every round), ``benchmark.md`` (the table, with hardware, model, load
and link settings) and ``benchmark.png`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.link_emulator import LinkSpec
from benchmark.loadgen import make_prompts, measure_rounds, prompt_vocab, run_load
from benchmark.swarm import Swarm, SwarmSpec, default_split, demo_model, plain_vllm

SERVED_NAME = "bench"
HEAVY_SETUPS = ("vllm", "molink2")  # also measured at --heavy-requests
PAIRED = "paired"  # the --only key of the paired rounds
PAIRED_PORT_OFFSET = 50  # the second server of a pair: HTTP and gRPC ports this much higher
TOK_S, TPOT = "output_throughput_tok_s", "tpot_p50_ms"


@dataclass(frozen=True)
class Setup:
    """One server configuration to measure."""

    key: str
    label: str
    stages: int = 0  # 0: plain vLLM
    link: LinkSpec = field(default_factory=LinkSpec)
    micro_batching: bool = True
    shared_cores: bool = False  # every node on every core (one machine), not its own cores


def setups(link: LinkSpec, far: LinkSpec) -> list[Setup]:
    wan = f"{link.delay_ms:g} ms, {link.rate_mbit:g} Mbit/s"
    far_wan = f"{far.delay_ms:g} ms, {far.rate_mbit:g} Mbit/s"
    return [
        Setup("vllm", "vLLM, one node"),
        Setup("molink2", "MoLink 2 stages, loopback", 2),
        Setup("molink2_off", "MoLink 2 stages, loopback, 1 batch in flight", 2, LinkSpec(), False),
        Setup("molink2_wan", f"MoLink 2 stages, {wan}", 2, link),
        Setup("molink2_far", f"MoLink 2 stages, {far_wan}", 2, far),
        Setup("molink2_far_off", f"MoLink 2 stages, {far_wan}, 1 batch in flight", 2, far, False),
        Setup(
            "molink2_shared",
            "MoLink 2 stages, loopback, one machine (shared cores)",
            2,
            shared_cores=True,
        ),
        Setup("molink3", "MoLink 3 stages, loopback", 3),
        Setup("molink3_wan", f"MoLink 3 stages, {wan}", 3, link),
        Setup("molink3_wan_off", f"MoLink 3 stages, {wan}, 1 batch in flight", 3, link, False),
    ]


@dataclass(frozen=True)
class Ratio:
    """A figure of the report: setup ``a``'s ``metric`` over setup ``b``'s."""

    a: str
    b: str
    what: str
    metric: str = TOK_S
    target: str = ""

    def describe(self, how: str) -> str:
        target = f"; target {self.target}" if self.target else ""
        return f"{self.what} ({how}{target})"


RATIOS = (
    Ratio("molink2", "vllm", "2 stages loopback / vLLM, tok/s", target="≥ 0.95"),
    Ratio("molink2_wan", "molink2", "2 stages emulated WAN / loopback, tok/s", target="≥ 0.9"),
    Ratio("molink2_wan", "molink2", "2 stages emulated WAN / loopback, TPOT p50", TPOT, "≤ 1.15"),
    Ratio("molink2_far", "molink2_far_off", "2 stages far WAN, micro-batching on / off, tok/s",
          target="≥ 1.4"),
    Ratio("molink2", "molink2_off", "2 stages loopback, micro-batching on / off, tok/s"),
    Ratio("molink3_wan", "molink3", "3 stages emulated WAN / loopback, tok/s"),
    Ratio("molink3_wan", "molink3_wan_off",
          "3 stages emulated WAN, micro-batching on / off, tok/s"),
)  # fmt: skip
#: The pairs the paired rounds load by default: the ratios with a target.
DEFAULT_PAIRS = ("molink2:vllm", "molink2_wan:molink2", "molink2_far:molink2_far_off")


def pair_ratios(a: str, b: str) -> list[Ratio]:
    """The report's ratios between setups ``a`` and ``b`` (either way round); tok/s if none."""
    return [r for r in RATIOS if {r.a, r.b} == {a, b}] or [Ratio(a, b, f"{a} / {b}, tok/s")]


def parse_pair(text: str) -> tuple[str, str]:
    """``"molink2:vllm"`` -> ``("molink2", "vllm")``."""
    a, sep, b = text.partition(":")
    if not sep or not a or not b or a == b:
        raise argparse.ArgumentTypeError(f"a pair looks like molink2:vllm, not {text!r}")
    return a, b


# ---------------------------------------------------------------- servers
@contextlib.contextmanager
def server(setup: Setup, args: argparse.Namespace, slot: int = 0) -> Iterator[str]:
    """Start ``setup``; yield its base URL. ``slot`` 1: ports clear of a slot-0 server's."""
    port = args.port + slot * PAIRED_PORT_OFFSET
    common = ["--served-model-name", SERVED_NAME, *args.engine_args]
    log_dir = args.output_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if setup.stages == 0:
        # Both cores to its OpenMP threads: vLLM's "auto" binding would keep one core in reserve.
        # The KV cache of two 1-GiB stages: 128 streams of 256 tokens don't fit in one GiB.
        env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        log = log_dir / f"{setup.key}.log"
        with plain_vllm(args.model, common, port, log, env) as url:
            yield url
        return
    node_args = [*common, "--wire_dtype", args.wire_dtype]
    if not setup.micro_batching:
        node_args += ["--max-micro-batches", "1"]
    head_args = ["--step-trace", str(trace_path(setup, args))] if args.trace else []
    spec = SwarmSpec(
        model=args.model,
        stages=setup.stages,
        link=setup.link,
        port=port,
        grpc_base_port=args.grpc_base_port + slot * PAIRED_PORT_OFFSET,
        node_args=node_args,
        head_args=head_args,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        log_dir=log_dir / setup.key,
        shared_cores=setup.shared_cores,
    )
    with Swarm(spec) as s:
        yield s.base_url


class Servers:
    """The setups' servers, each kept up while the next measurement needs it too (a boot of a
    big model costs minutes): at most two at once, in port slots 0 and 1."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._up: dict[str, tuple[contextlib.ExitStack, str, int]] = {}  # key -> (, url, slot)

    def only(self, wanted: list[Setup]) -> dict[str, str]:
        """Stop every server but ``wanted``'s, start those not up; their base URLs by key."""
        keys = [setup.key for setup in wanted]
        for key in [k for k in self._up if k not in keys]:
            self._up.pop(key)[0].close()
        for setup in wanted:
            if setup.key not in self._up:
                slot = min({0, 1} - {slot for _, _, slot in self._up.values()})
                stack = contextlib.ExitStack()
                url = stack.enter_context(server(setup, self.args, slot))
                self._up[setup.key] = (stack, url, slot)
        return {key: self._up[key][1] for key in keys}

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.only([])


def run_order(chosen: list[Setup], pairs: list[tuple[str, str]]) -> list[Setup]:
    """``chosen`` with the setups of the first pair last, so that the paired rounds start on
    servers that are up already."""
    first = pairs[0] if pairs else ()
    return sorted(chosen, key=lambda setup: first.index(setup.key) + 1 if setup.key in first else 0)


def trace_path(setup: Setup, args: argparse.Namespace) -> Path:
    return args.output_dir / "logs" / f"{setup.key}.trace.jsonl"


def trace_breakdown(setup: Setup, args: argparse.Namespace) -> dict[str, float]:
    """Mean ms per step phase over the run's decode-sized steps (at most one token per
    stream: the steps TPOT is made of)."""
    from molink.telemetry.step_trace import breakdown, read

    records = [r for r in read(trace_path(setup, args)) if r["tokens"] <= args.num_requests]
    return breakdown(records) if records else {}


# ---------------------------------------------------------------- loads
def burst(url: str, prompts: list[list[int]], output_len: int) -> dict:
    return asyncio.run(run_load(url, SERVED_NAME, prompts, output_len, progress=False))


def measure_throughput(
    url: str, args: argparse.Namespace, num_requests: int, num_rounds: int, warm_up: bool = True
) -> dict:
    prompts = make_prompts(num_requests, args.input_len, args.vocab, seed=1)
    if warm_up:
        burst(url, prompts[: max(2, len(prompts) // 4)], 16)  # not counted
    rounds, median = measure_rounds(
        lambda: burst(url, prompts, args.output_len), num_rounds, f"{num_requests} concurrent"
    )
    return {
        "output_throughput_tok_s": statistics.median(r["output_throughput_tok_s"] for r in rounds),
        "ttft_p50_ms": median["ttft_ms"]["p50"],
        "tpot_p50_ms": median["tpot_ms"]["p50"],
        "tpot_p99_ms": median["tpot_ms"]["p99"],
        "itl_p50_ms": median["itl_ms"]["p50"],
        "failed": sum(r["failed"] for r in rounds),
        "rounds": rounds,
    }


def measure_paired(args: argparse.Namespace, servers: Servers, a: Setup, b: Setup) -> dict:
    """Setups ``a`` and ``b``, both up, loaded in alternating rounds; each pair of rounds (one
    of each) is one sample of every ratio between them.

    This VM's speed drifts by tens of percent within minutes (the same offline vLLM decode step
    took 179 and 200 ms ten minutes apart), so the ratio of two setups measured one after the
    other partly measures the drift. Here the idle server waits on its queue while the other is
    loaded (an idle vLLM server costs 0.2% of a core, an idle 2-stage swarm 2.5%), rounds
    alternate in ABBA order, and each pair of rounds gives one ratio.
    """
    loads = [(args.num_requests, args.paired_rounds)]
    if args.heavy_requests and {a.key, b.key} <= set(HEAVY_SETUPS):
        loads.append((args.heavy_requests, max(2, args.paired_rounds // 2)))
    results = {}
    urls = servers.only([a, b])
    for num_requests, num_rounds in loads:
        prompts = make_prompts(num_requests, args.input_len, args.vocab, seed=1)
        for url in urls.values():
            burst(url, prompts[: max(2, num_requests // 4)], 16)  # warm-up, not counted
        pairs = []
        for i in range(num_rounds):
            pair = {}
            for key in (a.key, b.key) if i % 2 == 0 else (b.key, a.key):  # ABBA
                r = burst(urls[key], prompts, args.output_len)
                pair[key] = {
                    TOK_S: r[TOK_S],
                    TPOT: r["tpot_ms"]["p50"],
                    "failed": r["failed"],
                }
            pairs.append(pair)
            log(
                f"    {num_requests} concurrent, pair {i + 1}/{num_rounds}: "
                + ", ".join(f"{key} {pair[key][TOK_S]:.1f}" for key in urls)
                + f" tok/s ({pair[a.key][TOK_S] / pair[b.key][TOK_S]:.2f})"
            )
        results[str(num_requests)] = {"pairs": pairs}
    return results


async def _prompt_during_streams(url: str, args: argparse.Namespace, with_prompt: bool) -> dict:
    streams = make_prompts(args.streams, args.input_len, args.vocab, seed=2)
    long_prompt = make_prompts(1, args.long_prompt_len, args.vocab, seed=3)
    background = asyncio.create_task(
        run_load(url, SERVED_NAME, streams, args.stream_output_len, progress=False)
    )
    long_result = None
    if with_prompt:
        await asyncio.sleep(args.prompt_delay)  # the streams are decoding by now
        long_result = await run_load(url, SERVED_NAME, long_prompt, 8, progress=False)
    return {"streams": await background, "prompt": long_result}


def measure_long_prompt(url: str, args: argparse.Namespace) -> dict:
    """TTFT of a long prompt, idle vs during decode streams, and the streams' TPOT."""
    idle = []
    for i in range(args.rounds):
        prompt = make_prompts(1, args.long_prompt_len, args.vocab, seed=10 + i)
        idle.append(burst(url, prompt, 8)["ttft_ms"]["p50"])
    busy, alone = [], []
    for _ in range(args.rounds):
        with_prompt = asyncio.run(_prompt_during_streams(url, args, True))
        busy.append(with_prompt)
        alone.append(asyncio.run(_prompt_during_streams(url, args, False)))
    ttft_idle = statistics.median(idle)
    ttft_busy = statistics.median(r["prompt"]["ttft_ms"]["p50"] for r in busy)
    tpot_p99_alone = statistics.median(r["streams"]["tpot_ms"]["p99"] for r in alone)
    tpot_p99_busy = statistics.median(r["streams"]["tpot_ms"]["p99"] for r in busy)
    itl_p99_alone = statistics.median(r["streams"]["itl_ms"]["p99"] for r in alone)
    itl_p99_busy = statistics.median(r["streams"]["itl_ms"]["p99"] for r in busy)
    return {
        "ttft_idle_ms": ttft_idle,
        "ttft_during_streams_ms": ttft_busy,
        "ttft_ratio": ttft_busy / ttft_idle if ttft_idle else 0.0,
        "stream_tpot_p99_alone_ms": tpot_p99_alone,
        "stream_tpot_p99_with_prompt_ms": tpot_p99_busy,
        "tpot_p99_ratio": tpot_p99_busy / tpot_p99_alone if tpot_p99_alone else 0.0,
        "stream_itl_p99_alone_ms": itl_p99_alone,
        "stream_itl_p99_with_prompt_ms": itl_p99_busy,
        "runs": {"idle_ttft_ms": idle, "busy": busy, "alone": alone},
    }


# ---------------------------------------------------------------- report
CPU_VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def hardware() -> str:
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    # CPU figures depend on the vector units, and a model name like "Intel Xeon" hides them
    simd = [name for name in CPU_VECTOR_FLAGS if name in flags]
    if simd:
        cpu += ", " + " ".join(simd)
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB RAM, " + (
        ", ".join(gpus) if gpus else "no GPU"
    )


def ceiling(r: Ratio, rows: dict) -> str:
    """The best ``r`` the stage costs fitted in this run allow, or "": setup ``a`` can't decode
    faster than its bound cycle (the fastest any micro-batch split reaches under its fits), so
    a throughput ratio is at most ``b``'s gap between tokens / that cycle, a TPOT ratio at least
    its inverse."""
    bound = rows[r.a].get("bound_cycle_ms")
    itl = rows[r.b].get("itl_p50_ms")
    if not bound or not itl:
        return ""
    best, limit = (itl / bound, "at most") if r.metric == TOK_S else (bound / itl, "at least")
    return (
        f" ({limit} **{best:.2f}** under the stage costs fitted in this run: {r.b} ITL p50 "
        f"{itl:.0f} ms, {r.a} bound cycle {bound:.0f} ms)"
    )


def write_report(results: dict, args: argparse.Namespace) -> None:
    out = args.output_dir
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["setups"]
    base = rows.get("vllm", {}).get("output_throughput_tok_s")
    lines = (
        [
            "| Setup | Output tok/s | vs vLLM | TTFT p50 (ms) | TPOT p50 (ms) | TPOT p99 (ms) "
            "| ITL p50 (ms) | Failed | Bound decode cycle (ms) | bound / ITL p50 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        if rows
        else []  # --only paired: just the paired lines below
    )
    for row in rows.values():
        tput = row["output_throughput_tok_s"]
        ratio = f"{tput / base:.2f}×" if base else "–"
        bound = row.get("bound_cycle_ms")
        bound_cells = (
            f"{bound:.0f} (k={row['bound_batches']}) | {bound / row['itl_p50_ms']:.2f}"
            if bound and row.get("itl_p50_ms")
            else "– | –"
        )
        lines.append(
            f"| {row['label']} | {tput:.1f} | {ratio} | {row['ttft_p50_ms']:.0f} | "
            f"{row['tpot_p50_ms']:.0f} | {row['tpot_p99_ms']:.0f} | "
            f"{row.get('itl_p50_ms', 0):.0f} | {row['failed']} | "
            f"{bound_cells} |"
        )
    heavy = {k: r["heavy"] for k, r in rows.items() if r.get("heavy")}
    if heavy:
        lines += [
            "",
            f"At {args.heavy_requests} concurrent requests (one round):",
            "",
            "| Setup | Output tok/s | vs vLLM | TTFT p50 (ms) | TPOT p50 (ms) | Failed |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        heavy_base = heavy.get("vllm", {}).get("output_throughput_tok_s")
        for key, h in heavy.items():
            tput = h["output_throughput_tok_s"]
            ratio = f"{tput / heavy_base:.2f}×" if heavy_base else "–"
            lines.append(
                f"| {rows[key]['label']} | {tput:.1f} | {ratio} | {h['ttft_p50_ms']:.0f} | "
                f"{h['tpot_p50_ms']:.0f} | {h['failed']} |"
            )
    ratios = []
    for r in RATIOS:
        if r.a in rows and r.b in rows and rows[r.b][r.metric]:
            value = rows[r.a][r.metric] / rows[r.b][r.metric]
            ratios.append(f"* {r.describe('separate runs')}: **{value:.2f}**{ceiling(r, rows)}")
    if heavy.get("molink2") and heavy_base:
        (r,) = pair_ratios("molink2", "vllm")
        how = f"{args.heavy_requests} concurrent, separate runs"
        ratios.append(f"* {r.describe(how)}: **{heavy['molink2'][r.metric] / heavy_base:.2f}**")
    for pair, loads in results.get("paired", {}).items():
        a, b = parse_pair(pair)
        for num_requests, paired in loads.items():
            for r in pair_ratios(a, b):
                values = [p[r.a][r.metric] / p[r.b][r.metric] for p in paired["pairs"]]
                how = f"{num_requests} concurrent, paired rounds: both up, alternating"
                each = ", ".join(f"{v:.2f}" for v in values)
                ratios.append(
                    f"* {r.describe(how)}: **{statistics.median(values):.2f}** median of "
                    f"{len(values)} pairs ({each})"
                )
    lp = results.get("long_prompt")
    if lp:
        ratios.append(
            f"* {args.long_prompt_len}-token prompt during {args.streams} decode streams, emulated "
            f"WAN: TTFT {lp['ttft_during_streams_ms']:.0f} ms vs {lp['ttft_idle_ms']:.0f} ms idle "
            f"(**{lp['ttft_ratio']:.2f}×**, target ≤ 1.5); streams' TPOT p99 "
            f"{lp['stream_tpot_p99_with_prompt_ms']:.0f} ms vs "
            f"{lp['stream_tpot_p99_alone_ms']:.0f} ms without it (**{lp['tpot_p99_ratio']:.2f}×**, "
            "target ≤ 2)"
        )
    for row in (r for r in rows.values() if r.get("step_breakdown_ms")):
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in row["step_breakdown_ms"].items())
        ratios.append(f"* Where a decode step's time goes ({row['label']}), ms: {parts}")
    wire = results.get("wire_bytes_per_token_per_hop")
    if wire:
        ratios.append(f"* Bytes on the wire per token per hop ({args.wire_dtype}): {wire}")
    md = [
        f"# MoLink benchmark ({results['date']})",
        "",
        f"* Hardware: {results['hardware']}; every node on this one machine. MoLink nodes are "
        "separate machines: each one's threads bound to its own cores, and each follower behind "
        "its own address (unless the setup says shared cores); vLLM gets every core.",
        f"* Model: {results['model_name']} ({args.wire_dtype} activations on the wire), "
        f"engine flags `{' '.join(args.engine_args)}`.",
        f"* Load: bursts of {args.num_requests} concurrent requests, {args.input_len} prompt / "
        f"{args.output_len} output tokens (random token ids, ignore_eos), one warm-up burst, "
        f"median of {args.rounds} rounds.",
        f"* Layers: the spans `molink split-plan` prints (equal decode time per "
        f"stage, the LM head counted): {results['layers']}.",
        f"* Emulated WAN: every hop (head → stage 1 → … → head) through a relay with "
        f"{args.delay_ms:g} ms one-way delay (far: {args.far_delay_ms:g} ms) and "
        f"{args.rate_mbit:g} Mbit/s (`benchmark/link_emulator.py`).",
        f"* Command: `{results['command']}`",
        "",
        *lines,
        "",
        *ratios,
        "",
        "The bound: the head fits, during each run, `fixed + per_token × tokens` to every "
        "stage's compute, to its own per-step work and to the rest of the round trip (links, "
        "codec); the bound is the fastest decode cycle (every stream advancing one token) any "
        f"even split of the {args.num_requests} streams into k ≤ `--max-micro-batches` "
        "micro-batches reaches under those fits (`molink.core.micro_batching.decode_bound`). "
        "It is compared with the median gap between a stream's tokens (ITL p50): TPOT also "
        "counts the tokens a stream decodes while the burst's prompts are still being "
        "prefilled, in longer steps.",
        "",
    ]
    if rows:  # (a run of paired rounds only has no setup of its own to plot)
        md += ["![throughput](benchmark.png)", ""]
        plot(rows, out / "benchmark.png")
    (out / "benchmark.md").write_text("\n".join(md))


def plot(rows: dict, path: Path) -> None:
    import re
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    def wrap(label: str) -> str:  # a number keeps its unit ("20 ms") on its line
        return textwrap.fill(re.sub(r"(\d) (?=\w)", "\\1\u00a0", label), 34)

    # Horizontal bars, first setup on top: each setup's name gets its own lines, wrapped, so
    # no name runs into its neighbour's however many setups a run has.
    keys = list(rows)
    values = [rows[k]["output_throughput_tok_s"] for k in keys]
    bounds = [rows[k].get("bound_tok_s") for k in keys]
    base = rows.get("vllm", {}).get("output_throughput_tok_s")
    y = range(len(keys))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.55 * len(keys)), layout="constrained")
    bars = ax.barh(
        y, values, height=0.6, color=["#777777" if k == "vllm" else "#1f77b4" for k in keys]
    )
    texts = [
        f"{v:.0f}" + (f" ({v / base:.2f}× vLLM)" if base and k != "vllm" else "")
        for k, v in zip(keys, values, strict=True)
    ]
    ax.bar_label(bars, texts, label_type="center", color="white", fontsize=8)  # clear of markers
    # The bound: the decode rate of the fastest even split of the streams into k micro-batches
    # under the costs the head fitted during the run; a marker on each setup that has one.
    for i, (k, b) in enumerate(zip(keys, bounds, strict=True)):
        if b:
            ax.plot([b, b], [i - 0.38, i + 0.38], color="black", linewidth=2)
            ax.annotate(
                f"k={rows[k].get('bound_batches', '?')}",
                (b, i - 0.38),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=7,
                va="top",
            )
    ax.set_yticks(y, [wrap(rows[k]["label"]) for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values + [b for b in bounds if b]) * 1.2)
    ax.set_xlabel("output tokens / s (median round)")
    ax.set_title("Output throughput, bursts of concurrent requests")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    handles = [
        Patch(color="#777777", label="vLLM, one node"),
        Patch(color="#1f77b4", label="MoLink"),
    ]
    if any(bounds):
        bound_text = (
            "bound: decode rate of the best split into k micro-batches\n"
            "under the costs the head fitted during the run"
        )
        handles.append(Line2D([], [], color="black", linewidth=2, label=bound_text))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wire_stats(url: str) -> str:
    """Bytes per token on the middle stage's next hop, from its ``/status``."""
    port = int(url.rsplit(":", 1)[1]) + 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
        hop = json.load(r).get("next_hop") or {}
    return (
        f"{hop.get('bytes_per_token', 0):.0f} B "
        f"({hop.get('activation_bytes_per_token', 0):.0f} B activations)"
    )


def pipeline_bound(url: str, num_decodes: int) -> dict:
    """The best decode rate any micro-batch split could reach for ``num_decodes`` streams,
    from the stage, head and transfer costs the head fitted during the run (its ``/swarm``)."""
    from molink.core.micro_batching import PipelineCosts, decode_bound

    with urllib.request.urlopen(url + "/swarm", timeout=30) as r:
        doc = json.load(r)
    if not doc.get("costs"):
        return {}
    costs = PipelineCosts.from_dict(doc["costs"])
    batches, seconds = decode_bound(costs, num_decodes, doc["max_micro_batches"] or 1)
    return {
        "bound_tok_s": num_decodes / seconds,
        "bound_cycle_ms": seconds * 1e3,
        "bound_batches": batches,
        "fitted_costs": doc["costs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help=f"setup keys to run, '{PAIRED}' for the paired rounds (default all)",
    )
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--far-delay-ms", type=float, default=50.0, help="the far WAN setups")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument(
        "--heavy-requests",
        type=int,
        default=128,
        help="also load vLLM and 2-stage loopback with this many concurrent requests (0: off)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=4,
        help="rounds of each setup in each --paired pair, alternating, at --num-requests (half "
        "as many, at least 2, at --heavy-requests where both are measured at it); 0: off",
    )
    parser.add_argument(
        "--paired",
        nargs="+",
        type=parse_pair,
        default=[parse_pair(p) for p in DEFAULT_PAIRS],
        metavar="A:B",
        help=f"setup pairs for the paired rounds (default: {' '.join(DEFAULT_PAIRS)})",
    )
    parser.add_argument("--wire-dtype", default="float16")
    parser.add_argument("--long-prompt-len", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-output-len", type=int, default=160)
    parser.add_argument("--prompt-delay", type=float, default=4.0, help="s before the prompt")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--grpc-base-port",
        type=int,
        default=SwarmSpec.grpc_base_port,
        help=f"the first MoLink node's gRPC port; the others count up (default "
        f"{SwarmSpec.grpc_base_port})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny loads: a smoke test")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="heads write a step trace (--step-trace); the report breaks a step's time down",
    )
    parser.add_argument(
        "--engine-args",
        type=shlex.split,
        default=shlex.split("--dtype float32 --enforce-eager --max-model-len 2048"),
        help="flags for every server (vLLM and MoLink nodes alike), as one string: "
        '--engine-args="--dtype float16 --max-model-len 1024"',
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwinds: every server is stopped
    if args.quick:
        args.num_requests, args.input_len, args.output_len, args.rounds = 3, 16, 8, 1
        args.heavy_requests = 6
        args.paired_rounds = min(args.paired_rounds, 2)
        args.long_prompt_len, args.streams, args.stream_output_len = 64, 2, 24
        args.prompt_delay = 0.5
    args.model = args.model or demo_model()
    args.vocab = prompt_vocab(args.model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    link = LinkSpec(args.delay_ms, 0.0, args.rate_mbit)
    far = LinkSpec(args.far_delay_ms, 0.0, args.rate_mbit)
    by_key = {setup.key: setup for setup in setups(link, far)}
    unknown = {key for pair in args.paired for key in pair} - set(by_key)
    if unknown:
        parser.error(
            f"--paired: no setup {', '.join(sorted(unknown))} (setups: {', '.join(by_key)})"
        )
    chosen = [s for s in by_key.values() if args.only is None or s.key in args.only]
    run_paired = bool(args.paired_rounds) and (args.only is None or PAIRED in args.only)
    paired_setups = [by_key[key] for pair in args.paired for key in pair] if run_paired else []
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware(),
        "model_name": Path(args.model).name,
        "command": "python -m benchmark.compare " + shlex.join(sys.argv[1:]),
        "layers": "; ".join(
            f"{n} stages " + " | ".join(f"{a}-{b}" for a, b in default_split(args.model, n))
            for n in sorted({setup.stages for setup in chosen + paired_setups if setup.stages})
        ),
        "setups": {},
    }
    with Servers(args) as servers:
        for setup in run_order(chosen, args.paired if run_paired else []):
            log(f"== {setup.label}")
            url = servers.only([setup])[setup.key]
            row = measure_throughput(url, args, args.num_requests, args.rounds)
            if setup.stages:
                row.update(pipeline_bound(url, args.num_requests))
            if setup.key in HEAVY_SETUPS and args.heavy_requests:
                row["heavy"] = measure_throughput(url, args, args.heavy_requests, 1, False)
            if setup.stages >= 3 and "wire_bytes_per_token_per_hop" not in results:
                results["wire_bytes_per_token_per_hop"] = wire_stats(url)
            if setup.key == "molink3_wan":
                log("    long prompt during decode streams")
                results["long_prompt"] = measure_long_prompt(url, args)
            if setup.stages and args.trace:
                row["step_breakdown_ms"] = trace_breakdown(setup, args)
            results["setups"][setup.key] = {"label": setup.label, **row}
            results["setups"] = {k: results["setups"][k] for k in by_key if k in results["setups"]}
            log(f"    {row['output_throughput_tok_s']:.1f} tok/s")
            write_report(results, args)
        if run_paired:
            results["paired"] = {}
            for a, b in args.paired:
                log(f"== paired rounds: {by_key[a].label} | {by_key[b].label}")
                pair = measure_paired(args, servers, by_key[a], by_key[b])
                results["paired"][f"{a}:{b}"] = pair
                write_report(results, args)
    log(f"wrote {args.output_dir}/benchmark.md, .json, .png")


if __name__ == "__main__":
    main()
