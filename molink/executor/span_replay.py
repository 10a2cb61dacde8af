"""Recovery by replay: refill only the node that took a lost span, from the head's replay log.

After a stage loss, the scheduler keeps the full KV blocks that every surviving stage computed
(:mod:`molink.core.replay_plan`). The head's stage 0 logged what it sent to stage 1
(:class:`~molink.core.replay_log.ReplayLog`); when the new chain differs from the lost one only
in the node of stage 1, that node is the only stage missing those blocks, and replaying the
logged activations through its span fills them. Each replay step is one request's chunk of
positions; the node computes it into the request's blocks, sends nothing on, and acknowledges
it. Then the requests resume from their kept blocks on every stage.

Anything else falls back to recompute, with the reason logged: a loss of a later stage (its
upstream log is on a follower; replay from a follower is not built yet), a chain that splits the
layers differently, a KV cache that was resized, a replay step that fails or times out.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from molink.comm import codec
from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import ReplayPlan
from molink.core.step import HostActivations, StepWork
from molink.telemetry import metrics
from molink.vllm_compat.scheduler import replay_scheduler_output

if TYPE_CHECKING:
    from molink.executor.remote_stage import RemoteStage

logger = init_logger(__name__)

#: Replay steps sent ahead of the oldest one not yet acknowledged.
WINDOW = 4


class ReplayFailed(RuntimeError):
    """The replay could not fill the new node (the requests recompute instead)."""


class SpanReplay:
    """Replays the head's log into a new stage-1 node (one per head executor)."""

    def __init__(self, log: ReplayLog, block_size: int, chunk_tokens: int) -> None:
        """``chunk_tokens``: most positions per replay step (the stages' token budget)."""
        self.log = log
        self.block_size = block_size
        self.chunk_tokens = max(block_size, chunk_tokens // block_size * block_size)
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._epoch = -1  # of the replay running
        self._aborted = ""

    @staticmethod
    def reason_not_to(before: list[RemoteStage], after: list[RemoteStage]) -> str:
        """Why the chain ``after`` can't be refilled by replay after losing one of ``before``
        ("" when it can: every stage but stage 1 is the same node serving the same span)."""
        if [r.span for r in before] != [r.span for r in after]:
            return "the new chain splits the layers differently"
        replaced = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not b]
        later = [str(after[i]) for i in replaced if i > 0]
        if later:
            return (
                f"{', '.join(later)} took a span after stage 1, whose input log is on a "
                "follower (replay from a follower is not built yet)"
            )
        return ""

    def abort(self, epoch: int, reason: str) -> None:
        """The chain of ``epoch`` failed: a replay into it stops."""
        with self._cond:
            if epoch == self._epoch:
                self._aborted = reason
                self._cond.notify_all()

    @property
    def aborted(self) -> bool:
        """Whether the last replay stopped because its chain failed."""
        return bool(self._aborted)

    def acknowledged(self, step_id: int) -> None:
        """The new node computed replay step ``step_id`` (from its result stream)."""
        with self._cond:
            self._acked.add(step_id)
            self._cond.notify_all()

    def run(
        self,
        plan: ReplayPlan,
        epoch: int,
        session: str,
        next_step_id: Callable[[], int],
        send: Callable[[StepWork, HostActivations], None],
        timeout: float,
    ) -> int:
        """Replay ``plan`` through the first remote stage; returns the positions replayed.

        ``send`` puts a step on the link to it; each acknowledgement must come within
        ``timeout`` s. Raises :class:`ReplayFailed`, also when :meth:`abort` is called.
        """
        with self._cond:
            self._epoch, self._aborted, self._acked = epoch, "", set()
        sent: list[int] = []
        replayed = 0
        for item in plan.values():
            for start in range(0, item.num_tokens, self.chunk_tokens):
                end = min(start + self.chunk_tokens, item.num_tokens)
                rows = self.log.rows(item.req_id, start, end)  # each [end - start, hidden]
                if rows is None:
                    raise ReplayFailed(f"the log lost request {item.req_id}'s positions")
                blocks = list(item.block_ids[: math.ceil(end / self.block_size)])
                so = replay_scheduler_output(
                    f"molink-replay-{item.req_id}", list(item.token_ids), blocks, start, end
                )
                step_id = next_step_id()
                work = StepWork(
                    step_id=step_id,
                    epoch=epoch,
                    scheduler_output=so,
                    scheduler_output_bytes=codec.dumps_step(so, {}),
                    session=session,
                    replay=True,
                )
                if len(sent) >= WINDOW:
                    self._wait(sent[-WINDOW], timeout)
                send(work, HostActivations(rows))
                sent.append(step_id)
                replayed += end - start
        if sent:
            self._wait(sent[-1], timeout)
        metrics.REPLAYED_TOKENS.inc(replayed)
        return replayed

    def _wait(self, step_id: int, timeout: float) -> None:
        """Until ``step_id`` is acknowledged (steps run in order: so are the ones before it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while step_id not in self._acked:
                if self._aborted:
                    raise ReplayFailed(self._aborted)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReplayFailed(f"no acknowledgement within {timeout:g} s")
                self._cond.wait(min(left, 0.5))
            self._acked = {s for s in self._acked if s > step_id}
