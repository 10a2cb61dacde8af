"""A follower without ``--serving_layers`` choosing its span from what the swarm announces."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from molink.comm.membership import Membership
from molink.core.span_choice import choose_span, coverage, needs_move
from molink.model_identity import ModelIdentity

# A node choosing its span waits this long for others' simultaneous choices to show in the DHT.
SPAN_SETTLE_S = 2.0


def swarm_coverage(membership: Membership, identity: ModelIdentity) -> tuple[list[float], int]:
    """Per layer, how many other nodes of this model serve it; and the first layer to pick.

    Layers every head serves (at least layer 0) are never chosen: a follower there would serve
    nobody. Leaving nodes don't count.
    """
    nodes = [
        n
        for n in membership.nodes()
        if n.peer_id != membership.peer_id
        and n.model_hash == identity.config_hash
        and n.num_layers == identity.num_layers
        and n.state != "leaving"
    ]
    first = min((n.end_layer + 1 for n in nodes if n.is_head), default=1)
    served = coverage(
        identity.num_layers, ((n.start_layer, n.end_layer, 1.0) for n in nodes if not n.is_head)
    )
    return served, min(first, identity.num_layers - 1)


def choose_own_span(
    membership: Membership,
    identity: ModelIdentity,
    size: int,
    announce_joining: Callable[[tuple[int, int]], None],
    settle_s: float = SPAN_SETTLE_S,
) -> tuple[int, int]:
    """Choose ``size`` layers where the swarm is thinnest (Petals' rule), announcing as joining.

    Nodes started at the same moment see the same swarm and would pick the same span; after
    announcing, a node waits ``settle_s`` for the others' choices and moves while its span
    duplicates others and some layer has no server at all.
    """
    time.sleep(random.uniform(0, settle_s / 2))  # de-synchronize nodes started together
    span: tuple[int, int] | None = None
    for _ in range(3):
        served, first = swarm_coverage(membership, identity)
        if span is not None and not needs_move(served, span, first):
            break
        span = choose_span(served, size, first)
        announce_joining(span)
        time.sleep(settle_s)
    assert span is not None
    return span
