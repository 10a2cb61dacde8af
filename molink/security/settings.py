"""How a node is told to secure itself: key file paths and the exposure check (no secrets here).

:class:`SecurityFiles` travels to the head's engine process inside vLLM's config, so it holds
only paths. Loading them is :class:`~molink.security.swarm_security.SwarmSecurity`'s job.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from vllm.logger import init_logger

logger = init_logger(__name__)

_NODE_ID_RE = re.compile(r"[0-9a-f]{32}")


class InsecureSetup(ValueError):
    """A node would expose an unauthenticated service beyond this machine."""


@dataclass(frozen=True)
class SecurityFiles:
    """Where a node's keys are (``--swarm-key-file``, ``--node-key-file``, ...): paths only."""

    swarm_key_file: str | None = None
    node_key_file: str | None = None
    allowed_nodes_file: str | None = None
    insecure: bool = False


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only reaches this machine."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except (OSError, ValueError):
            return False


def read_allowed_nodes(path: str | Path) -> frozenset[str]:
    """Node ids (``molink keygen --node`` prints them), one per line; ``#`` comments."""
    ids = set()
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _NODE_ID_RE.fullmatch(entry):
            raise ValueError(f"{path}:{number}: {entry!r} is not a node id (32 hex digits)")
        ids.add(entry)
    return frozenset(ids)


def check_exposure(listen_host: str, files: SecurityFiles) -> None:
    """Refuse to serve gRPC/DHT beyond loopback without a swarm key, unless ``--insecure``."""
    if files.swarm_key_file or is_loopback(listen_host):
        return
    if not files.insecure:
        raise InsecureSetup(
            f"--listen_host {listen_host} is reachable from other machines, and without a swarm "
            "key anyone who reaches it can join the swarm, drive this node and read its "
            "activations. Make a key with `molink keygen swarm.key`, copy it to every node and "
            "pass --swarm-key-file swarm.key (or --listen_host 127.0.0.1 for one machine, or "
            "--insecure on a network you trust)."
        )
    logger.warning(
        "--insecure: serving without a swarm key on %s; anyone who reaches this node can join "
        "the swarm, drive it and read activations",
        listen_host,
    )
