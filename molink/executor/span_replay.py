"""Recovery by replay: refill only the node that took a lost span, from a replay log.

After a stage loss, the scheduler keeps the full KV blocks that every surviving stage computed
(:mod:`molink.core.replay_plan`). Every stage logs what it sent to the next one
(:class:`~molink.core.replay_log.ReplayLog`): the head for stage 1, each follower for the stage
after it. When the new chain differs from the lost one only in the node of one span, that node is
the only stage missing those blocks, and replaying the activations logged at its input through
its span fills them. Each replay step carries chunks of positions of several requests, up to
the stages' token budget, and goes down the chain like any step: the stage before the new node
adds the logged rows (the head, when it is stage 1), the new node computes them into the
requests' blocks, sends nothing on and acknowledges the step. Then the requests, which kept
running, go on from there on every stage. A request whose rows are no
longer logged (dropped over the cap) recomputes alone.

Anything else falls back to recompute, with the reason logged: a chain that splits the layers
differently, more than one new node, a KV cache that was resized, a replay that fails or times
out.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger

from molink.comm import codec
from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import ReplayItem, ReplayPlan, replay_request_id
from molink.core.step import HostActivations, StepWork, replay_order
from molink.engine.head_config import HeadConfig
from molink.telemetry import metrics
from molink.vllm_compat.scheduler import replay_scheduler_output

if TYPE_CHECKING:
    from molink.executor.remote_stage import RemoteStage

logger = init_logger(__name__)

#: Replay steps sent ahead of the oldest one not yet acknowledged.
WINDOW = 4


@dataclass(frozen=True)
class Piece:
    """Positions [start, end) of one request, in one replay step."""

    item: ReplayItem
    start: int
    end: int


class ReplayFailed(RuntimeError):
    """The replay could not fill the new node (the requests recompute instead)."""


class SpanReplay:
    """Replays what a stage logged into the new node of the span after it (one per head
    executor)."""

    def __init__(
        self, log: ReplayLog, block_size: int, chunk_tokens: int, max_requests: int
    ) -> None:
        """``chunk_tokens``, ``max_requests``: most positions and requests per replay step (the
        stages' token budget and batch size)."""
        self.log = log
        self.block_size = block_size
        self.chunk_tokens = chunk_tokens
        self.max_requests = max_requests
        self._cond = threading.Condition()
        self._acked: dict[int, str] = {}  # step id -> "" or why it failed
        self._epoch = -1  # of the replay running
        self._aborted = ""

    @classmethod
    def for_head(cls, worker: Any, session: str, vllm_config: VllmConfig) -> SpanReplay:
        """The head's replay: its stage 0 (``worker``) logs what it sends to stage 1, up to
        ``--replay-log-mb``, and replay steps take the stages' token budget and batch size."""
        head = HeadConfig.from_vllm_config(vllm_config)
        wire = codec.WireFormat.from_names(head.wire_dtype, head.wire_compression)
        log = worker.keep_replay_log(session, head.replay_log_bytes, wire.dtype)
        log.on_size = metrics.REPLAY_LOG_BYTES.set
        scheduler = vllm_config.scheduler_config
        return cls(
            log,
            vllm_config.cache_config.block_size,
            scheduler.max_num_batched_tokens,
            scheduler.max_num_seqs,
        )

    @staticmethod
    def new_node(before: list[RemoteStage], after: list[RemoteStage]) -> tuple[int | None, str]:
        """Which remote stage of the chain ``after`` must be refilled after losing a stage of
        ``before``: ``(index, "")``, ``(None, "")`` when none (every stage is the same node
        serving the same span), or ``(None, why)`` when a replay can't refill it."""
        if [r.span for r in before] != [r.span for r in after]:
            return None, "the new chain splits the layers differently"
        replaced = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a is not b]
        if len(replaced) > 1:
            return None, f"{len(replaced)} stages of the new chain are new nodes"
        return (replaced[0] if replaced else None), ""

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

    def acknowledged(self, step_id: int, error: str = "") -> None:
        """Replay step ``step_id`` is done (from a result stream; ``error``: it could not be)."""
        with self._cond:
            self._acked[step_id] = error
            self._cond.notify_all()

    def run(
        self,
        plan: ReplayPlan,
        epoch: int,
        target: tuple[int, bool],
        session: str,
        next_step_id: Callable[[], int],
        send: Callable[[StepWork, HostActivations | None], None],
        timeout: float,
    ) -> tuple[int, frozenset[str]]:
        """Replay ``plan`` into the stage whose span starts at layer ``target[0]``; the head
        adds the logged rows when ``target[1]`` (the target is stage 1), else the stage before
        the target does. ``send`` puts a step on the head's link to stage 1; each
        acknowledgement must come within ``timeout`` s.

        Returns the positions replayed and the requests that could not be (their rows were
        not logged). Raises :class:`ReplayFailed`, also when :meth:`abort` is called.
        """
        layer, head_is_source = target
        with self._cond:
            self._epoch, self._aborted, self._acked = epoch, "", {}
        sent: list[tuple[int, list[Piece]]] = []
        failed: set[str] = set()
        for pieces in self._steps(plan):
            rows = None
            if head_is_source:
                rows = self._rows(pieces, failed)
                pieces = [p for p in pieces if p.item.req_id not in failed]
                if not pieces:
                    continue
            so = replay_scheduler_output(
                [
                    (
                        replay_request_id(p.item.req_id),
                        list(p.item.token_ids),
                        list(p.item.block_ids[: math.ceil(p.end / self.block_size)]),
                        p.start,
                        p.end,
                    )
                    for p in pieces
                ]
            )
            step_id = next_step_id()
            work = StepWork(
                step_id=step_id,
                epoch=epoch,
                scheduler_output=so,
                scheduler_output_bytes=codec.dumps_step(so, {}),
                session=session,
                replay=True,
                replay_layer=layer,
            )
            if len(sent) >= WINDOW:
                self._wait(sent[-WINDOW][0], timeout)
            send(work, None if rows is None else HostActivations(rows, replay_order(so)))
            sent.append((step_id, pieces))
        if sent:
            self._wait(sent[-1][0], timeout)
        with self._cond:
            errors = {step_id: self._acked.get(step_id, "") for step_id, _ in sent}
        for step_id, pieces in sent:
            for piece in pieces:
                if errors[step_id] and piece.item.req_id not in failed:
                    logger.warning(
                        "Replay of request %s failed: %s", piece.item.req_id, errors[step_id]
                    )
                    failed.add(piece.item.req_id)
        replayed = sum(
            p.end - p.start for _, pieces in sent for p in pieces if p.item.req_id not in failed
        )
        metrics.REPLAYED_TOKENS.inc(replayed)
        return replayed, frozenset(failed)

    def _steps(self, plan: ReplayPlan) -> list[list[Piece]]:
        """The plan's positions in steps of at most ``chunk_tokens`` positions and
        ``max_requests`` requests (a long request is split over several steps)."""
        steps: list[list[Piece]] = [[]]
        room = self.chunk_tokens
        for item in plan.values():
            start = item.start
            while start < item.num_tokens:
                if room == 0 or len(steps[-1]) == self.max_requests:
                    steps.append([])
                    room = self.chunk_tokens
                end = min(item.num_tokens, start + room)
                steps[-1].append(Piece(item, start, end))
                room -= end - start
                start = end
        return [step for step in steps if step]

    def _rows(self, pieces: list[Piece], failed: set[str]) -> dict[str, torch.Tensor] | None:
        """The head's logged rows of ``pieces``, in order (each [positions, hidden_size]);
        a request whose rows are not logged goes into ``failed`` and out of the step."""
        parts: list[dict[str, torch.Tensor]] = []
        for piece in pieces:
            rows = self.log.rows(piece.item.req_id, piece.start, piece.end)
            if rows is None:
                failed.add(piece.item.req_id)
            elif piece.item.req_id not in failed:
                parts.append(rows)
        if not parts:
            return None
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

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
