"""Start the suite's node processes from a warm interpreter: forked, not ``python -m``.

A node process spends 10-20 s of CPU importing vLLM, torch and transformers before it runs a
line of MoLink, and the suite starts some seventy nodes on two cores. So each xdist worker keeps
one *zygote*: a Python process, with the node environment, that imported the node entry modules
once and started no thread. For every node it forks a child, which

* starts a session of its own (its process group holds its EngineCore and p2pd, as with
  ``ManagedProcess``), writes stdout and stderr to the node's log, takes the node's environment,
* and runs the entry module as ``__main__`` with the node's arguments, exactly as
  ``python -m MODULE ARGS`` does (``runpy``): the same ``main()``, flags, signals and exit codes.
  The spawned EngineCore imports the module again as ``__mp_main__``, as it does for ``-m``.

The zygote answers each request with the child's pid and reports each exit status; a
:class:`ForkedProcess` stands in for the ``subprocess.Popen`` of a cold start. Benchmarks, the
demo and the tests of command-line tools start real ``python -m`` processes; set
``MOLINK_TEST_COLD_START=1`` to start the suite's nodes that way too.

Only the test suite uses this module.
"""

from __future__ import annotations

import json
import os
import runpy
import selectors
import shlex
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import setproctitle

#: The entry modules the zygote imports before it forks.
ENTRY_MODULES = ("molink.entrypoints.openai.api_server", "molink.entrypoints.api_server")


def cold_start() -> bool:
    """Whether the suite starts nodes with ``python -m`` (``MOLINK_TEST_COLD_START=1``)."""
    return os.environ.get("MOLINK_TEST_COLD_START", "") not in ("", "0")


class ForkedProcess:
    """The parts of ``subprocess.Popen`` that ``ManagedProcess`` uses, for a zygote's child."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (negative: the signal that ended it), or None while it runs."""
        if self.returncode is None:
            self.returncode = self._zygote.exit_status(self.pid)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (not its group), unless it has exited."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        self.returncode = self._zygote.wait_exit(self.pid, timeout)
        return self.returncode


class Zygote:
    """The warm interpreter of this xdist worker (started on first use, see :func:`zygote`)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **env},
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()  # one request in flight
        self._changed = threading.Condition()
        self._pids: list[int] = []  # answers to requests, in order
        self._exits: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            kind, pid, *rest = line.split()
            with self._changed:
                if kind == "pid":
                    self._pids.append(int(pid))
                elif kind == "exit":
                    self._exits[int(pid)] = int(rest[0])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def start(
        self, module: str, args: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> ForkedProcess:
        """Fork a child that runs ``python -m module *args`` with ``env`` added, output to
        ``log_path``."""
        log_path.write_bytes(b"")  # there at once, as a cold start's is
        request = {"module": module, "args": list(args), "env": dict(env), "log": str(log_path)}
        assert self._proc.stdin is not None
        with self._lock, self._changed:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            if not self._changed.wait_for(lambda: self._pids or self._proc.poll() is not None, 600):
                raise RuntimeError("the test zygote didn't answer in 600 s")
            if not self._pids:
                raise RuntimeError(f"the test zygote exited ({self._proc.returncode})")
            return ForkedProcess(self, self._pids.pop(0))

    def exit_status(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int:
        with self._changed:
            if not self._changed.wait_for(lambda: pid in self._exits, timeout):
                raise subprocess.TimeoutExpired(f"node {pid}", timeout or 0.0)
            return self._exits[pid]

    def close(self) -> None:
        """End the zygote (its children run on; their owners stop them)."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


_zygote: list[Zygote] = []


def zygote(env: Mapping[str, str]) -> Zygote:
    """This worker's zygote, started with ``env`` on first use."""
    if not _zygote:
        _zygote.append(Zygote(env))
    return _zygote[0]


def close_zygote() -> None:
    """Stop this worker's zygote if one was started."""
    while _zygote:
        _zygote.pop().close()


# ------------------------------------------------------------------------- the zygote itself
def _run_child(request: dict) -> None:
    """In the forked child: become the node process, run the module as ``__main__``, exit."""
    os.setsid()
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    os.environ.update(request["env"])
    command = [sys.executable, "-m", request["module"], *request["args"]]
    setproctitle.setproctitle(shlex.join(command))  # what ps shows, as for a cold start
    sys.argv = command[2:]  # runpy sets argv[0] to the module's file
    code: int | str | None = 0
    try:
        with warnings.catch_warnings():  # "found in sys.modules": the zygote imported it
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter finishes as after ``python -m`` (atexit handlers run)


def _serve() -> None:
    """The zygote's loop: fork a child per request line on stdin, report pids and exits."""
    sys.path[0] = os.getcwd()  # as for ``python -m``: the working directory, not tests/
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in ENTRY_MODULES:
            __import__(module)
    if threading.active_count() != 1:
        raise RuntimeError(f"threads after import, unsafe to fork: {threading.enumerate()}")
    children: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        if selector.select(timeout=0.2):
            line = sys.stdin.readline()
            if not line:
                return  # the worker is gone or done
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                selector.close()
                _run_child(request)
            children.add(pid)
            print("pid", pid, flush=True)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                print("exit", pid, os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    _serve()
