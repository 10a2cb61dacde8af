"""What a relay costs: a head on the internet and two followers at home, each behind its own NAT
router, served through a relay or through port forwards, over emulated home uplinks.

    python -m benchmark.nat --delay-ms 10        # root: 10 ms each way on every home uplink

The topology is ``benchmark/nat_topology.py``. Each home's uplink is a link emulator in its router
(``benchmark/link_emulator.py``; the kernels here have no ``netem``): the router sends the
home's connections to the head's gRPC port through it. Three setups, same nodes:

* **relayed**: no port forward. The followers find that nobody can dial them and take their calls
  through the head (their relay). head -> A and B -> head cross one uplink each; A -> B goes
  A -> relay -> B: both uplinks.
* **forwarded**: each router forwards a port on its internet address to its follower through a
  second emulator (the downlink), and the follower announces it: every hop is direct, one uplink
  each.
* **invited**: only A's router forwards a port. A is reachable; B is not, and A reaches it by
  invitation: B opens its tunnel straight to A (one home link, as forwarded), not through the
  relay.

So the relay's cost here is the hop between the two NATed neighbours crossing two home links
instead of one, plus forwarding on the relay; an invitation takes the extra link away. Reported
per setup: the head's RTT to each follower (through the relay where relayed), and decode at
light load (1 stream: TPOT) and heavy load (many streams: output tokens/s), from
``benchmark.loadgen``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmark.loadgen import make_prompts, prompt_vocab, run_load
from benchmark.nat_topology import (
    HOMES,
    PUBLIC_HOST,
    PUBLIC_NS,
    home_host,
    nat_topology,
    open_port,
    redirect,
    router_lan,
    router_of,
    router_wan,
    why_unavailable,
)
from benchmark.processes import SHARED_CORES_ENV, ManagedProcess, stop_all
from benchmark.swarm import demo_model, num_hidden_layers

HTTP_PORT, GRPC_PORT, UPLINK_PORT, FORWARD_PORT = 8000, 50051, 40000, 40001
SERVED_NAME = "molink-nat"
#: Per setup, whether each home's router forwards a port to its follower (A's, B's).
FORWARDED = {"forwarded": (True, True), "relayed": (False, False), "invited": (True, False)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def emulator(ns: str, listen: str, target: str, delay_ms: float, log_dir: Path) -> ManagedProcess:
    cmd = [
        sys.executable, "-m", "benchmark.link_emulator", "--listen", listen, "--target", target,
        "--delay-ms", str(delay_ms), "--rate-mbit", "0",
    ]  # fmt: skip
    name = f"link-{ns}-{listen.replace(':', '_')}"
    return ManagedProcess(in_ns(ns, *cmd), log_dir / f"{name}.log", name=name)


def node(
    ns: str, name: str, model: str, layers: str, extra: list[str], log_dir: Path
) -> ManagedProcess:
    cmd = [
        sys.executable, "-m", "molink.entrypoints.openai.api_server", "--model", model,
        "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager",
        "--max-model-len", "1024", "--max-num-seqs", "32", "--serving_layers", layers,
        "--port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT), "--listen_host", "0.0.0.0",
        "--disable-uvicorn-access-log", *extra,
    ]  # fmt: skip
    return ManagedProcess(
        in_ns(ns, *cmd), log_dir / f"{name}.log", env=SHARED_CORES_ENV, url=None, name=name
    )


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


def wait_ready(url: str, watch: list[ManagedProcess], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in watch:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited:\n{p.log_tail()}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError("the head never became ready")


def run_setup(setup: str, model: str, args: argparse.Namespace, log_dir: Path) -> dict:
    """Start the swarm as ``setup`` (see :data:`FORWARDED`), load it, stop it."""
    layers = num_hidden_layers(model)
    third = layers // 3
    spans = [f"0,{third - 1}", f"{third},{2 * third - 1}", f"{2 * third},{layers - 1}"]
    processes: list[ManagedProcess] = []
    head_grpc = f"{PUBLIC_HOST}:{GRPC_PORT}"
    base_url = f"http://{PUBLIC_HOST}:{HTTP_PORT}"
    with nat_topology():
        try:
            head = node(
                PUBLIC_NS, f"{setup}-head", model, spans[0],
                ["--host", "0.0.0.0", "--announce_host", PUBLIC_HOST, *args.key], log_dir,
            )  # fmt: skip
            processes.append(head)
            for i, (home, span) in enumerate(zip(HOMES, spans[1:], strict=True)):
                router = router_of(home)
                # The uplink: the router sends the home's connections to the head's gRPC port
                # through the emulator.
                uplink = f"{router_lan(home)}:{UPLINK_PORT}"
                processes.append(emulator(router, uplink, head_grpc, args.delay_ms, log_dir))
                redirect(home, PUBLIC_HOST, GRPC_PORT, UPLINK_PORT)
                extra = ["--host", "127.0.0.1", "--initial_peer", head_grpc, *args.key]
                if FORWARDED[setup][i]:  # the downlink: a port forward through an emulator
                    forward = f"{router_wan(home)}:{FORWARD_PORT}"
                    target = f"{home_host(home)}:{GRPC_PORT}"
                    processes.append(emulator(router, forward, target, args.delay_ms, log_dir))
                    open_port(home, FORWARD_PORT)
                    extra += ["--announce_host", router_wan(home)]
                    extra += ["--announce_port", str(FORWARD_PORT)]
                else:
                    extra += ["--announce_host", home_host(home)]
                processes.append(node(home, f"{setup}-{home}", model, span, extra, log_dir))
            log(f"{setup}: waiting for the head")
            wait_ready(base_url, processes)
            swarm = get_json(base_url + "/swarm")
            followers = [n for n in swarm["nodes"] if n["role"] == "stage"]
            result: dict = {
                "setup": setup,
                "followers": [
                    {k: n[k] for k in ("layers", "address", "reachable", "relay", "rtt_s")}
                    for n in followers
                ],
            }
            vocab = prompt_vocab(model)
            warm = make_prompts(4, args.input_len, vocab, seed=1)
            asyncio.run(run_load(base_url, SERVED_NAME, warm, 8, progress=False))
            for load, streams in (("light", 1), ("heavy", args.streams)):
                prompts = make_prompts(streams * args.rounds, args.input_len, vocab, seed=2)
                log(f"{setup}: {load} load, {streams} stream(s)")
                result[load] = asyncio.run(
                    run_load(
                        base_url, SERVED_NAME, prompts, args.output_len,
                        concurrency=streams, progress=False,
                    )
                )  # fmt: skip
            # The RTTs after the load (the head measured them on the way).
            swarm = get_json(base_url + "/swarm")
            result["rtt_ms"] = {
                f"{n['layers'][0]}-{n['layers'][1]}": round(n["rtt_s"] * 1e3, 2)
                for n in swarm["nodes"]
                if n["role"] == "stage" and n["rtt_s"] is not None
            }
            return result
        finally:
            stop_all([head], grace=10)
            stop_all(processes, grace=10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmark.nat", description=__doc__)
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one way, per home link")
    parser.add_argument("--streams", type=int, default=16, help="streams at heavy load")
    parser.add_argument("--rounds", type=int, default=2, help="prompts per stream")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--output-dir", type=Path, default=Path("resources"))
    args = parser.parse_args()
    why = why_unavailable()
    if why is not None:
        sys.exit(f"benchmark.nat {why}")
    model = args.model or demo_model()
    log_dir = args.output_dir / "logs" / "nat"
    log_dir.mkdir(parents=True, exist_ok=True)
    # As deployed: a swarm key, so every link (relayed ones twice: to the relay and end to end)
    # runs mutual TLS.
    key = log_dir / "swarm.key"
    key.unlink(missing_ok=True)
    keygen = [sys.executable, "-m", "molink.entrypoints.cli.keygen", str(key)]
    subprocess.run(keygen, check=True, capture_output=True, timeout=120)
    args.key = ["--swarm-key-file", str(key.resolve())]
    setups = [run_setup(s, model, args, log_dir) for s in FORWARDED]
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": Path(model).name,
        "command": " ".join(["python -m benchmark.nat", *sys.argv[1:]]),
        "delay_ms_one_way": args.delay_ms,
        "setups": setups,
    }
    (args.output_dir / "nat.json").write_text(json.dumps(results, indent=2) + "\n")
    direct = setups[0]
    lines = [
        f"# Followers behind NAT: relayed and invited against port-forwarded ({results['date']})",
        "",
        f"Model {results['model']}, head on the internet, two followers each behind its own NAT "
        f"router, every home link {args.delay_ms:g} ms each way (user-space link emulator), "
        f"{args.input_len}-token prompts, {args.output_len} output tokens. Command: "
        f"`{results['command']}` (root). See the docstring of `benchmark/nat.py` for the paths.",
        "",
        "| Setup | Head's RTT to followers (ms) | TPOT p50, 1 stream (ms) "
        f"| Output tok/s, {args.streams} streams | Against forwarded | Failed |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in setups:
        tok_s = s["heavy"]["output_throughput_tok_s"]
        lines.append(
            f"| {s['setup']} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(s["rtt_ms"].items()))
            + f" | {s['light']['tpot_ms']['p50']:.1f} | {tok_s:.1f} | "
            f"{tok_s / direct['heavy']['output_throughput_tok_s']:.2f} | "
            f"{s['light']['failed'] + s['heavy']['failed']} |"
        )
    (args.output_dir / "nat.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
