"""PipelineScheduler's changes to what vLLM's scheduler puts in a step."""

from __future__ import annotations

from types import SimpleNamespace

from molink.core.scheduler import PipelineScheduler


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
