"""Scale-out: two pipelines behind the router against one pipeline, and heads lost mid-stream.

    python -m benchmark.scale_out            # demo model, -> resources/scale_out.{json,md}
    python -m benchmark.scale_out --quick    # a few tiny requests (smoke test)

Each "machine" is one core of this box (DESIGN.md, "Separate machines on one box"): pipeline
*p* is a head and a follower (the demo model's two spans), both pinned to core *p* with their own
addresses (``127.0.{2p}.1``, ``127.0.{2p+1}.1``), all in one swarm. The router
(``python -m molink.entrypoints.router``) finds the heads in the DHT; it is pinned to the last
core (a machine of its own would be better; its load is small).

A round keeps ``--streams`` requests running per pipeline (a closed loop) until it has sent
``--waves`` x that many, then waits for the last; each request has its own prompt. Through the
router one loop keeps them all running and the router spreads them by outstanding work; straight
to the heads, each head has its own loop. ``--waves 1`` sends every request at once. Each round
also reports the CPU seconds each process (with its children) and the load client used, and
its steady throughput: the tokens that arrived before its last request was sent (while every
stream was still running), over that time.

1. One pipeline, ``--streams`` concurrent requests sent straight to its head, and the same
   through the router, in alternating rounds: the router's overhead (throughput ratio, TTFT p50
   difference). Then at light load, ``--light-requests`` requests one at a time, a second
   apart, each sent straight and through the router in turn (which way goes first alternates):
   the TTFT the router adds when nothing queues. And
   at half load, ``--busy-requests`` Poisson arrivals at half the requests per second the
   pipeline served, the same prompts at the same times straight and through the router, each
   round: the TTFT the router adds on a busy head (median of the paired differences).
2. The second pipeline joins (its head picks the free follower by itself). ``2 x --streams``
   requests through the router, and in alternating rounds the same split evenly straight over
   the two heads: the scale-out ratio against step 1, and the machine's own scaling (two
   pipelines with no router; below 2.0 when the cores share memory bandwidth and cache).
3. ``--streams`` greedy streams through the router; once each has ``--after`` tokens, one head
   is killed (``kill -9``), then (after a new head took its place) one is told to stop
   (SIGTERM). Every stream must complete with the tokens of an undisturbed run; the pause each
   stream saw is reported (p50, p99).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from benchmark.churn import pauses, percentile
from benchmark.loadgen import make_prompts, prompt_vocab, run_load, run_streams
from benchmark.processes import ManagedProcess
from benchmark.swarm import default_split, demo_model

SERVED_NAME = "bench"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ScaleOutSwarm:
    """Pipelines of (head, follower) pinned one per core, and the router; stops all on exit."""

    def __init__(self, args: argparse.Namespace, model: str) -> None:
        self.args, self.model = args, model
        self.spans = default_split(model, 2)
        self.processes: list[ManagedProcess] = []
        self.heads: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.log_dir = args.output_dir / "logs" / "scale_out"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._started = 0

    def _start(
        self, name: str, core: int, module: str, argv: list[str], url: str
    ) -> ManagedProcess:
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(self.args.kv_gib),
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
            "OMP_NUM_THREADS": "1",
        }
        cmd = ["taskset", "-c", str(core), sys.executable, "-m", module, *argv]
        proc = ManagedProcess(cmd, self.log_dir / f"{name}.log", env, url)
        self.processes.append(proc)
        return proc

    def start_node(self, name: str, core: int, span: tuple[int, int], host: str) -> ManagedProcess:
        """A node of the demo model on ``core`` at ``host`` (joins through the first head)."""
        i = self._started
        self._started += 1
        port, grpc = self.args.port + i, self.args.grpc_base_port + i
        argv = [
            "--model", self.model, "--served-model-name", SERVED_NAME,
            "--serving_layers", f"{span[0]},{span[1]}",
            "--host", host, "--port", str(port),
            "--grpc_port", str(grpc), "--listen_host", host, "--announce_host", host,
            "--disable-uvicorn-access-log", *self.args.engine_args,
        ]  # fmt: skip
        if i:  # join through the first head, later through the first follower (heads get killed)
            argv += ["--initial_peer", self.first_peer if i > 1 else f"127.0.0.1:{grpc - 1}"]
        return self._start(
            name, core, "molink.entrypoints.openai.api_server", argv, f"http://{host}:{port}"
        )

    @property
    def first_peer(self) -> str:
        """The first follower's gRPC address: it stays up while heads are lost."""
        return f"127.0.1.1:{self.args.grpc_base_port + 1}"

    def start_pipeline(self, p: int) -> str:
        """Pipeline ``p``: its follower first (ready), then its head; the head's URL."""
        if p:
            follower = self.start_node(f"follower{p}", p, self.spans[1], f"127.0.{2 * p + 1}.1")
            follower.wait_healthy(900)
            head = self.start_node(f"head{p}", p, self.spans[0], f"127.0.{2 * p}.1")
        else:
            head = self.start_node(f"head{p}", p, self.spans[0], f"127.0.{2 * p}.1")
            self.start_node(f"follower{p}", p, self.spans[1], f"127.0.{2 * p + 1}.1")
        head.wait_healthy(900)
        self.heads.append(head)
        return head.url

    def start_router(self) -> str:
        port = self.args.port + 99
        argv = ["--initial_peer", self.first_peer, "--host", "127.0.0.1", "--port", str(port)]
        core = (os.cpu_count() or 1) - 1
        self.router = self._start(
            "router", core, "molink.entrypoints.router", argv, f"http://127.0.0.1:{port}"
        )
        self.router.wait_healthy(300)
        return self.router.url

    def wait_router_heads(self, n: int, timeout: float = 300.0) -> None:
        assert self.router is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.router.url + "/ready", timeout=5) as r:
                    if len(json.load(r)["heads"]) >= n:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the router did not see {n} ready heads in {timeout:.0f} s")

    def __enter__(self) -> ScaleOutSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.processes):
            proc.stop()


