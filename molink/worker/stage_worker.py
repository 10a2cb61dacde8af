"""The vLLM worker of one pipeline stage: builds only its layers and runs one step at a time.

It is the worker of vLLM's current platform (``CPUWorker`` on CPU, ``Worker`` on CUDA and ROCm,
``XPUWorker``; :mod:`molink.worker.platform_worker`) with the few changes a stage needs, all in
:class:`StageHooks`: a private one-process distributed world that describes "pipeline rank r of
N" (no peers, see ``molink.distributed``), the intermediate-tensor buffer vLLM's CPU path forgets
to allocate, and :meth:`~StageHooks.execute_stage`, which takes the activations of the previous
stage as an argument (host tensors; the model runner copies them to its device) instead of
receiving them through torch.distributed, and hands its own to the host
(:mod:`molink.worker.activation_staging`) instead of sending them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import get_pp_group
from vllm.logger import init_logger
from vllm.sequence import IntermediateTensors
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.worker.worker_base import WorkerWrapperBase

from molink.core.replay_log import LogForm, ReplayLog
from molink.core.replay_plan import replayed_request
from molink.core.request_snapshot import RequestSnapshot
from molink.core.step import StageOutput, StepWork
from molink.distributed.parallel_state import init_stage_parallel_state
from molink.stage_spec import ADDITIONAL_CONFIG_KEY, StagePlacement, placement_from_dict
from molink.vllm_compat.kv_cache import align_mamba_block_size
from molink.vllm_compat.model_runner import (
    ensure_intermediate_tensors,
    install_request_state,
    kv_positions_written,
    mamba_alignment_where_held,
    reorders_rows,
    request_block_ids,
    reset_model_runner,
    rows_in_order,
    runner_requests,
    scheduled_rows,
    step_limits,
)
from molink.vllm_compat.parallel_state import set_pp_layer_partition
from molink.vllm_compat.step_joining import can_join, join_steps, split_output
from molink.vllm_compat.worker import platform_worker_class
from molink.worker.activation_staging import ActivationStaging

logger = init_logger(__name__)

WORKER_CLS = "molink.worker.stage_worker.StageWorker"


def stage_placement(vllm_config: VllmConfig) -> StagePlacement:
    """This process's placement, from ``additional_config`` (a single stage if absent; the
    head's config puts it there, and so does :func:`molink.engine.stage_config.
    stage_engine_config` for a remote stage)."""
    num_layers = vllm_config.model_config.get_total_num_hidden_layers()
    extra = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not extra:
        return StagePlacement(0, num_layers - 1, num_layers)
    return placement_from_dict(extra["placement"])


class StageHooks:
    """What a stage changes in vLLM's platform worker; mixed in before it (see StageWorker)."""

    vllm_config: VllmConfig
    model_runner: Any
    staging: ActivationStaging

    def init_device(self) -> None:
        placement = stage_placement(self.vllm_config)
        set_pp_layer_partition(placement.partition)  # read when the model is built
        init_stage_parallel_state(placement.rank, len(placement.partition))
        super().init_device()

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        super().load_model(load_dummy_weights=load_dummy_weights)
        runner = self.model_runner
        self.staging = ActivationStaging(runner.device)
        # Per head: what this stage sent on for its running requests (--recovery replay).
        self.replay_logs: dict[str, ReplayLog] = {}
        # vLLM's CPU path forgets the buffer later stages copy received activations into.
        if not get_pp_group().is_first_rank:
            ensure_intermediate_tensors(runner)

    @torch.inference_mode()
    def execute_stage(self, steps: list[StepWork]) -> list[StageOutput]:
        """Run steps of one or more heads on this stage's layers, as one forward pass.

        Each step's ``tensors`` are the activations from the previous stage (``hidden_states``/
        ``residual``, each [num_tokens, hidden_size], in the step's ``row_order``; ``None`` on
        the first stage); its ``snapshots`` are requests it resumes that this stage may not
        hold (after a pipeline failure), installed first unless the stage holds them. Several
        steps are joined (:mod:`molink.vllm_compat.step_joining`), their rows one step after the
        other, each in its own order.

        Returns, per step: its output activations on their way to host memory on non-last
        stages; on the last stage its sampled ``ModelRunnerOutput`` (``sample``: the head
        scheduled tokens, so its ``grammar`` applies); the empty output when nothing was
        scheduled.
        """
        runner = self.model_runner
        for step in steps:
            if step.snapshots:
                self._install(step.snapshots)
        so = steps[0].scheduler_output
        if len(steps) > 1:
            so = join_steps([step.scheduler_output for step in steps])
        intermediate, order = None, None
        if steps[0].tensors is not None:
            tensors = steps[0].tensors
            if len(steps) > 1:  # each [num_tokens, hidden_size]
                tensors = {n: torch.cat([step.tensors[n] for step in steps]) for n in tensors}
            intermediate = IntermediateTensors(tensors)
            order = [req_id for step in steps for req_id in step.row_order]
        with mamba_alignment_where_held(runner), rows_in_order(runner, order):
            output = runner.execute_model(so, intermediate)
        if isinstance(output, IntermediateTensors):
            rows = scheduled_rows(runner, so)
            self._log_for_replay(steps, rows, output.tensors)
            host = self.staging.to_host(output.tensors, [req_id for req_id, _, _ in rows])
            if len(steps) == 1:
                return [host]
            return host.split(
                [
                    (step.scheduler_output.total_num_scheduled_tokens, step.row_order)
                    for step in steps
                ]
            )
        for step in steps:
            self._forget_logged(step)
        if output is None and get_pp_group().is_last_rank:
            step = steps[0]
            output = runner.sample_tokens(
                step.grammar() if step.sample and len(steps) == 1 else None
            )
        if len(steps) == 1:
            return [output]
        return split_output(output, [step.row_order for step in steps])

    def can_join(self, so: SchedulerOutput) -> bool:
        """Whether step ``so`` may share a forward pass with other heads' steps here."""
        return not reorders_rows(self.model_runner) and can_join(so)

    def kv_positions_written(self, so: SchedulerOutput) -> list[tuple[int, int, list[int]]]:
        """(First position, positions, block ids) of each request step ``so``, just run, wrote
        into the KV cache (for a hot standby's :class:`~molink.core.hot_standby.KVValidity`)."""
        return kv_positions_written(self.model_runner, so)

    def step_limits(self) -> tuple[int, int]:
        """(Tokens, requests) one forward pass may hold at most."""
        return step_limits(self.model_runner)

    def keep_replay_log(
        self, head: str, capacity_bytes: int, wire_dtype: torch.dtype | None
    ) -> ReplayLog:
        """Log what this stage sends on for ``head``'s requests, up to ``capacity_bytes`` (a
        head asks for it when it recovers by replay), in the smallest exact form for this model
        and the head's ``wire_dtype`` (None: the model's); returns the log."""
        form = LogForm.for_boundary(self.vllm_config.model_config.architectures, wire_dtype)
        log = self.replay_logs.get(head)
        if log is None or log.form != form:
            log = self.replay_logs[head] = ReplayLog(capacity_bytes, form=form)
        log.capacity_bytes = capacity_bytes
        return log

    def replay_rows(
        self, head: str, scheduler_output: SchedulerOutput
    ) -> dict[str, torch.Tensor] | None:
        """The logged rows a replay step of ``head`` asks for: for each of its requests in
        order, positions [computed, computed + scheduled); each tensor [positions, hidden_size].
        None when any is not logged."""
        log = self.replay_logs.get(head)
        if log is None or not scheduler_output.scheduled_new_reqs:
            return None
        parts = []
        for new in scheduler_output.scheduled_new_reqs:
            req_id = replayed_request(new.req_id)
            num = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            rows = None
            if req_id is not None and num > 0:
                start = new.num_computed_tokens
                rows = log.rows(req_id, start, start + num)
            if rows is None:
                return None
            parts.append(rows)
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _log_for_replay(
        self,
        steps: list[StepWork],
        rows: list[tuple[str, int, int]],
        tensors: dict[str, torch.Tensor],
    ) -> None:
        """Log each request's rows of the activations this pass sends on, or (a replay step)
        would send on, in its head's log (see :class:`~molink.core.replay_log.ReplayLog`);
        forget finished requests. ``rows``: (request, first position, tokens) in row order;
        each tensor [num_tokens, hidden_size]."""
        at, row = {}, 0
        for req_id, start, num in rows:
            at[req_id] = (row, start, num)
            row += num
        for step in steps:
            log = self.replay_logs.get(step.session)
            if log is None:
                continue
            log.drop(step.scheduler_output.finished_req_ids)
            entries = []
            for req_id in step.scheduler_output.num_scheduled_tokens:
                if req_id not in at:
                    continue
                first, start, num = at[req_id]
                # A replay step's rows are its request's: a refilled stage can be a source next.
                logged_id = replayed_request(req_id) or req_id
                # each [num, hidden_size]
                entries.append(
                    (logged_id, start, {k: t[first : first + num] for k, t in tensors.items()})
                )
            log.record_step(entries)

    def _forget_logged(self, step: StepWork) -> None:
        log = self.replay_logs.get(step.session)
        if log is not None:
            log.drop(step.scheduler_output.finished_req_ids)

    def _install(self, snapshots: dict[str, RequestSnapshot]) -> None:
        """Give the model runner the state of resumed requests it doesn't hold.

        vLLM resumes a preempted request from the runner's own ``CachedRequestState``; the
        resumed step then replaces its block ids and re-adds it with prompt + output tokens.
        A request the runner already holds is left alone (its state, e.g. a seeded generator,
        is more exact than a snapshot).
        """
        runner = self.model_runner
        for req_id, snap in snapshots.items():
            if req_id in runner_requests(runner):
                continue
            install_request_state(
                runner,
                req_id,
                prompt_token_ids=snap.prompt_token_ids,
                prompt_embeds=snap.prompt_embeds,
                prompt_is_token_ids=snap.prompt_is_token_ids,
                sampling_params=snap.sampling_params,
                pooling_params=snap.pooling_params,
                lora_request=snap.lora_request,
                output_token_ids=snap.output_token_ids,
            )

    def forget_head(self, head: str) -> None:
        """Drop a head's replay log (after :meth:`reset_stage` forgot its requests)."""
        self.replay_logs.pop(head, None)

    def kv_blocks(self) -> tuple[int, int]:
        """(KV blocks held by the requests this stage knows, KV blocks allocated).

        Read from another thread than the one computing (a metrics scrape): a dict that changes
        while it is copied is read again.
        """
        runner = self.model_runner
        config = getattr(runner, "kv_cache_config", None)
        if config is None:
            return 0, 0
        states = []
        for _ in range(3):
            try:
                states = list(runner_requests(runner).values())
                break
            except RuntimeError:  # changed size during iteration
                continue
        used = {block for state in states for group in request_block_ids(state) for block in group}
        return len(used), config.num_blocks

    @torch.inference_mode()
    def reset_stage(self, req_ids: Iterable[str], quiet: bool = False) -> None:
        """Forget requests ``req_ids`` (a head's, after a pipeline failure or when it leaves;
        a replay step's, ``quiet``: not logged); weights and KV memory are kept."""
        reset_model_runner(self.model_runner, req_ids)
        if not quiet:
            logger.info("Stage %d reset", get_pp_group().rank_in_group)


class StageWorker(StageHooks, platform_worker_class()):  # type: ignore[misc]
    """vLLM's worker for this process's platform, serving the layers of one pipeline stage."""


def create_stage_worker(vllm_config: VllmConfig, rank: int) -> WorkerWrapperBase:
    """Build, place and load the worker of pipeline rank ``rank`` (weights of its slice only)."""
    vllm_config.parallel_config.worker_cls = WORKER_CLS
    align_mamba_block_size(vllm_config)
    wrapper = WorkerWrapperBase(rpc_rank=0, global_rank=0)
    kwargs: dict[str, Any] = {
        "vllm_config": vllm_config,
        "local_rank": 0,
        "rank": rank,
        # Never used to connect: the stage world is private (see init_stage_parallel_state).
        "distributed_init_method": f"file://{tempfile.gettempdir()}/molink_{os.getpid()}",
        "is_driver_worker": True,
    }
    wrapper.init_worker(all_kwargs=[kwargs])
    wrapper.init_device()
    with set_current_vllm_config(vllm_config):
        wrapper.load_model()
    return wrapper
