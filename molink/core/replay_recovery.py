"""The scheduler's side of a recovery by replay (see :mod:`molink.core.replay_plan`).

At a stage loss the head's scheduler keeps its running requests running, each rolled back to the
tokens every stage computed, and offers those positions as the plan the executor replays into
the lost span's new node. Before it schedules on the new chain it reads the outcome: requests the
replay missed (all of them, if it failed) are preempted to recompute.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

from molink.core.replay_plan import ReplayItem, ReplayPlan
from molink.vllm_compat.scheduler import SchedulerHooks

logger = init_logger(__name__)


class ReplayRecovery(SchedulerHooks):
    """The replay plan and its outcome, for :class:`~molink.core.scheduler.PipelineScheduler`
    (which owns the attributes below)."""

    pipeline: Any  # molink.core.pipeline_state.PipelineState
    _epoch: int
    _barrier_cause: str
    _replay_epoch: int | None
    _replay_kept: dict[str, int]
    _reintroduce: set[str]

    def _replay_plan(self) -> ReplayPlan | None:
        """What the lost span's new node can be refilled with: per running request, the
        positions whose step came back from every stage, and their blocks. None when this head
        recovers by recompute (``--recovery recompute``, or a KV layout a replay can't fill)."""
        if self.pipeline.replay_log is None or not self.full_attention_only():
            return None
        plan: ReplayPlan = {}
        size = self.block_size
        for request in self.running:
            rid = request.request_id
            num = self.confirmed_tokens(request)
            if num > 0:
                blocks = self.request_block_ids(request)[: -(-num // size)]
                plan[rid] = ReplayItem(rid, tuple(request.all_token_ids[:num]), tuple(blocks), num)
        return plan

    def _check_replay(self) -> None:
        """On the first step of a rebuilt chain: the requests the lost span's new node was
        not refilled for (all of them, if the replay failed) are preempted to recompute."""
        epoch, self._replay_epoch = self._replay_epoch, None
        kept, self._replay_kept = self._replay_kept, {}
        replayed, failed = self.pipeline.replay.outcome(epoch)
        if epoch != self._epoch:
            return
        dropped = set(kept) if not replayed else failed & set(kept)
        if not dropped:
            return
        logger.warning(
            "The lost span's new node was not refilled for %d request(s): they recompute",
            len(dropped),
        )
        self._barrier_cause = "stage_loss"
        try:
            if not replayed:
                self._reintroduce.clear()
                self.reset_prefix_cache(reset_running_requests=True)
            else:
                self._reintroduce -= dropped
                self.preempt_running(dropped)
        finally:
            self._barrier_cause = ""
