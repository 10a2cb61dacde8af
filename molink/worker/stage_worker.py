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
from collections.abc import Callable
from typing import Any

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.parallel_state import get_pp_group
from vllm.logger import init_logger
from vllm.sequence import IntermediateTensors
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.worker_base import WorkerWrapperBase

from molink.core.replay_log import ReplayLog
from molink.core.replay_plan import replayed_request
from molink.core.request_snapshot import RequestSnapshot
from molink.core.step import HostActivations
from molink.distributed.parallel_state import init_stage_parallel_state
from molink.stage_spec import ADDITIONAL_CONFIG_KEY, StagePlacement, placement_from_dict
from molink.vllm_compat.kv_cache import align_mamba_block_size
from molink.vllm_compat.model_runner import (
    ensure_intermediate_tensors,
    install_request_state,
    mamba_alignment_where_held,
    new_persistent_batch,
    request_block_ids,
    reset_model_runner,
    runner_requests,
    scheduled_rows,
    swap_persistent_batch,
)
from molink.vllm_compat.parallel_state import set_pp_layer_partition
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
        # Heads' persistent batches (see use_batch_of): whose is in the runner, and the others.
        self._batch_owner: str | None = None
        self._other_batches: dict[str, tuple[Any, dict]] = {}
        # Per head: what this stage sent on for its running requests (--recovery replay).
        self.replay_logs: dict[str, ReplayLog] = {}
        # vLLM's CPU path forgets the buffer later stages copy received activations into.
        if not get_pp_group().is_first_rank:
            ensure_intermediate_tensors(runner)

    @torch.inference_mode()
    def execute_stage(
        self,
        scheduler_output: SchedulerOutput,
        tensors: dict[str, torch.Tensor] | None,
        sample: bool,
        grammar: Callable[[], GrammarOutput | None],
        snapshots: dict[str, RequestSnapshot] | None = None,
        head: str = "",
    ) -> HostActivations | ModelRunnerOutput | None:
        """Run one scheduler output on this stage's layers.

        Args:
            head: the session of the head whose step it is (see :meth:`use_batch_of`).
            snapshots: requests this step resumes that this stage may not hold (after a
                pipeline failure); installed first, unless the stage already holds them.
            tensors: activations from the previous stage (``hidden_states``/``residual``,
                each [num_tokens, hidden_size]); ``None`` on the first stage.
            sample: on the last stage, also sample (the head scheduled tokens).
            grammar: gives the structured-output bitmask for sampling (may wait for the head).

        Returns:
            The output activations on their way to host memory on non-last stages when tokens
            were scheduled; on the last stage the sampled ``ModelRunnerOutput``; the empty output
            when nothing was scheduled.
        """
        self.use_batch_of(head)
        if snapshots:
            self._install(snapshots)
        intermediate = IntermediateTensors(tensors) if tensors is not None else None
        with mamba_alignment_where_held(self.model_runner):
            output = self.model_runner.execute_model(scheduler_output, intermediate)
        log = self.replay_logs.get(head)
        if log is not None:
            self._log_for_replay(log, scheduler_output, output)
        if isinstance(output, IntermediateTensors):
            return self.staging.to_host(output.tensors)
        if output is None and get_pp_group().is_last_rank:
            output = self.model_runner.sample_tokens(grammar() if sample else None)
        return output

    def keep_replay_log(self, head: str, capacity_bytes: int) -> ReplayLog:
        """Log what this stage sends on for ``head``'s requests, up to ``capacity_bytes`` (a
        head asks for it when it recovers by replay); returns the log."""
        log = self.replay_logs.get(head)
        if log is None:
            log = self.replay_logs[head] = ReplayLog(capacity_bytes)
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

    def rows_in_step_order(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether the step just run laid its requests' rows out in the order of
        ``scheduled_new_reqs`` (the order a replay step's rows come in)."""
        order = [req_id for req_id, _, _ in scheduled_rows(self.model_runner, scheduler_output)]
        return order == [new.req_id for new in scheduler_output.scheduled_new_reqs]

    def _log_for_replay(
        self, log: ReplayLog, scheduler_output: SchedulerOutput, output: Any
    ) -> None:
        """Log each request's rows of the activations this step sends on, or (a replay step)
        would send on (see :class:`~molink.core.replay_log.ReplayLog`); forget finished
        requests."""
        log.drop(scheduler_output.finished_req_ids)
        if not isinstance(output, IntermediateTensors):
            return
        entries, row = [], 0
        for req_id, start, num in scheduled_rows(self.model_runner, scheduler_output):
            # A replay step's rows are its request's: a refilled stage can be a source next.
            logged_id = replayed_request(req_id) or req_id
            # each [num, hidden_size]
            entries.append(
                (logged_id, start, {k: t[row : row + num] for k, t in output.tensors.items()})
            )
            row += num
        log.record_step(entries)

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

    def use_batch_of(self, head: str) -> None:
        """Give the model runner the persistent batch and request states of ``head``'s steps.

        The runner keeps one persistent batch whose rows follow the scheduler outputs it has
        seen; a stage's activations arrive in the row order of the head's own stage 0, which saw
        only that head's steps. A stage that several heads use therefore keeps one batch and one
        request table per head and swaps them in before each step. The model, its KV cache and
        the runner's per-step buffers are shared.
        """
        runner = self.model_runner
        owner = self._batch_owner
        if owner == head:
            return
        if owner is None:  # the first head, or the one after a head that left, takes it over
            saved = self._other_batches.pop(head, None)
            if saved is not None:  # (the batch left in the runner is the empty one)
                swap_persistent_batch(runner, saved)
            self._batch_owner = head
            return
        fresh = self._other_batches.pop(head, None) or (new_persistent_batch(runner), {})
        self._other_batches[owner] = swap_persistent_batch(runner, fresh)
        self._batch_owner = head

    def forget_batch_of(self, head: str) -> None:
        """Drop a head's batch and replay log (after :meth:`reset_stage` forgot its
        requests)."""
        self.replay_logs.pop(head, None)
        if self._batch_owner == head:
            self._batch_owner = None  # the next head adopts the (empty) current batch
        else:
            self._other_batches.pop(head, None)

    def requests_of(self, head: str) -> int:
        """How many requests of ``head`` this stage holds (read from any thread)."""
        if self._batch_owner == head:
            return len(runner_requests(self.model_runner))
        batch = self._other_batches.get(head)
        return len(batch[1]) if batch else 0

    def kv_blocks(self) -> tuple[int, int]:
        """(KV blocks held by the requests this stage knows, KV blocks allocated).

        Read from another thread than the one computing (a metrics scrape): a dict that changes
        while it is copied is read again.
        """
        runner = self.model_runner
        config = getattr(runner, "kv_cache_config", None)
        if config is None:
            return 0, 0
        tables = [runner_requests(runner)] + [r for _, r in self._other_batches.values()]
        states = []
        for table in tables:
            for _ in range(3):
                try:
                    states += list(table.values())
                    break
                except RuntimeError:  # changed size during iteration
                    continue
        used = {block for state in states for group in request_block_ids(state) for block in group}
        return len(used), config.num_blocks

    @torch.inference_mode()
    def reset_stage(self, head: str, quiet: bool = False) -> None:
        """Forget every request of ``head``, after a pipeline failure, when the head leaves, or
        after a replay step (``quiet``: not logged); weights and KV memory are kept. A head that
        never ran a step here has nothing to forget (and gets no batch made for it)."""
        if head != self._batch_owner and head not in self._other_batches:
            return
        self.use_batch_of(head)
        reset_model_runner(self.model_runner)
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
