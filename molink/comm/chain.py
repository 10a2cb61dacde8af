"""Assemble a pipeline chain (head + stages covering every layer once) from node announcements.

Pure logic: :func:`assemble_chain` looks only at the announcements it is given;
:func:`wait_for_chain` polls a :class:`~molink.comm.dht.Membership` until a chain exists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from molink.comm.dht import NodeAnnouncement

if TYPE_CHECKING:
    from molink.comm.dht import Membership

logger = init_logger(__name__)

# At most this many mismatched nodes are named in an error message.
_MAX_MISMATCH_NOTES = 5
# (peer_id, model_hash, num_layers) already warned about; bounded so it can't grow forever.
_warned_mismatch: set[tuple[str, str, int]] = set()
_warned_lock = threading.Lock()
_MAX_WARNED = 10_000


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


class ChainConflict(ChainError):
    """Two nodes serve partially overlapping layer ranges of the same model.

    ``conflicts`` holds the offending pairs of announcements.
    """

    def __init__(
        self,
        message: str,
        conflicts: Sequence[tuple[NodeAnnouncement, NodeAnnouncement]] = (),
    ) -> None:
        super().__init__(message)
        self.conflicts: list[tuple[NodeAnnouncement, NodeAnnouncement]] = list(conflicts)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.conflicts)


@dataclass(frozen=True)
class Chain:
    """The nodes of a pipeline, ordered by ``start_layer``; the first is the head."""

    stages: tuple[NodeAnnouncement, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a chain needs at least one stage")
        expected = 0
        for stage in self.stages:
            if stage.start_layer != expected or stage.num_layers != self.stages[0].num_layers:
                raise ValueError(f"stages are not contiguous at layer {expected}")
            expected = stage.end_layer + 1
        if expected != self.stages[0].num_layers:
            raise ValueError(f"stages end at layer {expected - 1}, not at the last layer")

    @property
    def head(self) -> NodeAnnouncement:
        """Stage 0."""
        return self.stages[0]

    @property
    def partition(self) -> list[int]:
        """Number of layers per stage (the ``VLLM_PP_LAYER_PARTITION`` values)."""
        return [len(stage.layers) for stage in self.stages]

    @property
    def peer_ids(self) -> list[str]:
        """PeerIDs of the stages, in order."""
        return [stage.peer_id for stage in self.stages]


def _span(start: int, end: int) -> str:
    return f"layer {start}" if start == end else f"layers {start}-{end}"


def _rng(ann: NodeAnnouncement) -> str:
    return f"{ann.start_layer}-{ann.end_layer}"


def _same_model(head: NodeAnnouncement, node: NodeAnnouncement) -> bool:
    return node.model_hash == head.model_hash and node.num_layers == head.num_layers


def mismatched(head: NodeAnnouncement, nodes: Iterable[NodeAnnouncement]) -> list[NodeAnnouncement]:
    """Nodes (other than the head) that serve a different model than ``head``.

    A node differs if its ``model_hash`` or ``num_layers`` differ. Logs one warning per such peer
    (and model) the first time it is seen.
    """
    out = []
    for node in nodes:
        if node.peer_id == head.peer_id or _same_model(head, node):
            continue
        out.append(node)
        key = (node.peer_id, node.model_hash, node.num_layers)
        with _warned_lock:
            if key in _warned_mismatch:
                continue
            if len(_warned_mismatch) >= _MAX_WARNED:
                _warned_mismatch.clear()
            _warned_mismatch.add(key)
        logger.warning(
            "ignoring node %s: it serves %s of a different model (%s, hash %s, %d layers) than "
            "this head (%s, hash %s, %d layers)",
            node.peer_id,
            _span(node.start_layer, node.end_layer),
            node.model_name,
            node.model_hash,
            node.num_layers,
            head.model_name,
            head.model_hash,
            head.num_layers,
        )
    return out


def _pick(candidates: Iterable[NodeAnnouncement]) -> NodeAnnouncement:
    """Deterministic choice among replicas: online first, then the lowest peer_id."""
    return min(candidates, key=lambda a: (a.state != "online", a.peer_id))


def assemble_chain(
    head: NodeAnnouncement,
    nodes: Iterable[NodeAnnouncement],
    exclude_peers: Container[str] = (),
) -> Chain:
    """Build the chain that starts at ``head`` and covers every layer exactly once.

    * Only nodes with the head's ``model_hash`` and ``num_layers`` count (see :func:`mismatched`).
    * The head is always stage 0 (whatever its state and ``exclude_peers``); it must start at
      layer 0. Other nodes announcing exactly the head's range are ignored.
    * Nodes announcing an identical range are replicas: the online one with the lowest peer_id
      is picked. Only "online" nodes form a chain; a range served only by "joining" nodes counts
      as missing.
    * Ranges that intersect without being identical raise :class:`ChainConflict` (whatever the
      nodes' states, since a joining node will become online).
    * Uncovered layers raise :class:`ChainIncomplete` listing every missing range.
    * Nodes whose peer_id is in ``exclude_peers`` are ignored (e.g. a node that just failed).
    """
    if head.start_layer != 0:
        raise ChainError(
            f"head {head.peer_id} serves layers {_rng(head)}: a head must start at layer 0"
        )
    candidates: dict[str, NodeAnnouncement] = {}
    for node in nodes:
        if node.peer_id == head.peer_id or node.peer_id in exclude_peers:
            continue
        candidates.setdefault(node.peer_id, node)
    others = sorted(candidates.values(), key=lambda a: (a.start_layer, a.end_layer, a.peer_id))
    wrong_model = mismatched(head, others)
    wrong_ids = {node.peer_id for node in wrong_model}

    # Group matching nodes by their exact range; the head's range belongs to the head alone.
    by_range: dict[tuple[int, int], list[NodeAnnouncement]] = {(0, head.end_layer): [head]}
    for node in others:
        if node.peer_id in wrong_ids:
            continue
        key = (node.start_layer, node.end_layer)
        if key != (0, head.end_layer):
            by_range.setdefault(key, []).append(node)
    representative = {
        key: (head if key == (0, head.end_layer) else _pick(group))
        for key, group in by_range.items()
    }

    _check_conflicts(sorted(representative), representative)

    num_layers = head.num_layers
    starts = {key[0]: key for key in by_range}  # disjoint ranges: one per start
    stages = [head]
    missing: list[tuple[int, int]] = []
    notes: list[str] = []
    position = head.end_layer + 1
    while position < num_layers:
        key = starts.get(position)
        if key is None:
            following = [start for start in starts if start > position]
            end = min(following) - 1 if following else num_layers - 1
            missing.append((position, end))
            notes.append(
                f"{_span(position, end)} {'is' if position == end else 'are'} "
                "not served by any node"
            )
            position = end + 1
            continue
        online = [node for node in by_range[key] if node.state == "online"]
        if online:
            stages.append(_pick(online))
        else:
            joining = ", ".join(node.peer_id for node in by_range[key])
            verb = "is" if len(by_range[key]) == 1 else "are"
            missing.append(key)
            notes.append(f"{_span(*key)}: node {joining} {verb} still joining")
        position = key[1] + 1

    if missing:
        for node in wrong_model[:_MAX_MISMATCH_NOTES]:
            notes.append(
                f"node {node.peer_id} serves {_span(node.start_layer, node.end_layer)} of a "
                f"different model ({node.model_name}, hash {node.model_hash}, "
                f"{node.num_layers} layers; this head has hash {head.model_hash}, "
                f"{head.num_layers} layers)"
            )
        if len(wrong_model) > _MAX_MISMATCH_NOTES:
            notes.append(f"{len(wrong_model) - _MAX_MISMATCH_NOTES} more nodes of other models")
        raise ChainIncomplete("; ".join(notes), missing)
    return Chain(tuple(stages))


def _check_conflicts(
    keys: list[tuple[int, int]], representative: dict[tuple[int, int], NodeAnnouncement]
) -> None:
    """Raise ChainConflict naming every pair of distinct ranges that intersect."""
    conflicts = []
    for i, (start_a, end_a) in enumerate(keys):
        for start_b, end_b in keys[i + 1 :]:
            if start_b > end_a:
                break  # keys are sorted by start: no later range can intersect this one
            a, b = representative[(start_a, end_a)], representative[(start_b, end_b)]
            conflicts.append((a, b))
    if conflicts:
        message = "; ".join(
            f"{_span(b.start_layer, min(a.end_layer, b.end_layer))} "
            f"{'is' if b.start_layer == min(a.end_layer, b.end_layer) else 'are'} served by "
            f"both {a.peer_id} ({_rng(a)}) and {b.peer_id} ({_rng(b)})"
            for a, b in conflicts
        )
        raise ChainConflict(message, conflicts)


def wait_for_chain(
    membership: Membership,
    head: NodeAnnouncement,
    timeout: float,
    poll_interval: float = 1.0,
    log_interval: float = 10.0,
    exclude_peers: Container[str] = (),
) -> Chain:
    """Poll ``membership.nodes()`` until :func:`assemble_chain` succeeds and return the chain.

    Logs what is still missing every ``log_interval`` seconds. Raises :class:`ChainConflict` as
    soon as one is seen, and :class:`ChainIncomplete` (naming the missing layers) after
    ``timeout`` seconds. Errors from the DHT are logged and polling goes on.
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
            chain = assemble_chain(head, nodes, exclude_peers)
        except ChainIncomplete as e:
            last = e
        else:
            logger.info(
                "chain assembled: %s",
                ", ".join(f"{s.peer_id} ({_rng(s)}) at {s.grpc_address}" for s in chain.stages),
            )
            return chain
        now = time.monotonic()
        if now >= deadline:
            raise ChainIncomplete(f"no complete chain after {timeout:g} s: {last}", last.missing)
        if now >= next_log:
            logger.info("waiting for a complete chain: %s", last)
            next_log = now + log_interval
        time.sleep(max(0.0, min(poll_interval, deadline - now)))
