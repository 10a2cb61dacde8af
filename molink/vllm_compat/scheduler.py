""":class:`SchedulerHooks`: vLLM's scheduler with MoLink's hooks on its private methods and state.

MoLink's scheduler (:class:`molink.core.scheduler.PipelineScheduler`) needs to see every
preemption and every finished request, to trim what a step carries, to schedule a step that
admits nothing, and to schedule one micro-batch of the running requests. vLLM's ``Scheduler``
offers no public hook for any of these; this base class overrides the private methods and
touches the private state, and calls public-named hook methods that the subclass implements.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, MLAAttentionSpec
from vllm.v1.request import Request

_FULL_ATTENTION_SPECS = (FullAttentionSpec, MLAAttentionSpec)


def full_attention_only(kv_cache_config: KVCacheConfig) -> bool:
    """Whether a KV cache plan is one group of full-attention layers (no sliding window, no
    Mamba state): the layout a replay fills block by block.

    Needs from vLLM: ``kv_cache_config.kv_cache_groups[i].kv_cache_spec``.
    """
    groups = kv_cache_config.kv_cache_groups
    return len(groups) == 1 and type(groups[0].kv_cache_spec) in _FULL_ATTENTION_SPECS


class SchedulerHooks(Scheduler):
    """vLLM's ``Scheduler`` with hooks; subclass it and override the ``on_*`` and
    :meth:`cached_request_data` methods (each does nothing by default)."""

    # ------------------------------------------------------------ hooks for subclasses
    def cached_request_data(self, data: CachedRequestData) -> CachedRequestData:
        """Adjust the cached-request part of a step before it is sent (default: unchanged).

        Called from vLLM's private ``Scheduler._make_cached_request_data``, which builds it.
        """
        return data

    def on_request_preempted(self, request: Request, computed_tokens: int) -> None:
        """``request`` was preempted back to waiting; it had ``computed_tokens`` computed
        (which it will recompute). Called from vLLM's private ``Scheduler._preempt_request``."""

    def on_request_freed(self, request: Request) -> None:
        """``request`` finished (any way: stopped, aborted, failed) and was freed. Called from
        vLLM's private ``Scheduler._free_request``."""

    # ------------------------------------------------------------ vLLM's private methods
    def _make_cached_request_data(self, *args: Any, **kwargs: Any) -> CachedRequestData:
        """Needs from vLLM: ``Scheduler._make_cached_request_data`` builds each step's
        ``CachedRequestData``."""
        return self.cached_request_data(super()._make_cached_request_data(*args, **kwargs))

    def _preempt_request(self, request: Request, *args: Any, **kwargs: Any) -> None:
        """Needs from vLLM: ``Scheduler._preempt_request(request, ...)`` runs for every
        preemption."""
        computed = request.num_computed_tokens
        super()._preempt_request(request, *args, **kwargs)
        self.on_request_preempted(request, computed)

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        """Needs from vLLM: ``Scheduler._free_request(request, ...)`` runs once for every
        finished request."""
        result = super()._free_request(request, *args, **kwargs)
        self.on_request_freed(request)
        return result

    # ------------------------------------------------------------ the KV block pool
    def retire_kv_blocks(self, num_blocks: int) -> bool:
        """Use only block ids below ``num_blocks`` from now on (:meth:`grow_kv_blocks` adds
        them back).

        Returns False, changing nothing, while a block to retire is in use. Call it when no
        request holds blocks (after ``reset_prefix_cache(reset_running_requests=True)``).

        Needs from vLLM: ``kv_cache_manager.block_pool`` holds every block in ``blocks`` (block
        ``i`` at index ``i``), the free ones in ``free_block_queue`` (``remove``), and counts them
        in ``num_gpu_blocks``; ``evict_blocks`` drops cached hashes.
        """
        pool = self.kv_cache_manager.block_pool
        retired = pool.blocks[num_blocks:]
        if not retired:
            return True
        if any(block.ref_cnt or block.is_null for block in retired):
            return False
        pool.evict_blocks({block.block_id for block in retired})
        for block in retired:
            pool.free_block_queue.remove(block)
        del pool.blocks[num_blocks:]
        pool.num_gpu_blocks = num_blocks
        self.cache_config.num_gpu_blocks = num_blocks
        return True

    def grow_kv_blocks(self, num_blocks: int) -> None:
        """Add free blocks up to ``num_blocks`` to the pool (after :meth:`retire_kv_blocks`; the
        KV cache tensors must hold them).

        Needs from vLLM: as :meth:`retire_kv_blocks`, and ``KVCacheBlock(block_id, pool=...)``
        makes a free block; ``free_block_queue.append_n`` queues it.
        """
        pool = self.kv_cache_manager.block_pool
        added = [KVCacheBlock(i, pool=pool) for i in range(len(pool.blocks), num_blocks)]
        pool.blocks.extend(added)
        pool.free_block_queue.append_n(added)
        pool.num_gpu_blocks = len(pool.blocks)
        self.cache_config.num_gpu_blocks = len(pool.blocks)

    def roll_back_to_confirmed(self, keep: set[int]) -> None:
        """Keep every running request running, with only the tokens whose step came back
        counted as computed (the steps in flight are scheduled again) and the outputs of those
        steps dropped when they arrive; keep only the blocks ``keep`` in the prefix cache.

        Needs from vLLM: ``num_computed_tokens`` counts scheduled tokens and
        ``num_in_flight_tokens`` those of steps not yet through ``update_from_output``, which
        drops a step's output while ``num_stale_output_tokens`` covers it under
        ``drop_stale_output`` (as after ``_preempt_request(..., drop_stale_output=True)``);
        ``prev_step_scheduled_req_ids`` decides what the next step tells the workers; cached
        blocks keep their hashes until ``kv_cache_manager.evict_blocks``.
        """
        for request in self.running:
            request.num_computed_tokens -= request.num_in_flight_tokens
            request.num_stale_output_tokens = request.num_in_flight_tokens
            request.drop_stale_output = request.num_in_flight_tokens > 0
            request.spec_token_ids = []
        self.prev_step_scheduled_req_ids.clear()
        pool = self.kv_cache_manager.block_pool
        self.kv_cache_manager.evict_blocks({b.block_id for b in pool.blocks} - keep)

    def preempt_running(self, request_ids: set[str]) -> None:
        """Preempt the running requests ``request_ids`` to recompute, dropping their in-flight
        outputs (as ``reset_prefix_cache(reset_running_requests=True)`` does for all)."""
        timestamp = time.monotonic()
        for request in [r for r in self.running if r.request_id in request_ids]:
            blocks = set(self.request_block_ids(request))
            self.running.remove(request)
            self._preempt_request(request, timestamp, drop_stale_output=True)
            self.kv_cache_manager.evict_blocks(blocks)

    def mark_resumed(self, data: CachedRequestData, request_ids: set[str]) -> None:
        """Make the running requests of ``request_ids`` in ``data`` resumed ones, each with all
        its blocks (a worker that dropped them takes them back), and take them off the set.

        Needs from vLLM: a worker replaces a resumed request's block ids with ``new_block_ids``
        and adds it to its batch (``GPUModelRunner._update_states``).
        """
        for i, req_id in enumerate(data.req_ids):
            if req_id in request_ids:
                request_ids.discard(req_id)
                data.resumed_req_ids.add(req_id)
                data.new_block_ids[i] = self.kv_cache_manager.get_block_ids(req_id)

    def confirmed_tokens(self, request: Request) -> int:
        """Tokens of ``request`` whose step came back from every stage.

        Needs from vLLM: ``num_computed_tokens`` counts scheduled tokens as soon as they are
        scheduled, and ``num_in_flight_tokens`` those of steps not yet through
        ``update_from_output``.
        """
        return request.num_computed_tokens - request.num_in_flight_tokens

    def full_attention_only(self) -> bool:
        """Whether this scheduler's KV cache is one that a replay fills (see
        :func:`full_attention_only`)."""
        return full_attention_only(self.kv_cache_config)

    def request_block_ids(self, request: Request) -> list[int]:
        """The blocks of ``request`` (one KV cache group)."""
        return list(self.kv_cache_manager.get_block_ids(request.request_id)[0])

    def kv_pool_blocks(self) -> int:
        """Blocks in the KV block pool (the null block included)."""
        return self.kv_cache_manager.block_pool.num_gpu_blocks

    # ------------------------------------------------------------ scheduling variants
    def schedule_paused(self, throttle_prefills: bool = False) -> SchedulerOutput:
        """vLLM's ``schedule()`` as if paused: no tokens, but the output still carries the
        finished request ids to the stages.

        Needs from vLLM: ``schedule()`` reads ``self._pause_state`` on each call and schedules
        nothing under ``PauseState.PAUSED_ALL``. (``set_pause_state`` would log every step.)
        """
        saved, self._pause_state = self._pause_state, PauseState.PAUSED_ALL
        try:
            return super().schedule(throttle_prefills)
        finally:
            self._pause_state = saved

    def schedule_subset(
        self, hidden: list[Request], token_budget: int, throttle_prefills: bool = False
    ) -> SchedulerOutput:
        """vLLM's ``schedule()`` with the running requests in ``hidden`` out of its sight and at
        most ``token_budget`` tokens (never more than the configured budget).

        The hidden requests stay running and go back to their places in ``running`` afterwards
        (requests admitted by this call stay at the end); the running-request cap and the
        admission cap are lowered by as many, so they keep their slots.

        Needs from vLLM: ``schedule()`` reads ``running``, ``max_num_scheduled_tokens``,
        ``max_num_running_reqs`` (asserted) and ``max_num_active_reqs`` (what admits waiting
        requests) from the instance on each call.
        """
        hidden_ids = {id(r) for r in hidden}
        order = {id(r): i for i, r in enumerate(self.running)}
        hidden_reqs = [r for r in self.running if id(r) in hidden_ids]
        saved_budget = self.max_num_scheduled_tokens
        saved_caps = self.max_num_running_reqs, self.max_num_active_reqs
        self.running = [r for r in self.running if id(r) not in hidden_ids]
        self.max_num_scheduled_tokens = min(saved_budget, token_budget)
        self.max_num_running_reqs = saved_caps[0] - len(hidden_reqs)
        self.max_num_active_reqs = saved_caps[1] - len(hidden_reqs)
        try:
            return super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens = saved_budget
            self.max_num_running_reqs, self.max_num_active_reqs = saved_caps
            self.running = sorted(
                self.running + hidden_reqs, key=lambda r: order.get(id(r), float("inf"))
            )