def cpu_seconds(processes: list[ManagedProcess]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far, its children included, by
    name; ``client``: this process (the load client)."""
    used: dict[str, float] = {}
    for managed in processes:
        total = 0.0
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(managed.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        used[managed.name] = total
    times = psutil.Process().cpu_times()
    used["client"] = times.user + times.system
    return used


def steady_ratios(direct: dict, routed: dict, two_direct: dict, two: dict) -> dict[str, float]:
    """The ratios of the steady throughputs (empty when a round sent everything at once)."""
    base = direct["steady_output_tok_s"]
    if not base:
        return {}
    return {
        "steady_scale_out_ratio": two["steady_output_tok_s"] / base,
        "steady_machine_scale_out_ratio": two_direct["steady_output_tok_s"] / base,
        "steady_router_throughput_ratio": routed["steady_output_tok_s"] / base,
    }


def steady_lines(results: dict) -> list[str]:
    """The scale-out and router ratios of the steady throughputs, as a paragraph."""
    if "steady_scale_out_ratio" not in results:
        return []
    return [
        "Steady (output tokens that arrived while every stream of the round was still running, "
        "before its last request was sent, over that time): scale-out "
        f"**{results['steady_scale_out_ratio']:.2f}x** through the router, "
        f"{results['steady_machine_scale_out_ratio']:.2f}x straight to the heads; the router "
        f"**{results['steady_router_throughput_ratio']:.3f}x** straight to one head.",
        "",
    ]


def cpu_cells(used: dict[str, float], names: list[str]) -> list[str]:
    return [f"{used.get(name, 0.0):.1f}" for name in names]


async def one_round(urls: list[str], prompts: list[list[int]], output_len: int, waves: int) -> dict:
    """``prompts`` split evenly over ``urls``, each share in a closed loop of
    ``len(share) // waves`` requests at a time: aggregate output tok/s and latency."""
    share = len(prompts) // len(urls)
    started = time.perf_counter()
    shares = [prompts[i * share : (i + 1) * share] for i in range(len(urls))]
    parts = await asyncio.gather(
        *(
            run_load(
                url, SERVED_NAME, part, output_len, concurrency=len(part) // waves, progress=False
            )
            for url, part in zip(urls, shares, strict=True)
        )
    )
    duration = time.perf_counter() - started
    tokens = sum(p["output_throughput_tok_s"] * p["duration_s"] for p in parts)
    return {
        "output_throughput_tok_s": tokens / duration,
        # while every loop still kept all its streams running (before its last send)
        "steady_output_tok_s": sum(p["steady_output_tok_s"] for p in parts),
        "failed": sum(p["failed"] for p in parts),
        "ttft_p50_ms": statistics.median(p["ttft_ms"]["p50"] for p in parts),
        "tpot_p50_ms": statistics.median(p["tpot_ms"]["p50"] for p in parts),
        "duration_s": round(duration, 1),
    }


def throughput(
    setups: dict[str, list[str]],
    prompts: list[list[int]],
    args: argparse.Namespace,
    swarm: ScaleOutSwarm,
) -> dict[str, dict]:
    """Per setup (label -> URLs), the median of ``--rounds`` rounds; the setups' rounds
    alternate (paired), so that drift of the machine hits them alike."""
    for urls in setups.values():
        asyncio.run(run_load(urls[0], SERVED_NAME, prompts[:2], 8, progress=False))  # warm-up
    rounds: dict[str, list[dict]] = {label: [] for label in setups}
    for i in range(args.rounds):
        for label, urls in setups.items():
            before = cpu_seconds(swarm.processes)
            r = asyncio.run(one_round(urls, prompts, args.output_len, args.waves))
            after = cpu_seconds(swarm.processes)
            r["cpu_s"] = {name: round(after[name] - used, 1) for name, used in before.items()}
            log(f"    {label}, round {i + 1}/{args.rounds}: {r['output_throughput_tok_s']:.1f} "
                f"tok/s, {r['failed']} failed")  # fmt: skip
            rounds[label].append(r)
    out = {}
    for label, rs in rounds.items():
        ordered = sorted(rs, key=lambda r: r["output_throughput_tok_s"])
        out[label] = {**ordered[len(ordered) // 2], "rounds": rs}
    return out


def light_ttft(direct: str, routed: str, prompts: list[list[int]], settle_s: float = 1.0) -> dict:
    """One request at a time, each prompt straight to the head and through the router, in
    turn (every other prompt goes through the router first, so neither way always meets the
    head still busy with the last one's end), ``settle_s`` after the one before: TTFT p50 of
    each, and the median of the paired differences (ms)."""
    ttft: dict[str, list[float]] = {"direct": [], "routed": []}
    ways = [("direct", direct), ("routed", routed)]
    for i, prompt in enumerate(prompts):
        for label, url in ways[:: -1 if i % 2 else 1]:
            time.sleep(settle_s)
            r = asyncio.run(run_load(url, SERVED_NAME, [prompt], 4, progress=False))
            ttft[label].append(r["ttft_ms"]["p50"])
    added = [r - d for d, r in zip(ttft["direct"], ttft["routed"], strict=True)]
    return {
        "requests": len(prompts),
        "direct_ttft_p50_ms": statistics.median(ttft["direct"]),
        "routed_ttft_p50_ms": statistics.median(ttft["routed"]),
        "added_p50_ms": statistics.median(added),
    }


def busy_ttft(
    direct: str, routed: str, prompts: list[list[int]], rate: float, args: argparse.Namespace
) -> dict:
    """TTFT under load without a queue: Poisson arrivals at ``rate`` requests per second, the
    same prompts at the same times straight to the head, then through the router, ``--rounds``
    times. TTFT p50 of each (median of the rounds) and the median of every request's paired
    difference (ms)."""
    p50: dict[str, list[float]] = {"direct": [], "routed": []}
    added: list[float] = []
    for i in range(args.rounds):
        each = {}
        for label, url in (("direct", direct), ("routed", routed)):
            r = asyncio.run(
                run_load(
                    url, SERVED_NAME, prompts, args.output_len, request_rate=rate,
                    seed=i, progress=False, each=True,
                )
            )  # fmt: skip
            p50[label].append(r["ttft_ms"]["p50"])
            each[label] = r["ttft_each_ms"]
        added += [
            r - d for d, r in zip(each["direct"], each["routed"], strict=True) if None not in (d, r)
        ]
        log(f"    half load, round {i + 1}/{args.rounds}: TTFT p50 {p50['direct'][-1]:.1f} ms "
            f"straight, {p50['routed'][-1]:.1f} ms routed")  # fmt: skip
    return {
        "requests": len(prompts),
        "rate_req_s": round(rate, 3),
        "direct_ttft_p50_ms": statistics.median(p50["direct"]),
        "routed_ttft_p50_ms": statistics.median(p50["routed"]),
        "added_p50_ms": statistics.median(added),
        "pairs": len(added),
    }


def lose_head(
    swarm: ScaleOutSwarm, prompts: list[list[int]], args: argparse.Namespace, how: str
) -> dict:
    """Greedy streams through the router; one head is lost once each has ``--after`` tokens."""
    assert swarm.router is not None
    url = swarm.router.url
    reference, _ = asyncio.run(run_streams(url, SERVED_NAME, prompts, args.stream_tokens))
    victim = swarm.heads.pop(0)

    def fire() -> None:
        victim.signal_group(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)

    streams, fired_at = asyncio.run(
        run_streams(url, SERVED_NAME, prompts, args.stream_tokens, after=args.after, event=fire)
    )
    assert fired_at is not None
    try:
        started = time.monotonic()
        victim.wait_exit(120)
        exit_s: float | None = round(time.monotonic() - started, 1)
    except subprocess.TimeoutExpired:  # a head that hangs in shutdown: report it, then kill it
        exit_s = None
        victim.kill()
    waits = pauses(streams, fired_at)
    return {
        "event": how,
        "streams": len(streams),
        "completed": sum(len(s.tokens) == args.stream_tokens and not s.error for s in streams),
        "identical": sum(s.tokens == r.tokens for s, r in zip(streams, reference, strict=True)),
        "errors": sorted({s.error for s in streams if s.error})[:3],
        "pause_p50_s": round(percentile(waits, 50), 3),
        "pause_p99_s": round(percentile(waits, 99), 3),
        "head_exited_after_s": exit_s,  # None: still running 120 s after the signal
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.scale_out",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent requests per pipeline")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--stream-tokens", type=int, default=96, help="tokens per greedy stream")
    parser.add_argument("--after", type=int, default=32, help="lose a head after this many tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--waves",
        type=int,
        default=3,
        help="requests per stream in a round, sent in a closed loop (1: all at once)",
    )
    parser.add_argument(
        "--light-requests", type=int, default=32, help="requests of the light-load TTFT check"
    )
    parser.add_argument(
        "--busy-requests",
        type=int,
        default=32,
        help="requests per round of the TTFT check at half of one pipeline's throughput",
    )
    parser.add_argument("--kv-gib", type=int, default=1, help="KV cache per node")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--grpc-base-port", type=int, default=52051)
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    parser.add_argument("--quick", action="store_true", help="4 streams of 8 tokens, 1 round")
    parser.add_argument(
        "--engine-args",
        type=str.split,
        default="--dtype float32 --enforce-eager --max-model-len 2048".split(),
        help='flags for every node, as one string: --engine-args="--max-num-seqs 64"',
    )
    args = parser.parse_args()
    if args.quick:
        args.streams, args.input_len, args.output_len, args.rounds, args.waves = 4, 16, 8, 1, 1
        args.stream_tokens, args.after, args.light_requests, args.busy_requests = 24, 8, 2, 4
    model = args.model or demo_model()
    vocab = prompt_vocab(model)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(2 * args.streams * args.waves, args.input_len, vocab, seed=1)
    one_share = args.streams * args.waves
    with ScaleOutSwarm(args, model) as swarm:
        head0 = swarm.start_pipeline(0)
        router = swarm.start_router()
        swarm.wait_router_heads(1)
        log(f"one pipeline on core 0 (layers {swarm.spans}); the router on its own core")
        one = throughput(
            {"one pipeline, direct": [head0], "one pipeline, routed": [router]},
            prompts[:one_share],
            args,
            swarm,
        )
        direct, routed = one["one pipeline, direct"], one["one pipeline, routed"]
        light = light_ttft(head0, router, prompts[: args.light_requests])
        log(f"    light load: TTFT p50 {light['direct_ttft_p50_ms']:.1f} ms straight, "
            f"{light['routed_ttft_p50_ms']:.1f} ms routed")  # fmt: skip
        half_rate = 0.5 * direct["output_throughput_tok_s"] / args.output_len
        busy = busy_ttft(head0, router, prompts[: args.busy_requests], half_rate, args)
        log("the second pipeline joins on core 1")
        head1 = swarm.start_pipeline(1)
        swarm.wait_router_heads(2)
        both = throughput(
            {"two pipelines, direct": [head0, head1], "two pipelines, routed": [router]},
            prompts,
            args,
            swarm,
        )
        two, two_direct = both["two pipelines, routed"], both["two pipelines, direct"]
        losses = [lose_head(swarm, prompts[: args.streams], args, "kill -9")]
        # A new head takes the lost one's place (it finds the follower that lost its head).
        swarm.heads.append(swarm.start_node("head-again", 0, swarm.spans[0], "127.0.4.1"))
        swarm.heads[-1].wait_healthy(900)
        swarm.wait_router_heads(2)
        losses.append(lose_head(swarm, prompts[: args.streams], args, "SIGTERM"))
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(model).name,
        "command": " ".join(["python -m benchmark.scale_out", *sys.argv[1:]]),
        "one_pipeline_direct": direct,
        "one_pipeline_routed": routed,
        "two_pipelines_direct": two_direct,
        "two_pipelines_routed": two,
        "scale_out_ratio": two["output_throughput_tok_s"] / direct["output_throughput_tok_s"],
        "machine_scale_out_ratio": two_direct["output_throughput_tok_s"]
        / direct["output_throughput_tok_s"],
        "router_throughput_ratio": routed["output_throughput_tok_s"]
        / direct["output_throughput_tok_s"],
        # the median of the paired rounds' differences (rounds alternate: direct, routed)
        "router_ttft_p50_added_ms": statistics.median(
            r["ttft_p50_ms"] - d["ttft_p50_ms"]
            for d, r in zip(direct["rounds"], routed["rounds"], strict=True)
        ),
        **steady_ratios(direct, routed, two_direct, two),
        "light_load": light,
        "half_load": busy,
        "head_losses": losses,
    }
    (args.output_dir / "scale_out.json").write_text(json.dumps(results, indent=2) + "\n")
    setups = [
        ("one pipeline, straight to its head", direct),
        ("one pipeline, through the router", routed),
        ("two pipelines, straight to their heads", two_direct),
        ("two pipelines, through the router", two),
    ]
    cpu_names = list(two["cpu_s"])
    lines = [
        f"# Scale-out behind the router ({results['date']})",
        "",
        f"Model {results['model']}, each pipeline a head and a follower on one core, "
        f"{args.input_len}-token prompts, {args.output_len} output tokens; a round keeps the "
        f"streams shown running until it has sent {args.waves} x that many requests; median of "
        f"{args.rounds} rounds (direct and routed rounds alternate). "
        f"Command: `{results['command']}`",
        "",
        "| Setup | Streams | Output tok/s | Steady tok/s | TTFT p50 (ms) | TPOT p50 (ms) | "
        "Failed |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {n} | {r['output_throughput_tok_s']:.1f} | "
            f"{r['steady_output_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['tpot_p50_ms']:.0f} | {r['failed']} |"
            for (name, r), n in zip(
                setups,
                (args.streams, args.streams, 2 * args.streams, 2 * args.streams),
                strict=True,
            )
        ),
        "",
        f"Scale-out: **{results['scale_out_ratio']:.2f}x** one pipeline (bound 2.0: two "
        f"pipelines on disjoint cores; the two pipelines straight to their heads, no router, "
        f"give {results['machine_scale_out_ratio']:.2f}x on this machine). Router: "
        f"**{results['router_throughput_ratio']:.3f}x** "
        f"the throughput of going straight to the head, TTFT p50 "
        f"**{results['router_ttft_p50_added_ms']:+.1f} ms** under that load (median of the "
        "paired rounds' differences). At light load "
        f"({light['requests']} requests one at a time, a second apart, each sent both ways in "
        "turn, which way first alternating), TTFT p50 is "
        f"{light['direct_ttft_p50_ms']:.1f} ms straight and {light['routed_ttft_p50_ms']:.1f} ms "
        f"through the router: **{light['added_p50_ms']:+.1f} ms** (median of the paired "
        "differences). At half load (Poisson arrivals at "
        f"{busy['rate_req_s']:.2f} requests/s, half of what the one pipeline served straight; "
        f"{busy['requests']} requests a round, the same arrival times both ways, "
        f"{args.rounds} rounds), TTFT p50 is {busy['direct_ttft_p50_ms']:.1f} ms straight and "
        f"{busy['routed_ttft_p50_ms']:.1f} ms through the router: "
        f"**{busy['added_p50_ms']:+.1f} ms** (median of the {busy['pairs']} requests' paired "
        "differences).",
        "",
        *steady_lines(results),
        "CPU seconds each process used in the median round (with its children: engine core, DHT "
        "peer, p2pd), and the load client; the rounds' lengths in seconds:",
        "",
        f"| Setup | {' | '.join(cpu_names)} | round (s) |",
        f"|---|{'---:|' * (len(cpu_names) + 1)}",
        *(
            f"| {name} | {' | '.join(cpu_cells(r['cpu_s'], cpu_names))} | {r['duration_s']:.1f} |"
            for name, r in setups
        ),
        "",
        "| Head lost mid-stream | Completed | Identical to undisturbed | Pause p50 (s) | "
        "Pause p99 (s) | Head exited after (s) |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['event']} | {r['completed']}/{r['streams']} | {r['identical']}/{r['streams']} "
            f"| {r['pause_p50_s']:.2f} | {r['pause_p99_s']:.2f} | "
            f"{r['head_exited_after_s'] if r['head_exited_after_s'] is not None else '> 120'} |"
            for r in losses
        ),
    ]
    (args.output_dir / "scale_out.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
