"""A head's claim of KV blocks on a shared stage, waiting for other heads to shrink.

:class:`~molink.core.kv_regions.KVRegions` decides who holds which blocks and what a fair share
is; this is the waiting around it: when the blocks a head planned aren't free, the heads holding
more than their fair share are asked to shrink (on their result streams), and the claim waits,
on the stage's condition variable, until they claimed again with fewer blocks or left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from molink.core.kv_regions import KVRegions, NoRoom, Region


def claim_with_shrinks(
    regions: KVRegions,
    owner: str,
    blocks: int,
    ask_to_shrink: Callable[[str, int], None],
    room_freed: threading.Condition,
    wait_s: float,
) -> Region:
    """Claim ``blocks`` blocks for ``owner``; if they aren't free, ``ask_to_shrink(other,
    share)`` each head over its fair share once, and wait up to ``wait_s`` seconds for room.

    The caller holds ``room_freed``'s lock, which the wait releases. Raises
    :class:`~molink.core.kv_regions.NoRoom` when even a fair share can't make room, or when the
    heads asked did not shrink in time.
    """
    deadline = time.monotonic() + wait_s
    asked: dict[str, int] = {}
    try:
        while True:
            try:
                region = regions.claim(owner, blocks)
                room_freed.notify_all()  # it may have given blocks back
                return region
            except NoRoom as e:
                if not asked:
                    asked = regions.shrinks_for(owner, blocks)
                    if not asked:
                        raise
                    regions.waiting.add(owner)  # no one grows into the room it waits for
                    for other, share in asked.items():
                        ask_to_shrink(other, share)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoRoom(
                        f"{e}; the heads asked to shrink to their fair share did not within "
                        f"{wait_s:g} s"
                    ) from None
                room_freed.wait(left)
    finally:
        regions.waiting.discard(owner)
