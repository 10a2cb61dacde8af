"""Churn benchmark: kill or stop a serving node mid-decode and measure what clients see.

    python -m benchmark.churn                       # 2 and 3 stages, kill -9 then SIGTERM
    python -m benchmark.churn --stages 3 --victim middle --events "kill -9"
    python -m benchmark.churn --stages 2 --quick    # a smoke run
    python -m benchmark.churn --stages 3 --victim middle --recovery replay hot recompute

For each pipeline size and each head ``--recovery`` mode (replay and recompute) it starts a
swarm on this machine (``benchmark.swarm``) with the layers split evenly plus one extra node for
the victim's span (a replica; ``--victim last`` or ``middle``), then:

1. runs ``--streams`` concurrent greedy streams of ``--output-len`` tokens undisturbed (the
   reference);
2. runs them again and, once every stream has ``--kill-after`` tokens, ``kill -9``s the node
   serving the victim's span; the replica takes it over (refilled by replay, or every request
   recomputes);
3. starts a new node for that span (it becomes the standby), runs them again and SIGTERMs the
   serving node: it announces that it is leaving, the head moves off it, then it exits.

Reported per disturbed run: failed streams, streams whose tokens differ from the reference, the
pause every stream saw (its longest wait between two tokens after the event) p50/p99, the head's
time from detecting the loss to serving again, the tokens re-prefilled (prompt + generated so
far, summed over the streams), and how long prefilling that many tokens takes at the prefill
rate of the idle pipeline (one ``--prefill-probe``-token prompt), and, where the head's own
replay log was read for a replay, its bytes per logged position against hidden size x dtype bytes
(the nodes run in float32). With ``--recovery hot`` (replay, the replica a hot standby): what the
standby cost over the undisturbed run, its compute seconds against the serving node's and the
mirrored bytes per output token. JSON with ``--result-json``; a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmark.loadgen import Stream, make_prompts, prompt_vocab, run_streams
from benchmark.processes import ManagedProcess
from benchmark.shared_follower import follower_counts
from benchmark.swarm import Swarm, SwarmSpec, demo_model, even_split, num_hidden_layers


@dataclass
class RunReport:
    setup: str
    recovery: str  # the head's --recovery
    event: str
    streams: int
    failed: int
    differing: int
    pause_p50_s: float
    pause_p99_s: float
    pause_max_s: float
    restore_s: float | None
    reprefill_tokens: int
    reprefill_estimate_s: float  # reprefill_tokens at the idle pipeline's prefill rate
    wall_s: float
    reference_tok_s: float = 0.0  # output tokens per second of the undisturbed run
    log_bytes_per_token: int | None = None  # the head's replay log, when it replayed from it
    log_vs_hidden: float | None = None  # log_bytes_per_token / (hidden size x 4 bytes)
    # With a hot standby, over the undisturbed run (see standby_costs).
    standby_busy_s: float | None = None
    serving_busy_s: float | None = None
    mirror_bytes_per_token: int | None = None  # per position the standby computed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def pauses(streams: list[Stream], at: float) -> list[float]:
    """Per stream: its longest wait between two tokens that ends after ``at``.

    The head may move off a node some time after the event (a leave notice, a keepalive
    timeout); the pause a client sees is the gap, wherever it falls after the event.
    """
    out = []
    for s in streams:
        gaps = [b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False) if b > at]
        if gaps:
            out.append(max(gaps))
    return out


def idle_prefill_rate(url: str, model: str, tokens: int) -> float:
    """Prompt tokens per second of the idle pipeline: one ``tokens``-token prompt, one token out."""
    (prompt,) = make_prompts(1, tokens, prompt_vocab(model), seed=1)
    started = time.monotonic()
    (stream,), _ = asyncio.run(run_streams(url, model, [prompt], 1))
    if stream.error or not stream.arrivals:
        raise RuntimeError(f"prefill probe failed: {stream.error}")
    return tokens / (stream.arrivals[0] - started)


#: The head's line when a chain serves again after a loss (molink.executor.outages).
RESTORED_LINE = re.compile(r"Pipeline restored \(epoch \d+\) ([0-9.]+) s [^,]*, by (\w+)")


def restores(head_log: Path) -> list[tuple[float, str]]:
    """Each "Pipeline restored (epoch N) X s after the loss ..., by MODE" of the head so far:
    the seconds and how the requests recovered (replay or recompute)."""
    return [(float(s), mode) for s, mode in RESTORED_LINE.findall(head_log.read_text())]


#: The head's line at the start of a replay (molink.executor.chain_upkeep).
REPLAY_LINE = re.compile(
    r"Replaying the logged positions .* holds \d+ positions in (\d+) bytes each"
)


def replay_log_lines(head_log: Path) -> list[int]:
    """Bytes per logged position of the head's log, at each replay so far."""
    return [int(m.group(1)) for m in REPLAY_LINE.finditer(head_log.read_text())]


