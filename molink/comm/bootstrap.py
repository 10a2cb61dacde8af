"""Joining a swarm: turn ``--initial_peer HOST:PORT`` into the DHT multiaddrs to join through.

A node's gRPC ``GetNodeInfo`` answers with its DHT multiaddrs, so users name a node by the
address they know; multiaddrs (``/ip4/...``) pass through unchanged. Used by nodes, routers and
``molink status``.
"""

from __future__ import annotations

import time

import grpc
from vllm.logger import init_logger

from molink.comm.links import connect
from molink.comm.proto import molink_pb2
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)


def _ask_dht_maddrs(peer: str, security: SwarmSecurity) -> tuple[list[str], str]:
    """(DHT multiaddrs, "") from a node's gRPC service, or ([], why not)."""
    channel, stub = connect(peer, security)
    try:
        info = stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=5.0)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return [], (
                "UNAVAILABLE: not up yet, or it has another swarm key"
                if security.secured
                else "UNAVAILABLE: not up yet, or it requires a swarm key"
            )
        return [], e.code().name
    finally:
        channel.close()
    if not info.dht_maddrs:
        return [], "its DHT is not up yet"
    return list(info.dht_maddrs), ""


def resolve_initial_peers(
    peers: tuple[str, ...], timeout: float, security: SwarmSecurity
) -> list[str]:
    """DHT multiaddrs for ``--initial_peer`` values (multiaddrs pass through; HOST:PORT is asked).

    Retries until ``timeout``, so a node may start before the peer it names.
    """
    maddrs: list[str] = []
    for peer in peers:
        if peer.startswith("/"):
            maddrs.append(peer)
            continue
        deadline = time.monotonic() + timeout
        next_log = 0.0
        while True:
            found, error = _ask_dht_maddrs(peer, security)
            if found:
                maddrs.extend(found)
                break
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"--initial_peer {peer}: no MoLink node answered within {timeout:.0f} s "
                    f"({error})"
                )
            if time.monotonic() > next_log:
                logger.info("Waiting for initial peer %s (%s)...", peer, error)
                next_log = time.monotonic() + 10
            time.sleep(1.0)
    return maddrs
