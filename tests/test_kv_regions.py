"""Regions of a shared stage's KV cache: one per head, never overlapping, shared fairly."""

from __future__ import annotations

import pytest

from molink.core.kv_regions import KVRegions, NoRoom, Region


def blocks(start: int, stop: int) -> tuple[int, ...]:
    return tuple(range(start, stop))


def test_heads_get_disjoint_regions_and_freed_blocks_are_reused() -> None:
    regions = KVRegions(100)
    a = regions.claim("a", 40)
    b = regions.claim("b", 50)
    assert (a, b) == (Region(blocks(0, 40)), Region(blocks(40, 90)))
    assert regions.free_blocks() == 10 and regions.room("c") == 10
    with pytest.raises(NoRoom, match=r"room for 10 KV blocks \(of 100; 2 other head"):
        regions.claim("c", 11)
    regions.release("a")
    assert regions.claim("c", 30) == Region(blocks(0, 30))  # lowest free blocks first
    # Free blocks need not be contiguous: 30-39 and 90-99 make one region of 20.
    d = regions.claim("d", 20)
    assert d.ids == (*blocks(30, 40), *blocks(90, 100))
    assert d.runs() == [(30, 10), (90, 10)]
    assert regions.free_blocks() == 0


def test_a_head_claiming_again_keeps_its_blocks_and_shrinks_in_place() -> None:
    regions = KVRegions(100)
    first = regions.claim("a", 60)
    assert regions.claim("a", 60) == first  # a new epoch keeps the same blocks
    assert regions.room("a") == 100  # its own blocks count as free for itself
    regions.claim("b", 40)
    with pytest.raises(NoRoom):
        regions.claim("a", 61)
    assert regions.held("a") == first  # a failed claim leaves the old one
    assert regions.claim("a", 30) == Region(blocks(0, 30))  # gives back its last blocks
    assert set(regions.owners()) == {"a", "b"}


def test_a_region_has_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        KVRegions(10).claim("a", 0)


def test_a_new_head_is_offered_the_free_blocks_or_its_fair_share() -> None:
    regions = KVRegions(100)
    assert regions.offer("a", min_blocks=10) == 100  # alone: everything
    regions.claim("a", 100)
    assert regions.offer("b", min_blocks=10) == 50  # nothing free: half
    assert regions.shrinks_for("b", 50) == {"a": 50}
    regions.claim("a", 50)
    assert regions.shrinks_for("b", 50) == {}
    regions.claim("b", 50)
    # A third: a third each, from the largest holders first, only as many as needed.
    assert regions.offer("c", min_blocks=10) == 33
    assert regions.shrinks_for("c", 33) == {"a": 33, "b": 33}
    assert regions.shrinks_for("c", 16) == {"a": 33}
    with pytest.raises(NoRoom, match="more than this head's fair share of 33"):
        regions.shrinks_for("c", 34)


def test_a_head_gets_the_free_blocks_when_they_beat_the_fair_share() -> None:
    regions = KVRegions(100)
    regions.claim("a", 20)  # a small head (its own memory is the limit)
    assert regions.offer("b", min_blocks=10) == 80
    assert regions.shrinks_for("b", 80) == {}


def test_no_share_is_offered_that_cant_hold_one_request() -> None:
    regions = KVRegions(45)
    regions.claim("a", 22)
    regions.claim("b", 22)
    # A third's share would be 15 blocks, fewer than one request needs: only the free block.
    assert regions.offer("c", min_blocks=17) == 1
    assert regions.offer("a", min_blocks=17) == 22  # the free block is beyond a's share


def test_when_a_head_leaves_those_below_the_new_share_may_grow_to_it() -> None:
    regions = KVRegions(90)
    for owner in "abc":
        regions.claim(owner, 30)  # three fair shares
    assert regions.growth_offers() == {}
    assert regions.offer("a", min_blocks=10) == 30  # holders: no more than their share
    regions.release("c")
    assert regions.growth_offers() == {"a": 45, "b": 45}
    assert regions.offer("a", min_blocks=10) == 45
    grown = regions.claim("a", 45)  # in place: its first 30 blocks stay
    assert grown.ids[:30] == blocks(0, 30) and regions.free_blocks() == 15
    regions.release("b")
    assert regions.growth_offers() == {"a": 90}
    regions.release("a")
    assert regions.growth_offers() == {}


def test_a_head_waiting_for_room_counts_among_the_holders() -> None:
    regions = KVRegions(90)
    regions.claim("a", 45)
    regions.claim("b", 45)
    regions.release("b")
    assert regions.growth_offers() == {"a": 90}
    regions.waiting.add("c")  # c waits for room: a may not grow into it
    assert regions.growth_offers() == {} and regions.offer("a", min_blocks=10) == 45
    assert regions.fair_share("c") == 45
