"""The head's scheduler: vLLM's scheduler plus what a pipeline over unreliable nodes needs.

When a stage is lost (the executor bumps the failure epoch), this scheduler

* fails every request whose state lived on the broken chain (running, preempted, or with tokens in
  flight) with ``FinishReason.ERROR``: the client gets an error response, the engine stays up;
* wipes the prefix cache (its block hashes point at KV that is gone);
* holds new requests while no full chain exists, and fails them after ``outage_timeout``;
* tags every scheduler output with the epoch it belongs to, so the executor never runs a batch
  of a broken chain on a rebuilt one.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from molink.core.pipeline_state import EPOCH_ATTR, PIPELINE_STATE, StageLostOutput
from molink.engine.head_config import HeadConfig

logger = init_logger(__name__)

SCHEDULER_CLS = "molink.core.scheduler.PipelineScheduler"


class PipelineScheduler(Scheduler):
    """vLLM ``Scheduler`` that survives the loss of a pipeline stage."""

    HOLD_SLEEP_S = 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = PIPELINE_STATE
        self.outage_timeout = HeadConfig.from_vllm_config(self.vllm_config).outage_timeout
        self._epoch = self.pipeline.failed_epoch
        self._down_since: float | None = None
        self._pending_errors: list[Request] = []

    def _barrier(self, epoch: int) -> None:
        """First sight of failure ``epoch``: fail what the broken chain held."""
        self._epoch = epoch
        self._down_since = time.monotonic()
        victims = [r.request_id for r in self.running] + [
            r.request_id
            for r in self.requests.values()
            if r.status == RequestStatus.PREEMPTED or r.num_computed_tokens > 0
        ]
        if victims:
            logger.error(
                "Failing %d request(s) after a pipeline failure: %s",
                len(set(victims)),
                self.pipeline.last_error,
            )
            self._fail(victims)
        self.reset_prefix_cache()

    def _fail(self, request_ids: list[str]) -> None:
        self._pending_errors += self.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self.pipeline.failed_epoch > self._epoch:
            self._barrier(self.pipeline.failed_epoch)
        if self.pipeline.ready_epoch < self._epoch:
            output = self._hold(throttle_prefills)
        else:
            self._down_since = None
            output = super().schedule(throttle_prefills)
        setattr(output, EPOCH_ATTR, self._epoch)
        return output

    def _hold(self, throttle_prefills: bool) -> SchedulerOutput:
        """No full chain: schedule nothing (but still emit finished ids), bounded in time."""
        time.sleep(self.HOLD_SLEEP_S)  # the engine loop keeps stepping while requests wait
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        if self.requests and down_for > self.outage_timeout:
            logger.error(
                "No full pipeline for %.0f s: failing %d waiting request(s)",
                self.outage_timeout,
                len(self.requests),
            )
            self._fail(list(self.requests))
        saved, self._pause_state = self._pause_state, PauseState.PAUSED_ALL
        try:
            return super().schedule(throttle_prefills)
        finally:
            self._pause_state = saved

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        if (
            isinstance(model_runner_output, StageLostOutput)
            and model_runner_output.epoch > self._epoch
        ):
            self._barrier(model_runner_output.epoch)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in self._pending_errors:
            engine_outputs = outputs.get(request.client_index)
            if engine_outputs is None:
                engine_outputs = outputs[request.client_index] = EngineCoreOutputs(outputs=[])
            engine_outputs.outputs.append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )
        self._pending_errors.clear()
        return outputs
