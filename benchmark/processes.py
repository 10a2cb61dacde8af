"""Server processes for benchmarks and tests: start, wait until healthy, stop, kill.

Every process starts in a session of its own, so that its process group holds it and every child
it starts (a node's EngineCore, its p2pd): stopping or killing it signals the whole group. Its
stdout and stderr go to a log file, which error messages quote.

    node = ManagedProcess([sys.executable, "-m", "vllm.entrypoints.openai.api_server", ...],
                          log_dir / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"},
                          url="http://127.0.0.1:8000")
    try:
        node.wait_healthy(timeout=900)
        ...
    finally:
        node.stop()

Used by ``benchmark.swarm`` (swarms and the plain vLLM reference) and by ``tests/conftest.py``
(``NodeProcess``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

#: How much of a log error messages quote (its end).
LOG_TAIL_CHARS = 4000


class ProcessExited(RuntimeError):
    """A process exited while it was waited for to become healthy."""


#: Environment of a node process that shares the machine's cores with other nodes: no thread
#: pinning, one OpenMP thread, a 1 GiB KV cache, no downloads.
SHARED_CORES_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


class ManagedProcess:
    """``cmd`` running in its own session (process group), its output in ``log_path``.

    ``env`` is added to this process's environment. ``url`` is the server's root URL (for
    :meth:`wait_healthy`); ``name`` names it in messages (default: the log file's stem).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        url: str | None = None,
        name: str | None = None,
    ) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.url = url
        self.name = name or self.log_path.stem
        self.proc = self._launch(env or {})

    def _launch(self, env: Mapping[str, str]) -> subprocess.Popen:
        """Start ``cmd`` in a new session, output to the log, ``env`` added."""
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The process's id, which is also its process group's."""
        return self.proc.pid

    def poll(self) -> int | None:
        """Its exit status, or None while it runs."""
        return self.proc.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def dump_stacks(self) -> bool:
        """Ask a running MoLink node or router to write its threads' stacks to its log
        (SIGUSR1); False when it isn't one or has exited."""
        if self.poll() is not None or not any("molink.entrypoints" in arg for arg in self.cmd):
            return False
        try:
            os.kill(self.proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        return True

    def wait_healthy(self, timeout: float, also: Sequence[ManagedProcess] = ()) -> None:
        """Wait until ``url``/health answers 200; fail early if it (or one of ``also``)
        exits. See :func:`wait_healthy`."""
        if self.url is None:
            raise ValueError(f"{self.name}: no url to check")
        wait_healthy(self.url, [self, *also], timeout)

    def wait_exit(self, timeout: float | None = None) -> int:
        """Wait until the process exits; its exit status (``subprocess.TimeoutExpired`` if it
        runs past ``timeout``)."""
        return self.proc.wait(timeout=timeout)

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (nothing once every member is gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the group and give the process ``grace`` seconds to exit, then SIGKILL the
        group: the process if it is still there, and stragglers (children that outlived it)."""
        stop_all([self], grace)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the whole group (a machine dying) and reap the process."""
        self.signal_group(signal.SIGKILL)
        self.proc.wait(timeout=timeout)


def stop_all(processes: Sequence[ManagedProcess], grace: float = 30.0) -> None:
    """Stop ``processes`` together: SIGTERM every group, give them ``grace`` seconds in all to
    exit, then SIGKILL every group (stragglers too) and reap. Stopping them together rather
    than one by one costs one grace period, not one per process that hangs."""
    for process in processes:
        if process.poll() is None:
            process.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        process.signal_group(signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.proc.wait(timeout=grace)


def wait_healthy(url: str, watch: Sequence[ManagedProcess], timeout: float) -> None:
    """Wait until ``url``/health answers 200, checking every second.

    Raises :class:`ProcessExited` as soon as one of ``watch`` exits, and ``TimeoutError`` after
    ``timeout`` seconds; both quote the end of the log (the exited process's, or the first
    watched one's, after the watched processes wrote their threads' stacks there).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in watch:
            if p.poll() is not None:
                raise ProcessExited(
                    f"{p.name} exited ({p.proc.returncode}); {p.log_path}:\n{p.log_tail()}"
                )
        with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(1.0)
    if [p for p in watch if p.dump_stacks()]:
        time.sleep(1.0)  # the stacks reach the log's end
    tail = f"; {watch[0].log_path}:\n{watch[0].log_tail(3 * LOG_TAIL_CHARS)}" if watch else ""
    raise TimeoutError(f"{url} not healthy after {timeout:g} s{tail}")
