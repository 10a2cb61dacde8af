"""What a stage changes inside vLLM's model runner (``GPUModelRunner``; ``CPUModelRunner``
extends it): its activation buffer, its request table, its persistent batch.

``runner`` below is a worker's ``model_runner``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from vllm.lora.request import LoRARequest
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import KVCacheConfig, MambaSpec, UniformTypeKVCacheSpecs
from vllm.v1.worker.gpu_input_batch import CachedRequestState

#: The ``CachedRequestState`` fields :func:`install_request_state` sets.
INSTALLED_REQUEST_FIELDS = (
    "req_id",
    "prompt_token_ids",
    "prompt_embeds",
    "prompt_is_token_ids",
    "mm_features",
    "sampling_params",
    "pooling_params",
    "generator",
    "block_ids",
    "num_computed_tokens",
    "output_token_ids",
    "lora_request",
)


def ensure_intermediate_tensors(runner: Any) -> None:
    """Allocate the runner's buffer for received activations if vLLM has not.

    vLLM allocates this persistent buffer only in ``_dummy_run``, which the CPU path skips
    under ``enforce_eager``; stages after the first copy received activations into it. Call
    after ``load_model`` on every stage but the first.

    Needs from vLLM: ``runner.intermediate_tensors`` (None until allocated) is the buffer
    ``execute_model`` copies activations into, and ``runner.model.
    make_empty_intermediate_tensors(batch_size, dtype, device)`` builds it.
    """
    if runner.intermediate_tensors is None:
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens,
            dtype=runner.model_config.dtype,
            device=runner.device,
        )


def runner_requests(runner: Any) -> dict[str, Any]:
    """The runner's request table (request id -> ``CachedRequestState``) of the persistent batch
    in use.

    Needs from vLLM: ``runner.requests`` is that table, a plain dict attribute.
    """
    return runner.requests


def request_block_ids(state: Any) -> tuple[list[int], ...]:
    """The KV block ids a ``CachedRequestState`` holds, one list per KV cache group."""
    return state.block_ids


def install_request_state(
    runner: Any,
    req_id: str,
    *,
    prompt_token_ids: list[int] | None,
    prompt_embeds: torch.Tensor | None,
    prompt_is_token_ids: list[bool] | None,
    sampling_params: SamplingParams | None,
    pooling_params: PoolingParams | None,
    lora_request: LoRARequest | None,
    output_token_ids: list[int],
) -> None:
    """Give the runner the state of a request it has never seen, as vLLM would have built it
    when the request was new: no blocks yet, nothing computed (the resuming step sets both).

    A seeded request gets a fresh generator seeded the same way; prompt logprobs are not
    computed again (the client has them already).

    Needs from vLLM: ``CachedRequestState`` has the fields in :data:`INSTALLED_REQUEST_FIELDS`
    (and needs no others), ``runner.requests`` is the table ``execute_model`` resumes requests
    from, and ``runner._init_mrope_positions(state)`` fills M-RoPE positions
    (``runner.uses_mrope``).
    """
    generator = None
    if sampling_params is not None and sampling_params.sampling_type == SamplingType.RANDOM_SEED:
        generator = torch.Generator(device=runner.device)
        generator.manual_seed(sampling_params.seed)
    state = CachedRequestState(
        req_id=req_id,
        prompt_token_ids=prompt_token_ids,
        prompt_embeds=prompt_embeds,
        prompt_is_token_ids=prompt_is_token_ids,
        mm_features=[],
        sampling_params=sampling_params,
        pooling_params=pooling_params,
        generator=generator,
        block_ids=tuple([] for _ in runner.kv_cache_config.kv_cache_groups),
        num_computed_tokens=0,
        output_token_ids=list(output_token_ids),
        lora_request=lora_request,
    )
    runner.requests[req_id] = state
    if runner.uses_mrope:
        runner._init_mrope_positions(state)


@contextlib.contextmanager
def rows_in_order(runner: Any, order: list[str] | None) -> Iterator[None]:
    """Run ``execute_model`` with the persistent batch's rows in ``order`` (the request ids the
    step schedules, as the received activations lay them out); ``None``: vLLM's own order.

    A stage that several heads share keeps one persistent batch for all of them, so its rows
    follow no head's order; each head's stage 0 decides the order of its rows, and every later
    stage computes the received rows in that order. vLLM has no plug-in point for the row order:
    the runner's ``_may_reorder_batch`` (where attention backends reorder the batch) is wrapped,
    on this runner only, to reorder the rows after vLLM has.

    Needs from vLLM: ``_update_states`` calls ``_may_reorder_batch(scheduler_output)`` once the
    batch holds exactly the scheduled requests, condensed, before ``refresh_metadata``;
    ``InputBatch.swap_states(i, j)`` swaps two rows (with ``req_id_to_index``).
    """
    if not getattr(runner, "_molink_rows_in_order", False):
        reorder = runner._may_reorder_batch

        def may_reorder_batch(scheduler_output: SchedulerOutput) -> None:
            reorder(scheduler_output)
            if runner._molink_row_order is not None:
                _put_rows_in_order(runner.input_batch, runner._molink_row_order)

        runner._may_reorder_batch = may_reorder_batch
        runner._molink_rows_in_order = True
    runner._molink_row_order = order
    try:
        yield
    finally:
        runner._molink_row_order = None


def _put_rows_in_order(batch: Any, order: list[str]) -> None:
    held_ids = batch.req_id_to_index
    if len(held_ids) != len(order) or set(held_ids) != set(order):
        raise ValueError("the step's row order names other requests than the step schedules")
    for row, req_id in enumerate(order):
        held = batch.req_id_to_index[req_id]
        if held != row:  # every row before this one is final, so the swap moves a later one
            batch.swap_states(row, held)


def reorders_rows(runner: Any) -> bool:
    """Whether the runner's attention backends reorder the rows of a step (decodes first): then
    steps of several heads can't share a pass, whose rows keep each head's order.

    Needs from vLLM: ``runner.reorder_batch_threshold`` is None when no backend reorders.
    """
    return runner.reorder_batch_threshold is not None


def step_limits(runner: Any) -> tuple[int, int]:
    """(Tokens, requests) one step of the runner may schedule at most (its buffers' sizes).

    Needs from vLLM: ``runner.max_num_tokens`` and ``runner.max_num_reqs`` (the scheduler
    config's ``max_num_batched_tokens`` and ``max_num_seqs``) size the runner's buffers.
    """
    return runner.max_num_tokens, runner.max_num_reqs


def reset_model_runner(runner: Any, req_ids: Iterable[str]) -> None:
    """Make the runner forget the requests ``req_ids`` and any step awaiting ``sample_tokens``
    (weights and KV memory are kept).

    Needs from vLLM: ``runner.execute_model_state`` holds a step whose tokens were not sampled
    yet (``execute_model`` refuses to run while it is set), and an empty ``SchedulerOutput``
    whose ``finished_req_ids`` lists requests removes them from the batch.
    """
    req_ids = set(req_ids)
    if not req_ids and runner.execute_model_state is None:
        return
    runner.execute_model_state = None
    reset = SchedulerOutput.make_empty()
    reset.finished_req_ids = req_ids
    runner.execute_model(reset)


@contextlib.contextmanager
def mamba_alignment_where_held(runner: Any) -> Iterator[None]:
    """Run one step with Mamba state alignment off when ``runner`` holds no Mamba layer.

    A stage of a hybrid model may hold only attention layers. Its KV plan still has the model's
    Mamba groups (empty here), sized for alignment, and the head's steps name their blocks.

    Needs from vLLM: with ``cache_config.mamba_cache_mode == "align"``, ``execute_model``
    prepares Mamba state copies every step (``mamba_utils.preprocess_mamba``), and
    ``mamba_utils.get_mamba_groups`` asserts that the worker's plan holds a Mamba layer, so such
    a stage (of a vLLM pipeline too) fails its first step. The mode is read at each step; the
    block tables keep the widths they were built with (``MambaSpec.max_num_blocks_per_req``
    reads the mode when a batch is built), so it is turned off for the step only.
    """
    cache = runner.cache_config
    if cache.mamba_cache_mode != "align" or _holds_mamba_layer(runner.kv_cache_config):
        yield
        return
    cache.mamba_cache_mode = "none"
    try:
        yield
    finally:
        cache.mamba_cache_mode = "align"


def _holds_mamba_layer(plan: KVCacheConfig) -> bool:
    for group in plan.kv_cache_groups:
        spec = group.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.first_spec
        if group.layer_names and isinstance(spec, MambaSpec):
            return True
    return False


def scheduled_rows(runner: Any, scheduler_output: SchedulerOutput) -> list[tuple[str, int, int]]:
    """Which rows of the step ``runner`` just ran belong to which request: ``(request id, first
    position, number of tokens)`` in row order (the rows of the activations it produced).

    Needs from vLLM: ``execute_model`` lays out each scheduled request's tokens as one run of
    rows, in the order of ``runner.input_batch.req_ids`` (``_prepare_inputs``); the scheduler
    output gives each request's computed tokens before the step (``num_computed_tokens`` of
    ``NewRequestData`` and ``CachedRequestData``).
    """
    computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    scheduled = scheduler_output.num_scheduled_tokens
    return [
        (req_id, computed[req_id], scheduled[req_id])
        for req_id in runner.input_batch.req_ids
        if req_id in scheduled
    ]


def kv_positions_written(
    runner: Any, scheduler_output: SchedulerOutput
) -> list[tuple[int, int, list[int]]]:
    """What the step ``runner`` just ran wrote into the KV cache: (first position, positions,
    the request's block ids of its first KV cache group) per request it computed.

    Needs from vLLM: the runner's ``CachedRequestState.block_ids`` hold each request's blocks
    after the step (``_update_states``); the scheduler output gives each request's computed
    tokens before it (as for :func:`scheduled_rows`).
    """
    computed = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    states = runner_requests(runner)
    written = []
    for req_id, num in scheduler_output.num_scheduled_tokens.items():
        state = states.get(req_id)
        if state is not None and num > 0 and req_id in computed:
            written.append((computed[req_id], num, list(request_block_ids(state)[0])))
    return written
