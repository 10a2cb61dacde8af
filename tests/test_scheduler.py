"""PipelineScheduler's changes to what vLLM's scheduler puts in a step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.v1.request import RequestStatus

from molink.core.replay_plan import ReplayHandshake
from molink.core.scheduler import MAX_STAGE_LOSSES, PipelineScheduler


def _request(req_id: str, tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(
        request_id=req_id,
        all_token_ids=tokens,
        num_computed_tokens=len(tokens) - 1,
        num_output_tokens=1,
        num_output_placeholders=0,
    )


def test_cached_requests_carry_no_token_lists() -> None:
    """With micro-batches in flight every request missed the previous step, so vLLM would copy
    each one's whole token list into every step; the pipeline sends none (async scheduling,
    their only reader, is off)."""
    scheduler = PipelineScheduler.__new__(PipelineScheduler)  # only what the method reads
    scheduler.use_pp = True
    scheduler.scheduler_config = SimpleNamespace(async_scheduling=False)
    scheduler.use_v2_model_runner = False
    scheduler.prev_step_scheduled_req_ids = set()  # the other micro-batch ran last
    scheduler._reintroduce = set()  # no recovery by replay under way
    requests = [_request("a", list(range(300))), _request("b", list(range(200)))]
    blocks = SimpleNamespace(get_block_ids=lambda allow_none: None)

    data = scheduler._make_cached_request_data(
        requests, [], {"a": 1, "b": 1}, {}, {"a": blocks, "b": blocks}
    )

    assert data.all_token_ids == {}
    assert data.req_ids == ["a", "b"]
    assert data.new_token_ids == [[299], [199]]  # what later stages do read
    assert data.num_computed_tokens == [299, 199]


def _barrier_scheduler(
    last_cause: str = "stage_loss", kv_blocks_limit: int | None = None
) -> tuple[PipelineScheduler, list[str]]:
    """A scheduler with only what the barrier reads: request "a" running, "b" waiting; and the
    list of requests it fails."""
    scheduler = PipelineScheduler.__new__(PipelineScheduler)
    survivor = SimpleNamespace(request_id="b", status=None, mm_features=None)
    doomed = SimpleNamespace(request_id="a", status=None, mm_features=None)
    scheduler.running = [doomed]
    scheduler.requests = {"a": doomed, "b": survivor}
    scheduler.pipeline = SimpleNamespace(
        last_error="lost stage 10.0.0.2:50051 [3-5]",
        last_cause=last_cause,
        kv_blocks_limit=kv_blocks_limit,
        replay_log=None,  # --recovery recompute
        replay=ReplayHandshake(),
    )
    scheduler._replay_epoch, scheduler._reintroduce = None, set()
    scheduler._down_since = None
    scheduler._stage_losses, scheduler._failure_causes = {}, {}
    scheduler._pending_errors, scheduler._known = [], set()
    scheduler.reset_prefix_cache = lambda reset_running_requests=False: True
    finished: list[str] = []

    def finish_requests(ids: list[str], status: RequestStatus) -> list[SimpleNamespace]:
        assert status == RequestStatus.FINISHED_ERROR
        finished.extend(ids)
        return [scheduler.requests[rid] for rid in ids]

    scheduler.finish_requests = finish_requests
    return scheduler, finished


def test_a_request_on_max_stage_losses_lost_chains_fails_with_the_cause() -> None:
    """A request that was running on MAX_STAGE_LOSSES broken chains may be what breaks them:
    the third loss fails it with the cause; the first two send it back to waiting."""
    scheduler, finished = _barrier_scheduler()
    doomed = scheduler.requests["a"]
    for epoch in range(1, MAX_STAGE_LOSSES):
        scheduler._barrier(epoch)
        assert finished == [] and scheduler._stage_losses == {"a": epoch}
    scheduler._barrier(MAX_STAGE_LOSSES)
    assert finished == ["a"]  # "b" never ran on a lost chain
    ((request, cause),) = scheduler._pending_errors
    assert request is doomed
    assert cause == (
        f"the request was on {MAX_STAGE_LOSSES} lost pipelines; "
        "last: lost stage 10.0.0.2:50051 [3-5]"
    )
    assert "a" not in scheduler._stage_losses


def test_a_kv_resize_recomputes_in_fewer_blocks_and_is_no_loss() -> None:
    scheduler, finished = _barrier_scheduler("kv_resize", kv_blocks_limit=22)
    pool = [45]
    scheduler.kv_pool_blocks = lambda: pool[0]

    def retire(num_blocks: int) -> bool:
        pool[0] = num_blocks
        return True

    scheduler.retire_kv_blocks = retire
    for epoch in range(1, MAX_STAGE_LOSSES + 1):
        scheduler._barrier(epoch)
    assert pool == [22]
    assert finished == [] and scheduler._stage_losses == {}


def test_a_kv_resize_grows_the_pool_back_up_to_the_limit() -> None:
    scheduler, finished = _barrier_scheduler("kv_resize", kv_blocks_limit=45)
    pool = [22]
    scheduler.kv_pool_blocks = lambda: pool[0]
    scheduler.retire_kv_blocks = lambda num_blocks: pytest.fail("nothing to retire")

    def grow(num_blocks: int) -> None:
        pool[0] = num_blocks

    scheduler.grow_kv_blocks = grow
    scheduler._barrier(1)
    assert pool == [45] and finished == [] and scheduler._stage_losses == {}


def test_a_micro_batch_admits_no_request_beyond_max_num_seqs(qwen3_model: str) -> None:
    """Decodes hidden from one micro-batch keep their slots: with 2 of 4 slots hidden, the 2
    waiting requests wait (vLLM 0.32 admits by ``max_num_active_reqs``, and its engine dies on
    ``assert len(self.running) <= self.max_num_running_reqs`` if they get in)."""
    import torch
    from vllm import SamplingParams
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from molink.vllm_compat.scheduler import SchedulerHooks

    class Hooked(SchedulerHooks, Scheduler):
        pass

    cache = CacheConfig(block_size=16)
    cache.num_gpu_blocks = 100
    config = VllmConfig(
        model_config=ModelConfig(model=qwen3_model, dtype="float32", max_model_len=512),
        scheduler_config=SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512, is_encoder_decoder=False
        ),
        cache_config=cache,
    )
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(100, [], [KVCacheGroupSpec(["layer"], spec)])
    scheduler = Hooked(config, kv, StructuredOutputManager(config), block_size=16)
    for i in range(6):
        scheduler.add_request(Request(f"r{i}", [1, 2, 3, 4], SamplingParams(max_tokens=8), None))
    scheduler.schedule()
    assert len(scheduler.running) == 4 and len(scheduler.waiting) == 2
    scheduler.schedule_subset(hidden=scheduler.running[2:], token_budget=64)
    assert len(scheduler.running) == 4 and len(scheduler.waiting) == 2
    assert (scheduler.max_num_running_reqs, scheduler.max_num_active_reqs) == (4, 4)