def replay_scheduler_output(
    pieces: list[tuple[str, list[int], list[int], int, int]],
) -> SchedulerOutput:
    """A step that computes, for each ``(req_id, token_ids, block_ids, start, end)``, positions
    [start, end) of a new request on a stage whose KV cache holds nothing of it: positions below
    ``start`` count as cached (like a prefix-cache hit), ``token_ids`` are the request's first
    ``end`` tokens at least and ``block_ids`` its blocks (one KV cache group). Sampled tokens, on
    a last stage, are thrown away.

    Needs from vLLM: ``NewRequestData(num_computed_tokens=start)`` makes the runner compute only
    the tokens after ``start`` and write their KV into ``block_ids``.
    """
    output = SchedulerOutput.make_empty()
    for req_id, token_ids, block_ids, start, end in pieces:
        output.scheduled_new_reqs.append(
            NewRequestData(
                req_id=req_id,
                prompt_token_ids=list(token_ids[:end]),
                mm_features=[],
                sampling_params=SamplingParams(max_tokens=1, temperature=0.0),
                pooling_params=None,
                block_ids=(list(block_ids),),
                num_computed_tokens=start,
                lora_request=None,
            )
        )
        output.num_scheduled_tokens[req_id] = end - start
    output.total_num_scheduled_tokens = sum(output.num_scheduled_tokens.values())
    return output
