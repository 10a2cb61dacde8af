"""PipelineScheduler's changes to what vLLM's scheduler puts in a step."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.v1.request import RequestStatus

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
    )
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
