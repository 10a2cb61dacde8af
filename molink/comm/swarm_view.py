"""The head's view of the swarm: announced nodes, refreshed from the DHT, and their RTTs.

Kept apart from compute: the executor asks it for nodes and round-trip times when it plans a
chain, and it never touches a stage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
from vllm.logger import init_logger

from molink.comm.announcement import NodeAnnouncement
from molink.comm.links import connect
from molink.comm.membership import Membership
from molink.comm.proto import molink_pb2
from molink.security.swarm_security import SwarmSecurity

logger = init_logger(__name__)

#: Measured RTTs are trusted this long before a node is pinged again.
RTT_MAX_AGE_S = 60.0
_PING_TIMEOUT_S = 2.0


def ping(address: str, security: SwarmSecurity) -> tuple[float, molink_pb2.NodeInfo] | None:
    """(seconds for one ``GetNodeInfo`` round trip on an open channel, what the node said),
    or None if nothing answers at ``address``."""
    channel, stub = connect(address, security)
    try:
        stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=_PING_TIMEOUT_S)  # connects
        started = time.monotonic()
        info = stub.GetNodeInfo(molink_pb2.NodeInfoRequest(), timeout=_PING_TIMEOUT_S)
        return time.monotonic() - started, info
    except grpc.RpcError:
        return None
    finally:
        channel.close()


def measure_rtt(address: str, security: SwarmSecurity) -> float | None:
    """Seconds for one ``GetNodeInfo`` round trip on an open channel (None if unreachable)."""
    answer = ping(address, security)
    return answer[0] if answer is not None else None


class SwarmView:
    """Nodes announced in the DHT (read through a client-mode peer) with measured RTTs."""

    def __init__(self, initial_peers: Sequence[str], security: SwarmSecurity) -> None:
        self._security = security
        self._membership = Membership(
            initial_peers=initial_peers, host="127.0.0.1", client_mode=True, security=security
        )
        self._nodes: list[NodeAnnouncement] = []
        self._rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)

    @property
    def nodes(self) -> list[NodeAnnouncement]:
        """The announcements seen at the last :meth:`refresh`."""
        return self._nodes

    def refresh(self) -> list[NodeAnnouncement]:
        """Read the DHT again and measure the RTT of online nodes not measured lately."""
        self._nodes = self._membership.nodes()
        now = time.monotonic()
        for node in self._nodes:
            seen = self._rtt.get(node.peer_id)
            if node.state != "online" or node.is_head or (seen and now - seen[1] < RTT_MAX_AGE_S):
                continue
            rtt = measure_rtt(node.dial_address, self._security)  # relayed: with the relay
            if rtt is not None:
                self._rtt[node.peer_id] = (rtt, now)
        live = {n.peer_id for n in self._nodes}
        for peer in [p for p in self._rtt if p not in live]:
            del self._rtt[peer]
        return self._nodes

    def rtt_s(self) -> dict[str, float]:
        """Measured round-trip times by peer id."""
        return {peer: rtt for peer, (rtt, _) in list(self._rtt.items())}

    def shutdown(self) -> None:
        self._membership.shutdown()