def hidden_size(model: str) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["hidden_size"])


def get_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
        return json.load(r)


def serving_follower(swarm: Swarm, first_layer: int) -> int:
    """Index of the node serving the span that starts at ``first_layer`` for the head."""
    for i in range(1, len(swarm.nodes)):
        if swarm.nodes[i].poll() is not None:
            continue
        with contextlib.suppress(OSError):
            status = get_status(swarm.spec.port + i)
            if status["state"] == "serving" and status["serving_for_head"][0] == first_layer:
                return i
    raise RuntimeError(f"no node serves layers from {first_layer}")


def wait_for_standby(log: Path, port: int, hot_log: Path | None, timeout: float = 600.0) -> None:
    """Until the head's ``log`` names the node at gRPC ``port`` its standby (and, with
    ``hot_log``, that node's log says it is hot)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"Standby for .*: 127\.0\.0\.1:{port} ")
    while not pattern.search(log.read_text()) or (
        hot_log is not None and "Hot standby for layers" not in hot_log.read_text()
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no standby on port {port} after {timeout:.0f} s")
        time.sleep(1.0)


def standby_costs(before: dict, after: dict) -> dict[str, float]:
    """What the hot standby cost over a run (``follower_counts`` of the serving node and the
    standby, by role, before and after it): the standby's compute seconds against the serving
    node's, and the mirrored step bytes per position it computed (prompt or output token)."""

    def added(role: str, key: str) -> float:
        return after[role][key] - before[role][key]

    return {
        "standby_busy_s": round(added("standby", "busy_s"), 2),
        "serving_busy_s": round(added("serving", "busy_s"), 2),
        "mirror_bytes_per_token": round(
            added("standby", "received_bytes") / max(added("standby", "tokens"), 1)
        ),
    }


def report(
    setup: str,
    recovery: str,
    event: str,
    reference: list[Stream],
    streams: list[Stream],
    fired_at: float,
    restore_s: float | None,
    prompt_len: int,
    prefill_tok_s: float,
    wall_s: float,
) -> RunReport:
    waits = pauses(streams, fired_at)
    reprefill = sum(prompt_len + len([t for t in s.arrivals if t <= fired_at]) for s in streams)
    return RunReport(
        setup=setup,
        recovery=recovery,
        event=event,
        streams=len(streams),
        failed=sum(1 for s in streams if s.error),
        differing=sum(1 for s, r in zip(streams, reference, strict=True) if s.tokens != r.tokens),
        pause_p50_s=round(percentile(waits, 50), 3),
        pause_p99_s=round(percentile(waits, 99), 3),
        pause_max_s=round(max(waits, default=0.0), 3),
        restore_s=restore_s,
        reprefill_tokens=reprefill,
        reprefill_estimate_s=round(reprefill / prefill_tok_s, 2),
        wall_s=round(wall_s, 1),
    )


