"""What a recovery by replay refills, and how the scheduler and the executor agree on it.

After a stage loss, the head's scheduler (engine thread) knows each running request's blocks and
how many of its tokens every stage computed; the executor (its maintenance thread) wires the new
chain and fills the node that took the lost span. They meet here, in the head's
:class:`~molink.core.pipeline_state.PipelineState`:

1. the scheduler *offers* a plan for the failure epoch: per running request, the positions
   every surviving stage computed and their blocks (it keeps the requests running, rolled back
   to those positions);
2. the executor *takes* it (or gives up waiting, when no request was running), replays it
   through the new node and *finishes* the epoch with the outcome;
3. the scheduler reads the outcome before it schedules on the new chain: after a failed replay it
   preempts every request to recompute; after a replay that failed for some requests (their
   rows were no longer logged), it preempts those.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplayItem:
    """Positions [start, num_tokens) of one request, to be replayed into ``block_ids``."""

    req_id: str
    token_ids: tuple[int, ...]  # the request's first num_tokens tokens
    block_ids: tuple[int, ...]  # its blocks holding those positions, in order
    num_tokens: int
    start: int = 0  # positions before it are held already (by a former hot standby)


ReplayPlan = dict[str, ReplayItem]

_REPLAY_PREFIX = "molink-replay-"


def replay_request_id(req_id: str) -> str:
    """The id a replay step gives request ``req_id`` (it never meets the request's own)."""
    return _REPLAY_PREFIX + req_id


def replayed_request(replay_id: str) -> str | None:
    """The request a replay step's id names (None: not a replay id)."""
    return replay_id[len(_REPLAY_PREFIX) :] if replay_id.startswith(_REPLAY_PREFIX) else None


class ReplayHandshake:
    """The scheduler's plan and the executor's outcome of each recovery (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._plans: dict[int, ReplayPlan | None] = {}
        self._given_up: set[int] = set()
        self._outcomes: dict[int, tuple[bool, frozenset[str]]] = {}

    def offer(self, epoch: int, plan: ReplayPlan | None) -> bool:
        """The scheduler's plan for failure ``epoch`` (None: it recomputes, nothing to replay).
        False when the executor has already wired that epoch without waiting for it (the
        scheduler must then recompute)."""
        with self._cond:
            if epoch in self._given_up:
                return False
            self._plans[epoch] = plan
            self._cond.notify_all()
            return True

    def take(self, epoch: int, timeout: float) -> tuple[bool, ReplayPlan | None]:
        """``(answered, plan)``: the scheduler's answer for ``epoch``, waiting up to ``timeout``
        s for it. Without an answer, the scheduler's offer for that epoch is refused from now
        on."""
        with self._cond:
            if epoch in self._outcomes:  # taken already (a retry of the same epoch)
                return True, None
            answered = self._cond.wait_for(lambda: epoch in self._plans, timeout)
            if not answered:
                self._given_up.add(epoch)
                return False, None
            return True, self._plans.pop(epoch)

    def finish(self, epoch: int, replayed: bool, failed: frozenset[str] = frozenset()) -> None:
        """The executor's outcome for ``epoch``: ``replayed`` when the new node holds the plan's
        KV, but for the requests ``failed``."""
        with self._cond:
            self._outcomes[epoch] = (replayed, failed)
            self._plans = {e: p for e, p in self._plans.items() if e > epoch}
            self._given_up = {e for e in self._given_up if e >= epoch}

    def outcome(self, epoch: int) -> tuple[bool, frozenset[str]]:
        """Whether the plan of ``epoch`` was replayed, and the requests it failed for
        ((False, {}) when unknown; read once)."""
        with self._cond:
            return self._outcomes.pop(epoch, (False, frozenset()))
