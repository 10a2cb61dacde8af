"""Soak and TLS-cost benchmark: a secured swarm under sustained load, and what TLS costs.

    python -m benchmark.soak                                  # soak + TLS cost, demo model
    python -m benchmark.soak --requests 200 --skip-tls-cost   # a shorter soak only

1. **Soak.** Starts ``--stages`` nodes on this machine with a fresh swarm key (mutual TLS on
   every hop, DHT admission), records the resident memory of every node (all processes of its
   process group: API server, EngineCore, p2pd), sends ``--requests`` streamed completions at
   ``--concurrency`` in two halves, and records memory after each. A request is lost if it
   failed or never came back.
2. **TLS cost.** The same closed-loop load (``--cost-requests`` at ``--concurrency``) on the same
   pipeline with and without a swarm key, on loopback and over an emulated link
   (``--delay-ms``/``--rate-mbit`` per hop, ``benchmark/link_emulator.py``); reports output tok/s
   and the ratio with / without.

Writes JSON (``--result-json``) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark.link_emulator import LinkSpec
from benchmark.loadgen import make_prompts, run_load
from benchmark.swarm import Swarm, SwarmSpec, demo_model


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every process in process group ``pgid`` (MiB)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5: process group
                continue
            with open(f"/proc/{entry}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def swarm_rss(swarm: Swarm) -> list[float]:
    return [round(group_rss_mib(node.pid), 1) for node in swarm.nodes]


def make_key(directory: Path) -> Path:
    path = directory / "swarm.key"
    if not path.exists():
        subprocess.run(
            [sys.executable, "-m", "molink.entrypoints.cli.keygen", str(path)], check=True
        )
    return path


def load(swarm: Swarm, args: argparse.Namespace, n: int, seed: int) -> dict:
    prompts = make_prompts(n, args.input_len, (100, 1000), seed)
    return asyncio.run(
        run_load(
            swarm.base_url,
            args.served_name,
            prompts,
            args.output_len,
            concurrency=args.concurrency,
            timeout=args.timeout,
            progress=False,
        )
    )


def spec(args: argparse.Namespace, key: Path | None, link: LinkSpec, log_dir: Path) -> SwarmSpec:
    return SwarmSpec(
        model=args.model,
        stages=args.stages,
        link=link,
        port=args.port,
        node_args=[
            "--served-model-name",
            args.served_name,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "1024",
            "--max-num-seqs",
            str(args.concurrency),
        ],  # fmt: skip
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        shared_cores=True,  # 3 stages on 2 cores; memory and losses, not speed, are measured
        log_dir=log_dir,
        swarm_key=key,
    )


def soak(args: argparse.Namespace, key: Path, log_dir: Path) -> dict:
    """``--requests`` in two halves, memory measured before, between and after them: growth in
    the second half (once buffers for ``--concurrency`` exist) is what a leak would show."""
    with Swarm(spec(args, key, LinkSpec(), log_dir / "soak")) as swarm:
        sys.stderr.write(f"soak: {swarm.describe()}\n")
        load(swarm, args, 8, seed=1)  # warm-up
        rss = [swarm_rss(swarm)]
        results = []
        for half, n in enumerate((args.requests // 2, args.requests - args.requests // 2)):
            results.append(load(swarm, args, n, seed=2 + half))
            rss.append(swarm_rss(swarm))
    completed = sum(r["completed"] for r in results)
    duration = sum(r["duration_s"] for r in results)
    tokens = sum(r["output_throughput_tok_s"] * r["duration_s"] for r in results)
    return {
        "setup": swarm.describe(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "completed": completed,
        "lost": args.requests - completed,
        "errors": sorted({e for r in results for e in r["errors"]}),
        "output_throughput_tok_s": round(tokens / duration, 1) if duration else 0.0,
        "rss_mib_before": rss[0],
        "rss_mib_half": rss[1],
        "rss_mib_after": rss[2],
        "duration_s": round(duration, 1),
    }


def tls_cost(args: argparse.Namespace, key: Path, log_dir: Path) -> list[dict]:
    rows = []
    links = [("loopback", LinkSpec()), ("emulated", LinkSpec(args.delay_ms, 0.0, args.rate_mbit))]
    for name, link in links:
        rates = {}
        for tls in (False, True):
            run_dir = log_dir / f"{name}-{'tls' if tls else 'plain'}"
            with Swarm(spec(args, key if tls else None, link, run_dir)) as swarm:
                sys.stderr.write(f"TLS cost: {swarm.describe()}\n")
                load(swarm, args, 8, seed=1)  # warm-up
                result = load(swarm, args, args.cost_requests, seed=3)
            assert result["failed"] == 0, result["errors"]
            rates[tls] = result["output_throughput_tok_s"]
        rows.append(
            {
                "link": name if link.is_ideal else link.describe(),
                "tok_s_plain": round(rates[False], 1),
                "tok_s_tls": round(rates[True], 1),
                "ratio_tls_over_plain": round(rates[True] / rates[False], 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--served-name", default="smollm2")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cost-requests", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--skip-tls-cost", action="store_true")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/molink-soak"))
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args()
    args.model = args.model or demo_model()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as keys:
        key = make_key(Path(keys))
        report = {"soak": soak(args, key, args.log_dir)}
        if not args.skip_tls_cost:
            report["tls_cost"] = tls_cost(args, key, args.log_dir)
    if args.result_json:
        args.result_json.write_text(json.dumps(report, indent=2) + "\n")
    s = report["soak"]
    lines = [
        f"Soak ({s['setup']}): {s['requests']} requests at concurrency {s['concurrency']}: "
        f"{s['lost']} lost, {s['output_throughput_tok_s']} tok/s, {s['duration_s']} s",
        f"RSS per node (MiB): before {s['rss_mib_before']}, after half the requests "
        f"{s['rss_mib_half']}, after all {s['rss_mib_after']}",
    ]
    if "tls_cost" in report:
        lines += [
            "",
            "| link | tok/s plaintext | tok/s TLS | TLS / plaintext |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['link']} | {r['tok_s_plain']} | {r['tok_s_tls']} | {r['ratio_tls_over_plain']} |"
            for r in report["tls_cost"]
        ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
