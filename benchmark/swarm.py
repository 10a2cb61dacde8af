"""Start a MoLink swarm on this machine (a head plus followers), optionally over emulated links.

    python -m benchmark.swarm --stages 3 --delay-ms 20 --rate-mbit 100      # Ctrl-C tears down
    python -m benchmark.swarm --stages 2 --netns                             # one netns per node

Every node is a separate ``molink.entrypoints.openai.api_server`` process in its own process
group (``benchmark.processes``); the layers are split into stages of equal decode time
(``molink split-plan``: the last stage's LM head counts) unless ``--layers`` says otherwise. With
``--delay-ms``, ``--jitter-ms`` or ``--rate-mbit``, each follower's gRPC port sits behind a link
emulator (``benchmark/link_emulator.py``), so every hop of the pipeline (head -> stage 1 -> ...
-> head) crosses one emulated link. Each node has its own address (``127.0.N.1`` on loopback, or its
namespace's), and each follower's relay listens on its node's host (one bridge address per
follower with ``--netns``), so the head sees every follower as a separate host. With ``--netns``
(root only) each node also gets its own network namespace and address on a bridge, so nodes talk
through real network stacks. The link emulator is a user-space relay because the sandbox kernels
here have no ``netem`` qdisc.

Nodes are separate machines by default: each node's process is pinned to its own cores
(``taskset``, and ``OMP_NUM_THREADS`` set to their count; the machine's cores are dealt out
round-robin, so with more nodes than cores some share one, which ``describe()`` says).
``--shared-cores`` models one machine running every stage instead: no pinning, every node's
threads on every core, every node on 127.0.0.1. Everything
started is stopped on exit, Ctrl-C and errors included. ``Swarm`` is also used as a library by
``benchmark/compare.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.link_emulator import LinkEmulator, LinkSpec
from benchmark.processes import ManagedProcess, stop_all

BRIDGE = "molinkbr0"
SUBNET = "10.213.0"
HOST_ADDRESS = f"{SUBNET}.254"


@dataclass
class SwarmSpec:
    """What to start."""

    model: str
    stages: int = 2
    layers: list[tuple[int, int]] | None = None  # default: equal decode time (split_plan)
    link: LinkSpec = field(default_factory=LinkSpec)
    netns: bool = False
    port: int = 8000  # the head's HTTP port
    grpc_base_port: int = 50051
    node_args: list[str] = field(default_factory=list)  # MoLink/vLLM flags for every node
    head_args: list[str] = field(default_factory=list)  # flags for the head only
    env: dict[str, str] = field(default_factory=dict)
    head_env: dict[str, str] = field(default_factory=dict)  # on top of env, for heads only
    log_dir: Path = Path("/tmp/molink-swarm")
    ready_timeout: float = 900.0
    swarm_key: Path | None = None  # every node gets --swarm-key-file (mutual TLS, DHT admission)
    shared_cores: bool = False  # True: one machine, every node on every core (no binding)
    num_cores: int = field(default_factory=lambda: os.cpu_count() or 1)


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """``stages`` contiguous inclusive ranges covering ``num_layers`` layers, sizes within 1."""
    if not 1 <= stages <= num_layers:
        raise ValueError(f"can't split {num_layers} layers into {stages} stages")
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(stages)]


def parse_spans(text: str) -> list[tuple[int, int]]:
    """``"0-16,17-29"`` -> ``[(0, 16), (17, 29)]``."""
    try:
        spans = [tuple(int(x) for x in part.split("-")) for part in text.split(",")]
    except ValueError:
        spans = []
    if not spans or any(len(s) != 2 or s[0] > s[1] for s in spans):
        raise argparse.ArgumentTypeError(f"spans look like 0-16,17-29, not {text!r}")
    return [(a, b) for a, b in spans]


def default_split(model: str, stages: int) -> list[tuple[int, int]]:
    """The spans users are told to deploy: equal decode time per stage, as
    ``molink split-plan`` prints; an even split when the checkpoint can't be read."""
    from molink.core.split_plan import decode_costs, plan

    try:
        return plan(decode_costs(model), stages)
    except ValueError:
        return even_split(num_hidden_layers(model), stages)


