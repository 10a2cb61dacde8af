"""The head's first chain: nodes that cover every layer once and answer where they announced.

Before its engine starts, a head waits for a chain (:func:`molink.comm.chain.wait_for_chain`)
and probes each of its nodes over gRPC (``GetNodeInfo`` with a nonce, as the engine does). A
node that doesn't answer as itself at its announced address (down, firewalled, behind NAT) is
left out for :data:`UNREACHABLE_RETRY_S` seconds with its cause, and the wait goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from vllm.logger import init_logger

from molink.comm.announcement import NodeAnnouncement
from molink.comm.chain import Chain, ChainIncomplete, wait_for_chain
from molink.comm.membership import Membership
from molink.engine.head_config import RemoteStageSpec
from molink.executor.remote_stage import RemoteStage
from molink.security.swarm_security import SwarmSecurity
from molink.weight_digest import WeightDigests

logger = init_logger(__name__)

# A chain node that doesn't answer at its announced address is left out this long (seconds).
UNREACHABLE_RETRY_S = 20.0


def wait_for_reachable_chain(
    membership: Membership,
    head: NodeAnnouncement,
    timeout: float,
    security: SwarmSecurity,
    weights: WeightDigests | None,
    on_wait: Callable[[str], object],
) -> Chain:
    """Block until reachable nodes cover every layer once; raise ``ChainIncomplete`` after
    ``timeout`` seconds. ``on_wait`` gets what the head waits for (missing layers, nodes left
    out and why) on every poll that finds no chain."""
    deadline = time.monotonic() + timeout
    left_out: dict[str, tuple[float, str]] = {}  # peer id -> (until, why)

    def waiting(missing: str) -> str:
        cause = "; ".join([missing, *(f"node {p} left out: {w}" for p, (_, w) in left_out.items())])
        on_wait(cause)
        return cause

    while True:
        now = time.monotonic()
        for peer in [p for p, (until, _) in left_out.items() if until <= now]:
            del left_out[peer]
        try:
            chain = wait_for_chain(
                membership,
                head,
                max(0.0, deadline - now),
                exclude_peers=left_out,
                weights=weights,
                on_wait=waiting,
            )
        except ChainIncomplete as e:
            raise ChainIncomplete(waiting(str(e)), e.missing) from None
        unreachable = unreachable_stages(chain, security)
        if not unreachable:
            return chain
        until = time.monotonic() + UNREACHABLE_RETRY_S
        left_out.update((peer, (until, why)) for peer, why in unreachable.items())
        waiting("no chain of reachable nodes yet")  # /ready says why before the log does
        for peer, why in unreachable.items():
            logger.warning(
                "Leaving node %s out of the chain for %.0f s: %s", peer, UNREACHABLE_RETRY_S, why
            )


def unreachable_stages(chain: Chain, security: SwarmSecurity) -> dict[str, str]:
    """The chain's nodes that don't answer as themselves at their announced addresses, each
    with why (a NATed or firewalled node announces an address nobody can dial)."""
    out = {}
    for hop in chain.stages[1:]:
        stage = RemoteStage(RemoteStageSpec.from_hop(hop), security, session="")
        try:
            why = stage.probe()
        finally:
            stage.close()
        if why is not None:
            out[hop.node.peer_id] = why
    return out
