"""When a head moves its chain onto less loaded replicas: the hysteresis that keeps heads still.

A head keeps its chain until a loss. When loads change (another head joins a node of the chain
while a replica of the same span idles), the chain it would choose now may cost much less.
Moving costs a recompute of every running request, so a head moves only when all of these hold:

* a node of its chain serves other heads too, and a chain over the same spans on other
  replicas costs at least :data:`GAIN` less than its own, both counted by
  :func:`~molink.comm.chain.assemble_chain` from the same view (which counts a node's compute
  once per head it serves);
* it has for :data:`CONFIRM_S` in a row (a blip of load doesn't count);
* its chain has served ``--rebalance-after`` seconds since it was wired;
* it is first in line on every node it would leave: of the heads a node announces, only the
  first in rendezvous order moves (:func:`first_in_line`), so heads that share a node don't all
  move at once and then back. Once it moved, the node announces one head less and the next
  head sees no gain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

#: The fraction of its cost per token a chain must save to be worth moving to.
GAIN = 0.25
#: Seconds the saving must last before the head moves.
CONFIRM_S = 10.0


def first_in_line(node_peer_id: str, head_ids: Iterable[str], head_peer_id: str) -> bool:
    """Whether ``head_peer_id`` is the head that moves first off the node ``node_peer_id``
    among the heads it serves (``head_ids``; a head the node doesn't list yet is not)."""
    ids = set(head_ids)
    if head_peer_id not in ids:
        return False

    def rank(head: str) -> bytes:
        return hashlib.sha256(f"{node_peer_id}/{head}".encode()).digest()

    return min(ids, key=rank) == head_peer_id


class RebalancePolicy:
    """Decides, check after check, whether the head moves to a cheaper chain."""

    def __init__(self, after_s: float) -> None:
        """``after_s``: seconds a chain serves before the head may leave it (0: never)."""
        self.after_s = after_s
        self._wired_at = 0.0
        self._cheaper_since: float | None = None

    def wired(self, now: float) -> None:
        """A chain was wired at ``now`` (monotonic seconds)."""
        self._wired_at = now
        self._cheaper_since = None

    def should_move(self, current_cost: float, offered_cost: float | None, now: float) -> bool:
        """Whether to move now: the head's chain costs ``current_cost``, the best chain it may
        move to ``offered_cost`` (None: none)."""
        if self.after_s <= 0:
            return False
        if offered_cost is None or offered_cost > current_cost * (1 - GAIN):
            self._cheaper_since = None
            return False
        if self._cheaper_since is None:
            self._cheaper_since = now
        return now - self._cheaper_since >= CONFIRM_S and now - self._wired_at >= self.after_s
