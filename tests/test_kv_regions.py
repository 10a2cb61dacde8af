"""Regions of a shared stage's KV cache: one per head, never overlapping."""

from __future__ import annotations

import pytest

from molink.core.kv_regions import KVRegions, NoRoom, Region


def test_heads_get_disjoint_regions_and_freed_blocks_are_reused() -> None:
    regions = KVRegions(100)
    a = regions.claim("a", 40)
    b = regions.claim("b", 50)
    assert (a, b) == (Region(0, 40), Region(40, 50))
    assert regions.free_blocks() == 10 and regions.room("c") == 10
    with pytest.raises(NoRoom, match=r"room for 10 KV blocks \(of 100; 2 other head"):
        regions.claim("c", 11)
    regions.release("a")
    assert regions.claim("c", 30) == Region(0, 30)  # first fit, in a's old place
    assert regions.room("d") == 10  # 10 free at 30..39, 10 at 90..99: not contiguous
    assert regions.free_blocks() == 20


def test_a_head_claiming_again_keeps_or_moves_its_region() -> None:
    regions = KVRegions(100)
    first = regions.claim("a", 60)
    assert regions.claim("a", 60) is first  # a new epoch keeps the same blocks
    assert regions.room("a") == 100  # its own blocks count as free for itself
    regions.claim("b", 40)
    with pytest.raises(NoRoom):
        regions.claim("a", 61)
    assert regions.held("a") == first  # a failed claim leaves the old one
    assert regions.claim("a", 30) == Region(0, 30)
    assert set(regions.owners()) == {"a", "b"}


def test_a_region_has_blocks() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        KVRegions(10).claim("a", 0)
