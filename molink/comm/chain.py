"""Choose a pipeline chain (head + hops covering every layer) from node announcements.

Pure logic: :func:`assemble_chain` looks only at the announcements it is given;
:func:`wait_for_chain` polls a :class:`~molink.comm.membership.Membership` until a chain exists.

Any number of nodes may announce the same or overlapping spans, and a node may serve any
contiguous sub-span of the layers it holds. The chain is the cover of the layers after the head's
with the lowest cost, then the fewest hops. A hop costs (as in Petals' routing) its measured
round-trip time (so every extra hop pays a round trip) plus the seconds per token its node's
announced throughput implies for the layers it serves, plus a penalty for making a node rebuild
a different span than the one it already has loaded.

A node's compute is shared by every head it serves, so the compute part of a hop's cost is
multiplied by one plus the number of *other* heads the node serves (a head's own use is not
counted against it), and each other head adds :data:`SHARED_PENALTY_S`: heads beside several
replicas of a span take different replicas. A node announcing no free KV cache that doesn't
serve this head yet costs :data:`NO_ROOM_PENALTY_S` more. Equal costs are broken by a hash of the
head's and the node's peer ids (rendezvous hashing): each head always picks the same chain from
the same view, but heads starting at the same time spread over the replicas too.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from molink.comm.announcement import NodeAnnouncement
from molink.core.span_choice import coverage, uncovered
from molink.weight_digest import WeightDigests

if TYPE_CHECKING:
    from molink.comm.membership import Membership

logger = init_logger(__name__)

# At most this many mismatched nodes are named in an error message.
_MAX_MISMATCH_NOTES = 5
# (peer_id, model_hash, num_layers, weights_digest) already warned about; bounded.
_warned_mismatch: set[tuple[str, str, int, str]] = set()
_warned_lock = threading.Lock()
_MAX_WARNED = 10_000

#: Assumed round-trip time (s) of a node whose RTT has not been measured.
DEFAULT_RTT_S = 0.05
#: Cost (s) of asking a node to serve another span than the one it has loaded (a weight reload).
RELOAD_PENALTY_S = 5.0
#: Cost (s) per layer a hop leaves out of its node's announced span (prefer whole spans).
TRUNCATION_PENALTY_S = 1e-3
#: Cost (s) of each other head a node serves, on top of the shared compute (spreads heads over
#: replicas even before any node measured its throughput).
SHARED_PENALTY_S = 0.02
#: Cost (s) of a node that announces no free KV cache and doesn't serve this head yet.
NO_ROOM_PENALTY_S = 1.0


def other_heads(node: NodeAnnouncement, serving_me: Container[str]) -> int:
    """How many heads other than this one ``node`` serves (``serving_me``: the peers in this
    head's chain, whose announced ``heads`` count this head)."""
    return max(0, node.heads - (1 if node.peer_id in serving_me else 0))


def rendezvous_rank(head_peer_id: str, node_peer_id: str) -> bytes:
    """The tie-break order of ``node`` for ``head``: a hash of both peer ids."""
    return hashlib.sha256(f"{head_peer_id}/{node_peer_id}".encode()).digest()[:8]


class ChainError(Exception):
    """No usable chain can be assembled."""


class ChainIncomplete(ChainError):
    """Some layers are not served by any usable node.

    ``missing`` lists the inclusive ``(start, end)`` layer ranges nobody (online) serves.
    """

    def __init__(self, message: str, missing: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__(message)
        self.missing: list[tuple[int, int]] = list(missing)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.missing)


@dataclass(frozen=True)
class Hop:
    """One stage of a chain: ``node`` serving layers ``start_layer..end_layer`` (inclusive)."""

    node: NodeAnnouncement
    start_layer: int
    end_layer: int

    def __post_init__(self) -> None:
        if not self.node.start_layer <= self.start_layer <= self.end_layer <= self.node.end_layer:
            raise ValueError(
                f"hop {self.start_layer}-{self.end_layer} is outside the layers "
                f"{_rng(self.node)} that node {self.node.peer_id} holds"
            )

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    @property
    def grpc_address(self) -> str:
        """Where to dial the node (through its relay if it is behind NAT)."""
        return self.node.dial_address

    @property
    def span(self) -> tuple[int, int]:
        return self.start_layer, self.end_layer

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer + 1

    def __str__(self) -> str:
        return f"{self.node.grpc_address} [{self.start_layer}-{self.end_layer}]"


@dataclass(frozen=True)
class Chain:
    """The hops of a pipeline, in layer order; the first is the head's own span."""

    stages: tuple[Hop, ...]
    cost: float = field(default=0.0, compare=False)  # seconds per token, as assemble_chain counts

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a chain needs at least one stage")
        total = self.stages[0].node.num_layers
        expected = 0
        for stage in self.stages:
            if stage.start_layer != expected or stage.node.num_layers != total:
                raise ValueError(f"stages are not contiguous at layer {expected}")
            expected = stage.end_layer + 1
        if expected != total:
            raise ValueError(f"stages end at layer {expected - 1}, not at the last layer")

    @property
    def head(self) -> NodeAnnouncement:
        """Stage 0's node."""
        return self.stages[0].node

    @property
    def partition(self) -> list[int]:
        """Number of layers per stage."""
        return [stage.num_layers for stage in self.stages]

    @property
    def peer_ids(self) -> list[str]:
        """PeerIDs of the stages, in order."""
        return [stage.peer_id for stage in self.stages]

    def __str__(self) -> str:
        return " -> ".join(str(stage) for stage in self.stages)


def _span(start: int, end: int) -> str:
    return f"layer {start}" if start == end else f"layers {start}-{end}"


def _rng(ann: NodeAnnouncement) -> str:
    return f"{ann.start_layer}-{ann.end_layer}"


def _same_model(head: NodeAnnouncement, node: NodeAnnouncement) -> bool:
    return node.model_hash == head.model_hash and node.num_layers == head.num_layers


def difference(
    head: NodeAnnouncement, node: NodeAnnouncement, weights: WeightDigests | None
) -> str | None:
    """How ``node`` differs from ``head`` ("of a different model (...)" or "with different
    weights (...)"), or None when it may serve in the head's chain."""
    if not _same_model(head, node):
        return (
            f"of a different model ({node.model_name}, hash {node.model_hash}, "
            f"{node.num_layers} layers; this head has hash {head.model_hash}, "
            f"{head.num_layers} layers)"
        )
    if weights is None or not node.weights_digest:
        return None  # nothing to compare with
    expected = weights.span(node.start_layer, node.end_layer, head.num_layers)
    if node.weights_digest != expected:
        return (
            f"with different weights (digest {node.weights_digest}; this head's checkpoint "
            f"gives {expected} for those layers)"
        )
    return None


def mismatched(
    head: NodeAnnouncement,
    nodes: Iterable[NodeAnnouncement],
    weights: WeightDigests | None = None,
) -> list[tuple[NodeAnnouncement, str]]:
    """Nodes (other than the head) that can't serve in ``head``'s chain, each with how it
    differs: another ``model_hash`` or ``num_layers``, or (given the head's ``weights``) an
    announced weights digest that isn't the head's for the same layers. Logs one warning per such
    peer (and announcement) the first time it is seen."""
    out = []
    for node in nodes:
        if node.peer_id == head.peer_id:
            continue
        why = difference(head, node, weights)
        if why is None:
            continue
        out.append((node, why))
        key = (node.peer_id, node.model_hash, node.num_layers, node.weights_digest)
        with _warned_lock:
            if key in _warned_mismatch:
                continue
            if len(_warned_mismatch) >= _MAX_WARNED:
                _warned_mismatch.clear()
            _warned_mismatch.add(key)
        logger.warning(
            "ignoring node %s: it serves %s %s",
            node.peer_id,
            _span(node.start_layer, node.end_layer),
            why,
        )
    return out


def uncovered_layers(
    first: int, last: int, nodes: Iterable[NodeAnnouncement]
) -> list[tuple[int, int]]:
    """Inclusive ranges within ``first..last`` that none of ``nodes`` holds."""
    served = coverage(last + 1, ((n.start_layer, n.end_layer, 1.0) for n in nodes))
    return [(max(start, first), end) for start, end in uncovered(served) if end >= first]


def assemble_chain(
    head: NodeAnnouncement,
    nodes: Iterable[NodeAnnouncement],
    exclude_peers: Container[str] = (),
    rtt_s: Mapping[str, float] | None = None,
    loaded: Mapping[str, tuple[int, int]] | None = None,
    weights: WeightDigests | None = None,
    serving_me: Container[str] = (),
) -> Chain:
    """The best chain that starts at ``head`` and covers every layer once.

    * Only "online" nodes with the head's ``model_hash`` and ``num_layers`` count, and, given
      the head's ``weights``, whose announced weights digest matches the head's for their span;
      never the head itself or ``exclude_peers`` (see :func:`mismatched`). The head is always
      stage 0; it must start at layer 0.
    * The lowest cost first, then the fewest hops: for each hop its ``rtt_s`` (seconds; unmeasured
      nodes count :data:`DEFAULT_RTT_S`; twice for a node behind NAT, whose hops go through its
      relay: so a direct replica wins over a relayed one as near), the seconds per token its
      node's announced ``throughput`` implies for the hop's layers (unmeasured nodes count the
      median), and :data:`RELOAD_PENALTY_S` for a node whose ``loaded`` span differs from the one
      it would serve; a node's compute time counts once per head it serves (``serving_me``: the
      peers already in this head's chain, whose load is this head's own), plus
      :data:`SHARED_PENALTY_S` per other head and :data:`NO_ROOM_PENALTY_S` when it announces no
      free KV cache; then :func:`rendezvous_rank`.
    * Uncovered layers raise :class:`ChainIncomplete` listing every missing range, with the
      joining nodes and the nodes of other models that could have served them.
    """
    if head.start_layer != 0:
        raise ChainError(
            f"head {head.peer_id} serves layers {_rng(head)}: a head must start at layer 0"
        )
    rtt_s = rtt_s or {}
    loaded = loaded or {}
    others: dict[str, NodeAnnouncement] = {}
    for node in nodes:
        if node.peer_id != head.peer_id and node.peer_id not in exclude_peers:
            others.setdefault(node.peer_id, node)
    wrong_model = mismatched(head, sorted(others.values(), key=lambda a: a.peer_id), weights)
    wrong_ids = {node.peer_id for node, _ in wrong_model}
    candidates = [n for n in others.values() if n.peer_id not in wrong_ids]
    usable = sorted(
        (n for n in candidates if n.state == "online" and not n.is_head),
        key=lambda n: n.peer_id,
    )
    total, first = head.num_layers, head.end_layer + 1

    # Seconds per token per layer of each node; unmeasured nodes count the median of the others.
    per_layer = {
        n.peer_id: 1.0 / (n.throughput * (n.end_layer - n.start_layer + 1))
        for n in usable
        if n.throughput > 0
    }
    typical = statistics.median(per_layer.values()) if per_layer else 0.0

    def hop_cost(node: NodeAnnouncement, start: int, end: int) -> float:
        others = other_heads(node, serving_me)
        cost = rtt_s.get(node.peer_id, DEFAULT_RTT_S)
        if not node.reachable:  # relayed: the stage before it reaches it in two legs
            cost *= 2
        cost += (end - start + 1) * per_layer.get(node.peer_id, typical) * (1 + others)
        cost += SHARED_PENALTY_S * others
        if node.peer_id not in serving_me and node.kv_capacity_bytes and not node.kv_free_bytes:
            cost += NO_ROOM_PENALTY_S
        cost += TRUNCATION_PENALTY_S * (node.end_layer - end + start - node.start_layer)
        held = loaded.get(node.peer_id)
        if held is not None and held != (start, end):
            cost += RELOAD_PENALTY_S
        return cost

    # best[p]: the best way to serve layers p..total-1, as (hops, cost, tie-break ranks, peer
    # ids, hop list).
    best: dict[int, tuple[int, float, tuple[bytes, ...], tuple[str, ...], tuple[Hop, ...]]] = {
        total: (0, 0.0, (), (), ())
    }
    for pos in range(total - 1, first - 1, -1):
        options = []
        for node in usable:
            if not node.start_layer <= pos <= node.end_layer:
                continue
            # Ending where another node starts is enough: any other end is dominated.
            ends = {node.end_layer} | {
                m.start_layer - 1 for m in usable if pos <= m.start_layer - 1 < node.end_layer
            }
            for end in ends:
                rest = best.get(end + 1)
                if rest is None or node.peer_id in rest[3]:
                    continue
                options.append(
                    (
                        rest[0] + 1,
                        rest[1] + hop_cost(node, pos, end),
                        (rendezvous_rank(head.peer_id, node.peer_id), *rest[2]),
                        (node.peer_id, *rest[3]),
                        (Hop(node, pos, end), *rest[4]),
                    )
                )
        if options:
            best[pos] = min(options, key=lambda o: (o[1], o[0], o[2]))
    route = best.get(first)
    if route is not None:
        return Chain((Hop(head, 0, head.end_layer), *route[4]), cost=route[1])

    missing = uncovered_layers(first, total - 1, usable)
    notes: list[str] = []
    for start, end in missing:
        waiting = [
            n
            for n in candidates
            if n.state != "online" and n.start_layer <= end and n.end_layer >= start
        ]
        note = f"{_span(start, end)} {'is' if start == end else 'are'} not served by any node"
        if waiting:
            note += " (" + ", ".join(f"node {n.peer_id} is {n.state}" for n in waiting) + ")"
        notes.append(note)
    for node, why in wrong_model[:_MAX_MISMATCH_NOTES]:
        notes.append(f"node {node.peer_id} serves {_span(node.start_layer, node.end_layer)} {why}")
    if len(wrong_model) > _MAX_MISMATCH_NOTES:
        notes.append(
            f"{len(wrong_model) - _MAX_MISMATCH_NOTES} more nodes of other models or weights"
        )
    raise ChainIncomplete("; ".join(notes), missing)


def wait_for_chain(
    membership: Membership,
    head: NodeAnnouncement,
    timeout: float,
    poll_interval: float = 1.0,
    log_interval: float = 10.0,
    exclude_peers: Container[str] = (),
    weights: WeightDigests | None = None,
    on_wait: Callable[[str], object] | None = None,
) -> Chain:
    """Poll ``membership.nodes()`` until :func:`assemble_chain` succeeds and return the chain.

    Logs what is still missing every ``log_interval`` seconds (and passes it to ``on_wait`` on
    every poll that finds no chain) and raises :class:`ChainIncomplete` (naming the missing
    layers) after ``timeout`` seconds. Errors from the DHT are logged and polling goes on.
    """
    deadline = time.monotonic() + timeout
    next_log = time.monotonic() + log_interval
    last: ChainIncomplete | None = None
    while True:
        try:
            nodes = membership.nodes()
        except Exception as e:  # noqa: BLE001  # a DHT hiccup must not end the wait
            logger.warning("could not read swarm membership: %s", e)
            nodes = []
        try:
            chain = assemble_chain(head, nodes, exclude_peers, weights=weights)
        except ChainIncomplete as e:
            last = e
            if on_wait is not None:
                on_wait(str(e))
        else:
            logger.info("chain assembled: %s", chain)
            return chain
        now = time.monotonic()
        if now >= deadline:
            raise ChainIncomplete(f"no complete chain after {timeout:g} s: {last}", last.missing)
        if now >= next_log:
            logger.info("waiting for a complete chain: %s", last)
            next_log = now + log_interval
        time.sleep(max(0.0, min(poll_interval, deadline - now)))