def num_hidden_layers(model: str) -> int:
    import json

    config = Path(model) / "config.json"
    if config.exists():
        return int(json.loads(config.read_text())["num_hidden_layers"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model).num_hidden_layers)


@contextlib.contextmanager
def plain_vllm(
    model: str, args: list[str], port: int, log: Path, env: dict[str, str]
) -> Iterator[str]:
    """One plain vLLM OpenAI server on 127.0.0.1 (the single-node reference); yields its URL."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--host", "127.0.0.1", *args]  # fmt: skip
    server = ManagedProcess(cmd, log, env, url=f"http://127.0.0.1:{port}", name="vllm")
    try:
        server.wait_healthy(timeout=900)
        yield server.url
    finally:
        server.stop()


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _exit_on_sigterm(*_: object) -> None:
    sys.exit(128 + signal.SIGTERM)


class Swarm:
    """A running swarm; use as a context manager (stops everything on exit)."""

    def __init__(self, spec: SwarmSpec) -> None:
        self.spec = spec
        self.layers = spec.layers or default_split(spec.model, spec.stages)
        self.nodes: list[ManagedProcess] = []  # node i serves layers[i]
        self.emulators: list[LinkEmulator] = []
        self.namespaces: list[str] = []
        self.heads = [0]  # indexes of the nodes that are heads
        spec.log_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ addresses
    def node_host(self, i: int) -> str:
        """Node ``i``'s address: its own (``127.0.i.1`` on loopback) unless the nodes share one
        machine, so heads see separate hosts."""
        if self.spec.netns:
            return f"{SUBNET}.{i + 1}"
        return "127.0.0.1" if self.spec.shared_cores else f"127.0.{i}.1"

    def relay_host(self, i: int) -> str:
        """The address of the link emulator in front of follower ``i`` (its node's host)."""
        return f"{SUBNET}.{100 + i}" if self.spec.netns else self.node_host(i)

    def node_cores(self, i: int) -> list[int] | None:
        """The cores node ``i`` computes on (None: unbound, on every core). Added heads share
        the first head's."""
        if self.spec.shared_cores:
            return None
        i = 0 if i in self.heads else i
        n, cores = len(self.layers), self.spec.num_cores
        mine = [c for c in range(cores) if c % n == i % n] if n <= cores else [i % cores]
        return mine

    def launch_prefix(self, i: int) -> list[str]:
        """What node ``i``'s command runs under: its network namespace, and ``taskset`` pinning
        the whole process (compute, gRPC and HTTP threads alike) to its cores, as on a machine
        of its own. (vLLM 0.32 applies ``VLLM_CPU_OMP_THREADS_BIND`` only to workers its
        multiprocessing executor spawns; a MoLink stage's worker runs inside the node.)"""
        cores = self.node_cores(i)
        prefix = ["taskset", "-c", ",".join(map(str, cores))] if cores is not None else []
        if self.spec.netns:
            prefix = ["ip", "netns", "exec", self.namespaces[i], *prefix]
        return prefix

    def node_env(self, i: int) -> dict[str, str]:
        """Environment of node ``i``: its thread binding on top of ``spec.env`` (and
        ``spec.head_env`` for heads)."""
        env = {**self.spec.env, **(self.spec.head_env if i in self.heads else {})}
        cores = self.node_cores(i)
        if cores is None:
            return {**env, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        return {
            **env,
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
            "OMP_NUM_THREADS": str(len(cores)),
        }

    def node_url(self, i: int) -> str:
        """Node ``i``'s HTTP root URL."""
        return f"http://{self.node_host(i)}:{self.spec.port + i}"

    @property
    def base_url(self) -> str:
        return self.node_url(0)

    def describe(self) -> str:
        stages = " | ".join(f"{a}-{b}" for a, b in self.layers)
        link = "loopback" if self.spec.link.is_ideal else self.spec.link.describe()
        extras = (", netns" if self.spec.netns else "") + (", TLS" if self.spec.swarm_key else "")
        if self.spec.shared_cores:
            cores = "one machine (shared cores)"
        else:
            per_node = [self.node_cores(i) or [] for i in range(len(self.layers))]
            shared = len({c for cs in per_node for c in cs}) < sum(map(len, per_node))
            cores = "cores " + " | ".join(",".join(map(str, cs)) for cs in per_node)
            cores += " (more nodes than cores: some share one)" if shared else ""
        return f"{len(self.layers)} stages [{stages}], {link}, {cores}{extras}"

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Swarm:
        # A benchmark stopped by SIGTERM unwinds through __exit__ and stops its nodes (Python's
        # default would exit at once and leave them running).
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)

    def start(self) -> None:
        if self.spec.netns:
            self._make_namespaces()
        for i, (start, end) in enumerate(self.layers):
            self._start_node(i, start, end)
        self.wait_ready()

    def _start_node(self, i: int, start: int, end: int, extra_args: Sequence[str] = ()) -> None:
        spec = self.spec
        host = self.node_host(i)
        grpc_port = spec.grpc_base_port + i
        announce = ["--announce_host", host]
        if i > 0 and not spec.link.is_ideal:  # others reach this node through an emulated link
            relay = (self.relay_host(i), grpc_port + 1000)
            self.emulators.append(LinkEmulator(relay, (host, grpc_port), spec.link).start())
            announce = ["--announce_host", relay[0], "--announce_port", str(relay[1])]
        args = [
            "--model", spec.model,
            "--serving_layers", f"{start},{end}",
            "--port", str(spec.port + i),
            "--grpc_port", str(grpc_port),
            "--listen_host", host,
            *announce,
            *spec.node_args,
        ]  # fmt: skip
        if spec.swarm_key is not None:
            args += ["--swarm-key-file", str(spec.swarm_key)]
        elif spec.netns:  # bridge addresses are not loopback: say that plaintext is intended
            args += ["--insecure"]
        args += extra_args
        if i == 0:
            args += spec.head_args
        else:
            args += ["--initial_peer", f"{self.node_host(0)}:{spec.grpc_base_port}"]
        cmd = [*self.launch_prefix(i), sys.executable, "-m", "molink.entrypoints.openai.api_server"]
        log = spec.log_dir / f"node{i}.log"
        self.nodes.append(ManagedProcess([*cmd, *args], log, self.node_env(i), self.node_url(i)))

    def add_node(self, start: int, end: int) -> int:
        """Start one more follower serving ``start..end`` while the swarm runs; its index."""
        if self.spec.netns:
            raise NotImplementedError("adding nodes to a --netns swarm")
        self.layers.append((start, end))
        self._start_node(len(self.nodes), start, end)
        return len(self.nodes) - 1

    def add_head(self, extra_args: Sequence[str] = ()) -> str:
        """Start another head (the first span's layers, with ``extra_args`` on top of the
        nodes' flags), which joins through the first head and shares its followers; wait until
        it serves, and return its base URL."""
        if self.spec.netns:
            raise NotImplementedError("adding heads to a --netns swarm")
        i = len(self.nodes)
        self.heads.append(i)
        self._start_node(i, *self.layers[0], extra_args)
        self.nodes[i].wait_healthy(self.spec.ready_timeout)
        return self.node_url(i)

    def wait_ready(self) -> None:
        """Wait until the head serves; fail as soon as any node exits."""
        self.nodes[0].wait_healthy(self.spec.ready_timeout, also=self.nodes[1:])

    def stop(self) -> None:
        """Stop every node and link emulator and remove the namespaces. A second Ctrl-C or
        SIGTERM while the nodes stop kills them all at once (SIGKILL to each node's group)
        instead of leaving the ones not yet reached running."""
        try:
            # Heads first, together: a follower stopped while a head uses it waits up to
            # --leave_timeout for the head to move off; once its heads are gone it exits at once.
            stop_all([node for i, node in enumerate(self.nodes) if i in self.heads])
            stop_all(self.nodes)
        except BaseException:
            for node in self.nodes:
                node.signal_group(signal.SIGKILL)
            raise
        finally:
            self.nodes.clear()
            for emulator in self.emulators:
                emulator.stop()
            self.emulators.clear()
            self._remove_namespaces()

    # ------------------------------------------------------------ namespaces
    def _make_namespaces(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("--netns needs root (ip netns add)")
        self._remove_namespaces()
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i in range(len(self.layers)):
            ns, outside, inside = f"molink{i}", f"mlk{i}h", f"mlk{i}n"
            _run("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "link", "set", outside, "master", BRIDGE, "up")
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.node_host(i)}/24", "dev", inside)
            _run("ip", "-n", ns, "link", "set", inside, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", HOST_ADDRESS)
            if i > 0:  # this follower's link emulator listens here
                _run("ip", "addr", "add", f"{self.relay_host(i)}/24", "dev", BRIDGE)

    def _remove_namespaces(self) -> None:
        if not self.spec.netns:
            return
        for i in range(len(self.layers)):
            subprocess.run(["ip", "netns", "del", f"molink{i}"], capture_output=True)
            subprocess.run(["ip", "link", "del", f"mlk{i}h"], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        self.namespaces.clear()


def demo_model() -> str:
    from molink.demo_model import ensure_demo_model

    return ensure_demo_model()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.swarm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, help="model path (default: the demo model)")
    parser.add_argument("--stages", type=int, default=2, help="number of nodes (default 2)")
    parser.add_argument(
        "--layers",
        type=parse_spans,
        default=None,
        help="the nodes' spans, e.g. 0-16,17-29 (default: equal decode time; overrides --stages)",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per hop")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform jitter per hop")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth per hop, 0=∞")
    parser.add_argument("--netns", action="store_true", help="one network namespace per node")
    parser.add_argument(
        "--shared-cores",
        action="store_true",
        help="one machine running every stage: no thread binding (default: each node its own "
        "cores, as separate machines)",
    )
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        help="swarm key file for every node (mutual TLS); make one with molink keygen",
    )
    parser.add_argument("--port", type=int, default=8000, help="head HTTP port (default 8000)")
    parser.add_argument("--grpc-base-port", type=int, default=50051)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/molink-swarm"))
    parser.add_argument(
        "node_args",
        nargs=argparse.REMAINDER,
        help="after --: flags for every node (e.g. -- --enforce-eager --max-micro-batches 1)",
    )
    args = parser.parse_args()
    node_args = args.node_args[1:] if args.node_args[:1] == ["--"] else args.node_args
    spec = SwarmSpec(
        model=args.model or demo_model(),
        stages=len(args.layers) if args.layers else args.stages,
        layers=args.layers,
        link=LinkSpec(args.delay_ms, args.jitter_ms, args.rate_mbit),
        netns=args.netns,
        port=args.port,
        grpc_base_port=args.grpc_base_port,
        node_args=node_args,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
        log_dir=args.log_dir,
        swarm_key=args.swarm_key,
        shared_cores=args.shared_cores,
    )
    s = Swarm(spec)
    print(f"starting {s.describe()} (logs: {spec.log_dir})", file=sys.stderr)
    with s:
        print(f"ready: OpenAI endpoint {s.base_url}/v1 — Ctrl-C stops", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            while all(node.poll() is None for node in s.nodes):
                time.sleep(1.0)


if __name__ == "__main__":
    main()
