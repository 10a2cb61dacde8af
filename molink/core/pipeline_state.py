"""Pipeline health shared by the executor and the scheduler inside the head's EngineCore process.

The executor (step threads) writes, the scheduler (engine thread) reads. A *failure epoch* counts
interruptions of the chain: every stage loss bumps ``failed_epoch``, and so does a rewiring the
head chooses (a KV resize, to make room for another head on a shared stage or to take back the
room one left, or a rebalance, to move off a loaded replica; see :data:`CAUSES`); once a full
chain is serving again the executor sets ``ready_epoch = failed_epoch``. Scheduler outputs are
tagged with the epoch they were made in, so the executor can tell batches of a broken chain from
batches of the rebuilt one.

It also holds the measured step costs (:class:`~molink.core.micro_batching.PipelineCostModel`)
that the executor records and the scheduler's micro-batching policy reads, and, with
``--recovery replay``, the head's replay log and the replay handshake
(:mod:`molink.core.replay_plan`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

from molink.config import MoLinkConfig
from molink.core.micro_batching import PipelineCostModel
from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import ReplayHandshake

EPOCH_ATTR = "molink_epoch"

#: Why the chain was interrupted: a stage loss, or a rewiring the head chose (no loss), as the
#: scheduler's log line and the recompute metric's ``cause`` name them.
CAUSES = {
    "stage_loss": "its pipeline broke",
    "kv_resize": "the KV cache was resized for the heads sharing a stage",
    "rebalance": "the head moved to a less loaded replica",
    "hot_standby": "a standby became hot",
}
#: Interruptions after which the requests keep running and every stage keeps its KV cache (a
#: lost span's new node is refilled by replay, when the head recovers by replay).
KEEPS_KV_CAUSES = frozenset({"stage_loss", "hot_standby"})


class PipelineState:
    """Failure and recovery epochs of the pipeline (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failed_epoch = 0
        self.ready_epoch = 0
        self.last_error = ""
        self.last_cause = "stage_loss"  # of the last interruption: a key of CAUSES
        # The KV blocks the head may use (None: all it planned): lowered when the head shrinks
        # for another head on a shared stage, raised (up to what it planned) when one left.
        self.kv_blocks_limit: int | None = None
        # What recovery is waiting for (e.g. "no node serves layers 15-29"), while it waits.
        self.waiting_for = ""
        # Set by the executor (built before the scheduler) from --outage-timeout.
        self.outage_timeout = MoLinkConfig.outage_timeout
        self.costs = PipelineCostModel()
        # Recovery by replay (--recovery replay): the executor sets the log of the head's
        # boundary; the scheduler and the executor agree on each replay through ``replay``.
        self.replay_log: ReplayLog | None = None
        self.replay = ReplayHandshake()
        self.running_requests = 0  # the scheduler's running requests, at its last step
        # A stage of the chain runs other heads' sequences too (set by the executor from the
        # swarm view): their steps fill its time between this head's, so more micro-batches of
        # this head would only split its rows into smaller passes (the scheduler keeps one in
        # flight).
        self.stages_shared = False

    def interrupt(self, reason: str, epoch: int | None = None, cause: str = "stage_loss") -> int:
        """Record a stage loss seen while running ``epoch`` (default: the current one), or
        another ``cause`` of :data:`CAUSES`.

        Returns the new failure epoch. A second report about the same epoch is ignored.
        """
        with self._lock:
            if epoch is None or epoch >= self.failed_epoch:
                self.failed_epoch += 1
                self.last_error = reason
                self.last_cause = cause
            return self.failed_epoch

    def mark_ready(self, epoch: int) -> None:
        """A full chain serves ``epoch`` again."""
        with self._lock:
            if epoch == self.failed_epoch:
                self.ready_epoch = epoch

    def outage_cause(self) -> str:
        """Why no chain serves: what recovery waits for, and the loss that started it."""
        parts = [p for p in (self.waiting_for, self.last_error) if p]
        return "; ".join(parts) or "no full pipeline"

    @property
    def chain_ready(self) -> bool:
        return self.ready_epoch == self.failed_epoch


# One per EngineCore process: the executor and the scheduler are built in the same process.
PIPELINE_STATE = PipelineState()


@dataclass
class StageLostOutput(ModelRunnerOutput):
    """The output of a step the pipeline could not finish: every request maps to no tokens."""

    epoch: int = 0
    reason: str = ""


def lost_output(scheduler_output: SchedulerOutput, epoch: int, reason: str) -> StageLostOutput:
    """A result for a lost step; every scheduled request must be present (else KeyError)."""
    ids = list(scheduler_output.num_scheduled_tokens)
    return StageLostOutput(
        req_ids=ids,
        req_id_to_index={rid: i for i, rid in enumerate(ids)},
        sampled_token_ids=[[] for _ in ids],
        epoch=epoch,
        reason=reason,
    )


def epoch_of(scheduler_output: SchedulerOutput) -> int:
    """The failure epoch a scheduler output was made in (0 if untagged)."""
    return getattr(scheduler_output, EPOCH_ATTR, 0)
