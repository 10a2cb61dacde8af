"""A step of one head on a shared stage: its block ids checked and moved into its KV region."""

from __future__ import annotations

import pytest
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from molink.core.head_session import HeadSession, StepRefused
from molink.core.kv_regions import Region


def new_request(req_id: str, blocks: list[int]) -> NewRequestData:
    return NewRequestData(
        req_id=req_id,
        prompt_token_ids=[1, 2, 3],
        mm_features=[],
        sampling_params=None,
        pooling_params=None,
        block_ids=(blocks,),
        num_computed_tokens=0,
        lora_request=None,
    )


def step(
    new: list[NewRequestData] = (),  # type: ignore[assignment]
    cached: dict[str, list[int] | None] | None = None,
    finished: set[str] = frozenset(),  # type: ignore[assignment]
) -> SchedulerOutput:
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = list(new)
    cached = cached or {}
    data = CachedRequestData.make_empty()
    data.req_ids = list(cached)
    data.new_block_ids = [None if b is None else (b,) for b in cached.values()]
    so.scheduled_cached_reqs = data
    so.num_scheduled_tokens = {r.req_id: 3 for r in new} | dict.fromkeys(cached, 1)
    so.finished_req_ids = set(finished)
    return so


def test_block_ids_map_into_the_heads_region() -> None:
    # A region need not be contiguous: blocks 100-104, then 200-204.
    session = HeadSession("s", region=Region((*range(100, 105), *range(200, 205))))
    so = step([new_request("a", [1, 2])], cached={"b": [9], "c": None})
    session.admit(so)
    assert so.scheduled_new_reqs[0].block_ids == ([101, 102],)
    assert so.scheduled_cached_reqs.new_block_ids == [([204],), None]


def test_blocks_outside_the_heads_plan_are_refused() -> None:
    session = HeadSession("s", region=Region(tuple(range(100, 110))))
    for bad in (10, -1, True, 2.0):
        with pytest.raises(StepRefused, match="outside this head's 10 blocks"):
            session.admit(step([new_request("a", [bad])]))


def test_a_head_without_a_region_or_a_heads_own_stage() -> None:
    with pytest.raises(StepRefused, match="holds no KV blocks"):
        HeadSession("s").admit(step([new_request("a", [1])]))
    own = HeadSession("s", owns_all=True)
    so = step([new_request("a", [1])])
    own.admit(so)  # the head's own stage: nothing to check or move
    assert so.scheduled_new_reqs[0].block_ids == ([1],)


def test_block_copies_map_into_the_heads_region() -> None:
    """A hybrid model's scheduler asks stages to copy blocks (Mamba state): both ends move into
    the head's region, and a copy reaching outside it is refused."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    session = HeadSession("s", region=Region(tuple(range(100, 110))))
    so = step()
    so.kv_cache_block_copies = [KVCacheBlockCopy(1, 2), KVCacheBlockCopy(9, 0)]
    session.admit(so)
    assert so.kv_cache_block_copies == [KVCacheBlockCopy(101, 102), KVCacheBlockCopy(109, 100)]
    for bad in ([KVCacheBlockCopy(1, 10)], [(1, 2)]):
        so = step()
        so.kv_cache_block_copies = bad
        with pytest.raises(StepRefused):
            session.admit(so)