def run_setup(args: argparse.Namespace, model: str, stages: int, recovery: str) -> list[RunReport]:
    """One swarm of ``stages`` stages plus a replica of the victim's span, its head recovering
    by ``recovery``: the ``--events`` (kill -9, then SIGTERM)."""
    hot = recovery == "hot"
    layers = even_split(num_hidden_layers(model), stages)
    if args.victim == "middle" and stages < 3:
        raise SystemExit("--victim middle needs --stages 3 or more")
    last = layers[-1] if args.victim == "last" else layers[len(layers) // 2]
    spec = SwarmSpec(
        model=model,
        layers=[*layers, last],
        node_args=["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"],
        head_args=[
            "--disable-uvicorn-access-log",
            *(["--recovery", "replay", "--hot-standby"] if hot else ["--recovery", recovery]),
        ],
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        log_dir=args.log_dir / f"{stages}-stages-{recovery}",
        shared_cores=True,  # more nodes than cores here; recovery, not speed, is measured
    )
    setup = f"{stages} stages + 1 replica of layers {last[0]}-{last[1]}"
    victim_follows_head = last == layers[1]  # the head's log is the one replayed
    prompts = make_prompts(args.streams, args.input_len, prompt_vocab(model), seed=0)
    results: list[RunReport] = []
    swarm = Swarm(spec)
    print(f"[churn] starting {setup} (logs: {spec.log_dir})", file=sys.stderr)
    with swarm:
        url = swarm.base_url
        head_log = spec.log_dir / "node0.log"
        asyncio.run(run_streams(url, model, prompts[:2], 8))  # warm-up
        rate = idle_prefill_rate(url, model, args.prefill_probe)
        roles = {"serving": serving_follower(swarm, last[0]), "standby": len(swarm.nodes) - 1}
        if hot:
            standby_log = spec.log_dir / f"node{roles['standby']}.log"
            wait_for_standby(head_log, spec.grpc_base_port + roles["standby"], standby_log)
        counts = {r: follower_counts(swarm.node_url(i)) for r, i in roles.items()}
        started = time.monotonic()
        reference, _ = asyncio.run(run_streams(url, model, prompts, args.output_len))
        reference_tok_s = sum(len(s.tokens) for s in reference) / (time.monotonic() - started)
        costs = {}
        if hot:
            after = {r: follower_counts(swarm.node_url(i)) for r, i in roles.items()}
            costs = standby_costs(counts, after)
            print(f"[churn] hot standby over the reference run: {costs}", file=sys.stderr)
        print(
            f"[churn] reference: {sum(len(s.tokens) for s in reference)} tokens, "
            f"{reference_tok_s:.1f} tok/s; prefill {rate:.0f} tok/s",
            file=sys.stderr,
        )
        for event in args.events:
            if event == "SIGTERM":  # a new node for the span becomes the standby
                swarm.add_node(*last)
            victim = serving_follower(swarm, last[0])
            spare = next(  # the newest other node of the victim's span: the standby
                i
                for i in range(len(swarm.nodes) - 1, 0, -1)
                if i != victim and swarm.layers[i] == last and swarm.nodes[i].poll() is None
            )
            hot_log = spec.log_dir / f"node{spare}.log" if hot else None
            wait_for_standby(head_log, spec.grpc_base_port + spare, hot_log)
            node = swarm.nodes[victim]
            sig = signal.SIGKILL if event == "kill -9" else signal.SIGTERM

            def fire(node: ManagedProcess = node, sig: int = sig) -> None:
                if sig == signal.SIGKILL:
                    node.signal_group(sig)  # the node and its children: a machine dying
                else:
                    node.proc.send_signal(sig)  # the node alone: it leaves, then exits

            print(f"[churn] {event} of node {victim}, {args.kill_after} tokens in", file=sys.stderr)
            replays_before = len(replay_log_lines(head_log))
            restores_before = len(restores(head_log))
            started = time.monotonic()
            streams, fired_at = asyncio.run(
                run_streams(url, model, prompts, args.output_len, args.kill_after, fire)
            )
            assert fired_at is not None
            restored = restores(head_log)[restores_before:]
            restore_s, mode = restored[0] if restored else (None, "?")
            if hot:
                mode += " (hot standby)"
            results.append(
                report(
                    setup,
                    mode,
                    event,
                    reference,
                    streams,
                    fired_at,
                    restore_s,
                    args.input_len,
                    rate,
                    time.monotonic() - started,
                )
            )
            results[-1].reference_tok_s = round(reference_tok_s, 1)
            for key, value in costs.items():
                setattr(results[-1], key, value)
            logged = replay_log_lines(head_log)[replays_before:]
            if logged and victim_follows_head:
                results[-1].log_bytes_per_token = logged[-1]
                results[-1].log_vs_hidden = round(logged[-1] / (hidden_size(model) * 4), 2)
            print(f"[churn] {asdict(results[-1])}", file=sys.stderr)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait_exit(timeout=60)
    return results


def markdown(results: list[RunReport]) -> str:
    lines = [
        "| setup | recovered by | event | failed | differing | pause p50 (s) | pause p99 (s) "
        "| restore (s) | tokens before the event | their prefill at idle rate (s) "
        "| head's log per token (bytes) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        restore = "" if r.restore_s is None else f"{r.restore_s:.1f}"
        log = (
            ""
            if r.log_bytes_per_token is None
            else (f"{r.log_bytes_per_token} ({r.log_vs_hidden}x hidden x dtype)")
        )
        lines.append(
            f"| {r.setup} | {r.recovery} | {r.event} | {r.failed}/{r.streams} | {r.differing} | "
            f"{r.pause_p50_s:.2f} | {r.pause_p99_s:.2f} | {restore} | {r.reprefill_tokens} | "
            f"{r.reprefill_estimate_s:.1f} | {log} |"
        )
    seen = set()
    for r in results:
        if r.standby_busy_s is not None and r.setup not in seen:
            seen.add(r.setup)
            lines.append(
                f"\nHot standby, {r.setup}, over the undisturbed run: it computed "
                f"{r.standby_busy_s:.1f} s (the serving node {r.serving_busy_s:.1f} s) and "
                f"received {r.mirror_bytes_per_token} mirrored bytes per position it computed; "
                f"{r.reference_tok_s:.1f} output tok/s."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.churn",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument(
        "--recovery",
        nargs="+",
        choices=("replay", "recompute", "hot"),
        default=["replay", "recompute"],
        help="the head's --recovery modes to run, each on its own swarm (default replay and "
        "recompute); hot: replay with --hot-standby (the replica is a hot standby)",
    )
    parser.add_argument(
        "--victim",
        choices=("last", "middle"),
        default="last",
        help="whose span loses its node: the last stage's or the middle one's (default last)",
    )
    parser.add_argument(
        "--events",
        nargs="+",
        choices=("kill -9", "SIGTERM"),
        default=["kill -9", "SIGTERM"],
        help="what happens to the serving node, in order (default both)",
    )
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams (default 32)")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--output-len", type=int, default=256, help="tokens per stream (256)")
    parser.add_argument(
        "--kill-after", type=int, default=96, help="tokens every stream has before the event"
    )
    parser.add_argument(
        "--prefill-probe", type=int, default=512, help="prompt tokens of the prefill-rate probe"
    )
    parser.add_argument("--quick", action="store_true", help="4 streams of 32 tokens (smoke run)")
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/molink-churn"))
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.streams, args.output_len, args.kill_after = 4, 32, 8
    model = args.model or demo_model()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    results = [
        r
        for stages in args.stages
        for recovery in args.recovery
        for r in run_setup(args, model, stages, recovery)
    ]
    print(markdown(results))
    if args.result_json is not None:
        args.result_json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if any(r.failed or r.differing for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
