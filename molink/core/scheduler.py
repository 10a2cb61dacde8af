"""The head's scheduler: vLLM's scheduler plus what a pipeline over unreliable nodes needs.

When a stage is lost, or the head shrinks its KV cache to make room for another head on a shared
stage (the executor bumps the failure epoch either way), this scheduler

* preempts every request the broken chain held back to waiting, with its in-flight outputs
  dropped (vLLM's own preempt-and-recompute path, ``reset_prefix_cache(reset_running_requests=
  True)``), which also wipes the prefix cache (its block hashes point at KV that is gone). On the
  rebuilt chain each request re-prefills its prompt and the tokens it generated so far and goes
  on, so a client's stream only pauses; after a KV resize, the blocks above the new size are
  retired from vLLM's block pool first; a rewiring the head chose counts as no loss;
* after a stage loss with ``--recovery replay``, keeps the running requests running instead,
  each rolled back to the tokens every stage computed, while the lost span's new node is
  refilled from a replay log (:mod:`molink.core.replay_plan`); only the steps in flight at the
  loss run again. Requests the refill missed (all, if it failed) are preempted to recompute;
* attaches a :class:`~molink.core.request_snapshot.RequestSnapshot` to the first step that
  resumes a request the stages of the new epoch have not seen;
* holds all work while no full chain exists, and after ``outage_timeout`` fails the waiting
  requests with the cause (which layers nobody serves, which node was lost) as their stop reason;
* fails a request that has been on :data:`MAX_STAGE_LOSSES` lost chains (it may be what breaks
  them);
* tags every scheduler output with the epoch it belongs to, so the executor never runs a batch
  of a broken chain on a rebuilt one.

It also shapes micro-batches (:mod:`molink.core.micro_batching`): with ``k`` batches to keep in
flight, each scheduled step takes at most ``ceil(decoding / k)`` decoding requests and a chunk of
the waiting prompt tokens, so every stage has work, a burst of prompts is pipelined across the
stages and a long prompt doesn't stall decodes.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.output import CachedRequestData, SchedulerOutput
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from molink.core.micro_batching import MicroBatchPlan, plan_micro_batch
from molink.core.pipeline_state import (
    CAUSES,
    EPOCH_ATTR,
    KEEPS_KV_CAUSES,
    PIPELINE_STATE,
    StageLostOutput,
)
from molink.core.replay_recovery import ReplayRecovery
from molink.core.request_snapshot import SNAPSHOTS_ATTR, RequestSnapshot
from molink.stage_spec import ADDITIONAL_CONFIG_KEY
from molink.telemetry import metrics
from molink.telemetry.step_trace import TRACE_ATTR, StepTraceWriter

logger = init_logger(__name__)
# One line per request event (admitted, preempted, finished or failed), apart from the rest.
request_logger = init_logger("molink.requests")

SCHEDULER_CLS = "molink.core.scheduler.PipelineScheduler"

#: A request on this many lost chains is failed instead of recomputed once more.
MAX_STAGE_LOSSES = 3


class PipelineScheduler(ReplayRecovery):
    """vLLM ``Scheduler`` that survives the loss of a pipeline stage (its hooks on vLLM's
    private methods: :class:`~molink.vllm_compat.scheduler.SchedulerHooks`; the replay side:
    :class:`~molink.core.replay_recovery.ReplayRecovery`)."""

    HOLD_SLEEP_S = 0.05
    PLAN_LOG_INTERVAL_S = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = PIPELINE_STATE
        self.max_micro_batches = self.vllm_config.max_concurrent_batches
        head = (self.vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
        self.min_micro_batches = int(head.get("min_micro_batches", 1))  # HeadConfig's fields
        trace = head.get("step_trace")
        self.step_trace = StepTraceWriter(trace) if trace else None
        self.last_plan: MicroBatchPlan | None = None
        self._schedule_seconds: dict[int, float] = {}
        self._in_flight: set[int] = set()  # ids of outputs with tokens, not yet back
        self._next_plan_log = 0.0
        self._logged_batches = 0
        self._epoch = self.pipeline.failed_epoch
        self._down_since: float | None = None
        self._waiting_since: dict[str, float] = {}  # request -> when it began to wait (outage)
        self._pending_errors: list[tuple[Request, str]] = []
        # Requests every stage of the current epoch holds (no snapshot needed to resume them).
        self._known: set[str] = set()
        self._stage_losses: dict[str, int] = {}
        self._barrier_cause = ""  # while a barrier preempts: "stage_loss" or "kv_resize"
        # Recovery by replay: the epoch whose plan kept its requests running (until the
        # executor's outcome is read), the tokens each keeps, and the running requests the
        # stages of the new epoch must be given again (as resumed, with all their blocks).
        self._replay_epoch: int | None = None
        self._replay_kept: dict[str, int] = {}
        self._reintroduce: set[str] = set()
        self._failure_causes: dict[str, str] = {}

    def cached_request_data(self, data: CachedRequestData) -> CachedRequestData:
        """vLLM's, without ``all_token_ids``, and with the requests a replay kept running
        marked resumed.

        vLLM fills ``all_token_ids`` with the whole token list of every request that missed the
        previous step. With micro-batches in flight that is every request of every step, which
        the head would encode and every stage decode, for a field only async scheduling reads
        (off: ``PipelineExecutor.supports_async_scheduling``).

        After a recovery by replay the stages of the new epoch hold none of the running
        requests: each one's first step carries all its blocks, as for a request resumed from
        preemption, and a snapshot (:meth:`_attach_snapshots`).
        """
        data.all_token_ids = {}
        if self._reintroduce:
            self.mark_resumed(data, self._reintroduce)
        return data

    def _barrier(self, epoch: int) -> None:
        """First sight of failure ``epoch``: send what the broken chain held back to waiting."""
        self._epoch = epoch
        if self._down_since is None:
            self._down_since = time.monotonic()
        cause = self.pipeline.last_cause
        loss = cause == "stage_loss"
        affected = list(self.running) + [
            r for r in self.requests.values() if r.status == RequestStatus.PREEMPTED
        ]
        too_often, multimodal = [], []
        for request in affected:
            rid = request.request_id
            if loss:
                self._stage_losses[rid] = self._stage_losses.get(rid, 0) + 1
            if request.mm_features:
                multimodal.append(rid)
            elif self._stage_losses.get(rid, 0) >= MAX_STAGE_LOSSES:
                too_often.append(rid)
        last = self.pipeline.last_error
        self._fail(
            too_often,
            f"the request was on {MAX_STAGE_LOSSES} lost pipelines; last: {last}",
            "repeated_losses",
        )
        self._fail(
            multimodal,
            f"multimodal requests can't be recomputed after a loss: {last}",
            "multimodal",
        )
        num_running = len(self.running)
        self._barrier_cause = cause
        self._replay_epoch = None
        self._reintroduce.clear()
        plan = self._replay_plan() if cause in KEEPS_KV_CAUSES else None
        try:
            if plan is not None and self.pipeline.replay.offer(epoch, plan):
                self._replay_kept = {rid: item.num_tokens for rid, item in plan.items()}
                self._replay_epoch = epoch
                self._reintroduce = {r.request_id for r in self.running}
                size = self.block_size
                self.roll_back_to_confirmed(
                    {b for item in plan.values() for b in item.block_ids[: item.num_tokens // size]}
                )
            else:
                self.pipeline.replay.offer(epoch, None)  # (declined: the executor won't wait)
                self.reset_prefix_cache(reset_running_requests=True)
        except RuntimeError as e:  # blocks held outside the running set (KV connectors)
            logger.error("Can't recompute after the pipeline failure (%s): failing requests", e)
            self._fail(
                list(self.requests), f"{self.pipeline.last_error} ({e})", "recompute_impossible"
            )
            self.reset_prefix_cache()
        finally:
            self._barrier_cause = ""
        self._known.clear()
        limit = self.pipeline.kv_blocks_limit
        if limit is not None and limit < self.kv_pool_blocks() and not self.retire_kv_blocks(limit):
            logger.error("KV blocks above %d are still in use; retiring them next time", limit)
        elif limit is not None and limit > self.kv_pool_blocks():
            self.grow_kv_blocks(limit)
        if loss and self._replay_epoch is not None:
            logger.warning(
                "Pipeline failure (%s): %d running request(s) keep running; every surviving "
                "stage keeps the %d tokens they computed, which the lost span's new node gets "
                "replayed",
                last,
                num_running,
                sum(self._replay_kept.values()),
            )
        elif loss:
            logger.warning(
                "Pipeline failure (%s): %d running request(s) preempted; they resume on the "
                "rebuilt chain",
                last,
                num_running,
            )
        elif self._replay_epoch is not None or num_running == 0:
            logger.info(
                "Rewiring without a loss, %s (%s): %d running request(s) keep running and every "
                "stage keeps its KV cache",
                CAUSES[cause],
                last,
                num_running,
            )
        else:
            logger.warning(
                "Rewiring without a loss, %s (%s): %d running request(s) preempted; they "
                "recompute in %d KV blocks",
                CAUSES[cause],
                last,
                num_running,
                self.kv_pool_blocks(),
            )

    def _fail(self, request_ids: list[str], cause: str, kind: str) -> None:
        """Finish requests with an error whose message (the client's) is ``cause``; ``kind``
        labels the failure metric."""
        if not request_ids:
            return
        for rid in request_ids:
            self._failure_causes[rid] = cause
        failed = self.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)
        for rid in request_ids:  # ids that were no longer there (freed ones took theirs)
            self._failure_causes.pop(rid, None)
        for request in failed:
            self._pending_errors.append((request, cause))
            self._stage_losses.pop(request.request_id, None)
        metrics.REQUESTS_FAILED.labels(kind).inc(len(failed))

    # ------------------------------------------------------------ request events
    def add_request(self, request: Request) -> None:
        new = request.request_id not in self.requests
        super().add_request(request)
        if new:
            request_logger.info(
                "Request %s admitted: %d prompt tokens, up to %s new",
                request.request_id,
                request.num_prompt_tokens,
                request.max_tokens,
            )

    def on_request_preempted(self, request: Request, recomputed: int) -> None:
        cause = self._barrier_cause or "kv_cache_full"
        self._reintroduce.discard(request.request_id)  # vLLM resumes it with all its blocks
        metrics.RECOMPUTED_TOKENS.labels(cause).inc(recomputed)
        request_logger.info(
            "Request %s preempted (%s): its %d computed tokens will be recomputed",
            request.request_id,
            CAUSES.get(cause, "KV cache full"),
            recomputed,
        )

    def on_request_freed(self, request: Request) -> None:
        if self.pipeline.replay_log is not None:  # (the stage may never see its finished id)
            self.pipeline.replay_log.drop([request.request_id])
        elapsed = time.time() - request.arrival_time
        cause = self._failure_causes.pop(request.request_id, None)
        if cause is not None:
            request_logger.error(
                "Request %s failed after %.2f s: %s", request.request_id, elapsed, cause
            )
        else:
            request_logger.info(
                "Request %s finished (%s): %d prompt + %d generated tokens in %.2f s",
                request.request_id,
                request.get_finished_reason() or request.status.name.lower(),
                request.num_prompt_tokens,
                request.num_output_tokens,
                elapsed,
            )

    def _attach_snapshots(self, output: SchedulerOutput) -> None:
        """Ship what stages need to resume requests they don't hold (after a reset)."""
        snapshots = {
            rid: RequestSnapshot.of(self.requests[rid])
            for rid in output.scheduled_cached_reqs.resumed_req_ids
            if rid not in self._known
        }
        if snapshots:
            setattr(output, SNAPSHOTS_ATTR, snapshots)
        self._known.update(output.num_scheduled_tokens)
        self._known.difference_update(output.finished_req_ids)
        for rid in output.finished_req_ids:
            self._stage_losses.pop(rid, None)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self.pipeline.running_requests = len(self.running)
        if self.pipeline.failed_epoch > self._epoch:
            self._barrier(self.pipeline.failed_epoch)
        if self.pipeline.ready_epoch < self._epoch:
            output = self._hold(throttle_prefills)
        else:
            if self._replay_epoch is not None:
                self._check_replay()
            self._down_since = None
            self._waiting_since.clear()
            started = time.monotonic()
            output = self._schedule_micro_batch(throttle_prefills)
            if len(self._schedule_seconds) > 1024:  # outputs that never came back (failures)
                self._schedule_seconds.clear()
                self._in_flight.clear()
            self._schedule_seconds[id(output)] = time.monotonic() - started
            if output.total_num_scheduled_tokens:
                self._in_flight.add(id(output))
                metrics.MICRO_BATCHES_IN_FLIGHT.set(len(self._in_flight))
            self._attach_snapshots(output)
        setattr(output, EPOCH_ATTR, self._epoch)
        return output

    def _schedule_micro_batch(self, throttle_prefills: bool) -> SchedulerOutput:
        """vLLM's schedule, restricted to the next micro-batch of the current plan.

        Decoding requests beyond this batch's share are hidden from vLLM's scheduler for the
        call (they stay running, in their order) and the token budget is the batch's share plus
        its prefill allowance, which chunks long prompts.
        """
        if self.last_plan is not None and len(self._in_flight) >= self.last_plan.num_batches:
            return self._schedule_nothing(throttle_prefills)  # vLLM's batch queue may be deeper
        decoding = [r for r in self.running if r.num_computed_tokens >= r.num_prompt_tokens]
        prefilling = [r for r in self.running if r.num_computed_tokens < r.num_prompt_tokens]
        pending_prefill = sum(r.num_tokens - r.num_computed_tokens for r in prefilling)
        pending_prefill += sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        max_batches = self.max_micro_batches
        if self.pipeline.stages_shared:  # other heads' steps fill the stages' idle time
            max_batches = min(max_batches, max(1, self.min_micro_batches))
        plan = self.last_plan = plan_micro_batch(
            self.pipeline.costs.costs() if self.max_micro_batches > 1 else None,
            num_decodes=len(decoding),
            max_batches=max_batches,
            min_batches=self.min_micro_batches,
            max_batch_tokens=self.max_num_scheduled_tokens,
            min_prefill_chunk=self.block_size,
            pending_prefill=pending_prefill,
        )
        if plan is None:
            metrics.MICRO_BATCHES_PLANNED.set(1)
            return super().schedule(throttle_prefills)
        metrics.MICRO_BATCHES_PLANNED.set(plan.num_batches)
        metrics.MICRO_BATCH_PREFILL_TOKENS.set(plan.prefill_tokens)
        if len(self._in_flight) >= plan.num_batches:
            return self._schedule_nothing(throttle_prefills)
        now = time.monotonic()
        if plan.num_batches != self._logged_batches and now >= self._next_plan_log:
            self._next_plan_log = now + self.PLAN_LOG_INTERVAL_S
            self._logged_batches = plan.num_batches
            logger.info(
                "Micro-batching: %d batch(es) in flight for %d decoding request(s), "
                "%d prefill token(s) per batch",
                plan.num_batches,
                len(decoding),
                plan.prefill_tokens,
            )
        ready = [r for r in decoding if r.num_tokens > r.num_computed_tokens]
        output = self.schedule_subset(
            hidden=ready[plan.decode_slots :],
            token_budget=min(plan.decode_slots, len(ready)) + plan.prefill_tokens,
            throttle_prefills=throttle_prefills,
        )
        if output.total_num_scheduled_tokens:
            metrics.MICRO_BATCH_STEPS.labels(str(plan.num_batches)).inc()
        return output

    def _hold(self, throttle_prefills: bool) -> SchedulerOutput:
        """No full chain: schedule nothing (but still emit finished ids), bounded in time.

        Each request waits at most ``outage_timeout`` from the loss, or from its arrival if it
        came later; then it fails with the cause.
        """
        time.sleep(self.HOLD_SLEEP_S)  # the engine loop keeps stepping while requests wait
        now = time.monotonic()
        expired = [
            rid
            for rid in self.requests
            if now - self._waiting_since.setdefault(rid, now) > self.pipeline.outage_timeout
        ]
        if expired:
            cause = self.pipeline.outage_cause()
            logger.error(
                "No full pipeline for %.0f s: failing %d waiting request(s): %s",
                self.pipeline.outage_timeout,
                len(expired),
                cause,
            )
            self._fail(expired, cause, "outage")
        return self._schedule_nothing(throttle_prefills)

    def _schedule_nothing(self, throttle_prefills: bool) -> SchedulerOutput:
        """An output with no tokens that still carries finished request ids to the stages."""
        return self.schedule_paused(throttle_prefills)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        if (
            isinstance(model_runner_output, StageLostOutput)
            and model_runner_output.epoch > self._epoch
        ):
            self._barrier(model_runner_output.epoch)
        started = time.monotonic()
        self._in_flight.discard(id(scheduler_output))
        metrics.MICRO_BATCHES_IN_FLIGHT.set(len(self._in_flight))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        scheduled = self._schedule_seconds.pop(id(scheduler_output), None)
        if scheduled is not None and scheduler_output.total_num_scheduled_tokens:
            updated = time.monotonic() - started
            self.pipeline.costs.observe_head(
                scheduler_output.total_num_scheduled_tokens, scheduled + updated
            )
            trace = getattr(model_runner_output, TRACE_ATTR, None)
            if self.step_trace is not None and trace is not None:
                self.step_trace.write(
                    {**trace, "schedule_ms": scheduled * 1e3, "update_ms": updated * 1e3}
                )
        for request, cause in self._pending_errors:
            engine_outputs = outputs.get(request.client_index)
            if engine_outputs is None:
                engine_outputs = outputs[request.client_index] = EngineCoreOutputs(outputs=[])
            engine_outputs.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    # The API server turns this into the client's error message
                    # (molink.entrypoints.failure_reasons).
                    stop_reason=cause,
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        self._pending_errors.clear()
        return outputs
