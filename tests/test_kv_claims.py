"""A head's claim on a shared stage waits for the heads over their fair share to shrink."""

from __future__ import annotations

import threading

import pytest

from molink.core.kv_regions import KVRegions, NoRoom
from molink.engine.kv_claims import claim_with_shrinks


def test_a_claim_waits_for_the_asked_head_to_shrink() -> None:
    regions = KVRegions(100)
    regions.claim("a", 100)
    room_freed = threading.Condition()
    asked: list[tuple[str, int]] = []
    waiting: list[set[str]] = []

    def shrink_later(owner: str, share: int) -> None:
        asked.append((owner, share))

        def shrink() -> None:  # what the asked head's next StartStage does
            with room_freed:
                waiting.append(set(regions.waiting))  # a may not grow back meanwhile
                regions.claim(owner, share)
                room_freed.notify_all()

        threading.Timer(0.05, shrink).start()

    with room_freed:
        region = claim_with_shrinks(regions, "b", 50, shrink_later, room_freed, wait_s=10)
    assert asked == [("a", 50)] and waiting == [{"b"}]
    assert region.blocks == 50 and regions.held("a").blocks == 50
    assert regions.waiting == set()


def test_a_claim_gives_up_when_nobody_shrinks() -> None:
    regions = KVRegions(100)
    regions.claim("a", 100)
    room_freed = threading.Condition()
    with room_freed, pytest.raises(NoRoom, match="did not within 0.05 s"):
        claim_with_shrinks(regions, "b", 50, lambda o, s: None, room_freed, wait_s=0.05)
    with room_freed, pytest.raises(NoRoom, match="more than this head's fair share"):
        claim_with_shrinks(regions, "b", 51, lambda o, s: None, room_freed, wait_s=0.05)
