"""The DHT process: starting hivemind's DHT peer and making sure it and its ``p2pd`` go away.

hivemind runs the DHT in a forked process that drives the bundled ``p2pd`` binary.
:func:`start_dht` starts it and notices if it dies while starting; :func:`install_parent_watchdog`
runs inside it so that it exits when its parent does (even SIGKILLed); :func:`proc_children` and
:func:`reap_p2pd` find and, at shutdown, wait for (or kill) the ``p2pd`` it started.
:class:`~molink.comm.membership.Membership` uses these.

hivemind is imported lazily, when a DHT starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

if TYPE_CHECKING:
    import hivemind

logger = init_logger(__name__)

# How long shutdown waits for the p2pd child to disappear before killing it.
_P2PD_EXIT_TIMEOUT = 5.0
#: Times a DHT process that dies or hangs while starting is started (forking a process with
#: gRPC threads crashes the child now and then, sometimes twice in a row).
DHT_START_ATTEMPTS = 3
#: Seconds a DHT process that is ready has to answer its first calls.
FIRST_ANSWER_TIMEOUT_S = 30.0
# Inside the DHT process: keeps the parent watchdog task referenced.
_WATCHDOG_TASKS: set[asyncio.Task[None]] = set()


def maddr(host: str, port: int) -> str:
    """A libp2p multiaddr for ``host:port`` (ip4, ip6 or dns)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return f"/dns/{host}/tcp/{port}"
    return f"/ip{version}/{host}/tcp/{port}"


def free_port(host: str) -> int:
    """A TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def proc_children(ppid: int, name: str) -> list[tuple[int, str]]:
    """``(pid, start_time)`` of live processes named ``name`` whose parent is ``ppid`` (Linux)."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        stat = proc_stat(int(entry))
        if stat is not None and stat[0] == name and stat[2] == ppid:
            found.append((int(entry), stat[3]))
    return found


def proc_stat(pid: int) -> tuple[str, str, int, str] | None:
    """``(comm, state, ppid, start_time)`` of ``pid`` from ``/proc``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state), rest[1] field 4 (ppid), rest[19] field 22 (start time)
    return comm, rest[0], int(rest[1]), rest[19]


async def install_parent_watchdog(
    _dht: Any, node: Any, parent_pid: int, interval: float = 1.0
) -> None:
    """Runs inside the DHT process: shut the DHT node (and p2pd) down if our parent dies.

    The DHT process keeps its own copy of the command pipe's write end, so it never sees EOF
    when the parent is SIGKILLed or calls ``os._exit``; without this it would live on with p2pd.
    """

    async def watch() -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(interval)
        try:
            await asyncio.wait_for(node.shutdown(), timeout=5.0)
        finally:
            os._exit(0)

    _WATCHDOG_TASKS.add(asyncio.get_running_loop().create_task(watch()))


def _first_answers(dht: hivemind.DHT) -> list[str] | None:
    """Install the parent watchdog in a ready DHT process and read its visible multiaddrs;
    None when it doesn't answer within :data:`FIRST_ANSWER_TIMEOUT_S`."""
    import hivemind

    deadline = time.monotonic() + FIRST_ANSWER_TIMEOUT_S
    try:
        watchdog = partial(install_parent_watchdog, parent_pid=os.getpid())
        dht.run_coroutine(watchdog, return_future=True).result(timeout=FIRST_ANSWER_TIMEOUT_S)
        read = partial(hivemind.DHT._get_visible_maddrs, latest=False)
        left = max(deadline - time.monotonic(), 1.0)
        return [str(m) for m in dht.run_coroutine(read, return_future=True).result(timeout=left)]
    except TimeoutError:
        return None


def start_dht(dht_args: dict[str, Any], startup_timeout: float) -> tuple[hivemind.DHT, list[str]]:
    """Start hivemind's DHT process, wait until it is ready and answers, noticing if it dies;
    returns it with its visible multiaddrs.

    ``hivemind.DHT(start=True)`` waits for readiness without a bound, and so does every later
    call that waits for an answer, so a DHT process that crashes or hangs while starting (a
    forked child of a process with gRPC threads, rarely) would hang the node forever. Here the
    new process must also answer two calls (installing :func:`install_parent_watchdog`, then
    its multiaddrs) within :data:`FIRST_ANSWER_TIMEOUT_S`; it is tried
    :data:`DHT_START_ATTEMPTS` times, then raised.
    """
    import hivemind

    for attempt in range(1, DHT_START_ATTEMPTS + 1):
        dht = hivemind.DHT(**dht_args)
        dht.run_in_background(await_ready=False)
        deadline = time.monotonic() + startup_timeout + 10.0
        while True:
            try:
                dht.wait_until_ready(timeout=0.5)
            except TimeoutError:
                if time.monotonic() > deadline:
                    dht.shutdown()
                    if attempt == DHT_START_ATTEMPTS:
                        raise TimeoutError(f"no DHT after {startup_timeout:.0f} s") from None
                    logger.warning(
                        "The DHT process isn't ready after %.0f s; starting it again",
                        startup_timeout,
                    )
                    break
                if not dht.is_alive():
                    logger.warning(
                        "The DHT process died while starting (exit code %s)", dht.exitcode
                    )
                    if attempt == DHT_START_ATTEMPTS:
                        raise RuntimeError(
                            f"the DHT process died while starting, {attempt} times"
                        ) from None
                    time.sleep(1.0)  # (a crash of the fork is a race: a moment later it isn't)
                    break
                continue
            maddrs = _first_answers(dht)
            if maddrs is not None:
                return dht, maddrs
            dht.shutdown()
            if attempt == DHT_START_ATTEMPTS:
                raise TimeoutError(f"the DHT process didn't answer, {attempt} times")
            logger.warning(
                "The DHT process started but didn't answer in %.0f s; starting it again",
                FIRST_ANSWER_TIMEOUT_S,
            )
            break
    raise AssertionError("unreachable")


def reap_p2pd(p2pd: list[tuple[int, str]]) -> None:
    """Wait for the p2pd started by the DHT process to exit; kill it if it lingers.

    ``p2pd`` is what :func:`proc_children` found for the DHT process: ``(pid, start_time)``.
    """
    deadline = time.monotonic() + _P2PD_EXIT_TIMEOUT
    for pid, start_time in p2pd:
        while True:
            stat = proc_stat(pid)
            if stat is None or stat[3] != start_time or stat[1] == "Z":
                break  # gone, pid reused, or a zombie its new parent will reap
            if time.monotonic() > deadline:
                logger.warning("p2pd (pid %d) did not exit; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
