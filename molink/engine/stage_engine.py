"""The compute loop of one pipeline stage: steps in, strictly in order, outputs to a sink.

Every node (the head's stage 0 and each remote stage) runs one :class:`StageEngine`. Steps arrive
in each head's order; the engine applies each one to its worker on a single thread (the model
runner's persistent batch requires every scheduler output, empty ones included, in order) and hands
the result to the :class:`StepSink` of the step's head: the link to the next stage, or the result
stream to the head. Receiving, decoding, computing and sending run on different threads, so a
stage computes step k+1 while step k is still on the wire.

A follower may serve several heads (:mod:`molink.core.head_session`): their steps interleave on
the compute thread in arrival order, each checked and moved into its head's KV region first.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from vllm.logger import init_logger

from molink.core.head_session import HeadSession, StepRefused
from molink.core.micro_batching import StageTiming
from molink.core.step import HostActivations, StepSink, StepWork
from molink.telemetry import metrics

logger = init_logger(__name__)


class StageEngine:
    """Runs steps on a stage worker in arrival order on one thread."""

    _RESET = object()  # marks an action to run on the compute thread between steps

    def __init__(self, worker: Any, layers: tuple[int, int]) -> None:
        """``worker`` is a ``WorkerWrapperBase`` around a :class:`StageWorker` serving the
        (inclusive) span ``layers``."""
        self.worker = worker
        self.layers = layers
        self.name = f"layers {layers[0]}-{layers[1]}"
        label = f"{layers[0]}-{layers[1]}"
        self._step_seconds = metrics.STEP_SECONDS.labels(label)
        self._queue_wait = metrics.QUEUE_WAIT_SECONDS.labels(label)
        self._tokens = metrics.STAGE_TOKENS.labels(label)
        metrics.track_kv_blocks(self.kv_blocks)
        # Every head's session by id (one on a head: its own).
        self.sessions: dict[str, HeadSession] = {}
        self.steps_done = 0
        self.tokens_done = 0
        self.busy_seconds = 0.0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._loop, name=f"molink-stage-{label}", daemon=True
        )
        self._thread.start()

    def submit(self, work: StepWork) -> None:
        """Queue a step; steps of an older epoch than their session's are dropped."""
        self._queue.put(work)

    def start_epoch(self, session: HeadSession, epoch: int, sink: StepSink | None) -> None:
        """Drop the session's queued steps, forget its requests, go on with ``epoch`` into
        ``sink``.

        Runs on the compute thread, so it never interleaves with a step; returns when done.
        """
        self._on_compute_thread(lambda: self._reset(session, epoch, sink))

    def end_session(self, session: HeadSession) -> None:
        """Forget a head: its requests, queued steps and sink (returns when done)."""

        def end() -> None:
            self._reset(session, session.epoch, None)
            self.sessions.pop(session.id, None)
            self.worker.forget_batch_of(session.id)

        self._on_compute_thread(end)

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
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, tuple) and item[0] is self._RESET:
                _, action, done = item
                action()
                done.set()
                continue
            self._run(item)

    def _reset(self, session: HeadSession, epoch: int, sink: StepSink | None) -> None:
        session.epoch = epoch
        session.sink = sink
        self.sessions[session.id] = session
        try:
            self.worker.reset_stage(session.id)
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
        sink.emit(work, HostActivations(rows))

    def _run(self, work: StepWork) -> None:
        session = self.sessions.get(work.session)
        sink = session.sink if session else None
        target = work.replay and work.replay_layer == self.layers[0]
        if target and session is not None:
            sink = session.results
        if session is None or work.epoch != session.epoch or sink is None:
            logger.debug("%s: dropping step %d of epoch %d", self.name, work.step_id, work.epoch)
            return
        if work.error:
            sink.fail(work, work.error)
            return
        if work.replay and not target:
            self._pass_replay(work, session, sink)
            return
        try:
            session.admit(work.scheduler_output)
        except StepRefused as e:
            logger.warning("%s: refused step %d: %s", self.name, work.step_id, e)
            sink.fail(work, f"{self.name}: {e}")
            return
        start = time.monotonic()
        try:
            output = self.worker.execute_stage(
                work.scheduler_output,
                work.tensors,
                work.sample,
                work.grammar,
                work.snapshots,
                work.session,
            )
        except Exception as e:
            logger.exception("%s: step %d failed", self.name, work.step_id)
            sink.fail(work, f"{self.name}: {type(e).__name__}: {e}")
            return
        compute = time.monotonic() - start
        wait = start - work.received_at
        tokens = work.scheduler_output.total_num_scheduled_tokens
        work.timings.append(
            StageTiming(
                wait_s=wait,
                compute_s=compute,
                arrived_unix=work.arrived_unix,
                decode_s=work.decode_s,
                done_unix=time.time(),
            )
        )
        self.busy_seconds += compute
        self.steps_done += 1
        self.tokens_done += tokens
        self._step_seconds.observe(compute)
        self._queue_wait.observe(wait)
        self._tokens.inc(tokens)
        if work.replay:  # its KV is written: acknowledge it, forget its requests, send nothing on
            in_order = self.worker.rows_in_step_order(work.scheduler_output)
            self.worker.reset_stage(session.id, quiet=True)
            if not in_order:  # its requests recompute, which rewrites their KV
                sink.fail(work, f"{self.name}: the replay step's rows were not in its order")
                return
        sink.emit(work, output)
