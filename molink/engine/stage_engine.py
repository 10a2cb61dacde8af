"""The compute loop of one pipeline stage: steps in, strictly in order, outputs to a sink.

Every node (the head's stage 0 and each remote stage) runs one :class:`StageEngine`. Steps arrive
in each head's order; the engine applies each one to its worker on a single thread (the model
runner's persistent batch requires every scheduler output, empty ones included, in order) and hands
the result to the :class:`StepSink` of the step's head: the link to the next stage, or the result
stream to the head. Receiving, decoding, computing and sending run on different threads, so a
stage computes step k+1 while step k is still on the wire.

A follower may serve several heads (:mod:`molink.core.head_session`): their steps run on the
compute thread in arrival order, each checked and moved into its head's KV region first, and the
steps of several heads that wait at the same time run as one forward pass (:meth:`_gather`): a
step's cost is mostly one pass over the weights, whatever its rows.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vllm.logger import init_logger

from molink.core.head_session import HeadSession, StepRefused
from molink.core.micro_batching import StageTiming
from molink.core.request_owners import NotYours, RequestOwners
from molink.core.step import HostActivations, StepSink, StepWork, replay_order
from molink.telemetry import metrics
from molink.vllm_compat.step_joining import request_ids_named

logger = init_logger(__name__)


class StageEngine:
    """Runs steps on a stage worker in arrival order on one thread."""

    _RESET = object()  # marks an action to run on the compute thread between steps

    def __init__(self, worker: Any, layers: tuple[int, int], join_wait: float = 0.0) -> None:
        """``worker`` is a ``WorkerWrapperBase`` around a :class:`StageWorker` serving the
        (inclusive) span ``layers``. ``join_wait``: how long a pass may wait for other heads'
        steps, as a share of the last pass's compute time (see :meth:`_gather`)."""
        self.worker = worker
        self.layers = layers
        self.name = f"layers {layers[0]}-{layers[1]}"
        label = f"{layers[0]}-{layers[1]}"
        self._step_seconds = metrics.STEP_SECONDS.labels(label)
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(label)
        self._tokens = metrics.STAGE_TOKENS.labels(label)
        self._joined_passes = metrics.JOINED_PASSES.labels(label)
        self._joined_steps = metrics.JOINED_STEPS.labels(label)
        self._join_wait_seconds = metrics.JOIN_WAIT_SECONDS.labels(label)
        self.join_wait = join_wait
        self._passes = 0
        self._last_compute = 0.0
        self._last_pass_of: dict[str, int] = {}  # session -> the last pass it had a step in
        # session -> (waits in vain in a row, the first pass that may wait for it again)
        self._patience: dict[str, tuple[int, int]] = {}
        metrics.track_kv_blocks(self.kv_blocks)
        # Every head's session by id (one on a head: its own).
        self.sessions: dict[str, HeadSession] = {}
        self.owners = RequestOwners()  # which head each request here belongs to
        self.steps_done = 0
        self.tokens_done = 0
        self.busy_seconds = 0.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pending: deque[Any] = deque()  # taken off the queue, not run yet (see _gather)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop, name=f"molink-stage-{label}", daemon=True
        )
        self._thread.start()

    def submit(self, work: StepWork) -> None:
        """Queue a step; steps of an older epoch than their session's are dropped."""
        self._queue.put(work)

    def start_epoch(self, session: HeadSession, epoch: int, sink: StepSink | None) -> list[int]:
        """Drop the session's queued steps, forget its requests, go on with ``epoch`` into
        ``sink``.

        Runs on the compute thread, so it never interleaves with a step; returns when done, with
        what a hot standby's KV blocks held then (:meth:`KVValidity.snapshot
        <molink.core.hot_standby.KVValidity.snapshot>` of the head's blocks; [] for others).
        """
        held: list[int] = []

        def reset() -> None:
            if session.hot is not None and session.region is not None:
                held.extend(session.hot.snapshot(session.region.ids))
            self._reset(session, epoch, sink)

        self._on_compute_thread(reset)
        return held

    def end_session(self, session: HeadSession) -> None:
        """Forget a head: its requests, queued steps and sink (returns when done)."""

        def end() -> None:
            self._reset(session, session.epoch, None)
            self.sessions.pop(session.id, None)
            self._last_pass_of.pop(session.id, None)
            self._patience.pop(session.id, None)
            self.worker.forget_head(session.id)

        self._on_compute_thread(end)

    def requests_of(self, session_id: str) -> int:
        """How many requests of a head this stage holds (read from any thread)."""
        return self.owners.count(session_id)

    def kv_blocks(self) -> tuple[int, int]:
        """(KV blocks its requests hold, KV blocks allocated); (0, 0) when it can't tell."""
        if self._stopped:
            return 0, 0
        try:
            return self.worker.kv_blocks()
        except Exception:  # noqa: BLE001  # a scrape must never fail on a stage being rebuilt
            return 0, 0

    def shutdown(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _on_compute_thread(self, action: Callable[[], None]) -> None:
        done = threading.Event()
        self._queue.put((self._RESET, action, done))
        done.wait()

    def _loop(self) -> None:
        while not self._stopped:
            item = self._pending.popleft() if self._pending else self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple) and item[0] is self._RESET:
                _, action, done = item
                action()
                done.set()
                continue
            self._run(self._gather(item))

    def _gather(self, first: StepWork) -> list[StepWork]:
        """``first`` and the steps of other heads waiting behind it that can share its pass.

        Takes from each other head its oldest waiting step (never one queued behind a reset, or
        behind a step of its head that can't join), in arrival order, while the pass stays
        within the stage's token and request budget; adds no wait. Each step is whole: a head
        whose step doesn't fit is first in the next pass.
        """
        if not self._joinable(first):
            return [first]
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._await_other_heads(first)
        group = [first]
        max_tokens, max_reqs = self.worker.step_limits()
        tokens = first.scheduler_output.total_num_scheduled_tokens
        reqs = len(first.scheduler_output.num_scheduled_tokens)
        taken, passed = {first.session}, set()
        for item in self._pending:
            if not isinstance(item, StepWork):  # a reset (or the stop): nothing behind it
                break
            so = item.scheduler_output
            fits = (
                tokens + so.total_num_scheduled_tokens <= max_tokens
                and reqs + len(so.num_scheduled_tokens) <= max_reqs
            )
            if item.session in taken or item.session in passed or not fits:
                passed.add(item.session)
            elif self._joinable(item):
                group.append(item)
                taken.add(item.session)
                tokens += so.total_num_scheduled_tokens
                reqs += len(so.num_scheduled_tokens)
            else:
                passed.add(item.session)
        if len(group) > 1:  # by identity: StepWork's == would compare tensors
            taken_ids = {id(work) for work in group}
            self._pending = deque(item for item in self._pending if id(item) not in taken_ids)
        return group

    def _await_other_heads(self, first: StepWork) -> None:
        """Wait a little for the next steps of heads that shared the last passes, when none is
        queued yet: each head sends its next step once the last one's result reached it, so
        heads that a pass joined come back together, a few milliseconds apart, and a step
        taken at once would run alone. The wait is at most ``join_wait`` x the last pass's
        compute time and ends as soon as they are all queued. A head waited for in vain is not
        waited for again during the next 2, 4, 8 ... 64 passes (doubling while it stays late;
        a head back from a pause starts afresh)."""
        if self.join_wait <= 0:
            return
        queued = {item.session for item in self._pending if isinstance(item, StepWork)}
        expected = {
            session
            for session, last in self._last_pass_of.items()
            if last >= self._passes - 2
            and session != first.session
            and session not in queued
            and self._patience.get(session, (0, 0))[1] <= self._passes
        }
        if not expected:
            return
        start = time.monotonic()
        deadline = start + self.join_wait * self._last_compute
        waited = set(expected)
        while expected:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            self._pending.append(item)
            if not isinstance(item, StepWork):  # a reset or the stop: it goes first
                break
            expected.discard(item.session)
        self._join_wait_seconds.inc(time.monotonic() - start)
        for session in waited:
            misses = self._patience.get(session, (0, 0))[0] + 1 if session in expected else 0
            pause = 2 ** min(misses, 6) if misses else 0
            self._patience[session] = (misses, self._passes + pause)

    def _joinable(self, work: StepWork) -> bool:
        session = self.sessions.get(work.session)
        return (
            session is not None
            and not session.owns_all
            and work.epoch == session.epoch
            and not work.error
            and not work.replay
            and work.tensors is not None
            and self.worker.can_join(work.scheduler_output)
        )

    def _reset(self, session: HeadSession, epoch: int, sink: StepSink | None) -> None:
        session.epoch = epoch
        session.sink = sink
        self.sessions[session.id] = session
        try:
            self.worker.reset_stage(self.owners.forget(session.id))
        except Exception:  # a reset must not kill the loop; the next step will report
            logger.exception("%s: reset failed", self.name)

    def _pass_replay(self, work: StepWork, session: HeadSession, sink: StepSink) -> None:
        """A replay step for a later stage: the stage just before it adds its logged rows of
        the step's requests (or tells the head it can't); the ones before pass it on."""
        if work.replay_layer != self.layers[1] + 1:
            sink.emit(work, None)
            return
        rows = self.worker.replay_rows(work.session, work.scheduler_output)
        if rows is None:
            session.results.replayed(work, f"{self.name} does not hold its logged positions")
            return
        sink.emit(work, HostActivations(rows, replay_order(work.scheduler_output)))

    def _admit(self, work: StepWork) -> StepSink | None:
        """The sink of a step that may run now; None when it was dropped, failed or passed on
        (a replay step for a later stage)."""
        session = self.sessions.get(work.session)
        sink = session.sink if session else None
        target = work.replay and work.replay_layer == self.layers[0]
        if target and session is not None:
            sink = session.results
        if session is None or work.epoch != session.epoch or sink is None:
            logger.debug("%s: dropping step %d of epoch %d", self.name, work.step_id, work.epoch)
            return None
        if work.error:
            sink.fail(work, work.error)
            return None
        if work.replay and not target:
            self._pass_replay(work, session, sink)
            return None
        so = work.scheduler_output
        try:
            if work.tensors is not None:
                check_row_order(work)
            named = request_ids_named(so) | set(work.snapshots)
            self.owners.admit(session.id, named, so.finished_req_ids)
            session.admit(so)
        except (StepRefused, NotYours) as e:
            logger.warning("%s: refused step %d: %s", self.name, work.step_id, e)
            sink.fail(work, f"{self.name}: {e}")
            return None
        return sink

    def _run(self, group: list[StepWork]) -> None:
        """Run steps (of different heads) as one forward pass; each output goes to its sink."""
        admitted = [(work, sink) for work in group if (sink := self._admit(work)) is not None]
        if not admitted:
            return
        steps = [work for work, _ in admitted]
        start = time.monotonic()
        try:
            outputs = self.worker.execute_stage(steps)
        except Exception as e:
            logger.exception("%s: step %s failed", self.name, [w.step_id for w in steps])
            for work, sink in admitted:
                sink.fail(work, f"{self.name}: {type(e).__name__}: {e}")
            return
        compute = time.monotonic() - start
        for work in steps:
            hot = self.sessions[work.session].hot
            if hot is not None and not work.replay:  # a hot standby: what its KV blocks hold
                written = self.worker.kv_positions_written(work.scheduler_output)
                hot.written(work.epoch, work.step_id, written)
        tokens = sum(work.scheduler_output.total_num_scheduled_tokens for work in steps)
        self.busy_seconds += compute
        self.steps_done += len(steps)
        self.tokens_done += tokens
        self._step_seconds.observe(compute)
        self._tokens.inc(tokens)
        if len(steps) > 1:
            self._joined_passes.inc()
            self._joined_steps.inc(len(steps))
        if len(steps) > 1 or self._joinable(steps[0]):
            self._passes += 1
            self._last_compute = compute
            for work in steps:
                if self._last_pass_of.get(work.session, -3) < self._passes - 3:
                    self._patience.pop(work.session, None)  # back from a pause: not late
                self._last_pass_of[work.session] = self._passes
        for (work, sink), output in zip(admitted, outputs, strict=True):
            wait = start - work.received_at
            work.timings.append(
                StageTiming(
                    wait_s=wait,
                    compute_s=compute,
                    arrived_unix=work.arrived_unix,
                    decode_s=work.decode_s,
                    done_unix=time.time(),
                )
            )
            self._queue_wait.observe(wait)
            if work.replay:  # its KV is written: acknowledge, forget its requests, send nothing on
                ids = self.owners.forget(work.session, work.scheduler_output.num_scheduled_tokens)
                self.worker.reset_stage(ids, quiet=True)
            sink.emit(work, output)


def check_row_order(work: StepWork) -> None:
    """Refuse a step whose rows are not one run per scheduled request (its ``row_order``)."""
    scheduled = {r for r, n in work.scheduler_output.num_scheduled_tokens.items() if n > 0}
    order = work.row_order
    if len(order) != len(scheduled) or set(order) != scheduled:
        raise StepRefused("its row order does not name each scheduled request once")
    rows = {t.shape[0] for t in (work.tensors or {}).values()}
    if rows != {work.scheduler_output.total_num_scheduled_tokens}:
        raise StepRefused(
            f"it carries {sorted(rows)} rows for "
            f"{work.scheduler_output.total_num_scheduled_tokens} scheduled tokens"
        )
